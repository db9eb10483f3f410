//! The alert receivers of tests/python/alert_receivers.py (a webhook checking the HMAC, robot
//! stand-ins checking their signatures, an SMTP server with STARTTLS), run for a test.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A receiver process, killed when dropped.
pub struct Receiver(Child);

impl Receiver {
    pub fn start(args: &[&str]) -> Receiver {
        let python = std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let mut child = Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/alert_receivers.py"
            ))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = super::wait_for_line(&mut child, |l| l == "ready");
        assert!(
            lines.last().is_some_and(|l| l == "ready"),
            "alert_receivers.py {args:?} (needs aiosmtpd): {lines:?}"
        );
        Receiver(child)
    }

    /// The HTTP receivers on `port`, keeping what they take in `out`.
    pub fn http(port: u16, hook_secret: &str, robot_secret: &str, out: &Path) -> Receiver {
        Receiver::start(&[
            "http",
            "--port",
            &port.to_string(),
            "--secret",
            hook_secret,
            "--robot-secret",
            robot_secret,
            "--out",
            &out.display().to_string(),
        ])
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The JSON lines a receiver kept under `name`.
pub fn received(out: &Path, name: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join(format!("{name}.jsonl")))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A secret file (mode 0600) holding `value`; its path.
pub fn secret_file(dir: &Path, name: &str, value: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, value).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

/// Alert seqs in a webhook message.
pub fn seqs(hook: &serde_json::Value) -> Vec<u64> {
    hook["body"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["seq"].as_u64().unwrap())
        .collect()
}
