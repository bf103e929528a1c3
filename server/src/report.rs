//! Renders the node's status for people (`branchsync status`), for
//! machines (`/status`, `status --json`) and for Prometheus (`/metrics`).

use std::sync::Arc;

use branchsync_server::http::{Metric, MetricKind, StatusSource};
use crate::status::{NodeStatus, StatusSnapshot};

/// Adapts [`NodeStatus`] to the HTTP server.
pub struct HttpStatus(pub Arc<NodeStatus>);

fn gauge(name: &str, help: &str, labels: Vec<(String, String)>, value: f64) -> Metric {
    Metric { name: name.into(), help: help.into(), kind: MetricKind::Gauge, labels, value }
}

fn counter(name: &str, help: &str, labels: Vec<(String, String)>, value: f64) -> Metric {
    Metric { name: name.into(), help: help.into(), kind: MetricKind::Counter, labels, value }
}

impl StatusSource for HttpStatus {
    fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(self.0.snapshot()).unwrap_or(serde_json::Value::Null)
    }

    fn metrics(&self) -> Vec<Metric> {
        let s = self.0.snapshot();
        let mut m = vec![
            gauge("branchsync_log_newest_position", "Newest visible position of the local log.", vec![], s.log_newest as f64),
            gauge("branchsync_log_bytes", "Bytes the local log uses on disk.", vec![], s.log_bytes as f64),
            counter("branchsync_captured_transactions_total", "Transactions captured since start.", vec![], s.captured_transactions as f64),
            counter("branchsync_captured_rows_total", "Row changes captured since start.", vec![], s.captured_rows as f64),
            gauge("branchsync_conflicts", "Rows in branchsync.conflicts.", vec![], s.conflicts_total as f64),
            gauge("branchsync_quarantined", "Quarantined changes in branchsync.conflicts.", vec![], s.quarantined_total as f64),
            gauge("branchsync_parked", "Rows in branchsync.parked (waiting for a parent or behind a held key).", vec![], s.parked_total as f64),
            gauge("branchsync_ddl_local", "DDL query strings run at this node (branchsync.ddl_log).", vec![], s.ddl.local as f64),
            gauge("branchsync_ddl_replayed", "DDL replayed here from other nodes (branchsync.ddl_log).", vec![], s.ddl.replayed as f64),
            gauge("branchsync_ddl_failed", "Replayed DDL that failed or was refused (branchsync.conflicts).", vec![], s.ddl.failed as f64),
            counter("branchsync_ddl_unreplicable_total", "DDL that ran here but could not be replicated, since start.", vec![], s.ddl.unreplicable as f64),
            gauge("branchsync_capture_running", "1 while capture runs; 0 while it is paused (disk full) or stopped (the operator must act).", vec![], if s.capture_state == "running" { 1.0 } else { 0.0 }),
            gauge("branchsync_log_budget_bytes", "The log's disk budget ([log] max_bytes); 0 when unset.", vec![], s.log_budget_bytes.unwrap_or(0) as f64),
            counter("branchsync_forged_marks_total", "Messages with a branchsync prefix not written by branchsync, ignored, since start.", vec![], s.forged_marks as f64),
            counter("branchsync_rows_skipped_total", "Rows too large to carry that capture skipped as the operator recorded, since start.", vec![], s.rows_skipped as f64),
        ];
        for (kind, n) in &s.conflicts_by_kind {
            m.push(gauge("branchsync_conflicts_by_kind", "Rows in branchsync.conflicts per kind.", vec![("kind".to_string(), kind.clone())], *n as f64));
        }
        for (name, p) in &s.peers {
            let l = || vec![("peer".to_string(), name.clone())];
            m.push(gauge("branchsync_peer_connected", "1 while the link to the peer is up.", l(), if p.connected { 1.0 } else { 0.0 }));
            m.push(gauge("branchsync_peer_pending_to", "Log entries the peer has not acknowledged.", l(), p.pending_to_peer as f64));
            m.push(gauge("branchsync_peer_pending_from", "Positions of the peer's log not applied here.", l(), p.pending_from_peer as f64));
            m.push(counter("branchsync_peer_rows_applied_total", "Rows applied from the peer since start.", l(), p.rows_applied as f64));
            m.push(gauge("branchsync_peer_clock_offset_ms", "Peer clock minus local clock.", l(), p.clock_offset_ms.unwrap_or(0) as f64));
            m.push(counter("branchsync_peer_session_failures_total", "Link sessions that ended for a reason other than the network, since start.", l(), p.session_failures as f64));
            m.push(counter("branchsync_peer_quarantined_total", "Changes of the peer quarantined since start.", l(), p.quarantined as f64));
            m.push(counter("branchsync_peer_security_events_total", "Sessions ended because the peer spoke in another node's name, since start.", l(), p.security_events as f64));
            m.push(counter("branchsync_peer_stalls_total", "Sessions ended because the peer's stream stopped while nothing was owed to it, since start.", l(), p.stalls as f64));
            m.push(gauge("branchsync_peer_in_flight_bytes", "Bytes sent to the peer that it has not yet credited.", l(), p.in_flight_to_peer as f64));
            m.push(gauge("branchsync_peer_unapplied_bytes", "Bytes received from the peer that apply has not taken yet.", l(), p.unapplied_bytes as f64));
            m.push(counter("branchsync_peer_auth_failures_total", "Connections claiming the peer that failed authentication, since start.", l(), p.auth_failures as f64));
        }
        m
    }

    fn healthy(&self) -> bool {
        self.0.snapshot().healthy()
    }
}

/// Human-readable status, one block per peer.
pub fn render_text(s: &StatusSnapshot) -> String {
    let mut out = format!(
        "node {} ({})\n  log: newest position {}, reclaimed through {}, {} bytes\n  capture: last LSN {}, {} transactions / {} rows since start\n  conflicts: {} recorded ({} quarantined); parked: {} row(s) waiting\n",
        s.node, s.role, s.log_newest, s.log_floor, s.log_bytes, s.captured_lsn, s.captured_transactions, s.captured_rows, s.conflicts_total, s.quarantined_total, s.parked_total
    );
    if !s.conflicts_by_kind.is_empty() {
        let kinds: Vec<String> = s.conflicts_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!("    conflicts by kind: {} (see branchsync conflicts list)\n", kinds.join(", ")));
    }
    for (t, n) in &s.parked_by_table {
        out.push_str(&format!("    parked in {t}: {n}\n"));
    }
    let d = &s.ddl;
    out.push_str(&format!(
        "  schema changes ([ddl] from = \"{}\"): {} made here, {} replayed from peers, {} failed or refused\n",
        d.from, d.local, d.replayed, d.failed
    ));
    if d.unreplicable > 0 {
        out.push_str(&format!("    {} schema change(s) ran here but could not be replicated (see the daemon log)\n", d.unreplicable));
    }
    for f in &d.recent_failures {
        out.push_str(&format!(
            "    failed #{} from {}: {} — {}\n",
            f.conflict_id,
            f.author.as_deref().unwrap_or("?"),
            f.statement.as_deref().unwrap_or("?"),
            f.reason.as_deref().unwrap_or("?")
        ));
    }
    if let Some(w) = &d.drift_warning {
        out.push_str(&format!("  WARNING: {w}\n"));
    }
    if s.capture_state != "running" && !s.capture_state.is_empty() {
        out.push_str(&format!("  CAPTURE {}: {}\n", s.capture_state.to_uppercase(), s.capture_reason.as_deref().unwrap_or("?")));
    }
    if let Some(b) = s.log_budget_bytes {
        out.push_str(&format!("  log budget: {} of {b} bytes ({:.0} %)\n", s.log_bytes, 100.0 * s.log_bytes as f64 / b.max(1) as f64));
    }
    for w in [&s.log_warning, &s.emit_message_warning].into_iter().flatten() {
        out.push_str(&format!("  WARNING: {w}\n"));
    }
    if s.forged_marks > 0 {
        let by: Vec<String> = s.forged_by_prefix.iter().map(|(k, n)| format!("{k} {n}")).collect();
        out.push_str(&format!("  ignored {} message(s) with a branchsync prefix that branchsync did not write ({}); their transactions replicated as ordinary ones\n", s.forged_marks, by.join(", ")));
    }
    if s.rows_skipped > 0 {
        out.push_str(&format!("  {} row(s) too large to carry were skipped as recorded (branchsync.conflicts, kind row_too_large)\n", s.rows_skipped));
    }
    if let Some(e) = &s.last_error {
        out.push_str(&format!("  last error: {e}\n"));
    }
    for (name, p) in &s.peers {
        let contact = match p.last_contact_unix_ms {
            Some(ms) => {
                let ago = (branchsync_engine::clock::now_us() / 1000 - ms).max(0);
                format!("{:.1} s ago", ago as f64 / 1000.0)
            }
            None => "never".into(),
        };
        out.push_str(&format!(
            "peer {name}: {}\n  last contact: {contact}\n  pending to peer: {} entries; pending from peer: {} positions\n  applied from peer: position {} ({} rows this run, {} conflicts)\n",
            if p.connected { "connected" } else { "disconnected" },
            p.pending_to_peer,
            p.pending_from_peer,
            p.applied_from_peer,
            p.rows_applied,
            p.conflicts
        ));
        if p.connected {
            out.push_str(&format!(
                "  this session: sent through position {} ({} bytes awaiting credit); received through position {} ({} bytes not yet taken by apply)\n",
                p.sent_to_peer, p.in_flight_to_peer, p.received_from_peer, p.unapplied_bytes
            ));
        }
        if let Some(o) = p.clock_offset_ms {
            out.push_str(&format!("  clock offset: {o} ms\n"));
        }
        if p.stalls > 0 {
            out.push_str(&format!("  STALLED STREAM: {} session(s) ended because the peer's stream stopped while nothing was owed to it (a bug: please report it with the daemon logs)\n", p.stalls));
        }
        if p.must_reseed {
            out.push_str("  MUST BE RE-SEEDED: away longer than the retention; it no longer holds the log back\n");
        }
        if p.security_events > 0 || p.auth_failures > 0 {
            out.push_str(&format!("  SECURITY: {} session(s) ended for speaking in another node's name, {} failed authentication(s) this run\n", p.security_events, p.auth_failures));
        }
        if p.quarantined > 0 || p.session_failures > 0 {
            out.push_str(&format!("  quarantined this run: {}; sessions failed this run: {}\n", p.quarantined, p.session_failures));
        }
        if let Some(e) = &p.last_error {
            out.push_str(&format!("  last error: {e}\n"));
        }
    }
    out
}
