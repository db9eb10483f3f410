//! Alert delivery (`sealctl notify`) against real receivers: a webhook that checks the HMAC,
//! stand-ins for the WeCom, DingTalk and Feishu robots that check their signatures, and an SMTP
//! server (Python's aiosmtpd) that requires STARTTLS and a login; all in
//! tests/python/alert_receivers.py. The alerts are the real daemon's, on SoftHSM.

mod common;

use common::postgres::free_port;
use common::receivers::{received, secret_file, seqs, Receiver};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_reaches_every_channel_once_even_after_a_receiver_was_down() {
    // off_hours on every stamp (no working time is ever now), restamp on a second approval.
    let d = Daemon::start(&Opts {
        alerts: "working_days = []\n".into(),
        ..Opts::default()
    });
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let out = w.join("received");
    std::fs::create_dir(&out).unwrap();
    let hook_secret = secret_file(w, "hook.secret", "a webhook key of the site's own");
    let robot_secret = secret_file(w, "robot.secret", "SECabc123robot");
    let smtp_password = secret_file(w, "smtp.password", "mail-pass");
    let pki = pki::Pki::new(w);
    let (http, smtp) = (free_port(), free_port());
    let out_s = out.display().to_string();
    let _mail = Receiver::start(&[
        "smtp",
        "--port",
        &smtp.to_string(),
        "--cert",
        &pki.path("server.crt"),
        "--key",
        &pki.path("server.key"),
        "--user",
        "sealgate",
        "--password",
        "mail-pass",
        "--out",
        &out_s,
    ]);
    let config = w.join("notify.toml");
    std::fs::write(
        &config,
        format!(
            r#"
site = "shanghai"
db = "{db}"
outbox = "outbox.db"
from_beginning = true

[[channel]]
id = "keeper-hook"
kind = "webhook"
url = "http://127.0.0.1:{http}/hook"
secret_file = "{hook_secret}"

[[channel]]
id = "wecom"
kind = "wecom"
url = "http://127.0.0.1:{http}/wecom?key=wecom-key"

[[channel]]
id = "dingtalk"
kind = "dingtalk"
url = "http://127.0.0.1:{http}/dingtalk?access_token=t0k"
secret_file = "{robot_secret}"

[[channel]]
id = "feishu"
kind = "feishu"
url = "http://127.0.0.1:{http}/feishu"
secret_file = "{robot_secret}"

[[channel]]
id = "risk-mail"
kind = "email"
smtp = "localhost:{smtp}"
from = "sealgate@site.example"
to = ["risk@hq.example", "keeper@site.example"]
username = "sealgate"
password_file = "{smtp_password}"
ca_file = "{ca}"

[[route]]
rules = ["restamp"]
channels = ["keeper-hook", "wecom", "dingtalk", "feishu", "risk-mail"]

[[route]]
rules = ["off_hours"]
channels = ["keeper-hook"]
digest_seconds = 3
"#,
            db = d.db().display(),
            ca = pki.path("ca.crt"),
        ),
    )
    .unwrap();
    // The shipper's way: a process of its own, following the log.
    let mut notify = Command::new(SEALCTL)
        .args(["notify", "--follow", "--interval-ms", "200", "--config"])
        .arg(&config)
        .env("SEALGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Printed::collect(notify.stderr.take().unwrap());

    // The HTTP receivers are down: a document stamped twice under two approvals.
    let mut c = d.client().await;
    let doc = sha256(b"a contract stamped twice");
    stamp_ok(&mut c, "contract", &doc).await;
    stamp_ok(&mut c, "contract", &doc).await;
    let alerts = |rule: &str| {
        sqlite3(
            &d.db(),
            &format!(
                "SELECT seq FROM audit WHERE kind = 'alert' AND reason = '{rule}' ORDER BY seq"
            ),
        )
        .lines()
        .map(|l| l.trim().parse::<u64>().unwrap())
        .collect::<Vec<_>>()
    };
    wait_until("the alerts", Duration::from_secs(10), || {
        alerts("restamp").len() == 1 && alerts("off_hours").len() == 2
    });
    // Mail goes out at once; the webhook and the robots fail and wait.
    wait_until("the mail", Duration::from_secs(20), || {
        received(&out, "mail").len() == 1
    });
    wait_until("failed deliveries", Duration::from_secs(20), || {
        log.all()
            .iter()
            .any(|l| l.contains("alert delivery failed"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let _http = Receiver::http(http, &hook_secret, &robot_secret, &out);
    let restamp = alerts("restamp")[0];
    let off = alerts("off_hours");
    wait_until(
        "every alert at every channel",
        Duration::from_secs(60),
        || {
            let hooks = received(&out, "hook");
            let got: Vec<u64> = hooks.iter().flat_map(seqs).collect();
            got.contains(&restamp)
                && off.iter().all(|s| got.contains(s))
                && ["wecom", "dingtalk", "feishu"]
                    .iter()
                    .all(|r| !received(&out, r).is_empty())
        },
    );
    // A pass more, and another process reading the same outbox later, send nothing again.
    std::thread::sleep(Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(notify.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(notify.wait().unwrap().success(), "{:?}", log.all());
    let again = Command::new(SEALCTL)
        .args(["--json", "notify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(again.status.success(), "{again:?}");
    let pass: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (&pass["queued"], &pass["sent"], &pass["failing"]),
        (&0.into(), &0.into(), &0.into()),
        "{pass}"
    );

    // A new outbox starts at the log's head: what was raised before is not sent again.
    let fresh = w.join("fresh.toml");
    std::fs::write(
        &fresh,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("outbox = \"outbox.db\"", "outbox = \"fresh-outbox.db\"")
            .replace("from_beginning = true\n", ""),
    )
    .unwrap();
    let first = Command::new(SEALCTL)
        .args(["--json", "notify", "--config"])
        .arg(&fresh)
        .output()
        .unwrap();
    let pass: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(
        (&pass["queued"], &pass["sent"]),
        (&0.into(), &0.into()),
        "{pass}"
    );

    // Exactly once: each alert in one webhook message, one message per robot, one mail.
    let hooks = received(&out, "hook");
    let mut got: Vec<u64> = hooks.iter().flat_map(seqs).collect();
    got.sort();
    let mut want = off.clone();
    want.push(restamp);
    want.sort();
    assert_eq!(got, want, "{hooks:?}");
    let deliveries: std::collections::HashSet<_> =
        hooks.iter().map(|h| h["delivery"].to_string()).collect();
    assert_eq!(deliveries.len(), hooks.len(), "one delivery id each");
    // The two off_hours alerts of one 3-second window came as one digest.
    let digest = hooks.iter().find(|h| seqs(h).contains(&off[0])).unwrap();
    assert!(
        digest["body"]["digest_until_ms"].as_i64().is_some(),
        "{digest}"
    );
    assert_eq!(digest["body"]["site"], "shanghai");
    for robot in ["wecom", "dingtalk", "feishu"] {
        let got = received(&out, robot);
        assert_eq!(got.len(), 1, "{robot}: {got:?}");
        let text = got[0]["text"]["content"]
            .as_str()
            .or(got[0]["content"]["text"].as_str())
            .unwrap();
        assert!(
            text.contains("restamp") && text.contains("shanghai"),
            "{robot}: {text}"
        );
    }
    assert!(
        received(&out, "refused").is_empty(),
        "every signature held: {:?}",
        received(&out, "refused")
    );
    let mail = received(&out, "mail");
    assert_eq!(mail.len(), 1);
    assert_eq!(mail[0]["tls"], true, "STARTTLS before the message");
    assert_eq!(
        mail[0]["to"],
        serde_json::json!(["risk@hq.example", "keeper@site.example"])
    );
    let data = mail[0]["data"].as_str().unwrap();
    assert!(
        data.contains("Subject: sealgate shanghai: restamp"),
        "{data}"
    );
    // No secret in what the notifier said.
    let said = log.all().join("\n");
    for s in ["a webhook key", "SECabc123robot", "mail-pass"] {
        assert!(!said.contains(s), "{s} in the log");
    }
}

#[test]
fn a_notify_configuration_is_checked_before_anything_is_sent() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("notify.toml");
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let out = Command::new(SEALCTL)
            .args(["notify", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = "db = \"x.db\"\noutbox = \"o.db\"\n";
    let (ok, err) = run(base);
    assert!(!ok && err.contains("no [[route]]"), "{err}");
    let (ok, err) = run(&format!(
        "{base}[[channel]]\nid = \"h\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\n[[route]]\nchannels = [\"h\"]\n"
    ));
    assert!(!ok && err.contains("secret_file"), "{err}");
    let (ok, err) = run(&format!(
        "{base}[[channel]]\nid = \"w\"\nkind = \"wecom\"\nurl = \"http://127.0.0.1:1/\"\n[[route]]\nchannels = [\"nowhere\"]\n"
    ));
    assert!(!ok && err.contains("no channel \"nowhere\""), "{err}");
    let loose = work.path().join("loose.secret");
    std::fs::write(&loose, "k").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, err) = run(&format!(
        "{base}[[channel]]\nid = \"h\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nsecret_file = \"{}\"\n[[route]]\nchannels = [\"h\"]\n",
        loose.display()
    ));
    assert!(!ok && err.contains("readable by others"), "{err}");
}
