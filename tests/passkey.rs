//! Approvals made with passkeys (WebAuthn assertions), against the real daemon on SoftHSM: the
//! assertions come from a software passkey built on Python's `fido2` and `cryptography`
//! (tests/python/passkey.py), which shares no code with sealgate.

mod common;

use common::*;
use sealgate::protocol::Status;
use sealgate::token::{Amount, Token};
use std::path::Path;
use std::process::{Command, Stdio};

const ORIGIN: &str = "https://approvals.sealgate.test";
const RP_ID: &str = "approvals.sealgate.test";

fn python() -> String {
    std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs tests/python/passkey.py with `args`, `input` on its stdin; its stdout.
fn passkey(args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/passkey.py"
        ))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "passkey.py {args:?} (needs the fido2 and cryptography packages): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Registers a passkey for `id` and gives its `[[approver]]` entry.
fn register(dir: &Path, id: &str, role: &str, dept: &str, alg: &str) -> String {
    let d = dir.to_str().unwrap();
    let out = passkey(
        &[
            "register", "--dir", d, "--name", id, "--alg", alg, "--rp-id", RP_ID,
        ],
        "",
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    format!(
        "\n[[approver]]\nid = \"{id}\"\nrole = \"{role}\"\ndepartment = \"{dept}\"\n\n[[approver.passkey]]\ncredential_id = \"{}\"\npublic_key = \"{}\"\nrp_id = \"{}\"\nattestation = \"{}\"\n",
        v["credential_id"].as_str().unwrap(),
        v["public_key"].as_str().unwrap(),
        v["rp_id"].as_str().unwrap(),
        v["attestation"].as_str().unwrap(),
    )
}

/// A large contract (two levels: dept_head of sales, then an executive) for `digest`, unsigned.
fn large_contract(digest: &[u8]) -> Token {
    let mut a = Approval::for_seal("contract", digest);
    a.claims.amount = Some(Amount {
        value: 12_500_000,
        currency: "CNY".into(),
    });
    Token::unsigned(a.claims)
}

/// `token` with `id`'s passkey assertion added (more passkey.py flags in `more`).
fn approve(dir: &Path, token: &str, id: &str, more: &[&str]) -> String {
    let d = dir.to_str().unwrap();
    let mut args = vec!["approve", "--dir", d, "--name", id, "--origin", ORIGIN];
    args.extend_from_slice(more);
    passkey(&args, token)
}

/// `token` with li.na's JWS signature (a key file) added.
fn approve_by_key(token: &str) -> String {
    let mut t = Token::parse_for_signing(token.as_bytes()).unwrap();
    t.add_signature(&demo().approver_key("li.na"), "li.na", unix_now() - 3);
    t.to_json()
}

/// Records of `kind` for document `digest` in the daemon's log.
fn records(d: &Daemon, kind: &str, digest: &[u8]) -> u64 {
    sqlite3_value(
        &d.db(),
        &format!(
            "SELECT count(*) FROM audit WHERE kind = '{kind}' AND doc_sha256 = '{}'",
            hex::encode(digest)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passkey_approvals_stamp_and_every_forged_one_is_refused_before_the_device() {
    let keys = tempfile::tempdir().unwrap();
    let mut extra = format!("\n[webauthn]\norigins = [\"{ORIGIN}\"]\n");
    extra += &register(keys.path(), "chen.jing", "dept_head", "sales", "ES256");
    extra += &register(keys.path(), "sun.li", "executive", "management", "EdDSA");
    let d = Daemon::start(&Opts {
        extra,
        ..Opts::default()
    });
    let mut c = d.client().await;
    let k = keys.path();

    // Both levels by passkey: the dept head's ES256, the executive's EdDSA (verified).
    let digest = sha256(b"passkey contract 1");
    let token = large_contract(&digest).to_json();
    let token = approve(k, &token, "chen.jing", &[]);
    let token = approve(k, &token, "sun.li", &[]);
    let r = c
        .stamp("contract", &digest, token.as_bytes(), "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);
    let approvers = sqlite3(
        &d.db(),
        &format!(
            "SELECT approvers FROM audit WHERE kind = 'stamp.completed' AND doc_sha256 = '{}'",
            hex::encode(&digest)
        ),
    );
    let list: serde_json::Value = serde_json::from_str(approvers.trim()).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{approvers}");
    assert_eq!(
        (list[0]["id"].as_str(), list[0]["level"].as_u64()),
        (Some("chen.jing"), Some(1))
    );
    assert_eq!(
        (list[1]["id"].as_str(), list[1]["level"].as_u64()),
        (Some("sun.li"), Some(2))
    );
    for a in list {
        assert_eq!(a["passkey"]["user_verified"], true, "{a}");
        assert_eq!(a["passkey"]["sign_count"], 1, "{a}");
    }
    // `sealctl token inspect` shows what each assertion says of itself.
    let file = keys.path().join("token.json");
    std::fs::write(&file, &token).unwrap();
    let out = Command::new(SEALCTL)
        .args(["token", "inspect"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &shown["signatures"][1]["passkey"];
    assert_eq!(
        (&p["origin"], &p["type"], &p["user_verified"]),
        (&ORIGIN.into(), &"webauthn.get".into(), &true.into()),
        "{shown}"
    );

    // A passkey level and a key level in one token; the first level's passkey without user
    // verification, which the first level does not ask for.
    let digest = sha256(b"passkey contract 2");
    let token = large_contract(&digest).to_json();
    let token = approve(k, &token, "chen.jing", &["--no-uv"]);
    let token = approve_by_key(&token);
    let r = c
        .stamp("contract", &digest, token.as_bytes(), "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);

    // Refused, each with its reason, and in each nothing reaches the device.
    let before = sqlite3_value(
        &d.db(),
        "SELECT count(*) FROM audit WHERE kind = 'stamp.authorized'",
    );
    let other = tempfile::NamedTempFile::new().unwrap();
    let mut cases: Vec<(&str, Vec<u8>, String, &str)> = Vec::new();
    // The executive's level asks for user verification.
    let digest = sha256(b"passkey contract 3");
    let t = approve(k, &large_contract(&digest).to_json(), "chen.jing", &[]);
    let t = approve(k, &t, "sun.li", &["--no-uv"]);
    cases.push((
        "user verification off where the level asks for it",
        digest,
        t,
        "webauthn_user_verification",
    ));
    // An assertion made for another approval: another document...
    let digest = sha256(b"passkey contract 4");
    let elsewhere = large_contract(&sha256(b"another document")).to_json();
    std::fs::write(other.path(), &elsewhere).unwrap();
    let from = other.path().to_str().unwrap();
    let t = approve(
        k,
        &large_contract(&digest).to_json(),
        "chen.jing",
        &["--challenge-from", from],
    );
    let t = approve(k, &t, "sun.li", &[]);
    cases.push((
        "the dept head's assertion was for another document",
        digest,
        t,
        "webauthn_challenge",
    ));
    // ...another amount: a whole signature lifted from a small contract's token.
    let digest = sha256(b"passkey contract 5");
    let mut small = large_contract(&digest);
    small.claims.amount = Some(Amount {
        value: 10_000_001,
        currency: "CNY".into(),
    });
    let small = Token::unsigned(small.claims).to_json();
    let lifted = approve(k, &approve(k, &small, "chen.jing", &[]), "sun.li", &[]);
    let mut target: serde_json::Value =
        serde_json::from_str(&large_contract(&digest).to_json()).unwrap();
    let lifted: serde_json::Value = serde_json::from_str(&lifted).unwrap();
    target["signatures"] = lifted["signatures"].clone();
    cases.push((
        "assertions moved onto a token for another amount",
        digest,
        target.to_string(),
        "webauthn_challenge",
    ));
    // ...another seal: the official seal's approval presented for the contract seal's.
    let digest = sha256(b"passkey contract 6");
    let mut official = large_contract(&digest);
    official.claims.seal = "official".into();
    let official = Token::unsigned(official.claims).to_json();
    let lifted = approve(k, &approve(k, &official, "chen.jing", &[]), "sun.li", &[]);
    let mut target: serde_json::Value =
        serde_json::from_str(&large_contract(&digest).to_json()).unwrap();
    let lifted: serde_json::Value = serde_json::from_str(&lifted).unwrap();
    target["signatures"] = lifted["signatures"].clone();
    cases.push((
        "assertions moved from another seal's approval",
        digest,
        target.to_string(),
        "webauthn_challenge",
    ));
    // A page of another origin.
    let digest = sha256(b"passkey contract 7");
    let t = large_contract(&digest).to_json();
    let t = passkey(
        &[
            "approve",
            "--dir",
            k.to_str().unwrap(),
            "--name",
            "chen.jing",
            "--origin",
            "https://approvals.sealgate.test.example.cn",
        ],
        &t,
    );
    let t = approve(k, &t, "sun.li", &[]);
    cases.push(("another origin", digest, t, "webauthn_origin"));
    for (what, digest, token, reason) in &cases {
        let r = c
            .stamp("contract", digest, token.as_bytes(), "")
            .await
            .unwrap();
        assert_denied(&r, reason, what);
        assert_eq!(records(&d, "stamp.completed", digest), 0, "{what}");
    }
    assert_eq!(
        sqlite3_value(
            &d.db(),
            "SELECT count(*) FROM audit WHERE kind = 'stamp.authorized'",
        ),
        before,
        "no refused approval reached the writer's authorisation"
    );

    // A counter that goes back: an earlier counter in a later approval (a copied
    // authenticator). Refused by the ledger, recorded, and raised as an alert.
    let digest = sha256(b"passkey contract 8");
    let t = approve(
        k,
        &large_contract(&digest).to_json(),
        "chen.jing",
        &["--counter", "1"],
    );
    let t = approve(k, &t, "sun.li", &[]);
    let r = c
        .stamp("contract", &digest, t.as_bytes(), "")
        .await
        .unwrap();
    assert_denied(&r, "cloned_authenticator", "a counter that went back");
    assert_eq!(records(&d, "stamp.completed", &digest), 0);
    assert_eq!(records(&d, "stamp.denied", &digest), 1);
    let alerts = sqlite3_value(
        &d.db(),
        &format!(
            "SELECT count(*) FROM audit WHERE kind = 'alert' AND reason = 'cloned_authenticator' \
             AND doc_sha256 = '{}'",
            hex::encode(&digest)
        ),
    );
    // The alert is written in the batch after the refusal's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut alerts = alerts;
    while alerts == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        alerts = sqlite3_value(
            &d.db(),
            "SELECT count(*) FROM audit WHERE kind = 'alert' AND reason = 'cloned_authenticator'",
        );
    }
    assert_eq!(alerts, 1, "one cloned_authenticator alert");
    // The passkey goes on working with a counter that moves forward.
    let digest = sha256(b"passkey contract 9");
    let t = approve(k, &large_contract(&digest).to_json(), "chen.jing", &[]);
    let t = approve(k, &t, "sun.li", &[]);
    let r = c
        .stamp("contract", &digest, t.as_bytes(), "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);

    let (code, out) = audit_verify(&d.db());
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_passkey_needs_origins_and_a_good_cose_key() {
    let keys = tempfile::tempdir().unwrap();
    let entry = register(keys.path(), "chen.jing", "dept_head", "sales", "ES256");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sealgated.sock");
    // No [webauthn] origins.
    let text = config_text(demo(), &socket, &Opts::default()) + &entry;
    let (status, out) = run_to_exit(dir.path(), &text);
    assert!(!status.success());
    assert!(out.contains("no [webauthn] origins"), "{out}");
    // A public key that is not a COSE key.
    let text = config_text(demo(), &socket, &Opts::default())
        + &format!("\n[webauthn]\norigins = [\"{ORIGIN}\"]\n")
        + &entry.replace("public_key = \"", "public_key = \"AAAA");
    let (status, out) = run_to_exit(dir.path(), &text);
    assert!(!status.success());
    assert!(out.contains("COSE"), "{out}");
}

/// The last signature entry of a token (JSON), as the approval page sends it.
fn last_entry(token: &str) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_str(token).unwrap();
    v["signatures"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .to_string()
        .into_bytes()
}

async fn call(
    c: &mut sealgate::protocol::client::Client,
    body: sealgate::protocol::request::Body,
) -> sealgate::protocol::Response {
    c.call(body).await.unwrap()
}

fn application(r: &sealgate::protocol::Response) -> sealgate::protocol::pb::Application {
    use sealgate::protocol::response::Body;
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);
    match &r.body {
        Some(Body::Application(a)) => a.application.clone().unwrap(),
        other => panic!("not an application: {other:?}"),
    }
}

/// Applications at the socket: levels in policy order, each checked before it is recorded; a
/// passkey level and a key level; a start after kill -9 finds the open ones; the page's rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_advance_level_by_level_and_survive_a_crash() {
    use sealgate::protocol::pb;
    use sealgate::protocol::request::Body;
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let mut extra = format!("\n[webauthn]\norigins = [\"{ORIGIN}\"]\n");
    extra += &register(k, "chen.jing", "dept_head", "sales", "ES256");
    extra += &register(k, "sun.li", "executive", "management", "EdDSA");
    // First without the page's right (oversight): an applicant may submit and fetch, no more.
    let d = Daemon::start(&Opts {
        extra: extra.clone(),
        ..Opts::default()
    });
    let mut c = d.client().await;
    let digest = sha256(b"application contract 1");
    let token = large_contract(&digest).to_json();
    let submit = |token: &str| {
        Body::SubmitApplication(pb::SubmitApplicationRequest {
            token: token.as_bytes().to_vec(),
            document_pdf: Vec::new(),
        })
    };
    let a = application(&call(&mut c, submit(&token)).await);
    assert_eq!(
        (
            a.state.as_str(),
            a.next_role.as_str(),
            a.next_department.as_str(),
            a.approved
        ),
        ("pending", "dept_head", "sales", 0)
    );
    let id = a.id.clone();
    let r = call(
        &mut c,
        Body::ListApplications(pb::ListApplicationsRequest::default()),
    )
    .await;
    assert_eq!(r.status, Status::PermissionDenied as i32, "{}", r.message);
    let r = call(
        &mut c,
        Body::DecideApplication(pb::DecideApplicationRequest {
            application_id: id.clone(),
            signature: last_entry(&approve(k, &token, "chen.jing", &[])),
            reject_reason: String::new(),
        }),
    )
    .await;
    assert_eq!(r.status, Status::PermissionDenied as i32, "{}", r.message);
    let r = call(
        &mut c,
        Body::FetchApplication(pb::FetchApplicationRequest {
            application_id: id.clone(),
            document: false,
        }),
    )
    .await;
    assert_eq!(application(&r).state, "pending");
    // One application per id; a PDF that is not one is refused.
    let r = call(&mut c, submit(&token)).await;
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    let r = call(
        &mut c,
        Body::SubmitApplication(pb::SubmitApplicationRequest {
            token: large_contract(&sha256(b"x")).to_json().into_bytes(),
            document_pdf: b"not a pdf".to_vec(),
        }),
    )
    .await;
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    let (_, dir) = d.stop_keeping_state();

    // Now as the approval page (oversight), on the same state.
    let config = std::fs::read_to_string(dir.path().join("sealgate.toml"))
        .unwrap()
        .replacen("admin = true\n", "admin = true\noversight = true\n", 1);
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let mut c = d.client().await;
    let decide = |id: &str, entry: Vec<u8>, reason: &str| {
        Body::DecideApplication(pb::DecideApplicationRequest {
            application_id: id.into(),
            signature: entry,
            reject_reason: reason.into(),
        })
    };
    let list = |r: &sealgate::protocol::Response| match &r.body {
        Some(sealgate::protocol::response::Body::ListApplications(l)) => l.applications.clone(),
        _ => panic!("{} {}", r.reason, r.message),
    };
    let open = list(
        &call(
            &mut c,
            Body::ListApplications(pb::ListApplicationsRequest::default()),
        )
        .await,
    );
    assert_eq!(
        open.len(),
        1,
        "the open application was rebuilt from the log"
    );
    // Out of order: the executive first.
    let r = call(
        &mut c,
        decide(&id, last_entry(&approve(k, &token, "sun.li", &[])), ""),
    )
    .await;
    assert_denied(
        &r,
        "level_order",
        "the executive before the department head",
    );
    // An assertion made for another approval.
    let elsewhere = large_contract(&sha256(b"another contract")).to_json();
    let r = call(
        &mut c,
        decide(
            &id,
            last_entry(&approve(k, &elsewhere, "chen.jing", &[])),
            "",
        ),
    )
    .await;
    assert_denied(
        &r,
        "webauthn_challenge",
        "an assertion for another document",
    );
    // An approval's assertion does not pass as a rejection.
    let approval = last_entry(&approve(k, &token, "chen.jing", &[]));
    let r = call(&mut c, decide(&id, approval.clone(), "not needed")).await;
    assert_denied(&r, "webauthn_challenge", "an approval sent as a rejection");
    assert_eq!(records(&d, "application.approved", &digest), 0);
    // Level 1 by passkey.
    let a = application(&call(&mut c, decide(&id, approval, "")).await);
    assert_eq!(
        (a.state.as_str(), a.approved, a.next_role.as_str()),
        ("pending", 1, "executive")
    );

    // kill -9; the application is found again with its first level.
    let d = d.crash_and_restart();
    let mut c = d.client().await;
    let open = list(
        &call(
            &mut c,
            Body::ListApplications(pb::ListApplicationsRequest::default()),
        )
        .await,
    );
    assert_eq!((open.len(), open[0].approved), (1, 1));
    // As the page asks for one approver: only what waits for their role.
    for (role, n) in [("executive", 1), ("dept_head", 0)] {
        let r = call(
            &mut c,
            Body::ListApplications(pb::ListApplicationsRequest {
                role: role.into(),
                department: "management".into(),
                limit: 0,
            }),
        )
        .await;
        assert_eq!(list(&r).len(), n, "{role}");
    }
    // Level 2 by li.na's key: a passkey level and a key level in one token.
    let now = String::from_utf8(open[0].token.clone()).unwrap();
    let a = application(&call(&mut c, decide(&id, last_entry(&approve_by_key(&now)), "")).await);
    assert_eq!((a.state.as_str(), a.approved), ("approved", 2));
    let r = call(&mut c, decide(&id, last_entry(&approve_by_key(&now)), "")).await;
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    assert!(r.message.contains("approved already"), "{}", r.message);
    let r = call(
        &mut c,
        Body::FetchApplication(pb::FetchApplicationRequest {
            application_id: id.clone(),
            document: false,
        }),
    )
    .await;
    let done = application(&r);
    assert_eq!(done.state, "approved");
    let r = c.stamp("contract", &digest, &done.token, "").await.unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);
    // The applicant cannot approve their own application.
    let own = sha256(b"application contract 2");
    let mut mine = Approval::for_seal("contract", &own);
    mine.claims.applicant = "chen.jing".into();
    mine.claims.amount = Some(Amount {
        value: 12_500_000,
        currency: "CNY".into(),
    });
    let mine = Token::unsigned(mine.claims).to_json();
    let a = application(&call(&mut c, submit(&mine)).await);
    let r = call(
        &mut c,
        decide(&a.id, last_entry(&approve(k, &mine, "chen.jing", &[])), ""),
    )
    .await;
    assert_denied(&r, "self_approval", "the applicant approving their own");
    assert_eq!(records(&d, "application.submitted", &digest), 1);
    assert_eq!(records(&d, "application.pending", &digest), 2);
    assert_eq!(records(&d, "application.approved", &digest), 2);
    let (code, out) = audit_verify(&d.db());
    assert_eq!(code, 0, "{out}");
}
