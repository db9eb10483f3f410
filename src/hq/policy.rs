//! Policy from headquarters ("dynamic adjustments"): a configuration fragment HQ signs for one
//! site, and the site's rules for taking it.
//!
//! Owns: the fragment's signed encoding, what a fragment's body may hold and how it changes a
//! site's configuration, the site's checks (HQ's policy key, this site, newer than the one in
//! force, nothing pinned touched), and the site's copy of the fragment in force
//! (`hq-policy.pb` in the state directory, written whole or not at all).
//! Never: puts in force a fragment that failed any check, or a part of one.

use super::pb;
use crate::audit::verify::TrustedKey;
use crate::config::{
    AlertsConfig, ApplicantConfig, ApproverConfig, CallerConfig, Config, HqPolicyConfig, RuleConfig,
};
use prost::Message;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Domain tag that starts every fragment's signed encoding.
pub const POLICY_TAG: &[u8] = b"sealgate-policy-v1\0";
/// Largest body HQ publishes and a site reads.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// A fragment as HQ signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub site: String,
    pub version: u64,
    pub issued_at_ms: i64,
    pub body: String,
    pub key_id: String,
    pub algorithm: String,
    pub signature: Vec<u8>,
}

/// Why a site did not put a fragment in force; `code` is the stable reason on the wire and in
/// the `config.refused` record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this site takes no policy from HQ ([hq_policy] is not configured)")]
    NotConfigured,
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    OtherSite(String),
    #[error("{0}")]
    NotNewer(String),
    #[error("{0}")]
    Pinned(String),
    #[error("{0}")]
    Invalid(String),
}

impl Refused {
    pub fn code(&self) -> &'static str {
        match self {
            Refused::NotConfigured => "not_configured",
            Refused::BadSignature(_) => "bad_signature",
            Refused::OtherSite(_) => "other_site",
            Refused::NotNewer(_) => "not_newer",
            Refused::Pinned(_) => "pinned",
            Refused::Invalid(_) => "invalid",
        }
    }
}

/// What a fragment's body may hold. Each section present replaces the site's own whole; a
/// section absent leaves it as the site has it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Body {
    #[serde(default, rename = "caller")]
    pub callers: Option<Vec<CallerConfig>>,
    /// Approvers' keys are given inline (`public_key`): a path means nothing at the site.
    #[serde(default, rename = "approver")]
    pub approvers: Option<Vec<ApproverConfig>>,
    #[serde(default, rename = "applicant")]
    pub applicants: Option<Vec<ApplicantConfig>>,
    /// A seal's (or a terminal's seal's) rules and limits, replaced whole.
    #[serde(default, rename = "seal")]
    pub seals: Vec<SealPolicy>,
    #[serde(default)]
    pub alerts: Option<AlertsConfig>,
}

/// One seal's policy in a fragment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealPolicy {
    pub id: String,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub max_token_lifetime_seconds: Option<u64>,
    #[serde(default)]
    pub max_uses: Option<u32>,
}

impl Body {
    /// Parses a body, refusing unknown sections and keys.
    pub fn parse(text: &str) -> Result<Body, String> {
        if text.len() > MAX_BODY_BYTES {
            return Err(format!(
                "the body is {} bytes; at most {MAX_BODY_BYTES} are taken",
                text.len()
            ));
        }
        let body: Body = toml::from_str(text).map_err(|e| format!("the body: {}", e.message()))?;
        for a in body.approvers.iter().flatten() {
            if a.public_key_file.is_some() || (a.public_key.is_none() && a.passkeys.is_empty()) {
                return Err(format!(
                    "approver {:?}: a fragment gives approvers' keys inline (public_key)",
                    a.id
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &body.seals {
            if !seen.insert(&s.id) {
                return Err(format!("seal {:?} is given twice", s.id));
            }
        }
        Ok(body)
    }

    /// The sections this body changes, as `[hq_policy] pinned` names them.
    pub fn sections(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |present: bool, name: &str| {
            if present {
                out.push(name.to_owned());
            }
        };
        add(self.callers.is_some(), "caller");
        add(self.approvers.is_some(), "approver");
        add(self.applicants.is_some(), "applicant");
        add(self.alerts.is_some(), "alerts");
        out.extend(self.seals.iter().map(|s| format!("seal:{}", s.id)));
        out
    }

    /// The first section this body changes that the site pinned.
    fn touches_pinned(&self, pinned: &[String]) -> Option<String> {
        self.sections().into_iter().find(|s| {
            pinned.iter().any(|p| {
                p == s || (p == "seal" && s.starts_with("seal:")) // "seal" pins every seal
            })
        })
    }

    /// Changes `config` as this body says, and checks the result as a whole configuration.
    pub fn apply(self, config: &mut Config) -> Result<(), String> {
        if let Some(c) = self.callers {
            config.callers = c;
        }
        if let Some(a) = self.approvers {
            config.approvers = a;
        }
        if let Some(a) = self.applicants {
            config.applicants = a;
        }
        if let Some(a) = self.alerts {
            config.audit.alerts = a;
        }
        for p in self.seals {
            if let Some(s) = config.seals.iter_mut().find(|s| s.id == p.id) {
                s.rules = p.rules;
                s.max_token_lifetime_seconds = p.max_token_lifetime_seconds;
                s.max_uses = p.max_uses;
            } else if let Some(t) = config.terminals.iter_mut().find(|t| t.seal == p.id) {
                t.rules = p.rules;
                t.max_token_lifetime_seconds = p.max_token_lifetime_seconds;
                t.max_uses = p.max_uses;
            } else {
                return Err(format!("this site has no seal {:?}", p.id));
            }
        }
        config.check().map_err(|e| e.to_string())
    }
}

impl Fragment {
    /// The signed message: tag, the site id (4-byte big-endian length and UTF-8), version,
    /// issued_at_ms (big-endian), and the body's SHA-256.
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(POLICY_TAG.len() + self.site.len() + 52);
        m.extend_from_slice(POLICY_TAG);
        m.extend_from_slice(&(self.site.len() as u32).to_be_bytes());
        m.extend_from_slice(self.site.as_bytes());
        m.extend_from_slice(&self.version.to_be_bytes());
        m.extend_from_slice(&self.issued_at_ms.to_be_bytes());
        m.extend_from_slice(&Sha256::digest(self.body.as_bytes()));
        m
    }

    /// Names this fragment in records: the SHA-256 of its signed message, hex.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.message()))
    }

    /// Whether `key` signed this fragment; why not, if not.
    pub fn check_signature(&self, key: &TrustedKey) -> Result<(), Refused> {
        key.check_signed(
            &self.key_id,
            &self.algorithm,
            &self.message(),
            &self.signature,
        )
        .map_err(|e| {
            Refused::BadSignature(format!(
                "fragment version {} is not signed by HQ's policy key: {e}",
                self.version
            ))
        })
    }

    /// Every check a site makes, against the fragment in force (if any). Ok(false): this very
    /// fragment is the one in force. Ok(true): `config`, read from the site's own file, is
    /// now changed as the fragment says.
    pub fn admit(
        &self,
        settings: &HqPolicyConfig,
        in_force: Option<&Fragment>,
        config: &mut Config,
    ) -> Result<bool, Refused> {
        self.verify_for(settings)?;
        if let Some(f) = in_force {
            if f == self {
                return Ok(false);
            }
            if self.version <= f.version {
                return Err(Refused::NotNewer(format!(
                    "fragment version {} is not newer than version {} in force",
                    self.version, f.version
                )));
            }
        }
        self.apply_to(settings, config)?;
        Ok(true)
    }

    /// Whether this fragment is HQ's for this site: signed by the key the site configured, and
    /// naming this site. Both a new fragment and the one kept in force must pass it.
    pub fn verify_for(&self, settings: &HqPolicyConfig) -> Result<(), Refused> {
        let key = TrustedKey::from_pem_file(&settings.key_file).map_err(Refused::Invalid)?;
        self.check_signature(&key)?;
        if self.site != settings.site {
            return Err(Refused::OtherSite(format!(
                "fragment version {} is for site {:?}; this site is {:?}",
                self.version, self.site, settings.site
            )));
        }
        Ok(())
    }

    /// Checks the body against what the site pinned and applies it to `config`.
    pub fn apply_to(&self, settings: &HqPolicyConfig, config: &mut Config) -> Result<(), Refused> {
        let body = Body::parse(&self.body)
            .map_err(|e| Refused::Invalid(format!("fragment version {}: {e}", self.version)))?;
        if let Some(s) = body.touches_pinned(&settings.pinned) {
            return Err(Refused::Pinned(format!(
                "fragment version {} changes {s:?}, which this site pinned",
                self.version
            )));
        }
        body.apply(config)
            .map_err(|e| Refused::Invalid(format!("fragment version {}: {e}", self.version)))
    }

    /// The evidence of a `config.applied` or `config.refused` record.
    pub fn evidence(&self) -> serde_json::Value {
        let sections = Body::parse(&self.body)
            .map(|b| b.sections())
            .unwrap_or_default();
        serde_json::json!({
            "site": self.site,
            "version": self.version,
            "issued_at_ms": self.issued_at_ms,
            "fragment_sha256": self.digest(),
            "key_id": self.key_id,
            "sections": sections,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        pb::PolicyFragment::from(self).encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Result<Fragment, String> {
        pb::PolicyFragment::decode(bytes)
            .map(Fragment::from)
            .map_err(|e| format!("not a policy fragment: {e}"))
    }
}

impl From<&Fragment> for pb::PolicyFragment {
    fn from(f: &Fragment) -> pb::PolicyFragment {
        pb::PolicyFragment {
            site: f.site.clone(),
            version: f.version,
            issued_at_ms: f.issued_at_ms,
            body: f.body.clone(),
            key_id: f.key_id.clone(),
            algorithm: f.algorithm.clone(),
            signature: f.signature.clone(),
        }
    }
}

impl From<pb::PolicyFragment> for Fragment {
    fn from(f: pb::PolicyFragment) -> Fragment {
        Fragment {
            site: f.site,
            version: f.version,
            issued_at_ms: f.issued_at_ms,
            body: f.body,
            key_id: f.key_id,
            algorithm: f.algorithm,
            signature: f.signature,
        }
    }
}

/// Where a site keeps the fragment in force.
pub fn stored_path(config: &Config) -> PathBuf {
    config.daemon.state_dir.join("hq-policy.pb")
}

/// The fragment in force, as the site stored it; None when there is none.
pub fn read_stored(path: &Path) -> Result<Option<Fragment>, String> {
    match std::fs::read(path) {
        Ok(bytes) => Fragment::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Stores the fragment in force whole: a new file, flushed, renamed over the old one, and the
/// folder flushed.
pub fn store(path: &Path, f: &Fragment) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("pb.new");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&f.encode())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Puts the stored fragment back in force on a configuration read from the site's file (at
/// start-up and on every reload). A stored fragment that no longer passes (another HQ key,
/// another site id, a section pinned since) is an error: the site starts only on a policy it
/// can account for. Returns the fragment in force.
pub fn restore(config: &mut Config) -> Result<Option<Fragment>, String> {
    let path = stored_path(config);
    let Some(settings) = config.hq_policy.clone() else {
        if path.exists() {
            tracing::warn!(
                file = %path.display(),
                "a fragment from HQ is stored but [hq_policy] is not configured; it is not in force"
            );
        }
        return Ok(None);
    };
    let Some(f) = read_stored(&path)? else {
        return Ok(None);
    };
    let why = |e: Refused| {
        format!(
            "the HQ policy fragment in force ({}) no longer applies: {e}; move it away to go on without it",
            path.display()
        )
    };
    f.verify_for(&settings).map_err(why)?;
    f.apply_to(&settings, config).map_err(why)?;
    Ok(Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(text: &str) -> Result<Body, String> {
        Body::parse(text)
    }

    #[test]
    fn a_body_names_the_sections_it_changes() {
        let b = body(
            r#"
            [[approver]]
            id = "a"
            role = "cfo"
            public_key = "-----BEGIN PUBLIC KEY-----"
            [[seal]]
            id = "contracts"
            [[seal.rule]]
            levels = ["cfo"]
            [alerts]
            burst_count = 3
            "#,
        )
        .unwrap();
        assert_eq!(b.sections(), ["approver", "alerts", "seal:contracts"]);
        assert_eq!(b.touches_pinned(&["caller".into()]), None);
        assert_eq!(
            b.touches_pinned(&["seal".into()]),
            Some("seal:contracts".into())
        );
        assert_eq!(
            b.touches_pinned(&["seal:contracts".into()]),
            Some("seal:contracts".into())
        );
        assert_eq!(b.touches_pinned(&["seal:other".into()]), None);
        assert_eq!(b.touches_pinned(&["alerts".into()]), Some("alerts".into()));
    }

    #[test]
    fn a_body_refuses_unknown_keys_key_paths_and_a_seal_twice() {
        assert!(body("[daemon]\nsocket = \"/tmp/x\"").is_err());
        assert!(
            body("[[approver]]\nid = \"a\"\nrole = \"r\"\npublic_key_file = \"k.pem\"")
                .unwrap_err()
                .contains("inline")
        );
        assert!(body("[[seal]]\nid = \"s\"\n[[seal]]\nid = \"s\"")
            .unwrap_err()
            .contains("twice"));
        assert!(body(&"#".repeat(MAX_BODY_BYTES + 1))
            .unwrap_err()
            .contains("at most"));
        assert!(body("").unwrap().sections().is_empty());
    }

    /// A fragment for `site` signed by the Ed25519 key of seed `seed`, whose SPKI PEM is
    /// written to `dir/key-SEED.pem`.
    fn signed(dir: &Path, seed: u8, site: &str, version: u64, body: &str) -> (Fragment, PathBuf) {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let spki = key.verifying_key().to_public_key_der().unwrap().into_vec();
        let trusted = TrustedKey::from_spki(spki.clone()).unwrap();
        let pem = dir.join(format!("key-{seed}.pem"));
        std::fs::write(&pem, crate::device::keys::pem("PUBLIC KEY", &spki)).unwrap();
        let mut f = Fragment {
            site: site.into(),
            version,
            issued_at_ms: 1,
            body: body.into(),
            key_id: trusted.key_id.clone(),
            algorithm: trusted.algorithm.name().into(),
            signature: Vec::new(),
        };
        let digest: [u8; 32] = Sha256::digest(f.message()).into();
        f.signature = key.sign(&digest).to_bytes().to_vec();
        (f, pem)
    }

    #[test]
    fn a_site_takes_only_a_newer_fragment_of_its_key_for_itself_that_leaves_its_pins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealgate.toml");
        std::fs::write(&path, crate::config::tests::GOOD).unwrap();
        let tighter =
            "[[seal]]\nid = \"contract\"\n[[seal.rule]]\nlevels = [\"dept_head\", \"executive\"]\n";
        let (v2, pem) = signed(dir.path(), 1, "site-a", 2, tighter);
        let settings = HqPolicyConfig {
            site: "site-a".into(),
            key_file: pem,
            pinned: vec!["applicant".into()],
        };
        let mut config = Config::load(&path).unwrap();
        assert_eq!(v2.admit(&settings, None, &mut config), Ok(true));
        assert_eq!(config.seals[0].rules[0].levels, ["dept_head", "executive"]);
        // The one in force again: nothing to do. An older or equal other one: refused.
        assert_eq!(v2.admit(&settings, Some(&v2), &mut config), Ok(false));
        let (v1, _) = signed(dir.path(), 1, "site-a", 1, "");
        let (other_v2, _) = signed(dir.path(), 1, "site-a", 2, "");
        for stale in [&v1, &other_v2] {
            let r = stale.admit(&settings, Some(&v2), &mut Config::load(&path).unwrap());
            assert_eq!(r.unwrap_err().code(), "not_newer");
        }
        // Another site's, another key's, a pinned section, a seal the site lacks.
        let (other_site, _) = signed(dir.path(), 1, "site-b", 3, "");
        let (other_key, _) = signed(dir.path(), 2, "site-a", 3, "");
        let (pinned, _) = signed(dir.path(), 1, "site-a", 3, "applicant = []");
        let (unknown, _) = signed(dir.path(), 1, "site-a", 3, "[[seal]]\nid = \"nope\"");
        let (broken, _) = signed(
            dir.path(),
            1,
            "site-a",
            3,
            "[[caller]]\nname = \"x\"\nseals = [\"nope\"]",
        );
        for (f, code) in [
            (&other_site, "other_site"),
            (&other_key, "bad_signature"),
            (&pinned, "pinned"),
            (&unknown, "invalid"),
            (&broken, "invalid"),
        ] {
            let mut fresh = Config::load(&path).unwrap();
            let r = f.admit(&settings, Some(&v2), &mut fresh);
            assert_eq!(r.as_ref().map_err(Refused::code), Err(code), "{r:?}");
        }
        // A signature over another version does not carry over.
        let raised = Fragment {
            version: 9,
            ..v2.clone()
        };
        let r = raised.admit(&settings, Some(&v2), &mut Config::load(&path).unwrap());
        assert_eq!(r.unwrap_err().code(), "bad_signature");
    }

    #[test]
    fn the_signed_message_covers_every_field_but_the_signature() {
        let f = Fragment {
            site: "site-a".into(),
            version: 2,
            issued_at_ms: 1_700_000_000_000,
            body: "[alerts]\nrestamp = true\n".into(),
            key_id: "k".into(),
            algorithm: "ed25519".into(),
            signature: vec![1, 2, 3],
        };
        let m = f.message();
        for changed in [
            Fragment {
                site: "site-b".into(),
                ..f.clone()
            },
            Fragment {
                version: 3,
                ..f.clone()
            },
            Fragment {
                issued_at_ms: 1,
                ..f.clone()
            },
            Fragment {
                body: "[alerts]\nrestamp = false\n".into(),
                ..f.clone()
            },
        ] {
            assert_ne!(changed.message(), m);
        }
        assert_eq!(Fragment::decode(&f.encode()).unwrap(), f);
        assert!(m.starts_with(POLICY_TAG));
    }
}
