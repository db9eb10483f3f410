#!/usr/bin/env python3
"""Issues a sealgate approval token outside Rust, with Python's `cryptography` package.

Usage: sign_token.py CLAIMS_JSON_FILE KID PRIVATE_KEY_PEM [KID PRIVATE_KEY_PEM ...]
Prints the token (JWS, general JSON serialization) with one signature per approver, in order.
Ed25519 keys sign as EdDSA, P-256 keys as ES256 (r || s, as RFC 7518 requires).
"""
import base64
import json
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main():
    claims_file, *pairs = sys.argv[1:]
    with open(claims_file, "rb") as f:
        payload = b64url(f.read())
    signatures = []
    for i in range(0, len(pairs), 2):
        kid, key_file = pairs[i], pairs[i + 1]
        with open(key_file, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        alg = "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256"
        header = {"alg": alg, "kid": kid, "approved_at": int(time.time()) - 120 + 30 * (i // 2)}
        protected = b64url(json.dumps(header).encode())
        signing_input = f"{protected}.{payload}".encode()
        if alg == "EdDSA":
            signature = key.sign(signing_input)
        else:
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        signatures.append({"protected": protected, "signature": b64url(signature)})
    print(json.dumps({"payload": payload, "signatures": signatures}))


if __name__ == "__main__":
    main()
