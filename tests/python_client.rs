//! A client in another language: Python code generated from proto/ stamps through the socket,
//! and the signature it receives verifies with openssl.

mod common;

use base64::Engine;
use common::*;
use std::path::Path;
use std::process::Command;

#[test]
fn python_client_generated_from_proto_stamps() {
    let daemon = Daemon::start(&Opts::default());
    let work = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protoc = Command::new(env!("SEALGATE_PROTOC"))
        .arg(format!("--python_out={}", work.path().display()))
        .arg("-I")
        .arg(root.join("proto"))
        .arg(root.join("proto/sealgate/v1/sealgate.proto"))
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let document = work.path().join("contract.txt");
    std::fs::write(&document, "租赁合同 lease agreement, 3 pages").unwrap();
    let token = work.path().join("token");
    for seal in ["contract", "finance", "official"] {
        std::fs::write(
            &token,
            token_for(seal, &sha256(&std::fs::read(&document).unwrap())),
        )
        .unwrap();
        let python = std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&python)
            .arg(root.join("tests/python/stamp_client.py"))
            .arg(work.path())
            .arg(&daemon.socket)
            .arg(seal)
            .arg(&document)
            .arg(&token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python client failed (is the protobuf package installed?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["protocol_version"], 1);
        assert_eq!(v["caller"], "test-app");
        assert!(v["seals"].as_array().unwrap().iter().any(|s| s == seal));
        let b64 = |k: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(v[k].as_str().unwrap())
                .unwrap()
        };
        assert!(openssl_verify(
            v["algorithm"].as_str().unwrap(),
            &b64("public_key_spki"),
            &std::fs::read(&document).unwrap(),
            &b64("signature"),
        ));
    }
}
