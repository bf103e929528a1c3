//! The operator page's database work: one task owns one connection and
//! answers [`OperatorRequest`]s from the HTTP server, one at a time.
//!
//! It reads `branchsync.conflicts` and `branchsync.parked` (through the
//! engine's `conflict_log`), and settles a
//! record exactly as `branchsync conflicts resolve` does (the engine's
//! [`conflict_log::resolve`]: the mark and the written-back row in one
//! transaction). A lost connection is opened again at the next request;
//! the task ends at shutdown, after the request in hand.

use branchsync_engine::conflict_log::{self, Keep, Resolved};
use branchsync_engine::pg::{self, PgConn};
use branchsync_engine::scope::Scope;
use branchsync_server::http::OperatorRequest;
use tokio::sync::{mpsc, watch};

/// Records and parked rows the page shows at most.
const INBOX_LIMIT: i64 = 200;

/// Answers the page until shutdown.
pub async fn run(db_url: String, scope: Scope, mut requests: mpsc::Receiver<OperatorRequest>, mut shutdown: watch::Receiver<bool>) {
    let mut conn: Option<PgConn> = None;
    loop {
        let req = tokio::select! {
            _ = shutdown.changed() => return,
            r = requests.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        if conn.as_ref().is_none_or(|c| *c.closed.borrow()) {
            conn = pg::connect(&db_url, "branchsync operator page").await.map_err(|e| tracing::warn!(error = %e, "the operator page cannot reach the database")).ok();
        }
        let Some(c) = conn.as_mut() else {
            let e = Err("the database does not answer; the daemon's log says why".to_string());
            match req {
                OperatorRequest::Inbox { reply } | OperatorRequest::Resolve { reply, .. } => {
                    let _ = reply.send(e);
                }
            }
            continue;
        };
        match req {
            OperatorRequest::Inbox { reply } => {
                let _ = reply.send(inbox(c).await.map_err(|e| e.to_string()));
            }
            OperatorRequest::Resolve { id, keep_remote, reply } => {
                let keep = if keep_remote { Keep::Remote } else { Keep::Local };
                let r = conflict_log::resolve(&mut c.client, id, keep, &scope).await;
                match &r {
                    Ok(_) => tracing::info!(conflict = id, keep = if keep_remote { "remote" } else { "local" }, "conflict settled from the operator page"),
                    Err(e) => tracing::warn!(conflict = id, error = %e, "settling a conflict from the operator page failed"),
                }
                let answer = r
                    .map(|done| {
                        let what = match done {
                            Resolved::Marked => "settled; the rows stay as they are",
                            Resolved::RowWritten => "settled; the discarded version was written back and replicates",
                            Resolved::RowDeleted => "settled; the discarded delete was applied and replicates",
                        };
                        serde_json::json!({ "id": id, "done": what })
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(answer);
            }
        }
    }
}

async fn inbox(c: &PgConn) -> Result<serde_json::Value, branchsync_engine::EngineError> {
    let conflicts = conflict_log::list(&c.client, false, INBOX_LIMIT).await?;
    let parked = conflict_log::list_parked(&c.client, INBOX_LIMIT).await?;
    Ok(serde_json::json!({ "conflicts": conflicts, "parked": parked }))
}
