//! Step 5 of a stamp: the device's answer becomes the stamp's outcome, durable before the
//! client hears of it. A container stamp is assembled here (with the TSA's token when the
//! seal asks for trusted time); the outcome record (`stamp.completed` or `stamp.failed`) goes
//! to the audit writer, whose commit answers the client.
//!
//! Owns: the outcome record and its evidence, withholding a signature whose completion cannot
//! be recorded, the stamp metrics and the `stamped` log line. Never: hands out a signature
//! before `stamp.completed` is durable.

use super::job::{Job, Stamped};
use super::ServiceError;
use crate::audit::{kind, Record};
use crate::config::TimestampMode;

/// What the device answered for `job`. Runs on the device's signing thread; a TSA request,
/// which may wait for the network, gets a thread of its own.
pub(super) fn signed(job: Job, result: Result<Vec<u8>, ServiceError>) {
    let signature = match result {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, ServiceError::Device(_)) {
                crate::metrics::get().device_error(job.device.id());
            }
            let reason = e.status().as_str_name().to_ascii_lowercase();
            return fail(job, e, &reason);
        }
    };
    match job.tsa.clone() {
        None => complete(job, signature, None, serde_json::Map::new()),
        Some((tsa, mode)) => {
            let spawned = std::thread::Builder::new()
                .name("timestamp".into())
                .spawn(move || {
                    let got = tsa.stamp(&signature);
                    timestamped(job, signature, &tsa, mode, got)
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a thread for the TSA request");
            }
        }
    }
}

/// Trusted time over the signature, for a container whose seal asks for it.
fn timestamped(
    job: Job,
    signature: Vec<u8>,
    tsa: &crate::timestamp::Tsa,
    mode: TimestampMode,
    got: Result<crate::timestamp::Token, crate::timestamp::TimestampError>,
) {
    let mut fields = serde_json::Map::new();
    match got {
        Ok(t) => {
            fields.insert(
                "timestamp".into(),
                serde_json::json!({
                    "tsa": tsa.url(),
                    "gen_time": t.gen_time,
                    "token_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&t.der)),
                }),
            );
            complete(job, signature, Some(t.der), fields)
        }
        Err(e) if mode == TimestampMode::BestEffort => {
            job.span.in_scope(|| {
                tracing::warn!(seal = %job.record.seal, error = %e, "stamped without a timestamp")
            });
            fields.insert("timestamp_warning".into(), e.to_string().into());
            complete(job, signature, None, fields)
        }
        Err(e) => {
            let e = ServiceError::TimestampUnavailable(format!(
                "{e}; the seal's policy requires a timestamp, so the signature was withheld"
            ));
            fail(job, e, "timestamp_unavailable")
        }
    }
}

/// Records `stamp.failed` for `job` and answers its client with `e` once it is durable (or,
/// if it cannot be written now, keeps it for a later batch).
fn fail(job: Job, e: ServiceError, reason: &str) {
    crate::metrics::get().stamp(&job.record.seal, "failed", None);
    let mut outcome = job.record.clone();
    outcome.ref_seq = Some(job.auth_seq);
    outcome.kind = kind::STAMP_FAILED.into();
    outcome.reason = reason.into();
    outcome.detail = e.to_string();
    let audit = job.audit.clone();
    let kept = outcome.clone();
    audit.append_then(
        outcome,
        Box::new(move |r| {
            if r.is_err() {
                job.audit.append_later(kept);
            }
            let _ = job.answer.send(Err(e));
        }),
    );
}

/// The signature made, the container assembled: `stamp.completed`, then the answer.
/// `token` is the TSA's, when there is one; `time_fields` the evidence of trusted time (the
/// token's, or the warning of a best-effort TSA that failed).
fn complete(
    job: Job,
    signature: Vec<u8>,
    token: Option<Vec<u8>>,
    mut time_fields: serde_json::Map<String, serde_json::Value>,
) {
    let seal_key = job.device.key(job.key);
    let container = match &job.cms {
        None => None,
        Some(c) => match crate::container::assemble(
            seal_key.algorithm,
            &c.certificate,
            &c.plan.signed_attributes,
            &signature,
            token.as_deref(),
        ) {
            Ok(der) => Some(der),
            // Signed, but no container can be made: withheld and recorded as failed.
            Err(e) => {
                let e = ServiceError::Internal(format!("{e}; the signature was withheld"));
                return fail(job, e, "container");
            }
        },
    };
    let mut outcome = job.record.clone();
    outcome.ref_seq = Some(job.auth_seq);
    outcome.kind = kind::STAMP_COMPLETED.into();
    // The rule, scope and caller's purpose stay on the authorisation (`ref_seq`).
    outcome.evidence = serde_json::json!({
        "algorithm": seal_key.algorithm.name(),
        "key_id": crate::audit::key_id(&seal_key.spki_der),
        "signature": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &signature),
        "signature_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&signature)),
    })
    .to_string();
    if let Some(c) = &job.cms {
        outcome.add_evidence(container_fields(c.kind, Some(&c.plan.signed_attributes)));
        if let Some(p) = &c.placement {
            time_fields.insert("placement".into(), serde_json::json!(p));
        }
        outcome.add_evidence(time_fields);
    }
    let audit = job.audit.clone();
    audit.append_then(
        outcome,
        Box::new(move |r| {
            let metrics = crate::metrics::get();
            let _span = job.span.enter();
            if let Err(e) = r {
                // The signature exists but is never handed out: record that instead, later.
                let mut failed: Record = job.record.clone();
                failed.ref_seq = Some(job.auth_seq);
                failed.kind = kind::STAMP_FAILED.into();
                failed.reason = "audit_unavailable".into();
                failed.evidence.clear();
                failed.detail = format!(
                    "the signature was made but withheld: its completion could not be recorded ({e})"
                );
                metrics.stamp(&failed.seal, "failed", None);
                job.audit.append_later(failed);
                let _ = job.answer.send(Err(ServiceError::AuditUnavailable(format!(
                    "{e}; the signature was withheld"
                ))));
                return;
            }
            let r = &job.record;
            tracing::info!(
                caller = %job.caller,
                seal = %r.seal,
                applicant = %r.applicant,
                approval = %r.jti,
                document = %r.doc_sha256,
                micros = job.started.elapsed().as_micros() as u64,
                "stamped"
            );
            metrics.stamp(&r.seal, "completed", Some(job.started.elapsed().as_secs_f64()));
            let _ = job.answer.send(Ok(Stamped {
                signature,
                container,
                uses_left: job.uses_left,
            }));
        }),
    );
}

/// The evidence fields of a container stamp: its kind and, once signed, its signed attributes
/// (base64 DER) and their SHA-256, which bind the approved digest.
pub(super) fn container_fields(
    kind: crate::container::Kind,
    signed_attributes: Option<&[u8]>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("container".into(), kind.name().into());
    if let Some(a) = signed_attributes {
        m.insert(
            "signed_attributes".into(),
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, a).into(),
        );
        m.insert(
            "signed_attributes_sha256".into(),
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(a)).into(),
        );
        if let Ok(md) = crate::container::message_digest(a) {
            m.insert("message_digest".into(), hex::encode(md).into());
        }
    }
    m
}
