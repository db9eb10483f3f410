//! The request pipeline: who is calling, may they, and what the seal's device says.
//!
//! Owns: caller identification from peer credentials, per-seal permission, request validation,
//! bounding each device's queue, running device calls off the async executor, and the one
//! mapping from [`ServiceError`] to wire status codes ([`ServiceError::status`]).
//! Never: blocks the executor on a device, or puts a token, PIN or key in a log line or reply.
//!
//! A stamp passes the approval gate (token, trust store, policy, TOTP) and then the audit
//! writer consumes one use and records `stamp.authorized` in one durable transaction; only
//! then is the device asked to sign, and the reply leaves only once `stamp.completed` (or
//! `stamp.failed`) is durable too. A refusal carries a stable reason code and is recorded.

use crate::approval::gate::{Gate, Rules, Verdict};
use crate::approval::mfa::Mfa;
use crate::approval::{ApprovalError, Denial, TrustStore};
use crate::audit::anomaly::Anomaly;
use crate::audit::log::{Appended, AuditError, AuditKey, AuditLog};
use crate::audit::{kind, Record};
use crate::config::Config;
use crate::device::{DeviceError, Health, Registry, SealBinding, SealDevice};
use crate::policy::SealPolicy;
use crate::protocol::{pb, request, response, Request, Response, Status, PROTOCOL_VERSION};
use crate::store::Store;
use crate::terminal::session::{self as terminal, TerminalError, TerminalSpec};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tracing::Instrument;

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
    #[error("{0}")]
    GrantLive(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("approval refused: {0}")]
    Denied(Denial),
    #[error("{0}")]
    AuditUnavailable(String),
    #[error("{0}")]
    TimestampUnavailable(String),
}

impl From<AuditError> for ServiceError {
    fn from(e: AuditError) -> Self {
        ServiceError::AuditUnavailable(format!("{e}; nothing was signed"))
    }
}

impl From<TerminalError> for ServiceError {
    fn from(e: TerminalError) -> Self {
        match e {
            TerminalError::Unavailable(m) => ServiceError::Device(DeviceError::Unavailable(m)),
            TerminalError::Busy(m) => ServiceError::Busy(m),
            TerminalError::GrantLive(m) => ServiceError::GrantLive(m),
            TerminalError::Invalid(m) => ServiceError::InvalidArgument(m),
            TerminalError::Denied(d) => ServiceError::Denied(d),
            TerminalError::Audit(m) => ServiceError::AuditUnavailable(m),
        }
    }
}

impl From<ApprovalError> for ServiceError {
    fn from(e: ApprovalError) -> Self {
        match e {
            ApprovalError::Store(s) => {
                ServiceError::AuditUnavailable(format!("{s}; nothing was signed"))
            }
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
    #[error("{0}")]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Reload(String),
    #[error("{0}")]
    Terminal(String),
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
            ServiceError::Device(DeviceError::PinInvalid(_)) => Status::PinInvalid,
            ServiceError::Device(DeviceError::PinBlocked(_)) => Status::PinBlocked,
            ServiceError::Timeout(_) => Status::Timeout,
            ServiceError::Busy(_) => Status::Busy,
            ServiceError::GrantLive(_) => Status::GrantLive,
            ServiceError::ShuttingDown => Status::ShuttingDown,
            ServiceError::Internal(_) => Status::Internal,
            ServiceError::Denied(_) => Status::ApprovalDenied,
            ServiceError::AuditUnavailable(_) => Status::AuditUnavailable,
            ServiceError::TimestampUnavailable(_) => Status::TimestampUnavailable,
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
    /// Replaced whole on a reload; a connection keeps the caller it was identified as.
    callers: RwLock<Arc<Vec<Arc<Caller>>>>,
    /// What a reload must leave as it is (see `restart_only`).
    fixed: String,
    /// Signatures in flight per device, and requests allowed to wait for one.
    slots: HashMap<String, (Arc<Semaphore>, Arc<Semaphore>)>,
    started: Instant,
    connections: AtomicUsize,
    audit: AuditLog,
    /// Stamps past their authorisation: they run to their recorded outcome even when the
    /// request that started them times out or its client goes away.
    outcomes: tokio_util::task::TaskTracker,
    /// Smart-seal terminals, by their seal id; their sessions start with the runtime.
    terminals: std::sync::OnceLock<HashMap<String, terminal::Handle>>,
    /// Each terminal with the impression counter the log last recorded for it.
    terminal_specs: std::sync::Mutex<Vec<(TerminalSpec, Option<u64>)>>,
    /// The time-stamping authority of container stamps, when one is configured.
    tsa: Option<Arc<crate::timestamp::Tsa>>,
}

/// The configured terminals, their profiles and enrolled keys checked.
fn terminal_specs(config: &Config) -> Result<Vec<TerminalSpec>, StartError> {
    let mut out = Vec::new();
    for t in &config.terminals {
        let bad = |m: String| StartError::Terminal(format!("terminal {:?}: {m}", t.id));
        let profile =
            crate::device::profile::DeviceProfile::load(&config.daemon.profiles_dir, &t.profile)
                .map_err(|e| bad(e.to_string()))?;
        if profile.kind != crate::device::profile::DeviceKind::Terminal {
            return Err(bad(format!(
                "profile {:?} is not a terminal profile",
                t.profile
            )));
        }
        let raw: [u8; 32] = hex::decode(&t.public_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("public_key is not 32 bytes of hex".into()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| bad("public_key is not an Ed25519 public key".into()))?;
        out.push(TerminalSpec {
            id: t.id.clone(),
            seal: t.seal.clone(),
            name: t.name.clone(),
            profile,
            key,
            serial: t.serial.clone(),
        });
    }
    Ok(out)
}

/// The trust store and every seal's policy, as configured.
fn rules_of(config: &Config, config_dir: &std::path::Path) -> Result<Rules, StartError> {
    let trust = TrustStore::with_applicants(&config.approvers, &config.applicants, config_dir)?;
    let mut policies = HashMap::new();
    for s in &config.seals {
        let limits = crate::config::TokenLimits::of(s.max_token_lifetime_seconds, s.max_uses);
        policies.insert(
            s.id.clone(),
            SealPolicy::from_config(&s.id, &s.rules)?.with_limits(limits),
        );
    }
    for t in &config.terminals {
        let limits = crate::config::TokenLimits::of(t.max_token_lifetime_seconds, t.max_uses);
        policies.insert(
            t.seal.clone(),
            SealPolicy::from_config(&t.seal, &t.rules)?.with_limits(limits),
        );
    }
    Ok(Rules { trust, policies })
}

fn callers_of(config: &Config) -> Arc<Vec<Arc<Caller>>> {
    Arc::new(
        config
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
            .collect(),
    )
}

/// The parts of a configuration that only a restart changes: the daemon's settings, devices,
/// seals and their keys, terminals (not their policies) and their listener, TOTP and the audit
/// key. A reload that changes them is refused.
fn restart_only(config: &Config) -> String {
    let seals: Vec<_> = config
        .seals
        .iter()
        .map(|s| {
            (
                &s.id,
                &s.name,
                &s.device,
                &s.key_label,
                &s.key_id,
                &s.algorithm,
                &s.image,
                &s.timestamp,
            )
        })
        .collect();
    let terminals: Vec<_> = config
        .terminals
        .iter()
        .map(|t| {
            (
                &t.id,
                &t.profile,
                &t.seal,
                &t.public_key,
                &t.serial,
                &t.certificate_sha256,
            )
        })
        .collect();
    let a = &config.audit;
    format!(
        "{:?}",
        (
            &config.daemon,
            &config.devices,
            seals,
            &config.mfa,
            (&a.device, &a.key_label, &a.key_id, &a.algorithm),
            terminals,
            &config.terminal_listener,
        )
    )
}

fn audit_parts(config: &Config, registry: &Registry) -> Result<(AuditKey, Anomaly), StartError> {
    let (device, key) = registry.audit_key.clone();
    let anomaly = Anomaly::from_config(&config.audit.alerts).map_err(AuditError::Open)?;
    Ok((AuditKey { device, key }, anomaly))
}

impl Service {
    /// Everything `new` checks, without writing to the audit log: for `sealgated --check`.
    /// Returns the policy's warnings.
    pub fn check(
        config: &Config,
        registry: &Registry,
        config_dir: &std::path::Path,
    ) -> Result<Vec<String>, StartError> {
        let warnings = rules_of(config, config_dir)?.warnings();
        terminal_specs(config)?;
        let store = Store::open(&config.daemon.state_dir)?;
        let (key, _) = audit_parts(config, registry)?;
        AuditLog::check(store.path().to_owned(), key)?;
        Ok(warnings)
    }

    /// Builds the service: trust store, policies, state database, TOTP, and the audit log
    /// (which records an outcome for every stamp a previous run left unfinished). Blocks.
    pub fn new(
        config: &Config,
        registry: Registry,
        config_dir: &std::path::Path,
    ) -> Result<Service, StartError> {
        let rules = rules_of(config, config_dir)?;
        for w in rules.warnings() {
            tracing::warn!("{w}");
        }
        let specs = terminal_specs(config)?;
        let store = Store::open(&config.daemon.state_dir)?;
        // Read before the log is opened, so that a start that fails here appends nothing.
        let specs = specs
            .into_iter()
            .map(|spec| {
                let counter = store
                    .read(|c| crate::audit::query::terminal_counter(c, &spec.id))
                    .map_err(|e| {
                        StartError::Terminal(format!(
                            "terminal {:?}: its impression counter: {e}",
                            spec.id
                        ))
                    })?;
                Ok((spec, counter))
            })
            .collect::<Result<Vec<_>, StartError>>()?;
        let (key, anomaly) = audit_parts(config, &registry)?;
        let audit = AuditLog::open(store.path().to_owned(), key, anomaly)?;
        store.with(|c| {
            crate::audit::query::record_seal_keys(
                c,
                registry
                    .seals
                    .values()
                    .map(|s| (s.id.as_str(), s.device.key(s.key))),
                crate::audit::now_ms(),
            )
        })?;
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
        let gate = Arc::new(Gate::new(rules, store, mfa));
        let callers = RwLock::new(callers_of(config));
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
            fixed: restart_only(config),
            audit,
            outcomes: tokio_util::task::TaskTracker::new(),
            terminals: std::sync::OnceLock::new(),
            terminal_specs: std::sync::Mutex::new(specs),
            tsa: config.timestamp.as_ref().map(|t| {
                Arc::new(crate::timestamp::Tsa::new(
                    &t.url,
                    std::time::Duration::from_millis(t.timeout_ms),
                ))
            }),
        })
    }

    /// Starts each terminal's session, from the impression counter the audit log last
    /// recorded for it (read when the service was built). Call once, with the runtime the
    /// sessions use for the audit log.
    pub fn start_terminals(&self, runtime: tokio::runtime::Handle) -> Result<(), StartError> {
        let specs = std::mem::take(
            &mut *self
                .terminal_specs
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let ctx = terminal::Context {
            gate: self.gate.clone(),
            audit: self.audit.clone(),
            runtime,
        };
        let mut map = HashMap::new();
        for (spec, counter) in specs {
            let seal = spec.seal.clone();
            map.insert(seal, terminal::spawn(spec, ctx.clone(), counter));
        }
        let _ = self.terminals.set(map);
        Ok(())
    }

    fn terminals(&self) -> impl Iterator<Item = &terminal::Handle> {
        self.terminals.get().into_iter().flat_map(|m| m.values())
    }

    /// A terminal by its id, for the TLS listener.
    pub fn terminal_by_id(&self, id: &str) -> Option<&terminal::Handle> {
        self.terminals().find(|t| t.id == id)
    }

    /// After the server stopped: lets stamps in flight record their outcomes, then writes what
    /// the audit writer still holds and stops it.
    pub async fn shutdown(&self) {
        self.outcomes.close();
        self.outcomes.wait().await;
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.shutdown()).await;
    }

    /// The audit log, for the device watcher's events and the alert stream.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Drops replay-ledger entries no token can use any more. Blocks.
    pub fn prune_ledger(&self) -> Result<usize, ServiceError> {
        let now = unix_now();
        crate::approval::ledger::prune(&self.gate.store, now)
            .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))
    }

    /// Puts a re-read configuration in force: callers, the trust store, seal policies and the
    /// anomaly rules' thresholds, all or nothing. Anything else that changed (devices, seals'
    /// keys, the daemon's settings, TOTP, the audit key), or a device profile that no longer
    /// reads the same, refuses the reload and the running configuration stays. Blocks.
    pub fn reload(&self, config: &Config, config_dir: &std::path::Path) -> Result<(), StartError> {
        if restart_only(config) != self.fixed {
            return Err(StartError::Reload(
                "devices, seals' keys, terminals, [daemon], [mfa] or the audit key changed; those take a restart"
                    .into(),
            ));
        }
        for d in self.registry.devices.iter() {
            let dc = config
                .devices
                .iter()
                .find(|c| c.id == d.id())
                .expect("devices are unchanged");
            let profile = crate::device::profile::DeviceProfile::load(
                &config.daemon.profiles_dir,
                &dc.profile,
            )
            .map_err(|e| StartError::Reload(format!("device {:?}: {e}", dc.id)))?;
            if format!("{profile:?}") != format!("{:?}", d.profile()) {
                return Err(StartError::Reload(format!(
                    "device profile {:?} changed; profile changes take a restart",
                    dc.profile
                )));
            }
        }
        let rules = rules_of(config, config_dir)?;
        for w in rules.warnings() {
            tracing::warn!("{w}");
        }
        let anomaly = Anomaly::from_config(&config.audit.alerts).map_err(StartError::Reload)?;
        let callers = callers_of(config);
        self.gate.replace_rules(rules);
        *self.callers.write().unwrap_or_else(|p| p.into_inner()) = callers;
        self.audit.replace_anomaly(anomaly);
        Ok(())
    }

    /// Names the caller behind a connection: a uid match wins over a gid match.
    pub fn identify(&self, uid: u32, gid: u32, pid: Option<i32>) -> Peer {
        let callers = self
            .callers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let caller = callers
            .iter()
            .find(|c| c.uids.contains(&uid))
            .or_else(|| callers.iter().find(|c| c.gids.contains(&gid)))
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
            Some(request::Body::Hello(h)) => {
                if peer.caller.is_none() {
                    self.refuse_stranger(
                        peer,
                        "Hello from a uid and gid that are no configured caller; answered, then the connection was closed".into(),
                    )
                    .await;
                }
                Ok(self.hello(peer, h))
            }
            Some(body) => match &peer.caller {
                None => {
                    let e = ServiceError::PermissionDenied(format!(
                        "uid {} gid {} is not a configured caller",
                        peer.uid, peer.gid
                    ));
                    self.refuse_stranger(peer, e.to_string()).await;
                    Err(e)
                }
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
            request::Body::GrantTerminal(g) => self.grant_terminal(caller, g).await,
            request::Body::Status(_) => Ok(response::Body::StatusReport(self.status(caller))),
            request::Body::CheckApproval(c) => self.check_approval(caller, c).await,
            request::Body::WatchAlerts(w) => {
                if !caller.admin {
                    return Err(ServiceError::PermissionDenied(format!(
                        "caller {:?} is not an administrator",
                        caller.name
                    )));
                }
                let records = self.recent_alerts(w.recent.min(1000)).await?;
                Ok(response::Body::Alerts(pb::AlertsResponse { records }))
            }
            request::Body::EnrollMfa(e) => {
                let user = e.user;
                let mut record = Record::new(kind::MFA_ENROLLED);
                record.caller = caller.name.clone();
                record.applicant = user.clone();
                let uri = self
                    .admin_mfa(caller, move |gate, mfa| {
                        mfa.enroll(&gate.store, &user, unix_now())
                    })
                    .await?;
                self.audit.append(record).await?;
                Ok(response::Body::EnrollMfa(pb::EnrollMfaResponse {
                    otpauth_uri: uri.to_string(),
                }))
            }
            request::Body::ResetMfa(r) => {
                let user = r.user;
                let mut record = Record::new(kind::MFA_RESET);
                record.caller = caller.name.clone();
                record.applicant = user.clone();
                let found = self
                    .admin_mfa(caller, move |gate, mfa| mfa.reset(&gate.store, &user))
                    .await?;
                if !found {
                    return Err(ServiceError::InvalidArgument(
                        "that user is not enrolled for TOTP".into(),
                    ));
                }
                self.audit.append(record).await?;
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

    async fn check_approval(
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

    /// Records and counts a stranger's request (`access.denied`, reason `unknown_caller`).
    async fn refuse_stranger(&self, peer: &Peer, detail: String) {
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
    async fn refuse_invalid(&self, mut record: Record, e: ServiceError) -> ServiceError {
        record.reason = e.status().as_str_name().to_ascii_lowercase();
        record.detail = e.to_string();
        crate::metrics::get().denial(&record.seal, &record.reason);
        self.record_refusal(record).await;
        e
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
        let seal = self.registry.seals.get(seal_id);
        let Some(seal) = seal.filter(|_| caller.seals.contains(seal_id)) else {
            return Err(self.not_for(caller, seal_id));
        };
        Ok(seal)
    }

    /// Why `caller` may not use `seal_id` as a signing seal. A caller learns only of seals it
    /// was given: for any other name the answer is the same whether it exists or not.
    fn not_for(&self, caller: &Caller, seal_id: &str) -> ServiceError {
        if !caller.seals.contains(seal_id) {
            return if self.registry.seals.contains_key(seal_id)
                || self.terminals().any(|t| t.seal == seal_id)
            {
                ServiceError::PermissionDenied(format!(
                    "caller {:?} may not use seal {seal_id:?}",
                    caller.name
                ))
            } else {
                ServiceError::UnknownSeal(seal_id.to_owned())
            };
        }
        if let Some(t) = self.terminals().find(|t| t.seal == seal_id) {
            return ServiceError::InvalidArgument(format!(
                "seal {seal_id:?} is the physical seal in terminal {:?}; ask for a terminal grant",
                t.id
            ));
        }
        ServiceError::UnknownSeal(seal_id.to_owned())
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
                    let (in_flight, queue) = &self.slots[d.id()];
                    let parallel = d.parallelism();
                    let limit = parallel * QUEUE_PER_SESSION;
                    pb::DeviceReport {
                        id: d.id().to_owned(),
                        profile: d.profile().name.clone(),
                        status: status as i32,
                        detail,
                        queued: (limit - queue.available_permits()) as u32,
                        signing: (parallel - in_flight.available_permits()) as u32,
                        queue_limit: limit as u32,
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
    async fn recent_alerts(&self, n: u32) -> Result<Vec<pb::AuditRecord>, ServiceError> {
        let gate = self.gate.clone();
        let found = off_executor("alerts", move || {
            gate.store
                .with(|c| crate::audit::query::latest(c, kind::ALERT, n as u64))
        })
        .await?
        .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))?;
        Ok(found.iter().map(wire_record).collect())
    }

    async fn stamp(
        &self,
        caller: &Caller,
        req: pb::StampRequest,
    ) -> Result<response::Body, ServiceError> {
        let started = Instant::now();
        let seal = match self.seal_for(caller, &req.seal_id) {
            Ok(s) => s,
            Err(e) => return Err(self.refuse_access(caller, &req.seal_id, e).await),
        };
        let mut refused = Record::new(kind::STAMP_DENIED);
        refused.caller = caller.name.clone();
        refused.seal = seal.id.clone();
        let checked = digest32(&req.document_sha256).and_then(|d| {
            purpose_ok(&req.purpose)?;
            let cert = container_of(seal, req.container)?;
            if let Some((kind, _)) = &cert {
                // What the container needs of the approval is checked before the gate, so a
                // refusal here spends no TOTP code; the verified claims decide afterwards.
                let unverified = crate::approval::token::Token::parse(&req.approval_token).ok();
                cms_digest(seal, *kind, &d, unverified.as_ref().map(|t| &t.claims))?;
            }
            Ok((d, cert))
        });
        let (digest, cms_cert) = match checked {
            Ok(v) => v,
            Err(e) => return Err(self.refuse_invalid(refused, e).await),
        };
        // No use is consumed for a request the device queue would refuse anyway.
        let (in_flight, queue) = &self.slots[seal.device.id()];
        let queued = queue.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Busy(format!(
                "device {:?} has too many requests waiting",
                seal.device.id()
            ))
        })?;
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
        let purpose = req.purpose;
        let verdict = self
            .run_gate(&seal.id, digest, req.approval_token, req.mfa_code, false)
            .await?;
        let mut record = stamp_record(caller, seal, &digest, &purpose, &verdict);
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
        // One durable transaction: the use is consumed and `stamp.authorized` recorded.
        let (auth_seq, uses_left) = match self.audit.authorize(pending, record.clone()).await? {
            Appended::Authorized { seq, uses_left } => (seq, uses_left),
            Appended::Refused { denial, .. } => {
                note_refusal(&record, &denial);
                return Err(ServiceError::Denied(denial));
            }
            Appended::Record { .. } => {
                return Err(ServiceError::Internal(
                    "the audit writer answered an authorisation with a plain record".into(),
                ))
            }
        };
        // From here the stamp runs to a recorded outcome in a task of its own, so a timeout
        // or a vanished client cannot leave the authorisation without one.
        let job = Signing {
            started,
            audit: self.audit.clone(),
            in_flight: in_flight.clone(),
            device: seal.device.clone(),
            key: seal.key,
            digest,
            tsa: match (&cms, seal.timestamp, &self.tsa) {
                (Some(_), crate::config::TimestampMode::None, _) | (None, ..) | (_, _, None) => {
                    None
                }
                (Some(_), mode, Some(tsa)) => Some((tsa.clone(), mode)),
            },
            cms,
            record,
            auth_seq,
            caller: caller.name.clone(),
        };
        let (signature, container) = self
            .outcomes
            .spawn(
                async move {
                    let _queued = queued;
                    job.run().await
                }
                .instrument(tracing::Span::current()),
            )
            .await
            .map_err(|e| ServiceError::Internal(format!("signing task failed: {e}")))??;
        Ok(response::Body::Stamp(pb::StampResponse {
            seal_id: seal.id.clone(),
            algorithm: seal.device.key(seal.key).algorithm.name().to_owned(),
            signature,
            stamped_at_unix_ms: crate::audit::now_ms() as u64,
            uses_left,
            approval_id: verdict
                .claims
                .as_ref()
                .map(|c| c.jti.clone())
                .unwrap_or_default(),
            container: container.unwrap_or_default(),
        }))
    }

    /// Unlocks a terminal's physical seal on an approval: the session checks it, consumes the
    /// uses and records the grant, sends it, and answers once the terminal has ACKed it.
    async fn grant_terminal(
        &self,
        caller: &Caller,
        req: pb::GrantTerminalRequest,
    ) -> Result<response::Body, ServiceError> {
        let Some(t) = self
            .terminals()
            .find(|t| t.seal == req.seal_id)
            .filter(|_| caller.seals.contains(&req.seal_id))
        else {
            let e = if self.registry.seals.contains_key(&req.seal_id)
                && caller.seals.contains(&req.seal_id)
            {
                ServiceError::InvalidArgument(format!(
                    "seal {:?} signs documents; it is not in a terminal",
                    req.seal_id
                ))
            } else {
                self.not_for(caller, &req.seal_id)
            };
            return Err(self.refuse_access(caller, &req.seal_id, e).await);
        };
        let doc = digest32(&req.document_sha256)?;
        purpose_ok(&req.purpose)?;
        let g = t
            .grant(terminal::GrantRequest {
                token: zeroize::Zeroizing::new(req.approval_token),
                doc,
                photo: Vec::new(),
                impressions: req.impressions,
                mfa_code: zeroize::Zeroizing::new(req.mfa_code),
                caller: caller.name.clone(),
                purpose: req.purpose,
            })
            .await?;
        Ok(response::Body::GrantTerminal(pb::GrantTerminalResponse {
            terminal_id: t.id.clone(),
            grant_id: g.grant_id.to_vec(),
            impressions: g.impressions,
            seconds: g.seconds,
            uses_left: g.uses_left,
            approval_id: g.jti,
        }))
    }

    /// Records and counts a caller's refusal before any approval was looked at (a seal it may
    /// not use, or that does not exist), and hands the error back.
    async fn refuse_access(&self, caller: &Caller, seal_id: &str, e: ServiceError) -> ServiceError {
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
    async fn record_refusal(&self, record: Record) {
        if let Err(e) = self.audit.append(record).await {
            tracing::error!(error = %e, "a refusal could not be recorded in the audit log");
        }
    }
}

/// The part of a stamp after its authorisation is durable: sign, then record the outcome.
struct Signing {
    /// When the request arrived.
    started: Instant,
    audit: AuditLog,
    in_flight: Arc<Semaphore>,
    device: Arc<dyn SealDevice>,
    key: usize,
    digest: [u8; 32],
    /// For a CMS detached signature: the signed attributes and the seal's certificate.
    cms: Option<CmsJob>,
    /// The TSA to timestamp the signature with, and whether a stamp may go without one.
    tsa: Option<(Arc<crate::timestamp::Tsa>, crate::config::TimestampMode)>,
    /// The authorisation's record, the template of the outcome's.
    record: Record,
    auth_seq: u64,
    caller: String,
}

impl Signing {
    /// The signature, and the container made around it when one was asked for.
    async fn run(self) -> Result<(Vec<u8>, Option<Vec<u8>>), ServiceError> {
        let mut outcome = self.record;
        outcome.ref_seq = Some(self.auth_seq);
        let metrics = crate::metrics::get();
        let signed = match self.in_flight.acquire_owned().await {
            Err(_) => Err(ServiceError::ShuttingDown),
            Ok(permit) => {
                let device = self.device.clone();
                use crate::container::ToSign;
                let what = match &self.cms {
                    None => ToSign::Digest(self.digest),
                    Some(c) => c.plan.to_sign.clone(),
                };
                let key = self.key;
                off_executor("signing", move || {
                    let _permit = permit;
                    if device.health() != Health::Ready {
                        device.recover();
                    }
                    match what {
                        ToSign::Digest(d) => device.sign(key, &d),
                        ToSign::Message(m) => device.sign_message(key, &m),
                    }
                })
                .await
                .and_then(|r| r.map_err(ServiceError::from))
            }
        };
        let signature = match signed {
            Err(e) => {
                metrics.stamp(&outcome.seal, "failed", None);
                if matches!(e, ServiceError::Device(_)) {
                    metrics.device_error(self.device.id());
                }
                outcome.kind = kind::STAMP_FAILED.into();
                outcome.reason = e.status().as_str_name().to_ascii_lowercase();
                outcome.detail = e.to_string();
                if self.audit.append(outcome.clone()).await.is_err() {
                    self.audit.append_later(outcome);
                }
                return Err(e);
            }
            Ok(sig) => sig,
        };
        let seal_key = self.device.key(self.key);
        // Trusted time over the signature, for a container whose seal asks for it.
        let mut time_fields = serde_json::Map::new();
        let token = match &self.tsa {
            None => None,
            Some((tsa, mode)) => {
                let (client, sig) = (tsa.clone(), signature.clone());
                let got = off_executor("timestamp", move || client.stamp(&sig))
                    .await
                    .and_then(|r| r.map_err(|e| ServiceError::TimestampUnavailable(e.to_string())));
                match got {
                    Ok(t) => {
                        time_fields.insert(
                            "timestamp".into(),
                            serde_json::json!({
                                "tsa": tsa.url(),
                                "gen_time": t.gen_time,
                                "token_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&t.der)),
                            }),
                        );
                        Some(t.der)
                    }
                    Err(e) if *mode == crate::config::TimestampMode::BestEffort => {
                        tracing::warn!(seal = %outcome.seal, error = %e, "stamped without a timestamp");
                        time_fields.insert("timestamp_warning".into(), e.to_string().into());
                        None
                    }
                    Err(e) => {
                        let e = ServiceError::TimestampUnavailable(format!(
                            "{e}; the seal's policy requires a timestamp, so the signature was withheld"
                        ));
                        metrics.stamp(&outcome.seal, "failed", None);
                        outcome.kind = kind::STAMP_FAILED.into();
                        outcome.reason = "timestamp_unavailable".into();
                        outcome.detail = e.to_string();
                        if self.audit.append(outcome.clone()).await.is_err() {
                            self.audit.append_later(outcome);
                        }
                        return Err(e);
                    }
                }
            }
        };
        let container = match &self.cms {
            None => None,
            Some(c) => match crate::container::assemble(
                seal_key.algorithm,
                &c.certificate,
                &c.plan.signed_attributes,
                &signature,
                token.as_deref(),
            ) {
                Ok(der) => Some(der),
                Err(e) => {
                    // Signed, but no container can be made: withheld and recorded as failed.
                    let e = ServiceError::Internal(format!("{e}; the signature was withheld"));
                    metrics.stamp(&outcome.seal, "failed", None);
                    outcome.kind = kind::STAMP_FAILED.into();
                    outcome.reason = "container".into();
                    outcome.detail = e.to_string();
                    if self.audit.append(outcome.clone()).await.is_err() {
                        self.audit.append_later(outcome);
                    }
                    return Err(e);
                }
            },
        };
        outcome.kind = kind::STAMP_COMPLETED.into();
        // The rule, scope and caller's purpose stay on the authorisation (`ref_seq`).
        outcome.evidence = serde_json::json!({
            "algorithm": seal_key.algorithm.name(),
            "key_id": crate::audit::key_id(&seal_key.spki_der),
            "signature": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &signature),
            "signature_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&signature)),
        })
        .to_string();
        if let Some(c) = &self.cms {
            outcome.add_evidence(container_fields(c.kind, Some(&c.plan.signed_attributes)));
            if let Some(p) = &c.placement {
                time_fields.insert("placement".into(), serde_json::json!(p));
            }
            outcome.add_evidence(time_fields);
        }
        if let Err(e) = self.audit.append(outcome.clone()).await {
            // The signature exists but is never handed out: record that instead, later.
            outcome.kind = kind::STAMP_FAILED.into();
            outcome.reason = "audit_unavailable".into();
            outcome.detail = format!(
                "the signature was made but withheld: its completion could not be recorded ({e})"
            );
            outcome.evidence.clear();
            metrics.stamp(&outcome.seal, "failed", None);
            self.audit.append_later(outcome);
            return Err(ServiceError::AuditUnavailable(format!(
                "{e}; the signature was withheld"
            )));
        }
        tracing::info!(
            caller = %self.caller,
            seal = %outcome.seal,
            applicant = %outcome.applicant,
            approval = %outcome.jti,
            document = %outcome.doc_sha256,
            micros = self.started.elapsed().as_micros() as u64,
            "stamped"
        );
        metrics.stamp(
            &outcome.seal,
            "completed",
            Some(self.started.elapsed().as_secs_f64()),
        );
        Ok((signature, container))
    }
}

/// Logs and counts an approval refusal of the stamp `record` describes.
fn note_refusal(record: &Record, d: &crate::approval::Denial) {
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

/// A container stamp's signed attributes and the seal's certificate they name.
struct CmsJob {
    kind: crate::container::Kind,
    /// Where the approval placed a PDF's visible seal.
    placement: Option<crate::approval::token::Placement>,
    plan: crate::container::Plan,
    certificate: Vec<u8>,
}

/// The container asked for and the seal's certificate it needs, or None for a bare signature;
/// refused (before any approval is looked at) for a container this seal cannot make.
fn container_of(
    seal: &SealBinding,
    container: i32,
) -> Result<Option<(crate::container::Kind, Vec<u8>)>, ServiceError> {
    use crate::container::Kind;
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
fn cms_digest(
    seal: &SealBinding,
    kind: crate::container::Kind,
    digest: &[u8; 32],
    claims: Option<&crate::approval::token::Claims>,
) -> Result<Vec<u8>, ServiceError> {
    if kind == crate::container::Kind::Pades
        && claims.and_then(|c| c.doc.placement.as_ref()).is_none()
    {
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
fn cms_plan(
    seal: &SealBinding,
    (kind, certificate): (crate::container::Kind, Vec<u8>),
    digest: &[u8; 32],
    claims: Option<&crate::approval::token::Claims>,
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

/// The evidence fields of a container stamp: its kind and, once signed, its signed attributes
/// (base64 DER) and their SHA-256, which bind the approved digest.
fn container_fields(
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

/// The record of a stamp request, before its kind is known.
fn stamp_record(
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

fn purpose_ok(purpose: &str) -> Result<(), ServiceError> {
    if purpose.len() > MAX_PURPOSE_BYTES {
        return Err(ServiceError::InvalidArgument(format!(
            "purpose is {} bytes; at most {MAX_PURPOSE_BYTES} are accepted",
            purpose.len()
        )));
    }
    Ok(())
}

fn digest32(bytes: &[u8]) -> Result<[u8; 32], ServiceError> {
    bytes.try_into().map_err(|_| {
        ServiceError::InvalidArgument(format!(
            "document_sha256 must be 32 bytes, got {}",
            bytes.len()
        ))
    })
}

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
        image_png: seal.image_png.as_deref().cloned().unwrap_or_default(),
    }
}
