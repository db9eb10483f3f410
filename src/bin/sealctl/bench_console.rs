//! `sealctl bench`'s console part: the auditors' console (the real `sealgate-console` binary,
//! over TLS) on a log of (by default) a million records, browsed by (by default) 50 sessions at
//! once, each logged in with its own password and TOTP code and walking the pages an auditor
//! walks: the overview, searches by seal, applicant and document, record pages, the alerts.
//! It prints, per page, the answers and their p50/p95/p99 latency, and pages per second.

use super::bench::{audit_device, in_parallel, say};
use anyhow::{bail, Context as _};
use sealgate::audit::{anomaly::Anomaly, kind, log::AuditKey, log::AuditLog, Record};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const APPLICANTS: [&str; 8] = [
    "zhao.lei", "qian.yu", "sun.hao", "li.ming", "zhou.jie", "wu.fang", "zheng.bo", "wang.lan",
];
const SEALS: [&str; 3] = ["contract", "finance", "official"];
const DOC_TYPES: [&str; 4] = ["contract", "invoice", "notice", "lease"];

/// Builds a log of about `n` records as a busy site's: authorisations and their completed
/// stamps (three seals, eight applicants, four document types), a refusal every 50 stamps, an
/// alert every 40; checkpoints signed by the demo token's audit key, as the daemon does.
fn build_log(
    demo: &Path,
    state: &Path,
    n: u64,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let store = sealgate::store::Store::open(state)?;
    let log = AuditLog::open(
        store.path().to_owned(),
        AuditKey {
            device: Arc::new(audit_device(demo)?),
            key: 0,
        },
        Anomaly::none(),
        String::new(),
    )?;
    let writer_log = log.clone();
    in_parallel(runtime, 512, n / 2, move |i| {
        let log = writer_log.clone();
        async move {
            let mut r = Record::new(kind::STAMP_AUTHORIZED);
            r.caller = "oa-system".into();
            r.seal = SEALS[(i % 3) as usize].into();
            r.device = "demo-hsm".into();
            r.applicant = APPLICANTS[(i % 8) as usize].into();
            r.doc_sha256 = format!("{:064x}", i / 2);
            r.doc_type = DOC_TYPES[(i % 4) as usize].into();
            r.amount = Some((i % 1000) as i64 * 10_000);
            r.currency = "CNY".into();
            r.dept = "sales".into();
            r.approvers =
                r#"[{"id":"wang.fang","role":"finance","level":1,"approved_at":1796600000}]"#
                    .into();
            r.jti = format!("bench-{i}");
            let seq = log.append(r.clone()).await?;
            if i % 50 == 49 {
                r.kind = kind::STAMP_DENIED.into();
                r.reason = "replayed".into();
                r.detail = format!("approval \"bench-{i}\" was already used");
                log.append(r).await?;
                return Ok(());
            }
            let mut done = r;
            done.kind = kind::STAMP_COMPLETED.into();
            done.ref_seq = Some(seq);
            done.evidence =
                format!(r#"{{"algorithm":"ecdsa-p256-sha256","signature_sha256":"{i:064x}"}}"#);
            let done_seq = log.append(done.clone()).await?;
            if i % 40 == 0 {
                let mut a = Record::new(kind::ALERT);
                a.seal = done.seal;
                a.applicant = done.applicant;
                a.reason = "off_hours".into();
                a.detail = "used outside working hours".into();
                a.ref_seq = Some(done_seq);
                log.append(a).await?;
            }
            Ok(())
        }
    })?;
    log.shutdown();
    Ok(())
}

/// The console process, stopped when dropped.
struct ConsoleProcess(Child);

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

struct Session {
    agent: ureq::Agent,
    base: String,
    cookie: String,
}

impl Session {
    fn login(
        ca: &[u8],
        base: &str,
        user: &str,
        password: &str,
        totp: &totp_rs::Totp,
    ) -> anyhow::Result<Session> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(
                TlsConfig::builder()
                    .root_certs(RootCerts::new_with_certs(&[Certificate::from_pem(ca)?]))
                    .build(),
            )
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let resp = agent.post(format!("{base}/login")).send_form([
            ("user", user),
            ("password", password),
            ("code", &totp.generate(now).to_string()),
        ])?;
        if resp.status() != 303 {
            bail!("login of {user}: HTTP {}", resp.status());
        }
        let cookie = resp
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .context("no session cookie")?
            .to_string();
        Ok(Session {
            agent,
            base: base.to_string(),
            cookie,
        })
    }

    /// One page: its latency, or an error for anything but 200.
    fn get(&self, path: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .call()?;
        let body = resp.body_mut().read_to_string()?;
        let took = start.elapsed();
        if resp.status() != 200 || body.len() < 100 {
            bail!("GET {path}: HTTP {}", resp.status());
        }
        Ok(took)
    }
}

/// The pages an auditor walks, in turn: (name, path) for step `i` of session `s`.
fn page(i: u64, s: u64, records: u64) -> (&'static str, String) {
    let k = i.wrapping_mul(7919).wrapping_add(s * 104_729);
    match i % 6 {
        0 => ("overview (30 days)", "/?days=30".into()),
        1 => (
            "search by seal",
            format!("/search?seal={}", SEALS[(k % 3) as usize]),
        ),
        2 => (
            "search by applicant and type",
            format!(
                "/search?applicant={}&doc_type={}",
                APPLICANTS[(k % 8) as usize],
                DOC_TYPES[(k % 4) as usize]
            ),
        ),
        3 => (
            "search by document digest",
            format!("/search?doc={:064x}", k % (records / 4).max(1)),
        ),
        4 => (
            "record page",
            format!("/record/bench/{}", 1 + k % records.max(1)),
        ),
        _ => ("alerts", "/alerts".into()),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Runs the console part; its figures as JSON.
#[allow(clippy::too_many_arguments)]
pub fn run(
    demo: &Path,
    dir: &Path,
    daemon_socket: &Path,
    records: u64,
    sessions: u64,
    seconds: f64,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<serde_json::Value> {
    say!("\n== the auditors' console: {records} records, {sessions} sessions ==");
    let state = dir.join("console-log");
    let build = Instant::now();
    build_log(demo, &state, records, runtime)?;
    let db = sealgate::store::db_path(&state);
    let total = {
        let c = sealgate::audit::query::open_read_only(&db)?;
        c.query_row("SELECT count(*) FROM audit", [], |r| r.get::<_, i64>(0))? as u64
    };
    say!(
        "built a log of {total} records in {:.1} s",
        build.elapsed().as_secs_f64()
    );

    // Auditors, each with a password and a TOTP secret of their own.
    let users = dir.join("console-users.toml");
    let mut file = sealgate::console::auth::UserFile::default();
    let password = "bench auditor's password";
    for s in 0..sessions {
        file.users.push(sealgate::console::auth::User {
            name: format!("auditor-{s}"),
            role: sealgate::console::auth::Role::Auditor,
            sites: vec![],
            password: sealgate::console::auth::hash_password(password)
                .map_err(anyhow::Error::msg)?,
            totp: sealgate::console::auth::new_totp_secret().map_err(anyhow::Error::msg)?,
        });
    }
    file.save(&users)?;
    let config = dir.join("console.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nsite = \"bench\"\ndb = \"{}\"\nsocket = \"{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nusers = \"{}\"\nmax_sessions = {}\n",
            db.display(),
            daemon_socket.display(),
            demo.join("console/tls.crt").display(),
            demo.join("console/tls.key").display(),
            users.display(),
            sessions.max(1) * 2,
        ),
    )?;
    let binary: PathBuf = std::env::current_exe()?
        .parent()
        .context("sealctl has no directory")?
        .join("sealgate-console");
    let mut child = Command::new(&binary)
        .args(["serve", "--config"])
        .arg(&config)
        .env("SEALGATE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("console.log"))?)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let out = child.stdout.take().context("console stdout")?;
    let console = ConsoleProcess(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("console at https://127.0.0.1:")
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .with_context(|| format!("the console said {line:?}"))?;
    let base = format!("https://localhost:{port}");
    let ca = std::fs::read(demo.join("ca/ca.crt"))?;

    let logins = Instant::now();
    let mut clients = Vec::new();
    for u in &file.users {
        let totp = totp_rs::Totp::from_url(
            sealgate::console::auth::otpauth_uri(u).map_err(anyhow::Error::msg)?,
        )?;
        clients.push(Session::login(&ca, &base, &u.name, password, &totp)?);
    }
    let login_ms = logins.elapsed().as_secs_f64() * 1000.0 / sessions.max(1) as f64;
    say!("{sessions} logins (argon2id and TOTP): {login_ms:.0} ms each, one after another");

    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(s, session)| {
            std::thread::spawn(move || -> anyhow::Result<Vec<(&'static str, Duration)>> {
                let mut seen = Vec::new();
                let mut i = s as u64; // sessions start at different pages
                while Instant::now() < deadline {
                    let (name, path) = page(i, s as u64, total);
                    seen.push((name, session.get(&path)?));
                    i += 1;
                }
                Ok(seen)
            })
        })
        .collect();
    let mut by_page: std::collections::BTreeMap<&str, Vec<Duration>> = Default::default();
    for t in threads {
        for (name, took) in t
            .join()
            .map_err(|_| anyhow::anyhow!("a session panicked"))??
        {
            by_page.entry(name).or_default().push(took);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(console);
    let mut pages = Vec::new();
    let mut all = 0usize;
    say!(
        "{:<30} {:>8} {:>9} {:>9} {:>9}",
        "page",
        "answers",
        "p50 ms",
        "p95 ms",
        "p99 ms"
    );
    for (name, mut times) in by_page {
        times.sort();
        all += times.len();
        let (p50, p95, p99) = (
            percentile(&times, 0.5),
            percentile(&times, 0.95),
            percentile(&times, 0.99),
        );
        say!(
            "{name:<30} {:>8} {p50:>9.1} {p95:>9.1} {p99:>9.1}",
            times.len()
        );
        pages.push(serde_json::json!({"page": name, "answers": times.len(), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}));
    }
    let rate = all as f64 / elapsed;
    say!("{all} pages in {elapsed:.1} s: {rate:.0} pages/s");
    Ok(serde_json::json!({
        "records": total,
        "sessions": sessions,
        "login_ms": login_ms,
        "pages_per_second": rate,
        "pages": pages,
    }))
}
