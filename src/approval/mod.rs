//! Approvals: is this stamp backed by valid, signed approval that satisfies the seal's policy?
//!
//! Owns: the trust store of approvers, the checks that need only the token, the request and
//! the clock ([`evaluate`]), TOTP for applicants ([`mfa`]) and the durable replay ledger
//! ([`ledger`]). The refusal reasons are [`crate::denial`]'s.
//! Never: takes a role or a department from a token; those come from the trust store. Never
//! logs a token, a TOTP code or a TOTP secret.

pub mod gate;
pub mod ledger;
pub mod mfa;
pub mod webauthn;

pub use crate::denial::{Denial, Reason};

use crate::policy::{ApprovalFact, PasskeyFact, SealPolicy};
use crate::token::{Token, VerifyingKey};
use std::collections::HashMap;
use std::path::Path;

/// Faults that stop an approval from being checked at all (as opposed to a [`Denial`]).
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Device(#[from] crate::device::DeviceError),
    #[error("{0}")]
    Invalid(String),
}

/// The form in which people's ids are compared: Unicode NFKC, lower case, with no control,
/// format (zero-width, bidirectional) or white-space characters, and not empty. So
/// `Zhang.Wei`, `zhang.wei ` and `zhang\u{200b}.wei` are refused or are one person, never two.
pub fn normalize_id(id: &str) -> Result<String, String> {
    use unicode_normalization::UnicodeNormalization;
    let n: String = id.nfkc().flat_map(char::to_lowercase).collect();
    let n: String = n.nfkc().collect();
    if n.is_empty() {
        return Err("an id must not be empty".into());
    }
    if let Some(c) = n.chars().find(|c| invisible(*c)) {
        return Err(format!(
            "id {id:?} holds the invisible or control character U+{:04X}",
            c as u32
        ));
    }
    Ok(n)
}

/// Characters that do not show, or change what is around them: controls, white space, and
/// the format characters (zero-width spaces and joiners, direction marks, the BOM, tags).
fn invisible(c: char) -> bool {
    c.is_control()
        || c.is_whitespace()
        || matches!(c as u32,
            0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180B..=0x180F
            | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
            | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFFB | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF)
}

/// Accepted clock difference between approvers' machines and this one, in seconds.
pub const CLOCK_SKEW: i64 = 60;

/// An approver in the trust store.
#[derive(Debug, Clone)]
pub struct Approver {
    pub id: String,
    pub name: String,
    pub role: String,
    pub department: String,
    /// The approver's JWS key, if they have one...
    pub key: Option<VerifyingKey>,
    /// ...and their passkeys (at least one of the two).
    pub passkeys: Vec<webauthn::Passkey>,
    pub valid_from: Option<i64>,
    pub valid_until: Option<i64>,
    pub revoked: bool,
    /// `name` in normal form ([`normalize_id`]); None when there is no name. The id itself is
    /// required in normal form.
    pub normal_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("approver {id:?}: {detail}")]
pub struct TrustError {
    pub id: String,
    pub detail: String,
}

/// The approvers this daemon trusts, by id.
#[derive(Debug, Default, Clone)]
pub struct TrustStore {
    approvers: HashMap<String, Approver>,
    /// The applicant directory (normalised id to department); empty when not configured.
    applicants: HashMap<String, String>,
    /// Origins of the approval pages whose passkey assertions count (`[webauthn] origins`).
    origins: Vec<String>,
    /// Fingerprints of signatures that verified under these approvers' keys (see
    /// [`Token::signature_fingerprint`]). A standing approval with many uses is verified once,
    /// not on every use; what changes between uses (time, validity, remaining uses) is checked
    /// every time. A reload builds a new trust store, so a changed key starts with no entries.
    verified: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>>,
}

/// Verified signatures remembered at most; the set is emptied when it is full.
const VERIFIED_CACHE: usize = 65_536;

impl TrustStore {
    pub fn from_config(
        approvers: &[crate::config::ApproverConfig],
        base: &Path,
    ) -> Result<TrustStore, TrustError> {
        TrustStore::with_applicants(approvers, &[], None, base)
    }

    /// The trust store with the applicant directory and the approval pages' origins.
    pub fn with_applicants(
        approvers: &[crate::config::ApproverConfig],
        applicants: &[crate::config::ApplicantConfig],
        webauthn: Option<&crate::config::WebauthnConfig>,
        base: &Path,
    ) -> Result<TrustStore, TrustError> {
        let mut map = HashMap::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        for a in approvers {
            let err = |detail: String| TrustError {
                id: a.id.clone(),
                detail,
            };
            match normalize_id(&a.id) {
                Ok(n) if n == a.id => {}
                Ok(n) => return Err(err(format!("write the id in its normal form, {n:?}"))),
                Err(e) => return Err(err(e)),
            }
            let normal_name = if a.name.is_empty() {
                None
            } else {
                Some(normalize_id(&a.name).map_err(|e| err(format!("name: {e}")))?)
            };
            let pem = match (&a.public_key, &a.public_key_file) {
                (Some(p), None) => Some(p.clone()),
                (None, Some(f)) => {
                    let path = if f.is_relative() {
                        base.join(f)
                    } else {
                        f.clone()
                    };
                    Some(
                        std::fs::read_to_string(&path)
                            .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?,
                    )
                }
                (None, None) if !a.passkeys.is_empty() => None,
                _ => {
                    return Err(err(
                        "needs exactly one of public_key and public_key_file, or a passkey".into(),
                    ))
                }
            };
            let key = pem
                .map(|p| VerifyingKey::from_pem(&p))
                .transpose()
                .map_err(err)?;
            let passkeys = passkeys_of(a, webauthn).map_err(err)?;
            let time = |s: &Option<String>| -> Result<Option<i64>, TrustError> {
                s.as_deref()
                    .map(|s| {
                        s.parse::<jiff::Timestamp>()
                            .map(|t| t.as_second())
                            .map_err(|e| err(format!("time {s:?}: {e}")))
                    })
                    .transpose()
            };
            let approver = Approver {
                id: a.id.clone(),
                name: a.name.clone(),
                role: a.role.clone(),
                department: a.department.clone(),
                key,
                passkeys,
                valid_from: time(&a.valid_from)?,
                valid_until: time(&a.valid_until)?,
                revoked: a.revoked,
                normal_name,
            };
            // One key is one person: two living entries with it would let one person fill two
            // levels, or approve their own application under the second id. An entry that is
            // revoked or whose validity has ended can sign nothing and does not count.
            let alive = |x: &Approver| !x.revoked && x.valid_until.is_none_or(|u| u >= now);
            if alive(&approver) {
                if let Some((other, what)) = map
                    .values()
                    .filter(|o: &&Approver| alive(o))
                    .find_map(|o| shares_a_key(o, &approver).map(|w| (o, w)))
                {
                    return Err(err(format!(
                        "has the same {what} as approver {:?}; one key belongs to one person",
                        other.id
                    )));
                }
            }
            if map.insert(a.id.clone(), approver).is_some() {
                return Err(err("defined twice".into()));
            }
        }
        let mut directory = HashMap::new();
        for p in applicants {
            let err = |detail: String| TrustError {
                id: p.id.clone(),
                detail: format!("applicant: {detail}"),
            };
            let id = normalize_id(&p.id).map_err(err)?;
            if directory.insert(id, p.department.clone()).is_some() {
                return Err(err("listed twice".into()));
            }
        }
        Ok(TrustStore {
            approvers: map,
            applicants: directory,
            origins: webauthn.map(|w| w.origins.clone()).unwrap_or_default(),
            verified: Default::default(),
        })
    }

    pub fn get(&self, id: &str) -> Option<&Approver> {
        self.approvers.get(id)
    }

    /// The approval pages' origins (`[webauthn] origins`).
    pub fn origins(&self) -> &[String] {
        &self.origins
    }

    /// Whether signature `i` of `token` verifies under `approver`'s key, remembering a success.
    fn verify(&self, token: &Token, i: usize, approver: &Approver) -> bool {
        match &approver.key {
            Some(key) => self.remembered(token, i, || token.verify(i, key)),
            None => false,
        }
    }

    /// Whether signature `i` verified before (under this trust store), or verifies now by
    /// `verify`; a success is remembered.
    fn remembered(&self, token: &Token, i: usize, verify: impl FnOnce() -> bool) -> bool {
        let fingerprint = token.signature_fingerprint(i);
        let seen = |set: &std::collections::HashSet<[u8; 32]>| set.contains(&fingerprint);
        if seen(&self.verified.lock().unwrap_or_else(|p| p.into_inner())) {
            return true;
        }
        if !verify() {
            return false;
        }
        let mut set = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= VERIFIED_CACHE {
            set.clear();
        }
        set.insert(fingerprint);
        true
    }
}

/// An approver's passkeys from the configuration; they need `[webauthn]` origins.
fn passkeys_of(
    a: &crate::config::ApproverConfig,
    webauthn: Option<&crate::config::WebauthnConfig>,
) -> Result<Vec<webauthn::Passkey>, String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    if !a.passkeys.is_empty() && webauthn.is_none_or(|w| w.origins.is_empty()) {
        return Err("has a passkey, but no [webauthn] origins say where approvals are made".into());
    }
    let mut out: Vec<webauthn::Passkey> = Vec::new();
    for p in &a.passkeys {
        let id = B64
            .decode(p.credential_id.trim_end_matches('='))
            .map_err(|_| {
                format!(
                    "passkey {:?}: credential_id is not base64url",
                    p.credential_id
                )
            })?;
        if id.is_empty() || id.len() > 1023 {
            return Err(format!(
                "passkey {:?}: a credential id is 1 to 1023 bytes",
                p.credential_id
            ));
        }
        let cose = B64
            .decode(p.public_key.trim_end_matches('='))
            .map_err(|_| format!("passkey {:?}: public_key is not base64url", p.credential_id))?;
        let key = webauthn::PasskeyKey::from_cose(&cose)
            .map_err(|e| format!("passkey {:?}: {e}", p.credential_id))?;
        if p.rp_id.is_empty() {
            return Err(format!(
                "passkey {:?}: rp_id must not be empty",
                p.credential_id
            ));
        }
        if out.iter().any(|o| o.credential_id == id) {
            return Err(format!("passkey {:?} is listed twice", p.credential_id));
        }
        out.push(webauthn::Passkey::new(
            id,
            key,
            p.rp_id.clone(),
            p.attestation.clone(),
        ));
    }
    Ok(out)
}

/// What two approvers share, if anything: a JWS key, a passkey's credential id or its key.
fn shares_a_key(a: &Approver, b: &Approver) -> Option<&'static str> {
    if matches!((&a.key, &b.key), (Some(x), Some(y)) if x.same_as(y)) {
        return Some("public key");
    }
    a.passkeys
        .iter()
        .any(|p| {
            b.passkeys
                .iter()
                .any(|q| p.credential_id == q.credential_id || p.key.same_as(&q.key))
        })
        .then_some("passkey")
}

/// What the checks that need no state found.
pub struct Evaluation {
    /// The parsed token, when it parsed.
    pub token: Option<Token>,
    /// Index of the policy rule that matched.
    pub rule: Option<usize>,
    pub denials: Vec<Denial>,
    /// The signatures that verified, with roles and departments from the trust store.
    pub approvals: Vec<ApprovalFact>,
    /// The applicant in normal form (see [`normalize_id`]): what rate limits, the replay
    /// ledger and TOTP key on.
    pub applicant: String,
}

/// Checks a token against the request, the trust store, the seal's policy and the clock.
/// Every applicable reason is collected (for `sealctl token check`); a stamp is refused on the
/// first. State (replays, rate limits, TOTP) is checked elsewhere.
pub fn evaluate(
    token_bytes: &[u8],
    seal_id: &str,
    digest: &[u8; 32],
    now: i64,
    trust: &TrustStore,
    policy: &SealPolicy,
) -> Evaluation {
    match Token::parse(token_bytes) {
        Ok(token) => evaluate_token(token, seal_id, digest, now, trust, policy),
        Err(e) => Evaluation {
            token: None,
            rule: None,
            denials: vec![Denial::new(Reason::Malformed, e.0)],
            approvals: Vec::new(),
            applicant: String::new(),
        },
    }
}

/// [`evaluate`] of a token already parsed (an application's, which may carry no signature
/// yet: it is parsed by [`Token::parse_for_signing`]).
pub fn evaluate_token(
    token: Token,
    seal_id: &str,
    digest: &[u8; 32],
    now: i64,
    trust: &TrustStore,
    policy: &SealPolicy,
) -> Evaluation {
    let mut denials = Vec::new();
    let c = &token.claims;
    let applicant = match normalize_id(&c.applicant) {
        Ok(a) => a,
        Err(e) => {
            denials.push(Denial::new(Reason::Malformed, format!("applicant: {e}")));
            c.applicant.clone()
        }
    };
    // An applicant who is an approver, by id or by name, in any spelling.
    let applicant_approves =
        |a: &Approver| a.id == applicant || a.normal_name.as_deref() == Some(applicant.as_str());

    // The rule is found from the claims alone; a passkey's approval needs it to know whether
    // its level asks for user verification.
    let matched = policy.match_rule(c);
    let rule_of = matched.as_ref().ok().map(|i| &policy.rules[*i]);

    // Signatures: every one must verify; a token with a bad signature is refused whole.
    let mut approvals = Vec::new();
    let mut seen = HashMap::new();
    for (i, sig) in token.signatures.iter().enumerate() {
        let kid = &sig.header.kid;
        let Some(approver) = trust.get(kid) else {
            denials.push(Denial::new(
                Reason::UnknownApprover,
                format!("no approver {kid:?} in the trust store"),
            ));
            continue;
        };
        let passkey = match &sig.assertion {
            None => {
                if !trust.verify(&token, i, approver) {
                    denials.push(Denial::new(
                        Reason::BadSignature,
                        format!("the signature of {kid:?} does not verify"),
                    ));
                    continue;
                }
                None
            }
            Some(a) => {
                let Some(p) = approver
                    .passkeys
                    .iter()
                    .find(|p| p.credential_id == a.credential_id)
                else {
                    denials.push(Denial::new(
                        Reason::UnknownCredential,
                        format!("approver {kid:?} has registered no such passkey"),
                    ));
                    continue;
                };
                let needs_uv = rule_of.is_some_and(|r| r.needs_user_verification(&approver.role));
                match webauthn::check(&token, i, p, &trust.origins, needs_uv, |f| {
                    trust.remembered(&token, i, f)
                }) {
                    Ok(asserted) => Some(PasskeyFact {
                        credential: p.id_b64(),
                        user_verified: asserted.user_verified,
                        sign_count: asserted.sign_count,
                    }),
                    Err(d) => {
                        denials.push(d);
                        continue;
                    }
                }
            }
        };
        let at = sig.header.approved_at;
        if approver.revoked {
            denials.push(Denial::new(
                Reason::ApproverRevoked,
                format!("approver {kid:?} is revoked"),
            ));
            continue;
        }
        let active = |t: i64| {
            approver.valid_from.is_none_or(|f| t >= f)
                && approver.valid_until.is_none_or(|u| t <= u)
        };
        if !active(at) || !active(now) {
            denials.push(Denial::new(
                Reason::ApproverRevoked,
                format!("approver {kid:?} is outside their validity window"),
            ));
            continue;
        }
        if at > now.saturating_add(CLOCK_SKEW)
            || at.saturating_add(CLOCK_SKEW) < c.iat
            || at > c.exp
        {
            denials.push(Denial::new(
                Reason::Malformed,
                format!("approval time of {kid:?} is outside the token's life"),
            ));
            continue;
        }
        if applicant_approves(approver) {
            denials.push(Denial::new(
                Reason::SelfApproval,
                format!(
                    "applicant {:?} is approver {kid:?}, who approved their own request",
                    c.applicant
                ),
            ));
            continue;
        }
        if seen.insert(kid.clone(), ()).is_some() {
            denials.push(Denial::new(
                Reason::DuplicateApprover,
                format!("{kid:?} signed more than once"),
            ));
            continue;
        }
        approvals.push(ApprovalFact {
            approver: kid.clone(),
            role: approver.role.clone(),
            department: approver.department.clone(),
            approved_at: at,
            passkey,
        });
    }

    if !trust.applicants.is_empty() {
        match trust.applicants.get(&applicant) {
            None => denials.push(Denial::new(
                Reason::UnknownApplicant,
                format!(
                    "applicant {:?} is not in the applicant directory",
                    c.applicant
                ),
            )),
            Some(dept) if *dept != c.dept => denials.push(Denial::new(
                Reason::DepartmentMismatch,
                format!(
                    "applicant {:?} belongs to department {dept:?}, not {:?}",
                    c.applicant, c.dept
                ),
            )),
            Some(_) => {}
        }
    }
    if now > c.exp.saturating_add(CLOCK_SKEW) {
        denials.push(Denial::new(
            Reason::Expired,
            format!("expired at {}", c.exp),
        ));
    }
    if now.saturating_add(CLOCK_SKEW) < c.nbf {
        denials.push(Denial::new(
            Reason::NotYetValid,
            format!("valid from {}", c.nbf),
        ));
    }
    if c.seal != seal_id {
        denials.push(Denial::new(
            Reason::SealMismatch,
            format!("token is for seal {:?}, not {seal_id:?}", c.seal),
        ));
    }
    if c.doc.sha256 != hex::encode(digest) {
        denials.push(Denial::new(
            Reason::DigestMismatch,
            "the token approves another document",
        ));
    }

    let lifetime = c.exp.saturating_sub(c.iat.min(c.nbf));
    if lifetime > policy.limits.max_lifetime_seconds {
        denials.push(Denial::new(
            Reason::Malformed,
            format!(
                "the approval is valid for {lifetime} s; seal {seal_id:?} accepts at most {} s",
                policy.limits.max_lifetime_seconds
            ),
        ));
    }
    if c.uses > policy.limits.max_uses {
        denials.push(Denial::new(
            Reason::Malformed,
            format!(
                "the approval grants {} uses; seal {seal_id:?} accepts at most {}",
                c.uses, policy.limits.max_uses
            ),
        ));
    }

    let rule = match matched {
        Err(why) => {
            denials.push(Denial::new(
                Reason::NoRule,
                format!("seal {seal_id:?}: {why}"),
            ));
            None
        }
        Ok(i) => {
            let r = &policy.rules[i];
            denials.extend(r.check_levels(c, &approvals));
            if let Some(d) = r.check_hours(now) {
                denials.push(d);
            }
            Some(i)
        }
    };
    Evaluation {
        token: Some(token),
        rule,
        denials,
        approvals,
        applicant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Claims, DocClaim, SigningKey, Token};

    fn approver(key: &SigningKey) -> Approver {
        Approver {
            id: "a".into(),
            name: String::new(),
            role: "dept_head".into(),
            department: "sales".into(),
            key: Some(key.verifying_key()),
            passkeys: Vec::new(),
            valid_from: None,
            valid_until: None,
            revoked: false,
            normal_name: None,
        }
    }

    fn token(key: &SigningKey) -> Token {
        let mut t = Token::unsigned(Claims {
            jti: "t".into(),
            seal: "s".into(),
            doc: DocClaim {
                sha256: "ab".repeat(32),
                doc_type: "contract".into(),
                title: None,
                sha512: None,
                placement: None,
            },
            amount: None,
            dept: "sales".into(),
            scope: String::new(),
            applicant: "z".into(),
            purpose: String::new(),
            iat: 1000,
            nbf: 1000,
            exp: 2000,
            uses: 100,
        });
        t.add_signature(key, "a", 1100);
        t
    }

    #[test]
    fn one_passkey_belongs_to_one_person() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/vectors/webauthn.json")).unwrap();
        let (id, key) = (
            v["passkeys"][0]["credential_id"].as_str().unwrap(),
            v["passkeys"][0]["cose_key"].as_str().unwrap(),
        );
        #[derive(serde::Deserialize)]
        struct File {
            approver: Vec<crate::config::ApproverConfig>,
        }
        let entry = |who: &str, cred: &str| {
            format!("[[approver]]\nid = \"{who}\"\nrole = \"r\"\n[[approver.passkey]]\ncredential_id = \"{cred}\"\npublic_key = \"{key}\"\nrp_id = \"rp\"\n")
        };
        let origins = crate::config::WebauthnConfig {
            origins: vec!["https://rp".into()],
        };
        let build = |text: String, w: Option<&crate::config::WebauthnConfig>| {
            let f: File = toml::from_str(&text).unwrap();
            TrustStore::with_applicants(&f.approver, &[], w, Path::new("/"))
        };
        assert!(build(entry("a", id), Some(&origins)).is_ok());
        let e = build(entry("a", id), None).unwrap_err();
        assert!(e.detail.contains("[webauthn]"), "{e}");
        // The same credential, or the same key under another credential id.
        for other in [id, "b3RoZXI"] {
            let e = build(entry("a", id) + &entry("b", other), Some(&origins)).unwrap_err();
            assert!(e.detail.contains("same passkey as approver"), "{e}");
        }
    }

    #[test]
    fn ids_are_compared_in_one_normal_form() {
        for same in ["zhang.wei", "Zhang.Wei", "ZHANG.WEI", "ｚｈａｎｇ．ｗｅｉ"] {
            assert_eq!(normalize_id(same).unwrap(), "zhang.wei", "{same:?}");
        }
        for bad in [
            "",
            " ",
            "zhang.wei ",
            "zhang\u{200b}.wei",
            "\u{202e}zhang",
            "zhang\nwei",
            "zh\u{ad}ang",
        ] {
            assert!(normalize_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize_id("张伟").unwrap(), "张伟");
    }

    #[test]
    fn a_verified_signature_is_remembered_and_a_forged_one_is_not() {
        let key = SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[4; 32]));
        let a = approver(&key);
        let trust = TrustStore::default();
        let good = token(&key);
        assert!(trust.verify(&good, 0, &a));
        assert_eq!(trust.verified.lock().unwrap().len(), 1);
        // Verified again from memory.
        assert!(trust.verify(&good, 0, &a));
        // The same header and payload with other signature bytes still fails.
        let mut forged = Token::parse(good.to_json().as_bytes()).unwrap();
        forged.signatures[0].signature[5] ^= 0x40;
        assert!(!trust.verify(&forged, 0, &a));
        assert_eq!(trust.verified.lock().unwrap().len(), 1);
        // Another trust store (a reload) remembers nothing.
        let other_key = SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
        assert!(!TrustStore::default().verify(&good, 0, &approver(&other_key)));
    }
}
