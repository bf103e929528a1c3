//! One branchsync node: the daemon behind `branchsync run`.
//!
//! ```text
//!            +-----------+     +-----------+     +--------------------+
//!  WAL ----> | capture   | --> | ChangeLog | --> | link (per peer)    | --> peer
//!            +-----------+     +-----------+     |  apply task <------| <-- peer
//!            monitor: relay head, conflict count, stripe audit          |
//!            http: /status /metrics /health     +--------------------+
//! ```
//!
//! [`Node::start`] does all fallible setup first (database identity, log,
//! the R4 check that the database did not go back in time), then spawns
//! named tasks that all watch one shutdown signal. [`Node::shutdown`] asks
//! them to stop: capture finishes its batch, links drain their apply tasks
//! (committing what is whole), and [`Node::wait`] returns when all are done.
//! Transient failures (database restarting, peer unreachable) are retried
//! with backoff inside the tasks; a definite one (misconfiguration, a
//! diverged database) stops the node with the reason.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use branchsync_engine::apply::ApplyConfig;
use branchsync_engine::capture::{run_capture, CaptureConfig, CaptureStatus};
use branchsync_engine::log::ChangeLog;
use branchsync_engine::pg::{self, fmt_lsn};
use branchsync_engine::ddl::DdlPolicy;
use branchsync_engine::scope::Scope;
use branchsync_engine::conflict_log::ConflictKind;
use branchsync_engine::{keys, state, EngineError, Role};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::link::{self, Admission, LinkSettings};
use crate::status::{DdlFailure, NodeStatus};

/// Everything a node needs, resolved from the configuration.
#[derive(Clone)]
pub struct NodeSettings {
    /// Node name.
    pub node: String,
    /// Main or branch.
    pub role: Role,
    /// Node index (key stripe).
    pub index: u32,
    /// Key stride.
    pub stride: u32,
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// Local database.
    pub db_url: String,
    /// Replicated tables.
    pub scope: Scope,
    /// Branch: the main's address.
    pub main_addr: Option<String>,
    /// Main: where to listen.
    pub listen: Option<String>,
    /// Who may connect (main) and the branch's own token, as the
    /// configuration says now: a reload (SIGHUP) sends a new one.
    pub admission: watch::Receiver<Arc<Admission>>,
    /// HTTP status address.
    pub http_listen: Option<String>,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Silence after which a peer is gone.
    pub peer_timeout: Duration,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
    /// Group budget of apply transactions.
    pub group_budget: Duration,
    /// Largest frame.
    pub max_frame: usize,
    /// Flow-control window (bytes).
    pub window: usize,
    /// How the log is kept (acknowledged entries, disk budget).
    pub log: branchsync_engine::log::LogOptions,
    /// Rows and bytes per log fragment; largest row captured.
    pub fragment_rows: usize,
    pub fragment_bytes: usize,
    pub max_row_bytes: usize,
    /// Capture streams the slot (else it peeks).
    pub capture_stream: bool,
    /// `nice` of capture's thread (`database.capture_nice`).
    pub capture_nice: i32,
    /// `[ddl]`: whose schema changes replay here, and as which role.
    pub ddl: DdlPolicy,
    /// `[[tables]]`: per-table rules.
    pub tables: branchsync_engine::conflict::TableRules,
    /// The `[preset]`'s version, told at the handshake with the rules.
    pub preset: Option<String>,
    /// How long tombstones are kept, and how long a branch may be away.
    pub retention: Duration,
    /// Period of the sequence stripe audit.
    pub audit_interval: Duration,
    /// TLS of the link.
    pub tls: crate::link::LinkTls,
    /// `[http] token`.
    pub http_token: Option<String>,
    /// Main: largest lead of a branch's stamp over the main's clock.
    pub max_stamp_ahead: Duration,
}

/// How often the log's meta (peers' acknowledgements and contact times) is
/// written.
const META_PERIOD: Duration = Duration::from_secs(30);

/// How often the main records its branches' contact and drops old tombstones.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(10);

/// A running node.
pub struct Node {
    shutdown_tx: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, Result<(), EngineError>)>,
    /// Address of the HTTP status server.
    pub http_addr: Option<std::net::SocketAddr>,
}

fn misconfigured(message: String, detail: String, hint: &str) -> EngineError {
    EngineError::Misconfigured { message, detail, hint: hint.into() }
}

/// Checks that `branchsync init` ran for this node on this database.
async fn check_identity(client: &tokio_postgres::Client, s: &NodeSettings, system_id: u64) -> Result<(), EngineError> {
    let row = client
        .query_opt(
            "SELECT name, node_index, role, stride, system_id FROM branchsync.node WHERE to_regclass('branchsync.node') IS NOT NULL",
            &[],
        )
        .await;
    let row = match row {
        Ok(r) => r,
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(EngineError::pg("reading branchsync.node")(e)),
    };
    let Some(row) = row else {
        return Err(misconfigured(
            "database is not initialised for branchsync".into(),
            "The schema branchsync or its node row is missing.".into(),
            "Run branchsync init --config FILE first.",
        ));
    };
    let (name, index, role, stride, sid): (String, i32, String, i32, String) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if name != s.node || index as u32 != s.index || role != s.role.to_string() || stride as u32 != s.stride {
        return Err(misconfigured(
            format!("database was initialised as node \"{name}\" (index {index}, role {role}, stride {stride})"),
            format!("The configuration says node \"{}\" (index {}, role {}, stride {}).", s.node, s.index, s.role, s.stride),
            "Run branchsync init with this configuration (a copy of another node's database is re-initialised by init).",
        ));
    }
    if sid != system_id.to_string() {
        return Err(EngineError::Diverged {
            message: "database cluster changed since branchsync init".into(),
            detail: format!("init ran on system identifier {sid}; this cluster is {system_id}."),
            hint: "If the database was restored or copied into a new cluster, run branchsync init again.".into(),
        });
    }
    // The event triggers decide what DDL replicates from the scope init
    // recorded: it must be the configured one.
    let recorded = branchsync_engine::ddl::triggers::recorded_scope(client).await.ok().flatten();
    let wanted = (s.scope.schemas().to_vec(), s.scope.exclude_globs().to_vec());
    if recorded.as_ref() != Some(&wanted) {
        let was = match &recorded {
            Some((schemas, exclude)) => format!("schemas {schemas:?} and exclude {exclude:?}"),
            None => "nothing (init ran with an older branchsync)".into(),
        };
        return Err(misconfigured(
            "database.schemas or database.exclude changed since branchsync init".into(),
            format!("init recorded {was}; the configuration says schemas {:?} and exclude {:?}.", wanted.0, wanted.1),
            "Run branchsync init with this configuration: it updates the publication, the stripes and the DDL triggers.",
        ));
    }
    Ok(())
}

/// R26: the log in `data_dir` and the database belong together. The first
/// start after `init` binds them (the database records the log's epoch);
/// afterwards a new, empty log beside a database that has replicated (the
/// data directory was lost), or another database's log, is refused.
async fn check_log_identity(client: &tokio_postgres::Client, s: &NodeSettings, log: &ChangeLog, dir: &std::path::Path) -> Result<(), EngineError> {
    let recorded: Option<String> = client
        .query_one("SELECT log_epoch FROM branchsync.node", &[])
        .await
        .map_err(EngineError::pg("reading the node's log identity"))?
        .get(0);
    let ours = format!("{:016x}", log.epoch());
    let procedure = match s.role {
        Role::Main => "Restore the data directory from a backup. If it is lost for good: run branchsync init --accept-new-log --config FILE here (a new relay log starts), then re-seed every branch, whose relay progress belongs to the lost log.",
        Role::Branch => "Restore the data directory from a backup. If it is lost for good, re-seed this branch: run branchsync join --discard-local --config FILE here (it copies the main while the chain keeps selling; the main then forgets the old stream).",
    };
    match recorded {
        None if log.is_empty() || log.identity_new() => {
            client
                .execute("UPDATE branchsync.node SET log_epoch = $1", &[&ours])
                .await
                .map_err(EngineError::pg("recording the node's log identity"))?;
            tracing::info!(epoch = %ours, "log bound to this database");
            Ok(())
        }
        None => Err(misconfigured(
            format!("the log in {} does not belong to this database", dir.display()),
            format!("The log (identity {ours}) holds changes, but this database was initialised anew or copied from another node since: it has not used this log."),
            "Move the data directory's log away (keep it until you know what it held) and start again.",
        )),
        Some(r) if r == ours => Ok(()),
        Some(r) if log.is_empty() => Err(EngineError::Diverged {
            message: format!("the log in {} is new, but this database has replicated with another log", dir.display()),
            detail: format!("This database used log {r}; the data directory now holds an empty log ({ours}): it was lost, deleted or replaced. Changes captured into the old log and not yet sent are lost to replication, and peers must not skip what it held."),
            hint: procedure.into(),
        }),
        Some(r) => Err(EngineError::Diverged {
            message: format!("the log in {} belongs to another database", dir.display()),
            detail: format!("This database used log {r}; the data directory holds log {ours}."),
            hint: "Point node.data_dir at this database's data directory. If the database was restored or copied, see branchsync init.".into(),
        }),
    }
}

impl Node {
    /// Checks the database and the log, then starts every task.
    pub async fn start(s: NodeSettings) -> Result<Node, EngineError> {
        let conn = pg::connect(&s.db_url, "branchsync startup").await?;
        branchsync_engine::setup::preflight(&conn.client).await?;
        if s.role == Role::Main {
            // One origin per branch whose stream the main applies.
            let branches = s.admission.borrow().names().len();
            branchsync_engine::setup::check_origin_capacity(&conn.client, branches).await?;
        }
        let system_id = pg::system_identifier(&conn.client).await?;
        check_identity(&conn.client, &s, system_id).await?;
        std::fs::create_dir_all(&s.data_dir).map_err(|e| {
            misconfigured(format!("cannot create data directory {}", s.data_dir.display()), e.to_string(), "Check node.data_dir and its permissions.")
        })?;
        let log_dir = s.data_dir.join("log");
        let log = Arc::new(ChangeLog::open_with(&log_dir, s.log)?);
        // R4 at startup: the WAL must not be behind what the log captured.
        let wal = pg::current_wal_lsn(&conn.client).await?;
        let captured = log.captured_lsn()?;
        if wal < captured {
            let hint = match s.role {
                Role::Main => "The main's database was restored from a backup. Make sure nothing writes to it, then run branchsync init --restored --config FILE: the relay log goes on, and each branch re-sends what the main lost from the changes it keeps ([log] keep_acked). Changes made at the main itself after the backup are lost at the main.",
                Role::Branch => "This branch's database was restored to an earlier state. Re-seed it: stop its daemon and run branchsync join --discard-local here.",
            };
            return Err(EngineError::Diverged {
                message: "database went back in time".into(),
                detail: format!("The local log holds transactions up to LSN {}, but the database's WAL ends at {}.", fmt_lsn(captured), fmt_lsn(wal)),
                hint: hint.into(),
            });
        }
        check_log_identity(&conn.client, &s, &log, &log_dir).await?;
        drop(conn);

        let peers: Vec<String> = match s.role {
            Role::Main => s.admission.borrow().names(),
            Role::Branch => vec!["main".into()],
        };
        let status = Arc::new(NodeStatus::new(&s.node, &s.role.to_string(), &peers));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let (cap_tx, cap_rx) = watch::channel(CaptureStatus::default());
        let cap_progress = cap_rx.clone();

        // Capture: retried on transient errors, fatal on definite ones.
        {
            let cfg = CaptureConfig {
                node: s.node.clone(),
                node_index: s.index,
                role: s.role,
                system_id,
                scope: s.scope.clone(),
                slot: state::SLOT.into(),
                publication: state::PUBLICATION.into(),
                fragment_rows: s.fragment_rows,
                fragment_bytes: s.fragment_bytes,
                max_row_bytes: s.max_row_bytes,
                mark_key: log.mark_key().to_vec(),
                poll_interval: Duration::from_millis(50),
                batch_changes: 20_000,
                ddl_local_only: s.role == Role::Branch && !s.ddl.from_any,
                stream: s.capture_stream,
                tables: s.tables.clone(),
            };
            let (url, log, mut shutdown, status) = (s.db_url.clone(), log.clone(), shutdown_rx.clone(), status.clone());
            tasks.spawn(
                async move {
                    // Capture never stops the node: a transient error is
                    // retried, a full disk pauses it until there is room,
                    // and an error the operator must deal with (a row too
                    // large, a lost slot) stops it, loudly, until the
                    // operator has acted; link and inbound apply go on.
                    let mut backoff = Duration::from_millis(100);
                    let mut last_stop = String::new();
                    let mut paused_wait = Duration::from_secs(1);
                    status.update(|st| st.capture_state = "running".into());
                    loop {
                        let r = capture_on_own_thread(cfg.clone(), s.capture_nice, url.clone(), log.clone(), shutdown.clone(), cap_tx.clone()).await;
                        let (state, wait) = match r {
                            Ok(()) => return ("capture", Ok(())),
                            Err(e) if e.is_disk_full() => {
                                let why = format!("{e}");
                                if last_stop != why {
                                    tracing::warn!(error = %e, "capture paused: no room for the log; it resumes by itself when space returns (link and inbound apply go on)");
                                    last_stop = why.clone();
                                }
                                status.update(|st| {
                                    st.capture_state = "paused".into();
                                    st.capture_reason = Some(why);
                                });
                                // Each retry decodes the transaction again:
                                // back off, but not far.
                                ("paused", paused_wait.min(Duration::from_secs(5)))
                            }
                            Err(e) if e.is_transient() => {
                                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "capture interrupted; retrying");
                                status.update(|st| st.last_error = Some(format!("capture: {e}")));
                                ("retry", backoff)
                            }
                            Err(e) => {
                                let why = format!("{e}");
                                if last_stop != why {
                                    tracing::error!(error = %e, "capture stopped; the link and inbound apply go on. It is retried every 10 s");
                                    last_stop = why.clone();
                                }
                                status.update(|st| {
                                    st.capture_state = "stopped".into();
                                    st.capture_reason = Some(why);
                                });
                                ("stopped", Duration::from_secs(10))
                            }
                        };
                        tokio::select! {
                            _ = shutdown.changed() => return ("capture", Ok(())),
                            _ = tokio::time::sleep(wait) => {}
                        }
                        if state == "retry" {
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        } else {
                            backoff = Duration::from_millis(100);
                        }
                        paused_wait = if state == "paused" { paused_wait * 2 } else { Duration::from_secs(1) };
                    }
                }
                .instrument(tracing::info_span!("capture", node = %s.node)),
            );
        }

        // Link.
        let settings = LinkSettings {
            node: s.node.clone(),
            index: s.index,
            stride: s.stride,
            exclude: s.scope.exclude_globs().to_vec(),
            system_id,
            db_url: s.db_url.clone(),
            apply: ApplyConfig {
                node: s.node.clone(),
                scope: s.scope.clone(),
                group_budget: s.group_budget,
                lock_timeout_ms: 200,
                ddl: s.ddl.clone(),
                tables: s.tables.clone(),
                role: s.role,
                capture_progress: Some(cap_progress.clone()),
                mark_key: log.mark_key().to_vec(),
            },
            heartbeat: s.heartbeat,
            peer_timeout: s.peer_timeout,
            reconnect_max: s.reconnect_max,
            max_frame: s.max_frame,
            window: s.window,
            table_rules: s.preset.iter().map(|v| format!("preset {v}")).chain(s.tables.rules().iter().map(|r| serde_json::to_string(r).unwrap_or_default())).collect(),
            retention: s.retention,
            tls: s.tls.clone(),
            max_stamp_ahead: s.max_stamp_ahead,
        };
        match s.role {
            Role::Branch => {
                let main_addr = s.main_addr.clone().unwrap_or_default();
                let admission = s.admission.clone();
                let (log, status, shutdown) = (log.clone(), status.clone(), shutdown_rx.clone());
                tasks.spawn(async move {
                    link::run_branch(settings, main_addr, admission, log, status, shutdown).await;
                    ("link", Ok(()))
                });
            }
            Role::Main => {
                let addr = s.listen.clone().unwrap_or_default();
                let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| {
                    misconfigured(format!("cannot listen on {addr}"), e.to_string(), "Check sync.listen: the address must be free and local.")
                })?;
                tracing::info!(addr = ?listener.local_addr().ok(), "listening for branches");
                let (log, status, shutdown, admission) = (log.clone(), status.clone(), shutdown_rx.clone(), s.admission.clone());
                tasks.spawn(
                    async move {
                        link::run_main(settings, listener, admission, log, status, shutdown).await;
                        ("link", Ok(()))
                    }
                    .instrument(tracing::info_span!("listener", node = %s.node)),
                );
            }
        }

        // Monitor: relay head (seeding), conflict counts, stripe audit (R18).
        {
            let (s2, log, status, mut shutdown, cap_rx) = (s.clone(), log.clone(), status.clone(), shutdown_rx.clone(), cap_rx);
            let s2_role = s2.role;
            // The peers whose acknowledgements hold the log back (the
            // branches listed now, at the main).
            let admission = s.admission.clone();
            let ack_peers = move || match s2_role {
                Role::Main => admission.borrow().names(),
                Role::Branch => vec!["main".to_string()],
            };
            tasks.spawn(
                async move {
                    let mut conn: Option<pg::PgConn> = None;
                    let mut tick = tokio::time::interval(Duration::from_millis(500));
                    let mut last_head = u64::MAX;
                    let mut last_audit = std::time::Instant::now();
                    let mut last_housekeeping = std::time::Instant::now() - HOUSEKEEPING_PERIOD;
                    let mut log_alarm = false;
                    let mut emit_alarm = false;
                    // The peers' acknowledgements and contact times are
                    // made durable every META_PERIOD and at shutdown: after
                    // a restart, a branch must not look away since the log
                    // was created (it would stop pinning the log, R23).
                    let mut last_meta = std::time::Instant::now();
                    let mut meta_failing = false;
                    let save_meta = |failing: &mut bool| match log.save_meta() {
                        Ok(()) => *failing = false,
                        Err(e) => {
                            if !*failing {
                                tracing::warn!(error = %e, "cannot record the peers' acknowledgements in the log's meta; retried");
                            }
                            *failing = true;
                        }
                    };
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.changed() => {
                                save_meta(&mut meta_failing);
                                return ("monitor", Ok(()));
                            }
                            _ = tick.tick() => {}
                        }
                        if last_meta.elapsed() >= META_PERIOD {
                            last_meta = std::time::Instant::now();
                            save_meta(&mut meta_failing);
                        }
                        // No room for the log: what every peer has
                        // acknowledged goes now, kept entries included,
                        // so that capture can resume (R24).
                        if log.under_pressure() {
                            let retention = (s2.role == Role::Main).then_some(s2.retention);
                            if let Some(floor) = link::reclaim_floor(&log, &ack_peers(), retention) {
                                match log.reclaim_through(floor) {
                                    Ok(n) if n > 0 => tracing::info!(through = floor, entries = n, "no room for the log: acknowledged entries reclaimed early"),
                                    Ok(_) => {}
                                    Err(e) => tracing::warn!(error = %e, "cannot reclaim log space"),
                                }
                            }
                        }
                        let cap = cap_rx.borrow().clone();
                        let (bytes, budget) = (log.size_on_disk(), log.budget());
                        // The log's disk budget: an alarm at 80 % (R24).
                        let squeezed = log.under_pressure();
                        let log_warning = budget.filter(|b| squeezed || bytes.saturating_mul(5) >= b.saturating_mul(4)).map(|b| {
                            format!("the log uses {bytes} of its {b} bytes ([log] max_bytes): capture pauses when it is full; a peer is not taking entries, or the budget is too small")
                        });
                        if log_warning.is_some() != log_alarm {
                            log_alarm = log_warning.is_some();
                            match &log_warning {
                                Some(w) => tracing::warn!(bytes, budget = budget.unwrap_or(0), "{w}"),
                                None => tracing::info!(bytes, "the log is below 80 % of its budget again"),
                            }
                        }
                        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                        status.update(|st| {
                            st.log_newest = log.visible();
                            st.log_floor = log.floor().unwrap_or(0);
                            st.log_bytes = bytes;
                            st.log_budget_bytes = budget;
                            st.log_warning = log_warning;
                            st.captured_lsn = fmt_lsn(cap.captured_lsn);
                            // `cap` was read before `log.visible()` above:
                            // what it caught up with is within log_newest.
                            st.caught_up_lsn = fmt_lsn(cap.caught_up_lsn);
                            st.captured_transactions = cap.transactions;
                            st.captured_rows = cap.rows;
                            st.forged_marks = cap.forged_marks;
                            st.forged_by_prefix = cap.forged_by_prefix.clone();
                            st.rows_skipped = cap.rows_skipped;
                            st.relayed_as_sent = cap.relayed_as_sent;
                            st.captured_pgoutput_bytes = cap.pgoutput_bytes;
                            if cap.running && st.capture_state != "running" {
                                st.capture_state = "running".into();
                                st.capture_reason = None;
                            }
                            if s2.role == Role::Main {
                                // R23/R24: a branch away longer than the
                                // retention no longer holds the log back.
                                for (name, p) in st.peers.iter_mut() {
                                    p.must_reseed = !p.connected && now_s.saturating_sub(log.peer_last_seen(name)) > s2.retention.as_secs();
                                }
                            }
                        });
                        if conn.as_ref().is_none_or(|c| *c.closed.borrow()) {
                            conn = pg::connect(&s2.db_url, "branchsync monitor").await.ok();
                            // The stripe audit's ALTER SEQUENCE is branchsync's
                            // own, node-local DDL: the event triggers skip it.
                            if let Some(c) = conn.as_ref() {
                                if c.client.batch_execute(&format!("SET {} = on", branchsync_engine::ddl::triggers::INTERNAL_GUC)).await.is_err() {
                                    conn = None;
                                }
                            }
                        }
                        let Some(c) = conn.as_ref() else { continue };
                        if s2.role == Role::Main && log.visible() != last_head {
                            let head = log.visible();
                            if branchsync_engine::state::record_relay_head(&c.client, head).await.is_ok() {
                                last_head = head;
                            }
                        }
                        if let Ok(sum) = branchsync_engine::conflict_log::summary(&c.client).await {
                            let drift = (s2.role == Role::Branch && !s2.ddl.from_any && sum.ddl_local > 0).then(|| format!(
                                "{} schema change(s) were made at this branch and stay local ([ddl] from = \"main\"): its schema may differ from the main's. \
                                 Make schema changes at the main, or see branchsync.ddl_log.",
                                sum.ddl_local
                            ));
                            let (total, quarantined, parked) = (sum.total(), sum.of_kind(ConflictKind::Quarantined), sum.parked());
                            let failures = sum
                                .recent_ddl_failures
                                .into_iter()
                                .map(|f| DdlFailure { conflict_id: f.id, author: f.author, statement: f.statement, reason: f.reason })
                                .collect();
                            status.update(|st| {
                                st.conflicts_total = total;
                                st.quarantined_total = quarantined;
                                st.parked_total = parked;
                                st.parked_by_table = sum.parked_by_table.into_iter().collect();
                                st.conflicts_by_kind = sum.by_kind.into_iter().collect();
                                st.ddl.from = if s2.ddl.from_any { "any" } else { "main" }.into();
                                st.ddl.local = sum.ddl_local;
                                st.ddl.replayed = sum.ddl_replayed;
                                st.ddl.failed = sum.ddl_failed;
                                st.ddl.recent_failures = failures;
                                st.ddl.captured = cap.ddl_captured;
                                st.ddl.unreplicable = cap.ddl_unreplicable;
                                st.ddl.drift_warning = drift;
                            });
                        }
                        // Main: connected branches are in contact (R23), and
                        // tombstones and packed insert versions older than
                        // the retention are dropped.
                        if s2.role == Role::Main && last_housekeeping.elapsed() >= HOUSEKEEPING_PERIOD {
                            last_housekeeping = std::time::Instant::now();
                            let connected: Vec<String> = status.snapshot().peers.iter().filter(|(_, p)| p.connected).map(|(n, _)| n.clone()).collect();
                            if let Err(e) = branchsync_engine::state::record_contact(&c.client, &connected).await {
                                tracing::warn!(error = %e, "recording branch contact failed");
                            }
                            let cutoff_us = branchsync_engine::clock::now_us() - i64::try_from(s2.retention.as_micros()).unwrap_or(i64::MAX);
                            match branchsync_engine::state::drop_expired_versions(&c.client, cutoff_us).await {
                                Ok((0, 0)) => {}
                                Ok((tombstones, packed)) => tracing::info!(tombstones, packed, "tombstones and packed insert versions older than the retention dropped"),
                                Err(e) => tracing::warn!(error = %e, "dropping old tombstones failed"),
                            }
                        }
                        if last_audit.elapsed() >= s2.audit_interval {
                            last_audit = std::time::Instant::now();
                            // R25: PUBLIC must not be able to write marks.
                            if let Ok(rows) = c.client.query(branchsync_engine::setup::EMIT_MESSAGE_GRANTS_SQL, &[]).await {
                                let open: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                                let w = (!open.is_empty()).then(|| format!(
                                    "roles other than branchsync's may execute pg_logical_emit_message ({}): they can write messages under branchsync's prefixes (those are ignored, but counted). Run branchsync init to revoke it.",
                                    open.join(", ")
                                ));
                                if w.is_some() != emit_alarm {
                                    emit_alarm = w.is_some();
                                    if let Some(w) = &w {
                                        tracing::warn!("{w}");
                                    }
                                }
                                status.update(|st| st.emit_message_warning = w);
                            }
                            // Cheap audit first; a sequence off its stripe is
                            // re-striped by branchsync's helper (which owns the
                            // right to ALTER it; this role does not).
                            match keys::audit(&c.client, &s2.scope, s2.index, s2.stride).await {
                                Ok(off) => {
                                    for f in off {
                                        let seq = format!("{}.{}", f.schema, f.name);
                                        match c.client.execute(
                                            "SELECT branchsync.stripe_sequence(pg_catalog.format('%I.%I', $1::text, $2::text)::regclass)",
                                            &[&f.schema, &f.name],
                                        ).await {
                                            Ok(_) => tracing::warn!(sequence = %seq, was_next = f.next_value, "sequence was off its stripe (setval or RESTART?); re-striped"),
                                            Err(e) => tracing::warn!(sequence = %seq, error = %branchsync_engine::error::pg_summary(&e), "re-striping a sequence failed"),
                                        }
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "stripe audit failed"),
                            }
                        }
                    }
                }
                .instrument(tracing::info_span!("monitor", node = %s.node)),
            );
        }

        // HTTP status.
        let mut http_addr = None;
        if let Some(addr) = &s.http_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                misconfigured(format!("cannot listen on {addr}"), e.to_string(), "Check http.listen: the address must be free and local.")
            })?;
            http_addr = listener.local_addr().ok();
            let src: Arc<dyn branchsync_server::http::StatusSource> = Arc::new(crate::report::HttpStatus(status.clone()));
            let shutdown = shutdown_rx.clone();
            let access = branchsync_server::http::HttpAccess { token: s.http_token.clone() };
            // The page's database work: its own task and connection.
            let (op_tx, op_rx) = tokio::sync::mpsc::channel(8);
            let (db_url, scope, op_shutdown) = (s.db_url.clone(), s.scope.clone(), shutdown_rx.clone());
            tasks.spawn(async move {
                crate::operator::run(db_url, scope, op_rx, op_shutdown).await;
                ("operator", Ok(()))
            });
            tasks.spawn(async move {
                branchsync_server::http::serve(listener, src, access, Some(op_tx), shutdown).await;
                ("http", Ok(()))
            });
        }
        tracing::info!(node = %s.node, role = %s.role, index = s.index, "node started");
        Ok(Node { shutdown_tx, tasks, http_addr })
    }

    /// A sender that stops the node when `true` is sent (for signal handlers).
    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown_tx.clone()
    }

    /// Waits for every task; the first definite error stops the others and
    /// is returned.
    pub async fn wait(mut self) -> Result<(), EngineError> {
        let mut first_err = None;
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok((name, Err(e))) => {
                    tracing::error!(task = name, error = %e, "task failed; stopping the node");
                    let _ = self.shutdown_tx.send(true);
                    first_err.get_or_insert(e);
                }
                Ok((_, Ok(()))) => {}
                Err(e) => {
                    let _ = self.shutdown_tx.send(true);
                    first_err.get_or_insert(EngineError::Corrupt(format!("a task panicked: {e}")));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Runs one capture session on a thread of its own with a single-threaded
/// runtime at scheduling priority `nice`, and returns how it ended.
///
/// Capture is a tight loop over a stream that always has the next event
/// ready: the replication client's reader task hands each event to it
/// through a channel. On the daemon's multi-threaded runtime the two tasks
/// ran on different workers, and every event cost a wake-up across threads
/// (a futex call each way at thousands of transactions a second, taken from
/// the site's own PostgreSQL on a small machine). On one thread they take
/// turns instead. The session's connections are spawned on this runtime and
/// end with it; the log and the status channels are shared with the rest
/// of the daemon as before.
///
/// The thread runs at a lower priority (`database.capture_nice`, 10 by
/// default): on a shop's PC whose processors are all busy, a cashier's
/// transaction comes before its capture, which catches up as soon as they
/// are not (the slot keeps the WAL meanwhile, and nothing is confirmed
/// before it is in the log). Threads it starts inherit it (the runtime's
/// blocking threads that run the log's `fdatasync`, whose I/O priority the
/// kernel derives from it); apply and the link keep the daemon's.
async fn capture_on_own_thread(
    cfg: CaptureConfig,
    nice: i32,
    url: String,
    log: Arc<ChangeLog>,
    shutdown: watch::Receiver<bool>,
    status: watch::Sender<CaptureStatus>,
) -> Result<(), EngineError> {
    let span = tracing::Span::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new().name("branchsync-capture".into()).spawn(move || {
        if nice != 0 {
            // On Linux a thread id names one thread for setpriority.
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
                tracing::warn!(nice, error = %e, "could not lower capture's scheduling priority; it runs at the daemon's");
            }
        }
        let ended = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(run_capture(cfg, url, log, shutdown, status).instrument(span)),
            Err(e) => Err(EngineError::Stopped {
                message: format!("could not start capture's runtime: {e}"),
                detail: String::new(),
                hint: "The system refused a thread or a timer; check the daemon's limits (ulimit -u, open files).".into(),
            }),
        };
        // The receiver is gone only when the daemon is shutting down.
        let _ = done_tx.send(ended);
    });
    if let Err(e) = started {
        return Err(EngineError::Stopped {
            message: format!("could not start capture's thread: {e}"),
            detail: String::new(),
            hint: "The system refused a thread; check the daemon's limits (ulimit -u).".into(),
        });
    }
    done_rx.await.unwrap_or_else(|_| {
        Err(EngineError::Stopped {
            message: "capture's thread ended without a result".into(),
            detail: "It panicked; the daemon's log holds the panic message.".into(),
            hint: "Report it with the log. Capture is started again in 10 s.".into(),
        })
    })
}
