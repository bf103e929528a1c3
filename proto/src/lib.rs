//! Wire types and framing of branchsync.
//!
//! This crate owns what crosses the link between a branch and the main: the
//! [`changeset`] types (a committed transaction, cut into log entries), the
//! [`message`]s of the link protocol with its versioned handshake, the
//! questions of an [`inspect`]ion session (`verify`), and the [`frame`]
//! codec that turns bytes into messages.
//!
//! It must never touch a database or a socket: it is types and pure
//! functions, so it can be tested and fuzzed without PostgreSQL.
//!
//! # Parser safety
//!
//! Decoding never panics on input. "Not a whole frame yet" (`Ok(None)`) is
//! kept apart from a protocol error ([`ProtoError`]), which makes the
//! connection close and changes nothing.

pub mod changeset;
pub mod frame;
pub mod inspect;
pub mod message;

pub use changeset::{ChangeSetHeader, ConflictRecord, DdlChange, EntryError, Invalid, LogEntry, OldRow, RowChange, TableDef, TableDesc, Value, Verdict, ENTRY_FORMAT_VERSION, MAX_ENTRY_BYTES};
pub use frame::{FrameCodec, ProtoError, DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME, MIN_MAX_FRAME};
pub use message::{EntryChunk, Hello, Message, Refusal, RefusalReason, Welcome, WireEntry, PROTOCOL_VERSION};
