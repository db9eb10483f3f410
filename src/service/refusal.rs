//! Refusals before a stamp is authorised: recorded (`access.denied`, `stamp.denied`), counted,
//! and handed back as the caller's error.
//!
//! Owns: the records of refused requests and their metrics. Never: lets a refusal depend on
//! whether its record could be written (it stands either way, and the failure is logged).

use super::caller::{Caller, Peer};
use super::{Service, ServiceError};
use crate::audit::{kind, Record};

/// Logs and counts an approval refusal of the stamp `record` describes.
pub(super) fn note_refusal(record: &Record, d: &crate::approval::Denial) {
    tracing::info!(
        caller = %record.caller,
        seal = %record.seal,
        applicant = %record.applicant,
        approval = %record.jti,
        reason = %d.reason.code(),
        "stamp refused"
    );
    crate::metrics::get().denial(&record.seal, d.reason.code());
}

impl Service {
    /// Records and counts a stranger's request (`access.denied`, reason `unknown_caller`).
    pub(super) async fn refuse_stranger(&self, peer: &Peer, detail: String) {
        let mut r = Record::new(kind::ACCESS_DENIED);
        r.caller = format!(
            "uid {} gid {} pid {}",
            peer.uid,
            peer.gid,
            peer.pid.unwrap_or(0)
        );
        r.reason = "unknown_caller".into();
        r.detail = detail;
        crate::metrics::get().denial("", "unknown_caller");
        self.record_refusal(r).await;
    }

    /// Records a request refused as invalid on a seal the caller may use, and hands the error
    /// back.
    pub(super) async fn refuse_invalid(&self, mut record: Record, e: ServiceError) -> ServiceError {
        record.reason = e.status().as_str_name().to_ascii_lowercase();
        record.detail = e.to_string();
        crate::metrics::get().denial(&record.seal, &record.reason);
        self.record_refusal(record).await;
        e
    }

    /// Records and counts a caller's refusal before any approval was looked at (a seal it may
    /// not use, or that does not exist), and hands the error back.
    pub(super) async fn refuse_access(
        &self,
        caller: &Caller,
        seal_id: &str,
        e: ServiceError,
    ) -> ServiceError {
        let mut r = Record::new(kind::ACCESS_DENIED);
        r.caller = caller.name.clone();
        r.seal = seal_id.chars().take(200).collect();
        r.reason = e.status().as_str_name().to_ascii_lowercase();
        r.detail = e.to_string();
        // Only configured seal names become labels; a made-up one counts under "".
        let known = self.registry.seals.contains_key(seal_id)
            || self.terminals().any(|t| t.seal == seal_id);
        crate::metrics::get().denial(if known { seal_id } else { "" }, &r.reason);
        self.record_refusal(r).await;
        e
    }

    /// Records a refusal; the refusal stands whether or not the record could be written.
    pub(super) async fn record_refusal(&self, record: Record) {
        if let Err(e) = self.audit.append(record).await {
            tracing::error!(error = %e, "a refusal could not be recorded in the audit log");
        }
    }
}
