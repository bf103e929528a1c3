//! The role of an apply session, chosen once when it opens: the main's
//! [`Decider`] or a branch's [`Obeyer`].
//!
//! The session ([`super::Applier`]) is the same at both: one connection, the
//! grouping of ChangeSets into local transactions, the pipeline, progress,
//! careful replay and quarantine. What differs is owned here, with the state
//! only that role has:
//!
//! ```text
//!              received entry            keyed change        inserted row   origin
//!   Decider    checked: its author is    decided (R7,        plain insert;  the author's (R3)
//!   (main)     the peer, stamp clamped,  [`super::decide`]); digest of the
//!              causal claim capped       verdicts, conflicts rows as sent
//!                                        sent to the chain
//!   Obeyer     taken as the main         written as the main guarded upsert the relay's
//!   (branch)   relays it                 sent it ([`super::obey`]) (echo, others)
//! ```
//!
//! Nothing in the session asks which node it runs at: it asks its
//! [`Wing`], which is a [`Decider`] or an [`Obeyer`] for the session's
//! whole life (a node's role never changes while it runs).
//!
//! # Why the checks here are enough
//!
//! Every entry passes [`Decider::admit`] before anything of it is applied
//! or recorded at the main, in stream order, so a branch cannot speak as
//! another node, cannot win later decisions with a stamp from the future,
//! and cannot claim to have seen relay entries it was never sent. Stamps
//! clamped are remembered by position until their transaction commits, so
//! the record of each clamp commits with the ChangeSet it belongs to.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use branchsync_proto::{ChangeSetHeader, LogEntry};

use crate::marks::RowHasher;
use crate::state::origin_name;
use crate::EngineError;

/// The role strategy of one apply session.
pub(super) enum Wing {
    /// At the main: every incoming change is decided.
    Decider(Decider),
    /// At a branch: the main's relay is taken as the main wrote it.
    Obeyer(Obeyer),
}

/// The main's part of apply.
pub(super) struct Decider {
    /// The digest of a ChangeSet's rows as sent goes into its apply mark
    /// (see [`crate::marks::RowsDigest`]).
    pub(super) row_hasher: RowHasher,
    /// `branchsync.insert_versions` is there to read and write (a main's
    /// database initialised by this release or later): the versions of rows
    /// the pipeline inserts are packed there, not written row by row.
    pub(super) packed: bool,
    /// Tables with rows folded into others (`on_unique_conflict = "merge"`).
    pub(super) merged_tables: HashSet<String>,
    /// For a branch's stream: the index and cluster the handshake
    /// authenticated. Every entry must name exactly them (a branch speaks
    /// only for itself, never as the main or another shop).
    expected_author: Option<(u32, u64)>,
    /// A branch's stamp may be at most this far ahead of the main's clock
    /// on receipt (µs).
    max_stamp_ahead_us: Option<i64>,
    /// Stamps clamped on receipt, by position: (the stamp sent, the one kept).
    clamped: HashMap<u64, (u64, u64)>,
    /// What of the relay this branch can have seen.
    seen_main_cap: Option<SeenMainCap>,
}

/// A branch's part of apply.
pub(super) struct Obeyer {
    /// `branchsync.echo_settled` is there to write (a branch's database
    /// initialised by this release or later): echoes equal to the row here
    /// are left unwritten.
    pub(super) settle: bool,
}

impl Wing {
    /// The strategy of `role`; what it reads from the database is set by
    /// [`Wing::loaded`] once the session has read it.
    pub(super) fn new(role: crate::Role, mark_key: &[u8]) -> Wing {
        match role {
            crate::Role::Main => Wing::Decider(Decider {
                row_hasher: RowHasher::new(mark_key),
                packed: false,
                merged_tables: HashSet::new(),
                expected_author: None,
                max_stamp_ahead_us: None,
                clamped: HashMap::new(),
                seen_main_cap: None,
            }),
            crate::Role::Branch => Wing::Obeyer(Obeyer { settle: false }),
        }
    }

    /// Takes what the session read of the node's tables: the tables with
    /// folded rows, whether `echo_settled` and `insert_versions` can be
    /// used. Each role keeps what it uses.
    pub(super) fn loaded(&mut self, merged_tables: HashSet<String>, settle: bool, packed: bool) {
        match self {
            Wing::Decider(d) => {
                d.merged_tables = merged_tables;
                d.packed = packed;
            }
            Wing::Obeyer(o) => o.settle = settle,
        }
    }

    /// The main's decider, or `None` at a branch.
    pub(super) fn decider(&self) -> Option<&Decider> {
        match self {
            Wing::Decider(d) => Some(d),
            Wing::Obeyer(_) => None,
        }
    }

    /// The main's decider, to change, or `None` at a branch.
    pub(super) fn decider_mut(&mut self) -> Option<&mut Decider> {
        match self {
            Wing::Decider(d) => Some(d),
            Wing::Obeyer(_) => None,
        }
    }

    /// A branch's obeyer, or `None` at the main.
    pub(super) fn obeyer(&self) -> Option<&Obeyer> {
        match self {
            Wing::Obeyer(o) => Some(o),
            Wing::Decider(_) => None,
        }
    }

    /// `true` at the main.
    pub(super) fn decides(&self) -> bool {
        matches!(self, Wing::Decider(_))
    }

    /// `true` at a branch.
    pub(super) fn obeys(&self) -> bool {
        matches!(self, Wing::Obeyer(_))
    }

    /// The replication origin a ChangeSet of `author` is applied under: its
    /// author's at the main (R3: the main's capture relays it as that
    /// author's), the relay's at a branch (one origin for every author, so
    /// one local transaction can hold the ChangeSets of many shops).
    pub(super) fn origin_for(&self, author: &str) -> String {
        match self {
            Wing::Decider(_) => origin_name(author),
            Wing::Obeyer(_) => crate::state::RELAY_ORIGIN.to_string(),
        }
    }

    /// The tables holding rows folded into others, when there are any:
    /// rows referencing them must be re-pointed first (only the main folds
    /// rows).
    pub(super) fn merged_tables(&self) -> Option<&HashSet<String>> {
        self.decider().map(|d| &d.merged_tables).filter(|m| !m.is_empty())
    }

    /// `true` when rows may reference rows folded into others
    /// ([`Wing::merged_tables`]).
    pub(super) fn repoints(&self) -> bool {
        self.merged_tables().is_some()
    }

    /// Whether the packed insert versions are kept (main only).
    pub(super) fn packed(&self) -> bool {
        self.decider().is_some_and(|d| d.packed)
    }

    /// Whether echoes equal to the row here are settled unwritten (branch only).
    pub(super) fn settles(&self) -> bool {
        self.obeyer().is_some_and(|o| o.settle)
    }
}

impl Decider {
    /// Makes this session take a branch's stream: see
    /// [`super::Applier::expect_author`].
    pub(super) fn expect_author(&mut self, index: u32, system_id: u64, max_ahead_us: i64) {
        self.expected_author = Some((index, system_id));
        self.max_stamp_ahead_us = Some(max_ahead_us);
    }

    /// `true` once [`Decider::expect_author`] was called.
    pub(super) fn expects_author(&self) -> bool {
        self.expected_author.is_some()
    }

    /// Caps a branch's causal claims by the relay sent to it: see
    /// [`super::Applier::cap_seen_main`].
    pub(super) fn cap_seen_main(&mut self, relay: Arc<crate::log::ChangeLog>, sent: Arc<AtomicU64>) {
        self.seen_main_cap = Some(SeenMainCap { relay, sent, known: (u64::MAX, 0) });
    }

    /// Checks a decoded entry of `stream` before anything of it is applied:
    /// it must name the authenticated author ([`EngineError::Impersonation`]
    /// otherwise); a stamp too far ahead of this node's clock is clamped
    /// (every fragment of a ChangeSet keeps the clamp of its first,
    /// `previous` is the header of the entry before); a claim to have seen
    /// more of the relay than was sent is capped.
    pub(super) fn admit(&mut self, stream: &str, previous: Option<&ChangeSetHeader>, e: &mut LogEntry) -> Result<(), EngineError> {
        if let Some((index, system_id)) = self.expected_author {
            let h = &e.header;
            if h.author != stream || h.author_index != index || h.system_id != system_id {
                return Err(EngineError::Impersonation {
                    stream: stream.to_string(),
                    pos: e.pos,
                    detail: format!(
                        "the entry names author \"{}\" (index {}, cluster {}), but the session authenticated \"{stream}\" (index {index}, cluster {system_id}): a node speaks only for itself",
                        h.author, h.author_index, h.system_id
                    ),
                });
            }
        }
        if let Some(ahead) = self.max_stamp_ahead_us {
            let now = u64::try_from(crate::clock::now_us()).unwrap_or(0);
            if e.header.stamp > now.saturating_add(u64::try_from(ahead).unwrap_or(u64::MAX)) {
                let kept = match previous {
                    Some(h) if e.part > 0 && h.commit_lsn == e.header.commit_lsn => h.stamp,
                    _ => now,
                };
                tracing::warn!(stream, pos = e.pos, ahead_s = (e.header.stamp - now) / 1_000_000, "a stamp far ahead of this node's clock is clamped to the time it arrived");
                self.clamped.insert(e.pos, (e.header.stamp, kept));
                e.header.stamp = kept;
            }
        }
        if let Some(cap) = self.seen_main_cap.as_mut() {
            let limit = cap.limit(e.header.seen_main_ts);
            if e.header.seen_main_ts > limit {
                tracing::warn!(stream, pos = e.pos, "a change claims to have seen more of the main's relay than was sent to its author; capped");
                e.header.seen_main_ts = limit;
            }
        }
        Ok(())
    }

    /// The stamp sent and the one kept, when the entry at `pos` was clamped.
    pub(super) fn clamped_at(&self, pos: u64) -> Option<(u64, u64)> {
        self.clamped.get(&pos).copied()
    }

    /// Forgets what was set aside for positions up to `pos` (committed).
    pub(super) fn committed(&mut self, pos: u64) {
        self.clamped.retain(|p, _| *p > pos);
    }
}

/// What a branch can have seen of the main's relay ([`Decider::cap_seen_main`]).
struct SeenMainCap {
    relay: Arc<crate::log::ChangeLog>,
    sent: Arc<AtomicU64>,
    /// `(position, its relay time)` last read.
    known: (u64, i64),
}

impl SeenMainCap {
    /// The relay time of the newest entry in the relay log; no bound when
    /// unknown (a log that has written nothing since it was upgraded).
    fn newest(&self) -> i64 {
        self.relay.seen_main_ts().ok().filter(|t| *t > 0).unwrap_or(i64::MAX)
    }

    /// The relay time of the newest relay entry sent (relay times never
    /// decrease along the log, so it bounds every entry sent before). Read
    /// from the relay log only when `claim` exceeds what is known: at most
    /// one entry decoded per advance of the sent position. When that entry
    /// cannot be read, the relay time of the newest entry in the log bounds
    /// it instead (looser, still above every honest claim).
    fn limit(&mut self, claim: i64) -> i64 {
        let pos = self.sent.load(Ordering::SeqCst);
        if pos == self.known.0 || claim <= self.known.1 {
            return if pos == self.known.0 { self.known.1 } else { claim };
        }
        if pos == 0 {
            self.known = (0, 0);
            return 0;
        }
        match self.relay.read_after(pos - 1, 1) {
            // The entry at `pos`, or (reclaimed) the next one: at least as late.
            Ok(v) => match v.first() {
                Some(e) => {
                    self.known = (pos, e.relay_ts_us);
                    e.relay_ts_us
                }
                None => self.newest(),
            },
            Err(_) => self.newest(),
        }
    }
}
