//! Hybrid logical clock stamps.
//!
//! A stamp is microseconds since the Unix epoch, bumped so that it is
//! strictly greater than every stamp this node handed out before. Capture
//! stamps each ChangeSet once, from the commit record's time (never the time
//! capture happened to run), and the last stamp is stored in the log with
//! the ChangeSet, so a restart never hands out a smaller one.

/// Next stamp after `last` for a commit at `commit_ts_us` (µs since epoch).
pub fn next_stamp(last: u64, commit_ts_us: i64) -> u64 {
    let physical = u64::try_from(commit_ts_us).unwrap_or(0);
    physical.max(last.saturating_add(1))
}

/// PostgreSQL timestamps count from 2000-01-01; this converts to Unix µs.
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Current wall clock, µs since the Unix epoch.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_strictly_increasing_even_when_the_clock_steps_back() {
        let a = next_stamp(0, 1_000);
        let b = next_stamp(a, 900);
        let c = next_stamp(b, 5_000);
        assert!(a < b && b < c);
        assert_eq!(c, 5_000);
        assert_eq!(next_stamp(0, -5), 1, "a negative commit time still yields a stamp above the last");
    }
}
