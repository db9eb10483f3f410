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
    /// File name without `.toml`; filled in on load.
    #[serde(skip)]
    pub name: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Pkcs11,
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

impl DeviceProfile {
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
        let mut profile: DeviceProfile = toml::from_str(&text).map_err(|e| {
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
        match (profile.kind, &profile.pkcs11) {
            (DeviceKind::Pkcs11, Some(p)) if !p.modules.is_empty() && p.sessions > 0 => {}
            (DeviceKind::Pkcs11, _) => {
                return Err(DeviceError::Setup(format!(
                    "device profile {} needs a [pkcs11] table with modules and sessions >= 1",
                    path.display()
                )))
            }
        }
        Ok(profile)
    }

    pub fn supports(&self, algorithm: Algorithm) -> bool {
        self.algorithms.iter().any(|a| a == algorithm.name())
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
