//! `branchsync verify` throughput (not a timed test): a main and a branch
//! hold the same 1M-row order-line table (loaded at both before init, as a
//! seeded shop would); verify compares it while both daemons run, with a
//! handful of rows changed at the branch behind the stream's back, and
//! prints rows compared per second.
//!
//! ```text
//! cargo build --release -p branchsync-server
//! cargo bench -p branchsync-tests --bench verify
//! ```
//! `BENCH_ROWS` changes the table's size.

use std::process::Command;
use std::time::{Duration, Instant};

use branchsync_tests::*;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let rows: i64 = std::env::var("BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let schema = format!(
        "CREATE TABLE order_lines (id bigint PRIMARY KEY, order_id int NOT NULL, product text NOT NULL, qty int NOT NULL, price numeric(10,2) NOT NULL, at timestamptz NOT NULL);
         INSERT INTO order_lines SELECT g, g / 4, 'product ' || (g % 500), 1 + g % 3, (g % 1000) / 10.0, '2026-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, {rows}) g;
         ANALYZE order_lines;"
    );
    let t = Instant::now();
    let mut topo = Topology::prepare(1, &schema).await;
    println!("two copies of {rows} rows loaded and initialised in {:.1} s", t.elapsed().as_secs_f64());
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(60), |s| s["peers"]["branch1"]["connected"] == true).await;
    // Ten rows changed behind the stream's back.
    topo.branches[0].stop();
    let b = topo.branches[0].db().await;
    b.batch_execute("UPDATE order_lines SET qty = qty + 100 WHERE id % 100000 = 7").await.unwrap();
    b.batch_execute("SELECT pg_replication_slot_advance('branchsync', pg_current_wal_lsn())").await.unwrap();
    topo.branches[0].start();
    wait_status(&topo.main, "branch1 connected again", Duration::from_secs(60), |s| s["peers"]["branch1"]["connected"] == true).await;

    let config = topo.branches[0].config_path();
    let t = Instant::now();
    let out = tokio::task::spawn_blocking(move || Command::new(branchsync_bin()).args(["verify", "--json", "--config"]).arg(config).output().expect("run verify")).await.unwrap();
    let secs = t.elapsed().as_secs_f64();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let found = r["differences"].as_u64().unwrap_or(0);
    println!(
        "verify: {} rows compared in {secs:.1} s (command wall time; verify's own figure {:.1} s): {:.0} rows/s; {found} differences found (10 made)",
        r["rows_compared"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["rows_compared"].as_f64().unwrap_or(0.0) / secs
    );
    assert_eq!(found, 10, "the ten rows changed behind the stream: {r:#}");
}
