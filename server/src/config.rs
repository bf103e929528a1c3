//! The node's TOML configuration: typed, defaulted, validated before the
//! runtime starts.
//!
//! One file per node (`--config FILE` or `BRANCHSYNC_CONFIG`). Environment
//! overrides: `BRANCHSYNC_TOKEN` replaces the node's own token,
//! `BRANCHSYNC_DATABASE_URL` replaces `database.url`. Secrets may come from
//! a file (`token_file`) or the environment; they never appear in `Debug`
//! output or error messages. Every error names the file and the key.

use std::path::{Path, PathBuf};

use branchsync_engine::scope::Scope;
use branchsync_engine::Role;
use serde::Deserialize;

/// Default period of the sequence stripe audit (ms).
pub const DEFAULT_AUDIT_INTERVAL_MS: u64 = 10_000;
/// Default key stride.
pub const DEFAULT_STRIDE: u32 = 100;
/// Default cap of the reconnect backoff (ms).
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 5_000;
/// Default heartbeat period (ms).
pub const DEFAULT_HEARTBEAT_MS: u64 = 1_000;
/// Default silence after which a peer is gone (ms).
pub const DEFAULT_PEER_TIMEOUT_MS: u64 = 10_000;
/// Default time budget of a grouped apply transaction (ms).
pub const DEFAULT_APPLY_GROUP_MS: u64 = 50;
/// Default largest frame (bytes); larger entries travel in chunks (one at
/// a time, so the frame is above the largest fragment capture writes,
/// [`DEFAULT_FRAGMENT_BYTES`]). The frame reader's buffer grows to about
/// twice the largest frame read.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;
/// Default flow-control window: bytes of entries a receiver buffers
/// (undecoded: apply decodes them a slice of 4 MiB at a time).
pub const DEFAULT_WINDOW_BYTES: usize = 16 * 1024 * 1024;
/// Default time acknowledged log entries are kept (days).
pub const DEFAULT_KEEP_ACKED_DAYS: u32 = 7;
/// Default rows per log fragment.
pub const DEFAULT_FRAGMENT_ROWS: usize = 5_000;
/// Default bytes per log fragment.
pub const DEFAULT_FRAGMENT_BYTES: usize = 4 * 1024 * 1024;
/// Default largest row captured (bytes, as PostgreSQL hands it over).
pub const DEFAULT_MAX_ROW_BYTES: usize = 900 * 1024 * 1024;

/// A configuration error: the file, the key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or type error, or an unknown key.
    #[error("invalid configuration in {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration in {path}: key \"{key}\": {message}")]
    Invalid { path: PathBuf, key: String, message: String },
}

/// A secret whose value never prints.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Unique node name.
    pub name: String,
    /// Main or branch.
    pub role: Role,
    /// Node index (key stripe).
    pub index: u32,
    /// Where the log lives.
    pub data_dir: PathBuf,
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSection {
    /// libpq-style connection string.
    pub url: String,
    /// Replicated schemas.
    #[serde(default = "default_schemas")]
    pub schemas: Vec<String>,
    /// Tables that stay local.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// The role the daemon connects as (`init`, run with `url` as a
    /// superuser, creates it without superuser rights). Every command but
    /// `init` connects with `url` and this role instead of `url`'s user.
    #[serde(default = "default_daemon_role")]
    pub daemon_role: String,
    /// How capture reads the slot: `"stream"` (a walsender decodes the WAL
    /// once and streams it) or `"peek"` (polls `pg_logical_slot_peek_binary_changes`).
    #[serde(default)]
    pub capture: CaptureMode,
    /// The scheduling priority (`nice`, 0 to 19) of capture's thread: the
    /// sales at the site come before their capture when its processors are
    /// all busy; capture catches up when they are not. 0 runs it as the
    /// rest of the daemon.
    #[serde(default = "default_capture_nice")]
    pub capture_nice: i32,
}

fn default_capture_nice() -> i32 {
    10
}

/// `[database] capture`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// The streaming replication protocol: the walsender decodes each WAL
    /// record once.
    #[default]
    Stream,
    /// Polling peeks at the slot: each poll decodes again from the slot's
    /// restart point.
    Peek,
}

fn default_daemon_role() -> String {
    "branchsync".into()
}

fn default_schemas() -> Vec<String> {
    vec!["public".into()]
}

/// One `[[sync.peers]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Branch name.
    pub name: String,
    /// Branch index.
    pub index: u32,
    /// Inline token.
    #[serde(default)]
    token: Option<Secret>,
    /// Token file.
    #[serde(default)]
    token_file: Option<PathBuf>,
}

impl Peer {
    /// The branch's token (resolved at load).
    pub fn token(&self) -> &str {
        self.token.as_ref().map(|s| s.0.as_str()).unwrap_or("")
    }
}

/// `[sync]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSection {
    /// Branch: the main's address.
    pub main: Option<String>,
    /// Main: where to listen.
    pub listen: Option<String>,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// Cap of the reconnect backoff (ms).
    #[serde(default = "d_reconnect")]
    pub reconnect_max_ms: u64,
    /// Heartbeat period (ms).
    #[serde(default = "d_heartbeat")]
    pub heartbeat_ms: u64,
    /// Silence after which a peer is gone (ms).
    #[serde(default = "d_timeout")]
    pub peer_timeout_ms: u64,
    /// Apply group budget (ms).
    #[serde(default = "d_group")]
    pub apply_group_ms: u64,
    /// Largest frame (bytes).
    #[serde(default = "d_frame")]
    pub max_frame_bytes: usize,
    /// Flow-control window: bytes of entries this node buffers for its
    /// apply; the sender never has more in flight.
    #[serde(default = "d_window")]
    pub window_bytes: usize,
    /// Main: the branches.
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Plaintext link, no TLS (both ends must say so; logged loudly).
    #[serde(default)]
    pub insecure: bool,
    /// Main: a branch's change stamped more than this many seconds ahead
    /// of the main's clock when it arrives is clamped to that moment.
    #[serde(default = "d_stamp_ahead")]
    pub max_stamp_ahead_s: u64,
}

/// Default lead a branch's stamp may have over the main's clock (s).
pub const DEFAULT_MAX_STAMP_AHEAD_S: u64 = 300;
fn d_stamp_ahead() -> u64 {
    DEFAULT_MAX_STAMP_AHEAD_S
}

fn d_reconnect() -> u64 {
    DEFAULT_RECONNECT_MAX_MS
}
fn d_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_MS
}
fn d_timeout() -> u64 {
    DEFAULT_PEER_TIMEOUT_MS
}
fn d_group() -> u64 {
    DEFAULT_APPLY_GROUP_MS
}
fn d_frame() -> usize {
    DEFAULT_MAX_FRAME_BYTES
}
fn d_stride() -> u32 {
    DEFAULT_STRIDE
}
fn d_window() -> usize {
    DEFAULT_WINDOW_BYTES
}

/// `[log]`: the local log in `node.data_dir`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Days acknowledged entries are kept before their space is reclaimed,
    /// so a peer restored from a backup can be refilled from them.
    #[serde(default = "d_keep_acked")]
    pub keep_acked_days: u32,
    /// Disk budget of the log in bytes (unset: the disk's free space).
    /// Capture pauses at it; `status` warns at 80 %.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Rows per log fragment of a large transaction.
    #[serde(default = "d_fragment_rows")]
    pub fragment_rows: usize,
    /// Bytes per log fragment of a large transaction.
    #[serde(default = "d_fragment_bytes")]
    pub fragment_bytes: usize,
    /// Largest row captured, as PostgreSQL hands it over (a bytea value
    /// counts twice: it travels as hex). A larger row stops capture until
    /// `branchsync capture skip` records that it may be skipped.
    #[serde(default = "d_max_row_bytes")]
    pub max_row_bytes: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            keep_acked_days: DEFAULT_KEEP_ACKED_DAYS,
            max_bytes: None,
            fragment_rows: DEFAULT_FRAGMENT_ROWS,
            fragment_bytes: DEFAULT_FRAGMENT_BYTES,
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }
}

fn d_keep_acked() -> u32 {
    DEFAULT_KEEP_ACKED_DAYS
}
fn d_fragment_rows() -> usize {
    DEFAULT_FRAGMENT_ROWS
}
fn d_fragment_bytes() -> usize {
    DEFAULT_FRAGMENT_BYTES
}
fn d_max_row_bytes() -> usize {
    DEFAULT_MAX_ROW_BYTES
}

/// `[http]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address of `/status`, `/metrics`, `/health`.
    pub listen: Option<String>,
    /// Bearer token: required off loopback and for any state change.
    #[serde(default)]
    token: Option<Secret>,
    /// File holding the token.
    #[serde(default)]
    token_file: Option<PathBuf>,
}

impl HttpSection {
    /// The HTTP bearer token (resolved at load).
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|s| s.0.as_str()).filter(|t| !t.is_empty())
    }
}

/// Whether `addr` (`host:port`) is a loopback address.
pub fn is_loopback_addr(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `[keys]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// Key stride.
    #[serde(default = "d_stride")]
    pub stride: u32,
    /// How often the daemon checks that every sequence is on its stripe
    /// (`setval` fires no trigger, R18), in milliseconds.
    #[serde(default = "d_audit")]
    pub audit_interval_ms: u64,
}

impl Default for KeysSection {
    fn default() -> Self {
        KeysSection { stride: DEFAULT_STRIDE, audit_interval_ms: DEFAULT_AUDIT_INTERVAL_MS }
    }
}

fn d_audit() -> u64 {
    DEFAULT_AUDIT_INTERVAL_MS
}

/// One `[[tables]]` entry: the rules of the tables its glob matches (first
/// match wins; the same at every node).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    /// Glob over `name` or `schema.name`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// `"lww"` (default), `"main_wins"` or `"branch_wins"`.
    #[serde(default)]
    pub rule: branchsync_engine::conflict::ConflictRule,
    /// Counter columns whose concurrent changes add up.
    #[serde(default)]
    pub delta: Vec<String>,
    /// `"delete_wins"` (default) or `"update_wins"`.
    #[serde(default)]
    pub on_delete_conflict: branchsync_engine::conflict::DeleteConflict,
    /// `"record"` (default) or `"merge"`.
    #[serde(default)]
    pub on_unique_conflict: branchsync_engine::conflict::UniqueConflict,
    /// Replicate `TRUNCATE` of these tables (default false, R21).
    #[serde(default)]
    pub truncate: bool,
    /// Site-local columns: each site keeps and advances its own value
    /// (document counters and their per-site prefix).
    #[serde(default)]
    pub local: Vec<String>,
}

impl TableEntry {
    /// As the engine's rule.
    pub fn rule(&self) -> branchsync_engine::conflict::TableRule {
        branchsync_engine::conflict::TableRule {
            pattern: self.pattern.clone(),
            rule: self.rule,
            delta: self.delta.clone(),
            on_delete_conflict: self.on_delete_conflict,
            on_unique_conflict: self.on_unique_conflict,
            truncate: self.truncate,
            local: self.local.clone(),
        }
    }
}

/// Default tombstone retention, and longest time a branch may be away (days).
pub const DEFAULT_TOMBSTONE_DAYS: u32 = 30;

/// `[conflicts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictsSection {
    /// How long deletes are remembered (tombstones), in days; a branch away
    /// longer must be re-seeded (R23). Equal at every node.
    #[serde(default = "d_tombstone_days")]
    pub tombstone_days: u32,
}

impl Default for ConflictsSection {
    fn default() -> Self {
        ConflictsSection { tombstone_days: DEFAULT_TOMBSTONE_DAYS }
    }
}

fn d_tombstone_days() -> u32 {
    DEFAULT_TOMBSTONE_DAYS
}

/// Where schema changes may come from (`[ddl] from`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DdlFrom {
    /// Only the main's DDL replicates; a branch's own DDL stays local and
    /// `status` warns about the drift.
    #[default]
    Main,
    /// DDL made at any node replicates.
    Any,
}

/// `[ddl]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdlSection {
    /// `"main"` (default) or `"any"`.
    #[serde(default)]
    pub from: DdlFrom,
    /// Role that replayed DDL runs as; default: the role that ran it at the
    /// author. Never a superuser (R22).
    #[serde(default)]
    pub run_as: Option<String>,
}

/// `[tls]`: the link's credentials (see `branchsync tls`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Directory of `ca.pem`, `cert.pem`, `key.pem` (and, at the main,
    /// `ca.key`); default `tls/` beside the configuration file.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Main: fingerprints (`sha256:…`, as `tls issue` and `tls show` print
    /// them) of branch certificates no longer accepted.
    #[serde(default)]
    pub revoked: Vec<String>,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[node]`.
    pub node: NodeSection,
    /// `[database]`.
    pub database: DatabaseSection,
    /// `[sync]`.
    pub sync: SyncSection,
    /// `[http]`.
    #[serde(default)]
    pub http: HttpSection,
    /// `[keys]`.
    #[serde(default)]
    pub keys: KeysSection,
    /// `[ddl]`.
    #[serde(default)]
    pub ddl: DdlSection,
    /// `[[tables]]`.
    #[serde(default)]
    pub tables: Vec<TableEntry>,
    /// `[conflicts]`.
    #[serde(default)]
    pub conflicts: ConflictsSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
    /// `[tls]`.
    #[serde(default)]
    pub tls: TlsSection,
    /// `[preset]`: an ERP's exclude list and `[[tables]]` entries, shipped
    /// with the binary ([`Preset`]).
    #[serde(default)]
    pub preset: Option<PresetSection>,
    /// The version of the preset applied at load, if any.
    #[serde(skip)]
    pub preset_version: Option<String>,
    #[serde(skip)]
    path: PathBuf,
}

/// `[preset]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetSection {
    /// `"tryton"` or `"odoo"` ([`PRESETS`]).
    pub erp: String,
}

/// The presets shipped with the binary: name and text (every entry
/// explained in a comment).
pub const PRESETS: &[(&str, &str)] = &[("tryton", include_str!("../presets/tryton.toml")), ("odoo", include_str!("../presets/odoo.toml"))];

/// A preset: what one ERP needs in every site's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Told at the handshake, so that sites on different releases of a
    /// preset are named as such.
    pub version: String,
    /// Tables that stay at each site (added to `database.exclude`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Table rules, after the site's own `[[tables]]`.
    #[serde(default)]
    pub tables: Vec<TableEntry>,
}

impl Preset {
    /// The shipped preset `erp`, parsed.
    pub fn shipped(erp: &str) -> Option<Result<Preset, String>> {
        PRESETS.iter().find(|(n, _)| *n == erp).map(|(_, text)| toml::from_str(text).map_err(|e| e.to_string()))
    }
}

impl Config {
    /// The file this configuration was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `init` keeps the daemon role's password (mode 0600).
    pub fn daemon_password_path(&self) -> PathBuf {
        self.node.data_dir.join("database.password")
    }

    /// The connection string every command but `init` uses: `database.url`
    /// with the user replaced by `database.daemon_role` and, when `init`
    /// wrote one, that role's password. Later keys win in both forms
    /// libpq accepts.
    pub fn daemon_url(&self) -> String {
        let pw = std::fs::read_to_string(self.daemon_password_path()).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let url = self.database.url.trim();
        let role = &self.database.daemon_role;
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let sep = if url.contains('?') { '&' } else { '?' };
            match pw {
                Some(pw) => format!("{url}{sep}user={role}&password={pw}"),
                None => format!("{url}{sep}user={role}"),
            }
        } else {
            match pw {
                Some(pw) => format!("{url} user={role} password={pw}"),
                None => format!("{url} user={role}"),
            }
        }
    }

    /// Reads, overrides from the environment, resolves token files, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_env(path, &|k| std::env::var(k).ok())
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_with_env(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        cfg.path = path.to_path_buf();
        if let Some(section) = cfg.preset.clone() {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            let preset = match Preset::shipped(&section.erp) {
                Some(Ok(p)) => p,
                Some(Err(e)) => return Err(cfg.invalid("preset.erp", format!("the shipped preset \"{}\" does not parse: {e}", section.erp))),
                None => return Err(cfg.invalid("preset.erp", format!("no preset \"{}\"; shipped: {}", section.erp, names.join(", ")))),
            };
            // The site's own entries first: they override the preset's.
            for x in preset.exclude {
                if !cfg.database.exclude.contains(&x) {
                    cfg.database.exclude.push(x);
                }
            }
            cfg.tables.extend(preset.tables);
            cfg.preset_version = Some(preset.version);
        }
        if let Some(url) = env("BRANCHSYNC_DATABASE_URL") {
            cfg.database.url = url;
        }
        let cfg_path = cfg.path.clone();
        let read_token = |file: &Path, key: &str| -> Result<Secret, ConfigError> {
            std::fs::read_to_string(file).map(|s| Secret(s.trim().to_string())).map_err(|e| ConfigError::Invalid {
                path: cfg_path.clone(),
                key: key.into(),
                message: format!("cannot read token file {}: {e}", file.display()),
            })
        };
        if let Some(t) = env("BRANCHSYNC_TOKEN") {
            cfg.sync.token = Some(Secret(t));
        } else if cfg.sync.token.is_none() {
            if let Some(f) = cfg.sync.token_file.clone() {
                cfg.sync.token = Some(read_token(&f, "sync.token_file")?);
            }
        }
        if let Some(t) = env("BRANCHSYNC_HTTP_TOKEN") {
            cfg.http.token = Some(Secret(t));
        } else if cfg.http.token.is_none() {
            if let Some(f) = cfg.http.token_file.clone() {
                cfg.http.token = Some(read_token(&f, "http.token_file")?);
            }
        }
        let mut peers = cfg.sync.peers.clone();
        for (i, p) in peers.iter_mut().enumerate() {
            if p.token.is_none() {
                if let Some(f) = p.token_file.clone() {
                    p.token = Some(read_token(&f, &format!("sync.peers[{i}].token_file"))?);
                }
            }
        }
        cfg.sync.peers = peers;
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid { path: self.path.clone(), key: key.into(), message }
    }

    /// Checks ranges and consistency; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.name.is_empty() || n.name.len() > 40 || !n.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return Err(self.invalid("node.name", format!("\"{}\" must be 1 to 40 characters of a-z, 0-9 and _", n.name)));
        }
        let stride = self.keys.stride;
        if !(2..=10_000).contains(&stride) {
            return Err(self.invalid("keys.stride", format!("{stride} is not between 2 and 10000")));
        }
        if n.index >= stride {
            return Err(self.invalid("node.index", format!("{} is not below keys.stride ({stride})", n.index)));
        }
        if self.database.url.trim().is_empty() {
            return Err(self.invalid("database.url", "must not be empty".into()));
        }
        let r = &self.database.daemon_role;
        let plain = r.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && r.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && r.len() < 64;
        if !plain {
            return Err(self.invalid("database.daemon_role", format!("\"{r}\" is not a plain role name (lowercase letters, digits and _, at most 63)")));
        }
        if !(0..=19).contains(&self.database.capture_nice) {
            return Err(self.invalid("database.capture_nice", format!("{} is not between 0 and 19", self.database.capture_nice)));
        }
        if self.sync.reconnect_max_ms < 100 {
            return Err(self.invalid("sync.reconnect_max_ms", format!("{} is below 100", self.sync.reconnect_max_ms)));
        }
        let addr_ok = |a: &str| a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        match n.role {
            Role::Main => {
                if n.index != 0 {
                    return Err(self.invalid("node.index", format!("the main must have index 0, not {}", n.index)));
                }
                match &self.sync.listen {
                    Some(a) if addr_ok(a) => {}
                    Some(a) => return Err(self.invalid("sync.listen", format!("\"{a}\" is not host:port"))),
                    None => return Err(self.invalid("sync.listen", "the main needs an address to listen on".into())),
                }
                let mut names = std::collections::HashSet::new();
                let mut indexes = std::collections::HashSet::new();
                for (i, p) in self.sync.peers.iter().enumerate() {
                    let key = format!("sync.peers[{i}]");
                    if !names.insert(p.name.clone()) {
                        return Err(self.invalid(&format!("{key}.name"), format!("peer \"{}\" is listed twice", p.name)));
                    }
                    if p.index == 0 || p.index >= stride || !indexes.insert(p.index) {
                        return Err(self.invalid(&format!("{key}.index"), format!("{} must be unique, non-zero and below keys.stride ({stride})", p.index)));
                    }
                    if p.token().is_empty() {
                        return Err(self.invalid(&format!("{key}.token"), format!("peer \"{}\" has no token (set token or token_file)", p.name)));
                    }
                }
            }
            Role::Branch => {
                if n.index == 0 {
                    return Err(self.invalid("node.index", "a branch needs an index of 1 or more (0 is the main's)".into()));
                }
                match &self.sync.main {
                    Some(a) if addr_ok(a) => {}
                    Some(a) => return Err(self.invalid("sync.main", format!("\"{a}\" is not host:port"))),
                    None => return Err(self.invalid("sync.main", "a branch needs the main's address".into())),
                }
                if self.token().is_none_or(str::is_empty) {
                    return Err(self.invalid("sync.token", "a branch needs a token (token, token_file or BRANCHSYNC_TOKEN)".into()));
                }
            }
        }
        let frame = self.sync.max_frame_bytes;
        if !(branchsync_proto::MIN_MAX_FRAME..=(1 << 30)).contains(&frame) {
            return Err(self.invalid("sync.max_frame_bytes", format!("{frame} is not between {} and {}", branchsync_proto::MIN_MAX_FRAME, 1u64 << 30)));
        }
        if self.sync.window_bytes < frame {
            return Err(self.invalid("sync.window_bytes", format!("{} is below sync.max_frame_bytes ({frame})", self.sync.window_bytes)));
        }
        if self.log.fragment_rows == 0 || self.log.fragment_bytes < 1024 {
            return Err(self.invalid("log.fragment_rows", "fragments need at least one row and 1024 bytes (log.fragment_bytes)".into()));
        }
        let max_row = branchsync_proto::MAX_ENTRY_BYTES as usize - 16 * 1024 * 1024;
        if self.log.max_row_bytes == 0 || self.log.max_row_bytes > max_row {
            return Err(self.invalid("log.max_row_bytes", format!("{} is not between 1 and {max_row}", self.log.max_row_bytes)));
        }
        if self.log.max_bytes.is_some_and(|b| b < 64 * 1024 * 1024) {
            return Err(self.invalid("log.max_bytes", "must be at least 64 MiB (67108864)".into()));
        }
        if let Some(a) = &self.http.listen {
            if !is_loopback_addr(a) && self.http.token().is_none() {
                return Err(self.invalid(
                    "http.listen",
                    format!("\"{a}\" is not a loopback address: set http.token or http.token_file (or BRANCHSYNC_HTTP_TOKEN), which every request but /health must then carry as Authorization: Bearer"),
                ));
            }
        }
        for (i, f) in self.tls.revoked.iter().enumerate() {
            let hex = f.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.invalid(&format!("tls.revoked[{i}]"), format!("\"{f}\" is not a certificate fingerprint (sha256: and 64 hex digits, as branchsync tls show prints it)")));
            }
        }
        if self.conflicts.tombstone_days == 0 {
            return Err(self.invalid("conflicts.tombstone_days", "must be at least 1".into()));
        }
        for (i, t) in self.tables.iter().enumerate() {
            if let Err(e) = glob::Pattern::new(&t.pattern) {
                return Err(self.invalid(&format!("tables[{i}].match"), format!("\"{}\" is not a valid glob: {e}", t.pattern)));
            }
            if let Some(c) = t.delta.iter().find(|c| c.trim().is_empty()) {
                return Err(self.invalid(&format!("tables[{i}].delta"), format!("\"{c}\" is not a column name")));
            }
            if let Some(c) = t.local.iter().find(|c| c.trim().is_empty() || t.delta.contains(c)) {
                return Err(self.invalid(&format!("tables[{i}].local"), format!("\"{c}\" is not a column name, or is a delta column too (a column is one or the other)")));
            }
        }
        Ok(())
    }

    /// The `[[tables]]` rules, compiled.
    pub fn table_rules(&self) -> Result<branchsync_engine::conflict::TableRules, branchsync_engine::EngineError> {
        branchsync_engine::conflict::TableRules::new(self.tables.iter().map(TableEntry::rule).collect())
    }

    /// The TLS directory: `[tls] dir` (relative to the configuration
    /// file's directory), or `tls/` beside the configuration file.
    pub fn tls_dir(&self) -> PathBuf {
        let base = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        match &self.tls.dir {
            Some(d) if d.is_absolute() => d.clone(),
            Some(d) => base.join(d),
            None => base.join("tls"),
        }
    }

    /// The node's own token.
    pub fn token(&self) -> Option<&str> {
        self.sync.token.as_ref().map(|s| s.0.as_str())
    }

    /// Replicated schemas minus excluded tables.
    pub fn scope(&self) -> Result<Scope, branchsync_engine::EngineError> {
        Scope::new(&self.database.schemas, &self.database.exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Config::load_with_env(&p, &move |k| env.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone()))
    }

    const BRANCH: &str = "[node]\nname = \"branch1\"\nrole = \"branch\"\nindex = 1\ndata_dir = \"/tmp/x\"\n[database]\nurl = \"host=x\"\nexclude = [\"ir_cache\"]\n[sync]\nmain = \"10.0.0.1:7070\"\ntoken = \"s3cret\"\n[keys]\nstride = 100\n";

    /// The example configurations under packaging/ (README's setup section
    /// installs them) load as they are, with their token files in place, and
    /// agree on what must be equal at every node.
    #[test]
    fn the_packaged_example_configurations_load_and_agree() {
        let dir = tempfile::tempdir().unwrap();
        let packaging = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
        let mut loaded = Vec::new();
        for name in ["main.toml", "branch.toml"] {
            let text = std::fs::read_to_string(packaging.join(name)).unwrap();
            let mut text = text.clone();
            for token in ["/etc/branchsync/branch1.token", "/etc/branchsync/token"] {
                let local = dir.path().join(token.rsplit('/').next().unwrap());
                std::fs::write(&local, "a-shared-secret-of-32-characters!\n").unwrap();
                text = text.replace(token, &local.display().to_string());
            }
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            loaded.push(Config::load_with_env(&p, &|_| None).unwrap_or_else(|e| panic!("packaging/{name}: {e}")));
        }
        let (main, branch) = (&loaded[0], &loaded[1]);
        assert_eq!((main.node.role, branch.node.role), (Role::Main, Role::Branch));
        assert_eq!(main.database.exclude, branch.database.exclude);
        assert_eq!(main.keys.stride, branch.keys.stride);
        let peer = &main.sync.peers[0];
        assert_eq!((peer.name.as_str(), peer.index), (branch.node.name.as_str(), branch.node.index));
        assert_eq!(Some(peer.token()), branch.token(), "the shop's token is the main's peer entry's");
    }

    #[test]
    fn table_rules_parse_and_a_bad_glob_names_its_key() {
        let c = load(&format!("{BRANCH}[[tables]]\nmatch = \"stock_*\"\nrule = \"main_wins\"\ndelta = [\"quantity\"]\ntruncate = true\n"), &[]).unwrap();
        let rules = c.table_rules().unwrap();
        let r = rules.for_table("public", "stock_quant");
        assert_eq!((r.rule, r.delta.as_slice(), r.truncate), (branchsync_engine::conflict::ConflictRule::MainWins, &["quantity".to_string()][..], true));
        assert!(!rules.for_table("public", "orders").truncate, "defaults elsewhere");
        let e = load(&format!("{BRANCH}[[tables]]\nmatch = \"[\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("tables[0].match"), "{e}");
        let e = load(&format!("{BRANCH}[[tables]]\nmatch = \"x\"\nrule = \"coin_flip\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("coin_flip"), "{e}");
    }

    /// A preset adds its local tables and its rules after the site's own
    /// (which win: first match), and names its version; an unknown one is
    /// refused naming the key and the shipped presets.
    #[test]
    fn a_preset_adds_its_tables_and_rules_after_the_sites_own() {
        let c = load(&format!("{BRANCH}[[tables]]\nmatch = \"account_journal_period\"\nrule = \"main_wins\"\n[preset]\nerp = \"tryton\"\n"), &[]).unwrap();
        assert_eq!(c.preset_version.as_deref(), Some("tryton-2"));
        assert_eq!(c.database.exclude.iter().filter(|x| *x == "ir_cache").count(), 1, "the site's own entry is not doubled: {:?}", c.database.exclude);
        assert!(c.database.exclude.iter().any(|x| x == "ir_session") && c.database.exclude.iter().any(|x| x == "res_user_login_attempt"), "{:?}", c.database.exclude);
        assert!(!c.scope().unwrap().includes("public", "ir_session"), "the preset's local tables are out of scope");
        let rules = c.table_rules().unwrap();
        let r = rules.for_table("public", "account_journal_period");
        assert_eq!(r.rule, branchsync_engine::conflict::ConflictRule::MainWins, "the site's own entry wins over the preset's");
        assert_eq!(c.tables.len(), 3, "the preset's two entries follow the site's");
        assert_eq!(rules.for_table("public", "ir_sequence_strict").local, ["prefix", "number_next_internal", "last_timestamp", "write_date", "write_uid"]);
        let e = load(&format!("{BRANCH}[preset]\nerp = \"sap\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("preset.erp") && e.contains("tryton") && e.contains("odoo"), "{e}");
    }

    /// Every shipped preset parses, and a configuration that uses it
    /// validates (its globs and column names hold).
    #[test]
    fn every_shipped_preset_loads_into_a_configuration() {
        for (name, _) in PRESETS {
            let p = Preset::shipped(name).unwrap().unwrap_or_else(|e| panic!("preset {name}: {e}"));
            assert!(p.version.starts_with(name), "{name}: version {}", p.version);
            let c = load(&format!("{BRANCH}[preset]\nerp = \"{name}\"\n"), &[]).unwrap_or_else(|e| panic!("preset {name}: {e}"));
            c.table_rules().unwrap_or_else(|e| panic!("preset {name}: {e}"));
            assert_eq!(c.preset_version, Some(p.version));
        }
    }

    #[test]
    fn the_documented_branch_example_parses_with_defaults() {
        let c = load(BRANCH, &[]).unwrap();
        assert_eq!(c.node.index, 1);
        assert_eq!(c.database.schemas, vec!["public"]);
        assert_eq!(c.sync.apply_group_ms, DEFAULT_APPLY_GROUP_MS);
        assert_eq!(c.database.capture_nice, 10, "capture yields to the site's sales by default");
        assert_eq!(c.token(), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"), "secrets never print");
    }

    #[test]
    fn the_environment_token_wins() {
        let c = load(BRANCH, &[("BRANCHSYNC_TOKEN", "from-env")]).unwrap();
        assert_eq!(c.token(), Some("from-env"));
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        for (text, key) in [
            (BRANCH.replace("index = 1", "index = 100"), "node.index"),
            (BRANCH.replace("main = \"10.0.0.1:7070\"\n", ""), "sync.main"),
            (BRANCH.replace("token = \"s3cret\"\n", ""), "sync.token"),
            (format!("{BRANCH}\n[bogus]\nx = 1\n"), "bogus"),
            (BRANCH.replace("role = \"branch\"", "role = \"main\"").replace("index = 1", "index = 1"), "node.index"),
            (BRANCH.replace("[node]", "[node"), "c.toml"),
            (BRANCH.replace("exclude = [", "capture_nice = 20\nexclude = ["), "database.capture_nice"),
            (BRANCH.replace("exclude = [", "capture_nice = -5\nexclude = ["), "database.capture_nice"),
        ] {
            let e = load(&text, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "error must name {key}: {e}");
            assert!(e.contains("c.toml"), "error must name the file: {e}");
        }
    }

    #[test]
    fn duplicate_peer_indexes_are_refused() {
        let text = "[node]\nname = \"main\"\nrole = \"main\"\nindex = 0\ndata_dir = \"/x\"\n[database]\nurl = \"h\"\n[sync]\nlisten = \"0.0.0.0:7070\"\n\
                    [[sync.peers]]\nname = \"a\"\nindex = 1\ntoken = \"t\"\n[[sync.peers]]\nname = \"b\"\nindex = 1\ntoken = \"t\"\n";
        let e = load(text, &[]).unwrap_err().to_string();
        assert!(e.contains("sync.peers[1].index"), "{e}");
    }
}
