//! Encodings shared by the device backends: public keys as X.509 SubjectPublicKeyInfo, ECDSA
//! signatures as DER, the PKCS#1 v1.5 DigestInfo for SHA-256.
//!
//! Owns: turning the raw forms devices speak into the standard forms callers verify with.
//! Never: touches a private key.

use der::asn1::{AnyRef, BitStringRef, OctetStringRef, UintRef};
use der::{Decode, Encode};
use spki::{AlgorithmIdentifier, EncodePublicKey, ObjectIdentifier, SubjectPublicKeyInfo};

/// DER of the named-curve parameter for P-256 (OID 1.2.840.10045.3.1.7), as in CKA_EC_PARAMS.
pub const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// DER prefix of a DigestInfo for SHA-256; the 32-byte digest follows it (RFC 8017 §9.2).
pub const SHA256_DIGEST_INFO_PREFIX: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// PKCS#11 says CKA_EC_POINT is a DER OCTET STRING, but some tokens give the bare point.
/// Accepts both.
pub fn unwrap_ec_point(bytes: &[u8]) -> &[u8] {
    match OctetStringRef::from_der(bytes) {
        Ok(os) => os.as_bytes(),
        Err(_) => bytes,
    }
}

/// SPKI of a P-256 key from its SEC1 point.
pub fn p256_spki(ec_point: &[u8]) -> Result<Vec<u8>, String> {
    let key = p256::PublicKey::from_sec1_bytes(unwrap_ec_point(ec_point))
        .map_err(|_| "the key's EC point is not a valid P-256 point".to_string())?;
    Ok(key
        .to_public_key_der()
        .map_err(|e| e.to_string())?
        .into_vec())
}

/// SPKI of an Ed25519 key from its 32 bytes.
pub fn ed25519_spki(ec_point: &[u8]) -> Result<Vec<u8>, String> {
    let bytes: [u8; 32] = unwrap_ec_point(ec_point)
        .try_into()
        .map_err(|_| "the key's Ed25519 point is not 32 bytes".to_string())?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
        .map_err(|_| "the key's Ed25519 point is not valid".to_string())?;
    Ok(key
        .to_public_key_der()
        .map_err(|e| e.to_string())?
        .into_vec())
}

/// SPKI of an RSA key from its modulus and public exponent (big-endian).
pub fn rsa_spki(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, String> {
    let pkcs1 = pkcs1::RsaPublicKey {
        modulus: UintRef::new(modulus).map_err(|e| e.to_string())?,
        public_exponent: UintRef::new(exponent).map_err(|e| e.to_string())?,
    }
    .to_der()
    .map_err(|e| e.to_string())?;
    let spki = SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid: RSA_ENCRYPTION,
            parameters: Some(AnyRef::NULL),
        },
        subject_public_key: BitStringRef::from_bytes(&pkcs1).map_err(|e| e.to_string())?,
    };
    spki.to_der().map_err(|e| e.to_string())
}

/// Bits of an RSA modulus given big-endian, leading zeros ignored.
pub fn rsa_modulus_bits(modulus: &[u8]) -> usize {
    let m = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    m.len() * 8 - m[0].leading_zeros() as usize
}

/// Converts a raw ECDSA P-256 signature (r || s, 64 bytes, as PKCS#11 returns it) to DER.
pub fn ecdsa_p256_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, String> {
    let sig = p256::ecdsa::Signature::from_slice(raw)
        .map_err(|_| format!("device returned a {}-byte ECDSA signature", raw.len()))?;
    Ok(sig.to_der().as_bytes().to_vec())
}

/// Checks a device signature made over `SHA-256(message)` the way [`super::SealDevice::sign`]
/// makes them: ECDSA P-256 (DER) over that digest, or Ed25519 whose message is that digest.
/// RSA keys are not verified here.
pub fn verify_device_signature(
    algorithm: super::Algorithm,
    spki_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use sha2::Digest;
    match algorithm {
        super::Algorithm::EcdsaP256Sha256 | super::Algorithm::Ed25519 => verify_stamp_signature(
            algorithm,
            spki_der,
            &sha2::Sha256::digest(message).into(),
            signature,
        ),
        other => Err(format!("{} signatures are not verified here", other.name())),
    }
}

/// Checks a stamp's signature over the document's SHA-256 `digest`, in the encoding the README's
/// table gives for each algorithm: ECDSA P-256 (DER) and RSA (PSS with a 32-byte salt, or
/// PKCS#1 v1.5) over the digest as SHA-256's output; Ed25519 whose message is the digest.
pub fn verify_stamp_signature(
    algorithm: super::Algorithm,
    spki_der: &[u8],
    digest: &[u8; 32],
    signature: &[u8],
) -> Result<(), String> {
    use signature::hazmat::PrehashVerifier;
    use spki::DecodePublicKey;
    let bad = |_| "signature does not verify".to_string();
    match algorithm {
        super::Algorithm::EcdsaP256Sha256 => {
            let key = p256::ecdsa::VerifyingKey::from_public_key_der(spki_der)
                .map_err(|_| "not a P-256 public key".to_string())?;
            let sig = p256::ecdsa::Signature::from_der(signature)
                .map_err(|_| "not a DER ECDSA signature".to_string())?;
            key.verify_prehash(digest, &sig).map_err(bad)
        }
        super::Algorithm::Ed25519 => verify_ed25519_message(spki_der, digest, signature),
        super::Algorithm::RsaPssSha256 | super::Algorithm::RsaPkcs1Sha256 => {
            let key = rsa::RsaPublicKey::from_public_key_der(spki_der)
                .map_err(|_| "not an RSA public key".to_string())?;
            if algorithm == super::Algorithm::RsaPssSha256 {
                let sig = rsa::pss::Signature::try_from(signature)
                    .map_err(|_| "not an RSA signature".to_string())?;
                rsa::pss::VerifyingKey::<rsa::sha2::Sha256>::new(key)
                    .verify_prehash(digest, &sig)
                    .map_err(bad)
            } else {
                let sig = rsa::pkcs1v15::Signature::try_from(signature)
                    .map_err(|_| "not an RSA signature".to_string())?;
                rsa::pkcs1v15::VerifyingKey::<rsa::sha2::Sha256>::new(key)
                    .verify_prehash(digest, &sig)
                    .map_err(bad)
            }
        }
    }
}

/// Checks an Ed25519 signature over a whole message (a CMS signature over signed attributes).
pub fn verify_ed25519_message(
    spki_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    use spki::DecodePublicKey;
    let key = ed25519_dalek::VerifyingKey::from_public_key_der(spki_der)
        .map_err(|_| "not an Ed25519 public key".to_string())?;
    let sig = ed25519_dalek::Signature::from_slice(signature)
        .map_err(|_| "not a 64-byte Ed25519 signature".to_string())?;
    key.verify_strict(message, &sig)
        .map_err(|_| "signature does not verify".to_string())
}

/// The algorithm of an SPKI public key, for the two kinds [`verify_device_signature`] checks.
pub fn spki_algorithm(spki_der: &[u8]) -> Option<super::Algorithm> {
    use spki::DecodePublicKey;
    if p256::ecdsa::VerifyingKey::from_public_key_der(spki_der).is_ok() {
        Some(super::Algorithm::EcdsaP256Sha256)
    } else if ed25519_dalek::VerifyingKey::from_public_key_der(spki_der).is_ok() {
        Some(super::Algorithm::Ed25519)
    } else {
        None
    }
}

/// The modulus size in bits of an RSA SubjectPublicKeyInfo; `None` for any other key.
pub fn rsa_spki_bits(spki_der: &[u8]) -> Option<usize> {
    use der::Decode;
    let parsed = spki::SubjectPublicKeyInfoRef::from_der(spki_der).ok()?;
    if parsed.algorithm.oid != RSA_ENCRYPTION {
        return None;
    }
    let key = pkcs1::RsaPublicKey::from_der(parsed.subject_public_key.raw_bytes()).ok()?;
    Some(rsa_modulus_bits(key.modulus.as_bytes()))
}

/// PEM armour for DER data, e.g. `PUBLIC KEY` or `CERTIFICATE`.
pub fn pem(label: &str, der: &[u8]) -> String {
    pem_rfc7468::encode_string(label, pem_rfc7468::LineEnding::LF, der)
        .expect("PEM encoding of in-memory DER cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use spki::DecodePublicKey;

    #[test]
    fn ec_point_accepts_wrapped_and_bare() {
        let bare = [4u8; 65];
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&bare);
        assert_eq!(unwrap_ec_point(&wrapped), &bare[..]);
        assert_eq!(unwrap_ec_point(&bare), &bare[..]);
    }

    #[test]
    fn p256_der_signature_verifies_with_spki() {
        use p256::ecdsa::{signature::hazmat::PrehashSigner, SigningKey};
        let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let digest = [9u8; 32];
        let sig: p256::ecdsa::Signature = sk.sign_prehash(&digest).unwrap();
        let der = ecdsa_p256_raw_to_der(&sig.to_bytes()).unwrap();
        let point = sk.verifying_key().to_encoded_point(false);
        let spki = p256_spki(point.as_bytes()).unwrap();
        let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&spki).unwrap();
        let parsed = p256::ecdsa::Signature::from_der(&der).unwrap();
        vk.verify_prehash(&digest, &parsed).unwrap();
        assert!(ecdsa_p256_raw_to_der(&[0u8; 63]).is_err());
    }

    #[test]
    fn rsa_spki_round_trips_through_pkcs1() {
        let n = [0xc5u8; 256];
        let spki = rsa_spki(&n, &[1, 0, 1]).unwrap();
        let parsed = spki::SubjectPublicKeyInfoRef::from_der(&spki).unwrap();
        assert_eq!(parsed.algorithm.oid, RSA_ENCRYPTION);
        let inner = pkcs1::RsaPublicKey::from_der(parsed.subject_public_key.raw_bytes()).unwrap();
        assert_eq!(inner.modulus.as_bytes(), &n[..]);
        assert_eq!(rsa_modulus_bits(&n), 2048);
        assert_eq!(rsa_spki_bits(&spki), Some(2048));
        assert_eq!(rsa_spki_bits(&[0x30, 0]), None);
        assert_eq!(rsa_modulus_bits(&[0, 0x01, 0]), 9);
    }

    #[test]
    fn pem_is_armoured() {
        let p = pem("PUBLIC KEY", &[1, 2, 3]);
        assert!(p.starts_with("-----BEGIN PUBLIC KEY-----\n") && p.ends_with("-----\n"));
    }
}
