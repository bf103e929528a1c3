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
CREATE TABLE attachments (id int PRIMARY KEY, body text NOT NULL);
INSERT INTO attachments VALUES (1, repeat('scan', 7500000)), (2, 'small');
";

/// The replicated tables of [`SCHEMA`] (`local_cache` is excluded;
/// `attachments` holds a 30 MB value, far larger than a frame).
const TABLES: &[&str] = &["products", "orders", "order_lines", "customers", "tags", "history", "attachments"];

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
    let sellers = vec![
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
    for t in ["products", "customers", "tags", "history", "attachments"] {
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
    joined_shop_sells(&topo.main, &mut branch3, "branch3", Duration::from_secs(3), sellers, &stop, &sold[3]).await;

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

// ------------------------------------------------ a shop joins again

/// Issue 15, done-when 4: a shop that lost its state (its `data_dir`, or
/// its database restored from an old backup) is refused, as before; `join
/// --discard-local` brings it back from the main's copy while the others
/// sell. A smaller shop schema than [`SCHEMA`] (no `history`): here the
/// copy only has to be right, not slow. `order_lines.price` may be NULL so
/// that both [`seller`] (two lines a sale) and [`SELL_MANY`] (four lines a
/// sale) sell into it.
const SHOP_SCHEMA: &str = "
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO products SELECT g, 'p' || g, g FROM generate_series(1, 8) g;
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, total numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE order_lines (id bigserial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders(id), product_id integer NOT NULL REFERENCES products(id), qty integer NOT NULL, price numeric(10,2));
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, city text);
INSERT INTO customers SELECT g, 'c' || g, 'city ' || (g % 7) FROM generate_series(1, 3000) g;
CREATE TABLE local_cache (k text PRIMARY KEY, v text);
";

/// The replicated tables of [`SHOP_SCHEMA`].
const SHOP_TABLES: &[&str] = &["products", "orders", "order_lines", "customers"];

/// Runs `branchsync join <extra> --config FILE` at `site` to completion
/// (off the runtime's workers, the sellers keep going); its exit status,
/// stdout and stderr.
async fn join_at(site: &Site, extra: &[&str]) -> (ExitStatus, String, String) {
    let mut c = Command::new(branchsync_bin());
    c.arg("join").args(extra).arg("--config").arg(site.config_path()).stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || c.output()).await.expect("join task").expect("run branchsync join");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Names of the entries in `site`'s data directory that start with
/// `log.discarded-` (old logs moved aside by `--discard-local`).
fn discarded_logs(site: &Site) -> Vec<String> {
    match std::fs::read_dir(site.dir.path().join("data")) {
        Ok(dir) => dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("log.discarded-")).collect(),
        Err(_) => Vec::new(),
    }
}

/// Waits until the main has applied `n` sales of `shop`.
async fn main_has(main: &tokio_postgres::Client, shop: &str, n: i64) {
    eventually(&format!("the main holds {n} sales of {shop}"), Duration::from_secs(60), || async { (sales_of(main, shop).await.0 == n).then_some(()) }).await;
}

/// Rows of `branchsync.conflicts` at `c`.
async fn conflicts(c: &tokio_postgres::Client) -> i64 {
    count(c, "SELECT count(*) FROM branchsync.conflicts").await
}

/// Every site holds every shop's sales as counted by its seller (two lines
/// a sale), and the sales of the `lost` shop nowhere; no conflict, no order
/// off its shop's stripe.
async fn every_sale_once(sites: &[&Site], sold: &[(&str, i64, i64)], lost: &str) {
    for s in sites {
        let c = s.db().await;
        for (shop, orders, lines) in sold {
            assert_eq!(sales_of(&c, shop).await, (*orders, *lines), "{shop}'s sales at {}", s.name);
        }
        assert_eq!(sales_of(&c, lost).await, (0, 0), "the sales the main never applied are gone, at {} too", s.name);
        assert_eq!(conflicts(&c).await, 0, "{}: nothing applied twice or decided against itself", s.name);
    }
    let main = sites[0].db().await;
    let total: i64 = sold.iter().map(|(_, n, _)| n).sum();
    assert_eq!(count(&main, "SELECT count(*) FROM orders").await, total, "the main holds every sale and nothing else");
    assert_eq!(
        count(&main, "SELECT count(*) FROM orders WHERE id % 100 <> CASE WHEN shop = 'main' THEN 0 WHEN shop LIKE 'branch1%' THEN 1 ELSE 2 END").await,
        0,
        "every order id carries its shop's stripe, the rejoined shop's new ones too"
    );
}

/// Done-when 4a: branch1's `data_dir` is deleted while every site sells.
/// The daemon refuses to start (exit 3); `join` without `--discard-local`
/// refuses too (exit 2) and changes nothing; with it, the old log goes
/// aside, branch1 gets the main's copy (its own sales the main applied come
/// back, those it never sent are gone), starts, sells again, and every site
/// converges with every sale exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_whose_data_dir_was_lost_rejoins_with_discard_local_while_the_chain_sells() {
    let mut topo = Topology::prepare(2, &format!("{SHOP_SCHEMA}{SELL_MANY}")).await;
    topo.start_all();
    for b in ["branch1", "branch2"] {
        wait_status(&topo.main, &format!("{b} connected"), Duration::from_secs(60), |s| s["peers"][b]["connected"] == true).await;
    }
    let main_db = topo.main.db().await;

    // 1. Every site sells; branch1 for a while only.
    let shops = ["main", "branch2", "branch1", "branch1-after"];
    let sold: Vec<Arc<AtomicU64>> = shops.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_b1 = Arc::new(AtomicBool::new(false));
    let sellers = vec![seller(topo.main.pg.url(), "main", stop.clone(), sold[0].clone()), seller(topo.branches[1].pg.url(), "branch2", stop.clone(), sold[1].clone())];
    let b1_seller = seller(topo.branches[0].pg.url(), "branch1", stop_b1.clone(), sold[2].clone());
    eventually("every site sells", Duration::from_secs(30), || {
        let sold = sold.clone();
        async move { sold[..3].iter().all(|s| s.load(Ordering::Relaxed) > 20).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_b1.store(true, Ordering::Relaxed);
    b1_seller.await.unwrap();
    let sold_b1 = sold[2].load(Ordering::Relaxed) as i64;
    main_has(&main_db, "branch1", sold_b1).await;
    println!("branch1 sold {sold_b1}, all at the main");

    // 2. The daemon stops; branch1 sells 5 more that nobody captures (the
    //    slot keeps them, the log that would number them is lost next);
    //    the data directory is deleted. The daemon refuses to start.
    let b1_db = topo.branches[0].db().await;
    {
        let branch = &mut topo.branches[0];
        branch.stop();
        b1_db.batch_execute("CALL sell_many(5, 'branch1-lost')").await.unwrap();
        std::fs::remove_dir_all(branch.dir.path().join("data")).expect("delete branch1's data directory");
        branch.start();
        let st = branch.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| panic!("branch1 must refuse to start without its log\n{}", branch.daemon_log()));
        assert_eq!(st.code(), Some(3), "branch1 exits with the status that tells a service manager not to restart it");
        let log = branch.daemon_log();
        assert!(log.contains("is new, but this database has replicated with another log"), "the refusal says what happened:\n{log}");
    }
    let data_dir: Vec<String> = std::fs::read_dir(topo.branches[0].dir.path().join("data")).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    println!("branch1 refused to start; its data directory now holds {data_dir:?}");

    // 3. join without --discard-local: refused, nothing changed.
    let (st, out, err) = join_at(&topo.branches[0], &[]).await;
    println!("join without --discard-local ({st}):\n--- stdout:\n{out}--- stderr:\n{err}");
    assert_eq!(st.code(), Some(2), "join refuses a shop that holds data of its own");
    assert!(err.contains("holds data of its own"), "the refusal says why:\n{err}");
    assert!(err.contains("orders"), "the refusal lists the tables with rows:\n{err}");
    assert_eq!(sales_of(&b1_db, "branch1").await, (sold_b1, 2 * sold_b1), "the refused join left branch1's sales alone");
    assert_eq!(sales_of(&b1_db, "branch1-lost").await, (5, 20), "the refused join left branch1's unsent sales alone");
    assert_eq!(count(&b1_db, "SELECT count(*) FROM branchsync.node").await, 1, "the refused join left branch1's identity alone");
    assert!(discarded_logs(&topo.branches[0]).is_empty(), "the refused join moved no log aside");
    assert_eq!(sales_of(&main_db, "branch1").await, (sold_b1, 2 * sold_b1), "the main's copy of branch1's sales is untouched");
    assert_eq!(sales_of(&main_db, "branch1-lost").await, (0, 0));
    assert_eq!(count(&main_db, "SELECT count(*) FROM branchsync.progress WHERE stream = 'branch1'").await, 1, "the main still holds its progress in branch1's stream");

    // 4. join --discard-local, while the main and branch2 sell.
    let started = Instant::now();
    let (st, out, err) = join_at(&topo.branches[0], &["--discard-local"]).await;
    println!("join --discard-local ({st}) in {:.1} s:\n--- stdout:\n{out}--- stderr:\n{err}", started.elapsed().as_secs_f64());
    assert!(st.success(), "join --discard-local failed ({st})");
    assert!(out.contains("discarding what this shop holds"), "join says what it discards:\n{out}");
    let aside = discarded_logs(&topo.branches[0]);
    println!("old logs moved aside: {aside:?}");
    if out.contains("the old log was moved to") {
        assert_eq!(aside.len(), 1, "the log join says it moved aside is there");
    }
    assert_eq!(sales_of(&b1_db, "branch1").await, (sold_b1, 2 * sold_b1), "branch1's sales the main applied come back in the copy");
    assert_eq!(sales_of(&b1_db, "branch1-lost").await, (0, 0), "branch1's sales the main never applied are discarded");
    println!(
        "after the join: branch1 holds {} orders; the main's progress rows of branch1: {}",
        count(&b1_db, "SELECT count(*) FROM orders").await,
        count(&main_db, "SELECT count(*) FROM branchsync.progress WHERE stream = 'branch1'").await
    );

    // 5. branch1 runs again, follows the relay and sells.
    joined_shop_sells(&topo.main, &mut topo.branches[0], "branch1-after", Duration::ZERO, sellers, &stop, &sold[3]).await;

    // 6. Every site holds every sale exactly once.
    let converging = Instant::now();
    wait_converged(&topo.sites(), SHOP_TABLES, Duration::from_secs(120)).await;
    let figures: Vec<(&str, i64, i64)> = shops.iter().zip(&sold).map(|(shop, n)| (*shop, n.load(Ordering::Relaxed) as i64, 2 * n.load(Ordering::Relaxed) as i64)).collect();
    println!("converged {:.1} s after the sales stopped; sold: {figures:?}, 5 lost", converging.elapsed().as_secs_f64());
    every_sale_once(&topo.sites(), &figures, "branch1-lost").await;
}

/// Done-when 4b: branch1's database is restored from an old backup (its
/// `data_dir` is not): the daemon is refused ("went back in time"); `join
/// --discard-local` brings the sales the main applied since the backup
/// back from the main's copy, while the main and branch2 sell; branch1
/// starts, sells, and every site converges with every sale exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_restored_from_an_old_backup_rejoins_with_discard_local_while_the_chain_sells() {
    let mut topo = Topology::prepare(2, &format!("{SHOP_SCHEMA}{SELL_MANY}")).await;
    topo.start_all();
    for b in ["branch1", "branch2"] {
        wait_status(&topo.main, &format!("{b} connected"), Duration::from_secs(60), |s| s["peers"][b]["connected"] == true).await;
    }
    let main_db = topo.main.db().await;

    // The main and branch2 sell throughout.
    let shops = ["main", "branch2", "branch1-after"];
    let sold: Vec<Arc<AtomicU64>> = shops.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sellers = vec![seller(topo.main.pg.url(), "main", stop.clone(), sold[0].clone()), seller(topo.branches[1].pg.url(), "branch2", stop.clone(), sold[1].clone())];

    // 1. branch1 sells; then its cluster is backed up (cold), and it sells
    //    more, all of it applied at the main.
    const N1: i64 = 20;
    const N2: i64 = 30;
    topo.branches[0].db().await.batch_execute(&format!("CALL sell_many({N1}, 'branch1')")).await.unwrap();
    main_has(&main_db, "branch1", N1).await;
    let backup = {
        let branch = &mut topo.branches[0];
        branch.stop();
        branch.pg.stop_fast();
        let backup = branch.pg.snapshot_data("old");
        branch.pg.start_server();
        branch.start();
        backup
    };
    topo.branches[0].db().await.batch_execute(&format!("CALL sell_many({N2}, 'branch1')")).await.unwrap();
    main_has(&main_db, "branch1", N1 + N2).await;
    println!("branch1 sold {N1} before its backup and {N2} after, all at the main");

    // 2. The shop's disk fails; its database comes back from the backup
    //    (branchsync's data directory survived). It sells 4 sales that the
    //    main will never apply; the daemon is refused.
    {
        let branch = &mut topo.branches[0];
        branch.stop();
        branch.pg.stop_fast();
        branch.pg.restore_data(&backup);
        branch.pg.start_server();
    }
    let b1_db = topo.branches[0].db().await;
    assert_eq!(sales_of(&b1_db, "branch1").await, (N1, 4 * N1), "the backup holds the first sales only");
    b1_db.batch_execute("CALL sell_many(4, 'branch1-lost')").await.unwrap();
    topo.branches[0].start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let refusal = loop {
        let branch = &mut topo.branches[0];
        if !branch.running() {
            let st = branch.wait_exit(Duration::from_secs(5));
            let log = branch.daemon_log();
            assert_eq!(st.and_then(|s| s.code()), Some(3), "branch1 exits with the status that tells a service manager not to restart it:\n{log}");
            assert!(log.contains("went back in time"), "the refusal says what happened:\n{log}");
            break format!("the daemon refused to start ({})", log.lines().filter(|l| l.contains("went back in time")).last().unwrap_or_default());
        }
        if let Some(s) = http_status(branch.http_port).await {
            if let Some(e) = s["peers"]["main"]["last_error"].as_str().filter(|e| e.contains("went back in time") || e.contains("re-seed")) {
                break format!("refused at the handshake: {e}");
            }
        }
        assert!(Instant::now() < deadline, "branch1, restored from an old backup, is neither refused at start nor at the handshake within 60 s\n{}", diagnostics(&topo.sites()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("branch1 restored: {refusal}");
    assert_eq!(sales_of(&main_db, "branch1").await, (N1 + N2, 4 * (N1 + N2)), "the main keeps what it applied");
    assert_eq!(sales_of(&main_db, "branch1-lost").await, (0, 0), "nothing of the restored shop reached the main");

    // 3. join --discard-local (the daemon stopped), while the others sell.
    topo.branches[0].stop();
    let started = Instant::now();
    let (st, out, err) = join_at(&topo.branches[0], &["--discard-local"]).await;
    println!("join --discard-local ({st}) in {:.1} s:\n--- stdout:\n{out}--- stderr:\n{err}", started.elapsed().as_secs_f64());
    assert!(st.success(), "join --discard-local failed ({st})");
    assert!(out.contains("discarding what this shop holds"), "join says what it discards:\n{out}");
    let aside = discarded_logs(&topo.branches[0]);
    println!("old logs moved aside: {aside:?}");
    assert_eq!(aside.len(), 1, "the shop's old log is moved aside, not deleted");
    assert_eq!(sales_of(&b1_db, "branch1").await, (N1 + N2, 4 * (N1 + N2)), "the sales lost with the disk come back from the main");
    assert_eq!(sales_of(&b1_db, "branch1-lost").await, (0, 0), "the sales the main never applied are discarded");

    // 4. branch1 runs again and sells.
    joined_shop_sells(&topo.main, &mut topo.branches[0], "branch1-after", Duration::ZERO, sellers, &stop, &sold[2]).await;

    // 5. Every site: branch1's N1 + N2, every other sale exactly once.
    let converging = Instant::now();
    wait_converged(&topo.sites(), SHOP_TABLES, Duration::from_secs(120)).await;
    let mut figures: Vec<(&str, i64, i64)> = shops.iter().zip(&sold).map(|(shop, n)| (*shop, n.load(Ordering::Relaxed) as i64, 2 * n.load(Ordering::Relaxed) as i64)).collect();
    figures.push(("branch1", N1 + N2, 4 * (N1 + N2)));
    println!("converged {:.1} s after the sales stopped; sold: {figures:?}, 4 lost", converging.elapsed().as_secs_f64());
    every_sale_once(&topo.sites(), &figures, "branch1-lost").await;
}

/// `shop`'s daemon starts after its join and connects to `main`; once the
/// relay has flowed for `settle`, the shop sells as `sells_as` (counted in
/// `sold_after`) for a while; then every seller stops.
async fn joined_shop_sells(main: &Site, shop: &mut Site, sells_as: &'static str, settle: Duration, mut sellers: Vec<tokio::task::JoinHandle<()>>, stop: &Arc<AtomicBool>, sold_after: &Arc<AtomicU64>) {
    shop.start();
    let name = shop.name.clone();
    wait_status(main, &format!("{name} connected after its join"), Duration::from_secs(60), |s| s["peers"][name.as_str()]["connected"] == true).await;
    tokio::time::sleep(settle).await;
    sellers.push(seller(shop.pg.url(), sells_as, stop.clone(), sold_after.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    eventually("the joined shop sells", Duration::from_secs(30), || {
        let sold_after = sold_after.clone();
        async move { (sold_after.load(Ordering::Relaxed) > 10).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in sellers {
        s.await.unwrap();
    }
}
