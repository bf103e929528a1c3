//! What `branchsync init` does to the database; safe to run again.
//!
//! ```text
//!   preflight ──> BEGIN ─ state schema ─ node row (copied state?) ─ replica identity
//!                       ─ publication ─ sequence stripes ─ COMMIT ──> logical slot
//! ```
//!
//! 1. [`preflight`]: PostgreSQL 15 or later, `wal_level = logical`,
//!    `track_commit_timestamp = on`, a free replication slot, a role that is
//!    a superuser or may replicate. Each failure is an
//!    [`EngineError::Misconfigured`] naming the setting, its value and the
//!    exact fix.
//! 2. One transaction (serialised against a concurrent `init` by an advisory
//!    lock) creates the state schema ([`crate::state::STATE_DDL`]), adopts or
//!    clears the node row (see *Copied state*), gives replicated tables
//!    `REPLICA IDENTITY FULL`, sets the publication's table list to
//!    exactly the replicated tables, and stripes the sequences
//!    ([`crate::keys`]), and installs the DDL event triggers with the scope
//!    they consult ([`crate::ddl::triggers`]). Either all of it happens or
//!    none of it.
//! 3. After the commit, outside any transaction (a logical slot cannot be
//!    created in a transaction that has written), the logical slot
//!    [`crate::state::SLOT`] is created with `pgoutput`, after the
//!    publication it decodes through exists.
//!
//! Replication origins are created lazily by apply, not here.
//!
//! # What it must never do
//!
//! Publish the `branchsync` schema (R2: [`Scope`] never includes it, and the
//! publication is set to an explicit table list, never `FOR ALL TABLES`);
//! change application tables beyond their replica identity and their
//! sequences' stripes; drop a slot that belongs to another database; change
//! a node's index, role or stride in place.
//!
//! # Copied state
//!
//! A new branch is seeded from a copy of the main's database taken while the
//! main was quiescent (`pg_dump | psql`, or a file-level copy). The copy
//! carries the main's `branchsync` rows. `init` recognises them by a node
//! row with another name, and:
//!
//! * deletes the copied `progress` (the main's progress per branch stream
//!   means nothing here), `conflicts`, `relay_head` and node row;
//! * if the copied node was the main, this node is a branch, and the main's
//!   `relay_head` has a row, inserts the progress row (stream `state::RELAY_STREAM`,
//!   `relay_head.pos`, main's system identifier): the copy contains every
//!   relayed change up to that position, so this branch resumes the main's
//!   relay stream right after the copy point — nothing applied twice,
//!   nothing missed. The copy must be taken while the main is quiescent,
//!   or `relay_head` may lag the copied rows;
//! * keeps `row_version`: it describes rows that were copied too;
//! * drops the copied logical slot, if the copy carried one: its position
//!   belongs to the old node's WAL stream, and decoding it would send the
//!   main's own changes back as this node's. A fresh slot starts at the
//!   current WAL position, so the ERP must not write before `init` ends.
//!
//! # Idempotence
//!
//! A second run finds the schema, the node row, the identities, the
//! publication's table list and the stripes as the first run left them and
//! changes nothing (sequences are reported with `changed = false`).

use branchsync_proto::changeset::quote_ident;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

use crate::keys::{self, StripedSequence, TxnMode};
use crate::scope::Scope;
use crate::state::{PUBLICATION, SLOT, STATE_DDL};
use crate::{pg, EngineError, Role};

/// Oldest supported server (`server_version_num`).
pub const MIN_SERVER_VERSION_NUM: i32 = 150_000;

/// Advisory lock key that serialises concurrent `init` runs on a database.
const INIT_LOCK_KEY: i64 = 0x6272_616e_6368_7379; // "branchsy"

/// What `init` is asked to do.
#[derive(Debug, Clone)]
pub struct InitParams {
    /// This node's name (unique in the topology).
    pub node: String,
    /// This node's index; its sequences hand out ids ≡ index (mod stride).
    pub index: u32,
    /// Main or branch.
    pub role: Role,
    /// Key stride, the same at every node (R23).
    pub stride: u32,
    /// Replicated schemas and excluded tables.
    pub scope: Scope,
}

/// What `init` found and did.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The cluster's `system_identifier`, recorded in the node row.
    pub system_id: u64,
    /// Replicated tables, `schema.table`, as listed in the publication.
    pub tables: Vec<String>,
    /// Tables given `REPLICA IDENTITY FULL` by this run.
    pub identity_full: Vec<String>,
    /// Every sequence of the scope and its stripe.
    pub sequences: Vec<StripedSequence>,
    /// `true` when this run created the logical slot.
    pub slot_created: bool,
    /// Name of the node whose copied state was found and cleared.
    pub seeded_from: Option<String>,
    /// Application code that runs inside apply: triggers enabled `ALWAYS`
    /// or `REPLICA` and rules on replicated tables (they execute with the
    /// daemon's rights when a replicated row fires them; SECURITY.md).
    pub apply_time_code: Vec<String>,
}

/// Triggers enabled `ALWAYS` or `REPLICA` and rules on the tables `oids`.
async fn apply_time_code(client: &tokio_postgres::Client, oids: &[u32]) -> Result<Vec<String>, EngineError> {
    let rows = client
        .query(
            "SELECT format('trigger %I on %s (ENABLE %s TRIGGER)', t.tgname, t.tgrelid::regclass, CASE t.tgenabled WHEN 'A' THEN 'ALWAYS' ELSE 'REPLICA' END)
               FROM pg_trigger t WHERE NOT t.tgisinternal AND t.tgenabled IN ('A', 'R') AND t.tgrelid::oid = ANY($1::oid[])
             UNION ALL
             SELECT format('rule %I on %s', r.rulename, r.ev_class::regclass)
               FROM pg_rewrite r WHERE r.rulename <> '_RETURN' AND r.ev_class::oid = ANY($1::oid[])
             ORDER BY 1",
            &[&oids],
        )
        .await
        .map_err(EngineError::pg("listing triggers and rules on replicated tables"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The server facts [`preflight`] judges.
#[derive(Debug, Clone)]
struct ServerFacts {
    version_num: i32,
    version: String,
    wal_level: String,
    track_commit_timestamp: String,
    max_replication_slots: i32,
    slots_in_use: Vec<String>,
    role: String,
    superuser: bool,
    replication: bool,
}

fn misconfigured(message: String, detail: String, hint: String) -> EngineError {
    EngineError::Misconfigured { message, detail, hint }
}

/// Judges the server facts; the first failure wins.
fn check_server(f: &ServerFacts) -> Result<(), EngineError> {
    if f.version_num < MIN_SERVER_VERSION_NUM {
        return Err(misconfigured(
            format!("server_version is \"{}\" but branchsync needs PostgreSQL 15 or later", f.version),
            "branchsync relies on the logical decoding and publication features of PostgreSQL 15.".into(),
            "Upgrade the server to PostgreSQL 15 or later (for example with pg_upgrade), then run branchsync init again.".into(),
        ));
    }
    if f.wal_level != "logical" {
        return Err(misconfigured(
            format!("wal_level is \"{}\" but branchsync needs \"logical\"", f.wal_level),
            "branchsync captures committed transactions by logical decoding, which needs wal_level = logical.".into(),
            "Set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL.".into(),
        ));
    }
    if f.track_commit_timestamp != "on" {
        return Err(misconfigured(
            format!("track_commit_timestamp is \"{}\" but branchsync needs \"on\"", f.track_commit_timestamp),
            "Conflict resolution reads the commit time and replication origin of row versions, which PostgreSQL records only with track_commit_timestamp = on.".into(),
            "Set track_commit_timestamp = on in postgresql.conf (or ALTER SYSTEM SET track_commit_timestamp = on) and restart PostgreSQL.".into(),
        ));
    }
    let ours = f.slots_in_use.iter().any(|s| s == SLOT);
    let used = i32::try_from(f.slots_in_use.len()).unwrap_or(i32::MAX);
    if !ours && used >= f.max_replication_slots {
        let max = f.max_replication_slots;
        let (message, detail) = if used == 0 {
            (
                format!("max_replication_slots is {max} but branchsync needs at least 1"),
                format!("branchsync needs one logical replication slot (\"{SLOT}\") for this database."),
            )
        } else {
            (
                format!("max_replication_slots is {max} and all {used} slots are in use"),
                format!(
                    "branchsync needs one more logical replication slot (\"{SLOT}\"); the slots in use are {}.",
                    f.slots_in_use.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
                ),
            )
        };
        let want = used + 1;
        return Err(misconfigured(
            message,
            detail,
            format!(
                "Set max_replication_slots = {want} or more in postgresql.conf (or ALTER SYSTEM SET max_replication_slots = {want}) and restart PostgreSQL, or drop a slot that is no longer used with SELECT pg_drop_replication_slot('name')."
            ),
        ));
    }
    if !f.superuser && !f.replication {
        return Err(misconfigured(
            format!("role \"{}\" is neither a superuser nor allowed to replicate", f.role),
            "branchsync creates a logical replication slot and writes under replication origins, which needs SUPERUSER or the REPLICATION attribute.".into(),
            format!(
                "Connect as a superuser in database.url, or run ALTER ROLE {} WITH REPLICATION as a superuser (the role must also own the replicated tables and sequences).",
                quote_ident(&f.role)
            ),
        ));
    }
    Ok(())
}

/// Judges whether a server whose `max_replication_slots` is `max`, with
/// `others` replication origins of other tools, can track the origins of
/// `authors` sites whose changes this node applies (one each, R3).
fn check_origins(max: i32, others: i32, authors: usize) -> Result<(), EngineError> {
    let want = others.saturating_add(i32::try_from(authors).unwrap_or(i32::MAX));
    if max >= want {
        return Ok(());
    }
    Err(misconfigured(
        format!("max_replication_slots is {max} but this node applies the changes of {authors} sites"),
        format!(
            "PostgreSQL tracks at most max_replication_slots replication origins, and branchsync writes each site's changes under an origin of its own{}; a site past the limit could not be applied.",
            if others > 0 { format!(" ({others} origins here belong to other tools)") } else { String::new() }
        ),
        format!("Set max_replication_slots = {want} or more in postgresql.conf (or ALTER SYSTEM SET max_replication_slots = {want}) and restart PostgreSQL; leave room for the branches you will add."),
    ))
}

/// Checks that the server can track a replication origin for each of the
/// `authors` sites whose changes this node applies (at the main: one per
/// configured branch).
pub async fn check_origin_capacity(client: &Client, authors: usize) -> Result<(), EngineError> {
    let r = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int,                     (SELECT count(*) FROM pg_catalog.pg_replication_origin WHERE roname NOT LIKE 'branchsync\\_%')::int",
            &[],
        )
        .await
        .map_err(EngineError::pg("reading the replication origins"))?;
    check_origins(r.get(0), r.get(1), authors)
}

/// Checks that the server is configured the way branchsync needs:
/// PostgreSQL 15 or later, `wal_level = logical`, `track_commit_timestamp =
/// on`, a free replication slot (unless ours exists), and a role that is a
/// superuser or has `REPLICATION`. Changes nothing.
pub async fn preflight(client: &Client) -> Result<(), EngineError> {
    let r = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                    current_setting('wal_level'), current_setting('track_commit_timestamp'), \
                    current_setting('max_replication_slots')::int, \
                    ARRAY(SELECT slot_name::text FROM pg_catalog.pg_replication_slots ORDER BY 1), \
                    current_user::text, r.rolsuper, r.rolreplication \
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(EngineError::pg("reading the server settings"))?;
    let facts = ServerFacts {
        version_num: r.get(0),
        version: r.get(1),
        wal_level: r.get(2),
        track_commit_timestamp: r.get(3),
        max_replication_slots: r.get(4),
        slots_in_use: r.get(5),
        role: r.get(6),
        superuser: r.get(7),
        replication: r.get(8),
    };
    check_server(&facts)?;
    tracing::debug!(server_version = %facts.version, role = %facts.role, "preflight passed");
    Ok(())
}

fn validate(p: &InitParams) -> Result<(), EngineError> {
    if p.node.is_empty() {
        return Err(misconfigured(
            "node name is empty".into(),
            "Every node needs a name that is unique in the topology.".into(),
            "Set node.name in the configuration file.".into(),
        ));
    }
    keys::check_stripe(p.index, p.stride)
}

/// A transaction of `init`'s: serialised with other runs (advisory lock),
/// and its own DDL (state schema, replica identity, stripes, grants) is
/// node-local, so the event triggers of an earlier run ignore it.
async fn begin_init_transaction<'a>(client: &'a mut Client, what: &'static str) -> Result<Transaction<'a>, EngineError> {
    let tx = client.transaction().await.map_err(EngineError::pg(what))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INIT_LOCK_KEY])
        .await
        .map_err(EngineError::pg("waiting for another branchsync init"))?;
    tx.batch_execute(&format!("SET LOCAL {} = on", crate::ddl::triggers::INTERNAL_GUC)).await.map_err(EngineError::pg(what))?;
    Ok(tx)
}

/// Prepares the database for branchsync (see the module documentation):
/// preflight, state schema, node row (clearing state copied from another
/// node), replica identity of keyless tables, publication, sequence stripes,
/// logical slot. Safe to run again; a second run changes nothing.
///
/// Run it while the ERP is stopped or quiet: it briefly locks the replicated
/// tables and their sequences, and a slot created while the ERP writes
/// starts after those writes.
pub async fn init(client: &mut Client, p: &InitParams) -> Result<InitReport, EngineError> {
    init_with_progress(client, p, &crate::progress::Silent).await
}

/// [`init`], telling `progress` how far it is through the replicated tables
/// and the sequences (each can take long on a large database: a sequence's
/// stripe reads the maximum of every column that uses it).
pub async fn init_with_progress(client: &mut Client, p: &InitParams, progress: &dyn crate::progress::Progress) -> Result<InitReport, EngineError> {
    validate(p)?;
    preflight(client).await?;
    let system_id = pg::system_identifier(client).await?;

    let tx = begin_init_transaction(client, "starting init").await?;
    tx.batch_execute(STATE_DDL).await.map_err(EngineError::pg("creating the branchsync schema"))?;
    let seeded_from = adopt_node(&tx, p, system_id).await?;
    if seeded_from.is_some() {
        drop_copied_slot(&tx).await?;
    }
    let (tables, identity_full) = replica_identity(&tx, &p.scope, progress).await?;
    set_publication(&tx, &tables).await?;
    let sequences = keys::stripe_all_in(tx.client(), &p.scope, p.index, p.stride, TxnMode::Caller, progress).await?;
    crate::ddl::triggers::install(&tx, &p.scope).await?;
    ensure_mark_key(&tx, seeded_from.is_some()).await?;
    restrict_emit_message(&tx).await?;
    tx.commit().await.map_err(EngineError::pg("committing init"))?;

    // After the commit: a logical slot cannot be created in a transaction
    // that has written, and it must see the publication.
    let slot_created = ensure_slot(client).await?;
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let apply_time_code = apply_time_code(client, &oids).await?;
    let report = InitReport {
        apply_time_code,
        system_id,
        tables: tables.into_iter().map(|t| t.display).collect(),
        identity_full,
        sequences,
        slot_created,
        seeded_from,
    };
    tracing::info!(
        node = %p.node,
        role = %p.role,
        index = p.index,
        stride = p.stride,
        system_id,
        tables = report.tables.len(),
        identity_full = report.identity_full.len(),
        sequences_changed = report.sequences.iter().filter(|s| s.changed).count(),
        slot_created,
        seeded_from = ?report.seeded_from,
        "database initialised"
    );
    Ok(report)
}

/// Reads the node row: adopts it, refuses an identity change, or clears
/// state copied from another node. Returns the copied node's name.
async fn adopt_node(tx: &Transaction<'_>, p: &InitParams, system_id: u64) -> Result<Option<String>, EngineError> {
    let row = tx
        .query_opt("SELECT name, node_index, role, stride, system_id, log_epoch FROM branchsync.node FOR UPDATE", &[])
        .await
        .map_err(EngineError::pg("reading branchsync.node"))?;
    let mut seeded_from = None;
    if let Some(r) = row {
        let (name, index, role, stride, copied_sid): (String, i32, String, i32, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        let copied_epoch: Option<String> = r.get(5);
        if name == p.node {
            let same = i64::from(index) == i64::from(p.index) && role == p.role.to_string() && i64::from(stride) == i64::from(p.stride);
            if !same {
                return Err(misconfigured(
                    format!("node \"{name}\" was initialised with index {index}, role {role}, stride {stride}"),
                    format!("The configuration now says index {}, role {}, stride {}.", p.index, p.role, p.stride),
                    "A node's index, role and stride cannot change in place: its ids and streams depend on them. Restore the old values in the configuration, or re-seed this branch with branchsync join --discard-local.".into(),
                ));
            }
        } else {
            let head: Option<i64> = tx
                .query_opt("SELECT pos FROM branchsync.relay_head", &[])
                .await
                .map_err(EngineError::pg("reading the copied relay head"))?
                .map(|r| r.get(0));
            tx.batch_execute(
                "DELETE FROM branchsync.progress; DELETE FROM branchsync.conflicts; DELETE FROM branchsync.parked; \
                 DELETE FROM branchsync.relay_head; DELETE FROM branchsync.node; DELETE FROM branchsync.ddl_log;",
            )
            .await
            .map_err(EngineError::pg("clearing state copied from another node"))?;
            match head {
                Some(pos) if role == Role::Main.to_string() && p.role == Role::Branch => {
                    // The copy holds every relayed change up to `pos`.
                    // ... in the main's relay log of that identity (R26).
                    tx.execute(
                        "INSERT INTO branchsync.progress (stream, pos, system_id, epoch) VALUES ($1, $2, $3, $4)",
                        &[&crate::state::RELAY_STREAM, &pos, &copied_sid, &copied_epoch],
                    )
                        .await
                        .map_err(EngineError::pg("recording where the main's relay resumes"))?;
                    tracing::info!(copied_from = %name, relay_pos = pos, "cleared copied state; the main's relay resumes after the copy point");
                }
                _ if role == Role::Main.to_string() && p.role == Role::Branch => {
                    tracing::warn!(copied_from = %name, "copied main had no relay head; the relay starts from its beginning");
                }
                _ => tracing::warn!(copied_from = %name, copied_role = %role, "cleared state copied from a node that was not the main"),
            }
            seeded_from = Some(name);
        }
    }
    tx.execute(
        "INSERT INTO branchsync.node (name, node_index, role, stride, system_id) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (singleton) DO UPDATE SET system_id = excluded.system_id \
         WHERE branchsync.node.system_id IS DISTINCT FROM excluded.system_id",
        &[&p.node, &(p.index as i32), &p.role.to_string(), &(p.stride as i32), &system_id.to_string()],
    )
    .await
    .map_err(EngineError::pg("recording the node"))?;
    Ok(seeded_from)
}

/// Gives the node a key for the marks its event triggers write (R25),
/// unless it has one of its own; a copy of another node's database gets a
/// new one (the copied key is the other node's).
async fn ensure_mark_key(tx: &Transaction<'_>, copied: bool) -> Result<(), EngineError> {
    let have = tx.query_opt("SELECT 1 FROM branchsync.mark_key", &[]).await.map_err(EngineError::pg("reading the mark key"))?.is_some();
    if have && !copied {
        return Ok(());
    }
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    let (ipad, opad) = crate::marks::padded_keys(&key);
    tx.execute(
        "INSERT INTO branchsync.mark_key (key, k_ipad, k_opad) VALUES ($1, $2, $3)          ON CONFLICT (singleton) DO UPDATE SET key = excluded.key, k_ipad = excluded.k_ipad, k_opad = excluded.k_opad",
        &[&key.as_slice(), &ipad, &opad],
    )
    .await
    .map_err(EngineError::pg("creating the mark key"))?;
    Ok(())
}

/// Who besides branchsync's role (and superusers) may execute an overload
/// of `pg_logical_emit_message` (R25): one row per overload and grantee,
/// `PUBLIC` included. Empty after `init`.
pub const EMIT_MESSAGE_GRANTS_SQL: &str = "SELECT p.oid::regprocedure::text || ' to ' || coalesce(r.rolname::text, 'PUBLIC') FROM pg_proc p \
     CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a LEFT JOIN pg_roles r ON r.oid = a.grantee \
     WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace AND a.privilege_type = 'EXECUTE' \
       AND (a.grantee = 0 OR (r.rolname <> current_user AND NOT r.rolsuper)) ORDER BY 1";

/// Takes `pg_logical_emit_message` (every overload) away from PUBLIC and
/// from every other role that is not a superuser, and gives it to the role
/// running `init` (branchsync's), so an application role cannot write
/// messages under branchsync's prefixes (R25; capture checks their seals
/// anyway).
async fn restrict_emit_message(tx: &Transaction<'_>) -> Result<(), EngineError> {
    let rows = tx
        .query(
            "SELECT p.oid::regprocedure::text, coalesce(array_agg(quote_ident(r.rolname)) FILTER (WHERE r.rolname <> current_user AND NOT r.rolsuper), '{}') \
             FROM pg_proc p CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a LEFT JOIN pg_roles r ON r.oid = a.grantee \
             WHERE p.proname = 'pg_logical_emit_message' AND p.pronamespace = 'pg_catalog'::regnamespace AND a.privilege_type = 'EXECUTE' \
             GROUP BY 1",
            &[],
        )
        .await
        .map_err(EngineError::pg("listing pg_logical_emit_message"))?;
    for r in rows {
        let (f, others): (String, Vec<String>) = (r.get(0), r.get(1));
        let from = std::iter::once("PUBLIC".to_string()).chain(others).collect::<Vec<_>>().join(", ");
        tx.batch_execute(&format!("REVOKE EXECUTE ON FUNCTION {f} FROM {from}; GRANT EXECUTE ON FUNCTION {f} TO CURRENT_USER"))
            .await
            .map_err(EngineError::pg(format!("revoking {f} from {from}")))?;
    }
    Ok(())
}

/// The role the daemon connects as at run time (issue 13): not a superuser,
/// with exactly what replication needs.
#[derive(Debug, Clone)]
pub struct DaemonRole {
    /// Its name (`[database] daemon_role`).
    pub name: String,
    /// The password to give it (written to the data directory by the
    /// caller); `None` leaves the password as it is.
    pub password: Option<String>,
    /// `[ddl] run_as`: the daemon must be able to `SET ROLE` to it.
    pub ddl_run_as: Option<String>,
}

/// What [`grant_daemon_role`] did.
#[derive(Debug, Clone, Default)]
pub struct DaemonRoleReport {
    /// `true` when this run created the role.
    pub created: bool,
    /// Replicated tables it was given DML on.
    pub tables: usize,
    /// Roles it became a member of, so it replays DDL as them (owners of
    /// replicated tables, roles that may create tables in a replicated
    /// schema, and `[ddl] run_as`).
    pub member_of: Vec<String>,
    /// Replicated tables whose row-level security would apply to it:
    /// apply refuses their rows (as PostgreSQL's own apply worker does).
    pub row_security: Vec<String>,
}

/// Creates (or brings up to date) the dedicated role the daemon connects
/// as, run by `init` as a superuser, after [`init`]. The role is a login
/// role with `REPLICATION` (its slot), not a superuser, and is given:
/// `SET` on `session_replication_role` (PostgreSQL 15's per-parameter
/// grant); `EXECUTE` on the replication-origin functions and on
/// `pg_logical_emit_message`; everything on branchsync's own schema; DML on
/// every replicated table (tables created later get it from the event
/// trigger); membership in the (non-superuser) roles that own replicated
/// tables and in `[ddl] run_as`, so replayed DDL runs as the table's owner
/// and never as branchsync itself. Application code that runs inside apply
/// (triggers enabled `ALWAYS`/`REPLICA`, constraints, defaults) then runs
/// with these rights, which include no way to become a superuser.
pub async fn grant_daemon_role(client: &mut Client, role: &DaemonRole, scope: &Scope) -> Result<DaemonRoleReport, EngineError> {
    let q = quote_ident(&role.name);
    let tx = begin_init_transaction(client, "setting up the daemon's role").await?;
    let existing = tx
        .query_opt("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", &[&role.name])
        .await
        .map_err(EngineError::pg("looking up the daemon's role"))?
        .map(|r| r.get::<_, bool>(0));
    let created = existing.is_none();
    if existing == Some(true) {
        return Err(misconfigured(
            format!("role \"{}\" is a superuser", role.name),
            "The daemon connects as [database] daemon_role, which must not be a superuser: application code that runs inside apply would run with its rights.".into(),
            "Name another role in [database] daemon_role (branchsync init creates it), or ALTER ROLE it NOSUPERUSER.".into(),
        ));
    }
    if created {
        tx.batch_execute(&format!("CREATE ROLE {q} LOGIN REPLICATION"))
            .await
            .map_err(EngineError::pg(format!("creating role \"{}\"", role.name)))?;
    }
    tx.batch_execute(&format!("ALTER ROLE {q} LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE"))
        .await
        .map_err(EngineError::pg(format!("setting the attributes of role \"{}\"", role.name)))?;
    if let Some(pw) = &role.password {
        if !pw.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(EngineError::Misconfigured { message: "the daemon role's password must be alphanumeric".into(), detail: String::new(), hint: String::new() });
        }
        tx.batch_execute(&format!("ALTER ROLE {q} PASSWORD '{pw}'"))
            .await
            .map_err(EngineError::pg(format!("setting the password of role \"{}\"", role.name)))?;
    }
    let db: String = tx.query_one("SELECT current_database()::text", &[]).await.map_err(EngineError::pg("reading the database name"))?.get(0);
    let mut grants = format!(
        "GRANT CONNECT ON DATABASE {db} TO {q};
         GRANT USAGE ON SCHEMA branchsync TO {q};
         GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA branchsync TO {q};
         GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA branchsync TO {q};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA branchsync TO {q};
         GRANT SET ON PARAMETER session_replication_role TO {q};
         DELETE FROM branchsync.daemon_role;
         INSERT INTO branchsync.daemon_role (rolname) VALUES ({lit});
         GRANT SELECT ON branchsync.daemon_role TO PUBLIC;",
        db = quote_ident(&db),
        lit = crate::pg::quote_literal(&role.name),
    );
    let funcs = tx
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p \
             WHERE p.pronamespace = 'pg_catalog'::regnamespace \
               AND (p.proname LIKE 'pg\\_replication\\_origin\\_%' OR p.proname = 'pg_logical_emit_message')",
            &[],
        )
        .await
        .map_err(EngineError::pg("listing the replication-origin functions"))?;
    for f in funcs {
        let f: String = f.get(0);
        grants.push_str(&format!("GRANT EXECUTE ON FUNCTION {f} TO {q};\n"));
    }
    for s in scope.schemas() {
        // Sequences are read by the stripe audit (re-striped by the
        // SECURITY DEFINER helper, never by this role).
        grants.push_str(&format!("GRANT USAGE ON SCHEMA {s} TO {q};\nGRANT SELECT ON ALL SEQUENCES IN SCHEMA {s} TO {q};\n", s = quote_ident(s)));
    }
    tx.batch_execute(&grants).await.map_err(EngineError::pg(format!("granting role \"{}\" what replication needs", role.name)))?;
    let (tables, _) = replica_identity(&tx, scope, &crate::progress::Silent).await?;
    let mut owners = std::collections::BTreeSet::new();
    let mut row_security = Vec::new();
    for t in &tables {
        tx.batch_execute(&format!("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON {} TO {q}", t.quoted))
            .await
            .map_err(EngineError::pg(format!("granting role \"{}\" DML on {}", role.name, t.display)))?;
        let r = tx
            .query_one(
                "SELECT o.rolname::text, o.rolsuper, c.relrowsecurity FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles o ON o.oid = c.relowner WHERE c.oid = $1",
                &[&t.oid],
            )
            .await
            .map_err(EngineError::pg("reading a table's owner"))?;
        let (owner, owner_super, rls): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
        if !owner_super && owner != role.name {
            owners.insert(owner);
        }
        if rls {
            row_security.push(t.display.clone());
        }
    }
    if let Some(r) = &role.ddl_run_as {
        owners.insert(r.clone());
    }
    // Roles granted CREATE on a replicated schema (and its owner): the roles
    // that can make new tables there, whose DDL this node replays. A grant
    // to `pg_database_owner` (PostgreSQL 15's own `public` schema: the
    // database's owner, the ERP's role in a usual installation) is the
    // database owner's.
    let creators = tx
        .query(
            "SELECT DISTINCT r.rolname::text FROM pg_catalog.pg_namespace n \
             CROSS JOIN LATERAL aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a \
             JOIN pg_catalog.pg_roles r ON r.oid = CASE WHEN a.grantee = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = 'pg_database_owner') \
                  THEN (SELECT datdba FROM pg_catalog.pg_database WHERE datname = current_database()) ELSE a.grantee END \
             WHERE n.nspname = ANY($1) AND a.privilege_type = 'CREATE' AND NOT r.rolsuper AND r.rolname NOT LIKE 'pg\\_%'",
            &[&scope.schemas().to_vec()],
        )
        .await
        .map_err(EngineError::pg("listing the roles that create tables in the replicated schemas"))?;
    for r in creators {
        let r: String = r.get(0);
        if r != role.name {
            owners.insert(r);
        }
    }
    let mut member_of = Vec::new();
    for o in owners {
        let sup: Option<bool> = tx
            .query_opt("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = $1", &[&o])
            .await
            .map_err(EngineError::pg("looking up a table owner"))?
            .map(|r| r.get(0));
        if sup != Some(false) {
            continue;
        }
        tx.batch_execute(&format!("GRANT {} TO {q}", quote_ident(&o)))
            .await
            .map_err(EngineError::pg(format!("making role \"{}\" a member of \"{o}\"", role.name)))?;
        member_of.push(o);
    }
    tx.commit().await.map_err(EngineError::pg("committing the daemon's role"))?;
    tracing::info!(role = %role.name, created, tables = tables.len(), member_of = ?member_of, "daemon role ready");
    Ok(DaemonRoleReport { created, tables: tables.len(), member_of, row_security })
}


/// What `init --restored` found and did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Commit LSN capture resumes after (the slot's position in the
    /// restored database).
    pub resume_lsn: u64,
    /// Branch ChangeSets the relay log already holds (not relayed again).
    pub suppressed: usize,
}

/// A main whose database was restored from a backup older than its log
/// (run after [`init`], with the daemon stopped): capture goes on from the
/// restored database's slot, however far back its LSNs went; the branch
/// ChangeSets the relay log already holds are applied again when the
/// branches re-send them (from what they keep), but not relayed a second
/// time. Refuses a branch (a branch is re-seeded) and a database that did
/// not go back.
pub async fn restored(client: &Client, log: &crate::log::ChangeLog, node: &str, role: Role) -> Result<RestoreReport, EngineError> {
    if role != Role::Main {
        return Err(misconfigured(
            "init --restored is for the main".into(),
            "A branch whose database was restored from a backup is behind what the main already has from it.".into(),
            "Re-seed the branch: stop its daemon and run branchsync join --discard-local there.".into(),
        ));
    }
    let wal = pg::current_wal_lsn(client).await?;
    let captured = log.captured_lsn()?;
    let slot: Option<String> = client
        .query_opt("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT])
        .await
        .map_err(EngineError::pg("reading the replication slot"))?
        .and_then(|r| r.get(0));
    let slot_lsn = slot.as_deref().and_then(pg::parse_lsn);
    if wal >= captured && slot_lsn.is_some_and(|l| l >= captured) {
        return Err(misconfigured(
            "the database was not restored to an earlier state".into(),
            format!("The log holds transactions up to LSN {}, and the database's WAL and slot are past it.", pg::fmt_lsn(captured)),
            "Run init --restored only after restoring the main's database from a backup.".into(),
        ));
    }
    let resume_lsn = match slot_lsn {
        Some(l) => l,
        None => {
            ensure_slot(client).await?;
            client
                .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT])
                .await
                .map_err(EngineError::pg("reading the replication slot"))?
                .get::<_, Option<String>>(0)
                .as_deref()
                .and_then(pg::parse_lsn)
                .unwrap_or(wal)
        }
    };
    // Every ChangeSet still in the relay log that the restored database may
    // produce again.
    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut after = log.floor()?;
    loop {
        let batch = log.read_after(after, 4 << 20)?;
        let Some(last) = batch.last() else { break };
        after = last.pos;
        for e in &batch {
            // Branch ChangeSets are named by the branch's LSNs; the main's
            // own only below the restored WAL's end (later ones are lost
            // here, and new transactions reuse those LSNs).
            if e.part == 0 && (e.header.author != node || e.header.commit_lsn < wal) {
                seen.push((e.header.author.clone(), e.header.commit_lsn as i64));
            }
        }
    }
    seen.sort();
    seen.dedup();
    client.batch_execute("DELETE FROM branchsync.relay_suppress").await.map_err(EngineError::pg("clearing branchsync.relay_suppress"))?;
    for chunk in seen.chunks(10_000) {
        let (authors, lsns): (Vec<&str>, Vec<i64>) = chunk.iter().map(|(a, l)| (a.as_str(), *l)).unzip();
        client
            .execute("INSERT INTO branchsync.relay_suppress SELECT * FROM unnest($1::text[], $2::int8[]) ON CONFLICT DO NOTHING", &[&authors, &lsns])
            .await
            .map_err(EngineError::pg("recording what the relay log holds"))?;
    }
    // Capture goes on from the restored database's slot: the log's
    // deduplication point moves back to it (stamps never go back).
    log.append(&[], Some(crate::log::Completion { captured_lsn: resume_lsn, stamp: log.last_stamp()?, seen_main_ts: log.seen_main_ts()? }))?;
    log.flush().await?;
    tracing::info!(resume_lsn = %pg::fmt_lsn(resume_lsn), suppressed = seen.len(), "restored database: capture resumes at the slot, the relay goes on");
    Ok(RestoreReport { resume_lsn, suppressed: seen.len() })
}

/// The database gives up the log it was bound to (`init
/// --accept-new-log`): the next daemon start binds it to the log in the
/// data directory. What the old log held and peers had not received is
/// lost to replication.
/// Site-local columns (`[[tables]] local`) of the replicated `tables`
/// (`schema.table`) that have no default here, as `schema.table.column`: a
/// row created at another site arrives without them and takes NULL, which
/// an ERP's counter cannot number from.
pub async fn local_columns_without_default(client: &Client, tables: &[String], rules: &crate::conflict::TableRules) -> Result<Vec<String>, EngineError> {
    let mut out = Vec::new();
    for t in tables {
        let Some((schema, name)) = t.split_once('.') else { continue };
        let local = &rules.for_table(schema, name).local;
        if local.is_empty() {
            continue;
        }
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = ANY($3) AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.atthasdef ORDER BY a.attnum",
                &[&schema, &name, local],
            )
            .await
            .map_err(EngineError::pg("reading the defaults of site-local columns"))?;
        out.extend(rows.iter().map(|r| format!("{t}.{}", r.get::<_, String>(0))));
    }
    Ok(out)
}

pub async fn accept_new_log(client: &Client) -> Result<Option<String>, EngineError> {
    let row = client
        .query_one("UPDATE branchsync.node SET log_epoch = NULL RETURNING (SELECT log_epoch FROM branchsync.node)", &[])
        .await
        .map_err(EngineError::pg("forgetting the node's log identity"))?;
    Ok(row.get(0))
}

/// Records that capture may skip the rows too large to carry of the
/// transaction committed at `lsn` (R24); capture records each skipped row
/// in `branchsync.conflicts`.
pub async fn record_capture_skip(client: &Client, lsn: u64, reason: &str) -> Result<bool, EngineError> {
    let n = client
        .execute("INSERT INTO branchsync.capture_skips (commit_lsn, reason) VALUES ($1, $2) ON CONFLICT DO NOTHING", &[&pg::fmt_lsn(lsn), &reason])
        .await
        .map_err(EngineError::pg("recording a capture skip"))?;
    Ok(n > 0)
}

/// Drops the copied logical slot of this database, if any: its position
/// belongs to the old node's stream. Not transactional; a failed `init`
/// leaves it dropped, and the next run creates it.
async fn drop_copied_slot(tx: &Transaction<'_>) -> Result<(), EngineError> {
    let dropped = tx
        .query_opt(
            "SELECT pg_drop_replication_slot(slot_name)::text FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = $1 AND database = current_database()",
            &[&SLOT],
        )
        .await
        .map_err(EngineError::pg("dropping the copied replication slot"))?;
    if dropped.is_some() {
        tracing::info!(slot = SLOT, "dropped the replication slot copied with the database");
    }
    Ok(())
}

/// A replicated table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Table {
    oid: u32,
    /// `schema.table`, unquoted.
    display: String,
    /// `"schema"."table"`.
    quoted: String,
}

/// Lists the replicated tables and gives them `REPLICA IDENTITY FULL`
/// (R11, R12, R16); returns the tables and those it changed.
async fn replica_identity(tx: &Transaction<'_>, scope: &Scope, progress: &dyn crate::progress::Progress) -> Result<(Vec<Table>, Vec<String>), EngineError> {
    let rows = tx
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relpersistence::text, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1) \
             ORDER BY n.nspname, c.relname",
            &[&scope.schemas().to_vec()],
        )
        .await
        .map_err(EngineError::pg("listing the replicated tables"))?;
    let mut tables = Vec::new();
    let mut identity_full = Vec::new();
    progress.phase("checking tables", rows.len() as u64);
    for r in rows {
        progress.advance(1);
        let (oid, schema, name, ident, persistence, has_pk): (u32, String, String, String, String, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        if !scope.includes(&schema, &name) {
            continue;
        }
        let t = Table { oid, display: format!("{schema}.{name}"), quoted: format!("{}.{}", quote_ident(&schema), quote_ident(&name)) };
        if persistence != "p" {
            // Unlogged tables write no WAL: logical decoding cannot see them.
            tracing::warn!(table = %t.display, "unlogged table is not replicated");
            continue;
        }
        // FULL everywhere: every update and delete then carries the row as
        // its author saw it, which conflict resolution needs (the base of a
        // column-level merge, the old value of a delta column, R16), and
        // unchanged TOASTed values can be filled from it (R12). Keyless
        // tables need it anyway (R11).
        let _ = has_pk;
        let fix = (ident != "f").then_some("FULL");
        if let Some(fix) = fix {
            tx.batch_execute(&format!("ALTER TABLE {} REPLICA IDENTITY {fix}", t.quoted))
                .await
                .map_err(EngineError::pg(format!("setting REPLICA IDENTITY {fix} on {}", t.display)))?;
            tracing::info!(table = %t.display, identity = fix, "replica identity set");
            if fix == "FULL" {
                identity_full.push(t.display.clone());
            }
        }
        tables.push(t);
    }
    progress.finish();
    Ok((tables, identity_full))
}

/// Makes the publication list exactly `tables`, publishing every operation.
async fn set_publication(tx: &Transaction<'_>, tables: &[Table]) -> Result<(), EngineError> {
    let pubq = quote_ident(PUBLICATION);
    let row = tx
        .query_opt(
            "SELECT puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .map_err(EngineError::pg("reading the publication"))?;
    match row.map(|r| (r.get::<_, bool>(0), r.get::<_, bool>(1))) {
        None => {
            tx.batch_execute(&format!("CREATE PUBLICATION {pubq}")).await.map_err(EngineError::pg("creating the publication"))?;
            tracing::info!(publication = PUBLICATION, "publication created");
        }
        Some((true, _)) => {
            // FOR ALL TABLES would publish branchsync's own state (R2).
            tx.batch_execute(&format!("DROP PUBLICATION {pubq}; CREATE PUBLICATION {pubq}"))
                .await
                .map_err(EngineError::pg("re-creating the publication without FOR ALL TABLES"))?;
            tracing::warn!(publication = PUBLICATION, "publication was FOR ALL TABLES; re-created with an explicit table list");
        }
        Some((false, all_ops)) => {
            if !all_ops {
                tx.batch_execute(&format!("ALTER PUBLICATION {pubq} SET (publish = 'insert, update, delete, truncate')"))
                    .await
                    .map_err(EngineError::pg("setting the publication's operations"))?;
            }
        }
    }
    // Current members: tables (with any row filter or column list) and schemas.
    let members = tx
        .query(
            "SELECT pr.prrelid, (pr.prqual IS NULL AND pr.prattrs IS NULL) \
             FROM pg_catalog.pg_publication_rel pr JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid WHERE p.pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .map_err(EngineError::pg("reading the publication's tables"))?;
    let schemas: Vec<String> = tx
        .query(
            "SELECT n.nspname::text FROM pg_catalog.pg_publication_namespace pn \
             JOIN pg_catalog.pg_publication p ON p.oid = pn.pnpubid JOIN pg_catalog.pg_namespace n ON n.oid = pn.pnnspid \
             WHERE p.pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .map_err(EngineError::pg("reading the publication's schemas"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut current: Vec<u32> = members.iter().map(|r| r.get(0)).collect();
    let plain = members.iter().all(|r| r.get::<_, bool>(1));
    let mut wanted: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    current.sort_unstable();
    wanted.sort_unstable();
    if current == wanted && plain && schemas.is_empty() {
        return Ok(());
    }
    if tables.is_empty() {
        let mut stmts = Vec::new();
        if !current.is_empty() {
            let list: Vec<String> = current.iter().map(|oid| format!("{oid}::regclass")).collect();
            // Names via regclass so that odd names are quoted by the server.
            let names: Vec<String> = tx
                .query(&format!("SELECT unnest(ARRAY[{}])::text", list.join(", ")), &[])
                .await
                .map_err(EngineError::pg("naming the publication's tables"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            stmts.push(format!("ALTER PUBLICATION {pubq} DROP TABLE {}", names.join(", ")));
        }
        for s in &schemas {
            stmts.push(format!("ALTER PUBLICATION {pubq} DROP TABLES IN SCHEMA {}", quote_ident(s)));
        }
        tx.batch_execute(&stmts.join("; ")).await.map_err(EngineError::pg("emptying the publication"))?;
    } else {
        let list: Vec<&str> = tables.iter().map(|t| t.quoted.as_str()).collect();
        tx.batch_execute(&format!("ALTER PUBLICATION {pubq} SET TABLE {}", list.join(", ")))
            .await
            .map_err(EngineError::pg("setting the publication's tables"))?;
    }
    tracing::info!(publication = PUBLICATION, tables = tables.len(), "publication table list set");
    Ok(())
}

/// Creates the logical slot if it is missing; refuses a slot of the same
/// name that belongs to another database or plugin.
async fn ensure_slot(client: &Client) -> Result<bool, EngineError> {
    let row = client
        .query_opt(
            "SELECT coalesce(database::text, ''), coalesce(plugin::text, ''), slot_type, current_database()::text \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .map_err(EngineError::pg("reading replication slots"))?;
    if let Some(r) = row {
        let (db, plugin, kind, here): (String, String, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
        if kind != "logical" || db != here || plugin != "pgoutput" {
            let what = if kind != "logical" {
                format!("a {kind} slot")
            } else if db != here {
                format!("a logical slot of database \"{db}\"")
            } else {
                format!("a logical slot with plugin \"{plugin}\"")
            };
            return Err(misconfigured(
                format!("replication slot \"{SLOT}\" already exists as {what}"),
                format!("branchsync needs the slot \"{SLOT}\" to be a logical slot of database \"{here}\" with plugin pgoutput; slot names are shared by the whole cluster."),
                format!("If nothing uses that slot any more, drop it with SELECT pg_drop_replication_slot('{SLOT}') and run branchsync init again; branchsync serves one database per cluster."),
            ));
        }
        return Ok(false);
    }
    match client.query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text", &[&SLOT]).await {
        Ok(_) => {
            tracing::info!(slot = SLOT, "replication slot created");
            Ok(true)
        }
        // Created by a concurrent init between the check and here.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) => Err(EngineError::pg("creating the replication slot")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ServerFacts {
        ServerFacts {
            version_num: 150_004,
            version: "15.4".into(),
            wal_level: "logical".into(),
            track_commit_timestamp: "on".into(),
            max_replication_slots: 2,
            slots_in_use: vec![],
            role: "erp".into(),
            superuser: false,
            replication: true,
        }
    }

    fn fails(f: ServerFacts, must_mention: &[&str]) {
        let e = check_server(&f).unwrap_err();
        assert!(matches!(e, EngineError::Misconfigured { .. }));
        let text = e.to_string();
        for m in must_mention {
            assert!(text.contains(m), "{m:?} missing in:\n{text}");
        }
    }

    #[test]
    fn a_good_server_passes() {
        check_server(&facts()).unwrap();
        check_server(&ServerFacts { slots_in_use: vec!["other".into(), SLOT.into()], ..facts() }).unwrap();
        check_server(&ServerFacts { superuser: true, replication: false, ..facts() }).unwrap();
    }

    #[test]
    fn each_failure_names_the_setting_its_value_and_the_fix() {
        fails(ServerFacts { version_num: 140_009, version: "14.9".into(), ..facts() }, &["\"14.9\"", "15 or later", "Upgrade"]);
        fails(
            ServerFacts { wal_level: "replica".into(), ..facts() },
            &[
                "wal_level is \"replica\" but branchsync needs \"logical\"",
                "Set wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL.",
            ],
        );
        fails(
            ServerFacts { track_commit_timestamp: "off".into(), ..facts() },
            &["track_commit_timestamp is \"off\" but branchsync needs \"on\"", "ALTER SYSTEM SET track_commit_timestamp = on", "restart"],
        );
        fails(
            ServerFacts { slots_in_use: vec!["a".into(), "b".into()], ..facts() },
            &[
                "max_replication_slots is 2 and all 2 slots are in use",
                "\"a\", \"b\"",
                "max_replication_slots = 3",
                "pg_drop_replication_slot",
            ],
        );
        fails(ServerFacts { max_replication_slots: 0, ..facts() }, &["max_replication_slots is 0", "restart"]);
        fails(ServerFacts { superuser: false, replication: false, ..facts() }, &["role \"erp\"", "ALTER ROLE \"erp\" WITH REPLICATION"]);
    }

    #[test]
    fn the_first_message_is_lowercase_and_hints_are_sentences() {
        for f in [
            ServerFacts { wal_level: "minimal".into(), ..facts() },
            ServerFacts { track_commit_timestamp: "off".into(), ..facts() },
            ServerFacts { superuser: false, replication: false, ..facts() },
        ] {
            let Err(EngineError::Misconfigured { message, detail, hint }) = check_server(&f) else { panic!("must fail") };
            assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
            assert!(detail.ends_with('.') && hint.ends_with('.'), "{detail} / {hint}");
        }
    }
}

#[cfg(test)]
mod pg_tests {
    use super::*;
    use crate::test_utils::{pg_bin_dir, PgCluster};

    fn params(node: &str, index: u32, role: Role) -> InitParams {
        InitParams { node: node.into(), index, role, stride: 100, scope: Scope::new(&["public".into()], &["local_*".into()]).unwrap() }
    }

    async fn published(c: &Client) -> Vec<String> {
        c.query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'branchsync' ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn replident(c: &Client, table: &str) -> String {
        c.query_one("SELECT relreplident::text FROM pg_class WHERE oid = $1::text::regclass", &[&table]).await.unwrap().get(0)
    }

    const SCHEMA: &str = "CREATE TABLE orders (id serial PRIMARY KEY, total numeric);
         CREATE TABLE audit_log (event text, at timestamptz DEFAULT now());
         CREATE TABLE lines (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, order_id int);
         CREATE TABLE local_cache (id serial PRIMARY KEY, v text);
         CREATE UNLOGGED TABLE scratch (v text);
         CREATE TABLE sales (id int, day int) PARTITION BY RANGE (day);
         CREATE TABLE sales_1 PARTITION OF sales FOR VALUES FROM (0) TO (100);
         INSERT INTO orders (total) SELECT 1 FROM generate_series(1, 7);
         INSERT INTO local_cache (v) VALUES ('x');";

    #[test]
    fn a_main_with_more_branches_than_origins_it_can_track_is_refused_with_the_setting_to_raise() {
        check_origins(10, 0, 10).unwrap();
        let e = check_origins(10, 2, 49).unwrap_err().to_string();
        for m in ["max_replication_slots is 10 but this node applies the changes of 49 sites", "2 origins here belong to other tools", "max_replication_slots = 51", "restart PostgreSQL"] {
            assert!(e.contains(m), "{m:?} missing in:\n{e}");
        }
    }

    #[tokio::test]
    async fn origin_capacity_is_read_from_the_server() {
        let pg = PgCluster::start_with(&["max_replication_slots = 4"]);
        let c = pg.connect().await;
        c.batch_execute("SELECT pg_replication_origin_create('other_tool'); SELECT pg_replication_origin_create('branchsync_branch1');").await.unwrap();
        check_origin_capacity(&c, 3).await.unwrap();
        let e = check_origin_capacity(&c, 4).await.unwrap_err().to_string();
        assert!(e.contains("max_replication_slots is 4 but this node applies the changes of 4 sites") && e.contains("= 5 or more"), "{e}");
    }

    #[tokio::test]
    async fn preflight_names_wal_level_and_the_fix() {
        let pg = PgCluster::start_with(&["wal_level = replica"]);
        let mut c = pg.connect().await;
        let e = preflight(&c).await.unwrap_err().to_string();
        assert!(e.starts_with("wal_level is \"replica\" but branchsync needs \"logical\""), "{e}");
        assert!(e.contains("Set wal_level = logical in postgresql.conf") && e.contains("restart PostgreSQL"), "{e}");
        // init refuses before changing anything.
        assert!(init(&mut c, &params("main", 0, Role::Main)).await.is_err());
        let schema: bool =
            c.query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'branchsync')", &[]).await.unwrap().get(0);
        assert!(!schema, "a failed preflight changes nothing");
    }

    #[tokio::test]
    async fn preflight_names_track_commit_timestamp_and_the_fix() {
        let pg = PgCluster::start_with(&["track_commit_timestamp = off"]);
        let c = pg.connect().await;
        let e = preflight(&c).await.unwrap_err().to_string();
        assert!(e.starts_with("track_commit_timestamp is \"off\" but branchsync needs \"on\""), "{e}");
        assert!(e.contains("Set track_commit_timestamp = on in postgresql.conf") && e.contains("restart PostgreSQL"), "{e}");
    }

    #[tokio::test]
    async fn init_is_idempotent_and_publishes_exactly_the_replicated_tables() {
        let pg = PgCluster::start();
        let mut c = pg.connect().await;
        c.batch_execute(SCHEMA).await.unwrap();
        preflight(&c).await.unwrap();
        let r1 = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        assert!(r1.slot_created);
        assert_eq!(r1.seeded_from, None);
        assert_eq!(r1.tables, ["public.audit_log", "public.lines", "public.orders", "public.sales", "public.sales_1"]);
        assert_eq!(r1.identity_full, r1.tables, "every replicated table gets REPLICA IDENTITY FULL");
        assert_eq!(replident(&c, "audit_log").await, "f");
        assert_eq!(replident(&c, "orders").await, "f");
        assert_eq!(replident(&c, "local_cache").await, "d", "an excluded table is untouched");
        let changed: Vec<(&str, i64)> = r1.sequences.iter().filter(|s| s.changed).map(|s| (s.name.as_str(), s.next_value)).collect();
        assert_eq!(changed, [("lines_id_seq", 100), ("orders_id_seq", 100)]);
        let inc: i64 =
            c.query_one("SELECT increment_by FROM pg_sequences WHERE sequencename = 'local_cache_id_seq'", &[]).await.unwrap().get(0);
        assert_eq!(inc, 1, "an excluded table's sequence is untouched");

        // R2 and the exclude globs, as the server sees them.
        let pubs = published(&c).await;
        assert_eq!(pubs, ["public.audit_log", "public.lines", "public.orders", "public.sales_1"]);
        assert!(pubs.iter().all(|t| !t.starts_with("branchsync.")), "R2: {pubs:?}");
        let all: bool = c.query_one("SELECT puballtables FROM pg_publication WHERE pubname = 'branchsync'", &[]).await.unwrap().get(0);
        assert!(!all);
        let slot =
            c.query_one("SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = 'branchsync'", &[]).await.unwrap();
        let (plugin, db): (String, String) = (slot.get(0), slot.get(1));
        assert_eq!((plugin.as_str(), db.as_str()), ("pgoutput", "postgres"));

        let r2 = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        assert!(!r2.slot_created);
        assert!(r2.identity_full.is_empty(), "{r2:?}");
        assert!(r2.sequences.iter().all(|s| !s.changed), "second run changes no sequence: {r2:?}");
        assert_eq!(r2.tables, r1.tables);
        assert_eq!(published(&c).await, pubs);
        let id: i32 = c.query_one("INSERT INTO orders (total) VALUES (2) RETURNING id", &[]).await.unwrap().get(0);
        assert_eq!(id, 100);

        // A new table joins the publication on the next run; a dropped one leaves it.
        c.batch_execute("CREATE TABLE products (id serial PRIMARY KEY); DROP TABLE audit_log;").await.unwrap();
        let r3 = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        assert!(r3.tables.contains(&"public.products".to_string()) && !r3.tables.contains(&"public.audit_log".to_string()));
        assert_eq!(published(&c).await, ["public.lines", "public.orders", "public.products", "public.sales_1"]);

        // Changing the identity in place is refused and changes nothing.
        for p in
            [params("main", 1, Role::Main), params("main", 0, Role::Branch), InitParams { stride: 50, ..params("main", 0, Role::Main) }]
        {
            let e = init(&mut c, &p).await.unwrap_err();
            assert!(matches!(e, EngineError::Misconfigured { .. }), "{e}");
            assert!(e.to_string().contains("re-seed"), "{e}");
        }
        let row = c.query_one("SELECT name, node_index, role, stride FROM branchsync.node", &[]).await.unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, String>(2), row.get::<_, i32>(3)),
            ("main".into(), 0, "main".into(), 100)
        );
    }

    #[tokio::test]
    async fn init_reports_the_application_code_that_runs_inside_apply() {
        let pg = PgCluster::start();
        let mut c = pg.connect().await;
        c.batch_execute(SCHEMA).await.unwrap();
        c.batch_execute(
            "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
             CREATE TRIGGER plain BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION noop();
             CREATE TRIGGER always_on BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION noop();
             ALTER TABLE orders ENABLE ALWAYS TRIGGER always_on;
             CREATE TRIGGER replica_on BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION noop();
             ALTER TABLE orders ENABLE REPLICA TRIGGER replica_on;
             CREATE RULE no_delete AS ON DELETE TO orders DO INSTEAD NOTHING;",
        )
        .await
        .unwrap();
        let r = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        assert_eq!(
            r.apply_time_code,
            vec!["rule no_delete on orders", "trigger always_on on orders (ENABLE ALWAYS TRIGGER)", "trigger replica_on on orders (ENABLE REPLICA TRIGGER)"],
            "a trigger enabled the default way does not fire under apply"
        );
    }

    #[tokio::test]
    async fn an_empty_scope_empties_the_publication() {
        let pg = PgCluster::start();
        let mut c = pg.connect().await;
        c.batch_execute(SCHEMA).await.unwrap();
        init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        c.batch_execute("ALTER PUBLICATION branchsync ADD TABLES IN SCHEMA branchsync").await.unwrap();
        let p = InitParams { scope: Scope::new(&["nothing_here".into()], &[]).unwrap(), ..params("main", 0, Role::Main) };
        let r = init(&mut c, &p).await.unwrap();
        assert!(r.tables.is_empty() && r.sequences.is_empty());
        assert!(published(&c).await.is_empty(), "R2: the branchsync schema is removed too");
    }

    #[tokio::test]
    async fn a_copy_of_the_main_becomes_a_branch_that_resumes_the_relay_at_the_copy_point() {
        let pg = PgCluster::start();
        let mut c = pg.connect().await;
        c.batch_execute(SCHEMA).await.unwrap();
        let main = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        c.batch_execute(
            "INSERT INTO orders (total) VALUES (1), (2);
             UPDATE branchsync.node SET system_id = '4242';
             INSERT INTO branchsync.relay_head (pos) VALUES (42);
             INSERT INTO branchsync.progress (stream, pos) VALUES ('branch7', 9);
             INSERT INTO branchsync.conflicts (tbl, kind, rule) VALUES ('public.orders', 'update_update', 'lww');
             INSERT INTO branchsync.row_version (tbl, key, stamp, node) VALUES ('public.orders', '100', 1, 'main');",
        )
        .await
        .unwrap();

        let r = init(&mut c, &params("branch1", 1, Role::Branch)).await.unwrap();
        assert_eq!(r.seeded_from.as_deref(), Some("main"));
        assert!(r.slot_created, "the copied slot is replaced by a fresh one");
        assert_eq!(r.system_id, main.system_id);
        let progress: Vec<(String, i64, Option<String>)> = c
            .query("SELECT stream, pos, system_id FROM branchsync.progress ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        assert_eq!(progress, [("main".to_string(), 42, Some("4242".to_string()))]);
        let row = c.query_one("SELECT name, node_index, role, stride, system_id FROM branchsync.node", &[]).await.unwrap();
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, String>(2), row.get::<_, i32>(3), row.get::<_, String>(4)),
            ("branch1".into(), 1, "branch".into(), 100, main.system_id.to_string())
        );
        let counts: (i64, i64, i64) = {
            let r = c
                .query_one(
                    "SELECT (SELECT count(*) FROM branchsync.conflicts), (SELECT count(*) FROM branchsync.relay_head), (SELECT count(*) FROM branchsync.row_version)",
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1), r.get(2))
        };
        assert_eq!(counts, (0, 0, 1), "conflicts and relay head cleared, row versions kept");
        let orders = r.sequences.iter().find(|s| s.name == "orders_id_seq").unwrap();
        assert_eq!((orders.next_value, orders.changed), (201, true), "re-striped by residue above the main's 200");
        let id: i32 = c.query_one("INSERT INTO orders (total) VALUES (3) RETURNING id", &[]).await.unwrap().get(0);
        assert_eq!(id, 201);

        let again = init(&mut c, &params("branch1", 1, Role::Branch)).await.unwrap();
        assert_eq!(again.seeded_from, None);
        assert!(!again.slot_created && again.sequences.iter().all(|s| !s.changed));
        let pos: i64 = c.query_one("SELECT pos FROM branchsync.progress WHERE stream = 'main'", &[]).await.unwrap().get(0);
        assert_eq!(pos, 42);
    }

    #[tokio::test]
    async fn a_branch_restored_from_the_mains_dump_gets_its_own_stripe() {
        let (main_pg, branch_pg) = (PgCluster::start(), PgCluster::start());
        let mut main = main_pg.connect().await;
        main.batch_execute(SCHEMA).await.unwrap();
        init(&mut main, &params("main", 0, Role::Main)).await.unwrap();
        main.batch_execute("INSERT INTO orders (total) VALUES (1), (2); INSERT INTO branchsync.relay_head (pos) VALUES (17);")
            .await
            .unwrap();

        let dump = std::process::Command::new(pg_bin_dir().join("pg_dump"))
            .args(["-h", "127.0.0.1", "-p", &main_pg.port().to_string(), "-U", "postgres", "postgres"])
            .output()
            .unwrap();
        assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
        let mut psql = std::process::Command::new(pg_bin_dir().join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &branch_pg.port().to_string(),
                "-U",
                "postgres",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "postgres",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::io::Write::write_all(psql.stdin.as_mut().unwrap(), &dump.stdout).unwrap();
        drop(psql.stdin.take());
        assert!(psql.wait().unwrap().success());

        let mut branch = branch_pg.connect().await;
        let r = init(&mut branch, &params("branch1", 1, Role::Branch)).await.unwrap();
        assert_eq!(r.seeded_from.as_deref(), Some("main"));
        assert!(r.slot_created);
        let pos: i64 = branch.query_one("SELECT pos FROM branchsync.progress WHERE stream = 'main'", &[]).await.unwrap().get(0);
        assert_eq!(pos, 17);
        let sid: String = branch.query_one("SELECT system_id FROM branchsync.node", &[]).await.unwrap().get(0);
        assert_eq!(sid, r.system_id.to_string());
        assert_ne!(r.system_id, pg::system_identifier(&main).await.unwrap());
        let ids: Vec<i32> =
            branch.query("INSERT INTO orders (total) VALUES (5), (6) RETURNING id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [201, 301], "the main's residue 0 was replaced by the branch's 1");
        assert_eq!(published(&branch).await, published(&main).await);
    }
}
