//! Progress of long work (init's tables and sequences; a seed or a
//! comparison later), told to whoever shows it.
//!
//! The engine only counts: it says when a phase starts and how many of its
//! steps are done. Showing it (a bar on a terminal, a log line every few
//! seconds otherwise) is the caller's; the engine never writes to a
//! terminal. A [`Progress`] must be cheap to call once per step and must
//! not block: it is called between statements of an open transaction.

/// Receives the progress of one piece of long work.
pub trait Progress: Send + Sync {
    /// A phase starts: `name` (what it does, lowercase, e.g. "striping
    /// sequences") and how many steps it has.
    fn phase(&self, name: &str, total: u64);
    /// `n` more steps of the current phase are done.
    fn advance(&self, n: u64);
    /// The current phase is over (all its steps done or it stopped early).
    fn finish(&self);
}

/// Progress nobody watches.
pub struct Silent;

impl Progress for Silent {
    fn phase(&self, _name: &str, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}
