//! Start-up is all or nothing: each broken setting ends the daemon with one line on stderr naming
//! the problem, a non-zero exit, and no socket left behind.

mod common;

use common::*;

/// Runs the daemon on `config` and checks it fails with one line containing every `expect`.
fn fails_with(config: &str, expect: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = config.replace("@SOCKET@", &dir.path().join("s.sock").display().to_string());
    let (status, stderr) = run_to_exit(dir.path(), &config);
    assert!(!status.success(), "daemon started on a broken config");
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("sealgated: "), "{stderr}");
    for e in expect {
        assert!(lines[0].contains(e), "{e:?} not in: {stderr}");
    }
    assert!(!dir.path().join("s.sock").exists(), "socket created");
}

fn base() -> String {
    config_text(demo(), std::path::Path::new("@SOCKET@"), &Opts::default())
}

#[test]
fn missing_module() {
    let c = base().replace(
        "profile = \"softhsm2\"",
        "profile = \"softhsm2\"\nmodule = \"/nonexistent/libnothing.so\"",
    );
    fails_with(
        &c,
        &[
            "demo-hsm",
            "cannot load PKCS#11 module /nonexistent/libnothing.so",
        ],
    );
}

#[test]
fn missing_token() {
    let c = base().replace(
        "token_label = \"sealgate-demo\"",
        "token_label = \"no-such-token\"",
    );
    fails_with(
        &c,
        &["token \"no-such-token\" is not present", "sealgate-demo"],
    );
}

#[test]
fn wrong_pin_is_tried_once_and_a_low_count_is_never_spent() {
    let (label, right) = ("pin-test", "11223344");
    own_token(label, right);
    let dir = tempfile::tempdir().unwrap();

    // A wrong PIN: refused, named, and not tried again.
    let (status, stderr) =
        run_to_exit(dir.path(), &own_token_config(dir.path(), label, "99999999"));
    assert!(!status.success());
    assert!(stderr.contains("refused the PIN (wrong PIN)"), "{stderr}");
    assert!(!stderr.contains("99999999"), "the PIN leaked: {stderr}");

    // The token now reports its PIN count low: even the right PIN is not tried automatically.
    let (status, stderr) = run_to_exit(dir.path(), &own_token_config(dir.path(), label, right));
    assert!(!status.success());
    assert!(stderr.contains("few PIN tries left"), "{stderr}");

    // An operator logs in once by hand; the count resets and the daemon starts.
    assert!(token_login(label, right));
    let dir2 = tempfile::tempdir().unwrap();
    let text = own_token_config(dir2.path(), label, right);
    let d = Daemon::start_with(dir2, &text, &[]).expect("starts with the right PIN");
    assert!(d.stop().success());
}

#[test]
fn missing_pin_file() {
    let c = base().replace(&demo().pin_file().display().to_string(), "/nonexistent/pin");
    fails_with(&c, &["PIN for device demo-hsm", "/nonexistent/pin"]);
}

#[test]
fn missing_key() {
    let c = base().replace(
        "key_label = \"finance-seal\"",
        "key_label = \"no-such-key\"",
    );
    fails_with(&c, &["no private key with label \"no-such-key\""]);
}

#[test]
fn key_type_and_algorithm_disagree() {
    let c = base().replace(
        "key_label = \"finance-seal\"\nalgorithm = \"ed25519\"",
        "key_label = \"finance-seal\"\nalgorithm = \"rsa-pss-sha256\"",
    );
    fails_with(&c, &["cannot sign rsa-pss-sha256"]);
}

#[test]
fn unknown_profile() {
    let c = base().replace("profile = \"softhsm2\"", "profile = \"no-such-model\"");
    fails_with(&c, &["no-such-model.toml"]);
}

#[test]
fn malformed_config() {
    fails_with("[daemon\nsocket = ", &["is not a valid configuration"]);
    let c = base().replace("[daemon]", "[daemon]\ncolour = \"red\"");
    fails_with(&c, &["colour"]);
}

#[test]
fn refuses_root_unless_allowed() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: the refusal to run as root cannot be observed here");
        return;
    }
    let c = base().replace("allow_root = true", "allow_root = false");
    fails_with(&c, &["refusing to run as root", "allow_root"]);
}

#[test]
fn socket_path_that_is_a_file_or_in_use_is_refused_and_a_stale_one_replaced() {
    // A regular file where the socket should go is never removed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    std::fs::write(&path, "keep me").unwrap();
    let c = base().replace("@SOCKET@", &path.display().to_string());
    let (status, stderr) = run_to_exit(dir.path(), &c);
    assert!(!status.success());
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");

    // A live daemon's socket is not taken over.
    let live = Daemon::start(&Opts::default());
    let c = base().replace("@SOCKET@", &live.socket.display().to_string());
    let (status, stderr) = run_to_exit(dir.path(), &c);
    assert!(!status.success());
    assert!(stderr.contains("another process is listening"), "{stderr}");
    drop(live);

    // A stale socket file (nobody listening) is replaced.
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("sealgated.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let text = config_text(demo(), &stale, &Opts::default());
    let d = Daemon::start_with(dir, &text, &[]).expect("starts over a stale socket");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert!(d.stop().success());
}

#[test]
fn pin_from_a_systemd_credential_and_socket_group() {
    let creds = tempfile::tempdir().unwrap();
    std::fs::copy(demo().pin_file(), creds.path().join("token-pin")).unwrap();
    let group = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .expect("Debian has a nogroup group");
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &Opts::default())
        .replace(
            &format!("pin_file = \"{}\"", demo().pin_file().display()),
            "pin_credential = \"token-pin\"",
        )
        .replace("[daemon]", "[daemon]\nsocket_group = \"nogroup\"");
    assert!(text.contains("pin_credential"));
    let creds_dir = creds.path().display().to_string();
    let d = Daemon::start_with(dir, &text, &[("CREDENTIALS_DIRECTORY", &creds_dir)])
        .unwrap_or_else(|f| panic!("{f:?}"));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.gid(), group.gid.as_raw());
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert!(d.stop().success());

    // Without $CREDENTIALS_DIRECTORY the credential cannot be found, and the daemon says so.
    let dir = tempfile::tempdir().unwrap();
    let text = text.replace(
        &creds_dir, "unused", // the socket path line is the only other path; keep it
    );
    let (status, stderr) = run_to_exit(dir.path(), &text);
    assert!(!status.success());
    assert!(stderr.contains("$CREDENTIALS_DIRECTORY is not"), "{stderr}");
}

#[test]
fn setup_script_run_twice_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = || {
        let out = setup_command(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let snapshot = || {
        let out = std::process::Command::new("bash")
            .arg("-c")
            // SoftHSM rewrites its own token record (token.object) at every login; the keys,
            // certificates and every file the script writes are compared.
            .arg("find . -type f ! -name token.object -print0 | sort -z | xargs -0 sha256sum")
            .current_dir(dir.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(setup().contains("generating"));
    let before = snapshot();
    assert!(before.contains("./sealgate.toml") && before.contains("./user.pin"));
    let said = setup();
    assert!(
        !said.contains("generating") && !said.contains("creating"),
        "{said}"
    );
    assert_eq!(before, snapshot());
}

#[test]
fn check_mode_opens_everything_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let config = dir.path().join("sealgate.toml");
    std::fs::write(&config, config_text(demo(), &socket, &Opts::default())).unwrap();
    let out = std::process::Command::new(SEALGATED)
        .arg("--check")
        .arg("--config")
        .arg(&config)
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("is valid; 1 device(s) and 4 seal(s) ready"),
        "{said}"
    );
    assert!(!socket.exists(), "--check must not serve");
    // The test policy's contracts fall from "large contracts" to "contracts" without an
    // amount: --check warns of it (and only of it).
    let warned = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = warned.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{warned}");
    assert!(
        warnings[0].contains("\"large contracts\" to rule \"contracts\"")
            && warnings[0].contains("amount_required"),
        "{warned}"
    );
    // With amount_required set, there is nothing to warn of.
    let strict = config_text(demo(), &socket, &Opts::default()).replace(
        "amount_min = 10000000\n",
        "amount_min = 10000000\namount_required = true\n",
    );
    std::fs::write(&config, strict).unwrap();
    let out = std::process::Command::new(SEALGATED)
        .arg("--check")
        .arg("--config")
        .arg(&config)
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A broken policy is found by --check too.
    let broken = config_text(demo(), &socket, &Opts::default())
        .replace("levels = [\"finance\"]", "levels = []");
    std::fs::write(&config, broken).unwrap();
    let out = std::process::Command::new(SEALGATED)
        .arg("--check")
        .arg("--config")
        .arg(&config)
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least one approval level"));
}

/// Files others could change (the configuration, the state directory) or read (a PIN file) stop
/// the start, naming the file and its mode.
#[test]
fn files_others_could_change_or_read_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    // The configuration: run_to_exit writes it, so make it group-writable through the umask.
    let dir = tempfile::tempdir().unwrap();
    let config = base().replace("@SOCKET@", &dir.path().join("s.sock").display().to_string());
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
    let path = dir.path().join("sealgate.toml");
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, &config).unwrap();
    nix::sys::stat::umask(old);
    chmod(&path, 0o664);
    let (status, stderr) = run_to_exit_keeping_mode(&path);
    assert!(!status.success());
    assert!(
        stderr.contains("the configuration") && stderr.contains("mode 0664"),
        "{stderr}"
    );
    // A PIN file readable by anyone.
    let pins = tempfile::tempdir().unwrap();
    let pin = pins.path().join("pin");
    std::fs::copy(demo().pin_file(), &pin).unwrap();
    chmod(&pin, 0o644);
    let c = base().replace(
        &demo().pin_file().display().to_string(),
        &pin.display().to_string(),
    );
    fails_with(
        &c,
        &["PIN file of device \"demo-hsm\"", "mode 0644", "read by"],
    );
    // A state directory anyone may write to.
    let state = tempfile::tempdir().unwrap();
    chmod(state.path(), 0o777);
    let c = base();
    let line = c.lines().find(|l| l.starts_with("state_dir")).unwrap();
    let c = c.replace(line, &format!("state_dir = \"{}\"", state.path().display()));
    fails_with(&c, &["the state directory", "mode 0777"]);
    // The same PIN file at 0640 (its group may read it) is accepted.
    chmod(&pin, 0o640);
    let c = base().replace(
        &demo().pin_file().display().to_string(),
        &pin.display().to_string(),
    );
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sealgated.sock");
    let c = c.replace("@SOCKET@", &socket.display().to_string());
    let d = Daemon::start_with(dir, &c, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    d.stop();
}

/// Runs sealgated on an existing configuration file, as it is.
fn run_to_exit_keeping_mode(config: &std::path::Path) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sealgated"))
        .arg("--config")
        .arg(config)
        .env("SOFTHSM2_CONF", demo().softhsm_conf())
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lifts the core size limit of `pid` (`prlimit`, util-linux) and sends it SIGABRT, whose
/// default action dumps core.
fn abort_with_cores_allowed(pid: u32) {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--core=unlimited"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGABRT,
    )
    .unwrap();
}

fn cores_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("core"))
        .collect()
}

#[test]
fn a_crash_leaves_no_core_with_secrets_in_it() {
    // The control: an ordinary process, crashed the same way in a folder of its own, leaves a
    // core there. Where the machine sends cores elsewhere (a pipe to a collector) the daemon's
    // absence of a core proves nothing, and this test says so instead.
    let control = tempfile::tempdir().unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .current_dir(control.path())
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    abort_with_cores_allowed(pid);
    sleeper.wait().unwrap();
    if cores_in(control.path()).is_empty() {
        let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default();
        eprintln!(
            "a crashed process leaves no core in its folder here (core_pattern {:?}); not-dumpable not observed",
            pattern.trim()
        );
        return;
    }

    let d = Daemon::start(&Opts::default());
    let dir = d.dir.path().to_owned();
    let pid = d.pid() as u32;
    abort_with_cores_allowed(pid);
    // The daemon is reaped by its Drop; until then it ends as a zombie.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not end"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A core is written before the process becomes a zombie, so it would be there now.
    assert_eq!(
        cores_in(&dir),
        Vec::<String>::new(),
        "the daemon left a core"
    );
    drop(d);
}

/// Every file and folder the daemon trusts is checked for owner and mode, at start-up and at
/// every reload: approvers' keys, device profiles and their folder, the socket's folder, and a
/// configuration made writable after the start.
#[test]
fn every_trusted_file_and_folder_is_checked_at_start_and_at_reload() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let work = tempfile::tempdir().unwrap();
    // An approver's public key its group may change.
    let key = work.path().join("zhang.wei.pub.pem");
    std::fs::copy(demo().dir.join("approvers/zhang.wei.pub.pem"), &key).unwrap();
    chmod(&key, 0o664);
    let c = base().replacen(
        &demo()
            .dir
            .join("approvers/zhang.wei.pub.pem")
            .display()
            .to_string(),
        &key.display().to_string(),
        1,
    );
    fails_with(&c, &["public key of approver \"zhang.wei\"", "mode 0664"]);
    // A profiles folder anyone may write to (a profile there could name any module).
    let profiles = work.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
    std::fs::copy(
        shipped.join("softhsm2.toml"),
        profiles.join("softhsm2.toml"),
    )
    .unwrap();
    chmod(&profiles, 0o777);
    let with_profiles = base().replace(
        &format!("profiles_dir = \"{}\"", shipped.display()),
        &format!("profiles_dir = \"{}\"", profiles.display()),
    );
    fails_with(&with_profiles, &["device profiles' folder", "mode 0777"]);
    chmod(&profiles, 0o755);
    // The profile itself, writable by its group.
    chmod(&profiles.join("softhsm2.toml"), 0o664);
    fails_with(&with_profiles, &["the device profile", "mode 0664"]);
    chmod(&profiles.join("softhsm2.toml"), 0o644);
    // Owned by another user (only root can make such a file).
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            &profiles.join("softhsm2.toml"),
            Some(nix::unistd::Uid::from_raw(4242)),
            None,
        )
        .unwrap();
        fails_with(&with_profiles, &["the device profile", "owned by uid 4242"]);
    }
    // A socket in a folder others may write to (they could put their own socket there).
    let open = work.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let c = base().replace("@SOCKET@", &open.join("s.sock").display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = run_to_exit(dir.path(), &c);
    assert!(!status.success());
    assert!(
        stderr.contains("the folder of the socket") && stderr.contains("mode 0777"),
        "{stderr}"
    );
    // A configuration made writable by others after the start: the reload is refused and the
    // caller it would add is not in force.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sealgated.sock");
    let c = base().replace("@SOCKET@", &socket.display().to_string());
    let d = Daemon::start_with(dir, &c, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let path = d.dir.path().join("sealgate.toml");
    let added =
        format!("{c}\n[[caller]]\nname = \"intruder\"\nuids = [4242]\nseals = [\"contract\"]\n");
    std::fs::write(&path, added).unwrap();
    chmod(&path, 0o666);
    let outcome = d.reload(1);
    assert!(
        outcome.contains("reload refused") && outcome.contains("mode 0666"),
        "{outcome}"
    );
    chmod(&path, 0o644);
    let outcome = d.reload(2);
    assert!(outcome.contains("configuration reloaded"), "{outcome}");
    d.stop();
}

/// A seal image that is too large, or not a PNG, ends the start with the seal and file named;
/// so does a seal asking for timestamps with no authority configured.
#[test]
fn a_bad_seal_image_or_a_timestamp_without_an_authority_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.png");
    std::fs::write(&big, vec![0u8; 1024 * 1024 + 1]).unwrap();
    let not_png = dir.path().join("seal.png");
    std::fs::write(&not_png, b"GIF89a").unwrap();
    let image = demo().dir.join("images/contract.png");
    for (file, says) in [(&big, "at most 1048576"), (&not_png, "not usable")] {
        let c = base().replacen(
            &format!("image = \"{}\"", image.display()),
            &format!("image = \"{}\"", file.display()),
            1,
        );
        fails_with(
            &c,
            &["seal \"contract\"", &file.display().to_string(), says],
        );
    }
    let c = base().replacen(
        &format!("image = \"{}\"", image.display()),
        &format!(
            "image = \"{}\"\ntimestamp = \"best effort\"",
            image.display()
        ),
        1,
    );
    fails_with(&c, &["seal \"contract\"", "no [timestamp] authority"]);
}
