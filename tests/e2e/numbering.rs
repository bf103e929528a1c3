//! Issue 16 (per-site document numbering, on a model of Tryton's
//! `ir_sequence_strict`): a counter row that every site advances for each
//! document it numbers, with its per-site prefix, as site-local columns
//! (`[[tables]] local`).
//!
//! The head office and two shops number documents while the shops are cut
//! off, and the main creates a second counter (a new fiscal year) meanwhile.
//! After the heal: no number was issued twice across the chain, each site's
//! series is gapless, the counter rows never conflicted, each site's
//! counter stands at its own count, and the new counter row took each
//! shop's series (its own default prefix) when it arrived.

use std::collections::BTreeMap;
use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE doc_counter (id int PRIMARY KEY, name text NOT NULL, prefix text NOT NULL DEFAULT '', next int NOT NULL DEFAULT 1);
INSERT INTO doc_counter VALUES (1, 'receipts', '', 1);
CREATE TABLE documents (id serial PRIMARY KEY, counter int NOT NULL REFERENCES doc_counter(id), number text NOT NULL, shop text NOT NULL);
CREATE FUNCTION take_number(c int) RETURNS text LANGUAGE plpgsql AS $$
DECLARE p text; n int;
BEGIN
  SELECT prefix, next INTO p, n FROM doc_counter WHERE id = c FOR UPDATE;
  UPDATE doc_counter SET next = next + 1 WHERE id = c;
  RETURN p || n;
END $$;
";

/// Every node: the counter and its prefix are each site's own.
const RULES: &str = "[[tables]]\nmatch = \"doc_counter\"\nlocal = [\"prefix\", \"next\"]\n";

/// Numbers `n` documents from counter `c` at `db`, one transaction each.
async fn number(db: &tokio_postgres::Client, shop: &str, c: i32, n: usize) {
    for _ in 0..n {
        db.execute("INSERT INTO documents (counter, number, shop) VALUES ($1, take_number($1), $2)", &[&c, &shop]).await.expect("number a document");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sites_number_documents_from_their_own_series_and_none_is_issued_twice() {
    let mut topo = Topology::prepare_with(2, SCHEMA, RULES).await;
    // Each site's series: its prefix on the existing counter, and (a
    // shop's own schema change, which stays local) the prefix a counter
    // row created elsewhere takes when it arrives here.
    let main_db = topo.main.db().await;
    main_db.batch_execute("UPDATE doc_counter SET prefix = 'M-'").await.unwrap();
    let mut shops = Vec::new();
    for (i, b) in topo.branches.iter().enumerate() {
        let db = b.db().await;
        let p = format!("B{}-", i + 1);
        db.batch_execute(&format!("ALTER TABLE doc_counter ALTER COLUMN prefix SET DEFAULT '{p}'; UPDATE doc_counter SET prefix = '{p}'")).await.unwrap();
        shops.push((b.name.clone(), db, p));
    }
    topo.start_all();
    for b in ["branch1", "branch2"] {
        wait_status(&topo.main, &format!("{b} connected"), Duration::from_secs(60), |s| s["peers"][b]["connected"] == true).await;
    }

    // Offline: every site numbers receipts; the main opens a new counter
    // and numbers from it too.
    for p in &topo.proxies {
        p.cut();
    }
    let counts = [("main", 30usize), ("branch1", 40), ("branch2", 50)];
    number(&main_db, "main", 1, counts[0].1).await;
    for ((name, db, _), (_, n)) in shops.iter().zip(&counts[1..]) {
        number(db, name, 1, *n).await;
    }
    main_db.batch_execute("INSERT INTO doc_counter (id, name, prefix, next) VALUES (2, 'moves 2027', 'M27-', 1)").await.unwrap();
    number(&main_db, "main", 2, 5).await;
    for p in &topo.proxies {
        p.heal();
    }

    // After the heal, the new counter reaches the shops; every site numbers
    // from both counters.
    wait_converged(&topo.sites(), &["documents"], Duration::from_secs(120)).await;
    for (_, db, _) in &shops {
        eventually("the new counter reaches the shop", Duration::from_secs(60), || async move {
            (db.query_one("SELECT count(*) FROM doc_counter", &[]).await.ok()?.get::<_, i64>(0) == 2).then_some(())
        })
        .await;
    }
    number(&main_db, "main", 1, 3).await;
    number(&main_db, "main", 2, 2).await;
    for (name, db, _) in &shops {
        number(db, name, 1, 3).await;
        number(db, name, 2, 4).await;
    }
    wait_converged(&topo.sites(), &["documents"], Duration::from_secs(120)).await;

    // No number twice across the chain.
    let twice: Vec<String> = main_db
        .query("SELECT counter || ':' || number FROM documents GROUP BY counter, number HAVING count(*) > 1 ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(twice.is_empty(), "numbers issued twice: {twice:?}");
    // Each site's series gapless, with its own prefix, on each counter.
    let mut series: BTreeMap<(String, i32), Vec<String>> = BTreeMap::new();
    for r in main_db.query("SELECT shop, counter, number FROM documents ORDER BY id", &[]).await.unwrap() {
        series.entry((r.get(0), r.get(1))).or_default().push(r.get(2));
    }
    let expected = |prefix: &str, n: usize| (1..=n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    assert_eq!(series[&("main".into(), 1)], expected("M-", 33));
    assert_eq!(series[&("main".into(), 2)], expected("M27-", 7));
    for ((name, db, p), (_, n)) in shops.iter().zip(&counts[1..]) {
        assert_eq!(series[&(name.clone(), 1)], expected(p, n + 3), "{name}'s receipts");
        assert_eq!(series[&(name.clone(), 2)], expected(p, 4), "{name}'s numbers on the counter created at the main while it was away");
        let nexts: Vec<(i32, String, i32)> = db.query("SELECT id, prefix, next FROM doc_counter ORDER BY id", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        assert_eq!(nexts, [(1, p.clone(), (n + 4) as i32), (2, p.clone(), 5)], "{name}'s counters are its own");
    }
    let nexts: Vec<(i32, String, i32)> = main_db.query("SELECT id, prefix, next FROM doc_counter ORDER BY id", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(nexts, [(1, "M-".to_string(), 34), (2, "M27-".to_string(), 8)], "the main's counters are its own");
    let conflicts: i64 = main_db.query_one("SELECT count(*) FROM branchsync.conflicts", &[]).await.unwrap().get(0);
    assert_eq!(conflicts, 0, "site-local counters never conflict");
    println!("numbered: {series:?}");
}
