//! SIGHUP: the daemon re-reads its configuration and puts it in force all or nothing.

mod common;

use common::*;
use sealgate::protocol::Status;

async fn stamp_with(
    c: &mut sealgate::protocol::client::Client,
    seal: &str,
    digest: &[u8],
    signers: &[&str],
) -> sealgate::protocol::Response {
    let mut a = Approval::for_seal(seal, digest);
    a.signers = signers
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), 300 - 60 * i as i64))
        .collect();
    c.stamp(seal, digest, &a.token(), "").await.unwrap()
}

#[tokio::test]
async fn a_new_policy_takes_effect_and_a_broken_file_leaves_it_in_force() {
    let d = Daemon::start(&Opts::default());
    let config_path = d.dir.path().join("sealgate.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();
    let mut c = d.client().await;
    let r = stamp_with(&mut c, "contract", &[1; 32], &["zhang.wei"]).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);

    // Contracts now need an executive too, and the caller loses the finance seal.
    let stricter = original
        .replace(
            "name = \"contracts\"\ndoc_types = [\"contract\"]\nlevels = [\"dept_head\"]",
            "name = \"contracts\"\ndoc_types = [\"contract\"]\nlevels = [\"dept_head\", \"executive\"]",
        )
        .replacen("\"finance\", ", "", 1);
    assert_ne!(stricter, original);
    std::fs::write(&config_path, &stricter).unwrap();
    let line = d.reload(1);
    assert!(line.contains("configuration reloaded"), "{line}");
    // systemd is told: reloading (with the monotonic time it asks for), then ready again.
    let told = d.notifications_until("READY=1");
    let reloading = told
        .iter()
        .position(|l| l == "RELOADING=1")
        .expect("RELOADING=1");
    assert!(reloading < told.len() - 1, "{told:?}");
    assert!(
        told.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{told:?}"
    );
    let r = stamp_with(&mut c, "contract", &[2; 32], &["zhang.wei"]).await;
    assert_eq!(r.status, Status::ApprovalDenied as i32);
    assert_eq!(r.reason, "missing_level");
    let r = stamp_with(&mut c, "contract", &[2; 32], &["zhang.wei", "li.na"]).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    // Callers are looked up when a connection opens.
    let mut fresh = d.client().await;
    let r = stamp_with(&mut fresh, "finance", &[3; 32], &["wang.fang"]).await;
    assert_eq!(r.status, Status::PermissionDenied as i32, "{}", r.message);

    // A broken file is refused; the policy in force stays.
    std::fs::write(&config_path, format!("{stricter}\nthis is [not toml\n")).unwrap();
    let line = d.reload(2);
    assert!(line.contains("reload refused"), "{line}");
    let r = stamp_with(&mut c, "contract", &[4; 32], &["zhang.wei"]).await;
    assert_eq!(r.reason, "missing_level");

    // So is a change only a restart can make, and a policy that does not hold together.
    let other_pin = stricter.replace("max_failures = 3", "max_failures = 4");
    std::fs::write(&config_path, other_pin).unwrap();
    let line = d.reload(3);
    assert!(line.contains("take a restart"), "{line}");
    let no_levels = stricter.replace("levels = [\"dept_head\", \"executive\"]", "levels = []");
    std::fs::write(&config_path, no_levels).unwrap();
    let line = d.reload(4);
    assert!(line.contains("reload refused"), "{line}");
    let r = stamp_with(&mut c, "contract", &[5; 32], &["zhang.wei", "li.na"]).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);

    // And the original file, once more, loosens it again.
    std::fs::write(&config_path, &original).unwrap();
    assert!(d.reload(5).contains("configuration reloaded"));
    let r = stamp_with(&mut c, "contract", &[6; 32], &["zhang.wei"]).await;
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    assert!(d.stop().success());
}

#[tokio::test]
async fn a_changed_device_profile_takes_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let profiles = dir.path().join("profiles");
    std::fs::create_dir(&profiles).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
    std::fs::copy(
        shipped.join("softhsm2.toml"),
        profiles.join("softhsm2.toml"),
    )
    .unwrap();
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &Opts::default()).replace(
        &shipped.display().to_string(),
        &profiles.display().to_string(),
    );
    let d = Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("{f:?}"));
    let profile = profiles.join("softhsm2.toml");
    let edited = std::fs::read_to_string(&profile)
        .unwrap()
        .replace("sessions = 2", "sessions = 4");
    std::fs::write(&profile, edited).unwrap();
    let line = d.reload(1);
    assert!(line.contains("profile changes take a restart"), "{line}");
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &[1; 32]).await;
    assert!(d.stop().success());
}
