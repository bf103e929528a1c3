//! The branchsync engine: everything that touches the local database and the
//! local log, and nothing that touches the network.
//!
//! ```text
//!   PostgreSQL WAL --[capture]--> ChangeLog (segment files) --(server's link)--> peer
//!   peer --(server's link)--> [apply] --> PostgreSQL (origin + progress in one xact)
//! ```
//!
//! * [`capture`] drains the node's own logical slot (pgoutput) into the
//!   [`log`], and confirms the slot only after the log write is durable.
//! * [`log`] is the durable, ordered store of ChangeSets with per-peer
//!   acknowledgements; space is reclaimed only after every peer acknowledged.
//! * [`apply`] writes incoming ChangeSets under the author's replication
//!   origin, batched, with the stream progress in the same transaction.
//! * [`catalog`] is what capture, apply and verify know of a local table:
//!   columns by name, key, foreign keys, key text, rows as JSON.
//! * [`conflict`] holds the rules that decide between concurrent versions
//!   (a total order per rule); [`conflict_log`] lists and settles what they
//!   discarded.
//! * [`keys`] stripes sequences so nodes never hand out the same id.
//! * [`ddl`] puts schema changes into the stream where they ran (event
//!   triggers) and decides which of a peer's statements may replay here.
//! * [`setup`] is `branchsync init`: preflight checks, state schema,
//!   publication, slot, stripes.
//! * [`verify`] compares this node's copy of the replicated tables with
//!   another's by bucket summaries, and settles what is in flight before it
//!   calls a row different.
//!
//! The engine never opens a socket to another node: the `server` crate owns
//! the link and hands entries to [`apply`] over a channel.

pub mod apply;
pub mod capture;
pub(crate) mod catalog;
pub mod clock;
pub mod cluster;
pub mod conflict;
pub mod conflict_log;
pub mod ddl;
pub mod error;
pub mod failpoints;
pub mod join;
pub mod keys;
pub mod log;
pub(crate) mod marks;
pub mod pg;
pub(crate) mod pgoutput;
pub mod progress;
pub mod scope;
pub mod setup;
pub mod state;
pub mod verify;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use error::EngineError;

/// The role of a node in the hub-and-spoke topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The head office: applies every branch and relays to all.
    Main,
    /// A shop: pushes its own changes, applies the main's relay.
    Branch,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Main => "main",
            Role::Branch => "branch",
        })
    }
}
