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

/// A [`PgConn`] whose client statements still in flight can hold: apply
/// sends a group's statements and reads their answers from a task of their
/// own while it prepares the next ([`crate::apply`]). Still owned by one
/// task, which alone sends on it.
pub struct SharedConn {
    /// The client; only the owning task sends on it.
    pub client: std::sync::Arc<Client>,
    /// Becomes `true` when the connection ends.
    pub closed: watch::Receiver<bool>,
}

impl From<PgConn> for SharedConn {
    fn from(c: PgConn) -> SharedConn {
        SharedConn { client: std::sync::Arc::new(c.client), closed: c.closed }
    }
}

/// Session settings pinned on every branchsync connection (R10).
pub const PINNED_SETTINGS: &str =
    "SET DateStyle = 'ISO'; SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'";

/// Splits libpq's `sslrootcert` out of a connection string (key=value or
/// URL form), which tokio-postgres does not know: `(rest, sslrootcert)`.
pub fn split_root_cert(url: &str) -> (String, Option<String>) {
    let url = url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else { return (url.to_string(), None) };
        let mut root = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| match kv.strip_prefix("sslrootcert=") {
                Some(v) => {
                    root = Some(v.to_string());
                    false
                }
                None => true,
            })
            .collect();
        let rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        (rest, root)
    } else {
        let mut root = None;
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|kv| match kv.strip_prefix("sslrootcert=") {
                Some(v) => {
                    root = Some(v.trim_matches('\'').to_string());
                    false
                }
                None => true,
            })
            .collect();
        (kept.join(" "), root)
    }
}

/// The TLS client for a database that asks for it: the server's
/// certificate is always verified, against `sslrootcert` (PEM; libpq's
/// `verify-full`). Without `sslrootcert` there is nothing to verify against,
/// which is refused rather than connecting unverified.
fn database_tls(root_cert: Option<&str>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, EngineError> {
    use rustls::pki_types::pem::PemObject;
    let misconfigured = |message: String, hint: &str| EngineError::Misconfigured { message, detail: String::new(), hint: hint.into() };
    let Some(path) = root_cert else {
        return Err(misconfigured(
            "the database connection asks for TLS (sslmode) but names no sslrootcert".into(),
            "branchsync verifies the database server's certificate: add sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate) to database.url.",
        ));
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| misconfigured(format!("cannot read sslrootcert {path}: {e}"), "Point sslrootcert at a PEM file of the database server's CA."))?;
    for c in certs {
        let c = c.map_err(|e| misconfigured(format!("cannot read sslrootcert {path}: {e}"), "Point sslrootcert at a PEM file of the database server's CA."))?;
        roots.add(c).map_err(|e| misconfigured(format!("sslrootcert {path} holds an unusable certificate: {e}"), ""))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| misconfigured(format!("cannot set up TLS to the database: {e}"), ""))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Drives a connection's future; its end is reported on `closed`.
fn watch_connection<F>(conn: F, closed: watch::Sender<bool>)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection ended");
        }
        let _ = closed.send(true);
    });
}

/// As libpq: a URL without a password takes `PGPASSWORD`'s (the operator's
/// `PGPASSWORD=… branchsync init`); one in the URL wins.
fn password_from_env(cfg: &mut tokio_postgres::Config, env: Option<String>) {
    if let (None, Some(pw)) = (cfg.get_password(), env.filter(|p| !p.is_empty())) {
        cfg.password(pw);
    }
}

/// Connects, spawns the connection future, and pins the session settings.
/// `sslmode=require` (or `prefer` with `sslrootcert`) connects with TLS,
/// the server verified against `sslrootcert` ([`split_root_cert`]).
pub async fn connect(url: &str, application_name: &str) -> Result<PgConn, EngineError> {
    let (url, root_cert) = split_root_cert(url);
    let mut cfg: tokio_postgres::Config = url.parse().map_err(EngineError::pg("parsing the database URL"))?;
    cfg.application_name(application_name);
    password_from_env(&mut cfg, std::env::var("PGPASSWORD").ok());
    let (tx, rx) = watch::channel(false);
    // prefer (tokio-postgres's default) without sslrootcert stays plaintext:
    // nothing to verify the server against.
    let plain = match cfg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => true,
        tokio_postgres::config::SslMode::Prefer => root_cert.is_none(),
        _ => false,
    };
    let client = if plain {
        let (client, conn) = cfg.connect(NoTls).await.map_err(EngineError::pg("connecting to the database"))?;
        watch_connection(conn, tx);
        client
    } else {
        let tls = database_tls(root_cert.as_deref())?;
        let (client, conn) = cfg.connect(tls).await.map_err(EngineError::pg("connecting to the database over TLS"))?;
        watch_connection(conn, tx);
        client
    };
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

/// `s` as an SQL string literal that means `s` whatever
/// `standard_conforming_strings` says (an `E''` string, backslashes and
/// quotes doubled): for statements sent as simple queries, where a value
/// cannot be a parameter.
pub fn quote_literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Formats an LSN as PostgreSQL does (`16/B374D848`).
pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The open transaction's id, as marks are bound to it (R25): the low 32
/// bits of `pg_current_xact_id()`, which logical decoding reports.
pub const CURRENT_XID: &str = "SELECT (pg_current_xact_id()::text::int8 % 4294967296)";

#[cfg(test)]
mod tests {
    #[test]
    fn pgpassword_fills_a_url_without_a_password_and_never_overrides_one() {
        let with = |url: &str, env: &str| {
            let mut c: tokio_postgres::Config = url.parse().unwrap();
            super::password_from_env(&mut c, Some(env.to_string()));
            c.get_password().map(|p| String::from_utf8_lossy(p).into_owned())
        };
        assert_eq!(with("host=x user=postgres", "s3cret").as_deref(), Some("s3cret"));
        assert_eq!(with("host=x user=postgres password=given", "s3cret").as_deref(), Some("given"));
        assert_eq!(with("host=x", ""), None);
    }

    /// A literal reads back as the string it was made of, quotes,
    /// backslashes and JSON escapes included, with either setting of
    /// `standard_conforming_strings` (DDL replay sends a sealed JSON
    /// message this way).
    #[tokio::test]
    async fn a_literal_reads_back_as_its_string_whatever_the_server_makes_of_backslashes() {
        let pg = crate::test_utils::PgCluster::start();
        let c = pg.connect().await;
        let texts = ["plain", "it's", "a\\b", "\\'", "''\\\\", r#"{"sql":"CREATE TABLE \"x\" (a text DEFAULT 'q\\n')"}"#, "tab\there", "ünï çødé", ""];
        for setting in ["on", "off"] {
            c.batch_execute(&format!("SET standard_conforming_strings = {setting}")).await.unwrap();
            for t in texts {
                let rows = c.simple_query(&format!("SELECT {}", super::quote_literal(t))).await.unwrap();
                let got = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                assert_eq!(got.as_deref(), Some(t), "standard_conforming_strings = {setting}");
            }
        }
    }

    #[test]
    fn lsn_prints_like_postgres() {
        assert_eq!(super::fmt_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::fmt_lsn(0), "0/0");
    }
}
