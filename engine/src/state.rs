//! Branchsync's own state inside the application database: the schema
//! `branchsync`, which is never published (R2) and never touched by the ERP.
//!
//! * `node` — who this database belongs to (name, index, role, stride).
//! * `progress` — the receiver's durable progress per incoming stream,
//!   written in the same transaction as the applied rows (R4).
//! * `row_version` — the version of every row apply wrote, keyed by table
//!   and primary key (R13): stamp, author, the author's commit time (`ts`),
//!   this node's clock when it was written (`local_ts`), the node that
//!   inserted the row, and for deletes (tombstones, kept for the retention
//!   window) the deleted row. At the main, a row some of whose columns were
//!   written apart since its last whole write also holds the versions of
//!   those columns (`cols`: name → `[stamp, node, local_ts]`) and the
//!   version of the others (`base`): a clash is decided against the
//!   column's last writer, not the row's ([`crate::conflict::merge`]).
//!   Application tables get no column. Capture adds tombstones of local
//!   deletes.
//! * `insert_versions` — at the main: the versions of rows the apply
//!   pipeline inserted, packed, one record per apply transaction, table,
//!   author and up to [`PACKED_VERSION_KEYS`] rows (their keys, stamps and
//!   author commit times, in arrays), found again through the rows' `xmin`.
//!   A row version per inserted row was the largest cost of a catch-up
//!   (an index entry and a WAL record for every row). A record speaks for a
//!   row only while the row's `xmin` is the transaction that wrote it, and
//!   only when `row_version` holds nothing newer for it (see
//!   [`crate::apply`]'s `read_current`); records older than the retention
//!   are dropped with the tombstones ([`drop_expired_versions`]).
//! * `clock_offsets` — at a branch: its database clock minus the main's, as
//!   measured at each handshake, by the local time it took effect (R14).
//! * `key_merges` — at the main: rows folded into another by
//!   `on_unique_conflict = "merge"`; later references to them are re-pointed.
//! * `conflicts` — every version a conflict decision discarded, and every
//!   change that could not be applied, with the reason.
//! * `relay_head` — at the main: the last log position capture reached, so
//!   that a branch seeded from a copy of the main knows where the relay
//!   stream resumes for it.
//! * `scope` — the replicated schemas and exclude globs (as regular
//!   expressions), written by `init`, read by the event triggers
//!   ([`crate::ddl::triggers`]).
//! * `ddl_log` — every schema change run here, by the ERP (`replayed =
//!   false`) or replayed from a peer (`true`).
//! * `column_renames`, `table_renames` — renames made here, so rows from an
//!   author that had not seen them yet still find their columns (R20);
//!   `known_tables` and `known_columns` are the snapshot they are detected
//!   against.
//! * `schema_version` — bumped, transactionally, by every schema change in
//!   scope; apply reloads its view of the tables when it moved.
//! * `node.log_epoch` — the identity of the log in `data_dir` that belongs to
//!   this database (R26); `progress.epoch` — the identity of the sender's
//!   log a stream's progress counts in.
//! * `retired_log` — at the main: the logs a `branchsync join` replaced
//!   (stream, epoch, when). The main refuses a branch that sends from one
//!   again, so a join run with a shop's stolen credentials cannot make the
//!   real shop's old log be applied a second time from its start.
//! * `mark_key` — the key the event triggers seal their DDL marks with
//!   (R25), readable only by its owner; a copy of another node's database
//!   gets a new one at `init`.
//! * `relay_suppress` — at a main whose database was restored from a backup
//!   (`init --restored`): the branch ChangeSets its relay log already holds,
//!   which the branches re-send and the main applies again but does not
//!   relay a second time.
//! * `daemon_role` — the non-superuser role the daemon connects as
//!   ([`crate::setup::grant_daemon_role`]); the event triggers trust
//!   `branchsync.*` settings only in its sessions (and superusers').
//! * `echo_settled` — at a branch: every local change committed at or
//!   before `through_ts` (µs) has been decided by the main and its result
//!   is here; an echo equal to the row here is left unwritten and moves it
//!   (see [`crate::apply`]'s obeyer).
//! * `capture_skips` — transactions whose rows too large to carry the
//!   operator allowed capture to skip (R24).

/// DDL of the state schema; idempotent.
pub const STATE_DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS branchsync;
CREATE TABLE IF NOT EXISTS branchsync.node (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    name text NOT NULL,
    node_index integer NOT NULL,
    role text NOT NULL,
    stride integer NOT NULL,
    system_id text NOT NULL,
    initialized_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS branchsync.progress (
    stream text PRIMARY KEY,
    pos bigint NOT NULL,
    lsn bigint NOT NULL DEFAULT 0,
    system_id text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS branchsync.row_version (
    tbl text NOT NULL,
    key text NOT NULL,
    stamp bigint NOT NULL,
    node text NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE IF NOT EXISTS branchsync.conflicts (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL,
    key text,
    kind text NOT NULL,
    rule text NOT NULL,
    winner_node text,
    loser_node text,
    local_version jsonb,
    remote_version jsonb,
    detail text
);
ALTER TABLE branchsync.conflicts ADD COLUMN IF NOT EXISTS resolved_at timestamptz;
CREATE TABLE IF NOT EXISTS branchsync.parked (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    stream text NOT NULL,
    tbl text NOT NULL,
    key text,
    header bytea NOT NULL,
    row_data jsonb,
    entry bytea,
    reason text NOT NULL
);
CREATE INDEX IF NOT EXISTS parked_stream ON branchsync.parked (stream, id);
CREATE TABLE IF NOT EXISTS branchsync.relay_head (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pos bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS branchsync.scope (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schemas text[] NOT NULL,
    exclude_globs text[] NOT NULL,
    exclude_re text[] NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.ddl_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    role text NOT NULL,
    tag text NOT NULL,
    query text NOT NULL,
    replayed boolean NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.column_renames (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    schema_name text NOT NULL,
    table_name text NOT NULL,
    old_name text NOT NULL,
    new_name text NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.table_renames (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    old_schema text NOT NULL,
    old_name text NOT NULL,
    new_schema text NOT NULL,
    new_name text NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.known_tables (
    relid oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.known_columns (
    relid oid NOT NULL,
    attnum smallint NOT NULL,
    attname text NOT NULL,
    PRIMARY KEY (relid, attnum)
);
ALTER TABLE branchsync.row_version ADD COLUMN IF NOT EXISTS ts bigint NOT NULL DEFAULT 0;
ALTER TABLE branchsync.row_version ADD COLUMN IF NOT EXISTS local_ts bigint NOT NULL DEFAULT 0;
ALTER TABLE branchsync.row_version ADD COLUMN IF NOT EXISTS inserted_by text;
ALTER TABLE branchsync.row_version ADD COLUMN IF NOT EXISTS row_data jsonb;
ALTER TABLE branchsync.row_version ADD COLUMN IF NOT EXISTS base jsonb;
ALTER TABLE branchsync.row_version ADD COLUMN IF NOT EXISTS cols jsonb;
CREATE INDEX IF NOT EXISTS row_version_tombstones ON branchsync.row_version (local_ts) WHERE deleted;
CREATE INDEX IF NOT EXISTS row_version_tombstone_keys ON branchsync.row_version (tbl, key) WHERE deleted;
ALTER TABLE branchsync.progress ADD COLUMN IF NOT EXISTS last_contact timestamptz;
ALTER TABLE branchsync.conflicts ADD COLUMN IF NOT EXISTS origin_node text;
ALTER TABLE branchsync.conflicts ADD COLUMN IF NOT EXISTS origin_id bigint;
ALTER TABLE branchsync.conflicts ADD COLUMN IF NOT EXISTS resolution text;
CREATE UNIQUE INDEX IF NOT EXISTS conflicts_origin ON branchsync.conflicts (origin_node, origin_id) WHERE origin_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS branchsync.clock_offsets (
    at_us bigint PRIMARY KEY,
    offset_us bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.key_merges (
    tbl text NOT NULL,
    from_key text NOT NULL,
    to_key text NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tbl, from_key)
);
CREATE TABLE IF NOT EXISTS branchsync.schema_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    n bigint NOT NULL
);
INSERT INTO branchsync.schema_version (n) VALUES (0) ON CONFLICT DO NOTHING;
ALTER TABLE branchsync.node ADD COLUMN IF NOT EXISTS log_epoch text;
ALTER TABLE branchsync.progress ADD COLUMN IF NOT EXISTS epoch text;
CREATE TABLE IF NOT EXISTS branchsync.retired_log (
    stream text NOT NULL,
    epoch text NOT NULL,
    retired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, epoch)
);
ALTER TABLE branchsync.conflicts ADD COLUMN IF NOT EXISTS entry bytea;
CREATE TABLE IF NOT EXISTS branchsync.mark_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key bytea NOT NULL,
    k_ipad bytea NOT NULL,
    k_opad bytea NOT NULL
);
REVOKE ALL ON branchsync.mark_key FROM PUBLIC;
CREATE TABLE IF NOT EXISTS branchsync.relay_suppress (
    author text NOT NULL,
    commit_lsn bigint NOT NULL,
    PRIMARY KEY (author, commit_lsn)
);
CREATE TABLE IF NOT EXISTS branchsync.echo_settled (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    through_ts bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS branchsync.insert_versions (
    xid bigint NOT NULL,
    xid32 bigint NOT NULL,
    tbl text NOT NULL,
    node text NOT NULL,
    local_ts bigint NOT NULL,
    keys text[] NOT NULL,
    stamps bigint[] NOT NULL,
    ts bigint[] NOT NULL
);
CREATE INDEX IF NOT EXISTS insert_versions_xid32 ON branchsync.insert_versions (xid32);
CREATE INDEX IF NOT EXISTS insert_versions_age ON branchsync.insert_versions (local_ts);
CREATE TABLE IF NOT EXISTS branchsync.daemon_role (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    rolname text NOT NULL
);
-- Apply's check before it writes a table: row-level security that applies
-- to the applying role would hide rows from it (PostgreSQL's own apply
-- worker refuses such tables too). Runs as the caller.
CREATE OR REPLACE FUNCTION branchsync.check_row_security(rel regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF row_security_active(rel) THEN
        RAISE EXCEPTION 'row-level security applies to role "%" on table %', current_user, rel
            USING ERRCODE = '42501',
                  DETAIL = 'Its policies would hide rows from branchsync, so changes to it are not applied here.',
                  HINT = format('Disable row-level security on %s, or exempt branchsync''s role: ALTER ROLE %I BYPASSRLS. Then retry the quarantined entries.', rel, current_user);
    END IF;
END
$fn$;
CREATE TABLE IF NOT EXISTS branchsync.capture_skips (
    commit_lsn text PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    reason text NOT NULL
);
"#;

/// Most rows one `branchsync.insert_versions` record speaks for: a decision
/// that reads a row's version unpacks the record's arrays, so they stay
/// small (a few tens of kB).
pub const PACKED_VERSION_KEYS: usize = 1_000;

/// Reads the durable progress of `stream` (0 = nothing applied yet).
pub async fn read_progress(client: &tokio_postgres::Client, stream: &str) -> Result<u64, crate::EngineError> {
    let row = client
        .query_opt("SELECT pos FROM branchsync.progress WHERE stream = $1", &[&stream])
        .await
        .map_err(crate::EngineError::pg("reading stream progress"))?;
    Ok(row.map(|r| r.get::<_, i64>(0).max(0) as u64).unwrap_or(0))
}

/// Every stream's durable progress: (stream, position, when it moved, as
/// text).
pub async fn progress_list(client: &tokio_postgres::Client) -> Result<Vec<(String, i64, String)>, crate::EngineError> {
    Ok(client
        .query("SELECT stream, pos, updated_at::text FROM branchsync.progress ORDER BY stream", &[])
        .await
        .map_err(crate::EngineError::pg("reading stream progress"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// At the main, when a shop's join ends: forgets the main's progress in
/// the shop's old stream (the shop starts a new log) and retires the old
/// log's identity, in one statement. A branch that later sends from the
/// retired log is refused ([`retired_at`]) instead of being replayed from
/// position 0.
pub async fn retire_stream(client: &tokio_postgres::Client, stream: &str) -> Result<(), crate::EngineError> {
    client
        .execute(
            "WITH gone AS (DELETE FROM branchsync.progress WHERE stream = $1 RETURNING stream, epoch) \
             INSERT INTO branchsync.retired_log (stream, epoch) SELECT stream, epoch FROM gone WHERE epoch IS NOT NULL ON CONFLICT DO NOTHING",
            &[&stream],
        )
        .await
        .map_err(crate::EngineError::pg("retiring the shop's old stream"))?;
    Ok(())
}

/// At the main: when a join retired `stream`'s log `epoch` (as text), or
/// `None` when it never did.
pub async fn retired_at(client: &tokio_postgres::Client, stream: &str, epoch: u64) -> Result<Option<String>, crate::EngineError> {
    let row = client
        .query_opt(
            "SELECT to_char(retired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' FROM branchsync.retired_log WHERE stream = $1 AND epoch = $2",
            &[&stream, &format!("{epoch:016x}")],
        )
        .await
        .map_err(crate::EngineError::pg("reading the retired logs"))?;
    Ok(row.map(|r| r.get(0)))
}

/// At the main: records the last log position capture reached
/// (`branchsync.relay_head`).
pub async fn record_relay_head(client: &tokio_postgres::Client, pos: u64) -> Result<(), crate::EngineError> {
    client
        .execute(
            "INSERT INTO branchsync.relay_head (pos, updated_at) VALUES ($1, now()) ON CONFLICT (singleton) DO UPDATE SET pos = excluded.pos, updated_at = now()",
            &[&i64::try_from(pos).unwrap_or(i64::MAX)],
        )
        .await
        .map_err(crate::EngineError::pg("recording the relay head"))?;
    Ok(())
}

/// At the main: the branches named are in contact now (R23).
pub async fn record_contact(client: &tokio_postgres::Client, streams: &[String]) -> Result<(), crate::EngineError> {
    client
        .execute("UPDATE branchsync.progress SET last_contact = now() WHERE stream = ANY($1)", &[&streams])
        .await
        .map_err(crate::EngineError::pg("recording branch contact"))?;
    Ok(())
}

/// Drops, at the main, what the retention no longer needs: tombstones and
/// packed insert versions written (this node's clock, µs) before
/// `cutoff_us`. A row whose packed version is dropped reads as the baseline
/// every peer has seen: a branch that could not have seen it has been away
/// longer than the retention and must be re-seeded. Returns the numbers of
/// tombstones and packed records dropped.
pub async fn drop_expired_versions(client: &tokio_postgres::Client, cutoff_us: i64) -> Result<(u64, u64), crate::EngineError> {
    let tombstones = client
        .execute("DELETE FROM branchsync.row_version WHERE deleted AND local_ts < $1", &[&cutoff_us])
        .await
        .map_err(crate::EngineError::pg("dropping old tombstones"))?;
    // A database initialised by an earlier release has no packed versions.
    let packed_there: bool = client
        .query_one("SELECT to_regclass('branchsync.insert_versions') IS NOT NULL", &[])
        .await
        .map_err(crate::EngineError::pg("looking for packed insert versions"))?
        .get(0);
    if !packed_there {
        return Ok((tombstones, 0));
    }
    let packed = client
        .execute("DELETE FROM branchsync.insert_versions WHERE local_ts < $1", &[&cutoff_us])
        .await
        .map_err(crate::EngineError::pg("dropping old packed insert versions"))?;
    Ok((tombstones, packed))
}

/// Prefix of the transactional logical message every apply transaction
/// writes before each ChangeSet it applies (R3). Its content is an
/// [`ApplyMark`].
pub const APPLY_MESSAGE_PREFIX: &str = "branchsync.apply";

/// Prefix of the non-transactional logical message apply writes when it
/// must wait until capture has logged everything committed before it
/// (see `capture::stream`): capture takes the message's position as caught
/// up once what came before it is durable. Its content is empty and means
/// nothing; a probe written by anyone else is just as true.
pub const PROBE_PREFIX: &str = "branchsync.probe";

/// Content of the [`APPLY_MESSAGE_PREFIX`] message (MessagePack): the
/// author's header and, at a branch applying the main's relay, the main's
/// commit time of the entry (the branch's causal context, R15).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApplyMark {
    /// The author's header.
    pub header: branchsync_proto::ChangeSetHeader,
    /// [`branchsync_proto::LogEntry::relay_ts_us`] of the applied entry.
    #[serde(default)]
    pub relay_ts_us: i64,
    /// At the main: the digest of the rows the author sent, for a ChangeSet
    /// of one fragment that only inserts. Capture compares it with the rows
    /// it decodes for the ChangeSet and marks the relay entry
    /// [`branchsync_proto::LogEntry::echo_as_sent`] when they are the same.
    #[serde(default)]
    pub sent: Option<crate::marks::RowsDigest>,
}

impl ApplyMark {
    /// Decodes a mark; a bare header (as parked rows store it) is accepted.
    pub fn decode(bytes: &[u8]) -> Result<ApplyMark, rmp_serde::decode::Error> {
        match rmp_serde::from_slice::<ApplyMark>(bytes) {
            Ok(m) => Ok(m),
            Err(_) => rmp_serde::from_slice::<branchsync_proto::ChangeSetHeader>(bytes).map(|header| ApplyMark { header, relay_ts_us: 0, sent: None }),
        }
    }
}

/// Rows of one table a grouped ChangeSet's statements insert: `(schema,
/// table, rows)`.
pub type GroupedRows = (String, String, u32);

/// Content of the [`APPLY_MESSAGE_PREFIX`] message that precedes the rows of
/// several insert-only ChangeSets written by one statement per table (the
/// apply pipeline): each ChangeSet's mark, in order, with how many rows of
/// each table the statements that follow insert for it. The statements
/// insert each table's rows in ChangeSet order, so the first rows of a
/// table belong to the first ChangeSet counting rows of it, and so on; rows
/// beyond every count (a very large row sent on its own, the rest of a
/// ChangeSet whose rows did not all fit in one group, changes made after
/// the inserts) belong to the last ChangeSet of the group. Capture at the
/// main splits the transaction back into ChangeSets this way (R3).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ApplyGroup {
    /// Always [`ApplyGroup::TAG`]: a group never decodes as a single mark,
    /// nor a single mark as a group.
    pub tag: String,
    /// The ChangeSets, in order, each with its rows per table.
    pub marks: Vec<(ApplyMark, Vec<GroupedRows>)>,
}

impl ApplyGroup {
    /// The value of [`ApplyGroup::tag`].
    pub const TAG: &'static str = "group";

    /// Decodes the content of an apply message: a group, or a single mark
    /// (written by [`crate::apply`] for parked rows, or by an earlier
    /// release), whose rows are everything up to the next mark (`None`).
    pub fn decode(bytes: &[u8]) -> Result<Vec<(ApplyMark, Option<Vec<GroupedRows>>)>, rmp_serde::decode::Error> {
        match rmp_serde::from_slice::<ApplyGroup>(bytes) {
            Ok(g) if g.tag == Self::TAG && !g.marks.is_empty() => Ok(g.marks.into_iter().map(|(m, r)| (m, Some(r))).collect()),
            _ => ApplyMark::decode(bytes).map(|m| vec![(m, None)]),
        }
    }
}

/// Prefix of the transactional message the main writes for each
/// [`branchsync_proto::Verdict`] (MessagePack `(TableDesc, Verdict)`).
pub const VERDICT_MESSAGE_PREFIX: &str = "branchsync.verdict";

/// Prefix of the transactional message the main writes for each conflict it
/// records (MessagePack [`branchsync_proto::ConflictRecord`]).
pub const CONFLICT_MESSAGE_PREFIX: &str = "branchsync.conflict";

/// Stream name under which a branch records its progress in the main's
/// relay (whatever the main's node name is).
pub const RELAY_STREAM: &str = "main";

/// Name of the publication `init` creates.
pub const PUBLICATION: &str = "branchsync";

/// Name of the logical replication slot `init` creates.
pub const SLOT: &str = "branchsync";

/// The replication origin a branch applies the relay under, whoever
/// authored each ChangeSet: one origin lets a branch apply the ChangeSets of
/// many shops in one transaction (the relay interleaves them), and a branch
/// tells applied rows from its own only by their origin being not 0.
pub const RELAY_ORIGIN: &str = "branchsync_relay";

/// Replication origin name for changes authored by `node` (at the main,
/// each branch's stream applies under its author's).
pub fn origin_name(node: &str) -> String {
    format!("branchsync_{node}")
}
