//! Conflict decisions: which of two versions of a row survives.
//!
//! A version is (stamp, node). Last writer wins on the stamp; equal stamps
//! are broken by node name. The decision depends only on the two versions,
//! never on which node decides or in which order the versions arrive, so
//! every site reaches the same outcome and converges.
//!
//! Where the local version of a row comes from (R7, R13):
//! * a row last written by apply carries a replication origin on its
//!   `xmin`; its version is in `branchsync.row_version`;
//! * a row last written locally (origin 0) is a local version stamped with
//!   its commit time, even if capture has not logged it yet;
//! * a row whose commit timestamp vacuum has frozen away falls back to the
//!   side table, or to the oldest possible version, so the decision never
//!   flips for old rows: an old row loses to any new change in both cases.
//!
//! Every decision that discards a version is written to
//! `branchsync.conflicts` by apply, with both versions.
//!
//! [`merge`] is the per-column merge of a change into the row the main
//! holds, as a pure function, with the properties it keeps tested over
//! interleavings of several authors' changes.

pub mod merge;

use std::cmp::Ordering;

/// A row version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Hybrid-clock stamp (µs).
    pub stamp: u64,
    /// Node that wrote it.
    pub node: String,
}

/// The name of the default rule.
pub const RULE_LWW: &str = "lww";

/// Who wins when two sites changed the same row concurrently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictRule {
    /// Last writer wins by stamp, ties by node name.
    #[default]
    Lww,
    /// A change authored at the main beats concurrent branch changes.
    MainWins,
    /// The branch that inserted the row owns it.
    BranchWins,
}

impl ConflictRule {
    /// The rule's name as configured and recorded.
    pub fn name(self) -> &'static str {
        match self {
            ConflictRule::Lww => "lww",
            ConflictRule::MainWins => "main_wins",
            ConflictRule::BranchWins => "branch_wins",
        }
    }
}

/// An update that meets a concurrent delete.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteConflict {
    /// The row stays deleted.
    #[default]
    DeleteWins,
    /// The update resurrects the row.
    UpdateWins,
}

/// Two sites inserted rows that collide on a unique constraint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UniqueConflict {
    /// The later row is recorded in `branchsync.conflicts`.
    #[default]
    Record,
    /// The later row is folded into the earlier one and references re-pointed.
    Merge,
}

/// The rules of the tables one `[[tables]]` entry matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TableRule {
    /// Glob over `name` or `schema.name` (as the exclude globs).
    pub pattern: String,
    /// Conflict rule.
    pub rule: ConflictRule,
    /// Counter columns: concurrent changes add up (`new - old` is applied).
    pub delta: Vec<String>,
    /// Update against delete.
    pub on_delete_conflict: DeleteConflict,
    /// Insert against insert on a unique constraint.
    pub on_unique_conflict: UniqueConflict,
    /// `TRUNCATE` of the table replicates (R21; off by default: it would
    /// discard rows its author never saw).
    pub truncate: bool,
    /// Site-local columns (a document counter, its prefix): every site
    /// keeps and advances its own value. Apply never writes them, never
    /// compares them with the author's old row, never decides on them; a
    /// row inserted from another site takes the column's default here.
    #[serde(default)]
    pub local: Vec<String>,
}

/// Every node's per-table rules, first match wins; evaluated identically at
/// every node (the handshake refuses a node whose rules differ, R23).
#[derive(Debug, Clone, Default)]
pub struct TableRules {
    rules: Vec<(glob::Pattern, TableRule)>,
    default: TableRule,
}

impl TableRules {
    /// Compiles the rules; a glob that does not parse is an error naming it.
    pub fn new(rules: Vec<TableRule>) -> Result<TableRules, crate::EngineError> {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let p = glob::Pattern::new(&r.pattern).map_err(|e| crate::EngineError::Misconfigured {
                message: format!("invalid table pattern \"{}\"", r.pattern),
                detail: e.to_string(),
                hint: "Use shell globs such as \"stock_*\" or \"public.product_price\".".into(),
            })?;
            out.push((p, r));
        }
        Ok(TableRules { rules: out, default: TableRule::default() })
    }

    /// The rule of `schema.name`: the first entry whose glob matches the bare
    /// name or the qualified name; the defaults otherwise.
    pub fn for_table(&self, schema: &str, name: &str) -> &TableRule {
        let qualified = format!("{schema}.{name}");
        self.rules.iter().find(|(p, _)| p.matches(name) || p.matches(&qualified)).map(|(_, r)| r).unwrap_or(&self.default)
    }

    /// The rules as configured, in order.
    pub fn rules(&self) -> Vec<TableRule> {
        self.rules.iter().map(|(_, r)| r.clone()).collect()
    }
}

/// Outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The incoming change is applied; the local version is overwritten.
    ApplyIncoming,
    /// The incoming change is discarded (and recorded).
    KeepLocal,
}

/// Last writer wins: higher stamp, then higher node name.
pub fn lww(local: &Version, incoming: &Version) -> Decision {
    match (incoming.stamp, incoming.node.as_str()).cmp(&(local.stamp, local.node.as_str())) {
        Ordering::Greater => Decision::ApplyIncoming,
        Ordering::Less | Ordering::Equal => Decision::KeepLocal,
    }
}

/// The version of a row a node holds, as conflict rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Node that wrote it.
    pub node: String,
    /// Its stamp.
    pub stamp: u64,
    /// Node that inserted the row (its owner under `branch_wins`).
    pub inserted_by: String,
}

/// Whether a change by `incoming_node` with `incoming_stamp` beats the held
/// version `cur` of a row that it had not seen (a concurrent change), by
/// `rule`. `main` is the main's node name. The answer is a total order
/// over versions, so every delivery order ends with the same winner.
pub fn incoming_wins(rule: ConflictRule, main: &str, cur: &Held, incoming_node: &str, incoming_stamp: u64) -> bool {
    let lww = || lww(&Version { stamp: cur.stamp, node: cur.node.clone() }, &Version { stamp: incoming_stamp, node: incoming_node.into() }) == Decision::ApplyIncoming;
    match rule {
        ConflictRule::Lww => lww(),
        ConflictRule::MainWins => match (cur.node == main, incoming_node == main) {
            (true, false) => false,
            (false, true) => true,
            _ => lww(),
        },
        ConflictRule::BranchWins => {
            let owner = cur.inserted_by.as_str();
            match (cur.node == owner, incoming_node == owner) {
                (true, false) => false,
                (false, true) => true,
                _ => lww(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(stamp: u64, node: &str) -> Version {
        Version { stamp, node: node.into() }
    }

    #[test]
    fn newer_stamp_wins_and_ties_go_to_the_higher_node_name() {
        assert_eq!(lww(&v(1, "main"), &v(2, "branch1")), Decision::ApplyIncoming);
        assert_eq!(lww(&v(3, "main"), &v(2, "branch1")), Decision::KeepLocal);
        assert_eq!(lww(&v(2, "branch1"), &v(2, "branch2")), Decision::ApplyIncoming);
        assert_eq!(lww(&v(2, "branch2"), &v(2, "branch1")), Decision::KeepLocal);
        assert_eq!(lww(&v(2, "b"), &v(2, "b")), Decision::KeepLocal, "the same version is not re-applied");
    }

    fn held(node: &str, stamp: u64, owner: &str) -> Held {
        Held { node: node.into(), stamp, inserted_by: owner.into() }
    }

    #[test]
    fn main_wins_beats_branches_whatever_the_clocks_and_branch_wins_follows_the_owner() {
        // The main's price, an hour older, beats a branch's concurrent edit.
        assert!(!incoming_wins(ConflictRule::MainWins, "main", &held("main", 1, "main"), "branch1", 3_600_000_000));
        assert!(incoming_wins(ConflictRule::MainWins, "main", &held("branch1", 9, "main"), "main", 1));
        // Between branches: last writer wins.
        assert!(incoming_wins(ConflictRule::MainWins, "main", &held("branch1", 5, "main"), "branch2", 6));
        assert!(!incoming_wins(ConflictRule::MainWins, "main", &held("branch1", 7, "main"), "branch2", 6));
        // The owner's change wins both ways; others fall back to lww.
        assert!(incoming_wins(ConflictRule::BranchWins, "main", &held("main", 9, "branch1"), "branch1", 1));
        assert!(!incoming_wins(ConflictRule::BranchWins, "main", &held("branch1", 1, "branch1"), "main", 9));
        assert!(incoming_wins(ConflictRule::BranchWins, "main", &held("main", 1, "branch1"), "branch2", 2));
        assert!(incoming_wins(ConflictRule::Lww, "main", &held("main", 1, "main"), "branch1", 2));
        assert!(!incoming_wins(ConflictRule::Lww, "main", &held("main", 2, "main"), "branch1", 2), "ties to the higher node name");
    }

    const NODES: [&str; 4] = ["main", "branch1", "branch2", "branch3"];

    /// The version left standing when `versions` arrive one after another,
    /// `wins(held, incoming)` deciding each arrival.
    fn standing<T: Clone>(versions: &[T], wins: impl Fn(&T, &T) -> bool) -> T {
        let mut cur = versions[0].clone();
        for x in &versions[1..] {
            if wins(&cur, x) {
                cur = x.clone();
            }
        }
        cur
    }

    fn any_rule() -> impl Strategy<Value = ConflictRule> {
        prop_oneof![Just(ConflictRule::Lww), Just(ConflictRule::MainWins), Just(ConflictRule::BranchWins)]
    }

    /// Concurrent versions of one row: at most one per author (an author's
    /// own versions are not concurrent), each with a stamp from a small
    /// range so that ties happen.
    fn concurrent_versions(owner: &'static str) -> impl Strategy<Value = Vec<Held>> {
        proptest::sample::subsequence(NODES.to_vec(), 1..=NODES.len()).prop_flat_map(move |authors| {
            let n = authors.len();
            proptest::collection::vec(0u64..5, n).prop_map(move |stamps| authors.iter().zip(stamps).map(|(a, s)| held(a, s, owner)).collect())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Every rule is a total order on concurrent versions, so every
        /// node, whatever order they arrive in, keeps the same one.
        #[test]
        fn every_rule_is_a_total_order_so_any_arrival_order_converges(
            rule in any_rule(),
            (versions, arrival) in (0usize..4).prop_flat_map(|o| concurrent_versions(NODES[o])).prop_flat_map(|vs| (Just(vs.clone()), Just(vs).prop_shuffle())),
        ) {
            let decide = |cur: &Held, x: &Held| incoming_wins(rule, "main", cur, &x.node, x.stamp);
            prop_assert_eq!(standing(&versions, decide), standing(&arrival, decide));
        }

        /// Last writer wins ends with the same version in every delivery
        /// order, ties included (the higher node name).
        #[test]
        fn every_delivery_order_ends_with_the_same_winner(
            (versions, arrival) in proptest::collection::vec((0u64..5, 0usize..4).prop_map(|(s, n)| v(s, NODES[n])), 1..6)
                .prop_flat_map(|vs| (Just(vs.clone()), Just(vs).prop_shuffle())),
        ) {
            let decide = |cur: &Version, x: &Version| lww(cur, x) == Decision::ApplyIncoming;
            prop_assert_eq!(standing(&versions, decide), standing(&arrival, decide));
        }
    }
}
