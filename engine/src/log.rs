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
//!     body = 3 pos:u64le part:u32le last:u8 entry
//!                                     an entry (ENTRY_FORMAT_VERSION ++ rmp(LogEntry))
//!          | 1 pos:u64le entry        an entry written by an earlier version
//!          | 2 visible captured_lsn stamp seen_main_ts (u64le each)
//!                                     a completion: everything up to
//!                                     `visible` is a whole transaction
//! meta        identity (epoch, mark key), floor, the peers' acknowledgements
//!             and when each peer was last in contact (text), replaced
//!             atomically (write, fsync, rename)
//! ```
//!
//! # Identity (R26)
//!
//! A log is created with a random *epoch* and a random key for the marks
//! this node's apply writes into its WAL ([`crate::marks`]); both live in
//! `meta`. Positions mean something only together with the epoch: the
//! handshake carries it, the receiver's progress records it, and a log that
//! was lost and recreated (a new epoch) is never resumed at an old
//! position.
//!
//! # Crash safety
//!
//! Capture appends the fragments of a large transaction as they fill up
//! (entry records), then the last fragment and a completion record that
//! moves `visible`, `captured_lsn` and `stamp`. [`ChangeLog::flush`] fsyncs;
//! only then is the new `visible` published to readers and may capture
//! confirm the slot (R1). Reading stops at the first record whose length or
//! checksum does not hold (a write cut short by a crash); everything after
//! the last completion record (fragments of a torn transaction, a torn
//! record) is cut off, at open and by [`ChangeLog::cut_back`] whenever
//! capture starts again after an error: the slot re-delivers that
//! transaction whole, and its fragments are never left in front of it.
//! Records are never rewritten. A record is written at an explicit offset;
//! a large entry is encoded straight into the file behind a header that is
//! written last, so a crash in the middle leaves a record that does not
//! hold, never one that does with the wrong bytes.
//!
//! A failed write is cut back off the file before the error is returned; if
//! even that fails the log refuses every later append (a hole in the middle
//! of the stream would hide what follows it at the next open). A full disk
//! (or the configured budget, `[log] max_bytes`) makes appends fail with an
//! error that capture treats as a pause, not as a failure of the node.
//!
//! # Reclaiming space
//!
//! Peers acknowledge what they applied durably; [`ChangeLog::reclaim_through`]
//! takes the smallest acknowledgement of the peers that need the entries.
//! Whole segments below it are deleted once their last write is older than
//! `keep_acked`: a peer whose database is restored from a backup is refilled
//! from them. The floor (what is gone) is durable in `meta` before any file
//! is deleted.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use branchsync_proto::{LogEntry, MAX_ENTRY_BYTES};
use tokio::sync::watch;

use crate::EngineError;

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// Record kinds.
const REC_ENTRY_V1: u8 = 1;
const REC_COMPLETION: u8 = 2;
const REC_ENTRY: u8 = 3;
/// Bytes of an entry record's body before the entry itself.
const ENTRY_HEAD: usize = 1 + 8 + 4 + 1;
/// Largest record accepted when reading (a length beyond it is a torn or
/// corrupt header). Appends never write a larger one.
const MAX_RECORD: u32 = 1 << 30;
/// Entries estimated above this are encoded straight into the file.
const STREAM_ENCODE_BYTES: usize = 8 * 1024 * 1024;
/// Small records of one append are gathered up to this size, then written
/// together.
const BATCH_WRITE_BYTES: usize = 1 << 20;

/// What a completed transaction moves forward, written atomically with its
/// last fragment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Completion {
    /// Commit LSN of the transaction (deduplication, R1).
    pub captured_lsn: u64,
    /// Last hybrid-clock stamp handed out.
    pub stamp: u64,
    /// At a branch: the relay time of the last relay entry applied before
    /// this transaction (the causal context of the next one, R15). At the
    /// main: the relay time of the newest entry written (relay times are a
    /// running maximum in log order; this carries it across restarts).
    pub seen_main_ts: i64,
}

/// How a log is kept.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// Rotation size of segments.
    pub segment_bytes: u64,
    /// Acknowledged entries stay this long before their segment is deleted.
    pub keep_acked: Duration,
    /// Disk budget; appends beyond it fail with [`EngineError::LogFull`].
    pub max_bytes: Option<u64>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes: SEGMENT_BYTES, keep_acked: Duration::ZERO, max_bytes: None }
    }
}

/// Where an entry's bytes are.
#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u64,
    off: u64,
    len: u32,
    part: u32,
    last: bool,
}

/// An entry as stored, not decoded: enough to send it on as it is.
#[derive(Clone)]
pub struct RawEntry {
    /// Position.
    pub pos: u64,
    /// Fragment number within its ChangeSet.
    pub part: u32,
    /// Final fragment of its ChangeSet.
    pub last: bool,
    /// Encoded size.
    pub len: u64,
    file: Arc<File>,
    off: u64,
}

impl RawEntry {
    /// Reads `len` bytes of the encoded entry from `offset`.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, EngineError> {
        let len = len.min(self.len.saturating_sub(offset) as usize);
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, self.off + offset).map_err(EngineError::log("reading the log"))?;
        Ok(buf)
    }

    /// The whole encoded entry.
    pub fn read_all(&self) -> Result<Vec<u8>, EngineError> {
        self.read(0, self.len as usize)
    }
}

/// One segment file.
struct Segment {
    file: Arc<File>,
    path: PathBuf,
    /// Highest position stored in it (0: none).
    max_pos: u64,
}

/// The log's identity and bookkeeping, kept in `meta`.
#[derive(Debug, Clone, Default)]
struct Meta {
    epoch: u64,
    key: Vec<u8>,
    floor: u64,
    acks: BTreeMap<String, u64>,
    /// Last contact of each peer (Unix seconds).
    seen: BTreeMap<String, u64>,
    /// When this log was created (Unix seconds).
    created: u64,
}

/// Everything behind the lock.
struct State {
    dir: PathBuf,
    /// Segments by their first position; the last one is active.
    segs: BTreeMap<u64, Segment>,
    /// End of the active segment.
    tail: u64,
    /// Where the last completion record ends (segment, offset): the cut
    /// point of [`ChangeLog::cut_back`].
    whole_end: (u64, u64),
    /// Stored entries, by increasing position.
    index: VecDeque<(u64, Loc)>,
    /// The last completion appended (durable after the next flush).
    completion: Completion,
    /// `visible` of the last completion appended.
    appended_visible: u64,
    meta: Meta,
    /// Bytes of all segments.
    size: u64,
    /// A failed write could not be cut back: no more appends.
    broken: bool,
    /// The last append found no room (disk full or over the budget): acked
    /// segments go at once, `keep_acked` or not, until an append succeeds.
    pressure: bool,
    opts: LogOptions,
}

/// The durable log. Cheap to share behind an `Arc`.
pub struct ChangeLog {
    state: Mutex<State>,
    visible_tx: watch::Sender<u64>,
    next_pos: AtomicU64,
    epoch: u64,
    key: Vec<u8>,
    created_now: bool,
    identity_new: bool,
    /// Held (locked) while the log is open: one process at a time.
    _lock: File,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("seg-{first:020}.log"))
}

fn header(body_len: usize, crc: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[4..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn random_bytes(n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// One record read back while opening.
enum Rec {
    Entry { pos: u64, loc: Loc },
    Completion { visible: u64, c: Completion },
}

/// Reads the records of one segment until its end or the first record
/// that does not hold; returns them with the offset where each ends.
fn scan_segment(file: &File, seg: u64) -> std::io::Result<Vec<(Rec, u64)>> {
    let len = file.metadata()?.len();
    let mut out = Vec::new();
    let mut off = 0u64;
    let mut head = [0u8; 8];
    let mut body = Vec::new();
    while off + 8 <= len {
        file.read_exact_at(&mut head, off)?;
        let blen = u32_at(&head, 0);
        let crc = u32_at(&head, 4);
        let start = off + 8;
        let end = start + u64::from(blen);
        if blen == 0 || blen > MAX_RECORD || end > len {
            break;
        }
        // Entry records are read in full only to check their checksum; the
        // buffer is reused, so memory stays at the largest record.
        body.resize(blen as usize, 0);
        file.read_exact_at(&mut body, start)?;
        if crc32fast::hash(&body) != crc {
            break;
        }
        let rec = match body[0] {
            REC_ENTRY if body.len() > ENTRY_HEAD => Rec::Entry {
                pos: u64_at(&body, 1),
                loc: Loc { seg, off: start + ENTRY_HEAD as u64, len: blen - ENTRY_HEAD as u32, part: u32_at(&body, 9), last: body[13] != 0 },
            },
            REC_ENTRY_V1 if body.len() > 9 => {
                // Written before part and last were kept in the record.
                let Ok(e) = LogEntry::decode(&body[9..]) else { break };
                Rec::Entry { pos: u64_at(&body, 1), loc: Loc { seg, off: start + 9, len: blen - 9, part: e.part, last: e.last } }
            }
            REC_COMPLETION if body.len() == 33 => Rec::Completion {
                visible: u64_at(&body, 1),
                c: Completion { captured_lsn: u64_at(&body, 9), stamp: u64_at(&body, 17), seen_main_ts: u64_at(&body, 25) as i64 },
            },
            _ => break,
        };
        out.push((rec, end));
        off = end;
    }
    Ok(out)
}

fn read_meta(dir: &Path) -> Result<Option<Meta>, EngineError> {
    let path = dir.join("meta");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(EngineError::log(format!("reading {}", path.display()))(e)),
    };
    let bad = |line: &str| EngineError::Corrupt(format!("{}: bad line {line:?}", path.display()));
    let mut m = Meta::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[..] {
            ["epoch", n] => m.epoch = u64::from_str_radix(n, 16).map_err(|_| bad(line))?,
            ["key", k] => m.key = unhex(k).ok_or_else(|| bad(line))?,
            ["created", n] => m.created = n.parse().map_err(|_| bad(line))?,
            ["floor", n] => m.floor = n.parse().map_err(|_| bad(line))?,
            ["ack", peer, n] => {
                m.acks.insert(peer.to_string(), n.parse().map_err(|_| bad(line))?);
            }
            ["seen", peer, n] => {
                m.seen.insert(peer.to_string(), n.parse().map_err(|_| bad(line))?);
            }
            [""] | [] => {}
            _ => return Err(bad(line)),
        }
    }
    Ok(Some(m))
}

fn write_meta(dir: &Path, m: &Meta) -> std::io::Result<()> {
    let mut text = format!("epoch {:016x}\nkey {}\ncreated {}\nfloor {}\n", m.epoch, hex(&m.key), m.created, m.floor);
    for (p, n) in &m.acks {
        text.push_str(&format!("ack {p} {n}\n"));
    }
    for (p, n) in &m.seen {
        text.push_str(&format!("seen {p} {n}\n"));
    }
    let tmp = dir.join("meta.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("meta"))?;
    sync_dir(dir)
}

/// A writer that appends to a segment at an explicit offset, counting the
/// bytes and their checksum.
struct RecordWriter<'a> {
    file: &'a File,
    at: u64,
    written: u64,
    crc: crc32fast::Hasher,
    buf: Vec<u8>,
}

impl RecordWriter<'_> {
    fn flush_buf(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.at + self.written - self.buf.len() as u64)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for RecordWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.written + data.len() as u64 > u64::from(MAX_RECORD) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "entry larger than a log record may be"));
        }
        self.crc.update(data);
        self.buf.extend_from_slice(data);
        self.written += data.len() as u64;
        if self.buf.len() >= 1 << 20 {
            self.flush_buf()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_buf()
    }
}

impl State {
    fn active(&self) -> Option<(&u64, &Segment)> {
        self.segs.iter().next_back()
    }

    /// Starts a new active segment whose first position is `first`; the
    /// previous one is made durable first (flush only syncs the active one).
    fn rotate(&mut self, first: u64) -> std::io::Result<()> {
        if let Some((_, s)) = self.active() {
            s.file.sync_data()?;
        }
        let path = seg_path(&self.dir, first);
        let file = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.segs.insert(first, Segment { file: Arc::new(file), path, max_pos: 0 });
        self.tail = 0;
        Ok(())
    }

    /// Cuts the log back to the end of the last completion: later
    /// segments go, the segment holding it is truncated there.
    fn cut_to_whole(&mut self) -> std::io::Result<u64> {
        let (seg, off) = self.whole_end;
        let mut cut = 0u64;
        let later: Vec<u64> = self.segs.range(seg + 1..).map(|(k, _)| *k).collect();
        for k in later {
            if let Some(s) = self.segs.remove(&k) {
                cut += s.file.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&s.path)?;
            }
        }
        if let Some(s) = self.segs.get(&seg) {
            let len = s.file.metadata()?.len();
            if len > off {
                s.file.set_len(off)?;
                s.file.sync_all()?;
                cut += len - off;
            }
        }
        if cut > 0 {
            sync_dir(&self.dir)?;
        }
        let visible = self.appended_visible;
        while self.index.back().is_some_and(|(p, _)| *p > visible) {
            self.index.pop_back();
        }
        self.size = self.segs.values().filter_map(|s| s.file.metadata().ok()).map(|m| m.len()).sum();
        if self.segs.is_empty() {
            self.rotate(visible.max(self.meta.floor) + 1)?;
            self.whole_end = (*self.segs.keys().next_back().unwrap_or(&0), 0);
        }
        self.tail = self.active().and_then(|(_, s)| s.file.metadata().ok()).map(|m| m.len()).unwrap_or(0);
        Ok(cut)
    }

    /// Under pressure (the last append found no room) or past half the
    /// budget: kept acknowledged entries give way.
    fn squeezed(&self) -> bool {
        self.pressure || self.opts.max_bytes.is_some_and(|b| self.size.saturating_mul(2) >= b)
    }

    fn check_budget(&self, adding: u64) -> Result<(), EngineError> {
        match self.opts.max_bytes {
            Some(budget) if self.size + adding > budget => Err(EngineError::LogFull { used: self.size, budget }),
            _ => Ok(()),
        }
    }
}

impl ChangeLog {
    /// Opens (or creates) the log in `dir`, cutting off what follows the
    /// last whole transaction.
    pub fn open(dir: &Path) -> Result<ChangeLog, EngineError> {
        Self::open_with(dir, LogOptions::default())
    }

    /// [`ChangeLog::open`] with options.
    pub fn open_with(dir: &Path, mut opts: LogOptions) -> Result<ChangeLog, EngineError> {
        // Under a budget, segments are small enough that reclaiming whole
        // ones frees room (the active segment is never deleted).
        if let Some(b) = opts.max_bytes {
            opts.segment_bytes = opts.segment_bytes.min((b / 8).max(1));
        }
        std::fs::create_dir_all(dir).map_err(EngineError::log(format!("creating the log directory {}", dir.display())))?;
        if dir.join("conf").exists() && dir.join("db").exists() {
            return Err(EngineError::Misconfigured {
                message: format!("the log in {} was written by an earlier branchsync (sled format)", dir.display()),
                detail: "This version keeps its log in segment files.".into(),
                hint: "Let the node send everything it has (status shows nothing pending), stop it, move the directory away and start again.".into(),
            });
        }
        // One process at a time: a daemon and `init` (or two daemons) must
        // never append to the same log.
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(EngineError::log(format!("opening {}", lock_path.display())))?;
        if let Err(e) = lock.try_lock() {
            return Err(EngineError::Misconfigured {
                message: format!("the log in {} is in use by another process", dir.display()),
                detail: format!("Its lock file is held: {e}."),
                hint: "Stop the daemon that uses this data directory first, or give this node its own node.data_dir.".into(),
            });
        }
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(dir).map_err(EngineError::log(format!("listing {}", dir.display())))? {
            let e = e.map_err(EngineError::log(format!("listing {}", dir.display())))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse::<u64>().ok()) {
                firsts.push(n);
            }
        }
        firsts.sort_unstable();
        let (mut meta, created_now) = match read_meta(dir)? {
            Some(m) => (m, false),
            None => (Meta::default(), firsts.is_empty()),
        };
        let identity_new = meta.epoch == 0 || meta.key.len() != 32;
        if identity_new {
            // A new log, or one written before logs had an identity.
            meta.epoch = loop {
                let b = random_bytes(8).map_err(EngineError::log("choosing the log's identity"))?;
                let e = u64::from_le_bytes(b.try_into().unwrap_or([1; 8]));
                if e != 0 {
                    break e;
                }
            };
            meta.key = random_bytes(32).map_err(EngineError::log("creating the log's mark key"))?;
            if meta.created == 0 {
                meta.created = unix_now();
            }
            write_meta(dir, &meta).map_err(EngineError::log("recording the log's identity"))?;
            if !created_now {
                tracing::info!(epoch = %format!("{:016x}", meta.epoch), "log of an earlier version given an identity");
            }
        }
        // Read every segment; remember where the last completion ends.
        let mut segs = BTreeMap::new();
        let mut recs: Vec<(Rec, u64, u64)> = Vec::new(); // record, segment, end offset
        let mut stop = false;
        for first in firsts {
            let path = seg_path(dir, first);
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(EngineError::log(format!("opening {}", path.display())))?;
            if !stop {
                let got = scan_segment(&file, first).map_err(EngineError::log(format!("reading {}", path.display())))?;
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
        let whole_end = match last_completion {
            Some(i) => (recs[i].1, recs[i].2),
            None => (segs.keys().next().copied().unwrap_or(0), 0),
        };
        let kept = last_completion.map(|i| i + 1).unwrap_or(0);
        let torn = recs.len() - kept;
        recs.truncate(kept);
        let mut index = VecDeque::new();
        let mut completion = Completion::default();
        let mut visible = 0;
        for (r, seg, _) in recs {
            match r {
                Rec::Entry { pos, loc } => {
                    if let Some(s) = segs.get_mut(&seg) {
                        s.max_pos = s.max_pos.max(pos);
                    }
                    if pos > meta.floor {
                        index.push_back((pos, loc));
                    }
                }
                Rec::Completion { visible: v, c } => {
                    visible = v;
                    completion = c;
                }
            }
        }
        let (epoch, key) = (meta.epoch, meta.key.clone());
        let mut state = State {
            dir: dir.to_path_buf(),
            segs,
            tail: 0,
            whole_end,
            index,
            completion,
            appended_visible: visible,
            meta,
            size: 0,
            broken: false,
            pressure: false,
            opts,
        };
        let cut = state.cut_to_whole().map_err(EngineError::log("cutting off a torn transaction"))?;
        if cut > 0 || torn > 0 {
            tracing::info!(fragments = torn, bytes = cut, "removed fragments of a transaction cut short by a crash");
        }
        let (visible_tx, _) = watch::channel(visible);
        let next = visible.max(state.meta.floor) + 1;
        Ok(ChangeLog { state: Mutex::new(state), visible_tx, next_pos: AtomicU64::new(next), epoch, key, created_now, identity_new, _lock: lock })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The log's identity (R26).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The key of the marks this node writes into its WAL (R25).
    pub fn mark_key(&self) -> &[u8] {
        &self.key
    }

    /// `true` when this open created the log (the directory held none).
    pub fn created_now(&self) -> bool {
        self.created_now
    }

    /// `true` when this open gave the log its identity: it was created, or
    /// written by a version before logs had one.
    pub fn identity_new(&self) -> bool {
        self.identity_new
    }

    /// `true` when the log holds no entry and never reclaimed one.
    pub fn is_empty(&self) -> bool {
        let st = self.lock();
        st.appended_visible == 0 && st.meta.floor == 0 && st.completion.captured_lsn == 0
    }

    /// The next position [`ChangeLog::append`] will use.
    pub fn allocate_pos(&self) -> u64 {
        self.next_pos.fetch_add(1, Ordering::SeqCst)
    }

    /// Forgets everything appended after the last completion (fragments of
    /// a transaction whose capture failed) and hands out positions after
    /// it again. Capture calls this before it reads the slot again after an
    /// error, so a transaction delivered again never lands behind fragments
    /// of its first, broken delivery.
    pub fn cut_back(&self) -> Result<u64, EngineError> {
        let mut st = self.lock();
        let cut = st.cut_to_whole().map_err(|e| {
            st.broken = true;
            EngineError::log("cutting the log back to the last whole transaction")(e)
        })?;
        st.broken = false;
        let next = st.appended_visible.max(st.meta.floor) + 1;
        self.next_pos.store(next, Ordering::SeqCst);
        if cut > 0 {
            tracing::info!(bytes = cut, next_pos = next, "log cut back to the last whole transaction");
        }
        Ok(cut)
    }

    /// Appends entries (positions from [`ChangeLog::allocate_pos`]); with
    /// `completion`, the entries become visible (after the next flush) and
    /// the capture metadata moves forward. Not durable until
    /// [`ChangeLog::flush`]. On failure nothing of this call stays in the
    /// file.
    pub fn append(&self, entries: &[LogEntry], completion: Option<Completion>) -> Result<(), EngineError> {
        let mut st = self.lock();
        if st.broken {
            return Err(EngineError::Corrupt("the log refuses appends after a write it could not undo; restart the daemon".into()));
        }
        if st.tail >= st.opts.segment_bytes {
            // Named after its first position; always after the active one.
            let after = st.active().map(|(k, _)| *k + 1).unwrap_or(0);
            let first = entries.first().map(|e| e.pos).unwrap_or(st.appended_visible + 1).max(after);
            st.rotate(first).map_err(EngineError::log("starting a new log segment"))?;
        }
        let (&seg, active) = st.active().ok_or_else(|| EngineError::Corrupt("the log has no active segment".into()))?;
        let file = active.file.clone();
        let base = st.tail;
        let mut at = base;
        let mut locs = Vec::with_capacity(entries.len());
        // Small records (and the completion) gather in `batch`, which
        // starts at `batch_at`, and go out in one write: a transaction of a
        // few rows is one system call, not one per record. Records keep
        // their checksummed headers, so a write cut short by a crash leaves
        // a record that does not hold, exactly as before.
        let mut batch: Vec<u8> = Vec::new();
        let mut batch_at = base;
        let written = (|| -> Result<(), EngineError> {
            for e in entries {
                let small = e.approx_bytes() < STREAM_ENCODE_BYTES;
                if !batch.is_empty() && (!small || batch.len() >= BATCH_WRITE_BYTES) {
                    file.write_all_at(&batch, batch_at).map_err(EngineError::log("appending to the log"))?;
                    batch.clear();
                    batch_at = at;
                }
                let (len, entry_off) = if small {
                    Self::encode_small_entry(&st, at, e, &mut batch)?
                } else {
                    let r = Self::write_large_entry(&st, &file, at, e)?;
                    batch_at = at + 8 + r.0;
                    r
                };
                locs.push((e.pos, Loc { seg, off: entry_off, len: (len - ENTRY_HEAD as u64) as u32, part: e.part, last: e.last }));
                at += 8 + len;
            }
            if let Some(c) = completion {
                let visible = self.next_pos.load(Ordering::SeqCst) - 1;
                let mut body = Vec::with_capacity(33);
                body.push(REC_COMPLETION);
                for v in [visible, c.captured_lsn, c.stamp, c.seen_main_ts as u64] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                st.check_budget(at - base + 8 + body.len() as u64)?;
                batch.extend_from_slice(&header(body.len(), crc32fast::hash(&body)));
                batch.extend_from_slice(&body);
                at += 8 + body.len() as u64;
            }
            if !batch.is_empty() {
                file.write_all_at(&batch, batch_at).map_err(EngineError::log("appending to the log"))?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            // Cut the partial write off again: a hole would hide the rest.
            if file.set_len(base).is_err() {
                st.broken = true;
            }
            st.pressure |= e.is_disk_full();
            return Err(e);
        }
        st.pressure = false;
        st.tail = at;
        st.size += at - base;
        for (pos, loc) in locs {
            st.index.push_back((pos, loc));
            if let Some(s) = st.segs.get_mut(&seg) {
                s.max_pos = s.max_pos.max(pos);
            }
        }
        if let Some(c) = completion {
            st.completion = c;
            st.appended_visible = self.next_pos.load(Ordering::SeqCst) - 1;
            st.whole_end = (seg, at);
        }
        Ok(())
    }

    /// The record head of an entry: kind, position, part, last.
    fn entry_head(e: &LogEntry) -> Vec<u8> {
        let mut head = Vec::with_capacity(ENTRY_HEAD);
        head.push(REC_ENTRY);
        head.extend_from_slice(&e.pos.to_le_bytes());
        head.extend_from_slice(&e.part.to_le_bytes());
        head.push(u8::from(e.last));
        head
    }

    fn entry_too_large(e: &LogEntry, bytes: u64) -> EngineError {
        EngineError::TooLarge { what: format!("log entry at position {}", e.pos), bytes, max: MAX_ENTRY_BYTES }
    }

    /// Encodes one small entry record, to be written at `at`, onto the end
    /// of `batch`; returns the body length and where the entry's bytes
    /// start.
    fn encode_small_entry(st: &State, at: u64, e: &LogEntry, batch: &mut Vec<u8>) -> Result<(u64, u64), EngineError> {
        // On an error the whole append fails and `batch` is dropped.
        let start = batch.len();
        batch.extend_from_slice(&[0u8; 8]);
        batch.extend_from_slice(&Self::entry_head(e));
        e.encode_into(&mut *batch).map_err(|err| EngineError::Corrupt(err.to_string()))?;
        let body_len = batch.len() - start - 8;
        if body_len as u64 - ENTRY_HEAD as u64 > MAX_ENTRY_BYTES {
            return Err(Self::entry_too_large(e, body_len as u64));
        }
        st.check_budget(at - st.tail + 8 + body_len as u64)?;
        let h = header(body_len, crc32fast::hash(&batch[start + 8..]));
        batch[start..start + 8].copy_from_slice(&h);
        Ok((body_len as u64, at + 8 + ENTRY_HEAD as u64))
    }

    /// Writes one large entry record at `at`, encoded straight into the
    /// file behind a header written last; returns the body length and
    /// where the entry's bytes start.
    fn write_large_entry(st: &State, file: &File, at: u64, e: &LogEntry) -> Result<(u64, u64), EngineError> {
        let head = Self::entry_head(e);
        let too_large = |bytes: u64| Self::entry_too_large(e, bytes);
        st.check_budget(at - st.tail + 8 + e.approx_bytes() as u64)?;
        // A header that can never hold (longer than any record) until the
        // body is complete: a crash in between leaves a torn record.
        file.write_all_at(&[0xff; 8], at).map_err(EngineError::log("appending to the log"))?;
        let mut w = RecordWriter { file, at: at + 8, written: 0, crc: crc32fast::Hasher::new(), buf: Vec::with_capacity(1 << 20) };
        w.write_all(&head).map_err(EngineError::log("appending to the log"))?;
        match e.encode_into(&mut w) {
            Ok(()) => {}
            Err(err) => {
                if let Some(io) = err.io_error() {
                    if io.kind() == std::io::ErrorKind::InvalidInput {
                        return Err(too_large(w.written));
                    }
                    return Err(EngineError::Log { context: "appending to the log".into(), source: std::io::Error::new(io.kind(), io.to_string()) });
                }
                return Err(EngineError::Corrupt(err.to_string()));
            }
        }
        w.flush().map_err(EngineError::log("appending to the log"))?;
        let body_len = w.written;
        if body_len - ENTRY_HEAD as u64 > MAX_ENTRY_BYTES {
            return Err(too_large(body_len));
        }
        st.check_budget(at - st.tail + 8 + body_len)?;
        let crc = w.crc.clone().finalize();
        file.write_all_at(&header(body_len as usize, crc), at).map_err(EngineError::log("appending to the log"))?;
        Ok((body_len, at + 8 + ENTRY_HEAD as u64))
    }

    /// Makes everything appended so far durable, then publishes the new
    /// visible position to readers.
    pub async fn flush(&self) -> Result<(), EngineError> {
        // Only the active segment: a rotation syncs the one it closes.
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

    /// The visible position that holds exactly the transactions captured
    /// with a commit LSN below `lsn`: the `visible` of the last completion
    /// record whose `captured_lsn` is below it (completions follow commit
    /// order). `Some(0)` when no transaction before `lsn` was ever logged;
    /// `None` when that point was reclaimed. Reads the segments from the
    /// newest back, outside the lock (a caller keeps them from being
    /// reclaimed meanwhile, as `join` does by pinning its peer's
    /// acknowledgement first).
    pub fn visible_before_lsn(&self, lsn: u64) -> Result<Option<u64>, EngineError> {
        let (segs, floor) = {
            let st = self.lock();
            (st.segs.iter().rev().map(|(k, s)| (*k, s.file.clone(), s.path.clone())).collect::<Vec<_>>(), st.meta.floor)
        };
        for (k, file, path) in segs {
            let recs = scan_segment(&file, k).map_err(EngineError::log(format!("reading {}", path.display())))?;
            let found = recs.iter().rev().find_map(|(r, _)| match r {
                Rec::Completion { visible, c } if c.captured_lsn < lsn => Some(*visible),
                _ => None,
            });
            if found.is_some() {
                return Ok(found);
            }
        }
        Ok((floor == 0).then_some(0))
    }

    /// Every position up to and including this one was reclaimed.
    pub fn floor(&self) -> Result<u64, EngineError> {
        Ok(self.lock().meta.floor)
    }

    /// `true` if an entry at exactly `pos` is stored.
    pub fn contains(&self, pos: u64) -> Result<bool, EngineError> {
        let st = self.lock();
        Ok(st.index.binary_search_by_key(&pos, |(p, _)| *p).is_ok())
    }

    /// Visible entries after `after`, in order, not decoded, up to about
    /// `max_bytes` of encoded size (at least one entry when one is there).
    pub fn read_raw_after(&self, after: u64, max_bytes: usize) -> Vec<RawEntry> {
        let visible = self.visible();
        if after >= visible {
            return Vec::new();
        }
        let st = self.lock();
        let from = st.index.partition_point(|(p, _)| *p <= after);
        let mut bytes = 0usize;
        let mut out = Vec::new();
        for (pos, loc) in st.index.range(from..) {
            if *pos > visible || (!out.is_empty() && bytes + loc.len as usize > max_bytes) {
                break;
            }
            let Some(seg) = st.segs.get(&loc.seg) else { break };
            out.push(RawEntry { pos: *pos, part: loc.part, last: loc.last, len: u64::from(loc.len), file: seg.file.clone(), off: loc.off });
            bytes += loc.len as usize;
        }
        out
    }

    /// Visible entries after `after`, decoded, up to about `max_bytes`.
    pub fn read_after(&self, after: u64, max_bytes: usize) -> Result<Vec<LogEntry>, EngineError> {
        self.read_raw_after(after, max_bytes)
            .iter()
            .map(|r| LogEntry::decode(&r.read_all()?).map_err(|e| EngineError::Corrupt(format!("log entry at position {}: {e}", r.pos))))
            .collect()
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
        self.lock().meta.acks.insert(peer.to_string(), pos);
        Ok(())
    }

    /// A peer's acknowledged position (0 = never).
    pub fn peer_ack(&self, peer: &str) -> Result<u64, EngineError> {
        Ok(self.lock().meta.acks.get(peer).copied().unwrap_or(0))
    }

    /// Notes that `peer` is in contact now (durable with the next meta
    /// write; see [`ChangeLog::peer_last_seen`]).
    pub fn touch_peer(&self, peer: &str) {
        self.lock().meta.seen.insert(peer.to_string(), unix_now());
    }

    /// When `peer` was last in contact, or — never — when this log was
    /// created (Unix seconds).
    pub fn peer_last_seen(&self, peer: &str) -> u64 {
        let st = self.lock();
        st.meta.seen.get(peer).copied().unwrap_or(st.meta.created)
    }

    /// Lets every peer's acknowledgement up to `pos` free space. Without
    /// `keep_acked`, everything up to `pos` (never past `visible`) is gone at
    /// once (the floor moves; whole segments below it are deleted). With it,
    /// acknowledged entries stay readable until their segment's last write
    /// is older than `keep_acked`; then the segment goes and the floor moves
    /// past it. The floor is durable before any file is deleted. Returns how
    /// many entries were removed.
    pub fn reclaim_through(&self, pos: u64) -> Result<u64, EngineError> {
        let pos = pos.min(self.visible());
        let mut st = self.lock();
        if pos <= st.meta.floor {
            return Ok(0);
        }
        // Kept acknowledged entries are a convenience (refilling a restored
        // main); they never cost new sales their room: under pressure, or
        // past half the budget, they go.
        let keep = if st.squeezed() { Duration::ZERO } else { st.opts.keep_acked };
        let now = SystemTime::now();
        let active = st.active().map(|(k, _)| *k);
        // Whole segments from the oldest on, while they qualify: the floor
        // is a prefix of the log.
        let mut doomed = Vec::new();
        for (k, s) in st.segs.iter() {
            if Some(*k) == active || s.max_pos > pos {
                break;
            }
            let old_enough = keep.is_zero()
                || s.file.metadata().and_then(|m| m.modified()).ok().and_then(|t| now.duration_since(t).ok()).is_some_and(|age| age >= keep);
            if !old_enough {
                break;
            }
            doomed.push((*k, s.max_pos));
        }
        let new_floor = if keep.is_zero() { pos } else { doomed.iter().map(|(_, m)| *m).max().unwrap_or(0) };
        if new_floor <= st.meta.floor {
            return Ok(0);
        }
        st.meta.floor = new_floor;
        if !doomed.is_empty() {
            let dir = st.dir.clone();
            write_meta(&dir, &st.meta).map_err(EngineError::log("recording the log floor"))?;
            for (k, _) in doomed {
                if let Some(s) = st.segs.remove(&k) {
                    st.size = st.size.saturating_sub(s.file.metadata().map(|m| m.len()).unwrap_or(0));
                    std::fs::remove_file(&s.path).map_err(EngineError::log(format!("removing {}", s.path.display())))?;
                }
            }
        }
        let n = st.index.partition_point(|(p, _)| *p <= new_floor);
        st.index.drain(..n);
        Ok(n as u64)
    }

    /// Makes the peers' acknowledgements and contact times durable now.
    pub fn save_meta(&self) -> Result<(), EngineError> {
        let st = self.lock();
        write_meta(&st.dir, &st.meta).map_err(EngineError::log("recording the log's peers"))
    }

    /// Bytes the log uses on disk (for status and alarms).
    pub fn size_on_disk(&self) -> u64 {
        self.lock().size
    }

    /// `true` while the last append found no room: the caller should
    /// reclaim what every peer acknowledged ([`ChangeLog::reclaim_through`]
    /// then ignores `keep_acked`).
    pub fn under_pressure(&self) -> bool {
        self.lock().squeezed()
    }

    /// The disk budget, if one is set.
    pub fn budget(&self) -> Option<u64> {
        self.lock().opts.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchsync_proto::{ChangeSetHeader, RowChange, TableDef, TableDesc, Value};
    use std::io::Write;

    fn entry(log: &ChangeLog, part: u32, last: bool) -> LogEntry {
        entry_with(log, part, last, part.to_string())
    }

    fn entry_with(log: &ChangeLog, part: u32, last: bool, body: String) -> LogEntry {
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
            tables: vec![TableDesc::from(TableDef {
                schema: "public".into(),
                name: "t".into(),
                columns: vec!["id".into()],
                key: vec![true],
                identity_full: false,
            })],
            changes: vec![RowChange::Insert { table: 0, new: vec![Value::Text(body)] }],
            relay_ts_us: 0,
            echo_as_sent: false,
        }
    }

    fn opts(segment_bytes: u64) -> LogOptions {
        LogOptions { segment_bytes, ..LogOptions::default() }
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
    async fn cut_back_forgets_a_broken_transaction_so_its_redelivery_starts_clean() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open_with(dir.path(), opts(250)).unwrap();
        complete(&log, 10);
        log.flush().await.unwrap();
        // Capture wrote fragments of a big transaction, across segments,
        // then PostgreSQL restarted under it.
        for part in 0..6 {
            let e = entry(&log, part, false);
            log.append(&[e], None).unwrap();
        }
        log.flush().await.unwrap();
        assert!(segments(dir.path()).len() > 1);
        log.cut_back().unwrap();
        assert_eq!(segments(dir.path()).len(), 1);
        // The transaction is delivered again, whole, at the next positions.
        let again: Vec<LogEntry> = (0..3).map(|p| entry(&log, p, p == 2)).collect();
        assert_eq!(again[0].pos, 2, "positions are handed out after the last whole transaction again");
        log.append(&again, Some(Completion { captured_lsn: 20, stamp: 20, seen_main_ts: 0 })).unwrap();
        log.flush().await.unwrap();
        let read: Vec<(u64, u32, bool)> = log.read_after(0, 1 << 20).unwrap().iter().map(|e| (e.pos, e.part, e.last)).collect();
        assert_eq!(read, vec![(1, 0, true), (2, 0, false), (3, 1, false), (4, 2, true)]);
        drop(log);
        let log = ChangeLog::open_with(dir.path(), opts(250)).unwrap();
        assert_eq!(log.visible(), 4);
        let raw: Vec<(u64, u32, bool)> = log.read_raw_after(0, 1 << 20).iter().map(|r| (r.pos, r.part, r.last)).collect();
        assert_eq!(raw, read, "part and last are kept in the record");
    }

    #[tokio::test]
    async fn reclaim_removes_only_acknowledged_entries() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open_with(dir.path(), opts(200)).unwrap();
        for lsn in 1..=5 {
            complete(&log, lsn);
        }
        log.flush().await.unwrap();
        assert_eq!(log.reclaim_through(3).unwrap(), 3);
        assert_eq!(log.floor().unwrap(), 3);
        let rest: Vec<u64> = log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect();
        assert_eq!(rest, vec![4, 5]);
        assert_eq!(log.reclaim_through(99).unwrap(), 2, "never past visible");
        assert_eq!(log.floor().unwrap(), 5);
    }

    #[tokio::test]
    async fn acknowledged_entries_are_kept_for_keep_acked() {
        let dir = tempfile::tempdir().unwrap();
        let o = LogOptions { segment_bytes: 200, keep_acked: Duration::from_secs(3600), max_bytes: None };
        let log = ChangeLog::open_with(dir.path(), o).unwrap();
        for lsn in 1..=10 {
            complete(&log, lsn);
        }
        log.flush().await.unwrap();
        assert_eq!(log.reclaim_through(10).unwrap(), 0);
        assert_eq!(log.floor().unwrap(), 0);
        assert_eq!(log.read_after(0, 1 << 20).unwrap().len(), 10, "a restored peer can be refilled from them");
    }

    #[test]
    fn the_visible_position_before_an_lsn_is_the_last_transaction_committed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        assert_eq!(log.visible_before_lsn(5).unwrap(), Some(0), "nothing logged yet");
        for lsn in [10, 20, 30] {
            complete(&log, lsn);
        }
        assert_eq!(log.visible_before_lsn(10).unwrap(), Some(0), "the transaction at 10 is not before 10");
        assert_eq!(log.visible_before_lsn(11).unwrap(), Some(1));
        assert_eq!(log.visible_before_lsn(30).unwrap(), Some(2));
        assert_eq!(log.visible_before_lsn(u64::MAX).unwrap(), Some(3));
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
        let log = ChangeLog::open_with(dir.path(), opts(600)).unwrap();
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
        let floor = log.floor().unwrap();
        assert_eq!(floor, 30);
        let after = segments(dir.path());
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert_eq!(log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect::<Vec<_>>(), ((floor + 1)..=40).collect::<Vec<_>>());
        let epoch = log.epoch();
        drop(log);
        let log = ChangeLog::open_with(dir.path(), opts(600)).unwrap();
        assert_eq!(log.floor().unwrap(), floor);
        assert_eq!(log.epoch(), epoch, "the identity survives a reopen");
        assert_eq!(log.peer_ack("branch1").unwrap(), 30);
        assert_eq!(log.read_after(0, 1 << 20).unwrap().iter().map(|e| e.pos).collect::<Vec<_>>(), ((floor + 1)..=40).collect::<Vec<_>>());
        assert_eq!(log.allocate_pos(), 41);
    }

    #[tokio::test]
    async fn a_torn_transaction_spanning_segments_vanishes_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = ChangeLog::open_with(dir.path(), opts(400)).unwrap();
            complete(&log, 1);
            log.flush().await.unwrap();
            for part in 0..8 {
                let e = entry(&log, part, false);
                log.append(&[e], None).unwrap();
            }
            log.flush().await.unwrap();
            assert!(segments(dir.path()).len() > 1);
        }
        let log = ChangeLog::open_with(dir.path(), opts(400)).unwrap();
        assert_eq!(segments(dir.path()).len(), 1, "segments holding only torn fragments are removed");
        assert_eq!(log.visible(), 1);
        assert_eq!(log.read_after(0, 1 << 20).unwrap().len(), 1);
        assert_eq!(log.allocate_pos(), 2);
    }

    #[tokio::test]
    async fn a_large_entry_is_streamed_into_the_file_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        let big = "x".repeat(STREAM_ENCODE_BYTES + 12345);
        let e = entry_with(&log, 0, true, big.clone());
        log.append(&[e], Some(Completion { captured_lsn: 7, stamp: 7, seen_main_ts: 0 })).unwrap();
        complete(&log, 8);
        log.flush().await.unwrap();
        drop(log);
        let log = ChangeLog::open(dir.path()).unwrap();
        let got = log.read_after(0, 1).unwrap();
        assert_eq!(got.len(), 1, "one large entry per read");
        assert_eq!(got[0].changes[0], RowChange::Insert { table: 0, new: vec![Value::Text(big)] });
        let raw = log.read_raw_after(0, 1 << 30);
        assert_eq!(raw.len(), 2);
        assert_eq!(raw[0].read(3, 10).unwrap(), raw[0].read_all().unwrap()[3..13].to_vec(), "pieces read at an offset");
    }

    #[tokio::test]
    async fn one_append_of_small_and_large_entries_reads_back_in_order_and_a_cut_anywhere_in_it_loses_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let big = "y".repeat(STREAM_ENCODE_BYTES + 99);
        let (before, whole) = {
            let log = ChangeLog::open(dir.path()).unwrap();
            complete(&log, 10);
            log.flush().await.unwrap();
            let before = std::fs::metadata(dir.path().join(&segments(dir.path())[0])).unwrap().len();
            // Small ones gathered into one write, a large one streamed
            // between them, more small ones after it.
            let entries: Vec<LogEntry> = (0..7u32)
                .map(|i| entry_with(&log, i, i == 6, if i == 3 { big.clone() } else { format!("small {i}") }))
                .collect();
            log.append(&entries, Some(Completion { captured_lsn: 20, stamp: 20, seen_main_ts: 0 })).unwrap();
            log.flush().await.unwrap();
            (before, std::fs::metadata(dir.path().join(&segments(dir.path())[0])).unwrap().len())
        };
        {
            let log = ChangeLog::open(dir.path()).unwrap();
            let got: Vec<String> = log
                .read_after(1, 1 << 30)
                .unwrap()
                .into_iter()
                .map(|e| match &e.changes[0] {
                    RowChange::Insert { new, .. } => match &new[0] {
                        Value::Text(t) if t.len() > 100 => format!("{}: big", e.part),
                        Value::Text(t) => format!("{}: {t}", e.part),
                        v => panic!("unexpected value {v:?}"),
                    },
                    c => panic!("unexpected change {c:?}"),
                })
                .collect();
            assert_eq!(got, ["0: small 0", "1: small 1", "2: small 2", "3: big", "4: small 4", "5: small 5", "6: small 6"]);
            assert_eq!((log.visible(), log.captured_lsn().unwrap()), (8, 20));
        }
        // A crash anywhere in that append: the transaction is gone whole,
        // the one before it stays.
        let seg = dir.path().join(&segments(dir.path())[0]);
        let bytes = std::fs::read(&seg).unwrap();
        let cuts = [before + 1, before + 30, before + 200, whole - (big.len() as u64) / 2, whole - 60, whole - 1];
        for cut in cuts {
            std::fs::write(&seg, &bytes[..cut as usize]).unwrap();
            let log = ChangeLog::open(dir.path()).unwrap();
            assert_eq!((log.visible(), log.captured_lsn().unwrap()), (1, 10), "cut at byte {cut} of {whole}");
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), before, "cut at byte {cut}: the torn transaction is cut off");
        }
    }

    #[tokio::test]
    async fn the_budget_refuses_appends_and_leaves_nothing_half_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open_with(dir.path(), LogOptions { max_bytes: Some(1000), ..LogOptions::default() }).unwrap();
        let mut n = 0;
        let err = loop {
            let e = entry(&log, 0, true);
            match log.append(&[e], Some(Completion { captured_lsn: n + 1, stamp: 1, seen_main_ts: 0 })) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 100);
        };
        assert!(matches!(err, EngineError::LogFull { .. }), "{err}");
        assert!(err.is_disk_full());
        assert!(log.size_on_disk() <= 1000);
        log.cut_back().unwrap();
        log.flush().await.unwrap();
        assert_eq!(log.read_after(0, 1 << 20).unwrap().len() as u64, n);
    }

    #[tokio::test]
    async fn a_full_budget_lets_acknowledged_entries_go_even_when_they_would_be_kept() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { max_bytes: Some(2000), keep_acked: Duration::from_secs(3600), ..LogOptions::default() };
        let log = ChangeLog::open_with(dir.path(), opts).unwrap();
        let mut n = 0;
        while log.append(&[entry(&log, 0, true)], Some(Completion { captured_lsn: n + 1, stamp: 1, seen_main_ts: 0 })).is_ok() {
            n += 1;
            assert!(n < 200);
        }
        log.cut_back().unwrap();
        log.flush().await.unwrap();
        assert!(log.under_pressure(), "the failed append is remembered");
        assert!(segments(dir.path()).len() > 2, "small segments under a budget: {:?}", segments(dir.path()));
        // The peer has everything: the kept entries give way.
        assert!(log.reclaim_through(log.visible()).unwrap() > 0);
        assert!(log.size_on_disk() < 1000, "room again: {} bytes", log.size_on_disk());
        log.append(&[entry(&log, 0, true)], Some(Completion { captured_lsn: n + 1, stamp: 1, seen_main_ts: 0 })).unwrap();
        assert!(!log.under_pressure());
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
    fn a_log_is_opened_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        let e = ChangeLog::open(dir.path()).err().expect("a second open is refused").to_string();
        assert!(e.contains("in use by another process"), "{e}");
        drop(log);
        ChangeLog::open(dir.path()).expect("free again once closed");
    }

    #[test]
    fn a_new_log_has_an_identity_and_a_key_that_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        assert!(log.created_now() && log.is_empty());
        let (epoch, key) = (log.epoch(), log.mark_key().to_vec());
        assert!(epoch != 0 && key.len() == 32);
        drop(log);
        let log = ChangeLog::open(dir.path()).unwrap();
        assert!(!log.created_now());
        assert_eq!((log.epoch(), log.mark_key().to_vec()), (epoch, key));
        let other = tempfile::tempdir().unwrap();
        assert_ne!(ChangeLog::open(other.path()).unwrap().epoch(), epoch, "another log, another identity");
    }

    #[test]
    fn saved_acknowledgements_and_contact_times_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let log = ChangeLog::open(dir.path()).unwrap();
        let created = log.peer_last_seen("branch1");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        log.touch_peer("branch1");
        log.set_peer_ack("branch1", 0).unwrap();
        let seen = log.peer_last_seen("branch1");
        assert!(seen > created, "contact is later than the log's creation");
        log.save_meta().unwrap();
        drop(log);
        let log = ChangeLog::open(dir.path()).unwrap();
        assert_eq!(log.peer_last_seen("branch1"), seen, "a restart does not make a peer look away since the log was created");
        assert_eq!(log.peer_last_seen("branch2"), created, "a peer never seen counts from the log's creation");
    }
}
