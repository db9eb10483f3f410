//! The state directory on a file system that fails: writes or fsyncs that return EIO, a
//! read-only remount, and power cuts that lose every write no fsync made durable (the FUSE
//! layer in common/faultfs.rs). Needs root and /dev/fuse; skipped with a message elsewhere.

mod common;

use common::faultfs::{self, Fault, FaultFs};
use common::*;
use sealgate::protocol::response::Body;
use sealgate::protocol::Status;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

macro_rules! needs_fuse {
    () => {
        if let Some(why) = faultfs::unavailable() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// Commits `n` rows one transaction each with `sqlite3` under `synchronous`, then kills it
/// without a clean close (which would checkpoint and sync), as a power cut would.
fn commit_rows_and_die(db: &std::path::Path, synchronous: &str, n: usize) {
    let mut child = Command::new("sqlite3")
        .arg(db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sqlite3");
    let mut input = child.stdin.take().unwrap();
    writeln!(
        input,
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={synchronous}; \
         CREATE TABLE IF NOT EXISTS t (n INTEGER);"
    )
    .unwrap();
    for i in 0..n {
        writeln!(input, "INSERT INTO t VALUES ({i});").unwrap();
    }
    writeln!(input, "SELECT 'rows', count(*) FROM t;").unwrap();
    input.flush().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    for line in out.lines() {
        if line.unwrap().starts_with("rows|") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

fn rows(db: &std::path::Path) -> u64 {
    sqlite3_value(db, "SELECT count(*) FROM t;")
}

/// The layer itself: with synchronous=NORMAL a WAL commit is not synced and a power cut loses
/// it; with synchronous=FULL (the daemon's setting) every commit survives. So the power cuts
/// below test something, and the daemon's setting is the one that matters.
#[test]
fn a_power_cut_loses_unsynced_commits_and_only_those() {
    needs_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let mut fs = FaultFs::mount(&dir.path().join("lower"), &dir.path().join("mnt"));
    let db = dir.path().join("mnt/t.db");

    commit_rows_and_die(&db, "FULL", 50);
    let lost = fs.power_cut();
    assert_eq!(
        rows(&db),
        50,
        "a synced commit was lost ({lost} writes undone)"
    );

    commit_rows_and_die(&db, "NORMAL", 50);
    let lost = fs.power_cut();
    assert!(
        lost > 0,
        "nothing was left unsynced under synchronous=NORMAL"
    );
    assert_eq!(
        rows(&db),
        50,
        "commits that no fsync made durable survived a power cut"
    );
    let (writes, bytes) = fs.lost();
    eprintln!("power cuts threw away {writes} writes ({bytes} bytes)");
}

/// The daemon on the layer, under concurrent stamps; `clients` load clients.
fn daemon_on_layer(clients: u64) -> (Daemon, FaultFs, Load) {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::mount(&dir.path().join("lower"), &dir.path().join("state"));
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &Opts::default());
    let d = Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let load = Load::start(&d.socket, clients);
    (d, fs, load)
}

/// Waits until the load has `n` more stamps than `from` (10 s at most).
async fn stamps_flow(load: &Load, from: usize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(12);
    while load.count() < from + n {
        assert!(Instant::now() < deadline, "stamps did not flow {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn audit_error(s: &sealgate::protocol::Response) -> String {
    match &s.body {
        Some(Body::StatusReport(s)) => s.audit.as_ref().unwrap().error.clone(),
        other => panic!("no status: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_and_fsync_errors_and_a_read_only_disk_refuse_stamps_until_the_disk_recovers() {
    needs_fuse!();
    let (d, fs, load) = daemon_on_layer(3);
    let mut c = d.client().await;
    let reopened = |d: &Daemon| d.log().matches("audit log re-opened from disk").count();
    // SQLite reports EROFS on a write as an I/O error too.
    for fault in [Fault::Fsyncs, Fault::Writes, Fault::ReadOnly] {
        stamps_flow(&load, load.count(), 20, &format!("before {fault:?}")).await;
        let before = reopened(&d);
        fs.set(fault);
        let (_, refused) = stamp_until_refused(&mut c).await;
        assert_eq!(
            refused.status,
            Status::AuditUnavailable as i32,
            "{fault:?}: {}",
            refused.message
        );
        assert!(
            refused.message.contains("disk I/O error") && refused.message.contains("nothing"),
            "{fault:?}: {}",
            refused.message
        );
        // Still refusing while it lasts, the status saying why, and still serving.
        let at = load.count();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let digest = sha256(format!("during {fault:?}").as_bytes());
        let r = c
            .stamp("contract", &digest, &token_for("contract", &digest), "")
            .await
            .unwrap();
        assert_eq!(r.status, Status::AuditUnavailable as i32, "{}", r.message);
        assert_eq!(
            r.message.matches("cannot be written").count(),
            1,
            "{fault:?}: {}",
            r.message
        );
        assert!(load.count() <= at + 3, "{fault:?}: stamps went on");
        let s = c.status().await.unwrap();
        assert!(
            !audit_error(&s).is_empty(),
            "{fault:?}: the status shows no error"
        );

        // The disk recovers: the log is read again from disk, and stamps go on.
        fs.set(Fault::None);
        if tokio::time::timeout(
            Duration::from_secs(10),
            stamps_flow(&load, load.count(), 20, ""),
        )
        .await
        .is_err()
        {
            panic!("stamps did not resume after {fault:?}: {}", d.log());
        }
        assert!(audit_error(&c.status().await.unwrap()).is_empty());
        assert!(
            reopened(&d) > before,
            "{fault:?}: the log was not re-opened from disk: {}",
            d.log()
        );
    }
    let failed = fs.failed();
    let seen = load.finish().await;
    let (status, _dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = fs.lower().join("sealgate.db");
    every_seen_stamp_is_completed(&db, &seen);
    every_authorisation_has_one_outcome(&db);
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "{} stamps acknowledged, {failed} I/O errors returned, all acknowledged stamps in the log",
        seen.len()
    );
    drop(fs);
}

/// Power cuts in the test below.
const CUTS: u32 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_power_cuts_under_load_lose_no_acknowledged_stamp() {
    needs_fuse!();
    let (mut d, mut fs, load) = daemon_on_layer(4);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut undone = Vec::new();
    for cut in 0..CUTS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let before = load.count();
        tokio::time::sleep(Duration::from_millis(30 + rng % 220)).await;
        // The power goes: the daemon stops where it is, and what it had not synced is gone.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert!(d.wait_exit(Duration::from_secs(10)).is_some());
        undone.push(tokio::task::block_in_place(|| fs.power_cut()));
        // Its start-up check verifies the tail past the last checkpoint and the head's
        // witness in the audit device; sealctl verifies the whole log every tenth cut (it
        // takes seconds on a log this long) and at the end.
        d = tokio::task::block_in_place(|| d.restart_with(&[]))
            .unwrap_or_else(|f| panic!("cut {cut}: the daemon did not start again: {f:?}"));
        if cut % 10 == 9 {
            let (code, out) = audit_verify(&d.db());
            assert_eq!(code, 0, "cut {cut}: {out}");
            stamps_flow(&load, before, 1, &format!("after cut {cut}")).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = load.finish().await;
    let (status, _dir) = d.stop_keeping_state();
    assert!(status.success());
    let db = fs.lower().join("sealgate.db");
    let completed = every_seen_stamp_is_completed(&db, &seen);
    every_authorisation_has_one_outcome(&db);
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    let unknown = records(&db, Some("stamp.outcome_unknown")).len();
    let (writes, bytes) = fs.lost();
    let cuts_losing = undone.iter().filter(|n| **n > 0).count();
    eprintln!(
        "50 power cuts: {} stamps acknowledged, all {} in the log as completed ({} completed in \
         all), {unknown} outcomes unknown; {cuts_losing} cuts threw away unsynced writes \
         ({writes} writes, {bytes} bytes)",
        seen.len(),
        seen.len(),
        completed.len()
    );
    assert!(seen.len() >= 50, "only {} stamps went through", seen.len());
    drop(fs);
}
