//! Obeying at a branch: the main's relay is the main's history, applied as
//! it comes.
//!
//! The main has decided every change in its relay already (see
//! [`super::decide`]), so a branch writes them without locking for a
//! decision or keeping row versions: an insert replaces a row of the same
//! key, an update or delete of a row that is not here is skipped (a delete
//! of it made here is on its way to the main, which will decide). What the
//! branch still decides is only *when* to take a verdict about one of its
//! own changes: never over a newer local change of the same row, which the
//! main decides later.
//!
//! # Why a verdict is safe
//!
//! A verdict names the commit time (on this branch's clock) of the change it
//! decides. Two local transactions changing the same row are serialised by
//! the row lock, so a later one has a later commit time: a row whose local
//! version is newer than the verdict's change is left alone. A row deleted
//! here after that change is recognised by its tombstone, which capture
//! writes back; apply waits until capture has caught up with the WAL before
//! it looks.

use std::time::{Duration, Instant};

use branchsync_proto::{ConflictRecord, LogEntry, RowChange, TableDesc, Value, Verdict};
use tokio_postgres::types::{ToSql, Type};

use super::{change_table, key_text, park, sql, Applier, Mapping};
use crate::pg::{fmt_lsn, parse_lsn};
use crate::EngineError;

/// How long a verdict waits for capture to catch up before the session is
/// retried.
const CAPTURE_WAIT: Duration = Duration::from_secs(30);

impl Applier {
    /// A run of updates or deletes of one table, written as the main sent them.
    pub(super) async fn obey_run(&mut self, e: &LogEntry, maps: &[Option<Mapping>], run: &[RowChange]) -> Result<(), EngineError> {
        let Some(t) = change_table(&run[0]) else { return Ok(()) };
        let Some(m) = maps[t as usize].clone() else { return Ok(()) };
        let Some(ks) = m.key_src.clone() else {
            let desc = &e.tables[t as usize];
            for ch in run {
                self.apply_keyless(e, &m, desc, ch).await?;
            }
            return Ok(());
        };
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
            let st = self.stmt(&sql::delete(&m.table), &vec![Type::TEXT_ARRAY; ks.len()]).await?;
            let params: Vec<&(dyn ToSql + Sync)> = key_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            self.conn.client.execute(&st, &params).await.map_err(EngineError::pg(format!("applying deletes to {}", m.table.name)))?;
            return Ok(());
        }
        let RowChange::Update { new: first, .. } = &run[0] else { return Ok(()) };
        let set_src: Vec<usize> = (0..m.targets.len())
            .filter(|i| m.local(*i).is_some_and(|c| !c.identity_always) && !matches!(first.get(*i), Some(Value::Unchanged)))
            .collect();
        let set_names: Vec<&str> = set_src.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        if set_names.is_empty() {
            return Ok(());
        }
        let st = self.stmt(&sql::update(&m.table, &set_names), &vec![Type::TEXT_ARRAY; ks.len() + set_names.len()]).await?;
        let news: Vec<&Vec<Value>> = run.iter().map(|ch| match ch { RowChange::Update { new, .. } => new, _ => super::unreachable_change() }).collect();
        let vals: Vec<Vec<Option<&str>>> = set_src.iter().map(|c| news.iter().map(|n| n.get(*c).and_then(Value::as_text)).collect()).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = key_arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        params.extend(vals.iter().map(|a| a as &(dyn ToSql + Sync)));
        self.conn.client.execute(&st, &params).await.map_err(EngineError::pg(format!("applying updates to {}", m.table.name)))?;
        Ok(())
    }

    /// One insert of the relay, taken as it comes; a clash with a row of
    /// another key on a unique constraint waits, parked, for the main's
    /// verdict about that row.
    pub(super) async fn obey_insert(&mut self, e: &LogEntry, m: &Mapping, desc: &TableDesc, new: &[Value]) -> Result<(), EngineError> {
        let cols: Vec<usize> = (0..m.targets.len()).filter(|i| m.targets[*i].is_some() && !matches!(new.get(*i), Some(Value::Unchanged))).collect();
        let names: Vec<&str> = cols.iter().map(|i| m.targets[*i].as_deref().unwrap_or_default()).collect();
        let st = self.stmt(&sql::upsert(&m.table, &names), &vec![Type::TEXT_ARRAY; cols.len()]).await?;
        let arrays: Vec<Vec<Option<&str>>> = cols.iter().map(|c| vec![new.get(*c).and_then(Value::as_text)]).collect();
        let params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
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
    pub(super) async fn obey_verdict(&mut self, e: &LogEntry, maps: &[Option<Mapping>], v: &Verdict) -> Result<(), EngineError> {
        let Some(m) = maps.get(v.table as usize).and_then(|m| m.clone()) else { return Ok(()) };
        let Some(ks) = m.key_src.clone() else { return Ok(()) };
        let key_vals: Vec<String> = ks.iter().map(|k| v.key.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect();
        let key = key_text(&key_vals.iter().map(String::as_str).collect::<Vec<_>>());
        let t = &m.table;
        let conds: Vec<String> = t.pk.iter().enumerate().map(|(j, k)| format!("t.{} = ${}::text::{}", t.columns[k].quoted, j + 1, t.columns[k].type_name)).collect();
        let q = format!(
            "SELECT cts.roident::int8, (extract(epoch from cts.\"timestamp\") * 1000000)::int8 FROM {} t \
             LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) cts ON true WHERE {} FOR UPDATE OF t",
            t.qualified,
            conds.join(" AND ")
        );
        let p: Vec<&(dyn ToSql + Sync)> = key_vals.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        let here = self.conn.client.query_opt(&q, &p).await.map_err(EngineError::pg(format!("reading a row of {}", t.name)))?;
        match here {
            Some(r) => {
                let (origin, ts): (Option<i64>, Option<i64>) = (r.get(0), r.get(1));
                if origin == Some(0) && ts.is_some_and(|ts| ts > v.for_commit_ts) {
                    tracing::debug!(stream = %self.stream, table = %t.name, "verdict left alone: a newer local change of the row is on its way");
                    return Ok(());
                }
            }
            None => {
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
        }
        match &v.row {
            Some(row) => {
                let desc = &e.tables[v.table as usize];
                self.obey_insert(e, &m, desc, row).await?;
            }
            None => {
                let st = self.stmt(&sql::delete(t), &vec![Type::TEXT_ARRAY; ks.len()]).await?;
                let arrays: Vec<Vec<&str>> = key_vals.iter().map(|k| vec![k.as_str()]).collect();
                let p: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
                self.conn.client.execute(&st, &p).await.map_err(EngineError::pg(format!("applying a verdict to {}", t.name)))?;
            }
        }
        self.stats.verdicts += 1;
        tracing::info!(stream = %self.stream, table = %t.name, "the main's verdict about a change made here applied");
        Ok(())
    }

    /// Waits until capture has logged (and written back) everything
    /// committed here so far.
    async fn wait_for_capture(&mut self) -> Result<(), EngineError> {
        let Some(mut rx) = self.cfg.capture_progress.clone() else { return Ok(()) };
        let lsn: String = self
            .conn
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(EngineError::pg("reading the WAL position"))?
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
