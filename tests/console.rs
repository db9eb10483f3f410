//! The auditors' console over a real daemon's log on SoftHSM: every page and filter through its
//! router (access control, CSRF, expiry, oversight records, fail-closed recording), and the
//! whole console binary over TLS in Debian's headless Chromium, driven through chromedriver.
#![cfg(feature = "console")]

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::postgres::free_port;
use common::*;
use sealgate::audit::Record;
use sealgate::console::auth::{self, Auth, Role, User, UserFile};
use sealgate::console::data::SiteLog;
use sealgate::console::web::{self, App, Recorder};
use sealgate::protocol::client::Client;
use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// A daemon whose test caller may also record the console's actions, and whose alert rules
/// raise `off_hours` on every stamp (no working day).
fn daemon() -> Daemon {
    let demo = demo();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sealgated.sock");
    let opts = Opts {
        alerts: "working_days = []\n".into(),
        ..Opts::default()
    };
    let text = config_text(demo, &socket, &opts).replacen(
        "admin = true\n",
        "admin = true\noversight = true\n",
        1,
    );
    Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("daemon: {f:?}"))
}

fn user(name: &str, role: Role, sites: &[&str], password: &str) -> User {
    let u = User {
        name: name.into(),
        role,
        sites: sites.iter().map(|s| s.to_string()).collect(),
        password: auth::hash_password(password).unwrap(),
        totp: auth::new_totp_secret().unwrap(),
    };
    note_secret(&u.totp);
    u
}

/// The code of `u`'s authenticator, `offset` steps from now.
fn code(u: &User, offset: i64) -> String {
    let totp = totp_rs::Totp::from_url(auth::otpauth_uri(u).unwrap()).unwrap();
    totp_code(&totp, offset)
}

fn app(d: &Daemon, users: Vec<User>, idle_ms: i64, socket: &Path) -> Arc<App> {
    app_with_outbox(d, users, idle_ms, socket, None)
}

fn app_with_outbox(
    d: &Daemon,
    users: Vec<User>,
    idle_ms: i64,
    socket: &Path,
    outbox: Option<std::path::PathBuf>,
) -> Arc<App> {
    Arc::new(App {
        approvals: None,
        data: Arc::new(SiteLog {
            site: "demo".into(),
            db: d.db(),
            silent_after_ms: 180_000,
        }),
        auth: Auth::new(UserFile { users }, 3_600_000, idle_ms, 100),
        recorder: Recorder::new(socket.to_path_buf(), nix::unistd::getuid().as_raw()),
        site: "demo".into(),
        db_hint: d.db().display().to_string(),
        key_hint: "audit.pem".into(),
        live: tokio::sync::broadcast::channel(16).0,
        outbox,
        overviews: Default::default(),
    })
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    cookie: &str,
    form: Option<&str>,
) -> Answer {
    let mut r = Request::builder().method(method).uri(path);
    if !cookie.is_empty() {
        r = r.header(header::COOKIE, cookie);
    }
    let body = match form {
        Some(f) => {
            r = r.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Body::from(f.to_string())
        }
        None => Body::empty(),
    };
    let resp = router.clone().oneshot(r.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

use sealgate::console::pages::percent as enc;

/// A login form sent.
async fn try_login(router: &axum::Router, name: &str, password: &str, code: &str) -> Answer {
    call(
        router,
        "POST",
        "/login",
        "",
        Some(&format!(
            "user={}&password={}&code={code}",
            enc(name),
            enc(password)
        )),
    )
    .await
}

/// Logs in and returns the session cookie ("sg_session=...").
async fn login(router: &axum::Router, u: &User, password: &str, offset: i64) -> String {
    let a = try_login(router, &u.name, password, &code(u, offset)).await;
    assert_eq!(
        a.status,
        StatusCode::SEE_OTHER,
        "login of {}: {}",
        u.name,
        a.body
    );
    let set = a.headers[header::SET_COOKIE].to_str().unwrap().to_string();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(attr), "the session cookie lacks {attr}: {set}");
    }
    set.split(';').next().unwrap().to_string()
}

/// The record numbers a results or alerts table links to, in page order.
fn linked_seqs(body: &str, table_id: &str) -> Vec<u64> {
    let Some(start) = body.find(&format!("id=\"{table_id}\"")) else {
        return vec![];
    };
    let table = &body[start
        ..body[start..]
            .find("</table>")
            .map_or(body.len(), |e| start + e)];
    let mut out = Vec::new();
    for part in table.split("href=\"/record/demo/").skip(1) {
        let n: String = part.chars().take_while(|c| c.is_ascii_digit()).collect();
        let n = n.parse().unwrap();
        if out.last() != Some(&n) {
            out.push(n);
        }
    }
    out
}

fn csrf(body: &str) -> String {
    let i = body.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    body[i..i + body[i..].find('"').unwrap()].to_string()
}

/// Builds the records the pages show: stamps with three seals (one of them under a
/// thirty-use approval), refusals, and the off_hours alert each stamp raises.
async fn stamps(d: &Daemon) -> Vec<u8> {
    let mut c = Client::connect(&d.socket).await.unwrap();
    let digest = sha256(b"supply contract 2026-118");
    let mut standing = Approval::for_seal("contract", &digest);
    standing.claims.uses = 30;
    standing.claims.amount = Some(sealgate::token::Amount {
        value: 2_500_000,
        currency: "CNY".into(),
    });
    standing.claims.doc.doc_type = "contract".into();
    let token = standing.token();
    for _ in 0..30 {
        let r = c.stamp("contract", &digest, &token, "").await.unwrap();
        assert_eq!(r.status, 0, "{}", r.message);
    }
    stamp_ok(&mut c, "finance", &sha256(b"invoice 77")).await;
    stamp_ok(&mut c, "official", &sha256(b"notice 3")).await;
    let once = token_for("contract", &sha256(b"lease 9"));
    assert_eq!(
        c.stamp("contract", &sha256(b"lease 9"), &once, "")
            .await
            .unwrap()
            .status,
        0
    );
    let r = c
        .stamp("contract", &sha256(b"lease 9"), &once, "")
        .await
        .unwrap();
    assert_denied(&r, "replayed", "a spent approval");
    let r = c
        .stamp("contract", &sha256(b"another"), &once, "")
        .await
        .unwrap();
    assert_eq!(r.reason, "digest_mismatch");
    alerts_at_least(&d.db(), 33);
    digest
}

/// The log's alerts once there are at least `n`: the anomaly rules raise each just after its
/// stamp's records commit, so a stamp's answer can come before its alert is in the log.
fn alerts_at_least(db: &Path, n: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alerts = records(db, Some("alert"));
        if alerts.len() >= n {
            return alerts;
        }
        assert!(
            Instant::now() < deadline,
            "only {} alerts came",
            alerts.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn oracle(db: &Path, keep: impl Fn(&Record) -> bool) -> Vec<u64> {
    let mut seqs: Vec<u64> = records(db, None)
        .into_iter()
        .filter(|r| keep(r))
        .map(|r| r.seq)
        .collect();
    seqs.reverse();
    seqs.truncate(web::PAGE as usize);
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_filter_answers_within_the_auditors_scope() {
    let d = daemon();
    let digest = stamps(&d).await;
    let db = d.db();
    let qian = user("qian.li", Role::Auditor, &[], "qian li's long password");
    let wu = user(
        "wu.fei",
        Role::SiteAuditor,
        &["beijing"],
        "wu fei's long password",
    );
    let a = app(&d, vec![qian.clone(), wu.clone()], 3_600_000, &d.socket);
    let router = web::router(a.clone());

    // No session: pages send to the login, the live feed and the forms are refused.
    for path in [
        "/",
        "/sites",
        "/search",
        "/alerts",
        "/record/demo/1",
        "/export?format=csv",
    ] {
        let r = call(&router, "GET", path, "", None).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers[header::LOCATION], "/login", "{path}");
    }
    assert_eq!(
        call(&router, "GET", "/events", "", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(
            &router,
            "POST",
            "/alerts/demo/3/ack",
            "",
            Some("csrf=x&comment=y")
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    let forged = "sg_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_eq!(
        call(&router, "GET", "/", forged, None).await.status,
        StatusCode::SEE_OTHER
    );

    // A refused login is recorded with its reason; the page does not say which part was wrong.
    let r = try_login(&router, "qian.li", "wrong", &code(&qian, 0)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("用户名、密码或验证码错误"), "{}", r.body);
    let failed = records(&db, Some("console.login_failed"));
    assert_eq!(
        failed
            .iter()
            .map(|r| (r.applicant.as_str(), r.reason.as_str()))
            .collect::<Vec<_>>(),
        [("qian.li", "wrong_password")]
    );

    let cookie = login(&router, &qian, "qian li's long password", 0).await;
    let logins = records(&db, Some("console.login"));
    assert_eq!(logins.len(), 1);
    assert_eq!(logins[0].applicant, "qian.li");
    // The same code again: refused, however right the password.
    let r = try_login(
        &router,
        "qian.li",
        "qian li's long password",
        &code(&qian, 0),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        records(&db, Some("console.login_failed"))
            .last()
            .unwrap()
            .reason,
        "code_reused"
    );

    // Overview: the figures of `sealctl audit stats --since` for the same period.
    let r = call(&router, "GET", "/?days=30", &cookie, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let since = {
        let i = r.body.find("datetime=\"").unwrap() + 10;
        r.body[i..i + r.body[i..].find('"').unwrap()].to_string()
    };
    let out = Command::new(SEALCTL)
        .args(["audit", "stats", "--json", "--since", &since, "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for row in stats["stamps_per_seal_per_day"].as_array().unwrap() {
        let cell = format!(
            "<td>{}</td><td class=\"n\">{}</td>",
            row[1].as_str().unwrap(),
            row[2]
        );
        assert!(r.body.contains(&cell), "overview lacks {cell}");
    }
    for row in stats["denials_by_reason"].as_array().unwrap() {
        let cell = format!(
            "<td>{}</td><td class=\"n\">{}</td>",
            row[0].as_str().unwrap(),
            row[1]
        );
        assert!(r.body.contains(&cell), "overview lacks {cell}");
    }
    assert!(
        r.body
            .contains("<div class=\"figure\" id=\"stamps\">33</div>"),
        "three seals, 33 stamps"
    );
    let alerts = records(&db, Some("alert")).len();
    assert!(alerts >= 33, "an off_hours alert for each stamp");
    assert!(
        r.body.contains(&format!("id=\"open-alerts\">{alerts}<")),
        "none acknowledged yet"
    );
    let r = call(&router, "GET", "/?lang=en", &cookie, None).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let lang = r.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let r = call(&router, "GET", "/", &format!("{cookie}; {lang}"), None).await;
    assert!(r.body.contains("Stamps per seal") && r.body.contains("lang=\"en\""));
    let csp = r.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));

    // Sites: the one site, active, its head and checkpoint.
    let r = call(&router, "GET", "/sites", &cookie, None).await;
    assert!(r.body.contains("class=\"state active\""), "{}", r.body);

    // Search, each filter against the records read independently, newest first, 50 a page.
    let hexd = hex::encode(&digest);
    type Keep = Box<dyn Fn(&Record) -> bool>;
    let searches: Vec<(String, Keep)> = vec![
        (
            "seal=finance".into(),
            Box::new(|r: &Record| r.seal == "finance"),
        ),
        (
            "applicant=zhao.lei&kind=stamp.completed".into(),
            Box::new(|r: &Record| r.applicant == "zhao.lei" && r.kind == "stamp.completed"),
        ),
        (
            "approver=li.na".into(),
            Box::new(|r: &Record| r.approvers.contains("\"li.na\"")),
        ),
        (
            "doc_type=invoice".into(),
            Box::new(|r: &Record| r.doc_type == "invoice"),
        ),
        (
            format!("doc={hexd}"),
            Box::new(move |r: &Record| r.doc_sha256 == hexd),
        ),
        (
            "reason=replayed".into(),
            Box::new(|r: &Record| r.reason == "replayed"),
        ),
        (
            "kind=alert".into(),
            Box::new(|r: &Record| r.kind == "alert"),
        ),
        (
            "seal=contract".into(),
            Box::new(|r: &Record| r.seal == "contract"),
        ),
    ];
    for (q, keep) in &searches {
        let r = call(&router, "GET", &format!("/search?{q}"), &cookie, None).await;
        assert_eq!(r.status, StatusCode::OK, "{q}");
        let want = oracle(&db, keep);
        assert!(!want.is_empty(), "{q}: the test data has none");
        assert_eq!(linked_seqs(&r.body, "results"), want, "{q}");
        let recorded = records(&db, Some("console.search"));
        assert_eq!(
            recorded.last().unwrap().detail,
            *q,
            "the search is recorded as asked"
        );
    }
    // A time window: since the first stamp, until just after the tenth record.
    let all = records(&db, None);
    let (t0, t1) = (all[1].at_ms, all[9].at_ms + 1);
    let q = format!(
        "since={}&until={}&seal=contract",
        enc(&sealgate::console::pages::time(t0)),
        enc(&sealgate::console::pages::time(t1))
    );
    let r = call(&router, "GET", &format!("/search?{q}"), &cookie, None).await;
    assert_eq!(
        linked_seqs(&r.body, "results"),
        oracle(&db, |r| r.seal == "contract"
            && r.at_ms >= t0
            && r.at_ms < t1)
    );
    // Paging: the contract seal has more than a page; the second page goes on where it ended.
    let r = call(&router, "GET", "/search?seal=contract", &cookie, None).await;
    let first = linked_seqs(&r.body, "results");
    assert_eq!(first.len(), 50);
    let marker = "id=\"next-page\" href=\"";
    let i = r.body.find(marker).expect("a next page") + marker.len();
    let next = r.body[i..i + r.body[i..].find('"').unwrap()].replace("&amp;", "&");
    let r = call(&router, "GET", &next, &cookie, None).await;
    let second = linked_seqs(&r.body, "results");
    let contract: Vec<u64> = records(&db, None)
        .iter()
        .rev()
        .filter(|r| r.seal == "contract")
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        [first, second].concat(),
        contract[..contract.len().min(100)]
    );
    // A digest that is not one is refused before anything is read.
    let r = call(&router, "GET", "/search?doc=xyz", &cookie, None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Export: every matching record, CSV and JSON, recorded.
    let r = call(
        &router,
        "GET",
        "/export?format=csv&seal=finance",
        &cookie,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    let finance = records(&db, None)
        .into_iter()
        .filter(|r| r.seal == "finance")
        .count();
    assert_eq!(r.body.lines().count(), 1 + finance, "{}", r.body);
    let r = call(
        &router,
        "GET",
        "/export?format=json&seal=finance",
        &cookie,
        None,
    )
    .await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(rows.len(), finance);
    assert_eq!(rows[0]["site"], "demo");
    let exports = records(&db, Some("console.export"));
    assert_eq!(
        exports
            .iter()
            .map(|r| r.reason.as_str())
            .collect::<Vec<_>>(),
        ["csv", "json"]
    );

    // A record page: the whole process of a stamp.
    let official = records(&db, Some("stamp.completed"))
        .into_iter()
        .find(|r| r.seal == "official")
        .unwrap();
    let r = call(
        &router,
        "GET",
        &format!("/record/demo/{}", official.seq),
        &cookie,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for text in [
        "zhang.wei",
        "li.na",
        "dept_head",
        "executive",
        "signature_sha256",
        "id=\"checkpoint\">#",
        "sealctl audit verify --db",
    ] {
        assert!(r.body.contains(text), "the record page lacks {text}");
    }
    assert!(
        r.body
            .contains(&format!("/record/demo/{}", official.ref_seq.unwrap())),
        "its authorisation"
    );
    assert_eq!(
        call(&router, "GET", "/record/demo/999999", &cookie, None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // The site-auditor of another site sees none of this site.
    let wcookie = login(&router, &wu, "wu fei's long password", 0).await;
    assert_eq!(
        call(&router, "GET", "/record/demo/1", &wcookie, None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&router, "GET", "/search?site=demo", &wcookie, None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let r = call(&router, "GET", "/search?seal=contract", &wcookie, None).await;
    assert!(linked_seqs(&r.body, "results").is_empty());
    let r = call(&router, "GET", "/alerts", &wcookie, None).await;
    assert!(linked_seqs(&r.body, "alerts").is_empty());
    let r = call(&router, "GET", "/", &wcookie, None).await;
    assert!(r.body.contains("id=\"stamps\">0<"));

    // Alerts: acknowledging needs the session's CSRF token; the acknowledgement is a record.
    let r = call(&router, "GET", "/alerts", &cookie, None).await;
    let shown = linked_seqs(&r.body, "alerts");
    let alerts = oracle(&db, |r| r.kind == "alert");
    assert_eq!(shown, alerts);
    let token = csrf(&r.body);
    let target = alerts[0];
    let path = format!("/alerts/demo/{target}/ack");
    let r = call(
        &router,
        "POST",
        &path,
        &cookie,
        Some("csrf=forged&comment=x"),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = call(
        &router,
        "POST",
        &path,
        &wcookie,
        Some(&format!("csrf={token}&comment=x")),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "another session's token");
    let r = call(
        &router,
        "POST",
        &path,
        &cookie,
        Some(&format!("csrf={token}&comment={}", enc("已核实：测试用印"))),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    let acks = records(&db, Some("alert.acknowledged"));
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (
            acks[0].ref_seq,
            acks[0].applicant.as_str(),
            acks[0].detail.as_str()
        ),
        (Some(target), "qian.li", "已核实：测试用印")
    );
    let r = call(&router, "GET", "/alerts?open=1", &cookie, None).await;
    assert!(
        !linked_seqs(&r.body, "alerts").contains(&target),
        "acknowledged, so not open"
    );
    let r = call(&router, "GET", "/alerts", &cookie, None).await;
    assert!(r.body.contains("已确认: qian.li"));
    // The daemon refuses to acknowledge what is not an alert: nothing is recorded.
    let not_alert = records(&db, Some("stamp.completed"))[0].seq;
    let r = call(
        &router,
        "POST",
        &format!("/alerts/demo/{not_alert}/ack"),
        &cookie,
        Some(&format!("csrf={token}&comment=x")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(records(&db, Some("alert.acknowledged")).len(), 1);

    // Log-out ends the session.
    let r = call(
        &router,
        "POST",
        "/logout",
        &cookie,
        Some(&format!("csrf={token}")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(
        call(&router, "GET", "/", &cookie, None).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(records(&db, Some("console.logout")).len(), 1);
    assert_eq!(
        audit_verify(&db).0,
        0,
        "the log verifies with the console's records in it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_nothing_happens_unrecorded() {
    let d = daemon();
    let sun = user("sun.yu", Role::Auditor, &[], "sun yu's long password");
    // Idle for a second and the session is gone.
    let router = web::router(app(&d, vec![sun.clone()], 1_000, &d.socket));
    let cookie = login(&router, &sun, "sun yu's long password", 0).await;
    assert_eq!(
        call(&router, "GET", "/", &cookie, None).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = call(&router, "GET", "/", &cookie, None).await;
    assert_eq!(
        (r.status, r.headers[header::LOCATION].to_str().unwrap()),
        (StatusCode::SEE_OTHER, "/login")
    );

    // The daemon out of reach: a right login is refused, since it cannot be recorded.
    let gone = d.dir.path().join("no-such.sock");
    let router = web::router(app(&d, vec![sun.clone()], 60_000, &gone));
    let r = try_login(&router, "sun.yu", "sun yu's long password", &code(&sun, 1)).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.headers.get(header::SET_COOKIE).is_none(),
        "no session without its record"
    );

    // A caller that is not the console may not write console records.
    let plain = Daemon::start(&Opts::default());
    let mut c = Client::connect(&plain.socket).await.unwrap();
    let r = c
        .call(sealgate::protocol::request::Body::RecordOversight(
            sealgate::protocol::pb::RecordOversightRequest {
                kind: "console.login".into(),
                user: "mallory".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        sealgate::protocol::Status::PermissionDenied as i32,
        "{}",
        r.message
    );
    // Nor may the console write any other kind, or unbounded text.
    let mut c = Client::connect(&d.socket).await.unwrap();
    for (kind, user, detail) in [
        ("stamp.completed", "x", String::new()),
        ("console.login", "", String::new()),
        ("console.search", "x", "y".repeat(3000)),
    ] {
        let r = c
            .call(sealgate::protocol::request::Body::RecordOversight(
                sealgate::protocol::pb::RecordOversightRequest {
                    kind: kind.into(),
                    user: user.into(),
                    detail,
                    ..Default::default()
                },
            ))
            .await
            .unwrap();
        assert_eq!(
            r.status,
            sealgate::protocol::Status::InvalidArgument as i32,
            "{kind}: {}",
            r.message
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_show_what_went_where_and_what_keeps_failing() {
    use common::receivers::{received, secret_file, Receiver};
    let d = daemon();
    let mut c = Client::connect(&d.socket).await.unwrap();
    for doc in ["lease 1", "lease 2", "lease 3"] {
        stamp_ok(&mut c, "contract", &sha256(doc.as_bytes())).await;
    }
    let alerts: Vec<u64> = alerts_at_least(&d.db(), 3).iter().map(|r| r.seq).collect();
    assert_eq!(alerts.len(), 3, "an off_hours alert for each stamp");
    // One pass of alert delivery: the webhook takes every alert, the other channel is down.
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let out = w.join("received");
    std::fs::create_dir(&out).unwrap();
    let secret = secret_file(w, "hook.secret", "a webhook key of the site's own");
    let (http, down) = (free_port(), free_port());
    let _receiver = Receiver::http(http, &secret, &secret, &out);
    let config = w.join("notify.toml");
    std::fs::write(
        &config,
        format!(
            "site = \"demo\"\ndb = \"{}\"\noutbox = \"outbox.db\"\nfrom_beginning = true\n\n\
             [[channel]]\nid = \"keeper-hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{http}/hook\"\nsecret_file = \"{secret}\"\n\n\
             [[channel]]\nid = \"risk-hook\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{down}/hook\"\nsecret_file = \"{secret}\"\n\n\
             [[route]]\nchannels = [\"keeper-hook\", \"risk-hook\"]\n",
            d.db().display()
        ),
    )
    .unwrap();
    let pass = Command::new(SEALCTL)
        .args(["notify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        pass.status.code(),
        Some(1),
        "a channel is still failing: {pass:?}"
    );
    assert_eq!(received(&out, "hook").len(), 3);

    let qian = user("qian.li", Role::Auditor, &[], "qian li's long password");
    let router = web::router(app_with_outbox(
        &d,
        vec![qian.clone()],
        60_000,
        &d.socket,
        Some(w.join("outbox.db")),
    ));
    let cookie = login(&router, &qian, "qian li's long password", 0).await;
    let r = call(&router, "GET", "/deliveries", &cookie, None).await;
    assert_eq!(r.status, StatusCode::OK);
    for (id, n) in [("delivered", 3), ("waiting", 0), ("failing", 3)] {
        assert!(
            r.body.contains(&format!("id=\"{id}\">{n}<")),
            "{id} should be {n}: {}",
            r.body
        );
    }
    assert_eq!(
        linked_seqs(&r.body, "deliveries")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        alerts.iter().copied().collect()
    );
    assert!(r.body.contains("risk-hook") && r.body.contains("失败重试中 ×1"));
    assert!(
        r.body.contains("onnection refused"),
        "the last error is shown: {}",
        r.body
    );
    // Each alert on the timeline says where it went and where it is still failing.
    let r = call(&router, "GET", "/alerts", &cookie, None).await;
    for seq in &alerts {
        let row = &r.body[r.body.find(&format!("id=\"alert-{seq}\"")).unwrap()..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(
            row.contains("keeper-hook: <span class=\"state active\">已送达"),
            "{row}"
        );
        assert!(
            row.contains("risk-hook: <span class=\"state silent\""),
            "{row}"
        );
    }
    // A console told of no outbox says so.
    let router = web::router(app(&d, vec![qian.clone()], 60_000, &d.socket));
    let cookie = login(&router, &qian, "qian li's long password", 1).await;
    let r = call(&router, "GET", "/deliveries", &cookie, None).await;
    assert!(r.body.contains("id=\"no-outbox\""));
}

/// The console binary, serving over TLS.
struct Console {
    child: Child,
    port: u16,
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Writes a console configuration for `d` in `dir` with one auditor and starts the binary.
fn start_console(d: &Daemon, dir: &Path, password: &str) -> (Console, serde_json::Value) {
    start_console_with(d, dir, password, "127.0.0.1:0", "")
}

/// [`start_console`] listening on `listen`, with `more` appended to its configuration.
fn start_console_with(
    d: &Daemon,
    dir: &Path,
    password: &str,
    listen: &str,
    more: &str,
) -> (Console, serde_json::Value) {
    let pki = pki::Pki::new(dir);
    std::fs::write(dir.join("auditor.password"), password).unwrap();
    let users = dir.join("users.toml");
    let out = Command::new(SEALGATE_CONSOLE)
        .args([
            "add-user", "--name", "qian.li", "--role", "auditor", "--json", "--users",
        ])
        .arg(&users)
        .arg("--password-file")
        .arg(dir.join("auditor.password"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let enrolment: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = dir.join("console.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{listen}\"\nsite = \"demo\"\ndb = \"{}\"\nsocket = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nusers = \"{}\"\n{more}",
            d.db().display(),
            d.socket.display(),
            pki.path("server.crt"),
            pki.path("server.key"),
            users.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(SEALGATE_CONSOLE)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(evidence_dir().join("console.log")).unwrap())
        .spawn()
        .unwrap();
    let lines = wait_for_line(&mut child, |l| l.starts_with("console at https://"));
    let url = lines.last().unwrap();
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    (Console { child, port }, enrolment)
}

/// chromedriver on a port of its own, driving Debian's Chromium headless. It runs in a process
/// group of its own with the browsers it starts, and the whole group goes when the test ends
/// (also when it fails before closing its session), so no Chromium outlives its test.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_driver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver(child, port)
}

async fn browser(driver: &Driver, profile: &Path) -> fantoccini::Client {
    let caps = serde_json::json!({
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.1))
        .await
        .expect("a WebDriver session in Chromium")
}

async fn wait_js(b: &fantoccini::Client, what: &str, script: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = b.execute(script, vec![]).await.unwrap();
        if !v.is_null() && v != serde_json::Value::Bool(false) {
            return v;
        }
        if Instant::now() > deadline {
            let page = b
                .execute(
                    "return location.href + '\\n' + document.body.innerText;",
                    vec![],
                )
                .await
                .unwrap();
            panic!("timed out waiting for {what}; the page: {page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shot(b: &fantoccini::Client, name: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), b.screenshot().await.unwrap()).unwrap();
}

/// Text of the table with this id: [[cells of a row]], header row left out.
const TABLE: &str = "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tr')).slice(1).map(r => Array.from(r.cells).map(c => c.textContent));";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_works_through_the_console_in_chromium() {
    use fantoccini::Locator;
    let d = daemon();
    let digest = stamps(&d).await;
    let work = tempfile::tempdir().unwrap();
    let password = "a password of qian li's own";
    let (console, enrolment) = start_console(&d, work.path(), password);
    let totp = totp_rs::Totp::from_url(enrolment["otpauth_uri"].as_str().unwrap()).unwrap();
    note_secret(&totp.secret().to_base32());
    let driver = start_driver();
    let b = browser(&driver, &work.path().join("chromium")).await;
    let base = format!("https://localhost:{}", console.port);

    // Log in with password and TOTP code.
    b.goto(&format!("{base}/")).await.unwrap();
    assert!(b.current_url().await.unwrap().path() == "/login");
    shot(&b, "login.png").await;
    b.find(Locator::Id("user"))
        .await
        .unwrap()
        .send_keys("qian.li")
        .await
        .unwrap();
    b.find(Locator::Id("password"))
        .await
        .unwrap()
        .send_keys(password)
        .await
        .unwrap();
    b.find(Locator::Id("code"))
        .await
        .unwrap()
        .send_keys(&totp_code(&totp, 0))
        .await
        .unwrap();
    b.find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The overview with its charts drawn: the canvases hold pixels.
    wait_js(
        &b,
        "the stamps chart",
        "return document.querySelector('#chart-stamps[data-drawn]') !== null;",
    )
    .await;
    let painted = wait_js(
        &b,
        "painted charts",
        "const n = Array.from(document.querySelectorAll('.chart canvas')).map(c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let k = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) k++; return k; }); return n.length === 2 && n.every(k => k > 500) ? n : null;",
    )
    .await;
    assert_eq!(painted.as_array().unwrap().len(), 2);
    // Its figures are `sealctl audit stats`'s for the same period.
    let since = b
        .execute(
            "return document.getElementById('since').getAttribute('datetime');",
            vec![],
        )
        .await
        .unwrap();
    let out = Command::new(SEALCTL)
        .args([
            "audit",
            "stats",
            "--json",
            "--since",
            since.as_str().unwrap(),
            "--db",
        ])
        .arg(d.db())
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shown = b
        .execute(TABLE, vec!["stamps-per-seal".into()])
        .await
        .unwrap();
    let mut per_seal = std::collections::BTreeMap::<String, u64>::new();
    for row in stats["stamps_per_seal_per_day"].as_array().unwrap() {
        *per_seal.entry(row[1].as_str().unwrap().into()).or_default() += row[2].as_u64().unwrap();
    }
    let shown: std::collections::BTreeMap<String, u64> = shown
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, per_seal);
    let refusals = b
        .execute(TABLE, vec!["refusals-by-reason".into()])
        .await
        .unwrap();
    let want: Vec<serde_json::Value> = stats["denials_by_reason"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| serde_json::json!([r[0], r[1].to_string()]))
        .collect();
    assert_eq!(refusals.as_array().unwrap(), &want);
    shot(&b, "overview.png").await;

    // Search a document digest and open its completed stamp.
    b.goto(&format!("{base}/search")).await.unwrap();
    b.find(Locator::Id("f-doc"))
        .await
        .unwrap()
        .send_keys(&hex::encode(&digest))
        .await
        .unwrap();
    b.find(Locator::Id("f-kind"))
        .await
        .unwrap()
        .send_keys("stamp.completed")
        .await
        .unwrap();
    b.find(Locator::Id("search"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let rows = wait_js(&b, "results", "const t = document.getElementById('results'); return location.search.includes('doc=') && t ? t.rows.length - 1 : null;").await;
    assert_eq!(rows, 30, "thirty stamps of that contract");
    shot(&b, "search.png").await;
    b.find(Locator::Css("#results a"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let approvers = wait_js(
        &b,
        "the record page",
        "const t = document.getElementById('approvers'); return t ? t.textContent : null;",
    )
    .await;
    assert!(approvers.as_str().unwrap().contains("zhang.wei"));
    shot(&b, "record.png").await;

    // Acknowledge the newest alert with a comment.
    b.goto(&format!("{base}/alerts")).await.unwrap();
    let first = b.find(Locator::Css("#alerts tbody tr")).await.unwrap();
    let id = first.attr("id").await.unwrap().unwrap();
    first
        .find(Locator::Css("input[name=comment]"))
        .await
        .unwrap()
        .send_keys("已核实")
        .await
        .unwrap();
    first
        .find(Locator::Css("button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let acked = wait_js(&b, "the acknowledgement", &format!("const r = document.getElementById('{id}'); return r && r.querySelector('.acked') ? r.querySelector('.acked').textContent : null;")).await;
    assert!(
        acked.as_str().unwrap().contains("qian.li") && acked.as_str().unwrap().contains("已核实")
    );
    let acks = records(&d.db(), Some("alert.acknowledged"));
    assert_eq!(format!("alert-{}", acks[0].ref_seq.unwrap()), id);

    // A new alert appears on the open page without a reload.
    b.execute("window.__same_page = true;", vec![])
        .await
        .unwrap();
    let before = records(&d.db(), Some("alert")).len();
    let mut c = Client::connect(&d.socket).await.unwrap();
    stamp_ok(&mut c, "finance", &sha256(b"invoice 78")).await;
    let newest = alerts_at_least(&d.db(), before + 1).last().unwrap().seq;
    wait_js(&b, "the live alert", &format!("const r = document.getElementById('alert-{newest}'); return r !== null && r.className === 'new' && window.__same_page === true;")).await;
    shot(&b, "alerts-live.png").await;

    // The sites board and the deliveries page, in English this time.
    b.goto(&format!("{base}/sites?lang=en")).await.unwrap();
    let state = wait_js(
        &b,
        "the sites board",
        "const s = document.querySelector('#sites .state'); return s ? s.textContent : null;",
    )
    .await;
    assert_eq!(state, "Active");
    shot(&b, "sites.png").await;
    b.goto(&format!("{base}/deliveries")).await.unwrap();
    let none = wait_js(
        &b,
        "the deliveries page",
        "const p = document.getElementById('no-outbox'); return p ? p.textContent : null;",
    )
    .await;
    assert!(none
        .as_str()
        .unwrap()
        .starts_with("No alert delivery configured"));

    // The log records the auditor's login and search, and still verifies.
    let kinds: BTreeSet<String> = records(&d.db(), None).into_iter().map(|r| r.kind).collect();
    for k in ["console.login", "console.search", "alert.acknowledged"] {
        assert!(kinds.contains(k), "{k} was not recorded");
    }
    b.close().await.unwrap();
    assert_eq!(audit_verify(&d.db()).0, 0);
}

/// Headquarters' console: two real sites ship their logs to a real `sealgate-hq` on the
/// tests' own PostgreSQL; the console reads every site's verified records as a role that may
/// only read and add its own events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headquarters_console_shows_every_site_within_the_auditors_scope() {
    use common::hq::{hq_command, hq_config, wait_caught_up, HqNode, Site};
    use common::postgres::{Postgres, OWNER};
    use sealgate::console::central::CentralLog;
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::Pki::new(dir.path());
    let sites = [Site::start("shanghai", &pki), Site::start("beijing", &pki)];
    let specs: Vec<(&str, &str, &Path)> = sites
        .iter()
        .map(|s| (s.id.as_str(), s.fingerprint.as_str(), s.audit_pem.as_path()))
        .collect();
    let node = HqNode::start(dir.path(), &pg, |port| hq_config(&pki, &pg, port, &specs));
    // Shanghai stamps one document twice (a restamp alert) and 14 more; Beijing 10 and a
    // refused replay.
    let mut c = sites[0].daemon.client().await;
    let twice = sha256(b"shanghai lease");
    stamp_ok(&mut c, "contract", &twice).await;
    stamp_ok(&mut c, "contract", &twice).await;
    for i in 0..14 {
        stamp_ok(&mut c, "contract", &sha256(format!("sh {i}").as_bytes())).await;
    }
    let mut c = sites[1].daemon.client().await;
    for i in 0..10 {
        stamp_ok(&mut c, "contract", &sha256(format!("bj {i}").as_bytes())).await;
    }
    let once = token_for("contract", &sha256(b"bj contract"));
    c.stamp("contract", &sha256(b"bj contract"), &once, "")
        .await
        .unwrap();
    let r = c
        .stamp("contract", &sha256(b"bj contract"), &once, "")
        .await
        .unwrap();
    assert_denied(&r, "replayed", "a spent approval");
    alerts_at_least(&sites[0].daemon.db(), 1);
    for s in &sites {
        let (code, out) = s.ship_once(&pki, &node.addr);
        assert_eq!(code, 0, "{out}");
        wait_caught_up(&pg, s);
    }
    // The console's own role: it reads, and adds its own events.
    pg.psql("CREATE ROLE sealgate_console LOGIN");
    let (code, out) = hq_command(
        &node.config,
        &[
            "migrate",
            "--grant-console",
            "sealgate_console",
            "--url",
            &pg.url(OWNER),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let database = sealgate::hq::config::DatabaseConfig {
        url: pg.url("sealgate_console"),
        ca: None,
        pool_size: 2,
    };
    let db = || sealgate::hq::db::Db::connect(&database).unwrap();
    let qian = user("qian.li", Role::Auditor, &[], "qian li's long password");
    let wu = user(
        "wu.fei",
        Role::SiteAuditor,
        &["beijing"],
        "wu fei's long password",
    );
    let app = Arc::new(App {
        approvals: None,
        data: Arc::new(CentralLog {
            db: db(),
            silent_after_ms: 600_000,
        }),
        auth: Auth::new(
            UserFile {
                users: vec![qian.clone(), wu.clone()],
            },
            3_600_000,
            3_600_000,
            100,
        ),
        recorder: Recorder::Central(db()),
        site: "HQ".into(),
        db_hint: "SITE-LOG.db".into(),
        key_hint: "audit.pem".into(),
        live: tokio::sync::broadcast::channel(16).0,
        outbox: None,
        overviews: Default::default(),
    });
    let router = web::router(app.clone());
    let cookie = login(&router, &qian, "qian li's long password", 0).await;
    let wcookie = login(&router, &wu, "wu fei's long password", 0).await;

    // The sites board: both, caught up, heard from.
    let r = call(&router, "GET", "/sites", &cookie, None).await;
    for s in ["shanghai", "beijing"] {
        let row = &r.body[r.body.find(&format!("id=\"site-{s}\"")).expect(s)..];
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(
            row.contains("state active") && row.contains("<td class=\"n lag\">0</td>"),
            "{row}"
        );
    }
    let r = call(&router, "GET", "/sites", &wcookie, None).await;
    assert!(r.body.contains("site-beijing") && !r.body.contains("site-shanghai"));

    // The overview: every site's stamps for the auditor, Beijing's for its site-auditor.
    let completed = |site: &str| {
        pg.number(&format!(
            "SELECT count(*) FROM records WHERE kind = 'stamp.completed' AND site LIKE '{site}'"
        ))
    };
    let r = call(&router, "GET", "/", &cookie, None).await;
    assert!(
        r.body
            .contains(&format!("id=\"stamps\">{}<", completed("%"))),
        "{}",
        r.body
    );
    assert!(r.body.contains("<td>replayed</td><td class=\"n\">1</td>"));
    for site in ["shanghai", "beijing"] {
        let cell = format!(">{site}</a></td><td class=\"n\">{}</td>", completed(site));
        assert!(r.body.contains(&cell), "the overview by site lacks {cell}");
    }
    let r = call(&router, "GET", "/", &wcookie, None).await;
    assert!(r
        .body
        .contains(&format!("id=\"stamps\">{}<", completed("beijing"))));
    assert!(!r.body.contains(">shanghai</a>"));

    // Search across sites, newest first, 50 a page: two pages hold every record once.
    let all = pg.number("SELECT count(*) FROM records") as usize;
    assert!(all > 50, "{all} records");
    let sites_linked = |body: &str| -> Vec<(String, u64)> {
        body.split("href=\"/record/")
            .skip(1)
            .map(|p| {
                let (site, rest) = p.split_once('/').unwrap();
                let n: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                (site.to_string(), n.parse().unwrap())
            })
            .collect()
    };
    let r = call(&router, "GET", "/search", &cookie, None).await;
    let first = sites_linked(&r.body);
    assert_eq!(first.len(), 50);
    let marker = "id=\"next-page\" href=\"";
    let i = r.body.find(marker).unwrap() + marker.len();
    let next = r.body[i..i + r.body[i..].find('"').unwrap()].replace("&amp;", "&");
    let r = call(&router, "GET", &next, &cookie, None).await;
    let mut seen: BTreeSet<(String, u64)> = first.into_iter().collect();
    let second = sites_linked(&r.body);
    assert_eq!(second.len(), all - 50, "{next}");
    seen.extend(second);
    assert_eq!(seen.len(), all, "every record once");
    let r = call(
        &router,
        "GET",
        "/search?kind=stamp.completed",
        &wcookie,
        None,
    )
    .await;
    let linked = sites_linked(&r.body);
    assert_eq!(linked.len() as i64, completed("beijing"));
    assert!(linked.iter().all(|(s, _)| s == "beijing"));
    let r = call(&router, "GET", "/search?site=shanghai", &wcookie, None).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // A record: its approvers and the checkpoint HQ verified it under.
    let seq = pg.number(
        "SELECT min(seq) FROM records WHERE site = 'shanghai' AND kind = 'stamp.completed'",
    );
    let r = call(
        &router,
        "GET",
        &format!("/record/shanghai/{seq}"),
        &cookie,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.contains("zhang.wei") && r.body.contains("id=\"checkpoint\">#"),
        "{}",
        r.body
    );
    let r = call(
        &router,
        "GET",
        &format!("/record/shanghai/{seq}"),
        &wcookie,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    // The restamp alert, acknowledged: a row of console_events in the console role's name.
    let r = call(&router, "GET", "/alerts?open=1", &cookie, None).await;
    let alert = pg.number(
        "SELECT seq FROM records WHERE site = 'shanghai' AND kind = 'alert' AND reason = 'restamp'",
    );
    assert!(
        r.body.contains(&format!("id=\"alert-{alert}\"")),
        "{}",
        r.body
    );
    let token = csrf(&r.body);
    let r = call(
        &router,
        "POST",
        &format!("/alerts/shanghai/{alert}/ack"),
        &cookie,
        Some(&format!("csrf={token}&comment=checked")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.body);
    assert_eq!(
        pg.psql("SELECT console || ' ' || auditor || ' ' || site || ' ' || ref_seq || ' ' || detail FROM console_events WHERE kind = 'alert.acknowledged'"),
        format!("sealgate_console qian.li shanghai {alert} checked")
    );
    let r = call(&router, "GET", "/alerts?open=1", &cookie, None).await;
    assert!(!r.body.contains(&format!("id=\"alert-{alert}\"")));
    let r = call(&router, "GET", "/alerts", &cookie, None).await;
    assert!(r.body.contains("已确认: qian.li"));
    // What is not an alert cannot be acknowledged; nothing is written.
    let r = call(
        &router,
        "POST",
        &format!("/alerts/shanghai/{seq}/ack"),
        &cookie,
        Some(&format!("csrf={token}&comment=x")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        pg.number("SELECT count(*) FROM console_events WHERE kind = 'alert.acknowledged'"),
        1
    );
    // Logins and searches are there too, and the console's role can change nothing.
    assert_eq!(
        pg.number("SELECT count(*) FROM console_events WHERE kind = 'console.login'"),
        2
    );
    // Two pages and a site-auditor's search; the refused one was not done, so not recorded.
    assert_eq!(
        pg.number("SELECT count(*) FROM console_events WHERE kind = 'console.search'"),
        3
    );
    for sql in [
        "UPDATE console_events SET detail = 'x'",
        "DELETE FROM console_events",
        "INSERT INTO console_events (console, auditor, kind, reason, detail) VALUES ('someone', 'x', 'console.login', '', '')",
        "DELETE FROM records",
        "INSERT INTO alerts (site, kind, detail) VALUES ('shanghai', 'gap', 'x')",
        "UPDATE sites SET head_seq = 0",
    ] {
        assert!(pg.try_psql_as_role("sealgate_console", sql).is_err(), "{sql} was allowed");
    }

    // The live feed: a new alert at Beijing, once shipped, comes after where the feed was.
    let heads = app.data.alert_heads().await.unwrap();
    stamp_ok(&mut c, "contract", &sha256(b"bj 0")).await;
    alerts_at_least(&sites[1].daemon.db(), 1);
    let (code, out) = sites[1].ship_once(&pki, &node.addr);
    assert_eq!(code, 0, "{out}");
    wait_caught_up(&pg, &sites[1]);
    let new = app.data.alerts_after(heads).await.unwrap();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        (new[0].site.as_str(), new[0].record.reason.as_str()),
        ("beijing", "restamp")
    );

    // The binary serves the same from a configuration naming HQ's database.
    let users = dir.path().join("users.toml");
    UserFile { users: vec![qian] }.save(&users).unwrap();
    let config = dir.path().join("console.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nsite = \"HQ\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nusers = \"{}\"\n\n[hq_database]\nurl = \"{}\"\n",
            pki.path("server.crt"),
            pki.path("server.key"),
            users.display(),
            pg.url("sealgate_console"),
        ),
    )
    .unwrap();
    let mut child = Command::new(SEALGATE_CONSOLE)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(evidence_dir().join("console-hq.log")).unwrap())
        .spawn()
        .unwrap();
    let lines = wait_for_line(&mut child, |l| l.starts_with("console at https://"));
    let console = Console { child, port: 0 };
    assert!(lines
        .last()
        .unwrap()
        .starts_with("console at https://127.0.0.1:"));
    drop(console);
}

/// One DevTools command through chromedriver's CDP endpoint (the WebAuthn virtual
/// authenticator has no WebDriver command of its own in chromedriver).
async fn cdp(
    driver: &Driver,
    b: &fantoccini::Client,
    cmd: &str,
    params: serde_json::Value,
) -> serde_json::Value {
    use std::io::{Read, Write};
    let session = b.session_id().await.unwrap().unwrap();
    let body = serde_json::json!({ "cmd": cmd, "params": params }).to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", driver.1)).unwrap();
    write!(
        s,
        "POST /session/{session}/goog/cdp/execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then as many bytes as it says (chromedriver may keep the connection).
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let answer = loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{cmd}: chromedriver closed the connection");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break text;
            }
        }
    };
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{cmd}: {e}: {answer}"));
    assert!(v["value"].get("error").is_none(), "{cmd}: {v}");
    v["value"].clone()
}

/// The claims of a token file.
fn claims_of(path: &Path) -> sealgate::token::Claims {
    sealgate::token::Token::parse_for_signing(&std::fs::read(path).unwrap())
        .unwrap()
        .claims
}

/// Clicks the element with this id.
async fn click(b: &fantoccini::Client, id: &str) {
    b.find(fantoccini::Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Signs `who` in at the approval page (the virtual authenticator answers).
async fn approver_signs_in(b: &fantoccini::Client, base: &str, who: &str) {
    b.goto(&format!("{base}/approvals/login")).await.unwrap();
    b.find(fantoccini::Locator::Id("approver-id"))
        .await
        .unwrap()
        .send_keys(who)
        .await
        .unwrap();
    click(b, "approver-login-button").await;
    wait_js(
        b,
        "the approver's list",
        &format!("return location.pathname == '/approvals' && document.getElementById('approver')?.textContent == '{who}';"),
    )
    .await;
}

/// Clicks approve (or reject, with a reason) on the open application page; the result line.
async fn decide_in_page(b: &fantoccini::Client, reject: Option<&str>) -> (String, String) {
    if let Some(reason) = reject {
        b.find(fantoccini::Locator::Id("reason"))
            .await
            .unwrap()
            .send_keys(reason)
            .await
            .unwrap();
        click(b, "reject").await;
    } else {
        click(b, "approve").await;
    }
    let v = wait_js(
        b,
        "the decision's result",
        "const r = document.getElementById('decision-result'); return r.dataset.state ? [r.dataset.state, r.textContent] : null;",
    )
    .await;
    (
        v[0].as_str().unwrap().to_owned(),
        v[1].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvers_register_passkeys_and_approve_in_chromium_and_the_daemon_stamps() {
    use common::receivers::{received, secret_file, Receiver};
    let port = free_port();
    let base = format!("https://localhost:{port}");
    let demo = demo();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sealgated.sock");
    let opts = Opts {
        extra: format!("\n[webauthn]\norigins = [\"{base}\"]\n"),
        ..Opts::default()
    };
    let text = config_text(demo, &socket, &opts).replacen(
        "admin = true\n",
        "admin = true\noversight = true\n",
        1,
    );
    let d = Daemon::start_with(dir, &text, &[]).unwrap_or_else(|f| panic!("daemon: {f:?}"));
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let approvers = w.join("approvers.toml");
    let (_console, _) = start_console_with(
        &d,
        w,
        "an auditor's password here",
        &format!("127.0.0.1:{port}"),
        &format!(
            "\n[approvals]\nrp_id = \"localhost\"\norigin = \"{base}\"\napprovers = \"{}\"\n",
            approvers.display()
        ),
    );
    let driver = start_driver();
    let b = browser(&driver, &w.join("chromium")).await;
    b.goto(&format!("{base}/approvals/login")).await.unwrap();
    cdp(&driver, &b, "WebAuthn.enable", serde_json::json!({})).await;
    let authenticator = cdp(
        &driver,
        &b,
        "WebAuthn.addVirtualAuthenticator",
        serde_json::json!({"options": {
            "protocol": "ctap2", "transport": "internal", "hasResidentKey": true,
            "hasUserVerification": true, "isUserVerified": true,
            "automaticPresenceSimulation": true,
        }}),
    )
    .await["authenticatorId"]
        .as_str()
        .unwrap()
        .to_owned();

    // An administrator invites two approvers; each registers a passkey through the page, which
    // shows the trust-store entry to add.
    let mut trust = String::new();
    for (id, role, dept) in [
        ("chen.jing", "dept_head", "sales"),
        ("sun.li", "executive", "management"),
    ] {
        let out = Command::new(SEALGATE_CONSOLE)
            .args(["invite", "--config"])
            .arg(w.join("console.toml"))
            .args(["--approver", id, "--role", role, "--department", dept])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let link = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(
            link.starts_with(&format!("{base}/register?invite=")),
            "{link}"
        );
        b.goto(&link).await.unwrap();
        click(&b, "register-button").await;
        let state = wait_js(
            &b,
            "the registration",
            "const r = document.getElementById('register-result'); return r.dataset.state ? [r.dataset.state, r.textContent] : null;",
        )
        .await;
        assert_eq!(state[0], "registered", "{state}");
        if id == "chen.jing" {
            shot(&b, "approval-register.png").await;
        }
        let shown = b
            .execute(
                "return document.getElementById('register-entry').textContent;",
                vec![],
            )
            .await
            .unwrap();
        let entry = shown.as_str().unwrap().to_owned();
        let head = format!(
            "[[approver]]\nid = \"{id}\"\nrole = \"{role}\"\ndepartment = \"{dept}\"\n\n[[approver.passkey]]\n"
        );
        assert!(entry.starts_with(&head), "{entry}");
        assert!(entry.contains("rp_id = \"localhost\""), "{entry}");
        trust += &format!("\n{entry}");
        // An invitation opens once.
        b.goto(&link).await.unwrap();
        wait_js(&b, "a spent invitation", "return document.body.innerText.includes('No such invitation') || document.body.innerText.includes('邀请无效');").await;
    }
    let registered = records(&d.db(), Some("console.passkey_registered"));
    assert_eq!(registered.len(), 2);
    assert!(registered[0].detail.contains("trust_store_entry"));
    // The administrator adds the entries to the trust store and reloads.
    let config = d.dir.path().join("sealgate.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &trust;
    std::fs::write(&config, text).unwrap();
    assert!(d.reload_next().contains("configuration reloaded"));

    // The applicant prepares the contract's PDF and submits the application with it.
    let sealctl = |args: &[&str]| {
        Command::new(SEALCTL)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .unwrap()
    };
    let p = |name: &str| w.join(name).to_str().unwrap().to_owned();
    std::fs::write(
        w.join("contract.pdf"),
        contract_pdf("Supply contract 2026-131"),
    )
    .unwrap();
    let out = sealctl(&[
        "pdf",
        "prepare",
        &p("contract.pdf"),
        "--seal",
        "contract",
        "--page",
        "1",
        "--at",
        "120,30",
        "--size",
        "40",
        "--out",
        &p("prepared.pdf"),
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = sealctl(&[
        "token",
        "new",
        "--pdf",
        &p("prepared.pdf"),
        "--seal",
        "contract",
        "--doc-type",
        "contract",
        "--title",
        "供货合同 2026-131",
        "--amount-minor",
        "25000000",
        "--currency",
        "CNY",
        "--dept",
        "sales",
        "--applicant",
        "zhao.lei",
        "--purpose",
        "supplier contract",
        "--out",
        &p("application.json"),
        "--submit",
    ]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let claims = claims_of(&w.join("application.json"));
    let id = claims.jti.clone();
    assert!(
        said.contains(&format!("application {id}: pending")),
        "{said}"
    );
    assert!(said.contains("waiting for  dept_head of sales"), "{said}");
    // Not yet approved: fetching says so.
    let out = sealctl(&["token", "fetch", &id]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");

    // The approvers are told through alert delivery, with a link to the page.
    let secret = secret_file(w, "hook.secret", "the approvers' webhook key");
    let http = free_port();
    let hooks = w.join("received");
    std::fs::create_dir(&hooks).unwrap();
    let _receiver = Receiver::http(http, &secret, &secret, &hooks);
    let notify = w.join("notify.toml");
    std::fs::write(
        &notify,
        format!(
            "site = \"demo\"\ndb = \"{}\"\noutbox = \"outbox.db\"\nfrom_beginning = true\n\n\
             [[channel]]\nid = \"approvers\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{http}/hook\"\nsecret_file = \"{secret}\"\n\n\
             [[route]]\nrules = [\"approval_pending\"]\nchannels = [\"approvers\"]\n",
            d.db().display()
        ),
    )
    .unwrap();
    let pass = Command::new(SEALCTL)
        .args(["notify", "--config"])
        .arg(&notify)
        .output()
        .unwrap();
    assert!(pass.status.success(), "{pass:?}");
    let sent = received(&hooks, "hook");
    assert_eq!(sent.len(), 1, "{sent:?}");
    let text = sent[0].to_string();
    assert!(text.contains("approval_pending"), "{text}");
    assert!(text.contains(&format!("{base}/approvals/{id}")), "{text}");

    // Level 1: the department head signs in with the passkey, sees the application with its
    // first page, and approves.
    approver_signs_in(&b, &base, "chen.jing").await;
    let rows = b.execute(TABLE, vec!["waiting".into()]).await.unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert!(rows.to_string().contains("供货合同 2026-131"), "{rows}");
    b.goto(&format!("{base}/approvals/{id}")).await.unwrap();
    let facts = b
        .execute(TABLE, vec!["facts".into()])
        .await
        .unwrap()
        .to_string();
    for shown in [
        "250000.00 CNY",
        "zhao.lei",
        "supplier contract",
        &claims.doc.sha256,
    ] {
        assert!(facts.contains(shown), "{shown} in {facts}");
    }
    wait_js(
        &b,
        "the first page",
        "const i = document.getElementById('first-page'); return i && i.complete && i.naturalWidth > 500;",
    )
    .await;
    // The seal's image is where the prepared PDF places it: red pixels on the rendered page.
    let red = b
        .execute(
            "const i = document.getElementById('first-page'); const c = document.createElement('canvas'); c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext('2d'); x.drawImage(i, 0, 0); const d = x.getImageData(0, 0, c.width, c.height).data; let n = 0; for (let k = 0; k < d.length; k += 4) { if (d[k] > 170 && d[k+1] < 90 && d[k+2] < 90) n++; } return n;",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        red.as_u64().unwrap() > 200,
        "seal-red pixels on the first page: {red}"
    );
    shot(&b, "approval-page.png").await;
    let (state, said) = decide_in_page(&b, None).await;
    assert_eq!(state, "pending", "{said}");
    assert!(said.contains("1 / 2"), "{said}");

    // Level 2, first without user verification (a page that asks for none): the daemon
    // refuses it at the level that requires it, and nothing is recorded.
    approver_signs_in(&b, &base, "sun.li").await;
    b.goto(&format!("{base}/approvals/{id}")).await.unwrap();
    cdp(
        &driver,
        &b,
        "WebAuthn.setUserVerified",
        serde_json::json!({"authenticatorId": authenticator, "isUserVerified": false}),
    )
    .await;
    b.execute(
        "const get = navigator.credentials.get.bind(navigator.credentials); navigator.credentials.get = (o) => { o.publicKey.userVerification = 'discouraged'; return get(o); };",
        vec![],
    )
    .await
    .unwrap();
    let (state, said) = decide_in_page(&b, None).await;
    assert_eq!(state, "refused", "{said}");
    assert!(said.contains("webauthn_user_verification"), "{said}");
    assert_eq!(records(&d.db(), Some("application.approved")).len(), 1);
    cdp(
        &driver,
        &b,
        "WebAuthn.setUserVerified",
        serde_json::json!({"authenticatorId": authenticator, "isUserVerified": true}),
    )
    .await;
    b.goto(&format!("{base}/approvals/{id}")).await.unwrap();
    let (state, said) = decide_in_page(&b, None).await;
    assert_eq!(state, "approved", "{said}");

    // The applicant fetches the whole token and the daemon stamps the PDF with it on SoftHSM.
    let out = sealctl(&["token", "fetch", &id, "--out", &p("approved.json")]);
    assert!(out.status.success(), "{out:?}");
    let out = sealctl(&[
        "stamp",
        "--seal",
        "contract",
        "--pdf",
        &p("prepared.pdf"),
        "--token",
        &p("approved.json"),
        "--out",
        &p("stamped.pdf"),
    ]);
    assert!(out.status.success(), "{out:?}");
    let stamped = records(&d.db(), Some("stamp.completed"));
    let last = stamped.last().unwrap();
    assert_eq!(last.jti, id);
    let approvers: serde_json::Value = serde_json::from_str(&last.approvers).unwrap();
    assert_eq!(approvers[0]["id"], "chen.jing");
    assert_eq!(approvers[0]["level"], 1);
    assert_eq!(approvers[1]["id"], "sun.li");
    assert_eq!(approvers[1]["level"], 2);
    assert_eq!(approvers[1]["passkey"]["user_verified"], true);
    for (kind, n) in [
        ("application.submitted", 1),
        ("application.pending", 2),
        ("application.approved", 2),
    ] {
        assert_eq!(records(&d.db(), Some(kind)).len(), n, "{kind}");
    }

    // A rejection ends another application with its reason; an application of the approver's
    // own is not theirs to decide.
    for (applicant, title) in [("zhao.lei", "lease 7"), ("chen.jing", "lease 8")] {
        let out = sealctl(&[
            "token",
            "new",
            "--sha256",
            &hex::encode(sha256(title.as_bytes())),
            "--seal",
            "contract",
            "--doc-type",
            "contract",
            "--title",
            title,
            "--dept",
            "sales",
            "--applicant",
            applicant,
            "--out",
            &p(&format!("{title}.json")),
            "--submit",
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    let jti_of = |name: &str| claims_of(&w.join(name)).jti;
    let (lease7, lease8) = (jti_of("lease 7.json"), jti_of("lease 8.json"));
    approver_signs_in(&b, &base, "chen.jing").await;
    let rows = b
        .execute(TABLE, vec!["waiting".into()])
        .await
        .unwrap()
        .to_string();
    assert!(
        rows.contains("lease 7") && !rows.contains("lease 8"),
        "{rows}"
    );
    // The contract's first page, rendered for chen.jing at level 1, is not shown to them now
    // that the application waits for nobody.
    let status = b
        .execute_async(
            "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => done(r.status));",
            vec![format!("/approvals/{id}/page.png").into()],
        )
        .await
        .unwrap();
    assert_eq!(status, 404, "a decided application's page");
    b.goto(&format!("{base}/approvals/{lease8}")).await.unwrap();
    wait_js(
        &b,
        "not mine",
        "return !!document.getElementById('not-mine');",
    )
    .await;
    b.goto(&format!("{base}/approvals/{lease7}")).await.unwrap();
    let (state, said) =
        decide_in_page(&b, Some("the counterparty is not on the supplier list")).await;
    assert_eq!(state, "rejected", "{said}");
    let out = sealctl(&["token", "fetch", &lease7]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("rejected by  chen.jing: the counterparty is not on the supplier list"));
    let rejected = records(&d.db(), Some("application.rejected"));
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].jti, lease7);
    let logins = records(&d.db(), Some("console.login"));
    assert!(logins.iter().filter(|r| r.applicant == "chen.jing").count() >= 2);
    let (code, out) = audit_verify(&d.db());
    assert_eq!(code, 0, "{out}");
    b.close().await.unwrap();
}
