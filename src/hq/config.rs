//! `sealgate-hq`'s configuration: one TOML file, read at start-up, checked whole.
//!
//! Owns: the listener, the database connection, and the enrolled sites (each with its pinned
//! client certificate and audit public key).
//! Never: accepts a site without both, or two sites with one certificate.

use crate::audit::verify::TrustedKey;
use crate::config::ConfigError;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqConfig {
    pub hq: Listener,
    pub database: DatabaseConfig,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteConfig>,
    /// HQ's witness key, which cosigns every site checkpoint HQ verified.
    #[serde(default)]
    pub witness: Option<KeyConfig>,
    /// HQ's policy key, which signs the configuration fragments HQ publishes for sites
    /// (`sealgate-hq policy publish`); a key of its own, not the witness key.
    #[serde(default)]
    pub policy: Option<KeyConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Where the device's profile is (the daemon's `device-profiles/`).
    pub profiles_dir: PathBuf,
    /// The key on the device, by label.
    pub key_label: String,
    /// ecdsa-p256-sha256 or ed25519.
    #[serde(default = "default_key_algorithm")]
    pub algorithm: String,
    /// The device, as a `[[device]]` of the daemon's configuration (a PKCS#11 token).
    pub device: crate::config::DeviceConfig,
}

fn default_key_algorithm() -> String {
    "ecdsa-p256-sha256".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// host:port of the TLS listener for shippers.
    pub listen: String,
    /// HQ's certificate chain and key (PEM), as the sites' shippers are told to trust.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Largest batch a site may send, in records.
    #[serde(default = "default_max_batch")]
    pub max_batch_records: usize,
    /// Largest frame, in bytes.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// A connection with no message for this long is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// A site whose head has not moved for this long raises `silence`: it is cut off, or its
    /// shipper or daemon stopped (an idle site still sends a heartbeat a minute).
    #[serde(default = "default_silence")]
    pub silence_after_ms: u64,
    /// Where to answer `GET /metrics` (Prometheus text); off when unset. Each site's id and
    /// counts are in it: bind it where only your Prometheus reaches.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A libpq-style connection string ("host=... port=... user=... dbname=...").
    pub url: String,
    /// CA certificates (PEM) of the database server. With it the connection is TLS and the
    /// server must prove its name; without it only a Unix socket or a loopback address is
    /// accepted.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Connections in HQ's pool.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub id: String,
    /// SHA-256 (hex) of the DER of the site shipper's client certificate.
    pub certificate_sha256: String,
    /// The site's audit public key (SPKI PEM), as `sealctl audit export --bundle` writes it.
    pub audit_key: PathBuf,
}

fn default_max_batch() -> usize {
    5000
}
fn default_max_frame() -> usize {
    super::DEFAULT_MAX_FRAME
}
fn default_idle() -> u64 {
    120_000
}
fn default_silence() -> u64 {
    300_000
}
fn default_pool() -> usize {
    8
}

impl KeyConfig {
    /// Opens the key's device; `section` ("witness", "policy") names it in errors.
    pub fn open(&self, section: &str) -> Result<super::cosign::HqKey, String> {
        use crate::device::profile::{DeviceKind, DeviceProfile};
        use crate::device::{Algorithm, KeySpec};
        let algorithm = Algorithm::parse(&self.algorithm)?;
        if !matches!(algorithm, Algorithm::EcdsaP256Sha256 | Algorithm::Ed25519) {
            return Err(format!(
                "{section}.algorithm: {} is not one HQ's keys may have (ecdsa-p256-sha256, ed25519)",
                self.algorithm
            ));
        }
        let profile = DeviceProfile::load(&self.profiles_dir, &self.device.profile)
            .map_err(|e| format!("{section} device: {e}"))?;
        if profile.kind != DeviceKind::Pkcs11 {
            return Err(format!("the {section} device must be a PKCS#11 token"));
        }
        let spec = KeySpec {
            label: Some(self.key_label.clone()),
            id: None,
            algorithm,
        };
        let device =
            open_pkcs11(&self.device, profile, spec).map_err(|e| format!("{section} {e}"))?;
        super::cosign::HqKey::new(device)
    }
}

#[cfg(feature = "pkcs11")]
fn open_pkcs11(
    config: &crate::config::DeviceConfig,
    profile: crate::device::profile::DeviceProfile,
    spec: crate::device::KeySpec,
) -> Result<std::sync::Arc<dyn crate::device::SealDevice>, String> {
    crate::device::pkcs11::Pkcs11Device::open(config, profile, vec![spec])
        .map(|d| std::sync::Arc::new(d) as std::sync::Arc<dyn crate::device::SealDevice>)
        .map_err(|e| format!("device: {e}"))
}

#[cfg(not(feature = "pkcs11"))]
fn open_pkcs11(
    _config: &crate::config::DeviceConfig,
    _profile: crate::device::profile::DeviceProfile,
    _spec: crate::device::KeySpec,
) -> Result<std::sync::Arc<dyn crate::device::SealDevice>, String> {
    Err("device: this build has no PKCS#11 support (feature pkcs11)".into())
}

/// An enrolled site, as the listener and the database layer use it.
pub struct Site {
    pub id: String,
    pub fingerprint: [u8; 32],
    pub audit_key: TrustedKey,
}

impl HqConfig {
    pub fn load(path: &Path) -> Result<HqConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let c: HqConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if c.hq.max_batch_records == 0 || c.hq.max_frame_bytes < 1024 || c.hq.idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "hq: max_batch_records and idle_timeout_ms must be at least 1, max_frame_bytes at least 1024, silence_after_ms at least 1000".into(),
            ));
        }
        if c.database.pool_size == 0 {
            return Err(ConfigError::Invalid(
                "database.pool_size must be at least 1".into(),
            ));
        }
        Ok(c)
    }

    /// The enrolled sites with their keys read, checked for duplicates.
    pub fn sites(&self) -> Result<Vec<Site>, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        let mut ids = HashSet::new();
        let mut fps = HashSet::new();
        let mut out = Vec::new();
        for s in &self.sites {
            if s.id.is_empty() || s.id.len() > 64 || !ids.insert(s.id.clone()) {
                return Err(invalid(format!(
                    "site {:?}: ids are 1 to 64 characters and unique",
                    s.id
                )));
            }
            let fp: [u8; 32] = hex::decode(&s.certificate_sha256)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "site {:?}: certificate_sha256 must be 32 bytes in hex",
                        s.id
                    ))
                })?;
            if !fps.insert(fp) {
                return Err(invalid(format!(
                    "site {:?}: its certificate is another site's too",
                    s.id
                )));
            }
            let audit_key = TrustedKey::from_pem_file(&s.audit_key)
                .map_err(|e| invalid(format!("site {:?}: {e}", s.id)))?;
            out.push(Site {
                id: s.id.clone(),
                fingerprint: fp,
                audit_key,
            });
        }
        Ok(out)
    }
}
