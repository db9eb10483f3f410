#!/usr/bin/env python3
"""A software passkey for sealgate's tests, built on the `fido2` package's WebAuthn structures
(client data, authenticator data, COSE keys) and `cryptography`'s keys; it shares no code with
sealgate.

  passkey.py register --dir D --name ID --alg ES256|EdDSA --rp-id RP
      makes a credential (private key in D/ID.json) and prints its [[approver.passkey]] fields
      as JSON: credential_id, public_key (COSE_Key), rp_id, attestation.
  passkey.py approve --dir D --name ID --origin O [--rp-id RP] [--no-uv] [--no-up]
                     [--type T] [--counter N] [--approved-at T] [--challenge-from FILE]
      reads a token (JWS general JSON) on stdin and writes it with ID's passkey assertion
      added, as a browser's navigator.credentials.get() would give it to the approval page.
      The counter goes up by one per assertion unless --counter says otherwise.
  passkey.py vectors
      prints the unit tests' vectors (tests/vectors/webauthn.json): every check of the gate.

The assertion's challenge is the SHA-256 of the JWS signing input (protected header "."
payload), with the protected header naming the approver and the credential.
"""

import argparse
import base64
import hashlib
import json
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fido2 import cbor, cose
from fido2.webauthn import AuthenticatorData, CollectedClientData


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Credential:
    def __init__(self, alg, private_key, credential_id, counter=0):
        self.alg = alg
        self.key = private_key
        self.id = credential_id
        self.counter = counter

    @staticmethod
    def new(alg, seed=None):
        if alg == "ES256":
            key = (ec.derive_private_key(seed, ec.SECP256R1()) if seed
                   else ec.generate_private_key(ec.SECP256R1()))
        elif alg == "EdDSA":
            key = (ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32) if seed
                   else ed25519.Ed25519PrivateKey.generate())
        else:
            raise SystemExit(f"unknown algorithm {alg}")
        cid = hashlib.sha256(b"credential" + repr(seed).encode()).digest()[:16] if seed else \
            __import__("os").urandom(16)
        return Credential(alg, key, cid)

    def cose_key(self) -> bytes:
        public = self.key.public_key()
        k = (cose.ES256.from_cryptography_key(public) if self.alg == "ES256"
             else cose.EdDSA.from_cryptography_key(public))
        return cbor.encode(dict(k))

    def sign(self, message: bytes) -> bytes:
        if self.alg == "ES256":
            return self.key.sign(message, ec.ECDSA(hashes.SHA256()))  # DER, as WebAuthn has it
        return self.key.sign(message)

    def save(self, path: Path):
        pem = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).decode()
        path.write_text(json.dumps({"alg": self.alg, "key": pem, "id": b64(self.id),
                                    "counter": self.counter}))

    @staticmethod
    def load(path: Path):
        d = json.loads(path.read_text())
        key = serialization.load_pem_private_key(d["key"].encode(), None)
        return Credential(d["alg"], key, unb64(d["id"]), d["counter"])


def assertion(cred, protected_b64, payload_b64, rp_id, origin, up=True, uv=True,
              kind="webauthn.get", counter=None, challenge_input=None):
    """authenticatorData, clientDataJSON and signature for one approval signature."""
    signing_input = challenge_input or f"{protected_b64}.{payload_b64}"
    challenge = hashlib.sha256(signing_input.encode()).digest()
    client = CollectedClientData.create(type=kind, challenge=challenge, origin=origin)
    flags = AuthenticatorData.FLAG(0)
    if up:
        flags |= AuthenticatorData.FLAG.UP
    if uv:
        flags |= AuthenticatorData.FLAG.UV
    count = cred.counter + 1 if counter is None else counter
    auth = AuthenticatorData.create(hashlib.sha256(rp_id.encode()).digest(), flags, count)
    signature = cred.sign(bytes(auth) + client.hash)
    # fido2's own verifier must accept what it is given as a good signature.
    k = cose.CoseKey.parse(cbor.decode(cred.cose_key()))
    k.verify(bytes(auth) + client.hash, signature)
    cred.counter = max(cred.counter, count)
    return bytes(auth), bytes(client), signature


def add_signature(token, cred, kid, approved_at, **kw):
    header = {"alg": cred.alg, "kid": kid, "approved_at": approved_at, "crit": ["webauthn"],
              "webauthn": b64(cred.id)}
    protected = b64(json.dumps(header, separators=(",", ":")).encode())
    auth, client, sig = assertion(cred, protected, token["payload"], **kw)
    token.setdefault("signatures", []).append({
        "protected": protected, "signature": b64(sig),
        "authenticatorData": b64(auth), "clientDataJSON": b64(client)})
    return token


def claims(doc="ab" * 32, seal="contract", amount=1_250_000, jti="wa-1"):
    return {"jti": jti, "seal": seal,
            "doc": {"sha256": doc, "type": "contract"},
            "amount": {"value": amount, "currency": "CNY"},
            "dept": "sales", "scope": "", "applicant": "zhao.lei", "purpose": "vectors",
            "iat": 1_000, "nbf": 1_000, "exp": 2_000, "uses": 1}


def unsigned(c):
    return {"payload": b64(json.dumps(c, separators=(",", ":")).encode()), "signatures": []}


def vectors():
    rp, origin = "approvals.example.test", "https://approvals.example.test"
    es, ed = Credential.new("ES256", 7), Credential.new("EdDSA", 9)
    cases = []

    def case(name, expect, cred=es, passkey=0, needs_uv=True, tok=None, **kw):
        t = tok or unsigned(claims(jti=f"wa-{len(cases)}"))
        kw.setdefault("rp_id", rp)
        kw.setdefault("origin", origin)
        add_signature(t, cred, "zhang.wei", 1_100, **kw)
        cases.append({"name": name, "token": json.dumps(t), "passkey": passkey,
                      "needs_uv": needs_uv, "expect": expect,
                      "sign_count": cred.counter if expect == "ok" else 0})

    case("es256 with user verification", "ok")
    case("eddsa with user verification", "ok", cred=ed, passkey=1)
    case("presence only, where the level does not ask for verification", "ok", uv=False,
         needs_uv=False)
    case("presence only, where the level asks for verification",
         "webauthn_user_verification", uv=False)
    case("no user presence", "webauthn_user_presence", up=False, uv=False, needs_uv=False)
    case("another origin", "webauthn_origin", origin="https://approvals.example.test.evil.cn")
    case("another relying party", "webauthn_rp_id", rp_id="evil.example")
    case("a registration's client data", "webauthn_type", kind="webauthn.create")
    # The challenge of another approval: same header, other claims (another document).
    other = unsigned(claims(doc="cd" * 32, jti="wa-other"))
    header = {"alg": "ES256", "kid": "zhang.wei", "approved_at": 1_100, "crit": ["webauthn"],
              "webauthn": b64(es.id)}
    protected = b64(json.dumps(header, separators=(",", ":")).encode())
    case("an assertion for another document", "webauthn_challenge",
         challenge_input=f"{protected}.{other['payload']}")
    # An assertion lifted whole from one token into another.
    donor = add_signature(unsigned(claims(amount=99, jti="wa-donor")), es, "zhang.wei", 1_100,
                          rp_id=rp, origin=origin)
    thief = unsigned(claims(jti="wa-donor"))
    thief["signatures"] = donor["signatures"]
    cases.append({"name": "an assertion replayed on another token (another amount)",
                  "token": json.dumps(thief), "passkey": 0, "needs_uv": True,
                  "expect": "webauthn_challenge", "sign_count": 0})
    # The registered credential's id and algorithm, another key's signature.
    impostor = Credential("ES256", Credential.new("ES256", 8).key, es.id)
    case("a signature by another key", "bad_signature", cred=impostor)
    # A good assertion whose signature bytes were changed.
    bad = add_signature(unsigned(claims(jti="wa-bad")), es, "zhang.wei", 1_100,
                        rp_id=rp, origin=origin)
    raw = bytearray(unb64(bad["signatures"][0]["signature"]))
    raw[-1] ^= 1
    bad["signatures"][0]["signature"] = b64(bytes(raw))
    cases.append({"name": "a changed signature", "token": json.dumps(bad), "passkey": 0,
                  "needs_uv": True, "expect": "bad_signature", "sign_count": 0})
    # Flags changed after signing: the signature covers them.
    flip = add_signature(unsigned(claims(jti="wa-flip")), es, "zhang.wei", 1_100,
                         rp_id=rp, origin=origin, uv=False)
    auth = bytearray(unb64(flip["signatures"][0]["authenticatorData"]))
    auth[32] |= 0x04
    flip["signatures"][0]["authenticatorData"] = b64(bytes(auth))
    cases.append({"name": "user verification set after signing", "token": json.dumps(flip),
                  "passkey": 0, "needs_uv": True, "expect": "bad_signature", "sign_count": 0})
    return {"rp_id": rp, "origin": origin,
            "passkeys": [{"credential_id": b64(c.id), "cose_key": b64(c.cose_key())}
                         for c in (es, ed)],
            "cases": cases}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register")
    r.add_argument("--dir", required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--alg", default="ES256")
    r.add_argument("--rp-id", required=True)
    a = sub.add_parser("approve")
    a.add_argument("--dir", required=True)
    a.add_argument("--name", required=True)
    a.add_argument("--origin", required=True)
    a.add_argument("--rp-id")
    a.add_argument("--no-uv", action="store_true")
    a.add_argument("--no-up", action="store_true")
    a.add_argument("--type", default="webauthn.get")
    a.add_argument("--counter", type=int)
    a.add_argument("--approved-at", type=int)
    a.add_argument("--challenge-from", help="a token whose signing input to sign instead")
    sub.add_parser("vectors")
    args = p.parse_args()
    if args.cmd == "vectors":
        json.dump(vectors(), sys.stdout, indent=1)
        print()
        return
    path = Path(args.dir) / f"{args.name}.json"
    if args.cmd == "register":
        cred = Credential.new(args.alg)
        cred.save(path)
        (Path(args.dir) / f"{args.name}.rp").write_text(args.rp_id)
        json.dump({"credential_id": b64(cred.id), "public_key": b64(cred.cose_key()),
                   "rp_id": args.rp_id, "attestation": "none"}, sys.stdout)
        print()
        return
    cred = Credential.load(path)
    rp_id = args.rp_id or (Path(args.dir) / f"{args.name}.rp").read_text()
    token = json.loads(sys.stdin.read())
    approved_at = args.approved_at or int(time.time()) - 5
    challenge_input = None
    if args.challenge_from:
        other = json.loads(Path(args.challenge_from).read_text())
        header = {"alg": cred.alg, "kid": args.name, "approved_at": approved_at,
                  "crit": ["webauthn"], "webauthn": b64(cred.id)}
        protected = b64(json.dumps(header, separators=(",", ":")).encode())
        challenge_input = f"{protected}.{other['payload']}"
    add_signature(token, cred, args.name, approved_at,
                  rp_id=rp_id, origin=args.origin, up=not args.no_up, uv=not args.no_uv,
                  kind=args.type, counter=args.counter, challenge_input=challenge_input)
    cred.save(path)
    json.dump(token, sys.stdout)
    print()


if __name__ == "__main__":
    main()
