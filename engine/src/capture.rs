//! Capture: drains this node's logical slot into the local [`ChangeLog`].
//!
//! ```text
//!  PostgreSQL WAL --pgoutput--> pg_logical_slot_peek_binary_changes (streamed rows)
//!        --> decode --> ChangeSets (fragments of ≤ fragment_rows rows)
//!        --> ChangeLog::append ... ChangeLog::flush (durable)
//!        --> pg_replication_slot_advance(end LSN of the last whole transaction)
//! ```
//!
//! One task owns the one connection. Each poll peeks at most
//! `batch_changes` changes (whole transactions), streaming the rows, so a
//! transaction of a million rows is written to the log fragment by fragment
//! and never sits in memory whole.
//!
//! # Crash safety
//!
//! The slot is confirmed only after the log write is durable (R1): a crash
//! before the advance makes the slot deliver the transaction again, and it
//! is recognised by its commit LSN (at most the log's `captured_lsn`) and
//! dropped before any fragment is written. A crash in the middle of a large
//! transaction leaves invisible fragments, which the log removes on open.
//!
//! # Progress tracking
//!
//! The log's `captured_lsn` and last hybrid-clock stamp move in the same
//! atomic batch as the transaction's last fragment. The slot position is
//! only a lower bound of what was captured: PostgreSQL persists it lazily.
//!
//! # Who wrote what (R3)
//!
//! Every apply transaction starts each ChangeSet with a transactional
//! logical message `branchsync.apply` holding the author's header. At a
//! branch such transactions are skipped (they came from the main). At the
//! main they are kept and split at those messages, each segment keeping its
//! original author's header, so the main's log is the relay. In both cases
//! the author's stamp is merged into this node's hybrid clock, so a local
//! change made after seeing a remote one always carries a larger stamp.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use branchsync_proto::{ChangeSetHeader, ConflictRecord, DdlChange, LogEntry, OldRow, RowChange, TableDesc, Value, Verdict};
use futures::TryStreamExt;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::clock::{next_stamp, PG_EPOCH_OFFSET_US};
use crate::ddl::{parse, DdlMessage, DDL_MESSAGE_PREFIX};
use crate::log::{ChangeLog, Completion};
use crate::pg::{self, fmt_lsn};
use crate::pgoutput::{self, OldTuple, PgOutputMessage, Relation, ReplicaIdentity};
use crate::scope::Scope;
use crate::state::{ApplyMark, APPLY_MESSAGE_PREFIX, CONFLICT_MESSAGE_PREFIX, VERDICT_MESSAGE_PREFIX};
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
    /// Pause between polls when the slot had nothing.
    pub poll_interval: Duration,
    /// `upto_nchanges` of one peek.
    pub batch_changes: i32,
    /// A branch under `[ddl] from = "main"`: its own DDL stays local (it is
    /// counted, not logged), so the main never receives it.
    pub ddl_local_only: bool,
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
    /// DDL that ran but cannot be replicated (inside a function called by a
    /// query, or a string the parser rejects); see the log for which.
    pub ddl_unreplicable: u64,
    /// Everything committed before this WAL position is in the log and its
    /// tombstones are written back.
    pub caught_up_lsn: u64,
}

/// A segment of a transaction: the changes of one ChangeSet.
struct Segment {
    header: ChangeSetHeader,
    part: u32,
    tables: Vec<TableDesc>,
    table_index: HashMap<u32, u32>,
    changes: Vec<RowChange>,
    /// The main's commit time of the transaction (relay only; 0 at branches).
    relay_ts_us: i64,
}

impl Segment {
    fn new(header: ChangeSetHeader, relay_ts_us: i64) -> Segment {
        Segment { header, part: 0, tables: Vec::new(), table_index: HashMap::new(), changes: Vec::new(), relay_ts_us }
    }

    /// Index of a table description given whole (verdicts carry their own).
    fn table_desc(&mut self, desc: TableDesc) -> u32 {
        if let Some(i) = self.tables.iter().position(|d| *d == desc) {
            return i as u32;
        }
        self.tables.push(desc);
        (self.tables.len() - 1) as u32
    }

    fn table(&mut self, rel: &Relation) -> u32 {
        if let Some(i) = self.table_index.get(&rel.oid) {
            // The same table changed shape within this ChangeSet (DDL between
            // its rows): later rows get a description of their own.
            let same = self.tables.get(*i as usize).is_some_and(|d| {
                d.schema == rel.namespace && d.name == rel.name && d.columns.len() == rel.columns.len() && d.columns.iter().zip(&rel.columns).all(|(a, b)| *a == b.name)
            });
            if same {
                return *i;
            }
        }
        let i = self.tables.len() as u32;
        self.tables.push(TableDesc {
            schema: rel.namespace.clone(),
            name: rel.name.clone(),
            columns: rel.columns.iter().map(|c| c.name.clone()).collect(),
            key: rel.columns.iter().map(|c| c.is_key()).collect(),
            identity_full: rel.replica_identity == ReplicaIdentity::Full,
        });
        self.table_index.insert(rel.oid, i);
        i
    }

    /// Takes the pending changes as a fragment.
    fn fragment(&mut self, log: &ChangeLog, last: bool) -> LogEntry {
        let e = LogEntry {
            pos: log.allocate_pos(),
            header: self.header.clone(),
            part: self.part,
            last,
            tables: std::mem::take(&mut self.tables),
            changes: std::mem::take(&mut self.changes),
            relay_ts_us: self.relay_ts_us,
        };
        self.table_index.clear();
        self.part += 1;
        e
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

/// The transaction being decoded.
struct Txn {
    commit_lsn: u64,
    commit_ts_us: i64,
    /// Already in the log (re-delivered after a crash, R1).
    duplicate: bool,
    /// Written by branchsync's apply, skipped at a branch (R3).
    applied_here: bool,
    segment: Segment,
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
    relations: HashMap<u32, Relation>,
    captured_lsn: u64,
    last_stamp: u64,
    /// Branch: the main's commit time of the last relay entry applied here,
    /// in commit order (the causal context of the next local change, R15).
    seen_main_ts: i64,
    /// This node's clock offsets (R14): `(from local time µs, offset µs)`,
    /// ascending.
    offsets: Vec<(i64, i64)>,
    /// Deletes of local ChangeSets whose tombstones are written back after
    /// the log is durable.
    tombstones: Vec<LocalDelete>,
    /// Messages the last peek returned (fewer than the limit: drained).
    peeked: i64,
    txn: Option<Txn>,
    /// Status counters.
    pub status: CaptureStatus,
}

impl Capturer {
    /// Capture state on top of `log`.
    pub fn new(cfg: CaptureConfig, log: Arc<ChangeLog>) -> Result<Capturer, EngineError> {
        let captured_lsn = log.captured_lsn()?;
        let last_stamp = log.last_stamp()?;
        let seen_main_ts = log.seen_main_ts()?;
        Ok(Capturer {
            cfg,
            log,
            relations: HashMap::new(),
            captured_lsn,
            last_stamp,
            seen_main_ts,
            offsets: Vec::new(),
            tombstones: Vec::new(),
            peeked: 0,
            txn: None,
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
                let relay_ts = if self.cfg.role == Role::Main { ts } else { 0 };
                self.txn = Some(Txn {
                    commit_lsn: b.final_lsn,
                    commit_ts_us: ts,
                    duplicate,
                    applied_here: false,
                    segment: Segment::new(header, relay_ts),
                    ddl_seen: Default::default(),
                    done: Vec::new(),
                    rows: 0,
                });
            }
            PgOutputMessage::Relation(r) => {
                self.relations.insert(r.oid, r);
            }
            PgOutputMessage::Type(_) | PgOutputMessage::Origin(_) => {}
            PgOutputMessage::Message(m) => {
                if m.prefix == DDL_MESSAGE_PREFIX && m.transactional() {
                    self.ddl_message(&m.content, m.lsn)?;
                    return Ok(None);
                }
                if (m.prefix == VERDICT_MESSAGE_PREFIX || m.prefix == CONFLICT_MESSAGE_PREFIX) && m.transactional() {
                    self.decision_message(&m.prefix, &m.content, m.lsn)?;
                    return Ok(None);
                }
                if m.prefix != APPLY_MESSAGE_PREFIX || !m.transactional() {
                    return Ok(None);
                }
                let mark = ApplyMark::decode(&m.content).map_err(|e| EngineError::Corrupt(format!("undecodable apply message at {}: {e}", fmt_lsn(m.lsn))))?;
                let header = mark.header;
                let Some(txn) = self.txn.as_mut() else { return Ok(None) };
                if txn.duplicate {
                    return Ok(None);
                }
                // Hybrid clock: never stamp below what this node has seen.
                self.last_stamp = self.last_stamp.max(header.stamp);
                match self.cfg.role {
                    Role::Branch => {
                        txn.applied_here = true;
                        // Local transactions committed after this one have
                        // seen the main up to this relay entry (R15).
                        self.seen_main_ts = self.seen_main_ts.max(mark.relay_ts_us);
                    }
                    Role::Main => {
                        txn.ddl_seen.clear();
                        let relay_ts = txn.segment.relay_ts_us;
                        let prev = std::mem::replace(&mut txn.segment, Segment::new(header, relay_ts));
                        let mut prev = prev;
                        if !prev.changes.is_empty() || prev.part > 0 {
                            txn.done.push(prev.fragment(&self.log, true));
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
                } else if !txn.segment.changes.is_empty() || txn.segment.part > 0 {
                    txn.done.push(txn.segment.fragment(&self.log, true));
                }
                let completion = Completion { captured_lsn: c.commit_lsn, stamp: self.last_stamp, seen_main_ts: self.seen_main_ts };
                self.log.append(&txn.done, Some(completion))?;
                self.captured_lsn = c.commit_lsn;
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
                let rel_of = |oid: u32| -> Result<&Relation, EngineError> {
                    self.relations.get(&oid).ok_or_else(|| EngineError::Corrupt(format!("row change for unknown relation {oid}")))
                };
                let in_scope = |r: &Relation| self.cfg.scope.includes(&r.namespace, &r.name);
                let seg = &mut txn.segment;
                let pushed = match change {
                    PgOutputMessage::Insert(i) => {
                        let r = rel_of(i.rel)?;
                        in_scope(r).then(|| {
                            let t = seg.table(r);
                            RowChange::Insert { table: t, new: i.new }
                        })
                    }
                    PgOutputMessage::Update(u) => {
                        let r = rel_of(u.rel)?;
                        in_scope(r).then(|| {
                            let t = seg.table(r);
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
                            RowChange::Update { table: t, old, new }
                        })
                    }
                    PgOutputMessage::Delete(d) => {
                        let r = rel_of(d.rel)?;
                        in_scope(r).then(|| {
                            let t = seg.table(r);
                            RowChange::Delete { table: t, old: old_row(d.old) }
                        })
                    }
                    PgOutputMessage::Truncate(t) => {
                        let mut tables = Vec::new();
                        for oid in &t.rels {
                            let r = rel_of(*oid)?;
                            if in_scope(r) {
                                tables.push(seg.table(r));
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
                    self.push_change(ch)?;
                }
            }
        }
        Ok(None)
    }

    /// Adds a change to the open transaction's segment; a full fragment goes
    /// to the log now, invisible until the transaction's last fragment is
    /// written.
    fn push_change(&mut self, ch: RowChange) -> Result<(), EngineError> {
        let Some(txn) = self.txn.as_mut() else { return Ok(()) };
        let seg = &mut txn.segment;
        seg.changes.push(ch);
        txn.rows += 1;
        if seg.changes.len() >= self.cfg.fragment_rows {
            let f = seg.fragment(&self.log, false);
            txn.done.push(f);
            self.log.append(&txn.done, None)?;
            txn.done.clear();
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
                s.relations.is_empty()
                    || s.relations.iter().any(|r| scope.includes(r.schema.as_deref().unwrap_or(&default_schema), &r.name))
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

    /// Peeks at the slot once, logs what committed, makes it durable, then
    /// confirms the slot. Returns the number of transactions seen.
    pub async fn poll_once(&mut self, client: &Client) -> Result<u64, EngineError> {
        self.load_offsets(client).await?;
        // Commits flushed before this point are all decodable now.
        let flushed: String = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(EngineError::pg("reading the WAL position"))?
            .get(0);
        let flushed = pg::parse_lsn(&flushed).unwrap_or(0);
        self.peeked = 0;
        let end = self.read_batch(client).await?;
        let drained = self.peeked < i64::from(self.cfg.batch_changes);
        let seen = match end {
            Some((end_lsn, seen)) => {
                self.log.flush().await?;
                failpoints::hit(failpoints::CAPTURE_AFTER_LOG_WRITE);
                // Only now, with the log durable, may the slot forget these
                // transactions (R1).
                self.advance(client, end_lsn).await?;
                self.write_back_tombstones(client).await?;
                seen
            }
            None => 0,
        };
        if drained {
            self.status.caught_up_lsn = self.status.caught_up_lsn.max(flushed);
        }
        Ok(seen)
    }

    /// Records the deletes of local ChangeSets in `branchsync.row_version`
    /// (tombstones, with the deleted row), unless the row exists again: the
    /// version a concurrent change from elsewhere is decided against. Runs
    /// after the log is durable; a crash before it loses nothing the log
    /// does not hold, and the tombstone then only misses its row image.
    async fn write_back_tombstones(&mut self, client: &Client) -> Result<(), EngineError> {
        if self.tombstones.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.tombstones);
        let mut pk_cache: HashMap<(String, String), Vec<String>> = HashMap::new();
        for d in pending {
            let key = (d.schema.clone(), d.table.clone());
            if !pk_cache.contains_key(&key) {
                let pk = crate::apply::LocalTable::load(client, &d.schema, &d.table).await?.map(|t| t.pk).unwrap_or_default();
                pk_cache.insert(key.clone(), pk);
            }
            let pk = &pk_cache[&key];
            if pk.is_empty() {
                continue;
            }
            let mut parts = Vec::new();
            let mut row = serde_json::Map::new();
            for (c, v) in d.columns.iter().zip(&d.old) {
                row.insert(c.clone(), v.as_text().map(|t| serde_json::Value::String(t.to_string())).unwrap_or(serde_json::Value::Null));
            }
            for k in pk {
                let Some(i) = d.columns.iter().position(|c| c == k) else { break };
                parts.push(d.old.get(i).and_then(Value::as_text).unwrap_or("").to_string());
            }
            if parts.len() != pk.len() {
                continue;
            }
            let key_text = crate::apply::key_text(&parts.iter().map(String::as_str).collect::<Vec<_>>());
            let tbl = format!("{}.{}", d.schema, d.table);
            let exists_sql = format!(
                "SELECT EXISTS (SELECT 1 FROM {}.{} t WHERE json_build_array({})::text = $1)",
                branchsync_proto::changeset::quote_ident(&d.schema),
                branchsync_proto::changeset::quote_ident(&d.table),
                pk.iter().map(|c| format!("t.{}::text", branchsync_proto::changeset::quote_ident(c))).collect::<Vec<_>>().join(", ")
            );
            let exists: bool = match client.query_one(&exists_sql, &[&key_text]).await {
                Ok(r) => r.get(0),
                // The table is gone since: nothing to remember.
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => continue,
                Err(e) => return Err(EngineError::pg("checking a deleted row")(e)),
            };
            if exists {
                continue;
            }
            let stamp = d.stamp as i64;
            client
                .execute(
                    "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, row_data) \
                     VALUES ($1, $2, $3, $4, true, $5, $5, $6::text::jsonb) \
                     ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = true, \
                         ts = excluded.ts, local_ts = excluded.local_ts, row_data = excluded.row_data \
                     WHERE rv.local_ts <= excluded.local_ts",
                    &[&tbl, &key_text, &stamp, &self.cfg.node, &d.commit_ts_us, &serde_json::Value::Object(row).to_string()],
                )
                .await
                .map_err(EngineError::pg("recording a tombstone"))?;
        }
        Ok(())
    }

    /// Reads one peek batch into the log (not yet flushed). Returns the end
    /// LSN of the last whole transaction and how many were seen.
    pub async fn read_batch(&mut self, client: &Client) -> Result<Option<(u64, u64)>, EngineError> {
        let limit = self.cfg.batch_changes;
        let rows = client
            .query_raw(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, 'proto_version', '1', 'publication_names', $3, 'messages', 'true')",
                [&self.cfg.slot as &(dyn tokio_postgres::types::ToSql + Sync), &limit, &self.cfg.publication],
            )
            .await
            .map_err(EngineError::pg("reading the replication slot"))?;
        futures::pin_mut!(rows);
        let mut end = None;
        let mut seen = 0;
        self.txn = None;
        while let Some(row) = rows.try_next().await.map_err(EngineError::pg("reading the replication slot"))? {
            self.peeked += 1;
            let data: &[u8] = row.get(0);
            let msg = pgoutput::decode(data).map_err(|e| EngineError::Corrupt(format!("undecodable pgoutput message: {e}")))?;
            if let Some(e) = self.handle(msg)? {
                end = Some(e);
                seen += 1;
            }
        }
        Ok(end.map(|e| (e, seen)))
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

/// Runs capture until `shutdown`; transient errors return to the caller,
/// which retries with backoff.
pub async fn run_capture(cfg: CaptureConfig, url: String, log: Arc<ChangeLog>, mut shutdown: watch::Receiver<bool>, status: watch::Sender<CaptureStatus>) -> Result<(), EngineError> {
    let conn = pg::connect(&url, "branchsync capture").await?;
    let poll = cfg.poll_interval;
    let mut cap = Capturer::new(cfg, log)?;
    let mut closed = conn.closed.clone();
    tracing::info!(lsn = %fmt_lsn(cap.captured_lsn), "capture started");
    loop {
        // Cancelling a poll at shutdown is safe: whatever was not confirmed
        // is delivered again and recognised by its commit LSN.
        let seen = tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            _ = closed.changed() => return Err(EngineError::ConnectionLost { context: "capturing changes".into() }),
            r = cap.poll_once(&conn.client) => r?,
        };
        status.send_replace(cap.status.clone());
        if seen == 0 {
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}
