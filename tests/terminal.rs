//! Smart-seal terminals: the real daemon talking terminal protocol v1 to our terminal simulator
//! (`sealgate-terminal`) over a real pseudo-terminal, opened by the daemon as a serial port, and
//! over TCP with mutual TLS (certificates made by openssl). Impression signatures are checked
//! here against the enrolled key, from the evidence in the audit log.

mod common;

use common::pki::Pki;
use common::*;
use ed25519_dalek::{Signature, SigningKey, Verifier};
use prost::Message;
use sealgate::protocol::{pb, request, response::Body, Status};
use sealgate::terminal::{pb as tpb, signed_bytes, Command as Cmd};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const SIM: &str = env!("CARGO_BIN_EXE_sealgate-terminal");

/// The shipped profile with test timings: heartbeats every 200 ms, lost after 1.5 s; grants
/// last `@GRANT@` seconds.
const PROFILE: &str = r#"
model = "terminal under test"
kind = "terminal"
algorithms = ["ed25519"]

[terminal]
protocol = "sealgate-terminal-v1"
frame_timeout_ms = 300
ack_timeout_ms = 300
retries = 3
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 1500
reconnect_interval_ms = 200
grant_seconds = @GRANT@
max_impressions = 5
"#;

/// A running simulator and what it has printed.
struct Sim {
    child: Child,
    stdin: ChildStdin,
    lines: Printed,
}

impl Sim {
    fn start(id: &str, key_file: &Path, line: &[String]) -> Sim {
        let mut child = Command::new(SIM)
            .args(["--id", id, "--heartbeat-ms", "200"])
            .arg("--key-file")
            .arg(key_file)
            .args(line)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start sealgate-terminal");
        let stdin = child.stdin.take().unwrap();
        let lines = Printed::collect(child.stdout.take().unwrap());
        Sim {
            child,
            stdin,
            lines,
        }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines.count(prefix)
    }

    /// Waits until `n` lines starting with `prefix` have been printed.
    #[track_caller]
    fn wait_for(&self, prefix: &str, n: usize) {
        self.lines.wait_for(prefix, n, Duration::from_secs(10))
    }

    /// Sends `command` and waits for one more `prefix` line.
    #[track_caller]
    fn expect(&mut self, command: &str, prefix: &str) {
        let n = self.count(prefix);
        self.send(command);
        self.wait_for(prefix, n + 1);
    }

    /// Gives frames in flight time to be ACKed and recorded (over two ACK timeouts), so that a
    /// count taken next would see a second record if there were one.
    fn settle(&self) {
        std::thread::sleep(Duration::from_millis(700));
    }

    fn printed(&self) -> Vec<String> {
        self.lines.all()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A terminal's identity: device key (seed file and public half).
struct Identity {
    seed_file: PathBuf,
    public: [u8; 32],
}

fn identity(dir: &Path, name: &str, seed: u8) -> Identity {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let seed_file = dir.join(format!("{name}.seed"));
    std::fs::write(&seed_file, hex::encode([seed; 32])).unwrap();
    Identity {
        seed_file,
        public: key.verifying_key().to_bytes(),
    }
}

/// Simulator arguments for a TLS terminal presenting `name`'s certificate.
fn sim_args(pki: &Pki, addr: &str, name: &str) -> Vec<String> {
    [
        "--tls",
        addr,
        "--ca",
        &pki.path("ca.crt"),
        "--cert",
        &pki.path(&format!("{name}.crt")),
        "--key",
        &pki.path(&format!("{name}.key")),
    ]
    .map(String::from)
    .to_vec()
}

/// Grants' time limit in the test profile, unless a test needs a short one.
const GRANT_SECONDS: u32 = 30;

/// A directory with the test profile and SoftHSM's, for `profiles_dir`.
fn profiles(dir: &Path, grant_seconds: u32) -> PathBuf {
    let p = dir.join("profiles");
    std::fs::create_dir_all(&p).unwrap();
    let profile = PROFILE.replace("@GRANT@", &grant_seconds.to_string());
    std::fs::write(p.join("terminal-test.toml"), profile).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
    std::fs::copy(shipped.join("softhsm2.toml"), p.join("softhsm2.toml")).unwrap();
    p
}

/// A terminal entry: its seal, policy (contracts, one dept_head approval) and line.
fn terminal_config(id: &str, seal: &str, public: &[u8; 32], line: &str) -> String {
    format!(
        "\n[[terminal]]\nid = \"{id}\"\nprofile = \"terminal-test\"\nseal = \"{seal}\"\nname = \"{seal} in {id}\"\npublic_key = \"{}\"\n{line}\n\n[[terminal.rule]]\nname = \"contracts\"\ndoc_types = [\"contract\"]\nlevels = [\"dept_head\"]\n",
        hex::encode(public)
    )
}

/// Starts the daemon with the demo seals plus `terminals` (TOML), the caller given every seal
/// in `seals` too.
fn start_daemon(dir: tempfile::TempDir, terminals: &str, seals: &[&str], listener: &str) -> Daemon {
    start_daemon_with(dir, terminals, seals, listener, GRANT_SECONDS)
}

fn start_daemon_with(
    dir: tempfile::TempDir,
    terminals: &str,
    seals: &[&str],
    listener: &str,
    grant_seconds: u32,
) -> Daemon {
    let socket = dir.path().join("sealgated.sock");
    let mut caller_seals: Vec<String> = vec!["contract".into()];
    caller_seals.extend(seals.iter().map(|s| s.to_string()));
    let opts = Opts {
        extra: format!("{listener}\n{terminals}"),
        caller_seals: Some(caller_seals),
        ..Opts::default()
    };
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
    let text = config_text(demo(), &socket, &opts).replace(
        &format!("profiles_dir = \"{}\"", shipped.display()),
        &format!(
            "profiles_dir = \"{}\"",
            profiles(dir.path(), grant_seconds).display()
        ),
    );
    Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("daemon did not start: {f:?}"))
}

/// An approval for `impressions` uses of `seal` on `doc`.
fn approval(seal: &str, doc: &[u8], impressions: u32) -> Vec<u8> {
    let mut a = Approval::for_seal(seal, doc);
    a.claims.uses = impressions;
    a.token()
}

async fn grant(
    d: &Daemon,
    seal: &str,
    doc: &[u8],
    impressions: u32,
) -> sealgate::protocol::Response {
    let mut c = d.client().await;
    c.call(request::Body::GrantTerminal(pb::GrantTerminalRequest {
        seal_id: seal.into(),
        document_sha256: doc.to_vec(),
        approval_token: approval(seal, doc, impressions),
        impressions,
        purpose: "sign the lease".into(),
        mfa_code: String::new(),
    }))
    .await
    .unwrap()
}

/// Records of the audit log as (kind, reason), in order, from `sealctl`-independent SQL.
fn kinds(db: &Path) -> Vec<(String, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT kind, reason FROM audit ORDER BY seq")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn alerts(db: &Path) -> Vec<String> {
    kinds(db)
        .into_iter()
        .filter(|(k, _)| k == "alert")
        .map(|(_, r)| r)
        .collect()
}

fn count(db: &Path, kind: &str, reason: &str) -> usize {
    kinds(db)
        .iter()
        .filter(|(k, r)| k == kind && (reason.is_empty() || r == reason))
        .count()
}

/// Waits until the log holds `n` records of `kind` (with `reason`, when not empty).
#[track_caller]
fn wait_records(db: &Path, kind: &str, reason: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(db, kind, reason) < n {
        assert!(
            Instant::now() < deadline,
            "no {n} x {kind} {reason}: {:?}",
            kinds(db)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every `terminal.impression` record's report verifies under `public`, and they carry
/// counters `want`.
fn impressions_verify(db: &Path, terminal: &str, public: &[u8; 32], want: &[u64]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = ed25519_dalek::VerifyingKey::from_bytes(public).unwrap();
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT evidence FROM audit WHERE kind = 'terminal.impression' ORDER BY seq")
        .unwrap();
    let mut counters = Vec::new();
    for ev in s.query_map([], |r| r.get::<_, String>(0)).unwrap() {
        let ev: serde_json::Value = serde_json::from_str(&ev.unwrap()).unwrap();
        assert_eq!(ev["public_key"], hex::encode(public));
        let body = b64.decode(ev["body"].as_str().unwrap()).unwrap();
        let sig: [u8; 64] = b64
            .decode(ev["signature"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        key.verify(
            &signed_bytes(terminal, Cmd::Impression, &body),
            &Signature::from_bytes(&sig),
        )
        .expect("the impression's signature verifies under the enrolled key");
        counters.push(tpb::Impression::decode(body.as_slice()).unwrap().counter);
    }
    assert_eq!(counters, want);
}

/// Request → grant for 2 → 2 impressions → locked; a third is an alert. Shared by both lines.
async fn full_flow(d: &Daemon, sim: &mut Sim, terminal: &str, seal: &str, public: &[u8; 32]) {
    sim.wait_for("ack", 1); // HELLO taken
    let doc = sha256(b"lease for the Pudong office");
    let r = grant(d, seal, &doc, 2).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let Some(Body::GrantTerminal(g)) = r.body else {
        panic!("no grant")
    };
    assert_eq!((g.terminal_id.as_str(), g.impressions), (terminal, 2));
    assert_eq!(g.grant_id.len(), 16);
    sim.wait_for("granted impressions=2", 1);
    sim.expect("press", "impression counter=1");
    sim.expect("press", "locked");
    sim.wait_for("impression counter=2", 1);
    let db = d.db();
    wait_records(&db, "terminal.locked", "", 1);
    assert_eq!(count(&db, "terminal.granted", ""), 1);
    impressions_verify(&db, terminal, public, &[1, 2]);
    assert!(alerts(&db).is_empty(), "{:?}", alerts(&db));
    // The seal is locked: pressing does nothing, and a forced third impression is an alert.
    sim.expect("press", "refused no-grant");
    sim.expect("force", "impression counter=3");
    wait_records(&db, "alert", "terminal_no_grant", 1);
    assert_eq!(count(&db, "terminal.rejected", "no_grant"), 1);
    assert_eq!(alerts(&db), ["terminal_no_grant"]);
    impressions_verify(&db, terminal, public, &[1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn full_flow_over_a_pseudo_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let id = identity(dir.path(), "front", 1);
    let tty = dir.path().join("tty-front");
    let mut sim = Sim::start(
        "front-desk",
        &id.seed_file,
        &["--pty-link".into(), tty.display().to_string()],
    );
    sim.wait_for("connected", 1);
    let t = terminal_config(
        "front-desk",
        "contract-physical",
        &id.public,
        &format!("serial = \"{}\"", tty.display()),
    );
    let d = start_daemon(dir, &t, &["contract-physical"], "");
    full_flow(&d, &mut sim, "front-desk", "contract-physical", &id.public).await;
    // The physical seal is listed, and is not a signing seal.
    let mut c = d.client().await;
    let r = c.list_seals().await.unwrap();
    let Some(Body::ListSeals(l)) = r.body else {
        panic!()
    };
    let s = l
        .seals
        .iter()
        .find(|s| s.id == "contract-physical")
        .unwrap();
    assert_eq!((s.algorithm.as_str(), s.available), ("terminal", true));
    let doc = sha256(b"x");
    let r = c
        .stamp(
            "contract-physical",
            &doc,
            &token_for("contract-physical", &doc),
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    assert_eq!(audit_verify(&d.db()).0, 0);
}

/// A daemon with a TLS listener and one terminal, "branch-office", pinned by the certificate
/// of client "branch"; a client "stranger" has a certificate nobody pinned.
fn tls_rig(seed: u8) -> (Daemon, Pki, Identity, String) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let pin = pki.client("branch");
    pki.client("stranger");
    let id = identity(dir.path(), "branch", seed);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let listener = format!(
        "\n[terminals]\nlisten = \"{addr}\"\ncertificate = \"{}\"\nkey = \"{}\"\n",
        pki.path("server.crt"),
        pki.path("server.key")
    );
    let t = terminal_config(
        "branch-office",
        "branch-contract",
        &id.public,
        &format!("certificate_sha256 = \"{pin}\""),
    );
    let d = start_daemon(dir, &t, &["branch-contract"], &listener);
    (d, pki, id, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn full_flow_over_mutual_tls_and_strangers_are_refused_before_any_byte() {
    let (d, pki, id, addr) = tls_rig(2);
    let db = d.db();
    let mut sim = Sim::start(
        "branch-office",
        &id.seed_file,
        &sim_args(&pki, &addr, "branch"),
    );
    sim.wait_for("ack", 1);
    // A terminal whose certificate nobody pinned, even with the enrolled device key, is refused
    // in the handshake: not one of its frames is read.
    let stranger = Sim::start(
        "branch-office",
        &id.seed_file,
        &sim_args(&pki, &addr, "stranger"),
    );
    wait_records(&db, "terminal.refused", "", 1);
    stranger.wait_for("disconnected", 1);
    assert_eq!(stranger.count("ack"), 0, "{:?}", stranger.printed());
    drop(stranger);
    assert_eq!(count(&db, "terminal.hello", ""), 1);
    assert_eq!(count(&db, "terminal.connected", ""), 1);
    assert_eq!(count(&db, "terminal.disconnected", ""), 0);
    full_flow(&d, &mut sim, "branch-office", "branch-contract", &id.public).await;
    assert_eq!(audit_verify(&d.db()).0, 0);
}

/// One pty terminal and a running daemon, for the scripted scenarios.
fn pty_rig(seed: u8) -> (Daemon, Sim, Identity) {
    pty_rig_in(tempfile::tempdir().unwrap(), seed, GRANT_SECONDS, &[])
}

/// `pty_rig` in a prepared folder, the simulator given `sim_args` too.
fn pty_rig_in(
    dir: tempfile::TempDir,
    seed: u8,
    grant_seconds: u32,
    sim_args: &[&str],
) -> (Daemon, Sim, Identity) {
    let id = identity(dir.path(), "t", seed);
    let tty = dir.path().join("tty");
    let mut args = vec!["--pty-link".to_string(), tty.display().to_string()];
    args.extend(sim_args.iter().map(|a| a.to_string()));
    let sim = Sim::start("t1", &id.seed_file, &args);
    sim.wait_for("connected", 1);
    let t = terminal_config(
        "t1",
        "stamp-room",
        &id.public,
        &format!("serial = \"{}\"", tty.display()),
    );
    let d = start_daemon_with(dir, &t, &["stamp-room"], "", grant_seconds);
    sim.wait_for("ack", 1);
    (d, sim, id)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_anomaly_fires_once() {
    let (d, mut sim, _) = pty_rig(3);
    let db = d.db();
    let step = |sim: &Sim, db: &Path, rule: &str| {
        wait_records(db, "alert", rule, 1);
        sim.settle();
        assert_eq!(count(db, "alert", rule), 1, "{rule}: {:?}", alerts(db));
    };
    // An impression without a grant.
    sim.send("force");
    step(&sim, &db, "terminal_no_grant");
    // A counter gap inside a grant: the second impression skips two numbers.
    let doc = sha256(b"board resolution");
    assert_eq!(
        grant(&d, "stamp-room", &doc, 3).await.status,
        Status::Ok as i32
    );
    sim.wait_for("granted", 1);
    sim.expect("press", "impression counter=2");
    sim.send("jump 2");
    sim.expect("press", "impression counter=5");
    step(&sim, &db, "terminal_counter_gap");
    // The same signed report again.
    sim.send("replay");
    step(&sim, &db, "terminal_replay");
    // A counter that goes back.
    sim.send("rollback 3");
    sim.send("force");
    step(&sim, &db, "terminal_counter_rollback");
    // A report signed by another key.
    sim.send("badsig");
    step(&sim, &db, "terminal_bad_signature");
    // Tamper.
    sim.send("tamper");
    step(&sim, &db, "terminal_tamper");
    // Silence longer than the heartbeat timeout; then the terminal is heard again.
    sim.send("silence");
    step(&sim, &db, "terminal_heartbeat_lost");
    sim.send("resume");
    wait_records(&db, "terminal.heartbeat_back", "", 1);
    sim.settle();
    let mut got = alerts(&db);
    got.sort();
    assert_eq!(
        got,
        [
            "terminal_bad_signature",
            "terminal_counter_gap",
            "terminal_counter_rollback",
            "terminal_heartbeat_lost",
            "terminal_no_grant",
            "terminal_replay",
            "terminal_tamper",
        ]
    );
    assert_eq!(audit_verify(&db).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_normal_day_raises_no_alert() {
    let (d, mut sim, id) = pty_rig(4);
    let db = d.db();
    let mut counter = 0;
    for (i, n) in [2u32, 1, 3].iter().enumerate() {
        let doc = sha256(format!("contract {i}").as_bytes());
        if i == 1 {
            // The operator asks at the terminal itself.
            use base64::Engine;
            let token =
                base64::engine::general_purpose::STANDARD.encode(approval("stamp-room", &doc, *n));
            sim.send(&format!("request {token} {} {n}", hex::encode(&doc)));
        } else {
            assert_eq!(
                grant(&d, "stamp-room", &doc, *n).await.status,
                Status::Ok as i32
            );
        }
        sim.wait_for("granted", i + 1);
        for _ in 0..*n {
            counter += 1;
            sim.expect("press", &format!("impression counter={counter}"));
        }
        sim.wait_for("locked", i + 1);
        std::thread::sleep(Duration::from_millis(400));
    }
    // A second grant while one is live is refused, and nothing is consumed for it.
    let doc = sha256(b"one more");
    assert_eq!(
        grant(&d, "stamp-room", &doc, 2).await.status,
        Status::Ok as i32
    );
    let r = grant(&d, "stamp-room", &sha256(b"another"), 1).await;
    assert_eq!(r.status, Status::GrantLive as i32, "{}", r.message);
    sim.wait_for("granted", 4);
    sim.expect("press", "impression counter=7");
    sim.expect("press", "locked");
    // Heartbeats for a while (over the heartbeat timeout in total).
    std::thread::sleep(Duration::from_millis(2000));
    wait_records(&db, "terminal.locked", "", 4);
    assert!(alerts(&db).is_empty(), "{:?}", alerts(&db));
    assert_eq!(counter, 6);
    impressions_verify(&db, "t1", &id.public, &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(count(&db, "terminal.granted", ""), 4);
    assert_eq!(audit_verify(&db).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_lines_get_naks_or_a_clean_reconnect_and_other_seals_keep_stamping() {
    let (d, mut sim, id) = pty_rig(5);
    let db = d.db();
    let mut c = d.client().await;
    let naks = |sim: &Sim| sim.count("nak");
    let mut seen = naks(&sim);
    for damage in ["corrupt", "noise 64", "unknown", "truncate"] {
        sim.send(damage);
        let deadline = Instant::now() + Duration::from_secs(5);
        while naks(&sim) <= seen {
            assert!(
                Instant::now() < deadline,
                "no NAK after {damage}: {:?}",
                sim.printed()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        seen = naks(&sim);
        // A PKCS#11 seal is served all along.
        stamp_ok(&mut c, "contract", &sha256(damage.as_bytes())).await;
    }
    // Cut mid-frame: the simulator comes back on a new pty behind the same port name.
    let hellos = count(&db, "terminal.hello", "");
    sim.send("cut");
    wait_records(&db, "terminal.hello", "", hellos + 1);
    // The port vanishes, then comes back.
    sim.send("vanish");
    wait_records(&db, "terminal.disconnected", "", 2);
    stamp_ok(&mut c, "contract", &sha256(b"while the port is gone")).await;
    std::thread::sleep(Duration::from_millis(400));
    sim.send("return");
    wait_records(&db, "terminal.hello", "", hellos + 2);
    // And the terminal works.
    let doc = sha256(b"after the storm");
    let r = grant(&d, "stamp-room", &doc, 1).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.wait_for("granted", 1);
    sim.expect("press", "locked");
    wait_records(&db, "terminal.locked", "", 1);
    impressions_verify(&db, "t1", &id.public, &[1]);
    assert!(alerts(&db).is_empty(), "{:?}", alerts(&db));
    assert!(!d.log().contains("panicked"), "{}", d.log());
    assert_eq!(audit_verify(&db).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_for_a_terminal_that_is_not_connected_consumes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let id = identity(dir.path(), "t", 6);
    let tty = dir.path().join("tty-nobody");
    let t = terminal_config(
        "absent",
        "absent-seal",
        &id.public,
        &format!("serial = \"{}\"", tty.display()),
    );
    let d = start_daemon(dir, &t, &["absent-seal"], "");
    let doc = sha256(b"nobody home");
    let token = approval("absent-seal", &doc, 1);
    let mut c = d.client().await;
    let ask = |token: Vec<u8>| {
        request::Body::GrantTerminal(pb::GrantTerminalRequest {
            seal_id: "absent-seal".into(),
            document_sha256: doc.clone(),
            approval_token: token,
            impressions: 1,
            purpose: String::new(),
            mfa_code: String::new(),
        })
    };
    let r = c.call(ask(token.clone())).await.unwrap();
    assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);
    assert!(r.message.contains("nothing was consumed"), "{}", r.message);
    assert_eq!(count(&d.db(), "terminal.granted", ""), 0);
    // Unknown and foreign names are told apart only for seals the caller was given.
    let r = c
        .call(request::Body::GrantTerminal(pb::GrantTerminalRequest {
            seal_id: "no-such-seal".into(),
            document_sha256: doc.clone(),
            approval_token: token,
            impressions: 1,
            purpose: String::new(),
            mfa_code: String::new(),
        }))
        .await
        .unwrap();
    assert_eq!(r.status, Status::UnknownSeal as i32, "{}", r.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_frames_are_sent_again_and_taken_once() {
    let (d, mut sim, id) = pty_rig(7);
    let db = d.db();
    // The GRANT is lost once: the daemon sends it again, and answers the office app once the
    // terminal has ACKed it. The session's opening exchange ends first, so that what the
    // terminal misses is the GRANT and not a late ACK of that exchange.
    sim.settle();
    sim.send("deaf 1");
    let doc = sha256(b"retransmitted");
    let r = grant(&d, "stamp-room", &doc, 2).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    assert_eq!(sim.count("lost cmd=3"), 1, "{:?}", sim.printed());
    // The terminal prints its grant after ACKing it, so the line may come a moment later.
    sim.wait_for("granted", 1);
    sim.settle();
    assert_eq!(sim.count("granted"), 1);
    // The ACK of an impression is lost: the terminal sends the report again, and the daemon
    // ACKs it again without taking it twice (no second record, no replay alert).
    sim.send("deaf 1");
    sim.expect("press", "impression counter=1");
    sim.wait_for("lost cmd=16", 1);
    sim.expect("press", "locked");
    wait_records(&db, "terminal.locked", "", 1);
    sim.settle();
    impressions_verify(&db, "t1", &id.public, &[1, 2]);
    assert!(alerts(&db).is_empty(), "{:?}", alerts(&db));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_policy_reloads_and_a_changed_terminal_takes_a_restart() {
    let (d, mut sim, _) = pty_rig(8);
    let path = d.dir.path().join("sealgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Another enrolled key: refused, the running terminal goes on.
    let key_line = text
        .lines()
        .find(|l| l.starts_with("public_key = "))
        .unwrap()
        .to_owned();
    let other = format!(
        "public_key = \"{}\"",
        hex::encode(identity(d.dir.path(), "x", 9).public)
    );
    std::fs::write(&path, text.replace(&key_line, &other)).unwrap();
    let line = d.reload(1);
    assert!(
        line.contains("reload refused") && line.contains("terminals"),
        "{line}"
    );
    let doc = sha256(b"still the old key");
    assert_eq!(
        grant(&d, "stamp-room", &doc, 1).await.status,
        Status::Ok as i32
    );
    sim.wait_for("granted", 1);
    sim.expect("press", "locked");
    // The terminal seal's policy changes on a reload: contracts now need an executive too.
    let stricter = text.replace(
        "levels = [\"dept_head\"]\n",
        "levels = [\"dept_head\", \"executive\"]\n",
    );
    assert_ne!(stricter, text);
    std::fs::write(&path, stricter).unwrap();
    let line = d.reload(2);
    assert!(line.contains("configuration reloaded"), "{line}");
    let r = grant(&d, "stamp-room", &sha256(b"needs two now"), 1).await;
    assert_eq!(r.status, Status::ApprovalDenied as i32, "{}", r.message);
    assert_eq!(r.reason, "missing_level", "{}", r.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_ends_at_its_time_limit_and_a_later_impression_is_an_alert() {
    // The terminal's clock runs a second slow, so the daemon's limit is what ends the grant.
    let (d, mut sim, id) = pty_rig_in(
        tempfile::tempdir().unwrap(),
        9,
        2,
        &["--grant-slack-ms", "1000"],
    );
    let db = d.db();
    let doc = sha256(b"supplier contract, two copies");
    let r = grant(&d, "stamp-room", &doc, 2).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.wait_for("granted impressions=2 seconds=2", 1);
    sim.expect("press", "impression counter=1");
    // One of two impressions made, then the time limit passes.
    wait_records(&db, "terminal.grant_expired", "", 1);
    let detail: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT detail FROM audit WHERE kind = 'terminal.grant_expired'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(detail.contains("1 of 2 impressions"), "{detail}");
    // The terminal locks by its own clock a second later (recorded, no alert); a terminal that
    // kept stamping would be caught.
    sim.wait_for("locked", 1);
    wait_records(&db, "terminal.locked", "", 1);
    sim.expect("press", "refused no-grant");
    sim.expect("force", "impression counter=2");
    wait_records(&db, "alert", "terminal_no_grant", 1);
    sim.settle();
    assert_eq!(count(&db, "terminal.impression", ""), 1);
    assert_eq!(count(&db, "terminal.rejected", "no_grant"), 1);
    assert_eq!(count(&db, "terminal.grant_expired", ""), 1);
    assert_eq!(alerts(&db), ["terminal_no_grant"]);
    impressions_verify(&db, "t1", &id.public, &[1]);
    assert_eq!(audit_verify(&db).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_is_not_acknowledged_until_its_record_is_on_disk() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: mounting a small tmpfs for the state directory needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("state"), "3M");
    // The terminal keeps sending an unacknowledged report for about 30 s.
    let (d, mut sim, id) = pty_rig_in(dir, 10, GRANT_SECONDS, &["--retries", "100"]);
    let db = d.db();
    let doc = sha256(b"annual report");
    let r = grant(&d, "stamp-room", &doc, 1).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.wait_for("granted", 1);

    // Fill the disk: stamp until the audit log cannot commit.
    let filler = tmpfs.fill(100 * 1024);
    let (_, refused) = stamp_until_refused(&mut d.client().await).await;
    assert_eq!(
        refused.status,
        Status::AuditUnavailable as i32,
        "{}",
        refused.message
    );
    // A stamp's batch needs more room than a report's: take the rest too, and send refused
    // stamps (small records) until one cannot be written either, as the daemon's status says.
    let rest = tmpfs.fill(0);
    let mut c = d.client().await;
    let bad = token_for("contract", &sha256(b"another document"));
    let mut failing = false;
    for _ in 0..500 {
        c.stamp("contract", &sha256(b"filler"), &bad, "")
            .await
            .unwrap();
        let Some(Body::StatusReport(s)) = c.status().await.unwrap().body else {
            panic!("no status")
        };
        if !s.audit.unwrap().error.is_empty() {
            failing = true;
            break;
        }
    }
    assert!(failing, "the audit log never failed on a full disk");

    // The impression's report cannot be recorded: it is not acknowledged, and the terminal
    // sends it again and again. Heartbeats (acknowledged without a record) are held back
    // meanwhile, and one still in flight is given time to be acknowledged, so that every ACK
    // counted from here is the report's.
    sim.send("silence");
    sim.settle();
    let acks = sim.count("ack");
    sim.send("press");
    sim.wait_for("impression counter=1", 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        sim.count("ack"),
        acks,
        "a report was acknowledged unrecorded"
    );
    assert_eq!(count(&db, "terminal.impression", ""), 0);

    // Space returns: the next copy is recorded, acknowledged, and taken once.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&rest).unwrap();
    sim.wait_for("ack", acks + 1);
    sim.send("resume");
    sim.settle();
    assert_eq!(count(&db, "terminal.impression", ""), 1);
    assert!(alerts(&db).is_empty(), "{:?}", alerts(&db));
    impressions_verify(&db, "t1", &id.public, &[1]);
    assert_eq!(sim.count("gave-up"), 0);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    assert_eq!(audit_verify(&dir.path().join("state/sealgate.db")).0, 0);
    drop(tmpfs);
}

/// The daemon's threads that are running a terminal's TLS handshake.
fn handshake_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "tls handshake")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_hold_at_most_sixteen_threads_and_a_terminal_gets_in_after_them() {
    use std::io::Read;
    let (d, pki, id, addr) = tls_rig(11);
    let db = d.db();
    // Twenty connections that never start their handshake.
    let mut stalled: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        matches!(s.read(&mut [0u8; 1]), Ok(0))
    };
    let shut = stalled.iter_mut().map(&closed).filter(|&c| c).count();
    assert_eq!(
        shut, 4,
        "at most 16 handshakes wait; the rest are closed at once"
    );
    assert_eq!(handshake_threads(d.pid()), 16);
    // The enrolled terminal cannot get in while they wait...
    let sim = Sim::start(
        "branch-office",
        &id.seed_file,
        &sim_args(&pki, &addr, "branch"),
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(sim.count("connected"), 0, "{:?}", sim.printed());
    // ...and does once their time is up (5 s), each recorded as a refused connection.
    sim.wait_for("ack", 1);
    assert!(
        stalled.iter_mut().all(closed),
        "a stalled handshake outlived its time"
    );
    assert_eq!(handshake_threads(d.pid()), 0);
    assert_eq!(count(&db, "terminal.refused", ""), 16);
    assert_eq!(count(&db, "terminal.connected", ""), 1);
    assert_eq!(audit_verify(&db).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_that_knew_a_terminal_starts_again_and_stamps() {
    let (d, mut sim, _) = pty_rig(9);
    // Records with and without a signed report: connected, hello, granted, impression, locked.
    let doc = sha256(b"restart lease");
    let r = grant(&d, "stamp-room", &doc, 1).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.wait_for("granted impressions=1", 1);
    sim.expect("press", "impression counter=1");
    wait_records(&d.db(), "terminal.locked", "", 1);
    // The newest terminal record then has no report in it.
    sim.expect("vanish", "disconnected vanished");
    wait_records(&d.db(), "terminal.disconnected", "", 1);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    sim.send("return");
    let config = std::fs::read_to_string(dir.path().join("sealgate.toml")).unwrap();
    let d = Daemon::start_with(dir, &config, &[]).unwrap_or_else(|f| panic!("restart: {f:?}"));
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &sha256(b"after the restart")).await;
    // The terminal comes back at the counter the log holds: no gap or rollback.
    sim.wait_for("ack", 2);
    let r = grant(&d, "stamp-room", &sha256(b"second lease"), 1).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.wait_for("granted impressions=1", 2);
    sim.expect("press", "impression counter=2");
    wait_records(&d.db(), "terminal.impression", "", 2);
    assert!(alerts(&d.db()).is_empty(), "{:?}", alerts(&d.db()));
    assert_eq!(count(&d.db(), "daemon.started", ""), 2);
    assert_eq!(audit_verify(&d.db()).0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hello_below_the_counter_does_not_lower_it_and_a_live_grant_has_its_own_status() {
    let (d, mut sim, _) = pty_rig(11);
    let db = d.db();
    let doc = sha256(b"lease 2026-07");
    // Two impressions: the recorded counter is 2.
    let r = grant(&d, "stamp-room", &doc, 3).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.wait_for("granted impressions=3", 1);
    sim.expect("press", "impression counter=1");
    sim.expect("press", "impression counter=2");
    wait_records(&db, "terminal.impression", "", 2);
    // While the grant is live, another is refused with a status of its own, and consumes
    // nothing.
    let r = grant(&d, "stamp-room", &sha256(b"another lease"), 1).await;
    assert_eq!(r.status, Status::GrantLive as i32, "{}", r.message);
    assert!(r.message.contains("live grant"), "{}", r.message);
    assert_eq!(count(&db, "terminal.granted", ""), 1);
    // The terminal says HELLO with counter 0: one rollback alert, and the counter stays 2.
    sim.send("rollback 2");
    sim.send("hello");
    wait_records(&db, "alert", "terminal_counter_rollback", 1);
    // So the terminal cannot use counters 1 and 2 again: an impression numbered 1 is a
    // rollback, not a new impression.
    sim.expect("press", "impression counter=1");
    wait_records(&db, "terminal.rejected", "counter_rollback", 2);
    assert_eq!(count(&db, "terminal.impression", ""), 2);
    let c = rusqlite::Connection::open(&db).unwrap();
    let after: i64 = c
        .query_row(
            "SELECT json_extract(evidence, '$.counter_after') FROM audit \
             WHERE kind = 'terminal.rejected' AND reason = 'counter_rollback' ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(after, 2, "the HELLO's record keeps the counter");
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let (code, out) = audit_verify(&dir.path().join("state/sealgate.db"));
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sealctl_checks_an_approval_for_a_terminal_seal_and_grants_it() {
    let (d, sim, _) = pty_rig(12);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("lease.txt");
    std::fs::write(&file, "lease for the Minhang warehouse").unwrap();
    let token = work.path().join("approval.json");
    std::fs::write(
        &token,
        approval("stamp-room", &sha256(&std::fs::read(&file).unwrap()), 1),
    )
    .unwrap();
    let sealctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sealctl"))
            .env("SEALGATE_SOCKET", &d.socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (f, t) = (file.to_str().unwrap(), token.to_str().unwrap());
    let (ok, out) = sealctl(&["token", "check", "--seal", "stamp-room", "--file", f, t]);
    assert!(ok && out.contains("would pass (rule contracts)"), "{out}");
    let (ok, out) = sealctl(&[
        "terminal",
        "grant",
        "--seal",
        "stamp-room",
        "--file",
        f,
        "--token",
        t,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("terminal t1 unlocked for 1 impression(s)"),
        "{out}"
    );
    sim.wait_for("granted impressions=1", 1);
    // Spent: the check now names the replay.
    let (ok, out) = sealctl(&["token", "check", "--seal", "stamp-room", "--file", f, t]);
    assert!(!ok && out.contains("replayed"), "{out}");
}

/// The grant pipeline's crash points, and how many times each is passed before it aborts the
/// daemon. Each cycle of the load is one grant (one impression) and two reports (IMPRESSION,
/// LOCKED); the armed daemon finds the line up and gets no HELLO, so the report point aborts
/// once on a LOCKED (after 5 reports) and once on an IMPRESSION (after 6).
#[cfg(feature = "failpoints")]
const GRANT_POINTS: &[(&str, u32)] = &[
    ("terminal.before_authorization", 3),
    ("terminal.after_authorization", 3),
    ("terminal.before_reply", 3),
    ("terminal.before_report_ack", 5),
    ("terminal.before_report_ack", 6),
];

/// A grant refused for now, with nothing consumed: one is still live, or the daemon has not
/// yet (re)opened the terminal's line.
#[cfg(feature = "failpoints")]
fn not_yet(r: &sealgate::protocol::Response) -> bool {
    r.status == Status::GrantLive as i32
        || (r.status == Status::DeviceUnavailable as i32
            && r.message.contains("is not connected; nothing was consumed"))
}

/// Grants of one impression each, pressed as soon as they are given, until the daemon stops
/// answering. The grant ids the daemon gave. A grant refused because the daemon has not yet
/// opened the line (nothing consumed) or because one is still live is asked again, for a while.
#[cfg(feature = "failpoints")]
async fn grant_until_the_daemon_goes(socket: &Path, sim: &mut Sim, tag: &str) -> Vec<Vec<u8>> {
    let mut given = Vec::new();
    for i in 0..40 {
        let doc = sha256(format!("{tag} lease {i}").as_bytes());
        let deadline = Instant::now() + Duration::from_secs(15);
        let r = loop {
            let Ok(mut c) = sealgate::protocol::client::Client::connect(socket).await else {
                return given;
            };
            let Ok(r) = c
                .call(request::Body::GrantTerminal(pb::GrantTerminalRequest {
                    seal_id: "stamp-room".into(),
                    document_sha256: doc.clone(),
                    approval_token: approval("stamp-room", &doc, 1),
                    impressions: 1,
                    purpose: "sign the lease".into(),
                    mfa_code: String::new(),
                }))
                .await
            else {
                return given;
            };
            if !not_yet(&r) {
                break r;
            }
            assert!(Instant::now() < deadline, "{tag}: {}", r.message);
            tokio::time::sleep(Duration::from_millis(30)).await;
        };
        assert_eq!(r.status, Status::Ok as i32, "{tag}: {}", r.message);
        let Some(Body::GrantTerminal(g)) = r.body else {
            panic!("{tag}: no grant")
        };
        given.push(g.grant_id);
        sim.send("press");
    }
    panic!("{tag}: the daemon was not aborted there")
}

/// Every IMPRESSION the terminal made is in the log once, as taken, against a recorded grant;
/// every grant the office app was given is recorded; no use of an approval was given back;
/// every grant is closed by at most one record (LOCKED, TAMPER or its time limit), and one
/// that is not had its impressions made; no alert.
#[cfg(feature = "failpoints")]
fn grant_invariants(db: &Path, sim: &Sim, public: &[u8; 32], given: &[Vec<u8>], tag: &str) {
    let made = sim.count("impression counter=") as u64;
    impressions_verify(db, "t1", public, &(1..=made).collect::<Vec<_>>());
    let all = records(db, None);
    let granted: Vec<_> = all
        .iter()
        .filter(|r| r.kind == "terminal.granted")
        .collect();
    for id in given {
        assert!(
            granted.iter().any(|g| {
                let e: serde_json::Value = serde_json::from_str(&g.evidence).unwrap();
                e["grant_id"] == hex::encode(id)
            }),
            "{tag}: grant {} was given and is not recorded",
            hex::encode(id)
        );
    }
    for g in &granted {
        assert!(
            uses_consumed(db, &g.jti) >= 1,
            "{tag}: the use of {} was given back",
            g.jti
        );
        let closed = all
            .iter()
            .filter(|r| {
                r.ref_seq == Some(g.seq)
                    && matches!(
                        r.kind.as_str(),
                        "terminal.locked" | "terminal.tamper" | "terminal.grant_expired"
                    )
            })
            .count();
        let made = all
            .iter()
            .filter(|r| r.ref_seq == Some(g.seq) && r.kind == "terminal.impression")
            .count();
        assert!(
            closed == 1 || (closed == 0 && made == 1),
            "{tag}: grant {} closed {closed} times, {made} impressions",
            g.seq
        );
    }
    for r in all.iter().filter(|r| r.kind == "terminal.impression") {
        let auth = r.ref_seq.expect("an impression names its grant") as usize;
        assert_eq!(all[auth - 1].kind, "terminal.granted", "{tag}");
    }
    assert!(alerts(db).is_empty(), "{tag}: {:?}", alerts(db));
    let (code, out) = audit_verify(db);
    assert_eq!(code, 0, "{tag}: {out}");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn aborted_at_every_step_of_a_grant_it_loses_no_impression_and_raises_nothing() {
    for (n, (point, passes)) in GRANT_POINTS.iter().enumerate() {
        let tag = format!("{point} after {passes}");
        // Grants of three seconds, so that one recorded but never delivered ends soon.
        let (d, mut sim, id) = pty_rig_in(tempfile::tempdir().unwrap(), 40 + n as u8, 3, &[]);
        let socket = d.socket.clone();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let armed = format!("{point}={passes}*off->return");
        let mut d = tokio::task::block_in_place(|| d.restart_with(&[("FAILPOINTS", &armed)]))
            .unwrap_or_else(|f| panic!("{tag}: armed start: {f:?}"));
        let mut given = grant_until_the_daemon_goes(&socket, &mut sim, &tag).await;
        let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(30)))
            .unwrap_or_else(|| panic!("{tag}: the daemon did not stop"));
        assert!(aborted(status), "{tag}: {status}");
        let d = tokio::task::block_in_place(|| d.restart_with(&[]))
            .unwrap_or_else(|f| panic!("{tag}: restart: {f:?}"));
        // Someone at the terminal presses at once: where the terminal holds a grant from
        // before the crash (the office app may never have heard of it), the impression is
        // taken against that grant; where it holds none, the terminal refuses by itself.
        let before = sim.count("impression counter=");
        let refused = sim.count("refused no-grant");
        sim.send("press");
        let deadline = Instant::now() + Duration::from_secs(10);
        while sim.count("impression counter=") == before && sim.count("refused no-grant") == refused
        {
            assert!(Instant::now() < deadline, "{tag}: {:?}", sim.printed());
            std::thread::sleep(Duration::from_millis(20));
        }
        let held = sim.count("impression counter=") > before;
        // It grants again once any grant left open has ended, and the terminal stamps.
        given.extend(grant_until_granted(&d, &mut sim, &tag).await);
        let db = d.db();
        let made = sim.count("impression counter=");
        wait_records(&db, "terminal.impression", "", made);
        sim.settle();
        let granted = count(&db, "terminal.granted", "");
        grant_invariants(&db, &sim, &id.public, &given, &tag);
        let all = kinds(&db);
        let restart = all
            .iter()
            .rposition(|(k, _)| k == "daemon.started")
            .unwrap();
        eprintln!(
            "{tag}: {} grants given, {granted} recorded, {made} impressions, all recorded once; \
             the last record before the crash: {}; a grant from before it {}",
            given.len(),
            all[restart - 1].0,
            if held {
                "was used after it"
            } else {
                "was not held"
            }
        );
    }
}

/// One grant of one impression, waited for while another is live, then pressed.
#[cfg(feature = "failpoints")]
async fn grant_until_granted(d: &Daemon, sim: &mut Sim, tag: &str) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let doc = sha256(format!("{tag} after the restart").as_bytes());
    loop {
        let r = grant(d, "stamp-room", &doc, 1).await;
        if r.status == Status::Ok as i32 {
            let Some(Body::GrantTerminal(g)) = r.body else {
                panic!("{tag}: no grant")
            };
            let n = sim.count("impression counter=");
            sim.send("press");
            sim.wait_for("impression counter=", n + 1);
            return Some(g.grant_id);
        }
        assert!(not_yet(&r), "{tag}: {}", r.message);
        assert!(Instant::now() < deadline, "{tag}: {}", r.message);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_cut_between_a_grant_and_its_ack_leaves_the_grant_recorded_and_its_impression_taken()
{
    let (d, mut sim, id) = pty_rig_in(tempfile::tempdir().unwrap(), 12, 3, &[]);
    let db = d.db();
    // The terminal takes the grant and the line goes before the ACK: the office app hears
    // that the grant stands, the terminal comes back, and its impression is taken.
    sim.send("cut-on-grant");
    sim.wait_for("armed cut-on-grant", 1);
    let doc = sha256(b"cut before the ack");
    let r = grant(&d, "stamp-room", &doc, 1).await;
    assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);
    assert!(
        r.message
            .contains("the grant is recorded and stands until its time limit"),
        "{}",
        r.message
    );
    sim.wait_for("disconnected cut before the grant's ACK", 1);
    wait_records(&db, "terminal.hello", "", 2);
    sim.expect("press", "impression counter=1");
    wait_records(&db, "terminal.locked", "", 1);
    // The grant never arrives (the terminal hears nothing while the daemon tries): the app
    // hears the same, nothing more is released, and the terminal is free again once the
    // grant's time is up.
    sim.send("lose-grants 100");
    sim.wait_for("armed lose-grants 100", 1);
    let r = grant(&d, "stamp-room", &sha256(b"never arrives"), 1).await;
    assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);
    sim.send("lose-grants 0");
    assert_eq!(sim.count("lost cmd="), 4, "sent once and again three times");
    wait_records(&db, "terminal.connected", "", 3);
    let r = grant(&d, "stamp-room", &sha256(b"too soon"), 1).await;
    assert_eq!(r.status, Status::GrantLive as i32, "{}", r.message);
    sim.expect("press", "refused no-grant");
    wait_records(&db, "terminal.grant_expired", "", 1);
    let r = grant(&d, "stamp-room", &sha256(b"after the time limit"), 1).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    sim.expect("press", "impression counter=2");
    wait_records(&db, "terminal.locked", "", 2);
    sim.settle();
    impressions_verify(&db, "t1", &id.public, &[1, 2]);
    let all = records(&db, None);
    let grants: Vec<u64> = all
        .iter()
        .filter(|r| r.kind == "terminal.granted")
        .map(|r| r.seq)
        .collect();
    assert_eq!(grants.len(), 3);
    for r in all.iter().filter(|r| r.kind == "terminal.impression") {
        assert!(r.ref_seq.is_some_and(|g| grants.contains(&g)), "{r:?}");
    }
    for g in &grants {
        let jti = &all[*g as usize - 1].jti;
        assert_eq!(
            uses_consumed(&db, jti),
            1,
            "the use of {jti} was given back"
        );
    }
    assert!(alerts(&db).is_empty(), "{:?}", alerts(&db));
    assert_eq!(audit_verify(&db).0, 0);
}
