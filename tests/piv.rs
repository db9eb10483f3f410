//! PIV seals through the real PC/SC stack: the real daemon, the system's real `pcscd` with
//! Debian's `vsmartcard-vpcd` reader driver, and our card emulator (`sealgate-pivcard`) holding
//! real keys in the virtual readers. Signatures are checked by openssl against the public key of
//! the certificate the daemon read from the card.
//!
//! pcscd must be running (test.sh starts it). The virtual readers are shared by the whole
//! machine, so the tests of this file take turns.

mod common;

use common::*;
use sealgate::protocol::{pb, response::Body, Status};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const PIVCARD: &str = env!("CARGO_BIN_EXE_sealgate-pivcard");
const CARD_PIN: &str = "246810";
const GUID_A: &str = "5ea16a7e000000000000000000000a0a";
const GUID_B: &str = "5ea16a7e000000000000000000000b0b";
const SERIAL_B: u32 = 13572468;

/// A test's turn at the virtual readers, and an open PC/SC context for its length. The
/// context keeps a socket-activated pcscd (started with `--auto-exit`) from leaving while the
/// test runs, which would take vpcd's readers with it.
struct Turn {
    _guard: tokio::sync::MutexGuard<'static, ()>,
    _ctx: pcsc::Context,
}

/// The virtual readers are the machine's: one test at a time. Fails at once, and says why,
/// when pcscd does not answer or shows no vpcd reader.
async fn turn() -> Turn {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = TURN.lock().await;
    let ctx = pcsc::Context::establish(pcsc::Scope::System).unwrap_or_else(|e| {
        panic!("pcscd does not answer ({e}); test.sh starts it when it is not running")
    });
    let readers: Vec<String> = ctx
        .list_readers_owned()
        .unwrap_or_default()
        .iter()
        .map(|r| r.to_string_lossy().into_owned())
        .collect();
    assert!(
        readers.iter().any(|r| r.starts_with(&reader_of(35963))),
        "pcscd shows no vpcd reader (is vsmartcard-vpcd installed, and was pcscd started \
         after it?); readers: {readers:?}"
    );
    Turn {
        _guard: guard,
        _ctx: ctx,
    }
}

/// A key pair and self-signed certificate made by openssl.
struct CardKey {
    key: PathBuf,
    cert: PathBuf,
}

fn make_key(dir: &Path, name: &str, kind: &str) -> CardKey {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    let newkey: &[&str] = match kind {
        "ec" => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        _ => &["-newkey", "rsa:2048"],
    };
    let out = Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "30", "-subj"])
        .arg(format!("/CN={name}"))
        .args(newkey)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl req: {out:?}");
    CardKey { key, cert }
}

/// A running card emulator and what it has printed.
struct Card {
    port: u16,
    child: Child,
    stdin: ChildStdin,
    lines: Printed,
}

impl Card {
    fn start(port: u16, guid: &str, slots: &[(&str, &CardKey)], extra: &[&str]) -> Card {
        let mut cmd = Command::new(PIVCARD);
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--guid")
            .arg(guid)
            .env("PIVCARD_PIN", CARD_PIN)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (slot, k) in slots {
            cmd.arg("--slot")
                .arg(format!("{slot}={},{}", k.key.display(), k.cert.display()));
        }
        let mut child = cmd.spawn().expect("start sealgate-pivcard");
        let stdin = child.stdin.take().unwrap();
        let lines = Printed::collect(child.stdout.take().unwrap());
        let card = Card {
            port,
            child,
            stdin,
            lines,
        };
        let mut card = card;
        if !extra.contains(&"--absent") {
            card.wait_for("inserted", 1);
            card.ensure_seen();
        }
        card
    }

    /// Waits until pcscd sees the card. vpcd now and then accepts a card's connection without
    /// ever polling it (more often right after another card left the reader); the card is
    /// then pulled and put back, as a person would.
    fn ensure_seen(&mut self) {
        for _ in 0..4 {
            if seen(self.port, true, Duration::from_secs(4)) {
                return;
            }
            let n = self.count("inserted");
            self.send("remove");
            seen(self.port, false, Duration::from_secs(2));
            self.send("insert");
            self.wait_for("inserted", n + 1);
        }
        panic!("pcscd never saw the card in {}", reader_of(self.port));
    }

    /// Puts a pulled card back and waits until pcscd sees it.
    fn insert(&mut self) {
        let n = self.count("inserted");
        self.send("insert");
        self.wait_for("inserted", n + 1);
        self.ensure_seen();
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn count(&self, line: &str) -> usize {
        self.lines.count(line)
    }

    /// Waits until the card has printed `n` lines starting with `line`.
    fn wait_for(&self, line: &str, n: usize) {
        self.lines.wait_for(line, n, Duration::from_secs(15))
    }

    /// The card's PIN tries left, as it reports them.
    fn tries_left(&mut self) -> u8 {
        self.status("tries_left").parse().unwrap()
    }

    /// One field of the card's answer to `status` (tries_left, verified, signatures).
    fn status(&mut self, field: &str) -> String {
        let before = self.count("status");
        self.send("status");
        self.wait_for("status", before + 1);
        let lines = self.lines.all();
        let last = lines
            .iter()
            .rev()
            .find(|l| l.starts_with("status"))
            .unwrap();
        let prefix = format!("{field}=");
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .unwrap()
            .to_owned()
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The next card in this reader must not meet the stale state of this one.
        seen(self.port, false, Duration::from_secs(5));
    }
}

/// The reader name of a vpcd port, as pcscd shows it.
fn reader_of(port: u16) -> String {
    format!("Virtual PCD 00 {:02}", port - 35963)
}

/// Waits until pcscd sees a card in the reader of `port` (or sees none).
#[track_caller]
fn wait_present(port: u16, present: bool) {
    assert!(
        seen(port, present, Duration::from_secs(15)),
        "pcscd does not see {} (want a card present: {present})",
        reader_of(port)
    );
}

/// Whether pcscd comes to see a card in the reader of `port` (or none) within `limit`. It
/// looks at the reader's state without connecting, so it never resets the card. A pcscd
/// that does not answer sees nothing (and `turn` has already said so).
fn seen(port: u16, present: bool, limit: Duration) -> bool {
    let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::System) else {
        return false;
    };
    let reader = std::ffi::CString::new(reader_of(port)).unwrap();
    let deadline = Instant::now() + limit;
    let mut states = [pcsc::ReaderState::new(reader, pcsc::State::UNAWARE)];
    loop {
        if ctx
            .get_status_change(Duration::from_millis(200), &mut states)
            .is_ok()
        {
            let there = states[0].event_state().contains(pcsc::State::PRESENT);
            if there == present {
                return true;
            }
            states[0].sync_current_state();
        }
        if Instant::now() > deadline {
            return false;
        }
    }
}

fn rule() -> &'static str {
    "\n[[seal.rule]]\nname = \"contracts\"\ndoc_types = [\"contract\"]\nlevels = [\"dept_head\"]\n"
}

/// A device on a card: (device id, profile, card id, seals as (seal id, slot, algorithm)).
type CardDevice<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str, &'a str)]);

/// Devices and seals for cards.
fn card_config(pin_file: &Path, devices: &[CardDevice]) -> (String, Vec<String>) {
    let mut t = String::new();
    let mut seals = Vec::new();
    for (device, profile, card_id, device_seals) in devices {
        t += &format!(
            "\n[[device]]\nid = \"{device}\"\nprofile = \"{profile}\"\ncard_id = \"{card_id}\"\nreader = \"Virtual PCD*\"\npin_file = \"{}\"\n",
            pin_file.display()
        );
        for (seal, slot, alg) in *device_seals {
            t += &format!(
                "\n[[seal]]\nid = \"{seal}\"\nname = \"{seal} on a card\"\ndevice = \"{device}\"\nkey_id = \"{slot}\"\nalgorithm = \"{alg}\"\n"
            );
            t += rule();
            seals.push(seal.to_string());
        }
    }
    (t, seals)
}

/// Card A with one P-256 seal, "card-ec", in slot 9C.
fn one_seal_card(pin_file: &Path) -> (String, Vec<String>) {
    card_config(
        pin_file,
        &[(
            "card-a",
            "generic-piv",
            GUID_A,
            &[("card-ec", "9c", "ecdsa-p256-sha256")],
        )],
    )
}

/// Stamps until the seal's card is back (the daemon reconnects within a second or so); the
/// last reply after 10 s at most.
async fn stamp_when_back(
    c: &mut sealgate::protocol::client::Client,
    seal: &str,
    doc: &[u8],
) -> sealgate::protocol::pb::Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = stamp(c, seal, doc).await;
        if r.status == Status::Ok as i32 || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn start_daemon(extra: String, seals: Vec<String>) -> Daemon {
    let mut all = seals;
    all.push("contract".into());
    Daemon::start(&Opts {
        extra,
        caller_seals: Some(all),
        ..Opts::default()
    })
}

fn pin_file(dir: &Path, pin: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(format!("card-{pin}.pin"));
    std::fs::write(&p, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Verifies with openssl, using the public key taken out of the certificate by openssl.
fn verify_with_certificate(cert_der: &[u8], algorithm: &str, doc: &[u8], sig: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.der"), cert_der).unwrap();
    let out = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-pubkey", "-in"])
        .arg(dir.path().join("cert.der"))
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl cannot read the certificate");
    let (_, spki) = pem_rfc7468::decode_vec(&out.stdout).unwrap();
    openssl_verify(algorithm, &spki, doc, sig)
}

async fn stamp(
    c: &mut sealgate::protocol::client::Client,
    seal: &str,
    doc: &[u8],
) -> sealgate::protocol::pb::Response {
    let digest = sha256(doc);
    c.stamp(seal, &digest, &token_for(seal, &digest), "")
        .await
        .unwrap()
}

fn signature(r: &sealgate::protocol::pb::Response) -> Vec<u8> {
    match &r.body {
        Some(Body::Stamp(s)) => s.signature.clone(),
        _ => panic!("no stamp: {} {}", r.status, r.message),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn card_stamps_verify_with_the_card_certificate() {
    let _turn = turn().await;
    let keys = tempfile::tempdir().unwrap();
    let ec = make_key(keys.path(), "contract-card", "ec");
    let rsa = make_key(keys.path(), "official-card", "rsa");
    let mut card = Card::start(35963, GUID_A, &[("9c", &ec), ("9a", &rsa)], &[]);
    let pin = pin_file(keys.path(), CARD_PIN);
    let (extra, seals) = card_config(
        &pin,
        &[(
            "card-a",
            "generic-piv",
            GUID_A,
            &[
                ("card-ec", "9c", "ecdsa-p256-sha256"),
                ("card-rsa", "9a", "rsa-pkcs1-sha256"),
            ],
        )],
    );
    let daemon = start_daemon(extra, seals);
    let mut c = daemon.client().await;
    for (seal, alg, cert) in [
        ("card-ec", "ecdsa-p256-sha256", &ec.cert),
        ("card-rsa", "rsa-pkcs1-sha256", &rsa.cert),
    ] {
        let r = c.describe_seal(seal).await.unwrap();
        let Some(Body::DescribeSeal(d)) = r.body else {
            panic!("describe {seal}: {}", r.message)
        };
        let (_, file_der) = pem_rfc7468::decode_vec(&std::fs::read(cert).unwrap()).unwrap();
        assert_eq!(
            d.certificate_der, file_der,
            "{seal}: the card's certificate"
        );
        assert_eq!(d.algorithm, alg);
        for i in 0..3 {
            let doc = format!("{seal} document {i}");
            let r = stamp(&mut c, seal, doc.as_bytes()).await;
            assert_eq!(r.status, Status::Ok as i32, "{seal}: {}", r.message);
            let sig = signature(&r);
            assert!(
                verify_with_certificate(&d.certificate_der, alg, doc.as_bytes(), &sig),
                "{seal}: openssl rejects the signature"
            );
            assert!(!verify_with_certificate(
                &d.certificate_der,
                alg,
                b"another document",
                &sig
            ));
        }
    }
    // The signature slot took the PIN before each signature; the card never lost a try.
    assert_eq!(card.count("signed slot=9c"), 3);
    assert_eq!(card.count("signed slot=9a"), 3);
    assert_eq!(card.count("verify=wrong"), 0);
    assert_eq!(card.tries_left(), 3);
    // The last stamp used slot 9A, whose PIN would stay verified: the daemon reset the card.
    assert_eq!(card.status("verified"), "false");
    // Other software can use the card between stamps: a shared connection, a transaction and a
    // SELECT succeed while the daemon holds its own connection.
    let ctx = pcsc::Context::establish(pcsc::Scope::System).unwrap();
    let reader = std::ffi::CString::new(reader_of(35963)).unwrap();
    let mut other = ctx
        .connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
        .expect("the daemon holds the card in shared mode");
    {
        let tx = other.transaction().unwrap();
        let mut buf = [0u8; 258];
        let resp = tx
            .transmit(&sealgate::device::piv::select(), &mut buf)
            .unwrap();
        assert_eq!(&resp[resp.len() - 2..], &[0x90, 0x00]);
    }
    // ... and the daemon's next stamp still works after that.
    let r = stamp(&mut c, "card-ec", b"after another program").await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let (code, out) = audit_verify(&daemon.db());
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_pin_is_reported_with_tries_left_and_never_blocks_the_card() {
    let _turn = turn().await;
    let keys = tempfile::tempdir().unwrap();
    let ec = make_key(keys.path(), "card", "ec");
    let mut card = Card::start(35963, GUID_A, &[("9c", &ec)], &["--pin-tries", "3"]);
    let wrong = pin_file(keys.path(), "135790");
    let (extra, seals) = one_seal_card(&wrong);
    let mut daemon = start_daemon(extra.clone(), seals.clone());
    let mut messages = Vec::new();
    let mut logs = String::new();
    for run in 0..3 {
        let mut c = daemon.client().await;
        for _ in 0..2 {
            let r = stamp(&mut c, "card-ec", b"a contract").await;
            assert_eq!(r.status, Status::PinInvalid as i32, "{}", r.message);
            assert!(!r.message.contains("135790") && !r.message.contains(CARD_PIN));
            messages.push(r.message);
        }
        // Whatever the daemon does, it never spends the last try.
        let left = card.tries_left();
        assert_eq!(left, [2, 1, 1][run], "run {run}: {messages:?}");
        logs += &daemon.log();
        daemon = daemon.crash_and_restart();
    }
    assert!(messages[0].contains("wrong PIN") && messages[0].contains("2 tries left"));
    // The second stamp of a run does not present the PIN again.
    assert_eq!(messages[1], messages[0]);
    assert!(messages[2].contains("1 tries left"));
    assert!(
        messages[4].contains("1 PIN tries left") && messages[4].contains("does not verify"),
        "{}",
        messages[4]
    );
    assert_eq!(card.count("verify=wrong"), 2);
    assert_eq!(card.count("verify=blocked"), 0);
    // Neither PIN reached the daemon's logs.
    assert!(logs.contains("PIN not presented again"), "{logs}");
    assert!(
        !logs.contains("135790") && !logs.contains(CARD_PIN),
        "{logs}"
    );
    // The refusals are in the audit log, with the tries left, and the log verifies.
    let out = Command::new(SEALCTL)
        .args([
            "audit",
            "query",
            "--format",
            "json",
            "--kind",
            "stamp.failed",
            "--db",
        ])
        .arg(daemon.db())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 tries left"), "{text}");
    assert!(!text.contains("135790"));
    let (code, out) = audit_verify(&daemon.db());
    assert_eq!(code, 0, "{out}");
    drop(daemon);
    drop(card);

    // A card whose PIN is already blocked is reported as blocked.
    let _blocked = Card::start(35963, GUID_A, &[("9c", &ec)], &["--tries-left", "0"]);
    let right = pin_file(keys.path(), CARD_PIN);
    let (extra, seals) = one_seal_card(&right);
    let daemon = start_daemon(extra, seals);
    let mut c = daemon.client().await;
    let r = stamp(&mut c, "card-ec", b"a contract").await;
    assert_eq!(r.status, Status::PinBlocked as i32, "{}", r.message);
    assert!(r.message.contains("blocked"), "{}", r.message);
}

/// Stamps `doc` on "card-ec" and pulls the card once it has printed its `n`th `line` (while it
/// holds an answer back); the stamp must fail as "removed" within seconds. The approval's id.
async fn stamp_while_pulled(
    card: &mut Card,
    daemon: &Daemon,
    doc: &'static [u8],
    line: &str,
) -> String {
    let n = card.count(line) + 1;
    let socket = daemon.socket.clone();
    let approval = Approval::for_seal("card-ec", &sha256(doc));
    let jti = approval.claims.jti.clone();
    let pending = tokio::spawn(async move {
        let mut c = sealgate::protocol::client::Client::connect(&socket)
            .await
            .unwrap();
        c.stamp("card-ec", &sha256(doc), &approval.token(), "")
            .await
            .unwrap()
    });
    card.wait_for(line, n);
    tokio::time::sleep(Duration::from_millis(200)).await;
    card.send("remove");
    wait_present(card.port, false);
    let r = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the stamp must not hang when the card is pulled")
        .unwrap();
    assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);
    assert!(r.message.contains("removed"), "{}", r.message);
    jti
}

/// A stamp whose PIN check the card holds back, pulled while it is held; the jtis of the
/// approvals it took. On a loaded machine the check can pass before the pull lands (the card
/// says `verify=ok`, and the pull comes before the signature): such a round spends no try, and
/// it is done again with the card back in, at most three times.
async fn pull_during_pin_check(
    card: &mut Card,
    daemon: &Daemon,
    doc: &'static [u8],
) -> Vec<String> {
    let mut jtis = Vec::new();
    for _ in 0..3 {
        let tries = card.tries_left();
        jtis.push(stamp_while_pulled(card, daemon, doc, "verify=held").await);
        if card.tries_left() + 1 == tries {
            return jtis;
        }
        card.insert();
        wait_device(daemon, "card-a", pb::DeviceStatus::Ready).await;
    }
    panic!(
        "the card was never pulled while it held the PIN check: {:?}",
        card.lines.all()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_card_pulled_mid_stamp_fails_cleanly_and_works_again_when_back() {
    let _turn = turn().await;
    let keys = tempfile::tempdir().unwrap();
    let ec = make_key(keys.path(), "card", "ec");
    let mut card = Card::start(35963, GUID_A, &[("9c", &ec)], &[]);
    let pin = pin_file(keys.path(), CARD_PIN);
    let (extra, seals) = one_seal_card(&pin);
    let daemon = start_daemon(extra, seals);
    let mut c = daemon.client().await;
    let r = stamp(&mut c, "card-ec", b"before").await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);

    // The card holds its signature back; it is pulled while the daemon waits for it.
    card.send("delay 3000");
    stamp_while_pulled(&mut card, &daemon, b"during", "verify=ok").await;
    assert_eq!(card.count("signed"), 1);

    // Meanwhile other seals keep working.
    stamp_ok(&mut c, "contract", &sha256(b"other seal")).await;
    let r = stamp(&mut c, "card-ec", b"while out").await;
    assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);

    // Back in: the next stamp succeeds.
    card.send("delay 0");
    card.insert();
    let r = stamp_when_back(&mut c, "card-ec", b"after").await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let d = c.describe_seal("card-ec").await.unwrap();
    let Some(Body::DescribeSeal(d)) = d.body else {
        panic!()
    };
    assert!(verify_with_certificate(
        &d.certificate_der,
        "ecdsa-p256-sha256",
        b"after",
        &signature(&r)
    ));
    // The card moves to the other reader (a reader that appears later works the same way).
    drop(card);
    let moved = Card::start(35964, GUID_A, &[("9c", &ec)], &[]);
    let r = stamp_when_back(&mut c, "card-ec", b"in another reader").await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    assert_eq!(moved.count("signed"), 1);
    // The removal and the return are in the audit log, which verifies.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new(SEALCTL)
            .args(["audit", "query", "--format", "json", "--db"])
            .arg(daemon.db())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("device.unavailable") && text.contains("device.ready") {
            break;
        }
        assert!(Instant::now() < deadline, "no device events: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out) = audit_verify(&daemon.db());
    assert_eq!(code, 0, "{out}");
    // A card claiming the same identity but holding another key is refused.
    drop(moved);
    let other = make_key(keys.path(), "impostor", "ec");
    let impostor = Card::start(35963, GUID_A, &[("9c", &other)], &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = stamp(&mut c, "card-ec", b"to the impostor").await;
        assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);
        if r.message.contains("another key") || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(r.message.contains("another key"), "{}", r.message);
    assert_eq!(impostor.count("signed"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_cards_in_two_readers_stamp_at_the_same_time() {
    let _turn = turn().await;
    let keys = tempfile::tempdir().unwrap();
    let ka = make_key(keys.path(), "card-a", "ec");
    let kb = make_key(keys.path(), "card-b", "ec");
    let card_a = Card::start(35963, GUID_A, &[("9c", &ka)], &[]);
    let serial = SERIAL_B.to_string();
    let card_b = Card::start(35964, GUID_B, &[("9c", &kb)], &["--serial", &serial]);
    let pin = pin_file(keys.path(), CARD_PIN);
    // One card by its CHUID (generic profile), the other by its YubiKey serial.
    let (extra, seals) = card_config(
        &pin,
        &[
            (
                "card-a",
                "generic-piv",
                GUID_A,
                &[("seal-a", "9c", "ecdsa-p256-sha256")],
            ),
            (
                "card-b",
                "yubikey-piv",
                &serial,
                &[("seal-b", "9c", "ecdsa-p256-sha256")],
            ),
        ],
    );
    let daemon = start_daemon(extra, seals);
    const EACH: usize = 12;
    let mut tasks = Vec::new();
    for seal in ["seal-a", "seal-b"] {
        let socket = daemon.socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = sealgate::protocol::client::Client::connect(&socket)
                .await
                .unwrap();
            let d = c.describe_seal(seal).await.unwrap();
            let Some(Body::DescribeSeal(d)) = d.body else {
                panic!()
            };
            for i in 0..EACH {
                let doc = format!("{seal} {i}");
                let r = stamp(&mut c, seal, doc.as_bytes()).await;
                assert_eq!(r.status, Status::Ok as i32, "{seal}: {}", r.message);
                assert!(verify_with_certificate(
                    &d.certificate_der,
                    "ecdsa-p256-sha256",
                    doc.as_bytes(),
                    &signature(&r)
                ));
            }
            d.certificate_der
        }));
    }
    let mut certs = Vec::new();
    for t in tasks {
        certs.push(t.await.unwrap());
    }
    assert_ne!(certs[0], certs[1], "each seal is on its own card");
    // Each card made the signatures of its own seal, and only those.
    assert_eq!(card_a.count("signed"), EACH);
    assert_eq!(card_b.count("signed"), EACH);
    let (code, out) = audit_verify(&daemon.db());
    assert_eq!(code, 0, "{out}");
}

/// Two emulated cards are two tokens to OpenSC: each card's CHUID carries the FASC-N of
/// non-federal cards (agency 9999), so OpenSC takes the serial from the card's GUID.
#[tokio::test(flavor = "multi_thread")]
async fn opensc_sees_two_emulated_cards_as_two_tokens() {
    let _turn = turn().await;
    let keys = tempfile::tempdir().unwrap();
    let ka = make_key(keys.path(), "card-a", "ec");
    let kb = make_key(keys.path(), "card-b", "ec");
    let _a = Card::start(35963, GUID_A, &[("9c", &ka)], &[]);
    let _b = Card::start(35964, GUID_B, &[("9c", &kb)], &[]);
    let module = [
        "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
    ]
    .into_iter()
    .find(|m| Path::new(m).exists())
    .expect("OpenSC's PKCS#11 module (opensc-pkcs11)");
    let out = Command::new("pkcs11-tool")
        .args(["--module", module, "-L"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serials: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("serial num"))
        .map(|s| s.trim_start_matches([' ', ':']).trim().to_lowercase())
        .collect();
    assert_eq!(serials.len(), 2, "two tokens expected: {text}");
    assert_ne!(serials[0], serials[1], "one serial for two cards: {text}");
    // Each serial comes from its card's GUID (OpenSC shows its last 8 bytes).
    for (serial, guid) in serials.iter().zip([GUID_A, GUID_B]) {
        assert!(
            serial.len() >= 8 && guid.ends_with(serial.as_str()),
            "serial {serial} is not from GUID {guid}: {text}"
        );
    }
}

/// A card pulled while it checks the PIN: the stamp fails as "removed", its approval stays
/// spent, and the try the card spent before comparing stays spent. Pulled twice in a row, the
/// card is down to the tries the daemon leaves to a person: it stops presenting the PIN rather
/// than block the card. Every authorisation has one outcome and the log verifies.
#[tokio::test(flavor = "multi_thread")]
async fn a_card_pulled_during_its_pin_check_spends_no_approval_twice_and_never_blocks_the_card() {
    let _turn = turn().await;
    let keys = tempfile::tempdir().unwrap();
    let ec = make_key(keys.path(), "card", "ec");
    let mut card = Card::start(35963, GUID_A, &[("9c", &ec)], &["--pin-tries", "3"]);
    let pin = pin_file(keys.path(), CARD_PIN);
    let (extra, seals) = one_seal_card(&pin);
    let daemon = start_daemon(extra, seals);
    let mut c = daemon.client().await;
    let first = stamp(&mut c, "card-ec", b"before").await;
    assert_eq!(first.status, Status::Ok as i32, "{}", first.message);

    // Pulled once during the PIN check: the card keeps the spent try until the next check.
    // The check is held far longer than the pull takes, so that a slow machine still pulls
    // the card while it is held (the stamp ends at the pull, not at the end of the hold).
    card.send("pin-delay 15000");
    let pulled = pull_during_pin_check(&mut card, &daemon, b"during").await;
    let pulled = pulled.last().unwrap().clone();
    assert_eq!(card.tries_left(), 2);
    assert_eq!(uses_consumed(&daemon.db(), &pulled), 1);
    card.send("pin-delay 0");
    card.insert();
    // A connection idle longer than the daemon's request limit is closed: open a new one.
    let mut c = daemon.client().await;
    let back = stamp_when_back(&mut c, "card-ec", b"after").await;
    assert_eq!(back.status, Status::Ok as i32, "{}", back.message);
    assert_eq!(card.tries_left(), 3, "a right PIN gives the spent try back");

    // Pulled twice in a row: one try is left, and the daemon leaves it to a person.
    card.send("pin-delay 15000");
    let mut pulled_twice = Vec::new();
    for second in [false, true] {
        if second {
            card.insert();
            wait_device(&daemon, "card-a", pb::DeviceStatus::Ready).await;
        }
        pulled_twice.extend(pull_during_pin_check(&mut card, &daemon, b"again").await);
    }
    assert_eq!(card.tries_left(), 1, "{:?}", card.lines.all());
    card.send("pin-delay 0");
    card.insert();
    let mut c = daemon.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = stamp(&mut c, "card-ec", b"with one try left").await;
        if r.status != Status::DeviceUnavailable as i32 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        refused.status,
        Status::PinInvalid as i32,
        "{}",
        refused.message
    );
    assert!(
        refused.message.contains("1 PIN tries left") && refused.message.contains("does not verify"),
        "{}",
        refused.message
    );
    assert!(!refused.message.contains(CARD_PIN));
    assert_eq!(card.tries_left(), 1, "the last try is not spent");
    assert_eq!(card.count("verify=blocked"), 0);
    assert_eq!(card.count("verify=wrong"), 0);
    // Other seals are not held up meanwhile.
    stamp_ok(&mut c, "contract", &sha256(b"other seal")).await;

    drop(c);
    let db = daemon.db();
    for jti in &pulled_twice {
        assert_eq!(uses_consumed(&db, jti), 1, "{jti}");
    }
    every_authorisation_has_one_outcome(&db);
    let failed = records(&db, Some("stamp.failed"));
    assert!(
        [&pulled, &pulled_twice[0], &pulled_twice[1]]
            .iter()
            .all(|jti| failed.iter().any(|r| &&r.jti == jti)),
        "each pulled stamp has its failure recorded"
    );
    assert_eq!(records(&db, Some("stamp.completed")).len(), 3);
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
}
