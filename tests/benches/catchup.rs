//! Catch-up benchmark (not a timed test): a branch sells offline until it
//! has a backlog of 100,000 order lines, then the main comes up and applies
//! it. Prints rows per second of the catch-up.
//!
//! ```text
//! cargo build --release -p branchsync-server
//! cargo bench -p branchsync-tests --bench catchup
//! ```
//! `BENCH_LINES` changes the backlog size; `BENCH_ORDERS_PER_TXN` (default 1,
//! one sale per transaction) makes bulk transactions.

use std::time::{Duration, Instant};

use branchsync_tests::*;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let lines: i64 = std::env::var("BENCH_LINES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let per_order = 4;
    // Orders per branch transaction: 1 = one sale per transaction (a till);
    // more = bulk transactions (an import, a stock count).
    let per_txn: i64 = std::env::var("BENCH_ORDERS_PER_TXN").ok().and_then(|s| s.parse().ok()).unwrap_or(1).clamp(1, 500);
    let orders = lines / per_order;
    let mut topo = Topology::prepare(1, POS_SCHEMA).await;
    let main = topo.main.db().await;
    let b = topo.branches[0].db().await;
    // The branch's daemon captures the backlog (its products included)
    // while the main is down.
    topo.branches[0].start();
    b.batch_execute("INSERT INTO products (id, name, price, stock) SELECT g * 100 + 1, 'p' || g, g, 0 FROM generate_series(1, 10) g").await.unwrap();
    let t0 = Instant::now();
    for chunk in 0..(orders / 500) {
        b.batch_execute(&format!(
            "DO $$ DECLARE o int; BEGIN FOR i IN 1..500 LOOP
               INSERT INTO orders (shop, total) VALUES ('branch1', 10) RETURNING id INTO o;
               INSERT INTO order_lines (order_id, product_id, qty, price) SELECT o, 100 * (1 + (g % 10)) + 1, 1, 2.5 FROM generate_series(1, {per_order}) g;
               IF i % {per_txn} = 0 THEN COMMIT; END IF;
             END LOOP; END $$; -- chunk {chunk}"
        ))
        .await
        .unwrap();
    }
    let expected_orders = (orders / 500) * 500;
    let expected_tx = expected_orders / per_txn + i64::from(expected_orders % per_txn != 0);
    wait_status(&topo.branches[0], "branch captured the backlog", Duration::from_secs(600), |s| s["captured_transactions"].as_i64().unwrap_or(0) >= expected_tx).await;
    let total_rows = expected_orders * (1 + per_order);
    println!("backlog: {expected_orders} orders, {} order lines, {total_rows} rows in {expected_tx} transactions (written and captured in {:.1} s)", expected_orders * per_order, t0.elapsed().as_secs_f64());

    let t = Instant::now();
    topo.main.start();
    eventually("the main applied the backlog", Duration::from_secs(1200), || async {
        let n: i64 = main.query_one("SELECT count(*) FROM order_lines", &[]).await.unwrap().get(0);
        (n >= expected_orders * per_order).then_some(())
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "catch-up at the main: {total_rows} rows ({} order lines) in {secs:.2} s = {:.0} rows/s ({:.0} transactions/s), daemon start included",
        expected_orders * per_order,
        total_rows as f64 / secs,
        expected_tx as f64 / secs
    );
}
