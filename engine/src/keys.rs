//! Global-sequence keys: every sequence at node `index` hands out only values
//! ≡ `index` (mod `stride`), positive, above every value already in use, so
//! two nodes never insert the same integer id (DESIGN invariant 4, R18).
//!
//! ```text
//!   stride 100:   main (index 0)   100, 200, 300, ...
//!                 branch1 (1)      101, 201, 301, ...
//!                 branch2 (2)      102, 202, 302, ...
//! ```
//!
//! # What this module owns
//!
//! The `INCREMENT`, `MINVALUE`, `START`, `RESTART` and `CYCLE` settings of
//! every sequence in the replicated schemas: serial and bigserial sequences,
//! identity columns' sequences and free-standing sequences. Sequences owned
//! by an excluded table (the owner found through `pg_depend`, dependency type
//! `a` for `OWNED BY`, `i` for identity columns) are left alone, and so is
//! every sequence outside the scope's schemas, `branchsync`'s own included.
//!
//! It never reads or logs row values beyond `max(column)` of the columns
//! that use a sequence, never calls `nextval` or `setval`, and never changes
//! a sequence that is already on its stripe.
//!
//! # Why it is correct
//!
//! * **Residue, not only the increment (R18).** A sequence is on its stripe
//!   when its increment is `stride`, its *next* value (`last_value` if
//!   `is_called` is false, `last_value + increment` otherwise) is ≡ `index`
//!   (mod `stride`), positive and above the highest value in use, its
//!   `START` is on the stripe too (a plain `ALTER SEQUENCE … RESTART` goes
//!   back there), and it does not cycle (a wrap to `MINVALUE` would leave the
//!   stripe). A branch restored from the main's dump has the right increment
//!   and the main's residue: it is re-striped.
//! * **Above everything in use.** The value handed out next is the smallest
//!   `v > max(last_value if is_called, max(column) of every column owning or
//!   defaulting to the sequence)` with the right residue ([`next_striped`]).
//!   The re-stripe runs in a transaction that first takes the sequence's
//!   lock (any `ALTER SEQUENCE` takes `SHARE ROW EXCLUSIVE`, which conflicts
//!   with the `ROW EXCLUSIVE` lock `nextval` takes) and only then reads
//!   `last_value` and the column maxima. Every value a concurrent `nextval`
//!   handed out before the lock is therefore at most the `last_value` read,
//!   even when the row holding it is not committed yet.
//! * **Within the data type.** `MINVALUE 1` keeps ids positive (a
//!   `CHECK (id >= 0)` keeps holding); `MAXVALUE` stays what it was (the
//!   data type's maximum for `serial`, so an `integer` sequence never hands
//!   out a value its column cannot hold). A stripe that would not fit is a
//!   [`EngineError::Misconfigured`] naming the sequence and the fix.
//! * **Idempotent.** `ALTER SEQUENCE … START WITH v RESTART WITH v` leaves
//!   `is_called = false` and `last_value = v`, which the next run reads as
//!   next value `v`: on the stripe, so nothing is changed twice.
//!
//! # Limits
//!
//! * Sessions that cached values of a sequence with `CACHE > 1` before it was
//!   striped hand those out first (PostgreSQL does not invalidate other
//!   sessions' caches). Restart the ERP after `branchsync init` when its
//!   sequences use a cache; `serial` sequences do not.
//! * `setval` fires no trigger: values handed out between an off-stripe
//!   `setval` and the next [`audit`]/[`stripe_all`] are off the stripe. The
//!   daemon runs them periodically.
//! * [`stripe_all`] reads `max(column)` of every using column, which is an
//!   index lookup for keys and a full scan for unindexed columns; [`audit`]
//!   reads only the sequences and is cheap enough to run often.

use branchsync_proto::changeset::quote_ident;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::scope::Scope;
use crate::EngineError;

/// Lock timeout of the short transaction [`stripe_all`] opens per sequence,
/// so a long ERP transaction that called `nextval` delays the stripe (it is
/// retried on the next run) instead of stalling every other `nextval`.
pub const STRIPE_LOCK_TIMEOUT: &str = "2s";

/// One sequence of the scope and where its next value lies.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StripedSequence {
    /// Schema of the sequence.
    pub schema: String,
    /// Name of the sequence.
    pub name: String,
    /// The value `nextval` hands out next (after striping, for
    /// [`stripe_all`]; as found, for [`audit`]).
    pub next_value: i64,
    /// `true` when [`stripe_all`] altered the sequence; always `false` in
    /// [`audit`]'s answer.
    pub changed: bool,
}

/// The smallest value `v > max_in_use` with `v ≥ 1` and `v ≡ index (mod
/// stride)`; `None` when `index >= stride`, `stride == 0`, or `v` does not
/// fit in an `i64`.
pub fn checked_next_striped(max_in_use: i64, index: u32, stride: u32) -> Option<i64> {
    if stride == 0 || index >= stride {
        return None;
    }
    let (index, stride) = (i128::from(index), i128::from(stride));
    // The smallest candidate that is both positive and above what is in use.
    let floor = i128::from(max_in_use).max(0) + 1;
    let v = floor + (index - floor).rem_euclid(stride);
    i64::try_from(v).ok()
}

/// The smallest value `v > max_in_use` with `v ≥ 1` and `v ≡ index (mod
/// stride)`. For `index == 0` that is a positive multiple of `stride`.
///
/// # Panics
///
/// When `index >= stride` (the configuration is validated long before), or
/// when the answer does not fit in an `i64` (use [`checked_next_striped`]).
pub fn next_striped(max_in_use: i64, index: u32, stride: u32) -> i64 {
    checked_next_striped(max_in_use, index, stride)
        .unwrap_or_else(|| panic!("no striped value above {max_in_use} for index {index} mod {stride}"))
}

/// Checks that `index` and `stride` describe a stripe.
pub(crate) fn check_stripe(index: u32, stride: u32) -> Result<(), EngineError> {
    if stride == 0 || index >= stride || i32::try_from(stride).is_err() {
        return Err(EngineError::Misconfigured {
            message: format!("node index {index} does not fit stride {stride}"),
            detail: "Every node's index must be at least 0 and below the stride, and the stride at least 1.".into(),
            hint:
                "Set keys.stride to the same value at every node (for example 100) and give each node its own index below it (the main 0)."
                    .into(),
        });
    }
    Ok(())
}

/// A column that owns or defaults to a sequence.
#[derive(Debug, Clone)]
struct UsingColumn {
    schema: String,
    table: String,
    column: String,
    type_name: String,
}

/// A sequence of the scope, as listed from the catalogs.
#[derive(Debug, Clone)]
struct SeqInfo {
    oid: u32,
    schema: String,
    name: String,
    /// Columns owning it (`OWNED BY`, identity) or using it in a default.
    columns: Vec<UsingColumn>,
}

impl SeqInfo {
    fn qualified(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A sequence's settings and position, read together.
#[derive(Debug, Clone)]
struct SeqState {
    type_name: String,
    increment: i64,
    max: i64,
    cycle: bool,
    start: i64,
    last_value: i64,
    is_called: bool,
}

impl SeqState {
    /// The value `nextval` returns next (wider than `i64`: it may overflow
    /// for an exhausted sequence).
    fn next(&self) -> i128 {
        if self.is_called {
            i128::from(self.last_value) + i128::from(self.increment)
        } else {
            i128::from(self.last_value)
        }
    }

    /// Highest value the sequence handed out, if any.
    fn handed_out(&self) -> Option<i64> {
        self.is_called.then_some(self.last_value)
    }

    /// The maximum of the sequence's data type.
    fn type_max(&self) -> i64 {
        match self.type_name.as_str() {
            "smallint" => i64::from(i16::MAX),
            "integer" => i64::from(i32::MAX),
            _ => i64::MAX,
        }
    }

    /// `true` when residue, increment, start and cycling are right; the
    /// maximum in use is checked separately.
    fn on_stripe(&self, index: u32, stride: u32) -> bool {
        let (index, stride) = (i128::from(index), i128::from(stride));
        let on = |v: i128| v >= 1 && v.rem_euclid(stride) == index;
        i128::from(self.increment) == stride && !self.cycle && on(self.next()) && on(i128::from(self.start))
    }

    fn next_value_i64(&self) -> i64 {
        i64::try_from(self.next()).unwrap_or(i64::MAX)
    }
}

/// Lists the sequences of the scope's schemas, without those owned by an
/// excluded table, with the columns that use each.
async fn list_sequences(client: &Client, scope: &Scope) -> Result<Vec<SeqInfo>, EngineError> {
    let schemas: Vec<String> = scope.schemas().to_vec();
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text \
             FROM pg_catalog.pg_sequence s \
             JOIN pg_catalog.pg_class c ON c.oid = s.seqrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = ANY($1) \
             ORDER BY n.nspname, c.relname",
            &[&schemas],
        )
        .await
        .map_err(EngineError::pg("listing sequences"))?;
    let mut seqs: Vec<SeqInfo> =
        rows.iter().map(|r| SeqInfo { oid: r.get(0), schema: r.get(1), name: r.get(2), columns: Vec::new() }).collect();
    if seqs.is_empty() {
        return Ok(seqs);
    }
    let oids: Vec<u32> = seqs.iter().map(|s| s.oid).collect();
    // Owners (OWNED BY: deptype 'a'; identity: 'i') and users (a column
    // default calling nextval depends on the sequence, deptype 'n').
    let rows = client
        .query(
            "SELECT d.objid, d.deptype::text, tn.nspname::text, t.relname::text, a.attname::text, a.atttypid::regtype::text \
             FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_class t ON t.oid = d.refobjid \
             JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass \
               AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0 AND d.objid = ANY($1) \
             UNION ALL \
             SELECT d.refobjid, 'n', tn.nspname::text, t.relname::text, a.attname::text, a.atttypid::regtype::text \
             FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_attrdef ad ON ad.oid = d.objid \
             JOIN pg_catalog.pg_class t ON t.oid = ad.adrelid \
             JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum \
             WHERE d.classid = 'pg_catalog.pg_attrdef'::regclass AND d.refclassid = 'pg_catalog.pg_class'::regclass \
               AND d.refobjid = ANY($1) AND t.relkind IN ('r', 'p') AND NOT a.attisdropped",
            &[&oids],
        )
        .await
        .map_err(EngineError::pg("listing the columns that use sequences"))?;
    let mut excluded: Vec<u32> = Vec::new();
    for r in &rows {
        let oid: u32 = r.get(0);
        let deptype: String = r.get(1);
        let col = UsingColumn { schema: r.get(2), table: r.get(3), column: r.get(4), type_name: r.get(5) };
        if deptype != "n" && !scope.includes(&col.schema, &col.table) {
            excluded.push(oid);
        }
        if let Some(s) = seqs.iter_mut().find(|s| s.oid == oid) {
            let dup = s.columns.iter().any(|c| c.schema == col.schema && c.table == col.table && c.column == col.column);
            if !dup {
                s.columns.push(col);
            }
        }
    }
    seqs.retain(|s| {
        let keep = !excluded.contains(&s.oid);
        if !keep {
            tracing::debug!(sequence = %s.display(), "sequence owned by an excluded table; not striped");
        }
        keep
    });
    Ok(seqs)
}

/// Reads the settings and position of one sequence; `None` if it was
/// dropped since it was listed and `mode` allows skipping it (an error
/// inside the caller's transaction aborts that transaction, so there it is
/// returned instead).
async fn read_state(client: &Client, seq: &SeqInfo, mode: TxnMode) -> Result<Option<SeqState>, EngineError> {
    let sql = format!(
        "SELECT s.seqtypid::regtype::text, s.seqincrement, s.seqmax, s.seqcycle, s.seqstart, sq.last_value, sq.is_called \
         FROM pg_catalog.pg_sequence s CROSS JOIN {} AS sq WHERE s.seqrelid = $1",
        seq.qualified()
    );
    match client.query_opt(&sql, &[&seq.oid]).await {
        Ok(Some(r)) => Ok(Some(SeqState {
            type_name: r.get(0),
            increment: r.get(1),
            max: r.get(2),
            cycle: r.get(3),
            start: r.get(4),
            last_value: r.get(5),
            is_called: r.get(6),
        })),
        Ok(None) => Ok(None),
        Err(e) if mode == TxnMode::PerSequence && e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(EngineError::pg(format!("reading sequence {}", seq.display()))(e)),
    }
}

/// The highest value of the columns that use the sequence (`None` when they
/// are empty or none is numeric).
async fn column_max(client: &Client, seq: &SeqInfo) -> Result<Option<i64>, EngineError> {
    let mut parts = Vec::new();
    for c in &seq.columns {
        let (col, tbl) = (quote_ident(&c.column), format!("{}.{}", quote_ident(&c.schema), quote_ident(&c.table)));
        match c.type_name.as_str() {
            "smallint" | "integer" | "bigint" => parts.push(format!("(SELECT max({col})::int8 FROM {tbl})")),
            "numeric" => parts.push(format!("(SELECT least(ceil(max({col})), 9223372036854775807)::int8 FROM {tbl})")),
            other => {
                tracing::debug!(sequence = %seq.display(), column = %c.column, type_name = other, "non-integer column ignored for the maximum in use")
            }
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let sql = format!("SELECT greatest({})", parts.join(", "));
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(EngineError::pg(format!("reading the highest value in use of sequence {}", seq.display())))?;
    Ok(row.get(0))
}

/// The highest value in use: handed out by the sequence or stored in a
/// column that uses it.
async fn max_in_use(client: &Client, seq: &SeqInfo, state: &SeqState) -> Result<Option<i64>, EngineError> {
    let cols = column_max(client, seq).await?;
    Ok(match (cols, state.handed_out()) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    })
}

/// `true` when the sequence needs no change.
fn is_striped(state: &SeqState, max: Option<i64>, index: u32, stride: u32) -> bool {
    let above = match max {
        Some(m) => state.next() > i128::from(m),
        None => true,
    };
    state.on_stripe(index, stride) && above
}

/// How [`stripe_one`] runs its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TxnMode {
    /// The caller's transaction is open; locks are held until it ends.
    Caller,
    /// Autocommit connection: each re-stripe gets its own transaction.
    PerSequence,
}

/// Stripes one sequence; see the module documentation.
async fn stripe_one(
    client: &Client,
    seq: &SeqInfo,
    index: u32,
    stride: u32,
    mode: TxnMode,
) -> Result<Option<StripedSequence>, EngineError> {
    // Unlocked look first: nearly every run finds the sequence on its stripe.
    let Some(state) = read_state(client, seq, mode).await? else { return Ok(None) };
    let max = max_in_use(client, seq, &state).await?;
    if is_striped(&state, max, index, stride) {
        tracing::debug!(sequence = %seq.display(), next = state.next_value_i64(), "sequence already on its stripe");
        return Ok(Some(StripedSequence {
            schema: seq.schema.clone(),
            name: seq.name.clone(),
            next_value: state.next_value_i64(),
            changed: false,
        }));
    }
    if mode == TxnMode::PerSequence {
        client
            .batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{STRIPE_LOCK_TIMEOUT}'"))
            .await
            .map_err(EngineError::pg(format!("starting the stripe of sequence {}", seq.display())))?;
    }
    let r = restripe_locked(client, seq, index, stride, mode).await;
    if mode == TxnMode::PerSequence {
        let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = client.batch_execute(end).await;
        if r.is_ok() {
            ended.map_err(EngineError::pg(format!("committing the stripe of sequence {}", seq.display())))?;
        }
    }
    r
}

/// Takes the sequence's lock, re-reads everything, and restarts it on the
/// stripe. Runs inside a transaction (its own one for
/// [`TxnMode::PerSequence`], where a dropped sequence is skipped).
async fn restripe_locked(
    client: &Client,
    seq: &SeqInfo,
    index: u32,
    stride: u32,
    mode: TxnMode,
) -> Result<Option<StripedSequence>, EngineError> {
    let q = seq.qualified();
    // Any ALTER SEQUENCE takes SHARE ROW EXCLUSIVE until the transaction ends,
    // which waits for and then blocks nextval; NO CYCLE is wanted anyway.
    match client.batch_execute(&format!("ALTER SEQUENCE {q} NO CYCLE")).await {
        Ok(()) => {}
        Err(e) if mode == TxnMode::PerSequence && e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
        Err(e) => return Err(EngineError::pg(format!("locking sequence {}", seq.display()))(e)),
    }
    let Some(state) = read_state(client, seq, mode).await? else { return Ok(None) };
    let max = max_in_use(client, seq, &state).await?;
    // A descending sequence's maximum is meaningless once it ascends.
    let maxvalue = if state.increment < 0 { state.type_max() } else { state.max };
    let next = checked_next_striped(max.unwrap_or(0), index, stride).filter(|v| *v <= maxvalue);
    let Some(v) = next else {
        let cols: Vec<String> = seq.columns.iter().map(|c| format!("{}.{}.{}", c.schema, c.table, c.column)).collect();
        let widen = if cols.is_empty() { String::new() } else { format!(" and the columns that use it ({}) to bigint", cols.join(", ")) };
        return Err(EngineError::Misconfigured {
            message: format!(
                "sequence {} cannot be striped: no value on stripe {index} mod {stride} above the values in use fits below its maximum {maxvalue}",
                seq.display()
            ),
            detail: format!("The sequence is of type {} and the values handed out or stored reach close to its maximum.", state.type_name),
            hint: format!(
                "Widen the sequence (ALTER SEQUENCE {q} AS bigint NO MAXVALUE){widen}, then run branchsync init again."
            ),
        });
    };
    let max_clause = if maxvalue == state.type_max() { "NO MAXVALUE".to_string() } else { format!("MAXVALUE {maxvalue}") };
    let sql = format!("ALTER SEQUENCE {q} INCREMENT BY {stride} MINVALUE 1 {max_clause} START WITH {v} RESTART WITH {v} NO CYCLE");
    client.batch_execute(&sql).await.map_err(EngineError::pg(format!("striping sequence {}", seq.display())))?;
    tracing::info!(
        sequence = %seq.display(),
        index,
        stride,
        old_increment = state.increment,
        next = v,
        "sequence striped"
    );
    Ok(Some(StripedSequence { schema: seq.schema.clone(), name: seq.name.clone(), next_value: v, changed: true }))
}

/// Stripes every sequence of the scope, in `mode`.
pub(crate) async fn stripe_all_in(
    client: &Client,
    scope: &Scope,
    index: u32,
    stride: u32,
    mode: TxnMode,
    progress: &dyn crate::progress::Progress,
) -> Result<Vec<StripedSequence>, EngineError> {
    check_stripe(index, stride)?;
    let seqs = list_sequences(client, scope).await?;
    let mut out = Vec::with_capacity(seqs.len());
    progress.phase("striping sequences", seqs.len() as u64);
    for seq in &seqs {
        if let Some(s) = stripe_one(client, seq, index, stride, mode).await? {
            out.push(s);
        }
        progress.advance(1);
    }
    progress.finish();
    let changed = out.iter().filter(|s| s.changed).count();
    tracing::debug!(sequences = out.len(), changed, index, stride, "stripes checked");
    Ok(out)
}

/// Puts every sequence of the scope on the stripe `index` (mod `stride`),
/// above every value in use, and reports each one with `changed` set when
/// it was altered. Sequences already on their stripe are left unchanged
/// (idempotent); sequences owned by excluded tables are skipped.
///
/// Call it on a connection in autocommit mode (no open transaction): each
/// sequence that needs a change is altered in its own short transaction
/// (with a `lock_timeout` of [`STRIPE_LOCK_TIMEOUT`]), so the lock that
/// keeps `nextval` out while the maximum is read is held only briefly.
pub async fn stripe_all(client: &Client, scope: &Scope, index: u32, stride: u32) -> Result<Vec<StripedSequence>, EngineError> {
    stripe_all_in(client, scope, index, stride, TxnMode::PerSequence, &crate::progress::Silent).await
}

/// Lists the sequences of the scope that are off their stripe: wrong
/// increment, next value or `START` not ≡ `index` (mod `stride`) or not
/// positive, or cycling. It reads only the sequences (no table is scanned),
/// so it is cheap to run periodically (`setval` fires no trigger, R18); it
/// does not notice a sequence on its stripe but below values in use, which
/// [`stripe_all`] does. Changes nothing. Like [`stripe_all`], call it in
/// autocommit mode (a sequence dropped meanwhile is skipped).
pub async fn audit(client: &Client, scope: &Scope, index: u32, stride: u32) -> Result<Vec<StripedSequence>, EngineError> {
    check_stripe(index, stride)?;
    let seqs = list_sequences(client, scope).await?;
    let mut off = Vec::new();
    for seq in &seqs {
        let Some(state) = read_state(client, seq, TxnMode::PerSequence).await? else { continue };
        if !state.on_stripe(index, stride) {
            tracing::debug!(sequence = %seq.display(), increment = state.increment, next = state.next_value_i64(), "sequence off its stripe");
            off.push(StripedSequence {
                schema: seq.schema.clone(),
                name: seq.name.clone(),
                next_value: state.next_value_i64(),
                changed: false,
            });
        }
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn next_striped_examples() {
        assert_eq!(next_striped(0, 1, 100), 1);
        assert_eq!(next_striped(0, 0, 100), 100, "index 0 never hands out 0");
        assert_eq!(next_striped(1, 1, 100), 101);
        assert_eq!(next_striped(100, 0, 100), 200);
        assert_eq!(next_striped(99, 0, 100), 100);
        assert_eq!(next_striped(300, 1, 100), 301, "main's stripe restored at a branch");
        assert_eq!(next_striped(-500, 7, 100), 7, "never negative");
        assert_eq!(next_striped(i64::MIN, 0, 1), 1);
        assert_eq!(next_striped(5, 0, 1), 6);
        assert_eq!(next_striped(2_147_483_600, 47, 100), 2_147_483_647);
        assert_eq!(checked_next_striped(i64::MAX - 1, 0, 100), None);
        assert_eq!(checked_next_striped(0, 100, 100), None);
        assert_eq!(checked_next_striped(0, 0, 0), None);
    }

    #[test]
    #[should_panic(expected = "no striped value")]
    fn next_striped_panics_on_a_bad_index() {
        next_striped(0, 3, 3);
    }

    #[test]
    fn next_striped_property() {
        let seed: u64 = std::env::var("BRANCHSYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        println!("next_striped_property seed {seed} (replay with BRANCHSYNC_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let budget = std::time::Instant::now() + std::time::Duration::from_millis(500);
        let mut cases = 0u64;
        while cases < 200_000 && std::time::Instant::now() < budget {
            cases += 1;
            let stride: u32 = if rng.gen_bool(0.1) { rng.gen_range(1..=3) } else { rng.gen_range(1..=100_000) };
            let index: u32 = rng.gen_range(0..stride);
            let max: i64 = match rng.gen_range(0..4) {
                0 => rng.gen_range(-1_000..1_000),
                1 => rng.gen_range(i64::MIN..0),
                2 => rng.gen_range(i64::MAX - 200_000..i64::MAX),
                _ => rng.gen_range(0..i64::MAX / 2),
            };
            let ctx = format!("seed {seed}: max {max}, index {index}, stride {stride}");
            match checked_next_striped(max, index, stride) {
                Some(v) => {
                    assert!(v > max, "{ctx}: {v} not above the max");
                    assert!(v >= 1, "{ctx}: {v} not positive");
                    assert_eq!(v.rem_euclid(i64::from(stride)), i64::from(index), "{ctx}: {v} off the stripe");
                    let prev = v - i64::from(stride);
                    assert!(prev <= max || prev < 1, "{ctx}: {prev} would do, {v} is not minimal");
                }
                None => {
                    // Only when the minimal answer does not fit an i64.
                    let floor = i128::from(max).max(0) + 1;
                    let v = floor + (i128::from(index) - floor).rem_euclid(i128::from(stride));
                    assert!(v > i128::from(i64::MAX), "{ctx}: None although {v} fits");
                }
            }
        }
        println!("next_striped_property: {cases} cases");
    }
}

#[cfg(test)]
mod pg_tests {
    use super::*;
    use crate::test_utils::{connect, PgCluster};

    fn scope(exclude: &[&str]) -> Scope {
        Scope::new(&["public".into()], &exclude.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn find<'a>(v: &'a [StripedSequence], name: &str) -> &'a StripedSequence {
        v.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("sequence {name} not reported: {v:?}"))
    }

    async fn ids(c: &Client, table: &str) -> Vec<i64> {
        c.query(&format!("SELECT id::int8 FROM {table} ORDER BY id"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
    }

    async fn increment(c: &Client, seq: &str) -> i64 {
        c.query_one("SELECT increment_by FROM pg_sequences WHERE sequencename = $1", &[&seq]).await.unwrap().get(0)
    }

    #[tokio::test]
    async fn every_kind_of_sequence_gets_the_stripe_and_a_second_run_changes_nothing() {
        let pg = PgCluster::start();
        let c = pg.connect().await;
        c.batch_execute(
            "CREATE TABLE s4 (id serial PRIMARY KEY, v text);
             CREATE TABLE s8 (id bigserial PRIMARY KEY, v text);
             CREATE TABLE ida (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text);
             CREATE TABLE idd (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text);
             CREATE TABLE chk (id serial PRIMARY KEY CHECK (id >= 0), v text);
             CREATE SEQUENCE free_seq;
             CREATE TABLE uses_free (n bigint DEFAULT nextval('free_seq'), v text);
             CREATE TABLE cache_excluded (id serial PRIMARY KEY);
             INSERT INTO s4 (v) SELECT 'x' FROM generate_series(1, 5);
             INSERT INTO s8 (id, v) VALUES (1234, 'explicit');
             INSERT INTO ida (v) VALUES ('a'), ('b');
             INSERT INTO idd (id, v) VALUES (77, 'explicit');
             INSERT INTO uses_free (n) VALUES (950);
             INSERT INTO cache_excluded DEFAULT VALUES;",
        )
        .await
        .unwrap();
        let sc = scope(&["cache_*"]);
        let first = stripe_all(&c, &sc, 3, 100).await.unwrap();
        assert_eq!(find(&first, "s4_id_seq").next_value, 103);
        assert_eq!(find(&first, "s8_id_seq").next_value, 1303, "explicit ids above the sequence count");
        assert_eq!(find(&first, "ida_id_seq").next_value, 3);
        assert_eq!(find(&first, "idd_id_seq").next_value, 103);
        assert_eq!(find(&first, "chk_id_seq").next_value, 3);
        assert_eq!(find(&first, "free_seq").next_value, 1003, "a default's column counts for a free-standing sequence");
        assert!(first.iter().all(|s| s.changed), "{first:?}");
        assert!(first.iter().all(|s| s.name != "cache_excluded_id_seq"), "excluded table's sequence is skipped");
        assert_eq!(increment(&c, "cache_excluded_id_seq").await, 1, "excluded table's sequence untouched");

        c.batch_execute(
            "INSERT INTO s4 (v) VALUES ('n'), ('n');
             INSERT INTO s8 (v) VALUES ('n');
             INSERT INTO ida (v) VALUES ('n');
             INSERT INTO idd (v) VALUES ('n');
             INSERT INTO chk (v) VALUES ('n'), ('n');
             INSERT INTO uses_free (v) VALUES ('n');",
        )
        .await
        .unwrap();
        assert_eq!(ids(&c, "s4").await[5..], [103, 203]);
        assert_eq!(ids(&c, "s8").await, [1234, 1303]);
        assert_eq!(ids(&c, "ida").await, [1, 2, 3]);
        assert_eq!(ids(&c, "idd").await, [77, 103]);
        assert_eq!(ids(&c, "chk").await, [3, 103], "CHECK (id >= 0) keeps holding");
        let n: i64 = c.query_one("SELECT max(n) FROM uses_free", &[]).await.unwrap().get(0);
        assert_eq!(n, 1003);

        let second = stripe_all(&c, &sc, 3, 100).await.unwrap();
        assert!(second.iter().all(|s| !s.changed), "second run changes nothing: {second:?}");
        assert_eq!(find(&second, "s4_id_seq").next_value, 303);
        assert_eq!(find(&second, "chk_id_seq").next_value, 203);
        assert!(audit(&c, &sc, 3, 100).await.unwrap().is_empty());
        // A fresh, never used stripe is idempotent too (is_called = false).
        let third = stripe_all(&c, &sc, 3, 100).await.unwrap();
        assert_eq!(second, third);
    }

    #[tokio::test]
    async fn the_mains_stripe_restored_at_a_branch_is_restriped_and_setval_is_audited() {
        let pg = PgCluster::start();
        let c = pg.connect().await;
        c.batch_execute("CREATE TABLE t (id serial PRIMARY KEY, v text)").await.unwrap();
        let sc = scope(&[]);
        // The main (index 0) hands out 100, 200, 300; a branch restored from
        // its dump carries increment 100 with residue 0.
        stripe_all(&c, &sc, 0, 100).await.unwrap();
        c.batch_execute("INSERT INTO t (v) VALUES ('a'), ('b'), ('c')").await.unwrap();
        assert_eq!(ids(&c, "t").await, [100, 200, 300]);
        let off = audit(&c, &sc, 1, 100).await.unwrap();
        assert_eq!(off.len(), 1, "{off:?}");
        assert_eq!(off[0].next_value, 400);
        assert!(!off[0].changed);

        let r = stripe_all(&c, &sc, 1, 100).await.unwrap();
        assert_eq!(r, vec![StripedSequence { schema: "public".into(), name: "t_id_seq".into(), next_value: 301, changed: true }]);
        c.batch_execute("INSERT INTO t (v) VALUES ('d')").await.unwrap();
        assert_eq!(ids(&c, "t").await, [100, 200, 300, 301]);

        // setval fires no trigger: the audit sees it, stripe_all repairs it.
        c.batch_execute("SELECT setval('t_id_seq', 350)").await.unwrap();
        let off = audit(&c, &sc, 1, 100).await.unwrap();
        assert_eq!(off.len(), 1);
        assert_eq!(off[0].next_value, 450);
        let r = stripe_all(&c, &sc, 1, 100).await.unwrap();
        assert_eq!(r[0].next_value, 401, "above what the sequence handed out");
        assert!(r[0].changed);

        // On its stripe but below a value inserted explicitly: restarted above.
        c.batch_execute("INSERT INTO t (id, v) VALUES (5001, 'explicit')").await.unwrap();
        assert!(audit(&c, &sc, 1, 100).await.unwrap().is_empty(), "the audit only reads sequences");
        let r = stripe_all(&c, &sc, 1, 100).await.unwrap();
        assert_eq!((r[0].next_value, r[0].changed), (5101, true));
    }

    #[tokio::test]
    async fn a_stripe_beyond_the_integer_maximum_is_refused_with_the_fix() {
        let pg = PgCluster::start();
        let c = pg.connect().await;
        c.batch_execute("CREATE TABLE t (id serial PRIMARY KEY); SELECT setval('t_id_seq', 2147483640)").await.unwrap();
        let err = stripe_all(&c, &scope(&[]), 50, 100).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, EngineError::Misconfigured { .. }), "{text}");
        assert!(text.contains("t_id_seq") && text.contains("2147483647") && text.contains("AS bigint"), "{text}");
        assert_eq!(increment(&c, "t_id_seq").await, 1, "nothing changed");
        // The highest stripe that still fits is accepted.
        let r = stripe_all(&c, &scope(&[]), 47, 100).await.unwrap();
        assert_eq!(r[0].next_value, 2147483647);
    }

    #[tokio::test]
    async fn two_nodes_never_hand_out_the_same_id() {
        let pg = PgCluster::start();
        let admin = pg.connect().await;
        for db in ["node1", "node2"] {
            admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
        }
        let mut all = std::collections::HashSet::new();
        for (db, index) in [("node1", 1u32), ("node2", 2)] {
            let c = connect(&pg.url().replace("dbname=postgres", &format!("dbname={db}"))).await;
            // Both copies start from the same rows, as after seeding.
            c.batch_execute(
                "CREATE TABLE orders (id serial PRIMARY KEY, v int);
                 INSERT INTO orders (v) SELECT g FROM generate_series(1, 42) g;",
            )
            .await
            .unwrap();
            stripe_all(&c, &scope(&[]), index, 100).await.unwrap();
            c.batch_execute("INSERT INTO orders (v) SELECT g FROM generate_series(1, 1000) g").await.unwrap();
            let new: Vec<i64> = ids(&c, "orders").await.into_iter().filter(|id| *id > 42).collect();
            assert_eq!(new.len(), 1000);
            assert!(new.iter().all(|id| id % 100 == i64::from(index)), "{db}: ids off the stripe");
            for id in new {
                assert!(all.insert(id), "id {id} handed out by both nodes");
            }
        }
        assert_eq!(all.len(), 2000);
    }

    #[tokio::test]
    async fn values_handed_out_while_the_stripe_waits_for_its_lock_stay_below_it() {
        let pg = PgCluster::start();
        let erp = pg.connect().await;
        let c = pg.connect().await;
        erp.batch_execute("CREATE TABLE t (id serial PRIMARY KEY, v int)").await.unwrap();
        // An ERP transaction has called nextval and keeps the sequence's lock.
        erp.batch_execute("BEGIN; INSERT INTO t (v) VALUES (0);").await.unwrap();
        let stripe = tokio::spawn(async move { stripe_all(&c, &scope(&[]), 1, 100).await });
        crate::test_utils::eventually("the stripe waits for the sequence lock", std::time::Duration::from_secs(10), || {
            let erp = &erp;
            async move {
                let n: i64 = erp
                    .query_one("SELECT count(*) FROM pg_locks WHERE relation = 't_id_seq'::regclass AND NOT granted", &[])
                    .await
                    .unwrap()
                    .get(0);
                (n > 0).then_some(())
            }
        })
        .await;
        // Meanwhile the same transaction hands out 2..=501 on the old increment.
        erp.batch_execute("INSERT INTO t (v) SELECT g FROM generate_series(1, 500) g; COMMIT;").await.unwrap();
        let r = stripe.await.unwrap().unwrap();
        assert_eq!((r[0].next_value, r[0].changed), (601, true), "read under the lock, above 501");
        let id: i32 = erp.query_one("INSERT INTO t (v) VALUES (1) RETURNING id", &[]).await.unwrap().get(0);
        assert_eq!(id, 601);
    }
}
