//! The request pipeline: who is calling, may they, and what the seal's device says.
//!
//! Each step has a room of its own; a stamp passes them in order (see `stamp`):
//!
//! | room | what it does |
//! |---|---|
//! | `caller` | names the caller from peer credentials; which seals are theirs |
//! | `job` | a stamp in flight: the data that passes between the steps below |
//! | `check` | validates a stamp request and runs the approval gate; the dry run |
//! | `authorize` | consumes the use and records `stamp.authorized`, durably, in the audit writer |
//! | `sign` | the devices' queues and signing threads |
//! | `outcome` | assembles containers, asks the TSA, records the outcome, answers |
//! | `stamp` | the steps in order, and the reply |
//! | `refusal` | records of requests refused before authorisation |
//! | `terminals` | smart-seal terminals' sessions and grants |
//! | `applications` | approval tokens waiting for their approvers, level by level |
//! | `admin` | TOTP enrolment and reset, ledger upkeep |
//! | `status` | Status, ListSeals, DescribeSeal, alerts |
//! | `setup` | building from the configuration, reloads |
//! | `policy` | configuration fragments from headquarters, put in force |
//! | `error` | the one error enum and its one mapping to wire statuses |
//!
//! Never: blocks the executor on a device or a durable write, or puts a token, PIN or key in
//! a log line or reply. The use and `stamp.authorized` are durable before the device is asked
//! to sign, and the reply leaves only once `stamp.completed` (or `stamp.failed`) is durable
//! too. A refusal carries a stable reason code and is recorded.

mod admin;
mod applications;
mod authorize;
mod caller;
mod check;
mod error;
mod job;
mod outcome;
mod oversight;
mod policy;
mod refusal;
mod setup;
mod sign;
mod stamp;
mod status;
mod terminals;

pub use caller::{Caller, Peer};
pub use error::{ServiceError, StartError};
pub use setup::load_config;
pub use status::wire_record;

use crate::approval::gate::Gate;
use crate::approval::mfa::Mfa;
use crate::audit::log::AuditLog;
use crate::audit::{kind, Record};
use crate::config::Config;
use crate::device::{Registry, SealDevice};
use crate::protocol::{pb, request, response, Request, Response, Status};
use crate::store::Store;
use crate::terminal::session::{self as terminal, TerminalSpec};
use caller::callers_of;
use setup::{audit_parts, restart_only, rules_of, terminal_specs};
use sign::Signer;
use status::describe;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Longest purpose text accepted, in bytes.
pub const MAX_PURPOSE_BYTES: usize = 4096;

pub struct Service {
    registry: Registry,
    gate: Arc<Gate>,
    /// Replaced whole on a reload; a connection keeps the caller it was identified as.
    callers: RwLock<Arc<Vec<Arc<Caller>>>>,
    /// What a reload must leave as it is (see `restart_only`).
    fixed: String,
    /// Each device's queue and signing threads.
    signers: HashMap<String, Arc<Signer>>,
    started: Instant,
    connections: AtomicUsize,
    audit: AuditLog,
    /// Stamps past their authorisation: they run to their recorded outcome even when the
    /// request that started them times out or its client goes away.
    outcomes: tokio_util::task::TaskTracker,
    /// Smart-seal terminals, by their seal id; their sessions start with the runtime.
    terminals: std::sync::OnceLock<HashMap<String, terminal::Handle>>,
    /// Each terminal with what the log last recorded of it (counter, newest report, open grant).
    terminal_specs: std::sync::Mutex<Vec<(TerminalSpec, crate::audit::query::TerminalMemory)>>,
    /// The time-stamping authority of container stamps, when one is configured.
    tsa: Option<Arc<crate::timestamp::Tsa>>,
    /// The configuration file, and its folder (approvers' key files are taken from it).
    config_path: std::path::PathBuf,
    config_dir: std::path::PathBuf,
    /// The fragment from HQ in force; held while one is put in force, and by reloads.
    policy: tokio::sync::Mutex<Option<crate::hq::policy::Fragment>>,
    /// Applications waiting for their approvers; held while one is submitted or decided.
    applications: tokio::sync::Mutex<applications::Applications>,
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
    /// (which records an outcome for every stamp a previous run left unfinished). `config` is
    /// the file at `config_path` with `policy`, the fragment from HQ in force, applied on it
    /// (see [`crate::hq::policy::restore`]). Blocks.
    pub fn new(
        config: &Config,
        registry: Registry,
        config_path: &std::path::Path,
        policy: Option<crate::hq::policy::Fragment>,
    ) -> Result<Service, StartError> {
        let config_dir = config_path
            .parent()
            .map(|p| p.to_path_buf())
            .unwrap_or_default();
        let config_dir = config_dir.as_path();
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
                let memory = store
                    .read(|c| crate::audit::query::terminal_memory(c, &spec.id))
                    .map_err(|e| {
                        StartError::Terminal(format!(
                            "terminal {:?}: what the log holds of it: {e}",
                            spec.id
                        ))
                    })?;
                Ok((spec, memory))
            })
            .collect::<Result<Vec<_>, StartError>>()?;
        let open_applications = applications::Applications::load(&store)
            .map_err(|e| StartError::Applications(e.to_string()))?;
        let (key, anomaly) = audit_parts(config, &registry)?;
        // The first record of the run says which fragment from HQ it started with.
        let started = match &policy {
            Some(f) => serde_json::json!({
                "policy_version": f.version,
                "fragment_sha256": f.digest(),
            }),
            None => serde_json::json!({ "policy_version": 0 }),
        };
        let audit = AuditLog::open(store.path().to_owned(), key, anomaly, started.to_string())?;
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
        let signers = registry
            .devices
            .iter()
            .map(|d| {
                let holds_audit_key = d.id() == registry.audit_key.0.id();
                let signer = Signer::start(d.clone(), holds_audit_key).map_err(|e| {
                    StartError::Terminal(format!(
                        "device {:?}: cannot start its signing threads: {e}",
                        d.id()
                    ))
                })?;
                Ok((d.id().to_owned(), Arc::new(signer)))
            })
            .collect::<Result<HashMap<_, _>, StartError>>()?;
        Ok(Service {
            registry,
            gate,
            callers,
            signers,
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
            config_path: config_path.to_owned(),
            config_dir: config_dir.to_owned(),
            policy: tokio::sync::Mutex::new(policy),
            applications: tokio::sync::Mutex::new(open_applications),
        })
    }

    /// After the server stopped: lets stamps in flight record their outcomes, stops the
    /// devices' signing threads, then writes what the audit writer still holds and stops it.
    pub async fn shutdown(&self) {
        self.outcomes.close();
        self.outcomes.wait().await;
        let signers: Vec<_> = self.signers.values().cloned().collect();
        let audit = self.audit.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for s in signers {
                s.stop();
            }
            audit.shutdown()
        })
        .await;
    }

    /// The audit log, for the device watcher's events and the alert stream.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
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
            request::Body::ApplyPolicy(p) => self.apply_policy(caller, p).await,
            request::Body::RecordOversight(o) => self.record_oversight(caller, o).await,
            request::Body::SubmitApplication(a) => self.submit_application(caller, a).await,
            request::Body::ListApplications(l) => self.list_applications(caller, l).await,
            request::Body::FetchApplication(f) => self.fetch_application(caller, f).await,
            request::Body::DecideApplication(d) => self.decide_application(caller, d).await,
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
}

/// Runs blocking work (devices, the database) on the blocking pool.
pub(super) async fn off_executor<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("{what} task failed: {e}")))
}

pub(super) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub(super) fn purpose_ok(purpose: &str) -> Result<(), ServiceError> {
    if purpose.len() > MAX_PURPOSE_BYTES {
        return Err(ServiceError::InvalidArgument(format!(
            "purpose is {} bytes; at most {MAX_PURPOSE_BYTES} are accepted",
            purpose.len()
        )));
    }
    Ok(())
}

pub(super) fn digest32(bytes: &[u8]) -> Result<[u8; 32], ServiceError> {
    bytes.try_into().map_err(|_| {
        ServiceError::InvalidArgument(format!(
            "document_sha256 must be 32 bytes, got {}",
            bytes.len()
        ))
    })
}
