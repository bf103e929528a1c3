//! The apply pipeline: the rows of consecutive insert-only ChangeSets are
//! queued and sent together, one statement per table, without waiting for
//! each answer.
//!
//! A catch-up backlog is mostly sales: many small transactions that only
//! insert. A statement per table and ChangeSet would cost the server a
//! statement's overhead for every few rows, and waiting for each a network
//! round trip. Instead the rows of each queued ChangeSet join the newest
//! batch of their table (one `INSERT … FROM unnest` per table and column
//! list, up to [`super::MAX_BATCH_ROWS`] rows), and the row versions (R13)
//! and parent checks (R9) of everything queued are accumulated per table.
//! At the main the versions are written packed: one
//! `branchsync.insert_versions` record per table, author and thousand rows
//! instead of a `row_version` row each (see [`crate::state`]).
//! [`Applier::drain`] sends one `branchsync.apply` message listing every
//! queued ChangeSet's mark with how many rows of each table the batches
//! insert for it ([`ApplyGroup`], R3), then the batches in order, then one
//! version upsert per table and one parent check per table, all in one
//! pipeline.
//!
//! At the main, a ChangeSet that only inserts and changes delta columns
//! (a sale that adds to stock counts and balances, R16) joins the queue
//! too: such a change never clashes, so it needs no decision. The changes
//! of delta columns of every queued ChangeSet are folded into one
//! statement per table ([`super::sql::delta_update`]): each key's
//! differences are summed and the row is written once per group, after the
//! batches, without waiting for the answer. The answers are read when the
//! queue drains: a row found missing must be decided after all, so the
//! group is rolled back and replayed change by change
//! ([`EngineError::QueuedRowMissing`]). The folded rows come after every
//! row the apply message counts, so the main's capture gives them to the
//! group's last ChangeSet: the relay carries each such row once per group,
//! as the main holds it with the group's differences added, under the same
//! author, in the main's commit order (R3). Deltas commute, so a node that
//! applies the relay ends with the same row whichever of the group's
//! ChangeSets the row travels with; the author takes it with the echo of
//! the last one, which is no older than its own changes of the row.
//!
//! While a catch-up fills the queue, it is sent ahead every
//! [`DRAIN_ROWS`] rows ([`Applier::drain_ahead`]): the statements go out in
//! order at once, a task of their own reads their answers, and apply
//! decodes and queues the next rows while the server executes these (the
//! daemon and the apply backend worked in turns before: each half idle
//! while the other ran). At most one queue is in flight; its answers are
//! read (and its parent checks run, parking orphans) before the next queue
//! is sent, and before anything that must see its rows.
//!
//! # Correctness
//!
//! Every statement still runs inside the open apply transaction, so the
//! queue changes *when* statements are sent, never *what* commits: the
//! transaction commits (with its progress) only after [`Applier::drain`]
//! returned without error; a queue sent ahead is answered before that, and
//! when it failed, its error is the transaction's (a statement sent after
//! it fails only because the transaction is aborted). Anything that must see earlier rows — a lock
//! before an update or delete, careful replay, the commit — drains first.
//! Inserts only ever queue behind inserts; among inserts with distinct keys
//! the order of tables does not change the result, and a key or constraint
//! clash makes the batch fail as a whole and replays it carefully.
//!
//! The main's capture splits the group back into ChangeSets by the counts:
//! a batch inserts its rows in queue order (`unnest` keeps array order, and
//! the main's inserts have no `ON CONFLICT`, so every row is written), and a
//! table's batches are sent in order, so its rows reach the WAL in
//! ChangeSet order. Rows written after the group's statements (a very large
//! row sent on its own, the rest of a ChangeSet queued after a drain) are
//! beyond every count and belong to the last ChangeSet, which they do: a new
//! mark is never queued while such rows wait ([`Queue::unmarked`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use branchsync_proto::changeset::quote_ident;
use branchsync_proto::{LogEntry, RowChange, Value};
use futures::future::FutureExt;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Statement;

use super::column::TextColumn;
use super::table::InsertPlan;
use super::{sql, Applier, Mapping};
use crate::catalog::{key_text_of, ForeignKey, LocalTable};
use crate::state::{ApplyGroup, ApplyMark, GroupedRows, APPLY_MESSAGE_PREFIX, PACKED_VERSION_KEYS};
use crate::EngineError;

/// Queued rows after which the queue is sent ahead, mid-group: the server
/// executes them while apply decodes and queues the next ones.
const DRAIN_ROWS: usize = 4_000;
/// Queued statements after which the queue is sent even mid-group.
const DRAIN_STATEMENTS: usize = 512;
/// Queued ChangeSets after which the queue is sent even mid-group (their
/// marks travel in one apply message; ChangeSets whose rows all went
/// elsewhere, parked or out of scope, add marks without rows).
const DRAIN_MARKS: usize = 10_000;
/// Queued bytes of values after which the queue is sent even mid-group
/// (one queue is in flight while the next fills: twice this at most).
const DRAIN_BYTES: usize = 8 * 1024 * 1024;

/// Rows larger than this are staged with `COPY` instead of bound.
const STAGE_ABOVE_BYTES: usize = 16 * 1024 * 1024;
/// Pieces a staged value is sent in.
const STAGE_PIECE_BYTES: usize = 1024 * 1024;

/// Escapes bytes of a text value for `COPY … FROM STDIN` (text format).
/// The special bytes are ASCII, never part of a multi-byte character, so a
/// value may be escaped piece by piece.
fn copy_escape(piece: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len() + piece.len() / 64 + 8);
    for &b in piece {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.push(b),
        }
    }
    out
}

/// Splits rows into batches of at most [`super::MAX_BATCH_ROWS`] rows and
/// about [`super::MAX_BATCH_BYTES`] bytes of the values in `cols`; a row
/// larger than that is a batch of its own (R24).
pub(super) fn byte_chunks<'a, R: AsRef<[Value]>>(rows: &'a [R], cols: &[usize]) -> Vec<&'a [R]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, r) in rows.iter().enumerate() {
        let size: usize = cols.iter().map(|c| r.as_ref().get(*c).and_then(Value::as_text).map_or(0, str::len) + 2).sum();
        if i > start && (i - start >= super::MAX_BATCH_ROWS || bytes + size > super::MAX_BATCH_BYTES) {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

pub(super) fn chunk_bytes<R: AsRef<[Value]>>(rows: &[R], cols: &[usize]) -> usize {
    rows.iter().map(|r| cols.iter().map(|c| r.as_ref().get(*c).and_then(Value::as_text).map_or(0, str::len)).sum::<usize>()).sum()
}

/// Rows of one table queued for one statement: one text array per column.
struct Batch {
    /// `(schema, table)` as the ChangeSet names it (and capture sees it).
    table: (String, String),
    text: String,
    st: Statement,
    arrays: Vec<TextColumn>,
    /// The echo guard's commit time: such a batch holds the rows of one
    /// ChangeSet only.
    echo_ts: Option<i64>,
    /// Echoes of several ChangeSets (a branch): `st` writes over the rows
    /// that are here, this statement inserts the others, and `ts` holds the
    /// commit time of each row's change ([`sql::echo_update`]).
    echo_insert: Option<Statement>,
    ts: Vec<i64>,
    rows: usize,
    bytes: usize,
}

/// Statements and accumulated bookkeeping not sent yet.
#[derive(Default)]
pub(super) struct Queue {
    /// The marks of the ChangeSets whose rows are queued, in order, with the
    /// rows of each table queued for each (R3, see [`ApplyGroup`]).
    marks: Vec<(ApplyMark, Vec<GroupedRows>)>,
    /// Rows are queued that belong to a ChangeSet whose mark was sent with
    /// an earlier group: no new mark may be sent before them.
    unmarked: bool,
    /// One statement per table (and column list) for the rows of all queued
    /// ChangeSets, in order of first appearance.
    batches: Vec<Batch>,
    rows: usize,
    bytes: usize,
    /// Row versions per (table, author, packed): keys, stamps, author commit
    /// times. Packed ones go to `branchsync.insert_versions`, the others
    /// (tables under `branch_wins`, whose rows' owner must outlive a later
    /// local change) to `branchsync.row_version`, a row each.
    versions: BTreeMap<(String, String, bool), QueuedVersions>,
    /// Keys to check for missing parents, per table with foreign keys.
    /// (one array per key column).
    parents: BTreeMap<String, (std::sync::Arc<LocalTable>, Vec<TextColumn>)>,
    /// The values the queued rows hold in each foreign key's columns, per
    /// table (one array per column, per foreign key in [`LocalTable::parents`]
    /// order); `None` once a row came without one of those columns.
    fk_values: BTreeMap<String, Option<Vec<Vec<TextColumn>>>>,
    /// The foreign-key values in [`Queue::fk_values`], per table and
    /// foreign key (the text of a one-column value, [`key_text_of`] of
    /// more): each is sent once.
    fk_seen: HashMap<String, Vec<HashSet<String>>>,
    /// The main: the keys of the rows queued into each table that other
    /// tables reference. A queued row whose foreign key points at one of
    /// them needs no parent check (see [`ParentsQueued`]).
    parents_queued: HashMap<String, ParentsQueued>,
    /// Changes of delta columns (the main), folded into one statement per
    /// table, sent after the batches.
    deltas: Vec<QueuedDelta>,
    /// Header of the last queued ChangeSet (recorded with parked rows).
    header: Option<Vec<u8>>,
    /// Branch: `branchsync.echo_settled` moves up to this commit time after
    /// the queued statements (echoes the main wrote as sent).
    settle: Option<i64>,
}

impl Queue {
    pub(super) fn is_empty(&self) -> bool {
        self.marks.is_empty() && self.batches.is_empty() && self.deltas.is_empty() && self.versions.is_empty() && self.parents.is_empty() && self.settle.is_none()
    }

    /// Moves the settled mark up to `ts` once the queued statements ran.
    pub(super) fn settle_through(&mut self, ts: i64) {
        self.settle = Some(self.settle.map_or(ts, |s| s.max(ts)));
    }

    /// A settled mark waits to be written.
    pub(super) fn settling(&self) -> bool {
        self.settle.is_some()
    }
}

/// The keys of the rows queued into one referenced table, at the main.
///
/// The main inserts every queued row as sent (no `ON CONFLICT`: a clash
/// fails the whole send, which is replayed change by change), and the
/// parent checks of a send run after its batches. So a foreign-key value
/// equal to the key of a row queued in the same send always finds its
/// parent, and apply leaves it out of the values it checks: the order lines
/// of a catch-up of sales, whose orders travel with them, need no probe.
/// What counts as equal is narrow on purpose: the foreign key references
/// exactly the table's primary key, its columns have the key's types, and
/// the texts (as the author sent them) are the same. Anything else is
/// checked as before. A parent parked as an orphan later in the same
/// settle leaves its children applied, as it did when the check found it.
struct ParentsQueued {
    /// The primary key's columns, quoted, in key order.
    columns: Vec<String>,
    /// Their types.
    types: Vec<String>,
    /// The queued rows' keys ([`key_text_of`]).
    keys: HashSet<String>,
}

impl ParentsQueued {
    fn of(t: &LocalTable) -> ParentsQueued {
        ParentsQueued {
            columns: t.pk.iter().map(|c| quote_ident(c)).collect(),
            types: t.pk.iter().map(|c| t.columns.get(c).map(|c| c.type_name.clone()).unwrap_or_default()).collect(),
            keys: HashSet::new(),
        }
    }

    /// Where each key column sits in `f`'s columns, if `f` references
    /// exactly this key with columns of the same types in `child`.
    fn order_in(&self, f: &ForeignKey, child: &LocalTable) -> Option<Vec<usize>> {
        if f.parent_columns.len() != self.columns.len() {
            return None;
        }
        let mut order = Vec::with_capacity(self.columns.len());
        for (col, ty) in self.columns.iter().zip(&self.types) {
            let j = f.parent_columns.iter().position(|p| p == col)?;
            let child_type = f.column_names.get(j).and_then(|c| child.columns.get(c)).map(|c| c.type_name.as_str());
            if ty.is_empty() || child_type != Some(ty.as_str()) {
                return None;
            }
            order.push(j);
        }
        Some(order)
    }
}

/// Changes of delta columns to rows of one table, from every queued
/// ChangeSet ([`sql::delta_update`]).
struct QueuedDelta {
    table: String,
    st: Statement,
    /// Where the key and the delta columns sit in the author's rows.
    key_src: Vec<usize>,
    delta_src: Vec<usize>,
    /// The key columns, then the new and the old value of each delta column.
    arrays: Vec<TextColumn>,
    /// The distinct keys: the statement updates each once.
    keys: std::collections::HashSet<Vec<Option<String>>>,
}

/// Queued row versions of one table and author: keys, stamps, author
/// commit times.
type QueuedVersions = (Vec<String>, Vec<i64>, Vec<i64>);

/// `true` when a fragment can be queued: inserts only.
pub(super) fn insert_only(e: &LogEntry) -> bool {
    !e.changes.is_empty() && e.changes.iter().all(|c| matches!(c, RowChange::Insert { .. }))
}

impl Applier {
    /// Queues the apply mark of a ChangeSet (R3): it is sent, with the marks
    /// of the other queued ChangeSets, before their rows.
    pub(super) async fn queue_apply_message(&mut self, mark: ApplyMark) -> Result<(), EngineError> {
        if self.queue.unmarked {
            // The rest of the previous ChangeSet goes first.
            self.drain().await?;
        }
        self.queue.marks.push((mark, Vec::new()));
        Ok(())
    }

    /// Queues the inserts of an insert-only fragment, one statement per
    /// table (in order of first appearance) and batch.
    pub(super) async fn queue_inserts(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>]) -> Result<(), EngineError> {
        let mut buckets: Vec<(u32, Vec<&Vec<Value>>)> = Vec::new();
        for ch in &e.changes {
            if let RowChange::Insert { table, new } = ch {
                match buckets.iter_mut().find(|(t, _)| t == table) {
                    Some((_, rows)) => rows.push(new),
                    None => buckets.push((*table, vec![new])),
                }
            }
        }
        self.queue_buckets(e, maps, buckets).await?;
        if self.queue.rows >= DRAIN_ROWS || self.queue.batches.len() + self.queue.deltas.len() >= DRAIN_STATEMENTS || self.queue.bytes >= DRAIN_BYTES || self.queue.marks.len() >= DRAIN_MARKS {
            self.drain_ahead().await?;
        }
        Ok(())
    }

    /// Queues the changes of delta columns of a ChangeSet that
    /// [`Applier::deltas_queueable`] let in, into one statement per table
    /// for the whole queue ([`sql::delta_update`]: a key's
    /// differences are summed, so it is written once per group).
    pub(super) async fn queue_deltas(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>]) -> Result<(), EngineError> {
        for ch in &e.changes {
            let RowChange::Update { table, old: Some(o), new } = ch else { continue };
            let (Some(m), Some(desc)) = (maps.get(*table as usize).and_then(|m| m.clone()), e.tables.get(*table as usize)) else {
                return Err(EngineError::Corrupt(format!("a queued change names table {table} that its ChangeSet does not describe")));
            };
            let Some(ks) = m.key_src.clone() else { return Err(EngineError::Corrupt(format!("a queued change of {} has no key", m.table.name))) };
            let at = match self.queue.deltas.iter().position(|d| d.table == m.table.name) {
                Some(at) => at,
                None => {
                    let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
                    let delta_src = super::decide::delta_sources(&m, &rule);
                    let names: Vec<&str> = delta_src.iter().map(|c| m.targets[*c].as_deref().unwrap_or_default()).collect();
                    let st = self.stmt(&sql::delta_update(&m.table, &names), &vec![Type::TEXT_ARRAY; ks.len() + 2 * names.len()]).await?;
                    self.queue.deltas.push(QueuedDelta {
                        table: m.table.name.clone(),
                        st,
                        key_src: ks.clone(),
                        delta_src,
                        arrays: vec![TextColumn::default(); ks.len() + 2 * names.len()],
                        keys: std::collections::HashSet::new(),
                    });
                    self.queue.deltas.len() - 1
                }
            };
            let d = &mut self.queue.deltas[at];
            let key: Vec<Option<String>> = d.key_src.iter().map(|k| o.values.get(*k).and_then(Value::as_text).map(str::to_string)).collect();
            for (j, k) in key.iter().enumerate() {
                d.arrays[j].push(k.as_deref());
            }
            let nk = d.key_src.len();
            for (j, c) in d.delta_src.iter().enumerate() {
                d.arrays[nk + 2 * j].push(new.get(*c).and_then(Value::as_text));
                d.arrays[nk + 2 * j + 1].push(o.values.get(*c).and_then(Value::as_text));
            }
            d.keys.insert(key);
            self.queue.rows += 1;
        }
        if self.queue.marks.is_empty() {
            // This ChangeSet's mark went out with an earlier group.
            self.queue.unmarked = true;
        }
        Ok(())
    }

    /// The insert plan of `m` under `guard`, built on first use.
    fn insert_plan(&self, m: &Mapping, table: &(String, String), guard: sql::Guard) -> std::sync::Arc<InsertPlan> {
        let key = (guard, self.wing.settles());
        let mut plans = m.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, p)) = plans.iter().find(|(k, _)| *k == key) {
            return p.clone();
        }
        let cols: Vec<usize> = (0..m.targets.len()).filter(|i| m.targets[*i].is_some()).collect();
        let names: Vec<&str> = cols.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let text = if self.wing.obeys() { sql::upsert(&m.table, &names, guard) } else { sql::insert(&m.table, &names, false) };
        let mut types = vec![Type::TEXT_ARRAY; cols.len()];
        if guard.takes_ts() {
            types.push(Type::INT8);
        }
        let echo = if guard.takes_ts() { sql::echo_update(&m.table, &names, self.wing.settles()).zip(sql::echo_insert(&m.table, &names)) } else { None };
        let fk_srcs = m
            .table
            .parents
            .iter()
            .map(|f| f.column_names.iter().map(|c| m.targets.iter().position(|t| t.as_deref() == Some(c.as_str()))).collect())
            .collect();
        let plan = std::sync::Arc::new(InsertPlan {
            names: names.iter().map(|n| n.to_string()).collect(),
            cols,
            text,
            types,
            echo,
            owned: self.cfg.tables.for_table(&table.0, &table.1).rule == crate::conflict::ConflictRule::BranchWins,
            fk_srcs,
        });
        plans.push((key, plan.clone()));
        plan
    }

    /// Counts `n` rows of `table` for the ChangeSet being queued.
    fn count_queued(&mut self, table: &(String, String), n: usize) {
        let Some((_, counts)) = self.queue.marks.last_mut() else {
            self.queue.unmarked = true;
            return;
        };
        match counts.iter_mut().find(|(s, t, _)| *s == table.0 && *t == table.1) {
            Some(c) => c.2 += n as u32,
            None => counts.push((table.0.clone(), table.1.clone(), n as u32)),
        }
    }

    /// Queues one insert per table bucket and batch, with row versions and
    /// parent checks to follow at [`Applier::drain`]. The rows join the
    /// newest batch of their table when its statement is the same and has
    /// room, so consecutive ChangeSets share one statement per table.
    pub(super) async fn queue_buckets(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>], buckets: Vec<(u32, Vec<&Vec<Value>>)>) -> Result<(), EngineError> {
        let stamp = e.header.stamp as i64;
        for (t, rows) in buckets {
            let Some(m) = maps[t as usize].as_ref() else { continue };
            let written = m.targets.iter().filter(|c| c.is_some()).count();
            if written == 0 {
                continue;
            }
            let table = e.tables.get(t as usize).map(|d| (d.schema.clone(), d.name.clone())).unwrap_or_default();
            // A branch takes the main's rows as they come; the main decides
            // (a clash fails the batch and is replayed carefully).
            let guard = self.guard_for(e, written + 1);
            let echo = guard.takes_ts();
            let plan = self.insert_plan(m, &table, guard);
            let (cols, names): (&[usize], Vec<&str>) = (&plan.cols, plan.names.iter().map(String::as_str).collect());
            let types = &plan.types;
            let st = self.stmt(&plan.text, types).await?;
            let mut echo_ts = echo.then_some(e.header.commit_ts_us);
            // Echoes of many ChangeSets share two statements per table, each
            // row guarded by its own change's commit time.
            let mut queued = (&plan.text, st.clone(), None);
            if let (true, Some((upd, ins))) = (echo, &plan.echo) {
                let mut types = vec![Type::TEXT_ARRAY; cols.len()];
                types.push(Type::INT8_ARRAY);
                let u = self.stmt(upd, &types).await?;
                let i = self.stmt(ins, &types).await?;
                queued = (upd, u, Some(i));
                echo_ts = None;
            }
            let (text, batch_st, echo_insert) = queued;
            for chunk in byte_chunks(&rows, cols) {
                if chunk.len() == 1 && chunk_bytes(chunk, cols) > STAGE_ABOVE_BYTES {
                    // A very large row is streamed into a staging table in
                    // pieces and inserted from there: no copy of its value
                    // in a bound parameter or the client's buffers (R24).
                    self.drain().await?;
                    self.apply_staged(e, m, cols, &names, chunk[0]).await?;
                    continue;
                }
                if chunk.len() == 1 && chunk_bytes(chunk, cols) > super::MAX_BATCH_BYTES {
                    // A large row goes now, alone, its values borrowed from
                    // the entry: no copy of it waits in the queue.
                    self.drain().await?;
                    let big = guard.for_row(chunk_bytes(chunk, cols));
                    let st = if big == guard { st.clone() } else { self.stmt(&sql::upsert(&m.table, &names, big), types).await? };
                    let arrays: Vec<Vec<Option<&str>>> = cols.iter().map(|c| vec![chunk[0].get(*c).and_then(|v| v.as_text())]).collect();
                    let ts = e.header.commit_ts_us;
                    let mut p: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                    if echo {
                        p.push(&ts);
                    }
                    self.conn.client.execute(&st, &p).await.map_err(EngineError::pg(format!("applying a large row to {}", m.table.name)))?;
                    continue;
                }
                let bytes = chunk_bytes(chunk, cols);
                self.queue.bytes += bytes;
                self.queue.rows += chunk.len();
                self.count_queued(&table, chunk.len());
                let joins = self.queue.batches.iter().rposition(|b| b.table == table).filter(|i| {
                    let b = &self.queue.batches[*i];
                    b.text == *text && b.echo_ts == echo_ts && b.rows + chunk.len() <= super::MAX_BATCH_ROWS && b.bytes + bytes <= super::MAX_BATCH_BYTES
                });
                let each = echo_insert.is_some();
                let batch = match joins {
                    Some(i) => &mut self.queue.batches[i],
                    None => {
                        self.queue.batches.push(Batch {
                            table: table.clone(),
                            text: text.to_string(),
                            st: batch_st.clone(),
                            arrays: vec![TextColumn::default(); cols.len()],
                            echo_ts,
                            echo_insert: echo_insert.clone(),
                            ts: Vec::new(),
                            rows: 0,
                            bytes: 0,
                        });
                        let last = self.queue.batches.len() - 1;
                        &mut self.queue.batches[last]
                    }
                };
                for (a, c) in batch.arrays.iter_mut().zip(cols) {
                    for r in chunk.iter() {
                        a.push(r.get(*c).and_then(|v| v.as_text()));
                    }
                }
                if each {
                    batch.ts.extend(std::iter::repeat_n(e.header.commit_ts_us, chunk.len()));
                }
                batch.rows += chunk.len();
                batch.bytes += bytes;
                // Only rows queued in this send: a row sent before a drain
                // may have been parked by its parent check since.
                // Not where code fires on insert: it may drop the row or
                // change its key ([`LocalTable::insert_runs_code`]).
                if let (true, false, false, Some(ks)) = (self.wing.decides(), m.table.children.is_empty(), m.table.insert_runs_code, m.key_src.as_ref()) {
                    let q = self.queue.parents_queued.entry(m.table.name.clone()).or_insert_with(|| ParentsQueued::of(&m.table));
                    for r in chunk.iter() {
                        let parts: Option<Vec<&str>> = ks.iter().map(|k| r.get(*k).and_then(Value::as_text)).collect();
                        if let Some(parts) = parts {
                            q.keys.insert(key_text_of(parts));
                        }
                    }
                }
            }
            if let Some(ks) = m.key_src.as_ref() {
                fn key<'a>(r: &'a [Value], k: &usize) -> &'a str {
                    r.get(*k).and_then(Value::as_text).unwrap_or("")
                }
                // Row versions are for deciding, which only the main does.
                if self.wing.decides() {
                    let v = self.queue.versions.entry((m.table.name.clone(), e.header.author.clone(), self.wing.packed() && !plan.owned)).or_default();
                    for r in &rows {
                        v.0.push(key_text_of(ks.iter().map(|k| key(r, k))));
                        v.1.push(stamp);
                        v.2.push(e.header.commit_ts_us);
                    }
                }
                if !m.table.parents.is_empty() {
                    let keys = &mut self.queue.parents.entry(m.table.name.clone()).or_insert_with(|| (m.table.clone(), vec![TextColumn::default(); ks.len()])).1;
                    for r in &rows {
                        for (col, k) in keys.iter_mut().zip(ks) {
                            col.push(Some(key(r, k)));
                        }
                    }
                }
                if !m.table.parents.is_empty() {
                    // The foreign-key values as sent, so the parents can be
                    // checked on their distinct values first (few, where a
                    // batch has many lines of few orders). The main writes
                    // every row as sent. A branch writes a row as sent or
                    // leaves it as it is: equal to the one sent, or a local
                    // change the main has not decided yet, whose parents
                    // this database's foreign keys checked at its commit
                    // and the main checks again (R9) before its result
                    // comes back here.
                    // Each distinct value once per send, and none with a
                    // NULL (MATCH SIMPLE: no parent needed). The main
                    // leaves out values whose parent row is queued in this
                    // send ([`ParentsQueued`]).
                    let srcs = plan.fk_srcs.as_ref();
                    let Queue { fk_values, fk_seen, parents_queued, .. } = &mut self.queue;
                    let entry = fk_values.entry(m.table.name.clone()).or_insert_with(|| Some(m.table.parents.iter().map(|f| vec![TextColumn::default(); f.columns.len()]).collect()));
                    let seen = fk_seen.entry(m.table.name.clone()).or_insert_with(|| vec![HashSet::new(); m.table.parents.len()]);
                    match (srcs, entry.as_mut()) {
                        (Some(srcs), Some(values)) if values.len() == srcs.len() && seen.len() == srcs.len() => {
                            for (((fk, cols), f), seen) in values.iter_mut().zip(srcs).zip(&m.table.parents).zip(seen.iter_mut()) {
                                let queued = parents_queued.get(&f.parent_name).and_then(|q| Some((q.order_in(f, &m.table)?, &q.keys)));
                                for r in &rows {
                                    let Some(value) = cols.iter().map(|c| r.get(*c).and_then(Value::as_text)).collect::<Option<Vec<&str>>>() else { continue };
                                    let text = match value.as_slice() {
                                        [one] if seen.contains(*one) => continue,
                                        [one] => one.to_string(),
                                        more => key_text_of(more.iter().copied()),
                                    };
                                    if seen.contains(&text) {
                                        continue;
                                    }
                                    // A value is looked up among the queued
                                    // parents once, as it is sent once.
                                    let queued_parent = queued.as_ref().is_some_and(|(order, keys)| keys.contains(&key_text_of(order.iter().filter_map(|j| value.get(*j).copied()))));
                                    seen.insert(text);
                                    if !queued_parent {
                                        for (arr, v) in fk.iter_mut().zip(&value) {
                                            arr.push(Some(v));
                                        }
                                    }
                                }
                            }
                        }
                        _ => *entry = None,
                    }
                }
            }
        }
        self.queue.header = Some(rmp_serde::to_vec(&e.header).map_err(|err| EngineError::Corrupt(format!("cannot encode header: {err}")))?);
        Ok(())
    }

    /// Inserts (main) or upserts (branch) one very large row: the row is
    /// streamed with `COPY` into a temporary staging table, in pieces, then
    /// moved into the table by the same statement a batch would use.
    async fn apply_staged(&mut self, e: &LogEntry, m: &Mapping, cols: &[usize], names: &[&str], row: &[Value]) -> Result<(), EngineError> {
        use futures::SinkExt;
        let n = cols.len();
        let c = &self.conn.client;
        c.batch_execute(&sql::create_staging(n)).await.map_err(EngineError::pg("creating the staging table"))?;
        let copy = format!("COPY {} FROM STDIN", sql::staging(n));
        let sink = c.copy_in::<_, bytes::Bytes>(copy.as_str()).await.map_err(EngineError::pg("staging a large row"))?;
        futures::pin_mut!(sink);
        let staged = async {
            for (j, col) in cols.iter().enumerate() {
                if j > 0 {
                    sink.send(bytes::Bytes::from_static(b"\t")).await?;
                }
                match row.get(*col).and_then(Value::as_text) {
                    None => sink.send(bytes::Bytes::from_static(b"\\N")).await?,
                    Some(text) => {
                        for piece in text.as_bytes().chunks(STAGE_PIECE_BYTES) {
                            sink.send(bytes::Bytes::from(copy_escape(piece))).await?;
                        }
                    }
                }
            }
            sink.send(bytes::Bytes::from_static(b"\n")).await?;
            sink.as_mut().finish().await
        }
        .await;
        staged.map_err(EngineError::pg(format!("staging a large row of {}", m.table.name)))?;
        let guard = self.guard_for(e, 1).for_row(chunk_bytes(&[row], cols));
        let source = sql::staging(n);
        let text = if self.wing.obeys() { sql::upsert_from(&m.table, names, guard, &source) } else { sql::insert_from(&m.table, names, false, &source) };
        let ts = e.header.commit_ts_us;
        let params: Vec<&(dyn ToSql + Sync)> = if guard.takes_ts() { vec![&ts] } else { Vec::new() };
        let c = &self.conn.client;
        c.execute(text.as_str(), &params).await.map_err(EngineError::pg(format!("applying a large row to {}", m.table.name)))?;
        c.batch_execute(&format!("TRUNCATE {source}")).await.map_err(EngineError::pg("emptying the staging table"))?;
        Ok(())
    }

    /// Sends everything queued and waits for the answers: the marks of the
    /// queued ChangeSets as one apply message, then each batch, then the
    /// accumulated row versions and parent checks. Statements sent ahead
    /// are answered first. Errors leave the transaction aborted; the caller
    /// rolls back.
    pub(super) async fn drain(&mut self) -> Result<(), EngineError> {
        match self.send_queue().await? {
            Some(sent) => self.settle(sent).await,
            None => Ok(()),
        }
    }

    /// Sends everything queued without waiting for the answers, so that
    /// the server executes these rows while apply decodes and queues the
    /// next ones. The statements sent ahead before are answered first: the
    /// parent checks of one send run before the rows of the next, as they
    /// would in one drain.
    pub(super) async fn drain_ahead(&mut self) -> Result<(), EngineError> {
        self.in_flight = self.send_queue().await?;
        if self.in_flight.is_some() {
            self.stats.sent_ahead += 1;
        }
        Ok(())
    }

    /// Answers the statements sent ahead, then sends the queue, if any.
    async fn send_queue(&mut self) -> Result<Option<InFlight>, EngineError> {
        self.settle_in_flight().await?;
        if self.queue.is_empty() {
            return Ok(None);
        }
        let q = std::mem::take(&mut self.queue);
        self.send(q).await.map(Some)
    }

    /// Waits for the answers of the statements sent ahead, if any.
    pub(super) async fn settle_in_flight(&mut self) -> Result<(), EngineError> {
        match self.in_flight.take() {
            Some(sent) => self.settle(sent).await,
            None => Ok(()),
        }
    }

    /// The error of the statements sent ahead, if they failed (waiting for
    /// their answers): a statement sent after them in the same transaction
    /// fails only because they did.
    pub(super) async fn in_flight_error(&mut self) -> Option<EngineError> {
        let sent = self.in_flight.take()?;
        match sent.answers.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(EngineError::pg(SENT_CONTEXT)(e)),
            Err(e) => Some(EngineError::Corrupt(format!("the task reading apply's answers ended: {e}"))),
        }
    }

    /// Sends the statements of `q` in order and hands their answers to a
    /// task of their own, which reads them as they come (the connection
    /// reads nothing more until a statement's answer is taken).
    async fn send(&mut self, q: Queue) -> Result<InFlight, EngineError> {
        let Queue { marks, batches, versions, parents, fk_values, deltas, header, settle, .. } = q;
        let group = if marks.is_empty() {
            None
        } else {
            let body = rmp_serde::to_vec(&ApplyGroup { tag: ApplyGroup::TAG.into(), marks })
                .map_err(|err| EngineError::Corrupt(format!("cannot encode the apply mark: {err}")))?;
            Some((self.stmt(sql::EMIT_APPLY_MESSAGE, &[Type::TEXT, Type::BYTEA]).await?, self.seal(APPLY_MESSAGE_PREFIX, &body)))
        };
        let vst = self.stmt(&sql::upsert_versions_many(), &[Type::TEXT, Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::TEXT, Type::INT8_ARRAY]).await?;
        // Prepared only where the table is (never queued packed otherwise).
        let pst = match self.wing.packed() {
            true => Some(self.stmt(&sql::insert_packed_versions(), &[Type::TEXT, Type::TEXT, Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::INT8_ARRAY]).await?),
            false => None,
        };
        let mut park = Vec::new();
        for (tbl, (t, _)) in &parents {
            let mut types = vec![Type::TEXT_ARRAY; t.pk.len()];
            types.extend([Type::TEXT, Type::TEXT, Type::BYTEA]);
            park.push((tbl.clone(), self.stmt(&sql::park_orphans(t), &types).await?));
        }
        // Parents first checked on the distinct foreign-key values sent: a
        // table whose values all have their parents needs no check per row.
        let mut prechecks = Vec::new();
        for (tbl, (t, _)) in &parents {
            let Some(Some(values)) = fk_values.get(tbl) else { continue };
            for (i, f) in t.parents.iter().enumerate().take(values.len()) {
                if values[i].first().is_none_or(|c| c.len() == 0) {
                    // Every value's parent was queued with it.
                    continue;
                }
                let types = vec![Type::TEXT_ARRAY; f.columns.len()];
                prechecks.push((tbl.clone(), self.stmt(&sql::missing_parents(t, f), &types).await?, i));
                self.stats.parent_checks += 1;
            }
        }
        let settle = match settle {
            Some(ts) => Some((self.stmt(sql::SETTLE_ECHOES, &[Type::INT8]).await?, ts)),
            None => None,
        };
        let client = self.conn.client.clone();
        let batches = Arc::new(batches);
        let deltas = Arc::new(deltas);
        let fk_values = Arc::new(fk_values);
        let mut steps: Vec<Step> = Vec::with_capacity(batches.len() + versions.len() + deltas.len() + prechecks.len() + 2);
        if let Some((st, body)) = group {
            let c = client.clone();
            steps.push(async move { c.execute(&st, &[&APPLY_MESSAGE_PREFIX, &body]).await.map(|_| Answer::Done) }.boxed());
        }
        for i in 0..batches.len() {
            for echo_insert in [false, true] {
                if echo_insert && batches[i].echo_insert.is_none() {
                    continue;
                }
                let (c, batches) = (client.clone(), batches.clone());
                steps.push(
                    async move {
                        let b = &batches[i];
                        let mut p: Vec<&(dyn ToSql + Sync)> = b.arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                        match (&b.echo_ts, &b.echo_insert) {
                            (Some(ts), _) => p.push(ts),
                            (None, Some(_)) => p.push(&b.ts),
                            (None, None) => {}
                        }
                        let st = match (&b.echo_insert, echo_insert) {
                            (Some(ins), true) => ins,
                            _ => &b.st,
                        };
                        c.execute(st, &p).await.map(|_| Answer::Done)
                    }
                    .boxed(),
                );
            }
        }
        let versions = Arc::new(versions.into_iter().collect::<Vec<_>>());
        for i in 0..versions.len() {
            let ((_, _, packed), (keys, _, _)) = &versions[i];
            match (*packed, &pst) {
                (true, Some(pst)) => {
                    for at in (0..keys.len()).step_by(PACKED_VERSION_KEYS) {
                        let (c, versions, pst) = (client.clone(), versions.clone(), pst.clone());
                        steps.push(
                            async move {
                                let ((tbl, author, _), (keys, stamps, ts)) = &versions[i];
                                let end = (at + PACKED_VERSION_KEYS).min(keys.len());
                                let (keys, stamps, ts) = (&keys[at..end], &stamps[at..end], &ts[at..end]);
                                c.execute(&pst, &[tbl, author, &keys, &stamps, &ts]).await.map(|_| Answer::Done)
                            }
                            .boxed(),
                        );
                    }
                }
                _ => {
                    let (c, versions, vst) = (client.clone(), versions.clone(), vst.clone());
                    steps.push(
                        async move {
                            let ((tbl, author, _), (keys, stamps, ts)) = &versions[i];
                            c.execute(&vst, &[tbl, keys, stamps, author, ts]).await.map(|_| Answer::Done)
                        }
                        .boxed(),
                    );
                }
            }
        }
        if let Some((st, ts)) = settle {
            // After the batches: pipelined statements run in order.
            let c = client.clone();
            steps.push(async move { c.execute(&st, &[&ts]).await.map(|_| Answer::Done) }.boxed());
        }
        // After the batches (a change of a row inserted in the group finds
        // it): the queued changes of delta columns, with their answers.
        for i in 0..deltas.len() {
            let (c, deltas) = (client.clone(), deltas.clone());
            steps.push(
                async move {
                    let d = &deltas[i];
                    let params: Vec<&(dyn ToSql + Sync)> = d.arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                    c.query(&d.st, &params).await.map(Answer::Rows)
                }
                .boxed(),
            );
        }
        for (tbl, st, fk) in &prechecks {
            let (c, fk_values, tbl, st, fk) = (client.clone(), fk_values.clone(), tbl.clone(), st.clone(), *fk);
            steps.push(
                async move {
                    let cols: &[TextColumn] = match fk_values.get(&tbl) {
                        Some(Some(values)) => &values[fk],
                        _ => &[],
                    };
                    let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                    c.query_one(&st, &params).await.map(|r| Answer::Missing(r.get(0)))
                }
                .boxed(),
            );
        }
        // Each statement is sent when its future is first polled: here, in
        // order, before anything else this task sends.
        let mut started: Vec<Started> = Vec::with_capacity(steps.len());
        std::future::poll_fn(|cx| {
            for mut f in steps.drain(..) {
                started.push(match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => Started::Answered(r),
                    std::task::Poll::Pending => Started::Waiting(f),
                });
            }
            std::task::Poll::Ready(())
        })
        .await;
        let answers = tokio::spawn(async move {
            let mut out = Vec::with_capacity(started.len());
            for s in started {
                out.push(match s {
                    Started::Answered(r) => r?,
                    Started::Waiting(f) => f.await?,
                });
            }
            Ok(out)
        });
        let all_there: BTreeSet<String> = fk_values.iter().filter(|(_, v)| v.is_some()).map(|(t, _)| t.clone()).collect();
        Ok(InFlight { answers, deltas, prechecks: prechecks.into_iter().map(|(t, _, _)| t).collect(), all_there, park, parents, header: header.unwrap_or_default() })
    }

    /// Reads the answers of statements sent by [`Applier::send`]: a row
    /// missing for a change of delta columns fails the group; rows whose
    /// parents are missing are parked (R9).
    async fn settle(&mut self, sent: InFlight) -> Result<(), EngineError> {
        let InFlight { answers, deltas, prechecks, mut all_there, park, parents, header } = sent;
        let answers = answers
            .await
            .map_err(|e| EngineError::Corrupt(format!("the task reading apply's answers ended: {e}")))?
            .map_err(EngineError::pg(SENT_CONTEXT))?;
        let mut delta_rows = Vec::with_capacity(deltas.len());
        let mut missing = Vec::with_capacity(prechecks.len());
        for a in answers {
            match a {
                Answer::Done => {}
                Answer::Rows(rows) => delta_rows.push(rows),
                Answer::Missing(m) => missing.push(m),
            }
        }
        for (d, rows) in deltas.iter().zip(&delta_rows) {
            if rows.len() < d.keys.len() {
                return Err(EngineError::QueuedRowMissing { table: d.table.clone(), missing: d.keys.len() - rows.len(), rows: d.keys.len() });
            }
        }
        for (tbl, m) in prechecks.iter().zip(missing) {
            if m {
                all_there.remove(tbl);
            }
        }
        // Parent checks after every row of the batch is in (R9).
        for (tbl, st) in park {
            if all_there.contains(&tbl) {
                continue;
            }
            let Some((_, keys)) = parents.get(&tbl) else { continue };
            let mut params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.push(&self.stream);
            params.push(&tbl);
            params.push(&header);
            let rows = self.conn.client.query(&st, &params).await.map_err(EngineError::pg(format!("checking the parents of rows in {tbl}")))?;
            if !rows.is_empty() {
                tracing::info!(stream = %self.stream, table = %tbl, rows = rows.len(), "rows parked: parent missing");
                self.stats.parked += rows.len() as u64;
                for r in rows {
                    self.held.insert((tbl.clone(), r.get(0)));
                }
            }
        }
        // Rows whose version was a local commit keep it on record (their
        // xmin is now apply's).
        for (d, rows) in deltas.iter().zip(&delta_rows) {
            self.keep_local_versions(&d.table, rows).await?;
        }
        Ok(())
    }
}

/// What the statements of a drain failed doing.
const SENT_CONTEXT: &str = "applying a batch of inserts and changes of delta columns";

/// One statement of a drain: sent when first polled.
type Step = futures::future::BoxFuture<'static, Result<Answer, tokio_postgres::Error>>;

/// A statement of a drain after its first poll.
enum Started {
    /// Answered at once (it failed before anything was sent).
    Answered(Result<Answer, tokio_postgres::Error>),
    /// Sent; the answer is awaited.
    Waiting(Step),
}

/// What a statement of a drain answered that [`Applier::settle`] reads.
enum Answer {
    Done,
    /// The rows a change of delta columns wrote.
    Rows(Vec<tokio_postgres::Row>),
    /// Whether a foreign key's values lack a parent.
    Missing(bool),
}

/// The statements of one drain, sent; their answers come from a task of
/// their own. Dropping it leaves that task to read the answers and drop
/// them (after a rollback).
pub(super) struct InFlight {
    answers: tokio::task::JoinHandle<Result<Vec<Answer>, tokio_postgres::Error>>,
    deltas: Arc<Vec<QueuedDelta>>,
    /// The table of each parent pre-check, in the order sent.
    prechecks: Vec<String>,
    /// Tables whose rows' parents may all be there (no pre-check failed yet).
    all_there: BTreeSet<String>,
    park: Vec<(String, Statement)>,
    parents: BTreeMap<String, (Arc<LocalTable>, Vec<TextColumn>)>,
    header: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::copy_escape;

    #[test]
    fn copy_text_escapes_backslash_newline_return_and_tab_only() {
        assert_eq!(copy_escape(b"\\x00ff\tA\nB\rC"), b"\\\\x00ff\\tA\\nB\\rC".to_vec());
        assert_eq!(copy_escape("é\\".as_bytes()), "é\\\\".as_bytes().to_vec(), "multi-byte characters pass through");
    }
}
