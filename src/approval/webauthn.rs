//! Passkeys: an approval signature that is a WebAuthn assertion, verified offline.
//!
//! An approver's passkey (a phone or a security key) signs `authenticatorData ‖
//! SHA-256(clientDataJSON)`; the client data's challenge is the SHA-256 of the approval's JWS
//! signing input ([`Token::challenge`]), so the assertion binds this approver's header and
//! exactly this approval's claims (seal, document, amount, uses, life). The gate checks, in this
//! order: the challenge, the client data's type, its origin, the relying party's id hash, user
//! presence, user verification where the rule asks for it, the signature under the registered
//! key; the signature counter is checked durably by the ledger when the approval is first used.
//!
//! Owns: registered credentials (COSE keys, ES256 and EdDSA), the order of the checks and their
//! reason codes. Never: talks to anything online; trusts the authenticator's flags without its
//! signature over them.

use super::{Denial, Reason};
use crate::token::{Assertion, JwsAlg, Token};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use sha2::Digest;

/// Flags of the authenticator data (WebAuthn §6.1).
const FLAG_UP: u8 = 0x01;
const FLAG_UV: u8 = 0x04;

/// A passkey's public key.
#[derive(Debug, Clone)]
pub enum PasskeyKey {
    Es256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl PasskeyKey {
    /// From a COSE_Key as an authenticator registers it (the credential public key of the
    /// attested credential data): EC2 P-256 with ES256, or OKP Ed25519 with EdDSA.
    pub fn from_cose(bytes: &[u8]) -> Result<PasskeyKey, String> {
        use coset::cbor::value::Value;
        use coset::{iana, CborSerializable, KeyType, Label, RegisteredLabelWithPrivate};
        let key = coset::CoseKey::from_slice(bytes).map_err(|e| format!("not a COSE key: {e}"))?;
        let param = |label: i64| {
            key.params
                .iter()
                .find(|(l, _)| *l == Label::Int(label))
                .map(|(_, v)| v)
        };
        let bytes_of = |label: i64| match param(label) {
            Some(Value::Bytes(b)) => Some(b.as_slice()),
            _ => None,
        };
        let curve = match param(-1) {
            Some(Value::Integer(i)) => i128::from(*i),
            _ => return Err("the COSE key names no curve".into()),
        };
        let alg = |a: iana::Algorithm| key.alg == Some(RegisteredLabelWithPrivate::Assigned(a));
        match key.kty {
            KeyType::Assigned(iana::KeyType::EC2) => {
                if curve != iana::EllipticCurve::P_256 as i128 {
                    return Err(format!("EC2 curve {curve} is not P-256"));
                }
                if key.alg.is_some() && !alg(iana::Algorithm::ES256) {
                    return Err("an EC2 P-256 passkey must be ES256".into());
                }
                let (Some(x), Some(y)) = (bytes_of(-2), bytes_of(-3)) else {
                    return Err("the EC2 key lacks x or y".into());
                };
                if x.len() != 32 || y.len() != 32 {
                    return Err("the EC2 key's x and y must be 32 bytes".into());
                }
                let mut sec1 = vec![0x04];
                sec1.extend_from_slice(x);
                sec1.extend_from_slice(y);
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map(PasskeyKey::Es256)
                    .map_err(|_| "the EC2 key is not a point on P-256".into())
            }
            KeyType::Assigned(iana::KeyType::OKP) => {
                if curve != iana::EllipticCurve::Ed25519 as i128 {
                    return Err(format!("OKP curve {curve} is not Ed25519"));
                }
                if key.alg.is_some()
                    && !alg(iana::Algorithm::EdDSA)
                    && !alg(iana::Algorithm::Ed25519)
                {
                    return Err("an Ed25519 passkey must be EdDSA".into());
                }
                let x: [u8; 32] = bytes_of(-2)
                    .and_then(|x| x.try_into().ok())
                    .ok_or("the OKP key's x must be 32 bytes")?;
                ed25519_dalek::VerifyingKey::from_bytes(&x)
                    .map(PasskeyKey::Ed25519)
                    .map_err(|_| "the OKP key is not an Ed25519 point".into())
            }
            _ => Err("a passkey is an EC2 (ES256) or OKP (EdDSA) key".into()),
        }
    }

    pub fn alg(&self) -> JwsAlg {
        match self {
            PasskeyKey::Es256(_) => JwsAlg::ES256,
            PasskeyKey::Ed25519(_) => JwsAlg::EdDSA,
        }
    }

    /// Whether two keys are the same public key.
    pub fn same_as(&self, other: &PasskeyKey) -> bool {
        match (self, other) {
            (PasskeyKey::Es256(a), PasskeyKey::Es256(b)) => a == b,
            (PasskeyKey::Ed25519(a), PasskeyKey::Ed25519(b)) => a.as_bytes() == b.as_bytes(),
            _ => false,
        }
    }

    /// WebAuthn signatures: ES256 in ASN.1 DER (unlike JWS's r ‖ s), EdDSA as 64 bytes.
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            PasskeyKey::Es256(k) => {
                let point = k.to_encoded_point(false);
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_ASN1,
                    point.as_bytes(),
                )
                .verify(msg, sig)
                .is_ok()
            }
            PasskeyKey::Ed25519(k) => match ed25519_dalek::Signature::from_slice(sig) {
                Ok(s) => k.verify_strict(msg, &s).is_ok(),
                Err(_) => false,
            },
        }
    }
}

/// One registered credential of an approver.
#[derive(Debug, Clone)]
pub struct Passkey {
    pub credential_id: Vec<u8>,
    pub key: PasskeyKey,
    /// The relying party the credential was registered for, e.g. "approvals.example.com".
    pub rp_id: String,
    rp_id_hash: [u8; 32],
    /// The registration's attestation format ("none", "packed", ...), kept for the record.
    pub attestation: String,
}

impl Passkey {
    pub fn new(
        credential_id: Vec<u8>,
        key: PasskeyKey,
        rp_id: String,
        attestation: String,
    ) -> Passkey {
        Passkey {
            rp_id_hash: sha2::Sha256::digest(rp_id.as_bytes()).into(),
            credential_id,
            key,
            rp_id,
            attestation,
        }
    }

    /// The credential id as tokens and records write it (base64url).
    pub fn id_b64(&self) -> String {
        B64.encode(&self.credential_id)
    }
}

/// What a passkey's assertion says once every check passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asserted {
    pub user_verified: bool,
    /// The authenticator's signature counter; 0 from authenticators that keep none.
    pub sign_count: u32,
}

/// The client data fields the checks read (WebAuthn §5.8.1); the approval page's registration
/// reads them too.
#[derive(serde::Deserialize)]
pub struct ClientData {
    #[serde(rename = "type")]
    pub kind: String,
    pub challenge: String,
    pub origin: String,
    #[serde(rename = "crossOrigin", default)]
    pub cross_origin: bool,
}

/// Checks signature `i` of `token`, a WebAuthn assertion by `passkey`, in the order the module
/// documentation gives. `origins` are the pages approvers may approve on; `needs_uv` whether
/// the level this approver fills asks for user verification. `signature_ok` checks the
/// signature itself (the trust store remembers signatures that verified).
pub fn check(
    token: &Token,
    i: usize,
    passkey: &Passkey,
    origins: &[String],
    needs_uv: bool,
    signature_ok: impl FnOnce(&dyn Fn() -> bool) -> bool,
) -> Result<Asserted, Denial> {
    check_with(
        token,
        i,
        &token.challenge(i),
        passkey,
        origins,
        needs_uv,
        signature_ok,
    )
}

/// [`check`] against another challenge than the approval's (a rejection's, see
/// [`Token::rejection_challenge`]).
pub fn check_with(
    token: &Token,
    i: usize,
    challenge: &[u8; 32],
    passkey: &Passkey,
    origins: &[String],
    needs_uv: bool,
    signature_ok: impl FnOnce(&dyn Fn() -> bool) -> bool,
) -> Result<Asserted, Denial> {
    let sig = &token.signatures[i];
    let kid = &sig.header.kid;
    let Some(a) = &sig.assertion else {
        return Err(Denial::new(
            Reason::Malformed,
            format!("the signature of {kid:?} is not a WebAuthn assertion"),
        ));
    };
    check_assertion(
        kid,
        sig.header.alg,
        a,
        &sig.signature,
        challenge,
        passkey,
        origins,
        needs_uv,
        signature_ok,
    )
}

/// The checks of one assertion `a` with `signature`, made by `kid` under `alg`, for
/// `challenge` (an approval's, a rejection's, or a login's at the approval page).
#[allow(clippy::too_many_arguments)]
pub fn check_assertion(
    kid: &str,
    alg: JwsAlg,
    a: &Assertion,
    signature: &[u8],
    challenge: &[u8; 32],
    passkey: &Passkey,
    origins: &[String],
    needs_uv: bool,
    signature_ok: impl FnOnce(&dyn Fn() -> bool) -> bool,
) -> Result<Asserted, Denial> {
    let client: ClientData = serde_json::from_slice(&a.client_data_json).map_err(|e| {
        Denial::new(
            Reason::Malformed,
            format!("the client data of {kid:?}'s assertion: {e}"),
        )
    })?;
    if B64.decode(client.challenge.as_bytes()).ok().as_deref() != Some(&challenge[..]) {
        return Err(Denial::new(
            Reason::WebauthnChallenge,
            format!(
                "the assertion of {kid:?} was made for another approval (its challenge is not this token's)"
            ),
        ));
    }
    if client.kind != "webauthn.get" {
        return Err(Denial::new(
            Reason::WebauthnType,
            format!(
                "the assertion of {kid:?} has client data type {:?}, not \"webauthn.get\"",
                client.kind
            ),
        ));
    }
    if client.cross_origin || !origins.contains(&client.origin) {
        return Err(Denial::new(
            Reason::WebauthnOrigin,
            format!(
                "the assertion of {kid:?} comes from origin {:?}{}, which is not an approval page of this site",
                client.origin,
                if client.cross_origin { " (cross-origin)" } else { "" }
            ),
        ));
    }
    let auth = &a.authenticator_data;
    if auth.len() < 37 {
        return Err(Denial::new(
            Reason::Malformed,
            format!(
                "the authenticator data of {kid:?} is {} bytes; at least 37",
                auth.len()
            ),
        ));
    }
    if auth[..32] != passkey.rp_id_hash {
        return Err(Denial::new(
            Reason::WebauthnRpId,
            format!(
                "the assertion of {kid:?} is for another relying party than {:?}",
                passkey.rp_id
            ),
        ));
    }
    let flags = auth[32];
    if flags & FLAG_UP == 0 {
        return Err(Denial::new(
            Reason::WebauthnUserPresence,
            format!("the authenticator of {kid:?} did not confirm the user's presence"),
        ));
    }
    let user_verified = flags & FLAG_UV != 0;
    if needs_uv && !user_verified {
        return Err(Denial::new(
            Reason::WebauthnUserVerification,
            format!(
                "the level {kid:?} fills requires user verification (fingerprint, face or PIN), and the authenticator did not verify the user"
            ),
        ));
    }
    let verify = || {
        if alg != passkey.key.alg() {
            return false;
        }
        let mut msg = Vec::with_capacity(auth.len() + 32);
        msg.extend_from_slice(auth);
        msg.extend_from_slice(&sha2::Sha256::digest(&a.client_data_json));
        passkey.key.verify(&msg, signature)
    };
    if !signature_ok(&verify) {
        return Err(Denial::new(
            Reason::BadSignature,
            format!("the passkey signature of {kid:?} does not verify"),
        ));
    }
    Ok(Asserted {
        user_verified,
        sign_count: u32::from_be_bytes(auth[33..37].try_into().expect("4 bytes")),
    })
}

#[cfg(test)]
mod tests {
    //! Vectors made by tests/python/webauthn_vectors.py with the `fido2` package's WebAuthn
    //! structures and `cryptography`'s keys, independently of this code.
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vectors {
        rp_id: String,
        origin: String,
        passkeys: Vec<Key>,
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Key {
        credential_id: String,
        cose_key: String,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        token: String,
        passkey: usize,
        needs_uv: bool,
        /// The reason code expected, or "ok".
        expect: String,
        #[serde(default)]
        sign_count: u32,
    }

    fn vectors() -> Vectors {
        serde_json::from_str(include_str!("../../tests/vectors/webauthn.json")).unwrap()
    }

    fn passkeys(v: &Vectors) -> Vec<Passkey> {
        v.passkeys
            .iter()
            .map(|k| {
                Passkey::new(
                    B64.decode(&k.credential_id).unwrap(),
                    PasskeyKey::from_cose(&B64.decode(&k.cose_key).unwrap()).unwrap(),
                    v.rp_id.clone(),
                    "none".into(),
                )
            })
            .collect()
    }

    #[test]
    fn every_vector_gets_its_reason() {
        let v = vectors();
        let keys = passkeys(&v);
        assert!(v.cases.len() >= 10, "the vectors cover every check");
        for c in &v.cases {
            let token = Token::parse(c.token.as_bytes())
                .unwrap_or_else(|e| panic!("{}: the token does not parse: {e}", c.name));
            let got = check(
                &token,
                0,
                &keys[c.passkey],
                std::slice::from_ref(&v.origin),
                c.needs_uv,
                |f| f(),
            );
            match (&got, c.expect.as_str()) {
                (Ok(a), "ok") => assert_eq!(a.sign_count, c.sign_count, "{}", c.name),
                (Err(d), want) => assert_eq!(d.reason.code(), want, "{}: {d}", c.name),
                (Ok(_), want) => panic!("{}: passed, expected {want}", c.name),
            }
        }
    }

    #[test]
    fn cose_keys_of_both_kinds_parse_and_others_are_refused() {
        let v = vectors();
        let keys = passkeys(&v);
        assert!(keys.iter().any(|k| matches!(k.key, PasskeyKey::Es256(_))));
        assert!(keys.iter().any(|k| matches!(k.key, PasskeyKey::Ed25519(_))));
        for junk in [&b""[..], b"\xa0", b"\xa1\x01\x02", b"not cbor"] {
            assert!(PasskeyKey::from_cose(junk).is_err());
        }
    }

    #[test]
    fn the_signature_check_is_the_callers_to_remember() {
        let v = vectors();
        let keys = passkeys(&v);
        let good = v.cases.iter().find(|c| c.expect == "ok").unwrap();
        let token = Token::parse(good.token.as_bytes()).unwrap();
        let origins = [v.origin.clone()];
        // A remembered success skips the arithmetic; a refusal is a bad signature.
        assert!(check(&token, 0, &keys[good.passkey], &origins, false, |_| true).is_ok());
        let d = check(&token, 0, &keys[good.passkey], &origins, false, |_| false).unwrap_err();
        assert_eq!(d.reason, Reason::BadSignature);
    }
}
