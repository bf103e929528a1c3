//! Issue 14: a till left in a transaction for minutes while the shop keeps
//! selling. PostgreSQL's slot cannot move its restart point past a
//! transaction that is still open, so a capture that reads the slot anew
//! for every batch (peeking) decodes that transaction again, and spills it
//! to disk again, on every poll: work grows with the number of polls, not
//! with the WAL. Streaming decodes it once.
//!
//! Measured with the slot's own statistics (`pg_stat_replication_slots`):
//! with `logical_decoding_work_mem` at its minimum, every decoding of the
//! open transaction spills it whole, so the bytes spilled say how often it
//! was decoded while it was open. `BRANCHSYNC_TEST_CAPTURE=peek` makes
//! this test fail (about 30 times the data spilled when it was written).

use std::time::Duration;

use branchsync_tests::*;

/// Rows and bytes of note per row of the till's open transaction.
const TILL_ROWS: i64 = 2_000;
const NOTE_BYTES: i64 = 1_000;

async fn spilled(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT coalesce(sum(spill_bytes), 0)::int8 FROM pg_stat_replication_slots WHERE slot_name = 'branchsync'", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_open_while_others_commit_is_decoded_once() {
    let mut topo = Topology::prepare(1, POS_SCHEMA).await;
    let b1 = topo.branches[0].db().await;
    b1.batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'").await.unwrap();
    b1.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(60), |s| s["peers"]["branch1"]["connected"] == true).await;
    let main = topo.main.db().await;
    main.batch_execute("INSERT INTO products (name, price, stock) SELECT 'p' || g, g, 1000 FROM generate_series(1, 10) g").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    let before = spilled(&b1).await;

    // The till opens a transaction and leaves it open.
    let till = topo.branches[0].db().await;
    till.batch_execute(&format!(
        "BEGIN; INSERT INTO orders (shop, note) SELECT 'till', repeat('x', {NOTE_BYTES}) FROM generate_series(1, {TILL_ROWS})"
    ))
    .await
    .unwrap();
    // Meanwhile the other cashiers sell, and every sale reaches the main.
    for _ in 0..300 {
        sell(&b1, "branch1", 2).await;
    }
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(120)).await;
    let spill = spilled(&b1).await - before;
    let data = TILL_ROWS * NOTE_BYTES;
    println!("the open transaction holds {data} bytes of notes; the slot spilled {spill} bytes while it was open ({:.1}x)", spill as f64 / data as f64);
    assert!(spill > 0, "logical_decoding_work_mem = 64kB must make the open transaction spill (is the setting in effect?)");
    assert!(
        spill < 3 * data,
        "the open transaction was decoded again and again: {spill} bytes spilled for {data} bytes of data"
    );
    // The till commits at last; its rows arrive too.
    till.batch_execute("COMMIT").await.unwrap();
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(120)).await;
    let till_rows: i64 = main.query_one("SELECT count(*) FROM orders WHERE shop = 'till'", &[]).await.unwrap().get(0);
    assert_eq!(till_rows, TILL_ROWS, "the till's transaction reached the main whole");
}
