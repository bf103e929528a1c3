//! Done-when 2: a branch cut off (daemon running, link down) sells 1,000
//! orders with lines while the main and the other branch also write; when
//! the link is back everything converges with no key collision and no row
//! missing or doubled.

use std::time::Duration;

use branchsync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_sells_a_thousand_orders_offline_and_catches_up() {
    let mut topo = Topology::prepare(2, POS_SCHEMA).await;
    topo.start_all();
    let main = topo.main.db().await;
    main.batch_execute("INSERT INTO products (name, price, stock) SELECT 'p' || g, g, 1000 FROM generate_series(1, 10) g").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;

    topo.proxies[0].cut();
    wait_status(&topo.main, "main sees branch1 disconnected", Duration::from_secs(20), |s| s["peers"]["branch1"]["connected"] == false).await;

    let b1 = topo.branches[0].db().await;
    let b2 = topo.branches[1].db().await;
    for i in 0..1000 {
        sell(&b1, "branch1", 2).await;
        if i % 20 == 0 {
            sell(&main, "main", 2).await;
            sell(&b2, "branch2", 2).await;
        }
    }
    // The cut-off branch still captures while offline.
    let st = wait_status(&topo.branches[0], "branch1 captured its offline sales", Duration::from_secs(60), |s| {
        s["captured_transactions"].as_u64().unwrap_or(0) >= 1000
    })
    .await;
    assert_eq!(st["peers"]["main"]["connected"], false, "the link must really be down");

    topo.proxies[0].heal();
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(120)).await;

    for (name, c) in [("main", &main), ("branch1", &b1), ("branch2", &b2)] {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE shop = 'branch1'), count(*) FILTER (WHERE shop = 'main'), count(*) FILTER (WHERE shop = 'branch2'), \
                        (SELECT count(*) FROM order_lines), count(DISTINCT id) = count(*) FROM orders",
                &[],
            )
            .await
            .unwrap();
        let (b1n, mn, b2n, lines, unique): (i64, i64, i64, i64, bool) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!((b1n, mn, b2n), (1000, 50, 50), "order counts at {name}");
        assert_eq!(lines, 2 * 1100, "order lines at {name}");
        assert!(unique, "duplicate order ids at {name}");
        let orphans: i64 = c.query_one("SELECT count(*) FROM order_lines l LEFT JOIN orders o ON o.id = l.order_id WHERE o.id IS NULL", &[]).await.unwrap().get(0);
        assert_eq!(orphans, 0, "order lines without their order at {name}");
    }
    let conflicts: i64 = main.query_one("SELECT count(*) FROM branchsync.conflicts", &[]).await.unwrap().get(0);
    assert_eq!(conflicts, 0, "inserts of striped keys never conflict");
}

/// The nice value of a daemon's capture thread, read from /proc.
fn capture_thread_nice(site: &Site) -> Option<i64> {
    let pid = site.pid()?;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != "branchsync-capt" {
            continue;
        }
        // Fields after the command's closing parenthesis; nice is field 19.
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        return rest.split(' ').nth(16).and_then(|n| n.parse().ok());
    }
    None
}

/// A shop's PC serves its cashiers before their capture: the branch's
/// capture thread runs at `database.capture_nice` (10 by default), the
/// main's as configured (0 here: the daemon's own priority), and a cut-off
/// branch's sales are still captured at the lowered priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_runs_on_its_own_thread_at_the_configured_priority() {
    let mut topo = Topology::prepare(1, POS_SCHEMA).await;
    edit_config(&topo.main, "[database]\n", "[database]\ncapture_nice = 0\n");
    topo.start_all();
    stock_the_shelves(&topo).await;
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    let branch_nice = eventually("the branch's capture thread", Duration::from_secs(20), || async { capture_thread_nice(&topo.branches[0]) }).await;
    let main_nice = eventually("the main's capture thread", Duration::from_secs(20), || async { capture_thread_nice(&topo.main) }).await;
    assert_eq!((branch_nice, main_nice), (10, 0), "capture threads' nice values (branch, main)");

    topo.proxies[0].cut();
    let before = wait_status(&topo.branches[0], "branch status", Duration::from_secs(20), |_| true).await["captured_transactions"].as_i64().unwrap_or(0);
    let b1 = topo.branches[0].db().await;
    for _ in 0..50 {
        sell(&b1, "branch1", 3).await;
    }
    wait_status(&topo.branches[0], "the cut-off branch captured its 50 sales", Duration::from_secs(60), |s| {
        s["captured_transactions"].as_i64().unwrap_or(0) >= before + 50
    })
    .await;
    topo.proxies[0].heal();
    wait_converged(&topo.sites(), &["orders", "order_lines"], Duration::from_secs(60)).await;
}
