//! `branchsync join`: the database work at both ends of a new branch's
//! start from a copy of the main taken while every site keeps selling.
//!
//! ```text
//!  main                                              joining branch
//!  pin the branch's ack at the log's head
//!  CREATE_REPLICATION_SLOT … TEMPORARY LOGICAL
//!     pgoutput (SNAPSHOT 'export')  ──> snapshot S, consistent point C
//!  probe; capture logs past it; P = last relay
//!     position committed before C
//!  pg_dump --schema-only --snapshot S  ─────────>  schema (empty database)
//!  COPY (SELECT …) TO STDOUT in S, per table ───>  COPY … FROM STDIN, one
//!                                                  transaction per table,
//!                                                  recorded in join_copied
//!                                                  relay progress = P; init
//! ```
//!
//! # Why the relay position is exact
//!
//! A snapshot exported by creating a logical slot sees exactly the
//! transactions whose commit record lies before the slot's consistent point
//! C (a logical slot decodes those at or after it). The main's capture logs
//! transactions in commit order, one completion record per transaction with
//! its commit LSN ([`crate::log::ChangeLog::visible_before_lsn`]), so the
//! relay entries at positions up to P are the transactions in the snapshot
//! and those after P the ones it lacks: the branch follows the relay after
//! P, with no gap and nothing applied twice (delta columns included). The
//! main's *current* WAL position beside `pg_export_snapshot()` would not do:
//! a commit record can precede that position while its transaction is still
//! invisible to the snapshot.
//!
//! # Crash safety
//!
//! Each table is copied in one transaction at the branch that also records
//! it in `branchsync.join_copied`, and the snapshot's identity (relay
//! position, consistent point, the main's log and cluster) is in
//! `branchsync.join_state`: a join killed at any point and run again skips
//! the tables it has if the main still holds the same snapshot, and
//! otherwise empties them and copies everything from the new one. The
//! relay progress row is written, and the join's rows deleted, in one
//! transaction at the end; `init` follows and is safe to run again.
//!
//! # What it must never do
//!
//! Copy into a database that holds data of its own unless the operator said
//! `--discard-local` (the caller checks, [`local_data`]); write the
//! `branchsync` schema's rows of the main; run anything at the branch while
//! its capture slot exists (the copy would be captured as the branch's own
//! sales: `--discard-local` drops the slot first).

use std::time::Duration;

use branchsync_proto::changeset::quote_ident;
use branchsync_proto::inspect::{JoinTable, TableName};
use tokio_postgres::Client;

use crate::pg::{fmt_lsn, parse_lsn};
use crate::state::{PUBLICATION, SLOT, STATE_DDL};
use crate::EngineError;

/// The join's own bookkeeping at the branch.
pub const JOIN_DDL: &str = "
CREATE TABLE IF NOT EXISTS branchsync.join_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    relay_epoch text NOT NULL,
    relay_pos bigint NOT NULL,
    relay_lsn bigint NOT NULL,
    main_system_id text NOT NULL,
    snapshot_lsn bigint NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS branchsync.join_copied (
    tbl text PRIMARY KEY,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    copied_at timestamptz NOT NULL DEFAULT now()
);
";

// ------------------------------------------------------------------ main side

/// A snapshot of the main held open for a joining branch: the replication
/// session that created it (idle; the snapshot and its temporary slot live
/// as long as it does).
pub struct HeldSnapshot {
    session: pgwire_replication::ReplicationClient,
    /// The exported snapshot's name (`SET TRANSACTION SNAPSHOT`).
    pub name: String,
    /// The slot's consistent point.
    pub lsn: u64,
}

impl HeldSnapshot {
    /// Creates a temporary logical slot `slot` exporting its snapshot.
    /// Slot creation waits for the transactions running when it starts
    /// (and prepared ones): after `wait` it gives up and names them,
    /// read through `observer`.
    pub async fn create(url: &str, slot: &str, wait: Duration, observer: &Client) -> Result<HeldSnapshot, EngineError> {
        // Named after the slot, so that a session left waiting by an
        // earlier attempt can be told apart from another shop's join.
        let app = format!("branchsync join {slot}");
        end_sessions(observer, &app, slot).await?;
        let cfg = crate::capture::stream::replication_config(url, slot, PUBLICATION)?.with_application_name(app.clone());
        let mut session = pgwire_replication::ReplicationClient::connect_gated(cfg)
            .await
            .map_err(|e| EngineError::ConnectionLost { context: format!("opening a replication session for join: {e}") })?;
        let command = format!("CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')", quote_ident(slot));
        let create = session.simple_query(&command);
        let rows = match tokio::time::timeout(wait, create).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                session.abort();
                return Err(EngineError::Misconfigured {
                    message: format!("cannot create the snapshot of the main for a joining branch: {e}"),
                    detail: "join creates a temporary logical replication slot that exports its snapshot.".into(),
                    hint: "The daemon's role needs the REPLICATION attribute (branchsync init gives it) and a free slot (max_replication_slots).".into(),
                })
            }
            Err(_) => {
                // The server goes on waiting for those transactions (and
                // would then create the slot) until its session is ended.
                let why = blocked(observer, wait).await;
                session.abort();
                end_sessions(observer, &app, slot).await?;
                return Err(why);
            }
        };
        let text = |i: usize| rows.first().and_then(|r| r.get(i)).and_then(|v| v.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned());
        let lsn = text(1).and_then(|l| parse_lsn(&l)).ok_or_else(|| EngineError::Corrupt("CREATE_REPLICATION_SLOT answered no consistent point".into()))?;
        let name = text(2).ok_or_else(|| EngineError::Corrupt("CREATE_REPLICATION_SLOT exported no snapshot".into()))?;
        Ok(HeldSnapshot { session, name, lsn })
    }

    /// Lets the snapshot and its slot go: the session is cut (a session
    /// that never started streaming waits for commands, not for a stop),
    /// and the server drops a temporary slot with its session.
    pub fn release(mut self) {
        self.session.abort();
    }
}

/// Ends the replication sessions named `app` (an earlier attempt's,
/// still waiting to create the slot or holding it) and waits, at most 10 s,
/// until the temporary slot `slot` is gone with them.
async fn end_sessions(observer: &Client, app: &str, slot: &str) -> Result<(), EngineError> {
    observer
        .execute("SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender' AND application_name = $1", &[&app])
        .await
        .map_err(EngineError::pg("ending an earlier join's replication session"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = observer
            .query_one(
                "SELECT (SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE backend_type = 'walsender' AND application_name = $1) \
                      + (SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE slot_name = $2 AND temporary)",
                &[&app, &slot],
            )
            .await
            .map_err(EngineError::pg("waiting for an earlier join's replication session to end"))?
            .get(0);
        if left == 0 || std::time::Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why slot creation did not finish: the transactions it waits for.
async fn blocked(observer: &Client, wait: Duration) -> EngineError {
    let mut who = Vec::new();
    if let Ok(rows) = observer
        .query(
            "SELECT pid, coalesce(usename::text, ''), coalesce(application_name, ''), coalesce(to_char(xact_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '') \
             FROM pg_catalog.pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() ORDER BY xact_start LIMIT 10",
            &[],
        )
        .await
    {
        for r in rows {
            // Another role's start time is hidden from the daemon's role.
            let since = r.get::<_, String>(3);
            let since = if since.is_empty() { String::new() } else { format!(" since {since}") };
            who.push(format!("pid {} (role \"{}\", application \"{}\") in a transaction{since}", r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, String>(2)));
        }
    }
    if let Ok(rows) = observer.query("SELECT gid, prepared::text FROM pg_catalog.pg_prepared_xacts ORDER BY prepared LIMIT 10", &[]).await {
        for r in rows {
            who.push(format!("prepared transaction \"{}\" (since {})", r.get::<_, String>(0), r.get::<_, String>(1)));
        }
    }
    EngineError::Misconfigured {
        message: format!("the main's snapshot for the joining branch waited {:.0} s for transactions to end", wait.as_secs_f64()),
        detail: if who.is_empty() { "No transaction was found running any more; run join again.".into() } else { format!("Waiting for: {}.", who.join("; ")) },
        hint: "End those transactions (a till or a session left in a transaction; COMMIT PREPARED or ROLLBACK PREPARED for a prepared one), then run branchsync join again.".into(),
    }
}

/// The replicated tables, their copied columns (not generated ones, in
/// attribute order) and the catalog's estimates of their rows and bytes.
pub async fn tables(client: &Client) -> Result<Vec<JoinTable>, EngineError> {
    let rows = client
        .query(
            "SELECT t.schemaname::text, t.tablename::text, greatest(c.reltuples, 0)::int8, pg_catalog.pg_relation_size(c.oid), \
                    array(SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 \
                          AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum) \
             FROM pg_catalog.pg_publication_tables t \
             JOIN pg_catalog.pg_class c ON c.oid = format('%I.%I', t.schemaname, t.tablename)::regclass \
             WHERE t.pubname = $1 AND t.schemaname <> 'branchsync' ORDER BY 1, 2",
            &[&PUBLICATION],
        )
        .await
        .map_err(EngineError::pg("listing the replicated tables"))?;
    Ok(rows
        .iter()
        .map(|r| JoinTable {
            table: TableName { schema: r.get(0), name: r.get(1) },
            rows_estimate: r.get::<_, i64>(2).max(0) as u64,
            bytes_estimate: r.get::<_, i64>(3).max(0) as u64,
            columns: r.get(4),
        })
        .collect())
}

/// Imports the held snapshot into a read-only transaction on `client`
/// (kept open for the whole join session).
pub async fn begin_in_snapshot(client: &Client, snapshot: &str) -> Result<(), EngineError> {
    client
        .batch_execute(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'", snapshot.replace('\'', "''")))
        .await
        .map_err(EngineError::pg("reading in the join snapshot"))
}

/// `COPY (SELECT …) TO STDOUT` of a table's copied columns, in the
/// snapshot transaction.
pub fn copy_out_sql(t: &JoinTable) -> String {
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
    format!("COPY (SELECT {} FROM {}.{}) TO STDOUT", cols.join(", "), quote_ident(&t.table.schema), quote_ident(&t.table.name))
}

/// The `pg_dump` to use: `BRANCHSYNC_PG_BIN`'s, one on `PATH`, or the
/// newest under `/usr/lib/postgresql` (it must be at least the server's
/// version).
fn pg_dump_path() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("BRANCHSYNC_PG_BIN") {
        let p = std::path::Path::new(&dir).join("pg_dump");
        if p.exists() {
            return p;
        }
    }
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin/pg_dump"))))
        .filter(|(_, p)| p.exists())
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| "pg_dump".into())
}

/// The main's schema in the snapshot, as SQL a branch with an empty
/// database runs: `pg_dump --schema-only` as the daemon's role, without the
/// `branchsync` schema, grants, publications and subscriptions, with the
/// owners (the ERP's role must own its tables at the shop too: it runs
/// there, and replayed schema changes run as a table's owner, never as a
/// superuser; [`create_schema`] checks those roles exist);
/// its event triggers and psql commands left out. Tables the role may not
/// read (those excluded from replication) are left to `pg_dump`'s `-T` and
/// described from the catalog instead ([`unreadable_tables_sql`]): they
/// exist at the branch, empty.
pub async fn schema_sql(url: &str, snapshot: &str, client: &Client) -> Result<String, EngineError> {
    let (rest, _) = crate::pg::split_root_cert(url);
    let cfg: tokio_postgres::Config = rest.parse().map_err(EngineError::pg("parsing the database URL"))?;
    let unreadable: Vec<(String, String, u32)> = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'branchsync') AND n.nspname NOT LIKE 'pg_toast%' \
               AND NOT c.relispartition AND NOT pg_catalog.has_table_privilege(c.oid, 'SELECT') ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(EngineError::pg("listing the tables the daemon may not read"))?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut cmd = tokio::process::Command::new(pg_dump_path());
    cmd.args(["--schema-only", "--no-privileges", "--no-publications", "--no-subscriptions", "--no-security-labels", "--exclude-schema=branchsync"]);
    cmd.arg(format!("--snapshot={snapshot}"));
    for (s, t, _) in &unreadable {
        cmd.arg(format!("--exclude-table={}.{}", quote_ident(s), quote_ident(t)));
    }
    if let Some(tokio_postgres::config::Host::Tcp(h)) = cfg.get_hosts().first() {
        cmd.arg("--host").arg(h);
    }
    #[cfg(unix)]
    if let Some(tokio_postgres::config::Host::Unix(p)) = cfg.get_hosts().first() {
        cmd.arg("--host").arg(p);
    }
    if let Some(port) = cfg.get_ports().first() {
        cmd.arg("--port").arg(port.to_string());
    }
    if let Some(u) = cfg.get_user() {
        cmd.arg("--username").arg(u);
    }
    if let Some(d) = cfg.get_dbname() {
        cmd.arg("--dbname").arg(d);
    }
    // The password through the environment, never on the command line.
    if let Some(p) = cfg.get_password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(p).into_owned());
    }
    cmd.arg("--no-password").kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| EngineError::Misconfigured {
        message: format!("cannot run pg_dump for the joining branch's schema: {e}"),
        detail: format!("Tried {}.", pg_dump_path().display()),
        hint: "Install PostgreSQL's client programs at the main (the version of its server or newer), or set BRANCHSYNC_PG_BIN to the directory that holds pg_dump.".into(),
    })?;
    if !out.status.success() {
        return Err(EngineError::Misconfigured {
            message: "pg_dump of the main's schema failed".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint: "Run pg_dump --schema-only as the daemon's role at the main to see why.".into(),
        });
    }
    let mut sql = keep_for_branch(&String::from_utf8_lossy(&out.stdout));
    sql.push_str(&unreadable_tables_sql(client, &unreadable).await?);
    Ok(sql)
}

/// A `pg_dump` script without what a branch must not run: psql's
/// backslash commands and branchsync's event triggers (`branchsync_*`,
/// with their comments), which call functions of the schema left out
/// (`init` installs the branch's own). The application's own event
/// triggers stay.
pub fn keep_for_branch(dump: &str) -> String {
    let mut out = String::with_capacity(dump.len());
    // pg_dump writes each object after a comment block naming its type.
    let mut skipping = false;
    for line in dump.split_inclusive('\n') {
        if line.starts_with('\\') {
            continue;
        }
        if let Some(head) = line.strip_prefix("-- Name: ") {
            skipping = (head.starts_with("branchsync_") && head.contains("; Type: EVENT TRIGGER;")) || head.starts_with("EVENT TRIGGER branchsync_");
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}

/// `CREATE TABLE` statements for tables the daemon's role may not read,
/// from the catalog: columns with their types, collations, defaults and
/// `NOT NULL`, then every constraint and index (after all tables, as
/// foreign keys may point at each other).
async fn unreadable_tables_sql(client: &Client, tables: &[(String, String, u32)]) -> Result<String, EngineError> {
    if tables.is_empty() {
        return Ok(String::new());
    }
    // The script runs after pg_dump's, whose search_path is empty: every
    // name the catalog prints (a foreign key's table, a type, a sequence in
    // a default) must come out schema-qualified, so it is read with an
    // empty search_path too, then the session's is put back.
    let old: String = client
        .query_one("SELECT pg_catalog.current_setting('search_path')", &[])
        .await
        .map_err(EngineError::pg("reading the search path"))?
        .get(0);
    client.execute("SELECT pg_catalog.set_config('search_path', '', false)", &[]).await.map_err(EngineError::pg("emptying the search path"))?;
    let sql = describe_tables(client, tables).await;
    client.execute("SELECT pg_catalog.set_config('search_path', $1, false)", &[&old]).await.map_err(EngineError::pg("restoring the search path"))?;
    sql
}

async fn describe_tables(client: &Client, tables: &[(String, String, u32)]) -> Result<String, EngineError> {
    let mut creates = String::new();
    let mut after = String::new();
    for (schema, name, oid) in tables {
        let q = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let cols = client
            .query(
                "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), \
                        CASE WHEN a.attcollation <> t.typcollation THEN ' COLLATE ' || pg_catalog.quote_ident(co.collname) ELSE '' END, \
                        CASE WHEN a.attgenerated = 's' THEN ' GENERATED ALWAYS AS (' || pg_catalog.pg_get_expr(d.adbin, d.adrelid) || ') STORED' \
                             WHEN a.attidentity = 'a' THEN ' GENERATED ALWAYS AS IDENTITY' \
                             WHEN a.attidentity = 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' \
                             ELSE coalesce(' DEFAULT ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid), '') END, a.attnotnull \
                 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation \
                 LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[oid],
            )
            .await
            .map_err(EngineError::pg(format!("describing {schema}.{name}")))?;
        let defs: Vec<String> = cols
            .iter()
            .map(|r| format!("    {} {}{}{}{}", quote_ident(&r.get::<_, String>(0)), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, String>(3), if r.get(4) { " NOT NULL" } else { "" }))
            .collect();
        // Sequences the table's columns own (serial columns): pg_dump
        // leaves them out with their table; a default names them.
        let owned = client
            .query(
                "SELECT pg_catalog.quote_ident(sn.nspname) || '.' || pg_catalog.quote_ident(s.relname), pg_catalog.quote_ident(a.attname) \
                 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
                 JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
                 WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                   AND d.refobjid = $1 AND d.deptype = 'a' ORDER BY 1",
                &[oid],
            )
            .await
            .map_err(EngineError::pg(format!("reading the sequences of {schema}.{name}")))?;
        creates.push_str(&format!("\n-- {schema}.{name}: not replicated; created empty\n"));
        for r in &owned {
            creates.push_str(&format!("CREATE SEQUENCE IF NOT EXISTS {};\n", r.get::<_, String>(0)));
            after.push_str(&format!("ALTER SEQUENCE {} OWNED BY {q}.{};\n", r.get::<_, String>(0), r.get::<_, String>(1)));
        }
        creates.push_str(&format!("CREATE TABLE {q} (\n{}\n);\n", defs.join(",\n")));
        let owner: String = client
            .query_one("SELECT pg_catalog.pg_get_userbyid(relowner)::text FROM pg_catalog.pg_class WHERE oid = $1", &[oid])
            .await
            .map_err(EngineError::pg(format!("reading the owner of {schema}.{name}")))?
            .get(0);
        for r in client
            .query("SELECT conname::text, pg_catalog.pg_get_constraintdef(oid) FROM pg_catalog.pg_constraint WHERE conrelid = $1 AND contype <> 'n' ORDER BY contype = 'f', conname", &[oid])
            .await
            .map_err(EngineError::pg(format!("reading the constraints of {schema}.{name}")))?
        {
            after.push_str(&format!("ALTER TABLE {q} ADD CONSTRAINT {} {};\n", quote_ident(&r.get::<_, String>(0)), r.get::<_, String>(1)));
        }
        for r in client
            .query(
                "SELECT pg_catalog.pg_get_indexdef(i.indexrelid) FROM pg_catalog.pg_index i \
                 WHERE i.indrelid = $1 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid)",
                &[oid],
            )
            .await
            .map_err(EngineError::pg(format!("reading the indexes of {schema}.{name}")))?
        {
            after.push_str(&format!("{};\n", r.get::<_, String>(0)));
        }
        // Its owned sequences follow the table.
        after.push_str(&format!("ALTER TABLE {q} OWNER TO {};\n", quote_ident(&owner)));
    }
    Ok(if creates.is_empty() { String::new() } else { format!("{creates}{after}") })
}

// ---------------------------------------------------------------- branch side

/// Where the branch's database stands before a join.
#[derive(Debug, Clone, Default)]
pub struct LocalData {
    /// Tables in the replicated schemas, with rows (`schema.name`, count).
    pub tables_with_rows: Vec<(String, i64)>,
    /// Tables in the replicated schemas.
    pub tables: usize,
    /// The branchsync node this database was initialised as, if any.
    pub node: Option<String>,
    /// A capture slot exists.
    pub slot: bool,
    /// A join of this database is under way (its state row).
    pub joining: Option<JoinState>,
    /// The relay progress of a join that finished (init may still be due).
    pub joined: bool,
}

/// `branchsync.join_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinState {
    pub relay_epoch: u64,
    pub relay_pos: u64,
    pub relay_lsn: u64,
    pub main_system_id: u64,
    pub snapshot_lsn: u64,
}

async fn exists(client: &Client, rel: &str) -> Result<bool, EngineError> {
    Ok(client
        .query_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[&rel])
        .await
        .map_err(EngineError::pg("looking at the branch's database"))?
        .get(0))
}

/// What the branch's database holds in `schemas`.
pub async fn local_data(client: &Client, schemas: &[String]) -> Result<LocalData, EngineError> {
    let mut d = LocalData::default();
    let tables: Vec<(String, String)> = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1) ORDER BY 1, 2",
            &[&schemas],
        )
        .await
        .map_err(EngineError::pg("listing the branch's tables"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    d.tables = tables.len();
    for (s, t) in &tables {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {}.{}", quote_ident(s), quote_ident(t)), &[])
            .await
            .map_err(EngineError::pg(format!("counting the rows of {s}.{t}")))?
            .get(0);
        if n > 0 {
            d.tables_with_rows.push((format!("{s}.{t}"), n));
        }
    }
    d.slot = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND database = current_database())", &[&SLOT])
        .await
        .map_err(EngineError::pg("looking for the capture slot"))?
        .get(0);
    if exists(client, "branchsync.node").await? {
        d.node = client.query_opt("SELECT name FROM branchsync.node", &[]).await.map_err(EngineError::pg("reading branchsync.node"))?.map(|r| r.get(0));
    }
    if exists(client, "branchsync.join_state").await? {
        d.joining = client
            .query_opt("SELECT relay_epoch, relay_pos, relay_lsn, main_system_id, snapshot_lsn FROM branchsync.join_state", &[])
            .await
            .map_err(EngineError::pg("reading branchsync.join_state"))?
            .map(|r| JoinState {
                relay_epoch: u64::from_str_radix(&r.get::<_, String>(0), 16).unwrap_or(0),
                relay_pos: r.get::<_, i64>(1) as u64,
                relay_lsn: r.get::<_, i64>(2) as u64,
                main_system_id: r.get::<_, String>(3).parse().unwrap_or(0),
                snapshot_lsn: r.get::<_, i64>(4) as u64,
            });
    }
    if d.joining.is_none() && d.node.is_none() && exists(client, "branchsync.progress").await? {
        d.joined = client
            .query_opt("SELECT 1 FROM branchsync.progress WHERE stream = $1", &[&crate::state::RELAY_STREAM])
            .await
            .map_err(EngineError::pg("reading branchsync.progress"))?
            .is_some();
    }
    Ok(d)
}

/// `--discard-local`: forgets this database's branchsync identity so the
/// copy is not captured as its own (drops the capture slot; clears the
/// node, progress, conflicts, parked rows and the join's rows).
pub async fn discard_local(client: &Client) -> Result<(), EngineError> {
    client
        .execute("SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND database = current_database()", &[&SLOT])
        .await
        .map_err(EngineError::pg("dropping the capture slot (is the branch's daemon still running?)"))?;
    if exists(client, "branchsync.node").await? {
        client
            .batch_execute(
                "DELETE FROM branchsync.progress; DELETE FROM branchsync.conflicts; DELETE FROM branchsync.parked; \
                 DELETE FROM branchsync.relay_head; DELETE FROM branchsync.node; DELETE FROM branchsync.ddl_log;",
            )
            .await
            .map_err(EngineError::pg("clearing this database's branchsync state"))?;
    }
    Ok(())
}

/// Creates the join's bookkeeping and records (or checks) the snapshot
/// being copied. Returns the tables already copied from this same
/// snapshot; tables copied from another (an earlier run whose snapshot the
/// main no longer holds) are emptied and copied again.
pub async fn begin(client: &mut Client, s: &JoinState, tables: &[TableName]) -> Result<Vec<String>, EngineError> {
    let tx = client.transaction().await.map_err(EngineError::pg("starting the join"))?;
    tx.batch_execute(&format!("SET LOCAL {} = on; SET LOCAL client_min_messages = warning", crate::ddl::triggers::INTERNAL_GUC)).await.map_err(EngineError::pg("starting the join"))?;
    tx.batch_execute(STATE_DDL).await.map_err(EngineError::pg("creating the branchsync schema"))?;
    tx.batch_execute(JOIN_DDL).await.map_err(EngineError::pg("creating the join's tables"))?;
    let old = tx
        .query_opt("SELECT relay_epoch, relay_pos, snapshot_lsn, main_system_id FROM branchsync.join_state", &[])
        .await
        .map_err(EngineError::pg("reading branchsync.join_state"))?;
    let same = old.as_ref().is_some_and(|r| {
        u64::from_str_radix(&r.get::<_, String>(0), 16).ok() == Some(s.relay_epoch)
            && r.get::<_, i64>(1) as u64 == s.relay_pos
            && r.get::<_, i64>(2) as u64 == s.snapshot_lsn
            && r.get::<_, String>(3) == s.main_system_id.to_string()
    });
    if !same {
        // A new snapshot: rows copied from another one (an earlier run's),
        // or the database's own (--discard-local), would meet the relay at
        // the wrong position. Every replicated table that has rows is
        // emptied, in one statement (foreign keys between them).
        let mut full = Vec::new();
        for t in tables {
            let q = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
            let exists: bool = tx.query_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[&q]).await.map_err(EngineError::pg("looking at the branch's tables"))?.get(0);
            if exists && tx.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {q})"), &[]).await.map_err(EngineError::pg(format!("looking at {t}")))?.get::<_, bool>(0) {
                full.push(q);
            }
        }
        if !full.is_empty() {
            tx.batch_execute(&format!("TRUNCATE {}", full.join(", "))).await.map_err(EngineError::pg("emptying the tables to copy"))?;
        }
        tx.batch_execute("DELETE FROM branchsync.join_copied; DELETE FROM branchsync.join_state").await.map_err(EngineError::pg("clearing an earlier join"))?;
        tx.execute(
            "INSERT INTO branchsync.join_state (relay_epoch, relay_pos, relay_lsn, main_system_id, snapshot_lsn) VALUES ($1, $2, $3, $4, $5)",
            &[&format!("{:016x}", s.relay_epoch), &(s.relay_pos as i64), &(s.relay_lsn as i64), &s.main_system_id.to_string(), &(s.snapshot_lsn as i64)],
        )
        .await
        .map_err(EngineError::pg("recording the join"))?;
    }
    let done = tx.query("SELECT tbl FROM branchsync.join_copied", &[]).await.map_err(EngineError::pg("reading branchsync.join_copied"))?.iter().map(|r| r.get(0)).collect();
    tx.commit().await.map_err(EngineError::pg("recording the join"))?;
    Ok(done)
}

/// Runs the main's schema script on a connection of its own (the script
/// changes session settings such as `search_path`).
pub async fn create_schema(url: &str, sql: &str) -> Result<(), EngineError> {
    let conn = crate::pg::connect(url, "branchsync join (schema)").await?;
    let owners = script_owners(sql);
    let missing: Vec<String> = conn
        .client
        .query("SELECT r FROM unnest($1::text[]) r WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) ORDER BY r", &[&owners])
        .await
        .map_err(EngineError::pg("looking for the roles that own the main's tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        return Err(EngineError::Misconfigured {
            message: format!("the role(s) {} own tables at the main but do not exist here", missing.join(", ")),
            detail: "The shop's copy keeps the main's owners: the ERP runs here as the role that owns its tables, and schema changes from the main are replayed as a table's owner, never as a superuser.".into(),
            hint: format!("Create them here as at the main (for example CREATE ROLE {} LOGIN PASSWORD '…'), then run branchsync join again.", quote_ident(&missing[0])),
        });
    }
    conn.client.batch_execute(&format!("SET client_min_messages = warning;\nBEGIN;\n{sql}\nCOMMIT;")).await.map_err(EngineError::pg("creating the main's schema here"))
}

/// The roles a `pg_dump` script gives objects to (`… OWNER TO role;`).
pub fn script_owners(sql: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in sql.lines() {
        if !line.starts_with("ALTER ") {
            continue;
        }
        let Some(at) = line.find(" OWNER TO ") else { continue };
        let name = line[at + " OWNER TO ".len()..].trim_end().trim_end_matches(';');
        let name = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\""),
            None => name.to_string(),
        };
        if !name.is_empty() && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// Opens the transaction that copies one table: apply's session role (no
/// user triggers, no foreign-key checks: the snapshot is consistent). The
/// table is empty ([`begin`] emptied it; a copy cut short committed
/// nothing).
pub async fn begin_table(client: &Client, t: &JoinTable) -> Result<String, EngineError> {
    let q = format!("{}.{}", quote_ident(&t.table.schema), quote_ident(&t.table.name));
    client
        .batch_execute(&format!("BEGIN; SET LOCAL session_replication_role = replica; SET LOCAL {} = on", crate::ddl::triggers::INTERNAL_GUC))
        .await
        .map_err(EngineError::pg(format!("starting the copy of {}", t.table)))?;
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
    Ok(format!("COPY {q} ({}) FROM STDIN", cols.join(", ")))
}

/// Records a copied table and commits its transaction.
pub async fn finish_table(client: &Client, t: &JoinTable, rows: u64, bytes: u64) -> Result<(), EngineError> {
    client
        .execute("INSERT INTO branchsync.join_copied (tbl, rows, bytes) VALUES ($1, $2, $3)", &[&t.table.to_string(), &(rows as i64), &(bytes as i64)])
        .await
        .map_err(EngineError::pg("recording a copied table"))?;
    client.batch_execute("COMMIT").await.map_err(EngineError::pg(format!("committing the copy of {}", t.table)))
}

/// Every table is in: the relay progress row (the branch follows the
/// main's relay after `relay_pos`), the join's rows gone, in one
/// transaction.
pub async fn finish(client: &mut Client, s: &JoinState) -> Result<(), EngineError> {
    let tx = client.transaction().await.map_err(EngineError::pg("finishing the join"))?;
    tx.execute(
        "INSERT INTO branchsync.progress (stream, pos, lsn, system_id, epoch) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (stream) DO UPDATE SET pos = excluded.pos, lsn = excluded.lsn, system_id = excluded.system_id, epoch = excluded.epoch, updated_at = now()",
        &[&crate::state::RELAY_STREAM, &(s.relay_pos as i64), &(s.relay_lsn as i64), &s.main_system_id.to_string(), &format!("{:016x}", s.relay_epoch)],
    )
    .await
    .map_err(EngineError::pg("recording where the main's relay resumes"))?;
    tx.batch_execute("DELETE FROM branchsync.join_copied; DELETE FROM branchsync.join_state").await.map_err(EngineError::pg("finishing the join"))?;
    tx.commit().await.map_err(EngineError::pg("finishing the join"))?;
    tracing::info!(relay_pos = s.relay_pos, snapshot_lsn = %fmt_lsn(s.snapshot_lsn), "joined: the main's relay resumes after the copy");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_owners_of_a_dump_are_read_quoted_or_not_once_each() {
        let dump = "CREATE TABLE public.t (id int);\nALTER TABLE public.t OWNER TO tryton;\nALTER SEQUENCE public.s OWNER TO \"Odoo \"\"A\"\"\";\nALTER TABLE public.u OWNER TO tryton;\n    -- not ALTER x OWNER TO y;\n";
        assert_eq!(script_owners(dump), vec!["tryton".to_string(), "Odoo \"A\"".to_string()]);
    }

    use super::*;

    #[test]
    fn a_dump_keeps_everything_but_psql_commands_and_event_triggers() {
        let dump = "\\restrict abc\nSET x = 1;\n--\n-- Name: t; Type: TABLE; Schema: public; Owner: -\n--\n\nCREATE TABLE public.t (id int);\n\n--\n-- Name: branchsync_ddl; Type: EVENT TRIGGER; Schema: -; Owner: -\n--\n\nCREATE EVENT TRIGGER branchsync_ddl ON ddl_command_end EXECUTE FUNCTION branchsync.capture_ddl();\n\n--\n-- Name: u; Type: TABLE; Schema: public; Owner: -\n--\n\nCREATE TABLE public.u (id int);\n\\unrestrict abc\n";
        let kept = keep_for_branch(dump);
        assert!(kept.contains("CREATE TABLE public.t") && kept.contains("CREATE TABLE public.u") && kept.contains("SET x = 1;"), "{kept}");
        assert!(!kept.contains("EVENT TRIGGER branchsync_ddl ON") && !kept.contains("\\restrict") && !kept.contains("\\unrestrict"), "{kept}");
    }
}
