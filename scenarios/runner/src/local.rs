//! The local target: every site is a throwaway PostgreSQL cluster
//! ([`branchsync_engine::cluster::LocalCluster`]) and a `branchsync run`
//! child process of this program, on loopback; each branch dials the main
//! through a [`LinkProxy`] that a step can cut.
//!
//! Nothing outlives the target: dropping it kills the daemons, stops the
//! clusters and removes their directories, also when a step failed or the
//! run was interrupted (the runner drops the target on Ctrl-C).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use branchsync_engine::cluster::{free_port, LocalCluster};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{ScenarioError, Scenario};

/// Shared secret of the throwaway nodes.
const TOKEN: &str = "scenario-token-0123456789";

/// One site: cluster, config, daemon.
struct LocalSite {
    name: String,
    cluster: LocalCluster,
    dir: tempfile::TempDir,
    http_port: u16,
    daemon: Option<Child>,
    client: Option<tokio_postgres::Client>,
}

impl LocalSite {
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("branchsync.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// `true` while the daemon runs (it may have stopped on an error).
    fn daemon_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9` of the daemon, if there is one.
    fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalSite {
    fn drop(&mut self) {
        self.kill_daemon();
    }
}

/// Main, branches and their cuttable links on this machine.
pub struct LocalTarget {
    sites: Vec<LocalSite>,
    proxies: Vec<LinkProxy>,
    exe: PathBuf,
    pg_bin: String,
}

impl LocalTarget {
    /// Creates the clusters, loads the schema, writes the configs and runs
    /// `branchsync init` at every site, then starts the daemons.
    pub async fn setup(sc: &Scenario, schema: &str, rules: &str, progress: &(dyn Fn(String) + Sync)) -> Result<LocalTarget, ScenarioError> {
        let exe = std::env::current_exe().map_err(|e| ScenarioError::Setup(format!("cannot find this program's own path: {e}")))?;
        let bin = branchsync_engine::cluster::find_server_binaries().map_err(|e| ScenarioError::Setup(e.to_string()))?;
        let names = sc.sites();
        progress(format!("creating {} PostgreSQL clusters from {}", names.len(), bin.display()));
        // initdb takes a second or two each: all at once.
        let mut jobs = Vec::new();
        for _ in &names {
            jobs.push(tokio::task::spawn_blocking(|| LocalCluster::create(&[])));
        }
        let mut clusters = Vec::new();
        for j in jobs {
            let c = j.await.map_err(|e| ScenarioError::Setup(format!("cluster setup panicked: {e}")))?;
            clusters.push(c.map_err(|e| ScenarioError::Setup(e.to_string()))?);
        }
        let main_port = free_port();
        let mut proxies = Vec::new();
        for _ in 1..names.len() {
            proxies.push(LinkProxy::start(main_port).await.map_err(|e| ScenarioError::Setup(format!("cannot start a link proxy: {e}")))?);
        }
        let mut sites = Vec::new();
        for (i, (name, cluster)) in names.iter().zip(clusters).enumerate() {
            let dir = tempfile::Builder::new().prefix(&format!("branchsync-{name}-")).tempdir().map_err(|e| ScenarioError::Setup(format!("cannot create a temp dir: {e}")))?;
            let site = LocalSite { name: name.clone(), cluster, dir, http_port: free_port(), daemon: None, client: None };
            let sync = if i == 0 {
                let peers: String = names[1..].iter().enumerate().map(|(j, n)| format!("[[sync.peers]]\nname = \"{n}\"\nindex = {}\ntoken = \"{TOKEN}\"\n", j + 1)).collect();
                format!("[sync]\nlisten = \"127.0.0.1:{main_port}\"\nheartbeat_ms = 500\npeer_timeout_ms = 3000\n{peers}")
            } else {
                format!("[sync]\nmain = \"127.0.0.1:{}\"\ntoken = \"{TOKEN}\"\nheartbeat_ms = 500\npeer_timeout_ms = 3000\nreconnect_max_ms = 1000\n", proxies[i - 1].port)
            };
            let config = format!(
                "# written by branchsync scenario run ({})\n[node]\nname = \"{name}\"\nrole = \"{}\"\nindex = {i}\ndata_dir = \"{}\"\n\n[database]\nurl = \"{}\"\nschemas = [\"public\"]\nexclude = [\"local_*\"]\n\n{sync}\n[http]\nlisten = \"127.0.0.1:{}\"\n\n[keys]\nstride = 100\n\n{rules}",
                sc.name,
                if i == 0 { "main" } else { "branch" },
                site.dir.path().join("data").display(),
                site.cluster.url(),
                site.http_port
            );
            std::fs::write(site.config_path(), config).map_err(|e| ScenarioError::Setup(format!("cannot write {}: {e}", site.config_path().display())))?;
            sites.push(site);
        }
        let mut t = LocalTarget { sites, proxies, exe, pg_bin: bin.display().to_string() };
        progress("loading the schema and running branchsync init at every site".into());
        for i in 0..t.sites.len() {
            if i > 0 {
                // The shop's credentials, issued at the main as an operator
                // would (the main's init created the chain's CA).
                let out_dir = t.sites[i].dir.path().join("tls");
                let out = Command::new(&t.exe)
                    .args(["tls", "issue", &t.sites[i].name, "--out"])
                    .arg(&out_dir)
                    .arg("--config")
                    .arg(t.sites[0].config_path())
                    .output()
                    .map_err(|e| ScenarioError::Setup(format!("cannot run branchsync tls issue: {e}")))?;
                if !out.status.success() {
                    return Err(ScenarioError::Setup(format!("branchsync tls issue {} failed:\n{}{}", t.sites[i].name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))));
                }
            }
            t.client(i).await?.batch_execute(schema).await.map_err(|e| ScenarioError::Setup(format!("loading the schema at {}: {}", t.sites[i].name, super::pg_message(&e))))?;
            let out = Command::new(&t.exe).arg("init").arg("--config").arg(t.sites[i].config_path()).output().map_err(|e| ScenarioError::Setup(format!("cannot run branchsync init: {e}")))?;
            if !out.status.success() {
                return Err(ScenarioError::Setup(format!("branchsync init at {} failed:\n{}{}", t.sites[i].name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))));
            }
        }
        for i in 0..t.sites.len() {
            t.start_daemon(i)?;
        }
        Ok(t)
    }

    /// One line on what runs where.
    pub fn describe(&self) -> String {
        format!("local: {} throwaway PostgreSQL clusters ({}) and daemons on 127.0.0.1", self.sites.len(), self.pg_bin)
    }

    async fn client(&mut self, i: usize) -> Result<&tokio_postgres::Client, ScenarioError> {
        let site = &mut self.sites[i];
        if site.client.as_ref().is_none_or(|c| c.is_closed()) {
            site.client = None;
            let (client, conn) = tokio_postgres::connect(&site.cluster.url(), tokio_postgres::NoTls)
                .await
                .map_err(|e| ScenarioError::Site { site: site.name.clone(), message: format!("cannot connect to its database: {}", super::pg_message(&e)) })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            site.client = Some(client);
        }
        site.client.as_ref().ok_or_else(|| ScenarioError::Site { site: site.name.clone(), message: "no connection".into() })
    }

    /// Runs SQL (simple protocol; several statements allowed).
    pub async fn exec(&mut self, i: usize, sql: &str) -> Result<(), ScenarioError> {
        let name = self.sites[i].name.clone();
        self.client(i).await?.batch_execute(sql).await.map_err(|e| ScenarioError::Site { site: name, message: super::pg_message(&e) })
    }

    /// Rows of a query, every value as text.
    pub async fn query(&mut self, i: usize, sql: &str) -> Result<Vec<Vec<Option<String>>>, ScenarioError> {
        let name = self.sites[i].name.clone();
        let msgs = self.client(i).await?.simple_query(sql).await.map_err(|e| ScenarioError::Site { site: name, message: super::pg_message(&e) })?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|j| r.get(j).map(str::to_string)).collect()),
                _ => None,
            })
            .collect())
    }

    /// The daemon's `/status`, while it answers.
    pub async fn status(&self, i: usize) -> Option<serde_json::Value> {
        let body = crate::http::get(&format!("127.0.0.1:{}", self.sites[i].http_port), "/status").await.ok()?;
        serde_json::from_str(&body).ok()
    }

    /// Cuts branch `i`'s link: connections dropped, new ones refused.
    pub fn cut(&self, i: usize) {
        self.proxies[i - 1].cut();
    }

    /// Restores branch `i`'s link.
    pub fn restore(&self, i: usize) {
        self.proxies[i - 1].heal();
    }

    /// Starts the daemon of site `i`, its output appended to its log file.
    pub fn start_daemon(&mut self, i: usize) -> Result<(), ScenarioError> {
        let site = &mut self.sites[i];
        if site.daemon_running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(site.log_path())
            .map_err(|e| ScenarioError::Site { site: site.name.clone(), message: format!("cannot open the daemon log: {e}") })?;
        let err = log.try_clone().map_err(|e| ScenarioError::Site { site: site.name.clone(), message: format!("cannot open the daemon log: {e}") })?;
        let child = Command::new(&self.exe)
            .arg("run")
            .arg("--config")
            .arg(site.config_path())
            .env("BRANCHSYNC_LOG", std::env::var("BRANCHSYNC_LOG").unwrap_or_else(|_| "info".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| ScenarioError::Site { site: site.name.clone(), message: format!("cannot start the daemon: {e}") })?;
        site.daemon = Some(child);
        Ok(())
    }

    /// `kill -9` of the daemon of site `i`.
    pub fn kill_daemon(&mut self, i: usize) {
        self.sites[i].kill_daemon();
    }

    /// Immediate stop of site `i`'s PostgreSQL (a crash: recovery runs at
    /// the next start). Its daemon keeps running and reconnects.
    pub async fn crash_postgres(&mut self, i: usize) {
        self.sites[i].client = None;
        let site = &self.sites[i];
        let c: &LocalCluster = &site.cluster;
        // pg_ctl waits; keep the runtime free meanwhile.
        tokio::task::block_in_place(|| c.stop_immediate());
    }

    /// Starts site `i`'s PostgreSQL again.
    pub async fn start_postgres(&mut self, i: usize) -> Result<(), ScenarioError> {
        let site = &self.sites[i];
        tokio::task::block_in_place(|| site.cluster.start_server()).map_err(|e| ScenarioError::Site { site: site.name.clone(), message: e.to_string() })
    }

    /// `true` while site `i`'s daemon runs (it may have stopped on an error).
    pub fn daemon_running(&mut self, i: usize) -> bool {
        self.sites[i].daemon_running()
    }

    /// `branchsync verify` of site `i` (a branch), through its link.
    pub async fn verify(&mut self, i: usize) -> Result<(bool, String), ScenarioError> {
        let o = tokio::process::Command::new(&self.exe)
            .arg("verify")
            .arg("--config")
            .arg(self.sites[i].config_path())
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| ScenarioError::Site { site: self.sites[i].name.clone(), message: format!("cannot run branchsync verify: {e}") })?;
        // Its verdict is on stdout; stderr holds its progress log lines.
        let said = if o.status.success() { String::from_utf8_lossy(&o.stdout).into_owned() } else { format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)) };
        Ok((o.status.success(), said.trim().to_string()))
    }

    /// `branchsync preset show NAME` of this binary.
    pub async fn preset(&self, name: &str) -> Result<String, ScenarioError> {
        let o = tokio::process::Command::new(&self.exe)
            .args(["preset", "show", name])
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| ScenarioError::Setup(format!("cannot run branchsync preset show: {e}")))?;
        if !o.status.success() {
            return Err(ScenarioError::Setup(format!("branchsync preset show {name} failed: {}", String::from_utf8_lossy(&o.stderr).trim())));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The last `n` lines of site `i`'s daemon log.
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let text = std::fs::read_to_string(self.sites[i].log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stops the daemons (SIGTERM, so they drain), then drops everything.
    pub async fn teardown(mut self) {
        for s in &mut self.sites {
            if let Some(c) = s.daemon.as_ref() {
                let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            }
        }
        for _ in 0..100 {
            if self.sites.iter_mut().all(|s| !s.daemon_running()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Drop: kills what is left, stops and removes the clusters.
    }
}

/// A TCP relay between a branch and the main: `cut` drops its connections
/// and refuses new ones until `heal`; `stall` stops carrying one direction
/// (the relay neither reads nor writes it, as a peer that stopped reading
/// its socket), with the connection left open.
pub struct LinkProxy {
    /// The port the branch dials.
    pub port: u16,
    up: Arc<AtomicBool>,
    cut_tx: watch::Sender<u64>,
    to_main: watch::Sender<bool>,
    to_branch: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// One direction of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the branch to the main.
    ToMain,
    /// From the main to the branch.
    ToBranch,
}

/// Carries bytes one way while not stalled; ends when either side does.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut stalled: watch::Receiver<bool>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while *stalled.borrow_and_update() {
            if stalled.changed().await.is_err() {
                return;
            }
        }
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = stalled.changed() => {}
        }
    }
}

impl LinkProxy {
    /// Relays a free loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> std::io::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let (to_main, to_main_rx) = watch::channel(false);
        let (to_branch, to_branch_rx) = watch::channel(false);
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let mut cut = cut_rx.clone();
                // Only a cut after this connection was accepted ends it.
                cut.borrow_and_update();
                let (up_rx, down_rx) = (to_main_rx.clone(), to_branch_rx.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    let mut up = tokio::spawn(pump(ir, ow, up_rx));
                    let mut down = tokio::spawn(pump(or, iw, down_rx));
                    tokio::select! {
                        _ = &mut up => {}
                        _ = &mut down => {}
                        _ = cut.changed() => {}
                    }
                    up.abort();
                    down.abort();
                });
            }
        });
        Ok(LinkProxy { port, up, cut_tx, to_main, to_branch, task })
    }

    /// Drops every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut_tx.send_modify(|v| *v += 1);
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Stops (`true`) or resumes (`false`) carrying one direction of every
    /// relayed connection, now and for later ones.
    pub fn stall(&self, dir: Direction, stalled: bool) {
        match dir {
            Direction::ToMain => self.to_main.send_replace(stalled),
            Direction::ToBranch => self.to_branch.send_replace(stalled),
        };
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
