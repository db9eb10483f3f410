//! Configuration fragments from headquarters, put in force at this site.
//!
//! Owns: the ApplyPolicy request: the fragment checked against the site's own configuration
//! file and the fragment in force, kept in the state directory, recorded (`config.applied`,
//! or `config.refused` with its reason), then put in force all or nothing, as a reload is.
//! Never: puts a fragment in force before its record is durable, or two at once.

use super::caller::Caller;
use super::setup::load_config;
use super::{Service, ServiceError};
use crate::audit::{kind, Record};
use crate::hq::policy::{self, Fragment, Refused};
use crate::protocol::{pb, response};

/// Runs short blocking work (a few small files read, one written and flushed) where the
/// request is, telling a multi-threaded runtime to move its other tasks off this thread; on a
/// current-thread runtime (the fuzz harness) it just runs.
fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => f(),
        _ => tokio::task::block_in_place(f),
    }
}

impl Service {
    /// Checks, keeps, records and puts in force a fragment HQ signed for this site.
    pub(super) async fn apply_policy(
        &self,
        caller: &Caller,
        req: pb::ApplyPolicyRequest,
    ) -> Result<response::Body, ServiceError> {
        let mut in_force = self.policy.lock().await;
        let fragment = match Fragment::decode(&req.fragment) {
            Ok(f) => f,
            Err(e) => return Err(self.policy_refused(caller, None, Refused::Invalid(e)).await),
        };
        // Files and devices' profiles are read here: off the executor's other work.
        let checked = in_place(|| self.admit(&fragment, in_force.as_ref()));
        let (config, prepared) = match checked {
            Ok(None) => {
                return Ok(response::Body::ApplyPolicy(pb::ApplyPolicyResponse {
                    version: fragment.version,
                    applied: false,
                }))
            }
            Ok(Some(c)) => c,
            Err(r) => return Err(self.policy_refused(caller, Some(&fragment), r).await),
        };
        let path = policy::stored_path(&config);
        let kept = in_place(|| policy::store(&path, &fragment));
        if let Err(e) = kept {
            return Err(ServiceError::AuditUnavailable(format!(
                "cannot keep the fragment in {}: {e}; the policy in force stays",
                path.display()
            )));
        }
        let mut record = Record::new(kind::CONFIG_APPLIED);
        record.caller = caller.name.clone();
        record.detail = format!(
            "HQ policy fragment version {} for site {} in force",
            fragment.version, fragment.site
        );
        record.evidence = fragment.evidence().to_string();
        if let Err(e) = self.audit.append(record).await {
            // Not recorded, so not in force: the fragment kept before it goes back.
            let restored = in_place(|| match in_force.as_ref() {
                Some(f) => policy::store(&path, f),
                None => std::fs::remove_file(&path),
            });
            if let Err(r) = restored {
                tracing::error!(file = %path.display(), error = %r, "cannot put the previous fragment back");
            }
            return Err(e.into());
        }
        self.put_in_force(prepared);
        tracing::info!(
            version = fragment.version,
            site = fragment.site,
            "HQ policy fragment in force"
        );
        let version = fragment.version;
        *in_force = Some(fragment);
        Ok(response::Body::ApplyPolicy(pb::ApplyPolicyResponse {
            version,
            applied: true,
        }))
    }

    /// The site's configuration as the fragment would make it, ready to put in force; None
    /// when this fragment is the one in force. Blocks.
    fn admit(
        &self,
        fragment: &Fragment,
        in_force: Option<&Fragment>,
    ) -> Result<Option<(crate::config::Config, super::setup::Prepared)>, Refused> {
        let mut config = load_config(&self.config_path)
            .map_err(|e| Refused::Invalid(format!("the site's configuration: {e:#}")))?;
        let settings = config.hq_policy.clone().ok_or(Refused::NotConfigured)?;
        if !fragment.admit(&settings, in_force, &mut config)? {
            return Ok(None);
        }
        let prepared = self
            .prepare(&config, &self.config_dir)
            .map_err(|e| Refused::Invalid(format!("fragment version {}: {e}", fragment.version)))?;
        Ok(Some((config, prepared)))
    }

    /// Records a refusal; the error the caller is answered with.
    async fn policy_refused(
        &self,
        caller: &Caller,
        fragment: Option<&Fragment>,
        why: Refused,
    ) -> ServiceError {
        tracing::warn!(reason = why.code(), error = %why, "HQ policy fragment refused");
        let mut record = Record::new(kind::CONFIG_REFUSED);
        record.caller = caller.name.clone();
        record.reason = why.code().to_owned();
        record.detail = why.to_string();
        if let Some(f) = fragment {
            record.evidence = f.evidence().to_string();
        }
        match self.audit.append(record).await {
            Ok(_) => ServiceError::PolicyRefused(why),
            Err(e) => e.into(),
        }
    }
}
