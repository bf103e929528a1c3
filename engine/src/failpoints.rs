//! Named failpoints at the durability boundaries.
//!
//! With the `failpoints` feature, a failpoint named in the environment
//! variable `BRANCHSYNC_FAILPOINT` (optionally `NAME:N` to fire on the N-th
//! hit) kills the process with exit code 137 at that point, as `kill -9`
//! would. `NAME:N:pause` instead stops the thread there (printing
//! `failpoint NAME paused`) until the file named by
//! `BRANCHSYNC_FAILPOINT_RELEASE` exists, so a test can stop PostgreSQL at
//! exactly that point. Without the feature [`hit`] compiles to nothing.
//! Crash tests use these to land a crash inside the window each boundary
//! protects.

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
/// After a fragment of a large transaction went to the log, before the
/// transaction is whole and flushed.
pub const CAPTURE_AFTER_FRAGMENT: &str = "capture.after_fragment_before_flush";
/// After a batch holding a transaction of several fragments is durable in
/// the log, before the slot is confirmed.
pub const CAPTURE_AFTER_FRAGMENTED_FLUSH: &str = "capture.after_fragmented_flush_before_slot_confirm";

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

    static ARMED: OnceLock<Option<(String, u64, bool)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(name: &str) {
        let armed = ARMED.get_or_init(|| {
            let v = std::env::var("BRANCHSYNC_FAILPOINT").ok()?;
            let mut parts = v.split(':');
            let n = parts.next()?.to_string();
            let count = parts.next().and_then(|c| c.parse().ok()).unwrap_or(1);
            let pause = parts.next() == Some("pause");
            Some((n, count, pause))
        });
        if let Some((n, count, pause)) = armed {
            if n != name {
                return;
            }
            let hits = HITS.fetch_add(1, Ordering::SeqCst) + 1;
            if *pause {
                if hits == *count {
                    eprintln!("failpoint {name} paused");
                    let release = std::env::var("BRANCHSYNC_FAILPOINT_RELEASE").unwrap_or_default();
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
                    while !std::path::Path::new(&release).exists() && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    eprintln!("failpoint {name} released");
                }
            } else if hits >= *count {
                eprintln!("failpoint {name} fired: exiting like kill -9");
                std::process::exit(137);
            }
        }
    }
}
