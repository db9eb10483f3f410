//! The daemon aborted at each step of the stamp pipeline and of the audit writer, under
//! concurrent stamps, then started again on what it left: every stamp a client received is in
//! the log as completed with the signature it got, every authorisation has exactly one outcome,
//! no approval use was given back, the log verifies, and the daemon serves. Needs the crash
//! points compiled in (`--features failpoints`, which ./test.sh turns on).
#![cfg(feature = "failpoints")]

mod common;

use common::*;
use std::time::Duration;

/// Each crash point, and how many times it is passed before it aborts the daemon (the writer's
/// points are passed once at start-up, for `daemon.started`).
const POINTS: &[(&str, u32)] = &[
    ("stamp.before_authorization", 30),
    ("audit.before_checkpoint_signature", 40),
    ("audit.after_checkpoint_signature", 40),
    ("audit.after_commit", 40),
    ("stamp.after_device", 30),
    ("stamp.before_reply", 30),
];

/// Aborts the daemon at `point` under load and checks what the restarted daemon finds. With
/// `recovery`, the first restart is itself aborted inside start-up recovery. Returns the stamps
/// the clients received and the outcomes recorded as unknown.
async fn crash_at(point: &str, passes: u32, recovery: bool) -> (usize, usize) {
    let d = Daemon::start(&Opts::default());
    let armed = format!("{point}={passes}*off->return");
    // The armed daemon takes the plain one's place on the same state.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut d = tokio::task::block_in_place(|| d.restart_with(&[("FAILPOINTS", &armed)]))
        .unwrap_or_else(|f| panic!("{point}: armed start: {f:?}"));
    let load = Load::start(&d.socket, 4);
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(60)))
        .unwrap_or_else(|| panic!("{point}: the daemon was not aborted there"));
    assert!(aborted(status), "{point}: {status}");
    let d = tokio::task::block_in_place(|| {
        if !recovery {
            return d.restart_with(&[]);
        }
        let f = match d.restart_with(&[("FAILPOINTS", "recovery.before_outcomes=return")]) {
            Ok(_) => panic!("{point}: start-up recovery was not interrupted"),
            Err(f) => f,
        };
        assert!(aborted(f.status), "{point}: {f:?}");
        let config = std::fs::read_to_string(f.dir.path().join("sealgate.toml")).unwrap();
        Daemon::start_with(f.dir, &config, &[])
    })
    .unwrap_or_else(|f| panic!("{point}: restart: {f:?}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = load.finish().await;
    // It serves after the crash.
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &sha256(point.as_bytes())).await;
    drop(c);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success(), "{point}: {status}");
    let db = dir.path().join("state/sealgate.db");
    let completed = every_seen_stamp_is_completed(&db, &seen);
    every_authorisation_has_one_outcome(&db);
    for a in records(&db, Some("stamp.authorized")) {
        assert!(
            uses_consumed(&db, &a.jti) >= 1,
            "{point}: the use of {} was given back",
            a.jti
        );
    }
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{point}: {out}");
    let unknown = records(&db, Some("stamp.outcome_unknown")).len();
    eprintln!(
        "{point}: {} stamps received, {} completed in the log, {unknown} outcomes unknown",
        seen.len(),
        completed.len()
    );
    (seen.len(), unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_at_every_step_it_loses_no_stamp() {
    for (point, passes) in POINTS {
        let (received, _) = crash_at(point, *passes, false).await;
        assert!(
            received > 0,
            "{point}: no stamp went through before the crash"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn start_up_recovery_aborted_midway_recovers_on_the_next_start() {
    // Aborted between the device's answer and its outcome: authorisations are left without
    // one, and the recovery that records them is itself cut short once.
    let (_, unknown) = crash_at("stamp.after_device", 30, true).await;
    assert!(unknown >= 1, "no authorisation was left for recovery");
}
