//! Issue 12, done-when 6 (R4, R26): a lost or restored log or database at
//! either end is refused with a message that names the procedure, and no
//! entry is skipped. Where the procedure needs no new tooling — a main
//! restored from an older backup, refilled from the changes the branches
//! keep (`[log] keep_acked`) — the test follows it until every site
//! converges and every sale is at the main exactly once.

use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE products (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO products (id, name, price) VALUES (0, 'tea', 2.50), (100, 'cake', 3.20), (200, 'milk', 1.10), (300, 'rice', 4.00);
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, total numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE order_lines (id bigserial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders(id), product_id integer NOT NULL REFERENCES products(id), qty integer NOT NULL, price numeric(10,2) NOT NULL);
";
const TABLES: &[&str] = &["products", "orders", "order_lines"];

async fn schema_with_procedure() -> String {
    format!("{SCHEMA}{SELL_MANY}")
}

/// The daemon of `site` exits by itself; returns its output.
fn refuses_to_start(site: &mut Site, why: &str) -> String {
    let st = site.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| panic!("the daemon of {} must refuse to start: {why}\n{}", site.name, site.daemon_log()));
    assert_eq!(st.code(), Some(3), "{} exits with the status that tells a service manager not to restart it", site.name);
    site.daemon_log()
}

/// Runs `branchsync init <flag>` at `site`; panics with its output if it fails.
fn init_with(site: &Site, flag: &str) -> String {
    let out = site.cli(&["init", flag]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "init {flag} at {} failed:\n{text}", site.name);
    text
}

/// The relay position a branch has applied (its progress row of the main's
/// stream).
async fn relay_applied(branch: &Site) -> i64 {
    branch.db().await.query_one("SELECT coalesce(max(pos), 0) FROM branchsync.progress", &[]).await.expect("read progress").get(0)
}

/// Waits until the branch's status shows a refusal containing `needle`.
async fn branch_refused(branch: &Site, needle: &str) -> String {
    let st = wait_status(branch, &format!("{} reports a refusal with {needle:?}", branch.name), Duration::from_secs(60), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains(needle))
    })
    .await;
    st["peers"]["main"]["last_error"].as_str().unwrap_or_default().to_string()
}

/// The main's `data_dir` is deleted. The daemon refuses to start with an
/// empty log under a database that replicated with another one; `init
/// --accept-new-log` lets it start, and then every branch whose relay
/// progress belongs to the lost log is refused — nothing of the new log is
/// applied over the old positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mains_data_dir_deleted_is_refused_and_then_every_branch_is_told_to_reseed() {
    let mut topo = Topology::prepare(1, &schema_with_procedure().await).await;
    topo.start_all();
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    b1.execute("CALL sell_many(20, 'branch1')", &[]).await.unwrap();
    main.execute("CALL sell_many(5, 'main')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;
    let applied_before = relay_applied(&topo.branches[0]).await;

    topo.main.stop();
    std::fs::remove_dir_all(topo.main.dir.path().join("data")).expect("delete the main's data directory");
    topo.main.start();
    let log = refuses_to_start(&mut topo.main, "its log is gone");
    assert!(log.contains("is new, but this database has replicated with another log"), "the refusal says what happened:\n{log}");
    assert!(log.contains("init --accept-new-log"), "the refusal names the procedure:\n{log}");

    // The operator accepts the loss; the main starts with a new relay log.
    let said = init_with(&topo.main, "--accept-new-log");
    assert!(said.contains("must be re-seeded"), "init says what follows:\n{said}");
    topo.main.start();
    main.execute("CALL sell_many(7, 'main-new-log')", &[]).await.unwrap();
    b1.execute("CALL sell_many(3, 'branch1-after')", &[]).await.unwrap();
    let e = branch_refused(&topo.branches[0], "relay log was recreated").await;
    println!("branch1 is refused: {e}");
    assert!(e.to_lowercase().contains("re-seed"), "the refusal names the procedure: {e}");
    topo.main.wait_log("relay log was recreated", Duration::from_secs(30)).await;

    // Nothing skipped: the branch applied nothing of the new log, the main
    // nothing more of the branch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(relay_applied(&topo.branches[0]).await, applied_before, "the branch's relay progress did not move");
    assert_eq!(sales_of(&b1, "main-new-log").await, (0, 0));
    assert_eq!(sales_of(&main, "branch1-after").await, (0, 0));
    assert!(topo.branches[0].running(), "the branch keeps running (and selling) while it waits for the operator");
}

/// A branch's `data_dir` is deleted: the branch refuses to start; with
/// `init --accept-new-log` it starts, and the main refuses its new log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branchs_data_dir_deleted_is_refused_at_the_branch_and_then_at_the_main() {
    let mut topo = Topology::prepare(1, &schema_with_procedure().await).await;
    topo.start_all();
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    b1.execute("CALL sell_many(20, 'branch1')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;
    let main_progress = |c: tokio_postgres::Client| async move {
        c.query_one("SELECT pos FROM branchsync.progress WHERE stream = 'branch1'", &[]).await.expect("the main's progress of branch1").get::<_, i64>(0)
    };
    let before = main_progress(topo.main.db().await).await;

    let branch = &mut topo.branches[0];
    branch.stop();
    // Sales captured by nobody yet: the slot keeps them, but the log that
    // would have numbered them is gone.
    b1.execute("CALL sell_many(4, 'branch1-lost-window')", &[]).await.unwrap();
    std::fs::remove_dir_all(branch.dir.path().join("data")).expect("delete the branch's data directory");
    branch.start();
    let log = refuses_to_start(branch, "its log is gone");
    assert!(log.contains("is new, but this database has replicated with another log"), "{log}");
    assert!(log.contains("re-seed this branch"), "the refusal names the procedure:\n{log}");

    init_with(branch, "--accept-new-log");
    branch.start();
    let e = branch_refused(branch, "has a new log").await;
    println!("branch1 is refused: {e}");
    assert!(e.contains("Re-seed") || e.contains("re-seed"), "the refusal names the procedure: {e}");
    topo.main.wait_log("has a new log", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(main_progress(topo.main.db().await).await, before, "the main applied nothing of the branch's new log over the old positions");
    assert_eq!(sales_of(&main, "branch1-lost-window").await, (0, 0));
    assert_eq!(sales_of(&main, "branch1").await, (20, 80));
}

/// The main's database is restored from a backup older than its log, while
/// two branches sell on. The daemon refuses to start ("went back in time",
/// naming `init --restored`); after it, the branches re-send from the
/// entries they keep what the main lost, the relay does not send the other
/// branch what it already has, and every sale is at the main exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_restored_from_an_older_backup_is_refilled_from_the_branches_kept_entries() {
    let mut topo = Topology::prepare(2, &schema_with_procedure().await).await;
    topo.start_all();
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    let b2 = topo.branches[1].db().await;
    b1.execute("CALL sell_many(30, 'branch1')", &[]).await.unwrap();
    b2.execute("CALL sell_many(30, 'branch2')", &[]).await.unwrap();
    main.execute("CALL sell_many(10, 'main')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;

    // The nightly backup of the main (a cold copy of its cluster).
    topo.main.stop();
    topo.main.pg.stop_fast();
    let backup = topo.main.pg.snapshot_data("nightly");
    topo.main.pg.start_server();
    topo.main.start();
    let main = topo.main.db().await;

    // The day goes on at the shops; the main relays between them. (Nothing
    // is sold at the main itself after the backup: that is lost by any
    // restore, and the test's oracle would not hold.)
    b1.execute("CALL sell_many(40, 'branch1')", &[]).await.unwrap();
    b2.execute("CALL sell_many(25, 'branch2')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;
    assert_eq!(sales_of(&main, "branch1").await, (70, 280));

    // The main's disk fails; its database comes back from last night.
    topo.main.stop();
    topo.main.pg.stop_fast();
    topo.main.pg.restore_data(&backup);
    topo.main.pg.start_server();
    let main = topo.main.db().await;
    assert_eq!(sales_of(&main, "branch1").await, (30, 120), "the backup holds the first sales only");
    topo.main.start();
    let log = refuses_to_start(&mut topo.main, "its database went back in time");
    assert!(log.contains("database went back in time"), "{log}");
    assert!(log.contains("init --restored"), "the refusal names the procedure:\n{log}");

    // Meanwhile the shops keep selling.
    b1.execute("CALL sell_many(5, 'branch1')", &[]).await.unwrap();
    let said = init_with(&topo.main, "--restored");
    println!("{said}");
    topo.main.start();
    b2.execute("CALL sell_many(5, 'branch2')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(120)).await;

    // Every sale at the main exactly once (ids are keys: a duplicate would
    // have been a conflict, counted below), every site identical.
    assert_eq!(sales_of(&main, "branch1").await, (75, 300));
    assert_eq!(sales_of(&main, "branch2").await, (60, 240));
    assert_eq!(sales_of(&main, "main").await, (10, 40));
    for s in topo.sites() {
        let conflicts: i64 = s.db().await.query_one("SELECT count(*) FROM branchsync.conflicts", &[]).await.unwrap().get(0);
        assert_eq!(conflicts, 0, "{}: nothing was applied twice or decided against itself", s.name);
    }
    // And the stream goes on after the recovery.
    main.execute("CALL sell_many(3, 'main-after')", &[]).await.unwrap();
    b1.execute("CALL sell_many(3, 'branch1-after')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;
    assert_eq!(sales_of(&b2, "main-after").await, (3, 12));
}
