//! Issue 15, done-when 1: `branchsync join` brings a new shop in from an
//! empty database while every other site keeps selling.
//!
//! The shop's cluster has no table at all. `join` takes the main's schema
//! and a copy of every replicated table read from one snapshot, while the
//! main and two shops sell. The first run is killed (`kill -9`) once a
//! table is in; run again it completes. Only the end state is checked, not
//! which path the second run took: the copy equals the main's snapshot
//! (no sale half copied), the excluded table exists empty, and once the
//! shop's daemon runs and the shop sells too, every site converges with
//! every sale exactly once.

use std::fs::File;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use branchsync_tests::*;

/// Rows of `history` in [`SCHEMA`]: enough (about 90 MB) that the copy
/// takes a few seconds, so that the first run is killed mid-copy.
const HISTORY_ROWS: i64 = 400_000;

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
CREATE TABLE history (id bigint PRIMARY KEY, note text NOT NULL);
INSERT INTO history SELECT g, repeat('x', 200) FROM generate_series(1, 400000) g;
CREATE TABLE local_cache (k text PRIMARY KEY, v text);
";

/// The replicated tables of [`SCHEMA`] (`local_cache` is excluded).
const TABLES: &[&str] = &["products", "orders", "order_lines", "customers", "tags", "history"];

/// A `branchsync join` running in the background; killed if the test ends
/// first, so that a failed test leaves no join behind.
struct Joining(Child);

impl Joining {
    /// Starts `branchsync join` at `site`; its output goes to
    /// `join-<run>.out` and `join-<run>.err` in the site's directory.
    fn start(site: &Site, run: u32) -> Joining {
        let out = File::create(site.dir.path().join(format!("join-{run}.out"))).expect("join stdout file");
        let err = File::create(site.dir.path().join(format!("join-{run}.err"))).expect("join stderr file");
        let child = Command::new(branchsync_bin())
            .arg("join")
            .arg("--config")
            .arg(site.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start branchsync join");
        Joining(child)
    }

    /// The exit status once the run ended, `None` while it runs.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().expect("wait for branchsync join")
    }

    /// `kill -9`, then reaps it.
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Joining {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What run `run` of `join` at `site` printed.
fn join_output(site: &Site, run: u32) -> String {
    let read = |ext: &str| std::fs::read_to_string(site.dir.path().join(format!("join-{run}.{ext}"))).unwrap_or_default();
    format!("--- join {run} stdout:\n{}--- join {run} stderr:\n{}", read("out"), read("err"))
}

/// `true` if `table` (schema-qualified) exists at `c`.
async fn exists(c: &tokio_postgres::Client, table: &str) -> bool {
    c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.expect("look the table up").get(0)
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_joins_from_an_empty_database_while_every_site_sells_and_a_killed_join_run_again_ends_the_same() {
    let mut topo = Topology::prepare(2, SCHEMA).await;
    // The main knows the shop to come from its first start.
    topo.main.write_main_config(topo.main_port, &[("branch1", 1), ("branch2", 2), ("branch3", 3)], "");
    topo.start_all();
    for b in ["branch1", "branch2"] {
        wait_status(&topo.main, &format!("{b} connected"), Duration::from_secs(60), |s| s["peers"][b]["connected"] == true).await;
    }
    let main_db = topo.main.db().await;
    main_db.batch_execute("INSERT INTO local_cache VALUES ('till', 'main 1'), ('printer', 'lp0'), ('drawer', 'open')").await.unwrap();

    // 1. Every site sells, and goes on selling through the join.
    let shops = ["main", "branch1", "branch2", "branch3"];
    let stop = Arc::new(AtomicBool::new(false));
    let sold: Vec<Arc<AtomicU64>> = shops.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut sellers = vec![
        seller(topo.main.pg.url(), "main", stop.clone(), sold[0].clone()),
        seller(topo.branches[0].pg.url(), "branch1", stop.clone(), sold[1].clone()),
        seller(topo.branches[1].pg.url(), "branch2", stop.clone(), sold[2].clone()),
    ];
    eventually("every site sells", Duration::from_secs(30), || {
        let sold = sold.clone();
        async move { sold[..3].iter().all(|s| s.load(Ordering::Relaxed) > 20).then_some(()) }
    })
    .await;

    // 2. The new shop: a fresh cluster without a table, its config and
    //    credentials; no schema loaded, no init.
    let mut branch3 = Site::new("branch3", 3);
    branch3.write_branch_config(topo.main_port, "");
    branch3.issue_credentials(&topo.main);
    let b3 = branch3.db().await;
    assert_eq!(count(&b3, "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')").await, 0, "the shop starts from an empty database");

    // 3. The first run, killed once a table is in (or left alone if it
    //    ended before that).
    let started = Instant::now();
    let mut first = Joining::start(&branch3, 1);
    let first_run = loop {
        if let Some(st) = first.exited() {
            break Err(st);
        }
        if let Ok(r) = b3.query_one("SELECT count(*) FROM branchsync.join_copied", &[]).await {
            let copied: i64 = r.get(0);
            if copied >= 1 {
                break Ok(copied);
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            first.kill9();
            panic!("the first join neither copied a table nor ended within 120 s:\n{}", join_output(&branch3, 1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first_ended = match first_run {
        Ok(copied) => {
            first.kill9();
            println!("killed the first join (kill -9) after {:.1} s with {copied} tables copied", started.elapsed().as_secs_f64());
            None
        }
        Err(st) => {
            println!("the first join ended by itself ({st}) after {:.1} s, before a copied table was seen:\n{}", started.elapsed().as_secs_f64(), join_output(&branch3, 1));
            Some(st)
        }
    };
    drop(first);

    // 4. Run again, to completion (unless the first run already completed).
    if first_ended.is_some_and(|st| st.success()) {
        println!("the first join completed: nothing to run again");
    } else {
        let again = Instant::now();
        let mut second = Joining::start(&branch3, 2);
        let st = loop {
            if let Some(st) = second.exited() {
                break st;
            }
            if again.elapsed() > Duration::from_secs(180) {
                second.kill9();
                panic!("the join run again still runs after 180 s:\n{}", join_output(&branch3, 2));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(st.success(), "the join run again failed ({st}):\n{}", join_output(&branch3, 2));
        println!("the join run again completed in {:.1} s:\n{}", again.elapsed().as_secs_f64(), join_output(&branch3, 2));
    }
    let join_took = started.elapsed();
    match b3.query_one("SELECT count(*), coalesce(sum(rows), 0)::int8, coalesce(sum(bytes), 0)::int8 FROM branchsync.join_copied", &[]).await {
        Ok(r) => println!(
            "join done {:.1} s after the first start; join_copied: {} tables, {} rows, {} bytes",
            join_took.as_secs_f64(),
            r.get::<_, i64>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2)
        ),
        Err(e) => println!("join done {:.1} s after the first start; join_copied not readable ({e})", join_took.as_secs_f64()),
    }

    // 5. The finished join left no state of its own; the excluded table
    //    exists, empty (the main's rows stay at the main).
    if exists(&b3, "branchsync.join_state").await {
        assert_eq!(count(&b3, "SELECT count(*) FROM branchsync.join_state").await, 0, "a finished join leaves no join_state row");
    }
    assert!(exists(&b3, "public.local_cache").await, "the excluded table is created at the shop");
    assert_eq!(count(&b3, "SELECT count(*) FROM local_cache").await, 0, "the excluded table is created empty");
    assert_eq!(count(&main_db, "SELECT count(*) FROM local_cache").await, 3);

    // 6. The copy is one snapshot of the main: the tables nobody changes
    //    are identical, and no sale is half there (an order and its two
    //    lines are one transaction).
    for t in ["products", "customers", "tags", "history"] {
        assert_eq!(table_checksum(&b3, t).await, table_checksum(&main_db, t).await, "{t} copied as the main holds it");
    }
    assert_eq!(count(&b3, "SELECT count(*) FROM history").await, HISTORY_ROWS);
    let copied_orders = count(&b3, "SELECT count(*) FROM orders").await;
    assert!(copied_orders > 0, "the sales made before the join are copied");
    assert_eq!(
        count(&b3, "SELECT count(*) FROM orders o WHERE (SELECT count(*) FROM order_lines l WHERE l.order_id = o.id) <> 2").await,
        0,
        "every copied order comes with its two lines"
    );
    assert_eq!(
        count(&b3, "SELECT count(*) FROM order_lines l WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = l.order_id)").await,
        0,
        "no copied line without its order"
    );
    println!("the shop got {copied_orders} orders in its copy");

    // 7. The shop's daemon follows the relay; later the shop sells too.
    branch3.start();
    wait_status(&topo.main, "branch3 connected", Duration::from_secs(60), |s| s["peers"]["branch3"]["connected"] == true).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    sellers.push(seller(branch3.pg.url(), "branch3", stop.clone(), sold[3].clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sold3 = sold[3].clone();
    eventually("the joined shop sells", Duration::from_secs(30), || {
        let sold3 = sold3.clone();
        async move { (sold3.load(Ordering::Relaxed) > 10).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in sellers {
        s.await.unwrap();
    }

    // 8. Every site holds the same rows, with every sale exactly once.
    let sites = [&topo.main, &topo.branches[0], &topo.branches[1], &branch3];
    let converging = Instant::now();
    wait_converged(&sites, TABLES, Duration::from_secs(180)).await;
    let mut clients = Vec::new();
    for s in sites {
        clients.push((s.name.clone(), s.db().await));
    }
    let mut figures = Vec::new();
    for (shop, n) in shops.iter().zip(&sold) {
        let n = n.load(Ordering::Relaxed) as i64;
        figures.push(format!("{shop} {n}"));
        for (site, c) in &clients {
            assert_eq!(sales_of(c, shop).await, (n, 2 * n), "{shop}'s sales at {site}");
        }
    }
    let total: i64 = sold.iter().map(|s| s.load(Ordering::Relaxed) as i64).sum();
    assert_eq!(count(&main_db, "SELECT count(*) FROM orders").await, total, "the main holds every sale");
    let unique: bool = main_db.query_one("SELECT count(*) = count(DISTINCT id) FROM orders", &[]).await.unwrap().get(0);
    assert!(unique, "no order twice at the main");
    assert_eq!(
        count(&main_db, "SELECT count(*) FROM orders WHERE id % 100 <> CASE shop WHEN 'main' THEN 0 WHEN 'branch1' THEN 1 WHEN 'branch2' THEN 2 ELSE 3 END").await,
        0,
        "every order id carries its shop's stripe, the joined shop's too"
    );
    println!(
        "converged {:.1} s after the sales stopped; sold: {} ({total} in all, {copied_orders} of them in the shop's copy)",
        converging.elapsed().as_secs_f64(),
        figures.join(", ")
    );
}
