//! Step 2 of a stamp: the request and its approval pass, before anything is spent.
//!
//! Owns: validating the request (digest, purpose, the container the seal can make), admitting
//! it to the device's queue, finding a device that is down before a use is spent on it, and the
//! approval gate: its checks that need no state run inline on the connection's task; only a
//! rule that asks for a TOTP code takes the gate to the database first. Also the dry run
//! (`CheckApproval`). Never: spends a use or a TOTP code on a request it refuses for another
//! reason.

use super::authorize::stamp_record;
use super::caller::Caller;
use super::job::CmsJob;
use super::outcome::container_fields;
use super::refusal::note_refusal;
use super::{digest32, off_executor, purpose_ok, unix_now, Service, ServiceError};
use crate::approval::gate::{PendingUse, Verdict};
use crate::audit::{kind, Record};
use crate::container::Kind;
use crate::device::{DeviceError, Health, SealBinding};
use crate::protocol::{pb, response};
use std::time::{SystemTime, UNIX_EPOCH};

/// A stamp whose request and approval passed every check: what the pipeline needs.
pub(super) struct Approved {
    pub digest: [u8; 32],
    /// The approval's id (`jti`), for the reply.
    pub approval_id: String,
    /// The `stamp.authorized` record to write.
    pub record: Record,
    /// The use the audit writer consumes with it.
    pub pending: PendingUse,
    pub cms: Option<CmsJob>,
    /// The request's place in the device's queue, held until its outcome is durable.
    pub queued: tokio::sync::OwnedSemaphorePermit,
}

impl Service {
    /// Checks a stamp request on `seal`, recording a refusal.
    pub(super) async fn check_stamp(
        &self,
        caller: &Caller,
        seal: &SealBinding,
        req: pb::StampRequest,
    ) -> Result<Approved, ServiceError> {
        let mut refused = Record::new(kind::STAMP_DENIED);
        refused.caller = caller.name.clone();
        refused.seal = seal.id.clone();
        let checked = digest32(&req.document_sha256).and_then(|d| {
            purpose_ok(&req.purpose)?;
            let cert = container_of(seal, req.container)?;
            if let Some((kind, _)) = &cert {
                // What the container needs of the approval is checked before the gate, so a
                // refusal here spends no TOTP code; the verified claims decide afterwards.
                let unverified = crate::token::Token::parse(&req.approval_token).ok();
                cms_digest(seal, *kind, &d, unverified.as_ref().map(|t| &t.claims))?;
            }
            Ok((d, cert))
        });
        let (digest, cms_cert) = match checked {
            Ok(v) => v,
            Err(e) => return Err(self.refuse_invalid(refused, e).await),
        };
        // No use is consumed for a request the device queue would refuse anyway.
        let queued = self.signers[seal.device.id()].admit()?;
        // A device that is down is found out before an approval's use is spent on it.
        if let Some(e) = seal.device.pin_refusal() {
            return Err(ServiceError::Device(e));
        }
        if seal.device.health() != Health::Ready {
            let device = seal.device.clone();
            off_executor("reconnect", move || device.recover()).await?;
            if let Health::Unavailable(reason) = seal.device.health() {
                return Err(ServiceError::Device(DeviceError::Unavailable(format!(
                    "device {:?} is unavailable: {reason}",
                    seal.device.id()
                ))));
            }
        }
        let token = zeroize::Zeroizing::new(req.approval_token);
        let first = self.gate.first_pass(&seal.id, &digest, &token, unix_now());
        let verdict = if first.needs_state() {
            let gate = self.gate.clone();
            let mfa_code = zeroize::Zeroizing::new(req.mfa_code);
            off_executor("approval", move || {
                gate.with_state(first, &mfa_code, unix_now(), false)
            })
            .await?
            .map_err(ServiceError::from)?
        } else {
            first.stateless()
        };
        let mut record = stamp_record(caller, seal, &digest, &req.purpose, &verdict);
        if let Some((kind, _)) = &cms_cert {
            record.add_evidence(container_fields(*kind, None));
        }
        if let Some(d) = verdict.denials.into_iter().next() {
            note_refusal(&record, &d);
            record.kind = kind::STAMP_DENIED.into();
            record.reason = d.reason.code().into();
            record.detail = d.detail.clone();
            self.record_refusal(record).await;
            return Err(ServiceError::Denied(d));
        }
        let cms = match cms_cert.map(|cert| cms_plan(seal, cert, &digest, verdict.claims.as_ref()))
        {
            None => None,
            Some(Ok(job)) => Some(job),
            Some(Err(e)) => {
                record.kind = kind::STAMP_DENIED.into();
                return Err(self.refuse_invalid(record, e).await);
            }
        };
        let pending = verdict.pending.ok_or_else(|| {
            ServiceError::Internal("an authorised stamp has no use to consume".into())
        })?;
        Ok(Approved {
            digest,
            approval_id: verdict.claims.map(|c| c.jti).unwrap_or_default(),
            record,
            pending,
            cms,
            queued,
        })
    }

    /// Runs the approval gate off the executor.
    pub(super) async fn run_gate(
        &self,
        seal: &str,
        digest: [u8; 32],
        token: Vec<u8>,
        mfa_code: String,
        dry_run: bool,
    ) -> Result<Verdict, ServiceError> {
        let gate = self.gate.clone();
        let seal = seal.to_owned();
        let mfa_code = zeroize::Zeroizing::new(mfa_code);
        let token = zeroize::Zeroizing::new(token);
        off_executor("approval", move || {
            gate.check(&seal, &digest, &token, &mfa_code, unix_now(), dry_run)
        })
        .await?
        .map_err(ServiceError::from)
    }

    pub(super) async fn check_approval(
        &self,
        caller: &Caller,
        req: pb::CheckApprovalRequest,
    ) -> Result<response::Body, ServiceError> {
        // A signing seal, or the physical seal in a terminal: both have a policy to check.
        let terminal = self
            .terminals()
            .find(|t| t.seal == req.seal_id && caller.seals.contains(&t.seal));
        let seal_id = match (terminal, self.seal_for(caller, &req.seal_id)) {
            (Some(t), _) => t.seal.clone(),
            (None, Ok(s)) => s.id.clone(),
            (None, Err(e)) => return Err(self.refuse_access(caller, &req.seal_id, e).await),
        };
        let mut record = Record::new(kind::APPROVAL_CHECKED);
        record.caller = caller.name.clone();
        record.seal = seal_id.clone();
        let digest = match digest32(&req.document_sha256) {
            Ok(d) => d,
            Err(e) => return Err(self.refuse_invalid(record, e).await),
        };
        record.doc_sha256 = hex::encode(digest);
        let v = self
            .run_gate(&seal_id, digest, req.approval_token, req.mfa_code, true)
            .await?;
        record.set_approval(&v.approvers, v.claims.as_ref(), v.rule.as_deref(), "");
        match v.denials.first() {
            None => record.detail = "would pass".into(),
            Some(d) => {
                record.reason = d.reason.code().into();
                record.detail = format!("would be refused: {}", d.detail);
            }
        }
        // A dry run that cannot be recorded is not answered.
        self.audit.append(record).await?;
        Ok(response::Body::CheckApproval(pb::CheckApprovalResponse {
            would_pass: v.denials.is_empty(),
            denials: v
                .denials
                .iter()
                .map(|d| pb::Denial {
                    reason: d.reason.code().to_owned(),
                    detail: d.detail.clone(),
                })
                .collect(),
            rule: v.rule.unwrap_or_default(),
        }))
    }
}

/// The container asked for and the seal's certificate it needs, or None for a bare signature;
/// refused (before any approval is looked at) for a container this seal cannot make.
pub(super) fn container_of(
    seal: &SealBinding,
    container: i32,
) -> Result<Option<(Kind, Vec<u8>)>, ServiceError> {
    let kind = match pb::Container::try_from(container) {
        Ok(pb::Container::Raw) => return Ok(None),
        Ok(pb::Container::CmsDetached) => Kind::Cms,
        Ok(pb::Container::Pades) => Kind::Pades,
        Err(_) => {
            return Err(ServiceError::InvalidArgument(format!(
            "container {container} is not one this daemon makes (0 raw, 1 CMS detached, 2 PAdES)"
        )))
        }
    };
    let key = seal.device.key(seal.key);
    let cert = key.certificate_der.clone().ok_or_else(|| {
        ServiceError::InvalidArgument(format!(
            "seal {:?} has no certificate on its device; a {} signature names its signer by one",
            seal.id,
            kind.name()
        ))
    })?;
    Ok(Some((kind, cert)))
}

/// The message digest of a container stamp: the approved SHA-256; for Ed25519 the document's
/// SHA-512 (RFC 8419), which only the approval's own `doc.sha512` may give. A PAdES stamp's
/// approval must also place the visible seal.
pub(super) fn cms_digest(
    seal: &SealBinding,
    kind: Kind,
    digest: &[u8; 32],
    claims: Option<&crate::token::Claims>,
) -> Result<Vec<u8>, ServiceError> {
    if kind == Kind::Pades && claims.and_then(|c| c.doc.placement.as_ref()).is_none() {
        return Err(ServiceError::InvalidArgument(format!(
            "a PAdES stamp of seal {:?} needs an approval that places the seal (doc.placement; sealctl token new --pdf adds it)",
            seal.id
        )));
    }
    let algorithm = seal.device.key(seal.key).algorithm;
    if crate::container::message_digest_len(algorithm) == 32 {
        return Ok(digest.to_vec());
    }
    claims
        .and_then(|c| c.doc.sha512.as_deref())
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| {
            ServiceError::InvalidArgument(format!(
                "seal {:?} signs with Ed25519, whose CMS message digest is the document's SHA-512 (RFC 8419); the approval carries no doc.sha512 (sealctl token new --file or --pdf adds it)",
                seal.id
            ))
        })
}

/// The signed attributes of a container stamp, from the verified claims.
pub(super) fn cms_plan(
    seal: &SealBinding,
    (kind, certificate): (Kind, Vec<u8>),
    digest: &[u8; 32],
    claims: Option<&crate::token::Claims>,
) -> Result<CmsJob, ServiceError> {
    let md = cms_digest(seal, kind, digest, claims)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let algorithm = seal.device.key(seal.key).algorithm;
    let plan = crate::container::plan(algorithm, kind, &certificate, &md, now)
        .map_err(|e| ServiceError::InvalidArgument(format!("seal {:?}: {e}", seal.id)))?;
    Ok(CmsJob {
        kind,
        placement: claims.and_then(|c| c.doc.placement.clone()),
        plan,
        certificate,
    })
}
