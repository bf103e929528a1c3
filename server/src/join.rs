//! `branchsync join`: a new shop copies the main's replicated tables while
//! the main and the other shops keep selling, then follows the relay from
//! exactly where the copy ends.
//!
//! The shop reaches only the main's daemon (shops sit behind NAT), over an
//! inspection session ([`crate::inspect`]), authenticated as its link is.
//! At the main, [`serve_ask`] holds a snapshot whose relay position is exact
//! ([`branchsync_engine::join`] says why), streams the schema and every
//! replicated table out of it, and keeps the snapshot for [`HOLD`] after the
//! session ends, so a join killed midway and run again copies from the same
//! one and skips the tables it has. At the shop, [`join`] creates the
//! schema (an empty database), copies each table in one transaction,
//! records where the relay resumes and runs `init`.
//!
//! # What it must never do
//!
//! Let the main reclaim relay entries the joining shop still needs (its
//! acknowledgement is pinned at the snapshot's relay position before the
//! copy starts); overwrite a shop's own sales without `--discard-local`,
//! which lists them first; forget the main's progress in the shop's old
//! stream before the copy is whole (an interrupted re-seed leaves the old
//! shop as it was at the main).

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use branchsync_engine::join::{self as engine_join, HeldSnapshot, JoinState};
use branchsync_engine::log::ChangeLog;
use branchsync_engine::pg::{fmt_lsn, PgConn};
use branchsync_engine::progress::Progress;
use branchsync_engine::EngineError;
use branchsync_proto::inspect::{Answer, Ask, CopyBytes, JoinPoint, JoinTable};
use branchsync_proto::Message;
use futures::{SinkExt, StreamExt};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::inspect::{Dial, RemoteMain};
use crate::link::{LinkError, LinkSettings, Writer};
use crate::status::NodeStatus;

/// How long the main keeps a joining shop's snapshot after its session
/// ended (a join killed and run again resumes from it). A held snapshot
/// keeps VACUUM from removing rows deleted after it at the main.
const HOLD: Duration = Duration::from_secs(15 * 60);
/// How long creating the snapshot may wait for running transactions:
/// 60 s, or `BRANCHSYNC_JOIN_SNAPSHOT_WAIT_MS` in the main's daemon's
/// environment.
fn snapshot_wait() -> Duration {
    std::env::var("BRANCHSYNC_JOIN_SNAPSHOT_WAIT_MS").ok().and_then(|v| v.parse().ok()).map_or(Duration::from_secs(60), Duration::from_millis)
}
/// How long the main waits for its capture to pass the snapshot.
const CAPTURE_WAIT: Duration = Duration::from_secs(120);
/// Largest piece of a table sent at once.
const PIECE: usize = 1 << 20;

/// A snapshot held for a joining shop.
struct Held {
    snapshot: HeldSnapshot,
    point: JoinPoint,
    last_used: Instant,
}

/// Snapshots held at the main, by shop.
static HELD: LazyLock<Mutex<HashMap<String, Held>>> = LazyLock::new(|| {
    // Snapshots of shops that never came back are let go.
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let expired: Vec<Held> = {
                let mut g = HELD.lock().await;
                let gone: Vec<String> = g.iter().filter(|(_, h)| h.last_used.elapsed() > HOLD).map(|(n, _)| n.clone()).collect();
                gone.iter().filter_map(|n| g.remove(n)).collect()
            };
            for h in expired {
                tracing::info!(snapshot_lsn = %fmt_lsn(h.point.snapshot_lsn), "a joining shop's snapshot was not used for {} s; let go", HOLD.as_secs());
                h.snapshot.release();
            }
        }
    });
    Mutex::new(HashMap::new())
});

/// The main's side of one join session: the session's connection reads in
/// the held snapshot once [`Ask::JoinBegin`] was answered.
#[derive(Default)]
pub(crate) struct JoinSession {
    point: Option<JoinPoint>,
}

fn slot_name(node: &str) -> String {
    let clean: String = node.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(40).collect();
    format!("branchsync_join_{clean}")
}

/// Answers one of the join's questions at the main (several answers for
/// [`Ask::JoinCopy`]).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_ask(
    session: &mut JoinSession,
    ask: Ask,
    conn: &PgConn,
    node: &str,
    settings: &LinkSettings,
    log: &ChangeLog,
    status: &NodeStatus,
    writer: &mut Writer,
) -> Result<(), LinkError> {
    let answer = match ask {
        Ask::JoinBegin => match begin(session, conn, node, settings, log, status).await {
            Ok(p) if p.schema_sql.len() + p.tables.iter().map(|t| 64 + t.columns.iter().map(|c| c.len() + 8).sum::<usize>()).sum::<usize>() + 1024 > settings.max_frame => Answer::Failed {
                message: "the main's schema does not fit in a frame".into(),
                detail: format!("The schema script is {} bytes; sync.max_frame_bytes is {}.", p.schema_sql.len(), settings.max_frame),
                hint: "Raise sync.max_frame_bytes at the main and at the joining shop, then run branchsync join again.".into(),
            },
            Ok(p) => Answer::JoinReady(Box::new(p)),
            Err(e) => failed(&e),
        },
        Ask::JoinCopy { table } => {
            let Some(t) = session.point.as_ref().and_then(|p| p.tables.iter().find(|t| t.table == table)).cloned() else {
                let a = Answer::Failed {
                    message: format!("table {table} is not in the join's snapshot"),
                    detail: "Ask for JoinBegin first; only replicated tables are copied.".into(),
                    hint: String::new(),
                };
                return writer.send(Message::Answer(a)).await.map_err(LinkError::from);
            };
            return copy_out(conn, &t, node, log, settings.max_frame, writer).await;
        }
        Ask::JoinEnd => {
            if let Some(h) = HELD.lock().await.remove(node) {
                h.snapshot.release();
            }
            // The shop starts a new log: the main's progress in the old
            // one means nothing now (outside the snapshot's read-only
            // transaction, which ends here).
            let _ = conn.client.batch_execute("ROLLBACK").await;
            session.point = None;
            // The old log is retired, not just forgotten: a daemon that
            // sends from it again (the real shop, when these credentials
            // were used elsewhere) is refused rather than replayed from 0.
            match branchsync_engine::state::retire_stream(&conn.client, node).await {
                Ok(()) => {
                    tracing::warn!(peer = %node, "join finished: the shop's snapshot let go, its old log is retired and its stream starts anew");
                    Answer::JoinEnded
                }
                Err(e) => failed(&e),
            }
        }
        _ => Answer::Failed { message: "not a join question".into(), detail: String::new(), hint: String::new() },
    };
    writer.send(Message::Answer(answer)).await.map_err(LinkError::from)
}

fn failed(e: &EngineError) -> Answer {
    crate::inspect::failed(e)
}

async fn begin(session: &mut JoinSession, conn: &PgConn, node: &str, settings: &LinkSettings, log: &ChangeLog, status: &NodeStatus) -> Result<JoinPoint, EngineError> {
    if status.snapshot().peers.get(node).is_some_and(|p| p.connected) {
        return Err(EngineError::Misconfigured {
            message: format!("shop \"{node}\" is connected: it cannot join while its daemon runs"),
            detail: "join replaces the shop's copy and its stream.".into(),
            hint: "Stop the shop's daemon (systemctl stop branchsync@<shop>), then run branchsync join again.".into(),
        });
    }
    let mut held = HELD.lock().await;
    if let Some(h) = held.get_mut(node) {
        h.last_used = Instant::now();
        let (point, name) = (JoinPoint { resumed: true, ..h.point.clone() }, h.snapshot.name.clone());
        match engine_join::begin_in_snapshot(&conn.client, &name).await {
            Ok(()) => {
                session.point = Some(point.clone());
                return Ok(point);
            }
            Err(e) => {
                // Its session ended (the main's PostgreSQL restarted, say):
                // a new snapshot, and the shop copies everything again.
                tracing::warn!(peer = %node, error = %e, "the snapshot held for a joining shop is gone; taking a new one");
                let _ = conn.client.batch_execute("ROLLBACK").await;
                if let Some(h) = held.remove(node) {
                    h.snapshot.release();
                }
            }
        }
    }
    let point = match held.get_mut(node) {
        Some(h) => JoinPoint { resumed: true, ..h.point.clone() },
        None => {
            // Pinned before the snapshot: every entry after the head of now
            // comes after the snapshot's relay position too.
            log.set_peer_ack(node, log.visible())?;
            log.touch_peer(node);
            let snapshot = HeldSnapshot::create(&settings.db_url, &slot_name(node), snapshot_wait(), &conn.client).await?;
            let point = match describe(&snapshot, conn, settings, log, status).await {
                Ok(p) => p,
                Err(e) => {
                    snapshot.release();
                    return Err(e);
                }
            };
            log.set_peer_ack(node, point.relay_pos)?;
            tracing::info!(peer = %node, snapshot_lsn = %fmt_lsn(point.snapshot_lsn), relay_pos = point.relay_pos, tables = point.tables.len(), "holding a snapshot for a joining shop");
            held.insert(node.to_string(), Held { snapshot, point: point.clone(), last_used: Instant::now() });
            point
        }
    };
    drop(held);
    session.point = Some(point.clone());
    Ok(point)
}

/// The relay position of a new snapshot (capture must pass it first), its
/// schema and tables; leaves the session's connection reading in it.
async fn describe(snapshot: &HeldSnapshot, conn: &PgConn, settings: &LinkSettings, log: &ChangeLog, status: &NodeStatus) -> Result<JoinPoint, EngineError> {
    let probe = crate::inspect::probe(&conn.client).await?;
    let deadline = Instant::now() + CAPTURE_WAIT;
    while branchsync_engine::pg::parse_lsn(&status.snapshot().caught_up_lsn).unwrap_or(0) < probe {
        if Instant::now() > deadline {
            return Err(EngineError::CaptureBehind { wanted: fmt_lsn(probe) });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let relay_pos = log.visible_before_lsn(snapshot.lsn)?.ok_or_else(|| EngineError::Misconfigured {
        message: "the main's relay log no longer holds the snapshot's position".into(),
        detail: format!("Everything up to position {} was reclaimed.", log.floor().unwrap_or(0)),
        hint: "Run branchsync join again.".into(),
    })?;
    let relay_lsn = if relay_pos == 0 { 0 } else { log.read_after(relay_pos - 1, 1)?.first().filter(|e| e.pos == relay_pos).map_or(0, |e| e.header.commit_lsn) };
    engine_join::begin_in_snapshot(&conn.client, &snapshot.name).await?;
    let tables = engine_join::tables(&conn.client).await?;
    let schema_sql = engine_join::schema_sql(&settings.db_url, &snapshot.name, &conn.client).await?;
    Ok(JoinPoint { snapshot_lsn: snapshot.lsn, relay_pos, relay_lsn, relay_epoch: log.epoch(), main_system_id: settings.system_id, schema_sql, tables, resumed: false })
}

/// Streams one table out of the snapshot in pieces, then its totals.
async fn copy_out(conn: &PgConn, t: &JoinTable, node: &str, log: &ChangeLog, max_frame: usize, writer: &mut Writer) -> Result<(), LinkError> {
    let piece = PIECE.min(max_frame / 2).max(4096);
    let stream = match conn.client.copy_out(&engine_join::copy_out_sql(t)).await {
        Ok(s) => s,
        Err(e) => return writer.send(Message::Answer(failed(&EngineError::pg(format!("copying {}", t.table))(e)))).await.map_err(LinkError::from),
    };
    futures::pin_mut!(stream);
    let (mut rows, mut bytes, mut buf) = (0u64, 0u64, Vec::with_capacity(piece));
    let mut touched = Instant::now();
    loop {
        match stream.next().await {
            Some(Ok(data)) => {
                rows += data.iter().filter(|b| **b == b'\n').count() as u64;
                bytes += data.len() as u64;
                // A row may be far larger than a frame (COPY's text
                // stream may be cut anywhere: the shop only concatenates).
                let mut rest: &[u8] = &data;
                while !rest.is_empty() {
                    let n = (piece - buf.len()).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    if buf.len() >= piece {
                        writer.send(Message::Answer(Answer::CopyData(CopyBytes(std::mem::take(&mut buf))))).await?;
                    }
                }
                if touched.elapsed() > Duration::from_secs(10) {
                    touched = Instant::now();
                    log.touch_peer(node);
                    if let Some(h) = HELD.lock().await.get_mut(node) {
                        h.last_used = Instant::now();
                    }
                }
            }
            Some(Err(e)) => return writer.send(Message::Answer(failed(&EngineError::pg(format!("copying {}", t.table))(e)))).await.map_err(LinkError::from),
            None => break,
        }
    }
    if !buf.is_empty() {
        writer.send(Message::Answer(Answer::CopyData(CopyBytes(buf)))).await?;
    }
    tracing::info!(peer = %node, table = %t.table, rows, bytes, "table copied to a joining shop");
    writer.send(Message::Answer(Answer::CopyDone { rows, bytes })).await.map_err(LinkError::from)
}

// ---------------------------------------------------------------- shop side

/// `branchsync join` at a shop; exit status 0 joined, 1 failed, 2 refused
/// (the database holds data of its own and `--discard-local` was not
/// given).
pub(crate) async fn join(cfg: &Config, dial: &Dial, discard_local: bool, progress: &dyn Progress) -> anyhow::Result<ExitCode> {
    let mut admin = branchsync_engine::pg::connect(&cfg.database.url, "branchsync join").await.context("cannot connect to the database (database.url)")?;
    let local = engine_join::local_data(&admin.client, &cfg.database.schemas).await?;
    let log_dir = cfg.node.data_dir.join("log");
    let old_log = log_dir.join("meta").exists();
    if local.joined {
        println!("the copy is complete; running init");
        return crate::init(cfg, false, false).await;
    }
    let fresh = local.joining.is_none() && local.node.is_none() && local.tables_with_rows.is_empty() && !old_log;
    if !fresh && local.joining.is_none() {
        // Whatever is here goes: say what first.
        let unsent = if old_log { unsent_changes(&log_dir) } else { None };
        let mut what = Vec::new();
        if let Some(n) = &local.node {
            what.push(format!("this database was initialised as node \"{n}\""));
        }
        for (t, n) in local.tables_with_rows.iter().take(20) {
            what.push(format!("table {t}: {n} rows"));
        }
        if local.tables_with_rows.len() > 20 {
            what.push(format!("… and {} more tables with rows", local.tables_with_rows.len() - 20));
        }
        if old_log {
            what.push(match unsent {
                Some(n) => format!("{} holds {n} change set(s) captured here that the main has not acknowledged: they are lost", log_dir.display()),
                None => format!("{} holds a log of an earlier node", log_dir.display()),
            });
        }
        if !discard_local {
            eprintln!("branchsync join: this shop holds data of its own");
            for w in &what {
                eprintln!("  {w}");
            }
            eprintln!("DETAIL: join copies the main's tables into this database; what is here would be replaced.");
            eprintln!("HINT: Join into an empty database, or run branchsync join --discard-local to replace it (with the shop's daemon stopped).");
            return Ok(ExitCode::from(2));
        }
        println!("discarding what this shop holds (--discard-local):");
        for w in &what {
            println!("  {w}");
        }
        engine_join::discard_local(&admin.client).await?;
        if old_log {
            let aside = cfg.node.data_dir.join(format!("log.discarded-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)));
            std::fs::rename(&log_dir, &aside).with_context(|| format!("cannot move {} aside (is the shop's daemon still running?)", log_dir.display()))?;
            println!("  the old log was moved to {}", aside.display());
        }
    }
    let mut main = RemoteMain::connect(dial).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let point = match main.ask(Ask::JoinBegin).await.map_err(|e| anyhow::anyhow!("{e}"))? {
        Answer::JoinReady(p) => *p,
        _ => anyhow::bail!("the main answered out of turn"),
    };
    let (rows, bytes) = point.tables.iter().fold((0, 0), |(r, b), t| (r + t.rows_estimate, b + t.bytes_estimate));
    println!(
        "the main's snapshot at LSN {}{}: {} tables, {}about {} MB; the relay resumes after position {}",
        fmt_lsn(point.snapshot_lsn),
        if point.resumed { " (held since an earlier run)" } else { "" },
        point.tables.len(),
        if rows > 0 { format!("about {rows} rows, ") } else { String::new() },
        bytes / 1_000_000,
        point.relay_pos
    );
    let state = JoinState { relay_epoch: point.relay_epoch, relay_pos: point.relay_pos, relay_lsn: point.relay_lsn, main_system_id: point.main_system_id, snapshot_lsn: point.snapshot_lsn };
    let fresh_schema = engine_join::local_data(&admin.client, &cfg.database.schemas).await?.tables == 0;
    if fresh_schema {
        engine_join::create_schema(&cfg.database.url, &point.schema_sql).await?;
        println!("created the main's schema here");
    }
    check_columns(&admin.client, &point.tables).await?;
    let names: Vec<_> = point.tables.iter().map(|t| t.table.clone()).collect();
    let done = engine_join::begin(&mut admin.client, &state, &names).await?;
    let started = Instant::now();
    let (mut copied_rows, mut copied_bytes) = (0u64, 0u64);
    for t in &point.tables {
        if done.contains(&t.table.to_string()) {
            println!("  {}: copied by an earlier run", t.table);
            continue;
        }
        let (r, b) = copy_in(&mut main, &admin, t, progress).await?;
        println!("  {}: {r} rows, {} kB", t.table, b / 1000);
        copied_rows += r;
        copied_bytes += b;
    }
    let _ = std::io::stdout().flush();
    match main.ask(Ask::JoinEnd).await.map_err(|e| anyhow::anyhow!("{e}"))? {
        Answer::JoinEnded => {}
        _ => anyhow::bail!("the main answered out of turn"),
    }
    engine_join::finish(&mut admin.client, &state).await?;
    let secs = started.elapsed().as_secs_f64().max(0.001);
    println!(
        "copied {copied_rows} rows ({} MB) in {secs:.1} s ({:.0} rows/s); this shop follows the main's relay after position {}",
        copied_bytes / 1_000_000,
        copied_rows as f64 / secs,
        point.relay_pos
    );
    drop(admin);
    crate::init(cfg, false, false).await
}

/// Change sets in an old log that the main has not acknowledged (as far
/// as this log knows), if it opens.
fn unsent_changes(dir: &std::path::Path) -> Option<u64> {
    let log = ChangeLog::open(dir).ok()?;
    let acked = log.peer_ack(branchsync_engine::state::RELAY_STREAM).ok()?.max(log.floor().ok()?);
    Some(log.count_after(acked))
}

/// Every copied column must exist here (a schema created by hand or by the
/// ERP may lag the main's).
async fn check_columns(client: &tokio_postgres::Client, tables: &[JoinTable]) -> anyhow::Result<()> {
    for t in tables {
        let have: Vec<String> = client
            .query(
                "SELECT a.attname::text FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&t.table.schema, &t.table.name],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let missing: Vec<&String> = t.columns.iter().filter(|c| !have.contains(c)).collect();
        if have.is_empty() || !missing.is_empty() {
            anyhow::bail!(
                "table {} here differs from the main's{}\nDETAIL: join copies the main's rows into the same columns.\nHINT: Join into an empty database (the main's schema is created), or bring this schema up to the main's first.",
                t.table,
                if have.is_empty() { ": it does not exist".to_string() } else { format!(": no column {}", missing.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")) }
            );
        }
    }
    Ok(())
}

/// Copies one table in one transaction; its rows and bytes.
async fn copy_in(main: &mut RemoteMain, admin: &PgConn, t: &JoinTable, progress: &dyn Progress) -> anyhow::Result<(u64, u64)> {
    let sql = engine_join::begin_table(&admin.client, t).await?;
    let sink = admin.client.copy_in::<_, bytes::Bytes>(&sql).await.with_context(|| format!("cannot copy into {}", t.table))?;
    futures::pin_mut!(sink);
    main.send(Ask::JoinCopy { table: t.table.clone() }).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    progress.phase(&format!("copying {} (bytes)", t.table), t.bytes_estimate.max(1));
    let totals = loop {
        match main.next_answer().await.map_err(|e| anyhow::anyhow!("{e}"))? {
            Answer::CopyData(CopyBytes(data)) => {
                progress.advance(data.len() as u64);
                sink.send(bytes::Bytes::from(data)).await.with_context(|| format!("cannot copy into {}", t.table))?;
            }
            Answer::CopyDone { rows, bytes } => break (rows, bytes),
            _ => anyhow::bail!("the main answered out of turn while copying {}", t.table),
        }
    };
    let written = sink.as_mut().finish().await.with_context(|| format!("cannot copy into {}", t.table))?;
    progress.finish();
    if written != totals.0 {
        anyhow::bail!("{} rows of {} arrived, the main sent {}", written, t.table, totals.0);
    }
    engine_join::finish_table(&admin.client, t, totals.0, totals.1).await?;
    Ok(totals)
}

impl RemoteMain {
    /// Sends a question without waiting for its answer.
    pub(crate) async fn send(&mut self, a: Ask) -> Result<(), branchsync_engine::verify::VerifyError> {
        self.writer.send(Message::Ask(a)).await.map_err(|e| branchsync_engine::verify::VerifyError::Link(e.to_string()))
    }
}
