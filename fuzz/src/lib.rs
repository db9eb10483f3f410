//! What the fuzz targets share: fixed keys, one configuration, a service built on a device
//! that signs in software, and the documents and tokens the seed corpus is made of.
//!
//! The device here is a stand-in for fuzzing the request path only; the real backends are
//! proved by the integration tests against SoftHSM, pcscd and a pseudo-terminal.

use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use sealgate::config::Config;
use sealgate::device::profile::DeviceProfile;
use sealgate::device::{
    Algorithm, DeviceError, Health, Registry, SealBinding, SealDevice, SealKey,
};
use sealgate::service::{Peer, Service};
use sealgate::token::{Amount, Claims, DocClaim, SigningKey, Token};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The clock the token target judges by (2027-01-15), so a run does not depend on the day.
pub const NOW: i64 = 1_800_000_000;
/// The document every seed token approves.
pub const DIGEST: [u8; 32] = [0x11; 32];
/// The uid of the configured caller; any other uid is a stranger.
pub const CALLER_UID: u32 = 1000;
/// The terminal id the terminal-frame seeds are signed for.
pub const TERMINAL_ID: &str = "fuzz-terminal";

/// Seals of the fuzzed service, each with one key on the software device.
pub const SEALS: [&str; 3] = ["contract", "official", "finance"];

fn p256_key(n: u8) -> p256::ecdsa::SigningKey {
    let mut scalar = [0u8; 32];
    scalar[31] = n;
    scalar[0] = 0x42;
    p256::ecdsa::SigningKey::from_slice(&scalar).expect("a valid scalar")
}

/// Approvers: (id, role, department, key).
pub fn approvers() -> Vec<(&'static str, &'static str, &'static str, SigningKey)> {
    vec![
        (
            "zhang.wei",
            "dept_head",
            "sales",
            SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[7; 32])),
        ),
        (
            "li.na",
            "executive",
            "management",
            SigningKey::P256(p256_key(9)),
        ),
        (
            "liu.yang",
            "finance",
            "finance",
            SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[8; 32])),
        ),
    ]
}

/// The passkey approver's relying party and approval page.
pub const PASSKEY_RP: &str = "approvals.fuzz.test";
pub const PASSKEY_ORIGIN: &str = "https://approvals.fuzz.test";

/// The passkey of approver "sun.li" (an executive): its credential id and ES256 key.
pub fn passkey() -> (Vec<u8>, p256::ecdsa::SigningKey) {
    (b"fuzz-passkey-1".to_vec(), p256_key(11))
}

/// The passkey's public key as a COSE_Key: {1: 2 (EC2), 3: -7 (ES256), -1: 1 (P-256), -2: x,
/// -3: y}, in CBOR written out by hand.
fn passkey_cose() -> Vec<u8> {
    let point = passkey().1.verifying_key().to_encoded_point(false);
    let mut c = vec![0xa5, 0x01, 0x02, 0x03, 0x26, 0x20, 0x01, 0x21, 0x58, 0x20];
    c.extend_from_slice(point.x().expect("uncompressed"));
    c.extend_from_slice(&[0x22, 0x58, 0x20]);
    c.extend_from_slice(point.y().expect("uncompressed"));
    c
}

/// `token` with sun.li's passkey assertion added (user present and verified, counter `count`).
pub fn add_passkey_signature(token: &mut Token, count: u32) {
    use p256::ecdsa::signature::Signer;
    use sha2_for_fuzz::Digest;
    let (id, key) = passkey();
    token
        .add_webauthn_signature(
            sealgate::token::JwsAlg::ES256,
            "sun.li",
            1_700_000_200,
            &id,
            |challenge| {
                let client = format!(
                    r#"{{"type":"webauthn.get","challenge":"{}","origin":"{PASSKEY_ORIGIN}"}}"#,
                    b64url(challenge)
                )
                .into_bytes();
                let mut auth = sha2_for_fuzz::Sha256::digest(PASSKEY_RP.as_bytes()).to_vec();
                auth.push(0x05);
                auth.extend_from_slice(&count.to_be_bytes());
                let mut msg = auth.clone();
                msg.extend_from_slice(&sha2_for_fuzz::Sha256::digest(&client));
                let sig: p256::ecdsa::Signature = key.sign(&msg);
                Ok((auth, client, sig.to_der().as_bytes().to_vec()))
            },
        )
        .expect("in memory");
}

fn b64url(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &x| n << 8 | x as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The terminal's device key, for signed reports.
pub fn terminal_key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[5; 32])
}

fn public_pem(key: &SigningKey) -> String {
    match key {
        SigningKey::Ed25519(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
        SigningKey::P256(k) => k.verifying_key().to_public_key_pem(LineEnding::LF),
    }
    .expect("encodable")
}

/// The configuration of the fuzzed service, with its paths under `dir`.
pub fn config_text(dir: &Path) -> String {
    let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("../device-profiles");
    let mut t = format!(
        r#"[daemon]
socket = "{dir}/sealgate.sock"
profiles_dir = "{profiles}"
state_dir = "{dir}/state"
max_frame_bytes = 65536
allow_root = true

[[caller]]
name = "office"
uids = [{CALLER_UID}]
seals = {SEALS:?}
admin = true
oversight = true

[[device]]
id = "soft"
profile = "softhsm2"
token_label = "fuzz"
pin_file = "{dir}/pin"

[audit]
device = "soft"
key_label = "audit"

[audit.alerts]
denial_spike_count = 5
"#,
        dir = dir.display(),
        profiles = profiles.display(),
    );
    for (id, role, dept, key) in approvers() {
        t += &format!(
            "\n[[approver]]\nid = \"{id}\"\nrole = \"{role}\"\ndepartment = \"{dept}\"\npublic_key = \"\"\"\n{}\"\"\"\n",
            public_pem(&key)
        );
    }
    t += &format!(
        "\n[webauthn]\norigins = [\"{PASSKEY_ORIGIN}\"]\n\n[[approver]]\nid = \"sun.li\"\nrole = \"executive\"\ndepartment = \"management\"\n\n[[approver.passkey]]\ncredential_id = \"{}\"\npublic_key = \"{}\"\nrp_id = \"{PASSKEY_RP}\"\n",
        b64url(&passkey().0),
        b64url(&passkey_cose())
    );
    t += r#"
[[seal]]
id = "contract"
name = "合同专用章"
device = "soft"
key_label = "contract"
algorithm = "ecdsa-p256-sha256"
# The seeds live from 2023 for decades and grant many uses, so they pass on any day.
max_token_lifetime_seconds = 4000000000
max_uses = 1000000

[[seal.rule]]
name = "large contracts"
doc_types = ["contract"]
currency = "CNY"
amount_min = 10000000
levels = ["dept_head", "executive"]
dept_scoped = ["dept_head"]

[[seal.rule]]
name = "contracts"
doc_types = ["contract"]
levels = ["dept_head"]
dept_scoped = ["dept_head"]

[[seal]]
id = "official"
device = "soft"
key_label = "official"
algorithm = "ecdsa-p256-sha256"
# The seeds live from 2023 for decades and grant many uses, so they pass on any day.
max_token_lifetime_seconds = 4000000000
max_uses = 1000000

[[seal.rule]]
name = "letters"
doc_types = ["letter"]
levels = ["dept_head", "executive"]
hours = "00:00-23:59"
timezone = "Asia/Shanghai"

[[seal]]
id = "finance"
device = "soft"
key_label = "finance"
algorithm = "ecdsa-p256-sha256"
# The seeds live from 2023 for decades and grant many uses, so they pass on any day.
max_token_lifetime_seconds = 4000000000
max_uses = 1000000

[[seal.rule]]
name = "invoices"
doc_types = ["invoice"]
levels = ["finance"]
rate_limit_count = 3
rate_limit_window_seconds = 3600
"#;
    t
}

/// The configuration, parsed as the daemon parses it.
pub fn config(dir: &Path) -> Config {
    Config::parse(&config_text(dir), &dir.join("sealgate.toml")).expect("the fuzz configuration")
}

/// A claim set for `seal` and [`DIGEST`], valid for decades.
pub fn claims(jti: &str, seal: &str, doc_type: &str, amount: Option<i64>, uses: u32) -> Claims {
    Claims {
        jti: jti.into(),
        seal: seal.into(),
        doc: DocClaim {
            sha256: hex::encode(DIGEST),
            doc_type: doc_type.into(),
            title: Some("采购合同".into()),
            sha512: None,
            placement: None,
        },
        amount: amount.map(|value| Amount {
            value,
            currency: "CNY".into(),
        }),
        dept: "sales".into(),
        scope: String::new(),
        applicant: "chen.jie".into(),
        purpose: "fuzz seed".into(),
        iat: 1_700_000_000,
        nbf: 1_700_000_000,
        exp: 4_000_000_000,
        uses,
    }
}

/// `claims` signed by the named approvers, as the JSON a client sends.
pub fn signed(claims: Claims, by: &[&str]) -> Vec<u8> {
    let mut token = Token::unsigned(claims);
    for (id, _, _, key) in approvers() {
        if by.contains(&id) {
            token.add_signature(&key, id, 1_700_000_100);
        }
    }
    token.to_json().into_bytes()
}

/// A device that signs in software with fixed P-256 keys: one per seal, then the audit key.
struct SoftDevice {
    profile: DeviceProfile,
    signers: Vec<p256::ecdsa::SigningKey>,
    keys: Vec<SealKey>,
}

impl SoftDevice {
    fn new(profile: DeviceProfile, count: usize) -> SoftDevice {
        let signers: Vec<_> = (0..count).map(|i| p256_key(100 + i as u8)).collect();
        let keys = signers
            .iter()
            .map(|s| SealKey {
                algorithm: Algorithm::EcdsaP256Sha256,
                spki_der: s
                    .verifying_key()
                    .to_public_key_der()
                    .expect("encodable")
                    .into_vec(),
                certificate_der: None,
            })
            .collect();
        SoftDevice {
            profile,
            signers,
            keys,
        }
    }
}

impl SealDevice for SoftDevice {
    fn id(&self) -> &str {
        "soft"
    }
    fn profile(&self) -> &DeviceProfile {
        &self.profile
    }
    fn health(&self) -> Health {
        Health::Ready
    }
    fn key(&self, key: usize) -> &SealKey {
        &self.keys[key]
    }
    fn sign(&self, key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, DeviceError> {
        let sig: p256::ecdsa::Signature = self.signers[key]
            .sign_prehash(digest)
            .map_err(|e| DeviceError::Failed(e.to_string()))?;
        Ok(sig.to_der().as_bytes().to_vec())
    }
    fn recover(&self) {}
    fn parallelism(&self) -> usize {
        1
    }
}

const STATE_PREFIX: &str = "sealgate-fuzz-";

/// Removes the state directories of fuzzing processes that no longer run.
fn clear_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STATE_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A running service, its state in a temporary directory (in memory where /dev/shm exists,
/// so the audit log's fsyncs cost little).
pub struct World {
    pub runtime: tokio::runtime::Runtime,
    pub service: Service,
    pub caller: Peer,
    pub stranger: Peer,
    /// Each seal's public key, SPKI DER.
    seal_keys: HashMap<String, Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_owned()
        } else {
            std::env::temp_dir()
        };
        // libFuzzer ends the process without dropping statics, so a run's directory outlives
        // it; each new run clears those of processes that are gone.
        clear_stale(&base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{STATE_PREFIX}{}-", std::process::id()))
            .tempdir_in(&base)
            .expect("a temporary directory");
        let config = config(dir.path());
        let profile = DeviceProfile::load(&config.daemon.profiles_dir, "softhsm2")
            .expect("the softhsm2 profile");
        let device: Arc<dyn SealDevice> = Arc::new(SoftDevice::new(profile, SEALS.len() + 1));
        let seals: HashMap<String, SealBinding> = SEALS
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let binding = SealBinding {
                    id: id.to_string(),
                    name: id.to_string(),
                    device: device.clone(),
                    key: i,
                    image_png: None,
                    timestamp: sealgate::config::TimestampMode::None,
                };
                (id.to_string(), binding)
            })
            .collect();
        let seal_keys = seals
            .iter()
            .map(|(id, b)| (id.clone(), b.device.key(b.key).spki_der.clone()))
            .collect();
        let registry = Registry {
            devices: vec![device.clone()],
            seals,
            seal_order: SEALS.iter().map(|s| s.to_string()).collect(),
            audit_key: (device, SEALS.len()),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let service = {
            let _in = runtime.enter();
            Service::new(&config, registry, &dir.path().join("sealgate.toml"), None)
                .expect("the fuzzed service starts")
        };
        let caller = service.identify(CALLER_UID, CALLER_UID, Some(1));
        let stranger = service.identify(CALLER_UID + 1, CALLER_UID + 1, Some(2));
        World {
            runtime,
            service,
            caller,
            stranger,
            seal_keys,
            _dir: dir,
        }
    }

    /// Stops the service (its audit writer flushes and ends); the state directory goes with it.
    pub fn close(self) {
        self.runtime.block_on(self.service.shutdown());
    }

    /// The public key of seal `id`, SPKI DER.
    pub fn seal_key(&self, id: &str) -> &[u8] {
        &self.seal_keys[id]
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}
