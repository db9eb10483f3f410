//! The audit log through the real daemon: what a stamp leaves behind, what `sealctl audit`
//! finds when the file is tampered with (by the sqlite3 tool), crashes under load, a full disk,
//! and the anomaly rules' alerts.

mod common;

use common::*;
use sealgate::audit::Record;
use sealgate::protocol::{response, Status};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn sealctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(SEALCTL).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn stamps_and_refusals_are_recorded_queried_exported_and_verified() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let doc = b"contract 2026-118";
    let s = stamp_ok(&mut c, "contract", &sha256(doc)).await;
    let bad = c
        .stamp("contract", &sha256(doc), b"not a token", "")
        .await
        .unwrap();
    assert_eq!(bad.status, Status::ApprovalDenied as i32);
    let r = c.stamp("nope", &[0; 32], b"x", "").await.unwrap();
    assert_eq!(r.status, Status::UnknownSeal as i32);
    let token = token_for("finance", &[5; 32]);
    let ok = c.stamp("finance", &[5; 32], &token, "").await.unwrap();
    assert_eq!(ok.status, Status::Ok as i32);
    let again = c.stamp("finance", &[5; 32], &token, "").await.unwrap();
    assert_eq!(again.reason, "replayed");
    let response::Body::StatusReport(st) = c.status().await.unwrap().body.unwrap() else {
        panic!()
    };
    let audit = st.audit.unwrap();
    assert!(audit.error.is_empty(), "{}", audit.error);
    assert_eq!(audit.checkpoint_seq, audit.head_seq);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = dir.path().join("state/sealgate.db");

    let all = records(&db, None);
    let kinds: Vec<&str> = all.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "daemon.started",
            "stamp.authorized",
            "stamp.completed",
            "stamp.denied",
            "access.denied",
            "stamp.authorized",
            "stamp.completed",
            "stamp.denied",
        ]
    );
    let completed = &all[2];
    assert_eq!(completed.ref_seq, Some(2));
    assert_eq!(completed.doc_sha256, hex::encode(sha256(doc)));
    assert_eq!(completed.applicant, "zhao.lei");
    assert_eq!(completed.device_profile, "softhsm2");
    assert!(!completed.device_serial.is_empty());
    assert!(
        completed.approvers.contains("\"zhang.wei\""),
        "{}",
        completed.approvers
    );
    assert!(completed.approvers.contains("\"level\":1"));
    assert_eq!(evidence_signature(completed), s.signature);
    assert_eq!(all[3].reason, "malformed");
    assert_eq!(all[4].seal, "nope");
    assert_eq!(all[7].reason, "replayed");
    every_authorisation_has_one_outcome(&db);

    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("audit log verifies: 8 records"), "{out}");

    // Queries: by kind as JSON, by approver, by document as CSV, a table.
    let (code, out) = sealctl(&[
        "audit",
        "query",
        "--db",
        path(&db),
        "--kind",
        "stamp.completed",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{out}");
    let list: Vec<Record> = serde_json::from_str(&out).unwrap();
    assert_eq!(list.len(), 2);
    let (_, out) = sealctl(&[
        "audit",
        "query",
        "--db",
        path(&db),
        "--approver",
        "wang.fang",
        "--format",
        "json",
    ]);
    let list: Vec<Record> = serde_json::from_str(&out).unwrap();
    // The authorisation, the stamp, and the replay refused later.
    assert_eq!(list.iter().map(|r| r.seq).collect::<Vec<_>>(), [6, 7, 8]);
    let (_, out) = sealctl(&[
        "audit",
        "query",
        "--db",
        path(&db),
        "--doc",
        &hex::encode(sha256(doc)),
        "--format",
        "csv",
    ]);
    let mut rows = csv::Reader::from_reader(out.as_bytes());
    let seqs: Vec<String> = rows.records().map(|r| r.unwrap()[0].to_string()).collect();
    assert_eq!(seqs, ["2", "3", "4"]);
    let (code, out) = sealctl(&["audit", "query", "--db", path(&db), "--reason", "replayed"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "{out}");

    let (code, out) = sealctl(&["--json", "audit", "stats", "--db", path(&db)]);
    assert_eq!(code, 0, "{out}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["records"], 8);
    assert_eq!(
        stats["stamps_per_seal_per_day"].as_array().unwrap().len(),
        2
    );
    assert_eq!(
        stats["top_applicants"][0],
        serde_json::json!(["zhao.lei", 2])
    );
    let denials = stats["denials_by_reason"].to_string();
    assert!(denials.contains("malformed") && denials.contains("replayed"));

    // Exports: JSON lines with hashes, and a bundle an outside auditor verifies.
    let (code, out) = sealctl(&["audit", "export", "--db", path(&db), "--format", "jsonl"]);
    assert_eq!(code, 0);
    let lines: Vec<Record> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, all);
    let bundle = dir.path().join("bundle");
    let (code, out) = sealctl(&[
        "audit",
        "export",
        "--db",
        path(&db),
        "--bundle",
        path(&bundle),
    ]);
    assert_eq!(code, 0, "{out}");
    let key = demo().dir.join("audit-key.pub.pem");
    let (code, out) = sealctl(&[
        "audit",
        "verify",
        "--bundle",
        path(&bundle),
        "--key",
        path(&key),
    ]);
    assert_eq!(code, 0, "{out}");
    // An edited line of the bundle is found.
    let text = std::fs::read_to_string(bundle.join("records.jsonl")).unwrap();
    std::fs::write(
        bundle.join("records.jsonl"),
        text.replacen("zhao.lei", "zhao.lea", 1),
    )
    .unwrap();
    let (code, out) = sealctl(&[
        "audit",
        "verify",
        "--bundle",
        path(&bundle),
        "--key",
        path(&key),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED verification at seq 2"), "{out}");
}

/// Copies a database (with its WAL, if any) to `dir`.
fn copy_db(db: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", db.display()));
        if from.exists() {
            std::fs::copy(&from, dir.join(format!("sealgate.db{suffix}"))).unwrap();
        }
    }
    dir.join("sealgate.db")
}

#[tokio::test]
async fn tampering_with_the_file_is_found_and_named() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    // Three rounds a little over a second apart, so the log keeps several checkpoints.
    for round in 0..3u8 {
        for i in 0..3u8 {
            stamp_ok(&mut c, "contract", &[round * 10 + i + 1; 32]).await;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = dir.path().join("state/sealgate.db");
    let last = sqlite3_value(&db, "SELECT max(seq) FROM audit");
    let checkpoints = sqlite3_value(&db, "SELECT count(*) FROM checkpoints");
    assert!(checkpoints >= 3, "only {checkpoints} checkpoints");
    let first_cp = sqlite3_value(&db, "SELECT min(seq) FROM checkpoints");
    let middle_cp = sqlite3_value(
        &db,
        "SELECT seq FROM checkpoints ORDER BY seq LIMIT 1 OFFSET 1",
    );

    let cases: Vec<(&str, String, u64, &str)> = vec![
        ("untouched", String::new(), 0, "verifies"),
        (
            "edit a field",
            "UPDATE audit SET applicant = 'mallory' WHERE seq = 5".into(),
            5,
            "contents were edited",
        ),
        (
            "delete a row",
            "DELETE FROM audit WHERE seq = 5".into(),
            5,
            "record 5 is missing (deleted)",
        ),
        (
            "insert a row",
            "UPDATE audit SET seq = seq + 1000000 WHERE seq >= 5; \
             UPDATE audit SET seq = seq - 999999 WHERE seq > 1000000; \
             CREATE TEMP TABLE t AS SELECT * FROM audit WHERE seq = 4; \
             UPDATE t SET seq = 5; INSERT INTO audit SELECT * FROM t;"
                .into(),
            5,
            "inserted",
        ),
        (
            "swap two rows",
            "UPDATE audit SET seq = -5 WHERE seq = 5; UPDATE audit SET seq = 5 WHERE seq = 6; \
             UPDATE audit SET seq = 6 WHERE seq = -5;"
                .into(),
            5,
            "records 5 and 6 were swapped",
        ),
        (
            "truncate",
            format!("DELETE FROM audit WHERE seq > {}", last - 3),
            last - 2,
            "truncated",
        ),
        (
            "replace a checkpoint signature",
            format!(
                "UPDATE checkpoints SET signature = (SELECT signature FROM checkpoints \
                 ORDER BY seq DESC LIMIT 1) WHERE seq = {first_cp}"
            ),
            first_cp,
            "forged",
        ),
        (
            "delete a checkpoint",
            format!("DELETE FROM checkpoints WHERE seq = {middle_cp}"),
            0, // named at the checkpoint after it
            "is missing",
        ),
        (
            "append past the last checkpoint",
            format!("DELETE FROM checkpoints WHERE seq = {last}"),
            0,
            "not covered by any checkpoint",
        ),
    ];
    for (i, (name, sql, seq, cause)) in cases.into_iter().enumerate() {
        let case = dir.path().join(format!("case{i}"));
        let copy = copy_db(&db, &case.join("state"));
        if !sql.is_empty() {
            sqlite3(&copy, &sql);
        }
        let (code, out) = audit_verify(&copy);
        if name == "untouched" {
            assert_eq!(code, 0, "{name}: {out}");
            continue;
        }
        assert_eq!(code, 1, "{name}: {out}");
        assert!(out.contains(cause), "{name}: {out}");
        if name == "append past the last checkpoint" {
            // The daemon will not chain new records onto a tail nobody signed.
            let config = config_text(demo(), &case.join("s.sock"), &Opts::default());
            let (status, stderr) = run_to_exit(&case, &config);
            assert!(!status.success());
            assert!(stderr.contains("start-up check"), "{stderr}");
        }
        if seq > 0 {
            assert!(
                out.contains(&format!("FAILED verification at seq {seq}:")),
                "{name}: {out}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_twenty_times_under_load_it_loses_no_stamp() {
    let mut d = Daemon::start(&Opts::default());
    let load = Load::start(&d.socket, 4);
    let mut kills = 0;
    while kills < 20 {
        tokio::time::sleep(Duration::from_millis(100 + 37 * (kills % 5))).await;
        d = tokio::task::block_in_place(|| d.crash_and_restart());
        kills += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = load.finish().await;
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = dir.path().join("state/sealgate.db");

    assert!(seen.len() >= 20, "only {} stamps went through", seen.len());
    let completed = every_seen_stamp_is_completed(&db, &seen);
    every_authorisation_has_one_outcome(&db);
    let unknown = records(&db, Some("stamp.outcome_unknown")).len();
    let started = records(&db, Some("daemon.started")).len();
    assert_eq!(started, 21);
    eprintln!(
        "{} stamps seen by clients, {} completed in the log, {unknown} outcomes unknown after 20 kills",
        seen.len(),
        completed.len()
    );
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test]
async fn a_full_disk_refuses_stamps_and_they_resume_when_space_returns() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs for the state directory needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tmpfs = Tmpfs::mount(&state, "3M");
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &Opts::default());
    let d = Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &[1; 32]).await;

    // Leave about 150 KiB free.
    let filler = tmpfs.fill(150 * 1024);

    let (stamped, refused) = stamp_until_refused(&mut c).await;
    let mut ok = 1 + stamped;
    assert_eq!(
        refused.status,
        Status::AuditUnavailable as i32,
        "{}",
        refused.message
    );
    assert!(refused.message.contains("full"), "{}", refused.message);
    assert!(
        refused.message.contains("nothing was signed") || refused.message.contains("withheld"),
        "{}",
        refused.message
    );
    // Still serving, and still refusing while full.
    let r = c.status().await.unwrap();
    assert_eq!(r.status, Status::Ok as i32);
    let digest = sha256(b"while full");
    let r = c
        .stamp("contract", &digest, &token_for("contract", &digest), "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::AuditUnavailable as i32, "{}", r.message);

    // Space returns: stamps go through again.
    std::fs::remove_file(&filler).unwrap();
    let digest = sha256(b"after space returns");
    let held = token_for("contract", &digest);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = c.stamp("contract", &digest, &held, "").await.unwrap();
        if r.status == Status::Ok as i32 {
            ok += 1;
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {}", r.message);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = dir.path().join("state/sealgate.db");
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    assert_eq!(records(&db, Some("stamp.completed")).len(), ok);
    every_authorisation_has_one_outcome(&db);
    drop(tmpfs);
    drop(dir);
}

/// `sealctl alerts --follow --json`, its lines collected as they come.
struct Follower {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    got: Vec<serde_json::Value>,
}

impl Follower {
    fn start(socket: &Path) -> Follower {
        let mut child = Command::new(SEALCTL)
            .args(["--json", "alerts", "--follow", "--recent", "0"])
            .env("SEALGATE_SOCKET", socket)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            lines,
            got: Vec::new(),
        }
    }

    /// Waits until alerts of every rule in `rules` arrived (10 s at most).
    fn wait_for(&mut self, rules: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !rules
            .iter()
            .all(|r| self.got.iter().any(|a| a["rule"] == *r))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.got.push(v),
                Err(_) => panic!("alerts {rules:?} did not all arrive; got {:?}", self.got),
            }
        }
    }

    fn count(&self, rule: &str) -> usize {
        self.got.iter().filter(|a| a["rule"] == rule).count()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Working hours that never include now: a one-hour window starting two hours from now (UTC).
fn closed_hours() -> String {
    let h = (unix_now() / 3600 + 2) % 24;
    format!(
        "working_hours = \"{h:02}:00-{:02}:00\"\ntimezone = \"UTC\"\n",
        (h + 1) % 24
    )
}

#[tokio::test]
async fn each_stamp_rule_fires_in_its_scenario_and_is_streamed() {
    let opts = Opts {
        alerts: closed_hours()
            + "burst_count = 3\nburst_window_seconds = 60\ndenial_spike_count = 3\ndenial_spike_window_seconds = 60\n",
        ..Opts::default()
    };
    let d = Daemon::start(&opts);
    let mut follower = Follower::start(&d.socket);
    // The follower is subscribed once its first (empty) answer came; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = d.client().await;
    // Four stamps by one applicant within a minute, at an hour outside working time.
    for i in 0..4u8 {
        stamp_ok(&mut c, "contract", &[i + 1; 32]).await;
    }
    // The same document again under a second approval.
    stamp_ok(&mut c, "contract", &[1; 32]).await;
    // Four refusals in a row for this caller.
    for _ in 0..4 {
        let r = c.stamp("contract", &[9; 32], b"garbage", "").await.unwrap();
        assert_eq!(r.status, Status::ApprovalDenied as i32);
    }
    follower.wait_for(&["off_hours", "burst", "restamp", "denial_spike"]);
    assert_eq!(follower.count("burst"), 1);
    assert_eq!(follower.count("restamp"), 1);
    assert_eq!(follower.count("denial_spike"), 1);
    let restamp = follower
        .got
        .iter()
        .find(|a| a["rule"] == "restamp")
        .unwrap();
    assert_eq!(restamp["document_sha256"], hex::encode([1u8; 32]));

    // The recent alerts, without following.
    let (code, out) = sealctl(&[
        "--socket",
        path(&d.socket),
        "--json",
        "alerts",
        "--recent",
        "100",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().count() >= 8, "{out}");
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = dir.path().join("state/sealgate.db");
    let alerts = records(&db, Some("alert"));
    assert_eq!(alerts.iter().filter(|a| a.reason == "off_hours").count(), 5);
    assert_eq!(audit_verify(&db).0, 0);
}

#[tokio::test]
async fn a_normal_working_day_raises_no_alert() {
    let opts = Opts {
        alerts: "working_hours = \"00:00-24:00\"\ntimezone = \"Asia/Shanghai\"\n".into(),
        ..Opts::default()
    };
    let d = Daemon::start(&opts);
    let mut c = d.client().await;
    // Finance allows 3 stamps an hour per applicant; nobody goes near a threshold.
    for i in 0..3u8 {
        stamp_ok(&mut c, "contract", &[100 + i; 32]).await;
        stamp_ok(&mut c, "finance", &[200 + i; 32]).await;
    }
    // One approval with two uses, on one document: not a re-stamp.
    let mut a = Approval::for_seal("contract", &[50; 32]);
    a.claims.uses = 2;
    let token = a.token();
    for _ in 0..2 {
        let r = c.stamp("contract", &[50; 32], &token, "").await.unwrap();
        assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    }
    // One honest mistake.
    let r = c.stamp("contract", &[7; 32], b"{}", "").await.unwrap();
    assert_eq!(r.status, Status::ApprovalDenied as i32);
    let r = c.watch_alerts(100, false).await.unwrap();
    let Some(response::Body::Alerts(a)) = r.body else {
        panic!("{}", r.message)
    };
    assert!(a.records.is_empty(), "{:?}", a.records);
    assert!(d.stop().success());
}

#[tokio::test]
async fn few_pin_tries_left_is_an_alert() {
    let (label, pin) = ("alert-pin", "55667788");
    own_token(label, pin);
    let dir = tempfile::tempdir().unwrap();
    let config = own_token_config(dir.path(), label, pin);
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    // Someone tries a wrong PIN on the token.
    assert!(!token_login(label, "00000000"));
    let mut c = d.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.watch_alerts(10, false).await.unwrap();
        let Some(response::Body::Alerts(a)) = r.body else {
            panic!("{}", r.message)
        };
        if let Some(alert) = a.records.iter().find(|x| x.reason == "pin_low") {
            assert_eq!(alert.device, "pin-test");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no pin_low alert: {:?}",
            a.records
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(d.stop().success());
}

#[tokio::test]
async fn a_state_directory_put_back_or_deleted_is_refused_and_a_deleted_ledger_row_reopens_nothing()
{
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &[1; 32]).await;
    // A ledger row deleted while the daemon runs gives the single-use approval no use back:
    // the log counts its use too.
    let token = token_for("contract", &[2; 32]);
    let r = c.stamp("contract", &[2; 32], &token, "").await.unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sqlite3(&d.db(), "DELETE FROM approvals");
    let r = c.stamp("contract", &[2; 32], &token, "").await.unwrap();
    assert_eq!(
        (r.status, r.reason.as_str()),
        (Status::ApprovalDenied as i32, "replayed"),
        "{}",
        r.message
    );
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let state = dir.path().join("state");
    let old = copy_db(&state.join("sealgate.db"), &dir.path().join("old"));
    let config = std::fs::read_to_string(dir.path().join("sealgate.toml")).unwrap();
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("restart: {f:?}"));
    let mut c = d.client().await;
    let spent = token_for("contract", &[3; 32]);
    stamp_ok(&mut c, "contract", &[4; 32]).await;
    let r = c.stamp("contract", &[3; 32], &spent, "").await.unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let newest = copy_db(&state.join("sealgate.db"), &dir.path().join("newest"));
    // The older copy put back: consistent on its own (it verifies), refused by the daemon.
    for f in ["sealgate.db", "sealgate.db-wal", "sealgate.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    copy_db(&old, &state);
    assert_eq!(audit_verify(&state.join("sealgate.db")).0, 0);
    let (status, stderr) = run_to_exit(dir.path(), &config);
    assert!(!status.success());
    assert!(
        stderr.contains("rolled back or replaced")
            && stderr.contains("the audit device last took seq"),
        "{stderr}"
    );
    // Deleted altogether: refused the same way.
    for f in ["sealgate.db", "sealgate.db-wal", "sealgate.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    let (status, stderr) = run_to_exit(dir.path(), &config);
    assert!(!status.success());
    assert!(stderr.contains("rolled back or replaced"), "{stderr}");
    // The newest copy starts again.
    for f in ["sealgate.db", "sealgate.db-wal", "sealgate.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    copy_db(&newest, &state);
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("newest: {f:?}"));
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &[5; 32]).await;
}

#[tokio::test]
async fn the_bundle_alone_checks_every_stamp_signature_and_an_empty_log_is_no_proof() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    for (i, seal) in ["contract", "finance", "official"].iter().enumerate() {
        stamp_ok(&mut c, seal, &[i as u8 + 40; 32]).await;
    }
    // RSA PKCS#1 v1.5 too (its rule wants the applicant's TOTP code).
    let totp = enroll(&mut c, "zhao.lei").await;
    let digest = [43u8; 32];
    let r = c
        .stamp_with_mfa(
            "official-pkcs1",
            &digest,
            &token_for("official-pkcs1", &digest),
            "",
            &totp_code(&totp, 0),
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = dir.path().join("state/sealgate.db");
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 stamp signatures checked"), "{out}");
    // The bundle carries the seal keys, their certificates and the CA given.
    let bundle = dir.path().join("bundle");
    let ca = demo().dir.join("ca/ca.crt");
    let (code, out) = sealctl(&[
        "audit",
        "export",
        "--db",
        path(&db),
        "--bundle",
        path(&bundle),
        "--ca",
        path(&ca),
    ]);
    assert_eq!(code, 0, "{out}");
    let names: Vec<String> = std::fs::read_dir(bundle.join("seal-keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for seal in ["contract", "finance", "official"] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with(&format!("{seal}-")) && n.ends_with(".crt.pem")),
            "{seal}: {names:?}"
        );
    }
    assert!(bundle.join("ca/0.crt.pem").exists());
    let key = demo().dir.join("audit-key.pub.pem");
    let verify_bundle =
        |b: &Path| sealctl(&["audit", "verify", "--bundle", path(b), "--key", path(&key)]);
    let (code, out) = verify_bundle(&bundle);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 stamp signatures checked"), "{out}");
    // A seal key swapped for another under the same id is found at the stamp that names it.
    let lines: Vec<String> = std::fs::read_to_string(bundle.join("seal-keys.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let mut rows: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Another key (the two RSA rows share one key).
    let other = rows
        .iter()
        .map(|r| r["spki"].clone())
        .find(|k| *k != rows[0]["spki"])
        .unwrap();
    rows[0]["spki"] = other;
    let swapped: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(bundle.join("seal-keys.jsonl"), swapped).unwrap();
    let (code, out) = verify_bundle(&bundle);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the seal keys were altered"), "{out}");
    std::fs::write(bundle.join("seal-keys.jsonl"), lines.join("\n") + "\n").unwrap();
    // Without the seal keys, no completed stamp can be checked: that fails too.
    std::fs::write(bundle.join("seal-keys.jsonl"), "").unwrap();
    let (code, out) = verify_bundle(&bundle);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not one of the seal keys given"), "{out}");
    std::fs::write(bundle.join("seal-keys.jsonl"), lines.join("\n") + "\n").unwrap();
    // Checkpoints put out of order are named as such.
    let cps = std::fs::read_to_string(bundle.join("checkpoints.jsonl")).unwrap();
    let mut cp_lines: Vec<&str> = cps.lines().collect();
    if cp_lines.len() >= 2 {
        cp_lines.swap(0, 1);
        std::fs::write(bundle.join("checkpoints.jsonl"), cp_lines.join("\n") + "\n").unwrap();
        let (code, out) = verify_bundle(&bundle);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("out of order"), "{out}");
        std::fs::write(bundle.join("checkpoints.jsonl"), cps).unwrap();
    }
    // An empty log proves nothing about the key given.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("audit-keys")).unwrap();
    for f in ["records.jsonl", "checkpoints.jsonl"] {
        std::fs::write(empty.join(f), "").unwrap();
    }
    let (code, out) = verify_bundle(&empty);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("nothing in it is signed by the key given"),
        "{out}"
    );
    // A bundle that cannot be read is exit 2.
    let (code, _) = verify_bundle(&dir.path().join("no-such-bundle"));
    assert_eq!(code, 2);
}
