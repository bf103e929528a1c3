//! How an incoming table maps onto a local one ([`Mapping`]), cached per
//! column list, with the insert plans built once per mapping.

use branchsync_proto::TableDesc;

use crate::catalog::{LocalColumn, LocalTable};

/// A mapping built for an incoming table with the column list it was built
/// for (an author on another schema version sends another list).
#[derive(Debug, Clone)]
pub(crate) struct CachedMapping {
    pub columns: Vec<String>,
    pub in_scope: bool,
    pub mapping: Option<std::sync::Arc<Mapping>>,
}

/// What inserting rows through a [`Mapping`] takes, built once per mapping
/// and guard instead of per ChangeSet: with a catch-up of small
/// transactions, formatting these per ChangeSet was a large share of the
/// daemon's CPU.
#[derive(Debug)]
pub(crate) struct InsertPlan {
    /// Incoming columns written, in order.
    pub cols: Vec<usize>,
    /// Their local names.
    pub names: Vec<String>,
    /// The insert (the main) or guarded upsert (a branch).
    pub text: String,
    /// Its parameter types.
    pub types: Vec<tokio_postgres::types::Type>,
    /// Echoes: the update and the insert that guard each row by its own
    /// change's commit time (`None` when the table cannot have them).
    pub echo: Option<(String, String)>,
    /// Rows whose owner must outlive later local changes (`branch_wins`):
    /// their versions are not packed.
    pub owned: bool,
    /// For each foreign key of the local table, the incoming column of each
    /// of its columns (`None` when one is not sent).
    pub fk_srcs: Option<Vec<Vec<usize>>>,
}

/// How the columns of one incoming [`TableDesc`] map onto a local table.
#[derive(Debug)]
pub struct Mapping {
    /// The local table.
    pub table: std::sync::Arc<LocalTable>,
    /// For each incoming column: the local column name, or `None` when the
    /// value is skipped (missing locally or generated locally).
    pub targets: Vec<Option<String>>,
    /// Incoming column indexes of the local primary key, in key order;
    /// `None` when the local table has no key or the author did not send
    /// every key column.
    pub key_src: Option<Vec<usize>>,
    /// Incoming columns that the local table does not have.
    pub skipped: Vec<String>,
    /// Insert plans built so far, per guard and settle mode.
    pub(crate) plans: std::sync::Mutex<Vec<((super::sql::Guard, bool), std::sync::Arc<InsertPlan>)>>,
}

impl Mapping {
    /// Maps `desc` onto `table` by column name; the site-local columns
    /// `local` (a table rule's) are never written from another site, like
    /// generated ones.
    pub fn new(desc: &TableDesc, table: std::sync::Arc<LocalTable>, local: &[String]) -> Mapping {
        let mut targets = Vec::with_capacity(desc.columns.len());
        let mut skipped = Vec::new();
        for c in &desc.columns {
            let c = &table.resolve(c, &desc.columns);
            match table.columns.get(c) {
                // A key column is never site-local: rows are found by it.
                Some(lc) if !lc.generated && (table.pk.contains(c) || !local.contains(c)) => targets.push(Some(c.clone())),
                Some(_) => targets.push(None),
                None => {
                    skipped.push(c.clone());
                    targets.push(None)
                }
            }
        }
        let key_src = if table.pk.is_empty() {
            None
        } else {
            table.pk.iter().map(|k| targets.iter().position(|c| c.as_deref() == Some(k.as_str()))).collect::<Option<Vec<usize>>>()
        };
        Mapping { table, targets, key_src, skipped, plans: std::sync::Mutex::new(Vec::new()) }
    }

    /// The local column for incoming column `i`, if written.
    pub fn local(&self, i: usize) -> Option<&LocalColumn> {
        self.targets[i].as_ref().and_then(|n| self.table.columns.get(n))
    }
}
