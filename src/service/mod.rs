//! The request pipeline: who is calling, may they, and what the seal's device says.
//!
//! Owns: caller identification from peer credentials, per-seal permission, request validation,
//! bounding each device's queue, running device calls off the async executor, and the one
//! mapping from [`ServiceError`] to wire status codes ([`ServiceError::status`]).
//! Never: blocks the executor on a device, or puts a token, PIN or key in a log line or reply.
//!
//! A stamp passes the approval gate (token, trust store, policy, TOTP, and one use consumed
//! durably) before its device is asked to sign; a refusal carries a stable reason code.

use crate::approval::gate::{Gate, Verdict};
use crate::approval::mfa::Mfa;
use crate::approval::{ApprovalError, Denial, TrustStore};
use crate::config::Config;
use crate::device::{DeviceError, Health, Registry, SealBinding, SealDevice};
use crate::policy::SealPolicy;
use crate::protocol::{pb, request, response, Request, Response, Status, PROTOCOL_VERSION};
use crate::store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;

/// Longest purpose text accepted, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 4096;
/// Requests waiting for a device, per unit of the device's parallelism.
const QUEUE_PER_SESSION: usize = 64;

/// Why a request was not carried out. Each variant maps to one wire status in
/// [`ServiceError::status`], the only place where that mapping is made.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("{0}")]
    FrameTooLarge(String),
    #[error("the request carries no request this daemon knows (protocol {PROTOCOL_VERSION})")]
    UnknownRequest,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("no seal {0:?} is configured")]
    UnknownSeal(String),
    #[error("{0}")]
    Device(#[from] DeviceError),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Busy(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("approval refused: {0}")]
    Denied(Denial),
    #[error("{0}; nothing was signed")]
    StoreUnavailable(String),
}

impl From<ApprovalError> for ServiceError {
    fn from(e: ApprovalError) -> Self {
        match e {
            ApprovalError::Store(s) => ServiceError::StoreUnavailable(s.to_string()),
            ApprovalError::Device(d) => ServiceError::Device(d),
            ApprovalError::Invalid(m) => ServiceError::InvalidArgument(m),
        }
    }
}

/// What can stop the service from being built at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Trust(#[from] crate::approval::TrustError),
    #[error("{0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Mfa(String),
}

impl ServiceError {
    pub fn status(&self) -> Status {
        match self {
            ServiceError::Malformed(_) => Status::MalformedRequest,
            ServiceError::FrameTooLarge(_) => Status::FrameTooLarge,
            ServiceError::UnknownRequest => Status::UnknownRequest,
            ServiceError::InvalidArgument(_) => Status::InvalidArgument,
            ServiceError::PermissionDenied(_) => Status::PermissionDenied,
            ServiceError::UnknownSeal(_) => Status::UnknownSeal,
            ServiceError::Device(DeviceError::Unavailable(_)) => Status::DeviceUnavailable,
            ServiceError::Device(DeviceError::Failed(_) | DeviceError::Setup(_)) => {
                Status::DeviceError
            }
            ServiceError::Timeout(_) => Status::Timeout,
            ServiceError::Busy(_) => Status::Busy,
            ServiceError::ShuttingDown => Status::ShuttingDown,
            ServiceError::Internal(_) => Status::Internal,
            ServiceError::Denied(_) => Status::ApprovalDenied,
            ServiceError::StoreUnavailable(_) => Status::StoreUnavailable,
        }
    }

    /// The response carrying this error.
    pub fn into_response(self, request_id: u64) -> Response {
        let reason = match &self {
            ServiceError::Denied(d) => d.reason.code().to_owned(),
            _ => String::new(),
        };
        Response {
            request_id,
            status: self.status() as i32,
            message: self.to_string(),
            reason,
            body: None,
        }
    }
}

/// A configured caller.
#[derive(Debug)]
pub struct Caller {
    pub name: String,
    uids: Vec<u32>,
    gids: Vec<u32>,
    seals: HashSet<String>,
    admin: bool,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// None when no configured caller matches the uid or gid.
    pub caller: Option<Arc<Caller>>,
}

pub struct Service {
    registry: Registry,
    gate: Arc<Gate>,
    callers: Vec<Arc<Caller>>,
    /// Signatures in flight per device, and requests allowed to wait for one.
    slots: HashMap<String, (Arc<Semaphore>, Arc<Semaphore>)>,
    started: Instant,
    connections: AtomicUsize,
}

impl Service {
    pub fn new(
        config: &Config,
        registry: Registry,
        config_dir: &std::path::Path,
    ) -> Result<Service, StartError> {
        let trust = TrustStore::from_config(&config.approvers, config_dir)?;
        let mut policies = HashMap::new();
        for s in &config.seals {
            policies.insert(s.id.clone(), SealPolicy::from_config(&s.id, &s.rules)?);
        }
        let store = Store::open(&config.daemon.state_dir)?;
        let mfa = match &config.mfa {
            None => None,
            Some(m) => {
                let device = registry
                    .devices
                    .iter()
                    .find(|d| d.id() == m.device)
                    .cloned()
                    .ok_or_else(|| {
                        StartError::Mfa(format!("mfa.device {:?} is not open", m.device))
                    })?;
                Some(Mfa::new(device, m.max_failures, m.issuer.clone()))
            }
        };
        let gate = Arc::new(Gate {
            trust,
            policies,
            store,
            mfa,
        });
        let callers = config
            .callers
            .iter()
            .map(|c| {
                Arc::new(Caller {
                    name: c.name.clone(),
                    uids: c.uids.clone(),
                    gids: c.gids.clone(),
                    seals: c.seals.iter().cloned().collect(),
                    admin: c.admin,
                })
            })
            .collect();
        let slots = registry
            .devices
            .iter()
            .map(|d| {
                let n = d.parallelism();
                (
                    d.id().to_owned(),
                    (
                        Arc::new(Semaphore::new(n)),
                        Arc::new(Semaphore::new(n * QUEUE_PER_SESSION)),
                    ),
                )
            })
            .collect();
        Ok(Service {
            registry,
            gate,
            callers,
            slots,
            started: Instant::now(),
            connections: AtomicUsize::new(0),
        })
    }

    /// Drops replay-ledger entries no token can use any more. Blocks.
    pub fn prune_ledger(&self) -> Result<usize, ServiceError> {
        let now = unix_now();
        crate::approval::ledger::prune(&self.gate.store, now)
            .map_err(|e| ServiceError::StoreUnavailable(e.to_string()))
    }

    /// Names the caller behind a connection: a uid match wins over a gid match.
    pub fn identify(&self, uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        let caller = self
            .callers
            .iter()
            .find(|c| c.uids.contains(&uid))
            .or_else(|| self.callers.iter().find(|c| c.gids.contains(&gid)))
            .cloned();
        Peer {
            uid,
            gid,
            pid,
            caller,
        }
    }

    pub fn devices(&self) -> &[Arc<dyn SealDevice>] {
        &self.registry.devices
    }

    /// Counts open connections, for Status.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Carries out one request and builds its response.
    pub async fn handle(&self, peer: &Peer, req: Request) -> Response {
        let id = req.request_id;
        let result = match req.body {
            None => Err(ServiceError::UnknownRequest),
            Some(request::Body::Hello(h)) => Ok(self.hello(peer, h)),
            Some(body) => match &peer.caller {
                None => Err(ServiceError::PermissionDenied(format!(
                    "uid {} gid {} is not a configured caller",
                    peer.uid, peer.gid
                ))),
                Some(caller) => self.handle_known(caller, body).await,
            },
        };
        match result {
            Ok(body) => Response {
                request_id: id,
                status: Status::Ok as i32,
                message: String::new(),
                reason: String::new(),
                body: Some(body),
            },
            Err(e) => {
                tracing::info!(status = e.status().as_str_name(), error = %e, "request refused");
                e.into_response(id)
            }
        }
    }

    async fn handle_known(
        &self,
        caller: &Caller,
        body: request::Body,
    ) -> Result<response::Body, ServiceError> {
        match body {
            request::Body::Hello(_) => unreachable!("handled before the caller check"),
            request::Body::ListSeals(_) => Ok(response::Body::ListSeals(pb::ListSealsResponse {
                seals: self.summaries(caller),
            })),
            request::Body::DescribeSeal(d) => {
                let seal = self.seal_for(caller, &d.seal_id)?;
                Ok(response::Body::DescribeSeal(describe(seal)))
            }
            request::Body::Stamp(s) => self.stamp(caller, s).await,
            request::Body::Status(_) => Ok(response::Body::StatusReport(self.status(caller))),
            request::Body::CheckApproval(c) => self.check_approval(caller, c).await,
            request::Body::EnrollMfa(e) => {
                let user = e.user;
                let uri = self
                    .admin_mfa(caller, move |gate, mfa| {
                        mfa.enroll(&gate.store, &user, unix_now())
                    })
                    .await?;
                Ok(response::Body::EnrollMfa(pb::EnrollMfaResponse {
                    otpauth_uri: uri.to_string(),
                }))
            }
            request::Body::ResetMfa(r) => {
                let user = r.user;
                let found = self
                    .admin_mfa(caller, move |gate, mfa| mfa.reset(&gate.store, &user))
                    .await?;
                if !found {
                    return Err(ServiceError::InvalidArgument(
                        "that user is not enrolled for TOTP".into(),
                    ));
                }
                Ok(response::Body::ResetMfa(pb::ResetMfaResponse {}))
            }
        }
    }

    /// Runs an administrator's TOTP operation off the executor.
    async fn admin_mfa<T: Send + 'static>(
        &self,
        caller: &Caller,
        op: impl FnOnce(&Gate, &Mfa) -> Result<T, ApprovalError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        if !caller.admin {
            return Err(ServiceError::PermissionDenied(format!(
                "caller {:?} is not an administrator",
                caller.name
            )));
        }
        if self.gate.mfa.is_none() {
            return Err(ServiceError::InvalidArgument(
                "TOTP is not configured (no [mfa] section)".into(),
            ));
        }
        let gate = self.gate.clone();
        off_executor("TOTP", move || {
            let mfa = gate.mfa.as_ref().expect("checked above");
            op(&gate, mfa)
        })
        .await?
        .map_err(ServiceError::from)
    }

    /// Runs the approval gate off the executor.
    async fn run_gate(
        &self,
        seal: &str,
        digest: [u8; 32],
        token: Vec<u8>,
        mfa_code: String,
        consume: bool,
    ) -> Result<Verdict, ServiceError> {
        let gate = self.gate.clone();
        let seal = seal.to_owned();
        let mfa_code = zeroize::Zeroizing::new(mfa_code);
        let token = zeroize::Zeroizing::new(token);
        off_executor("approval", move || {
            gate.check(&seal, &digest, &token, &mfa_code, unix_now(), consume)
        })
        .await?
        .map_err(ServiceError::from)
    }

    async fn check_approval(
        &self,
        caller: &Caller,
        req: pb::CheckApprovalRequest,
    ) -> Result<response::Body, ServiceError> {
        let seal = self.seal_for(caller, &req.seal_id)?;
        let digest = digest32(&req.document_sha256)?;
        let v = self
            .run_gate(&seal.id, digest, req.approval_token, req.mfa_code, false)
            .await?;
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

    fn hello(&self, peer: &Peer, _h: pb::HelloRequest) -> response::Body {
        response::Body::Hello(pb::HelloResponse {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            caller: peer
                .caller
                .as_ref()
                .map(|c| c.name.clone())
                .unwrap_or_default(),
        })
    }

    fn seal_for(&self, caller: &Caller, seal_id: &str) -> Result<&SealBinding, ServiceError> {
        let seal = self
            .registry
            .seals
            .get(seal_id)
            .ok_or_else(|| ServiceError::UnknownSeal(seal_id.to_owned()))?;
        if !caller.seals.contains(seal_id) {
            return Err(ServiceError::PermissionDenied(format!(
                "caller {:?} may not use seal {seal_id:?}",
                caller.name
            )));
        }
        Ok(seal)
    }

    fn summaries(&self, caller: &Caller) -> Vec<pb::SealSummary> {
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
            .collect()
    }

    fn status(&self, caller: &Caller) -> pb::StatusResponse {
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
                    pb::DeviceReport {
                        id: d.id().to_owned(),
                        profile: d.profile().name.clone(),
                        status: status as i32,
                        detail,
                    }
                })
                .collect(),
            seals: self.summaries(caller),
        }
    }

    async fn stamp(
        &self,
        caller: &Caller,
        req: pb::StampRequest,
    ) -> Result<response::Body, ServiceError> {
        let seal = self.seal_for(caller, &req.seal_id)?;
        let digest = digest32(&req.document_sha256)?;
        if req.purpose.len() > MAX_PURPOSE_BYTES {
            return Err(ServiceError::InvalidArgument(format!(
                "purpose is {} bytes; at most {MAX_PURPOSE_BYTES} are accepted",
                req.purpose.len()
            )));
        }
        // No use is consumed for a request the device queue would refuse anyway.
        let (in_flight, queue) = &self.slots[seal.device.id()];
        let _queued = queue.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Busy(format!(
                "device {:?} has too many requests waiting",
                seal.device.id()
            ))
        })?;
        // A device that is down is found out before an approval's use is spent on it.
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
        let verdict = self
            .run_gate(&seal.id, digest, req.approval_token, req.mfa_code, true)
            .await?;
        if let Some(d) = verdict.denials.into_iter().next() {
            tracing::info!(
                caller = %caller.name,
                seal = %seal.id,
                applicant = %verdict.applicant,
                approval = %verdict.jti,
                reason = %d.reason.code(),
                "stamp refused"
            );
            return Err(ServiceError::Denied(d));
        }
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ServiceError::ShuttingDown)?;
        let device = seal.device.clone();
        let key = seal.key;
        let started = Instant::now();
        let signature = off_executor("signing", move || {
            let _permit = permit;
            if device.health() != Health::Ready {
                device.recover();
            }
            device.sign(key, &digest)
        })
        .await??;
        let stamped_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        tracing::info!(
            caller = %caller.name,
            seal = %seal.id,
            applicant = %verdict.applicant,
            approval = %verdict.jti,
            rule = verdict.rule.as_deref().unwrap_or(""),
            document = %hex::encode(digest),
            micros = started.elapsed().as_micros() as u64,
            "stamped"
        );
        Ok(response::Body::Stamp(pb::StampResponse {
            seal_id: seal.id.clone(),
            algorithm: seal.device.key(key).algorithm.name().to_owned(),
            signature,
            stamped_at_unix_ms,
            uses_left: verdict.uses_left,
            approval_id: verdict.jti,
        }))
    }
}

/// Runs blocking work (devices, the database) on the blocking pool.
async fn off_executor<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("{what} task failed: {e}")))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn digest32(bytes: &[u8]) -> Result<[u8; 32], ServiceError> {
    bytes.try_into().map_err(|_| {
        ServiceError::InvalidArgument(format!(
            "document_sha256 must be 32 bytes, got {}",
            bytes.len()
        ))
    })
}

fn health_fields(h: Health) -> (pb::DeviceStatus, String) {
    match h {
        Health::Ready => (pb::DeviceStatus::Ready, String::new()),
        Health::Unavailable(reason) => (pb::DeviceStatus::Unavailable, reason),
    }
}

fn describe(seal: &SealBinding) -> pb::DescribeSealResponse {
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
    }
}
