//! Shared by the integration tests: a SoftHSM demo token made by `softhsm-setup.sh` (once per
//! test binary), the real `sealgated` binary started with a configuration of the test's making
//! and waited for through systemd's readiness protocol, and an independent verifier (openssl).
#![allow(dead_code)]

pub mod faultfs;
pub mod hq;
pub mod p11kit;
pub mod pki;
pub mod postgres;
pub mod receivers;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const SEALGATED: &str = env!("CARGO_BIN_EXE_sealgated");
pub const SEALCTL: &str = env!("CARGO_BIN_EXE_sealctl");
pub const SEALGATE_CONSOLE: &str = env!("CARGO_BIN_EXE_sealgate-console");
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
    pub fn approver_key(&self, id: &str) -> sealgate::token::SigningKey {
        let pem = std::fs::read_to_string(self.dir.join(format!("approvers/{id}.key"))).unwrap();
        sealgate::token::SigningKey::from_pem(&pem).unwrap()
    }
    pub fn pin(&self) -> String {
        std::fs::read_to_string(self.pin_file())
            .unwrap()
            .trim()
            .to_owned()
    }
}

/// Where the suite keeps every daemon's log and start-up error, and the secrets that must never
/// appear in them; test.sh checks them after the run (and empties the folder before it).
pub fn evidence_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("daemon-logs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Adds a secret (a PIN, a TOTP seed) to the list the logs are checked against.
pub fn note_secret(secret: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(evidence_dir().join("secrets.txt"))
        .unwrap();
    writeln!(f, "{}", secret.trim()).unwrap();
}

/// Keeps a copy of what a daemon wrote, under a name unique in the suite.
pub fn keep_output(text: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let exe = std::env::current_exe().unwrap();
    let name = format!(
        "{}-{}-{}.log",
        exe.file_stem().unwrap().to_string_lossy(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    std::fs::write(evidence_dir().join(name), text).unwrap();
}

/// `softhsm-setup.sh DIR`, given the binaries of this build: without them the script builds
/// release binaries of its own with cargo, minutes of a clean machine's time.
pub fn setup_command(dir: &Path) -> Command {
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-setup.sh"))
        .arg(dir)
        .env("SEALCTL", SEALCTL)
        .env("SEALGATE_CONSOLE", SEALGATE_CONSOLE);
    c
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
        let out = setup_command(&dir).output().expect("run softhsm-setup.sh");
        assert!(
            out.status.success(),
            "softhsm-setup.sh failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for pin in ["user.pin", "so.pin"] {
            note_secret(&std::fs::read_to_string(dir.join(pin)).unwrap());
        }
        Demo { dir }
    })
}

/// Held while a test makes a token ([`own_token`]) or leaves a token's files damaged for a
/// while: softhsm2-util reads every token of the directory.
pub static TOKEN_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A SoftHSM token of its own (in the demo's SoftHSM), for tests that spend PIN tries, so that
/// a wrong PIN never touches the shared demo token. It holds two P-256 keys: "k" (a seal) and
/// "audit".
pub fn own_token(label: &str, pin: &str) {
    // softhsm2-util reads every token of the directory to find a free slot; one that another
    // test of this binary is writing at that moment fails it ("Could not get info about the
    // token"). Tokens are made one at a time, and a start that met a daemon's reading is tried
    // again.
    let _one = TOKEN_FILES.lock().unwrap_or_else(|p| p.into_inner());
    note_secret(pin);
    let run = |args: &[&str]| {
        for attempt in 1.. {
            let out = Command::new(args[0])
                .args(&args[1..])
                .env("SOFTHSM2_CONF", demo().softhsm_conf())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success()
                && attempt < 3
                && stderr.contains("Could not get info about the token")
            {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            assert!(out.status.success(), "{args:?}: {stderr}");
            return;
        }
    };
    run(&[
        "softhsm2-util",
        "--init-token",
        "--free",
        "--label",
        label,
        "--pin",
        pin,
        "--so-pin",
        "87654321",
    ]);
    for key in ["k", "audit"] {
        run(&[
            "pkcs11-tool",
            "--module",
            SOFTHSM,
            "--token-label",
            label,
            "--login",
            "--pin",
            pin,
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            key,
            "--usage-sign",
        ]);
    }
}

/// A session of this process, logged in as the user, on the demo SoftHSM's token `label`
/// (read-write when `rw`). Sets `SOFTHSM2_CONF` to the demo's, as every test that starts a
/// process passes it.
pub fn token_session(label: &str, pin: &str, rw: bool) -> cryptoki::session::Session {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    std::env::set_var("SOFTHSM2_CONF", demo().softhsm_conf());
    let ctx = Pkcs11::new(SOFTHSM).unwrap();
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == label)
        })
        .unwrap_or_else(|| panic!("no token {label:?}"));
    let session = if rw {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .unwrap();
    session
        .login(
            cryptoki::session::UserType::User,
            Some(&cryptoki::types::AuthPin::from(pin.to_owned())),
        )
        .unwrap();
    session
}

/// Writes a PIN file (mode 0600) as the daemon reads it; returns its path.
pub fn write_pin_file(path: &Path, pin: &str) -> PathBuf {
    std::fs::write(path, format!("{pin}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.to_owned()
}

/// A configuration for a token made by [`own_token`]: seal "s" on key "k", the audit key
/// "audit", the PIN `pin` in DIR/pin, and the current user as an administrator caller.
pub fn own_token_config(dir: &Path, label: &str, pin: &str) -> String {
    let pin_file = write_pin_file(&dir.join("pin"), pin);
    format!(
        r#"
[daemon]
socket = "{socket}"
profiles_dir = "{profiles}"
state_dir = "{state}"
allow_root = true

[[caller]]
name = "t"
uids = [{uid}]
seals = ["s"]
admin = true

[[device]]
id = "pin-test"
profile = "softhsm2"
token_label = "{label}"
pin_file = "{pin_file}"

[[seal]]
id = "s"
device = "pin-test"
key_label = "k"
algorithm = "ecdsa-p256-sha256"

[[seal.rule]]
levels = ["dept_head"]

[audit]
device = "pin-test"
key_label = "audit"
"#,
        socket = dir.join("sealgated.sock").display(),
        state = dir.join("state").display(),
        profiles = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("device-profiles")
            .display(),
        uid = nix::unistd::getuid(),
        pin_file = pin_file.display(),
    )
}

/// Logs in to a token of the demo's SoftHSM with `pin` by hand (pkcs11-tool); true if the
/// token took it.
pub fn token_login(label: &str, pin: &str) -> bool {
    Command::new("pkcs11-tool")
        .args([
            "--module",
            SOFTHSM,
            "--token-label",
            label,
            "--login",
            "--pin",
            pin,
        ])
        .arg("--list-objects")
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .output()
        .unwrap()
        .status
        .success()
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
    /// Lines of the `[audit.alerts]` table.
    pub alerts: String,
    /// More lines of the `[daemon]` table.
    pub daemon_extra: String,
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
            alerts: String::new(),
            daemon_extra: String::new(),
        }
    }
}

/// The test policy (close to the demo's, plus seals and rules that make every refusal
/// reachable):
/// - contract: "night forms" only in an hour that is never now; "large contracts" (CNY
///   100,000.00 and up) dept_head (department-scoped) then executive; "contracts" dept_head.
/// - finance: "invoices" by a finance officer, at most 3 per applicant per hour.
/// - official: dept_head (department-scoped) then executive.
/// - official-pkcs1: the official seal's key with PKCS#1 padding; dept_head and a TOTP code.
fn policy_text(seal: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A one-hour window starting two hours from now (UTC): never the current time.
    let closed_from = ((now / 3600 + 2) % 24) as u32;
    match seal {
        "contract" => format!(
            r#"
[[seal.rule]]
name = "night forms"
doc_types = ["night-form"]
levels = ["dept_head"]
hours = "{closed_from:02}:00-{:02}:00"
timezone = "UTC"

[[seal.rule]]
name = "large contracts"
doc_types = ["contract"]
currency = "CNY"
amount_min = 10000000
levels = ["dept_head", "executive"]
dept_scoped = ["dept_head"]

[[seal.rule]]
name = "contracts"
doc_types = ["contract"]
levels = ["dept_head"]
dept_scoped = ["dept_head"]
"#,
            (closed_from + 1) % 24
        ),
        "finance" => r#"
[[seal.rule]]
name = "invoices"
doc_types = ["invoice"]
levels = ["finance"]
rate_limit_count = 3
rate_limit_window_seconds = 3600
"#
        .into(),
        "official" => r#"
[[seal.rule]]
name = "official use"
levels = ["dept_head", "executive"]
dept_scoped = ["dept_head"]
"#
        .into(),
        _ => r#"
[[seal.rule]]
name = "with totp"
levels = ["dept_head"]
mfa = true
"#
        .into(),
    }
}

/// Demo approvers, plus one revoked and one whose validity ended (both reuse zhang.wei's key),
/// and one whose ES256 key lives in the demo PKCS#11 token (the contract seal's key pair stands
/// in for it).
fn approvers_text(demo: &Demo) -> String {
    let mut t = String::new();
    for (id, role, dept, key, revoked) in [
        (
            "zhang.wei",
            "dept_head",
            "sales",
            "approvers/zhang.wei.pub.pem",
            false,
        ),
        (
            "liu.yang",
            "dept_head",
            "finance",
            "approvers/liu.yang.pub.pem",
            false,
        ),
        (
            "li.na",
            "executive",
            "management",
            "approvers/li.na.pub.pem",
            false,
        ),
        (
            "wang.fang",
            "finance",
            "finance",
            "approvers/wang.fang.pub.pem",
            false,
        ),
        (
            "old.boss",
            "dept_head",
            "sales",
            "approvers/zhang.wei.pub.pem",
            true,
        ),
        (
            "hsm.approver",
            "executive",
            "management",
            "ca/contract-seal.pub.pem",
            false,
        ),
    ] {
        let name = match id {
            "zhang.wei" => "张伟",
            "liu.yang" => "刘洋",
            "li.na" => "李娜",
            "wang.fang" => "王芳",
            _ => "",
        };
        t += &format!(
            "\n[[approver]]\nid = \"{id}\"\nname = \"{name}\"\nrole = \"{role}\"\ndepartment = \"{dept}\"\npublic_key_file = \"{}\"\nrevoked = {revoked}\n",
            demo.dir.join(key).display()
        );
    }
    // An approver whose appointment ended (validity window in the past).
    t += &format!(
        "\n[[approver]]\nid = \"retired.head\"\nrole = \"dept_head\"\ndepartment = \"sales\"\npublic_key_file = \"{}\"\nvalid_from = \"2020-01-01T00:00:00Z\"\nvalid_until = \"2021-01-01T00:00:00Z\"\n",
        demo.dir.join("approvers/zhang.wei.pub.pem").display()
    );
    t
}

/// A configuration using the demo token, with the socket at `socket` and the state directory
/// beside it.
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
state_dir = "{state}"
max_frame_bytes = {frame}
max_connections = {conns}
request_timeout_ms = {timeout}
allow_root = {root}
{daemon_extra}

[[caller]]
name = "test-app"
uids = {uids:?}
seals = {seals:?}
admin = true

[[device]]
id = "demo-hsm"
profile = "softhsm2"
token_label = "sealgate-demo"
pin_file = "{pin}"
wrap_key_label = "sealgate-mfa-wrap"

[mfa]
device = "demo-hsm"
max_failures = 3

[audit]
device = "demo-hsm"
key_label = "sealgate-audit"
heartbeat_seconds = 0

[audit.alerts]
{alerts}
"#,
        socket = socket.display(),
        state = socket
            .parent()
            .unwrap_or(Path::new("/nonexistent"))
            .join("state")
            .display(),
        profiles = profiles.display(),
        frame = opts.max_frame_bytes,
        conns = opts.max_connections,
        timeout = opts.request_timeout_ms,
        root = opts.allow_root,
        uids = opts.uids,
        pin = demo.pin_file().display(),
        alerts = opts.alerts,
        daemon_extra = opts.daemon_extra,
    );
    t += &approvers_text(demo);
    for (id, label, alg) in DEMO_SEALS {
        t += &format!(
            "\n[[seal]]\nid = \"{id}\"\nname = \"{id} seal\"\ndevice = \"demo-hsm\"\nkey_label = \"{label}\"\nalgorithm = \"{alg}\"\nimage = \"{image}\"\n",
            image = demo.dir.join(format!("images/{id}.png")).display()
        );
        t += &policy_text(id);
    }
    // The official seal's RSA key, also offered with PKCS#1 v1.5 padding.
    t += "\n[[seal]]\nid = \"official-pkcs1\"\ndevice = \"demo-hsm\"\nkey_id = \"03\"\nalgorithm = \"rsa-pkcs1-sha256\"\n";
    t += &policy_text("official-pkcs1");
    t += &opts.extra;
    t
}

/// A running sealgated, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Where the daemon's sd_notify messages arrive.
    notify: UnixDatagram,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

/// How a daemon start ended when it did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    pub status: ExitStatus,
    pub stderr: String,
    /// The daemon's directory (configuration, state), for another start.
    pub dir: tempfile::TempDir,
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
        let _ = std::fs::remove_file(&notify_path); // left by an earlier start in this directory
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let log = dir.path().join("sealgated.log");
        let mut cmd = Command::new(SEALGATED);
        cmd.arg("--config")
            .arg(&config_path)
            // Its own folder, so anything it might write there (a core, say) is the test's.
            .current_dir(dir.path())
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
                    dir,
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
            notify,
            child: Some(child),
            socket,
            dir,
            log,
        })
    }

    /// The sd_notify messages the daemon sends from now on, up to and including `last` (10 s
    /// at most).
    pub fn notifications_until(&self, last: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.iter().any(|l| l == last) {
            assert!(Instant::now() < deadline, "no {last}; got {got:?}");
            if let Ok(n) = self.notify.recv(&mut buf) {
                got.extend(String::from_utf8_lossy(&buf[..n]).lines().map(String::from));
            }
        }
        got
    }

    /// The daemon's state database (the audit log is in it).
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("state/sealgate.db")
    }

    /// Kills the daemon with SIGKILL and starts it again on the same configuration and state.
    pub fn crash_and_restart(self) -> Daemon {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.restart_with(&[])
            .unwrap_or_else(|f| panic!("restart: {f:?}"))
    }

    /// Waits up to `timeout` for the daemon to end by itself; its exit status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts the daemon again on the same configuration and state once it has ended, with
    /// `env`; the failed start, if it did not become ready.
    pub fn restart_with(mut self, env: &[(&str, &str)]) -> Result<Daemon, StartFailure> {
        let mut child = self.child.take().unwrap();
        child.wait().unwrap();
        keep_output(&self.log());
        let dir = tempfile::TempDir::with_prefix("unused").unwrap();
        let dir = std::mem::replace(&mut self.dir, dir);
        let config = std::fs::read_to_string(dir.path().join("sealgate.toml")).unwrap();
        Daemon::start_with(dir, &config, env)
    }

    /// Sends SIGHUP and waits for the log line of its outcome (the `n`th such line).
    pub fn reload(&self, n: usize) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            let outcomes: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("configuration reloaded") || l.contains("reload refused"))
                .collect();
            if outcomes.len() >= n {
                return outcomes[n - 1].to_owned();
            }
            assert!(Instant::now() < deadline, "no reload outcome: {log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGHUP and waits for the outcome's log line, counting those of earlier reloads.
    pub fn reload_next(&self) -> String {
        let before = self
            .log()
            .lines()
            .filter(|l| l.contains("configuration reloaded") || l.contains("reload refused"))
            .count();
        self.reload(before + 1)
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

    /// SIGTERM, waits for the exit, and hands back the directory (configuration, state).
    pub fn stop_keeping_state(mut self) -> (ExitStatus, tempfile::TempDir) {
        let placeholder = tempfile::TempDir::with_prefix("unused").unwrap();
        let dir = std::mem::replace(&mut self.dir, placeholder);
        (self.stop(), dir)
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
        keep_output(&self.log());
    }
}

/// Runs `sealctl audit verify` on a database against the demo audit key; returns the exit
/// code and what it printed.
pub fn audit_verify(db: &Path) -> (i32, String) {
    let out = Command::new(SEALCTL)
        .args(["audit", "verify", "--db"])
        .arg(db)
        .arg("--key")
        .arg(demo().dir.join("audit-key.pub.pem"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
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
    keep_output(&stderr);
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

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An approval to issue in a test; `Approval::for_seal` fills in what the test policy needs.
#[derive(Clone)]
pub struct Approval {
    pub claims: sealgate::token::Claims,
    /// (approver id, seconds before now it approved), in signing order.
    pub signers: Vec<(String, i64)>,
}

impl Approval {
    /// A single-use approval that passes the test policy for `seal` (see `policy_text`).
    pub fn for_seal(seal: &str, digest: &[u8]) -> Approval {
        use sealgate::token::{Claims, DocClaim};
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let now = unix_now();
        let (doc_type, dept, signers): (&str, &str, &[&str]) = match seal {
            "finance" => ("invoice", "finance", &["wang.fang"]),
            "official" => ("notice", "sales", &["zhang.wei", "li.na"]),
            "official-pkcs1" => ("notice", "sales", &["zhang.wei"]),
            _ => ("contract", "sales", &["zhang.wei"]),
        };
        Approval {
            claims: Claims {
                jti: format!(
                    "test-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ),
                seal: seal.into(),
                doc: DocClaim {
                    sha256: hex::encode(digest),
                    doc_type: doc_type.into(),
                    title: None,
                    sha512: None,
                    placement: None,
                },
                amount: None,
                dept: dept.into(),
                scope: String::new(),
                applicant: "zhao.lei".into(),
                purpose: "test".into(),
                iat: now - 600,
                nbf: now - 600,
                exp: now + 3600,
                uses: 1,
            },
            signers: signers
                .iter()
                .enumerate()
                .map(|(i, s)| (s.to_string(), 300 - 60 * i as i64))
                .collect(),
        }
    }

    /// Signs with the demo approvers' keys (an unknown id signs with zhang.wei's key).
    pub fn token(&self) -> Vec<u8> {
        let mut t = sealgate::token::Token::unsigned(self.claims.clone());
        let now = unix_now();
        for (id, ago) in &self.signers {
            let key_id = match id.as_str() {
                "zhang.wei" | "liu.yang" | "li.na" | "wang.fang" => id.as_str(),
                _ => "zhang.wei",
            };
            t.add_signature(&demo().approver_key(key_id), id, now - ago);
        }
        t.to_json().into_bytes()
    }
}

/// A token that passes the test policy for `seal` and document `digest`.
pub fn token_for(seal: &str, digest: &[u8]) -> Vec<u8> {
    Approval::for_seal(seal, digest).token()
}

/// Enrolls `user` for TOTP through the daemon (the test caller is an administrator).
pub async fn enroll(c: &mut sealgate::protocol::client::Client, user: &str) -> totp_rs::Totp {
    let r = c.enroll_mfa(user).await.unwrap();
    let Some(sealgate::protocol::response::Body::EnrollMfa(e)) = r.body else {
        panic!("enroll failed: {}", r.message)
    };
    let totp = totp_rs::Totp::from_url(&e.otpauth_uri).unwrap();
    note_secret(&totp.secret().to_base32());
    totp
}

/// The code for the current time step (`offset` steps away).
pub fn totp_code(totp: &totp_rs::Totp, offset: i64) -> String {
    totp.generate((unix_now() + 30 * offset) as u64).to_string()
}

/// Expects the approval gate's refusal with `reason`, and no signature in it.
pub fn assert_denied(r: &sealgate::protocol::Response, reason: &str, what: &str) {
    assert_eq!(
        (r.status, r.reason.as_str()),
        (sealgate::protocol::Status::ApprovalDenied as i32, reason),
        "{what}: {}",
        r.message
    );
    assert!(r.body.is_none(), "{what}: a refusal carries no signature");
}

/// Stamps `digest` with `seal` under a fresh approval and expects success.
pub async fn stamp_ok(
    c: &mut sealgate::protocol::client::Client,
    seal: &str,
    digest: &[u8],
) -> sealgate::protocol::pb::StampResponse {
    let r = c
        .stamp(seal, digest, &token_for(seal, digest), "")
        .await
        .unwrap();
    assert_eq!(
        r.status,
        sealgate::protocol::Status::Ok as i32,
        "stamp with {seal}: {} {}",
        r.reason,
        r.message
    );
    match r.body {
        Some(sealgate::protocol::response::Body::Stamp(s)) => s,
        other => panic!("a stamp reply without a stamp: {other:?}"),
    }
}

/// Stamps new documents with the contract seal until one is refused (a full disk, say);
/// returns how many went through, and the refusal.
pub async fn stamp_until_refused(
    c: &mut sealgate::protocol::client::Client,
) -> (usize, sealgate::protocol::Response) {
    for i in 0..5000u32 {
        let digest = sha256(format!("until refused {i}").as_bytes());
        let r = c
            .stamp("contract", &digest, &token_for("contract", &digest), "")
            .await
            .unwrap();
        if r.status != sealgate::protocol::Status::Ok as i32 {
            return (i as usize, r);
        }
    }
    panic!("5000 stamps and none refused");
}

/// Runs SQL on a database with the `sqlite3` shell (another process, so it reads and writes the
/// file as an outsider would); what it printed.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The one number an SQL query prints, by the `sqlite3` shell.
pub fn sqlite3_value(db: &Path, sql: &str) -> u64 {
    sqlite3(db, sql).trim().parse().unwrap()
}

/// The lines a child process prints on its standard output, collected as they come.
#[derive(Clone)]
pub struct Printed(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Printed {
    /// Starts collecting `out` on a thread of its own.
    pub fn collect(out: impl std::io::Read + Send + 'static) -> Printed {
        use std::io::BufRead;
        let p = Printed(Default::default());
        let sink = p.0.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        p
    }

    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Lines starting with `prefix` so far.
    pub fn count(&self, prefix: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Waits until `n` lines starting with `prefix` have been printed (within `limit`).
    #[track_caller]
    pub fn wait_for(&self, prefix: &str, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count(prefix) < n {
            assert!(
                Instant::now() < deadline,
                "never printed {n} x {prefix:?}: {:?}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A small tmpfs (mode 0700) mounted at a new folder for the length of a test, so that the
/// daemon's state can run out of space. Needs root.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir(path).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount tmpfs");
        Tmpfs(path.to_owned())
    }

    /// Fills the file system but for `leave` bytes; returns the filler file (a new one each
    /// call).
    pub fn fill(&self, leave: u64) -> PathBuf {
        let s = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let free = s.blocks_available() as u64 * s.fragment_size() as u64;
        let n = (0..)
            .find(|n| !self.0.join(format!("filler-{n}")).exists())
            .unwrap();
        let filler = self.0.join(format!("filler-{n}"));
        // In pieces, looking again before each: a daemon may be writing meanwhile.
        let mut out = std::fs::File::create(&filler).unwrap();
        let mut free = free;
        while free > leave {
            let piece = vec![0u8; (free - leave).min(1 << 20) as usize];
            match std::io::Write::write_all(&mut out, &piece) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
            let s = nix::sys::statvfs::statvfs(&self.0).unwrap();
            free = s.blocks_available() as u64 * s.fragment_size() as u64;
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every record of the log at `db` (of one kind, when given), in order.
pub fn records(db: &Path, kind: Option<&str>) -> Vec<sealgate::audit::Record> {
    use sealgate::audit::query;
    let conn = query::open_read_only(db).unwrap();
    let mut out = Vec::new();
    let filter = query::Filter {
        kind: kind.map(String::from),
        ..Default::default()
    };
    query::for_each(&conn, &filter, |r| {
        out.push(r);
        Ok(())
    })
    .unwrap();
    out
}

/// Uses the ledger counts for an approval.
pub fn uses_consumed(db: &Path, jti: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT uses_consumed FROM approvals WHERE jti = ?1",
        [jti],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

/// Whether a process ended by `abort()`, as a crash point ends the daemon.
pub fn aborted(status: ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(nix::sys::signal::Signal::SIGABRT as i32)
}

/// Every authorisation has exactly one outcome, and each outcome names an authorisation.
pub fn every_authorisation_has_one_outcome(db: &Path) {
    let all = records(db, None);
    let mut outcomes = std::collections::HashMap::new();
    for r in &all {
        if matches!(
            r.kind.as_str(),
            "stamp.completed" | "stamp.failed" | "stamp.outcome_unknown"
        ) {
            let auth = r.ref_seq.expect("an outcome names its authorisation");
            assert_eq!(all[auth as usize - 1].kind, "stamp.authorized");
            *outcomes.entry(auth).or_insert(0) += 1;
        }
    }
    for r in all.iter().filter(|r| r.kind == "stamp.authorized") {
        assert_eq!(
            outcomes.get(&r.seq),
            Some(&1),
            "authorisation {} has no single outcome",
            r.seq
        );
    }
}

/// The device signature a `stamp.completed` record holds.
pub fn evidence_signature(r: &sealgate::audit::Record) -> Vec<u8> {
    use base64::Engine;
    let e: serde_json::Value = serde_json::from_str(&r.evidence).unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(e["signature"].as_str().unwrap())
        .unwrap()
}

/// Each stamp a client received is in the log as completed, with the signature it got; the
/// completed records by approval id.
pub fn every_seen_stamp_is_completed(
    db: &Path,
    seen: &[(String, Vec<u8>)],
) -> std::collections::HashMap<String, sealgate::audit::Record> {
    let completed: std::collections::HashMap<String, sealgate::audit::Record> =
        records(db, Some("stamp.completed"))
            .into_iter()
            .map(|r| (r.jti.clone(), r))
            .collect();
    for (jti, signature) in seen {
        let r = completed
            .get(jti)
            .unwrap_or_else(|| panic!("stamp {jti} succeeded but is not in the log"));
        assert_eq!(&evidence_signature(r), signature);
    }
    completed
}

/// (approval id, signature) of each stamp a client received.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Clients stamping single-use approvals in a loop, reconnecting whenever the daemon goes away,
/// each remembering the stamps it received.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: Received,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(socket: &Path, clients: u64) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen: Received = Default::default();
        let nonce = std::process::id() as u64 * 1_000_003 + clients;
        let clients = (0..clients)
            .map(|n| {
                let (socket, stop, seen) = (socket.to_owned(), stop.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut c) = sealgate::protocol::client::Client::connect(&socket).await
                        else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        while !stop.load(Ordering::Relaxed) {
                            i += 1;
                            let digest =
                                sha256(format!("load {nonce} client {n} document {i}").as_bytes());
                            let a = Approval::for_seal("contract", &digest);
                            let Ok(r) = c.stamp("contract", &digest, &a.token(), "").await else {
                                break;
                            };
                            if let Some(sealgate::protocol::response::Body::Stamp(s)) = r.body {
                                seen.lock()
                                    .unwrap()
                                    .push((a.claims.jti.clone(), s.signature));
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            seen,
            clients,
        }
    }

    /// Stamps received so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Stops the clients; the stamps they received.
    pub async fn finish(self) -> Vec<(String, Vec<u8>)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Polls the daemon's status until device `id` satisfies `done` (at most 20 s).
pub async fn wait_device_until(
    d: &Daemon,
    id: &str,
    done: impl Fn(&sealgate::protocol::pb::DeviceReport) -> bool,
) -> sealgate::protocol::pb::DeviceReport {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = d.client().await;
    loop {
        let r = c.status().await.unwrap();
        let Some(sealgate::protocol::response::Body::StatusReport(st)) = r.body else {
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

/// Polls the status until device `id` reports `want`.
pub async fn wait_device(
    d: &Daemon,
    id: &str,
    want: sealgate::protocol::pb::DeviceStatus,
) -> sealgate::protocol::pb::DeviceReport {
    wait_device_until(d, id, |dev| dev.status == want as i32).await
}

/// GET `path` from 127.0.0.1:`port`: the response head and body.
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// The value of the sample `name` with these labels in a scrape.
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

/// A two-page PDF whose first page shows `title` (for `sealctl pdf prepare`).
pub fn contract_pdf(title: &str) -> Vec<u8> {
    let content = format!("BT /F1 20 Tf 72 760 Td ({title}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 2 /MediaBox [0 0 595 842] >>".into(),
        "<< /Type /Page /Parent 2 0 R /Contents 4 0 R /Resources << /Font << /F1 6 0 R >> >> >>"
            .into(),
        format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ),
        "<< /Type /Page /Parent 2 0 R >>".into(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".into(),
    ];
    let mut out = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{o}\nendobj\n", i + 1).into_bytes());
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).into_bytes());
    for o in offsets {
        out.extend(format!("{o:010} 00000 n \n").into_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .into_bytes(),
    );
    out
}
