//! `branchsync verify`: the inspection session at both ends.
//!
//! At the main, [`serve`] answers one branch's questions about the main's
//! copy (bucket summaries, keys of a bucket, its stream positions) after
//! authenticating it as the link does. It owns its own database connection
//! and reads only replicated tables ([`branchsync_engine::verify::TableReader`]
//! checks every name); it never writes and never moves progress.
//!
//! At the branch, [`verify`] runs the engine's comparison with this shop's
//! database on one side and a [`RemoteMain`] on the other. Telling a row in
//! flight from a difference needs both streams to pass the positions of
//! "now" ([`Streams`]): a probe at each database, each capture caught up
//! with it, each side's apply past the other's log at that point. The
//! branch's daemon must be running (its `/status` says how far its capture
//! is); verify says so when it is not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use branchsync_engine::pg::{self, fmt_lsn, parse_lsn};
use branchsync_engine::verify::{self, Settle, Site, TableReader, TableReport, VerifyError};
use branchsync_proto::inspect::{Answer, Ask, BucketSum, Inspect, KeyRows, Scan, Shape, TableName};
use branchsync_proto::{Message, RefusalReason, PROTOCOL_VERSION};
use futures::SinkExt;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::link::{self, Admission, LinkError, LinkSettings, Reader, Writer};
use crate::status::NodeStatus;

/// The publication branchsync keeps the replicated tables in.
const PUBLICATION: &str = "branchsync";
/// A session idle this long is closed by the main.
const IDLE: Duration = Duration::from_secs(600);
/// How long the main waits for its own capture to catch up with a probe.
const PROBE_WAIT: Duration = Duration::from_secs(120);
/// Inspection sessions one branch may hold at once (one `verify` uses
/// two; a run just ended may not have closed its own yet): each holds a
/// connection to the main's database, so a stolen shop credential cannot
/// use up the head office's connections.
const SESSIONS_PER_NODE: usize = 4;

/// Inspection sessions open at the main, per branch.
static OPEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, usize>>> = std::sync::LazyLock::new(Default::default);

/// One of a branch's inspection sessions; gives its slot back on drop.
struct Slot(String);

impl Slot {
    /// A slot for `node`, unless it holds [`SESSIONS_PER_NODE`] already.
    fn take(node: &str) -> Option<Slot> {
        let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.entry(node.to_string()).or_default();
        if *n >= SESSIONS_PER_NODE {
            return None;
        }
        *n += 1;
        Some(Slot(node.to_string()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.0) {
            *n = n.saturating_sub(1);
        }
    }
}

// ------------------------------------------------------------------ main side

/// Serves one inspection session at the main.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    hello: Inspect,
    cert: Option<&rustls::pki_types::CertificateDer<'static>>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut reader: Reader,
    mut writer: Writer,
    settings: &LinkSettings,
    admitted: &Admission,
    log: Arc<branchsync_engine::log::ChangeLog>,
    status: Arc<NodeStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    if hello.protocol_version != PROTOCOL_VERSION {
        let r = link::refusal(
            RefusalReason::VersionMismatch,
            format!("protocol version mismatch: branch \"{}\" speaks {}, main speaks {PROTOCOL_VERSION}", hello.node, hello.protocol_version),
            String::new(),
            "Run the same branchsync version at the main and every branch.",
        );
        return link::refuse(&mut writer, r).await;
    }
    if let Err(why) = link::authenticate(&admitted.peers, &hello.node, &hello.token, settings, cert) {
        tracing::warn!(node = %hello.node, reason = %why, "authentication failed (verify)");
        if admitted.peers.iter().any(|p| p.name == hello.node) {
            status.peer(&hello.node, |p| {
                p.auth_failures += 1;
                p.last_error = Some(format!("authentication failed: {why}"));
            });
        }
        return link::refuse(&mut writer, link::auth_refused(&hello.node)).await;
    }
    let Some(_slot) = Slot::take(&hello.node) else {
        tracing::warn!(peer = %hello.node, limit = SESSIONS_PER_NODE, "too many verify sessions of one branch; refused");
        let r = link::refusal(
            RefusalReason::Other,
            format!("branch \"{}\" has {SESSIONS_PER_NODE} verify sessions open already", hello.node),
            "Each verify session holds a connection to the main's database.".into(),
            "Wait for the running branchsync verify of this shop to end.",
        );
        return link::refuse(&mut writer, r).await;
    };
    drop(permit);
    let node = hello.node;
    link::set_frame_limit(&mut reader, &mut writer, settings.max_frame);
    let conn = pg::connect(&settings.db_url, "branchsync verify (main)").await?;
    tracing::info!(peer = %node, "inspection session opened (verify or join)");
    writer.send(Message::Answer(Answer::Ready { main_node: settings.node.clone() })).await?;
    let mut join = crate::join::JoinSession::default();
    loop {
        let msg = tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            m = tokio::time::timeout(IDLE, futures::StreamExt::next(&mut reader)) => match m {
                Err(_) => return Err(LinkError::Timeout(IDLE)),
                Ok(None) => {
                    tracing::info!(peer = %node, "inspection session closed");
                    return Ok(());
                }
                Ok(Some(m)) => m?,
            },
        };
        let Message::Ask(ask) = msg else { return Err(LinkError::Violation(format!("expected Ask, got {}", msg.kind()))) };
        if matches!(ask, Ask::JoinBegin | Ask::JoinCopy { .. } | Ask::JoinEnd) {
            crate::join::serve_ask(&mut join, ask, &conn, &node, settings, &log, &status, &mut writer).await?;
            continue;
        }
        let answer = match answer(&conn.client, &node, settings, &status, ask).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(peer = %node, error = %e, "a verify question could not be answered");
                failed(&e)
            }
        };
        let answer = if too_large(&answer, settings.max_frame) {
            Answer::Failed {
                message: "the answer does not fit in a frame".into(),
                detail: format!("The keys asked for take more than sync.max_frame_bytes ({} bytes).", settings.max_frame),
                hint: "Raise sync.max_frame_bytes at both ends, or verify fewer tables at once.".into(),
            }
        } else {
            answer
        };
        writer.send(Message::Answer(answer)).await?;
    }
}

/// An answer to one question.
async fn answer(client: &Client, node: &str, settings: &LinkSettings, status: &NodeStatus, ask: Ask) -> Result<Answer, branchsync_engine::EngineError> {
    let reader = TableReader::new(client, PUBLICATION);
    Ok(match ask {
        Ask::Tables => Answer::Tables(reader.tables().await?.into_iter().map(|(t, _)| t).collect()),
        Ask::Shape { table } => Answer::Shape(reader.shape(&table).await?),
        Ask::Buckets { scan } => Answer::Buckets(reader.buckets(&scan).await?),
        Ask::Rows { scan, pick, keys, values } => Answer::Rows(reader.rows(&scan, &pick, keys.as_deref(), values).await?),
        Ask::Probe => {
            let lsn = probe(client).await?;
            let deadline = Instant::now() + PROBE_WAIT;
            loop {
                let s = status.snapshot();
                if parse_lsn(&s.caught_up_lsn).unwrap_or(0) >= lsn {
                    break Answer::Probed { log_newest: s.log_newest };
                }
                if Instant::now() > deadline {
                    break Answer::Failed {
                        message: "the main's capture has not caught up".into(),
                        detail: format!("Capture at the main has not read WAL position {} after {} s.", fmt_lsn(lsn), PROBE_WAIT.as_secs()),
                        hint: "Look at the main's status: capture may be stopped or far behind.".into(),
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ask::JoinBegin | Ask::JoinCopy { .. } | Ask::JoinEnd => Answer::Failed {
            message: "join questions are answered by the join session".into(),
            detail: String::new(),
            hint: String::new(),
        },
        Ask::Repair { table, keys } => {
            let (present, absent) = verify::emit_repairs(client, &settings.apply.mark_key, &settings.node, node, &table, &keys).await?;
            Answer::Repaired { present, absent }
        }
        Ask::Applied { pos, wait_ms } => {
            let deadline = Instant::now() + Duration::from_millis(wait_ms.min(IDLE.as_millis() as u64));
            loop {
                let applied = branchsync_engine::state::read_progress(client, node).await?;
                if applied >= pos || Instant::now() >= deadline {
                    break Answer::Applied { pos: applied };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    })
}

pub(crate) fn failed(e: &branchsync_engine::EngineError) -> Answer {
    let text = e.to_string();
    let mut lines = text.lines();
    let message = lines.next().unwrap_or_default().to_string();
    let (mut detail, mut hint) = (String::new(), String::new());
    for l in lines {
        if let Some(d) = l.strip_prefix("DETAIL: ") {
            detail = d.to_string();
        } else if let Some(h) = l.strip_prefix("HINT: ") {
            hint = h.to_string();
        }
    }
    Answer::Failed { message, detail, hint }
}

/// Whether an answer could exceed the frame limit (keys and rows dominate).
fn too_large(a: &Answer, max_frame: usize) -> bool {
    let bytes: usize = match a {
        Answer::Rows(rows) => rows.iter().map(|r| r.key.len() + r.row.as_ref().map_or(0, String::len) + 32).sum(),
        Answer::Buckets(b) => b.len() * 48,
        _ => 0,
    };
    bytes + 1024 > max_frame
}

/// A probe: everything committed here before it is logged once capture
/// has read it; its LSN.
pub(crate) async fn probe(client: &Client) -> Result<u64, branchsync_engine::EngineError> {
    let lsn: String = client
        .query_one("SELECT pg_logical_emit_message(false, $1, ''::bytea)::text", &[&branchsync_engine::state::PROBE_PREFIX])
        .await
        .map_err(branchsync_engine::EngineError::pg("writing a capture probe"))?
        .get(0);
    Ok(parse_lsn(&lsn).unwrap_or(0))
}

// ---------------------------------------------------------------- branch side

/// How this shop reaches the main.
pub struct Dial {
    /// This shop's node name and token.
    pub node: String,
    pub token: String,
    /// The main's link address and the link's TLS.
    pub main_addr: String,
    pub tls: crate::link::LinkTls,
    /// Largest frame (`sync.max_frame_bytes`).
    pub max_frame: usize,
}

/// The main's copy, asked over an inspection session.
pub struct RemoteMain {
    reader: Reader,
    pub(crate) writer: Writer,
    /// The main's node name.
    pub main_node: String,
}

impl RemoteMain {
    /// Opens an inspection session to the main at `main_addr`.
    pub(crate) async fn connect(dial: &Dial) -> Result<RemoteMain, VerifyError> {
        let link_err = |e: LinkError| VerifyError::Link(link::tls_aware(e, false).to_string());
        let (io, _) = link::dial_main(&dial.node, &dial.tls, &dial.main_addr).await.map_err(link_err)?;
        let (mut reader, mut writer) = link::split(io);
        writer.send(Message::Inspect(Inspect { protocol_version: PROTOCOL_VERSION, node: dial.node.clone(), token: dial.token.clone() })).await.map_err(|e| link_err(e.into()))?;
        let main_node = match link::next_message(&mut reader).await.map_err(link_err)? {
            Message::Answer(Answer::Ready { main_node }) => main_node,
            Message::Refuse(r) => return Err(VerifyError::Remote { message: r.message, detail: r.detail, hint: r.hint }),
            other => return Err(VerifyError::Link(format!("expected Ready, got {}", other.kind()))),
        };
        link::set_frame_limit(&mut reader, &mut writer, dial.max_frame);
        Ok(RemoteMain { reader, writer, main_node })
    }

    pub(crate) async fn ask(&mut self, a: Ask) -> Result<Answer, VerifyError> {
        self.writer.send(Message::Ask(a)).await.map_err(|e| VerifyError::Link(e.to_string()))?;
        self.next_answer().await
    }

    /// The main's next answer.
    pub(crate) async fn next_answer(&mut self) -> Result<Answer, VerifyError> {
        // Scans of large tables take a while: no handshake timeout here.
        let m = tokio::time::timeout(IDLE, futures::StreamExt::next(&mut self.reader))
            .await
            .map_err(|_| VerifyError::Link(format!("the main did not answer in {} s", IDLE.as_secs())))?
            .ok_or_else(|| VerifyError::Link("the main closed the session".into()))?
            .map_err(|e| VerifyError::Link(e.to_string()))?;
        match m {
            Message::Answer(Answer::Failed { message, detail, hint }) => Err(VerifyError::Remote { message, detail, hint }),
            Message::Answer(a) => Ok(a),
            other => Err(VerifyError::Link(format!("expected Answer, got {}", other.kind()))),
        }
    }

    /// Asks the main to send its rows of `table` with `keys` to this branch.
    pub async fn repair(&mut self, table: &TableName, keys: Vec<String>) -> Result<(u64, u64), VerifyError> {
        match self.ask(Ask::Repair { table: table.clone(), keys }).await? {
            Answer::Repaired { present, absent } => Ok((present, absent)),
            other => Err(unexpected(&other)),
        }
    }

    /// The tables the main replicates.
    pub async fn tables(&mut self) -> Result<Vec<TableName>, VerifyError> {
        match self.ask(Ask::Tables).await? {
            Answer::Tables(t) => Ok(t),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(a: &Answer) -> VerifyError {
    VerifyError::Link(format!("the main answered out of turn: {:?}", std::mem::discriminant(a)))
}

impl Site for RemoteMain {
    async fn shape(&mut self, table: &TableName) -> Result<Option<Shape>, VerifyError> {
        match self.ask(Ask::Shape { table: table.clone() }).await? {
            Answer::Shape(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }
    async fn buckets(&mut self, scan: &Scan) -> Result<Vec<BucketSum>, VerifyError> {
        match self.ask(Ask::Buckets { scan: scan.clone() }).await? {
            Answer::Buckets(b) => Ok(b),
            other => Err(unexpected(&other)),
        }
    }
    async fn rows(&mut self, scan: &Scan, pick: &[u32], keys: Option<&[String]>, values: bool) -> Result<Vec<KeyRows>, VerifyError> {
        match self.ask(Ask::Rows { scan: scan.clone(), pick: pick.to_vec(), keys: keys.map(<[String]>::to_vec), values }).await? {
            Answer::Rows(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }
}

/// Both streams of this branch: settled when each side has applied what
/// the other had logged at the moment of the probe.
pub struct Streams<'a> {
    /// This shop's database.
    pub branch_db: &'a Client,
    /// A session to the main of its own (the comparison holds the other).
    pub main: RemoteMain,
    /// This shop's daemon's HTTP address and token (`[http]`).
    pub http: String,
    pub http_token: Option<String>,
    /// Longest wait of one settling.
    pub timeout: Duration,
    /// Settlings done (for the report).
    pub rounds: u64,
}

impl Settle for Streams<'_> {
    async fn settle(&mut self) -> Result<(), VerifyError> {
        let deadline = Instant::now() + self.timeout;
        let left = |what: &str| -> Result<Duration, VerifyError> {
            let d = deadline.saturating_duration_since(Instant::now());
            if d.is_zero() {
                Err(VerifyError::Unsettled(format!("{what} within {} s (verify --settle-timeout)", self.timeout.as_secs())))
            } else {
                Ok(d)
            }
        };
        self.rounds += 1;
        // "Now" at both databases.
        let branch_probe = probe(self.branch_db).await?;
        let main_newest = match self.main.ask(Ask::Probe).await? {
            Answer::Probed { log_newest } => log_newest,
            other => return Err(unexpected(&other)),
        };
        // This shop's capture has logged everything before its probe.
        let branch_newest = loop {
            left("this shop's capture did not catch up")?;
            let body = branchsync_server::http::get_with_token(&self.http, "/status", self.http_token.as_deref()).await.map_err(|e| VerifyError::Unsettled(format!(
                "this shop's daemon does not answer on {} ({e}); verify needs it running to tell changes in flight from differences",
                self.http
            )))?;
            let s: crate::status::StatusSnapshot = serde_json::from_str(&body).map_err(|e| VerifyError::Unsettled(format!("this shop's daemon answered /status with unexpected JSON: {e}")))?;
            if parse_lsn(&s.caught_up_lsn).unwrap_or(0) >= branch_probe {
                break s.log_newest;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The main has applied it.
        loop {
            let wait = left("the main did not apply this shop's changes")?;
            match self.main.ask(Ask::Applied { pos: branch_newest, wait_ms: wait.as_millis().min(5_000) as u64 }).await? {
                Answer::Applied { pos } if pos >= branch_newest => break,
                Answer::Applied { .. } => {}
                other => return Err(unexpected(&other)),
            }
        }
        // This shop has applied the main's log up to its probe.
        loop {
            left("this shop did not apply the main's changes")?;
            if branchsync_engine::state::read_progress(self.branch_db, branchsync_engine::state::RELAY_STREAM).await? >= main_newest {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What `verify` found, for the operator and for JSON.
#[derive(Debug, serde::Serialize)]
pub struct VerifyReport {
    pub node: String,
    pub main: String,
    pub tables: Vec<TableReport>,
    /// Rows read at both sites (the larger count of each table).
    pub rows_compared: i64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Times both streams were waited for.
    pub settlings: u64,
    /// Rows that differ, over all tables.
    pub differences: usize,
    /// Tables that do not agree.
    pub tables_differing: usize,
    /// `--repair`: what the main sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairReport>,
}

/// What `--repair` did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    /// Rows the main sent as it holds them.
    pub rows_sent: u64,
    /// Rows the main does not have: deleted here.
    pub rows_deleted: u64,
    /// Differences left alone: keyless tables, rows still changing,
    /// tables not compared.
    pub left_alone: usize,
}

/// Compares `only` (all replicated tables when empty) between this shop
/// and the main.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn verify(
    dial: &Dial,
    branch_db: &Client,
    http: (String, Option<String>),
    only: &[String],
    settle_timeout: Duration,
    repair: bool,
    rules: &branchsync_engine::conflict::TableRules,
    progress: &dyn branchsync_engine::progress::Progress,
) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let mut main = RemoteMain::connect(dial).await?;
    let settle_session = RemoteMain::connect(dial).await?;
    let main_node = main.main_node.clone();
    let mut branch = TableReader::new(branch_db, PUBLICATION);
    let mut tables = branch.tables().await?;
    // A table only the main replicates is compared too (and reported).
    for t in main.tables().await? {
        if !tables.iter().any(|(x, _)| *x == t) {
            tables.push((t, 0));
        }
    }
    if !only.is_empty() {
        let wanted = |t: &TableName| only.iter().any(|o| *o == t.to_string() || *o == t.name);
        let unknown: Vec<&String> = only.iter().filter(|o| !tables.iter().any(|(t, _)| *o == &t.to_string() || *o == &t.name)).collect();
        if !unknown.is_empty() {
            return Err(VerifyError::Remote {
                message: format!("no replicated table named {}", unknown.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", ")),
                detail: "Neither this shop nor the main replicates a table by that name.".into(),
                hint: "Name tables as schema.table or table, as branchsync status lists them.".into(),
            });
        }
        tables.retain(|(t, _)| wanted(t));
    }
    tables.sort();
    let mut streams = Streams { branch_db, main: settle_session, http: http.0, http_token: http.1, timeout: settle_timeout, rounds: 0 };
    let local = |t: &TableName| rules.for_table(&t.schema, &t.name).local.clone();
    let reports = verify::compare_tables(&mut branch, &mut main, &mut streams, &tables, &local, progress).await?;
    let repair = if repair { Some(send_repairs(&mut main, &reports).await?) } else { None };
    let rows_compared: i64 = reports.iter().map(|r| r.rows_branch.max(r.rows_main)).sum();
    let seconds = started.elapsed().as_secs_f64();
    Ok(VerifyReport {
        node: dial.node.clone(),
        main: main_node,
        rows_compared,
        seconds,
        rows_per_second: rows_compared as f64 / seconds.max(0.001),
        settlings: streams.rounds,
        differences: reports.iter().map(|r| r.differences.len()).sum(),
        tables_differing: reports.iter().filter(|r| !r.agrees()).count(),
        tables: reports,
        repair,
    })
}

/// Keys the main sends per repair (one transaction each).
const REPAIR_BATCH: usize = 500;

/// Asks the main to send its version of every row that differs (keyed
/// tables; rows that kept changing are left alone).
async fn send_repairs(main: &mut RemoteMain, reports: &[TableReport]) -> Result<RepairReport, VerifyError> {
    let mut out = RepairReport::default();
    for t in reports {
        let mut keys = Vec::new();
        for d in &t.differences {
            match d.difference {
                verify::Difference::Missing | verify::Difference::Extra | verify::Difference::Different { .. } => keys.push(d.key.clone()),
                verify::Difference::Count { .. } | verify::Difference::StillChanging => out.left_alone += 1,
            }
        }
        if keys.is_empty() {
            continue;
        }
        let Some((schema, name)) = t.table.split_once('.') else { continue };
        let table = TableName { schema: schema.to_string(), name: name.to_string() };
        for part in keys.chunks(REPAIR_BATCH) {
            let (sent, deleted) = main.repair(&table, part.to_vec()).await?;
            out.rows_sent += sent;
            out.rows_deleted += deleted;
        }
    }
    Ok(out)
}

/// The report as text: one line per table that differs, its rows (at most
/// `limit` per table), and a summary with the throughput.
pub fn render(r: &VerifyReport, limit: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for t in &r.tables {
        if t.agrees() {
            continue;
        }
        let _ = writeln!(out, "{}: {} rows here, {} at {}", t.table, t.rows_branch, t.rows_main, r.main);
        if let Some(s) = &t.schema_difference {
            let _ = writeln!(out, "  not compared: {s}");
        }
        if !t.columns_only_branch.is_empty() {
            let _ = writeln!(out, "  columns only here (not compared): {}", t.columns_only_branch.join(", "));
        }
        if !t.columns_only_main.is_empty() {
            let _ = writeln!(out, "  columns only at {} (not compared): {}", r.main, t.columns_only_main.join(", "));
        }
        for d in t.differences.iter().take(limit) {
            let what = match &d.difference {
                verify::Difference::Missing => format!("missing here (at {} only)", r.main),
                verify::Difference::Extra => format!("extra here (not at {})", r.main),
                verify::Difference::Different { columns } => format!("differs in {}", columns.join(", ")),
                verify::Difference::Count { branch, main } => format!("{branch} copies here, {main} at {}", r.main),
                verify::Difference::StillChanging => "changed at every reading: not judged".into(),
            };
            let _ = writeln!(out, "  {} {what}", d.key);
        }
        if t.differences.len() > limit {
            let _ = writeln!(out, "  ... and {} more (--json lists them all)", t.differences.len() - limit);
        }
    }
    if let Some(rep) = &r.repair {
        let _ = writeln!(
            out,
            "repair: {} asked to send {} rows as it holds them and {} deletions of rows it does not have; they arrive with its stream (run verify again to see them settled){}",
            r.main,
            rep.rows_sent,
            rep.rows_deleted,
            if rep.left_alone > 0 { format!("; {} differences left alone (tables without a key, rows still changing)", rep.left_alone) } else { String::new() }
        );
    }
    let _ = writeln!(
        out,
        "verify: {} tables, {} rows compared with {} in {:.1} s ({:.0} rows/s): {}",
        r.tables.len(),
        r.rows_compared,
        r.main,
        r.seconds,
        r.rows_per_second,
        if r.tables_differing == 0 { "every table agrees".to_string() } else { format!("{} rows differ in {} tables", r.differences, r.tables_differing) }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_branch_holds_a_bounded_number_of_verify_sessions_and_gets_them_back() {
        let a = Slot::take("slots-test-1").expect("first");
        let b: Vec<Slot> = (1..SESSIONS_PER_NODE).map(|_| Slot::take("slots-test-1").expect("within the limit")).collect();
        assert!(Slot::take("slots-test-1").is_none(), "one more session of the same branch is refused");
        let other = Slot::take("slots-test-2");
        assert!(other.is_some(), "another branch has its own");
        drop(a);
        let c = Slot::take("slots-test-1");
        assert!(c.is_some(), "a session that ended gives its slot back");
        drop((b, c, other));
    }
}
