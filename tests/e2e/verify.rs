//! Issue 15, done-when 2: `branchsync verify` at a shop compares its copy
//! with the main's while both keep selling.
//!
//! Against a consistent pair it reports nothing, however many sales are in
//! flight in either stream. Then rows are changed, added and deleted at the
//! shop behind the stream's back (the daemon is stopped, the edits made,
//! and the shop's slot advanced past them, so capture never sees them):
//! verify names exactly those rows, with the columns that differ, while
//! the sales go on everywhere.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO products SELECT g, 'p' || g, g FROM generate_series(1, 8) g;
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, total numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE order_lines (id bigserial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders(id), product_id integer NOT NULL REFERENCES products(id), qty integer NOT NULL);
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, city text);
INSERT INTO customers SELECT g, 'c' || g, 'city ' || (g % 7) FROM generate_series(1, 3000) g;
CREATE TABLE tags (tag text NOT NULL, n int NOT NULL);
ALTER TABLE tags REPLICA IDENTITY FULL;
INSERT INTO tags SELECT 't' || (g % 10), g % 10 FROM generate_series(1, 100) g;
";

/// `branchsync verify` at `site`, off the test's threads.
async fn verify(site: &Site, args: &[&str]) -> Output {
    let (config, args): (PathBuf, Vec<String>) = (site.config_path(), args.iter().map(|a| a.to_string()).collect());
    tokio::task::spawn_blocking(move || Command::new(branchsync_bin()).arg("verify").args(&args).arg("--config").arg(config).output().expect("run branchsync verify")).await.unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("verify --json printed no JSON ({e}):\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// (table, key, kind, columns) of every difference in a JSON report.
fn differences(r: &serde_json::Value) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for t in r["tables"].as_array().unwrap() {
        for d in t["differences"].as_array().unwrap() {
            let columns = d["columns"].as_array().map(|c| c.iter().map(|x| x.as_str().unwrap().to_string()).collect::<Vec<_>>().join(",")).unwrap_or_default();
            let kind = match d["kind"].as_str().unwrap() {
                "count" => format!("count {} here, {} at the main", d["branch"], d["main"]),
                k => k.to_string(),
            };
            out.push((t["table"].as_str().unwrap().to_string(), d["key"].as_str().unwrap().to_string(), kind, columns));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_exactly_the_rows_changed_behind_the_stream_while_both_sites_sell() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(60), |s| s["peers"]["branch1"]["connected"] == true).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sold = Arc::new(AtomicU64::new(0));
    let mut sellers = vec![seller(topo.main.pg.url(), "main", stop.clone(), sold.clone()), seller(topo.branches[0].pg.url(), "branch1", stop.clone(), sold.clone())];
    eventually("sales flow both ways", Duration::from_secs(30), || {
        let sold = sold.clone();
        async move { (sold.load(Ordering::Relaxed) > 50).then_some(()) }
    })
    .await;

    // 1. A consistent pair, both selling: nothing to report.
    let out = verify(&topo.branches[0], &["--json"]).await;
    let r = report(&out);
    assert_eq!(out.status.code(), Some(0), "a consistent pair agrees while both sell: {r:#}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(differences(&r), vec![], "{r:#}");
    // Sales in flight made buckets differ at the first read: they were
    // settled, not reported.
    println!("consistent pair: {} buckets differed at the first read, {} settlings", r["tables"].as_array().unwrap().iter().map(|t| t["buckets_differing"].as_u64().unwrap()).sum::<u64>(), r["settlings"]);
    assert_eq!(r["tables"].as_array().unwrap().len(), 5, "every replicated table is compared: {r:#}");
    assert!(r["rows_compared"].as_i64().unwrap() >= 3000 + 8 + 100, "{r:#}");

    // 2. Behind the stream's back at the shop: its daemon stopped, its
    //    seller paused, three tables edited, and the slot moved past the
    //    edits so that capture never sees them.
    stop.store(true, Ordering::Relaxed);
    for s in sellers.drain(..) {
        s.await.unwrap();
    }
    // Every sale made so far has crossed: moving the slot past the edits
    // below must not skip a sale capture had not read yet (it would be an
    // "extra" row that is no edit of this test).
    wait_converged(&topo.sites(), &["orders", "order_lines"], Duration::from_secs(60)).await;
    topo.branches[0].stop();
    let b1 = topo.branches[0].db().await;
    b1.batch_execute(
        "UPDATE customers SET city = 'elsewhere', name = 'renamed' WHERE id = 17;
         DELETE FROM customers WHERE id = 2500;
         INSERT INTO customers VALUES (900001, 'walk-in', NULL);
         UPDATE products SET price = 99.99 WHERE id = 3;
         INSERT INTO tags VALUES ('t4', 4);",
    )
    .await
    .unwrap();
    // After the edits' commit (one simple query is one transaction).
    b1.batch_execute("SELECT pg_replication_slot_advance('branchsync', pg_current_wal_lsn())").await.unwrap();
    topo.branches[0].start();
    stop.store(false, Ordering::Relaxed);
    sellers.push(seller(topo.main.pg.url(), "main", stop.clone(), sold.clone()));
    sellers.push(seller(topo.branches[0].pg.url(), "branch1", stop.clone(), sold.clone()));
    wait_status(&topo.main, "branch1 connected again", Duration::from_secs(60), |s| s["peers"]["branch1"]["connected"] == true).await;

    // 3. verify names exactly those rows, while both sell.
    let out = verify(&topo.branches[0], &["--json"]).await;
    let r = report(&out);
    assert_eq!(out.status.code(), Some(1), "rows differ: exit status 1\n{}", String::from_utf8_lossy(&out.stderr));
    let expected = vec![
        ("public.customers".to_string(), r#"{"id": 17}"#.to_string(), "different".to_string(), "city,name".to_string()),
        ("public.customers".into(), r#"{"id": 2500}"#.into(), "missing".into(), String::new()),
        ("public.customers".into(), r#"{"id": 900001}"#.into(), "extra".into(), String::new()),
        ("public.products".into(), r#"{"id": 3}"#.into(), "different".into(), "price".into()),
        ("public.tags".into(), r#"{"n": 4, "tag": "t4"}"#.into(), "count 11 here, 10 at the main".into(), String::new()),
    ];
    assert_eq!(differences(&r), expected, "{r:#}");
    assert_eq!(r["tables_differing"], 3);

    // The text report says the same, one line per row, and the throughput.
    let out = verify(&topo.branches[0], &["--table", "customers", "--table", "public.products"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for line in ["{\"id\": 17} differs in city, name", "{\"id\": 2500} missing here (at main only)", "{\"id\": 900001} extra here (not at main)", "{\"id\": 3} differs in price", "verify: 2 tables,"] {
        assert!(text.contains(line), "the report says \"{line}\":\n{text}");
    }
    assert!(text.contains("rows/s"), "{text}");

    // 4. --repair: the main sends its version of each keyed row; once it
    //    arrived, verify finds those tables equal. The keyless table's
    //    extra copy is left alone (a row without a key cannot be named).
    let out = verify(&topo.branches[0], &["--repair"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(text.contains("asked to send 3 rows as it holds them and 1 deletions"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 differences left alone"), "{text}");
    let main_db = topo.main.db().await;
    let repaired: i64 = main_db.query_one("SELECT count(*) FROM branchsync.conflicts WHERE kind = 'repaired' AND loser_node = 'branch1' AND resolved_at IS NOT NULL", &[]).await.unwrap().get(0);
    assert_eq!(repaired, 4, "each repaired row is recorded at the main");
    let out = verify(&topo.branches[0], &["--json"]).await;
    let r = report(&out);
    assert_eq!(
        differences(&r),
        vec![("public.tags".to_string(), r#"{"n": 4, "tag": "t4"}"#.to_string(), "count 11 here, 10 at the main".to_string(), String::new())],
        "after the repair only the keyless row differs: {r:#}"
    );
    let b1 = topo.branches[0].db().await;
    let city: Option<String> = b1.query_one("SELECT city FROM customers WHERE id = 17", &[]).await.unwrap().get(0);
    assert_eq!(city.as_deref(), Some("city 3"), "the main's version is back");

    // A table nobody replicates is an error, not an empty report.
    let out = verify(&topo.branches[0], &["--table", "no_such_table"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no replicated table named \"no_such_table\""), "{}", String::from_utf8_lossy(&out.stderr));
    stop.store(true, Ordering::Relaxed);
    for s in sellers {
        s.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_is_refused_with_a_wrong_token_and_run_at_the_main_is_an_error() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(60), |s| s["peers"]["branch1"]["connected"] == true).await;
    let out = verify(&topo.main, &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run it at a branch"), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = std::fs::read_to_string(topo.branches[0].config_path()).unwrap();
    assert!(cfg.contains(TOKEN), "{cfg}");
    std::fs::write(topo.branches[0].config_path(), cfg.replace(TOKEN, "not-the-token")).unwrap();
    let out = verify(&topo.branches[0], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("authentication failed for node \"branch1\""), "{err}");
    topo.main.wait_log("authentication failed (verify)", Duration::from_secs(10)).await;
}
