//! A PKCS#11 token reached through `p11-kit server` and p11-kit's client module: killing the
//! server is the token's removal, starting it again its return.

use super::{demo, wait_for_line, SOFTHSM};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const CLIENT_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so";

/// A p11-kit server exporting the demo token, in its own process group so that it and the
/// per-connection helpers it forks are stopped together through this handle.
pub struct P11KitServer {
    pub child: Child,
}

impl P11KitServer {
    pub fn start(socket: &Path) -> P11KitServer {
        P11KitServer::start_from(socket, &demo().softhsm_conf())
    }

    /// Exports the token labelled sealgate-demo of the SoftHSM configuration `conf`.
    pub fn start_from(socket: &Path, conf: &Path) -> P11KitServer {
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

    pub fn kill(mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The value of `P11_KIT_SERVER_ADDRESS` for a server listening on `socket`.
pub fn address(socket: &Path) -> String {
    format!("unix:path={}", socket.display())
}

/// Configuration to append: device "remote-hsm", the demo token through the server, and seal
/// "remote-contract" on it (the contract seal's key) with a one-level rule.
pub fn remote_seal_toml() -> String {
    format!(
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
    )
}

/// A folder for the server's socket, the socket's path, and the server exporting the demo token
/// on it; fails at once, saying why, when p11-kit's client module is missing.
pub fn serve_demo_token() -> (tempfile::TempDir, PathBuf, P11KitServer) {
    assert!(
        Path::new(CLIENT_MODULE).exists(),
        "{CLIENT_MODULE} missing: install p11-kit-modules"
    );
    let work = tempfile::tempdir().unwrap();
    let socket = work.path().join("p11.sock");
    let server = P11KitServer::start(&socket);
    (work, socket, server)
}
