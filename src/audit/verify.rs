//! Offline verification of a log with nothing but public keys: the hash chain, the sequence,
//! every checkpoint's device signature, that the checkpoints form an unbroken chain, and that
//! every record is covered by one.
//!
//! Owns: finding the first thing wrong and naming it (seq and cause). Reads records one at a
//! time into reused buffers so a log of millions verifies in seconds.
//! Never: trusts anything in the log that a signature does not cover.

use super::{Checkpoint, Record};
use crate::device::keys::verify_device_signature;
use crate::device::Algorithm;
use std::collections::HashMap;

/// A trusted audit key.
pub struct TrustedKey {
    pub key_id: String,
    pub algorithm: Algorithm,
    pub spki_der: Vec<u8>,
}

impl TrustedKey {
    /// A public key from an SPKI PEM file.
    pub fn from_pem_file(path: &std::path::Path) -> Result<TrustedKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (_, der) = pem_rfc7468::decode_vec(text.as_bytes())
            .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
        TrustedKey::from_spki(der).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether this key made `signature` over `message` (SHA-256 of it signed inside a
    /// device), given as by `key_id` with `algorithm`; why not, if not.
    pub fn check_signed(
        &self,
        key_id: &str,
        algorithm: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String> {
        if key_id != self.key_id || algorithm != self.algorithm.name() {
            return Err(format!(
                "it is by key {key_id} ({algorithm}), not by {}",
                self.key_id
            ));
        }
        crate::device::keys::verify_device_signature(
            self.algorithm,
            &self.spki_der,
            message,
            signature,
        )
        .map_err(|e| format!("{e} with key {}", self.key_id))
    }

    pub fn from_spki(spki_der: Vec<u8>) -> Result<TrustedKey, String> {
        let algorithm = crate::device::keys::spki_algorithm(&spki_der)
            .ok_or("not a P-256 or Ed25519 public key")?;
        Ok(TrustedKey {
            key_id: super::key_id(&spki_der),
            algorithm,
            spki_der,
        })
    }
}

/// The seals' public keys, by key id, for checking each `stamp.completed` signature. A row
/// whose key is not the one its id names (or whose algorithm is unknown) is kept as a fault,
/// reported at every stamp that names it.
#[derive(Default)]
pub struct SealKeys(HashMap<(String, String), SealKeyEntry>);

/// A seal key by (key id, algorithm name): the key, or why the row naming it is wrong.
type SealKeyEntry = Result<(Algorithm, Vec<u8>), String>;

impl SealKeys {
    /// From (key id, algorithm name, SPKI DER) rows.
    pub fn from_rows<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8])>) -> SealKeys {
        let mut map = HashMap::new();
        for (id, alg, spki) in rows {
            let entry = if super::key_id(spki) != id {
                Err(format!(
                    "the seal key recorded under id {id} is another key (its id is {}): the seal keys were altered",
                    super::key_id(spki)
                ))
            } else {
                Algorithm::parse(alg).map(|a| (a, spki.to_vec()))
            };
            map.insert((id.to_owned(), alg.to_owned()), entry);
        }
        SealKeys(map)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What is wrong with a `stamp.completed` record's evidence, if anything: it names a key
    /// this set holds, of the algorithm it says, `signature_sha256` is the signature's, and the
    /// signature verifies over `doc_sha256` under that key.
    fn check(&self, r: &Record) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Evidence {
            algorithm: String,
            key_id: String,
            signature: String,
            signature_sha256: String,
            /// "cms" for a CMS detached signature, "pades" for a PDF signature's CMS: the signature
            /// is over these attributes.
            #[serde(default)]
            container: Option<String>,
            #[serde(default)]
            signed_attributes: Option<String>,
            #[serde(default)]
            signed_attributes_sha256: Option<String>,
        }
        let e: Evidence = match serde_json::from_str(&r.evidence) {
            Ok(e) => e,
            Err(e) => return Some(format!("its evidence is not a stamp's: {e}")),
        };
        let (alg, spki) = match self.0.get(&(e.key_id.clone(), e.algorithm.clone())) {
            None => {
                return Some(format!(
                    "its key {} ({}) is not one of the seal keys given",
                    e.key_id, e.algorithm
                ))
            }
            Some(Err(why)) => return Some(why.clone()),
            Some(Ok(k)) => k,
        };
        let sig = match base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            &e.signature,
        ) {
            Ok(s) => s,
            Err(_) => return Some("its signature is not base64".into()),
        };
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&sig);
        if hex::encode(digest) != e.signature_sha256 {
            return Some("signature_sha256 is not the SHA-256 of its signature".into());
        }
        let doc: [u8; 32] = match hex::decode(&r.doc_sha256)
            .ok()
            .and_then(|d| d.try_into().ok())
        {
            Some(d) => d,
            None => return Some("doc_sha256 is not 32 bytes of hex".into()),
        };
        match e.container.as_deref() {
            None => crate::device::keys::verify_stamp_signature(*alg, spki, &doc, &sig)
                .err()
                .map(|why| format!("its {why} over doc_sha256 under seal key {}", e.key_id)),
            Some("cms" | "pades") => {
                let Some(attrs) = e.signed_attributes.as_deref().and_then(|a| {
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, a).ok()
                }) else {
                    return Some("its CMS evidence has no signed_attributes in base64".into());
                };
                let attrs_digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&attrs).into();
                if e.signed_attributes_sha256.as_deref() != Some(hex::encode(attrs_digest).as_str())
                {
                    return Some(
                        "signed_attributes_sha256 is not the SHA-256 of its signed attributes"
                            .into(),
                    );
                }
                // The message digest is doc_sha256; for Ed25519 it is the document's SHA-512
                // (RFC 8419), which the approval named and the daemon checked when it stamped.
                match crate::container::message_digest(&attrs) {
                    Ok(md) if *alg != Algorithm::Ed25519 && md == doc => {}
                    Ok(md) if *alg == Algorithm::Ed25519 && md.len() == 64 => {}
                    Ok(_) => {
                        return Some(
                            "its signed attributes carry another message digest than doc_sha256"
                                .into(),
                        )
                    }
                    Err(why) => return Some(why.to_string()),
                }
                let checked = if *alg == Algorithm::Ed25519 {
                    crate::device::keys::verify_ed25519_message(spki, &attrs, &sig)
                } else {
                    crate::device::keys::verify_stamp_signature(*alg, spki, &attrs_digest, &sig)
                };
                checked.err().map(|why| {
                    format!(
                        "its {why} over its signed attributes under seal key {}",
                        e.key_id
                    )
                })
            }
            Some(other) => Some(format!(
                "its container {other:?} is not one this verifier knows"
            )),
        }
    }
}

/// One thing found wrong, at the seq it concerns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub seq: u64,
    pub what: String,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub records: u64,
    pub last_seq: u64,
    pub checkpoints: usize,
    pub last_checkpoint_seq: u64,
    pub last_checkpoint_at_ms: i64,
    /// `stamp.completed` records whose signature was checked under its seal key.
    pub stamps_checked: u64,
    /// Sorted by seq; empty when the log verifies.
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Verifies the log read by `next` (which fills the record it is given and returns false at
/// the end; records must come in seq order), against `checkpoints` and the trusted `keys`;
/// with `seals`, also every `stamp.completed` signature under its seal key.
/// `progress` is called with the number of records read so far, now and then.
pub fn verify(
    mut next: impl FnMut(&mut Record) -> Result<bool, String>,
    checkpoints: &[Checkpoint],
    keys: &[TrustedKey],
    seals: Option<&SealKeys>,
    mut progress: impl FnMut(u64),
) -> Result<Report, String> {
    let mut report = Report {
        checkpoints: checkpoints.len(),
        ..Report::default()
    };
    let mut cp_problem = check_checkpoints(checkpoints, keys);
    if let Some(last) = checkpoints.last() {
        report.last_checkpoint_seq = last.seq;
        report.last_checkpoint_at_ms = last.at_ms;
    }

    let mut cps = checkpoints.iter().peekable();
    let mut cur = Record::default();
    let mut ahead = Record::default();
    let mut have_ahead = next(&mut ahead)?;
    let mut expected = 1u64;
    let mut prev = [0u8; 32];
    let mut record_problem = None;
    while have_ahead {
        std::mem::swap(&mut cur, &mut ahead);
        have_ahead = next(&mut ahead)?;
        report.records += 1;
        report.last_seq = cur.seq;
        if report.records.is_multiple_of(65536) {
            progress(report.records);
        }
        if record_problem.is_some() {
            continue; // count the rest, report the first
        }
        let lookahead = have_ahead.then_some(&ahead);
        if let Some(p) = check_record(&cur, expected, &prev, lookahead) {
            record_problem = Some(p);
            continue;
        }
        while cps.peek().is_some_and(|c| c.seq < cur.seq) {
            cps.next(); // covered a seq that is missing; reported by the sequence check
        }
        if let Some(c) = cps.peek() {
            if c.seq == cur.seq {
                if c.head != cur.hash {
                    record_problem = Some(Problem {
                        seq: c.seq,
                        what: format!(
                            "checkpoint {}: the signed head differs from record {}'s hash: the records up to it were rewritten",
                            c.seq, c.seq
                        ),
                    });
                }
                cps.next();
            }
        }
        if let Some(seals) = seals.filter(|_| cur.kind == super::kind::STAMP_COMPLETED) {
            report.stamps_checked += 1;
            if let Some(why) = seals.check(&cur) {
                record_problem = Some(Problem {
                    seq: cur.seq,
                    what: format!("stamp.completed {}: {why}", cur.seq),
                });
            }
        }
        expected = cur.seq + 1;
        prev = cur.hash;
    }
    progress(report.records);
    let last = report.last_seq;
    if record_problem.is_none() {
        if let Some(c) = checkpoints.iter().find(|c| c.seq > last) {
            record_problem = Some(Problem {
                seq: last + 1,
                what: format!(
                    "the log ends at seq {last} but checkpoint {} covers records up to {}: records {}..{} were removed (truncated)",
                    c.seq, c.seq, last + 1, c.seq
                ),
            });
        } else if last > report.last_checkpoint_seq {
            record_problem = Some(Problem {
                seq: report.last_checkpoint_seq + 1,
                what: format!(
                    "records {}..{last} are not covered by any checkpoint (added after the last one, or its checkpoint was deleted)",
                    report.last_checkpoint_seq + 1
                ),
            });
        }
    }
    report.problems.extend(cp_problem.take());
    report.problems.extend(record_problem);
    report.problems.sort_by_key(|p| p.seq);
    Ok(report)
}

/// The first problem among the checkpoints themselves: an unbroken chain, each signed by a
/// trusted key.
fn check_checkpoints(checkpoints: &[Checkpoint], keys: &[TrustedKey]) -> Option<Problem> {
    let by_id: HashMap<&str, &TrustedKey> = keys.iter().map(|k| (k.key_id.as_str(), k)).collect();
    if let Some(w) = checkpoints.windows(2).find(|w| w[1].seq <= w[0].seq) {
        return Some(Problem {
            seq: w[1].seq,
            what: format!(
                "checkpoint {} comes after checkpoint {}: the checkpoints are out of order (reordered)",
                w[1].seq, w[0].seq
            ),
        });
    }
    let mut prev_seq = 0u64;
    for c in checkpoints {
        let bad = |what: String| Some(Problem { seq: c.seq, what });
        if c.prev_seq != prev_seq {
            return bad(if c.prev_seq > prev_seq {
                format!(
                    "checkpoint {}: the checkpoint before it (seq {}) is missing",
                    c.seq, c.prev_seq
                )
            } else {
                format!(
                    "checkpoint {}: it names seq {} as the checkpoint before it, not {prev_seq}: checkpoint {prev_seq} was inserted",
                    c.seq, c.prev_seq
                )
            });
        }
        let Some(key) = by_id.get(c.key_id.as_str()) else {
            return bad(format!(
                "checkpoint {}: signed by key {}, which is not a trusted audit key",
                c.seq, c.key_id
            ));
        };
        if let Err(why) = check_signature(c, key) {
            return bad(why);
        }
        prev_seq = c.seq;
    }
    None
}

/// Whether checkpoint `c` is signed by `key` (of the algorithm it names); why not, if not.
pub fn check_signature(c: &Checkpoint, key: &TrustedKey) -> Result<(), String> {
    if key.algorithm.name() != c.algorithm {
        return Err(format!(
            "checkpoint {}: says {} but key {} is {}",
            c.seq,
            c.algorithm,
            key.key_id,
            key.algorithm.name()
        ));
    }
    let message = Checkpoint::message(c.seq, c.prev_seq, &c.head, c.at_ms);
    verify_device_signature(key.algorithm, &key.spki_der, &message, &c.signature).map_err(|e| {
        format!(
            "checkpoint {}: {e} with audit key {}: the checkpoint was forged or altered",
            c.seq, key.key_id
        )
    })
}

/// Whether `r` hashes to its stored hash if it had sequence number `seq`.
fn hashes_as(r: &Record, seq: u64) -> bool {
    let mut v = r.view();
    v.seq = seq;
    v.hash(&r.prev_hash) == r.hash
}

fn check_record(
    r: &Record,
    expected: u64,
    prev: &[u8; 32],
    ahead: Option<&Record>,
) -> Option<Problem> {
    let s = r.seq;
    if s != expected {
        return Some(if s > expected {
            Problem {
                seq: expected,
                what: if s == expected + 1 {
                    format!("record {expected} is missing (deleted)")
                } else {
                    format!("records {expected}..{} are missing (deleted)", s - 1)
                },
            }
        } else {
            Problem {
                seq: s,
                what: format!("record {s} appears again after record {}", expected - 1),
            }
        });
    }
    let contents_ok = r.view().hash(&r.prev_hash) == r.hash;
    let link_ok = r.prev_hash == *prev;
    if contents_ok && link_ok {
        return None;
    }
    if !contents_ok && s > 1 && r.hash == *prev {
        return Some(Problem {
            seq: s,
            what: format!("record {s} repeats record {}: a copy was inserted", s - 1),
        });
    }
    if !contents_ok && s > 1 && hashes_as(r, s - 1) {
        return Some(Problem {
            seq: s - 1,
            what: format!(
                "record {s} was written as seq {}: a record was inserted at seq {}",
                s - 1,
                s - 1
            ),
        });
    }
    if !contents_ok && hashes_as(r, s + 1) {
        let swapped = ahead.is_some_and(|a| a.seq == s + 1 && hashes_as(a, s));
        return Some(Problem {
            seq: s,
            what: if swapped {
                format!("records {s} and {} were swapped (reordered)", s + 1)
            } else {
                format!(
                    "record {s} was written as seq {}: the record at seq {s} was deleted and later ones renumbered",
                    s + 1
                )
            },
        });
    }
    if !contents_ok {
        return Some(Problem {
            seq: s,
            what: format!("record {s} does not match its hash: its contents were edited"),
        });
    }
    Some(Problem {
        seq: s.saturating_sub(1).max(1),
        what: format!(
            "record {s} does not link to record {}: record {} was rewritten with a recomputed hash, or records between them were removed",
            s.saturating_sub(1),
            s.saturating_sub(1)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::kind;

    /// A chain of `n` records and one checkpoint per `every` records, signed with a P-256 key
    /// in memory (the device signs the same way).
    fn log(
        n: u64,
        every: u64,
    ) -> (
        Vec<Record>,
        Vec<Checkpoint>,
        TrustedKey,
        p256::ecdsa::SigningKey,
    ) {
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        use sha2::Digest;
        use spki::EncodePublicKey;
        let sk = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let spki = sk.verifying_key().to_public_key_der().unwrap().into_vec();
        let key = TrustedKey::from_spki(spki).unwrap();
        let mut prev = [0u8; 32];
        let mut records = Vec::new();
        let mut cps: Vec<Checkpoint> = Vec::new();
        for seq in 1..=n {
            let mut r = Record::new(kind::STAMP_COMPLETED);
            r.seal = "contract".into();
            r.detail = format!("record {seq}");
            r.at_ms = seq as i64;
            r.seal_after(seq, prev);
            prev = r.hash;
            records.push(r);
            if seq % every == 0 || seq == n {
                let prev_seq = cps.last().map(|c| c.seq).unwrap_or(0);
                let digest = sha2::Sha256::digest(Checkpoint::message(seq, prev_seq, &prev, 0));
                let sig: p256::ecdsa::Signature = sk.sign_prehash(&digest).unwrap();
                cps.push(Checkpoint {
                    seq,
                    prev_seq,
                    head: prev,
                    at_ms: 0,
                    key_id: key.key_id.clone(),
                    algorithm: key.algorithm.name().into(),
                    signature: sig.to_der().as_bytes().to_vec(),
                });
            }
        }
        (records, cps, key, sk)
    }

    fn run(records: &[Record], cps: &[Checkpoint], key: &TrustedKey) -> Report {
        let mut it = records.iter();
        verify(
            |r| match it.next() {
                Some(x) => {
                    *r = x.clone();
                    Ok(true)
                }
                None => Ok(false),
            },
            cps,
            std::slice::from_ref(key),
            None,
            |_| {},
        )
        .unwrap()
    }

    fn first(rep: &Report) -> (u64, &str) {
        let p = rep.problems.first().expect("a problem");
        (p.seq, p.what.as_str())
    }

    /// Renumbers and re-chains records from index `from` on, as a forger who can compute
    /// hashes (but cannot sign) would.
    fn rechain(records: &mut [Record], from: usize) {
        for i in from..records.len() {
            let prev = if i == 0 { [0; 32] } else { records[i - 1].hash };
            let seq = i as u64 + 1;
            records[i].seal_after(seq, prev);
        }
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (r, c, k, _) = log(50, 10);
        let rep = run(&r, &c, &k);
        assert!(rep.ok(), "{:?}", rep.problems);
        assert_eq!((rep.records, rep.last_seq, rep.checkpoints), (50, 50, 5));
    }

    #[test]
    fn edits_deletions_insertions_swaps_and_truncation_are_named() {
        let (base, cps, k, _) = log(50, 10);

        let mut r = base.clone();
        r[11].detail = "edited".into();
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep).0, 12);
        assert!(first(&rep).1.contains("edited"), "{:?}", rep.problems);

        let mut r = base.clone();
        r.remove(11);
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep), (12, "record 12 is missing (deleted)"));

        // Deleted and renumbered, chain recomputed from there: the signed head at 20 differs,
        // but the first thing wrong is the renumbered record.
        let mut r = base.clone();
        r.remove(11);
        for x in r.iter_mut().skip(11) {
            x.seq -= 1;
        }
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep).0, 12);
        assert!(first(&rep).1.contains("deleted and later ones renumbered"));

        // A forger inserts a well-formed record at 12 and shifts the rest up.
        let mut r = base.clone();
        let mut forged = Record::new(kind::STAMP_COMPLETED);
        forged.detail = "forged".into();
        forged.seal_after(12, r[10].hash);
        r.insert(11, forged);
        for x in r.iter_mut().skip(12) {
            x.seq += 1;
        }
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep).0, 12, "{:?}", rep.problems);
        assert!(first(&rep).1.contains("inserted at seq 12"));

        let mut r = base.clone();
        r.swap(11, 12);
        (r[11].seq, r[12].seq) = (12, 13);
        let rep = run(&r, &cps, &k);
        assert_eq!(
            first(&rep),
            (12, "records 12 and 13 were swapped (reordered)")
        );

        let mut r = base.clone();
        r.truncate(44);
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep).0, 45);
        assert!(first(&rep).1.contains("truncated"));

        // Records appended after the last checkpoint.
        let mut r = base.clone();
        let mut extra = Record::new(kind::STAMP_COMPLETED);
        extra.seal_after(51, r[49].hash);
        r.push(extra);
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep).0, 51);
        assert!(first(&rep).1.contains("not covered"));

        // A full rewrite from 12 on keeps the chain whole but not the signed heads.
        let mut r = base.clone();
        r[11].detail = "rewritten".into();
        rechain(&mut r, 11);
        let rep = run(&r, &cps, &k);
        assert_eq!(first(&rep).0, 20);
        assert!(first(&rep).1.contains("rewritten"));
    }

    #[test]
    fn forged_missing_and_foreign_checkpoints_are_named() {
        let (r, cps, k, _) = log(50, 10);
        let mut c = cps.clone();
        c[2].signature[10] ^= 1;
        let rep = run(&r, &c, &k);
        assert_eq!(first(&rep).0, 30);
        assert!(first(&rep).1.contains("forged"), "{:?}", rep.problems);

        let mut c = cps.clone();
        c.remove(2);
        let rep = run(&r, &c, &k);
        assert_eq!(
            first(&rep),
            (
                40,
                "checkpoint 40: the checkpoint before it (seq 30) is missing"
            )
        );

        let other = TrustedKey::from_spki(k.spki_der.clone()).unwrap();
        let stranger = TrustedKey {
            key_id: "0000000000000000".into(),
            ..other
        };
        let rep = run(&r, &cps, &stranger);
        assert!(first(&rep).1.contains("not a trusted audit key"));
    }
}
