//! Scenarios: a chain of shops in one command. `branchsync scenario run
//! FILE` sets up a main and its branches on a [`Target`] (throwaway local
//! clusters, or the docker-compose stack), plays the file's steps — sales,
//! master-data edits, a module install, cut links, killed daemons, crashed
//! databases — narrating what happens and how much is pending where, then
//! checks the data at every site and prints a verdict. `branchsync demo` is
//! the `pos-offline` scenario on the local target.
//!
//! ```text
//!   Scenario (spec.rs) --> Runner (run.rs) --steps--> Target (local.rs | compose.rs)
//!                            |  tally of every sale and stock movement it made
//!                            +--> checks (checks.rs): data compared across sites
//! ```
//!
//! # What it must never do
//!
//! Touch anything it did not create: the local target works only in its own
//! temp dirs and ports, the compose target only in its own compose project.
//! Everything is removed at the end, also after a failure or Ctrl-C.
//!
//! # Why a pass means something
//!
//! The checks compare data, never logs: per-table checksums across sites,
//! each sale the runner made looked up at the main by its tag, every
//! product's stock against the runner's own tally of deliveries and sales.
//! A failed check names the site and table and shows how they differ.

mod checks;
pub mod compose;
mod http;
pub mod local;
mod run;
pub mod spec;
pub mod target;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

pub use spec::Scenario;
pub use target::Target;

/// Why a scenario could not run or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The topology could not be set up (exit 2: nothing was tested).
    #[error("{0}")]
    Setup(String),
    /// A step failed at a site.
    #[error("at {site}: {message}")]
    Site {
        /// Where.
        site: String,
        /// What went wrong.
        message: String,
    },
    /// A wait ran out of time.
    #[error("timed out after {secs} s waiting until {what}\n{detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// After how long.
        secs: u64,
        /// Where things stood.
        detail: String,
    },
}

/// A PostgreSQL error as its message (with detail), not the driver's
/// wrapper text.
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => match d.detail() {
            Some(detail) => format!("{}\nDETAIL: {detail}", d.message()),
            None => d.message().to_string(),
        },
        None => e.to_string(),
    }
}

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// Throwaway PostgreSQL clusters and daemons on this machine.
    Local,
    /// The docker-compose stack of docker-compose.yml.
    Compose,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where.
    pub target: TargetKind,
    /// Print one JSON document at the end (the narrative goes to stderr).
    pub json: bool,
    /// Seed of the workload (overrides the file's).
    pub seed: Option<u64>,
    /// docker-compose.yml (compose target); default: found from the
    /// current directory upwards.
    pub compose_file: Option<PathBuf>,
}

/// The verdict: exit code 0 passed, 1 failed, 2 could not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every step ran and every check held.
    Passed,
    /// A step failed or a check did not hold.
    Failed,
    /// The scenario could not be set up.
    NotRun,
}

impl Verdict {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Passed => 0,
            Verdict::Failed => 1,
            Verdict::NotRun => 2,
        }
    }
}

/// Prints the narrative: `[  12.3s] site: what happens`, to stdout, or to
/// stderr when the JSON document owns stdout. Every line is also kept for
/// the JSON document.
pub struct Narrator {
    json: bool,
    start: Instant,
    events: Mutex<Vec<serde_json::Value>>,
}

impl Narrator {
    fn new(json: bool) -> Narrator {
        Narrator { json, start: Instant::now(), events: Mutex::new(Vec::new()) }
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// A line of narrative, with the time since the start.
    pub fn say(&self, site: Option<&str>, text: &str) {
        let t = self.elapsed();
        let line = match site {
            Some(s) => format!("[{t:6.1}s] {s}: {text}"),
            None => format!("[{t:6.1}s] {text}"),
        };
        self.raw(&line);
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(serde_json::json!({"t": (t * 10.0).round() / 10.0, "site": site, "text": text}));
    }

    /// Text as it is (headings, tables), not kept as an event.
    pub fn raw(&self, text: &str) {
        if self.json {
            let _ = writeln!(std::io::stderr(), "{text}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Runs `sc` and prints its narrative, checks, site table and verdict.
/// Ctrl-C stops it, removes what it set up and counts as failed.
pub async fn run_scenario(sc: Scenario, opts: RunOptions) -> Verdict {
    let n = Narrator::new(opts.json);
    let seed = opts.seed.or(sc.seed).unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1));
    n.raw(&format!("scenario {}: {}", sc.name, sc.description.trim()));
    n.raw(&format!("  sites: {}; seed {seed} (replay with --seed {seed})", sc.sites().join(", ")));
    let report = tokio::select! {
        r = run::run(&sc, &opts, seed, &n) => r,
        _ = tokio::signal::ctrl_c() => {
            // Dropping the run's future dropped the target: daemons killed,
            // clusters stopped and removed (compose: see compose.rs).
            n.say(None, "interrupted (Ctrl-C); everything it started is being removed");
            run::Report::interrupted()
        }
    };
    let verdict = report.verdict;
    if opts.json {
        let doc = serde_json::json!({
            "scenario": sc.name,
            "description": sc.description.trim(),
            "target": format!("{:?}", opts.target).to_lowercase(),
            "seed": seed,
            "passed": verdict == Verdict::Passed,
            "verdict": format!("{verdict:?}").to_lowercase(),
            "failure": report.failure,
            "duration_s": (n.elapsed() * 10.0).round() / 10.0,
            "events": n.events(),
            "checks": report.checks,
            "sites": report.sites,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    verdict
}
