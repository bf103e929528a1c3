//! Issue 16, done-when 1 and 2: a head office and two shops on Tryton 8.2
//! with its point of sale, configured with the Tryton preset and nothing
//! else in `[[tables]]`.
//!
//! The head office is set up by Tryton itself (`trytond-admin`, then a
//! company, chart of accounts, fiscal year, products and one POS per
//! site through proteus); each shop joins it from an empty database with
//! `branchsync join`. Each site gives its gapless counters its own prefix
//! (the chain's numbering plan, as README says). Both shops are cut off;
//! all three sell through the POS (each sale paid and posted: a receipt
//! number and an account-move number) and the head office opens the next
//! fiscal year meanwhile; the links heal; every site sells again, now in
//! the new year. Then: each shop's copy equals the head office's
//! (`branchsync verify`), every sale is at the head office once with its
//! posted move, no receipt or move number was issued twice across the
//! chain, and each site's series is gapless in each fiscal year.
//!
//! Tryton comes from PyPI (`tests/run.sh` installs it into
//! `target/tryton-venv`); set `BRANCHSYNC_TRYTON_BIN` to the directory
//! holding its `python3` and `trytond-admin`. Selling runs Tryton
//! in-process (`tests/tryton/pos.py`), with the same RPC entry points,
//! access checks and retries as a till.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use branchsync_tests::*;

/// Every site's configuration: the preset, nothing else.
const PRESET: &str = "[preset]\nerp = \"tryton\"\n";

/// The fiscal year the chain starts in, and the one the head office opens
/// while the shops are away (the year of today: sales after the heal are
/// dated today).
fn years() -> (i32, i32) {
    let out = Command::new("date").arg("+%Y").output().expect("run date");
    let now: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a year");
    (now - 1, now)
}

/// A program of the Tryton installation: from `BRANCHSYNC_TRYTON_BIN`, else
/// from `PATH`.
fn tryton_program(name: &str) -> PathBuf {
    match std::env::var_os("BRANCHSYNC_TRYTON_BIN") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => PathBuf::from(name),
    }
}

/// The ERP's own login role, not a superuser, as in a real installation:
/// it owns Tryton's tables at the head office (and, copied by `join` with
/// their owners, at each shop), and schema changes from the head office
/// are replayed at a shop as the table's owner.
async fn erp_role(site: &Site, head_office: bool) {
    let db = site.db().await;
    db.batch_execute("CREATE ROLE tryton LOGIN").await.expect("create the ERP's role");
    if head_office {
        db.batch_execute("ALTER SCHEMA public OWNER TO tryton").await.expect("the ERP's schema");
    }
}

/// Runs a Tryton command against `site`'s database (`postgres`), as the
/// ERP's role, off the
/// runtime's workers; its stdout. Panics with its output when it fails.
async fn tryton(site: &Site, program: &str, args: Vec<String>) -> String {
    let mut c = Command::new(tryton_program(program));
    c.args(&args)
        .env("TRYTOND_DATABASE__URI", format!("postgresql://tryton@127.0.0.1:{}/", site.pg.port()))
        .env("TRYTONPASSFILE", site.dir.path().join("tryton-admin-password"))
        .current_dir(site.dir.path())
        .stdin(Stdio::null());
    let what = format!("{program} {} at {}", args.join(" "), site.name);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || c.output()).await.expect("tryton task").unwrap_or_else(|e| {
        panic!("cannot run {what}: {e}\nInstall Tryton (bash tests/run.sh does: target/tryton-venv) and set BRANCHSYNC_TRYTON_BIN to the directory holding its python3 and trytond-admin.")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what} failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    println!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    stdout
}

/// `tests/tryton/pos.py ARGS` at `site`.
async fn pos(site: &Site, args: &[&str]) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tryton/pos.py");
    let mut all = vec![script.display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    tryton(site, "python3", all).await
}

/// `n` sales at `site`'s own POS dated `date` (today when `None`).
async fn sell(site: &Site, n: usize, date: Option<String>) {
    let n = n.to_string();
    let mut args = vec!["sell", site.name.as_str(), n.as_str()];
    if let Some(d) = &date {
        args.push(d);
    }
    let out = pos(site, &args).await;
    assert_eq!(out.lines().filter(|l| l.starts_with("sale ")).count(), n.parse::<usize>().unwrap(), "{} sold what it was asked:\n{out}", site.name);
}

async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// Waits until `site` holds `n` posted sales and `years` fiscal years.
async fn holds(site: &Site, n: i64, years: i64) {
    let db = site.db().await;
    eventually(&format!("{} holds {n} posted sales and {years} fiscal years", site.name), Duration::from_secs(120), || {
        let db = &db;
        async move {
            let sales = count(db, "SELECT count(*) FROM sale_point_sale WHERE state = 'posted' AND move IS NOT NULL").await;
            let fy = count(db, "SELECT count(*) FROM account_fiscalyear").await;
            (sales == n && fy == years).then_some(())
        }
    })
    .await;
}

/// The site's numbering plan: its prefix on every gapless counter it holds
/// (restarted at 1 at a shop: its own series), and at a shop the prefix a
/// counter created elsewhere takes when it arrives (a shop's own schema
/// change, which stays local). At the head office, the value a counter
/// created elsewhere starts from (Tryton's column has no default; the
/// change replicates to every site).
async fn number_plan(site: &Site, prefix: &str) {
    let db = site.db().await;
    let p = format!("{prefix}/${{year}}/");
    if site.index == 0 {
        db.batch_execute("ALTER TABLE ir_sequence_strict ALTER COLUMN number_next_internal SET DEFAULT 1").await.expect("the counters' default");
        db.execute("UPDATE ir_sequence_strict SET prefix = $1", &[&p]).await.expect("the head office's prefix");
    } else {
        db.batch_execute(&format!("ALTER TABLE ir_sequence_strict ALTER COLUMN prefix SET DEFAULT '{p}'")).await.expect("the shop's default prefix");
        db.execute("UPDATE ir_sequence_strict SET prefix = $1, number_next_internal = 1", &[&p]).await.expect("the shop's prefix");
    }
}

/// A number's numeric end: "S1/2026/7" → 7.
fn serial(number: &str) -> i64 {
    number.rsplit('/').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("a number without a serial: {number}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tryton_sites_sell_offline_and_open_a_year_and_no_document_number_is_issued_twice() {
    let (year, next_year) = years();
    let mut main = Site::new("main", 0);
    let main_port = free_port();
    let mut shops = vec![Site::new("shop1", 1), Site::new("shop2", 2)];
    let mut proxies = Vec::new();
    for _ in &shops {
        proxies.push(LinkProxy::start(main_port).await.expect("start a link proxy"));
    }
    main.write_main_config(main_port, &[("shop1", 1), ("shop2", 2)], PRESET);
    for (s, p) in shops.iter().zip(&proxies) {
        s.write_branch_config(p.port, PRESET);
    }

    // 1. The head office: Tryton's database, its company, accounts,
    //    products and POS, then branchsync.
    erp_role(&main, true).await;
    std::fs::write(main.dir.path().join("tryton-admin-password"), "admin\n").unwrap();
    tryton(&main, "trytond-admin", ["-d", "postgres", "--all", "-u", "sale_point", "--activate-dependencies", "--email", "admin@example.com"].map(String::from).to_vec()).await;
    pos(&main, &["seed", &year.to_string()]).await;
    let out = main.cli(&["init"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "init at the head office failed:\n{said}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("public.ir_sequence_strict.number_next_internal"), "init names the site-local counter that has no default:\n{said}");
    main.start();
    wait_status(&main, "the head office's daemon answers", Duration::from_secs(60), |_| true).await;

    // 2. Each shop joins from an empty database (its ERP role created, as
    //    at the head office).
    for s in &mut shops {
        erp_role(s, false).await;
        s.issue_credentials(&main);
        let out = tokio::task::spawn_blocking({
            let config = s.config_path();
            move || Command::new(branchsync_bin()).arg("join").arg("--config").arg(config).stdin(Stdio::null()).output().expect("run branchsync join")
        })
        .await
        .unwrap();
        assert!(out.status.success(), "join of {} failed:\n{}\n{}", s.name, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        s.start();
    }
    for s in ["shop1", "shop2"] {
        wait_status(&main, &format!("{s} connected"), Duration::from_secs(60), |st| st["peers"][s]["connected"] == true).await;
    }
    number_plan(&main, "HQ").await;
    for (s, p) in shops.iter().zip(["S1", "S2"]) {
        number_plan(s, p).await;
    }

    // 3. Both shops cut off; all three sell in this fiscal year; the head
    //    office opens the next one.
    for p in &proxies {
        p.cut();
    }
    let offline = 4;
    let dated = Some(format!("{year}-12-15"));
    tokio::join!(
        async {
            sell(&main, offline, dated.clone()).await;
            pos(&main, &["new-year", &next_year.to_string(), &format!("HQ/{next_year}/")]).await;
        },
        sell(&shops[0], offline, dated.clone()),
        sell(&shops[1], offline, dated.clone()),
    );

    // 4. Healed: every sale and the new year reach every site; then every
    //    site sells in the new year.
    for p in &proxies {
        p.heal();
    }
    let sites = [&main, &shops[0], &shops[1]];
    for s in sites {
        holds(s, 3 * offline as i64, 2).await;
    }
    let after = 2;
    tokio::join!(sell(&main, after, None), sell(&shops[0], after, None), sell(&shops[1], after, None));
    let total = 3 * (offline + after) as i64;
    for s in sites {
        holds(s, total, 2).await;
    }

    // 5. Each shop's copy is the head office's (site-local columns aside).
    for s in &shops {
        let out = s.cli(&["verify", "--settle-timeout", "60"]);
        let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("verify at {}: {}", s.name, String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default());
        assert_eq!(out.status.code(), Some(0), "{}'s copy differs from the head office's:\n{text}", s.name);
    }

    // 6. Every sale at the head office once, each with its posted move; no
    //    number twice; each site's series gapless per fiscal year.
    let db = main.db().await;
    let rows = db
        .query(
            "SELECT p.name, s.number, m.number, fy.name \
             FROM sale_point_sale s JOIN sale_point p ON p.id = s.point JOIN account_move m ON m.id = s.move \
             JOIN account_period per ON per.id = m.period JOIN account_fiscalyear fy ON fy.id = per.fiscalyear \
             WHERE s.state = 'posted' AND m.state = 'posted'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, total, "every sale at the head office once, posted");
    let mut receipts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut moves: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in &rows {
        let (pos, receipt, mv, fy): (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        receipts.entry(pos.clone()).or_default().push(serial(&receipt));
        moves.entry((pos, fy)).or_default().push(mv);
    }
    println!("receipts per POS: {receipts:?}\nmove numbers per site and year: {moves:?}");
    let twice = texts(&db, "SELECT number FROM account_move WHERE number IS NOT NULL GROUP BY number HAVING count(*) > 1 ORDER BY 1").await;
    assert!(twice.is_empty(), "move numbers issued twice across the chain: {twice:?}");
    let twice = count(&db, "SELECT count(*) FROM (SELECT point, number FROM sale_point_sale GROUP BY point, number HAVING count(*) > 1) d").await;
    assert_eq!(twice, 0, "no receipt number issued twice at a POS");
    for (site, prefix) in [("main", "HQ"), ("shop1", "S1"), ("shop2", "S2")] {
        let mut r = receipts[site].clone();
        r.sort();
        assert_eq!(r, (1..=(offline + after) as i64).collect::<Vec<_>>(), "{site}'s receipts gapless");
        for (fy, n) in [(year, offline), (next_year, after)] {
            let mut got = moves.get(&(site.to_string(), fy.to_string())).cloned().unwrap_or_default();
            got.sort_by_key(|m| serial(m));
            let want: Vec<String> = (1..=n).map(|i| format!("{prefix}/{fy}/{i}")).collect();
            assert_eq!(got, want, "{site}'s move numbers in {fy}: its own series, gapless");
        }
    }
    let conflicts = count(&db, "SELECT count(*) FROM branchsync.conflicts WHERE tbl = 'public.ir_sequence_strict'").await;
    assert_eq!(conflicts, 0, "site-local counters never conflict");
    assert!(count(&db, "SELECT count(*) FROM branchsync.conflicts WHERE tbl = 'public.account_move'").await == 0, "no account move conflicts");
    let kinds = texts(&db, "SELECT tbl || ' ' || kind || ': ' || count(*) FROM branchsync.conflicts GROUP BY tbl, kind ORDER BY 1").await;
    println!("conflicts recorded at the head office: {kinds:?}");
}
