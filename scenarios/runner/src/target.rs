//! Where a scenario runs: the same steps on throwaway local clusters or on
//! the docker-compose stack. Sites are numbered: 0 is the main, `i` is
//! branch `i`.

use super::compose::ComposeTarget;
use super::local::LocalTarget;
use super::ScenarioError;

/// A running topology the runner acts on.
pub enum Target {
    /// Throwaway clusters and daemons on this machine.
    Local(LocalTarget),
    /// The docker-compose stack (`main`, `branch1`, `branch2`).
    Compose(ComposeTarget),
}

impl Target {
    /// One line on what runs where.
    pub fn describe(&self) -> String {
        match self {
            Target::Local(t) => t.describe(),
            Target::Compose(t) => t.describe(),
        }
    }

    /// Runs SQL at site `i` (simple protocol; several statements allowed).
    pub async fn exec(&mut self, i: usize, sql: &str) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => t.exec(i, sql).await,
            Target::Compose(t) => t.exec(i, sql).await,
        }
    }

    /// Rows of a query at site `i`, every value as text (NULL as `None`).
    pub async fn query(&mut self, i: usize, sql: &str) -> Result<Vec<Vec<Option<String>>>, ScenarioError> {
        match self {
            Target::Local(t) => t.query(i, sql).await,
            Target::Compose(t) => t.query(i, sql).await,
        }
    }

    /// The daemon's `/status` at site `i`, while it answers.
    pub async fn status(&self, i: usize) -> Option<serde_json::Value> {
        match self {
            Target::Local(t) => t.status(i).await,
            Target::Compose(t) => t.status(i).await,
        }
    }

    /// Cuts branch `i`'s link to the main.
    pub async fn cut(&mut self, i: usize) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => {
                t.cut(i);
                Ok(())
            }
            Target::Compose(t) => t.cut(i).await,
        }
    }

    /// Restores branch `i`'s link.
    pub async fn restore(&mut self, i: usize) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => {
                t.restore(i);
                Ok(())
            }
            Target::Compose(t) => t.restore(i).await,
        }
    }

    /// `kill -9` of site `i`'s daemon.
    pub async fn kill_daemon(&mut self, i: usize) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => {
                t.kill_daemon(i);
                Ok(())
            }
            Target::Compose(t) => t.kill_daemon(i).await,
        }
    }

    /// Starts site `i`'s daemon again.
    pub async fn start_daemon(&mut self, i: usize) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => t.start_daemon(i),
            Target::Compose(t) => t.start_daemon(i).await,
        }
    }

    /// Crashes site `i`'s PostgreSQL.
    pub async fn crash_postgres(&mut self, i: usize) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => {
                t.crash_postgres(i).await;
                Ok(())
            }
            Target::Compose(t) => t.crash_postgres(i).await,
        }
    }

    /// Starts site `i`'s PostgreSQL again.
    pub async fn start_postgres(&mut self, i: usize) -> Result<(), ScenarioError> {
        match self {
            Target::Local(t) => t.start_postgres(i).await,
            Target::Compose(t) => t.start_postgres(i).await,
        }
    }

    /// `n` sales through site `i`'s Tryton server dated `date`: per sale its
    /// receipt and account-move numbers. The compose stack's erp profile
    /// only (a scenario with `erp` is refused on the local target).
    pub async fn tryton_sell(&mut self, i: usize, n: u32, date: Option<&str>) -> Result<Vec<(String, String)>, ScenarioError> {
        match self {
            Target::Local(_) => Err(ScenarioError::Setup("selling through Tryton needs the compose target (its erp profile)\nHINT: Run the scenario with --target compose.".into())),
            Target::Compose(t) => t.tryton_sell(i, n, date).await,
        }
    }

    /// `branchsync verify` at site `i` (a branch): whether every replicated
    /// table agrees with the main's, and what it printed.
    pub async fn verify(&mut self, i: usize) -> Result<(bool, String), ScenarioError> {
        match self {
            Target::Local(t) => t.verify(i).await,
            Target::Compose(t) => t.verify(i).await,
        }
    }

    /// The text of the ERP preset `name` as the sites' binary ships it.
    pub async fn preset(&self, name: &str) -> Result<String, ScenarioError> {
        match self {
            Target::Local(t) => t.preset(name).await,
            Target::Compose(t) => t.preset(name).await,
        }
    }

    /// The last `n` lines of site `i`'s daemon log (for a failure report).
    pub async fn log_tail(&self, i: usize, n: usize) -> String {
        match self {
            Target::Local(t) => t.log_tail(i, n),
            Target::Compose(t) => t.log_tail(i, n).await,
        }
    }

    /// Stops and removes everything the target started.
    pub async fn teardown(self) {
        match self {
            Target::Local(t) => t.teardown().await,
            Target::Compose(t) => t.teardown().await,
        }
    }
}
