//! Seal policies: ordered rules per seal. The first rule matching the approval's document type,
//! amount, department and scope says which approval levels are required and in which order,
//! which roles are department-scoped, when the seal may be used, how often per applicant, and
//! whether the applicant must give a TOTP code.
//!
//! Owns: compiling rules from configuration and the pure checks on them (level assignment and
//! order, department scope, hours). Never: touches state or the clock itself; the time is given.

use crate::config::{RuleConfig, TokenLimits};
use crate::denial::{Denial, Reason};
use crate::token::Claims;
use std::collections::HashSet;

#[derive(Debug, thiserror::Error)]
#[error("seal {seal:?}, rule {rule:?}: {detail}")]
pub struct PolicyError {
    pub seal: String,
    pub rule: String,
    pub detail: String,
}

/// One verified approval, as the policy sees it: role and department from the trust store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalFact {
    pub approver: String,
    pub role: String,
    pub department: String,
    pub approved_at: i64,
    /// Set when the approval is a passkey's assertion.
    pub passkey: Option<PasskeyFact>,
}

/// What a passkey's approval showed: which credential, whether the user was verified, and the
/// authenticator's signature counter (which the replay ledger checks moves forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasskeyFact {
    /// The credential id, base64url.
    pub credential: String,
    pub user_verified: bool,
    pub sign_count: u32,
}

/// Where a rule asks a passkey's approval for user verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UserVerification {
    /// At every level above the first (the default).
    #[default]
    AboveFirst,
    Required,
    Preferred,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub window_seconds: i64,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    doc_types: Vec<String>,
    departments: Vec<String>,
    scopes: Vec<String>,
    amount_min: Option<i64>,
    amount_max: Option<i64>,
    currency: Option<String>,
    /// Roles required, in the order they must approve.
    pub levels: Vec<String>,
    dept_scoped: HashSet<String>,
    /// Allowed minutes of the day [from, to), local time; `to < from` spans midnight.
    hours: TimeWindow,
    pub rate_limit: Option<RateLimit>,
    pub mfa: bool,
    amount_required: bool,
    pub user_verification: UserVerification,
}

#[derive(Debug, Clone, Default)]
pub struct SealPolicy {
    pub rules: Vec<Rule>,
    /// The longest approval life and most uses this seal accepts.
    pub limits: TokenLimits,
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

fn parse_weekday(s: &str) -> Option<jiff::civil::Weekday> {
    use jiff::civil::Weekday::*;
    Some(match s.to_ascii_lowercase().as_str() {
        "mon" => Monday,
        "tue" => Tuesday,
        "wed" => Wednesday,
        "thu" => Thursday,
        "fri" => Friday,
        "sat" => Saturday,
        "sun" => Sunday,
        _ => return None,
    })
}

impl SealPolicy {
    pub fn from_config(seal: &str, rules: &[RuleConfig]) -> Result<SealPolicy, PolicyError> {
        let mut out = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let name = if r.name.is_empty() {
                format!("#{}", i + 1)
            } else {
                r.name.clone()
            };
            let err = |detail: String| PolicyError {
                seal: seal.to_owned(),
                rule: name.clone(),
                detail,
            };
            if r.levels.is_empty() {
                return Err(err(
                    "a rule needs at least one approval level; no seal is used without approval"
                        .into(),
                ));
            }
            for d in &r.dept_scoped {
                if !r.levels.contains(d) {
                    return Err(err(format!(
                        "dept_scoped role {d:?} is not one of the levels"
                    )));
                }
            }
            let hours = TimeWindow::parse(r.hours.as_deref(), r.weekdays.as_deref(), &r.timezone)
                .map_err(err)?;
            let rate_limit = match (r.rate_limit_count, r.rate_limit_window_seconds) {
                (None, None) => None,
                (Some(count), Some(w)) if count > 0 && w > 0 => Some(RateLimit {
                    count,
                    window_seconds: w as i64,
                }),
                _ => {
                    return Err(err(
                        "rate_limit_count and rate_limit_window_seconds go together, both > 0"
                            .into(),
                    ))
                }
            };
            let user_verification = match r.user_verification.as_deref() {
                None => UserVerification::AboveFirst,
                Some("required") => UserVerification::Required,
                Some("preferred") => UserVerification::Preferred,
                Some(other) => {
                    return Err(err(format!(
                        "user_verification is \"required\" or \"preferred\", not {other:?}"
                    )))
                }
            };
            if let (Some(a), Some(b)) = (r.amount_min, r.amount_max) {
                if a >= b {
                    return Err(err("amount_min must be below amount_max".into()));
                }
            }
            out.push(Rule {
                name: name.clone(),
                doc_types: r.doc_types.clone(),
                departments: r.departments.clone(),
                scopes: r.scopes.clone(),
                amount_min: r.amount_min,
                amount_max: r.amount_max,
                currency: r.currency.clone(),
                levels: r.levels.clone(),
                dept_scoped: r.dept_scoped.iter().cloned().collect(),
                hours,
                rate_limit,
                mfa: r.mfa,
                amount_required: r.amount_required,
                user_verification,
            });
            let rule = out.last().expect("just pushed");
            if rule.amount_required && !rule.amount_bounded() {
                return Err(err(
                    "amount_required needs amount bounds or a currency on the rule".into(),
                ));
            }
            if let Some(c) = &rule.currency {
                if !crate::token::is_currency(c) {
                    return Err(err(format!("currency {c:?} is not an ISO 4217 code")));
                }
            }
        }
        Ok(SealPolicy {
            rules: out,
            limits: TokenLimits::default(),
        })
    }

    /// The same policy with these limits on approvals.
    pub fn with_limits(mut self, limits: TokenLimits) -> SealPolicy {
        self.limits = limits;
        self
    }

    /// Index of the rule these claims fall under, or why none does. Amount-bounded rules for
    /// the claims' document type, department and scope form a family. An approval may fall
    /// through to a rule without bounds only if it leaves out its amount while no member
    /// requires one; one whose currency no member covers matches nothing. So an approval can
    /// never reach a cheaper rule by omitting its amount or writing another currency.
    pub fn match_rule(&self, c: &Claims) -> Result<usize, String> {
        let family = || {
            self.rules
                .iter()
                .filter(|r| r.applies_to(c) && r.amount_bounded())
        };
        match &c.amount {
            None => {
                if let Some(r) = family().find(|r| r.amount_required) {
                    return Err(format!(
                        "rule {:?} requires an amount for document type {:?}; the approval carries none",
                        r.name, c.doc.doc_type
                    ));
                }
            }
            Some(a) => {
                let covered = |r: &&Rule| r.currency.as_ref().is_none_or(|cur| *cur == a.currency);
                if family().next().is_some() && !family().any(|r| covered(&r)) {
                    return Err(format!(
                        "no rule covers document type {:?} in currency {:?}",
                        c.doc.doc_type, a.currency
                    ));
                }
            }
        }
        self.rules.iter().position(|r| r.matches(c)).ok_or_else(|| {
            format!(
                "no rule covers document type {:?}{}",
                c.doc.doc_type,
                c.amount
                    .as_ref()
                    .map(|a| format!(" for {} {}", a.value, a.currency))
                    .unwrap_or_default()
            )
        })
    }

    /// What in this policy lets an approval reach a cheaper rule: an amount-bounded rule that
    /// does not require an amount, with a rule without bounds that the same approval reaches.
    pub fn warnings(&self, seal: &str) -> Vec<String> {
        let overlap = |a: &[String], b: &[String]| {
            a.is_empty() || b.is_empty() || a.iter().any(|x| b.contains(x))
        };
        let mut out = Vec::new();
        for bounded in self
            .rules
            .iter()
            .filter(|r| r.amount_bounded() && !r.amount_required)
        {
            for open in self.rules.iter().filter(|r| !r.amount_bounded()) {
                if overlap(&bounded.doc_types, &open.doc_types)
                    && overlap(&bounded.departments, &open.departments)
                    && overlap(&bounded.scopes, &open.scopes)
                {
                    out.push(format!(
                        "seal {seal:?}: an approval without an amount falls from rule {:?} to rule {:?}; set amount_required = true on {:?} unless that is meant",
                        bounded.name, open.name, bounded.name
                    ));
                }
            }
        }
        out
    }
}

impl Rule {
    fn amount_bounded(&self) -> bool {
        self.amount_min.is_some() || self.amount_max.is_some() || self.currency.is_some()
    }

    /// Whether the document type, department and scope fall under this rule.
    fn applies_to(&self, c: &Claims) -> bool {
        let any_or = |list: &[String], v: &str| list.is_empty() || list.iter().any(|x| x == v);
        any_or(&self.doc_types, &c.doc.doc_type)
            && any_or(&self.departments, &c.dept)
            && any_or(&self.scopes, &c.scope)
    }

    fn matches(&self, c: &Claims) -> bool {
        if !self.applies_to(c) {
            return false;
        }
        if !self.amount_bounded() {
            return true;
        }
        let Some(a) = &c.amount else {
            return false;
        };
        self.currency.as_ref().is_none_or(|cur| *cur == a.currency)
            && self.amount_min.is_none_or(|m| a.value >= m)
            && self.amount_max.is_none_or(|m| a.value < m)
    }

    /// Assigns approvals to the required levels, in order: one approver per level, each level
    /// filled by an approver with that role (from the applicant's department where the role is
    /// department-scoped), approval times never going backwards from one level to the next.
    pub fn check_levels(&self, c: &Claims, approvals: &[ApprovalFact]) -> Vec<Denial> {
        let mut denials = Vec::new();
        let mut used: HashSet<&str> = HashSet::new();
        let mut prev: Option<(i64, &str)> = None;
        for (i, role) in self.levels.iter().enumerate() {
            let level = i + 1;
            let with_role: Vec<&ApprovalFact> = approvals
                .iter()
                .filter(|a| a.role == *role && !used.contains(a.approver.as_str()))
                .collect();
            let scoped: Vec<&ApprovalFact> = if self.dept_scoped.contains(role) {
                with_role
                    .iter()
                    .copied()
                    .filter(|a| a.department == c.dept)
                    .collect()
            } else {
                with_role.clone()
            };
            if scoped.is_empty() {
                if with_role.is_empty() {
                    denials.push(Denial::new(
                        Reason::MissingLevel,
                        format!("level {level} ({role}) has no approval"),
                    ));
                } else {
                    denials.push(Denial::new(
                        Reason::DepartmentMismatch,
                        format!(
                            "level {level} ({role}) must come from department {:?}; {} is from {:?}",
                            c.dept, with_role[0].approver, with_role[0].department
                        ),
                    ));
                }
                continue;
            }
            let in_order = scoped
                .iter()
                .filter(|a| prev.is_none_or(|(t, _)| a.approved_at >= t))
                .min_by_key(|a| a.approved_at);
            let chosen = match in_order {
                Some(a) => *a,
                None => {
                    let a = scoped
                        .iter()
                        .min_by_key(|a| a.approved_at)
                        .expect("not empty");
                    let (t, who) = prev.expect("only a later level can be out of order");
                    denials.push(Denial::new(
                        Reason::LevelOrder,
                        format!(
                            "level {level} ({role}) was approved by {} at {} before the level below it ({who} at {t})",
                            a.approver, a.approved_at
                        ),
                    ));
                    *a
                }
            };
            used.insert(chosen.approver.as_str());
            prev = Some((chosen.approved_at, chosen.approver.as_str()));
        }
        denials
    }

    /// How many levels, from the first, `approvals` fill in policy order (what an application
    /// waiting for its approvers has so far).
    pub fn levels_filled(&self, c: &Claims, approvals: &[ApprovalFact]) -> usize {
        (0..=self.levels.len())
            .rev()
            .find(|&n| {
                let prefix = Rule {
                    levels: self.levels[..n].to_vec(),
                    ..self.clone()
                };
                prefix.check_levels(c, approvals).is_empty()
            })
            .unwrap_or(0)
    }

    /// Whether the approver of a level with `role` must be from the applicant's department.
    pub fn department_scoped(&self, role: &str) -> bool {
        self.dept_scoped.contains(role)
    }

    /// Whether a passkey's approval by someone with `role` must come with user verification:
    /// where the rule says so, or (by default) when the role fills a level above the first.
    pub fn needs_user_verification(&self, role: &str) -> bool {
        match self.user_verification {
            UserVerification::Required => true,
            UserVerification::Preferred => false,
            UserVerification::AboveFirst => self.levels.iter().skip(1).any(|l| l == role),
        }
    }

    /// Whether `now` (Unix seconds) is inside the allowed hours and weekdays.
    pub fn check_hours(&self, now: i64) -> Option<Denial> {
        let why = self.hours.outside(now)?;
        Some(Denial::new(
            Reason::OutsideHours,
            format!("rule {:?} {why}", self.name),
        ))
    }
}

/// Hours of the day and days of the week in a time zone: a rule's allowed hours, or the
/// working hours the anomaly rules compare stamps with.
#[derive(Debug, Clone)]
pub struct TimeWindow {
    /// Minutes of the day [from, to), local time; `to < from` spans midnight.
    hours: Option<(u32, u32)>,
    weekdays: Option<Vec<jiff::civil::Weekday>>,
    timezone: jiff::tz::TimeZone,
}

impl TimeWindow {
    /// From "HH:MM-HH:MM", day names (mon..sun) and an IANA zone (UTC when empty). With
    /// neither hours nor days, every moment is inside.
    pub fn parse(
        hours: Option<&str>,
        weekdays: Option<&[String]>,
        timezone: &str,
    ) -> Result<TimeWindow, String> {
        let hours = match hours {
            None => None,
            Some(h) => Some(
                h.split_once('-')
                    .and_then(|(a, b)| Some((parse_hhmm(a.trim())?, parse_hhmm(b.trim())?)))
                    .ok_or_else(|| format!("hours {h:?} is not HH:MM-HH:MM"))?,
            ),
        };
        let weekdays = match weekdays {
            None => None,
            Some(days) => Some(
                days.iter()
                    .map(|d| {
                        parse_weekday(d)
                            .ok_or_else(|| format!("weekday {d:?} is not one of mon..sun"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let timezone = if timezone.is_empty() {
            jiff::tz::TimeZone::UTC
        } else {
            jiff::tz::TimeZone::get(timezone).map_err(|e| format!("time zone {timezone:?}: {e}"))?
        };
        Ok(TimeWindow {
            hours,
            weekdays,
            timezone,
        })
    }

    /// None when `now` (Unix seconds) is inside; otherwise why not, worded to follow
    /// "rule X ...".
    pub fn outside(&self, now: i64) -> Option<String> {
        if self.hours.is_none() && self.weekdays.is_none() {
            return None;
        }
        let zoned = jiff::Timestamp::from_second(now)
            .ok()?
            .to_zoned(self.timezone.clone());
        if let Some(days) = &self.weekdays {
            if !days.contains(&zoned.weekday()) {
                return Some(format!("does not allow {:?}", zoned.weekday()));
            }
        }
        if let Some((from, to)) = self.hours {
            let minute = zoned.hour() as u32 * 60 + zoned.minute() as u32;
            let inside = if from <= to {
                minute >= from && minute < to
            } else {
                minute >= from || minute < to
            };
            if !inside {
                return Some(format!(
                    "allows {:02}:{:02}-{:02}:{:02} ({}); it is {:02}:{:02}",
                    from / 60,
                    from % 60,
                    to / 60,
                    to % 60,
                    self.timezone.iana_name().unwrap_or("UTC"),
                    zoned.hour(),
                    zoned.minute()
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Amount, DocClaim};
    use proptest::prelude::*;

    fn rule(levels: &[&str], scoped: &[&str]) -> RuleConfig {
        RuleConfig {
            levels: levels.iter().map(|s| s.to_string()).collect(),
            dept_scoped: scoped.iter().map(|s| s.to_string()).collect(),
            ..RuleConfig::default()
        }
    }

    fn claims(dept: &str, amount: i64) -> Claims {
        Claims {
            jti: "j".into(),
            seal: "s".into(),
            doc: DocClaim {
                sha256: "00".repeat(32),
                doc_type: "contract".into(),
                title: None,
                sha512: None,
                placement: None,
            },
            amount: Some(Amount {
                value: amount,
                currency: "CNY".into(),
            }),
            dept: dept.into(),
            scope: String::new(),
            applicant: "app".into(),
            purpose: String::new(),
            iat: 0,
            nbf: 0,
            exp: 10_000,
            uses: 1,
        }
    }

    fn fact(who: &str, role: &str, dept: &str, at: i64) -> ApprovalFact {
        ApprovalFact {
            approver: who.into(),
            role: role.into(),
            department: dept.into(),
            approved_at: at,
            passkey: None,
        }
    }

    fn compile(r: RuleConfig) -> Rule {
        SealPolicy::from_config("s", &[r]).unwrap().rules.remove(0)
    }

    fn reasons(d: &[Denial]) -> Vec<Reason> {
        d.iter().map(|d| d.reason).collect()
    }

    #[test]
    fn user_verification_is_asked_above_the_first_level_unless_the_rule_says_otherwise() {
        let r = |uv: Option<&str>| {
            compile(RuleConfig {
                user_verification: uv.map(String::from),
                ..rule(&["dept_head", "executive"], &[])
            })
        };
        let default = r(None);
        assert!(!default.needs_user_verification("dept_head"));
        assert!(default.needs_user_verification("executive"));
        assert!(!default.needs_user_verification("someone_else"));
        assert!(r(Some("required")).needs_user_verification("dept_head"));
        assert!(!r(Some("preferred")).needs_user_verification("executive"));
        let bad = RuleConfig {
            user_verification: Some("always".into()),
            ..rule(&["dept_head"], &[])
        };
        let e = SealPolicy::from_config("s", &[bad]).unwrap_err();
        assert!(e.to_string().contains("user_verification"), "{e}");
    }

    #[test]
    fn first_matching_rule_wins_by_type_and_amount() {
        let big = RuleConfig {
            name: "big".into(),
            doc_types: vec!["contract".into()],
            amount_min: Some(10_000_000),
            currency: Some("CNY".into()),
            ..rule(&["dept_head", "executive"], &[])
        };
        let small = RuleConfig {
            name: "small".into(),
            doc_types: vec!["contract".into()],
            ..rule(&["dept_head"], &[])
        };
        let p = SealPolicy::from_config("s", &[big, small]).unwrap();
        assert_eq!(p.match_rule(&claims("sales", 20_000_000)), Ok(0));
        assert_eq!(p.match_rule(&claims("sales", 5_00)), Ok(1));
        let mut other = claims("sales", 5_00);
        other.doc.doc_type = "invoice".into();
        assert!(p.match_rule(&other).is_err());
    }

    #[test]
    fn no_approval_reaches_the_cheaper_rule_by_its_currency_or_by_leaving_out_its_amount() {
        let big = |required| RuleConfig {
            name: "big".into(),
            doc_types: vec!["contract".into()],
            amount_min: Some(10_000_000),
            currency: Some("CNY".into()),
            amount_required: required,
            ..rule(&["dept_head", "executive"], &[])
        };
        let small = RuleConfig {
            name: "small".into(),
            doc_types: vec!["contract".into()],
            ..rule(&["dept_head"], &[])
        };
        let p = SealPolicy::from_config("s", &[big(true), small.clone()]).unwrap();
        assert!(p.warnings("s").is_empty());
        // Another currency: no member of the amount family covers it.
        let mut usd = claims("sales", 25_000_000);
        usd.amount.as_mut().unwrap().currency = "USD".into();
        let why = p.match_rule(&usd).unwrap_err();
        assert!(why.contains("currency \"USD\""), "{why}");
        // No amount, where the family requires one.
        let mut none = claims("sales", 0);
        none.amount = None;
        let why = p.match_rule(&none).unwrap_err();
        assert!(why.contains("requires an amount"), "{why}");
        // Another document type is not in the family, and falls to no rule either way.
        let mut other = none.clone();
        other.doc.doc_type = "notice".into();
        assert!(p.match_rule(&other).is_err());
        // Without amount_required, leaving out the amount reaches the cheaper rule, and the
        // policy says so.
        let loose = SealPolicy::from_config("s", &[big(false), small]).unwrap();
        assert_eq!(loose.match_rule(&none), Ok(1));
        let w = loose.warnings("s");
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("amount_required"), "{w:?}");
    }

    #[test]
    fn a_rule_names_an_iso_4217_currency_and_requires_an_amount_only_with_bounds() {
        let bad = RuleConfig {
            currency: Some("cny".into()),
            ..rule(&["dept_head"], &[])
        };
        assert!(SealPolicy::from_config("s", &[bad]).is_err());
        let unbounded = RuleConfig {
            amount_required: true,
            ..rule(&["dept_head"], &[])
        };
        assert!(SealPolicy::from_config("s", &[unbounded]).is_err());
    }

    #[test]
    fn levels_in_order_pass_and_every_fault_has_its_reason() {
        let r = compile(rule(&["dept_head", "executive"], &["dept_head"]));
        let c = claims("sales", 1);
        let good = [
            fact("a", "dept_head", "sales", 10),
            fact("b", "executive", "board", 20),
        ];
        assert!(r.check_levels(&c, &good).is_empty());
        assert_eq!(
            reasons(&r.check_levels(&c, &good[..1])),
            [Reason::MissingLevel]
        );
        let reversed = [
            fact("a", "dept_head", "sales", 20),
            fact("b", "executive", "board", 10),
        ];
        assert_eq!(
            reasons(&r.check_levels(&c, &reversed)),
            [Reason::LevelOrder]
        );
        let wrong_dept = [
            fact("a", "dept_head", "finance", 10),
            fact("b", "executive", "board", 20),
        ];
        assert_eq!(
            reasons(&r.check_levels(&c, &wrong_dept)),
            [Reason::DepartmentMismatch]
        );
        // One approver cannot fill two levels of the same role.
        let twice = compile(rule(&["manager", "manager"], &[]));
        assert_eq!(
            reasons(&twice.check_levels(&c, &[fact("m", "manager", "x", 1)])),
            [Reason::MissingLevel]
        );
    }

    #[test]
    fn hours_follow_the_rules_time_zone() {
        let r = compile(RuleConfig {
            hours: Some("09:00-18:00".into()),
            timezone: "Asia/Shanghai".into(),
            weekdays: Some(vec![
                "mon".into(),
                "tue".into(),
                "wed".into(),
                "thu".into(),
                "fri".into(),
            ]),
            ..rule(&["x"], &[])
        });
        // 2026-11-24 (a Tuesday) 02:00 UTC is 10:00 in Shanghai.
        let t = "2026-11-24T02:00:00Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_second();
        assert!(r.check_hours(t).is_none());
        assert!(r.check_hours(t + 9 * 3600).is_some()); // 19:00
        assert!(r.check_hours(t + 4 * 86400).is_some()); // Saturday
    }

    #[test]
    fn rules_without_levels_are_refused() {
        assert!(SealPolicy::from_config("s", &[rule(&[], &[])]).is_err());
    }

    fn arb_facts() -> impl Strategy<Value = Vec<ApprovalFact>> {
        let roles = prop::sample::select(vec!["clerk", "dept_head", "finance", "executive"]);
        let depts = prop::sample::select(vec!["sales", "finance"]);
        prop::collection::vec((0u8..6, roles, depts, 0i64..100), 0..6).prop_map(|v| {
            v.into_iter()
                .map(|(who, role, dept, at)| fact(&format!("u{who}"), role, dept, at))
                .collect()
        })
    }

    proptest! {
        /// Taking away any approval never turns a refusal into a pass.
        #[test]
        fn removing_an_approval_never_grants(facts in arb_facts(), drop in 0usize..6) {
            let r = compile(rule(&["dept_head", "finance", "executive"], &["dept_head"]));
            let c = claims("sales", 1);
            // One approver, one role: keep the first fact per approver, as the trust store would.
            let mut seen = HashSet::new();
            let facts: Vec<_> = facts.into_iter().filter(|f| seen.insert(f.approver.clone())).collect();
            let denied = !r.check_levels(&c, &facts).is_empty();
            if denied && !facts.is_empty() {
                let mut fewer = facts.clone();
                fewer.remove(drop % facts.len());
                prop_assert!(!r.check_levels(&c, &fewer).is_empty());
            }
        }

        /// A higher level approved strictly before a lower one is always refused.
        #[test]
        fn reversed_levels_are_always_refused(t1 in 0i64..1000, gap in 1i64..1000) {
            let r = compile(rule(&["dept_head", "executive"], &[]));
            let c = claims("sales", 1);
            let facts = [fact("a", "dept_head", "sales", t1 + gap), fact("b", "executive", "x", t1)];
            prop_assert!(reasons(&r.check_levels(&c, &facts)).contains(&Reason::LevelOrder));
            let ordered = [fact("a", "dept_head", "sales", t1), fact("b", "executive", "x", t1 + gap)];
            prop_assert!(r.check_levels(&c, &ordered).is_empty());
        }
    }
}
