//! Issue 12, done-when 7 (R24): the log's disk fills up during a sale burst.
//! Capture pauses (status, `/health` and `/metrics` say why), the link and
//! inbound apply go on, capture resumes by itself once there is room, and
//! nothing is lost. The same with the log's own budget (`[log]
//! max_bytes`): acknowledged entries give way even though `keep_acked`
//! would keep them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use branchsync_tests::*;

const SCHEMA: &str = "
CREATE TABLE products (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL);
INSERT INTO products (id, name, price) VALUES (0, 'tea', 2.50), (100, 'cake', 3.20), (200, 'milk', 1.10), (300, 'rice', 4.00);
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, total numeric(12,2) NOT NULL DEFAULT 0, note text);
CREATE TABLE order_lines (id bigserial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders(id), product_id integer NOT NULL REFERENCES products(id), qty integer NOT NULL, price numeric(10,2) NOT NULL);
";
/// Sells `n` orders with a 64 KB note each, one transaction each.
const NOTE_MANY: &str = "
CREATE PROCEDURE note_many(n int) LANGUAGE plpgsql AS $p$
BEGIN
    FOR i IN 1..n LOOP
        INSERT INTO orders (shop, note) VALUES ('branch1-notes', repeat(md5(i::text), 2000));
        COMMIT;
    END LOOP;
END
$p$;";
const TABLES: &[&str] = &["products", "orders", "order_lines"];

/// A small tmpfs mounted over a directory, unmounted on drop (also when
/// the test fails).
struct SmallDisk(PathBuf);

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB at `dir`; `None` (with a note) where the
    /// test may not mount (not root). As root a failing mount fails the test.
    fn mount(dir: &Path, mib: u64) -> Option<SmallDisk> {
        if !branchsync_engine::cluster::running_as_root() {
            println!("SKIPPED: mounting a small filesystem needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir).status().expect("run mount");
        assert!(st.success(), "cannot mount a tmpfs at {}", dir.display());
        Some(SmallDisk(dir.to_path_buf()))
    }

    /// Fills the filesystem with a file until no byte is left.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let block = vec![0u8; 64 * 1024];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        // The last partial block too.
        while f.write_all(&[0u8; 512]).is_ok() {}
        while f.write_all(&[0u8]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `GET path` of a daemon: `(status line, body)`.
async fn http(port: u16, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the daemon's HTTP port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or("").to_string(), body.to_string())
}

/// The branch's log directory fills up during a sale burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_disk_pauses_capture_only_and_capture_resumes_when_room_returns() {
    let mut topo = Topology::prepare(1, &format!("{SCHEMA}{SELL_MANY}")).await;
    let Some(disk) = SmallDisk::mount(&topo.branches[0].dir.path().join("data"), 16) else { return };
    topo.start_all();
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    b1.execute("CALL sell_many(10, 'branch1')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(60)).await;

    let filler = disk.fill();
    println!("the branch's log disk is full");
    // A sale burst at the shop (its database is on another disk), with a
    // large note each so that the burst alone would need room.
    b1.batch_execute("UPDATE orders SET note = repeat('n', 2000) WHERE shop = 'branch1'").await.unwrap();
    b1.execute("CALL sell_many(300, 'branch1-burst')", &[]).await.unwrap();
    let st = wait_status(&topo.branches[0], "capture pauses", Duration::from_secs(60), |s| s["capture_state"] == "paused").await;
    println!("branch status: capture {} ({})", st["capture_state"], st["capture_reason"]);
    assert!(st["capture_reason"].as_str().unwrap_or("").contains("space") || st["capture_reason"].as_str().unwrap_or("").contains("full"), "{st}");
    let (health, _) = http(topo.branches[0].http_port, "/health").await;
    assert!(health.contains("503"), "/health says the node is not well: {health}");
    let (_, metrics) = http(topo.branches[0].http_port, "/metrics").await;
    assert!(metrics.lines().any(|l| l.starts_with("branchsync_capture_running") && l.trim_end().ends_with(" 0")), "/metrics says capture is not running");

    // The head office sells on: the branch keeps applying what it receives.
    main.execute("CALL sell_many(40, 'main')", &[]).await.unwrap();
    eventually("the main's sales reach the branch whose log disk is full", Duration::from_secs(60), || async {
        (sales_of(&b1, "main").await == (40, 160)).then_some(())
    })
    .await;
    assert!(topo.branches[0].running(), "the branch's daemon keeps running");
    assert_eq!(wait_status(&topo.branches[0], "still paused", Duration::from_secs(5), |_| true).await["capture_state"], "paused");

    // Room returns: capture resumes by itself; nothing was lost.
    std::fs::remove_file(&filler).unwrap();
    wait_status(&topo.branches[0], "capture resumes", Duration::from_secs(60), |s| s["capture_state"] == "running").await;
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(120)).await;
    assert_eq!(sales_of(&main, "branch1-burst").await, (300, 1200));
    let (health, _) = http(topo.branches[0].http_port, "/health").await;
    assert!(health.contains("200"), "/health is well again: {health}");
}

/// The log's budget fills up while the link is cut (nothing can be
/// acknowledged): capture pauses with an alarm; when the link heals, the
/// main acknowledges, the entries give way although `keep_acked` would keep
/// them for a week, and capture resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_budget_pauses_capture_until_acknowledged_entries_give_way() {
    const BUDGET: u64 = 64 << 20;
    let mut topo = Topology::prepare_with(1, &format!("{SCHEMA}{SELL_MANY}{NOTE_MANY}"), &format!("[log]\nmax_bytes = {BUDGET}\n")).await;
    topo.start_all();
    let main = topo.main.db().await;
    let b1 = topo.branches[0].db().await;
    wait_status(&topo.branches[0], "the branch is connected", Duration::from_secs(30), |s| s["peers"]["main"]["connected"] == true).await;

    topo.proxies[0].cut();
    // About 90 MB of notes, 64 KB a sale: more than the budget.
    b1.execute("CALL note_many(1400)", &[]).await.unwrap();
    let st = wait_status(&topo.branches[0], "capture pauses at the budget and the alarm is raised", Duration::from_secs(120), |s| {
        s["capture_state"] == "paused" && !s["log_warning"].is_null()
    })
    .await;
    println!("branch status: log {} of {} bytes; {}", st["log_bytes"], st["log_budget_bytes"], st["log_warning"]);
    assert!(st["log_warning"].as_str().is_some_and(|w| w.contains("max_bytes")), "the 80 % alarm is raised: {st}");
    assert!(st["log_bytes"].as_u64().unwrap_or(u64::MAX) <= BUDGET, "the budget holds: {st}");

    topo.proxies[0].heal();
    b1.execute("CALL sell_many(20, 'branch1-after')", &[]).await.unwrap();
    wait_converged(&topo.sites(), TABLES, Duration::from_secs(180)).await;
    let st = wait_status(&topo.branches[0], "capture runs again", Duration::from_secs(30), |s| s["capture_state"] == "running").await;
    println!("after the heal: log {} bytes, capture {}", st["log_bytes"], st["capture_state"]);
    assert_eq!(sales_of(&main, "branch1-notes").await.0, 1400);
    assert_eq!(sales_of(&main, "branch1-after").await, (20, 80));
}
