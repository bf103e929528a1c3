//! Named failpoints at the durability boundaries.
//!
//! With the `failpoints` feature, a failpoint named in the environment
//! variable `BRANCHSYNC_FAILPOINT` (optionally `NAME:N` to fire on the N-th
//! hit) kills the process with exit code 137 at that point, as `kill -9`
//! would. Without the feature [`hit`] compiles to nothing. Crash tests use
//! these to land a crash inside the window each boundary protects.

/// After a ChangeSet is durable in the log, before the slot is confirmed.
pub const CAPTURE_AFTER_LOG_WRITE: &str = "capture.after_log_write_before_slot_confirm";
/// After the apply transaction is sent, before COMMIT.
pub const APPLY_BEFORE_COMMIT: &str = "apply.before_commit";
/// After the apply transaction committed, before the acknowledgement is sent.
pub const APPLY_AFTER_COMMIT: &str = "apply.after_commit_before_ack";
/// After entries were relayed to a peer, before its acknowledgement reclaims them.
pub const LINK_AFTER_SEND: &str = "link.after_send_before_ack";
/// After an acknowledgement arrived, before the log reclaims the entries.
pub const LOG_BEFORE_RECLAIM: &str = "log.after_ack_before_reclaim";

/// Crashes the process here if the failpoint `name` is armed.
#[inline]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    armed::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(name: &str) {
        let armed = ARMED.get_or_init(|| {
            let v = std::env::var("BRANCHSYNC_FAILPOINT").ok()?;
            let (n, count) = match v.split_once(':') {
                Some((n, c)) => (n.to_string(), c.parse().unwrap_or(1)),
                None => (v, 1),
            };
            Some((n, count))
        });
        if let Some((n, count)) = armed {
            if n == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= *count {
                eprintln!("failpoint {name} fired: exiting like kill -9");
                std::process::exit(137);
            }
        }
    }
}
