//! What `branchsync init` does to the database; idempotent.
//!
//! 1. [`preflight`]: PostgreSQL ≥ 15, `wal_level = logical`,
//!    `track_commit_timestamp = on`, a free replication slot, a role that may
//!    replicate. Each failure names the setting, its value and the fix.
//! 2. The state schema `branchsync` ([`crate::state::STATE_DDL`]).
//! 3. Copied state (a branch seeded from a copy of the main's database) is
//!    recognised by a node row with another name, cleared, and the main's
//!    relay position at copy time becomes this branch's relay progress.
//! 4. `REPLICA IDENTITY FULL` on replicated tables without a primary key.
//! 5. The publication lists exactly the replicated tables (never the
//!    `branchsync` schema, R2).
//! 6. Sequences are striped ([`crate::keys`]).
//! 7. The logical slot is created last, outside any transaction.
//!
//! It never changes application tables beyond their replica identity.

use tokio_postgres::Client;

use crate::keys::{self, StripedSequence};
use crate::scope::Scope;
use crate::state::{PUBLICATION, SLOT, STATE_DDL};
use crate::{pg, EngineError, Role};

/// What `init` is asked to do.
#[derive(Debug, Clone)]
pub struct InitParams {
    /// Node name.
    pub node: String,
    /// Node index.
    pub index: u32,
    /// Main or branch.
    pub role: Role,
    /// Key stride.
    pub stride: u32,
    /// Replicated tables.
    pub scope: Scope,
}

/// What `init` did.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// Cluster identifier.
    pub system_id: u64,
    /// Replicated tables, `schema.table`.
    pub tables: Vec<String>,
    /// Tables given `REPLICA IDENTITY FULL` by this run.
    pub identity_full: Vec<String>,
    /// Every sequence and its stripe.
    pub sequences: Vec<StripedSequence>,
    /// The slot was created by this run.
    pub slot_created: bool,
    /// Name of the node whose copied state was found and cleared.
    pub seeded_from: Option<String>,
}

fn misconfigured(message: String, detail: String, hint: &str) -> EngineError {
    EngineError::Misconfigured { message, detail, hint: hint.into() }
}

async fn setting(client: &Client, name: &str) -> Result<String, EngineError> {
    let r = client.query_one("SELECT current_setting($1)", &[&name]).await.map_err(EngineError::pg(format!("reading {name}")))?;
    Ok(r.get(0))
}

/// Checks that the server is configured the way branchsync needs.
pub async fn preflight(client: &Client) -> Result<(), EngineError> {
    let version: i32 = setting(client, "server_version_num").await?.parse().unwrap_or(0);
    if version < 150_000 {
        return Err(misconfigured(
            format!("PostgreSQL {} is too old", setting(client, "server_version").await?),
            "branchsync needs PostgreSQL 15 or later.".into(),
            "Upgrade the server to PostgreSQL 15 or later.",
        ));
    }
    let wal = setting(client, "wal_level").await?;
    if wal != "logical" {
        return Err(misconfigured(
            format!("wal_level is \"{wal}\" but branchsync needs \"logical\""),
            "Logical decoding captures committed transactions from the WAL; it needs wal_level = logical.".into(),
            "Set wal_level = logical in postgresql.conf (or run ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL.",
        ));
    }
    let ts = setting(client, "track_commit_timestamp").await?;
    if ts != "on" {
        return Err(misconfigured(
            format!("track_commit_timestamp is \"{ts}\" but branchsync needs \"on\""),
            "Conflict decisions need the commit time and origin of every row version.".into(),
            "Set track_commit_timestamp = on in postgresql.conf (or run ALTER SYSTEM SET track_commit_timestamp = on) and restart PostgreSQL.",
        ));
    }
    let r = client
        .query_one(
            "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int, \
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1), \
                    (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user)",
            &[&SLOT],
        )
        .await
        .map_err(EngineError::pg("checking replication slots"))?;
    let (free, ours, can): (i32, bool, bool) = (r.get(0), r.get(1), r.get(2));
    if free < 1 && !ours {
        return Err(misconfigured(
            "no free replication slot".into(),
            format!("max_replication_slots is {} and every slot is in use.", setting(client, "max_replication_slots").await?),
            "Raise max_replication_slots in postgresql.conf and restart PostgreSQL.",
        ));
    }
    if !can {
        return Err(misconfigured(
            "the database role may not replicate".into(),
            "branchsync creates a logical slot and replication origins.".into(),
            "Connect as a superuser (database.url), or ALTER ROLE … SUPERUSER for the branchsync role.",
        ));
    }
    Ok(())
}

/// Prepares the database; safe to run again.
pub async fn init(client: &mut Client, p: &InitParams) -> Result<InitReport, EngineError> {
    preflight(client).await?;
    let system_id = pg::system_identifier(client).await?;
    let tx = client.transaction().await.map_err(EngineError::pg("starting init"))?;
    tx.batch_execute(STATE_DDL).await.map_err(EngineError::pg("creating the branchsync schema"))?;
    let mut seeded_from = None;
    if let Some(r) = tx.query_opt("SELECT name, node_index, role, stride FROM branchsync.node", &[]).await.map_err(EngineError::pg("reading branchsync.node"))? {
        let (name, index, role, stride): (String, i32, String, i32) = (r.get(0), r.get(1), r.get(2), r.get(3));
        if name != p.node {
            // A copy of another node's database: clear its state.
            let head: Option<i64> = tx
                .query_opt("SELECT pos FROM branchsync.relay_head", &[])
                .await
                .map_err(EngineError::pg("reading the relay head"))?
                .map(|r| r.get(0));
            tx.batch_execute("DELETE FROM branchsync.progress; DELETE FROM branchsync.conflicts; DELETE FROM branchsync.relay_head; DELETE FROM branchsync.node;")
                .await
                .map_err(EngineError::pg("clearing copied state"))?;
            if role == "main" && p.role == Role::Branch {
                tx.execute("INSERT INTO branchsync.progress (stream, pos) VALUES ($1, $2)", &[&name, &head.unwrap_or(0)])
                    .await
                    .map_err(EngineError::pg("recording where the relay resumes"))?;
            }
            tracing::info!(copied_from = %name, relay_head = ?head, "cleared state copied from another node");
            seeded_from = Some(name);
        } else if index as u32 != p.index || role != p.role.to_string() || stride as u32 != p.stride {
            return Err(misconfigured(
                format!("node \"{name}\" was initialised with index {index}, role {role}, stride {stride}"),
                format!("The configuration now says index {}, role {}, stride {}.", p.index, p.role, p.stride),
                "A node's identity cannot change in place; re-seed it from a copy of the main's database.",
            ));
        }
    }
    tx.execute(
        "INSERT INTO branchsync.node (name, node_index, role, stride, system_id) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (singleton) DO UPDATE SET system_id = excluded.system_id",
        &[&p.node, &(p.index as i32), &p.role.to_string(), &(p.stride as i32), &system_id.to_string()],
    )
    .await
    .map_err(EngineError::pg("recording the node"))?;
    // Tables in scope, and which have no primary key.
    let rows = tx
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname = ANY($1) ORDER BY 1, 2",
            &[&p.scope.schemas().to_vec()],
        )
        .await
        .map_err(EngineError::pg("listing tables"))?;
    let mut tables = Vec::new();
    let mut identity_full = Vec::new();
    for r in rows {
        let (schema, name, ident, has_pk): (String, String, String, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
        if !p.scope.includes(&schema, &name) {
            continue;
        }
        let q = format!("{}.{}", branchsync_proto::changeset::quote_ident(&schema), branchsync_proto::changeset::quote_ident(&name));
        if !has_pk && ident != "f" && ident != "i" {
            tx.batch_execute(&format!("ALTER TABLE {q} REPLICA IDENTITY FULL")).await.map_err(EngineError::pg(format!("setting REPLICA IDENTITY FULL on {schema}.{name}")))?;
            identity_full.push(format!("{schema}.{name}"));
        }
        tables.push(q);
    }
    let exists: bool = tx
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", &[&PUBLICATION])
        .await
        .map_err(EngineError::pg("reading publications"))?
        .get(0);
    if !exists {
        tx.batch_execute(&format!("CREATE PUBLICATION {PUBLICATION}")).await.map_err(EngineError::pg("creating the publication"))?;
    }
    if tables.is_empty() {
        let current: Vec<String> = tx
            .query("SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = $1", &[&PUBLICATION])
            .await
            .map_err(EngineError::pg("reading the publication"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !current.is_empty() {
            tx.batch_execute(&format!("ALTER PUBLICATION {PUBLICATION} DROP TABLE {}", current.join(", "))).await.map_err(EngineError::pg("emptying the publication"))?;
        }
    } else {
        tx.batch_execute(&format!("ALTER PUBLICATION {PUBLICATION} SET TABLE {}", tables.join(", "))).await.map_err(EngineError::pg("setting the publication's tables"))?;
    }
    tx.commit().await.map_err(EngineError::pg("committing init"))?;
    let sequences = keys::stripe_all(client, &p.scope, p.index, p.stride).await?;
    // The slot last, outside any transaction, after the publication exists.
    let slot_created = client
        .query_one(
            "SELECT count(*) = 0 FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await
        .map_err(EngineError::pg("reading replication slots"))?
        .get::<_, bool>(0);
    if slot_created {
        client
            .query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text", &[&SLOT])
            .await
            .map_err(EngineError::pg("creating the replication slot"))?;
    }
    Ok(InitReport {
        system_id,
        tables: tables.iter().map(|t| t.replace('"', "")).collect(),
        identity_full,
        sequences,
        slot_created,
        seeded_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::PgCluster;

    fn params(node: &str, index: u32, role: Role) -> InitParams {
        InitParams { node: node.into(), index, role, stride: 100, scope: Scope::new(&["public".into()], &["local_*".into()]).unwrap() }
    }

    #[tokio::test]
    async fn init_is_idempotent_and_never_publishes_its_own_state() {
        let pg = PgCluster::start();
        let mut c = pg.connect().await;
        c.batch_execute("CREATE TABLE t (id serial PRIMARY KEY); CREATE TABLE nokey (v int); CREATE TABLE local_cache (k text PRIMARY KEY);").await.unwrap();
        let r1 = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        assert!(r1.slot_created);
        assert_eq!(r1.identity_full, vec!["public.nokey".to_string()]);
        let r2 = init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        assert!(!r2.slot_created && r2.identity_full.is_empty() && r2.sequences.iter().all(|s| !s.changed), "{r2:?}");
        let published: Vec<String> = c
            .query("SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'branchsync' ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(published, vec!["public.nokey".to_string(), "public.t".to_string()], "R2: no branchsync table, no excluded table");
        // A changed identity is refused.
        assert!(matches!(init(&mut c, &params("main", 0, Role::Branch)).await, Err(EngineError::Misconfigured { .. })));
    }

    #[tokio::test]
    async fn a_copy_of_the_main_becomes_a_branch_that_resumes_the_relay_at_the_copy_point() {
        let pg = PgCluster::start();
        let mut c = pg.connect().await;
        c.batch_execute("CREATE TABLE t (id serial PRIMARY KEY); INSERT INTO t SELECT FROM generate_series(1, 5);").await.unwrap();
        init(&mut c, &params("main", 0, Role::Main)).await.unwrap();
        c.batch_execute("INSERT INTO branchsync.relay_head (pos) VALUES (42)").await.unwrap();
        let r = init(&mut c, &params("branch1", 1, Role::Branch)).await.unwrap();
        assert_eq!(r.seeded_from.as_deref(), Some("main"));
        let pos: i64 = c.query_one("SELECT pos FROM branchsync.progress WHERE stream = 'main'", &[]).await.unwrap().get(0);
        assert_eq!(pos, 42);
        let id: i32 = c.query_one("INSERT INTO t DEFAULT VALUES RETURNING id", &[]).await.unwrap().get(0);
        assert_eq!(id % 100, 1, "re-striped by residue for the branch");
    }

    #[tokio::test]
    async fn preflight_names_the_setting_and_the_fix() {
        let pg = PgCluster::start_with(&["wal_level = replica"]);
        let c = pg.connect().await;
        let e = preflight(&c).await.unwrap_err().to_string();
        assert!(e.contains("wal_level") && e.contains("logical") && e.contains("restart"), "{e}");
    }
}
