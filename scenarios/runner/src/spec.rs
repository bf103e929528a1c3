//! Scenario files: what a scenario is made of, read from TOML and checked
//! before anything starts (a typo must not surface after a minute of setup).
//!
//! ```toml
//! name = "pos-offline"
//! description = "A shop sells offline for a day, then reconnects."
//! branches = 2            # main + branch1, branch2
//! schema = "pos"          # scenarios/pos/schema.sql, embedded in the binary
//! seed = 7                # workload choices (products, quantities)
//! checks = ["converged", "sales_at_main", "stock", "key_stripes", "nothing_parked"]
//!
//! [[step]]
//! do = "add_products"
//! site = "main"
//! count = 20
//! stock = 500
//!
//! [[step]]
//! do = "cut"
//! site = "branch1"
//! ```
//!
//! Every step names the site it acts on: `main` or `branchN`.

use serde::Deserialize;

/// Built-in schemas a scenario can start from.
pub const POS_SCHEMA: &str = include_str!("../../pos/schema.sql");
/// The `[[tables]]` rules of [`POS_SCHEMA`].
pub const POS_TABLE_RULES: &str = include_str!("../../pos/tables.toml");
/// The scenario `branchsync demo` runs.
pub const POS_OFFLINE: &str = include_str!("../../pos-offline.toml");

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (`pos-offline`).
    pub name: String,
    /// One or two sentences: what it shows.
    pub description: String,
    /// Number of branches (1–9) besides the main.
    #[serde(default = "d_branches")]
    pub branches: u32,
    /// The schema every site starts with (empty, before `init`): `pos`.
    #[serde(default = "d_schema")]
    pub schema: String,
    /// Seed of the workload's choices; the run prints it.
    #[serde(default)]
    pub seed: Option<u64>,
    /// An ERP server at every site: `"tryton"` runs the compose stack's
    /// `erp` profile (one Tryton server with its point of sale per site, the
    /// head office seeded by it, the sites on the Tryton preset). Compose
    /// target only.
    #[serde(default)]
    pub erp: Option<String>,
    /// Default limit of the waits, seconds.
    #[serde(default = "d_timeout")]
    pub timeout_s: u64,
    /// What happens, in order.
    #[serde(rename = "step", default)]
    pub steps: Vec<Step>,
    /// What must hold at the end.
    #[serde(default)]
    pub checks: Vec<CheckKind>,
}

fn d_branches() -> u32 {
    2
}
fn d_schema() -> String {
    "pos".into()
}
fn d_timeout() -> u64 {
    120
}
fn d_lines() -> u32 {
    3
}

/// One step of a scenario (`do = "…"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Prints a line of narrative.
    Say {
        /// The text.
        text: String,
    },
    /// Master data: `count` products with `stock` units each.
    AddProducts {
        /// Where they are created.
        site: String,
        /// How many.
        count: u32,
        /// Initial stock of each.
        #[serde(default)]
        stock: i64,
    },
    /// Sales: `orders` transactions, each an order with 1..=`lines` lines
    /// of distinct products, the products' stock decremented.
    Sell {
        /// The shop (or the main's counter).
        site: String,
        /// How many orders.
        orders: u32,
        /// At most this many lines per order.
        #[serde(default = "d_lines")]
        lines: u32,
        /// Spread the orders' `created_at` over this many simulated hours.
        #[serde(default)]
        hours: Option<f64>,
    },
    /// Master-data edits: the price of `products` products raised by 0.10,
    /// one transaction each.
    EditPrices {
        /// Where.
        site: String,
        /// How many products.
        products: u32,
    },
    /// A delivery: every product's stock raised by `qty`, in one transaction.
    ReceiveStock {
        /// Where.
        site: String,
        /// Units per product.
        qty: i64,
    },
    /// Any SQL, in one transaction, as the application's role `pos` (a
    /// module install, say; schema changes made as a superuser are not
    /// replayed, DESIGN R22).
    Sql {
        /// Where.
        site: String,
        /// The statements.
        sql: String,
        /// What it is, for the narrative.
        #[serde(default)]
        what: Option<String>,
    },
    /// Sales through the site's own Tryton server (its point of sale, by
    /// XML-RPC, as a till does): `sales` sales of the seeded products, paid
    /// cash and posted, so each takes a receipt and an account-move number.
    /// Needs `erp = "tryton"`.
    TrytonSell {
        /// Where.
        site: String,
        /// How many sales.
        sales: u32,
        /// The sales' date (`YYYY-MM-DD`; default today): numbers take the
        /// fiscal year of the sale's date.
        #[serde(default)]
        date: Option<String>,
    },
    /// Cuts the site's link to the main (a branch).
    Cut {
        /// The branch.
        site: String,
    },
    /// Restores the site's link.
    Restore {
        /// The branch.
        site: String,
    },
    /// `kill -9` of the site's daemon.
    KillDaemon {
        /// Where.
        site: String,
    },
    /// Starts the site's daemon again.
    StartDaemon {
        /// Where.
        site: String,
    },
    /// Crashes the site's PostgreSQL (immediate stop: as a power cut).
    CrashPostgres {
        /// Where.
        site: String,
    },
    /// Starts the site's PostgreSQL again (crash recovery runs).
    StartPostgres {
        /// Where.
        site: String,
    },
    /// Lets time pass (the link flaps while something is in flight).
    Pause {
        /// Seconds.
        seconds: f64,
    },
    /// Waits until every branch whose link is up is connected to the main.
    WaitConnected {
        /// Limit, seconds (default: the scenario's `timeout_s`).
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Waits until every site holds the same rows in every replicated table
    /// (every site but the branches whose link the scenario has cut).
    WaitConverged {
        /// Limit, seconds (default: the scenario's `timeout_s`).
        #[serde(default)]
        timeout_s: Option<u64>,
    },
    /// Runs `steps` `times` times.
    Repeat {
        /// How often.
        times: u32,
        /// What.
        #[serde(rename = "step")]
        steps: Vec<Step>,
    },
}

/// A check at the end of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Every replicated table holds the same rows at every site.
    Converged,
    /// Every sale made anywhere is at the main exactly once, with its lines.
    SalesAtMain,
    /// Every product's stock equals its initial stock plus deliveries minus
    /// the units sold anywhere, at every site.
    Stock,
    /// Every order's key is on the stripe of the site that sold it.
    KeyStripes,
    /// No site holds parked rows.
    NothingParked,
    /// No site recorded a conflict.
    NoConflicts,
    /// Every sale made through Tryton is at the main exactly once, posted,
    /// with the receipt and move numbers it was given where it was made.
    TrytonSales,
    /// No account-move number twice across the chain, no receipt number
    /// twice per point of sale, and each site's series (its prefix and
    /// year) gapless from 1, at every site.
    DocumentNumbers,
    /// `branchsync verify` at every branch: every replicated table agrees
    /// with the main (site-local columns and excluded tables left out, as
    /// the sites are configured).
    Verified,
}

impl CheckKind {
    /// Its name in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Converged => "converged",
            CheckKind::SalesAtMain => "sales_at_main",
            CheckKind::Stock => "stock",
            CheckKind::KeyStripes => "key_stripes",
            CheckKind::NothingParked => "nothing_parked",
            CheckKind::NoConflicts => "no_conflicts",
            CheckKind::TrytonSales => "tryton_sales",
            CheckKind::DocumentNumbers => "document_numbers",
            CheckKind::Verified => "verified",
        }
    }
}

/// Why a scenario file is not usable.
#[derive(Debug, thiserror::Error)]
#[error("invalid scenario {file}: {message}")]
pub struct SpecError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

impl Scenario {
    /// Parses and checks a scenario; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Scenario, SpecError> {
        let s: Scenario = toml::from_str(text).map_err(|e| SpecError { file: file.into(), message: e.to_string().trim().to_string() })?;
        s.validate().map_err(|message| SpecError { file: file.into(), message })?;
        Ok(s)
    }

    /// The site names: `main`, `branch1`, …
    pub fn sites(&self) -> Vec<String> {
        std::iter::once("main".to_string()).chain((1..=self.branches).map(|i| format!("branch{i}"))).collect()
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=9).contains(&self.branches) {
            return Err(format!("branches = {}: a scenario has 1 to 9 branches", self.branches));
        }
        if self.schema != "pos" {
            return Err(format!("schema = \"{}\": the only built-in schema is \"pos\" (scenarios/pos/schema.sql)", self.schema));
        }
        if self.steps.is_empty() {
            return Err("it has no [[step]]".into());
        }
        match self.erp.as_deref() {
            None => {
                if let Some(c) = self.checks.iter().find(|c| matches!(c, CheckKind::TrytonSales | CheckKind::DocumentNumbers)) {
                    return Err(format!("check {} needs erp = \"tryton\"", c.name()));
                }
            }
            Some("tryton") if self.branches != 2 => return Err(format!("erp = \"tryton\" runs on the compose stack, which has two branches, not {}", self.branches)),
            Some("tryton") => {}
            Some(other) => return Err(format!("erp = \"{other}\": the only ERP a scenario can run is \"tryton\" (the compose stack's erp profile)")),
        }
        let sites = self.sites();
        validate_steps(&self.steps, &sites, "step", self.erp.is_some())
    }
}

fn validate_steps(steps: &[Step], sites: &[String], path: &str, erp: bool) -> Result<(), String> {
    for (i, st) in steps.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if let Some(site) = st.site() {
            if !sites.iter().any(|s| s == site) {
                return Err(format!("{at}: site \"{site}\" does not exist; the sites are {}", sites.join(", ")));
            }
            if matches!(st, Step::Cut { .. } | Step::Restore { .. }) && site == "main" {
                return Err(format!("{at}: cut and restore act on a branch's link, not on the main"));
            }
        }
        match st {
            Step::Sell { orders, lines, hours, .. } => {
                if *orders == 0 || *lines == 0 || *lines > 10 {
                    return Err(format!("{at}: sell needs orders >= 1 and 1 <= lines <= 10"));
                }
                if hours.is_some_and(|h| !(h > 0.0 && h <= 24.0)) {
                    return Err(format!("{at}: hours must be within (0, 24]"));
                }
            }
            Step::TrytonSell { .. } if !erp => return Err(format!("{at}: tryton_sell needs erp = \"tryton\"")),
            Step::TrytonSell { sales, date, .. } => {
                if *sales == 0 || *sales > 1000 {
                    return Err(format!("{at}: tryton_sell needs 1 <= sales <= 1000"));
                }
                if let Some(d) = date {
                    let ok = d.len() == 10 && d.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
                    if !ok {
                        return Err(format!("{at}: date \"{d}\" is not YYYY-MM-DD"));
                    }
                }
            }
            Step::AddProducts { count, .. } if *count == 0 || *count > 10_000 => return Err(format!("{at}: add_products needs 1 <= count <= 10000")),
            Step::Pause { seconds } if !(*seconds >= 0.0 && *seconds <= 3600.0) => return Err(format!("{at}: pause needs 0 <= seconds <= 3600")),
            Step::Repeat { times, steps } => {
                if *times == 0 || steps.is_empty() {
                    return Err(format!("{at}: repeat needs times >= 1 and at least one step"));
                }
                validate_steps(steps, sites, &format!("{at}.step"), erp)?;
            }
            _ => {}
        }
    }
    Ok(())
}

impl Step {
    /// The site the step acts on, if any.
    pub fn site(&self) -> Option<&str> {
        match self {
            Step::AddProducts { site, .. }
            | Step::Sell { site, .. }
            | Step::EditPrices { site, .. }
            | Step::ReceiveStock { site, .. }
            | Step::Sql { site, .. }
            | Step::TrytonSell { site, .. }
            | Step::Cut { site }
            | Step::Restore { site }
            | Step::KillDaemon { site }
            | Step::StartDaemon { site }
            | Step::CrashPostgres { site }
            | Step::StartPostgres { site } => Some(site),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "name = \"x\"\ndescription = \"d\"\n[[step]]\ndo = \"cut\"\nsite = \"branch1\"\n";

    #[test]
    fn shipped_scenarios_parse() {
        for f in ["pos-offline", "module-install", "flapping-link", "crash-recovery", "tryton-offline"] {
            let path = format!("{}/../{f}.toml", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let s = Scenario::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.name, f);
            assert!(s.checks.contains(&CheckKind::Converged), "{f} checks convergence");
        }
    }

    #[test]
    fn a_minimal_scenario_parses_with_defaults() {
        let s = Scenario::parse(OK, "ok.toml").unwrap();
        assert_eq!(s.branches, 2);
        assert_eq!(s.sites(), ["main", "branch1", "branch2"]);
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        let e = Scenario::parse(&OK.replace("branch1", "branch7"), "f.toml").unwrap_err().to_string();
        assert!(e.contains("step[0]") && e.contains("branch7") && e.contains("main, branch1, branch2"), "{e}");
        let e = Scenario::parse(&OK.replace("\"cut\"", "\"explode\""), "f.toml").unwrap_err().to_string();
        assert!(e.contains("explode"), "{e}");
        let e = Scenario::parse(&format!("{OK}colour = 1\n"), "f.toml").unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let e = Scenario::parse(&OK.replace("branch1", "main"), "f.toml").unwrap_err().to_string();
        assert!(e.contains("not on the main"), "{e}");
        let sell = "name = \"x\"\ndescription = \"d\"\n[[step]]\ndo = \"tryton_sell\"\nsite = \"branch1\"\nsales = 2\n";
        let e = Scenario::parse(sell, "f.toml").unwrap_err().to_string();
        assert!(e.contains("step[0]") && e.contains("erp = \"tryton\""), "{e}");
        assert!(Scenario::parse(&format!("erp = \"tryton\"\n{sell}"), "f.toml").is_ok());
        let e = Scenario::parse(&format!("erp = \"odoo\"\n{sell}"), "f.toml").unwrap_err().to_string();
        assert!(e.contains("only ERP"), "{e}");
        let e = Scenario::parse(&format!("erp = \"tryton\"\n{sell}date = \"2026-13\"\n"), "f.toml").unwrap_err().to_string();
        assert!(e.contains("YYYY-MM-DD"), "{e}");
        let nested = "name = \"x\"\ndescription = \"d\"\n[[step]]\ndo = \"repeat\"\ntimes = 2\n[[step.step]]\ndo = \"sell\"\nsite = \"branch1\"\norders = 0\n";
        let e = Scenario::parse(nested, "f.toml").unwrap_err().to_string();
        assert!(e.contains("step[0].step[0]"), "{e}");
    }
}
