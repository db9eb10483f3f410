//! Reading the log: records by filter, checkpoints, the audit keys, and statistics. Used by
//! `sealctl audit` on the database file (offline) and by the daemon.
//!
//! Owns: the SQL that reads the `audit`, `checkpoints` and `audit_keys` tables.
//! Never: writes.

use super::{Checkpoint, Record, TEXT_COLUMNS, TEXT_FIELDS};
use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension, Row};
use std::path::Path;

/// Opens a log's database read-only.
pub fn open_read_only(path: &Path) -> Result<Connection, rusqlite::Error> {
    if !path.exists() {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("{} does not exist", path.display())),
        ));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The columns [`record_from_row`] expects, in order.
pub fn record_columns() -> String {
    format!(
        "seq, at_ms, {}, amount, ref_seq, prev_hash, hash",
        TEXT_COLUMNS.join(", ")
    )
}

fn blob32(row: &Row<'_>, i: usize) -> rusqlite::Result<[u8; 32]> {
    let v = row.get_ref(i)?;
    let b = v
        .as_blob()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e)))?;
    b.try_into().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Blob,
            format!("column {i} holds {} bytes, not 32", b.len()).into(),
        )
    })
}

pub fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Record> {
    let mut r = Record::default();
    read_row_into(row, &mut r)?;
    Ok(r)
}

/// Reads a row of [`record_columns`] into `r`, reusing its strings' memory: the verifier reads
/// millions of rows through one pair of records.
pub fn read_row_into(row: &Row<'_>, r: &mut Record) -> rusqlite::Result<()> {
    for (i, t) in r.text_mut().into_iter().enumerate() {
        t.clear();
        match row.get_ref(2 + i)? {
            rusqlite::types::ValueRef::Text(b) => {
                t.push_str(std::str::from_utf8(b).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2 + i,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?)
            }
            other => {
                return Err(rusqlite::Error::InvalidColumnType(
                    2 + i,
                    TEXT_COLUMNS[i].into(),
                    other.data_type(),
                ))
            }
        }
    }
    let n = 2 + TEXT_FIELDS;
    r.seq = row.get::<_, i64>(0)? as u64;
    r.at_ms = row.get(1)?;
    r.amount = row.get(n)?;
    r.ref_seq = row.get::<_, Option<i64>>(n + 1)?.map(|s| s as u64);
    r.prev_hash = blob32(row, n + 2)?;
    r.hash = blob32(row, n + 3)?;
    Ok(())
}

pub fn record_by_seq(conn: &Connection, seq: u64) -> rusqlite::Result<Option<Record>> {
    conn.query_row(
        &format!("SELECT {} FROM audit WHERE seq = ?1", record_columns()),
        [seq as i64],
        record_from_row,
    )
    .optional()
}

pub fn checkpoints(conn: &Connection) -> rusqlite::Result<Vec<Checkpoint>> {
    checkpoints_after(conn, 0, u64::MAX)
}

/// The checkpoints covering records after `seq`, oldest first, at most `limit` of them.
pub fn checkpoints_after(
    conn: &Connection,
    seq: u64,
    limit: u64,
) -> rusqlite::Result<Vec<Checkpoint>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, prev_seq, head, at_ms, key_id, algorithm, signature FROM checkpoints
         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt.query_map(rusqlite::params![seq as i64, limit], |r| {
        Ok(Checkpoint {
            seq: r.get::<_, i64>(0)? as u64,
            prev_seq: r.get::<_, i64>(1)? as u64,
            head: blob32(r, 2)?,
            at_ms: r.get(3)?,
            key_id: r.get(4)?,
            algorithm: r.get(5)?,
            signature: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// An audit key as the log recorded it: id, algorithm, SPKI DER.
pub fn audit_keys(conn: &Connection) -> rusqlite::Result<Vec<(String, String, Vec<u8>)>> {
    let mut stmt =
        conn.prepare("SELECT key_id, algorithm, spki FROM audit_keys ORDER BY key_id")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// Filters of `sealctl audit query`; every one that is set must hold.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub seal: Option<String>,
    pub applicant: Option<String>,
    pub approver: Option<String>,
    pub caller: Option<String>,
    pub kind: Option<String>,
    pub reason: Option<String>,
    pub doc_sha256: Option<String>,
    pub doc_type: Option<String>,
    /// Only records before this one (the console's pages: keyset paging, newest first).
    pub before_seq: Option<u64>,
    /// Newest first rather than in log order.
    pub newest_first: bool,
    pub limit: Option<u64>,
}

/// A value a filter compares with.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    Int(i64),
    Text(String),
}

/// The SQL a database speaks where the filters differ.
pub enum Dialect {
    /// SQLite: `?N` placeholders, `json_each` over the approvers.
    Sqlite,
    /// PostgreSQL: `$N` placeholders, `jsonb_array_elements` over the approvers.
    Postgres,
}

impl Filter {
    /// The conditions of the filters that are set, joined by AND (empty when none is), with
    /// placeholders numbered from `first`, and their values in order.
    pub fn conditions(&self, dialect: Dialect, first: usize) -> (String, Vec<FilterValue>) {
        let mut clauses = Vec::new();
        let mut args = Vec::new();
        let mut add = |clause: &str, v: FilterValue| {
            args.push(v);
            let n = first + args.len() - 1;
            let placeholder = match dialect {
                Dialect::Sqlite => format!("?{n}"),
                Dialect::Postgres => format!("${n}"),
            };
            clauses.push(clause.replace('?', &placeholder));
        };
        if let Some(t) = self.since_ms {
            add("at_ms >= ?", FilterValue::Int(t));
        }
        if let Some(t) = self.until_ms {
            add("at_ms < ?", FilterValue::Int(t));
        }
        if let Some(s) = &self.seal {
            add("seal = ?", FilterValue::Text(s.clone()));
        }
        if let Some(s) = &self.applicant {
            add("applicant = ?", FilterValue::Text(s.clone()));
        }
        if let Some(s) = &self.caller {
            add("caller = ?", FilterValue::Text(s.clone()));
        }
        if let Some(s) = &self.approver {
            add(
                match dialect {
                    Dialect::Sqlite => "approvers <> '' AND EXISTS (SELECT 1 FROM json_each(approvers) WHERE json_extract(value, '$.id') = ?)",
                    Dialect::Postgres => "approvers <> '' AND EXISTS (SELECT 1 FROM jsonb_array_elements(approvers::jsonb) e WHERE e->>'id' = ?)",
                },
                FilterValue::Text(s.clone()),
            );
        }
        if let Some(s) = &self.kind {
            add("kind = ?", FilterValue::Text(s.clone()));
        }
        if let Some(s) = &self.reason {
            add("reason = ?", FilterValue::Text(s.clone()));
        }
        if let Some(s) = &self.doc_sha256 {
            // The first term is the index's own condition (audit_doc_any), so SQLite uses it.
            add(
                "doc_sha256 <> '' AND doc_sha256 = ?",
                FilterValue::Text(s.to_ascii_lowercase()),
            );
        }
        if let Some(s) = &self.doc_type {
            add("doc_type = ?", FilterValue::Text(s.clone()));
        }
        if let Some(n) = self.before_seq {
            add("seq < ?", FilterValue::Int(n.min(i64::MAX as u64) as i64));
        }
        (clauses.join(" AND "), args)
    }

    fn sql(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value;
        let (conditions, args) = self.conditions(Dialect::Sqlite, 1);
        let mut sql = format!("SELECT {} FROM audit", record_columns());
        if !conditions.is_empty() {
            sql += " WHERE ";
            sql += &conditions;
        }
        sql += if self.newest_first {
            " ORDER BY seq DESC"
        } else {
            " ORDER BY seq"
        };
        if let Some(n) = self.limit {
            sql += &format!(" LIMIT {n}");
        }
        let args = args
            .into_iter()
            .map(|v| match v {
                FilterValue::Int(i) => Value::Integer(i),
                FilterValue::Text(t) => Value::Text(t),
            })
            .collect();
        (sql, args)
    }
}

/// A seal's public key as the log knows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SealKeyRow {
    pub key_id: String,
    pub seal: String,
    pub algorithm: String,
    #[serde(with = "hex::serde")]
    pub spki: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}

/// Every seal key the daemon recorded (certificates as PEM), by key id.
pub fn seal_keys(conn: &Connection) -> rusqlite::Result<Vec<SealKeyRow>> {
    let has: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'seal_keys'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT key_id, seal, algorithm, spki, certificate FROM seal_keys ORDER BY key_id, algorithm",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SealKeyRow {
            key_id: r.get(0)?,
            seal: r.get(1)?,
            algorithm: r.get(2)?,
            spki: r.get(3)?,
            certificate: r
                .get::<_, Option<Vec<u8>>>(4)?
                .map(|der| crate::device::keys::pem("CERTIFICATE", &der)),
        })
    })?;
    rows.collect()
}

/// Records the seals' public keys (and certificates) once each, for verifiers.
pub fn record_seal_keys<'a>(
    conn: &Connection,
    seals: impl Iterator<Item = (&'a str, &'a crate::device::SealKey)>,
    now_ms: i64,
) -> rusqlite::Result<()> {
    for (seal, k) in seals {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO seal_keys (key_id, seal, algorithm, spki, certificate, first_seen_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(rusqlite::params![
            super::key_id(&k.spki_der),
            seal,
            k.algorithm.name(),
            k.spki_der,
            k.certificate_der,
            now_ms
        ])?;
    }
    Ok(())
}

/// Calls `f` on every record matching `filter`, in seq order.
pub fn for_each(
    conn: &Connection,
    filter: &Filter,
    mut f: impl FnMut(Record) -> Result<(), String>,
) -> Result<(), String> {
    let (sql, args) = filter.sql();
    let mut stmt = conn.prepare(&sql).map_err(|e| e.to_string())?;
    let mut rows = stmt
        .query(params_from_iter(args))
        .map_err(|e| e.to_string())?;
    while let Some(row) = rows.next().map_err(|e| e.to_string())? {
        f(record_from_row(row).map_err(|e| e.to_string())?)?;
    }
    Ok(())
}

/// What the audit log remembers of terminal `id`, for its session after a restart.
#[derive(Debug, Default, PartialEq)]
pub struct TerminalMemory {
    /// The impression counter last recorded (from the `counter_after` of its newest HELLO,
    /// impression or rejection that set one).
    pub counter: Option<u64>,
    /// SHA-256 of the body of the newest signed report recorded: the one report the terminal
    /// may still send again, when the daemon stopped before its ACK went out.
    pub last_report: Option<[u8; 32]>,
    /// The newest grant, unless a LOCKED, TAMPER or end-of-grant record closed it.
    pub grant: Option<RecordedGrant>,
}

/// A `terminal.granted` record that nothing has closed yet.
#[derive(Debug, PartialEq)]
pub struct RecordedGrant {
    pub seq: u64,
    pub at_ms: i64,
    pub grant_id: [u8; 16],
    pub impressions: u32,
    pub seconds: u32,
    /// Impressions recorded against it (taken, or made past a counter gap).
    pub used: u32,
    pub jti: String,
    pub applicant: String,
    pub doc_sha256: String,
}

/// Reads [`TerminalMemory`]. Terminal records without a report (link changes, heartbeats)
/// have empty evidence and are passed over.
pub fn terminal_memory(conn: &Connection, id: &str) -> rusqlite::Result<TerminalMemory> {
    let bad = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
    };
    let newest = |what: &str| {
        format!(
            "SELECT v FROM (SELECT seq, CASE WHEN json_valid(evidence) \
               THEN json_extract(evidence, '$.{what}') END AS v FROM audit \
               WHERE device = ?1 AND kind LIKE 'terminal.%') \
             WHERE v IS NOT NULL ORDER BY seq DESC LIMIT 1"
        )
    };
    let counter = conn
        .query_row(&newest("counter_after"), [id], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|c| c as u64);
    let last_report = conn
        .query_row(&newest("body"), [id], |r| r.get::<_, String>(0))
        .optional()?
        .map(|b| {
            use base64::Engine;
            use sha2::Digest;
            base64::engine::general_purpose::STANDARD
                .decode(b)
                .map(|body| sha2::Sha256::digest(body).into())
                .map_err(|e| bad(format!("the newest report's body is not base64: {e}")))
        })
        .transpose()?;
    let grant = conn
        .query_row(
            "SELECT seq, at_ms, json_extract(evidence, '$.grant_id'), \
               json_extract(evidence, '$.impressions'), json_extract(evidence, '$.seconds'), \
               jti, applicant, doc_sha256 FROM audit \
             WHERE device = ?1 AND kind = 'terminal.granted' ORDER BY seq DESC LIMIT 1",
            [id],
            |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, String>(7)?,
                ))
            },
        )
        .optional()?;
    let Some((seq, at_ms, grant_id, impressions, seconds, jti, applicant, doc_sha256)) = grant
    else {
        return Ok(TerminalMemory {
            counter,
            last_report,
            grant: None,
        });
    };
    let (closed, used): (i64, i64) = conn.query_row(
        "SELECT \
               count(*) FILTER (WHERE kind IN ('terminal.locked', 'terminal.tamper', \
                 'terminal.grant_expired')), \
               count(*) FILTER (WHERE kind = 'terminal.impression' \
                 OR (kind = 'terminal.rejected' AND reason = 'counter_gap')) \
             FROM audit WHERE ref_seq = ?1 AND device = ?2",
        rusqlite::params![seq as i64, id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let grant = if closed > 0 {
        None
    } else {
        let grant_id = hex::decode(&grant_id)
            .ok()
            .and_then(|g| <[u8; 16]>::try_from(g).ok())
            .ok_or_else(|| bad(format!("grant record {seq} has no 16-byte grant id")))?;
        Some(RecordedGrant {
            seq,
            at_ms,
            grant_id,
            impressions: impressions as u32,
            seconds: seconds as u32,
            used: used as u32,
            jti,
            applicant,
            doc_sha256,
        })
    };
    Ok(TerminalMemory {
        counter,
        last_report,
        grant,
    })
}

/// The most recent `n` records of `kind`, oldest first.
pub fn latest(conn: &Connection, kind: &str, n: u64) -> rusqlite::Result<Vec<Record>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT * FROM (SELECT {} FROM audit WHERE kind = ?1 ORDER BY seq DESC LIMIT ?2) ORDER BY seq",
        record_columns()
    ))?;
    let rows = stmt.query_map(rusqlite::params![kind, n as i64], record_from_row)?;
    rows.collect()
}

/// What `sealctl audit stats` prints.
#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub records: u64,
    pub first_at_ms: Option<i64>,
    pub last_at_ms: Option<i64>,
    /// (day in UTC, seal, completed stamps)
    pub stamps_per_seal_per_day: Vec<(String, String, u64)>,
    /// (applicant, completed stamps), most first.
    pub top_applicants: Vec<(String, u64)>,
    /// (reason, denials), most first.
    pub denials_by_reason: Vec<(String, u64)>,
    /// (rule, alerts), most first.
    pub alerts_by_rule: Vec<(String, u64)>,
    pub outcomes_unknown: u64,
    pub failed: u64,
    /// Completed stamps, refusals (`stamp.denied`, `access.denied`) and alerts, all of them.
    pub completed: u64,
    pub refused: u64,
    pub alerts: u64,
}

/// Sums grouped counts (kind, seal, applicant, reason, day) into [`Stats`]: the one pass of
/// [`stats`] here, and headquarters' over PostgreSQL.
#[derive(Default)]
pub struct StatsBuilder {
    s: Stats,
    per_day: std::collections::BTreeMap<(String, String), u64>,
    applicants: std::collections::BTreeMap<String, u64>,
    denials: std::collections::BTreeMap<String, u64>,
    alerts: std::collections::BTreeMap<String, u64>,
}

impl StatsBuilder {
    /// `n` records of `kind` (with that seal, applicant, reason, UTC day), the first and last
    /// of them at these times.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        kind: &str,
        seal: &str,
        applicant: &str,
        reason: &str,
        day: &str,
        n: u64,
        first: i64,
        last: i64,
    ) {
        let s = &mut self.s;
        s.records += n;
        s.first_at_ms = Some(s.first_at_ms.map_or(first, |f| f.min(first)));
        s.last_at_ms = Some(s.last_at_ms.map_or(last, |l| l.max(last)));
        match kind {
            super::kind::STAMP_COMPLETED => {
                *self
                    .per_day
                    .entry((day.to_string(), seal.to_string()))
                    .or_default() += n;
                *self.applicants.entry(applicant.to_string()).or_default() += n;
                s.completed += n;
            }
            super::kind::STAMP_DENIED | super::kind::ACCESS_DENIED => {
                let key = if reason.is_empty() { kind } else { reason };
                *self.denials.entry(key.to_string()).or_default() += n;
                s.refused += n;
            }
            super::kind::ALERT => {
                *self.alerts.entry(reason.to_string()).or_default() += n;
                s.alerts += n;
            }
            super::kind::STAMP_OUTCOME_UNKNOWN => s.outcomes_unknown += n,
            super::kind::STAMP_FAILED => s.failed += n,
            _ => {}
        }
    }

    /// The statistics, with the first `top` of each ranking (most first, then by name).
    pub fn finish(self, top: u64) -> Stats {
        let mut s = self.s;
        s.stamps_per_seal_per_day = self
            .per_day
            .into_iter()
            .map(|((day, seal), n)| (day, seal, n))
            .collect();
        let ranked = |m: std::collections::BTreeMap<String, u64>| {
            let mut v: Vec<(String, u64)> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v.truncate(top.min(usize::MAX as u64) as usize);
            v
        };
        s.top_applicants = ranked(self.applicants);
        s.denials_by_reason = ranked(self.denials);
        s.alerts_by_rule = ranked(self.alerts);
        s
    }
}

/// The figures of `sealctl audit stats` (and the console's overview) for the records since
/// `since_ms`, from one pass over them: counts grouped by kind, seal, applicant, reason and day
/// (UTC), summed by [`StatsBuilder`].
pub fn stats(conn: &Connection, since_ms: Option<i64>, top: u64) -> rusqlite::Result<Stats> {
    let since = since_ms.unwrap_or(i64::MIN);
    let mut b = StatsBuilder::default();
    let mut stmt = conn.prepare(
        "SELECT kind, seal, applicant, reason, date(at_ms / 1000, 'unixepoch'), count(*), \
         min(at_ms), max(at_ms) FROM audit WHERE at_ms >= ?1 GROUP BY 1, 2, 3, 4, 5",
    )?;
    let mut rows = stmt.query([since])?;
    while let Some(r) = rows.next()? {
        let text = |i: usize| -> rusqlite::Result<&str> {
            Ok(r.get_ref(i)?.as_str_or_null()?.unwrap_or_default())
        };
        b.add(
            text(0)?,
            text(1)?,
            text(2)?,
            text(3)?,
            text(4)?,
            r.get::<_, i64>(5)? as u64,
            r.get(6)?,
            r.get(7)?,
        );
    }
    Ok(b.finish(top))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{kind, log::insert_record, Record};

    /// The one-pass statistics against one plain query per figure, on a log of every kind over
    /// several days, seals, applicants and reasons.
    #[test]
    fn one_pass_statistics_equal_a_query_per_figure() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let day = 86_400_000i64;
        let kinds = [
            kind::STAMP_AUTHORIZED,
            kind::STAMP_COMPLETED,
            kind::STAMP_COMPLETED,
            kind::STAMP_DENIED,
            kind::ACCESS_DENIED,
            kind::ALERT,
            kind::STAMP_FAILED,
            kind::STAMP_OUTCOME_UNKNOWN,
            kind::AUDIT_HEARTBEAT,
        ];
        store
            .with(|c| {
                for i in 0..500i64 {
                    let mut r = Record::new(kinds[(i % 9) as usize]);
                    r.seq = i as u64 + 1;
                    r.at_ms = 1_790_000_000_000 + (i % 7) * day + i * 1000;
                    r.seal = ["contract", "finance", "official"][(i % 3) as usize].into();
                    r.applicant = format!("applicant-{}", i % 13);
                    r.reason = ["", "replayed", "expired", "off_hours"][(i % 4) as usize].into();
                    insert_record(c, &r)?;
                }
                Ok(())
            })
            .unwrap();
        let conn = open_read_only(&crate::store::db_path(dir.path())).unwrap();
        let since = 1_790_000_000_000 + 2 * day;
        let s = stats(&conn, Some(since), 5).unwrap();
        let pairs = |sql: &str| -> Vec<(String, u64)> {
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map(rusqlite::params![since, 5], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
        };
        let one = |sql: &str| -> u64 {
            conn.query_row(sql, [since], |r| r.get::<_, i64>(0))
                .unwrap() as u64
        };
        assert_eq!(
            s.records,
            one("SELECT count(*) FROM audit WHERE at_ms >= ?1")
        );
        let mut stmt = conn
            .prepare(
                "SELECT date(at_ms / 1000, 'unixepoch') AS day, seal, count(*) FROM audit \
                 WHERE kind = 'stamp.completed' AND at_ms >= ?1 GROUP BY day, seal ORDER BY day, seal",
            )
            .unwrap();
        let per_day: Vec<(String, String, u64)> = stmt
            .query_map([since], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(per_day.len() > 5);
        assert_eq!(s.stamps_per_seal_per_day, per_day);
        assert_eq!(
            s.top_applicants,
            pairs(
                "SELECT applicant, count(*) AS n FROM audit WHERE kind = 'stamp.completed' AND at_ms >= ?1 \
                 GROUP BY applicant ORDER BY n DESC, applicant LIMIT ?2"
            )
        );
        assert_eq!(
            s.denials_by_reason,
            pairs(
                "SELECT CASE WHEN reason = '' THEN kind ELSE reason END AS r, count(*) AS n FROM audit \
                 WHERE kind IN ('stamp.denied', 'access.denied') AND at_ms >= ?1 \
                 GROUP BY r ORDER BY n DESC, r LIMIT ?2"
            )
        );
        assert_eq!(
            s.alerts_by_rule,
            pairs(
                "SELECT reason, count(*) AS n FROM audit WHERE kind = 'alert' AND at_ms >= ?1 \
                 GROUP BY reason ORDER BY n DESC, reason LIMIT ?2"
            )
        );
        assert_eq!(
            s.failed,
            one("SELECT count(*) FROM audit WHERE kind = 'stamp.failed' AND at_ms >= ?1")
        );
        assert_eq!(
            s.outcomes_unknown,
            one("SELECT count(*) FROM audit WHERE kind = 'stamp.outcome_unknown' AND at_ms >= ?1")
        );
        assert_eq!(
            s.completed,
            one("SELECT count(*) FROM audit WHERE kind = 'stamp.completed' AND at_ms >= ?1")
        );
        assert_eq!(
            s.refused,
            one("SELECT count(*) FROM audit WHERE kind IN ('stamp.denied', 'access.denied') AND at_ms >= ?1")
        );
        assert_eq!(
            s.alerts,
            one("SELECT count(*) FROM audit WHERE kind = 'alert' AND at_ms >= ?1")
        );
        assert_eq!(
            s.first_at_ms,
            Some(
                conn.query_row(
                    "SELECT min(at_ms) FROM audit WHERE at_ms >= ?1",
                    [since],
                    |r| r.get(0)
                )
                .unwrap()
            )
        );
        // The document index is used for a digest search.
        let (conditions, _) = Filter {
            doc_sha256: Some("ab".repeat(32)),
            ..Filter::default()
        }
        .conditions(Dialect::Sqlite, 1);
        let plan: String = conn
            .query_row(
                &format!("EXPLAIN QUERY PLAN SELECT seq FROM audit WHERE {conditions}"),
                ["ab".repeat(32)],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("audit_doc_any"), "{plan}");
    }
}
