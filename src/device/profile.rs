//! Device profiles: one TOML file per device model in `device-profiles/`, saying how to reach
//! that model and what it can do. A device entry in the configuration names its profile.
//!
//! Owns: loading and checking profiles. Never: holds secrets (PINs belong to the configuration).

use super::{Algorithm, DeviceError};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// Human name of the model.
    pub model: String,
    pub kind: DeviceKind,
    #[serde(default)]
    pub description: String,
    /// Algorithms this model can sign with, by their wire names.
    pub algorithms: Vec<String>,
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Profile>,
    #[serde(default)]
    pub piv: Option<PivProfile>,
    #[serde(default)]
    pub terminal: Option<TerminalProfile>,
    /// File name without `.toml`; filled in on load.
    #[serde(skip)]
    pub name: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Pkcs11,
    /// A PIV smart card or USB token reached through PC/SC.
    Piv,
    /// A smart-seal terminal (a stamping machine) speaking terminal protocol v1; configured
    /// under `[[terminal]]`, not `[[device]]`.
    Terminal,
}

/// How a terminal model is reached and how it behaves on the line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalProfile {
    /// Protocol variant; only "sealgate-terminal-v1" exists.
    pub protocol: String,
    /// Serial line settings (ignored over TLS).
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    /// "none", "even" or "odd".
    #[serde(default = "default_parity")]
    pub parity: String,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Longest wait for the rest of a frame once its first byte came.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout_ms: u64,
    /// Wait for an ACK before sending a frame again...
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    /// ...this many times, after which the link is taken as broken.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The terminal sends HEARTBEAT this often...
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_ms: u64,
    /// ...and is taken as lost after this long without any frame.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_ms: u64,
    /// Least time between attempts to reopen a vanished serial port.
    #[serde(default = "default_retry_ms")]
    pub reconnect_interval_ms: u64,
    /// Time limit of a grant.
    #[serde(default = "default_grant_seconds")]
    pub grant_seconds: u32,
    /// Most impressions one grant may allow.
    #[serde(default = "default_max_impressions")]
    pub max_impressions: u32,
}

fn default_baud() -> u32 {
    115_200
}
fn default_parity() -> String {
    "none".into()
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_frame_timeout() -> u64 {
    500
}
fn default_ack_timeout() -> u64 {
    400
}
fn default_retries() -> u32 {
    3
}
fn default_heartbeat_interval() -> u64 {
    5000
}
fn default_heartbeat_timeout() -> u64 {
    15000
}
fn default_grant_seconds() -> u32 {
    300
}
fn default_max_impressions() -> u32 {
    20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Profile {
    /// Candidate module paths, first existing one wins (paths differ between distributions).
    pub modules: Vec<PathBuf>,
    /// Sessions to open by default (signatures in flight at once).
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

fn default_sessions() -> usize {
    2
}

/// How a card model is found and used through PC/SC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PivProfile {
    /// Reader names this model shows up under, as glob patterns ("Yubico YubiKey*").
    pub readers: Vec<String>,
    /// How the card tells who it is; a device entry binds its seals to one card by this value.
    pub identity: CardIdentity,
    /// Key slots (hex key references) a seal of this model may use; a seal names its slot as its
    /// `key_id`.
    pub slots: Vec<String>,
    /// Which PIN the daemon verifies: the application PIN ("80") or the global PIN ("00").
    #[serde(default = "default_pin_reference")]
    pub pin_reference: String,
    /// PIN tries the daemon never spends on its own: with this many or fewer left it does not
    /// verify, so a wrong configured PIN cannot block the card.
    #[serde(default = "default_keep_pin_tries")]
    pub keep_pin_tries: u8,
    /// Least time between two attempts to reach a missing card.
    #[serde(default = "default_retry_ms")]
    pub retry_interval_ms: u64,
}

/// Where a card's identity comes from.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CardIdentity {
    /// The GUID in the Card Holder Unique Identifier (SP 800-73-4), as 32 hex digits.
    ChuidGuid,
    /// A YubiKey's serial number (its GET SERIAL command), in decimal.
    YubikeySerial,
}

fn default_pin_reference() -> String {
    "80".into()
}

fn default_keep_pin_tries() -> u8 {
    1
}

fn default_retry_ms() -> u64 {
    500
}

impl DeviceProfile {
    /// The PKCS#11 modules profile `name` in `dir` may load (none when it does not read), for
    /// the start-up check of who may change them.
    pub fn modules_of(dir: &Path, name: &str) -> Vec<PathBuf> {
        DeviceProfile::load(dir, name)
            .map(|p| p.pkcs11.into_iter().flat_map(|k| k.modules).collect())
            .unwrap_or_default()
    }

    /// Loads `DIR/NAME.toml`.
    pub fn load(dir: &Path, name: &str) -> Result<DeviceProfile, DeviceError> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(DeviceError::Setup(format!(
                "device profile name {name:?} is not a plain name"
            )));
        }
        let path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            DeviceError::Setup(format!(
                "cannot read device profile {}: {e}",
                path.display()
            ))
        })?;
        DeviceProfile::parse(&text, name, &path)
    }

    /// Parses and checks the text of profile `name`, read from `path` (named in errors only).
    pub fn parse(text: &str, name: &str, path: &Path) -> Result<DeviceProfile, DeviceError> {
        let mut profile: DeviceProfile = toml::from_str(text).map_err(|e| {
            DeviceError::Setup(format!(
                "device profile {} is not valid: {}",
                path.display(),
                e.message()
            ))
        })?;
        profile.name = name.to_owned();
        for a in &profile.algorithms {
            Algorithm::parse(a).map_err(|e| {
                DeviceError::Setup(format!("device profile {}: {e}", path.display()))
            })?;
        }
        let bad = |m: &str| {
            Err(DeviceError::Setup(format!(
                "device profile {}: {m}",
                path.display()
            )))
        };
        if profile.kind != DeviceKind::Terminal && profile.terminal.is_some() {
            return bad("a [terminal] table belongs in a terminal profile only");
        }
        match (profile.kind, &profile.pkcs11, &profile.piv) {
            (DeviceKind::Pkcs11, Some(p), None) if !p.modules.is_empty() && p.sessions > 0 => {}
            (DeviceKind::Pkcs11, _, _) => {
                return bad("a pkcs11 profile needs a [pkcs11] table with modules and sessions >= 1, and no [piv] table")
            }
            (DeviceKind::Piv, None, Some(p)) => {
                if p.readers.is_empty() || p.slots.is_empty() {
                    return bad("[piv] needs at least one reader pattern and one slot");
                }
                for r in &p.readers {
                    if let Err(e) = glob::Pattern::new(r) {
                        return bad(&format!("reader pattern {r:?}: {e}"));
                    }
                }
                for s in &p.slots {
                    if let Err(e) = super::piv::Slot::parse(s) {
                        return bad(&e);
                    }
                }
                if !["80", "00"].contains(&p.pin_reference.as_str()) {
                    return bad("[piv] pin_reference is \"80\" (application PIN) or \"00\" (global PIN)");
                }
                if p.keep_pin_tries == 0 {
                    return bad("[piv] keep_pin_tries must be at least 1, or a wrong PIN could block the card");
                }
                for a in &profile.algorithms {
                    if !["ecdsa-p256-sha256", "rsa-pkcs1-sha256"].contains(&a.as_str()) {
                        return bad(&format!("PIV cards sign with ecdsa-p256-sha256 or rsa-pkcs1-sha256, not {a}"));
                    }
                }
            }
            (DeviceKind::Piv, _, _) => {
                return bad("a piv profile needs a [piv] table and no [pkcs11] table")
            }
            (DeviceKind::Terminal, None, None) => {
                let Some(t) = &profile.terminal else {
                    return bad("a terminal profile needs a [terminal] table");
                };
                if let Err(e) = t.check() {
                    return bad(&e);
                }
            }
            (DeviceKind::Terminal, _, _) => {
                return bad("a terminal profile has a [terminal] table only")
            }
        }
        Ok(profile)
    }

    pub fn supports(&self, algorithm: Algorithm) -> bool {
        self.algorithms.iter().any(|a| a == algorithm.name())
    }
}

impl TerminalProfile {
    fn check(&self) -> Result<(), String> {
        if self.protocol != "sealgate-terminal-v1" {
            return Err(format!(
                "[terminal] protocol {:?} is unknown; this build speaks \"sealgate-terminal-v1\"",
                self.protocol
            ));
        }
        if !["none", "even", "odd"].contains(&self.parity.as_str()) {
            return Err("[terminal] parity is \"none\", \"even\" or \"odd\"".into());
        }
        if !(5..=8).contains(&self.data_bits) || !(1..=2).contains(&self.stop_bits) {
            return Err("[terminal] data_bits is 5 to 8 and stop_bits 1 or 2".into());
        }
        if self.baud_rate == 0 || self.ack_timeout_ms == 0 || self.frame_timeout_ms == 0 {
            return Err(
                "[terminal] baud_rate, ack_timeout_ms and frame_timeout_ms must be above 0".into(),
            );
        }
        if self.heartbeat_timeout_ms <= self.heartbeat_interval_ms {
            return Err(
                "[terminal] heartbeat_timeout_ms must be longer than heartbeat_interval_ms".into(),
            );
        }
        if self.grant_seconds == 0 || self.max_impressions == 0 {
            return Err("[terminal] grant_seconds and max_impressions must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.file_stem().unwrap().to_str().unwrap();
                DeviceProfile::load(&dir, name).unwrap();
                seen += 1;
            }
        }
        assert!(seen >= 1);
    }

    #[test]
    fn path_like_names_are_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        assert!(DeviceProfile::load(&dir, "../Cargo").is_err());
    }
}
