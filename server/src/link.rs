//! The link between a branch and the main.
//!
//! ```text
//!  branch                                         main
//!  dial (backoff ≤ reconnect_max) ------------->  accept, one task per connection
//!  Hello{version, node, token, limits, identities   check version, node, token, rules,
//!        of its log and of its relay progress}     identities and positions (R4, R23, R26)
//!                           <------------------  Welcome{limits, resume_after} | Refuse{why}
//!
//!  one session, on each side:
//!    reader task   socket -> frames: Heartbeat, Ack, Credit at once; entries (chunks
//!                  reassembled) into the apply queue. Never waits for anything
//!                  but the socket.
//!    writer task   control (Ack, Credit), heartbeats and our log entries (within the
//!                  credit window, large ones in chunks) -> socket. The only task
//!                  that writes.
//!    apply task    apply queue -> database (engine::apply), durable progress out.
//!    supervisor    shutdown, eviction, a task ending, progress -> Ack, the peer's
//!                  Ack -> reclaim, and the peer timeout, judged on what is received.
//! ```
//!
//! # No deadlock by construction
//!
//! A link carries both directions at once, and both can be large after a
//! day offline (the branch's backlog up, the main's relay of it down). The
//! reader never blocks on anything but its socket: the apply queue can take
//! whatever arrives, because the sender sends entries only within the
//! window of bytes the receiver has reported as consumed (`Credit`), and
//! acknowledgements, credit and heartbeats are handled as they arrive. A
//! stuck writer (the peer stopped reading) blocks only the writer task; the
//! supervisor still sees what arrives and ends the session when nothing has
//! arrived for `peer_timeout`.
//!
//! A stream that stops anyway is caught, not waited on: when the peer's
//! heartbeats say its log goes further than what arrived, apply has taken
//! every byte that arrived (so the peer's window is open), and no entry
//! bytes came for twice `peer_timeout`, the reader ends the session as
//! *stalled* (WARN, counted in `status` and `/metrics`); the next session
//! resumes from durable progress. Twice the timeout, because a peer that
//! cannot hear us (nor our credit) ends the session at its own timeout
//! first.
//!
//! # Progress tracking
//!
//! Where a stream resumes is decided by the *receiver's* durable progress,
//! read from its database at the start of every session (R4), and only
//! within the log identity it was recorded for (R26). An `Ack` is sent only
//! after the apply transaction committed, and only lets the sender reclaim
//! log space; losing one costs nothing but space until the next.
//!
//! # Error handling
//!
//! A session ends on any error (socket, protocol, apply); the apply task is
//! drained first (it commits what is whole, so its replication origin is
//! free for the next session), then the branch redials with backoff. Bad
//! input (malformed or oversized frame, wrong token, unknown node, version
//! mismatch, index in use, a gap in positions, a log whose identity
//! changed) is refused with a log line and a `Refuse` message saying why;
//! nothing is applied and the main keeps serving others. A session that
//! ends for any reason but the network is logged at WARN or ERROR and shown
//! as the peer's `last_error` in `status`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use branchsync_engine::apply::{ApplyConfig, ApplyStats, Applier, StreamState};
use branchsync_engine::clock::now_us;
use branchsync_engine::log::{ChangeLog, RawEntry};
use branchsync_engine::pg::fmt_lsn;
use branchsync_engine::{failpoints, EngineError};
use branchsync_proto::{
    EntryChunk, FrameCodec, Hello, Message, ProtoError, Refusal, RefusalReason, Welcome, WireEntry, HANDSHAKE_MAX_FRAME, MAX_ENTRY_BYTES, MIN_MAX_FRAME, PROTOCOL_VERSION,
};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;

use crate::status::NodeStatus;
use branchsync_server::http::tokens_equal;
use branchsync_server::tls::{self, ClientCredentials, ServerCredentials};

/// What a link session runs on: TLS over TCP, or TCP alone with
/// `sync.insecure`.
pub trait LinkIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> LinkIo for T {}
pub(crate) type Reader = FramedRead<tokio::io::ReadHalf<Box<dyn LinkIo>>, FrameCodec>;
pub(crate) type Writer = FramedWrite<tokio::io::WriteHalf<Box<dyn LinkIo>>, FrameCodec>;

/// How this node secures its link.
#[derive(Clone)]
pub enum LinkTls {
    /// `sync.insecure = true`: plaintext.
    Insecure,
    /// A branch: verifies the main, offers its certificate.
    Branch(Arc<ClientCredentials>),
    /// The main: its credentials; verifies every branch's certificate
    /// (revoked ones are refused in the TLS handshake).
    Main(Arc<ServerCredentials>),
}

/// How long a handshake may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the main lets into their handshake at once; more are closed
/// at once (a flood of connections that never authenticate costs a socket
/// each for a moment, not a task and buffers for ten seconds).
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Room in a frame for everything but entry bytes.
const FRAME_OVERHEAD: usize = 4096;
/// Bytes an entry takes in an `Entries` frame besides its body (its
/// position, part and flag, and the body's length), with room to spare.
const ENTRY_OVERHEAD: usize = 32;

/// Errors that end a link session.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket or framing failure.
    #[error("link protocol error: {0}")]
    Proto(#[from] ProtoError),
    /// The peer refused us, or we refused the peer.
    #[error("{0}")]
    Refused(Refusal),
    /// The peer sent something out of place.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// The peer went quiet.
    #[error("peer silent for {0:?}")]
    Timeout(Duration),
    /// The peer's stream stopped: its log is ahead of what arrived, nothing
    /// arrived for twice the peer timeout, and nothing was owed to it (every byte
    /// received was taken by apply, so its window was open). Heartbeats
    /// still came, so the peer timeout would never end such a session.
    #[error("stream stalled: {0}")]
    Stalled(String),
    /// Local database or log failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The TLS handshake failed, or the peer's certificate is not the one
    /// it should hold (the message says which and what to do).
    #[error("{0}")]
    Tls(String),
    /// The connection closed.
    #[error("connection closed by peer")]
    Closed,
}

impl LinkError {
    /// `true` when the session ended because of the network (the peer went
    /// away or silent): worth an INFO line, nothing more.
    pub fn is_network(&self) -> bool {
        matches!(self, LinkError::Closed | LinkError::Timeout(_) | LinkError::Proto(ProtoError::Io(_)))
    }
}

/// What both sides of a link need to know.
#[derive(Clone)]
pub struct LinkSettings {
    /// This node's name.
    pub node: String,
    /// This node's index.
    pub index: u32,
    /// Key stride.
    pub stride: u32,
    /// Exclude globs (must match between nodes, R23).
    pub exclude: Vec<String>,
    /// Local cluster identifier.
    pub system_id: u64,
    /// Local database.
    pub db_url: String,
    /// Apply settings.
    pub apply: ApplyConfig,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// A peer silent this long is gone.
    pub peer_timeout: Duration,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Bytes of entries this node buffers for its apply (flow control).
    pub window: usize,
    /// `[[tables]]` rules, canonical (must match between nodes, R23).
    pub table_rules: Vec<String>,
    /// Main: a branch away longer than this must re-seed (R23): the
    /// tombstones its changes would be decided against are gone.
    pub retention: Duration,
    /// TLS, or plaintext with `sync.insecure`.
    pub tls: LinkTls,
    /// Main: how far ahead of its clock a branch's stamp may be on arrival
    /// before it is clamped.
    pub max_stamp_ahead: Duration,
}

/// A socket or framing error that is really a TLS failure, explained.
pub(crate) fn tls_aware(e: LinkError, at_main: bool) -> LinkError {
    if let LinkError::Proto(ProtoError::Io(io)) = &e {
        if let Some(m) = tls::explain(io, at_main) {
            return LinkError::Tls(m);
        }
    }
    e
}

/// This node's `[conflicts] tombstone_days`, as the handshake compares it.
fn tombstone_days(settings: &LinkSettings) -> u32 {
    u32::try_from(settings.retention.as_secs() / 86_400).unwrap_or(u32::MAX)
}

/// This node's `[ddl] from`, as the handshake compares it.
fn ddl_from(settings: &LinkSettings) -> &'static str {
    if settings.apply.ddl.from_any {
        "any"
    } else {
        "main"
    }
}

/// A branch the main accepts.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerAuth {
    /// Node name.
    pub name: String,
    /// Node index.
    pub index: u32,
    /// Shared secret.
    pub token: String,
}

/// Who may connect, as the configuration says now: replaced as a whole
/// when the daemon reloads its configuration (SIGHUP). Sessions already up
/// are left alone unless the change concerns them: a branch no longer
/// listed, or whose token or index changed, or whose certificate is now
/// revoked, is disconnected (and refused when it comes back).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// Main: the branches it accepts (`[[sync.peers]]`).
    pub peers: Vec<PeerAuth>,
    /// Main: certificate fingerprints refused (`[tls] revoked`).
    pub revoked: Vec<String>,
    /// Branch: its own token (`[sync] token`), sent at the next connection.
    pub token: String,
}

impl Admission {
    /// The peers' names.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.peers.iter().map(|p| p.name.clone()).collect();
        n.sort();
        n
    }
}

/// A new clock offset is recorded when it differs from the last by more
/// than this (µs): measurement noise is not a clock change.
const CLOCK_OFFSET_TOLERANCE_US: i64 = 1_000_000;

pub(crate) fn refusal(reason: RefusalReason, message: String, detail: String, hint: &str) -> Refusal {
    Refusal { reason, message, detail, hint: hint.into() }
}

fn epoch_text(e: u64) -> String {
    format!("{e:016x}")
}

/// Who an ongoing session serves, and how to tell it to go.
struct Live {
    last_heard: Arc<Mutex<Instant>>,
    evict: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    /// What it was admitted with: a reload that changes it ends the session.
    admitted: PeerAuth,
    /// The fingerprint of the certificate it presented (mutual TLS).
    certificate: Option<String>,
}

/// Whose acknowledgements bound the reclaim of our log.
#[derive(Clone)]
enum AckPeers {
    /// A branch: the main.
    Main,
    /// The main: the branches listed now.
    Listed(watch::Receiver<Arc<Admission>>),
}

impl AckPeers {
    fn names(&self) -> Vec<String> {
        match self {
            AckPeers::Main => vec!["main".into()],
            AckPeers::Listed(a) => a.borrow().names(),
        }
    }
}

/// Everything one session needs.
struct Session {
    peer: String,
    settings: LinkSettings,
    log: Arc<ChangeLog>,
    status: Arc<NodeStatus>,
    /// Peers whose acknowledgements bound reclaim of our log.
    ack_peers: AckPeers,
    /// Send our log after this position.
    send_after: u64,
    /// The peer sends its log after this position (our durable progress).
    receive_after: u64,
    last_heard: Arc<Mutex<Instant>>,
    /// Limits agreed at the handshake.
    max_frame: usize,
    window: u64,
}

/// How a session ended without error.
enum SessionEnd {
    Shutdown,
    Evicted,
}

/// What the supervisor tells the writer to send besides entries.
#[derive(Default)]
struct Control {
    /// Durable progress to acknowledge.
    ack: watch::Sender<u64>,
    /// Bytes of the peer's entries our apply has taken.
    consumed: watch::Sender<u64>,
    /// A refusal to send, after which the writer stops.
    refuse: watch::Sender<Option<Refusal>>,
}

impl Session {
    async fn run(
        self,
        applier: Applier,
        progress: watch::Receiver<ApplyStats>,
        reader: Reader,
        writer: Writer,
        mut shutdown: watch::Receiver<bool>,
        mut evict: watch::Receiver<bool>,
    ) -> Result<SessionEnd, LinkError> {
        self.status.peer(&self.peer, |p| {
            p.sent_to_peer = self.send_after;
            p.in_flight_to_peer = 0;
            p.received_from_peer = self.receive_after;
            p.unapplied_bytes = 0;
        });
        let control = Arc::new(Control::default());
        let (apply_tx, apply_rx) = mpsc::unbounded_channel::<Vec<WireEntry>>();
        let (apply_stop_tx, apply_stop_rx) = watch::channel(false);
        let (peer_ack_tx, mut peer_ack_rx) = watch::channel(0u64);
        let (peer_consumed_tx, peer_consumed_rx) = watch::channel(0u64);
        let consumed_rx = control.consumed.subscribe();
        // The newest position of our log the peer has been sent (or held
        // before this session).
        let sent = Arc::new(AtomicU64::new(self.send_after));
        let mut applier = applier;
        if applier.expects_author() {
            // At the main: a branch saw at most what was relayed to it.
            applier.cap_seen_main(self.log.clone(), sent.clone());
        }
        let mut apply_task = tokio::spawn(applier.run(apply_rx, apply_stop_rx, control.consumed.clone()).in_current_span());
        let mut reader_task = tokio::spawn(
            read_loop(
                reader,
                ReadCtx {
                    peer: self.peer.clone(),
                    status: self.status.clone(),
                    last_heard: self.last_heard.clone(),
                    apply: apply_tx,
                    peer_ack: peer_ack_tx,
                    peer_consumed: peer_consumed_tx,
                    our_consumed: consumed_rx,
                    window: self.window,
                    max_frame: self.max_frame,
                    peer_timeout: self.settings.peer_timeout,
                    receive_after: self.receive_after,
                },
            )
            .in_current_span(),
        );
        let mut writer_task = tokio::spawn(
            write_loop(
                writer,
                WriteCtx {
                    log: self.log.clone(),
                    control: control.clone(),
                    peer_consumed: peer_consumed_rx,
                    send_after: self.send_after,
                    sent: sent.clone(),
                    heartbeat: self.settings.heartbeat,
                    window: self.window,
                    chunk: self.max_frame.saturating_sub(FRAME_OVERHEAD).max(1024),
                    peer: self.peer.clone(),
                    status: self.status.clone(),
                },
            )
            .in_current_span(),
        );
        let mut progress = progress;
        let result = loop {
            let silent_for = self.last_heard.lock().map(|t| t.elapsed()).unwrap_or_default();
            let quiet_deadline = self.settings.peer_timeout.saturating_sub(silent_for);
            let wake_at = Instant::now() + quiet_deadline;
            tokio::select! {
                biased;
                // 1. Shutdown of the node, or eviction by a newer session of the same peer.
                _ = shutdown.changed() => break Ok(SessionEnd::Shutdown),
                _ = evict.changed() => break Ok(SessionEnd::Evicted),
                // 2. A task ended: apply (an error, or its input closed),
                //    the reader (the peer closed, or broke the protocol), the
                //    writer (the socket failed).
                r = &mut apply_task => break match r {
                    // Apply's input closed: the reader ended, and says why.
                    Ok(Ok(_)) => match tokio::time::timeout(Duration::from_secs(1), &mut reader_task).await {
                        Ok(Ok(Err(e))) => Err(e),
                        _ => Err(LinkError::Closed),
                    },
                    Ok(Err(e)) => Err(LinkError::Engine(e)),
                    Err(e) => Err(LinkError::Violation(format!("apply task failed: {e}"))),
                },
                r = &mut reader_task => break match r {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(LinkError::Closed),
                    Err(e) => Err(LinkError::Violation(format!("reader task failed: {e}"))),
                },
                r = &mut writer_task => break match r {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) => Err(LinkError::Closed),
                    Err(e) => Err(LinkError::Violation(format!("writer task failed: {e}"))),
                },
                // 3. Durable apply progress: acknowledge it.
                Ok(()) = progress.changed() => {
                    let st = progress.borrow_and_update().clone();
                    self.status.peer(&self.peer, |p| {
                        p.applied_from_peer = st.committed_pos;
                        p.changesets_applied = st.changesets;
                        p.rows_applied = st.rows;
                        p.conflicts = st.conflicts;
                        p.quarantined = st.quarantined;
                        p.echoes_as_sent = st.echoes_as_sent;
                        p.pending_from_peer = p.peer_log_newest.saturating_sub(st.committed_pos);
                    });
                    control.ack.send_replace(st.committed_pos);
                }
                // 4. The peer's durable progress in our log: reclaim.
                Ok(()) = peer_ack_rx.changed() => {
                    let pos = *peer_ack_rx.borrow_and_update();
                    // An Ack beyond what this session sent (or the peer held
                    // from before it) is not believed: a confused or lying
                    // peer must not make us reclaim what it never received.
                    if let Err(e) = self.acknowledged(pos.min(sent.load(Ordering::SeqCst))) {
                        // A full disk may refuse the meta write; space is
                        // freed at the next acknowledgement.
                        tracing::warn!(peer = %self.peer, error = %e, "reclaiming log space failed");
                    }
                }
                // 5. The peer timeout, judged on what arrives only: it fires
                //    while a write to the peer is stuck, too. A timer that
                //    fired late means this node was too busy to run its
                //    tasks: the reader gets its turn before anyone is judged
                //    silent (input waiting is not silence).
                _ = tokio::time::sleep(quiet_deadline) => {
                    let late = Instant::now().saturating_duration_since(wake_at) > Duration::from_millis(250);
                    for _ in 0..8 {
                        tokio::task::yield_now().await;
                    }
                    let silent = self.last_heard.lock().map(|t| t.elapsed()).unwrap_or_default();
                    if silent >= self.settings.peer_timeout && !late {
                        break Err(LinkError::Timeout(self.settings.peer_timeout));
                    }
                }
            }
        };
        // A peer that broke the stream's order is told so (R26).
        if let Err(LinkError::Engine(EngineError::Gap { stream, expected, got })) = &result {
            control.refuse.send_replace(Some(refusal(
                RefusalReason::ProtocolViolation,
                format!("stream {stream} skipped from position {expected} to {got}"),
                "Positions of a stream follow each other without a gap; nothing after the gap was applied.".into(),
                "This is a bug or a tampered peer: check the sender's version and log.",
            )));
            if !writer_task.is_finished() {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer_task).await;
            }
        }
        // A peer that spoke in another node's name: a security event, told
        // to the peer, counted in status and /metrics.
        if let Err(LinkError::Engine(EngineError::Impersonation { stream, pos, detail })) = &result {
            tracing::error!(peer = %self.peer, pos, detail = %detail, "security event: a peer sent an entry in another node's name; session ended");
            self.status.peer(&self.peer, |p| p.security_events += 1);
            control.refuse.send_replace(Some(refusal(
                RefusalReason::ProtocolViolation,
                format!("stream {stream} sent an entry in another node's name at position {pos}"),
                format!("{detail}. Nothing of it was applied."),
                "A branch's credentials speak only for that branch: check the shop's PC and software, and revoke its certificate if it was compromised.",
            )));
            if !writer_task.is_finished() {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer_task).await;
            }
        }
        // Drain: stop intake, let apply commit what is whole, so the
        // replication origin is free before any next session starts.
        reader_task.abort();
        writer_task.abort();
        let _ = apply_stop_tx.send(true);
        if !apply_task.is_finished() {
            let _ = (&mut apply_task).await;
        }
        result
    }

    fn acknowledged(&self, pos: u64) -> Result<(), EngineError> {
        self.log.set_peer_ack(&self.peer, pos)?;
        self.log.touch_peer(&self.peer);
        failpoints::hit(failpoints::LOG_BEFORE_RECLAIM);
        // Only the main forgets peers (a branch's log holds its own sales,
        // which stay until the main has them).
        let retention = (self.settings.apply.role == branchsync_engine::Role::Main).then_some(self.settings.retention);
        let floor = reclaim_floor(&self.log, &self.ack_peers.names(), retention);
        if let Some(floor) = floor {
            let n = self.log.reclaim_through(floor)?;
            if n > 0 {
                tracing::debug!(peer = %self.peer, through = floor, entries = n, "log space reclaimed");
            }
        }
        let pending = self.log.count_after(pos);
        self.status.peer(&self.peer, |p| {
            p.acked_by_peer = pos;
            p.pending_to_peer = pending;
        });
        Ok(())
    }
}

/// The position up to which every peer that still counts has acknowledged
/// our log. With a `retention` (the main), a peer not in contact for longer
/// than that — it must be re-seeded anyway (R23) — no longer pins the log.
pub fn reclaim_floor(log: &ChangeLog, peers: &[String], retention: Option<Duration>) -> Option<u64> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut floor = None::<u64>;
    for p in peers {
        let away = now.saturating_sub(log.peer_last_seen(p));
        if retention.is_some_and(|r| Duration::from_secs(away) > r) {
            continue;
        }
        let ack = log.peer_ack(p).unwrap_or(0);
        floor = Some(floor.map_or(ack, |f| f.min(ack)));
    }
    floor.or_else(|| (!peers.is_empty()).then(|| log.visible()))
}

/// What the reader task needs.
struct ReadCtx {
    peer: String,
    status: Arc<NodeStatus>,
    last_heard: Arc<Mutex<Instant>>,
    apply: mpsc::UnboundedSender<Vec<WireEntry>>,
    peer_ack: watch::Sender<u64>,
    peer_consumed: watch::Sender<u64>,
    our_consumed: watch::Receiver<u64>,
    window: u64,
    max_frame: usize,
    peer_timeout: Duration,
    /// The peer sends entries after this position.
    receive_after: u64,
}

/// An entry being put back together from its chunks.
struct Assembly {
    pos: u64,
    part: u32,
    last: bool,
    total: u64,
    bytes: Vec<u8>,
}

/// Reads frames until the socket ends: handles acknowledgements, credit
/// and heartbeats at once, and hands entries to apply. Never waits for
/// anything but the socket (the credit window bounds what it buffers).
async fn read_loop(mut reader: Reader, ctx: ReadCtx) -> Result<(), LinkError> {
    let mut received: u64 = 0;
    let mut assembling: Option<Assembly> = None;
    let mut last_pos: u64 = 0;
    // When entry bytes last arrived (a chunk counts): for telling a stalled
    // stream from an idle one.
    let mut last_data = Instant::now();
    // A sender may start one entry of any size when nothing is in flight,
    // and then fill the window; more than that breaks the protocol.
    let slack = ctx.max_frame as u64;
    loop {
        let msg = match reader.next().await {
            None => return Err(LinkError::Closed),
            Some(Err(e)) => return Err(LinkError::Proto(e)),
            Some(Ok(m)) => m,
        };
        if let Ok(mut t) = ctx.last_heard.lock() {
            *t = Instant::now();
        }
        ctx.status.peer(&ctx.peer, |p| p.last_contact_unix_ms = Some(now_us() / 1000));
        let mut check_window = |bytes: u64, single: bool| -> Result<(), LinkError> {
            received += bytes;
            let in_flight = received.saturating_sub(*ctx.our_consumed.borrow());
            if in_flight > ctx.window + slack && !single {
                return Err(LinkError::Violation(format!("the peer sent {in_flight} bytes beyond what was consumed, more than the window of {} bytes", ctx.window)));
            }
            Ok(())
        };
        match msg {
            Message::Entries(entries) => {
                last_data = Instant::now();
                if assembling.is_some() {
                    return Err(LinkError::Violation("entries arrived in the middle of a chunked entry".into()));
                }
                let Some(last) = entries.last() else { continue };
                let newest = last.pos;
                for e in &entries {
                    if e.pos <= last_pos {
                        return Err(LinkError::Violation(format!("entry at position {} after position {last_pos}", e.pos)));
                    }
                    last_pos = e.pos;
                }
                let bytes: u64 = entries.iter().map(|e| e.body.len() as u64).sum();
                check_window(bytes, entries.len() == 1)?;
                ctx.status.peer(&ctx.peer, |p| p.peer_log_newest = p.peer_log_newest.max(newest));
                if ctx.apply.send(entries).is_err() {
                    return Ok(()); // apply ended; the supervisor reports why
                }
            }
            Message::Chunk(c) => {
                last_data = Instant::now();
                let done = assemble(&mut assembling, c, last_pos)?;
                if let Some(a) = done {
                    tracing::debug!(pos = a.pos, bytes = a.total, "large entry received");
                    last_pos = a.pos;
                    check_window(a.total, true)?;
                    ctx.status.peer(&ctx.peer, |p| p.peer_log_newest = p.peer_log_newest.max(a.pos));
                    if ctx.apply.send(vec![WireEntry { pos: a.pos, part: a.part, last: a.last, body: a.bytes }]).is_err() {
                        return Ok(());
                    }
                }
            }
            Message::Credit { consumed } => {
                tracing::trace!(consumed, "credit");
                ctx.peer_consumed.send_if_modified(|c| {
                    let moved = consumed > *c;
                    *c = (*c).max(consumed);
                    moved
                });
            }
            Message::Ack { pos } => {
                ctx.peer_ack.send_replace(pos);
            }
            Message::Heartbeat { now_us: _, log_newest } => {
                // The clock offset is the databases' one, measured at the
                // handshake (R14); heartbeats do not move it.
                let unapplied = received.saturating_sub(*ctx.our_consumed.borrow());
                let have = last_pos.max(ctx.receive_after);
                ctx.status.peer(&ctx.peer, |p| {
                    p.peer_log_newest = log_newest;
                    p.pending_from_peer = log_newest.saturating_sub(p.applied_from_peer);
                    p.received_from_peer = have;
                    p.unapplied_bytes = unapplied;
                });
                // The peer says its log goes further, yet nothing has come
                // for the peer timeout although apply took everything that
                // came (the peer's window is open): the stream is stuck at
                // the sender. Ending the session makes both sides start
                // again from durable progress.
                // Twice the peer timeout: a peer that does not hear us (so
                // not our credit either) ends the session at its own peer
                // timeout first; only a peer that hears us and still sends
                // nothing is stalled.
                // A large entry sent in chunks stalls the same way when its
                // chunks stop (the sender never waits for credit between
                // chunks of one entry).
                let quiet = last_data.elapsed();
                let owed = log_newest > have || assembling.is_some();
                if owed && unapplied == 0 && quiet >= 2 * ctx.peer_timeout {
                    let midway = assembling.as_ref().map(|a| format!(" (entry {} stopped after {} of its {} bytes)", a.pos, a.bytes.len(), a.total)).unwrap_or_default();
                    tracing::warn!(peer = %ctx.peer, received = have, peer_log_newest = log_newest, quiet_ms = quiet.as_millis() as u64, chunked_entry = ?assembling.as_ref().map(|a| a.pos), "the peer's stream stalled");
                    return Err(LinkError::Stalled(format!(
                        "the peer's log reaches position {log_newest}, the last entry received is {have}{midway}, and nothing arrived for {} s although every byte received was taken by apply",
                        quiet.as_secs()
                    )));
                }
            }
            Message::Refuse(r) => return Err(LinkError::Refused(r)),
            other => return Err(LinkError::Violation(format!("unexpected {} during a session", other.kind()))),
        }
    }
}

/// Adds a chunk to the entry being assembled; returns the entry once whole.
fn assemble(assembling: &mut Option<Assembly>, c: EntryChunk, last_pos: u64) -> Result<Option<Assembly>, LinkError> {
    if c.total > MAX_ENTRY_BYTES {
        return Err(LinkError::Violation(format!("an entry of {} bytes is larger than any entry may be ({MAX_ENTRY_BYTES} bytes)", c.total)));
    }
    let a = match assembling.as_mut() {
        None => {
            if c.offset != 0 || c.pos <= last_pos {
                return Err(LinkError::Violation(format!("a chunked entry at position {} starts at offset {}", c.pos, c.offset)));
            }
            // The whole size is reserved once (the pages are touched only
            // as bytes arrive), so the buffer never doubles past it.
            assembling.insert(Assembly { pos: c.pos, part: c.part, last: c.last, total: c.total, bytes: Vec::with_capacity(c.total as usize) })
        }
        Some(a) => a,
    };
    if (c.pos, c.part, c.last, c.total) != (a.pos, a.part, a.last, a.total) || c.offset != a.bytes.len() as u64 || c.data.is_empty() {
        return Err(LinkError::Violation(format!("chunk at offset {} of entry {} does not continue the entry", c.offset, c.pos)));
    }
    if a.bytes.len() as u64 + c.data.len() as u64 > a.total {
        return Err(LinkError::Violation(format!("chunks of entry {} are longer than the entry", c.pos)));
    }
    a.bytes.extend_from_slice(&c.data);
    if a.bytes.len() as u64 == a.total {
        return Ok(assembling.take());
    }
    Ok(None)
}

/// What the writer task needs.
struct WriteCtx {
    log: Arc<ChangeLog>,
    control: Arc<Control>,
    peer_consumed: watch::Receiver<u64>,
    send_after: u64,
    /// Where sending has reached (for capping the peer's Acks).
    sent: Arc<AtomicU64>,
    heartbeat: Duration,
    window: u64,
    /// Largest entry bytes in one frame.
    chunk: usize,
    peer: String,
    status: Arc<NodeStatus>,
}

/// A large entry being sent in chunks.
struct Sending {
    raw: RawEntry,
    offset: u64,
}

/// The only task that writes to the socket: acknowledgements and credit as
/// they change, heartbeats, and our log after `send_after` as it grows,
/// within the peer's credit window, large entries in chunks with control
/// frames in between.
async fn write_loop(mut writer: Writer, mut ctx: WriteCtx) -> Result<(), LinkError> {
    let mut ack = ctx.control.ack.subscribe();
    let mut consumed = ctx.control.consumed.subscribe();
    let mut refuse = ctx.control.refuse.subscribe();
    // What was decided before this task first ran must still be sent:
    // subscribing marks the current value as seen. A refusal (the peer's
    // very first frame broke the stream); and credit and acknowledgement
    // (apply may have taken the peer's first frame already): a peer that
    // waits for credit before a large entry would wait for good.
    if refuse.borrow().is_some() {
        refuse.mark_changed();
    }
    if *consumed.borrow() > 0 {
        consumed.mark_changed();
    }
    if *ack.borrow() > 0 {
        ack.mark_changed();
    }
    let mut visible = ctx.log.subscribe();
    let mut heartbeat = tokio::time::interval(ctx.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut after = ctx.send_after;
    let mut sent_bytes: u64 = 0;
    let mut sending: Option<Sending> = None;
    let mut credit_sent: u64 = 0;
    loop {
        let in_flight = sent_bytes.saturating_sub(*ctx.peer_consumed.borrow());
        // May we send the next frame of entries? A chunked entry goes on;
        // an entry larger than a frame starts only with nothing in flight;
        // others while the window has room.
        let ready = match &sending {
            Some(_) => true,
            None if ctx.log.visible() > after => match ctx.log.read_raw_after(after, 0).first() {
                Some(next) if next.len as usize > ctx.chunk => in_flight == 0,
                Some(_) => in_flight < ctx.window,
                None => false,
            },
            None => false,
        };
        tokio::select! {
            biased;
            // 0. A refusal ends the session.
            Ok(()) = refuse.changed() => {
                let r = refuse.borrow_and_update().clone();
                if let Some(r) = r {
                    writer.send(Message::Refuse(r)).await?;
                    return Ok(());
                }
            }
            // 1. Control: acknowledgements and credit, coalesced.
            Ok(()) = ack.changed() => {
                let pos = *ack.borrow_and_update();
                writer.send(Message::Ack { pos }).await?;
            }
            Ok(()) = consumed.changed() => {
                let c = *consumed.borrow_and_update();
                if c > credit_sent {
                    credit_sent = c;
                    writer.send(Message::Credit { consumed: c }).await?;
                }
            }
            // 2. Heartbeats (and the flow state, for status).
            _ = heartbeat.tick() => {
                ctx.status.peer(&ctx.peer, |p| {
                    p.sent_to_peer = after;
                    p.in_flight_to_peer = in_flight;
                });
                writer.send(Message::Heartbeat { now_us: now_us(), log_newest: ctx.log.visible() }).await?;
            }
            // 3. One frame of entries.
            _ = std::future::ready(()), if ready => {
                if let Some(s) = sending.as_mut() {
                    let data = s.raw.read(s.offset, ctx.chunk)?;
                    let c = EntryChunk { pos: s.raw.pos, part: s.raw.part, last: s.raw.last, total: s.raw.len, offset: s.offset, data };
                    s.offset += c.data.len() as u64;
                    let done = s.offset >= s.raw.len;
                    writer.send(Message::Chunk(c)).await?;
                    if done {
                        after = s.raw.pos;
                        ctx.sent.store(after, Ordering::SeqCst);
                        sending = None;
                        failpoints::hit(failpoints::LINK_AFTER_SEND);
                    }
                    continue;
                }
                let room = (ctx.window.saturating_sub(in_flight)).min(ctx.chunk as u64) as usize;
                let batch = ctx.log.read_raw_after(after, room);
                let Some(first) = batch.first() else { continue };
                if first.len as usize > ctx.chunk {
                    // Larger than a frame: alone, in chunks.
                    tracing::debug!(pos = first.pos, bytes = first.len, in_flight, "sending a large entry in chunks");
                    sent_bytes += first.len;
                    sending = Some(Sending { raw: first.clone(), offset: 0 });
                    continue;
                }
                let mut entries = Vec::with_capacity(batch.len());
                // The frame stays within `chunk` (its size counts every
                // entry's overhead); the credit counts bodies.
                let (mut framed, mut bytes) = (0usize, 0u64);
                for r in batch.iter().take_while(|r| (r.len as usize) <= ctx.chunk) {
                    let add = r.len as usize + ENTRY_OVERHEAD;
                    if !entries.is_empty() && (framed + add > ctx.chunk || bytes + r.len > room as u64) {
                        break;
                    }
                    framed += add;
                    bytes += r.len;
                    entries.push(WireEntry { pos: r.pos, part: r.part, last: r.last, body: r.read_all()? });
                }
                let Some(last) = entries.last() else { continue };
                after = last.pos;
                sent_bytes += bytes;
                writer.send(Message::Entries(entries)).await?;
                ctx.sent.store(after, Ordering::SeqCst);
                failpoints::hit(failpoints::LINK_AFTER_SEND);
            }
            // 4. Waiting: for new entries or for credit.
            Ok(()) = visible.changed() => {}
            Ok(()) = ctx.peer_consumed.changed() => {}
        }
    }
}

/// Whether the branch of this stream was away longer than `retention`;
/// how long, if so.
async fn away_too_long(applier: &Applier, retention: Duration) -> Result<Option<String>, EngineError> {
    let Some(last) = applier.last_contact_us().await? else { return Ok(None) };
    let away = Duration::from_micros(u64::try_from(applier.db_clock_us().await? - last).unwrap_or(0));
    Ok((away > retention).then(|| human(away)))
}

fn human(d: Duration) -> String {
    let h = d.as_secs() / 3600;
    if h >= 48 {
        format!("{} days", h / 24)
    } else {
        format!("{h} hours")
    }
}

/// Tells the peer why it is refused, then ends the connection with that reason.
pub(crate) async fn refuse(writer: &mut Writer, r: Refusal) -> Result<(), LinkError> {
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, writer.send(Message::Refuse(r.clone()))).await;
    Err(LinkError::Refused(r))
}

pub(crate) fn split(stream: Box<dyn LinkIo>) -> (Reader, Writer) {
    let (r, w) = tokio::io::split(stream);
    // Nothing large before the peer is known (R28): the limit is raised to
    // the agreed one once the handshake is done.
    (FramedRead::new(r, FrameCodec::new(HANDSHAKE_MAX_FRAME)), FramedWrite::new(w, FrameCodec::new(HANDSHAKE_MAX_FRAME)))
}

/// Sets the frame limit of both halves after the handshake.
pub(crate) fn set_frame_limit(reader: &mut Reader, writer: &mut Writer, max: usize) {
    reader.decoder_mut().set_max_frame(max);
    writer.encoder_mut().set_max_frame(max);
}

pub(crate) async fn next_message(reader: &mut Reader) -> Result<Message, LinkError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Err(_) => Err(LinkError::Timeout(HANDSHAKE_TIMEOUT)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(Err(e))) => Err(LinkError::Proto(e)),
        Ok(Some(Ok(m))) => Ok(m),
    }
}

/// The limits of a session: the smaller of both sides'.
fn agree(ours: usize, theirs: u64) -> usize {
    (theirs.min(ours as u64) as usize).max(MIN_MAX_FRAME)
}

/// Logs how a session ended, at the level it deserves, and keeps the
/// reason for `status` (R24: failures are loud).
fn report_end(status: &NodeStatus, peer: &str, e: &LinkError, retry_ms: Option<u64>) {
    let msg = e.to_string();
    match e {
        LinkError::Refused(r) => tracing::error!(peer, reason = ?r.reason, error = %msg, "link refused"),
        LinkError::Tls(_) => tracing::error!(peer, error = %msg, retry_ms, "link refused"),
        LinkError::Engine(err) if !err.is_transient() => tracing::error!(peer, error = %msg, "link stopped"),
        LinkError::Engine(_) | LinkError::Violation(_) | LinkError::Stalled(_) => tracing::warn!(peer, error = %msg, retry_ms, "link session failed; retrying"),
        LinkError::Proto(ProtoError::Io(_)) | LinkError::Closed | LinkError::Timeout(_) => tracing::info!(peer, error = %msg, retry_ms, "link down"),
        LinkError::Proto(_) => tracing::warn!(peer, error = %msg, retry_ms, "link session failed; retrying"),
    }
    let stalled = matches!(e, LinkError::Stalled(_));
    status.peer(peer, |p| {
        p.connected = false;
        p.last_error = Some(msg);
        p.stalls += u64::from(stalled);
    });
}

// ---------------------------------------------------------------- branch side

/// The branch's link: dials the main forever with capped backoff, while
/// capture goes on independently.
pub async fn run_branch(settings: LinkSettings, main_addr: String, admission: watch::Receiver<Arc<Admission>>, log: Arc<ChangeLog>, status: Arc<NodeStatus>, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(StreamState::default());
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let span = tracing::info_span!("link", peer = "main", addr = %main_addr);
        // The token as the configuration says now (reloaded on SIGHUP).
        let token = admission.borrow().token.clone();
        let r = branch_session(&settings, &main_addr, &token, &log, &status, &state, shutdown.clone()).instrument(span).await;
        status.peer("main", |p| p.connected = false);
        match r {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Evicted) => {}
            Err(e) => {
                let e = tls_aware(e, false);
                report_end(&status, "main", &e, Some(backoff.as_millis() as u64));
                if !e.is_network() {
                    status.peer("main", |p| p.session_failures += 1);
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
}

/// A connection to the main: TCP, then (unless `sync.insecure`) TLS with
/// this shop's certificate, the main verified against the chain's CA.
/// Returns the main's certificate fingerprint.
pub(crate) async fn dial_main(node: &str, tls: &LinkTls, main_addr: &str) -> Result<(Box<dyn LinkIo>, Option<String>), LinkError> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(main_addr))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
        .map_err(|e| LinkError::Proto(ProtoError::Io(e)))?;
    let _ = stream.set_nodelay(true);
    let io = match tls {
        LinkTls::Branch(creds) => {
            let cfg = creds.get().map_err(|e| LinkError::Tls(format!("{e}. Hint: issue this shop's credentials at the main (branchsync tls issue {node} --out DIR) and copy DIR to {}.", creds.dir().display())))?;
            let s = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(cfg).connect(tls::main_server_name(), stream))
                .await
                .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
                .map_err(|e| tls_aware(LinkError::Proto(ProtoError::Io(e)), false))?;
            let fp = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| tls::fingerprint(c));
            (Box::new(s) as Box<dyn LinkIo>, fp)
        }
        _ => (Box::new(stream) as Box<dyn LinkIo>, None),
    };
    Ok(io)
}

async fn branch_session(
    settings: &LinkSettings,
    main_addr: &str,
    token: &str,
    log: &Arc<ChangeLog>,
    status: &Arc<NodeStatus>,
    state: &Arc<StreamState>,
    shutdown: watch::Receiver<bool>,
) -> Result<SessionEnd, LinkError> {
    let (io, fp) = dial_main(&settings.node, &settings.tls, main_addr).await?;
    if fp.is_some() {
        status.peer("main", |p| p.certificate = fp);
    }
    let (mut reader, mut writer) = split(io);
    let (applier, progress) = Applier::connect(&settings.db_url, settings.apply.clone(), branchsync_engine::state::RELAY_STREAM, state.clone()).await?;
    let t0 = applier.db_clock_us().await?;
    let relay_epoch = applier.stream_epoch().await?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node: settings.node.clone(),
        index: settings.index,
        token: token.to_string(),
        stride: settings.stride,
        exclude: settings.exclude.clone(),
        system_id: settings.system_id,
        log_epoch: log.epoch(),
        log_newest: log.visible(),
        log_floor: log.floor()?,
        relay_epoch: relay_epoch.unwrap_or(0),
        relay_applied: applier.committed(),
        relay_applied_lsn: applier.committed_lsn().await?,
        now_us: t0,
        table_rules: settings.table_rules.clone(),
        ddl_from: ddl_from(&settings).into(),
        tombstone_days: tombstone_days(settings),
        max_frame: settings.max_frame as u64,
        window: settings.window as u64,
    };
    writer.send(Message::Hello(hello)).await?;
    let welcome: Welcome = match next_message(&mut reader).await? {
        Message::Welcome(w) => w,
        Message::Refuse(r) => return Err(LinkError::Refused(r)),
        other => return Err(LinkError::Violation(format!("expected Welcome, got {}", other.kind()))),
    };
    if welcome.protocol_version != PROTOCOL_VERSION {
        return Err(LinkError::Violation(format!("main speaks protocol {}, we speak {PROTOCOL_VERSION}", welcome.protocol_version)));
    }
    let max_frame = agree(settings.max_frame, welcome.max_frame);
    let window = agree(settings.window, welcome.window) as u64;
    set_frame_limit(&mut reader, &mut writer, max_frame);
    // R14: this database's clock minus the main's, from the four times of
    // the handshake (the network and the main's work cancel out), and this
    // node stamps its commits on the main's clock from now on.
    let t3 = applier.db_clock_us().await?;
    let offset_us = ((t0 - welcome.hello_received_us) + (t3 - welcome.now_us)) / 2;
    if applier.record_clock_offset(offset_us, CLOCK_OFFSET_TOLERANCE_US).await? {
        tracing::info!(peer = "main", clock_offset_ms = offset_us / 1000, "clock offset to the main recorded; commit stamps are corrected by it");
    }
    status.peer("main", |p| p.clock_offset_ms = Some(offset_us / 1000));
    // R26: the relay we applied must be this relay.
    match relay_epoch {
        Some(e) if e != welcome.relay_epoch => {
            let r = refusal(
                RefusalReason::LogRecreated,
                "the main's relay log was recreated".into(),
                format!(
                    "This branch applied the main's relay up to position {} of relay log {}, but the main now serves relay log {}: the main's data directory was lost or replaced, and what it relayed after this branch's last session is gone.",
                    applier.committed(),
                    epoch_text(e),
                    epoch_text(welcome.relay_epoch)
                ),
                "Re-seed this branch: stop its daemon and run branchsync join --discard-local here (it copies the main while the chain keeps selling).",
            );
            return refuse(&mut writer, r).await.map(|_| SessionEnd::Shutdown);
        }
        None => applier.set_stream_epoch(welcome.relay_epoch).await?,
        Some(_) => {}
    }
    // R4, R26: the main resumes our stream after `resume_after`; that
    // position must be one of this log, and one we still hold or reclaimed
    // exactly there. Never skip.
    let floor = log.floor()?;
    let r = welcome.resume_after;
    let problem = if welcome.stream_epoch != 0 && welcome.stream_epoch != log.epoch() {
        Some((
            RefusalReason::LogRecreated,
            format!("branch \"{}\" has a new log", settings.node),
            format!(
                "The main applied this branch's changes from log {}, but this branch's log is {}: its data directory was lost or replaced, and changes it held but had not sent are lost to replication.",
                epoch_text(welcome.stream_epoch),
                epoch_text(log.epoch())
            ),
            "Re-seed this branch: stop its daemon and run branchsync join --discard-local here (the main then forgets the old stream).",
        ))
    } else if r < floor {
        Some((
            RefusalReason::MustReseed,
            "the main needs changes this branch no longer keeps".into(),
            format!(
                "The main has applied this branch's changes up to position {r}, but this branch keeps its log only after position {floor} ([log] keep_acked): the main's database was restored from a backup older than that."
            ),
            "Restore the main's database from a newer backup, or re-seed this branch from the main; raise [log] keep_acked to keep more.",
        ))
    } else if r > log.visible() {
        Some((
            RefusalReason::WentBackInTime,
            format!("branch \"{}\" went back in time", settings.node),
            format!("The main has applied this branch's changes up to log position {r}, but this branch's log ends at {}. The branch's database or data directory was restored to an earlier state.", log.visible()),
            "Changes made here after the restore point would be skipped. Re-seed this branch: stop its daemon and run branchsync join --discard-local here.",
        ))
    } else if r > floor && welcome.resume_lsn != 0 && log.read_after(r - 1, 1)?.first().is_none_or(|e| e.pos != r || e.header.commit_lsn != welcome.resume_lsn) {
        Some((
            RefusalReason::WentBackInTime,
            format!("branch \"{}\" went back in time", settings.node),
            format!(
                "The main has applied this branch's changes up to log position {r} (commit LSN {}), but this branch's log does not hold that transaction there.",
                fmt_lsn(welcome.resume_lsn)
            ),
            "The branch's database or data directory was restored to an earlier state. Re-seed this branch: stop its daemon and run branchsync join --discard-local here.",
        ))
    } else {
        None
    };
    if let Some((reason, message, detail, hint)) = problem {
        return refuse(&mut writer, refusal(reason, message, detail, hint)).await.map(|_| SessionEnd::Shutdown);
    }
    tracing::info!(peer = "main", resume_after = r, relay_applied = applier.committed(), max_frame, window, "link up");
    status.peer("main", |p| {
        p.connected = true;
        p.sessions += 1;
        p.last_error = None;
        p.acked_by_peer = r;
        p.pending_to_peer = log.count_after(r);
    });
    log.set_peer_ack("main", r)?;
    log.touch_peer("main");
    let (_evict_tx, evict_rx) = watch::channel(false);
    let session = Session {
        peer: "main".into(),
        settings: settings.clone(),
        log: log.clone(),
        status: status.clone(),
        ack_peers: AckPeers::Main,
        send_after: r,
        receive_after: applier.committed(),
        last_heard: Arc::new(Mutex::new(Instant::now())),
        max_frame,
        window,
    };
    session.run(applier, progress, reader, writer, shutdown, evict_rx).await
}

// ------------------------------------------------------------------ main side

/// The main's listener: one task per branch connection.
pub async fn run_main(settings: LinkSettings, listener: TcpListener, mut admission: watch::Receiver<Arc<Admission>>, log: Arc<ChangeLog>, status: Arc<NodeStatus>, mut shutdown: watch::Receiver<bool>) {
    let live: Arc<Mutex<HashMap<String, Live>>> = Arc::default();
    let states: States = Arc::default();
    let sessions = Arc::new(AtomicU64::new(0));
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let mut turned_away: u64 = 0;
    let mut last_warned: Option<Instant> = None;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            Ok(()) = admission.changed() => {
                let now = admission.borrow_and_update().clone();
                readmit(&now, &live, &status, &settings);
            }
            acc = listener.accept() => {
                let (sock, addr) = match acc {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    turned_away += 1;
                    if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(peer_addr = %addr, turned_away, limit = MAX_PENDING_HANDSHAKES, "too many connections in their handshake; closing new ones at once");
                        last_warned = Some(Instant::now());
                    }
                    drop(sock);
                    continue;
                };
                let span = tracing::info_span!("link", peer_addr = %addr);
                let ctx = (settings.clone(), admission.clone(), log.clone(), status.clone(), live.clone(), states.clone(), shutdown.clone(), sessions.clone());
                tasks.spawn(async move {
                    let (settings, admission, log, status, live, states, shutdown, sessions) = ctx;
                    sessions.fetch_add(1, Ordering::Relaxed);
                    let _ = sock.set_nodelay(true);
                    let (io, cert): (Box<dyn LinkIo>, _) = match &settings.tls {
                        LinkTls::Main(creds) => {
                            let cfg = match creds.get() {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::error!(error = %e, "TLS credentials of the main unusable; connection dropped");
                                    return;
                                }
                            };
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(cfg).accept(sock)).await {
                                Err(_) => {
                                    tracing::info!("TLS handshake timed out");
                                    return;
                                }
                                Ok(Err(e)) => {
                                    let e = tls_aware(LinkError::Proto(ProtoError::Io(e)), true);
                                    tracing::warn!(error = %e, "TLS handshake failed; connection dropped");
                                    return;
                                }
                                Ok(Ok(s)) => {
                                    let cert = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
                                    (Box::new(s) as Box<dyn LinkIo>, cert)
                                }
                            }
                        }
                        _ => (Box::new(sock) as Box<dyn LinkIo>, None),
                    };
                    if let Err((peer, e)) = main_connection(io, cert, permit, settings, admission, log, status.clone(), live, states, shutdown).await {
                        let e = tls_aware(e, true);
                        match peer {
                            Some(p) => {
                                report_end(&status, &p, &e, None);
                                if !e.is_network() {
                                    status.peer(&p, |s| s.session_failures += 1);
                                }
                            }
                            None => match e {
                                LinkError::Refused(r) => tracing::warn!(reason = ?r.reason, error = %r, "connection refused"),
                                other => tracing::info!(error = %other, "connection ended before the handshake"),
                            },
                        }
                    }
                }.instrument(span));
            }
        }
    }
    // Drain: every session sees the shutdown and finishes its apply.
    while tasks.join_next().await.is_some() {}
}

/// Each branch's apply state, kept across its sessions.
type States = Arc<Mutex<HashMap<String, Arc<StreamState>>>>;

/// The configuration was reloaded: sessions it no longer admits as they
/// were admitted end (their branches are refused or re-authenticated when
/// they come back); the others go on untouched.
fn readmit(now: &Admission, live: &Mutex<HashMap<String, Live>>, status: &NodeStatus, settings: &LinkSettings) {
    let names = now.names();
    let mut ended = Vec::new();
    {
        let g = live.lock().unwrap_or_else(|p| p.into_inner());
        for (name, l) in g.iter() {
            if *l.done.borrow() {
                continue;
            }
            let why = match now.peers.iter().find(|p| p.name == *name) {
                None => Some("it is no longer listed in [[sync.peers]]"),
                Some(p) if *p != l.admitted => Some("its [[sync.peers]] entry changed (token or index)"),
                Some(_) if l.certificate.as_ref().is_some_and(|fp| now.revoked.contains(fp)) => Some("its certificate is now listed in [tls] revoked"),
                Some(_) => None,
            };
            if let Some(why) = why {
                tracing::warn!(peer = %name, reason = why, "configuration reloaded: ending the branch's session");
                let _ = l.evict.send(true);
                ended.push(name.clone());
            }
        }
    }
    if let LinkTls::Main(creds) = &settings.tls {
        // The revoked list is part of the TLS configuration: rebuilt at the
        // next handshake.
        creds.invalidate();
    }
    status.set_peers(&names);
    tracing::info!(peers = ?names, revoked = now.revoked.len(), ended = ?ended, "configuration reloaded: branches admitted");
}

/// The one answer to a branch that fails authentication, whatever the
/// reason (the main's log and status say which).
pub(crate) fn auth_refused(node: &str) -> Refusal {
    refusal(
        RefusalReason::BadToken,
        format!("authentication failed for node \"{node}\""),
        "The main does not accept this node's name, token or certificate; the main's log says which.".into(),
        "Check that the branch is listed in the main's [[sync.peers]], that its token matches, and that its TLS directory holds the credentials the main issued to it (branchsync tls issue NAME).",
    )
}

/// Who the peer is: a listed node, its token, and (mutual TLS) the
/// certificate issued to that node; the reason when it is not admitted.
pub(crate) fn authenticate<'a>(peers: &'a [PeerAuth], node: &str, token: &str, settings: &LinkSettings, cert: Option<&rustls::pki_types::CertificateDer<'static>>) -> Result<&'a PeerAuth, String> {
    let peer = peers.iter().find(|p| p.name == node);
    let why = match peer {
        None => Some(format!("unknown node \"{node}\": no [[sync.peers]] entry at the main has this name")),
        Some(p) if !tokens_equal(&p.token, token) => Some(format!("the token of node \"{node}\" does not match the main's")),
        Some(_) => match (&settings.tls, cert) {
            (LinkTls::Main(_), None) => Some("it presented no certificate".to_string()),
            (LinkTls::Main(_), Some(c)) if !tls::valid_for_node(c, node) => Some(format!("its certificate {} was issued to another node, not to \"{node}\"", tls::fingerprint(c))),
            _ => None,
        },
    };
    match (peer, why) {
        (Some(p), None) => Ok(p),
        (_, why) => Err(why.unwrap_or_default()),
    }
}

/// One connection at the main; on error, the branch it was (once known).
#[allow(clippy::too_many_arguments)]
async fn main_connection(
    sock: Box<dyn LinkIo>,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
    permit: tokio::sync::OwnedSemaphorePermit,
    settings: LinkSettings,
    admission: watch::Receiver<Arc<Admission>>,
    log: Arc<ChangeLog>,
    status: Arc<NodeStatus>,
    live: Arc<Mutex<HashMap<String, Live>>>,
    states: States,
    shutdown: watch::Receiver<bool>,
) -> Result<(), (Option<String>, LinkError)> {
    let mut admission = admission;
    let (mut reader, mut writer) = split(sock);
    let hello = match next_message(&mut reader).await {
        Ok(Message::Hello(h)) => h,
        Ok(Message::Inspect(i)) => {
            // `branchsync verify` at a branch: its own session, apart from
            // the branch's stream.
            let admitted = admission.borrow().clone();
            let node = i.node.clone();
            return match crate::inspect::serve(i, cert.as_ref(), permit, reader, writer, &settings, &admitted, log, status, shutdown).await {
                Ok(()) => Ok(()),
                Err(e @ LinkError::Refused(_)) => Err((None, e)),
                // Not a handshake that failed: a verify or join session
                // (authenticated or not) that ended with an error.
                Err(e) => {
                    tracing::info!(peer = %node, error = %e, "inspection session (verify or join) ended");
                    Ok(())
                }
            };
        }
        Ok(other) => {
            return refuse(&mut writer, refusal(RefusalReason::Other, format!("expected Hello, got {}", other.kind()), String::new(), "Connect with a branchsync branch."))
                .await
                .map_err(|e| (None, e));
        }
        Err(LinkError::Proto(e)) => {
            return refuse(&mut writer, refusal(RefusalReason::Other, format!("malformed handshake: {e}"), String::new(), "Check that the peer is a branchsync branch of the same version."))
                .await
                .map_err(|e| (None, e));
        }
        Err(e) => return Err((None, e)),
    };
    // R14: when the Hello arrived, on the main's clock (the daemon runs beside
    // its database, on the same clock).
    let received_us = now_us();
    if hello.protocol_version != PROTOCOL_VERSION {
        return refuse(&mut writer, refusal(
            RefusalReason::VersionMismatch,
            format!("protocol version mismatch: branch \"{}\" speaks {}, main speaks {PROTOCOL_VERSION}", hello.node, hello.protocol_version),
            String::new(),
            "Run the same branchsync version at the main and every branch.",
        ))
        .await
        .map_err(|e| (None, e));
    }
    // Who is admitted when this Hello is judged (a reload after this is
    // checked again once the session is registered, below).
    let admitted_now = admission.borrow_and_update().clone();
    let peers = &admitted_now.peers;
    // Who the peer is: a listed node, its token, and (mutual TLS) the
    // certificate issued to that node. Every failure gets the same reply on
    // the wire; the main's log and status give the reason.
    let (peer, why) = match authenticate(peers, &hello.node, &hello.token, &settings, cert.as_ref()) {
        Ok(p) => (Some(p), None),
        Err(why) => (None, Some(why)),
    };
    let Some(peer) = peer.filter(|_| why.is_none()) else {
        let why = why.unwrap_or_default();
        tracing::warn!(node = %hello.node, reason = %why, "authentication failed");
        if peers.iter().any(|p| p.name == hello.node) {
            status.peer(&hello.node, |p| {
                p.auth_failures += 1;
                p.last_error = Some(format!("authentication failed: {why}"));
            });
        }
        return refuse(&mut writer, auth_refused(&hello.node))
        .await
        .map_err(|e| (None, e));
    };
    let name = hello.node.clone();
    let certificate = cert.as_ref().map(|c| tls::fingerprint(c));
    if let Some(fp) = &certificate {
        status.peer(&name, |p| p.certificate = Some(fp.clone()));
    }
    let admitted = peer.clone();
    let certificate_now = certificate.clone();
    let fail = |e: LinkError| (Some(name.clone()), e);
    let preset_of = |rules: &[String]| rules.first().and_then(|r| r.strip_prefix("preset ")).map(str::to_string);
    let (theirs, ours) = (preset_of(&hello.table_rules), preset_of(&settings.table_rules));
    if theirs != ours {
        let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "none".into());
        return refuse(&mut writer, refusal(
            RefusalReason::ConfigMismatch,
            format!("node \"{}\" uses preset {}, the main uses preset {}", hello.node, name(&theirs), name(&ours)),
            "A preset brings tables that stay local and conflict rules; sites on different presets or preset releases would decide differently.".into(),
            "Run the same branchsync release with the same [preset] at every node.",
        ))
        .await
        .map_err(fail);
    }
    if hello.table_rules != settings.table_rules {
        return refuse(&mut writer, refusal(
            RefusalReason::ConfigMismatch,
            format!("configuration of node \"{}\" differs from the main's", hello.node),
            format!("Branch [[tables]] rules: {:?}. Main: {:?}.", hello.table_rules, settings.table_rules),
            "Every node must use the same [[tables]] entries, in the same order: conflicts are decided by them.",
        ))
        .await
        .map_err(fail);
    }
    if hello.tombstone_days != tombstone_days(&settings) {
        return refuse(&mut writer, refusal(
            RefusalReason::ConfigMismatch,
            format!("configuration of node \"{}\" differs from the main's", hello.node),
            format!("Branch: [conflicts] tombstone_days = {}. Main: [conflicts] tombstone_days = {}.", hello.tombstone_days, tombstone_days(&settings)),
            "Set the same [conflicts] tombstone_days at every node: deletes are decided against tombstones kept that long.",
        ))
        .await
        .map_err(fail);
    }
    if hello.ddl_from != ddl_from(&settings) {
        return refuse(&mut writer, refusal(
            RefusalReason::ConfigMismatch,
            format!("configuration of node \"{}\" differs from the main's", hello.node),
            format!("Branch: [ddl] from = \"{}\". Main: [ddl] from = \"{}\".", hello.ddl_from, ddl_from(&settings)),
            "Set the same [ddl] from at every node: it decides whether a branch's schema changes are replayed or kept local.",
        ))
        .await
        .map_err(fail);
    }
    if peer.index != hello.index || hello.stride != settings.stride || hello.exclude != settings.exclude {
        return refuse(&mut writer, refusal(
            RefusalReason::ConfigMismatch,
            format!("configuration of node \"{}\" differs from the main's", hello.node),
            format!(
                "Branch: index {}, stride {}, exclude {:?}. Main: index {}, stride {}, exclude {:?}.",
                hello.index, hello.stride, hello.exclude, peer.index, settings.stride, settings.exclude
            ),
            "Every node must use the same keys.stride and database.exclude, and the index listed at the main.",
        ))
        .await
        .map_err(fail);
    }
    // One live session per node; a silent earlier one is evicted (R23).
    let (evict_tx, evict_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(false);
    let last_heard = Arc::new(Mutex::new(Instant::now()));
    let previous = {
        let mut g = live.lock().unwrap_or_else(|p| p.into_inner());
        match g.get(&hello.node) {
            Some(l) if !*l.done.borrow() => {
                let silent = l.last_heard.lock().map(|t| t.elapsed()).unwrap_or_default();
                if silent < settings.peer_timeout.min(settings.heartbeat * 3) {
                    None
                } else {
                    let _ = l.evict.send(true);
                    Some(Some(l.done.clone()))
                }
            }
            _ => Some(None),
        }
        .map(|prev| {
            g.insert(hello.node.clone(), Live { last_heard: last_heard.clone(), evict: evict_tx, done: done_rx, admitted, certificate });
            prev
        })
    };
    let Some(previous) = previous else {
        return refuse(&mut writer, refusal(
            RefusalReason::IndexInUse,
            format!("node index {} is already in use by a live connection of \"{}\"", hello.index, hello.node),
            "Another connection with this node's name and index is connected and answering heartbeats.".into(),
            "Two machines are configured as the same branch; give each branch its own node.name and node.index.",
        ))
        .await
        .map_err(|e| (None, e));
    };
    if let Some(mut done) = previous {
        tracing::info!(peer = %hello.node, "evicting an earlier connection that stopped answering");
        let _ = done.wait_for(|d| *d).await;
    }
    // A reload that came between the judgement and the registration above
    // was not applied to this session by the listener: apply it here.
    if admission.has_changed().unwrap_or(false) {
        let now = admission.borrow_and_update().clone();
        let still = now.peers.iter().any(|p| p == peer) && !certificate_now.as_ref().is_some_and(|fp| now.revoked.contains(fp));
        if !still {
            let _ = done_tx.send(true);
            tracing::warn!(node = %hello.node, "authentication failed: the configuration reloaded during the handshake no longer admits it");
            return refuse(&mut writer, auth_refused(&hello.node))
            .await
            .map_err(|e| (None, e));
        }
    }
    // Authenticated: no longer counts against the handshake limit.
    drop(permit);
    let r = main_session(&settings, hello, received_us, reader, writer, log, status.clone(), states, AckPeers::Listed(admission), last_heard, shutdown, evict_rx).await;
    let _ = done_tx.send(true);
    status.peer(&name, |p| p.connected = false);
    r.map_err(fail)
}

#[allow(clippy::too_many_arguments)]
async fn main_session(
    settings: &LinkSettings,
    hello: Hello,
    received_us: i64,
    mut reader: Reader,
    mut writer: Writer,
    log: Arc<ChangeLog>,
    status: Arc<NodeStatus>,
    states: States,
    ack_peers: AckPeers,
    last_heard: Arc<Mutex<Instant>>,
    shutdown: watch::Receiver<bool>,
    evict: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let name = hello.node.clone();
    let state = states.lock().unwrap_or_else(|p| p.into_inner()).entry(name.clone()).or_default().clone();
    let (mut applier, progress) = Applier::connect(&settings.db_url, settings.apply.clone(), &name, state.clone()).await?;
    let applied = applier.committed();
    let known = applier.stream_system_id().await?;
    let known_epoch = applier.stream_epoch().await?;
    let retired = applier.log_retired_at(hello.log_epoch).await?;
    let went_back = |detail: String| {
        refusal(
            RefusalReason::WentBackInTime,
            format!("branch \"{name}\" went back in time"),
            detail,
            "Changes made at the branch after its restore point would be skipped. Re-seed the branch: stop its daemon and run branchsync join --discard-local there.",
        )
    };
    let relay_entry_lsn = if hello.relay_applied > log.floor()? && hello.relay_applied <= log.visible() {
        log.read_after(hello.relay_applied - 1, 1)?.first().filter(|e| e.pos == hello.relay_applied).map(|e| e.header.commit_lsn)
    } else {
        None
    };
    let refusal = if let Some(at) = retired {
        Some(refusal(
            RefusalReason::LogRecreated,
            format!("branch \"{name}\" sends from a log that a join replaced"),
            format!(
                "branchsync join for this branch finished at the main at {at}; its log {} was retired then, and the main follows only the log the joined shop started. Changes in the retired log that the main had not applied are not applied.",
                epoch_text(hello.log_epoch)
            ),
            "If this shop was joined, start its daemon with the data directory that join wrote. If no one joined this shop, its credentials were used elsewhere: list the certificate's fingerprint in the main's [tls] revoked, issue the shop new credentials and a new token, then re-seed this shop with branchsync join --discard-local.",
        ))
    } else if known.as_deref().is_some_and(|k| k != hello.system_id.to_string()) {
        Some(refusal(
            RefusalReason::SystemIdChanged,
            format!("branch \"{name}\" connected with another database cluster"),
            format!("First seen with system identifier {}, now {}.", known.clone().unwrap_or_default(), hello.system_id),
            "If the branch's database was re-created or restored from a dump, re-seed it with branchsync join --discard-local there; to replace the branch for good, remove its row from branchsync.progress at the main.",
        ))
    } else if known_epoch.is_some_and(|e| e != hello.log_epoch) {
        Some(refusal(
            RefusalReason::LogRecreated,
            format!("branch \"{name}\" has a new log"),
            format!(
                "The main applied this branch's changes up to position {applied} of its log {}, but the branch now has log {}: its data directory was lost or replaced. Changes it had captured and not sent are lost to replication.",
                epoch_text(known_epoch.unwrap_or(0)),
                epoch_text(hello.log_epoch)
            ),
            "Re-seed the branch: stop its daemon and run branchsync join --discard-local there (the main then forgets the old stream).",
        ))
    } else if hello.relay_epoch != 0 && hello.relay_epoch != log.epoch() {
        Some(refusal(
            RefusalReason::LogRecreated,
            format!("branch \"{name}\" must be re-seeded: the main's relay log was recreated"),
            format!(
                "The branch applied relay log {} up to position {}; the main's relay log is now {}: the main's data directory was lost or replaced.",
                epoch_text(hello.relay_epoch),
                hello.relay_applied,
                epoch_text(log.epoch())
            ),
            "Re-seed the branch: stop its daemon and run branchsync join --discard-local there.",
        ))
    } else if applied > hello.log_newest {
        Some(went_back(format!("The main has applied this branch's log up to position {applied}, but the branch's log ends at {}.", hello.log_newest)))
    } else if hello.relay_applied < log.floor()? {
        Some(refusal(
            RefusalReason::MustReseed,
            format!("branch \"{name}\" must be re-seeded"),
            format!(
                "The branch applied the relay up to position {}, but the main's log no longer holds entries before position {}.",
                hello.relay_applied,
                log.floor()? + 1
            ),
            "The branch was away longer than the main keeps its log, or its database was restored to an earlier state. Re-seed the branch: stop its daemon and run branchsync join --discard-local there.",
        ))
    } else if let Some(away) = away_too_long(&applier, settings.retention).await? {
        Some(refusal(
            RefusalReason::MustReseed,
            format!("branch \"{name}\" must be re-seeded"),
            format!("The branch was last connected {away} ago; the main keeps what its changes are decided against (tombstones) for {}.", human(settings.retention)),
            "Re-seed the branch: stop its daemon and run branchsync join --discard-local there, or raise [conflicts] tombstone_days at every node.",
        ))
    } else if hello.relay_applied > log.visible() {
        Some(refusal(
            RefusalReason::WentBackInTime,
            "the main's log is behind this branch".into(),
            format!("The branch applied the relay up to position {}, but the main's log ends at {}.", hello.relay_applied, log.visible()),
            "The main's data directory or database was restored to an earlier state; restore the matching data directory, or re-seed the branches.",
        ))
    } else if hello.relay_applied_lsn != 0 && relay_entry_lsn.is_some_and(|l| l != hello.relay_applied_lsn) {
        Some(refusal(
            RefusalReason::WentBackInTime,
            "the main's log does not hold what this branch applied".into(),
            format!(
                "The branch applied the relay up to position {} (commit LSN {}), but the main's log holds another transaction there.",
                hello.relay_applied,
                fmt_lsn(hello.relay_applied_lsn)
            ),
            "The main's data directory was restored to an earlier state; restore the matching data directory, or re-seed the branches.",
        ))
    } else {
        None
    };
    if let Some(r) = refusal {
        return refuse(&mut writer, r).await;
    }
    if known.is_none() {
        applier.set_stream_system_id(hello.system_id).await?;
    }
    if known_epoch.is_none() {
        applier.set_stream_epoch(hello.log_epoch).await?;
    }
    applier.touch_contact().await?;
    applier.expect_author(hello.index, hello.system_id, settings.max_stamp_ahead);
    log.touch_peer(&name);
    let resume_lsn = applier.committed_lsn().await?;
    let max_frame = agree(settings.max_frame, hello.max_frame);
    let window = agree(settings.window, hello.window) as u64;
    writer
        .send(Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            main_node: settings.node.clone(),
            resume_after: applied,
            resume_lsn,
            stream_epoch: hello.log_epoch,
            relay_epoch: log.epoch(),
            now_us: now_us(),
            hello_received_us: received_us,
            max_frame: max_frame as u64,
            window,
        }))
        .await?;
    set_frame_limit(&mut reader, &mut writer, max_frame);
    // The branch computes the offset exactly (it knows both of its times);
    // this is the one-way estimate, for status.
    let offset_ms = (hello.now_us - received_us) / 1000;
    tracing::info!(peer = %name, resume_after = applied, relay_from = hello.relay_applied, clock_offset_ms = offset_ms, max_frame, window, "branch connected");
    status.peer(&name, |p| {
        p.connected = true;
        p.sessions += 1;
        p.last_error = None;
        p.clock_offset_ms = Some(offset_ms);
        p.peer_log_newest = hello.log_newest;
        p.applied_from_peer = applied;
        p.pending_from_peer = hello.log_newest.saturating_sub(applied);
        // What the branch holds of the relay, until its first Ack of this
        // session (a restarted main would show nothing pending till then).
        p.acked_by_peer = hello.relay_applied;
        p.pending_to_peer = log.count_after(hello.relay_applied);
    });
    let session = Session {
        peer: name.clone(),
        settings: settings.clone(),
        log,
        status: status.clone(),
        ack_peers,
        send_after: hello.relay_applied,
        receive_after: applied,
        last_heard,
        max_frame,
        window,
    };
    session.run(applier, progress, reader, writer, shutdown, evict).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(pos: u64, total: u64, offset: u64, data: &[u8]) -> EntryChunk {
        EntryChunk { pos, part: 0, last: true, total, offset, data: data.to_vec() }
    }

    #[test]
    fn chunks_reassemble_in_order_and_anything_else_is_a_violation() {
        let mut a = None;
        assert!(assemble(&mut a, chunk(5, 6, 0, b"abc"), 4).unwrap().is_none());
        let whole = assemble(&mut a, chunk(5, 6, 3, b"def"), 4).unwrap().expect("whole");
        assert_eq!((whole.pos, whole.bytes.as_slice()), (5, &b"abcdef"[..]));
        assert!(a.is_none());

        let mut a = None;
        assert!(assemble(&mut a, chunk(6, 6, 3, b"def"), 5).is_err(), "must start at offset 0");
        let mut a = None;
        assemble(&mut a, chunk(6, 6, 0, b"abc"), 5).unwrap();
        assert!(assemble(&mut a, chunk(6, 6, 4, b"ef"), 5).is_err(), "no holes");
        let mut a = None;
        assemble(&mut a, chunk(6, 6, 0, b"abc"), 5).unwrap();
        assert!(assemble(&mut a, chunk(7, 6, 3, b"def"), 5).is_err(), "one entry at a time");
        let mut a = None;
        assemble(&mut a, chunk(6, 4, 0, b"abc"), 5).unwrap();
        assert!(assemble(&mut a, chunk(6, 4, 3, b"def"), 5).is_err(), "no longer than announced");
        let mut a = None;
        assert!(assemble(&mut a, chunk(6, MAX_ENTRY_BYTES + 1, 0, b"a"), 5).is_err(), "no entry larger than the limit");
        let mut a = None;
        assert!(assemble(&mut a, chunk(5, 3, 0, b"abc"), 5).is_err(), "positions only go forward");
    }

    #[test]
    fn an_entries_frame_is_no_larger_than_its_bodies_and_their_overhead() {
        use branchsync_proto::FrameCodec;
        use tokio_util::codec::Encoder;
        for (n, len) in [(1usize, 0usize), (1, 300), (50_000, 1), (40_000, 400), (10, 1 << 20), (3, 65_600)] {
            let entries: Vec<WireEntry> = (0..n).map(|i| WireEntry { pos: u64::MAX - i as u64, part: u32::MAX, last: true, body: vec![0xa5; len] }).collect();
            let mut buf = bytes::BytesMut::new();
            FrameCodec::new(1 << 30).encode(Message::Entries(entries), &mut buf).unwrap();
            let budget = n * (len + ENTRY_OVERHEAD) + FRAME_OVERHEAD;
            assert!(buf.len() <= budget, "{n} entries of {len} bytes took {} bytes, budget {budget}", buf.len());
        }
    }

    /// A reader fed by a test peer: its frames go in at the returned
    /// writer; `consumed` plays our apply's count of bytes taken.
    fn reader_under_test(receive_after: u64, peer_timeout: Duration) -> (tokio::task::JoinHandle<Result<(), LinkError>>, FramedWrite<tokio::io::DuplexStream, FrameCodec>, watch::Sender<u64>, mpsc::UnboundedReceiver<Vec<WireEntry>>) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (r, _w) = tokio::io::split(Box::new(ours) as Box<dyn LinkIo>);
        let (apply, apply_rx) = mpsc::unbounded_channel();
        let (consumed_tx, consumed_rx) = watch::channel(0u64);
        let ctx = ReadCtx {
            peer: "branch1".into(),
            status: Arc::new(NodeStatus::new("main", "main", &["branch1".into()])),
            last_heard: Arc::new(Mutex::new(Instant::now())),
            apply,
            peer_ack: watch::channel(0).0,
            peer_consumed: watch::channel(0).0,
            our_consumed: consumed_rx,
            window: 1 << 20,
            max_frame: 1 << 20,
            peer_timeout,
            receive_after,
        };
        let task = tokio::spawn(async move {
            let _keep_writer_half = _w;
            read_loop(FramedRead::new(r, FrameCodec::new(1 << 20)), ctx).await
        });
        (task, FramedWrite::new(theirs, FrameCodec::new(1 << 20)), consumed_tx, apply_rx)
    }

    /// Heartbeats saying the peer's log reaches `newest`, every 20 ms, for
    /// `how_long` or until the reader ends.
    async fn heartbeats(peer: &mut FramedWrite<tokio::io::DuplexStream, FrameCodec>, newest: u64, how_long: Duration) {
        let until = Instant::now() + how_long;
        while Instant::now() < until {
            if peer.send(Message::Heartbeat { now_us: 0, log_newest: newest }).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_peer_whose_log_is_ahead_but_sends_nothing_while_owed_nothing_is_a_stalled_stream() {
        let (task, mut peer, _consumed, _rx) = reader_under_test(5, Duration::from_millis(100));
        heartbeats(&mut peer, 9, Duration::from_secs(5)).await;
        let r = tokio::time::timeout(Duration::from_secs(1), task).await.expect("the reader ended").expect("no panic");
        let err = r.expect_err("a stalled stream ends the session");
        assert!(matches!(err, LinkError::Stalled(_)), "{err}");
        assert!(err.to_string().contains("reaches position 9, the last entry received is 5"), "{err}");
    }

    #[tokio::test]
    async fn a_caught_up_stream_or_one_whose_apply_still_owes_credit_is_not_stalled() {
        // Caught up: the peer's log ends where we resume.
        let (task, mut peer, _consumed, _rx) = reader_under_test(5, Duration::from_millis(100));
        heartbeats(&mut peer, 5, Duration::from_millis(700)).await;
        assert!(!task.is_finished(), "an idle, caught-up stream is not stalled: {:?}", task.await);

        // Apply has not taken what arrived: the sender rightly waits.
        let (task, mut peer, consumed, mut rx) = reader_under_test(5, Duration::from_millis(100));
        peer.send(Message::Entries(vec![WireEntry { pos: 6, part: 0, last: true, body: vec![1; 100] }])).await.unwrap();
        assert_eq!(rx.recv().await.expect("entry handed to apply")[0].pos, 6);
        heartbeats(&mut peer, 9, Duration::from_millis(700)).await;
        assert!(!task.is_finished(), "a sender waiting for our credit is not stalled: {:?}", task.await);
        // Once apply took it, the sender owes us the rest.
        consumed.send_replace(100);
        heartbeats(&mut peer, 9, Duration::from_secs(5)).await;
        let err = tokio::time::timeout(Duration::from_secs(1), task).await.expect("the reader ended").expect("no panic").expect_err("stalled");
        assert!(err.to_string().contains("the last entry received is 6"), "{err}");
    }

    #[tokio::test]
    async fn a_large_entry_whose_chunks_stop_midway_is_a_stalled_stream() {
        let (task, mut peer, _consumed, _rx) = reader_under_test(5, Duration::from_millis(100));
        peer.send(Message::Chunk(chunk(6, 3000, 0, &[7; 1000]))).await.unwrap();
        // The peer's log ends at this very entry: only its missing chunks
        // are owed.
        heartbeats(&mut peer, 6, Duration::from_secs(5)).await;
        let err = tokio::time::timeout(Duration::from_secs(1), task).await.expect("the reader ended").expect("no panic").expect_err("stalled");
        assert!(matches!(err, LinkError::Stalled(_)), "{err}");
        assert!(err.to_string().contains("entry 6 stopped after 1000 of its 3000 bytes"), "{err}");
    }

    /// The writer of a session over an empty log, its frames read at the
    /// returned peer end; `control` as the session set it up before the
    /// writer first ran.
    fn writer_under_test(control: Arc<Control>) -> (tokio::task::JoinHandle<Result<(), LinkError>>, FramedRead<tokio::io::DuplexStream, FrameCodec>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Arc::new(ChangeLog::open(&dir.path().join("log")).expect("open a log"));
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (_r, w) = tokio::io::split(Box::new(ours) as Box<dyn LinkIo>);
        let ctx = WriteCtx {
            log,
            control,
            peer_consumed: watch::channel(0).1,
            send_after: 0,
            sent: Arc::new(AtomicU64::new(0)),
            heartbeat: Duration::from_secs(3600),
            window: 1 << 20,
            chunk: 1 << 16,
            peer: "main".into(),
            status: Arc::new(NodeStatus::new("branch1", "branch", &["main".into()])),
        };
        let task = tokio::spawn(async move {
            let _keep_reader_half = _r;
            write_loop(FramedWrite::new(w, FrameCodec::new(1 << 20)), ctx).await
        });
        (task, FramedRead::new(theirs, FrameCodec::new(1 << 20)), dir)
    }

    #[tokio::test]
    async fn credit_and_acknowledgement_given_before_the_writer_first_ran_are_still_sent() {
        // The soak with 1 MiB frames: apply took the main's first frame
        // before this side's writer subscribed to the credit; the main
        // waited for that credit to send a large entry, and nothing moved
        // until the stream was declared stalled.
        let control = Arc::new(Control::default());
        control.consumed.send_replace(4096);
        control.ack.send_replace(7);
        let (task, mut peer, _dir) = writer_under_test(control.clone());
        let (mut credit, mut ack) = (None, None);
        let until = Instant::now() + Duration::from_secs(5);
        while (credit.is_none() || ack.is_none()) && Instant::now() < until {
            match tokio::time::timeout(Duration::from_millis(500), peer.next()).await {
                Ok(Some(Ok(Message::Credit { consumed }))) => credit = Some(consumed),
                Ok(Some(Ok(Message::Ack { pos }))) => ack = Some(pos),
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("the writer's stream ended: {other:?}"),
                Err(_) => {}
            }
        }
        assert_eq!(credit, Some(4096), "the credit given before the writer ran reaches the peer");
        assert_eq!(ack, Some(7), "the acknowledgement given before the writer ran reaches the peer");
        // Later credit still flows.
        control.consumed.send_replace(8192);
        let next = loop {
            match tokio::time::timeout(Duration::from_secs(2), peer.next()).await.expect("more credit") {
                Some(Ok(Message::Credit { consumed })) => break consumed,
                Some(Ok(_)) => {}
                other => panic!("the writer's stream ended: {other:?}"),
            }
        };
        assert_eq!(next, 8192);
        task.abort();
    }

    #[test]
    fn sessions_agree_on_the_smaller_limit_but_never_below_the_minimum() {
        assert_eq!(agree(16 << 20, 1 << 20), 1 << 20);
        assert_eq!(agree(1 << 20, 16 << 20), 1 << 20);
        assert_eq!(agree(1 << 20, 10), MIN_MAX_FRAME);
    }
}
