//! Headquarters in the tests: `sealgate-hq` nodes on a private PostgreSQL, and sites (each a
//! real sealgated whose audit key lives in a SoftHSM token of its own) with their shippers.

use super::pki::Pki;
use super::postgres::{free_port, Postgres, HQ_ROLE, OWNER};
use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HQ: &str = env!("CARGO_BIN_EXE_sealgate-hq");

/// A site: its daemon, its audit public key (PEM file) and its client certificate's pin.
pub struct Site {
    pub id: String,
    pub daemon: Daemon,
    pub audit_pem: PathBuf,
    pub fingerprint: String,
}

impl Site {
    /// A daemon on the demo seals whose audit key is in token `site-ID` of its own.
    pub fn start(id: &str, pki: &Pki) -> Site {
        Site::start_with_heartbeat(id, pki, 0)
    }

    /// The same, writing `audit.heartbeat` to an idle log every `heartbeat_seconds`.
    pub fn start_with_heartbeat(id: &str, pki: &Pki, heartbeat_seconds: u64) -> Site {
        Site::start_with(id, pki, heartbeat_seconds, "")
    }

    /// The same, with more configuration after the daemon's own.
    pub fn start_with(id: &str, pki: &Pki, heartbeat_seconds: u64, more: &str) -> Site {
        let label = format!("site-{id}");
        let pin = "24681357";
        own_token(&label, pin);
        let dir = tempfile::tempdir().unwrap();
        let pin_file = write_pin_file(&dir.path().join("audit.pin"), pin);
        let socket = dir.path().join("sealgated.sock");
        let opts = Opts {
            extra: format!(
                "\n[[device]]\nid = \"site-audit\"\nprofile = \"softhsm2\"\ntoken_label = \"{label}\"\npin_file = \"{}\"\n{more}",
                pin_file.display()
            ),
            ..Opts::default()
        };
        let text = config_text(demo(), &socket, &opts);
        let demo_audit =
            "[audit]\ndevice = \"demo-hsm\"\nkey_label = \"sealgate-audit\"\nheartbeat_seconds = 0";
        assert!(text.contains(demo_audit));
        let text = text.replace(
            demo_audit,
            &format!("[audit]\ndevice = \"site-audit\"\nkey_label = \"audit\"\nheartbeat_seconds = {heartbeat_seconds}"),
        );
        let daemon =
            Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("site {id}: {f:?}"));
        let spki_hex = sqlite3(&daemon.db(), "SELECT hex(spki) FROM audit_keys");
        let spki = hex::decode(spki_hex.trim()).unwrap();
        let pem =
            pem_rfc7468::encode_string("PUBLIC KEY", pem_rfc7468::LineEnding::LF, &spki).unwrap();
        let audit_pem = daemon.dir.path().join("audit.pub.pem");
        std::fs::write(&audit_pem, pem).unwrap();
        Site {
            id: id.to_owned(),
            daemon,
            audit_pem,
            fingerprint: pki.client(id),
        }
    }

    /// The arguments of `sealctl audit ship` for this site's log (or `db`) to HQ at `addr`,
    /// presenting `cert`'s certificate.
    pub fn ship_args(pki: &Pki, db: &Path, addr: &str, cert: &str) -> Vec<String> {
        [
            "audit",
            "ship",
            "--db",
            &db.display().to_string(),
            "--hq",
            addr,
            "--server-name",
            "localhost",
            "--ca",
            &pki.path("ca.crt"),
            "--cert",
            &pki.path(&format!("{cert}.crt")),
            "--key",
            &pki.path(&format!("{cert}.key")),
            "--interval-ms",
            "100",
            "--max-backoff-ms",
            "500",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Ships this site's log once to `addr`: exit code and what sealctl printed.
    pub fn ship_once(&self, pki: &Pki, addr: &str) -> (i32, String) {
        ship(&Site::ship_args(pki, &self.daemon.db(), addr, &self.id))
    }

    /// A shipper that follows this site's log to `addr` until killed.
    pub fn follow(&self, pki: &Pki, addr: &str) -> Child {
        let mut args = Site::ship_args(pki, &self.daemon.db(), addr, &self.id);
        args.push("--follow".into());
        let log = self
            .daemon
            .dir
            .path()
            .join(format!("ship-{}.log", free_port()));
        Command::new(SEALCTL)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }

    /// The seq and hash (hex) of the site log's newest checkpoint.
    pub fn newest_checkpoint(&self) -> (u64, String) {
        let out = sqlite3(
            &self.daemon.db(),
            "SELECT seq || ' ' || lower(hex(head)) FROM checkpoints ORDER BY seq DESC LIMIT 1",
        );
        let (seq, head) = out.trim().split_once(' ').unwrap();
        (seq.parse().unwrap(), head.to_owned())
    }
}

/// Runs sealctl with these arguments: exit code and stdout + stderr.
pub fn ship(args: &[String]) -> (i32, String) {
    let out = Command::new(SEALCTL).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A `sealgate-hq serve` node on the database, its configuration in DIR/hq-PORT.toml.
pub struct HqNode {
    child: Option<Child>,
    pub addr: String,
    pub config: PathBuf,
    log: PathBuf,
}

/// The HQ configuration for these sites on this database, listening on `port`.
pub fn hq_config(pki: &Pki, pg: &Postgres, port: u16, sites: &[(&str, &str, &Path)]) -> String {
    let mut t = format!(
        r#"
[hq]
listen = "127.0.0.1:{port}"
cert = "{cert}"
key = "{key}"
max_batch_records = 2000
max_frame_bytes = 4194304
idle_timeout_ms = 5000

[database]
url = "{url}"
pool_size = 4
"#,
        cert = pki.path("server.crt"),
        key = pki.path("server.key"),
        url = pg.url(HQ_ROLE),
    );
    for (id, fp, pem) in sites {
        t += &format!(
            "\n[[site]]\nid = \"{id}\"\ncertificate_sha256 = \"{fp}\"\naudit_key = \"{}\"\n",
            pem.display()
        );
    }
    t
}

impl HqNode {
    /// Writes the configuration, migrates the database as its owner (granting HQ's role what
    /// it needs) and starts a node.
    pub fn start(dir: &Path, pg: &Postgres, config_for: impl Fn(u16) -> String) -> HqNode {
        let port = free_port();
        let config = dir.join(format!("hq-{port}.toml"));
        std::fs::write(&config, config_for(port)).unwrap();
        let out = Command::new(HQ)
            .arg("--config")
            .arg(&config)
            .args(["migrate", "--grant", HQ_ROLE, "--url", &pg.url(OWNER)])
            .env("SOFTHSM2_CONF", demo().softhsm_conf())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sealgate-hq migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut node = HqNode {
            child: None,
            addr: format!("127.0.0.1:{port}"),
            log: dir.join(format!("hq-{port}.log")),
            config,
        };
        node.restart();
        node
    }

    /// Starts the node (again), waiting until it accepts connections.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// Waits up to `limit` for the node to end by itself (an armed crash point); whether it
    /// was aborted.
    pub fn wait_aborted(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                self.child = None;
                return aborted(status);
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Starts the node (again) with these environment variables.
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(HQ)
            .arg("--config")
            .arg(&self.config)
            .args(["--log-format", "text", "serve"])
            .env("SOFTHSM2_CONF", demo().softhsm_conf())
            .envs(env.iter().copied())
            .env("SEALGATE_LOG", "info,sealgate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.addr).is_err() {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("sealgate-hq ended ({s}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "sealgate-hq not listening: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// SIGKILL, and wait for the end.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the node is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port the node listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// `sealgate-hq witness-key`: the witness public key, PEM.
    pub fn witness_key(&self) -> String {
        let (code, out) = hq_command(&self.config, &["witness-key"]);
        assert_eq!(code, 0, "sealgate-hq witness-key: {out}");
        out
    }
}

/// A `[witness]` section: HQ's witness key is the P-256 key "audit" of a SoftHSM token of its
/// own, labelled `label` (one per test: the tests of a binary share the SoftHSM), made now (its
/// PIN in DIR/LABEL.pin).
pub fn witness_section(dir: &Path, label: &str) -> String {
    key_section(dir, "witness", label)
}

/// A section (`witness`, `policy`) naming HQ's key as [`witness_section`] does.
pub fn key_section(dir: &Path, section: &str, label: &str) -> String {
    let pin = "13572468";
    own_token(label, pin);
    let pin_file = write_pin_file(&dir.join(format!("{label}.pin")), pin);
    format!(
        "\n[{section}]\nprofiles_dir = \"{}\"\nkey_label = \"audit\"\n\n[{section}.device]\nid = \"hq-{section}\"\nprofile = \"softhsm2\"\ntoken_label = \"{label}\"\npin_file = \"{}\"\n",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("device-profiles")
            .display(),
        pin_file.display()
    )
}

/// Runs `sealgate-hq --config CONFIG ARGS`: exit code and stdout + stderr.
pub fn hq_command(config: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(HQ)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

impl Drop for HqNode {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
        keep_output(&self.log());
    }
}

/// A site's records and checkpoints as HQ's database holds them, read with psql as JSON.
pub fn central_log(
    pg: &Postgres,
    site: &str,
) -> (
    Vec<sealgate::audit::Record>,
    Vec<sealgate::audit::Checkpoint>,
) {
    let records = pg.psql(&format!(
        "SELECT coalesce(json_agg((to_jsonb(r) - 'site' - 'received_at' - 'epoch')
             || jsonb_build_object('prev_hash', encode(prev_hash, 'hex'), 'hash', encode(hash, 'hex'))
             ORDER BY seq), '[]') FROM records r
         WHERE site = '{site}' AND epoch = (SELECT epoch FROM sites WHERE site = '{site}')"
    ));
    let checkpoints = pg.psql(&format!(
        "SELECT coalesce(json_agg((to_jsonb(c) - 'site' - 'received_at' - 'epoch')
             || jsonb_build_object('head', encode(head, 'hex'), 'signature', encode(signature, 'hex'))
             ORDER BY seq), '[]') FROM checkpoints c
         WHERE site = '{site}' AND epoch = (SELECT epoch FROM sites WHERE site = '{site}')"
    ));
    (
        serde_json::from_str(&records).unwrap(),
        serde_json::from_str(&checkpoints).unwrap(),
    )
}

/// Verifies a site's central log with the offline verifier and the site's audit key (from
/// its PEM file), as an auditor at HQ would.
pub fn verify_central(pg: &Postgres, site: &Site) -> sealgate::audit::verify::Report {
    let (records, all) = central_log(pg, &site.id);
    // HQ keeps every checkpoint a site showed it, also a newest one the site replaced later
    // (less than a second after the one before it); the chain runs back from the newest.
    let mut checkpoints = Vec::new();
    let mut next = all.last().map(|c| c.seq);
    while let Some(seq) = next.filter(|s| *s > 0) {
        let c = all
            .iter()
            .find(|c| c.seq == seq)
            .expect("a checkpoint the chain names");
        next = Some(c.prev_seq);
        checkpoints.push(c.clone());
    }
    checkpoints.reverse();
    let pem = std::fs::read_to_string(&site.audit_pem).unwrap();
    let (_, der) = pem_rfc7468::decode_vec(pem.as_bytes()).unwrap();
    let key = sealgate::audit::verify::TrustedKey::from_spki(der).unwrap();
    let mut it = records.into_iter();
    sealgate::audit::verify::verify(
        |r| match it.next() {
            Some(next) => {
                *r = next;
                Ok(true)
            }
            None => Ok(false),
        },
        &checkpoints,
        &[key],
        None,
        |_| {},
    )
    .unwrap()
}

/// HQ's head seq for a site.
pub fn hq_head(pg: &Postgres, site: &str) -> u64 {
    pg.number(&format!("SELECT head_seq FROM sites WHERE site = '{site}'")) as u64
}

/// Waits until HQ's head for the site is the site's newest checkpoint (30 s at most).
pub fn wait_caught_up(pg: &Postgres, site: &Site) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (seq, _) = site.newest_checkpoint();
        let head = hq_head(pg, &site.id);
        if head == seq {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "site {}: HQ's head is {head}, the site's newest checkpoint {seq}",
            site.id
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Central alerts of a site (or a stranger's certificate), as "kind: detail" lines.
pub fn alerts(pg: &Postgres, site_like: &str) -> Vec<String> {
    pg.psql(&format!(
        "SELECT kind || ': ' || detail FROM alerts WHERE site LIKE '{site_like}' ORDER BY id"
    ))
    .lines()
    .map(String::from)
    .collect()
}

impl Site {
    /// A copy of the site's log as of now (sqlite's VACUUM INTO: consistent while it runs).
    pub fn copy_log(&self, to: &Path) -> PathBuf {
        let _ = std::fs::remove_file(to);
        sqlite3(
            &self.daemon.db(),
            &format!("VACUUM INTO '{}'", to.display()),
        );
        to.to_owned()
    }

    /// A copy of the log at `to` with its tail after HQ's `head` cut, together with the
    /// checkpoints that cover it: it keeps what its newest checkpoint before `head` covers.
    /// Returns that checkpoint's seq.
    pub fn copy_cut_before(&self, to: &Path, head: u64) -> u64 {
        let cut = self.copy_log(to);
        let keep: u64 = sqlite3(
            &cut,
            &format!("SELECT max(seq) FROM checkpoints WHERE seq < {head}"),
        )
        .trim()
        .parse()
        .unwrap();
        sqlite3(
            &cut,
            &format!(
                "DELETE FROM audit WHERE seq > {keep}; DELETE FROM checkpoints WHERE seq > {keep};"
            ),
        );
        keep
    }

    /// Another daemon with this site's configuration and audit key, on a copy of its log put
    /// in a new state directory: a site restored from a backup onto another machine.
    pub fn restored_from(&self, backup: &Path) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::copy(backup, dir.path().join("state/sealgate.db")).unwrap();
        let old = self.daemon.dir.path().display().to_string();
        let text = std::fs::read_to_string(self.daemon.dir.path().join("sealgate.toml"))
            .unwrap()
            .replace(&old, &dir.path().display().to_string());
        std::fs::copy(
            self.daemon.dir.path().join("audit.pin"),
            dir.path().join("audit.pin"),
        )
        .unwrap();
        Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("restored site: {f:?}"))
    }
}
