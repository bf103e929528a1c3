//! Done-when 7: bad input gets a clear message and changes nothing —
//! misconfigured PostgreSQL, bad config, and at the link: wrong token,
//! unknown node, index already in use, protocol version mismatch, malformed
//! and oversized frames. The main keeps serving the good branch throughout.

use std::time::Duration;

use branchsync_proto::{FrameCodec, Hello, Message, RefusalReason};
use branchsync_tests::*;

use crate::handshake::expect_refusal;
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Framed;

fn init_fails_with(extra_conf: &str, must_mention: &[&str]) {
    let site = Site::with_cluster("main", 0, PgCluster::start_with(&[extra_conf]));
    site.write_main_config(free_port(), &[], "");
    let out = site.cli(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "init must fail with {extra_conf}");
    for m in must_mention {
        assert!(err.contains(m), "init error for {extra_conf} must mention {m:?}:\n{err}");
    }
}

#[test]
fn init_names_the_setting_and_the_fix_when_wal_level_is_not_logical() {
    init_fails_with("wal_level = replica", &["wal_level", "logical", "restart"]);
}

#[test]
fn init_names_the_setting_and_the_fix_when_commit_timestamps_are_off() {
    init_fails_with("track_commit_timestamp = off", &["track_commit_timestamp", "on"]);
}

#[test]
fn a_bad_config_names_the_key_and_the_file() {
    let site = Site::new("branch1", 1);
    site.write_branch_config(free_port(), "\n[surprise]\nkey = 1\n");
    let out = site.cli(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("surprise"), "{err}");
    assert!(err.contains(&site.config_path().display().to_string()), "{err}");

    std::fs::write(site.config_path(), std::fs::read_to_string(site.config_path()).unwrap().replace("[surprise]\nkey = 1\n", "").replace("index = 1", "index = 100")).unwrap();
    let out = site.cli(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("node.index"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_whose_scope_changed_since_init_refuses_to_start_and_says_to_run_init() {
    let mut site = Site::new("branch1", 1);
    site.write_branch_config(free_port(), "");
    site.self_issue_credentials();
    site.init();
    let cfg = std::fs::read_to_string(site.config_path()).unwrap();
    std::fs::write(site.config_path(), cfg.replace("exclude = [\"local_*\"]", "exclude = [\"local_*\", \"ir_*\"]")).unwrap();
    site.start();
    let status = site.wait_exit(Duration::from_secs(30)).expect("the daemon exits");
    assert_eq!(status.code(), Some(3), "the operator must act: a service manager must not restart it");
    let log = site.daemon_log();
    assert!(log.contains("changed since branchsync init") && log.contains("Run branchsync init"), "{log}");
    site.init();
    site.start();
    wait_status(&site, "the daemon runs after init", Duration::from_secs(30), |s| s["node"] == "branch1").await;
}

fn hello(node: &str, index: u32, token: &str) -> Hello {
    Hello { token: token.into(), now_us: 0, ..hello_for(node, index, 1, 1) }
}

async fn handshake(port: u16, tls: &std::path::Path, h: Hello) -> Message {
    let sock = dial_link(port, tls).await.unwrap();
    let mut f = Framed::new(sock, FrameCodec::default());
    f.send(Message::Hello(h)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), f.next()).await.expect("an answer").expect("a frame").expect("decodable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_refuses_bad_peers_and_keeps_serving_good_ones() {
    let mut topo = Topology::prepare(1, "CREATE TABLE orders (id serial PRIMARY KEY, shop text);").await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    let port = topo.main_port;
    // A peer holding branch1's credentials (TLS passes) that misbehaves
    // above it.
    let tls = &topo.branches[0].tls_dir();

    expect_refusal(handshake(port, tls, hello("branch1", 1, "wrong")).await, RefusalReason::BadToken, "authentication failed");
    // The same answer on the wire for every authentication failure; the
    // main's log says which.
    expect_refusal(handshake(port, tls, hello("branch9", 9, TOKEN)).await, RefusalReason::BadToken, "authentication failed");
    expect_refusal(handshake(port, tls, hello("branch1", 1, TOKEN)).await, RefusalReason::IndexInUse, "already in use");
    let mut old = hello("branch1", 1, TOKEN);
    old.protocol_version = 99;
    expect_refusal(handshake(port, tls, old).await, RefusalReason::VersionMismatch, "protocol version mismatch");
    let mut other_stride = hello("branch1", 1, TOKEN);
    other_stride.stride = 10;
    expect_refusal(handshake(port, tls, other_stride).await, RefusalReason::ConfigMismatch, "differs");

    // Malformed frame: a refusal, then the connection closes.
    let mut sock = dial_link(port, tls).await.unwrap();
    sock.write_all(&[0, 0, 0, 4, 0xc1, 0xc1, 0xc1, 0xc1]).await.unwrap();
    let mut f = Framed::new(sock, FrameCodec::default());
    match tokio::time::timeout(Duration::from_secs(10), f.next()).await.unwrap() {
        Some(Ok(Message::Refuse(r))) => assert!(r.message.contains("malformed"), "{r}"),
        other => panic!("expected a refusal of the malformed frame, got {other:?}"),
    }
    // Oversized frame: refused before it is read.
    let mut sock = dial_link(port, tls).await.unwrap();
    sock.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let mut f = Framed::new(sock, FrameCodec::default());
    match tokio::time::timeout(Duration::from_secs(10), f.next()).await.unwrap() {
        Some(Ok(Message::Refuse(r))) => assert!(r.message.contains("exceeds the limit"), "{r}"),
        other => panic!("expected a refusal of the oversized frame, got {other:?}"),
    }

    // Every refusal is in the main's log with its reason.
    for needle in ["authentication failed", "unknown node", "already in use", "protocol version mismatch", "malformed", "exceeds the limit"] {
        eventually(&format!("the main's log says {needle:?}"), Duration::from_secs(10), || async {
            topo.main.daemon_log().contains(needle).then_some(())
        })
        .await;
    }
    // Nothing was applied from the bad peers, and the good branch still syncs.
    let b = topo.branches[0].db().await;
    b.batch_execute("INSERT INTO orders (shop) VALUES ('branch1')").await.unwrap();
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(30)).await;
    let main = topo.main.db().await;
    let streams: Vec<String> = main.query("SELECT stream FROM branchsync.progress ORDER BY 1", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(streams, vec!["branch1".to_string()]);
}
