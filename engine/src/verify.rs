//! Proving two copies agree: `branchsync verify` compares the replicated
//! tables of a branch with the main's while both keep selling, and lists
//! the rows that differ.
//!
//! # How a table is compared
//!
//! Both sites read the same thing, so only summaries cross the link:
//!
//! 1. **Buckets.** Every row is reduced to its key and its canonical text
//!    (`to_jsonb` of the columns both sites have; the session settings of
//!    [`crate::pg::PINNED_SETTINGS`] fix how dates, floats and bytes print).
//!    A hash of the key places it in one of a power-of-two number of
//!    buckets; each bucket is summarised as its row count and the sum of
//!    its rows' 64-bit hashes. One scan per site; buckets that agree are
//!    done. A keyless table's whole row is its key, so it is compared as a
//!    multiset (a duplicated row counts twice).
//! 2. **Rows.** For the buckets that differ, each site lists its keys with
//!    their row hash and count (one more scan, restricted to those
//!    buckets); keys whose hash or count differ are the candidates.
//! 3. **Settling.** A candidate may be a change still in flight in either
//!    stream. The caller's [`Settle`] waits until both streams have passed
//!    the positions seen after this read; then both sites read the
//!    candidates again, with their values. A candidate is a difference
//!    when it still differs *and neither site's row changed between the two
//!    reads*: a row that changed is read again after another settling (a
//!    hot row that never stops changing is reported as such, not as a
//!    difference). A row that now agrees was in flight.
//!
//! The cost is two scans per table and site (both sites read at once) plus
//! a read of the candidates;
//! what crosses the link is one summary per bucket and one line per key of
//! a differing bucket.
//!
//! # What it must never do
//!
//! Write anything, or take SQL from the other site: a [`Scan`] names a
//! table and columns, and [`TableReader`] checks them against the catalog
//! and the tables this node replicates before quoting them into its own
//! statements. Row values are never logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use branchsync_proto::changeset::quote_ident;
use branchsync_proto::inspect::{BucketSum, KeyRows, Scan, Shape, TableName};
use serde::Serialize;
use tokio_postgres::Client;

use crate::progress::Progress;
use crate::scope::STATE_SCHEMA;
use crate::EngineError;

/// Rows a bucket holds on average, at most, when the bucket count is chosen.
const ROWS_PER_BUCKET: i64 = 64;
/// Most buckets of one scan.
const MAX_BUCKETS: u32 = 1 << 16;
/// Rows one answer of [`Site::rows`] aims at (it must fit in a frame).
const ROWS_PER_READ: i64 = 20_000;
/// Keys one read of candidates with their values names.
const KEYS_PER_READ: usize = 2_000;
/// Settlings before a row that keeps changing is reported as such.
const ROUNDS: usize = 4;

/// Why a comparison could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// This site's database.
    #[error(transparent)]
    Local(#[from] EngineError),
    /// The other site could not answer.
    #[error("{message}\nDETAIL: {detail}\nHINT: {hint}")]
    Remote { message: String, detail: String, hint: String },
    /// The link to the other site failed (try again).
    #[error("the link to the main failed: {0}")]
    Link(String),
    /// The streams did not pass the positions seen at the first read in time.
    #[error("the streams did not settle: {0}")]
    Unsettled(String),
}

/// One site's copy, as the comparison reads it.
#[allow(async_fn_in_trait)]
pub trait Site {
    /// The table's columns and key, or `None` when the site does not
    /// replicate it.
    async fn shape(&mut self, table: &TableName) -> Result<Option<Shape>, VerifyError>;
    /// Every non-empty bucket's summary.
    async fn buckets(&mut self, scan: &Scan) -> Result<Vec<BucketSum>, VerifyError>;
    /// The keys of the buckets `pick` (only `keys`, when given), with each
    /// column's MD5 when `values`.
    async fn rows(&mut self, scan: &Scan, pick: &[u32], keys: Option<&[String]>, values: bool) -> Result<Vec<KeyRows>, VerifyError>;
}

/// Waits until both streams have passed the positions of "now": whatever
/// either site had committed is applied at the other.
#[allow(async_fn_in_trait)]
pub trait Settle {
    async fn settle(&mut self) -> Result<(), VerifyError>;
}

/// How a row differs, seen from the branch being verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Difference {
    /// The main has the row, this branch does not.
    Missing,
    /// This branch has a row the main does not.
    Extra,
    /// Both have the row; these columns differ.
    Different { columns: Vec<String> },
    /// A keyless table holds this row a different number of times.
    Count { branch: i64, main: i64 },
    /// The row changed at every reading: it could not be judged.
    StillChanging,
}

/// One row that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowDifference {
    /// The row's key as canonical JSON (the whole row for a keyless table).
    pub key: String,
    #[serde(flatten)]
    pub difference: Difference,
}

/// What the comparison of one table found.
#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    /// `schema.table`.
    pub table: String,
    /// Rows read at the branch and at the main (first read).
    pub rows_branch: i64,
    pub rows_main: i64,
    /// Buckets of the scan, and those that differed at the first read.
    pub buckets: u32,
    pub buckets_differing: usize,
    /// Set when the table cannot be compared row by row (missing at one
    /// site, different key); its rows are then not compared.
    pub schema_difference: Option<String>,
    /// Columns one site has and the other not (left out of the comparison).
    pub columns_only_branch: Vec<String>,
    pub columns_only_main: Vec<String>,
    /// Rows that differ, by key.
    pub differences: Vec<RowDifference>,
    /// Wall time of the comparison, seconds.
    pub seconds: f64,
}

impl TableReport {
    /// `true` when the table is the same at both sites.
    pub fn agrees(&self) -> bool {
        self.schema_difference.is_none() && self.differences.is_empty() && self.columns_only_branch.is_empty() && self.columns_only_main.is_empty()
    }
}

/// A key's rows at one site as a reading saw them: (hash, count), or none.
type Seen = Option<(i64, i64)>;

/// Compares `table` between `branch` and `main`.
pub async fn compare_table(branch: &mut impl Site, main: &mut impl Site, settle: &mut impl Settle, table: &TableName, rows_estimate: i64, local: &[String]) -> Result<TableReport, VerifyError> {
    let started = Instant::now();
    let mut report = TableReport {
        table: table.to_string(),
        rows_branch: 0,
        rows_main: 0,
        buckets: 0,
        buckets_differing: 0,
        schema_difference: None,
        columns_only_branch: Vec::new(),
        columns_only_main: Vec::new(),
        differences: Vec::new(),
        seconds: 0.0,
    };
    // Both sites read at once (two machines in a real chain).
    let (b, m) = tokio::join!(branch.shape(table), main.shape(table));
    let (b, m) = (b?, m?);
    let (b, m) = match (b, m) {
        (Some(b), Some(m)) => (b, m),
        (b, _) => {
            report.schema_difference = Some(if b.is_none() { "this branch does not replicate the table".into() } else { "the main does not replicate the table".into() });
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
    };
    if b.key != m.key {
        report.schema_difference = Some(format!("the primary keys differ: ({}) here, ({}) at the main", b.key.join(", "), m.key.join(", ")));
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    let (bc, mc): (BTreeSet<&String>, BTreeSet<&String>) = (b.columns.iter().collect(), m.columns.iter().collect());
    report.columns_only_branch = bc.difference(&mc).map(|c| c.to_string()).collect();
    report.columns_only_main = mc.difference(&bc).map(|c| c.to_string()).collect();
    // Site-local columns (a table rule's `local`) differ by design.
    let columns: Vec<String> = bc.intersection(&mc).filter(|c| b.key.contains(c) || !local.contains(c)).map(|c| c.to_string()).collect();
    let scan = Scan { table: table.clone(), columns, key: b.key.clone(), buckets: bucket_count(rows_estimate) };
    report.buckets = scan.buckets;

    // 1. Buckets.
    let (bs, ms) = tokio::join!(branch.buckets(&scan), main.buckets(&scan));
    let (bs, ms) = (bs?, ms?);
    report.rows_branch = bs.iter().map(|s| s.rows).sum();
    report.rows_main = ms.iter().map(|s| s.rows).sum();
    let differing = differing_buckets(&bs, &ms);
    report.buckets_differing = differing.len();
    if differing.is_empty() {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // 2. Rows of the differing buckets.
    let per_bucket = (report.rows_branch.max(report.rows_main) / i64::from(scan.buckets)).max(1);
    let batch = usize::try_from((ROWS_PER_READ / per_bucket).max(1)).unwrap_or(1);
    let (mut bk, mut mk) = (HashMap::new(), HashMap::new());
    for pick in differing.chunks(batch) {
        let (b, m) = tokio::join!(branch.rows(&scan, pick, None, false), main.rows(&scan, pick, None, false));
        bk.extend(b?.into_iter().map(|r| (r.key.clone(), r)));
        mk.extend(m?.into_iter().map(|r| (r.key.clone(), r)));
    }
    let mut candidates: BTreeMap<String, (Seen, Seen)> = BTreeMap::new();
    for k in bk.keys().chain(mk.keys()) {
        let (x, y) = (bk.get(k).map(|r| (r.hash, r.count)), mk.get(k).map(|r| (r.hash, r.count)));
        if x != y {
            candidates.insert(k.clone(), (x, y));
        }
    }

    // 3. Settle, read again with values, keep what did not move.
    for round in 0..ROUNDS {
        if candidates.is_empty() {
            break;
        }
        settle.settle().await?;
        let keys: Vec<String> = candidates.keys().cloned().collect();
        let (mut bnow, mut mnow) = (HashMap::new(), HashMap::new());
        for part in keys.chunks(KEYS_PER_READ) {
            let pick: Vec<u32> = part.iter().map(|k| bucket_of(k, scan.buckets)).collect::<BTreeSet<_>>().into_iter().collect();
            let (b, m) = tokio::join!(branch.rows(&scan, &pick, Some(part), true), main.rows(&scan, &pick, Some(part), true));
            bnow.extend(b?.into_iter().map(|r| (r.key.clone(), r)));
            mnow.extend(m?.into_iter().map(|r| (r.key.clone(), r)));
        }
        let mut next = BTreeMap::new();
        for (k, (b0, m0)) in candidates {
            let (b1, m1) = (bnow.get(&k), mnow.get(&k));
            let (b1s, m1s) = (b1.map(|r| (r.hash, r.count)), m1.map(|r| (r.hash, r.count)));
            if b1s == m1s {
                continue; // It was in flight.
            }
            if b1s != b0 || m1s != m0 {
                // It moved: judge it after another settling.
                if round + 1 == ROUNDS {
                    report.differences.push(RowDifference { key: k, difference: Difference::StillChanging });
                } else {
                    next.insert(k, (b1s, m1s));
                }
                continue;
            }
            let difference = match (b1, m1) {
                (None, Some(_)) => Difference::Missing,
                (Some(_), None) => Difference::Extra,
                (Some(b), Some(m)) if scan.key.is_empty() => Difference::Count { branch: b.count, main: m.count },
                (Some(b), Some(m)) => Difference::Different { columns: differing_columns(b.row.as_deref(), m.row.as_deref()) },
                (None, None) => continue,
            };
            // A keyless row missing at one site is a count too.
            let difference = match (&difference, scan.key.is_empty()) {
                (Difference::Missing, true) => Difference::Count { branch: 0, main: m1.map(|r| r.count).unwrap_or(0) },
                (Difference::Extra, true) => Difference::Count { branch: b1.map(|r| r.count).unwrap_or(0), main: 0 },
                _ => difference,
            };
            report.differences.push(RowDifference { key: k, difference });
        }
        candidates = next;
    }
    report.differences.sort_by(|a, b| a.key.cmp(&b.key));
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Compares every table of `tables` (progress per table); the reports in
/// the same order.
pub async fn compare_tables(
    branch: &mut impl Site,
    main: &mut impl Site,
    settle: &mut impl Settle,
    tables: &[(TableName, i64)],
    local: &dyn Fn(&TableName) -> Vec<String>,
    progress: &dyn Progress,
) -> Result<Vec<TableReport>, VerifyError> {
    let mut out = Vec::new();
    progress.phase("comparing tables", tables.len() as u64);
    for (t, estimate) in tables {
        let r = compare_table(branch, main, settle, t, *estimate, &local(t)).await;
        match r {
            Ok(r) => {
                tracing::info!(table = %t, rows = r.rows_branch.max(r.rows_main), differences = r.differences.len(), seconds = r.seconds, "table compared");
                out.push(r);
                progress.advance(1);
            }
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
    }
    progress.finish();
    Ok(out)
}

/// Buckets for a table of about `rows` rows: a power of two, about
/// [`ROWS_PER_BUCKET`] rows each.
pub fn bucket_count(rows: i64) -> u32 {
    let want = u64::try_from(rows / ROWS_PER_BUCKET).unwrap_or(0).max(1);
    u32::try_from(want.next_power_of_two()).unwrap_or(MAX_BUCKETS).min(MAX_BUCKETS)
}

/// The bucket of a key (as the SQL of [`TableReader`] computes it): the
/// first 32 bits of the key text's MD5, masked.
pub fn bucket_of(key: &str, buckets: u32) -> u32 {
    use md5::Digest;
    let d = md5::Md5::digest(key.as_bytes());
    let first = i32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    (first & (buckets as i32 - 1)) as u32
}

/// Buckets whose summary differs (one side may lack a bucket), sorted.
pub fn differing_buckets(a: &[BucketSum], b: &[BucketSum]) -> Vec<u32> {
    let am: HashMap<u32, (&i64, &String)> = a.iter().map(|s| (s.bucket, (&s.rows, &s.sum))).collect();
    let bm: HashMap<u32, (&i64, &String)> = b.iter().map(|s| (s.bucket, (&s.rows, &s.sum))).collect();
    let all: BTreeSet<u32> = am.keys().chain(bm.keys()).copied().collect();
    all.into_iter().filter(|k| am.get(k) != bm.get(k)).collect()
}

/// The columns whose values differ between two rows (JSON objects of each
/// column's MD5; every column of either when one does not parse).
pub fn differing_columns(a: Option<&str>, b: Option<&str>) -> Vec<String> {
    let parse = |s: Option<&str>| s.and_then(|s| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s).ok()).unwrap_or_default();
    let (a, b) = (parse(a), parse(b));
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).map(|k| k.to_string()).collect()
}

/// Reads one site's tables for a comparison, over a connection its owner
/// hands it (pinned session settings, [`crate::pg::connect`]).
pub struct TableReader<'a> {
    client: &'a Client,
    publication: String,
}

impl<'a> TableReader<'a> {
    /// A reader of the tables in `publication` (branchsync's own).
    pub fn new(client: &'a Client, publication: &str) -> TableReader<'a> {
        TableReader { client, publication: publication.to_string() }
    }

    /// The replicated tables with their estimated row counts, by name.
    pub async fn tables(&self) -> Result<Vec<(TableName, i64)>, EngineError> {
        let rows = self
            .client
            .query(
                "SELECT t.schemaname::text, t.tablename::text, greatest(c.reltuples, 0)::int8 \
                 FROM pg_catalog.pg_publication_tables t \
                 JOIN pg_catalog.pg_class c ON c.oid = format('%I.%I', t.schemaname, t.tablename)::regclass \
                 WHERE t.pubname = $1 AND t.schemaname <> $2 ORDER BY 1, 2",
                &[&self.publication, &STATE_SCHEMA],
            )
            .await
            .map_err(EngineError::pg("listing the replicated tables"))?;
        Ok(rows.iter().map(|r| (TableName { schema: r.get(0), name: r.get(1) }, r.get(2))).collect())
    }

    /// The table's columns and key; `None` when it is not replicated here.
    pub async fn shape(&self, table: &TableName) -> Result<Option<Shape>, EngineError> {
        if !self.replicated(table).await? {
            return Ok(None);
        }
        let rel = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name));
        let columns: Vec<String> = self
            .client
            .query(
                "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attname::text COLLATE \"C\"",
                &[&rel],
            )
            .await
            .map_err(EngineError::pg("reading a table's columns"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let key: Vec<String> = self
            .client
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1::text::regclass AND i.indisprimary ORDER BY k.n",
                &[&rel],
            )
            .await
            .map_err(EngineError::pg("reading a table's primary key"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Some(Shape { columns, key }))
    }

    async fn replicated(&self, table: &TableName) -> Result<bool, EngineError> {
        if table.schema == STATE_SCHEMA {
            return Ok(false);
        }
        let n: i64 = self
            .client
            .query_one("SELECT count(*) FROM pg_catalog.pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3", &[&self.publication, &table.schema, &table.name])
            .await
            .map_err(EngineError::pg("checking that a table is replicated"))?
            .get(0);
        Ok(n > 0)
    }

    /// The scan's `SELECT k, r` (key text, row text) over this site's copy,
    /// after checking every name it uses; `None` when the table is not
    /// replicated here.
    async fn scan_sql(&self, scan: &Scan) -> Result<Option<String>, EngineError> {
        let Some(shape) = self.shape(&scan.table).await? else { return Ok(None) };
        let unknown: Vec<&String> = scan.columns.iter().chain(&scan.key).filter(|c| !shape.columns.contains(c)).collect();
        if !unknown.is_empty() || !scan.key.iter().all(|k| scan.columns.contains(k)) || !scan.buckets.is_power_of_two() || scan.buckets > MAX_BUCKETS {
            return Err(EngineError::Misconfigured {
                message: format!("cannot compare table {}", scan.table),
                detail: format!("The comparison names columns this site's table does not have ({unknown:?}), a key outside its columns, or {} buckets.", scan.buckets),
                hint: "Run verify again: the table's schema changed during the comparison.".into(),
            });
        }
        let rel = format!("ONLY {}.{}", quote_ident(&scan.table.schema), quote_ident(&scan.table.name));
        // The columns this site has and the other does not are left out.
        let left_out: Vec<String> = shape.columns.iter().filter(|c| !scan.columns.contains(c)).map(|c| crate::pg::quote_literal(c)).collect();
        let row = if left_out.is_empty() { "to_jsonb(t)".to_string() } else { format!("(to_jsonb(t) - ARRAY[{}]::text[])", left_out.join(", ")) };
        let keyed = if scan.key.is_empty() {
            // A keyless table: the whole row is the key.
            format!("SELECT r AS k, r FROM (SELECT {row}::text AS r FROM {rel} t) s0")
        } else {
            let key = scan.key.iter().map(|k| format!("{}, t.{}", crate::pg::quote_literal(k), quote_ident(k))).collect::<Vec<_>>().join(", ");
            format!("SELECT jsonb_build_object({key})::text AS k, {row}::text AS r FROM {rel} t")
        };
        let mask = scan.buckets - 1;
        Ok(Some(format!(
            "SELECT k, r, ((('x' || substr(md5(k), 1, 8))::bit(32)::int) & {mask}) AS b, ('x' || substr(md5(r), 1, 16))::bit(64)::int8 AS h FROM ({keyed}) s"
        )))
    }

    /// Every non-empty bucket's summary.
    pub async fn buckets(&self, scan: &Scan) -> Result<Vec<BucketSum>, EngineError> {
        let Some(sql) = self.scan_sql(scan).await? else { return Ok(Vec::new()) };
        let rows = self
            .client
            .query(&format!("SELECT b, count(*)::int8, sum(h::numeric)::text FROM ({sql}) x GROUP BY b"), &[])
            .await
            .map_err(EngineError::pg(format!("summarising table {}", scan.table)))?;
        Ok(rows.iter().map(|r| BucketSum { bucket: r.get::<_, i32>(0) as u32, rows: r.get(1), sum: r.get(2) }).collect())
    }

    /// The keys of the buckets `pick` (only `keys` when given), with their
    /// row hash, count and (when `values`) each column's MD5.
    pub async fn rows(&self, scan: &Scan, pick: &[u32], keys: Option<&[String]>, values: bool) -> Result<Vec<KeyRows>, EngineError> {
        let Some(sql) = self.scan_sql(scan).await? else { return Ok(Vec::new()) };
        let pick: Vec<i32> = pick.iter().map(|b| *b as i32).collect();
        let keys: Option<Vec<String>> = keys.map(|k| k.to_vec());
        let rows = self
            .client
            .query(
                // With values: each column's MD5, never the values (a
                // row may hold hundreds of MB; a difference names columns).
                &format!(
                    "SELECT k, h, n, CASE WHEN $3 THEN (SELECT jsonb_object_agg(e.key, md5(e.value::text)) FROM jsonb_each(r::jsonb) e)::text END \
                     FROM (SELECT k, min(h) AS h, count(*)::int8 AS n, min(r) AS r FROM ({sql}) x WHERE b = ANY($1) AND ($2::text[] IS NULL OR k = ANY($2)) GROUP BY k) g"
                ),
                &[&pick, &keys, &values],
            )
            .await
            .map_err(EngineError::pg(format!("reading keys of table {}", scan.table)))?;
        Ok(rows.iter().map(|r| KeyRows { key: r.get(0), hash: r.get(1), count: r.get(2), row: r.get(3) }).collect())
    }
}

/// At the main: makes branch `to`'s rows of `table` with `keys` (canonical
/// key JSON, as a scan lists them) equal to the main's. One transaction of
/// the main's own sends, for each key, the main's whole row (or its
/// absence) as a [`Verdict`](branchsync_proto::Verdict) addressed to `to`:
/// a `branchsync.verdict` message under the main's replication origin,
/// sealed with the daemon's `mark_key`, so the main's capture keeps it in
/// the relay in commit order (R25). The table is locked in `SHARE` mode
/// meanwhile (writers wait a moment; a lock not granted within a second,
/// because a transaction holds the table, fails the repair rather than
/// queue the ERP's writers behind it), so no
/// change of the ERP falls between the read and the verdicts: whatever
/// changes the row later comes after the verdict in the relay. The branch
/// writes the row as the main holds it, counters included (absolutely,
/// never as a difference), unless it changed the row itself since. Each
/// row is recorded in the main's `branchsync.conflicts` (kind `repaired`,
/// already resolved). Returns (rows sent, absences sent).
pub async fn emit_repairs(client: &Client, mark_key: &[u8], main_node: &str, to: &str, table: &TableName, keys: &[String]) -> Result<(u64, u64), EngineError> {
    let reader = TableReader::new(client, crate::state::PUBLICATION);
    if !reader.replicated(table).await? {
        return Err(EngineError::Misconfigured {
            message: format!("table {table} is not replicated at the main"),
            detail: "Only replicated tables can be repaired.".into(),
            hint: "Run verify again: the table's schema changed.".into(),
        });
    }
    let rel = format!("{}.{}", quote_ident(&table.schema), quote_ident(&table.name));
    let columns: Vec<String> = client
        .query(
            "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&rel],
        )
        .await
        .map_err(EngineError::pg("reading a table's columns"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let shape = reader.shape(table).await?.unwrap_or(Shape { columns: Vec::new(), key: Vec::new() });
    if shape.key.is_empty() {
        return Err(EngineError::Misconfigured {
            message: format!("table {table} has no primary key"),
            detail: "A repair names rows by their key; a table without one is compared as a multiset only.".into(),
            hint: "Correct its rows by hand (with replication on), or re-seed the branch.".into(),
        });
    }
    let key_flags: Vec<bool> = columns.iter().map(|c| shape.key.contains(c)).collect();
    let desc = branchsync_proto::TableDesc::from(branchsync_proto::TableDef { schema: table.schema.clone(), name: table.name.clone(), columns: columns.clone(), key: key_flags.clone(), identity_full: false });
    let origin = crate::state::origin_name(main_node);
    client
        .batch_execute("BEGIN; SET LOCAL lock_timeout = '1s'")
        .await
        .map_err(EngineError::pg("starting a repair"))?;
    let r = async {
        client
            .execute("SELECT pg_replication_origin_create($1) WHERE pg_replication_origin_oid($1) IS NULL", &[&origin])
            .await
            .map_err(EngineError::pg("creating the main's replication origin"))?;
        client.execute("SELECT pg_replication_origin_session_setup($1)::text", &[&origin]).await.map_err(EngineError::pg("setting the replication origin"))?;
        client.batch_execute(&format!("LOCK TABLE ONLY {rel} IN SHARE MODE")).await.map_err(EngineError::pg(format!("locking {table} for a repair")))?;
        let xid: i64 = client.query_one(crate::pg::CURRENT_XID, &[]).await.map_err(EngineError::pg("reading the transaction id"))?.get(0);
        let xid = u32::try_from(xid).map_err(|_| EngineError::Corrupt("the repair transaction has no transaction id".into()))?;
        let now: i64 = client
            .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8", &[])
            .await
            .map_err(EngineError::pg("reading the clock"))?
            .get(0);
        let key_list = shape.key.iter().map(|k| format!("r.{}::text", quote_ident(k))).collect::<Vec<_>>().join(", ");
        let row_list = columns.iter().map(|c| format!("t.{}::text", quote_ident(c))).collect::<Vec<_>>().join(", ");
        let matches = shape.key.iter().map(|k| format!("t.{0} = r.{0}", quote_ident(k))).collect::<Vec<_>>().join(" AND ");
        let rows = client
            .query(
                &format!(
                    "SELECT k.key, ARRAY[{key_list}], (SELECT ARRAY[{row_list}] FROM ONLY {rel} t WHERE {matches}) \
                     FROM unnest($1::text[]) k(key), LATERAL jsonb_populate_record(NULL::{rel}, k.key::jsonb) r"
                ),
                &[&keys],
            )
            .await
            .map_err(EngineError::pg(format!("reading rows of {table} to repair")))?;
        let (mut present, mut absent) = (0, 0);
        for row in &rows {
            let key_text: String = row.get(0);
            let key_vals: Vec<Option<String>> = row.get(1);
            let values: Option<Vec<Option<String>>> = row.get(2);
            let mut key = vec![branchsync_proto::Value::Null; columns.len()];
            for (k, v) in shape.key.iter().zip(&key_vals) {
                if let (Some(i), Some(v)) = (columns.iter().position(|c| c == k), v) {
                    key[i] = branchsync_proto::Value::Text(v.clone());
                }
            }
            let text = |v: &Option<String>| v.as_ref().map_or(branchsync_proto::Value::Null, |s| branchsync_proto::Value::Text(s.clone()));
            let found = values.is_some();
            let v = branchsync_proto::Verdict { table: 0, key, row: values.map(|vals| vals.iter().map(text).collect()), for_commit_ts: now, to: Some(to.to_string()) };
            let body = rmp_serde::to_vec(&(&desc, &v)).map_err(|e| EngineError::Corrupt(format!("cannot encode a repair: {e}")))?;
            let sealed = crate::marks::seal(mark_key, crate::state::VERDICT_MESSAGE_PREFIX, xid, &body);
            client
                .execute("SELECT pg_logical_emit_message(true, $1, $2::bytea)::text", &[&crate::state::VERDICT_MESSAGE_PREFIX, &sealed])
                .await
                .map_err(EngineError::pg("writing a repair"))?;
            let detail = if found { format!("verify --repair: the main's row sent to {to}") } else { format!("verify --repair: not at the main; deleted at {to}") };
            client
                .execute(
                    "INSERT INTO branchsync.conflicts (tbl, key, kind, rule, winner_node, loser_node, detail, origin_node, resolved_at, resolution) \
                     VALUES ($1, $2, 'repaired', 'verify --repair', $3, $4, $5, $3, now(), 'repaired')",
                    &[&table.to_string(), &key_text, &main_node, &to, &detail],
                )
                .await
                .map_err(EngineError::pg("recording a repair"))?;
            if found {
                present += 1;
            } else {
                absent += 1;
            }
        }
        client.batch_execute("COMMIT").await.map_err(EngineError::pg("committing a repair"))?;
        Ok::<_, EngineError>((present, absent))
    }
    .await;
    if r.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    let _ = client.batch_execute("SELECT pg_replication_origin_session_reset()").await;
    if let Ok((present, absent)) = &r {
        tracing::info!(table = %table, peer = %to, rows = present, absent = absent, "repair sent");
    }
    r
}


/// This site's own copy, read directly.
impl Site for TableReader<'_> {
    async fn shape(&mut self, table: &TableName) -> Result<Option<Shape>, VerifyError> {
        Ok(TableReader::shape(self, table).await?)
    }
    async fn buckets(&mut self, scan: &Scan) -> Result<Vec<BucketSum>, VerifyError> {
        Ok(TableReader::buckets(self, scan).await?)
    }
    async fn rows(&mut self, scan: &Scan, pick: &[u32], keys: Option<&[String]>, values: bool) -> Result<Vec<KeyRows>, VerifyError> {
        Ok(TableReader::rows(self, scan, pick, keys, values).await?)
    }
}

/// For two copies nothing flows between (two tables of one database, in
/// tests): nothing is ever in flight.
pub struct AlreadySettled;

impl Settle for AlreadySettled {
    async fn settle(&mut self) -> Result<(), VerifyError> {
        Ok(())
    }
}

/// How long a caller waits for the streams by default.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;
    use crate::test_utils::PgCluster;

    const SCHEMA: &str = "
        CREATE TABLE orders (id int PRIMARY KEY, shop text, total numeric(10,2), at timestamptz, tags text[], doc bytea, ratio float8);
        CREATE TABLE lines (order_id int, n int, qty int, PRIMARY KEY (order_id, n));
        CREATE TABLE audit (what text, at int);
        ALTER TABLE audit REPLICA IDENTITY FULL;
        CREATE TABLE local_only (id int PRIMARY KEY);
        INSERT INTO orders SELECT g, 'shop' || (g % 3), g * 1.25, '2026-01-01'::timestamptz + g * interval '1 minute', ARRAY['a', g::text], decode(md5(g::text), 'hex'), g / 7.0
          FROM generate_series(1, 5000) g;
        INSERT INTO lines SELECT o, n, o + n FROM generate_series(1, 2000) o, generate_series(1, 3) n;
        INSERT INTO audit SELECT 'event ' || (g % 50), g % 50 FROM generate_series(1, 300) g;
        CREATE PUBLICATION branchsync FOR TABLE orders, lines, audit;
    ";

    /// Two copies of the same tables: databases `branch` and `main` of one
    /// cluster, both sessions pinned as the daemons pin theirs.
    async fn two_copies(pg: &PgCluster) -> (Client, Client) {
        let admin = pg.connect().await;
        for db in ["branch", "main"] {
            admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        }
        let mut out = Vec::new();
        for db in ["branch", "main"] {
            let c = crate::pg::connect(&pg.url().replace("dbname=postgres", &format!("dbname={db}")), "verify test").await.unwrap().client;
            c.batch_execute(SCHEMA).await.unwrap();
            out.push(c);
        }
        let main = out.pop().unwrap();
        (out.pop().unwrap(), main)
    }

    async fn compare(branch: &Client, main: &Client) -> Vec<TableReport> {
        let (mut b, mut m) = (TableReader::new(branch, "branchsync"), TableReader::new(main, "branchsync"));
        let tables = b.tables().await.unwrap();
        compare_tables(&mut b, &mut m, &mut AlreadySettled, &tables, &|_| Vec::new(), &Silent).await.unwrap()
    }

    fn differences(reports: &[TableReport]) -> Vec<(String, String, Difference)> {
        reports.iter().flat_map(|r| r.differences.iter().map(|d| (r.table.clone(), d.key.clone(), d.difference.clone()))).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn equal_copies_agree_and_every_edit_behind_the_stream_is_named_by_its_key() {
        let pg = PgCluster::start();
        let (branch, main) = two_copies(&pg).await;
        let reports = compare(&branch, &main).await;
        assert_eq!(reports.iter().map(|r| r.table.as_str()).collect::<Vec<_>>(), ["public.audit", "public.lines", "public.orders"], "only the published tables");
        assert!(reports.iter().all(TableReport::agrees), "{reports:#?}");
        assert_eq!(reports[2].rows_branch, 5000);
        assert_eq!(reports[2].rows_main, 5000);

        // Edits at the branch: a changed column, a deleted row, an added row,
        // a composite-key row changed, a keyless row duplicated and one gone.
        branch
            .batch_execute(
                "UPDATE orders SET total = total + 1 WHERE id = 42;
                 UPDATE orders SET shop = 'x', at = at + interval '1 second' WHERE id = 4242;
                 DELETE FROM orders WHERE id = 7;
                 INSERT INTO orders (id, shop) VALUES (9001, 'new');
                 UPDATE lines SET qty = 0 WHERE order_id = 17 AND n = 2;
                 INSERT INTO audit VALUES ('event 3', 3);
                 DELETE FROM audit WHERE ctid = (SELECT min(ctid) FROM audit WHERE at = 11);",
            )
            .await
            .unwrap();
        let found = differences(&compare(&branch, &main).await);
        let expected = vec![
            ("public.audit".to_string(), r#"{"at": 11, "what": "event 11"}"#.to_string(), Difference::Count { branch: 5, main: 6 }),
            ("public.audit".into(), r#"{"at": 3, "what": "event 3"}"#.into(), Difference::Count { branch: 7, main: 6 }),
            ("public.lines".into(), r#"{"n": 2, "order_id": 17}"#.into(), Difference::Different { columns: vec!["qty".into()] }),
            // Sorted by key text.
            ("public.orders".into(), r#"{"id": 4242}"#.into(), Difference::Different { columns: vec!["at".into(), "shop".into()] }),
            ("public.orders".into(), r#"{"id": 42}"#.into(), Difference::Different { columns: vec!["total".into()] }),
            ("public.orders".into(), r#"{"id": 7}"#.into(), Difference::Missing),
            ("public.orders".into(), r#"{"id": 9001}"#.into(), Difference::Extra),
        ];
        assert_eq!(found, expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_column_only_one_site_has_is_named_and_left_out_and_a_table_only_one_replicates_is_not_compared() {
        let pg = PgCluster::start();
        let (branch, main) = two_copies(&pg).await;
        main.batch_execute("ALTER TABLE orders ADD COLUMN note text DEFAULT 'n'; ALTER PUBLICATION branchsync ADD TABLE local_only;").await.unwrap();
        let reports = compare(&branch, &main).await;
        let orders = reports.iter().find(|r| r.table == "public.orders").unwrap();
        assert_eq!(orders.columns_only_main, ["note"]);
        assert!(orders.differences.is_empty(), "the other columns agree: {orders:#?}");
        assert!(!orders.agrees());
        // The branch lists its tables; asked about one it does not
        // replicate, it says so.
        let mut b = TableReader::new(&branch, "branchsync");
        let mut m = TableReader::new(&main, "branchsync");
        let t = TableName { schema: "public".into(), name: "local_only".into() };
        let r = compare_table(&mut b, &mut m, &mut AlreadySettled, &t, 0, &[]).await.unwrap();
        assert_eq!(r.schema_difference.as_deref(), Some("this branch does not replicate the table"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_naming_what_the_table_does_not_have_or_a_table_not_replicated_reads_nothing() {
        let pg = PgCluster::start();
        let (branch, _main) = two_copies(&pg).await;
        let r = TableReader::new(&branch, "branchsync");
        let orders = TableName { schema: "public".into(), name: "orders".into() };
        let evil = Scan { table: orders.clone(), columns: vec!["id\" FROM pg_authid --".into()], key: vec![], buckets: 4 };
        assert!(r.buckets(&evil).await.is_err(), "a column the table does not have is refused");
        let odd = Scan { table: orders, columns: vec!["id".into()], key: vec!["id".into()], buckets: 3 };
        assert!(r.buckets(&odd).await.is_err(), "a bucket count that is not a power of two is refused");
        for (schema, name) in [("pg_catalog", "pg_authid"), ("branchsync", "progress"), ("public", "local_only")] {
            let scan = Scan { table: TableName { schema: schema.into(), name: name.into() }, columns: vec![], key: vec![], buckets: 1 };
            assert!(r.buckets(&scan).await.unwrap().is_empty(), "{schema}.{name} is not replicated: nothing is read");
            assert!(r.shape(&scan.table).await.unwrap().is_none());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_bucket_of_a_key_is_the_same_in_rust_and_in_sql() {
        let pg = PgCluster::start();
        let (branch, _main) = two_copies(&pg).await;
        let r = TableReader::new(&branch, "branchsync");
        let scan = Scan { table: TableName { schema: "public".into(), name: "orders".into() }, columns: vec!["id".into(), "shop".into()], key: vec!["id".into()], buckets: 256 };
        let all: Vec<u32> = (0..256).collect();
        let rows = r.rows(&scan, &all, None, false).await.unwrap();
        assert_eq!(rows.len(), 5000);
        for k in &rows {
            let one = r.rows(&scan, &[bucket_of(&k.key, 256)], Some(std::slice::from_ref(&k.key)), false).await.unwrap();
            assert_eq!(one.len(), 1, "key {} is in the bucket Rust computes", k.key);
        }
    }

    #[test]
    fn bucket_counts_are_powers_of_two_within_bounds() {
        assert_eq!(bucket_count(0), 1);
        assert_eq!(bucket_count(-5), 1);
        assert_eq!(bucket_count(64 * 100), 128);
        assert_eq!(bucket_count(i64::MAX), MAX_BUCKETS);
        let a = [BucketSum { bucket: 1, rows: 2, sum: "3".into() }, BucketSum { bucket: 2, rows: 1, sum: "9".into() }];
        let b = [BucketSum { bucket: 1, rows: 2, sum: "3".into() }, BucketSum { bucket: 5, rows: 1, sum: "9".into() }];
        assert_eq!(differing_buckets(&a, &b), [2, 5]);
        assert_eq!(differing_columns(Some(r#"{"a": 1, "b": 2}"#), Some(r#"{"a": 1, "b": 3, "c": null}"#)), ["b", "c"]);
    }
}
