//! The daemon's configuration: one TOML file, read once at start-up, checked whole.
//!
//! Owns: parsing (`deny_unknown_fields` everywhere, so a misspelt key is an error, not a silent
//! default), cross-checks between sections (every seal names a known device, every caller names
//! known seals), and reading PINs from files or systemd credentials.
//! Never: logs or formats a PIN; a PIN lives in a [`Pin`], wiped on drop.

use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Everything that can be wrong with a configuration, each naming the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid configuration: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read the PIN for device {device}: {detail}")]
    Pin { device: String, detail: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    #[serde(default, rename = "caller")]
    pub callers: Vec<CallerConfig>,
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    #[serde(default, rename = "seal")]
    pub seals: Vec<SealConfig>,
    /// The trust store: who may approve, with which role, for which department.
    #[serde(default, rename = "approver")]
    pub approvers: Vec<ApproverConfig>,
    /// Optional directory of applicants and their departments: when it has entries, an
    /// approval's applicant must be in it and its `dept` claim must be that applicant's.
    #[serde(default, rename = "applicant")]
    pub applicants: Vec<ApplicantConfig>,
    /// TOTP for applicants, needed when a rule sets `mfa = true`.
    #[serde(default)]
    pub mfa: Option<MfaConfig>,
    /// The audit log's signing key and anomaly rules.
    pub audit: AuditConfig,
    /// Smart-seal terminals, each guarding one physical seal.
    #[serde(default, rename = "terminal")]
    pub terminals: Vec<TerminalConfig>,
    /// The TLS listener of networked terminals; needed only by terminals enrolled by
    /// certificate.
    #[serde(default, rename = "terminals")]
    pub terminal_listener: Option<TerminalListenerConfig>,
    /// The time-stamping authority whose RFC 3161 tokens container stamps carry.
    #[serde(default)]
    pub timestamp: Option<TimestampConfig>,
    /// Configuration fragments signed by headquarters, which this site takes (see
    /// `sealgate::hq::policy`); none are taken when unset.
    #[serde(default)]
    pub hq_policy: Option<HqPolicyConfig>,
    /// Where approvers approve with a passkey; needed when an approver has one.
    #[serde(default)]
    pub webauthn: Option<WebauthnConfig>,
}

/// `[webauthn]`: the approval pages whose passkey assertions this site accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebauthnConfig {
    /// Origins of the approval page, exactly as browsers write them in the client data, e.g.
    /// "https://approvals.example.com" (scheme, host, and a port other than the scheme's own).
    pub origins: Vec<String>,
}

/// One registered passkey of an approver (`[[approver.passkey]]`), as the approval page's
/// registration gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasskeyConfig {
    /// The credential id, base64url.
    pub credential_id: String,
    /// The credential's public key as a COSE_Key (ES256 or EdDSA), base64url.
    pub public_key: String,
    /// The relying party id it was registered for, e.g. "approvals.example.com".
    pub rp_id: String,
    /// The registration's attestation format, kept for the record ("none", "packed", ...).
    #[serde(default)]
    pub attestation: String,
}

/// `[hq_policy]`: whom this site takes configuration fragments from, and what it keeps its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqPolicyConfig {
    /// This site's id at headquarters; a fragment for another site is refused.
    pub site: String,
    /// HQ's policy public key (SPKI PEM, `sealgate-hq policy key`); relative to the
    /// configuration's folder.
    pub key_file: PathBuf,
    /// Sections HQ may not change: "caller", "approver", "applicant", "alerts", "seal" (every
    /// seal) or "seal:ID". A fragment touching one is refused whole.
    #[serde(default)]
    pub pinned: Vec<String>,
}

/// `[timestamp]`: an RFC 3161 time-stamping authority over HTTP(S).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimestampConfig {
    /// Where time-stamp queries are POSTed (application/timestamp-query).
    pub url: String,
    /// How long one exchange may take, in milliseconds (default 5000).
    #[serde(default = "default_tsa_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_tsa_timeout_ms() -> u64 {
    5000
}

/// Whether a seal's container stamps carry a timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampMode {
    /// No timestamp is asked for.
    None,
    /// No stamp without one: a TSA that is down refuses the stamp.
    Required,
    /// A stamp without one when the TSA is down, with a recorded warning.
    BestEffort,
}

/// A smart-seal terminal and the physical seal in it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalConfig {
    /// The id the terminal signs its reports with.
    pub id: String,
    /// A profile of kind "terminal".
    pub profile: String,
    /// The seal id approvals name and callers are given; not also a `[[seal]]`.
    pub seal: String,
    /// Display name of the physical seal.
    #[serde(default)]
    pub name: String,
    /// Enrollment: the terminal's Ed25519 device public key, 32 bytes in hex.
    pub public_key: String,
    /// Reached over this serial port...
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// ...or over TLS, presenting the client certificate with this SHA-256 (hex, of the DER).
    #[serde(default)]
    pub certificate_sha256: Option<String>,
    /// The physical seal's policy, as for a seal.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// As for a seal: the longest approval life and most uses (impressions) accepted.
    #[serde(default)]
    pub max_token_lifetime_seconds: Option<u64>,
    #[serde(default)]
    pub max_uses: Option<u32>,
}

/// Where networked terminals connect, and the certificate the daemon shows them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalListenerConfig {
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1) of the certificate.
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Path of the Unix socket to create (ignored when systemd hands over a socket).
    pub socket: PathBuf,
    /// Group that owns the socket; its members may connect (mode 0660).
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Largest frame accepted, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Connections served at once; further ones are told BUSY and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one uid may hold at once, so that one local user (or one runaway office
    /// app) cannot take every slot. Unset: three quarters of `max_connections`, rounded up.
    #[serde(default)]
    pub max_connections_per_uid: Option<usize>,
    /// Connections held at once by all strangers (uids that are no configured caller)
    /// together, apart from the callers' slots; default a sixteenth of `max_connections`, at
    /// least 1. A stranger is answered one request (Hello) and closed.
    #[serde(default)]
    pub max_stranger_connections: Option<usize>,
    /// Time allowed for a whole request to arrive, and for it to be carried out.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// Directory holding the device profiles; relative paths are taken from the config's folder.
    pub profiles_dir: PathBuf,
    /// Directory of the daemon's durable state (the replay ledger and TOTP state, SQLite).
    pub state_dir: PathBuf,
    /// Running as root is refused unless this is true.
    #[serde(default)]
    pub allow_root: bool,
    /// Serve Prometheus metrics at http://ADDRESS/metrics; a loopback address only. Off when
    /// unset.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl DaemonConfig {
    /// Connections one uid may hold at once.
    pub fn per_uid_connections(&self) -> usize {
        self.max_connections_per_uid
            .unwrap_or(self.max_connections - self.max_connections / 4)
    }

    pub fn stranger_connections(&self) -> usize {
        self.max_stranger_connections
            .unwrap_or((self.max_connections / 16).max(1))
    }
}

fn default_max_frame() -> usize {
    1024 * 1024
}
fn default_max_connections() -> usize {
    64
}
fn default_request_timeout() -> u64 {
    5000
}

/// A named caller, recognised by the uid or gid of the connecting process.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub name: String,
    #[serde(default)]
    pub uids: Vec<u32>,
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Seal ids this caller may list, describe and stamp with.
    #[serde(default)]
    pub seals: Vec<String>,
    /// May enroll applicants for TOTP and reset their lockout.
    #[serde(default)]
    pub admin: bool,
    /// The auditors' console: may record auditors' logins, searches, exports and
    /// acknowledgements in the audit log (and nothing else it could not do anyway).
    #[serde(default)]
    pub oversight: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub id: String,
    /// Name of a profile in `profiles_dir` (file name without `.toml`).
    pub profile: String,
    /// PKCS#11: the module to load instead of the profile's.
    #[serde(default)]
    pub module: Option<PathBuf>,
    /// PKCS#11: the token, by label or by serial number (at least one).
    #[serde(default)]
    pub token_label: Option<String>,
    #[serde(default)]
    pub token_serial: Option<String>,
    /// The user PIN, from a file...
    #[serde(default)]
    pub pin_file: Option<PathBuf>,
    /// ...or from a systemd credential of this name (`$CREDENTIALS_DIRECTORY/NAME`).
    #[serde(default)]
    pub pin_credential: Option<String>,
    /// Sessions opened on the token, i.e. signatures in flight at once.
    #[serde(default)]
    pub sessions: Option<usize>,
    /// PKCS#11: label of an AES key on the token that wraps TOTP secrets (see `[mfa]`).
    #[serde(default)]
    pub wrap_key_label: Option<String>,
    /// PIV: the identity of the one card this device is (the CHUID GUID in hex, or a YubiKey's
    /// serial number, as the profile says).
    #[serde(default)]
    pub card_id: Option<String>,
    /// PIV: a reader name pattern to use instead of the profile's.
    #[serde(default)]
    pub reader: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealConfig {
    pub id: String,
    /// Display name, e.g. "合同专用章".
    #[serde(default)]
    pub name: String,
    pub device: String,
    /// The key, by label or by id (hex); at least one.
    #[serde(default)]
    pub key_label: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    /// ecdsa-p256-sha256 | ed25519 | rsa-pss-sha256 | rsa-pkcs1-sha256
    pub algorithm: String,
    /// The seal's policy, first matching rule wins; no rule, no stamp.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Longest life of an approval, from `min(iat, nbf)` to `exp`, in seconds (default 30
    /// days).
    #[serde(default)]
    pub max_token_lifetime_seconds: Option<u64>,
    /// Most uses one approval may grant (default 100,000).
    #[serde(default)]
    pub max_uses: Option<u32>,
    /// The seal's image (PNG, at most 1 MiB and 2048 pixels a side) that a PDF stamp shows
    /// where the seal is placed (`sealctl pdf prepare`); relative to the configuration's folder.
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// "required" (the default when `[timestamp]` is configured), "best effort" or "none": whether
    /// this seal's container stamps carry a timestamp from the TSA.
    #[serde(default)]
    pub timestamp: Option<String>,
}

impl SealConfig {
    /// This seal's timestamp policy, `tsa` telling whether a TSA is configured.
    pub fn timestamp_mode(&self, tsa: bool) -> TimestampMode {
        match self.timestamp.as_deref() {
            None if tsa => TimestampMode::Required,
            None | Some("none") => TimestampMode::None,
            Some("best effort") => TimestampMode::BestEffort,
            Some(_) => TimestampMode::Required,
        }
    }
}

/// One policy rule of a seal. Empty lists match anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub doc_types: Vec<String>,
    #[serde(default)]
    pub departments: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Inclusive lower bound, minor units; a rule with amount bounds or a currency matches only
    /// approvals that carry an amount.
    #[serde(default)]
    pub amount_min: Option<i64>,
    /// Exclusive upper bound, minor units.
    #[serde(default)]
    pub amount_max: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    /// Roles required, in the order they must approve.
    #[serde(default)]
    pub levels: Vec<String>,
    /// Roles whose approver must belong to the applicant's department.
    #[serde(default)]
    pub dept_scoped: Vec<String>,
    /// Allowed local time of day, "HH:MM-HH:MM".
    #[serde(default)]
    pub hours: Option<String>,
    /// Allowed days: mon, tue, wed, thu, fri, sat, sun.
    #[serde(default)]
    pub weekdays: Option<Vec<String>>,
    /// IANA time zone for `hours` and `weekdays`; UTC when empty.
    #[serde(default)]
    pub timezone: String,
    /// At most this many stamps per applicant on this seal...
    #[serde(default)]
    pub rate_limit_count: Option<u32>,
    /// ...within this many seconds (at most 31 days).
    #[serde(default)]
    pub rate_limit_window_seconds: Option<u64>,
    /// The applicant must give a TOTP code.
    #[serde(default)]
    pub mfa: bool,
    /// Whether a passkey's approval must come with user verification (fingerprint, face,
    /// PIN): "required" at every level, "preferred" at none; unset, at every level above the
    /// first.
    #[serde(default)]
    pub user_verification: Option<String>,
    /// An approval of this rule's document types (and departments and scopes) that carries no
    /// amount is refused, instead of falling through to a rule without amount bounds.
    #[serde(default)]
    pub amount_required: bool,
}

/// Bounds on the approvals a seal accepts, whatever its rules say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimits {
    /// Longest life of an approval, from `min(iat, nbf)` to `exp`, in seconds.
    pub max_lifetime_seconds: i64,
    /// Most uses one approval may grant.
    pub max_uses: u32,
}

impl TokenLimits {
    pub const DEFAULT_LIFETIME_SECONDS: u64 = 30 * 24 * 3600;
    pub const DEFAULT_USES: u32 = 100_000;

    pub fn of(lifetime: Option<u64>, uses: Option<u32>) -> TokenLimits {
        TokenLimits {
            max_lifetime_seconds: lifetime
                .unwrap_or(Self::DEFAULT_LIFETIME_SECONDS)
                .min(i64::MAX as u64) as i64,
            max_uses: uses.unwrap_or(Self::DEFAULT_USES),
        }
    }
}

impl Default for TokenLimits {
    fn default() -> Self {
        TokenLimits::of(None, None)
    }
}

/// An approver in the trust store.
/// One applicant of the directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicantConfig {
    pub id: String,
    pub department: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverConfig {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// The approval level this person holds, e.g. "dept_head".
    pub role: String,
    #[serde(default)]
    pub department: String,
    /// Ed25519 or P-256 public key, SPKI PEM, inline...
    #[serde(default)]
    pub public_key: Option<String>,
    /// ...or in a file (relative to the configuration's folder).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Passkeys (WebAuthn credentials) this approver approves with, beside or instead of a
    /// key.
    #[serde(default, rename = "passkey")]
    pub passkeys: Vec<PasskeyConfig>,
    /// RFC 3339 times bounding when this approver's approvals count.
    #[serde(default)]
    pub valid_from: Option<String>,
    #[serde(default)]
    pub valid_until: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

/// TOTP (RFC 6238) for applicants.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfaConfig {
    /// The device holding the key that wraps TOTP secrets (its `wrap_key_label`).
    pub device: String,
    /// Wrong codes in a row before the applicant is locked out.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// Issuer shown by authenticator apps.
    #[serde(default = "default_issuer")]
    pub issuer: String,
}

/// The audit log: the device key that signs its checkpoints, and the anomaly rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The device holding the audit key.
    pub device: String,
    /// The audit key: a non-extractable signing key used for nothing else.
    #[serde(default)]
    pub key_label: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    /// ecdsa-p256-sha256 or ed25519.
    #[serde(default = "default_audit_algorithm")]
    pub algorithm: String,
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// An idle log gets an `audit.heartbeat` record (and so a fresh checkpoint) when its
    /// newest checkpoint is this old, so that headquarters can tell a quiet site from one cut
    /// off. 0 switches it off.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
}

fn default_heartbeat() -> u64 {
    60
}

fn default_audit_algorithm() -> String {
    "ecdsa-p256-sha256".into()
}

/// Thresholds of the anomaly rules; a count of 0 or `false` switches a rule off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Stamps outside these hours ("HH:MM-HH:MM") or days raise `off_hours`; off when unset.
    pub working_hours: Option<String>,
    pub working_days: Option<Vec<String>>,
    /// IANA time zone of the working hours; UTC when empty.
    pub timezone: String,
    /// More than this many stamps by one applicant within the window raise `burst`.
    pub burst_count: u32,
    pub burst_window_seconds: u64,
    /// More than this many refusals of one caller within the window raise `denial_spike`.
    pub denial_spike_count: u32,
    pub denial_spike_window_seconds: u64,
    /// The same document stamped with a seal again under another approval raises `restamp`.
    pub restamp: bool,
    /// A device becoming unavailable raises `device_removed`.
    pub device_removed: bool,
    /// A device reporting few PIN tries left raises `pin_low`.
    pub pin_low: bool,
    /// Terminal anomalies (impression without grant, counter gap or rollback, replayed or
    /// unverified report, tamper, lost heartbeat) raise `terminal_*` alerts.
    pub terminals: bool,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            working_hours: None,
            working_days: None,
            timezone: String::new(),
            burst_count: 30,
            burst_window_seconds: 60,
            denial_spike_count: 10,
            denial_spike_window_seconds: 60,
            restamp: true,
            device_removed: true,
            pin_low: true,
            terminals: true,
        }
    }
}

fn default_max_failures() -> u32 {
    5
}
fn default_issuer() -> String {
    "sealgate".into()
}

impl Config {
    /// Reads and checks a configuration file. Relative paths inside it are resolved against the
    /// file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks the text of the configuration file at `path` (which is not read).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned() + &location(text, e.span()),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.check()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.daemon.socket);
        fix(&mut self.daemon.profiles_dir);
        fix(&mut self.daemon.state_dir);
        for d in &mut self.devices {
            if let Some(p) = d.pin_file.as_mut() {
                fix(p);
            }
        }
        for s in &mut self.seals {
            if let Some(p) = s.image.as_mut() {
                fix(p);
            }
        }
        if let Some(l) = self.terminal_listener.as_mut() {
            fix(&mut l.certificate);
            fix(&mut l.key);
        }
        if let Some(h) = self.hq_policy.as_mut() {
            fix(&mut h.key_file);
        }
    }

    /// The cross-checks between sections; run again on a configuration a fragment changed.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.daemon.max_frame_bytes < 64 || self.daemon.max_frame_bytes > 64 * 1024 * 1024 {
            return invalid("daemon.max_frame_bytes must be between 64 and 67108864".into());
        }
        if let Some(h) = &self.hq_policy {
            if h.site.is_empty() {
                return invalid("hq_policy.site must not be empty".into());
            }
            for p in &h.pinned {
                let known = matches!(
                    p.as_str(),
                    "caller" | "approver" | "applicant" | "alerts" | "seal"
                ) || p.strip_prefix("seal:").is_some_and(|id| !id.is_empty());
                if !known {
                    return invalid(format!(
                        "hq_policy.pinned: {p:?} is none of caller, approver, applicant, alerts, seal, seal:ID"
                    ));
                }
            }
        }
        if self.daemon.max_connections == 0 {
            return invalid("daemon.max_connections must be at least 1".into());
        }
        if let Some(n) = self.daemon.max_connections_per_uid {
            if n == 0 || n > self.daemon.max_connections {
                return invalid(format!(
                    "daemon.max_connections_per_uid must be between 1 and max_connections ({})",
                    self.daemon.max_connections
                ));
            }
        }
        if let Some(n) = self.daemon.max_stranger_connections {
            if n == 0 || n > self.daemon.max_connections {
                return invalid(format!(
                    "daemon.max_stranger_connections must be between 1 and max_connections ({})",
                    self.daemon.max_connections
                ));
            }
        }
        if let Some(t) = &self.timestamp {
            if !(t.url.starts_with("http://") || t.url.starts_with("https://")) {
                return invalid(format!(
                    "timestamp.url {:?} must be an http:// or https:// URL",
                    t.url
                ));
            }
            if t.timeout_ms == 0 || t.timeout_ms > 120_000 {
                return invalid("timestamp.timeout_ms must be between 1 and 120000".into());
            }
        }
        for s in &self.seals {
            match s.timestamp.as_deref() {
                None | Some("none") => {}
                Some("required" | "best effort") if self.timestamp.is_some() => {}
                Some("required" | "best effort") => {
                    return invalid(format!(
                        "seal {:?} asks for timestamps but no [timestamp] authority is configured",
                        s.id
                    ))
                }
                Some(other) => {
                    return invalid(format!(
                        "seal {:?}: timestamp {other:?} is not \"required\", \"best effort\" or \"none\"",
                        s.id
                    ))
                }
            }
        }
        if self.daemon.request_timeout_ms == 0 {
            return invalid("daemon.request_timeout_ms must be at least 1".into());
        }
        if let Some(a) = self.daemon.metrics_listen {
            if !a.ip().is_loopback() {
                return invalid(format!(
                    "daemon.metrics_listen {a} is not a loopback address; metrics are served on loopback only"
                ));
            }
        }
        let mut devices = HashSet::new();
        for d in &self.devices {
            if !devices.insert(d.id.as_str()) {
                return invalid(format!("device {:?} is defined twice", d.id));
            }
            if d.pin_file.is_some() == d.pin_credential.is_some() {
                return invalid(format!(
                    "device {:?} needs exactly one of pin_file and pin_credential",
                    d.id
                ));
            }
            if d.sessions == Some(0) {
                return invalid(format!("device {:?}: sessions must be at least 1", d.id));
            }
        }
        let mut seals = HashSet::new();
        for s in &self.seals {
            if !seals.insert(s.id.as_str()) {
                return invalid(format!("seal {:?} is defined twice", s.id));
            }
            if !devices.contains(s.device.as_str()) {
                return invalid(format!(
                    "seal {:?} names device {:?}, which is not configured",
                    s.id, s.device
                ));
            }
            if s.key_label.is_none() && s.key_id.is_none() {
                return invalid(format!("seal {:?} needs key_label or key_id", s.id));
            }
            if let Some(id) = &s.key_id {
                if hex::decode(id).is_err() {
                    return invalid(format!("seal {:?}: key_id {:?} is not hex", s.id, id));
                }
            }
        }
        let mut terminals = HashSet::new();
        for t in &self.terminals {
            if !terminals.insert(t.id.as_str()) {
                return invalid(format!("terminal {:?} is defined twice", t.id));
            }
            if !seals.insert(t.seal.as_str()) {
                return invalid(format!(
                    "terminal {:?}: seal {:?} is already a seal of another device or terminal",
                    t.id, t.seal
                ));
            }
            if hex::decode(&t.public_key).map(|k| k.len()) != Ok(32) {
                return invalid(format!(
                    "terminal {:?}: public_key must be 32 bytes (Ed25519) in hex",
                    t.id
                ));
            }
            match (&t.serial, &t.certificate_sha256) {
                (Some(_), None) => {}
                (None, Some(fp)) => {
                    if hex::decode(fp).map(|k| k.len()) != Ok(32) {
                        return invalid(format!(
                            "terminal {:?}: certificate_sha256 must be 32 bytes in hex",
                            t.id
                        ));
                    }
                    if self.terminal_listener.is_none() {
                        return invalid(format!(
                            "terminal {:?} connects over TLS but there is no [terminals] listener",
                            t.id
                        ));
                    }
                }
                _ => {
                    return invalid(format!(
                        "terminal {:?} needs exactly one of serial and certificate_sha256",
                        t.id
                    ))
                }
            }
        }
        let wants_mfa = self
            .seals
            .iter()
            .flat_map(|s| &s.rules)
            .chain(self.terminals.iter().flat_map(|t| &t.rules))
            .any(|r| r.mfa);
        match &self.mfa {
            None if wants_mfa => {
                return invalid("a rule asks for mfa but there is no [mfa] section".into())
            }
            Some(m) => {
                let Some(d) = self.devices.iter().find(|d| d.id == m.device) else {
                    return invalid(format!("mfa.device {:?} is not configured", m.device));
                };
                if d.wrap_key_label.is_none() {
                    return invalid(format!("mfa.device {:?} has no wrap_key_label", m.device));
                }
                if m.max_failures == 0 {
                    return invalid("mfa.max_failures must be at least 1".into());
                }
            }
            None => {}
        }
        let policies = self
            .seals
            .iter()
            .map(|s| (&s.id, &s.rules))
            .chain(self.terminals.iter().map(|t| (&t.seal, &t.rules)));
        for (id, rules) in policies {
            for r in rules {
                if r.rate_limit_window_seconds.is_some_and(|w| w > 31 * 86400) {
                    return invalid(format!(
                        "seal {id:?}: rate_limit_window_seconds is at most 31 days"
                    ));
                }
            }
        }
        let a = &self.audit;
        if !devices.contains(a.device.as_str()) {
            return invalid(format!("audit.device {:?} is not configured", a.device));
        }
        if a.key_label.is_none() && a.key_id.is_none() {
            return invalid("audit needs key_label or key_id".into());
        }
        if let Some(id) = &a.key_id {
            if hex::decode(id).is_err() {
                return invalid(format!("audit.key_id {id:?} is not hex"));
            }
        }
        if !["ecdsa-p256-sha256", "ed25519"].contains(&a.algorithm.as_str()) {
            return invalid(format!(
                "audit.algorithm {:?}: the audit key is ecdsa-p256-sha256 or ed25519",
                a.algorithm
            ));
        }
        for (count, window, name) in [
            (a.alerts.burst_count, a.alerts.burst_window_seconds, "burst"),
            (
                a.alerts.denial_spike_count,
                a.alerts.denial_spike_window_seconds,
                "denial_spike",
            ),
        ] {
            if count > 0 && (window == 0 || window > 31 * 86400) {
                return invalid(format!(
                    "audit.alerts.{name}_window_seconds must be between 1 and 31 days"
                ));
            }
        }
        let mut callers = HashSet::new();
        for c in &self.callers {
            if !callers.insert(c.name.as_str()) {
                return invalid(format!("caller {:?} is defined twice", c.name));
            }
            if c.uids.is_empty() && c.gids.is_empty() {
                return invalid(format!("caller {:?} names no uid and no gid", c.name));
            }
            for s in &c.seals {
                if !seals.contains(s.as_str()) {
                    return invalid(format!(
                        "caller {:?} names seal {:?}, which is not configured",
                        c.name, s
                    ));
                }
            }
        }
        Ok(())
    }

    /// Seals grouped by the device that holds them, in configuration order.
    pub fn seals_by_device(&self) -> BTreeMap<&str, Vec<&SealConfig>> {
        let mut map: BTreeMap<&str, Vec<&SealConfig>> = BTreeMap::new();
        for s in &self.seals {
            map.entry(s.device.as_str()).or_default().push(s);
        }
        map
    }
}

/// What others may do to a file: the mode bits a file must not have.
#[derive(Debug, Clone, Copy)]
enum Guard {
    /// Nobody but the owner (and root) may change it: no group or other write.
    NoForeignWrite,
    /// A secret: also not readable by others (its group may read, e.g. mode 0640).
    Secret,
}

/// Whether `uid` may own what the daemon trusts: root, or the user the daemon runs as.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn check_mode(path: &Path, what: &str, guard: Guard) -> Result<(), ConfigError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // A file that is not there is reported by whoever reads it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ConfigError::Read {
                path: path.to_owned(),
                source: e,
            })
        }
    };
    if !trusted_owner(meta.uid()) {
        return Err(ConfigError::Invalid(format!(
            "{what} {} is owned by uid {}, neither root nor the daemon's user (uid {}): its owner could change it; refused",
            path.display(),
            meta.uid(),
            nix::unistd::geteuid()
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    let forbidden = match guard {
        Guard::NoForeignWrite => 0o022,
        Guard::Secret => 0o026,
    };
    if mode & forbidden != 0 {
        let who = if mode & 0o002 != 0 {
            "anyone"
        } else if mode & 0o020 != 0 {
            "its group"
        } else {
            "other users"
        };
        let verb = if mode & 0o022 != 0 { "changed" } else { "read" };
        return Err(ConfigError::Invalid(format!(
            "{what} {} has mode {mode:04o}: it can be {verb} by {who}; refused (chmod {})",
            path.display(),
            match guard {
                Guard::NoForeignWrite => "go-w",
                Guard::Secret => "g-w,o-rwx",
            }
        )));
    }
    Ok(())
}

/// The folder holding `path`: whoever may write in it may put another file in its place,
/// unless the folder is sticky (like /tmp), where only a file's owner may rename or remove it.
fn check_folder_of(path: &Path, what: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let Some(folder) = abs.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(folder) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o1000 != 0 && trusted_owner(meta.uid()) {
        return Ok(());
    }
    check_mode(
        folder,
        &format!("the folder of {what}"),
        Guard::NoForeignWrite,
    )
}

/// A file and the folder that holds it.
fn check_trusted(path: &Path, what: &str, guard: Guard) -> Result<(), ConfigError> {
    check_mode(path, what, guard)?;
    check_folder_of(path, what)
}

impl Config {
    /// Refuses what others could change or read among the files and folders the daemon trusts:
    /// the configuration, approvers' public keys, device profiles and their folder, PKCS#11
    /// modules, the state directory and the socket's folder (by owner and mode), and PIN files
    /// and the terminal listener's key (also not readable by others). Someone who can rewrite
    /// any of them can add approvers, load code next to the PIN, or take the socket's place.
    /// Run at start-up and at every reload. `modules_of` names the PKCS#11 modules a device
    /// profile (by name) may load (the device layer reads profiles; this one does not).
    pub fn check_file_modes(
        &self,
        config_path: &Path,
        modules_of: impl Fn(&str) -> Vec<PathBuf>,
    ) -> Result<(), ConfigError> {
        // Paths are checked as they are used: `load` made the daemon's own ones absolute, a
        // module is opened as written, and approvers' keys are taken from the file's folder.
        let base = config_path.parent().unwrap_or(Path::new(""));
        check_trusted(config_path, "the configuration", Guard::NoForeignWrite)?;
        check_trusted(
            &self.daemon.state_dir,
            "the state directory",
            Guard::NoForeignWrite,
        )?;
        check_folder_of(&self.daemon.socket, "the socket")?;
        check_mode(
            &self.daemon.profiles_dir,
            "the device profiles' folder",
            Guard::NoForeignWrite,
        )?;
        let profiles = self
            .devices
            .iter()
            .map(|d| &d.profile)
            .chain(self.terminals.iter().map(|t| &t.profile));
        for name in profiles {
            let path = self.daemon.profiles_dir.join(format!("{name}.toml"));
            check_mode(&path, "the device profile", Guard::NoForeignWrite)?;
            for m in modules_of(name) {
                check_trusted(&m, "the PKCS#11 module", Guard::NoForeignWrite)?;
            }
        }
        for s in &self.seals {
            if let Some(p) = &s.image {
                check_trusted(
                    p,
                    &format!("the image of seal {:?}", s.id),
                    Guard::NoForeignWrite,
                )?;
            }
        }
        for d in &self.devices {
            if let Some(m) = &d.module {
                check_trusted(m, "the PKCS#11 module", Guard::NoForeignWrite)?;
            }
            if let Some(p) = &d.pin_file {
                check_trusted(
                    p,
                    &format!("the PIN file of device {:?}", d.id),
                    Guard::Secret,
                )?;
            }
        }
        for a in &self.approvers {
            if let Some(f) = &a.public_key_file {
                check_trusted(
                    &base.join(f),
                    &format!("the public key of approver {:?}", a.id),
                    Guard::NoForeignWrite,
                )?;
            }
        }
        if let Some(h) = &self.hq_policy {
            check_trusted(&h.key_file, "HQ's policy key", Guard::NoForeignWrite)?;
        }
        if let Some(l) = &self.terminal_listener {
            check_trusted(&l.key, "the terminal listener's key", Guard::Secret)?;
            check_trusted(
                &l.certificate,
                "the terminal listener's certificate",
                Guard::NoForeignWrite,
            )?;
        }
        Ok(())
    }
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// A PIN, wiped from memory when dropped; its `Debug` shows nothing of it.
pub struct Pin(Zeroizing<String>);

impl Pin {
    pub fn new(value: String) -> Pin {
        Pin(Zeroizing::new(value))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

impl DeviceConfig {
    /// Reads this device's user PIN from its file or systemd credential. A trailing newline is
    /// not part of the PIN.
    pub fn read_pin(&self) -> Result<Pin, ConfigError> {
        let path = match (&self.pin_file, &self.pin_credential) {
            (Some(p), _) => p.clone(),
            (None, Some(name)) => {
                let dir =
                    std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| ConfigError::Pin {
                        device: self.id.clone(),
                        detail: format!(
                            "pin_credential {name:?} is set but $CREDENTIALS_DIRECTORY is not"
                        ),
                    })?;
                if name.contains('/') {
                    return Err(ConfigError::Pin {
                        device: self.id.clone(),
                        detail: format!("credential name {name:?} contains '/'"),
                    });
                }
                PathBuf::from(dir).join(name)
            }
            (None, None) => unreachable!("checked when the configuration was loaded"),
        };
        let bytes = Zeroizing::new(std::fs::read(&path).map_err(|e| ConfigError::Pin {
            device: self.id.clone(),
            detail: format!("{}: {e}", path.display()),
        })?);
        let text = std::str::from_utf8(&bytes).map_err(|_| ConfigError::Pin {
            device: self.id.clone(),
            detail: format!("{} is not UTF-8", path.display()),
        })?;
        let pin = text.trim_end_matches(['\n', '\r']);
        if pin.is_empty() {
            return Err(ConfigError::Pin {
                device: self.id.clone(),
                detail: format!("{} is empty", path.display()),
            });
        }
        Ok(Pin::new(pin.to_owned()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    pub(crate) const GOOD: &str = r#"
[daemon]
socket = "s.sock"
profiles_dir = "profiles"
state_dir = "state"

[[caller]]
name = "oa"
uids = [1000]
seals = ["contract"]

[[device]]
id = "hsm"
profile = "softhsm2"
token_label = "t"
pin_file = "pin"

[[seal]]
id = "contract"
device = "hsm"
key_label = "k"
algorithm = "ecdsa-p256-sha256"

[audit]
device = "hsm"
key_label = "audit"
"#;

    #[test]
    fn good_config_loads_with_paths_resolved() {
        let c = parse(GOOD).unwrap();
        assert!(c.daemon.socket.is_absolute());
        assert_eq!(c.daemon.max_frame_bytes, 1024 * 1024);
        assert_eq!(c.seals_by_device()["hsm"].len(), 1);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let text = GOOD.replace("profiles_dir", "profile_dir");
        let err = parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("profile_dir") && err.contains("line 4"),
            "{err}"
        );
    }

    #[test]
    fn caller_naming_unknown_seal_is_refused() {
        let text = GOOD.replace("seals = [\"contract\"]", "seals = [\"nope\"]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("\"nope\""), "{err}");
    }

    #[test]
    fn seal_on_unknown_device_is_refused() {
        let text = GOOD.replacen("device = \"hsm\"", "device = \"other\"", 1);
        assert!(parse(&text).unwrap_err().to_string().contains("\"other\""));
    }

    #[test]
    fn one_uid_gets_three_quarters_of_the_slots_unless_told() {
        let with = |lines: &str| {
            GOOD.replace(
                "state_dir = \"state\"",
                &format!("state_dir = \"state\"\n{lines}"),
            )
        };
        let share = |lines: &str| parse(&with(lines)).unwrap().daemon.per_uid_connections();
        assert_eq!(share(""), 48);
        assert_eq!(share("max_connections = 2"), 2);
        assert_eq!(share("max_connections = 1"), 1);
        assert_eq!(share("max_connections = 10"), 8);
        assert_eq!(share("max_connections_per_uid = 5"), 5);
        for bad in [
            "max_connections_per_uid = 0",
            "max_connections_per_uid = 65",
        ] {
            let err = parse(&with(bad)).unwrap_err().to_string();
            assert!(err.contains("max_connections_per_uid"), "{err}");
        }
    }

    #[test]
    fn metrics_are_served_on_loopback_only() {
        let with = |addr: &str| {
            GOOD.replace(
                "state_dir = \"state\"",
                &format!("state_dir = \"state\"\nmetrics_listen = \"{addr}\""),
            )
        };
        assert!(parse(&with("127.0.0.1:9464")).is_ok());
        assert!(parse(&with("[::1]:9464")).is_ok());
        let err = parse(&with("0.0.0.0:9464")).unwrap_err().to_string();
        assert!(err.contains("loopback"), "{err}");
    }

    #[test]
    fn the_audit_key_must_be_named_and_able_to_sign_checkpoints() {
        let err = |text: String| parse(&text).unwrap_err().to_string();
        let no_audit = GOOD.split("[audit]").next().unwrap().to_string();
        assert!(err(no_audit).contains("audit"));
        assert!(err(GOOD.replace("key_label = \"audit\"", "")).contains("key_label or key_id"));
        assert!(err(GOOD.replace(
            "key_label = \"audit\"",
            "key_label = \"audit\"\nalgorithm = \"rsa-pss-sha256\""
        ))
        .contains("audit.algorithm"));
        assert!(
            err(GOOD.to_string() + "[audit.alerts]\nburst_window_seconds = 0\n")
                .contains("burst_window_seconds")
        );
        let c = parse(GOOD).unwrap();
        assert_eq!(c.audit.alerts.burst_count, 30);
        assert!(c.audit.alerts.working_hours.is_none());
    }

    #[test]
    fn pin_debug_is_redacted_and_newline_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pin"), "123456\n").unwrap();
        let text = GOOD.to_string();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let c = Config::load(&path).unwrap();
        let pin = c.devices[0].read_pin().unwrap();
        assert_eq!(pin.expose(), "123456");
        assert!(!format!("{pin:?}").contains("123456"));
    }
}
