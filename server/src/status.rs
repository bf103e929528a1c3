//! What the daemon knows about itself and its peers, for `/status`,
//! `/metrics` and `branchsync status`.
//!
//! Tasks update [`NodeStatus`] through short critical sections; the lock is
//! a `std::sync::Mutex` and is never held across an `.await`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

/// One peer as seen from this node.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// A link session is up.
    pub connected: bool,
    /// Last frame received, Unix milliseconds.
    pub last_contact_unix_ms: Option<i64>,
    /// Peer clock minus our clock at the last heartbeat, milliseconds.
    pub clock_offset_ms: Option<i64>,
    /// Our durable progress in the peer's stream.
    pub applied_from_peer: u64,
    /// Newest position of the peer's log, as last reported.
    pub peer_log_newest: u64,
    /// The peer's acknowledged position in our log.
    pub acked_by_peer: u64,
    /// Entries of our log the peer has not acknowledged yet.
    pub pending_to_peer: u64,
    /// Positions of the peer's log we have not applied yet.
    pub pending_from_peer: u64,
    /// ChangeSets and rows applied from this peer in this run.
    pub changesets_applied: u64,
    /// Rows applied from this peer in this run.
    pub rows_applied: u64,
    /// Conflicts recorded while applying this peer's stream in this run.
    pub conflicts: u64,
    /// Changes of this peer quarantined in this run.
    #[serde(default)]
    pub quarantined: u64,
    /// Branch, for the main: echoes of this node's ChangeSets that the main
    /// wrote exactly as sent, taken without reading their rows, this run.
    #[serde(default)]
    pub echoes_as_sent: u64,
    /// Sessions established with the peer, this run.
    #[serde(default)]
    pub sessions: u64,
    /// Sessions that ended for a reason other than the network, this run.
    #[serde(default)]
    pub session_failures: u64,
    /// Why the last session ended or was refused.
    pub last_error: Option<String>,
    /// Sessions ended because the peer sent an entry in another node's
    /// name, this run.
    #[serde(default)]
    pub security_events: u64,
    /// Connections that claimed this node and failed authentication
    /// (token or certificate), this run.
    #[serde(default)]
    pub auth_failures: u64,
    /// Fingerprint (`sha256:…`) of the certificate the peer presented in
    /// the last session (none with `sync.insecure`).
    #[serde(default)]
    pub certificate: Option<String>,
    /// Main: the branch has been away longer than the retention; it no
    /// longer pins the log and must be re-seeded.
    #[serde(default)]
    pub must_reseed: bool,
    /// This session: the newest position of our log sent to the peer.
    #[serde(default)]
    pub sent_to_peer: u64,
    /// This session: bytes sent that the peer has not yet reported as
    /// taken by its apply (flow-control credit outstanding).
    #[serde(default)]
    pub in_flight_to_peer: u64,
    /// This session: the newest position of the peer's log received.
    #[serde(default)]
    pub received_from_peer: u64,
    /// This session: bytes received that our apply has not taken yet.
    #[serde(default)]
    pub unapplied_bytes: u64,
    /// Sessions ended because the peer's stream stalled (its log was ahead
    /// of what arrived, nothing arrived, and nothing was owed to it), this
    /// run. Each one is a bug worth reporting; the session that follows
    /// resumes from durable progress.
    #[serde(default)]
    pub stalls: u64,
}

/// Schema changes (DDL) at this node.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DdlStatus {
    /// `[ddl] from`: "main" or "any".
    pub from: String,
    /// DDL query strings run at this node by the ERP or an operator.
    pub local: i64,
    /// DDL replayed here from other nodes.
    pub replayed: i64,
    /// DDL statements from other nodes that failed or were refused here
    /// (kind `ddl_failed` in `branchsync.conflicts`).
    pub failed: i64,
    /// The newest such failures: statement and reason.
    pub recent_failures: Vec<DdlFailure>,
    /// DDL captured here this run and sent on.
    pub captured: u64,
    /// DDL that ran here this run but could not be replicated (it ran
    /// inside a function called by a query, or did not parse).
    pub unreplicable: u64,
    /// Set when this node's schema may differ from the main's.
    pub drift_warning: Option<String>,
}

/// One failed or refused replayed DDL statement.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DdlFailure {
    /// Id in `branchsync.conflicts`.
    pub conflict_id: i64,
    /// The node that ran it first.
    pub author: Option<String>,
    /// The statement.
    pub statement: Option<String>,
    /// Why it did not run here.
    pub reason: Option<String>,
}

/// Everything `/status` shows.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct StatusSnapshot {
    /// Node name.
    pub node: String,
    /// "main" or "branch".
    pub role: String,
    /// Newest visible position of the local log.
    pub log_newest: u64,
    /// Reclaimed up to here.
    pub log_floor: u64,
    /// Bytes on disk of the local log.
    pub log_bytes: u64,
    /// Commit LSN of the last captured transaction.
    pub captured_lsn: String,
    /// Everything committed before this WAL position is in the log (up to
    /// `log_newest` of the same snapshot).
    #[serde(default)]
    pub caught_up_lsn: String,
    /// Transactions captured in this run.
    pub captured_transactions: u64,
    /// Rows captured in this run.
    pub captured_rows: u64,
    /// Rows in `branchsync.conflicts`.
    pub conflicts_total: i64,
    /// Quarantined changes in `branchsync.conflicts`.
    pub quarantined_total: i64,
    /// Rows in `branchsync.parked`: orphans waiting for their parent and
    /// changes queued behind a parked or quarantined key.
    pub parked_total: i64,
    /// Recorded conflicts per kind (`update_update`, `update_delete`, ...).
    #[serde(default)]
    pub conflicts_by_kind: BTreeMap<String, i64>,
    /// Parked rows per table (`schema.table`).
    #[serde(default)]
    pub parked_by_table: BTreeMap<String, i64>,
    /// Schema changes: what replicated, what stayed local, what failed.
    #[serde(default)]
    pub ddl: DdlStatus,
    /// Per peer.
    pub peers: BTreeMap<String, PeerStatus>,
    /// Last error of a local component (capture, database).
    pub last_error: Option<String>,
    /// What capture is doing: `running`, `paused` (a full disk or log
    /// budget; it resumes by itself) or `stopped` (the operator must act).
    #[serde(default)]
    pub capture_state: String,
    /// Why capture is paused or stopped.
    #[serde(default)]
    pub capture_reason: Option<String>,
    /// The log's disk budget (`[log] max_bytes`), if set.
    #[serde(default)]
    pub log_budget_bytes: Option<u64>,
    /// Set when the log uses 80 % of its budget or more.
    #[serde(default)]
    pub log_warning: Option<String>,
    /// Messages with a branchsync prefix not written by branchsync (R25),
    /// ignored, this run; and per prefix.
    #[serde(default)]
    pub forged_marks: u64,
    #[serde(default)]
    pub forged_by_prefix: BTreeMap<String, u64>,
    /// Set when PUBLIC may execute `pg_logical_emit_message` (run init).
    #[serde(default)]
    pub emit_message_warning: Option<String>,
    /// Rows too large to carry that the operator let capture skip.
    #[serde(default)]
    pub rows_skipped: u64,
    /// Main: branch ChangeSets relayed, this run, marked as written exactly
    /// as their author sent them (the author takes their echo without its
    /// rows).
    #[serde(default)]
    pub relayed_as_sent: u64,
    /// Bytes of pgoutput messages capture decoded this run (rows and table
    /// descriptions of the transactions it captured).
    #[serde(default)]
    pub captured_pgoutput_bytes: u64,
}

impl StatusSnapshot {
    /// `true` when everything that keeps the stream flowing works: capture
    /// runs and no alarm is raised (for `/health`).
    pub fn healthy(&self) -> bool {
        self.capture_state == "running" && self.log_warning.is_none()
    }
}

/// Shared, mutable status.
#[derive(Debug, Default)]
pub struct NodeStatus {
    inner: Mutex<StatusSnapshot>,
}

impl NodeStatus {
    /// A status for `node`.
    pub fn new(node: &str, role: &str, peers: &[String]) -> NodeStatus {
        let mut s = StatusSnapshot { node: node.into(), role: role.into(), ..Default::default() };
        for p in peers {
            s.peers.insert(p.clone(), PeerStatus::default());
        }
        NodeStatus { inner: Mutex::new(s) }
    }

    /// Changes the status under the lock.
    pub fn update(&self, f: impl FnOnce(&mut StatusSnapshot)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    /// Changes one peer's status under the lock.
    pub fn peer(&self, name: &str, f: impl FnOnce(&mut PeerStatus)) {
        // Only peers of the configuration (a session that ends after a
        // reload took its branch off the list does not bring it back).
        self.update(|s| {
            if let Some(p) = s.peers.get_mut(name) {
                f(p)
            }
        });
    }

    /// The peers are `names` now (after a configuration reload): new ones
    /// start blank, the others keep their figures, unlisted ones go.
    pub fn set_peers(&self, names: &[String]) {
        self.update(|s| {
            s.peers.retain(|n, _| names.contains(n));
            for n in names {
                s.peers.entry(n.clone()).or_default();
            }
        });
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> StatusSnapshot {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
