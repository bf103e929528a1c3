//! Issue 15, done-when 3: the operator page in a real browser (headless
//! Chromium from Debian's packages, driven over WebDriver by chromedriver).
//!
//! The main's page shows its shop; a cut link is shown as down within
//! `sync.peer_timeout_ms` + 2 s; a recorded conflict is on it with both
//! versions, and settling it from the page (keep the incoming version)
//! settles it at every site. The same request from a page of another
//! origin, or without the token, is refused. `BRANCHSYNC_SCREENSHOT=FILE`
//! keeps a screenshot of the page (README's is one).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use branchsync_tests::*;
use fantoccini::{ClientBuilder, Locator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HTTP_TOKEN: &str = "page-token-7c1f2a";
/// The harness's `sync.peer_timeout_ms`.
const PEER_TIMEOUT: Duration = Duration::from_millis(3000);

/// chromedriver and its browser session; both end on drop.
struct Browser {
    driver: Child,
    client: Option<fantoccini::Client>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the browsers it started share its process group:
        // a failed test leaves no Chromium behind. The group goes after
        // `--`: procps 4.0.2 (Debian 12) reads `kill -9 -PGID` as
        // kill(-1, SIGKILL), every process the user may signal.
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", self.driver.id())]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn browser() -> Browser {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver not found: install Debian's chromium and chromium-driver (bash tests/run.sh does)");
    let mut b = Browser { driver, client: None };
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": { "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1100"] }
    }))
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = eventually("chromedriver starts a browser", Duration::from_secs(60), || {
        let (caps, url) = (caps.clone(), url.clone());
        async move { ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new()).capabilities(caps).connect(&url).await.ok() }
    })
    .await;
    b.client = Some(client);
    b
}

/// The text of the first element `css` finds, if any.
async fn text_of(c: &fantoccini::Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Clicks what `css` finds (found again if the page redrew it meanwhile).
async fn click(c: &fantoccini::Client, css: &str) {
    eventually(&format!("click {css}"), Duration::from_secs(10), || async {
        let e = c.find(Locator::Css(css)).await.ok()?;
        e.click().await.ok()
    })
    .await;
}

/// A raw HTTP request to `port`; the status line of the answer.
async fn request(port: u16, head: &str, body: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let text = format!("{head}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(text.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_the_shops_a_cut_link_and_settles_a_conflict_everywhere() {
    let mut topo = Topology::prepare(1, POS_SCHEMA).await;
    edit_config(&topo.main, "[http]\n", &format!("[http]\ntoken = \"{HTTP_TOKEN}\"\n"));
    topo.start_all();
    stock_the_shelves(&topo).await;
    let (main, b1) = (topo.main.db().await, topo.branches[0].db().await);
    let pid: i32 = main.query_one("SELECT min(id) FROM products", &[]).await.unwrap().get(0);

    // A conflict: both sites change one price while apart; the main's later
    // change wins and the branch's is on record.
    topo.proxies[0].cut();
    wait_status(&topo.main, "main sees branch1 disconnected", Duration::from_secs(20), |s| s["peers"]["branch1"]["connected"] == false).await;
    b1.execute("UPDATE products SET price = 12 WHERE id = $1", &[&pid]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    main.execute("UPDATE products SET price = 11 WHERE id = $1", &[&pid]).await.unwrap();
    topo.proxies[0].heal();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(60)).await;
    let id: i64 = eventually("the main records the conflict", Duration::from_secs(20), || async {
        main.query_opt("SELECT id FROM branchsync.conflicts WHERE kind = 'update_update'", &[]).await.unwrap().map(|r| r.get(0))
    })
    .await;

    // The page loads and shows the shop, its link up.
    let b = browser().await;
    let c = b.client.as_ref().unwrap();
    let port = topo.main.http_port;
    c.goto(&format!("http://127.0.0.1:{port}/")).await.unwrap();
    let up = r#"tr[data-peer="branch1"] td.link"#;
    eventually("the page shows branch1 connected", Duration::from_secs(20), || async { (text_of(c, up).await.as_deref() == Some("up")).then_some(()) }).await;
    assert_eq!(c.title().await.unwrap(), "branchsync");
    assert_eq!(text_of(c, "#title").await.as_deref(), Some("branchsync: main"));

    // A cut link is shown as down within the peer timeout + 2 s.
    topo.proxies[0].cut();
    let cut_at = Instant::now();
    eventually("the page shows branch1's link down", PEER_TIMEOUT + Duration::from_secs(2), || async { (text_of(c, up).await.as_deref() == Some("down")).then_some(()) }).await;
    println!("the page showed the cut link down after {:.1} s", cut_at.elapsed().as_secs_f64());
    topo.proxies[0].heal();
    eventually("the page shows branch1 up again", Duration::from_secs(20), || async { (text_of(c, up).await.as_deref() == Some("up")).then_some(()) }).await;

    // The conflict is on the page with both versions.
    let row = format!(r#"tr[data-conflict="{id}"]"#);
    let text = eventually("the page lists the conflict", Duration::from_secs(10), || async { text_of(c, &row).await }).await;
    assert!(text.contains("public.products") && text.contains("update_update"), "{text}");
    assert!(text.contains("\"price\": \"11.00\"") && text.contains("\"price\": \"12.00\""), "both versions side by side: {text}");
    if let Ok(path) = std::env::var("BRANCHSYNC_SCREENSHOT") {
        std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
        println!("screenshot: {path}");
    }

    // Settling needs the token: without it the page says so.
    click(c, &format!("{row} button.keep-remote")).await;
    eventually("the page asks for the token", Duration::from_secs(10), || async {
        text_of(c, "#message").await.filter(|m| m.contains("token")).map(|_| ())
    })
    .await;
    let open: i64 = main.query_one("SELECT count(*) FROM branchsync.conflicts WHERE resolved_at IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(open, 1, "nothing was settled without the token");

    // Another origin, or no token: refused, also outside the browser.
    let path = format!("/api/conflicts/{id}/resolve");
    let body = r#"{"keep": "remote"}"#;
    let line = request(port, &format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://evil.example\r\nAuthorization: Bearer {HTTP_TOKEN}"), body).await;
    assert!(line.starts_with("HTTP/1.1 403"), "a page of another origin: {line}");
    let line = request(port, &format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}"), body).await;
    assert!(line.starts_with("HTTP/1.1 401"), "the page's own origin without the token: {line}");

    // With the token, from the page: settled, and the kept version
    // replicates to every site.
    c.find(Locator::Css("#token")).await.unwrap().send_keys(HTTP_TOKEN).await.unwrap();
    click(c, "#save-token").await;
    click(c, &format!("{row} button.keep-remote")).await;
    let msg = eventually("the page says the conflict is settled", Duration::from_secs(20), || async {
        text_of(c, "#message").await.filter(|m| m.contains("settled"))
    })
    .await;
    assert!(msg.contains(&format!("conflict {id}: settled; the discarded version was written back")), "{msg}");
    eventually("the record leaves the page", Duration::from_secs(10), || async { text_of(c, &row).await.is_none().then_some(()) }).await;
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(30)).await;
    let price: String = b1.query_one("SELECT price::text FROM products WHERE id = $1", &[&pid]).await.unwrap().get(0);
    assert_eq!(price, "12.00", "the incoming version, kept at the main, reached branch1");
    let resolution: Option<String> = main.query_one("SELECT resolution FROM branchsync.conflicts WHERE id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!(resolution.as_deref(), Some("remote"));
    if let Some(c) = b.client.clone() {
        let _ = c.close().await;
    }
}
