//! Smart-seal terminals: their sessions, and grants that unlock a terminal's physical seal.
//!
//! Owns: starting each terminal's session and asking it for a grant. The session itself
//! (checking the approval, consuming uses, the link to the terminal) is `crate::terminal`.

use super::caller::Caller;
use super::{digest32, purpose_ok, Service, ServiceError, StartError};
use crate::protocol::{pb, response};
use crate::terminal::session as terminal;
use std::collections::HashMap;

impl Service {
    /// Starts each terminal's session, from what the audit log last recorded of it (read when
    /// the service was built): counter, newest report, the grant still open. Call once, with
    /// the runtime the sessions use for the audit log.
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
        for (spec, memory) in specs {
            let seal = spec.seal.clone();
            map.insert(seal, terminal::spawn(spec, ctx.clone(), memory));
        }
        let _ = self.terminals.set(map);
        Ok(())
    }

    pub(super) fn terminals(&self) -> impl Iterator<Item = &terminal::Handle> {
        self.terminals.get().into_iter().flat_map(|m| m.values())
    }

    /// A terminal by its id, for the TLS listener.
    pub fn terminal_by_id(&self, id: &str) -> Option<&terminal::Handle> {
        self.terminals().find(|t| t.id == id)
    }

    /// Unlocks a terminal's physical seal on an approval: the session checks it, consumes the
    /// uses and records the grant, sends it, and answers once the terminal has ACKed it.
    pub(super) async fn grant_terminal(
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
}
