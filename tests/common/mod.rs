//! Shared by the integration tests: a SoftHSM demo token made by `softhsm-setup.sh` (once per
//! test binary), the real `sealgated` binary started with a configuration of the test's making
//! and waited for through systemd's readiness protocol, and an independent verifier (openssl).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const SEALGATED: &str = env!("CARGO_BIN_EXE_sealgated");
pub const SEALCTL: &str = env!("CARGO_BIN_EXE_sealctl");
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// The demo token and files made by softhsm-setup.sh.
pub struct Demo {
    pub dir: PathBuf,
}

impl Demo {
    pub fn softhsm_conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }
    pub fn pin_file(&self) -> PathBuf {
        self.dir.join("user.pin")
    }
    pub fn pin(&self) -> String {
        std::fs::read_to_string(self.pin_file())
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// Runs softhsm-setup.sh once for this test binary, in a directory left for the process's life.
pub fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("sealgate-demo-")
            .tempdir()
            .unwrap()
            .keep();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-setup.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .expect("run softhsm-setup.sh");
        assert!(
            out.status.success(),
            "softhsm-setup.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Demo { dir }
    })
}

/// A demo seal: id, key label, algorithm.
pub const DEMO_SEALS: [(&str, &str, &str); 3] = [
    ("contract", "contract-seal", "ecdsa-p256-sha256"),
    ("finance", "finance-seal", "ed25519"),
    ("official", "official-seal", "rsa-pss-sha256"),
];

/// Knobs for a test configuration.
pub struct Opts {
    pub uids: Vec<u32>,
    pub max_frame_bytes: usize,
    pub max_connections: usize,
    pub request_timeout_ms: u64,
    pub allow_root: bool,
    /// Extra TOML appended as is (more devices or seals).
    pub extra: String,
    /// Seals the caller may use; None means every demo seal.
    pub caller_seals: Option<Vec<String>>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            uids: vec![nix::unistd::getuid().as_raw()],
            max_frame_bytes: 1024 * 1024,
            max_connections: 64,
            request_timeout_ms: 5000,
            allow_root: true,
            extra: String::new(),
            caller_seals: None,
        }
    }
}

/// A configuration using the demo token, with the socket at `socket`.
pub fn config_text(demo: &Demo, socket: &Path, opts: &Opts) -> String {
    let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
    let seals = opts.caller_seals.clone().unwrap_or_else(|| {
        DEMO_SEALS
            .iter()
            .map(|s| s.0.to_string())
            .chain(std::iter::once("official-pkcs1".to_string()))
            .collect()
    });
    let mut t = format!(
        r#"
[daemon]
socket = "{socket}"
profiles_dir = "{profiles}"
max_frame_bytes = {frame}
max_connections = {conns}
request_timeout_ms = {timeout}
allow_root = {root}

[[caller]]
name = "test-app"
uids = {uids:?}
seals = {seals:?}

[[device]]
id = "demo-hsm"
profile = "softhsm2"
token_label = "sealgate-demo"
pin_file = "{pin}"
"#,
        socket = socket.display(),
        profiles = profiles.display(),
        frame = opts.max_frame_bytes,
        conns = opts.max_connections,
        timeout = opts.request_timeout_ms,
        root = opts.allow_root,
        uids = opts.uids,
        pin = demo.pin_file().display(),
    );
    for (id, label, alg) in DEMO_SEALS {
        t += &format!(
            "\n[[seal]]\nid = \"{id}\"\nname = \"{id} seal\"\ndevice = \"demo-hsm\"\nkey_label = \"{label}\"\nalgorithm = \"{alg}\"\n"
        );
    }
    // The official seal's RSA key, also offered with PKCS#1 v1.5 padding.
    t += "\n[[seal]]\nid = \"official-pkcs1\"\ndevice = \"demo-hsm\"\nkey_id = \"03\"\nalgorithm = \"rsa-pkcs1-sha256\"\n";
    t += &opts.extra;
    t
}

/// A running sealgated, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

/// How a daemon start ended when it did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    pub status: ExitStatus,
    pub stderr: String,
}

impl Daemon {
    pub fn start(opts: &Opts) -> Daemon {
        let demo = demo();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("sealgated.sock");
        let text = config_text(demo, &socket, opts);
        Daemon::start_with(dir, &text, &[])
            .unwrap_or_else(|f| panic!("daemon did not start: {f:?}"))
    }

    /// Starts the daemon with this configuration text (written to DIR/sealgate.toml) and waits
    /// for READY=1 on a notify socket, or for the process to end.
    pub fn start_with(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Daemon, StartFailure> {
        let demo = demo();
        let config_path = dir.path().join("sealgate.toml");
        std::fs::write(&config_path, config).unwrap();
        let notify_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log = dir.path().join("sealgated.log");
        let mut cmd = Command::new(SEALGATED);
        cmd.arg("--config")
            .arg(&config_path)
            .env("SOFTHSM2_CONF", demo.softhsm_conf())
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sealgated");
        let socket = dir.path().join("sealgated.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 512];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    break;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                return Err(StartFailure {
                    status,
                    stderr: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sealgated did not report ready in 30 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        Ok(Daemon {
            child: Some(child),
            socket,
            dir,
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub async fn client(&self) -> sealgate::protocol::client::Client {
        sealgate::protocol::client::Client::connect(&self.socket)
            .await
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs sealgated to completion (for start-up failures); gives up after 30 s.
pub fn run_to_exit(dir: &Path, config: &str) -> (ExitStatus, String) {
    let config_path = dir.join("sealgate.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(SEALGATED)
        .arg("--config")
        .arg(&config_path)
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (child.wait().unwrap(), stderr)
}

/// Verifies a stamp signature over `document` with openssl and the seal's SPKI.
pub fn openssl_verify(algorithm: &str, spki_der: &[u8], document: &[u8], signature: &[u8]) -> bool {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("key.der"), spki_der).unwrap();
    std::fs::write(p("doc"), document).unwrap();
    std::fs::write(p("digest"), sha2::Sha256::digest(document)).unwrap();
    std::fs::write(p("sig"), signature).unwrap();
    let conv = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-in"])
        .arg(p("key.der"))
        .arg("-out")
        .arg(p("key.pem"))
        .status()
        .unwrap();
    assert!(conv.success(), "openssl cannot read the SPKI");
    let mut cmd = Command::new("openssl");
    match algorithm {
        "ed25519" => {
            cmd.args(["pkeyutl", "-verify", "-pubin", "-rawin", "-inkey"])
                .arg(p("key.pem"))
                .arg("-in")
                .arg(p("digest"))
                .arg("-sigfile")
                .arg(p("sig"));
        }
        other => {
            cmd.args(["dgst", "-sha256"]);
            if other == "rsa-pss-sha256" {
                cmd.args([
                    "-sigopt",
                    "rsa_padding_mode:pss",
                    "-sigopt",
                    "rsa_pss_saltlen:32",
                ]);
            }
            cmd.arg("-verify")
                .arg(p("key.pem"))
                .arg("-signature")
                .arg(p("sig"))
                .arg(p("doc"));
        }
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Waits for a line on a child's stdout that satisfies `ready`; panics if the child closes it.
pub fn wait_for_line(child: &mut Child, ready: impl Fn(&str) -> bool) -> Vec<String> {
    let out = child.stdout.take().expect("stdout piped");
    let mut lines = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        let done = ready(&line);
        lines.push(line);
        if done {
            return lines;
        }
    }
    panic!("child closed stdout before it was ready: {lines:?}");
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}
