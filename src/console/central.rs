//! The console's pages over headquarters' PostgreSQL: every enrolled site's verified records
//! (each in its epoch in force), the sites board from HQ's heads and central alerts, and
//! acknowledgements kept in HQ's `console_events`.
//!
//! Owns: turning HQ's reads ([`crate::hq::reads`]) into the console's answers, within the
//! auditor's sites. Never: writes (the database role it uses cannot).

use super::data::{
    AlertHeads, AlertRow, Answer, ConsoleData, Counts, Overview, RecordPage, Scope, SiteRecord,
    SiteState, SiteStatus,
};
use super::ConsoleError;
use crate::audit::query::Filter;
use crate::hq::db::Db;
use crate::hq::reads::Position;

/// Every site's records at headquarters.
pub struct CentralLog {
    pub db: Db,
    /// A site that has not said hello for this long is shown silent.
    pub silent_after_ms: i64,
}

fn db_error(e: crate::hq::db::DbError) -> ConsoleError {
    ConsoleError::Log(e.to_string())
}

/// The sites of a scope as the queries take them (None: all).
fn sites_of(scope: &Scope) -> Option<Vec<String>> {
    match scope {
        Scope::All => None,
        Scope::Sites(s) => Some(s.clone()),
    }
}

/// A position of the newest-first order across sites, written `at_ms:seq:site`.
fn parse_position(p: &str) -> Result<Position, ConsoleError> {
    let bad = || ConsoleError::Log(format!("{p:?} is not a place in these logs"));
    let mut parts = p.splitn(3, ':');
    let at = parts.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let seq = parts.next().and_then(|x| x.parse().ok()).ok_or_else(bad)?;
    let site = parts.next().ok_or_else(bad)?.to_string();
    Ok((at, site, seq))
}

impl ConsoleData for CentralLog {
    fn sites(&self, scope: &Scope) -> Answer<'_, Vec<SiteStatus>> {
        let scope = scope.clone();
        Box::pin(async move {
            let stats = self.db.site_stats(None).await.map_err(db_error)?;
            let flags = self.db.alert_counts().await.map_err(db_error)?;
            let now = crate::audit::now_ms();
            Ok(stats
                .into_iter()
                .filter(|s| scope.admits(&s.site))
                .map(|s| {
                    let state = match s.last_seen_ms {
                        None if s.head_seq == 0 => SiteState::Never,
                        Some(t) if now - t <= self.silent_after_ms => SiteState::Active,
                        _ => SiteState::Silent,
                    };
                    SiteStatus {
                        flags: flags
                            .iter()
                            .filter(|(site, _, _)| *site == s.site)
                            .map(|(_, kind, n)| (kind.clone(), *n as u64))
                            .collect(),
                        state,
                        head_seq: s.head_seq,
                        head_at_ms: s.head_at_ms,
                        checkpoint_seq: s.head_seq,
                        checkpoint_at_ms: s.head_at_ms,
                        uncovered: 0,
                        lag: Some(s.lag_records),
                        last_seen_ms: s.last_seen_ms,
                        site: s.site,
                    }
                })
                .collect())
        })
    }

    fn overview(&self, scope: &Scope, since_ms: i64, until_ms: i64) -> Answer<'_, Overview> {
        let sites = sites_of(scope);
        Box::pin(async move {
            let stats = self
                .db
                .console_stats(sites.clone(), since_ms, 10)
                .await
                .map_err(db_error)?;
            let counts = |rows: Vec<(String, u64, u64, u64)>| -> Vec<(String, Counts)> {
                rows.into_iter()
                    .map(|(site, stamps, refusals, alerts)| {
                        (
                            site,
                            Counts {
                                stamps,
                                refusals,
                                alerts,
                            },
                        )
                    })
                    .collect()
            };
            let before = counts(
                self.db
                    .console_counts(sites.clone(), since_ms - (until_ms - since_ms), since_ms)
                    .await
                    .map_err(db_error)?,
            );
            let per_site = counts(
                self.db
                    .console_counts(sites.clone(), since_ms, until_ms)
                    .await
                    .map_err(db_error)?,
            );
            Ok(Overview {
                now: Counts {
                    stamps: stats.completed,
                    refusals: stats.refused,
                    alerts: stats.alerts,
                },
                before: before.iter().fold(Counts::default(), |a, (_, c)| Counts {
                    stamps: a.stamps + c.stamps,
                    refusals: a.refusals + c.refusals,
                    alerts: a.alerts + c.alerts,
                }),
                per_site,
                open_alerts: self.db.console_open_alerts(sites).await.map_err(db_error)?,
                stats,
            })
        })
    }

    fn search(
        &self,
        scope: &Scope,
        site: Option<String>,
        filter: Filter,
        before: Option<String>,
    ) -> Answer<'_, Vec<SiteRecord>> {
        let sites = sites_of(scope);
        Box::pin(async move {
            let before = before.as_deref().map(parse_position).transpose()?;
            let limit = filter.limit.unwrap_or(50).min(i64::MAX as u64) as i64;
            let rows = self
                .db
                .console_search(sites, site, &filter, before, limit)
                .await
                .map_err(db_error)?;
            Ok(rows
                .into_iter()
                .map(|(site, record)| SiteRecord { site, record })
                .collect())
        })
    }

    fn position(&self, r: &SiteRecord) -> String {
        format!("{}:{}:{}", r.record.at_ms, r.record.seq, r.site)
    }

    fn record(&self, site: String, seq: u64) -> Answer<'_, Option<RecordPage>> {
        Box::pin(async move {
            let db = &self.db;
            let Some(record) = db.console_record(&site, seq).await.map_err(db_error)? else {
                return Ok(None);
            };
            let refers_to = match record.ref_seq {
                Some(r) => db.console_record(&site, r).await.map_err(db_error)?,
                None => None,
            };
            Ok(Some(RecordPage {
                refers_to,
                referred_by: db.console_referring(&site, seq).await.map_err(db_error)?,
                prev: db
                    .console_record(&site, seq.saturating_sub(1))
                    .await
                    .map_err(db_error)?,
                next: db.console_record(&site, seq + 1).await.map_err(db_error)?,
                checkpoint: db.console_checkpoint(&site, seq).await.map_err(db_error)?,
                record,
                site,
            }))
        })
    }

    fn alerts(
        &self,
        scope: &Scope,
        before: Option<String>,
        limit: u64,
        open_only: bool,
    ) -> Answer<'_, Vec<AlertRow>> {
        let sites = sites_of(scope);
        Box::pin(async move {
            let before = before.as_deref().map(parse_position).transpose()?;
            let rows = self
                .db
                .console_alerts(sites, before, limit.min(i64::MAX as u64) as i64, open_only)
                .await
                .map_err(db_error)?;
            Ok(rows
                .into_iter()
                .map(|(site, record, acks)| AlertRow {
                    alert: SiteRecord { site, record },
                    acks,
                })
                .collect())
        })
    }

    fn alert_heads(&self) -> Answer<'_, AlertHeads> {
        Box::pin(async move { self.db.console_alert_heads().await.map_err(db_error) })
    }

    fn alerts_after(&self, after: AlertHeads) -> Answer<'_, Vec<SiteRecord>> {
        Box::pin(async move {
            let rows = self
                .db
                .console_alerts_after(&after)
                .await
                .map_err(db_error)?;
            Ok(rows
                .into_iter()
                .map(|(site, record)| SiteRecord { site, record })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_names_its_time_seq_and_site() {
        assert_eq!(
            parse_position("1796000000000:42:shang:hai").unwrap(),
            (1_796_000_000_000, "shang:hai".to_string(), 42)
        );
        for bad in ["", "12", "12:x:site", "x:1:site", "12:1"] {
            assert!(parse_position(bad).is_err(), "{bad}");
        }
    }
}
