//! SQL text for batched apply. Every statement takes one `text[]` per
//! column and unnests them, so a batch of rows costs one statement, and
//! values are cast from text to the receiver's own column types (R10).

use branchsync_proto::changeset::quote_ident;

use crate::catalog::LocalTable;

/// `INSERT … SELECT … FROM unnest(…)`; `careful` adds `ON CONFLICT DO
/// NOTHING RETURNING key` so conflicting rows can be resolved one by one.
pub fn insert(t: &LocalTable, cols: &[&str], careful: bool) -> String {
    let arrays: Vec<String> = (1..=cols.len()).map(|j| format!("${j}::text[]")).collect();
    insert_from(t, cols, careful, &format!("unnest({})", arrays.join(", ")))
}

/// The temporary table one large row is staged in by `COPY` (columns `c0`…
/// of type text, emptied at commit), so its value never sits in a bound
/// parameter: see [`super::pipeline`].
pub fn staging(columns: usize) -> String {
    format!("pg_temp.branchsync_big_{columns}")
}

/// Creates [`staging`] for `columns` columns if this session has none.
pub fn create_staging(columns: usize) -> String {
    let cols: Vec<String> = (0..columns).map(|j| format!("c{j} text")).collect();
    format!("CREATE TEMP TABLE IF NOT EXISTS branchsync_big_{columns} ({}) ON COMMIT DELETE ROWS", cols.join(", "))
}

/// [`insert`] of the rows of `source`, a FROM item with columns `c0`…
pub fn insert_from(t: &LocalTable, cols: &[&str], careful: bool, source: &str) -> String {
    let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let casts: Vec<String> = cols.iter().enumerate().map(|(j, c)| format!("u.c{j}::{}", t.columns[*c].type_name)).collect();
    let aliases: Vec<String> = (0..cols.len()).map(|j| format!("c{j}")).collect();
    let overriding = if cols.iter().any(|c| t.columns[*c].identity_always) { " OVERRIDING SYSTEM VALUE" } else { "" };
    let mut sql = format!(
        "INSERT INTO {} AS t ({}){overriding} SELECT {} FROM {source} AS u({})",
        t.qualified,
        names.join(", "),
        casts.join(", "),
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

/// `col = u.vJ::type` for each of `set_cols`, whose `text[]` parameters
/// start at `$base` (added to `arrays` and `aliases` of the unnest).
fn set_from_unnest(t: &LocalTable, set_cols: &[&str], base: usize, arrays: &mut Vec<String>, aliases: &mut Vec<String>) -> Vec<String> {
    let mut sets = Vec::new();
    for (j, c) in set_cols.iter().enumerate() {
        arrays.push(format!("${}::text[]", base + j));
        aliases.push(format!("v{j}"));
        sets.push(format!("{} = u.v{j}::{}", quote_ident(c), t.columns[*c].type_name));
    }
    sets
}

/// `UPDATE … FROM unnest(keys…, values…)`.
pub fn update(t: &LocalTable, set_cols: &[&str]) -> String {
    let (mut arrays, mut aliases, conds) = key_join(t, 1);
    let base = t.pk.len() + 1;
    let sets = set_from_unnest(t, set_cols, base, &mut arrays, &mut aliases);
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

/// This node's clock now, µs since the Unix epoch (SQL).
const LOCAL_TS: &str = "(extract(epoch from clock_timestamp()) * 1000000)::int8";

/// Upserts the versions of rows written whole (re-inserted, or taken as
/// the author's row): `$1` table, `$2` `$1` table, `$2`
/// keys, `$3` stamp, `$4` node, `$5` author commit time; the inserting node
/// stays what it was (the author's for a new entry).
pub fn upsert_versions() -> String {
    format!(
        "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, inserted_by, row_data) \
         SELECT $1, k, $3, $4, false, $5, {LOCAL_TS}, $4, NULL FROM unnest($2::text[]) AS k \
         ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = false, ts = excluded.ts, \
             local_ts = excluded.local_ts, row_data = NULL, base = NULL, cols = NULL, \
             inserted_by = coalesce(CASE WHEN rv.deleted THEN excluded.inserted_by END, rv.inserted_by, excluded.inserted_by)"
    )
}

/// Upserts the versions of inserted rows, a stamp per row: `$1` table, `$2`
/// keys, `$3` stamps, `$4` node (the inserting node too), `$5` author commit
/// times.
pub fn upsert_versions_many() -> String {
    format!(
        "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, inserted_by, row_data) \
         SELECT $1, u.k, u.s, $4, false, u.t, {LOCAL_TS}, $4, NULL FROM unnest($2::text[], $3::int8[], $5::int8[]) AS u(k, s, t) \
         ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = false, ts = excluded.ts, \
             local_ts = excluded.local_ts, inserted_by = excluded.inserted_by, row_data = NULL, base = NULL, cols = NULL"
    )
}

/// Records the versions of rows the pipeline inserted, packed (see
/// [`crate::state`]'s `insert_versions`): `$1` table, `$2` author (the
/// inserting node), `$3` keys, `$4` stamps, `$5` author commit times. The
/// rows' `xmin` is the open transaction's id: the pipeline never writes
/// inside a savepoint.
///
/// It first locks the tombstones of those keys, if the table has any: an
/// update of a deleted row is decided under its tombstone's lock, and an
/// insert of the key must commit either before that decision reads the
/// row or after it (see `decide_update`). A table without tombstones costs
/// one probe of a small index.
pub fn insert_packed_versions() -> String {
    format!(
        "WITH held AS (SELECT 1 FROM branchsync.row_version WHERE deleted AND tbl = $1 AND key = ANY($3) \
                         AND EXISTS (SELECT 1 FROM branchsync.row_version WHERE deleted AND tbl = $1) FOR UPDATE) \
         INSERT INTO branchsync.insert_versions (xid, xid32, tbl, node, local_ts, keys, stamps, ts) \
         SELECT x, x % 4294967296, $1, $2, {LOCAL_TS}, $3, $4, $5 FROM (SELECT pg_current_xact_id()::text::int8 AS x) AS c \
         WHERE (SELECT count(*) FROM held) >= 0"
    )
}

/// Upserts tombstones (R13, kept for the retention window): `$1` table, `$2`
/// keys, `$3` deleted rows (JSON text, NULL when unknown), `$4` stamp, `$5`
/// node, `$6` author commit time.
pub fn upsert_tombstones() -> String {
    format!(
        "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, inserted_by, row_data) \
         SELECT $1, u.k, $4, $5, true, $6, {LOCAL_TS}, NULL, u.r::jsonb FROM unnest($2::text[], $3::text[]) AS u(k, r) \
         ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = true, ts = excluded.ts, \
             local_ts = excluded.local_ts, row_data = coalesce(excluded.row_data, rv.row_data), base = NULL, cols = NULL"
    )
}

/// Update only where the row is still exactly as its author saw it (the
/// author's old row, compared as text): the common case, decided without a
/// conflict in one statement. Returns the keys updated. Parameters: one
/// `text[]` per key column, per set column (new values), per compared column
/// (old values).
pub fn cas_update(t: &LocalTable, set_cols: &[&str], cmp_cols: &[&str]) -> String {
    let (mut arrays, mut aliases, mut conds) = key_join(t, 1);
    let base = t.pk.len() + 1;
    let sets = set_from_unnest(t, set_cols, base, &mut arrays, &mut aliases);
    let base = base + set_cols.len();
    for (j, c) in cmp_cols.iter().enumerate() {
        arrays.push(format!("${}::text[]", base + j));
        aliases.push(format!("o{j}"));
        conds.push(format!("t.{}::text IS NOT DISTINCT FROM u.o{j}", quote_ident(c)));
    }
    versioned_update(t, &sets, &format!("unnest({}) AS u({})", arrays.join(", "), aliases.join(", ")), &conds)
}

/// Adds the authors' differences to delta columns (R16): a change of delta
/// columns only never clashes, whatever else changed meanwhile. The
/// differences of each key are summed first, so one statement carries the
/// changes of many ChangeSets (the main's pipeline; `UPDATE … FROM` with two
/// source rows for one target would apply only one of them), keys grouped
/// by their value in the column's type, not by their text. Returns, once per
/// key, the key and the origin, commit time and `xmin` of the version the row had.
/// Parameters: one `text[]` per key column, then per delta column the new and
/// the old values.
pub fn delta_update(t: &LocalTable, delta_cols: &[&str]) -> String {
    let (mut arrays, mut aliases, conds) = key_join(t, 1);
    let keys: Vec<String> = t.pk.iter().enumerate().map(|(j, k)| format!("(u.k{j}::{})::text AS k{j}", t.columns[k].type_name)).collect();
    let base = t.pk.len() + 1;
    let (mut sums, mut sets) = (Vec::new(), Vec::new());
    for (j, c) in delta_cols.iter().enumerate() {
        arrays.push(format!("${}::text[]", base + 2 * j));
        arrays.push(format!("${}::text[]", base + 2 * j + 1));
        aliases.push(format!("n{j}"));
        aliases.push(format!("o{j}"));
        sums.push(format!("sum(u.n{j}::numeric - u.o{j}::numeric) AS d{j}"));
        let col = &t.columns[*c];
        sets.push(format!("{0} = t.{0} + u.d{j}::{1}", col.quoted, col.type_name));
    }
    let groups: Vec<String> = (1..=t.pk.len()).map(|i| i.to_string()).collect();
    let source = format!(
        "(SELECT {}, {} FROM unnest({}) AS u({}) GROUP BY {}) AS u",
        keys.join(", "),
        sums.join(", "),
        arrays.join(", "),
        aliases.join(", "),
        groups.join(", ")
    );
    versioned_update(t, &sets, &source, &conds)
}

/// An `UPDATE … FROM source` (a row source aliased `u` with the key in
/// columns `k0`, `k1`, … as text) that also returns, per updated key, the
/// version the row had before: the origin, commit time and id of its xmin, read
/// with the row (a change of delta columns only leaves that version the
/// row's).
fn versioned_update(t: &LocalTable, sets: &[String], source: &str, conds: &[String]) -> String {
    let (_, _, old_conds) = key_join(t, 1);
    let old_conds: Vec<String> = old_conds.iter().map(|c| c.replacen("t.", "p.", 1)).collect();
    format!(
        "UPDATE {qt} AS t SET {sets} FROM (SELECT u.*, cts.roident::int8 AS o_origin, \
             (extract(epoch from cts.\"timestamp\") * 1000000)::int8 AS o_ts, p.xmin::text::int8 AS o_xmin \
             FROM {source} JOIN {qt} p ON {old_conds} \
             LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(p.xmin) cts ON true) AS u \
         WHERE {conds} RETURNING {key}, u.o_origin, u.o_ts, u.o_xmin",
        qt = t.qualified,
        sets = sets.join(", "),
        old_conds = old_conds.join(" AND "),
        conds = conds.join(" AND "),
        key = t.key_text_sql("t")
    )
}

/// Delete only where the row is still exactly as its author saw it and no
/// row references it (the main never cascades into rows the author did not
/// see, R9). Returns the keys deleted and the deleted rows as JSON.
/// Parameters: one `text[]` per key column, then per compared column.
pub fn cas_delete(t: &LocalTable, cmp_cols: &[&str]) -> String {
    let (mut arrays, mut aliases, mut conds) = key_join(t, 1);
    let base = t.pk.len() + 1;
    for (j, c) in cmp_cols.iter().enumerate() {
        arrays.push(format!("${}::text[]", base + j));
        aliases.push(format!("o{j}"));
        conds.push(format!("t.{}::text IS NOT DISTINCT FROM u.o{j}", quote_ident(c)));
    }
    for f in &t.children {
        conds.push(format!("NOT {}", f.referenced_sql("t")));
    }
    format!(
        "DELETE FROM {} AS t USING unnest({}) AS u({}) WHERE {} RETURNING {}, to_jsonb(t)::text",
        t.qualified,
        arrays.join(", "),
        aliases.join(", "),
        conds.join(" AND "),
        t.key_text_sql("t")
    )
}

/// Which rows a branch may overwrite with what the main sent (see
/// [`super::obey`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Another node's change: not over a row changed here and not yet
    /// decided by the main: its version is a local commit made after this
    /// node's `init` (at `init_us`; earlier ones are the copied baseline)
    /// and, when `settled` (the database has `branchsync.echo_settled`),
    /// after every local change whose echo was left unwritten.
    Others { init_us: i64, settled: bool },
    /// The main's result for a change made here (an echo or a verdict): not
    /// over a newer local change of the row; the parameter with this number
    /// holds the change's commit time (µs, this node's clock).
    Echo(usize),
    /// [`Guard::Echo`] that also leaves a row already equal to the main's
    /// unwritten, and moves `branchsync.echo_settled` up to the change's
    /// commit time in the same statement (the row is decided without a
    /// write: see [`super::obey`]).
    EchoSettle(usize),
    /// [`Guard::Echo`] for rows of several ChangeSets: the commit time of
    /// each row's change is column `ts` of the `unnest` alias `u`.
    EchoEach,
    /// No condition.
    None,
}

/// Moves `branchsync.echo_settled` up to `$1` (µs): the echoes of every
/// local change committed at or before it are applied.
pub const SETTLE_ECHOES: &str = "INSERT INTO branchsync.echo_settled AS s (singleton, through_ts) VALUES (true, $1) \
     ON CONFLICT (singleton) DO UPDATE SET through_ts = greatest(s.through_ts, excluded.through_ts)";

/// Moves the settled mark up to `ts_sql` (an `int8` expression): every
/// local change committed at or before it has been decided by the main.
fn settle_cte(ts_sql: &str) -> String {
    format!(
        "WITH settled AS (INSERT INTO branchsync.echo_settled AS s (singleton, through_ts) VALUES (true, coalesce({ts_sql}, 0)) \
         ON CONFLICT (singleton) DO UPDATE SET through_ts = greatest(s.through_ts, excluded.through_ts)) "
    )
}

impl Guard {
    /// The guard for one row holding `bytes` bytes of values: the echo of a
    /// row larger than a batch is written rather than compared with the row
    /// here (the comparison holds both rows as text in memory, and twice a
    /// value of hundreds of MB passes PostgreSQL's 1 GB bound for a value).
    pub fn for_row(self, bytes: usize) -> Guard {
        match self {
            Guard::EchoSettle(p) if bytes > super::MAX_BATCH_BYTES => Guard::Echo(p),
            g => g,
        }
    }

    /// Whether the guard takes the change's commit time as a parameter.
    pub fn takes_ts(self) -> bool {
        matches!(self, Guard::Echo(_) | Guard::EchoSettle(_))
    }

    /// SQL condition over alias `alias` that holds when the row may be written.
    pub fn sql(self, alias: &str) -> String {
        let origin = format!("coalesce((pg_xact_commit_timestamp_origin({alias}.xmin)).roident::int, -1)");
        let ts = format!("coalesce((extract(epoch from (pg_xact_commit_timestamp_origin({alias}.xmin)).\"timestamp\") * 1000000)::int8, 0)");
        match self {
            Guard::Others { init_us, settled: false } => format!("NOT ({origin} = 0 AND {ts} >= {init_us})"),
            Guard::Others { init_us, settled: true } => {
                format!("NOT ({origin} = 0 AND {ts} >= {init_us} AND {ts} > coalesce((SELECT through_ts FROM branchsync.echo_settled), 0))")
            }
            Guard::Echo(p) | Guard::EchoSettle(p) => format!("NOT ({origin} = 0 AND {ts} > ${p}::int8)"),
            Guard::EchoEach => format!("NOT ({origin} = 0 AND {ts} > u.ts)"),
            Guard::None => "true".into(),
        }
    }
}

/// `INSERT … ON CONFLICT (key) DO UPDATE … WHERE guard`: a branch takes the
/// main's row as it comes, unless `guard` says the row is its own pending
/// change. Parameters as [`insert`] (then the guard's, if any).
pub fn upsert(t: &LocalTable, cols: &[&str], guard: Guard) -> String {
    upsert_with(t, cols, guard, insert(t, cols, false))
}

/// [`upsert`] of the rows of `source` (see [`insert_from`]).
pub fn upsert_from(t: &LocalTable, cols: &[&str], guard: Guard, source: &str) -> String {
    upsert_with(t, cols, guard, insert_from(t, cols, false, source))
}

fn upsert_with(t: &LocalTable, cols: &[&str], guard: Guard, insert: String) -> String {
    let mut sql = insert;
    if t.pk.is_empty() {
        return sql;
    }
    let pk: Vec<String> = t.pk.iter().map(|c| quote_ident(c)).collect();
    let set_cols: Vec<&&str> = cols.iter().filter(|c| !t.pk.iter().any(|k| k == **c)).collect();
    let sets: Vec<String> = set_cols.iter().map(|c| format!("{0} = excluded.{0}", quote_ident(c))).collect();
    if sets.is_empty() {
        sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", pk.join(", ")));
    } else {
        sql.push_str(&format!(" ON CONFLICT ({}) DO UPDATE SET {} WHERE {}", pk.join(", "), sets.join(", "), guard.sql("t")));
    }
    if let Guard::EchoSettle(p) = guard {
        if !sets.is_empty() {
            sql.push_str(" AND ");
            sql.push_str(&differs_as_text(set_cols.iter().map(|c| (quote_ident(c), format!("excluded.{}", quote_ident(c))))));
        }
        // A row left as it is (equal, or only its key sent) is decided too.
        sql = format!("{}{sql}", settle_cte(&format!("${p}::int8")));
    }
    sql
}

/// Whether the row `t` differs from the one sent, for pairs of (quoted
/// column, typed expression of the value sent). Compared as text: every type
/// has a text form, not every type an equality operator; a difference of
/// form only costs a write.
fn differs_as_text(cols: impl Iterator<Item = (String, String)>) -> String {
    let (here, sent): (Vec<String>, Vec<String>) = cols.map(|(c, v)| (format!("t.{c}::text"), format!("{v}::text"))).unzip();
    format!("ROW({}) IS DISTINCT FROM ROW({})", here.join(", "), sent.join(", "))
}

/// The echoes of inserted rows of several ChangeSets at once (a branch),
/// first statement: the rows that are here are written over within
/// [`Guard::EchoEach`]. With `settle`, a row already equal to the main's is
/// left unwritten and `branchsync.echo_settled` moves up to the newest
/// commit time of the batch ([`Guard::EchoSettle`]). Parameters: one
/// `text[]` per column of `cols` (which hold the key), then the commit time
/// of each row's change (`int8[]`). `None` when `cols` lacks a key column.
pub fn echo_update(t: &LocalTable, cols: &[&str], settle: bool) -> Option<String> {
    let (arrays, aliases) = echo_unnest(cols);
    let conds = echo_key(t, cols, "t")?;
    let set_cols: Vec<(usize, &&str)> = cols.iter().enumerate().filter(|(_, c)| !t.pk.iter().any(|k| k == *c) && !t.columns[**c].identity_always).collect();
    let sets: Vec<String> = set_cols.iter().map(|(j, c)| format!("{} = u.c{j}::{}", quote_ident(c), t.columns[**c].type_name)).collect();
    let cte = if settle { settle_cte(&format!("(SELECT max(x) FROM unnest(${}::int8[]) x)", cols.len() + 1)) } else { String::new() };
    if sets.is_empty() {
        // Only the key: nothing to write, but the rows are decided.
        return Some(if settle { format!("{cte}SELECT 0") } else { "SELECT 0 WHERE false".into() });
    }
    let mut conds = conds;
    conds.push(Guard::EchoEach.sql("t"));
    if settle {
        // The sent text through its type first: session settings cannot
        // make equal values differ.
        conds.push(differs_as_text(set_cols.iter().map(|(j, c)| (quote_ident(c), format!("u.c{j}::{}", t.columns[**c].type_name)))));
    }
    Some(format!(
        "{cte}UPDATE {} AS t SET {} FROM unnest({}) AS u({}) WHERE {}",
        t.qualified,
        sets.join(", "),
        arrays.join(", "),
        aliases.join(", "),
        conds.join(" AND "),
    ))
}

/// Second statement of [`echo_update`]: the rows that are not here are
/// inserted (as an upsert inserts them). Same parameters.
pub fn echo_insert(t: &LocalTable, cols: &[&str]) -> Option<String> {
    let (arrays, aliases) = echo_unnest(cols);
    let conds = echo_key(t, cols, "p")?;
    let names: Vec<String> = cols.iter().map(|c| quote_ident(c)).collect();
    let casts: Vec<String> = cols.iter().enumerate().map(|(j, c)| format!("u.c{j}::{}", t.columns[*c].type_name)).collect();
    let overriding = if cols.iter().any(|c| t.columns[*c].identity_always) { " OVERRIDING SYSTEM VALUE" } else { "" };
    let pk: Vec<String> = t.pk.iter().map(|c| quote_ident(c)).collect();
    Some(format!(
        "INSERT INTO {qt} AS t ({names}){overriding} SELECT {casts} FROM unnest({arrays}) AS u({aliases}) \
         WHERE NOT EXISTS (SELECT 1 FROM {qt} p WHERE {conds}) ON CONFLICT ({pk}) DO NOTHING",
        qt = t.qualified,
        names = names.join(", "),
        casts = casts.join(", "),
        arrays = arrays.join(", "),
        aliases = aliases.join(", "),
        conds = conds.join(" AND "),
        pk = pk.join(", "),
    ))
}

/// `alias.key = u.cJ::type` for each key column (`None` when `cols` lacks one).
fn echo_key(t: &LocalTable, cols: &[&str], alias: &str) -> Option<Vec<String>> {
    t.pk.iter()
        .map(|k| cols.iter().position(|c| c == k).map(|j| format!("{alias}.{} = u.c{j}::{}", quote_ident(k), t.columns[k].type_name)))
        .collect()
}

fn echo_unnest(cols: &[&str]) -> (Vec<String>, Vec<String>) {
    let mut arrays: Vec<String> = (1..=cols.len()).map(|j| format!("${j}::text[]")).collect();
    arrays.push(format!("${}::int8[]", cols.len() + 1));
    let mut aliases: Vec<String> = (0..cols.len()).map(|j| format!("c{j}")).collect();
    aliases.push("ts".into());
    (arrays, aliases)
}

/// [`update`] that leaves rows `guard` protects alone.
pub fn update_guarded(t: &LocalTable, set_cols: &[&str], guard: Guard) -> String {
    format!("{} AND {}", update(t, set_cols), guard.sql("t"))
}

/// [`delete`] that leaves rows `guard` protects alone.
pub fn delete_guarded(t: &LocalTable, guard: Guard) -> String {
    format!("{} AND {}", delete(t), guard.sql("t"))
}

/// The current rows with these keys, after [`lock_rows`]: input ordinal,
/// key text, commit origin and time (µs) of `xmin`, every column as text (in
/// [`LocalTable::order`]), and the row's version: stamp, node, author commit
/// time, this node's write time, inserting node, and, where columns were
/// written apart since the row's last whole write, the version of the
/// others (`base`) and theirs (`cols`, JSON). Parameters: one `text[]` per
/// key column, then the table name.
///
/// With `packed` (the database has `branchsync.insert_versions`), the
/// version of a row the pipeline inserted is found in the packed record of
/// the transaction in its `xmin` that lists its key (newest first, should a
/// 32-bit transaction id have wrapped around). It speaks for the row unless
/// `row_version` holds a live version written as late or later: one written
/// by the same transaction after the insert (an update in the same group).
/// A tombstone never speaks for a row that exists: the key was inserted
/// again after it.
pub fn read_current(t: &LocalTable, packed: bool) -> String {
    let (arrays, aliases, conds) = key_join(t, 1);
    let tbl_param = t.pk.len() + 1;
    let cols: Vec<String> = t.order.iter().map(|c| format!("t.{}::text", quote_ident(c))).collect();
    let key = t.key_text_sql("t");
    let (packed_join, version) = if packed {
        (
            packed_version_join(&key, "t.xmin::text::int8", &format!("${tbl_param}"), "rv"),
            "CASE WHEN pk.packed THEN iv.stamp ELSE rv.stamp END, CASE WHEN pk.packed THEN iv.node ELSE rv.node END, \
             CASE WHEN pk.packed THEN iv.ts ELSE rv.ts END, CASE WHEN pk.packed THEN iv.local_ts ELSE rv.local_ts END, \
             CASE WHEN pk.packed THEN iv.node ELSE rv.inserted_by END, \
             CASE WHEN NOT pk.packed THEN rv.base::text END, CASE WHEN NOT pk.packed THEN rv.cols::text END"
                .to_string(),
        )
    } else {
        (String::new(), "rv.stamp, rv.node, rv.ts, rv.local_ts, rv.inserted_by, rv.base::text, rv.cols::text".to_string())
    };
    format!(
        "SELECT u.i, {key}, cts.roident::int8, (extract(epoch from cts.\"timestamp\") * 1000000)::int8, ARRAY[{cols}]::text[], {version} \
         FROM unnest({arrays}) WITH ORDINALITY AS u({aliases}, i) \
         JOIN {qt} t ON {conds} \
         LEFT JOIN LATERAL pg_xact_commit_timestamp_origin(t.xmin) cts ON true \
         LEFT JOIN branchsync.row_version rv ON rv.tbl = ${tbl_param} AND rv.key = {key}{packed_join} \
         ORDER BY u.i",
        cols = cols.join(", "),
        arrays = arrays.join(", "),
        aliases = aliases.join(", "),
        qt = t.qualified,
        conds = conds.join(" AND "),
    )
}

/// The packed version of the row with key text `key` whose `xmin` (32
/// bits) is `xmin` in table `tbl`, joined as `iv`, and `pk.packed`: whether
/// it speaks for the row rather than its `row_version` entry `rv` (see
/// [`read_current`]).
fn packed_version_join(key: &str, xmin: &str, tbl: &str, rv: &str) -> String {
    format!(
        " LEFT JOIN LATERAL (SELECT b.node, b.local_ts, b.stamps[p.i] AS stamp, b.ts[p.i] AS ts \
           FROM branchsync.insert_versions b CROSS JOIN LATERAL (SELECT array_position(b.keys, {key}) AS i) p \
           WHERE b.xid32 = {xmin} AND b.tbl = {tbl} AND p.i IS NOT NULL \
           ORDER BY b.xid DESC LIMIT 1) iv ON true \
         CROSS JOIN LATERAL (SELECT iv.node IS NOT NULL AND NOT coalesce(NOT {rv}.deleted AND {rv}.local_ts >= iv.local_ts, false) AS packed) pk"
    )
}

/// Records the versions of rows the compare-and-set batch wrote (R13, per
/// column): each row becomes the author's version, the columns it changed
/// carry it, and the others keep the version they had. That is the
/// version their row had (`base`), unless they carried their own
/// (`cols`). `$1` table, `$2` keys, `$3` stamp, `$4` author, `$5` author
/// commit time, `$6` the changed columns of each row (JSON arrays), `$7`
/// the version a row had when it was this node's own or the baseline (JSON,
/// else NULL: then it is the row's `row_version` entry, or its packed
/// version found through `$8`, the old `xmin`).
pub fn upsert_changed_versions(packed: bool) -> String {
    let (packed_join, is_packed, iv) = if packed {
        (packed_version_join("u.k", "u.x", "$1", "o"), "pk.packed", "jsonb_build_array(iv.stamp, iv.node, iv.local_ts)")
    } else {
        (String::new(), "false", "NULL")
    };
    format!(
        "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, inserted_by, row_data, base, cols) \
         SELECT $1, u.k, $3, $4, false, $5, n.now, $4, NULL, b.base, \
                coalesce(b.cols, '{{}}'::jsonb) || (SELECT coalesce(jsonb_object_agg(c, jsonb_build_array($3, $4, n.now)), '{{}}'::jsonb) \
                                                   FROM jsonb_array_elements_text(u.ch::jsonb) AS c) \
         FROM (SELECT {LOCAL_TS} AS now) n \
         CROSS JOIN unnest($2::text[], $6::text[], $7::text[], $8::int8[]) AS u(k, ch, lb, x) \
         LEFT JOIN branchsync.row_version o ON o.tbl = $1 AND o.key = u.k{packed_join} \
         CROSS JOIN LATERAL (SELECT \
             CASE WHEN u.lb IS NOT NULL THEN u.lb::jsonb WHEN {is_packed} THEN {iv} \
                  WHEN o.stamp IS NOT NULL THEN coalesce(o.base, jsonb_build_array(o.stamp, o.node, o.local_ts)) \
                  ELSE jsonb_build_array(0, '', 0) END AS base, \
             CASE WHEN u.lb IS NULL AND NOT {is_packed} THEN o.cols END AS cols) b \
         ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = false, ts = excluded.ts, \
             local_ts = excluded.local_ts, row_data = NULL, base = excluded.base, cols = excluded.cols, \
             inserted_by = coalesce(CASE WHEN rv.deleted THEN excluded.inserted_by END, rv.inserted_by, excluded.inserted_by)"
    )
}

/// Records the version of one row the main decided (R13, per column):
/// `$1` table, `$2` key, `$3` stamp, `$4` node, `$5` author commit time,
/// `$6` this node's write time (NULL: now), `$7` inserting node, `$8` the
/// version of columns without their own (JSON), `$9` the columns' own
/// versions (JSON object), `$10` the incoming change's stamp, `$11` its
/// author, `$12` the columns that take its version. With `incoming` the row
/// becomes `$4`'s and keeps its inserting node (`$7` is the inserting node
/// of a new entry); else it stays the held version given.
pub fn upsert_decided_version(incoming: bool) -> String {
    let inserted_by = if incoming {
        "coalesce(CASE WHEN rv.deleted THEN excluded.inserted_by END, rv.inserted_by, excluded.inserted_by)"
    } else {
        "excluded.inserted_by"
    };
    format!(
        "INSERT INTO branchsync.row_version AS rv (tbl, key, stamp, node, deleted, ts, local_ts, inserted_by, row_data, base, cols) \
         SELECT $1, $2, $3, $4, false, $5, coalesce($6, n.now), $7, NULL, $8::text::jsonb, \
                coalesce($9::text::jsonb, '{{}}'::jsonb) || (SELECT coalesce(jsonb_object_agg(c, jsonb_build_array($10::int8, $11::text, n.now)), '{{}}'::jsonb) \
                                                          FROM unnest($12::text[]) AS c) \
         FROM (SELECT {LOCAL_TS} AS now) n \
         ON CONFLICT (tbl, key) DO UPDATE SET stamp = excluded.stamp, node = excluded.node, deleted = false, ts = excluded.ts, \
             local_ts = excluded.local_ts, row_data = NULL, base = excluded.base, cols = excluded.cols, inserted_by = {inserted_by}"
    )
}

/// Whether any row references the row with this key (one `text` per key column).
pub fn has_children(t: &LocalTable) -> String {
    let conds: Vec<String> = t.pk.iter().enumerate().map(|(j, k)| format!("t.{} = ${}::text::{}", quote_ident(k), j + 1, t.columns[k].type_name)).collect();
    let refs: Vec<String> = t.children.iter().map(|f| f.referenced_sql("t")).collect();
    let refs = if refs.is_empty() { "false".to_string() } else { refs.join(" OR ") };
    format!("SELECT coalesce((SELECT {refs} FROM {} t WHERE {}), false)", t.qualified, conds.join(" AND "))
}

/// The stream's durable progress, in the apply transaction (R4).
pub const UPSERT_PROGRESS: &str = "INSERT INTO branchsync.progress (stream, pos, lsn, updated_at) VALUES ($1, $2, $3, now()) \
     ON CONFLICT (stream) DO UPDATE SET pos = excluded.pos, lsn = excluded.lsn, updated_at = now()";


/// The author's identity on every applied transaction (R3); its content
/// is sealed ([`crate::marks`]).
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

/// Whether any of the foreign-key values given (one `text[]` per column of
/// `f`, row by row) lacks its parent. Apply sends each value once, none
/// with a NULL ([`super::pipeline`]), so a batch of many rows pointing at
/// few parents costs few probes.
pub fn missing_parents(t: &LocalTable, f: &crate::catalog::ForeignKey) -> String {
    let arrays: Vec<String> = (1..=f.columns.len()).map(|j| format!("${j}::text[]")).collect();
    let aliases: Vec<String> = (0..f.columns.len()).map(|j| format!("c{j}")).collect();
    let eq: Vec<String> = f
        .parent_columns
        .iter()
        .zip(&f.column_names)
        .enumerate()
        .map(|(j, (p, c))| format!("p.{p} = u.c{j}::{}", t.columns.get(c).map_or("text", |col| col.type_name.as_str())))
        .collect();
    format!(
        "SELECT EXISTS (SELECT 1 FROM unnest({arrays}) AS u({aliases}) WHERE NOT EXISTS (SELECT 1 FROM {parent} p WHERE {eq}))",
        aliases = aliases.join(", "),
        arrays = arrays.join(", "),
        parent = f.parent,
        eq = eq.join(" AND "),
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
