//! The audit log: every decision and every use of a seal, hash-chained and attested by a key
//! that never leaves a device.
//!
//! Owns: the record and checkpoint formats and their canonical encodings ([`Record::hash`],
//! [`Checkpoint::digest`]), the single writer that makes records durable in batches
//! ([`log`]), offline verification ([`verify`]), queries, statistics and export ([`query`]),
//! and the anomaly rules ([`anomaly`]).
//! Never: lets a stamp be signed before its authorisation is on disk, or retries a failed
//! write as if it had succeeded.
//!
//! The formats are documented for outside verifiers in `docs/audit-log.md`; a change to either
//! encoding is a new version tag, never an edit.

pub mod anomaly;
pub mod log;
pub mod query;
pub mod verify;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain tag that starts every record's hashed encoding.
pub const RECORD_TAG: &[u8] = b"sealgate-audit-v1\0";
/// Domain tag that starts every checkpoint's signed encoding.
pub const CHECKPOINT_TAG: &[u8] = b"sealgate-checkpoint-v1\0";

/// Record kinds. Stable strings: they are part of the hashed record and of queries.
/// Reasons of `terminal.rejected` records; each raises the alert `terminal_<reason>`.
pub mod rejection {
    /// An impression with no live grant (none given, used up, ended, or another grant's id).
    pub const NO_GRANT: &str = "no_grant";
    /// The counter skipped numbers: impressions were made that were never reported.
    pub const COUNTER_GAP: &str = "counter_gap";
    /// The counter went back.
    pub const COUNTER_ROLLBACK: &str = "counter_rollback";
    /// A report identical to one already taken.
    pub const REPLAY: &str = "replay";
    /// A report whose signature does not verify under the enrolled key, or that names
    /// another terminal or key.
    pub const BAD_SIGNATURE: &str = "bad_signature";
}

pub mod kind {
    pub const DAEMON_STARTED: &str = "daemon.started";
    /// Written to an idle log now and then (`audit.heartbeat_seconds`): a fresh checkpoint
    /// that shows the site alive.
    pub const AUDIT_HEARTBEAT: &str = "audit.heartbeat";
    /// One use of an approval consumed; the device is about to sign.
    pub const STAMP_AUTHORIZED: &str = "stamp.authorized";
    pub const STAMP_COMPLETED: &str = "stamp.completed";
    pub const STAMP_FAILED: &str = "stamp.failed";
    /// Written at start-up for an authorisation whose outcome was never recorded.
    pub const STAMP_OUTCOME_UNKNOWN: &str = "stamp.outcome_unknown";
    pub const STAMP_DENIED: &str = "stamp.denied";
    /// A dry run of the approval checks (`CheckApproval`): what it would answer.
    pub const APPROVAL_CHECKED: &str = "approval.checked";
    /// A caller was refused before any approval was looked at (unknown caller, foreign seal).
    pub const ACCESS_DENIED: &str = "access.denied";
    pub const DEVICE_UNAVAILABLE: &str = "device.unavailable";
    pub const DEVICE_READY: &str = "device.ready";
    pub const DEVICE_PIN_LOW: &str = "device.pin_low";
    pub const MFA_ENROLLED: &str = "mfa.enrolled";
    pub const MFA_RESET: &str = "mfa.reset";
    /// A configuration fragment from HQ was put in force, or refused (`reason` says why).
    pub const CONFIG_APPLIED: &str = "config.applied";
    pub const CONFIG_REFUSED: &str = "config.refused";
    /// A terminal's link came up or went down.
    pub const TERMINAL_CONNECTED: &str = "terminal.connected";
    pub const TERMINAL_DISCONNECTED: &str = "terminal.disconnected";
    /// A terminal's TLS connection was refused (certificate not pinned).
    pub const TERMINAL_REFUSED: &str = "terminal.refused";
    /// A verified HELLO: firmware and impression counter.
    pub const TERMINAL_HELLO: &str = "terminal.hello";
    /// Uses consumed and an unlock grant recorded; only then is it sent.
    pub const TERMINAL_GRANTED: &str = "terminal.granted";
    pub const TERMINAL_DENIED: &str = "terminal.denied";
    /// An impression inside a live grant with counter = last + 1, with its signed report.
    pub const TERMINAL_IMPRESSION: &str = "terminal.impression";
    /// A report not accepted; `reason` says why (see [`rejection`]).
    pub const TERMINAL_REJECTED: &str = "terminal.rejected";
    pub const TERMINAL_LOCKED: &str = "terminal.locked";
    pub const TERMINAL_TAMPER: &str = "terminal.tamper";
    pub const TERMINAL_GRANT_EXPIRED: &str = "terminal.grant_expired";
    /// No frame from a terminal for the profile's heartbeat timeout, and its return.
    pub const TERMINAL_HEARTBEAT_LOST: &str = "terminal.heartbeat_lost";
    pub const TERMINAL_HEARTBEAT_BACK: &str = "terminal.heartbeat_back";
    pub const ALERT: &str = "alert";
    /// An auditor acknowledged an alert at the console (`ref_seq` is the alert, `applicant` the
    /// auditor, `detail` the comment).
    pub const ALERT_ACKNOWLEDGED: &str = "alert.acknowledged";
    /// Auditors at the console (`applicant` is the auditor): a login, a refused login (`reason`
    /// says why), a log-out, a search (`detail` holds its filters), an export.
    pub const CONSOLE_LOGIN: &str = "console.login";
    pub const CONSOLE_LOGIN_FAILED: &str = "console.login_failed";
    pub const CONSOLE_LOGOUT: &str = "console.logout";
    pub const CONSOLE_SEARCH: &str = "console.search";
    pub const CONSOLE_EXPORT: &str = "console.export";
    /// A passkey registered for an approver at the approval page (`applicant` is the approver,
    /// `detail` the credential and the trust-store entry to add).
    pub const CONSOLE_PASSKEY_REGISTERED: &str = "console.passkey_registered";
    /// Applications (docs/approvals.md), `jti` the application's id: submitted (`detail` holds
    /// the token); waiting for a level (`reason` its role: what alert delivery sends approvers);
    /// a level approved (`approvers` so far, `detail` the token as it stands); rejected
    /// (`reason` "rejected", `detail` who and why).
    pub const APPLICATION_SUBMITTED: &str = "application.submitted";
    pub const APPLICATION_PENDING: &str = "application.pending";
    pub const APPLICATION_APPROVED: &str = "application.approved";
    pub const APPLICATION_REJECTED: &str = "application.rejected";
}

/// One audit record. Text fields are empty when they do not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Unix time in milliseconds, when the writer appended it.
    pub at_ms: i64,
    pub kind: String,
    pub seal: String,
    pub device: String,
    pub device_profile: String,
    pub device_serial: String,
    /// The configured caller, or "uid N gid N pid N" for a stranger.
    pub caller: String,
    pub applicant: String,
    /// JSON array of `{"id", "role", "level", "approved_at"}`, as the policy placed them.
    pub approvers: String,
    pub jti: String,
    /// Lower-case hex SHA-256 of the document.
    pub doc_sha256: String,
    pub doc_type: String,
    /// Minor units.
    pub amount: Option<i64>,
    pub currency: String,
    pub dept: String,
    pub purpose: String,
    /// Stable reason code of a denial, or the rule name of an alert.
    pub reason: String,
    pub detail: String,
    /// JSON object of device evidence (signature digest, algorithm, key).
    pub evidence: String,
    /// The record this one is about (an authorisation's outcome, an alert's cause).
    pub ref_seq: Option<u64>,
    #[serde(with = "hex32")]
    pub prev_hash: [u8; 32],
    #[serde(with = "hex32")]
    pub hash: [u8; 32],
}

/// The fields of a record as borrowed text, so that a verifier can hash rows without copying.
pub struct RecordView<'a> {
    pub seq: u64,
    pub at_ms: i64,
    /// kind, seal, device, device_profile, device_serial, caller, applicant, approvers, jti,
    /// doc_sha256, doc_type, currency, dept, purpose, reason, detail, evidence: in this order.
    pub text: [&'a str; TEXT_FIELDS],
    pub amount: Option<i64>,
    pub ref_seq: Option<u64>,
}

pub const TEXT_FIELDS: usize = 17;

/// The text columns, in canonical order (also the column order of the `audit` table).
pub const TEXT_COLUMNS: [&str; TEXT_FIELDS] = [
    "kind",
    "seal",
    "device",
    "device_profile",
    "device_serial",
    "caller",
    "applicant",
    "approvers",
    "jti",
    "doc_sha256",
    "doc_type",
    "currency",
    "dept",
    "purpose",
    "reason",
    "detail",
    "evidence",
];

impl Record {
    pub fn new(kind: &str) -> Record {
        Record {
            kind: kind.to_owned(),
            ..Record::default()
        }
    }

    /// Fills in who approved what, from an approval's verdict: the approvers, and the claims
    /// (applicant, approval id, document type, department, amount, and the purpose the
    /// approvers signed). The matched rule, the approval's scope and the purpose the caller
    /// stated go into `evidence` as `rule`, `scope` and `caller_purpose`.
    pub fn set_approval(
        &mut self,
        approvers: &str,
        claims: Option<&crate::token::Claims>,
        rule: Option<&str>,
        caller_purpose: &str,
    ) {
        self.approvers = approvers.to_owned();
        let mut context = serde_json::Map::new();
        if let Some(r) = rule {
            context.insert("rule".into(), r.into());
        }
        if let Some(c) = claims {
            self.applicant = c.applicant.clone();
            self.jti = c.jti.clone();
            self.doc_type = c.doc.doc_type.clone();
            self.dept = c.dept.clone();
            if let Some(a) = &c.amount {
                self.amount = Some(a.value);
                self.currency = a.currency.clone();
            }
            self.purpose = c.purpose.clone();
            if !c.scope.is_empty() {
                context.insert("scope".into(), c.scope.clone().into());
            }
            if let Some(p) = &c.doc.placement {
                context.insert("placement".into(), serde_json::json!(p));
            }
        }
        if !caller_purpose.is_empty() {
            context.insert("caller_purpose".into(), caller_purpose.into());
        }
        self.add_evidence(context);
    }

    /// Adds `fields` to the JSON object in `evidence` (made when empty).
    pub fn add_evidence(&mut self, fields: serde_json::Map<String, serde_json::Value>) {
        if fields.is_empty() {
            return;
        }
        let mut obj =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&self.evidence)
                .unwrap_or_default();
        obj.extend(fields);
        self.evidence = serde_json::Value::Object(obj).to_string();
    }

    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            seq: self.seq,
            at_ms: self.at_ms,
            text: [
                &self.kind,
                &self.seal,
                &self.device,
                &self.device_profile,
                &self.device_serial,
                &self.caller,
                &self.applicant,
                &self.approvers,
                &self.jti,
                &self.doc_sha256,
                &self.doc_type,
                &self.currency,
                &self.dept,
                &self.purpose,
                &self.reason,
                &self.detail,
                &self.evidence,
            ],
            amount: self.amount,
            ref_seq: self.ref_seq,
        }
    }

    /// The text fields, mutable, in canonical order (as in [`RecordView::text`]).
    pub fn text_mut(&mut self) -> [&mut String; TEXT_FIELDS] {
        [
            &mut self.kind,
            &mut self.seal,
            &mut self.device,
            &mut self.device_profile,
            &mut self.device_serial,
            &mut self.caller,
            &mut self.applicant,
            &mut self.approvers,
            &mut self.jti,
            &mut self.doc_sha256,
            &mut self.doc_type,
            &mut self.currency,
            &mut self.dept,
            &mut self.purpose,
            &mut self.reason,
            &mut self.detail,
            &mut self.evidence,
        ]
    }

    /// Sets `seq`, `prev_hash` and `hash` for appending after `prev`.
    pub fn seal_after(&mut self, seq: u64, prev: [u8; 32]) {
        self.seq = seq;
        self.prev_hash = prev;
        self.hash = self.view().hash(&prev);
    }
}

impl RecordView<'_> {
    /// SHA-256 over the tag, the previous hash and the canonical encoding: integers big-endian,
    /// each text as a 4-byte big-endian length and its UTF-8 bytes, optional integers as a
    /// presence byte (0 or 1) and, when present, the value.
    pub fn hash(&self, prev: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(RECORD_TAG);
        h.update(prev);
        h.update(self.seq.to_be_bytes());
        h.update(self.at_ms.to_be_bytes());
        for t in self.text {
            h.update((t.len() as u32).to_be_bytes());
            h.update(t.as_bytes());
        }
        match self.amount {
            None => h.update([0u8]),
            Some(a) => {
                h.update([1u8]);
                h.update(a.to_be_bytes());
            }
        }
        match self.ref_seq {
            None => h.update([0u8]),
            Some(r) => {
                h.update([1u8]);
                h.update(r.to_be_bytes());
            }
        }
        h.finalize().into()
    }
}

/// A device-signed statement that the log's record `seq` has hash `head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last record covered.
    pub seq: u64,
    /// The checkpoint before this one (0 for the first), so a deleted checkpoint is noticed.
    pub prev_seq: u64,
    #[serde(with = "hex32")]
    pub head: [u8; 32],
    pub at_ms: i64,
    /// First 16 hex digits of the SHA-256 of the audit key's SPKI.
    pub key_id: String,
    pub algorithm: String,
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The signed message: tag, seq, prev_seq, head, at_ms (integers big-endian).
    pub fn message(seq: u64, prev_seq: u64, head: &[u8; 32], at_ms: i64) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_TAG.len() + 56);
        m.extend_from_slice(CHECKPOINT_TAG);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&prev_seq.to_be_bytes());
        m.extend_from_slice(head);
        m.extend_from_slice(&at_ms.to_be_bytes());
        m
    }

    /// SHA-256 of [`Checkpoint::message`]: what the audit device signs.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(Checkpoint::message(
            self.seq,
            self.prev_seq,
            &self.head,
            self.at_ms,
        ))
        .into()
    }
}

/// A Unix time in milliseconds as RFC 3339 (UTC, milliseconds), as people read records.
pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| format!("{t:.3}"))
        .unwrap_or_else(|_| ms.to_string())
}

/// Milliseconds since the epoch from RFC 3339 or a date (YYYY-MM-DD, in UTC): how people give
/// a time range over records.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t.as_millisecond());
    }
    let d: jiff::civil::Date = s
        .parse()
        .map_err(|_| format!("{s:?} is neither RFC 3339 nor YYYY-MM-DD"))?;
    d.to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp().as_millisecond())
        .map_err(|e| e.to_string())
}

/// The key id of an SPKI: first 16 hex digits of its SHA-256.
pub fn key_id(spki_der: &[u8]) -> String {
    hex::encode(&Sha256::digest(spki_der)[..8])
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_hashed_and_fields_do_not_run_together() {
        let mut r = Record::new(kind::STAMP_COMPLETED);
        r.seal = "contract".into();
        r.amount = Some(5);
        r.seal_after(1, [0; 32]);
        let base = r.hash;
        let changed = |f: &dyn Fn(&mut Record)| {
            let mut c = r.clone();
            f(&mut c);
            c.view().hash(&c.prev_hash)
        };
        assert_ne!(changed(&|c| c.seq = 2), base);
        assert_ne!(changed(&|c| c.at_ms = 1), base);
        assert_ne!(changed(&|c| c.amount = None), base);
        assert_ne!(changed(&|c| c.amount = Some(0)), base);
        assert_ne!(changed(&|c| c.ref_seq = Some(0)), base);
        assert_ne!(changed(&|c| c.prev_hash = [1; 32]), base);
        // Moving a byte from one field to the next changes the hash.
        assert_ne!(
            changed(&|c| {
                c.seal = "contrac".into();
                c.device = "t".into();
            }),
            base
        );
        for (i, column) in TEXT_COLUMNS.iter().enumerate() {
            let mut v = r.view();
            let edited = format!("{}x", v.text[i]);
            v.text[i] = &edited;
            assert_ne!(v.hash(&r.prev_hash), base, "field {column}");
        }
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut r = Record::new(kind::ALERT);
        r.detail = "x".into();
        r.seal_after(7, [9; 32]);
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.view().hash(&back.prev_hash), back.hash);
    }
}
