//! The soak: stamps at a steady rate for an hour (or `SOAK_SECONDS`) while faults come on a
//! schedule — the daemon killed with SIGKILL and restarted, the remote token's server killed
//! and brought back, configuration reloads, the state disk filled up and freed — and prints
//! what happened. Not part of the timed suite: `./soak.sh` runs it (as root, for the tmpfs the
//! state lives on). It fails if an acknowledged stamp is missing, an authorisation lacks its
//! single outcome, the log does not verify, or a daemon's descriptors or memory grow past the
//! bounds below.

mod common;

use common::p11kit::{self, P11KitServer};
use common::*;
use sealgate::protocol::{pb, response::Body, Status};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A daemon may open at most this many more descriptors during its life than ten seconds
/// after it started (a reconnecting device, a busy moment's client connections).
const FD_GROWTH_BOUND: i64 = 16;
/// Nor grow its resident memory by more than this (SQLite's page cache fills as the log grows).
const RSS_GROWTH_BOUND_KIB: i64 = 64 * 1024;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One stamp request as a client saw it.
struct Sample {
    at: Duration,
    latency: Duration,
    status: i32,
}

/// What the paced clients share.
#[derive(Default)]
struct Seen {
    samples: Vec<Sample>,
    stamps: Vec<(String, Vec<u8>)>,
    /// Requests whose connection broke before an answer (the daemon was killed).
    unanswered: u64,
}

/// `clients` clients, each stamping `per_second` single-use approvals a second, on the local
/// seal and (every fourth stamp) the remote one; a stamp that runs late is not made up for.
fn paced_load(
    socket: &Path,
    clients: u64,
    per_second: f64,
    start: Instant,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let period = Duration::from_secs_f64(1.0 / per_second);
    (0..clients)
        .map(|n| {
            let (socket, stop, seen) = (socket.to_owned(), stop.clone(), seen.clone());
            tokio::spawn(async move {
                let mut next = Instant::now() + period.mul_f64(n as f64 / clients as f64);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = sealgate::protocol::client::Client::connect(&socket).await
                    else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep_until(next.into()).await;
                        next = (next + period).max(Instant::now());
                        i += 1;
                        let seal = if i.is_multiple_of(4) {
                            "remote-contract"
                        } else {
                            "contract"
                        };
                        let digest = sha256(format!("soak client {n} document {i}").as_bytes());
                        let a = Approval::for_seal(seal, &digest);
                        let sent = Instant::now();
                        let Ok(r) = c.stamp(seal, &digest, &a.token(), "").await else {
                            seen.lock().unwrap().unanswered += 1;
                            break;
                        };
                        let mut s = seen.lock().unwrap();
                        s.samples.push(Sample {
                            at: sent - start,
                            latency: sent.elapsed(),
                            status: r.status,
                        });
                        if let Some(Body::Stamp(st)) = r.body {
                            s.stamps.push((a.claims.jti.clone(), st.signature));
                        }
                    }
                }
            })
        })
        .collect()
}

/// Resident memory (KiB) and open descriptors of a process.
fn rss_and_fds(pid: i32) -> (i64, i64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as i64)
        .unwrap_or(0);
    (rss, fds)
}

/// The first and the latest (RSS, fds) of one daemon's life.
struct Life {
    first: (i64, i64),
    last: (i64, i64),
    seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Fault {
    Kill,
    TokenRemoved,
    Reload,
    DiskFull,
}

/// The n-th fault of the schedule: a kill every twelfth, otherwise a token removal, a reload
/// and a full disk in turn.
fn scheduled(n: u64) -> Fault {
    if n % 12 == 11 {
        Fault::Kill
    } else {
        [Fault::TokenRemoved, Fault::Reload, Fault::DiskFull][(n % 3) as usize]
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// Waits until the clients have received `more` stamps beyond `from` (at most `limit`).
async fn stamps_flow(seen: &Mutex<Seen>, from: usize, more: usize, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if seen.lock().unwrap().stamps.len() >= from + more {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "an hour long; soak.sh runs it"]
async fn soak() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIPPED: the soak mounts a tmpfs for its state (run soak.sh as root)");
        return;
    }
    let seconds = setting("SOAK_SECONDS", 3600);
    let rate = setting("SOAK_RATE", 40) as f64;
    let every = Duration::from_secs(setting("SOAK_FAULT_EVERY_SECONDS", 60));
    let clients = 4;

    let (_work, p11_socket, server) = p11kit::serve_demo_token();
    let mut server = Some(server);
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("state"), "1G");
    let opts = Opts {
        extra: p11kit::remote_seal_toml(),
        caller_seals: Some(vec!["contract".into(), "remote-contract".into()]),
        max_connections: 256,
        ..Opts::default()
    };
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &opts);
    let address = p11kit::address(&p11_socket);
    let env = [("P11_KIT_SERVER_ADDRESS", address.as_str())];
    let mut daemon = Some(Daemon::start_with(dir, &text, &env).unwrap_or_else(|f| panic!("{f:?}")));
    let socket = daemon.as_ref().unwrap().socket.clone();
    let db: PathBuf = daemon.as_ref().unwrap().db();

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Seen>> = Default::default();
    let load = paced_load(
        &socket,
        clients,
        rate / clients as f64,
        start,
        stop.clone(),
        seen.clone(),
    );

    let mut faults: BTreeMap<Fault, u64> = BTreeMap::new();
    let mut slow_recoveries = Vec::new();
    let mut lives: Vec<Life> = Vec::new();
    let mut born = Instant::now();
    let mut first: Option<(i64, i64)> = None;
    let mut n = 0;
    let end = start + Duration::from_secs(seconds);
    let mut next_fault = start + every;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = rss_and_fds(daemon.as_ref().unwrap().pid());
        if first.is_none() && born.elapsed() >= Duration::from_secs(10) {
            first = Some(now);
        }
        if Instant::now() < next_fault {
            continue;
        }
        next_fault += every;
        let fault = scheduled(n);
        n += 1;
        *faults.entry(fault).or_default() += 1;
        let before = seen.lock().unwrap().stamps.len();
        if fault == Fault::Kill {
            lives.push(Life {
                first: first.take().unwrap_or(now),
                last: now,
                seconds: born.elapsed().as_secs(),
            });
            let d = daemon.take().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.pid()),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            daemon = Some(
                d.restart_with(&env)
                    .unwrap_or_else(|f| panic!("restart: {f:?}")),
            );
            born = Instant::now();
        }
        let d = daemon.as_ref().unwrap();
        match fault {
            Fault::Kill => {}
            Fault::TokenRemoved => {
                server.take().unwrap().kill();
                tokio::time::sleep(Duration::from_secs(5)).await;
                server = Some(P11KitServer::start(&p11_socket));
                wait_device(d, "remote-hsm", pb::DeviceStatus::Ready).await;
            }
            Fault::Reload => {
                let outcome = d.reload_next();
                assert!(outcome.contains("configuration reloaded"), "{outcome}");
            }
            Fault::DiskFull => {
                let filled = start.elapsed();
                let filler = tmpfs.fill(64 * 1024);
                let refused = {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        let refused =
                            seen.lock().unwrap().samples.iter().rev().take(8).any(|s| {
                                s.status == Status::AuditUnavailable as i32 && s.at > filled
                            });
                        if refused || Instant::now() > deadline {
                            break refused;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                assert!(refused, "a full disk refused nothing");
                std::fs::remove_file(filler).unwrap();
            }
        }
        let from = seen.lock().unwrap().stamps.len().max(before);
        if !stamps_flow(&seen, from, 10, Duration::from_secs(30)).await {
            slow_recoveries.push(format!("{fault:?} at {}s", start.elapsed().as_secs()));
        }
    }
    let d = daemon.as_ref().unwrap();
    let last = rss_and_fds(d.pid());
    lives.push(Life {
        first: first.unwrap_or(last),
        last,
        seconds: born.elapsed().as_secs(),
    });
    stop.store(true, Ordering::Relaxed);
    for c in load {
        c.await.unwrap();
    }
    let (status, dir) = daemon.take().unwrap().stop_keeping_state();
    assert!(status.success());
    server.take().unwrap().kill();

    // What the log holds.
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let completed: std::collections::HashSet<String> = records(&db, Some("stamp.completed"))
        .into_iter()
        .map(|r| r.jti)
        .collect();
    let lost = seen
        .stamps
        .iter()
        .filter(|(jti, _)| !completed.contains(jti))
        .count();
    let (code, out) = audit_verify(&db);
    let log_records = sqlite3_value(&db, "SELECT COUNT(*) FROM audit");

    // The figures.
    let wall = start.elapsed().as_secs();
    println!(
        "soak: {wall} s at {rate} stamps/s asked, {clients} clients, a fault every {}s",
        every.as_secs()
    );
    println!("stamps acknowledged: {}", seen.stamps.len());
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    for s in &seen.samples {
        let name = Status::try_from(s.status)
            .map(|s| s.as_str_name().to_owned())
            .unwrap_or_else(|_| s.status.to_string());
        *by_status.entry(name).or_default() += 1;
    }
    println!(
        "answers by status: {by_status:?}; no answer (daemon killed): {}",
        seen.unanswered
    );
    println!("faults injected: {faults:?}");
    println!("acknowledged stamps missing from the log: {lost}");
    println!("log records: {log_records}; sealctl audit verify: exit {code}");
    println!("recoveries slower than 30 s: {slow_recoveries:?}");
    // Samples at the very end of the last hour count in it.
    let hours = seconds.div_ceil(3600).max(1);
    for h in 0..hours {
        let mut ok: Vec<Duration> = seen
            .samples
            .iter()
            .filter(|s| {
                (s.at.as_secs() / 3600).min(hours - 1) == h && s.status == Status::Ok as i32
            })
            .map(|s| s.latency)
            .collect();
        ok.sort();
        println!(
            "hour {}: {} stamps, latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms",
            h + 1,
            ok.len(),
            percentile(&ok, 0.50),
            percentile(&ok, 0.99),
            percentile(&ok, 0.999),
            percentile(&ok, 1.0)
        );
    }
    // And by ten minutes, to show when the latency moved.
    let tens = seconds.div_ceil(600).max(1);
    let mut row = Vec::new();
    for t in 0..tens {
        let mut ok: Vec<Duration> = seen
            .samples
            .iter()
            .filter(|s| (s.at.as_secs() / 600).min(tens - 1) == t && s.status == Status::Ok as i32)
            .map(|s| s.latency)
            .collect();
        ok.sort();
        row.push(format!(
            "{}-{} min: p50 {:.2} p99 {:.2}",
            t * 10,
            t * 10 + 10,
            percentile(&ok, 0.50),
            percentile(&ok, 0.99)
        ));
    }
    println!("by ten minutes (ms): {}", row.join("; "));
    println!("daemon lives (RSS KiB, fds at 10 s -> at the end, seconds):");
    let mut worst = (0, 0);
    for l in &lives {
        println!(
            "  {} KiB, {} fds -> {} KiB, {} fds over {} s",
            l.first.0, l.first.1, l.last.0, l.last.1, l.seconds
        );
        worst = (
            worst.0.max(l.last.0 - l.first.0),
            worst.1.max(l.last.1 - l.first.1),
        );
    }
    println!(
        "largest growth in one life: {} KiB (bound {RSS_GROWTH_BOUND_KIB}), {} fds (bound {FD_GROWTH_BOUND})",
        worst.0, worst.1
    );
    assert_eq!(lost, 0);
    every_seen_stamp_is_completed(&db, &seen.stamps);
    every_authorisation_has_one_outcome(&db);
    drop(tmpfs);
    drop(dir);
    assert_eq!(code, 0, "{out}");
    assert!(worst.0 <= RSS_GROWTH_BOUND_KIB && worst.1 <= FD_GROWTH_BOUND);
    assert!(slow_recoveries.is_empty(), "{slow_recoveries:?}");
}
