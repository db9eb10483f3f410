//! What a site's hello or batch must be to extend the head HQ verified for it.
//!
//! Owns: the refusals HQ gives a site and their wire status (in [`Refusal::status`], the one
//! place), and the alert each raises. Pure logic over a head, the site's enrolled audit key and
//! the batch: the database layer reads the head under a row lock, calls these, and writes only
//! what they passed.

use super::pb::Status;
use crate::audit::verify::{check_signature, TrustedKey};
use crate::audit::{Checkpoint, Record};

/// HQ's verified head of one site: every record up to `seq` is stored, linked and covered by
/// the checkpoint at `checkpoint_seq` (always `seq` itself: batches end at a checkpoint), which
/// names `checkpoint_prev_seq` as the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
    pub checkpoint_seq: u64,
    pub checkpoint_prev_seq: u64,
    /// The site's enrolment this head is of (see `migrations/hq/0003_enrolments.sql`).
    pub epoch: i32,
}

/// Why HQ refuses what a site sent. Each is a central alert (except `Unavailable`, which is
/// HQ's own trouble, and `Gap` and `Stale`, which a shipper mends by starting again at the head
/// HQ names unless they repeat).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Gap(String),
    #[error("{0}")]
    Stale(String),
    #[error("{0}")]
    Fork(String),
    #[error("{0}")]
    Rollback(String),
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    BadRecord(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NotEnrolled(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Every kind of central alert, as recorded and counted in the metrics.
pub const ALERT_KINDS: &[&str] = &[
    "bad_request",
    "gap",
    "replay",
    "fork",
    "rollback",
    "bad_signature",
    "bad_record",
    "too_large",
    "not_enrolled",
    "silence",
    "unknown_site",
];

impl Refusal {
    /// The wire status: the one mapping of refusals to the HQ link's codes.
    pub fn status(&self) -> Status {
        match self {
            Refusal::BadRequest(_) => Status::BadRequest,
            Refusal::Gap(_) => Status::Gap,
            Refusal::Stale(_) => Status::Stale,
            Refusal::Fork(_) => Status::Fork,
            Refusal::Rollback(_) => Status::Rollback,
            Refusal::BadSignature(_) => Status::BadSignature,
            Refusal::BadRecord(_) => Status::BadRecord,
            Refusal::TooLarge(_) => Status::TooLarge,
            Refusal::NotEnrolled(_) => Status::NotEnrolled,
            Refusal::Unavailable(_) => Status::Unavailable,
        }
    }

    /// The central alert this refusal raises: stable names, as queried.
    pub fn alert(&self) -> Option<&'static str> {
        Some(match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::Gap(_) => "gap",
            Refusal::Stale(_) => "replay",
            Refusal::Fork(_) => "fork",
            Refusal::Rollback(_) => "rollback",
            Refusal::BadSignature(_) => "bad_signature",
            Refusal::BadRecord(_) => "bad_record",
            Refusal::TooLarge(_) => "too_large",
            Refusal::NotEnrolled(_) => "not_enrolled",
            Refusal::Unavailable(_) => return None,
        })
    }
}

/// The newest checkpoint a site says its log has, against HQ's head. `stored_hash` gives the
/// hash HQ holds for a seq at or below its head.
pub fn check_hello(
    head: &Head,
    key: &TrustedKey,
    newest: Option<&Checkpoint>,
    stored_hash: impl FnOnce(u64) -> Option<[u8; 32]>,
) -> Result<(), Refusal> {
    let Some(cp) = newest else {
        if head.seq > 0 {
            return Err(Refusal::Rollback(format!(
                "the site's log has no checkpoint, but HQ holds its records up to seq {}: the log was emptied or re-initialised",
                head.seq
            )));
        }
        return Ok(());
    };
    signed_by(cp, key)?;
    if cp.seq < head.checkpoint_seq {
        return Err(Refusal::Rollback(format!(
            "the site's log ends at checkpoint {} but HQ verified it up to checkpoint {}: records {}..{} are gone from the site (its tail was cut, or it was restored from a backup)",
            cp.seq,
            head.checkpoint_seq,
            cp.seq + 1,
            head.checkpoint_seq
        )));
    }
    if cp.seq <= head.seq {
        match stored_hash(cp.seq) {
            Some(h) if h == cp.head => {}
            Some(_) => {
                return Err(Refusal::Fork(format!(
                    "the site's checkpoint {} signs another head than the record HQ holds at seq {}: two histories",
                    cp.seq, cp.seq
                )))
            }
            None => {
                return Err(Refusal::Unavailable(format!(
                    "HQ holds no record at seq {} below its head {}",
                    cp.seq, head.seq
                )))
            }
        }
    }
    Ok(())
}

/// A batch that extends `head`: records from `head.seq + 1` on, each hashing as it says and
/// linked to the one before (the first to HQ's head), checkpoints chained from HQ's last one,
/// each signed by the site's key and signing the record at its seq, the last one the batch's
/// last record. Returns the head after it.
pub fn check_batch(
    head: &Head,
    key: &TrustedKey,
    records: &[Record],
    checkpoints: &[Checkpoint],
    max_records: usize,
) -> Result<Head, Refusal> {
    if records.len() > max_records {
        return Err(Refusal::TooLarge(format!(
            "a batch of {} records; at most {max_records} in one",
            records.len()
        )));
    }
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Err(Refusal::BadRequest("a batch with no records".into()));
    };
    if first.seq <= head.seq {
        return Err(Refusal::Stale(format!(
            "the batch starts at seq {} but HQ holds records up to {}: they were sent before",
            first.seq, head.seq
        )));
    }
    if first.seq > head.seq + 1 && !records.iter().any(|x| x.seq == head.seq + 1) {
        return Err(Refusal::Gap(format!(
            "the batch starts at seq {} but HQ holds records up to {}: records {}..{} are missing",
            first.seq,
            head.seq,
            head.seq + 1,
            first.seq - 1
        )));
    }
    let mut prev = head.hash;
    for (i, r) in records.iter().enumerate() {
        let want = head.seq + 1 + i as u64;
        if r.seq != want {
            let later = records[i..].iter().any(|x| x.seq == want);
            return Err(if r.seq > want && !later {
                Refusal::Gap(format!(
                    "the batch skips from seq {} to {}: records {want}..{} are missing",
                    want - 1,
                    r.seq,
                    r.seq - 1
                ))
            } else {
                Refusal::BadRecord(format!(
                    "seq {} comes where seq {want} belongs: the batch is out of order",
                    r.seq
                ))
            });
        }
        if r.view().hash(&r.prev_hash) != r.hash {
            return Err(Refusal::BadRecord(format!(
                "record {} does not hash as it says: it was altered",
                r.seq
            )));
        }
        if r.prev_hash != prev {
            return Err(if i == 0 {
                Refusal::Fork(format!(
                    "record {} does not follow the record HQ holds at seq {}: the site's log is another history",
                    r.seq, head.seq
                ))
            } else {
                Refusal::BadRecord(format!(
                    "record {} does not link to record {}",
                    r.seq,
                    r.seq - 1
                ))
            });
        }
        prev = r.hash;
    }
    // A site's newest checkpoint is replaced while it is less than a second after the one
    // before it (docs/audit-log.md), so the first checkpoint of a batch may name HQ's last
    // checkpoint, or the one that names: then it takes the place of HQ's last, which HQ keeps
    // as the signed statement it was.
    let mut prev_cp = head.checkpoint_seq;
    let mut prev_prev = head.checkpoint_prev_seq;
    for (i, c) in checkpoints.iter().enumerate() {
        let replaces_last =
            i == 0 && head.checkpoint_seq > 0 && c.prev_seq == head.checkpoint_prev_seq;
        if c.prev_seq != prev_cp && !replaces_last {
            return Err(if c.prev_seq < prev_cp {
                Refusal::Fork(format!(
                    "checkpoint {} names {} as the one before it, but HQ's last is {prev_cp}",
                    c.seq, c.prev_seq
                ))
            } else {
                Refusal::Gap(format!(
                    "checkpoint {} names {} as the one before it, which HQ never received",
                    c.seq, c.prev_seq
                ))
            });
        }
        if c.seq < first.seq || c.seq > last.seq {
            return Err(Refusal::BadRequest(format!(
                "checkpoint {} is outside the batch's records {}..{}",
                c.seq, first.seq, last.seq
            )));
        }
        signed_by(c, key)?;
        let r = &records[(c.seq - first.seq) as usize];
        if r.hash != c.head {
            return Err(Refusal::BadRecord(format!(
                "checkpoint {} signs another head than record {}'s hash: the records up to it were rewritten",
                c.seq, c.seq
            )));
        }
        prev_prev = c.prev_seq;
        prev_cp = c.seq;
    }
    if prev_cp != last.seq {
        return Err(Refusal::BadRequest(format!(
            "the batch ends at seq {} but its last checkpoint is at {prev_cp}: a batch must end at a checkpoint",
            last.seq
        )));
    }
    Ok(Head {
        seq: last.seq,
        hash: last.hash,
        checkpoint_seq: last.seq,
        checkpoint_prev_seq: prev_prev,
        epoch: head.epoch,
    })
}

fn signed_by(c: &Checkpoint, key: &TrustedKey) -> Result<(), Refusal> {
    if c.key_id != key.key_id {
        return Err(Refusal::NotEnrolled(format!(
            "checkpoint {} is signed by audit key {}, but the key enrolled for this site is {}: a new key is enrolled at HQ first (sealgate-hq enrol)",
            c.seq, c.key_id, key.key_id
        )));
    }
    check_signature(c, key).map_err(Refusal::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::kind;
    use ed25519_dalek::pkcs8::EncodePublicKey;
    use ed25519_dalek::Signer;
    use sha2::Digest;

    struct Log {
        key: ed25519_dalek::SigningKey,
        records: Vec<Record>,
        checkpoints: Vec<Checkpoint>,
    }

    impl Log {
        fn new() -> Log {
            Log {
                key: ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
                records: Vec::new(),
                checkpoints: Vec::new(),
            }
        }

        fn trusted(&self) -> TrustedKey {
            let spki = self
                .key
                .verifying_key()
                .to_public_key_der()
                .unwrap()
                .into_vec();
            TrustedKey::from_spki(spki).unwrap()
        }

        fn append(&mut self, n: usize) {
            for _ in 0..n {
                let prev = self.records.last().map(|r| r.hash).unwrap_or([0; 32]);
                let mut r = Record::new(kind::STAMP_COMPLETED);
                r.detail = format!("record {}", self.records.len() + 1);
                r.seal_after(self.records.len() as u64 + 1, prev);
                self.records.push(r);
            }
        }

        fn sign(&self, seq: u64, prev_seq: u64) -> Checkpoint {
            let head = self.records[seq as usize - 1].hash;
            let m = Checkpoint::message(seq, prev_seq, &head, 1000);
            let digest = sha2::Sha256::digest(&m);
            Checkpoint {
                seq,
                prev_seq,
                head,
                at_ms: 1000,
                key_id: self.trusted().key_id,
                algorithm: "ed25519".into(),
                signature: self.key.sign(&digest).to_bytes().to_vec(),
            }
        }

        fn checkpoint(&mut self, prev_seq: u64) {
            let c = self.sign(self.records.len() as u64, prev_seq);
            self.checkpoints.push(c);
        }

        fn range(&self, from: u64, to: u64) -> (&[Record], Vec<Checkpoint>) {
            let cps = self
                .checkpoints
                .iter()
                .filter(|c| c.seq >= from && c.seq <= to)
                .cloned()
                .collect();
            (&self.records[from as usize - 1..to as usize], cps)
        }
    }

    fn head_after(log: &Log, key: &TrustedKey, to: u64) -> Head {
        let (r, c) = log.range(1, to);
        check_batch(&Head::default(), key, r, &c, 1000).unwrap()
    }

    #[test]
    fn a_batch_extends_the_head_and_every_change_to_it_is_refused() {
        let mut log = Log::new();
        log.append(3);
        log.checkpoint(0);
        log.append(3);
        log.checkpoint(3);
        let key = log.trusted();
        let head = head_after(&log, &key, 3);
        assert_eq!(
            (head.seq, head.checkpoint_seq, head.checkpoint_prev_seq),
            (3, 3, 0)
        );
        let (r, c) = log.range(4, 6);
        let next = check_batch(&head, &key, r, &c, 1000).unwrap();
        assert_eq!((next.seq, next.checkpoint_prev_seq), (6, 3));

        // The same batch again, one that skips, one out of order.
        assert!(matches!(
            check_batch(&next, &key, r, &c, 1000),
            Err(Refusal::Stale(_))
        ));
        assert!(matches!(
            check_batch(&head, &key, &r[1..], &c, 1000),
            Err(Refusal::Gap(_))
        ));
        let mut swapped = r.to_vec();
        swapped.swap(0, 1);
        assert!(matches!(
            check_batch(&head, &key, &swapped, &c, 1000),
            Err(Refusal::BadRecord(_))
        ));
        // A record rewritten with its hash and the chain after it recomputed: every record
        // hashes and links, but the device signed another head.
        let mut rewritten = r.to_vec();
        rewritten[0].detail = "rewritten".into();
        let mut prev = head.hash;
        for x in &mut rewritten {
            x.seal_after(x.seq, prev);
            prev = x.hash;
        }
        let e = check_batch(&head, &key, &rewritten, &c, 1000).unwrap_err();
        assert!(
            matches!(e, Refusal::BadRecord(_)) && e.to_string().contains("checkpoint 6"),
            "{e}"
        );
        // Not closed by a checkpoint; too large; no checkpoint at all.
        assert!(matches!(
            check_batch(&head, &key, &r[..2], &[], 1000),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            check_batch(&head, &key, r, &c, 2),
            Err(Refusal::TooLarge(_))
        ));
        // A forged signature, and a checkpoint of another key.
        let mut forged = c.clone();
        forged[0].signature[0] ^= 1;
        assert!(matches!(
            check_batch(&head, &key, r, &forged, 1000),
            Err(Refusal::BadSignature(_))
        ));
        let mut other = Log::new();
        other.key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        assert!(matches!(
            check_batch(&head, &other.trusted(), r, &c, 1000),
            Err(Refusal::NotEnrolled(_))
        ));
    }

    #[test]
    fn another_history_at_hqs_head_is_a_fork() {
        let mut log = Log::new();
        log.append(3);
        log.checkpoint(0);
        let key = log.trusted();
        let head = head_after(&log, &key, 3);
        let mut fork = Log::new();
        fork.append(2);
        fork.records.push({
            let mut r = Record::new(kind::ALERT);
            r.seal_after(3, fork.records[1].hash);
            r
        });
        fork.append(2);
        fork.checkpoint(0);
        let (r, c) = fork.range(4, 5);
        assert!(matches!(
            check_batch(&head, &key, r, &c, 1000),
            Err(Refusal::Fork(_))
        ));
        // Its hello says so too: a checkpoint at HQ's head over another record.
        let at_head = fork.sign(3, 0);
        let stored = log.records[2].hash;
        assert!(matches!(
            check_hello(&head, &key, Some(&at_head), |_| Some(stored)),
            Err(Refusal::Fork(_))
        ));
    }

    #[test]
    fn a_site_behind_hq_is_a_rollback_and_a_replaced_newest_checkpoint_is_not() {
        let mut log = Log::new();
        log.append(2);
        log.checkpoint(0);
        log.append(2);
        log.checkpoint(2);
        let key = log.trusted();
        let head = head_after(&log, &key, 4);
        assert!(matches!(
            check_hello(&head, &key, Some(&log.checkpoints[0]), |_| None),
            Err(Refusal::Rollback(_))
        ));
        assert!(matches!(
            check_hello(&head, &key, None, |_| None),
            Err(Refusal::Rollback(_))
        ));
        let stored = log.records[3].hash;
        check_hello(&head, &key, Some(&log.checkpoints[1]), |_| Some(stored)).unwrap();

        // The site replaced its newest checkpoint (4, after 2) by one at 6, also after 2.
        log.append(2);
        log.checkpoints.pop();
        log.checkpoint(2);
        let (r, c) = log.range(5, 6);
        let next = check_batch(&head, &key, r, &c, 1000).unwrap();
        assert_eq!((next.checkpoint_seq, next.checkpoint_prev_seq), (6, 2));
        // But a checkpoint naming one HQ never had is not taken.
        let (r, _) = log.range(5, 6);
        let odd = log.sign(6, 1);
        assert!(check_batch(&head, &key, r, &[odd], 1000).is_err());
    }
}
