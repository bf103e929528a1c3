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
//!   row becomes the author's version if the rule says the author wins;
//! * a column both changed to different values is a clash: the author wins
//!   if it had seen the version held here, else the table's rule decides
//!   ([`super::incoming_wins`]), and an unseen clash is a conflict to record.
//!
//! # What it guarantees, and what it does not
//!
//! Tested below over interleavings that keep each author's order: deltas
//! add up exactly once, however many authors; a value is never discarded
//! without a conflict naming its column (neither the incoming one nor the
//! one it overwrites unseen); two concurrent changes end with the same row
//! in either order under every rule.
//!
//! Not guaranteed: the version is kept per row, not per column, so a clash
//! is decided against the row's last writer, who may not be the column's.
//! Two shops, lww: branch1 sets `a` (stamp 5); branch2 sets `b` (stamp 1),
//! then `a` (stamp 2). Arriving as branch1, branch2, branch2, the row
//! becomes branch2's with its change of `b`, so its change of `a` counts as
//! informed and wins; arriving as branch2, branch2, branch1, branch1's `a`
//! (5 > 2) wins. The main decides once and relays the result, so every site
//! still holds the same row; which concurrent value survives can depend on
//! the order in which the shops reached the main. Versions per column would
//! close it (issue 14's next step).

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
}

/// Who wrote the row held here, who the incoming change is, and what the
/// incoming change had seen.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The table's rule.
    pub rule: ConflictRule,
    /// The main's node name (for `main_wins`).
    pub main: &'a str,
    /// The row's version held here.
    pub held: &'a Held,
    /// Whether the incoming change's author had seen `held` (R15).
    pub seen: bool,
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

/// The row's version after the merge.
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

/// The outcome of [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged<'a> {
    /// Columns to write, in the order given.
    pub writes: Vec<(&'a str, Write<'a>)>,
    /// Columns both sides changed to different values.
    pub clashes: Vec<&'a str>,
    /// Whether the incoming change won its clashes (meaningless without).
    pub incoming_won: bool,
    /// Whether the clashes are a conflict to record (the incoming change
    /// had not seen the held version).
    pub conflict: bool,
    /// The row's version afterwards.
    pub version: RowVersion,
}

/// Merges the incoming change `columns` into the row held here (see the
/// module's doc for the rules).
pub fn merge<'a>(columns: &[Column<'a>], ctx: &Context<'_>) -> Merged<'a> {
    let mut writes = Vec::new();
    // Columns both sides changed to different values, with the author's.
    let mut clashes: Vec<(&'a str, Option<&'a str>)> = Vec::new();
    let mut agreed = false;
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
            _ if c.theirs == c.ours => agreed |= c.base.is_some(),
            // Only the author changed it.
            Some(base) if c.ours == base => writes.push((c.name, Write::Set(c.theirs))),
            // Both changed it; without an old value, every difference.
            _ => clashes.push((c.name, c.theirs)),
        }
    }
    let wins = ctx.seen || incoming_wins(ctx.rule, ctx.main, ctx.held, ctx.author, ctx.stamp);
    // Both sides set the same value: nothing to write, but the rule still
    // says whose version the row is now. Left the older writer's, a later
    // change stamped between the two would win against it, and under lww the
    // result would depend on which arrived first.
    let agreed_wins = agreed && clashes.is_empty() && wins;
    let lost = !clashes.is_empty() && !wins;
    if !lost {
        writes.extend(clashes.iter().map(|(c, v)| (*c, Write::Set(*v))));
    }
    let only_deltas = writes.iter().all(|(_, w)| matches!(w, Write::Add { .. }));
    let version = if writes.is_empty() && !agreed_wins {
        RowVersion::Unchanged
    } else if lost || (only_deltas && !agreed_wins) {
        RowVersion::Held
    } else {
        RowVersion::Incoming
    };
    Merged { conflict: !clashes.is_empty() && !ctx.seen, incoming_won: wins, writes, clashes: clashes.into_iter().map(|(c, _)| c).collect(), version }
}

/// The main, modelled for tests: rows of three last-writer columns and a
/// counter, and the changes offline authors make to them, merged one at a
/// time by [`merge`]. `apply`'s differential test runs the same changes
/// through PostgreSQL and compares.
#[cfg(test)]
pub(crate) mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{merge, Column, ColumnKind, Context, RowVersion, Write};
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

    /// One row at the main and its version.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Main {
        pub row: BTreeMap<&'static str, String>,
        pub held: Held,
        /// Seen by everyone (the row from before init).
        pub baseline: bool,
    }

    /// What one arrival did: the columns whose incoming value was
    /// discarded, the values here that were overwritten, and the columns a
    /// recorded conflict names.
    pub struct Arrival {
        pub discarded: Vec<&'static str>,
        pub overwritten: Vec<&'static str>,
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
        Main { row: initial_row(), held: Held { node: String::new(), stamp: 0, inserted_by: "main".into() }, baseline: true }
    }

    impl Main {
        /// Merges `ch` (whose author had seen nothing of the others).
        pub fn apply(&mut self, ch: &Change, rule: ConflictRule) -> Arrival {
            let seen = self.baseline || self.held.node == ch.author;
            let (row, held) = (self.row.clone(), self.held.clone());
            let cols: Vec<Column<'_>> = COLS
                .iter()
                .map(|name| Column {
                    name,
                    kind: if *name == DELTA_COL { ColumnKind::Delta } else { ColumnKind::Lww },
                    base: Some(Some(ch.base[name].as_str())),
                    ours: Some(row[name].as_str()),
                    theirs: Some(ch.new[name].as_str()),
                })
                .collect();
            let m = merge(&cols, &Context { rule, main: "main", held: &held, seen, author: ch.author, stamp: ch.stamp });
            let written: BTreeMap<&str, Write<'_>> = m.writes.iter().cloned().collect();
            let discarded = LWW_COLS.iter().copied().filter(|c| ch.new[c] != ch.base[c] && ch.new[c] != row[c] && !written.contains_key(c)).collect();
            let overwritten = LWW_COLS.iter().copied().filter(|c| row[c] != ch.base[c] && written.contains_key(c)).collect();
            let conflict_cols = if m.conflict { LWW_COLS.iter().copied().filter(|c| m.clashes.contains(c)).collect() } else { Vec::new() };
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
            if m.version == RowVersion::Incoming {
                self.held = Held { node: ch.author.into(), stamp: ch.stamp, inserted_by: self.held.inserted_by.clone() };
                self.baseline = false;
            }
            Arrival { discarded, overwritten, conflict_cols }
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

    fn ctx<'a>(held: &'a Held, seen: bool, author: &'a str, stamp: u64) -> Context<'a> {
        Context { rule: ConflictRule::Lww, main: "main", held, seen, author, stamp }
    }

    fn lww<'a>(name: &'a str, base: Option<&'a str>, ours: Option<&'a str>, theirs: Option<&'a str>) -> Column<'a> {
        Column { name, kind: ColumnKind::Lww, base: Some(base), ours, theirs }
    }

    #[test]
    fn a_column_only_the_author_changed_takes_its_value_and_the_row_its_version() {
        let h = held("branch2", 9);
        let m = merge(&[lww("price", Some("1"), Some("1"), Some("2")), lww("name", Some("a"), Some("b"), Some("a"))], &ctx(&h, false, "branch1", 5));
        assert_eq!(m.writes, vec![("price", Write::Set(Some("2")))]);
        assert!(m.clashes.is_empty() && !m.conflict);
        assert_eq!(m.version, RowVersion::Incoming);
    }

    #[test]
    fn an_unseen_clash_is_a_conflict_decided_by_the_rule_and_a_seen_one_is_not() {
        let h = held("branch2", 9);
        let cols = [lww("price", Some("1"), Some("3"), Some("2"))];
        let lost = merge(&cols, &ctx(&h, false, "branch1", 5));
        assert!(lost.writes.is_empty() && lost.conflict && !lost.incoming_won);
        assert_eq!(lost.version, RowVersion::Unchanged, "nothing written, the row stays the held version");
        let won = merge(&cols, &ctx(&h, false, "branch1", 10));
        assert_eq!((won.writes.clone(), won.conflict, won.version), (vec![("price", Write::Set(Some("2")))], true, RowVersion::Incoming));
        let seen = merge(&cols, &ctx(&h, true, "branch1", 5));
        assert_eq!((seen.writes.clone(), seen.conflict, seen.version), (vec![("price", Write::Set(Some("2")))], false, RowVersion::Incoming));
    }

    #[test]
    fn a_delta_adds_the_authors_difference_even_when_the_rest_loses() {
        let h = held("branch2", 9);
        let cols = [Column { name: "qty", kind: ColumnKind::Delta, base: Some(Some("10")), ours: Some("7"), theirs: Some("8") }, lww("note", Some("a"), Some("b"), Some("c"))];
        let m = merge(&cols, &ctx(&h, false, "branch1", 5));
        assert_eq!(m.writes, vec![("qty", Write::Add { new: "8", old: "10" })]);
        assert_eq!((m.conflict, m.version), (true, RowVersion::Held));
        let only = merge(&cols[..1], &ctx(&h, false, "branch1", 50));
        assert_eq!(only.version, RowVersion::Held, "a counter never makes the row its author's");
    }

    #[test]
    fn without_an_old_row_every_difference_is_a_clash() {
        let h = held("branch2", 9);
        let c = Column { name: "price", kind: ColumnKind::Lww, base: None, ours: Some("1"), theirs: Some("2") };
        let same = Column { theirs: Some("1"), ..c };
        let m = merge(&[c, Column { name: "name", ..same }], &ctx(&h, false, "branch1", 10));
        assert_eq!((m.clashes, m.writes), (vec!["price"], vec![("price", Write::Set(Some("2")))]));
    }

    #[test]
    fn the_same_value_on_both_sides_makes_the_row_the_winners_version_without_a_write() {
        let h = held("branch2", 9);
        let cols = [lww("price", Some("1"), Some("2"), Some("2"))];
        let later = merge(&cols, &ctx(&h, false, "branch1", 10));
        assert_eq!((later.writes.is_empty(), later.conflict, later.version), (true, false, RowVersion::Incoming));
        let earlier = merge(&cols, &ctx(&h, false, "branch1", 5));
        assert_eq!(earlier.version, RowVersion::Unchanged);
    }

    use super::model::{authors, initial, interleave, moved, Change, DELTA_COL};

    fn any_rule() -> impl Strategy<Value = ConflictRule> {
        prop_oneof![Just(ConflictRule::Lww), Just(ConflictRule::MainWins), Just(ConflictRule::BranchWins)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Two shops offline, each with a change to one row: the main ends
        /// with the same row whichever arrives first, and the counter moved
        /// by both.
        #[test]
        fn two_concurrent_changes_end_with_the_same_row_in_either_order(
            rule in any_rule(),
            per_author in authors(&["branch1", "branch2"], 1, 1, 0),
            picks in proptest::collection::vec(0usize..2, 8),
            other in proptest::collection::vec(0usize..2, 8),
        ) {
            let run = |order: &[Change]| {
                let mut main = initial();
                for ch in order {
                    main.apply(ch, rule);
                }
                main.row
            };
            let one = run(&interleave(&per_author, &picks));
            prop_assert_eq!(&one, &run(&interleave(&per_author, &other)));
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
                let seen = main.baseline || main.held.node == ch.author;
                let arrival = main.apply(&ch, rule);
                for c in &arrival.discarded {
                    prop_assert!(arrival.conflict_cols.contains(c), "{}'s value of {} discarded without a conflict", ch.author, c);
                }
                if !seen {
                    for c in &arrival.overwritten {
                        prop_assert!(arrival.conflict_cols.contains(c), "{} overwrote {} without a conflict", ch.author, c);
                    }
                }
            }
            prop_assert_eq!(main.row[DELTA_COL].parse::<i64>().unwrap(), 100 + moved(&per_author, 0));
        }
    }
}
