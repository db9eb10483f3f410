//! The service's one error enum and its one mapping to wire status codes.
//!
//! Owns: [`ServiceError`], the conversions from the layers below (audit, approvals,
//! terminals, devices), [`ServiceError::status`] and the error response. Never: maps a status
//! anywhere else.

use crate::approval::{ApprovalError, Denial};
use crate::audit::log::AuditError;
use crate::device::DeviceError;
use crate::protocol::{Response, Status, PROTOCOL_VERSION};
use crate::terminal::session::TerminalError;

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
    #[error("HQ policy fragment refused: {0}")]
    PolicyRefused(crate::hq::policy::Refused),
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
    #[error("the applications the log holds: {0}")]
    Applications(String),
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
            ServiceError::PolicyRefused(_) => Status::PolicyRefused,
        }
    }

    /// The response carrying this error.
    pub fn into_response(self, request_id: u64) -> Response {
        let reason = match &self {
            ServiceError::Denied(d) => d.reason.code().to_owned(),
            ServiceError::PolicyRefused(r) => r.code().to_owned(),
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
