//! Playing a scenario's steps against a [`Target`], keeping a tally of
//! every sale and stock movement made, so that the checks can compare the
//! data with what really happened rather than with itself.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::checks;
use super::compose::ComposeTarget;
use super::local::LocalTarget;
use super::spec::{Scenario, Step, POS_SCHEMA, POS_TABLE_RULES};
use super::{Narrator, RunOptions, ScenarioError, Target, TargetKind, Verdict};

/// The shop application's role (scenarios/pos/schema.sql): owns the tables.
pub const APP_ROLE: &str = "pos";

/// Orders sent to a site per round trip (each its own transaction).
const SELL_CHUNK: usize = 50;

/// What a run ends with.
pub struct Report {
    /// Passed, failed or not run.
    pub verdict: Verdict,
    /// Why it failed, when a step failed.
    pub failure: Option<String>,
    /// The checks and their outcomes.
    pub checks: Vec<serde_json::Value>,
    /// Per site: role, rows per table, conflicts, parked.
    pub sites: Vec<serde_json::Value>,
}

impl Report {
    pub(super) fn interrupted() -> Report {
        Report { verdict: Verdict::Failed, failure: Some("interrupted".into()), checks: Vec::new(), sites: Vec::new() }
    }
}

/// One sale the runner made.
#[derive(Debug, Clone)]
pub struct Sale {
    /// The site that sold it.
    pub site: usize,
    /// Its lines.
    pub lines: u32,
}

/// One sale made through a site's Tryton server.
#[derive(Debug, Clone)]
pub struct TrytonSale {
    /// The site (its point of sale has the site's name).
    pub site: usize,
    /// The receipt number Tryton gave it there.
    pub receipt: String,
    /// The number of its account move.
    pub move_number: String,
}

/// Everything the runner did that the data must show.
#[derive(Debug, Default)]
pub struct Tally {
    /// Sales made through Tryton, in order.
    pub tryton_sales: Vec<TrytonSale>,
    /// Sales by tag (`orders.note`).
    pub sales: BTreeMap<String, Sale>,
    /// Per product: initial stock plus deliveries.
    pub stock_in: BTreeMap<i64, i64>,
    /// Per product: units sold anywhere.
    pub sold: BTreeMap<i64, i64>,
}

/// The state of a run.
pub struct Runner<'a> {
    pub(super) sc: &'a Scenario,
    pub(super) n: &'a Narrator,
    pub(super) target: Target,
    pub(super) names: Vec<String>,
    pub(super) tally: Tally,
    /// What the sites leave out of replication (an ERP preset's excluded
    /// tables and site-local columns): the comparisons leave it out too.
    pub(super) skip: checks::Skip,
    rng: StdRng,
    /// Links cut by the scenario.
    pub(super) cut: Vec<bool>,
    /// Daemons the scenario stopped (not to be restarted behind its back).
    stopped: Vec<bool>,
    /// Restarts of daemons that exited by themselves.
    pub(super) restarts: Vec<u32>,
    next_sale: Vec<u64>,
}

/// Sets up the target, plays the steps, runs the checks, prints the site
/// table and the verdict, and tears the target down.
pub async fn run(sc: &Scenario, opts: &RunOptions, seed: u64, n: &Narrator) -> Report {
    let names = sc.sites();
    n.say(None, &format!("setting up {} on the {} target", names.join(", "), format!("{:?}", opts.target).to_lowercase()));
    let progress = |s: String| n.say(None, &s);
    let setup = match opts.target {
        TargetKind::Local if sc.erp.is_some() => Err(ScenarioError::Setup(format!(
            "scenario {} runs {} at every site, which the local target cannot\nHINT: Run it with --target compose (docker/build.sh --erp builds the images).",
            sc.name,
            sc.erp.as_deref().unwrap_or_default()
        ))),
        TargetKind::Local => LocalTarget::setup(sc, POS_SCHEMA, POS_TABLE_RULES, &progress).await.map(Target::Local),
        TargetKind::Compose => ComposeTarget::setup(sc, opts.compose_file.as_deref(), &progress).await.map(Target::Compose),
    };
    let target = match setup {
        Ok(t) => t,
        Err(e) => {
            n.raw(&format!("\ncannot run scenario {}: {e}", sc.name));
            return Report { verdict: Verdict::NotRun, failure: Some(e.to_string()), checks: Vec::new(), sites: Vec::new() };
        }
    };
    n.say(None, &format!("ready: {}", target.describe()));
    let skip = match &sc.erp {
        Some(erp) => match target.preset(erp).await.map_err(|e| e.to_string()).and_then(|text| checks::Skip::from_preset(&text)) {
            Ok(s) => s,
            Err(e) => {
                n.raw(&format!("\ncannot run scenario {}: the {erp} preset: {e}", sc.name));
                target.teardown().await;
                return Report { verdict: Verdict::NotRun, failure: Some(e), checks: Vec::new(), sites: Vec::new() };
            }
        },
        None => checks::Skip::default(),
    };
    let k = names.len();
    let mut r = Runner {
        sc,
        n,
        target,
        names,
        tally: Tally::default(),
        skip,
        rng: StdRng::seed_from_u64(seed),
        cut: vec![false; k],
        stopped: vec![false; k],
        restarts: vec![0; k],
        next_sale: vec![0; k],
    };
    let mut report = Report { verdict: Verdict::Passed, failure: None, checks: Vec::new(), sites: Vec::new() };
    let started = Instant::now();
    let outcome = async {
        r.wait_connected(None).await?;
        r.steps(&sc.steps, "").await
    }
    .await;
    match outcome {
        Ok(()) => {
            n.raw("\nchecks");
            let results = checks::run_checks(&mut r).await;
            for c in &results {
                if !c.passed {
                    report.verdict = Verdict::Failed;
                }
                report.checks.push(serde_json::json!({"check": c.kind.name(), "passed": c.passed, "detail": c.detail}));
            }
        }
        Err(e) => {
            report.verdict = Verdict::Failed;
            n.raw(&format!("\nFAILED: {e}"));
            for i in 0..r.names.len() {
                let tail = r.target.log_tail(i, 25).await;
                if !tail.trim().is_empty() {
                    n.raw(&format!("--- last lines of {}'s daemon log ---\n{tail}", r.names[i]));
                }
            }
            report.failure = Some(e.to_string());
        }
    }
    report.sites = checks::site_table(&mut r).await;
    let secs = started.elapsed().as_secs_f64();
    match report.verdict {
        Verdict::Passed => n.raw(&format!("\nPASSED: scenario {} in {secs:.1} s (seed {seed})", sc.name)),
        _ => n.raw(&format!("\nFAILED: scenario {} after {secs:.1} s (seed {seed}; replay with --seed {seed})", sc.name)),
    }
    n.say(None, "removing everything the scenario set up");
    r.target.teardown().await;
    report
}

fn commas(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `1,234` for counts in the narrative.
pub(super) fn fmt_count(v: u64) -> String {
    commas(v)
}

/// A SQL string literal.
pub(super) fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Runner<'_> {
    fn site(&self, name: &str) -> Result<usize, ScenarioError> {
        self.names.iter().position(|s| s == name).ok_or_else(|| ScenarioError::Setup(format!("no site {name}")))
    }

    async fn steps(&mut self, steps: &[Step], prefix: &str) -> Result<(), ScenarioError> {
        for step in steps {
            self.supervise().await?;
            self.step(step, prefix).await?;
        }
        Ok(())
    }

    /// Restarts a daemon that exited by itself, as systemd or docker would;
    /// it is said, and counted in the site table.
    async fn supervise(&mut self) -> Result<(), ScenarioError> {
        if let Target::Local(t) = &mut self.target {
            for i in 0..self.names.len() {
                if !self.stopped[i] && !t.daemon_running(i) {
                    let why = t.log_tail(i, 1);
                    self.n.say(Some(&self.names[i]), &format!("the daemon exited by itself; restarting it (as systemd or docker would). Its last log line: {}", why.trim()));
                    self.restarts[i] += 1;
                    t.start_daemon(i)?;
                }
            }
        }
        Ok(())
    }

    async fn step(&mut self, step: &Step, prefix: &str) -> Result<(), ScenarioError> {
        let say = |r: &Self, site: Option<usize>, text: &str| r.n.say(site.map(|i| r.names[i].as_str()), &format!("{prefix}{text}"));
        match step {
            Step::Say { text } => say(self, None, text),
            Step::AddProducts { site, count, stock } => {
                let i = self.site(site)?;
                let mut values = Vec::new();
                for _ in 0..*count {
                    let cents: i64 = self.rng.gen_range(50..5000);
                    values.push(format!("({}.{:02})", cents / 100, cents % 100));
                }
                let sql = format!(
                    "INSERT INTO products (name, price, stock) SELECT 'product ' || (row_number() OVER ()) || ' from {site}', v.price::numeric, {stock} FROM (VALUES {}) v(price) RETURNING id",
                    values.join(", ")
                );
                let rows = self.target.query(i, &sql).await?;
                for r in rows {
                    if let Some(id) = r.first().and_then(|v| v.as_deref()).and_then(|v| v.parse::<i64>().ok()) {
                        *self.tally.stock_in.entry(id).or_default() += stock;
                    }
                }
                say(self, Some(i), &format!("{count} products added, {stock} in stock each (master data)"));
            }
            Step::Sell { site, orders, lines, hours } => {
                let i = self.site(site)?;
                self.sell(i, *orders, *lines, *hours, prefix).await?;
            }
            Step::EditPrices { site, products } => {
                let i = self.site(site)?;
                let ids = self.products_at(i).await?;
                let chosen: Vec<i64> = ids.choose_multiple(&mut self.rng, *products as usize).map(|(id, _)| *id).collect();
                let sql: String = chosen.iter().map(|id| format!("BEGIN; UPDATE products SET price = price + 0.10 WHERE id = {id}; COMMIT;")).collect();
                if !sql.is_empty() {
                    self.target.exec(i, &sql).await?;
                }
                say(self, Some(i), &format!("{} prices raised by 0.10 (master-data edits, one transaction each)", chosen.len()));
            }
            Step::ReceiveStock { site, qty } => {
                let i = self.site(site)?;
                let ids: Vec<i64> = self.products_at(i).await?.into_iter().map(|(id, _)| id).collect();
                if !ids.is_empty() {
                    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
                    self.target.exec(i, &format!("BEGIN; UPDATE products SET stock = stock + {qty} WHERE id IN ({}); COMMIT;", list.join(", "))).await?;
                    for id in &ids {
                        *self.tally.stock_in.entry(*id).or_default() += qty;
                    }
                }
                say(self, Some(i), &format!("a delivery: +{qty} units of each of {} products", ids.len()));
            }
            Step::Sql { site, sql, what } => {
                let i = self.site(site)?;
                let t = Instant::now();
                // As the application's role, like the ERP it stands for: a
                // schema change is replayed as the role that made it (R22).
                self.target.exec(i, &format!("BEGIN; SET LOCAL ROLE {APP_ROLE};\n{sql}\n;COMMIT;")).await?;
                let what = what.clone().unwrap_or_else(|| format!("SQL: {}", sql.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(60).collect::<String>()));
                say(self, Some(i), &format!("{what} ({:.1} s)", t.elapsed().as_secs_f64()));
            }
            Step::TrytonSell { site, sales, date } => {
                let i = self.site(site)?;
                let t = Instant::now();
                let sold = self.target.tryton_sell(i, *sales, date.as_deref()).await?;
                if sold.len() != *sales as usize {
                    return Err(ScenarioError::Site { site: site.clone(), message: format!("Tryton reported {} sale(s) of the {sales} asked for", sold.len()) });
                }
                let span = |v: Vec<&String>| match (v.first(), v.last()) {
                    (Some(a), Some(b)) if a != b => format!("{a} … {b}"),
                    (Some(a), _) => a.to_string(),
                    _ => String::new(),
                };
                let receipts = span(sold.iter().map(|s| &s.0).collect());
                let moves = span(sold.iter().map(|s| &s.1).collect());
                for (receipt, move_number) in sold {
                    self.tally.tryton_sales.push(TrytonSale { site: i, receipt, move_number });
                }
                let dated = date.as_deref().map(|d| format!(" dated {d}")).unwrap_or_default();
                say(self, Some(i), &format!("{sales} sale(s){dated} through its Tryton server, paid and posted: receipts {receipts}, moves {moves} ({:.1} s)", t.elapsed().as_secs_f64()));
            }
            Step::Cut { site } => {
                let i = self.site(site)?;
                self.target.cut(i).await?;
                self.cut[i] = true;
                say(self, Some(i), "link to the main cut (the shop keeps working offline)");
            }
            Step::Restore { site } => {
                let i = self.site(site)?;
                self.target.restore(i).await?;
                self.cut[i] = false;
                say(self, Some(i), "link to the main restored");
            }
            Step::KillDaemon { site } => {
                let i = self.site(site)?;
                self.target.kill_daemon(i).await?;
                self.stopped[i] = true;
                say(self, Some(i), "daemon killed (kill -9)");
            }
            Step::StartDaemon { site } => {
                let i = self.site(site)?;
                self.target.start_daemon(i).await?;
                self.stopped[i] = false;
                say(self, Some(i), "daemon started again");
            }
            Step::CrashPostgres { site } => {
                let i = self.site(site)?;
                self.target.crash_postgres(i).await?;
                say(self, Some(i), "PostgreSQL crashed (immediate stop, as a power cut)");
            }
            Step::StartPostgres { site } => {
                let i = self.site(site)?;
                let t = Instant::now();
                self.target.start_postgres(i).await?;
                say(self, Some(i), &format!("PostgreSQL started again; crash recovery done in {:.1} s", t.elapsed().as_secs_f64()));
            }
            Step::Pause { seconds } => {
                say(self, None, &format!("{seconds} s pass"));
                tokio::time::sleep(Duration::from_secs_f64(*seconds)).await;
            }
            Step::WaitConnected { timeout_s } => self.wait_connected(*timeout_s).await?,
            Step::WaitConverged { timeout_s } => self.wait_converged(*timeout_s, prefix).await?,
            Step::Repeat { times, steps } => {
                for k in 1..=*times {
                    let p = format!("{prefix}[{k}/{times}] ");
                    Box::pin(self.steps(steps, &p)).await?;
                }
            }
        }
        Ok(())
    }

    /// Products known at site `i` that the tally follows, with their price
    /// there in cents.
    async fn products_at(&mut self, i: usize) -> Result<Vec<(i64, i64)>, ScenarioError> {
        let rows = self.target.query(i, "SELECT id, (price * 100)::int8 FROM products ORDER BY id").await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let id = r.first()?.as_deref()?.parse::<i64>().ok()?;
                let cents = r.get(1)?.as_deref()?.parse::<i64>().ok()?;
                self.tally.stock_in.contains_key(&id).then_some((id, cents))
            })
            .collect())
    }

    /// `orders` sales at site `i`, one transaction each: the order, its
    /// lines (distinct products), the stock taken off, a till report in the
    /// keyless audit log at the end.
    async fn sell(&mut self, i: usize, orders: u32, max_lines: u32, hours: Option<f64>, prefix: &str) -> Result<(), ScenarioError> {
        let name = self.names[i].clone();
        let products = self.products_at(i).await?;
        if products.is_empty() {
            return Err(ScenarioError::Site { site: name, message: "no products to sell here: add_products first, and wait_converged for them to arrive".into() });
        }
        let t = Instant::now();
        let mut last_progress = Instant::now();
        let mut lines_total = 0u64;
        let mut batch = String::new();
        let mut in_batch = 0;
        for k in 0..orders {
            self.next_sale[i] += 1;
            let tag = format!("sale {name}-{}", self.next_sale[i]);
            let n_lines = self.rng.gen_range(1..=max_lines.min(products.len() as u32));
            let chosen: Vec<(i64, i64)> = products.choose_multiple(&mut self.rng, n_lines as usize).copied().collect();
            let mut line_values = Vec::new();
            let mut total = 0i64;
            for (id, cents) in &chosen {
                let qty: i64 = self.rng.gen_range(1..=3);
                total += qty * cents;
                line_values.push(format!("({id}, {qty}, {}.{:02})", cents / 100, cents % 100));
                *self.tally.sold.entry(*id).or_default() += qty;
            }
            let created = match hours {
                Some(h) => format!("date_trunc('day', now()) + interval '9 hours' + interval '{} seconds'", (f64::from(k) * h * 3600.0 / f64::from(orders)).round() as i64),
                None => "now()".into(),
            };
            batch.push_str(&format!(
                "BEGIN;\
                 WITH o AS (INSERT INTO orders (shop, created_at, total, note) VALUES ({}, {created}, {}.{:02}, {}) RETURNING id), \
                 l AS (INSERT INTO order_lines (order_id, product_id, qty, price) SELECT o.id, v.p, v.q, v.pr FROM o, (VALUES {}) v(p, q, pr) RETURNING product_id, qty) \
                 UPDATE products SET stock = stock - l.qty FROM l WHERE products.id = l.product_id;\
                 COMMIT;\n",
                lit(&name),
                total / 100,
                total % 100,
                lit(&tag),
                line_values.join(", ")
            ));
            self.tally.sales.insert(tag, super::run::Sale { site: i, lines: n_lines });
            lines_total += u64::from(n_lines);
            in_batch += 1;
            if in_batch == SELL_CHUNK || k + 1 == orders {
                self.target.exec(i, &batch).await?;
                batch.clear();
                in_batch = 0;
                if last_progress.elapsed() >= Duration::from_secs(3) && k + 1 < orders {
                    self.n.say(Some(&name), &format!("{prefix}selling… {}/{} orders", fmt_count(u64::from(k + 1)), fmt_count(u64::from(orders))));
                    last_progress = Instant::now();
                }
            }
        }
        self.target
            .exec(i, &format!("INSERT INTO audit_log (event, payload) VALUES ('till report', jsonb_build_object('site', {}, 'orders', {orders}, 'up_to', {}))", lit(&name), self.next_sale[i]))
            .await?;
        let span = hours.map(|h| format!(" over a simulated {h}-hour day")).unwrap_or_default();
        let offline = if self.cut[i] { " while offline" } else { "" };
        self.n.say(
            Some(&name),
            &format!(
                "{prefix}sold {} orders ({} lines){span}{offline}, one transaction each, and wrote a till report ({:.1} s)",
                fmt_count(u64::from(orders)),
                fmt_count(lines_total),
                t.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Waits until every branch whose link is up is connected to the main.
    pub(super) async fn wait_connected(&mut self, timeout_s: Option<u64>) -> Result<(), ScenarioError> {
        let limit = Duration::from_secs(timeout_s.unwrap_or(self.sc.timeout_s));
        let want: Vec<usize> = (1..self.names.len()).filter(|i| !self.cut[*i]).collect();
        let t = Instant::now();
        loop {
            let st = self.target.status(0).await;
            let missing: Vec<String> = want
                .iter()
                .filter(|i| !st.as_ref().is_some_and(|s| s["peers"][&self.names[**i]]["connected"].as_bool() == Some(true)))
                .map(|i| self.names[*i].clone())
                .collect();
            if missing.is_empty() {
                let who: Vec<&str> = want.iter().map(|i| self.names[*i].as_str()).collect();
                self.n.say(None, &format!("{} connected to the main ({:.1} s)", if who.is_empty() { "no branch".to_string() } else { who.join(" and ") }, t.elapsed().as_secs_f64()));
                return Ok(());
            }
            if t.elapsed() > limit {
                let why: Vec<String> = missing
                    .iter()
                    .map(|b| {
                        let err = st.as_ref().and_then(|s| s["peers"][b]["last_error"].as_str().map(str::to_string)).unwrap_or_else(|| "no error reported".into());
                        format!("{b}: {err}")
                    })
                    .collect();
                return Err(ScenarioError::Timeout { what: format!("{} connect to the main", missing.join(", ")), secs: limit.as_secs(), detail: why.join("\n") });
            }
            self.supervise().await?;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until every site holds the same rows in every replicated
    /// table, saying every few seconds how much is still on its way.
    async fn wait_converged(&mut self, timeout_s: Option<u64>, prefix: &str) -> Result<(), ScenarioError> {
        let limit = Duration::from_secs(timeout_s.unwrap_or(self.sc.timeout_s));
        let t = Instant::now();
        let mut last_said = Instant::now();
        // A branch whose link is cut cannot catch up: the others are compared.
        let left_out = self.cut.clone();
        let offline: Vec<&str> = (1..self.names.len()).filter(|i| left_out[*i]).map(|i| self.names[i].as_str()).collect();
        let who = if offline.is_empty() { "every site".to_string() } else { format!("every site but {} (cut off)", offline.join(" and ")) };
        self.n.say(None, &format!("{prefix}waiting until {who} holds the same rows"));
        loop {
            let sums = checks::checksums(self).await;
            let differing = checks::differing_tables(&sums, &left_out);
            if differing.is_empty() {
                self.n.say(None, &format!("{prefix}converged in {:.1} s: {}", t.elapsed().as_secs_f64(), checks::table_summary(&sums)));
                return Ok(());
            }
            if t.elapsed() > limit {
                let explained = checks::explain_differences(self, &sums, &differing, &left_out).await;
                let pending = self.pending_summary().await;
                let links = self.link_summary().await;
                let detail = format!("{explained}\nstill on its way: {pending}\nlinks: {links}");
                return Err(ScenarioError::Timeout { what: format!("{who} holds the same rows"), secs: limit.as_secs(), detail });
            }
            if last_said.elapsed() >= Duration::from_secs(3) {
                let pending = self.pending_summary().await;
                let shown = if differing.len() > 8 { format!("{} and {} more tables", differing[..8].join(", "), differing.len() - 8) } else { differing.join(", ") };
                self.n.say(None, &format!("{prefix}still differing: {shown}; {pending}"));
                last_said = Instant::now();
            }
            self.supervise().await?;
            // A checksum pass over big tables costs the sites CPU: wait
            // longer the longer it took.
            tokio::time::sleep(Duration::from_millis(300).max(sums.took * 2)).await;
        }
    }

    /// "branch1: connected at the main, connected here (last error: …)" for
    /// a failure report.
    async fn link_summary(&mut self) -> String {
        let main = self.target.status(0).await;
        let mut parts = Vec::new();
        for i in 1..self.names.len() {
            let b = &self.names[i];
            let at_main = main.as_ref().map(|s| &s["peers"][b]);
            let here = self.target.status(i).await;
            let here = here.as_ref().map(|s| &s["peers"]["main"]);
            let f = |v: Option<&serde_json::Value>| match v {
                None => "no status".to_string(),
                Some(p) => format!(
                    "{}{}",
                    if p["connected"].as_bool() == Some(true) { "connected" } else { "not connected" },
                    p["last_error"].as_str().map(|e| format!(" (last error: {e})")).unwrap_or_default()
                ),
            };
            parts.push(format!("{b}: at the main {}; at {b} {}", f(at_main), f(here)));
        }
        parts.join("; ")
    }

    /// "branch1: 1,234 transactions to send, 56 to receive; …" from the
    /// daemons' status (log entries not yet acknowledged by the other side).
    pub(super) async fn pending_summary(&mut self) -> String {
        let main = self.target.status(0).await;
        let mut parts = Vec::new();
        for i in 1..self.names.len() {
            let b = &self.names[i];
            let up = self.target.status(i).await.and_then(|s| s["peers"]["main"]["pending_to_peer"].as_u64());
            let down = main.as_ref().and_then(|s| s["peers"][b]["pending_to_peer"].as_u64());
            let link = if self.cut[i] { " (cut off)" } else { "" };
            let f = |v: Option<u64>| v.map(fmt_count).unwrap_or_else(|| "?".into());
            parts.push(format!("{b}{link}: {} transactions to send, {} to receive", f(up), f(down)));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_read_well() {
        assert_eq!(super::fmt_count(0), "0");
        assert_eq!(super::fmt_count(999), "999");
        assert_eq!(super::fmt_count(1000), "1,000");
        assert_eq!(super::fmt_count(1234567), "1,234,567");
    }
}
