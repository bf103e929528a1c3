//! Done-when 1: inserts, updates and deletes at every site of a POS-shaped
//! schema converge; per-table checksums are equal at all three sites.

use std::time::Duration;

use branchsync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_and_two_branches_converge_after_writes_everywhere() {
    let mut topo = Topology::prepare(2, POS_SCHEMA).await;
    topo.start_all();
    let main = topo.main.db().await;
    main.batch_execute("INSERT INTO products (name, price, stock) SELECT 'p' || g, g * 1.25, 100 FROM generate_series(1, 20) g").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;

    let b1 = topo.branches[0].db().await;
    let b2 = topo.branches[1].db().await;
    for (c, shop) in [(&main, "main"), (&b1, "branch1"), (&b2, "branch2")] {
        for _ in 0..20 {
            sell(c, shop, 3).await;
        }
        c.batch_execute(&format!(
            "INSERT INTO audit_log (event, payload) VALUES ('sale', '{{\"shop\": \"{shop}\"}}'), ('sale', '{{\"shop\": \"{shop}\"}}'), ('open', NULL);
             INSERT INTO local_cache VALUES ('{shop}', 'stays here');"
        ))
        .await
        .unwrap();
    }
    // Updates and deletes of rows written elsewhere, a key-less multiset
    // update and delete (R11: exactly one of two identical rows).
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(60)).await;
    b1.batch_execute("UPDATE products SET price = price + 1 WHERE id % 2 = 0").await.unwrap();
    b2.batch_execute("UPDATE orders SET note = 'checked' WHERE shop = 'main'").await.unwrap();
    main.batch_execute("DELETE FROM order_lines WHERE order_id IN (SELECT id FROM orders WHERE shop = 'branch2' ORDER BY id LIMIT 2)").await.unwrap();
    b1.batch_execute("DELETE FROM audit_log WHERE ctid = (SELECT ctid FROM audit_log WHERE payload->>'shop' = 'branch2' LIMIT 1)").await.unwrap();
    b2.batch_execute("UPDATE audit_log SET event = 'opened' WHERE ctid = (SELECT ctid FROM audit_log WHERE event = 'open' AND payload IS NULL LIMIT 1)").await.unwrap();
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(60)).await;

    let (n, _) = table_checksum(&main, "audit_log").await;
    assert_eq!(n, 8, "9 rows written, exactly one deleted");
    let opened: i64 = main.query_one("SELECT count(*) FROM audit_log WHERE event = 'opened'", &[]).await.unwrap().get(0);
    assert_eq!(opened, 1, "the multiset update touched exactly one row");
    // Excluded tables stay local.
    for (c, shop) in [(&main, "main"), (&b1, "branch1"), (&b2, "branch2")] {
        let keys: Vec<String> = c.query("SELECT k FROM local_cache", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(keys, vec![shop.to_string()], "excluded table replicated at {shop}");
    }
    // Keys never collide: every order id carries its shop's stripe.
    let bad: i64 = main
        .query_one("SELECT count(*) FROM orders WHERE id % 100 <> CASE shop WHEN 'main' THEN 0 WHEN 'branch1' THEN 1 ELSE 2 END", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
    for s in [&mut topo.main].into_iter().chain(topo.branches.iter_mut()) {
        let st = s.stop().expect("daemon was running");
        assert!(st.success(), "{} did not stop cleanly on SIGTERM: {st:?}", s.name);
    }
}
