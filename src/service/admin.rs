//! Administration over the socket: TOTP enrolment and reset, and ledger upkeep.
//!
//! Owns: the administrator check for these requests and running them off the executor.
//! Never: logs or returns a TOTP seed except in the enrolment answer to the administrator.

use super::caller::Caller;
use super::{off_executor, unix_now, Service, ServiceError};
use crate::approval::gate::Gate;
use crate::approval::mfa::Mfa;
use crate::approval::ApprovalError;

impl Service {
    /// Runs an administrator's TOTP operation off the executor.
    pub(super) async fn admin_mfa<T: Send + 'static>(
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

    /// Drops replay-ledger entries no token can use any more. Blocks.
    pub fn prune_ledger(&self) -> Result<usize, ServiceError> {
        let now = unix_now();
        crate::approval::ledger::prune(&self.gate.store, now)
            .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))
    }
}
