//! Throwaway PostgreSQL clusters for tests (feature `test-utils`).
//!
//! Every test starts its own cluster: `initdb` into a temp dir, a free
//! loopback port, `wal_level = logical`, `track_commit_timestamp = on`, and
//! enough replication slots for a node. [`PgCluster`] stops the server with
//! `pg_ctl stop -m immediate` and removes the directory on drop, so a failing
//! test cleans up too.
//!
//! When the test process runs as root, `initdb` and `postgres` refuse to run;
//! the harness then runs them as the `postgres` user (`runuser -u postgres`)
//! in a directory that user owns.
//!
//! `fsync = off` keeps tests fast. It does not weaken the crash tests: an
//! immediate stop kills processes, it does not lose the operating system's
//! page cache, so crash recovery runs exactly as after a power-safe crash.
//! Set `BRANCHSYNC_PG_BIN` to use other server binaries.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Directory of the PostgreSQL server binaries.
pub fn pg_bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("BRANCHSYNC_PG_BIN") {
        return PathBuf::from(p);
    }
    for v in ["17", "16", "15"] {
        let p = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if p.join("initdb").exists() {
            return p;
        }
    }
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A free TCP port on the loopback interface, chosen below Linux's
/// ephemeral range (32768–60999): a port handed out by `bind(0)` could be
/// taken by any outgoing connection's local end before the server that was
/// meant to listen on it starts.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0) ^ (u64::from(std::process::id()) << 20);
    // A port handed out but not bound yet (a daemon starts seconds after its
    // config is written) must not be handed out again to another test of
    // this process.
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_add(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let port = 20_000 + (n >> 40) as u16 % 12_000;
        let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.push(port);
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
    l.local_addr().expect("local addr").port()
}

/// A throwaway PostgreSQL cluster; stopped and removed on drop.
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    as_root: bool,
    /// Extra `postgresql.conf` lines given at creation.
    extra_conf: Vec<String>,
    /// Environment of the server process (for example a faked clock).
    env: std::sync::Mutex<Vec<(String, String)>>,
}

impl PgCluster {
    /// Creates and starts a cluster with the settings branchsync needs.
    pub fn start() -> PgCluster {
        Self::start_with(&[])
    }

    /// Creates and starts a cluster with extra `postgresql.conf` lines
    /// (for example `"wal_level = replica"` to test a misconfigured server).
    pub fn start_with(extra_conf: &[&str]) -> PgCluster {
        let as_root = running_as_root();
        let dir = tempfile::Builder::new().prefix("branchsync-pg-").tempdir().expect("temp dir");
        if as_root {
            run_checked(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()));
        }
        let port = free_port();
        let c = PgCluster {
            dir,
            port,
            as_root,
            extra_conf: extra_conf.iter().map(|s| s.to_string()).collect(),
            env: std::sync::Mutex::new(Vec::new()),
        };
        let data = c.data_dir();
        let mut initdb = c.pg_command("initdb");
        initdb.args(["-D"]).arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run_checked(&mut initdb);
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\ntrack_commit_timestamp = on\nmax_replication_slots = 16\n\
             max_wal_senders = 16\nfsync = off\nsynchronous_commit = on\nshared_buffers = 64MB\n\
             max_connections = 60\nwal_sender_timeout = 5s\nlogging_collector = off\n",
            c.dir.path().display()
        );
        for l in &c.extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .expect("write postgresql.conf");
        c.start_server();
        c
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the cluster (owned by the server's user).
    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq-style connection string for database `postgres`.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    fn pg_command(&self, bin: &str) -> Command {
        let path = pg_bin_dir().join(bin);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).arg("-l").arg(self.dir.path().join("server.log")).args(["-w", "-t", "60", "start"]);
        for (k, v) in self.env.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            c.env(k, v);
        }
        run_checked(&mut c);
    }

    /// Restarts the server with this environment (kept for later starts):
    /// for example [`faked_clock`] to run its clock ahead.
    pub fn restart_with_env(&self, env: Vec<(String, String)>) {
        self.stop_fast();
        *self.env.lock().unwrap_or_else(|e| e.into_inner()) = env;
        self.start_server();
    }

    /// Stops the server like a crash (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).args(["-w", "-m", "immediate", "stop"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Stops the server cleanly.
    pub fn stop_fast(&self) {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).args(["-w", "-m", "fast", "stop"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Copies the (stopped) data directory to `dest` inside this cluster's
    /// base directory, keeping ownership; used to simulate restores.
    pub fn snapshot_data(&self, name: &str) -> PathBuf {
        let dest = self.dir.path().join(name);
        run_checked(Command::new("cp").arg("-a").arg(self.data_dir()).arg(&dest));
        dest
    }

    /// Replaces the (stopped) data directory with an earlier snapshot.
    pub fn restore_data(&self, snapshot: &Path) {
        let data = self.data_dir();
        std::fs::remove_dir_all(&data).expect("remove data dir");
        run_checked(Command::new("cp").arg("-a").arg(snapshot).arg(&data));
    }

    /// The server log so far (for failure messages).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Connects to database `postgres` and spawns the connection task.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}

/// Environment that runs a process's clock `offset` ahead (libfaketime, for
/// example `"+1h"`), as a shop PC with a wrong clock.
///
/// # Panics
///
/// When libfaketime is not installed (`apt-get install faketime`;
/// `bash tests/run.sh` installs it).
pub fn faked_clock(offset: &str) -> Vec<(String, String)> {
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime not found: install the Debian package faketime (bash tests/run.sh does)");
    vec![("LD_PRELOAD".into(), lib.into()), ("FAKETIME".into(), offset.into()), ("FAKETIME_DONT_RESET".into(), "1".into())]
}

/// Connects with a libpq-style string, retrying for a few seconds while the
/// server starts, and spawns the connection task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connect to {url}: {e}"),
        }
    }
}

fn run_checked(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("run {c:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{c:?} failed: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
