//! End-to-end harness: real PostgreSQL clusters and real `branchsync`
//! processes.
//!
//! * [`Site`]: one node — a throwaway cluster (from the engine's shared
//!   harness), a config file, a data directory, and the daemon as a child
//!   process that is killed on drop.
//! * [`LinkProxy`]: a TCP relay between a branch and the main that a test
//!   can cut (existing connections dropped, new ones refused) and heal, so a
//!   branch's daemon keeps running while its link is down (the scenario
//!   runner's, from the server library).
//! * [`table_checksum`]: per-table count and a multiset hash of the rows'
//!   text, to prove that sites hold the same rows.
//!
//! The `branchsync` binary is taken from `BRANCHSYNC_BIN` or from the cargo
//! target directory next to the test executable; `bash tests/run.sh` builds
//! it (with failpoints) before running the tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use branchsync_engine::test_utils::{connect, eventually, faked_clock, free_port, pg_bin_dir, PgCluster};
pub use branchsync_scenario::local::LinkProxy;

/// Path of the `branchsync` binary under test.
pub fn branchsync_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BRANCHSYNC_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/e2e-xxxx -> target/<profile>/branchsync
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("branchsync");
    assert!(bin.exists(), "{} not found: run `bash tests/run.sh` (it builds the binary first) or set BRANCHSYNC_BIN", bin.display());
    bin
}

/// Token shared by every test node.
pub const TOKEN: &str = "test-token-0123456789";

/// One node: PostgreSQL + config + daemon.
pub struct Site {
    /// The node's PostgreSQL.
    pub pg: PgCluster,
    /// Node name.
    pub name: String,
    /// Node index.
    pub index: u32,
    /// Holds config, data dir and daemon log.
    pub dir: tempfile::TempDir,
    /// HTTP status port.
    pub http_port: u16,
    daemon: Option<Child>,
    /// Extra environment for the daemon (failpoints).
    pub env: Vec<(String, String)>,
}

impl Site {
    /// A site with a fresh cluster.
    pub fn new(name: &str, index: u32) -> Site {
        Site::with_cluster(name, index, PgCluster::start())
    }

    /// A site on an existing cluster.
    pub fn with_cluster(name: &str, index: u32, pg: PgCluster) -> Site {
        Site {
            pg,
            name: name.into(),
            index,
            dir: tempfile::Builder::new().prefix(&format!("branchsync-{name}-")).tempdir().expect("temp dir"),
            http_port: free_port(),
            daemon: None,
            env: Vec::new(),
        }
    }

    /// Path of the config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("branchsync.toml")
    }

    /// Path of the daemon's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Writes the config of a main listening on `listen_port` with `branches`.
    pub fn write_main_config(&self, listen_port: u16, branches: &[(&str, u32)], extra: &str) {
        self.write_main_config_tuned(listen_port, branches, extra, "");
    }

    /// Like [`Site::write_main_config`], with `sync` lines added to `[sync]`.
    pub fn write_main_config_tuned(&self, listen_port: u16, branches: &[(&str, u32)], extra: &str, sync: &str) {
        let mut peers = String::new();
        for (n, i) in branches {
            peers.push_str(&format!("[[sync.peers]]\nname = \"{n}\"\nindex = {i}\ntoken = \"{TOKEN}\"\n"));
        }
        self.write_config(&format!("[sync]\nlisten = \"127.0.0.1:{listen_port}\"\nheartbeat_ms = 200\npeer_timeout_ms = 3000\n{sync}{peers}"), "main", extra);
    }

    /// Writes the config of a branch dialing the main at `main_port`.
    pub fn write_branch_config(&self, main_port: u16, extra: &str) {
        self.write_branch_config_tuned(main_port, extra, "");
    }

    /// Like [`Site::write_branch_config`], with `sync` lines added to `[sync]`.
    pub fn write_branch_config_tuned(&self, main_port: u16, extra: &str, sync: &str) {
        self.write_config(
            &format!("[sync]\nmain = \"127.0.0.1:{main_port}\"\ntoken = \"{TOKEN}\"\nheartbeat_ms = 200\npeer_timeout_ms = 3000\nreconnect_max_ms = 300\n{sync}"),
            "branch",
            extra,
        );
    }

    fn write_config(&self, sync: &str, role: &str, extra: &str) {
        // BRANCHSYNC_TEST_CAPTURE=peek|stream runs every test with that
        // capture mode (default: the product's default).
        let capture = std::env::var("BRANCHSYNC_TEST_CAPTURE").map(|m| format!("capture = \"{m}\"\n")).unwrap_or_default();
        let text = format!(
            "[node]\nname = \"{}\"\nrole = \"{role}\"\nindex = {}\ndata_dir = \"{}\"\n\n[database]\nurl = \"{}\"\nschemas = [\"public\"]\nexclude = [\"local_*\"]\n{capture}\n{sync}\n[http]\nlisten = \"127.0.0.1:{}\"\n\n[keys]\nstride = 100\n{extra}",
            self.name,
            self.index,
            self.dir.path().join("data").display(),
            self.pg.url(),
            self.http_port
        );
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// The node's TLS directory (the default: `tls/` beside the config).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// Issues this branch's credentials at `main` (whose `init` created the
    /// chain's CA) into this site's TLS directory, as an operator would.
    pub fn issue_credentials(&self, main: &Site) {
        let out = main.cli(&["tls", "issue", &self.name, "--out", &self.tls_dir().display().to_string()]);
        assert!(out.status.success(), "tls issue {} failed:\n{}\n{}", self.name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    /// Gives a lone branch (no main in the test) credentials from a CA of
    /// its own.
    pub fn self_issue_credentials(&self) {
        let ca = self.dir.path().join("ca");
        branchsync_server::tls::create_ca(&ca, "test").expect("create a CA");
        branchsync_server::tls::issue_branch(&ca, &self.name, &self.tls_dir(), 30).expect("issue credentials");
    }

    /// Runs `branchsync <args> --config FILE` to completion.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(branchsync_bin()).args(args).arg("--config").arg(self.config_path()).output().expect("run branchsync")
    }

    /// Runs `branchsync init` and panics with its output if it fails.
    pub fn init(&self) {
        let out = self.cli(&["init"]);
        assert!(out.status.success(), "init of {} failed:\n{}\n{}", self.name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    /// Starts the daemon (output appended to [`Site::log_path`]).
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "daemon of {} already running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("daemon log");
        let mut c = Command::new(branchsync_bin());
        c.arg("run").arg("--config").arg(self.config_path()).stdout(Stdio::from(log.try_clone().expect("log"))).stderr(Stdio::from(log));
        c.env("BRANCHSYNC_LOG", std::env::var("BRANCHSYNC_TEST_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in &self.env {
            c.env(k, v);
        }
        self.daemon = Some(c.spawn().expect("spawn branchsync run"));
    }

    /// `kill -9` of the daemon.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.daemon.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        for _ in 0..300 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// `true` while the daemon process runs.
    pub fn running(&mut self) -> bool {
        match self.daemon.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits for the daemon to exit by itself (e.g. at a failpoint).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(c) = self.daemon.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.daemon = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The daemon's output so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A database connection.
    pub async fn db(&self) -> tokio_postgres::Client {
        self.pg.connect().await
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- daemon log of {} ----\n{}", self.name, self.daemon_log());
        }
    }
}


/// `(row count, sum of the 64-bit hashes of the rows' text)` of a table: a
/// multiset hash, so equal for the same rows in any order, and needing no
/// sort (half the cost of an md5 over the sorted rows on a 3M-row table).
pub async fn table_checksum(c: &tokio_postgres::Client, table: &str) -> (i64, String) {
    try_table_checksum(c, table).await.unwrap_or_else(|e| panic!("checksum of {table}: {e}"))
}

/// [`table_checksum`], or the error (a table that does not exist yet).
pub async fn try_table_checksum(c: &tokio_postgres::Client, table: &str) -> Result<(i64, String), String> {
    let row = c
        .query_one(&format!("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text FROM {table} t"), &[])
        .await
        .map_err(|e| e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()))?;
    Ok((row.get(0), row.get(1)))
}

/// Every table's checksum at every site, one line each, and whether every
/// table is the same at every site (a table that does not exist yet, DDL
/// still on its way, differs).
async fn checksums_at(clients: &[(String, tokio_postgres::Client)], tables: &[&str]) -> (String, bool) {
    let (mut report, mut all_same) = (String::new(), true);
    for t in tables {
        let mut sums = Vec::new();
        for (n, c) in clients {
            let s = try_table_checksum(c, t).await.unwrap_or_else(|e| (-1, e));
            report.push_str(&format!("{n}.{t}: {} rows {}\n", s.0, s.1));
            sums.push(s);
        }
        if sums.windows(2).any(|w| w[0] != w[1]) {
            all_same = false;
        }
    }
    (report, all_same)
}

/// Waits until every site holds the same rows in every table.
pub async fn wait_converged(sites: &[&Site], tables: &[&str], timeout: Duration) {
    let mut clients = Vec::new();
    for s in sites {
        clients.push((s.name.clone(), s.db().await));
    }
    let what = format!("sites {:?} converge on {:?}", sites.iter().map(|s| &s.name).collect::<Vec<_>>(), tables);
    let mut last = String::new();
    let r = tokio::time::timeout(timeout, async {
        loop {
            let check_started = std::time::Instant::now();
            let all_same;
            (last, all_same) = checksums_at(&clients, tables).await;
            if all_same {
                return;
            }
            // Checksums of big tables cost the sites CPU: check less often
            // the longer a check takes.
            tokio::time::sleep(Duration::from_millis(200).max(check_started.elapsed() * 3)).await;
        }
    })
    .await;
    if r.is_err() {
        // The timeout may have cut a check short: say where every table
        // stands now.
        last = checksums_at(&clients, tables).await.0;
        // Small tables that differ: show their rows, to say how they differ.
        let mut rows = String::new();
        for t in tables {
            let mut per_site = Vec::new();
            for (n, c) in &clients {
                let sql = format!("SELECT coalesce(string_agg(r, E'\\n    '), '') FROM (SELECT t::text AS r FROM {t} t ORDER BY 1 LIMIT 21) x");
                let text = match c.query_one(&sql, &[]).await {
                    Ok(r) => r.get::<_, String>(0),
                    Err(e) => format!("error: {e}"),
                };
                per_site.push((n.clone(), text));
            }
            if per_site.windows(2).any(|w| w[0].1 != w[1].1) {
                for (n, text) in per_site {
                    rows.push_str(&format!("{n}.{t}:\n    {text}\n"));
                }
            }
        }
        panic!("timed out after {timeout:?} waiting for: {what}\n{last}{rows}{}", diagnostics(sites));
    }
}

/// What a failed wait prints about each site: its `status` and the
/// warnings and errors at the end of its daemon's log, so a failure in CI
/// can be read without a replay.
pub fn diagnostics(sites: &[&Site]) -> String {
    let mut out = String::new();
    for s in sites {
        let st = s.cli(&["status", "--json"]);
        out.push_str(&format!("--- {} status:\n{}{}\n", s.name, String::from_utf8_lossy(&st.stdout), String::from_utf8_lossy(&st.stderr)));
        let log = s.daemon_log();
        let tail: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        let from = tail.len().saturating_sub(30);
        out.push_str(&format!("--- {} log (last warnings and errors):\n{}\n", s.name, tail[from..].join("\n")));
    }
    out
}

/// The POS-shaped schema used by the end-to-end tests.
pub const POS_SCHEMA: &str = "
CREATE TABLE products (id serial PRIMARY KEY, name text NOT NULL, price numeric(10,2) NOT NULL, stock integer NOT NULL DEFAULT 0, CHECK (id >= 0));
CREATE TABLE orders (id serial PRIMARY KEY, shop text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(), total numeric(12,2) NOT NULL DEFAULT 0, note text);
CREATE TABLE order_lines (id bigserial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders(id), product_id integer NOT NULL REFERENCES products(id), qty integer NOT NULL, price numeric(10,2) NOT NULL);
CREATE TABLE audit_log (event text NOT NULL, at timestamptz NOT NULL DEFAULT now(), payload jsonb);
CREATE TABLE local_cache (k text PRIMARY KEY, v text);
";

/// Tables of [`POS_SCHEMA`] that replicate.
pub const POS_TABLES: &[&str] = &["products", "orders", "order_lines", "audit_log"];

/// Sells at `url` (an order of the `orders` table and two `order_lines`
/// a transaction, every 10 ms) until `stop`, counting the sales in `sold`.
pub fn seller(url: String, shop: &'static str, stop: std::sync::Arc<std::sync::atomic::AtomicBool>, sold: std::sync::Arc<std::sync::atomic::AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = connect(&url).await;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            c.batch_execute(&format!(
                "WITH o AS (INSERT INTO orders (shop, total) VALUES ('{shop}', 5) RETURNING id) \
                 INSERT INTO order_lines (order_id, product_id, qty) SELECT o.id, p, 1 FROM o, generate_series(1, 2) p"
            ))
            .await
            .expect("sell");
            sold.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Sells one order with `lines` lines at a site; returns the order id.
pub async fn sell(c: &tokio_postgres::Client, shop: &str, lines: i32) -> i32 {
    let tx_sql = format!(
        "WITH o AS (INSERT INTO orders (shop, total) VALUES ('{shop}', 0) RETURNING id), \
         l AS (INSERT INTO order_lines (order_id, product_id, qty, price) \
               SELECT o.id, p.id, 1 + (g % 3), p.price FROM o, generate_series(1, {lines}) g \
               JOIN LATERAL (SELECT id, price FROM products ORDER BY id OFFSET (g % 3) LIMIT 1) p ON true RETURNING order_id) \
         SELECT id FROM o"
    );
    let row = c.query_one(&tx_sql, &[]).await.expect("sell");
    row.get(0)
}

/// A main and `n` branches, each branch behind its own [`LinkProxy`].
pub struct Topology {
    /// The head office.
    pub main: Site,
    /// The shops, `branch1`…
    pub branches: Vec<Site>,
    /// One cuttable link per branch.
    pub proxies: Vec<LinkProxy>,
    /// Port the main listens on.
    pub main_port: u16,
}

impl Topology {
    /// Creates the sites, loads `schema` at each, writes configs and runs
    /// `init` everywhere; daemons are not started.
    pub async fn prepare(n: usize, schema: &str) -> Topology {
        Topology::prepare_with(n, schema, "").await
    }

    /// Like [`Topology::prepare`] with extra config text for every node.
    pub async fn prepare_with(n: usize, schema: &str, extra: &str) -> Topology {
        Topology::prepare_tuned(n, schema, extra, "").await
    }

    /// Like [`Topology::prepare_with`], with `sync` lines added to every
    /// node's `[sync]` section (frame and window sizes, say).
    pub async fn prepare_tuned(n: usize, schema: &str, extra: &str, sync: &str) -> Topology {
        let main = Site::new("main", 0);
        let main_port = free_port();
        let mut branches = Vec::new();
        let mut proxies = Vec::new();
        for i in 1..=n {
            branches.push(Site::new(&format!("branch{i}"), i as u32));
            proxies.push(LinkProxy::start(main_port).await.expect("start a link proxy"));
        }
        let names: Vec<(String, u32)> = branches.iter().map(|b| (b.name.clone(), b.index)).collect();
        let refs: Vec<(&str, u32)> = names.iter().map(|(n, i)| (n.as_str(), *i)).collect();
        main.write_main_config_tuned(main_port, &refs, extra, sync);
        for (b, p) in branches.iter().zip(&proxies) {
            b.write_branch_config_tuned(p.port, extra, sync);
        }
        for s in std::iter::once(&main).chain(branches.iter()) {
            if s.index != 0 {
                s.issue_credentials(&main);
            }
            s.db().await.batch_execute(schema).await.expect("load schema");
            s.init();
        }
        Topology { main, branches, proxies, main_port }
    }

    /// Starts every daemon.
    pub fn start_all(&mut self) {
        self.main.start();
        for b in &mut self.branches {
            b.start();
        }
    }

    /// Site `i`: 0 is the main, `i` is branch `i`.
    pub fn site_mut(&mut self, i: usize) -> &mut Site {
        if i == 0 {
            &mut self.main
        } else {
            &mut self.branches[i - 1]
        }
    }

    /// All sites, main first.
    pub fn sites(&self) -> Vec<&Site> {
        std::iter::once(&self.main).chain(self.branches.iter()).collect()
    }
}

/// Replaces `from` by `to` in the site's config file (the text must be there).
pub fn edit_config(site: &Site, from: &str, to: &str) {
    let text = std::fs::read_to_string(site.config_path()).expect("read config");
    assert!(text.contains(from), "config of {} lacks {from:?}:\n{text}", site.name);
    std::fs::write(site.config_path(), text.replacen(from, to, 1)).expect("write config");
}

/// A procedure that sells `n` sales for `shop_name`, each an order and four
/// lines in its own transaction (a shop's day without a round trip per
/// sale). Load it with the schema, at every site.
pub const SELL_MANY: &str = "
CREATE PROCEDURE sell_many(n int, shop_name text) LANGUAGE plpgsql AS $p$
BEGIN
    FOR i IN 1..n LOOP
        WITH o AS (INSERT INTO orders (shop, total) VALUES (shop_name, 0) RETURNING id)
        INSERT INTO order_lines (order_id, product_id, qty, price)
            SELECT o.id, p.id, 1, p.price FROM o, (SELECT id, price FROM products ORDER BY id LIMIT 4) p;
        COMMIT;
    END LOOP;
END
$p$;";

/// The first column of every row `sql` returns, as text (the query casts).
pub async fn texts(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).iter().map(|r| r.get(0)).collect()
}

/// `(orders, order lines)` of `shop` at a site.
pub async fn sales_of(c: &tokio_postgres::Client, shop: &str) -> (i64, i64) {
    let r = c
        .query_one("SELECT count(DISTINCT o.id), count(l.id) FROM orders o LEFT JOIN order_lines l ON l.order_id = o.id WHERE o.shop = $1", &[&shop])
        .await
        .expect("count sales");
    (r.get(0), r.get(1))
}

/// A Hello as branch `node` would send it: the branch's cluster and its log
/// (the main records the first identity it sees, so a hand-made Hello must
/// speak for the real branch's log).
pub fn hello_for(node: &str, index: u32, system_id: u64, log_epoch: u64) -> branchsync_proto::Hello {
    branchsync_proto::Hello {
        protocol_version: branchsync_proto::PROTOCOL_VERSION,
        node: node.into(),
        index,
        token: TOKEN.into(),
        stride: 100,
        exclude: vec!["local_*".into()],
        system_id,
        log_epoch,
        log_newest: 0,
        log_floor: 0,
        relay_epoch: 0,
        relay_applied: 0,
        relay_applied_lsn: 0,
        now_us: branchsync_engine::clock::now_us(),
        table_rules: Vec::new(),
        ddl_from: "main".into(),
        tombstone_days: 30,
        max_frame: branchsync_proto::DEFAULT_MAX_FRAME as u64,
        window: 1 << 24,
    }
}

/// The cluster's `system_identifier`.
pub async fn system_id(site: &Site) -> u64 {
    let sid: i64 = site.db().await.query_one("SELECT system_identifier FROM pg_control_system()", &[]).await.unwrap().get(0);
    sid as u64
}

/// A byte stream to the main's link port.
pub trait LinkIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LinkIo for T {}

/// A connection to the main's link port as a branch opens it: TLS with the
/// credentials in `tls_dir` (a branch's TLS directory), the main verified.
pub async fn dial_link(port: u16, tls_dir: &std::path::Path) -> std::io::Result<Box<dyn LinkIo>> {
    let sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let cfg = branchsync_server::tls::client_config(tls_dir).map_err(std::io::Error::other)?;
    let s = tokio_rustls::TlsConnector::from(cfg).connect(branchsync_server::tls::main_server_name(), sock).await?;
    Ok(Box::new(s))
}

/// A link connection framed with the real codec.
pub type LinkConn = tokio_util::codec::Framed<Box<dyn LinkIo>, branchsync_proto::FrameCodec>;

/// A hand-made branch speaking the link protocol: for feeding the main
/// crafted entries.
pub struct FakeBranch {
    /// The connection, framed with the real codec.
    pub framed: LinkConn,
}

impl FakeBranch {
    /// Connects with the credentials in `tls_dir` and sends `hello`;
    /// returns the connection once welcomed, or the main's other answer.
    pub async fn connect(port: u16, tls_dir: &std::path::Path, hello: branchsync_proto::Hello) -> Result<FakeBranch, branchsync_proto::Message> {
        use futures::{SinkExt, StreamExt};
        let sock = eventually("the main listens", Duration::from_secs(30), || async { dial_link(port, tls_dir).await.ok() }).await;
        let mut framed = tokio_util::codec::Framed::new(sock, branchsync_proto::FrameCodec::default());
        framed.send(branchsync_proto::Message::Hello(hello)).await.expect("send Hello");
        match tokio::time::timeout(Duration::from_secs(15), framed.next()).await.expect("an answer to Hello").expect("a frame").expect("decodable") {
            branchsync_proto::Message::Welcome(_) => Ok(FakeBranch { framed }),
            other => Err(other),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, m: branchsync_proto::Message) {
        use futures::SinkExt;
        self.framed.send(m).await.expect("send to the main");
    }

    /// Reads (and drops heartbeats, acks and credit) until the main refuses
    /// or closes; returns the refusal, if one came.
    pub async fn refusal(&mut self, timeout: Duration) -> Option<branchsync_proto::Refusal> {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Err(_) => panic!("the main neither refused nor closed within {timeout:?}"),
                Ok(Some(Ok(branchsync_proto::Message::Refuse(r)))) => return Some(r),
                Ok(Some(Ok(_))) => continue,
                Ok(None) | Ok(Some(Err(_))) => return None,
            }
        }
    }
}

/// Waits until the HTTP status of `site` satisfies `pred`.
pub async fn wait_status(site: &Site, what: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let port = site.http_port;
    eventually(what, timeout, || async {
        let v = http_status(port).await?;
        pred(&v).then_some(v)
    })
    .await
}

/// `GET /status` of a daemon, parsed; `None` while it does not answer.
pub async fn http_status(port: u16) -> Option<serde_json::Value> {
    let body = branchsync_server::http::get(&format!("127.0.0.1:{port}"), "/status").await.ok()?;
    serde_json::from_str(&body).ok()
}

/// An ordinary role that creates pgbench's tables (`pgbench -i -U erp`), as
/// an ERP's tables are created, so that the branches replay their DDL.
pub const PGBENCH_SCHEMA: &str = "CREATE ROLE erp LOGIN; GRANT CREATE ON SCHEMA public TO erp;";

/// pgbench's balances as delta columns.
pub const PGBENCH_DELTA_RULES: &str = "
[[tables]]
match = \"pgbench_accounts\"
delta = [\"abalance\"]

[[tables]]
match = \"pgbench_tellers\"
delta = [\"tbalance\"]

[[tables]]
match = \"pgbench_branches\"
delta = [\"bbalance\"]
";

/// pgbench's tables.
pub const PGBENCH_TABLES: &[&str] = &["pgbench_branches", "pgbench_tellers", "pgbench_accounts", "pgbench_history"];

/// `(sum(abalance), sum(bbalance), sum(tbalance), sum(delta), history
/// rows)` of pgbench's tables at `c`: after any number of pgbench
/// transactions, the first four are equal.
pub async fn pgbench_sums(c: &tokio_postgres::Client) -> (i64, i64, i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT (SELECT sum(abalance)::int8 FROM pgbench_accounts), (SELECT sum(bbalance)::int8 FROM pgbench_branches), \
                    (SELECT sum(tbalance)::int8 FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0)::int8 FROM pgbench_history), \
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .expect("sum pgbench's balances");
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// `pgbench` against `site`'s database `postgres` with `args` (`-U` among
/// them), its output piped.
pub fn pgbench(site: &Site, args: &[&str]) -> Command {
    let mut c = Command::new(pg_bin_dir().join("pgbench"));
    c.args(["-h", "127.0.0.1", "-p", &site.pg.port().to_string()]).args(args).arg("postgres");
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Peak resident set size (VmHWM) of a process in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok())
}

impl Site {
    /// Arms a failpoint that pauses the daemon at its `n`-th hit (effective
    /// at the next start); returns the file whose creation releases it.
    pub fn arm_pause(&mut self, name: &str, n: u64) -> PathBuf {
        let release = self.dir.path().join(format!("release-{}-{n}", name.replace('.', "_")));
        let _ = std::fs::remove_file(&release);
        self.env = vec![
            ("BRANCHSYNC_FAILPOINT".into(), format!("{name}:{n}:pause")),
            ("BRANCHSYNC_FAILPOINT_RELEASE".into(), release.display().to_string()),
        ];
        release
    }

    /// Waits until the daemon's output contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        eventually(&format!("{}'s log says {needle:?}", self.name), timeout, || async { self.daemon_log().contains(needle).then_some(()) }).await;
    }

    /// The identity (epoch) of the site's log, creating the log if the
    /// daemon never ran (call it while the daemon is stopped).
    pub fn log_epoch(&self) -> u64 {
        assert!(self.daemon.is_none(), "read the log of {} while its daemon is stopped", self.name);
        branchsync_engine::log::ChangeLog::open(&self.dir.path().join("data").join("log")).expect("open the site's log").epoch()
    }

    /// SIGHUP to the daemon: it reads its configuration again.
    pub fn reload(&self) {
        let pid = self.pid().unwrap_or_else(|| panic!("the daemon of {} is not running", self.name));
        let st = Command::new("kill").arg("-HUP").arg(pid.to_string()).status().expect("run kill");
        assert!(st.success(), "kill -HUP {pid}");
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }
}

/// Products at the main, replicated everywhere before the test begins.
pub async fn stock_the_shelves(topo: &Topology) {
    topo.main.db().await.batch_execute("INSERT INTO products (name, price, stock) SELECT 'p' || g, g, 1000000 FROM generate_series(1, 8) g").await.unwrap();
    wait_converged(&topo.sites(), &["products"], Duration::from_secs(60)).await;
}

/// branch1 sells `sales` one-sale transactions while cut off, then heals
/// while the main and branch2 keep selling; prints how long the catch-up
/// took and checks every sale at every site exactly once.
pub async fn offline_day(sales: i32) {
    use std::time::Instant;
    let mut topo = Topology::prepare(2, &format!("{POS_SCHEMA}\n{SELL_MANY}")).await;
    topo.start_all();
    stock_the_shelves(&topo).await;
    topo.proxies[0].cut();
    let b1 = topo.branches[0].db().await;
    let t = Instant::now();
    b1.batch_execute(&format!("CALL sell_many({sales}, 'branch1')")).await.unwrap();
    println!("branch1 sold {sales} sales offline in {:.1} s", t.elapsed().as_secs_f64());
    // Generous bounds (a stuck stream still fails): a minute per 10,000
    // sales beyond the first ten minutes.
    let bound = Duration::from_secs(600 + sales as u64 / 10_000 * 60);
    wait_status(&topo.branches[0], "branch1 captured its day", bound, |s| s["captured_transactions"].as_u64().unwrap_or(0) >= sales as u64).await;

    // The others keep selling through the catch-up.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut sellers = Vec::new();
    for (site, shop) in [(&topo.main, "main"), (&topo.branches[1], "branch2")] {
        let c = site.db().await;
        let stop = stop.clone();
        sellers.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                c.batch_execute(&format!("CALL sell_many(2, '{shop}')")).await.unwrap();
                n += 2;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            n
        }));
    }
    let healed = Instant::now();
    topo.proxies[0].heal();
    let main = topo.main.db().await;
    eventually("branch1's day reaches the main", bound, || async {
        (sales_of(&main, "branch1").await.0 == sales as i64).then_some(())
    })
    .await;
    let up = healed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut sold = Vec::new();
    for s in sellers {
        sold.push(s.await.unwrap());
    }
    wait_converged(&topo.sites(), &["orders", "order_lines", "products"], bound).await;
    println!(
        "offline day of {sales} sales: at the main {:.1} s after the heal ({:.0} sales/s), every site converged after {:.1} s; meanwhile main sold {}, branch2 {}",
        up.as_secs_f64(),
        sales as f64 / up.as_secs_f64(),
        healed.elapsed().as_secs_f64(),
        sold[0],
        sold[1]
    );
    for s in topo.sites() {
        let c = s.db().await;
        assert_eq!(sales_of(&c, "branch1").await, (sales as i64, 4 * sales as i64), "branch1's sales at {}", s.name);
        assert_eq!(sales_of(&c, "main").await, (sold[0], 4 * sold[0]), "the main's sales at {}", s.name);
        assert_eq!(sales_of(&c, "branch2").await, (sold[1], 4 * sold[1]), "branch2's sales at {}", s.name);
    }
    // One session per branch: the link never had to be torn down to get
    // going again.
    let st = http_status(topo.main.http_port).await.unwrap();
    assert_eq!(st["peers"]["branch1"]["session_failures"], 0, "{}", st["peers"]["branch1"]);
}
