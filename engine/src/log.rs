//! The node's durable, ordered log of ChangeSets (sled).
//!
//! At a branch the log holds the branch's own ChangeSets; at the main it
//! holds the main's whole decoded stream (its own ChangeSets and the ones it
//! applied for branches), which is the relay.
//!
//! # Layout (one sled tree, so one batch is atomic)
//!
//! ```text
//! 'e' pos:u64be      -> FORMAT_VERSION:u8 ++ rmp(LogEntry)
//! 'm' "visible"      -> u64be   newest position a reader may see
//! 'm' "captured_lsn" -> u64be   commit LSN of the last fully logged transaction
//! 'm' "stamp"        -> u64be   last hybrid-clock stamp given out
//! 'm' "seen_main_ts" -> i64be   causal context reached (branch: main's time of the last relay entry applied)
//! 'm' "floor"        -> u64be   every position <= floor was reclaimed
//! 'a' peer           -> u64be   the peer's acknowledged position
//! ```
//!
//! # Crash safety
//!
//! Capture appends the fragments of a large transaction as they fill up,
//! invisible (position above `visible`). The batch holding the last fragment
//! also moves `visible`, `captured_lsn` and `stamp`: one atomic sled batch.
//! [`ChangeLog::flush`] makes it durable; only then may capture confirm the
//! slot (R1). On open, fragments above `visible` (a transaction torn by a
//! crash) are removed: the slot re-delivers that transaction whole.
//!
//! Space is reclaimed only through [`ChangeLog::reclaim_through`], which
//! the link calls with the smallest acknowledgement of all peers that need
//! the entries.

use std::path::Path;

use branchsync_proto::LogEntry;
use tokio::sync::watch;

use crate::EngineError;

/// Version byte in front of every stored entry.
pub const FORMAT_VERSION: u8 = 1;

const META_VISIBLE: &[u8] = b"mvisible";
const META_CAPTURED: &[u8] = b"mcaptured_lsn";
const META_STAMP: &[u8] = b"mstamp";
const META_FLOOR: &[u8] = b"mfloor";
const META_SEEN_MAIN: &[u8] = b"mseen_main_ts";

/// What a completed transaction moves forward, written atomically with its
/// last fragment.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// Commit LSN of the transaction (deduplication, R1).
    pub captured_lsn: u64,
    /// Last hybrid-clock stamp handed out.
    pub stamp: u64,
    /// At a branch: the main's commit time of the last relay entry applied
    /// before this transaction (the causal context of the next one, R15).
    pub seen_main_ts: i64,
}

/// The durable log. Cheap to share behind an `Arc`; sled is thread-safe.
pub struct ChangeLog {
    db: sled::Db,
    tree: sled::Tree,
    visible_tx: watch::Sender<u64>,
    next_pos: std::sync::atomic::AtomicU64,
}

fn entry_key(pos: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'e';
    k[1..].copy_from_slice(&pos.to_be_bytes());
    k
}

fn read_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// Encodes an entry with its format version byte.
pub fn encode_entry(e: &LogEntry) -> Result<Vec<u8>, EngineError> {
    let mut out = vec![FORMAT_VERSION];
    rmp_serde::encode::write(&mut out, e).map_err(|err| EngineError::Corrupt(format!("cannot encode log entry: {err}")))?;
    Ok(out)
}

/// Decodes a stored entry, checking its format version byte.
pub fn decode_entry(bytes: &[u8]) -> Result<LogEntry, EngineError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => {
            rmp_serde::from_slice(body).map_err(|e| EngineError::Corrupt(format!("undecodable log entry: {e}")))
        }
        Some((v, _)) => Err(EngineError::Corrupt(format!("log entry has format version {v}, expected {FORMAT_VERSION}"))),
        None => Err(EngineError::Corrupt("empty log entry".into())),
    }
}

impl ChangeLog {
    /// Opens (or creates) the log in `dir`, dropping torn fragments.
    pub fn open(dir: &Path) -> Result<ChangeLog, EngineError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(EngineError::log(format!("opening the log in {}", dir.display())))?;
        let tree = db.open_tree("log").map_err(EngineError::log("opening the log tree"))?;
        let visible = read_u64(tree.get(META_VISIBLE).map_err(EngineError::log("reading log metadata"))?);
        // Remove fragments of a transaction that a crash cut short.
        let mut torn = sled::Batch::default();
        let mut n = 0;
        for kv in tree.range(entry_key(visible + 1)..=entry_key(u64::MAX)) {
            let (k, _) = kv.map_err(EngineError::log("scanning torn fragments"))?;
            torn.remove(k);
            n += 1;
        }
        if n > 0 {
            tree.apply_batch(torn).map_err(EngineError::log("removing torn fragments"))?;
            tree.flush().map_err(EngineError::log("flushing the log"))?;
            tracing::info!(fragments = n, "removed fragments of a transaction cut short by a crash");
        }
        let (visible_tx, _) = watch::channel(visible);
        Ok(ChangeLog { db, tree, visible_tx, next_pos: std::sync::atomic::AtomicU64::new(visible + 1) })
    }

    /// The next position [`ChangeLog::append`] will use.
    pub fn allocate_pos(&self) -> u64 {
        self.next_pos.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Appends entries (positions from [`ChangeLog::allocate_pos`]) in one
    /// atomic batch; with `completion`, the entries become visible and the
    /// capture metadata moves forward in the same batch. Not durable until
    /// [`ChangeLog::flush`].
    pub fn append(&self, entries: &[LogEntry], completion: Option<Completion>) -> Result<(), EngineError> {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&entry_key(e.pos)[..], encode_entry(e)?);
        }
        if let Some(c) = completion {
            let visible = self.next_pos.load(std::sync::atomic::Ordering::SeqCst) - 1;
            batch.insert(META_VISIBLE, &visible.to_be_bytes());
            batch.insert(META_CAPTURED, &c.captured_lsn.to_be_bytes());
            batch.insert(META_STAMP, &c.stamp.to_be_bytes());
            batch.insert(META_SEEN_MAIN, &c.seen_main_ts.to_be_bytes());
        }
        self.tree.apply_batch(batch).map_err(EngineError::log("appending to the log"))
    }

    /// Makes everything appended so far durable, then publishes the new
    /// visible position to readers.
    pub async fn flush(&self) -> Result<(), EngineError> {
        self.tree.flush_async().await.map_err(EngineError::log("flushing the log"))?;
        let visible = read_u64(self.tree.get(META_VISIBLE).map_err(EngineError::log("reading log metadata"))?);
        self.visible_tx.send_if_modified(|v| {
            if *v != visible {
                *v = visible;
                true
            } else {
                false
            }
        });
        Ok(())
    }

    /// Newest position readers may see.
    pub fn visible(&self) -> u64 {
        *self.visible_tx.borrow()
    }

    /// A receiver that changes whenever new entries become visible.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.visible_tx.subscribe()
    }

    /// Commit LSN of the last fully logged transaction (0 = none).
    pub fn captured_lsn(&self) -> Result<u64, EngineError> {
        Ok(read_u64(self.tree.get(META_CAPTURED).map_err(EngineError::log("reading log metadata"))?))
    }

    /// Last hybrid-clock stamp handed out (0 = none).
    pub fn last_stamp(&self) -> Result<u64, EngineError> {
        Ok(read_u64(self.tree.get(META_STAMP).map_err(EngineError::log("reading log metadata"))?))
    }

    /// The causal context capture reached (see [`Completion::seen_main_ts`]).
    pub fn seen_main_ts(&self) -> Result<i64, EngineError> {
        Ok(read_u64(self.tree.get(META_SEEN_MAIN).map_err(EngineError::log("reading log metadata"))?) as i64)
    }

    /// Every position up to and including this one was reclaimed.
    pub fn floor(&self) -> Result<u64, EngineError> {
        Ok(read_u64(self.tree.get(META_FLOOR).map_err(EngineError::log("reading log metadata"))?))
    }

    /// `true` if an entry at exactly `pos` is stored.
    pub fn contains(&self, pos: u64) -> Result<bool, EngineError> {
        self.tree.contains_key(entry_key(pos)).map_err(EngineError::log("reading the log"))
    }

    /// Visible entries after `after`, in order, up to about `max_bytes` of
    /// encoded size (at least one entry when one is there).
    pub fn read_after(&self, after: u64, max_bytes: usize) -> Result<Vec<LogEntry>, EngineError> {
        let visible = self.visible();
        let mut out = Vec::new();
        if after >= visible {
            return Ok(out);
        }
        let mut bytes = 0;
        for kv in self.tree.range(entry_key(after + 1)..=entry_key(visible)) {
            let (_, v) = kv.map_err(EngineError::log("reading the log"))?;
            bytes += v.len();
            out.push(decode_entry(&v)?);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Number of stored visible entries after `after` (for status).
    pub fn count_after(&self, after: u64) -> u64 {
        let visible = self.visible();
        if after >= visible {
            return 0;
        }
        self.tree.range(entry_key(after + 1)..=entry_key(visible)).count() as u64
    }

    /// Records a peer's acknowledged position.
    pub fn set_peer_ack(&self, peer: &str, pos: u64) -> Result<(), EngineError> {
        let key = [b"a".as_slice(), peer.as_bytes()].concat();
        self.tree.insert(key, &pos.to_be_bytes()).map_err(EngineError::log("recording an acknowledgement"))?;
        Ok(())
    }

    /// A peer's acknowledged position (0 = never).
    pub fn peer_ack(&self, peer: &str) -> Result<u64, EngineError> {
        let key = [b"a".as_slice(), peer.as_bytes()].concat();
        Ok(read_u64(self.tree.get(key).map_err(EngineError::log("reading an acknowledgement"))?))
    }

    /// Removes entries up to and including `pos` (never past `visible`).
    /// Returns how many were removed.
    pub fn reclaim_through(&self, pos: u64) -> Result<u64, EngineError> {
        let pos = pos.min(self.visible());
        let floor = self.floor()?;
        if pos <= floor {
            return Ok(0);
        }
        let mut removed = 0;
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(entry_key(floor + 1)..=entry_key(pos)) {
            let (k, _) = kv.map_err(EngineError::log("scanning for reclaim"))?;
            batch.remove(k);
            removed += 1;
            if removed % 10_000 == 0 {
                self.tree.apply_batch(std::mem::take(&mut batch)).map_err(EngineError::log("reclaiming log space"))?;
            }
        }
        batch.insert(META_FLOOR, &pos.to_be_bytes());
        self.tree.apply_batch(batch).map_err(EngineError::log("reclaiming log space"))?;
        Ok(removed)
    }

    /// Bytes the log uses on disk (for status and alarms).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchsync_proto::{ChangeSetHeader, RowChange, TableDesc, Value};

    fn entry(log: &ChangeLog, part: u32, last: bool) -> LogEntry {
        LogEntry {
            pos: log.allocate_pos(),
            header: ChangeSetHeader {
                author: "b1".into(),
                author_index: 1,
                system_id: 9,
                commit_lsn: 100,
                commit_ts_us: 5,
                stamp: 5,
                seen_main_ts: 0,
            },
            part,
            last,
            tables: vec![TableDesc {
                schema: "public".into(),
                name: "t".into(),
                columns: vec!["id".into()],
                key: vec![true],
                identity_full: false,
            }],
            changes: vec![RowChange::Insert { table: 0, new: vec![Value::Text(part.to_string())] }],
            relay_ts_us: 0,
        }
    }

    #[tokio::test]
    async fn fragments_of_a_torn_transaction_vanish_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ChangeLog::open(dir.path()).unwrap();
            let a = entry(&log, 0, true);
            log.append(&[a], Some(Completion { captured_lsn: 100, stamp: 5, seen_main_ts: 0 })).unwrap();
            let b = entry(&log, 0, false);
            log.append(&[b], None).unwrap();
            log.flush().await.unwrap();
            assert_eq!(log.visible(), 1);
        }
        let log = ChangeLog::open(dir.path()).unwrap();
        assert_eq!(log.visible(), 1);
        assert_eq!(log.captured_lsn().unwrap(), 100);
        assert!(!log.contains(2).unwrap(), "torn fragment must be gone");
        assert_eq!(log.allocate_pos(), 2);
        assert_eq!(log.read_after(0, 1 << 20).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn reclaim_removes_only_acknowledged_entries() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        for _ in 0..5 {
            let e = entry(&log, 0, true);
            log.append(&[e], Some(Completion { captured_lsn: 1, stamp: 1, seen_main_ts: 0 })).unwrap();
        }
        log.flush().await.unwrap();
        assert_eq!(log.reclaim_through(3).unwrap(), 3);
        assert_eq!(log.floor().unwrap(), 3);
        let rest: Vec<u64> = log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect();
        assert_eq!(rest, vec![4, 5]);
        assert_eq!(log.reclaim_through(99).unwrap(), 2, "never past visible");
        assert_eq!(log.floor().unwrap(), 5);
    }

    #[test]
    fn a_future_format_version_is_refused() {
        assert!(matches!(decode_entry(&[9, 1, 2]), Err(EngineError::Corrupt(_))));
        assert!(matches!(decode_entry(&[]), Err(EngineError::Corrupt(_))));
    }
}
