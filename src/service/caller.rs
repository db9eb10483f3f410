//! Step 1 of every request: who is calling, and which seals they may use.
//!
//! Owns: the configured callers (replaced whole on a reload), naming the caller behind a
//! connection from its peer credentials, and the answer a caller gets for a seal that is not
//! theirs (which tells a stranger nothing about seals they were not given).

use super::{Service, ServiceError};
use crate::config::Config;
use crate::device::SealBinding;
use crate::protocol::{pb, response, PROTOCOL_VERSION};
use std::collections::HashSet;
use std::sync::Arc;

/// A configured caller.
#[derive(Debug)]
pub struct Caller {
    pub name: String,
    pub(super) uids: Vec<u32>,
    pub(super) gids: Vec<u32>,
    pub(super) seals: HashSet<String>,
    pub(super) admin: bool,
    pub(super) oversight: bool,
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

pub(super) fn callers_of(config: &Config) -> Arc<Vec<Arc<Caller>>> {
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
                    oversight: c.oversight,
                })
            })
            .collect(),
    )
}

impl Service {
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

    pub(super) fn hello(&self, peer: &Peer, _h: pb::HelloRequest) -> response::Body {
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

    pub(super) fn seal_for(
        &self,
        caller: &Caller,
        seal_id: &str,
    ) -> Result<&SealBinding, ServiceError> {
        let seal = self.registry.seals.get(seal_id);
        let Some(seal) = seal.filter(|_| caller.seals.contains(seal_id)) else {
            return Err(self.not_for(caller, seal_id));
        };
        Ok(seal)
    }

    /// Why `caller` may not use `seal_id` as a signing seal. A caller learns only of seals it
    /// was given: for any other name the answer is the same whether it exists or not.
    pub(super) fn not_for(&self, caller: &Caller, seal_id: &str) -> ServiceError {
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
}
