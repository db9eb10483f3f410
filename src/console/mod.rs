//! The auditor's console: read-only web pages over the audit log, for the people who supervise
//! seals (internal audit, the seal keeper, headquarters' risk office).
//!
//! Runs as a process of its own (`sealgate-console`), never inside the stamping daemon: it opens
//! the site's log read-only ([`data`]), serves pages over TLS ([`web`], [`pages`]) to auditors
//! who log in with a password (argon2id) and a TOTP code ([`auth`]), and writes nothing but its
//! own oversight records (logins, searches, exports, acknowledgements), which it asks the daemon
//! to append to the hash-chained log — so they are audit records like any other, and an action
//! whose record cannot be made does not happen.
//!
//! Owns: the console's configuration, its users, sessions, pages and their data access.
//! Never: writes stamps, approvals or policy; logs a password, a TOTP seed or a session token.

pub mod approvals;
pub mod auth;
pub mod central;
pub mod data;
pub mod pages;
pub mod web;

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Writes `text` to `path` whole, mode 0600: a temporary file, synced, renamed over it (the
/// user and approvers files hold secrets).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), ConsoleError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |detail: String| ConsoleError::Config {
        path: path.display().to_string(),
        detail,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| bad(e.to_string()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| bad(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| bad(e.to_string()))
}

/// Why the console cannot start or answer.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console configuration {path}: {detail}")]
    Config { path: String, detail: String },
    #[error("the audit log: {0}")]
    Log(String),
    #[error("the oversight record could not be made: {0}")]
    Record(String),
    /// The daemon refused a request of the approval page (its status, reason code, message).
    #[error("{status}: {message}")]
    Refused {
        status: String,
        reason: String,
        message: String,
    },
}

/// `sealgate-console serve --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Address of the HTTPS listener (e.g. "127.0.0.1:8443").
    pub listen: SocketAddr,
    /// The site's name, shown on every page and in record addresses (at headquarters, the
    /// name shown in the header, e.g. "HQ").
    pub site: String,
    /// A site's console: the site's audit log (the daemon's `state_dir/sealgate.db`), opened
    /// read-only...
    #[serde(default)]
    pub db: Option<PathBuf>,
    /// ...and the daemon's socket: oversight records (logins, searches, exports,
    /// acknowledgements) are appended through it. The console's uid must be a caller with
    /// `oversight = true`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Or headquarters' console: HQ's database, every site's verified records; the role
    /// connected as is the one `sealgate-hq migrate --grant-console` named (it reads, and
    /// adds the console's own events to `console_events`, nothing else).
    #[serde(default)]
    pub hq_database: Option<crate::hq::config::DatabaseConfig>,
    /// At headquarters: a site not heard from for this long is shown silent.
    #[serde(default = "default_silent_after_ms")]
    pub silent_after_ms: i64,
    /// The uid the daemon runs as (checked on connect); the console's own uid when absent.
    #[serde(default)]
    pub daemon_uid: Option<u32>,
    /// The listener's certificate chain and key (PEM).
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The audit key's public key (SPKI PEM), named in the record page's "check it yourself"
    /// commands.
    #[serde(default)]
    pub audit_key: Option<PathBuf>,
    /// The outbox of the site's alert delivery (`sealctl notify`'s `outbox`), opened read-only:
    /// its deliveries and failures are shown.
    #[serde(default)]
    pub outbox: Option<PathBuf>,
    /// The auditors (see [`auth::UserFile`]); must not be readable by group or others.
    pub users: PathBuf,
    /// A session ends this long after login, whatever happens.
    #[serde(default = "default_session_minutes")]
    pub session_minutes: u64,
    /// ...and this long after its last request.
    #[serde(default = "default_idle_minutes")]
    pub idle_minutes: u64,
    /// How many browsing sessions may be open at once.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// How many connections may be open at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// The approval page (docs/approvals.md): a site's console only.
    #[serde(default)]
    pub approvals: Option<approvals::ApprovalsConfig>,
}

fn default_silent_after_ms() -> i64 {
    180_000
}
fn default_session_minutes() -> u64 {
    480
}
fn default_idle_minutes() -> u64 {
    30
}
fn default_max_sessions() -> usize {
    1000
}
fn default_max_connections() -> usize {
    256
}

impl ConsoleConfig {
    pub fn load(path: &Path) -> Result<ConsoleConfig, ConsoleError> {
        let bad = |detail: String| ConsoleError::Config {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let mut c: ConsoleConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.tls_cert, &mut c.tls_key, &mut c.users] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for p in [
            c.audit_key.as_mut(),
            c.outbox.as_mut(),
            c.db.as_mut(),
            c.socket.as_mut(),
        ]
        .into_iter()
        .flatten()
        .filter(|p| p.is_relative())
        {
            *p = base.join(&*p);
        }
        if let Some(a) = c.approvals.as_mut() {
            if a.approvers.is_relative() {
                a.approvers = base.join(&a.approvers);
            }
            if c.hq_database.is_some() {
                return Err(bad(
                    "[approvals] is a site's: applications wait at the site's daemon".into(),
                ));
            }
            if a.rp_id.is_empty() || a.rp_id.parse::<std::net::IpAddr>().is_ok() {
                return Err(bad(
                    "[approvals] rp_id must be the page's host name (WebAuthn allows no IP address)".into(),
                ));
            }
            if !a.origin.starts_with("https://") || a.origin.ends_with('/') {
                return Err(bad(
                    "[approvals] origin is \"https://HOST[:PORT]\", with no path".into(),
                ));
            }
        }
        match (&c.db, &c.socket, &c.hq_database) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            _ => {
                return Err(bad(
                    "give a site's db and socket, or headquarters' hq_database".into(),
                ))
            }
        }
        if c.site.is_empty() || c.site.len() > 64 {
            return Err(bad("site must be 1-64 characters".into()));
        }
        if c.session_minutes == 0 || c.idle_minutes == 0 {
            return Err(bad(
                "session_minutes and idle_minutes must be at least 1".into()
            ));
        }
        Ok(c)
    }
}
