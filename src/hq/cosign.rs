//! Witness cosignatures: HQ's own signature over a site's checkpoint it verified, so neither
//! the site nor HQ can rewrite the site's history alone (the idea of C2SP's tlog-witness).
//!
//! Owns: the signed encoding, signing with HQ's witness key (a key in HQ's own device), the
//! check of a cosignature against a key and a log, and the site's store of the cosignatures
//! it was given (a small SQLite file beside the log, written by the shipper only).
//! Never: lets a cosignature stand for a log it does not match.

use super::pb;
use crate::audit::verify::TrustedKey;
use crate::device::SealDevice;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Domain tag that starts every cosignature's signed encoding.
pub const COSIGNATURE_TAG: &[u8] = b"sealgate-cosignature-v1\0";

/// A cosignature as stored and checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cosignature {
    pub site: String,
    pub seq: u64,
    #[serde(with = "hex::serde")]
    pub head: [u8; 32],
    pub checkpoint_at_ms: i64,
    pub cosigned_at_ms: i64,
    pub key_id: String,
    pub algorithm: String,
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
}

impl Cosignature {
    /// The signed message: tag, the site id (4-byte big-endian length and UTF-8), seq, head,
    /// the checkpoint's at_ms, the time HQ signed (integers big-endian).
    pub fn message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(COSIGNATURE_TAG.len() + self.site.len() + 60);
        m.extend_from_slice(COSIGNATURE_TAG);
        m.extend_from_slice(&(self.site.len() as u32).to_be_bytes());
        m.extend_from_slice(self.site.as_bytes());
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&self.head);
        m.extend_from_slice(&self.checkpoint_at_ms.to_be_bytes());
        m.extend_from_slice(&self.cosigned_at_ms.to_be_bytes());
        m
    }

    /// Whether `key` signed this cosignature; why not, if not.
    pub fn check(&self, key: &TrustedKey) -> Result<(), String> {
        key.check_signed(
            &self.key_id,
            &self.algorithm,
            &self.message(),
            &self.signature,
        )
        .map_err(|e| format!("cosignature of seq {} is not HQ's: {e}", self.seq))
    }
}

impl From<&Cosignature> for pb::Cosignature {
    fn from(c: &Cosignature) -> pb::Cosignature {
        pb::Cosignature {
            site: c.site.clone(),
            seq: c.seq,
            head: c.head.to_vec(),
            checkpoint_at_ms: c.checkpoint_at_ms,
            cosigned_at_ms: c.cosigned_at_ms,
            key_id: c.key_id.clone(),
            algorithm: c.algorithm.clone(),
            signature: c.signature.clone(),
        }
    }
}

impl TryFrom<pb::Cosignature> for Cosignature {
    type Error = String;
    fn try_from(c: pb::Cosignature) -> Result<Cosignature, String> {
        Ok(Cosignature {
            head: super::hash32(&c.head, "a cosignature's head")?,
            site: c.site,
            seq: c.seq,
            checkpoint_at_ms: c.checkpoint_at_ms,
            cosigned_at_ms: c.cosigned_at_ms,
            key_id: c.key_id,
            algorithm: c.algorithm,
            signature: c.signature,
        })
    }
}

/// One of HQ's own keys (the witness key, the policy key): one key in HQ's own device.
pub struct HqKey {
    device: Arc<dyn SealDevice>,
    pub key: TrustedKey,
}

impl HqKey {
    pub fn new(device: Arc<dyn SealDevice>) -> Result<HqKey, String> {
        let key = TrustedKey::from_spki(device.key(0).spki_der.clone())?;
        Ok(HqKey { device, key })
    }

    /// Signs the SHA-256 of `message` inside the device. Blocks.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        if self.device.health() != crate::device::Health::Ready {
            self.device.recover();
        }
        let digest: [u8; 32] = Sha256::digest(message).into();
        self.device
            .sign(0, &digest)
            .map_err(|e| format!("HQ's key {} could not sign: {e}", self.key.key_id))
    }

    /// As the witness: signs that HQ holds `site`'s log up to `seq` with hash `head`. Blocks.
    pub fn cosign(
        &self,
        site: &str,
        seq: u64,
        head: [u8; 32],
        checkpoint_at_ms: i64,
    ) -> Result<Cosignature, String> {
        let mut c = Cosignature {
            site: site.to_owned(),
            seq,
            head,
            checkpoint_at_ms,
            cosigned_at_ms: crate::audit::now_ms(),
            key_id: self.key.key_id.clone(),
            algorithm: self.key.algorithm.name().to_owned(),
            signature: Vec::new(),
        };
        c.signature = self.sign(&c.message())?;
        Ok(c)
    }
}

/// The default place of a site's cosignatures: `hq-cosignatures.db` beside its log.
pub fn default_store(log: &Path) -> std::path::PathBuf {
    log.with_file_name("hq-cosignatures.db")
}

/// Opens (making it when absent) the site's store of cosignatures.
pub fn open_store(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS cosignatures (
             seq INTEGER PRIMARY KEY,
             site TEXT NOT NULL,
             head BLOB NOT NULL,
             checkpoint_at_ms INTEGER NOT NULL,
             cosigned_at_ms INTEGER NOT NULL,
             key_id TEXT NOT NULL,
             algorithm TEXT NOT NULL,
             signature BLOB NOT NULL
         );",
    )?;
    Ok(conn)
}

/// Keeps a cosignature (one per seq; a second for the same seq is ignored).
pub fn store(conn: &Connection, c: &Cosignature) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO cosignatures
             (seq, site, head, checkpoint_at_ms, cosigned_at_ms, key_id, algorithm, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            c.seq as i64,
            c.site,
            &c.head[..],
            c.checkpoint_at_ms,
            c.cosigned_at_ms,
            c.key_id,
            c.algorithm,
            c.signature
        ],
    )?;
    Ok(())
}

/// Every cosignature kept, oldest first, read-only. None when there is no store.
pub fn read_store(path: &Path) -> rusqlite::Result<Option<Vec<Cosignature>>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = crate::audit::query::open_read_only(path)?;
    let has_table: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cosignatures'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if has_table.is_none() {
        return Ok(Some(Vec::new()));
    }
    let mut stmt = conn.prepare(
        "SELECT seq, site, head, checkpoint_at_ms, cosigned_at_ms, key_id, algorithm, signature
         FROM cosignatures ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        let head: Vec<u8> = r.get(2)?;
        Ok(Cosignature {
            seq: r.get::<_, i64>(0)? as u64,
            site: r.get(1)?,
            head: head.try_into().unwrap_or([0; 32]),
            checkpoint_at_ms: r.get(3)?,
            cosigned_at_ms: r.get(4)?,
            key_id: r.get(5)?,
            algorithm: r.get(6)?,
            signature: r.get(7)?,
        })
    })?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map(Some)
}

/// What a site's cosignatures say about its log: the newest one that holds, and every one
/// that does not (a log that ends before it was cut; one with another record there was
/// rewritten). `hash_at` gives the log's record hash at a seq, if it has that record.
pub fn check_log<'a>(
    cosignatures: &'a [Cosignature],
    key: &TrustedKey,
    last_seq: u64,
    mut hash_at: impl FnMut(u64) -> Option<[u8; 32]>,
) -> (Option<&'a Cosignature>, Vec<crate::audit::verify::Problem>) {
    use crate::audit::verify::Problem;
    let mut newest = None;
    let mut problems = Vec::new();
    for c in cosignatures {
        if let Err(why) = c.check(key) {
            problems.push(Problem {
                seq: c.seq,
                what: format!("{why}: the cosignature was forged or altered"),
            });
            continue;
        }
        if c.seq > last_seq {
            problems.push(Problem {
                seq: last_seq + 1,
                what: format!(
                    "the log ends at seq {last_seq} but HQ cosigned it up to seq {} on {}: records {}..{} were removed (its tail was cut, checkpoints and all)",
                    c.seq,
                    jiff::Timestamp::from_millisecond(c.cosigned_at_ms)
                        .map(|t| format!("{t:.3}"))
                        .unwrap_or_else(|_| c.cosigned_at_ms.to_string()),
                    last_seq + 1,
                    c.seq
                ),
            });
        } else if hash_at(c.seq) != Some(c.head) {
            problems.push(Problem {
                seq: c.seq,
                what: format!(
                    "HQ cosigned another record at seq {} than this log holds: the log was rewritten or replaced",
                    c.seq
                ),
            });
        }
        newest = Some(c);
    }
    (newest, problems)
}
