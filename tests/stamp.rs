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

/// A CMS detached signature (.p7s) for every demo seal algorithm verifies with openssl against
/// the document and the demo CA, and no longer once one byte of the document changes; the
/// audit log checks each one's signed attributes against the approved digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cms_detached_signature_verifies_with_openssl_for_every_algorithm() {
    use sealgate::protocol::pb;
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let totp = enroll(&mut c, "zhao.lei").await;
    let work = tempfile::tempdir().unwrap();
    for (i, seal) in ["contract", "finance", "official", "official-pkcs1"]
        .iter()
        .enumerate()
    {
        let doc = format!("contract 2026-{i:03} between Shanghai and Shenzhen\n").into_bytes();
        let digest = sha256(&doc);
        // The approval names the document's SHA-512 too (Ed25519's CMS message digest).
        let mut a = Approval::for_seal(seal, &digest);
        a.claims.doc.sha512 = Some(hex::encode(<sha2::Sha512 as sha2::Digest>::digest(&doc)));
        let r = c
            .stamp_request(pb::StampRequest {
                seal_id: seal.to_string(),
                document_sha256: digest.clone(),
                approval_token: a.token(),
                purpose: String::new(),
                mfa_code: if *seal == "official-pkcs1" {
                    totp_code(&totp, 0)
                } else {
                    String::new()
                },
                container: pb::Container::CmsDetached as i32,
            })
            .await
            .unwrap();
        assert_eq!(
            r.status,
            sealgate::protocol::Status::Ok as i32,
            "{seal}: {}",
            r.message
        );
        let Some(sealgate::protocol::response::Body::Stamp(s)) = r.body else {
            panic!("no stamp")
        };
        assert!(!s.container.is_empty(), "{seal}: no container");
        let p7s = work.path().join(format!("{seal}.p7s"));
        let file = work.path().join(format!("{seal}.txt"));
        std::fs::write(&p7s, &s.container).unwrap();
        std::fs::write(&file, &doc).unwrap();
        let verify = |content: &std::path::Path| {
            std::process::Command::new("openssl")
                .args([
                    "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any", "-in",
                ])
                .arg(&p7s)
                .arg("-content")
                .arg(content)
                .arg("-CAfile")
                .arg(demo().dir.join("ca/ca.crt"))
                .args(["-out", "/dev/null"])
                .output()
                .unwrap()
        };
        // OpenSSL 3.0 has no EdDSA in CMS: Ed25519 is checked with asn1crypto and Python's
        // cryptography instead.
        let python = std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let check = |content: &std::path::Path| -> bool {
            if *seal == "finance" {
                Command::new(&python)
                    .arg(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/tests/python/verify_cms_ed25519.py"
                    ))
                    .arg(&p7s)
                    .arg(content)
                    .arg(demo().dir.join("ca/ca.crt"))
                    .output()
                    .unwrap()
                    .status
                    .success()
            } else {
                let out = verify(content);
                if !out.status.success() {
                    eprintln!("{seal}: {}", String::from_utf8_lossy(&out.stderr));
                }
                out.status.success()
            }
        };
        assert!(check(&file), "{seal}: the .p7s does not verify");
        let mut changed = doc.clone();
        changed[5] ^= 1;
        let other = work.path().join(format!("{seal}.changed"));
        std::fs::write(&other, &changed).unwrap();
        assert!(!check(&other), "{seal}: a changed document verifies");
    }
    // Ed25519 without the document's SHA-512 in the approval: refused before any use is spent;
    // the same approval then stamps a bare signature.
    let digest = sha256(b"an invoice");
    let token = token_for("finance", &digest);
    let ask = |container: pb::Container| pb::StampRequest {
        seal_id: "finance".into(),
        document_sha256: digest.clone(),
        approval_token: token.clone(),
        purpose: String::new(),
        mfa_code: String::new(),
        container: container as i32,
    };
    let r = c
        .stamp_request(ask(pb::Container::CmsDetached))
        .await
        .unwrap();
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    assert!(r.message.contains("doc.sha512"), "{}", r.message);
    let r = c.stamp_request(ask(pb::Container::Raw)).await.unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let (code, out) = audit_verify(&d.db());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("5 stamp signatures checked"), "{out}");
}

/// From the command line: `token new --file` names the document's SHA-256 and SHA-512, and
/// `stamp --format p7s --out F` writes a .p7s that openssl verifies against the file.
#[test]
fn sealctl_writes_a_p7s_that_openssl_verifies() {
    let d = Daemon::start(&Opts::default());
    let work = tempfile::tempdir().unwrap();
    let doc = work.path().join("lease.txt");
    std::fs::write(&doc, "lease of the Pudong warehouse, 2027\n").unwrap();
    let token = work.path().join("approval.json");
    let p7s = work.path().join("lease.p7s");
    let run = |args: &[&str]| {
        let out = Command::new(SEALCTL)
            .env("SEALGATE_SOCKET", &d.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (f, t, p) = (
        doc.to_str().unwrap(),
        token.to_str().unwrap(),
        p7s.to_str().unwrap(),
    );
    run(&[
        "token",
        "new",
        "--seal",
        "contract",
        "--file",
        f,
        "--doc-type",
        "contract",
        "--dept",
        "sales",
        "--applicant",
        "zhao.lei",
        "--out",
        t,
    ]);
    let claims = run(&["--json", "token", "inspect", t]);
    assert!(claims.contains("sha512"), "{claims}");
    let key = demo().dir.join("approvers/zhang.wei.key");
    run(&[
        "token",
        "sign",
        "--yes",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "zhang.wei",
        t,
    ]);
    run(&[
        "stamp", "--seal", "contract", "--file", f, "--token", t, "--format", "p7s", "--out", p,
    ]);
    let out = Command::new("openssl")
        .args([
            "cms", "-verify", "-binary", "-inform", "DER", "-purpose", "any", "-in", p,
        ])
        .args(["-content", f, "-CAfile"])
        .arg(demo().dir.join("ca/ca.crt"))
        .args(["-out", "/dev/null"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sealctl verify` checks a .p7s against its document and the demo CA, finds its stamp in the
/// log with applicant and approvers, and says so loudly when the log does not hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealctl_verify_traces_a_p7s_to_its_record_and_names_one_the_log_lacks() {
    use sealgate::protocol::pb;
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let work = tempfile::tempdir().unwrap();
    let doc = b"framework agreement 2027, Suzhou plant\n".to_vec();
    let digest = sha256(&doc);
    let r = c
        .stamp_request(pb::StampRequest {
            seal_id: "contract".into(),
            document_sha256: digest.clone(),
            approval_token: token_for("contract", &digest),
            purpose: String::new(),
            mfa_code: String::new(),
            container: pb::Container::CmsDetached as i32,
        })
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let Some(response::Body::Stamp(s)) = r.body else {
        panic!("no stamp")
    };
    let (file, p7s) = (work.path().join("doc.txt"), work.path().join("doc.p7s"));
    std::fs::write(&file, &doc).unwrap();
    std::fs::write(&p7s, &s.container).unwrap();
    let ca = demo().dir.join("ca/ca.crt");
    let verify = |db: &std::path::Path| {
        let out = Command::new(SEALCTL)
            .args(["--json", "verify"])
            .arg(&file)
            .arg("--p7s")
            .arg(&p7s)
            .arg("--ca")
            .arg(&ca)
            .arg("--db")
            .arg(db)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v)
    };
    let (code, v) = verify(&d.db());
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["trusted"], true);
    assert_eq!(v["record"]["applicant"], "zhao.lei");
    assert_eq!(v["record"]["approvers"][0]["id"], "zhang.wei");
    assert_eq!(v["record"]["approvers"][0]["level"], 1);
    assert_eq!(v["record"]["device"], "demo-hsm");
    assert_eq!(v["record"]["log_verifies_to_it"], true);
    // A CA that did not issue the seal's certificate (the finance seal's own certificate).
    let out = Command::new(SEALCTL)
        .args(["--json", "verify"])
        .arg(&file)
        .arg("--p7s")
        .arg(&p7s)
        .arg("--ca")
        .arg(demo().dir.join("ca/finance-seal.crt"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["trusted"], false, "{v}");
    // Another state directory on the same token: the seal's signature, but no record of it.
    let other = Daemon::start(&Opts::default());
    let (code, v) = verify(&other.db());
    assert_eq!(code, Some(1), "{v}");
    assert!(
        v["findings"][0]
            .as_str()
            .unwrap()
            .starts_with("NO RECORD IN THIS LOG"),
        "{v}"
    );
}

/// The daemon signs with session copies of its keys (`device::pkcs11::session_copy`). On the
/// real token: the copy is a session object that stays private, sensitive and not extractable,
/// and its signature verifies under the key's public half.
#[test]
fn a_session_copy_of_a_seal_key_is_as_protected_as_the_key_and_signs_for_it() {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use sha2::Digest;
    let login = token_session("sealgate-demo", &demo().pin(), false);
    let find = |class| {
        login
            .find_objects(&[
                Attribute::Class(class),
                Attribute::Label(b"contract-seal".to_vec()),
                Attribute::Token(true),
            ])
            .unwrap()[0]
    };
    let key = find(ObjectClass::PRIVATE_KEY);
    let copy = sealgate::device::pkcs11::session_copy(&login, key, &"contract-seal");
    assert_ne!(copy, key, "SoftHSM makes session copies");
    let attrs = login
        .get_attributes(
            copy,
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
            ],
        )
        .unwrap();
    let flag = |want: AttributeType| {
        attrs.iter().find_map(|a| match (a, want) {
            (Attribute::Token(v), AttributeType::Token)
            | (Attribute::Private(v), AttributeType::Private)
            | (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Extractable(v), AttributeType::Extractable) => Some(*v),
            _ => None,
        })
    };
    assert_eq!(flag(AttributeType::Token), Some(false));
    assert_eq!(flag(AttributeType::Private), Some(true));
    assert_eq!(flag(AttributeType::Sensitive), Some(true));
    assert_eq!(flag(AttributeType::Extractable), Some(false));
    // Its signature is the key's.
    let digest: [u8; 32] = sha2::Sha256::digest(b"a contract").into();
    let (mechanism, data) = sealgate::device::pkcs11::sign_mechanism(
        sealgate::device::Algorithm::EcdsaP256Sha256,
        &digest,
    );
    let signature = login.sign(&mechanism, copy, &data).unwrap();
    let public = find(ObjectClass::PUBLIC_KEY);
    let point = match &login
        .get_attributes(public, &[AttributeType::EcPoint])
        .unwrap()[0]
    {
        Attribute::EcPoint(der) => der[2..].to_vec(), // an OCTET STRING of 65 bytes
        other => panic!("no EC point: {other:?}"),
    };
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let signature = p256::ecdsa::Signature::from_slice(&signature).unwrap();
    verifying.verify_prehash(&digest, &signature).unwrap();
}

/// A token that will not copy a key (`CKA_COPYABLE` false, as a token may keep its keys): the
/// daemon signs with the token object itself, its stamps and the log's checkpoints alike, and
/// every signature verifies (openssl for the stamps, `sealctl audit verify` for the log).
#[tokio::test]
async fn a_key_the_token_will_not_copy_signs_as_the_token_object() {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    let (label, pin) = ("no-key-copies", "27182818");
    own_token(label, pin);
    {
        // This process's own look at the token, closed before the daemon starts.
        let session = token_session(label, pin, true);
        // SoftHSM takes CKA_COPYABLE only when a key is made: two more keys, made that way.
        let p256 = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        for (i, key) in ["k-kept", "audit-kept"].iter().enumerate() {
            let named = |mut t: Vec<Attribute>| {
                t.extend([
                    Attribute::Token(true),
                    Attribute::Label(key.as_bytes().to_vec()),
                    Attribute::Id(vec![0xc0, i as u8]),
                ]);
                t
            };
            let (_, handle) = session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &named(vec![
                        Attribute::EcParams(p256.clone()),
                        Attribute::Verify(true),
                    ]),
                    &named(vec![
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        Attribute::Copyable(false),
                    ]),
                )
                .unwrap();
            assert_eq!(
                sealgate::device::pkcs11::session_copy(&session, handle, key),
                handle,
                "the token copied {key}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = own_token_config(dir.path(), label, pin)
        .replace("key_label = \"k\"", "key_label = \"k-kept\"")
        .replace("key_label = \"audit\"", "key_label = \"audit-kept\"");
    assert!(config.contains("\"k-kept\"") && config.contains("\"audit-kept\""));
    config += &format!(
        "\n[[approver]]\nid = \"zhang.wei\"\nrole = \"dept_head\"\ndepartment = \"sales\"\npublic_key_file = \"{}\"\n",
        demo().dir.join("approvers/zhang.wei.pub.pem").display()
    );
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let mut c = d.client().await;
    let response::Body::DescribeSeal(seal) = ok(c.describe_seal("s").await.unwrap()) else {
        panic!("wrong body")
    };
    for i in 0..3 {
        let document = format!("a contract signed with a key that stays put, no. {i}");
        let s = stamp_ok(&mut c, "s", &sha256(document.as_bytes())).await;
        assert!(
            openssl_verify(
                &s.algorithm,
                &seal.public_key_spki,
                document.as_bytes(),
                &s.signature
            ),
            "openssl rejected stamp {i}"
        );
    }
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = sealgate::store::db_path(&dir.path().join("state"));
    // The log verifies under the token's audit key, read out by pkcs11-tool and openssl.
    let der = dir.path().join("audit-kept.der");
    let pem = dir.path().join("audit-kept.pem");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .args(["--module", SOFTHSM, "--token-label", label, "--read-object"])
        .args(["--type", "pubkey", "--label", "audit-kept", "--output-file"])
        .arg(&der));
    run(Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(&pem));
    let out = Command::new(SEALCTL)
        .args(["audit", "verify", "--db"])
        .arg(&db)
        .arg("--key")
        .arg(&pem)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(records(&db, Some("stamp.completed")).len(), 3);
}

/// A token whose own file (`token.object`) another process is writing at the moment the
/// probe reads it: SoftHSM answers GetTokenInfo with CKR_GENERAL_ERROR. (After a real torn
/// read it goes on doing so, and makes no token object, the log's witness among them, until
/// the module is initialised again; a separate program showed that on this SoftHSM.) Made here
/// by hand: the file torn (a new generation, the first attribute cut short) for a few
/// seconds, then whole again. Meanwhile a stamp succeeds or is refused as `DEVICE_UNAVAILABLE`
/// (or `AUDIT_UNAVAILABLE`: the audit key is on the same token), nothing else; once the file
/// is whole the device comes back by itself (a new `C_Initialize`), stamps succeed, its going
/// down is an alert, and the witness takes the log's new heads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The lock keeps other tests of this binary from making tokens (softhsm2-util reads every
// token) while this one's files are damaged; nothing this task awaits takes it.
#[allow(clippy::await_holding_lock)]
async fn a_torn_read_of_the_tokens_own_file_takes_it_down_until_it_mends() {
    let (label, pin) = ("torn-read", "16180339");
    own_token(label, pin);
    let dir = tempfile::tempdir().unwrap();
    let mut config = own_token_config(dir.path(), label, pin);
    config += &format!(
        "\n[[approver]]\nid = \"zhang.wei\"\nrole = \"dept_head\"\ndepartment = \"sales\"\npublic_key_file = \"{}\"\n",
        demo().dir.join("approvers/zhang.wei.pub.pem").display()
    );
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let mut c = d.client().await;
    stamp_ok(&mut c, "s", &sha256(b"before")).await;
    // The token's own file: the one whose token.object holds the label.
    let file = std::fs::read_dir(demo().dir.join("tokens"))
        .unwrap()
        .map(|e| e.unwrap().path().join("token.object"))
        .find(|f| {
            std::fs::read(f).is_ok_and(|b| b.windows(label.len()).any(|w| w == label.as_bytes()))
        })
        .expect("the token's file");
    let _files = TOKEN_FILES.lock().unwrap_or_else(|p| p.into_inner());
    let whole = std::fs::read(&file).unwrap();
    let mut torn = whole[..12].to_vec();
    torn[7] ^= 1;
    std::fs::write(&file, &torn).unwrap();
    let mut stamps = 0;
    let mut refused = 0;
    let stamp = |n: usize| {
        let digest = sha256(format!("a stamp beside a torn token file, no. {n}").as_bytes());
        let token = token_for("s", &digest);
        (digest, token)
    };
    // The refusals of a device that is down: before the approval is spent, or (the audit key
    // is on the same token) when the checkpoint of its authorisation cannot be signed.
    let down = |status: i32| {
        status == Status::DeviceUnavailable as i32 || status == Status::AuditUnavailable as i32
    };
    let torn_at = std::time::Instant::now();
    while torn_at.elapsed() < std::time::Duration::from_millis(2500) {
        let (digest, token) = stamp(stamps);
        let r = c.stamp("s", &digest, &token, "").await.unwrap();
        if down(r.status) {
            refused += 1;
        } else {
            assert_eq!(r.status, Status::Ok as i32, "stamp {stamps}: {}", r.message);
        }
        stamps += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        refused > 0,
        "no stamp was refused while the token's file was torn"
    );
    std::fs::write(&file, &whole).unwrap();
    drop(_files);
    let mended = std::time::Instant::now();
    loop {
        let (digest, token) = stamp(stamps);
        stamps += 1;
        let r = c.stamp("s", &digest, &token, "").await.unwrap();
        if r.status == Status::Ok as i32 {
            break;
        }
        assert!(down(r.status), "{} {}", r.status, r.message);
        assert!(
            mended.elapsed() < std::time::Duration::from_secs(5),
            "the device did not come back: {}",
            r.message
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let response::Body::DescribeSeal(s) = ok(c.describe_seal("s").await.unwrap()) else {
        panic!("wrong body")
    };
    assert_eq!(s.device_status, pb::DeviceStatus::Ready as i32);
    // The device's going down is in the log, as an alert.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = c.watch_alerts(50, false).await.unwrap();
        let Some(response::Body::Alerts(alerts)) = r.body else {
            panic!("{}", r.message)
        };
        if alerts.records.iter().any(|a| a.reason == "device_removed") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no alert: {:?}",
            alerts.records
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Two more heads, a witness spacing apart: the token takes them.
    let back_at = d.log().len();
    for n in 0..2 {
        tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
        stamp_ok(&mut c, "s", &sha256(format!("after, no. {n}").as_bytes())).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let after = d.log()[back_at..].to_owned();
    assert!(
        !after.contains("did not take the log's new head"),
        "the witness failed after the device came back:\n{after}"
    );
    assert!(d.stop().success());
}
