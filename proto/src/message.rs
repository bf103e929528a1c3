//! Messages of the link protocol.
//!
//! ```text
//!  branch                                   main
//!    | --- Hello{version, node, index, token, log bounds, relay progress} --> |
//!    | <-- Welcome{resume_after}  or  Refuse{reason, detail, hint} -------- |
//!    | --- Entries[..] (own ChangeSets, from resume_after) ----------------> |
//!    | <-- Entries[..] (relay, from the branch's durable relay progress) --- |
//!    | <-- Ack{pos} / --- Ack{pos}  (durable progress: sender may reclaim) -- |
//!    | <-> Heartbeat{now_us} ------------------------------------------------ |
//! ```
//!
//! The receiver's durable progress decides where a stream resumes (R4):
//! the branch tells the main its relay progress in `Hello`, the main tells
//! the branch its progress for the branch's stream in `Welcome`. `Ack` only
//! lets the sender reclaim log space.

use serde::{Deserialize, Serialize};

use crate::changeset::LogEntry;

/// Version of the link protocol. A peer speaking another version is refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// Everything that crosses a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a branch.
    Hello(Hello),
    /// The main accepts the branch.
    Welcome(Welcome),
    /// Either side refuses the other and closes the connection.
    Refuse(Refusal),
    /// Log entries, in log order.
    Entries(Vec<LogEntry>),
    /// The receiver has durably applied everything up to and including `pos`.
    Ack { pos: u64 },
    /// Liveness and clock: the sender's wall clock in microseconds and the
    /// newest position of its log (so the peer can show what is pending).
    Heartbeat { now_us: i64, log_newest: u64 },
}

/// A branch introduces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The branch's node name.
    pub node: String,
    /// The branch's node index.
    pub index: u32,
    /// The shared secret for this node.
    pub token: String,
    /// Key stride the branch was initialised with (must equal the main's, R23).
    pub stride: u32,
    /// Exclude globs of the branch (must equal the main's, R23).
    pub exclude: Vec<String>,
    /// `system_identifier` of the branch's PostgreSQL cluster.
    pub system_id: u64,
    /// Highest position ever written to the branch's log (0 = none).
    pub log_newest: u64,
    /// Every position up to this one was acknowledged and reclaimed.
    pub log_floor: u64,
    /// The branch's durable progress in the main's relay stream.
    pub relay_applied: u64,
    /// The branch database's clock, microseconds since the Unix epoch.
    pub now_us: i64,
    /// The branch's `[[tables]]` rules (R23: must equal the main's).
    #[serde(default)]
    pub table_rules: Vec<String>,
}

/// The main accepts a branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Must equal [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The main's node name.
    pub main_node: String,
    /// The main's durable progress in this branch's stream: the branch sends
    /// entries after this position.
    pub resume_after: u64,
    /// Author commit LSN of the ChangeSet at `resume_after` (0 = none): the
    /// branch checks that its own entry there is the same transaction (R4).
    pub resume_lsn: u64,
    /// The main's clock when it sent this, microseconds since the Unix epoch.
    pub now_us: i64,
    /// When the main received the Hello, on its clock (µs): with `now_us`
    /// and its own two times the branch computes its clock offset (R14).
    #[serde(default)]
    pub hello_received_us: i64,
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// No such node in the main's configuration.
    UnknownNode,
    /// Wrong token for this node.
    BadToken,
    /// Another live connection holds this node index.
    IndexInUse,
    /// The node's index, stride or exclude globs differ from the main's.
    ConfigMismatch,
    /// The peer's database or log went back in time (R4).
    WentBackInTime,
    /// The peer's database is another cluster than the one first seen.
    SystemIdChanged,
    /// The branch needs entries the main has already reclaimed: it was away
    /// longer than the log keeps them, or its database went back past them.
    MustReseed,
    /// Anything else the operator must fix.
    Other,
}

/// A refusal in PostgreSQL message style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// Lowercase primary message.
    pub message: String,
    /// Detail sentence.
    pub detail: String,
    /// Hint sentence: how to fix it.
    pub hint: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if !self.detail.is_empty() {
            write!(f, "\nDETAIL: {}", self.detail)?;
        }
        if !self.hint.is_empty() {
            write!(f, "\nHINT: {}", self.hint)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                node: "branch1".into(),
                index: 1,
                token: "s3cret".into(),
                stride: 100,
                exclude: vec!["ir_cache".into()],
                system_id: 1,
                log_newest: 10,
                log_floor: 5,
                relay_applied: 99,
                now_us: 1,
                table_rules: vec!["{}".into()],
            }),
            Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                main_node: "main".into(),
                resume_after: 7,
                resume_lsn: 8,
                now_us: 2,
                hello_received_us: 1,
            }),
            Message::Refuse(Refusal {
                reason: RefusalReason::BadToken,
                message: "authentication failed for node \"branch1\"".into(),
                detail: "d".into(),
                hint: "h".into(),
            }),
            Message::Entries(vec![]),
            Message::Ack { pos: 3 },
            Message::Heartbeat { now_us: 4, log_newest: 9 },
        ];
        for m in msgs {
            let b = rmp_serde::to_vec(&m).unwrap();
            let back: Message = rmp_serde::from_slice(&b).unwrap();
            assert_eq!(m, back);
        }
    }
}
