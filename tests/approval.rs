//! No stamp without approval, against the real daemon: every refusal reason, the happy paths,
//! TOTP, replays under concurrency, dry runs, tokens issued outside Rust, the sealctl token
//! commands, and no secret in the log.

mod common;

use common::*;
use sealgate::protocol::client::Client;
use sealgate::protocol::{response, Response, Status};
use sealgate::token::{Amount, Token};
use std::process::Command;

fn assert_ok(r: &Response, what: &str) {
    assert_eq!(
        r.status,
        Status::Ok as i32,
        "{what}: {} {}",
        r.reason,
        r.message
    );
}

/// (what, seal, digest the request names, token, TOTP code, expected reason).
type Case = (
    &'static str,
    &'static str,
    Vec<u8>,
    Vec<u8>,
    String,
    &'static str,
);

/// (succeeded, stdout, stderr) of one sealctl run.
type Outcome = (bool, String, String);

fn large(digest: &[u8]) -> Approval {
    let mut a = Approval::for_seal("contract", digest);
    a.claims.amount = Some(Amount {
        value: 25_000_000,
        currency: "CNY".into(),
    });
    a.signers = vec![("zhang.wei".into(), 300), ("li.na".into(), 120)];
    a
}

fn doc(n: u32) -> Vec<u8> {
    sha256(format!("document {n}").as_bytes())
}

async fn stamp(c: &mut Client, seal: &str, digest: &[u8], token: &[u8], code: &str) -> Response {
    c.stamp_with_mfa(seal, digest, token, "test", code)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reason_code_and_the_happy_paths() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let now = unix_now();
    let mut seen = std::collections::BTreeSet::new();

    // Happy paths: one level, two levels, and a seal that needs a TOTP code.
    let r = stamp(
        &mut c,
        "contract",
        &doc(1),
        &token_for("contract", &doc(1)),
        "",
    )
    .await;
    assert_ok(&r, "single level");
    let r = stamp(&mut c, "contract", &doc(2), &large(&doc(2)).token(), "").await;
    assert_ok(&r, "two levels");
    let totp = enroll(&mut c, "mfa.ok").await;
    let mut a = Approval::for_seal("official-pkcs1", &doc(3));
    a.claims.applicant = "mfa.ok".into();
    let code = totp_code(&totp, 0);
    assert_ok(
        &stamp(&mut c, "official-pkcs1", &doc(3), &a.token(), &code).await,
        "with TOTP",
    );

    // Table: (what, seal, digest the request names, token, TOTP code, expected reason).
    let mut table: Vec<Case> = Vec::new();
    let mut add = |what, seal, digest: Vec<u8>, token: Vec<u8>, code: &str, reason| {
        table.push((what, seal, digest, token, code.to_string(), reason))
    };

    add(
        "garbage token",
        "contract",
        doc(10),
        b"not a token".to_vec(),
        "",
        "malformed",
    );

    let a = Approval::for_seal("contract", &doc(11));
    let mut forged = Token::unsigned(a.claims.clone());
    forged.add_signature(&demo().approver_key("zhang.wei"), "liu.yang", now - 60);
    add(
        "signed with another key",
        "contract",
        doc(11),
        forged.to_json().into_bytes(),
        "",
        "bad_signature",
    );

    let mut a = Approval::for_seal("contract", &doc(12));
    a.signers = vec![("nobody".into(), 60)];
    add(
        "unknown approver",
        "contract",
        doc(12),
        a.token(),
        "",
        "unknown_approver",
    );

    let mut a = Approval::for_seal("contract", &doc(13));
    a.signers = vec![("old.boss".into(), 60)];
    add(
        "revoked approver",
        "contract",
        doc(13),
        a.token(),
        "",
        "approver_revoked",
    );

    let mut a = Approval::for_seal("contract", &doc(28));
    a.signers = vec![("retired.head".into(), 60)];
    add(
        "approver outside their validity window",
        "contract",
        doc(28),
        a.token(),
        "",
        "approver_revoked",
    );

    let mut a = Approval::for_seal("contract", &doc(14));
    (a.claims.iat, a.claims.nbf, a.claims.exp) = (now - 7200, now - 7200, now - 3600);
    a.signers = vec![("zhang.wei".into(), 5000)];
    add("expired", "contract", doc(14), a.token(), "", "expired");

    let mut a = Approval::for_seal("contract", &doc(15));
    (a.claims.nbf, a.claims.exp) = (now + 3600, now + 7200);
    add(
        "not yet valid",
        "contract",
        doc(15),
        a.token(),
        "",
        "not_yet_valid",
    );

    let a = Approval::for_seal("finance", &doc(16));
    add(
        "token for another seal",
        "contract",
        doc(16),
        a.token(),
        "",
        "seal_mismatch",
    );

    let a = Approval::for_seal("contract", &doc(17));
    add(
        "token for another document",
        "contract",
        doc(18),
        a.token(),
        "",
        "digest_mismatch",
    );

    let mut a = Approval::for_seal("contract", &doc(19));
    a.claims.doc.doc_type = "poem".into();
    add(
        "no rule for the document type",
        "contract",
        doc(19),
        a.token(),
        "",
        "no_rule",
    );

    let mut a = large(&doc(20));
    a.signers.truncate(1);
    add(
        "large contract without executive",
        "contract",
        doc(20),
        a.token(),
        "",
        "missing_level",
    );

    let mut a = large(&doc(21));
    a.signers = vec![("zhang.wei".into(), 60), ("li.na".into(), 300)];
    add(
        "executive before department head",
        "contract",
        doc(21),
        a.token(),
        "",
        "level_order",
    );

    let mut a = Approval::for_seal("contract", &doc(22));
    a.claims.applicant = "zhang.wei".into();
    add(
        "applicant approves own request",
        "contract",
        doc(22),
        a.token(),
        "",
        "self_approval",
    );

    let mut a = large(&doc(23));
    a.signers = vec![
        ("zhang.wei".into(), 300),
        ("zhang.wei".into(), 200),
        ("li.na".into(), 100),
    ];
    add(
        "one approver twice",
        "contract",
        doc(23),
        a.token(),
        "",
        "duplicate_approver",
    );

    let mut a = Approval::for_seal("contract", &doc(24));
    a.signers = vec![("liu.yang".into(), 60)];
    add(
        "department head of another department",
        "contract",
        doc(24),
        a.token(),
        "",
        "department_mismatch",
    );

    let mut a = Approval::for_seal("contract", &doc(25));
    a.claims.doc.doc_type = "night-form".into();
    add(
        "outside the allowed hours",
        "contract",
        doc(25),
        a.token(),
        "",
        "outside_hours",
    );

    let mut a = Approval::for_seal("official-pkcs1", &doc(26));
    a.claims.applicant = "mfa.ok".into();
    add(
        "TOTP code missing",
        "official-pkcs1",
        doc(26),
        a.token(),
        "",
        "mfa_required",
    );
    let mut a = Approval::for_seal("official-pkcs1", &doc(27));
    a.claims.applicant = "mfa.ok".into();
    add(
        "TOTP code already used",
        "official-pkcs1",
        doc(27),
        a.token(),
        &code,
        "mfa_invalid",
    );

    for (what, seal, digest, token, code, reason) in &table {
        let r = stamp(&mut c, seal, digest, token, code).await;
        assert_denied(&r, reason, what);
        seen.insert(reason.to_string());
    }

    // Rate limit: three invoices an hour per applicant.
    for i in 0..3 {
        let mut a = Approval::for_seal("finance", &doc(30 + i));
        a.claims.applicant = "busy.clerk".into();
        assert_ok(
            &stamp(&mut c, "finance", &doc(30 + i), &a.token(), "").await,
            "invoice",
        );
    }
    let mut a = Approval::for_seal("finance", &doc(33));
    a.claims.applicant = "busy.clerk".into();
    assert_denied(
        &stamp(&mut c, "finance", &doc(33), &a.token(), "").await,
        "rate_limited",
        "fourth invoice",
    );
    seen.insert("rate_limited".into());

    // Wrong codes, then lockout (max_failures = 3), which even the right code does not pass.
    let totp = enroll(&mut c, "mfa.victim").await;
    for i in 0..3 {
        let mut a = Approval::for_seal("official-pkcs1", &doc(40 + i));
        a.claims.applicant = "mfa.victim".into();
        let r = stamp(&mut c, "official-pkcs1", &doc(40 + i), &a.token(), "000000").await;
        assert_denied(&r, "mfa_invalid", "wrong code");
    }
    let mut a = Approval::for_seal("official-pkcs1", &doc(43));
    a.claims.applicant = "mfa.victim".into();
    let r = stamp(
        &mut c,
        "official-pkcs1",
        &doc(43),
        &a.token(),
        &totp_code(&totp, 0),
    )
    .await;
    assert_denied(&r, "mfa_locked", "after three wrong codes");
    seen.insert("mfa_locked".into());
    // An administrator clears the lockout; the right code passes again.
    assert_ok(&c.reset_mfa("mfa.victim").await.unwrap(), "reset");
    let r = stamp(
        &mut c,
        "official-pkcs1",
        &doc(43),
        &a.token(),
        &totp_code(&totp, 1),
    )
    .await;
    assert_ok(&r, "after reset");

    // A single-use approval used twice, and a two-use approval used three times.
    let t = token_for("contract", &doc(50));
    assert_ok(
        &stamp(&mut c, "contract", &doc(50), &t, "").await,
        "first use",
    );
    assert_denied(
        &stamp(&mut c, "contract", &doc(50), &t, "").await,
        "replayed",
        "second use",
    );
    let mut a = Approval::for_seal("contract", &doc(51));
    a.claims.uses = 2;
    let t = a.token();
    for i in 0..2 {
        let r = stamp(&mut c, "contract", &doc(51), &t, "").await;
        assert_ok(&r, "batch use");
        let Some(response::Body::Stamp(s)) = r.body else {
            panic!()
        };
        assert_eq!(s.uses_left, 1 - i);
    }
    assert_denied(
        &stamp(&mut c, "contract", &doc(51), &t, "").await,
        "exhausted",
        "third use",
    );
    seen.insert("replayed".into());
    seen.insert("exhausted".into());

    let all = [
        "malformed",
        "bad_signature",
        "unknown_approver",
        "approver_revoked",
        "expired",
        "not_yet_valid",
        "seal_mismatch",
        "digest_mismatch",
        "no_rule",
        "missing_level",
        "level_order",
        "self_approval",
        "duplicate_approver",
        "department_mismatch",
        "outside_hours",
        "rate_limited",
        "mfa_required",
        "mfa_invalid",
        "mfa_locked",
        "replayed",
        "exhausted",
    ];
    for r in all {
        assert!(seen.contains(r), "reason {r} was never produced");
    }

    // Nothing secret reached the log: the PIN, any token's payload or signatures, the TOTP
    // secret.
    let log = d.log();
    assert!(log.contains("stamp refused") && log.contains("reason=level_order"));
    assert!(!log.contains(&demo().pin()));
    let secret = totp.secret().to_base32();
    assert!(!log.contains(&secret));
    // The state directory holds TOTP secrets only wrapped by the token's key.
    let raw = totp.secret().as_bytes().to_vec();
    let mut found_row = false;
    for f in ["sealgate.db", "sealgate.db-wal"] {
        if let Ok(bytes) = std::fs::read(d.dir.path().join("state").join(f)) {
            assert!(
                !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                "{f} holds a TOTP secret"
            );
            found_row |= bytes.windows(10).any(|w| w == b"mfa.victim");
        }
    }
    assert!(found_row, "the TOTP state was not where the test looked");
    for (_, _, _, token, _, _) in &table {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(token) {
            assert!(!log.contains(&v["payload"].as_str().unwrap()[..32]));
            let sig = v["signatures"][0]["signature"].as_str().unwrap();
            assert!(!log.contains(&sig[..32]));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_token_sent_twice_at_once_stamps_once() {
    let d = Daemon::start(&Opts::default());
    for round in 0..10u32 {
        let digest = doc(100 + round);
        let token = token_for("contract", &digest);
        let mut a = d.client().await;
        let mut b = d.client().await;
        let (ra, rb) = tokio::join!(
            stamp(&mut a, "contract", &digest, &token, ""),
            stamp(&mut b, "contract", &digest, &token, "")
        );
        let oks = [&ra, &rb]
            .iter()
            .filter(|r| r.status == Status::Ok as i32)
            .count();
        assert_eq!(oks, 1, "round {round}: {} / {}", ra.message, rb.message);
        let denied = if ra.status == Status::Ok as i32 {
            &rb
        } else {
            &ra
        };
        assert_denied(denied, "replayed", "the loser");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_lists_every_reason_and_consumes_nothing() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let mut a = large(&doc(60));
    a.signers.truncate(1);
    a.claims.exp = unix_now() - 3600;
    a.claims.iat = unix_now() - 7200;
    a.claims.nbf = a.claims.iat;
    a.signers = vec![("zhang.wei".into(), 5000)];
    let r = c
        .check_approval("contract", &doc(61), &a.token(), "")
        .await
        .unwrap();
    let Some(response::Body::CheckApproval(v)) = r.body else {
        panic!("{}", r.message)
    };
    assert!(!v.would_pass);
    let reasons: Vec<_> = v.denials.iter().map(|d| d.reason.as_str()).collect();
    for want in ["expired", "digest_mismatch", "missing_level"] {
        assert!(reasons.contains(&want), "{want} missing from {reasons:?}");
    }
    // A good token passes the dry run any number of times and then still stamps.
    let t = token_for("contract", &doc(62));
    for _ in 0..3 {
        let r = c
            .check_approval("contract", &doc(62), &t, "")
            .await
            .unwrap();
        let Some(response::Body::CheckApproval(v)) = r.body else {
            panic!()
        };
        assert!(v.would_pass, "{:?}", v.denials);
        assert_eq!(v.rule, "contracts");
    }
    assert_ok(
        &stamp(&mut c, "contract", &doc(62), &t, "").await,
        "after dry runs",
    );
    let r = c
        .check_approval("contract", &doc(62), &t, "")
        .await
        .unwrap();
    let Some(response::Body::CheckApproval(v)) = r.body else {
        panic!()
    };
    assert_eq!(v.denials[0].reason, "replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_issued_in_python_is_accepted() {
    let d = Daemon::start(&Opts::default());
    let work = tempfile::tempdir().unwrap();
    let digest = doc(70);
    let claims = large(&digest).claims;
    let claims_file = work.path().join("claims.json");
    std::fs::write(&claims_file, serde_json::to_vec(&claims).unwrap()).unwrap();
    let python = std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/sign_token.py"
        ))
        .arg(&claims_file)
        .args(["zhang.wei"])
        .arg(demo().dir.join("approvers/zhang.wei.key"))
        .args(["li.na"])
        .arg(demo().dir.join("approvers/li.na.key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sign_token.py (needs the cryptography package): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = d.client().await;
    let r = stamp(&mut c, "contract", &digest, &out.stdout, "").await;
    assert_ok(&r, "Python-issued EdDSA + ES256 token");
}

#[test]
fn sealctl_issues_signs_inspects_and_checks_tokens() {
    let d = Daemon::start(&Opts::default());
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("contract.pdf");
    std::fs::write(&file, b"%PDF large supply contract").unwrap();
    let token = work.path().join("token.json");
    let sealctl = |args: &[&str]| {
        let out = Command::new(SEALCTL)
            .args(args)
            .env("SEALGATE_SOCKET", &d.socket)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let f = file.to_str().unwrap();
    let t = token.to_str().unwrap();
    let (ok, _, err) = sealctl(&[
        "token",
        "new",
        "--seal",
        "contract",
        "--file",
        f,
        "--doc-type",
        "contract",
        "--amount-minor",
        "25000000",
        "--currency",
        "CNY",
        "--dept",
        "sales",
        "--applicant",
        "zhao.lei",
        "--purpose",
        "supply contract",
        "--out",
        t,
    ]);
    assert!(ok, "{err}");
    let check = |sealctl: &dyn Fn(&[&str]) -> Outcome| {
        sealctl(&["token", "check", "--seal", "contract", "--file", f, t])
    };
    let (ok, out, _) = check(&sealctl);
    assert!(!ok && out.contains("malformed"), "{out}");

    let key = demo().dir.join("approvers/zhang.wei.key");
    // Without --yes and with no answer, nothing is signed; the claims are shown.
    let before = std::fs::read(&token).unwrap();
    let (ok, _, err) = sealctl(&[
        "token",
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "zhang.wei",
        t,
    ]);
    assert!(!ok && err.contains("not signed"), "{err}");
    for shown in [
        "seal        contract",
        "amount      ",
        "applicant   ",
        "purpose     ",
    ] {
        assert!(err.contains(shown), "{shown:?} not in {err}");
    }
    assert_eq!(std::fs::read(&token).unwrap(), before);
    let (ok, _, err) = sealctl(&[
        "token",
        "sign",
        "--yes",
        "--key",
        key.to_str().unwrap(),
        "--kid",
        "zhang.wei",
        t,
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = check(&sealctl);
    assert!(!ok && out.contains("missing_level"), "{out}");

    // The executive's key lives in the PKCS#11 token.
    let pin = demo().pin_file();
    let conf = demo().softhsm_conf();
    let out = Command::new(SEALCTL)
        .args([
            "token",
            "sign",
            "--yes",
            "--kid",
            "hsm.approver",
            "--pkcs11-module",
            SOFTHSM,
        ])
        .args([
            "--token-label",
            "sealgate-demo",
            "--key-label",
            "contract-seal",
            "--pin-file",
        ])
        .arg(&pin)
        .arg(&token)
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out, err) = check(&sealctl);
    assert!(
        ok && out.contains("would pass (rule large contracts)"),
        "{out}{err}"
    );

    let (ok, out, _) = sealctl(&["token", "inspect", t]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["claims"]["amount"]["value"], 25_000_000);
    assert_eq!(v["signatures"][1]["kid"], "hsm.approver");
    assert_eq!(v["signatures"][1]["alg"], "ES256");

    let (ok, out, err) = sealctl(&[
        "stamp", "--seal", "contract", "--file", f, "--token", t, "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["uses_left"], 0);
    let (ok, _, err) = sealctl(&["stamp", "--seal", "contract", "--file", f, "--token", t]);
    assert!(
        !ok && err.contains("APPROVAL_DENIED (13)") && err.contains("replayed"),
        "{err}"
    );

    // Enrollment prints the otpauth URI (and a QR code) to the administrator.
    let (ok, out, err) = sealctl(&["mfa", "enroll", "new.applicant"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("otpauth://totp/") && out.contains('█'),
        "{out}"
    );
}

/// Records of `kind` in the log, as (reason, detail, evidence).
fn records_of(db: &std::path::Path, kind: &str) -> Vec<(String, String, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT reason, detail, evidence FROM audit WHERE kind = ?1 ORDER BY seq")
        .unwrap();
    s.query_map([kind], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn totp_codes_are_weighed_only_in_a_stamp_with_a_good_unspent_approval() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let totp = enroll(&mut c, "mfa.target").await;
    let mut a = Approval::for_seal("official-pkcs1", &doc(200));
    a.claims.applicant = "mfa.target".into();
    let good = a.token();
    // A token whose signature does not verify, with every code of a guesser: the dry run
    // says nothing about codes, and counts nothing towards the lockout.
    let mut forged = Token::parse(&good).unwrap();
    forged.signatures[0].signature[3] ^= 1;
    let forged = forged.to_json().into_bytes();
    let right = totp_code(&totp, 0);
    for code in ["000000", "111111", right.as_str(), "222222", "333333"] {
        let r = c
            .check_approval("official-pkcs1", &doc(200), &forged, code)
            .await
            .unwrap();
        let Some(response::Body::CheckApproval(v)) = r.body else {
            panic!("{}", r.message)
        };
        let reasons: Vec<_> = v.denials.iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons, ["bad_signature", "missing_level"], "code {code}");
    }
    // A good token in a dry run with a wrong code would pass: the code is not looked at.
    let r = c
        .check_approval("official-pkcs1", &doc(200), &good, "000000")
        .await
        .unwrap();
    let Some(response::Body::CheckApproval(v)) = r.body else {
        panic!("{}", r.message)
    };
    assert!(v.would_pass, "{:?}", v.denials);
    // Every dry run is recorded.
    let checked = records_of(&d.db(), "approval.checked");
    assert_eq!(checked.len(), 6);
    assert_eq!(checked[0].0, "bad_signature");
    assert_eq!(checked[5].1, "would pass");
    // The applicant is not locked out: the right code stamps.
    assert_ok(
        &stamp(&mut c, "official-pkcs1", &doc(200), &good, &right).await,
        "the real stamp",
    );
    // The spent approval, with wrong codes (more than max_failures = 3): refused as replayed,
    // the codes never weighed, so no lockout either.
    for code in ["000000", "111111", "222222", "333333"] {
        let r = stamp(&mut c, "official-pkcs1", &doc(200), &good, code).await;
        assert_denied(&r, "replayed", "a spent approval with a wrong code");
    }
    let mut a = Approval::for_seal("official-pkcs1", &doc(201));
    a.claims.applicant = "mfa.target".into();
    assert_ok(
        &stamp(
            &mut c,
            "official-pkcs1",
            &doc(201),
            &a.token(),
            &totp_code(&totp, 1),
        )
        .await,
        "not locked out",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_both_purposes_the_rule_and_the_scope_and_invalid_requests() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let mut a = large(&doc(210));
    a.claims.purpose = "annual supply of steel".into();
    a.claims.scope = "procurement".into();
    let r = c
        .stamp("contract", &doc(210), &a.token(), "something else")
        .await
        .unwrap();
    assert_ok(&r, "stamp");
    let authorized = records_of(&d.db(), "stamp.authorized");
    let e: serde_json::Value = serde_json::from_str(&authorized[0].2).unwrap();
    assert_eq!(e["rule"], "large contracts");
    assert_eq!(e["scope"], "procurement");
    assert_eq!(e["caller_purpose"], "something else");
    let db = rusqlite::Connection::open(d.db()).unwrap();
    let purposes: Vec<String> = db
        .prepare("SELECT purpose FROM audit WHERE kind LIKE 'stamp.%' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(purposes, ["annual supply of steel"; 2]);
    // A stamp refused as invalid on a seal the caller may use is recorded too.
    let r = c
        .stamp("contract", &[1, 2, 3], &a.token(), "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    let denied = records_of(&d.db(), "stamp.denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].0, "status_invalid_argument");
    assert_eq!(audit_verify(&d.db()).0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_contract_cannot_reach_the_cheaper_rule_and_approvals_have_limits() {
    let strict = r#"
[[seal]]
id = "contract-strict"
device = "demo-hsm"
key_label = "contract-seal"
algorithm = "ecdsa-p256-sha256"
max_token_lifetime_seconds = 864000
max_uses = 50

[[seal.rule]]
name = "large contracts"
doc_types = ["contract"]
currency = "CNY"
amount_min = 10000000
amount_required = true
levels = ["dept_head", "executive"]

[[seal.rule]]
name = "contracts"
doc_types = ["contract"]
levels = ["dept_head"]
"#;
    let d = Daemon::start(&Opts {
        extra: strict.into(),
        caller_seals: Some(vec!["contract".into(), "contract-strict".into()]),
        ..Opts::default()
    });
    let mut c = d.client().await;
    // Approved by the department head alone (the small-contract rule's level).
    let head_only = |seal: &str, n: u32, amount: Option<(i64, &str)>| {
        let mut a = Approval::for_seal(seal, &doc(n));
        a.claims.seal = seal.into();
        a.claims.amount = amount.map(|(value, currency)| Amount {
            value,
            currency: currency.into(),
        });
        a
    };
    for (seal, n, amount, reason) in [
        ("contract", 220, Some((25_000_000, "cny")), "malformed"),
        ("contract", 221, Some((25_000_000, "XYZ")), "malformed"),
        ("contract", 222, Some((25_000_000, "USD")), "no_rule"),
        ("contract-strict", 223, None, "no_rule"),
        ("contract-strict", 224, Some((25_000_000, "USD")), "no_rule"),
        (
            "contract-strict",
            225,
            Some((25_000_000, "CNY")),
            "missing_level",
        ),
    ] {
        let a = head_only(seal, n, amount);
        let r = stamp(&mut c, seal, &doc(n), &a.token(), "").await;
        assert_denied(&r, reason, &format!("{seal} {amount:?}"));
    }
    // A small contract with its amount still passes on the department head alone.
    let a = head_only("contract-strict", 226, Some((500_000, "CNY")));
    assert_ok(
        &stamp(&mut c, "contract-strict", &doc(226), &a.token(), "").await,
        "small contract",
    );
    // Limits: a life over ten days, more than 50 uses, an expiry at the end of time.
    let now = unix_now();
    for (what, n, exp, uses) in [
        ("eleven days", 227, now + 11 * 86400, 1),
        ("51 uses", 228, now + 3600, 51),
        ("exp at i64::MAX", 229, i64::MAX, 1),
    ] {
        let mut a = head_only("contract-strict", n, Some((500_000, "CNY")));
        a.claims.exp = exp;
        a.claims.uses = uses;
        let r = stamp(&mut c, "contract-strict", &doc(n), &a.token(), "").await;
        assert_denied(&r, "malformed", what);
    }
    // The default limit (30 days) holds for a seal that names none.
    let mut a = Approval::for_seal("contract", &doc(230));
    a.claims.exp = now + 31 * 86400;
    assert_denied(
        &stamp(&mut c, "contract", &doc(230), &a.token(), "").await,
        "malformed",
        "31 days",
    );
    // The daemon still serves.
    stamp_ok(&mut c, "contract", &doc(231)).await;
}

#[test]
fn sealctl_sends_nothing_to_a_socket_served_by_another_user() {
    let d = Daemon::start(&Opts::default());
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("doc.txt");
    std::fs::write(&f, "x").unwrap();
    let token = work.path().join("t.json");
    std::fs::write(&token, token_for("contract", &sha256(b"x"))).unwrap();
    let run = |uid: Option<&str>| {
        let mut cmd = Command::new(SEALCTL);
        cmd.env("SEALGATE_SOCKET", &d.socket).args([
            "stamp",
            "--seal",
            "contract",
            "--file",
            f.to_str().unwrap(),
            "--token",
            token.to_str().unwrap(),
        ]);
        if let Some(u) = uid {
            cmd.env("SEALGATE_DAEMON_UID", u);
        }
        cmd.output().unwrap()
    };
    // Expecting the daemon under another uid: refused before the token leaves.
    let out = run(Some("4242"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is served by uid") && err.contains("nothing was sent"),
        "{err}"
    );
    let db = rusqlite::Connection::open(d.db()).unwrap();
    let n: i64 = db
        .query_row(
            "SELECT count(*) FROM audit WHERE kind LIKE 'stamp.%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0, "the daemon saw the request");
    // By default the daemon's own user passes.
    let out = run(None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applicant_is_one_person_in_every_spelling_and_one_key_is_one_approver() {
    let directory = "\n[[applicant]]\nid = \"zhao.lei\"\ndepartment = \"sales\"\n\n[[applicant]]\nid = \"zhang.wei\"\ndepartment = \"sales\"\n";
    let d = Daemon::start(&Opts {
        extra: directory.into(),
        ..Opts::default()
    });
    let mut c = d.client().await;
    let mut n = 240;
    let mut try_as = |applicant: &str, dept: &str| {
        n += 1;
        let mut a = Approval::for_seal("contract", &doc(n));
        a.claims.applicant = applicant.into();
        a.claims.dept = dept.into();
        (n, a.token())
    };
    // zhang.wei approves; the applicant is zhang.wei written otherwise.
    for (applicant, reason) in [
        ("Zhang.Wei", "self_approval"),
        ("ZHANG.WEI", "self_approval"),
        ("ｚｈａｎｇ.ｗｅｉ", "self_approval"), // full-width letters, NFKC
        ("张伟", "self_approval"),              // the approver's name
        ("zhang.wei ", "malformed"),
        ("zhang\u{200b}.wei", "malformed"),
        ("zhang.wei\u{202e}", "malformed"),
    ] {
        let (n, t) = try_as(applicant, "sales");
        let r = stamp(&mut c, "contract", &doc(n), &t, "").await;
        assert_eq!(
            (r.status, r.reason.as_str()),
            (Status::ApprovalDenied as i32, reason),
            "{applicant:?}: {}",
            r.message
        );
    }
    // The directory binds an applicant to a department.
    let (n, t) = try_as("zhao.lei", "finance");
    assert_denied(
        &stamp(&mut c, "contract", &doc(n), &t, "").await,
        "department_mismatch",
        "another department",
    );
    let (n, t) = try_as("qian.qi", "sales");
    assert_denied(
        &stamp(&mut c, "contract", &doc(n), &t, "").await,
        "unknown_applicant",
        "not listed",
    );
    let (n, t) = try_as("Zhao.Lei", "sales");
    assert_ok(
        &stamp(&mut c, "contract", &doc(n), &t, "").await,
        "listed, any case",
    );
    drop(c);
    d.stop();
    // One public key under two living approver ids is refused at start-up.
    let twin = format!(
        "\n[[approver]]\nid = \"li.na.second\"\nrole = \"dept_head\"\ndepartment = \"sales\"\npublic_key_file = \"{}\"\n",
        demo().dir.join("approvers/li.na.pub.pem").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let config = config_text(demo(), &dir.path().join("s.sock"), &Opts::default()) + &twin;
    let (status, stderr) = run_to_exit(dir.path(), &config);
    assert!(!status.success());
    assert!(
        stderr.contains("li.na.second") && stderr.contains("same public key as approver \"li.na\""),
        "{stderr}"
    );
    // An id not in its normal form is refused too.
    let upper = twin.replace("li.na.second", "Li.Na.Second");
    let config = config_text(demo(), &dir.path().join("s.sock"), &Opts::default()) + &upper;
    let (status, stderr) = run_to_exit(dir.path(), &config);
    assert!(!status.success());
    assert!(stderr.contains("normal form"), "{stderr}");
}

#[test]
fn sealctl_json_gives_one_object_on_stdout_for_every_refusal() {
    let d = Daemon::start(&Opts::default());
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("doc.txt");
    std::fs::write(&f, "the document").unwrap();
    let digest = sha256(b"the document");
    // An approval with one level of the two the large-contract rule needs.
    let mut a = large(&digest);
    a.signers.truncate(1);
    let token = work.path().join("t.json");
    std::fs::write(&token, a.token()).unwrap();
    let (f, t) = (f.to_str().unwrap(), token.to_str().unwrap());
    let python = std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    // (args, exit code, status, code, reason)
    type JsonCase<'a> = (Vec<&'a str>, i32, &'a str, Option<i64>, &'a str);
    let cases: Vec<JsonCase> = vec![
        (
            vec!["stamp", "--seal", "contract", "--file", f, "--token", t],
            1,
            "APPROVAL_DENIED",
            Some(13),
            "missing_level",
        ),
        (
            vec!["token", "check", "--seal", "contract", "--file", f, t],
            1,
            "APPROVAL_DENIED",
            Some(13),
            "missing_level",
        ),
        (
            vec![
                "terminal", "grant", "--seal", "contract", "--file", f, "--token", t,
            ],
            1,
            "INVALID_ARGUMENT",
            Some(4),
            "",
        ),
        (
            vec!["mfa", "reset", "nobody.here"],
            1,
            "INVALID_ARGUMENT",
            Some(4),
            "",
        ),
        (
            vec!["seal", "show", "no-such-seal"],
            1,
            "UNKNOWN_SEAL",
            Some(6),
            "",
        ),
        (
            vec![
                "stamp",
                "--seal",
                "contract",
                "--file",
                f,
                "--token",
                "/nonexistent/t.json",
            ],
            2,
            "LOCAL_ERROR",
            None,
            "",
        ),
        (
            vec!["token", "inspect", "/nonexistent/t.json"],
            2,
            "LOCAL_ERROR",
            None,
            "",
        ),
    ];
    let run = |socket: &std::path::Path, args: &[&str]| {
        Command::new(SEALCTL)
            .env("SEALGATE_SOCKET", socket)
            .arg("--json")
            .args(args)
            .output()
            .unwrap()
    };
    let parse = |stdout: &[u8]| -> String {
        let mut child = Command::new(&python)
            .args(["-c", "import json,sys; d=json.loads(sys.stdin.read()); assert d['ok'] is False; print(d['status'], d['code'], d.get('reason', ''), bool(d['message']))"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdout).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "not one JSON object: {}",
            String::from_utf8_lossy(stdout)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for (args, exit, status, code, reason) in &cases {
        let out = run(&d.socket, args);
        assert_eq!(
            out.status.code(),
            Some(*exit),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let code = code.map(|c| c.to_string()).unwrap_or_else(|| "None".into());
        assert_eq!(
            parse(&out.stdout),
            format!("{status} {code} {reason} True"),
            "{args:?}"
        );
    }
    // A daemon that is not there: exit 3, and the same shape.
    let out = run(&work.path().join("no.sock"), &["seals"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(parse(&out.stdout), "UNREACHABLE None  True");
}
