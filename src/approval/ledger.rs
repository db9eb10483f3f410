//! The replay ledger: every approval's uses, counted durably. A use is consumed in a committed
//! transaction before the device is asked to sign.
//!
//! Entries are pruned once their token can no longer pass the expiry check, so pruning never
//! reopens a replay inside a token's validity window.

use super::{Denial, Reason, CLOCK_SKEW};
use crate::store::{Store, StoreError};
use rusqlite::{params, OptionalExtension, TransactionBehavior};

/// What the ledger knows about one approval.
pub struct Use<'a> {
    pub jti: &'a str,
    pub payload_sha256: &'a [u8; 32],
    pub seal: &'a str,
    pub applicant: &'a str,
    pub uses: u32,
    pub exp: i64,
}

fn refusal(u: &Use<'_>, row: Option<(Vec<u8>, u32, u32)>) -> Option<Denial> {
    let (payload, allowed, consumed) = row?;
    if payload != u.payload_sha256 {
        return Some(Denial::new(
            Reason::Replayed,
            format!("jti {:?} was already used for another approval", u.jti),
        ));
    }
    if consumed >= allowed {
        return Some(if allowed == 1 {
            Denial::new(
                Reason::Replayed,
                format!("approval {:?} was already used", u.jti),
            )
        } else {
            Denial::new(
                Reason::Exhausted,
                format!("approval {:?} has used all {allowed} of its uses", u.jti),
            )
        });
    }
    None
}

const SELECT: &str =
    "SELECT payload_sha256, uses_allowed, uses_consumed FROM approvals WHERE jti = ?1";

/// Consumes one use, durably. `Ok(Err(denial))` when the approval has no use left.
pub fn consume(store: &Store, u: &Use<'_>, now: i64) -> Result<Result<u32, Denial>, StoreError> {
    store.with(|conn| {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(SELECT, params![u.jti], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some(d) = refusal(u, row.clone()) {
            return Ok(Err(d));
        }
        let remaining = match row {
            None => {
                tx.execute(
                    "INSERT INTO approvals VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)",
                    params![
                        u.jti,
                        &u.payload_sha256[..],
                        u.seal,
                        u.applicant,
                        u.uses,
                        u.exp,
                        now
                    ],
                )?;
                u.uses - 1
            }
            Some((_, allowed, consumed)) => {
                tx.execute(
                    "UPDATE approvals SET uses_consumed = uses_consumed + 1 WHERE jti = ?1",
                    params![u.jti],
                )?;
                allowed - consumed - 1
            }
        };
        tx.execute(
            "INSERT INTO stamp_uses (applicant, seal, at, jti) VALUES (?1, ?2, ?3, ?4)",
            params![u.applicant, u.seal, now, u.jti],
        )?;
        tx.commit()?;
        Ok(Ok(remaining))
    })
}

/// Whether `consume` would refuse, without consuming (for dry runs).
pub fn peek(store: &Store, u: &Use<'_>) -> Result<Option<Denial>, StoreError> {
    store.with(|conn| {
        let row = conn
            .query_row(SELECT, params![u.jti], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        Ok(refusal(u, row))
    })
}

/// Stamps by `applicant` on `seal` since `since` (Unix seconds).
pub fn uses_since(
    store: &Store,
    applicant: &str,
    seal: &str,
    since: i64,
) -> Result<u32, StoreError> {
    store.with(|conn| {
        conn.query_row(
            "SELECT count(*) FROM stamp_uses WHERE applicant = ?1 AND seal = ?2 AND at > ?3",
            params![applicant, seal, since],
            |r| r.get(0),
        )
    })
}

/// Drops entries no token can use any more; returns how many approvals were dropped.
pub fn prune(store: &Store, now: i64) -> Result<usize, StoreError> {
    store.with(|conn| {
        let tx = conn.transaction()?;
        let n = tx.execute(
            "DELETE FROM approvals WHERE exp + ?1 < ?2",
            params![CLOCK_SKEW + 3600, now],
        )?;
        tx.execute(
            "DELETE FROM stamp_uses WHERE at < ?1",
            params![now - 32 * 86400],
        )?;
        tx.commit()?;
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u<'a>(jti: &'a str, p: &'a [u8; 32], uses: u32) -> Use<'a> {
        Use {
            jti,
            payload_sha256: p,
            seal: "s",
            applicant: "a",
            uses,
            exp: 1000,
        }
    }

    #[test]
    fn single_use_is_consumed_once_and_multi_use_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [1u8; 32];
        assert_eq!(consume(&s, &u("one", &p, 1), 10).unwrap(), Ok(0));
        let d = consume(&s, &u("one", &p, 1), 11).unwrap().unwrap_err();
        assert_eq!(d.reason, Reason::Replayed);
        for left in [2, 1, 0] {
            assert_eq!(consume(&s, &u("three", &p, 3), 10).unwrap(), Ok(left));
        }
        let d = consume(&s, &u("three", &p, 3), 10).unwrap().unwrap_err();
        assert_eq!(d.reason, Reason::Exhausted);
        // The same jti with another payload is a replay, even with uses left.
        let q = [2u8; 32];
        assert_eq!(consume(&s, &u("fresh", &p, 5), 10).unwrap(), Ok(4));
        let d = consume(&s, &u("fresh", &q, 5), 10).unwrap().unwrap_err();
        assert_eq!(d.reason, Reason::Replayed);
        assert_eq!(uses_since(&s, "a", "s", 0).unwrap(), 5);
        assert!(peek(&s, &u("one", &p, 1)).unwrap().is_some());
    }

    #[test]
    fn pruning_keeps_entries_inside_the_validity_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [1u8; 32];
        consume(&s, &u("x", &p, 1), 10).unwrap().unwrap();
        assert_eq!(prune(&s, 1000).unwrap(), 0);
        assert!(peek(&s, &u("x", &p, 1)).unwrap().is_some());
        assert_eq!(prune(&s, 1000 + CLOCK_SKEW + 3601).unwrap(), 1);
    }
}
