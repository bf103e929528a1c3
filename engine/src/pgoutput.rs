//! A pure decoder of the `pgoutput` logical replication protocol, version 1.
//!
//! Capture reads its slot with
//! `pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1',
//! 'publication_names', …, 'messages', 'true')`; every row's `data` column
//! is one message, and [`decode`] turns it into a [`PgOutputMessage`].
//!
//! ```text
//!  data: bytea ──decode──> Begin | Origin? | Relation* | Type* |
//!                          Insert | Update | Delete | Truncate | Message | Commit
//! ```
//!
//! The byte layouts follow "Logical Replication Message Formats" in the
//! PostgreSQL documentation
//! (<https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>);
//! each decoding function repeats the layout above its code. Integers are
//! big-endian, a `String` is NUL-terminated. Protocol version 1 has no
//! streamed or two-phase messages, and capture never asks for binary
//! values, so those are refused with a [`DecodeError`].
//!
//! # Parser safety
//!
//! [`decode`] never panics: every read is bounds-checked, a length prefix is
//! checked against the bytes actually present before anything is allocated,
//! and bytes left over after a complete message are an error (they would
//! mean that the layout was misread). Text values must be valid UTF-8: a
//! branchsync database uses the UTF8 encoding.

use branchsync_proto::Value;

/// Everything that makes a pgoutput message undecodable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message has no bytes at all.
    #[error("empty pgoutput message")]
    Empty,
    /// The message ends before a field it must contain.
    #[error("pgoutput message truncated: {what} at offset {offset} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Byte offset of the field.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// A string field has no terminating NUL byte.
    #[error("pgoutput message truncated: {what} at offset {offset} has no terminating NUL")]
    UnterminatedString {
        /// The field being read.
        what: &'static str,
        /// Byte offset of the field.
        offset: usize,
    },
    /// The first byte names no message type of protocol version 1.
    #[error("unknown pgoutput message type 0x{0:02x}")]
    UnknownMessageType(u8),
    /// A string or a text value is not valid UTF-8.
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field being read.
        what: &'static str,
        /// Byte offset of the field.
        offset: usize,
    },
    /// A tuple column is neither `n`, `u`, `t` nor `b`.
    #[error("unknown tuple column kind 0x{kind:02x} at offset {offset}")]
    InvalidColumnKind {
        /// The kind byte.
        kind: u8,
        /// Byte offset of the kind byte.
        offset: usize,
    },
    /// A tuple column is in binary format, which capture never requests.
    #[error("binary tuple value at offset {offset}: capture only requests text values")]
    BinaryValue {
        /// Byte offset of the kind byte.
        offset: usize,
    },
    /// An Insert, Update or Delete has a tuple marker other than `N`, `K`, `O`
    /// where its layout requires one of them.
    #[error("unexpected tuple marker 0x{marker:02x} at offset {offset} in a {message} message")]
    UnexpectedTupleMarker {
        /// Name of the message type.
        message: &'static str,
        /// The marker byte.
        marker: u8,
        /// Byte offset of the marker.
        offset: usize,
    },
    /// A column count is negative.
    #[error("negative {what} {count}")]
    NegativeCount {
        /// The field being read.
        what: &'static str,
        /// The count.
        count: i16,
    },
    /// A Relation message has an unknown replica identity setting.
    #[error("unknown replica identity setting 0x{0:02x}")]
    InvalidReplicaIdentity(u8),
    /// Bytes follow a complete message.
    #[error("{count} unexpected bytes after a complete {message} message")]
    TrailingBytes {
        /// Name of the message type.
        message: &'static str,
        /// Number of bytes left over.
        count: usize,
    },
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the transaction was replayed under a replication origin.
    Origin(Origin),
    /// `R`: the layout of a table, sent before its first row change.
    Relation(Relation),
    /// `Y`: a non-built-in data type.
    Type(TypeInfo),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message(LogicalMessage),
}

impl PgOutputMessage {
    /// Short name of the message type (for logs and errors).
    pub fn kind(&self) -> &'static str {
        match self {
            PgOutputMessage::Begin(_) => "begin",
            PgOutputMessage::Commit(_) => "commit",
            PgOutputMessage::Origin(_) => "origin",
            PgOutputMessage::Relation(_) => "relation",
            PgOutputMessage::Type(_) => "type",
            PgOutputMessage::Insert(_) => "insert",
            PgOutputMessage::Update(_) => "update",
            PgOutputMessage::Delete(_) => "delete",
            PgOutputMessage::Truncate(_) => "truncate",
            PgOutputMessage::Message(_) => "message",
        }
    }
}

/// `B`: the start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record (equals [`Commit::commit_lsn`]).
    pub final_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 (PostgreSQL epoch).
    pub commit_ts: i64,
    /// Transaction id.
    pub xid: u32,
}

/// `C`: the end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; currently always 0.
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: u64,
    /// LSN just past the commit record: where the slot may be confirmed.
    pub end_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 (PostgreSQL epoch).
    pub commit_ts: i64,
}

/// `O`: the transaction was written under a replication origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Commit LSN on the origin server.
    pub commit_lsn: u64,
    /// Name of the replication origin.
    pub name: String,
}

/// A table's replica identity setting (`pg_class.relreplident`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns (the table is a multiset).
    Full,
    /// `i`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    fn from_byte(b: u8) -> Result<ReplicaIdentity, DecodeError> {
        match b {
            b'd' => Ok(ReplicaIdentity::Default),
            b'n' => Ok(ReplicaIdentity::Nothing),
            b'f' => Ok(ReplicaIdentity::Full),
            b'i' => Ok(ReplicaIdentity::Index),
            other => Err(DecodeError::InvalidReplicaIdentity(other)),
        }
    }
}

/// `R`: the layout of a published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID; row changes refer to it.
    pub oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Columns in attribute order (dropped and generated columns are not sent).
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Raw flags; bit 1 marks a replica identity column.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`).
    pub type_modifier: i32,
}

impl Column {
    /// `true` if the column is part of the replica identity. With `REPLICA
    /// IDENTITY FULL` every column is.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// `Y`: a data type that is not built in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// The type's OID.
    pub oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// `I`: a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// OID of the table (see [`Relation`]).
    pub rel: u32,
    /// One value per column of the relation.
    pub new: Vec<Value>,
}

/// The old row sent with an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity columns are set, the others are NULL.
    Key(Vec<Value>),
    /// `O`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(Vec<Value>),
}

impl OldTuple {
    /// Consumes the tuple: (`true` for a full row, values).
    pub fn into_parts(self) -> (bool, Vec<Value>) {
        match self {
            OldTuple::Key(v) => (false, v),
            OldTuple::Full(v) => (true, v),
        }
    }
}

/// `U`: a changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// OID of the table.
    pub rel: u32,
    /// Present when the key changed (`K`) or the table has `REPLICA IDENTITY
    /// FULL` (`O`).
    pub old: Option<OldTuple>,
    /// The new row; unchanged TOASTed values are [`Value::Unchanged`].
    pub new: Vec<Value>,
}

/// `D`: a removed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// OID of the table.
    pub rel: u32,
    /// The old key (`K`) or the whole old row (`O`).
    pub old: OldTuple,
}

/// `T`: tables were truncated in one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Raw option bits: 1 = `CASCADE`, 2 = `RESTART IDENTITY`.
    pub options: u8,
    /// OIDs of the truncated tables.
    pub rels: Vec<u32>,
}

impl Truncate {
    /// `TRUNCATE … CASCADE`.
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }

    /// `TRUNCATE … RESTART IDENTITY`.
    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// `M`: a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Raw flags; bit 1 marks a transactional message.
    pub flags: u8,
    /// LSN of the message.
    pub lsn: u64,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content, as given.
    pub content: Vec<u8>,
}

impl LogicalMessage {
    /// `true` for a transactional message (it belongs to the enclosing
    /// Begin … Commit); `false` for one decoded on its own.
    pub fn transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A bounds-checked cursor over one message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let available = self.buf.len().saturating_sub(self.pos);
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
            .ok_or(DecodeError::Truncated { what, offset: self.pos, needed: n, available })?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let offset = self.pos;
        let s = self.take(N, what)?;
        <[u8; N]>::try_from(s).map_err(|_| DecodeError::Truncated { what, offset, needed: N, available: s.len() })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = self.buf.get(offset..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == 0).ok_or(DecodeError::UnterminatedString { what, offset })?;
        let bytes = self.take(len, what)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { what, offset })?.to_owned();
        // The terminating NUL, known to be there.
        self.take(1, what)?;
        Ok(s)
    }

    fn finish(&self, message: &'static str) -> Result<(), DecodeError> {
        match self.buf.len().saturating_sub(self.pos) {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { message, count }),
        }
    }
}

/// Decodes one pgoutput (protocol version 1) message.
///
/// Never panics; any malformed, truncated or over-long input is a
/// [`DecodeError`].
pub fn decode(buf: &[u8]) -> Result<PgOutputMessage, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = match buf.first() {
        Some(&t) => t,
        None => return Err(DecodeError::Empty),
    };
    r.pos = 1;
    let msg = match tag {
        b'B' => PgOutputMessage::Begin(begin(&mut r)?),
        b'C' => PgOutputMessage::Commit(commit(&mut r)?),
        b'O' => PgOutputMessage::Origin(origin(&mut r)?),
        b'R' => PgOutputMessage::Relation(relation(&mut r)?),
        b'Y' => PgOutputMessage::Type(type_info(&mut r)?),
        b'I' => PgOutputMessage::Insert(insert(&mut r)?),
        b'U' => PgOutputMessage::Update(update(&mut r)?),
        b'D' => PgOutputMessage::Delete(delete(&mut r)?),
        b'T' => PgOutputMessage::Truncate(truncate(&mut r)?),
        b'M' => PgOutputMessage::Message(message(&mut r)?),
        other => return Err(DecodeError::UnknownMessageType(other)),
    };
    r.finish(msg.kind())?;
    Ok(msg)
}

/// `B`, Int64 final LSN, Int64 commit timestamp, Int32 xid.
fn begin(r: &mut Reader<'_>) -> Result<Begin, DecodeError> {
    Ok(Begin { final_lsn: r.u64("begin final lsn")?, commit_ts: r.i64("begin commit timestamp")?, xid: r.u32("begin xid")? })
}

/// `C`, Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 commit timestamp.
fn commit(r: &mut Reader<'_>) -> Result<Commit, DecodeError> {
    Ok(Commit {
        flags: r.u8("commit flags")?,
        commit_lsn: r.u64("commit lsn")?,
        end_lsn: r.u64("commit end lsn")?,
        commit_ts: r.i64("commit timestamp")?,
    })
}

/// `O`, Int64 commit LSN at the origin, String origin name.
fn origin(r: &mut Reader<'_>) -> Result<Origin, DecodeError> {
    Ok(Origin { commit_lsn: r.u64("origin lsn")?, name: r.cstr("origin name")? })
}

/// `R`, Int32 OID, String namespace, String name, Int8 replica identity,
/// Int16 column count, then per column: Int8 flags, String name, Int32
/// type OID, Int32 type modifier.
fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("relation oid")?;
    let namespace = r.cstr("relation namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = ReplicaIdentity::from_byte(r.u8("relation replica identity")?)?;
    let n = r.i16("relation column count")?;
    let n = usize::try_from(n).map_err(|_| DecodeError::NegativeCount { what: "relation column count", count: n })?;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        columns.push(Column {
            flags: r.u8("column flags")?,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation { oid, namespace, name, replica_identity, columns })
}

/// `Y`, Int32 OID, String namespace, String name.
fn type_info(r: &mut Reader<'_>) -> Result<TypeInfo, DecodeError> {
    Ok(TypeInfo { oid: r.u32("type oid")?, namespace: r.cstr("type namespace")?, name: r.cstr("type name")? })
}

/// `I`, Int32 relation OID, `N`, TupleData.
fn insert(r: &mut Reader<'_>) -> Result<Insert, DecodeError> {
    let rel = r.u32("insert relation oid")?;
    let offset = r.pos;
    match r.u8("insert tuple marker")? {
        b'N' => Ok(Insert { rel, new: tuple(r)? }),
        marker => Err(DecodeError::UnexpectedTupleMarker { message: "insert", marker, offset }),
    }
}

/// `U`, Int32 relation OID, optionally (`K` | `O`, TupleData), `N`, TupleData.
fn update(r: &mut Reader<'_>) -> Result<Update, DecodeError> {
    let rel = r.u32("update relation oid")?;
    let offset = r.pos;
    let old = match r.u8("update tuple marker")? {
        b'N' => return Ok(Update { rel, old: None, new: tuple(r)? }),
        b'K' => OldTuple::Key(tuple(r)?),
        b'O' => OldTuple::Full(tuple(r)?),
        marker => return Err(DecodeError::UnexpectedTupleMarker { message: "update", marker, offset }),
    };
    let offset = r.pos;
    match r.u8("update new tuple marker")? {
        b'N' => Ok(Update { rel, old: Some(old), new: tuple(r)? }),
        marker => Err(DecodeError::UnexpectedTupleMarker { message: "update", marker, offset }),
    }
}

/// `D`, Int32 relation OID, `K` | `O`, TupleData.
fn delete(r: &mut Reader<'_>) -> Result<Delete, DecodeError> {
    let rel = r.u32("delete relation oid")?;
    let offset = r.pos;
    let old = match r.u8("delete tuple marker")? {
        b'K' => OldTuple::Key(tuple(r)?),
        b'O' => OldTuple::Full(tuple(r)?),
        marker => return Err(DecodeError::UnexpectedTupleMarker { message: "delete", marker, offset }),
    };
    Ok(Delete { rel, old })
}

/// `T`, Int32 relation count, Int8 options, Int32 OID per relation.
fn truncate(r: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
    let n = r.u32("truncate relation count")?;
    let options = r.u8("truncate options")?;
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    // Never trust a count for an allocation: at most what the bytes can hold.
    let mut rels = Vec::with_capacity(n.min(r.buf.len().saturating_sub(r.pos) / 4));
    for _ in 0..n {
        rels.push(r.u32("truncate relation oid")?);
    }
    Ok(Truncate { options, rels })
}

/// `M`, Int8 flags, Int64 LSN, String prefix, Int32 content length, content.
fn message(r: &mut Reader<'_>) -> Result<LogicalMessage, DecodeError> {
    let flags = r.u8("message flags")?;
    let lsn = r.u64("message lsn")?;
    let prefix = r.cstr("message prefix")?;
    let len = r.u32("message content length")?;
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let content = r.take(len, "message content")?.to_vec();
    Ok(LogicalMessage { flags, lsn, prefix, content })
}

/// TupleData: Int16 column count, then per column `n` (NULL), `u`
/// (unchanged TOASTed value), `t` Int32 length + text, or `b` Int32 length +
/// binary (refused).
fn tuple(r: &mut Reader<'_>) -> Result<Vec<Value>, DecodeError> {
    let n = r.i16("tuple column count")?;
    let n = usize::try_from(n).map_err(|_| DecodeError::NegativeCount { what: "tuple column count", count: n })?;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let offset = r.pos;
        let v = match r.u8("tuple column kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.u32("text value length")?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let at = r.pos;
                let bytes = r.take(len, "text value")?;
                let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { what: "text value", offset: at })?;
                Value::Text(s.to_owned())
            }
            b'b' => return Err(DecodeError::BinaryValue { offset }),
            kind => return Err(DecodeError::InvalidColumnKind { kind, offset }),
        };
        values.push(v);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A minimal encoder for tests, written from the documented layouts.
    struct Enc(Vec<u8>);

    impl Enc {
        fn new(tag: u8) -> Enc {
            Enc(vec![tag])
        }
        fn u8(mut self, v: u8) -> Enc {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Enc {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Enc {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Enc {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Enc {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Enc {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Enc {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn bytes(mut self, v: &[u8]) -> Enc {
            self.0.extend_from_slice(v);
            self
        }
        fn tuple(mut self, vals: &[Value]) -> Enc {
            self = self.i16(vals.len() as i16);
            for v in vals {
                self = match v {
                    Value::Null => self.u8(b'n'),
                    Value::Unchanged => self.u8(b'u'),
                    Value::Text(t) => self.u8(b't').u32(t.len() as u32).bytes(t.as_bytes()),
                };
            }
            self
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_string())
    }

    /// One valid buffer per message type, with what it must decode to.
    fn samples() -> Vec<(Vec<u8>, PgOutputMessage)> {
        let row = vec![text("7"), Value::Null, text("it's \"quoted\"\nline two — ünïcødé"), Value::Unchanged];
        let key = vec![text("7"), Value::Null, Value::Null, Value::Null];
        vec![
            (
                Enc::new(b'B').u64(0x16_B374_D848).i64(753_000_000_000_001).u32(4242).0,
                PgOutputMessage::Begin(Begin { final_lsn: 0x16_B374_D848, commit_ts: 753_000_000_000_001, xid: 4242 }),
            ),
            (
                Enc::new(b'C').u8(0).u64(0x16_B374_D848).u64(0x16_B374_D878).i64(753_000_000_000_001).0,
                PgOutputMessage::Commit(Commit {
                    flags: 0,
                    commit_lsn: 0x16_B374_D848,
                    end_lsn: 0x16_B374_D878,
                    commit_ts: 753_000_000_000_001,
                }),
            ),
            (
                Enc::new(b'O').u64(99).s("branchsync_b1").0,
                PgOutputMessage::Origin(Origin { commit_lsn: 99, name: "branchsync_b1".into() }),
            ),
            (
                Enc::new(b'R')
                    .u32(16384)
                    .s("public")
                    .s("order line")
                    .u8(b'd')
                    .i16(2)
                    .u8(1)
                    .s("id")
                    .u32(23)
                    .i32(-1)
                    .u8(0)
                    .s("note")
                    .u32(1043)
                    .i32(104)
                    .0,
                PgOutputMessage::Relation(Relation {
                    oid: 16384,
                    namespace: "public".into(),
                    name: "order line".into(),
                    replica_identity: ReplicaIdentity::Default,
                    columns: vec![
                        Column { flags: 1, name: "id".into(), type_oid: 23, type_modifier: -1 },
                        Column { flags: 0, name: "note".into(), type_oid: 1043, type_modifier: 104 },
                    ],
                }),
            ),
            (
                Enc::new(b'R').u32(5).s("").s("empty").u8(b'f').i16(0).0,
                PgOutputMessage::Relation(Relation {
                    oid: 5,
                    namespace: String::new(),
                    name: "empty".into(),
                    replica_identity: ReplicaIdentity::Full,
                    columns: vec![],
                }),
            ),
            (
                Enc::new(b'Y').u32(70000).s("public").s("mood").0,
                PgOutputMessage::Type(TypeInfo { oid: 70000, namespace: "public".into(), name: "mood".into() }),
            ),
            (Enc::new(b'I').u32(16384).u8(b'N').tuple(&row).0, PgOutputMessage::Insert(Insert { rel: 16384, new: row.clone() })),
            (
                Enc::new(b'U').u32(16384).u8(b'N').tuple(&row).0,
                PgOutputMessage::Update(Update { rel: 16384, old: None, new: row.clone() }),
            ),
            (
                Enc::new(b'U').u32(16384).u8(b'K').tuple(&key).u8(b'N').tuple(&row).0,
                PgOutputMessage::Update(Update { rel: 16384, old: Some(OldTuple::Key(key.clone())), new: row.clone() }),
            ),
            (
                Enc::new(b'U').u32(16384).u8(b'O').tuple(&row).u8(b'N').tuple(&row).0,
                PgOutputMessage::Update(Update { rel: 16384, old: Some(OldTuple::Full(row.clone())), new: row.clone() }),
            ),
            (
                Enc::new(b'D').u32(16384).u8(b'K').tuple(&key).0,
                PgOutputMessage::Delete(Delete { rel: 16384, old: OldTuple::Key(key.clone()) }),
            ),
            (
                Enc::new(b'D').u32(16384).u8(b'O').tuple(&row).0,
                PgOutputMessage::Delete(Delete { rel: 16384, old: OldTuple::Full(row.clone()) }),
            ),
            (
                Enc::new(b'T').u32(2).u8(3).u32(16384).u32(16390).0,
                PgOutputMessage::Truncate(Truncate { options: 3, rels: vec![16384, 16390] }),
            ),
            (
                Enc::new(b'M').u8(1).u64(77).s("branchsync.apply").u32(3).bytes(&[0, 1, 0xff]).0,
                PgOutputMessage::Message(LogicalMessage {
                    flags: 1,
                    lsn: 77,
                    prefix: "branchsync.apply".into(),
                    content: vec![0, 1, 0xff],
                }),
            ),
            (
                Enc::new(b'I').u32(1).u8(b'N').tuple(&[]).0,
                PgOutputMessage::Insert(Insert { rel: 1, new: vec![] }),
            ),
        ]
    }

    #[test]
    fn every_message_type_decodes() {
        for (buf, want) in samples() {
            assert_eq!(decode(&buf), Ok(want), "buffer {buf:02x?}");
        }
    }

    #[test]
    fn begin_matches_the_documented_byte_layout() {
        // Written out byte by byte: 'B', final LSN 0/10, timestamp 1 µs, xid 2.
        let buf = [b'B', 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2];
        assert_eq!(decode(&buf), Ok(PgOutputMessage::Begin(Begin { final_lsn: 0x10, commit_ts: 1, xid: 2 })));
        // 'C', flags 0, commit LSN 0/10, end LSN 0/40, timestamp 1.
        let buf = [b'C', 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 1];
        let want = Commit { flags: 0, commit_lsn: 0x10, end_lsn: 0x40, commit_ts: 1 };
        assert_eq!(decode(&buf), Ok(PgOutputMessage::Commit(want)));
    }

    #[test]
    fn flags_and_options_are_interpreted() {
        let t = Truncate { options: 1, rels: vec![] };
        assert!(t.cascade() && !t.restart_identity());
        let t = Truncate { options: 2, rels: vec![] };
        assert!(!t.cascade() && t.restart_identity());
        let m = LogicalMessage { flags: 0, lsn: 0, prefix: String::new(), content: vec![] };
        assert!(!m.transactional());
        assert!(Column { flags: 1, name: String::new(), type_oid: 0, type_modifier: 0 }.is_key());
    }

    #[test]
    fn every_truncation_is_an_error_and_trailing_bytes_too() {
        for (buf, _) in samples() {
            for cut in 0..buf.len() {
                assert!(decode(&buf[..cut]).is_err(), "prefix of {cut} bytes of {buf:02x?} decoded");
            }
            let mut long = buf.clone();
            long.push(0);
            assert!(matches!(decode(&long), Err(DecodeError::TrailingBytes { count: 1, .. })), "{long:02x?}");
        }
    }

    #[test]
    fn malformed_fields_get_their_own_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(b"S"), Err(DecodeError::UnknownMessageType(b'S')));
        let bad_kind = Enc::new(b'I').u32(1).u8(b'N').i16(1).u8(b'x').0;
        assert!(matches!(decode(&bad_kind), Err(DecodeError::InvalidColumnKind { kind: b'x', .. })));
        let binary = Enc::new(b'I').u32(1).u8(b'N').i16(1).u8(b'b').u32(1).u8(7).0;
        assert!(matches!(decode(&binary), Err(DecodeError::BinaryValue { .. })));
        let bad_utf8 = Enc::new(b'I').u32(1).u8(b'N').i16(1).u8(b't').u32(2).bytes(&[0xc3, 0x28]).0;
        assert!(matches!(decode(&bad_utf8), Err(DecodeError::InvalidUtf8 { .. })));
        let negative = Enc::new(b'I').u32(1).u8(b'N').i16(-1).0;
        assert!(matches!(decode(&negative), Err(DecodeError::NegativeCount { count: -1, .. })));
        let marker = Enc::new(b'D').u32(1).u8(b'N').i16(0).0;
        assert!(matches!(decode(&marker), Err(DecodeError::UnexpectedTupleMarker { marker: b'N', .. })));
        let ident = Enc::new(b'R').u32(1).s("s").s("t").u8(b'z').i16(0).0;
        assert_eq!(decode(&ident), Err(DecodeError::InvalidReplicaIdentity(b'z')));
        let huge = Enc::new(b'M').u8(1).u64(1).s("p").u32(u32::MAX).0;
        assert!(matches!(decode(&huge), Err(DecodeError::Truncated { .. })));
        let many = Enc::new(b'T').u32(u32::MAX).u8(0).u32(1).0;
        assert!(matches!(decode(&many), Err(DecodeError::Truncated { .. })));
        let unterminated = Enc::new(b'O').u64(1).bytes(b"abc").0;
        assert!(matches!(decode(&unterminated), Err(DecodeError::UnterminatedString { .. })));
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let seed: u64 = std::env::var("PGOUTPUT_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::thread_rng().gen());
        println!("seed {seed} (set PGOUTPUT_FUZZ_SEED to replay)");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let tags = b"BCORYIUDTMSEcAbPKrpX";
        for _ in 0..50_000 {
            let len = rng.gen_range(0..48);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if let Some(first) = buf.first_mut() {
                *first = tags[rng.gen_range(0..tags.len())];
            }
            let _ = decode(&buf);
        }
        let samples = samples();
        for _ in 0..50_000 {
            let mut buf = samples[rng.gen_range(0..samples.len())].0.clone();
            for _ in 0..rng.gen_range(1..4) {
                match rng.gen_range(0..3) {
                    0 if !buf.is_empty() => {
                        let i = rng.gen_range(0..buf.len());
                        buf[i] = rng.gen();
                    }
                    1 if !buf.is_empty() => {
                        let i = rng.gen_range(0..buf.len());
                        buf.remove(i);
                    }
                    _ => {
                        let i = rng.gen_range(0..=buf.len());
                        buf.insert(i, rng.gen());
                    }
                }
            }
            let _ = decode(&buf);
        }
    }
}
