//! Capture over the streaming replication protocol (`[database] capture =
//! "stream"`): one walsender decodes the WAL once and streams it, as it
//! does for PostgreSQL's own subscriptions and `pg_recvlogical`.
//!
//! The peek of [`super::capture_loop`] decodes again from the slot's
//! restart point on every poll. That point moves only at PostgreSQL's
//! running-transactions records (every 15 s of activity) and never past a
//! transaction that is still open, so while apply or a till keeps
//! transactions open, each poll decodes seconds of WAL that earlier polls
//! decoded already, and `pg_replication_slot_advance` decodes it once more.
//! A stream decodes each record once.
//!
//! # Crash safety and progress
//!
//! Events go through [`Capturer::handle`] exactly as peeked ones do. The
//! slot is confirmed (the flush position of a standby status update) only
//! with the end LSN of transactions whose log write is durable (R1): after
//! a crash the walsender starts again at the slot's confirmed position, and
//! transactions the log holds already are recognised by their commit LSN
//! and dropped. A stream that ends mid-transaction leaves invisible
//! fragments, cut back by [`super::run_capture`] before the next start.
//!
//! Confirmation is batched (a group commit of the log): when no further
//! event is waiting, but no sooner than [`CONFIRM_GAP`] after the last one,
//! and after [`CONFIRM_EVERY`] at the latest under a steady stream. Each
//! confirmation is an `fdatasync` of the log and a hand-off to a blocking
//! thread: once per commit, at a till's rate of small transactions, it was
//! most of capture's cost to the site (pgbench at 0.57–0.71x of its rate
//! beside `pg_recvlogical`, which syncs every 10 s).
//!
//! # Caught up
//!
//! A walsender says nothing while it skips WAL that holds no change to
//! send, so "everything committed before LSN x is in the log" is learned
//! from positions the stream itself carries: a keepalive's WAL end, and a
//! probe — a non-transactional message [`crate::state::PROBE_PREFIX`] that
//! apply writes when it must wait for capture ([`super::Capturer::probe_lsn`]).
//! Both are true by construction: the stream delivers in WAL order, so a
//! message at x comes after every commit before x. A probe written by
//! anyone else is just as true, and harmless.

use std::time::{Duration, Instant};

use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::watch;

use super::{slot_lost, CaptureStatus, Capturer};
use crate::pg::{self, fmt_lsn};
use crate::pgoutput::{self, Begin, Commit, LogicalMessage, PgOutputMessage};
use crate::{failpoints, EngineError};

/// Longest a durable log write and the slot's confirmation wait under a
/// steady stream.
const CONFIRM_EVERY: Duration = Duration::from_millis(100);
/// Shortest time between two confirmations: what a commit may wait to be
/// durable in the log (and seen by the link) while others keep coming.
const CONFIRM_GAP: Duration = Duration::from_millis(20);
/// Events buffered between the connection's reader and capture: few, since
/// one event may be a row of hundreds of MB.
const BUFFER_EVENTS: usize = 512;
/// How long capture's thread sleeps when the stream has nothing waiting,
/// before it waits for the socket: see [`stream_loop`]. 5 ms rather than
/// 1: under pgbench at a branch (about 2,500 transactions/s) the daemon's
/// CPU fell from 1.5 s to 1.0–1.1 s per 15 s and its context switches from
/// 17,000–19,000 to 6,700–8,500 (`versus_native`, `BENCH_BACKLOG=capture`);
/// a quarter of [`CONFIRM_GAP`], so a commit is not durable later for it.
const COALESCE: Duration = Duration::from_millis(5);
/// Largest message accepted from the walsender: a row up to PostgreSQL's own
/// limit (a too-large row stops capture with its own error, R24).
const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The replication connection's settings, from the database URL (the
/// daemon's role, password and TLS settings; the same session settings as
/// every branchsync connection, R10).
pub(crate) fn replication_config(url: &str, slot: &str, publication: &str) -> Result<ReplicationConfig, EngineError> {
    let misconfigured = |message: String, hint: &str| EngineError::Misconfigured { message, detail: String::new(), hint: hint.into() };
    let (rest, root_cert) = pg::split_root_cert(url);
    let cfg: tokio_postgres::Config = rest.parse().map_err(EngineError::pg("parsing the database URL"))?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("postgres").to_string();
    let password = cfg.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    let database = cfg.get_dbname().unwrap_or(&user).to_string();
    let plain = match cfg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => true,
        tokio_postgres::config::SslMode::Prefer => root_cert.is_none(),
        _ => false,
    };
    let tls = if plain || host.starts_with('/') {
        TlsConfig::disabled()
    } else {
        let Some(root) = root_cert else {
            return Err(misconfigured(
                "the database connection asks for TLS (sslmode) but names no sslrootcert".into(),
                "branchsync verifies the database server's certificate: add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate) to database.url.",
            ));
        };
        // The certificate must name the host, an IP address too (as for
        // every other branchsync connection).
        TlsConfig::verify_full(Some(root.into())).with_sni_hostname(host.clone())
    };
    let options = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=postgres -c bytea_output=hex -c statement_timeout=0";
    Ok(ReplicationConfig::new(host, user, password, database, slot, publication)
        .with_port(port)
        .with_tls(tls)
        .with_start_lsn(Lsn(0))
        .with_status_interval(Duration::from_millis(50))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(BUFFER_EVENTS)
        .with_max_message_size(MAX_MESSAGE_BYTES)
        .with_options(options)
        .with_application_name("branchsync capture"))
}

fn stream_error(e: pgwire_replication::PgWireError) -> EngineError {
    EngineError::ConnectionLost { context: format!("streaming the replication slot: {e}") }
}

/// Streams the slot into the log until `shutdown`; errors return to
/// [`super::run_capture`]'s caller, which retries.
///
/// # Reading in batches
///
/// A walsender flushes its socket after every message it decodes, so a
/// reader that takes each message the moment it arrives wakes, reads and
/// acknowledges a TCP segment per row change: at a till's rate of small
/// transactions, the system calls and wake-ups of that were a third of
/// capture's CPU, taken from the shop's own PostgreSQL. So when nothing is
/// waiting, the thread sleeps [`COALESCE`] before it waits for the socket,
/// and the replication client's next read takes everything that arrived
/// meanwhile in one call. This blocks the whole runtime on purpose: capture
/// runs on a thread and a single-threaded runtime of its own (the daemon's
/// `capture_on_own_thread`), with only its own connections on it, so
/// nothing else waits; a commit reaches the log at most that much later,
/// well inside the confirmation gap.
pub(super) async fn stream_loop(
    cap: &mut Capturer,
    url: &str,
    writer: pg::PgConn,
    mut shutdown: watch::Receiver<bool>,
    status: &watch::Sender<CaptureStatus>,
) -> Result<(), EngineError> {
    let slot = cap.cfg.slot.clone();
    let rc = replication_config(url, &slot, &cap.cfg.publication)?;
    let mut client = ReplicationClient::connect(rc).await.map_err(stream_error)?;
    let mut writer_closed = writer.closed.clone();
    tracing::info!(lsn = %fmt_lsn(cap.captured_lsn), "capture started (streaming)");
    cap.load_offsets(&writer.client).await?;
    // End LSN of the last commit handled and not yet confirmed, and since when.
    let mut pending: Option<(u64, Instant)> = None;
    // The newest WAL end the stream reported: every commit before it came.
    let mut server_end = 0u64;
    let mut offsets_loaded = Instant::now();
    let mut last_confirm = Instant::now().checked_sub(CONFIRM_GAP).unwrap_or_else(Instant::now);
    loop {
        // Under load the stream always has the next event ready: shutdown
        // and the writer's connection are checked without registering a
        // waker for each event, the clock is read once per event, and the
        // confirmation timer is armed only when the stream is idle (each
        // cost a few percent of capture's CPU at 9,000 transactions/s).
        if shutdown.has_changed().unwrap_or(true) {
            return Ok(());
        }
        if writer_closed.has_changed().unwrap_or(true) {
            return Err(EngineError::ConnectionLost { context: "writing tombstones".into() });
        }
        let ready = client.recv().now_or_never();
        if ready.is_none() {
            // Nothing waiting: let the stream gather before the client's
            // worker (on this thread) reads the socket again.
            std::thread::sleep(COALESCE);
        }
        let now = Instant::now();
        let confirm_at = last_confirm + CONFIRM_GAP;
        let next = if ready.is_some() {
            ready
        } else {
            tokio::select! {
                biased;
                ev = client.recv() => Some(ev),
                _ = shutdown.changed() => return Ok(()),
                _ = writer_closed.changed() => return Err(EngineError::ConnectionLost { context: "writing tombstones".into() }),
                // Nothing waiting: make what was read durable now, or as soon
                // as the gap since the last confirmation has passed.
                _ = std::future::ready(()), if pending.is_some() && now >= confirm_at => None,
                _ = tokio::time::sleep_until(confirm_at.into()), if pending.is_some() => None,
            }
        };
        let ev = match next {
            None => {
                confirm(cap, &client, &writer.client, &mut pending, server_end).await?;
                last_confirm = Instant::now();
                status.send_replace(cap.status.clone());
                continue;
            }
            Some(Ok(Some(ev))) => ev,
            Some(Ok(None)) => return Err(EngineError::ConnectionLost { context: "the replication stream ended".into() }),
            Some(Err(e)) => {
                let lost = slot_lost(&writer.client, &slot, cap.captured_lsn).await;
                status.send_replace(cap.status.clone());
                return Err(lost.unwrap_or_else(|| stream_error(e)));
            }
        };
        let skipping = cap.txn.as_ref().is_some_and(|t| t.duplicate || t.applied_here || t.suppressing);
        let msg = match ev {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                // The client decodes Begin and Commit itself: counted at
                // their size in pgoutput (`B`: 20 bytes after the tag; `C`: 25).
                cap.status.pgoutput_bytes += 21;
                Some(PgOutputMessage::Begin(Begin { final_lsn: final_lsn.into(), commit_ts: commit_time_micros, xid }))
            }
            ReplicationEvent::Commit { lsn, end_lsn, commit_time_micros } => {
                cap.status.pgoutput_bytes += 26;
                Some(PgOutputMessage::Commit(Commit { flags: 0, commit_lsn: lsn.into(), end_lsn: end_lsn.into(), commit_ts: commit_time_micros }))
            }
            ReplicationEvent::Message { transactional, lsn, prefix, content } => {
                Some(PgOutputMessage::Message(LogicalMessage { flags: u8::from(transactional), lsn: lsn.into(), prefix, content: content.to_vec() }))
            }
            ReplicationEvent::XLogData { wal_end, data, .. } => {
                server_end = server_end.max(wal_end.into());
                // Row changes of a transaction that is not captured are not
                // even decoded (a branch's own apply transactions: echoes).
                if skipping && matches!(data.first(), Some(b'I' | b'U' | b'D' | b'T')) {
                    None
                } else {
                    cap.largest_message = cap.largest_message.max(data.len());
                    cap.status.pgoutput_bytes += data.len() as u64;
                    Some(pgoutput::decode(&data).map_err(|e| EngineError::Corrupt(format!("undecodable pgoutput message: {e}")))?)
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                server_end = server_end.max(wal_end.into());
                if pending.is_none() && cap.txn.is_none() {
                    cap.status.caught_up_lsn = cap.status.caught_up_lsn.max(server_end);
                    status.send_replace(cap.status.clone());
                }
                None
            }
            ReplicationEvent::StoppedAt { .. } => None,
        };
        if let Some(msg) = msg {
            if let Some(end) = cap.handle(msg)? {
                pending = Some((end, pending.map_or_else(Instant::now, |p| p.1)));
            }
        }
        // A probe read with nothing waiting to be made durable: everything
        // before it is in the log already.
        if pending.is_none() && cap.status.caught_up_lsn < cap.probe_lsn {
            cap.status.caught_up_lsn = cap.probe_lsn;
            status.send_replace(cap.status.clone());
        }
        // Tombstones of a huge delete are written as they come, so they
        // never all sit in memory.
        if cap.tombstones.len() >= super::TOMBSTONE_BATCH_ROWS || cap.tombstone_bytes >= super::TOMBSTONE_BATCH_BYTES {
            cap.write_back_tombstones(&writer.client).await?;
        }
        if pending.is_some_and(|p| now.saturating_duration_since(p.1) >= CONFIRM_EVERY) {
            confirm(cap, &client, &writer.client, &mut pending, server_end).await?;
            last_confirm = Instant::now();
            status.send_replace(cap.status.clone());
        }
        if now.saturating_duration_since(offsets_loaded) >= Duration::from_secs(1) && cap.txn.is_none() {
            cap.load_offsets(&writer.client).await?;
            offsets_loaded = Instant::now();
        }
    }
}

/// Makes the log durable, then confirms the slot up to the last handled
/// commit (R1), then writes back its tombstones and skipped rows.
async fn confirm(cap: &mut Capturer, client: &ReplicationClient, writer: &tokio_postgres::Client, pending: &mut Option<(u64, Instant)>, server_end: u64) -> Result<(), EngineError> {
    let Some((end_lsn, _)) = pending.take() else { return Ok(()) };
    cap.log.flush().await?;
    failpoints::hit(failpoints::CAPTURE_AFTER_LOG_WRITE);
    if cap.fragmented {
        failpoints::hit(failpoints::CAPTURE_AFTER_FRAGMENTED_FLUSH);
        cap.fragmented = false;
    }
    // Only now, with the log durable, may the slot forget these
    // transactions.
    client.update_applied_lsn(Lsn(end_lsn));
    cap.write_back_tombstones(writer).await?;
    cap.record_skipped(writer).await?;
    cap.pk_cache.clear();
    // Every commit before the last one handled, before the newest probe
    // handled, is in the log now.
    cap.status.caught_up_lsn = cap.status.caught_up_lsn.max(cap.probe_lsn).max(server_end.min(end_lsn));
    Ok(())
}
