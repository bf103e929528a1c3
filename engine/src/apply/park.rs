//! Parked changes: orphans whose parents have not arrived (R9) and the
//! changes that queue behind a parked or quarantined key (R6).
//!
//! Under `session_replication_role = replica` PostgreSQL's foreign-key
//! triggers do not fire, so apply checks parents itself. After each fragment
//! it moves every row it inserted or updated whose parent row is missing out
//! of the table into `branchsync.parked` (in the same transaction, so a crash
//! parks it or not at all). Later changes to a parked key, or to a key whose
//! change was quarantined, are appended to the same queue instead of being
//! applied out of order; their order is the `id` of `branchsync.parked`.
//! Rows for a table that does not exist here are parked the same way, as one
//! entry per ChangeSet, and hold the whole table until they apply.
//!
//! # Retrying
//!
//! While this stream has parked rows, the applier retries them between
//! apply transactions (about once a second). A key's whole queue is replayed
//! in one local transaction under the origin and commit data of the
//! ChangeSet that parked it (R17), so the replay is never captured again as a
//! new local change at a branch, and at the main the relay attributes it to
//! its author. A queue whose head is still an orphan, or still waits behind
//! an unresolved quarantined change, stays parked. Apply never cascades: a
//! delete that arrives is applied to the rows its author sent, nothing more.
//!
//! # Limits
//!
//! Parents are checked for tables with a primary key; an orphan in a table
//! without one is applied as it arrives. Parked rows of a stream are retried
//! while that stream's session runs.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use branchsync_proto::{ChangeSetHeader, LogEntry, RowChange, TableDesc, Value};
use tokio_postgres::types::{ToSql, Type};

use super::{change_keys, change_table, sql, Applier, Mapping};
use crate::catalog::key_text;
use crate::conflict_log::ConflictKind;
use crate::error::pg_error_is_transient;
use crate::pg::fmt_lsn;
use crate::state::APPLY_MESSAGE_PREFIX;
use crate::EngineError;

/// How often parked rows are retried while a stream has any.
pub const RETRY_PERIOD: Duration = Duration::from_secs(1);
/// Most key queues replayed per retry round.
const MAX_QUEUES_PER_ROUND: usize = 500;

/// Rows of a table that does not exist here; the key column holds
/// [`WHOLE_TABLE`] and every later change to the table queues behind them.
pub const MISSING_TABLE: &str = "missing_table";
/// Key text that holds a whole table.
pub const WHOLE_TABLE: &str = "*";
/// Queued behind a parked orphan of the same key.
pub const BEHIND_ORPHAN: &str = "behind_orphan";
/// Queued behind a quarantined change of the same key.
pub const BEHIND_QUARANTINE: &str = "behind_quarantine";
/// At a branch: a row of the main that clashes on a unique constraint with a
/// row made here; it waits for the main's verdict about that row.
pub const UNIQUE_WAIT: &str = "unique_wait";

/// Key text of the row a change touches, for tables with a key.
pub(super) fn held_key_of(m: &Mapping, ch: &RowChange) -> Option<String> {
    let ks = m.key_src.as_ref()?;
    let k: Vec<String> = match ch {
        RowChange::Insert { new, .. } => ks.iter().map(|k| new.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect(),
        _ => change_keys(m, ch)?.into_iter().next()?,
    };
    Some(key_text(&k.iter().map(String::as_str).collect::<Vec<_>>()))
}

impl Applier {
    /// Loads the keys that changes must queue behind, and this stream's
    /// parked count.
    pub(super) async fn load_held(&mut self) -> Result<(), EngineError> {
        let rows = self
            .conn
            .client
            .query(
                "SELECT tbl, key FROM branchsync.parked WHERE key IS NOT NULL \
                 UNION SELECT tbl, key FROM branchsync.conflicts WHERE kind = $1 AND key IS NOT NULL AND resolved_at IS NULL",
                &[&ConflictKind::Quarantined.as_str()],
            )
            .await
            .map_err(EngineError::pg("reading parked and quarantined keys"))?;
        self.held = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let n: i64 = self
            .conn
            .client
            .query_one("SELECT count(*) FROM branchsync.parked WHERE stream = $1", &[&self.stream])
            .await
            .map_err(EngineError::pg("counting parked rows"))?
            .get(0);
        self.stats.parked = n.max(0) as u64;
        Ok(())
    }

    /// Splits off the changes of `e` whose key is held: they are queued in
    /// `branchsync.parked` behind it. Returns the entry to apply now.
    pub(super) async fn hold_back(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<super::Mapping>>]) -> Result<Option<LogEntry>, EngineError> {
        if self.held.is_empty() {
            return Ok(None);
        }
        let mut keep = Vec::with_capacity(e.changes.len());
        let mut held_any = false;
        for ch in &e.changes {
            let hit = change_table(ch).and_then(|t| maps[t as usize].as_ref().map(|m| (t, m))).and_then(|(t, m)| {
                held_key_of(m, ch).filter(|k| self.held.contains(&(m.table.name.clone(), k.clone()))).map(|k| (t, m.table.name.clone(), k))
            });
            match hit {
                Some((t, tbl, key)) => {
                    held_any = true;
                    let desc = &e.tables[t as usize];
                    self.queue_behind(&e.header, desc, ch, &tbl, &key).await?;
                }
                None => keep.push(ch.clone()),
            }
        }
        Ok(held_any.then(|| LogEntry { changes: keep, ..e.clone() }))
    }

    async fn queue_behind(&mut self, h: &ChangeSetHeader, desc: &TableDesc, ch: &RowChange, tbl: &str, key: &str) -> Result<(), EngineError> {
        let quarantined = self
            .conn
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM branchsync.conflicts WHERE tbl = $1 AND key = $2 AND kind = $3 AND resolved_at IS NULL)",
                &[&tbl, &key, &ConflictKind::Quarantined.as_str()],
            )
            .await
            .map_err(EngineError::pg("checking for a quarantined change"))?
            .get::<_, bool>(0);
        let reason = if quarantined { BEHIND_QUARANTINE } else { BEHIND_ORPHAN };
        self.park_one(h, desc, ch, tbl, key, reason).await
    }

    /// Parks one change in `branchsync.parked` under `key`, for `reason`.
    pub(super) async fn park_one(&mut self, h: &ChangeSetHeader, desc: &TableDesc, ch: &RowChange, tbl: &str, key: &str, reason: &str) -> Result<(), EngineError> {
        let mut one = ch.clone();
        match &mut one {
            RowChange::Insert { table, .. } | RowChange::Update { table, .. } | RowChange::Delete { table, .. } => *table = 0,
            _ => return Ok(()),
        }
        let entry = LogEntry { pos: 0, header: h.clone(), part: 0, last: true, tables: vec![desc.clone()], changes: vec![one], relay_ts_us: 0, echo_as_sent: false };
        let entry = rmp_serde::to_vec(&entry).map_err(|err| EngineError::Corrupt(format!("cannot encode a parked change: {err}")))?;
        let header = rmp_serde::to_vec(h).map_err(|err| EngineError::Corrupt(format!("cannot encode a header: {err}")))?;
        self.conn
            .client
            .execute(
                "INSERT INTO branchsync.parked (stream, tbl, key, header, entry, reason) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&self.stream, &tbl, &key, &header, &entry, &reason],
            )
            .await
            .map_err(EngineError::pg("queueing a change behind a held key"))?;
        self.stats.parked += 1;
        self.held.insert((tbl.to_string(), key.to_string()));
        tracing::info!(stream = %self.stream, table = %tbl, author = %h.author, reason, "change parked");
        Ok(())
    }

    /// Parks every change of table `t` in `e` as one queued entry: the table
    /// does not exist here, or earlier changes to it are parked.
    pub(super) async fn park_table_changes(&mut self, e: &LogEntry, t: u32) -> Result<(), EngineError> {
        let changes: Vec<RowChange> = e
            .changes
            .iter()
            .filter(|c| change_table(c) == Some(t))
            .map(|c| {
                let mut c = c.clone();
                if let RowChange::Insert { table, .. } | RowChange::Update { table, .. } | RowChange::Delete { table, .. } = &mut c {
                    *table = 0;
                }
                c
            })
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let desc = &e.tables[t as usize];
        let tbl = format!("{}.{}", desc.schema, desc.name);
        let n = changes.len();
        let entry = LogEntry { pos: 0, header: e.header.clone(), part: 0, last: true, tables: vec![desc.clone()], changes, relay_ts_us: 0, echo_as_sent: false };
        let entry = rmp_serde::to_vec(&entry).map_err(|err| EngineError::Corrupt(format!("cannot encode a parked change: {err}")))?;
        let header = rmp_serde::to_vec(&e.header).map_err(|err| EngineError::Corrupt(format!("cannot encode a header: {err}")))?;
        self.conn
            .client
            .execute(
                "INSERT INTO branchsync.parked (stream, tbl, key, header, entry, reason) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&self.stream, &tbl, &WHOLE_TABLE, &header, &entry, &MISSING_TABLE],
            )
            .await
            .map_err(EngineError::pg("parking the rows of a missing table"))?;
        self.stats.parked += 1;
        self.held.insert((tbl.clone(), WHOLE_TABLE.to_string()));
        tracing::info!(stream = %self.stream, table = %tbl, rows = n, author = %e.header.author, "rows parked: table does not exist here");
        Ok(())
    }

    /// After a fragment: moves the rows it inserted or updated whose parent
    /// is missing into `branchsync.parked` (R9).
    pub(super) async fn park_orphans(&mut self, e: &LogEntry, maps: &[Option<std::sync::Arc<Mapping>>]) -> Result<(), EngineError> {
        let mut touched: BTreeMap<u32, Vec<Vec<String>>> = BTreeMap::new();
        for ch in &e.changes {
            let (t, new) = match ch {
                RowChange::Insert { table, new } | RowChange::Update { table, new, .. } => (*table, new),
                _ => continue,
            };
            let Some(m) = maps[t as usize].as_ref() else { continue };
            let Some(ks) = m.key_src.as_ref() else { continue };
            if m.table.parents.is_empty() {
                continue;
            }
            touched.entry(t).or_default().push(ks.iter().map(|k| new.get(*k).and_then(Value::as_text).unwrap_or("").to_string()).collect());
        }
        if touched.is_empty() {
            return Ok(());
        }
        let header = rmp_serde::to_vec(&e.header).map_err(|err| EngineError::Corrupt(format!("cannot encode a header: {err}")))?;
        for (t, keys) in touched {
            let Some(m) = maps[t as usize].clone() else { continue };
            let n = m.table.pk.len();
            let mut types = vec![Type::TEXT_ARRAY; n];
            types.extend([Type::TEXT, Type::TEXT, Type::BYTEA]);
            let st = self.stmt(&sql::park_orphans(&m.table), &types).await?;
            let arrays: Vec<Vec<&str>> = (0..n).map(|j| keys.iter().map(|k| k[j].as_str()).collect()).collect();
            let mut params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            params.push(&self.stream);
            params.push(&m.table.name);
            params.push(&header);
            let rows = self.conn.client.query(&st, &params).await.map_err(EngineError::pg(format!("checking the parents of rows in {}", m.table.name)))?;
            if !rows.is_empty() {
                tracing::info!(stream = %self.stream, table = %m.table.name, rows = rows.len(), author = %e.header.author, lsn = %fmt_lsn(e.header.commit_lsn), "rows parked: parent missing");
                self.stats.parked += rows.len() as u64;
                for r in rows {
                    self.held.insert((m.table.name.clone(), r.get(0)));
                }
            }
        }
        Ok(())
    }

    /// Retries this stream's parked queues, each in its own transaction.
    /// Call only between apply transactions. Returns how many rows of
    /// `branchsync.parked` were applied (the rows of a missing table that
    /// arrived in one ChangeSet are one parked row).
    pub async fn retry_parked(&mut self) -> Result<u64, EngineError> {
        if self.txn.is_some() || self.stats.parked == 0 {
            return Ok(0);
        }
        let rows = self
            .conn
            .client
            .query(
                "SELECT id, tbl, key, header, row_data::text, entry, reason FROM branchsync.parked WHERE stream = $1 ORDER BY id",
                &[&self.stream],
            )
            .await
            .map_err(EngineError::pg("reading parked rows"))?;
        // Queues per key, in order of their first parked row.
        let mut order: Vec<(String, String)> = Vec::new();
        let mut queues: std::collections::HashMap<(String, String), Vec<tokio_postgres::Row>> = std::collections::HashMap::new();
        for r in rows {
            let k: (String, String) = (r.get(1), r.get::<_, Option<String>>(2).unwrap_or_default());
            if !queues.contains_key(&k) {
                order.push(k.clone());
            }
            queues.entry(k).or_default().push(r);
        }
        let mut applied = 0u64;
        for k in order.into_iter().take(MAX_QUEUES_PER_ROUND) {
            let Some(queue) = queues.remove(&k) else { continue };
            match self.replay_queue(&k, &queue).await {
                Ok(true) => {
                    applied += queue.len() as u64;
                    self.stats.parked = self.stats.parked.saturating_sub(queue.len() as u64);
                    self.held.remove(&k);
                }
                Ok(false) => {}
                Err(EngineError::Postgres { source, context }) if pg_error_is_transient(&source) && !self.conn.client.is_closed() => {
                    tracing::warn!(stream = %self.stream, table = %k.0, error = %source, context, "parked queue not replayed yet; will retry");
                    let _ = self.conn.client.batch_execute("ROLLBACK").await;
                }
                Err(e) => {
                    let _ = self.conn.client.batch_execute("ROLLBACK").await;
                    return Err(e);
                }
            }
        }
        // Keys queued by other streams stay held; reload the set from the database.
        if applied > 0 {
            self.load_held().await?;
            self.progress_tx.send_replace(self.stats.clone());
            tracing::info!(stream = %self.stream, rows = applied, "parked rows applied");
        }
        Ok(applied)
    }

    /// Replays one key's queue; `Ok(false)` when it must stay parked.
    async fn replay_queue(&mut self, k: &(String, String), queue: &[tokio_postgres::Row]) -> Result<bool, EngineError> {
        let head_reason: String = queue[0].get(6);
        if head_reason == BEHIND_QUARANTINE {
            let open: bool = self
                .conn
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM branchsync.conflicts WHERE tbl = $1 AND key = $2 AND kind = 'quarantined' AND resolved_at IS NULL)",
                    &[&k.0, &k.1],
                )
                .await
                .map_err(EngineError::pg("checking for a quarantined change"))?
                .get(0);
            if open {
                return Ok(false);
            }
        }
        if head_reason == MISSING_TABLE {
            // The table may have been created since: look again.
            if let Some((schema, table)) = k.0.split_once('.') {
                self.forget_table(schema, table);
            }
            if self.local_table(&k.0).await?.is_none() {
                return Ok(false);
            }
        }
        let first: ChangeSetHeader = rmp_serde::from_slice(queue[0].get::<_, &[u8]>(3)).map_err(|err| EngineError::Corrupt(format!("parked row {}: bad header: {err}", queue[0].get::<_, i64>(0))))?;
        self.set_origin(&first.author).await?;
        let c = &self.conn.client;
        let xid = c
            .simple_query(&format!("BEGIN; {}", crate::pg::CURRENT_XID))
            .await
            .map_err(EngineError::pg("starting a parked-row transaction"))?
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse::<u32>().ok()),
                _ => None,
            })
            .ok_or_else(|| EngineError::Corrupt("the parked-row transaction has no transaction id".into()))?;
        self.xid = xid;
        self.held.remove(k);
        let mut last = first.clone();
        let mut ids = Vec::with_capacity(queue.len());
        for r in queue {
            let id: i64 = r.get(0);
            ids.push(id);
            let h: ChangeSetHeader = rmp_serde::from_slice(r.get::<_, &[u8]>(3)).map_err(|err| EngineError::Corrupt(format!("parked row {id}: bad header: {err}")))?;
            let msg = self.seal(APPLY_MESSAGE_PREFIX, r.get::<_, &[u8]>(3));
            self.conn
                .client
                .query_one(sql::EMIT_APPLY_MESSAGE, &[&APPLY_MESSAGE_PREFIX, &msg])
                .await
                .map_err(EngineError::pg("writing the apply message"))?;
            if let Some(json) = r.get::<_, Option<String>>(4) {
                let Some(t) = self.local_table(&k.0).await? else {
                    self.conn.client.batch_execute("ROLLBACK").await.map_err(EngineError::pg("ending a parked-row transaction"))?;
                    self.held.insert(k.clone());
                    return Ok(false);
                };
                let still_orphan: bool = self
                    .conn
                    .client
                    .query_one(&sql::unpark_row(&t), &[&json])
                    .await
                    .map_err(EngineError::pg(format!("re-inserting a parked row of {}", k.0)))?
                    .get(0);
                if still_orphan {
                    self.conn.client.batch_execute("ROLLBACK").await.map_err(EngineError::pg("ending a parked-row transaction"))?;
                    self.held.insert(k.clone());
                    return Ok(false);
                }
            } else if let Some(bytes) = r.get::<_, Option<&[u8]>>(5) {
                let entry: LogEntry = rmp_serde::from_slice(bytes).map_err(|err| EngineError::Corrupt(format!("parked row {id}: bad change: {err}")))?;
                self.apply_fragment(&entry, true).await?;
            }
            last = h;
        }
        self.conn
            .client
            .execute("DELETE FROM branchsync.parked WHERE id = ANY($1)", &[&ids])
            .await
            .map_err(EngineError::pg("removing replayed parked rows"))?;
        self.conn
            .client
            .query_one(sql::XACT_SETUP, &[&fmt_lsn(last.commit_lsn), &last.commit_ts_us])
            .await
            .map_err(EngineError::pg("setting the origin of a parked-row transaction"))?;
        self.conn.client.batch_execute("COMMIT").await.map_err(EngineError::pg("committing a parked-row transaction"))?;
        tracing::info!(stream = %self.stream, table = %k.0, author = %first.author, changes = ids.len(), "parked queue applied");
        Ok(true)
    }

    async fn local_table(&mut self, name: &str) -> Result<Option<std::sync::Arc<super::LocalTable>>, EngineError> {
        let Some((schema, table)) = name.split_once('.') else { return Ok(None) };
        let key = (schema.to_string(), table.to_string());
        if !self.tables.contains_key(&key) {
            let t = super::LocalTable::load(&self.conn.client, schema, table).await?;
            self.tables.insert(key.clone(), t.map(std::sync::Arc::new));
        }
        Ok(self.tables[&key].clone())
    }
}

/// Keys held in memory: `(table, key text)`.
pub(super) type Held = HashSet<(String, String)>;

#[cfg(test)]
mod tests {
    //! R9: an order line whose order has not arrived is parked, a later
    //! change to it queues behind it, and both apply, in order and under the
    //! author's origin, once the order arrives.
    use std::sync::Arc;

    use branchsync_proto::{ChangeSetHeader, LogEntry, RowChange, TableDef, TableDesc, Value};

    use crate::apply::{Applier, ApplyConfig, StreamState, DEFAULT_GROUP_BUDGET};
    use crate::scope::Scope;
    use crate::state::STATE_DDL;
    use crate::test_utils::PgCluster;

    fn t(s: &str) -> Value {
        Value::Text(s.to_string())
    }

    fn entry(pos: u64, table: TableDesc, changes: Vec<RowChange>) -> LogEntry {
        let header = ChangeSetHeader {
            author: "branch1".into(),
            author_index: 1,
            system_id: 42,
            commit_lsn: 0x1000 + pos,
            commit_ts_us: 1_700_000_000_000_000 + pos as i64,
            stamp: 1_700_000_000_000_000 + pos, seen_main_ts: 0
        };
        LogEntry { pos, header, part: 0, last: true, tables: vec![table], changes, relay_ts_us: 0, echo_as_sent: false }
    }

    fn desc(name: &str, cols: &[&str]) -> TableDesc {
        TableDesc::from(TableDef { schema: "public".into(), name: name.into(), columns: cols.iter().map(|c| c.to_string()).collect(), key: cols.iter().map(|c| *c == "id").collect(), identity_full: false })
    }

    async fn parked(c: &tokio_postgres::Client) -> Vec<(String, String)> {
        c.query("SELECT key, reason FROM branchsync.parked ORDER BY id", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    #[tokio::test]
    async fn an_orphan_waits_for_its_parent_and_later_changes_queue_behind_it() {
        let pg = PgCluster::start();
        let c = pg.connect().await;
        c.batch_execute(STATE_DDL).await.unwrap();
        c.batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, shop text);
             CREATE TABLE order_lines (id int PRIMARY KEY, order_id int NOT NULL REFERENCES orders(id), qty int NOT NULL);
             INSERT INTO orders VALUES (1, 'main');",
        )
        .await
        .unwrap();
        let cfg = ApplyConfig { node: "main".into(), scope: Scope::new(&["public".to_string()], &[]).unwrap(), group_budget: DEFAULT_GROUP_BUDGET, lock_timeout_ms: 200, ddl: Default::default(), tables: Default::default(), role: crate::Role::Main, capture_progress: None, mark_key: vec![7; 32] };
        let (mut a, _progress) = Applier::connect(&pg.url(), cfg, "branch1", Arc::new(StreamState::default())).await.unwrap();
        let lines = desc("order_lines", &["id", "order_id", "qty"]);
        let orders = desc("orders", &["id", "shop"]);

        // Line 10 belongs to order 1 (present), line 11 to order 5 (not yet here).
        a.apply_entries(&[entry(1, lines.clone(), vec![
            RowChange::Insert { table: 0, new: vec![t("10"), t("1"), t("1")] },
            RowChange::Insert { table: 0, new: vec![t("11"), t("5"), t("2")] },
        ])])
        .await
        .unwrap();
        // A later ChangeSet updates the parked line: it must queue, not be lost.
        a.apply_entries(&[entry(2, lines.clone(), vec![RowChange::Update { table: 0, old: None, new: vec![t("11"), t("5"), t("7")] }])]).await.unwrap();
        a.commit().await.unwrap();
        let ids: Vec<i32> = c.query("SELECT id FROM order_lines ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, vec![10], "the orphan is not in the table");
        assert_eq!(parked(&c).await, vec![("[\"11\"]".to_string(), "orphan".to_string()), ("[\"11\"]".to_string(), "behind_orphan".to_string())]);
        assert_eq!(c.query_one("SELECT count(*) FROM branchsync.conflicts", &[]).await.unwrap().get::<_, i64>(0), 0, "parking is not a conflict");

        // Nothing to do while the parent is missing.
        assert_eq!(a.retry_parked().await.unwrap(), 0);
        assert_eq!(parked(&c).await.len(), 2);

        // The parent arrives; the queue replays in order.
        a.apply_entries(&[entry(3, orders, vec![RowChange::Insert { table: 0, new: vec![t("5"), t("branch1")] }])]).await.unwrap();
        a.commit().await.unwrap();
        assert_eq!(a.retry_parked().await.unwrap(), 2);
        let rows: Vec<(i32, i32, i32)> = c.query("SELECT id, order_id, qty FROM order_lines ORDER BY id", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        assert_eq!(rows, vec![(10, 1, 1), (11, 5, 7)]);
        assert!(parked(&c).await.is_empty());
        // Applied under the author's origin (R17): a branch would not capture it again.
        let origin: String = c
            .query_one(
                "SELECT o.roname FROM order_lines l, pg_xact_commit_timestamp_origin(l.xmin) x JOIN pg_replication_origin o ON o.roident = x.roident WHERE l.id = 11",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(origin, crate::state::origin_name("branch1"));
        // Progress covers all three ChangeSets; the replay did not move it.
        assert_eq!(crate::state::read_progress(&c, "branch1").await.unwrap(), 3);
    }
}

#[cfg(test)]
mod missing_table_tests {
    //! Rows for a table that does not exist here are parked, never dropped,
    //! and apply in their order once the table exists.
    use std::sync::Arc;

    use branchsync_proto::{ChangeSetHeader, LogEntry, RowChange, TableDef, TableDesc, Value};

    use crate::apply::{Applier, ApplyConfig, StreamState, DEFAULT_GROUP_BUDGET};
    use crate::scope::Scope;
    use crate::state::STATE_DDL;
    use crate::test_utils::PgCluster;

    fn entry(pos: u64, changes: Vec<RowChange>) -> LogEntry {
        let header = ChangeSetHeader { author: "main".into(), author_index: 0, system_id: 7, commit_lsn: 0x2000 + pos, commit_ts_us: 1_700_000_000_000_000, stamp: 1_700_000_000_000_000 + pos , seen_main_ts: 0};
        let table = TableDesc::from(TableDef { schema: "public".into(), name: "loyalty".into(), columns: vec!["id".into(), "points".into()], key: vec![true, false], identity_full: false });
        LogEntry { pos, header, part: 0, last: true, tables: vec![table], changes, relay_ts_us: 0, echo_as_sent: false }
    }

    fn row(id: &str, points: &str) -> Vec<Value> {
        vec![Value::Text(id.into()), Value::Text(points.into())]
    }

    #[tokio::test]
    async fn rows_of_a_table_that_does_not_exist_yet_wait_for_it_in_order() {
        let pg = PgCluster::start();
        let c = pg.connect().await;
        c.batch_execute(STATE_DDL).await.unwrap();
        let cfg = ApplyConfig { node: "branch1".into(), scope: Scope::new(&["public".to_string()], &[]).unwrap(), group_budget: DEFAULT_GROUP_BUDGET, lock_timeout_ms: 200, ddl: Default::default(), tables: Default::default(), role: crate::Role::Branch, capture_progress: None, mark_key: vec![7; 32] };
        let (mut a, _p) = Applier::connect(&pg.url(), cfg, "main", Arc::new(StreamState::default())).await.unwrap();
        a.apply_entries(&[entry(1, vec![RowChange::Insert { table: 0, new: row("1", "10") }, RowChange::Insert { table: 0, new: row("2", "20") }])]).await.unwrap();
        a.commit().await.unwrap();
        assert_eq!(a.retry_parked().await.unwrap(), 0, "still no table");
        // The table appears (a module install that has not replicated yet).
        c.batch_execute("CREATE TABLE loyalty (id int PRIMARY KEY, points int NOT NULL)").await.unwrap();
        // A later change to row 1 arrives before the retry: it must wait behind the parked insert.
        a.apply_entries(&[entry(2, vec![RowChange::Update { table: 0, old: None, new: row("1", "11") }])]).await.unwrap();
        a.commit().await.unwrap();
        let n: i64 = c.query_one("SELECT count(*) FROM loyalty", &[]).await.unwrap().get(0);
        assert_eq!(n, 0, "nothing applied out of order");
        assert_eq!(a.retry_parked().await.unwrap(), 2, "two parked entries: the first ChangeSet's rows, then the update");
        let rows: Vec<(i32, i32)> = c.query("SELECT id, points FROM loyalty ORDER BY id", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(rows, vec![(1, 11), (2, 20)]);
        let left: i64 = c.query_one("SELECT count(*) FROM branchsync.parked", &[]).await.unwrap().get(0);
        assert_eq!(left, 0);
        // Once drained, new changes apply directly.
        a.apply_entries(&[entry(3, vec![RowChange::Insert { table: 0, new: row("3", "30") }])]).await.unwrap();
        a.commit().await.unwrap();
        let n: i64 = c.query_one("SELECT count(*) FROM loyalty", &[]).await.unwrap().get(0);
        assert_eq!(n, 3);
    }
}
