//! Trusted time for container stamps: an RFC 3161 timestamp token over the seal's signature,
//! from the time-stamping authority the configuration names, carried as the unsigned attribute
//! id-aa-signatureTimeStampToken (CAdES / PAdES B-T).
//!
//! Owns: the request (SHA-256 imprint of the signature value, a random nonce, the TSA's
//! certificate asked for), the HTTP exchange with a bounded time and reply size, and the checks
//! that the reply grants a token for this imprint and this nonce.
//! Never: decides whether a stamp may go without one (the seal's policy and the service do),
//! or trusts the TSA's certificate (verifiers do, against their anchors).
//! The ASN.1 types are RustCrypto's `x509-tsp`; HTTP is `ureq`.

use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::asn1::{Int, ObjectIdentifier as Oid, OctetString};
use der::{Decode, Encode};
use sha2::{Digest, Sha256};
use std::time::Duration;
use x509_tsp::{MessageImprint, TimeStampReq, TimeStampResp, TspVersion, TstInfo};

const ID_SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_CT_TST_INFO: Oid = Oid::new_unwrap("1.2.840.113549.1.9.16.1.4");
/// The largest reply read from a TSA.
const MAX_REPLY_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    #[error("the time-stamping authority {url} could not be reached: {why}")]
    Unreachable { url: String, why: String },
    #[error("the time-stamping authority {url} answered badly: {why}")]
    BadReply { url: String, why: String },
}

/// A granted timestamp token and what it says.
#[derive(Clone, Debug)]
pub struct Token {
    /// The token: a DER ContentInfo (SignedData over a TSTInfo).
    pub der: Vec<u8>,
    /// The TSA's time, Unix seconds.
    pub gen_time: i64,
}

/// The time-stamping authority of the configuration.
pub struct Tsa {
    url: String,
    agent: ureq::Agent,
}

impl Tsa {
    pub fn new(url: &str, timeout: Duration) -> Tsa {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Tsa {
            url: url.to_owned(),
            agent,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A timestamp token over `signature` (its SHA-256), checked to answer this request.
    pub fn stamp(&self, signature: &[u8]) -> Result<Token, TimestampError> {
        let unreachable = |why: String| TimestampError::Unreachable {
            url: self.url.clone(),
            why,
        };
        let bad = |why: String| TimestampError::BadReply {
            url: self.url.clone(),
            why,
        };
        let imprint = Sha256::digest(signature);
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| unreachable(format!("no randomness: {e}")))?;
        nonce[0] &= 0x7f;
        nonce[0] |= 0x01;
        let nonce = Int::new(&nonce).map_err(|e| bad(e.to_string()))?;
        let req = TimeStampReq {
            version: TspVersion::V1,
            message_imprint: MessageImprint {
                hash_algorithm: spki::AlgorithmIdentifierOwned {
                    oid: ID_SHA256,
                    parameters: None,
                },
                hashed_message: OctetString::new(imprint.to_vec())
                    .map_err(|e| bad(e.to_string()))?,
            },
            req_policy: None,
            nonce: Some(nonce.clone()),
            cert_req: true,
            extensions: None,
        };
        let body = req.to_der().map_err(|e| bad(e.to_string()))?;
        let mut resp = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/timestamp-query")
            .send(&body[..])
            .map_err(|e| unreachable(e.to_string()))?;
        if resp.status() != 200 {
            return Err(unreachable(format!("HTTP status {}", resp.status())));
        }
        let reply = resp
            .body_mut()
            .with_config()
            .limit(MAX_REPLY_BYTES)
            .read_to_vec()
            .map_err(|e| unreachable(e.to_string()))?;
        check_reply(&reply, &imprint, &nonce).map_err(bad)
    }
}

/// Reads a TimeStampResp and checks it grants a token for `imprint` and `nonce`.
fn check_reply(reply: &[u8], imprint: &[u8], nonce: &Int) -> Result<Token, String> {
    let resp = TimeStampResp::from_der(reply).map_err(|e| format!("not a TimeStampResp: {e}"))?;
    // 0 granted, 1 granted with modifications.
    let status = resp.status.status as u8;
    if status > 1 {
        return Err(format!(
            "status {status}{}",
            resp.status
                .status_string
                .as_ref()
                .map(|s| format!(": {s:?}"))
                .unwrap_or_default()
        ));
    }
    let token = resp
        .time_stamp_token
        .ok_or_else(|| "a granted reply without a token".to_string())?;
    let info = tst_info(&token)?;
    if info.message_imprint.hashed_message.as_bytes() != imprint
        || info.message_imprint.hash_algorithm.oid != ID_SHA256
    {
        return Err("the token is for another imprint".into());
    }
    if info.nonce.as_ref() != Some(nonce) {
        return Err("the token carries another nonce".into());
    }
    let der = token.to_der().map_err(|e| e.to_string())?;
    Ok(Token {
        der,
        gen_time: info.gen_time.to_unix_duration().as_secs() as i64,
    })
}

/// The TSTInfo inside a timestamp token.
pub fn tst_info(token: &ContentInfo) -> Result<TstInfo, String> {
    let signed: SignedData = token
        .content
        .decode_as()
        .map_err(|e| format!("the token is not a SignedData: {e}"))?;
    if signed.encap_content_info.econtent_type != ID_CT_TST_INFO {
        return Err("the token does not hold a TSTInfo".into());
    }
    let content = signed
        .encap_content_info
        .econtent
        .ok_or_else(|| "the token's TSTInfo is missing".to_string())?;
    let octets: OctetString = content
        .decode_as()
        .map_err(|e| format!("the token's content is not an OCTET STRING: {e}"))?;
    TstInfo::from_der(octets.as_bytes()).map_err(|e| format!("the TSTInfo does not parse: {e}"))
}

/// The TSA's time and imprint of a timestamp token (DER ContentInfo).
pub fn read_token(der: &[u8]) -> Result<(i64, Vec<u8>), String> {
    let info = ContentInfo::from_der(der).map_err(|e| e.to_string())?;
    let tst = tst_info(&info)?;
    Ok((
        tst.gen_time.to_unix_duration().as_secs() as i64,
        tst.message_imprint.hashed_message.as_bytes().to_vec(),
    ))
}
