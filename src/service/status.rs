//! What the daemon reports: seals, devices and their queues, the audit log's head, alerts.
//!
//! Owns: the Status, ListSeals and DescribeSeal answers and the wire form of audit records.
//! Never: reveals a seal to a caller who was not given it.

use super::caller::Caller;
use super::{off_executor, Service, ServiceError};
use crate::audit::{kind, Record};
use crate::device::{Health, SealBinding};
use crate::protocol::pb;
use std::sync::atomic::Ordering;

/// An audit record as the wire carries it.
pub fn wire_record(r: &Record) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        at_unix_ms: r.at_ms as u64,
        kind: r.kind.clone(),
        reason: r.reason.clone(),
        detail: r.detail.clone(),
        seal: r.seal.clone(),
        device: r.device.clone(),
        caller: r.caller.clone(),
        applicant: r.applicant.clone(),
        approval_id: r.jti.clone(),
        document_sha256: r.doc_sha256.clone(),
        ref_seq: r.ref_seq.unwrap_or(0),
    }
}

pub(super) fn health_fields(h: Health) -> (pb::DeviceStatus, String) {
    match h {
        Health::Ready => (pb::DeviceStatus::Ready, String::new()),
        Health::Unavailable(reason) => (pb::DeviceStatus::Unavailable, reason),
    }
}

pub(super) fn describe(seal: &SealBinding) -> pb::DescribeSealResponse {
    let key = seal.device.key(seal.key);
    let (status, detail) = health_fields(seal.device.health());
    pb::DescribeSealResponse {
        id: seal.id.clone(),
        name: seal.name.clone(),
        algorithm: key.algorithm.name().to_owned(),
        device_id: seal.device.id().to_owned(),
        device_profile: seal.device.profile().name.clone(),
        device_status: status as i32,
        device_detail: detail,
        public_key_spki: key.spki_der.clone(),
        certificate_der: key.certificate_der.clone().unwrap_or_default(),
        image_png: seal.image_png.as_deref().cloned().unwrap_or_default(),
    }
}

impl Service {
    pub(super) fn summaries(&self, caller: &Caller) -> Vec<pb::SealSummary> {
        self.registry
            .seal_order
            .iter()
            .filter(|id| caller.seals.contains(*id))
            .filter_map(|id| self.registry.seals.get(id))
            .map(|s| pb::SealSummary {
                id: s.id.clone(),
                name: s.name.clone(),
                algorithm: s.device.key(s.key).algorithm.name().to_owned(),
                available: s.device.health() == Health::Ready,
            })
            .chain(
                self.terminals()
                    .filter(|t| caller.seals.contains(&t.seal))
                    .map(|t| pb::SealSummary {
                        id: t.seal.clone(),
                        name: t.name.clone(),
                        algorithm: "terminal".into(),
                        available: t.connected(),
                    }),
            )
            .collect()
    }

    pub(super) fn status(&self, caller: &Caller) -> pb::StatusResponse {
        pb::StatusResponse {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: self.started.elapsed().as_secs(),
            connections: self.connections.load(Ordering::Relaxed) as u32,
            devices: self
                .registry
                .devices
                .iter()
                .map(|d| {
                    let (status, detail) = health_fields(d.health());
                    let signer = &self.signers[d.id()];
                    pb::DeviceReport {
                        id: d.id().to_owned(),
                        profile: d.profile().name.clone(),
                        status: status as i32,
                        detail,
                        queued: signer.queued() as u32,
                        signing: signer.signing() as u32,
                        queue_limit: signer.limit() as u32,
                    }
                })
                .chain(self.terminals().map(|t| {
                    let (status, detail) = if t.connected() {
                        (pb::DeviceStatus::Ready, String::new())
                    } else {
                        (pb::DeviceStatus::Unavailable, "not connected".to_owned())
                    };
                    pb::DeviceReport {
                        id: t.id.clone(),
                        profile: t.profile.clone(),
                        status: status as i32,
                        detail,
                        ..Default::default()
                    }
                }))
                .collect(),
            seals: self.summaries(caller),
            audit: Some({
                let a = self.audit.status();
                pb::AuditReport {
                    head_seq: a.head_seq,
                    head_hash: hex::encode(a.head_hash),
                    checkpoint_seq: a.checkpoint_seq,
                    checkpoint_at_unix_ms: a.checkpoint_at_ms as u64,
                    error: a.error,
                    batches: a.batches,
                    records: a.records,
                }
            }),
        }
    }

    /// The newest `n` alerts, oldest first.
    pub(super) async fn recent_alerts(&self, n: u32) -> Result<Vec<pb::AuditRecord>, ServiceError> {
        let gate = self.gate.clone();
        let found = off_executor("alerts", move || {
            gate.store
                .with(|c| crate::audit::query::latest(c, kind::ALERT, n as u64))
        })
        .await?
        .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))?;
        Ok(found.iter().map(wire_record).collect())
    }
}
