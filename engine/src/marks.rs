//! Marks: branchsync's own logical messages in the WAL, and how capture
//! knows they are branchsync's (R25).
//!
//! branchsync writes transactional logical messages into the WAL to say
//! who wrote a transaction (`branchsync.apply`), what schema change ran
//! (`branchsync.ddl`), and what the main decided (`branchsync.verdict`,
//! `branchsync.conflict`). `pg_logical_emit_message` is a function any role
//! may be able to call, so a message with one of these prefixes proves
//! nothing by itself: a till app's role could otherwise keep its own
//! transactions out of replication with a fake apply mark, or have a fake
//! schema change replayed at every shop.
//!
//! ```text
//!   content = body ++ tag                      (binary marks, written by the daemon)
//!           | json "\n" hex(tag)               (DDL marks, written by the event trigger)
//!   tag     = HMAC-SHA256(key, prefix 0x00 xid 0x00 body)     xid in decimal
//! ```
//!
//! * The **daemon key** (random, in the log's `meta`, never in the
//!   database) seals what apply writes: apply marks, verdicts, conflict
//!   records and the DDL messages of replayed schema changes. Code that runs
//!   inside an apply transaction (a trigger enabled `ALWAYS`) runs in the
//!   database and cannot read it.
//! * The **DDL key** (random, in `branchsync.mark_key`, readable only by
//!   its owner) seals what the `SECURITY DEFINER` event-trigger function
//!   writes for DDL that ran here. It is accepted only in transactions that
//!   do not run under a branchsync replication origin, so code running
//!   inside an apply transaction cannot use it to forge schema changes.
//! * Binding the tag to the transaction id makes a sealed mark worthless
//!   outside the transaction that wrote it.
//! * An apply mark counts only in a transaction under the replication
//!   origin of the author it names (only branchsync's role may set an
//!   origin).
//!
//! Capture ignores every mark that fails these checks: the transaction is
//! replicated as an ordinary one, the event is counted in `status` and
//! logged once per prefix as a warning.

use hmac::{KeyInit, Mac};

/// HMAC-SHA256.
type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of a tag.
pub const TAG_BYTES: usize = 32;

fn mac(key: &[u8], prefix: &str, xid: u32, body: &[u8]) -> HmacSha256 {
    // Any key length is accepted by HMAC; this never fails.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| <HmacSha256 as KeyInit>::new_from_slice(&[0u8; 32]).expect("a 32-byte key"));
    m.update(prefix.as_bytes());
    m.update(&[0]);
    m.update(xid.to_string().as_bytes());
    m.update(&[0]);
    m.update(body);
    m
}

/// Seals a binary mark of transaction `xid`: the body followed by its tag.
pub fn seal(key: &[u8], prefix: &str, xid: u32, body: &[u8]) -> Vec<u8> {
    let tag = mac(key, prefix, xid, body).finalize().into_bytes();
    let mut out = Vec::with_capacity(body.len() + TAG_BYTES);
    out.extend_from_slice(body);
    out.extend_from_slice(&tag);
    out
}

/// Seals a text mark (as the event trigger does): `body "\n" hex(tag)`.
pub fn seal_text(key: &[u8], prefix: &str, xid: u32, body: &str) -> String {
    let tag = mac(key, prefix, xid, body.as_bytes()).finalize().into_bytes();
    let mut out = String::with_capacity(body.len() + 1 + 2 * TAG_BYTES);
    out.push_str(body);
    out.push('\n');
    for b in tag.iter() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The body of a binary mark whose tag holds for `key`, `prefix` and
/// `xid`; `None` for anything else (compared in constant time).
pub fn open<'a>(key: &[u8], prefix: &str, xid: u32, content: &'a [u8]) -> Option<&'a [u8]> {
    let split = content.len().checked_sub(TAG_BYTES)?;
    let (body, tag) = content.split_at(split);
    mac(key, prefix, xid, body).verify_slice(tag).ok().map(|_| body)
}

/// The body of a text mark (`body "\n" hex(tag)`, as the event trigger
/// writes it) whose tag holds; `None` for anything else.
pub fn open_text<'a>(key: &[u8], prefix: &str, xid: u32, content: &'a [u8]) -> Option<&'a [u8]> {
    let nl = content.iter().rposition(|b| *b == b'\n')?;
    let (body, hex) = (&content[..nl], &content[nl + 1..]);
    if hex.len() != 2 * TAG_BYTES {
        return None;
    }
    let tag: Option<Vec<u8>> = hex.chunks(2).map(|p| std::str::from_utf8(p).ok().and_then(|s| u8::from_str_radix(s, 16).ok())).collect();
    mac(key, prefix, xid, body).verify_slice(&tag?).ok().map(|_| body)
}

/// The inner and outer padded keys of HMAC-SHA256 (block size 64), as the
/// event trigger's SQL computes `sha256(k_opad || sha256(k_ipad || m))`.
pub fn padded_keys(key: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        use sha2::Digest;
        let d = sha2::Sha256::digest(key);
        k[..32].copy_from_slice(&d);
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    (k.iter().map(|b| b ^ 0x36).collect(), k.iter().map(|b| b ^ 0x5c).collect())
}

/// A keyed digest of the rows a ChangeSet inserts, as sent and as written
/// (see [`RowsDigest`]), under the daemon key: code running inside an apply
/// transaction cannot compute it, so it cannot make a changed row pass for
/// the row that was sent.
#[derive(Clone)]
pub struct RowHasher {
    k0: u64,
    k1: u64,
}

impl RowHasher {
    /// The hasher of `key` (the daemon key that seals apply marks).
    pub fn new(key: &[u8]) -> RowHasher {
        use sha2::Digest;
        let mut d = sha2::Sha256::new();
        d.update(b"branchsync rows digest\0");
        d.update(key);
        let k = d.finalize();
        let word = |i: usize| u64::from_le_bytes(k[i..i + 8].try_into().unwrap_or([0; 8]));
        RowHasher { k0: word(0), k1: word(8) }
    }

    /// What a row's hash starts from for table `schema.name` with these
    /// columns (computed once per table).
    pub fn table(&self, schema: &str, name: &str, columns: &[String]) -> u64 {
        use std::hash::Hasher;
        let mut h = siphasher::sip::SipHasher13::new_with_keys(self.k0, self.k1);
        for part in [schema, name].into_iter().chain(columns.iter().map(String::as_str)) {
            h.write_usize(part.len());
            h.write(part.as_bytes());
        }
        h.finish()
    }

    /// The hash of one inserted row of the table hashed as `table`.
    pub fn row(&self, table: u64, values: &[branchsync_proto::Value]) -> u128 {
        use branchsync_proto::Value;
        use siphasher::sip128::Hasher128;
        use std::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher13::new_with_keys(self.k0, self.k1);
        h.write_u64(table);
        h.write_usize(values.len());
        for v in values {
            match v {
                Value::Null => h.write_u8(0),
                Value::Unchanged => h.write_u8(1),
                Value::Text(t) => {
                    h.write_u8(2);
                    h.write_usize(t.len());
                    h.write(t.as_bytes());
                }
            }
        }
        h.finish128().as_u128()
    }
}

/// The rows a ChangeSet inserts, as a multiset: the sum of their keyed
/// hashes ([`RowHasher::row`]) and their number. The main's apply puts the
/// digest of the rows a branch sent into the ChangeSet's apply mark; its
/// capture computes the digest of the rows it decodes for that ChangeSet:
/// equal digests mean the main wrote exactly what the branch sent (no
/// conflict decided, no trigger changed a value, no column added or left
/// out), and the branch is spared the echo's rows. A sum does not depend on
/// the order the rows were written in (the apply pipeline writes them table
/// by table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowsDigest {
    /// Wrapping sum of the rows' hashes, low and high 64 bits.
    pub sum: (u64, u64),
    /// Rows counted.
    pub rows: u64,
}

impl RowsDigest {
    /// Counts one row of hash `h`.
    pub fn add(&mut self, h: u128) {
        let sum = ((self.sum.1 as u128) << 64 | self.sum.0 as u128).wrapping_add(h);
        self.sum = (sum as u64, (sum >> 64) as u64);
        self.rows += 1;
    }

    /// Counts one inserted row of table `table` of `tables`, its hash start
    /// cached in `starts` (by table index); `false` when there is no such
    /// table.
    pub fn add_insert(&mut self, hasher: &RowHasher, starts: &mut Vec<Option<u64>>, tables: &[branchsync_proto::TableDesc], table: u32, new: &[branchsync_proto::Value]) -> bool {
        let i = table as usize;
        let Some(t) = tables.get(i) else { return false };
        if starts.len() <= i {
            starts.resize(i + 1, None);
        }
        let th = *starts[i].get_or_insert_with(|| hasher.table(&t.schema, &t.name, &t.columns));
        self.add(hasher.row(th, new));
        true
    }

    /// The digest of the inserts of `e` (`None` when it holds anything but
    /// inserts).
    pub fn of_inserts(hasher: &RowHasher, e: &branchsync_proto::LogEntry) -> Option<RowsDigest> {
        use branchsync_proto::RowChange;
        let mut starts = Vec::new();
        let mut d = RowsDigest::default();
        for ch in &e.changes {
            let RowChange::Insert { table, new } = ch else { return None };
            if !d.add_insert(hasher, &mut starts, &e.tables, *table, new) {
                return None;
            }
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// The digest of a ChangeSet's inserts does not depend on the order of
    /// its rows, and changes with any value, NULL against empty, a column
    /// name, the table, a row more, or the key.
    #[test]
    fn a_rows_digest_is_a_keyed_multiset_of_the_rows() {
        use branchsync_proto::{ChangeSetHeader, LogEntry, RowChange, TableDef, TableDesc, Value};
        let entry = |name: &str, column: &str, rows: &[Option<&str>]| {
            let header = ChangeSetHeader { author: "b".into(), author_index: 1, system_id: 1, commit_lsn: 1, commit_ts_us: 1, stamp: 1, seen_main_ts: 0 };
            let table = TableDesc::from(TableDef { schema: "public".into(), name: name.into(), columns: vec!["id".into(), column.into()], key: vec![true, false], identity_full: false });
            let changes = rows.iter().enumerate().map(|(i, v)| RowChange::Insert { table: 0, new: vec![Value::Text(i.to_string()), v.map_or(Value::Null, |t| Value::Text(t.into()))] }).collect();
            LogEntry { pos: 1, header, part: 0, last: true, tables: vec![table], changes, relay_ts_us: 0, echo_as_sent: false }
        };
        let h = RowHasher::new(KEY);
        let d = |e: &LogEntry| RowsDigest::of_inserts(&h, e).expect("inserts only");
        let base = d(&entry("sales", "note", &[Some("a"), Some("b"), None]));
        let mut reversed = entry("sales", "note", &[Some("a"), Some("b"), None]);
        reversed.changes.reverse();
        assert_eq!(d(&reversed), base);
        assert_eq!(base.rows, 3);
        for other in [
            entry("sales", "note", &[Some("a"), Some("B"), None]),
            entry("sales", "note", &[Some("a"), Some("b"), Some("")]),
            entry("sales", "memo", &[Some("a"), Some("b"), None]),
            entry("orders", "note", &[Some("a"), Some("b"), None]),
            entry("sales", "note", &[Some("a"), Some("b"), None, None]),
        ] {
            assert_ne!(d(&other), base);
        }
        let e = entry("sales", "note", &[Some("a"), Some("b"), None]);
        assert_ne!(RowsDigest::of_inserts(&RowHasher::new(b"another key"), &e), Some(base));
        let mut with_update = e.clone();
        with_update.changes.push(RowChange::Update { table: 0, old: None, new: vec![Value::Text("0".into()), Value::Null] });
        assert_eq!(RowsDigest::of_inserts(&h, &with_update), None, "only a ChangeSet that only inserts has a digest");
    }

    #[test]
    fn a_sealed_mark_opens_only_with_its_key_prefix_and_transaction() {
        let sealed = seal(KEY, "branchsync.apply", 77, b"header");
        assert_eq!(open(KEY, "branchsync.apply", 77, &sealed), Some(&b"header"[..]));
        assert_eq!(open(b"another key another key another!", "branchsync.apply", 77, &sealed), None);
        assert_eq!(open(KEY, "branchsync.verdict", 77, &sealed), None, "a mark cannot be moved to another prefix");
        assert_eq!(open(KEY, "branchsync.apply", 78, &sealed), None, "nor into another transaction");
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert_eq!(open(KEY, "branchsync.apply", 77, &flipped), None);
        assert_eq!(open(KEY, "branchsync.apply", 77, b"short"), None);
        assert_eq!(open(KEY, "branchsync.apply", 77, b""), None);
    }

    #[test]
    fn text_marks_open_with_a_hex_tag_after_the_last_newline() {
        let body = b"{\"query\": \"CREATE TABLE t ()\\n\"}";
        let tag = mac(KEY, "branchsync.ddl", 5, body).finalize().into_bytes();
        let mut content = body.to_vec();
        content.push(b'\n');
        content.extend(tag.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes());
        assert_eq!(open_text(KEY, "branchsync.ddl", 5, &content), Some(&body[..]));
        assert_eq!(open_text(KEY, "branchsync.ddl", 6, &content), None);
        assert_eq!(open_text(KEY, "branchsync.ddl", 5, body), None, "no tag at all");
        assert_eq!(open_text(KEY, "branchsync.ddl", 5, b"{}\nzz"), None);
    }

    #[test]
    fn sealed_text_opens() {
        let sealed = seal_text(KEY, "branchsync.ddl", 9, "{\"q\": 1}");
        assert_eq!(open_text(KEY, "branchsync.ddl", 9, sealed.as_bytes()), Some(&b"{\"q\": 1}"[..]));
    }

    #[test]
    fn padded_keys_reproduce_hmac() {
        use sha2::Digest;
        let (ipad, opad) = padded_keys(KEY);
        let msg = b"branchsync.ddl\x005\x00{}";
        let inner = sha2::Sha256::digest([ipad.as_slice(), msg].concat());
        let outer = sha2::Sha256::digest([opad.as_slice(), inner.as_slice()].concat());
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(KEY).unwrap();
        m.update(msg);
        assert_eq!(outer.as_slice(), m.finalize().into_bytes().as_slice());
    }
}
