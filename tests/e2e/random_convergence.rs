//! Issue 4, done-when 1: a randomized convergence test.
//!
//! A main and two branches. Each step, a random site writes: inserts,
//! updates and deletes of a small set of shared items, and increments of
//! shared counters (delta columns). Between steps the links are cut and
//! healed and daemons are killed with SIGKILL and restarted, at random.
//! Every write carries a unique tag and logs, in the same transaction, the
//! tag it replaced (read under the row lock, so the writer had seen it).
//! After healing everything, every site must hold identical rows; every
//! counter must equal its start plus the sum of all increments made
//! anywhere; and every tag ever written must be current, knowingly replaced
//! by a later write, or in `branchsync.conflicts` — with the same records at
//! every node.
//!
//! `RANDOM_SEEDS` (default 2) and `RANDOM_STEPS` (default 120) bound the run
//! in CI; `RANDOM_SEED=n` replays one seed. A long soak:
//!
//! ```text
//! RANDOM_SEEDS=50 RANDOM_STEPS=600 cargo test -p branchsync-tests --test e2e random_convergence -- --nocapture
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use branchsync_tests::*;
use rand::{Rng, SeedableRng};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, tag text NOT NULL, val int NOT NULL, note text);
CREATE TABLE counters (id int PRIMARY KEY, qty bigint NOT NULL);
CREATE TABLE writes (tag text PRIMARY KEY, node text NOT NULL, op text NOT NULL, item int NOT NULL, prev_tag text, k int NOT NULL DEFAULT 0);
INSERT INTO counters SELECT g, 1000 FROM generate_series(1, 4) g;
";

const RULES: &str = "
[[tables]]
match = \"counters\"
delta = [\"qty\"]
";

const ITEMS: i32 = 8;

/// One site's writer: a connection and a tag counter.
struct Writer {
    name: String,
    c: tokio_postgres::Client,
    n: u64,
}

impl Writer {
    fn tag(&mut self) -> String {
        self.n += 1;
        format!("{}-{}", self.name, self.n)
    }

    /// One random write, in one transaction, with its log row. Returns the
    /// counter increment made, if any.
    async fn write(&mut self, rng: &mut rand::rngs::StdRng) -> Option<(i32, i64)> {
        let tag = self.tag();
        let id = rng.gen_range(1..=ITEMS);
        let op = rng.gen_range(0..10);
        let tx = self.c.transaction().await.expect("begin");
        let r = match op {
            0..=5 => {
                let prev: Option<String> =
                    tx.query_opt("SELECT tag FROM items WHERE id = $1 FOR UPDATE", &[&id]).await.expect("read").map(|r| r.get(0));
                let val: i32 = rng.gen_range(0..1000);
                match &prev {
                    Some(_) => {
                        // Half of the updates change only the note (another column).
                        if rng.gen_bool(0.5) {
                            tx.execute("UPDATE items SET tag = $2, val = $3 WHERE id = $1", &[&id, &tag, &val]).await.expect("update");
                        } else {
                            tx.execute("UPDATE items SET tag = $2, note = $3 WHERE id = $1", &[&id, &tag, &format!("note {val}")]).await.expect("update");
                        }
                        tx.execute("INSERT INTO writes (tag, node, op, item, prev_tag) VALUES ($1, $2, 'update', $3, $4)", &[&tag, &self.name, &id, &prev]).await.expect("log");
                    }
                    None => {
                        // The relay may insert the same id meanwhile, like any
                        // concurrent writer: then this write does not happen.
                        if let Err(e) = tx.execute("INSERT INTO items (id, tag, val) VALUES ($1, $2, $3)", &[&id, &tag, &val]).await {
                            assert_eq!(e.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION), "insert: {e}");
                            return None;
                        }
                        tx.execute("INSERT INTO writes (tag, node, op, item) VALUES ($1, $2, 'insert', $3)", &[&tag, &self.name, &id]).await.expect("log");
                    }
                }
                None
            }
            6 => {
                let prev: Option<String> =
                    tx.query_opt("DELETE FROM items WHERE id = $1 RETURNING tag", &[&id]).await.expect("delete").map(|r| r.get(0));
                if prev.is_some() {
                    tx.execute("INSERT INTO writes (tag, node, op, item, prev_tag) VALUES ($1, $2, 'delete', $3, $4)", &[&tag, &self.name, &id, &prev]).await.expect("log");
                }
                None
            }
            _ => {
                let counter = rng.gen_range(1..=4);
                let k: i32 = rng.gen_range(-5..=5);
                tx.execute("UPDATE counters SET qty = qty + $2 WHERE id = $1", &[&counter, &i64::from(k)]).await.expect("count");
                tx.execute("INSERT INTO writes (tag, node, op, item, k) VALUES ($1, $2, 'count', $3, $4)", &[&tag, &self.name, &counter, &k]).await.expect("log");
                Some((counter, i64::from(k)))
            }
        };
        tx.commit().await.expect("commit");
        r
    }
}

/// Whether every site holds the same rows within `timeout`.
async fn converged(topo: &Topology, tables: &[&str], timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    let mut clients = Vec::new();
    for s in topo.sites() {
        clients.push(s.db().await);
    }
    while std::time::Instant::now() < deadline {
        let mut same = true;
        for t in tables {
            let mut sums = Vec::new();
            for c in &clients {
                sums.push(try_table_checksum(c, t).await.unwrap_or((-1, String::new())));
            }
            same &= sums.windows(2).all(|w| w[0] == w[1]);
        }
        if same {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// What a failing seed needs to be understood: versions, parked rows, the
/// log of writes, the conflict records of every site.
async fn dump(topo: &Topology) {
        for s in topo.sites() {
            let c = s.db().await;
            for r in c.query("SELECT id, qty, xmin::text, (pg_xact_commit_timestamp_origin(xmin)).roident::int, (pg_xact_commit_timestamp_origin(xmin)).timestamp::text FROM counters ORDER BY id", &[]).await.unwrap() {
                println!("DBG {} counter {} qty {} xmin {} origin {:?} ts {:?}", s.name, r.get::<_, i32>(0), r.get::<_, i64>(1), r.get::<_, String>(2), r.get::<_, Option<i32>>(3), r.get::<_, Option<String>>(4));
            }
            for r in c.query("SELECT stream, tbl, key, reason FROM branchsync.parked", &[]).await.unwrap() {
                println!("DBG {} parked {} {} {:?} {}", s.name, r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, Option<String>>(2), r.get::<_, String>(3));
            }
        }
        let c = topo.main.db().await;
        for r in c.query("SELECT tag, node, op, item, coalesce(prev_tag, '-') FROM writes WHERE op <> 'count' ORDER BY item, tag", &[]).await.unwrap() {
            println!("DBG write {} {} {} item {} prev {}", r.get::<_, String>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, i32>(3), r.get::<_, String>(4));
        }
        for s in topo.sites() {
            for r in s.db().await.query("SELECT id, kind, key, coalesce(winner_node,'-'), coalesce(loser_node,'-'), coalesce(local_version::text,'-'), coalesce(remote_version::text,'-'), coalesce(origin_node, '-') FROM branchsync.conflicts ORDER BY id", &[]).await.unwrap() {
                println!("DBG {} conflict {} {} {:?} w {} l {} local {} remote {} origin {}", s.name, r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, Option<String>>(2), r.get::<_, String>(3), r.get::<_, String>(4), r.get::<_, String>(5), r.get::<_, String>(6), r.get::<_, String>(7));
            }
        }
    }

async fn one_seed(seed: u64, steps: usize) {
    println!("random convergence: seed {seed}, {steps} steps (replay with RANDOM_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut topo = Topology::prepare_with(2, SCHEMA, RULES).await;
    topo.start_all();
    let mut writers = Vec::new();
    for s in topo.sites() {
        writers.push(Writer { name: s.name.clone(), c: s.db().await, n: 0 });
    }
    let mut cut = [false, false];
    let mut expected: BTreeMap<i32, i64> = (1..=4).map(|i| (i, 1000)).collect();
    for step in 0..steps {
        let w = rng.gen_range(0..writers.len());
        if let Some((counter, k)) = writers[w].write(&mut rng).await {
            *expected.entry(counter).or_default() += k;
        }
        match rng.gen_range(0..100) {
            0..=4 => {
                let b = rng.gen_range(0..2);
                if cut[b] {
                    topo.proxies[b].heal();
                } else {
                    topo.proxies[b].cut();
                }
                cut[b] = !cut[b];
            }
            5..=6 => {
                // SIGKILL a daemon and start it again.
                let i = rng.gen_range(0..3);
                let site = topo.site_mut(i);
                site.kill9();
                site.start();
                println!("  step {step}: killed and restarted {}", site.name);
            }
            _ => {}
        }
        if rng.gen_bool(0.3) {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(1..30))).await;
        }
    }
    for p in &topo.proxies {
        p.heal();
    }
    let tables = ["items", "counters", "writes"];
    if !converged(&topo, &tables, Duration::from_secs(180)).await {
        dump(&topo).await;
    }
    wait_converged(&topo.sites(), &tables, Duration::from_secs(1)).await;

    // Counters: the start plus every increment made anywhere.
    let main = topo.main.db().await;
    let got: BTreeMap<i32, i64> = main.query("SELECT id, qty FROM counters", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, expected, "seed {seed}: counters");
    let from_log: i64 = main.query_one("SELECT 4000 + coalesce(sum(k), 0)::int8 FROM writes WHERE op = 'count'", &[]).await.unwrap().get(0);
    assert_eq!(got.values().sum::<i64>(), from_log, "seed {seed}: counters agree with the log of increments");

    // Every tag is current, knowingly replaced, or on record.
    let written: BTreeSet<String> = main.query("SELECT tag FROM writes WHERE op IN ('insert', 'update')", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let current: BTreeSet<String> = main.query("SELECT tag FROM items", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let replaced: BTreeSet<String> = main.query("SELECT prev_tag FROM writes WHERE prev_tag IS NOT NULL", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let mut records_by_site = Vec::new();
    for s in topo.sites() {
        let c = s.db().await;
        let recs: Vec<String> = c
            .query(
                "SELECT kind || ' ' || tbl || ' ' || coalesce(key, '-') || ' ' || coalesce(winner_node, '-') || ' ' || coalesce(loser_node, '-') || ' ' \
                        || coalesce(local_version->>'tag', '-') || ' ' || coalesce(remote_version->>'tag', remote_version->'deleted'->>'tag', '-') \
                 FROM branchsync.conflicts WHERE origin_id IS NOT NULL OR origin_node = 'main' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        records_by_site.push((s.name.clone(), recs));
    }
    for w in records_by_site.windows(2) {
        assert_eq!(w[0].1, w[1].1, "seed {seed}: {} and {} hold different conflict records", w[0].0, w[1].0);
    }
    let on_record: BTreeSet<String> = main
        .query("SELECT t FROM branchsync.conflicts, LATERAL (VALUES (local_version->>'tag'), (remote_version->>'tag'), (remote_version->'deleted'->>'tag')) v(t) WHERE t IS NOT NULL", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<&String> = written.iter().filter(|t| !current.contains(*t) && !replaced.contains(*t) && !on_record.contains(*t)).collect();
    assert!(lost.is_empty(), "seed {seed}: versions vanished without a record: {lost:?}\nconflicts: {:#?}", records_by_site[0].1);
    println!(
        "random convergence: seed {seed}: {} versions written, {} current, {} knowingly replaced, {} conflict records at every node",
        written.len(),
        current.len(),
        written.iter().filter(|t| replaced.contains(*t)).count(),
        records_by_site[0].1.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_writes_cuts_and_kills_converge_with_every_version_accounted_for() {
    let steps: usize = std::env::var("RANDOM_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    if let Some(seed) = std::env::var("RANDOM_SEED").ok().and_then(|s| s.parse().ok()) {
        return one_seed(seed, steps).await;
    }
    let seeds: u64 = std::env::var("RANDOM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let base: u64 = rand::random();
    for i in 0..seeds {
        one_seed(base.wrapping_add(i), steps).await;
    }
}
