//! Tests of the apply rules (R5–R8, R10, R11, R13) against a real
//! PostgreSQL: hand-built ChangeSets go through [`Applier`] exactly as the
//! link hands them over, and each test checks what the database holds.

use std::sync::Arc;
use std::time::Duration;

use branchsync_proto::{ChangeSetHeader, LogEntry, OldRow, RowChange, TableDesc, Value};
use tokio::sync::{mpsc, watch};

use super::{Applier, ApplyConfig, StreamState};
use crate::scope::Scope;
use crate::state::STATE_DDL;
use crate::test_utils::PgCluster;

const T0: u64 = 1_700_000_000_000_000;

struct Site {
    pg: PgCluster,
    c: tokio_postgres::Client,
    state: Arc<StreamState>,
}

impl Site {
    async fn new(schema: &str, conf: &[&str]) -> Site {
        let pg = PgCluster::start_with(conf);
        let c = pg.connect().await;
        c.batch_execute(STATE_DDL).await.unwrap();
        c.batch_execute(schema).await.unwrap();
        Site { pg, c, state: Arc::new(StreamState::default()) }
    }

    async fn applier(&self, budget: Duration) -> Applier {
        let cfg = ApplyConfig { node: "main".into(), scope: Scope::new(&["public".to_string()], &[]).unwrap(), group_budget: budget, lock_timeout_ms: 200 };
        Applier::connect(&self.pg.url(), cfg, "branch1", self.state.clone()).await.unwrap().0
    }

    /// Runs an applier over `entries` like the link does: the session ends
    /// with the result of [`Applier::run`].
    async fn run(&self, entries: &[LogEntry]) -> Result<super::ApplyStats, crate::EngineError> {
        let a = self.applier(super::DEFAULT_GROUP_BUDGET).await;
        let from = a.committed();
        let (tx, rx) = mpsc::channel(16);
        let (_stop_tx, stop_rx) = watch::channel(false);
        tx.send(entries.iter().filter(|e| e.pos > from).cloned().collect()).await.unwrap();
        drop(tx);
        a.run(rx, stop_rx).await
    }

    async fn rows(&self, sql: &str) -> Vec<String> {
        self.c.query(&format!("SELECT t::text FROM ({sql}) t"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    async fn progress(&self) -> u64 {
        super::read_progress(&self.c, "branch1").await.unwrap()
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn desc(name: &str, cols: &[&str], key: &[&str]) -> TableDesc {
    TableDesc {
        schema: "public".into(),
        name: name.into(),
        columns: cols.iter().map(|c| c.to_string()).collect(),
        key: cols.iter().map(|c| key.contains(c)).collect(),
        identity_full: key.is_empty(),
    }
}

fn cs(pos: u64, author: &str, stamp: u64, table: TableDesc, changes: Vec<RowChange>) -> LogEntry {
    let header = ChangeSetHeader { author: author.into(), author_index: 1, system_id: 9, commit_lsn: 0x10_0000 + pos, commit_ts_us: stamp as i64, stamp };
    LogEntry { pos, header, part: 0, last: true, tables: vec![table], changes }
}

fn ins(vals: &[&str]) -> RowChange {
    RowChange::Insert { table: 0, new: vals.iter().map(|v| text(v)).collect() }
}

fn upd(vals: &[&str]) -> RowChange {
    RowChange::Update { table: 0, old: None, new: vals.iter().map(|v| text(v)).collect() }
}

fn old_row(full: bool, vals: &[Option<&str>]) -> OldRow {
    OldRow { full, values: vals.iter().map(|v| v.map(text).unwrap_or(Value::Null)).collect() }
}

#[tokio::test]
async fn r5_an_apply_commit_is_flushed_before_progress_moves_even_when_the_database_defaults_to_async_commit() {
    let site = Site::new(
        "CREATE TABLE items (id int PRIMARY KEY, name text); ALTER DATABASE postgres SET synchronous_commit = off;",
        &["wal_writer_delay = 10000ms", "wal_writer_flush_after = 0", "autovacuum = off"],
    )
    .await;
    // The setting is really off for new sessions: a plain commit is not flushed.
    let probe = site.pg.connect().await;
    probe.batch_execute("CREATE TABLE probe (x int); INSERT INTO probe VALUES (1)").await.unwrap();
    let (flushed, inserted): (String, String) = {
        let r = probe.query_one("SELECT pg_current_wal_flush_lsn()::text, pg_current_wal_insert_lsn()::text", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    assert_ne!(flushed, inserted, "the control case: asynchronous commit leaves WAL unflushed");

    let mut a = site.applier(super::DEFAULT_GROUP_BUDGET).await;
    a.apply_entries(&[cs(1, "branch1", T0, desc("items", &["id", "name"], &["id"]), vec![ins(&["1", "a"])])]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(a.committed(), 1);
    let r = site.c.query_one("SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()", &[]).await.unwrap();
    assert!(r.get::<_, bool>(0), "the apply commit (with its progress) was flushed before it counted as applied");
}

#[tokio::test]
async fn r6_consecutive_changesets_of_one_author_share_a_transaction_and_authors_never_mix() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let d = desc("items", &["id", "name"], &["id"]);
    let entries = vec![
        cs(1, "branch1", T0 + 1, d.clone(), vec![ins(&["1", "a"])]),
        cs(2, "branch1", T0 + 2, d.clone(), vec![ins(&["2", "b"])]),
        cs(3, "branch1", T0 + 3, d.clone(), vec![ins(&["3", "c"])]),
        cs(4, "branch2", T0 + 4, d.clone(), vec![ins(&["4", "d"])]),
    ];
    site.run(&entries).await.unwrap();
    let xmins = site.rows("SELECT id, (xmin::text = (SELECT xmin::text FROM items WHERE id = 1)) AS same_txn FROM items ORDER BY id").await;
    assert_eq!(xmins, ["(1,t)", "(2,t)", "(3,t)", "(4,f)"], "branch1's three ChangeSets in one transaction, branch2's in its own");
    assert_eq!(site.progress().await, 4);

    // A zero budget gives every ChangeSet its own transaction.
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let mut a = site.applier(Duration::ZERO).await;
    a.apply_entries(&entries[..3]).await.unwrap();
    a.commit().await.unwrap();
    let n = site.rows("SELECT count(DISTINCT xmin::text) FROM items").await;
    assert_eq!(n, ["(3)"]);
}

#[tokio::test]
async fn r6_a_failing_group_splits_the_bad_change_is_quarantined_and_later_changes_to_its_key_queue_behind_it() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL CHECK (qty >= 0));", &[]).await;
    let d = desc("items", &["id", "qty"], &["id"]);
    let entries = vec![
        cs(1, "branch1", T0 + 1, d.clone(), vec![ins(&["1", "5"])]),
        cs(2, "branch1", T0 + 2, d.clone(), vec![ins(&["2", "-1"])]),
        cs(3, "branch1", T0 + 3, d.clone(), vec![ins(&["3", "7"])]),
        cs(4, "branch1", T0 + 4, d.clone(), vec![upd(&["2", "4"])]),
    ];
    // First session: the group fails as a whole, nothing is applied.
    let first = site.run(&entries).await;
    assert!(first.is_err(), "the group with the bad row fails");
    assert_eq!(site.progress().await, 0);
    assert!(site.rows("SELECT id FROM items").await.is_empty());
    // The link reconnects and resends from durable progress: careful replay.
    let mut sessions = 1;
    while site.run(&entries).await.is_err() {
        sessions += 1;
        assert!(sessions < 5, "careful replay did not get past the bad change");
    }
    assert_eq!(site.rows("SELECT id, qty FROM items ORDER BY id").await, ["(1,5)", "(3,7)"]);
    assert_eq!(site.progress().await, 4);
    let q = site.rows("SELECT kind, key FROM branchsync.conflicts").await;
    assert_eq!(q, ["(quarantined,\"[\"\"2\"\"]\")"]);
    let parked = site.rows("SELECT key, reason FROM branchsync.parked").await;
    assert_eq!(parked, ["(\"[\"\"2\"\"]\",behind_quarantine)"], "the later update of the quarantined key waits behind it, it is not applied out of order");
}

#[tokio::test]
async fn r7_a_newer_local_version_is_kept_and_an_older_incoming_update_is_recorded() {
    let site = Site::new("CREATE TABLE prices (id int PRIMARY KEY, price numeric);", &[]).await;
    // A cashier's commit here, never captured yet: it is a local version.
    site.c.batch_execute("INSERT INTO prices VALUES (1, 10), (2, 20)").await.unwrap();
    let d = desc("prices", &["id", "price"], &["id"]);
    let mut a = site.applier(super::DEFAULT_GROUP_BUDGET).await;
    let long_ago = T0 - 10_000_000_000_000; // years before the local commit
    let far_future = 4_000_000_000_000_000;
    a.apply_entries(&[
        cs(1, "branch1", long_ago, d.clone(), vec![upd(&["1", "11"])]),
        cs(2, "branch1", far_future, d.clone(), vec![upd(&["2", "22"])]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT id, price FROM prices ORDER BY id").await, ["(1,10)", "(2,22)"]);
    let c = site.rows("SELECT kind, winner_node, loser_node FROM branchsync.conflicts").await;
    assert_eq!(c, ["(update_update,main,branch1)"]);
}

#[tokio::test]
async fn r7_r8_apply_waits_for_a_cashiers_lock_then_retries_without_moving_progress() {
    let site = Site::new("CREATE TABLE stock (id int PRIMARY KEY, qty int);", &[]).await;
    site.c.batch_execute("INSERT INTO stock VALUES (1, 5)").await.unwrap();
    let d = desc("stock", &["id", "qty"], &["id"]);
    let entries = vec![cs(1, "branch1", 4_000_000_000_000_000, d, vec![upd(&["1", "4"])])];
    // A cashier holds the row.
    let cashier = site.pg.connect().await;
    cashier.batch_execute("BEGIN; SELECT * FROM stock WHERE id = 1 FOR UPDATE").await.unwrap();
    let err = site.run(&entries).await.expect_err("the row is locked");
    assert!(err.is_transient(), "a lock timeout is retried, not quarantined: {err}");
    assert_eq!(site.progress().await, 0, "progress did not move");
    assert!(site.rows("SELECT 1 FROM branchsync.conflicts").await.is_empty());
    // The cashier commits a change; the retry sees it (lock before deciding).
    cashier.batch_execute("UPDATE stock SET qty = 3 WHERE id = 1; COMMIT").await.unwrap();
    site.run(&entries).await.unwrap();
    assert_eq!(site.rows("SELECT qty FROM stock").await, ["(4)"], "the incoming change is newer and wins");
    assert_eq!(site.progress().await, 1);
    let c = site.rows("SELECT count(*) FROM branchsync.conflicts").await;
    assert_eq!(c, ["(0)"], "an incoming version newer than the local one is not a conflict it loses");
}

#[tokio::test]
async fn r10_generated_columns_are_computed_here_identities_keep_their_value_and_text_values_round_trip() {
    let site = Site::new(
        "CREATE TABLE lines (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty int, price numeric(10,2), \
         total numeric GENERATED ALWAYS AS (qty * price) STORED, at timestamptz, ratio float8, meta jsonb);",
        &[],
    )
    .await;
    // The author had no generated column in its description (pgoutput skips them).
    let d = desc("lines", &["id", "qty", "price", "at", "ratio", "meta"], &["id"]);
    let mut a = site.applier(super::DEFAULT_GROUP_BUDGET).await;
    a.apply_entries(&[cs(1, "branch1", T0, d, vec![ins(&["101", "3", "2.50", "2024-02-29 23:59:59.123456+00", "0.1", "{\"a\": [1, 2]}"])])]).await.unwrap();
    a.commit().await.unwrap();
    let r = site.rows("SELECT id, total, at, ratio, meta FROM lines").await;
    assert_eq!(r, ["(101,7.50,\"2024-02-29 23:59:59.123456+00\",0.1,\"{\"\"a\"\": [1, 2]}\")"]);
}

#[tokio::test]
async fn r11_a_keyless_update_or_delete_touches_exactly_one_matching_row_null_safe() {
    let site = Site::new("CREATE TABLE audit (event text, n int, payload json); ALTER TABLE audit REPLICA IDENTITY FULL;", &[]).await;
    site.c.batch_execute("INSERT INTO audit VALUES ('sale', NULL, '{\"x\": 1}'), ('sale', NULL, '{\"x\": 1}'), ('void', 2, NULL)").await.unwrap();
    let d = desc("audit", &["event", "n", "payload"], &[]);
    let mut a = site.applier(super::DEFAULT_GROUP_BUDGET).await;
    a.apply_entries(&[
        cs(1, "branch1", T0, d.clone(), vec![RowChange::Delete { table: 0, old: old_row(true, &[Some("sale"), None, Some("{\"x\": 1}")]) }]),
        cs(2, "branch1", T0 + 1, d.clone(), vec![RowChange::Update {
            table: 0,
            old: Some(old_row(true, &[Some("void"), Some("2"), None])),
            new: vec![text("void"), text("3"), Value::Null],
        }]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    let r = site.rows("SELECT event, n, payload::text FROM audit ORDER BY event").await;
    assert_eq!(r, ["(sale,,\"{\"\"x\"\": 1}\")", "(void,3,)"], "one of the two duplicates is gone, the NULL-holding row was found");
}

#[tokio::test]
async fn r13_row_versions_live_in_the_side_table_and_the_application_table_is_untouched() {
    let site = Site::new("CREATE TABLE customers (id int PRIMARY KEY, name text);", &[]).await;
    let columns_before = site.rows("SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'customers'::regclass AND attnum > 0").await;
    let d = desc("customers", &["id", "name"], &["id"]);
    let mut a = site.applier(super::DEFAULT_GROUP_BUDGET).await;
    a.apply_entries(&[
        cs(1, "branch1", T0 + 1, d.clone(), vec![ins(&["1", "ann"]), ins(&["2", "bob"])]),
        cs(2, "branch1", T0 + 2, d.clone(), vec![upd(&["1", "anne"])]),
        cs(3, "branch1", T0 + 3, d.clone(), vec![RowChange::Delete { table: 0, old: old_row(false, &[Some("2"), None]) }]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    let v = site.rows("SELECT tbl, key, stamp - 1700000000000000, node, deleted FROM branchsync.row_version ORDER BY key").await;
    assert_eq!(v, ["(public.customers,\"[\"\"1\"\"]\",2,branch1,f)", "(public.customers,\"[\"\"2\"\"]\",3,branch1,t)"]);
    let columns_after = site.rows("SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'customers'::regclass AND attnum > 0").await;
    assert_eq!(columns_before, columns_after);
    assert_eq!(site.rows("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'customers'::regclass").await, ["(0)"]);
}

#[tokio::test]
async fn columns_are_matched_by_name_and_a_column_missing_here_is_skipped() {
    let site = Site::new("CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, stock int DEFAULT 0);", &[]).await;
    // The author's table has another column order and a column this site lacks.
    let d = desc("products", &["legacy_code", "price", "name", "id"], &["id"]);
    let mut a = site.applier(super::DEFAULT_GROUP_BUDGET).await;
    a.apply_entries(&[cs(1, "branch1", T0, d, vec![ins(&["X-1", "9.90", "tea", "7"])])]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT id, name, price, stock FROM products").await, ["(7,tea,9.90,0)"]);
}
