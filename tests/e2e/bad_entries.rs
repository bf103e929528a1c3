//! Issue 12, done-when 4: nothing poisons a stream. A client holding a
//! valid branch credential sends crafted entries on the wire: a change
//! whose table index is out of range, a row too narrow for its table, a
//! body that is not an entry at all, a value the table's type refuses, and
//! then a gap in positions. Each bad change or entry is quarantined (the
//! entries after it apply) or, for the gap, the session is refused; nothing
//! after the gap is applied, and the stream goes on from where it was.

use std::time::Duration;

use branchsync_proto::{ChangeSetHeader, LogEntry, Message, RefusalReason, RowChange, TableDef, TableDesc, Value, WireEntry};
use branchsync_tests::*;

const SCHEMA: &str = "CREATE TABLE orders (id int PRIMARY KEY, shop text NOT NULL);";

fn orders_desc() -> TableDesc {
    TableDesc::from(TableDef { schema: "public".into(), name: "orders".into(), columns: vec!["id".into(), "shop".into()], key: vec![true, false], identity_full: true })
}

fn entry(pos: u64, sid: u64, changes: Vec<RowChange>) -> LogEntry {
    let ts = branchsync_engine::clock::now_us();
    LogEntry {
        pos,
        header: ChangeSetHeader { author: "branch1".into(), author_index: 1, system_id: sid, commit_lsn: 0x100_0000 + pos, commit_ts_us: ts, stamp: ts as u64, seen_main_ts: 0 },
        part: 0,
        last: true,
        tables: vec![orders_desc()],
        changes,
        relay_ts_us: 0,
        echo_as_sent: false,
    }
}

fn order(id: &str) -> RowChange {
    RowChange::Insert { table: 0, new: vec![Value::Text(id.into()), Value::Text("branch1".into())] }
}

fn wire(e: &LogEntry) -> WireEntry {
    WireEntry::of(e).unwrap()
}

async fn ids(c: &tokio_postgres::Client) -> Vec<i32> {
    c.query("SELECT id FROM orders ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

async fn progress(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT coalesce((SELECT pos FROM branchsync.progress WHERE stream = 'branch1'), 0)", &[]).await.unwrap().get(0)
}

/// A main, and a crafted branch1 it welcomed (its log reaches far enough
/// for everything it sends): `(topology, branch1's cluster, connection to
/// the main's database, the crafted branch)`.
fn crafted_hello(sid: u64) -> branchsync_proto::Hello {
    branchsync_proto::Hello { log_newest: 100, ..hello_for("branch1", 1, sid, 0xbad) }
}

async fn crafted_branch() -> (Topology, u64, tokio_postgres::Client, FakeBranch) {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.main.start();
    let sid = system_id(&topo.branches[0]).await;
    let port = topo.main_port;
    let tls = topo.branches[0].tls_dir();
    let main = topo.main.db().await;
    let fake = eventually("the main welcomes the crafted branch", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, crafted_hello(sid)).await.ok() }).await;
    (topo, sid, main, fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_entries_are_quarantined_or_refused_and_the_stream_goes_on() {
    let (topo, sid, main, mut fake) = crafted_branch().await;

    let mut bad_index = entry(2, sid, vec![order("2"), RowChange::Insert { table: 7, new: vec![Value::Text("20".into())] }]);
    bad_index.changes.swap(0, 1);
    let narrow = entry(3, sid, vec![RowChange::Insert { table: 0, new: vec![Value::Text("30".into())] }, order("3")]);
    let garbage = WireEntry { pos: 4, part: 0, last: true, body: vec![1, 0xc1, 0xff, 0x13] };
    let bad_value = entry(5, sid, vec![order("not a number"), order("5")]);
    fake.send(Message::Entries(vec![wire(&entry(1, sid, vec![order("1")])), wire(&bad_index), wire(&narrow), garbage, wire(&bad_value)])).await;
    fake.send(Message::Entries(vec![wire(&entry(6, sid, vec![order("6")]))])).await;
    eventually("the entries after the bad ones apply", Duration::from_secs(30), || async { (progress(&main).await == 6).then_some(()) }).await;
    assert_eq!(ids(&main).await, vec![1, 2, 3, 5, 6], "every good change applied, no bad one");
    let q: Vec<(String, String)> = main
        .query("SELECT tbl, detail FROM branchsync.conflicts WHERE kind = 'quarantined' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    println!("quarantined: {q:#?}");
    assert_eq!(q.len(), 4, "one record per bad change or entry: {q:#?}");
    assert!(q[0].1.contains("out of range"), "{q:?}");
    assert!(q[1].1.contains("1 values for 2 columns"), "{q:?}");
    assert!(q[2].0 == "(undecodable entry)" && q[2].1.contains("entry 4"), "{q:?}");
    assert!(q[3].0 == "public.orders" && q[3].1.contains("22P02"), "the refused value is named by its SQLSTATE: {q:?}");
    let raw: Vec<u8> = main.query_one("SELECT entry FROM branchsync.conflicts WHERE tbl = '(undecodable entry)'", &[]).await.unwrap().get(0);
    assert_eq!(raw, vec![1, 0xc1, 0xff, 0x13], "the undecodable entry is kept as it came");
    let st = wait_status(&topo.main, "status counts the quarantined changes", Duration::from_secs(10), |s| s["quarantined_total"].as_i64() == Some(4)).await;
    assert_eq!(st["peers"]["branch1"]["quarantined"], 4, "{}", st["peers"]["branch1"]);

    // A gap: position 8 after 6. Refused; nothing after the gap applies.
    fake.send(Message::Entries(vec![wire(&entry(8, sid, vec![order("8")]))])).await;
    let r = fake.refusal(Duration::from_secs(15)).await.expect("the main refuses a gap in positions");
    assert_eq!(r.reason, RefusalReason::ProtocolViolation, "{r}");
    assert!(r.message.contains("skipped from position 7 to 8"), "{r}");
    topo.main.wait_log("skipped from position 7 to 8", Duration::from_secs(10)).await;
    assert_eq!(progress(&main).await, 6);
    assert!(!ids(&main).await.contains(&8));

    // The stream goes on from where it was.
    let port = topo.main_port;
    let tls = topo.branches[0].tls_dir();
    let mut fake = eventually("the main welcomes the branch again", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, crafted_hello(sid)).await.ok() }).await;
    fake.send(Message::Entries(vec![wire(&entry(7, sid, vec![order("7")])), wire(&entry(8, sid, vec![order("8")]))])).await;
    eventually("positions 7 and 8 apply", Duration::from_secs(30), || async { (progress(&main).await == 8).then_some(()) }).await;
    assert_eq!(ids(&main).await, vec![1, 2, 3, 5, 6, 7, 8]);
}

/// A chunk that claims an entry larger than anything may be is refused
/// before anything is buffered; so is an entry whose chunks do not follow
/// each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_chunks_end_the_session_and_change_nothing() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.main.start();
    let sid = system_id(&topo.branches[0]).await;
    let port = topo.main_port;
    let tls = topo.branches[0].tls_dir();
    let mut fake = eventually("welcomed", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, hello_for("branch1", 1, sid, 0xbad)).await.ok() }).await;
    fake.send(Message::Chunk(branchsync_proto::EntryChunk { pos: 1, part: 0, last: true, total: 4 << 30, offset: 0, data: vec![0; 16] })).await;
    let _ = fake.refusal(Duration::from_secs(15)).await;
    topo.main.wait_log("larger than any entry may be", Duration::from_secs(10)).await;
    let mut fake = eventually("welcomed again", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, hello_for("branch1", 1, sid, 0xbad)).await.ok() }).await;
    fake.send(Message::Chunk(branchsync_proto::EntryChunk { pos: 1, part: 0, last: true, total: 100, offset: 0, data: vec![0; 10] })).await;
    fake.send(Message::Chunk(branchsync_proto::EntryChunk { pos: 1, part: 0, last: true, total: 100, offset: 50, data: vec![0; 10] })).await;
    let _ = fake.refusal(Duration::from_secs(15)).await;
    topo.main.wait_log("does not continue the entry", Duration::from_secs(10)).await;
    assert_eq!(progress(&topo.main.db().await).await, 0);
}

/// Issue 13, done-when 4: a shop's credential cannot speak as the main or
/// as another shop. An entry whose header names another author, another
/// index or another cluster than the handshake authenticated ends the
/// session as a security event (told to the peer, counted in `status` and
/// `/metrics`); nothing of it is applied, and an honest session afterwards
/// applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_cannot_send_entries_in_another_nodes_name() {
    let (topo, sid, main, fake) = crafted_branch().await;
    drop(fake);
    let (port, tls) = (topo.main_port, topo.branches[0].tls_dir());

    let mut as_main = entry(1, sid, vec![order("1")]);
    as_main.header.author = "main".into();
    as_main.header.author_index = 0;
    let mut index_zero = entry(1, sid, vec![order("2")]);
    index_zero.header.author_index = 0;
    let other_cluster = entry(1, sid + 1, vec![order("3")]);
    for (n, forged) in [as_main, index_zero, other_cluster].iter().enumerate() {
        let mut fake = eventually("welcomed", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, crafted_hello(sid)).await.ok() }).await;
        fake.send(Message::Entries(vec![wire(forged)])).await;
        let Some(r) = fake.refusal(Duration::from_secs(15)).await else { panic!("the main must say why it ends the session:\n{}", topo.main.daemon_log()) };
        assert_eq!(r.reason, RefusalReason::ProtocolViolation, "{r}");
        assert!(r.to_string().contains("another node's name"), "{r}");
        wait_status(&topo.main, "the security event is counted", Duration::from_secs(10), |s| s["peers"]["branch1"]["security_events"].as_u64() == Some(n as u64 + 1)).await;
    }
    assert!(ids(&main).await.is_empty(), "nothing applied in another node's name");
    assert_eq!(progress(&main).await, 0);
    topo.main.wait_log("security event", Duration::from_secs(5)).await;
    let metrics = branchsync_server::http::get(&format!("127.0.0.1:{}", topo.main.http_port), "/metrics").await.unwrap();
    assert!(metrics.contains("branchsync_peer_security_events_total{peer=\"branch1\"} 3"), "{metrics}");

    // The honest stream goes on.
    let mut fake = eventually("welcomed", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, crafted_hello(sid)).await.ok() }).await;
    fake.send(Message::Entries(vec![wire(&entry(1, sid, vec![order("4")]))])).await;
    eventually("the honest entry applies", Duration::from_secs(30), || async { (progress(&main).await == 1).then_some(()) }).await;
    assert_eq!(ids(&main).await, vec![4]);
}

/// Issue 13, done-when 7: a client with branch1's valid credentials sends
/// changes stamped a year ahead. The main clamps each to its arrival time
/// and records it; the row's later change at branch2 (made offline after
/// the forged update arrived) wins the conflict at every site, as it would
/// against an honest clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stamp_a_year_ahead_is_clamped_on_arrival_and_loses_to_a_later_change() {
    let mut topo = Topology::prepare(2, SCHEMA).await;
    topo.main.start();
    topo.branches[1].start();
    let sid = system_id(&topo.branches[0]).await;
    let port = topo.main_port;
    let tls = topo.branches[0].tls_dir();
    let mut fake = eventually("welcomed", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, crafted_hello(sid)).await.ok() }).await;
    let year_ahead = |mut e: LogEntry| {
        e.header.stamp += 365 * 86_400 * 1_000_000;
        e
    };
    fake.send(Message::Entries(vec![wire(&year_ahead(entry(1, sid, vec![order("1")])))])).await;
    let b2 = topo.branches[1].db().await;
    eventually("the forged insert reaches branch2", Duration::from_secs(30), || async { ids(&b2).await.contains(&1).then_some(()) }).await;
    topo.proxies[1].cut();
    let row = |shop: &str| vec![Value::Text("1".into()), Value::Text(shop.into())];
    let update = RowChange::Update { table: 0, old: Some(branchsync_proto::OldRow { full: true, values: row("branch1") }), new: row("forged") };
    fake.send(Message::Entries(vec![wire(&year_ahead(entry(2, sid, vec![update])))])).await;
    let main = topo.main.db().await;
    eventually("the forged update applies at the main", Duration::from_secs(30), || async {
        let shop: String = main.query_one("SELECT shop FROM orders WHERE id = 1", &[]).await.ok()?.get(0);
        (shop == "forged").then_some(())
    })
    .await;
    // Later, at branch2 (offline): the same row.
    tokio::time::sleep(Duration::from_millis(20)).await;
    b2.execute("UPDATE orders SET shop = 'branch2-later' WHERE id = 1", &[]).await.unwrap();
    topo.proxies[1].heal();
    wait_converged(&[&topo.main, &topo.branches[1]], &["orders"], Duration::from_secs(60)).await;
    let shop: String = main.query_one("SELECT shop FROM orders WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(shop, "branch2-later", "the later change must win over a stamp a year ahead");
    let clamped: i64 = main.query_one("SELECT count(*) FROM branchsync.conflicts WHERE kind = 'stamp_clamped'", &[]).await.unwrap().get(0);
    assert_eq!(clamped, 2, "each clamped ChangeSet is recorded once");
    // No stamp the main holds is far ahead of its clock.
    let ahead: i64 = main
        .query_one(
            "WITH lim AS (SELECT (extract(epoch FROM clock_timestamp()) * 1e6)::bigint + 300000000 AS l) \
             SELECT (SELECT count(*) FROM branchsync.row_version, lim WHERE stamp > l) \
                  + (SELECT count(*) FROM branchsync.insert_versions, unnest(stamps) s, lim WHERE s > l)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ahead, 0, "a row version at the main kept a far-future stamp");
}

/// Issue 13: a change's `seen_main_ts` counts only up to what the main has
/// relayed to its author. A crafted branch (never reading, so the relay to
/// it stalls at its window) claims to have seen the main's later edit of a
/// row: the main records the conflict instead of taking the change as
/// informed of that edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_claiming_more_of_the_relay_than_was_sent_is_not_taken_as_informed() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.main.start();
    let sid = system_id(&topo.branches[0]).await;
    let (port, tls) = (topo.main_port, topo.branches[0].tls_dir());
    let hello = branchsync_proto::Hello { window: 1 << 20, ..crafted_hello(sid) };
    let mut fake = eventually("welcomed", Duration::from_secs(30), || async { FakeBranch::connect(port, &tls, hello.clone()).await.ok() }).await;
    fake.send(Message::Entries(vec![wire(&entry(1, sid, vec![order("1")]))])).await;
    let main = topo.main.db().await;
    eventually("order 1 reaches the main", Duration::from_secs(30), || async { ids(&main).await.contains(&1).then_some(()) }).await;
    // More than the window: the relay to the crafted branch stalls before
    // the main's edit of order 1.
    main.batch_execute("INSERT INTO orders SELECT g, repeat(md5(g::text), 300) FROM generate_series(1000, 1400) g").await.unwrap();
    main.batch_execute("UPDATE orders SET shop = 'main-edit' WHERE id = 1").await.unwrap();
    let row = |shop: &str| vec![Value::Text("1".into()), Value::Text(shop.into())];
    let update = RowChange::Update { table: 0, old: Some(branchsync_proto::OldRow { full: true, values: row("branch1") }), new: row("forged") };
    let mut claim = entry(2, sid, vec![update]);
    claim.header.seen_main_ts = branchsync_engine::clock::now_us() + 60_000_000;
    fake.send(Message::Entries(vec![wire(&claim)])).await;
    eventually("the main records the uninformed update as a conflict", Duration::from_secs(30), || async {
        let n: i64 = main.query_one("SELECT count(*) FROM branchsync.conflicts WHERE kind = 'update_update'", &[]).await.ok()?.get(0);
        (n >= 1).then_some(())
    })
    .await;
    assert!(topo.main.daemon_log().contains("claims to have seen more of the main's relay than was sent"), "the cap is logged");
}
