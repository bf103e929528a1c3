//! Which tables are replicated: the configured schemas minus the exclude globs.
//!
//! The same [`Scope`] is evaluated at capture (an excluded table's changes
//! never enter the log) and at apply (an excluded table is never written),
//! and the handshake refuses a branch whose globs differ from the main's
//! (R23), so every node agrees on what is replicated. Branchsync's own
//! schema is never in scope (R2).

use crate::EngineError;

/// Name of branchsync's own schema; never replicated.
pub const STATE_SCHEMA: &str = "branchsync";

/// Replicated schemas and excluded tables.
#[derive(Debug, Clone)]
pub struct Scope {
    schemas: Vec<String>,
    exclude: Vec<glob::Pattern>,
    exclude_src: Vec<String>,
}

impl Scope {
    /// Builds a scope; a glob that does not parse is a configuration error.
    pub fn new(schemas: &[String], exclude: &[String]) -> Result<Scope, EngineError> {
        let mut pats = Vec::new();
        for g in exclude {
            pats.push(glob::Pattern::new(g).map_err(|e| EngineError::Misconfigured {
                message: format!("invalid exclude pattern \"{g}\""),
                detail: e.to_string(),
                hint: "Use shell globs such as \"ir_session*\" or \"public.ir_cache\".".into(),
            })?);
        }
        Ok(Scope {
            schemas: schemas.iter().filter(|s| *s != STATE_SCHEMA).cloned().collect(),
            exclude: pats,
            exclude_src: exclude.to_vec(),
        })
    }

    /// The replicated schemas.
    pub fn schemas(&self) -> &[String] {
        &self.schemas
    }

    /// The exclude globs as configured.
    pub fn exclude_globs(&self) -> &[String] {
        &self.exclude_src
    }

    /// `true` if `schema.table` is replicated. A glob matches the bare table
    /// name or `schema.table`.
    pub fn includes(&self, schema: &str, table: &str) -> bool {
        if !self.schema_follows(schema) {
            return false;
        }
        let qualified = format!("{schema}.{table}");
        !self.exclude.iter().any(|p| p.matches(table) || p.matches(&qualified))
    }

    /// Whether schema changes of relations in `schema` replicate: every
    /// relation of a replicated schema, excluded tables too (their rows stay
    /// local; their schema follows the main's, as `join` creates them, so
    /// that an ERP's session or cache table changed by a module upgrade
    /// changes at every site).
    pub fn schema_follows(&self, schema: &str) -> bool {
        schema != STATE_SCHEMA && self.schemas.iter().any(|s| s == schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_and_foreign_tables_are_out_of_scope() {
        let s = Scope::new(&["public".into(), "branchsync".into()], &["ir_cache".into(), "ir_session*".into(), "sales.tmp_*".into()]).unwrap();
        assert!(s.includes("public", "sale_order"));
        assert!(!s.includes("public", "ir_cache"));
        assert!(!s.includes("public", "ir_session_2024"));
        assert!(!s.includes("branchsync", "conflicts"), "own state is never replicated (R2)");
        assert!(!s.includes("other", "sale_order"));
        assert!(s.includes("public", "tmp_x"), "schema-qualified glob only matches its schema");
        assert!(s.schema_follows("public"), "an excluded table's schema still follows the main's");
        assert!(!s.schema_follows("branchsync") && !s.schema_follows("other"));
    }

    #[test]
    fn a_broken_glob_is_a_configuration_error() {
        assert!(matches!(Scope::new(&["public".into()], &["[".into()]), Err(EngineError::Misconfigured { .. })));
    }
}
