//! The replay ledger: every approval's uses, counted durably. A use is consumed in a committed
//! transaction before the device is asked to sign.
//!
//! Entries are pruned once their token can no longer pass the expiry check, so pruning never
//! reopens a replay inside a token's validity window.

use super::{Denial, Reason, CLOCK_SKEW};
use crate::policy::RateLimit;
use crate::store::{Store, StoreError};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;

/// What the ledger knows about one approval.
pub struct Use<'a> {
    pub jti: &'a str,
    pub payload_sha256: &'a [u8; 32],
    pub seal: &'a str,
    pub applicant: &'a str,
    pub uses: u32,
    pub exp: i64,
    /// Uses this one act consumes: 1 for a stamp, the impressions of a terminal grant.
    pub count: u32,
    /// Passkeys that approved, with their signature counters (see [`PendingUse::passkeys`]).
    ///
    /// [`PendingUse::passkeys`]: super::gate::PendingUse::passkeys
    pub passkeys: &'a [(String, i64, u32)],
}

fn refusal(u: &Use<'_>, row: Option<Row>) -> Option<Denial> {
    let (payload, allowed, consumed) = row?;
    if payload != u.payload_sha256 {
        return Some(Denial::new(
            Reason::Replayed,
            format!("jti {:?} was already used for another approval", u.jti),
        ));
    }
    if consumed < allowed && consumed + u.count > allowed {
        return Some(Denial::new(
            Reason::Exhausted,
            format!(
                "approval {:?} has {} of its {allowed} uses left; {} asked",
                u.jti,
                allowed - consumed,
                u.count
            ),
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

/// (payload digest, uses allowed, uses consumed) of an approval.
type Row = (Vec<u8>, u32, u32);

/// Uses of approvals that the audit log holds, as the audit writer has seen them: read from the
/// log the first time an approval comes up after a start, then kept up to date as its uses
/// commit. So the log's count stands even when a ledger row is deleted or lowered behind the
/// daemon's back, without counting log rows on every stamp. Bounded: emptied, when full,
/// between batches (never inside one, where a count read from the log could then include the
/// batch's own records and be counted again when it commits).
#[derive(Default)]
pub struct LoggedUses(HashMap<String, u32>);

/// Approvals remembered at most.
const LOGGED_USES: usize = 100_000;

impl LoggedUses {
    fn get(&mut self, conn: &Connection, jti: &str) -> Result<u32, rusqlite::Error> {
        if let Some(n) = self.0.get(jti) {
            return Ok(*n);
        }
        let n = logged_uses(conn, jti)?;
        self.0.insert(jti.to_owned(), n);
        Ok(n)
    }

    /// Forgets everything when full; call between batches.
    pub fn trim(&mut self) {
        if self.0.len() >= LOGGED_USES {
            self.0.clear();
        }
    }

    /// `count` more uses of `jti` committed.
    pub fn committed(&mut self, jti: &str, count: u32) {
        if let Some(n) = self.0.get_mut(jti) {
            *n = n.saturating_add(count);
        }
    }
}

/// The ledger's row for `u`, and the row as counted: the higher of the ledger's count and the
/// log's (`logged`) stands, so a deleted or lowered ledger row gives no use back.
fn counted(u: &Use<'_>, row: &Option<Row>, logged: u32) -> Option<Row> {
    if row.as_ref().map_or(logged > 0, |r| r.2 < logged) {
        tracing::error!(approval = %u.jti, logged, "the replay ledger holds fewer uses than the audit log; the log's count stands");
    }
    match row {
        Some((payload, allowed, consumed)) => {
            Some((payload.clone(), *allowed, (*consumed).max(logged)))
        }
        None if logged > 0 => Some((u.payload_sha256.to_vec(), u.uses, logged)),
        None => None,
    }
}

fn ledger_row(conn: &Connection, jti: &str) -> Result<Option<Row>, rusqlite::Error> {
    conn.prepare_cached(SELECT)?
        .query_row(params![jti], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
}

/// Consumes `u.count` uses (one for a stamp) inside the caller's transaction (the audit writer's, so the use and its
/// `stamp.authorized` record are made durable together). `Ok(Err(denial))` when the approval
/// has no use left or the applicant is over the rule's rate limit.
pub fn consume(
    conn: &Connection,
    u: &Use<'_>,
    now: i64,
    rate_limit: Option<RateLimit>,
    logged: &mut LoggedUses,
) -> Result<Result<u32, Denial>, rusqlite::Error> {
    let row = ledger_row(conn, u.jti)?;
    let counted = counted(u, &row, logged.get(conn, u.jti)?);
    if let Some(d) = refusal(u, counted.clone()) {
        return Ok(Err(d));
    }
    if let Some(limit) = rate_limit {
        let n = count_since(conn, u.applicant, u.seal, now - limit.window_seconds)?;
        if n + u.count > limit.count {
            return Ok(Err(rate_limited(u.applicant, u.seal, n, limit)));
        }
    }
    let remaining = match counted {
        None => {
            if u.count > u.uses {
                return Ok(Err(Denial::new(
                    Reason::Exhausted,
                    format!(
                        "approval {:?} allows {} uses; {} asked",
                        u.jti, u.uses, u.count
                    ),
                )));
            }
            // The approval's first use: its passkeys' counters must have moved forward.
            if let Some(d) = counters_refusal(conn, u)? {
                return Ok(Err(d));
            }
            for (credential, approved_at, count) in u.passkeys {
                conn.prepare_cached(
                    "INSERT INTO passkey_uses (credential_id, approved_at, sign_count, jti, at) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![credential, approved_at, count, u.jti, now])?;
            }
            insert_row(conn, u, u.count, now)?;
            u.uses - u.count
        }
        Some((_, allowed, consumed)) => {
            if row.is_some() {
                conn.prepare_cached("UPDATE approvals SET uses_consumed = ?2 WHERE jti = ?1")?
                    .execute(params![u.jti, consumed + u.count])?;
            } else {
                insert_row(conn, u, consumed + u.count, now)?;
            }
            allowed - consumed - u.count
        }
    };
    for _ in 0..u.count {
        conn.prepare_cached(
            "INSERT INTO stamp_uses (applicant, seal, at, jti) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![u.applicant, u.seal, now, u.jti])?;
    }
    Ok(Ok(remaining))
}

fn insert_row(conn: &Connection, u: &Use<'_>, consumed: u32, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO approvals VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?
        .execute(params![
            u.jti,
            &u.payload_sha256[..],
            u.seal,
            u.applicant,
            u.uses,
            consumed,
            u.exp,
            now
        ])?;
    Ok(())
}

/// Uses of approval `jti` the audit log records: one per `stamp.authorized`, the impressions of
/// each `terminal.granted`.
fn logged_uses(conn: &Connection, jti: &str) -> Result<u32, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT COALESCE(SUM(CASE kind WHEN 'stamp.authorized' THEN 1 \
           ELSE COALESCE(json_extract(evidence, '$.impressions'), 1) END), 0) \
         FROM audit WHERE jti = ?1 AND jti <> '' AND kind IN ('stamp.authorized', 'terminal.granted')",
    )?
    .query_row(params![jti], |r| r.get::<_, i64>(0))
    .map(|n| n.clamp(0, u32::MAX as i64) as u32)
}

/// The refusal for an applicant over a rate limit, having stamped `n` times in its window.
pub fn rate_limited(applicant: &str, seal: &str, n: u32, limit: RateLimit) -> Denial {
    Denial::new(
        Reason::RateLimited,
        format!(
            "{applicant:?} already stamped {n} times with seal {seal:?} in the last {} s (limit {})",
            limit.window_seconds, limit.count
        ),
    )
}

fn count_since(
    conn: &Connection,
    applicant: &str,
    seal: &str,
    since: i64,
) -> Result<u32, rusqlite::Error> {
    conn.query_row(
        "SELECT count(*) FROM stamp_uses WHERE applicant = ?1 AND seal = ?2 AND at > ?3",
        params![applicant, seal, since],
        |r| r.get(0),
    )
}

/// The refusal of an approval whose passkey's signature counter does not fit its earlier
/// approvals: it must be higher than the counter of every approval made before it and lower
/// than that of every one made after it (approval times are the passkey's own signed headers;
/// approvals may be used out of order). A counter that goes back is how a copied
/// authenticator shows itself (WebAuthn §6.1.1). An authenticator that keeps no counter says
/// 0 every time, which stands.
fn counters_refusal(conn: &Connection, u: &Use<'_>) -> Result<Option<Denial>, rusqlite::Error> {
    for (credential, approved_at, count) in u.passkeys {
        if *count == 0 {
            let counted: bool = conn
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM passkey_uses WHERE credential_id = ?1 AND sign_count > 0)",
                )?
                .query_row(params![credential], |r| r.get(0))?;
            if !counted {
                continue;
            }
        }
        let clash: Option<(i64, u32)> = conn
            .prepare_cached(
                "SELECT approved_at, sign_count FROM passkey_uses WHERE credential_id = ?1 AND \
                 ((approved_at < ?2 AND sign_count >= ?3) OR (approved_at > ?2 AND sign_count <= ?3) \
                  OR sign_count = ?3) LIMIT 1",
            )?
            .query_row(params![credential, approved_at, count], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((at, seen)) = clash {
            return Ok(Some(Denial::new(
                Reason::ClonedAuthenticator,
                format!(
                    "passkey {credential} approved at {approved_at} with signature counter {count}, but it had counter {seen} in an approval at {at}: the authenticator may have been copied"
                ),
            )));
        }
    }
    Ok(None)
}

/// Whether `consume` would refuse, without consuming (for dry runs).
pub fn peek(store: &Store, u: &Use<'_>) -> Result<Option<Denial>, StoreError> {
    store.with(|conn| {
        // The ledger's row decides a dry run or a gate's early look; only a missing row is
        // looked up in the log (the writer's count, in `consume`, is the one that stands).
        let row = ledger_row(conn, u.jti)?;
        let logged = if row.is_none() {
            logged_uses(conn, u.jti)?
        } else {
            0
        };
        let counted = counted(u, &row, logged);
        if counted.is_none() {
            if let Some(d) = counters_refusal(conn, u)? {
                return Ok(Some(d));
            }
        }
        Ok(refusal(u, counted))
    })
}

/// Stamps by `applicant` on `seal` since `since` (Unix seconds).
pub fn uses_since(
    store: &Store,
    applicant: &str,
    seal: &str,
    since: i64,
) -> Result<u32, StoreError> {
    store.with(|conn| count_since(conn, applicant, seal, since))
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
        // A passkey's approvals older than 400 days are forgotten, except the one with its
        // highest counter (SQLite gives the bare `id` of the row that holds the max).
        tx.execute(
            "DELETE FROM passkey_uses WHERE at < ?1 AND id NOT IN \
             (SELECT id FROM (SELECT id, max(sign_count) FROM passkey_uses GROUP BY credential_id))",
            params![now - 400 * 86400],
        )?;
        tx.commit()?;
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consume_one(
        s: &Store,
        u: &Use<'_>,
        now: i64,
        limit: Option<RateLimit>,
    ) -> Result<u32, Denial> {
        s.with(|c| {
            let tx = c.transaction()?;
            // A fresh count from the log each time, as after a restart.
            let r = consume(&tx, u, now, limit, &mut LoggedUses::default())?;
            tx.commit()?;
            Ok(r)
        })
        .unwrap()
    }

    fn u<'a>(jti: &'a str, p: &'a [u8; 32], uses: u32) -> Use<'a> {
        Use {
            jti,
            payload_sha256: p,
            seal: "s",
            applicant: "a",
            uses,
            exp: 1000,
            count: 1,
            passkeys: &[],
        }
    }

    #[test]
    fn single_use_is_consumed_once_and_multi_use_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [1u8; 32];
        assert_eq!(consume_one(&s, &u("one", &p, 1), 10, None), Ok(0));
        let d = consume_one(&s, &u("one", &p, 1), 11, None).unwrap_err();
        assert_eq!(d.reason, Reason::Replayed);
        for left in [2, 1, 0] {
            assert_eq!(consume_one(&s, &u("three", &p, 3), 10, None), Ok(left));
        }
        let d = consume_one(&s, &u("three", &p, 3), 10, None).unwrap_err();
        assert_eq!(d.reason, Reason::Exhausted);
        // The same jti with another payload is a replay, even with uses left.
        let q = [2u8; 32];
        assert_eq!(consume_one(&s, &u("fresh", &p, 5), 10, None), Ok(4));
        let d = consume_one(&s, &u("fresh", &q, 5), 10, None).unwrap_err();
        assert_eq!(d.reason, Reason::Replayed);
        assert_eq!(uses_since(&s, "a", "s", 0).unwrap(), 5);
        assert!(peek(&s, &u("one", &p, 1)).unwrap().is_some());
    }

    #[test]
    fn a_passkey_counter_must_move_forward_with_its_approval_times() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [3u8; 32];
        let with = |jti: &'static str, keys: &'static [(String, i64, u32)]| Use {
            passkeys: keys,
            ..u(jti, &p, 1)
        };
        fn leak(v: Vec<(String, i64, u32)>) -> &'static [(String, i64, u32)] {
            Vec::leak(v)
        }
        let k = |at: i64, n: u32| leak(vec![("cred-a".into(), at, n)]);
        assert!(consume_one(&s, &with("p1", k(100, 5)), 10, None).is_ok());
        // Approved later with a higher counter, or earlier with a lower one (used out of order).
        assert!(consume_one(&s, &with("p2", k(200, 9)), 10, None).is_ok());
        assert!(consume_one(&s, &with("p3", k(150, 7)), 10, None).is_ok());
        // A counter seen before, a later approval with a lower counter, an earlier approval
        // with a higher one: each refused, and nothing of it is kept.
        for (jti, keys) in [("p4", k(300, 9)), ("p5", k(300, 6)), ("p6", k(120, 8))] {
            let d = consume_one(&s, &with(jti, keys), 10, None).unwrap_err();
            assert_eq!(d.reason, Reason::ClonedAuthenticator, "{jti}: {d}");
            assert!(peek(&s, &with(jti, keys)).unwrap().is_some(), "{jti}");
        }
        let kept = s
            .with(|c| {
                c.query_row("SELECT count(*) FROM passkey_uses", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap();
        assert_eq!(kept, 3);
        // A counter of 0 where the passkey showed counters before is a counter that went back.
        let d = consume_one(&s, &with("p7", k(400, 0)), 10, None).unwrap_err();
        assert_eq!(d.reason, Reason::ClonedAuthenticator);
        // An authenticator that keeps no counter says 0 every time; that stands.
        let z = |at: i64| leak(vec![("cred-z".into(), at, 0)]);
        assert!(consume_one(&s, &with("z1", z(100)), 10, None).is_ok());
        assert!(consume_one(&s, &with("z2", z(200)), 10, None).is_ok());
        // The second use of a standing approval is not checked again (same assertion).
        let standing = |jti: &'static str| Use {
            passkeys: k(500, 11),
            ..u(jti, &p, 2)
        };
        assert!(consume_one(&s, &standing("s1"), 10, None).is_ok());
        assert!(consume_one(&s, &standing("s1"), 10, None).is_ok());
    }

    #[test]
    fn a_grant_takes_several_uses_at_once_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [1u8; 32];
        let many = |n| Use {
            count: n,
            ..u("four", &p, 4)
        };
        let d = consume_one(&s, &many(5), 10, None).unwrap_err();
        assert_eq!(d.reason, Reason::Exhausted);
        assert_eq!(consume_one(&s, &many(3), 10, None), Ok(1));
        let d = consume_one(&s, &many(2), 10, None).unwrap_err();
        assert_eq!(d.reason, Reason::Exhausted);
        assert!(d.detail.contains("1 of its 4 uses left"), "{}", d.detail);
        assert_eq!(consume_one(&s, &many(1), 10, None), Ok(0));
        assert_eq!(uses_since(&s, "a", "s", 0).unwrap(), 4);
    }

    #[test]
    fn the_rate_limit_is_checked_inside_the_consuming_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [1u8; 32];
        let limit = Some(RateLimit {
            count: 2,
            window_seconds: 60,
        });
        assert_eq!(consume_one(&s, &u("a1", &p, 1), 100, limit), Ok(0));
        assert_eq!(consume_one(&s, &u("a2", &p, 1), 110, limit), Ok(0));
        let d = consume_one(&s, &u("a3", &p, 1), 120, limit).unwrap_err();
        assert_eq!(d.reason, Reason::RateLimited);
        // Nothing was consumed for the refused approval.
        assert!(peek(&s, &u("a3", &p, 1)).unwrap().is_none());
        assert_eq!(consume_one(&s, &u("a3", &p, 1), 161, limit), Ok(0));
    }

    #[test]
    fn pruning_keeps_entries_inside_the_validity_window() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let p = [1u8; 32];
        consume_one(&s, &u("x", &p, 1), 10, None).unwrap();
        assert_eq!(prune(&s, 1000).unwrap(), 0);
        assert!(peek(&s, &u("x", &p, 1)).unwrap().is_some());
        assert_eq!(prune(&s, 1000 + CLOCK_SKEW + 3601).unwrap(), 1);
    }
}
