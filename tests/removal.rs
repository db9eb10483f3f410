//! A PKCS#11 token that goes away and comes back. The demo token is exported by a real
//! `p11-kit server` and reached through p11-kit's client module; killing the server is the
//! token's removal, starting it again its return.

mod common;

use common::*;
use sealgate::protocol::{pb, response, Status};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENT_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

/// A p11-kit server exporting the demo token, in its own process group so that it and the
/// per-connection helpers it forks are stopped together through this handle.
struct P11KitServer {
    child: Child,
}

impl P11KitServer {
    fn start(socket: &Path) -> P11KitServer {
        P11KitServer::start_from(socket, &demo().softhsm_conf())
    }

    /// Exports the token labelled sealgate-demo of the SoftHSM configuration `conf`.
    fn start_from(socket: &Path, conf: &Path) -> P11KitServer {
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new("p11-kit")
            .args(["server", "-f", "-n"])
            .arg(socket)
            .args(["--provider", SOFTHSM, "pkcs11:token=sealgate-demo"])
            .env("SOFTHSM2_CONF", conf)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("p11-kit server");
        // The server prints its address once it listens.
        wait_for_line(&mut child, |l| l.starts_with("P11_KIT_SERVER_ADDRESS="));
        P11KitServer { child }
    }

    fn kill(mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

use std::os::unix::process::CommandExt;

/// These tests run several processes on the shared demo token at once (daemon, p11-kit
/// servers); SoftHSM's file store is not safe for heavy concurrent use from many processes, so
/// they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A daemon with the demo seals plus "remote-contract", whose token is reached through the
/// p11-kit server listening on `p11_socket`.
fn daemon_with_remote_seal(p11_socket: &Path) -> Daemon {
    let extra = format!(
        r#"
[[device]]
id = "remote-hsm"
profile = "p11-kit-client"
token_label = "sealgate-demo"
pin_file = "{pin}"

[[seal]]
id = "remote-contract"
device = "remote-hsm"
key_label = "contract-seal"
algorithm = "ecdsa-p256-sha256"

[[seal.rule]]
levels = ["dept_head"]
"#,
        pin = demo().pin_file().display()
    );
    let mut opts = Opts {
        extra,
        ..Opts::default()
    };
    opts.caller_seals = Some(vec!["contract".into(), "remote-contract".into()]);
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &opts);
    let address = format!("unix:path={}", p11_socket.display());
    Daemon::start_with(dir, &text, &[("P11_KIT_SERVER_ADDRESS", &address)])
        .unwrap_or_else(|f| panic!("{f:?}"))
}

/// Polls `sealctl status` until device `id` satisfies `done` (at most 20 s).
async fn wait_device_until(
    d: &Daemon,
    id: &str,
    done: impl Fn(&pb::DeviceReport) -> bool,
) -> pb::DeviceReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = d.client().await;
    loop {
        let r = c.status().await.unwrap();
        let Some(response::Body::StatusReport(st)) = r.body else {
            panic!("{}", r.message)
        };
        let dev = st.devices.into_iter().find(|x| x.id == id).unwrap();
        if done(&dev) {
            return dev;
        }
        assert!(
            Instant::now() < deadline,
            "device {id} never got there: {dev:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

async fn wait_device(d: &Daemon, id: &str, want: pb::DeviceStatus) -> pb::DeviceReport {
    wait_device_until(d, id, |dev| dev.status == want as i32).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_removed_mid_service_is_unavailable_then_back() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !Path::new(CLIENT_MODULE).exists() {
        panic!("{CLIENT_MODULE} missing: install p11-kit-modules");
    }
    let work = tempfile::tempdir().unwrap();
    let p11_socket = work.path().join("p11.sock");
    let server = P11KitServer::start(&p11_socket);

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
    let work = tempfile::tempdir().unwrap();
    let p11_socket = work.path().join("p11.sock");
    let server = P11KitServer::start(&p11_socket);
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
    let setup = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/softhsm-setup.sh"))
        .arg(&other)
        .env("SEALCTL", SEALCTL)
        .output()
        .unwrap();
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
