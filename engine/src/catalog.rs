//! The catalog as branchsync sees it: local tables (columns matched by
//! name, local types, primary key, generated and identity columns, foreign
//! keys, renames), the text of a row's key, and rows as JSON.
//!
//! One place for what capture, apply and verify each need to know about a
//! local table, so none of them imports another for it. It reads
//! PostgreSQL's catalog and never writes anything.
//!
//! Apply is schema tolerant: an incoming column the local table lacks is
//! skipped, a local generated column is never written (R10), and a
//! `GENERATED ALWAYS` identity column is written with `OVERRIDING SYSTEM
//! VALUE`. Values are cast from text to the *local* column type.

use std::collections::HashMap;

use branchsync_proto::changeset::quote_ident;
use branchsync_proto::{RowChange, TableDesc, Value};
use tokio_postgres::Client;

use crate::EngineError;

/// A local column.
#[derive(Debug, Clone)]
pub struct LocalColumn {
    /// Quoted column name.
    pub quoted: String,
    /// `format_type` of the column, used for casts from text.
    pub type_name: String,
    /// Generated column: never written.
    pub generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`.
    pub identity_always: bool,
    /// Compared as text (json has no equality operator, R11).
    pub compare_as_text: bool,
}

/// A local table as apply sees it.
#[derive(Debug, Clone)]
pub struct LocalTable {
    /// `"schema"."name"`.
    pub qualified: String,
    /// `schema.name`, unquoted, as stored in `branchsync.row_version`.
    pub name: String,
    /// Columns by name.
    pub columns: HashMap<String, LocalColumn>,
    /// Primary key column names in key order (empty: a keyless multiset).
    pub pk: Vec<String>,
    /// Foreign keys of this table: apply checks parents itself, because
    /// foreign-key triggers do not fire under `session_replication_role =
    /// replica` (R9).
    pub parents: Vec<ForeignKey>,
    /// Foreign keys of other tables that reference this one: the main does
    /// not delete a row that still has children its deleter never saw (R9).
    pub children: Vec<ForeignKey>,
    /// Column names in attribute order.
    pub order: Vec<String>,
    /// Column renames made here, oldest first: `(old, new)` (R20).
    pub renames: Vec<(String, String)>,
    /// Application code fires here when apply inserts a row: a trigger on
    /// `INSERT` enabled `ALWAYS` or `REPLICA`, or a rule on `INSERT` (both
    /// run under `session_replication_role = replica`). Such code may drop
    /// the row, change its key or delete it again, so apply cannot assume a
    /// row it inserted is there as sent.
    pub insert_runs_code: bool,
}

/// A foreign key of a local table.
#[derive(Debug, Clone)]
pub struct ForeignKey {
    /// Referencing columns (quoted), in constraint order.
    pub columns: Vec<String>,
    /// `"schema"."name"` of the referenced table.
    pub parent: String,
    /// Referenced columns (quoted), in constraint order.
    pub parent_columns: Vec<String>,
    /// `schema.name` of the referenced table, unquoted.
    pub parent_name: String,
    /// Referencing columns, unquoted.
    pub column_names: Vec<String>,
}

/// Which end of its foreign keys a table is looked at from.
#[derive(Clone, Copy)]
enum FkSide {
    /// The table's own foreign keys: `parent` is the referenced table.
    Referencing,
    /// Foreign keys of other tables that reference it: `parent` is the
    /// referencing table, `columns` are this table's columns.
    Referenced,
}

/// The foreign keys of `schema.name` seen from `side`, in constraint-name
/// order.
async fn foreign_keys(client: &tokio_postgres::Client, schema: &str, name: &str, side: FkSide) -> Result<Vec<ForeignKey>, EngineError> {
    // (this table's relation and key columns, the other table's)
    let ((this_rel, this_key, other_rel, other_key), what) = match side {
        FkSide::Referencing => (("conrelid", "conkey", "confrelid", "confkey"), "the foreign keys of"),
        FkSide::Referenced => (("confrelid", "confkey", "conrelid", "conkey"), "the foreign keys that reference"),
    };
    let rows = client
        .query(
            &format!(
                "SELECT on_.nspname::text, oc.relname::text, \
                        array(SELECT a.attname::text FROM unnest(f.{this_key}) WITH ORDINALITY k(n, o) \
                              JOIN pg_attribute a ON a.attrelid = f.{this_rel} AND a.attnum = k.n ORDER BY k.o), \
                        array(SELECT a.attname::text FROM unnest(f.{other_key}) WITH ORDINALITY k(n, o) \
                              JOIN pg_attribute a ON a.attrelid = f.{other_rel} AND a.attnum = k.n ORDER BY k.o) \
                 FROM pg_constraint f \
                 JOIN pg_class c ON c.oid = f.{this_rel} JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_class oc ON oc.oid = f.{other_rel} JOIN pg_namespace on_ ON on_.oid = oc.relnamespace \
                 WHERE f.contype = 'f' AND n.nspname = $1 AND c.relname = $2 ORDER BY f.conname"
            ),
            &[&schema, &name],
        )
        .await
        .map_err(EngineError::pg(format!("reading {what} {schema}.{name}")))?;
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            parent: format!("{}.{}", quote_ident(&r.get::<_, String>(0)), quote_ident(&r.get::<_, String>(1))),
            columns: r.get::<_, Vec<String>>(2).iter().map(|c| quote_ident(c)).collect(),
            parent_columns: r.get::<_, Vec<String>>(3).iter().map(|c| quote_ident(c)).collect(),
            parent_name: format!("{}.{}", r.get::<_, String>(0), r.get::<_, String>(1)),
            column_names: r.get::<_, Vec<String>>(2),
        })
        .collect())
}

impl ForeignKey {
    /// SQL condition, over alias `alias`, that holds when the row has every
    /// referencing column set (MATCH SIMPLE) and no parent row exists.
    pub fn orphan_sql(&self, alias: &str) -> String {
        let set: Vec<String> = self.columns.iter().map(|c| format!("{alias}.{c} IS NOT NULL")).collect();
        let eq: Vec<String> = self.columns.iter().zip(&self.parent_columns).map(|(c, p)| format!("p.{p} = {alias}.{c}")).collect();
        format!("({} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {}))", set.join(" AND "), self.parent, eq.join(" AND "))
    }
}

impl ForeignKey {
    /// Seen from the referenced table (an entry of [`LocalTable::children`]):
    /// SQL condition over alias `alias` (the referenced row) that holds when
    /// some row of the referencing table points at it.
    pub fn referenced_sql(&self, alias: &str) -> String {
        let eq: Vec<String> = self.columns.iter().zip(&self.parent_columns).map(|(mine, theirs)| format!("c.{theirs} = {alias}.{mine}")).collect();
        format!("EXISTS (SELECT 1 FROM {} c WHERE {})", self.parent, eq.join(" AND "))
    }
}

impl LocalTable {
    /// Reads a table from the catalog; a table renamed here is found under
    /// its new name (R20). `None` if it does not exist.
    pub async fn load(client: &Client, schema: &str, name: &str) -> Result<Option<LocalTable>, EngineError> {
        let (mut schema, mut name) = (schema.to_string(), name.to_string());
        // A bounded walk: a rename chain a → b → c, never a cycle.
        for _ in 0..16 {
            if let Some(t) = LocalTable::load_exact(client, &schema, &name).await? {
                return Ok(Some(t));
            }
            let renamed = client
                .query_opt(
                    "SELECT new_schema, new_name FROM branchsync.table_renames WHERE old_schema = $1 AND old_name = $2 ORDER BY id DESC LIMIT 1",
                    &[&schema, &name],
                )
                .await
                .map_err(EngineError::pg(format!("reading the renames of {schema}.{name}")))?;
            match renamed {
                Some(r) => (schema, name) = (r.get(0), r.get(1)),
                None => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Reads the table `schema.name` itself; `None` if it does not exist.
    async fn load_exact(client: &Client, schema: &str, name: &str) -> Result<Option<LocalTable>, EngineError> {
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attgenerated <> '', \
                        a.attidentity = 'a', t.typname IN ('json', 'xml', 'point', 'polygon', 'box', 'line', 'circle', 'path') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p') ORDER BY a.attnum",
                &[&schema, &name],
            )
            .await
            .map_err(EngineError::pg(format!("reading the columns of {schema}.{name}")))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut columns = HashMap::new();
        let mut order = Vec::with_capacity(rows.len());
        for r in rows {
            let n: String = r.get(0);
            order.push(n.clone());
            columns.insert(
                n.clone(),
                LocalColumn {
                    quoted: quote_ident(&n),
                    type_name: r.get(1),
                    generated: r.get(2),
                    identity_always: r.get(3),
                    compare_as_text: r.get(4),
                },
            );
        }
        let pk_rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
                 WHERE n.nspname = $1 AND c.relname = $2 AND i.indisprimary ORDER BY k.ord",
                &[&schema, &name],
            )
            .await
            .map_err(EngineError::pg(format!("reading the primary key of {schema}.{name}")))?;
        let parents = foreign_keys(client, schema, name, FkSide::Referencing).await?;
        // The same, seen from the referenced side: `parent` is the
        // referencing table, `columns` this table's columns.
        let children = foreign_keys(client, schema, name, FkSide::Referenced).await?;
        let renames = client
            .query(
                "SELECT old_name, new_name FROM branchsync.column_renames WHERE schema_name = $1 AND table_name = $2 ORDER BY id",
                &[&schema, &name],
            )
            .await
            .map_err(EngineError::pg(format!("reading the column renames of {schema}.{name}")))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // tgtype bit 4 is INSERT; rules: ev_type '3' is INSERT, and a rule
        // fires under the replica role unless it is disabled or ORIGIN only.
        let insert_runs_code: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal \
                                  AND t.tgenabled IN ('A', 'R') AND (t.tgtype & 4) <> 0) \
                     OR EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type = '3' \
                                  AND r.ev_enabled IN ('A', 'R')) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&schema, &name],
            )
            .await
            .map_err(EngineError::pg(format!("reading the triggers and rules of {schema}.{name}")))?
            .get(0);
        Ok(Some(LocalTable {
            qualified: format!("{}.{}", quote_ident(schema), quote_ident(name)),
            name: format!("{schema}.{name}"),
            columns,
            pk: pk_rows.iter().map(|r| r.get(0)).collect(),
            parents,
            children,
            order,
            renames,
            insert_runs_code,
        }))
    }

    /// The local name of an incoming column (R20). An author that had not
    /// seen a rename here still sends the old name: it follows the renames,
    /// oldest first, as long as the author's columns do not hold the new name
    /// themselves (then the author knows both, and the old name is another,
    /// newer column). The author's column list is its schema version.
    pub fn resolve(&self, column: &str, author_columns: &[String]) -> String {
        let mut name = column.to_string();
        for (old, new) in &self.renames {
            if *old == name && !author_columns.iter().any(|c| c == new) {
                name = new.clone();
            }
        }
        name
    }

    /// `json_build_array(pk::text, ...)::text` over alias `t`: the key text
    /// stored in `branchsync.row_version`.
    pub fn key_text_sql(&self, alias: &str) -> String {
        let parts: Vec<String> = self.pk.iter().map(|c| format!("{alias}.{}::text", quote_ident(c))).collect();
        format!("json_build_array({})::text", parts.join(", "))
    }
}

/// The key text stored in `branchsync.row_version`: the same text as
/// `json_build_array(k1::text, …)::text` produces in PostgreSQL
/// ([`LocalTable::key_text_sql`]).
pub fn key_text(parts: &[&str]) -> String {
    key_text_of(parts.iter().copied())
}

/// [`key_text`] of the parts an iterator yields, written into one string
/// (apply builds one per queued row: no string per part).
pub fn key_text_of<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::with_capacity(16);
    out.push('[');
    for (i, p) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        json_string_into(&mut out, p);
    }
    out.push(']');
    out
}

/// Appends `s` as a JSON string the way PostgreSQL's `escape_json` writes
/// it: `"` and `\` escaped, `\b \f \n \r \t` by name, other control
/// characters as `\u00xx` (lowercase hex); everything else as is.
fn json_string_into(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// A row of `desc` as a JSON object, column by column; an unchanged TOASTed
/// value is left out (it was not sent).
pub fn row_json(desc: &TableDesc, vals: &[Value]) -> String {
    let mut m = serde_json::Map::new();
    for (c, v) in desc.columns.iter().zip(vals) {
        match v {
            Value::Null => {
                m.insert(c.clone(), serde_json::Value::Null);
            }
            Value::Text(s) => {
                m.insert(c.clone(), serde_json::Value::String(s.clone()));
            }
            Value::Unchanged => {}
        }
    }
    serde_json::Value::Object(m).to_string()
}

/// A row read here (column name to text) as a JSON object.
pub fn values_json(values: &HashMap<String, Option<String>>) -> String {
    let m: serde_json::Map<String, serde_json::Value> =
        values.iter().map(|(k, v)| (k.clone(), v.as_ref().map(|s| serde_json::Value::String(s.clone())).unwrap_or(serde_json::Value::Null))).collect();
    serde_json::Value::Object(m).to_string()
}

/// A change as JSON, as it is recorded when it cannot be applied.
pub fn change_json(desc: &TableDesc, c: &RowChange) -> String {
    match c {
        RowChange::Insert { new, .. } | RowChange::Update { new, .. } => row_json(desc, new),
        RowChange::Delete { old, .. } => format!("{{\"deleted\": {}}}", row_json(desc, &old.values)),
        RowChange::Truncate { .. } => "{\"truncate\": true}".into(),
        RowChange::Ddl(d) => serde_json::json!({ "ddl": d.statements }).to_string(),
        RowChange::Verdict(_) => "{\"verdict\": true}".into(),
        RowChange::Conflict(r) => serde_json::json!({ "conflict": r.id }).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::PgCluster;

    /// Every byte below 0x80 (each control character, quote and
    /// backslash), multi-byte characters, and empty parts.
    fn awkward_parts() -> Vec<String> {
        let mut parts: Vec<String> = (1u8..0x80).map(|b| format!("a{}b", char::from(b))).collect();
        parts.extend(["".to_string(), "\"\\\"".to_string(), "é€😀\u{7f}".to_string(), "plain 42".to_string()]);
        parts
    }

    /// The key text written by apply is byte for byte what PostgreSQL's
    /// `json_build_array(k::text, …)::text` writes: row versions written
    /// by apply and read back by SQL name the same rows.
    #[tokio::test]
    async fn key_text_is_what_postgresql_writes_for_the_same_parts() {
        let pg = PgCluster::start();
        let c = pg.connect().await;
        let parts = awkward_parts();
        for pair in parts.chunks(2) {
            let mine = key_text(&pair.iter().map(String::as_str).collect::<Vec<_>>());
            let sql = if pair.len() == 2 { "SELECT json_build_array($1::text, $2::text)::text" } else { "SELECT json_build_array($1::text)::text" };
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = pair.iter().map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
            let theirs: String = c.query_one(sql, &params).await.unwrap().get(0);
            assert_eq!(mine, theirs, "parts {pair:?}");
        }
        // And as the form it replaces wrote it (serde_json per part).
        for p in &parts {
            let old = format!("[{}]", serde_json::Value::String(p.clone()));
            assert_eq!(key_text(&[p.as_str()]), old);
        }
    }
}
