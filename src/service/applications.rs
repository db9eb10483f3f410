//! Applications: an approval token that waits for its approvers, who approve or reject it level
//! by level on the approval page (the console), in the order the seal's rule gives.
//!
//! The log is the applications' only store: `application.submitted` holds the token,
//! `application.approved` the token as it stands after each level, `application.rejected` who
//! refused it and why, and `application.pending` says which level waits (alert delivery sends
//! it to the approvers). The open ones are kept in memory, rebuilt from the log at start-up; a
//! closed one is read back from the log when asked for. Every step is durable before the
//! answer, and each approval is verified here (trust store, passkey checks, the rule's levels)
//! before it is recorded, so the page cannot add an approval the gate would not accept.
//!
//! Owns: SubmitApplication, ListApplications, FetchApplication, DecideApplication; who may send
//! each; the PDFs submitted with applications. Never: parses a PDF (the page checks and renders
//! it), or records a level out of order, by the applicant, or with a signature that does not
//! verify.

use super::caller::Caller;
use super::{off_executor, unix_now, Service, ServiceError};
use crate::approval::gate::{approvers_json, Rules};
use crate::approval::{evaluate_token, webauthn, Denial, Reason};
use crate::audit::{kind, Record};
use crate::protocol::{pb, response};
use crate::token::Token;
use std::collections::HashMap;

/// Open applications at most (a caller that floods submissions is answered Busy).
const MAX_OPEN: usize = 10_000;
/// The largest PDF kept with an application.
pub const MAX_DOCUMENT: usize = 768 * 1024;
/// The longest token accepted.
const MAX_TOKEN: usize = 64 * 1024;
/// Applications in one ListApplications answer at most (a frame holds them: a token is at most
/// 64 KiB, but one with two or three levels is a few).
const MAX_LIST: usize = 200;
/// A rejection's reason, in bytes.
const MAX_REASON: usize = 500;

/// What the log says of one application.
#[derive(Debug, Clone)]
pub(super) struct Application {
    id: String,
    token: String,
    caller: String,
    submitted_ms: i64,
    submitted_seq: u64,
    document: bool,
    state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Pending,
    Approved,
    Rejected { by: String, reason: String },
}

/// The open applications, by id.
#[derive(Default)]
pub(super) struct Applications {
    open: HashMap<String, Application>,
}

impl Applications {
    /// The open applications the log holds (start-up).
    pub(super) fn load(
        store: &crate::store::Store,
    ) -> Result<Applications, crate::store::StoreError> {
        let records = store.read(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {} FROM audit WHERE kind LIKE 'application.%' ORDER BY seq",
                crate::audit::query::record_columns()
            ))?;
            let rows = stmt.query_map([], crate::audit::query::record_from_row)?;
            rows.collect::<Result<Vec<_>, _>>()
        })?;
        let mut all: HashMap<String, Application> = HashMap::new();
        for r in &records {
            fold(&mut all, r);
        }
        all.retain(|_, a| a.state == State::Pending);
        Ok(Applications { open: all })
    }
}

/// Applies one application record to what is known.
fn fold(apps: &mut HashMap<String, Application>, r: &Record) {
    let detail: serde_json::Value = serde_json::from_str(&r.detail).unwrap_or_default();
    let text = |k: &str| detail[k].as_str().unwrap_or_default().to_owned();
    match r.kind.as_str() {
        kind::APPLICATION_SUBMITTED => {
            apps.insert(
                r.jti.clone(),
                Application {
                    id: r.jti.clone(),
                    token: text("token"),
                    caller: r.caller.clone(),
                    submitted_ms: r.at_ms,
                    submitted_seq: r.seq,
                    document: detail["document"].as_bool().unwrap_or(false),
                    state: State::Pending,
                },
            );
        }
        kind::APPLICATION_APPROVED => {
            if let Some(a) = apps.get_mut(&r.jti) {
                let token = text("token");
                if !token.is_empty() {
                    a.token = token;
                }
                if detail["complete"].as_bool().unwrap_or(false) {
                    a.state = State::Approved;
                }
            }
        }
        kind::APPLICATION_REJECTED => {
            if let Some(a) = apps.get_mut(&r.jti) {
                a.state = State::Rejected {
                    by: text("by"),
                    reason: text("reason"),
                };
            }
        }
        _ => {}
    }
}

/// Where an application's token stands against the seal's rule now.
struct Standing {
    token: Token,
    rule: Option<String>,
    levels: Vec<String>,
    approved: usize,
    /// The next level: its role, the department its approver must be from ("" if any), and
    /// whether a passkey must verify the user there.
    next: Option<(String, String, bool)>,
    approvers: String,
    /// Why the token cannot go on (a bad signature, an expired approval, a level out of order).
    blocked: Option<Denial>,
}

fn standing(token: &[u8], rules: &Rules, now: i64) -> Result<Standing, ServiceError> {
    let parsed = Token::parse_for_signing(token)
        .map_err(|e| ServiceError::Denied(Denial::new(Reason::Malformed, e.0)))?;
    let c = &parsed.claims;
    let policy = rules
        .policies
        .get(&c.seal)
        .ok_or_else(|| ServiceError::UnknownSeal(c.seal.clone()))?;
    let digest: [u8; 32] = hex::decode(&c.doc.sha256)
        .ok()
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| {
            ServiceError::Denied(Denial::new(
                Reason::Malformed,
                "doc.sha256 is not 64 hex digits",
            ))
        })?;
    let ev = evaluate_token(parsed.clone(), &c.seal, &digest, now, &rules.trust, policy);
    let mut blocked = ev
        .denials
        .iter()
        .find(|d| !matches!(d.reason, Reason::MissingLevel | Reason::OutsideHours))
        .cloned();
    let Some(i) = ev.rule else {
        return Ok(Standing {
            token: parsed,
            rule: None,
            levels: Vec::new(),
            approved: 0,
            next: None,
            approvers: String::new(),
            blocked: blocked.or_else(|| Some(Denial::new(Reason::NoRule, "no rule matches"))),
        });
    };
    let rule = &policy.rules[i];
    let approved = rule.levels_filled(c, &ev.approvals);
    if blocked.is_none() && ev.approvals.len() > approved {
        let stray: Vec<String> = ev
            .approvals
            .iter()
            .map(|a| format!("{} ({})", a.approver, a.role))
            .collect();
        blocked = Some(Denial::new(
            Reason::LevelOrder,
            format!(
                "levels are approved in order ({}); {} approved, of which only the first {approved} fill levels from the first",
                rule.levels.join(", "),
                stray.join(", ")
            ),
        ));
    }
    let next = rule.levels.get(approved).map(|role| {
        (
            role.clone(),
            if rule.department_scoped(role) {
                c.dept.clone()
            } else {
                String::new()
            },
            rule.needs_user_verification(role),
        )
    });
    Ok(Standing {
        approvers: approvers_json(&ev.approvals, Some(&rule.levels)),
        token: parsed,
        rule: Some(rule.name.clone()),
        levels: rule.levels.clone(),
        approved,
        next,
        blocked,
    })
}

impl Application {
    fn wire(&self, rules: &Rules, now: i64) -> pb::Application {
        let mut a = pb::Application {
            id: self.id.clone(),
            state: match self.state {
                State::Pending => "pending",
                State::Approved => "approved",
                State::Rejected { .. } => "rejected",
            }
            .into(),
            token: self.token.clone().into_bytes(),
            caller: self.caller.clone(),
            submitted_at_unix_ms: self.submitted_ms.max(0) as u64,
            submitted_seq: self.submitted_seq,
            has_document: self.document,
            ..Default::default()
        };
        if let State::Rejected { by, reason } = &self.state {
            a.rejected_by = by.clone();
            a.rejection = reason.clone();
        }
        if let Ok(s) = standing(self.token.as_bytes(), rules, now) {
            a.levels = s.levels;
            a.approved = s.approved as u32;
            a.rule = s.rule.unwrap_or_default();
            if self.state == State::Pending {
                if let Some((role, dept, uv)) = s.next {
                    a.next_role = role;
                    a.next_department = dept;
                    a.next_user_verification = uv;
                }
            }
        }
        a
    }
}

/// A record about application `s` (its claims filled in) by `caller`.
fn record_of(kind: &str, s: &Standing, caller: &Caller) -> Record {
    let c = &s.token.claims;
    let mut r = Record::new(kind);
    r.caller = caller.name.clone();
    r.seal = c.seal.clone();
    r.doc_sha256 = c.doc.sha256.clone();
    r.set_approval(&s.approvers, Some(c), s.rule.as_deref(), "");
    r
}

/// The `application.pending` record of the level `s` waits for, if any.
/// `page` is the approval page's origin (the first of `[webauthn] origins`): alert delivery
/// sends the approvers its link.
fn pending_record(
    s: &Standing,
    caller: &Caller,
    submitted_seq: u64,
    page: Option<&String>,
) -> Option<Record> {
    let (role, dept, _) = s.next.as_ref()?;
    let mut r = record_of(kind::APPLICATION_PENDING, s, caller);
    r.reason = role.clone();
    r.ref_seq = Some(submitted_seq);
    r.detail = serde_json::json!({
        "level": s.approved + 1,
        "role": role,
        "department": dept,
        "title": s.token.claims.doc.title,
        "link": page.map(|o| format!("{o}/approvals/{}", s.token.claims.jti)),
    })
    .to_string();
    Some(r)
}

fn must_oversee(caller: &Caller) -> Result<(), ServiceError> {
    if caller.oversight {
        Ok(())
    } else {
        Err(ServiceError::PermissionDenied(format!(
            "caller {:?} is not the approval page (oversight = true)",
            caller.name
        )))
    }
}

impl Service {
    pub(super) async fn submit_application(
        &self,
        caller: &Caller,
        req: pb::SubmitApplicationRequest,
    ) -> Result<response::Body, ServiceError> {
        if req.token.len() > MAX_TOKEN {
            return Err(ServiceError::InvalidArgument(format!(
                "the token is {} bytes; at most {MAX_TOKEN}",
                req.token.len()
            )));
        }
        if req.document_pdf.len() > MAX_DOCUMENT {
            return Err(ServiceError::InvalidArgument(format!(
                "the PDF is {} bytes; at most {MAX_DOCUMENT} are kept with an application",
                req.document_pdf.len()
            )));
        }
        if !req.document_pdf.is_empty() && !req.document_pdf.starts_with(b"%PDF-") {
            return Err(ServiceError::InvalidArgument(
                "document_pdf is not a PDF".into(),
            ));
        }
        let text = std::str::from_utf8(&req.token)
            .map_err(|_| ServiceError::InvalidArgument("the token is not UTF-8".into()))?
            .to_owned();
        let now = unix_now();
        let s = standing(text.as_bytes(), &self.gate.rules(), now)?;
        let c = &s.token.claims;
        self.seal_for(caller, &c.seal)?;
        if let Some(d) = s.blocked.clone() {
            return Err(ServiceError::Denied(d));
        }
        if s.next.is_none() {
            return Err(ServiceError::InvalidArgument(
                "every level of this approval is approved already; stamp with it".into(),
            ));
        }
        let id = c.jti.clone();
        let mut apps = self.applications.lock().await;
        if apps.open.len() >= MAX_OPEN {
            return Err(ServiceError::Busy(format!(
                "{MAX_OPEN} applications are open; decide some first"
            )));
        }
        if apps.open.contains_key(&id) || self.closed_application(&id).await?.is_some() {
            return Err(ServiceError::InvalidArgument(format!(
                "an application with id {id:?} exists; a new application needs a new jti"
            )));
        }
        let document = !req.document_pdf.is_empty();
        if document {
            let (jti, pdf) = (id.clone(), req.document_pdf);
            let gate = self.gate.clone();
            off_executor("document store", move || {
                gate.store.with(|c| {
                    c.execute(
                        "INSERT OR REPLACE INTO application_documents (jti, pdf, at) VALUES (?1, ?2, ?3)",
                        rusqlite::params![jti, pdf, crate::audit::now_ms()],
                    )
                    .map(|_| ())
                })
            })
            .await?
            .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))?;
        }
        let mut r = record_of(kind::APPLICATION_SUBMITTED, &s, caller);
        r.detail = serde_json::json!({ "token": text, "document": document }).to_string();
        let seq = self.audit.append(r).await?;
        // Open from the moment its record is durable, as a restart would find it.
        let app = Application {
            id: id.clone(),
            token: text,
            caller: caller.name.clone(),
            submitted_ms: crate::audit::now_ms(),
            submitted_seq: seq,
            document,
            state: State::Pending,
        };
        let wire = app.wire(&self.gate.rules(), now);
        apps.open.insert(id, app);
        if let Some(p) = pending_record(&s, caller, seq, self.gate.rules().trust.origins().first())
        {
            self.audit.append(p).await?;
        }
        Ok(response::Body::Application(pb::ApplicationResponse {
            application: Some(wire),
            document_pdf: Vec::new(),
        }))
    }

    pub(super) async fn list_applications(
        &self,
        caller: &Caller,
        req: pb::ListApplicationsRequest,
    ) -> Result<response::Body, ServiceError> {
        must_oversee(caller)?;
        let limit = match req.limit {
            0 => MAX_LIST,
            n => (n as usize).min(MAX_LIST),
        };
        let rules = self.gate.rules();
        let now = unix_now();
        let mut open: Vec<Application> = {
            let apps = self.applications.lock().await;
            apps.open.values().cloned().collect()
        };
        open.sort_by_key(|a| a.submitted_seq);
        let mut list = Vec::new();
        let mut more = false;
        for a in open {
            let w = a.wire(&rules, now);
            let wanted = req.role.is_empty()
                || (w.next_role == req.role
                    && (w.next_department.is_empty() || w.next_department == req.department));
            if !wanted {
                continue;
            }
            if list.len() == limit {
                more = true;
                break;
            }
            list.push(w);
        }
        Ok(response::Body::ListApplications(
            pb::ListApplicationsResponse {
                applications: list,
                more,
            },
        ))
    }

    pub(super) async fn fetch_application(
        &self,
        caller: &Caller,
        req: pb::FetchApplicationRequest,
    ) -> Result<response::Body, ServiceError> {
        let id = req.application_id;
        let open = self.applications.lock().await.open.get(&id).cloned();
        let app = match open {
            Some(a) => a,
            None => self
                .closed_application(&id)
                .await?
                .ok_or_else(|| ServiceError::InvalidArgument(format!("no application {id:?}")))?,
        };
        if !caller.oversight && caller.name != app.caller {
            return Err(ServiceError::PermissionDenied(format!(
                "application {id:?} was submitted by another caller"
            )));
        }
        let document_pdf = if req.document && app.document {
            must_oversee(caller)?;
            let gate = self.gate.clone();
            off_executor("document read", move || {
                gate.store.read(|c| {
                    use rusqlite::OptionalExtension;
                    c.query_row(
                        "SELECT pdf FROM application_documents WHERE jti = ?1",
                        [&id],
                        |r| r.get::<_, Vec<u8>>(0),
                    )
                    .optional()
                })
            })
            .await?
            .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))?
            .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(response::Body::Application(pb::ApplicationResponse {
            application: Some(app.wire(&self.gate.rules(), unix_now())),
            document_pdf,
        }))
    }

    pub(super) async fn decide_application(
        &self,
        caller: &Caller,
        req: pb::DecideApplicationRequest,
    ) -> Result<response::Body, ServiceError> {
        must_oversee(caller)?;
        if req.signature.len() > MAX_TOKEN || req.reject_reason.len() > MAX_REASON {
            return Err(ServiceError::InvalidArgument(format!(
                "the signature may be {MAX_TOKEN} bytes and the reason {MAX_REASON}"
            )));
        }
        let entry: serde_json::Value = serde_json::from_slice(&req.signature).map_err(|e| {
            ServiceError::InvalidArgument(format!("the signature entry is not JSON: {e}"))
        })?;
        let id = req.application_id;
        let mut apps = self.applications.lock().await;
        let Some(app) = apps.open.get(&id).cloned() else {
            return Err(ServiceError::InvalidArgument(
                match self.closed_application(&id).await? {
                    Some(a) => format!(
                        "application {id:?} is {} already",
                        if a.state == State::Approved {
                            "approved"
                        } else {
                            "rejected"
                        }
                    ),
                    None => format!("no application {id:?}"),
                },
            ));
        };
        let rules = self.gate.rules();
        let now = unix_now();
        let before = standing(app.token.as_bytes(), &rules, now)?;
        if let Some(d) = before.blocked {
            return Err(ServiceError::Denied(d));
        }
        let Some((role, dept, needs_uv)) = before.next.clone() else {
            return Err(ServiceError::InvalidArgument(format!(
                "application {id:?} waits for no level"
            )));
        };
        let mut whole: serde_json::Value = serde_json::from_str(&app.token)
            .map_err(|e| ServiceError::Internal(format!("an application's token: {e}")))?;
        whole["signatures"]
            .as_array_mut()
            .ok_or_else(|| {
                ServiceError::Internal("an application's token has no signatures".into())
            })?
            .push(entry);
        let text = whole.to_string();

        if !req.reject_reason.is_empty() {
            let by = self.check_rejection(
                &text,
                &req.reject_reason,
                &rules,
                &role,
                &dept,
                needs_uv,
                &before,
            )?;
            let mut r = record_of(kind::APPLICATION_REJECTED, &before, caller);
            r.reason = "rejected".into();
            r.ref_seq = Some(app.submitted_seq);
            r.detail = serde_json::json!({
                "by": by,
                "level": before.approved + 1,
                "role": role,
                "reason": req.reject_reason,
                "signature": String::from_utf8_lossy(&req.signature),
            })
            .to_string();
            self.audit.append(r).await?;
            let mut closed = app;
            closed.state = State::Rejected {
                by,
                reason: req.reject_reason,
            };
            apps.open.remove(&id);
            return Ok(response::Body::Application(pb::ApplicationResponse {
                application: Some(closed.wire(&rules, now)),
                document_pdf: Vec::new(),
            }));
        }

        let after = standing(text.as_bytes(), &rules, now)?;
        if let Some(d) = after.blocked.clone() {
            return Err(ServiceError::Denied(d));
        }
        if after.approved != before.approved + 1 {
            let kid = after
                .token
                .signatures
                .last()
                .map(|s| s.header.kid.clone())
                .unwrap_or_default();
            return Err(ServiceError::Denied(Denial::new(
                Reason::LevelOrder,
                format!(
                    "level {} waits for a {role}{}; {kid:?} does not fill it",
                    before.approved + 1,
                    if dept.is_empty() {
                        String::new()
                    } else {
                        format!(" of {dept:?}")
                    }
                ),
            )));
        }
        let complete = after.next.is_none();
        let mut r = record_of(kind::APPLICATION_APPROVED, &after, caller);
        r.ref_seq = Some(app.submitted_seq);
        r.detail = serde_json::json!({
            "token": text,
            "level": after.approved,
            "role": role,
            "complete": complete,
        })
        .to_string();
        self.audit.append(r).await?;
        let mut updated = app;
        updated.token = text;
        if complete {
            updated.state = State::Approved;
            apps.open.remove(&id);
        } else {
            apps.open.insert(id, updated.clone());
        }
        if let Some(p) = pending_record(
            &after,
            caller,
            updated.submitted_seq,
            rules.trust.origins().first(),
        ) {
            self.audit.append(p).await?;
        }
        Ok(response::Body::Application(pb::ApplicationResponse {
            application: Some(updated.wire(&rules, now)),
            document_pdf: Vec::new(),
        }))
    }

    /// Checks a rejection: the last signature of `text` is a passkey's assertion, over the
    /// rejection's challenge with `reason`, by an approver who could fill the waiting level.
    /// Returns the approver.
    #[allow(clippy::too_many_arguments)]
    fn check_rejection(
        &self,
        text: &str,
        reason: &str,
        rules: &Rules,
        role: &str,
        dept: &str,
        needs_uv: bool,
        before: &Standing,
    ) -> Result<String, ServiceError> {
        let denied = |r: Reason, d: String| ServiceError::Denied(Denial::new(r, d));
        let token = Token::parse_for_signing(text.as_bytes())
            .map_err(|e| denied(Reason::Malformed, e.0))?;
        let i = token.signatures.len() - 1;
        let sig = &token.signatures[i];
        let kid = sig.header.kid.clone();
        let Some(a) = &sig.assertion else {
            return Err(ServiceError::InvalidArgument(
                "a rejection is made with a passkey".into(),
            ));
        };
        let approver = rules.trust.get(&kid).ok_or_else(|| {
            denied(
                Reason::UnknownApprover,
                format!("no approver {kid:?} in the trust store"),
            )
        })?;
        let now = unix_now();
        let active = |t: i64| {
            approver.valid_from.is_none_or(|f| t >= f)
                && approver.valid_until.is_none_or(|u| t <= u)
        };
        if approver.revoked || !active(now) {
            return Err(denied(
                Reason::ApproverRevoked,
                format!("approver {kid:?} is revoked or outside their validity window"),
            ));
        }
        let applicant =
            crate::approval::normalize_id(&before.token.claims.applicant).unwrap_or_default();
        if approver.id == applicant || approver.normal_name.as_deref() == Some(applicant.as_str()) {
            return Err(denied(
                Reason::SelfApproval,
                format!("{kid:?} applied for this approval"),
            ));
        }
        if approver.role != role || (!dept.is_empty() && approver.department != dept) {
            return Err(denied(
                Reason::LevelOrder,
                format!(
                    "level {} waits for a {role}; {kid:?} ({}, {}) cannot decide it",
                    before.approved + 1,
                    approver.role,
                    approver.department
                ),
            ));
        }
        let passkey = approver
            .passkeys
            .iter()
            .find(|p| p.credential_id == a.credential_id)
            .ok_or_else(|| {
                denied(
                    Reason::UnknownCredential,
                    format!("approver {kid:?} has registered no such passkey"),
                )
            })?;
        webauthn::check_with(
            &token,
            i,
            &token.rejection_challenge(i, reason),
            passkey,
            rules.trust.origins(),
            needs_uv,
            |f| f(),
        )
        .map_err(ServiceError::Denied)?;
        Ok(kid)
    }

    /// A closed application, read back from its records.
    async fn closed_application(&self, id: &str) -> Result<Option<Application>, ServiceError> {
        let gate = self.gate.clone();
        let jti = id.to_owned();
        let records = off_executor("application look-up", move || {
            gate.store.read(|c| {
                let mut stmt = c.prepare_cached(&format!(
                    "SELECT {} FROM audit WHERE jti = ?1 AND kind LIKE 'application.%' ORDER BY seq",
                    crate::audit::query::record_columns()
                ))?;
                let rows = stmt.query_map([&jti], crate::audit::query::record_from_row)?;
                rows.collect::<Result<Vec<_>, _>>()
            })
        })
        .await?
        .map_err(|e| ServiceError::AuditUnavailable(e.to_string()))?;
        let mut apps = HashMap::new();
        for r in &records {
            fold(&mut apps, r);
        }
        Ok(apps.remove(id))
    }
}
