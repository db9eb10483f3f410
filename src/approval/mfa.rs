//! TOTP (RFC 6238) for applicants: enrollment, verification with each code accepted once, and
//! lockout after repeated failures.
//!
//! Secrets are stored wrapped by a key inside a device (AES-GCM, bound to the user's name), so a
//! copy of the state directory alone does not reveal them. Unwrapped secrets live in zeroized
//! buffers for the length of one check.

use super::{ApprovalError as MfaError, Denial, Reason};
use crate::device::SealDevice;
use crate::store::Store;
use rusqlite::{params, OptionalExtension};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use totp_rs::{Algorithm, Builder, Secret};
use zeroize::Zeroizing;

pub struct Mfa {
    device: Arc<dyn SealDevice>,
    max_failures: u32,
    issuer: String,
    attempts: Attempts,
}

/// Codes weighed per applicant in the current window: (window start, count).
#[derive(Default)]
struct Attempts(Mutex<HashMap<String, (i64, u32)>>);

/// Codes weighed for one applicant per window, whatever their outcome; more are refused
/// without being looked at. Two authenticator steps' worth of honest retries fit easily.
pub const MAX_ATTEMPTS: u32 = 6;
pub const ATTEMPT_WINDOW_SECONDS: i64 = 60;
/// Applicants remembered at most; the map is emptied when it is full.
const ATTEMPT_MAP: usize = 65_536;

fn context(user: &str) -> Vec<u8> {
    format!("sealgate totp v1 {user}").into_bytes()
}

/// The TOTP parameters of every code sealgate checks (RFC 6238: SHA-1, six digits, 30 s, one
/// step of skew): applicants here, auditors at the console.
pub fn totp(secret: &[u8], user: &str, issuer: &str) -> Result<totp_rs::Totp, MfaError> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(30)
        .with_secret(Secret::from(secret.to_vec()))
        .with_account_name(user)
        .with_issuer(Some(issuer))
        .build()
        .map_err(|e| MfaError::Invalid(format!("TOTP parameters: {e}")))
}

fn valid_user(user: &str) -> Result<(), MfaError> {
    if user.is_empty() || user.len() > 128 || user.contains([':', '/', '?', '#', '&']) {
        return Err(MfaError::Invalid(format!(
            "user name {user:?} must be 1-128 characters without : / ? # &"
        )));
    }
    Ok(())
}

impl Attempts {
    /// Counts one code for `user` at `now`; false when the applicant is over the limit.
    fn count(&self, user: &str, now: i64) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= ATTEMPT_MAP && !map.contains_key(user) {
            map.retain(|_, (start, _)| now - *start < ATTEMPT_WINDOW_SECONDS);
            if map.len() >= ATTEMPT_MAP {
                map.clear();
            }
        }
        let e = map.entry(user.to_owned()).or_insert((now, 0));
        if now - e.0 >= ATTEMPT_WINDOW_SECONDS {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= MAX_ATTEMPTS
    }
}

impl Mfa {
    pub fn new(device: Arc<dyn SealDevice>, max_failures: u32, issuer: String) -> Mfa {
        Mfa {
            device,
            max_failures,
            issuer,
            attempts: Attempts::default(),
        }
    }

    /// Makes a new secret for `user` (replacing any old one, clearing a lockout) and returns the
    /// otpauth URI to hand to the user once. Blocks.
    pub fn enroll(
        &self,
        store: &Store,
        user: &str,
        now: i64,
    ) -> Result<Zeroizing<String>, MfaError> {
        let user = &super::normalize_id(user).map_err(MfaError::Invalid)?;
        valid_user(user)?;
        let mut secret = Zeroizing::new(vec![0u8; 20]);
        getrandom::fill(&mut secret)
            .map_err(|e| MfaError::Invalid(format!("no randomness: {e}")))?;
        let sealed = self.device.seal_secret(&secret, &context(user))?;
        let uri = Zeroizing::new(
            totp(&secret, user, &self.issuer)?
                .to_url()
                .map_err(|e| MfaError::Invalid(format!("otpauth URI: {e}")))?,
        );
        store.with(|c| {
            c.execute(
                "INSERT INTO mfa_users (user, wrapped_secret, last_step, failures, locked, enrolled_at)
                 VALUES (?1, ?2, -1, 0, 0, ?3)
                 ON CONFLICT(user) DO UPDATE SET wrapped_secret = ?2, last_step = -1,
                     failures = 0, locked = 0, enrolled_at = ?3",
                params![user, sealed, now],
            )
        })?;
        Ok(uri)
    }

    /// Clears `user`'s failure count and lockout. Returns false when the user is not enrolled.
    pub fn reset(&self, store: &Store, user: &str) -> Result<bool, MfaError> {
        let user = &super::normalize_id(user).map_err(MfaError::Invalid)?;
        let n = store.with(|c| {
            c.execute(
                "UPDATE mfa_users SET failures = 0, locked = 0 WHERE user = ?1",
                params![user],
            )
        })?;
        Ok(n == 1)
    }

    /// Checks `code` for `user` at `now`: a good code is spent (a later check with a code of
    /// the same or an earlier time step fails) and a bad one counts towards the lockout. At
    /// most [`MAX_ATTEMPTS`] codes a minute are weighed per applicant. Blocks.
    pub fn check(
        &self,
        store: &Store,
        user: &str,
        code: &str,
        now: i64,
    ) -> Result<Result<(), Denial>, MfaError> {
        if code.is_empty() {
            return Ok(Err(Denial::new(
                Reason::MfaRequired,
                "this rule requires the applicant's TOTP code",
            )));
        }
        if !self.attempts.count(user, now) {
            return Ok(Err(Denial::new(
                Reason::RateLimited,
                format!(
                    "more than {MAX_ATTEMPTS} TOTP codes for applicant {user:?} within {ATTEMPT_WINDOW_SECONDS} s; wait"
                ),
            )));
        }
        let row: Option<(Vec<u8>, i64, u32, bool)> = store.with(|c| {
            c.query_row(
                "SELECT wrapped_secret, last_step, failures, locked FROM mfa_users WHERE user = ?1",
                params![user],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
        })?;
        let Some((sealed, last_step, failures, locked)) = row else {
            return Ok(Err(Denial::new(
                Reason::MfaInvalid,
                format!("applicant {user:?} is not enrolled for TOTP"),
            )));
        };
        if locked {
            return Ok(Err(Denial::new(
                Reason::MfaLocked,
                format!("applicant {user:?} is locked out after {failures} wrong codes; an administrator must reset it"),
            )));
        }
        let secret = self.device.open_secret(&sealed, &context(user))?;
        let step = totp(&secret, user, &self.issuer)?.check(code, now.max(0) as u64);
        let mut fresh = step.filter(|s| *s as i64 > last_step);
        if let Some(s) = fresh {
            // Spent only if no concurrent check spent this step first.
            let won = store.with(|c| {
                c.execute(
                    "UPDATE mfa_users SET last_step = ?2, failures = 0
                     WHERE user = ?1 AND last_step < ?2 AND locked = 0",
                    params![user, s as i64],
                )
            })?;
            if won == 1 {
                return Ok(Ok(()));
            }
            fresh = None;
        }
        let why = if step.is_some() && fresh.is_none() {
            "this TOTP code was already used"
        } else {
            "wrong TOTP code"
        };
        let locked: bool = store.with(|c| {
            c.query_row(
                "UPDATE mfa_users SET failures = failures + 1,
                     locked = (failures + 1 >= ?2)
                 WHERE user = ?1 RETURNING locked",
                params![user, self.max_failures],
                |r| r.get(0),
            )
        })?;
        if locked {
            tracing::warn!(applicant = %user, "TOTP lockout after repeated wrong codes");
        }
        Ok(Err(Denial::new(Reason::MfaInvalid, why)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_limited_per_applicant_per_window() {
        let a = Attempts::default();
        for _ in 0..MAX_ATTEMPTS {
            assert!(a.count("zhao.lei", 1000));
        }
        assert!(!a.count("zhao.lei", 1000 + ATTEMPT_WINDOW_SECONDS - 1));
        // Another applicant has a count of their own.
        assert!(a.count("li.na", 1000));
        // A new window starts afresh.
        assert!(a.count("zhao.lei", 1000 + ATTEMPT_WINDOW_SECONDS));
    }
}
