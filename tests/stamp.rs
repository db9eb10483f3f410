//! The stamp path end to end: the real daemon, the real SoftHSM token made by softhsm-setup.sh,
//! signatures checked by openssl.

mod common;

use common::*;
use sealgate::protocol::{pb, response, Status};
use std::process::Command;

fn ok(resp: sealgate::protocol::Response) -> response::Body {
    assert_eq!(
        resp.status,
        Status::Ok as i32,
        "status {} {}",
        resp.status,
        resp.message
    );
    resp.body.expect("body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_demo_seal_stamps_and_openssl_verifies() {
    let daemon = Daemon::start(&Opts::default());
    let mut c = daemon.client().await;
    let document = "采购合同 No. 2026-118: 100 units at CNY 1,250.00".as_bytes();
    for seal in ["contract", "finance", "official", "official-pkcs1"] {
        let response::Body::DescribeSeal(d) = ok(c.describe_seal(seal).await.unwrap()) else {
            panic!("wrong body")
        };
        assert_eq!(d.device_status, pb::DeviceStatus::Ready as i32);
        assert_eq!(d.device_profile, "softhsm2");
        let digest = sha256(document);
        let mut approval = Approval::for_seal(seal, &digest);
        let mut code = String::new();
        if seal == "official-pkcs1" {
            // This seal's test policy asks for the applicant's TOTP code.
            approval.claims.applicant = "pkcs1.applicant".into();
            code = totp_code(&enroll(&mut c, "pkcs1.applicant").await, 0);
        }
        let response::Body::Stamp(s) = ok(c
            .stamp_with_mfa(seal, &digest, &approval.token(), "test", &code)
            .await
            .unwrap())
        else {
            panic!("wrong body")
        };
        assert_eq!(s.algorithm, d.algorithm);
        assert!(
            openssl_verify(&s.algorithm, &d.public_key_spki, document, &s.signature),
            "{seal}: openssl rejected the signature"
        );
        assert!(
            !openssl_verify(
                &s.algorithm,
                &d.public_key_spki,
                b"another document",
                &s.signature
            ),
            "{seal}: openssl accepted the signature for another document"
        );
        // The certificate on the token carries the same key.
        if seal != "official-pkcs1" {
            assert!(!d.certificate_der.is_empty(), "{seal} has no certificate");
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("c.der"), &d.certificate_der).unwrap();
            let out = Command::new("openssl")
                .args(["x509", "-inform", "DER", "-pubkey", "-noout", "-in"])
                .arg(dir.path().join("c.der"))
                .output()
                .unwrap();
            assert!(out.status.success());
            let pem = String::from_utf8(out.stdout).unwrap();
            assert_eq!(
                pem,
                sealgate::device::keys::pem("PUBLIC KEY", &d.public_key_spki)
            );
        }
    }
    // Neither the PIN nor any part of an approval token reaches the log.
    let pin = demo().pin();
    let log = daemon.log();
    assert!(log.contains("stamped"), "the log is empty: {log}");
    assert!(!log.contains(&pin));
    let token: serde_json::Value =
        serde_json::from_slice(&token_for("contract", &sha256(document))).unwrap();
    let payload = token["payload"].as_str().unwrap();
    assert!(!log.contains(&payload[..40]));
    assert!(daemon.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_sees_and_uses_only_its_seals() {
    let daemon = Daemon::start(&Opts {
        caller_seals: Some(vec!["contract".into()]),
        ..Opts::default()
    });
    let mut c = daemon.client().await;
    let response::Body::ListSeals(list) = ok(c.list_seals().await.unwrap()) else {
        panic!()
    };
    let ids: Vec<_> = list.seals.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["contract"]);
    let r = c
        .stamp("finance", &[0u8; 32], &token_for("finance", &[0u8; 32]), "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::PermissionDenied as i32, "{}", r.message);
    let r = c.describe_seal("finance").await.unwrap();
    assert_eq!(r.status, Status::PermissionDenied as i32);
    ok(c.stamp(
        "contract",
        &[0u8; 32],
        &token_for("contract", &[0u8; 32]),
        "",
    )
    .await
    .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_all_get_valid_stamps() {
    let daemon = Daemon::start(&Opts::default());
    let mut describe = daemon.client().await;
    let response::Body::DescribeSeal(d) = ok(describe.describe_seal("contract").await.unwrap())
    else {
        panic!()
    };
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let mut c = daemon.client().await;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for j in 0..20u32 {
                let doc = format!("document {i}-{j}").into_bytes();
                let r = c
                    .stamp(
                        "contract",
                        &sha256(&doc),
                        &token_for("contract", &sha256(&doc)),
                        "",
                    )
                    .await
                    .unwrap();
                assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
                let Some(response::Body::Stamp(s)) = r.body else {
                    panic!()
                };
                out.push((doc, s.signature));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 320);
    // Spot-check a sample with openssl (every one would only slow the suite).
    for (doc, sig) in all.iter().step_by(40) {
        assert!(openssl_verify(&d.algorithm, &d.public_key_spki, doc, sig));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    let daemon = Daemon::start(&Opts::default());
    let socket = daemon.socket.clone();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = daemon.client().await;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u32;
            loop {
                match c
                    .stamp(
                        "official",
                        &[7u8; 32],
                        &token_for("official", &[7u8; 32]),
                        "",
                    )
                    .await
                {
                    Ok(r) => {
                        // A request the daemon accepted is carried out, never cut short.
                        assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
                        done += 1;
                    }
                    Err(sealgate::protocol::client::ClientError::Closed) => return done,
                    Err(e) => panic!("unexpected client error: {e}"),
                }
            }
        }));
    }
    // Let every client complete at least one stamp before stopping.
    let mut probe = daemon.client().await;
    ok(probe
        .stamp(
            "official",
            &[1u8; 32],
            &token_for("official", &[1u8; 32]),
            "",
        )
        .await
        .unwrap());
    let status = tokio::task::spawn_blocking(move || daemon.stop())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    for t in tasks {
        t.await.unwrap();
    }
    assert!(!socket.exists(), "socket file left behind");
}

#[test]
fn sealctl_commands_work_and_report_errors() {
    let daemon = Daemon::start(&Opts::default());
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("invoice.pdf");
    std::fs::write(&doc, b"%PDF-1.7 invoice 0042").unwrap();
    let token = dir.path().join("token.jws");
    std::fs::write(
        &token,
        token_for("contract", &sha256(&std::fs::read(&doc).unwrap())),
    )
    .unwrap();
    let sealctl = |args: &[&str]| {
        Command::new(SEALCTL)
            .args(args)
            .env("SEALGATE_SOCKET", &daemon.socket)
            .output()
            .unwrap()
    };

    let out = sealctl(&["seals", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["seals"].as_array().unwrap().len(), 4);

    let out = sealctl(&["seal", "show", "finance", "--pem"]);
    assert!(out.status.success());
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.contains("BEGIN PUBLIC KEY") && pem.contains("BEGIN CERTIFICATE"));

    let sig = dir.path().join("sig");
    let out = sealctl(&[
        "stamp",
        "--seal",
        "contract",
        "--file",
        doc.to_str().unwrap(),
        "--token",
        token.to_str().unwrap(),
        "--purpose",
        "monthly invoice",
        "--out",
        sig.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["seal"], "contract");
    let out = sealctl(&["seal", "show", "contract", "--json"]);
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    use base64::Engine;
    let spki = base64::engine::general_purpose::STANDARD
        .decode(d["public_key_spki"].as_str().unwrap())
        .unwrap();
    assert!(openssl_verify(
        "ecdsa-p256-sha256",
        &spki,
        &std::fs::read(&doc).unwrap(),
        &std::fs::read(&sig).unwrap()
    ));

    let out = sealctl(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo-hsm"));

    let out = sealctl(&[
        "stamp",
        "--seal",
        "nope",
        "--sha256",
        &"ab".repeat(32),
        "--token",
        token.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("UNKNOWN_SEAL (6)"), "{err}");
}
