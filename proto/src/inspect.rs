//! The inspection session: `branchsync verify` at a branch asks the main's
//! daemon about the main's copy of the replicated tables.
//!
//! ```text
//!  verify (at a branch)                                  main's daemon
//!    | --- Inspect{version, node, token} -------------------------> |
//!    | <-- Answer(Ready) or Refuse ----------------------------------- |
//!    | --- Ask(Tables | Shape | Buckets | Rows | Probe | Applied) --> |
//!    | <-- Answer(...) ----------------------------------------------- |
//! ```
//!
//! The session authenticates as the branch's own link does (the node's
//! token; with TLS, the certificate issued to that node) and is otherwise
//! apart from it: it never carries log entries and never moves progress.
//!
//! # What an `Ask` may make the main do
//!
//! Read replicated tables and its own progress, never anything else: an
//! `Ask` names a table and columns, never SQL. The main checks that the
//! table is one it replicates and that every column is one of the table's
//! before it quotes them into its own statements, so a stolen shop
//! credential reads at most what that shop's link already receives.

use serde::{Deserialize, Serialize};

/// First message of an inspection session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspect {
    /// Must equal [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The branch's node name.
    pub node: String,
    /// The branch's token.
    pub token: String,
}

impl std::fmt::Debug for Inspect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Inspect").field("protocol_version", &self.protocol_version).field("node", &self.node).finish()
    }
}

impl std::fmt::Debug for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are row values: never printed.
        match self {
            Ask::Tables => f.write_str("Tables"),
            Ask::Shape { table } => f.debug_struct("Shape").field("table", table).finish(),
            Ask::Buckets { scan } => f.debug_struct("Buckets").field("table", &scan.table).field("buckets", &scan.buckets).finish(),
            Ask::Rows { scan, pick, keys, values } => {
                f.debug_struct("Rows").field("table", &scan.table).field("pick", &pick.len()).field("keys", &keys.as_ref().map(Vec::len)).field("values", values).finish()
            }
            Ask::Probe => f.write_str("Probe"),
            Ask::Applied { pos, wait_ms } => f.debug_struct("Applied").field("pos", pos).field("wait_ms", wait_ms).finish(),
            Ask::Repair { table, keys } => f.debug_struct("Repair").field("table", table).field("keys", &keys.len()).finish(),
            Ask::JoinBegin => f.write_str("JoinBegin"),
            Ask::JoinCopy { table } => f.debug_struct("JoinCopy").field("table", table).finish(),
            Ask::JoinEnd => f.write_str("JoinEnd"),
        }
    }
}

/// A replicated table, by schema and name (unquoted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A table's columns as one site has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Every column, sorted by name.
    pub columns: Vec<String>,
    /// The primary key's columns in key order; empty for a keyless table
    /// (compared as a multiset of rows).
    pub key: Vec<String>,
}

/// What one scan of a table reads: these columns (the ones both sites
/// have), rows placed in `buckets` buckets by a hash of their key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    /// The table.
    pub table: TableName,
    /// Columns compared, sorted by name.
    pub columns: Vec<String>,
    /// Key columns (empty: the whole row is the key).
    pub key: Vec<String>,
    /// Number of buckets, a power of two.
    pub buckets: u32,
}

/// One bucket's summary: how many rows and the sum of their hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSum {
    /// Bucket number.
    pub bucket: u32,
    /// Rows in it.
    pub rows: i64,
    /// Sum of the rows' 64-bit hashes, as decimal text (no overflow).
    pub sum: String,
}

/// One key's rows in a bucket.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRows {
    /// The key, as canonical JSON text.
    pub key: String,
    /// Hash of the row (of one of them, for a keyless table: they are equal).
    pub hash: i64,
    /// Rows with this key (1 in a keyed table).
    pub count: i64,
    /// When asked for: a JSON object of each column's MD5 (of its canonical
    /// text), never the values.
    pub row: Option<String>,
}

impl std::fmt::Debug for KeyRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRows").field("hash", &self.hash).field("count", &self.count).finish()
    }
}

/// A question of `verify` to the main.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ask {
    /// The tables the main replicates.
    Tables,
    /// One table's columns and key.
    Shape { table: TableName },
    /// Every non-empty bucket's summary.
    Buckets { scan: Scan },
    /// The rows of the buckets `pick`; only those with one of `keys` when
    /// given; with each column's MD5 when `values`.
    Rows { scan: Scan, pick: Vec<u32>, keys: Option<Vec<String>>, values: bool },
    /// Everything committed at the main so far: once its capture has logged
    /// it, the newest position of the main's log.
    Probe,
    /// Wait up to `wait_ms` until the main has applied this branch's stream
    /// up to `pos`; answers the main's progress in it.
    Applied { pos: u64, wait_ms: u64 },
    /// Make this branch's rows of `table` with these keys (canonical JSON,
    /// as a scan lists them) equal to the main's: the main sends its rows
    /// (or their absence) as verdicts addressed to this branch, in its own
    /// stream, recorded in its `branchsync.conflicts` (kind `repaired`).
    Repair { table: TableName, keys: Vec<String> },
    /// `branchsync join`: hold a snapshot of the main's replicated tables
    /// whose relay position is exact, and describe it ([`JoinPoint`]). The
    /// main forgets its progress in this branch's stream (the joining branch
    /// starts a new log). A snapshot the main still holds for this branch
    /// from an earlier, interrupted join is described again, not replaced.
    JoinBegin,
    /// The rows of `table` in the held snapshot, in `COPY` text format:
    /// answered with [`Answer::CopyData`] pieces, then [`Answer::CopyDone`].
    JoinCopy { table: TableName },
    /// The branch has every table: the main lets the snapshot go.
    JoinEnd,
}

/// Where a joining branch starts: the main's snapshot and the relay
/// position that follows it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinPoint {
    /// The snapshot's consistent point in the main's WAL: every transaction
    /// that committed before it is in the snapshot, none after.
    pub snapshot_lsn: u64,
    /// The last relay position whose transaction committed before
    /// `snapshot_lsn`: the branch follows the relay after it.
    pub relay_pos: u64,
    /// Commit LSN (the author's) of the entry at `relay_pos`, 0 for none.
    pub relay_lsn: u64,
    /// Identity of the main's relay log.
    pub relay_epoch: u64,
    /// The main's cluster.
    pub main_system_id: u64,
    /// The main's schema as of the snapshot (`pg_dump --schema-only`, the
    /// `branchsync` schema and its event triggers left out), to create at a
    /// branch whose database is empty.
    pub schema_sql: String,
    /// The replicated tables, with the columns copied.
    pub tables: Vec<JoinTable>,
    /// The snapshot was held from an earlier run of this branch's join.
    pub resumed: bool,
}

/// A table to copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTable {
    /// The table.
    pub table: TableName,
    /// Columns copied (not generated ones), in the order of the data.
    pub columns: Vec<String>,
    /// The main's estimate of its rows and bytes (for progress).
    pub rows_estimate: u64,
    pub bytes_estimate: u64,
}

/// Rows in `COPY` text format (never printed).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyBytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for CopyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CopyBytes({} bytes)", self.0.len())
    }
}

/// The main's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The session is authenticated; the main's node name.
    Ready { main_node: String },
    /// [`Ask::Tables`].
    Tables(Vec<TableName>),
    /// [`Ask::Shape`]: `None` when the main has no such replicated table.
    Shape(Option<Shape>),
    /// [`Ask::Buckets`].
    Buckets(Vec<BucketSum>),
    /// [`Ask::Rows`].
    Rows(Vec<KeyRows>),
    /// [`Ask::Probe`]: the main's log holds everything committed before the
    /// probe at positions up to `log_newest`.
    Probed { log_newest: u64 },
    /// [`Ask::Applied`]: the main's durable progress in the branch's stream.
    Applied { pos: u64 },
    /// [`Ask::Repair`]: verdicts sent (rows the main has, and rows it has not).
    Repaired { present: u64, absent: u64 },
    /// [`Ask::JoinBegin`].
    JoinReady(Box<JoinPoint>),
    /// A piece of a table's rows ([`Ask::JoinCopy`]).
    CopyData(CopyBytes),
    /// The table is whole: rows and bytes sent.
    CopyDone { rows: u64, bytes: u64 },
    /// [`Ask::JoinEnd`].
    JoinEnded,
    /// The main could not answer (PostgreSQL style: message, detail, hint).
    Failed { message: String, detail: String, hint: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    #[test]
    fn inspection_messages_round_trip_and_never_print_keys() {
        let scan = Scan { table: TableName { schema: "public".into(), name: "orders".into() }, columns: vec!["id".into()], key: vec!["id".into()], buckets: 64 };
        let msgs = vec![
            Message::Inspect(Inspect { protocol_version: crate::PROTOCOL_VERSION, node: "branch1".into(), token: "t".into() }),
            Message::Ask(Ask::Rows { scan: scan.clone(), pick: vec![3], keys: Some(vec!["{\"id\": 77}".into()]), values: true }),
            Message::Ask(Ask::Applied { pos: 9, wait_ms: 100 }),
            Message::Answer(Answer::Rows(vec![KeyRows { key: "{\"id\": 77}".into(), hash: -5, count: 1, row: Some("{\"price\": 991}".into()) }])),
            Message::Answer(Answer::Buckets(vec![BucketSum { bucket: 1, rows: 2, sum: "18446744073709551615".into() }])),
            Message::Answer(Answer::CopyData(CopyBytes(b"77\t991\n".to_vec()))),
        ];
        for m in msgs {
            let b = rmp_serde::to_vec(&m).unwrap();
            let back: Message = rmp_serde::from_slice(&b).unwrap();
            assert_eq!(m, back);
            let shown = format!("{m:?}");
            assert!(!shown.contains("77") && !shown.contains("991"), "{shown}");
        }
    }
}
