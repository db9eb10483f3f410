//! Standard containers for a stamp: a CMS detached signature (RFC 5652 SignedData with no
//! content) over the approved document digest, which any CMS verifier checks against the
//! document itself; and the same SignedData as a PDF signature's `/Contents` (PAdES B-B, ETSI
//! EN 319 142-1, SubFilter `ETSI.CAdES.detached`), where the document is the PDF's ByteRange.
//!
//! Owns: the signed attributes (content-type, signing-time for plain CMS only, message-digest =
//! the approved digest, ESS signing-certificate-v2 of RFC 5035), what the device must sign for each
//! algorithm, and the assembly of the SignedData around the device's signature; reading the
//! message digest back out of signed attributes, for verifiers.
//! Never: signs anything itself, or lets the message digest be anything but the digest the
//! approval names. The ASN.1 types are RustCrypto's (`cms`, `x509-cert`, `der`).

use crate::device::Algorithm;
use cms::cert::IssuerAndSerialNumber;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{ObjectIdentifier as Oid, OctetString, SetOfVec};
use der::{Any, Decode, Encode, Sequence};
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;
use x509_cert::Certificate;

const ID_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
const ID_CONTENT_TYPE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.4");
const ID_SIGNING_TIME: Oid = Oid::new_unwrap("1.2.840.113549.1.9.5");
const ID_SIGNING_CERTIFICATE_V2: Oid = Oid::new_unwrap("1.2.840.113549.1.9.16.2.47");
const ID_SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");
const ECDSA_WITH_SHA256: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
const ID_RSASSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
const ID_ED25519: Oid = Oid::new_unwrap("1.3.101.112");
const ID_SIGNATURE_TIME_STAMP_TOKEN: Oid = Oid::new_unwrap("1.2.840.113549.1.9.16.2.14");

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("the seal has no certificate on its device; a CMS signature names its signer by one")]
    NoCertificate,
    #[error("the seal's certificate does not parse: {0}")]
    Certificate(String),
    #[error("cannot encode the signature container: {0}")]
    Encode(String),
    #[error("signed attributes do not parse: {0}")]
    Attributes(String),
}

fn enc(e: der::Error) -> ContainerError {
    ContainerError::Encode(e.to_string())
}

/// ESSCertIDv2 (RFC 5035) with the default hash algorithm, SHA-256, and no issuerSerial.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct EssCertIdV2 {
    cert_hash: OctetString,
}

/// SigningCertificateV2 (RFC 5035), without policies.
#[derive(Clone, Debug, Eq, PartialEq, Sequence)]
struct SigningCertificateV2 {
    certs: Vec<EssCertIdV2>,
}

/// The two containers made around a seal's signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A detached CMS signature (.p7s), with a signing-time attribute.
    Cms,
    /// A PAdES signature's CMS: no signing-time (PAdES forbids it; the time is the signature
    /// dictionary's `/M` or a timestamp).
    Pades,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Cms => "cms",
            Kind::Pades => "pades",
        }
    }
}

/// What the device must sign for a CMS signature.
#[derive(Clone)]
pub enum ToSign {
    /// ECDSA and RSA: SHA-256 of the DER signed attributes, signed as a digest.
    Digest([u8; 32]),
    /// Ed25519 (RFC 8419): the DER signed attributes themselves.
    Message(Vec<u8>),
}

/// The signed attributes of one CMS stamp, ready for the device.
pub struct Plan {
    /// DER of the SET OF Attribute, as signed.
    pub signed_attributes: Vec<u8>,
    pub to_sign: ToSign,
}

fn attribute(oid: Oid, value: Any) -> Result<Attribute, ContainerError> {
    let mut values = SetOfVec::new();
    values.insert(value).map_err(enc)?;
    Ok(Attribute { oid, values })
}

fn any_of(v: &impl Encode) -> Result<Any, ContainerError> {
    Any::from_der(&v.to_der().map_err(enc)?).map_err(enc)
}

/// The digest algorithm of a CMS signature by `algorithm`, and so of its message digest:
/// SHA-512 for Ed25519 (RFC 8419), SHA-256 for the others.
pub fn message_digest_len(algorithm: Algorithm) -> usize {
    if algorithm == Algorithm::Ed25519 {
        64
    } else {
        32
    }
}

fn digest_algorithm(algorithm: Algorithm) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid: if algorithm == Algorithm::Ed25519 {
            ID_SHA512
        } else {
            ID_SHA256
        },
        parameters: None,
    }
}

/// The signed attributes for a detached signature of the document whose digest (SHA-256, or
/// SHA-512 for Ed25519: see [`message_digest_len`]) is `digest`, by the seal whose certificate
/// is `certificate` (DER), made at `unix_seconds` (named in a signing-time attribute for
/// [`Kind::Cms`] only).
pub fn plan(
    algorithm: Algorithm,
    kind: Kind,
    certificate: &[u8],
    digest: &[u8],
    unix_seconds: u64,
) -> Result<Plan, ContainerError> {
    if digest.len() != message_digest_len(algorithm) {
        return Err(ContainerError::Encode(format!(
            "a {} signature's message digest is {} bytes, not {}",
            algorithm.name(),
            message_digest_len(algorithm),
            digest.len()
        )));
    }
    Certificate::from_der(certificate).map_err(|e| ContainerError::Certificate(e.to_string()))?;
    let time = x509_cert::time::Time::try_from(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds),
    )
    .map_err(enc)?;
    let ess = SigningCertificateV2 {
        certs: vec![EssCertIdV2 {
            cert_hash: OctetString::new(Sha256::digest(certificate).to_vec()).map_err(enc)?,
        }],
    };
    let mut attrs: SetOfVec<Attribute> = SetOfVec::new();
    for a in [
        attribute(ID_CONTENT_TYPE, any_of(&ID_DATA)?)?,
        attribute(
            ID_MESSAGE_DIGEST,
            any_of(&OctetString::new(digest.to_vec()).map_err(enc)?)?,
        )?,
        attribute(ID_SIGNING_CERTIFICATE_V2, any_of(&ess)?)?,
    ] {
        attrs.insert(a).map_err(enc)?;
    }
    if kind == Kind::Cms {
        attrs
            .insert(attribute(ID_SIGNING_TIME, any_of(&time)?)?)
            .map_err(enc)?;
    }
    let signed_attributes = attrs.to_der().map_err(enc)?;
    let to_sign = match algorithm {
        Algorithm::Ed25519 => ToSign::Message(signed_attributes.clone()),
        _ => ToSign::Digest(Sha256::digest(&signed_attributes).into()),
    };
    Ok(Plan {
        signed_attributes,
        to_sign,
    })
}

fn signature_algorithm(algorithm: Algorithm) -> Result<AlgorithmIdentifierOwned, ContainerError> {
    let (oid, parameters) = match algorithm {
        Algorithm::EcdsaP256Sha256 => (ECDSA_WITH_SHA256, None),
        Algorithm::Ed25519 => (ID_ED25519, None),
        Algorithm::RsaPkcs1Sha256 => (SHA256_WITH_RSA, Some(Any::null())),
        Algorithm::RsaPssSha256 => {
            let params = pkcs1::RsaPssParams::new::<rsa::sha2::Sha256>(32);
            (ID_RSASSA_PSS, Some(any_of(&params)?))
        }
    };
    Ok(AlgorithmIdentifierOwned { oid, parameters })
}

/// The DER ContentInfo of a detached SignedData: the signed attributes from [`plan`], the
/// device's `signature` over them, the seal's certificate, and the RFC 3161 timestamp token
/// over the signature when there is one (unsigned attribute id-aa-signatureTimeStampToken).
pub fn assemble(
    algorithm: Algorithm,
    certificate: &[u8],
    signed_attributes: &[u8],
    signature: &[u8],
    timestamp_token: Option<&[u8]>,
) -> Result<Vec<u8>, ContainerError> {
    let unsigned_attrs = match timestamp_token {
        None => None,
        Some(t) => {
            let mut set = SetOfVec::new();
            set.insert(attribute(
                ID_SIGNATURE_TIME_STAMP_TOKEN,
                Any::from_der(t).map_err(enc)?,
            )?)
            .map_err(enc)?;
            Some(set)
        }
    };
    let cert = Certificate::from_der(certificate)
        .map_err(|e| ContainerError::Certificate(e.to_string()))?;
    let attrs = SetOfVec::<Attribute>::from_der(signed_attributes)
        .map_err(|e| ContainerError::Attributes(e.to_string()))?;
    let sha256 = digest_algorithm(algorithm);
    let signer = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: sha256.clone(),
        signed_attrs: Some(attrs),
        signature_algorithm: signature_algorithm(algorithm)?,
        signature: OctetString::new(signature.to_vec()).map_err(enc)?,
        unsigned_attrs,
    };
    let mut certs = SetOfVec::new();
    certs
        .insert(cms::cert::CertificateChoices::Certificate(cert))
        .map_err(enc)?;
    let mut digest_algorithms = SetOfVec::new();
    digest_algorithms.insert(sha256).map_err(enc)?;
    let mut signers = SetOfVec::new();
    signers.insert(signer).map_err(enc)?;
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet(certs)),
        crls: None,
        signer_infos: SignerInfos(signers),
    };
    ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: any_of(&signed)?,
    }
    .to_der()
    .map_err(enc)
}

/// The message digest that DER signed attributes carry: what a CMS signature binds.
pub fn message_digest(signed_attributes: &[u8]) -> Result<Vec<u8>, ContainerError> {
    let bad = |m: String| ContainerError::Attributes(m);
    let attrs =
        SetOfVec::<Attribute>::from_der(signed_attributes).map_err(|e| bad(e.to_string()))?;
    let mut found = attrs.iter().filter(|a| a.oid == ID_MESSAGE_DIGEST);
    let (Some(a), None) = (found.next(), found.next()) else {
        return Err(bad("not exactly one message-digest attribute".into()));
    };
    let values: Vec<_> = a.values.iter().collect();
    let [v] = values.as_slice() else {
        return Err(bad(
            "the message-digest attribute has not exactly one value".into(),
        ));
    };
    let octets: OctetString = v.decode_as().map_err(|e| bad(e.to_string()))?;
    Ok(octets.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_digest_read_back_is_the_one_planned() {
        // Any certificate will do for the attributes; a minimal self-signed one from the demo
        // is not at hand here, so the plan's certificate check is exercised by the daemon's tests.
        let digest = [7u8; 32];
        let mut attrs: SetOfVec<Attribute> = SetOfVec::new();
        attrs
            .insert(
                attribute(
                    ID_MESSAGE_DIGEST,
                    any_of(&OctetString::new(digest.to_vec()).unwrap()).unwrap(),
                )
                .unwrap(),
            )
            .unwrap();
        let der = attrs.to_der().unwrap();
        assert_eq!(message_digest(&der).unwrap(), digest);
        assert!(message_digest(&[0x31, 0x00]).is_err());
    }
}

/// What a detached CMS signature says and whether it holds for a document.
#[derive(Debug)]
pub struct Checked {
    pub algorithm: Algorithm,
    /// The signer's certificate (DER), found in the container by the signer's issuer and serial.
    pub certificate: Vec<u8>,
    /// The signature inside the SignerInfo.
    pub signature: Vec<u8>,
    /// DER of the signed attributes (the SET OF that was signed).
    pub signed_attributes: Vec<u8>,
    /// The message digest is the document's (SHA-256, or SHA-512 for Ed25519).
    pub digest_matches: bool,
    /// The signature verifies over the signed attributes under the certificate's key.
    pub signature_verifies: bool,
    /// The timestamp token's time (Unix seconds) and whether its imprint is the SHA-256 of the
    /// signature, or why it does not read; None without one.
    pub timestamp: Option<Result<(i64, bool), String>>,
}

fn algorithm_of(id: &AlgorithmIdentifierOwned) -> Option<Algorithm> {
    Some(match id.oid {
        o if o == ECDSA_WITH_SHA256 => Algorithm::EcdsaP256Sha256,
        o if o == ID_ED25519 => Algorithm::Ed25519,
        o if o == SHA256_WITH_RSA => Algorithm::RsaPkcs1Sha256,
        o if o == ID_RSASSA_PSS => Algorithm::RsaPssSha256,
        _ => return None,
    })
}

/// Reads a detached CMS signature (DER ContentInfo) and checks it against `document`: its one
/// signer's certificate, message digest and signature. Trust in the certificate is the caller's
/// question ([`issued_by`]).
pub fn check_detached(p7s: &[u8], document: &[u8]) -> Result<Checked, ContainerError> {
    let bad = |m: String| ContainerError::Attributes(m);
    let info =
        ContentInfo::from_der(p7s).map_err(|e| bad(format!("not a CMS ContentInfo: {e}")))?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(bad("not a SignedData".into()));
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(|e| bad(format!("SignedData: {e}")))?;
    if signed.encap_content_info.econtent.is_some() {
        return Err(bad("not a detached signature: the content is inside".into()));
    }
    let signers: Vec<&SignerInfo> = signed.signer_infos.0.iter().collect();
    let [signer] = signers.as_slice() else {
        return Err(bad(format!("{} signers; one is expected", signers.len())));
    };
    let algorithm = algorithm_of(&signer.signature_algorithm).ok_or_else(|| {
        bad(format!(
            "signature algorithm {} is not one a seal uses",
            signer.signature_algorithm.oid
        ))
    })?;
    let SignerIdentifier::IssuerAndSerialNumber(sid) = &signer.sid else {
        return Err(bad(
            "the signer is not named by issuer and serial number".into()
        ));
    };
    let cert = signed
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .find_map(|c| match c {
            cms::cert::CertificateChoices::Certificate(c)
                if c.tbs_certificate.issuer == sid.issuer
                    && c.tbs_certificate.serial_number == sid.serial_number =>
            {
                Some(c.clone())
            }
            _ => None,
        })
        .ok_or_else(|| bad("the signer's certificate is not in the container".into()))?;
    let attrs = signer
        .signed_attrs
        .as_ref()
        .ok_or_else(|| bad("no signed attributes".into()))?
        .to_der()
        .map_err(enc)?;
    let md = message_digest(&attrs)?;
    let digest_matches = if algorithm == Algorithm::Ed25519 {
        md[..] == sha2::Sha512::digest(document)[..]
    } else {
        md[..] == Sha256::digest(document)[..]
    };
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(enc)?;
    let signature = signer.signature.as_bytes().to_vec();
    let signature_verifies = if algorithm == Algorithm::Ed25519 {
        crate::device::keys::verify_ed25519_message(&spki, &attrs, &signature).is_ok()
    } else {
        crate::device::keys::verify_stamp_signature(
            algorithm,
            &spki,
            &Sha256::digest(&attrs).into(),
            &signature,
        )
        .is_ok()
    };
    let timestamp = signer.unsigned_attrs.as_ref().and_then(|set| {
        let a = set
            .iter()
            .find(|a| a.oid == ID_SIGNATURE_TIME_STAMP_TOKEN)?;
        let v = a.values.iter().next()?;
        Some(
            v.to_der()
                .map_err(|e| e.to_string())
                .and_then(|der| crate::timestamp::read_token(&der))
                .map(|(time, imprint)| (time, imprint[..] == Sha256::digest(&signature)[..])),
        )
    });
    Ok(Checked {
        timestamp,
        algorithm,
        certificate: cert.to_der().map_err(enc)?,
        signature,
        signed_attributes: attrs,
        digest_matches,
        signature_verifies,
    })
}

/// Whether `certificate` (DER) was issued by `issuer` (DER): the issuer's subject is its
/// issuer name and the issuer's key verifies its signature (ECDSA P-256 or RSA PKCS#1 v1.5,
/// with SHA-256).
pub fn issued_by(certificate: &[u8], issuer: &[u8]) -> bool {
    let (Ok(c), Ok(i)) = (
        Certificate::from_der(certificate),
        Certificate::from_der(issuer),
    ) else {
        return false;
    };
    if c.tbs_certificate.issuer != i.tbs_certificate.subject {
        return false;
    }
    let (Ok(tbs), Ok(spki)) = (
        c.tbs_certificate.to_der(),
        i.tbs_certificate.subject_public_key_info.to_der(),
    ) else {
        return false;
    };
    let Some(sig) = c.signature.as_bytes() else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(&tbs).into();
    match algorithm_of(&c.signature_algorithm) {
        Some(a @ (Algorithm::EcdsaP256Sha256 | Algorithm::RsaPkcs1Sha256)) => {
            crate::device::keys::verify_stamp_signature(a, &spki, &digest, sig).is_ok()
        }
        _ => false,
    }
}
