//! Step 3 of a stamp: the approval's use is consumed and `stamp.authorized` recorded in one
//! durable transaction of the audit writer; only then does the device get the stamp.
//!
//! Owns: the authorisation record, and the hand-over from the writer's commit straight to
//! the device's queue (no trip back through the connection's task). Never: lets the device
//! sign a stamp whose authorisation is not durable.

use super::caller::Caller;
use super::job::Job;
use super::refusal::note_refusal;
use super::sign::Signer;
use super::ServiceError;
use crate::approval::gate::{PendingUse, Verdict};
use crate::audit::log::Appended;
use crate::audit::{kind, Record};
use crate::device::SealBinding;
use std::sync::Arc;

/// Hands the stamp to the audit writer; once its authorisation commits, the writer's thread
/// puts it in the device's queue. A refusal by the ledger (replayed, used up, over a rate
/// limit) or a log that cannot be written answers the client at once.
pub(super) fn authorize(job: Job, pending: PendingUse, signer: Arc<Signer>) {
    crate::crash_point!("stamp.before_authorization");
    let audit = job.audit.clone();
    let record = job.record.clone();
    audit.authorize_then(
        pending,
        record,
        Box::new(move |r| {
            let mut job = job;
            match r {
                Ok(Appended::Authorized { seq, uses_left }) => {
                    job.auth_seq = seq;
                    job.uses_left = uses_left;
                    signer.submit(job);
                }
                Ok(Appended::Refused { denial, .. }) => {
                    note_refusal(&job.record, &denial);
                    let _ = job.answer.send(Err(ServiceError::Denied(denial)));
                }
                Ok(Appended::Record { .. }) => {
                    let _ = job.answer.send(Err(ServiceError::Internal(
                        "the audit writer answered an authorisation with a plain record".into(),
                    )));
                }
                Err(e) => {
                    let _ = job.answer.send(Err(e.into()));
                }
            }
        }),
    );
}

/// The record of a stamp request, before its kind is known.
pub(super) fn stamp_record(
    caller: &Caller,
    seal: &SealBinding,
    digest: &[u8; 32],
    purpose: &str,
    verdict: &Verdict,
) -> Record {
    let mut r = Record::new(kind::STAMP_AUTHORIZED);
    r.seal = seal.id.clone();
    r.device = seal.device.id().to_owned();
    r.device_profile = seal.device.profile().name.clone();
    r.device_serial = seal.device.serial();
    r.caller = caller.name.clone();
    r.doc_sha256 = hex::encode(digest);
    r.set_approval(
        &verdict.approvers,
        verdict.claims.as_ref(),
        verdict.rule.as_deref(),
        purpose,
    );
    r
}
