//! The merge of one branch change into the row the main holds: a pure
//! function of (base, ours, theirs, rule, causal context).
//!
//! It owns the per-column decision and nothing else: no locks, no SQL, no
//! conflict record written. `apply`'s decider locks and reads the row, asks
//! [`merge`] what to write, then writes it, records the conflict it names
//! and moves the row's version as it says; the property tests below and the
//! differential test in `apply::tests` (the SQL paths against this function,
//! row by row) hold the two together.
//!
//! Per column, against the author's old row (`base`):
//! * a delta column the author changed adds the author's difference to what
//!   is here (R16), whatever else happened: deltas never clash;
//! * a column the author did not change stays as it is here;
//! * a column only the author changed (what is here is still `base`) takes
//!   the author's value;
//! * a column both changed to the same value needs nothing written, but the
//!   column becomes the author's version if the rule says the author wins;
//! * a column both changed to different values is a clash: the author wins
//!   it if it had seen the column's version held here, else the table's
//!   rule decides ([`super::incoming_wins`]) between that version and the
//!   author's, and an unseen clash is a conflict to record.
//!
//! Versions are kept per column: a column written since the row's last
//! whole write (an insert, or a write at the main itself) carries the
//! version of the change that wrote it, so a clash is decided against the
//! column's last writer, not the row's. Kept per row, the outcome depended
//! on arrival order: branch1 sets `a` (stamp 5); branch2 sets `b` (1), then
//! `a` (2). Arriving branch1, branch2, branch2, the row became branch2's
//! with its change of `b`, so its change of `a` counted as informed and won;
//! arriving branch2, branch2, branch1, branch1's `a` won.
//!
//! # What it guarantees
//!
//! Tested below over interleavings that keep each author's order: every
//! interleaving of several authors' several changes ends with the same row
//! under every rule; deltas add up exactly once, however many authors; a
//! value is never discarded without a conflict naming its column (neither
//! the incoming one nor the one it overwrites unseen).

use super::{incoming_wins, ConflictRule, Held};

/// How a column's concurrent changes combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// One value survives: a clash is decided by the rule.
    Lww,
    /// A counter: the author's difference is added (R16).
    Delta,
}

/// One column of the change being decided.
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    /// The column's name.
    pub name: &'a str,
    /// Last writer or counter.
    pub kind: ColumnKind,
    /// The author's old value; `None` when the change carries no old value
    /// for it (then every difference from what is here is a clash).
    pub base: Option<Option<&'a str>>,
    /// The value held here.
    pub ours: Option<&'a str>,
    /// The author's new value.
    pub theirs: Option<&'a str>,
    /// The version of the value held here: the column's own if it was
    /// written since the row's last whole write, else the row's.
    pub held: &'a Held,
    /// Whether the incoming change's author had seen `held` (R15).
    pub seen: bool,
}

/// Who decides and who the incoming change is.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The table's rule.
    pub rule: ConflictRule,
    /// The main's node name (for `main_wins`).
    pub main: &'a str,
    /// The incoming change's author.
    pub author: &'a str,
    /// The incoming change's stamp.
    pub stamp: u64,
}

/// What to write to one column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write<'a> {
    /// Set it to this value.
    Set(Option<&'a str>),
    /// Add `new - old` to it.
    Add {
        /// The author's new value.
        new: &'a str,
        /// The author's old value.
        old: &'a str,
    },
}

/// The row's version after the merge (the version its delete, its owner
/// and its relay verdict are decided by; columns carry their own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowVersion {
    /// Nothing written: the row keeps its version.
    Unchanged,
    /// The row is the incoming change's version.
    Incoming,
    /// The row was written but stays the held version: the incoming change
    /// lost a column to it, or changed counters only (deltas never make a
    /// row theirs).
    Held,
}

/// A column both sides changed to different values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clash<'a> {
    /// The column.
    pub column: &'a str,
    /// The version of the value held here.
    pub held: &'a Held,
    /// Whether the incoming value won.
    pub won: bool,
    /// Whether the author had seen the value held here (then it is no
    /// conflict: the author changed it knowingly).
    pub seen: bool,
}

/// The conflicts of one merge to record: clashes the author had not seen,
/// one per version met and outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictGroup<'a> {
    /// The version the incoming change met.
    pub held: &'a Held,
    /// Whether the incoming change won these columns.
    pub won: bool,
    /// The columns.
    pub columns: Vec<&'a str>,
}

/// The outcome of [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged<'a> {
    /// Columns to write, in the order given.
    pub writes: Vec<(&'a str, Write<'a>)>,
    /// Columns both sides changed to different values.
    pub clashes: Vec<Clash<'a>>,
    /// Columns whose version is now the incoming change's: those it set,
    /// and those both sides set alike where the rule gives it the column.
    pub stamped: Vec<&'a str>,
    /// The row's version afterwards.
    pub version: RowVersion,
}

impl<'a> Merged<'a> {
    /// The clashes to record as conflicts, grouped by the version met and
    /// the outcome, in column order.
    pub fn conflicts(&self) -> Vec<ConflictGroup<'a>> {
        let mut out: Vec<ConflictGroup<'a>> = Vec::new();
        for c in self.clashes.iter().filter(|c| !c.seen) {
            match out.iter_mut().find(|g| g.won == c.won && g.held == c.held) {
                Some(g) => g.columns.push(c.column),
                None => out.push(ConflictGroup { held: c.held, won: c.won, columns: vec![c.column] }),
            }
        }
        out
    }
}

/// Merges the incoming change `columns` into the row held here (see the
/// module's doc for the rules).
pub fn merge<'a>(columns: &[Column<'a>], ctx: &Context<'_>) -> Merged<'a> {
    let mut writes = Vec::new();
    let mut clashes = Vec::new();
    let mut stamped = Vec::new();
    // A column both sides set alike that the incoming change won.
    let mut agreed_won = false;
    let wins = |c: &Column<'_>| c.seen || incoming_wins(ctx.rule, ctx.main, c.held, ctx.author, ctx.stamp);
    for c in columns {
        if c.kind == ColumnKind::Delta {
            if let (Some(Some(old)), Some(new)) = (c.base, c.theirs) {
                if old != new {
                    writes.push((c.name, Write::Add { new, old }));
                }
                continue;
            }
        }
        match c.base {
            // The author did not change it.
            Some(base) if c.theirs == base => {}
            // Both sides set the same value: nothing to write, but the rule
            // still says whose version the column is now. Left the older
            // writer's, a later change stamped between the two would win
            // against it, and the result would depend on arrival order.
            _ if c.theirs == c.ours => {
                if c.base.is_some() && wins(c) {
                    stamped.push(c.name);
                    agreed_won = true;
                }
            }
            // Only the author changed it.
            Some(base) if c.ours == base => {
                writes.push((c.name, Write::Set(c.theirs)));
                stamped.push(c.name);
            }
            // Both changed it; without an old value, every difference.
            _ => {
                let won = wins(c);
                clashes.push(Clash { column: c.name, held: c.held, won, seen: c.seen });
                if won {
                    writes.push((c.name, Write::Set(c.theirs)));
                    stamped.push(c.name);
                }
            }
        }
    }
    let lost = clashes.iter().any(|c| !c.won);
    let agreed_wins = clashes.is_empty() && agreed_won;
    let only_deltas = writes.iter().all(|(_, w)| matches!(w, Write::Add { .. }));
    let version = if writes.is_empty() && !agreed_wins {
        RowVersion::Unchanged
    } else if lost || (only_deltas && !agreed_wins) {
        RowVersion::Held
    } else {
        RowVersion::Incoming
    };
    Merged { writes, clashes, stamped, version }
}

/// The main, modelled for tests: rows of three last-writer columns and a
/// counter, and the changes offline authors make to them, merged one at a
/// time by [`merge`]. `apply`'s differential test runs the same changes
/// through PostgreSQL and compares.
#[cfg(test)]
pub(crate) mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{merge, Column, ColumnKind, Context, Write};
    use crate::conflict::{ConflictRule, Held};

    /// The last-writer columns.
    pub const LWW_COLS: [&str; 3] = ["a", "b", "c"];
    /// The counter.
    pub const DELTA_COL: &str = "qty";
    /// Every column but the key, in table order.
    pub const COLS: [&str; 4] = ["a", "b", "c", "qty"];

    /// A change as its author made it, to the row `key`.
    #[derive(Debug, Clone)]
    pub struct Change {
        pub author: &'static str,
        pub stamp: u64,
        pub key: usize,
        pub base: BTreeMap<&'static str, String>,
        pub new: BTreeMap<&'static str, String>,
    }

    /// One row at the main and its columns' versions.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Main {
        pub row: BTreeMap<&'static str, String>,
        /// Each column's version, and whether everyone has seen it (the
        /// row from before init).
        pub held: BTreeMap<&'static str, (Held, bool)>,
    }

    /// What one arrival did: the columns whose incoming value was
    /// discarded, the values here that were overwritten without having been
    /// seen, and the conflicts recorded (one per version met and outcome),
    /// with the columns they name.
    pub struct Arrival {
        pub discarded: Vec<&'static str>,
        pub overwritten_unseen: Vec<&'static str>,
        pub conflicts: usize,
        pub conflict_cols: Vec<&'static str>,
    }

    /// A row's values before any change: `a0`, `b0`, `c0`, 100.
    pub fn initial_row() -> BTreeMap<&'static str, String> {
        let mut row: BTreeMap<&'static str, String> = LWW_COLS.iter().map(|c| (*c, format!("{c}0"))).collect();
        row.insert(DELTA_COL, "100".into());
        row
    }

    /// The initial row as the baseline everyone has seen.
    pub fn initial() -> Main {
        written(Held { node: String::new(), stamp: 0, inserted_by: "main".into() }, true)
    }

    /// The initial row, written whole as `held`.
    pub fn written(held: Held, baseline: bool) -> Main {
        Main { row: initial_row(), held: COLS.iter().map(|c| (*c, (held.clone(), baseline))).collect() }
    }

    impl Main {
        /// Merges `ch` (whose author had seen nothing of the others).
        pub fn apply(&mut self, ch: &Change, rule: ConflictRule) -> Arrival {
            let (row, held) = (self.row.clone(), self.held.clone());
            let seen = |c: &str| held[c].1 || held[c].0.node == ch.author;
            let cols: Vec<Column<'_>> = COLS
                .iter()
                .map(|name| Column {
                    name,
                    kind: if *name == DELTA_COL { ColumnKind::Delta } else { ColumnKind::Lww },
                    base: Some(Some(ch.base[name].as_str())),
                    ours: Some(row[name].as_str()),
                    theirs: Some(ch.new[name].as_str()),
                    held: &held[name].0,
                    seen: seen(name),
                })
                .collect();
            let m = merge(&cols, &Context { rule, main: "main", author: ch.author, stamp: ch.stamp });
            let written: BTreeMap<&str, Write<'_>> = m.writes.iter().cloned().collect();
            let discarded = LWW_COLS.iter().copied().filter(|c| ch.new[c] != ch.base[c] && ch.new[c] != row[c] && !written.contains_key(c)).collect();
            let overwritten_unseen = LWW_COLS.iter().copied().filter(|c| row[c] != ch.base[c] && written.contains_key(c) && !seen(c)).collect();
            let groups = m.conflicts();
            let conflict_cols = groups.iter().flat_map(|g| g.columns.iter().copied()).filter_map(|c| LWW_COLS.iter().copied().find(|l| *l == c)).collect();
            let mut next = row.clone();
            for name in COLS {
                match written.get(name) {
                    Some(Write::Set(v)) => {
                        next.insert(name, v.unwrap_or_default().to_string());
                    }
                    Some(Write::Add { new, old }) => {
                        let n = row[name].parse::<i64>().unwrap_or(0) + new.parse::<i64>().unwrap_or(0) - old.parse::<i64>().unwrap_or(0);
                        next.insert(name, n.to_string());
                    }
                    None => {}
                }
            }
            self.row = next;
            for c in &m.stamped {
                if let Some(name) = COLS.iter().copied().find(|n| n == c) {
                    let inserted_by = self.held[name].0.inserted_by.clone();
                    self.held.insert(name, (Held { node: ch.author.into(), stamp: ch.stamp, inserted_by }, false));
                }
            }
            Arrival { discarded, overwritten_unseen, conflicts: groups.len(), conflict_cols }
        }
    }

    /// Each author's changes to `keys` rows, made offline from the initial
    /// rows (none saw another's): each sets some columns to a value no one
    /// else writes and moves the counter by a small amount; stamps rise per
    /// author from `first_stamp`, ties across authors possible.
    pub fn authors(names: &'static [&'static str], keys: usize, max_changes: usize, first_stamp: u64) -> impl Strategy<Value = Vec<Vec<Change>>> {
        let one = (0..keys, proptest::sample::subsequence(LWW_COLS.to_vec(), 0..=LWW_COLS.len()), -3i64..=3, 1u64..4);
        proptest::collection::vec(proptest::collection::vec(one, 1..=max_changes), names.len()).prop_map(move |per_author| {
            per_author
                .into_iter()
                .zip(names)
                .map(|(changes, author)| {
                    let mut rows = vec![initial_row(); keys];
                    let mut stamp = first_stamp;
                    changes
                        .into_iter()
                        .enumerate()
                        .map(|(n, (key, cols, delta, step))| {
                            stamp += step;
                            let row = &mut rows[key];
                            let base = row.clone();
                            for c in cols {
                                row.insert(c, format!("{author}.{n}"));
                            }
                            let q = row[DELTA_COL].parse::<i64>().unwrap_or(0) + delta;
                            row.insert(DELTA_COL, q.to_string());
                            Change { author, stamp, key, base, new: row.clone() }
                        })
                        .collect()
                })
                .collect()
        })
    }

    /// An interleaving of the authors' changes that keeps each author's
    /// order, `picks` choosing the next author each time.
    pub fn interleave(per_author: &[Vec<Change>], picks: &[usize]) -> Vec<Change> {
        let mut next = vec![0; per_author.len()];
        let mut out = Vec::new();
        let mut picks = picks.iter().cycle();
        while out.len() < per_author.iter().map(Vec::len).sum::<usize>() {
            let waiting: Vec<usize> = (0..per_author.len()).filter(|a| next[*a] < per_author[*a].len()).collect();
            let a = waiting[picks.next().copied().unwrap_or(0) % waiting.len()];
            out.push(per_author[a][next[a]].clone());
            next[a] += 1;
        }
        out
    }

    /// Each author's counter movement on `key`, summed.
    pub fn moved(per_author: &[Vec<Change>], key: usize) -> i64 {
        per_author
            .iter()
            .filter_map(|chs| chs.iter().rev().find(|ch| ch.key == key))
            .map(|ch| ch.new[DELTA_COL].parse::<i64>().unwrap_or(0) - 100)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    fn held(node: &str, stamp: u64) -> Held {
        Held { node: node.into(), stamp, inserted_by: "main".into() }
    }

    fn ctx<'a>(author: &'a str, stamp: u64) -> Context<'a> {
        Context { rule: ConflictRule::Lww, main: "main", author, stamp }
    }

    fn lww<'a>(name: &'a str, base: Option<&'a str>, ours: Option<&'a str>, theirs: Option<&'a str>, held: &'a Held, seen: bool) -> Column<'a> {
        Column { name, kind: ColumnKind::Lww, base: Some(base), ours, theirs, held, seen }
    }

    #[test]
    fn a_column_only_the_author_changed_takes_its_value_and_the_row_its_version() {
        let h = held("branch2", 9);
        let m = merge(&[lww("price", Some("1"), Some("1"), Some("2"), &h, false), lww("name", Some("a"), Some("b"), Some("a"), &h, false)], &ctx("branch1", 5));
        assert_eq!(m.writes, vec![("price", Write::Set(Some("2")))]);
        assert_eq!(m.stamped, vec!["price"], "the column is the author's now; name keeps branch2's version");
        assert!(m.clashes.is_empty() && m.conflicts().is_empty());
        assert_eq!(m.version, RowVersion::Incoming);
    }

    #[test]
    fn an_unseen_clash_is_a_conflict_decided_by_the_rule_and_a_seen_one_is_not() {
        let h = held("branch2", 9);
        let lost = merge(&[lww("price", Some("1"), Some("3"), Some("2"), &h, false)], &ctx("branch1", 5));
        assert!(lost.writes.is_empty() && lost.stamped.is_empty());
        assert_eq!(lost.conflicts(), vec![ConflictGroup { held: &h, won: false, columns: vec!["price"] }]);
        assert_eq!(lost.version, RowVersion::Unchanged, "nothing written, the row stays the held version");
        let won = merge(&[lww("price", Some("1"), Some("3"), Some("2"), &h, false)], &ctx("branch1", 10));
        assert_eq!((won.writes.clone(), won.conflicts().len(), won.version), (vec![("price", Write::Set(Some("2")))], 1, RowVersion::Incoming));
        let seen = merge(&[lww("price", Some("1"), Some("3"), Some("2"), &h, true)], &ctx("branch1", 5));
        assert_eq!((seen.writes.clone(), seen.conflicts().len(), seen.version), (vec![("price", Write::Set(Some("2")))], 0, RowVersion::Incoming));
    }

    #[test]
    fn each_clash_is_decided_against_its_columns_own_version() {
        // `a` was last written by branch1 at 5, `b` by branch3 at 1: branch2's
        // change at 2 loses `a` and wins `b`, two conflicts.
        let (a, b) = (held("branch1", 5), held("branch3", 1));
        let m = merge(&[lww("a", Some("a0"), Some("a1"), Some("a2"), &a, false), lww("b", Some("b0"), Some("b3"), Some("b2"), &b, false)], &ctx("branch2", 2));
        assert_eq!(m.writes, vec![("b", Write::Set(Some("b2")))]);
        assert_eq!(m.stamped, vec!["b"]);
        assert_eq!(m.conflicts(), vec![ConflictGroup { held: &a, won: false, columns: vec!["a"] }, ConflictGroup { held: &b, won: true, columns: vec!["b"] }]);
        assert_eq!(m.version, RowVersion::Held, "a column lost: the row stays the held version");
    }

    #[test]
    fn a_delta_adds_the_authors_difference_even_when_the_rest_loses() {
        let h = held("branch2", 9);
        let cols = [
            Column { name: "qty", kind: ColumnKind::Delta, base: Some(Some("10")), ours: Some("7"), theirs: Some("8"), held: &h, seen: false },
            lww("note", Some("a"), Some("b"), Some("c"), &h, false),
        ];
        let m = merge(&cols, &ctx("branch1", 5));
        assert_eq!(m.writes, vec![("qty", Write::Add { new: "8", old: "10" })]);
        assert_eq!((m.conflicts().len(), m.version), (1, RowVersion::Held));
        let only = merge(&cols[..1], &ctx("branch1", 50));
        assert_eq!((only.version, only.stamped.len()), (RowVersion::Held, 0), "a counter never makes the row or the column its author's");
    }

    #[test]
    fn without_an_old_row_every_difference_is_a_clash() {
        let h = held("branch2", 9);
        let c = Column { name: "price", kind: ColumnKind::Lww, base: None, ours: Some("1"), theirs: Some("2"), held: &h, seen: false };
        let same = Column { theirs: Some("1"), ..c };
        let m = merge(&[c, Column { name: "name", ..same }], &ctx("branch1", 10));
        assert_eq!(m.clashes.iter().map(|c| c.column).collect::<Vec<_>>(), vec!["price"]);
        assert_eq!(m.writes, vec![("price", Write::Set(Some("2")))]);
    }

    #[test]
    fn the_same_value_on_both_sides_makes_the_column_the_winners_version_without_a_write() {
        let h = held("branch2", 9);
        let later = merge(&[lww("price", Some("1"), Some("2"), Some("2"), &h, false)], &ctx("branch1", 10));
        assert_eq!((later.writes.is_empty(), later.conflicts().len(), later.stamped.clone(), later.version), (true, 0, vec!["price"], RowVersion::Incoming));
        let earlier = merge(&[lww("price", Some("1"), Some("2"), Some("2"), &h, false)], &ctx("branch1", 5));
        assert_eq!((earlier.version, earlier.stamped.len()), (RowVersion::Unchanged, 0));
    }

    use super::model::{authors, initial, interleave, moved, Change, DELTA_COL};

    fn any_rule() -> impl Strategy<Value = ConflictRule> {
        prop_oneof![Just(ConflictRule::Lww), Just(ConflictRule::MainWins), Just(ConflictRule::BranchWins)]
    }

    /// The row the main holds once `order` has arrived.
    fn run(order: &[Change], rule: ConflictRule) -> std::collections::BTreeMap<&'static str, String> {
        let mut main = initial();
        for ch in order {
            main.apply(ch, rule);
        }
        main.row
    }

    /// The example in the module's doc: decided against the row's last
    /// writer, branch1's `a` survived in one order and branch2's in the
    /// other; against the column's, branch1's (stamp 5 > 2) in both.
    #[test]
    fn the_documented_example_ends_alike_in_both_orders() {
        let change = |author: &'static str, stamp: u64, base: &std::collections::BTreeMap<&'static str, String>, col: &'static str, v: &str| {
            let mut new = base.clone();
            new.insert(col, v.into());
            Change { author, stamp, key: 0, base: base.clone(), new }
        };
        let b1 = change("branch1", 5, &model::initial_row(), "a", "a1");
        let b2b = change("branch2", 1, &model::initial_row(), "b", "b2");
        let b2a = change("branch2", 2, &b2b.new.clone(), "a", "a2");
        let first = run(&[b1.clone(), b2b.clone(), b2a.clone()], ConflictRule::Lww);
        assert_eq!(first, run(&[b2b, b2a, b1], ConflictRule::Lww));
        assert_eq!((first["a"].as_str(), first["b"].as_str()), ("a1", "b2"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Three shops offline, several changes each to one row: every
        /// interleaving that keeps each shop's order ends with the same row,
        /// and the counter moved by all of them.
        #[test]
        fn every_interleaving_of_the_authors_changes_ends_with_the_same_row(
            rule in any_rule(),
            per_author in authors(&["branch1", "branch2", "branch3"], 1, 4, 0),
            picks in proptest::collection::vec(0usize..3, 12),
            other in proptest::collection::vec(0usize..3, 12),
        ) {
            let one = run(&interleave(&per_author, &picks), rule);
            prop_assert_eq!(&one, &run(&interleave(&per_author, &other), rule));
            prop_assert_eq!(one[DELTA_COL].parse::<i64>().unwrap(), 100 + moved(&per_author, 0));
        }

        /// However many shops and in whatever order: counters add up, and no
        /// value is discarded (the incoming one, or the one it overwrote
        /// without having seen it) without a conflict naming its column.
        #[test]
        fn deltas_add_up_and_nothing_is_discarded_without_a_conflict(
            rule in any_rule(),
            per_author in authors(&["branch1", "branch2", "branch3"], 1, 4, 0),
            picks in proptest::collection::vec(0usize..3, 12),
        ) {
            let mut main = initial();
            for ch in interleave(&per_author, &picks) {
                let arrival = main.apply(&ch, rule);
                for c in arrival.discarded.iter().chain(&arrival.overwritten_unseen) {
                    prop_assert!(arrival.conflict_cols.contains(c), "{}'s change of {} discarded or overwrote a value without a conflict", ch.author, c);
                }
            }
            prop_assert_eq!(main.row[DELTA_COL].parse::<i64>().unwrap(), 100 + moved(&per_author, 0));
        }
    }

    use super::model;
}
