//! HQ's Prometheus metrics: each site's verified head, how far HQ is behind it, how long since
//! it moved, and the central alerts by kind (all read from the database, so every node shows
//! the same), and what this node took in and refused.
//!
//! Owns: the metric families (prefix `sealgate_hq`) and their refresh from the database.
//! Never: puts anything but enrolled site ids and fixed kinds in a label (a stranger's
//! certificate counts under site "unknown").

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

type Labels = Vec<(&'static str, String)>;
type FGauge = Gauge<f64, AtomicU64>;

pub struct HqMetrics {
    registry: Registry,
    head: Family<Labels, Gauge>,
    lag_records: Family<Labels, Gauge>,
    head_age: Family<Labels, FGauge>,
    alerts: Family<Labels, Gauge>,
    received: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    /// The sites enrolled, so a stranger's fingerprint is never a label.
    sites: Mutex<HashSet<String>>,
}

impl HqMetrics {
    fn new() -> HqMetrics {
        let mut registry = Registry::with_prefix("sealgate_hq");
        let m = HqMetrics {
            registry: Registry::default(),
            head: Family::default(),
            lag_records: Family::default(),
            head_age: Family::default(),
            alerts: Family::default(),
            received: Family::default(),
            refused: Family::default(),
            sites: Mutex::new(HashSet::new()),
        };
        registry.register(
            "site_head_seq",
            "The seq up to which HQ holds the site's log, verified",
            m.head.clone(),
        );
        registry.register(
            "site_lag_records",
            "Records of the site's newest checkpoint (at its last hello) HQ does not hold yet",
            m.lag_records.clone(),
        );
        registry.register(
            "site_head_age_seconds",
            "Seconds since the site's head last moved at HQ (heartbeats move it on an idle site)",
            m.head_age.clone(),
        );
        registry.register(
            "alerts",
            "Central alerts in the database, by site and kind",
            m.alerts.clone(),
        );
        registry.register(
            "records_received",
            "Records this node verified and stored, by site",
            m.received.clone(),
        );
        registry.register(
            "refusals",
            "What this node refused, by site and alert kind",
            m.refused.clone(),
        );
        HqMetrics { registry, ..m }
    }

    fn site_label(&self, site: &str) -> String {
        let known = self.sites.lock().map(|s| s.contains(site)).unwrap_or(false);
        if known {
            site.to_owned()
        } else {
            "unknown".to_owned()
        }
    }

    pub fn received(&self, site: &str, records: usize) {
        self.received
            .get_or_create(&vec![("site", self.site_label(site))])
            .inc_by(records as u64);
    }

    pub fn refused(&self, site: &str, kind: &'static str) {
        self.refused
            .get_or_create(&vec![
                ("site", self.site_label(site)),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    /// Sets the per-site gauges from the database's view: heads as [`super::db::Db::heads`]
    /// gives them, alert counts by (site, kind).
    pub fn refresh(
        &self,
        heads: &[(String, u64, u64, i64)],
        alerts: &[(String, String, i64)],
        now_ms: i64,
    ) {
        if let Ok(mut known) = self.sites.lock() {
            known.extend(heads.iter().map(|h| h.0.clone()));
        }
        for (site, head, reported, quiet_since_ms) in heads {
            let l = vec![("site", site.clone())];
            self.head.get_or_create(&l).set(*head as i64);
            self.lag_records
                .get_or_create(&l)
                .set(reported.saturating_sub(*head) as i64);
            self.head_age
                .get_or_create(&l)
                .set((now_ms - quiet_since_ms).max(0) as f64 / 1000.0);
        }
        // Every kind of every site from zero on, so that a first alert is a change a rule
        // sees (delta), not a series that appears already at 1.
        for (site, ..) in heads {
            for kind in super::check::ALERT_KINDS {
                let l = vec![("site", site.clone()), ("kind", (*kind).to_owned())];
                let n = alerts
                    .iter()
                    .find(|(s, k, _)| s == site && k == kind)
                    .map(|a| a.2)
                    .unwrap_or(0);
                self.alerts.get_or_create(&l).set(n);
            }
        }
        // Strangers' certificates count together, under "unknown".
        let mut strangers: std::collections::BTreeMap<String, i64> = Default::default();
        for (_, kind, n) in alerts
            .iter()
            .filter(|(s, ..)| !heads.iter().any(|h| &h.0 == s))
        {
            *strangers.entry(kind.clone()).or_default() += n;
        }
        for (kind, n) in strangers {
            self.alerts
                .get_or_create(&vec![("site", "unknown".to_owned()), ("kind", kind)])
                .set(n);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The process's HQ metrics.
pub fn get() -> &'static HqMetrics {
    static METRICS: OnceLock<HqMetrics> = OnceLock::new();
    METRICS.get_or_init(HqMetrics::new)
}
