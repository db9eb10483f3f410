//! sealgate-console: the auditors' console. Serves read-only pages over a site's audit log
//! (opened read-only), or over every site's records at headquarters (PostgreSQL), over TLS,
//! to auditors who log in with a password and a TOTP code; their logins, searches, exports and
//! acknowledgements are appended to the log through the daemon, or to HQ's console_events.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sealgate::console::auth::{self, Auth, Role, User, UserFile};
use sealgate::console::central::CentralLog;
use sealgate::console::data::{ConsoleData, SiteLog};
use sealgate::console::web::{self, App, Recorder};
use sealgate::console::ConsoleConfig;
use sealgate::hq::db::Db;
use sealgate::logging::LogFormat;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sealgate-console",
    version,
    about = "The auditors' console: the audit log in a browser, read-only"
)]
struct Args {
    #[arg(long, env = "SEALGATE_LOG_FORMAT", value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the pages until SIGTERM.
    Serve {
        #[arg(
            long,
            env = "SEALGATE_CONSOLE_CONFIG",
            default_value = "/etc/sealgate/console.toml"
        )]
        config: PathBuf,
    },
    /// Add an auditor to the user file (made with mode 0600 if absent), or replace one of the
    /// same name; prints the TOTP enrolment (QR code and URI) once.
    AddUser {
        /// The user file (the console configuration's `users`).
        #[arg(long)]
        users: PathBuf,
        #[arg(long)]
        name: String,
        /// auditor (every site) or site-auditor (the --site ones).
        #[arg(long, value_parser = ["auditor", "site-auditor"])]
        role: String,
        #[arg(long = "site")]
        sites: Vec<String>,
        /// A file holding the password (its first line); without it the password is read
        /// from standard input.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Print the enrolment as JSON ({"name", "otpauth_uri"}) instead of a QR code.
        #[arg(long)]
        json: bool,
    },
    /// Invite an approver to register a passkey at the approval page ([approvals]); prints the
    /// link to send them (good for --hours, once). A new invitation replaces an open one.
    Invite {
        #[arg(
            long,
            env = "SEALGATE_CONSOLE_CONFIG",
            default_value = "/etc/sealgate/console.toml"
        )]
        config: PathBuf,
        /// The approver's id in the daemon's trust store...
        #[arg(long)]
        approver: String,
        /// ...their role there...
        #[arg(long)]
        role: String,
        /// ...and department.
        #[arg(long, default_value = "")]
        department: String,
        #[arg(long, default_value_t = 72)]
        hours: u64,
        /// Print the link as a QR code too (for a phone).
        #[arg(long)]
        qr: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    sealgate::logging::init(args.log_format, "sealgate-console");
    match args.command {
        Command::AddUser {
            users,
            name,
            role,
            sites,
            password_file,
            json,
        } => add_user(users, name, role, sites, password_file, json),
        Command::Invite {
            config,
            approver,
            role,
            department,
            hours,
            qr,
        } => {
            let config = ConsoleConfig::load(&config)?;
            let approvals = config
                .approvals
                .as_ref()
                .context("the console configuration has no [approvals]")?;
            let link = sealgate::console::approvals::invite(
                approvals,
                &approver,
                &role,
                &department,
                hours,
            )?;
            if qr {
                let code = qrcode::QrCode::new(link.as_bytes()).context("QR code")?;
                println!(
                    "{}",
                    code.render::<qrcode::render::unicode::Dense1x2>()
                        .quiet_zone(true)
                        .build()
                );
            }
            println!("{link}");
            Ok(())
        }
        Command::Serve { config } => {
            let config = ConsoleConfig::load(&config)?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(config))
        }
    }
}

fn add_user(
    users: PathBuf,
    name: String,
    role: String,
    sites: Vec<String>,
    password_file: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let password = zeroize::Zeroizing::new(match password_file {
        Some(p) => std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        None => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    });
    if password.chars().count() < 12 {
        anyhow::bail!("the password must be at least 12 characters");
    }
    let mut file = if users.exists() {
        UserFile::load(&users)?
    } else {
        UserFile::default()
    };
    let user = User {
        name: name.clone(),
        role: if role == "auditor" {
            Role::Auditor
        } else {
            Role::SiteAuditor
        },
        sites,
        password: auth::hash_password(&password).map_err(anyhow::Error::msg)?,
        totp: auth::new_totp_secret().map_err(anyhow::Error::msg)?,
    };
    let uri = zeroize::Zeroizing::new(auth::otpauth_uri(&user).map_err(anyhow::Error::msg)?);
    file.users.retain(|u| u.name != name);
    file.users.push(user);
    file.save(&users)?;
    // Loaded again: what was written must be what serve accepts.
    UserFile::load(&users)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "otpauth_uri": uri.as_str()})
        );
    } else {
        let qr = qrcode::QrCode::new(uri.as_bytes()).context("QR code")?;
        println!(
            "{}",
            qr.render::<qrcode::render::unicode::Dense1x2>()
                .quiet_zone(true)
                .build()
        );
        println!("{}", *uri);
        println!("Scan the code or enter the URI in {name}'s authenticator app.");
    }
    Ok(())
}

async fn serve(config: ConsoleConfig) -> anyhow::Result<()> {
    let users = UserFile::load(&config.users)?;
    if users.users.is_empty() {
        anyhow::bail!(
            "{} names no auditor; add one with `sealgate-console add-user`",
            config.users.display()
        );
    }
    let tls = sealgate::tls::browser_server_config(&config.tls_cert, &config.tls_key)
        .map_err(anyhow::Error::msg)?;
    let (live, _) = tokio::sync::broadcast::channel(256);
    // What the pages read and where the console's own records go: a site's log and its
    // daemon, or headquarters' database. Either must answer before anyone is told the console
    // is up.
    let (data, recorder, db_hint): (Arc<dyn ConsoleData>, Recorder, String) =
        match (&config.db, &config.socket, &config.hq_database) {
            (Some(db), Some(socket), None) => {
                sealgate::audit::query::open_read_only(db)
                    .with_context(|| format!("cannot open the audit log {}", db.display()))?;
                let data = SiteLog {
                    site: config.site.clone(),
                    db: db.clone(),
                    silent_after_ms: config.silent_after_ms,
                };
                let uid = config
                    .daemon_uid
                    .unwrap_or_else(|| nix::unistd::getuid().as_raw());
                let hint = std::fs::canonicalize(db)
                    .unwrap_or_else(|_| db.clone())
                    .display()
                    .to_string();
                (Arc::new(data), Recorder::new(socket.clone(), uid), hint)
            }
            (None, None, Some(database)) => {
                let db = Db::connect(database)?;
                db.check_schema().await?;
                let data = CentralLog {
                    db,
                    silent_after_ms: config.silent_after_ms,
                };
                let recorder = Recorder::Central(Db::connect(database)?);
                // A record at HQ is checked from the site's own log, or HQ's copy of it.
                let hint = "SITE-LOG.db (or `sealctl hq query`)".to_string();
                (Arc::new(data), recorder, hint)
            }
            _ => anyhow::bail!("give a site's db and socket, or headquarters' hq_database"),
        };
    let app = Arc::new(App {
        data,
        auth: Auth::new(
            users,
            config.session_minutes as i64 * 60_000,
            config.idle_minutes as i64 * 60_000,
            config.max_sessions,
        ),
        recorder,
        site: config.site.clone(),
        db_hint,
        key_hint: config.audit_key.as_ref().map_or_else(
            || "AUDIT_KEY.pub.pem".to_string(),
            |k| {
                std::fs::canonicalize(k)
                    .unwrap_or_else(|_| k.clone())
                    .display()
                    .to_string()
            },
        ),
        live,
        outbox: config.outbox.clone(),
        overviews: Default::default(),
        approvals: config.approvals.clone().map(|a| {
            sealgate::console::approvals::Approvals::new(
                a,
                config.session_minutes as i64 * 60_000,
                config.idle_minutes as i64 * 60_000,
            )
        }),
    });
    tokio::spawn(web::watch_alerts(app.clone(), Duration::from_secs(1)));
    // The overview most auditors open first, made before the first of them asks.
    let warm = app.clone();
    tokio::spawn(async move {
        if let Err(e) = warm
            .overview(&sealgate::console::data::Scope::All, 30)
            .await
        {
            tracing::warn!(error = %e, "cannot make the overview");
        }
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, site = config.site, "sealgate-console is serving");
    println!("console at https://{addr}/");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    web::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        web::router(app),
        config.max_connections,
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        },
    )
    .await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!("sealgate-console stopped");
    Ok(())
}
