//! The approval page: approvers register a passkey after an administrator's invitation, sign
//! in with it, see what waits for their level (the document's facts, its digest and, for a
//! prepared PDF, its first page with the seal in place), and approve or reject with the passkey.
//!
//! The page decides nothing: each approval or rejection is a WebAuthn assertion whose challenge
//! binds the token (or the rejection and its reason), which the daemon verifies against its
//! trust store and the seal's rule before it records it (`service::applications`). A passkey
//! registered here counts for approvals only once an administrator adds the trust-store entry
//! the page shows (and the record `console.passkey_registered` holds) to the daemon's
//! configuration and reloads it: never silently.
//!
//! Owns: the approvers file (invitations, registered passkeys), registration checks, approver
//! sessions (separate from auditors'), and the pages. Never: keeps a session or invitation
//! token in clear, or shows an application to an approver whose level is not next.

use super::pages::Lang;
use super::web::{cookie, lang_of, page, set_cookie, App};
use super::ConsoleError;
use crate::approval::webauthn::{self, Passkey, PasskeyKey};
use crate::audit::{kind, now_ms};
use crate::protocol::{pb, request, response};
use crate::token::{Assertion, JwsAlg, Token};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use maud::{html, Markup, DOCTYPE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const APPROVER_COOKIE: &str = "sg_approver";
/// How long a challenge handed to the browser stays good.
const CHALLENGE_MS: i64 = 300_000;
/// Challenges outstanding at most (older ones are dropped first).
const MAX_CHALLENGES: usize = 10_000;

/// `[approvals]` of the console's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// The relying party id passkeys are registered for: the page's host name (e.g.
    /// "approvals.example.com"; not an IP address, which WebAuthn does not allow).
    pub rp_id: String,
    /// The page's origin exactly as browsers write it ("https://approvals.example.com"); the
    /// daemon's `[webauthn] origins` must list it.
    pub origin: String,
    /// The approvers file: invitations and registered passkeys (written by the console and by
    /// `sealgate-console invite`; mode 0600).
    pub approvers: PathBuf,
}

/// One `[[approver]]` of the approvers file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverEntry {
    /// The approver's id in the daemon's trust store.
    pub id: String,
    /// Their role and department there (which applications the page shows them).
    pub role: String,
    #[serde(default)]
    pub department: String,
    /// An open invitation: the SHA-256 (hex) of its token, and when it lapses (ms).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub invite_sha256: String,
    #[serde(default)]
    pub invite_expires_ms: i64,
    #[serde(default, rename = "passkey")]
    pub passkeys: Vec<RegisteredPasskey>,
}

/// A passkey registered at the page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisteredPasskey {
    /// base64url, as the trust store writes them.
    pub credential_id: String,
    pub public_key: String,
    pub alg: String,
    pub rp_id: String,
    pub attestation: String,
    pub registered_ms: i64,
}

impl RegisteredPasskey {
    /// The entry to add to the daemon's configuration under the approver's `[[approver]]`.
    pub fn trust_store_entry(&self) -> String {
        format!(
            "[[approver.passkey]]\ncredential_id = \"{}\"\npublic_key = \"{}\"\nrp_id = \"{}\"\nattestation = \"{}\"\n",
            self.credential_id, self.public_key, self.rp_id, self.attestation
        )
    }

    fn passkey(&self) -> Option<Passkey> {
        let key = PasskeyKey::from_cose(&B64.decode(&self.public_key).ok()?).ok()?;
        Some(Passkey::new(
            B64.decode(&self.credential_id).ok()?,
            key,
            self.rp_id.clone(),
            self.attestation.clone(),
        ))
    }
}

/// The approvers file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApproverFile {
    #[serde(default, rename = "approver")]
    pub approvers: Vec<ApproverEntry>,
}

impl ApproverFile {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &std::path::Path) -> Result<ApproverFile, ConsoleError> {
        let bad = |detail: String| ConsoleError::Config {
            path: path.display().to_string(),
            detail,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| bad(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ApproverFile::default()),
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// Writes the file whole, mode 0600 (a temporary file renamed over it).
    pub fn save(&self, path: &std::path::Path) -> Result<(), ConsoleError> {
        let text = toml::to_string(self).map_err(|e| ConsoleError::Config {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        super::write_private(path, &text)
    }

    fn get(&self, id: &str) -> Option<&ApproverEntry> {
        self.approvers.iter().find(|a| a.id == id)
    }
}

/// `sealgate-console invite`: opens (or renews) an invitation for approver `id`; returns the
/// link to send them.
pub fn invite(
    config: &ApprovalsConfig,
    id: &str,
    role: &str,
    department: &str,
    hours: u64,
) -> Result<String, ConsoleError> {
    crate::approval::normalize_id(id).map_err(|e| ConsoleError::Config {
        path: config.approvers.display().to_string(),
        detail: format!("approver id {id:?}: {e}"),
    })?;
    let mut file = ApproverFile::load(&config.approvers)?;
    let token = random_token();
    let entry = match file.approvers.iter_mut().find(|a| a.id == id) {
        Some(e) => e,
        None => {
            file.approvers.push(ApproverEntry {
                id: id.into(),
                ..Default::default()
            });
            file.approvers.last_mut().expect("pushed")
        }
    };
    entry.role = role.into();
    entry.department = department.into();
    entry.invite_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    entry.invite_expires_ms = now_ms() + (hours.min(24 * 30) as i64) * 3_600_000;
    file.save(&config.approvers)?;
    Ok(format!("{}/register?invite={token}", config.origin))
}

fn random_token() -> String {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).expect("the operating system's random source");
    B64.encode(raw)
}

/// What a registration proved.
#[derive(Debug)]
pub struct Registration {
    pub passkey: RegisteredPasskey,
    pub user_verified: bool,
}

/// Checks a `navigator.credentials.create()` answer (WebAuthn §7.1): the client data is a
/// creation for `challenge` at `origin`; the attestation object's authenticator data is for
/// `rp_id`, with the user present and verified and a credential attested; its key is ES256 or
/// EdDSA. The attestation statement's format is kept for the record (the page asks for none;
/// trust in the authenticator comes from the administrator who adds it, not from a vendor CA).
pub fn check_registration(
    client_data_json: &[u8],
    attestation_object: &[u8],
    challenge: &[u8; 32],
    origin: &str,
    rp_id: &str,
) -> Result<Registration, String> {
    use coset::cbor::value::Value;
    let c: webauthn::ClientData =
        serde_json::from_slice(client_data_json).map_err(|e| format!("client data: {e}"))?;
    if c.kind != "webauthn.create" {
        return Err(format!(
            "client data type {:?} is not webauthn.create",
            c.kind
        ));
    }
    if B64.decode(c.challenge.as_bytes()).ok().as_deref() != Some(&challenge[..]) {
        return Err("the registration answers another challenge".into());
    }
    if c.origin != origin || c.cross_origin {
        return Err(format!("the registration comes from origin {:?}", c.origin));
    }
    let object: Value = coset::cbor::de::from_reader(attestation_object)
        .map_err(|e| format!("attestation object: {e}"))?;
    let Value::Map(fields) = object else {
        return Err("the attestation object is not a map".into());
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == name))
            .map(|(_, v)| v)
    };
    let fmt = match field("fmt") {
        Some(Value::Text(t)) if !t.is_empty() && t.len() <= 32 => t.clone(),
        _ => return Err("the attestation object has no fmt".into()),
    };
    let Some(Value::Bytes(auth)) = field("authData") else {
        return Err("the attestation object has no authData".into());
    };
    if auth.len() < 55 {
        return Err(format!("authenticator data of {} bytes", auth.len()));
    }
    if auth[..32] != Sha256::digest(rp_id.as_bytes())[..] {
        return Err(format!(
            "the credential is for another relying party than {rp_id:?}"
        ));
    }
    let flags = auth[32];
    if flags & 0x01 == 0 {
        return Err("the authenticator did not confirm the user's presence".into());
    }
    if flags & 0x04 == 0 {
        return Err("the authenticator did not verify the user (fingerprint, face or PIN)".into());
    }
    if flags & 0x40 == 0 {
        return Err("no credential was attested".into());
    }
    let id_len = u16::from_be_bytes([auth[53], auth[54]]) as usize;
    if id_len == 0 || id_len > 1023 || auth.len() < 55 + id_len + 1 {
        return Err(format!("a credential id of {id_len} bytes"));
    }
    let credential_id = &auth[55..55 + id_len];
    let key_start = 55 + id_len;
    let mut rest: &[u8] = &auth[key_start..];
    let _: Value =
        coset::cbor::de::from_reader(&mut rest).map_err(|e| format!("credential key: {e}"))?;
    let key_bytes = &auth[key_start..auth.len() - rest.len()];
    let key = PasskeyKey::from_cose(key_bytes)?;
    Ok(Registration {
        passkey: RegisteredPasskey {
            credential_id: B64.encode(credential_id),
            public_key: B64.encode(key_bytes),
            alg: match key.alg() {
                JwsAlg::ES256 => "ES256",
                JwsAlg::EdDSA => "EdDSA",
            }
            .into(),
            rp_id: rp_id.into(),
            attestation: fmt,
            registered_ms: now_ms(),
        },
        user_verified: true,
    })
}

/// A signed-in approver.
#[derive(Debug, Clone)]
pub struct ApproverSession {
    pub id: String,
    pub csrf: String,
    started_ms: i64,
    last_ms: i64,
}

/// The page's state: its configuration, challenges handed out, approvers' sessions and the
/// first pages rendered.
pub struct Approvals {
    pub config: ApprovalsConfig,
    challenges: Mutex<HashMap<[u8; 32], (String, i64)>>,
    sessions: Mutex<HashMap<[u8; 32], ApproverSession>>,
    pages: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    session_ms: i64,
    idle_ms: i64,
}

impl Approvals {
    pub fn new(config: ApprovalsConfig, session_ms: i64, idle_ms: i64) -> Approvals {
        Approvals {
            config,
            challenges: Default::default(),
            sessions: Default::default(),
            pages: Default::default(),
            session_ms,
            idle_ms,
        }
    }

    fn file(&self) -> Result<ApproverFile, ConsoleError> {
        ApproverFile::load(&self.config.approvers)
    }

    /// A fresh challenge for `purpose` ("register:ID" or "login:ID").
    fn challenge(&self, purpose: String) -> [u8; 32] {
        let mut c = [0u8; 32];
        getrandom::fill(&mut c).expect("the operating system's random source");
        let now = now_ms();
        let mut map = self.challenges.lock().expect("challenges");
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MAX_CHALLENGES {
            if let Some(k) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                map.remove(&k);
            }
        }
        map.insert(c, (purpose, now + CHALLENGE_MS));
        c
    }

    /// Spends the challenge the browser answered (found in its client data), if it was handed
    /// out for `purpose` and is still good.
    fn spend(&self, client_data_json: &[u8], purpose: &str) -> Option<[u8; 32]> {
        #[derive(Deserialize)]
        struct C {
            challenge: String,
        }
        let c: C = serde_json::from_slice(client_data_json).ok()?;
        let c: [u8; 32] = B64.decode(c.challenge).ok()?.try_into().ok()?;
        let (p, until) = self.challenges.lock().expect("challenges").remove(&c)?;
        (p == purpose && until > now_ms()).then_some(c)
    }

    fn session(&self, headers: &HeaderMap) -> Option<ApproverSession> {
        let token = cookie(headers, APPROVER_COOKIE)?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_ms();
        let mut map = self.sessions.lock().expect("sessions");
        let s = map.get_mut(&key)?;
        if now - s.started_ms >= self.session_ms || now - s.last_ms >= self.idle_ms {
            map.remove(&key);
            return None;
        }
        s.last_ms = now;
        Some(s.clone())
    }

    fn open_session(&self, id: &str) -> String {
        let token = random_token();
        let now = now_ms();
        let mut map = self.sessions.lock().expect("sessions");
        map.retain(|_, s| now - s.started_ms < self.session_ms && now - s.last_ms < self.idle_ms);
        if map.len() >= 10_000 {
            map.clear();
        }
        map.insert(
            Sha256::digest(token.as_bytes()).into(),
            ApproverSession {
                id: id.into(),
                csrf: random_token(),
                started_ms: now,
                last_ms: now,
            },
        );
        token
    }
}

/// The routes of the approval page.
pub fn router() -> Router<Arc<App>> {
    Router::new()
        .route("/register", get(register_page).post(register))
        .route("/approvals/login", get(login_page))
        .route("/approvals/login/options", post(login_options))
        .route("/approvals/login/finish", post(login_finish))
        .route("/approvals", get(list))
        .route("/approvals/{id}", get(show))
        .route("/approvals/{id}/page.png", get(first_page))
        .route("/approvals/{id}/challenge", post(decision_challenge))
        .route("/approvals/{id}/decide", post(decide))
}

// The refusal is the handler's answer as it stands (axum's own extractors do the same).
#[allow(clippy::result_large_err)]
fn approvals(app: &App) -> Result<&Approvals, Response> {
    app.approvals
        .as_ref()
        .ok_or_else(|| StatusCode::NOT_FOUND.into_response())
}

fn tr(lang: Lang, zh: &'static str, en: &'static str) -> &'static str {
    if lang == Lang::Zh {
        zh
    } else {
        en
    }
}

fn layout(lang: Lang, site: &str, who: Option<&str>, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang=(if lang == Lang::Zh { "zh-CN" } else { "en" }) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · " (tr(lang, "用印审批", "Seal approvals")) }
                link rel="stylesheet" href="/assets/console.css";
            }
            body {
                header {
                    strong { (tr(lang, "用印审批", "Seal approvals")) }
                    span.site { (site) }
                    @if let Some(w) = who {
                        nav { a href="/approvals" { (tr(lang, "待我审批", "Waiting for me")) } }
                        span.user id="approver" { (w) }
                    }
                    span.lang { a href="?lang=zh" { "中文" } " | " a href="?lang=en" { "English" } }
                }
                main { (body) }
                script src="/assets/approvals.js" {}
            }
        }
    }
}

/// A JSON answer to the page's script.
fn answer(status: StatusCode, v: serde_json::Value) -> Response {
    (status, Json(v)).into_response()
}

fn refused(status: StatusCode, reason: &str, message: &str) -> Response {
    answer(
        status,
        serde_json::json!({ "ok": false, "reason": reason, "message": message }),
    )
}

/// A POST from the page's own script: the approver session's CSRF token and, when the
/// browser names it, this page's origin.
fn same_origin(app: &Approvals, headers: &HeaderMap, csrf: Option<(&str, &str)>) -> bool {
    let origin_ok = headers
        .get(header::ORIGIN)
        .is_none_or(|o| o.to_str().ok() == Some(app.config.origin.as_str()));
    let csrf_ok = csrf.is_none_or(|(sent, want)| !sent.is_empty() && sent == want);
    origin_ok && csrf_ok
}

/// A POST of the page's script before sign-in (registration, sign-in): the page is configured,
/// the browser's origin is the page's, and the approvers file as it stands.
#[allow(clippy::result_large_err)]
fn script_post<'a>(
    app: &'a App,
    headers: &HeaderMap,
) -> Result<(&'a Approvals, ApproverFile), Response> {
    let a = approvals(app)?;
    if !same_origin(a, headers, None) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "origin",
            "not from this page",
        ));
    }
    let file = a.file().map_err(|e| {
        refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "approvers",
            &e.to_string(),
        )
    })?;
    Ok((a, file))
}

#[derive(Deserialize)]
struct InviteQuery {
    #[serde(default)]
    invite: String,
}

/// The approver an invitation token is for, if it is open.
fn invited(file: &ApproverFile, token: &str) -> Option<ApproverEntry> {
    let h = hex::encode(Sha256::digest(token.as_bytes()));
    file.approvers
        .iter()
        .find(|a| !a.invite_sha256.is_empty() && a.invite_sha256 == h)
        .filter(|a| a.invite_expires_ms > now_ms())
        .cloned()
}

async fn register_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<InviteQuery>,
) -> Response {
    let a = match approvals(&app) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let lang = lang_of(&headers);
    let file = match a.file() {
        Ok(f) => f,
        Err(e) => return failed(&app, lang, &e),
    };
    let Some(who) = invited(&file, &q.invite) else {
        return page(
            StatusCode::FORBIDDEN,
            layout(
                lang,
                &app.site,
                None,
                "",
                html! {
                    h1 { (tr(lang, "邀请无效", "No such invitation")) }
                    p.error { (tr(lang, "此邀请链接无效或已过期，请向管理员重新申请。", "This invitation is unknown or has lapsed; ask the administrator for a new one.")) }
                },
            ),
        );
    };
    let challenge = a.challenge(format!("register:{}", who.id));
    let user_handle: [u8; 16] = Sha256::digest(who.id.as_bytes())[..16]
        .try_into()
        .expect("16 bytes");
    let options = serde_json::json!({
        "challenge": B64.encode(challenge),
        "rp": { "id": a.config.rp_id, "name": format!("sealgate {}", app.site) },
        "user": { "id": B64.encode(user_handle), "name": who.id, "displayName": who.id },
        "exclude": who.passkeys.iter().map(|p| p.credential_id.clone()).collect::<Vec<_>>(),
        "invite": q.invite,
    });
    page(
        StatusCode::OK,
        layout(
            lang,
            &app.site,
            None,
            tr(lang, "注册通行密钥", "Register a passkey"),
            html! {
                h1 { (tr(lang, "注册通行密钥", "Register a passkey")) }
                p { (tr(lang, "审批人", "Approver")) ": " strong id="register-who" { (who.id) } " (" (who.role) " " (who.department) ")" }
                p.small { (tr(lang, "通行密钥保存在您的手机或安全密钥中，私钥不会离开设备；每次审批都需要指纹、面容或 PIN 验证。", "The passkey lives on your phone or security key; its private key never leaves it, and each approval asks for your fingerprint, face or PIN.")) }
                div id="register" data-options=(options.to_string()) {
                    button id="register-button" type="button" { (tr(lang, "注册", "Register")) }
                }
                p id="register-result" {}
                pre id="register-entry" hidden {}
            },
        ),
    )
}

#[derive(Deserialize)]
struct RegisterForm {
    invite: String,
    #[serde(rename = "clientDataJSON")]
    client_data_json: String,
    #[serde(rename = "attestationObject")]
    attestation_object: String,
}

async fn register(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Json(form): Json<RegisterForm>,
) -> Response {
    let (a, file) = match script_post(&app, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(who) = invited(&file, &form.invite) else {
        return refused(
            StatusCode::FORBIDDEN,
            "invitation",
            "the invitation is unknown or has lapsed",
        );
    };
    let (Ok(client), Ok(object)) = (
        B64.decode(&form.client_data_json),
        B64.decode(&form.attestation_object),
    ) else {
        return refused(StatusCode::BAD_REQUEST, "malformed", "not base64url");
    };
    let Some(challenge) = a.spend(&client, &format!("register:{}", who.id)) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "challenge",
            "the challenge is unknown or has lapsed; load the page again",
        );
    };
    let reg = match check_registration(
        &client,
        &object,
        &challenge,
        &a.config.origin,
        &a.config.rp_id,
    ) {
        Ok(r) => r,
        Err(why) => {
            tracing::info!(approver = who.id, why, "a registration was refused");
            return refused(StatusCode::BAD_REQUEST, "registration", &why);
        }
    };
    let entry = reg.passkey.trust_store_entry();
    let detail = serde_json::json!({
        "credential_id": reg.passkey.credential_id,
        "alg": reg.passkey.alg,
        "rp_id": reg.passkey.rp_id,
        "attestation": reg.passkey.attestation,
        "trust_store_entry": entry,
    })
    .to_string();
    // Recorded first: a registration the log does not hold did not happen.
    if let Err(e) = app
        .recorder
        .record(kind::CONSOLE_PASSKEY_REGISTERED, &who.id, &detail, "", None)
        .await
    {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "unrecorded",
            &e.to_string(),
        );
    }
    let mut file = match a.file() {
        Ok(f) => f,
        Err(e) => {
            return refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "approvers",
                &e.to_string(),
            )
        }
    };
    if let Some(e) = file.approvers.iter_mut().find(|e| e.id == who.id) {
        e.invite_sha256.clear();
        e.invite_expires_ms = 0;
        e.passkeys.push(reg.passkey.clone());
    }
    if let Err(e) = file.save(&a.config.approvers) {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "approvers",
            &e.to_string(),
        );
    }
    tracing::info!(
        approver = who.id,
        credential = reg.passkey.credential_id,
        "passkey registered"
    );
    answer(
        StatusCode::OK,
        serde_json::json!({
            "ok": true,
            "approver": who.id,
            "role": who.role,
            "department": who.department,
            "credential_id": reg.passkey.credential_id,
            "trust_store_entry": entry,
        }),
    )
}

async fn login_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(r) = approvals(&app) {
        return r;
    }
    let lang = lang_of(&headers);
    page(
        StatusCode::OK,
        layout(
            lang,
            &app.site,
            None,
            tr(lang, "登录", "Sign in"),
            html! {
                form.login id="approver-login" {
                    h1 { (tr(lang, "审批人登录", "Approvers sign in")) }
                    label { (tr(lang, "审批人", "Approver")) input name="approver" id="approver-id" autocomplete="username webauthn" required; }
                    button type="submit" id="approver-login-button" { (tr(lang, "用通行密钥登录", "Sign in with your passkey")) }
                    p.error id="login-error" {}
                }
            },
        ),
    )
}

#[derive(Deserialize)]
struct LoginOptionsForm {
    approver: String,
}

async fn login_options(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Json(form): Json<LoginOptionsForm>,
) -> Response {
    let (a, file) = match script_post(&app, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    // An unknown name gets a challenge too (with no credentials), so the answer does not say
    // who is an approver.
    let allow: Vec<String> = file
        .get(&form.approver)
        .map(|e| e.passkeys.iter().map(|p| p.credential_id.clone()).collect())
        .unwrap_or_default();
    let challenge = a.challenge(format!("login:{}", form.approver));
    answer(
        StatusCode::OK,
        serde_json::json!({ "challenge": B64.encode(challenge), "rpId": a.config.rp_id, "allow": allow }),
    )
}

#[derive(Deserialize)]
struct AssertionForm {
    #[serde(default)]
    approver: String,
    credential: String,
    #[serde(rename = "authenticatorData")]
    authenticator_data: String,
    #[serde(rename = "clientDataJSON")]
    client_data_json: String,
    signature: String,
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    protected: String,
    #[serde(default)]
    reason: String,
}

impl AssertionForm {
    fn assertion(&self) -> Option<(Assertion, Vec<u8>)> {
        Some((
            Assertion {
                credential_id: B64.decode(&self.credential).ok()?,
                authenticator_data: B64.decode(&self.authenticator_data).ok()?,
                client_data_json: B64.decode(&self.client_data_json).ok()?,
            },
            B64.decode(&self.signature).ok()?,
        ))
    }
}

async fn login_finish(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Json(form): Json<AssertionForm>,
) -> Response {
    let (a, file) = match script_post(&app, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let name: String = form.approver.chars().take(64).collect();
    let fail = |why: &'static str| login_refused(&app, name.clone(), why);
    let Some((assertion, signature)) = form.assertion() else {
        return fail("malformed").await;
    };
    let Some(challenge) = a.spend(
        &assertion.client_data_json,
        &format!("login:{}", form.approver),
    ) else {
        return fail("challenge").await;
    };
    let Some(who) = file.get(&form.approver) else {
        return fail("unknown_user").await;
    };
    let Some((registered, passkey)) = who
        .passkeys
        .iter()
        .find(|p| {
            B64.decode(&p.credential_id).ok().as_deref() == Some(&assertion.credential_id[..])
        })
        .and_then(|p| Some((p, p.passkey()?)))
    else {
        return fail("unknown_credential").await;
    };
    let alg = if registered.alg == "EdDSA" {
        JwsAlg::EdDSA
    } else {
        JwsAlg::ES256
    };
    if let Err(d) = webauthn::check_assertion(
        &who.id,
        alg,
        &assertion,
        &signature,
        &challenge,
        &passkey,
        std::slice::from_ref(&a.config.origin),
        true,
        |f| f(),
    ) {
        tracing::info!(
            approver = who.id,
            reason = d.reason.code(),
            "an approver's sign-in was refused"
        );
        return fail(d.reason.code()).await;
    }
    if let Err(e) = app
        .recorder
        .record(
            kind::CONSOLE_LOGIN,
            &who.id,
            "approval page, passkey",
            "",
            None,
        )
        .await
    {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "unrecorded",
            &e.to_string(),
        );
    }
    let token = a.open_session(&who.id);
    let mut r = answer(StatusCode::OK, serde_json::json!({ "ok": true }));
    set_cookie(&mut r, &format!("{APPROVER_COOKIE}={token}"));
    r
}

/// A POST of the page's script from a signed-in approver: their session's CSRF token and the
/// page's origin; the page and the approver's entry.
#[allow(clippy::result_large_err)]
fn signed_in_post<'a>(
    app: &'a App,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(&'a Approvals, ApproverEntry), Response> {
    let (s, who) = signed_in(app, headers)
        .map_err(|_| refused(StatusCode::UNAUTHORIZED, "session", "sign in again"))?;
    let a = approvals(app)?;
    if !same_origin(a, headers, Some((csrf, &s.csrf))) {
        return Err(refused(StatusCode::FORBIDDEN, "csrf", "not from this page"));
    }
    Ok((a, who))
}

/// A refused sign-in: recorded (with why), and answered without saying why.
async fn login_refused(app: &App, name: String, why: &'static str) -> Response {
    if let Err(e) = app
        .recorder
        .record(
            kind::CONSOLE_LOGIN_FAILED,
            &name,
            "approval page, passkey",
            why,
            None,
        )
        .await
    {
        tracing::warn!(error = %e, "a refused login could not be recorded");
    }
    refused(
        StatusCode::UNAUTHORIZED,
        "refused",
        "the passkey was not accepted",
    )
}

/// The approver behind a request, with their entry in the approvers file.
#[allow(clippy::result_large_err)]
fn signed_in(app: &App, headers: &HeaderMap) -> Result<(ApproverSession, ApproverEntry), Response> {
    let a = approvals(app)?;
    let s = a
        .session(headers)
        .ok_or_else(|| Redirect::to("/approvals/login").into_response())?;
    let file = a.file().map_err(|e| failed(app, lang_of(headers), &e))?;
    let entry = file
        .get(&s.id)
        .cloned()
        .ok_or_else(|| Redirect::to("/approvals/login").into_response())?;
    Ok((s, entry))
}

fn failed(app: &App, lang: Lang, e: &ConsoleError) -> Response {
    tracing::warn!(error = %e, "an approval page failed");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        layout(
            lang,
            &app.site,
            None,
            "",
            html! {
                h1 { (tr(lang, "暂时无法处理", "Not available now")) }
                p.error { (e.to_string()) }
            },
        ),
    )
}

/// Whether `who` may decide the level `a` waits for (the daemon checks it again).
fn for_me(a: &pb::Application, who: &ApproverEntry, applicant: &str) -> bool {
    a.state == "pending"
        && a.next_role == who.role
        && (a.next_department.is_empty() || a.next_department == who.department)
        && crate::approval::normalize_id(applicant).ok().as_deref() != Some(who.id.as_str())
}

/// The token of an application, as the page reads it (nothing in it is trusted here).
fn token_of(a: &pb::Application) -> Option<Token> {
    Token::parse_for_signing(&a.token).ok()
}

async fn list(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let (s, who) = match signed_in(&app, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let lang = lang_of(&headers);
    let apps = match app
        .recorder
        .call(request::Body::ListApplications(
            pb::ListApplicationsRequest {
                role: who.role.clone(),
                department: who.department.clone(),
                limit: 0,
            },
        ))
        .await
    {
        Ok(response::Body::ListApplications(l)) => l.applications,
        Ok(_) => {
            return failed(
                &app,
                lang,
                &ConsoleError::Record("an unexpected reply".into()),
            )
        }
        Err(e) => return failed(&app, lang, &e),
    };
    let mine: Vec<(pb::Application, Token)> = apps
        .into_iter()
        .filter_map(|a| token_of(&a).map(|t| (a, t)))
        .filter(|(a, t)| for_me(a, &who, &t.claims.applicant))
        .collect();
    page(
        StatusCode::OK,
        layout(
            lang,
            &app.site,
            Some(&s.id),
            tr(lang, "待我审批", "Waiting for me"),
            html! {
                h1 { (tr(lang, "待我审批", "Waiting for me")) }
                @if mine.is_empty() {
                    p id="nothing-waiting" { (tr(lang, "没有等待您审批的申请。", "Nothing waits for you.")) }
                } @else {
                    table id="waiting" {
                        tr {
                            th { (tr(lang, "申请", "Application")) } th { (tr(lang, "印章", "Seal")) }
                            th { (tr(lang, "类型", "Type")) } th { (tr(lang, "金额", "Amount")) }
                            th { (tr(lang, "部门", "Department")) } th { (tr(lang, "申请人", "Applicant")) }
                            th { (tr(lang, "级别", "Level")) }
                        }
                        @for (a, t) in &mine {
                            tr {
                                td { a href={"/approvals/" (a.id)} { (t.claims.doc.title.clone().unwrap_or_else(|| a.id.clone())) } }
                                td { (t.claims.seal) } td { (t.claims.doc.doc_type) }
                                td.n { (money(&t.claims)) } td { (t.claims.dept) } td { (t.claims.applicant) }
                                td { (a.approved + 1) " / " (a.levels.len()) }
                            }
                        }
                    }
                }
            },
        ),
    )
}

fn money(c: &crate::token::Claims) -> String {
    c.amount
        .as_ref()
        .map(|a| super::pages::minor_units(a.value, &a.currency))
        .unwrap_or_default()
}

async fn fetch(
    app: &App,
    id: &str,
    document: bool,
) -> Result<pb::ApplicationResponse, ConsoleError> {
    match app
        .recorder
        .call(request::Body::FetchApplication(
            pb::FetchApplicationRequest {
                application_id: id.into(),
                document,
            },
        ))
        .await?
    {
        response::Body::Application(a) => Ok(a),
        _ => Err(ConsoleError::Record("an unexpected reply".into())),
    }
}

async fn show(State(app): State<Arc<App>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (s, who) = match signed_in(&app, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let lang = lang_of(&headers);
    let a = match fetch(&app, &id, false).await {
        Ok(r) => r.application.unwrap_or_default(),
        Err(e) => return failed(&app, lang, &e),
    };
    let Some(t) = token_of(&a) else {
        return failed(
            &app,
            lang,
            &ConsoleError::Record("the application's token does not parse".into()),
        );
    };
    if !for_me(&a, &who, &t.claims.applicant) {
        return page(
            StatusCode::FORBIDDEN,
            layout(
                lang,
                &app.site,
                Some(&s.id),
                "",
                html! {
                    h1 { (tr(lang, "不是您的审批", "Not yours to decide")) }
                    p id="not-mine" { (tr(lang, "此申请当前不等待您这一级审批（或已处理，或是您本人的申请）。", "This application does not wait for your level now (it was decided, or it is your own).")) }
                },
            ),
        );
    }
    let c = &t.claims;
    let approved: Vec<(String, i64)> = t
        .signatures
        .iter()
        .map(|s| (s.header.kid.clone(), s.header.approved_at))
        .collect();
    let facts: Vec<(&str, String)> = vec![
        (tr(lang, "印章", "Seal"), c.seal.clone()),
        (
            tr(lang, "文件", "Document"),
            c.doc.title.clone().unwrap_or_default(),
        ),
        (tr(lang, "类型", "Type"), c.doc.doc_type.clone()),
        (tr(lang, "金额", "Amount"), money(c)),
        (tr(lang, "部门", "Department"), c.dept.clone()),
        (tr(lang, "申请人", "Applicant"), c.applicant.clone()),
        (tr(lang, "用途", "Purpose"), c.purpose.clone()),
        (
            tr(lang, "文件摘要 SHA-256", "Document SHA-256"),
            c.doc.sha256.clone(),
        ),
        (tr(lang, "可用次数", "Uses"), c.uses.to_string()),
        (
            tr(lang, "有效期至", "Valid until"),
            super::pages::time(c.exp * 1000),
        ),
        (tr(lang, "规则", "Rule"), a.rule.clone()),
    ];
    let options = serde_json::json!({ "id": a.id, "csrf": s.csrf, "uv": a.next_user_verification });
    page(
        StatusCode::OK,
        layout(
            lang,
            &app.site,
            Some(&s.id),
            tr(lang, "审批", "Approve"),
            html! {
                h1 { (tr(lang, "审批申请", "Application")) " " (c.doc.title.clone().unwrap_or_else(|| a.id.clone())) }
                div.tables {
                    section {
                        table.record id="facts" {
                            @for (k, v) in &facts { tr { th { (k) } td { (v) } } }
                        }
                        h2 { (tr(lang, "审批级别", "Levels")) }
                        table id="levels" {
                            tr { th { "#" } th { (tr(lang, "角色", "Role")) } th { (tr(lang, "审批人", "Approver")) } th { (tr(lang, "时间", "When")) } }
                            @for (i, role) in a.levels.iter().enumerate() {
                                tr {
                                    td { (i + 1) } td { (role) }
                                    @if let Some((kid, at)) = approved.get(i) {
                                        td { (kid) } td { (super::pages::time(at * 1000)) }
                                    } @else if i as u32 == a.approved {
                                        td { strong { (tr(lang, "等待您", "waiting for you")) } } td {}
                                    } @else { td {} td {} }
                                }
                            }
                        }
                        div id="decision" data-options=(options.to_string()) {
                            button id="approve" type="button" { (tr(lang, "用通行密钥批准", "Approve with passkey")) }
                            p {
                                label { (tr(lang, "驳回理由", "Reason to reject")) " " input id="reason" maxlength="500"; }
                                " " button id="reject" type="button" { (tr(lang, "用通行密钥驳回", "Reject with passkey")) }
                            }
                            p id="decision-result" {}
                        }
                    }
                    @if a.has_document {
                        section {
                            h2 { (tr(lang, "文件首页（含印章位置）", "First page, with the seal in place")) }
                            img id="first-page" src={"/approvals/" (a.id) "/page.png"} alt="first page";
                        }
                    }
                }
            },
        ),
    )
}

/// Renders the first page of an application's PDF, once its digest is checked to be the one
/// the token approves (poppler's `pdftoppm`, in a process of its own).
async fn first_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (_, who) = match signed_in(&app, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let a = approvals(&app).expect("signed in");
    // Whose it is, asked every time: a page rendered for one approver is not another's.
    let application = match fetch(&app, &id, false).await {
        Ok(r) => r.application.unwrap_or_default(),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let Some(t) = token_of(&application) else {
        return StatusCode::CONFLICT.into_response();
    };
    if !for_me(&application, &who, &t.claims.applicant) || !application.has_document {
        return StatusCode::NOT_FOUND.into_response();
    }
    if let Some(png) = a.pages.lock().expect("pages").get(&id).cloned() {
        return ([(header::CONTENT_TYPE, "image/png")], png.as_ref().clone()).into_response();
    }
    let r = match fetch(&app, &id, true).await {
        Ok(r) => r,
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let want = t.claims.doc.sha256.clone();
    let rendered =
        tokio::task::spawn_blocking(move || render_first_page(&r.document_pdf, &want)).await;
    match rendered {
        Ok(Ok(png)) => {
            let png = Arc::new(png);
            let mut pages = a.pages.lock().expect("pages");
            if pages.len() >= 64 {
                pages.clear();
            }
            pages.insert(id, png.clone());
            ([(header::CONTENT_TYPE, "image/png")], png.as_ref().clone()).into_response()
        }
        Ok(Err(why)) => (StatusCode::CONFLICT, why).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The PDF's first page as PNG, if the PDF's signed bytes are the document `sha256` names.
pub fn render_first_page(pdf: &[u8], sha256: &str) -> Result<Vec<u8>, String> {
    let waiting = crate::pdf::pending(pdf).map_err(|e| format!("not a prepared PDF: {e}"))?;
    let (digest, _) = crate::pdf::digests(pdf, &waiting.range);
    if hex::encode(digest) != sha256 {
        return Err("the PDF is not the document this application approves".into());
    }
    let dir = PageDir::new()?;
    let input = dir.path().join("d.pdf");
    std::fs::write(&input, pdf).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("pdftoppm")
        .args([
            "-png",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            "-scale-to",
            "900",
        ])
        .arg(&input)
        .arg(dir.path().join("page"))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("pdftoppm (poppler-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pdftoppm: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::read(dir.path().join("page.png")).map_err(|e| e.to_string())
}

/// A private folder for one rendering, removed when dropped.
struct PageDir(PathBuf);

impl PageDir {
    fn new() -> Result<PageDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let mut raw = [0u8; 12];
        getrandom::fill(&mut raw).map_err(|e| e.to_string())?;
        let p = std::env::temp_dir().join(format!("sealgate-page-{}", hex::encode(raw)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(PageDir(p))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for PageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Deserialize)]
struct ChallengeForm {
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// The protected header and challenge the approver's passkey signs for a decision on the level
/// that waits: an approval (the token's challenge) or, with a reason, a rejection.
async fn decision_challenge(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(form): Json<ChallengeForm>,
) -> Response {
    let (a, who) = match signed_in_post(&app, &headers, &form.csrf) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let application = match fetch(&app, &id, false).await {
        Ok(r) => r.application.unwrap_or_default(),
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, "daemon", &e.to_string()),
    };
    let Some(t) = token_of(&application) else {
        return refused(
            StatusCode::CONFLICT,
            "malformed",
            "the application's token does not parse",
        );
    };
    if !for_me(&application, &who, &t.claims.applicant) {
        return refused(
            StatusCode::FORBIDDEN,
            "not_yours",
            "this application does not wait for your level",
        );
    }
    let Some(p) = who.passkeys.iter().find(|p| p.rp_id == a.config.rp_id) else {
        return refused(
            StatusCode::CONFLICT,
            "no_passkey",
            "register a passkey first",
        );
    };
    let header = crate::token::Header {
        alg: if p.alg == "EdDSA" {
            JwsAlg::EdDSA
        } else {
            JwsAlg::ES256
        },
        kid: who.id.clone(),
        approved_at: now_ms().div_euclid(1000),
        crit: Some(vec!["webauthn".into()]),
        typ: None,
        webauthn: Some(p.credential_id.clone()),
    };
    let protected = B64.encode(serde_json::to_vec(&header).expect("a header serializes"));
    let challenge = if form.reason.is_empty() {
        t.challenge_for(&protected)
    } else {
        t.rejection_challenge_for(&protected, &form.reason)
    };
    answer(
        StatusCode::OK,
        serde_json::json!({
            "protected": protected,
            "challenge": B64.encode(challenge),
            "credential": p.credential_id,
            "rpId": a.config.rp_id,
            "userVerification": if application.next_user_verification { "required" } else { "preferred" },
        }),
    )
}

async fn decide(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(form): Json<AssertionForm>,
) -> Response {
    let (_, who) = match signed_in_post(&app, &headers, &form.csrf) {
        Ok(x) => x,
        Err(r) => return r,
    };
    // The page names only the signed-in approver: a header for anyone else is not sent on.
    let header: Option<crate::token::Header> = B64
        .decode(&form.protected)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok());
    if header.as_ref().is_none_or(|h| h.kid != who.id) {
        return refused(
            StatusCode::FORBIDDEN,
            "not_yours",
            "the header names another approver",
        );
    }
    let entry = serde_json::json!({
        "protected": form.protected,
        "signature": form.signature,
        "authenticatorData": form.authenticator_data,
        "clientDataJSON": form.client_data_json,
    });
    let result = app
        .recorder
        .call(request::Body::DecideApplication(
            pb::DecideApplicationRequest {
                application_id: id.clone(),
                signature: entry.to_string().into_bytes(),
                reject_reason: form.reason.clone(),
            },
        ))
        .await;
    match result {
        Ok(response::Body::Application(r)) => {
            let a = r.application.unwrap_or_default();
            tracing::info!(
                approver = who.id,
                application = id,
                state = a.state,
                "decided"
            );
            answer(
                StatusCode::OK,
                serde_json::json!({ "ok": true, "state": a.state, "approved": a.approved, "levels": a.levels.len() }),
            )
        }
        Ok(_) => refused(StatusCode::BAD_GATEWAY, "reply", "an unexpected reply"),
        Err(ConsoleError::Refused {
            reason, message, ..
        }) => refused(StatusCode::CONFLICT, &reason, &message),
        Err(e) => refused(StatusCode::SERVICE_UNAVAILABLE, "daemon", &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invitation_opens_once_and_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let config = ApprovalsConfig {
            rp_id: "localhost".into(),
            origin: "https://localhost:8443".into(),
            approvers: dir.path().join("approvers.toml"),
        };
        let link = invite(&config, "chen.jing", "dept_head", "sales", 1).unwrap();
        let token = link.split("invite=").nth(1).unwrap();
        let file = ApproverFile::load(&config.approvers).unwrap();
        assert_eq!(invited(&file, token).unwrap().id, "chen.jing");
        assert!(invited(&file, "forged").is_none());
        assert!(!std::fs::read_to_string(&config.approvers)
            .unwrap()
            .contains(token));
        // A second invitation replaces the first.
        let again = invite(&config, "chen.jing", "dept_head", "sales", 1).unwrap();
        let file = ApproverFile::load(&config.approvers).unwrap();
        assert!(invited(&file, token).is_none());
        assert!(invited(&file, again.split("invite=").nth(1).unwrap()).is_some());
        assert!(invite(&config, "chen jing\u{200b}", "r", "", 1).is_err());
    }

    fn page(idle_ms: i64) -> Approvals {
        Approvals::new(
            ApprovalsConfig {
                rp_id: "localhost".into(),
                origin: "https://localhost:8443".into(),
                approvers: "/nonexistent".into(),
            },
            3_600_000,
            idle_ms,
        )
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn sessions_challenges_and_posts_are_checked() {
        let a = page(3_600_000);
        let token = a.open_session("chen.jing");
        let cookie = format!("{APPROVER_COOKIE}={token}");
        let s = a.session(&headers(&[(header::COOKIE, &cookie)])).unwrap();
        assert_eq!(s.id, "chen.jing");
        assert!(a
            .session(&headers(&[(header::COOKIE, "sg_approver=forged")]))
            .is_none());
        assert!(a.session(&headers(&[])).is_none());
        // Idle too long: gone.
        let idle = page(0);
        let t = idle.open_session("chen.jing");
        assert!(idle
            .session(&headers(&[(
                header::COOKIE,
                &format!("{APPROVER_COOKIE}={t}")
            )]))
            .is_none());
        // Posts: the session's CSRF token, and this page's origin when the browser names one.
        let ours = headers(&[(header::ORIGIN, "https://localhost:8443")]);
        let theirs = headers(&[(header::ORIGIN, "https://evil.test")]);
        assert!(same_origin(&a, &ours, Some((&s.csrf, &s.csrf))));
        assert!(!same_origin(&a, &ours, Some(("", &s.csrf))));
        assert!(!same_origin(&a, &ours, Some(("forged", &s.csrf))));
        assert!(!same_origin(&a, &theirs, Some((&s.csrf, &s.csrf))));
        assert!(!same_origin(&a, &theirs, None));
        // A challenge is spent once, for what it was handed out for.
        let client = |c: &[u8; 32]| {
            serde_json::json!({"type": "webauthn.get", "challenge": B64.encode(c)}).to_string()
        };
        let c = a.challenge("login:chen.jing".into());
        assert!(a.spend(client(&c).as_bytes(), "login:sun.li").is_none());
        let c = a.challenge("login:chen.jing".into());
        assert_eq!(a.spend(client(&c).as_bytes(), "login:chen.jing"), Some(c));
        assert!(a.spend(client(&c).as_bytes(), "login:chen.jing").is_none());
        assert!(a
            .spend(client(&[9; 32]).as_bytes(), "login:chen.jing")
            .is_none());
    }

    #[test]
    fn a_registration_is_checked_field_by_field() {
        // Built by hand: authenticator data with a P-256 COSE key from the vectors.
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/vectors/webauthn.json")).unwrap();
        let key = B64
            .decode(v["passkeys"][0]["cose_key"].as_str().unwrap())
            .unwrap();
        let challenge = [7u8; 32];
        let auth = |flags: u8, rp: &str| {
            let mut a = Sha256::digest(rp.as_bytes()).to_vec();
            a.push(flags);
            a.extend_from_slice(&[0, 0, 0, 1]);
            a.extend_from_slice(&[0; 16]);
            a.extend_from_slice(&[0, 4, 1, 2, 3, 4]);
            a.extend_from_slice(&key);
            a
        };
        let object = |fmt: &str, auth: Vec<u8>| {
            use coset::cbor::value::Value;
            let mut out = Vec::new();
            coset::cbor::ser::into_writer(
                &Value::Map(vec![
                    (Value::Text("fmt".into()), Value::Text(fmt.into())),
                    (Value::Text("attStmt".into()), Value::Map(vec![])),
                    (Value::Text("authData".into()), Value::Bytes(auth)),
                ]),
                &mut out,
            )
            .unwrap();
            out
        };
        let client = |kind: &str, c: &[u8], origin: &str| {
            serde_json::json!({"type": kind, "challenge": B64.encode(c), "origin": origin})
                .to_string()
        };
        let o = "https://localhost:8443";
        let good = client("webauthn.create", &challenge, o);
        let r = check_registration(
            good.as_bytes(),
            &object("none", auth(0x45, "localhost")),
            &challenge,
            o,
            "localhost",
        )
        .unwrap();
        assert_eq!(r.passkey.credential_id, B64.encode([1, 2, 3, 4]));
        assert_eq!(B64.decode(&r.passkey.public_key).unwrap(), key);
        assert_eq!(r.passkey.alg, "ES256");
        assert!(r
            .passkey
            .trust_store_entry()
            .contains("rp_id = \"localhost\""));
        for (client_data, obj, why) in [
            (
                client("webauthn.get", &challenge, o),
                object("none", auth(0x45, "localhost")),
                "webauthn.create",
            ),
            (
                client("webauthn.create", &[8; 32], o),
                object("none", auth(0x45, "localhost")),
                "another challenge",
            ),
            (
                client("webauthn.create", &challenge, "https://evil.test"),
                object("none", auth(0x45, "localhost")),
                "origin",
            ),
            (
                good.clone(),
                object("none", auth(0x45, "other.test")),
                "relying party",
            ),
            (
                good.clone(),
                object("none", auth(0x44, "localhost")),
                "presence",
            ),
            (
                good.clone(),
                object("none", auth(0x41, "localhost")),
                "verify the user",
            ),
            (
                good.clone(),
                object("none", auth(0x05, "localhost")),
                "attested",
            ),
        ] {
            let e = check_registration(client_data.as_bytes(), &obj, &challenge, o, "localhost")
                .unwrap_err();
            assert!(e.contains(why), "{e} / {why}");
        }
    }
}
