//! `sealctl bench` runs end to end on a small scale: raw signing, the three scenarios against
//! a daemon of its own, the audit log checked, the verifier timed, and the auditors' console
//! browsed (the figures themselves are not asserted; README's performance section has a full
//! run's); and a bench that is killed takes its daemon with it.

mod common;

use common::*;
use std::process::Command;

#[test]
fn bench_runs_every_scenario_and_accounts_for_every_stamp() {
    let demo = demo();
    let out = Command::new(SEALCTL)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--json", "bench", "--demo"])
        .arg(&demo.dir)
        .args([
            "--algorithms",
            "ecdsa-p256-sha256,ed25519",
            "--stamps",
            "60",
            "--sequential",
            "20",
            "--clients",
            "4",
            "--raw-seconds",
            "0.2",
            "--verify-records",
            "3000",
            "--console-records",
            "3000",
            "--console-sessions",
            "3",
            "--console-seconds",
            "1",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    for line in [
        "raw C_Sign",
        "a. one approval, many uses",
        "b. single-use approvals, two signatures",
        "ceiling from measured costs",
        "processor time per stamp: daemon",
        "the disk here: an fsync of a page written over takes",
        "c. one client, sequential",
        "sealctl audit verify: 3000 records",
    ] {
        assert!(text.contains(line), "no {line:?} in:\n{text}");
    }
    // 2 algorithms x (60 + 60 + 20) stamps, each durable and counted.
    assert!(
        text.contains("stamp.completed records 280, stamps the clients got 280"),
        "{text}"
    );
    // With --json the figures are one object on stdout (the report went to stderr).
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let algorithms = figures["algorithms"].as_array().unwrap();
    assert_eq!(algorithms.len(), 2);
    for a in algorithms {
        assert!(a["raw_sign_per_second"].as_f64().unwrap() > 0.0, "{a}");
        let scenarios = a["scenarios"].as_array().unwrap();
        assert_eq!(scenarios.len(), 3);
        for sc in scenarios {
            assert!(sc["stamps_per_second"].as_f64().unwrap() > 0.0, "{sc}");
            assert!(sc["p99_ms"].as_f64().unwrap() >= sc["p50_ms"].as_f64().unwrap());
            // The daemon's and the clients' processor time per stamp, read from /proc.
            for who in ["daemon_cpu_us_per_stamp", "clients_cpu_us_per_stamp"] {
                assert!(sc[who].as_f64().is_some_and(|us| us >= 0.0), "{who}: {sc}");
            }
        }
        assert!(scenarios[1]["ceiling_per_second"].as_f64().is_some());
        // What the targets of (a) and (b) allow a stamp to cost the machine.
        for sc in &scenarios[..2] {
            assert!(sc["target_cpu_budget_us"].as_f64().unwrap() > 0.0, "{sc}");
        }
        // And what one of the two fsyncs that (c) waits on costs on this disk.
        assert!(scenarios[2]["fsync_us_p50"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(figures["audit_log"]["stamp_completed"], 280);
    assert_eq!(figures["audit_verify"]["records"], 3000);
    // The console: every page answered, to every session.
    let console = &figures["console"];
    assert_eq!(console["sessions"], 3);
    assert!(console["records"].as_u64().unwrap() >= 3000, "{console}");
    let pages = console["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 6, "{console}");
    for p in pages {
        assert!(p["answers"].as_u64().unwrap() > 0, "{p}");
    }
}

/// The daemon is the bench's own: when the bench is killed (SIGKILL, which it cannot catch),
/// its daemon gets SIGTERM and goes, rather than holding a token session and its state.
#[test]
fn a_killed_bench_takes_its_daemon_with_it() {
    let demo = demo();
    let mut bench = Command::new(SEALCTL)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["bench", "--demo"])
        .arg(&demo.dir)
        .args([
            "--algorithms",
            "ecdsa-p256-sha256",
            "--stamps",
            "100000",
            "--raw-seconds",
            "0.2",
            "--verify-records",
            "0",
            "--console-records",
            "0",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The bench's child `sealgated`, once it runs.
    let child_of = |parent: u32| -> Option<u32> {
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid ...
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent && name == "sealgated").then_some(pid)
        })
    };
    let started = std::time::Instant::now();
    let daemon = loop {
        if let Some(pid) = child_of(bench.id()) {
            break pid;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the bench started no daemon"
        );
        assert!(bench.try_wait().unwrap().is_none(), "the bench ended early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    bench.kill().unwrap();
    bench.wait().unwrap();
    // Gone, or a zombie waiting for whoever adopted it.
    let gone = || {
        std::fs::read_to_string(format!("/proc/{daemon}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        })
    };
    let killed = std::time::Instant::now();
    while !gone() {
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(20),
            "the daemon {daemon} outlived its bench"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
