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
