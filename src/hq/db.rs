//! PostgreSQL, HQ's system of record.
//!
//! Owns: the schema's migrations, enrolment of the configured sites, the ingest transaction
//! (the site's head row locked `FOR UPDATE`, so several HQ nodes on one database take one
//! site's batches strictly one after another), and central alerts.
//! Never: writes a record or checkpoint that [`super::check`] has not passed against the head
//! read in the same transaction.

use super::check::{self, Head, Refusal};
use super::config::{DatabaseConfig, Site};
use super::cosign::Cosignature;
use super::policy::Fragment;
use crate::audit::verify::TrustedKey;
use crate::audit::{Checkpoint, Record, TEXT_FIELDS};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::ToSql;

/// The schema, one migration per version, applied in order. Each runs in one transaction
/// under an advisory lock, so two nodes migrating at once apply each version once.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/hq/0001_initial.sql")),
    (2, include_str!("../../migrations/hq/0002_policy.sql")),
    (3, include_str!("../../migrations/hq/0003_enrolments.sql")),
    (4, include_str!("../../migrations/hq/0004_console.sql")),
];

/// The schema version this build works with.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// An arbitrary, fixed key of the advisory lock taken while migrating.
const MIGRATION_LOCK: i64 = 0x5ea1_9a7e;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Pg(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Config(String),
    #[error("the database has schema version {have}; this sealgate-hq needs {want}: run `sealgate-hq migrate`")]
    Schema { have: i32, want: i32 },
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Refusal {
        Refusal::Unavailable(format!("HQ could not store this: {e}"))
    }
}

/// How a configured site stands against its enrolment in the database.
#[derive(Debug, PartialEq, Eq)]
pub enum Enrolment {
    /// Enrolled now, with the configured key.
    New,
    Same,
    /// Enrolled earlier with another key; the configured one is not used.
    KeyDiffers {
        enrolled: String,
        configured: String,
    },
}

pub struct Db {
    pub(super) pool: Pool,
}

fn is_loopback(host: &tokio_postgres::config::Host) -> bool {
    match host {
        tokio_postgres::config::Host::Unix(_) => true,
        tokio_postgres::config::Host::Tcp(h) => {
            h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        }
    }
}

/// The connection settings, and the TLS connector when a CA is given: then TLS is required
/// (never PostgreSQL's default of falling back to plaintext) and the server must prove its
/// name. Without a CA only a Unix socket or loopback is accepted.
fn connection_settings(
    c: &DatabaseConfig,
) -> Result<
    (
        tokio_postgres::Config,
        Option<tokio_postgres_rustls::MakeRustlsConnect>,
    ),
    DbError,
> {
    let mut pg: tokio_postgres::Config = c
        .url
        .parse()
        .map_err(|e| DbError::Config(format!("database.url: {e}")))?;
    match &c.ca {
        Some(ca) => {
            let tls = crate::tls::client_config(ca, None).map_err(DbError::Config)?;
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            Ok((pg, Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls))))
        }
        None if pg.get_hosts().iter().all(is_loopback) => Ok((pg, None)),
        None => Err(DbError::Config(
            "database.url names a host that is not loopback: give database.ca for TLS".into(),
        )),
    }
}

impl Db {
    /// A pool of connections as configured: TLS when a CA is given, else only to a Unix
    /// socket or loopback.
    pub fn connect(c: &DatabaseConfig) -> Result<Db, DbError> {
        let (pg, tls) = connection_settings(c)?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match tls {
            Some(tls) => Manager::from_config(pg, tls, manager_config),
            None => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(c.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| DbError::Config(e.to_string()))?;
        Ok(Db { pool })
    }

    /// Applies the migrations the database lacks; with `grant_to`, lets that role do what
    /// `sealgate-hq serve` does and no more; with `console`, lets that role read what the
    /// auditors' console shows and add its own events, and nothing else. Returns the version
    /// now in force.
    pub async fn migrate(
        &self,
        grant_to: Option<&str>,
        console: Option<&str>,
    ) -> Result<i32, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS sealgate_schema (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        let have: i32 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM sealgate_schema", &[])
            .await?
            .get(0);
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO sealgate_schema (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "schema migration applied");
        }
        if let Some(role) = grant_to {
            let role = quote_ident(role)?;
            tx.batch_execute(&format!(
                "GRANT SELECT ON sealgate_schema TO {role};
                 GRANT SELECT, INSERT ON records, checkpoints, cosignatures, alerts, policy_fragments, enrolments TO {role};
                 GRANT SELECT, INSERT, UPDATE ON sites TO {role};
                 GRANT USAGE ON SEQUENCE alerts_id_seq TO {role};"
            ))
            .await?;
        }
        if let Some(role) = console {
            let role = quote_ident(role)?;
            tx.batch_execute(&format!(
                "GRANT SELECT ON sealgate_schema, sites, records, checkpoints, alerts, enrolments, console_events TO {role};
                 GRANT INSERT (auditor, kind, reason, detail, site, epoch, ref_seq) ON console_events TO {role};
                 GRANT USAGE ON SEQUENCE console_events_id_seq TO {role};"
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(SCHEMA_VERSION.max(have))
    }

    /// Refuses a database whose schema is not the one this build knows.
    pub async fn check_schema(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        let have: i32 = match client
            .query_one("SELECT coalesce(max(version), 0) FROM sealgate_schema", &[])
            .await
        {
            Ok(row) => row.get(0),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
            Err(e) => return Err(e.into()),
        };
        if have != SCHEMA_VERSION {
            return Err(DbError::Schema {
                have,
                want: SCHEMA_VERSION,
            });
        }
        Ok(())
    }

    /// Enrols each configured site not yet in the database, and says how each one stands.
    pub async fn enrol(&self, sites: &[Site]) -> Result<Vec<Enrolment>, DbError> {
        let mut client = self.pool.get().await?;
        let mut out = Vec::new();
        for s in sites {
            let tx = client.transaction().await?;
            let inserted = tx
                .execute(
                    "INSERT INTO sites (site, audit_key_id, audit_key_spki) VALUES ($1, $2, $3)
                     ON CONFLICT (site) DO NOTHING",
                    &[&s.id, &s.audit_key.key_id, &s.audit_key.spki_der],
                )
                .await?;
            if inserted == 1 {
                tx.execute(
                    "INSERT INTO enrolments (site, epoch, audit_key_id, audit_key_spki, reason)
                     VALUES ($1, 1, $2, $3, 'enrolled')",
                    &[&s.id, &s.audit_key.key_id, &s.audit_key.spki_der],
                )
                .await?;
                tx.commit().await?;
                out.push(Enrolment::New);
                continue;
            }
            tx.commit().await?;
            let enrolled: String = client
                .query_one("SELECT audit_key_id FROM sites WHERE site = $1", &[&s.id])
                .await?
                .get(0);
            out.push(if enrolled == s.audit_key.key_id {
                Enrolment::Same
            } else {
                Enrolment::KeyDiffers {
                    enrolled,
                    configured: s.audit_key.key_id.clone(),
                }
            });
        }
        Ok(out)
    }

    /// Enrols a site again with its configured audit key (a new device, a log started again):
    /// what HQ holds of it stays as its epoch so far, and a new epoch starts from an empty
    /// head with the new key. Refused when the configured key is the one enrolled. Returns the
    /// new epoch and where the one before ended.
    pub async fn reenrol(&self, site: &Site, reason: &str) -> Result<(i32, Head), DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT head_seq, head_hash, checkpoint_seq, checkpoint_prev_seq, epoch, audit_key_spki
                 FROM sites WHERE site = $1 FOR UPDATE",
                &[&site.id],
            )
            .await?
            .ok_or_else(|| {
                DbError::Config(format!(
                    "site {:?} was never enrolled: `migrate` or `serve` enrols it",
                    site.id
                ))
            })?;
        let before = head_of(&row)?;
        if enrolled_key(&row)?.spki_der == site.audit_key.spki_der {
            return Err(DbError::Config(format!(
                "site {:?} is enrolled with the configured audit key {} already; nothing to do",
                site.id, site.audit_key.key_id
            )));
        }
        let epoch = before.epoch + 1;
        tx.execute(
            "INSERT INTO enrolments (site, epoch, audit_key_id, audit_key_spki, reason,
                 previous_head_seq, previous_head_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &site.id,
                &epoch,
                &site.audit_key.key_id,
                &site.audit_key.spki_der,
                &reason,
                &(before.seq as i64),
                &before.hash.as_slice(),
            ],
        )
        .await?;
        tx.execute(
            "UPDATE sites SET epoch = $2, audit_key_id = $3, audit_key_spki = $4, head_seq = 0,
                 head_hash = decode(repeat('00', 32), 'hex'), checkpoint_seq = 0,
                 checkpoint_prev_seq = 0, head_at = NULL, reported_seq = 0, reported_at_ms = NULL
             WHERE site = $1",
            &[
                &site.id,
                &epoch,
                &site.audit_key.key_id,
                &site.audit_key.spki_der,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok((epoch, before))
    }

    /// HQ's verified head of a site.
    pub async fn head(&self, site: &str) -> Result<Head, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT head_seq, head_hash, checkpoint_seq, checkpoint_prev_seq, epoch FROM sites WHERE site = $1",
                &[&site],
            )
            .await?;
        head_of(&row)
    }

    /// Checks a site's hello against its head, and notes when it was last seen.
    pub async fn hello(&self, site: &Site, newest: Option<&Checkpoint>) -> Result<Head, Refusal> {
        let client = self.pool.get().await.map_err(DbError::from)?;
        let row = client
            .query_one(
                "SELECT head_seq, head_hash, checkpoint_seq, checkpoint_prev_seq, epoch, audit_key_spki
                 FROM sites WHERE site = $1",
                &[&site.id],
            )
            .await
            .map_err(DbError::from)?;
        let head = head_of(&row)?;
        let key = enrolled_key(&row)?;
        let stored = match newest {
            Some(c) if c.seq > 0 && c.seq <= head.seq => client
                .query_opt(
                    "SELECT hash FROM records WHERE site = $1 AND epoch = $2 AND seq = $3",
                    &[&site.id, &head.epoch, &(c.seq as i64)],
                )
                .await
                .map_err(DbError::from)?
                .and_then(|r| r.get::<_, Vec<u8>>(0).try_into().ok()),
            _ => None,
        };
        check::check_hello(&head, &key, newest, |_| stored)?;
        // Only a hello that passed says what the site holds.
        let (reported_seq, reported_at) = newest
            .map(|c| (c.seq as i64, Some(c.at_ms)))
            .unwrap_or((0, None));
        client
            .execute(
                "UPDATE sites SET last_seen = now(), reported_seq = $2, reported_at_ms = $3
                 WHERE site = $1",
                &[&site.id, &reported_seq, &reported_at],
            )
            .await
            .map_err(DbError::from)?;
        Ok(head)
    }

    /// Verifies a batch against the site's head and stores it, in one transaction holding the
    /// head's row lock. Returns the new head.
    pub async fn ingest(
        &self,
        site: &Site,
        records: &[Record],
        checkpoints: &[Checkpoint],
        max_records: usize,
    ) -> Result<Head, Refusal> {
        let mut client = self.pool.get().await.map_err(DbError::from)?;
        let tx = client.transaction().await.map_err(DbError::from)?;
        let row = tx
            .query_one(
                "SELECT head_seq, head_hash, checkpoint_seq, checkpoint_prev_seq, epoch, audit_key_spki
                 FROM sites WHERE site = $1 FOR UPDATE",
                &[&site.id],
            )
            .await
            .map_err(DbError::from)?;
        let head = head_of(&row)?;
        let key = enrolled_key(&row)?;
        let new_head = check::check_batch(&head, &key, records, checkpoints, max_records)?;
        insert_records(&tx, &site.id, head.epoch, records)
            .await
            .map_err(DbError::from)?;
        insert_checkpoints(&tx, &site.id, head.epoch, checkpoints)
            .await
            .map_err(DbError::from)?;
        if let Some((seq, version, digest)) = policy_in_force(records) {
            tx.execute(
                "UPDATE sites SET policy_version = $2, policy_sha256 = $3, policy_seq = $4
                 WHERE site = $1",
                &[&site.id, &(version as i64), &digest, &(seq as i64)],
            )
            .await
            .map_err(DbError::from)?;
        }
        tx.execute(
            "UPDATE sites SET head_seq = $2, head_hash = $3, checkpoint_seq = $4,
                 checkpoint_prev_seq = $5, head_at = now(), last_seen = now()
             WHERE site = $1",
            &[
                &site.id,
                &(new_head.seq as i64),
                &new_head.hash.as_slice(),
                &(new_head.checkpoint_seq as i64),
                &(new_head.checkpoint_prev_seq as i64),
            ],
        )
        .await
        .map_err(DbError::from)?;
        crate::crash_point!("hq.ingest.before_commit");
        tx.commit().await.map_err(DbError::from)?;
        crate::crash_point!("hq.ingest.after_commit");
        Ok(new_head)
    }

    /// The newest fragment published for a site.
    pub async fn newest_policy(&self, site: &str) -> Result<Option<Fragment>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT version, issued_at_ms, body, key_id, algorithm, signature
                 FROM policy_fragments WHERE site = $1 ORDER BY version DESC LIMIT 1",
                &[&site],
            )
            .await?;
        Ok(row.map(|r| Fragment {
            site: site.to_owned(),
            version: r.get::<_, i64>(0) as u64,
            issued_at_ms: r.get(1),
            body: r.get(2),
            key_id: r.get(3),
            algorithm: r.get(4),
            signature: r.get(5),
        }))
    }

    /// Publishes a fragment for an enrolled site as the next version: `sign` is given it
    /// unsigned and signs it (HQ's policy key). The site's row is locked meanwhile, so two
    /// publishers take two versions.
    pub async fn publish_policy(
        &self,
        site: &str,
        body: String,
        sign: impl FnOnce(&mut Fragment) -> Result<(), String>,
    ) -> Result<Fragment, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let enrolled = tx
            .query_opt("SELECT 1 FROM sites WHERE site = $1 FOR UPDATE", &[&site])
            .await?;
        if enrolled.is_none() {
            return Err(DbError::Config(format!("no site {site:?} is enrolled")));
        }
        let newest: i64 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM policy_fragments WHERE site = $1",
                &[&site],
            )
            .await?
            .get(0);
        let mut f = Fragment {
            site: site.to_owned(),
            version: newest as u64 + 1,
            issued_at_ms: crate::audit::now_ms(),
            body,
            key_id: String::new(),
            algorithm: String::new(),
            signature: Vec::new(),
        };
        sign(&mut f).map_err(DbError::Config)?;
        tx.execute(
            "INSERT INTO policy_fragments
                 (site, version, issued_at_ms, body, key_id, algorithm, signature)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &f.site,
                &(f.version as i64),
                &f.issued_at_ms,
                &f.body,
                &f.key_id,
                &f.algorithm,
                &f.signature,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(f)
    }

    /// HQ's cosignature of a site's checkpoint at `seq` of `epoch`, if it made one.
    pub async fn cosignature(
        &self,
        site: &str,
        epoch: i32,
        seq: u64,
    ) -> Result<Option<Cosignature>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT head, checkpoint_at_ms, cosigned_at_ms, key_id, algorithm, signature
                 FROM cosignatures WHERE site = $1 AND epoch = $2 AND seq = $3",
                &[&site, &epoch, &(seq as i64)],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let head: Vec<u8> = row.get(0);
        Ok(Some(Cosignature {
            site: site.to_owned(),
            seq,
            head: head
                .try_into()
                .map_err(|_| DbError::Config("a cosignature's head is not 32 bytes".into()))?,
            checkpoint_at_ms: row.get(1),
            cosigned_at_ms: row.get(2),
            key_id: row.get(3),
            algorithm: row.get(4),
            signature: row.get(5),
        }))
    }

    /// The head and time of a site's checkpoint at `seq` of `epoch`, as HQ stored it.
    pub async fn checkpoint(
        &self,
        site: &str,
        epoch: i32,
        seq: u64,
    ) -> Result<Option<([u8; 32], i64)>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT head, at_ms FROM checkpoints WHERE site = $1 AND epoch = $2 AND seq = $3",
                &[&site, &epoch, &(seq as i64)],
            )
            .await?;
        Ok(row.and_then(|r| {
            let head: Vec<u8> = r.get(0);
            Some((head.try_into().ok()?, r.get(1)))
        }))
    }

    /// Keeps a cosignature; when another node kept one for the same checkpoint first, that one
    /// stands.
    pub async fn store_cosignature(&self, epoch: i32, c: &Cosignature) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO cosignatures
                     (site, seq, head, checkpoint_at_ms, cosigned_at_ms, key_id, algorithm, signature, epoch)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (site, epoch, seq) DO NOTHING",
                &[
                    &c.site,
                    &(c.seq as i64),
                    &c.head.as_slice(),
                    &c.checkpoint_at_ms,
                    &c.cosigned_at_ms,
                    &c.key_id,
                    &c.algorithm,
                    &c.signature,
                    &epoch,
                ],
            )
            .await?;
        Ok(())
    }

    /// Sites whose head has not moved for `after` (or that never shipped since enrolment
    /// that long ago): id, head seq, and milliseconds since the head last moved.
    pub async fn silent_sites(
        &self,
        after: std::time::Duration,
    ) -> Result<Vec<(String, u64, i64)>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT site, head_seq,
                        (extract(epoch FROM now() - coalesce(head_at, enrolled_at)) * 1000)::bigint
                 FROM sites
                 WHERE coalesce(head_at, enrolled_at) < now() - make_interval(secs => $1)
                 ORDER BY site",
                &[&after.as_secs_f64()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get(2)))
            .collect())
    }

    /// Records a central alert, unless the same one (site, kind, seq) was recorded in the last
    /// ten minutes: a shipper that retries a refused batch raises it once, not once a try.
    /// Returns whether it was recorded.
    pub async fn alert(
        &self,
        site: &str,
        kind: &str,
        seq: Option<u64>,
        detail: &str,
    ) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let seq = seq.map(|s| s as i64);
        let n = client
            .execute(
                "INSERT INTO alerts (site, kind, seq, detail)
                 SELECT $1, $2, $3, $4
                 WHERE NOT EXISTS (
                     SELECT 1 FROM alerts WHERE site = $1 AND kind = $2
                         AND seq IS NOT DISTINCT FROM $3
                         AND at > now() - interval '10 minutes')",
                &[&site, &kind, &seq, &detail],
            )
            .await?;
        Ok(n == 1)
    }
}

/// A central alert as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CentralAlert {
    pub id: i64,
    pub at_ms: i64,
    pub site: String,
    pub kind: String,
    pub seq: Option<i64>,
    pub detail: String,
}

/// One site at HQ, for `sealctl hq stats`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SiteStats {
    pub site: String,
    pub audit_key_id: String,
    pub head_seq: u64,
    /// When the head last moved (HQ's clock), Unix ms.
    pub head_at_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    /// The site's newest checkpoint at its last hello, and how many records HQ lacks of it.
    pub reported_seq: u64,
    pub lag_records: u64,
    pub records: u64,
    pub stamps_completed: u64,
    pub stamps_denied: u64,
    pub site_alerts: u64,
    pub central_alerts: u64,
    /// The HQ fragment version the site proved it has in force (0: none), and its digest.
    pub policy_version: u64,
    pub policy_sha256: Option<String>,
    /// The site's enrolment: 1, and one more at each explicit re-enrolment (its counts are
    /// this epoch's).
    pub epoch: i32,
}

/// The columns [`record_from_row`] reads, in order.
pub(super) fn record_columns() -> String {
    format!(
        "seq, at_ms, {}, amount, ref_seq, prev_hash, hash",
        crate::audit::TEXT_COLUMNS.join(", ")
    )
}

/// A record from a row whose columns from `first` on are [`record_columns`].
pub(super) fn record_from_row(row: &tokio_postgres::Row, first: usize) -> Record {
    let mut r = Record {
        seq: row.get::<_, i64>(first) as u64,
        at_ms: row.get(first + 1),
        amount: row.get(first + 2 + TEXT_FIELDS),
        ref_seq: row
            .get::<_, Option<i64>>(first + 3 + TEXT_FIELDS)
            .map(|s| s as u64),
        prev_hash: row
            .get::<_, Vec<u8>>(first + 4 + TEXT_FIELDS)
            .try_into()
            .unwrap_or([0; 32]),
        hash: row
            .get::<_, Vec<u8>>(first + 5 + TEXT_FIELDS)
            .try_into()
            .unwrap_or([0; 32]),
        ..Record::default()
    };
    for (i, t) in r.text_mut().into_iter().enumerate() {
        *t = row.get(first + 2 + i);
    }
    r
}

impl Db {
    /// Every record matching `filter` (and `site`), oldest first by site and seq.
    pub async fn for_each_record(
        &self,
        site: Option<&str>,
        filter: &crate::audit::query::Filter,
        mut f: impl FnMut(String, Record) -> Result<(), String>,
    ) -> Result<(), DbError> {
        use crate::audit::query::{Dialect, FilterValue};
        use futures_util::TryStreamExt;
        let (conditions, values) = filter.conditions(Dialect::Postgres, 1);
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = values
            .into_iter()
            .map(|v| match v {
                FilterValue::Int(i) => Box::new(i) as Box<dyn ToSql + Sync + Send>,
                FilterValue::Text(t) => Box::new(t),
            })
            .collect();
        let mut wheres = Vec::new();
        if !conditions.is_empty() {
            wheres.push(conditions);
        }
        if let Some(s) = site {
            args.push(Box::new(s.to_owned()));
            wheres.push(format!("site = ${}", args.len()));
        }
        let mut sql = format!("SELECT site, {} FROM records", record_columns());
        if !wheres.is_empty() {
            sql += " WHERE ";
            sql += &wheres.join(" AND ");
        }
        sql += " ORDER BY site, epoch, seq";
        if let Some(n) = filter.limit {
            sql += &format!(" LIMIT {n}");
        }
        let client = self.pool.get().await?;
        let stream = client
            .query_raw(&sql, args.iter().map(|a| a.as_ref() as &(dyn ToSql + Sync)))
            .await?;
        futures_util::pin_mut!(stream);
        while let Some(row) = stream.try_next().await? {
            f(row.get(0), record_from_row(&row, 1)).map_err(DbError::Config)?;
        }
        Ok(())
    }

    /// Central alerts with an id above `after` (and of `site`, and since `since_ms`), oldest
    /// first.
    pub async fn alerts_after(
        &self,
        after: i64,
        site: Option<&str>,
        since_ms: Option<i64>,
    ) -> Result<Vec<CentralAlert>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, (extract(epoch FROM at) * 1000)::bigint, site, kind, seq, detail
                 FROM alerts
                 WHERE id > $1 AND ($2::text IS NULL OR site = $2)
                   AND ($3::bigint IS NULL OR at >= to_timestamp($3::bigint / 1000.0))
                 ORDER BY id",
                &[&after, &site, &since_ms],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| CentralAlert {
                id: r.get(0),
                at_ms: r.get(1),
                site: r.get(2),
                kind: r.get(3),
                seq: r.get(4),
                detail: r.get(5),
            })
            .collect())
    }

    /// Each site's head as the metrics show it: id, head seq, the seq it last said it holds,
    /// and since when (Unix ms) its head has not moved (its enrolment, if it never shipped).
    pub async fn heads(&self) -> Result<Vec<(String, u64, u64, i64)>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT site, head_seq, reported_seq,
                        (extract(epoch FROM coalesce(head_at, enrolled_at)) * 1000)::bigint
                 FROM sites ORDER BY site",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get::<_, i64>(1) as u64,
                    r.get::<_, i64>(2) as u64,
                    r.get(3),
                )
            })
            .collect())
    }

    /// Central alerts by (site, kind).
    pub async fn alert_counts(&self) -> Result<Vec<(String, String, i64)>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT site, kind, count(*) FROM alerts GROUP BY site, kind ORDER BY site, kind",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Every enrolled site (or `site`) with its head, lag and counts.
    pub async fn site_stats(&self, site: Option<&str>) -> Result<Vec<SiteStats>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT s.site, s.audit_key_id, s.head_seq,
                        (extract(epoch FROM s.head_at) * 1000)::bigint,
                        (extract(epoch FROM s.last_seen) * 1000)::bigint,
                        s.reported_seq,
                        (SELECT count(*) FROM records r WHERE r.site = s.site AND r.epoch = s.epoch),
                        (SELECT count(*) FROM records r WHERE r.site = s.site AND r.epoch = s.epoch AND r.kind = 'stamp.completed'),
                        (SELECT count(*) FROM records r WHERE r.site = s.site AND r.epoch = s.epoch AND r.kind = 'stamp.denied'),
                        (SELECT count(*) FROM records r WHERE r.site = s.site AND r.epoch = s.epoch AND r.kind = 'alert'),
                        (SELECT count(*) FROM alerts a WHERE a.site = s.site),
                        s.policy_version, s.policy_sha256, s.epoch
                 FROM sites s WHERE ($1::text IS NULL OR s.site = $1) ORDER BY s.site",
                &[&site],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let head = r.get::<_, i64>(2) as u64;
                let reported = r.get::<_, i64>(5) as u64;
                SiteStats {
                    site: r.get(0),
                    audit_key_id: r.get(1),
                    head_seq: head,
                    head_at_ms: r.get(3),
                    last_seen_ms: r.get(4),
                    reported_seq: reported,
                    lag_records: reported.saturating_sub(head),
                    records: r.get::<_, i64>(6) as u64,
                    stamps_completed: r.get::<_, i64>(7) as u64,
                    stamps_denied: r.get::<_, i64>(8) as u64,
                    site_alerts: r.get::<_, i64>(9) as u64,
                    central_alerts: r.get::<_, i64>(10) as u64,
                    policy_version: r.get::<_, i64>(11) as u64,
                    policy_sha256: r.get(12),
                    epoch: r.get(13),
                }
            })
            .collect())
    }
}

/// A connection of its own that listens for new central alerts: each notification on the
/// channel is one alert's id. Ends when the connection does.
pub async fn listen_alerts(
    c: &DatabaseConfig,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::sync::mpsc::UnboundedReceiver<i64>,
    ),
    DbError,
> {
    let (pg, tls) = connection_settings(c)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = match tls {
        Some(tls) => {
            let (client, conn) = pg.connect(tls).await?;
            tokio::spawn(forward_notifications(conn, tx));
            client
        }
        None => {
            let (client, conn) = pg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(forward_notifications(conn, tx));
            client
        }
    };
    client.batch_execute("LISTEN sealgate_alerts").await?;
    Ok((client, rx))
}

async fn forward_notifications<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::UnboundedSender<i64>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = std::pin::pin!(futures_util::stream::poll_fn(
        move |cx| conn.poll_message(cx)
    ));
    while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
        match m {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if tx.send(n.payload().parse().unwrap_or(0)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the alert listener's connection ended");
                return;
            }
        }
    }
}

/// The newest record of a batch that says which HQ fragment the site has in force: a
/// `config.applied`, or a `daemon.started` (which names the one it started with, if any).
/// (seq, version, fragment digest).
fn policy_in_force(records: &[Record]) -> Option<(u64, u64, Option<String>)> {
    records.iter().rev().find_map(|r| {
        if r.kind != crate::audit::kind::CONFIG_APPLIED
            && r.kind != crate::audit::kind::DAEMON_STARTED
        {
            return None;
        }
        let e: serde_json::Value = serde_json::from_str(&r.evidence).unwrap_or_default();
        let version = e["policy_version"].as_u64().or(e["version"].as_u64());
        match (r.kind.as_str(), version) {
            (_, Some(v)) => Some((r.seq, v, e["fragment_sha256"].as_str().map(str::to_owned))),
            // A daemon started without a fragment from HQ.
            (crate::audit::kind::DAEMON_STARTED, None) => Some((r.seq, 0, None)),
            _ => None,
        }
    })
}

fn head_of(row: &tokio_postgres::Row) -> Result<Head, DbError> {
    let hash: Vec<u8> = row.get(1);
    Ok(Head {
        seq: row.get::<_, i64>(0) as u64,
        hash: hash
            .try_into()
            .map_err(|_| DbError::Config("a site's head_hash is not 32 bytes".into()))?,
        checkpoint_seq: row.get::<_, i64>(2) as u64,
        checkpoint_prev_seq: row.get::<_, i64>(3) as u64,
        epoch: row.get(4),
    })
}

fn enrolled_key(row: &tokio_postgres::Row) -> Result<TrustedKey, DbError> {
    TrustedKey::from_spki(row.get(5))
        .map_err(|e| DbError::Config(format!("the site's enrolled audit key: {e}")))
}

/// A role name as a quoted SQL identifier; refuses what could not be one.
fn quote_ident(name: &str) -> Result<String, DbError> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(DbError::Config(format!("{name:?} is not a role name")));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// All records of a batch in one statement: one array per column, unnested.
async fn insert_records(
    tx: &deadpool_postgres::Transaction<'_>,
    site: &str,
    epoch: i32,
    records: &[Record],
) -> Result<(), tokio_postgres::Error> {
    let seqs: Vec<i64> = records.iter().map(|r| r.seq as i64).collect();
    let ats: Vec<i64> = records.iter().map(|r| r.at_ms).collect();
    let texts: Vec<Vec<&str>> = (0..TEXT_FIELDS)
        .map(|i| records.iter().map(|r| r.view().text[i]).collect())
        .collect();
    let amounts: Vec<Option<i64>> = records.iter().map(|r| r.amount).collect();
    let refs: Vec<Option<i64>> = records
        .iter()
        .map(|r| r.ref_seq.map(|s| s as i64))
        .collect();
    let prevs: Vec<&[u8]> = records.iter().map(|r| r.prev_hash.as_slice()).collect();
    let hashes: Vec<&[u8]> = records.iter().map(|r| r.hash.as_slice()).collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&site, &seqs, &ats];
    for t in &texts {
        params.push(t);
    }
    params.extend([
        &amounts as &(dyn ToSql + Sync),
        &refs,
        &prevs,
        &hashes,
        &epoch,
    ]);
    let n = TEXT_FIELDS;
    let text_args: Vec<String> = (0..n).map(|i| format!("${}::text[]", 4 + i)).collect();
    let sql = format!(
        "INSERT INTO records (epoch, site, seq, at_ms, {}, amount, ref_seq, prev_hash, hash)
         SELECT ${}::integer, $1, * FROM unnest($2::bigint[], $3::bigint[], {}, ${}::bigint[], ${}::bigint[], ${}::bytea[], ${}::bytea[])",
        crate::audit::TEXT_COLUMNS.join(", "),
        8 + n,
        text_args.join(", "),
        4 + n,
        5 + n,
        6 + n,
        7 + n
    );
    let stmt = tx.prepare_cached(&sql).await?;
    tx.execute(&stmt, &params).await?;
    Ok(())
}

async fn insert_checkpoints(
    tx: &deadpool_postgres::Transaction<'_>,
    site: &str,
    epoch: i32,
    checkpoints: &[Checkpoint],
) -> Result<(), tokio_postgres::Error> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO checkpoints (site, seq, prev_seq, head, at_ms, key_id, algorithm, signature, epoch)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .await?;
    for c in checkpoints {
        tx.execute(
            &stmt,
            &[
                &site,
                &(c.seq as i64),
                &(c.prev_seq as i64),
                &c.head.as_slice(),
                &c.at_ms,
                &c.key_id,
                &c.algorithm,
                &c.signature,
                &epoch,
            ],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_database_needs_a_ca_and_a_local_one_does_not() {
        let config = |url: &str| DatabaseConfig {
            url: url.into(),
            ca: None,
            pool_size: 1,
        };
        for remote in [
            "host=192.0.2.7 dbname=x",
            "host=db.example dbname=x",
            "host=/tmp,10.0.0.1",
        ] {
            assert!(
                matches!(Db::connect(&config(remote)), Err(DbError::Config(_))),
                "{remote}"
            );
        }
        for local in [
            "host=127.0.0.1 dbname=x",
            "host=localhost",
            "host=::1",
            "host=/run/postgresql",
        ] {
            assert!(Db::connect(&config(local)).is_ok(), "{local}");
        }
    }
}
