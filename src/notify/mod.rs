//! Alert delivery: the site's alerts (the `alert` records of its audit log) sent to the
//! channels people read — a signed webhook, the WeCom, DingTalk and Feishu group robots, and
//! e-mail over SMTP with STARTTLS — routed per rule, at once or as a digest.
//!
//! Runs beside the daemon, never in it (the daemon's sandbox has no network): `sealctl notify`
//! reads the log read-only and keeps its own durable outbox. An alert is put in the outbox, with
//! the log position it was read from, in one transaction; it leaves the outbox only when its
//! receiver said yes. A receiver that is down is tried again with growing pauses, so every alert
//! arrives once it is back, and each delivery carries an id a receiver can drop repeats by.
//!
//! Owns: the notify configuration, routing, the outbox, retries. Never: writes the audit log,
//! logs a secret.

pub mod channel;

use crate::audit::{kind, Record};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why delivery cannot run (a receiver that refuses is not one of these: it is retried).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify configuration {path}: {detail}")]
    Config { path: String, detail: String },
    #[error("the audit log {path}: {detail}")]
    Log { path: String, detail: String },
    #[error("the outbox {path}: {detail}")]
    Outbox { path: String, detail: String },
}

/// `sealctl notify --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// The site's name in messages (e.g. "shanghai").
    #[serde(default)]
    pub site: String,
    /// The site's audit log (the daemon's `state_dir/sealgate.db`), read only...
    #[serde(default)]
    pub db: Option<PathBuf>,
    /// ...or headquarters' database, whose central alerts (gaps, forks, rollbacks, silence,
    /// unknown sites, …) go out instead; a role that may read `alerts` is enough.
    #[serde(default)]
    pub hq_database: Option<crate::hq::config::DatabaseConfig>,
    /// The outbox: a SQLite file of this process's own.
    pub outbox: PathBuf,
    /// A new outbox starts at the log's head: alerts raised before delivery was set up are not
    /// sent (a robot flooded with a year of them helps nobody). True: from the first alert.
    #[serde(default)]
    pub from_beginning: bool,
    #[serde(default, rename = "channel")]
    pub channels: Vec<ChannelConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// JSON POST with an HMAC-SHA256 signature header.
    Webhook,
    /// WeCom (企业微信) group robot.
    Wecom,
    /// DingTalk (钉钉) group robot, signed when it has a secret.
    Dingtalk,
    /// Feishu (飞书) custom bot, signed when it has a secret.
    Feishu,
    /// E-mail over SMTP with STARTTLS.
    Email,
}

/// `[[channel]]`: one place alerts go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub id: String,
    pub kind: ChannelKind,
    /// The webhook's or robot's URL (a robot's URL holds its key or access token).
    #[serde(default)]
    pub url: Option<String>,
    /// The webhook's HMAC key, or a DingTalk/Feishu robot's signing secret (mode 0600).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// E-mail: the SMTP server, "host:port" (port 587 when left out); STARTTLS is required.
    #[serde(default)]
    pub smtp: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) the SMTP server's certificate must chain to; the system's roots
    /// when left out.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long one delivery may take.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// `[[route]]`: which alerts go to which channels, and when.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Alert rules (the alert's `reason`, e.g. "terminal_tamper"); empty: every alert.
    #[serde(default)]
    pub rules: Vec<String>,
    pub channels: Vec<String>,
    /// 0: each alert at once; otherwise one digest per window of this many seconds (86400: a
    /// daily digest, sent at 00:00 UTC for the day before).
    #[serde(default)]
    pub digest_seconds: u64,
}

impl NotifyConfig {
    /// Reads and checks the file; relative paths are from its folder.
    pub fn load(path: &Path) -> Result<NotifyConfig, NotifyError> {
        let err = |detail: String| NotifyError::Config {
            path: path.display().to_string(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut c: NotifyConfig = toml::from_str(&text).map_err(|e| err(e.message().into()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if c.db.is_some() == c.hq_database.is_some() {
            return Err(err(
                "give the site's audit log (db) or HQ's database ([hq_database]), one of them"
                    .into(),
            ));
        }
        if let Some(db) = &mut c.db {
            abs(db);
        }
        if let Some(ca) = c.hq_database.as_mut().and_then(|h| h.ca.as_mut()) {
            abs(ca);
        }
        abs(&mut c.outbox);
        let mut ids = std::collections::HashSet::new();
        for ch in &mut c.channels {
            if !ids.insert(ch.id.clone()) {
                return Err(err(format!("channel {:?} is defined twice", ch.id)));
            }
            for p in [&mut ch.secret_file, &mut ch.password_file, &mut ch.ca_file]
                .into_iter()
                .flatten()
            {
                abs(p);
            }
            channel::check(ch).map_err(|e| err(format!("channel {:?}: {e}", ch.id)))?;
        }
        if c.routes.is_empty() {
            return Err(err("no [[route]]: no alert would go anywhere".into()));
        }
        for (i, r) in c.routes.iter().enumerate() {
            if r.channels.is_empty() {
                return Err(err(format!("route {}: no channels", i + 1)));
            }
            for ch in &r.channels {
                if !ids.contains(ch) {
                    return Err(err(format!("route {}: no channel {ch:?}", i + 1)));
                }
            }
        }
        Ok(c)
    }
}

/// What one alert says, as every channel renders it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Alert {
    /// The log seq of a site's alert; the id of a central alert at HQ.
    pub seq: u64,
    pub at_ms: i64,
    pub rule: String,
    pub detail: String,
    pub seal: String,
    pub device: String,
    pub applicant: String,
    pub caller: String,
    pub doc_sha256: String,
    /// A site alert: the record it is about; a central alert: the site's seq it names.
    pub ref_seq: Option<u64>,
    /// A central alert's site (or a stranger's certificate); empty for a site's own alert.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site: String,
}

/// The rule name an application's `application.pending` record is delivered under.
pub const APPROVAL_PENDING: &str = "approval_pending";

impl Alert {
    fn of(r: &Record) -> Alert {
        let (rule, detail) = if r.kind == kind::APPLICATION_PENDING {
            // "contract 2026-131 (zhao.lei): level 2 (executive) waits — https://…/approvals/ID"
            let d: serde_json::Value = serde_json::from_str(&r.detail).unwrap_or_default();
            let mut text = format!(
                "{} ({}): level {} ({}) waits",
                d["title"].as_str().unwrap_or(&r.jti),
                r.applicant,
                d["level"],
                r.reason
            );
            if let Some(link) = d["link"].as_str() {
                text += &format!(" — {link}");
            }
            (APPROVAL_PENDING.to_owned(), text)
        } else {
            (r.reason.clone(), r.detail.clone())
        };
        Alert {
            seq: r.seq,
            at_ms: r.at_ms,
            rule,
            detail,
            seal: r.seal.clone(),
            device: r.device.clone(),
            applicant: r.applicant.clone(),
            caller: r.caller.clone(),
            doc_sha256: r.doc_sha256.clone(),
            ref_seq: r.ref_seq,
            site: String::new(),
        }
    }

    fn central(a: &crate::hq::db::CentralAlert) -> Alert {
        Alert {
            seq: a.id.max(0) as u64,
            at_ms: a.at_ms,
            rule: a.kind.clone(),
            detail: a.detail.clone(),
            seal: String::new(),
            device: String::new(),
            applicant: String::new(),
            caller: String::new(),
            doc_sha256: String::new(),
            ref_seq: a.seq.map(|s| s.max(0) as u64),
            site: a.site.clone(),
        }
    }
}

const OUTBOX_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    alert_seq INTEGER NOT NULL,
    alert TEXT NOT NULL,
    -- 0: on its own; else the end of its digest window (ms), which groups a digest.
    window_ms INTEGER NOT NULL,
    next_try_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    delivered_ms INTEGER,
    UNIQUE (alert_seq, channel)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(next_try_ms) WHERE delivered_ms IS NULL;
"#;

/// Longest pause between two tries of one delivery.
const MAX_BACKOFF_MS: i64 = 300_000;
/// Alerts read from the log at once.
const READ_BATCH: i64 = 500;

fn now_ms() -> i64 {
    crate::audit::now_ms()
}

/// The error of the outbox at `path`.
fn outbox_error(path: &Path) -> impl Fn(rusqlite::Error) -> NotifyError + '_ {
    move |e| NotifyError::Outbox {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// The outbox: alerts read from the log and not yet delivered everywhere they go.
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
}

/// What the outbox holds, for `sealctl notify` to say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub delivered: u64,
    pub waiting: u64,
    pub failing: u64,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, NotifyError> {
        let err = |e: rusqlite::Error| NotifyError::Outbox {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        let conn = crate::store::connect(path).map_err(err)?;
        conn.execute_batch(OUTBOX_SCHEMA).map_err(err)?;
        Ok(Outbox {
            conn,
            path: path.to_owned(),
        })
    }

    /// Opens an outbox another process keeps, to read it (the console's deliveries page).
    pub fn open_read_only(path: &Path) -> Result<Outbox, NotifyError> {
        let conn = crate::audit::query::open_read_only(path).map_err(outbox_error(path))?;
        Ok(Outbox {
            conn,
            path: path.to_owned(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> NotifyError {
        outbox_error(&self.path)(e)
    }

    /// Deliveries newest first, before id `before`, at most `limit`; or, with `alerts`, every
    /// delivery of those alerts.
    pub fn deliveries(
        &self,
        before: Option<i64>,
        limit: u32,
        alerts: Option<&[u64]>,
    ) -> Result<Vec<Delivery>, NotifyError> {
        let columns =
            "id, channel, alert_seq, window_ms, next_try_ms, attempts, last_error, delivered_ms";
        let row = |r: &rusqlite::Row<'_>| {
            Ok(Delivery {
                id: r.get(0)?,
                channel: r.get(1)?,
                alert_seq: r.get::<_, i64>(2)? as u64,
                window_ms: r.get(3)?,
                next_try_ms: r.get(4)?,
                attempts: r.get::<_, i64>(5)? as u64,
                last_error: r.get(6)?,
                delivered_ms: r.get(7)?,
            })
        };
        let rows = match alerts {
            Some(seqs) => {
                let list = seqs
                    .iter()
                    .map(|s| s.min(&(i64::MAX as u64)).to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let mut stmt = self
                    .conn
                    .prepare(&format!(
                        "SELECT {columns} FROM deliveries WHERE alert_seq IN ({list}) ORDER BY id"
                    ))
                    .map_err(|e| self.err(e))?;
                let rows = stmt.query_map([], row).map_err(|e| self.err(e))?;
                rows.collect::<Result<Vec<_>, _>>()
            }
            None => {
                let mut stmt = self
                    .conn
                    .prepare(&format!(
                        "SELECT {columns} FROM deliveries WHERE id < ?1 ORDER BY id DESC LIMIT ?2"
                    ))
                    .map_err(|e| self.err(e))?;
                let rows = stmt
                    .query_map(params![before.unwrap_or(i64::MAX), limit], row)
                    .map_err(|e| self.err(e))?;
                rows.collect::<Result<Vec<_>, _>>()
            }
        };
        rows.map_err(|e| self.err(e))
    }

    /// The last log seq whose alerts are in the outbox.
    pub fn cursor(&self) -> Result<u64, NotifyError> {
        Ok(self.started()?.unwrap_or(0))
    }

    /// The cursor, or None for an outbox that has read nothing yet.
    fn started(&self) -> Result<Option<u64>, NotifyError> {
        self.conn
            .query_row("SELECT seq FROM cursor WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|s| s.map(|s| s.max(0) as u64))
            .map_err(|e| self.err(e))
    }

    /// Routes `alerts` (read from the log after the cursor, up to `last_seq`) into the outbox
    /// and moves the cursor, in one transaction.
    pub fn enqueue(
        &mut self,
        routes: &[RouteConfig],
        alerts: &[Alert],
        last_seq: u64,
    ) -> Result<usize, NotifyError> {
        let now = now_ms();
        let err = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut n = 0;
        let run = |tx: &rusqlite::Transaction<'_>, n: &mut usize| -> rusqlite::Result<()> {
            for a in alerts {
                let body = serde_json::to_string(a).expect("an alert serializes");
                for r in routes {
                    // A route of every alert does not carry approvers' work: approval_pending
                    // goes only where a route names it.
                    let named = r.rules.contains(&a.rule);
                    if !named && (!r.rules.is_empty() || a.rule == APPROVAL_PENDING) {
                        continue;
                    }
                    let window = digest_window(a.at_ms.max(now), r.digest_seconds);
                    for ch in &r.channels {
                        *n += tx
                            .prepare_cached(
                                "INSERT OR IGNORE INTO deliveries (channel, alert_seq, alert, \
                                 window_ms, next_try_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                            )?
                            .execute(params![ch, a.seq as i64, body, window, window.max(now)])?;
                    }
                }
            }
            tx.execute(
                "INSERT INTO cursor (id, seq) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq",
                params![last_seq as i64],
            )?;
            Ok(())
        };
        run(&tx, &mut n).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(n)
    }

    /// Deliveries due now, grouped: one alone, or a channel's digest window whole.
    fn due(&self) -> Result<Vec<Batch>, NotifyError> {
        let now = now_ms();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, channel, alert, window_ms, attempts FROM deliveries \
                 WHERE delivered_ms IS NULL AND next_try_ms <= ?1 ORDER BY channel, window_ms, alert_seq",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![now], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        let mut out: Vec<Batch> = Vec::new();
        for (id, channel, alert, window, attempts) in rows {
            let Ok(alert) = serde_json::from_str::<Alert>(&alert) else {
                continue;
            };
            match out.last_mut() {
                Some(b) if window != 0 && b.channel == channel && b.window_ms == window => {
                    b.ids.push(id);
                    b.alerts.push(alert);
                    b.attempts = b.attempts.max(attempts);
                }
                _ => out.push(Batch {
                    ids: vec![id],
                    channel,
                    window_ms: window,
                    alerts: vec![alert],
                    attempts,
                }),
            }
        }
        Ok(out)
    }

    fn delivered(&mut self, b: &Batch) -> Result<(), NotifyError> {
        let now = now_ms();
        let err = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        for id in &b.ids {
            tx.execute(
                "UPDATE deliveries SET delivered_ms = ?2, attempts = attempts + 1, last_error = '' WHERE id = ?1",
                params![id, now],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    fn failed(&mut self, b: &Batch, why: &str) -> Result<(), NotifyError> {
        let now = now_ms();
        let pause = (1000i64 << b.attempts.clamp(0, 20)).min(MAX_BACKOFF_MS);
        let err = outbox_error(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        for id in &b.ids {
            tx.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_try_ms = ?2, last_error = ?3 WHERE id = ?1",
                params![id, now + pause, why],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    /// The deliveries not taken yet after a try: channel, alert seq, tries, the last error,
    /// when the next try is due (ms). Oldest first, at most `limit`.
    pub fn failures(&self, limit: u32) -> Result<Vec<Failing>, NotifyError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT channel, alert_seq, attempts, last_error, next_try_ms FROM deliveries \
                 WHERE delivered_ms IS NULL AND attempts > 0 ORDER BY id LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![limit], |r| {
                Ok(Failing {
                    channel: r.get(0)?,
                    alert_seq: r.get::<_, i64>(1)? as u64,
                    attempts: r.get::<_, i64>(2)? as u64,
                    last_error: r.get(3)?,
                    next_try_ms: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// How many deliveries are done, waiting (a digest not yet due, a first try), failing.
    pub fn pending(&self) -> Result<Pending, NotifyError> {
        self.conn
            .query_row(
                "SELECT count(*) FILTER (WHERE delivered_ms IS NOT NULL), \
                 count(*) FILTER (WHERE delivered_ms IS NULL AND attempts = 0), \
                 count(*) FILTER (WHERE delivered_ms IS NULL AND attempts > 0) FROM deliveries",
                [],
                |r| {
                    Ok(Pending {
                        delivered: r.get::<_, i64>(0)? as u64,
                        waiting: r.get::<_, i64>(1)? as u64,
                        failing: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .map_err(|e| self.err(e))
    }
}

/// One alert's delivery to one channel, as the outbox holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivery {
    pub id: i64,
    pub channel: String,
    pub alert_seq: u64,
    /// 0: sent on its own; else the end of its digest window (ms).
    pub window_ms: i64,
    pub next_try_ms: i64,
    pub attempts: u64,
    pub last_error: String,
    pub delivered_ms: Option<i64>,
}

/// A delivery that was tried and not taken yet.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failing {
    pub channel: String,
    pub alert_seq: u64,
    pub attempts: u64,
    pub last_error: String,
    pub next_try_ms: i64,
}

/// One message to send: a delivery alone, or a digest window's deliveries to one channel.
struct Batch {
    ids: Vec<i64>,
    channel: String,
    window_ms: i64,
    alerts: Vec<Alert>,
    attempts: i64,
}

/// The end of the digest window `at_ms` falls in (windows aligned to the Unix epoch, so a daily
/// digest closes at 00:00 UTC); 0 for an alert sent at once.
fn digest_window(at_ms: i64, digest_seconds: u64) -> i64 {
    if digest_seconds == 0 {
        return 0;
    }
    let w = (digest_seconds.min(i64::MAX as u64 / 1000) as i64) * 1000;
    (at_ms.div_euclid(w) + 1) * w
}

/// Alerts after `after` in the log, at most [`READ_BATCH`]; and the last seq looked at.
fn read_alerts(conn: &Connection, after: u64) -> rusqlite::Result<(Vec<Alert>, u64)> {
    let head: i64 = conn.query_row("SELECT COALESCE(max(seq), 0) FROM audit", [], |r| r.get(0))?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM audit WHERE kind IN (?1, ?4) AND seq > ?2 ORDER BY seq LIMIT ?3",
        crate::audit::query::record_columns()
    ))?;
    let alerts: Vec<Alert> = stmt
        .query_map(
            params![
                kind::ALERT,
                after as i64,
                READ_BATCH,
                kind::APPLICATION_PENDING
            ],
            crate::audit::query::record_from_row,
        )?
        .map(|r| r.map(|r| Alert::of(&r)))
        .collect::<Result<_, _>>()?;
    // A full batch ends at its last alert; otherwise everything up to the head was looked at.
    let last = if alerts.len() as i64 == READ_BATCH {
        alerts.last().map_or(after, |a| a.seq)
    } else {
        (head.max(0) as u64).max(after)
    };
    Ok((alerts, last))
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pass {
    pub queued: usize,
    pub sent: usize,
    pub failed: usize,
}

/// Where alerts are read from.
enum Source {
    /// A site's audit log, read only; opened again after a read fails.
    Site {
        path: PathBuf,
        conn: Option<Connection>,
    },
    /// HQ's central alerts, over a runtime of the source's own (delivery itself blocks).
    Hq {
        runtime: tokio::runtime::Runtime,
        db: crate::hq::db::Db,
    },
}

impl Source {
    fn open(c: &NotifyConfig) -> Result<Source, NotifyError> {
        if let Some(path) = &c.db {
            return Ok(Source::Site {
                path: path.clone(),
                conn: None,
            });
        }
        let hq = c.hq_database.as_ref().expect("checked at load");
        let err = |detail: String| NotifyError::Log {
            path: "HQ's database".into(),
            detail,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(e.to_string()))?;
        let db = runtime
            .block_on(async { crate::hq::db::Db::connect(hq) })
            .map_err(|e| err(e.to_string()))?;
        Ok(Source::Hq { runtime, db })
    }

    /// The newest position: the log's head seq, or HQ's newest alert id.
    fn head(&mut self) -> Result<u64, NotifyError> {
        match self {
            Source::Site { .. } => {
                let mut last = 0;
                loop {
                    let (_, upto) = self.read(last)?;
                    if upto == last {
                        return Ok(last);
                    }
                    last = upto;
                }
            }
            Source::Hq { runtime, db } => runtime
                .block_on(db.alerts_after(0, None, None))
                .map(|rows| rows.last().map_or(0, |a| a.id.max(0) as u64))
                .map_err(|e| NotifyError::Log {
                    path: "HQ's database".into(),
                    detail: e.to_string(),
                }),
        }
    }

    /// Alerts after `after`, at most [`READ_BATCH`], and the position read up to.
    fn read(&mut self, after: u64) -> Result<(Vec<Alert>, u64), NotifyError> {
        match self {
            Source::Site { path, conn } => {
                let err = |e: rusqlite::Error| NotifyError::Log {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                };
                if conn.is_none() {
                    *conn = Some(crate::audit::query::open_read_only(path).map_err(err)?);
                }
                read_alerts(conn.as_ref().expect("opened"), after).map_err(|e| {
                    // Opened again next pass (the file may have been replaced).
                    *conn = None;
                    err(e)
                })
            }
            Source::Hq { runtime, db } => {
                let rows = runtime
                    .block_on(db.alerts_after(after.min(i64::MAX as u64) as i64, None, None))
                    .map_err(|e| NotifyError::Log {
                        path: "HQ's database".into(),
                        detail: e.to_string(),
                    })?;
                let alerts: Vec<Alert> = rows
                    .iter()
                    .take(READ_BATCH as usize)
                    .map(Alert::central)
                    .collect();
                let last = alerts.last().map_or(after, |a| a.seq);
                Ok((alerts, last))
            }
        }
    }
}

/// Delivery, ready to run passes.
pub struct Notifier {
    config: NotifyConfig,
    channels: Vec<channel::Channel>,
    outbox: Outbox,
    source: Source,
}

impl Notifier {
    pub fn new(config: NotifyConfig) -> Result<Notifier, NotifyError> {
        let channels = config
            .channels
            .iter()
            .map(channel::Channel::open)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|detail| NotifyError::Config {
                path: "channels".into(),
                detail,
            })?;
        let outbox = Outbox::open(&config.outbox)?;
        let source = Source::open(&config)?;
        Ok(Notifier {
            config,
            channels,
            outbox,
            source,
        })
    }

    /// Reads new alerts into the outbox, then sends what is due; a receiver that refuses or is
    /// unreachable is noted and tried again later.
    pub fn pass(&mut self) -> Result<Pass, NotifyError> {
        let mut pass = Pass::default();
        if self.outbox.started()?.is_none() && !self.config.from_beginning {
            let head = self.source.head()?;
            self.outbox.enqueue(&self.config.routes, &[], head)?;
            tracing::info!(
                from = head,
                "a new outbox: alerts after this position are delivered, none before"
            );
        }
        loop {
            let after = self.outbox.cursor()?;
            let (alerts, last) = self.source.read(after)?;
            if last == after {
                break;
            }
            pass.queued += self.outbox.enqueue(&self.config.routes, &alerts, last)?;
        }
        for b in self.outbox.due()? {
            let Some(ch) = self.channels.iter().find(|c| c.id() == b.channel) else {
                continue;
            };
            let id = format!(
                "{}:{}:{}-{}",
                self.config.site,
                b.channel,
                b.alerts.first().map_or(0, |a| a.seq),
                b.alerts.last().map_or(0, |a| a.seq)
            );
            match ch.send(&self.config.site, &id, &b.alerts, b.window_ms) {
                Ok(()) => {
                    self.outbox.delivered(&b)?;
                    pass.sent += 1;
                }
                Err(why) => {
                    tracing::warn!(channel = %b.channel, alerts = b.alerts.len(), attempt = b.attempts + 1, error = %why, "alert delivery failed; it will be tried again");
                    self.outbox.failed(&b, &why)?;
                    pass.failed += 1;
                }
            }
        }
        Ok(pass)
    }

    pub fn pending(&self) -> Result<Pending, NotifyError> {
        self.outbox.pending()
    }

    pub fn failures(&self, limit: u32) -> Result<Vec<Failing>, NotifyError> {
        self.outbox.failures(limit)
    }
}

/// Passes every `interval` until `stop` says so (`sealctl notify --follow`).
pub fn follow(
    n: &mut Notifier,
    interval: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), NotifyError> {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::Relaxed) {
        match n.pass() {
            Ok(p) if p.sent + p.failed + p.queued > 0 => {
                tracing::info!(
                    queued = p.queued,
                    sent = p.sent,
                    failed = p.failed,
                    "alert delivery"
                )
            }
            Ok(_) => {}
            Err(e @ NotifyError::Log { .. }) => {
                tracing::warn!(error = %e, "cannot read the audit log now");
            }
            Err(e) => return Err(e),
        }
        std::thread::sleep(interval);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_close_at_their_window_and_single_alerts_go_at_once() {
        assert_eq!(digest_window(12_345, 0), 0);
        assert_eq!(digest_window(0, 60), 60_000);
        assert_eq!(digest_window(59_999, 60), 60_000);
        assert_eq!(digest_window(60_000, 60), 120_000);
        // A day: the digest of 2026-12-03 closes at 2026-12-04 00:00 UTC.
        let day = 1_796_256_000_000; // 2026-12-03T00:00:00Z
        assert_eq!(digest_window(day + 3_600_000, 86_400), day + 86_400_000);
    }

    #[test]
    fn routing_puts_each_alert_once_per_channel_and_the_cursor_moves_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(&dir.path().join("outbox.db")).unwrap();
        let route = |rules: &[&str], channels: &[&str], digest| RouteConfig {
            rules: rules.iter().map(|s| s.to_string()).collect(),
            channels: channels.iter().map(|s| s.to_string()).collect(),
            digest_seconds: digest,
        };
        let routes = [
            route(&["terminal_tamper"], &["keeper", "mail"], 0),
            route(&[], &["mail"], 86_400),
        ];
        let alert = |seq, rule: &str| Alert {
            seq,
            at_ms: now_ms(),
            rule: rule.into(),
            detail: String::new(),
            seal: "contract".into(),
            device: String::new(),
            applicant: String::new(),
            caller: String::new(),
            doc_sha256: String::new(),
            ref_seq: None,
            site: String::new(),
        };
        let n = o
            .enqueue(
                &routes,
                &[alert(3, "terminal_tamper"), alert(5, "off_hours")],
                9,
            )
            .unwrap();
        // Tamper: keeper and mail (at once; the digest's mail entry is the same pair and is
        // not added again); off_hours: the mail digest only.
        assert_eq!(n, 3);
        assert_eq!(o.cursor().unwrap(), 9);
        let due = o.due().unwrap();
        assert_eq!(due.len(), 2, "the digest is not due yet");
        assert!(due.iter().all(|b| b.alerts[0].seq == 3));
        // The same alerts again (a pass that read them twice) add nothing.
        assert_eq!(
            o.enqueue(&routes, &[alert(3, "terminal_tamper")], 9)
                .unwrap(),
            0
        );
        let b = &due[0];
        o.failed(b, "down").unwrap();
        assert_eq!(
            o.due().unwrap().len(),
            1,
            "a failed one waits for its pause"
        );
        assert_eq!(
            o.pending().unwrap(),
            Pending {
                delivered: 0,
                waiting: 2,
                failing: 1
            }
        );
        o.delivered(&due[1]).unwrap();
        assert_eq!(o.pending().unwrap().delivered, 1);
    }
}
