//! What an operator watches: Prometheus metrics on loopback, JSON logs with a span per request,
//! and queue depths in the status report.

mod common;

use common::*;
use sealgate::protocol::{response, Status};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn metrics_are_served_on_loopback_and_parse_as_prometheus_text() {
    let port = free_port();
    let d = Daemon::start(&Opts {
        daemon_extra: format!("metrics_listen = \"127.0.0.1:{port}\""),
        ..Opts::default()
    });
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &[1; 32]).await;
    stamp_ok(&mut c, "finance", &[2; 32]).await;
    let r = c
        .stamp("contract", &[3; 32], b"nonsense", "")
        .await
        .unwrap();
    assert_eq!(r.status, Status::ApprovalDenied as i32);

    let (head, body) = http_get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let completed = [("outcome", "completed")];
    assert_eq!(
        sample(
            &scrape,
            "sealgate_stamps_total",
            &[("seal", "contract"), completed[0]]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "sealgate_stamps_total",
            &[("seal", "finance"), completed[0]]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &scrape,
            "sealgate_denials_total",
            &[("seal", "contract"), ("reason", "malformed")]
        ),
        1.0
    );
    for name in [
        "sealgate_stamp_duration_seconds",
        "sealgate_audit_batch_records",
    ] {
        assert!(
            scrape.samples.iter().any(|s| s.metric == name),
            "{name} missing:\n{body}"
        );
    }
    let (head, _) = http_get(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(d.stop().success());
}

#[tokio::test]
async fn json_logs_carry_the_caller_request_and_seal_and_status_shows_queues() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(demo(), &dir.path().join("sealgated.sock"), &Opts::default());
    let d = Daemon::start_with(dir, &text, &[("SEALGATE_LOG_FORMAT", "json")])
        .unwrap_or_else(|f| panic!("{f:?}"));
    let mut c = d.client().await;
    stamp_ok(&mut c, "contract", &[4; 32]).await;
    let response::Body::StatusReport(st) = c.status().await.unwrap().body.unwrap() else {
        panic!()
    };
    let hsm = &st.devices[0];
    assert_eq!((hsm.queued, hsm.signing), (0, 0));
    assert!(hsm.queue_limit > 0);
    let log = d.log();
    assert!(d.stop().success());

    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let stamped = lines
        .iter()
        .find(|l| l["fields"]["message"] == "stamped")
        .expect("a stamped line");
    let spans = stamped["spans"].as_array().unwrap();
    let conn = spans.iter().find(|s| s["name"] == "conn").unwrap();
    assert_eq!(conn["caller"], "test-app");
    let request = spans.iter().find(|s| s["name"] == "request").unwrap();
    assert_eq!(request["kind"], "stamp");
    assert_eq!(request["seal"], "contract");
    assert!(request["id"].as_u64().unwrap() > 0);
}
