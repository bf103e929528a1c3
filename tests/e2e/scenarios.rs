//! The scenario runner, as a person evaluating branchsync uses it: the
//! `branchsync` binary runs each shipped scenario on the local target (its
//! own throwaway clusters and daemons) and must pass; a scenario built to
//! diverge must fail, exit non-zero and say which site and table differ and
//! how; a machine without PostgreSQL gets a plain message, not a panic.
//!
//! The runner is a black box here: only its exit code, its narrative
//! (stderr with `--json`, stdout without) and its JSON document count.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use branchsync_tests::branchsync_bin;

/// The repository root (scenario files are given relative to it).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Runs `branchsync ARGS` in the repository root, killing it after
/// `limit` (a scenario bounds its own waits; this only stops a hang).
fn branchsync(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = Command::new(branchsync_bin());
    cmd.args(args).current_dir(repo()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start branchsync");
    // Drain the pipes on threads so a chatty run cannot block on them.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut v).ok();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut v).ok();
        v
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for branchsync") {
            break s;
        }
        if started.elapsed() > limit {
            // SIGINT first: the runner tears its clusters down on Ctrl-C.
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let s = child.wait().expect("wait for branchsync");
            panic!("branchsync {} still running after {limit:?}; stopped it ({s})", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() }
}

/// Runs a scenario with `--json`: (exit code, narrative, JSON document).
fn run_scenario(file: &Path) -> (i32, String, serde_json::Value) {
    let file = file.to_string_lossy().to_string();
    let out = branchsync(&["scenario", "run", &file, "--target", "local", "--json"], &[], Duration::from_secs(600));
    let narrative = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    println!("--- narrative of {file} ---\n{narrative}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("stdout of --json is not one JSON document ({e}):\n{stdout}"));
    (out.status.code().unwrap_or(-1), narrative, doc)
}

/// A shipped scenario passes, every check holds, and the narrative shows
/// its parts: setup, steps, checks, the site table, the verdict.
fn shipped_scenario_passes(name: &str) {
    let (code, narrative, doc) = run_scenario(&repo().join("scenarios").join(format!("{name}.toml")));
    assert_eq!(code, 0, "scenario {name} must pass:\n{narrative}");
    assert_eq!(doc["scenario"], name);
    assert_eq!(doc["verdict"], "passed", "{doc:#}");
    let checks = doc["checks"].as_array().expect("checks");
    assert!(checks.iter().any(|c| c["check"] == "converged"), "{doc:#}");
    assert!(checks.iter().all(|c| c["passed"] == true), "{doc:#}");
    let sites = doc["sites"].as_array().expect("sites");
    assert_eq!(sites.len(), 3, "{doc:#}");
    // Every site ends with the same row count in every table, and the sales.
    let orders: Vec<&serde_json::Value> = sites.iter().map(|s| &s["rows"]["orders"]).collect();
    assert!(orders[0].as_u64().is_some_and(|n| n > 0) && orders.iter().all(|n| *n == orders[0]), "{doc:#}");
    for part in ["setting up main, branch1, branch2", "waiting until every site holds the same rows", "checks", "sites", &format!("PASSED: scenario {name}")] {
        assert!(narrative.contains(part), "the narrative lacks {part:?}:\n{narrative}");
    }
    assert!(!narrative.contains("panicked"), "{narrative}");
}

#[test]
fn scenario_module_install_passes() {
    shipped_scenario_passes("module-install");
}

#[test]
fn scenario_flapping_link_passes() {
    shipped_scenario_passes("flapping-link");
}

#[test]
fn scenario_crash_recovery_passes() {
    shipped_scenario_passes("crash-recovery");
}

/// `branchsync demo` is `pos-offline`, embedded: run exactly as the README
/// writes it, it passes and tells a newcomer what happened.
#[test]
fn the_demo_passes_and_tells_the_story() {
    let out = branchsync(&["demo"], &[], Duration::from_secs(600));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    println!("--- branchsync demo ---\n{text}\n--- stderr ---\n{err}");
    assert_eq!(out.status.code(), Some(0), "the demo must pass");
    for part in [
        "scenario pos-offline",
        "creating 3 PostgreSQL clusters",
        "branch1: link to the main cut (the shop keeps working offline)",
        "while offline",
        "branch1: link to the main restored",
        "ok     converged",
        "ok     verified",
        "ok     sales_at_main",
        "ok     stock",
        "ok     key_stripes",
        "PASSED: scenario pos-offline",
        "removing everything the scenario set up",
    ] {
        assert!(text.contains(part), "the demo's output lacks {part:?}");
    }
    // Nothing but the narrative: no log lines, no panics on the terminal.
    assert!(!err.contains(" INFO ") && !err.contains("panicked"), "stray output on stderr:\n{err}");
    // The same text as the shipped file (the binary embeds it).
    let shipped = std::fs::read_to_string(repo().join("scenarios/pos-offline.toml")).expect("scenarios/pos-offline.toml");
    assert!(shipped.contains("name = \"pos-offline\""));
}

/// A shop changes its schema on its own (`[ddl] from = "main"`: it stays
/// local) and counts stock behind the runner's back. The run must fail with
/// exit code 1 and name the site, the table and what differs.
#[test]
fn a_diverging_scenario_fails_and_says_where_and_how() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("drift.toml");
    std::fs::write(
        &file,
        r#"
name = "drift"
description = "branch1 adds a column of its own and writes stock off without a sale; the checks must catch both."
branches = 1
seed = 1
checks = ["converged", "stock", "sales_at_main"]

[[step]]
do = "add_products"
site = "main"
count = 5
stock = 100

[[step]]
do = "wait_converged"

[[step]]
do = "sell"
site = "branch1"
orders = 10
lines = 2

[[step]]
do = "sql"
site = "branch1"
what = "7 units of the first product written off, unknown to the runner"
sql = "UPDATE products SET stock = stock - 7 WHERE id = (SELECT min(id) FROM products)"

[[step]]
do = "wait_converged"

[[step]]
do = "sql"
site = "branch1"
what = "a column only branch1 has"
sql = "ALTER TABLE products ADD COLUMN shelf text"

[[step]]
do = "pause"
seconds = 1
"#,
    )
    .expect("write scenario");
    let (code, narrative, doc) = run_scenario(&file);
    assert_eq!(code, 1, "a failed check exits 1:\n{narrative}");
    assert_eq!(doc["verdict"], "failed", "{doc:#}");
    let check = |name: &str| doc["checks"].as_array().and_then(|c| c.iter().find(|c| c["check"] == name)).cloned().unwrap_or_else(|| panic!("no check {name}: {doc:#}"));
    assert_eq!(check("converged")["passed"], false, "{doc:#}");
    assert_eq!(check("stock")["passed"], false, "{doc:#}");
    assert_eq!(check("sales_at_main")["passed"], true, "the sales themselves all arrived: {doc:#}");
    // Which site, which table, how.
    let converged = check("converged")["detail"].as_str().unwrap_or_default().to_string();
    assert!(converged.contains("products at branch1 has different columns") && converged.contains("shelf"), "{converged}");
    let stock = check("stock")["detail"].as_str().unwrap_or_default().to_string();
    assert!(stock.contains("products at main: product") && stock.contains("products at branch1: product"), "{stock}");
    assert!(stock.contains("expected"), "{stock}");
    for part in ["FAILED converged", "FAILED stock", "FAILED: scenario drift", "replay with --seed 1"] {
        let found = narrative.contains(part) || narrative.replace("  ", " ").contains(part);
        assert!(found, "the narrative lacks {part:?}:\n{narrative}");
    }
}

/// Without PostgreSQL the demo stops before doing anything, with exit code
/// 2 and a message that says what to install.
#[test]
fn the_demo_without_postgresql_says_what_to_install() {
    let out = branchsync(&["demo"], &[("BRANCHSYNC_PG_BIN", "/nonexistent/postgresql/bin")], Duration::from_secs(60));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("PostgreSQL server binaries not found"), "{text}");
    assert!(text.contains("/nonexistent/postgresql/bin") && text.contains("apt-get install postgresql"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
}

/// A scenario file with a mistake is refused before anything starts.
#[test]
fn a_mistaken_scenario_file_is_refused_before_setup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("typo.toml");
    std::fs::write(&file, "name = \"typo\"\ndescription = \"d\"\n[[step]]\ndo = \"cut\"\nsite = \"branch3\"\n").expect("write");
    let out = branchsync(&["scenario", "run", &file.to_string_lossy()], &[], Duration::from_secs(60));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("step[0]") && text.contains("branch3"), "{text}");
    assert!(!text.contains("creating"), "nothing is set up for a broken file: {text}");
}
