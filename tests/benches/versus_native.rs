//! branchsync beside PostgreSQL's own logical replication (issue 14): the
//! same backlog, on the same pair of clusters, applied once by a native
//! subscription and once by branchsync. Prints both figures and their ratio
//! for each round, then the median of the rounds. Not a timed test: it
//! asserts only that every row arrived.
//!
//! ```text
//! cargo build --release -p branchsync-server
//! cargo bench -p branchsync-tests --bench versus_native
//! ```
//!
//! Backlogs (`BENCH_BACKLOG`, default all three):
//! - `lines`: 1,000,000 order lines in transactions of 500 (`BENCH_LINES`);
//! - `sales`: 100,000 one-sale transactions, an order and 4 lines each
//!   (`BENCH_SALES`);
//! - `capture`: not a backlog but the cost of capture to a site's own
//!   sales: pgbench's TPC-B-like transactions at a branch cut off from the
//!   main (`BENCH_PGBENCH_SECONDS`, default 15, 4 clients), once with the
//!   daemon capturing and once with `pg_recvlogical` draining an equivalent
//!   slot (pgoutput, the same publication) instead, twice each per round in
//!   the order A B B A (which of them is A alternates between rounds);
//!   with each, how long after pgbench ends the daemon's capture has caught
//!   up with the WAL (the site's log holds every sale), and where the
//!   machine's CPU went during each run (per kind of process, from `/proc`);
//! - `capture-open`: the same while a till holds a transaction open for
//!   each whole run (`BENCH_OPEN_SECONDS`, default 60): the slot's restart
//!   point cannot pass it, so a capture that decodes again from there on
//!   every poll falls further behind with each poll
//!   (`BRANCHSYNC_TEST_CAPTURE=peek` shows that mode; the default streams).
//!
//! After each `lines` round the peak resident memory of both daemons is
//! printed (the branch's log then held the 1M-change backlog the main
//! applied); after each backlog is captured, how much the branch's log
//! grew beside the bytes of the pgoutput messages its capture received.
//!
//! Each round starts a main and a branch cluster (`fsync = off` on both, the
//! harness setting) with the point-of-sale tables twice: in `public`,
//! replicated by branchsync, and in `native`, published by the branch and
//! subscribed by the main (default subscription options, `copy_data =
//! false`; `REPLICA IDENTITY FULL` like branchsync's tables). The native
//! subscription is disabled while the branch writes its backlog, then
//! enabled; branchsync's link is cut while the branch writes the same
//! backlog (its daemon captures it), then healed. Each figure runs until the
//! backlog's last transaction (a marker order) is visible at the main: for
//! branchsync from the heal (TLS handshake included), for the native
//! subscription from the moment its walsender connected (the launcher starts
//! the worker up to 5 s after the enable; that wait is left out). branchsync runs as in production: TLS on the
//! link, every check of the wire on, the daemon's non-superuser role, the
//! main relaying and echoing what it applies. No daemon runs during the
//! native figure. `BENCH_ROUNDS` (default 3) sets the number of paired
//! rounds.
//!
//! `BENCH_PROFILE=1` also says where branchsync's time goes: both clusters
//! load `pg_stat_statements`, and after each branchsync catch-up the
//! benchmark prints the CPU seconds of each PostgreSQL process (named by
//! its backend type and application name) and the statements that took
//! the most execution time at each site. Profiled rounds are slower; do not
//! quote their figures.

use std::time::{Duration, Instant};

use branchsync_tests::*;

const NATIVE_SCHEMA: &str = "
CREATE SCHEMA native;
CREATE TABLE native.products (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, stock integer NOT NULL DEFAULT 0, CHECK (id >= 0));
CREATE TABLE native.orders (id serial PRIMARY KEY, shop text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), total numeric(12,2) NOT NULL DEFAULT 0, note text);
CREATE TABLE native.order_lines (id bigserial PRIMARY KEY, order_id integer NOT NULL REFERENCES native.orders(id), product_id integer NOT NULL REFERENCES native.products(id), qty integer NOT NULL, price numeric(10,2) NOT NULL);
ALTER TABLE native.products REPLICA IDENTITY FULL;
ALTER TABLE native.orders REPLICA IDENTITY FULL;
ALTER TABLE native.order_lines REPLICA IDENTITY FULL;
CREATE PUBLICATION native FOR TABLE native.products, native.orders, native.order_lines;
";

/// The marker order that ends every backlog.
const MARKER: &str = "end-of-backlog";

#[derive(Clone, Copy, PartialEq)]
enum Backlog {
    /// Order lines in transactions of 500.
    Lines(i64),
    /// One-sale transactions (an order and 4 lines).
    Sales(i64),
}

impl Backlog {
    fn name(self) -> String {
        match self {
            Backlog::Lines(n) => format!("{n} order lines in transactions of 500"),
            Backlog::Sales(n) => format!("{n} one-sale transactions (an order + 4 lines)"),
        }
    }

    /// (rows, transactions), the marker excluded.
    fn size(self) -> (i64, i64) {
        match self {
            Backlog::Lines(n) => (n / 500 * 500, n / 500),
            Backlog::Sales(n) => (n * 5, n),
        }
    }

    /// The statement that writes the backlog into `schema`'s tables, then
    /// the marker, each in its own transaction.
    fn sql(self, schema: &str) -> String {
        let body = match self {
            Backlog::Lines(n) => format!(
                "FOR t IN 1..{txns} LOOP
                   INSERT INTO {schema}.order_lines (order_id, product_id, qty, price)
                     SELECT o[1 + g % array_length(o, 1)], p[1 + g % array_length(p, 1)], 1, 2.5 FROM generate_series(1, 500) g;
                   COMMIT;
                 END LOOP;",
                txns = n / 500
            ),
            Backlog::Sales(n) => format!(
                "FOR t IN 1..{n} LOOP
                   INSERT INTO {schema}.orders (shop, total) VALUES ('branch1', 10) RETURNING id INTO oid;
                   INSERT INTO {schema}.order_lines (order_id, product_id, qty, price)
                     SELECT oid, p[1 + g % array_length(p, 1)], 1, 2.5 FROM generate_series(1, 4) g;
                   COMMIT;
                 END LOOP;"
            ),
        };
        format!(
            "DO $$ DECLARE o int[]; p int[]; oid int; BEGIN
               o := ARRAY(SELECT id FROM {schema}.orders ORDER BY id);
               p := ARRAY(SELECT id FROM {schema}.products ORDER BY id);
               {body}
               INSERT INTO {schema}.orders (shop) VALUES ('{MARKER}');
             END $$"
        )
    }
}

/// Parents every backlog refers to: 10 products and 1,000 orders.
fn parents(schema: &str) -> String {
    format!(
        "INSERT INTO {schema}.products (name, price) SELECT 'p' || g, g FROM generate_series(1, 10) g;
         INSERT INTO {schema}.orders (shop) SELECT 'branch1' FROM generate_series(1, 1000);"
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run());
}

/// The median of the rounds' figures.
fn mid(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_i64(name: &str, default: i64) -> i64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

async fn run() {
    let rounds = env_i64("BENCH_ROUNDS", 3).max(1) as usize;
    let which = std::env::var("BENCH_BACKLOG").unwrap_or_default();
    let mut backlogs = Vec::new();
    if which.is_empty() || which == "lines" {
        backlogs.push(Backlog::Lines(env_i64("BENCH_LINES", 1_000_000)));
    }
    if which.is_empty() || which == "sales" {
        backlogs.push(Backlog::Sales(env_i64("BENCH_SALES", 100_000)));
    }
    let mut summary = Vec::new();
    if which.is_empty() || which == "capture" {
        summary.push(capture_rounds(rounds, false).await);
    }
    if which.is_empty() || which == "capture-open" {
        summary.push(capture_rounds(rounds, true).await);
    }
    for b in backlogs {
        let (rows, txns) = b.size();
        println!("== {}: {rows} rows, {txns} transactions; {rounds} paired rounds", b.name());
        let mut ratios = Vec::new();
        let mut figures = Vec::new();
        for round in 1..=rounds {
            let (native, ours) = paired_round(b).await;
            let ratio = native / ours;
            println!(
                "round {round}: native {native:.2} s = {:.0} rows/s, {:.0} transactions/s | branchsync {ours:.2} s = {:.0} rows/s, {:.0} transactions/s | branchsync/native = {ratio:.2}x",
                rows as f64 / native,
                txns as f64 / native,
                rows as f64 / ours,
                txns as f64 / ours
            );
            ratios.push(ratio);
            figures.push((native, ours));
        }
        let native = mid(figures.iter().map(|f| f.0).collect());
        let ours = mid(figures.iter().map(|f| f.1).collect());
        let line = format!(
            "{}: native {:.0} rows/s ({:.0} transactions/s), branchsync {:.0} rows/s ({:.0} transactions/s), median ratio {:.2}x",
            b.name(),
            rows as f64 / native,
            txns as f64 / native,
            rows as f64 / ours,
            txns as f64 / ours,
            mid(ratios)
        );
        println!("median of {rounds}: {line}");
        summary.push(line);
    }
    println!("== summary");
    for l in summary {
        println!("{l}");
    }
}

/// One paired round on fresh clusters: (native seconds, branchsync seconds).
async fn paired_round(b: Backlog) -> (f64, f64) {
    let schema = format!("{POS_SCHEMA}{NATIVE_SCHEMA}");
    let mut topo = Topology::prepare(1, &schema).await;
    let profile = std::env::var("BENCH_PROFILE").is_ok_and(|v| v == "1");
    if profile {
        for s in [&topo.main, &topo.branches[0]] {
            s.db().await.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'").await.expect("load pg_stat_statements");
            s.pg.restart_with_env(Vec::new());
            s.db().await.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.expect("create pg_stat_statements");
        }
    }
    let main = topo.main.db().await;
    let branch = topo.branches[0].db().await;
    let (rows, txns) = b.size();

    // Native: subscribe, wait for the walsender, stop it, write, resume.
    branch.batch_execute(&parents("native")).await.expect("native parents");
    main.batch_execute(&parents("native")).await.expect("native parents at the main");
    let conninfo = topo.branches[0].pg.url();
    main.batch_execute(&format!("CREATE SUBSCRIPTION native CONNECTION '{conninfo}' PUBLICATION native WITH (copy_data = false)")).await.expect("create subscription");
    eventually("the native subscription streams", Duration::from_secs(60), || async {
        let n: i64 = branch.query_one("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'native' AND state = 'streaming'", &[]).await.ok()?.get(0);
        (n == 1).then_some(())
    })
    .await;
    main.batch_execute("ALTER SUBSCRIPTION native DISABLE").await.expect("disable subscription");
    eventually("the native slot is released", Duration::from_secs(60), || async {
        let active: bool = branch.query_one("SELECT active FROM pg_replication_slots WHERE slot_name = 'native'", &[]).await.ok()?.get(0);
        (!active).then_some(())
    })
    .await;
    let t = Instant::now();
    branch.batch_execute(&b.sql("native")).await.expect("native backlog");
    println!("  native backlog written in {:.1} s", t.elapsed().as_secs_f64());
    let pgs = [postmaster_pid(&topo.main), postmaster_pid(&topo.branches[0])];
    let cpu0: Vec<f64> = pgs.iter().map(|p| p.map_or(0.0, cpu_seconds)).collect();
    main.batch_execute("ALTER SUBSCRIPTION native ENABLE").await.expect("enable subscription");
    // The launcher starts the apply worker up to `wal_retrieve_retry_interval`
    // (5 s) later: the clock starts when its walsender is there.
    let mut polls = 0u64;
    loop {
        let n: i64 = branch.query_one("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'native'", &[]).await.expect("poll the walsender").get(0);
        if n == 1 {
            break;
        }
        polls += 1;
        assert!(polls < 6_000, "the native apply worker did not connect within a minute");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let marker = marker_id(&branch, "native").await;
    let t = Instant::now();
    wait_marker(&main, "native", marker).await;
    let native = t.elapsed().as_secs_f64();
    let spent: Vec<f64> = pgs.iter().zip(&cpu0).map(|(p, c0)| p.map_or(0.0, cpu_seconds) - c0).collect();
    println!("  CPU during the native catch-up ({native:.1} s on 2 cores): main's PostgreSQL {:.1} s, branch's PostgreSQL {:.1} s", spent[0], spent[1]);
    main.batch_execute("DROP SUBSCRIPTION native").await.expect("drop subscription");
    check_rows(&main, "native", rows).await;

    // branchsync: link up, parents synced, link cut, write, heal.
    topo.start_all();
    branch.batch_execute(&parents("public")).await.expect("parents");
    eventually("the parents reach the main", Duration::from_secs(120), || async {
        let n: i64 = main.query_one("SELECT count(*) FROM orders", &[]).await.ok()?.get(0);
        (n == 1000).then_some(())
    })
    .await;
    let st0 = wait_status(&topo.branches[0], "branch status", Duration::from_secs(30), |_| true).await;
    let before = st0["captured_transactions"].as_i64().unwrap_or(0);
    topo.proxies[0].cut();
    let t = Instant::now();
    branch.batch_execute(&b.sql("public")).await.expect("backlog");
    let st1 = wait_status(&topo.branches[0], "the branch captured the backlog", Duration::from_secs(1800), |s| {
        s["captured_transactions"].as_i64().unwrap_or(0) >= before + txns + 1
    })
    .await;
    println!("  branchsync backlog written and captured in {:.1} s", t.elapsed().as_secs_f64());
    // The link is cut: nothing of the backlog is acknowledged or reclaimed.
    let grew = |k: &str| st1[k].as_u64().unwrap_or(0).saturating_sub(st0[k].as_u64().unwrap_or(0));
    let (log_bytes, pgoutput_bytes) = (grew("log_bytes"), grew("captured_pgoutput_bytes"));
    println!(
        "  the branch's log grew by {:.1} MiB for {:.1} MiB of pgoutput messages decoded: {:.2}x",
        log_bytes as f64 / 1048576.0,
        pgoutput_bytes as f64 / 1048576.0,
        log_bytes as f64 / pgoutput_bytes.max(1) as f64
    );
    let groups = [
        ("main's PostgreSQL", postmaster_pid(&topo.main)),
        ("main's daemon", topo.main.pid()),
        ("branch's PostgreSQL", postmaster_pid(&topo.branches[0])),
        ("branch's daemon", topo.branches[0].pid()),
    ];
    let cpu0: Vec<f64> = groups.iter().map(|(_, p)| p.map_or(0.0, cpu_seconds)).collect();
    let backends0 = if profile { Some((backend_cpu(&main).await, backend_cpu(&branch).await)) } else { None };
    if profile {
        for c in [&main, &branch] {
            c.batch_execute("SELECT pg_stat_statements_reset()").await.expect("reset pg_stat_statements");
        }
    }
    let marker = marker_id(&branch, "public").await;
    let t = Instant::now();
    topo.proxies[0].heal();
    wait_marker(&main, "public", marker).await;
    let ours = t.elapsed().as_secs_f64();
    let spent: Vec<String> = groups.iter().zip(&cpu0).map(|((name, p), c0)| format!("{name} {:.1} s", p.map_or(0.0, cpu_seconds) - c0)).collect();
    println!("  CPU during branchsync's catch-up ({ours:.1} s on 2 cores): {}", spent.join(", "));
    if let Some((m0, b0)) = backends0 {
        for (site, c, before) in [("main", &main, m0), ("branch", &branch, b0)] {
            println!("  {site}'s PostgreSQL processes (CPU seconds during the catch-up):");
            for (pid, (what, cpu)) in backend_cpu(c).await {
                let spent = cpu - before.get(&pid).map_or(0.0, |b| b.1);
                if spent >= 0.05 {
                    println!("    {spent:6.1} s  {what}");
                }
            }
            println!("  {site}'s statements by execution time (ms total, calls, rows):");
            let top = c
                .query(
                    "SELECT round(total_exec_time)::int8, calls, rows, regexp_replace(left(query, 160), '\\s+', ' ', 'g') \
                     FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12",
                    &[],
                )
                .await
                .expect("read pg_stat_statements");
            for r in top {
                println!("    {:>8} {:>8} {:>9}  {}", r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, String>(3));
            }
        }
    }
    check_rows(&main, "public", rows).await;
    if matches!(b, Backlog::Lines(_)) {
        let mib = |p: Option<u32>| p.and_then(peak_rss_kib).map_or("?".to_string(), |k| format!("{:.0} MiB", k as f64 / 1024.0));
        println!("  peak resident memory: main's daemon {}, branch's daemon {}", mib(topo.main.pid()), mib(topo.branches[0].pid()));
    }
    (native, ours)
}

/// The `capture` figure: `rounds` paired runs of pgbench at a branch cut
/// off from the main, with its daemon capturing and with `pg_recvlogical`
/// draining a pgoutput slot of the same publication instead. Returns the
/// summary line.
async fn capture_rounds(rounds: usize, open: bool) -> String {
    let seconds = if open { env_i64("BENCH_OPEN_SECONDS", 60) } else { env_i64("BENCH_PGBENCH_SECONDS", 15) }.max(1);
    let mode = std::env::var("BRANCHSYNC_TEST_CAPTURE").unwrap_or_else(|_| "stream".into());
    let what = if open { format!("capture ({mode}) with a till's transaction open") } else { format!("capture ({mode})") };
    println!("== {what}: pgbench (TPC-B-like, 4 clients, {seconds} s) at a branch cut off from the main; {rounds} paired rounds");
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let (theirs, ours, lag) = capture_round(round % 2 == 0, seconds, open).await;
        println!("round {round}: pg_recvlogical {theirs:.0} TPS | branchsync capturing {ours:.0} TPS | ratio {:.2}x | capture caught up {lag:.1} s after pgbench ended", ours / theirs);
        rows.push((theirs, ours, lag));
    }
    // Also every round's steps together: over an even number of rounds
    // each side ran as often in the outer as in the middle positions.
    let pooled = rows.iter().map(|p| p.1).sum::<f64>() / rows.iter().map(|p| p.0).sum::<f64>();
    let line = format!(
        "{what} (pgbench at a branch): pg_recvlogical {:.0} TPS, branchsync {:.0} TPS, median ratio {:.2}x (all rounds pooled {pooled:.2}x); caught up {:.1} s after the run",
        mid(rows.iter().map(|p| p.0).collect()),
        mid(rows.iter().map(|p| p.1).collect()),
        mid(rows.iter().map(|p| p.1 / p.0).collect()),
        mid(rows.iter().map(|p| p.2).collect())
    );
    println!("median of {rounds}: {line}");
    line
}

/// pgbench's TPS (excluding connection time) over `seconds`.
fn pgbench_tps(site: &Site, seconds: i64) -> f64 {
    let out = pgbench(site, &["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string(), "-U", "postgres"]).output().expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {}{}", text, String::from_utf8_lossy(&out.stderr));
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no TPS in pgbench's output: {text}"))
}

/// One paired run on fresh clusters, four pgbench runs in the order A B B
/// A: (mean TPS beside `pg_recvlogical`, mean TPS beside the capturing
/// daemon, seconds from the end of its last pgbench run until capture had
/// caught up); `recvlogical_first` makes `pg_recvlogical` A; with
/// `open`, a till's transaction stays open at the branch throughout.
async fn capture_round(recvlogical_first: bool, seconds: i64, open: bool) -> (f64, f64, f64) {
    let mut topo = Topology::prepare(1, &format!("{POS_SCHEMA}CREATE ROLE erp LOGIN; GRANT CREATE ON SCHEMA public TO erp;")).await;
    topo.start_all();
    // Schema changes come from the main, made by the application's role.
    let out = pgbench(&topo.main, &["-i", "-s", "1", "-q", "-U", "erp"]).output().expect("run pgbench -i");
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    let branch = topo.branches[0].db().await;
    eventually("pgbench's tables reach the branch", Duration::from_secs(300), || async {
        let n: i64 = branch.query_one("SELECT count(*) FROM pgbench_accounts", &[]).await.ok()?.get(0);
        (n == 100_000).then_some(())
    })
    .await;
    topo.proxies[0].cut();
    let conn = topo.branches[0].pg.url();
    let recv = |args: &[&str]| {
        let mut c = std::process::Command::new(pg_bin_dir().join("pg_recvlogical"));
        c.args(["-d", &conn, "-S", "bench"]).args(args);
        c
    };
    // Creating a slot waits for every open transaction to end: pg_recvlogical's
    // is made before the till opens.
    let st = recv(&["--create-slot", "-P", "pgoutput"]).status().expect("run pg_recvlogical --create-slot");
    assert!(st.success(), "pg_recvlogical --create-slot");
    // A till left in a transaction for each step's whole run: it holds an
    // xid (it wrote a row). It also holds back vacuum, so pgbench's rows
    // bloat while it is open: each step opens its own and vacuums after it.
    let till = topo.branches[0].db().await;
    let open_till = || async {
        if open {
            till.batch_execute("BEGIN; INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 0, now())").await.expect("open the till's transaction");
        }
    };
    let close_till = || async {
        if open {
            till.batch_execute("ROLLBACK").await.expect("end the till's transaction");
            till.batch_execute("VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts").await.expect("vacuum pgbench's tables");
        }
    };
    // TPS of each step beside pg_recvlogical and beside the daemon.
    let (mut theirs, mut ours) = (Vec::new(), Vec::new());
    let mut lag = f64::NAN;
    // Each step starts from the same state: the dead rows of the step
    // before vacuumed, its dirty pages written (a checkpoint or a vacuum
    // falling into one step's 15 s but not the other's moved single
    // rounds by 10-20%).
    let settle = || async {
        branch.batch_execute("VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history").await.expect("vacuum pgbench's tables");
        branch.batch_execute("CHECKPOINT").await.expect("checkpoint the branch");
    };
    // Four steps, A B B A: the machine's speed drifts over minutes (by tens
    // of percent on a shared two-core machine), and in this order a steady
    // drift weighs on both sides alike.
    for step in 0..4 {
        settle().await;
        if (step == 0 || step == 3) == recvlogical_first {
            // The daemon stopped; pg_recvlogical drains a slot of the same
            // publication while pgbench runs.
            topo.branches[0].stop();
            // Its slot starts from here, not from what the daemon's run wrote.
            branch
                .execute("SELECT pg_replication_slot_advance('bench', pg_current_wal_lsn())", &[])
                .await
                .expect("advance pg_recvlogical's slot");
            let mut child = recv(&["--start", "-o", "proto_version=1", "-o", "publication_names=branchsync", "-f", "/dev/null"])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start pg_recvlogical");
            open_till().await;
            let cpu0 = cpu_reading(&topo.main, &topo.branches[0]);
            let tps = pgbench_tps(&topo.branches[0], seconds);
            theirs.push(tps);
            print_cpu(&format!("beside pg_recvlogical, {tps:.0} TPS"), &cpu0, &cpu_reading(&topo.main, &topo.branches[0]));
            let _ = child.kill();
            let _ = child.wait();
            close_till().await;
            topo.branches[0].start();
        } else {
            // The daemon capturing (the link is cut: capture only), once it
            // has caught up with what was written before.
            let branch = topo.branches[0].db().await;
            let now: u64 = branch.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.expect("read the WAL position").get::<_, i64>(0).try_into().unwrap_or(0);
            wait_status(&topo.branches[0], "the branch's capture caught up", Duration::from_secs(600), |s| {
                s["caught_up_lsn"].as_str().and_then(branchsync_engine::pg::parse_lsn).is_some_and(|l| l >= now)
            })
            .await;
            let before = wait_status(&topo.branches[0], "branch status", Duration::from_secs(60), |_| true).await["captured_transactions"].as_i64().unwrap_or(0);
            open_till().await;
            let cpu0 = cpu_reading(&topo.main, &topo.branches[0]);
            let tps = pgbench_tps(&topo.branches[0], seconds);
            ours.push(tps);
            print_cpu(&format!("beside the daemon, {tps:.0} TPS"), &cpu0, &cpu_reading(&topo.main, &topo.branches[0]));
            let ended = Instant::now();
            let end: u64 = branch.query_one("SELECT (pg_current_wal_lsn() - '0/0')::int8", &[]).await.expect("read the WAL position").get::<_, i64>(0).try_into().unwrap_or(0);
            wait_status(&topo.branches[0], "the branch captured pgbench's transactions", Duration::from_secs(1800), |s| {
                s["captured_transactions"].as_i64().unwrap_or(0) > before
                    && s["caught_up_lsn"].as_str().and_then(branchsync_engine::pg::parse_lsn).is_some_and(|l| l >= end)
            })
            .await;
            lag = ended.elapsed().as_secs_f64();
            close_till().await;
        }
    }
    let st = recv(&["--drop-slot"]).status().expect("run pg_recvlogical --drop-slot");
    assert!(st.success(), "pg_recvlogical --drop-slot");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&theirs), mean(&ours), lag)
}

/// Where the machine's CPU went while pgbench ran: per kind of process,
/// from `/proc` (utime + stime of every process, and of the children the
/// postmasters and this process reaped in the meantime: pgbench's
/// backends and pgbench itself end before the second reading).
struct CpuReading {
    at: Instant,
    by_kind: std::collections::BTreeMap<String, f64>,
}

fn cpu_reading(main: &Site, branch: &Site) -> CpuReading {
    let (main_pm, branch_pm) = (postmaster_pid(main).unwrap_or(0), postmaster_pid(branch).unwrap_or(0));
    let (main_d, branch_d) = (main.pid().unwrap_or(0), branch.pid().unwrap_or(0));
    let me = std::process::id();
    let mut by_kind = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Ok(pid) = name.parse::<u32>() else { continue };
        let Some((comm, f)) = proc_stat(pid) else { continue };
        let own = f.get(11..13).map_or(0, |t| t.iter().sum::<u64>()) as f64 / 100.0;
        let reaped = f.get(13..15).map_or(0, |t| t.iter().sum::<u64>()) as f64 / 100.0;
        let ppid = f.get(1).copied().unwrap_or(0) as u32;
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default().replace('\0', " ");
        let site = if ppid == main_pm || pid == main_pm { Some("main") } else if ppid == branch_pm || pid == branch_pm { Some("branch") } else { None };
        let kind = if pid == branch_d {
            "branch daemon".to_string()
        } else if pid == main_d {
            "main daemon".to_string()
        } else if let Some(site) = site {
            let title = cmdline.trim().strip_prefix("postgres: ").unwrap_or("postmaster");
            let what = if title.starts_with("walsender") {
                "walsender".to_string()
            } else if title.contains('(') {
                format!("backend of {}", title.split_whitespace().next().unwrap_or("?"))
            } else {
                title.to_string()
            };
            format!("{site} pg: {what}")
        } else {
            comm
        };
        // The processes that wake for each transaction: how often their
        // threads were switched out (voluntarily or not).
        if kind.contains("daemon") || kind.contains("walsender") || kind == "pg_recvlogical" {
            let mut switches = 0u64;
            for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
                let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                switches += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
            *by_kind.entry(format!("{kind} (thousand context switches)")).or_insert(0.0) += switches as f64 / 1000.0;
        }
        *by_kind.entry(kind).or_insert(0.0) += own;
        if pid == main_pm || pid == branch_pm || pid == me {
            let who = if pid == me { "bench's ended children (pgbench)".to_string() } else { format!("{} pg: ended backends", site.unwrap_or("?")) };
            *by_kind.entry(who).or_insert(0.0) += reaped;
        }
    }
    CpuReading { at: Instant::now(), by_kind }
}

/// Prints the CPU seconds each kind of process used between two readings
/// (the larger ones), and the machine's total beside the wall time.
fn print_cpu(step: &str, before: &CpuReading, after: &CpuReading) {
    let wall = after.at.duration_since(before.at).as_secs_f64();
    let mut used: Vec<(String, f64)> = after
        .by_kind
        .iter()
        .map(|(k, v)| (k.clone(), v - before.by_kind.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d >= 0.05)
        .collect();
    used.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = used.iter().filter(|u| !u.0.contains("context switches")).map(|u| u.1).sum();
    let parts: Vec<String> = used.iter().take(14).map(|(k, d)| format!("{k} {d:.1}")).collect();
    println!("  cpu {step}: {total:.1} s in {wall:.1} s of wall time: {}", parts.join(", "));
}

/// CPU seconds so far of each PostgreSQL process a cluster runs now, by
/// pid: its backend type and application name, and its CPU seconds.
async fn backend_cpu(c: &tokio_postgres::Client) -> std::collections::BTreeMap<i32, (String, f64)> {
    let rows = c
        .query("SELECT pid, backend_type || coalesce(' ' || nullif(application_name, ''), '') FROM pg_stat_activity", &[])
        .await
        .expect("read pg_stat_activity");
    rows.iter()
        .map(|r| {
            let pid: i32 = r.get(0);
            (pid, (r.get::<_, String>(1), own_cpu_seconds(pid as u32)))
        })
        .collect()
}

/// CPU seconds of one process (0 when it is gone).
fn own_cpu_seconds(pid: u32) -> f64 {
    proc_stat(pid).map_or(0, |(_, f)| f.get(11..13).map_or(0, |t| t.iter().sum())) as f64 / 100.0
}

/// A process's command and the fields of `/proc/<pid>/stat` after it
/// (numbered from 0 there: 1 = ppid, 11..15 = utime, stime, cutime,
/// cstime, in clock ticks of 1/100 s).
fn proc_stat(pid: u32) -> Option<(String, Vec<u64>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    Some((stat[open + 1..close].to_string(), stat[close + 2..].split_whitespace().map(|f| f.parse().unwrap_or(0)).collect()))
}

/// The postmaster of a site's cluster.
fn postmaster_pid(site: &Site) -> Option<u32> {
    let text = std::fs::read_to_string(site.pg.data_dir().join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// CPU seconds of a process, its children that ended (reaped), and its
/// running children: a PostgreSQL cluster's whole use, given its postmaster.
fn cpu_seconds(pid: u32) -> f64 {
    let fields = |pid: &str| pid.parse().ok().and_then(proc_stat).map(|(_, f)| f);
    let mut ticks = 0;
    if let Some(f) = fields(&pid.to_string()) {
        ticks += f.get(11..15).map_or(0, |t| t.iter().sum());
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(f) = fields(&name) {
            if f.get(1) == Some(&u64::from(pid)) {
                ticks += f.get(11..13).map_or(0, |t| t.iter().sum());
            }
        }
    }
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// The key of the backlog's marker order (read at the branch, before the
/// clock starts).
async fn marker_id(branch: &tokio_postgres::Client, schema: &str) -> i32 {
    branch.query_one(&format!("SELECT id FROM {schema}.orders WHERE shop = '{MARKER}'"), &[]).await.expect("the marker order").get(0)
}

/// Waits until the backlog's marker order is visible at the main: every
/// transaction before it is then applied too (both apply in commit order).
/// Polled by key, so the polling costs the main next to nothing.
async fn wait_marker(main: &tokio_postgres::Client, schema: &str, id: i32) {
    let q = format!("SELECT count(*) FROM {schema}.orders WHERE id = {id} AND shop = '{MARKER}'");
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let n: i64 = main.query_one(&q, &[]).await.expect("poll the marker").get(0);
        if n == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "the backlog did not reach the main's {schema} tables within an hour");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every row of the backlog arrived: the backlog's rows plus the parents.
async fn check_rows(main: &tokio_postgres::Client, schema: &str, rows: i64) {
    let q = format!("SELECT (SELECT count(*) FROM {schema}.orders) + (SELECT count(*) FROM {schema}.order_lines)");
    let n: i64 = main.query_one(&q, &[]).await.expect("count").get(0);
    assert_eq!(n, rows + 1000 + 1, "rows of the backlog at the main's {schema} tables");
}
