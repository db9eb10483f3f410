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
