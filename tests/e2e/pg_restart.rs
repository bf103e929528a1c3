//! Issue 12, done-when 5 (R24): PostgreSQL stopped `-m immediate` while
//! capture is inside a 300,000-row transaction, then started again — before
//! the first fragment is flushed, between fragments, and after the last
//! fragment is durable but before the slot is confirmed — at a branch and
//! at the main. Capture cuts its log back to the last whole transaction and
//! reads the slot again: every row arrives exactly once, and later sales
//! too. (Before, every reconnect ended with "started a new ChangeSet at
//! position N inside another" and the stream stopped for good.)
//!
//! The daemon pauses at the failpoint (`NAME:N:pause`) while the test stops
//! and starts PostgreSQL under it, then lets it go on.

use std::time::Duration;

use branchsync_engine::failpoints as fp;
use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE big (id bigint PRIMARY KEY, site text NOT NULL, round int NOT NULL, body text);
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL);";

const ROWS: i64 = 300_000;

async fn counts(c: &tokio_postgres::Client) -> (i64, i64, i64) {
    let r = c.query_one("SELECT count(*), count(DISTINCT id), (SELECT count(*) FROM orders) FROM big", &[]).await.unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Three rounds at site `i` (0 = the main, 1 = branch1), one per moment of
/// the capture of a large transaction.
async fn restarts_inside_a_large_transaction(i: usize) {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    let rounds = [
        ("before the first fragment is flushed", fp::CAPTURE_AFTER_FRAGMENT, 1),
        ("between fragments", fp::CAPTURE_AFTER_FRAGMENT, 30),
        ("after the last fragment is durable, before the slot is confirmed", fp::CAPTURE_AFTER_FRAGMENTED_FLUSH, 1),
    ];
    for (round, (when, point, hit)) in rounds.into_iter().enumerate() {
        let site = topo.site_mut(i);
        let name = site.name.clone();
        println!("{name}, round {round}: PostgreSQL stopped {when}");
        site.stop();
        let release = site.arm_pause(point, hit);
        site.start();
        let c = site.db().await;
        let from = round as i64 * ROWS;
        c.batch_execute(&format!(
            "INSERT INTO big SELECT g, '{name}', {round}, md5(g::text) FROM generate_series({}, {}) g",
            from + 1,
            from + ROWS
        ))
        .await
        .unwrap();
        let site = topo.site_mut(i);
        site.wait_log(&format!("failpoint {point} paused"), Duration::from_secs(120)).await;
        site.pg.stop_immediate();
        tokio::time::sleep(Duration::from_millis(300)).await;
        site.pg.start_server();
        std::fs::write(&release, b"go").unwrap();
        site.wait_log(&format!("failpoint {point} released"), Duration::from_secs(30)).await;
        // A sale after the restart.
        site.db().await.batch_execute(&format!("INSERT INTO orders (shop) VALUES ('{name}')")).await.unwrap();
        wait_converged(&topo.sites(), &["big", "orders"], Duration::from_secs(600)).await;
        for s in topo.sites() {
            let want = ((round as i64 + 1) * ROWS, (round as i64 + 1) * ROWS, round as i64 + 1);
            assert_eq!(counts(&s.db().await).await, want, "rows, distinct rows and sales at {} after round {round}", s.name);
        }
        topo.site_mut(i).env.clear();
        assert!(!topo.site_mut(i).daemon_log().contains("inside another"), "the stream broke on a torn transaction");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_inside_a_large_transaction_at_a_branch_lose_and_double_nothing() {
    restarts_inside_a_large_transaction(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_inside_a_large_transaction_at_the_main_lose_and_double_nothing() {
    restarts_inside_a_large_transaction(0).await;
}

/// A daemon started while its PostgreSQL is down (a reboot where the
/// daemon comes up first, or a restart at the wrong moment) waits for the
/// database instead of exiting, then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_started_while_its_database_is_down_waits_for_it() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.main.start();
    let branch = &mut topo.branches[0];
    branch.pg.stop_fast();
    branch.start();
    branch.wait_log("cannot start yet; retrying", Duration::from_secs(30)).await;
    assert!(branch.running(), "the daemon waits for its database");
    branch.pg.start_server();
    let b = branch.db().await;
    b.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(60)).await;
}
