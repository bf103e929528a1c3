//! Throwaway local PostgreSQL clusters: the one harness behind the test
//! suite ([`crate::test_utils`]) and `branchsync demo` / `branchsync
//! scenario run --target local`. The daemon itself never uses it.
//!
//! A [`LocalCluster`] is `initdb` into a fresh temp dir, a free loopback
//! port, `wal_level = logical`, `track_commit_timestamp = on` and enough
//! replication slots for a node; it is stopped (`pg_ctl stop -m immediate`)
//! and its directory removed on drop, so a failing test or an interrupted
//! demo cleans up too.
//!
//! When the process runs as root, `initdb` and `postgres` refuse to run; the
//! cluster then runs them as the `postgres` user (`runuser -u postgres`) in a
//! directory that user owns.
//!
//! `fsync = off` keeps them fast. It does not weaken the crash tests: an
//! immediate stop kills processes, it does not lose the operating system's
//! page cache, so crash recovery runs exactly as after a power-safe crash.
//! These clusters hold nothing anyone needs after they are dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a local cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries (initdb, postgres, pg_ctl) found.
    #[error(
        "PostgreSQL server binaries not found\nDETAIL: Looked for initdb, pg_ctl and postgres (version 15 or newer) in {searched}.\nHINT: Install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql; it need not run as a service), or set BRANCHSYNC_PG_BIN to the directory holding initdb and postgres."
    )]
    NotFound {
        /// Where we looked.
        searched: String,
    },
    /// The binaries found are too old.
    #[error("PostgreSQL {found} in {dir} is too old\nDETAIL: branchsync needs PostgreSQL 15 or newer.\nHINT: Install a newer server or point BRANCHSYNC_PG_BIN at one.")]
    TooOld {
        /// The version `postgres --version` printed.
        found: String,
        /// Its directory.
        dir: String,
    },
    /// Running as root without a `postgres` user to run the server as.
    #[error("running as root, but there is no \"postgres\" user to run the server as\nHINT: PostgreSQL refuses to run as root: create a postgres user, or run as an ordinary user.")]
    NoPostgresUser,
    /// A command failed.
    #[error("{what} failed: {status}\nDETAIL: {output}")]
    Command {
        /// What was run.
        what: String,
        /// Its exit status.
        status: String,
        /// The end of its output.
        output: String,
    },
    /// A file or directory could not be written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Directory of PostgreSQL 15+ server binaries: `BRANCHSYNC_PG_BIN`, else
/// the directory `pg_config --bindir` names, else the usual install places.
pub fn find_server_binaries() -> Result<PathBuf, ClusterError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("BRANCHSYNC_PG_BIN") {
        candidates.push(PathBuf::from(p));
    } else {
        for v in ["18", "17", "16", "15"] {
            candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")));
            candidates.push(PathBuf::from(format!("/usr/pgsql-{v}/bin")));
        }
        if let Ok(o) = Command::new("pg_config").arg("--bindir").stderr(Stdio::null()).output() {
            let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if o.status.success() && !dir.is_empty() {
                candidates.push(PathBuf::from(dir));
            }
        }
        candidates.extend(["/usr/local/pgsql/bin", "/usr/local/bin", "/usr/bin", "/opt/homebrew/bin"].map(PathBuf::from));
    }
    let mut too_old = None;
    for dir in &candidates {
        if !(dir.join("initdb").exists() && dir.join("pg_ctl").exists() && dir.join("postgres").exists()) {
            continue;
        }
        let version = Command::new(dir.join("postgres")).arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let major: u32 = version.split_whitespace().nth(2).and_then(|v| v.split('.').next()).and_then(|v| v.parse().ok()).unwrap_or(0);
        if major >= 15 {
            return Ok(dir.clone());
        }
        too_old.get_or_insert_with(|| ClusterError::TooOld { found: version, dir: dir.display().to_string() });
    }
    Err(too_old.unwrap_or_else(|| ClusterError::NotFound { searched: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ") }))
}

/// `true` when this process runs as root.
pub fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
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
    // config is written) must not be handed out again in this process.
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
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A throwaway PostgreSQL cluster on loopback; stopped and removed on drop.
pub struct LocalCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
    /// Environment of the server process (for example a faked clock).
    env: std::sync::Mutex<Vec<(String, String)>>,
}

impl LocalCluster {
    /// Creates and starts a cluster with the settings branchsync needs, plus
    /// `extra_conf` lines of `postgresql.conf`.
    pub fn create(extra_conf: &[&str]) -> Result<LocalCluster, ClusterError> {
        let bin = find_server_binaries()?;
        let as_root = running_as_root();
        if as_root && !Command::new("id").arg("postgres").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
            return Err(ClusterError::NoPostgresUser);
        }
        let dir = tempfile::Builder::new().prefix("branchsync-pg-").tempdir().map_err(io("cannot create a temp dir for a cluster"))?;
        let c = LocalCluster { dir, bin, port: free_port(), as_root, env: std::sync::Mutex::new(Vec::new()) };
        if as_root {
            run_checked("chown of the cluster directory", Command::new("chown").args(["-R", "postgres:postgres"]).arg(c.dir.path()))?;
        }
        let data = c.data_dir();
        let mut initdb = c.pg_command("initdb");
        initdb.args(["-D"]).arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run_checked("initdb", &mut initdb)?;
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\ntrack_commit_timestamp = on\nmax_replication_slots = 16\n\
             max_wal_senders = 16\nfsync = off\nsynchronous_commit = on\nshared_buffers = 64MB\n\
             max_connections = 60\nwal_sender_timeout = 5s\nlogging_collector = off\n",
            c.port,
            c.dir.path().display()
        );
        for l in extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .map_err(io("cannot write postgresql.conf"))?;
        c.start_server()?;
        Ok(c)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the cluster (owned by the server's user).
    pub fn base_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The directory of the server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq-style connection string for database `postgres`.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    /// `bin` of the server binaries, as the server's user.
    fn pg_command(&self, bin: &str) -> Command {
        let path = self.bin.join(bin);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) -> Result<(), ClusterError> {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).arg("-l").arg(self.dir.path().join("server.log")).args(["-w", "-t", "60", "start"]);
        for (k, v) in self.env.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            c.env(k, v);
        }
        run_checked("pg_ctl start", &mut c).map_err(|e| match e {
            ClusterError::Command { what, status, output } => {
                let log = self.server_log();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                ClusterError::Command { what, status, output: format!("{output}\nserver log (end):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")) }
            }
            e => e,
        })
    }

    /// Restarts the server with this environment (kept for later starts).
    pub fn restart_with_env(&self, env: Vec<(String, String)>) -> Result<(), ClusterError> {
        self.stop_fast();
        *self.env.lock().unwrap_or_else(|e| e.into_inner()) = env;
        self.start_server()
    }

    /// Stops the server like a crash (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) {
        self.stop("immediate");
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`).
    pub fn stop_fast(&self) {
        self.stop("fast");
    }

    fn stop(&self, mode: &str) {
        let mut c = self.pg_command("pg_ctl");
        c.arg("-D").arg(self.data_dir()).args(["-w", "-m", mode, "stop"]);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    /// Copies the (stopped) data directory to `name` inside this cluster's
    /// base directory, keeping ownership; used to simulate restores.
    pub fn snapshot_data(&self, name: &str) -> Result<PathBuf, ClusterError> {
        let dest = self.dir.path().join(name);
        run_checked("copy of the data directory", Command::new("cp").arg("-a").arg(self.data_dir()).arg(&dest))?;
        Ok(dest)
    }

    /// Replaces the (stopped) data directory with an earlier snapshot.
    pub fn restore_data(&self, snapshot: &Path) -> Result<(), ClusterError> {
        let data = self.data_dir();
        std::fs::remove_dir_all(&data).map_err(io("cannot remove the data directory"))?;
        run_checked("copy of a snapshot", Command::new("cp").arg("-a").arg(snapshot).arg(&data))
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}

fn run_checked(what: &str, c: &mut Command) -> Result<(), ClusterError> {
    let out = c.output().map_err(io(format!("cannot run {what}")))?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    Err(ClusterError::Command { what: what.to_string(), status: out.status.to_string(), output: tail.into_iter().rev().collect::<Vec<_>>().join("\n") })
}
