//! TLS on the link: the chain's private certificate authority, each node's
//! credentials, and the rustls configurations of both ends.
//!
//! # The chain's CA
//!
//! `init` at the main creates a private CA (`ca.pem`, `ca.key`) and the
//! main's certificate (`cert.pem`, `key.pem`) in the main's TLS directory
//! when there are none. `branchsync tls issue NAME` at the main writes a
//! shop's credentials (`ca.pem`, `cert.pem`, `key.pem`) into a directory for
//! the operator to copy into the shop's TLS directory. The CA's key never
//! leaves the main.
//!
//! # Who may be whom
//!
//! The main's certificate names [`MAIN_NAME`] and may authenticate servers
//! only (extended key usage `serverAuth`); a shop's names
//! `<node>.branch.branchsync` and may authenticate clients only. A branch
//! verifies the main against the CA *and* that name, so a shop's
//! certificate, valid as it is, cannot pose as the main; the main verifies
//! every branch against the CA (mutual TLS), then binds the certificate to
//! the node name the branch claims in its `Hello` ([`valid_for_node`]) and
//! refuses certificates listed as revoked.
//!
//! # Renewal without downtime
//!
//! Credentials are read from their files when a session starts
//! ([`CredentialSource`] reloads them when a file changed), so a renewed
//! certificate takes effect at the next session; the running one goes on.
//!
//! # What this never does
//!
//! It never falls back to plaintext: a node whose peer does not speak TLS
//! fails the session with a message that says so. Plaintext needs an
//! explicit `sync.insecure = true` at both ends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

/// The name in the main's certificate, which every branch checks.
pub const MAIN_NAME: &str = "main.branchsync";
/// Default validity of a certificate issued by `init` or `tls issue` (days).
pub const DEFAULT_DAYS: u32 = 825;
/// Validity of the CA created by `init` (days).
const CA_DAYS: u32 = 20 * 365;

/// The files of a TLS directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's key (at the main only).
pub const CA_KEY: &str = "ca.key";
/// This node's certificate.
pub const CERT: &str = "cert.pem";
/// This node's key.
pub const KEY: &str = "key.pem";

/// A TLS setup or handshake failure, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credential file is missing or unreadable.
    #[error("could not read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A credential file could not be written.
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A credential file holds no usable certificate or key.
    #[error("invalid {what} in {path}: {message}")]
    Invalid { what: &'static str, path: PathBuf, message: String },
    /// Creating or signing a certificate failed.
    #[error("could not create a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// SHA-256 fingerprint of a certificate, as `sha256:<hex>`.
pub fn fingerprint(der: &[u8]) -> String {
    let d = Sha256::digest(der);
    let mut s = String::from("sha256:");
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The DNS name a branch's certificate carries: the node name when it is a
/// plain lowercase label, else its bytes in hex (names are free text).
pub fn branch_dns_name(node: &str) -> String {
    let plain = !node.is_empty()
        && node.len() <= 63
        && node.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !node.starts_with('-')
        && !node.ends_with('-')
        && !node.starts_with("x-");
    let label = if plain { node.to_string() } else { format!("x-{}", node.bytes().map(|b| format!("{b:02x}")).collect::<String>()) };
    format!("{label}.branch.branchsync")
}

/// Whether the certificate `der` (already verified against the CA) is the
/// one issued to `node`.
pub fn valid_for_node(der: &CertificateDer<'_>, node: &str) -> bool {
    let Ok(name) = ServerName::try_from(branch_dns_name(node)) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(der) {
        Ok(cert) => cert.verify_is_valid_for_subject_name(&name).is_ok(),
        Err(_) => false,
    }
}

/// What a certificate says about itself, for `status` and `tls show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// Subject common name.
    pub subject: String,
    /// `sha256:<hex>`.
    pub fingerprint: String,
    /// Not valid before (RFC 3339).
    pub not_before: String,
    /// Not valid after (RFC 3339).
    pub not_after: String,
    /// Seconds until it expires (negative: expired).
    pub expires_in_s: i64,
}

/// Reads what the certificate in `path` says about itself.
pub fn cert_info(path: &Path) -> Result<CertInfo, TlsError> {
    let der = read_cert(path, "certificate")?;
    let (_, x) = x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::Invalid { what: "certificate", path: path.into(), message: e.to_string() })?;
    let subject = x.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("").to_string();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(CertInfo {
        subject,
        fingerprint: fingerprint(&der),
        not_before: rfc3339(x.validity().not_before.timestamp()),
        not_after: rfc3339(x.validity().not_after.timestamp()),
        expires_in_s: x.validity().not_after.timestamp() - now,
    })
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// This machine's clock, for messages about validity.
pub fn clock_now() -> String {
    rfc3339(time::OffsetDateTime::now_utc().unix_timestamp())
}

fn read_cert(path: &Path, what: &'static str) -> Result<CertificateDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.into(), source })?;
    CertificateDer::from_pem_slice(&bytes).map_err(|e| TlsError::Invalid { what, path: path.into(), message: e.to_string() })
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read { what: "private key", path: path.into(), source })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Invalid { what: "private key", path: path.into(), message: e.to_string() })
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write { path: path.into(), source };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(if secret { 0o600 } else { 0o644 });
        }
        let mut f = o.open(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    // Renamed into place: a daemon reloading never reads half a file.
    std::fs::rename(&tmp, path).map_err(err)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A day of slack for shop clocks a little behind the main's.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// Whether `dir` holds a CA (the main's TLS directory after `init`).
pub fn has_ca(dir: &Path) -> bool {
    dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists()
}

/// Creates the chain's CA and the main's certificate in `dir` (which must
/// not hold a CA yet).
pub fn create_ca(dir: &Path, chain: &str) -> Result<CertInfo, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.into(), source })?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("branchsync CA of {chain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key)?;
    write_file(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write_file(&dir.join(CA_CERT), &cert.pem(), false)?;
    issue_main(dir, DEFAULT_DAYS)
}

fn load_issuer(ca_dir: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let key_path = ca_dir.join(CA_KEY);
    let key_pem = std::fs::read_to_string(&key_path).map_err(|source| TlsError::Read { what: "CA key", path: key_path.clone(), source })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Invalid { what: "CA key", path: key_path, message: e.to_string() })?;
    let ca_path = ca_dir.join(CA_CERT);
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|source| TlsError::Read { what: "CA certificate", path: ca_path.clone(), source })?;
    Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| TlsError::Invalid { what: "CA certificate", path: ca_path, message: e.to_string() })
}

/// (Re)issues the main's own certificate in `dir`, which holds the CA.
pub fn issue_main(dir: &Path, days: u32) -> Result<CertInfo, TlsError> {
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![MAIN_NAME.to_string()])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "branchsync main");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    // Key first: a reload between the two renames fails its handshake
    // once (key and certificate disagree) and succeeds at the next.
    write_file(&dir.join(KEY), &key.serialize_pem(), true)?;
    write_file(&dir.join(CERT), &cert.pem(), false)?;
    cert_info(&dir.join(CERT))
}

/// Issues a branch's credentials, signed by the CA in `ca_dir`, into
/// `out` (`ca.pem`, `cert.pem`, `key.pem`), valid from a day ago for
/// `days` days (which may be negative for tests of expiry: never from the
/// CLI).
pub fn issue_branch(ca_dir: &Path, node: &str, out: &Path, days: i64) -> Result<CertInfo, TlsError> {
    let issuer = load_issuer(ca_dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![branch_dns_name(node)])?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, format!("branchsync branch {node}"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1).max(time::Duration::days(1 - days));
    params.not_after = now + time::Duration::days(days);
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write { path: out.into(), source })?;
    let ca = std::fs::read_to_string(ca_dir.join(CA_CERT)).map_err(|source| TlsError::Read { what: "CA certificate", path: ca_dir.join(CA_CERT), source })?;
    write_file(&out.join(CA_CERT), &ca, false)?;
    write_file(&out.join(KEY), &key.serialize_pem(), true)?;
    write_file(&out.join(CERT), &cert.pem(), false)?;
    cert_info(&out.join(CERT))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let path = dir.join(CA_CERT);
    let ca = read_cert(&path, "CA certificate")?;
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| TlsError::Invalid { what: "CA certificate", path, message: e.to_string() })?;
    Ok(Arc::new(roots))
}

/// The chain's client verifier, refusing revoked certificates in the
/// handshake (the shop is told by a `certificate_revoked` alert).
#[derive(Debug)]
struct RevokingVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: Vec<String>,
}

impl rustls::server::danger::ClientCertVerifier for RevokingVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        if self.revoked.contains(&fp) {
            tracing::warn!(fingerprint = %fp, "a revoked certificate ([tls] revoked) was presented; refused");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &rustls::DigitallySignedStruct) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The main's server configuration: its certificate, every branch
/// authenticated by a certificate of the chain's CA that is not revoked.
pub fn server_config(dir: &Path, revoked: &[String]) -> Result<Arc<ServerConfig>, TlsError> {
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
        .build()
        .map_err(|e| TlsError::Invalid { what: "CA certificate", path: dir.join(CA_CERT), message: e.to_string() })?;
    let verifier = Arc::new(RevokingVerifier { inner, revoked: revoked.to_vec() });
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![read_cert(&dir.join(CERT), "certificate")?], read_key(&dir.join(KEY))?)?;
    Ok(Arc::new(cfg))
}

/// A branch's client configuration: the main verified against the chain's
/// CA (the name is checked at connect), this branch's certificate offered.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(vec![read_cert(&dir.join(CERT), "certificate")?], read_key(&dir.join(KEY))?)?;
    Ok(Arc::new(cfg))
}

/// The name a branch expects the main's certificate to carry.
pub fn main_server_name() -> ServerName<'static> {
    ServerName::try_from(MAIN_NAME).expect("MAIN_NAME is a valid DNS name")
}

/// A configuration built from a TLS directory, built again when one of its
/// files changed (a renewed certificate takes effect at the next session).
pub struct CredentialSource<T> {
    dir: PathBuf,
    build: Box<dyn Fn(&Path) -> Result<Arc<T>, TlsError> + Send + Sync>,
    cached: Mutex<Option<(Vec<Option<SystemTime>>, Arc<T>)>>,
}

impl<T> CredentialSource<T> {
    /// Credentials from `dir`, built by `build`.
    pub fn new(dir: PathBuf, build: impl Fn(&Path) -> Result<Arc<T>, TlsError> + Send + Sync + 'static) -> Self {
        CredentialSource { dir, build: Box::new(build), cached: Mutex::new(None) }
    }

    /// The TLS directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Builds the configuration again at the next [`CredentialSource::get`]
    /// (what `build` reads besides the files changed: the revoked list).
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The current configuration.
    pub fn get(&self) -> Result<Arc<T>, TlsError> {
        let stamp: Vec<Option<SystemTime>> = [CA_CERT, CERT, KEY].iter().map(|f| std::fs::metadata(self.dir.join(f)).and_then(|m| m.modified()).ok()).collect();
        let mut g = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, cfg)) = g.as_ref() {
            if *s == stamp {
                return Ok(cfg.clone());
            }
        }
        let cfg = (self.build)(&self.dir)?;
        *g = Some((stamp, cfg.clone()));
        Ok(cfg)
    }
}

/// The main's credentials.
pub type ServerCredentials = CredentialSource<ServerConfig>;
/// A branch's credentials.
pub type ClientCredentials = CredentialSource<ClientConfig>;

/// Explains a failed TLS handshake or session, seen from a branch (`at_main`
/// false) or from the main: what happened and what to do, or `None` when
/// the error is not about TLS.
pub fn explain(e: &std::io::Error, at_main: bool) -> Option<String> {
    let err = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let peer = if at_main { "the branch's" } else { "the main's" };
    let clock = clock_now();
    let cert_error = |c: &CertificateError| -> String {
        match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                let when = match c {
                    CertificateError::ExpiredContext { not_after, .. } => format!(" on {}", rfc3339(unix_s(*not_after))),
                    _ => String::new(),
                };
                format!(
                    "{peer} certificate expired{when}. This machine's clock says {clock}. If the clock is right, renew the certificate at the main (branchsync tls issue NAME for a branch, branchsync tls renew for the main); if not, set the clock."
                )
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                let when = match c {
                    CertificateError::NotValidYetContext { not_before, .. } => format!(" until {}", rfc3339(unix_s(*not_before))),
                    _ => String::new(),
                };
                format!("{peer} certificate is not valid{when}, but this machine's clock says {clock}: this machine's clock is behind. Set the clock (NTP).")
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "{peer} certificate is not signed by this chain's CA ({CA_CERT}): another server answered, or something in between presented its own certificate. Nothing was sent."
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "{peer} certificate is not a main's certificate (it is not issued to {MAIN_NAME}): a branch's certificate or another server is posing as the main. Nothing was sent."
            ),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                format!("{peer} certificate may not be used for this end of the link (a branch's certificate posing as the main, or the reverse). Nothing was sent.")
            }
            CertificateError::Revoked => format!("{peer} certificate is revoked."),
            other => format!("{peer} certificate was refused: {other:?}."),
        }
    };
    Some(match err {
        rustls::Error::InvalidCertificate(c) => format!("TLS: {}", cert_error(c)),
        rustls::Error::AlertReceived(a) => {
            let other = if at_main { "the branch" } else { "the main" };
            match a {
                AlertDescription::CertificateExpired => format!("TLS: {other} refused this node's certificate as expired (this machine's clock says {clock}). Renew it at the main: branchsync tls issue NAME."),
                AlertDescription::CertificateRevoked => format!("TLS: {other} refused this node's certificate as revoked."),
                AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::CertificateUnknown | AlertDescription::DecryptError => format!(
                    "TLS: {other} refused this node's certificate ({a:?}): it is not signed by the chain's CA, or is not valid for this end of the link. Issue this shop's credentials at the main with branchsync tls issue NAME and copy them into the TLS directory."
                ),
                AlertDescription::CertificateRequired => format!("TLS: {other} requires a certificate from this node: issue one at the main with branchsync tls issue NAME."),
                other_alert => format!("TLS: {other} ended the handshake ({other_alert:?})."),
            }
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } | rustls::Error::InappropriateHandshakeMessage { .. } => {
            if at_main {
                "TLS: the peer did not speak TLS (a branch with sync.insecure = true, or not a branchsync branch).".to_string()
            } else {
                "TLS: the main did not answer with TLS (a main with sync.insecure = true, or something in between that is not branchsync). Nothing was sent.".to_string()
            }
        }
        rustls::Error::NoCertificatesPresented => "TLS: the branch presented no certificate. Issue one at the main with branchsync tls issue NAME.".to_string(),
        other => format!("TLS: {other}"),
    })
}

fn unix_s(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_are_plain_labels_or_hex() {
        assert_eq!(branch_dns_name("branch1"), "branch1.branch.branchsync");
        assert_eq!(branch_dns_name("Shop_12"), "x-53686f705f3132.branch.branchsync");
        assert_eq!(branch_dns_name("x-1"), "x-782d31.branch.branchsync");
        assert!(ServerName::try_from(branch_dns_name(&"é".repeat(10))).is_ok());
    }

    #[test]
    fn a_branch_certificate_names_its_node_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        create_ca(dir.path(), "test").unwrap();
        let out = dir.path().join("b1");
        let info = issue_branch(dir.path(), "branch1", &out, 30).unwrap();
        assert!(info.expires_in_s > 29 * 86_400 && info.expires_in_s <= 30 * 86_400, "{info:?}");
        let der = read_cert(&out.join(CERT), "certificate").unwrap();
        assert!(valid_for_node(&der, "branch1"));
        assert!(!valid_for_node(&der, "branch2"));
        assert!(!valid_for_node(&der, "main"));
        let main = read_cert(&dir.path().join(CERT), "certificate").unwrap();
        assert!(!valid_for_node(&main, "branch1"));
        assert_eq!(cert_info(&out.join(CERT)).unwrap().fingerprint, fingerprint(&der));
        // Both configurations build from what was written.
        server_config(dir.path(), &[]).unwrap();
        client_config(&out).unwrap();
    }
}
