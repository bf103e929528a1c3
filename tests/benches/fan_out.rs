//! Fan-out (issue 14): one main serving 50 branches. 48 of them are load
//! generators that speak the real link protocol (TLS with credentials the
//! main issued, the handshake, credit and acknowledgements, heartbeats):
//! each sends a sale (an order and four lines, one ChangeSet) 20 times a
//! second, receives the whole relay, checks its order (positions rising;
//! each author's ChangeSets in the order that author committed them) and
//! acknowledges it. The other two are real branches, each with its
//! PostgreSQL and its daemon: branch1 sells 20 sales a second through SQL,
//! and the bench measures, per sale, the time from its commit at branch1
//! until branch2's database holds it (polled every 5 ms). Prints the p50,
//! p99 and largest of that latency, and what the main took in and relayed.
//! Not a timed test: it asserts only that the relay came in order and that
//! every sale of branch1 reached branch2.
//!
//! ```text
//! cargo build --release -p branchsync-server
//! cargo bench -p branchsync-tests --bench fan_out
//! ```
//! `BENCH_FANOUT_SECONDS` (default 30) sets how long everyone sells,
//! `BENCH_FANOUT_FAKES` (default 48) the load generators, `BENCH_FANOUT_RATE`
//! (default 20) the sales per second of each shop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use branchsync_proto::{ChangeSetHeader, LogEntry, Message, RowChange, TableDef, TableDesc, Value, WireEntry};
use branchsync_tests::*;
use futures::{SinkExt, StreamExt};

const SCHEMA: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, shop text NOT NULL, total numeric NOT NULL);
CREATE TABLE order_lines (id bigint PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders, product int NOT NULL, qty int NOT NULL, price numeric NOT NULL);";

/// The key stride every site uses (the harness's `[keys] stride`).
const STRIDE: u64 = 100;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run());
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn desc(name: &str, columns: &[&str]) -> TableDesc {
    TableDesc::from(TableDef {
        schema: "public".into(),
        name: name.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        key: columns.iter().map(|c| *c == "id").collect(),
        identity_full: true,
    })
}

/// Sale `k` of shop `index`: its order key and its lines' keys, in the
/// shop's stripe.
fn sale_keys(index: u64, k: u64) -> (u64, [u64; 4]) {
    let line = |j: u64| (k * 4 + j) * STRIDE + index;
    (k * STRIDE + index, [line(0), line(1), line(2), line(3)])
}

/// What the load generators saw, summed.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    held_back: AtomicU64,
    relayed: AtomicU64,
    relayed_bytes: AtomicU64,
}

async fn run() {
    let seconds = env_u64("BENCH_FANOUT_SECONDS", 30).max(1);
    let fakes = env_u64("BENCH_FANOUT_FAKES", 48) as u32;
    let rate = env_u64("BENCH_FANOUT_RATE", 20).max(1);
    let total = fakes + 2;
    println!("== fan-out: one main, {total} branches ({fakes} load generators speaking the link protocol, 2 real); every shop sells {rate} sales/s for {seconds} s");

    // The sites: the main knows all 50 branches; two of them are real.
    let main_port = free_port();
    // Every site tracks a replication origin per site whose changes it
    // applies (the main one per branch, a branch one per other author), and
    // the main's daemon holds a connection per branch session.
    let conf = ["max_replication_slots = 64", "max_connections = 200"];
    let site = |name: &str, index: u32| Site::with_cluster(name, index, branchsync_engine::test_utils::PgCluster::start_with(&conf));
    let mut main = site("main", 0);
    let mut branch1 = site("branch1", 1);
    let mut branch2 = site("branch2", 2);
    let names: Vec<(String, u32)> = (1..=total).map(|i| (format!("branch{i}"), i)).collect();
    let refs: Vec<(&str, u32)> = names.iter().map(|(n, i)| (n.as_str(), *i)).collect();
    main.write_main_config(main_port, &refs, "");
    for b in [&branch1, &branch2] {
        b.write_branch_config(main_port, "");
    }
    for s in [&main, &branch1, &branch2] {
        if s.index != 0 {
            s.issue_credentials(&main);
        }
        s.db().await.batch_execute(SCHEMA).await.expect("load schema");
        s.init();
    }
    // The load generators' credentials, issued by the main as for any shop.
    let creds = tempfile::tempdir().expect("a directory for credentials");
    let mut tls_dirs = Vec::new();
    for i in 3..=total {
        let dir = creds.path().join(format!("branch{i}"));
        let out = main.cli(&["tls", "issue", &format!("branch{i}"), "--out", &dir.display().to_string()]);
        assert!(out.status.success(), "tls issue branch{i}: {}", String::from_utf8_lossy(&out.stderr));
        tls_dirs.push((i, dir));
    }
    main.start();
    branch1.start();
    branch2.start();
    for b in ["branch1", "branch2"] {
        wait_status(&main, &format!("{b} connected"), Duration::from_secs(60), |s| s["peers"][b]["connected"] == true).await;
    }

    // The load generators connect and start selling.
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut gens = Vec::new();
    for (i, dir) in tls_dirs {
        let hello = hello_for(&format!("branch{i}"), i, 0xFA00_0000 + u64::from(i), 0xFA00 + u64::from(i));
        let fake = FakeBranch::connect(main_port, &dir, hello).await.unwrap_or_else(|m| panic!("branch{i} refused: {m:?}"));
        gens.push(tokio::spawn(load_generator(fake, i, rate, deadline, counters.clone())));
    }
    println!("{} load generators connected", gens.len());

    // branch2 watches for branch1's sales.
    let b1 = branch1.db().await;
    let b2 = branch2.db().await;
    let arrivals: Arc<tokio::sync::Mutex<HashMap<i64, Instant>>> = Arc::default();
    let watcher = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let q = b2.prepare("SELECT id FROM orders WHERE id > $1 AND shop = 'branch1' ORDER BY id").await.expect("prepare");
            let mut last = 0i64;
            loop {
                let rows = b2.query(&q, &[&last]).await.expect("poll branch2");
                let now = Instant::now();
                let mut a = arrivals.lock().await;
                for r in rows {
                    let id: i64 = r.get(0);
                    a.entry(id).or_insert(now);
                    last = last.max(id);
                }
                drop(a);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // branch1 sells through SQL.
    let started = Instant::now();
    let mut commits: Vec<(i64, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut k = 1u64;
    while Instant::now() < deadline {
        tick.tick().await;
        let (order, lines) = sale_keys(1, k);
        let values: Vec<String> = lines.iter().enumerate().map(|(j, l)| format!("({l}, {order}, {j}, 1, 2.50)")).collect();
        b1.batch_execute(&format!(
            "BEGIN; INSERT INTO orders VALUES ({order}, 'branch1', 10.00); INSERT INTO order_lines VALUES {}; COMMIT;",
            values.join(", ")
        ))
        .await
        .expect("sell at branch1");
        commits.push((order as i64, Instant::now()));
        k += 1;
    }
    let selling = started.elapsed();
    for g in gens {
        g.await.expect("a load generator failed");
    }
    eventually("every sale of branch1 at branch2", Duration::from_secs(300), || async {
        let a = arrivals.lock().await;
        commits.iter().all(|(id, _)| a.contains_key(id)).then_some(())
    })
    .await;
    watcher.abort();

    let a = arrivals.lock().await;
    let mut lat: Vec<f64> = commits.iter().map(|(id, t)| a[id].saturating_duration_since(*t).as_secs_f64() * 1000.0).collect();
    lat.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let secs = selling.as_secs_f64();
    let sent = counters.sent.load(Ordering::Relaxed);
    println!(
        "load generators: {sent} sales sent ({:.0}/s), {} ticks held back by flow control; relay received {} entries ({:.0}/s across {fakes}), {:.1} MiB",
        sent as f64 / secs,
        counters.held_back.load(Ordering::Relaxed),
        counters.relayed.load(Ordering::Relaxed),
        counters.relayed.load(Ordering::Relaxed) as f64 / secs,
        counters.relayed_bytes.load(Ordering::Relaxed) as f64 / 1048576.0
    );
    let line = format!(
        "fan-out, {total} branches ({fakes} load generators + 2 real) selling {rate} sales/s each: commit at branch1 → row at branch2 p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} sales; goal p99 ≤ 1000 ms)",
        pct(0.5),
        pct(0.99),
        lat[lat.len() - 1],
        lat.len()
    );
    println!("== summary\n{line}");
    drop(a);
    for s in [&mut main, &mut branch1, &mut branch2] {
        s.stop();
    }
}

/// One shop that exists only as a link session: sends a sale every
/// `1/rate` s until `deadline`, reads the relay all along (checking its
/// order, granting credit, acknowledging), heartbeats, and returns once the
/// relay holds its own last sale.
async fn load_generator(fake: FakeBranch, index: u32, rate: u64, deadline: Instant, counters: Arc<Counters>) {
    let name = format!("branch{index}");
    let (mut tx, mut rx) = fake.framed.split();
    let consumed_by_main = Arc::new(AtomicU64::new(0));
    let last_own_relayed = Arc::new(AtomicU64::new(0));
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::unbounded_channel::<Message>();
    let reader = {
        let consumed_by_main = consumed_by_main.clone();
        let last_own_relayed = last_own_relayed.clone();
        let counters = counters.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let (mut last_pos, mut consumed) = (0u64, 0u64);
            let mut by_author: HashMap<String, u64> = HashMap::new();
            while let Some(frame) = rx.next().await {
                match frame.expect("a decodable frame from the main") {
                    Message::Entries(es) => {
                        for w in &es {
                            assert!(w.pos > last_pos, "{name}: relay position {} after {last_pos}", w.pos);
                            last_pos = w.pos;
                            consumed += w.body.len() as u64;
                            let e = LogEntry::decode(&w.body).expect("a relay entry decodes");
                            let prev = by_author.insert(e.header.author.clone(), e.header.commit_lsn).unwrap_or(0);
                            assert!(e.header.commit_lsn > prev, "{name}: {}'s ChangeSets out of their commit order in the relay", e.header.author);
                            if e.header.author == name {
                                last_own_relayed.store(e.header.commit_lsn, Ordering::Relaxed);
                            }
                            counters.relayed.fetch_add(1, Ordering::Relaxed);
                            counters.relayed_bytes.fetch_add(w.body.len() as u64, Ordering::Relaxed);
                        }
                        if ctl_tx.send(Message::Credit { consumed }).is_err() || ctl_tx.send(Message::Ack { pos: last_pos }).is_err() {
                            return;
                        }
                    }
                    Message::Credit { consumed } => {
                        consumed_by_main.fetch_max(consumed, Ordering::Relaxed);
                    }
                    Message::Chunk(_) => panic!("{name}: no relay entry here is larger than a frame"),
                    Message::Refuse(r) => panic!("{name}: the main refused: {r}"),
                    _ => {}
                }
            }
        })
    };
    let orders = desc("orders", &["id", "shop", "total"]);
    let lines = desc("order_lines", &["id", "order_id", "product", "qty", "price"]);
    let text = |s: String| Value::Text(s);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let mut heartbeat = tokio::time::interval(Duration::from_millis(200));
    let (mut pos, mut sent_bytes) = (0u64, 0u64);
    let window = 1u64 << 23;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() >= deadline {
                    break;
                }
                if sent_bytes.saturating_sub(consumed_by_main.load(Ordering::Relaxed)) > window {
                    counters.held_back.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                pos += 1;
                let (order, keys) = sale_keys(u64::from(index), pos);
                let mut changes = vec![RowChange::Insert { table: 0, new: vec![text(order.to_string()), text(name.clone()), text("10.00".into())] }];
                for (j, l) in keys.iter().enumerate() {
                    changes.push(RowChange::Insert { table: 1, new: vec![text(l.to_string()), text(order.to_string()), text(j.to_string()), text("1".into()), text("2.50".into())] });
                }
                let ts = branchsync_engine::clock::now_us();
                let e = LogEntry {
                    pos,
                    header: ChangeSetHeader { author: name.clone(), author_index: index, system_id: 0xFA00_0000 + u64::from(index), commit_lsn: 0x100_0000 + pos, commit_ts_us: ts, stamp: ts as u64, seen_main_ts: 0 },
                    part: 0,
                    last: true,
                    tables: vec![orders.clone(), lines.clone()],
                    changes,
                    relay_ts_us: 0,
                    echo_as_sent: false,
                };
                let w = WireEntry::of(&e).expect("encode a sale");
                sent_bytes += w.body.len() as u64;
                tx.send(Message::Entries(vec![w])).await.expect("send a sale to the main");
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = heartbeat.tick() => {
                tx.send(Message::Heartbeat { now_us: branchsync_engine::clock::now_us(), log_newest: pos }).await.expect("heartbeat");
            }
            Some(m) = ctl_rx.recv() => {
                tx.send(m).await.expect("credit or ack to the main");
            }
        }
    }
    // Keep the session alive until the relay brought back the last sale.
    let own_last = 0x100_0000 + pos;
    let until = Instant::now() + Duration::from_secs(300);
    while last_own_relayed.load(Ordering::Relaxed) < own_last {
        assert!(Instant::now() < until, "{name}: its last sale never came back in the relay");
        tokio::select! {
            _ = heartbeat.tick() => {
                tx.send(Message::Heartbeat { now_us: branchsync_engine::clock::now_us(), log_newest: pos }).await.expect("heartbeat");
            }
            Some(m) = ctl_rx.recv() => {
                tx.send(m).await.expect("credit or ack to the main");
            }
        }
    }
    reader.abort();
}
