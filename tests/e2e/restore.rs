//! Done-when 6 (R4): a branch whose database went back in time is refused
//! with a clear message; nothing is skipped silently.

use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL);";

async fn orders(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_restored_from_a_snapshot_is_refused_at_handshake() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    let b = topo.branches[0].db().await;
    b.batch_execute("INSERT INTO orders (shop) SELECT 'branch1' FROM generate_series(1, 10)").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;

    // A VM snapshot of the branch: database and branchsync's data directory.
    let branch = &mut topo.branches[0];
    branch.stop();
    branch.pg.stop_fast();
    let pg_snapshot = branch.pg.snapshot_data("snapshot");
    let data_snapshot = branch.dir.path().join("data-snapshot");
    assert!(std::process::Command::new("cp").arg("-a").arg(branch.dir.path().join("data")).arg(&data_snapshot).status().unwrap().success());
    branch.pg.start_server();
    branch.start();
    let b = branch.db().await;
    b.batch_execute("INSERT INTO orders (shop) SELECT 'branch1' FROM generate_series(1, 25)").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    let main = topo.main.db().await;
    assert_eq!(orders(&main).await, 35);

    // Restore the snapshot and start again.
    let branch = &mut topo.branches[0];
    branch.stop();
    branch.pg.stop_fast();
    branch.pg.restore_data(&pg_snapshot);
    std::fs::remove_dir_all(branch.dir.path().join("data")).unwrap();
    assert!(std::process::Command::new("cp").arg("-a").arg(&data_snapshot).arg(branch.dir.path().join("data")).status().unwrap().success());
    branch.pg.start_server();
    branch.start();
    let b = branch.db().await;
    assert_eq!(orders(&b).await, 10, "the snapshot holds only the first sales");
    b.batch_execute("INSERT INTO orders (shop) SELECT 'after-restore' FROM generate_series(1, 5)").await.unwrap();

    // Refused, whichever check sees it first: the branch's own log does not
    // match what the main applied (went back in time), or its relay
    // progress is older than what the main still keeps (must re-seed; the
    // branch also received its own changes back from the relay).
    let st = wait_status(&topo.branches[0], "branch1 reports the refusal", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("went back in time") || e.contains("must be re-seeded"))
    })
    .await;
    println!("branch status: {}", st["peers"]["main"]["last_error"]);
    assert!(st["peers"]["main"]["last_error"].as_str().unwrap_or("").to_lowercase().contains("re-seed"), "the refusal says to re-seed: {st}");
    eventually("the main logs why it refused", Duration::from_secs(10), || async {
        let log = topo.main.daemon_log();
        (log.contains("went back in time") || log.contains("MustReseed")).then_some(())
    })
    .await;
    // Nothing was skipped or applied from the diverged branch.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(orders(&main).await, 35);
    let after: i64 = main.query_one("SELECT count(*) FROM orders WHERE shop = 'after-restore'", &[]).await.unwrap().get(0);
    assert_eq!(after, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restored_under_a_newer_log_refuses_to_start() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    let branch = &mut topo.branches[0];
    branch.pg.stop_fast();
    let snap = branch.pg.snapshot_data("snapshot");
    branch.pg.start_server();
    branch.start();
    let b = branch.db().await;
    b.batch_execute("INSERT INTO orders (shop) SELECT 'branch1' FROM generate_series(1, 5000)").await.unwrap();
    wait_status(branch, "branch captured its sales", Duration::from_secs(30), |s| s["captured_transactions"].as_u64().unwrap_or(0) >= 1).await;
    branch.stop();
    branch.pg.stop_fast();
    branch.pg.restore_data(&snap);
    branch.pg.start_server();
    branch.start();
    let st = branch.wait_exit(Duration::from_secs(30)).expect("daemon must refuse to start");
    assert_eq!(st.code(), Some(3), "the operator must act: a service manager must not restart it");
    let log = branch.daemon_log();
    assert!(log.contains("database went back in time"), "daemon log:\n{log}");
    assert!(log.contains("HINT"), "the refusal says how to fix it:\n{log}");
}
