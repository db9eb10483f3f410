//! A stamp, step by step. Each step is a room of its own:
//!
//! 1. the caller may use the seal (`caller`);
//! 2. the request and its approval pass (`check`), inline on the connection's task;
//! 3. the use is consumed and `stamp.authorized` made durable (`authorize`, the audit writer);
//! 4. the device signs (`sign`, the device's own threads, fed by the writer's commit; or the
//!    writer itself, for a stamp alone on the device that holds the audit key);
//! 5. the outcome is made durable (`outcome`, the writer again), which answers the client;
//! 6. the reply (here).
//!
//! From step 3 on the stamp is a [`Job`] handed from thread to thread (writer → device →
//! writer → this task): four hand-offs, two when the writer signs, and it reaches its
//! recorded outcome whether or not anyone still waits for it.

use super::authorize::authorize;
use super::caller::Caller;
use super::job::Job;
use super::{Service, ServiceError};
use crate::config::TimestampMode;
use crate::protocol::{pb, response};
use std::time::Instant;

impl Service {
    pub(super) async fn stamp(
        &self,
        caller: &Caller,
        req: pb::StampRequest,
    ) -> Result<response::Body, ServiceError> {
        let started = Instant::now();
        // 1.
        let seal = match self.seal_for(caller, &req.seal_id) {
            Ok(s) => s,
            Err(e) => return Err(self.refuse_access(caller, &req.seal_id, e).await),
        };
        // 2.
        let approved = self.check_stamp(caller, seal, req).await?;
        // 3 to 5.
        let (answer, answered) = tokio::sync::oneshot::channel();
        let tsa = match (&approved.cms, seal.timestamp, &self.tsa) {
            (Some(_), mode, Some(tsa)) if mode != TimestampMode::None => Some((tsa.clone(), mode)),
            _ => None,
        };
        let job = Job {
            started,
            span: tracing::Span::current(),
            audit: self.audit.clone(),
            device: seal.device.clone(),
            key: seal.key,
            digest: approved.digest,
            cms: approved.cms,
            tsa,
            record: approved.record,
            auth_seq: 0,
            uses_left: 0,
            caller: caller.name.clone(),
            answer,
            _queued: approved.queued,
            _tracked: self.outcomes.token(),
        };
        authorize(
            job,
            approved.pending,
            self.signers[seal.device.id()].clone(),
        );
        let stamped = answered.await.map_err(|_| {
            ServiceError::Internal("the stamp ended without an answer; see the audit log".into())
        })??;
        crate::crash_point!("stamp.before_reply");
        // 6.
        Ok(response::Body::Stamp(pb::StampResponse {
            seal_id: seal.id.clone(),
            algorithm: seal.device.key(seal.key).algorithm.name().to_owned(),
            signature: stamped.signature,
            stamped_at_unix_ms: crate::audit::now_ms() as u64,
            uses_left: stamped.uses_left,
            approval_id: approved.approval_id,
            container: stamped.container.unwrap_or_default(),
        }))
    }
}
