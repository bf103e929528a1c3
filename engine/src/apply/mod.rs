//! Apply: writes incoming ChangeSets to the local database.
//!
//! ```text
//!  link --mpsc<Vec<LogEntry>>--> [apply task: owns one connection]
//!      BEGIN
//!        per group of ChangeSets: pg_logical_emit_message('branchsync.apply',
//!                       their headers and rows per table)                   (R3)
//!                       batched INSERT/UPDATE/DELETE … FROM unnest(text[]…)
//!                       row versions into branchsync.row_version              (R13)
//!        branchsync.progress(stream) = last complete ChangeSet's position     (R4)
//!        pg_replication_origin_xact_setup(author lsn, author commit time)
//!      COMMIT  --> progress watch --> link sends Ack
//! ```
//!
//! # Exactly once
//!
//! The stream position of the last applied ChangeSet is written in the same
//! transaction as its rows, so after a crash at any instant the database
//! says exactly what was applied; the link resumes the stream from there
//! (R4). The session runs under the author's replication origin with
//! `session_replication_role = replica`, so applied rows remember their
//! author and time, and capture at a branch never logs them again.
//! `synchronous_commit` is on for this session, so a commit that returned is
//! flushed before it is acknowledged (R5).
//!
//! # Grouping and batching
//!
//! Consecutive ChangeSets of one author share a local transaction while the
//! transaction is younger than the group budget (default 50 ms), so the
//! ERP's cashiers never wait long behind an apply lock (R6). Inside a
//! transaction, the inserts of a ChangeSet are bucketed per table (in order
//! of first appearance) and sent as one `INSERT … SELECT FROM unnest` per
//! table; these statements are pipelined without waiting for each answer.
//! Insert-only ChangeSets (the bulk of a sales backlog) are not even sent
//! one by one: [`pipeline`] queues their rows across ChangeSets and sends
//! one statement per table for all of them, behind one apply message that
//! says which rows are whose, with one row-version upsert and one parent
//! check (R9, see [`park`]) per table and batch.
//! Updates and deletes are decided at the main ([`decide`]: a batched
//! compare-and-set when the row is still as its author saw it, otherwise a
//! column-level merge under the row's lock, R7) and applied as the main sent
//! them at a branch ([`obey`], which also takes the main's results for its
//! own changes). One ChangeSet spanning many fragments is one long local
//! transaction: that is unavoidable, and documented.
//!
//! # Roles
//!
//! The session is the same at every node; what the main and a branch do
//! differently is their [`role::Wing`], chosen once when the session opens:
//! the main's `Decider` (checks what a branch sends, decides, tells the
//! chain) or a branch's `Obeyer` (takes the relay as the main wrote it).
//! Role-specific state lives there, not in the session.
//!
//! # Error handling
//!
//! Any error ends the apply session and rolls back the open transaction;
//! nothing is half-applied and progress did not move. Transient errors (lock
//! timeout, deadlock, lost connection) are retried by the link from the
//! durable progress (R8). A data error (SQLSTATE classes 22, 23, 42, or any
//! other error the server raised for a statement that a retry cannot fix) also
//! marks the failed range as *careful*: it is replayed one ChangeSet per
//! transaction and one change per savepoint, inserts resolve key conflicts
//! by the rule, and a change that still fails is quarantined in
//! `branchsync.conflicts` with its error, while the rest flows on.

mod column;
mod decide;
mod obey;
mod park;
mod pipeline;
mod role;
mod sql;
mod table;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use branchsync_proto::{ChangeSetHeader, DdlChange, LogEntry, OldRow, RowChange, TableDesc, Value, WireEntry};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use crate::conflict;
use crate::conflict_log::ConflictKind;
use crate::ddl::{self, parse, DdlMessage, DdlPolicy};
use crate::error::{pg_error_is_data_error, pg_error_is_transient};
use crate::pg::{fmt_lsn, SharedConn};
use crate::scope::Scope;
use crate::{failpoints, EngineError};
pub use table::Mapping;
use crate::catalog::{change_json, LocalTable};
use role::Wing;
use table::CachedMapping;

/// Default time budget of one grouped apply transaction.
pub const DEFAULT_GROUP_BUDGET: Duration = Duration::from_millis(50);
/// After a group that ran its whole budget while holding locks on rows
/// that existed before it, apply pauses for budget / this (R7/R8: local
/// transactions, NOWAIT pollers included, get the rows in between).
const YIELD_DIVISOR: u32 = 4;
/// Wire bytes of received entries decoded and applied at a time.
const DECODE_SLICE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest number of rows per batched statement.
const MAX_BATCH_ROWS: usize = 5_000;
/// Lock timeouts and deadlocks retried in place before the session gives up
/// (and the link retries it from durable progress).
const LOCK_RETRIES: u32 = 30;
/// Transactions of more rows than this are not kept for an in-place retry.
const RETRY_BUFFER_ROWS: usize = 50_000;
/// ... nor of more bytes than this.
const RETRY_BUFFER_BYTES: usize = 64 * 1024 * 1024;
/// Statements of batched rows hold at most this many bytes of values; a row
/// larger than that is a statement of its own (R24).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

fn is_lock_contention(e: &EngineError) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(e.sqlstate(), Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// How an apply session behaves.
#[derive(Debug, Clone)]
pub struct ApplyConfig {
    /// This node's name (the author of local versions).
    pub node: String,
    /// What is replicated here.
    pub scope: Scope,
    /// Time budget of a grouped transaction.
    pub group_budget: Duration,
    /// `lock_timeout` of the apply session in milliseconds (R8).
    pub lock_timeout_ms: u64,
    /// Whose DDL is replayed, and as which role (R22).
    pub ddl: DdlPolicy,
    /// Per-table rules (`[[tables]]`).
    pub tables: conflict::TableRules,
    /// Main: decides every incoming change ([`decide`]); branch: applies the
    /// main's decisions as they come ([`obey`]).
    pub role: crate::Role,
    /// Capture's progress (WAL position logged and written back), for the
    /// few decisions that need this node's own newest changes.
    pub capture_progress: Option<watch::Receiver<crate::capture::CaptureStatus>>,
    /// The daemon's key for the marks apply writes (R25; the log's).
    pub mark_key: Vec<u8>,
}

/// State of one incoming stream that outlives apply sessions.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Positions up to this one are replayed carefully (after a data error).
    careful_until: AtomicU64,
    /// Entries whose careful replay failed, by position: how often, and the
    /// last error. After [`MAX_CAREFUL_FAILURES`] the entry is quarantined
    /// whole instead of being tried again (R24: nothing wedges a stream).
    failures: std::sync::Mutex<HashMap<u64, (u32, String)>>,
}

/// Careful replays of one entry that may fail before it is quarantined.
pub const MAX_CAREFUL_FAILURES: u32 = 3;

/// Counters for status and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyStats {
    /// Durable progress of the stream.
    pub committed_pos: u64,
    /// ChangeSets applied.
    pub changesets: u64,
    /// Row changes applied.
    pub rows: u64,
    /// Conflicts recorded.
    pub conflicts: u64,
    /// Changes quarantined.
    pub quarantined: u64,
    /// Rows of this stream parked in `branchsync.parked` (R9, R6).
    pub parked: u64,
    /// Local transactions committed.
    pub transactions: u64,
    /// DDL statements replayed.
    pub ddl_applied: u64,
    /// DDL statements that failed or were refused (recorded in `branchsync.conflicts`).
    pub ddl_failed: u64,
    /// Verdicts sent (main) or taken (branch).
    pub verdicts: u64,
    /// Branch: echoes the main wrote exactly as this node sent them
    /// ([`LogEntry::echo_as_sent`]), taken without reading their rows.
    pub echoes_as_sent: u64,
    /// Queues sent ahead, executed while the next rows were queued
    /// ([`pipeline`]).
    pub sent_ahead: u64,
    /// Parent checks sent for queued rows (one per foreign key and send;
    /// none where every value points at a row queued in the same send).
    pub parent_checks: u64,
}

struct OpenTxn {
    started: Instant,
    author: String,
    /// A ChangeSet has started and its last fragment has not arrived.
    mid_changeset: bool,
    /// Last complete ChangeSet of this transaction.
    last: Option<(u64, ChangeSetHeader)>,
    careful: bool,
    /// It updated or deleted rows that were there before it (and holds
    /// their locks until it commits).
    touched_existing: bool,
}

/// Entries larger than this make apply open its connection anew after
/// their transaction: the client's buffers grew to their size and would
/// keep the memory.
const REOPEN_AFTER_BYTES: usize = 64 * 1024 * 1024;

/// Applies one incoming stream; owns its connection.
pub struct Applier {
    conn: SharedConn,
    /// Where `conn` connects (for [`Applier::reopen`]).
    url: String,
    /// Open the connection anew after the next commit.
    reopen: bool,
    cfg: ApplyConfig,
    stream: String,
    state: Arc<StreamState>,
    tables: HashMap<(String, String), Option<Arc<LocalTable>>>,
    /// The mapping of each incoming table (schema, then name) for the
    /// column list it came with, or `None` out of scope or missing here:
    /// built once, not per ChangeSet (cleared with `tables`).
    mappings: HashMap<String, HashMap<String, CachedMapping>>,
    stmts: HashMap<String, Statement>,
    session_origin: Option<String>,
    txn: Option<OpenTxn>,
    /// Keys whose later changes queue in `branchsync.parked`.
    held: park::Held,
    /// (table, columns) whose skipped values were recorded this session.
    noted_skips: HashSet<(String, String)>,
    /// `branchsync.schema_version` when `tables` was last valid.
    schema_version: Option<i64>,
    /// When this node was initialised (µs): local rows committed before are
    /// the baseline every peer has seen.
    init_ts_us: i64,
    /// The main's decider or a branch's obeyer, chosen once ([`role`]).
    wing: Wing,
    /// Statements of insert-only ChangeSets not sent yet.
    queue: pipeline::Queue,
    /// Statements sent ahead whose answers are still awaited
    /// ([`pipeline::InFlight`]).
    in_flight: Option<pipeline::InFlight>,
    /// Entries applied since the last commit (while they are few), for a
    /// retry after lock contention.
    uncommitted: Vec<Arc<LogEntry>>,
    /// Rows and bytes of the entries applied since the last commit.
    uncommitted_rows: usize,
    uncommitted_bytes: usize,
    /// The newest position applied without a copy in `uncommitted` (the
    /// buffer was full then): until a commit covers it, the buffer does
    /// not hold every uncommitted entry, even after it emptied.
    unbuffered: u64,
    /// Last position received from the link (positions must follow each
    /// other without a gap, R26).
    received: u64,
    /// Header of the last ChangeSet received (a fragment that does not
    /// decode is accounted to it).
    last_header: Option<ChangeSetHeader>,
    /// Entries (by position) whose body did not decode or check: the raw
    /// bytes and why, recorded as quarantined when their position applies.
    undecodable: HashMap<u64, (Vec<u8>, String)>,
    /// Changes removed from entries because they do not fit their table:
    /// recorded as quarantined when their position applies.
    invalid: HashMap<u64, Vec<(RowChange, String)>>,
    committed: u64,
    seen: u64,
    /// Position of the entry being applied (its error may surface before
    /// `seen` moves to it).
    attempting: u64,
    /// Transaction id of the open transaction (marks are bound to it, R25).
    xid: u32,
    stats: ApplyStats,
    /// `stats` as of the last commit.
    committed_stats: ApplyStats,
    progress_tx: watch::Sender<ApplyStats>,
}

impl Applier {
    /// Opens the apply connection for `stream` and reads its durable progress.
    pub async fn connect(url: &str, cfg: ApplyConfig, stream: &str, state: Arc<StreamState>) -> Result<(Applier, watch::Receiver<ApplyStats>), EngineError> {
        let conn = Self::open_session(url, &cfg, stream).await?;
        let committed = crate::state::read_progress(&conn.client, stream).await?;
        let stats = ApplyStats { committed_pos: committed, ..Default::default() };
        let (progress_tx, progress_rx) = watch::channel(stats.clone());
        let wing = Wing::new(cfg.role, &cfg.mark_key);
        let mut applier = Applier {
                conn,
                url: url.to_string(),
                reopen: false,
                cfg,
                stream: stream.to_string(),
                state,
                tables: HashMap::new(),
                mappings: HashMap::new(),
                stmts: HashMap::new(),
                session_origin: None,
                txn: None,
                held: park::Held::new(),
                noted_skips: HashSet::new(),
                schema_version: None,
                init_ts_us: 0,
                wing,
                queue: pipeline::Queue::default(),
                in_flight: None,
                uncommitted: Vec::new(),
                uncommitted_rows: 0,
                uncommitted_bytes: 0,
                unbuffered: 0,
                received: committed,
                last_header: None,
                undecodable: HashMap::new(),
                invalid: HashMap::new(),
                committed,
                seen: committed,
                attempting: committed,
                xid: 0,
                committed_stats: stats.clone(),
                stats,
                progress_tx,
        };
        applier.load_held().await?;
        let row = applier
            .conn
            .client
            .query_one(
                "SELECT coalesce((SELECT (extract(epoch from initialized_at) * 1000000)::int8 FROM branchsync.node), 0), \
                        ARRAY(SELECT DISTINCT tbl FROM branchsync.key_merges), \
                        coalesce((SELECT has_table_privilege(r, 'SELECT') AND has_table_privilege(r, 'INSERT') AND has_table_privilege(r, 'UPDATE') \
                                  FROM to_regclass('branchsync.echo_settled') r), false), \
                        coalesce((SELECT has_table_privilege(r, 'SELECT') AND has_table_privilege(r, 'INSERT') AND has_table_privilege(r, 'DELETE') \
                                  FROM to_regclass('branchsync.insert_versions') r), false)",
                &[],
            )
            .await
            .map_err(EngineError::pg("reading the node"))?;
        applier.init_ts_us = row.get(0);
        applier.wing.loaded(row.get::<_, Vec<String>>(1).into_iter().collect(), row.get(2), row.get(3));
        applier.progress_tx.send_replace(applier.stats.clone());
        Ok((applier, progress_rx))
    }

    /// Opens the apply connection with its session settings.
    ///
    /// Generic plans: apply's statements take their rows as arrays
    /// (`unnest($1::text[])`), and a custom plan for an array of one row
    /// looks cheaper than the generic one, so PostgreSQL went on planning
    /// executions anew (a fifth to a third of the apply backends' CPU when
    /// each ChangeSet updates a few rows: the hot-row backlog). The generic
    /// plan reads the target rows by key for any array length; the
    /// insert-only backlogs ran as fast with it.
    async fn open_session(url: &str, cfg: &ApplyConfig, stream: &str) -> Result<SharedConn, EngineError> {
        let conn = SharedConn::from(crate::pg::connect(url, &format!("branchsync apply {stream}")).await?);
        conn.client
            .batch_execute(&format!(
                "SET session_replication_role = replica; SET lock_timeout = {}; SET synchronous_commit = on; SET statement_timeout = 0; \
                 SET plan_cache_mode = force_generic_plan; SET {} = on",
                cfg.lock_timeout_ms,
                ddl::REPLAYING_GUC
            ))
            .await
            .map_err(EngineError::pg("configuring the apply session"))?;
        Ok(conn)
    }

    /// Replaces the connection by a new one (between transactions): after a
    /// very large row the client's buffers would otherwise keep its size.
    async fn reopen_connection(&mut self) -> Result<(), EngineError> {
        self.conn = Self::open_session(&self.url, &self.cfg, &self.stream).await?;
        self.session_origin = None;
        self.stmts.clear();
        self.reopen = false;
        tracing::debug!(stream = %self.stream, "apply connection opened anew after a very large row");
        Ok(())
    }

    /// Durable progress of the stream: the position of the last ChangeSet
    /// committed locally.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Runs until `rx` closes or `shutdown` fires. An open transaction that
    /// sits at a ChangeSet boundary is committed before returning (drain);
    /// a half-received ChangeSet is rolled back and resent later.
    ///
    /// `consumed` counts the bytes of entries taken off `rx` (the link turns
    /// it into flow-control credit for the sender): the channel is unbounded
    /// because the sender never has more than its window in flight.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Vec<WireEntry>>, mut shutdown: watch::Receiver<bool>, consumed: watch::Sender<u64>) -> Result<ApplyStats, EngineError> {
        let mut retry = tokio::time::interval(park::RETRY_PERIOD);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The connection may have been opened anew since the last turn.
            let mut closed = self.conn.closed.clone();
            if *closed.borrow() {
                return Err(EngineError::ConnectionLost { context: format!("applying stream {}", self.stream) });
            }
            let at_boundary = self.txn.as_ref().is_some_and(|t| !t.mid_changeset);
            tokio::select! {
                biased;
                // 1. Shutdown: finish what is whole, drop the rest.
                _ = shutdown.changed() => {
                    if at_boundary {
                        self.commit().await?;
                    }
                    return Ok(self.stats);
                }
                // 2. The connection died: the open transaction is gone.
                _ = closed.changed() => {
                    return Err(EngineError::ConnectionLost { context: format!("applying stream {}", self.stream) });
                }
                // 3. Parked rows, between transactions (R9).
                _ = retry.tick(), if self.stats.parked > 0 && self.txn.is_none() => {
                    self.retry_parked().await?;
                }
                // 4. New entries from the link.
                msg = rx.recv() => match msg {
                    Some(wire) => {
                        // Taken and decoded a slice at a time: a message
                        // may hold the whole flow-control window, and its
                        // decoded rows take several times their wire size.
                        let mut slices = slices(wire, DECODE_SLICE_BYTES).into_iter().peekable();
                        while let Some(slice) = slices.next() {
                            let bytes: u64 = slice.iter().map(|w| w.body.len() as u64).sum();
                            consumed.send_modify(|c| *c += bytes);
                            tracing::trace!(stream = %self.stream, first = slice.first().map(|w| w.pos), last = slice.last().map(|w| w.pos), bytes, consumed = *consumed.borrow(), "entries taken");
                            let more = slices.peek().is_some();
                            self.take(slice, || more || !rx.is_empty()).await?;
                        }
                    }
                    None => {
                        if at_boundary {
                            self.commit().await?;
                        }
                        return Ok(self.stats);
                    }
                },
            }
        }
    }

    /// Applies one slice of received entries, retrying in place after lock
    /// contention or a data error when every entry since the last commit is
    /// at hand; commits at a ChangeSet boundary when `more_waiting` says
    /// nothing else is ready to join the transaction.
    async fn take(&mut self, wire: Vec<WireEntry>, more_waiting: impl Fn() -> bool) -> Result<(), EngineError> {
        // Shared with the retry buffer, not copied into it.
        let mut entries: Vec<Arc<LogEntry>> = self.receive(wire).await?.into_iter().map(Arc::new).collect();
        let mut again: Vec<Arc<LogEntry>> = Vec::new();
        let mut tries = 0u32;
        let mut careful_retry = false;
        loop {
            let mut r = self.apply_shared(&again).await;
            if r.is_ok() {
                r = self.apply_shared(&entries).await;
            }
            if r.is_ok() && !self.retry_buffer_holds_all() {
                // Too large to apply again in place anyway:
                // let go of it before the commit.
                entries = Vec::new();
            }
            if r.is_ok() && self.txn.as_ref().is_some_and(|t| !t.mid_changeset) && !more_waiting() {
                r = self.commit().await;
            }
            if let Err(e) = r {
                // A statement sent ahead that failed aborted the
                // transaction: what failed after it says only that.
                r = Err(self.in_flight_error().await.unwrap_or(e));
            }
            match r {
                Ok(()) => break,
                // R8: a lock timeout or deadlock (a cashier, or
                // another stream on the same rows) is retried
                // here, without moving progress.
                Err(e) if is_lock_contention(&e) && tries < LOCK_RETRIES && self.retry_buffer_holds_all() && !self.conn.client.is_closed() => {
                    tries += 1;
                    tracing::debug!(stream = %self.stream, tries, error = %e, "lock contention; retrying the transaction");
                    self.rollback_for_retry().await?;
                    let jitter = u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 40);
                    tokio::time::sleep(Duration::from_millis(u64::from(tries) * 20 + jitter)).await;
                    // What was applied since the last commit, then
                    // the rest of this batch (positions already
                    // applied again are skipped).
                    again = self.entries_to_retry(std::mem::take(&mut again));
                }
                // A data error: the range is replayed carefully,
                // here when every entry of it is at hand (else by
                // the link, from durable progress).
                Err(e) if !careful_retry && e.replays_carefully() && self.retry_buffer_holds_all() && !self.conn.client.is_closed() => {
                    careful_retry = true;
                    let _ = self.fail(e);
                    self.rollback_for_retry().await?;
                    again = self.entries_to_retry(std::mem::take(&mut again));
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        Ok(())
    }

    /// What to apply again after a rollback: every entry since the last
    /// commit that this attempt reached (kept in `uncommitted`), then the
    /// entries of the previous attempt's list that this attempt did not
    /// reach. (An attempt that fails while it applies that list again has
    /// kept only what it reached: dropping the rest skipped sales of earlier
    /// messages while progress moved past them.)
    fn entries_to_retry(&mut self, previous: Vec<Arc<LogEntry>>) -> Vec<Arc<LogEntry>> {
        let mut again = std::mem::take(&mut self.uncommitted);
        self.uncommitted_rows = 0;
        self.uncommitted_bytes = 0;
        let reached = again.last().map_or(self.committed, |e| e.pos);
        again.extend(previous.into_iter().filter(|e| e.pos > reached));
        again
    }

    /// Rolls back the open transaction so that the entries since the last
    /// commit can be applied again.
    async fn rollback_for_retry(&mut self) -> Result<(), EngineError> {
        self.conn.client.batch_execute("ROLLBACK").await.map_err(EngineError::pg("rolling back an apply transaction"))?;
        self.txn = None;
        // What the rolled-back attempt counted did not happen.
        self.stats = ApplyStats { committed_pos: self.committed, ..self.committed_stats.clone() };
        self.queue = pipeline::Queue::default();
        // Its answers are read to the end by their task and dropped.
        self.in_flight = None;
        self.seen = self.committed;
        self.attempting = self.committed;
        // What the rolled-back transaction parked or recorded is gone too.
        self.noted_skips.clear();
        self.load_held().await
    }

    /// Marks the open range careful after a data error.
    fn fail(&mut self, e: EngineError) -> EngineError {
        let data = e.replays_carefully();
        let until = self.seen.max(self.attempting);
        if !e.is_transient() && self.careful_for(self.attempting) && self.attempting > self.committed {
            // Even one change at a time, this entry fails: count it.
            let mut f = self.state.failures.lock().unwrap_or_else(|p| p.into_inner());
            let n = f.entry(self.attempting).or_insert((0, String::new()));
            n.0 += 1;
            n.1 = e.to_string();
            tracing::warn!(stream = %self.stream, pos = self.attempting, failures = n.0, error = %e, "an entry fails even when replayed change by change");
        } else if data && until > self.committed {
            self.state.careful_until.fetch_max(until, Ordering::SeqCst);
            tracing::warn!(stream = %self.stream, from = self.committed + 1, to = until, error = %e, "data error: replaying this range change by change");
        } else if !e.is_transient() && until > self.committed {
            // Anything else that is not a passing condition: replay the
            // range carefully next time, where each entry's failures count.
            self.state.careful_until.fetch_max(until, Ordering::SeqCst);
        }
        e
    }

    fn careful_for(&self, pos: u64) -> bool {
        pos <= self.state.careful_until.load(Ordering::SeqCst)
    }

    /// `true` while every entry since the last commit is kept for an
    /// in-place retry (not after a large transaction).
    fn retry_buffer_holds_all(&self) -> bool {
        self.uncommitted_rows <= RETRY_BUFFER_ROWS && self.uncommitted_bytes <= RETRY_BUFFER_BYTES && self.unbuffered <= self.committed
    }

    /// At the main: every entry of this branch's stream must name the
    /// branch as its author, with the index and cluster the handshake
    /// authenticated; one that names another node ends the session
    /// ([`EngineError::Impersonation`], a security event), never applied as
    /// that node's (a shop's credential must not speak as the
    /// main: its DDL, rules and stamps would count as the main's).
    ///
    /// A stamp more than `max_ahead` beyond the main's clock when the entry
    /// arrives is clamped to that moment, once, here: the ChangeSet is
    /// decided, recorded and relayed with the clamped stamp, so one
    /// far-future stamp cannot win every later decision (a record of kind
    /// `stamp_clamped` keeps what was sent).
    ///
    /// Only the main takes a branch's stream: at a branch this does nothing.
    pub fn expect_author(&mut self, index: u32, system_id: u64, max_ahead: Duration) {
        if let Some(d) = self.wing.decider_mut() {
            d.expect_author(index, system_id, i64::try_from(max_ahead.as_micros()).unwrap_or(i64::MAX));
        }
    }

    /// Whether this applier takes a branch's stream at the main
    /// ([`Applier::expect_author`] was called).
    pub fn expects_author(&self) -> bool {
        self.wing.decider().is_some_and(|d| d.expects_author())
    }

    /// At the main: a branch's `seen_main_ts` (how much of the main's relay
    /// it had applied when it wrote a change, which decides whether its
    /// change was informed of the main's) cannot exceed the relay time of
    /// the newest relay entry sent to it: `sent` is the relay
    /// position the session has sent (or the branch held before it), read
    /// in `relay`. A claim beyond it is capped, with a warning.
    pub fn cap_seen_main(&mut self, relay: Arc<crate::log::ChangeLog>, sent: Arc<AtomicU64>) {
        if let Some(d) = self.wing.decider_mut() {
            d.cap_seen_main(relay, sent);
        }
    }

    /// Takes entries off the wire: each must follow the last without a gap
    /// (R26; a resend of what was received is skipped), is decoded and
    /// checked (R24). A body that does not decode, or an entry that does
    /// not hold together, becomes an empty fragment at its position and is
    /// quarantined when that position applies; a change that does not fit
    /// its table is taken out and quarantined the same way. The raw bytes
    /// are dropped as soon as they are decoded.
    pub async fn receive(&mut self, wire: Vec<WireEntry>) -> Result<Vec<LogEntry>, EngineError> {
        let mut out = Vec::with_capacity(wire.len());
        for w in wire {
            // Decoding is CPU work: let the link's reader and timers run
            // between entries (a stalled reader looks like a silent peer).
            tokio::task::yield_now().await;
            if w.pos <= self.received {
                continue;
            }
            if w.pos != self.received + 1 {
                return Err(EngineError::Gap { stream: self.stream.clone(), expected: self.received + 1, got: w.pos });
            }
            self.received = w.pos;
            let given_up = self.state.failures.lock().unwrap_or_else(|p| p.into_inner()).get(&w.pos).filter(|(n, _)| *n >= MAX_CAREFUL_FAILURES).map(|(n, e)| {
                format!("it could not be applied in {n} attempts, change by change: {e}")
            });
            let decoded = LogEntry::decode(&w.body).map_err(|e| e.to_string()).and_then(|e| {
                if let Some(why) = &given_up {
                    return Err(why.clone());
                }
                if (e.pos, e.part, e.last) != (w.pos, w.part, w.last) {
                    return Err(format!("the entry says position {} part {} (last: {}), the link said position {} part {} (last: {})", e.pos, e.part, e.last, w.pos, w.part, w.last));
                }
                match e.check().into_iter().find(|i| i.change.is_none()) {
                    Some(i) => Err(i.reason),
                    None => Ok(e),
                }
            });
            let e = match decoded {
                Ok(mut e) => {
                    drop(w.body);
                    if let Some(d) = self.wing.decider_mut() {
                        d.admit(&self.stream, self.last_header.as_ref(), &mut e)?;
                    }
                    let bad = e.check();
                    if !bad.is_empty() {
                        let mut keep = Vec::with_capacity(e.changes.len());
                        let mut quarantined = Vec::new();
                        for (i, ch) in e.changes.drain(..).enumerate() {
                            match bad.iter().find(|b| b.change == Some(i)) {
                                Some(b) => quarantined.push((ch, b.reason.clone())),
                                None => keep.push(ch),
                            }
                        }
                        e.changes = keep;
                        tracing::warn!(stream = %self.stream, pos = e.pos, changes = quarantined.len(), "changes that do not fit their table are quarantined");
                        self.invalid.insert(e.pos, quarantined);
                    }
                    self.last_header = Some(e.header.clone());
                    e
                }
                Err(reason) => {
                    tracing::warn!(stream = %self.stream, pos = w.pos, bytes = w.body.len(), reason = %reason, "an entry that does not decode is quarantined");
                    // Accounted to its ChangeSet when it is a later fragment;
                    // a whole one of its own is this stream's.
                    let header = match (&self.last_header, w.part) {
                        (Some(h), p) if p > 0 => h.clone(),
                        _ => ChangeSetHeader { author: self.stream.clone(), author_index: 0, system_id: 0, commit_lsn: 0, commit_ts_us: 0, stamp: 0, seen_main_ts: 0 },
                    };
                    self.undecodable.insert(w.pos, (w.body, reason));
                    LogEntry { pos: w.pos, header, part: w.part, last: w.last, tables: Vec::new(), changes: Vec::new(), relay_ts_us: 0, echo_as_sent: false }
                }
            };
            out.push(e);
        }
        Ok(out)
    }

    /// Records what [`Applier::receive`] set aside at `e`'s position, in the
    /// open transaction (so it commits with the progress past it).
    async fn record_set_aside(&mut self, e: &LogEntry) -> Result<(), EngineError> {
        if let Some((sent, kept)) = self.wing.decider().and_then(|d| d.clamped_at(e.pos)) {
            if e.part == 0 {
                let detail = format!(
                    "ChangeSet at position {} of stream {} was stamped {} s ahead of this node's clock on arrival; it is decided and relayed with the time it arrived",
                    e.pos,
                    self.stream,
                    sent.saturating_sub(kept) / 1_000_000
                );
                self.record("(stamp)", None, ConflictKind::StampClamped, &e.header, None, Some(serde_json::json!({ "stamp_sent": sent, "stamp_kept": kept }).to_string()), Some(detail)).await?;
            }
        }
        if let Some((raw, reason)) = self.undecodable.get(&e.pos).cloned() {
            self.stats.quarantined += 1;
            let detail = format!("entry {} of stream {} (fragment {} of its ChangeSet) was not applied: {reason}", e.pos, self.stream, e.part);
            self.conn
                .client
                .execute(
                    "INSERT INTO branchsync.conflicts (tbl, kind, rule, loser_node, detail, entry) VALUES ('(undecodable entry)', 'quarantined', 'validation', $1, $2, $3)",
                    &[&e.header.author, &detail, &raw],
                )
                .await
                .map_err(EngineError::pg("recording an undecodable entry"))?;
        }
        if let Some(bad) = self.invalid.get(&e.pos).cloned() {
            for (ch, reason) in bad {
                self.stats.quarantined += 1;
                let tbl = change_table(&ch).and_then(|t| e.tables.get(t as usize)).map(|d| format!("{}.{}", d.schema, d.name)).unwrap_or_else(|| "(invalid change)".into());
                let json = serde_json::to_string(&ch).unwrap_or_default();
                self.record(&tbl, None, ConflictKind::Quarantined, &e.header, None, Some(serde_json::json!({ "change": json }).to_string()), Some(format!("the change does not fit its table: {reason}"))).await?;
            }
        }
        Ok(())
    }

    /// Applies entries in order, skipping positions already seen (a resend).
    pub async fn apply_entries(&mut self, entries: &[LogEntry]) -> Result<(), EngineError> {
        let shared: Vec<Arc<LogEntry>> = entries.iter().cloned().map(Arc::new).collect();
        self.apply_shared(&shared).await
    }

    /// [`Applier::apply_entries`] of entries the retry buffer can share.
    async fn apply_shared(&mut self, entries: &[Arc<LogEntry>]) -> Result<(), EngineError> {
        for shared in entries {
            let e: &LogEntry = shared;
            if e.pos <= self.seen {
                continue;
            }
            // Positions arrive without a gap (checked on receipt), so one
            // here means this applier lost entries it meant to apply again
            // (after a rollback): never skip them, start over from durable
            // progress instead.
            if e.pos != self.seen + 1 {
                return Err(EngineError::ApplySkip { stream: self.stream.clone(), expected: self.seen + 1, got: e.pos });
            }
            // Queued inserts build statements without a round trip: yield
            // now and then so other tasks (the link's reader) keep running
            // (when the task's budget is spent: a yield per entry cost a trip
            // through the scheduler per ChangeSet).
            tokio::task::coop::consume_budget().await;
            // Kept until committed, to apply again after a lock timeout.
            self.uncommitted_rows += e.changes.len();
            let bytes = e.approx_bytes();
            self.uncommitted_bytes += bytes;
            if bytes > REOPEN_AFTER_BYTES {
                self.reopen = true;
            }
            if self.retry_buffer_holds_all() {
                self.uncommitted.push(shared.clone());
            } else {
                self.unbuffered = self.unbuffered.max(e.pos);
            }
            self.attempting = e.pos;
            if e.part == 0 {
                let careful = self.careful_for(e.pos);
                if let Some(t) = &self.txn {
                    if t.mid_changeset {
                        return Err(EngineError::Corrupt(format!("stream {} started a new ChangeSet at position {} inside another", self.stream, e.pos)));
                    }
                    let budget_spent = t.started.elapsed() >= self.cfg.group_budget;
                    let held_rows = t.touched_existing;
                    // One transaction is one origin: at the main, one
                    // author's; at a branch, the relay's, so the ChangeSets
                    // of many shops share a commit.
                    if self.origin_for(&t.author) != self.origin_for(&e.header.author) || budget_spent || careful || t.careful {
                        self.commit().await?;
                        if budget_spent && held_rows {
                            // A catch-up of changes to existing rows would
                            // otherwise lock them back to back, group after
                            // group: a till that polls for such a row with
                            // NOWAIT could never get in. Apply yields a fifth
                            // of its time (nothing is waiting on the stream
                            // then: entries keep arriving into the buffer).
                            tokio::time::sleep(self.cfg.group_budget / YIELD_DIVISOR).await;
                        }
                    }
                }
                if self.txn.is_none() {
                    self.begin(&e.header.author, careful).await?;
                }
                // A ChangeSet of one fragment that only inserts: what the
                // main writes for it is compared with what was sent.
                let sent = self.wing.decider().filter(|_| e.last).and_then(|d| crate::marks::RowsDigest::of_inserts(&d.row_hasher, e));
                let mark = crate::state::ApplyMark { header: e.header.clone(), relay_ts_us: e.relay_ts_us, sent };
                self.queue_apply_message(mark).await?;
                if let Some(t) = self.txn.as_mut() {
                    t.mid_changeset = true;
                }
            } else if !self.txn.as_ref().is_some_and(|t| t.mid_changeset) {
                return Err(EngineError::Corrupt(format!(
                    "stream {} sent fragment {} of a ChangeSet at position {} without its start",
                    self.stream, e.part, e.pos
                )));
            }
            let careful = self.txn.as_ref().is_some_and(|t| t.careful);
            self.record_set_aside(e).await?;
            if e.changes.iter().any(|c| matches!(c, RowChange::Update { .. } | RowChange::Delete { .. })) {
                if let Some(t) = self.txn.as_mut() {
                    t.touched_existing = true;
                }
            }
            if self.takes_as_sent(e) {
                // Our own rows, written at the main exactly as sent: they
                // are here (or a newer local change is), decided.
                self.queue.settle_through(e.header.commit_ts_us);
                self.stats.echoes_as_sent += 1;
            } else {
                if self.queue.settling() && !self.is_echo(e) {
                    // Another node's rows are written over ours only once
                    // the mark says ours are decided (in stream order; our
                    // own echoes' guards do not read the mark).
                    self.drain().await?;
                }
                self.apply_fragment(e, careful).await?;
            }
            self.seen = e.pos;
            self.stats.rows += e.changes.len() as u64;
            if e.last {
                self.stats.changesets += 1;
                if let Some(t) = self.txn.as_mut() {
                    t.mid_changeset = false;
                    t.last = Some((e.pos, e.header.clone()));
                }
            }
        }
        Ok(())
    }

    async fn stmt(&mut self, text: &str, types: &[Type]) -> Result<Statement, EngineError> {
        if let Some(s) = self.stmts.get(text) {
            return Ok(s.clone());
        }
        let s = self
            .conn
            .client
            .prepare_typed(text, types)
            .await
            .map_err(EngineError::pg("preparing an apply statement"))?;
        if self.stmts.len() > 2_000 {
            self.stmts.clear();
        }
        self.stmts.insert(text.to_string(), s.clone());
        Ok(s)
    }

    async fn begin(&mut self, author: &str, careful: bool) -> Result<(), EngineError> {
        self.set_origin(author).await?;
        self.queue = pipeline::Queue::default();
        // The schema version comes with BEGIN, in the same round trip: when a
        // schema change committed here since the last transaction (the ERP's
        // DDL, or another stream's replay), forget what was read of the
        // catalog.
        let msgs = self
            .conn
            .client
            .simple_query(&format!("BEGIN; SELECT n FROM branchsync.schema_version; {}", crate::pg::CURRENT_XID))
            .await
            .map_err(EngineError::pg("starting an apply transaction"))?;
        let mut values = msgs.iter().filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<i64>().ok()),
            _ => None,
        });
        let version = values.next();
        self.xid = values.next().and_then(|x| u32::try_from(x).ok()).ok_or_else(|| EngineError::Corrupt("the apply transaction has no transaction id".into()))?;
        if version != self.schema_version {
            if self.schema_version.is_some() {
                tracing::debug!(stream = %self.stream, "schema changed here; reloading table definitions");
            }
            self.forget_tables();
            self.stmts.clear();
            self.schema_version = version;
        }
        self.txn = Some(OpenTxn { started: Instant::now(), author: author.to_string(), mid_changeset: false, last: None, careful, touched_existing: false });
        Ok(())
    }

    /// Seals a mark of the open transaction with the daemon's key (R25).
    pub(super) fn seal(&self, prefix: &str, body: &[u8]) -> Vec<u8> {
        crate::marks::seal(&self.cfg.mark_key, prefix, self.xid, body)
    }

    /// The replication origin a ChangeSet of `author` is applied under
    /// ([`Wing::origin_for`]).
    fn origin_for(&self, author: &str) -> String {
        self.wing.origin_for(author)
    }

    /// Sets the session's replication origin for a ChangeSet of `author`.
    async fn set_origin(&mut self, author: &str) -> Result<(), EngineError> {
        let origin = self.origin_for(author);
        if self.session_origin.as_deref() != Some(origin.as_str()) {
            let c = &self.conn.client;
            if self.session_origin.is_some() {
                c.batch_execute("SELECT pg_replication_origin_session_reset()").await.map_err(EngineError::pg("resetting the replication origin"))?;
                self.session_origin = None;
            }
            c.execute(
                "SELECT pg_replication_origin_create($1) WHERE pg_replication_origin_oid($1) IS NULL",
                &[&origin],
            )
            .await
            .map_err(EngineError::pg(format!("creating replication origin {origin}")))?;
            c.execute("SELECT pg_replication_origin_session_setup($1)::text", &[&origin]).await.map_err(|e| {
                // 53400: no free origin state; retried, but say what to change.
                let hint = if e.code() == Some(&tokio_postgres::error::SqlState::CONFIGURATION_LIMIT_EXCEEDED) {
                    " (max_replication_slots also caps the replication origins the server tracks, one per site whose changes this node applies: raise it and restart PostgreSQL)"
                } else {
                    ""
                };
                EngineError::pg(format!("setting up replication origin {origin}{hint}"))(e)
            })?;
            self.session_origin = Some(origin);
        }
        Ok(())
    }

    /// Commits the open transaction (which must sit at a ChangeSet
    /// boundary) with the stream progress and the author's origin data.
    async fn commit(&mut self) -> Result<(), EngineError> {
        let Some(t) = self.txn.take() else { return Ok(()) };
        let Some((pos, header)) = t.last else {
            self.queue = pipeline::Queue::default();
            self.in_flight = None;
            self.conn.client.batch_execute("ROLLBACK").await.map_err(EngineError::pg("ending an empty transaction"))?;
            return Ok(());
        };
        self.drain().await?;
        let c = &self.conn.client;
        let pos_i = pos as i64;
        let lsn_i = header.commit_lsn as i64;
        c.execute(sql::UPSERT_PROGRESS, &[&self.stream, &pos_i, &lsn_i]).await.map_err(EngineError::pg("recording stream progress"))?;
        // An entry that did not decode has no author's commit to point at.
        if header.commit_lsn != 0 {
            c.query_one(sql::XACT_SETUP, &[&fmt_lsn(header.commit_lsn), &header.commit_ts_us])
                .await
                .map_err(EngineError::pg("setting the origin of the apply transaction"))?;
        }
        failpoints::hit(failpoints::APPLY_BEFORE_COMMIT);
        // Application code ran inside this transaction (triggers, defaults,
        // casts): whatever it set, the commit is flushed before it is
        // acknowledged, and apply's own search_path is back. Deferred
        // triggers fire now, not inside COMMIT after these settings.
        c.batch_execute("SET CONSTRAINTS ALL IMMEDIATE; SET LOCAL synchronous_commit = on; SET LOCAL search_path TO DEFAULT; COMMIT")
            .await
            .map_err(EngineError::pg("committing an apply transaction"))?;
        // Progress moves only now, after the commit is durable
        // (synchronous_commit = on): the link may acknowledge it.
        failpoints::hit(failpoints::APPLY_AFTER_COMMIT);
        self.committed = pos;
        self.uncommitted.retain(|e| e.pos > pos);
        self.uncommitted_rows = self.uncommitted.iter().map(|e| e.changes.len()).sum();
        self.uncommitted_bytes = self.uncommitted.iter().map(|e| e.approx_bytes()).sum();
        self.undecodable.retain(|p, _| *p > pos);
        if let Some(d) = self.wing.decider_mut() {
            d.committed(pos);
        }
        self.invalid.retain(|p, _| *p > pos);
        self.state.failures.lock().unwrap_or_else(|p| p.into_inner()).retain(|p, _| *p > pos);
        self.stats.committed_pos = pos;
        self.stats.transactions += 1;
        self.committed_stats = self.stats.clone();
        self.progress_tx.send_replace(self.stats.clone());
        if self.reopen {
            self.reopen_connection().await?;
        }
        tracing::debug!(stream = %self.stream, pos, author = %header.author, lsn = %fmt_lsn(header.commit_lsn), "apply transaction committed");
        Ok(())
    }

    /// Forgets every table read from the catalog and every mapping built
    /// on one.
    fn forget_tables(&mut self) {
        self.tables.clear();
        self.mappings.clear();
    }

    /// Forgets one table read from the catalog (and every mapping).
    fn forget_table(&mut self, schema: &str, name: &str) {
        self.tables.remove(&(schema.to_string(), name.to_string()));
        self.mappings.clear();
    }

    /// How `desc` maps onto its local table (`None` when out of scope or
    /// missing here), and whether it is in scope; cached per table and
    /// column list.
    async fn mapping(&mut self, desc: &TableDesc) -> Result<(Option<Arc<Mapping>>, bool), EngineError> {
        if let Some(c) = self.mappings.get(&desc.schema).and_then(|t| t.get(&desc.name)) {
            if c.columns == desc.columns {
                return Ok((c.mapping.clone(), c.in_scope));
            }
        }
        let in_scope = self.cfg.scope.includes(&desc.schema, &desc.name);
        let mapping = if in_scope { self.load_mapping(desc).await? } else { None };
        let cached = CachedMapping { columns: desc.columns.clone(), in_scope, mapping: mapping.clone() };
        self.mappings.entry(desc.schema.clone()).or_default().insert(desc.name.clone(), cached);
        Ok((mapping, in_scope))
    }

    async fn load_mapping(&mut self, desc: &TableDesc) -> Result<Option<Arc<Mapping>>, EngineError> {
        let key = (desc.schema.clone(), desc.name.clone());
        if !self.tables.contains_key(&key) {
            let t = LocalTable::load(&self.conn.client, &desc.schema, &desc.name).await?;
            if let Some(t) = &t {
                // Policies would hide rows from branchsync's role: refused
                // (an error of this entry, quarantined with the reason), as
                // PostgreSQL's own apply worker refuses it.
                self.conn
                    .client
                    .execute("SELECT branchsync.check_row_security($1::text::regclass)", &[&t.qualified])
                    .await
                    .map_err(EngineError::pg(format!("checking row-level security of {}", t.name)))?;
            }
            self.tables.insert(key.clone(), t.map(Arc::new));
        }
        let local = &self.cfg.tables.for_table(&desc.schema, &desc.name).local;
        Ok(self.tables[&key].clone().map(|t| Arc::new(Mapping::new(desc, t, local))))
    }

    async fn apply_fragment(&mut self, e: &LogEntry, careful: bool) -> Result<(), EngineError> {
        if !e.changes.iter().any(|c| matches!(c, RowChange::Ddl(_))) {
            return self.apply_rows(e, careful).await;
        }
        // DDL runs exactly where it sat among the rows (invariant 5): the
        // rows before it see the old schema, the rows after it the new one.
        let mut rows = Vec::new();
        for ch in &e.changes {
            match ch {
                // Our own schema change, echoed: it ran here already.
                RowChange::Ddl(_) if self.is_echo(e) => {}
                RowChange::Ddl(d) => {
                    if !rows.is_empty() {
                        let part = LogEntry { changes: std::mem::take(&mut rows), ..e.clone() };
                        self.apply_rows(&part, careful).await?;
                    }
                    self.apply_ddl(e, d).await?;
                }
                other => rows.push(other.clone()),
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let part = LogEntry { changes: rows, ..e.clone() };
        self.apply_rows(&part, careful).await
    }

    /// Replays one DDL change of the author (R19, R22): each statement is
    /// checked against the allow-list and runs in a savepoint as a
    /// non-superuser role with the author's `search_path`. A statement that
    /// fails or is refused is recorded in `branchsync.conflicts` and the
    /// stream goes on; one that meets a passing condition (a lock, a
    /// deadlock, a restart) fails the group, which is retried.
    async fn apply_ddl(&mut self, e: &LogEntry, d: &DdlChange) -> Result<(), EngineError> {
        self.drain().await?;
        let from_main = e.header.author_index == 0;
        if !from_main && !self.cfg.ddl.from_any {
            for stmt in &d.statements {
                self.ddl_failed(e, d, stmt, "schema change from a branch not replayed".into(),
                    "[ddl] from = \"main\" here: schema changes are made at the main. Set [ddl] from = \"any\" at the main to replay branches' DDL.".into()).await?;
            }
            return Ok(());
        }
        for stmt in &d.statements {
            let checked = match parse::check(stmt, from_main) {
                Ok(s) => s,
                Err(r) => {
                    let detail = if r.detail.is_empty() { r.message.clone() } else { format!("{}: {}", r.message, r.detail) };
                    self.ddl_failed(e, d, stmt, detail, r.hint).await?;
                    continue;
                }
            };
            let role = match self.ddl_role(d, &checked).await? {
                Ok(r) => r,
                Err(why) => {
                    self.ddl_failed(e, d, stmt, "replayed DDL needs a non-superuser role".into(), why).await?;
                    continue;
                }
            };
            // Three round trips: savepoint, search_path and role; the
            // statement alone (its error is the statement's); then back to
            // branchsync's role, the author's message, release.
            let msg = DdlMessage {
                query: checked.sql.clone(),
                search_path: d.search_path.clone(),
                role: d.role.clone(),
                tag: d.tag.clone(),
                ordinal: 1,
                key: format!("apply/{}/{}/{}", self.stream, e.pos, self.stats.ddl_applied),
            };
            // The main relays it: apply's own DDL is not emitted by the
            // trigger (REPLAYING_GUC), so write the author's message here.
            let json = crate::marks::seal_text(&self.cfg.mark_key, ddl::DDL_MESSAGE_PREFIX, self.xid, &serde_json::to_string(&msg).unwrap_or_default());
            let lit = crate::pg::quote_literal;
            let before = format!(
                "SAVEPOINT branchsync_ddl; SELECT pg_catalog.set_config('search_path', {}, true); SET LOCAL ROLE {}",
                lit(&d.search_path),
                branchsync_proto::changeset::quote_ident(&role)
            );
            let after = format!(
                "RESET ROLE; SELECT pg_catalog.pg_logical_emit_message(true, {}::text, {}::text); RELEASE SAVEPOINT branchsync_ddl",
                lit(ddl::DDL_MESSAGE_PREFIX),
                lit(&json)
            );
            let c = &self.conn.client;
            let run = async {
                c.batch_execute(&before).await?;
                c.batch_execute(&checked.sql).await?;
                c.batch_execute(&after).await
            }
            .await;
            match run {
                Ok(()) => {
                    self.stats.ddl_applied += 1;
                    tracing::info!(stream = %self.stream, author = %e.header.author, node_type = checked.node, "schema change replayed");
                }
                // A lock held here a moment too long (autovacuum on a table
                // just loaded, a till's open transaction), a deadlock, a
                // restart: the statement is fine and its turn comes again.
                // The whole group rolls back and is retried in place, like
                // a row change that met a lock (R8); recording it as failed
                // would drop the schema change for good (drift).
                Err(err) if pg_error_is_transient(&err) => return Err(EngineError::pg("replaying DDL")(err)),
                Err(err) if err.as_db_error().is_some() => {
                    self.conn.client.batch_execute("ROLLBACK TO SAVEPOINT branchsync_ddl; RELEASE SAVEPOINT branchsync_ddl").await.map_err(EngineError::pg("rolling back a failed DDL statement"))?;
                    let detail = err.as_db_error().map(|db| format!("{} (SQLSTATE {})", db.message(), db.code().code())).unwrap_or_default();
                    self.ddl_failed(e, d, stmt, detail, String::new()).await?;
                }
                Err(err) => return Err(EngineError::pg("replaying DDL")(err)),
            }
        }
        // The schema changed: forget what was read from the catalog.
        self.forget_tables();
        self.stmts.clear();
        Ok(())
    }

    /// The role replayed DDL runs as, from this node's policy (R22): `[ddl]
    /// run_as`; else the owner here of the first relation the statement
    /// names that exists (resolved with the author's `search_path`); else,
    /// for a new object, the author's role only if this node lets branchsync
    /// act as it (a member of it: `init` grants the owners of replicated
    /// tables and the roles with CREATE on a replicated schema); else the
    /// role owning most replicated tables. It must
    /// not be a superuser, and branchsync's role must be a member of it
    /// (`init` makes it one of every owner). `Ok(Err(why))` when no role is
    /// usable.
    ///
    /// One round trip (a module install replays thousands of statements):
    /// the author's `search_path` is set and every candidate is looked up
    /// in one simple query, values written as literals.
    async fn ddl_role(&mut self, d: &DdlChange, checked: &parse::Checked) -> Result<Result<String, String>, EngineError> {
        use branchsync_proto::changeset::quote_ident;
        let lit = crate::pg::quote_literal;
        // The role as an SQL expression, evaluated with the search_path set.
        let role_sql = match &self.cfg.ddl.run_as {
            Some(r) => lit(r),
            None => {
                let targets: Vec<String> = checked
                    .targets
                    .iter()
                    .map(|t| match &t.schema {
                        Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&t.name)),
                        None => quote_ident(&t.name),
                    })
                    .map(|n| lit(&n))
                    .collect();
                // The owner of the first relation named that exists; else
                // a new object: the role that made it at the author, if
                // this node lets branchsync act as it (init made branchsync
                // a member of the roles that own replicated tables or may
                // create tables in a replicated schema); else the role
                // owning most replicated tables.
                format!(
                    "coalesce(\
                       (SELECT o.rolname::text FROM unnest(ARRAY[{targets}]::text[]) WITH ORDINALITY AS u(name, i) \
                        JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(u.name) \
                        JOIN pg_catalog.pg_roles o ON o.oid = c.relowner ORDER BY u.i LIMIT 1), \
                       (SELECT rolname::text FROM pg_catalog.pg_roles WHERE rolname = {author} AND NOT rolsuper AND pg_has_role(current_user, oid, 'MEMBER')), \
                       (SELECT o.rolname::text FROM branchsync.known_tables k JOIN pg_catalog.pg_class c ON c.oid = k.relid \
                        JOIN pg_catalog.pg_roles o ON o.oid = c.relowner WHERE NOT o.rolsuper GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1))",
                    targets = targets.join(", "),
                    author = lit(&d.role),
                )
            }
        };
        let sql = format!(
            "SELECT pg_catalog.set_config('search_path', {search_path}, true); \
             SELECT r.role, s.rolsuper::text, pg_catalog.pg_has_role(current_user, s.oid, 'MEMBER')::text \
             FROM (SELECT {role_sql} AS role) r LEFT JOIN pg_catalog.pg_roles s ON s.rolname = r.role",
            search_path = lit(&d.search_path),
        );
        let answer = self.conn.client.simple_query(&sql).await.map_err(EngineError::pg("looking up the role to replay DDL as"))?;
        let row = answer.iter().filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        }).last();
        let Some(row) = row else {
            return Err(EngineError::Corrupt("looking up the role to replay DDL as returned no row".into()));
        };
        let Some(role) = row.get(0).map(str::to_string) else {
            return Ok(Err("no replicated table here is owned by a role other than a superuser, and [ddl] run_as is not set. Set [ddl] run_as to the ERP's role.".into()));
        };
        Ok(match (row.get(1), row.get(2)) {
            (None, _) => Err(format!("role \"{role}\" does not exist here. Create the ERP's role at every site, or set [ddl] run_as.")),
            (Some("true"), _) => Err(format!("role \"{role}\" owns the table here and is a superuser. Run the ERP as a non-superuser role, or set [ddl] run_as to one.")),
            (Some(_), Some("true")) => Ok(role),
            (Some(_), _) => Err(format!("branchsync's role is not a member of role \"{role}\" here. Run branchsync init again (it grants the owners of replicated tables), or GRANT {role} TO branchsync's role.")),
        })
    }

    async fn ddl_failed(&mut self, e: &LogEntry, d: &DdlChange, stmt: &str, detail: String, hint: String) -> Result<(), EngineError> {
        self.stats.ddl_failed += 1;
        tracing::warn!(stream = %self.stream, author = %e.header.author, tag = %d.tag, "schema change not replayed; recorded in branchsync.conflicts");
        let remote = serde_json::json!({ "sql": stmt, "search_path": d.search_path, "role": d.role, "tag": d.tag }).to_string();
        let detail = format!("{}.", detail.trim_end_matches('.'));
        let text = if hint.is_empty() { detail } else { format!("{detail} {hint}") };
        self.record("(ddl)", None, ConflictKind::DdlFailed, &e.header, None, Some(remote), Some(text)).await
    }

    async fn apply_rows(&mut self, e: &LogEntry, careful: bool) -> Result<(), EngineError> {
        let mut maps = Vec::with_capacity(e.tables.len());
        for (i, d) in e.tables.iter().enumerate() {
            let (m, in_scope) = self.mapping(d).await?;
            if in_scope && (m.is_none() || (!self.held.is_empty() && self.held.contains(&(format!("{}.{}", d.schema, d.name), park::WHOLE_TABLE.to_string())))) {
                // Not there (yet, or any more), or earlier rows of it wait:
                // park its rows in order, never drop them.
                self.park_table_changes(e, i as u32).await?;
                maps.push(None);
                continue;
            }
            maps.push(m);
        }
        self.note_skipped_columns(e, &maps).await?;
        // Rows pointing at a row that was folded into another follow it.
        // The re-pointed rows travel back to their author in the echo.
        let repointed = self.repoint_merged(e, &maps).await?;
        let e = repointed.as_ref().map(|(re, _)| re).unwrap_or(e);
        self.apply_rows_mapped(e, careful, &maps).await
    }

    async fn apply_rows_mapped(&mut self, e: &LogEntry, careful: bool, maps: &[Option<Arc<Mapping>>]) -> Result<(), EngineError> {
        let echo = if self.is_echo(e) { self.echo_rows(e, maps) } else { None };
        let e = echo.as_ref().unwrap_or(e);
        // Changes to a parked or quarantined key queue behind it (R6, R9).
        // Anything but inserts must see the rows queued before it (and the
        // keys their parent checks park).
        let queue_deltas = !careful && self.deltas_queueable(e, maps);
        let queue_it = !careful && (pipeline::insert_only(e) || queue_deltas);
        if !queue_it {
            self.drain().await?;
        }
        let held_back = self.hold_back(e, maps).await?;
        let e = held_back.as_ref().unwrap_or(e);
        if queue_deltas {
            self.queue_deltas(e, maps).await?;
        }
        if queue_it {
            return self.queue_inserts(e, maps).await;
        }
        if careful {
            for (i, ch) in e.changes.iter().enumerate() {
                self.apply_one_carefully(e, maps, i, ch).await?;
            }
        } else {
            self.apply_fast(e, maps).await?;
        }
        self.park_orphans(e, maps).await
    }

    /// Values of columns this table does not have here (dropped here, or
    /// added at the author only) are skipped; that is recorded once per
    /// table and column set and session, so the operator sees it without a
    /// record per row.
    async fn note_skipped_columns(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>]) -> Result<(), EngineError> {
        // Only tables these changes write: a fragment split around DDL
        // still describes every table of the transaction, and a table
        // altered by that DDL must not count as missing the new column.
        let written: HashSet<u32> = e.changes.iter().filter_map(change_table).collect();
        for (i, m) in maps.iter().enumerate() {
            let Some(m) = m else { continue };
            if m.skipped.is_empty() || !written.contains(&(i as u32)) {
                continue;
            }
            let cols = m.skipped.join(", ");
            if self.noted_skips.insert((m.table.name.clone(), cols.clone())) {
                tracing::warn!(stream = %self.stream, table = %m.table.name, columns = %cols, "incoming values of columns this table does not have are skipped");
                self.record(&m.table.name, None, ConflictKind::ColumnsSkipped, &e.header, None, None,
                    Some(format!("values of column(s) {cols} from {} are not stored: {} has no such column(s) here", e.header.author, m.table.name))).await?;
            }
        }
        Ok(())
    }

    /// Inserts bucketed per table; runs of updates or deletes batched.
    async fn apply_fast(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>]) -> Result<(), EngineError> {
        // Fast path: bucket inserts per table until the next non-insert.
        let mut buckets: Vec<(u32, Vec<&Vec<Value>>)> = Vec::new();
        let mut i = 0;
        while i < e.changes.len() {
            match &e.changes[i] {
                RowChange::Insert { table, new } => {
                    match buckets.iter_mut().find(|(t, _)| t == table) {
                        Some((_, rows)) => rows.push(new),
                        None => buckets.push((*table, vec![new])),
                    }
                    i += 1;
                }
                RowChange::Truncate { tables, restart_identity, .. } => {
                    self.flush_inserts(e, maps, std::mem::take(&mut buckets)).await?;
                    self.apply_truncate(e, maps, tables, *restart_identity).await?;
                    i += 1;
                }
                RowChange::Verdict(v) => {
                    self.flush_inserts(e, maps, std::mem::take(&mut buckets)).await?;
                    if self.wing.obeys() {
                        self.obey_verdict(e, maps, v).await?;
                    }
                    i += 1;
                }
                RowChange::Conflict(r) => {
                    if self.wing.obeys() {
                        let origin = self.stream.clone();
                        self.obey_conflict(&origin, r).await?;
                    }
                    i += 1;
                }
                RowChange::Ddl(_) => i += 1,
                _ => {
                    self.flush_inserts(e, maps, std::mem::take(&mut buckets)).await?;
                    // A run of updates or deletes on one table, without a
                    // key repeated (a repeat must see the earlier change):
                    // the key a change finds its row by, and the key an
                    // update gives it. One statement matches every change
                    // against the rows as they were before it, so an update
                    // of a row whose key an earlier update of the run set
                    // (an ERP giving a new record its parent's id, then
                    // stamping it) would find nothing, and be lost.
                    let start = i;
                    let mut keys = HashSet::new();
                    let mut bytes = 0usize;
                    while i < e.changes.len() && i - start < MAX_BATCH_ROWS && same_run(&e.changes[start], &e.changes[i]) {
                        // Bounded by bytes too: a large row is a run of its own.
                        bytes += e.changes[i].approx_bytes();
                        if i > start && bytes > MAX_BATCH_BYTES {
                            break;
                        }
                        let m = maps[change_table(&e.changes[i]).unwrap_or(0) as usize].as_ref();
                        if let Some(ks) = m.and_then(|m| change_keys(m, &e.changes[i])) {
                            if ks.iter().any(|k| keys.contains(k)) {
                                break;
                            }
                            keys.extend(ks);
                        }
                        i += 1;
                    }
                    self.apply_keyed_run(e, maps, &e.changes[start..i]).await?;
                }
            }
        }
        self.flush_inserts(e, maps, buckets).await
    }

    /// Sends the inserts of the buckets now (with row versions and parent
    /// checks), before an update or delete that may touch them.
    async fn flush_inserts(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>], buckets: Vec<(u32, Vec<&Vec<Value>>)>) -> Result<(), EngineError> {
        if buckets.is_empty() {
            return Ok(());
        }
        self.queue_buckets(e, maps, buckets).await?;
        self.drain().await
    }

    /// Updates or deletes of one table: decided at the main, taken as they
    /// come at a branch.
    async fn apply_keyed_run(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>], run: &[RowChange]) -> Result<(), EngineError> {
        let Some(t) = change_table(&run[0]) else { return Ok(()) };
        let Some(m) = maps[t as usize].clone() else { return Ok(()) };
        if self.wing.obeys() {
            return self.obey_run(e, maps, run).await;
        }
        if m.key_src.is_none() {
            let desc = &e.tables[t as usize];
            for ch in run {
                self.apply_keyless(e, &m, desc, ch).await?;
            }
            return Ok(());
        }
        self.decide_run(e, maps, run).await
    }

    /// TRUNCATE (R21): replayed for the tables whose `[[tables]]` rule opts
    /// in; for the others it is recorded and the rows stay (a truncate would
    /// discard rows its author never saw).
    async fn apply_truncate(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>], tables: &[u32], restart_identity: bool) -> Result<(), EngineError> {
        let mut replayed = Vec::new();
        for t in tables {
            let Some(m) = maps.get(*t as usize).and_then(|m| m.as_ref()) else { continue };
            let desc = &e.tables[*t as usize];
            if self.cfg.tables.for_table(&desc.schema, &desc.name).truncate {
                replayed.push(m.table.clone());
            } else {
                tracing::info!(stream = %self.stream, table = %m.table.name, author = %e.header.author, "TRUNCATE not replayed: the table has not opted in");
                self.record(&m.table.name, None, ConflictKind::TruncateSkipped, &e.header, None, Some("{\"truncate\": true}".into()),
                    Some(format!("{} truncated {} and this site keeps its rows: TRUNCATE replicates only for tables with truncate = true in [[tables]]", e.header.author, m.table.name))).await?;
            }
        }
        if replayed.is_empty() {
            return Ok(());
        }
        let list: Vec<&str> = replayed.iter().map(|t| t.qualified.as_str()).collect();
        let names: Vec<String> = replayed.iter().map(|t| t.name.clone()).collect();
        let restart = if restart_identity { " RESTART IDENTITY" } else { "" };
        self.conn
            .client
            .batch_execute(&format!("TRUNCATE ONLY {}{restart}", list.join(", ")))
            .await
            .map_err(EngineError::pg(format!("replaying TRUNCATE of {}", names.join(", "))))?;
        self.conn
            .client
            .execute("DELETE FROM branchsync.row_version WHERE tbl = ANY($1)", &[&names])
            .await
            .map_err(EngineError::pg("forgetting the row versions of truncated tables"))?;
        if self.wing.packed() {
            self.conn
                .client
                .execute("DELETE FROM branchsync.insert_versions WHERE tbl = ANY($1)", &[&names])
                .await
                .map_err(EngineError::pg("forgetting the packed insert versions of truncated tables"))?;
        }
        tracing::info!(stream = %self.stream, tables = %names.join(", "), author = %e.header.author, "TRUNCATE replayed");
        Ok(())
    }

    /// UPDATE/DELETE on a table without a key: touch exactly one matching
    /// row, NULL-safe (R11). No conflict detection on multisets.
    async fn apply_keyless(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, ch: &RowChange) -> Result<(), EngineError> {
        let old: &OldRow = match ch {
            RowChange::Update { old: Some(o), .. } | RowChange::Delete { old: o, .. } => o,
            RowChange::Update { old: None, .. } => {
                return self.record(&m.table.name, None, ConflictKind::NoKey, &e.header, None, Some(change_json(desc, ch)),
                    Some("the author sent no old row for a table without a key here; set REPLICA IDENTITY FULL on the author".into())).await;
            }
            _ => return Ok(()),
        };
        let match_src: Vec<usize> = (0..m.targets.len()).filter(|i| m.local(*i).is_some() && !matches!(old.values.get(*i), Some(Value::Unchanged))).collect();
        let match_names: Vec<&str> = match_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let mut args: Vec<Option<&str>> = match_src.iter().map(|i| old.values.get(*i).and_then(|v| v.as_text())).collect();
        let text = match ch {
            RowChange::Delete { .. } => sql::keyless_delete(&m.table, &match_names),
            RowChange::Update { new, .. } => {
                let set_src: Vec<usize> = (0..m.targets.len()).filter(|i| m.local(*i).is_some_and(|c| !c.identity_always) && !matches!(new.get(*i), Some(Value::Unchanged))).collect();
                let set_names: Vec<&str> = set_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
                args.extend(set_src.iter().map(|i| new.get(*i).and_then(|v| v.as_text())));
                sql::keyless_update(&m.table, &match_names, &set_names)
            }
            _ => return Ok(()),
        };
        let st = self.stmt(&text, &vec![Type::TEXT; args.len()]).await?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let n = self.conn.client.execute(&st, &params).await.map_err(EngineError::pg(format!("applying a change to {}", m.table.name)))?;
        if n == 0 {
            self.record(&m.table.name, None, ConflictKind::RowMissing, &e.header, None, Some(change_json(desc, ch)),
                Some("no row with these values exists here".into())).await?;
        }
        Ok(())
    }

    /// Careful mode: one change per savepoint; inserts resolve key conflicts
    /// by the rule; a change that fails with a data error is quarantined.
    async fn apply_one_carefully(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>], i: usize, ch: &RowChange) -> Result<(), EngineError> {
        // A row folded into another by an earlier change of this very
        // fragment is followed here, change by change.
        if self.wing.repoints() && matches!(ch, RowChange::Insert { .. } | RowChange::Update { .. }) {
            let one = LogEntry { changes: vec![ch.clone()], ..e.clone() };
            if let Some((re, _)) = self.repoint_merged(&one, maps).await? {
                if let Some(rch) = re.changes.first() {
                    return Box::pin(self.apply_one_carefully_repointed(&re, maps, i, rch)).await;
                }
            }
        }
        self.apply_one_carefully_repointed(e, maps, i, ch).await
    }

    async fn apply_one_carefully_repointed(&mut self, e: &LogEntry, maps: &[Option<Arc<Mapping>>], _i: usize, ch: &RowChange) -> Result<(), EngineError> {
        match ch {
            RowChange::Truncate { tables, restart_identity, .. } => return self.apply_truncate(e, maps, tables, *restart_identity).await,
            RowChange::Verdict(v) if self.wing.obeys() => return self.obey_verdict(e, maps, v).await,
            RowChange::Conflict(r) if self.wing.obeys() => {
                let origin = self.stream.clone();
                return self.obey_conflict(&origin, r).await;
            }
            _ => {}
        }
        let Some(t) = change_table(ch) else { return Ok(()) };
        let Some(m) = maps[t as usize].clone() else { return Ok(()) };
        let desc = &e.tables[t as usize];
        self.conn.client.batch_execute("SAVEPOINT branchsync_change").await.map_err(EngineError::pg("setting a savepoint"))?;
        let r = match ch {
            RowChange::Insert { new, .. } if self.wing.obeys() && m.key_src.is_some() => self.obey_insert(e, &m, desc, new).await,
            RowChange::Insert { new, .. } => self.insert_or_resolve_row(e, &m, desc, new, true).await,
            RowChange::Truncate { tables, restart_identity, .. } => self.apply_truncate(e, maps, tables, *restart_identity).await,
            RowChange::Ddl(_) | RowChange::Verdict(_) | RowChange::Conflict(_) => Ok(()),
            _ => self.apply_keyed_run(e, maps, std::slice::from_ref(ch)).await,
        };
        match r {
            Ok(()) => {
                self.conn.client.batch_execute("RELEASE SAVEPOINT branchsync_change").await.map_err(EngineError::pg("releasing a savepoint"))?;
                Ok(())
            }
            Err(EngineError::Postgres { source, context }) if pg_error_is_data_error(&source) => {
                self.conn.client.batch_execute("ROLLBACK TO SAVEPOINT branchsync_change").await.map_err(EngineError::pg("rolling back to a savepoint"))?;
                let detail = source.as_db_error().map(|d| format!("{} ({}): {}", context, d.code().code(), d.message())).unwrap_or_else(|| context.clone());
                tracing::warn!(stream = %self.stream, table = %m.table.name, author = %e.header.author, "change quarantined");
                self.stats.quarantined += 1;
                // Later changes to this key queue behind it (R6).
                let key = park::held_key_of(&m, ch);
                if let Some(k) = &key {
                    self.held.insert((m.table.name.clone(), k.clone()));
                }
                self.record(&m.table.name, key, ConflictKind::Quarantined, &e.header, None, Some(change_json(desc, ch)), Some(detail)).await?;
                // The author holds a change the main does not: tell it what
                // the main holds instead.
                if let (true, Some(ks)) = (self.wing.decides(), m.key_src.clone()) {
                    let vals = match ch {
                        RowChange::Insert { new, .. } | RowChange::Update { new, .. } => new,
                        RowChange::Delete { old, .. } => &old.values,
                        _ => return Ok(()),
                    };
                    let key_vals: Vec<String> = ks.iter().map(|k| vals.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect();
                    // A key that is no value of its type names no row here:
                    // nothing to tell the author.
                    self.conn.client.batch_execute("SAVEPOINT branchsync_verdict").await.map_err(EngineError::pg("setting a savepoint"))?;
                    match self.lock_and_read_current(&m, std::slice::from_ref(&key_vals)).await {
                        Ok(mut cur) => {
                            let row = cur.remove(&0).map(|c| c.values);
                            self.emit_verdict(e, &m, desc, &ks, &key_vals, row.as_ref()).await?;
                            self.conn.client.batch_execute("RELEASE SAVEPOINT branchsync_verdict").await.map_err(EngineError::pg("releasing a savepoint"))?;
                        }
                        Err(EngineError::Postgres { source, .. }) if pg_error_is_data_error(&source) => {
                            self.conn
                                .client
                                .batch_execute("ROLLBACK TO SAVEPOINT branchsync_verdict; RELEASE SAVEPOINT branchsync_verdict")
                                .await
                                .map_err(EngineError::pg("rolling back to a savepoint"))?;
                        }
                        Err(other) => return Err(other),
                    }
                }
                Ok(())
            }
            Err(other) => Err(other),
        }
    }

    /// Records what happened to a change (the author lost it): kind, both
    /// versions as JSON, and why.
    #[allow(clippy::too_many_arguments)]
    async fn record(&mut self, tbl: &str, key: Option<String>, kind: ConflictKind, h: &ChangeSetHeader, local: Option<String>, remote: Option<String>, detail: Option<String>) -> Result<(), EngineError> {
        let rule = tbl
            .split_once('.')
            .map(|(s, n)| self.cfg.tables.for_table(s, n).rule.name())
            .unwrap_or(conflict::RULE_LWW);
        let rule = if kind == ConflictKind::DdlFailed { "ddl" } else { rule };
        self.record_conflict(decide::NewConflict { tbl, key, kind, rule, winner: None, loser: Some(h.author.clone()), local, remote, detail }).await
    }
}

fn unreachable_change() -> ! {
    panic!("run holds only updates and deletes")
}

fn change_table(c: &RowChange) -> Option<u32> {
    match c {
        RowChange::Insert { table, .. } | RowChange::Update { table, .. } | RowChange::Delete { table, .. } => Some(*table),
        RowChange::Truncate { .. } | RowChange::Ddl(_) | RowChange::Verdict(_) | RowChange::Conflict(_) => None,
    }
}

fn same_run(a: &RowChange, b: &RowChange) -> bool {
    match (a, b) {
        (RowChange::Update { table: ta, new: na, .. }, RowChange::Update { table: tb, new: nb, .. }) => {
            ta == tb && na.len() == nb.len() && na.iter().zip(nb).all(|(x, y)| matches!(x, Value::Unchanged) == matches!(y, Value::Unchanged))
        }
        (RowChange::Delete { table: ta, .. }, RowChange::Delete { table: tb, .. }) => ta == tb,
        _ => false,
    }
}

/// The keys a change touches: the one it finds its row by and, for an update
/// that changes the key, the one it gives the row.
fn change_keys(m: &Mapping, c: &RowChange) -> Option<Vec<Vec<String>>> {
    let ks = m.key_src.as_ref()?;
    let text = |vals: &[Value], k: usize| vals.get(k).and_then(|v| v.as_text()).unwrap_or("").to_string();
    let (found_by, new) = match c {
        RowChange::Update { old: Some(o), new, .. } => (&o.values, Some(new)),
        RowChange::Update { new, .. } => (new, None),
        RowChange::Delete { old, .. } => (&old.values, None),
        _ => return None,
    };
    let old_key: Vec<String> = ks.iter().map(|k| text(found_by, *k)).collect();
    let mut keys = vec![old_key.clone()];
    if let Some(new) = new {
        // An unchanged (TOASTed) key value is the old one.
        let new_key: Vec<String> =
            ks.iter().zip(&old_key).map(|(k, o)| if matches!(new.get(*k), Some(Value::Unchanged)) { o.clone() } else { text(new, *k) }).collect();
        if new_key != old_key {
            keys.push(new_key);
        }
    }
    Some(keys)
}

impl Applier {
    /// Author commit LSN of the last ChangeSet committed from this stream
    /// (0 = none): its identity, checked against the sender's log (R4).
    pub async fn committed_lsn(&self) -> Result<u64, EngineError> {
        let row = self
            .conn
            .client
            .query_opt("SELECT lsn FROM branchsync.progress WHERE stream = $1", &[&self.stream])
            .await
            .map_err(EngineError::pg("reading stream progress"))?;
        Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64).unwrap_or(0))
    }

    /// The sender's `system_identifier` recorded for this stream at its first
    /// handshake (R4), if any.
    pub async fn stream_system_id(&self) -> Result<Option<String>, EngineError> {
        let row = self
            .conn
            .client
            .query_opt("SELECT system_id FROM branchsync.progress WHERE stream = $1", &[&self.stream])
            .await
            .map_err(EngineError::pg("reading the stream identity"))?;
        Ok(row.and_then(|r| r.get::<_, Option<String>>(0)))
    }

    /// This database's clock (µs since the Unix epoch): clock offsets are
    /// measured between databases, whose commit times the stamps come from.
    pub async fn db_clock_us(&self) -> Result<i64, EngineError> {
        let row = self
            .conn
            .client
            .query_one("SELECT (extract(epoch from clock_timestamp()) * 1000000)::int8", &[])
            .await
            .map_err(EngineError::pg("reading the database clock"))?;
        Ok(row.get(0))
    }

    /// Branch: records the clock offset the main measured (this database's
    /// clock minus the main's), effective from now, when it differs from the
    /// last one by more than `tolerance_us` (R14).
    pub async fn record_clock_offset(&self, offset_us: i64, tolerance_us: i64) -> Result<bool, EngineError> {
        let n = self
            .conn
            .client
            .execute(
                "INSERT INTO branchsync.clock_offsets (at_us, offset_us) \
                 SELECT (extract(epoch from clock_timestamp()) * 1000000)::int8, $1 \
                 WHERE abs($1 - coalesce((SELECT offset_us FROM branchsync.clock_offsets ORDER BY at_us DESC LIMIT 1), 0)) > $2 \
                    OR NOT EXISTS (SELECT 1 FROM branchsync.clock_offsets)",
                &[&offset_us, &tolerance_us],
            )
            .await
            .map_err(EngineError::pg("recording the clock offset"))?;
        Ok(n > 0)
    }

    /// Main: when the branch of this stream was last connected (µs on this
    /// database's clock; `None` before its first session).
    pub async fn last_contact_us(&self) -> Result<Option<i64>, EngineError> {
        let row = self
            .conn
            .client
            .query_opt("SELECT (extract(epoch from last_contact) * 1000000)::int8 FROM branchsync.progress WHERE stream = $1", &[&self.stream])
            .await
            .map_err(EngineError::pg("reading the stream's last contact"))?;
        Ok(row.and_then(|r| r.get::<_, Option<i64>>(0)))
    }

    /// Main: the branch of this stream is connected now.
    pub async fn touch_contact(&self) -> Result<(), EngineError> {
        self.conn
            .client
            .execute(
                "INSERT INTO branchsync.progress (stream, pos, last_contact) VALUES ($1, 0, now()) \
                 ON CONFLICT (stream) DO UPDATE SET last_contact = now()",
                &[&self.stream],
            )
            .await
            .map_err(EngineError::pg("recording the stream's last contact"))?;
        Ok(())
    }

    /// Records the sender's `system_identifier` for this stream.
    pub async fn set_stream_system_id(&self, system_id: u64) -> Result<(), EngineError> {
        self.conn
            .client
            .execute(
                "INSERT INTO branchsync.progress (stream, pos, system_id) VALUES ($1, 0, $2) \
                 ON CONFLICT (stream) DO UPDATE SET system_id = excluded.system_id",
                &[&self.stream, &system_id.to_string()],
            )
            .await
            .map_err(EngineError::pg("recording the stream identity"))?;
        Ok(())
    }

    /// The identity (epoch) of the sender's log this stream's progress
    /// counts in (R26); `None` before it is first recorded.
    pub async fn stream_epoch(&self) -> Result<Option<u64>, EngineError> {
        let row = self
            .conn
            .client
            .query_opt("SELECT epoch FROM branchsync.progress WHERE stream = $1", &[&self.stream])
            .await
            .map_err(EngineError::pg("reading the stream's log identity"))?;
        Ok(row.and_then(|r| r.get::<_, Option<String>>(0)).and_then(|e| u64::from_str_radix(&e, 16).ok()))
    }

    /// When a join retired the sender's log `epoch` for this stream.
    pub async fn log_retired_at(&self, epoch: u64) -> Result<Option<String>, EngineError> {
        crate::state::retired_at(&self.conn.client, &self.stream, epoch).await
    }

    /// Records the identity of the sender's log for this stream.
    pub async fn set_stream_epoch(&self, epoch: u64) -> Result<(), EngineError> {
        self.conn
            .client
            .execute(
                "INSERT INTO branchsync.progress (stream, pos, epoch) VALUES ($1, 0, $2) \
                 ON CONFLICT (stream) DO UPDATE SET epoch = excluded.epoch",
                &[&self.stream, &format!("{epoch:016x}")],
            )
            .await
            .map_err(EngineError::pg("recording the stream's log identity"))?;
        Ok(())
    }
}

/// Cuts received entries into slices of at most `max_bytes` of bodies, in
/// order; an entry larger than that is a slice of its own.
fn slices(wire: Vec<WireEntry>, max_bytes: u64) -> Vec<Vec<WireEntry>> {
    let mut out: Vec<Vec<WireEntry>> = Vec::new();
    let mut bytes = 0u64;
    for w in wire {
        let len = w.body.len() as u64;
        match out.last_mut() {
            Some(last) if !last.is_empty() && bytes + len <= max_bytes => {
                bytes += len;
                last.push(w);
            }
            _ => {
                bytes = len;
                out.push(vec![w]);
            }
        }
    }
    out
}

#[cfg(test)]
mod slice_tests {
    use super::{slices, WireEntry};

    fn w(pos: u64, len: usize) -> WireEntry {
        WireEntry { pos, part: 0, last: true, body: vec![0; len] }
    }

    #[test]
    fn received_entries_are_cut_in_order_into_slices_no_larger_than_the_limit_but_a_large_entry_goes_alone() {
        let cut = slices(vec![w(1, 3), w(2, 3), w(3, 5), w(4, 11), w(5, 1), w(6, 10)], 10);
        let shape: Vec<Vec<u64>> = cut.iter().map(|s| s.iter().map(|e| e.pos).collect()).collect();
        assert_eq!(shape, [vec![1, 2], vec![3], vec![4], vec![5], vec![6]]);
        assert!(slices(Vec::new(), 10).is_empty());
        let one = slices(vec![w(1, 4), w(2, 4), w(3, 2)], 10);
        assert_eq!(one.len(), 1, "entries that fit together stay one slice");
    }
}
