//! `make install` puts everything where the units and the default configuration expect it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[test]
fn make_install_lays_out_a_package() {
    let root = tempfile::tempdir().unwrap();
    let build_dir = Path::new(common::SEALGATED).parent().unwrap();
    let out = std::process::Command::new("make")
        .args(["-s", "install"])
        .arg(format!("DESTDIR={}", root.path().display()))
        .arg(format!("BUILD_DIR={}", build_dir.display()))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("make (Debian package make)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &str| {
        std::fs::metadata(root.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/bin/sealgated"), 0o755);
    assert_eq!(mode("usr/bin/sealctl"), 0o755);
    assert_eq!(mode("usr/bin/sealgate-hq"), 0o755);
    assert_eq!(mode("lib/systemd/system/sealgate-hq.service"), 0o644);
    assert_eq!(mode("lib/systemd/system/sealgate-ship.service"), 0o644);
    assert_eq!(mode("lib/systemd/system/sealgate-notify.service"), 0o644);
    assert_eq!(mode("usr/bin/sealgate-console"), 0o755);
    assert_eq!(mode("lib/systemd/system/sealgate-console.service"), 0o644);
    assert_eq!(mode("usr/share/doc/sealgate/console.md"), 0o644);
    assert_eq!(mode("usr/share/doc/sealgate/headquarters.md"), 0o644);
    assert_eq!(mode("usr/share/doc/sealgate/passkeys.md"), 0o644);
    assert_eq!(mode("usr/share/doc/sealgate/approvals.md"), 0o644);
    assert_eq!(
        mode("usr/share/sealgate/device-profiles/softhsm2.toml"),
        0o644
    );
    assert_eq!(mode("lib/systemd/system/sealgated.service"), 0o644);
    assert_eq!(mode("lib/systemd/system/sealgated.socket"), 0o644);
    assert_eq!(mode("usr/share/doc/sealgate/audit-log.md"), 0o644);
    assert_eq!(
        mode("usr/share/sealgate/proto/sealgate/v1/sealgate.proto"),
        0o644
    );
    assert_eq!(mode("etc/sealgate"), 0o750);
    // The installed daemon is the one just built, and it runs.
    let v = std::process::Command::new(root.path().join("usr/bin/sealgated"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("sealgated "));
}

/// The demo's office app and its administrator are different callers: set up by an ordinary
/// user, the office app (that user) may stamp but not enroll TOTP or write the console's
/// records, and root administers.
#[test]
fn the_demo_keeps_the_office_app_and_the_administrator_apart() {
    use std::os::unix::process::CommandExt;
    let (uid, text) = if nix::unistd::geteuid().is_root() {
        // Run the set-up as another user, in a folder of its own.
        let dir = tempfile::tempdir().unwrap();
        let demo = dir.path().join("demo");
        std::fs::create_dir(&demo).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&demo, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
        let out = common::setup_command(&demo)
            .env("HOME", &demo)
            .uid(4242)
            .gid(4242)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            4242,
            std::fs::read_to_string(demo.join("sealgate.toml")).unwrap(),
        )
    } else {
        let uid = nix::unistd::getuid().as_raw();
        (
            uid,
            std::fs::read_to_string(common::demo().dir.join("sealgate.toml")).unwrap(),
        )
    };
    let config: toml::Value = toml::from_str(&text).unwrap();
    let callers = config["caller"].as_array().unwrap();
    let office = callers
        .iter()
        .find(|c| c["name"].as_str() == Some("demo-office-app"))
        .unwrap();
    let admin = callers
        .iter()
        .find(|c| c["name"].as_str() == Some("demo-admin"))
        .unwrap();
    assert_eq!(
        office["uids"].as_array().unwrap()[0].as_integer(),
        Some(uid as i64)
    );
    assert_eq!(office["admin"].as_bool(), Some(false));
    assert!(!office["seals"].as_array().unwrap().is_empty());
    assert_eq!(admin["uids"].as_array().unwrap()[0].as_integer(), Some(0));
    assert_eq!(admin["admin"].as_bool(), Some(true));
    assert!(admin["seals"].as_array().unwrap().is_empty());
    // Only the administrator (root, which runs the demo's console) records auditors' actions.
    assert_eq!(office["oversight"].as_bool(), Some(false));
    assert_eq!(admin["oversight"].as_bool(), Some(true));
}
