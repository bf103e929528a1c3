//! Messages of the link protocol.
//!
//! ```text
//!  branch                                   main
//!    | --- Hello{version, node, token, limits, own log identity,           |
//!    |           relay progress and identity} ----------------------------> |
//!    | <-- Welcome{limits, relay identity, resume_after + its LSN}          |
//!    |     or Refuse{reason, detail, hint} -------------------------------- |
//!    | --- Entries[..] / Chunk (own ChangeSets, from resume_after) -------> |
//!    | <-- Entries[..] / Chunk (relay, from the branch's relay progress) -- |
//!    | <-> Credit{consumed}  (bytes taken off the receive buffer)           |
//!    | <-> Ack{pos}          (durable progress: the sender may reclaim)     |
//!    | <-> Heartbeat{now_us} -------------------------------------------- |
//! ```
//!
//! # Identity and progress (R4, R26)
//!
//! The receiver's durable progress decides where a stream resumes: the
//! branch tells the main its relay progress in `Hello`, the main tells the
//! branch its progress in the branch's stream in `Welcome`. Each of those
//! positions travels with the identity of the log it belongs to (its
//! *epoch*, chosen at random when the log was created) and the commit LSN of
//! the ChangeSet at that position, so a log that was lost, recreated or
//! restored is recognised and refused instead of being resumed at a
//! position that now means another transaction. `Ack` only lets the sender
//! reclaim log space.
//!
//! # Flow control (no deadlock by construction)
//!
//! Each side reads its socket all the time and hands entries to its apply
//! task through a buffer that the *sender* keeps from overflowing: it sends
//! entries only while the bytes it sent minus the bytes the receiver has
//! reported as consumed (`Credit`) stay within the window agreed at the
//! handshake. An entry larger than the window is sent only when nothing else
//! is in flight, and an entry larger than a frame travels as [`EntryChunk`]s.
//! So no side ever has to stop reading to make room, and acknowledgements
//! and heartbeats are always read.

use serde::{Deserialize, Serialize};

/// Version of the link protocol. A peer speaking another version is refused.
/// 3: entries travel as they are stored (with chunks for large ones),
/// credit-based flow control, log identities (epochs) in the handshake.
pub const PROTOCOL_VERSION: u32 = 3;

/// Everything that crosses a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a branch.
    Hello(Hello),
    /// The main accepts the branch.
    Welcome(Welcome),
    /// Either side refuses the other and closes the connection.
    Refuse(Refusal),
    /// Log entries, in log order, each whole.
    Entries(Vec<WireEntry>),
    /// One piece of an entry too large for one frame; pieces follow each
    /// other in order, nothing else of the stream in between.
    Chunk(EntryChunk),
    /// The receiver has taken this many bytes of entries off its receive
    /// buffer since the session started (the sender may send more).
    Credit { consumed: u64 },
    /// The receiver has durably applied everything up to and including `pos`.
    Ack { pos: u64 },
    /// Liveness and clock: the sender's wall clock in microseconds and the
    /// newest position of its log (so the peer can show what is pending).
    Heartbeat { now_us: i64, log_newest: u64 },
    /// First message of an inspection session (`branchsync verify`), in
    /// place of `Hello`; see [`crate::inspect`].
    Inspect(crate::inspect::Inspect),
    /// A question of an inspection session.
    Ask(crate::inspect::Ask),
    /// The main's answer to [`Message::Inspect`] or [`Message::Ask`].
    Answer(crate::inspect::Answer),
}

/// A log entry on the wire: where it sits in the stream and in its
/// ChangeSet, in the clear, and the entry as the sender's log stores it
/// (`LogEntry::encode`). The receiver decodes and checks the body itself;
/// a body that does not decode is quarantined by its position, and the
/// ChangeSet's bounds (`part`, `last`) are still known.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Position in the sender's log.
    pub pos: u64,
    /// Fragment number within its ChangeSet, from 0.
    pub part: u32,
    /// The final fragment of its ChangeSet.
    pub last: bool,
    /// The encoded [`crate::LogEntry`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

impl WireEntry {
    /// An entry as it goes on the wire.
    pub fn of(e: &crate::LogEntry) -> Result<WireEntry, crate::EntryError> {
        Ok(WireEntry { pos: e.pos, part: e.part, last: e.last, body: e.encode()? })
    }
}

impl std::fmt::Debug for WireEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print row values.
        f.debug_struct("WireEntry").field("pos", &self.pos).field("part", &self.part).field("last", &self.last).field("bytes", &self.body.len()).finish()
    }
}

/// A piece of one entry that is larger than a frame.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryChunk {
    /// Position of the entry.
    pub pos: u64,
    /// Fragment number of the entry within its ChangeSet.
    pub part: u32,
    /// The entry is the final fragment of its ChangeSet.
    pub last: bool,
    /// Size of the whole encoded entry.
    pub total: u64,
    /// Where this piece starts in the encoded entry.
    pub offset: u64,
    /// The bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl std::fmt::Debug for EntryChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntryChunk").field("pos", &self.pos).field("total", &self.total).field("offset", &self.offset).field("bytes", &self.data.len()).finish()
    }
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
    /// Identity of the branch's log (R26).
    pub log_epoch: u64,
    /// Highest position ever written to the branch's log (0 = none).
    pub log_newest: u64,
    /// Every position up to this one was reclaimed.
    pub log_floor: u64,
    /// Identity of the main's relay log the branch's progress belongs to
    /// (0 = the branch has applied nothing of any relay yet).
    pub relay_epoch: u64,
    /// The branch's durable progress in the main's relay stream.
    pub relay_applied: u64,
    /// Author commit LSN of the relay entry at `relay_applied` (0 = none).
    pub relay_applied_lsn: u64,
    /// The branch database's clock, microseconds since the Unix epoch.
    pub now_us: i64,
    /// The branch's `[[tables]]` rules (R23: must equal the main's).
    pub table_rules: Vec<String>,
    /// The branch's `[ddl] from` (`"main"` or `"any"`): must equal the
    /// main's, or a branch's schema change would be kept at one end and
    /// replayed at the other.
    pub ddl_from: String,
    /// The branch's `[conflicts] tombstone_days`: must equal the main's
    /// (deletes are decided against tombstones kept that long).
    pub tombstone_days: u32,
    /// Largest frame the branch accepts.
    pub max_frame: u64,
    /// Bytes of entries the branch buffers for its apply (flow control).
    pub window: u64,
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
    /// Identity of the branch's log the main's progress belongs to (0 = none
    /// recorded yet).
    pub stream_epoch: u64,
    /// Identity of the main's relay log.
    pub relay_epoch: u64,
    /// The main's clock when it sent this, microseconds since the Unix epoch.
    pub now_us: i64,
    /// When the main received the Hello, on its clock (µs): with `now_us`
    /// and its own two times the branch computes its clock offset (R14).
    pub hello_received_us: i64,
    /// Largest frame of the session: the smaller of both sides' limits.
    pub max_frame: u64,
    /// Flow-control window of the session: the smaller of both sides'.
    pub window: u64,
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
    /// A log was lost or recreated: its identity (epoch) is not the one the
    /// receiver's progress belongs to (R26).
    LogRecreated,
    /// The peer broke the protocol (a gap in positions, an impossible size).
    ProtocolViolation,
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

impl Message {
    /// The message's name, for logs (never its content).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refuse(_) => "Refuse",
            Message::Entries(_) => "Entries",
            Message::Chunk(_) => "Chunk",
            Message::Credit { .. } => "Credit",
            Message::Ack { .. } => "Ack",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::Inspect(_) => "Inspect",
            Message::Ask(_) => "Ask",
            Message::Answer(_) => "Answer",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_hello() -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: "branch1".into(),
            index: 1,
            token: "s3cret".into(),
            stride: 100,
            exclude: vec!["ir_cache".into()],
            system_id: 1,
            log_epoch: 0xfeed,
            log_newest: 10,
            log_floor: 5,
            relay_epoch: 0xbeef,
            relay_applied: 99,
            relay_applied_lsn: 0x16_B374_D848,
            now_us: 1,
            table_rules: vec!["{}".into()],
            ddl_from: "main".into(),
            tombstone_days: 30,
            max_frame: 16 << 20,
            window: 16 << 20,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = vec![
            Message::Hello(sample_hello()),
            Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                main_node: "main".into(),
                resume_after: 7,
                resume_lsn: 8,
                stream_epoch: 3,
                relay_epoch: 4,
                now_us: 2,
                hello_received_us: 1,
                max_frame: 1 << 20,
                window: 1 << 22,
            }),
            Message::Refuse(Refusal {
                reason: RefusalReason::LogRecreated,
                message: "authentication failed for node \"branch1\"".into(),
                detail: "d".into(),
                hint: "h".into(),
            }),
            Message::Entries(vec![WireEntry { pos: 9, part: 0, last: true, body: vec![1, 2, 3] }]),
            Message::Chunk(EntryChunk { pos: 10, part: 2, last: false, total: 100, offset: 50, data: vec![0; 50] }),
            Message::Credit { consumed: 1 << 40 },
            Message::Ack { pos: 3 },
            Message::Heartbeat { now_us: 4, log_newest: 9 },
        ];
        for m in msgs {
            let b = rmp_serde::to_vec(&m).unwrap();
            let back: Message = rmp_serde::from_slice(&b).unwrap();
            assert_eq!(m, back);
        }
    }

    #[test]
    fn entry_bodies_travel_as_bytes_not_as_arrays_of_numbers() {
        let body = vec![0xffu8; 1000];
        let m = Message::Entries(vec![WireEntry { pos: 1, part: 0, last: true, body }]);
        let b = rmp_serde::to_vec(&m).unwrap();
        assert!(b.len() < 1100, "1000 bytes took {} bytes on the wire", b.len());
    }

    #[test]
    fn debug_output_never_shows_entry_bytes() {
        let e = WireEntry { pos: 1, part: 0, last: true, body: b"secret price".to_vec() };
        assert!(!format!("{e:?}").contains("secret"));
    }
}
