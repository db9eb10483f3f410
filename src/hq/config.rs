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
fn default_pool() -> usize {
    8
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
                "hq: max_batch_records and idle_timeout_ms must be at least 1, max_frame_bytes at least 1024".into(),
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
            let pem =
                std::fs::read_to_string(&s.audit_key).map_err(|source| ConfigError::Read {
                    path: s.audit_key.clone(),
                    source,
                })?;
            let (_, der) = pem_rfc7468::decode_vec(pem.as_bytes()).map_err(|e| {
                invalid(format!(
                    "site {:?}: {} is not PEM: {e}",
                    s.id,
                    s.audit_key.display()
                ))
            })?;
            let audit_key = TrustedKey::from_spki(der)
                .map_err(|e| invalid(format!("site {:?}: {}: {e}", s.id, s.audit_key.display())))?;
            out.push(Site {
                id: s.id.clone(),
                fingerprint: fp,
                audit_key,
            });
        }
        Ok(out)
    }
}
