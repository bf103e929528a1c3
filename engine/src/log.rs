//! The node's durable, ordered log of ChangeSets: segment files of
//! checksummed records, written by one appender, read by many.
//!
//! At a branch the log holds the branch's own ChangeSets; at the main it
//! holds the main's whole decoded stream (its own ChangeSets and the ones it
//! applied for branches), which is the relay.
//!
//! # Layout (in the log directory)
//!
//! ```text
//! seg-<first pos, 20 digits>.log   records, appended in order:
//!     len:u32le  crc32(body):u32le  body
//!     body = 1 pos:u64le entry       an entry (FORMAT_VERSION ++ rmp(LogEntry))
//!          | 2 visible captured_lsn stamp seen_main_ts (u64le each)
//!                                     a completion: everything up to
//!                                     `visible` is a whole transaction
//! meta        floor and the peers' acknowledgements (text), replaced
//!             atomically (write, fsync, rename) before segments are deleted
//! ```
//!
//! # Crash safety
//!
//! Capture appends the fragments of a large transaction as they fill up
//! (entry records), then one batch with the last fragment and a completion
//! record that moves `visible`, `captured_lsn` and `stamp`. A batch is one
//! `write` at the end of the active segment. [`ChangeLog::flush`] fsyncs it;
//! only then is the new `visible` published to readers and may capture
//! confirm the slot (R1). On open the segments are read in order and the
//! stream ends at the first record whose length or checksum does not hold
//! (a write cut short by a crash); everything after the last completion
//! record (fragments of a torn transaction, a torn record) is cut off: the
//! slot re-delivers that transaction whole. Records are never rewritten.
//!
//! A failed write is cut back off the file before the error is returned; if
//! even that fails the log refuses every later append (a hole in the middle
//! of the stream would hide what follows it at the next open).
//!
//! Space is reclaimed only through [`ChangeLog::reclaim_through`], which
//! the link calls with the smallest acknowledgement of all peers that need
//! the entries: whole segments below the floor are deleted, after the floor
//! is durable in `meta`.
//!
//! (Until 2026-11 the log was a sled tree. sled 0.34 deadlocks under a
//! heavy write load: a thread holding its segment accountant waits for a
//! file truncation queued behind I/O threads that wait for that accountant;
//! the daemon then hung with no error. This format has no background
//! threads at all.)

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use branchsync_proto::LogEntry;
use tokio::sync::watch;

use crate::EngineError;

/// Version byte in front of every stored entry.
pub const FORMAT_VERSION: u8 = 1;

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Record kinds.
const REC_ENTRY: u8 = 1;
const REC_COMPLETION: u8 = 2;
/// Largest record accepted when reading (a length beyond it is a torn or
/// corrupt header).
const MAX_RECORD: u32 = 1 << 30;

/// What a completed transaction moves forward, written atomically with its
/// last fragment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Completion {
    /// Commit LSN of the transaction (deduplication, R1).
    pub captured_lsn: u64,
    /// Last hybrid-clock stamp handed out.
    pub stamp: u64,
    /// At a branch: the main's commit time of the last relay entry applied
    /// before this transaction (the causal context of the next one, R15).
    pub seen_main_ts: i64,
}

/// Where an entry's bytes are.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u64,
    off: u64,
    len: u32,
}

/// One segment file.
struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Highest position stored in it (0: none).
    max_pos: u64,
}

/// Everything behind the lock.
struct State {
    dir: PathBuf,
    /// Segments by their first position; the last one is active.
    segs: BTreeMap<u64, Segment>,
    /// End of the active segment.
    tail: u64,
    /// Stored entries, by increasing position.
    index: VecDeque<(u64, Loc)>,
    /// The last completion appended (durable after the next flush).
    completion: Completion,
    /// `visible` of the last completion appended.
    appended_visible: u64,
    floor: u64,
    acks: BTreeMap<String, u64>,
    /// A failed write could not be cut back: no more appends.
    broken: bool,
    /// Rotation size ([`SEGMENT_BYTES`]; smaller in tests).
    segment_bytes: u64,
}

/// The durable log. Cheap to share behind an `Arc`.
pub struct ChangeLog {
    state: Mutex<State>,
    visible_tx: watch::Sender<u64>,
    next_pos: std::sync::atomic::AtomicU64,
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

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.log"))
}

/// Appends one framed record to `buf`.
fn frame(buf: &mut Vec<u8>, body: &[u8]) {
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    buf.extend_from_slice(body);
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One record read back while opening.
enum Rec {
    Entry { pos: u64, loc: Loc },
    Completion { visible: u64, c: Completion },
}

/// Reads the records of one segment until its end or the first record
/// that does not hold; returns them with the offset where each ends.
fn scan_segment(file: &mut File, seg: u64) -> std::io::Result<Vec<(Rec, u64)>> {
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut off = 0usize;
    while off + 8 <= data.len() {
        let len = u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]);
        let crc = u32::from_le_bytes([data[off + 4], data[off + 5], data[off + 6], data[off + 7]]);
        let start = off + 8;
        let Some(end) = start.checked_add(len as usize) else { break };
        if len == 0 || len > MAX_RECORD || end > data.len() {
            break;
        }
        let body = &data[start..end];
        if crc32fast::hash(body) != crc {
            break;
        }
        let rec = match body[0] {
            REC_ENTRY if body.len() > 9 => Rec::Entry { pos: u64_at(body, 1), loc: Loc { seg, off: (start + 9) as u64, len: len - 9 } },
            REC_COMPLETION if body.len() == 33 => Rec::Completion {
                visible: u64_at(body, 1),
                c: Completion { captured_lsn: u64_at(body, 9), stamp: u64_at(body, 17), seen_main_ts: u64_at(body, 25) as i64 },
            },
            _ => break,
        };
        out.push((rec, end as u64));
        off = end;
    }
    Ok(out)
}

fn read_meta(dir: &Path) -> Result<(u64, BTreeMap<String, u64>), EngineError> {
    let path = dir.join("meta");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, BTreeMap::new())),
        Err(e) => return Err(EngineError::log(format!("reading {}", path.display()))(e)),
    };
    let mut floor = 0;
    let mut acks = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[..] {
            ["floor", n] => floor = n.parse().map_err(|_| EngineError::Corrupt(format!("{}: bad line {line:?}", path.display())))?,
            ["ack", peer, n] => {
                acks.insert(peer.to_string(), n.parse().map_err(|_| EngineError::Corrupt(format!("{}: bad line {line:?}", path.display())))?);
            }
            [""] | [] => {}
            _ => return Err(EngineError::Corrupt(format!("{}: bad line {line:?}", path.display()))),
        }
    }
    Ok((floor, acks))
}

impl State {
    fn active(&self) -> Option<(&u64, &Segment)> {
        self.segs.iter().next_back()
    }

    fn write_meta(&self) -> std::io::Result<()> {
        let mut text = format!("floor {}\n", self.floor);
        for (p, n) in &self.acks {
            text.push_str(&format!("ack {p} {n}\n"));
        }
        let tmp = self.dir.join("meta.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("meta"))?;
        sync_dir(&self.dir)
    }

    /// Starts a new active segment whose first position is `first`; the
    /// previous one is made durable first (flush only syncs the active one).
    fn rotate(&mut self, first: u64) -> std::io::Result<()> {
        if let Some((_, s)) = self.active() {
            s.file.sync_data()?;
        }
        let path = seg_path(&self.dir, first);
        let file = OpenOptions::new().create(true).read(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.segs.insert(first, Segment { file: Arc::new(file), path, max_pos: 0 });
        self.tail = 0;
        Ok(())
    }
}

impl ChangeLog {
    /// Opens (or creates) the log in `dir`, cutting off what follows the
    /// last whole transaction.
    pub fn open(dir: &Path) -> Result<ChangeLog, EngineError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, segment_bytes: u64) -> Result<ChangeLog, EngineError> {
        std::fs::create_dir_all(dir).map_err(EngineError::log(format!("creating the log directory {}", dir.display())))?;
        if dir.join("conf").exists() && dir.join("db").exists() {
            return Err(EngineError::Misconfigured {
                message: format!("the log in {} was written by an earlier branchsync (sled format)", dir.display()),
                detail: "This version keeps its log in segment files.".into(),
                hint: "Let the node send everything it has (status shows nothing pending), stop it, move the directory away and start again.".into(),
            });
        }
        let (floor, acks) = read_meta(dir)?;
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(dir).map_err(EngineError::log(format!("listing {}", dir.display())))? {
            let e = e.map_err(EngineError::log(format!("listing {}", dir.display())))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse::<u64>().ok()) {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        // Read every segment; remember where the last completion ends.
        let mut segs = BTreeMap::new();
        let mut recs: Vec<(Rec, u64, u64)> = Vec::new(); // record, segment, end offset
        let mut stop = false;
        for first in firsts {
            let path = seg_path(dir, first);
            let mut file = OpenOptions::new().read(true).append(true).open(&path).map_err(EngineError::log(format!("opening {}", path.display())))?;
            if !stop {
                let got = scan_segment(&mut file, first).map_err(EngineError::log(format!("reading {}", path.display())))?;
                let len = file.metadata().map_err(EngineError::log(format!("reading {}", path.display())))?.len();
                let end = got.last().map(|(_, e)| *e).unwrap_or(0);
                // A record that does not hold ends the stream, here and in
                // every later segment.
                stop = end < len;
                recs.extend(got.into_iter().map(|(r, e)| (r, first, e)));
            }
            segs.insert(first, Segment { file: Arc::new(file), path, max_pos: 0 });
        }
        let last_completion = recs.iter().rposition(|(r, _, _)| matches!(r, Rec::Completion { .. }));
        // Cut point: after the last completion, or (none) the very start.
        let (cut_seg, cut_off) = match last_completion {
            Some(i) => (recs[i].1, recs[i].2),
            None => (segs.keys().next().copied().unwrap_or(0), 0),
        };
        let kept = last_completion.map(|i| i + 1).unwrap_or(0);
        let torn = recs.len() - kept;
        recs.truncate(kept);
        let mut cut_anything = torn > 0;
        let later: Vec<u64> = segs.range(cut_seg + 1..).map(|(k, _)| *k).collect();
        for k in later {
            if let Some(s) = segs.remove(&k) {
                std::fs::remove_file(&s.path).map_err(EngineError::log(format!("removing {}", s.path.display())))?;
                cut_anything = true;
            }
        }
        if let Some(s) = segs.get(&cut_seg) {
            let len = s.file.metadata().map_err(EngineError::log(format!("reading {}", s.path.display())))?.len();
            if len > cut_off {
                s.file.set_len(cut_off).map_err(EngineError::log(format!("cutting {} at {cut_off}", s.path.display())))?;
                cut_anything = true;
            }
        }
        if cut_anything {
            for s in segs.values() {
                s.file.sync_all().map_err(EngineError::log(format!("syncing {}", s.path.display())))?;
            }
            sync_dir(dir).map_err(EngineError::log("syncing the log directory"))?;
            tracing::info!(fragments = torn, "removed fragments of a transaction cut short by a crash");
        }
        let mut index = VecDeque::new();
        let mut completion = Completion::default();
        let mut visible = 0;
        for (r, seg, _) in recs {
            match r {
                Rec::Entry { pos, loc } => {
                    if let Some(s) = segs.get_mut(&seg) {
                        s.max_pos = s.max_pos.max(pos);
                    }
                    if pos > floor {
                        index.push_back((pos, loc));
                    }
                }
                Rec::Completion { visible: v, c } => {
                    visible = v;
                    completion = c;
                }
            }
        }
        let tail = segs.values().next_back().map(|s| s.file.metadata().map(|m| m.len())).transpose().map_err(EngineError::log("reading the active segment"))?.unwrap_or(0);
        let mut state = State { dir: dir.to_path_buf(), segs, tail, index, completion, appended_visible: visible, floor, acks, broken: false, segment_bytes };
        if state.segs.is_empty() {
            state.rotate(visible.max(floor) + 1).map_err(EngineError::log("creating the first log segment"))?;
        }
        let (visible_tx, _) = watch::channel(visible);
        Ok(ChangeLog { state: Mutex::new(state), visible_tx, next_pos: std::sync::atomic::AtomicU64::new(visible.max(floor) + 1) })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next position [`ChangeLog::append`] will use.
    pub fn allocate_pos(&self) -> u64 {
        self.next_pos.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Appends entries (positions from [`ChangeLog::allocate_pos`]) in one
    /// write; with `completion`, the entries become visible (after the next
    /// flush) and the capture metadata moves forward in the same write. Not
    /// durable until [`ChangeLog::flush`].
    pub fn append(&self, entries: &[LogEntry], completion: Option<Completion>) -> Result<(), EngineError> {
        let mut buf = Vec::new();
        let mut locs = Vec::with_capacity(entries.len());
        for e in entries {
            let bytes = encode_entry(e)?;
            let mut body = Vec::with_capacity(9 + bytes.len());
            body.push(REC_ENTRY);
            body.extend_from_slice(&e.pos.to_le_bytes());
            body.extend_from_slice(&bytes);
            let at = buf.len() as u64 + 8 + 9;
            frame(&mut buf, &body);
            locs.push((e.pos, at, bytes.len() as u32));
        }
        let visible = self.next_pos.load(std::sync::atomic::Ordering::SeqCst) - 1;
        if let Some(c) = completion {
            let mut body = Vec::with_capacity(33);
            body.push(REC_COMPLETION);
            for v in [visible, c.captured_lsn, c.stamp, c.seen_main_ts as u64] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            frame(&mut buf, &body);
        }
        let mut st = self.lock();
        if st.broken {
            return Err(EngineError::Corrupt("the log refuses appends after a write it could not undo; restart the daemon".into()));
        }
        if st.tail >= st.segment_bytes {
            // Named after its first position; always after the active one.
            let after = st.active().map(|(k, _)| *k + 1).unwrap_or(0);
            let first = entries.first().map(|e| e.pos).unwrap_or(visible + 1).max(after);
            st.rotate(first).map_err(EngineError::log("starting a new log segment"))?;
        }
        let (&seg, active) = st.active().ok_or_else(|| EngineError::Corrupt("the log has no active segment".into()))?;
        let file = active.file.clone();
        let base = st.tail;
        if let Err(e) = (&*file).write_all(&buf) {
            // Cut the partial write off again: a hole would hide the rest.
            if file.set_len(base).is_err() {
                st.broken = true;
            }
            return Err(EngineError::log("appending to the log")(e));
        }
        st.tail = base + buf.len() as u64;
        for (pos, at, len) in locs {
            st.index.push_back((pos, Loc { seg, off: base + at, len }));
            if let Some(s) = st.segs.get_mut(&seg) {
                s.max_pos = s.max_pos.max(pos);
            }
        }
        if let Some(c) = completion {
            st.completion = c;
            st.appended_visible = visible;
        }
        Ok(())
    }

    /// Makes everything appended so far durable, then publishes the new
    /// visible position to readers.
    pub async fn flush(&self) -> Result<(), EngineError> {
        let (file, visible) = {
            let st = self.lock();
            (st.active().map(|(_, s)| s.file.clone()), st.appended_visible)
        };
        if let Some(file) = file {
            tokio::task::spawn_blocking(move || file.sync_data())
                .await
                .map_err(|e| EngineError::Corrupt(format!("log flush task failed: {e}")))?
                .map_err(EngineError::log("flushing the log"))?;
        }
        self.visible_tx.send_if_modified(|v| {
            if *v < visible {
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
        Ok(self.lock().completion.captured_lsn)
    }

    /// Last hybrid-clock stamp handed out (0 = none).
    pub fn last_stamp(&self) -> Result<u64, EngineError> {
        Ok(self.lock().completion.stamp)
    }

    /// The causal context capture reached (see [`Completion::seen_main_ts`]).
    pub fn seen_main_ts(&self) -> Result<i64, EngineError> {
        Ok(self.lock().completion.seen_main_ts)
    }

    /// Every position up to and including this one was reclaimed.
    pub fn floor(&self) -> Result<u64, EngineError> {
        Ok(self.lock().floor)
    }

    /// `true` if an entry at exactly `pos` is stored.
    pub fn contains(&self, pos: u64) -> Result<bool, EngineError> {
        let st = self.lock();
        Ok(st.index.binary_search_by_key(&pos, |(p, _)| *p).is_ok())
    }

    /// Visible entries after `after`, in order, up to about `max_bytes` of
    /// encoded size (at least one entry when one is there).
    pub fn read_after(&self, after: u64, max_bytes: usize) -> Result<Vec<LogEntry>, EngineError> {
        let visible = self.visible();
        if after >= visible {
            return Ok(Vec::new());
        }
        let mut wanted = Vec::new();
        {
            let st = self.lock();
            let from = st.index.partition_point(|(p, _)| *p <= after);
            let mut bytes = 0usize;
            for (pos, loc) in st.index.range(from..) {
                if *pos > visible {
                    break;
                }
                let Some(seg) = st.segs.get(&loc.seg) else { break };
                wanted.push((seg.file.clone(), *loc));
                bytes += loc.len as usize;
                if bytes >= max_bytes {
                    break;
                }
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        let mut buf = Vec::new();
        for (file, loc) in wanted {
            buf.resize(loc.len as usize, 0);
            file.read_exact_at(&mut buf, loc.off).map_err(EngineError::log("reading the log"))?;
            out.push(decode_entry(&buf)?);
        }
        Ok(out)
    }

    /// Number of stored visible entries after `after` (for status).
    pub fn count_after(&self, after: u64) -> u64 {
        let visible = self.visible();
        if after >= visible {
            return 0;
        }
        let st = self.lock();
        let from = st.index.partition_point(|(p, _)| *p <= after);
        let to = st.index.partition_point(|(p, _)| *p <= visible);
        to.saturating_sub(from) as u64
    }

    /// Records a peer's acknowledged position (durable with the next
    /// reclaim that deletes a segment; after a restart a peer acknowledges
    /// again when it connects).
    pub fn set_peer_ack(&self, peer: &str, pos: u64) -> Result<(), EngineError> {
        self.lock().acks.insert(peer.to_string(), pos);
        Ok(())
    }

    /// A peer's acknowledged position (0 = never).
    pub fn peer_ack(&self, peer: &str) -> Result<u64, EngineError> {
        Ok(self.lock().acks.get(peer).copied().unwrap_or(0))
    }

    /// Removes entries up to and including `pos` (never past `visible`).
    /// Returns how many were removed.
    pub fn reclaim_through(&self, pos: u64) -> Result<u64, EngineError> {
        let pos = pos.min(self.visible());
        let mut st = self.lock();
        if pos <= st.floor {
            return Ok(0);
        }
        let n = st.index.partition_point(|(p, _)| *p <= pos);
        st.index.drain(..n);
        st.floor = pos;
        // Whole segments below the floor go, the active one never; the
        // floor is durable before any file is deleted.
        let active = st.active().map(|(k, _)| *k);
        let doomed: Vec<u64> = st.segs.iter().filter(|(k, s)| Some(**k) != active && s.max_pos <= pos).map(|(k, _)| *k).collect();
        if !doomed.is_empty() {
            st.write_meta().map_err(EngineError::log("recording the log floor"))?;
            for k in doomed {
                if let Some(s) = st.segs.remove(&k) {
                    std::fs::remove_file(&s.path).map_err(EngineError::log(format!("removing {}", s.path.display())))?;
                }
            }
        }
        Ok(n as u64)
    }

    /// Bytes the log uses on disk (for status and alarms).
    pub fn size_on_disk(&self) -> u64 {
        let st = self.lock();
        st.segs.values().filter_map(|s| s.file.metadata().ok()).map(|m| m.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
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

    fn complete(log: &ChangeLog, lsn: u64) {
        let e = entry(log, 0, true);
        log.append(&[e], Some(Completion { captured_lsn: lsn, stamp: lsn, seen_main_ts: 0 })).unwrap();
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| n.starts_with("seg-")).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_record_cut_short_by_a_crash_is_cut_off_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ChangeLog::open(dir.path()).unwrap();
            complete(&log, 10);
            complete(&log, 20);
            log.flush().await.unwrap();
        }
        // A crash in the middle of the next write: half a record.
        let seg = dir.path().join(&segments(dir.path())[0]);
        let whole = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 1, 9]).unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), whole, "the torn record is cut off");
        assert_eq!((log.visible(), log.captured_lsn().unwrap()), (2, 20));
        complete(&log, 30);
        log.flush().await.unwrap();
        drop(log);
        let log = ChangeLog::open(dir.path()).unwrap();
        let got: Vec<u64> = log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect();
        assert_eq!(got, vec![1, 2, 3], "what came after the cut is readable after the next open");
        assert_eq!(log.captured_lsn().unwrap(), 30);
    }

    #[tokio::test]
    async fn a_flipped_byte_ends_the_stream_at_the_last_whole_transaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ChangeLog::open(dir.path()).unwrap();
            for lsn in 1..=3 {
                complete(&log, lsn);
            }
            log.flush().await.unwrap();
        }
        let seg = dir.path().join(&segments(dir.path())[0]);
        let mut bytes = std::fs::read(&seg).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 0xff; // inside the last entry record
        std::fs::write(&seg, &bytes).unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        assert_eq!(log.visible(), 2);
        assert_eq!(log.captured_lsn().unwrap(), 2, "the slot re-delivers the third transaction");
    }

    #[tokio::test]
    async fn segments_rotate_and_reclaim_deletes_whole_ones_only_after_the_floor_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open_with(dir.path(), 600).unwrap();
        for lsn in 1..=40 {
            complete(&log, lsn);
        }
        log.flush().await.unwrap();
        let before = segments(dir.path());
        assert!(before.len() > 3, "{before:?}");
        assert_eq!(log.read_after(0, 1 << 20).unwrap().len(), 40);
        assert_eq!(log.count_after(10), 30);
        log.set_peer_ack("branch1", 30).unwrap();
        assert_eq!(log.reclaim_through(30).unwrap(), 30);
        let after = segments(dir.path());
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert_eq!(log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect::<Vec<_>>(), (31..=40).collect::<Vec<_>>());
        drop(log);
        let log = ChangeLog::open_with(dir.path(), 600).unwrap();
        assert_eq!(log.floor().unwrap(), 30);
        assert_eq!(log.peer_ack("branch1").unwrap(), 30);
        assert_eq!(log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect::<Vec<_>>(), (31..=40).collect::<Vec<_>>());
        assert_eq!(log.allocate_pos(), 41);
    }

    #[tokio::test]
    async fn a_torn_transaction_spanning_segments_vanishes_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ChangeLog::open_with(dir.path(), 400).unwrap();
            complete(&log, 1);
            log.flush().await.unwrap();
            for part in 0..8 {
                let e = entry(&log, part, false);
                log.append(&[e], None).unwrap();
            }
            log.flush().await.unwrap();
            assert!(segments(dir.path()).len() > 1);
        }
        let log = ChangeLog::open_with(dir.path(), 400).unwrap();
        assert_eq!(segments(dir.path()).len(), 1, "segments holding only torn fragments are removed");
        assert_eq!(log.visible(), 1);
        assert_eq!(log.read_after(0, 1 << 20).unwrap().len(), 1);
        assert_eq!(log.allocate_pos(), 2);
    }

    #[test]
    fn a_sled_log_of_an_earlier_version_is_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("conf"), b"x").unwrap();
        std::fs::write(dir.path().join("db"), b"x").unwrap();
        let e = ChangeLog::open(dir.path()).err().expect("refused").to_string();
        assert!(e.contains("sled format") && e.contains("HINT"), "{e}");
    }

    #[test]
    fn a_future_format_version_is_refused() {
        assert!(matches!(decode_entry(&[9, 1, 2]), Err(EngineError::Corrupt(_))));
        assert!(matches!(decode_entry(&[]), Err(EngineError::Corrupt(_))));
    }
}
