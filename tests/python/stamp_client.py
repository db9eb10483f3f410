#!/usr/bin/env python3
"""A sealgate client in Python, to show the wire contract is usable outside Rust.

Usage: stamp_client.py GENERATED_DIR SOCKET SEAL DOCUMENT_FILE TOKEN_FILE

GENERATED_DIR holds the code protoc generated from proto/sealgate/v1/sealgate.proto
(protoc --python_out=GENERATED_DIR -I proto proto/sealgate/v1/sealgate.proto).
Prints one JSON object: the seal's algorithm, public key and the stamp's signature (base64).
"""
import base64
import hashlib
import json
import socket
import struct
import sys

sys.path.insert(0, sys.argv[1])
from sealgate.v1 import sealgate_pb2 as pb  # noqa: E402


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("daemon closed the connection")
        data += chunk
    return data


def call(sock, request):
    payload = request.SerializeToString()
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    (length,) = struct.unpack(">I", read_exact(sock, 4))
    response = pb.Response()
    response.ParseFromString(read_exact(sock, length))
    if response.request_id != request.request_id:
        raise RuntimeError("response for another request")
    if response.status != pb.STATUS_OK:
        raise RuntimeError(f"{pb.Status.Name(response.status)}: {response.message}")
    return response


def main():
    _, _, path, seal, document_file, token_file = sys.argv
    with open(document_file, "rb") as f:
        digest = hashlib.sha256(f.read()).digest()
    with open(token_file, "rb") as f:
        token = f.read()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    hello = call(sock, pb.Request(request_id=1, hello=pb.HelloRequest(protocol_version=1, client_name="python")))
    seals = call(sock, pb.Request(request_id=2, list_seals=pb.ListSealsRequest()))
    described = call(sock, pb.Request(request_id=3, describe_seal=pb.DescribeSealRequest(seal_id=seal)))
    stamped = call(
        sock,
        pb.Request(
            request_id=4,
            stamp=pb.StampRequest(seal_id=seal, document_sha256=digest, approval_token=token, purpose="python client"),
        ),
    )
    print(json.dumps({
        "protocol_version": hello.hello.protocol_version,
        "caller": hello.hello.caller,
        "seals": [s.id for s in seals.list_seals.seals],
        "algorithm": stamped.stamp.algorithm,
        "public_key_spki": base64.b64encode(described.describe_seal.public_key_spki).decode(),
        "signature": base64.b64encode(stamped.stamp.signature).decode(),
    }))


if __name__ == "__main__":
    main()
