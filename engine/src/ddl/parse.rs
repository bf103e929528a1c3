//! Query strings through PostgreSQL's own parser (`pg_query`): which
//! statements of a string are DDL, where each one ran, and whether a peer's
//! statement may be replayed here (R19, R22).
//!
//! # Splitting (capture)
//!
//! The event trigger reports `current_query()`, which is the *whole* query
//! string, however many statements it holds. [`ddl_statements`] splits it and
//! keeps the statements that fire event triggers, in order; DML in the same
//! string already travels as rows and must not run twice. `CREATE TABLE AS`
//! and `SELECT INTO` are rewritten `WITH NO DATA`: their rows travel as rows
//! too (the trigger re-inserts them after the table joined the publication).
//!
//! The trigger numbers its firings within one query string (`ordinal`). When
//! every DDL statement of the string fires it exactly once (no `DO` block, no
//! `CREATE EXTENSION`, no statement that may run DDL inside a function),
//! firing `n` is statement `n`, and each statement is placed in the stream
//! exactly where it ran ([`SplitQuery::exact`]). Otherwise all DDL statements
//! of the string go at the first firing.
//!
//! # Checking (apply)
//!
//! [`check`] is the allow-list replay enforces on every statement a peer sent,
//! whatever the sender claims. From the main: the schema objects an ERP's
//! module install creates, changes and drops (tables, indexes, sequences,
//! views, types, functions, triggers, comments, grants on objects), and `DO`
//! blocks whose every statement is such DDL. From a branch (`[ddl] from =
//! "any"`): additive DDL only (create, add column or constraint, comment), so
//! a stolen shop token cannot drop or rewrite anything. Never: roles,
//! databases, tablespaces, `ALTER SYSTEM`, event triggers, publications,
//! subscriptions, foreign servers, `COPY`, `LOAD`, ownership changes, or
//! anything that is not DDL.
//!
//! The parser runs on text from the network: it never panics the caller (a
//! panic inside `pg_query` is caught and reported as a rejection).

use pg_query::protobuf::{AlterTableType, ObjectType};
use pg_query::NodeEnum;

/// A schema-qualified or bare relation name as written in a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationName {
    /// Schema, when the statement names one.
    pub schema: Option<String>,
    /// Relation name.
    pub name: String,
}

/// One DDL statement of a query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlStatement {
    /// The text to replay: the statement as written, or rewritten `WITH NO
    /// DATA` for `CREATE TABLE AS` and `SELECT INTO`.
    pub sql: String,
    /// Parse node name, e.g. `CreateStmt`.
    pub kind: &'static str,
    /// The relations the statement creates or changes (empty for objects that
    /// are not relations: types, functions, ...). Used for the scope.
    pub relations: Vec<RelationName>,
    /// A temporary object: never replicated.
    pub temporary: bool,
    /// Node-local: sequence state (`ALTER SEQUENCE`); re-striped, never sent.
    pub local: bool,
}

/// The DDL statements of a query string, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitQuery {
    /// Every statement that fires the event trigger, in order.
    pub statements: Vec<DdlStatement>,
    /// `true` when firing `n` of the trigger is statement `n` (see the module
    /// documentation).
    pub exact: bool,
}

/// Why a statement is not split, or not replayed here: a PostgreSQL-style
/// message, detail and hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlRejection {
    /// Lowercase primary message.
    pub message: String,
    /// Sentence(s) saying what was found.
    pub detail: String,
    /// Sentence(s) saying what to do.
    pub hint: String,
}

impl std::fmt::Display for DdlRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DdlRejection {}

fn reject(message: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> DdlRejection {
    DdlRejection { message: message.into(), detail: detail.into(), hint: hint.into() }
}

/// Runs a `pg_query` call, turning its errors and panics into rejections.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, pg_query::Error>) -> Result<T, DdlRejection> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(reject(format!("{what} does not parse"), format!("PostgreSQL's parser says: {e}."), "")),
        Err(_) => Err(reject(format!("{what} could not be parsed"), "The SQL parser failed on this text.", "")),
    }
}

/// Parses one or more statements; `(text of each statement, its node)`.
fn parse_all(query: &str) -> Result<Vec<(String, NodeEnum)>, DdlRejection> {
    let parsed = guarded("the query string", || pg_query::parse(query))?;
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    let bytes = query.as_bytes();
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.clone()) else { continue };
        let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(bytes.len());
        // A length of 0 means "to the end of the string".
        let end = match usize::try_from(raw.stmt_len).unwrap_or(0) {
            0 => bytes.len(),
            n => (start + n).min(bytes.len()),
        };
        let text = query.get(start..end).unwrap_or(query).trim().trim_end_matches(';').trim().to_string();
        out.push((text, node));
    }
    Ok(out)
}

/// The parse node's name.
fn kind_of(node: &NodeEnum) -> &'static str {
    macro_rules! kinds {
        ($($k:ident),* $(,)?) => {
            match node {
                $(NodeEnum::$k(_) => stringify!($k),)*
                _ => "other statement",
            }
        };
    }
    kinds!(
        InsertStmt, DeleteStmt, UpdateStmt, MergeStmt, SelectStmt, CreateSchemaStmt, AlterTableStmt, AlterDomainStmt, GrantStmt,
        GrantRoleStmt, AlterDefaultPrivilegesStmt, CopyStmt, VariableSetStmt, VariableShowStmt, CreateStmt, CreateTableSpaceStmt,
        DropTableSpaceStmt, AlterTableSpaceOptionsStmt, AlterTableMoveAllStmt, CreateExtensionStmt, AlterExtensionStmt,
        AlterExtensionContentsStmt, CreateFdwStmt, AlterFdwStmt, CreateForeignServerStmt, AlterForeignServerStmt,
        CreateForeignTableStmt, CreateUserMappingStmt, AlterUserMappingStmt, DropUserMappingStmt, ImportForeignSchemaStmt,
        CreatePolicyStmt, AlterPolicyStmt, CreateAmStmt, CreateTrigStmt, CreateEventTrigStmt, AlterEventTrigStmt, CreatePlangStmt,
        CreateRoleStmt, AlterRoleStmt, AlterRoleSetStmt, DropRoleStmt, CreateSeqStmt, AlterSeqStmt, DefineStmt, CreateDomainStmt,
        CreateOpClassStmt, CreateOpFamilyStmt, AlterOpFamilyStmt, DropStmt, TruncateStmt, CommentStmt, SecLabelStmt,
        DeclareCursorStmt, ClosePortalStmt, FetchStmt, IndexStmt, CreateStatsStmt, AlterStatsStmt, CreateFunctionStmt,
        AlterFunctionStmt, DoStmt, CallStmt, RenameStmt, AlterObjectDependsStmt, AlterObjectSchemaStmt, AlterOwnerStmt,
        AlterOperatorStmt, AlterTypeStmt, RuleStmt, NotifyStmt, ListenStmt, UnlistenStmt, TransactionStmt, CompositeTypeStmt,
        CreateEnumStmt, CreateRangeStmt, AlterEnumStmt, ViewStmt, LoadStmt, CreatedbStmt, AlterDatabaseStmt,
        AlterDatabaseRefreshCollStmt, AlterDatabaseSetStmt, DropdbStmt, AlterSystemStmt, ClusterStmt, VacuumStmt, ExplainStmt,
        CreateTableAsStmt, RefreshMatViewStmt, CheckPointStmt, DiscardStmt, LockStmt, ConstraintsSetStmt, ReindexStmt,
        CreateConversionStmt, CreateCastStmt, CreateTransformStmt, PrepareStmt, ExecuteStmt, DeallocateStmt, DropOwnedStmt,
        ReassignOwnedStmt, AlterTsdictionaryStmt, AlterTsconfigurationStmt, CreatePublicationStmt, AlterPublicationStmt,
        CreateSubscriptionStmt, AlterSubscriptionStmt, DropSubscriptionStmt, AlterCollationStmt,
    )
}

/// How a statement relates to event triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// DML, queries, transaction control, session and maintenance commands:
    /// they fire no event trigger; their effects travel as rows (or not at all).
    NotDdl,
    /// Shared (cluster-wide) objects: roles, databases, tablespaces, and event
    /// triggers themselves. They fire no event trigger and are not replicated.
    Global,
    /// Fires `ddl_command_end` once.
    Ddl,
    /// May fire the event trigger any number of times (`DO`, extensions), or
    /// may run DDL inside a function it calls (`SELECT f()`, `CALL`).
    Opaque,
}

fn class_of(node: &NodeEnum) -> Class {
    use NodeEnum as N;
    match node {
        N::SelectStmt(s) if s.into_clause.is_some() => Class::Ddl,
        N::SelectStmt(_) | N::CallStmt(_) | N::ExecuteStmt(_) => Class::Opaque,
        N::DoStmt(_) | N::CreateExtensionStmt(_) | N::AlterExtensionStmt(_) | N::AlterExtensionContentsStmt(_) => Class::Opaque,
        N::InsertStmt(_)
        | N::UpdateStmt(_)
        | N::DeleteStmt(_)
        | N::MergeStmt(_)
        | N::CopyStmt(_)
        | N::TruncateStmt(_)
        | N::TransactionStmt(_)
        | N::VariableSetStmt(_)
        | N::VariableShowStmt(_)
        | N::ExplainStmt(_)
        | N::LockStmt(_)
        | N::NotifyStmt(_)
        | N::ListenStmt(_)
        | N::UnlistenStmt(_)
        | N::PrepareStmt(_)
        | N::DeallocateStmt(_)
        | N::DeclareCursorStmt(_)
        | N::FetchStmt(_)
        | N::ClosePortalStmt(_)
        | N::DiscardStmt(_)
        | N::CheckPointStmt(_)
        | N::VacuumStmt(_)
        | N::ClusterStmt(_)
        | N::ReindexStmt(_)
        | N::ConstraintsSetStmt(_)
        | N::LoadStmt(_) => Class::NotDdl,
        N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::GrantRoleStmt(_)
        | N::CreatedbStmt(_)
        | N::AlterDatabaseStmt(_)
        | N::AlterDatabaseRefreshCollStmt(_)
        | N::AlterDatabaseSetStmt(_)
        | N::DropdbStmt(_)
        | N::CreateTableSpaceStmt(_)
        | N::DropTableSpaceStmt(_)
        | N::AlterTableSpaceOptionsStmt(_)
        | N::AlterSystemStmt(_)
        | N::CreateEventTrigStmt(_)
        | N::AlterEventTrigStmt(_) => Class::Global,
        N::DropStmt(d) if d.remove_type == ObjectType::ObjectEventTrigger as i32 => Class::Global,
        _ => Class::Ddl,
    }
}

fn range_var(r: &pg_query::protobuf::RangeVar) -> (RelationName, bool) {
    let name = RelationName { schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()), name: r.relname.clone() };
    (name, r.relpersistence == "t" || r.schemaname.starts_with("pg_temp"))
}

/// Names of a `DROP`'s objects when they are relations.
fn dropped_relations(d: &pg_query::protobuf::DropStmt) -> Vec<RelationName> {
    let relational = [
        ObjectType::ObjectTable,
        ObjectType::ObjectIndex,
        ObjectType::ObjectSequence,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectForeignTable,
    ];
    if !relational.iter().any(|t| *t as i32 == d.remove_type) {
        return Vec::new();
    }
    d.objects
        .iter()
        .filter_map(|o| match &o.node {
            Some(NodeEnum::List(l)) => {
                let parts: Vec<String> =
                    l.items.iter().filter_map(|i| if let Some(NodeEnum::String(s)) = &i.node { Some(s.sval.clone()) } else { None }).collect();
                match parts.as_slice() {
                    [name] => Some(RelationName { schema: None, name: name.clone() }),
                    [.., schema, name] => Some(RelationName { schema: Some(schema.clone()), name: name.clone() }),
                    [] => None,
                }
            }
            _ => None,
        })
        .collect()
}

/// The relations a DDL statement creates or changes, and whether it is about
/// a temporary object.
fn targets(node: &NodeEnum) -> (Vec<RelationName>, bool) {
    use NodeEnum as N;
    let one = |r: &Option<pg_query::protobuf::RangeVar>| match r {
        Some(r) => {
            let (n, t) = range_var(r);
            (vec![n], t)
        }
        None => (Vec::new(), false),
    };
    match node {
        N::CreateStmt(s) => one(&s.relation),
        N::AlterTableStmt(s) => one(&s.relation),
        N::IndexStmt(s) => one(&s.relation),
        N::CreateSeqStmt(s) => one(&s.sequence),
        N::AlterSeqStmt(s) => one(&s.sequence),
        N::ViewStmt(s) => one(&s.view),
        N::RenameStmt(s) => one(&s.relation),
        N::CreateTrigStmt(s) => one(&s.relation),
        N::RuleStmt(s) => one(&s.relation),
        N::CreatePolicyStmt(s) => one(&s.table),
        N::RefreshMatViewStmt(s) => one(&s.relation),
        N::AlterObjectSchemaStmt(s) => one(&s.relation),
        N::CreateTableAsStmt(s) => one(&s.into.as_ref().and_then(|i| i.rel.clone())),
        N::SelectStmt(s) => one(&s.into_clause.as_ref().and_then(|i| i.rel.clone())),
        N::DropStmt(d) => (dropped_relations(d), false),
        _ => (Vec::new(), false),
    }
}

/// `CREATE TABLE AS` / `SELECT INTO` → `CREATE TABLE … AS … WITH NO DATA`:
/// the table's rows travel as rows, so the receiver must not compute them.
fn without_data(node: &NodeEnum) -> Result<Option<String>, DdlRejection> {
    use pg_query::protobuf::{CreateTableAsStmt, Node};
    let stmt = match node {
        NodeEnum::CreateTableAsStmt(c) if c.objtype == ObjectType::ObjectTable as i32 => {
            let mut c = c.clone();
            if let Some(i) = c.into.as_mut() {
                i.skip_data = true;
            }
            *c
        }
        NodeEnum::SelectStmt(s) if s.into_clause.is_some() => {
            let mut s = s.clone();
            let Some(mut into) = s.into_clause.take() else { return Ok(None) };
            into.skip_data = true;
            CreateTableAsStmt {
                query: Some(Box::new(Node { node: Some(NodeEnum::SelectStmt(Box::new(*s))) })),
                into: Some(into),
                objtype: ObjectType::ObjectTable as i32,
                is_select_into: false,
                if_not_exists: false,
            }
        }
        _ => return Ok(None),
    };
    let node = NodeEnum::CreateTableAsStmt(Box::new(stmt));
    guarded("the rewritten CREATE TABLE AS", || node.deparse()).map(Some)
}

/// Splits a query string that ran DDL into its DDL statements (see the module
/// documentation). A string that does not parse is an error; so is one whose
/// `DO` block is not pure DDL (its DML would run twice).
pub fn ddl_statements(query: &str) -> Result<SplitQuery, DdlRejection> {
    let mut statements = Vec::new();
    let mut exact = true;
    for (text, node) in parse_all(query)? {
        match class_of(&node) {
            Class::NotDdl | Class::Global => continue,
            Class::Opaque => {
                exact = false;
                if !matches!(node, NodeEnum::DoStmt(_)) {
                    // SELECT f(), CALL, CREATE EXTENSION: what they did inside
                    // is not replayable as text.
                    continue;
                }
                do_block_ddl(&node, true)?;
            }
            Class::Ddl => {}
        }
        let (relations, temporary) = targets(&node);
        let sql = without_data(&node)?.unwrap_or(text);
        let local = matches!(node, NodeEnum::AlterSeqStmt(_));
        statements.push(DdlStatement { sql, kind: kind_of(&node), relations, temporary, local });
    }
    Ok(SplitQuery { statements, exact })
}

/// `true` when a statement of parse node `kind` can be the one that fired
/// the trigger with command tag `tag` (a consistency check on the ordinal).
pub fn tag_matches(kind: &str, tag: &str) -> bool {
    let verb = match kind {
        "DropStmt" | "DropOwnedStmt" => "DROP",
        "CommentStmt" => "COMMENT",
        "GrantStmt" => return tag.starts_with("GRANT") || tag.starts_with("REVOKE"),
        "SelectStmt" => "SELECT INTO",
        "RefreshMatViewStmt" => "REFRESH",
        "SecLabelStmt" => "SECURITY LABEL",
        "ImportForeignSchemaStmt" => "IMPORT",
        "RenameStmt" | "AlterOwnerStmt" | "AlterObjectSchemaStmt" | "AlterObjectDependsStmt" | "AlterDefaultPrivilegesStmt" => "ALTER",
        k if k.starts_with("Alter") => "ALTER",
        // CreateStmt, IndexStmt, ViewStmt, DefineStmt, CompositeTypeStmt,
        // RuleStmt, CreateTableAsStmt, CreateSchemaStmt, ...
        _ => "CREATE",
    };
    tag.starts_with(verb)
}

/// A statement that passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The statement to run.
    pub sql: String,
    /// Its parse node name.
    pub node: &'static str,
    /// The relations it creates or changes (the receiver replays it as the
    /// owner of the first that exists there, R22).
    pub targets: Vec<RelationName>,
}

/// Statement types replayed from any node allowed to send DDL (additive only).
fn additive(node: &NodeEnum) -> bool {
    use NodeEnum as N;
    match node {
        N::CreateStmt(_)
        | N::IndexStmt(_)
        | N::CreateSeqStmt(_)
        | N::ViewStmt(_)
        | N::CommentStmt(_)
        | N::CreateEnumStmt(_)
        | N::CompositeTypeStmt(_)
        | N::CreateDomainStmt(_)
        | N::CreateTableAsStmt(_) => true,
        N::AlterEnumStmt(e) => e.old_val.is_empty(),
        N::AlterTableStmt(a) => a.cmds.iter().all(|c| match &c.node {
            Some(N::AlterTableCmd(c)) => [
                AlterTableType::AtAddColumn,
                AlterTableType::AtAddConstraint,
                AlterTableType::AtAddIndex,
                AlterTableType::AtColumnDefault,
                AlterTableType::AtAddIdentity,
            ]
            .iter()
            .any(|t| *t as i32 == c.subtype),
            _ => false,
        }),
        _ => false,
    }
}

/// `ALTER TABLE` subcommands never replayed: they are node-local
/// (replica identity, persistence, tablespace) or hand objects to other roles.
fn forbidden_alter(a: &pg_query::protobuf::AlterTableStmt) -> Option<&'static str> {
    for c in &a.cmds {
        if let Some(NodeEnum::AlterTableCmd(c)) = &c.node {
            let t = AlterTableType::try_from(c.subtype).unwrap_or(AlterTableType::Undefined);
            let why = match t {
                AlterTableType::AtReplicaIdentity => "REPLICA IDENTITY is managed by branchsync at each node",
                AlterTableType::AtSetLogged | AlterTableType::AtSetUnLogged => "an unlogged table cannot be replicated",
                AlterTableType::AtChangeOwner => "ownership changes are not replayed",
                AlterTableType::AtSetTableSpace | AlterTableType::AtSetAccessMethod => "storage is node-local",
                _ => continue,
            };
            return Some(why);
        }
    }
    None
}

/// Statement types replayed from the main (besides the additive ones).
fn from_main_only(node: &NodeEnum) -> Result<bool, DdlRejection> {
    use NodeEnum as N;
    Ok(match node {
        N::AlterTableStmt(a) => {
            if let Some(why) = forbidden_alter(a) {
                return Err(reject(
                    "ALTER TABLE subcommand is not replayed",
                    format!("The statement changes something that must stay as it is at each node: {why}."),
                    "Make this change at each node by hand if it is wanted there.",
                ));
            }
            true
        }
        N::DropStmt(d) => {
            let allowed = [
                ObjectType::ObjectTable,
                ObjectType::ObjectIndex,
                ObjectType::ObjectSequence,
                ObjectType::ObjectView,
                ObjectType::ObjectMatview,
                ObjectType::ObjectType,
                ObjectType::ObjectDomain,
                ObjectType::ObjectFunction,
                ObjectType::ObjectProcedure,
                ObjectType::ObjectRoutine,
                ObjectType::ObjectAggregate,
                ObjectType::ObjectTrigger,
                ObjectType::ObjectRule,
                ObjectType::ObjectPolicy,
                ObjectType::ObjectStatisticExt,
            ];
            allowed.iter().any(|t| *t as i32 == d.remove_type)
        }
        N::RenameStmt(r) => ![ObjectType::ObjectRole, ObjectType::ObjectDatabase, ObjectType::ObjectTablespace, ObjectType::ObjectSchema]
            .iter()
            .any(|t| *t as i32 == r.rename_type),
        N::AlterEnumStmt(_)
        | N::AlterDomainStmt(_)
        | N::AlterObjectSchemaStmt(_)
        | N::CreateFunctionStmt(_)
        | N::AlterFunctionStmt(_)
        | N::CreateTrigStmt(_)
        | N::RuleStmt(_)
        | N::DefineStmt(_)
        | N::CreateRangeStmt(_)
        | N::AlterTypeStmt(_)
        | N::CreateStatsStmt(_)
        | N::AlterStatsStmt(_)
        | N::CreatePolicyStmt(_)
        | N::AlterPolicyStmt(_)
        | N::GrantStmt(_)
        | N::RefreshMatViewStmt(_)
        | N::CreateSchemaStmt(_)
        | N::CreateExtensionStmt(_)
        | N::CreateCastStmt(_)
        | N::CreateConversionStmt(_)
        | N::AlterTsconfigurationStmt(_)
        | N::AlterTsdictionaryStmt(_) => true,
        _ => false,
    })
}

/// Checks one statement a peer sent against the allow-list (R22). The text
/// must hold exactly one statement. `from_main`: sent by the main (the wider
/// list); otherwise by a branch under `[ddl] from = "any"` (additive only).
pub fn check(stmt: &str, from_main: bool) -> Result<Checked, DdlRejection> {
    let mut all = parse_all(stmt)?;
    if all.len() != 1 {
        return Err(reject(
            "a replayed DDL change must hold exactly one statement",
            format!("It holds {}.", all.len()),
            "This is a bug or a forged message: the sender splits query strings before sending them.",
        ));
    }
    let (text, node) = all.remove(0);
    let kind = kind_of(&node);
    let ok = match &node {
        NodeEnum::CreateStmt(s) if s.relation.as_ref().is_some_and(|r| range_var(r).1) => false,
        NodeEnum::DoStmt(_) => {
            if !from_main {
                return Err(reject(
                    "DO block from a branch is not replayed",
                    "Branches may send additive schema changes only (CREATE, ADD COLUMN, constraints, comments).",
                    "Run the DO block at the main.",
                ));
            }
            do_block_ddl(&node, true)?;
            true
        }
        NodeEnum::SelectStmt(s) if s.into_clause.is_some() => true,
        n if additive(n) => true,
        n if from_main => from_main_only(n)?,
        n if from_main_only(n).unwrap_or(false) => {
            return Err(reject(
                format!("{} from a branch is not replayed", statement_label(&node)),
                "Branches may send additive schema changes only (CREATE, ADD COLUMN, constraints, comments); this statement changes or removes existing objects.",
                "Make this change at the main; it reaches every branch from there.",
            ));
        }
        _ => false,
    };
    if !ok {
        return Err(reject(
            format!("{} is not replayed", statement_label(&node)),
            format!("Statement type {kind} is not on the list of schema changes branchsync replays."),
            "Make this change at each node by hand if it is wanted there.",
        ));
    }
    let sql = without_data(&node)?.unwrap_or(text);
    Ok(Checked { sql, node: kind, targets: targets(&node).0 })
}

/// A readable label for a statement, from its first keywords.
fn statement_label(node: &NodeEnum) -> String {
    let k = kind_of(node);
    let bare = k.strip_suffix("Stmt").unwrap_or(k);
    let mut out = String::new();
    for (i, ch) in bare.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(ch.to_ascii_uppercase());
    }
    format!("statement {out}")
}

/// PL/pgSQL statement kinds allowed in a replayed `DO` block besides SQL:
/// blocks, conditions, assignments to local variables, messages.
const DO_CONTROL: &[&str] =
    &["PLpgSQL_stmt_block", "PLpgSQL_stmt_if", "PLpgSQL_stmt_raise", "PLpgSQL_stmt_return", "PLpgSQL_stmt_assign", "PLpgSQL_stmt_assert"];

/// Checks that a `DO` block only runs DDL (its DML would run twice: its rows
/// already travel as rows). Every SQL statement in it, static or in an
/// `EXECUTE` of a constant string, must be replayable DDL.
fn do_block_ddl(node: &NodeEnum, from_main: bool) -> Result<(), DdlRejection> {
    let NodeEnum::DoStmt(d) = node else { return Ok(()) };
    let mut body = None;
    let mut language = "plpgsql".to_string();
    for a in &d.args {
        if let Some(NodeEnum::DefElem(e)) = &a.node {
            let val = match e.arg.as_ref().and_then(|v| v.node.as_ref()) {
                Some(NodeEnum::String(s)) => s.sval.clone(),
                _ => continue,
            };
            match e.defname.as_str() {
                "as" => body = Some(val),
                "language" => language = val.to_lowercase(),
                _ => {}
            }
        }
    }
    let not_replayable = |detail: String| {
        reject(
            "DO block is not replicated: it does more than DDL",
            detail,
            "Run the schema change as plain statements, or a DO block that only runs DDL (CREATE, ALTER, DROP ...), at the main; write data with ordinary statements (they replicate as rows).",
        )
    };
    if language != "plpgsql" {
        return Err(not_replayable(format!("The block is in language {language}; only PL/pgSQL blocks are checked.")));
    }
    let body = body.unwrap_or_default();
    let mut tag = "bsdo".to_string();
    while body.contains(&format!("${tag}$")) {
        tag.push('x');
    }
    let func = format!("CREATE FUNCTION branchsync_do() RETURNS void LANGUAGE plpgsql AS ${tag}${body}${tag}$");
    let tree = guarded("the DO block", || pg_query::parse_plpgsql(&func))?;
    let mut problems = Vec::new();
    walk_plpgsql(&tree, from_main, &mut problems);
    match problems.first() {
        None => Ok(()),
        Some(p) => Err(not_replayable(p.clone())),
    }
}

fn walk_plpgsql(v: &serde_json::Value, from_main: bool, problems: &mut Vec<String>) {
    match v {
        serde_json::Value::Array(items) => items.iter().for_each(|i| walk_plpgsql(i, from_main, problems)),
        serde_json::Value::Object(map) => {
            for (k, inner) in map {
                if k.starts_with("PLpgSQL_stmt_") {
                    let sql = match k.as_str() {
                        "PLpgSQL_stmt_execsql" => inner.pointer("/sqlstmt/PLpgSQL_expr/query").and_then(|q| q.as_str()).map(str::to_string),
                        "PLpgSQL_stmt_dynexecute" => {
                            let expr = inner.pointer("/query/PLpgSQL_expr/query").and_then(|q| q.as_str()).unwrap_or("");
                            match constant_string(expr) {
                                Some(s) => Some(s),
                                None => {
                                    problems.push(format!("It runs EXECUTE of a computed string ({expr}), which cannot be checked."));
                                    None
                                }
                            }
                        }
                        other if DO_CONTROL.contains(&other) => None,
                        other => {
                            problems.push(format!("It holds a {} statement.", other.trim_start_matches("PLpgSQL_stmt_")));
                            None
                        }
                    };
                    if let Some(sql) = sql {
                        match parse_all(&sql) {
                            Ok(stmts) => {
                                for (text, node) in stmts {
                                    if class_of(&node) != Class::Ddl {
                                        problems.push(format!("It runs \"{}\", which is not DDL.", truncate(&text, 80)));
                                    } else if let Err(r) = check(&text, from_main) {
                                        problems.push(format!("It runs \"{}\": {}.", truncate(&text, 80), r.message));
                                    }
                                }
                            }
                            Err(r) => problems.push(format!("{} {}", r.message, r.detail)),
                        }
                    }
                }
                walk_plpgsql(inner, from_main, problems);
            }
        }
        _ => {}
    }
}

/// The value of a SQL string literal expression (`'…'`, `E'…'`, `$$…$$`), if
/// the expression is exactly one.
fn constant_string(expr: &str) -> Option<String> {
    let parsed = guarded("an EXECUTE argument", || pg_query::parse(&format!("SELECT {expr}"))).ok()?;
    let raw = parsed.protobuf.stmts.first()?;
    let Some(NodeEnum::SelectStmt(s)) = raw.stmt.as_ref()?.node.as_ref() else { return None };
    if s.target_list.len() != 1 || !s.from_clause.is_empty() {
        return None;
    }
    let Some(NodeEnum::ResTarget(t)) = s.target_list[0].node.as_ref() else { return None };
    let Some(NodeEnum::AConst(c)) = t.val.as_ref()?.node.as_ref() else { return None };
    match c.val.as_ref()? {
        pg_query::protobuf::a_const::Val::Sval(s) => Some(s.sval.clone()),
        _ => None,
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqls(q: &str) -> Vec<String> {
        ddl_statements(q).unwrap().statements.into_iter().map(|s| s.sql).collect()
    }

    #[test]
    fn a_mixed_string_keeps_only_its_ddl_in_order() {
        let q = "CREATE TABLE promo (id serial PRIMARY KEY, name text NOT NULL);
                 INSERT INTO promo (name) VALUES ('a'), ('b');
                 ALTER TABLE promo ADD COLUMN pct integer DEFAULT 5;
                 UPDATE promo SET pct = 10 WHERE name = 'a';";
        let split = ddl_statements(q).unwrap();
        assert!(split.exact);
        let got: Vec<(&str, &str)> = split.statements.iter().map(|s| (s.kind, s.sql.as_str())).collect();
        assert_eq!(
            got,
            [
                ("CreateStmt", "CREATE TABLE promo (id serial PRIMARY KEY, name text NOT NULL)"),
                ("AlterTableStmt", "ALTER TABLE promo ADD COLUMN pct integer DEFAULT 5")
            ]
        );
        assert_eq!(split.statements[0].relations, [RelationName { schema: None, name: "promo".into() }]);
    }

    #[test]
    fn semicolons_in_strings_comments_and_dollar_quotes_do_not_split() {
        let q = "/* a; b */ CREATE TABLE \"we;ird\" (v text DEFAULT 'x;y'); COMMENT ON TABLE \"we;ird\" IS $c$ semi;colon $c$";
        assert_eq!(sqls(q), ["/* a; b */ CREATE TABLE \"we;ird\" (v text DEFAULT 'x;y')", "COMMENT ON TABLE \"we;ird\" IS $c$ semi;colon $c$"]);
    }

    #[test]
    fn create_table_as_and_select_into_replay_without_data() {
        assert_eq!(sqls("CREATE TABLE snap AS SELECT id, name FROM products"), ["CREATE TABLE snap AS SELECT id, name FROM products  WITH NO DATA"]);
        let s = sqls("SELECT id, price INTO public.snap2 FROM products WHERE price > 1");
        assert_eq!(s, ["CREATE TABLE public.snap2 AS SELECT id, price FROM products WHERE price > 1  WITH NO DATA"]);
        // A materialized view is derived data: it replays as written.
        assert_eq!(sqls("CREATE MATERIALIZED VIEW mv AS SELECT 1"), ["CREATE MATERIALIZED VIEW mv AS SELECT 1"]);
    }

    #[test]
    fn temporary_objects_roles_and_sequence_state_are_marked() {
        let s = ddl_statements("CREATE TEMP TABLE t (x int); CREATE ROLE r; ALTER SEQUENCE s RESTART WITH 1; CREATE INDEX ON orders (shop)").unwrap();
        let flags: Vec<(&str, bool, bool)> = s.statements.iter().map(|s| (s.kind, s.temporary, s.local)).collect();
        assert_eq!(flags, [("CreateStmt", true, false), ("AlterSeqStmt", false, true), ("IndexStmt", false, false)], "CREATE ROLE fires no event trigger");
    }

    #[test]
    fn do_blocks_and_function_calls_make_positions_inexact() {
        let s = ddl_statements("SELECT install_module(); CREATE TABLE a (x int)").unwrap();
        assert!(!s.exact);
        assert_eq!(s.statements.len(), 1);
        let s = ddl_statements("DO $$ BEGIN EXECUTE 'CREATE TABLE gift (id serial PRIMARY KEY)'; END $$").unwrap();
        assert!(!s.exact);
        assert_eq!(s.statements[0].kind, "DoStmt");
    }

    #[test]
    fn a_do_block_that_writes_data_is_refused_with_the_reason() {
        let e = ddl_statements("DO $$ BEGIN CREATE TABLE g (id int); INSERT INTO g VALUES (1); END $$").unwrap_err();
        assert!(e.message.contains("DO block is not replicated"), "{e:?}");
        assert!(e.detail.contains("INSERT INTO g VALUES (1)") && e.detail.contains("not DDL"), "{e:?}");
        let e = ddl_statements("DO $$ BEGIN EXECUTE format('CREATE TABLE %I (x int)', 'g'); END $$").unwrap_err();
        assert!(e.detail.contains("computed string"), "{e:?}");
        let e = ddl_statements("DO $$ BEGIN FOR i IN 1..3 LOOP NULL; END LOOP; END $$").unwrap_err();
        assert!(e.detail.contains("fori"), "{e:?}");
        // Conditions may read the catalog; constant EXECUTE strings are checked.
        ddl_statements(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_tables WHERE tablename = 'g') THEN \
             EXECUTE 'CREATE TABLE g (id serial PRIMARY KEY)'; CREATE INDEX ON g (id); RAISE NOTICE 'created'; END IF; END $$",
        )
        .unwrap();
    }

    #[test]
    fn tags_match_their_statements() {
        assert!(tag_matches("CreateStmt", "CREATE TABLE"));
        assert!(tag_matches("IndexStmt", "CREATE INDEX"));
        assert!(tag_matches("CreateTableAsStmt", "CREATE TABLE AS"));
        assert!(tag_matches("SelectStmt", "SELECT INTO"));
        assert!(tag_matches("RenameStmt", "ALTER TABLE"));
        assert!(tag_matches("DropStmt", "DROP TABLE"));
        assert!(tag_matches("GrantStmt", "REVOKE"));
        assert!(!tag_matches("CreateStmt", "ALTER TABLE"));
        assert!(!tag_matches("AlterTableStmt", "DROP TABLE"));
    }

    #[test]
    fn garbage_is_a_rejection_not_a_panic() {
        let e = ddl_statements("CREATE TABLE (").unwrap_err();
        assert!(e.message.contains("does not parse"), "{e:?}");
        assert!(check("", true).is_err());
        assert!(check("\0", true).is_err());
    }

    #[test]
    fn the_main_may_replay_module_installs() {
        for s in [
            "CREATE TABLE loyalty_card (id serial PRIMARY KEY, code text NOT NULL UNIQUE)",
            "CREATE INDEX loyalty_tx_card ON loyalty_tx (card_id)",
            "ALTER TABLE orders ADD COLUMN channel text NOT NULL DEFAULT 'store'",
            "ALTER TABLE orders DROP COLUMN legacy_flag",
            "ALTER TABLE orders RENAME COLUMN note TO customer_note",
            "DROP TABLE old_stuff",
            "CREATE VIEW v AS SELECT 1",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "COMMENT ON TABLE orders IS 'sales'",
            "GRANT SELECT ON orders TO reporting",
            "CREATE TYPE mood AS ENUM ('a', 'b')",
            "DO $$ BEGIN CREATE TABLE gift (id serial PRIMARY KEY); END $$",
        ] {
            let c = check(s, true).unwrap_or_else(|e| panic!("{s}: {e:?}"));
            assert_eq!(c.sql, s);
        }
        assert_eq!(check("CREATE TABLE s AS SELECT 1 AS x", true).unwrap().sql, "CREATE TABLE s AS SELECT 1 AS x  WITH NO DATA");
    }

    #[test]
    fn dangerous_statements_are_refused_from_anyone() {
        for s in [
            "CREATE ROLE evil SUPERUSER",
            "ALTER ROLE erp SUPERUSER",
            "ALTER SYSTEM SET wal_level = minimal",
            "COPY orders TO PROGRAM 'rm -rf /'",
            "DROP DATABASE erp",
            "CREATE EVENT TRIGGER x ON ddl_command_end EXECUTE FUNCTION f()",
            "DROP EVENT TRIGGER branchsync_ddl_end",
            "ALTER PUBLICATION branchsync DROP TABLE orders",
            "LOAD 'evil.so'",
            "ALTER TABLE orders REPLICA IDENTITY NOTHING",
            "ALTER TABLE orders SET UNLOGGED",
            "ALTER TABLE orders OWNER TO postgres",
            "INSERT INTO orders DEFAULT VALUES",
            "SELECT pg_terminate_backend(1)",
            "CREATE TEMP TABLE t (x int)",
            "CREATE TABLE a (x int); CREATE TABLE b (x int)",
        ] {
            let e = check(s, true).expect_err(s);
            assert!(e.message.contains("not replayed") || e.message.contains("exactly one"), "{s}: {e:?}");
            assert!(e.detail.ends_with('.') && (e.hint.is_empty() || e.hint.ends_with('.')), "{s}: {e:?}");
            assert!(check(s, false).is_err(), "{s} from a branch");
        }
    }

    #[test]
    fn branches_may_only_add() {
        for s in ["CREATE TABLE shop_notes (id serial PRIMARY KEY)", "ALTER TABLE orders ADD COLUMN tip numeric DEFAULT 0", "CREATE INDEX ON orders (shop)"] {
            check(s, false).unwrap_or_else(|e| panic!("{s}: {e:?}"));
        }
        for s in [
            "DROP TABLE orders",
            "ALTER TABLE orders DROP COLUMN shop",
            "ALTER TABLE orders RENAME COLUMN shop TO store",
            "ALTER TABLE orders ALTER COLUMN total TYPE text",
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "DO $$ BEGIN CREATE TABLE g (id int); END $$",
        ] {
            let e = check(s, false).expect_err(s);
            assert!(e.message.contains("not replayed"), "{s}: {e:?}");
        }
    }
}
