//! Done-when 4: branch1 writes, the main writes rows that depend on them,
//! and branch2 receives both in that order: a trigger at branch2, enabled
//! ALWAYS (so it fires under session_replication_role = replica), fails any
//! order line whose order or product is not there yet.

use std::time::Duration;

use branchsync_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_depend_on_another_branch_arrive_after_their_parents() {
    let mut topo = Topology::prepare(2, POS_SCHEMA).await;
    let b2 = topo.branches[1].db().await;
    b2.batch_execute(
        "CREATE TABLE parents_missing (n integer);
         CREATE FUNCTION assert_parents() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NOT EXISTS (SELECT 1 FROM orders WHERE id = NEW.order_id) OR NOT EXISTS (SELECT 1 FROM products WHERE id = NEW.product_id) THEN
             RAISE EXCEPTION 'order line % arrived before its parents', NEW.id;
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER assert_parents BEFORE INSERT ON order_lines FOR EACH ROW EXECUTE FUNCTION assert_parents();
         ALTER TABLE order_lines ENABLE ALWAYS TRIGGER assert_parents;",
    )
    .await
    .unwrap();
    topo.start_all();
    let b1 = topo.branches[0].db().await;
    let main = topo.main.db().await;
    for round in 0..30 {
        // branch1 creates a product and an order...
        let pid: i32 = b1.query_one("INSERT INTO products (name, price) VALUES ($1, 2.5) RETURNING id", &[&format!("new{round}")]).await.unwrap().get(0);
        let oid: i32 = b1.query_one("INSERT INTO orders (shop) VALUES ('branch1') RETURNING id", &[]).await.unwrap().get(0);
        // ...the main sees them and adds lines that reference both.
        eventually("the main received branch1's rows", Duration::from_secs(30), || async {
            let n: i64 = main.query_one("SELECT count(*) FROM orders WHERE id = $1", &[&oid]).await.unwrap().get(0);
            let m: i64 = main.query_one("SELECT count(*) FROM products WHERE id = $1", &[&pid]).await.unwrap().get(0);
            (n == 1 && m == 1).then_some(())
        })
        .await;
        main.execute("INSERT INTO order_lines (order_id, product_id, qty, price) VALUES ($1, $2, 1, 2.5)", &[&oid, &pid]).await.unwrap();
    }
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(60)).await;
    let lines: i64 = b2.query_one("SELECT count(*) FROM order_lines", &[]).await.unwrap().get(0);
    assert_eq!(lines, 30);
    let quarantined: i64 = b2.query_one("SELECT count(*) FROM branchsync.conflicts", &[]).await.unwrap().get(0);
    assert_eq!(quarantined, 0, "no change was quarantined by the ALWAYS trigger at branch2");
}
