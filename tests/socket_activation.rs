//! The daemon adopts a socket handed over by systemd (LISTEN_FDS), here through
//! `systemd-socket-activate`, which binds the socket and execs the daemon on first use.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_through_a_socket_passed_by_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    // The configured path differs: a passed socket wins over `daemon.socket`.
    let text = config_text(demo(), &dir.path().join("unused.sock"), &Opts::default());
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(format!(
            "--setenv=SOFTHSM2_CONF={}",
            demo().softhsm_conf().display()
        ))
        .arg(SEALGATED)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd)");
    // It reports the socket once it listens.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Listening on") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no listening line"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    let mut c = sealgate::protocol::client::Client::connect(&socket)
        .await
        .unwrap();
    stamp_ok(&mut c, "contract", &[5u8; 32]).await;
    assert!(!dir.path().join("unused.sock").exists());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}
