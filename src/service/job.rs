//! A stamp in flight: what passes from step to step once the approval has passed (the
//! authorisation, the device, the outcome), and what its client gets back. Only data; the
//! steps are the rooms around it.

use super::ServiceError;
use crate::audit::log::AuditLog;
use crate::audit::Record;
use crate::config::TimestampMode;
use crate::device::SealDevice;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// What a stamp's client gets back.
pub(super) struct Stamped {
    pub signature: Vec<u8>,
    /// The container, when one was asked for.
    pub container: Option<Vec<u8>>,
    pub uses_left: u32,
}

pub(super) type Answer = oneshot::Sender<Result<Stamped, ServiceError>>;

/// A stamp on its way from authorisation to outcome. It owns everything the remaining steps
/// need, so it runs to a recorded outcome even when the request that started it times out or
/// its client goes away.
pub(super) struct Job {
    /// When the request arrived.
    pub started: Instant,
    /// The connection's span, for the steps' log lines.
    pub span: tracing::Span,
    pub audit: AuditLog,
    pub device: Arc<dyn SealDevice>,
    pub key: usize,
    pub digest: [u8; 32],
    /// For a container stamp: the signed attributes and the seal's certificate.
    pub cms: Option<CmsJob>,
    /// The TSA to timestamp the signature with, and whether a stamp may go without one.
    pub tsa: Option<(Arc<crate::timestamp::Tsa>, TimestampMode)>,
    /// The authorisation's record, the template of the outcome's.
    pub record: Record,
    /// Set once the authorisation is durable.
    pub auth_seq: u64,
    pub uses_left: u32,
    pub caller: String,
    pub answer: Answer,
    /// The request's place in the device's queue.
    pub _queued: tokio::sync::OwnedSemaphorePermit,
    /// Keeps the daemon's shutdown waiting until the outcome is durable.
    pub _tracked: tokio_util::task::task_tracker::TaskTrackerToken,
}

/// A container stamp's signed attributes and the seal's certificate they name.
pub(super) struct CmsJob {
    pub kind: crate::container::Kind,
    /// Where the approval placed a PDF's visible seal.
    pub placement: Option<crate::token::Placement>,
    pub plan: crate::container::Plan,
    pub certificate: Vec<u8>,
}
