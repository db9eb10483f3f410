//! Headquarters: every site's audit log shipped, verified and kept centrally (`sealgate-hq`),
//! and the shipper that sends a site's log there (`sealctl audit ship`).
//!
//! Rooms, in the order a batch passes through them:
//! - [`ship`]: at the site, reads the local log read-only (the log is the outbox) and sends
//!   records and checkpoints from HQ's head on; never on the stamp path.
//! - [`server`]: at HQ, mutual TLS with each site's pinned certificate, frames, one batch at a
//!   time per connection.
//! - [`check`]: what a batch or a hello must be to extend a site's verified head; pure logic.
//! - [`db`]: PostgreSQL, HQ's system of record: migrations, the per-site head row that orders
//!   every site's batches across HQ nodes, append-only tables, central alerts.
//! - [`cosign`]: HQ's witness cosignatures of what it verified, and the site's store of them.
//! - [`metrics`]: HQ's Prometheus metrics (heads, lag, alerts), refreshed from the database.
//! - [`config`]: HQ's TOML configuration: listener, database, enrolled sites.
//!
//! Never: stores a record that is not covered by a checkpoint signed by the site's enrolled
//! audit key and linked to what HQ already holds.

pub mod check;
pub mod config;
pub mod cosign;
pub mod db;
pub mod metrics;
pub mod policy;
pub mod reads;
pub mod server;
pub mod ship;

pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/sealgate.hq.v1.rs"));
}

use crate::audit::{Checkpoint, Record};

/// Version of the HQ link protocol, sent in every hello.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default largest frame on the HQ link.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

fn hash32(b: &[u8], what: &str) -> Result<[u8; 32], String> {
    b.try_into()
        .map_err(|_| format!("{what} is {} bytes, not 32", b.len()))
}

impl From<&Record> for pb::Record {
    fn from(r: &Record) -> pb::Record {
        pb::Record {
            seq: r.seq,
            at_ms: r.at_ms,
            kind: r.kind.clone(),
            seal: r.seal.clone(),
            device: r.device.clone(),
            device_profile: r.device_profile.clone(),
            device_serial: r.device_serial.clone(),
            caller: r.caller.clone(),
            applicant: r.applicant.clone(),
            approvers: r.approvers.clone(),
            jti: r.jti.clone(),
            doc_sha256: r.doc_sha256.clone(),
            doc_type: r.doc_type.clone(),
            currency: r.currency.clone(),
            dept: r.dept.clone(),
            purpose: r.purpose.clone(),
            reason: r.reason.clone(),
            detail: r.detail.clone(),
            evidence: r.evidence.clone(),
            amount: r.amount,
            ref_seq: r.ref_seq,
            prev_hash: r.prev_hash.to_vec(),
            hash: r.hash.to_vec(),
        }
    }
}

impl TryFrom<pb::Record> for Record {
    type Error = String;
    fn try_from(r: pb::Record) -> Result<Record, String> {
        Ok(Record {
            prev_hash: hash32(&r.prev_hash, &format!("record {}'s prev_hash", r.seq))?,
            hash: hash32(&r.hash, &format!("record {}'s hash", r.seq))?,
            seq: r.seq,
            at_ms: r.at_ms,
            kind: r.kind,
            seal: r.seal,
            device: r.device,
            device_profile: r.device_profile,
            device_serial: r.device_serial,
            caller: r.caller,
            applicant: r.applicant,
            approvers: r.approvers,
            jti: r.jti,
            doc_sha256: r.doc_sha256,
            doc_type: r.doc_type,
            currency: r.currency,
            dept: r.dept,
            purpose: r.purpose,
            reason: r.reason,
            detail: r.detail,
            evidence: r.evidence,
            amount: r.amount,
            ref_seq: r.ref_seq,
        })
    }
}

impl From<&Checkpoint> for pb::Checkpoint {
    fn from(c: &Checkpoint) -> pb::Checkpoint {
        pb::Checkpoint {
            seq: c.seq,
            prev_seq: c.prev_seq,
            head: c.head.to_vec(),
            at_ms: c.at_ms,
            key_id: c.key_id.clone(),
            algorithm: c.algorithm.clone(),
            signature: c.signature.clone(),
        }
    }
}

impl TryFrom<pb::Checkpoint> for Checkpoint {
    type Error = String;
    fn try_from(c: pb::Checkpoint) -> Result<Checkpoint, String> {
        Ok(Checkpoint {
            head: hash32(&c.head, &format!("checkpoint {}'s head", c.seq))?,
            seq: c.seq,
            prev_seq: c.prev_seq,
            at_ms: c.at_ms,
            key_id: c.key_id,
            algorithm: c.algorithm,
            signature: c.signature,
        })
    }
}

impl From<&check::Head> for pb::Head {
    fn from(h: &check::Head) -> pb::Head {
        pb::Head {
            seq: h.seq,
            hash: h.hash.to_vec(),
            checkpoint_seq: h.checkpoint_seq,
        }
    }
}
