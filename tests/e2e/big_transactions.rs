//! Done-when 5: a 100k-row and a 1M-row transaction replicate, and the
//! daemons' peak RSS stays the same order for both (bounded memory, not
//! proportional to the transaction).

use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "CREATE TABLE big (id bigint PRIMARY KEY, body text NOT NULL);";

async fn count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM big", &[]).await.unwrap().get(0)
}

/// Replicates one transaction of `rows` rows from branch1 to the main with
/// freshly started daemons; returns their peak RSS in KiB (branch, main).
async fn replicate_one_transaction(topo: &mut Topology, from: i64, rows: i64) -> (u64, u64) {
    topo.main.kill9();
    topo.branches[0].kill9();
    topo.start_all();
    let b = topo.branches[0].db().await;
    let main = topo.main.db().await;
    let before = count(&main).await;
    let started = std::time::Instant::now();
    b.batch_execute(&format!("INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series({from}, {}) g", from + rows - 1)).await.unwrap();
    // Sample the daemons' peak RSS while waiting for the rows.
    let mut peaks = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while count(&main).await != before + rows {
        assert!(std::time::Instant::now() < deadline, "{rows} rows did not arrive at the main within 600 s");
        peaks.0 = peaks.0.max(topo.branches[0].pid().and_then(peak_rss_kib).unwrap_or(0));
        peaks.1 = peaks.1.max(topo.main.pid().and_then(peak_rss_kib).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bp = topo.branches[0].pid().and_then(peak_rss_kib).unwrap_or(0).max(peaks.0);
    let mp = topo.main.pid().and_then(peak_rss_kib).unwrap_or(0).max(peaks.1);
    println!(
        "one transaction of {rows} rows replicated in {:.1} s; peak RSS: branch daemon {} MiB, main daemon {} MiB",
        started.elapsed().as_secs_f64(),
        bp / 1024,
        mp / 1024
    );
    (bp, mp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_of_100k_and_1m_rows_replicate_in_bounded_memory() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    let small = replicate_one_transaction(&mut topo, 1, 100_000).await;
    let large = replicate_one_transaction(&mut topo, 100_001, 1_000_000).await;
    wait_converged(&topo.sites(), &["big"], Duration::from_secs(120)).await;
    // Ten times the rows must not mean ten times the memory: proportional
    // growth would be 10x; we require the same order of magnitude.
    for (what, s, l) in [("branch", small.0, large.0), ("main", small.1, large.1)] {
        assert!(l < s * 8, "{what} daemon peak RSS grew with the transaction: {s} KiB for 100k rows, {l} KiB for 1M rows");
    }
}
