//! The link between a branch and the main.
//!
//! ```text
//!  branch                                         main
//!  dial (backoff ≤ reconnect_max) ------------->  accept, one task per connection
//!  Hello{version,node,index,token,log bounds,     check version, node, token, stride,
//!        relay progress}                          excludes, index in use, identity (R4, R23)
//!                           <------------------  Welcome{resume_after} | Refuse{why}
//!  session: reader loop + writer task + pusher task + apply task (one DB connection)
//!  pusher: own log entries after resume_after --> apply (stream "branch1")
//!  apply (stream "main")  <-------------------   pusher: relay entries after relay progress,
//!                                                 minus the ones the branch wrote itself
//!  Ack{pos} after each apply commit  <-------->   Ack{pos} -> record, reclaim the log
//! ```
//!
//! # Progress tracking
//!
//! Where a stream resumes is decided by the *receiver's* durable progress,
//! read from its database at the start of every session (R4). An `Ack` is
//! sent only after the apply transaction committed, and only lets the sender
//! reclaim log space; losing one costs nothing but space until the next.
//!
//! # Error handling
//!
//! A session ends on any error (socket, protocol, apply); the apply task is
//! drained first (it commits what is whole, so its replication origin is
//! free for the next session), then the branch redials with backoff. Bad
//! input (malformed or oversized frame, wrong token, unknown node, version
//! mismatch, index in use) is refused with a log line and a `Refuse`
//! message saying why; nothing is applied and the main keeps serving others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use branchsync_engine::apply::{ApplyConfig, ApplyStats, Applier, StreamState};
use branchsync_engine::clock::now_us;
use branchsync_engine::log::ChangeLog;
use branchsync_engine::{failpoints, EngineError};
use branchsync_proto::{FrameCodec, Hello, LogEntry, Message, ProtoError, Refusal, RefusalReason, Welcome, PROTOCOL_VERSION};
use futures::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::Instrument;

use crate::status::NodeStatus;

/// How long a handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest batch of entries read from the log for one frame.
const SEND_BATCH_BYTES: usize = 1 << 20;

/// Errors that end a link session.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket or framing failure.
    #[error("link protocol error")]
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
    /// Local database or log failure.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The connection closed.
    #[error("connection closed by peer")]
    Closed,
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
    /// `[[tables]]` rules, canonical (must match between nodes, R23).
    pub table_rules: Vec<String>,
    /// Main: a branch away longer than this must re-seed (R23): the
    /// tombstones its changes would be decided against are gone.
    pub retention: Duration,
}

/// A branch the main accepts.
#[derive(Clone)]
pub struct PeerAuth {
    /// Node name.
    pub name: String,
    /// Node index.
    pub index: u32,
    /// Shared secret.
    pub token: String,
}

/// A new clock offset is recorded when it differs from the last by more
/// than this (µs): measurement noise is not a clock change.
const CLOCK_OFFSET_TOLERANCE_US: i64 = 1_000_000;

fn refusal(reason: RefusalReason, message: String, detail: String, hint: &str) -> Refusal {
    Refusal { reason, message, detail, hint: hint.into() }
}

fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who an ongoing session serves, and how to tell it to go.
struct Live {
    last_heard: Arc<Mutex<Instant>>,
    evict: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// Everything one session needs.
struct Session {
    peer: String,
    settings: LinkSettings,
    log: Arc<ChangeLog>,
    status: Arc<NodeStatus>,
    /// Peers whose acknowledgements bound reclaim of our log.
    ack_peers: Vec<String>,
    /// Send our log after this position.
    send_after: u64,
    last_heard: Arc<Mutex<Instant>>,
}

/// How a session ended without error.
enum SessionEnd {
    Shutdown,
    Evicted,
}

impl Session {
    async fn run(
        self,
        applier: Applier,
        progress: watch::Receiver<ApplyStats>,
        mut reader: FramedRead<OwnedReadHalf, FrameCodec>,
        mut writer: FramedWrite<OwnedWriteHalf, FrameCodec>,
        mut shutdown: watch::Receiver<bool>,
        mut evict: watch::Receiver<bool>,
    ) -> Result<SessionEnd, LinkError> {
        let (out_tx, mut out_rx) = mpsc::channel::<Message>(2);
        let writer_task = tokio::spawn(
            async move {
                while let Some(m) = out_rx.recv().await {
                    writer.send(m).await?;
                }
                Ok::<_, ProtoError>(())
            }
            .in_current_span(),
        );
        let (apply_tx, apply_rx) = mpsc::channel::<Vec<LogEntry>>(2);
        let (apply_stop_tx, apply_stop_rx) = watch::channel(false);
        let mut apply_task = tokio::spawn(applier.run(apply_rx, apply_stop_rx).in_current_span());
        let pusher = tokio::spawn(push_log(self.log.clone(), self.send_after, out_tx.clone(), self.status.clone(), self.peer.clone()).in_current_span());
        let mut progress = progress;
        let mut heartbeat = tokio::time::interval(self.settings.heartbeat);
        let mut apply_tx = Some(apply_tx);
        let result = loop {
            let silent_for = self.last_heard.lock().map(|t| t.elapsed()).unwrap_or_default();
            let quiet_deadline = self.settings.peer_timeout.saturating_sub(silent_for);
            tokio::select! {
                biased;
                // 1. Shutdown of the node, or eviction by a newer session of the same peer.
                _ = shutdown.changed() => break Ok(SessionEnd::Shutdown),
                _ = evict.changed() => break Ok(SessionEnd::Evicted),
                // 2. Apply ended: an error (or its input closed).
                r = &mut apply_task => {
                    apply_tx = None;
                    break match r {
                        Ok(Ok(_)) => Err(LinkError::Closed),
                        Ok(Err(e)) => Err(LinkError::Engine(e)),
                        Err(e) => Err(LinkError::Violation(format!("apply task failed: {e}"))),
                    };
                }
                // 3. Durable apply progress: acknowledge it.
                Ok(()) = progress.changed() => {
                    let st = progress.borrow_and_update().clone();
                    self.status.peer(&self.peer, |p| {
                        p.applied_from_peer = st.committed_pos;
                        p.changesets_applied = st.changesets;
                        p.rows_applied = st.rows;
                        p.conflicts = st.conflicts;
                        p.pending_from_peer = p.peer_log_newest.saturating_sub(st.committed_pos);
                    });
                    if out_tx.send(Message::Ack { pos: st.committed_pos }).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                }
                // 4. Timers.
                _ = heartbeat.tick() => {
                    let m = Message::Heartbeat { now_us: now_us(), log_newest: self.log.visible() };
                    if out_tx.send(m).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                }
                _ = tokio::time::sleep(quiet_deadline) => break Err(LinkError::Timeout(self.settings.peer_timeout)),
                // 5. Input from the peer.
                frame = reader.next() => {
                    let msg = match frame {
                        None => break Err(LinkError::Closed),
                        Some(Err(e)) => break Err(LinkError::Proto(e)),
                        Some(Ok(m)) => m,
                    };
                    if let Ok(mut t) = self.last_heard.lock() {
                        *t = Instant::now();
                    }
                    self.status.peer(&self.peer, |p| p.last_contact_unix_ms = Some(now_us() / 1000));
                    match msg {
                        Message::Entries(entries) => {
                            if let Some(last) = entries.last() {
                                let newest = last.pos;
                                self.status.peer(&self.peer, |p| p.peer_log_newest = p.peer_log_newest.max(newest));
                            }
                            let Some(tx) = apply_tx.as_ref() else { break Err(LinkError::Closed) };
                            if tx.send(entries).await.is_err() {
                                continue; // apply ended; arm 2 reports why
                            }
                        }
                        Message::Ack { pos } => {
                            if let Err(e) = self.acknowledged(pos) {
                                break Err(e.into());
                            }
                        }
                        Message::Heartbeat { now_us: _, log_newest } => {
                            // The clock offset is the databases' one, measured
                            // at the handshake (R14); heartbeats do not move it.
                            self.status.peer(&self.peer, |p| {
                                p.peer_log_newest = log_newest;
                                p.pending_from_peer = log_newest.saturating_sub(p.applied_from_peer);
                            });
                        }
                        Message::Refuse(r) => break Err(LinkError::Refused(r)),
                        other => break Err(LinkError::Violation(format!("unexpected {} during a session", kind(&other)))),
                    }
                }
            }
        };
        // Drain: stop intake, let apply commit what is whole, so the
        // replication origin is free before any next session starts.
        pusher.abort();
        drop(apply_tx);
        let _ = apply_stop_tx.send(true);
        if !apply_task.is_finished() {
            let _ = (&mut apply_task).await;
        }
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
        result
    }

    fn acknowledged(&self, pos: u64) -> Result<(), EngineError> {
        self.log.set_peer_ack(&self.peer, pos)?;
        failpoints::hit(failpoints::LOG_BEFORE_RECLAIM);
        let mut floor = u64::MAX;
        for p in &self.ack_peers {
            floor = floor.min(self.log.peer_ack(p)?);
        }
        if floor != u64::MAX {
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

/// Sends our log after `after` to the peer, in order, as it grows.
async fn push_log(log: Arc<ChangeLog>, mut after: u64, out: mpsc::Sender<Message>, status: Arc<NodeStatus>, peer: String) -> Result<(), EngineError> {
    let mut visible = log.subscribe();
    loop {
        let batch = log.read_after(after, SEND_BATCH_BYTES)?;
        let Some(last) = batch.last() else {
            let pending = log.count_after(status.snapshot().peers.get(&peer).map(|p| p.acked_by_peer).unwrap_or(0));
            status.peer(&peer, |p| p.pending_to_peer = pending);
            if visible.changed().await.is_err() {
                return Ok(());
            }
            continue;
        };
        after = last.pos;
        // Everything, a branch's own ChangeSets too: they are the main's
        // result for its changes (the echo, see engine::apply::obey).
        let entries: Vec<LogEntry> = batch;
        if entries.is_empty() {
            continue;
        }
        if out.send(Message::Entries(entries)).await.is_err() {
            return Ok(());
        }
        failpoints::hit(failpoints::LINK_AFTER_SEND);
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
async fn refuse(writer: &mut FramedWrite<OwnedWriteHalf, FrameCodec>, r: Refusal) -> Result<(), LinkError> {
    let _ = writer.send(Message::Refuse(r.clone())).await;
    Err(LinkError::Refused(r))
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Welcome(_) => "Welcome",
        Message::Refuse(_) => "Refuse",
        Message::Entries(_) => "Entries",
        Message::Ack { .. } => "Ack",
        Message::Heartbeat { .. } => "Heartbeat",
    }
}

fn split(stream: TcpStream, max_frame: usize) -> (FramedRead<OwnedReadHalf, FrameCodec>, FramedWrite<OwnedWriteHalf, FrameCodec>) {
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    (FramedRead::new(r, FrameCodec::new(max_frame)), FramedWrite::new(w, FrameCodec::new(max_frame)))
}

async fn next_message(reader: &mut FramedRead<OwnedReadHalf, FrameCodec>) -> Result<Message, LinkError> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Err(_) => Err(LinkError::Timeout(HANDSHAKE_TIMEOUT)),
        Ok(None) => Err(LinkError::Closed),
        Ok(Some(Err(e))) => Err(LinkError::Proto(e)),
        Ok(Some(Ok(m))) => Ok(m),
    }
}

// ---------------------------------------------------------------- branch side

/// The branch's link: dials the main forever with capped backoff, while
/// capture goes on independently.
pub async fn run_branch(settings: LinkSettings, main_addr: String, token: String, log: Arc<ChangeLog>, status: Arc<NodeStatus>, mut shutdown: watch::Receiver<bool>) {
    let state = Arc::new(StreamState::default());
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let span = tracing::info_span!("link", peer = "main", addr = %main_addr);
        let r = branch_session(&settings, &main_addr, &token, &log, &status, &state, shutdown.clone()).instrument(span).await;
        status.peer("main", |p| p.connected = false);
        match r {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Evicted) => {}
            Err(e) => {
                let msg = e.to_string();
                match &e {
                    LinkError::Refused(r) => tracing::error!(peer = "main", reason = ?r.reason, error = %msg, "link refused"),
                    LinkError::Engine(err) if !err.is_transient() => tracing::error!(peer = "main", error = %msg, "link stopped"),
                    _ => tracing::info!(peer = "main", error = %msg, backoff_ms = backoff.as_millis() as u64, "link down; retrying"),
                }
                status.peer("main", |p| p.last_error = Some(msg));
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.reconnect_max);
    }
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
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(main_addr))
        .await
        .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))?
        .map_err(|e| LinkError::Proto(ProtoError::Io(e)))?;
    let (mut reader, mut writer) = split(stream, settings.max_frame);
    let (applier, progress) = Applier::connect(&settings.db_url, settings.apply.clone(), branchsync_engine::state::RELAY_STREAM, state.clone()).await?;
    let t0 = applier.db_clock_us().await?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        node: settings.node.clone(),
        index: settings.index,
        token: token.to_string(),
        stride: settings.stride,
        exclude: settings.exclude.clone(),
        system_id: settings.system_id,
        log_newest: log.visible(),
        log_floor: log.floor()?,
        relay_applied: applier.committed(),
        now_us: t0,
        table_rules: settings.table_rules.clone(),
    };
    writer.send(Message::Hello(hello)).await?;
    let welcome: Welcome = match next_message(&mut reader).await? {
        Message::Welcome(w) => w,
        Message::Refuse(r) => return Err(LinkError::Refused(r)),
        other => return Err(LinkError::Violation(format!("expected Welcome, got {}", kind(&other)))),
    };
    if welcome.protocol_version != PROTOCOL_VERSION {
        return Err(LinkError::Violation(format!("main speaks protocol {}, we speak {PROTOCOL_VERSION}", welcome.protocol_version)));
    }
    // R14: this database's clock minus the main's, from the four times of
    // the handshake (the network and the main's work cancel out), and this
    // node stamps its commits on the main's clock from now on.
    let t3 = applier.db_clock_us().await?;
    let offset_us = ((t0 - welcome.hello_received_us) + (t3 - welcome.now_us)) / 2;
    if applier.record_clock_offset(offset_us, CLOCK_OFFSET_TOLERANCE_US).await? {
        tracing::info!(peer = "main", clock_offset_ms = offset_us / 1000, "clock offset to the main recorded; commit stamps are corrected by it");
    }
    status.peer("main", |p| p.clock_offset_ms = Some(offset_us / 1000));
    // R4: the main resumes our stream after `resume_after`; that position
    // must be one we wrote. If our log never reached it, or lost it without
    // reclaiming it, this node went back in time: refuse, never skip.
    let floor = log.floor()?;
    let r = welcome.resume_after;
    let same_entry = if r > floor && r <= log.visible() {
        match log.read_after(r - 1, 1)?.first() {
            Some(e) if e.pos == r => welcome.resume_lsn == 0 || e.header.commit_lsn == welcome.resume_lsn,
            _ => false,
        }
    } else {
        r <= floor
    };
    if !same_entry {
        let r = refusal(
            RefusalReason::WentBackInTime,
            format!("branch \"{}\" went back in time", settings.node),
            format!(
                "The main has already applied this branch's changes up to log position {r} (commit LSN {}), but this branch's log does not hold that transaction there (it ends at {}, reclaimed up to {floor}). The branch's database or data directory was restored to an earlier state.",
                branchsync_engine::pg::fmt_lsn(welcome.resume_lsn),
                log.visible()
            ),
            "Changes made here after the restore point would be skipped. Re-seed this branch from a fresh copy of the main's database, then run branchsync init.",
        );
        refuse(&mut writer, r).await?;
    }
    tracing::info!(peer = "main", resume_after = r, relay_applied = applier.committed(), "link up");
    status.peer("main", |p| {
        p.connected = true;
        p.last_error = None;
        p.acked_by_peer = r;
    });
    let (_evict_tx, evict_rx) = watch::channel(false);
    let session = Session {
        peer: "main".into(),
        settings: settings.clone(),
        log: log.clone(),
        status: status.clone(),
        ack_peers: vec!["main".into()],
        send_after: r,
        last_heard: Arc::new(Mutex::new(Instant::now())),
    };
    session.run(applier, progress, reader, writer, shutdown, evict_rx).await
}

// ------------------------------------------------------------------ main side

/// The main's listener: one task per branch connection.
pub async fn run_main(settings: LinkSettings, listener: TcpListener, peers: Vec<PeerAuth>, log: Arc<ChangeLog>, status: Arc<NodeStatus>, mut shutdown: watch::Receiver<bool>) {
    let live: Arc<Mutex<HashMap<String, Live>>> = Arc::default();
    let states: Arc<HashMap<String, Arc<StreamState>>> = Arc::new(peers.iter().map(|p| (p.name.clone(), Arc::new(StreamState::default()))).collect());
    let peers = Arc::new(peers);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            acc = listener.accept() => {
                let (sock, addr) = match acc {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let span = tracing::info_span!("link", peer_addr = %addr);
                let ctx = (settings.clone(), peers.clone(), log.clone(), status.clone(), live.clone(), states.clone(), shutdown.clone());
                tasks.spawn(async move {
                    let (settings, peers, log, status, live, states, shutdown) = ctx;
                    if let Err(e) = main_connection(sock, settings, &peers, log, status, live, states, shutdown).await {
                        match e {
                            LinkError::Refused(r) => tracing::warn!(reason = ?r.reason, error = %r, "branch refused"),
                            other => tracing::info!(error = %other, "branch session ended"),
                        }
                    }
                }.instrument(span));
            }
        }
    }
    // Drain: every session sees the shutdown and finishes its apply.
    while tasks.join_next().await.is_some() {}
}

#[allow(clippy::too_many_arguments)]
async fn main_connection(
    sock: TcpStream,
    settings: LinkSettings,
    peers: &[PeerAuth],
    log: Arc<ChangeLog>,
    status: Arc<NodeStatus>,
    live: Arc<Mutex<HashMap<String, Live>>>,
    states: Arc<HashMap<String, Arc<StreamState>>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let (mut reader, mut writer) = split(sock, settings.max_frame);
    let hello = match next_message(&mut reader).await {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            return refuse(&mut writer, refusal(RefusalReason::Other, format!("expected Hello, got {}", kind(&other)), String::new(), "Connect with a branchsync branch.")).await;
        }
        Err(LinkError::Proto(e)) => {
            return refuse(&mut writer, refusal(RefusalReason::Other, format!("malformed handshake: {e}"), String::new(), "Check that the peer is a branchsync branch of the same version.")).await;
        }
        Err(e) => return Err(e),
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
        .await;
    }
    let Some(peer) = peers.iter().find(|p| p.name == hello.node) else {
        return refuse(&mut writer, refusal(
            RefusalReason::UnknownNode,
            format!("unknown node \"{}\"", hello.node),
            "No [[sync.peers]] entry at the main has this name.".into(),
            "Add the branch to the main's [[sync.peers]] and restart the main, or fix node.name at the branch.",
        ))
        .await;
    };
    if !tokens_equal(&peer.token, &hello.token) {
        return refuse(&mut writer, refusal(
            RefusalReason::BadToken,
            format!("authentication failed for node \"{}\"", hello.node),
            "The token does not match the main's token for this node.".into(),
            "Set the same token at the branch (token, token_file or BRANCHSYNC_TOKEN) and in the main's [[sync.peers]].",
        ))
        .await;
    }
    if hello.table_rules != settings.table_rules {
        return refuse(&mut writer, refusal(
            RefusalReason::ConfigMismatch,
            format!("configuration of node \"{}\" differs from the main's", hello.node),
            format!("Branch [[tables]] rules: {:?}. Main: {:?}.", hello.table_rules, settings.table_rules),
            "Every node must use the same [[tables]] entries, in the same order: conflicts are decided by them.",
        ))
        .await;
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
        .await;
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
            g.insert(hello.node.clone(), Live { last_heard: last_heard.clone(), evict: evict_tx, done: done_rx });
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
        .await;
    };
    if let Some(mut done) = previous {
        tracing::info!(peer = %hello.node, "evicting an earlier connection that stopped answering");
        let _ = done.wait_for(|d| *d).await;
    }
    let r = main_session(&settings, hello, received_us, reader, writer, log, status.clone(), states, last_heard, shutdown, evict_rx).await;
    let _ = done_tx.send(true);
    r
}

#[allow(clippy::too_many_arguments)]
async fn main_session(
    settings: &LinkSettings,
    hello: Hello,
    received_us: i64,
    reader: FramedRead<OwnedReadHalf, FrameCodec>,
    mut writer: FramedWrite<OwnedWriteHalf, FrameCodec>,
    log: Arc<ChangeLog>,
    status: Arc<NodeStatus>,
    states: Arc<HashMap<String, Arc<StreamState>>>,
    last_heard: Arc<Mutex<Instant>>,
    shutdown: watch::Receiver<bool>,
    evict: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let name = hello.node.clone();
    let state = states.get(&name).cloned().unwrap_or_default();
    let (applier, progress) = Applier::connect(&settings.db_url, settings.apply.clone(), &name, state.clone()).await?;
    let applied = applier.committed();
    let known = applier.stream_system_id().await?;
    let went_back = |detail: String| {
        refusal(
            RefusalReason::WentBackInTime,
            format!("branch \"{name}\" went back in time"),
            detail,
            "Changes made at the branch after its restore point would be skipped. Re-seed the branch from a fresh copy of the main's database and run branchsync init there.",
        )
    };
    let refusal = if known.as_deref().is_some_and(|k| k != hello.system_id.to_string()) {
        Some(refusal(
            RefusalReason::SystemIdChanged,
            format!("branch \"{name}\" connected with another database cluster"),
            format!("First seen with system identifier {}, now {}.", known.clone().unwrap_or_default(), hello.system_id),
            "If the branch's database was re-created or restored from a dump, re-seed it from a fresh copy of the main's database and run branchsync init; to replace the branch for good, remove its row from branchsync.progress at the main.",
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
            "The branch was away longer than the main keeps its log, or its database was restored to an earlier state. Re-seed the branch from a fresh copy of the main's database and run branchsync init there.",
        ))
    } else if let Some(away) = away_too_long(&applier, settings.retention).await? {
        Some(refusal(
            RefusalReason::MustReseed,
            format!("branch \"{name}\" must be re-seeded"),
            format!("The branch was last connected {away} ago; the main keeps what its changes are decided against (tombstones) for {}.", human(settings.retention)),
            "Re-seed the branch from a fresh copy of the main's database and run branchsync init there, or raise [conflicts] tombstone_days at every node.",
        ))
    } else if hello.relay_applied > log.visible() {
        Some(refusal(
            RefusalReason::WentBackInTime,
            "the main's log is behind this branch".into(),
            format!("The branch applied the relay up to position {}, but the main's log ends at {}.", hello.relay_applied, log.visible()),
            "The main's data directory or database was restored to an earlier state; restore the matching data directory, or re-seed the branches.",
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
    applier.touch_contact().await?;
    let resume_lsn = applier.committed_lsn().await?;
    writer
        .send(Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            main_node: settings.node.clone(),
            resume_after: applied,
            resume_lsn,
            now_us: now_us(),
            hello_received_us: received_us,
        }))
        .await?;
    // The branch computes the offset exactly (it knows both of its times);
    // this is the one-way estimate, for status.
    let offset_ms = (hello.now_us - received_us) / 1000;
    tracing::info!(peer = %name, resume_after = applied, relay_from = hello.relay_applied, clock_offset_ms = offset_ms, "branch connected");
    status.peer(&name, |p| {
        p.connected = true;
        p.last_error = None;
        p.clock_offset_ms = Some(offset_ms);
        p.peer_log_newest = hello.log_newest;
        p.applied_from_peer = applied;
    });
    let mut ack_peers: Vec<String> = states.keys().cloned().collect();
    ack_peers.sort();
    let session = Session {
        peer: name.clone(),
        settings: settings.clone(),
        log,
        status: status.clone(),
        ack_peers,
        send_after: hello.relay_applied,
        last_heard,
    };
    let r = session.run(applier, progress, reader, writer, shutdown, evict).await;
    status.peer(&name, |p| {
        p.connected = false;
        if let Err(e) = &r {
            p.last_error = Some(e.to_string());
        }
    });
    r.map(|_| ())
}
