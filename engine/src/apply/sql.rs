//! SQL text for batched apply. Every statement takes one `text[]` per
//! column and unnests them, so a batch of rows costs one statement, and
//! values are cast from text to the receiver's own column types (R10).

use branchsync_proto::changeset::quote_ident;

use super::table::LocalTable;

/// `INSERT … SELECT … FROM unnest(…)`; `careful` adds `ON CONFLICT DO
/// NOTHING RETURNING key` so conflicting rows can be resolved one by one.
pub fn insert(t: &LocalTable, cols: &[&str], careful: bool) -> String {
    let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let casts: Vec<String> = cols.iter().enumerate().map(|(j, c)| format!("u.c{j}::{}", t.columns[*c].type_name)).collect();
    let arrays: Vec<String> = (1..=cols.len()).map(|j| format!("${j}::text[]")).collect();
    let aliases: Vec<String> = (0..cols.len()).map(|j| format!("c{j}")).collect();
    let overriding = if cols.iter().any(|c| t.columns[*c].identity_always) { " OVERRIDING SYSTEM VALUE" } else { "" };
    let mut sql = format!(
        "INSERT INTO {} AS t ({}){overriding} SELECT {} FROM unnest({}) AS u({})",
        t.qualified,
        names.join(", "),
        casts.join(", "),
        arrays.join(", "),
        aliases.join(", ")
    );
    if careful && !t.pk.is_empty() {
        sql.push_str(&format!(" ON CONFLICT DO NOTHING RETURNING {}", t.key_text_sql("t")));
    }
    sql
}

fn key_join(t: &LocalTable, first_param: usize) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut arrays = Vec::new();
    let mut aliases = Vec::new();
    let mut conds = Vec::new();
    for (j, k) in t.pk.iter().enumerate() {
        arrays.push(format!("${}::text[]", first_param + j));
        aliases.push(format!("k{j}"));
        conds.push(format!("t.{} = u.k{j}::{}", quote_ident(k), t.columns[k].type_name));
    }
    (arrays, aliases, conds)
}

/// Locks the rows with the given keys (`FOR UPDATE`), waiting for any
/// transaction that holds them. Parameters: one `text[]` per key column.
///
/// Versions are read by [`read_versions`] in a separate statement after this
/// one returns: in READ COMMITTED a `FOR UPDATE` that waited re-checks only the
/// locked row, while data joined to it (the commit origin of its `xmin`, the
/// side-table version) stays as of the statement's snapshot, so deciding on it
/// would overwrite a commit made while we waited (R7). The next statement takes
/// a new snapshot, which sees that commit.
pub fn lock_rows(t: &LocalTable) -> String {
    let (arrays, aliases, conds) = key_join(t, 1);
    format!(
        "SELECT 1 FROM unnest({arrays}) AS u({aliases}) JOIN {qt} t ON {conds} FOR UPDATE OF t",
        arrays = arrays.join(", "),
        aliases = aliases.join(", "),
        qt = t.qualified,
        conds = conds.join(" AND "),
    )
}

/// Returns, per found row: input ordinal, key text, commit origin and commit
/// time (µs) of its `xmin`, and the side-table version. Run after
/// [`lock_rows`] in the same transaction. Parameters: one `text[]` per key
/// column, then the table name.
pub fn read_versions(t: &LocalTable) -> String {
    let (arrays, aliases, conds) = key_join(t, 1);
    let tbl_param = t.pk.len() + 1;
    format!(
        "SELECT u.i, {key}, cts.roident::int8, (extract(epoch from cts.\"timestamp\") * 1000000)::int8, rv.stamp, rv.node \
         FROM unnest({arrays}) WITH ORDINALITY AS u({aliases}, i) \
         JOIN {qt} t ON {conds} \
         LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) cts ON true \
         LEFT JOIN branchsync.row_version rv ON rv.tbl = ${tbl_param} AND rv.key = {key} \
         ORDER BY u.i",
        key = t.key_text_sql("t"),
        arrays = arrays.join(", "),
        aliases = aliases.join(", "),
        qt = t.qualified,
        conds = conds.join(" AND "),
    )
}

/// `UPDATE … FROM unnest(keys…, values…)`.
pub fn update(t: &LocalTable, set_cols: &[&str]) -> String {
    let (mut arrays, mut aliases, conds) = key_join(t, 1);
    let base = t.pk.len() + 1;
    let mut sets = Vec::new();
    for (j, c) in set_cols.iter().enumerate() {
        arrays.push(format!("${}::text[]", base + j));
        aliases.push(format!("v{j}"));
        sets.push(format!("{} = u.v{j}::{}", quote_ident(c), t.columns[*c].type_name));
    }
    format!(
        "UPDATE {} AS t SET {} FROM unnest({}) AS u({}) WHERE {}",
        t.qualified,
        sets.join(", "),
        arrays.join(", "),
        aliases.join(", "),
        conds.join(" AND ")
    )
}

/// `DELETE … USING unnest(keys…)`.
pub fn delete(t: &LocalTable) -> String {
    let (arrays, aliases, conds) = key_join(t, 1);
    format!(
        "DELETE FROM {} AS t USING unnest({}) AS u({}) WHERE {}",
        t.qualified,
        arrays.join(", "),
        aliases.join(", "),
        conds.join(" AND ")
    )
}

/// Condition matching one row of a keyless table by all old values
/// (NULL-safe; json and friends compared as text, R11). Parameters start at
/// `$first`.
fn keyless_match(t: &LocalTable, match_cols: &[&str], first: usize) -> String {
    let conds: Vec<String> = match_cols
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let col = &t.columns[*c];
            if col.compare_as_text {
                format!("t.{}::text IS NOT DISTINCT FROM ${}", col.quoted, first + j)
            } else {
                format!("t.{} IS NOT DISTINCT FROM ${}::{}", col.quoted, first + j, col.type_name)
            }
        })
        .collect();
    let where_ = if conds.is_empty() { "true".to_string() } else { conds.join(" AND ") };
    format!("SELECT ctid FROM {} t WHERE {where_} LIMIT 1 FOR UPDATE", t.qualified)
}

/// Deletes exactly one row of a keyless table matching the old values.
pub fn keyless_delete(t: &LocalTable, match_cols: &[&str]) -> String {
    format!("WITH m AS ({}) DELETE FROM {} t USING m WHERE t.ctid = m.ctid", keyless_match(t, match_cols, 1), t.qualified)
}

/// Updates exactly one row of a keyless table matching the old values.
pub fn keyless_update(t: &LocalTable, match_cols: &[&str], set_cols: &[&str]) -> String {
    let base = match_cols.len() + 1;
    let sets: Vec<String> = set_cols
        .iter()
        .enumerate()
        .map(|(j, c)| format!("{} = ${}::{}", quote_ident(c), base + j, t.columns[*c].type_name))
        .collect();
    format!(
        "WITH m AS ({}) UPDATE {} t SET {} FROM m WHERE t.ctid = m.ctid",
        keyless_match(t, match_cols, 1),
        t.qualified,
        sets.join(", ")
    )
}

/// Upserts row versions: `$1` table, `$2` keys, `$3` stamp, `$4` node, `$5` deleted.
pub const UPSERT_VERSIONS: &str = "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted) \
     SELECT $1, k, $3, $4, $5 FROM unnest($2::text[]) AS k \
     ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = excluded.deleted";

/// Upserts row versions with a stamp per row: `$1` table, `$2` keys, `$3`
/// stamps, `$4` node.
pub const UPSERT_VERSIONS_MANY: &str = "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted) \
     SELECT $1, u.k, u.s, $4, false FROM unnest($2::text[], $3::int8[]) AS u(k, s) \
     ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = false";

/// Records a conflict or a quarantined change.
pub const RECORD_CONFLICT: &str = "INSERT INTO branchsync.conflicts \
     (tbl, key, kind, rule, winner_node, loser_node, local_version, remote_version, detail) \
     VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9)";

/// The stream's durable progress, in the apply transaction (R4).
pub const UPSERT_PROGRESS: &str = "INSERT INTO branchsync.progress (stream, pos, lsn, updated_at) VALUES ($1, $2, $3, now()) \
     ON CONFLICT (stream) DO UPDATE SET pos = excluded.pos, lsn = excluded.lsn, updated_at = now()";

/// The author's identity on every applied transaction (R3).
pub const EMIT_APPLY_MESSAGE: &str = "SELECT pg_logical_emit_message(true, $1, $2::bytea)::text";

/// Origin LSN and original commit time of the transaction being applied.
pub const XACT_SETUP: &str =
    "SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, 'epoch'::timestamptz + $2::int8 * interval '1 microsecond')::text";

/// Moves the rows with the given keys whose parents are missing (R9) out of
/// the table into `branchsync.parked`, returning their key texts.
/// Parameters: one `text[]` per key column, then stream, table name, the
/// MessagePack ChangeSet header.
pub fn park_orphans(t: &LocalTable) -> String {
    let (arrays, aliases, conds) = key_join(t, 1);
    let n = t.pk.len();
    let orphan: Vec<String> = t.parents.iter().map(|f| f.orphan_sql("t")).collect();
    format!(
        "WITH gone AS (DELETE FROM {qt} AS t USING unnest({arrays}) AS u({aliases}) WHERE {conds} AND ({orphan}) RETURNING t.*) \
         INSERT INTO branchsync.parked (stream, tbl, key, header, row_data, reason) \
         SELECT ${s}, ${tb}, {key}, ${h}, to_jsonb(gone), 'orphan' FROM gone RETURNING key",
        qt = t.qualified,
        arrays = arrays.join(", "),
        aliases = aliases.join(", "),
        conds = conds.join(" AND "),
        orphan = orphan.join(" OR "),
        s = n + 1,
        tb = n + 2,
        h = n + 3,
        key = t.key_text_sql("gone"),
    )
}

/// Re-inserts a parked row from its JSON image (`$1`), returning whether a
/// parent of it is still missing.
pub fn unpark_row(t: &LocalTable) -> String {
    let mut cols: Vec<&String> = t.columns.iter().filter(|(_, c)| !c.generated).map(|(n, _)| n).collect();
    cols.sort();
    let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let overriding = if cols.iter().any(|c| t.columns[*c].identity_always) { " OVERRIDING SYSTEM VALUE" } else { "" };
    let orphan: Vec<String> = t.parents.iter().map(|f| f.orphan_sql("t")).collect();
    let orphan = if orphan.is_empty() { "false".to_string() } else { orphan.join(" OR ") };
    format!(
        "WITH ins AS (INSERT INTO {qt} AS t ({names}){overriding} SELECT {names} FROM jsonb_populate_record(null::{qt}, $1::text::jsonb) RETURNING t.*) \
         SELECT {orphan} FROM ins t",
        qt = t.qualified,
        names = names.join(", "),
    )
}
