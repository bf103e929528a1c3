//! PostgreSQL connections and server facts.
//!
//! [`connect`] opens a connection with the session settings that make text
//! values identical at every node (R10: `DateStyle = ISO`, `TimeZone = UTC`,
//! `extra_float_digits = 3`) and spawns its connection future. The future's
//! end is reported on a `watch` channel, so the single task that owns the
//! client can select on it and notice a dead connection at once.

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::EngineError;

/// A connection owned by exactly one task; not `Clone`.
pub struct PgConn {
    /// The client; only the owning task uses it.
    pub client: Client,
    /// Becomes `true` when the connection ends.
    pub closed: watch::Receiver<bool>,
}

/// Session settings pinned on every branchsync connection (R10).
pub const PINNED_SETTINGS: &str =
    "SET DateStyle = 'ISO'; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'";

/// Connects, spawns the connection future, and pins the session settings.
pub async fn connect(url: &str, application_name: &str) -> Result<PgConn, EngineError> {
    let mut cfg: tokio_postgres::Config = url.parse().map_err(EngineError::pg("parsing the database URL"))?;
    cfg.application_name(application_name);
    let (client, conn) = cfg.connect(NoTls).await.map_err(EngineError::pg("connecting to the database"))?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection ended");
        }
        let _ = tx.send(true);
    });
    client.batch_execute(PINNED_SETTINGS).await.map_err(EngineError::pg("pinning session settings"))?;
    Ok(PgConn { client, closed: rx })
}

/// The cluster's `system_identifier` (part of a change's identity, R4).
pub async fn system_identifier(client: &Client) -> Result<u64, EngineError> {
    let row = client
        .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
        .await
        .map_err(EngineError::pg("reading the system identifier"))?;
    let s: String = row.get(0);
    s.parse().map_err(|_| EngineError::Corrupt(format!("system identifier \"{s}\" is not a number")))
}

/// Current WAL insert position.
pub async fn current_wal_lsn(client: &Client) -> Result<u64, EngineError> {
    let row = client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::text", &[])
        .await
        .map_err(EngineError::pg("reading the WAL position"))?;
    let s: String = row.get(0);
    s.parse().map_err(|_| EngineError::Corrupt(format!("WAL position \"{s}\" is not a number")))
}

/// Parses an LSN in PostgreSQL's text form.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lsn_prints_like_postgres() {
        assert_eq!(super::fmt_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::fmt_lsn(0), "0/0");
    }
}
