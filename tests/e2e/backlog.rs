//! Issue 12, done-when 3: the link never deadlocks.
//!
//! * A branch offline for 100,000 one-sale transactions reconnects while
//!   the main and another branch keep selling: its backlog goes up while
//!   the main's relay (with the echoes of that very backlog) comes down,
//!   both at once, and everything arrives, exactly once. (Before the link
//!   had flow control, both daemons stopped reading their sockets after
//!   46,198 sales and stayed so.) The 1,000,000-sale day is the benchmark
//!   `cargo bench -p branchsync-tests --bench offline_day`.
//! * A peer that stops reading its socket for a minute, then resumes: no
//!   deadlock, no reconnect, nothing lost.
//! * A peer that goes silent for good is disconnected within the peer
//!   timeout although writes to it are stuck.

use std::time::{Duration, Instant};

use branchsync_scenario::local::Direction;
use branchsync_tests::*;

fn schema() -> String {
    format!("{POS_SCHEMA}\n{SELL_MANY}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_offline_for_100k_sales_catches_up_both_ways_while_the_others_keep_selling() {
    offline_day(100_000).await;
}

/// branch1 and the main each build a backlog for the other while the link
/// is cut; once healed, the main's socket towards branch1 is not read for a
/// minute (the relay stops carrying that direction): the main's writes
/// block, branch1 hears nothing. With a peer timeout longer than that, the
/// session must survive, and once reading resumes everything flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_for_a_minute_causes_no_deadlock() {
    const STALL: Duration = Duration::from_secs(60);
    let mut topo = Topology::prepare(1, &schema()).await;
    for s in topo.sites() {
        edit_config(s, "peer_timeout_ms = 3000", "peer_timeout_ms = 120000");
    }
    topo.start_all();
    stock_the_shelves(&topo).await;
    topo.proxies[0].cut();
    let (main, b1) = (topo.main.db().await, topo.branches[0].db().await);
    b1.batch_execute("CALL sell_many(20000, 'branch1')").await.unwrap();
    main.batch_execute("CALL sell_many(20000, 'main')").await.unwrap();
    // Large rows: more than the window and the socket buffers hold.
    main.batch_execute("INSERT INTO audit_log (event, payload) SELECT 'big', jsonb_build_object('blob', repeat(md5(g::text), 3000)) FROM generate_series(1, 600) g").await.unwrap();
    topo.proxies[0].heal();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    wait_status(&topo.branches[0], "the main connected", Duration::from_secs(30), |s| s["peers"]["main"]["connected"] == true).await;
    topo.proxies[0].stall(Direction::ToBranch, true);
    let stalled_at = Instant::now();
    let mut sessions = Vec::new();
    for (site, peer) in [(&topo.main, "branch1"), (&topo.branches[0], "main")] {
        sessions.push(http_status(site.http_port).await.unwrap()["peers"][peer]["sessions"].as_u64().unwrap());
    }
    // While branch1 reads nothing, the main still reads branch1.
    let mut last_contact = 0;
    while stalled_at.elapsed() < STALL {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let st = http_status(topo.main.http_port).await.expect("the main answers its status while its writes are stuck");
        let c = st["peers"]["branch1"]["last_contact_unix_ms"].as_i64().unwrap_or(0);
        assert!(c > last_contact, "the main must keep hearing branch1 while its own writes are stuck: {}", st["peers"]["branch1"]);
        assert_eq!(st["peers"]["branch1"]["connected"], true, "{}", st["peers"]["branch1"]);
        last_contact = c;
    }
    let relayed: i64 = b1.query_one("SELECT coalesce((SELECT pos FROM branchsync.progress WHERE stream = 'main'), 0)", &[]).await.unwrap().get(0);
    let main_log = http_status(topo.main.http_port).await.unwrap()["log_newest"].as_i64().unwrap_or(0);
    assert!(relayed < main_log, "the main still had entries to write while branch1 read nothing: relay applied {relayed}, the main's log at {main_log}");
    let mid = sales_of(&main, "branch1").await.0;
    println!("after {STALL:?} of the main's writes stuck: {mid} of branch1's 20000 sales at the main");
    topo.proxies[0].stall(Direction::ToBranch, false);
    wait_converged(&topo.sites(), &["orders", "order_lines", "audit_log"], Duration::from_secs(300)).await;
    println!("converged {:.1} s after reading resumed", stalled_at.elapsed().as_secs_f64() - STALL.as_secs_f64());
    for s in topo.sites() {
        let c = s.db().await;
        assert_eq!(sales_of(&c, "branch1").await, (20000, 80000), "at {}", s.name);
        assert_eq!(sales_of(&c, "main").await, (20000, 80000), "at {}", s.name);
    }
    for ((site, peer), before) in [(&topo.main, "branch1"), (&topo.branches[0], "main")].into_iter().zip(sessions) {
        let st = http_status(site.http_port).await.unwrap();
        assert_eq!(st["peers"][peer]["sessions"].as_u64(), Some(before), "{} reconnected: the session did not survive the stall: {}", site.name, st["peers"][peer]);
    }
}

/// The link goes silent for good in both directions, connections left
/// open, while the main has a relay backlog for branch1 (its writes get
/// stuck): the main must end the session within the peer timeout, judged on
/// what it receives, and sync again once the link is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_silent_for_good_is_disconnected_within_the_timeout_while_writes_to_it_are_stuck() {
    const PEER_TIMEOUT: Duration = Duration::from_secs(3);
    let mut topo = Topology::prepare(1, &schema()).await;
    topo.start_all();
    stock_the_shelves(&topo).await;
    topo.proxies[0].cut();
    let main = topo.main.db().await;
    main.batch_execute("INSERT INTO audit_log (event, payload) SELECT 'big', jsonb_build_object('blob', repeat(md5(g::text), 3000)) FROM generate_series(1, 400) g").await.unwrap();
    main.batch_execute("CALL sell_many(5000, 'main')").await.unwrap();
    topo.proxies[0].heal();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    // Let the relay get going, then nothing crosses any more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    topo.proxies[0].stall(Direction::ToBranch, true);
    topo.proxies[0].stall(Direction::ToMain, true);
    let silent_since = Instant::now();
    wait_status(&topo.main, "the main ends the silent session", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == false).await;
    let took = silent_since.elapsed();
    println!("the main ended the silent session {:.1} s after the link went silent (peer timeout {PEER_TIMEOUT:?})", took.as_secs_f64());
    assert!(took <= PEER_TIMEOUT + Duration::from_secs(2), "took {took:?}");
    let st = http_status(topo.main.http_port).await.unwrap();
    assert!(st["peers"]["branch1"]["last_error"].as_str().unwrap_or("").contains("silent"), "{}", st["peers"]["branch1"]);
    // The link comes back: everything arrives.
    topo.proxies[0].stall(Direction::ToBranch, false);
    topo.proxies[0].stall(Direction::ToMain, false);
    topo.proxies[0].cut();
    topo.proxies[0].heal();
    wait_converged(&topo.sites(), &["orders", "order_lines", "audit_log"], Duration::from_secs(120)).await;
    assert_eq!(sales_of(&topo.branches[0].db().await, "main").await, (5000, 20000));
}
