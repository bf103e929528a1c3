//! DDL replication: schema changes travel in the WAL stream, in order with the
//! rows (DESIGN invariant 5, R18–R22).
//!
//! ```text
//!   ERP runs DDL ──> event trigger (ddl_command_end, ENABLE ALWAYS)
//!                      ├─ stripes new/altered sequences, REPLICA IDENTITY FULL
//!                      │  for keyless tables, adds new tables to the publication,
//!                      │  records column renames            (every node, always)
//!                      └─ pg_logical_emit_message(true, 'branchsync.ddl', json)
//!                         unless branchsync.replaying = on   (local DDL only)
//!   capture ──> parse::ddl_statements keeps only the DDL statements of the
//!               query string (DML in the same string arrives as rows), each
//!               at the firing where it ran ──> RowChange::Ddl
//!   apply   ──> parse::check (allow-list, R22) ──> SET ROLE <non-superuser>,
//!               search_path as at the author ──> run it, before later rows;
//!               a failure is recorded in branchsync.conflicts and skipped
//! ```
//!
//! # What this module owns
//!
//! * [`triggers`]: the SQL `init` installs — event triggers, the striping
//!   function they call, the scope they consult and the DDL history table.
//! * [`parse`]: splitting and classifying query strings with PostgreSQL's own
//!   parser (`pg_query`), and the allow-list replay enforces.
//!
//! It never runs DDL received from a peer itself: apply does, through
//! [`parse::check`] and as a non-superuser role.
//!
//! # Why it is correct
//!
//! * The message is transactional, so a rolled-back DDL is never sent, and it
//!   sits in the WAL exactly where the DDL ran: rows written before it were
//!   decoded with the old schema, rows after it with the new one.
//! * Triggers are `ENABLE ALWAYS`, so they fire under
//!   `session_replication_role = replica` too: DDL that apply replays gets its
//!   sequences striped and its replica identity fixed at every node. Apply sets
//!   [`REPLAYING_GUC`], which stops the trigger from emitting the statement a
//!   second time (apply writes the author's message itself, so the main's
//!   relay carries it on to the other branches).

pub mod parse;
pub mod triggers;

use serde::{Deserialize, Serialize};

/// Prefix of the transactional logical message the event trigger writes for
/// each DDL query string (once per transaction and query string).
pub const DDL_MESSAGE_PREFIX: &str = "branchsync.ddl";

/// Session setting apply turns on: the trigger still stripes and fixes
/// replica identity, but does not emit a message (R19).
pub const REPLAYING_GUC: &str = "branchsync.replaying";

/// Content of a [`DDL_MESSAGE_PREFIX`] message, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlMessage {
    /// `current_query()` at the author: the whole query string, which may hold
    /// several statements, DML among them.
    pub query: String,
    /// `current_setting('search_path')` when the DDL ran.
    pub search_path: String,
    /// `current_user` when the DDL ran (the role apply replays it as).
    pub role: String,
    /// Command tag of the statement that fired the trigger, e.g. `CREATE TABLE`.
    pub tag: String,
    /// Which firing of the trigger within this query string (1 = first):
    /// statement `ordinal` of the string when positions are exact.
    #[serde(default = "first")]
    pub ordinal: u32,
    /// Identifies one run of one query string (its statement time and a hash
    /// of its text).
    #[serde(default)]
    pub key: String,
}

fn first() -> u32 {
    1
}

/// Who may change the schema, and as whom replayed DDL runs (`[ddl]` in the
/// configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DdlPolicy {
    /// `[ddl] from = "any"`: DDL from branches is replayed too. The default
    /// (`"main"`) replays only the main's DDL; a branch's own DDL stays local.
    pub from_any: bool,
    /// `[ddl] run_as`: the role replayed DDL runs as. Default: the role that
    /// ran it at the author, which must exist here and not be a superuser.
    pub run_as: Option<String>,
}
