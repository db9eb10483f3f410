//! The console's HTTP side: routes, the session and language of each request, the oversight
//! records of logins, searches, exports and acknowledgements, the live alert feed, and the
//! TLS listener.
//!
//! Owns: who may see which page (a session, the auditor's sites), CSRF checks on the few
//! forms that write, security headers, and serving over TLS with bounded connections.
//! Never: shows a page that needs a session without one, does an action whose oversight record
//! was refused, or sets a cookie that is not Secure, HttpOnly and SameSite=Strict.

use super::auth::{Auth, LoginRefusal, Session};
use super::data::{ConsoleData, Overview, Scope, SiteRecord};
use super::pages::{self, Frame, Lang, SearchForm};
use super::ConsoleError;
use crate::audit::{kind, now_ms, parse_time, query::Filter};
use crate::notify::{Delivery, Outbox, Pending};
use crate::protocol::client::Client;
use crate::protocol::{pb, request, response, Status};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, Mutex};

/// Records per page of search results and of the alert timeline.
pub const PAGE: u64 = 50;
/// Records in one export at most (the whole log is `sealctl audit export`'s).
pub const EXPORT_LIMIT: u64 = 10_000;
const SESSION_COOKIE: &str = "sg_session";
const LANG_COOKIE: &str = "sg_lang";

/// Where the console's own records go.
pub enum Recorder {
    /// A site's console: appended to the site's log through the daemon's socket, over a few
    /// connections kept open (so that auditors' records at the same moment share the daemon's
    /// group commits rather than wait for each other's).
    Daemon {
        socket: std::path::PathBuf,
        daemon_uid: u32,
        connections: Box<[Mutex<Option<Client>>]>,
        next: std::sync::atomic::AtomicUsize,
    },
    /// Headquarters' console: rows of HQ's append-only `console_events`.
    Central(crate::hq::db::Db),
}

impl Recorder {
    pub fn new(socket: std::path::PathBuf, daemon_uid: u32) -> Recorder {
        Recorder::Daemon {
            socket,
            daemon_uid,
            connections: (0..RECORDER_CONNECTIONS)
                .map(|_| Mutex::new(None))
                .collect(),
            next: Default::default(),
        }
    }

    /// Records one of an auditor's actions (`alert`: the site and seq of the alert
    /// acknowledged); its place once it is durable.
    pub async fn record(
        &self,
        kind: &str,
        user: &str,
        detail: &str,
        reason: &str,
        alert: Option<(&str, u64)>,
    ) -> Result<u64, ConsoleError> {
        match self {
            Recorder::Daemon {
                socket,
                daemon_uid,
                connections,
                next,
            } => {
                let body = request::Body::RecordOversight(pb::RecordOversightRequest {
                    kind: kind.into(),
                    user: user.into(),
                    detail: detail.into(),
                    ref_seq: alert.map_or(0, |a| a.1),
                    reason: reason.into(),
                });
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match at_daemon(
                    socket,
                    *daemon_uid,
                    &connections[i % connections.len()],
                    body,
                )
                .await
                {
                    Ok(response::Body::RecordOversight(o)) => Ok(o.seq),
                    Ok(_) => Err(ConsoleError::Record("an unexpected reply".into())),
                    Err(ConsoleError::Refused {
                        status, message, ..
                    }) => Err(ConsoleError::Record(format!("{status}: {message}"))),
                    Err(e) => Err(e),
                }
            }
            Recorder::Central(db) => db
                .console_event(user, kind, reason, detail, alert)
                .await
                .map(|id| id as u64)
                .map_err(|e| ConsoleError::Record(e.to_string())),
        }
    }
}

impl Recorder {
    /// Another request of the approval page to the site's daemon (applications); its answer,
    /// or the daemon's refusal as [`ConsoleError::Refused`].
    pub async fn call(&self, body: request::Body) -> Result<response::Body, ConsoleError> {
        match self {
            Recorder::Daemon {
                socket,
                daemon_uid,
                connections,
                next,
            } => {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                at_daemon(
                    socket,
                    *daemon_uid,
                    &connections[i % connections.len()],
                    body,
                )
                .await
            }
            Recorder::Central(_) => Err(ConsoleError::Record(
                "headquarters' console has no daemon".into(),
            )),
        }
    }
}

/// Connections the console keeps to the daemon for its records.
const RECORDER_CONNECTIONS: usize = 8;

/// Appends one record through the daemon on this connection; its seq once it is durable. A
/// broken connection is opened again once.
async fn at_daemon(
    socket: &std::path::Path,
    daemon_uid: u32,
    client: &Mutex<Option<Client>>,
    body: request::Body,
) -> Result<response::Body, ConsoleError> {
    let mut held = client.lock().await;
    for attempt in 0..2 {
        if held.is_none() {
            let c = Client::connect(socket)
                .await
                .map_err(|e| ConsoleError::Record(e.to_string()))?;
            let uid = c
                .peer_uid()
                .map_err(|e| ConsoleError::Record(e.to_string()))?;
            if uid != daemon_uid {
                return Err(ConsoleError::Record(format!(
                    "{} is served by uid {uid}, not the daemon's uid {daemon_uid}",
                    socket.display(),
                )));
            }
            *held = Some(c);
        }
        let c = held.as_mut().expect("connected above");
        match tokio::time::timeout(Duration::from_secs(10), c.call(body.clone())).await {
            Ok(Ok(r)) if r.status == Status::Ok as i32 => {
                return r
                    .body
                    .ok_or_else(|| ConsoleError::Record("an answer without a body".into()));
            }
            Ok(Ok(r)) => {
                let status = Status::try_from(r.status)
                    .map(|s| s.as_str_name().to_string())
                    .unwrap_or_else(|_| r.status.to_string());
                return Err(ConsoleError::Refused {
                    status,
                    reason: r.reason,
                    message: r.message,
                });
            }
            Ok(Err(e)) if attempt == 0 => {
                tracing::info!(error = %e, "the daemon's connection broke; connecting again");
                *held = None;
            }
            Ok(Err(e)) => return Err(ConsoleError::Record(e.to_string())),
            Err(_) => {
                *held = None;
                return Err(ConsoleError::Record(
                    "the daemon did not answer within 10 s".into(),
                ));
            }
        }
    }
    unreachable!("the second attempt returns")
}

/// Everything a request may need.
pub struct App {
    pub data: Arc<dyn ConsoleData>,
    pub auth: Auth,
    pub recorder: Recorder,
    /// The site shown in the header (a site's console) or "HQ".
    pub site: String,
    /// The log's path and the audit key's, as the "check it yourself" commands show them.
    pub db_hint: String,
    pub key_hint: String,
    /// New alerts as the watcher finds them.
    pub live: broadcast::Sender<SiteRecord>,
    /// The alert delivery's outbox, when the console is told where it is.
    pub outbox: Option<std::path::PathBuf>,
    /// Overviews by scope and period, with when they were made and their start; see
    /// [`overview`].
    pub overviews: Overviews,
    /// The approval page, when `[approvals]` is configured (a site's console only).
    pub approvals: Option<super::approvals::Approvals>,
}

/// An overview as made: when (ms), the start of its period (ms), the figures.
pub type Made = (i64, i64, Arc<Overview>);

/// The overviews made, and the one making of an overview at a time.
#[derive(Default)]
pub struct Overviews {
    made: std::sync::Mutex<HashMap<String, Made>>,
    making: Mutex<()>,
}

/// How long an overview is shown again before it is made afresh. The live alert count updates
/// meanwhile; the page says when its figures were made.
pub const OVERVIEW_TTL_MS: i64 = 10_000;

impl App {
    /// The overview of the last `days` for `scope`. One made less than OVERVIEW_TTL_MS ago is
    /// shown again. One is made at a time; while it is made, the one before is shown to the
    /// others. So fifty auditors opening it at once cost one pass over the log, and only the
    /// one who finds it old waits for it.
    pub async fn overview(&self, scope: &Scope, days: u32) -> Result<Made, ConsoleError> {
        let key = format!("{scope:?}/{days}");
        let known = || {
            self.overviews
                .made
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned()
        };
        let fresh = |m: &Made| now_ms() - m.0 < OVERVIEW_TTL_MS;
        let shown = known();
        if shown.as_ref().is_some_and(fresh) {
            return Ok(shown.expect("checked"));
        }
        let _making = match &shown {
            Some(old) => match self.overviews.making.try_lock() {
                Ok(m) => m,
                Err(_) => return Ok(old.clone()),
            },
            None => self.overviews.making.lock().await,
        };
        // Another auditor's may have been made while this one waited.
        if let Some(m) = known().filter(fresh) {
            return Ok(m);
        }
        let now = now_ms();
        let since = now - i64::from(days) * 86_400_000;
        let o = Arc::new(self.data.overview(scope, since, now + 1).await?);
        let entry = (now, since, o);
        let mut made = self
            .overviews
            .made
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if made.len() >= 256 {
            made.clear();
        }
        made.insert(key, entry.clone());
        Ok(entry)
    }

    /// Reads the delivery outbox off the executor; None when none is configured.
    async fn deliveries(
        &self,
        before: Option<i64>,
        limit: u32,
        alerts: Option<Vec<u64>>,
    ) -> Result<Option<(Pending, Vec<Delivery>)>, ConsoleError> {
        let Some(path) = self.outbox.clone() else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || {
            let outbox = Outbox::open_read_only(&path)?;
            Ok::<_, crate::notify::NotifyError>(Some((
                outbox.pending()?,
                outbox.deliveries(before, limit, alerts.as_deref())?,
            )))
        })
        .await
        .map_err(|e| ConsoleError::Log(format!("a read stopped: {e}")))?
        .map_err(|e| ConsoleError::Log(e.to_string()))
    }
}

/// Finds new alerts every `every` and hands them to the live feed. Runs until the process ends.
pub async fn watch_alerts(app: Arc<App>, every: Duration) {
    let mut heads = loop {
        match app.data.alert_heads().await {
            Ok(h) => break h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read where the alerts are");
                tokio::time::sleep(every).await;
            }
        }
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match app.data.alerts_after(heads.clone()).await {
            Ok(rows) => {
                for r in rows {
                    let head = heads.entry(r.site.clone()).or_default();
                    *head = (*head).max(r.record.seq);
                    let _ = app.live.send(r);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read new alerts"),
        }
    }
}

pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub(super) fn lang_of(headers: &HeaderMap) -> Lang {
    match cookie(headers, LANG_COOKIE) {
        Some("en") => Lang::En,
        _ => Lang::Zh,
    }
}

/// A request from a logged-in auditor.
pub struct Authed {
    pub session: Session,
    pub token: String,
    pub lang: Lang,
}

impl Authed {
    fn scope(&self) -> Scope {
        match self.session.user.role {
            super::auth::Role::Auditor => Scope::All,
            super::auth::Role::SiteAuditor => Scope::Sites(self.session.user.sites.clone()),
        }
    }

    fn frame<'a>(&'a self, app: &'a App, here: &'a str) -> Frame<'a> {
        Frame {
            lang: self.lang,
            site: &app.site,
            user: Some(&self.session.user.name),
            csrf: &self.session.csrf,
            here,
        }
    }
}

impl FromRequestParts<Arc<App>> for Authed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let token = cookie(&parts.headers, SESSION_COOKIE).unwrap_or_default();
        match app.auth.session(token, now_ms()) {
            Some(session) => Ok(Authed {
                session,
                token: token.to_string(),
                lang: lang_of(&parts.headers),
            }),
            None if parts.uri.path() == "/events" || parts.method != axum::http::Method::GET => {
                Err(StatusCode::UNAUTHORIZED.into_response())
            }
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

/// The router of every page; [`serve`] puts it behind TLS, the tests call it directly.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(overview))
        .route("/sites", get(sites))
        .route("/search", get(search))
        .route("/export", get(export))
        .route("/record/{site}/{seq}", get(record))
        .route("/alerts", get(alerts))
        .route("/alerts/{site}/{seq}/ack", post(acknowledge))
        .route("/deliveries", get(deliveries))
        .route("/events", get(events))
        .route("/assets/{name}", get(asset))
        .merge(super::approvals::router())
        .layer(axum::middleware::from_fn(headers_and_language))
        .with_state(app)
}

/// `?lang=en|zh` sets the language cookie and comes back without it; every answer gets the
/// security headers.
async fn headers_and_language(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let query = req.uri().query().unwrap_or("");
    let chosen = query.split('&').find_map(|kv| match kv {
        "lang=en" => Some("en"),
        "lang=zh" => Some("zh"),
        _ => None,
    });
    let mut resp = if let Some(lang) = chosen {
        let rest: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.starts_with("lang="))
            .collect();
        let to = if rest.is_empty() {
            req.uri().path().to_string()
        } else {
            format!("{}?{}", req.uri().path(), rest.join("&"))
        };
        let mut r = Redirect::to(&to).into_response();
        set_cookie(&mut r, &format!("{LANG_COOKIE}={lang}; Max-Age=31536000"));
        r
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

pub(super) fn set_cookie(resp: &mut Response, cookie: &str) {
    let full = format!("{cookie}; Path=/; Secure; HttpOnly; SameSite=Strict");
    if let Ok(v) = HeaderValue::from_str(&full) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

pub(super) fn page(status: StatusCode, markup: maud::Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

fn failure(app: &App, a: &Authed, e: &ConsoleError) -> Response {
    tracing::warn!(error = %e, user = a.session.user.name, "a page failed");
    let (status, text) = match e {
        ConsoleError::Record(_) => (StatusCode::SERVICE_UNAVAILABLE, a.lang.t("unrecorded")),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the audit log cannot be read now",
        ),
    };
    page(
        status,
        pages::message(&a.frame(app, ""), a.lang.t("title"), text),
    )
}

fn forbidden(app: &App, a: &Authed) -> Response {
    page(
        StatusCode::FORBIDDEN,
        pages::message(
            &a.frame(app, ""),
            a.lang.t("forbidden"),
            a.lang.t("forbidden"),
        ),
    )
}

/// A POST from one of our own forms: its CSRF token matches the session's and, when the
/// browser says where it comes from, that is this console.
fn same_origin_form(headers: &HeaderMap, session: &Session, csrf: &str) -> bool {
    let token_ok = !csrf.is_empty() && csrf.as_bytes() == session.csrf.as_bytes();
    let origin_ok = match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (Some(o), Some(h)) => o
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("https://"))
            .is_some_and(|o| Some(o) == h.to_str().ok()),
        (Some(_), None) => false,
        (None, _) => true,
    };
    token_ok && origin_ok
}

async fn login_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    page(
        StatusCode::OK,
        pages::login(lang_of(&headers), &app.site, None),
    )
}

#[derive(serde::Deserialize)]
struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    code: String,
}

async fn login(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let lang = lang_of(&headers);
    let user: String = form.user.chars().take(64).collect();
    let checked = {
        let app = app.clone();
        let user = user.clone();
        tokio::task::spawn_blocking(move || {
            let password = zeroize::Zeroizing::new(form.password);
            app.auth.login(&user, &password, &form.code, now_ms())
        })
        .await
    };
    let refused = |why: &str| {
        page(
            StatusCode::UNAUTHORIZED,
            pages::login(lang, &app.site, Some(why)),
        )
    };
    match checked {
        Ok(Ok((token, session))) => {
            if let Err(e) = app
                .recorder
                .record(kind::CONSOLE_LOGIN, &user, "", "", None)
                .await
            {
                // Not recorded, so not logged in.
                app.auth.logout(&token);
                tracing::warn!(error = %e, "a login could not be recorded");
                return page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    pages::login(lang, &app.site, Some(lang.t("unrecorded"))),
                );
            }
            tracing::info!(user = session.user.name, "login");
            let mut r = Redirect::to("/").into_response();
            set_cookie(&mut r, &format!("{SESSION_COOKIE}={token}"));
            r
        }
        Ok(Err(why)) => {
            tracing::info!(user, reason = why.code(), "login refused");
            if let Err(e) = app
                .recorder
                .record(kind::CONSOLE_LOGIN_FAILED, &user, "", why.code(), None)
                .await
            {
                tracing::warn!(error = %e, "a refused login could not be recorded");
            }
            refused(lang.t(if why == LoginRefusal::Locked {
                "locked"
            } else {
                "login_failed"
            }))
        }
        Err(e) => {
            tracing::error!(error = %e, "the login check stopped");
            refused(lang.t("login_failed"))
        }
    }
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(app): State<Arc<App>>,
    a: Authed,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !same_origin_form(&headers, &a.session, &form.csrf) {
        return StatusCode::FORBIDDEN.into_response();
    }
    app.auth.logout(&a.token);
    if let Err(e) = app
        .recorder
        .record(kind::CONSOLE_LOGOUT, &a.session.user.name, "", "", None)
        .await
    {
        tracing::warn!(error = %e, "a log-out could not be recorded");
    }
    let mut r = Redirect::to("/login").into_response();
    set_cookie(&mut r, &format!("{SESSION_COOKIE}=; Max-Age=0"));
    r
}

#[derive(serde::Deserialize)]
struct OverviewQuery {
    days: Option<u32>,
}

async fn overview(
    State(app): State<Arc<App>>,
    a: Authed,
    Query(q): Query<OverviewQuery>,
) -> Response {
    let days = q.days.unwrap_or(30).clamp(1, 3660);
    let (at, since, o) = match app.overview(&a.scope(), days).await {
        Ok(m) => m,
        Err(e) => return failure(&app, &a, &e),
    };
    page(
        StatusCode::OK,
        pages::overview(&a.frame(&app, "overview"), days, since, at, &o),
    )
}

async fn sites(State(app): State<Arc<App>>, a: Authed) -> Response {
    match app.data.sites(&a.scope()).await {
        Ok(s) => page(StatusCode::OK, pages::sites(&a.frame(&app, "sites"), &s)),
        Err(e) => failure(&app, &a, &e),
    }
}

fn filter_of(form: &SearchForm, limit: u64) -> Result<Filter, String> {
    let opt = |s: &String| (!s.trim().is_empty()).then(|| s.trim().to_string());
    let time = |s: &String| opt(s).map(|t| parse_time(&t)).transpose();
    let doc = opt(&form.doc);
    if let Some(d) = &doc {
        if d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the document digest is 64 hex digits (SHA-256)".into());
        }
    }
    Ok(Filter {
        since_ms: time(&form.since)?,
        until_ms: time(&form.until)?,
        seal: opt(&form.seal),
        applicant: opt(&form.applicant),
        approver: opt(&form.approver),
        kind: opt(&form.kind),
        reason: opt(&form.reason),
        doc_sha256: doc,
        doc_type: opt(&form.doc_type),
        newest_first: true,
        limit: Some(limit),
        ..Filter::default()
    })
}

async fn search(
    State(app): State<Arc<App>>,
    a: Authed,
    Query(form): Query<SearchForm>,
) -> Response {
    let frame = a.frame(&app, "search");
    let filter = match filter_of(&form, PAGE + 1) {
        Ok(f) => f,
        Err(e) => {
            return page(
                StatusCode::BAD_REQUEST,
                pages::search(&frame, &form, &[], None, Some(&e)),
            )
        }
    };
    let site = (!form.site.is_empty()).then(|| form.site.clone());
    if let Some(s) = &site {
        if !a.session.user.may_see(s) {
            return forbidden(&app, &a);
        }
    }
    let detail = format!(
        "{}{}",
        form.query(),
        form.before
            .as_ref()
            .map(|b| format!("&before={b}"))
            .unwrap_or_default()
    );
    if let Err(e) = app
        .recorder
        .record(
            kind::CONSOLE_SEARCH,
            &a.session.user.name,
            &detail,
            "",
            None,
        )
        .await
    {
        return failure(&app, &a, &e);
    }
    match app
        .data
        .search(&a.scope(), site, filter, form.before.clone())
        .await
    {
        Ok(mut rows) => {
            let next = (rows.len() as u64 > PAGE).then(|| {
                rows.truncate(PAGE as usize);
                rows.last()
                    .map(|r| app.data.position(r))
                    .unwrap_or_default()
            });
            page(
                StatusCode::OK,
                pages::search(&frame, &form, &rows, next, None),
            )
        }
        Err(e) => failure(&app, &a, &e),
    }
}

#[derive(serde::Deserialize)]
struct ExportQuery {
    format: String,
    #[serde(flatten)]
    form: SearchForm,
}

async fn export(State(app): State<Arc<App>>, a: Authed, Query(q): Query<ExportQuery>) -> Response {
    if q.format != "csv" && q.format != "json" {
        return (StatusCode::BAD_REQUEST, "format is csv or json").into_response();
    }
    let filter = match filter_of(&q.form, EXPORT_LIMIT) {
        Ok(f) => f,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let site = (!q.form.site.is_empty()).then(|| q.form.site.clone());
    if site.as_deref().is_some_and(|s| !a.session.user.may_see(s)) {
        return forbidden(&app, &a);
    }
    if let Err(e) = app
        .recorder
        .record(
            kind::CONSOLE_EXPORT,
            &a.session.user.name,
            &q.form.query(),
            &q.format,
            None,
        )
        .await
    {
        return failure(&app, &a, &e);
    }
    let rows = match app.data.search(&a.scope(), site, filter, None).await {
        Ok(r) => r,
        Err(e) => return failure(&app, &a, &e),
    };
    let (body, content_type) = if q.format == "json" {
        (
            serde_json::to_vec_pretty(&rows).unwrap_or_default(),
            "application/json",
        )
    } else {
        match csv_of(&rows) {
            Ok(b) => (b, "text/csv; charset=utf-8"),
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        }
    };
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"sealgate-{}.{}\"",
        app.site
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        q.format
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if rows.len() as u64 >= EXPORT_LIMIT {
        h.insert(
            "x-sealgate-truncated",
            HeaderValue::from_static("at most 10000 records per export"),
        );
    }
    r
}

/// The export's CSV: one row a record, every field (the header names them).
fn csv_of(rows: &[SiteRecord]) -> Result<Vec<u8>, String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "site",
        "seq",
        "at",
        "kind",
        "seal",
        "device",
        "caller",
        "applicant",
        "approvers",
        "jti",
        "doc_sha256",
        "doc_type",
        "amount",
        "currency",
        "dept",
        "purpose",
        "reason",
        "detail",
        "evidence",
        "ref_seq",
        "hash",
    ])
    .map_err(|e| e.to_string())?;
    for s in rows {
        let r = &s.record;
        w.write_record([
            s.site.as_str(),
            &r.seq.to_string(),
            &pages::time(r.at_ms),
            &r.kind,
            &r.seal,
            &r.device,
            &r.caller,
            &r.applicant,
            &r.approvers,
            &r.jti,
            &r.doc_sha256,
            &r.doc_type,
            &r.amount.map(|a| a.to_string()).unwrap_or_default(),
            &r.currency,
            &r.dept,
            &r.purpose,
            &r.reason,
            &r.detail,
            &r.evidence,
            &r.ref_seq.map(|a| a.to_string()).unwrap_or_default(),
            &hex::encode(r.hash),
        ])
        .map_err(|e| e.to_string())?;
    }
    w.into_inner().map_err(|e| e.to_string())
}

async fn record(
    State(app): State<Arc<App>>,
    a: Authed,
    Path((site, seq)): Path<(String, u64)>,
) -> Response {
    if !a.session.user.may_see(&site) {
        return forbidden(&app, &a);
    }
    match app.data.record(site, seq).await {
        Ok(Some(p)) => page(
            StatusCode::OK,
            pages::record(&a.frame(&app, "search"), &p, &app.db_hint, &app.key_hint),
        ),
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            pages::message(
                &a.frame(&app, ""),
                a.lang.t("not_found"),
                a.lang.t("not_found"),
            ),
        ),
        Err(e) => failure(&app, &a, &e),
    }
}

#[derive(serde::Deserialize)]
struct AlertsQuery {
    before: Option<String>,
    open: Option<u8>,
}

async fn alerts(State(app): State<Arc<App>>, a: Authed, Query(q): Query<AlertsQuery>) -> Response {
    let open_only = q.open == Some(1);
    match app
        .data
        .alerts(&a.scope(), q.before, PAGE + 1, open_only)
        .await
    {
        Ok(mut rows) => {
            let next = (rows.len() as u64 > PAGE).then(|| {
                rows.truncate(PAGE as usize);
                rows.last()
                    .map(|r| app.data.position(&r.alert))
                    .unwrap_or_default()
            });
            let seqs = rows
                .iter()
                .filter(|r| r.alert.site == app.site)
                .map(|r| r.alert.record.seq)
                .collect();
            let sent = match app.deliveries(None, 0, Some(seqs)).await {
                Ok(d) => d.map(|(_, d)| d).unwrap_or_default(),
                Err(e) => return failure(&app, &a, &e),
            };
            page(
                StatusCode::OK,
                pages::alerts(&a.frame(&app, "alerts"), &rows, &sent, open_only, next),
            )
        }
        Err(e) => failure(&app, &a, &e),
    }
}

#[derive(serde::Deserialize)]
struct DeliveriesQuery {
    before: Option<i64>,
}

/// The alert delivery's outbox: what went where, what is waiting, what keeps failing and why.
async fn deliveries(
    State(app): State<Arc<App>>,
    a: Authed,
    Query(q): Query<DeliveriesQuery>,
) -> Response {
    if !a.session.user.may_see(&app.site) {
        return forbidden(&app, &a);
    }
    match app.deliveries(q.before, PAGE as u32 + 1, None).await {
        Ok(found) => {
            let (pending, mut rows) = found.unwrap_or_default();
            let next = (rows.len() as u64 > PAGE).then(|| {
                rows.truncate(PAGE as usize);
                rows.last().map(|d| d.id).unwrap_or(0)
            });
            page(
                StatusCode::OK,
                pages::deliveries(
                    &a.frame(&app, "deliveries"),
                    app.outbox.is_some(),
                    &pending,
                    &rows,
                    next,
                ),
            )
        }
        Err(e) => failure(&app, &a, &e),
    }
}

#[derive(serde::Deserialize)]
struct AckForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    comment: String,
}

async fn acknowledge(
    State(app): State<Arc<App>>,
    a: Authed,
    headers: HeaderMap,
    Path((site, seq)): Path<(String, u64)>,
    Form(form): Form<AckForm>,
) -> Response {
    if !same_origin_form(&headers, &a.session, &form.csrf) {
        return (
            StatusCode::FORBIDDEN,
            "the form's CSRF token does not match",
        )
            .into_response();
    }
    // A site's console holds its own site's alerts only; headquarters' holds every site's.
    let elsewhere = matches!(app.recorder, Recorder::Daemon { .. }) && site != app.site;
    if !a.session.user.may_see(&site) || elsewhere {
        return forbidden(&app, &a);
    }
    let comment: String = form.comment.chars().take(500).collect();
    match app
        .recorder
        .record(
            kind::ALERT_ACKNOWLEDGED,
            &a.session.user.name,
            &comment,
            "",
            Some((site.as_str(), seq)),
        )
        .await
    {
        Ok(_) => Redirect::to("/alerts").into_response(),
        Err(e) => failure(&app, &a, &e),
    }
}

/// Server-sent events: each new alert this auditor may see, as JSON; the stream ends with the
/// session.
async fn events(State(app): State<Arc<App>>, a: Authed) -> Response {
    let rx = app.live.subscribe();
    let user = a.session.user.clone();
    let state = (rx, app.clone(), a.token.clone());
    let stream = futures_util::stream::unfold(state, move |(mut rx, app, token)| {
        let user = user.clone();
        async move {
            loop {
                let next = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
                if !app.auth.is_live(&token, now_ms()) {
                    return None;
                }
                match next {
                    Ok(Ok(r)) if user.may_see(&r.site) => {
                        let data = serde_json::json!({
                            "site": r.site,
                            "seq": r.record.seq,
                            "at": pages::time(r.record.at_ms),
                            "rule": r.record.reason,
                            "seal": r.record.seal,
                            "detail": r.record.detail,
                        });
                        let event = Event::default().event("alert").data(data.to_string());
                        return Some((Ok::<_, std::convert::Infallible>(event), (rx, app, token)));
                    }
                    Ok(Ok(_)) => continue,
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                    Err(_) => continue,
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

const ECHARTS: &[u8] = include_bytes!("../../assets/vendor/echarts/echarts.min.js");
const CONSOLE_JS: &[u8] = include_bytes!("../../assets/console.js");
const CONSOLE_CSS: &[u8] = include_bytes!("../../assets/console.css");
const APPROVALS_JS: &[u8] = include_bytes!("../../assets/approvals.js");

async fn asset(Path(name): Path<String>) -> Response {
    let (body, content_type) = match name.as_str() {
        "echarts.min.js" => (ECHARTS, "text/javascript; charset=utf-8"),
        "console.js" => (CONSOLE_JS, "text/javascript; charset=utf-8"),
        "console.css" => (CONSOLE_CSS, "text/css; charset=utf-8"),
        "approvals.js" => (APPROVALS_JS, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, at most `max_connections`
/// at once (more wait in the kernel's backlog), each handshake and request head within 10 s.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    router: Router,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let tracker = tokio_util::task::TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let tls = tls.clone();
        let router = router.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}
