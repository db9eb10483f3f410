//! The gate: every approval check for one stamp, in order, ending with the durable consumption
//! of one use. Cheap and stateless checks come first; a TOTP code is only looked at once the
//! token itself is good (so a stranger cannot lock an applicant out), and the use is consumed
//! last, only when everything else passed.

use super::ledger::{self, Use};
use super::mfa::Mfa;
use super::{evaluate, ApprovalError, Denial, Reason, TrustStore};
use crate::policy::SealPolicy;
use crate::store::Store;
use std::collections::HashMap;

pub struct Gate {
    pub trust: TrustStore,
    pub policies: HashMap<String, SealPolicy>,
    pub store: Store,
    pub mfa: Option<Mfa>,
}

/// The outcome of the checks for one stamp.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Empty when the stamp is authorised.
    pub denials: Vec<Denial>,
    /// Name of the policy rule that matched.
    pub rule: Option<String>,
    pub jti: String,
    pub applicant: String,
    /// Uses left after this one (only when consumed).
    pub uses_left: u32,
}

impl Gate {
    /// Runs every check. With `consume`, stops at the first refusal and, when all pass,
    /// consumes one use durably; without it (a dry run), collects every refusal and changes
    /// nothing. Blocks (database, device for TOTP).
    pub fn check(
        &self,
        seal: &str,
        digest: &[u8; 32],
        token: &[u8],
        mfa_code: &str,
        now: i64,
        consume: bool,
    ) -> Result<Verdict, ApprovalError> {
        static NO_RULES: SealPolicy = SealPolicy { rules: Vec::new() };
        let policy = self.policies.get(seal).unwrap_or(&NO_RULES);
        let ev = evaluate(token, seal, digest, now, &self.trust, policy);
        let mut v = Verdict {
            denials: ev.denials,
            rule: ev.rule.map(|i| policy.rules[i].name.clone()),
            ..Verdict::default()
        };
        let Some(token) = ev.token else {
            return Ok(v);
        };
        let c = &token.claims;
        v.jti = c.jti.clone();
        v.applicant = c.applicant.clone();
        let stop = |v: &Verdict| consume && !v.denials.is_empty();
        if stop(&v) {
            return Ok(v);
        }
        if let Some(rule) = ev.rule.map(|i| &policy.rules[i]) {
            if let Some(limit) = rule.rate_limit {
                let n = ledger::uses_since(
                    &self.store,
                    &c.applicant,
                    seal,
                    now - limit.window_seconds,
                )?;
                if n >= limit.count {
                    v.denials.push(Denial::new(
                        Reason::RateLimited,
                        format!(
                            "{:?} already stamped {n} times with seal {seal:?} in the last {} s (limit {})",
                            c.applicant, limit.window_seconds, limit.count
                        ),
                    ));
                    if stop(&v) {
                        return Ok(v);
                    }
                }
            }
            if rule.mfa {
                let mfa = self.mfa.as_ref().ok_or_else(|| {
                    ApprovalError::Invalid("a rule asks for TOTP but none is configured".into())
                })?;
                // In a real stamp a code is only weighed once the token is good.
                if v.denials.is_empty() || !consume {
                    if let Err(d) = mfa.check(&self.store, &c.applicant, mfa_code, now, consume)? {
                        v.denials.push(d);
                        if stop(&v) {
                            return Ok(v);
                        }
                    }
                }
            }
        }
        let payload = token.payload_digest();
        let u = Use {
            jti: &c.jti,
            payload_sha256: &payload,
            seal,
            applicant: &c.applicant,
            uses: c.uses,
            exp: c.exp,
        };
        if !consume {
            if let Some(d) = ledger::peek(&self.store, &u)? {
                v.denials.push(d);
            }
            return Ok(v);
        }
        match ledger::consume(&self.store, &u, now)? {
            Ok(left) => v.uses_left = left,
            Err(d) => v.denials.push(d),
        }
        Ok(v)
    }
}
