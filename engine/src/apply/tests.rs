//! Tests of the apply rules (R5–R8, R10, R11, R13) against a real
//! PostgreSQL: hand-built ChangeSets go through [`Applier`] exactly as the
//! link hands them over, and each test checks what the database holds.
//!
//! Every test starts its own throwaway cluster with branchsync's state
//! schema ([`STATE_DDL`]) and its own application tables. Stamps are
//! microseconds since the Unix epoch; a local (non-branchsync) commit is a
//! local version stamped with its commit time (`track_commit_timestamp`), so
//! the tests pick incoming stamps far before or after "now".

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use branchsync_proto::{ChangeSetHeader, DdlChange, LogEntry, OldRow, RowChange, TableDef, TableDesc, Value, Verdict};
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;

use super::{Applier, ApplyConfig, ApplyStats, StreamState, DEFAULT_GROUP_BUDGET};
use crate::scope::Scope;
use crate::state::STATE_DDL;
use crate::test_utils::{eventually, PgCluster};
use crate::EngineError;

/// A stamp in November 2023: older than any commit the test makes here.
const T0: u64 = 1_700_000_000_000_000;
/// A stamp in 2096: newer than any commit the test makes here.
const FAR_FUTURE: u64 = 4_000_000_000_000_000;
/// The stream every test applies (the sender's name).
const STREAM: &str = "branch1";
/// Application name of the apply connection of [`STREAM`].
const APPLY_APP: &str = "branchsync apply branch1";

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_micros() as u64
}

/// One database that receives the stream `branch1`.
struct Site {
    pg: PgCluster,
    /// An ordinary (cashier's) session.
    c: tokio_postgres::Client,
    /// Outlives appliers, like the link's per-stream state.
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

    async fn applier_with(&self, budget: Duration, lock_timeout_ms: u64) -> Applier {
        self.applier_for(STREAM, self.state.clone(), budget, lock_timeout_ms).await
    }

    async fn applier_for(&self, stream: &str, state: Arc<StreamState>, budget: Duration, lock_timeout_ms: u64) -> Applier {
        let cfg = ApplyConfig { node: "main".into(), scope: Scope::new(&["public".to_string()], &[]).unwrap(), group_budget: budget, lock_timeout_ms, ddl: Default::default(), tables: Default::default(), role: crate::Role::Main, capture_progress: None, mark_key: vec![7; 32] };
        Applier::connect(&self.pg.url(), cfg, stream, state).await.unwrap().0
    }

    /// An applier as branch `branch1` has it for the main's relay stream.
    async fn branch_applier(&self) -> Applier {
        let cfg = ApplyConfig {
            node: "branch1".into(),
            scope: Scope::new(&["public".to_string()], &[]).unwrap(),
            group_budget: DEFAULT_GROUP_BUDGET,
            lock_timeout_ms: 200,
            ddl: Default::default(),
            tables: Default::default(),
            role: crate::Role::Branch,
            capture_progress: None,
            mark_key: vec![7; 32],
        };
        Applier::connect(&self.pg.url(), cfg, "main", Arc::new(StreamState::default())).await.unwrap().0
    }

    /// A main's applier for stream `branch1` under these table rules.
    async fn applier_with_rules(&self, rules: Vec<crate::conflict::TableRule>) -> Applier {
        let cfg = ApplyConfig {
            node: "main".into(),
            scope: Scope::new(&["public".to_string()], &[]).unwrap(),
            group_budget: DEFAULT_GROUP_BUDGET,
            lock_timeout_ms: 200,
            ddl: Default::default(),
            tables: crate::conflict::TableRules::new(rules).unwrap(),
            role: crate::Role::Main,
            capture_progress: None,
            mark_key: vec![7; 32],
        };
        Applier::connect(&self.pg.url(), cfg, STREAM, self.state.clone())
            .await
            .unwrap()
            .0
    }

    /// An applier with the default group budget and a 200 ms lock timeout.
    async fn applier(&self) -> Applier {
        self.applier_with(DEFAULT_GROUP_BUDGET, 200).await
    }

    /// One apply session as the link runs it: a fresh applier, the stream
    /// resent from its durable progress in one message, the result of
    /// [`Applier::run`].
    async fn session(&self, budget: Duration, entries: &[LogEntry]) -> Result<ApplyStats, EngineError> {
        let a = self.applier_with(budget, 200).await;
        let from = a.committed();
        let (tx, rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop_rx) = watch::channel(false);
        tx.send(wire(entries.iter().filter(|e| e.pos > from))).unwrap();
        drop(tx);
        a.run(rx, stop_rx, watch::channel(0).0).await
    }

    /// [`Site::session`] with each entry in a message of its own, as the
    /// link hands over entries that trickle in.
    async fn session_one_by_one(&self, budget: Duration, entries: &[LogEntry]) -> Result<ApplyStats, EngineError> {
        let a = self.applier_with(budget, 200).await;
        let from = a.committed();
        let (tx, rx) = mpsc::unbounded_channel();
        let (_stop_tx, stop_rx) = watch::channel(false);
        for e in entries.iter().filter(|e| e.pos > from) {
            tx.send(wire([e])).unwrap();
        }
        drop(tx);
        a.run(rx, stop_rx, watch::channel(0).0).await
    }

    async fn run(&self, entries: &[LogEntry]) -> Result<ApplyStats, EngineError> {
        self.session(DEFAULT_GROUP_BUDGET, entries).await
    }

    /// Each row of `sql` as its record text, e.g. `(1,a)`.
    async fn rows(&self, sql: &str) -> Vec<String> {
        self.c.query(&format!("SELECT t::text FROM ({sql}) t"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    async fn progress(&self) -> u64 {
        crate::state::read_progress(&self.c, STREAM).await.unwrap()
    }
}

/// Entries as the link hands them to apply.
fn wire<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> Vec<branchsync_proto::WireEntry> {
    entries.into_iter().map(|e| branchsync_proto::WireEntry::of(e).unwrap()).collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

fn desc(name: &str, cols: &[&str], key: &[&str]) -> TableDesc {
    TableDesc::from(TableDef {
        schema: "public".into(),
        name: name.into(),
        columns: cols.iter().map(|c| c.to_string()).collect(),
        key: cols.iter().map(|c| key.contains(c)).collect(),
        identity_full: key.is_empty(),
    })
}

/// A whole ChangeSet in one fragment (part 0, last) at stream position `pos`.
fn cs(pos: u64, author: &str, stamp: u64, table: TableDesc, changes: Vec<RowChange>) -> LogEntry {
    cs_tables(pos, author, stamp, vec![table], changes)
}

fn cs_tables(pos: u64, author: &str, stamp: u64, tables: Vec<TableDesc>, changes: Vec<RowChange>) -> LogEntry {
    let header = ChangeSetHeader { author: author.into(), author_index: 1, system_id: 9, commit_lsn: 0x10_0000 + pos, commit_ts_us: stamp as i64, stamp, seen_main_ts: 0 };
    LogEntry { pos, header, part: 0, last: true, tables, changes, relay_ts_us: 0, echo_as_sent: false }
}

fn vals(vs: &[&str]) -> Vec<Value> {
    vs.iter().map(|v| text(v)).collect()
}

fn ins(vs: &[&str]) -> RowChange {
    RowChange::Insert { table: 0, new: vals(vs) }
}

fn upd(vs: &[&str]) -> RowChange {
    RowChange::Update { table: 0, old: None, new: vals(vs) }
}

fn old_row(full: bool, vs: &[Option<&str>]) -> OldRow {
    OldRow { full, values: vs.iter().map(|v| v.map(text).unwrap_or(Value::Null)).collect() }
}

fn opt_vals(vs: &[Option<&str>]) -> Vec<Value> {
    vs.iter().map(|v| v.map(text).unwrap_or(Value::Null)).collect()
}

/// R5: with `synchronous_commit = off` as the database default and a WAL
/// writer that sleeps 10 s, only a commit the applier itself made
/// synchronous is flushed by the time `committed()` moves.
#[tokio::test]
async fn r5_an_apply_commit_is_flushed_before_progress_moves_even_when_the_database_defaults_to_async_commit() {
    let site = Site::new(
        "CREATE TABLE items (id int PRIMARY KEY, name text); ALTER DATABASE postgres SET synchronous_commit = off;",
        &["wal_writer_delay = 10000ms", "wal_writer_flush_after = 0", "autovacuum = off"],
    )
    .await;
    // The control case: the setting is really off for new sessions, and a
    // plain commit stays unflushed long enough to see it.
    let probe = site.pg.connect().await;
    assert_eq!(probe.query_one("SHOW synchronous_commit", &[]).await.unwrap().get::<_, String>(0), "off");
    probe.batch_execute("CREATE TABLE probe (x int); INSERT INTO probe VALUES (1)").await.unwrap();
    let r = probe.query_one("SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()", &[]).await.unwrap();
    assert!(!r.get::<_, bool>(0), "the control case: an asynchronous commit leaves WAL unflushed");

    let mut a = site.applier().await;
    assert_eq!(a.committed(), 0);
    a.apply_entries(&[cs(1, "branch1", T0, desc("items", &["id", "name"], &["id"]), vec![ins(&["1", "a"])])]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(a.committed(), 1);
    let r = site.c.query_one("SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()", &[]).await.unwrap();
    assert!(r.get::<_, bool>(0), "the apply commit (with its progress) was flushed before it counted as applied");
    assert_eq!(site.rows("SELECT id, name FROM items").await, ["(1,a)"]);
    assert_eq!(site.progress().await, 1);
}

/// Issue 13: application code that runs inside apply turns
/// `synchronous_commit` off: an `ALWAYS` trigger for its session, a
/// deferred constraint trigger at the commit itself (after apply's own
/// `SET LOCAL`). The apply commit is flushed all the same.
#[tokio::test]
async fn an_apply_commit_is_flushed_even_when_a_trigger_or_a_deferred_trigger_turns_synchronous_commit_off() {
    let site = Site::new(
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE FUNCTION async_now() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM set_config('synchronous_commit', 'off', TG_ARGV[0]::boolean); RETURN NEW; END $$;
         CREATE TRIGGER items_async BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION async_now('false');
         ALTER TABLE items ENABLE ALWAYS TRIGGER items_async;
         CREATE CONSTRAINT TRIGGER items_async_at_commit AFTER INSERT ON items DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW EXECUTE FUNCTION async_now('true');
         ALTER TABLE items ENABLE ALWAYS TRIGGER items_async_at_commit;",
        &["wal_writer_delay = 10000ms", "wal_writer_flush_after = 0", "autovacuum = off"],
    )
    .await;
    let mut a = site.applier().await;
    let d = desc("items", &["id", "name"], &["id"]);
    for n in 1..=3 {
        a.apply_entries(&[cs(n, "branch1", T0 + n, d.clone(), vec![ins(&[&n.to_string(), "a"])])]).await.unwrap();
        a.commit().await.unwrap();
        assert_eq!(a.committed(), n);
        let r = site.c.query_one("SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()", &[]).await.unwrap();
        assert!(r.get::<_, bool>(0), "apply commit {n} was flushed before it counted as applied");
    }
    assert_eq!(site.rows("SELECT id, name FROM items ORDER BY id").await, ["(1,a)", "(2,a)", "(3,a)"]);
}

/// R6: one author's consecutive ChangeSets share a transaction (and its
/// progress row); a change of author always starts a new one.
#[tokio::test]
async fn r6_consecutive_changesets_of_one_author_share_a_transaction_and_authors_never_mix() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let d = desc("items", &["id", "name"], &["id"]);
    let entries = vec![
        cs(1, "branch1", T0 + 1, d.clone(), vec![ins(&["1", "a"])]),
        cs(2, "branch1", T0 + 2, d.clone(), vec![ins(&["2", "b"])]),
        cs(3, "branch2", T0 + 3, d.clone(), vec![ins(&["3", "c"])]),
        cs(4, "branch1", T0 + 4, d.clone(), vec![upd(&["2", "B"]), ins(&["4", "d"])]),
        cs(5, "branch1", T0 + 5, d.clone(), vec![ins(&["5", "e"])]),
    ];
    // A budget far longer than the test: only the author splits groups.
    let stats = site.session(Duration::from_secs(60), &entries).await.unwrap();
    assert_eq!(stats.changesets, 5);
    assert_eq!(stats.transactions, 3, "{{1,2}}, {{3}}, {{4,5}}: {stats:?}");
    let txn = |id: i32| format!("(SELECT xmin::text FROM items WHERE id = {id})");
    let same = site
        .rows(&format!(
            "SELECT {a} = {b}, {a} = {c}, {c} = {d}, {b} = {d}, {d} = {e}",
            a = txn(1),
            b = txn(2),
            c = txn(3),
            d = txn(4),
            e = txn(5)
        ))
        .await;
    // Row 2 was rewritten by ChangeSet 4, so its xmin is ChangeSet 4's.
    assert_eq!(same, ["(f,f,f,t,t)"], "1 and 2 shared a transaction until 4 updated row 2; branch2's 3 is alone; 4 and 5 share one");
    assert_eq!(site.rows("SELECT id, name FROM items ORDER BY id").await, ["(1,a)", "(2,B)", "(3,c)", "(4,d)", "(5,e)"]);
    assert_eq!(site.progress().await, 5);
}

/// R6: the same grouping, seen on rows that are not rewritten later: the
/// first two ChangeSets of one author share an xmin.
#[tokio::test]
async fn r6_one_authors_changesets_in_one_transaction_have_one_xmin() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let d = desc("items", &["id", "name"], &["id"]);
    let entries = vec![
        cs(1, "branch1", T0 + 1, d.clone(), vec![ins(&["1", "a"])]),
        cs(2, "branch1", T0 + 2, d.clone(), vec![ins(&["2", "b"])]),
        cs(3, "branch1", T0 + 3, d.clone(), vec![upd(&["1", "A"])]),
        cs(4, "branch2", T0 + 4, d.clone(), vec![ins(&["4", "d"])]),
    ];
    let stats = site.session(Duration::from_secs(60), &entries).await.unwrap();
    assert_eq!((stats.changesets, stats.transactions), (4, 2), "{stats:?}");
    let xmins = site.rows("SELECT id, (xmin::text = (SELECT xmin::text FROM items WHERE id = 1)) AS same_txn FROM items ORDER BY id").await;
    assert_eq!(xmins, ["(1,t)", "(2,t)", "(4,f)"], "branch1's three ChangeSets in one transaction, branch2's in its own");
}

/// R6: a group older than its budget is committed before the next
/// ChangeSet starts, so an apply transaction never holds locks for long.
#[tokio::test]
async fn r6_the_group_budget_splits_a_long_group() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let d = desc("items", &["id", "name"], &["id"]);
    let e = |pos: u64| cs(pos, "branch1", T0 + pos, d.clone(), vec![ins(&[&pos.to_string(), "x"])]);

    // A zero budget: every ChangeSet is its own transaction.
    let mut a = site.applier_with(Duration::ZERO, 200).await;
    a.apply_entries(&[e(1), e(2), e(3)]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(a.stats.transactions, 3);
    assert_eq!(site.rows("SELECT count(DISTINCT xmin::text) FROM items WHERE id <= 3").await, ["(3)"]);
    drop(a); // one session per replication origin at a time

    // A 1 s budget: 4 and 5 share a transaction; 6 arrives after the budget
    // ran out and starts a new one, which 7 joins.
    let mut a = site.applier_with(Duration::from_secs(1), 200).await;
    a.apply_entries(&[e(4), e(5)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    a.apply_entries(&[e(6), e(7)]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(a.stats.transactions, 2);
    let same = site.rows("SELECT a.id, b.id FROM items a JOIN items b ON a.xmin::text = b.xmin::text AND a.id < b.id WHERE a.id >= 4 ORDER BY 1, 2").await;
    assert_eq!(same, ["(4,5)", "(6,7)"]);
    assert_eq!(site.progress().await, 7);
}

/// R6, R8: a group fails on a data error as a whole; it is rolled back and
/// replayed carefully in place (no new session needed), so the good
/// ChangeSets apply, the bad change is quarantined, a later change of its
/// key queues behind it, and progress reaches the end.
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
    // One session: the group fails as a whole, is rolled back and replayed
    // change by change; the session ends with everything decided.
    let stats = site.session(Duration::from_secs(60), &entries).await.expect("careful replay in place gets past the bad change");
    assert_eq!((stats.committed_pos, stats.quarantined, stats.parked), (4, 1, 1), "{stats:?}");
    assert_eq!(site.rows("SELECT id, qty FROM items ORDER BY id").await, ["(1,5)", "(3,7)"], "the first and third ChangeSets applied");
    assert_eq!(site.progress().await, 4);
    let q = site.rows("SELECT kind, key, loser_node, remote_version->>'qty' FROM branchsync.conflicts").await;
    assert_eq!(q, ["(quarantined,\"[\"\"2\"\"]\",branch1,-1)"]);
    let detail = site.rows("SELECT detail FROM branchsync.conflicts").await;
    assert!(detail[0].contains("23514"), "the quarantine says why: {detail:?}");
    let parked = site.rows("SELECT key, reason FROM branchsync.parked").await;
    assert_eq!(parked, ["(\"[\"\"2\"\"]\",behind_quarantine)"], "the later update of the quarantined key waits behind it, it is not applied out of order");
    // Nothing is applied twice by another resend.
    site.run(&entries).await.unwrap();
    assert_eq!(site.rows("SELECT count(*) FROM branchsync.conflicts").await, ["(1)"]);
    assert_eq!(site.rows("SELECT id, qty FROM items ORDER BY id").await, ["(1,5)", "(3,7)"]);
}

/// R7: a cashier's update committed here after the row was applied, and
/// after the incoming change's stamp, is a local version even though
/// capture never logged it and the side table still holds the older
/// applied version: the older incoming update loses and is recorded; a
/// newer one (that had not seen the cashier's version either) wins, and the
/// cashier's version it overwrote is recorded.
#[tokio::test]
async fn r7_a_newer_local_version_is_kept_and_an_older_incoming_update_is_recorded() {
    let site = Site::new("CREATE TABLE prices (id int PRIMARY KEY, price numeric);", &[]).await;
    let d = desc("prices", &["id", "price"], &["id"]);
    let mut a = site.applier().await;
    a.apply_entries(&[cs(1, "branch1", T0, d.clone(), vec![ins(&["1", "10"]), ins(&["2", "20"])])]).await.unwrap();
    a.commit().await.unwrap();
    // The cashier's commits here, never captured yet.
    site.c.batch_execute("UPDATE prices SET price = price + 5").await.unwrap();
    let before_local = T0 + 1; // newer than the side table's version, older than the cashier's commit
    a.apply_entries(&[
        cs(2, "branch1", before_local, d.clone(), vec![upd(&["1", "11"])]),
        cs(3, "branch1", FAR_FUTURE, d.clone(), vec![upd(&["2", "22"])]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT id, price FROM prices ORDER BY id").await, ["(1,15)", "(2,22)"]);
    let c = site.rows("SELECT kind, key, winner_node, loser_node, local_version->>'price', remote_version->>'price' FROM branchsync.conflicts").await;
    assert_eq!(
        c,
        ["(update_update,\"[\"\"1\"\"]\",main,branch1,15,11)", "(update_update,\"[\"\"2\"\"]\",branch1,main,25,22)"],
        "the losing incoming update is recorded, and so is the local version a newer incoming one overwrote, each with both versions"
    );
    assert_eq!(site.progress().await, 3, "a discarded change is still applied progress");
}

/// R7, per column: a column keeps its version when another column of the
/// row is written apart. The main's cashier changes `b` (a local version);
/// branch1, which had seen that, changes `a`; branch2, offline since before
/// both, changes `b` with a stamp between the cashier's commit and
/// branch1's. `b` was last written by the cashier, so branch2's value is
/// the later one and wins, whichever shop arrives first, with one conflict
/// (decided against the row's last writer, it lost when branch1 came first).
#[tokio::test]
async fn r7_a_clash_is_decided_against_the_columns_last_writer_whichever_shop_arrives_first() {
    for branch2_first in [false, true] {
        let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, a text, b text);", &[]).await;
        let d = desc("items", &["id", "a", "b"], &["id"]);
        let mut a = site.applier().await;
        a.apply_entries(&[cs(1, "branch3", T0, d.clone(), vec![ins(&["1", "a0", "b0"])])]).await.unwrap();
        a.commit().await.unwrap();
        site.c.batch_execute("UPDATE items SET b = 'bm'").await.unwrap();
        let cashier = now_us();
        let update = |pos: u64, author: &str, stamp: u64, old: [&str; 3], new: [&str; 3]| {
            cs(pos, author, stamp, d.clone(), vec![RowChange::Update { table: 0, old: Some(old_row(true, &old.map(Some))), new: vals(&new) }])
        };
        let branch1 = |pos| update(pos, "branch1", cashier + 2_000_000, ["1", "a0", "bm"], ["1", "a1", "bm"]);
        let branch2 = |pos| update(pos, "branch2", cashier + 1_000_000, ["1", "a0", "b0"], ["1", "a0", "b2"]);
        let order = if branch2_first { [branch2(2), branch1(3)] } else { [branch1(2), branch2(3)] };
        for e in order {
            a.apply_entries(&[e]).await.unwrap();
            a.commit().await.unwrap();
        }
        assert_eq!(site.rows("SELECT a, b FROM items").await, ["(a1,b2)"], "branch2 first: {branch2_first}");
        assert_eq!(
            site.rows("SELECT winner_node, loser_node, detail LIKE '%column(s) b %' FROM branchsync.conflicts").await,
            ["(branch2,main,t)"],
            "branch2 first: {branch2_first}"
        );
    }
}

/// R7: apply locks before it decides. A cashier updates the row and holds
/// it; the apply waits for the lock; the cashier commits after the
/// incoming change's stamp. The apply must decide on the cashier's
/// committed version (keep it), not on the version it saw before waiting.
#[tokio::test]
async fn r7_a_cashiers_commit_while_apply_waits_for_the_row_is_never_overwritten_unseen() {
    let site = Site::new("CREATE TABLE stock (id int PRIMARY KEY, qty int);", &[]).await;
    let d = desc("stock", &["id", "qty"], &["id"]);
    // The row as applied earlier from branch1 (an old version).
    site.run(&[cs(1, "branch1", T0, d.clone(), vec![ins(&["1", "5"])])]).await.unwrap();
    // The cashier changes the row and has not committed yet.
    let cashier = site.pg.connect().await;
    cashier.batch_execute("BEGIN; UPDATE stock SET qty = 3 WHERE id = 1").await.unwrap();
    // Stamped now: newer than the applied version, older than the cashier's commit.
    let incoming = cs(2, "branch1", now_us(), d.clone(), vec![upd(&["1", "4"])]);

    let a = site.applier_with(DEFAULT_GROUP_BUDGET, 20_000).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    tx.send(wire([&incoming])).unwrap();
    drop(tx);
    let watcher = site.pg.connect().await;
    let commit_later = async {
        eventually("the apply waits for the cashier's row lock", Duration::from_secs(10), || async {
            let r = watcher
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'", &[&APPLY_APP])
                .await
                .unwrap();
            (r.get::<_, i64>(0) == 1).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        cashier.batch_execute("COMMIT").await.unwrap();
    };
    let (applied, ()) = tokio::join!(a.run(rx, stop_rx, watch::channel(0).0), commit_later);
    applied.unwrap();
    assert_eq!(site.rows("SELECT qty FROM stock").await, ["(3)"], "the cashier's later commit is kept, not overwritten by an older incoming update");
    let c = site.rows("SELECT kind, winner_node, loser_node, local_version->>'qty', remote_version->>'qty' FROM branchsync.conflicts").await;
    assert_eq!(c, ["(update_update,main,branch1,3,4)"]);
    assert_eq!(site.progress().await, 2);
}

/// R7: the same at the main, where two streams apply at once: the apply of
/// branch2 waits for the row that branch1's apply transaction holds, and
/// must then decide against branch1's version that committed meanwhile,
/// not against the row version it read before waiting. Otherwise branch2's
/// older update overwrites branch1's newer one here while every other site
/// keeps branch1's: the sites diverge.
#[tokio::test]
async fn r7_an_apply_waiting_behind_another_streams_apply_decides_on_the_version_that_committed() {
    let site = Site::new("CREATE TABLE stock (id int PRIMARY KEY, qty int);", &[]).await;
    let d = desc("stock", &["id", "qty"], &["id"]);
    site.run(&[cs(1, "branch1", T0, d.clone(), vec![ins(&["1", "5"])])]).await.unwrap();
    // branch1's newer update is applied and not committed yet.
    let mut first = site.applier().await;
    first.apply_entries(&[cs(2, "branch1", T0 + 100, d.clone(), vec![upd(&["1", "7"])])]).await.unwrap();
    // branch2's older update (newer than the version before) arrives on its own stream.
    let second = site.applier_for("branch2", Arc::new(StreamState::default()), DEFAULT_GROUP_BUDGET, 20_000).await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    tx.send(wire([&cs(1, "branch2", T0 + 50, d.clone(), vec![upd(&["1", "6"])])])).unwrap();
    drop(tx);
    let watcher = site.pg.connect().await;
    let commit_first = async {
        eventually("branch2's apply waits for the row branch1's apply holds", Duration::from_secs(10), || async {
            let r = watcher
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'branchsync apply branch2' AND wait_event_type = 'Lock'", &[])
                .await
                .unwrap();
            (r.get::<_, i64>(0) == 1).then_some(())
        })
        .await;
        first.commit().await.unwrap();
    };
    let (applied, ()) = tokio::join!(second.run(rx, stop_rx, watch::channel(0).0), commit_first);
    applied.unwrap();
    assert_eq!(site.rows("SELECT qty FROM stock").await, ["(7)"], "branch1's newer update (stamp T0+100) is kept; branch2's (T0+50) loses as it does everywhere");
    let v = site.rows("SELECT stamp - 1700000000000000, node FROM branchsync.row_version").await;
    assert_eq!(v, ["(100,branch1)"]);
    let c = site.rows("SELECT kind, loser_node, remote_version->>'qty' FROM branchsync.conflicts").await;
    assert_eq!(c, ["(update_update,branch2,6)"]);
}

/// R8: a row lock held by a cashier makes an apply statement give up after
/// its short `lock_timeout` with a transient error (55P03) that rolled
/// everything back and moved no progress; the apply session retries such a
/// transaction in place, so once the lock is gone the ChangeSet applies
/// exactly once, and a resend of it changes nothing.
#[tokio::test]
async fn r8_a_lock_timeout_is_transient_moves_no_progress_and_the_retry_applies_exactly_once() {
    let site = Site::new("CREATE TABLE stock (id int PRIMARY KEY, qty int); CREATE TABLE movements (item int, delta int);", &[]).await;
    site.c.batch_execute("INSERT INTO stock VALUES (1, 5)").await.unwrap();
    let tables = vec![desc("movements", &["item", "delta"], &[]), desc("stock", &["id", "qty"], &["id"])];
    let entries = vec![cs_tables(
        1,
        "branch1",
        FAR_FUTURE,
        tables,
        vec![
            RowChange::Insert { table: 0, new: vals(&["1", "-1"]) },
            RowChange::Update { table: 1, old: Some(OldRow { full: true, values: vals(&["1", "5"]) }), new: vals(&["1", "4"]) },
        ],
    )];
    // A cashier holds the row.
    let cashier = site.pg.connect().await;
    cashier.batch_execute("BEGIN; SELECT * FROM stock WHERE id = 1 FOR UPDATE").await.unwrap();
    let started = Instant::now();
    let mut once = site.applier().await;
    let err = tokio::time::timeout(Duration::from_secs(10), once.apply_entries(&entries))
        .await
        .expect("the apply gave up after its lock timeout, it did not wait for the cashier")
        .expect_err("the row is locked");
    drop(once);
    assert!(started.elapsed() < Duration::from_secs(5), "the apply gave up after its lock timeout, it did not wait for the cashier: {:?}", started.elapsed());
    assert_eq!(err.sqlstate(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{err}");
    assert!(err.is_transient(), "a lock timeout is retried, not quarantined: {err}");
    assert_eq!(site.progress().await, 0, "progress did not move");
    assert!(site.rows("SELECT * FROM movements").await.is_empty(), "the insert before the lock was rolled back");
    assert!(site.rows("SELECT 1 FROM branchsync.conflicts UNION ALL SELECT 1 FROM branchsync.parked").await.is_empty(), "nothing quarantined or parked");
    assert_eq!(site.rows("SELECT qty FROM stock").await, ["(5)"]);

    // The session retries in place while the cashier still holds the row.
    let release = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cashier.batch_execute("ROLLBACK").await.unwrap();
    };
    let (stats, ()) = tokio::join!(site.run(&entries), release);
    let stats = stats.unwrap();
    assert_eq!((stats.changesets, stats.committed_pos), (1, 1));
    assert_eq!(site.rows("SELECT qty FROM stock").await, ["(4)"]);
    assert_eq!(site.rows("SELECT item, delta FROM movements").await, ["(1,-1)"]);
    assert_eq!(site.progress().await, 1);

    // The sender resends everything (it never got the ack): skipped.
    let mut a = site.applier().await;
    assert_eq!(a.committed(), 1);
    a.apply_entries(&entries).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT item, delta FROM movements").await, ["(1,-1)"], "applied exactly once");
    assert!(site.rows("SELECT 1 FROM branchsync.conflicts").await.is_empty());
}

/// R8 for schema changes: the main's `ALTER TABLE` meets a lock held at the
/// branch a little longer than apply's lock timeout (as autovacuum holds a
/// table pgbench -i or an ERP import has just filled). It is a passing
/// condition: the group rolls back and is retried until the lock is gone,
/// and the column is added. Recording it as a failed schema change would
/// leave the branch without the column (or, as CI saw, without the primary
/// key) for good.
#[tokio::test]
async fn r8_a_schema_change_that_meets_a_lock_is_retried_not_recorded_as_failed() {
    let site = Site::new("CREATE ROLE erp; CREATE TABLE stock (id int PRIMARY KEY, qty int); ALTER TABLE stock OWNER TO erp;", &[]).await;
    let stock = desc("stock", &["id", "qty"], &["id"]);
    let mut alter = cs(1, "main", FAR_FUTURE, stock.clone(), vec![RowChange::Ddl(DdlChange {
        statements: vec!["ALTER TABLE stock ADD COLUMN note text".into()],
        search_path: "public".into(),
        role: "erp".into(),
        tag: "ALTER TABLE".into(),
    })]);
    alter.tables.clear();
    alter.header.author_index = 0;
    let mut sale = cs(2, "main", FAR_FUTURE, stock, vec![ins(&["1", "5"])]);
    sale.header.author_index = 0;
    // Autovacuum's lock: SHARE UPDATE EXCLUSIVE, which ALTER TABLE waits for.
    let vacuum = site.pg.connect().await;
    vacuum.batch_execute("BEGIN; LOCK TABLE stock IN SHARE UPDATE EXCLUSIVE MODE").await.unwrap();
    let a = site.branch_applier().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    tx.send(wire([&alter, &sale])).unwrap();
    drop(tx);
    let release = async {
        // Several lock timeouts (200 ms each) go by first.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        vacuum.batch_execute("COMMIT").await.unwrap();
    };
    let (stats, ()) = tokio::join!(a.run(rx, stop_rx, watch::channel(0).0), release);
    let stats = stats.expect("the stream went on once the lock was gone");
    assert_eq!((stats.ddl_applied, stats.ddl_failed, stats.committed_pos), (1, 0, 2), "{stats:?}");
    assert!(site.rows("SELECT kind FROM branchsync.conflicts").await.is_empty(), "nothing recorded: the schema change was not dropped");
    assert_eq!(site.rows("SELECT id, qty, note FROM stock").await, ["(1,5,)"], "the column is there and the sale after it applied");
}

/// The relay interleaves every shop's ChangeSets. A branch applies them
/// under one origin, so those of many authors share a transaction: with an
/// origin per author it committed once per sale whenever the author
/// changed, and with 50 shops selling it fell behind (the fan-out
/// benchmark: a sale took 23 s from one shop to another). Every row is
/// still an applied one (origin not 0), which is all a branch tells apart.
#[tokio::test]
async fn a_branch_applies_the_sales_of_many_shops_in_one_transaction() {
    let site = Site::new("CREATE TABLE orders (id int PRIMARY KEY, shop text)", &[]).await;
    let orders = desc("orders", &["id", "shop"], &["id"]);
    let authors = ["main", "branch2", "branch3", "branch2", "main", "branch4"];
    let entries: Vec<LogEntry> = authors
        .iter()
        .enumerate()
        .map(|(n, author)| {
            let mut e = cs(n as u64 + 1, author, T0 + n as u64, orders.clone(), vec![ins(&[&(n + 1).to_string(), author])]);
            e.header.author_index = if *author == "main" { 0 } else { author.trim_start_matches("branch").parse().unwrap() };
            e
        })
        .collect();
    let a = site.branch_applier().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    tx.send(wire(entries.iter())).unwrap();
    drop(tx);
    let stats = a.run(rx, stop_rx, watch::channel(0).0).await.unwrap();
    assert_eq!((stats.committed_pos, stats.changesets, stats.transactions), (6, 6, 1), "six authors' sales in one commit: {stats:?}");
    let origins = site
        .rows("SELECT DISTINCT o.roname FROM orders t, pg_xact_commit_timestamp_origin(t.xmin) x JOIN pg_replication_origin o ON o.roident = x.roident")
        .await;
    assert_eq!(origins, [format!("({})", crate::state::RELAY_ORIGIN)]);
}

/// The main's verdict about a change of branch2 travels in the relay to
/// every branch, but only branch2 may obey it. Random convergence (seed
/// 7236548406582373247) saw why: the main decided branch1's update of an
/// item it had deleted ("stays deleted", nothing written, no row to lock)
/// while branch2's insert of that item committed at the main first; the
/// relay then carried branch2's insert, then the verdict "deleted", and
/// branch2 deleted the row the main and branch1 kept. Here branch1 holds a
/// row; another node's verdict "deleted" leaves it alone, its own deletes it.
#[tokio::test]
async fn a_branch_obeys_only_verdicts_about_its_own_changes() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, tag text)", &[]).await;
    site.c.batch_execute("INSERT INTO items VALUES (2, 'branch2-37'), (3, 'branch1-5')").await.unwrap();
    let items = desc("items", &["id", "tag"], &["id"]);
    let deleted = |id: &str| RowChange::Verdict(Verdict { table: 0, key: vec![text(id), Value::Null], row: None, for_commit_ts: now_us() as i64 + 1_000_000, to: None });
    let mut others = cs(1, "branch2", FAR_FUTURE, items.clone(), vec![deleted("2")]);
    others.header.author_index = 2;
    let own = cs(2, "branch1", FAR_FUTURE, items, vec![deleted("3")]);
    let a = site.branch_applier().await;
    let (tx, rx) = mpsc::unbounded_channel();
    let (_stop_tx, stop_rx) = watch::channel(false);
    tx.send(wire([&others, &own])).unwrap();
    drop(tx);
    let stats = a.run(rx, stop_rx, watch::channel(0).0).await.unwrap();
    assert_eq!((stats.committed_pos, stats.verdicts), (2, 1), "{stats:?}");
    assert_eq!(site.rows("SELECT id, tag FROM items ORDER BY id").await, ["(2,branch2-37)"], "another node's verdict changed nothing here; this node's own was obeyed");
}

/// R7 for a row that is not there: the main decides a branch's update of a
/// deleted row under the lock of its tombstone, and another stream's insert
/// of that key takes the same lock. Without it, random convergence seed
/// 7236548406582373247: branch1's update of an item the main had deleted
/// was decided "stays deleted" while branch2's new insert of the item was
/// committing; the insert reached the relay first, then the verdict told
/// branch1 the row was gone, and branch1 dropped a row the main kept.
/// Either order is right as long as decision and insert do not overlap:
/// the insert waits for the decision (and follows it in the relay), or the
/// decision waits for the insert and is made against its row.
#[tokio::test]
async fn r7_an_update_of_a_deleted_row_and_another_streams_insert_of_its_key_are_decided_one_after_the_other() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, tag text); ALTER TABLE items REPLICA IDENTITY FULL;", &[]).await;
    let items = desc("items", &["id", "tag"], &["id"]);
    let gone = |id: &str| RowChange::Delete { table: 0, old: old_row(true, &[Some(id), Some("a")]) };
    // branch1 inserted items 2 and 3 and deleted them: both have tombstones.
    site.run(&[
        cs(1, "branch1", T0, items.clone(), vec![ins(&["2", "a"]), ins(&["3", "a"])]),
        cs(2, "branch1", T0 + 10, items.clone(), vec![gone("2"), gone("3")]),
    ])
    .await
    .unwrap();
    assert_eq!(site.rows("SELECT key, deleted FROM branchsync.row_version ORDER BY key").await.len(), 2);
    // branch2 had seen the item as "a" and changes it; branch3 inserts it anew.
    let update = |id: &str, pos: u64| cs(pos, "branch2", T0 + 20, items.clone(), vec![RowChange::Update { table: 0, old: Some(old_row(true, &[Some(id), Some("a")])), new: vals(&[id, "b"]) }]);
    let insert = |id: &str, pos: u64| cs(pos, "branch3", T0 + 30, items.clone(), vec![ins(&[id, "new"])]);
    let watcher = site.pg.connect().await;
    // Runs one entry of `stream` until its apply connection waits for a
    // lock (it must not finish before); returns the run, to finish later.
    let run_until_it_waits = |stream: &'static str, e: LogEntry| {
        let (site, watcher) = (&site, &watcher);
        async move {
            let a = site.applier_for(stream, Arc::new(StreamState::default()), DEFAULT_GROUP_BUDGET, 20_000).await;
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(wire([&e])).unwrap();
            drop(tx);
            let mut run = Box::pin(async move {
                let (_stop_tx, stop_rx) = watch::channel(false);
                a.run(rx, stop_rx, watch::channel(0).0).await
            });
            let app = format!("branchsync apply {stream}");
            let what = format!("{app} waits for a lock");
            let waits = eventually(&what, Duration::from_secs(10), || async {
                let r = watcher.query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'", &[&app]).await.unwrap();
                (r.get::<_, i64>(0) == 1).then_some(())
            });
            tokio::select! {
                r = &mut run => panic!("{stream}'s change was applied without waiting: {r:?}"),
                () = waits => {}
            }
            run
        }
    };

    // Item 2: the decision holds the tombstone; the insert waits for it.
    let mut decider = site.applier_for("branch2", Arc::new(StreamState::default()), DEFAULT_GROUP_BUDGET, 20_000).await;
    decider.apply_entries(&[update("2", 1)]).await.unwrap();
    let inserted = run_until_it_waits("branch3", insert("2", 1)).await;
    decider.commit().await.unwrap();
    drop(decider);
    inserted.await.unwrap();
    let c = site.rows("SELECT kind, rule, loser_node FROM branchsync.conflicts WHERE key = json_build_array('2')::text").await;
    assert_eq!(c, ["(update_delete,delete_wins,branch2)"], "decided against the tombstone");
    let order = site
        .rows(
            "SELECT (SELECT pg_xact_commit_timestamp(xmin) FROM branchsync.conflicts WHERE key = json_build_array('2')::text) \
                    < (SELECT pg_xact_commit_timestamp(xmin) FROM items WHERE id = 2)",
        )
        .await;
    assert_eq!(order, ["(t)"], "the verdict \"deleted\" commits before the insert, so it reaches branch2 before the new row");

    // Item 3: the insert holds the tombstone; the decision waits and is made
    // against the row that committed meanwhile.
    let mut inserter = site.applier_for("branch3", Arc::new(StreamState::default()), DEFAULT_GROUP_BUDGET, 20_000).await;
    inserter.apply_entries(&[insert("3", 2)]).await.unwrap();
    inserter.drain().await.unwrap();
    let decided = run_until_it_waits("branch2", update("3", 2)).await;
    inserter.commit().await.unwrap();
    decided.await.unwrap();
    let c = site.rows("SELECT kind, loser_node FROM branchsync.conflicts WHERE key = json_build_array('3')::text").await;
    assert_eq!(c, ["(update_update,branch2)"], "decided against branch3's row (the newer stamp), not the tombstone");
    assert_eq!(site.rows("SELECT id, tag FROM items ORDER BY id").await, ["(2,new)", "(3,new)"]);
}

/// R7 under lww, whatever the order of arrival: two branches set a column
/// to the same value (stamps 100 and 300) while a third set another (stamp
/// 200). The second of the equal changes writes nothing, but the row is
/// now its version: left the first's, the third change (200 > 100) won
/// when the equal ones came first in that order, and lost when they came
/// the other way round. The latest stamp wins both ways.
#[tokio::test]
async fn r7_under_lww_a_change_equal_to_the_row_still_makes_the_row_its_version() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, tag text); INSERT INTO items VALUES (1, 'x'), (2, 'x');", &[]).await;
    let items = desc("items", &["id", "tag"], &["id"]);
    let set = |pos: u64, author: &str, stamp: u64, id: &str, to: &str| {
        cs(pos, author, FAR_FUTURE + stamp, items.clone(), vec![RowChange::Update { table: 0, old: Some(old_row(true, &[Some(id), Some("x")])), new: vals(&[id, to]) }])
    };
    site.run(&[
        // Item 1: the equal changes in stamp order, then the one between them.
        set(1, "branch1", 100, "1", "y"),
        set(2, "branch2", 300, "1", "y"),
        set(3, "branch3", 200, "1", "z"),
        // Item 2: the equal changes the other way round.
        set(4, "branch2", 300, "2", "y"),
        set(5, "branch1", 100, "2", "y"),
        set(6, "branch3", 200, "2", "z"),
    ])
    .await
    .unwrap();
    assert_eq!(site.rows("SELECT id, tag FROM items ORDER BY id").await, ["(1,y)", "(2,y)"], "the latest stamp (300) wins in either order");
    let c = site.rows("SELECT key, kind, winner_node, loser_node FROM branchsync.conflicts ORDER BY key").await;
    assert_eq!(c, ["(\"[\"\"1\"\"]\",update_update,branch2,branch3)", "(\"[\"\"2\"\"]\",update_update,branch2,branch3)"]);
}

/// The main's SQL paths against the pure merge, row by row: three shops'
/// offline changes to the same rows (repeated keys within one group;
/// counters; no-op updates) arrive interleaved, in groups of random size,
/// under each rule, and go through apply as the link hands them over (the
/// pipeline's folded deltas, compare-and-set batches, decisions one by one).
/// Every row must end as [`crate::conflict::merge::model`] merging the same
/// changes in the same order says, with as many conflicts recorded.
#[tokio::test]
async fn r7_the_mains_sql_paths_decide_every_row_as_the_pure_merge_does() {
    use crate::conflict::merge::model::{self, COLS};
    use crate::conflict::{ConflictRule, Held, TableRule};
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    use rand::{Rng, SeedableRng};

    const CASES: usize = 48;
    const KEYS: usize = 3;
    let seed: u64 = std::env::var("BRANCHSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (BRANCHSYNC_SEED={seed} repeats this run)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seed32 = [0u8; 32];
    rng.fill(&mut seed32);
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &seed32));
    let strategy = model::authors(&["branch1", "branch2", "branch3"], KEYS, 5, T0 + 1_000);
    let rules = [ConflictRule::Lww, ConflictRule::MainWins, ConflictRule::BranchWins];
    let mut schema = String::new();
    let mut cases = Vec::new();
    for n in 0..CASES {
        schema.push_str(&format!("CREATE TABLE rows_{n} (id int PRIMARY KEY, a text, b text, c text, qty int);"));
        let per_author = strategy.new_tree(&mut runner).expect("changes").current();
        let picks: Vec<usize> = (0..16).map(|_| rng.gen_range(0..3)).collect();
        cases.push((rules[n % rules.len()], model::interleave(&per_author, &picks)));
    }
    let site = Site::new(&schema, &[]).await;
    let table_rules = (0..CASES).map(|n| TableRule { pattern: format!("rows_{n}"), rule: cases[n].0, delta: vec!["qty".into()], ..Default::default() }).collect();
    let mut a = site.applier_with_rules(table_rules).await;
    let row_of = |id: usize, r: &std::collections::BTreeMap<&'static str, String>| -> Vec<String> {
        std::iter::once((id + 1).to_string()).chain(COLS.iter().map(|c| r[c].clone())).collect()
    };
    let mut pos = 0;
    for (n, (rule, arrivals)) in cases.iter().enumerate() {
        let d = desc(&format!("rows_{n}"), &["id", "a", "b", "c", "qty"], &["id"]);
        // The rows, inserted by a fourth shop every other one has seen.
        pos += 1;
        let initial: Vec<RowChange> = (0..KEYS).map(|k| RowChange::Insert { table: 0, new: row_of(k, &model::initial_row()).iter().map(|v| text(v)).collect() }).collect();
        a.apply_entries(&[cs(pos, "branch0", T0, d.clone(), initial)]).await.unwrap();
        a.commit().await.unwrap();
        let mut mains = vec![model::written(Held { node: "branch0".into(), stamp: T0, inserted_by: "branch0".into() }, false); KEYS];
        let mut conflicts = 0;
        let mut left = arrivals.as_slice();
        while !left.is_empty() {
            let size = rng.gen_range(1..=6).min(left.len());
            let (group, rest) = left.split_at(size);
            left = rest;
            let entries: Vec<LogEntry> = group
                .iter()
                .map(|ch| {
                    pos += 1;
                    let old = old_row(true, &row_of(ch.key, &ch.base).iter().map(|v| Some(v.as_str())).collect::<Vec<_>>());
                    let new = row_of(ch.key, &ch.new).iter().map(|v| text(v)).collect();
                    cs(pos, ch.author, ch.stamp, d.clone(), vec![RowChange::Update { table: 0, old: Some(old), new }])
                })
                .collect();
            a.apply_entries(&entries).await.unwrap();
            a.commit().await.unwrap();
            for ch in group {
                let main = &mut mains[ch.key];
                // The model's "seen" is the column's version being the
                // author's own, as here: no change carries a relay position.
                conflicts += main.apply(ch, *rule).conflicts;
            }
        }
        let expected: Vec<String> = mains.iter().enumerate().map(|(k, m)| format!("({})", row_of(k, &m.row).join(","))).collect();
        let got = site.rows(&format!("SELECT id, a, b, c, qty FROM rows_{n} ORDER BY id")).await;
        assert_eq!(got, expected, "seed {seed}, table rows_{n} under {rule:?}: {arrivals:#?}");
        let recorded = site.rows(&format!("SELECT count(*) FROM branchsync.conflicts WHERE tbl = 'public.rows_{n}'")).await;
        let listed = site.rows(&format!("SELECT key, winner_node, loser_node, detail FROM branchsync.conflicts WHERE tbl = 'public.rows_{n}' ORDER BY id")).await;
        assert_eq!(recorded, [format!("({conflicts})")], "seed {seed}, table rows_{n} under {rule:?}: the conflicts recorded {listed:#?} for {arrivals:#?}");
    }
}

/// R16 in the main's pipeline: ChangeSets that only change delta columns
/// (and insert) are sent without waiting for each statement's answer, in
/// one group. A row one of them finds missing cannot be added to: the
/// group rolls back and is replayed change by change, where the missing
/// row is decided (recorded) and every other change is applied exactly
/// once. Rows that were local versions keep them on record; a delta never
/// makes a row its author's.
#[tokio::test]
async fn r16_queued_delta_changes_add_up_once_and_a_missing_row_replays_the_group_change_by_change() {
    let site = Site::new("CREATE TABLE stock (id int PRIMARY KEY, qty int, name text); CREATE TABLE moves (id int PRIMARY KEY, qty int);", &[]).await;
    site.c.batch_execute("INSERT INTO stock VALUES (1, 10, 'tea'), (2, 20, 'rice')").await.unwrap();
    let stock = desc("stock", &["id", "qty", "name"], &["id"]);
    let moves = desc("moves", &["id", "qty"], &["id"]);
    let add = |id: &str, name: &str, from: i32, by: i32| {
        let (b, a) = (from.to_string(), (from + by).to_string());
        RowChange::Update { table: 0, old: Some(old_row(true, &[Some(id), Some(b.as_str()), Some(name)])), new: vals(&[id, &a, name]) }
    };
    let mv = |id: &str, qty: &str| RowChange::Insert { table: 1, new: vals(&[id, qty]) };
    let tables = vec![stock.clone(), moves.clone()];
    let entries = [
        cs_tables(1, "branch1", T0 + 1, tables.clone(), vec![add("1", "tea", 10, -3), mv("1", "-3")]),
        cs_tables(2, "branch1", T0 + 2, tables.clone(), vec![add("1", "tea", 7, -2), add("2", "rice", 20, 5), mv("2", "3")]),
        cs_tables(3, "branch1", T0 + 3, tables.clone(), vec![add("3", "salt", 1, 1), mv("3", "1")]),
        cs_tables(4, "branch1", T0 + 4, tables.clone(), vec![add("2", "rice", 25, 1), mv("4", "1")]),
    ];
    // One session of branch1's stream with these entries in one message.
    let session = |entries: Vec<LogEntry>| {
        let site = &site;
        async move {
            let rule = crate::conflict::TableRule { pattern: "stock".into(), delta: vec!["qty".into()], ..Default::default() };
            let a = site.applier_with_rules(vec![rule]).await;
            let (tx, rx) = mpsc::unbounded_channel();
            tx.send(wire(&entries)).unwrap();
            drop(tx);
            let (_stop_tx, stop_rx) = watch::channel(false);
            a.run(rx, stop_rx, watch::channel(0).0).await.unwrap()
        }
    };
    let stats = session(entries.to_vec()).await;
    assert_eq!(stats.committed_pos, 4, "{stats:?}");
    let careful_until = site.state.careful_until.load(std::sync::atomic::Ordering::SeqCst);
    assert!(careful_until >= 3, "the group met the missing row when its answers came, and was replayed change by change up to it (careful until {careful_until})");
    assert_eq!(site.rows("SELECT id, qty FROM stock ORDER BY id").await, ["(1,5)", "(2,26)"], "every difference added once");
    assert_eq!(site.rows("SELECT id FROM moves ORDER BY id").await, ["(1)", "(2)", "(3)", "(4)"], "every insert of the group applied once");
    assert_eq!(site.rows("SELECT kind FROM branchsync.conflicts").await, ["(update_missing)"], "the change of the missing row was decided");
    assert_eq!(
        site.rows("SELECT key, node <> 'branch1' FROM branchsync.row_version WHERE tbl = 'public.stock' ORDER BY key").await,
        ["(\"[\"\"1\"\"]\",t)", "(\"[\"\"2\"\"]\",t)"],
        "the local rows keep their own version on record; the deltas did not make them branch1's"
    );

    // Without a missing row the group goes through as it came.
    let more = [
        cs_tables(5, "branch1", T0 + 5, tables.clone(), vec![add("1", "tea", 5, 1), mv("5", "1")]),
        cs_tables(6, "branch1", T0 + 6, tables.clone(), vec![add("1", "tea", 6, 1), add("2", "rice", 26, -6)]),
    ];
    let stats = session(more.to_vec()).await;
    assert_eq!(stats.committed_pos, 6, "{stats:?}");
    assert_eq!(site.state.careful_until.load(std::sync::atomic::Ordering::SeqCst), careful_until, "nothing replayed change by change");
    assert_eq!(site.rows("SELECT id, qty FROM stock ORDER BY id").await, ["(1,7)", "(2,20)"]);
}

/// R10: a local generated column is computed here even when the author
/// sent a value for it; a `GENERATED ALWAYS` identity keeps the author's
/// value; values of every type round-trip exactly as text, whatever the
/// receiving database's own DateStyle, TimeZone and float digits are.
#[tokio::test]
async fn r10_generated_columns_are_computed_here_identities_keep_their_value_and_text_values_round_trip() {
    let site = Site::new(
        "CREATE TABLE lines (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty int, price numeric(10,2), \
         total numeric GENERATED ALWAYS AS (qty * price) STORED, at timestamptz, day date, span interval, \
         ratio float8, tiny float8, single float4, amount numeric, doc json, meta jsonb, raw bytea);
         ALTER DATABASE postgres SET TimeZone = 'Asia/Kathmandu';
         ALTER DATABASE postgres SET DateStyle = 'SQL, DMY';
         ALTER DATABASE postgres SET extra_float_digits = -15;
         ALTER DATABASE postgres SET IntervalStyle = 'sql_standard';",
        &[],
    )
    .await;
    // Values as an author with the pinned settings prints them.
    let sent: [(&str, &str); 13] = [
        ("id", "101"),
        ("qty", "3"),
        ("price", "2.50"),
        ("at", "2024-02-29 23:59:59.123456+00"),
        ("day", "2024-02-03"),
        ("span", "1 day 02:03:04.5"),
        ("ratio", "0.30000000000000004"),
        ("tiny", "5e-324"),
        ("single", "3.4028235e+38"),
        ("amount", "-12345678901234567890.123456789000"),
        ("doc", "{\"b\": 1,   \"a\": [1, 2.50]}"),
        ("meta", "{\"a\": [1, 2], \"b\": {\"c\": null}}"),
        ("raw", "\\x00ff10"),
    ];
    // The author's table had a plain `total` column with another value: skipped here.
    let mut cols: Vec<&str> = sent.iter().map(|(c, _)| *c).collect();
    cols.insert(4, "total");
    let mut row: Vec<&str> = sent.iter().map(|(_, v)| *v).collect();
    row.insert(4, "999");
    let d = desc("lines", &cols, &["id"]);
    let mut a = site.applier().await;
    a.apply_entries(&[cs(1, "branch1", T0, d.clone(), vec![ins(&row)])]).await.unwrap();
    a.commit().await.unwrap();

    // Read back in a session pinned like branchsync's.
    let reader = crate::pg::connect(&site.pg.url(), "reader").await.unwrap();
    let select: Vec<String> = sent.iter().map(|(c, _)| format!("{c}::text")).collect();
    let r = reader.client.query_one(&format!("SELECT total::text, {} FROM lines", select.join(", ")), &[]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "7.50", "the generated column was computed here from the row");
    for (i, (c, v)) in sent.iter().enumerate() {
        assert_eq!(r.get::<_, String>(i + 1), *v, "column {c} round-trips exactly");
    }

    // An update of the identity-keyed row recomputes the generated column;
    // the identity is not rewritten.
    a.apply_entries(&[cs(2, "branch1", T0 + 1, d, vec![upd(&row.iter().enumerate().map(|(i, v)| if i == 1 { "4" } else { *v }).collect::<Vec<_>>())])])
        .await
        .unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT id, qty, total FROM lines").await, ["(101,4,10.00)"]);
    assert!(site.rows("SELECT 1 FROM branchsync.conflicts").await.is_empty());
}

/// R11: in a table without a key, duplicates are a multiset: an incoming
/// DELETE or UPDATE touches exactly one row equal to its old row, NULLs
/// match NULLs, and json (which has no `=`) is compared as text.
#[tokio::test]
async fn r11_a_keyless_update_or_delete_touches_exactly_one_matching_row_null_safe() {
    let site = Site::new("CREATE TABLE audit (event text, n int, payload json); ALTER TABLE audit REPLICA IDENTITY FULL;", &[]).await;
    site.c
        .batch_execute(
            "INSERT INTO audit VALUES ('sale', NULL, '{\"x\": 1}'), ('sale', NULL, '{\"x\": 1}'), ('sale', NULL, '{\"x\": 1}'), \
             ('sale', NULL, '{\"x\":1}'), ('void', 2, NULL)",
        )
        .await
        .unwrap();
    let d = desc("audit", &["event", "n", "payload"], &[]);
    let sale = [Some("sale"), None, Some("{\"x\": 1}")];
    let mut a = site.applier().await;
    a.apply_entries(&[
        cs(1, "branch1", T0, d.clone(), vec![RowChange::Delete { table: 0, old: old_row(true, &sale) }]),
        cs(2, "branch1", T0 + 1, d.clone(), vec![RowChange::Update { table: 0, old: Some(old_row(true, &sale)), new: opt_vals(&[Some("sale"), Some("7"), Some("{\"x\": 1}")]) }]),
        cs(3, "branch1", T0 + 2, d.clone(), vec![RowChange::Update { table: 0, old: Some(old_row(true, &[Some("void"), Some("2"), None])), new: opt_vals(&[Some("void"), Some("3"), None]) }]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    let r = site.rows("SELECT event, n, payload::text, count(*) FROM audit GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").await;
    assert_eq!(
        r,
        [
            "(sale,7,\"{\"\"x\"\": 1}\",1)",
            "(sale,,\"{\"\"x\"\": 1}\",1)",
            "(sale,,\"{\"\"x\"\":1}\",1)",
            "(void,3,,1)",
        ],
        "of three equal rows one was deleted and one updated; the row whose json text differs was not touched; the NULL-holding row was found"
    );
    assert!(site.rows("SELECT 1 FROM branchsync.conflicts").await.is_empty(), "no conflict detection on multisets");
    assert!(site.rows("SELECT 1 FROM branchsync.row_version").await.is_empty(), "keyless rows have no versions");
}

/// R13: every applied row's version (stamp, author; a tombstone for a
/// delete) is in `branchsync.row_version` under (table, key), written with
/// the row; the application table gets no column and no trigger.
#[tokio::test]
async fn r13_row_versions_live_in_the_side_tables_and_the_application_table_is_untouched() {
    let site = Site::new(
        "CREATE TABLE customers (id int PRIMARY KEY, name text);",
        &[],
    )
    .await;
    let shape = "SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum) FROM pg_attribute \
                 WHERE attrelid = 'customers'::regclass AND attnum > 0 AND NOT attisdropped";
    let columns_before = site.rows(shape).await;
    let d = desc("customers", &["id", "name"], &["id"]);
    let mut a = site.applier().await;
    a.apply_entries(&[
        cs(
            1,
            "branch1",
            T0 + 1,
            d.clone(),
            vec![ins(&["1", "ann"]), ins(&["2", "bob"]), ins(&["3", "cy"])],
        ),
        cs(2, "branch2", T0 + 2, d.clone(), vec![upd(&["1", "anne"])]),
        cs(
            3,
            "branch1",
            T0 + 3,
            d.clone(),
            vec![RowChange::Delete {
                table: 0,
                old: old_row(false, &[Some("2"), None]),
            }],
        ),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    // The update and the delete have a version row each; the three inserts
    // share one packed record.
    let v = site.rows("SELECT tbl, key, stamp - 1700000000000000, node, deleted FROM branchsync.row_version ORDER BY key").await;
    assert_eq!(
        v,
        [
            "(public.customers,\"[\"\"1\"\"]\",2,branch2,f)",
            "(public.customers,\"[\"\"2\"\"]\",3,branch1,t)"
        ]
    );
    let packed = site
        .c
        .query_one("SELECT tbl, node, keys, ARRAY(SELECT s - 1700000000000000 FROM unnest(stamps) s), ARRAY(SELECT t - 1700000000000000 FROM unnest(ts) t) FROM branchsync.insert_versions", &[])
        .await
        .unwrap();
    let packed: (String, String, Vec<String>, Vec<i64>, Vec<i64>) = (
        packed.get(0),
        packed.get(1),
        packed.get(2),
        packed.get(3),
        packed.get(4),
    );
    assert_eq!(
        packed,
        (
            "public.customers".into(),
            "branch1".into(),
            vec!["[\"1\"]".into(), "[\"2\"]".into(), "[\"3\"]".into()],
            vec![1, 1, 1],
            vec![1, 1, 1]
        )
    );
    assert_eq!(
        site.rows("SELECT id, name FROM customers ORDER BY id")
            .await,
        ["(1,anne)", "(3,cy)"]
    );
    // Written in the apply transaction itself, whose id the record keeps.
    let same_txn = site.rows("SELECT (SELECT xmin::text::int8 FROM customers WHERE id = 3) = (SELECT xid32 FROM branchsync.insert_versions)").await;
    assert_eq!(same_txn, ["(t)"]);
    assert_eq!(
        site.rows(shape).await,
        columns_before,
        "no column added to the application table"
    );
    assert_eq!(site.rows(shape).await, ["(\"id:integer,name:text\")"]);
    assert_eq!(
        site.rows("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'customers'::regclass")
            .await,
        ["(0)"]
    );
}

/// R13 at the main: the version of a row the pipeline inserted is read
/// from its packed record. An update made without seeing the row is
/// decided against the insert's stamp: an older one loses, a newer one
/// wins. Once the retention drops the record, the row is the baseline
/// every peer has seen.
#[tokio::test]
async fn r13_a_packed_insert_version_decides_a_concurrent_update_until_the_retention_drops_it() {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let d = desc("items", &["id", "name"], &["id"]);
    let mut a = site.applier().await;
    a.apply_entries(&[cs(
        1,
        "branch1",
        T0 + 100,
        d.clone(),
        vec![ins(&["1", "a"]), ins(&["2", "b"]), ins(&["3", "c"])],
    )])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT (SELECT count(*) FROM branchsync.row_version), (SELECT count(*) FROM branchsync.insert_versions)").await, ["(0,1)"]);
    // branch2 never saw the rows (seen_main_ts 0): its updates are concurrent.
    a.apply_entries(&[
        cs(2, "branch2", T0 + 50, d.clone(), vec![upd(&["1", "older"])]),
        cs(
            3,
            "branch2",
            T0 + 200,
            d.clone(),
            vec![upd(&["2", "newer"])],
        ),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT id, name FROM items ORDER BY id").await,
        ["(1,a)", "(2,newer)", "(3,c)"]
    );
    assert_eq!(
        site.rows(
            "SELECT kind, key, winner_node, loser_node FROM branchsync.conflicts ORDER BY id"
        )
        .await,
        [
            "(update_update,\"[\"\"1\"\"]\",branch1,branch2)",
            "(update_update,\"[\"\"2\"\"]\",branch2,branch1)"
        ],
        "each update was decided against the packed version of the insert"
    );
    // The retention passes: the packed record goes, row 3 is the baseline.
    let dropped = crate::state::drop_expired_versions(&site.c, now_us() as i64 + 1_000_000)
        .await
        .unwrap();
    assert_eq!(dropped, (0, 1));
    a.apply_entries(&[cs(
        4,
        "branch2",
        T0 + 50,
        d.clone(),
        vec![upd(&["3", "after the retention"])],
    )])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT name FROM items WHERE id = 3").await,
        ["(\"after the retention\")"]
    );
    assert_eq!(
        site.rows("SELECT count(*) FROM branchsync.conflicts").await,
        ["(2)"],
        "no conflict against a row older than the retention"
    );
}

/// R13 at the main: which version speaks for a row inserted by the
/// pipeline. A tombstone left by an earlier life of the key does not (the
/// packed insert is newer); an update of the row later in the same apply
/// transaction does (its `row_version` row is newer than the record).
#[tokio::test]
async fn r13_a_packed_insert_version_loses_to_a_later_update_in_its_transaction_and_beats_an_old_tombstone(
) {
    let site = Site::new("CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let d = desc("items", &["id", "name"], &["id"]);
    // Row 1 was deleted by branch2 with a stamp later than everything below.
    site.c
        .execute(
            "INSERT INTO branchsync.row_version (tbl, key, stamp, node, deleted, ts, local_ts) VALUES ('public.items', '[\"1\"]', $1, 'branch2', true, $1, $2)",
            &[&((T0 + 900) as i64), &(now_us() as i64 - 1_000_000)],
        )
        .await
        .unwrap();
    let mut a = site.applier_with(Duration::from_secs(60), 200).await;
    a.apply_entries(&[
        cs(
            1,
            "branch1",
            T0 + 100,
            d.clone(),
            vec![ins(&["1", "a"]), ins(&["2", "b"])],
        ),
        cs(2, "branch1", T0 + 400, d.clone(), vec![upd(&["2", "B"])]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT count(DISTINCT xmin::text) FROM items")
            .await,
        ["(1)"],
        "one apply transaction inserted both rows and updated row 2"
    );
    // branch3's updates, made without seeing either row, at T0 + 300.
    a.apply_entries(&[cs(
        3,
        "branch3",
        T0 + 300,
        d.clone(),
        vec![upd(&["1", "x"]), upd(&["2", "x"])],
    )])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT id, name FROM items ORDER BY id").await,
        ["(1,x)", "(2,B)"],
        "row 1: the insert (T0+100), not the old tombstone (T0+900), is its version; row 2: the update (T0+400), not the insert"
    );
}

/// The main packs insert versions only where it can: a table under
/// `branch_wins` keeps a version row per inserted row (the owner must
/// outlive later local changes), and a database initialised by an earlier
/// release, without `branchsync.insert_versions`, gets the row versions it
/// always had.
#[tokio::test]
async fn r13_branch_wins_tables_and_databases_without_packed_versions_keep_a_version_row_per_insert(
) {
    let site = Site::new("CREATE TABLE owned (id int PRIMARY KEY, name text); CREATE TABLE items (id int PRIMARY KEY, name text);", &[]).await;
    let owned = desc("owned", &["id", "name"], &["id"]);
    let items = desc("items", &["id", "name"], &["id"]);
    let rule = crate::conflict::TableRule {
        pattern: "owned".into(),
        rule: crate::conflict::ConflictRule::BranchWins,
        ..Default::default()
    };
    let mut a = site.applier_with_rules(vec![rule]).await;
    a.apply_entries(&[cs_tables(
        1,
        "branch1",
        T0 + 1,
        vec![owned.clone(), items.clone()],
        vec![
            ins(&["1", "a"]),
            RowChange::Insert {
                table: 1,
                new: vals(&["1", "a"]),
            },
        ],
    )])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT tbl, inserted_by FROM branchsync.row_version")
            .await,
        ["(public.owned,branch1)"]
    );
    assert_eq!(
        site.rows("SELECT tbl FROM branchsync.insert_versions")
            .await,
        ["(public.items)"]
    );
    drop(a);
    site.c
        .batch_execute("DROP TABLE branchsync.insert_versions")
        .await
        .unwrap();
    let mut a = site.applier().await;
    a.apply_entries(&[cs(
        2,
        "branch1",
        T0 + 2,
        items.clone(),
        vec![ins(&["2", "b"])],
    )])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT tbl, key FROM branchsync.row_version ORDER BY tbl, key")
            .await,
        [
            "(public.items,\"[\"\"2\"\"]\")",
            "(public.owned,\"[\"\"1\"\"]\")"
        ]
    );
}

/// Columns are matched by name: another column order at the author, and a
/// column this site lacks (skipped), for inserts and updates alike.
#[tokio::test]
async fn columns_are_matched_by_name_and_a_column_missing_here_is_skipped() {
    let site = Site::new("CREATE TABLE products (id int PRIMARY KEY, name text, price numeric, stock int DEFAULT 0);", &[]).await;
    let d = desc("products", &["legacy_code", "price", "name", "id"], &["id"]);
    let mut a = site.applier().await;
    a.apply_entries(&[
        cs(1, "branch1", T0, d.clone(), vec![ins(&["X-1", "9.90", "tea", "7"]), ins(&["X-2", "1.00", "cup", "8"])]),
        cs(2, "branch1", T0 + 1, d.clone(), vec![upd(&["X-3", "10.50", "green tea", "7"])]),
    ])
    .await
    .unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT id, name, price, stock FROM products ORDER BY id").await, ["(7,\"green tea\",10.50,0)", "(8,cup,1.00,0)"]);
    // The skipped column is on record once, without a record per row, and
    // nothing else is.
    assert_eq!(
        site.rows("SELECT kind, tbl, detail LIKE '%legacy_code%' FROM branchsync.conflicts").await,
        ["(columns_skipped,public.products,t)"]
    );
}

/// R9 at the main, with the parents checked on the distinct foreign-key
/// values of a grouped batch first: in a group of sales, the one line whose
/// order is missing is parked, every other line applies, and the line comes
/// out of the parked table once its order arrives.
#[tokio::test]
async fn a_line_without_its_order_in_a_group_of_sales_is_parked_and_the_rest_apply() {
    let site = Site::new(
        "CREATE TABLE orders (id int PRIMARY KEY, shop text);
         CREATE TABLE lines (id int PRIMARY KEY, order_id int REFERENCES orders(id), qty int);",
        &[],
    )
    .await;
    let orders = desc("orders", &["id", "shop"], &["id"]);
    let lines = desc("lines", &["id", "order_id", "qty"], &["id"]);
    let sale = |pos: u64, order: &str, line: &str| {
        let changes = vec![RowChange::Insert { table: 0, new: vals(&[order, "b1"]) }, RowChange::Insert { table: 1, new: vals(&[line, order, "1"]) }];
        cs_tables(pos, "branch1", pos, vec![orders.clone(), lines.clone()], changes)
    };
    let mut entries: Vec<LogEntry> = (1..=20).map(|i| sale(i, &i.to_string(), &(100 + i).to_string())).collect();
    // A line of order 999, which this stream never sends.
    entries.push(cs(21, "branch1", 21, lines.clone(), vec![ins(&["121", "999", "1"])]));
    entries.extend((22..=30).map(|i| sale(i, &i.to_string(), &(100 + i).to_string())));
    let stats = site.run(&entries).await.unwrap();
    assert_eq!(stats.parked, 1, "{stats:?}");
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, ["(29)"], "every other line applied");
    assert_eq!(site.rows("SELECT key, reason FROM branchsync.parked").await, ["(\"[\"\"121\"\"]\",orphan)"]);
    // A group in which every order is there parks nothing (the check on
    // distinct values finds no missing parent).
    let more: Vec<LogEntry> = (31..=40).map(|i| sale(i, &i.to_string(), &(100 + i).to_string())).collect();
    let all: Vec<LogEntry> = entries.iter().cloned().chain(more).collect();
    let stats = site.run(&all).await.unwrap();
    assert_eq!(stats.parked, 1, "still only the one line: {stats:?}");
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, ["(39)"]);
}

/// R8: sales (an order, its line, the stock row they all update), each in
/// a message of its own as they trickle in, while a cashier keeps taking
/// the stock row's lock for longer than apply's lock timeout: transactions
/// are rolled back and retried in place, again and again, groups commit in
/// between, and every sale must be there exactly once at the end. (Found by
/// the demo under load: a retry that failed again while re-applying the
/// entries of earlier messages kept only those it had reached, and the
/// sales after them were skipped while progress moved on.)
#[tokio::test]
async fn r8_retries_under_lock_contention_during_a_catch_up_lose_no_sale() {
    let site = Site::new(
        "CREATE TABLE orders (id int PRIMARY KEY, shop text); CREATE TABLE lines (id int PRIMARY KEY, order_id int, qty int); \
         CREATE TABLE stock (id int PRIMARY KEY, qty int); INSERT INTO stock SELECT g, 1000000 FROM generate_series(0, 9) g;",
        &[],
    )
    .await;
    let tables = vec![desc("orders", &["id", "shop"], &["id"]), desc("lines", &["id", "order_id", "qty"], &["id"]), desc("stock", &["id", "qty"], &["id"])];
    const SALES: u64 = 400;
    let entries: Vec<LogEntry> = (1..=SALES)
        .map(|n| {
            let s = n.to_string();
            cs_tables(n, "branch1", FAR_FUTURE + n, tables.clone(), vec![
                RowChange::Insert { table: 0, new: vals(&[&s, "branch1"]) },
                RowChange::Insert { table: 1, new: vals(&[&s, &s, "1"]) },
                RowChange::Update { table: 2, old: None, new: vals(&[&(n % 10).to_string(), &(1_000_000 - n).to_string()]) },
            ])
        })
        .collect();
    // A cashier takes one stock row, then another one that apply's open
    // transaction holds (so the cashier waits for it), and keeps both for
    // 600 ms: apply's lock timeout (200 ms) rolls its transaction back, the
    // cashier gets the second row, and the retry fails again on that row,
    // while it applies its earlier entries again.
    let cashier = site.pg.connect().await;
    let (done_tx, mut done_rx) = watch::channel(false);
    let busy = async {
        let mut turns = 0;
        while !*done_rx.borrow() {
            let (a, b) = ((turns * 3) % 10, (turns * 3 + 5) % 10);
            cashier.batch_execute(&format!("BEGIN; SELECT * FROM stock WHERE id = {a} FOR UPDATE")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            cashier.batch_execute(&format!("SELECT * FROM stock WHERE id = {b} FOR UPDATE")).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            cashier.batch_execute("COMMIT").await.unwrap();
            turns += 1;
            let _ = tokio::time::timeout(Duration::from_millis(50), done_rx.changed()).await;
        }
        turns
    };
    let apply = async {
        let r = site.session_one_by_one(DEFAULT_GROUP_BUDGET, &entries).await;
        let _ = done_tx.send(true);
        r
    };
    let (stats, turns) = tokio::join!(apply, busy);
    let stats = stats.unwrap();
    println!("{turns} turns of the cashier; {stats:?}");
    assert!(turns >= 2, "the cashier held the row while apply ran");
    assert_eq!(stats.committed_pos, SALES);
    assert_eq!(site.rows("SELECT count(*), count(DISTINCT id) FROM orders").await, [format!("({SALES},{SALES})")], "every sale once");
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, [format!("({SALES})")]);
    let missing = site.rows(&format!("SELECT g FROM generate_series(1, {SALES}) g WHERE NOT EXISTS (SELECT 1 FROM orders WHERE id = g)")).await;
    assert!(missing.is_empty(), "sales lost: {missing:?}");
    assert_eq!(site.progress().await, SALES);
}

/// At a branch, the main's echo of a change made here that equals the row
/// here is not written again (no new row version, no WAL to decode), yet
/// the row counts as decided: the next change another shop makes to it is
/// written. An echo that differs is written; a row changed here again after
/// the echoed change stays the shop's until its own echo comes back.
#[tokio::test]
async fn at_a_branch_an_echo_equal_to_the_row_is_left_unwritten_and_the_row_is_settled() {
    let site = Site::new("CREATE TABLE customers (id int PRIMARY KEY, name text);", &[]).await;
    // Three sales made here, then row 2 changed here again.
    site.c.batch_execute("INSERT INTO customers VALUES (1, 'ann'), (2, 'bob'), (3, 'cy')").await.unwrap();
    let commit_us = |id: i32| {
        let c = &site.c;
        async move {
            c.query_one("SELECT (extract(epoch from pg_xact_commit_timestamp(xmin)) * 1000000)::int8, xmin::text FROM customers WHERE id = $1", &[&id])
                .await
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                .unwrap()
        }
    };
    let (sold_us, sold_xmin) = commit_us(1).await;
    site.c.batch_execute("UPDATE customers SET name = 'bobby' WHERE id = 2").await.unwrap();
    let d = desc("customers", &["id", "name"], &["id"]);
    let mut a = site.branch_applier().await;
    // The echo of the three sales: the main kept rows 1 and 2 as sold here
    // and changed row 3 (its decision).
    let mut echo = cs(1, "branch1", sold_us as u64, d.clone(), vec![ins(&["1", "ann"]), ins(&["2", "bob"]), ins(&["3", "CY"])]);
    echo.header.author_index = 1;
    a.apply_entries(&[echo]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(commit_us(1).await.1, sold_xmin, "the echo equal to row 1 was not written");
    assert_eq!(site.rows("SELECT id, name FROM customers ORDER BY id").await, ["(1,ann)", "(2,bobby)", "(3,CY)"], "row 3 took the main's decision; row 2's newer change stays");
    assert_eq!(site.rows("SELECT through_ts FROM branchsync.echo_settled").await, [format!("({sold_us})")]);
    // Another shop's changes, relayed by the main after the echo.
    a.apply_entries(&[cs(2, "branch2", now_us(), d.clone(), vec![upd(&["1", "anne"]), upd(&["2", "robert"])])]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(
        site.rows("SELECT id, name FROM customers ORDER BY id").await,
        ["(1,anne)", "(2,bobby)", "(3,CY)"],
        "row 1 was decided (its echo came back) and takes the other shop's change; row 2's own change is still on its way to the main"
    );
}

/// At a branch, an echo the main marks as written exactly as sent is taken
/// without its rows: nothing is compared or written (here its rows were
/// altered on the way, and still nothing changes), the settled mark moves
/// to its commit time, and another shop's insert of the same key that comes
/// after it in the stream, in the same apply transaction, is written over
/// the row it decided (the mark is written before it, in stream order). The
/// same echo to a branch whose database has no settled mark is compared
/// and written as before.
#[tokio::test]
async fn at_a_branch_an_echo_written_as_sent_is_taken_without_its_rows_and_settles_them_in_stream_order() {
    let site = Site::new("CREATE TABLE customers (id int PRIMARY KEY, name text);", &[]).await;
    site.c.batch_execute("INSERT INTO customers VALUES (1, 'ann'), (2, 'bob')").await.unwrap();
    let (sold_us, sold_xmin): (i64, String) = {
        let r = site.c.query_one("SELECT (extract(epoch from pg_xact_commit_timestamp(xmin)) * 1000000)::int8, xmin::text FROM customers WHERE id = 2", &[]).await.unwrap();
        (r.get(0), r.get(1))
    };
    let d = desc("customers", &["id", "name"], &["id"]);
    let mut echo = cs(1, "branch1", sold_us as u64, d.clone(), vec![ins(&["1", "altered"]), ins(&["2", "altered"])]);
    echo.echo_as_sent = true;
    let mut theirs = cs(2, "branch2", now_us(), d.clone(), vec![ins(&["1", "anne"])]);
    theirs.header.author_index = 2;
    let mut a = site.branch_applier().await;
    a.apply_entries(&[echo, theirs]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(site.rows("SELECT id, name FROM customers ORDER BY id").await, ["(1,anne)", "(2,bob)"], "row 1 was decided by the echo, so the other shop's row is written over it; row 2 was not read");
    assert_eq!(site.rows("SELECT xmin::text FROM customers WHERE id = 2").await, [format!("({sold_xmin})")], "row 2 was not written");
    assert_eq!(site.rows("SELECT through_ts FROM branchsync.echo_settled").await, [format!("({sold_us})")]);
    assert_eq!(a.stats.echoes_as_sent, 1);

    // Without the settled mark (a database initialised before it), the
    // rows of the same echo are the only way to decide them.
    let old = Site::new("CREATE TABLE customers (id int PRIMARY KEY, name text);", &[]).await;
    old.c.batch_execute("DROP TABLE branchsync.echo_settled; INSERT INTO customers VALUES (1, 'ann'), (2, 'bob')").await.unwrap();
    let mut echo = cs(1, "branch1", now_us(), d.clone(), vec![ins(&["1", "altered"]), ins(&["2", "altered"])]);
    echo.echo_as_sent = true;
    let mut a = old.branch_applier().await;
    a.apply_entries(&[echo]).await.unwrap();
    a.commit().await.unwrap();
    assert_eq!(old.rows("SELECT id, name FROM customers ORDER BY id").await, ["(1,altered)", "(2,altered)"], "compared and written as any echo");
    assert_eq!(a.stats.echoes_as_sent, 0);
}

/// The comparison that lets a branch leave an equal echo unwritten holds
/// both rows as text in memory; a row larger than a batch (a scanned
/// document of hundreds of MB: twice that as text passes PostgreSQL's 1 GB
/// bound) is written as before instead, whether it goes alone (over 4 MiB)
/// or through the staging table (over 16 MiB). A small equal row beside
/// them is still left alone.
#[tokio::test]
async fn at_a_branch_an_echo_of_a_row_larger_than_a_batch_is_written_not_compared() {
    let site = Site::new("CREATE TABLE docs (id int PRIMARY KEY, body text);", &[]).await;
    site.c
        .batch_execute("INSERT INTO docs VALUES (1, repeat('a', 5 * 1024 * 1024)), (2, repeat('b', 17 * 1024 * 1024)), (3, 'small')")
        .await
        .unwrap();
    let state = "SELECT id, xmin::text FROM docs ORDER BY id";
    let before = site.rows(state).await;
    let sold_us: i64 = site.c.query_one("SELECT (extract(epoch from pg_xact_commit_timestamp(xmin)) * 1000000)::int8 FROM docs WHERE id = 3", &[]).await.unwrap().get(0);
    let d = desc("docs", &["id", "body"], &["id"]);
    let mut a = site.branch_applier().await;
    let (five, seventeen) = ("a".repeat(5 * 1024 * 1024), "b".repeat(17 * 1024 * 1024));
    a.apply_entries(&[cs(1, "branch1", sold_us as u64, d, vec![ins(&["1", &five]), ins(&["2", &seventeen]), ins(&["3", "small"])])]).await.unwrap();
    a.commit().await.unwrap();
    let after = site.rows(state).await;
    assert_ne!(after[0], before[0], "the 5 MiB row was written");
    assert_ne!(after[1], before[1], "the 17 MiB row was written");
    assert_eq!(after[2], before[2], "the small equal row was left alone");
    assert_eq!(site.rows("SELECT id, length(body) FROM docs ORDER BY id").await, ["(1,5242880)", "(2,17825792)", "(3,5)"]);
}

/// A catch-up of small ChangeSets that each update a row (the hot-row
/// backlog: a stock counter, a till's balance) must not plan every
/// statement anew. Apply passes rows as arrays; left to itself PostgreSQL
/// plans the first five executions of each statement for their values and
/// went on doing so for the delta update (here 27 custom plans for 17
/// generic ones), which cost the apply backends of the hot-row benchmark a
/// fifth to a third of their CPU.
#[tokio::test]
async fn apply_statements_run_on_generic_plans_not_a_new_plan_per_changeset() {
    let site = Site::new("CREATE TABLE counters (id int PRIMARY KEY, n int, note text);", &[]).await;
    let d = desc("counters", &["id", "n", "note"], &["id"]);
    let rule = crate::conflict::TableRule { pattern: "counters".into(), delta: vec!["n".into()], ..Default::default() };
    let mut a = site.applier_with_rules(vec![rule]).await;
    a.apply_entries(&[cs(1, "branch1", T0, d.clone(), vec![ins(&["1", "0", "a"]), ins(&["2", "0", "b"])])]).await.unwrap();
    a.commit().await.unwrap();
    // Each ChangeSet adds to one counter: one delta statement per
    // ChangeSet, the same statement text each time.
    let mut entries = Vec::new();
    for i in 0..20u64 {
        let id = if i % 2 == 0 { "1" } else { "2" };
        let note = if i % 2 == 0 { "a" } else { "b" };
        let (before, after) = ((i / 2).to_string(), (i / 2 + 1).to_string());
        let old = old_row(true, &[Some(id), Some(before.as_str()), Some(note)]);
        entries.push(cs(2 + i, "branch1", T0 + 1 + i, d.clone(), vec![RowChange::Update { table: 0, old: Some(old), new: vals(&[id, &after, note]) }]));
    }
    for e in &entries {
        a.apply_entries(std::slice::from_ref(e)).await.unwrap();
        a.commit().await.unwrap();
    }
    assert_eq!(site.rows("SELECT id, n FROM counters ORDER BY id").await, ["(1,10)", "(2,10)"], "every update applied in place");
    let plans = a
        .conn
        .client
        .query_one("SELECT coalesce(sum(custom_plans), 0)::int8, coalesce(sum(generic_plans), 0)::int8 FROM pg_prepared_statements", &[])
        .await
        .unwrap();
    let (custom, generic): (i64, i64) = (plans.get(0), plans.get(1));
    println!("apply's prepared statements: {custom} custom plans, {generic} generic plans");
    assert!(generic >= 20, "the statements of 20 ChangeSets ran on generic plans ({generic} did)");
    assert_eq!(custom, 0, "no statement of apply was planned for its parameters");
}

/// A catch-up is sent ahead in pieces while apply queues the next rows
/// (`pipeline::Applier::drain_ahead`): a line without its order in a piece
/// sent ahead is parked before the next piece runs, and a row that breaks
/// a constraint in a piece sent ahead fails the group, which is replayed
/// change by change: the bad row quarantined, every other row applied
/// once.
#[tokio::test]
async fn a_catch_up_sent_ahead_in_pieces_parks_orphans_and_replays_a_failing_piece_change_by_change() {
    let site = Site::new(
        "CREATE TABLE orders (id int PRIMARY KEY, shop text);
         CREATE TABLE lines (id int PRIMARY KEY, order_id int REFERENCES orders(id), qty int NOT NULL CHECK (qty >= 0));",
        &[],
    )
    .await;
    let orders = desc("orders", &["id", "shop"], &["id"]);
    let lines = desc("lines", &["id", "order_id", "qty"], &["id"]);
    // A sale: an order and ten lines (`qty` of the first line as given).
    let sale = |pos: u64, order: u64, qty: &str| {
        let mut changes = vec![RowChange::Insert { table: 0, new: vals(&[&order.to_string(), "b1"]) }];
        for l in 0..10 {
            let q = if l == 0 { qty } else { "1" };
            changes.push(RowChange::Insert { table: 1, new: vals(&[&(order * 100 + l).to_string(), &order.to_string(), q]) });
        }
        cs_tables(pos, "branch1", pos, vec![orders.clone(), lines.clone()], changes)
    };
    // 1,200 sales (13,200 rows) in one group; sale 100's first line points
    // at order 999_999, which this stream never sends.
    let mut entries: Vec<LogEntry> = (1..=1200).map(|i| sale(i, i, "1")).collect();
    entries[99] = {
        let mut e = sale(100, 100, "1");
        if let RowChange::Insert { new, .. } = &mut e.changes[1] {
            new[1] = text("999999");
        }
        e
    };
    let stats = site.session(Duration::from_secs(60), &entries).await.unwrap();
    assert!(stats.sent_ahead >= 2, "the group went out in pieces: {stats:?}");
    assert_eq!((stats.committed_pos, stats.parked, stats.quarantined), (1200, 1, 0), "{stats:?}");
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, ["(11999)"], "every other line applied once");
    assert_eq!(site.rows("SELECT key, reason FROM branchsync.parked").await, ["(\"[\"\"10000\"\"]\",orphan)"]);
    // 1,200 more; sale 1700's first line breaks the CHECK.
    let more: Vec<LogEntry> = (1201..=2400).map(|i| sale(i, i, if i == 1700 { "-1" } else { "1" })).collect();
    let all: Vec<LogEntry> = entries.iter().cloned().chain(more).collect();
    let stats = site.session(Duration::from_secs(60), &all).await.expect("careful replay in place gets past the bad row");
    assert_eq!((stats.committed_pos, stats.quarantined), (2400, 1), "{stats:?}");
    assert_eq!(site.rows("SELECT count(*) FROM orders").await, ["(2400)"]);
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, ["(23998)"], "every line but the orphan and the bad one, once");
    let q = site.rows("SELECT kind, key FROM branchsync.conflicts").await;
    assert_eq!(q, ["(quarantined,\"[\"\"170000\"\"]\")"]);
}

/// At the main, a foreign-key value that points at a row queued in the same
/// send needs no parent check (`pipeline::ParentsQueued`): sales whose
/// orders travel with their lines are applied without one. Only the
/// primary key counts, in whatever column order the foreign key names it:
/// a line pointing at an order's unique code that happens to read like a
/// queued order's id, or at a composite key no queued row has, is still
/// checked and parked.
#[tokio::test]
async fn lines_whose_orders_are_queued_with_them_skip_the_parent_check_and_nothing_else_does() {
    let site = Site::new(
        "CREATE TABLE orders (id int PRIMARY KEY, code int UNIQUE);
         CREATE TABLE lines (id int PRIMARY KEY, order_id int REFERENCES orders(id));
         CREATE TABLE slots (shop text, day int, PRIMARY KEY (shop, day));
         CREATE TABLE bookings (id int PRIMARY KEY, d int, s text, FOREIGN KEY (d, s) REFERENCES slots (day, shop));
         CREATE TABLE notes (id int PRIMARY KEY, order_code int REFERENCES orders(code));",
        &[],
    )
    .await;
    let orders = desc("orders", &["id", "code"], &["id"]);
    let lines = desc("lines", &["id", "order_id"], &["id"]);
    let slots = desc("slots", &["shop", "day"], &["shop", "day"]);
    let bookings = desc("bookings", &["id", "d", "s"], &["id"]);
    let notes = desc("notes", &["id", "order_code"], &["id"]);
    let tables = vec![orders, lines, slots, bookings, notes];
    let insert = |t: u32, vs: &[&str]| RowChange::Insert { table: t, new: vals(vs) };
    // 300 sales: an order (code = id + 100,000), three lines, a slot and a
    // booking of it named in the other column order.
    let sale = |i: u64| {
        let (o, code) = (i.to_string(), (i + 100_000).to_string());
        let mut changes = vec![insert(0, &[&o, &code])];
        for l in 0..3 {
            changes.push(insert(1, &[&(i * 10 + l).to_string(), &o]));
        }
        changes.push(insert(2, &["shop", &o]));
        changes.push(insert(3, &[&o, &o, "shop"]));
        cs_tables(i, "branch1", i, tables.clone(), changes)
    };
    let entries: Vec<LogEntry> = (1..=300).map(sale).collect();
    let stats = site.run(&entries).await.unwrap();
    assert_eq!((stats.committed_pos, stats.parked), (300, 0), "{stats:?}");
    assert_eq!(stats.parent_checks, 0, "every line and booking pointed at a queued row: {stats:?}");
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, ["(900)"]);
    assert_eq!(site.rows("SELECT count(*) FROM bookings").await, ["(300)"]);
    // A note pointing at code 301 (no order has it; order 301 is queued
    // with it), a booking of a slot whose columns are swapped (no such
    // slot), and a good line: the first two are parked, the line applied.
    let odd = cs_tables(
        301,
        "branch1",
        301,
        tables.clone(),
        vec![
            insert(0, &["301", "100301"]),
            insert(2, &["shop", "301"]),
            insert(4, &["1", "301"]),
            insert(3, &["3011", "301", "nowhere"]),
            insert(1, &["3010", "301"]),
        ],
    );
    let all: Vec<LogEntry> = entries.iter().cloned().chain([odd]).collect();
    let stats = site.run(&all).await.unwrap();
    assert_eq!((stats.committed_pos, stats.parked), (301, 2), "{stats:?}");
    assert_eq!(stats.parent_checks, 2, "the note's and the booking's foreign keys were checked, the line's was not: {stats:?}");
    let parked = site.rows("SELECT tbl, key, reason FROM branchsync.parked ORDER BY tbl").await;
    assert_eq!(parked, ["(public.bookings,\"[\"\"3011\"\"]\",orphan)", "(public.notes,\"[\"\"1\"\"]\",orphan)"]);
    assert_eq!(site.rows("SELECT count(*) FROM lines").await, ["(901)"]);
}

/// The shortcut above holds only when the main inserts every queued row as
/// sent. A parent table whose application code fires under apply (here a
/// trigger enabled `ALWAYS` that drops order 2) may not keep the row: its
/// children are checked, and the line of the dropped order is parked.
#[tokio::test]
async fn a_parent_whose_insert_runs_code_is_checked_even_when_queued() {
    let site = Site::new(
        "CREATE TABLE orders (id int PRIMARY KEY);
         CREATE TABLE lines (id int PRIMARY KEY, order_id int REFERENCES orders(id));
         CREATE FUNCTION drop_order_2() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN IF NEW.id = 2 THEN RETURN NULL; END IF; RETURN NEW; END $$;
         CREATE TRIGGER drop_order_2 BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION drop_order_2();
         ALTER TABLE orders ENABLE ALWAYS TRIGGER drop_order_2;",
        &[],
    )
    .await;
    let tables = vec![desc("orders", &["id"], &["id"]), desc("lines", &["id", "order_id"], &["id"])];
    let insert = |t: u32, vs: &[&str]| RowChange::Insert { table: t, new: vals(vs) };
    let entries: Vec<LogEntry> = (1..=3u64)
        .map(|i| {
            let o = i.to_string();
            cs_tables(i, "branch1", i, tables.clone(), vec![insert(0, &[&o]), insert(1, &[&(i * 10).to_string(), &o])])
        })
        .collect();
    let stats = site.run(&entries).await.unwrap();
    assert_eq!((stats.committed_pos, stats.parked), (3, 1), "{stats:?}");
    assert!(stats.parent_checks > 0, "the lines' orders were checked: {stats:?}");
    assert_eq!(site.rows("SELECT tbl, key, reason FROM branchsync.parked").await, ["(public.lines,\"[\"\"20\"\"]\",orphan)"]);
    assert_eq!(site.rows("SELECT id FROM lines ORDER BY id").await, ["(10)", "(30)"]);
}
