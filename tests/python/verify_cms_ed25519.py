"""Checks an Ed25519 CMS detached signature (RFC 8419) against its document, independently of
sealgate: asn1crypto parses the SignedData, Python's `cryptography` verifies the signature over
the DER signed attributes and the certificate under the CA. (OpenSSL 3.0 has no EdDSA in CMS.)

usage: verify_cms_ed25519.py FILE.p7s DOCUMENT CA.pem   -> prints "verified" or exits 1
"""

import hashlib
import sys

from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519


def main() -> int:
    p7s, document, ca_path = sys.argv[1:4]
    info = cms.ContentInfo.load(open(p7s, "rb").read())
    signed = info["content"]
    if info["content_type"].native != "signed_data" or signed["encap_content_info"]["content"].native is not None:
        print("not a detached SignedData")
        return 1
    (signer,) = signed["signer_infos"]
    if signer["digest_algorithm"]["algorithm"].native != "sha512":
        print("digest algorithm is not SHA-512 (RFC 8419)")
        return 1
    attrs = {a["type"].native: a["values"][0].native for a in signer["signed_attrs"]}
    doc = open(document, "rb").read()
    if attrs["message_digest"] != hashlib.sha512(doc).digest():
        print("message digest is not the document's SHA-512")
        return 1
    cert_der = signed["certificates"][0].chosen.dump()
    cert = x509.load_der_x509_certificate(cert_der)
    # The signature is over the signed attributes as a DER SET OF (tag 0x31, not [0]).
    to_verify = b"\x31" + signer["signed_attrs"].dump()[1:]
    key = cert.public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        print("the certificate's key is not Ed25519")
        return 1
    try:
        key.verify(signer["signature"].native, to_verify)
    except Exception:
        print("signature does not verify")
        return 1
    ca = x509.load_pem_x509_certificate(open(ca_path, "rb").read())
    try:
        ca.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    except Exception:
        print("the certificate is not issued by the CA")
        return 1
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
