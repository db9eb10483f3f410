//! Anomaly rules: each looks at committed records, one at a time in log order, and may raise an
//! alert, which the writer records (kind `alert`, reason = the rule's name), logs at WARN and
//! streams to `sealctl alerts --follow`.
//!
//! Owns: the rules and their thresholds (from `[audit.alerts]`).
//! Never: refuses a stamp; rules see what happened, the gate decides what may.
//!
//! Windows are kept in memory and start empty when the daemon starts.

use super::{kind, Record};
use crate::config::AlertsConfig;
use crate::policy::TimeWindow;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, VecDeque};

/// Rule names: the `reason` of alert records.
pub mod rule {
    pub const OFF_HOURS: &str = "off_hours";
    pub const BURST: &str = "burst";
    pub const RESTAMP: &str = "restamp";
    pub const DENIAL_SPIKE: &str = "denial_spike";
    pub const DEVICE_REMOVED: &str = "device_removed";
    pub const PIN_LOW: &str = "pin_low";
    /// Terminal anomalies: the `terminal.rejected` reasons, tamper reports and silence.
    pub const TERMINAL_NO_GRANT: &str = "terminal_no_grant";
    pub const TERMINAL_COUNTER_GAP: &str = "terminal_counter_gap";
    pub const TERMINAL_COUNTER_ROLLBACK: &str = "terminal_counter_rollback";
    pub const TERMINAL_REPLAY: &str = "terminal_replay";
    pub const TERMINAL_BAD_SIGNATURE: &str = "terminal_bad_signature";
    pub const TERMINAL_TAMPER: &str = "terminal_tamper";
    pub const TERMINAL_HEARTBEAT_LOST: &str = "terminal_heartbeat_lost";
    /// A passkey's signature counter went back (always on).
    pub const CLONED_AUTHENTICATOR: &str = "cloned_authenticator";
}

trait Rule: Send {
    fn name(&self) -> &'static str;
    /// The alert's name for `r`: the rule's name, unless one rule raises several kinds.
    fn alert_name(&self, _r: &Record) -> &'static str {
        self.name()
    }
    /// The alert's detail, when `r` is an anomaly.
    fn observe(&mut self, r: &Record, conn: &Connection) -> rusqlite::Result<Option<String>>;
}

pub struct Anomaly {
    rules: Vec<Box<dyn Rule>>,
}

impl Anomaly {
    /// No rules at all.
    pub fn none() -> Anomaly {
        Anomaly { rules: Vec::new() }
    }

    pub fn from_config(c: &AlertsConfig) -> Result<Anomaly, String> {
        let mut rules: Vec<Box<dyn Rule>> = Vec::new();
        if c.working_hours.is_some() || c.working_days.is_some() {
            rules.push(Box::new(OffHours {
                window: TimeWindow::parse(
                    c.working_hours.as_deref(),
                    c.working_days.as_deref(),
                    &c.timezone,
                )
                .map_err(|e| format!("audit.alerts: {e}"))?,
            }));
        }
        if c.burst_count > 0 {
            rules.push(Box::new(Burst(Windows::new(
                c.burst_count,
                c.burst_window_seconds,
            ))));
        }
        if c.restamp {
            rules.push(Box::new(Restamp));
        }
        if c.denial_spike_count > 0 {
            rules.push(Box::new(DenialSpike(Windows::new(
                c.denial_spike_count,
                c.denial_spike_window_seconds,
            ))));
        }
        if c.device_removed {
            rules.push(Box::new(OnKind(
                rule::DEVICE_REMOVED,
                kind::DEVICE_UNAVAILABLE,
            )));
        }
        if c.pin_low {
            rules.push(Box::new(OnKind(rule::PIN_LOW, kind::DEVICE_PIN_LOW)));
        }
        if c.terminals {
            rules.push(Box::new(Terminal));
        }
        rules.push(Box::new(ClonedAuthenticator));
        Ok(Anomaly { rules })
    }

    /// The alerts `r` raises, ready to append.
    pub fn observe(&mut self, r: &Record, conn: &Connection) -> rusqlite::Result<Vec<Record>> {
        let mut out = Vec::new();
        for rule in &mut self.rules {
            if let Some(detail) = rule.observe(r, conn)? {
                let mut a = Record::new(kind::ALERT);
                a.reason = rule.alert_name(r).into();
                a.detail = detail;
                a.ref_seq = Some(r.seq);
                a.seal = r.seal.clone();
                a.device = r.device.clone();
                a.caller = r.caller.clone();
                a.applicant = r.applicant.clone();
                a.jti = r.jti.clone();
                a.doc_sha256 = r.doc_sha256.clone();
                out.push(a);
            }
        }
        Ok(out)
    }
}

/// An approval refused because a passkey's counter went back: someone may hold a copy of an
/// approver's authenticator. Always on; the refusal alone would not reach anyone.
struct ClonedAuthenticator;

impl Rule for ClonedAuthenticator {
    fn name(&self) -> &'static str {
        rule::CLONED_AUTHENTICATOR
    }
    fn observe(&mut self, r: &Record, _: &Connection) -> rusqlite::Result<Option<String>> {
        let denied = r.kind == kind::STAMP_DENIED || r.kind == kind::TERMINAL_DENIED;
        Ok(
            (denied && r.reason == crate::denial::Reason::ClonedAuthenticator.code())
                .then(|| format!("seal {:?}: {}", r.seal, r.detail)),
        )
    }
}

/// A stamp outside working hours.
struct OffHours {
    window: TimeWindow,
}

impl Rule for OffHours {
    fn name(&self) -> &'static str {
        rule::OFF_HOURS
    }
    fn observe(&mut self, r: &Record, _: &Connection) -> rusqlite::Result<Option<String>> {
        if r.kind != kind::STAMP_COMPLETED {
            return Ok(None);
        }
        Ok(self.window.outside(r.at_ms.div_euclid(1000)).map(|why| {
            format!(
                "seal {:?} used outside working hours: working time {why}",
                r.seal
            )
        }))
    }
}

/// Events per key in a sliding window; reports once when the count goes over the limit, then
/// stays quiet for one window.
struct Windows {
    limit: u32,
    window_ms: i64,
    seen: HashMap<String, (VecDeque<i64>, i64)>,
}

impl Windows {
    fn new(limit: u32, window_seconds: u64) -> Windows {
        Windows {
            limit,
            window_ms: window_seconds as i64 * 1000,
            seen: HashMap::new(),
        }
    }

    /// The count in the window when it first goes over the limit.
    fn hit(&mut self, key: &str, at: i64) -> Option<usize> {
        if self.seen.len() > 10_000 {
            let horizon = at - self.window_ms;
            self.seen
                .retain(|_, (q, quiet)| q.back().is_some_and(|t| *t > horizon) || *quiet > at);
        }
        let (q, quiet_until) = self.seen.entry(key.to_owned()).or_default();
        q.push_back(at);
        while q.front().is_some_and(|t| *t <= at - self.window_ms) {
            q.pop_front();
        }
        if q.len() > self.limit as usize && at >= *quiet_until {
            *quiet_until = at + self.window_ms;
            return Some(q.len());
        }
        None
    }
}

/// Many stamps by one applicant in a short time.
struct Burst(Windows);

impl Rule for Burst {
    fn name(&self) -> &'static str {
        rule::BURST
    }
    fn observe(&mut self, r: &Record, _: &Connection) -> rusqlite::Result<Option<String>> {
        if r.kind != kind::STAMP_COMPLETED || r.applicant.is_empty() {
            return Ok(None);
        }
        Ok(self.0.hit(&r.applicant, r.at_ms).map(|n| {
            format!(
                "{:?} stamped {n} times within {} s (more than {})",
                r.applicant,
                self.0.window_ms / 1000,
                self.0.limit
            )
        }))
    }
}

/// Many refusals for one caller in a short time: someone probing, or a broken integration.
struct DenialSpike(Windows);

impl Rule for DenialSpike {
    fn name(&self) -> &'static str {
        rule::DENIAL_SPIKE
    }
    fn observe(&mut self, r: &Record, _: &Connection) -> rusqlite::Result<Option<String>> {
        if r.kind != kind::STAMP_DENIED && r.kind != kind::ACCESS_DENIED {
            return Ok(None);
        }
        // A stranger is named "uid U gid G pid P": counted by uid and gid, so that opening
        // each connection from a new process does not spread the count thin.
        let who = r.caller.split(" pid ").next().unwrap_or(&r.caller);
        Ok(self.0.hit(who, r.at_ms).map(|n| {
            format!(
                "caller {who:?} was refused {n} times within {} s (more than {})",
                self.0.window_ms / 1000,
                self.0.limit
            )
        }))
    }
}

/// The same document stamped again with the same seal under another approval.
struct Restamp;

impl Rule for Restamp {
    fn name(&self) -> &'static str {
        rule::RESTAMP
    }
    fn observe(&mut self, r: &Record, conn: &Connection) -> rusqlite::Result<Option<String>> {
        if r.kind != kind::STAMP_COMPLETED || r.doc_sha256.is_empty() {
            return Ok(None);
        }
        // Another approval sorts before or after this one: one index seek each way.
        let mut earlier: Option<(i64, String)> = None;
        for sql in [
            "SELECT seq, jti FROM audit WHERE kind = 'stamp.completed' AND doc_sha256 = ?1 \
             AND seal = ?2 AND jti < ?3 AND seq < ?4 LIMIT 1",
            "SELECT seq, jti FROM audit WHERE kind = 'stamp.completed' AND doc_sha256 = ?1 \
             AND seal = ?2 AND jti > ?3 AND seq < ?4 LIMIT 1",
        ] {
            let found: Option<(i64, String)> = conn
                .prepare_cached(sql)?
                .query_row(params![r.doc_sha256, r.seal, r.jti, r.seq as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?;
            earlier = match (earlier, found) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
        }
        Ok(earlier.map(|(seq, jti)| {
            format!(
                "document {} was stamped with seal {:?} again under approval {:?}; record {seq} stamped it under {jti:?}",
                r.doc_sha256, r.seal, r.jti
            )
        }))
    }
}

/// A device event that is an alert in itself (removal, PIN tries running low).
struct OnKind(&'static str, &'static str);

impl Rule for OnKind {
    fn name(&self) -> &'static str {
        self.0
    }
    fn observe(&mut self, r: &Record, _: &Connection) -> rusqlite::Result<Option<String>> {
        Ok((r.kind == self.1).then(|| format!("device {:?}: {}", r.device, r.detail)))
    }
}

/// A terminal's anomaly, as its session judged and recorded it: one alert per record.
struct Terminal;

impl Terminal {
    fn rule_of(r: &Record) -> Option<&'static str> {
        use crate::audit::rejection as why;
        Some(match r.kind.as_str() {
            kind::TERMINAL_TAMPER => rule::TERMINAL_TAMPER,
            kind::TERMINAL_HEARTBEAT_LOST => rule::TERMINAL_HEARTBEAT_LOST,
            kind::TERMINAL_REJECTED => match r.reason.as_str() {
                why::NO_GRANT => rule::TERMINAL_NO_GRANT,
                why::COUNTER_GAP => rule::TERMINAL_COUNTER_GAP,
                why::COUNTER_ROLLBACK => rule::TERMINAL_COUNTER_ROLLBACK,
                why::REPLAY => rule::TERMINAL_REPLAY,
                _ => rule::TERMINAL_BAD_SIGNATURE,
            },
            _ => return None,
        })
    }
}

impl Rule for Terminal {
    fn name(&self) -> &'static str {
        "terminal"
    }
    fn observe(&mut self, r: &Record, _: &Connection) -> rusqlite::Result<Option<String>> {
        Ok(Terminal::rule_of(r).map(|_| format!("terminal {:?}: {}", r.device, r.detail)))
    }
    fn alert_name(&self, r: &Record) -> &'static str {
        Terminal::rule_of(r).unwrap_or("terminal")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600 * 1000;
    /// Monday 2026-11-23 00:00 in Shanghai, in ms.
    const MONDAY: i64 = 1_795_363_200_000;

    fn db() -> Connection {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::store::Store::open(dir.path()).unwrap();
        let c = crate::store::connect(s.path()).unwrap();
        std::mem::forget(dir);
        c
    }

    fn config() -> AlertsConfig {
        AlertsConfig {
            working_hours: Some("08:00-20:00".into()),
            working_days: Some(
                ["mon", "tue", "wed", "thu", "fri"]
                    .map(String::from)
                    .to_vec(),
            ),
            timezone: "Asia/Shanghai".into(),
            burst_count: 5,
            burst_window_seconds: 60,
            denial_spike_count: 3,
            denial_spike_window_seconds: 60,
            ..AlertsConfig::default()
        }
    }

    struct Run {
        a: Anomaly,
        c: Connection,
        seq: u64,
        prev: [u8; 32],
        alerts: Vec<Record>,
    }

    impl Run {
        fn new() -> Run {
            Run {
                a: Anomaly::from_config(&config()).unwrap(),
                c: db(),
                seq: 0,
                prev: [0; 32],
                alerts: Vec::new(),
            }
        }
        /// Commits `r` at `at` (as the writer would) and runs the rules on it.
        fn feed(&mut self, mut r: Record, at: i64) {
            self.seq += 1;
            r.at_ms = at;
            r.seal_after(self.seq, self.prev);
            self.prev = r.hash;
            crate::audit::log::insert_record(&self.c, &r).unwrap();
            self.alerts.extend(self.a.observe(&r, &self.c).unwrap());
        }
        fn rules(&self) -> Vec<&str> {
            self.alerts.iter().map(|a| a.reason.as_str()).collect()
        }
    }

    fn stamp(applicant: &str, jti: &str, doc: &str) -> Record {
        let mut r = Record::new(kind::STAMP_COMPLETED);
        r.seal = "contract".into();
        r.caller = "oa".into();
        r.applicant = applicant.into();
        r.jti = jti.into();
        r.doc_sha256 = doc.into();
        r
    }

    fn denied(caller: &str) -> Record {
        let mut r = Record::new(kind::STAMP_DENIED);
        r.caller = caller.into();
        r.reason = "bad_signature".into();
        r
    }

    fn device(kind: &str) -> Record {
        let mut r = Record::new(kind);
        r.device = "hsm".into();
        r.detail = "gone".into();
        r
    }

    /// A working day: stamps by several people spread over office hours, a few refusals,
    /// nobody over a threshold, no document twice.
    #[test]
    fn a_normal_working_day_raises_nothing() {
        let mut run = Run::new();
        let day = MONDAY + 9 * HOUR;
        for i in 0..60 {
            let at = day + i * 8 * 60 * 1000; // every 8 minutes, 09:00 to 17:00
            run.feed(
                stamp(
                    ["wang", "li", "zhao"][i as usize % 3],
                    &format!("j{i}"),
                    &format!("d{i}"),
                ),
                at,
            );
            if i % 20 == 0 {
                run.feed(denied("oa"), at + 1000);
            }
        }
        // One approval with several uses on the same document is not a re-stamp.
        run.feed(stamp("wang", "multi", "dm"), day + 2 * HOUR);
        run.feed(stamp("wang", "multi", "dm"), day + 2 * HOUR + 5000);
        run.feed(device(kind::DEVICE_READY), day + 3 * HOUR);
        assert!(run.alerts.is_empty(), "{:?}", run.rules());
    }

    #[test]
    fn off_hours_fires_at_night_and_at_the_weekend() {
        let mut run = Run::new();
        run.feed(stamp("wang", "a", "d1"), MONDAY + 21 * HOUR);
        run.feed(stamp("wang", "b", "d2"), MONDAY + 5 * 24 * HOUR + 10 * HOUR); // Saturday
        run.feed(stamp("wang", "c", "d3"), MONDAY + 10 * HOUR);
        assert_eq!(run.rules(), ["off_hours", "off_hours"]);
        assert_eq!(run.alerts[0].ref_seq, Some(1));
    }

    #[test]
    fn burst_fires_once_per_window_per_applicant() {
        let mut run = Run::new();
        let t = MONDAY + 10 * HOUR;
        for i in 0..12 {
            run.feed(
                stamp("wang", &format!("j{i}"), &format!("d{i}")),
                t + i * 1000,
            );
            run.feed(
                stamp("li", &format!("k{i}"), &format!("e{i}")),
                t + i * 20_000,
            );
        }
        assert_eq!(run.rules(), ["burst"]);
        assert_eq!(run.alerts[0].applicant, "wang");
        // A new window, a new burst.
        for i in 0..6 {
            run.feed(
                stamp("wang", &format!("x{i}"), &format!("f{i}")),
                t + 120_000 + i,
            );
        }
        assert_eq!(run.rules(), ["burst", "burst"]);
    }

    #[test]
    fn restamp_fires_for_the_same_document_under_another_approval() {
        let mut run = Run::new();
        let t = MONDAY + 10 * HOUR;
        run.feed(stamp("wang", "first", "doc"), t);
        run.feed(stamp("wang", "first", "doc"), t + 1);
        run.feed(stamp("li", "second", "doc"), t + 2);
        assert_eq!(run.rules(), ["restamp"]);
        assert!(run.alerts[0].detail.contains("\"first\""));
    }

    #[test]
    fn denial_spike_fires_per_caller() {
        let mut run = Run::new();
        let t = MONDAY + 10 * HOUR;
        for i in 0..3 {
            run.feed(denied("oa"), t + i);
            run.feed(denied("erp"), t + i);
        }
        assert!(run.alerts.is_empty());
        run.feed(denied("oa"), t + 10);
        assert_eq!(run.rules(), ["denial_spike"]);
        assert_eq!(run.alerts[0].caller, "oa");
    }

    #[test]
    fn a_stranger_is_counted_by_uid_whatever_its_process() {
        let mut run = Run::new();
        let t = MONDAY + 10 * HOUR;
        for pid in 0..4 {
            let mut r = Record::new(kind::ACCESS_DENIED);
            r.caller = format!("uid 4242 gid 4242 pid {}", 100 + pid);
            r.reason = "unknown_caller".into();
            run.feed(r, t + pid);
        }
        assert_eq!(run.rules(), ["denial_spike"]);
        assert!(
            run.alerts[0].detail.contains("\"uid 4242 gid 4242\""),
            "{}",
            run.alerts[0].detail
        );
    }

    #[test]
    fn device_removal_and_low_pin_tries_fire() {
        let mut run = Run::new();
        let t = MONDAY + 10 * HOUR;
        run.feed(device(kind::DEVICE_UNAVAILABLE), t);
        run.feed(device(kind::DEVICE_READY), t + 1);
        run.feed(device(kind::DEVICE_PIN_LOW), t + 2);
        assert_eq!(run.rules(), ["device_removed", "pin_low"]);
    }

    #[test]
    fn terminal_anomalies_fire_one_alert_each_and_normal_reports_none() {
        let mut run = Run::new();
        let t = MONDAY + 10 * HOUR;
        let terminal = |k: &str, reason: &str| {
            let mut r = Record::new(k);
            r.device = "t1".into();
            r.reason = reason.into();
            r
        };
        for k in [
            kind::TERMINAL_CONNECTED,
            kind::TERMINAL_HELLO,
            kind::TERMINAL_GRANTED,
            kind::TERMINAL_IMPRESSION,
            kind::TERMINAL_LOCKED,
            kind::TERMINAL_HEARTBEAT_BACK,
        ] {
            run.feed(terminal(k, ""), t);
        }
        assert!(run.alerts.is_empty(), "{:?}", run.rules());
        for reason in [
            "no_grant",
            "counter_gap",
            "counter_rollback",
            "replay",
            "bad_signature",
        ] {
            run.feed(terminal(kind::TERMINAL_REJECTED, reason), t);
        }
        run.feed(terminal(kind::TERMINAL_TAMPER, ""), t);
        run.feed(terminal(kind::TERMINAL_HEARTBEAT_LOST, ""), t);
        assert_eq!(
            run.rules(),
            [
                "terminal_no_grant",
                "terminal_counter_gap",
                "terminal_counter_rollback",
                "terminal_replay",
                "terminal_bad_signature",
                "terminal_tamper",
                "terminal_heartbeat_lost"
            ]
        );
        assert_eq!(run.alerts[0].device, "t1");
    }

    #[test]
    fn rules_can_be_switched_off() {
        let mut c = config();
        c.working_hours = None;
        c.working_days = None;
        c.restamp = false;
        c.device_removed = false;
        let mut run = Run::new();
        run.a = Anomaly::from_config(&c).unwrap();
        run.feed(stamp("wang", "a", "d"), MONDAY + 23 * HOUR);
        run.feed(stamp("li", "b", "d"), MONDAY + 23 * HOUR);
        run.feed(device(kind::DEVICE_UNAVAILABLE), MONDAY);
        assert!(run.alerts.is_empty(), "{:?}", run.rules());
    }
}
