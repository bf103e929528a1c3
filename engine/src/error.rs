//! Errors of the engine, split by what the caller must do.
//!
//! [`EngineError::is_transient`] says whether to retry with backoff (the
//! database restarted, a lock timed out) or to stop and tell the operator
//! (a setting is wrong, the log is corrupt). Messages follow PostgreSQL
//! style: a lowercase primary message; detail and hint are sentences.

use tokio_postgres::error::SqlState;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A PostgreSQL call failed; see [`EngineError::is_transient`].
    #[error("database error while {context}: {}", pg_summary(source))]
    Postgres {
        /// What the engine was doing.
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server is not configured the way branchsync needs.
    #[error("{message}\nDETAIL: {detail}\nHINT: {hint}")]
    Misconfigured { message: String, detail: String, hint: String },
    /// The local log could not be read or written.
    #[error("local log error while {context}: {source}")]
    Log {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A log entry or a stream message could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The database went back in time, or belongs to another cluster.
    #[error("{message}\nDETAIL: {detail}\nHINT: {hint}")]
    Diverged { message: String, detail: String, hint: String },
    /// The database connection ended (server restart, network).
    #[error("lost the database connection while {context}")]
    ConnectionLost { context: String },
    /// The component was asked to stop.
    #[error("shutting down")]
    Shutdown,
    /// Apply waited for capture to log this node's own changes and it did
    /// not catch up in time (capture is down or far behind).
    #[error("capture has not caught up with WAL position {wanted}")]
    CaptureBehind { wanted: String },
    /// The log reached its disk budget (`[log] max_bytes`).
    #[error("the local log is full: it uses {used} bytes of its budget of {budget} bytes ([log] max_bytes)")]
    LogFull { used: u64, budget: u64 },
    /// Capture cannot go on until the operator acts (a row too large, an
    /// invalidated slot); the rest of the node keeps running.
    #[error("{message}\nDETAIL: {detail}\nHINT: {hint}")]
    Stopped { message: String, detail: String, hint: String },
    /// A peer sent an entry in another node's name (author, index or
    /// cluster differ from what its session authenticated): a security
    /// event; the session ends and nothing of it is applied.
    #[error("stream {stream} sent an entry in another node's name at position {pos}: {detail}")]
    Impersonation { stream: String, pos: u64, detail: String },
    /// A stream skipped positions: the sender broke the protocol (R26).
    #[error("stream {stream} skipped from position {expected} to {got}")]
    Gap { stream: String, expected: u64, got: u64 },
    /// Apply was about to skip positions it had received (an entry to apply
    /// again after a rollback was not kept): the session starts over from
    /// durable progress instead. A bug, never a lost change.
    #[error("apply of stream {stream} would have skipped from position {expected} to {got}; starting over from the last committed position")]
    ApplySkip { stream: String, expected: u64, got: u64 },
    /// A change sent without waiting for its answer (the main's pipeline of
    /// changes to delta columns) found its row gone: it must be decided, so
    /// the group is rolled back and replayed change by change, where it is.
    #[error("{missing} of {rows} queued change(s) of {table} found no row; replaying the group change by change")]
    QueuedRowMissing { table: String, missing: usize, rows: usize },
    /// Something is larger than the log or the link can carry.
    #[error("{what} is {bytes} bytes, more than the largest branchsync carries ({max} bytes)")]
    TooLarge { what: String, bytes: u64, max: u64 },
}

impl EngineError {
    /// Wraps a PostgreSQL error with what we were doing.
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> EngineError {
        let context = context.into();
        move |source| EngineError::Postgres { context, source }
    }

    /// Wraps an I/O error of the local log with what we were doing.
    pub fn log(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let context = context.into();
        move |source| EngineError::Log { context, source }
    }

    /// `true` when retrying later can succeed: connection loss, server
    /// restart, lock timeout, deadlock, serialization failure, insufficient
    /// resources (R8), and a full disk or log budget (space may return).
    pub fn is_transient(&self) -> bool {
        match self {
            EngineError::Postgres { source, .. } => pg_error_is_transient(source),
            EngineError::Log { .. } => self.is_disk_full(),
            EngineError::Corrupt(_) | EngineError::TooLarge { .. } | EngineError::Gap { .. } | EngineError::Impersonation { .. } => false,
            EngineError::Misconfigured { .. } | EngineError::Diverged { .. } | EngineError::Stopped { .. } => false,
            EngineError::Shutdown | EngineError::ConnectionLost { .. } | EngineError::CaptureBehind { .. } | EngineError::LogFull { .. } | EngineError::ApplySkip { .. } => true,
            EngineError::QueuedRowMissing { .. } => true,
        }
    }

    /// `true` when the group that met this error is replayed change by
    /// change: a data error (one change is bad; the others must not wait
    /// for it), or a queued change that must be decided after all.
    pub fn replays_carefully(&self) -> bool {
        match self {
            EngineError::Postgres { source, .. } => pg_error_is_data_error(source),
            EngineError::QueuedRowMissing { .. } => true,
            _ => false,
        }
    }

    /// `true` when the local disk (or the log's budget) is full: capture
    /// pauses until there is space again; nothing else stops.
    pub fn is_disk_full(&self) -> bool {
        match self {
            EngineError::LogFull { .. } => true,
            EngineError::Log { source, .. } => io_is_disk_full(source),
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, if any.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            EngineError::Postgres { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// `true` for "no space left on device" and "disk quota exceeded".
pub fn io_is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) || matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// Classifies a PostgreSQL error: transient (retry) or not.
pub fn pg_error_is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // connection closed, I/O error: the server may be restarting
        Some(code) => {
            let c = code.code();
            c == SqlState::T_R_DEADLOCK_DETECTED.code()
                || c == SqlState::T_R_SERIALIZATION_FAILURE.code()
                || c == SqlState::LOCK_NOT_AVAILABLE.code()
                || c == SqlState::QUERY_CANCELED.code()
                || c.starts_with("08") // connection exception
                || c.starts_with("57") // operator intervention (admin shutdown, crash shutdown)
                || c.starts_with("53") // insufficient resources
                || c == SqlState::OBJECT_IN_USE.code() // slot active in another session
        }
    }
}

/// `true` for errors that quarantine a change instead of retrying it: data
/// errors (SQLSTATE classes 22, 23 and 42, R8) and every other error the
/// server raised for the statement itself (a trigger's exception, a check
/// constraint) that retrying cannot fix.
pub fn pg_error_is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some() && !pg_error_is_transient(e)
}

/// The server's message and SQLSTATE, without DETAIL (it may quote row
/// values, which are never logged).
pub fn pg_summary(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}
