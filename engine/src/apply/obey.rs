//! Obeying at a branch: the main's relay is the main's history, applied in
//! its order, and the main's decisions about this branch's own changes come
//! back in it.
//!
//! ```text
//!   relay entry of another node     → written, except over a row changed here
//!                                     that the main has not decided yet
//!   relay entry of this node (echo) → the main's result for our change, written
//!                                     unless the row changed here again since
//!   verdict (a row the main decided without writing it) → the same as an echo;
//!                                     another node's verdict is not for us: skipped
//! ```
//!
//! # Why every branch ends equal to the main
//!
//! Every change made here reaches the main once and comes back once: as the
//! row the main wrote for it (the echo: the relay entry authored by this
//! node), or as a verdict when the main did not write the row. So a row
//! changed here is *pending* exactly while its newest version is a local
//! commit made after `init` (rows committed before it are the copied
//! baseline) whose echo has not come back: applying the echo or verdict
//! makes it an applied row again. An echo equal to the row here is not
//! written at all (a sales backlog's echoes are nearly all equal: writing
//! them cost the shop's database an update per row and the WAL to decode
//! it); instead the same statement moves `branchsync.echo_settled` up to
//! the echoed change's commit time, and a local version committed at or
//! before that time is decided too. Echoes come back in the order the
//! changes were made here (the main applies this node's stream in order
//! and relays in its commit order), so every local change at or before the
//! mark has had its echo; the rare commit whose time is out of WAL order by
//! a few microseconds is at worst written over by another node's change
//! before its own echo brings the main's result, as any mistake below heals.
//! Most echoes of a sales backlog are not even compared: when the main
//! wrote a ChangeSet of one fragment that only inserts exactly as it was
//! sent (the digest of the rows it decoded equals the one of the rows sent,
//! see [`crate::marks::RowsDigest`]), the relay entry says so
//! ([`LogEntry::echo_as_sent`]) and this node takes it without reading its
//! rows: they are here as committed, or a newer local change of them is
//! (until the mark passes them, other nodes' changes are not written over
//! them), which is what an equal echo finds. The mark moves after the
//! statements queued before the echo and before any other node's change
//! that follows it.
//! While it is pending, other nodes' changes to it are not written here —
//! the main decides them against our change and the echo brings the result.
//! An echo or verdict is not written over a newer local change of the same
//! row (two local transactions changing one row are serialised by its lock,
//! so their commit times are in order): that newer change comes back later
//! with the main's result. Once every change made here has come back, each
//! row holds the last thing the main wrote or decided for it: the main's row.
//!
//! Mistakes heal: a row written here over a local delete that was not yet
//! known (capture writes tombstones back asynchronously) is set right by the
//! echo of that delete, and a row written back under a key that a local
//! update changed since (an ERP giving a new record its parent's id) by the
//! echo of that update, which takes the row away from its old key.
//!
//! Tables without a key are multisets without decisions: other nodes' changes
//! are applied as they come, this node's own are not applied twice.

use std::time::{Duration, Instant};

use branchsync_proto::{ConflictRecord, LogEntry, RowChange, TableDesc, Value, Verdict};
use tokio_postgres::types::{ToSql, Type};

use super::sql::Guard;
use super::role::Wing;
use super::{change_table, park, sql, Applier, Mapping};
use crate::catalog::key_text;
use crate::pg::{fmt_lsn, parse_lsn};
use crate::EngineError;

/// How long a verdict waits for capture to catch up before the session is
/// retried.
const CAPTURE_WAIT: Duration = Duration::from_secs(30);

impl Applier {
    /// `true` when `e` is the main's echo of a change made here.
    pub(super) fn is_echo(&self, e: &LogEntry) -> bool {
        self.wing.obeys() && e.header.author == self.cfg.node
    }

    /// `true` when `e` is the echo of a change made here that the main
    /// wrote exactly as sent ([`LogEntry::echo_as_sent`]): its rows are
    /// here already, or a newer local change of them is, so the echo is
    /// taken by moving `branchsync.echo_settled` up to its commit time, as
    /// an echo equal to the row here is (where that table is missing, the
    /// rows are compared as before).
    pub(super) fn takes_as_sent(&self, e: &LogEntry) -> bool {
        e.echo_as_sent && self.wing.settles() && e.part == 0 && e.last && self.is_echo(e)
    }

    /// The guard for writing `e`'s rows here, and the parameter holding its
    /// commit time when it is an echo (`next_param` is that parameter's number).
    pub(super) fn guard_for(&self, e: &LogEntry, next_param: usize) -> Guard {
        match &self.wing {
            Wing::Decider(_) => Guard::None,
            Wing::Obeyer(o) if self.is_echo(e) && o.settle => Guard::EchoSettle(next_param),
            Wing::Obeyer(_) if self.is_echo(e) => Guard::Echo(next_param),
            Wing::Obeyer(_) => self.others_guard(),
        }
    }

    /// The guard for other nodes' changes.
    pub(super) fn others_guard(&self) -> Guard {
        Guard::Others { init_us: self.init_ts_us, settled: self.wing.settles() }
    }

    /// An echo without what was only ever ours: schema changes, TRUNCATE and
    /// rows of tables without a key already happened here. `None` when the
    /// echo is to be applied whole (no copy of a large entry is made).
    pub(super) fn echo_rows(&self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>]) -> Option<LogEntry> {
        let keep = |c: &RowChange| match c {
            RowChange::Ddl(_) | RowChange::Truncate { .. } => false,
            RowChange::Verdict(_) | RowChange::Conflict(_) => true,
            _ => change_table(c).and_then(|t| maps.get(t as usize)).and_then(|m| m.as_ref()).is_some_and(|m| m.key_src.is_some()),
        };
        if e.changes.iter().all(keep) {
            return None;
        }
        let changes = e.changes.iter().filter(|c| keep(c)).cloned().collect();
        Some(LogEntry { changes, tables: e.tables.clone(), header: e.header.clone(), ..*e })
    }

    /// A run of updates or deletes of one table, written as the main sent them.
    pub(super) async fn obey_run(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>], run: &[RowChange]) -> Result<(), EngineError> {
        let Some(t) = change_table(&run[0]) else { return Ok(()) };
        let Some(m) = maps[t as usize].clone() else { return Ok(()) };
        let desc = &e.tables[t as usize];
        let Some(ks) = m.key_src.clone() else {
            for ch in run {
                self.apply_keyless(e, &m, desc, ch).await?;
            }
            return Ok(());
        };
        if self.is_echo(e) && matches!(run[0], RowChange::Update { .. }) {
            // The main's whole row: written (or inserted back) unless a
            // newer local change of it is on its way.
            for ch in run {
                if let RowChange::Update { old, new, .. } = ch {
                    // An update that gave the row a new key moved it away
                    // from its old one, here as at the main. The echo of
                    // the insert before it may have written the row back
                    // under that old key (this node's own tombstone of it
                    // not yet known): it goes, as an echoed delete would
                    // take it (not over a newer local change).
                    if let Some(o) = old {
                        let old_key: Vec<Option<&str>> = ks.iter().map(|k| o.values.get(*k).and_then(Value::as_text)).collect();
                        let new_key: Vec<Option<&str>> = ks.iter().map(|k| new.get(*k).and_then(Value::as_text)).collect();
                        if old_key != new_key && !ks.iter().any(|k| matches!(new.get(*k), Some(Value::Unchanged))) {
                            let arrays: Vec<Vec<Option<&str>>> = old_key.iter().map(|v| vec![*v]).collect();
                            self.delete_keys(e, &m, &arrays).await?;
                        }
                    }
                    self.obey_insert(e, &m, desc, new).await?;
                }
            }
            return Ok(());
        }
        let old_keys: Vec<Vec<Option<&str>>> = run
            .iter()
            .map(|ch| {
                let vals = match ch {
                    RowChange::Update { old: Some(o), .. } => &o.values,
                    RowChange::Update { new, .. } => new,
                    RowChange::Delete { old, .. } => &old.values,
                    _ => super::unreachable_change(),
                };
                ks.iter().map(|k| vals.get(*k).and_then(Value::as_text)).collect()
            })
            .collect();
        let key_arrays: Vec<Vec<Option<&str>>> = (0..ks.len()).map(|j| old_keys.iter().map(|k| k[j]).collect()).collect();
        if matches!(run[0], RowChange::Delete { .. }) {
            return self.delete_keys(e, &m, &key_arrays).await;
        }
        let RowChange::Update { new: first, .. } = &run[0] else { return Ok(()) };
        let set_src: Vec<usize> = (0..m.targets.len())
            .filter(|i| m.local(*i).is_some_and(|c| !c.identity_always) && !matches!(first.get(*i), Some(Value::Unchanged)))
            .collect();
        let set_names: Vec<&str> = set_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        if set_names.is_empty() {
            return Ok(());
        }
        let st = self.stmt(&sql::update_guarded(&m.table, &set_names, self.others_guard()), &vec![Type::TEXT_ARRAY; ks.len() + set_names.len()]).await?;
        let news: Vec<&Vec<Value>> = run.iter().map(|ch| match ch { RowChange::Update { new, .. } => new, _ => super::unreachable_change() }).collect();
        let vals: Vec<Vec<Option<&str>>> = set_src.iter().map(|c| news.iter().map(|n| n.get(*c).and_then(Value::as_text)).collect()).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = key_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        params.extend(vals.iter().map(|a| a as &(dyn ToSql + Sync)));
        self.conn.client.execute(&st, &params).await.map_err(EngineError::pg(format!("applying updates to {}", m.table.name)))?;
        Ok(())
    }

    /// Deletes the rows of `m` with the given keys (one array per key
    /// column), within the guard of `e`.
    async fn delete_keys(&mut self, e: &LogEntry, m: &Mapping, key_arrays: &[Vec<Option<&str>>]) -> Result<(), EngineError> {
        let guard = self.guard_for(e, key_arrays.len() + 1);
        let mut types = vec![Type::TEXT_ARRAY; key_arrays.len()];
        if guard.takes_ts() {
            types.push(Type::INT8);
        }
        let ts = e.header.commit_ts_us;
        let st = self.stmt(&sql::delete_guarded(&m.table, guard), &types).await?;
        let mut params: Vec<&(dyn ToSql + Sync)> = key_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        if guard.takes_ts() {
            params.push(&ts);
        }
        self.conn.client.execute(&st, &params).await.map_err(EngineError::pg(format!("applying deletes to {}", m.table.name)))?;
        Ok(())
    }

    /// One row of the main, inserted or written over the row here (within
    /// the guard); a clash with a row of another key on a unique constraint
    /// waits, parked, for the main's decision about that row.
    pub(super) async fn obey_insert(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, new: &[Value]) -> Result<(), EngineError> {
        self.obey_insert_since(e, m, desc, new, None).await
    }

    /// [`Applier::obey_insert`]; with `since`, not over a local change
    /// committed after that time (µs) rather than as `e`'s guard says (a
    /// repair: the main's row replaces what was changed here behind the
    /// stream, not what changed here after the repair was sent).
    async fn obey_insert_since(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, new: &[Value], since: Option<i64>) -> Result<(), EngineError> {
        let cols: Vec<usize> = (0..m.targets.len()).filter(|i| m.targets[*i].is_some() && !matches!(new.get(*i), Some(Value::Unchanged))).collect();
        let names: Vec<&str> = cols.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let guard = if since.is_some() { Guard::Echo(cols.len() + 1) } else { self.guard_for(e, cols.len() + 1).for_row(super::pipeline::chunk_bytes(&[new], &cols)) };
        let mut types = vec![Type::TEXT_ARRAY; cols.len()];
        if guard.takes_ts() {
            types.push(Type::INT8);
        }
        let st = self.stmt(&sql::upsert(&m.table, &names, guard), &types).await?;
        let arrays: Vec<Vec<Option<&str>>> = cols.iter().map(|c| vec![new.get(*c).and_then(Value::as_text)]).collect();
        let ts = since.unwrap_or(e.header.commit_ts_us);
        let mut params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        if guard.takes_ts() {
            params.push(&ts);
        }
        let c = &self.conn.client;
        c.batch_execute("SAVEPOINT branchsync_unique").await.map_err(EngineError::pg("setting a savepoint"))?;
        match c.execute(&st, &params).await {
            Ok(_) => {
                c.batch_execute("RELEASE SAVEPOINT branchsync_unique").await.map_err(EngineError::pg("releasing a savepoint"))?;
                Ok(())
            }
            Err(err) if err.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                c.batch_execute("ROLLBACK TO SAVEPOINT branchsync_unique; RELEASE SAVEPOINT branchsync_unique")
                    .await
                    .map_err(EngineError::pg("rolling back to a savepoint"))?;
                let Some(key) = park::held_key_of(m, &RowChange::Insert { table: 0, new: new.to_vec() }) else {
                    return Err(EngineError::pg(format!("applying an insert to {}", m.table.name))(err));
                };
                tracing::info!(stream = %self.stream, table = %m.table.name, "row waits: a row here holds the same unique value until the main decides about it");
                self.park_one(&e.header, desc, &RowChange::Insert { table: 0, new: new.to_vec() }, &m.table.name, &key, park::UNIQUE_WAIT).await
            }
            Err(err) => Err(EngineError::pg(format!("applying an insert to {}", m.table.name))(err)),
        }
    }

    /// The main's verdict about one of this branch's own changes.
    pub(super) async fn obey_verdict(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>], v: &Verdict) -> Result<(), EngineError> {
        // A repair names its branch; any other verdict answers the branch
        // whose change the main decided without writing: the main's rows did
        // not change, and every other branch follows those rows already.
        // Obeyed elsewhere it would be judged against another node's commit
        // time, and it may be stale: the main decides a change against a row
        // that is absent without a lock, so another stream's insert of that
        // key can commit at the main first and come before the verdict in
        // the relay (the random convergence test saw a branch delete its own
        // insert, which the main kept, this way).
        let for_us = match v.to.as_deref() {
            Some(to) => to == self.cfg.node,
            None => self.is_echo(e),
        };
        if !for_us {
            return Ok(());
        }
        let Some(m) = maps.get(v.table as usize).and_then(|m| m.clone()) else { return Ok(()) };
        let Some(ks) = m.key_src.clone() else { return Ok(()) };
        let key_vals: Vec<String> = ks.iter().map(|k| v.key.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect();
        let key = key_text(&key_vals.iter().map(String::as_str).collect::<Vec<_>>());
        let t = &m.table;
        let conds: Vec<String> = t.pk.iter().enumerate().map(|(j, k)| format!("t.{} = ${}::text::{}", t.columns[k].quoted, j + 1, t.columns[k].type_name)).collect();
        let q = format!("SELECT 1 FROM {} t WHERE {} FOR UPDATE OF t", t.qualified, conds.join(" AND "));
        let p: Vec<&(dyn ToSql + Sync)> = key_vals.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        let here = self.conn.client.query_opt(&q, &p).await.map_err(EngineError::pg(format!("reading a row of {}", t.name)))?;
        if here.is_none() {
            // A delete made here after the decided change may not have its
            // tombstone yet: let capture catch up with the WAL first.
            self.wait_for_capture().await?;
            let newer_delete: bool = self
                .conn
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM branchsync.row_version WHERE tbl = $1 AND key = $2 AND deleted AND node = $3 AND ts > $4)",
                    &[&t.name, &key, &self.cfg.node, &v.for_commit_ts],
                )
                .await
                .map_err(EngineError::pg("reading a tombstone"))?
                .get(0);
            if newer_delete {
                tracing::debug!(stream = %self.stream, table = %t.name, "verdict left alone: the row was deleted here later");
                return Ok(());
            }
        }
        let desc = &e.tables[v.table as usize];
        match &v.row {
            // Written within the echo guard: not over a newer local change.
            Some(row) if v.to.is_some() => self.obey_insert_since(e, &m, desc, row, Some(v.for_commit_ts)).await?,
            Some(row) => self.obey_insert(e, &m, desc, row).await?,
            None => {
                let st = self.stmt(&sql::delete_guarded(t, Guard::Echo(ks.len() + 1)), &{
                    let mut ty = vec![Type::TEXT_ARRAY; ks.len()];
                    ty.push(Type::INT8);
                    ty
                })
                .await?;
                let arrays: Vec<Vec<&str>> = key_vals.iter().map(|k| vec![k.as_str()]).collect();
                let mut p: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                p.push(&v.for_commit_ts);
                self.conn.client.execute(&st, &p).await.map_err(EngineError::pg(format!("applying a verdict to {}", t.name)))?;
            }
        }
        self.stats.verdicts += 1;
        tracing::debug!(stream = %self.stream, table = %t.name, "the main's verdict about a change made here applied");
        Ok(())
    }

    /// Waits until capture has logged (and written back) everything
    /// committed here so far.
    pub(super) async fn wait_for_capture(&mut self) -> Result<(), EngineError> {
        let Some(mut rx) = self.cfg.capture_progress.clone() else { return Ok(()) };
        // A probe: capture is caught up with everything committed before it
        // once it has read it (and made what came before durable).
        let lsn: String = self
            .conn
            .client
            .query_one("SELECT pg_logical_emit_message(false, $1, ''::bytea)::text", &[&crate::state::PROBE_PREFIX])
            .await
            .map_err(EngineError::pg("writing a capture probe"))?
            .get(0);
        let want = parse_lsn(&lsn).unwrap_or(0);
        let deadline = Instant::now() + CAPTURE_WAIT;
        while rx.borrow_and_update().caught_up_lsn < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.map(|r| r.is_err()).unwrap_or(true) {
                return Err(EngineError::CaptureBehind { wanted: fmt_lsn(want) });
            }
        }
        Ok(())
    }

    /// A conflict the main recorded, kept here too.
    pub(super) async fn obey_conflict(&mut self, origin: &str, r: &ConflictRecord) -> Result<(), EngineError> {
        self.conn
            .client
            .execute(
                "INSERT INTO branchsync.conflicts (at, tbl, key, kind, rule, winner_node, loser_node, local_version, remote_version, detail, origin_node, origin_id) \
                 VALUES ('epoch'::timestamptz + $1::int8 * interval '1 microsecond', $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9::text::jsonb, $10, $11, $12) \
                 ON CONFLICT DO NOTHING",
                &[&r.at_us, &r.table, &r.key, &r.kind, &r.rule, &r.winner, &r.loser, &r.local_version, &r.remote_version, &r.detail, &origin, &r.id],
            )
            .await
            .map_err(EngineError::pg("recording the main's conflict record"))?;
        Ok(())
    }
}
