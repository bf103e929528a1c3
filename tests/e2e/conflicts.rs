//! Issue 4: conflict rules. Every scenario cuts the branches off, lets the
//! sites change the same rows, heals, and checks that every site holds the
//! same rows and the same conflict records, and that no version vanished
//! without a record.

use std::time::Duration;

use branchsync_tests::*;

/// Tables for the rule scenarios; `[[tables]]` below gives them their rules.
const SCHEMA: &str = "
CREATE ROLE erp LOGIN;
GRANT CREATE ON SCHEMA public TO erp;
SET ROLE erp;
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, manual text);
CREATE TABLE prices (id int PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, qty int NOT NULL DEFAULT 0);
CREATE TABLE stock (id int PRIMARY KEY, qty int NOT NULL, location text);
CREATE TABLE shop_notes (id int PRIMARY KEY, body text);
CREATE TABLE codes (code text PRIMARY KEY, val text);
CREATE TABLE customers (id serial PRIMARY KEY, tax_id text NOT NULL UNIQUE, name text);
CREATE TABLE invoices (id serial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers(id), amount numeric NOT NULL);
CREATE TABLE vendors (id serial PRIMARY KEY, tax_id text NOT NULL UNIQUE, name text);
CREATE TABLE keepers (id int PRIMARY KEY, v text);
CREATE TABLE audit (event text, n int);
RESET ROLE;
";

const RULES: &str = "
[[tables]]
match = \"prices\"
rule = \"main_wins\"
delta = [\"qty\"]

[[tables]]
match = \"stock\"
delta = [\"qty\"]

[[tables]]
match = \"shop_notes\"
rule = \"branch_wins\"

[[tables]]
match = \"keepers\"
on_delete_conflict = \"update_wins\"

[[tables]]
match = \"customers\"
on_unique_conflict = \"merge\"
";

async fn erp(site: &Site) -> tokio_postgres::Client {
    let c = site.db().await;
    c.batch_execute("SET ROLE erp").await.expect("SET ROLE erp");
    c
}

async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.query(&format!("SELECT t::text FROM ({sql}) t"), &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// A query's single text column.
async fn texts(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// The conflict records of a node, as `kind table key winner loser`, in a
/// stable order: the same at every node.
async fn records(site: &Site) -> Vec<String> {
    texts(
        &site.db().await,
        "SELECT kind || ' ' || tbl || ' ' || coalesce(key, '-') || ' ' || coalesce(winner_node, '-') || ' ' || coalesce(loser_node, '-') \
         FROM branchsync.conflicts WHERE kind NOT IN ('ddl_failed', 'columns_skipped', 'truncate_skipped') ORDER BY 1",
    )
    .await
}

/// Waits until every site holds the same conflict records.
async fn records_converged(topo: &Topology, min: usize) -> Vec<String> {
    let mut last = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let mut all = Vec::new();
            for s in topo.sites() {
                all.push(records(s).await);
            }
            if all[0].len() >= min && all.windows(2).all(|w| w[0] == w[1]) {
                return all.remove(0);
            }
            last = all;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("conflict records differ between sites: {last:#?}"))
}

/// Last writer wins orders concurrent versions by commit time: the next
/// write at another site happens clearly later.
async fn later() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn cut_all(topo: &Topology) {
    for p in &topo.proxies {
        p.cut();
    }
    for b in &topo.branches {
        let name = b.name.clone();
        wait_status(&topo.main, &format!("main sees {name} disconnected"), Duration::from_secs(20), |s| s["peers"][&name]["connected"] == false).await;
    }
}

fn heal_all(topo: &Topology) {
    for p in &topo.proxies {
        p.heal();
    }
}

/// A main and two branches with [`SCHEMA`] and [`RULES`], seeded with a row
/// per table from the main, converged.
async fn started() -> Topology {
    let mut topo = Topology::prepare_with(2, SCHEMA, RULES).await;
    topo.start_all();
    let main = erp(&topo.main).await;
    main.batch_execute(
        "INSERT INTO products VALUES (1, 'tea', 10, repeat('manual ', 20000));
         INSERT INTO prices VALUES (1, 'coffee', 5, 100);
         INSERT INTO stock VALUES (1, 100, 'shelf');
         INSERT INTO shop_notes VALUES (1, 'main');
         INSERT INTO keepers VALUES (1, 'a'), (2, 'b');
         INSERT INTO customers (tax_id, name) VALUES ('T0', 'zero');
         INSERT INTO vendors (tax_id, name) VALUES ('V0', 'zero');
         INSERT INTO audit VALUES ('boot', NULL), ('boot', NULL);",
    )
    .await
    .unwrap();
    wait_converged(&topo.sites(), ALL, Duration::from_secs(60)).await;
    topo
}

const ALL: &[&str] = &["products", "prices", "stock", "shop_notes", "codes", "customers", "invoices", "vendors", "keepers", "audit"];

/// lww (the default), R12 and R15: two sites change the same column while
/// apart; the later change wins at every site and the earlier one is on
/// record at every site. A large TOASTed column nobody changed stays
/// intact. A branch's change made after it had seen the main's is no
/// conflict at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lww_keeps_the_later_change_everywhere_records_the_other_and_leaves_toasted_values_alone() {
    let topo = started().await;
    let (main, b1) = (erp(&topo.main).await, erp(&topo.branches[0]).await);
    cut_all(&topo).await;
    main.batch_execute("UPDATE products SET price = 11 WHERE id = 1").await.unwrap();
    later().await;
    b1.batch_execute("UPDATE products SET price = 12 WHERE id = 1").await.unwrap();
    heal_all(&topo);
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(60)).await;
    let p = rows(&main, "SELECT id, price, length(manual) FROM products").await;
    assert_eq!(p, ["(1,12.00,140000)"], "branch1's later price wins; the manual is intact");
    let recs = records_converged(&topo, 1).await;
    assert_eq!(recs, ["update_update public.products [\"1\"] branch1 main"]);
    let lost: String = topo.branches[1]
        .db()
        .await
        .query_one("SELECT local_version->>'price' FROM branchsync.conflicts WHERE kind = 'update_update'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lost, "11.00", "the losing version is kept, at every node");

    // R15: branch1 saw the price; its next change is no conflict.
    b1.batch_execute("UPDATE products SET price = 13 WHERE id = 1").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    main.batch_execute("UPDATE products SET price = 14 WHERE id = 1").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    assert_eq!(records_converged(&topo, 1).await.len(), 1, "informed changes are not conflicts");
}

/// main_wins (master data), branch_wins (the inserting shop owns the row),
/// column-level merge, and deltas (R16): concurrent sales at three sites all
/// count, even when the rest of the row loses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_wins_branch_wins_column_merge_and_deltas_decide_the_same_everywhere() {
    let topo = started().await;
    let (main, b1, b2) = (erp(&topo.main).await, erp(&topo.branches[0]).await, erp(&topo.branches[1]).await);
    b1.batch_execute("INSERT INTO shop_notes VALUES (2, 'branch1 owns this')").await.unwrap();
    wait_converged(&topo.sites(), &["shop_notes"], Duration::from_secs(30)).await;
    cut_all(&topo).await;
    // Branches change first (earlier stamps), the main later, and vice versa.
    b1.batch_execute(
        "UPDATE prices SET price = 6, qty = qty - 3 WHERE id = 1;
         UPDATE shop_notes SET body = 'branch1 edit' WHERE id = 2;
         UPDATE products SET name = 'green tea' WHERE id = 1;
         UPDATE stock SET qty = qty - 3 WHERE id = 1;",
    )
    .await
    .unwrap();
    b2.batch_execute("UPDATE stock SET qty = qty - 5, location = 'back' WHERE id = 1; UPDATE prices SET qty = qty - 1 WHERE id = 1;").await.unwrap();
    later().await;
    main.batch_execute(
        "UPDATE prices SET price = 7 WHERE id = 1;
         UPDATE shop_notes SET body = 'main edit' WHERE id IN (1, 2);
         UPDATE products SET price = 9.50 WHERE id = 1;
         UPDATE stock SET qty = qty - 2 WHERE id = 1;",
    )
    .await
    .unwrap();
    // A branch's change after the main's, still concurrent: main_wins holds.
    later().await;
    b1.batch_execute("UPDATE prices SET price = 8 WHERE id = 1").await.unwrap();
    heal_all(&topo);
    wait_converged(&topo.sites(), ALL, Duration::from_secs(60)).await;
    assert_eq!(rows(&main, "SELECT price, qty FROM prices").await, ["(7.00,96)"], "the main's price wins; all three sales count");
    assert_eq!(rows(&main, "SELECT id, body FROM shop_notes ORDER BY id").await, ["(1,\"main edit\")", "(2,\"branch1 edit\")"], "the owner wins its row");
    assert_eq!(rows(&main, "SELECT name, price FROM products").await, ["(\"green tea\",9.50)"], "different columns: both changes kept");
    assert_eq!(rows(&main, "SELECT qty, location FROM stock").await, ["(90,back)"], "100 - 3 - 5 - 2");
    let recs = records_converged(&topo, 2).await;
    assert!(recs.iter().any(|r| r.starts_with("update_update public.prices") && r.ends_with("main branch1")), "{recs:#?}");
    assert!(recs.iter().any(|r| r.starts_with("update_update public.shop_notes [\"2\"] branch1 main")), "{recs:#?}");
    assert!(!recs.iter().any(|r| r.contains("public.products") || r.contains("public.stock")), "merges and deltas lose nothing: {recs:#?}");

    // Informed: branch1 changes the price after it saw the main's: it wins.
    b1.batch_execute("UPDATE prices SET price = 8.50 WHERE id = 1").await.unwrap();
    wait_converged(&topo.sites(), &["prices"], Duration::from_secs(30)).await;
    assert_eq!(rows(&main, "SELECT price FROM prices").await, ["(8.50)"], "main_wins is about concurrent changes only");
}

/// Deletes and inserts: an update and a delete that crossed (delete wins by
/// default, update wins where configured), the same key inserted at two
/// sites, a unique value inserted at two sites (merged and re-pointed, or
/// recorded), and a delete of a row that rows its deleter never saw still
/// reference (kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_inserts_and_unique_values_end_the_same_at_every_site() {
    let topo = started().await;
    let (main, b1, b2) = (erp(&topo.main).await, erp(&topo.branches[0]).await, erp(&topo.branches[1]).await);
    main.batch_execute("INSERT INTO invoices (customer_id, amount) SELECT id, 1 FROM customers WHERE tax_id = 'T0'").await.unwrap();
    wait_converged(&topo.sites(), &["invoices"], Duration::from_secs(30)).await;
    cut_all(&topo).await;
    main.batch_execute(
        "DELETE FROM products WHERE id = 1;
         UPDATE keepers SET v = 'main kept' WHERE id = 1;
         INSERT INTO codes VALUES ('X', 'main');
         WITH c AS (INSERT INTO customers (tax_id, name) VALUES ('T1', 'main') RETURNING id) INSERT INTO invoices (customer_id, amount) SELECT id, 10 FROM c;
         INSERT INTO vendors (tax_id, name) VALUES ('V1', 'main');
         INSERT INTO invoices (customer_id, amount) SELECT id, 2 FROM customers WHERE tax_id = 'T0';",
    )
    .await
    .unwrap();
    later().await;
    b1.batch_execute(
        "UPDATE products SET price = 99 WHERE id = 1;
         DELETE FROM keepers WHERE id = 1;
         INSERT INTO codes VALUES ('X', 'branch1');
         WITH c AS (INSERT INTO customers (tax_id, name) VALUES ('T1', 'branch1') RETURNING id) INSERT INTO invoices (customer_id, amount) SELECT id, 20 FROM c;
         INSERT INTO vendors (tax_id, name) VALUES ('V1', 'branch1');",
    )
    .await
    .unwrap();
    b2.batch_execute("DELETE FROM invoices; DELETE FROM customers WHERE tax_id = 'T0';").await.unwrap();
    heal_all(&topo);
    wait_converged(&topo.sites(), ALL, Duration::from_secs(90)).await;
    assert!(rows(&main, "SELECT * FROM products").await.is_empty(), "delete wins over the concurrent update");
    assert_eq!(rows(&main, "SELECT id, v FROM keepers ORDER BY id").await, ["(1,\"main kept\")", "(2,b)"], "update wins where configured");
    assert_eq!(rows(&main, "SELECT code, val FROM codes").await, ["(X,branch1)"], "the later insert of the key wins");
    let cust = rows(&main, "SELECT tax_id, name FROM customers ORDER BY tax_id").await;
    assert_eq!(cust, ["(T0,zero)", "(T1,main)"], "T1 is folded into the main's row; T0 is kept: invoices branch2 never saw reference it");
    let inv = rows(&main, "SELECT c.tax_id, i.amount FROM invoices i JOIN customers c ON c.id = i.customer_id ORDER BY 1, 2").await;
    assert_eq!(inv, ["(T0,2)", "(T1,10)", "(T1,20)"], "branch1's invoice is re-pointed to the merged customer");
    assert_eq!(rows(&main, "SELECT tax_id, name FROM vendors ORDER BY tax_id").await, ["(V0,zero)", "(V1,main)"]);
    let recs = records_converged(&topo, 6).await;
    for want in [
        "update_delete public.products [\"1\"] main branch1",
        "update_delete public.keepers [\"1\"] main branch1",
        "insert_insert public.codes [\"X\"] branch1 main",
        "delete_referenced public.customers",
    ] {
        assert!(recs.iter().any(|r| r.starts_with(want)), "{want} missing in {recs:#?}");
    }
    assert_eq!(recs.iter().filter(|r| r.starts_with("insert_unique")).count(), 2, "{recs:#?}");
    // Nothing vanished: branch1's vendor V1 and its customer are on record.
    let lost = texts(&topo.branches[1].db().await, "SELECT remote_version->>'name' FROM branchsync.conflicts WHERE kind = 'insert_unique' ORDER BY 1").await;
    assert_eq!(lost, ["branch1", "branch1"]);
}

/// R11: a table without a key is a multiset: duplicates and NULLs, each
/// delete removes exactly one matching row, at every site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_tables_are_multisets_with_duplicates_and_nulls() {
    let topo = started().await;
    let (main, b1, b2) = (erp(&topo.main).await, erp(&topo.branches[0]).await, erp(&topo.branches[1]).await);
    cut_all(&topo).await;
    main.batch_execute("INSERT INTO audit VALUES ('sale', 1), ('sale', 1), (NULL, NULL)").await.unwrap();
    b1.batch_execute("INSERT INTO audit VALUES ('sale', 1); DELETE FROM audit WHERE ctid = (SELECT ctid FROM audit WHERE event = 'boot' LIMIT 1);").await.unwrap();
    b2.batch_execute("INSERT INTO audit VALUES (NULL, 2); UPDATE audit SET n = 7 WHERE ctid = (SELECT ctid FROM audit WHERE n IS NULL LIMIT 1);").await.unwrap();
    heal_all(&topo);
    wait_converged(&topo.sites(), &["audit"], Duration::from_secs(60)).await;
    let a = rows(&main, "SELECT event, n, count(*) FROM audit GROUP BY 1, 2 ORDER BY 1, 2").await;
    assert_eq!(a, ["(boot,7,1)", "(sale,1,3)", "(,2,1)", "(,,1)"]);
}

/// `branchsync conflicts list | show | resolve`: keeping the remote version
/// writes it back, and that replicates to every site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_a_conflict_and_the_resolution_replicates() {
    let topo = started().await;
    let (main, b1) = (erp(&topo.main).await, erp(&topo.branches[0]).await);
    cut_all(&topo).await;
    b1.batch_execute("UPDATE products SET price = 12 WHERE id = 1").await.unwrap();
    later().await;
    main.batch_execute("UPDATE products SET price = 11 WHERE id = 1").await.unwrap();
    heal_all(&topo);
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(60)).await;
    assert_eq!(rows(&main, "SELECT price FROM products").await, ["(11.00)"]);
    let out = topo.main.cli(&["conflicts", "list"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("update_update") && text.contains("public.products"), "{text}");
    let list: serde_json::Value = serde_json::from_slice(&topo.main.cli(&["conflicts", "list", "--json"]).stdout).unwrap();
    let id = list[0]["id"].as_i64().unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&topo.main.cli(&["conflicts", "show", &id.to_string()]).stdout).unwrap();
    assert_eq!(shown["remote_version"]["price"], "12.00", "{shown}");
    assert_eq!(shown["local_version"]["price"], "11.00", "{shown}");
    let out = topo.main.cli(&["conflicts", "resolve", &id.to_string(), "--keep", "remote"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    assert_eq!(rows(&b1, "SELECT price FROM products").await, ["(12.00)"], "the resolution reached branch1");
    let again = topo.main.cli(&["conflicts", "resolve", &id.to_string(), "--keep", "local"]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already resolved"));
    let text = String::from_utf8_lossy(&topo.main.cli(&["conflicts", "list"]).stdout).to_string();
    assert!(text.contains("no unresolved conflicts"), "{text}");

    // Records name their table as text and arrive from other nodes: one
    // that names branchsync's own progress (or any table outside the
    // replicated scope) is never written into.
    let admin = topo.main.db().await;
    for target in ["branchsync.progress", "public.local_cache", "pg_catalog.pg_class"] {
        let forged: i64 = admin
            .query_one(
                "INSERT INTO branchsync.conflicts (tbl, key, kind, rule, remote_version) VALUES ($1, '[\"x\"]', 'update_update', 'lww', '{\"stream\": \"branch1\", \"pos\": 0}') RETURNING id",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        let out = topo.main.cli(&["conflicts", "resolve", &forged.to_string(), "--keep", "remote"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("is not replicated here"), "resolving a record of {target}: {err}");
    }
    let progress: i64 = admin.query_one("SELECT pos FROM branchsync.progress WHERE stream = 'branch1'", &[]).await.unwrap().get(0);
    assert!(progress > 0, "branch1's progress at the main was overwritten by a resolution");
}

/// R14: a shop PC whose clock runs an hour fast does not win every
/// conflict, also for changes it made while its daemon was down: the offset
/// measured at the handshake is persisted and corrects its stamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r14_a_branch_an_hour_fast_does_not_win_by_its_clock_even_while_its_daemon_was_down() {
    let mut topo = Topology::prepare_with(1, SCHEMA, RULES).await;
    topo.branches[0].pg.restart_with_env(faked_clock("+1h"));
    topo.start_all();
    let (main, b1) = (erp(&topo.main).await, erp(&topo.branches[0]).await);
    let ahead: f64 = b1.query_one("SELECT extract(epoch from now() - $1::timestamptz)::float8", &[&std::time::SystemTime::now()]).await.unwrap().get(0);
    assert!((3500.0..3700.0).contains(&ahead), "branch1's database runs an hour ahead ({ahead} s)");
    main.batch_execute("INSERT INTO products VALUES (1, 'tea', 10, NULL)").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    let offset: i64 = topo.branches[0].db().await.query_one("SELECT offset_us FROM branchsync.clock_offsets ORDER BY at_us DESC LIMIT 1", &[]).await.unwrap().get(0);
    assert!((offset - 3_600_000_000).abs() < 1_000_000, "the measured offset is an hour: {offset} µs");
    let st = wait_status(&topo.branches[0], "branch1 shows its clock offset", Duration::from_secs(10), |s| s["peers"]["main"]["clock_offset_ms"].as_i64().is_some()).await;
    assert!((st["peers"]["main"]["clock_offset_ms"].as_i64().unwrap() - 3_600_000).abs() < 1_000, "{st}");

    // Cut off and its daemon down: the shop changes the price (its clock
    // says an hour later than it is), then the main changes it, later.
    topo.proxies[0].cut();
    topo.branches[0].stop();
    b1.batch_execute("UPDATE products SET price = 12 WHERE id = 1").await.unwrap();
    later().await;
    main.batch_execute("UPDATE products SET price = 11 WHERE id = 1").await.unwrap();
    topo.branches[0].start();
    topo.proxies[0].heal();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(60)).await;
    assert_eq!(rows(&main, "SELECT price FROM products").await, ["(11.00)"], "the main's later change wins");
    assert_eq!(records_converged(&topo, 1).await, ["update_update public.products [\"1\"] main branch1"]);
}

/// Branch1 sells 1,500 units offline from the same ten `stock` rows, then
/// its link comes back: the main starts catching up on changes to rows its
/// own till sells from. Returns the topology, a client of the main, the
/// till's connection and the units in stock before.
async fn hot_catch_up() -> (Topology, tokio_postgres::Client, tokio_postgres::Client, i64) {
    let topo = started().await;
    let (main, b1) = (erp(&topo.main).await, erp(&topo.branches[0]).await);
    main.batch_execute("INSERT INTO stock SELECT g, 1000, 'shelf' FROM generate_series(2, 10) g").await.unwrap();
    wait_converged(&topo.sites(), &["stock"], Duration::from_secs(30)).await;
    let before: i64 = main.query_one("SELECT sum(qty)::int8 FROM stock", &[]).await.unwrap().get(0);
    topo.proxies[0].cut();
    b1.batch_execute("DO $$ BEGIN FOR i IN 1..1500 LOOP UPDATE stock SET qty = qty - 1 WHERE id = 1 + i % 10; COMMIT; END LOOP; END $$").await.unwrap();
    topo.proxies[0].heal();
    let till = topo.main.db().await;
    (topo, main, till, before)
}

/// Whether the main has applied branch1's whole backlog.
async fn backlog_in(till: &tokio_postgres::Client) -> bool {
    till.query_one("SELECT count(*) FROM branchsync.progress WHERE stream = 'branch1' AND pos >= 1500", &[]).await.unwrap().get::<_, i64>(0) == 1
}

/// R7/R8 with a cashier that polls: apply catches up on a branch's backlog
/// of changes to the rows a till is selling from, with `SELECT … FOR UPDATE
/// NOWAIT` and retries 25 ms apart (for up to 2.5 s); no till transaction
/// runs out of retries, because apply yields a fifth of its time while it
/// holds existing rows group after group (a try then succeeds with a chance
/// of about one in five: measured here, at most 12–20 tries for one sale);
/// every unit sold anywhere counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cashier_taking_nowait_locks_is_never_starved_by_apply() {
    const RETRIES: u32 = 100;
    let (topo, main, till, before) = hot_catch_up().await;
    let (mut sold, mut max_tries) = (0i64, 0u32);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if backlog_in(&till).await && sold >= 50 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the backlog did not arrive");
        let id = 1 + (sold % 10) as i32;
        let mut tries = 0;
        loop {
            tries += 1;
            let r = till
                .batch_execute(&format!("BEGIN; SELECT qty FROM stock WHERE id = {id} FOR UPDATE NOWAIT; UPDATE stock SET qty = qty - 1 WHERE id = {id}; COMMIT;"))
                .await;
            match r {
                Ok(()) => break,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                    till.batch_execute("ROLLBACK").await.unwrap();
                    assert!(tries < RETRIES, "a till transaction failed {tries} times in a row: apply held the row too long");
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => panic!("till: {e}"),
            }
        }
        max_tries = max_tries.max(tries);
        sold += 1;
    }
    println!("till sold {sold} units during the catch-up; at most {max_tries} tries for one sale");
    wait_converged(&topo.sites(), &["stock"], Duration::from_secs(60)).await;
    let after: i64 = main.query_one("SELECT sum(qty)::int8 FROM stock", &[]).await.unwrap().get(0);
    assert_eq!(after, before - 1500 - sold, "every unit sold at the branch and at the till counts");
}

/// R7/R8 with a cashier: apply catches up on a branch's backlog of changes
/// to the rows a till is selling from, while the till locks those rows
/// (`SELECT … FOR UPDATE`, waiting at most a second, as an ERP with a
/// `lock_timeout` does). Apply commits a group at least every group budget
/// (50 ms), so no sale waits long; none times out, and every unit sold
/// anywhere counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cashier_waiting_for_a_row_is_never_starved_by_apply() {
    let (topo, main, till, before) = hot_catch_up().await;
    till.batch_execute("SET lock_timeout = '1s'").await.unwrap();
    let (mut sold, mut longest) = (0i64, Duration::ZERO);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if backlog_in(&till).await && sold >= 50 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the backlog did not arrive");
        let id = 1 + (sold % 10) as i32;
        let t = std::time::Instant::now();
        let r = till.batch_execute(&format!("BEGIN; SELECT qty FROM stock WHERE id = {id} FOR UPDATE; UPDATE stock SET qty = qty - 1 WHERE id = {id}; COMMIT;")).await;
        if let Err(e) = r {
            panic!("a till transaction failed after {:?} (apply held the row longer than the till's lock_timeout): {e}", t.elapsed());
        }
        longest = longest.max(t.elapsed());
        sold += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("till sold {sold} units during the catch-up; the longest sale took {longest:?}");
    wait_converged(&topo.sites(), &["stock"], Duration::from_secs(60)).await;
    let after: i64 = main.query_one("SELECT sum(qty)::int8 FROM stock", &[]).await.unwrap().get(0);
    assert_eq!(after, before - 1500 - sold, "every unit sold at the branch and at the till counts");
}
