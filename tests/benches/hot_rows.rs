//! Hot rows (issue 14): every transaction of pgbench's TPC-B-like workload
//! updates a branch row, a teller row and an account row, and pgbench runs
//! at the main and at two branches at once while the branches are cut off.
//! When the links heal, the main applies both branches' backlogs, and every
//! update of `pgbench_branches` and `pgbench_tellers` meets concurrent
//! ones: the balances are delta columns, so each is decided (the deltas
//! added). Beside it, on the same clusters, PostgreSQL's own logical
//! replication applies the same kind of backlog, written the same way into
//! a second database, without conflict handling (each update overwrites).
//! Prints both rates (the branches' transactions applied at the main per
//! second) and their ratio per round, then the median; and how long
//! branchsync took until all three sites were equal. Not a timed test: it
//! asserts only that every site ends with every balance equal to its
//! history.
//!
//! ```text
//! cargo build --release -p branchsync-server
//! cargo bench -p branchsync-tests --bench hot_rows
//! ```
//! `BENCH_PGBENCH_SECONDS` (default 10) sets how long pgbench runs at each
//! site (2 clients each), `BENCH_ROUNDS` (default 3) the paired rounds.
//!
//! The native side: database `native` on each cluster, `pgbench -i` run in
//! it at every site (identical tables), the two branches' tables published
//! and the main subscribed to each (default options, `copy_data = false`),
//! the subscriptions disabled while pgbench writes the backlog, then
//! enabled one after the other; its figure adds, for each, the time from
//! the moment its walsender is connected until the main holds its history
//! rows. branchsync's figure runs from
//! the heal (TLS handshakes included) until the main holds every history
//! row. No daemon runs during the native figure.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use branchsync_tests::*;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run());
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn mid(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn run() {
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    let seconds = env_u64("BENCH_PGBENCH_SECONDS", 10).max(1);
    println!("== hot rows: pgbench (TPC-B-like, 2 clients, {seconds} s) at the main and two cut-off branches; {rounds} paired rounds");
    let (mut natives, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (native, mine) = paired_round(seconds).await;
        let ratio = mine / native;
        println!("round {round}: native {native:.0} transactions/s | branchsync {mine:.0} transactions/s | branchsync/native = {ratio:.2}x");
        natives.push(native);
        ours.push(mine);
        ratios.push(ratio);
    }
    let line = format!(
        "hot rows (the branches' pgbench backlogs applied at the main, balances as delta columns): native {:.0} transactions/s, branchsync {:.0} transactions/s, median ratio {:.2}x",
        mid(natives),
        mid(ours),
        mid(ratios)
    );
    println!("median of {rounds}: {line}");
    println!("== summary\n{line}");
}

/// `pgbench` at `site` against database `db`.
fn pgbench_in(site: &Site, db: &str, args: &[&str]) -> Command {
    let mut c = Command::new(pg_bin_dir().join("pgbench"));
    c.args(["-h", "127.0.0.1", "-p", &site.pg.port().to_string(), "-U", "postgres"]).args(args).arg(db);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs pgbench for `seconds` at every site at once, in database `db`.
fn pgbench_everywhere(sites: &[&Site], db: &str, seconds: u64) {
    let t = seconds.to_string();
    let runs: Vec<_> = sites.iter().map(|s| (s.name.clone(), pgbench_in(s, db, &["-n", "-T", &t, "-c", "2", "-j", "1"]).spawn().expect("start pgbench"))).collect();
    for (name, child) in runs {
        let out = child.wait_with_output().expect("pgbench");
        assert!(out.status.success(), "pgbench at {name} ({db}): {}", String::from_utf8_lossy(&out.stderr));
    }
}

async fn history_rows(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM pgbench_history", &[]).await.expect("count the history").get(0)
}

/// Waits until `c` holds `rows` history rows. Polled at a fiftieth of the
/// time waited so far (10 to 100 ms): a count every 10 ms through a long
/// catch-up took 5 CPU seconds from the very processes being measured, and
/// the reading stays within 2% of the true time.
async fn wait_history(c: &tokio_postgres::Client, rows: i64) {
    let started = Instant::now();
    while history_rows(c).await < rows {
        assert!(started.elapsed() < Duration::from_secs(1800), "the main did not receive every transaction within half an hour");
        let pause = (started.elapsed().as_millis() as u64 / 50).clamp(10, 100);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Every balance at `c` equals the sum of its history's deltas.
async fn check_balances(c: &tokio_postgres::Client, site: &str) {
    let (a, b, t, d, _) = pgbench_sums(c).await;
    assert_eq!((a, b, t), (d, d, d), "{site}: every balance equals the sum of its history");
}

/// One paired round on fresh clusters: (native, branchsync) transactions
/// of the branches applied at the main per second.
async fn paired_round(seconds: u64) -> (f64, f64) {
    let mut topo = Topology::prepare_with(2, PGBENCH_SCHEMA, PGBENCH_DELTA_RULES).await;
    topo.start_all();
    let out = pgbench(&topo.main, &["-i", "-s", "1", "-U", "erp", "-q"]).output().expect("run pgbench -i");
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    wait_converged(&topo.sites(), PGBENCH_TABLES, Duration::from_secs(300)).await;
    for i in 0..3 {
        topo.site_mut(i).stop();
    }

    // Native: the same tables in database `native` at every site, the main
    // subscribed to both branches.
    let native_url = |s: &Site| s.pg.url().replace("dbname=postgres", "dbname=native");
    let mut natives = Vec::new();
    for s in topo.sites() {
        s.db().await.batch_execute("CREATE DATABASE native").await.expect("create database native");
        let out = pgbench_in(s, "native", &["-i", "-s", "1", "-q"]).output().expect("run pgbench -i");
        assert!(out.status.success(), "pgbench -i (native): {}", String::from_utf8_lossy(&out.stderr));
        natives.push(connect(&native_url(s)).await);
    }
    for (i, b) in topo.branches.iter().enumerate() {
        natives[i + 1].batch_execute("ALTER TABLE pgbench_history REPLICA IDENTITY FULL; CREATE PUBLICATION native FOR TABLE pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history").await.expect("publish");
        natives[0].batch_execute(&format!("CREATE SUBSCRIPTION native{i} CONNECTION '{}' PUBLICATION native WITH (copy_data = false)", native_url(b))).await.expect("subscribe");
    }
    let streaming = |n: usize| {
        let c = &natives[n + 1];
        async move {
            let k: i64 = c.query_one("SELECT count(*) FROM pg_stat_replication WHERE application_name LIKE 'native%' AND state = 'streaming'", &[]).await.ok()?.get(0);
            (k == 1).then_some(())
        }
    };
    for i in 0..2 {
        eventually("the native subscription streams", Duration::from_secs(60), || streaming(i)).await;
    }
    for i in 0..2 {
        natives[0].batch_execute(&format!("ALTER SUBSCRIPTION native{i} DISABLE")).await.expect("disable subscription");
    }
    for i in 0..2 {
        eventually("the native slot is released", Duration::from_secs(60), || async {
            let active: bool = natives[i + 1].query_one("SELECT active FROM pg_replication_slots WHERE slot_name = $1", &[&format!("native{i}")]).await.ok()?.get(0);
            (!active).then_some(())
        })
        .await;
    }
    pgbench_everywhere(&topo.sites(), "native", seconds);
    // One subscription after the other: the launcher starts an apply
    // worker up to 5 s after its enable, so each clock starts when its
    // walsender is there and the two times are added (the workers do not
    // get to run side by side).
    let (mut native_txns, mut native_s) = (0, 0.0);
    for i in 0..2 {
        let txns = history_rows(&natives[i + 1]).await;
        let expected = history_rows(&natives[0]).await + txns;
        natives[0].batch_execute(&format!("ALTER SUBSCRIPTION native{i} ENABLE")).await.expect("enable subscription");
        let mut polls = 0u64;
        loop {
            let n: i64 = natives[i + 1].query_one("SELECT count(*) FROM pg_stat_replication WHERE application_name LIKE 'native%'", &[]).await.expect("poll the walsender").get(0);
            if n == 1 {
                break;
            }
            polls += 1;
            assert!(polls < 6_000, "the native apply worker did not connect within a minute");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let t = Instant::now();
        wait_history(&natives[0], expected).await;
        native_s += t.elapsed().as_secs_f64();
        native_txns += txns;
    }
    let native = native_txns as f64 / native_s;
    println!("  native: {native_txns} transactions of the branches applied at the main in {native_s:.2} s");
    for i in 0..2 {
        natives[0].batch_execute(&format!("DROP SUBSCRIPTION native{i}")).await.expect("drop subscription");
    }

    // branchsync: the branches cut off, pgbench everywhere, heal.
    for p in &topo.proxies {
        p.cut();
    }
    topo.start_all();
    let dbs: Vec<tokio_postgres::Client> = {
        let mut v = Vec::new();
        for s in topo.sites() {
            v.push(s.db().await);
        }
        v
    };
    let before: Vec<i64> = {
        let mut v = Vec::new();
        for c in &dbs {
            v.push(history_rows(c).await);
        }
        v
    };
    pgbench_everywhere(&topo.sites(), "postgres", seconds);
    let mut after = Vec::new();
    for c in &dbs {
        after.push(history_rows(c).await);
    }
    let txns: i64 = (1..3).map(|i| after[i] - before[i]).sum();
    let all: i64 = (0..3).map(|i| after[i] - before[i]).sum();
    // Everything the branches committed is in their logs before the heal
    // (each pgbench transaction is one captured transaction).
    for (i, b) in topo.branches.iter().enumerate() {
        let n = after[i + 1] - before[i + 1];
        wait_status(b, "the branch captured its backlog", Duration::from_secs(300), |s| s["captured_transactions"].as_i64().unwrap_or(0) >= n).await;
    }
    let t = Instant::now();
    for p in &topo.proxies {
        p.heal();
    }
    wait_history(&dbs[0], after[0] + txns).await;
    let ours_s = t.elapsed().as_secs_f64();
    let ours = txns as f64 / ours_s;
    println!("  branchsync: {txns} transactions of the branches applied at the main in {ours_s:.1} s");
    wait_converged(&topo.sites(), PGBENCH_TABLES, Duration::from_secs(1800)).await;
    println!("  branchsync: all three sites equal ({all} transactions in all) {:.1} s after the heal", t.elapsed().as_secs_f64());
    for (s, c) in topo.sites().iter().zip(&dbs) {
        check_balances(c, &s.name).await;
    }
    (native, ours)
}
