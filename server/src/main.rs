//! The `branchsync` binary: `init`, `run`, `status`, `conflicts`, `demo`,
//! `scenario run`.
//!
//! `main` does every synchronous, fallible step first (arguments, config,
//! logging), then runs the command and turns its outcome into an exit code
//! with a PostgreSQL-style report. `anyhow` is used only here, at the edge.

mod alloc;
mod config;
mod inspect;
mod join;
mod link;
mod node;
mod operator;
mod progress;
mod report;
mod status;

use branchsync_scenario as scenario;
use branchsync_server::{http, tls};

use std::path::PathBuf;
use std::sync::Arc;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use branchsync_engine::{setup, EngineError};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::Config;
use crate::link::{Admission, LinkTls, PeerAuth};
use crate::node::{Node, NodeSettings};

/// `branchsync tls` actions.
#[derive(Subcommand)]
enum TlsAction {
    /// At the main: write a shop's credentials (ca.pem, cert.pem, key.pem)
    /// into a directory, to copy into the shop's TLS directory. Issuing
    /// again renews them.
    Issue {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// The branch's node name.
        name: String,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = tls::DEFAULT_DAYS)]
        days: u32,
    },
    /// At the main: renew the main's own certificate.
    Renew {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = tls::DEFAULT_DAYS)]
        days: u32,
    },
    /// This node's certificate and CA: fingerprints and expiry.
    Show {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
    },
}

/// Multi-master, offline-first sync of PostgreSQL databases between a head
/// office (main) and shop branches.
#[derive(Parser)]
#[command(name = "branchsync", version)]
struct Cli {
    /// Log lines as text, or as one JSON object per line for log shippers
    /// (fields `timestamp`, `level`, `target`, `fields`, `spans`); or set
    /// BRANCHSYNC_LOG_FORMAT.
    #[arg(long, global = true, value_enum, default_value = "text", env = "BRANCHSYNC_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Prepare the database: check settings, create branchsync's schema,
    /// publication and slot, stripe sequences (idempotent).
    Init {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// The main's database was restored from a backup older than its
        /// log: capture goes on from the restored database, the branches
        /// re-send what the main lost (the daemon says when this is needed).
        #[arg(long)]
        restored: bool,
        /// The data directory's log was lost for good: bind this database
        /// to a new log (peers whose progress belongs to the old log must be
        /// re-seeded; the daemon says when this is needed).
        #[arg(long)]
        accept_new_log: bool,
    },
    /// The link's TLS credentials: issue a shop's, renew the main's, show.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },
    /// Run the daemon until SIGTERM or SIGINT (exit status 0); exit status 3
    /// when it stops on something the operator must fix (its log says what).
    Run {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
    },
    /// Show peers, pending changes and conflicts.
    Status {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A head office and two shops on this machine: a shop sells offline for
    /// a simulated day, reconnects, and everything lines up (the
    /// pos-offline scenario on throwaway local PostgreSQL clusters).
    Demo {
        /// Seed of the sales (printed by every run).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run scenarios: a topology, a workload, faults and checks (scenarios/*.toml).
    Scenario {
        #[command(subcommand)]
        action: ScenarioAction,
    },
    /// Capture: let it skip rows too large to carry.
    Capture {
        #[command(subcommand)]
        action: CaptureAction,
    },
    /// At a branch: compare its replicated tables with the main's while
    /// both keep selling, and list the rows that differ (exit status 0:
    /// every table agrees, 1: rows differ, 2: could not compare). The
    /// branch's daemon must be running.
    Verify {
        /// Node configuration (TOML) of the branch; or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// Only these tables (schema.table or table; repeat the option).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Print one JSON document (every difference) instead of text.
        #[arg(long)]
        json: bool,
        /// Longest wait, per settling, for both streams to pass the
        /// positions seen at a reading (seconds).
        #[arg(long, default_value_t = 300)]
        settle_timeout: u64,
        /// Make the rows that differ equal to the main's: the main sends
        /// its version of each (or its absence) to this branch in its own
        /// stream, recorded in its branchsync.conflicts (kind repaired).
        #[arg(long)]
        repair: bool,
    },
    /// At a new shop (its daemon stopped): copy the main's schema and
    /// replicated tables from one consistent snapshot while every site
    /// keeps selling, then prepare the database as init does; start the
    /// daemon afterwards. Run it again after an interruption: it resumes.
    /// Exit status 0 joined, 1 failed, 2 refused (the database holds data
    /// of its own).
    Join {
        /// Node configuration (TOML) of the shop; or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// Replace what this database and data directory hold (listed
        /// first; the old log is moved aside, never deleted): re-seeds a
        /// shop whose data directory was lost or whose database was
        /// restored from an old backup.
        #[arg(long)]
        discard_local: bool,
    },
    /// The ERP presets shipped with the binary (tables that stay local,
    /// conflict rules): show one, or list them.
    Preset {
        #[command(subcommand)]
        action: PresetAction,
    },
    /// Look at and settle recorded conflicts (branchsync.conflicts).
    Conflicts {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: ConflictsAction,
    },
}

#[derive(Subcommand)]
enum ScenarioAction {
    /// Run one scenario file; exit code 0 passed, 1 failed, 2 could not run.
    Run {
        /// The scenario (TOML), e.g. scenarios/pos-offline.toml.
        file: PathBuf,
        /// Where: throwaway local clusters, or the docker-compose stack.
        #[arg(long, value_enum, default_value = "local")]
        target: scenario::TargetKind,
        /// Print one JSON document at the end (the narrative goes to stderr).
        #[arg(long)]
        json: bool,
        /// Seed of the workload (default: the file's, else the time).
        #[arg(long)]
        seed: Option<u64>,
        /// The compose file (compose target; default: docker-compose.yml
        /// in the current directory or a parent).
        #[arg(long)]
        compose_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PresetAction {
    /// Print a shipped preset, every entry explained (`[preset] erp = NAME`
    /// brings it into a configuration).
    Show {
        /// The ERP: tryton or odoo.
        erp: String,
    },
    /// List the shipped presets and their versions.
    List,
}

#[derive(Subcommand)]
enum CaptureAction {
    /// Let capture skip the rows of one transaction that are larger than
    /// it carries ([log] max_row_bytes); capture names the transaction's
    /// LSN when it stops. Each skipped row is recorded in
    /// branchsync.conflicts (kind row_too_large); the rest replicates.
    Skip {
        /// Node configuration (TOML); or set BRANCHSYNC_CONFIG.
        #[arg(long, env = "BRANCHSYNC_CONFIG")]
        config: PathBuf,
        /// Commit LSN of the transaction, as capture printed it (e.g. 0/1A2B3C4).
        #[arg(long)]
        lsn: String,
    },
}

#[derive(Subcommand)]
enum ConflictsAction {
    /// Unresolved conflicts, newest first.
    List {
        /// Resolved ones too.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One conflict with both versions, as JSON.
    Show {
        /// The conflict's id (from `conflicts list`).
        id: i64,
    },
    /// Settle a conflict: keep the local version as it is, or write the
    /// remote (discarded) version back; the change replicates.
    Resolve {
        /// The conflict's id (from `conflicts list`).
        id: i64,
        /// Which version to keep.
        #[arg(long, value_enum)]
        keep: KeepArg,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KeepArg {
    Local,
    Remote,
}

/// mimalloc for small blocks, glibc for large ones ([`alloc`]).
#[global_allocator]
static ALLOCATOR: alloc::Split = alloc::Split;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BRANCHSYNC_LOG").unwrap_or_else(|_| {
        // The scenario runner narrates in its own words; its clients'
        // notices (a cluster shutting down at teardown) are noise there.
        let quiet = matches!(cli.command, Command::Demo { .. } | Command::Scenario { .. });
        tracing_subscriber::EnvFilter::new(if quiet { "warn" } else { "info" })
    });
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        // One object per line, spans included (R24: logs are read by log
        // shippers as well as by people).
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(true).init(),
        // No colour codes in files and journals.
        LogFormat::Text => logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("branchsync: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let daemon = matches!(cli.command, Command::Run { .. });
    match rt.block_on(try_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("branchsync: {}", describe(&e));
            // `run` fails here only on its configuration or credentials.
            if daemon {
                ExitCode::from(EXIT_OPERATOR_MUST_ACT)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The exit status of `branchsync run` when it stops on something the
/// operator must fix (configuration, credentials, a lost or restored
/// database, a definite error): starting it again as it is cannot help, so
/// a service manager should not (the packaged systemd unit sets
/// `RestartPreventExitStatus=3`). Any other failure (a crash) may be
/// restarted.
const EXIT_OPERATOR_MUST_ACT: u8 = 3;

/// The error and its causes, each said once (an error whose message already
/// quotes its cause, like "could not read … : No such file", is not followed
/// by the cause again).
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

async fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Tls { action } => {
            let (TlsAction::Issue { config, .. } | TlsAction::Renew { config, .. } | TlsAction::Show { config }) = &action;
            let cfg = Config::load(config)?;
            tls_command(&cfg, action)
        }
        Command::Init { config, restored, accept_new_log } => {
            let cfg = Config::load(&config)?;
            init(&cfg, restored, accept_new_log).await
        }
        Command::Capture { action: CaptureAction::Skip { config, lsn } } => {
            let cfg = Config::load(&config)?;
            let Some(at) = branchsync_engine::pg::parse_lsn(&lsn) else {
                eprintln!("branchsync capture skip: \"{lsn}\" is not an LSN (like 0/1A2B3C4)");
                return Ok(ExitCode::FAILURE);
            };
            let conn = connect_as_daemon(&cfg, "branchsync capture skip").await?;
            let new = setup::record_capture_skip(&conn.client, at, "recorded with branchsync capture skip").await?;
            println!(
                "{} capture may skip the rows too large to carry of the transaction at LSN {}; a running daemon picks this up within 10 s, and records each skipped row in branchsync.conflicts",
                if new { "recorded:" } else { "already recorded:" },
                branchsync_engine::pg::fmt_lsn(at)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            run(&cfg).await
        }
        Command::Status { config, json } => {
            let cfg = Config::load(&config)?;
            status(&cfg, json).await
        }
        Command::Demo { seed } => {
            let sc = scenario::Scenario::parse(scenario::spec::POS_OFFLINE, "pos-offline (built in)")?;
            let opts = scenario::RunOptions { target: scenario::TargetKind::Local, json: false, seed, compose_file: None };
            Ok(ExitCode::from(scenario::run_scenario(sc, opts).await.exit_code()))
        }
        Command::Scenario { action: ScenarioAction::Run { file, target, json, seed, compose_file } } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("branchsync scenario run: cannot read {}: {e}", file.display());
                    return Ok(ExitCode::from(2));
                }
            };
            let sc = match scenario::Scenario::parse(&text, &file.display().to_string()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("branchsync scenario run: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let opts = scenario::RunOptions { target, json, seed, compose_file };
            Ok(ExitCode::from(scenario::run_scenario(sc, opts).await.exit_code()))
        }
        Command::Verify { config, tables, json, settle_timeout, repair } => {
            let cfg = Config::load(&config)?;
            verify(&cfg, &tables, json, Duration::from_secs(settle_timeout), repair).await
        }
        Command::Preset { action: PresetAction::Show { erp } } => match config::PRESETS.iter().find(|(n, _)| *n == erp) {
            Some((_, text)) => {
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            None => {
                let names: Vec<&str> = config::PRESETS.iter().map(|(n, _)| *n).collect();
                eprintln!("branchsync preset show: no preset \"{erp}\"\nHINT: Shipped presets: {}.", names.join(", "));
                Ok(ExitCode::from(2))
            }
        },
        Command::Preset { action: PresetAction::List } => {
            for (name, _) in config::PRESETS {
                match config::Preset::shipped(name) {
                    Some(Ok(p)) => println!("{name:<8} version {:<10} {} local tables, {} [[tables]] entries", p.version, p.exclude.len(), p.tables.len()),
                    _ => println!("{name:<8} (does not parse)"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Join { config, discard_local } => {
            let cfg = Config::load(&config)?;
            if cfg.node.role != branchsync_engine::Role::Branch {
                eprintln!("branchsync join: run it at a shop, with the shop's configuration: it copies the main into that shop's database");
                return Ok(ExitCode::from(2));
            }
            let (_tx, admission_rx) = watch::channel(Arc::new(admission(&cfg)));
            let dial = inspect::Dial {
                node: cfg.node.name.clone(),
                token: cfg.token().unwrap_or_default().to_string(),
                main_addr: cfg.sync.main.clone().unwrap_or_default(),
                tls: link_tls(&cfg, &admission_rx)?,
                max_frame: cfg.sync.max_frame_bytes,
            };
            match join::join(&cfg, &dial, discard_local, &progress::Shown::new("join")).await {
                Ok(code) => Ok(code),
                Err(e) => {
                    eprintln!("branchsync join: {}", describe(&e));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Conflicts { config, action } => {
            let config = config.context("the configuration file is required: --config FILE or BRANCHSYNC_CONFIG")?;
            let cfg = Config::load(&config)?;
            conflicts(&cfg, action).await
        }
    }
}

async fn conflicts(cfg: &Config, action: ConflictsAction) -> anyhow::Result<ExitCode> {
    use branchsync_engine::conflict_log::{self, Keep, Resolved};
    let mut conn = connect_as_daemon(&cfg, "branchsync conflicts").await?;
    match action {
        ConflictsAction::List { all, limit, json } => {
            let list = conflict_log::list(&conn.client, all, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no {}conflicts recorded at node {}", if all { "" } else { "unresolved " }, cfg.node.name);
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:>6}  {:<20}  {:<18}  {:<24}  {:<16}  {:<12}  {:<12}  detail", "id", "at (UTC)", "kind", "table", "key", "winner", "loser");
            for c in &list {
                let detail: String = c.detail.clone().unwrap_or_default().chars().take(80).collect();
                println!(
                    "{:>6}  {:<20}  {:<18}  {:<24}  {:<16}  {:<12}  {:<12}  {}{}",
                    c.id,
                    c.at,
                    c.kind,
                    c.table,
                    c.key.clone().unwrap_or_default(),
                    c.winner.clone().unwrap_or_else(|| "-".into()),
                    c.loser.clone().unwrap_or_else(|| "-".into()),
                    detail,
                    if c.resolved_at.is_some() { " [resolved]" } else { "" }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ConflictsAction::Show { id } => match conflict_log::show(&conn.client, id).await? {
            Some(c) => {
                println!("{}", serde_json::to_string_pretty(&c)?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("branchsync conflicts show: conflict {id} does not exist at node {}", cfg.node.name);
                Ok(ExitCode::FAILURE)
            }
        },
        ConflictsAction::Resolve { id, keep } => {
            let keep = match keep {
                KeepArg::Local => Keep::Local,
                KeepArg::Remote => Keep::Remote,
            };
            match conflict_log::resolve(&mut conn.client, id, keep, &cfg.scope()?).await {
                Ok(Resolved::Marked) => println!("conflict {id} resolved: the local version stays"),
                Ok(Resolved::RowWritten) => println!("conflict {id} resolved: the remote version was written back and replicates"),
                Ok(Resolved::RowDeleted) => println!("conflict {id} resolved: the remote delete was applied and replicates"),
                Err(e) => {
                    eprintln!("branchsync conflicts resolve: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Connects as `[database] daemon_role`, as the daemon does.
async fn connect_as_daemon(cfg: &Config, app: &str) -> anyhow::Result<branchsync_engine::pg::PgConn> {
    branchsync_engine::pg::connect(&cfg.daemon_url(), app).await.with_context(|| {
        format!(
            "cannot connect to the database as role \"{}\" (database.url with database.daemon_role). Run branchsync init (as a superuser, with database.url) to create the role",
            cfg.database.daemon_role
        )
    })
}

/// The daemon role's password: the one `init` wrote before, else a new
/// random one, written (mode 0600) before it is set on the role.
fn daemon_password(cfg: &Config) -> anyhow::Result<String> {
    let path = cfg.daemon_password_path();
    if let Ok(pw) = std::fs::read_to_string(&path) {
        let pw = pw.trim().to_string();
        if !pw.is_empty() && pw.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(pw);
        }
    }
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let pw: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path).with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut f, pw.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(pw)
}

async fn init(cfg: &Config, restored: bool, accept_new_log: bool) -> anyhow::Result<ExitCode> {
    let mut conn = branchsync_engine::pg::connect(&cfg.database.url, "branchsync init").await.context("cannot connect to the database (database.url)")?;
    let params = setup::InitParams {
        node: cfg.node.name.clone(),
        index: cfg.node.index,
        role: cfg.node.role,
        stride: cfg.keys.stride,
        scope: cfg.scope()?,
    };
    let shown = progress::Shown::new("init");
    let report = match setup::init_with_progress(&mut conn.client, &params, &shown).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("branchsync init: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    std::fs::create_dir_all(&cfg.node.data_dir).with_context(|| format!("cannot create data directory {}", cfg.node.data_dir.display()))?;
    let daemon_role = setup::DaemonRole { name: cfg.database.daemon_role.clone(), password: Some(daemon_password(cfg)?), ddl_run_as: cfg.ddl.run_as.clone() };
    let role_report = match setup::grant_daemon_role(&mut conn.client, &daemon_role, &cfg.scope()?).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("branchsync init: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if accept_new_log {
        match setup::accept_new_log(&conn.client).await {
            Ok(old) => println!(
                "  this database gave up log {}: the daemon binds it to the log in {} at its next start. Peers whose progress belongs to the old log are refused and must be re-seeded.",
                old.unwrap_or_else(|| "(none)".into()),
                cfg.node.data_dir.join("log").display()
            ),
            Err(e) => {
                eprintln!("branchsync init: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    if restored {
        let log = match branchsync_engine::log::ChangeLog::open(&cfg.node.data_dir.join("log")) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("branchsync init: {e}");
                return Ok(ExitCode::FAILURE);
            }
        };
        match setup::restored(&conn.client, &log, &cfg.node.name, cfg.node.role).await {
            Ok(r) => println!(
                "  restored database: capture resumes after LSN {}; the relay log goes on; {} ChangeSet(s) the branches re-send are applied again here but not relayed again. Changes made at the main after the backup are lost here.",
                branchsync_engine::pg::fmt_lsn(r.resume_lsn),
                r.suppressed
            ),
            Err(e) => {
                eprintln!("branchsync init: {e}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    println!("initialised node \"{}\" ({}, index {}) on cluster {}", cfg.node.name, cfg.node.role, cfg.node.index, report.system_id);
    if let Some(from) = &report.seeded_from {
        println!("  found state copied from node \"{from}\": cleared it; this node resumes the main's relay where the copy was taken");
    }
    println!("  replicated tables: {}", report.tables.len());
    for t in &report.identity_full {
        println!("  REPLICA IDENTITY FULL set on {t} (every change carries its whole old row: the main decides against it)");
    }
    let changed = report.sequences.iter().filter(|s| s.changed).count();
    println!("  sequences striped: {} changed, {} already on stripe {} mod {}", changed, report.sequences.len() - changed, cfg.node.index, cfg.keys.stride);
    println!("  replication slot: {}", if report.slot_created { "created" } else { "exists" });
    println!(
        "  daemon role \"{}\" ({}, not a superuser): DML on {} replicated table(s){}; password in {}",
        cfg.database.daemon_role,
        if role_report.created { "created" } else { "exists" },
        role_report.tables,
        if role_report.member_of.is_empty() { String::new() } else { format!(", replays DDL as {}", role_report.member_of.join(", ")) },
        cfg.daemon_password_path().display()
    );
    for t in &role_report.row_security {
        println!("  WARNING: row-level security is enabled on {t}: its policies would hide rows from branchsync's role, so apply refuses its changes. Disable it, or exempt the role (ALTER ROLE {} BYPASSRLS).", cfg.database.daemon_role);
    }
    let looks_local: Vec<&String> = report.tables.iter().filter(|t| looks_site_local(t)).collect();
    if !looks_local.is_empty() {
        println!("  WARNING: replicated tables that look like a cache, a session store or a queue (one site's server, not the business):");
        for t in looks_local {
            println!("    {t}");
        }
        println!("  Add them to database.exclude at every site unless they must replicate (an ERP's [preset] lists its own).");
    }
    match setup::local_columns_without_default(&conn.client, &report.tables, &cfg.table_rules()?).await {
        Ok(cols) if !cols.is_empty() => {
            println!("  NOTE: site-local columns without a default here (a row created at another site arrives with NULL in them; fine for a time stamp or an author, not for a counter):");
            for c in cols {
                println!("    {c}");
            }
            println!("  Give a counter its start value (ALTER TABLE … ALTER COLUMN … SET DEFAULT 1, at the main: it reaches every site), and at each shop a prefix that shop's own (it stays there; at the main leave it, it would replicate).");
        }
        Ok(_) => {}
        Err(e) => println!("  WARNING: {e}"),
    }
    if !report.apply_time_code.is_empty() {
        println!("  WARNING: application code runs inside apply on replicated tables, with branchsync's database rights (SECURITY.md):");
        for c in &report.apply_time_code {
            println!("    {c}");
        }
    }
    init_tls(cfg)
}

/// A table name that usually holds one site's state: caches, sessions,
/// queues, locks, the web bus.
fn looks_site_local(table: &str) -> bool {
    let name = table.rsplit('.').next().unwrap_or(table).to_ascii_lowercase();
    ["cache", "session", "queue", "lock", "bus_bus", "presence", "login_attempt"].iter().any(|w| name.contains(w))
}

/// The link's credentials at `init`: the main creates the chain's CA and
/// its own certificate when its TLS directory holds none; a branch says
/// whether its credentials are in place.
fn init_tls(cfg: &Config) -> anyhow::Result<ExitCode> {
    if cfg.sync.insecure {
        println!("  TLS: off (sync.insecure = true): the link is not encrypted");
        return Ok(ExitCode::SUCCESS);
    }
    let dir = cfg.tls_dir();
    match cfg.node.role {
        branchsync_engine::Role::Main if tls::has_ca(&dir) => println!("  TLS: the chain's CA is in {}", dir.display()),
        branchsync_engine::Role::Main => {
            let info = tls::create_ca(&dir, &cfg.node.name).with_context(|| format!("cannot create the chain's CA in {}", dir.display()))?;
            println!("  TLS: created the chain's CA and the main's certificate in {} (valid until {})", dir.display(), info.not_after);
            println!("  issue each shop's credentials here with: branchsync tls issue <branch name> --out DIR (then copy DIR's files into the shop's TLS directory)");
        }
        branchsync_engine::Role::Branch => match tls::cert_info(&dir.join(tls::CERT)) {
            Ok(info) => println!("  TLS: this shop's certificate {} is valid until {}", info.fingerprint, info.not_after),
            Err(e) => {
                eprintln!("branchsync init: this shop has no TLS credentials: {e}");
                eprintln!("HINT:  At the main, run: branchsync tls issue {} --out DIR, and copy DIR's files into {}.", cfg.node.name, dir.display());
                return Ok(ExitCode::FAILURE);
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `branchsync tls …`.
fn tls_command(cfg: &Config, action: TlsAction) -> anyhow::Result<ExitCode> {
    let dir = cfg.tls_dir();
    match action {
        TlsAction::Issue { name, out, days, .. } => {
            anyhow::ensure!(cfg.node.role == branchsync_engine::Role::Main && tls::has_ca(&dir), "credentials are issued at the main, where the chain's CA is (no CA in {})", dir.display());
            if !cfg.sync.peers.iter().any(|p| p.name == name) {
                eprintln!("WARNING: \"{name}\" is not in this main's [[sync.peers]]: add it before the shop connects.");
            }
            let info = tls::issue_branch(&dir, &name, &out, i64::from(days.clamp(1, 3650)))?;
            println!("issued the credentials of branch \"{name}\" into {}", out.display());
            println!("  certificate {} valid until {}", info.fingerprint, info.not_after);
            println!("  copy ca.pem, cert.pem and key.pem into the shop's TLS directory ([tls] dir, default tls/ beside its configuration file); key.pem is secret");
            println!("  a shop renewed while connected goes on; its next session uses the new certificate");
        }
        TlsAction::Renew { days, .. } => {
            anyhow::ensure!(cfg.node.role == branchsync_engine::Role::Main && tls::has_ca(&dir), "branchsync tls renew renews the main's own certificate, at the main (a branch's is renewed by issuing it again: branchsync tls issue NAME at the main)");
            let info = tls::issue_main(&dir, days.clamp(1, 3650))?;
            println!("renewed the main's certificate: {} valid until {} (new sessions use it; the running ones go on)", info.fingerprint, info.not_after);
        }
        TlsAction::Show { .. } => {
            if cfg.sync.insecure {
                println!("TLS: off (sync.insecure = true)");
            }
            if dir.join(tls::CA_CERT).exists() {
                let ca = tls::cert_info(&dir.join(tls::CA_CERT))?;
                println!("CA:          {} ({}) valid until {}", ca.subject, ca.fingerprint, ca.not_after);
            }
            let me = tls::cert_info(&dir.join(tls::CERT))?;
            println!("certificate: {} ({}) valid until {}", me.subject, me.fingerprint, me.not_after);
            if me.expires_in_s < 30 * 86_400 {
                println!("WARNING: it expires in {} days: renew it", me.expires_in_s / 86_400);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a configuration admits: the branches the main accepts, the revoked
/// certificates, a branch's own token (reloaded on SIGHUP).
fn admission(cfg: &Config) -> Admission {
    Admission {
        peers: cfg.sync.peers.iter().map(|p| PeerAuth { name: p.name.clone(), index: p.index, token: p.token().to_string() }).collect(),
        revoked: cfg.tls.revoked.clone(),
        token: cfg.token().unwrap_or_default().to_string(),
    }
}

fn settings(cfg: &Config, admission: &watch::Receiver<Arc<Admission>>) -> anyhow::Result<NodeSettings> {
    Ok(NodeSettings {
        node: cfg.node.name.clone(),
        role: cfg.node.role,
        index: cfg.node.index,
        stride: cfg.keys.stride,
        data_dir: cfg.node.data_dir.clone(),
        db_url: cfg.daemon_url(),
        scope: cfg.scope()?,
        main_addr: cfg.sync.main.clone(),
        listen: cfg.sync.listen.clone(),
        admission: admission.clone(),
        http_listen: cfg.http.listen.clone(),
        heartbeat: Duration::from_millis(cfg.sync.heartbeat_ms),
        peer_timeout: Duration::from_millis(cfg.sync.peer_timeout_ms),
        reconnect_max: Duration::from_millis(cfg.sync.reconnect_max_ms),
        group_budget: Duration::from_millis(cfg.sync.apply_group_ms),
        max_frame: cfg.sync.max_frame_bytes,
        window: cfg.sync.window_bytes,
        log: branchsync_engine::log::LogOptions {
            keep_acked: Duration::from_secs(u64::from(cfg.log.keep_acked_days) * 86_400),
            max_bytes: cfg.log.max_bytes,
            ..Default::default()
        },
        fragment_rows: cfg.log.fragment_rows,
        fragment_bytes: cfg.log.fragment_bytes,
        max_row_bytes: cfg.log.max_row_bytes,
        capture_stream: cfg.database.capture == config::CaptureMode::Stream,
        capture_nice: cfg.database.capture_nice,
        audit_interval: Duration::from_millis(cfg.keys.audit_interval_ms.max(100)),
        ddl: branchsync_engine::ddl::DdlPolicy { from_any: cfg.ddl.from == config::DdlFrom::Any, run_as: cfg.ddl.run_as.clone() },
        tables: cfg.table_rules()?,
        preset: cfg.preset_version.clone(),
        retention: Duration::from_secs(u64::from(cfg.conflicts.tombstone_days) * 86_400),
        tls: link_tls(cfg, admission)?,
        max_stamp_ahead: Duration::from_secs(cfg.sync.max_stamp_ahead_s),
        http_token: cfg.http.token().map(str::to_string),
    })
}

/// The link's TLS from the config; the credentials are read once here, so
/// that a missing or unreadable file stops the start with its name.
fn link_tls(cfg: &Config, admission: &watch::Receiver<Arc<Admission>>) -> anyhow::Result<LinkTls> {
    if cfg.sync.insecure {
        tracing::warn!("sync.insecure = true: the link is NOT encrypted and peers are NOT authenticated by certificate; tokens and every row cross the network in clear");
        return Ok(LinkTls::Insecure);
    }
    let dir = cfg.tls_dir();
    Ok(match cfg.node.role {
        branchsync_engine::Role::Main => {
            // The revoked list as the configuration says now.
            let admission = admission.clone();
            let creds = tls::ServerCredentials::new(dir.clone(), move |d| tls::server_config(d, &admission.borrow().revoked));
            creds.get().with_context(|| format!("the main's TLS credentials in {} are not usable. Hint: branchsync init creates them when the directory holds none.", dir.display()))?;
            LinkTls::Main(std::sync::Arc::new(creds))
        }
        branchsync_engine::Role::Branch => {
            let creds = tls::ClientCredentials::new(dir.clone(), tls::client_config);
            creds.get().with_context(|| {
                format!("this shop's TLS credentials in {} are not usable. Hint: at the main run branchsync tls issue {} --out DIR and copy DIR's files into {}.", dir.display(), cfg.node.name, dir.display())
            })?;
            LinkTls::Branch(std::sync::Arc::new(creds))
        }
    })
}

async fn run(cfg: &Config) -> anyhow::Result<ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let (admission_tx, admission_rx) = watch::channel(Arc::new(admission(cfg)));
    // A database that is restarting (or not up yet after a reboot) is
    // waited for: the daemon must not depend on starting after PostgreSQL.
    // Anything else that stops the start is for the operator.
    let mut backoff = Duration::from_millis(200);
    let node = loop {
        match Node::start(settings(cfg, &admission_rx)?).await {
            Ok(n) => break n,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "cannot start yet; retrying");
                tokio::select! {
                    _ = term.recv() => return Ok(ExitCode::SUCCESS),
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                report_engine_error("cannot start", &e);
                return Ok(ExitCode::from(EXIT_OPERATOR_MUST_ACT));
            }
        }
    };
    if let Some(a) = node.http_addr {
        tracing::info!(addr = %a, "http status listening");
    }
    let shutdown = node_shutdown_handle(&node);
    let running = cfg.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                Some(()) = hup.recv() => reload(&running, &admission_tx),
            }
        }
        tracing::info!("stop requested; draining");
        shutdown();
    });
    match node.wait().await {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            report_engine_error("stopped", &e);
            Ok(ExitCode::from(EXIT_OPERATOR_MUST_ACT))
        }
    }
}

/// SIGHUP: reads the configuration file again. Who may connect (the main's
/// `[[sync.peers]]` and `[tls] revoked`) and a branch's own token take
/// effect at once, without touching the other links; any other change is
/// named and waits for a restart. A file that does not load changes
/// nothing.
///
/// `running` stays the configuration the daemon started with, so that a
/// change still waiting for a restart is named at every reload.
fn reload(running: &Config, admission_tx: &watch::Sender<Arc<Admission>>) {
    let path = running.path().to_path_buf();
    let new = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded: the file does not load; the daemon goes on with the configuration it has");
            return;
        }
    };
    let waiting = changes_needing_restart(running, &new);
    if !waiting.is_empty() {
        tracing::warn!(keys = ?waiting, "configuration reloaded in part: these changes take effect at the next restart");
    }
    let now = admission(&new);
    let changed = admission_tx.send_if_modified(|a| {
        if **a == now {
            return false;
        }
        *a = Arc::new(now);
        true
    });
    if !changed {
        tracing::info!("configuration reloaded: who may connect is unchanged");
    }
}

/// The sections whose change a reload cannot apply (everything but who
/// may connect), by name.
fn changes_needing_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let a = old;
    let mut b = new.clone();
    // What a reload applies (tokens print as *** and compare equal here).
    b.sync.peers = a.sync.peers.clone();
    b.tls.revoked = a.tls.revoked.clone();
    let sections: [(&'static str, String, String); 10] = [
        ("[node]", format!("{:?}", a.node), format!("{:?}", b.node)),
        ("[database]", format!("{:?}", a.database), format!("{:?}", b.database)),
        ("[sync]", format!("{:?}", a.sync), format!("{:?}", b.sync)),
        ("[http]", format!("{:?} {:?}", a.http, a.http.token()), format!("{:?} {:?}", b.http, b.http.token())),
        ("[keys]", format!("{:?}", a.keys), format!("{:?}", b.keys)),
        ("[ddl]", format!("{:?}", a.ddl), format!("{:?}", b.ddl)),
        ("[[tables]]", format!("{:?}", a.tables), format!("{:?}", b.tables)),
        ("[conflicts]", format!("{:?}", a.conflicts), format!("{:?}", b.conflicts)),
        ("[log]", format!("{:?}", a.log), format!("{:?}", b.log)),
        ("[tls]", format!("{:?}", a.tls), format!("{:?}", b.tls)),
    ];
    sections.into_iter().filter(|(_, x, y)| x != y).map(|(name, _, _)| name).collect()
}

fn node_shutdown_handle(node: &Node) -> impl FnOnce() + Send + 'static {
    let tx = node.shutdown_sender();
    move || {
        let _ = tx.send(true);
    }
}

fn report_engine_error(what: &str, e: &EngineError) {
    let mut msg = format!("branchsync run: {what}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!("\nCAUSE: {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    tracing::error!(error = %e, "{what}");
}

/// `branchsync verify`: exit status 0 when every table agrees, 1 when rows
/// differ, 2 when the comparison could not be made.
async fn verify(cfg: &Config, tables: &[String], json: bool, settle_timeout: Duration, repair: bool) -> anyhow::Result<ExitCode> {
    if cfg.node.role != branchsync_engine::Role::Branch {
        eprintln!("branchsync verify: run it at a branch, with the branch's configuration: it compares that branch with the main");
        return Ok(ExitCode::from(2));
    }
    let Some(http_addr) = cfg.http.listen.clone() else {
        eprintln!("branchsync verify: http.listen is not set\nDETAIL: verify asks this shop's daemon how far its capture is, to tell changes in flight from differences.\nHINT: Set [http] listen in the configuration and restart the daemon.");
        return Ok(ExitCode::from(2));
    };
    let (_tx, admission_rx) = watch::channel(Arc::new(admission(cfg)));
    let dial = inspect::Dial {
        node: cfg.node.name.clone(),
        token: cfg.token().unwrap_or_default().to_string(),
        main_addr: cfg.sync.main.clone().unwrap_or_default(),
        tls: link_tls(cfg, &admission_rx)?,
        max_frame: cfg.sync.max_frame_bytes,
    };
    let conn = connect_as_daemon(cfg, "branchsync verify").await?;
    let shown = progress::Shown::new("verify");
    let rules = cfg.table_rules()?;
    let r = inspect::verify(&dial, &conn.client, (http_addr, cfg.http.token().map(str::to_string)), tables, settle_timeout, repair, &rules, &shown).await;
    match r {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).context("cannot print the report")?);
            } else {
                print!("{}", inspect::render(&report, 50));
            }
            Ok(ExitCode::from(if report.tables_differing == 0 { 0 } else { 1 }))
        }
        Err(e) => {
            eprintln!("branchsync verify: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn status(cfg: &Config, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(addr) = &cfg.http.listen {
        if let Ok(body) = http::get_with_token(addr, "/status", cfg.http.token()).await {
            if json {
                println!("{body}");
            } else {
                let s: status::StatusSnapshot = serde_json::from_str(&body).context("the daemon answered /status with unexpected JSON")?;
                print!("{}", report::render_text(&s));
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
    // The daemon is not answering: show what the database knows.
    let conn = connect_as_daemon(&cfg, "branchsync status").await?;
    let sum = branchsync_engine::conflict_log::summary(&conn.client)
        .await
        .context("cannot read branchsync.conflicts, branchsync.parked or branchsync.ddl_log; has branchsync init (of this release) run?")?;
    let (conflicts, parked) = (sum.total(), sum.parked());
    let progress: Vec<serde_json::Value> = branchsync_engine::state::progress_list(&conn.client)
        .await
        .context("cannot read branchsync.progress")?
        .into_iter()
        .map(|(peer, pos, at)| serde_json::json!({"peer": peer, "applied_from_peer": pos, "updated_at": at}))
        .collect();
    let role = cfg.node.role.to_string();
    if json {
        println!("{}", serde_json::json!({"node": cfg.node.name, "role": role, "daemon_running": false, "conflicts_total": conflicts, "parked_total": parked, "progress": progress}));
    } else {
        println!("node {} ({role}): daemon not answering{}", cfg.node.name, cfg.http.listen.as_ref().map(|a| format!(" on {a}")).unwrap_or_else(|| " (http.listen not set)".into()));
        println!("  conflicts: {conflicts} recorded; parked: {parked} row(s) waiting");
        for p in &progress {
            println!("  applied from {}: position {} (at {})", p["peer"].as_str().unwrap_or("?"), p["applied_from_peer"], p["updated_at"].as_str().unwrap_or("?"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{describe, Config};

    #[test]
    fn tables_that_look_like_one_sites_state_are_named() {
        for t in ["public.ir_cache", "public.ir_session_wizard", "public.bus_bus", "public.res_user_login_attempt", "public.ir_queue"] {
            assert!(super::looks_site_local(t), "{t}");
        }
        for t in ["public.sale_order", "public.account_move", "public.stock_move", "public.party_party"] {
            assert!(!super::looks_site_local(t), "{t}");
        }
    }

    #[test]
    fn a_reload_names_what_waits_for_a_restart_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let main = |peers: &str, extra: &str| {
            let p = dir.path().join(format!("m{}.toml", peers.len() + extra.len()));
            std::fs::write(
                &p,
                format!("[node]\nname = \"main\"\nrole = \"main\"\nindex = 0\ndata_dir = \"/tmp/x\"\n[database]\nurl = \"host=x\"\n[sync]\nlisten = \"127.0.0.1:7070\"\n{peers}{extra}"),
            )
            .unwrap();
            Config::load(&p).unwrap()
        };
        let one = "[[sync.peers]]\nname = \"branch1\"\nindex = 1\ntoken = \"a\"\n";
        let two = "[[sync.peers]]\nname = \"branch1\"\nindex = 1\ntoken = \"b\"\n[[sync.peers]]\nname = \"branch2\"\nindex = 2\ntoken = \"c\"\n";
        let before = main(one, "");
        assert!(super::changes_needing_restart(&before, &main(two, "[tls]\nrevoked = [\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"]\n")).is_empty());
        assert_eq!(super::changes_needing_restart(&before, &main(one, "[log]\nmax_bytes = 1000000000\n[keys]\nstride = 50\n")), vec!["[keys]", "[log]"]);
        assert!(super::admission(&before) != super::admission(&main(two, "")));
    }

    #[test]
    fn an_error_that_quotes_its_cause_says_it_once() {
        let missing = std::path::Path::new("/nonexistent/branchsync.toml");
        let e = anyhow::Error::from(Config::load(missing).expect_err("no such file"));
        let text = describe(&e);
        assert_eq!(text.matches("No such file or directory").count(), 1, "{text}");
        let wrapped = anyhow::Error::from(std::io::Error::other("disk on fire")).context("cannot append");
        assert_eq!(describe(&wrapped), "cannot append: disk on fire");
    }
}
