//! What headquarters' auditors' console reads of every site's records, and the events it adds
//! (schema 4, `console_events`).
//!
//! Owns: the console's SQL over PostgreSQL; each site is read in its enrolled epoch in force.
//! Never: writes anything but a `console_events` row (the console's role may do no more).

use super::db::{record_columns, record_from_row, Db, DbError};
use crate::audit::query::{Dialect, Filter, FilterValue, Stats, StatsBuilder};
use crate::audit::Record;
use std::collections::HashMap;
use tokio_postgres::types::ToSql;

/// Only records of each site's epoch in force.
const IN_FORCE: &str = "(site, epoch) IN (SELECT site, epoch FROM sites)";

/// A place in the newest-first order of every site's records: (at_ms, site, seq).
pub type Position = (i64, String, i64);

type Args = Vec<Box<dyn ToSql + Sync + Send>>;

fn refs(args: &Args) -> Vec<&(dyn ToSql + Sync)> {
    args.iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl Db {
    /// The statistics of `sealctl audit stats --since` over the sites given (None: all).
    pub async fn console_stats(
        &self,
        sites: Option<Vec<String>>,
        since_ms: i64,
        top: u64,
    ) -> Result<Stats, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT kind, seal, applicant, reason,
                            to_char(to_timestamp(at_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD'),
                            count(*), min(at_ms), max(at_ms)
                     FROM records WHERE {IN_FORCE} AND at_ms >= $1
                       AND ($2::text[] IS NULL OR site = ANY($2))
                     GROUP BY 1, 2, 3, 4, 5"
                ),
                &[&since_ms, &sites],
            )
            .await?;
        let mut b = StatsBuilder::default();
        for r in &rows {
            b.add(
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get::<_, i64>(5) as u64,
                r.get(6),
                r.get(7),
            );
        }
        Ok(b.finish(top))
    }

    /// Completed stamps, refusals and alerts of `[since, until)`, by site, over the sites
    /// given.
    pub async fn console_counts(
        &self,
        sites: Option<Vec<String>>,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, u64, u64, u64)>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT site, count(*) FILTER (WHERE kind = 'stamp.completed'),
                            count(*) FILTER (WHERE kind IN ('stamp.denied', 'access.denied')),
                            count(*) FILTER (WHERE kind = 'alert')
                     FROM records WHERE {IN_FORCE} AND at_ms >= $1 AND at_ms < $2
                       AND ($3::text[] IS NULL OR site = ANY($3))
                     GROUP BY site ORDER BY site"
                ),
                &[&since_ms, &until_ms, &sites],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, i64>(1) as u64,
                    r.get::<_, i64>(2) as u64,
                    r.get::<_, i64>(3) as u64,
                )
            })
            .collect())
    }

    /// Site alerts no auditor acknowledged yet.
    pub async fn console_open_alerts(&self, sites: Option<Vec<String>>) -> Result<u64, DbError> {
        let client = self.pool.get().await?;
        let r = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM records r WHERE {IN_FORCE} AND r.kind = 'alert'
                       AND ($1::text[] IS NULL OR r.site = ANY($1))
                       AND NOT EXISTS (SELECT 1 FROM console_events e WHERE e.site = r.site
                           AND e.epoch = r.epoch AND e.ref_seq = r.seq)"
                ),
                &[&sites],
            )
            .await?;
        Ok(r.get::<_, i64>(0) as u64)
    }

    /// Records matching `filter` over the sites given (and `site`), newest first, after
    /// `before`, at most `limit`.
    pub async fn console_search(
        &self,
        sites: Option<Vec<String>>,
        site: Option<String>,
        filter: &Filter,
        before: Option<Position>,
        limit: i64,
    ) -> Result<Vec<(String, Record)>, DbError> {
        let (conditions, values) = filter.conditions(Dialect::Postgres, 1);
        let mut args: Args = values
            .into_iter()
            .map(|v| match v {
                FilterValue::Int(i) => Box::new(i) as Box<dyn ToSql + Sync + Send>,
                FilterValue::Text(t) => Box::new(t),
            })
            .collect();
        let mut wheres = vec![IN_FORCE.to_string()];
        if !conditions.is_empty() {
            wheres.push(conditions);
        }
        args.push(Box::new(sites));
        wheres.push(format!(
            "(${0}::text[] IS NULL OR site = ANY(${0}))",
            args.len()
        ));
        if let Some(s) = site {
            args.push(Box::new(s));
            wheres.push(format!("site = ${}", args.len()));
        }
        if let Some((at, s, seq)) = before {
            args.push(Box::new(at));
            args.push(Box::new(s));
            args.push(Box::new(seq));
            let n = args.len();
            wheres.push(format!(
                "(at_ms, site, seq) < (${}, ${}, ${})",
                n - 2,
                n - 1,
                n
            ));
        }
        args.push(Box::new(limit));
        let sql = format!(
            "SELECT site, {} FROM records WHERE {} ORDER BY at_ms DESC, site DESC, seq DESC LIMIT ${}",
            record_columns(),
            wheres.join(" AND "),
            args.len()
        );
        let client = self.pool.get().await?;
        let rows = client.query(&sql, &refs(&args)).await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), record_from_row(r, 1)))
            .collect())
    }

    /// One record of a site's epoch in force, by seq.
    pub async fn console_record(&self, site: &str, seq: u64) -> Result<Option<Record>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT {} FROM records WHERE {IN_FORCE} AND site = $1 AND seq = $2",
                    record_columns()
                ),
                &[&site, &(seq.min(i64::MAX as u64) as i64)],
            )
            .await?;
        Ok(row.map(|r| record_from_row(&r, 0)))
    }

    /// The records that refer to this one (its outcome, its alerts), and the acknowledgements
    /// of it as records of kind `alert.acknowledged`, in time order.
    pub async fn console_referring(&self, site: &str, seq: u64) -> Result<Vec<Record>, DbError> {
        let client = self.pool.get().await?;
        let seq = seq.min(i64::MAX as u64) as i64;
        let rows = client
            .query(
                &format!(
                    "SELECT {} FROM records WHERE {IN_FORCE} AND site = $1 AND ref_seq = $2 ORDER BY seq",
                    record_columns()
                ),
                &[&site, &seq],
            )
            .await?;
        let mut out: Vec<Record> = rows.iter().map(|r| record_from_row(r, 0)).collect();
        out.extend(
            self.console_acks(site, &[seq])
                .await?
                .into_values()
                .flatten(),
        );
        out.sort_by_key(|r| r.at_ms);
        Ok(out)
    }

    /// The acknowledgements of these alerts of a site's epoch in force, by alert seq.
    async fn console_acks(
        &self,
        site: &str,
        seqs: &[i64],
    ) -> Result<HashMap<u64, Vec<Record>>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT e.ref_seq, e.at_ms, e.auditor, e.detail, e.console FROM console_events e
                 JOIN sites s ON s.site = e.site AND s.epoch = e.epoch
                 WHERE e.site = $1 AND e.ref_seq = ANY($2) ORDER BY e.id",
                &[&site, &seqs],
            )
            .await?;
        let mut out: HashMap<u64, Vec<Record>> = HashMap::new();
        for r in &rows {
            let seq = r.get::<_, i64>(0) as u64;
            let mut ack = Record::new(crate::audit::kind::ALERT_ACKNOWLEDGED);
            ack.at_ms = r.get(1);
            ack.applicant = r.get(2);
            ack.detail = r.get(3);
            ack.caller = r.get(4);
            ack.ref_seq = Some(seq);
            out.entry(seq).or_default().push(ack);
        }
        Ok(out)
    }

    /// The newest device-signed checkpoint at or after `seq` in a site's epoch in force.
    pub async fn console_checkpoint(
        &self,
        site: &str,
        seq: u64,
    ) -> Result<Option<crate::audit::Checkpoint>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT seq, prev_seq, head, at_ms, key_id, algorithm, signature FROM checkpoints
                     WHERE {IN_FORCE} AND site = $1 AND seq >= $2 ORDER BY seq LIMIT 1"
                ),
                &[&site, &(seq.min(i64::MAX as u64) as i64)],
            )
            .await?;
        Ok(row.map(|r| crate::audit::Checkpoint {
            seq: r.get::<_, i64>(0) as u64,
            prev_seq: r.get::<_, i64>(1) as u64,
            head: r.get::<_, Vec<u8>>(2).try_into().unwrap_or([0; 32]),
            at_ms: r.get(3),
            key_id: r.get(4),
            algorithm: r.get(5),
            signature: r.get(6),
        }))
    }

    /// Site alerts, newest first, after `before`, at most `limit`, with their
    /// acknowledgements; only those without one when `open_only`.
    pub async fn console_alerts(
        &self,
        sites: Option<Vec<String>>,
        before: Option<Position>,
        limit: i64,
        open_only: bool,
    ) -> Result<Vec<(String, Record, Vec<Record>)>, DbError> {
        let filter = Filter {
            kind: Some(crate::audit::kind::ALERT.into()),
            ..Filter::default()
        };
        // Open only: fetched a page at a time until enough are open.
        let mut out = Vec::new();
        let mut cursor = before;
        loop {
            let page = self
                .console_search(sites.clone(), None, &filter, cursor.clone(), limit.max(1))
                .await?;
            let done = (page.len() as i64) < limit.max(1);
            cursor = page.last().map(|(s, r)| (r.at_ms, s.clone(), r.seq as i64));
            let mut by_site: HashMap<String, Vec<i64>> = HashMap::new();
            for (s, r) in &page {
                by_site.entry(s.clone()).or_default().push(r.seq as i64);
            }
            let mut acks: HashMap<(String, u64), Vec<Record>> = HashMap::new();
            for (s, seqs) in by_site {
                for (seq, a) in self.console_acks(&s, &seqs).await? {
                    acks.insert((s.clone(), seq), a);
                }
            }
            for (s, r) in page {
                let a = acks.remove(&(s.clone(), r.seq)).unwrap_or_default();
                if !open_only || a.is_empty() {
                    out.push((s, r, a));
                }
            }
            if done || out.len() as i64 >= limit || !open_only {
                out.truncate(limit.max(0) as usize);
                return Ok(out);
            }
        }
    }

    /// Each site's newest alert seq (of its epoch in force).
    pub async fn console_alert_heads(&self) -> Result<HashMap<String, u64>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT site, max(seq) FROM records WHERE {IN_FORCE} AND kind = 'alert' GROUP BY site"
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    /// Site alerts after each site's seq in `after` (every alert of a site not in it), oldest
    /// first, at most 100.
    pub async fn console_alerts_after(
        &self,
        after: &HashMap<String, u64>,
    ) -> Result<Vec<(String, Record)>, DbError> {
        let (names, seqs): (Vec<String>, Vec<i64>) = after
            .iter()
            .map(|(s, q)| (s.clone(), (*q).min(i64::MAX as u64) as i64))
            .unzip();
        let client = self.pool.get().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT site, {} FROM records r WHERE {IN_FORCE} AND kind = 'alert'
                       AND seq > coalesce((SELECT x.seq FROM unnest($1::text[], $2::bigint[]) AS x(site, seq)
                                           WHERE x.site = r.site), 0)
                     ORDER BY at_ms, site, seq LIMIT 100",
                    record_columns()
                ),
                &[&names, &seqs],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), record_from_row(r, 1)))
            .collect())
    }

    /// Adds an auditor's event; an acknowledgement (`alert` = site and seq) only of an alert
    /// of that site's epoch in force. Its id.
    pub async fn console_event(
        &self,
        auditor: &str,
        kind: &str,
        reason: &str,
        detail: &str,
        alert: Option<(&str, u64)>,
    ) -> Result<i64, DbError> {
        let client = self.pool.get().await?;
        let row = match alert {
            None => {
                client
                    .query_opt(
                        "INSERT INTO console_events (auditor, kind, reason, detail)
                         VALUES ($1, $2, $3, $4) RETURNING id",
                        &[&auditor, &kind, &reason, &detail],
                    )
                    .await?
            }
            Some((site, seq)) => {
                client
                    .query_opt(
                        &format!(
                            "INSERT INTO console_events (auditor, kind, reason, detail, site, epoch, ref_seq)
                             SELECT $1, $2, $3, $4, site, epoch, seq FROM records
                             WHERE {IN_FORCE} AND site = $5 AND seq = $6 AND kind = 'alert'
                             RETURNING id"
                        ),
                        &[&auditor, &kind, &reason, &detail, &site, &(seq.min(i64::MAX as u64) as i64)],
                    )
                    .await?
            }
        };
        row.map(|r| r.get(0))
            .ok_or_else(|| DbError::Config("that record is not an alert of the site".into()))
    }
}
