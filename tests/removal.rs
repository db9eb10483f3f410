//! A PKCS#11 token that goes away and comes back. The demo token is exported by a real
//! `p11-kit server` and reached through p11-kit's client module; killing the server is the
//! token's removal, starting it again its return.

mod common;

use common::p11kit::{self, P11KitServer};
use common::*;
use sealgate::protocol::{pb, response, Status};
use std::path::Path;
use std::time::{Duration, Instant};

/// These tests run several processes on the shared demo token at once (daemon, p11-kit
/// servers); SoftHSM's file store is not safe for heavy concurrent use from many processes, so
/// they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A daemon with the demo seals plus "remote-contract", whose token is reached through the
/// p11-kit server listening on `p11_socket`.
fn daemon_with_remote_seal(p11_socket: &Path) -> Daemon {
    let mut opts = Opts {
        extra: p11kit::remote_seal_toml(),
        ..Opts::default()
    };
    opts.caller_seals = Some(vec!["contract".into(), "remote-contract".into()]);
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &opts);
    let address = p11kit::address(p11_socket);
    Daemon::start_with(dir, &text, &[("P11_KIT_SERVER_ADDRESS", &address)])
        .unwrap_or_else(|f| panic!("{f:?}"))
}

/// Stamps `digest` with "remote-contract" and expects DEVICE_UNAVAILABLE.
async fn remote_stamp_unavailable(
    c: &mut sealgate::protocol::client::Client,
    digest: &[u8],
    token: &[u8],
) -> sealgate::protocol::Response {
    let r = c.stamp("remote-contract", digest, token, "").await.unwrap();
    assert_eq!(r.status, Status::DeviceUnavailable as i32, "{}", r.message);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_removed_mid_service_is_unavailable_then_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_work, p11_socket, server) = p11kit::serve_demo_token();

    let daemon = daemon_with_remote_seal(&p11_socket);
    let mut c = daemon.client().await;
    let response::Body::DescribeSeal(d) = c
        .describe_seal("remote-contract")
        .await
        .unwrap()
        .body
        .unwrap()
    else {
        panic!()
    };
    let doc = b"before removal";
    let s = stamp_ok(&mut c, "remote-contract", &sha256(doc)).await;
    assert!(openssl_verify(
        &d.algorithm,
        &d.public_key_spki,
        doc,
        &s.signature
    ));

    // The token goes away.
    server.kill();
    let r = remote_stamp_unavailable(
        &mut c,
        &[1u8; 32],
        &token_for("remote-contract", &[1u8; 32]),
    )
    .await;
    assert!(r.message.contains("remote-hsm"), "{}", r.message);
    // Other seals keep working meanwhile, and status says what is wrong.
    stamp_ok(&mut c, "contract", &[2u8; 32]).await;
    let report = wait_device(&daemon, "remote-hsm", pb::DeviceStatus::Unavailable).await;
    assert!(!report.detail.is_empty());
    // While the device is known to be down, a stamp is refused before its approval is spent.
    let held = token_for("remote-contract", &[1u8; 32]);
    remote_stamp_unavailable(&mut c, &[1u8; 32], &held).await;

    // The removal is an alert (raised once the device watcher's record is committed).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.watch_alerts(20, false).await.unwrap();
        let Some(response::Body::Alerts(alerts)) = r.body else {
            panic!("{}", r.message)
        };
        if alerts
            .records
            .iter()
            .any(|a| a.reason == "device_removed" && a.device == "remote-hsm")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no alert: {:?}", alerts.records);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The token comes back: the daemon reconnects and logs in again by itself.
    let server = P11KitServer::start(&p11_socket);
    wait_device(&daemon, "remote-hsm", pb::DeviceStatus::Ready).await;
    let doc = b"after return";
    let s = stamp_ok(&mut c, "remote-contract", &sha256(doc)).await;
    assert!(openssl_verify(
        &d.algorithm,
        &d.public_key_spki,
        doc,
        &s.signature
    ));
    // The approval refused during the outage was not spent.
    let r = c
        .stamp("remote-contract", &[1u8; 32], &held, "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);
    assert!(daemon.stop().success());
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_comes_back_with_other_keys_is_refused() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (work, p11_socket, server) = p11kit::serve_demo_token();
    let daemon = daemon_with_remote_seal(&p11_socket);
    let mut c = daemon.client().await;
    stamp_ok(&mut c, "remote-contract", &[1u8; 32]).await;
    server.kill();
    wait_device(&daemon, "remote-hsm", pb::DeviceStatus::Unavailable).await;

    // Another token with the same label and PIN, but keys of its own.
    let other = work.path().join("other-demo");
    std::fs::create_dir(&other).unwrap();
    for f in ["user.pin", "so.pin"] {
        std::fs::copy(demo().dir.join(f), other.join(f)).unwrap();
    }
    let setup = setup_command(&other).output().unwrap();
    assert!(setup.status.success());
    let impostor = P11KitServer::start_from(&p11_socket, &other.join("softhsm2.conf"));

    // The daemon reconnects, logs in, finds other keys and refuses the token.
    let detail = wait_device_until(&daemon, "remote-hsm", |dev| {
        dev.detail.contains("different keys")
    })
    .await
    .detail;
    assert!(detail.contains("refusing it until restart"), "{detail}");
    // A fresh connection: the first one sat idle through the set-up, past the idle timeout.
    let mut c = daemon.client().await;
    remote_stamp_unavailable(
        &mut c,
        &[2u8; 32],
        &token_for("remote-contract", &[2u8; 32]),
    )
    .await;
    stamp_ok(&mut c, "contract", &[3u8; 32]).await;
    assert!(daemon.stop().success());
    impostor.kill();
}

/// A stamp that comes while another thread is reconnecting its device waits for that
/// reconnection and is signed, rather than being refused while the token comes back. The
/// token returns on a server that does not answer at first (stopped): the daemon's device
/// watcher starts to reconnect and hangs in it; stamps come; then the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_that_come_during_a_reconnection_wait_for_it() {
    use nix::sys::signal::{killpg, Signal};
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_work, p11_socket, server) = p11kit::serve_demo_token();
    let daemon = daemon_with_remote_seal(&p11_socket);
    let mut c = daemon.client().await;
    stamp_ok(&mut c, "remote-contract", &sha256(b"before")).await;
    server.kill();
    wait_device(&daemon, "remote-hsm", pb::DeviceStatus::Unavailable).await;

    let server = P11KitServer::start(&p11_socket);
    let group = nix::unistd::Pid::from_raw(server.child.id() as i32);
    killpg(group, Signal::SIGSTOP).unwrap();
    // The watcher tries each second: by now it is inside a reconnection that waits on the
    // server.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut stamps = Vec::new();
    for i in 0..4u8 {
        let mut c = daemon.client().await;
        stamps.push(tokio::spawn(async move {
            let digest = sha256(format!("during the reconnection, no. {i}").as_bytes());
            let token = token_for("remote-contract", &digest);
            c.stamp("remote-contract", &digest, &token, "")
                .await
                .unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    killpg(group, Signal::SIGCONT).unwrap();
    for s in stamps {
        let r = s.await.unwrap();
        assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);
    }
    assert!(daemon.stop().success());
    server.kill();
}

/// Stamps received by `load` so far, once it has received none for `quiet`.
async fn wait_until_stalled(load: &Load, quiet: Duration) -> usize {
    let mut last = load.count();
    loop {
        tokio::time::sleep(quiet).await;
        let now = load.count();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_keys_token_lost_inside_a_checkpoint_signature_refuses_stamps_then_resumes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_work, p11_socket, server) = p11kit::serve_demo_token();
    // The seals stay on the local token; only the checkpoints are signed through the server.
    let dir = tempfile::tempdir().unwrap();
    let opts = Opts {
        extra: format!(
            "\n[[device]]\nid = \"remote-hsm\"\nprofile = \"p11-kit-client\"\ntoken_label = \"sealgate-demo\"\npin_file = \"{}\"\n",
            demo().pin_file().display()
        ),
        ..Opts::default()
    };
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &opts).replace(
        "[audit]\ndevice = \"demo-hsm\"",
        "[audit]\ndevice = \"remote-hsm\"",
    );
    assert!(text.contains("device = \"remote-hsm\"\nkey_label = \"sealgate-audit\""));
    let address = p11kit::address(&p11_socket);
    let d = Daemon::start_with(dir, &text, &[("P11_KIT_SERVER_ADDRESS", &address)])
        .unwrap_or_else(|f| panic!("{f:?}"));
    let load = Load::start(&d.socket, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(load.count() > 0, "no stamps before the fault");
    // The server stops answering: the next checkpoint signature waits inside C_Sign, and
    // every stamp behind it waits for its batch. Then the server is gone for good.
    let group = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let before = wait_until_stalled(&load, Duration::from_millis(500)).await;
    server.kill();
    // Refused, precisely, while the audit key is away; other requests are still answered.
    let mut c = d.client().await;
    let digest = sha256(b"while the audit key is away");
    let held = Approval::for_seal("contract", &digest).token();
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = c.stamp("contract", &digest, &held, "").await.unwrap();
        if r.status == Status::AuditUnavailable as i32 {
            break r;
        }
        assert!(Instant::now() < deadline, "{} {}", r.status, r.message);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(r.message.contains("nothing was signed"), "{}", r.message);
    assert!(c.status().await.unwrap().status == Status::Ok as i32);
    let during = load.count();
    // The token comes back: the audit device reconnects and stamps flow again.
    let server = P11KitServer::start(&p11_socket);
    let deadline = Instant::now() + Duration::from_secs(20);
    while load.count() < during + 20 {
        assert!(
            Instant::now() < deadline,
            "stamps did not resume: {}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The approval refused while the key was away was not spent.
    let r = c.stamp("contract", &digest, &held, "").await.unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{} {}", r.reason, r.message);
    let seen = load.finish().await;
    drop(c);
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    server.kill();
    let db = dir.path().join("state/sealgate.db");
    let completed = every_seen_stamp_is_completed(&db, &seen);
    every_authorisation_has_one_outcome(&db);
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
    eprintln!(
        "{} stamps received ({before} before the fault, {} while the key was away, {} after), {} completed in the log",
        seen.len(),
        during - before,
        seen.len() - during,
        completed.len()
    );
}
