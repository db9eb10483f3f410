//! Approval tokens: JWS (RFC 7515) in the general JSON serialization, one signature per
//! approver over the same payload; the flattened and compact serializations are accepted as the
//! one-signature case.
//!
//! Owns: parsing the envelope and the claims, the signing input, verifying each signature with
//! the approver's key (Ed25519 or P-256; the arithmetic is ed25519-dalek's and p256's), and
//! building tokens for sealctl and the tests.
//! Never: trusts anything in a token about who an approver is; roles and departments come from
//! the trust store.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// Largest token accepted, in bytes; a token is a few hundred bytes per approver.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Most signatures one token may carry.
pub const MAX_SIGNATURES: usize = 16;
/// Protected-header parameters this implementation understands, and so may be listed in `crit`.
const UNDERSTOOD_CRITICAL: &[&str] = &["approved_at", "webauthn"];

/// Signature algorithms approvers may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwsAlg {
    EdDSA,
    ES256,
}

/// The claims of an approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub jti: String,
    pub seal: String,
    pub doc: DocClaim,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Amount>,
    pub dept: String,
    #[serde(default)]
    pub scope: String,
    pub applicant: String,
    #[serde(default)]
    pub purpose: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    #[serde(default = "one")]
    pub uses: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocClaim {
    /// SHA-256 of the document, 64 lowercase hex digits.
    pub sha256: String,
    #[serde(rename = "type")]
    pub doc_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// SHA-512 of the same document, 128 lowercase hex digits: what an Ed25519 CMS signature's
    /// message digest must be (RFC 8419); optional otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha512: Option<String>,
    /// For a PDF: where its visible seal sits in the prepared document whose ByteRange digest
    /// `sha256` is. A PAdES stamp needs it; the audit record keeps it, and `sealctl verify`
    /// compares the signature's widget with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// A visible seal's place on a page: the signature field's name, the page (from 1) and the
/// widget's rectangle in PDF points, lower-left x and y, upper-right x and y.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub field: String,
    pub page: u32,
    pub rect: [i64; 4],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Amount {
    /// Integer minor units (fen, cents).
    pub value: i64,
    /// ISO 4217 code, e.g. "CNY".
    pub currency: String,
}

/// A protected header as sealgate writes and reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub alg: JwsAlg,
    pub kid: String,
    /// When this approver approved, Unix seconds.
    pub approved_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    /// For a passkey's approval: the WebAuthn credential id (base64url) whose assertion is the
    /// signature. It changes what the signature is, so it must be listed in `crit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webauthn: Option<String>,
}

/// What a WebAuthn assertion carries beside its signature: the authenticator's data and the
/// client's data, exactly as the authenticator and the browser made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    pub credential_id: Vec<u8>,
    pub authenticator_data: Vec<u8>,
    pub client_data_json: Vec<u8>,
}

/// One signature of a parsed token, not yet verified.
#[derive(Debug, Clone)]
pub struct Signature {
    pub header: Header,
    /// The protected header exactly as sent (base64url), part of the signing input.
    protected_b64: String,
    pub signature: Vec<u8>,
    /// Set when the signature is a WebAuthn assertion's (see [`Header::webauthn`]).
    pub assertion: Option<Assertion>,
}

/// A parsed token: claims and signatures. Nothing in it is trusted until verified.
#[derive(Debug, Clone)]
pub struct Token {
    pub claims: Claims,
    payload_b64: String,
    pub signatures: Vec<Signature>,
}

/// Why a token could not be parsed. All of these are reason `malformed`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ParseError(pub String);

fn perr<T>(m: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(m.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GeneralJson {
    payload: String,
    signatures: Vec<SignatureJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlattenedJson {
    payload: String,
    protected: String,
    signature: String,
    #[serde(default)]
    header: Option<serde_json::Value>,
    #[serde(rename = "authenticatorData", default)]
    authenticator_data: Option<String>,
    #[serde(rename = "clientDataJSON", default)]
    client_data_json: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureJson {
    protected: String,
    signature: String,
    /// Unprotected header: accepted for interoperability, never read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<serde_json::Value>,
    /// A WebAuthn assertion's authenticator data and client data (base64url); both or none.
    #[serde(
        rename = "authenticatorData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    authenticator_data: Option<String>,
    #[serde(
        rename = "clientDataJSON",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    client_data_json: Option<String>,
}

/// One signature entry as sent: protected header, signature, and a WebAuthn assertion's two
/// other parts (base64url) when it is one.
struct RawSignature {
    protected: String,
    signature: String,
    authenticator_data: Option<String>,
    client_data_json: Option<String>,
}

impl From<SignatureJson> for RawSignature {
    fn from(s: SignatureJson) -> RawSignature {
        RawSignature {
            protected: s.protected,
            signature: s.signature,
            authenticator_data: s.authenticator_data,
            client_data_json: s.client_data_json,
        }
    }
}

/// RFC 7797's `b64` changes what is signed; this implementation does not support it, so a
/// header that names it, protected or not, makes the token malformed.
fn no_b64(header: Option<&serde_json::Value>) -> Result<(), ParseError> {
    if header.is_some_and(|h| h.get("b64").is_some()) {
        return perr("the b64 header parameter (RFC 7797) is not supported");
    }
    Ok(())
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, ParseError> {
    B64.decode(s)
        .map_err(|_| ParseError(format!("{field} is not base64url")))
}

impl Token {
    /// Parses a token in any of the three serializations. Bounded: size, signature count, and
    /// JSON nesting (serde_json refuses nesting deeper than 128).
    pub fn parse(bytes: &[u8]) -> Result<Token, ParseError> {
        if bytes.len() > MAX_TOKEN_BYTES {
            return perr(format!(
                "token is {} bytes; at most {MAX_TOKEN_BYTES} are accepted",
                bytes.len()
            ));
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ParseError("token is not UTF-8".into()))?
            .trim();
        if text.is_empty() {
            return perr("no approval token");
        }
        let (payload_b64, sigs): (String, Vec<RawSignature>) = if text.starts_with('{') {
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| ParseError(format!("token is not JSON: {e}")))?;
            if value.get("signatures").is_some() {
                let g: GeneralJson = serde_json::from_value(value)
                    .map_err(|e| ParseError(format!("not a general JWS: {e}")))?;
                for s in &g.signatures {
                    no_b64(s.header.as_ref())?;
                }
                (
                    g.payload,
                    g.signatures.into_iter().map(RawSignature::from).collect(),
                )
            } else {
                let f: FlattenedJson = serde_json::from_value(value)
                    .map_err(|e| ParseError(format!("not a flattened JWS: {e}")))?;
                no_b64(f.header.as_ref())?;
                (
                    f.payload,
                    vec![RawSignature {
                        protected: f.protected,
                        signature: f.signature,
                        authenticator_data: f.authenticator_data,
                        client_data_json: f.client_data_json,
                    }],
                )
            }
        } else {
            let parts: Vec<&str> = text.split('.').collect();
            let [protected, payload, signature] = parts.as_slice() else {
                return perr("a compact JWS has three dot-separated parts");
            };
            (
                payload.to_string(),
                vec![RawSignature {
                    protected: protected.to_string(),
                    signature: signature.to_string(),
                    authenticator_data: None,
                    client_data_json: None,
                }],
            )
        };
        if sigs.is_empty() {
            return perr("token carries no signature");
        }
        Token::assemble(payload_b64, sigs)
    }

    /// Decodes the claims and each signature's protected header. Bounded in signature count.
    fn assemble(payload_b64: String, sigs: Vec<RawSignature>) -> Result<Token, ParseError> {
        if sigs.len() > MAX_SIGNATURES {
            return perr(format!(
                "token carries {} signatures; at most {MAX_SIGNATURES}",
                sigs.len()
            ));
        }
        let payload = b64("payload", &payload_b64)?;
        let claims: Claims =
            serde_json::from_slice(&payload).map_err(|e| ParseError(format!("claims: {e}")))?;
        check_claims(&claims)?;
        let mut signatures = Vec::with_capacity(sigs.len());
        for raw_sig in sigs {
            let protected_b64 = raw_sig.protected;
            let raw = b64("protected header", &protected_b64)?;
            let value: serde_json::Value = serde_json::from_slice(&raw)
                .map_err(|e| ParseError(format!("protected header: {e}")))?;
            no_b64(Some(&value))?;
            let header: Header = serde_json::from_value(value)
                .map_err(|e| ParseError(format!("protected header: {e}")))?;
            if let Some(crit) = &header.crit {
                if crit.is_empty() {
                    return perr("crit must not be empty");
                }
                for c in crit {
                    if !UNDERSTOOD_CRITICAL.contains(&c.as_str()) {
                        return perr(format!("unknown critical header parameter {c:?}"));
                    }
                }
            }
            let assertion = match (
                &header.webauthn,
                raw_sig.authenticator_data,
                raw_sig.client_data_json,
            ) {
                (None, None, None) => None,
                (Some(id), Some(auth), Some(client)) => {
                    if !header
                        .crit
                        .as_ref()
                        .is_some_and(|c| c.iter().any(|p| p == "webauthn"))
                    {
                        return perr("a WebAuthn signature must list \"webauthn\" in crit");
                    }
                    Some(Assertion {
                        credential_id: b64("webauthn credential id", id)?,
                        authenticator_data: b64("authenticatorData", &auth)?,
                        client_data_json: b64("clientDataJSON", &client)?,
                    })
                }
                _ => {
                    return perr(
                        "a WebAuthn signature carries the webauthn header, authenticatorData and clientDataJSON together (in a JSON serialization)",
                    )
                }
            };
            signatures.push(Signature {
                header,
                protected_b64,
                signature: b64("signature", &raw_sig.signature)?,
                assertion,
            });
        }
        Ok(Token {
            claims,
            payload_b64,
            signatures,
        })
    }

    /// A token with these claims and no signature yet.
    pub fn unsigned(claims: Claims) -> Token {
        let payload = serde_json::to_vec(&claims).expect("claims serialize");
        Token {
            claims,
            payload_b64: B64.encode(payload),
            signatures: Vec::new(),
        }
    }

    /// Adds one approver's signature.
    pub fn add_signature(&mut self, key: &SigningKey, kid: &str, approved_at: i64) {
        self.add_signature_with(key.alg(), kid, approved_at, |input| Ok(key.sign(input)))
            .expect("in-memory signing cannot fail");
    }

    /// Adds one approver's signature made by `sign` over the JWS signing input (for keys held
    /// elsewhere, e.g. in a PKCS#11 token). ES256 signatures must be r || s.
    pub fn add_signature_with(
        &mut self,
        alg: JwsAlg,
        kid: &str,
        approved_at: i64,
        sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
    ) -> Result<(), String> {
        let header = Header {
            alg,
            kid: kid.to_owned(),
            approved_at,
            crit: None,
            typ: None,
            webauthn: None,
        };
        let protected_b64 = B64.encode(serde_json::to_vec(&header).expect("header serializes"));
        let input = signing_input(&protected_b64, &self.payload_b64);
        let signature = sign(input.as_bytes())?;
        self.signatures.push(Signature {
            header,
            protected_b64,
            signature,
            assertion: None,
        });
        Ok(())
    }

    /// Adds one approver's WebAuthn assertion. `assert` gets the challenge (the SHA-256 of the
    /// JWS signing input, see [`Token::challenge`]) and returns the authenticator data, the
    /// client data JSON and the signature, as a browser's `navigator.credentials.get` gives them.
    #[allow(clippy::type_complexity)]
    pub fn add_webauthn_signature(
        &mut self,
        alg: JwsAlg,
        kid: &str,
        approved_at: i64,
        credential_id: &[u8],
        assert: impl FnOnce(&[u8; 32]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>), String>,
    ) -> Result<(), String> {
        let header = Header {
            alg,
            kid: kid.to_owned(),
            approved_at,
            crit: Some(vec!["webauthn".into()]),
            typ: None,
            webauthn: Some(B64.encode(credential_id)),
        };
        let protected_b64 = B64.encode(serde_json::to_vec(&header).expect("header serializes"));
        let challenge = challenge_of(&protected_b64, &self.payload_b64);
        let (authenticator_data, client_data_json, signature) = assert(&challenge)?;
        self.signatures.push(Signature {
            header,
            protected_b64,
            signature,
            assertion: Some(Assertion {
                credential_id: credential_id.to_vec(),
                authenticator_data,
                client_data_json,
            }),
        });
        Ok(())
    }

    /// What a WebAuthn assertion for signature `i` must have signed as its challenge: the
    /// SHA-256 of the JWS signing input (protected header "." payload), so the assertion binds
    /// exactly this approver's header and this approval's claims.
    pub fn challenge(&self, i: usize) -> [u8; 32] {
        challenge_of(&self.signatures[i].protected_b64, &self.payload_b64)
    }

    /// What a passkey's *rejection* of this approval, by the approver of signature `i`, signs
    /// as its challenge: the SHA-256 of `"sealgate-rejection." BASE64URL(reason) "."` followed by
    /// the signing input. An approval's signing input has one dot and this has three, so a
    /// rejection's assertion can never pass as an approval (nor the other way round), and it
    /// binds the reason given.
    pub fn rejection_challenge(&self, i: usize, reason: &str) -> [u8; 32] {
        self.rejection_challenge_for(&self.signatures[i].protected_b64, reason)
    }

    /// The rejection challenge of a signature whose protected header (base64url) is
    /// `protected_b64`, before it is made (the approval page asks the passkey for it).
    pub fn rejection_challenge_for(&self, protected_b64: &str, reason: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"sealgate-rejection.");
        h.update(B64.encode(reason.as_bytes()).as_bytes());
        h.update(b".");
        h.update(signing_input(protected_b64, &self.payload_b64));
        h.finalize().into()
    }

    /// The approval challenge of a signature whose protected header is `protected_b64`, before
    /// it is made (see [`Token::challenge`]).
    pub fn challenge_for(&self, protected_b64: &str) -> [u8; 32] {
        challenge_of(protected_b64, &self.payload_b64)
    }

    /// The general JSON serialization.
    pub fn to_json(&self) -> String {
        let sigs: Vec<SignatureJson> = self
            .signatures
            .iter()
            .map(|s| SignatureJson {
                protected: s.protected_b64.clone(),
                signature: B64.encode(&s.signature),
                header: None,
                authenticator_data: s
                    .assertion
                    .as_ref()
                    .map(|a| B64.encode(&a.authenticator_data)),
                client_data_json: s
                    .assertion
                    .as_ref()
                    .map(|a| B64.encode(&a.client_data_json)),
            })
            .collect();
        serde_json::json!({ "payload": self.payload_b64, "signatures": sigs }).to_string()
    }

    /// Parses an unsigned or partly signed token in the general JSON serialization (for
    /// `sealctl token sign`, which adds signatures one at a time).
    pub fn parse_for_signing(bytes: &[u8]) -> Result<Token, ParseError> {
        if bytes.len() > MAX_TOKEN_BYTES {
            return perr(format!("token is over {MAX_TOKEN_BYTES} bytes"));
        }
        let g: GeneralJson = serde_json::from_slice(bytes)
            .map_err(|e| ParseError(format!("not a general JWS: {e}")))?;
        let sigs = g.signatures.into_iter().map(RawSignature::from).collect();
        Token::assemble(g.payload, sigs)
    }

    /// Checks signature `i` against `key`. The algorithm in the header must be the key's. A
    /// WebAuthn assertion is never a JWS signature (see `approval::webauthn`).
    pub fn verify(&self, i: usize, key: &VerifyingKey) -> bool {
        let s = &self.signatures[i];
        if s.header.alg != key.alg() || s.assertion.is_some() {
            return false;
        }
        key.verify(
            signing_input(&s.protected_b64, &self.payload_b64).as_bytes(),
            &s.signature,
        )
    }

    /// SHA-256 of everything signature `i` covers and the signature itself: protected header
    /// (which names the approver), payload, signature bytes. Two signatures with the same
    /// fingerprint verify alike under the same key.
    pub fn signature_fingerprint(&self, i: usize) -> [u8; 32] {
        use sha2::Digest;
        let s = &self.signatures[i];
        let mut h = sha2::Sha256::new();
        h.update(s.protected_b64.as_bytes());
        h.update(b".");
        h.update(self.payload_b64.as_bytes());
        h.update([0u8]);
        h.update(&s.signature);
        if let Some(a) = &s.assertion {
            // Length-prefixed, so no two assertions share a fingerprint by moving bytes.
            for part in [&a.authenticator_data, &a.client_data_json] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part);
            }
        }
        h.finalize().into()
    }

    /// SHA-256 of the payload: what a replay ledger entry is bound to.
    pub fn payload_digest(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(self.payload_b64.as_bytes()).into()
    }
}

fn signing_input(protected_b64: &str, payload_b64: &str) -> String {
    format!("{protected_b64}.{payload_b64}")
}

fn challenge_of(protected_b64: &str, payload_b64: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(signing_input(protected_b64, payload_b64)).into()
}

/// The ISO 4217 alphabetic codes in use (active list, including funds and metals codes).
const ISO_4217: &str = concat!(
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP ",
    "BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR ",
    "FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS ",
    "KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN ",
    "MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR ",
    "SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD ",
    "USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU ",
    "XTS XUA XXX YER ZAR ZMW ZWG ZWL ",
);

/// Whether `code` is an ISO 4217 alphabetic code, upper case as the standard writes it.
pub fn is_currency(code: &str) -> bool {
    code.len() == 3
        && code.bytes().all(|b| b.is_ascii_uppercase())
        && ISO_4217.split(' ').any(|c| c == code)
}

fn check_claims(c: &Claims) -> Result<(), ParseError> {
    let sha = &c.doc.sha256;
    if sha.len() != 64
        || !sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return perr("doc.sha256 must be 64 lowercase hex digits");
    }
    if let Some(h) = &c.doc.sha512 {
        if h.len() != 128
            || !h
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return perr("doc.sha512 must be 128 lowercase hex digits");
        }
    }
    if let Some(p) = &c.doc.placement {
        let [x1, y1, x2, y2] = p.rect;
        if p.field.is_empty() || p.field.len() > 64 || p.field.chars().any(|ch| ch.is_control()) {
            return perr("doc.placement.field must be 1 to 64 printable characters");
        }
        if p.page == 0 || x1 >= x2 || y1 >= y2 || x1 < 0 || y1 < 0 || x2 > 14_400 || y2 > 14_400 {
            return perr("doc.placement must name a page from 1 and a rectangle [x1, y1, x2, y2] with x1 < x2 and y1 < y2, in points from 0 to 14400");
        }
    }
    if c.jti.is_empty() || c.jti.len() > 128 {
        return perr("jti must be 1 to 128 characters");
    }
    if c.uses == 0 {
        return perr("uses must be at least 1");
    }
    if c.nbf > c.exp || c.iat > c.exp {
        return perr("the validity window is empty (nbf or iat after exp)");
    }
    if c.applicant.is_empty() || c.seal.is_empty() || c.doc.doc_type.is_empty() {
        return perr("applicant, seal and doc.type must not be empty");
    }
    if let Some(a) = &c.amount {
        if a.value < 0 {
            return perr("amount needs a non-negative value");
        }
        if !is_currency(&a.currency) {
            return perr(format!(
                "amount.currency {:?} is not an ISO 4217 code (three upper-case letters, e.g. \"CNY\")",
                a.currency
            ));
        }
    }
    Ok(())
}

/// An approver's public key.
#[derive(Clone, Debug)]
pub enum VerifyingKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl VerifyingKey {
    /// From an SPKI public key in PEM.
    pub fn from_pem(pem: &str) -> Result<VerifyingKey, String> {
        use spki::DecodePublicKey;
        if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
            return Ok(VerifyingKey::Ed25519(k));
        }
        if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            return Ok(VerifyingKey::P256(k));
        }
        Err("not an Ed25519 or P-256 public key in PEM (SPKI)".into())
    }

    /// Whether two keys are the same public key.
    pub fn same_as(&self, other: &VerifyingKey) -> bool {
        match (self, other) {
            (VerifyingKey::Ed25519(a), VerifyingKey::Ed25519(b)) => a.as_bytes() == b.as_bytes(),
            (VerifyingKey::P256(a), VerifyingKey::P256(b)) => a == b,
            _ => false,
        }
    }

    pub fn alg(&self) -> JwsAlg {
        match self {
            VerifyingKey::Ed25519(_) => JwsAlg::EdDSA,
            VerifyingKey::P256(_) => JwsAlg::ES256,
        }
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            VerifyingKey::Ed25519(k) => match ed25519_dalek::Signature::from_slice(sig) {
                Ok(s) => k.verify_strict(msg, &s).is_ok(),
                Err(_) => false,
            },
            VerifyingKey::P256(k) => {
                // JWS carries ES256 signatures as r || s (RFC 7518 §3.4), not DER: ring's
                // FIXED form. ring verifies about seven times faster than the portable p256
                // arithmetic, and every stamp verifies its approvers' signatures.
                let point = k.to_encoded_point(false);
                ring::signature::UnparsedPublicKey::new(
                    &ring::signature::ECDSA_P256_SHA256_FIXED,
                    point.as_bytes(),
                )
                .verify(msg, sig)
                .is_ok()
            }
        }
    }
}

/// An approver's private key, for `sealctl token sign` and the tests.
pub enum SigningKey {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl SigningKey {
    /// From a PKCS#8 private key in PEM.
    pub fn from_pem(pem: &str) -> Result<SigningKey, String> {
        use p256::pkcs8::DecodePrivateKey;
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Ok(SigningKey::Ed25519(k));
        }
        if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(SigningKey::P256(k));
        }
        Err("not an Ed25519 or P-256 private key in PEM (PKCS#8)".into())
    }

    pub fn alg(&self) -> JwsAlg {
        match self {
            SigningKey::Ed25519(_) => JwsAlg::EdDSA,
            SigningKey::P256(_) => JwsAlg::ES256,
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        match self {
            SigningKey::Ed25519(k) => VerifyingKey::Ed25519(k.verifying_key()),
            SigningKey::P256(k) => VerifyingKey::P256(*k.verifying_key()),
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            SigningKey::Ed25519(k) => {
                use ed25519_dalek::Signer;
                k.sign(msg).to_bytes().to_vec()
            }
            SigningKey::P256(k) => {
                use p256::ecdsa::signature::Signer;
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_bytes().to_vec()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn claims() -> Claims {
        Claims {
            jti: "t-1".into(),
            seal: "contract".into(),
            doc: DocClaim {
                sha256: "ab".repeat(32),
                doc_type: "contract".into(),
                title: None,
                sha512: None,
                placement: None,
            },
            amount: Some(Amount {
                value: 1_250_000,
                currency: "CNY".into(),
            }),
            dept: "sales".into(),
            scope: "procurement".into(),
            applicant: "zhao".into(),
            purpose: "supplier".into(),
            iat: 1000,
            nbf: 1000,
            exp: 2000,
            uses: 1,
        }
    }

    fn ed(seed: u8) -> SigningKey {
        SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]))
    }
    fn p(seed: u8) -> SigningKey {
        SigningKey::P256(p256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap())
    }

    #[test]
    fn a_currency_is_an_iso_4217_code_in_upper_case() {
        for (code, ok) in [
            ("CNY", true),
            ("USD", true),
            ("cny", false),
            ("Cny", false),
            ("XYZ", false),
            ("CNYY", false),
            ("", false),
        ] {
            let mut c = claims();
            c.amount.as_mut().unwrap().currency = code.into();
            let mut t = Token::unsigned(c);
            t.add_signature(&ed(1), "a", 1100);
            assert_eq!(Token::parse(t.to_json().as_bytes()).is_ok(), ok, "{code:?}");
        }
    }

    #[test]
    fn b64_in_any_header_is_malformed() {
        let mut t = Token::unsigned(claims());
        t.add_signature(&ed(1), "a", 1100);
        let json: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        let payload = json["payload"].as_str().unwrap();
        let sig = &json["signatures"][0];
        // Protected: a header with b64 = true, re-signed so that only b64 is wrong.
        let protected = B64
            .encode(br#"{"alg":"EdDSA","kid":"a","approved_at":1100,"b64":true,"crit":["b64"]}"#);
        let err = Token::parse(
            format!(
                "{protected}.{payload}.{}",
                sig["signature"].as_str().unwrap()
            )
            .as_bytes(),
        )
        .unwrap_err();
        assert!(err.0.contains("b64"), "{}", err.0);
        let protected = B64.encode(br#"{"alg":"EdDSA","kid":"a","approved_at":1100,"b64":false}"#);
        assert!(Token::parse(format!("{protected}.{payload}.AA").as_bytes()).is_err());
        // Unprotected, in the general serialization.
        let mut g = json.clone();
        g["signatures"][0]["header"] = serde_json::json!({"b64": false});
        let err = Token::parse(g.to_string().as_bytes()).unwrap_err();
        assert!(err.0.contains("b64"), "{}", err.0);
    }

    #[test]
    fn general_json_with_two_signatures_round_trips_and_verifies() {
        let mut t = Token::unsigned(claims());
        t.add_signature(&ed(1), "a", 1100);
        t.add_signature(&p(2), "b", 1200);
        let parsed = Token::parse(t.to_json().as_bytes()).unwrap();
        assert_eq!(parsed.claims, claims());
        assert_eq!(parsed.signatures.len(), 2);
        assert!(parsed.verify(0, &ed(1).verifying_key()));
        assert!(parsed.verify(1, &p(2).verifying_key()));
        assert!(!parsed.verify(0, &ed(3).verifying_key()));
        assert!(
            !parsed.verify(0, &p(2).verifying_key()),
            "alg must match key"
        );
    }

    #[test]
    fn compact_is_the_one_signature_case() {
        let mut t = Token::unsigned(claims());
        t.add_signature(&p(2), "b", 1200);
        let s = &t.signatures[0];
        let compact = format!(
            "{}.{}.{}",
            s.protected_b64,
            t.payload_b64,
            B64.encode(&s.signature)
        );
        let parsed = Token::parse(compact.as_bytes()).unwrap();
        assert!(parsed.verify(0, &p(2).verifying_key()));
    }

    #[test]
    fn fingerprints_tell_signatures_apart() {
        let mut t = Token::unsigned(claims());
        t.add_signature(&ed(1), "a", 1100);
        t.add_signature(&ed(2), "b", 1200);
        let again = Token::parse(t.to_json().as_bytes()).unwrap();
        assert_eq!(t.signature_fingerprint(0), again.signature_fingerprint(0));
        assert_ne!(t.signature_fingerprint(0), t.signature_fingerprint(1));
        // The same header and payload with other signature bytes is another fingerprint.
        let mut forged = again.clone();
        forged.signatures[0].signature[0] ^= 1;
        assert_ne!(forged.signature_fingerprint(0), t.signature_fingerprint(0));
        // So is another payload under the same header and signature.
        let mut other = t.clone();
        other.payload_b64.push('A');
        assert_ne!(other.signature_fingerprint(0), t.signature_fingerprint(0));
    }

    #[test]
    fn a_changed_payload_fails_verification() {
        let mut t = Token::unsigned(claims());
        t.add_signature(&ed(1), "a", 1100);
        let mut other = claims();
        other.doc.sha256 = "cd".repeat(32);
        let forged = Token {
            claims: other.clone(),
            payload_b64: B64.encode(serde_json::to_vec(&other).unwrap()),
            signatures: t.signatures.clone(),
        };
        let parsed = Token::parse(forged.to_json().as_bytes()).unwrap();
        assert!(!parsed.verify(0, &ed(1).verifying_key()));
    }

    #[test]
    fn unknown_critical_headers_and_junk_are_malformed() {
        let mut t = Token::unsigned(claims());
        t.add_signature(&ed(1), "a", 1100);
        let h = B64.encode(br#"{"alg":"EdDSA","kid":"a","approved_at":1,"crit":["exp-x"]}"#);
        let bad = format!(
            r#"{{"payload":"{}","signatures":[{{"protected":"{h}","signature":"AA"}}]}}"#,
            t.payload_b64
        );
        assert!(Token::parse(bad.as_bytes())
            .unwrap_err()
            .0
            .contains("critical"));
        let ok_crit =
            B64.encode(br#"{"alg":"EdDSA","kid":"a","approved_at":1,"crit":["approved_at"]}"#);
        let fine = format!(
            r#"{{"payload":"{}","signatures":[{{"protected":"{ok_crit}","signature":"AA"}}]}}"#,
            t.payload_b64
        );
        assert!(Token::parse(fine.as_bytes()).is_ok());
        for junk in [&b""[..], b"a.b", b"{}", b"\xff\xfe", b"[[[[[[", b"x.y.z"] {
            assert!(Token::parse(junk).is_err());
        }
        let deep = "[".repeat(100_000);
        assert!(Token::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn size_and_signature_count_are_bounded() {
        let mut t = Token::unsigned(claims());
        for i in 0..=MAX_SIGNATURES {
            t.add_signature(&ed(1), &format!("a{i}"), 1100);
        }
        let err = Token::parse(t.to_json().as_bytes()).unwrap_err();
        assert!(err.0.contains("signatures; at most 16"), "{err}");
        t.signatures.truncate(MAX_SIGNATURES);
        assert!(Token::parse(t.to_json().as_bytes()).is_ok());
        let big = vec![b' '; MAX_TOKEN_BYTES + 1];
        assert!(Token::parse(&big).unwrap_err().0.contains("at most"));
    }

    #[test]
    fn a_webauthn_entry_round_trips_and_must_be_whole() {
        let mut t = Token::unsigned(claims());
        let mut challenge = [0u8; 32];
        t.add_webauthn_signature(JwsAlg::ES256, "a", 1100, b"cred-1", |c| {
            challenge = *c;
            Ok((
                vec![1; 37],
                b"{\"type\":\"webauthn.get\"}".to_vec(),
                vec![2; 70],
            ))
        })
        .unwrap();
        assert_eq!(t.challenge(0), challenge);
        let json = t.to_json();
        let parsed = Token::parse(json.as_bytes()).unwrap();
        let a = parsed.signatures[0].assertion.as_ref().unwrap();
        assert_eq!(a.credential_id, b"cred-1");
        assert_eq!(a.authenticator_data, vec![1; 37]);
        assert_eq!(parsed.challenge(0), challenge);
        // Never taken for a JWS signature, whatever the key.
        assert!(!parsed.verify(0, &p(2).verifying_key()));
        // The fingerprint covers the client data.
        let mut other = parsed.clone();
        other.signatures[0]
            .assertion
            .as_mut()
            .unwrap()
            .client_data_json
            .push(b' ');
        assert_ne!(
            other.signature_fingerprint(0),
            parsed.signature_fingerprint(0)
        );
        // Without its client data, without crit, or in the compact form: malformed.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let entry = v["signatures"][0].clone();
        v["signatures"][0]
            .as_object_mut()
            .unwrap()
            .remove("clientDataJSON");
        assert!(Token::parse(v.to_string().as_bytes())
            .unwrap_err()
            .0
            .contains("together"));
        let no_crit =
            B64.encode(br#"{"alg":"ES256","kid":"a","approved_at":1100,"webauthn":"Y3JlZC0x"}"#);
        v["signatures"][0] = entry.clone();
        v["signatures"][0]["protected"] = no_crit.clone().into();
        assert!(Token::parse(v.to_string().as_bytes())
            .unwrap_err()
            .0
            .contains("crit"));
        let compact = format!(
            "{}.{}.{}",
            entry["protected"].as_str().unwrap(),
            t.payload_b64,
            entry["signature"].as_str().unwrap()
        );
        assert!(Token::parse(compact.as_bytes()).is_err());
    }

    #[test]
    fn unsigned_tokens_can_be_signed_later() {
        let t = Token::unsigned(claims());
        let mut again = Token::parse_for_signing(t.to_json().as_bytes()).unwrap();
        assert!(again.signatures.is_empty());
        again.add_signature(&ed(1), "a", 1100);
        let parsed = Token::parse(again.to_json().as_bytes()).unwrap();
        assert!(parsed.verify(0, &ed(1).verifying_key()));
    }
}
