//! Issue 13, done-when 8: the operator's HTTP surface. Off loopback,
//! `/status` and `/metrics` need the bearer token (and the configuration
//! refuses such an address without one); on loopback, a request that would
//! change state needs it too, a web page's request is refused, and a
//! `Host` that does not name the loopback (DNS rebinding) is refused.

use std::time::Duration;

use branchsync_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HTTP_TOKEN: &str = "http-token-9f3e0c51";

/// Sends `head` (a request line and headers) to the daemon; returns the
/// status line.
async fn ask(port: u16, head: &str) -> String {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return "(not listening)".into() };
    s.write_all(format!("{head}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_off_loopback_and_state_changes_need_the_token() {
    let mut topo = Topology::prepare(1, "CREATE TABLE orders (id serial PRIMARY KEY);").await;
    let port = topo.main.http_port;
    // Off loopback without a token: refused when the configuration loads.
    edit_config(&topo.main, &format!("listen = \"127.0.0.1:{port}\""), &format!("listen = \"0.0.0.0:{port}\""));
    let out = topo.main.cli(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("http.listen") && err.contains("http.token"), "{err}");
    // With a token.
    edit_config(&topo.main, &format!("listen = \"0.0.0.0:{port}\""), &format!("listen = \"0.0.0.0:{port}\"\ntoken = \"{HTTP_TOKEN}\""));
    topo.main.start();
    eventually("the main's HTTP server answers", Duration::from_secs(30), || async { ask(port, "GET /health HTTP/1.1\r\nHost: shop-pc").await.contains("200").then_some(()) }).await;
    for path in ["/status", "/metrics"] {
        let line = ask(port, &format!("GET {path} HTTP/1.1\r\nHost: head-office.example")).await;
        assert!(line.starts_with("HTTP/1.1 401"), "{path} without the token: {line}");
        let line = ask(port, &format!("GET {path} HTTP/1.1\r\nHost: head-office.example\r\nAuthorization: Bearer wrong")).await;
        assert!(line.starts_with("HTTP/1.1 401"), "{path} with a wrong token: {line}");
        let line = ask(port, &format!("GET {path} HTTP/1.1\r\nHost: head-office.example\r\nAuthorization: Bearer {HTTP_TOKEN}")).await;
        assert!(line.starts_with("HTTP/1.1 200"), "{path} with the token: {line}");
    }
    // `branchsync status` sends the token.
    let out = topo.main.cli(&["status", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("\"node\":\"main\""), "{text}");

    // On loopback (branch1): reads are open to the machine, state changes
    // are not, a web page's request is refused, and so is another Host.
    let b = &mut topo.branches[0];
    b.start();
    let bport = b.http_port;
    wait_status(b, "branch1 answers", Duration::from_secs(30), |_| true).await;
    let line = ask(bport, &format!("GET /status HTTP/1.1\r\nHost: 127.0.0.1:{bport}")).await;
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    let line = ask(bport, &format!("POST /status HTTP/1.1\r\nHost: 127.0.0.1:{bport}")).await;
    assert!(line.starts_with("HTTP/1.1 401"), "a state-changing request without the token on loopback: {line}");
    let line = ask(bport, &format!("POST /status HTTP/1.1\r\nHost: 127.0.0.1:{bport}\r\nOrigin: http://evil.example")).await;
    assert!(line.starts_with("HTTP/1.1 403"), "a web page's request: {line}");
    let line = ask(bport, &format!("GET /status HTTP/1.1\r\nHost: evil.example:{bport}")).await;
    assert!(line.starts_with("HTTP/1.1 403"), "DNS rebinding: {line}");
}

/// Issue 15 (progress and logs): a log shipper reads the daemon's lines as
/// JSON objects, one per line, with the structured fields (`node`, `peer`)
/// apart from the message; Prometheus reads `/metrics` as its text format,
/// each family described once, every sample a number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_shippers_read_json_lines_and_prometheus_reads_the_metrics() {
    let mut topo = Topology::prepare(1, "CREATE TABLE orders (id serial PRIMARY KEY, shop text, total numeric);").await;
    for s in std::iter::once(&mut topo.main).chain(topo.branches.iter_mut()) {
        s.env.push(("BRANCHSYNC_LOG_FORMAT".into(), "json".into()));
    }
    topo.start_all();
    let shop = topo.branches[0].db().await;
    for i in 0..20 {
        shop.execute("INSERT INTO orders (shop, total) VALUES ('branch1', $1::int)", &[&i]).await.unwrap();
    }
    wait_converged(&topo.sites(), &["orders"], Duration::from_secs(60)).await;

    for site in topo.sites() {
        let log = site.daemon_log();
        let mut fields_seen = std::collections::BTreeSet::new();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: a log line that is not JSON ({e}): {line}", site.name));
            for key in ["timestamp", "level", "target", "fields"] {
                assert!(v.get(key).is_some(), "{}: no \"{key}\" in {line}", site.name);
            }
            assert!(v["fields"]["message"].is_string(), "{}: no message in {line}", site.name);
            if let Some(f) = v["fields"].as_object() {
                fields_seen.extend(f.keys().cloned());
            }
            for span in v["spans"].as_array().into_iter().flatten() {
                if let Some(f) = span.as_object() {
                    fields_seen.extend(f.keys().cloned());
                }
            }
        }
        assert!(fields_seen.contains("node") && fields_seen.contains("peer"), "{}: structured fields seen: {fields_seen:?}\n{log}", site.name);
    }

    let metrics = branchsync_server::http::get(&format!("127.0.0.1:{}", topo.main.http_port), "/metrics").await.unwrap();
    let mut described = std::collections::BTreeMap::<String, usize>::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            *described.entry(rest.split(' ').next().unwrap_or("").to_string()).or_default() += 1;
        } else if !line.starts_with('#') && !line.is_empty() {
            let (_, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample without a value: {line}"));
            assert!(value.parse::<f64>().is_ok(), "a sample whose value is not a number: {line}");
            let name = line.split(['{', ' ']).next().unwrap_or("");
            assert!(described.contains_key(name), "a sample before its family's TYPE: {line}");
        }
    }
    assert!(described.values().all(|n| *n == 1), "families described more than once: {described:?}");
    let applied = metrics
        .lines()
        .find_map(|l| l.strip_prefix("branchsync_peer_rows_applied_total{peer=\"branch1\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no whole count of rows applied from branch1:\n{metrics}"));
    assert!(applied >= 20, "rows applied from branch1: {applied}\n{metrics}");
}
