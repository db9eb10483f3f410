//! Auditors' actions at the console, recorded in the audit log.
//!
//! Owns: the RecordOversight request: who may send it, which kinds it may append, and the
//! bounds of what they carry. Never: appends any other kind of record for the console, or
//! answers OK before the record is durable.

use super::caller::Caller;
use super::{off_executor, Service, ServiceError};
use crate::audit::{kind, Record};
use crate::protocol::{pb, response};

/// The kinds the console may append.
const KINDS: &[&str] = &[
    kind::CONSOLE_LOGIN,
    kind::CONSOLE_LOGIN_FAILED,
    kind::CONSOLE_LOGOUT,
    kind::CONSOLE_SEARCH,
    kind::CONSOLE_EXPORT,
    kind::ALERT_ACKNOWLEDGED,
    kind::CONSOLE_PASSKEY_REGISTERED,
];
const MAX_USER: usize = 64;
const MAX_DETAIL: usize = 2000;
const MAX_REASON: usize = 64;

impl Service {
    pub(super) async fn record_oversight(
        &self,
        caller: &Caller,
        req: pb::RecordOversightRequest,
    ) -> Result<response::Body, ServiceError> {
        if !caller.oversight {
            return Err(ServiceError::PermissionDenied(format!(
                "caller {:?} is not the auditors' console (oversight = true)",
                caller.name
            )));
        }
        let kind = KINDS.iter().find(|k| **k == req.kind).ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "{:?} is not a console record kind ({})",
                req.kind,
                KINDS.join(", ")
            ))
        })?;
        for (what, text, max, may_be_empty) in [
            ("user", &req.user, MAX_USER, false),
            ("detail", &req.detail, MAX_DETAIL, true),
            ("reason", &req.reason, MAX_REASON, true),
        ] {
            if text.len() > max || (!may_be_empty && text.is_empty()) {
                return Err(ServiceError::InvalidArgument(format!(
                    "{what} is {} bytes; {} to {max} are accepted",
                    text.len(),
                    if may_be_empty { 0 } else { 1 }
                )));
            }
        }
        let ref_seq = if *kind == kind::ALERT_ACKNOWLEDGED {
            let seq = req.ref_seq;
            let gate = self.gate.clone();
            let found = off_executor("alert look-up", move || {
                gate.store.read(|c| {
                    use rusqlite::OptionalExtension;
                    c.query_row(
                        "SELECT kind FROM audit WHERE seq = ?1",
                        [seq.min(i64::MAX as u64) as i64],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()
                })
            })
            .await?
            .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))?;
            if found.as_deref() != Some(kind::ALERT) {
                return Err(ServiceError::InvalidArgument(format!(
                    "record {seq} is not an alert"
                )));
            }
            Some(seq)
        } else {
            (req.ref_seq != 0).then_some(req.ref_seq)
        };
        let mut record = Record::new(kind);
        record.caller = caller.name.clone();
        record.applicant = req.user;
        record.detail = req.detail;
        record.reason = req.reason;
        record.ref_seq = ref_seq;
        let seq = self.audit.append(record).await?;
        Ok(response::Body::RecordOversight(
            pb::RecordOversightResponse { seq },
        ))
    }
}
