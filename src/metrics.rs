//! Prometheus metrics: counted always (it is cheap), served only when `daemon.metrics_listen`
//! names a loopback address.
//!
//! Owns: the metric families, their text encoding, and a minimal HTTP endpoint that answers
//! `GET /metrics` and nothing else.
//! Never: puts caller input other than configured names (seals, devices, reason codes) in a
//! label, so label sets stay bounded.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    stamps: Family<Labels, Counter>,
    denials: Family<Labels, Counter>,
    stamp_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    device_errors: Family<Labels, Counter>,
    audit_failures: Counter,
    audit_batch_records: Histogram,
    alerts: Family<Labels, Counter>,
}

fn latency_buckets() -> Histogram {
    // 0.25 ms .. about 4 s
    Histogram::new(exponential_buckets(0.00025, 2.0, 15))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sealgate");
        let m = Metrics {
            stamps: Family::default(),
            denials: Family::default(),
            stamp_seconds: Family::new_with_constructor(latency_buckets),
            device_errors: Family::default(),
            audit_failures: Counter::default(),
            audit_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            alerts: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "stamps",
            "Stamps by seal and outcome (completed, failed)",
            m.stamps.clone(),
        );
        registry.register(
            "denials",
            "Refused stamp requests by seal and reason code",
            m.denials.clone(),
        );
        registry.register(
            "stamp_duration_seconds",
            "Time from request to durable completion, by seal",
            m.stamp_seconds.clone(),
        );
        registry.register(
            "device_errors",
            "Failed device operations by device",
            m.device_errors.clone(),
        );
        registry.register(
            "audit_failures",
            "Audit batches that could not be made durable",
            m.audit_failures.clone(),
        );
        registry.register(
            "audit_batch_records",
            "Records per audit commit (group commit)",
            m.audit_batch_records.clone(),
        );
        registry.register("alerts", "Alerts by anomaly rule", m.alerts.clone());
        Metrics { registry, ..m }
    }

    pub fn stamp(&self, seal: &str, outcome: &'static str, seconds: Option<f64>) {
        self.stamps
            .get_or_create(&vec![
                ("seal", seal.to_owned()),
                ("outcome", outcome.into()),
            ])
            .inc();
        if let Some(s) = seconds {
            self.stamp_seconds
                .get_or_create(&vec![("seal", seal.to_owned())])
                .observe(s);
        }
    }

    pub fn denial(&self, seal: &str, reason: &str) {
        self.denials
            .get_or_create(&vec![
                ("seal", seal.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    pub fn device_error(&self, device: &str) {
        self.device_errors
            .get_or_create(&vec![("device", device.to_owned())])
            .inc();
    }

    pub fn audit_batch(&self, records: usize) {
        self.audit_batch_records.observe(records as f64);
    }

    pub fn audit_failure(&self) {
        self.audit_failures.inc();
    }

    pub fn alert(&self, rule: &str) {
        self.alerts
            .get_or_create(&vec![("rule", rule.to_owned())])
            .inc();
    }

    /// The exposition text (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Answers `GET /metrics` on `listener` with the daemon's metrics until the task is dropped;
/// anything else is a 404.
pub async fn serve(listener: TcpListener) {
    serve_text(listener, || get().encode()).await
}

/// Answers `GET /metrics` on `listener` with what `encode` gives, until the task is dropped;
/// anything else is a 404.
pub async fn serve_text(listener: TcpListener, encode: fn() -> String) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            let read = async {
                while got < buf.len() {
                    let n = stream.read(&mut buf[got..]).await?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                    if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(std::time::Duration::from_secs(2), read)
                .await
                .is_err()
            {
                return;
            }
            let head = &buf[..got];
            let (status, body) = if head.starts_with(b"GET /metrics ") {
                ("200 OK", encode())
            } else {
                (
                    "404 Not Found",
                    "only GET /metrics is served here\n".to_owned(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
