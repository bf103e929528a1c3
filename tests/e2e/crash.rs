//! Done-when 3: `kill -9` of either daemon and `pg_ctl stop -m immediate`
//! of either PostgreSQL in the middle of a catch-up, in a loop, plus a crash
//! at each durability boundary (failpoints): afterwards every committed
//! transaction is at every site exactly once. Exactly-once is checked on an
//! append-only table *without a key*, where a re-applied row would show.

use std::time::Duration;

use branchsync_engine::failpoints as fp;
use branchsync_tests::*;
use rand::{Rng, SeedableRng};

const SCHEMA: &str = "
CREATE TABLE ledger (site text NOT NULL, seq integer NOT NULL, note text);
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, seq integer NOT NULL);
";

#[derive(Debug, Clone, Copy)]
enum Disruption {
    KillDaemon(usize),
    StopPostgres(usize),
    Failpoint(usize, &'static str),
}

async fn write_batch(c: &tokio_postgres::Client, site: &str, from: i32, n: i32) {
    for seq in from..from + n {
        c.batch_execute(&format!(
            "BEGIN; INSERT INTO ledger VALUES ('{site}', {seq}, 'x'); INSERT INTO orders (shop, seq) VALUES ('{site}', {seq}); COMMIT;"
        ))
        .await
        .expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_anywhere_during_catch_up_neither_lose_nor_double_a_transaction() {
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (set CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    // Site 0 = main, 1 = branch1.
    let mut plan = vec![
        Disruption::Failpoint(1, fp::CAPTURE_AFTER_LOG_WRITE),
        Disruption::Failpoint(0, fp::CAPTURE_AFTER_LOG_WRITE),
        Disruption::Failpoint(0, fp::APPLY_BEFORE_COMMIT),
        Disruption::Failpoint(0, fp::APPLY_AFTER_COMMIT),
        Disruption::Failpoint(1, fp::APPLY_AFTER_COMMIT),
        Disruption::Failpoint(0, fp::LINK_AFTER_SEND),
        Disruption::Failpoint(1, fp::LOG_BEFORE_RECLAIM),
    ];
    for _ in 0..3 {
        plan.push(Disruption::KillDaemon(rng.gen_range(0..2)));
        plan.push(Disruption::StopPostgres(rng.gen_range(0..2)));
    }
    let mut next = [1i32, 1i32];
    for (round, d) in plan.iter().enumerate() {
        println!("round {round}: {d:?}");
        // A backlog at both sites, then the disruption while it catches up.
        for (i, name) in ["main", "branch1"].iter().enumerate() {
            let site = if i == 0 { &topo.main } else { &topo.branches[0] };
            let c = site.db().await;
            let n = rng.gen_range(20..80);
            write_batch(&c, name, next[i], n).await;
            next[i] += n;
        }
        match *d {
            Disruption::KillDaemon(i) => {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(20..400))).await;
                let s = topo.site_mut(i);
                s.kill9();
                s.start();
            }
            Disruption::StopPostgres(i) => {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(20..400))).await;
                let s = topo.site_mut(i);
                s.pg.stop_immediate();
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.pg.start_server();
            }
            Disruption::Failpoint(i, name) => {
                let hits = rng.gen_range(1..4);
                {
                    let s = topo.site_mut(i);
                    s.kill9();
                    s.env = vec![("BRANCHSYNC_FAILPOINT".into(), format!("{name}:{hits}"))];
                    s.start();
                }
                // Keep writing at both sites until the armed path has been
                // taken `hits` times and the daemon died there.
                let (main_db, branch_db) = (topo.main.db().await, topo.branches[0].db().await);
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let mut st = None;
                while st.is_none() && std::time::Instant::now() < deadline {
                    for (j, (c, n)) in [(&main_db, "main"), (&branch_db, "branch1")].into_iter().enumerate() {
                        write_batch(c, n, next[j], 3).await;
                        next[j] += 3;
                    }
                    st = topo.site_mut(i).wait_exit(Duration::from_millis(200));
                }
                let s = topo.site_mut(i);
                assert_eq!(st.and_then(|st| st.code()), Some(137), "failpoint {name} at {} did not fire", s.name);
                s.env.clear();
                s.start();
            }
        }
    }
    wait_converged(&topo.sites(), &["ledger", "orders"], Duration::from_secs(180)).await;
    for s in topo.sites() {
        let c = s.db().await;
        for (i, name) in ["main", "branch1"].iter().enumerate() {
            let r = c
                .query_one("SELECT count(*), count(DISTINCT seq), coalesce(min(seq), 0), coalesce(max(seq), 0) FROM ledger WHERE site = $1", &[name])
                .await
                .unwrap();
            let got: (i64, i64, i32, i32) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let n = (next[i] - 1) as i64;
            assert_eq!(got, (n, n, 1, next[i] - 1), "ledger rows of {name} at {}: (count, distinct, min, max)", s.name);
        }
    }
}

