//! The link handshake and who-captures-what, end to end:
//!
//! * R23 eviction: a connection of a branch that went silent holds the
//!   node's index while it is fresh; once it has missed its heartbeats, the
//!   real branch's connection evicts it.
//! * R23 configuration: exclude globs that differ from the main's are
//!   refused as a configuration mismatch (stride: `bad_input.rs`).
//! * R23/R4 reseed: a branch whose relay progress is behind what the main
//!   has already reclaimed is refused and told to re-seed.
//! * R3: a branch does not capture what branchsync applied there, so
//!   nothing echoes back to the main.
//!
//! Hand-made handshakes use [`Framed`] with the real codec against a
//! running main. Every test prints its ports and directories.

use std::time::{Duration, Instant};

use branchsync_proto::{FrameCodec, Hello, Message, Refusal, RefusalReason, PROTOCOL_VERSION};
use branchsync_tests::*;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

type Conn = LinkConn;

const ORDERS: &str = "CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL);\nCREATE TABLE local_cache (k text PRIMARY KEY, v text);";

/// Prints where a topology lives, so a failed run can be inspected.
fn describe(test: &str, topo: &Topology) {
    eprintln!("{test}: main listens on 127.0.0.1:{}, main http {}, main dir {}", topo.main_port, topo.main.http_port, topo.main.dir.path().display());
    for (b, p) in topo.branches.iter().zip(&topo.proxies) {
        eprintln!("{test}: {} dials proxy port {}, http {}, dir {}", b.name, p.port, b.http_port, b.dir.path().display());
    }
}

/// Durable progress of `stream` in the site's database (0 = none).
async fn progress(c: &tokio_postgres::Client, stream: &str) -> u64 {
    let pos: i64 = c.query_one("SELECT coalesce((SELECT pos FROM branchsync.progress WHERE stream = $1), 0)", &[&stream]).await.unwrap().get(0);
    pos as u64
}

async fn main_listening(port: u16) {
    eventually("the main listens for branches", Duration::from_secs(30), || async move { TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()) }).await;
}

/// Sends `h` on a new connection; returns the main's answer and the connection.
async fn dial(port: u16, tls: &std::path::Path, h: Hello) -> (Message, Conn) {
    let sock = dial_link(port, tls).await.expect("connect to the main");
    let mut f = Framed::new(sock, FrameCodec::default());
    f.send(Message::Hello(h)).await.expect("send Hello");
    let m = tokio::time::timeout(Duration::from_secs(15), f.next()).await.expect("an answer to Hello").expect("a frame").expect("decodable");
    (m, f)
}

/// Like [`dial`], but while the main still holds the node's previous
/// session (it ends a moment after the main reports the peer disconnected)
/// the IndexInUse answer is retried.
async fn dial_when_free(port: u16, tls: &std::path::Path, h: Hello) -> (Message, Conn) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (m, f) = dial(port, tls, h.clone()).await;
        match &m {
            Message::Refuse(r) if r.reason == RefusalReason::IndexInUse && Instant::now() < deadline => {
                drop(f);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return (m, f),
        }
    }
}

pub(crate) fn expect_refusal(m: Message, why: RefusalReason, text: &str) -> Refusal {
    match m {
        Message::Refuse(r) => {
            assert_eq!(r.reason, why, "{r}");
            assert!(r.to_string().contains(text), "refusal must say {text:?}: {r}");
            assert!(!r.hint.is_empty(), "refusal must say how to fix it: {r}");
            r
        }
        other => panic!("expected a refusal ({why:?}), got {other:?}"),
    }
}

fn expect_welcome(m: &Message, what: &str) {
    match m {
        Message::Welcome(w) => assert_eq!(w.protocol_version, PROTOCOL_VERSION),
        other => panic!("{what}: expected a Welcome, got {other:?}"),
    }
}

async fn log_says(site: &Site, needle: &str) {
    eventually(&format!("{}'s log says {needle:?}", site.name), Duration::from_secs(10), || async { site.daemon_log().contains(needle).then_some(()) }).await;
}

/// R23: a connection of branch1 that was welcomed and then went silent
/// (socket open, no heartbeat, no ack) holds the node's index while it is
/// fresh, so a second claim is refused. Once it has been silent for three of
/// the main's heartbeats, the real branch1's connection evicts it: the main
/// closes it long before its own peer timeout would, and branch1 syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_holds_the_index_while_fresh_and_is_evicted_by_the_real_branch() {
    // Eviction threshold at the main: min(peer_timeout, 3 × heartbeat) =
    // 1.5 s. The main's own peer timeout (30 s) is far away, so only an
    // eviction can end the silent session within the test.
    const HEARTBEAT_MS: u64 = 500;
    const MAIN_PEER_TIMEOUT: Duration = Duration::from_secs(30);
    let mut topo = Topology::prepare(1, ORDERS).await;
    describe("eviction", &topo);
    edit_config(&topo.main, "heartbeat_ms = 200\npeer_timeout_ms = 3000\n", &format!("heartbeat_ms = {HEARTBEAT_MS}\npeer_timeout_ms = {}\n", MAIN_PEER_TIMEOUT.as_millis()));
    topo.main.start();
    main_listening(topo.main_port).await;
    let port = topo.main_port;
    // The real system identifier: the main records the first one it sees.
    let sid = system_id(&topo.branches[0]).await;
    let epoch = topo.branches[0].log_epoch();

    let (m, mut silent) = dial(port, &topo.branches[0].tls_dir(), hello_for("branch1", 1, sid, epoch)).await;
    let welcomed = Instant::now();
    expect_welcome(&m, "the first connection of branch1");

    // Fresh: the index is in use.
    let (m, _) = dial(port, &topo.branches[0].tls_dir(), hello_for("branch1", 1, sid, epoch)).await;
    let fresh_for = welcomed.elapsed();
    assert!(fresh_for < Duration::from_millis(3 * HEARTBEAT_MS), "the second Hello took {fresh_for:?}; the first session was no longer fresh (test too slow)");
    expect_refusal(m, RefusalReason::IndexInUse, "already in use");
    log_says(&topo.main, "already in use").await;

    // Stay silent while the main's heartbeats arrive: five of them span at
    // least 4 × 500 ms since the session started, past the threshold.
    let mut heartbeats = 0;
    while heartbeats < 5 {
        match tokio::time::timeout(Duration::from_secs(10), silent.next()).await.expect("the main heartbeats the silent session") {
            Some(Ok(Message::Heartbeat { .. })) => heartbeats += 1,
            // The main acknowledges its (empty) progress in our stream.
            Some(Ok(Message::Ack { .. })) => {}
            Some(Ok(other)) => panic!("unexpected message on the silent session: {other:?}"),
            other => panic!("the main closed the silent session before any other connection came: {other:?}"),
        }
    }
    wait_status(&topo.main, "the main still counts the silent session as connected", Duration::from_secs(5), |s| s["peers"]["branch1"]["connected"] == true).await;
    eprintln!("eviction: silent for {:?} since the Welcome; starting the real branch1", welcomed.elapsed());

    topo.branches[0].start();
    // The main closes the silent socket (we keep reading, and never write).
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Heartbeat { .. } | Message::Ack { .. })) => continue,
                Some(Ok(other)) => panic!("unexpected message on the silent session: {other:?}"),
                None | Some(Err(_)) => return welcomed.elapsed(),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the main did not close the silent session after the real branch1 started\n{}", topo.main.daemon_log()));
    assert!(closed < MAIN_PEER_TIMEOUT, "the silent session ended after {closed:?}: by timeout, not eviction");
    eprintln!("eviction: silent session closed {closed:?} after its Welcome");
    log_says(&topo.main, "evicting an earlier connection").await;

    // The real branch holds the session and both directions sync.
    wait_status(&topo.main, "the main serves the real branch1", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    topo.branches[0].db().await.batch_execute("INSERT INTO orders (shop) SELECT 'branch1' FROM generate_series(1, 5)").await.unwrap();
    topo.main.db().await.batch_execute("INSERT INTO orders (shop) VALUES ('main')").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    let n: i64 = topo.main.db().await.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 6);
    assert!(!topo.branches[0].daemon_log().contains("already in use"), "the real branch1 must not have been refused:\n{}", topo.branches[0].daemon_log());
}

/// R23: exclude globs decide which tables replicate; a node whose globs
/// differ from the main's would send or drop rows the other side keeps
/// local. Hand-made Hellos with an extra, a missing or another glob are
/// refused as ConfigMismatch naming both lists; a real branch configured
/// with another glob is refused, applies nothing at the main, and syncs
/// once its config matches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclude_globs_that_differ_from_the_mains_are_refused_as_a_config_mismatch() {
    let mut topo = Topology::prepare(1, ORDERS).await;
    describe("exclude", &topo);
    topo.main.start();
    main_listening(topo.main_port).await;
    let port = topo.main_port;
    let sid = system_id(&topo.branches[0]).await;

    for globs in [vec!["local_*", "tmp_*"], vec![], vec!["cache_*"]] {
        let mut h = hello_for("branch1", 1, sid, 1);
        h.exclude = globs.iter().map(|g| g.to_string()).collect();
        let r = expect_refusal(dial(port, &topo.branches[0].tls_dir(), h).await.0, RefusalReason::ConfigMismatch, "differs from the main's");
        assert!(r.detail.contains(&format!("exclude {globs:?}")), "the detail must show the branch's globs {globs:?}: {r}");
        assert!(r.detail.contains("exclude [\"local_*\"]"), "the detail must show the main's globs: {r}");
    }

    // A real branch with one more glob.
    let branch = &mut topo.branches[0];
    edit_config(branch, "exclude = [\"local_*\"]", "exclude = [\"local_*\", \"tmp_*\"]");
    // The operator re-runs init after changing the scope (the daemon refuses
    // to start on a scope init did not record).
    branch.init();
    branch.start();
    branch.db().await.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    let st = wait_status(&topo.branches[0], "branch1 reports the refusal", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("differs from the main's"))
    })
    .await;
    eprintln!("exclude: branch1 says {}", st["peers"]["main"]["last_error"]);
    assert_eq!(st["peers"]["main"]["connected"], false);
    log_says(&topo.main, "ConfigMismatch").await;
    let main = topo.main.db().await;
    assert_eq!(progress(&main, "branch1").await, 0, "nothing may be applied from a refused branch");
    let n: i64 = main.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing may be applied from a refused branch");

    // Same globs again: accepted, and the sale made meanwhile arrives.
    let branch = &mut topo.branches[0];
    branch.stop();
    edit_config(branch, "exclude = [\"local_*\", \"tmp_*\"]", "exclude = [\"local_*\"]");
    branch.init();
    branch.start();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    let n: i64 = main.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
}

/// R23/R4: once both branches acknowledged the main's log, the main
/// reclaims it. A branch1 that claims to have applied the relay only up to
/// a reclaimed position (its database went back, or it was away too long)
/// is refused with MustReseed: the entries it would need are gone, and
/// skipping them would lose rows. The boundary is exact: progress at the
/// floor is welcomed, one below it is not. The refusals change nothing: the
/// real branch1 syncs afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_behind_the_mains_reclaimed_log_is_told_to_reseed() {
    // Acknowledged entries are reclaimed at once (no [log] keep_acked).
    let mut topo = Topology::prepare_with(2, ORDERS, "[log]\nkeep_acked_days = 0\n").await;
    describe("reseed", &topo);
    topo.start_all();
    wait_status(&topo.main, "both branches connected", Duration::from_secs(30), |s| {
        s["peers"]["branch1"]["connected"] == true && s["peers"]["branch2"]["connected"] == true
    })
    .await;
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    // branch1 writes first, so the main has applied part of its log (the
    // Hello's log_newest must cover that). Then the main writes: its own
    // entries end its log, both branches apply and acknowledge them, and
    // the main reclaims all of it. (A branch never receives, so never
    // acknowledges, its own entries in the relay: had branch1's entry been
    // last, the floor would stay just below it.)
    b1.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    for _ in 0..3 {
        main.batch_execute("INSERT INTO orders (shop) VALUES ('main')").await.unwrap();
    }
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    let st = wait_status(&topo.main, "the main reclaims its whole log", Duration::from_secs(30), |s| {
        let (floor, newest) = (s["log_floor"].as_u64().unwrap_or(0), s["log_newest"].as_u64().unwrap_or(0));
        floor >= 2 && floor == newest
    })
    .await;
    let floor = st["log_floor"].as_u64().unwrap();

    topo.branches[0].stop();
    wait_status(&topo.main, "branch1 disconnected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == false).await;
    let sid = system_id(&topo.branches[0]).await;
    let applied_from_b1 = progress(&main, "branch1").await;
    let relay_b1 = progress(&b1, "main").await;
    eprintln!("reseed: main log floor {floor}, main applied branch1 up to {applied_from_b1}, branch1 applied the relay up to {relay_b1}");
    assert!(applied_from_b1 >= 1, "the main applied branch1's sale");
    assert!(relay_b1 >= floor, "the real branch1 acknowledged everything the main reclaimed");
    let epoch = topo.branches[0].log_epoch();
    let behind = |relay_applied: u64| Hello { log_newest: applied_from_b1, log_floor: 0, relay_applied, ..hello_for("branch1", 1, sid, epoch) };

    let r = expect_refusal(dial_when_free(topo.main_port, &topo.branches[0].tls_dir(), behind(0)).await.0, RefusalReason::MustReseed, "must be re-seeded");
    assert!(r.message.contains("branch1"), "{r}");
    assert!(r.detail.contains(&format!("position {}", floor + 1)), "the detail must name the first position the main still holds: {r}");
    expect_refusal(dial_when_free(topo.main_port, &topo.branches[0].tls_dir(), behind(floor - 1)).await.0, RefusalReason::MustReseed, "must be re-seeded");
    log_says(&topo.main, "must be re-seeded").await;
    // At the floor everything the branch still needs is there.
    let (m, at_floor) = dial_when_free(topo.main_port, &topo.branches[0].tls_dir(), behind(floor)).await;
    expect_welcome(&m, "a branch whose relay progress is at the main's log floor");
    drop(at_floor);

    // Nothing changed: the real branch1 comes back and syncs both ways.
    wait_status(&topo.main, "the hand-made session ended", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == false).await;
    topo.branches[0].start();
    wait_status(&topo.main, "the real branch1 reconnected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    main.batch_execute("INSERT INTO orders (shop) VALUES ('main')").await.unwrap();
    b1.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    let n: i64 = main.query_one("SELECT count(*) FROM orders", &[]).await.unwrap().get(0);
    assert_eq!(n, 6);
    assert!(!topo.branches[0].daemon_log().contains("must be re-seeded"), "the real branch1 must not be refused");
}

/// R3: at a branch, transactions applied by branchsync carry the apply
/// message and are not captured. After the main's writes (inserts, an
/// update, a delete, a 12,000-row transaction that travels as several
/// fragments) and branch2's sales (relayed by the main) are applied at
/// branch1, branch1's log holds exactly its own one transaction, and the
/// main has applied exactly that one ChangeSet from branch1: nothing echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_does_not_capture_what_branchsync_applied_there() {
    let mut topo = Topology::prepare(2, POS_SCHEMA).await;
    describe("no-recapture", &topo);
    topo.start_all();
    wait_status(&topo.main, "both branches connected", Duration::from_secs(30), |s| {
        s["peers"]["branch1"]["connected"] == true && s["peers"]["branch2"]["connected"] == true
    })
    .await;
    let before = wait_status(&topo.branches[0], "branch1 connected", Duration::from_secs(30), |s| s["peers"]["main"]["connected"] == true).await;
    let (log0, captured0) = (before["log_newest"].as_u64().unwrap(), before["captured_transactions"].as_u64().unwrap());
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    let b2 = topo.branches[1].db().await;

    main.batch_execute("INSERT INTO products (name, price, stock) SELECT 'p' || g, g, 100 FROM generate_series(1, 10) g").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    let mut main_orders = Vec::new();
    for _ in 0..5 {
        main_orders.push(sell(&main, "main", 2).await);
    }
    for _ in 0..3 {
        sell(&b2, "branch2", 2).await;
    }
    main.batch_execute("UPDATE products SET price = price + 1").await.unwrap();
    main.execute("DELETE FROM order_lines WHERE order_id = $1", &[&main_orders[0]]).await.unwrap();
    main.execute("DELETE FROM orders WHERE id = $1", &[&main_orders[0]]).await.unwrap();
    main.batch_execute("INSERT INTO audit_log (event, payload) SELECT 'bulk', jsonb_build_object('n', g) FROM generate_series(1, 12000) g").await.unwrap();
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(60)).await;

    // One local transaction at branch1, after all of the above committed
    // there: capture reads the WAL in commit order, so once it has logged
    // this one it has decided about every applied transaction before it.
    b1.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    wait_converged(&topo.sites(), POS_TABLES, Duration::from_secs(30)).await;
    let st = wait_status(&topo.branches[0], "branch1's status shows its own transaction logged", Duration::from_secs(10), |s| {
        s["log_newest"].as_u64().unwrap_or(0) > log0 && s["captured_transactions"].as_u64().unwrap_or(0) > captured0
    })
    .await;
    eprintln!("no-recapture: branch1 log {log0} -> {}, captured {captured0} -> {}", st["log_newest"], st["captured_transactions"]);
    assert_eq!(st["log_newest"].as_u64().unwrap(), log0 + 1, "branch1's log must hold only its own transaction: {st}");
    assert_eq!(st["captured_transactions"].as_u64().unwrap(), captured0 + 1, "branch1 captured applied transactions: {st}");
    assert_eq!(st["captured_rows"].as_u64().unwrap(), before["captured_rows"].as_u64().unwrap() + 1, "{st}");

    // The main's side of the same fact: its progress in branch1's stream is
    // branch1's log head, reached with one ChangeSet.
    assert_eq!(progress(&main, "branch1").await, log0 + 1);
    let ms = wait_status(&topo.main, "the main reports branch1's stream", Duration::from_secs(10), |s| s["peers"]["branch1"]["applied_from_peer"].as_u64() == Some(log0 + 1)).await;
    assert_eq!(ms["peers"]["branch1"]["changesets_applied"], 1, "the main applied more from branch1 than its one sale: {}", ms["peers"]["branch1"]);

    // Exact counts everywhere: nothing doubled, nothing conflicted.
    for (name, c) in [("main", &main), ("branch1", &b1), ("branch2", &b2)] {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_lines), (SELECT count(*) FROM audit_log), \
                        (SELECT count(*) FROM products), (SELECT count(*) FROM branchsync.conflicts)",
                &[],
            )
            .await
            .unwrap();
        let counts: (i64, i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        assert_eq!(counts, (4 + 3 + 1, 2 * (4 + 3), 12000, 10, 0), "orders, lines, audit rows, products, conflicts at {name}");
    }
}

/// Issue 13: `[ddl] from` differs between a branch and the main (the main
/// would keep a branch's schema change local while the branch expects it
/// replayed, or the reverse): refused as ConfigMismatch naming both values;
/// nothing applied; accepted once they match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ddl_policy_or_tombstone_days_that_differ_from_the_mains_are_refused_as_a_config_mismatch() {
    let mut topo = Topology::prepare(1, ORDERS).await;
    topo.main.start();
    main_listening(topo.main_port).await;
    let sid = system_id(&topo.branches[0]).await;
    let mut h = hello_for("branch1", 1, sid, 1);
    h.ddl_from = "any".into();
    let r = expect_refusal(dial(topo.main_port, &topo.branches[0].tls_dir(), h).await.0, RefusalReason::ConfigMismatch, "differs from the main's");
    assert!(r.detail.contains("Branch: [ddl] from = \"any\". Main: [ddl] from = \"main\"."), "{r}");
    let mut h = hello_for("branch1", 1, sid, 1);
    h.tombstone_days = 7;
    let r = expect_refusal(dial(topo.main_port, &topo.branches[0].tls_dir(), h).await.0, RefusalReason::ConfigMismatch, "differs from the main's");
    assert!(r.detail.contains("Branch: [conflicts] tombstone_days = 7. Main: [conflicts] tombstone_days = 30."), "{r}");

    // A real branch set to "any" against a main left at "main".
    let branch = &mut topo.branches[0];
    std::fs::write(branch.config_path(), format!("{}\n[ddl]\nfrom = \"any\"\n", std::fs::read_to_string(branch.config_path()).unwrap())).unwrap();
    branch.start();
    branch.db().await.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    let st = wait_status(&topo.branches[0], "branch1 reports the refusal", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("[ddl] from"))
    })
    .await;
    eprintln!("ddl from: branch1 says {}", st["peers"]["main"]["last_error"]);
    let main = topo.main.db().await;
    assert_eq!(progress(&main, "branch1").await, 0, "nothing may be applied from a refused branch");

    let branch = &mut topo.branches[0];
    branch.stop();
    edit_config(branch, "[ddl]\nfrom = \"any\"\n", "");
    branch.start();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
}

/// A main configured for more branches than its PostgreSQL can track
/// replication origins for refuses to start, naming the setting and the
/// value to set. Found by the fan-out benchmark: with PostgreSQL's default
/// `max_replication_slots`, the session of every branch past the limit
/// failed with SQLSTATE 53400 and was retried for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_with_more_branches_than_its_server_tracks_origins_for_refuses_to_start() {
    let mut main = Site::with_cluster("main", 0, PgCluster::start_with(&["max_replication_slots = 4"]));
    let names: Vec<(String, u32)> = (1..=5).map(|i| (format!("branch{i}"), i)).collect();
    let refs: Vec<(&str, u32)> = names.iter().map(|(n, i)| (n.as_str(), *i)).collect();
    main.write_main_config(free_port(), &refs, "");
    main.init();
    main.start();
    let st = main.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| panic!("the main must refuse to start\n{}", main.daemon_log()));
    assert_eq!(st.code(), Some(3), "the status that tells a service manager not to restart it");
    let log = main.daemon_log();
    assert!(log.contains("max_replication_slots is 4 but this node applies the changes of 5 sites"), "{log}");
    assert!(log.contains("max_replication_slots = 5 or more") && log.contains("restart PostgreSQL"), "{log}");
}

/// A preset (issue 16) brings local tables and conflict rules: a branch on
/// another preset (here none) than the main's is refused with a message
/// that names both, before the lists it changes are compared; with the
/// same preset (and `init` run again for the scope it changes) it syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_on_another_preset_than_the_mains_is_refused_naming_both() {
    let mut topo = Topology::prepare(1, ORDERS).await;
    let with_preset = |site: &Site| {
        let mut text = std::fs::read_to_string(site.config_path()).unwrap();
        text.push_str("\n[preset]\nerp = \"tryton\"\n");
        std::fs::write(site.config_path(), text).unwrap();
        site.init();
    };
    with_preset(&topo.main);
    topo.start_all();
    let st = wait_status(&topo.branches[0], "branch1 reports the refusal", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("preset"))
    })
    .await;
    let e = st["peers"]["main"]["last_error"].as_str().unwrap_or_default().to_string();
    eprintln!("preset: branch1 says {e}");
    assert!(e.contains("uses preset none, the main uses preset tryton-2"), "the refusal names both presets: {e}");

    let branch = &mut topo.branches[0];
    branch.stop();
    with_preset(branch);
    branch.start();
    wait_status(&topo.main, "branch1 connected with the same preset", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
}
