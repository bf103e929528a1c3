//! Capture: drains this node's logical slot into the local [`ChangeLog`].
//!
//! ```text
//!  PostgreSQL WAL --pgoutput--> pg_logical_slot_peek_binary_changes (streamed rows)
//!        --> decode --> ChangeSets (fragments of ≤ fragment_rows rows)
//!        --> ChangeLog::append ... ChangeLog::flush (durable)
//!        --> pg_replication_slot_advance(end LSN of the last whole transaction)
//! ```
//!
//! One task owns the slot's connection (and a second one for writing
//! tombstones back while the slot is being read). Each poll peeks at most
//! `batch_changes` changes (whole transactions), streaming the rows, so a
//! transaction of a million rows is written to the log fragment by fragment
//! and never sits in memory whole. Fragments are cut at `fragment_rows`
//! rows or `fragment_bytes` bytes, whichever comes first; one row larger
//! than that is a fragment of its own, up to `max_row_bytes` (R24).
//!
//! # Crash safety
//!
//! The slot is confirmed only after the log write is durable (R1): a crash
//! before the advance makes the slot deliver the transaction again, and it
//! is recognised by its commit LSN (at most the log's `captured_lsn`) and
//! dropped before any fragment is written. A crash in the middle of a large
//! transaction leaves invisible fragments, which the log removes on open;
//! an error in the middle of one (PostgreSQL restarting, the connection
//! lost, the disk full) leaves them too, and [`run_capture`] cuts the log
//! back to the last whole transaction before it reads the slot again.
//! Capture runs with `statement_timeout = 0`, whatever its role or database
//! say: the peek of a large transaction must never be cancelled halfway on
//! every retry.
//!
//! # Progress tracking
//!
//! The log's `captured_lsn` and last hybrid-clock stamp move in the same
//! atomic batch as the transaction's last fragment. The slot position is
//! only a lower bound of what was captured: PostgreSQL persists it lazily.
//!
//! # Who wrote what (R3)
//!
//! Every apply transaction starts each ChangeSet, or each group of
//! ChangeSets whose rows it writes with one statement per table, with a
//! transactional logical message `branchsync.apply` holding the authors'
//! headers (and, for a group, how many rows of each table are whose). At a
//! branch such transactions are skipped (they came from the main). At the
//! main they are kept and split at those messages and by those counts, each
//! segment keeping its original author's header, so the main's log is the
//! relay. In both cases
//! the author's stamp is merged into this node's hybrid clock, so a local
//! change made after seeing a remote one always carries a larger stamp.
//!
//! # Only branchsync speaks for branchsync (R25)
//!
//! A mark counts only when it is sealed ([`crate::marks`]): with the
//! daemon's key, bound to the transaction, and — for an apply mark — in a
//! transaction under the replication origin of the author it names. Any
//! other message with a branchsync prefix is ignored: its transaction is
//! captured as an ordinary one, and the event is counted in
//! [`CaptureStatus::forged_marks`] and logged once per prefix.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use branchsync_proto::{ChangeSetHeader, ConflictRecord, DdlChange, LogEntry, OldRow, RowChange, TableDef, TableDesc, Value, Verdict};
use futures::TryStreamExt;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::clock::{next_stamp, PG_EPOCH_OFFSET_US};
use crate::ddl::{parse, DdlMessage, DDL_MESSAGE_PREFIX};
use crate::log::{ChangeLog, Completion};
use crate::marks::{self, RowHasher, RowsDigest};
use crate::pg::{self, fmt_lsn};
use crate::pgoutput::{self, OldTuple, PgOutputMessage, Relation, ReplicaIdentity};
use crate::scope::Scope;

pub(crate) mod stream;
use crate::state::{origin_name, ApplyGroup, GroupedRows, APPLY_MESSAGE_PREFIX, PROBE_PREFIX, CONFLICT_MESSAGE_PREFIX, VERDICT_MESSAGE_PREFIX};
use crate::{failpoints, EngineError, Role};

/// How capture runs.
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// This node's name (author of local ChangeSets).
    pub node: String,
    /// This node's index.
    pub node_index: u32,
    /// Main (keeps applied transactions: the relay) or branch (skips them).
    pub role: Role,
    /// This cluster's system identifier.
    pub system_id: u64,
    /// What is replicated.
    pub scope: Scope,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Rows per log fragment.
    pub fragment_rows: usize,
    /// Bytes (roughly, encoded) per log fragment.
    pub fragment_bytes: usize,
    /// Largest row (encoded) captured; a larger one stops capture until
    /// the operator records that it may be skipped (R24).
    pub max_row_bytes: usize,
    /// The daemon's mark key (the log's, R25).
    pub mark_key: Vec<u8>,
    /// Pause between polls when the slot had nothing.
    pub poll_interval: Duration,
    /// `upto_nchanges` of one peek.
    pub batch_changes: i32,
    /// A branch under `[ddl] from = "main"`: its own DDL stays local (it is
    /// counted, not logged), so the main never receives it.
    pub ddl_local_only: bool,
    /// Read the slot over the streaming replication protocol ([`stream`])
    /// instead of peeking at it.
    pub stream: bool,
    /// The table rules: an update that changed only site-local columns
    /// (`[[tables]] local`) is not captured.
    pub tables: crate::conflict::TableRules,
}

/// Counters for status.
#[derive(Debug, Clone, Default)]
pub struct CaptureStatus {
    /// Commit LSN of the last captured transaction.
    pub captured_lsn: u64,
    /// Commit time of the last captured transaction (Unix µs).
    pub last_commit_ts_us: i64,
    /// Transactions written to the log in this run.
    pub transactions: u64,
    /// Row changes written to the log in this run.
    pub rows: u64,
    /// Transactions skipped because branchsync applied them (branch only).
    pub skipped_applied: u64,
    /// DDL query strings written to the log.
    pub ddl_captured: u64,
    /// Local DDL kept local (`[ddl] from = "main"` at a branch): schema drift.
    pub ddl_kept_local: u64,
    /// Updates not captured because they changed only site-local columns
    /// (a document counter taking a number).
    pub local_only_updates: u64,
    /// DDL that ran but cannot be replicated (inside a function called by a
    /// query, or a string the parser rejects); see the log for which.
    pub ddl_unreplicable: u64,
    /// Everything committed before this WAL position is in the log and its
    /// tombstones are written back.
    pub caught_up_lsn: u64,
    /// Messages with a branchsync prefix that were not branchsync's own
    /// (R25): ignored, their transactions captured as ordinary ones.
    pub forged_marks: u64,
    /// The same, per prefix.
    pub forged_by_prefix: BTreeMap<String, u64>,
    /// Rows larger than `max_row_bytes` skipped as the operator recorded.
    pub rows_skipped: u64,
    /// Main, after `init --restored`: ChangeSets applied again but not
    /// relayed again (the relay log holds them).
    pub relay_suppressed: u64,
    /// Main: branch ChangeSets relayed with [`LogEntry::echo_as_sent`] (the
    /// main wrote exactly the rows their author sent).
    pub relayed_as_sent: u64,
    /// Bytes of pgoutput messages received (rows, table descriptions,
    /// begins and commits; rows of transactions capture skips are not
    /// counted), to compare with the log's size.
    pub pgoutput_bytes: u64,
    /// Capture is connected and reading the slot.
    pub running: bool,
}

/// Largest pgoutput message after which the slot's connection is opened
/// anew: its read buffer grew to the message's size and would stay so.
const RECONNECT_AFTER_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Messages larger than this are not sent by PostgreSQL on the first read
/// of a batch: most are rows of transactions capture skips (a branch's own
/// apply transactions, echoes of large rows that arrive as updates carrying
/// the old row too). One that is needed makes capture read the batch again
/// in full.
const TRUNCATE_OVER_BYTES: i32 = 64 * 1024 * 1024;

/// In a full read, the server cuts every message into pieces of this many
/// bytes, which capture puts back together in a buffer of exactly the
/// message's size (the client library's buffer would otherwise grow by
/// doubling to hold a large message whole).
const PIECE_BYTES: i32 = 16 * 1024 * 1024;

/// The slot's messages, each whole (the first read of a batch: messages
/// larger than `$4` bytes come as NULL).
const PEEK_SQL: &str = "SELECT CASE WHEN $4 > 0 AND octet_length(data) > $4 THEN NULL ELSE data END, 1::int4, 1::int4 \
     FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, 'proto_version', '1', 'publication_names', $3, 'messages', 'true')";

/// The slot's messages in pieces of at most `$4` bytes, in order: piece
/// number and the message's whole size come with each.
const PEEK_PIECES_SQL: &str = "SELECT substring(o.data from (g.i - 1) * $4 + 1 for $4), g.i, octet_length(o.data) \
     FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, 'proto_version', '1', 'publication_names', $3, 'messages', 'true') WITH ORDINALITY AS o(lsn, xid, data, n) \
     CROSS JOIN LATERAL generate_series(1, greatest(1, (octet_length(o.data) + $4 - 1) / $4)) AS g(i)";

/// How a read of the slot ended.
pub enum Batch {
    /// End LSN of the last whole transaction read, and how many were read.
    Read(Option<(u64, u64)>),
    /// A message left out for its size is needed: read the batch again, in
    /// full.
    NeedFull,
}

/// Pending tombstones are written back once they hold this many rows.
const TOMBSTONE_BATCH_ROWS: usize = 5_000;
/// ... or this many bytes of deleted rows.
const TOMBSTONE_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A segment of a transaction: the changes of one ChangeSet.
struct Segment {
    header: ChangeSetHeader,
    part: u32,
    tables: Vec<TableDesc>,
    table_index: HashMap<u32, u32>,
    changes: Vec<RowChange>,
    /// Rough encoded size of `changes`.
    bytes: usize,
    /// The newest commit time of the main's log up to this transaction
    /// (relay only; 0 at branches).
    relay_ts_us: i64,
    /// At the main: the digest of the rows the author sent (its apply mark
    /// carries one for a ChangeSet of one fragment that only inserts), while
    /// everything decoded for the segment is an insert of its first
    /// fragment; `None` otherwise.
    sent: Option<RowsDigest>,
    /// The digest of the inserts decoded for it so far.
    got: RowsDigest,
    /// Per table index: where its rows' hashes start ([`RowHasher::table`]).
    table_hashes: Vec<Option<u64>>,
}

impl Segment {
    fn new(header: ChangeSetHeader, relay_ts_us: i64) -> Segment {
        Segment {
            header,
            part: 0,
            tables: Vec::new(),
            table_index: HashMap::new(),
            changes: Vec::new(),
            bytes: 0,
            relay_ts_us,
            sent: None,
            got: RowsDigest::default(),
            table_hashes: Vec::new(),
        }
    }

    /// Counts a change pushed to the segment against the digest of what its
    /// author sent: only inserts of the first fragment count, anything else
    /// means the main did more than write what was sent.
    fn count_sent(&mut self, hasher: Option<&RowHasher>, ch: &RowChange) {
        let (Some(hasher), Some(_)) = (hasher, self.sent) else { return };
        let RowChange::Insert { table, new } = ch else {
            self.sent = None;
            return;
        };
        if self.part > 0 || !self.got.add_insert(hasher, &mut self.table_hashes, &self.tables, *table, new) {
            self.sent = None;
        }
    }

    /// Index of a table description given whole (verdicts carry their own).
    fn table_desc(&mut self, desc: TableDesc) -> u32 {
        if let Some(i) = self.tables.iter().position(|d| *d == desc) {
            return i as u32;
        }
        self.tables.push(desc);
        (self.tables.len() - 1) as u32
    }

    /// Index of `rel`'s description (`desc`, built from its latest
    /// relation message) in this ChangeSet.
    fn table(&mut self, rel: &Relation, desc: &TableDesc) -> u32 {
        if let Some(i) = self.table_index.get(&rel.oid) {
            // The same table changed shape within this ChangeSet (DDL between
            // its rows): later rows get a description of their own.
            let same = self.tables.get(*i as usize).is_some_and(|d| d == desc);
            if same {
                return *i;
            }
        }
        let i = self.tables.len() as u32;
        self.tables.push(desc.clone());
        self.table_index.insert(rel.oid, i);
        i
    }

    /// Takes the pending changes as fragments of at most `rows` rows and
    /// about `bytes` bytes, the last one marked last. Every fragment carries
    /// every table description (the changes' indexes are already given).
    fn fragments(&mut self, log: &ChangeLog, rows: usize, bytes: usize) -> Vec<LogEntry> {
        let changes = std::mem::take(&mut self.changes);
        let mut out = Vec::new();
        let mut piece = Vec::new();
        let mut size = 0usize;
        for ch in changes {
            let b = ch.approx_bytes();
            if !piece.is_empty() && (piece.len() >= rows || size + b > bytes) {
                self.changes = std::mem::take(&mut piece);
                let tables = self.tables.clone();
                out.push(self.fragment(log, false));
                self.tables = tables;
                size = 0;
            }
            size += b;
            piece.push(ch);
        }
        self.changes = piece;
        out.push(self.fragment(log, true));
        out
    }

    /// Takes the pending changes as a fragment.
    fn fragment(&mut self, log: &ChangeLog, last: bool) -> LogEntry {
        // The whole ChangeSet in one fragment, exactly the rows sent.
        let echo_as_sent = last && self.part == 0 && self.sent.is_some_and(|s| s == self.got);
        self.sent = None;
        self.table_hashes.clear();
        let e = LogEntry {
            pos: log.allocate_pos(),
            header: self.header.clone(),
            part: self.part,
            last,
            tables: std::mem::take(&mut self.tables),
            changes: std::mem::take(&mut self.changes),
            relay_ts_us: self.relay_ts_us,
            echo_as_sent,
        };
        self.table_index.clear();
        self.bytes = 0;
        self.part += 1;
        e
    }
}

/// A ChangeSet of an apply group waiting for its rows ([`ApplyGroup`]):
/// every ChangeSet of the group but the last.
struct Held {
    segment: Segment,
    /// Rows of each table still to come for it.
    rows_left: Vec<GroupedRows>,
    /// The relay log holds it already (see [`Txn::suppressing`]).
    suppressing: bool,
}

/// Takes one row of `schema.table` from the first count that expects one.
fn take_row(left: &mut [GroupedRows], schema: &str, table: &str) -> bool {
    match left.iter_mut().find(|(s, t, n)| *n > 0 && s == schema && t == table) {
        Some(c) => {
            c.2 -= 1;
            true
        }
        None => false,
    }
}

/// A local delete waiting for its tombstone.
struct LocalDelete {
    schema: String,
    table: String,
    columns: Vec<String>,
    old: Vec<Value>,
    stamp: u64,
    commit_ts_us: i64,
}

/// A row larger than `max_row_bytes` that the operator allowed to skip.
struct SkippedRow {
    table: String,
    key: String,
    bytes: usize,
    commit_lsn: u64,
}

/// The transaction being decoded.
struct Txn {
    commit_lsn: u64,
    commit_ts_us: i64,
    /// Transaction id (marks are bound to it, R25).
    xid: u32,
    /// Replication origin the transaction was written under.
    origin: Option<String>,
    /// Already in the log (re-delivered after a crash, R1).
    duplicate: bool,
    /// Written by branchsync's apply, skipped at a branch (R3).
    applied_here: bool,
    /// The current segment is a ChangeSet the relay log holds already
    /// (a restored main applied it again): not logged a second time.
    suppressing: bool,
    segment: Segment,
    /// Earlier ChangeSets of the current apply group, in order, still
    /// expecting rows: while any is here, `segment` is not cut into
    /// fragments (its fragments must follow theirs in the log).
    held: std::collections::VecDeque<Held>,
    /// Held ChangeSets taken off the front of `held` in this group.
    held_popped: usize,
    /// Per table (schema, name): the first held ChangeSet (counted from the
    /// group's first, popped ones included) that may still expect one of
    /// its rows. Those before it expect none and, counts only going down,
    /// never will: an insert does not scan them again (a group of thousands
    /// of ChangeSets made that scan quadratic).
    held_cursors: Vec<(String, String, usize)>,
    /// Rows of each table still to come for `segment` in its group (`None`:
    /// every row up to the next mark).
    rows_left: Option<Vec<GroupedRows>>,
    /// Query strings (message keys) whose DDL went to the log whole at their
    /// first firing (positions not exact, R19).
    ddl_seen: std::collections::HashSet<String>,
    /// Finished fragments waiting for the commit.
    done: Vec<LogEntry>,
    rows: u64,
}

/// Capture state kept across polls.
pub struct Capturer {
    cfg: CaptureConfig,
    log: Arc<ChangeLog>,
    /// Each relation announced by the stream, with whether it is
    /// replicated (the scope's patterns matched once per relation message,
    /// not once per row).
    relations: HashMap<u32, (Relation, bool, TableDesc)>,
    /// Per relation with site-local columns: which columns are local.
    local_masks: HashMap<u32, Vec<bool>>,
    captured_lsn: u64,
    last_stamp: u64,
    /// Branch: the relay time of the last relay entry applied here, in
    /// commit order (the causal context of the next local change, R15).
    /// Main: the relay time of the newest entry written (see `Begin`).
    seen_main_ts: i64,
    /// This node's clock offsets (R14): `(from local time µs, offset µs)`,
    /// ascending.
    offsets: Vec<(i64, i64)>,
    /// Deletes of local ChangeSets whose tombstones are still to be
    /// written back, and their size.
    tombstones: Vec<LocalDelete>,
    tombstone_bytes: usize,
    /// Key of the marks the event triggers write (`branchsync.mark_key`).
    ddl_key: Option<Vec<u8>>,
    /// Prefixes already warned about (forged marks are logged once each).
    warned: HashSet<String>,
    /// Commit LSNs whose too-large rows the operator allowed to skip.
    skips: HashSet<u64>,
    /// Rows skipped, to record in `branchsync.conflicts`.
    skipped: Vec<SkippedRow>,
    /// Largest slot message of the current poll.
    largest_message: usize,
    /// The current poll logged a transaction of several fragments.
    fragmented: bool,
    /// Main, after `init --restored`: ChangeSets the relay log holds already.
    suppress: HashSet<(String, u64)>,
    /// Primary keys of tables, for tombstones (cleared every poll).
    pk_cache: HashMap<(String, String), Option<crate::catalog::LocalTable>>,
    /// Messages the last peek returned (fewer than the limit: drained).
    peeked: i64,
    /// Position of the newest probe read ([`PROBE_PREFIX`]).
    probe_lsn: u64,
    /// Position of the newest non-transactional branchsync-prefixed message
    /// counted as forged: a peek that ends between such a message and the
    /// next commit confirms the slot only up to that commit's predecessor,
    /// so the next peek decodes the message again; it is counted once.
    nontx_counted_lsn: u64,
    txn: Option<Txn>,
    /// Main: hashes decoded rows to compare with the digests apply marks
    /// carry (see [`RowsDigest`]).
    row_hasher: Option<RowHasher>,
    /// Status counters.
    pub status: CaptureStatus,
}

impl Capturer {
    /// Capture state on top of `log`.
    pub fn new(cfg: CaptureConfig, log: Arc<ChangeLog>) -> Result<Capturer, EngineError> {
        let captured_lsn = log.captured_lsn()?;
        let last_stamp = log.last_stamp()?;
        let seen_main_ts = log.seen_main_ts()?;
        let row_hasher = (cfg.role == Role::Main).then(|| RowHasher::new(&cfg.mark_key));
        Ok(Capturer {
            cfg,
            log,
            relations: HashMap::new(),
            local_masks: HashMap::new(),
            captured_lsn,
            last_stamp,
            seen_main_ts,
            offsets: Vec::new(),
            tombstones: Vec::new(),
            tombstone_bytes: 0,
            ddl_key: None,
            warned: HashSet::new(),
            skips: HashSet::new(),
            skipped: Vec::new(),
            suppress: HashSet::new(),
            largest_message: 0,
            fragmented: false,
            pk_cache: HashMap::new(),
            peeked: 0,
            probe_lsn: 0,
            nontx_counted_lsn: 0,
            txn: None,
            row_hasher,
            status: CaptureStatus { captured_lsn, ..Default::default() },
        })
    }

    /// This node's clock offset in effect at local time `ts_us` (R14).
    pub fn offset_at(offsets: &[(i64, i64)], ts_us: i64) -> i64 {
        offsets.iter().rev().find(|(at, _)| *at <= ts_us).map(|(_, o)| *o).unwrap_or(0)
    }

    fn local_header(&mut self, commit_lsn: u64, commit_ts_us: i64) -> ChangeSetHeader {
        // The commit time on the main's clock, never below what was seen.
        let corrected = commit_ts_us - Capturer::offset_at(&self.offsets, commit_ts_us);
        self.last_stamp = next_stamp(self.last_stamp, corrected);
        ChangeSetHeader {
            author: self.cfg.node.clone(),
            author_index: self.cfg.node_index,
            system_id: self.cfg.system_id,
            commit_lsn,
            commit_ts_us,
            stamp: self.last_stamp,
            seen_main_ts: if self.cfg.role == Role::Branch { self.seen_main_ts } else { 0 },
        }
    }

    /// Handles one decoded message; returns the end LSN when a transaction
    /// commits.
    fn handle(&mut self, msg: PgOutputMessage) -> Result<Option<u64>, EngineError> {
        match msg {
            PgOutputMessage::Begin(b) => {
                let ts = b.commit_ts + PG_EPOCH_OFFSET_US;
                let duplicate = b.final_lsn <= self.captured_lsn;
                let header = self.local_header(b.final_lsn, ts);
                let suppressing = self.suppress.contains(&(header.author.clone(), header.commit_lsn));
                // The relay time is the running maximum of commit times in
                // log order, not the commit time itself: commit times are
                // not monotonic in commit order (a backend takes its time
                // before it inserts its commit record), and the main caps
                // what a branch claims to have seen of the relay at the
                // relay time of the newest entry sent to it, which must
                // bound every entry before it. At the main, `seen_main_ts`
                // holds this maximum (persisted with each completion).
                let relay_ts = if self.cfg.role == Role::Main {
                    self.seen_main_ts = self.seen_main_ts.max(ts);
                    self.seen_main_ts
                } else {
                    0
                };
                self.txn = Some(Txn {
                    commit_lsn: b.final_lsn,
                    commit_ts_us: ts,
                    xid: b.xid,
                    origin: None,
                    duplicate,
                    applied_here: false,
                    suppressing,
                    segment: Segment::new(header, relay_ts),
                    held: Default::default(),
                    held_popped: 0,
                    held_cursors: Vec::new(),
                    rows_left: None,
                    ddl_seen: Default::default(),
                    done: Vec::new(),
                    rows: 0,
                });
            }
            PgOutputMessage::Relation(r) => {
                let in_scope = self.cfg.scope.includes(&r.namespace, &r.name);
                // Described once per relation message: every ChangeSet of
                // the table shares the description.
                let desc = TableDesc::from(TableDef {
                    schema: r.namespace.clone(),
                    name: r.name.clone(),
                    columns: r.columns.iter().map(|c| c.name.clone()).collect(),
                    key: r.columns.iter().map(|c| c.is_key()).collect(),
                    identity_full: r.replica_identity == ReplicaIdentity::Full,
                });
                let local = &self.cfg.tables.for_table(&r.namespace, &r.name).local;
                if in_scope && !local.is_empty() {
                    self.local_masks.insert(r.oid, r.columns.iter().map(|c| local.contains(&c.name)).collect());
                } else {
                    self.local_masks.remove(&r.oid);
                }
                self.relations.insert(r.oid, (r, in_scope, desc));
            }
            PgOutputMessage::Type(_) => {}
            PgOutputMessage::Origin(o) => {
                if let Some(t) = self.txn.as_mut() {
                    t.origin = Some(o.name);
                }
            }
            PgOutputMessage::Message(m) => {
                if !m.prefix.starts_with("branchsync.") {
                    return Ok(None);
                }
                if m.prefix == PROBE_PREFIX && !m.transactional() {
                    self.probe_lsn = self.probe_lsn.max(m.lsn);
                    return Ok(None);
                }
                if !m.transactional() {
                    if m.lsn > self.nontx_counted_lsn {
                        self.nontx_counted_lsn = m.lsn;
                        self.forged(&m.prefix, m.lsn, "it is not transactional");
                    }
                    return Ok(None);
                }
                let Some(txn) = self.txn.as_ref() else { return Ok(None) };
                if txn.duplicate {
                    return Ok(None);
                }
                let (xid, under_origin) = (txn.xid, txn.origin.as_deref().is_some_and(|o| o.starts_with("branchsync_")));
                let prefix = m.prefix.as_str();
                if prefix == DDL_MESSAGE_PREFIX {
                    // The event trigger's key for DDL that ran here; the
                    // daemon's for DDL that apply replayed (R25).
                    let key = if under_origin { Some(self.cfg.mark_key.as_slice()) } else { self.ddl_key.as_deref() };
                    let Some(body) = key.and_then(|k| marks::open_text(k, prefix, xid, &m.content)) else {
                        self.forged(prefix, m.lsn, "its seal does not hold");
                        return Ok(None);
                    };
                    let body = body.to_vec();
                    self.ddl_message(&body, m.lsn)?;
                    return Ok(None);
                }
                let known = [APPLY_MESSAGE_PREFIX, VERDICT_MESSAGE_PREFIX, CONFLICT_MESSAGE_PREFIX].contains(&prefix);
                let Some(body) = (known && under_origin).then(|| marks::open(&self.cfg.mark_key, prefix, xid, &m.content)).flatten() else {
                    let why = if !known { "branchsync writes no such message" } else if !under_origin { "its transaction was not written by branchsync's apply" } else { "its seal does not hold" };
                    self.forged(prefix, m.lsn, why);
                    return Ok(None);
                };
                let body = body.to_vec();
                if prefix != APPLY_MESSAGE_PREFIX {
                    self.decision_message(prefix, &body, m.lsn)?;
                    return Ok(None);
                }
                let Ok(marks) = ApplyGroup::decode(&body) else {
                    self.forged(prefix, m.lsn, "its content does not decode");
                    return Ok(None);
                };
                // At the main every applied transaction is under its
                // author's origin; at a branch, under the relay's.
                let relay = self.cfg.role == Role::Branch && txn.origin.as_deref() == Some(crate::state::RELAY_ORIGIN);
                if !relay && marks.iter().any(|(mark, _)| txn.origin.as_deref() != Some(origin_name(&mark.header.author).as_str())) {
                    self.forged(prefix, m.lsn, "it names another author than its transaction's origin");
                    return Ok(None);
                }
                let Some(txn) = self.txn.as_mut() else { return Ok(None) };
                for (mark, _) in &marks {
                    // Hybrid clock: never stamp below what this node has seen.
                    self.last_stamp = self.last_stamp.max(mark.header.stamp);
                }
                match self.cfg.role {
                    Role::Branch => {
                        txn.applied_here = true;
                        // Local transactions committed after this one have
                        // seen the main up to these relay entries (R15).
                        for (mark, _) in &marks {
                            self.seen_main_ts = self.seen_main_ts.max(mark.relay_ts_us);
                        }
                    }
                    Role::Main => {
                        txn.ddl_seen.clear();
                        // The previous group is whole: its rows came before
                        // this mark.
                        close_group(txn, &self.log, self.cfg.fragment_rows, self.cfg.fragment_bytes);
                        let relay_ts = txn.segment.relay_ts_us;
                        let n = marks.len();
                        for (i, (mark, rows)) in marks.into_iter().enumerate() {
                            let suppressing = self.suppress.contains(&(mark.header.author.clone(), mark.header.commit_lsn));
                            if suppressing {
                                self.status.relay_suppressed += 1;
                            }
                            let sent = mark.sent;
                            let mut segment = Segment::new(mark.header, relay_ts);
                            segment.sent = sent;
                            if i + 1 < n {
                                txn.held.push_back(Held { segment, rows_left: rows.unwrap_or_default(), suppressing });
                            } else {
                                txn.segment = segment;
                                txn.rows_left = rows;
                                txn.suppressing = suppressing;
                            }
                        }
                    }
                }
            }
            PgOutputMessage::Commit(c) => {
                let Some(mut txn) = self.txn.take() else { return Ok(Some(c.end_lsn)) };
                if txn.duplicate {
                    return Ok(Some(c.end_lsn));
                }
                if txn.applied_here {
                    self.status.skipped_applied += 1;
                } else {
                    close_group(&mut txn, &self.log, self.cfg.fragment_rows, self.cfg.fragment_bytes);
                }
                let completion = Completion { captured_lsn: c.commit_lsn, stamp: self.last_stamp, seen_main_ts: self.seen_main_ts };
                self.log.append(&txn.done, Some(completion))?;
                self.captured_lsn = c.commit_lsn;
                self.status.relayed_as_sent += txn.done.iter().filter(|e| e.echo_as_sent).count() as u64;
                if !txn.done.is_empty() {
                    self.status.transactions += 1;
                    self.status.rows += txn.rows;
                }
                self.status.captured_lsn = c.commit_lsn;
                self.status.last_commit_ts_us = txn.commit_ts_us;
                tracing::debug!(lsn = %fmt_lsn(txn.commit_lsn), fragments = txn.done.len(), rows = txn.rows, "transaction captured");
                return Ok(Some(c.end_lsn));
            }
            change @ (PgOutputMessage::Insert(_) | PgOutputMessage::Update(_) | PgOutputMessage::Delete(_) | PgOutputMessage::Truncate(_)) => {
                let Some(txn) = self.txn.as_mut() else { return Ok(None) };
                if txn.duplicate || txn.applied_here {
                    return Ok(None);
                }
                // A relation and whether it is replicated, in one lookup.
                let rel_of = |oid: u32| -> Result<(&Relation, bool, &TableDesc), EngineError> {
                    self.relations.get(&oid).map(|(r, s, d)| (r, *s, d)).ok_or_else(|| EngineError::Corrupt(format!("row change for unknown relation {oid}")))
                };
                // In an apply group, an insert belongs to the first
                // ChangeSet still expecting a row of its table; anything
                // else, and a row beyond every count, to the last one.
                let mut target = None;
                if let PgOutputMessage::Insert(i) = &change {
                    let (r, _, _) = rel_of(i.rel)?;
                    let cursor = txn.held_cursors.iter().position(|c| c.0 == r.namespace && c.1 == r.name);
                    let start = cursor.map_or(0, |c| txn.held_cursors[c].2.saturating_sub(txn.held_popped));
                    target = txn.held.iter_mut().skip(start).position(|h| take_row(&mut h.rows_left, &r.namespace, &r.name)).map(|p| p + start);
                    let next = txn.held_popped + target.unwrap_or(txn.held.len());
                    match cursor {
                        Some(c) => txn.held_cursors[c].2 = next,
                        None => txn.held_cursors.push((r.namespace.clone(), r.name.clone(), next)),
                    }
                    if target.is_none() {
                        if let Some(left) = txn.rows_left.as_mut() {
                            take_row(left, &r.namespace, &r.name);
                        }
                    }
                }
                let seg = match target {
                    Some(i) => &mut txn.held[i].segment,
                    None => &mut txn.segment,
                };
                // This node's own change (not one apply made for a peer,
                // which the relay carries as it was sent).
                let own = seg.header.author == self.cfg.node;
                let pushed = match change {
                    PgOutputMessage::Insert(i) => {
                        let (r, in_scope, desc) = rel_of(i.rel)?;
                        in_scope.then(|| {
                            let t = seg.table(r, desc);
                            RowChange::Insert { table: t, new: i.new }
                        })
                    }
                    PgOutputMessage::Update(u) => {
                        let (r, in_scope, desc) = rel_of(u.rel)?;
                        in_scope.then(|| {
                            let t = seg.table(r, desc);
                            let old = u.old.map(|o| old_row(o));
                            let mut new = u.new;
                            // With the whole old row at hand (REPLICA
                            // IDENTITY FULL), an unchanged TOASTed value is
                            // known: send it, so no receiver has to guess (R12).
                            if let Some(o) = old.as_ref().filter(|o| o.full) {
                                for (n, v) in new.iter_mut().zip(&o.values) {
                                    if matches!(n, Value::Unchanged) && !matches!(v, Value::Unchanged) {
                                        *n = v.clone();
                                    }
                                }
                            }
                            // Only site-local columns changed (a counter
                            // took a number): nothing another site keeps
                            // changed, so nothing travels. Sent, it would
                            // lock the row at every receiver, where the
                            // ERP takes its numbers with NOWAIT.
                            let local_only = match (self.local_masks.get(&u.rel), old.as_ref().filter(|o| o.full)) {
                                (Some(mask), Some(o)) if own && o.values.len() == new.len() && mask.len() == new.len() => {
                                    new.iter().zip(&o.values).zip(mask).all(|((n, v), local)| *local || n == v)
                                }
                                _ => false,
                            };
                            if local_only {
                                self.status.local_only_updates += 1;
                                return None;
                            }
                            Some(RowChange::Update { table: t, old, new })
                        })
                        .flatten()
                    }
                    PgOutputMessage::Delete(d) => {
                        let (r, in_scope, desc) = rel_of(d.rel)?;
                        in_scope.then(|| {
                            let t = seg.table(r, desc);
                            RowChange::Delete { table: t, old: old_row(d.old) }
                        })
                    }
                    PgOutputMessage::Truncate(t) => {
                        let mut tables = Vec::new();
                        for oid in &t.rels {
                            let (r, in_scope, desc) = rel_of(*oid)?;
                            if in_scope {
                                tables.push(seg.table(r, desc));
                            }
                        }
                        (!tables.is_empty()).then(|| RowChange::Truncate { tables, cascade: t.cascade(), restart_identity: t.restart_identity() })
                    }
                    _ => None,
                };
                if let Some(ch) = pushed {
                    if let (RowChange::Delete { table, old }, Some(txn)) = (&ch, self.txn.as_ref()) {
                        if txn.segment.header.author == self.cfg.node {
                            if let Some(desc) = txn.segment.tables.get(*table as usize) {
                                self.tombstone_bytes += ch.approx_bytes();
                                self.tombstones.push(LocalDelete {
                                    schema: desc.schema.clone(),
                                    table: desc.name.clone(),
                                    columns: desc.columns.clone(),
                                    old: old.values.clone(),
                                    stamp: txn.segment.header.stamp,
                                    commit_ts_us: txn.commit_ts_us,
                                });
                            }
                        }
                    }
                    self.push_change_to(target, ch)?;
                    // Held ChangeSets whose rows are all here go to the log
                    // (as it fills, in order).
                    if let Some(txn) = self.txn.as_mut() {
                        while txn.held.front().is_some_and(|h| h.rows_left.iter().all(|c| c.2 == 0)) {
                            if let Some(mut h) = txn.held.pop_front() {
                                txn.held_popped += 1;
                                if !h.segment.changes.is_empty() {
                                    txn.done.extend(h.segment.fragments(&self.log, self.cfg.fragment_rows, self.cfg.fragment_bytes));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// A message with a branchsync prefix that is not branchsync's (R25):
    /// counted, logged once per prefix, otherwise ignored.
    fn forged(&mut self, prefix: &str, lsn: u64, why: &str) {
        self.status.forged_marks += 1;
        *self.status.forged_by_prefix.entry(prefix.to_string()).or_default() += 1;
        if self.warned.insert(prefix.to_string()) {
            tracing::warn!(
                lsn = %fmt_lsn(lsn),
                prefix,
                reason = why,
                "a logical message with a branchsync prefix was not written by branchsync; it is ignored and its transaction replicates as an ordinary one (later ones are counted in status)"
            );
        } else {
            tracing::debug!(lsn = %fmt_lsn(lsn), prefix, reason = why, "forged branchsync message ignored");
        }
    }

    /// Adds a change to the open transaction's segment; a full fragment goes
    /// to the log now, invisible until the transaction's last fragment is
    /// written. A row larger than `max_row_bytes` stops capture, unless the
    /// operator recorded that this transaction's large rows may be skipped.
    fn push_change(&mut self, ch: RowChange) -> Result<(), EngineError> {
        self.push_change_to(None, ch)
    }

    /// [`Capturer::push_change`] to the held ChangeSet `target` of the
    /// current apply group (`None`: the open segment). A held ChangeSet is
    /// cut into fragments when it goes to the log.
    fn push_change_to(&mut self, target: Option<usize>, ch: RowChange) -> Result<(), EngineError> {
        let Some(txn) = self.txn.as_mut() else { return Ok(()) };
        let suppressing = match target {
            Some(i) => txn.held.get(i).is_none_or(|h| h.suppressing),
            None => txn.suppressing,
        };
        if suppressing {
            return Ok(());
        }
        let size = ch.approx_bytes();
        if size > self.cfg.max_row_bytes {
            let (table, key) = describe_row(&txn.segment.tables, &ch);
            if self.skips.contains(&txn.commit_lsn) {
                tracing::warn!(table = %table, lsn = %fmt_lsn(txn.commit_lsn), bytes = size, "row larger than the largest branchsync carries skipped, as recorded by the operator");
                self.status.rows_skipped += 1;
                self.skipped.push(SkippedRow { table, key, bytes: size, commit_lsn: txn.commit_lsn });
                return Ok(());
            }
            return Err(EngineError::Stopped {
                message: format!("capture stopped: a row of {table} is {size} bytes, more than the largest branchsync carries ({} bytes)", self.cfg.max_row_bytes),
                detail: format!(
                    "Table {table}, key {key}, transaction {} committed at LSN {}. PostgreSQL hands a row to logical decoding as text, so a bytea value takes twice its size. Nothing after this transaction is captured until it is dealt with.",
                    txn.xid,
                    fmt_lsn(txn.commit_lsn)
                ),
                hint: format!(
                    "Store such values outside the replicated tables, or let capture skip this row: branchsync capture skip --lsn {} --config FILE. The skip is recorded in branchsync.conflicts (kind row_too_large); the rest of the transaction replicates.",
                    fmt_lsn(txn.commit_lsn)
                ),
            });
        }
        if let Some(h) = target.and_then(|i| txn.held.get_mut(i)) {
            h.segment.count_sent(self.row_hasher.as_ref(), &ch);
            h.segment.changes.push(ch);
            h.segment.bytes += size;
            txn.rows += 1;
            return Ok(());
        }
        let seg = &mut txn.segment;
        seg.count_sent(self.row_hasher.as_ref(), &ch);
        seg.changes.push(ch);
        seg.bytes += size;
        txn.rows += 1;
        if txn.held.is_empty() && (seg.changes.len() >= self.cfg.fragment_rows || seg.bytes >= self.cfg.fragment_bytes) {
            let f = seg.fragment(&self.log, false);
            txn.done.push(f);
            self.log.append(&txn.done, None)?;
            self.status.relayed_as_sent += txn.done.iter().filter(|e| e.echo_as_sent).count() as u64;
            txn.done.clear();
            self.fragmented = true;
            failpoints::hit(failpoints::CAPTURE_AFTER_FRAGMENT);
        }
        Ok(())
    }

    /// A `branchsync.ddl` message: the DDL statement(s) of the query string
    /// that ran where the message sits, in scope, placed among the rows.
    fn ddl_message(&mut self, content: &[u8], lsn: u64) -> Result<(), EngineError> {
        let Some(txn) = self.txn.as_mut() else { return Ok(()) };
        if txn.duplicate || txn.applied_here {
            return Ok(());
        }
        let msg: DdlMessage = match serde_json::from_slice(content) {
            Ok(m) => m,
            Err(e) => {
                self.status.ddl_unreplicable += 1;
                tracing::error!(lsn = %fmt_lsn(lsn), error = %e, "undecodable DDL message; this schema change is not replicated");
                return Ok(());
            }
        };
        let local = txn.segment.header.author == self.cfg.node;
        if local && self.cfg.ddl_local_only {
            self.status.ddl_kept_local += 1;
            tracing::warn!(lsn = %fmt_lsn(lsn), tag = %msg.tag, "schema change made at this branch stays local ([ddl] from = \"main\"): this branch's schema now differs from the main's");
            return Ok(());
        }
        let split = match parse::ddl_statements(&msg.query) {
            Ok(s) => s,
            Err(r) => {
                self.status.ddl_unreplicable += 1;
                tracing::error!(lsn = %fmt_lsn(lsn), tag = %msg.tag, error = %r, detail = %r.detail, hint = %r.hint, "schema change not replicated");
                return Ok(());
            }
        };
        let placed: Vec<parse::DdlStatement> = if split.exact {
            // Firing n of the trigger is statement n of the string.
            match split.statements.into_iter().nth(msg.ordinal.saturating_sub(1) as usize) {
                Some(s) if parse::tag_matches(s.kind, &msg.tag) => vec![s],
                other => {
                    self.status.ddl_unreplicable += 1;
                    tracing::error!(
                        lsn = %fmt_lsn(lsn),
                        tag = %msg.tag,
                        ordinal = msg.ordinal,
                        found = other.map(|s| s.kind).unwrap_or("nothing"),
                        "schema change not replicated: the trigger fired for a statement the query string does not hold at that place (DDL run inside a function called by a query?)"
                    );
                    return Ok(());
                }
            }
        } else if txn.ddl_seen.insert(msg.key.clone()) {
            // DO blocks, function calls: all DDL of the string at its first firing.
            split.statements
        } else {
            return Ok(());
        };
        if placed.is_empty() {
            // The trigger fired, so DDL ran, but the query string holds none:
            // it ran inside a function called by a query.
            self.status.ddl_unreplicable += 1;
            tracing::warn!(lsn = %fmt_lsn(lsn), tag = %msg.tag, "schema change not replicated: it ran inside a function called by a query, not as a DDL statement. Run DDL as plain statements (or in a DO block at the main)");
            return Ok(());
        }
        let default_schema = first_schema(&msg.search_path);
        let scope = &self.cfg.scope;
        let kept: Vec<String> = placed
            .into_iter()
            .filter(|s| !s.temporary && !s.local)
            .filter(|s| {
                s.relations.is_empty() || s.relations.iter().any(|r| scope.schema_follows(r.schema.as_deref().unwrap_or(&default_schema)))
            })
            .map(|s| s.sql)
            .collect();
        if kept.is_empty() {
            tracing::debug!(lsn = %fmt_lsn(lsn), tag = %msg.tag, "schema change of objects that are not replicated");
            return Ok(());
        }
        self.status.ddl_captured += 1;
        tracing::info!(lsn = %fmt_lsn(lsn), tag = %msg.tag, statements = kept.len(), "schema change captured");
        self.push_change(RowChange::Ddl(DdlChange { statements: kept, search_path: msg.search_path, role: msg.role, tag: msg.tag }))
    }

    /// A verdict or conflict record the main's apply wrote (main only):
    /// kept, in place, in the relay segment of the ChangeSet it belongs to.
    fn decision_message(&mut self, prefix: &str, content: &[u8], lsn: u64) -> Result<(), EngineError> {
        if self.cfg.role != Role::Main {
            return Ok(());
        }
        let Some(txn) = self.txn.as_mut() else { return Ok(()) };
        if txn.duplicate {
            return Ok(());
        }
        let change = if prefix == VERDICT_MESSAGE_PREFIX {
            let (desc, mut v): (TableDesc, Verdict) =
                rmp_serde::from_slice(content).map_err(|e| EngineError::Corrupt(format!("undecodable verdict message at {}: {e}", fmt_lsn(lsn))))?;
            v.table = txn.segment.table_desc(desc);
            RowChange::Verdict(v)
        } else {
            let r: ConflictRecord =
                rmp_serde::from_slice(content).map_err(|e| EngineError::Corrupt(format!("undecodable conflict message at {}: {e}", fmt_lsn(lsn))))?;
            RowChange::Conflict(r)
        };
        self.push_change(change)
    }

    /// Loads this node's clock offsets (R14).
    async fn load_offsets(&mut self, client: &Client) -> Result<(), EngineError> {
        let rows = client
            .query("SELECT at_us, offset_us FROM branchsync.clock_offsets ORDER BY at_us", &[])
            .await
            .map_err(EngineError::pg("reading the clock offsets"))?;
        self.offsets = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(())
    }

    /// Loads the key of the event triggers' marks and the transactions
    /// whose too-large rows the operator allowed to skip.
    pub async fn load_keys_and_skips(&mut self, client: &Client) -> Result<(), EngineError> {
        self.ddl_key = client
            .query_opt("SELECT key FROM branchsync.mark_key", &[])
            .await
            .map_err(EngineError::pg("reading the DDL mark key"))?
            .map(|r| r.get::<_, Vec<u8>>(0));
        if self.ddl_key.is_none() {
            tracing::warn!("branchsync.mark_key is empty: schema changes made here are not replicated until branchsync init runs");
        }
        if self.cfg.role == Role::Main {
            self.suppress = client
                .query("SELECT author, commit_lsn FROM branchsync.relay_suppress", &[])
                .await
                .map_err(EngineError::pg("reading branchsync.relay_suppress"))?
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
                .collect();
        }
        self.skips = client
            .query("SELECT commit_lsn FROM branchsync.capture_skips", &[])
            .await
            .map_err(EngineError::pg("reading the recorded capture skips"))?
            .iter()
            .filter_map(|r| pg::parse_lsn(&r.get::<_, String>(0)))
            .collect();
        Ok(())
    }

    /// Peeks at the slot once, logs what committed, makes it durable, then
    /// confirms the slot. Returns the number of transactions seen.
    pub async fn poll_once(&mut self, client: &Client, writer: &Client) -> Result<u64, EngineError> {
        self.load_offsets(client).await?;
        // Commits flushed before this point are all decodable now.
        let flushed: String = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(EngineError::pg("reading the WAL position"))?
            .get(0);
        let flushed = pg::parse_lsn(&flushed).unwrap_or(0);
        self.peeked = 0;
        self.largest_message = 0;
        self.fragmented = false;
        self.pk_cache.clear();
        let end = match self.read_batch(client, writer, TRUNCATE_OVER_BYTES).await? {
            Batch::Read(end) => end,
            Batch::NeedFull => {
                // What was read of the transaction that needs the message
                // is cut off; whole transactions before it stay, and are
                // recognised as read when the slot delivers them again.
                self.log.cut_back()?;
                let captured = self.captured_lsn;
                self.skipped.retain(|r| r.commit_lsn <= captured);
                self.peeked = 0;
                match self.read_batch(client, writer, -PIECE_BYTES).await? {
                    Batch::Read(end) => end,
                    Batch::NeedFull => return Err(EngineError::Corrupt("the slot left out a message in a full read".into())),
                }
            }
        };
        let drained = self.peeked < i64::from(self.cfg.batch_changes);
        let seen = match end {
            Some((end_lsn, seen)) => {
                self.log.flush().await?;
                failpoints::hit(failpoints::CAPTURE_AFTER_LOG_WRITE);
                if self.fragmented {
                    failpoints::hit(failpoints::CAPTURE_AFTER_FRAGMENTED_FLUSH);
                }
                // Only now, with the log durable, may the slot forget these
                // transactions (R1).
                self.advance(client, end_lsn).await?;
                self.write_back_tombstones(writer).await?;
                self.record_skipped(writer).await?;
                seen
            }
            None => 0,
        };
        if drained {
            self.status.caught_up_lsn = self.status.caught_up_lsn.max(flushed);
        }
        // Everything before a probe read is in the log now.
        self.status.caught_up_lsn = self.status.caught_up_lsn.max(self.probe_lsn);
        Ok(seen)
    }

    /// `true` when the last poll read a message so large that the slot's
    /// connection should be opened anew to give its buffer back.
    pub fn read_a_huge_message(&self) -> bool {
        self.largest_message >= RECONNECT_AFTER_MESSAGE_BYTES
    }

    /// Records the deletes of local ChangeSets in `branchsync.row_version`
    /// (tombstones, with the deleted row), unless the row exists again: the
    /// version a concurrent change from elsewhere is decided against. One
    /// statement per table for each batch of deletes, so a delete of
    /// millions of rows costs a few thousand statements and bounded memory.
    /// A tombstone is only ever written for a delete that committed, so
    /// writing it before the log is durable loses nothing: a crash makes
    /// the slot deliver the delete again and its tombstone is written again.
    async fn write_back_tombstones(&mut self, writer: &Client) -> Result<(), EngineError> {
        if self.tombstones.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.tombstones);
        self.tombstone_bytes = 0;
        // Per table, the last delete of each key (a statement may not touch
        // one row version twice).
        let mut by_table: Vec<((String, String), Vec<LocalDelete>)> = Vec::new();
        for d in pending {
            let k = (d.schema.clone(), d.table.clone());
            match by_table.iter_mut().find(|(t, _)| *t == k) {
                Some((_, v)) => v.push(d),
                None => by_table.push((k, vec![d])),
            }
        }
        for ((schema, table), deletes) in by_table {
            if !self.pk_cache.contains_key(&(schema.clone(), table.clone())) {
                let t = crate::catalog::LocalTable::load(writer, &schema, &table).await?;
                self.pk_cache.insert((schema.clone(), table.clone()), t);
            }
            let Some(Some(t)) = self.pk_cache.get(&(schema.clone(), table.clone())) else { continue };
            if t.pk.is_empty() {
                continue;
            }
            let mut latest: HashMap<String, usize> = HashMap::new();
            let mut rows: Vec<(String, Vec<String>, i64, i64, String)> = Vec::new();
            for d in deletes {
                let mut parts = Vec::with_capacity(t.pk.len());
                for k in &t.pk {
                    let Some(i) = d.columns.iter().position(|c| c == k) else { break };
                    parts.push(d.old.get(i).and_then(Value::as_text).unwrap_or("").to_string());
                }
                if parts.len() != t.pk.len() {
                    continue;
                }
                let mut row = serde_json::Map::new();
                for (c, v) in d.columns.iter().zip(&d.old) {
                    row.insert(c.clone(), v.as_text().map(|t| serde_json::Value::String(t.to_string())).unwrap_or(serde_json::Value::Null));
                }
                let key = crate::catalog::key_text(&parts.iter().map(String::as_str).collect::<Vec<_>>());
                let rec = (key.clone(), parts, d.stamp as i64, d.commit_ts_us, serde_json::Value::Object(row).to_string());
                match latest.get(&key) {
                    Some(i) => rows[*i] = rec,
                    None => {
                        latest.insert(key, rows.len());
                        rows.push(rec);
                    }
                }
            }
            if rows.is_empty() {
                continue;
            }
            let n = t.pk.len();
            // $1 table, $2 node, $3 keys, $4 stamps, $5 commit times, $6 rows,
            // then one array per key column.
            let arrays: Vec<String> = (0..n).map(|j| format!("${}::text[]", 7 + j)).collect();
            let aliases: Vec<String> = (0..n).map(|j| format!("k{j}")).collect();
            let conds: Vec<String> = t.pk.iter().enumerate().map(|(j, k)| format!("t.{} = u.k{j}::{}", t.columns[k].quoted, t.columns[k].type_name)).collect();
            let sql = format!(
                "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, row_data) \
                 SELECT $1, u.key, u.stamp, $2, true, u.ts, u.ts, u.row::jsonb \
                 FROM unnest($3::text[], $4::int8[], $5::int8[], $6::text[], {arrays}) AS u(key, stamp, ts, row, {aliases}) \
                 WHERE NOT EXISTS (SELECT 1 FROM {qt} t WHERE {conds}) \
                 ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = true, \
                     ts = excluded.ts, local_ts = excluded.local_ts, row_data = excluded.row_data, base = NULL, cols = NULL \
                 WHERE rv.local_ts <= excluded.local_ts",
                arrays = arrays.join(", "),
                aliases = aliases.join(", "),
                qt = t.qualified,
                conds = conds.join(" AND "),
            );
            let tbl = format!("{schema}.{table}");
            let keys: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            let stamps: Vec<i64> = rows.iter().map(|r| r.2).collect();
            let tss: Vec<i64> = rows.iter().map(|r| r.3).collect();
            let images: Vec<&str> = rows.iter().map(|r| r.4.as_str()).collect();
            let parts: Vec<Vec<&str>> = (0..n).map(|j| rows.iter().map(|r| r.1[j].as_str()).collect()).collect();
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&tbl, &self.cfg.node, &keys, &stamps, &tss, &images];
            params.extend(parts.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)));
            match writer.execute(sql.as_str(), &params).await {
                Ok(_) => {}
                // The table is gone since: nothing to remember.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {}
                Err(e) => return Err(EngineError::pg(format!("recording tombstones of {tbl}"))(e)),
            }
        }
        Ok(())
    }

    /// Records the rows skipped because they were too large (R24).
    async fn record_skipped(&mut self, writer: &Client) -> Result<(), EngineError> {
        for r in std::mem::take(&mut self.skipped) {
            let detail = format!(
                "a row of {} bytes at transaction LSN {} was not captured: it is larger than the largest branchsync carries; the operator recorded the skip",
                r.bytes,
                fmt_lsn(r.commit_lsn)
            );
            writer
                .execute(
                    "INSERT INTO branchsync.conflicts (tbl, key, kind, rule, winner_node, loser_node, detail) VALUES ($1, $2, $5, 'capture', NULL, $3, $4)",
                    &[&r.table, &r.key, &self.cfg.node, &detail, &crate::conflict_log::ConflictKind::RowTooLarge.as_str()],
                )
                .await
                .map_err(EngineError::pg("recording a skipped row"))?;
        }
        Ok(())
    }

    /// Reads one peek batch into the log (not yet flushed): the end LSN of
    /// the last whole transaction and how many were seen. With `limit > 0`,
    /// messages larger than `limit` bytes are left out by the server; one of
    /// a transaction that is skipped anyway costs nothing, and for any other
    /// the read stops with [`Batch::NeedFull`]. With `limit < 0`, every
    /// message comes, in pieces of `-limit` bytes.
    pub async fn read_batch(&mut self, client: &Client, writer: &Client, limit: i32) -> Result<Batch, EngineError> {
        let changes = self.cfg.batch_changes;
        let (sql, size) = if limit < 0 { (PEEK_PIECES_SQL, -limit) } else { (PEEK_SQL, limit) };
        let rows = client
            .query_raw(sql, [&self.cfg.slot as &(dyn tokio_postgres::types::ToSql + Sync), &changes, &self.cfg.publication, &size])
            .await
            .map_err(EngineError::pg("reading the replication slot"))?;
        let mut assembling: Option<Vec<u8>> = None;
        futures::pin_mut!(rows);
        let mut end = None;
        let mut seen = 0;
        self.txn = None;
        while let Some(row) = rows.try_next().await.map_err(EngineError::pg("reading the replication slot"))? {
            // A message in pieces: put it back together first.
            let (piece, total): (i32, i32) = (row.get(1), row.get(2));
            let whole: Option<Vec<u8>> = if total > size.max(1) && limit < 0 {
                let data: &[u8] = row.get::<_, Option<&[u8]>>(0).unwrap_or_default();
                let buf = match (piece, assembling.as_mut()) {
                    (1, _) => assembling.insert(Vec::with_capacity(total as usize)),
                    (_, Some(b)) => b,
                    (_, None) => return Err(EngineError::Corrupt(format!("piece {piece} of a slot message came without its start"))),
                };
                buf.extend_from_slice(data);
                if buf.len() < total as usize {
                    continue;
                }
                assembling.take()
            } else {
                None
            };
            self.peeked += 1;
            // Rows that are already buffered never make this loop wait: give
            // the other tasks of the node (the link's reader, its timers) a
            // turn now and then.
            if self.peeked % 256 == 0 {
                tokio::task::yield_now().await;
            }
            // Row changes of a transaction that is not captured are not
            // even decoded (a branch's own apply transactions: echoes).
            let skipping = self.txn.as_ref().is_some_and(|t| t.duplicate || t.applied_here || t.suppressing);
            let msg = {
                let data = match &whole {
                    Some(w) => Some(w.as_slice()),
                    None => row.get::<_, Option<&[u8]>>(0),
                };
                let Some(data) = data else {
                    if skipping {
                        continue;
                    }
                    return Ok(Batch::NeedFull);
                };
                if skipping && matches!(data.first(), Some(b'I' | b'U' | b'D' | b'T')) {
                    continue;
                }
                self.largest_message = self.largest_message.max(data.len());
                self.status.pgoutput_bytes += data.len() as u64;
                pgoutput::decode(data).map_err(|e| EngineError::Corrupt(format!("undecodable pgoutput message: {e}")))?
            };
            // The message owns its values now: the row's buffer can go.
            drop(row);
            drop(whole);
            if let Some(e) = self.handle(msg)? {
                end = Some(e);
                seen += 1;
            }
            // Tombstones of a huge delete are written as they come, so they
            // never all sit in memory.
            if self.tombstones.len() >= TOMBSTONE_BATCH_ROWS || self.tombstone_bytes >= TOMBSTONE_BATCH_BYTES {
                self.write_back_tombstones(writer).await?;
            }
        }
        Ok(Batch::Read(end.map(|e| (e, seen))))
    }

    async fn advance(&self, client: &Client, end_lsn: u64) -> Result<(), EngineError> {
        client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)::text FROM pg_replication_slots \
                 WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                &[&self.cfg.slot, &fmt_lsn(end_lsn)],
            )
            .await
            .map_err(EngineError::pg("confirming the replication slot"))?;
        Ok(())
    }
}

/// Ends the current apply group of `txn`: its held ChangeSets, then the open
/// segment, go to `txn.done` in order (a ChangeSet without a change is
/// logged only as the rest of an earlier fragment). Counts still open mean
/// the rows did not match the mark (an `ENABLE ALWAYS` trigger writing
/// replicated rows during apply): the rows are relayed all the same,
/// possibly under a neighbouring ChangeSet of the same author.
fn close_group(txn: &mut Txn, log: &ChangeLog, rows: usize, bytes: usize) {
    let unmatched = txn.held.iter().flat_map(|h| h.rows_left.iter()).chain(txn.rows_left.iter().flatten()).any(|c| c.2 > 0);
    if unmatched {
        tracing::debug!(lsn = %fmt_lsn(txn.commit_lsn), "an apply group's rows did not match its counts");
    }
    while let Some(mut h) = txn.held.pop_front() {
        if !h.segment.changes.is_empty() {
            txn.done.extend(h.segment.fragments(log, rows, bytes));
        }
    }
    if !txn.segment.changes.is_empty() || txn.segment.part > 0 {
        txn.done.push(txn.segment.fragment(log, true));
    }
    txn.rows_left = None;
    txn.held_popped = 0;
    txn.held_cursors.clear();
}

/// `schema.table` and the key (or, without a key, nothing) of a row change,
/// for messages about it (key values only, never other values).
fn describe_row(tables: &[TableDesc], ch: &RowChange) -> (String, String) {
    let (t, vals) = match ch {
        RowChange::Insert { table, new } | RowChange::Update { table, new, .. } => (*table, new),
        RowChange::Delete { table, old } => (*table, &old.values),
        _ => return ("(unknown)".into(), String::new()),
    };
    let Some(d) = tables.get(t as usize) else { return ("(unknown)".into(), String::new()) };
    let key: Vec<String> = d
        .key
        .iter()
        .zip(vals)
        .filter(|(k, _)| **k)
        .map(|(_, v)| v.as_text().map(|s| s.chars().take(64).collect()).unwrap_or_else(|| "NULL".into()))
        .collect();
    (format!("{}.{}", d.schema, d.name), format!("({})", key.join(", ")))
}

/// The schema an unqualified name is created in: the first entry of the
/// `search_path` that is not `$user` (best effort; `public` by default).
fn first_schema(search_path: &str) -> String {
    search_path
        .split(',')
        .map(|p| p.trim().trim_matches('"').to_string())
        .find(|p| !p.is_empty() && p != "$user" && !p.starts_with("pg_temp"))
        .unwrap_or_else(|| "public".to_string())
}

fn old_row(o: OldTuple) -> OldRow {
    let (full, values) = o.into_parts();
    OldRow { full, values }
}

/// Session settings of capture's connections: nothing its role or
/// database set may cancel a long peek or write-back (R24).
const CAPTURE_SESSION: &str = "SET statement_timeout = 0; SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0";

async fn capture_conn(url: &str, name: &str) -> Result<pg::PgConn, EngineError> {
    let c = pg::connect(url, name).await?;
    c.client.batch_execute(CAPTURE_SESSION).await.map_err(EngineError::pg("configuring the capture session"))?;
    Ok(c)
}

/// Why the slot cannot be read, when PostgreSQL invalidated it (its WAL
/// was removed, `max_slot_wal_keep_size`): what was lost and what to do.
async fn slot_lost(client: &Client, slot: &str, captured_lsn: u64) -> Option<EngineError> {
    let row = client
        .query_opt("SELECT wal_status, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .ok()?;
    let Some(row) = row else {
        return Some(EngineError::Stopped {
            message: format!("capture stopped: the replication slot \"{slot}\" does not exist"),
            detail: format!("Everything up to LSN {} was captured; what was committed after it cannot be read any more.", fmt_lsn(captured_lsn)),
            hint: "The slot was dropped by hand, or the database was restored without it. Re-seed this node (a fresh copy of the main's database and branchsync init) so that no change goes missing.".into(),
        });
    };
    let status: Option<String> = row.get(0);
    (status.as_deref() == Some("lost")).then(|| EngineError::Stopped {
        message: format!("capture stopped: PostgreSQL invalidated the replication slot \"{slot}\""),
        detail: format!(
            "The WAL the slot still needed was removed because it exceeded max_slot_wal_keep_size. Everything up to LSN {} was captured; transactions committed after it, up to when the WAL was removed, cannot be read and will not replicate.",
            fmt_lsn(captured_lsn)
        ),
        hint: "Re-seed this node (a fresh copy of the main's database and branchsync init), and raise max_slot_wal_keep_size (or set it to -1) so that a stopped daemon cannot lose WAL again.".into(),
    })
}

/// Runs capture until `shutdown`; transient errors return to the caller,
/// which retries with backoff. Every start (the first, and each retry after
/// an error) first cuts the log back to its last whole transaction.
pub async fn run_capture(cfg: CaptureConfig, url: String, log: Arc<ChangeLog>, shutdown: watch::Receiver<bool>, status: watch::Sender<CaptureStatus>) -> Result<(), EngineError> {
    log.cut_back()?;
    let writer = capture_conn(&url, "branchsync capture write-back").await?;
    let poll = cfg.poll_interval;
    let slot = cfg.slot.clone();
    let streaming = cfg.stream;
    let mut cap = Capturer::new(cfg, log)?;
    cap.status = status.borrow().clone();
    cap.status.captured_lsn = cap.captured_lsn;
    cap.load_keys_and_skips(&writer.client).await?;
    cap.status.running = true;
    status.send_replace(cap.status.clone());
    let r = if streaming {
        stream::stream_loop(&mut cap, &url, writer, shutdown, &status).await
    } else {
        match capture_conn(&url, "branchsync capture").await {
            Ok(conn) => capture_loop(&mut cap, &url, conn, writer, poll, &slot, shutdown, &status).await,
            Err(e) => Err(e),
        }
    };
    status.send_modify(|s| s.running = false);
    r
}

#[allow(clippy::too_many_arguments)]
async fn capture_loop(
    cap: &mut Capturer,
    url: &str,
    mut conn: pg::PgConn,
    writer: pg::PgConn,
    poll: Duration,
    slot: &str,
    mut shutdown: watch::Receiver<bool>,
    status: &watch::Sender<CaptureStatus>,
) -> Result<(), EngineError> {
    let mut closed = conn.closed.clone();
    let mut writer_closed = writer.closed.clone();
    tracing::info!(lsn = %fmt_lsn(cap.captured_lsn), "capture started");
    loop {
        // Cancelling a poll at shutdown is safe: whatever was not confirmed
        // is delivered again and recognised by its commit LSN.
        let seen = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            _ = closed.changed() => return Err(EngineError::ConnectionLost { context: "capturing changes".into() }),
            _ = writer_closed.changed() => return Err(EngineError::ConnectionLost { context: "writing tombstones".into() }),
            r = cap.poll_once(&conn.client, &writer.client) => match r {
                Ok(n) => n,
                Err(e) => {
                    let lost = if e.sqlstate().is_some() { slot_lost(&writer.client, slot, cap.captured_lsn).await } else { None };
                    status.send_replace(cap.status.clone());
                    return Err(lost.unwrap_or(e));
                }
            },
        };
        status.send_replace(cap.status.clone());
        if cap.read_a_huge_message() {
            // The connection's read buffer grew to hold that message and
            // would keep the memory: start a new one.
            tracing::debug!(bytes = cap.largest_message, "reconnecting capture after a very large message");
            conn = capture_conn(url, "branchsync capture").await?;
            closed = conn.closed.clone();
        }
        if seen == 0 {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Begin, Column, Commit, Insert, LogicalMessage, Origin};
    use crate::state::ApplyMark;

    fn main_capturer(log: Arc<ChangeLog>) -> Capturer {
        main_capturer_cut_at(log, 5_000)
    }

    fn main_capturer_cut_at(log: Arc<ChangeLog>, fragment_rows: usize) -> Capturer {
        let cfg = CaptureConfig {
            node: "main".into(),
            node_index: 0,
            role: Role::Main,
            system_id: 7,
            scope: Scope::new(&["public".to_string()], &[]).unwrap(),
            slot: "branchsync".into(),
            publication: "branchsync".into(),
            fragment_rows,
            fragment_bytes: 1 << 20,
            max_row_bytes: 1 << 20,
            mark_key: vec![1; 32],
            poll_interval: Duration::from_millis(10),
            batch_changes: 1_000,
            ddl_local_only: false,
            stream: false,
            tables: Default::default(),
        };
        let mut c = Capturer::new(cfg, log).unwrap();
        let column = Column { flags: 1, name: "id".into(), type_oid: 23, type_modifier: -1 };
        let rel = Relation { oid: 16_384, namespace: "public".into(), name: "orders".into(), replica_identity: ReplicaIdentity::Full, columns: vec![column] };
        c.handle(PgOutputMessage::Relation(rel)).unwrap();
        let columns = vec![Column { flags: 1, name: "id".into(), type_oid: 25, type_modifier: -1 }];
        let lines = Relation { oid: 16_385, namespace: "public".into(), name: "order_lines".into(), replica_identity: ReplicaIdentity::Full, columns };
        c.handle(PgOutputMessage::Relation(lines)).unwrap();
        c
    }

    /// Branch1's ChangeSet `n`, as apply marks it.
    fn mark(n: u64) -> ApplyMark {
        let header = ChangeSetHeader { author: "branch1".into(), author_index: 1, system_id: 9, commit_lsn: n * 1_000, commit_ts_us: n as i64, stamp: n, seen_main_ts: 0 };
        ApplyMark { header, relay_ts_us: 0, sent: None }
    }

    /// Begins the transaction `xid` (committing at `final_lsn`) that the
    /// main's apply wrote for branch1 (under its origin).
    fn begin_applied_for_branch1(c: &mut Capturer, xid: u32, final_lsn: u64) {
        c.handle(PgOutputMessage::Begin(Begin { final_lsn, commit_ts: 10, xid })).unwrap();
        c.handle(PgOutputMessage::Origin(Origin { commit_lsn: 3_000, name: origin_name("branch1") })).unwrap();
    }

    fn rows(orders: u32, lines: u32) -> Vec<GroupedRows> {
        vec![("public".into(), "orders".into(), orders), ("public".into(), "order_lines".into(), lines)]
    }

    /// The sealed apply message of a group, as apply writes it.
    fn group_message(c: &Capturer, xid: u32, marks: Vec<(ApplyMark, Vec<GroupedRows>)>) -> PgOutputMessage {
        let body = rmp_serde::to_vec(&ApplyGroup { tag: ApplyGroup::TAG.into(), marks }).unwrap();
        let content = marks::seal(&c.cfg.mark_key, APPLY_MESSAGE_PREFIX, xid, &body);
        PgOutputMessage::Message(LogicalMessage { flags: 1, lsn: 0, prefix: APPLY_MESSAGE_PREFIX.into(), content })
    }

    fn insert(rel: u32, v: &str) -> PgOutputMessage {
        PgOutputMessage::Insert(Insert { rel, new: vec![Value::Text(v.into())] })
    }

    /// The log as (author's commit LSN, part, last, row values).
    fn relayed(log: &ChangeLog) -> Vec<(u64, u32, bool, Vec<String>)> {
        log.read_after(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| {
                let vals = e
                    .changes
                    .iter()
                    .map(|ch| match ch {
                        RowChange::Insert { table, new } => format!("{}:{}", e.tables[*table as usize].name, new[0].as_text().unwrap_or("")),
                        RowChange::Update { table, new, .. } => format!("{}~{}", e.tables[*table as usize].name, new[0].as_text().unwrap_or("")),
                        other => format!("{other:?}"),
                    })
                    .collect();
                (e.header.commit_lsn, e.part, e.last, vals)
            })
            .collect()
    }

    /// A forged non-transactional message is counted once, though the slot
    /// hands it over again: a peek that read it before its transaction
    /// committed confirmed the slot only up to the commit before it, so
    /// the next peek decodes it again (the likely cause of a CI timeout
    /// waiting for an exact count).
    #[tokio::test]
    async fn a_forged_message_decoded_again_by_the_next_peek_is_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log);
        let forged = |lsn: u64| PgOutputMessage::Message(LogicalMessage { flags: 0, lsn, prefix: APPLY_MESSAGE_PREFIX.into(), content: b"garbage".to_vec() });
        c.handle(forged(7_000)).unwrap();
        assert_eq!(c.status.forged_marks, 1);
        // The next peek starts again before it.
        c.handle(forged(7_000)).unwrap();
        assert_eq!((c.status.forged_marks, c.status.forged_by_prefix.get(APPLY_MESSAGE_PREFIX).copied()), (1, Some(1)), "the same message is not counted twice");
        c.handle(forged(7_100)).unwrap();
        assert_eq!(c.status.forged_marks, 2, "a new one is counted");
    }

    /// One apply transaction holding three ChangeSets of one author, their
    /// rows written by one statement per table (all orders, then all
    /// lines), then a large row sent on its own: the relay splits it back
    /// into the three ChangeSets, each with exactly its rows, in order, and
    /// cut into fragments of two rows (those of ChangeSets still waiting
    /// for rows when they are cut too).
    #[tokio::test]
    async fn an_apply_group_is_relayed_as_the_changesets_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer_cut_at(log.clone(), 2);
        let xid = 77;
        begin_applied_for_branch1(&mut c, xid, 5_000);
        let group = group_message(&c, xid, vec![(mark(1), rows(1, 3)), (mark(2), rows(1, 2)), (mark(3), rows(1, 1))]);
        c.handle(group).unwrap();
        for v in ["a", "b", "c"] {
            c.handle(insert(16_384, v)).unwrap();
        }
        for v in ["a1", "a2", "a3", "b1", "b2", "c1", "c2-large"] {
            c.handle(insert(16_385, v)).unwrap();
        }
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 5_000, end_lsn: 5_001, commit_ts: 10 })).unwrap();
        log.flush().await.unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            relayed(&log),
            vec![
                (1_000, 0, false, s(&["orders:a", "order_lines:a1"])),
                (1_000, 1, true, s(&["order_lines:a2", "order_lines:a3"])),
                (2_000, 0, false, s(&["orders:b", "order_lines:b1"])),
                (2_000, 1, true, s(&["order_lines:b2"])),
                (3_000, 0, false, s(&["orders:c", "order_lines:c1"])),
                (3_000, 1, true, s(&["order_lines:c2-large"])),
            ]
        );
    }

    /// The main's pipeline sends a group's changes of delta columns after
    /// every batch of its inserts, one row per key with the group's
    /// differences added (`sql::delta_update`): beyond every count,
    /// they go to the group's last ChangeSet, and the ChangeSets before it
    /// reach the log with their inserted rows, without waiting for them.
    #[tokio::test]
    async fn a_groups_folded_updates_come_after_its_counted_rows_and_go_to_its_last_changeset() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log.clone());
        let xid = 78;
        begin_applied_for_branch1(&mut c, xid, 5_000);
        c.handle(group_message(&c, xid, vec![(mark(1), rows(0, 1)), (mark(2), rows(0, 1)), (mark(3), rows(0, 1))])).unwrap();
        for v in ["a1", "b1", "c1"] {
            c.handle(insert(16_385, v)).unwrap();
        }
        for v in ["1", "2"] {
            c.handle(PgOutputMessage::Update(crate::pgoutput::Update { rel: 16_384, old: None, new: vec![Value::Text(v.into())] })).unwrap();
        }
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 5_000, end_lsn: 5_001, commit_ts: 10 })).unwrap();
        log.flush().await.unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            relayed(&log),
            vec![
                (1_000, 0, true, s(&["order_lines:a1"])),
                (2_000, 0, true, s(&["order_lines:b1"])),
                (3_000, 0, true, s(&["order_lines:c1", "orders~1", "orders~2"])),
            ]
        );
    }

    /// ChangeSets of a group that expect no row of a table are passed over
    /// for it, also once earlier ones are complete and gone to the log:
    /// every row still lands in the first ChangeSet expecting one of its
    /// table.
    #[tokio::test]
    async fn rows_of_a_group_skip_changesets_that_expect_none_of_their_table() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log.clone());
        let xid = 79;
        begin_applied_for_branch1(&mut c, xid, 9_000);
        let group = group_message(&c, xid, vec![(mark(1), rows(1, 2)), (mark(2), rows(0, 1)), (mark(3), rows(2, 0)), (mark(4), rows(1, 1))]);
        c.handle(group).unwrap();
        for v in ["o1", "o3a", "o3b", "o4"] {
            c.handle(insert(16_384, v)).unwrap();
        }
        for v in ["l1a", "l1b", "l2", "l4"] {
            c.handle(insert(16_385, v)).unwrap();
        }
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 9_000, end_lsn: 9_001, commit_ts: 10 })).unwrap();
        log.flush().await.unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            relayed(&log),
            vec![
                (1_000, 0, true, s(&["orders:o1", "order_lines:l1a", "order_lines:l1b"])),
                (2_000, 0, true, s(&["order_lines:l2"])),
                (3_000, 0, true, s(&["orders:o3a", "orders:o3b"])),
                (4_000, 0, true, s(&["orders:o4", "order_lines:l4"])),
            ]
        );
    }

    /// Groups follow each other in one transaction (the queue was sent
    /// twice), and an apply mark of one ChangeSet (parked rows, an earlier
    /// release) takes every row up to the next mark.
    #[tokio::test]
    async fn groups_and_single_marks_follow_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log.clone());
        let xid = 78;
        begin_applied_for_branch1(&mut c, xid, 9_000);
        c.handle(group_message(&c, xid, vec![(mark(1), rows(1, 0)), (mark(2), rows(1, 0))])).unwrap();
        c.handle(insert(16_384, "a")).unwrap();
        c.handle(insert(16_384, "b")).unwrap();
        // The rest of ChangeSet 2, queued after the first group was sent.
        c.handle(insert(16_385, "b1")).unwrap();
        let single = rmp_serde::to_vec(&mark(3)).unwrap();
        let content = marks::seal(&c.cfg.mark_key, APPLY_MESSAGE_PREFIX, xid, &single);
        c.handle(PgOutputMessage::Message(LogicalMessage { flags: 1, lsn: 0, prefix: APPLY_MESSAGE_PREFIX.into(), content })).unwrap();
        c.handle(insert(16_385, "c1")).unwrap();
        c.handle(insert(16_384, "c")).unwrap();
        c.handle(group_message(&c, xid, vec![(mark(4), rows(0, 1))])).unwrap();
        c.handle(insert(16_385, "d1")).unwrap();
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 9_000, end_lsn: 9_001, commit_ts: 10 })).unwrap();
        log.flush().await.unwrap();
        let got: Vec<(u64, Vec<String>)> = relayed(&log).into_iter().map(|(lsn, _, _, v)| (lsn, v)).collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                (1_000, s(&["orders:a"])),
                (2_000, s(&["orders:b", "order_lines:b1"])),
                (3_000, s(&["order_lines:c1", "orders:c"])),
                (4_000, s(&["order_lines:d1"])),
            ]
        );
    }

    /// The digest apply puts in the mark of a ChangeSet that sent these
    /// `(table, value)` inserts (tables as [`main_capturer`] knows them).
    fn sent(c: &Capturer, rows: &[(&str, &str)]) -> Option<crate::marks::RowsDigest> {
        let desc = |name: &str| TableDesc::from(TableDef { schema: "public".into(), name: name.into(), columns: vec!["id".into()], key: vec![true], identity_full: true });
        let tables = vec![desc("orders"), desc("order_lines")];
        let changes = rows.iter().map(|(t, v)| RowChange::Insert { table: u32::from(*t == "order_lines"), new: vec![Value::Text(v.to_string())] }).collect();
        let e = LogEntry { pos: 1, header: mark(0).header, part: 0, last: true, tables, changes, relay_ts_us: 0, echo_as_sent: false };
        crate::marks::RowsDigest::of_inserts(&RowHasher::new(&c.cfg.mark_key), &e)
    }

    /// A branch ChangeSet is relayed as written exactly as sent only when
    /// its one fragment holds exactly the rows whose digest its mark
    /// carries: not when a value differs (a trigger at the main changed
    /// it), when the main did more than insert (here: deleted a row in the
    /// same transaction), when it is cut into fragments, or when its mark
    /// has no digest.
    #[tokio::test]
    async fn a_changeset_is_relayed_as_sent_only_when_its_rows_are_exactly_those_sent() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer_cut_at(log.clone(), 2);
        let xid = 80;
        begin_applied_for_branch1(&mut c, xid, 9_000);
        let with = |n: u64, sent: Option<crate::marks::RowsDigest>| ApplyMark { sent, ..mark(n) };
        let marks = vec![
            (with(1, sent(&c, &[("orders", "a"), ("order_lines", "a1"), ("order_lines", "a2")])), rows(1, 2)),
            (with(2, sent(&c, &[("order_lines", "b1"), ("orders", "b")])), rows(1, 1)),
            (with(3, sent(&c, &[("orders", "c")])), rows(1, 0)),
            (with(4, None), rows(1, 0)),
            (with(5, sent(&c, &[("order_lines", "e1")])), rows(0, 1)),
        ];
        c.handle(group_message(&c, xid, marks)).unwrap();
        for v in ["a", "b", "C", "d"] {
            c.handle(insert(16_384, v)).unwrap();
        }
        for v in ["a1", "a2", "b1", "e1"] {
            c.handle(insert(16_385, v)).unwrap();
        }
        c.handle(PgOutputMessage::Delete(crate::pgoutput::Delete { rel: 16_385, old: OldTuple::Full(vec![Value::Text("e1".into())]) })).unwrap();
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 9_000, end_lsn: 9_001, commit_ts: 10 })).unwrap();
        log.flush().await.unwrap();
        let got: Vec<(u64, u32, bool)> = log.read_after(0, usize::MAX).unwrap().iter().map(|e| (e.header.commit_lsn, e.part, e.echo_as_sent)).collect();
        assert_eq!(got, vec![(1_000, 0, false), (1_000, 1, false), (2_000, 0, true), (3_000, 0, false), (4_000, 0, false), (5_000, 0, false), (5_000, 1, false)]);
        assert_eq!(c.status.relayed_as_sent, 1);
    }

    /// One local transaction of one inserted row, committed at `lsn` with
    /// commit time `ts` (PostgreSQL epoch).
    fn commit_one(c: &mut Capturer, lsn: u64, ts: i64) {
        c.handle(PgOutputMessage::Begin(Begin { final_lsn: lsn, commit_ts: ts, xid: lsn as u32 })).unwrap();
        c.handle(PgOutputMessage::Insert(Insert { rel: 16_384, new: vec![Value::Text(lsn.to_string())] })).unwrap();
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: lsn, end_lsn: lsn + 1, commit_ts: ts })).unwrap();
    }

    /// Commit times are not monotonic in commit order; the relay time of an
    /// entry must bound every entry before it (the main caps a branch's
    /// `seen_main_ts` with it), across a restart too.
    #[tokio::test]
    async fn relay_times_never_decrease_along_the_log_even_when_commit_times_do() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log.clone());
        commit_one(&mut c, 100, 5_000);
        commit_one(&mut c, 200, 4_000);
        log.flush().await.unwrap();
        drop(c);
        drop(log);
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log.clone());
        commit_one(&mut c, 300, 4_500);
        commit_one(&mut c, 400, 6_000);
        log.flush().await.unwrap();
        let entries = log.read_after(0, usize::MAX).unwrap();
        let times: Vec<i64> = entries.iter().map(|e| e.relay_ts_us - PG_EPOCH_OFFSET_US).collect();
        assert_eq!(times, vec![5_000, 5_000, 5_000, 6_000]);
        let commit_times: Vec<i64> = entries.iter().map(|e| e.header.commit_ts_us - PG_EPOCH_OFFSET_US).collect();
        assert_eq!(commit_times, vec![5_000, 4_000, 4_500, 6_000], "the commit times themselves are kept");
    }

    /// A document counter taking a number changes only its site-local
    /// columns: that update is not captured (nothing another site keeps
    /// changed); one that also changes a replicated column is, whole.
    #[tokio::test]
    async fn an_update_of_site_local_columns_only_is_not_captured() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(ChangeLog::open(dir.path()).unwrap());
        let mut c = main_capturer(log.clone());
        c.cfg.tables = crate::conflict::TableRules::new(vec![crate::conflict::TableRule { pattern: "counters".into(), local: vec!["next".into(), "prefix".into()], ..Default::default() }]).unwrap();
        let col = |n: &str| Column { flags: u8::from(n == "id"), name: n.into(), type_oid: 25, type_modifier: -1 };
        let rel = Relation { oid: 16_390, namespace: "public".into(), name: "counters".into(), replica_identity: ReplicaIdentity::Full, columns: vec![col("id"), col("name"), col("prefix"), col("next")] };
        c.handle(PgOutputMessage::Relation(rel)).unwrap();
        let row = |name: &str, prefix: &str, next: &str| vec![Value::Text("1".into()), Value::Text(name.into()), Value::Text(prefix.into()), Value::Text(next.into())];
        let update = |old: Vec<Value>, new: Vec<Value>| PgOutputMessage::Update(crate::pgoutput::Update { rel: 16_390, old: Some(OldTuple::Full(old)), new });
        c.handle(PgOutputMessage::Begin(Begin { final_lsn: 100, commit_ts: 10, xid: 100 })).unwrap();
        c.handle(update(row("moves", "S1/", "7"), row("moves", "S1/", "8"))).unwrap();
        c.handle(update(row("moves", "S1/", "8"), row("moves", "S2/", "8"))).unwrap();
        c.handle(update(row("moves", "S2/", "8"), row("moves 2026", "S2/", "9"))).unwrap();
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 100, end_lsn: 101, commit_ts: 10 })).unwrap();
        // What apply wrote for branch1 is relayed as it was sent.
        begin_applied_for_branch1(&mut c, 200, 6_000);
        c.handle(group_message(&c, 200, vec![(mark(1), rows(0, 0))])).unwrap();
        c.handle(update(row("moves 2026", "S2/", "9"), row("moves 2026", "S2/", "10"))).unwrap();
        c.handle(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: 6_000, end_lsn: 6_001, commit_ts: 10 })).unwrap();
        log.flush().await.unwrap();
        let entries = log.read_after(0, usize::MAX).unwrap();
        let updates: Vec<Vec<Value>> = entries.iter().flat_map(|e| e.changes.iter()).filter_map(|ch| match ch {
            RowChange::Update { new, .. } => Some(new.clone()),
            _ => None,
        }).collect();
        assert_eq!(updates, vec![row("moves 2026", "S2/", "9"), row("moves 2026", "S2/", "10")], "of this node's own updates, only the one that renamed the counter is captured; branch1's is relayed");
        assert_eq!(c.status.local_only_updates, 2);
    }
}
