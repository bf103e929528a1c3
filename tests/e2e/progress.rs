//! Issue 15 (progress and logs): `init` on a database with many tables
//! says how far it is — a bar per phase on a terminal, log lines at each
//! phase's start and end (and every few seconds) otherwise.

use branchsync_tests::*;

const TABLES: usize = 120;

async fn site_with_many_tables() -> Site {
    let site = Site::new("main", 0);
    site.write_main_config(free_port(), &[("branch1", 1)], "");
    let db = site.db().await;
    let ddl: String = (0..TABLES).map(|i| format!("CREATE TABLE item_{i:03} (id serial PRIMARY KEY, name text);")).collect();
    db.batch_execute(&ddl).await.unwrap();
    site
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_without_a_terminal_logs_each_phase_from_start_to_end() {
    let site = site_with_many_tables().await;
    let out = site.cli(&["init"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for line in [format!("striping sequences: 0 of {TABLES}"), format!("striping sequences: {TABLES} of {TABLES} done in")] {
        assert!(err.contains(&line), "no {line:?} in init's log:\n{err}");
    }
    assert!(err.contains("checking tables: 0 of") && err.contains("checking tables: ") && err.contains(" done in "), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_on_a_terminal_draws_a_bar_per_phase() {
    let site = site_with_many_tables().await;
    // `script` gives init a terminal (a pseudo-terminal) and copies what it
    // draws to stdout.
    let cmd = format!("{} init --config {}", branchsync_bin().display(), site.config_path().display());
    let out = std::process::Command::new("script").args(["-qec", &cmd, "/dev/null"]).output().expect("run script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("striping sequences") && text.contains(&format!("{TABLES}/{TABLES}")) && text.contains("[=="), "no finished bar in:\n{text}");
    assert!(!text.contains(&format!("striping sequences: 0 of {TABLES}")), "a terminal gets bars, not log lines:\n{text}");
}
