//! Issue 13, done-when 1–3: the link is TLS by default, a branch talks
//! only to the main of its chain, and certificates are revoked, expire and
//! are renewed the way an operator expects.
//!
//! * A recording proxy between branch and main: every byte it saw, both
//!   ways, parses as TLS records, and neither the token, nor a row value,
//!   nor a table name appears in them. A branch refuses a main that answers
//!   in plaintext (no downgrade).
//! * Two impostors pose as the main: one with a certificate of another CA,
//!   one holding a valid *branch* certificate of the same CA. The branch
//!   refuses both with a message that says what happened; neither gets a
//!   byte of application data, and the sale made meanwhile reaches the real
//!   main afterwards (nothing was reclaimed).
//! * An expired branch certificate and a revoked one are refused with
//!   messages that say so; certificates renewed while the shop is connected
//!   (the shop's and the main's) take effect at the next session, and no
//!   sale is lost.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use branchsync_server::tls;
use branchsync_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SCHEMA: &str = "CREATE TABLE ledger_zq81 (id serial PRIMARY KEY, shop text NOT NULL, note text NOT NULL);";
/// A row value that must never cross the network in clear.
const SECRET_VALUE: &str = "note-secret-77aa41";

async fn sell(site: &Site, n: usize) {
    let c = site.db().await;
    for _ in 0..n {
        c.execute("INSERT INTO ledger_zq81 (shop, note) VALUES ($1, $2)", &[&site.name, &SECRET_VALUE]).await.unwrap();
    }
}

async fn count_at(site: &Site, shop: &str) -> i64 {
    site.db().await.query_one("SELECT count(*) FROM ledger_zq81 WHERE shop = $1", &[&shop]).await.unwrap().get(0)
}

/// Bytes seen on each connection, (branch → main, main → branch).
type Recording = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>)>>>;

/// A TCP proxy to `target` that keeps every byte it carries.
async fn recording_proxy(target: u16) -> (u16, Recording) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let rec: Recording = Arc::default();
    let r = rec.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { continue };
            let slot = {
                let mut g = r.lock().unwrap();
                g.push((Vec::new(), Vec::new()));
                g.len() - 1
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let (r1, r2) = (r.clone(), r.clone());
            tokio::spawn(pump(cr, sw, move |b| r1.lock().unwrap()[slot].0.extend_from_slice(b)));
            tokio::spawn(pump(sr, cw, move |b| r2.lock().unwrap()[slot].1.extend_from_slice(b)));
        }
    });
    (port, rec)
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, keep: impl Fn(&[u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                keep(&buf[..n]);
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Walks `bytes` as a sequence of TLS records; returns how many there were.
/// A record cut short at the end (the connection closed mid-record) is
/// allowed; anything else that is not a record fails the test.
fn tls_records(bytes: &[u8], what: &str) -> usize {
    let (mut i, mut n) = (0, 0);
    while i + 5 <= bytes.len() {
        let (typ, ver, len) = (bytes[i], u16::from_be_bytes([bytes[i + 1], bytes[i + 2]]), u16::from_be_bytes([bytes[i + 3], bytes[i + 4]]) as usize);
        assert!((20..=23).contains(&typ), "{what}: byte {i} starts no TLS record (content type {typ})");
        assert!(ver == 0x0301 || ver == 0x0303, "{what}: byte {i}: record version {ver:#06x}");
        assert!(len <= 16_384 + 256, "{what}: byte {i}: record of {len} bytes");
        i += 5 + len;
        n += 1;
    }
    assert!(i >= bytes.len() || bytes.len() - i < 5, "{what}: trailing bytes after the last record");
    n
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_session_is_tls_records_with_no_token_row_or_table_name_in_clear() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    let (port, rec) = recording_proxy(topo.main_port).await;
    edit_config(&topo.branches[0], &format!("main = \"127.0.0.1:{}\"", topo.proxies[0].port), &format!("main = \"127.0.0.1:{port}\""));
    topo.start_all();
    // Both directions carry rows: the branch's sales up, the main's down.
    sell(&topo.branches[0], 20).await;
    sell(&topo.main, 20).await;
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;
    assert_eq!(count_at(&topo.main, "branch1").await, 20);
    topo.branches[0].stop();
    topo.main.stop();

    let sessions = rec.lock().unwrap().clone();
    assert!(!sessions.is_empty(), "the proxy carried no session");
    let (mut up, mut down) = (0, 0);
    for (i, (to_main, to_branch)) in sessions.iter().enumerate() {
        up += to_main.len();
        down += to_branch.len();
        let records = tls_records(to_main, &format!("session {i}, branch to main")) + tls_records(to_branch, &format!("session {i}, main to branch"));
        eprintln!("session {i}: {} bytes up, {} bytes down, {records} TLS records", to_main.len(), to_branch.len());
        for (needle, what) in [(TOKEN, "the token"), (SECRET_VALUE, "a row value"), ("ledger_zq81", "a table name"), ("branch1", "a node name")] {
            assert!(!contains(to_main, needle) && !contains(to_branch, needle), "session {i}: {what} crossed the network in clear");
        }
    }
    assert!(up > 2_000 && down > 2_000, "the recording must hold the sales both ways ({up} bytes up, {down} down)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_refuses_a_main_that_answers_in_plaintext() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    edit_config(&topo.main, "[sync]\n", "[sync]\ninsecure = true\n");
    topo.start_all();
    sell(&topo.branches[0], 3).await;
    let st = wait_status(&topo.branches[0], "branch1 says the main answered in plaintext", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("did not answer with TLS"))
    })
    .await;
    eprintln!("branch1 says: {}", st["peers"]["main"]["last_error"]);
    assert_eq!(st["peers"]["main"]["connected"], false);
    assert!(topo.main.daemon_log().contains("NOT encrypted"), "the main must say loudly that it runs in plaintext");
    assert_eq!(count_at(&topo.main, "branch1").await, 0, "nothing may cross a link that fell back to plaintext");
}

/// A TLS server holding `cert`/`key` (no client authentication), posing as
/// the main; counts completed handshakes and bytes of application data.
async fn impostor(cert: &Path, key: &Path) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_file(cert).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (handshakes, data) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (h, d) = (handshakes.clone(), data.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (acceptor, h, d) = (acceptor.clone(), h.clone(), d.clone());
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(sock).await {
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        d.fetch_add(n, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (port, handshakes, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_refuses_impostors_of_the_main_and_keeps_its_sales_for_the_real_one() {
    let mut topo = Topology::prepare(2, SCHEMA).await;
    topo.main.start();
    let proxy = format!("main = \"127.0.0.1:{}\"", topo.proxies[0].port);
    // Another chain's main (its own CA), and branch2 of this chain with its
    // valid certificate.
    let other = tempfile::tempdir().unwrap();
    tls::create_ca(other.path(), "another chain").unwrap();
    let b2 = topo.branches[1].tls_dir();
    let impostors = [
        ("another CA", other.path().join(tls::CERT), other.path().join(tls::KEY), "not signed by this chain's CA"),
        ("a branch certificate of this CA", b2.join(tls::CERT), b2.join(tls::KEY), "posing as the main"),
    ];
    sell(&topo.branches[0], 5).await;
    let mut current = proxy.clone();
    for (what, cert, key, says) in impostors {
        let (port, handshakes, data) = impostor(&cert, &key).await;
        let next = format!("main = \"127.0.0.1:{port}\"");
        edit_config(&topo.branches[0], &current, &next);
        current = next;
        topo.branches[0].start();
        let st = wait_status(&topo.branches[0], &format!("branch1 refuses {what}"), Duration::from_secs(30), |s| {
            s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains(says))
        })
        .await;
        eprintln!("impostor with {what}: branch1 says {}", st["peers"]["main"]["last_error"]);
        assert_eq!(st["peers"]["main"]["connected"], false);
        assert!(topo.branches[0].daemon_log().contains(says), "the refusal must be in the branch's log");
        topo.branches[0].stop();
        assert_eq!(handshakes.load(Ordering::SeqCst), 0, "{what}: the branch completed a handshake with an impostor");
        assert_eq!(data.load(Ordering::SeqCst), 0, "{what}: the branch sent application data to an impostor");
    }
    // Nothing was sent, acknowledged or reclaimed: the real main gets it all.
    edit_config(&topo.branches[0], &current, &proxy);
    topo.branches[0].start();
    topo.branches[1].start();
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;
    assert_eq!(count_at(&topo.main, "branch1").await, 5);
}

async fn certificate_seen(site: &Site, peer: &str, what: &str) -> String {
    let st = wait_status(site, what, Duration::from_secs(30), |s| s["peers"][peer]["connected"] == true && s["peers"][peer]["certificate"].is_string()).await;
    st["peers"][peer]["certificate"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_certificates_are_refused_and_renewals_take_effect_while_selling() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    // An expired certificate for branch1 (valid until yesterday).
    tls::issue_branch(&topo.main.tls_dir(), "branch1", &topo.branches[0].tls_dir(), -1).unwrap();
    topo.start_all();
    sell(&topo.branches[0], 5).await;
    let st = wait_status(&topo.branches[0], "branch1 is told its certificate expired", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("expired"))
    })
    .await;
    eprintln!("expired: branch1 says {}", st["peers"]["main"]["last_error"]);
    topo.main.wait_log("certificate expired", Duration::from_secs(10)).await;
    assert_eq!(count_at(&topo.main, "branch1").await, 0);

    // Renewed while the daemon runs: the next session uses it.
    topo.branches[0].issue_credentials(&topo.main);
    let first = certificate_seen(&topo.main, "branch1", "branch1 connects with its renewed certificate").await;
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;

    // Revoked at the main: refused with a message that says so.
    topo.main.stop();
    std::fs::write(topo.main.config_path(), std::fs::read_to_string(topo.main.config_path()).unwrap() + &format!("\n[tls]\nrevoked = [\"{first}\"]\n")).unwrap();
    topo.main.start();
    sell(&topo.branches[0], 5).await;
    let st = wait_status(&topo.branches[0], "branch1 is told its certificate is revoked", Duration::from_secs(30), |s| {
        s["peers"]["main"]["last_error"].as_str().is_some_and(|e| e.contains("revoked"))
    })
    .await;
    eprintln!("revoked: branch1 says {}", st["peers"]["main"]["last_error"]);
    assert_eq!(count_at(&topo.main, "branch1").await, 5, "a revoked branch's sales must not be applied");

    // A new certificate for the shop: accepted, the held sales arrive.
    topo.branches[0].issue_credentials(&topo.main);
    let second = certificate_seen(&topo.main, "branch1", "branch1 connects with a new certificate").await;
    assert_ne!(first, second);
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;

    // Renewals while connected and selling: the shop's and the main's. The
    // running session goes on; the next one (the link drops) uses the new
    // certificates; every sale arrives once.
    let seller = {
        let url = topo.branches[0].pg.url();
        tokio::spawn(async move {
            let c = connect(&url).await;
            for _ in 0..300 {
                c.execute("INSERT INTO ledger_zq81 (shop, note) VALUES ('branch1', 'renewal')", &[]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let main_before = certificate_seen(&topo.branches[0], "main", "branch1 sees the main's certificate").await;
    topo.branches[0].issue_credentials(&topo.main);
    let out = topo.main.cli(&["tls", "renew"]);
    assert!(out.status.success(), "tls renew: {}", String::from_utf8_lossy(&out.stderr));
    topo.proxies[0].cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    topo.proxies[0].heal();
    seller.await.unwrap();
    let third = eventually("the main sees branch1's renewed certificate", Duration::from_secs(30), || async {
        let s = http_status(topo.main.http_port).await?;
        let fp = s["peers"]["branch1"]["certificate"].as_str()?.to_string();
        (s["peers"]["branch1"]["connected"] == true && fp != second).then_some(fp)
    })
    .await;
    let main_after = eventually("branch1's new session uses the main's renewed certificate", Duration::from_secs(30), || async {
        let s = http_status(topo.branches[0].http_port).await?;
        let fp = s["peers"]["main"]["certificate"].as_str()?.to_string();
        (s["peers"]["main"]["connected"] == true && fp != main_before).then_some(fp)
    })
    .await;
    eprintln!("branch1 certificates: {first} → {second} → {third}; main: {main_before} → {main_after}");
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;
    let renewal: i64 = topo.main.db().await.query_one("SELECT count(*) FROM ledger_zq81 WHERE note = 'renewal'", &[]).await.unwrap().get(0);
    assert_eq!(renewal, 300, "every sale made during the renewals arrives once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_certificate_speaks_only_for_its_own_node() {
    let mut topo = Topology::prepare(2, SCHEMA).await;
    topo.main.start();
    let sid = system_id(&topo.branches[0]).await;
    // branch2's valid credentials, claiming to be branch1 (with branch1's
    // token): the same answer on the wire as any failed authentication.
    let answer = FakeBranch::connect(topo.main_port, &topo.branches[1].tls_dir(), hello_for("branch1", 1, sid, 1)).await.err().expect("the main must refuse");
    match answer {
        branchsync_proto::Message::Refuse(r) => {
            assert_eq!(r.reason, branchsync_proto::RefusalReason::BadToken, "{r}");
            assert_eq!(r.message, "authentication failed for node \"branch1\"", "the wire must not say why");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The main's log and status say why.
    topo.main.wait_log("was issued to another node", Duration::from_secs(10)).await;
    let st = wait_status(&topo.main, "the main counts the failed authentication", Duration::from_secs(10), |s| s["peers"]["branch1"]["auth_failures"].as_u64() >= Some(1)).await;
    eprintln!("the main says: {}", st["peers"]["branch1"]["last_error"]);
    // The real branch1 is not harmed by it.
    topo.branches[0].start();
    sell(&topo.branches[0], 3).await;
    wait_converged(&[&topo.main, &topo.branches[0]], &["ledger_zq81"], Duration::from_secs(60)).await;
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap()
}

/// Done-when 6: 1,000 connections that announce a 64 MiB frame (and as
/// many that say nothing) cost the main no memory to speak of, are capped,
/// and the real branch syncs throughout and reconnects afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_connections_is_capped_and_the_real_branch_syncs_on() {
    let mut topo = Topology::prepare(1, SCHEMA).await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    let pid = topo.main.pid().unwrap();
    let before = rss_kib(pid);
    let mut flood = Vec::new();
    for i in 0..2000 {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", topo.main_port)).await else { continue };
        if i % 2 == 0 {
            let _ = s.write_all(&(64u32 << 20).to_be_bytes()).await;
        }
        flood.push(s);
    }
    eprintln!("flood: {} connections open", flood.len());
    sell(&topo.branches[0], 50).await;
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;
    let during = rss_kib(pid);
    topo.main.wait_log("too many connections in their handshake", Duration::from_secs(10)).await;
    eprintln!("main RSS: {before} KiB before, {during} KiB during the flood");
    assert!(during < before + 32 * 1024, "the main's memory grew by {} KiB under the flood", during - before);
    drop(flood);
    // A new session after the flood: the link is cut, the branch dials
    // again and is welcomed.
    let sessions = wait_status(&topo.main, "main status", Duration::from_secs(5), |_| true).await["peers"]["branch1"]["sessions"].as_u64().unwrap();
    topo.proxies[0].cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    topo.proxies[0].heal();
    wait_status(&topo.main, "branch1 reconnects after the flood", Duration::from_secs(30), |s| {
        s["peers"]["branch1"]["connected"] == true && s["peers"]["branch1"]["sessions"].as_u64() > Some(sessions)
    })
    .await;
    sell(&topo.branches[0], 5).await;
    wait_converged(&topo.sites(), &["ledger_zq81"], Duration::from_secs(60)).await;
    assert_eq!(count_at(&topo.main, "branch1").await, 55);
}

/// A peer holding the main's credentials acknowledges far beyond what the
/// branch sent it (the session's window lets only the first of two large
/// sales go): the branch believes the Ack only up to what it sent, and
/// keeps the rest for the real main.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_believes_no_ack_beyond_what_it_sent() {
    use futures::{SinkExt, StreamExt};
    let mut topo = Topology::prepare_with(1, SCHEMA, "\n[log]\nkeep_acked_days = 0\n").await;
    topo.start_all();
    wait_status(&topo.main, "branch1 connected", Duration::from_secs(30), |s| s["peers"]["branch1"]["connected"] == true).await;
    topo.branches[0].stop();
    topo.main.stop();
    // Two large sales (each larger than the session's window) and a small one.
    let c = topo.branches[0].db().await;
    for note in [&"a".repeat(300_000), &"b".repeat(300_000), &"c".to_string()] {
        c.execute("INSERT INTO ledger_zq81 (shop, note) VALUES ('branch1', $1)", &[note]).await.unwrap();
    }
    // A main impostor with the main's own credentials.
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&topo.main.tls_dir(), &[]).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    edit_config(&topo.branches[0], &format!("main = \"127.0.0.1:{}\"", topo.proxies[0].port), &format!("main = \"127.0.0.1:{port}\""));
    topo.branches[0].start();
    let (sock, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await.unwrap().unwrap();
    let tls_stream = acceptor.accept(sock).await.unwrap();
    let mut f = tokio_util::codec::Framed::new(tls_stream, branchsync_proto::FrameCodec::default());
    let hello = match f.next().await.unwrap().unwrap() {
        branchsync_proto::Message::Hello(h) => h,
        other => panic!("expected Hello, got {other:?}"),
    };
    // Everything captured before the answer (the branch waits 10 s for it).
    let st = wait_status(&topo.branches[0], "branch1 captured the three sales", Duration::from_secs(8), |s| s["log_newest"].as_u64() >= Some(hello.log_floor + 3)).await;
    let newest = st["log_newest"].as_u64().unwrap();
    let floor = st["log_floor"].as_u64().unwrap();
    let now = branchsync_engine::clock::now_us();
    f.send(branchsync_proto::Message::Welcome(branchsync_proto::Welcome {
        protocol_version: branchsync_proto::PROTOCOL_VERSION,
        main_node: "main".into(),
        resume_after: floor,
        resume_lsn: 0,
        stream_epoch: hello.log_epoch,
        relay_epoch: hello.relay_epoch,
        now_us: now,
        hello_received_us: now,
        max_frame: branchsync_proto::MIN_MAX_FRAME as u64,
        window: branchsync_proto::MIN_MAX_FRAME as u64,
    }))
    .await
    .unwrap();
    f.send(branchsync_proto::Message::Ack { pos: newest + 1_000 }).await.unwrap();
    // Read what comes (no Credit is ever sent: only the first large sale
    // fits the window) while the branch handles the Ack.
    let reading = tokio::spawn(async move {
        while let Some(Ok(_)) = f.next().await {}
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = wait_status(&topo.branches[0], "branch1 status", Duration::from_secs(5), |_| true).await;
    let after = st["log_floor"].as_u64().unwrap();
    eprintln!("branch1 log: floor {floor} → {after} after an Ack of {}, newest {newest}", newest + 1_000);
    assert!(after < newest, "the branch reclaimed entries it never sent (floor {after}, newest {newest})");
    reading.abort();
}
