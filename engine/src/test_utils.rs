//! Test helpers (feature `test-utils`): throwaway PostgreSQL clusters that
//! panic instead of returning errors, connections that wait for a starting
//! server, and polling with a deadline.
//!
//! Every test starts its own cluster ([`crate::cluster::LocalCluster`]: a
//! temp dir, a free loopback port, `wal_level = logical`,
//! `track_commit_timestamp = on`), stopped and removed on drop, so a failing
//! test cleans up too. Set `BRANCHSYNC_PG_BIN` to use other server binaries.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cluster::LocalCluster;
pub use crate::cluster::free_port;

/// Directory of the PostgreSQL server binaries.
///
/// # Panics
///
/// When there are none (the message says how to install them).
pub fn pg_bin_dir() -> PathBuf {
    crate::cluster::find_server_binaries().unwrap_or_else(|e| panic!("{e}"))
}

/// A throwaway PostgreSQL cluster ([`LocalCluster`]) whose operations panic
/// on failure, as a test wants; stopped and removed on drop.
pub struct PgCluster(LocalCluster);

impl std::ops::Deref for PgCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.0
    }
}

impl PgCluster {
    /// Creates and starts a cluster with the settings branchsync needs.
    pub fn start() -> PgCluster {
        Self::start_with(&[])
    }

    /// Creates and starts a cluster with extra `postgresql.conf` lines
    /// (for example `"wal_level = replica"` to test a misconfigured server).
    pub fn start_with(extra_conf: &[&str]) -> PgCluster {
        PgCluster(LocalCluster::create(extra_conf).unwrap_or_else(|e| panic!("cannot start a test cluster: {e}")))
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        self.0.start_server().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Restarts the server with this environment (kept for later starts):
    /// for example [`faked_clock`] to run its clock ahead.
    pub fn restart_with_env(&self, env: Vec<(String, String)>) {
        self.0.restart_with_env(env).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Copies the (stopped) data directory to `dest` inside this cluster's
    /// base directory, keeping ownership; used to simulate restores.
    pub fn snapshot_data(&self, name: &str) -> PathBuf {
        self.0.snapshot_data(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Replaces the (stopped) data directory with an earlier snapshot.
    pub fn restore_data(&self, snapshot: &Path) {
        self.0.restore_data(snapshot).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Connects to database `postgres` and spawns the connection task.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
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
