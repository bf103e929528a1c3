//! ChangeSets: one committed transaction of one author.
//!
//! A ChangeSet travels and is stored as one or more [`LogEntry`] fragments
//! so that a transaction of a million rows never has to sit in memory whole:
//! every fragment repeats the [`ChangeSetHeader`], carries the tables its
//! rows refer to, and the final fragment has `last = true`. A receiver
//! applies all fragments of a ChangeSet in one local transaction and commits
//! at the last one.
//!
//! # Identity
//!
//! A change is identified by its author node, the author database's system
//! identifier and the author's commit LSN (DESIGN R4). `pos` is the position
//! of the fragment in the *sender's* log; a receiver's durable progress is
//! the `pos` of the last fragment it committed.

use serde::{Deserialize, Serialize};

/// Who wrote a ChangeSet, when, and where it sits in the author's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSetHeader {
    /// Name of the node whose application committed the transaction.
    pub author: String,
    /// Node index of the author (its key stripe).
    pub author_index: u32,
    /// `system_identifier` of the author's PostgreSQL cluster.
    pub system_id: u64,
    /// Commit LSN of the transaction in the author's WAL.
    pub commit_lsn: u64,
    /// Commit time at the author, microseconds since the Unix epoch.
    pub commit_ts_us: i64,
    /// Hybrid logical clock stamp given at capture: the commit time corrected
    /// by the author's measured clock offset (R14), raised above every stamp
    /// the author had seen; orders concurrent versions for last-writer-wins
    /// (ties broken by author name).
    pub stamp: u64,
    /// Causal context (R15) of a branch's ChangeSet: the main's commit time
    /// (µs, the main's clock) of the last relay entry the branch had applied
    /// when it committed. A version the main committed at or before it was
    /// seen by this change. 0 for the main's own ChangeSets.
    #[serde(default)]
    pub seen_main_ts: i64,
}

/// A table as the author saw it: columns are matched by name at the receiver.
///
/// Every entry carries the descriptions of its tables, and a catch-up
/// decodes hundreds of thousands of entries of the same few tables: a
/// description is shared ([`TableDef`] behind an `Arc`, cloned without
/// copying), and one decoded from the wire is looked up among those this
/// thread decoded before (by name, then compared field by field) instead of
/// being allocated again. Equality and the encoding are the [`TableDef`]'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDesc(std::sync::Arc<TableDef>);

/// The fields of a [`TableDesc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDef {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub name: String,
    /// Column names in the author's attribute order (generated columns excluded).
    pub columns: Vec<String>,
    /// For each column, whether it is part of the author's replica identity key.
    pub key: Vec<bool>,
    /// The author's table has `REPLICA IDENTITY FULL` (a multiset without a key).
    pub identity_full: bool,
}

impl TableDesc {
    /// `schema.name`, quoted for SQL.
    pub fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// The fields, to change this description alone (copied first when
    /// it is shared).
    pub fn def_mut(&mut self) -> &mut TableDef {
        std::sync::Arc::make_mut(&mut self.0)
    }
}

impl From<TableDef> for TableDesc {
    fn from(def: TableDef) -> TableDesc {
        TableDesc(std::sync::Arc::new(def))
    }
}

impl std::ops::Deref for TableDesc {
    type Target = TableDef;
    fn deref(&self) -> &TableDef {
        &self.0
    }
}

impl Serialize for TableDesc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for TableDesc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TableDesc, D::Error> {
        let wire = intern::WireDef::deserialize(d)?;
        Ok(intern::table(wire))
    }
}

/// The descriptions this thread decoded, by table name.
mod intern {
    use std::borrow::Cow;
    use std::cell::RefCell;
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer};

    use super::{TableDef, TableDesc};

    /// At most this many bytes of descriptions are kept per thread (then
    /// the cache starts over): a schema's tables and their recent shapes
    /// fit, and a peer sending ever new descriptions cannot make a thread
    /// hold more.
    pub(super) const KEPT_BYTES: usize = 4 << 20;

    /// A description larger than this is not kept (it is decoded each
    /// time, as before): no table has one, a forged entry may.
    const KEPT_ONE_BYTES: usize = 64 << 10;

    thread_local! {
        pub(super) static SEEN: RefCell<(usize, HashMap<String, Vec<TableDesc>>)> = RefCell::new((0, HashMap::new()));
    }

    /// About how many bytes `d` holds.
    fn bytes(d: &TableDef) -> usize {
        64 + d.schema.len() + d.name.len() + d.columns.iter().map(|c| 24 + c.len()).sum::<usize>() + d.key.len()
    }

    /// A name as it is on the wire: borrowed from the input when it can be.
    pub(super) struct Name<'a>(Cow<'a, str>);

    impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name<'a>, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Name<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a name")
                }
                fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Borrowed(v)))
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Owned(v.to_string())))
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Owned(v)))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// A [`TableDef`] as decoded, before it is looked up.
    #[derive(Deserialize)]
    pub(super) struct WireDef<'a> {
        #[serde(borrow)]
        schema: Name<'a>,
        #[serde(borrow)]
        name: Name<'a>,
        #[serde(borrow)]
        columns: Vec<Name<'a>>,
        key: Vec<bool>,
        identity_full: bool,
    }

    impl WireDef<'_> {
        fn is(&self, d: &TableDef) -> bool {
            d.schema == *self.schema.0
                && d.identity_full == self.identity_full
                && d.key == self.key
                && d.columns.len() == self.columns.len()
                && d.columns.iter().zip(&self.columns).all(|(a, b)| *a == *b.0)
        }
    }

    /// The description `wire` decodes to: one seen before on this thread,
    /// or a new one (then kept).
    pub(super) fn table(wire: WireDef<'_>) -> TableDesc {
        SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            if let Some(d) = seen.1.get(&*wire.name.0).and_then(|v| v.iter().find(|d| wire.is(d))) {
                return d.clone();
            }
            let d = TableDesc::from(TableDef {
                schema: wire.schema.0.into_owned(),
                name: wire.name.0.into_owned(),
                columns: wire.columns.into_iter().map(|c| c.0.into_owned()).collect(),
                key: wire.key,
                identity_full: wire.identity_full,
            });
            let size = bytes(&d);
            if size > KEPT_ONE_BYTES {
                return d;
            }
            if seen.0 + size > KEPT_BYTES {
                *seen = (0, HashMap::new());
            }
            seen.0 += size;
            seen.1.entry(d.name.clone()).or_default().push(d.clone());
            d
        })
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// One column value, always as text (DESIGN R10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value that the author did not send (pgoutput 'u'):
    /// the receiver leaves its own value alone (R12).
    Unchanged,
    /// The value's text representation.
    Text(String),
}

impl Value {
    /// The text, or `None` for NULL and unchanged values.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// The old version of a row sent with an UPDATE or DELETE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldRow {
    /// `true`: the whole old row (`REPLICA IDENTITY FULL`); `false`: only the
    /// key columns are set, the others are NULL.
    pub full: bool,
    /// One value per column of the table.
    pub values: Vec<Value>,
}

/// One row change; `table` indexes [`LogEntry::tables`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RowChange {
    /// A new row.
    Insert { table: u32, new: Vec<Value> },
    /// A changed row; `old` is present when the key changed or the table has
    /// `REPLICA IDENTITY FULL`.
    Update { table: u32, old: Option<OldRow>, new: Vec<Value> },
    /// A removed row.
    Delete { table: u32, old: OldRow },
    /// TRUNCATE of one or more tables (replicated only where a table opts in, R21).
    Truncate { tables: Vec<u32>, cascade: bool, restart_identity: bool },
    /// A schema change, exactly where it ran among the rows (DESIGN
    /// invariant 5): the receiver runs it before the changes that follow.
    Ddl(DdlChange),
    /// The main's decision about a change of the ChangeSet's author whose
    /// result differs from what the author holds: the row as it must be at
    /// the author. Sent to the author only.
    Verdict(Verdict),
    /// A conflict the main recorded while applying this ChangeSet; every
    /// node keeps the same record.
    Conflict(ConflictRecord),
}

/// The main's result for one row of a branch's change (see
/// [`RowChange::Verdict`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Index into [`LogEntry::tables`].
    pub table: u32,
    /// The key column values, in the table's column order (other columns NULL).
    pub key: Vec<Value>,
    /// The row as the main holds it (one value per column), or `None` when
    /// the row does not exist at the main.
    pub row: Option<Vec<Value>>,
    /// Commit time (author's clock, µs) of the author's change this decides:
    /// a newer local change of the same row at the author is left alone (it
    /// is decided later).
    pub for_commit_ts: i64,
    /// The one node this verdict is for; `None`: the author of the
    /// ChangeSet it belongs to. A repair (`verify --repair`) names the
    /// branch it repairs: the verdict travels in a ChangeSet of the main's.
    #[serde(default)]
    pub to: Option<String>,
}

/// A conflict record as the main wrote it in `branchsync.conflicts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// The main's id of the record.
    pub id: i64,
    /// `schema.table`.
    pub table: String,
    /// Key text (JSON array of the key values), if the table has a key.
    pub key: Option<String>,
    /// Kind: `update_update`, `update_delete`, `insert_insert`, ...
    pub kind: String,
    /// Rule applied.
    pub rule: String,
    /// Node whose version won.
    pub winner: Option<String>,
    /// Node whose version lost.
    pub loser: Option<String>,
    /// The version the main held (JSON).
    pub local_version: Option<String>,
    /// The incoming version (JSON).
    pub remote_version: Option<String>,
    /// What happened, in words.
    pub detail: Option<String>,
    /// When the main recorded it (µs since the Unix epoch).
    pub at_us: i64,
}

/// One DDL query string of the author, reduced to its DDL statements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlChange {
    /// The DDL statements of the query string, in order, one per element.
    /// DML that ran in the same string is not here: it travels as rows.
    pub statements: Vec<String>,
    /// `search_path` when the DDL ran at the author.
    pub search_path: String,
    /// The role that ran it at the author.
    pub role: String,
    /// Command tag of the first command, e.g. `CREATE TABLE`.
    pub tag: String,
}

/// A fragment of a ChangeSet as stored in a log and sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the sender's log (strictly increasing).
    pub pos: u64,
    /// The ChangeSet this fragment belongs to.
    pub header: ChangeSetHeader,
    /// Fragment number within the ChangeSet, from 0.
    pub part: u32,
    /// This is the final fragment: the receiver commits after it.
    pub last: bool,
    /// Tables referred to by `changes`.
    pub tables: Vec<TableDesc>,
    /// The row changes, in the author's order.
    pub changes: Vec<RowChange>,
    /// In the main's relay: the newest commit time (µs, the main's clock) of
    /// the main's log up to the transaction this fragment came from (a
    /// running maximum, so it never decreases along the relay). A branch
    /// that applied it has seen everything the main committed until then
    /// (R15). 0 elsewhere.
    #[serde(default)]
    pub relay_ts_us: i64,
    /// In the main's relay: the main wrote the rows of this ChangeSet (one
    /// fragment, inserts only) exactly as its author sent them. The author
    /// holds them already and takes its echo without reading them (at the
    /// other branches the entry is an ordinary one). `false` elsewhere.
    #[serde(default)]
    pub echo_as_sent: bool,
}

impl LogEntry {
    /// Number of row changes in this fragment (a TRUNCATE counts once).
    pub fn row_count(&self) -> usize {
        self.changes.len()
    }
}

/// Version byte in front of every stored or sent entry.
pub const ENTRY_FORMAT_VERSION: u8 = 1;

/// Largest encoded entry anyone stores, sends or accepts: below
/// PostgreSQL's 1 GB limit for one value, so a row that PostgreSQL could
/// hand over always fits, with room for its header.
pub const MAX_ENTRY_BYTES: u64 = 1000 * 1024 * 1024;

/// Why an entry's bytes are not an entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// Nothing there.
    #[error("empty log entry")]
    Empty,
    /// Written by another (newer) version of branchsync.
    #[error("log entry has format version {found}, expected {ENTRY_FORMAT_VERSION}")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// The bytes do not decode.
    #[error("undecodable log entry: {source}")]
    Malformed {
        #[source]
        source: rmp_serde::decode::Error,
    },
    /// An entry could not be encoded.
    #[error("cannot encode log entry: {source}")]
    Encode {
        #[source]
        source: rmp_serde::encode::Error,
    },
    /// The writer an entry was encoded into failed.
    #[error("cannot write log entry: {source}")]
    Write {
        #[source]
        source: std::io::Error,
    },
}

impl EntryError {
    /// The I/O error underneath, if writing (not encoding) failed.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            EntryError::Write { source } => Some(source),
            EntryError::Encode { source: rmp_serde::encode::Error::InvalidValueWrite(w) } => match w {
                rmp::encode::ValueWriteError::InvalidMarkerWrite(e) | rmp::encode::ValueWriteError::InvalidDataWrite(e) => Some(e),
            },
            _ => None,
        }
    }
}

/// One thing wrong with a decoded entry: which change (`None`: the entry as
/// a whole) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Index into [`LogEntry::changes`], or `None` for the entry itself.
    pub change: Option<usize>,
    /// What is wrong, as a sentence fragment.
    pub reason: String,
}

impl LogEntry {
    /// Encodes the entry with its format version byte.
    pub fn encode(&self) -> Result<Vec<u8>, EntryError> {
        let mut out = Vec::with_capacity(64 + self.approx_bytes());
        self.encode_into(&mut out)?;
        Ok(out)
    }

    /// Encodes the entry with its format version byte into a writer (so a
    /// large entry can be streamed to a file without a copy in memory).
    pub fn encode_into<W: std::io::Write>(&self, w: &mut W) -> Result<(), EntryError> {
        w.write_all(&[ENTRY_FORMAT_VERSION]).map_err(|source| EntryError::Write { source })?;
        rmp_serde::encode::write(w, self).map_err(|source| EntryError::Encode { source })
    }

    /// Decodes an entry, checking its format version byte. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<LogEntry, EntryError> {
        match bytes.split_first() {
            Some((&ENTRY_FORMAT_VERSION, body)) => rmp_serde::from_slice(body).map_err(|source| EntryError::Malformed { source }),
            Some((v, _)) => Err(EntryError::Version { found: *v }),
            None => Err(EntryError::Empty),
        }
    }

    /// Roughly the encoded size: the values' bytes plus a little per value
    /// (used to cut fragments and batches by size, never for limits).
    pub fn approx_bytes(&self) -> usize {
        self.changes.iter().map(RowChange::approx_bytes).sum::<usize>() + 64 * self.tables.len()
    }

    /// Checks the entry's structure against itself: every table index in
    /// range, every row as wide as its table, keys as wide as their
    /// tables. Returns every problem found (empty: the entry is sound). A
    /// receiver quarantines the changes named and applies the rest.
    pub fn check(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if self.header.author.is_empty() {
            out.push(Invalid { change: None, reason: "the header names no author".into() });
        }
        let mut sound_table = Vec::with_capacity(self.tables.len());
        for (i, t) in self.tables.iter().enumerate() {
            let ok = t.key.len() == t.columns.len() && !t.name.is_empty() && !t.schema.is_empty();
            if !ok {
                out.push(Invalid { change: None, reason: format!("table description {i} is malformed ({} columns, {} key flags)", t.columns.len(), t.key.len()) });
            }
            sound_table.push(ok);
        }
        let width = |t: u32| -> Result<usize, String> {
            match self.tables.get(t as usize) {
                None => Err(format!("table index {t} is out of range ({} tables)", self.tables.len())),
                Some(_) if !sound_table[t as usize] => Err(format!("table description {t} is malformed")),
                Some(d) => Ok(d.columns.len()),
            }
        };
        let row = |what: &str, got: usize, want: usize| -> Result<(), String> {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what} has {got} values for {want} columns"))
            }
        };
        for (i, ch) in self.changes.iter().enumerate() {
            let r: Result<(), String> = match ch {
                RowChange::Insert { table, new } => width(*table).and_then(|w| row("the new row", new.len(), w)),
                RowChange::Update { table, old, new } => width(*table).and_then(|w| {
                    row("the new row", new.len(), w)?;
                    match old {
                        Some(o) => row("the old row", o.values.len(), w),
                        None => Ok(()),
                    }
                }),
                RowChange::Delete { table, old } => width(*table).and_then(|w| row("the old row", old.values.len(), w)),
                RowChange::Truncate { tables, .. } => tables.iter().try_for_each(|t| width(*t).map(|_| ())),
                RowChange::Verdict(v) => width(v.table).and_then(|w| {
                    row("the verdict's key", v.key.len(), w)?;
                    match &v.row {
                        Some(r) => row("the verdict's row", r.len(), w),
                        None => Ok(()),
                    }
                }),
                RowChange::Ddl(d) => {
                    if d.statements.is_empty() {
                        Err("the schema change holds no statement".into())
                    } else {
                        Ok(())
                    }
                }
                RowChange::Conflict(_) => Ok(()),
            };
            if let Err(reason) = r {
                out.push(Invalid { change: Some(i), reason });
            }
        }
        out
    }
}

impl RowChange {
    /// Roughly the encoded size of the change (see [`LogEntry::approx_bytes`]).
    pub fn approx_bytes(&self) -> usize {
        fn vals(v: &[Value]) -> usize {
            v.iter().map(|x| 2 + x.as_text().map_or(0, str::len)).sum()
        }
        8 + match self {
            RowChange::Insert { new, .. } => vals(new),
            RowChange::Update { old, new, .. } => vals(new) + old.as_ref().map_or(0, |o| vals(&o.values)),
            RowChange::Delete { old, .. } => vals(&old.values),
            RowChange::Truncate { tables, .. } => 4 * tables.len(),
            RowChange::Ddl(d) => d.statements.iter().map(String::len).sum::<usize>() + d.search_path.len() + d.role.len() + d.tag.len(),
            RowChange::Verdict(v) => vals(&v.key) + v.row.as_ref().map_or(0, |r| vals(r)),
            RowChange::Conflict(c) => {
                c.local_version.as_ref().map_or(0, String::len) + c.remote_version.as_ref().map_or(0, String::len) + c.detail.as_ref().map_or(0, String::len) + 64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries of one table decoded on one thread share one description;
    /// a table of another shape, or another table, gets its own; what is
    /// decoded equals what was encoded, from MessagePack and from JSON
    /// (whose escaped names cannot be borrowed from the input).
    #[test]
    fn decoded_entries_share_the_description_of_their_table() {
        let a = LogEntry::decode(&sample_entry(1).encode().unwrap()).unwrap();
        let b = LogEntry::decode(&sample_entry(2).encode().unwrap()).unwrap();
        assert_eq!(a.tables, sample_entry(1).tables);
        assert!(std::sync::Arc::ptr_eq(&a.tables[0].0, &b.tables[0].0), "the second entry reused the first one's description");
        let mut other = sample_entry(3);
        other.tables[0].def_mut().columns[2] = "remark".into();
        let c = LogEntry::decode(&other.encode().unwrap()).unwrap();
        assert_eq!(c.tables[0].columns[2], "remark");
        assert!(!std::sync::Arc::ptr_eq(&a.tables[0].0, &c.tables[0].0));
        assert_eq!(LogEntry::decode(&sample_entry(4).encode().unwrap()).unwrap().tables[0].columns[2], "note", "the other shape did not replace the first");
        let mut quoted = sample_entry(5).tables[0].clone();
        quoted.def_mut().name = "say \"hi\"\n".into();
        let json = serde_json::to_string(&quoted).unwrap();
        let back: TableDesc = serde_json::from_str(&json).unwrap();
        assert_eq!(back, quoted);
    }

    /// A peer sending ever new descriptions, or huge ones, cannot make a
    /// thread keep more than the cache's bound: a huge description is
    /// decoded each time, not kept; many distinct ones start the cache over.
    #[test]
    fn the_descriptions_a_thread_keeps_are_bounded_in_bytes() {
        let mut huge = sample_entry(1);
        huge.tables[0].def_mut().columns = (0..20_000).map(|i| format!("column_{i}")).collect();
        huge.tables[0].def_mut().key = vec![false; 20_000];
        let a = LogEntry::decode(&huge.encode().unwrap()).unwrap();
        let b = LogEntry::decode(&huge.encode().unwrap()).unwrap();
        assert_eq!(a.tables, b.tables);
        assert!(!std::sync::Arc::ptr_eq(&a.tables[0].0, &b.tables[0].0), "a huge description is not kept");
        for i in 0..20_000 {
            let mut e = sample_entry(i);
            e.tables[0].def_mut().name = format!("table_{i}");
            LogEntry::decode(&e.encode().unwrap()).unwrap();
            let kept = intern::SEEN.with(|s| s.borrow().0);
            assert!(kept <= intern::KEPT_BYTES, "{kept} bytes kept after {i} tables");
        }
    }

    pub(crate) fn sample_entry(pos: u64) -> LogEntry {
        LogEntry {
            pos,
            header: ChangeSetHeader {
                author: "branch1".into(),
                author_index: 1,
                system_id: 7_000_000_000_000_000_001,
                commit_lsn: 0x1_6B37_4D48,
                commit_ts_us: 1_700_000_000_000_000,
                stamp: 1_700_000_000_000_001,
                seen_main_ts: 1_699_999_999_000_000,
            },
            part: 0,
            last: true,
            tables: vec![TableDesc::from(TableDef {
                schema: "public".into(),
                name: "order line".into(),
                columns: vec!["id".into(), "qty".into(), "note".into()],
                key: vec![true, false, false],
                identity_full: false,
            })],
            changes: vec![
                RowChange::Insert {
                    table: 0,
                    new: vec![Value::Text("101".into()), Value::Text("3".into()), Value::Null],
                },
                RowChange::Update {
                    table: 0,
                    old: None,
                    new: vec![Value::Text("101".into()), Value::Text("4".into()), Value::Unchanged],
                },
                RowChange::Delete {
                    table: 0,
                    old: OldRow {
                        full: false,
                        values: vec![Value::Text("101".into()), Value::Null, Value::Null],
                    },
                },
                RowChange::Verdict(Verdict {
                    table: 0,
                    key: vec![Value::Text("101".into()), Value::Null, Value::Null],
                    row: Some(vec![Value::Text("101".into()), Value::Text("5".into()), Value::Null]),
                    for_commit_ts: 1_700_000_000_000_000, to: None,
                }),
                RowChange::Conflict(ConflictRecord {
                    id: 7,
                    table: "public.order line".into(),
                    key: Some("[\"101\"]".into()),
                    kind: "update_update".into(),
                    rule: "lww".into(),
                    winner: Some("main".into()),
                    loser: Some("branch1".into()),
                    local_version: Some("{}".into()),
                    remote_version: None,
                    detail: None,
                    at_us: 1_700_000_000_000_002,
                }),
            ],
            relay_ts_us: 1_700_000_000_000_003,
            echo_as_sent: false,
        }
    }

    #[test]
    fn a_verdict_written_before_repairs_had_an_addressee_still_decodes() {
        // The entry format before `Verdict::to`: the same fields, one fewer.
        #[derive(Serialize)]
        struct Before {
            table: u32,
            key: Vec<Value>,
            row: Option<Vec<Value>>,
            for_commit_ts: i64,
        }
        let old = rmp_serde::to_vec(&Before { table: 2, key: vec![Value::Text("7".into())], row: None, for_commit_ts: 5 }).unwrap();
        let v: Verdict = rmp_serde::from_slice(&old).unwrap();
        assert_eq!(v, Verdict { table: 2, key: vec![Value::Text("7".into())], row: None, for_commit_ts: 5, to: None });
    }

    #[test]
    fn log_entry_round_trips_through_messagepack() {
        let e = sample_entry(42);
        let bytes = rmp_serde::to_vec(&e).unwrap();
        let back: LogEntry = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(e, back);
    }

    #[test]
    fn entries_round_trip_through_their_stored_form_and_refuse_other_versions() {
        let e = sample_entry(9);
        assert_eq!(LogEntry::decode(&e.encode().unwrap()).unwrap(), e);
        assert!(matches!(LogEntry::decode(&[9, 1, 2]), Err(EntryError::Version { found: 9 })));
        assert!(matches!(LogEntry::decode(&[]), Err(EntryError::Empty)));
        assert!(matches!(LogEntry::decode(&[ENTRY_FORMAT_VERSION, 0xc1]), Err(EntryError::Malformed { .. })));
        assert!(e.approx_bytes() > 0);
    }

    #[test]
    fn check_names_each_change_that_does_not_fit_its_table() {
        let mut e = sample_entry(1);
        assert!(e.check().is_empty(), "{:?}", e.check());
        e.changes.push(RowChange::Insert { table: 7, new: vec![] });
        e.changes.push(RowChange::Insert { table: 0, new: vec![Value::Null] });
        e.changes.push(RowChange::Delete { table: 0, old: OldRow { full: true, values: vec![Value::Null; 4] } });
        e.changes.push(RowChange::Truncate { tables: vec![0, 3], cascade: false, restart_identity: false });
        let bad: Vec<Option<usize>> = e.check().iter().map(|i| i.change).collect();
        let n = e.changes.len();
        assert_eq!(bad, vec![Some(n - 4), Some(n - 3), Some(n - 2), Some(n - 1)]);
        assert!(e.check()[0].reason.contains("out of range"), "{:?}", e.check());
        e.tables[0].def_mut().key.pop();
        assert!(e.check().iter().any(|i| i.change.is_none() && i.reason.contains("malformed")));
    }

    #[test]
    fn quoted_names_escape_double_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(sample_entry(1).tables[0].qualified(), "\"public\".\"order line\"");
    }
}
