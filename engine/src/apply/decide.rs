//! Deciding at the main: the one place where concurrent versions meet.
//!
//! ```text
//!   branch change L (old row as the branch saw it, new row, context)
//!        │
//!        ├─ batch: UPDATE/DELETE … WHERE the row is still exactly L's old row
//!        │         (no one else changed it: no conflict, one statement; an
//!        │         update that changes nothing is left to the rest); the
//!        │         columns L changed take L's version, the others keep theirs
//!        └─ the rest, one by one, under the row's lock (R7):
//!             versions = the row's (node, stamp, inserting node, when the main
//!                      wrote it), and each column's where it was written apart
//!                      since the row's last whole write
//!             seen   = a column's version V is L's author's, or the main wrote V
//!                      before the last relay entry L's author had applied (R15)
//!             merge  = crate::conflict::merge, a pure function (tested against
//!                      these SQL paths row by row): per column against L's old
//!                      row: a column only one side changed takes that side;
//!                      delta columns add L's difference (R16); a column both
//!                      changed is a conflict: L wins it if it had seen the
//!                      column's version, else the table's rule decides between
//!                      the two (lww, main_wins, branch_wins)
//!             record = every discarded version goes to branchsync.conflicts (and
//!                      travels to every node in the relay)
//!             verdict= when the result is not what L's author will hold once it has
//!                      applied the relay, the row as the main holds it goes back
//!                      to the author
//! ```
//!
//! # Why every node converges
//!
//! Only the main decides. Branches apply the main's relay as it comes (it is
//! the main's history, in its commit order) and take the verdicts about their
//! own changes; their own pending changes are never overwritten by a verdict
//! about an older one. Every branch change reaches the main exactly once and
//! leads to exactly one decision there, so once the links are idle every
//! branch holds the main's rows. The rules themselves are total orders over
//! versions ([`crate::conflict::incoming_wins`]), so the outcome does not
//! depend on which branch reached the main first more than the rule says.
//!
//! # Clocks
//!
//! Stamps are commit times corrected by each branch's measured clock offset
//! (R14) and raised above everything their author had seen, so an informed
//! change always carries the larger stamp and a shop PC an hour fast does not
//! win every conflict. A version whose commit time vacuum has frozen away is
//! older than any offline window the main accepts (R23): it counts as seen by
//! everyone, which is what it was.

use std::collections::HashMap;

use branchsync_proto::{ChangeSetHeader, ConflictRecord, LogEntry, RowChange, TableDesc, Value, Verdict};
use tokio_postgres::types::{ToSql, Type};

use super::{sql, Applier, Mapping};
use crate::catalog::{key_text, row_json, values_json};
use crate::conflict_log::ConflictKind;
use crate::conflict::merge::{merge, Column, ColumnKind, Context, RowVersion, Write};
use crate::conflict::{incoming_wins, DeleteConflict, Held, UniqueConflict};
use crate::state::{CONFLICT_MESSAGE_PREFIX, VERDICT_MESSAGE_PREFIX};
use crate::EngineError;

/// The main's current version of one row.
#[derive(Debug, Clone)]
pub(super) struct Current {
    /// Every local column as text.
    pub values: HashMap<String, Option<String>>,
    /// Who wrote it, its stamp, who inserted the row.
    pub held: Held,
    /// When the main wrote it (µs, the main's clock); 0 when unknown.
    pub main_ts: i64,
    /// Older than anything a peer could not have seen: a row from before
    /// `init`, or one whose commit time is gone.
    pub baseline: bool,
    /// Once columns were written apart since the row's last whole write:
    /// the version of the columns without their own.
    pub base: Option<ColumnVersion>,
    /// The versions of the columns written apart.
    pub cols: HashMap<String, ColumnVersion>,
}

/// The version of a column, as `row_version` keeps it (JSON
/// `[stamp, node, local_ts]`): its stamp, its author, when the main wrote
/// it (0: everyone has seen it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct ColumnVersion(pub u64, pub String, pub i64);

impl Current {
    /// The row's own version, as a column version.
    fn row_version(&self) -> ColumnVersion {
        ColumnVersion(self.held.stamp, self.held.node.clone(), if self.baseline { 0 } else { self.main_ts })
    }

    /// The version of the columns written with the row: `base` once some
    /// were written apart, else the row's.
    fn base_version(&self) -> ColumnVersion {
        self.base.clone().unwrap_or_else(|| self.row_version())
    }

    /// The version of column `col`.
    fn column_version(&self, col: &str) -> ColumnVersion {
        self.cols.get(col).cloned().unwrap_or_else(|| self.base_version())
    }
}

/// A conflict to record.
pub(super) struct NewConflict<'a> {
    pub tbl: &'a str,
    pub key: Option<String>,
    pub kind: ConflictKind,
    pub rule: &'a str,
    pub winner: Option<String>,
    pub loser: Option<String>,
    pub local: Option<String>,
    pub remote: Option<String>,
    pub detail: Option<String>,
}

fn text(v: &Value) -> Option<Option<&str>> {
    match v {
        Value::Null => Some(None),
        Value::Text(s) => Some(Some(s.as_str())),
        Value::Unchanged => None,
    }
}

/// Where the delta columns of `m`'s table (under `rule`) sit in the
/// author's rows.
pub(super) fn delta_sources(m: &Mapping, rule: &crate::conflict::TableRule) -> Vec<usize> {
    (0..m.targets.len()).filter(|i| m.targets[*i].as_ref().is_some_and(|c| rule.delta.contains(c) && m.table.columns.contains_key(c))).collect()
}

/// An update that changes delta columns only (at `delta_src`), with the
/// author's whole old row and a number on both sides of each: it never
/// clashes with anything (R16), so it is applied by adding differences,
/// without a decision, and the row keeps its version.
pub(super) fn changes_deltas_only(delta_src: &[usize], ch: &RowChange) -> bool {
    let RowChange::Update { old: Some(o), new, .. } = ch else { return false };
    let mut changed = (0..new.len()).filter(|j| o.values.get(*j) != new.get(*j)).peekable();
    let numeric = delta_src.iter().all(|j| o.values.get(*j).and_then(Value::as_text).is_some() && new.get(*j).and_then(Value::as_text).is_some());
    o.full && numeric && changed.peek().is_some() && changed.all(|j| delta_src.contains(&j))
}

impl Applier {
    /// At the main, whether this ChangeSet can join the pipeline: it only
    /// inserts and changes delta columns (a stock count, a balance), so no
    /// part of it waits for a decision. Its changes of delta columns are
    /// then sent without waiting for their answers
    /// ([`Applier::queue_deltas`]); a row found missing when the answers
    /// come replays the group change by change
    /// ([`EngineError::QueuedRowMissing`]), where it is decided.
    pub(super) fn deltas_queueable(&self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>]) -> bool {
        if !self.wing.decides() || e.part != 0 || !e.last {
            return false;
        }
        let mut any = false;
        for ch in &e.changes {
            match ch {
                RowChange::Insert { .. } => {}
                RowChange::Update { table, .. } => {
                    let Some(m) = maps.get(*table as usize).and_then(|m| m.as_ref()) else { return false };
                    let Some(desc) = e.tables.get(*table as usize) else { return false };
                    if m.key_src.is_none() {
                        return false;
                    }
                    let rule = self.cfg.tables.for_table(&desc.schema, &desc.name);
                    if rule.delta.is_empty() || !changes_deltas_only(&delta_sources(m, rule), ch) {
                        return false;
                    }
                    any = true;
                }
                _ => return false,
            }
        }
        any
    }

    /// Locks and reads the current rows with these keys (R7).
    pub(super) async fn lock_and_read_current(&mut self, m: &Mapping, keys: &[Vec<String>]) -> Result<HashMap<usize, Current>, EngineError> {
        let t = &m.table;
        let key_arrays: Vec<Vec<&str>> = (0..t.pk.len()).map(|j| keys.iter().map(|k| k[j].as_str()).collect()).collect();
        let lock = self.stmt(&sql::lock_rows(t), &vec![Type::TEXT_ARRAY; key_arrays.len()]).await?;
        let mut types = vec![Type::TEXT_ARRAY; key_arrays.len()];
        types.push(Type::TEXT);
        let read = self.stmt(&sql::read_current(t, self.wing.packed()), &types).await?;
        let mut params: Vec<&(dyn ToSql + Sync)> = key_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        self.conn.client.execute(&lock, &params).await.map_err(EngineError::pg(format!("locking rows of {}", t.name)))?;
        params.push(&t.name);
        let rows = self.conn.client.query(&read, &params).await.map_err(EngineError::pg(format!("reading the rows of {}", t.name)))?;
        let mut out = HashMap::new();
        for r in rows {
            let i: i64 = r.get(0);
            let roident: Option<i64> = r.get(2);
            let cts: Option<i64> = r.get(3);
            let vals: Vec<Option<String>> = r.get(4);
            let rv_stamp: Option<i64> = r.get(5);
            let rv_node: Option<String> = r.get(6);
            let rv_local_ts: Option<i64> = r.get(8);
            let rv_ins: Option<String> = r.get(9);
            let base: Option<String> = r.get(10);
            let cols: Option<String> = r.get(11);
            let values = t.order.iter().cloned().zip(vals).collect();
            let local = roident == Some(0) || (roident.is_none() && rv_stamp.is_none());
            let cur = if local {
                // Written here by the ERP (or before init): its commit time on
                // the main's clock is its version, for every column.
                let ColumnVersion(stamp, node, main_ts) = self.local_version(cts);
                Current {
                    values,
                    held: Held { node, stamp, inserted_by: rv_ins.unwrap_or_else(|| self.cfg.node.clone()) },
                    main_ts,
                    baseline: main_ts == 0,
                    base: None,
                    cols: HashMap::new(),
                }
            } else {
                // Versions of columns written apart; a record that does not
                // parse (it never should) counts as none: the row's version.
                let base = base.and_then(|b| serde_json::from_str::<ColumnVersion>(&b).ok());
                let cols = cols.and_then(|c| serde_json::from_str::<HashMap<String, ColumnVersion>>(&c).ok()).unwrap_or_default();
                match (rv_stamp, rv_node) {
                    (Some(stamp), Some(node)) => Current {
                        values,
                        held: Held { node: node.clone(), stamp: stamp.max(0) as u64, inserted_by: rv_ins.unwrap_or(node) },
                        main_ts: rv_local_ts.unwrap_or(0),
                        baseline: rv_local_ts.unwrap_or(0) == 0,
                        base,
                        cols,
                    },
                    _ => Current {
                        values,
                        held: Held { node: String::new(), stamp: 0, inserted_by: self.cfg.node.clone() },
                        main_ts: 0,
                        baseline: true,
                        base: None,
                        cols: HashMap::new(),
                    },
                }
            };
            out.insert(i as usize - 1, cur);
        }
        Ok(out)
    }

    /// Whether `h`'s author had seen the version `cur` of the row (R15).
    fn had_seen(&self, h: &ChangeSetHeader, cur: &Current) -> bool {
        Self::had_seen_column(h, &cur.row_version())
    }

    /// The version of a row last written here (origin 0) and committed at
    /// `ts` (µs, the main's clock): this node's, or the baseline when it is
    /// from before `init` or its commit time is gone.
    fn local_version(&self, ts: Option<i64>) -> ColumnVersion {
        match ts {
            Some(ts) if ts >= self.init_ts_us => ColumnVersion(ts.max(0) as u64, self.cfg.node.clone(), ts),
            _ => ColumnVersion(0, String::new(), 0),
        }
    }

    /// Whether `h`'s author had seen the column version `v` (R15).
    fn had_seen_column(h: &ChangeSetHeader, v: &ColumnVersion) -> bool {
        v.2 == 0 || v.1 == h.author || v.2 <= h.seen_main_ts
    }

    /// Updates or deletes of one table, at the main.
    pub(super) async fn decide_run(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>], run: &[RowChange]) -> Result<(), EngineError> {
        let Some(t) = super::change_table(&run[0]) else { return Ok(()) };
        let Some(m) = maps[t as usize].clone() else { return Ok(()) };
        let desc = &e.tables[t as usize];
        let Some(ks) = m.key_src.clone() else { return Ok(()) };
        let is_delete = matches!(run[0], RowChange::Delete { .. });
        // The batches: changes of delta columns only, then rows still exactly
        // as the author saw them.
        let mut done = if is_delete { vec![false; run.len()] } else { self.add_deltas(e, &m, desc, &ks, run).await? };
        let rest: Vec<usize> = (0..run.len()).filter(|i| !done[*i]).collect();
        if !rest.is_empty() {
            let sub: Vec<RowChange> = rest.iter().map(|i| run[*i].clone()).collect();
            let cas = self.compare_and_set(e, &m, desc, &ks, &sub, is_delete).await?;
            for (j, i) in rest.iter().enumerate() {
                done[*i] = cas[j];
            }
        }
        for (idx, ch) in run.iter().enumerate() {
            if done.get(idx).copied().unwrap_or(false) {
                continue;
            }
            match ch {
                RowChange::Update { old, new, .. } => self.decide_update(e, &m, desc, &ks, old.as_ref().map(|o| o.values.as_slice()), new).await?,
                RowChange::Delete { old, .. } => self.decide_delete(e, &m, desc, &ks, &old.values, old.full).await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies, in one statement, the changes of delta columns only (with the
    /// whole old row): they never clash; the row keeps its version. Returns
    /// which ones were applied (a row not here is decided one by one).
    async fn add_deltas(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, ks: &[usize], run: &[RowChange]) -> Result<Vec<bool>, EngineError> {
        let mut done = vec![false; run.len()];
        let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
        if rule.delta.is_empty() {
            return Ok(done);
        }
        let delta_src = delta_sources(m, &rule);
        let batch: Vec<usize> = (0..run.len()).filter(|i| changes_deltas_only(&delta_src, &run[*i])).collect();
        if batch.is_empty() {
            return Ok(done);
        }
        let names: Vec<&str> = delta_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let rows_of = |i: usize| match &run[i] {
            RowChange::Update { old: Some(o), new, .. } => (&o.values, new),
            _ => super::unreachable_change(),
        };
        let keys: Vec<Vec<Option<&str>>> = (0..ks.len()).map(|j| batch.iter().map(|i| rows_of(*i).0.get(ks[j]).and_then(Value::as_text)).collect()).collect();
        let mut vals: Vec<Vec<Option<&str>>> = Vec::new();
        for c in &delta_src {
            vals.push(batch.iter().map(|i| rows_of(*i).1.get(*c).and_then(Value::as_text)).collect());
            vals.push(batch.iter().map(|i| rows_of(*i).0.get(*c).and_then(Value::as_text)).collect());
        }
        let st = self.stmt(&sql::delta_update(&m.table, &names), &vec![Type::TEXT_ARRAY; ks.len() + 2 * names.len()]).await?;
        let mut params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        params.extend(vals.iter().map(|a| a as &(dyn ToSql + Sync)));
        let rows = self.conn.client.query(&st, &params).await.map_err(EngineError::pg(format!("adding deltas to {}", m.table.name)))?;
        self.keep_local_versions(&m.table.name, &rows).await?;
        let applied: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        for (n, i) in batch.iter().enumerate() {
            let k: Vec<&str> = (0..ks.len()).map(|j| keys[j][n].unwrap_or("")).collect();
            if applied.contains(&key_text(&k)) {
                done[*i] = true;
            }
        }
        let _ = e;
        Ok(done)
    }

    /// After writing rows whose version stays what it was: a row that was
    /// this node's own local version (or the baseline) keeps that on record,
    /// since its `xmin` is now apply's. Rows: key, origin, commit time.
    pub(super) async fn keep_local_versions(&mut self, tbl: &str, rows: &[tokio_postgres::Row]) -> Result<(), EngineError> {
        let local: Vec<(String, i64)> = rows
            .iter()
            .filter(|r| r.get::<_, Option<i64>>(1) == Some(0))
            .filter_map(|r| r.get::<_, Option<i64>>(2).map(|ts| (r.get::<_, String>(0), ts)))
            .collect();
        if local.is_empty() {
            return Ok(());
        }
        let (lk, lt): (Vec<String>, Vec<i64>) = local.into_iter().unzip();
        let baseline: Vec<bool> = lt.iter().map(|ts| *ts < self.init_ts_us).collect();
        let st = self
            .stmt(
                "INSERT INTO branchsync.row_version (tbl, key, stamp, node, deleted, ts, local_ts, inserted_by) \
                 SELECT $1, u.k, CASE WHEN u.b THEN 0 ELSE u.t END, CASE WHEN u.b THEN '' ELSE $3 END, false, \
                        CASE WHEN u.b THEN 0 ELSE u.t END, CASE WHEN u.b THEN 0 ELSE u.t END, $3 \
                 FROM unnest($2::text[], $4::int8[], $5::bool[]) AS u(k, t, b) \
                 ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = false, ts = excluded.ts, \
                     local_ts = excluded.local_ts, row_data = NULL, base = NULL, cols = NULL",
                &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT, Type::INT8_ARRAY, Type::BOOL_ARRAY],
            )
            .await?;
        let node = self.cfg.node.clone();
        self.conn.client.execute(&st, &[&tbl, &lk, &node, &lt, &baseline]).await.map_err(EngineError::pg("keeping row versions"))?;
        Ok(())
    }

    /// Applies, in one statement, the changes whose row is still exactly the
    /// author's old row; returns which ones were applied.
    async fn compare_and_set(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, ks: &[usize], run: &[RowChange], is_delete: bool) -> Result<Vec<bool>, EngineError> {
        let mut done = vec![false; run.len()];
        // Only changes with the whole old row, no unknown value and no key
        // change; and not those that change delta columns only: they never
        // clash and must not make the row theirs (its other columns keep
        // their version), which the one-by-one path takes care of.
        let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
        // A change of delta columns only never clashes and must not make the
        // row its author's: its other columns keep their version.
        let delta_only = |o: &[Value], n: &[Value]| {
            let changed: Vec<usize> = (0..n.len()).filter(|i| o.get(*i) != n.get(*i)).collect();
            !changed.is_empty() && changed.iter().all(|i| m.targets.get(*i).and_then(|t| t.as_ref()).is_some_and(|c| rule.delta.contains(c)))
        };
        let mut batch: Vec<usize> = Vec::new();
        for (i, ch) in run.iter().enumerate() {
            let ok = match ch {
                // An update that changes nothing is decided one by one: it
                // writes nothing, so it must not make the row its author's
                // (a shop saving a form unchanged would win over edits made
                // meanwhile elsewhere).
                RowChange::Update { old: Some(o), new, .. } => {
                    o.full
                        && !o.values.iter().chain(new.iter()).any(|v| matches!(v, Value::Unchanged))
                        && ks.iter().all(|k| o.values.get(*k) == new.get(*k))
                        && o.values != *new
                }
                RowChange::Delete { old, .. } => old.full && !old.values.iter().any(|v| matches!(v, Value::Unchanged)),
                _ => false,
            };
            if ok {
                batch.push(i);
            }
        }
        if batch.is_empty() {
            return Ok(done);
        }
        let cmp_src: Vec<usize> = (0..m.targets.len()).filter(|i| m.targets[*i].is_some()).collect();
        let cmp_names: Vec<&str> = cmp_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let old_of = |ch: &RowChange| -> Vec<Value> {
            match ch {
                RowChange::Update { old: Some(o), .. } | RowChange::Delete { old: o, .. } => o.values.clone(),
                _ => Vec::new(),
            }
        };
        let olds: Vec<Vec<Value>> = batch.iter().map(|i| old_of(&run[*i])).collect();
        let keys: Vec<Vec<Option<&str>>> = (0..ks.len()).map(|j| olds.iter().map(|o| o.get(ks[j]).and_then(Value::as_text)).collect()).collect();
        let cmp_vals: Vec<Vec<Option<&str>>> = cmp_src.iter().map(|c| olds.iter().map(|o| o.get(*c).and_then(Value::as_text)).collect()).collect();
        // Each batched change's key as the statements return it.
        let batch_keys: Vec<String> = (0..batch.len()).map(|n| key_text(&(0..ks.len()).map(|j| keys[j][n].unwrap_or("")).collect::<Vec<_>>())).collect();
        let stamp = e.header.stamp as i64;
        let applied_keys: Vec<String>;
        if is_delete {
            let st = self.stmt(&sql::cas_delete(&m.table, &cmp_names), &vec![Type::TEXT_ARRAY; ks.len() + cmp_names.len()]).await?;
            let mut params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.extend(cmp_vals.iter().map(|a| a as &(dyn ToSql + Sync)));
            let rows = self.conn.client.query(&st, &params).await.map_err(EngineError::pg(format!("applying deletes to {}", m.table.name)))?;
            let mut tomb_keys = Vec::with_capacity(rows.len());
            let mut tomb_rows = Vec::with_capacity(rows.len());
            for r in rows {
                tomb_keys.push(r.get::<_, String>(0));
                tomb_rows.push(r.get::<_, Option<String>>(1));
            }
            if !tomb_keys.is_empty() {
                let ts = self.stmt(&sql::upsert_tombstones(), &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8, Type::TEXT, Type::INT8]).await?;
                self.conn
                    .client
                    .execute(&ts, &[&m.table.name, &tomb_keys, &tomb_rows, &stamp, &e.header.author, &e.header.commit_ts_us])
                    .await
                    .map_err(EngineError::pg("recording tombstones"))?;
            }
            applied_keys = tomb_keys;
        } else {
            let set_src: Vec<usize> = cmp_src.iter().copied().filter(|i| m.local(*i).is_some_and(|c| !c.identity_always)).collect();
            let set_names: Vec<&str> = set_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
            if set_names.is_empty() {
                return Ok(done);
            }
            let news: Vec<&Vec<Value>> = batch.iter().map(|i| match &run[*i] { RowChange::Update { new, .. } => new, _ => super::unreachable_change() }).collect();
            let set_vals: Vec<Vec<Option<&str>>> = set_src.iter().map(|c| news.iter().map(|n| n.get(*c).and_then(Value::as_text)).collect()).collect();
            let st = self.stmt(&sql::cas_update(&m.table, &set_names, &cmp_names), &vec![Type::TEXT_ARRAY; ks.len() + set_names.len() + cmp_names.len()]).await?;
            let mut params: Vec<&(dyn ToSql + Sync)> = keys.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.extend(set_vals.iter().map(|a| a as &(dyn ToSql + Sync)));
            params.extend(cmp_vals.iter().map(|a| a as &(dyn ToSql + Sync)));
            let rows = self.conn.client.query(&st, &params).await.map_err(EngineError::pg(format!("applying updates to {}", m.table.name)))?;
            applied_keys = rows.iter().map(|r| r.get::<_, String>(0)).collect();
            // Which applied rows changed delta columns only.
            let only_deltas: std::collections::HashSet<String> = batch
                .iter()
                .enumerate()
                .filter(|(_, i)| match &run[**i] {
                    RowChange::Update { old: Some(o), new, .. } => delta_only(&o.values, new),
                    _ => false,
                })
                .map(|(n, _)| batch_keys[n].clone())
                .collect();
            let (kept, theirs): (Vec<&tokio_postgres::Row>, Vec<&tokio_postgres::Row>) = rows.iter().partition(|r| only_deltas.contains(&r.get::<_, String>(0)));
            if !theirs.is_empty() {
                // The columns each row's change wrote take its version.
                let mut changed: HashMap<&str, Vec<&str>> = HashMap::new();
                for (n, i) in batch.iter().enumerate() {
                    let RowChange::Update { old: Some(o), new, .. } = &run[*i] else { continue };
                    let cols = changed.entry(batch_keys[n].as_str()).or_default();
                    for (j, name) in set_src.iter().zip(&set_names) {
                        if o.values.get(*j) != new.get(*j) && !cols.contains(name) {
                            cols.push(name);
                        }
                    }
                }
                let mut tk = Vec::with_capacity(theirs.len());
                let (mut tch, mut tlb, mut tx) = (Vec::with_capacity(theirs.len()), Vec::with_capacity(theirs.len()), Vec::with_capacity(theirs.len()));
                for r in &theirs {
                    let k: String = r.get(0);
                    let (origin, ts): (Option<i64>, Option<i64>) = (r.get(1), r.get(2));
                    // A row that was this node's own (or the baseline): its
                    // other columns keep that version.
                    let local = (origin == Some(0)).then(|| self.local_version(ts));
                    tch.push(serde_json::to_string(changed.get(k.as_str()).map(Vec::as_slice).unwrap_or_default()).unwrap_or_default());
                    tlb.push(local.map(|v| serde_json::to_string(&v).unwrap_or_default()));
                    tx.push(r.get::<_, Option<i64>>(3));
                    tk.push(k);
                }
                let vst = self
                    .stmt(&sql::upsert_changed_versions(self.wing.packed()), &[Type::TEXT, Type::TEXT_ARRAY, Type::INT8, Type::TEXT, Type::INT8, Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8_ARRAY])
                    .await?;
                self.conn
                    .client
                    .execute(&vst, &[&m.table.name, &tk, &stamp, &e.header.author, &e.header.commit_ts_us, &tch, &tlb, &tx])
                    .await
                    .map_err(EngineError::pg("recording row versions"))?;
            }
            let kept: Vec<tokio_postgres::Row> = kept.into_iter().cloned().collect();
            self.keep_local_versions(&m.table.name, &kept).await?;
        }
        let applied: std::collections::HashSet<String> = applied_keys.into_iter().collect();
        for (n, i) in batch.iter().enumerate() {
            if applied.contains(&batch_keys[n]) {
                done[*i] = true;
            }
        }
        let _ = desc;
        Ok(done)
    }

    /// One update whose row is not as its author saw it: merge, decide, record.
    async fn decide_update(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, ks: &[usize], old: Option<&[Value]>, new: &[Value]) -> Result<(), EngineError> {
        let h = &e.header;
        let key_vals: Vec<String> = ks.iter().map(|k| old.and_then(|o| o.get(*k)).or(new.get(*k)).and_then(Value::as_text).unwrap_or("").to_string()).collect();
        let key = key_text(&key_vals.iter().map(String::as_str).collect::<Vec<_>>());
        let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
        let mut cur = self.lock_and_read_current(m, std::slice::from_ref(&key_vals)).await?.remove(&0);
        let mut tomb = None;
        if cur.is_none() {
            // No row to lock: the tombstone is the lock. Another stream's
            // insert of this key takes it too (the pipeline's packed versions,
            // or its version upsert), so either that insert committed before
            // this lock was granted and the row is read again below, or it
            // commits after this decision and reaches every node after it in
            // the relay. Deciding on an absent row without it let a verdict
            // "deleted" reach the author after the other stream's insert:
            // the author dropped a row the main kept.
            tomb = self.lock_tombstone(&m.table.name, &key).await?;
            if tomb.is_some() {
                cur = self.lock_and_read_current(m, std::slice::from_ref(&key_vals)).await?.remove(&0);
            }
        }
        let Some(cur) = cur else {
            return self.update_of_missing_row(e, m, desc, &key, new, tomb).await;
        };
        let full_old = old.filter(|o| o.len() == new.len());
        // Each column's version held here, and whether the author had seen it.
        let mut sources = Vec::new();
        for (i, target) in m.targets.iter().enumerate() {
            let Some(col) = target else { continue };
            let Some(lc) = m.table.columns.get(col) else { continue };
            if lc.identity_always || lc.generated {
                continue;
            }
            // An unchanged TOASTed value is never written (R12).
            let Some(theirs) = new.get(i).and_then(text) else { continue };
            let v = cur.column_version(col);
            let seen = Self::had_seen_column(h, &v);
            sources.push((i, col.as_str(), theirs, Held { node: v.1, stamp: v.0, inserted_by: cur.held.inserted_by.clone() }, seen));
        }
        let columns: Vec<Column<'_>> = sources
            .iter()
            .map(|(i, col, theirs, held, seen)| Column {
                name: col,
                kind: if rule.delta.iter().any(|d| d == col) { ColumnKind::Delta } else { ColumnKind::Lww },
                base: full_old.and_then(|o| o.get(*i)).and_then(text),
                ours: cur.values.get(*col).and_then(|v| v.as_deref()),
                theirs: *theirs,
                held,
                seen: *seen,
            })
            .collect();
        let merged = merge(&columns, &Context { rule: rule.rule, main: &self.cfg.node, author: &h.author, stamp: h.stamp });
        for group in merged.conflicts() {
            let held = group.held;
            let (winner, loser) = if group.won { (h.author.clone(), held.node.clone()) } else { (held.node.clone(), h.author.clone()) };
            self.record_conflict(NewConflict {
                tbl: &m.table.name,
                key: Some(key.clone()),
                kind: ConflictKind::UpdateUpdate,
                rule: rule.rule.name(),
                winner: Some(winner.clone()),
                loser: Some(loser),
                local: Some(values_json(&cur.values)),
                remote: Some(row_json(desc, new)),
                detail: Some(format!(
                    "{} and {} changed column(s) {} concurrently; {}'s version is kept by rule {} (stamps {} and {})",
                    if held.node.is_empty() { "the baseline" } else { held.node.as_str() },
                    h.author,
                    group.columns.join(", "),
                    winner,
                    rule.rule.name(),
                    held.stamp,
                    h.stamp
                )),
            })
            .await?;
        }
        // Write the merged row and its versions: the row's, and the
        // columns' that took the incoming one.
        let result = if merged.writes.is_empty() { cur.values.clone() } else { self.write_sets(m, &key_vals, &merged.writes).await? };
        if merged.version != RowVersion::Unchanged || !merged.stamped.is_empty() {
            self.record_decided_version(&m.table.name, &key, &cur, h, merged.version == RowVersion::Incoming, &merged.stamped).await?;
        }
        // Nothing written: the relay carries no row back to the author, who
        // holds its own change; the verdict says what the main holds.
        if merged.writes.is_empty() {
            self.emit_verdict(e, m, desc, ks, &key_vals, Some(&result)).await?;
        }
        Ok(())
    }

    /// Records the version of a row the main decided: the incoming
    /// change's (`incoming`) or the held one `cur` (the row was written, or
    /// some of its columns took the incoming version, but the row stays
    /// `cur`'s), with the columns in `stamped` carrying the incoming
    /// version and the others the one they had.
    async fn record_decided_version(&mut self, tbl: &str, key: &str, cur: &Current, h: &ChangeSetHeader, incoming: bool, stamped: &[&str]) -> Result<(), EngineError> {
        // Serialising strings and numbers cannot fail.
        let base = serde_json::to_string(&cur.base_version()).unwrap_or_default();
        let cols = serde_json::to_string(&cur.cols).unwrap_or_default();
        let st = self
            .stmt(
                &sql::upsert_decided_version(incoming),
                &[Type::TEXT, Type::TEXT, Type::INT8, Type::TEXT, Type::INT8, Type::INT8, Type::TEXT, Type::TEXT, Type::TEXT, Type::INT8, Type::TEXT, Type::TEXT_ARRAY],
            )
            .await?;
        let (stamp, node, ts, local_ts, inserted_by) = if incoming {
            (h.stamp as i64, h.author.clone(), h.commit_ts_us, None, h.author.clone())
        } else {
            (cur.held.stamp as i64, cur.held.node.clone(), cur.held.stamp as i64, Some(cur.main_ts), cur.held.inserted_by.clone())
        };
        let in_stamp = h.stamp as i64;
        self.conn
            .client
            .execute(&st, &[&tbl, &key, &stamp, &node, &ts, &local_ts, &inserted_by, &base, &cols, &in_stamp, &h.author, &stamped])
            .await
            .map_err(EngineError::pg("recording a row version"))?;
        Ok(())
    }

    /// Runs one UPDATE of one row with the merged writes; returns the row.
    async fn write_sets(&mut self, m: &Mapping, key_vals: &[String], writes: &[(&str, Write<'_>)]) -> Result<HashMap<String, Option<String>>, EngineError> {
        let t = &m.table;
        let mut params: Vec<Option<String>> = key_vals.iter().map(|k| Some(k.clone())).collect();
        let mut items = Vec::new();
        for (col, w) in writes {
            let lc = &t.columns[*col];
            match w {
                Write::Set(v) => {
                    params.push(v.map(str::to_string));
                    items.push(format!("{} = ${}::text::{}", lc.quoted, params.len(), lc.type_name));
                }
                // R16: the author's difference, added to what is here.
                Write::Add { new, old } => {
                    params.push(Some(new.to_string()));
                    params.push(Some(old.to_string()));
                    items.push(format!("{0} = {0} + (${1}::text::numeric - ${2}::text::numeric)::{3}", lc.quoted, params.len() - 1, params.len(), lc.type_name));
                }
            }
        }
        let conds: Vec<String> = t.pk.iter().enumerate().map(|(j, k)| format!("t.{} = ${}::text::{}", t.columns[k].quoted, j + 1, t.columns[k].type_name)).collect();
        let cols: Vec<String> = t.order.iter().map(|c| format!("t.{}::text", branchsync_proto::changeset::quote_ident(c))).collect();
        let q = format!("UPDATE {} AS t SET {} WHERE {} RETURNING ARRAY[{}]::text[]", t.qualified, items.join(", "), conds.join(" AND "), cols.join(", "));
        let name = t.name.clone();
        let order = t.order.clone();
        let st = self.stmt(&q, &vec![Type::TEXT; params.len()]).await?;
        let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let row = self.conn.client.query_one(&st, &p).await.map_err(EngineError::pg(format!("applying a merged update to {name}")))?;
        let vals: Vec<Option<String>> = row.get(0);
        Ok(order.into_iter().zip(vals).collect())
    }

    /// Locks and reads the tombstone of a row that is not here: who deleted
    /// it and the row as it was. A delete made here may not have its
    /// tombstone yet: capture writes it, so it waits for capture once.
    async fn lock_tombstone(&mut self, tbl: &str, key: &str) -> Result<Option<(String, Option<String>)>, EngineError> {
        let st = self
            .stmt("SELECT node, row_data::text FROM branchsync.row_version WHERE tbl = $1 AND key = $2 AND deleted FOR UPDATE", &[Type::TEXT, Type::TEXT])
            .await?;
        let mut tomb = self.conn.client.query_opt(&st, &[&tbl, &key]).await.map_err(EngineError::pg("locking a tombstone"))?;
        if tomb.is_none() {
            self.wait_for_capture().await?;
            tomb = self.conn.client.query_opt(&st, &[&tbl, &key]).await.map_err(EngineError::pg("locking a tombstone"))?;
        }
        Ok(tomb.map(|r| (r.get(0), r.get(1))))
    }

    /// An update for a row that is not here; `tomb`: its locked tombstone.
    ///
    /// Without a tombstone (forgotten after the retention window, or a row
    /// the main never had) nothing here orders this decision against an
    /// insert of the same key committing meanwhile; keys are not reused in
    /// practice (each site draws from its own stripe), and the conflict is
    /// recorded either way.
    async fn update_of_missing_row(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, key: &str, new: &[Value], tomb: Option<(String, Option<String>)>) -> Result<(), EngineError> {
        let h = &e.header;
        let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
        let ks = m.key_src.clone().unwrap_or_default();
        let key_vals: Vec<String> = ks.iter().map(|k| new.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect();
        let Some(tomb) = tomb else {
            self.emit_verdict(e, m, desc, &ks, &key_vals, None).await?;
            return self
                .record_conflict(NewConflict {
                    tbl: &m.table.name,
                    key: Some(key.to_string()),
                    kind: ConflictKind::UpdateMissing,
                    rule: rule.rule.name(),
                    winner: None,
                    loser: Some(h.author.clone()),
                    local: None,
                    remote: Some(row_json(desc, new)),
                    detail: Some("the row does not exist here and no delete of it is remembered".into()),
                })
                .await;
        };
        let (deleter, deleted_row) = tomb;
        if rule.on_delete_conflict == DeleteConflict::UpdateWins && !new.iter().any(|v| matches!(v, Value::Unchanged)) {
            // The update brings the row back, at every node.
            self.insert_or_resolve_row(e, m, desc, new, false).await?;
            self.record_conflict(NewConflict {
                tbl: &m.table.name,
                key: Some(key.to_string()),
                kind: ConflictKind::UpdateDelete,
                rule: "update_wins",
                winner: Some(h.author.clone()),
                loser: Some(deleter.clone()),
                local: deleted_row,
                remote: Some(row_json(desc, new)),
                detail: Some(format!("{deleter} deleted the row while {} updated it; the update wins and restores it", h.author)),
            })
            .await?;
            return Ok(());
        }
        self.record_conflict(NewConflict {
            tbl: &m.table.name,
            key: Some(key.to_string()),
            kind: ConflictKind::UpdateDelete,
            rule: "delete_wins",
            winner: Some(deleter.clone()),
            loser: Some(h.author.clone()),
            local: deleted_row,
            remote: Some(row_json(desc, new)),
            detail: Some(format!("{deleter} deleted the row while {} updated it; the delete wins", h.author)),
        })
        .await?;
        self.emit_verdict(e, m, desc, &ks, &key_vals, None).await
    }

    /// One delete whose row is not as its author saw it.
    async fn decide_delete(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, ks: &[usize], old: &[Value], full: bool) -> Result<(), EngineError> {
        let h = &e.header;
        let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
        let key_vals: Vec<String> = ks.iter().map(|k| old.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect();
        let key = key_text(&key_vals.iter().map(String::as_str).collect::<Vec<_>>());
        let Some(cur) = self.lock_and_read_current(m, std::slice::from_ref(&key_vals)).await?.remove(&0) else {
            // Deleted here too: nothing to decide.
            return Ok(());
        };
        // Rows that reference it, which its deleter never saw, keep it (R9).
        if !m.table.children.is_empty() {
            let st = self.stmt(&sql::has_children(&m.table), &vec![Type::TEXT; key_vals.len()]).await?;
            let p: Vec<&(dyn ToSql + Sync)> = key_vals.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
            let referenced: bool = self.conn.client.query_one(&st, &p).await.map_err(EngineError::pg("looking for rows that reference a deleted row"))?.get(0);
            if referenced {
                self.record_conflict(NewConflict {
                    tbl: &m.table.name,
                    key: Some(key.clone()),
                    kind: ConflictKind::DeleteReferenced,
                    rule: rule.rule.name(),
                    winner: Some(cur.held.node.clone()),
                    loser: Some(h.author.clone()),
                    local: Some(values_json(&cur.values)),
                    remote: Some(format!("{{\"deleted\": {}}}", row_json(desc, old))),
                    detail: Some(format!("{} deleted a row that rows it never saw still reference; the row is kept", h.author)),
                })
                .await?;
                return self.emit_verdict(e, m, desc, ks, &key_vals, Some(&cur.values)).await;
            }
        }
        let changed = full
            && m.targets.iter().enumerate().any(|(i, t)| {
                t.as_ref().is_some_and(|c| old.get(i).and_then(text).is_some_and(|o| o.map(str::to_string) != cur.values.get(c).cloned().flatten()))
            });
        if changed && !self.had_seen(h, &cur) && rule.on_delete_conflict == DeleteConflict::UpdateWins {
            self.record_conflict(NewConflict {
                tbl: &m.table.name,
                key: Some(key.clone()),
                kind: ConflictKind::UpdateDelete,
                rule: "update_wins",
                winner: Some(cur.held.node.clone()),
                loser: Some(h.author.clone()),
                local: Some(values_json(&cur.values)),
                remote: Some(format!("{{\"deleted\": {}}}", row_json(desc, old))),
                detail: Some(format!("{} deleted the row while {} updated it; the update wins and the row stays", h.author, cur.held.node)),
            })
            .await?;
            return self.emit_verdict(e, m, desc, ks, &key_vals, Some(&cur.values)).await;
        }
        if changed && !self.had_seen(h, &cur) {
            self.record_conflict(NewConflict {
                tbl: &m.table.name,
                key: Some(key.clone()),
                kind: ConflictKind::UpdateDelete,
                rule: "delete_wins",
                winner: Some(h.author.clone()),
                loser: Some(cur.held.node.clone()),
                local: Some(values_json(&cur.values)),
                remote: Some(format!("{{\"deleted\": {}}}", row_json(desc, old))),
                detail: Some(format!("{} updated the row while {} deleted it; the delete wins", cur.held.node, h.author)),
            })
            .await?;
        }
        let st = self.stmt(&sql::delete(&m.table), &vec![Type::TEXT_ARRAY; ks.len()]).await?;
        let arrays: Vec<Vec<&str>> = key_vals.iter().map(|k| vec![k.as_str()]).collect();
        let p: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        self.conn.client.execute(&st, &p).await.map_err(EngineError::pg(format!("applying a delete to {}", m.table.name)))?;
        let ts = self.stmt(&sql::upsert_tombstones(), &[Type::TEXT, Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::INT8, Type::TEXT, Type::INT8]).await?;
        let stamp = h.stamp as i64;
        self.conn
            .client
            .execute(&ts, &[&m.table.name, &vec![key], &vec![Some(values_json(&cur.values))], &stamp, &h.author, &h.commit_ts_us])
            .await
            .map_err(EngineError::pg("recording a tombstone"))?;
        Ok(())
    }

    /// Inserts one row; on a key or unique clash, decides by the rule (at
    /// the main) and records what lost. `verdicts`: tell the author when the
    /// result is not its row.
    pub(super) async fn insert_or_resolve_row(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, new: &[Value], verdicts: bool) -> Result<(), EngineError> {
        let h = &e.header;
        let cols: Vec<usize> = (0..m.targets.len()).filter(|i| m.targets[*i].is_some() && !matches!(new.get(*i), Some(Value::Unchanged))).collect();
        let names: Vec<&str> = cols.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let st = self.stmt(&sql::insert(&m.table, &names, true), &vec![Type::TEXT_ARRAY; cols.len()]).await?;
        let arrays: Vec<Vec<Option<&str>>> = cols.iter().map(|c| vec![new.get(*c).and_then(Value::as_text)]).collect();
        let params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let rows = self.conn.client.query(&st, &params).await.map_err(EngineError::pg(format!("applying an insert to {}", m.table.name)))?;
        let Some(ks) = m.key_src.clone() else { return Ok(()) };
        let key_vals: Vec<String> = ks.iter().map(|k| new.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect();
        let key = key_text(&key_vals.iter().map(String::as_str).collect::<Vec<_>>());
        if !rows.is_empty() {
            let vst = self.stmt(&sql::upsert_versions_many(), &[Type::TEXT, Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::TEXT, Type::INT8_ARRAY]).await?;
            self.conn
                .client
                .execute(&vst, &[&m.table.name, &vec![key], &vec![h.stamp as i64], &h.author, &vec![h.commit_ts_us]])
                .await
                .map_err(EngineError::pg("recording row versions"))?;
            return Ok(());
        }
        let rule = self.cfg.tables.for_table(&desc.schema, &desc.name).clone();
        if let Some(cur) = self.lock_and_read_current(m, std::slice::from_ref(&key_vals)).await?.remove(&0) {
            // Two nodes inserted the same key.
            let wins = incoming_wins(rule.rule, &self.cfg.node, &cur.held, &h.author, h.stamp);
            let (winner, loser) = if wins { (h.author.clone(), cur.held.node.clone()) } else { (cur.held.node.clone(), h.author.clone()) };
            self.record_conflict(NewConflict {
                tbl: &m.table.name,
                key: Some(key.clone()),
                kind: ConflictKind::InsertInsert,
                rule: rule.rule.name(),
                winner: Some(winner.clone()),
                loser: Some(loser),
                local: Some(values_json(&cur.values)),
                remote: Some(row_json(desc, new)),
                detail: Some(format!("{} and {} inserted the same key; {winner}'s row is kept", cur.held.node, h.author)),
            })
            .await?;
            if wins {
                let sets: Vec<(&str, Write<'_>)> = cols
                    .iter()
                    .filter(|i| m.local(**i).is_some_and(|c| !c.identity_always && !c.generated))
                    .map(|i| (m.targets[*i].as_deref().unwrap_or_default(), Write::Set(new.get(*i).and_then(Value::as_text))))
                    .collect();
                let result = self.write_sets(m, &key_vals, &sets).await?;
                let vst = self.stmt(&sql::upsert_versions(), &[Type::TEXT, Type::TEXT_ARRAY, Type::INT8, Type::TEXT, Type::INT8]).await?;
                self.conn
                    .client
                    .execute(&vst, &[&m.table.name, &vec![key.clone()], &(h.stamp as i64), &h.author, &h.commit_ts_us])
                    .await
                    .map_err(EngineError::pg("recording row versions"))?;
                let _ = result;
            } else if verdicts {
                self.emit_verdict(e, m, desc, &ks, &key_vals, Some(&cur.values)).await?;
            }
            return Ok(());
        }
        // Another row holds the same value of a unique constraint.
        let other = self.unique_holder(m, &cols, &names, new).await?;
        let merge = rule.on_unique_conflict == UniqueConflict::Merge && other.is_some();
        let detail = match (&other, merge) {
            (Some(k), true) => format!("the row holds the same unique value as {k} here; it is folded into that row and rows referencing it are re-pointed"),
            (Some(k), false) => format!("the row holds the same unique value as {k} here; it is not applied (set on_unique_conflict = \"merge\" to fold such rows)"),
            (None, _) => "another row here holds the same value of a unique constraint; the row is not applied".to_string(),
        };
        self.record_conflict(NewConflict {
            tbl: &m.table.name,
            key: Some(key.clone()),
            kind: ConflictKind::InsertUnique,
            rule: if merge { "merge" } else { "record" },
            winner: None,
            loser: Some(h.author.clone()),
            local: None,
            remote: Some(row_json(desc, new)),
            detail: Some(detail),
        })
        .await?;
        if let (true, Some(to)) = (merge, other) {
            self.conn
                .client
                .execute(
                    "INSERT INTO branchsync.key_merges (tbl, from_key, to_key) VALUES ($1, $2, $3) ON CONFLICT (tbl, from_key) DO UPDATE SET to_key = excluded.to_key",
                    &[&m.table.name, &key, &to],
                )
                .await
                .map_err(EngineError::pg("recording a merged key"))?;
            if let Some(d) = self.wing.decider_mut() {
                d.merged_tables.insert(m.table.name.clone());
            }
        }
        if verdicts {
            self.emit_verdict(e, m, desc, &ks, &key_vals, None).await?;
        }
        Ok(())
    }

    /// The key text of the row that holds the same value of a unique
    /// constraint as `new`, if one can be found.
    async fn unique_holder(&mut self, m: &Mapping, cols: &[usize], names: &[&str], new: &[Value]) -> Result<Option<String>, EngineError> {
        let t = &m.table;
        let rows = self
            .conn
            .client
            .query(
                "SELECT array(SELECT a.attname::text FROM unnest(i.indkey) k(n) JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n) \
                 FROM pg_index i WHERE i.indrelid = $1::text::regclass AND i.indisunique AND NOT i.indisprimary AND i.indpred IS NULL AND i.indexprs IS NULL",
                &[&t.qualified],
            )
            .await
            .map_err(EngineError::pg("reading unique constraints"))?;
        for r in rows {
            let ucols: Vec<String> = r.get(0);
            let mut conds = Vec::new();
            let mut params: Vec<Option<String>> = Vec::new();
            for c in &ucols {
                let Some(pos) = names.iter().position(|n| n == c) else { break };
                let v = new.get(cols[pos]).and_then(Value::as_text).map(str::to_string);
                let lc = &t.columns[c];
                params.push(v);
                conds.push(format!("t.{} = ${}::text::{}", lc.quoted, params.len(), lc.type_name));
            }
            if conds.len() != ucols.len() {
                continue;
            }
            let q = format!("SELECT {} FROM {} t WHERE {}", t.key_text_sql("t"), t.qualified, conds.join(" AND "));
            let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            if let Some(row) = self.conn.client.query_opt(&q, &p).await.map_err(EngineError::pg("finding the row holding a unique value"))? {
                return Ok(Some(row.get(0)));
            }
        }
        Ok(None)
    }

    /// Rows of `e` that reference a row folded into another
    /// (`on_unique_conflict = "merge"`) are re-pointed to it, at the main;
    /// returns the re-pointed entry and which of its changes changed (the
    /// author gets them back in the echo).
    pub(super) async fn repoint_merged(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>]) -> Result<Option<(LogEntry, Vec<usize>)>, EngineError> {
        let Some(merged) = self.wing.merged_tables() else {
            return Ok(None);
        };
        let mut out = e.clone();
        let mut touched = Vec::new();
        let mut cache: HashMap<(String, String), Option<Vec<String>>> = HashMap::new();
        for (ci, ch) in out.changes.iter_mut().enumerate() {
            let (t, new) = match ch {
                RowChange::Insert { table, new } | RowChange::Update { table, new, .. } => (*table, new),
                _ => continue,
            };
            let Some(m) = maps.get(t as usize).and_then(|m| m.as_ref()) else { continue };
            for fk in &m.table.parents {
                if !merged.contains(&fk.parent_name) {
                    continue;
                }
                let idx: Option<Vec<usize>> = fk.column_names.iter().map(|c| m.targets.iter().position(|t| t.as_deref() == Some(c.as_str()))).collect();
                let Some(idx) = idx else { continue };
                let vals: Option<Vec<String>> = idx.iter().map(|i| new.get(*i).and_then(Value::as_text).map(str::to_string)).collect();
                let Some(vals) = vals else { continue };
                let from = key_text(&vals.iter().map(String::as_str).collect::<Vec<_>>());
                let ck = (fk.parent_name.clone(), from.clone());
                if !cache.contains_key(&ck) {
                    let to: Option<String> = self
                        .conn
                        .client
                        .query_opt("SELECT to_key FROM branchsync.key_merges WHERE tbl = $1 AND from_key = $2", &[&fk.parent_name, &from])
                        .await
                        .map_err(EngineError::pg("reading merged keys"))?
                        .map(|r| r.get(0));
                    cache.insert(ck.clone(), to.and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok()));
                }
                if let Some(Some(to)) = cache.get(&ck) {
                    for (i, v) in idx.iter().zip(to) {
                        if let Some(slot) = new.get_mut(*i) {
                            *slot = Value::Text(v.clone());
                        }
                    }
                    touched.push(ci);
                }
            }
        }
        Ok((!touched.is_empty()).then_some((out, touched)))
    }

    /// Tells the author of `e` how the main holds a row now (a
    /// [`Verdict`], relayed to the author only).
    pub(super) async fn emit_verdict(
        &mut self,
        e: &LogEntry,
        m: &Mapping,
        desc: &TableDesc,
        ks: &[usize],
        key_vals: &[String],
        row: Option<&HashMap<String, Option<String>>>,
    ) -> Result<(), EngineError> {
        if !self.wing.decides() {
            return Ok(());
        }
        let mut key = vec![Value::Null; desc.columns.len()];
        for (j, k) in ks.iter().enumerate() {
            if let (Some(slot), Some(v)) = (key.get_mut(*k), key_vals.get(j)) {
                *slot = Value::Text(v.clone());
            }
        }
        let row = row.map(|r| {
            m.targets
                .iter()
                .map(|t| match t.as_ref().and_then(|c| r.get(c)) {
                    Some(Some(v)) => Value::Text(v.clone()),
                    Some(None) => Value::Null,
                    None => Value::Unchanged,
                })
                .collect::<Vec<_>>()
        });
        let v = Verdict { table: 0, key, row, for_commit_ts: e.header.commit_ts_us, to: None };
        let msg = rmp_serde::to_vec(&(desc, &v)).map_err(|err| EngineError::Corrupt(format!("cannot encode a verdict: {err}")))?;
        let msg = self.seal(VERDICT_MESSAGE_PREFIX, &msg);
        self.conn
            .client
            .execute("SELECT pg_logical_emit_message(true, $1, $2::bytea)::text", &[&VERDICT_MESSAGE_PREFIX, &msg])
            .await
            .map_err(EngineError::pg("writing a verdict"))?;
        self.stats.verdicts += 1;
        tracing::debug!(stream = %self.stream, table = %m.table.name, author = %e.header.author, "verdict sent to the author");
        Ok(())
    }

    /// Records a conflict; at the main the record also travels to every node.
    pub(super) async fn record_conflict(&mut self, c: NewConflict<'_>) -> Result<(), EngineError> {
        let st = self
            .stmt(
                "INSERT INTO branchsync.conflicts (tbl, key, kind, rule, winner_node, loser_node, local_version, remote_version, detail, origin_node) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb, $9, $10) \
                 RETURNING id, (extract(epoch from at) * 1000000)::int8",
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT, Type::TEXT],
            )
            .await?;
        let row = self
            .conn
            .client
            .query_one(&st, &[&c.tbl, &c.key, &c.kind.as_str(), &c.rule, &c.winner, &c.loser, &c.local, &c.remote, &c.detail, &self.cfg.node])
            .await
            .map_err(EngineError::pg("recording a conflict"))?;
        self.stats.conflicts += 1;
        tracing::info!(stream = %self.stream, table = %c.tbl, kind = c.kind.as_str(), rule = c.rule, winner = ?c.winner, loser = ?c.loser, "conflict recorded");
        if self.wing.decides() {
            let rec = ConflictRecord {
                id: row.get(0),
                table: c.tbl.to_string(),
                key: c.key,
                kind: c.kind.as_str().to_string(),
                rule: c.rule.to_string(),
                winner: c.winner,
                loser: c.loser,
                local_version: c.local,
                remote_version: c.remote,
                detail: c.detail,
                at_us: row.get(1),
            };
            let msg = rmp_serde::to_vec(&rec).map_err(|err| EngineError::Corrupt(format!("cannot encode a conflict record: {err}")))?;
            let msg = self.seal(CONFLICT_MESSAGE_PREFIX, &msg);
            self.conn
                .client
                .execute("SELECT pg_logical_emit_message(true, $1, $2::bytea)::text", &[&CONFLICT_MESSAGE_PREFIX, &msg])
                .await
                .map_err(EngineError::pg("writing a conflict record"))?;
        }
        Ok(())
    }
}
