//! What the console's pages read, behind one trait ([`ConsoleData`]) so the same pages serve a
//! single site's SQLite log ([`SiteLog`]) and, at headquarters, every site's records.
//!
//! Owns: the reads behind each page, limited to the sites the auditor may see.
//! Never: writes (the SQLite log is opened read-only; oversight records go through the daemon).

use super::ConsoleError;
use crate::audit::query::{self, Filter, Stats};
use crate::audit::{kind, Checkpoint, Record};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// The kind of the record that acknowledges an alert (its `ref_seq` is the alert).
pub const ALERT_ACKNOWLEDGED: &str = "alert.acknowledged";

/// The sites a request may read: every site, or those named.
#[derive(Debug, Clone)]
pub enum Scope {
    All,
    Sites(Vec<String>),
}

impl Scope {
    pub fn admits(&self, site: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Sites(s) => s.iter().any(|x| x == site),
        }
    }
}

/// A record and the site whose log holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SiteRecord {
    pub site: String,
    #[serde(flatten)]
    pub record: Record,
}

/// Counts of one period, for the comparison with the period before.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Counts {
    pub stamps: u64,
    pub refusals: u64,
    pub alerts: u64,
}

/// The overview page: the period's statistics (the same as `sealctl audit stats --since`),
/// the period before it, and the alerts nobody acknowledged yet.
#[derive(Debug, Default, serde::Serialize)]
pub struct Overview {
    pub stats: Stats,
    pub now: Counts,
    pub before: Counts,
    pub open_alerts: u64,
    /// At headquarters: the period's counts of each site.
    pub per_site: Vec<(String, Counts)>,
}

/// How a site looks from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteState {
    /// A checkpoint within the expected heartbeat.
    Active,
    /// Records, but no checkpoint for longer than that.
    Silent,
    /// No record at all.
    Never,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SiteStatus {
    pub site: String,
    pub state: SiteState,
    pub head_seq: u64,
    pub head_at_ms: Option<i64>,
    /// The newest device-signed checkpoint.
    pub checkpoint_seq: u64,
    pub checkpoint_at_ms: Option<i64>,
    /// Records after the newest checkpoint (not yet covered by a device signature).
    pub uncovered: u64,
    /// At headquarters: records the site said it holds that HQ has not verified yet, when it
    /// last said hello, and the central alerts raised about it (gap, fork, rollback, …) by
    /// kind.
    pub lag: Option<u64>,
    pub last_seen_ms: Option<i64>,
    pub flags: Vec<(String, u64)>,
}

/// A record with everything around it: what it refers to, what refers to it (its outcome, the
/// alerts it raised, acknowledgements), its neighbours in the chain and the checkpoint that
/// covers it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordPage {
    pub site: String,
    pub record: Record,
    pub refers_to: Option<Record>,
    pub referred_by: Vec<Record>,
    pub prev: Option<Record>,
    pub next: Option<Record>,
    pub checkpoint: Option<Checkpoint>,
}

/// An alert and its acknowledgements.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlertRow {
    pub alert: SiteRecord,
    pub acks: Vec<Record>,
}

pub type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<T, ConsoleError>> + Send + 'a>>;

/// Where each site's alert feed has got to: site → the seq of its newest alert seen.
pub type AlertHeads = HashMap<String, u64>;

/// The reads of the console's pages. Every method answers only within `scope`. Pages go on
/// from a position ([`ConsoleData::position`] of the last record shown), newest first.
pub trait ConsoleData: Send + Sync + 'static {
    fn sites(&self, scope: &Scope) -> Answer<'_, Vec<SiteStatus>>;
    /// Statistics of `[since_ms, until_ms)` and counts of the period of the same length before.
    fn overview(&self, scope: &Scope, since_ms: i64, until_ms: i64) -> Answer<'_, Overview>;
    /// Records matching `filter` (its limit applies), optionally of one site, newest first,
    /// after position `before`.
    fn search(
        &self,
        scope: &Scope,
        site: Option<String>,
        filter: Filter,
        before: Option<String>,
    ) -> Answer<'_, Vec<SiteRecord>>;
    /// Where a page that ended with `r` goes on from.
    fn position(&self, r: &SiteRecord) -> String;
    fn record(&self, site: String, seq: u64) -> Answer<'_, Option<RecordPage>>;
    /// Alerts, newest first, after position `before`, at most `limit`; only those without
    /// acknowledgement when `open_only`.
    fn alerts(
        &self,
        scope: &Scope,
        before: Option<String>,
        limit: u64,
        open_only: bool,
    ) -> Answer<'_, Vec<AlertRow>>;
    /// Each site's newest alert now (where the live feed starts).
    fn alert_heads(&self) -> Answer<'_, AlertHeads>;
    /// Alerts after `after`, oldest first (the live feed).
    fn alerts_after(&self, after: AlertHeads) -> Answer<'_, Vec<SiteRecord>>;
}

/// One site's SQLite log, opened read-only for each read.
pub struct SiteLog {
    pub site: String,
    pub db: PathBuf,
    /// A site with no checkpoint for this long is shown silent.
    pub silent_after_ms: i64,
}

impl SiteLog {
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ConsoleError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let conn = query::open_read_only(&db).map_err(|e| ConsoleError::Log(e.to_string()))?;
            f(&conn).map_err(|e| ConsoleError::Log(e.to_string()))
        })
        .await
        .map_err(|e| ConsoleError::Log(format!("a read stopped: {e}")))?
    }

    fn site_record(&self, record: Record) -> SiteRecord {
        SiteRecord {
            site: self.site.clone(),
            record,
        }
    }
}

/// Stamps, refusals and alerts of `[since, until)`, in one pass.
fn counts(conn: &rusqlite::Connection, since: i64, until: i64) -> rusqlite::Result<Counts> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, count(*) FROM audit WHERE at_ms >= ?1 AND at_ms < ?2 \
         AND kind IN ('stamp.completed', 'stamp.denied', 'access.denied', 'alert') GROUP BY kind",
    )?;
    let mut rows = stmt.query([since, until])?;
    let mut c = Counts::default();
    while let Some(r) = rows.next()? {
        let n = r.get::<_, i64>(1)? as u64;
        match r.get_ref(0)?.as_str().unwrap_or_default() {
            kind::STAMP_COMPLETED => c.stamps += n,
            kind::ALERT => c.alerts += n,
            _ => c.refusals += n,
        }
    }
    Ok(c)
}

fn records_referring(conn: &rusqlite::Connection, seq: u64) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM audit WHERE ref_seq = ?1 ORDER BY seq",
        query::record_columns()
    ))?;
    let rows = stmt.query_map([seq as i64], query::record_from_row)?;
    rows.collect()
}

impl ConsoleData for SiteLog {
    fn sites(&self, scope: &Scope) -> Answer<'_, Vec<SiteStatus>> {
        let seen = scope.admits(&self.site);
        Box::pin(async move {
            if !seen {
                return Ok(vec![]);
            }
            let site = self.site.clone();
            let silent_after = self.silent_after_ms;
            self.read(move |c| {
                let (head_seq, head_at): (i64, Option<i64>) = c.query_row(
                    "SELECT coalesce(max(seq), 0), max(at_ms) FROM audit",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let (cp_seq, cp_at): (i64, Option<i64>) = c.query_row(
                    "SELECT coalesce(max(seq), 0), max(at_ms) FROM checkpoints",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let state = match cp_at {
                    _ if head_seq == 0 => SiteState::Never,
                    Some(t) if crate::audit::now_ms() - t <= silent_after => SiteState::Active,
                    _ => SiteState::Silent,
                };
                Ok(vec![SiteStatus {
                    site,
                    state,
                    head_seq: head_seq as u64,
                    head_at_ms: head_at,
                    checkpoint_seq: cp_seq as u64,
                    checkpoint_at_ms: cp_at,
                    uncovered: (head_seq - cp_seq).max(0) as u64,
                    lag: None,
                    last_seen_ms: None,
                    flags: vec![],
                }])
            })
            .await
        })
    }

    fn overview(&self, scope: &Scope, since_ms: i64, until_ms: i64) -> Answer<'_, Overview> {
        let seen = scope.admits(&self.site);
        Box::pin(async move {
            if !seen {
                return Ok(Overview::default());
            }
            self.read(move |c| {
                let before_since = since_ms - (until_ms - since_ms);
                // The period is up to now, so the statistics since its start are its own.
                let stats = query::stats(c, Some(since_ms), 10)?;
                Ok(Overview {
                    now: Counts {
                        stamps: stats.completed,
                        refusals: stats.refused,
                        alerts: stats.alerts,
                    },
                    stats,
                    before: counts(c, before_since, since_ms)?,
                    per_site: vec![],
                    open_alerts: c.query_row(
                        "SELECT count(*) FROM audit a WHERE a.kind = 'alert' AND NOT EXISTS \
                         (SELECT 1 FROM audit k WHERE k.ref_seq = a.seq AND k.kind = ?1)",
                        [ALERT_ACKNOWLEDGED],
                        |r| r.get::<_, i64>(0),
                    )? as u64,
                })
            })
            .await
        })
    }

    fn search(
        &self,
        scope: &Scope,
        site: Option<String>,
        mut filter: Filter,
        before: Option<String>,
    ) -> Answer<'_, Vec<SiteRecord>> {
        let seen = scope.admits(&self.site) && site.is_none_or(|s| s == self.site);
        Box::pin(async move {
            if !seen {
                return Ok(vec![]);
            }
            filter.newest_first = true;
            if let Some(b) = before {
                filter.before_seq =
                    Some(b.parse().map_err(|_| {
                        ConsoleError::Log(format!("{b:?} is not a place in this log"))
                    })?);
            }
            let rows = self
                .read(move |c| {
                    let mut out = Vec::new();
                    query::for_each(c, &filter, |r| {
                        out.push(r);
                        Ok(())
                    })
                    .map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?;
                    Ok(out)
                })
                .await?;
            Ok(rows.into_iter().map(|r| self.site_record(r)).collect())
        })
    }

    fn position(&self, r: &SiteRecord) -> String {
        r.record.seq.to_string()
    }

    fn record(&self, site: String, seq: u64) -> Answer<'_, Option<RecordPage>> {
        Box::pin(async move {
            if site != self.site {
                return Ok(None);
            }
            let page = self
                .read(move |c| {
                    let Some(record) = query::record_by_seq(c, seq)? else {
                        return Ok(None);
                    };
                    let refers_to = match record.ref_seq {
                        Some(r) => query::record_by_seq(c, r)?,
                        None => None,
                    };
                    Ok(Some(RecordPage {
                        site,
                        refers_to,
                        referred_by: records_referring(c, seq)?,
                        prev: query::record_by_seq(c, seq.saturating_sub(1))?,
                        next: query::record_by_seq(c, seq + 1)?,
                        checkpoint: query::checkpoints_after(c, seq.saturating_sub(1), 1)?.pop(),
                        record,
                    }))
                })
                .await?;
            Ok(page)
        })
    }

    fn alerts(
        &self,
        scope: &Scope,
        before: Option<String>,
        limit: u64,
        open_only: bool,
    ) -> Answer<'_, Vec<AlertRow>> {
        let seen = scope.admits(&self.site);
        Box::pin(async move {
            if !seen {
                return Ok(vec![]);
            }
            let before: Option<u64> =
                match before {
                    Some(b) => Some(b.parse().map_err(|_| {
                        ConsoleError::Log(format!("{b:?} is not a place in this log"))
                    })?),
                    None => None,
                };
            let rows = self
                .read(move |c| {
                    let mut stmt = c.prepare(&format!(
                        "SELECT {} FROM audit a WHERE kind = 'alert' AND seq < ?1 \
                         AND (?2 = 0 OR NOT EXISTS (SELECT 1 FROM audit k WHERE k.ref_seq = a.seq AND k.kind = ?3)) \
                         ORDER BY seq DESC LIMIT ?4",
                        query::record_columns()
                    ))?;
                    let alerts = stmt
                        .query_map(
                            rusqlite::params![
                                before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64),
                                open_only as i64,
                                ALERT_ACKNOWLEDGED,
                                limit.min(i64::MAX as u64) as i64
                            ],
                            query::record_from_row,
                        )?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    alerts
                        .into_iter()
                        .map(|a| {
                            let acks = records_referring(c, a.seq)?
                                .into_iter()
                                .filter(|r| r.kind == ALERT_ACKNOWLEDGED)
                                .collect();
                            Ok((a, acks))
                        })
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .await?;
            Ok(rows
                .into_iter()
                .map(|(a, acks)| AlertRow {
                    alert: self.site_record(a),
                    acks,
                })
                .collect())
        })
    }

    fn alert_heads(&self) -> Answer<'_, AlertHeads> {
        Box::pin(async move {
            let site = self.site.clone();
            self.read(move |c| {
                let head: i64 = c.query_row(
                    "SELECT coalesce(max(seq), 0) FROM audit WHERE kind = 'alert'",
                    [],
                    |r| r.get(0),
                )?;
                Ok(HashMap::from([(site, head as u64)]))
            })
            .await
        })
    }

    fn alerts_after(&self, after: AlertHeads) -> Answer<'_, Vec<SiteRecord>> {
        Box::pin(async move {
            let from = after.get(&self.site).copied().unwrap_or(0);
            let rows = self
                .read(move |c| {
                    let mut stmt = c.prepare(&format!(
                        "SELECT {} FROM audit WHERE seq > ?1 AND kind = ?2 ORDER BY seq LIMIT 100",
                        query::record_columns()
                    ))?;
                    let rows = stmt
                        .query_map(
                            rusqlite::params![from.min(i64::MAX as u64) as i64, kind::ALERT],
                            query::record_from_row,
                        )?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    Ok(rows)
                })
                .await?;
            Ok(rows.into_iter().map(|r| self.site_record(r)).collect())
        })
    }
}
