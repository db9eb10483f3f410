//! Seal devices: the things that hold seal keys and sign.
//!
//! Owns: the [`SealDevice`] trait every backend implements, the algorithms a seal can use, the
//! device errors, and the [`Registry`] that opens every configured device at start-up.
//! Never: decides whether a stamp is allowed (that is the service's job) and never sees a
//! document, only its digest. Device calls block; callers run them off the async executor.

pub mod keys;
pub mod piv;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
pub mod profile;

use crate::config::Config;
use profile::{DeviceKind, DeviceProfile};
use std::collections::HashMap;
use std::sync::Arc;

/// What a device can go wrong with, each variant worded to complete "the device ...".
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    /// The device is absent, was removed, or cannot be logged in to right now.
    #[error("{0}")]
    Unavailable(String),
    /// The device is there but refused or failed the operation.
    #[error("{0}")]
    Failed(String),
    /// The device could not be set up at start-up (module, token, PIN or key missing or wrong).
    #[error("{0}")]
    Setup(String),
    /// The device refused the configured PIN, or has too few tries left to risk it; the message
    /// gives the tries left. Not retried until the daemon restarts.
    #[error("{0}")]
    PinInvalid(String),
    /// The device's PIN is blocked.
    #[error("{0}")]
    PinBlocked(String),
}

/// Signature algorithms a seal can use. The wire names are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// ECDSA on P-256 over SHA-256; signature DER-encoded.
    EcdsaP256Sha256,
    /// Ed25519 whose message is the 32-byte SHA-256 digest of the document.
    Ed25519,
    /// RSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt.
    RsaPssSha256,
    /// RSA PKCS#1 v1.5 with SHA-256.
    RsaPkcs1Sha256,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::EcdsaP256Sha256,
        Algorithm::Ed25519,
        Algorithm::RsaPssSha256,
        Algorithm::RsaPkcs1Sha256,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::EcdsaP256Sha256 => "ecdsa-p256-sha256",
            Algorithm::Ed25519 => "ed25519",
            Algorithm::RsaPssSha256 => "rsa-pss-sha256",
            Algorithm::RsaPkcs1Sha256 => "rsa-pkcs1-sha256",
        }
    }

    pub fn parse(name: &str) -> Result<Algorithm, String> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                format!("unknown algorithm {name:?} (known: {})", known.join(", "))
            })
    }
}

/// Whether a device can sign now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    Unavailable(String),
}

/// The public side of one seal key, read from the device at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealKey {
    pub algorithm: Algorithm,
    /// X.509 SubjectPublicKeyInfo, DER.
    pub spki_der: Vec<u8>,
    /// The key's certificate, DER, when the device holds one.
    pub certificate_der: Option<Vec<u8>>,
}

/// Where a seal's key is found on its device.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub label: Option<String>,
    pub id: Option<Vec<u8>>,
    pub algorithm: Algorithm,
}

impl std::fmt::Display for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.label, &self.id) {
            (Some(l), Some(id)) => write!(f, "label {l:?} id {}", hex::encode(id)),
            (Some(l), None) => write!(f, "label {l:?}"),
            (None, Some(id)) => write!(f, "id {}", hex::encode(id)),
            (None, None) => f.write_str("(no key)"),
        }
    }
}

/// One device holding one or more seal keys. Keys are addressed by their index in the list the
/// device was opened with.
pub trait SealDevice: Send + Sync {
    fn id(&self) -> &str;
    fn profile(&self) -> &DeviceProfile;
    /// Current health; cheap, never touches the device.
    fn health(&self) -> Health;
    /// The public side of key `key`, as read at start-up.
    fn key(&self, key: usize) -> &SealKey;
    /// Signs a SHA-256 digest with key `key`. Blocks.
    fn sign(&self, key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, DeviceError>;
    /// Signs a whole message with an Ed25519 key `key` (pure EdDSA, as a CMS signature over
    /// signed attributes needs, RFC 8419). Other keys, and devices without Ed25519, refuse.
    /// Blocks.
    fn sign_message(&self, key: usize, _message: &[u8]) -> Result<Vec<u8>, DeviceError> {
        Err(DeviceError::Failed(format!(
            "device {:?} cannot sign a whole message with key {key}",
            self.id()
        )))
    }
    /// If the device is unavailable, tries once to reach it again. Blocks; a PKCS#11 token
    /// also waits, a bounded while, for a reconnection another thread has under way.
    fn recover(&self);
    /// Checks cheaply that a ready device still answers, marking it unavailable if not, and
    /// refreshes what it reports of its PIN. Blocks.
    fn probe(&self) {}
    /// The device's serial number as it reports it; empty when it has none.
    fn serial(&self) -> String {
        String::new()
    }
    /// The PIN error every signature gets until the daemon restarts, when the device has
    /// refused its PIN or has too few tries left to risk one. Cheap, never touches the device.
    fn pin_refusal(&self) -> Option<DeviceError> {
        None
    }
    /// The device reported few PIN tries left when last asked.
    fn pin_tries_low(&self) -> bool {
        false
    }
    /// Signatures this device can have in flight at once.
    fn parallelism(&self) -> usize;
    /// Encrypts a small secret under a key that never leaves the device, bound to `context`
    /// (the same context is needed to open it). Blocks.
    fn seal_secret(&self, _plaintext: &[u8], _context: &[u8]) -> Result<Vec<u8>, DeviceError> {
        Err(DeviceError::Failed(format!(
            "device {:?} cannot wrap secrets",
            self.id()
        )))
    }
    /// The values of the small data objects labelled `label` kept inside the device, private
    /// to the logged-in user (PKCS#11 `CKO_DATA`): none, one, or more after an interrupted
    /// [`SealDevice::replace_data`]. Blocks.
    fn read_data(&self, _label: &str) -> Result<Vec<Vec<u8>>, DeviceError> {
        Err(DeviceError::Failed(format!(
            "device {:?} cannot keep data objects",
            self.id()
        )))
    }
    /// Makes a new data object `label` holding `value`, then removes the earlier ones with
    /// that label (values of a data object cannot be changed in place on every token). Blocks.
    fn replace_data(&self, _label: &str, _value: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::Failed(format!(
            "device {:?} cannot keep data objects",
            self.id()
        )))
    }
    /// Reverses [`SealDevice::seal_secret`]. Blocks.
    fn open_secret(
        &self,
        _sealed: &[u8],
        _context: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, DeviceError> {
        Err(DeviceError::Failed(format!(
            "device {:?} cannot wrap secrets",
            self.id()
        )))
    }
}

/// A configured seal bound to its device and key.
#[derive(Clone)]
pub struct SealBinding {
    pub id: String,
    pub name: String,
    pub device: Arc<dyn SealDevice>,
    pub key: usize,
    /// The seal's image (PNG) for visible PDF seals, when configured.
    pub image_png: Option<Arc<Vec<u8>>>,
    /// Whether its container stamps carry a timestamp.
    pub timestamp: crate::config::TimestampMode,
}

/// A seal's configured image, read and checked to be a PNG sealctl can place.
fn seal_image(seal: &str, path: &std::path::Path) -> Result<Vec<u8>, DeviceError> {
    let bad =
        |m: String| DeviceError::Setup(format!("seal {seal:?}: image {}: {m}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > crate::pdf::MAX_IMAGE_BYTES as u64 {
        return Err(bad(format!(
            "{} bytes; at most {}",
            meta.len(),
            crate::pdf::MAX_IMAGE_BYTES
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    crate::pdf::decode_png(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok(bytes)
}

/// Every configured device, opened, and every seal bound to one.
pub struct Registry {
    pub devices: Vec<Arc<dyn SealDevice>>,
    pub seals: HashMap<String, SealBinding>,
    /// Seal ids in configuration order.
    pub seal_order: Vec<String>,
    /// The device and key index of the audit key, which signs the audit log's checkpoints.
    pub audit_key: (Arc<dyn SealDevice>, usize),
}

impl Registry {
    /// Opens every device of the configuration and finds every seal's key. Any failure stops
    /// start-up with an error naming the device and the problem.
    pub fn open(config: &Config) -> Result<Registry, DeviceError> {
        let by_device = config.seals_by_device();
        let mut devices: Vec<Arc<dyn SealDevice>> = Vec::new();
        let mut seals = HashMap::new();
        let mut audit_key = None;
        for dc in &config.devices {
            let profile = DeviceProfile::load(&config.daemon.profiles_dir, &dc.profile)
                .map_err(|e| DeviceError::Setup(format!("device {:?}: {e}", dc.id)))?;
            let seal_cfgs = by_device.get(dc.id.as_str()).cloned().unwrap_or_default();
            let mut specs = Vec::new();
            for s in &seal_cfgs {
                let algorithm = Algorithm::parse(&s.algorithm)
                    .map_err(|e| DeviceError::Setup(format!("seal {:?}: {e}", s.id)))?;
                if !profile.supports(algorithm) {
                    return Err(DeviceError::Setup(format!(
                        "seal {:?}: device profile {:?} does not offer {}",
                        s.id,
                        profile.name,
                        algorithm.name()
                    )));
                }
                specs.push(KeySpec {
                    label: s.key_label.clone(),
                    id: s
                        .key_id
                        .as_deref()
                        .map(|h| hex::decode(h).expect("checked in config")),
                    algorithm,
                });
            }
            let audit_index = (config.audit.device == dc.id).then(|| {
                specs.push(KeySpec {
                    label: config.audit.key_label.clone(),
                    id: config
                        .audit
                        .key_id
                        .as_deref()
                        .map(|h| hex::decode(h).expect("checked in config")),
                    algorithm: Algorithm::parse(&config.audit.algorithm)
                        .expect("checked in config"),
                });
                specs.len() - 1
            });
            let device: Arc<dyn SealDevice> = match profile.kind {
                #[cfg(feature = "pkcs11")]
                DeviceKind::Pkcs11 => Arc::new(pkcs11::Pkcs11Device::open(dc, profile, specs)?),
                #[cfg(not(feature = "pkcs11"))]
                DeviceKind::Pkcs11 => {
                    return Err(DeviceError::Setup(format!(
                        "device {:?}: this build has no PKCS#11 support (feature pkcs11)",
                        dc.id
                    )))
                }
                #[cfg(feature = "pcsc")]
                DeviceKind::Piv => Arc::new(piv::device::PivDevice::open(dc, profile, specs)?),
                #[cfg(not(feature = "pcsc"))]
                DeviceKind::Piv => {
                    return Err(DeviceError::Setup(format!(
                        "device {:?}: this build has no PC/SC support (feature pcsc)",
                        dc.id
                    )))
                }
                DeviceKind::Terminal => {
                    return Err(DeviceError::Setup(format!(
                        "device {:?}: profile {:?} is a smart-seal terminal; configure it under [[terminal]]",
                        dc.id, dc.profile
                    )))
                }
            };
            for (i, s) in seal_cfgs.iter().enumerate() {
                let image_png = match &s.image {
                    None => None,
                    Some(path) => Some(Arc::new(seal_image(&s.id, path)?)),
                };
                seals.insert(
                    s.id.clone(),
                    SealBinding {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        device: device.clone(),
                        key: i,
                        image_png,
                        timestamp: s.timestamp_mode(config.timestamp.is_some()),
                    },
                );
            }
            if let Some(i) = audit_index {
                audit_key = Some((device.clone(), i));
            }
            devices.push(device);
        }
        let audit_key = audit_key.expect("audit.device is checked to be configured");
        // A seal signs whatever digest an approved request names, so a seal key that also
        // signed checkpoints would let an approved stamp forge one.
        let audit_spki = &audit_key.0.key(audit_key.1).spki_der;
        for s in seals.values() {
            if s.device.key(s.key).spki_der == *audit_spki {
                return Err(DeviceError::Setup(format!(
                    "the audit key is also the key of seal {:?}; the audit key must be used for nothing else",
                    s.id
                )));
            }
        }
        let seal_order = config.seals.iter().map(|s| s.id.clone()).collect();
        Ok(Registry {
            devices,
            seals,
            seal_order,
            audit_key,
        })
    }
}

/// A device for unit tests of the steps around a device: one P-256 key, always ready, and
/// whatever signing `sign` does (a digest back, a panic, a note of the thread).
#[cfg(test)]
pub(crate) struct TestDevice {
    id: &'static str,
    profile: DeviceProfile,
    key: SealKey,
    sign: Box<TestSign>,
}

#[cfg(test)]
type TestSign = dyn Fn(&[u8; 32]) -> Vec<u8> + Send + Sync;

#[cfg(test)]
impl TestDevice {
    pub fn new(
        id: &'static str,
        sign: impl Fn(&[u8; 32]) -> Vec<u8> + Send + Sync + 'static,
    ) -> TestDevice {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        TestDevice {
            id,
            profile: DeviceProfile::load(&dir, "softhsm2").unwrap(),
            key: SealKey {
                algorithm: Algorithm::EcdsaP256Sha256,
                spki_der: Vec::new(),
                certificate_der: None,
            },
            sign: Box::new(sign),
        }
    }
}

#[cfg(test)]
impl SealDevice for TestDevice {
    fn id(&self) -> &str {
        self.id
    }
    fn profile(&self) -> &DeviceProfile {
        &self.profile
    }
    fn health(&self) -> Health {
        Health::Ready
    }
    fn key(&self, _key: usize) -> &SealKey {
        &self.key
    }
    fn sign(&self, _key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, DeviceError> {
        Ok((self.sign)(digest))
    }
    fn recover(&self) {}
    fn parallelism(&self) -> usize {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.name()).unwrap(), a);
        }
        assert!(Algorithm::parse("rsa-md5").unwrap_err().contains("known:"));
    }
}
