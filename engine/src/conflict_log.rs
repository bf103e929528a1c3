//! `branchsync.conflicts` for the operator: list, show, resolve.
//!
//! Every version a decision discarded is kept there with the version that
//! won (invariant 3). The main records its decisions and sends the records
//! to every node in the relay, so every node shows the same ones (with
//! `origin_node` set to the main's name); a node also records what happened
//! to changes only it saw (DDL it could not replay, values of columns it
//! does not have).
//!
//! # Resolving
//!
//! [`resolve`] settles a record. `--keep local` marks it settled and leaves
//! the rows as they are. `--keep remote` writes the discarded version back
//! (upsert of the row, or delete when the discarded version was a delete)
//! as an ordinary local change in the same transaction that marks the
//! record: the change replicates like any other, and since it was made
//! after the version it replaces was seen, every node takes it. A
//! quarantined change's queue is released by settling it.

use branchsync_proto::changeset::quote_ident;
use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::LocalTable;
use crate::EngineError;

/// What a record of `branchsync.conflicts` is about: the `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    /// Two sites changed the same columns of a row concurrently.
    UpdateUpdate,
    /// An update reached the main for a row it never had.
    UpdateMissing,
    /// An update met a concurrent delete of its row.
    UpdateDelete,
    /// A delete of a row that still has children its author never saw.
    DeleteReferenced,
    /// Two sites inserted the same key.
    InsertInsert,
    /// An insert collides with another row on a unique constraint.
    InsertUnique,
    /// A stamp far ahead of this node's clock was clamped.
    StampClamped,
    /// A change that does not fit its table waits for the operator.
    Quarantined,
    /// A peer's DDL could not replay here.
    DdlFailed,
    /// Values of columns this table does not have were left out.
    ColumnsSkipped,
    /// A `TRUNCATE` of a table whose rule does not replicate it.
    TruncateSkipped,
    /// An update or delete of a table without a key here.
    NoKey,
    /// An update or delete of a row that is not here.
    RowMissing,
    /// A row too large to carry, skipped by capture as the operator said.
    RowTooLarge,
}

impl ConflictKind {
    /// The text stored in `branchsync.conflicts.kind` and sent in the relay.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictKind::UpdateUpdate => "update_update",
            ConflictKind::UpdateMissing => "update_missing",
            ConflictKind::UpdateDelete => "update_delete",
            ConflictKind::DeleteReferenced => "delete_referenced",
            ConflictKind::InsertInsert => "insert_insert",
            ConflictKind::InsertUnique => "insert_unique",
            ConflictKind::StampClamped => "stamp_clamped",
            ConflictKind::Quarantined => "quarantined",
            ConflictKind::DdlFailed => "ddl_failed",
            ConflictKind::ColumnsSkipped => "columns_skipped",
            ConflictKind::TruncateSkipped => "truncate_skipped",
            ConflictKind::NoKey => "no_key",
            ConflictKind::RowMissing => "row_missing",
            ConflictKind::RowTooLarge => "row_too_large",
        }
    }
}

impl std::fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the daemon's monitor shows of `branchsync.conflicts`,
/// `branchsync.parked` and `branchsync.ddl_log`.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Records per kind.
    pub by_kind: Vec<(String, i64)>,
    /// Parked rows per table.
    pub parked_by_table: Vec<(String, i64)>,
    /// DDL of peers that failed here (decided here, not relayed).
    pub ddl_failed: i64,
    /// The latest five of them, newest first.
    pub recent_ddl_failures: Vec<DdlFailure>,
    /// Schema changes made here.
    pub ddl_local: i64,
    /// Schema changes replayed from peers.
    pub ddl_replayed: i64,
}

impl Summary {
    /// Records, settled or not.
    pub fn total(&self) -> i64 {
        self.by_kind.iter().map(|(_, n)| n).sum()
    }

    /// Records of `kind`.
    pub fn of_kind(&self, kind: ConflictKind) -> i64 {
        self.by_kind.iter().find(|(k, _)| k == kind.as_str()).map_or(0, |(_, n)| *n)
    }

    /// Parked rows.
    pub fn parked(&self) -> i64 {
        self.parked_by_table.iter().map(|(_, n)| n).sum()
    }
}

/// A peer's schema change that did not run here.
#[derive(Debug, Clone)]
pub struct DdlFailure {
    /// Id in `branchsync.conflicts`.
    pub id: i64,
    /// The node that ran it first.
    pub author: Option<String>,
    /// The statement.
    pub statement: Option<String>,
    /// Why it did not run here.
    pub reason: Option<String>,
}

/// Reads the [`Summary`] (a few aggregate queries; the tables are small
/// unless something is wrong, and then the operator wants to know).
pub async fn summary(client: &Client) -> Result<Summary, EngineError> {
    let ddl_failed = ConflictKind::DdlFailed.as_str();
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM branchsync.conflicts WHERE kind = $1 AND origin_id IS NULL), \
                    count(*) FILTER (WHERE NOT replayed), count(*) FILTER (WHERE replayed) \
             FROM branchsync.ddl_log",
            &[&ddl_failed],
        )
        .await
        .map_err(EngineError::pg("counting schema changes"))?;
    let counts = |sql: &'static str, what: &'static str| async move {
        Ok::<Vec<(String, i64)>, EngineError>(client.query(sql, &[]).await.map_err(EngineError::pg(what))?.iter().map(|r| (r.get(0), r.get(1))).collect())
    };
    let by_kind = counts("SELECT kind, count(*) FROM branchsync.conflicts GROUP BY kind ORDER BY kind", "counting conflicts by kind").await?;
    let parked_by_table = counts("SELECT tbl, count(*) FROM branchsync.parked GROUP BY tbl ORDER BY tbl", "counting parked rows").await?;
    let recent_ddl_failures = client
        .query(
            "SELECT id, loser_node, remote_version->>'sql', detail FROM branchsync.conflicts WHERE kind = $1 AND origin_id IS NULL ORDER BY id DESC LIMIT 5",
            &[&ddl_failed],
        )
        .await
        .map_err(EngineError::pg("reading failed schema changes"))?
        .iter()
        .map(|r| DdlFailure { id: r.get(0), author: r.get(1), statement: r.get(2), reason: r.get(3) })
        .collect();
    Ok(Summary { by_kind, parked_by_table, ddl_failed: row.get(0), recent_ddl_failures, ddl_local: row.get(1), ddl_replayed: row.get(2) })
}

/// A row of `branchsync.parked`, as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedEntry {
    /// Id at this node.
    pub id: i64,
    /// When it was parked (ISO 8601, UTC).
    pub at: String,
    /// The stream it came in.
    pub stream: String,
    /// `schema.table`.
    #[serde(rename = "table")]
    pub tbl: String,
    /// Key text (JSON array), if any.
    pub key: Option<String>,
    /// Why it waits.
    pub reason: String,
}

/// The newest `limit` parked rows, newest first.
pub async fn list_parked(client: &Client, limit: i64) -> Result<Vec<ParkedEntry>, EngineError> {
    Ok(client
        .query(
            "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), stream, tbl, key, reason FROM branchsync.parked ORDER BY id DESC LIMIT $1",
            &[&limit],
        )
        .await
        .map_err(EngineError::pg("listing parked rows"))?
        .iter()
        .map(|r| ParkedEntry { id: r.get(0), at: r.get(1), stream: r.get(2), tbl: r.get(3), key: r.get(4), reason: r.get(5) })
        .collect())
}

/// One record of `branchsync.conflicts`.
#[derive(Debug, Clone, Serialize)]
pub struct ConflictEntry {
    /// Id at this node.
    pub id: i64,
    /// When it was recorded (ISO 8601, UTC).
    pub at: String,
    /// `schema.table`, or `(ddl)`.
    pub table: String,
    /// Key text (JSON array), if any.
    pub key: Option<String>,
    /// Kind of conflict.
    pub kind: String,
    /// Rule applied.
    pub rule: String,
    /// Node whose version won.
    pub winner: Option<String>,
    /// Node whose version lost.
    pub loser: Option<String>,
    /// The version that was held here (JSON).
    pub local_version: Option<serde_json::Value>,
    /// The incoming version (JSON).
    pub remote_version: Option<serde_json::Value>,
    /// What happened.
    pub detail: Option<String>,
    /// The node that decided it (the main for relayed records).
    pub origin_node: Option<String>,
    /// When it was settled, if it was.
    pub resolved_at: Option<String>,
    /// How it was settled (`local` or `remote`).
    pub resolution: Option<String>,
}

const COLUMNS: &str = "id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), tbl, key, kind, rule, winner_node, loser_node, \
     local_version::text, remote_version::text, detail, origin_node, \
     to_char(resolved_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), resolution";

fn entry(r: &tokio_postgres::Row) -> ConflictEntry {
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    ConflictEntry {
        id: r.get(0),
        at: r.get(1),
        table: r.get(2),
        key: r.get(3),
        kind: r.get(4),
        rule: r.get(5),
        winner: r.get(6),
        loser: r.get(7),
        local_version: json(r.get(8)),
        remote_version: json(r.get(9)),
        detail: r.get(10),
        origin_node: r.get(11),
        resolved_at: r.get(12),
        resolution: r.get(13),
    }
}

/// The records, newest first; settled ones only with `all`.
pub async fn list(client: &Client, all: bool, limit: i64) -> Result<Vec<ConflictEntry>, EngineError> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM branchsync.conflicts WHERE $1 OR resolved_at IS NULL ORDER BY id DESC LIMIT $2"),
            &[&all, &limit],
        )
        .await
        .map_err(EngineError::pg("listing conflicts"))?;
    Ok(rows.iter().map(entry).collect())
}

/// One record.
pub async fn show(client: &Client, id: i64) -> Result<Option<ConflictEntry>, EngineError> {
    let row = client
        .query_opt(&format!("SELECT {COLUMNS} FROM branchsync.conflicts WHERE id = $1"), &[&id])
        .await
        .map_err(EngineError::pg("reading a conflict"))?;
    Ok(row.as_ref().map(entry))
}

/// Which version to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The rows stay as they are.
    Local,
    /// The discarded version is written back and replicates.
    Remote,
}

/// What [`resolve`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Marked settled; no row changed.
    Marked,
    /// The discarded row was written back.
    RowWritten,
    /// The discarded delete was applied.
    RowDeleted,
}

fn not_resolvable(message: String, detail: String) -> EngineError {
    EngineError::Misconfigured { message, detail, hint: "Use branchsync conflicts show ID to see the versions; keep local to settle it as it is.".into() }
}

/// Settles conflict `id` by keeping the local or the remote version (see
/// the module documentation). One transaction: the row change and the mark
/// commit together. A record names its table as text, and records arrive
/// from other nodes: a row is written back only into a table of `scope`
/// (never into branchsync's own tables, the catalog, or an excluded table).
pub async fn resolve(client: &mut Client, id: i64, keep: Keep, scope: &crate::scope::Scope) -> Result<Resolved, EngineError> {
    let tx = client.transaction().await.map_err(EngineError::pg("starting a resolution"))?;
    let row = tx
        .query_opt(
            "SELECT tbl, key, kind, remote_version::text, resolved_at IS NOT NULL FROM branchsync.conflicts WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await
        .map_err(EngineError::pg("reading a conflict"))?;
    let Some(row) = row else {
        return Err(not_resolvable(format!("conflict {id} does not exist"), "No record with this id is in branchsync.conflicts here.".into()));
    };
    let (tbl, key, kind, remote, done): (String, Option<String>, String, Option<String>, bool) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if done {
        return Err(not_resolvable(format!("conflict {id} is already resolved"), "It was settled before; nothing was changed.".into()));
    }
    let mut outcome = Resolved::Marked;
    if keep == Keep::Remote {
        let remote: serde_json::Value = remote
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .ok_or_else(|| not_resolvable(format!("conflict {id} has no remote version to keep"), format!("It is a {kind} record without a row.")))?;
        let (schema, name) = tbl
            .split_once('.')
            .ok_or_else(|| not_resolvable(format!("conflict {id} is not about a table row"), format!("It is a {kind} record of {tbl}.")))?;
        if !scope.includes(schema, name) {
            return Err(not_resolvable(
                format!("table {tbl} is not replicated here"),
                "A resolution writes only into replicated tables (database.schemas minus database.exclude); this record names another table.".into(),
            ));
        }
        let t = LocalTable::load(tx.client(), schema, name)
            .await?
            .ok_or_else(|| not_resolvable(format!("table {tbl} does not exist here"), "The row cannot be written back.".into()))?;
        if t.pk.is_empty() {
            return Err(not_resolvable(format!("table {tbl} has no primary key"), "Only rows of tables with a primary key can be written back.".into()));
        }
        match remote.get("deleted") {
            Some(_) => {
                let key: Vec<String> = key
                    .as_deref()
                    .and_then(|k| serde_json::from_str(k).ok())
                    .ok_or_else(|| not_resolvable(format!("conflict {id} has no key"), "The deleted row cannot be found.".into()))?;
                let conds: Vec<String> =
                    t.pk.iter().enumerate().map(|(j, k)| format!("{} = ${}::text::{}", t.columns[k].quoted, j + 1, t.columns[k].type_name)).collect();
                let p: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = key.iter().map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                tx.execute(&format!("DELETE FROM {} WHERE {}", t.qualified, conds.join(" AND ")), &p)
                    .await
                    .map_err(EngineError::pg(format!("deleting a row of {tbl}")))?;
                outcome = Resolved::RowDeleted;
            }
            None => {
                let obj = remote.as_object().ok_or_else(|| not_resolvable(format!("conflict {id}'s remote version is not a row"), String::new()))?;
                let cols: Vec<&String> = obj.keys().filter(|c| t.columns.get(*c).is_some_and(|lc| !lc.generated)).collect();
                let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
                let sets: Vec<String> = cols.iter().filter(|c| !t.pk.contains(c)).map(|c| format!("{0} = excluded.{0}", quote_ident(c))).collect();
                let pk: Vec<String> = t.pk.iter().map(|c| quote_ident(c)).collect();
                let on = if sets.is_empty() { "DO NOTHING".to_string() } else { format!("DO UPDATE SET {}", sets.join(", ")) };
                let overriding = if cols.iter().any(|c| t.columns[*c].identity_always) { " OVERRIDING SYSTEM VALUE" } else { "" };
                let sql = format!(
                    "INSERT INTO {q} ({n}){overriding} SELECT {n} FROM jsonb_populate_record(null::{q}, $1::text::jsonb) ON CONFLICT ({pk}) {on}",
                    q = t.qualified,
                    n = names.join(", "),
                    pk = pk.join(", "),
                );
                tx.execute(&sql, &[&remote.to_string()]).await.map_err(EngineError::pg(format!("writing a row of {tbl} back")))?;
                outcome = Resolved::RowWritten;
            }
        }
    }
    let how = if keep == Keep::Local { "local" } else { "remote" };
    tx.execute("UPDATE branchsync.conflicts SET resolved_at = now(), resolution = $2 WHERE id = $1", &[&id, &how])
        .await
        .map_err(EngineError::pg("marking a conflict resolved"))?;
    tx.commit().await.map_err(EngineError::pg("committing a resolution"))?;
    tracing::info!(conflict = id, table = %tbl, kind = %kind, keep = how, "conflict resolved");
    Ok(outcome)
}
