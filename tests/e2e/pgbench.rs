//! Issue 4, done-when 2: pgbench as an outside workload.
//!
//! `pgbench -i` at the main (its tables reach the branches as DDL and rows),
//! then pgbench runs at the main and at both branches at once while the
//! branches are cut off, and the links heal. With the balance columns as
//! delta columns, every site ends with identical tables and
//! sum(abalance) = sum(bbalance) = sum(tbalance) = sum(delta) over every
//! site's pgbench_history rows.

use std::time::Duration;

use branchsync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_at_three_sites_while_apart_keeps_every_balance_equal_to_the_history() {
    let t0 = std::time::Instant::now();
    let mut topo = Topology::prepare_with(2, PGBENCH_SCHEMA, PGBENCH_DELTA_RULES).await;
    topo.start_all();
    let out = pgbench(&topo.main, &["-i", "-s", "1", "-U", "erp", "-q"]).output().expect("run pgbench -i");
    assert!(out.status.success(), "pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    wait_converged(&topo.sites(), PGBENCH_TABLES, Duration::from_secs(180)).await;
    // pgbench -i adds the primary keys after loading the rows, when
    // autovacuum is busy with the new tables: every site gets them, none
    // records the schema change as failed (as CI once saw at a branch, which
    // then sold on a table without its key).
    for s in topo.sites() {
        let c = s.db().await;
        let keys = "SELECT count(*) FROM pg_catalog.pg_constraint WHERE contype = 'p' AND conrelid::regclass::text LIKE 'pgbench_%'";
        eventually(&format!("{} has the three primary keys of pgbench -i", s.name), Duration::from_secs(60), || async {
            (c.query_one(keys, &[]).await.ok()?.get::<_, i64>(0) == 3).then_some(())
        })
        .await;
        let st = http_status(s.http_port).await.expect("status");
        assert_eq!(st["ddl"]["failed"], 0, "{}: no schema change of pgbench -i failed: {}", s.name, st["ddl"]);
    }
    println!("pgbench -i replicated to every site after {:.1} s", t0.elapsed().as_secs_f64());

    for p in &topo.proxies {
        p.cut();
    }
    for b in &topo.branches {
        let name = b.name.clone();
        wait_status(&topo.main, "the branches are cut off", Duration::from_secs(20), |s| s["peers"][&name]["connected"] == false).await;
    }
    let runs: Vec<_> = topo
        .sites()
        .into_iter()
        .map(|s| (s.name.clone(), pgbench(s, &["-n", "-T", "3", "-c", "2", "-j", "1", "-U", "postgres"]).spawn().expect("start pgbench")))
        .collect();
    for (name, child) in runs {
        let out = child.wait_with_output().expect("pgbench");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "pgbench at {name}: {}", String::from_utf8_lossy(&out.stderr));
        let tps = text.lines().find(|l| l.starts_with("tps")).unwrap_or("");
        println!("pgbench at {name} while cut off: {tps}");
    }
    let healed = std::time::Instant::now();
    for p in &topo.proxies {
        p.heal();
    }
    wait_converged(&topo.sites(), PGBENCH_TABLES, Duration::from_secs(300)).await;
    println!("converged {:.1} s after the links healed", healed.elapsed().as_secs_f64());
    for s in topo.sites() {
        let c = s.db().await;
        let (a, b, t, d, n) = pgbench_sums(&c).await;
        println!("{}: {n} transactions in the history, sum(delta) = {d}", s.name);
        assert!(n > 0, "pgbench ran");
        assert_eq!((a, b, t), (d, d, d), "{}: sum(abalance), sum(bbalance), sum(tbalance) = sum(delta)", s.name);
    }
}
