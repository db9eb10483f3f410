//! The gate: every approval check for one stamp, in order. Cheap and stateless checks come
//! first; a TOTP code is only looked at once the token itself is good (so a stranger cannot
//! lock an applicant out). The use itself is not consumed here: the gate hands back a
//! [`PendingUse`], which the audit writer consumes in the same transaction that records the
//! authorisation.

use super::ledger::{self, Use};
use super::mfa::Mfa;
use super::{evaluate, ApprovalError, Denial, Reason, TrustStore};
use crate::policy::{RateLimit, SealPolicy};
use crate::store::Store;
use crate::token::Claims;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub struct Gate {
    /// Replaced whole on a configuration reload; a check runs on one snapshot.
    rules: RwLock<Arc<Rules>>,
    pub store: Store,
    pub mfa: Option<Mfa>,
}

/// What a reload may change: who may approve, and each seal's policy.
pub struct Rules {
    pub trust: TrustStore,
    pub policies: HashMap<String, SealPolicy>,
}

impl Rules {
    /// Every seal's policy warnings (see [`SealPolicy::warnings`]), in seal order.
    pub fn warnings(&self) -> Vec<String> {
        let mut seals: Vec<_> = self.policies.iter().collect();
        seals.sort_by(|a, b| a.0.cmp(b.0));
        seals
            .into_iter()
            .flat_map(|(id, p)| p.warnings(id))
            .collect()
    }
}

/// One use of an approval, ready to be consumed durably.
#[derive(Debug, Clone)]
pub struct PendingUse {
    pub jti: String,
    pub payload_sha256: [u8; 32],
    pub seal: String,
    pub applicant: String,
    pub uses: u32,
    pub exp: i64,
    /// Checked again inside the consuming transaction, so concurrent stamps cannot overrun it.
    pub rate_limit: Option<RateLimit>,
    /// Uses to consume at once: 1 for a stamp, the impressions of a terminal grant.
    pub count: u32,
    /// The passkeys that approved: credential id (base64url), when it approved, its signature
    /// counter. Checked to move forward with time when the approval is first used.
    pub passkeys: Vec<(String, i64, u32)>,
}

impl PendingUse {
    pub fn as_use(&self) -> Use<'_> {
        Use {
            jti: &self.jti,
            payload_sha256: &self.payload_sha256,
            seal: &self.seal,
            applicant: &self.applicant,
            uses: self.uses,
            exp: self.exp,
            count: self.count,
            passkeys: &self.passkeys,
        }
    }
}

/// The outcome of the checks for one stamp.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Empty when the stamp is authorised.
    pub denials: Vec<Denial>,
    /// Name of the policy rule that matched.
    pub rule: Option<String>,
    /// The token's claims, when it parsed.
    pub claims: Option<Claims>,
    /// JSON array of the approvals that verified, each with the level its role fills.
    pub approvers: String,
    /// For a stamp that passed every check: the use still to be consumed.
    pub pending: Option<PendingUse>,
}

impl Gate {
    pub fn new(rules: Rules, store: Store, mfa: Option<Mfa>) -> Gate {
        Gate {
            rules: RwLock::new(Arc::new(rules)),
            store,
            mfa,
        }
    }

    /// Puts new rules in force for every check that starts from now on.
    pub fn replace_rules(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
    }

    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs every check. For a stamp (`dry_run` false) it stops at the first refusal, spends
    /// the TOTP code (weighed only when every other check, the replay ledger's included,
    /// passed), and returns the use to consume; a dry run collects every refusal, including
    /// one the replay ledger would give, never weighs a TOTP code, and changes nothing.
    /// Blocks (database, device for TOTP).
    pub fn check(
        &self,
        seal: &str,
        digest: &[u8; 32],
        token: &[u8],
        mfa_code: &str,
        now: i64,
        dry_run: bool,
    ) -> Result<Verdict, ApprovalError> {
        let first = self.first_pass(seal, digest, token, now);
        self.with_state(first, mfa_code, now, dry_run)
    }

    /// The checks that need no state: the token, its signatures (each verified once per trust
    /// store), the seal's policy and the clock. CPU only, so a stamp runs it inline.
    pub fn first_pass(&self, seal: &str, digest: &[u8; 32], token: &[u8], now: i64) -> FirstPass {
        static NO_RULES: SealPolicy = SealPolicy {
            rules: Vec::new(),
            limits: crate::config::TokenLimits {
                max_lifetime_seconds: 0,
                max_uses: 0,
            },
        };
        let rules = self.rules();
        let policy = rules.policies.get(seal).unwrap_or(&NO_RULES);
        let ev = evaluate(token, seal, digest, now, &rules.trust, policy);
        let rule = ev.rule.map(|i| &policy.rules[i]);
        let verdict = Verdict {
            denials: ev.denials,
            rule: rule.map(|r| r.name.clone()),
            approvers: approvers_json(&ev.approvals, rule.map(|r| r.levels.as_slice())),
            ..Verdict::default()
        };
        let pending = ev.token.as_ref().map(|token| PendingUse {
            jti: token.claims.jti.clone(),
            payload_sha256: token.payload_digest(),
            seal: seal.to_owned(),
            applicant: ev.applicant.clone(),
            uses: token.claims.uses,
            exp: token.claims.exp,
            rate_limit: rule.and_then(|r| r.rate_limit),
            count: 1,
            passkeys: ev
                .approvals
                .iter()
                .filter_map(|a| a.passkey.as_ref().map(|p| (a, p)))
                .map(|(a, p)| (p.credential.clone(), a.approved_at, p.sign_count))
                .collect(),
        });
        FirstPass {
            mfa: rule.is_some_and(|r| r.mfa),
            claims: ev.token.map(|t| t.claims),
            pending,
            verdict,
        }
    }

    /// The checks that read state: the rate limit and the replay ledger as they stand (the
    /// audit writer checks both again, durably, when it consumes the use) and the TOTP code.
    /// Blocks (database, device for TOTP).
    pub fn with_state(
        &self,
        first: FirstPass,
        mfa_code: &str,
        now: i64,
        dry_run: bool,
    ) -> Result<Verdict, ApprovalError> {
        let FirstPass {
            mut verdict,
            claims,
            pending,
            mfa,
        } = first;
        let v = &mut verdict;
        let (Some(claims), Some(pending)) = (claims, pending) else {
            return Ok(verdict);
        };
        let stop = |v: &Verdict| !dry_run && !v.denials.is_empty();
        if !stop(v) {
            if let Some(limit) = pending.rate_limit {
                let n = ledger::uses_since(
                    &self.store,
                    &pending.applicant,
                    &pending.seal,
                    now - limit.window_seconds,
                )?;
                if n >= limit.count {
                    v.denials.push(ledger::rate_limited(
                        &pending.applicant,
                        &pending.seal,
                        n,
                        limit,
                    ));
                }
            }
        }
        // A spent approval is refused before any code is weighed, so an old approval cannot be
        // used to guess codes or to lock its applicant out.
        if !stop(v) {
            if let Some(d) = ledger::peek(&self.store, &pending.as_use())? {
                v.denials.push(d);
            }
        }
        if mfa {
            let totp = self.mfa.as_ref().ok_or_else(|| {
                ApprovalError::Invalid("a rule asks for TOTP but none is configured".into())
            })?;
            if dry_run {
                // A dry run never weighs a code: it would be an oracle that costs nothing.
                if mfa_code.is_empty() {
                    v.denials.push(Denial::new(
                        Reason::MfaRequired,
                        "this rule requires the applicant's TOTP code",
                    ));
                }
            } else if v.denials.is_empty() {
                // In a stamp a code is only weighed once everything else passed.
                if let Err(d) = totp.check(&self.store, &pending.applicant, mfa_code, now)? {
                    v.denials.push(d);
                }
            }
        }
        if !dry_run && v.denials.is_empty() {
            v.pending = Some(pending);
        }
        v.claims = Some(claims);
        Ok(verdict)
    }
}

/// What [`Gate::first_pass`] found, for [`Gate::with_state`] or, for a stamp whose rule asks
/// for no TOTP, for [`FirstPass::stateless`].
pub struct FirstPass {
    verdict: Verdict,
    claims: Option<Claims>,
    pending: Option<PendingUse>,
    /// The matched rule asks for a TOTP code.
    mfa: bool,
}

impl FirstPass {
    /// Whether the stamp can go to the audit writer without reading state first: its rule asks
    /// for no TOTP code. The rate limit and the replay ledger are then only checked where they
    /// count, in the writer's transaction that consumes the use (a refusal there is recorded
    /// as `stamp.denied` just the same); reading them earlier only matters when a refusal
    /// must come before a code is weighed.
    pub fn needs_state(&self) -> bool {
        self.mfa
    }

    /// The verdict of a stamp that needs no state (see [`FirstPass::needs_state`]).
    pub fn stateless(self) -> Verdict {
        let mut v = self.verdict;
        if v.denials.is_empty() {
            v.pending = self.pending;
        }
        v.claims = self.claims;
        v
    }
}

/// `[{"id","role","level","approved_at"}, ...]`; level is the 1-based position of the role in
/// the matched rule, 0 when the rule does not ask for it.
pub(crate) fn approvers_json(
    approvals: &[crate::policy::ApprovalFact],
    levels: Option<&[String]>,
) -> String {
    let list: Vec<serde_json::Value> = approvals
        .iter()
        .map(|a| {
            let level = levels
                .and_then(|l| l.iter().position(|r| *r == a.role))
                .map(|i| i + 1)
                .unwrap_or(0);
            let mut v = serde_json::json!({
                "id": a.approver,
                "role": a.role,
                "level": level,
                "approved_at": a.approved_at,
            });
            if let Some(p) = &a.passkey {
                v["passkey"] = serde_json::json!({
                    "credential": p.credential,
                    "user_verified": p.user_verified,
                    "sign_count": p.sign_count,
                });
            }
            v
        })
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        serde_json::Value::Array(list).to_string()
    }
}
