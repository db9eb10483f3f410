//! sealgate-hq: headquarters. Accepts each site's shipper over TLS with its pinned certificate,
//! verifies what it sends against the site's head in PostgreSQL, and stores only what verified.
//! Nodes are stateless: several on one database take turns on a site through its head's row
//! lock.

use anyhow::Context;
use clap::{Parser, Subcommand};
use sealgate::hq::config::HqConfig;
use sealgate::hq::db::{Db, Enrolment};
use sealgate::hq::server::{self, Hq, Limits};
use sealgate::logging::LogFormat;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sealgate-hq",
    version,
    about = "Headquarters: every site's audit log, verified, in PostgreSQL"
)]
struct Args {
    #[arg(
        long,
        env = "SEALGATE_HQ_CONFIG",
        default_value = "/etc/sealgate-hq/hq.toml"
    )]
    config: PathBuf,
    #[arg(long, env = "SEALGATE_LOG_FORMAT", value_enum, default_value = "auto")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept shippers until SIGTERM.
    Serve,
    /// Create or bring up to date the schema (as the database's owner), and enrol the
    /// configured sites.
    Migrate {
        /// The role `serve` connects as: it is granted what serving needs (reading, inserting,
        /// moving heads) and nothing else.
        #[arg(long)]
        grant: Option<String>,
        /// The role the auditors' console (sealgate-console with [hq_database]) connects as: it
        /// may read what the console shows and add its own events, nothing else.
        #[arg(long)]
        grant_console: Option<String>,
        /// Connect as the owner with this connection string instead of database.url.
        #[arg(long, env = "SEALGATE_HQ_ADMIN_URL")]
        url: Option<String>,
    },
    /// Print the witness public key (SPKI PEM), for the sites' `--hq-key`.
    WitnessKey,
    /// Enrol a site again with the audit key its [[site]] now names (its device was replaced,
    /// its log started again): what HQ holds of it stays as one epoch, its new log is the next.
    Enrol {
        #[arg(long)]
        site: String,
        /// Why, kept with the enrolment.
        #[arg(long)]
        reason: String,
    },
    /// Configuration fragments for sites, signed with HQ's policy key.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the policy public key (SPKI PEM), for the sites' `[hq_policy] key_file`.
    Key,
    /// Sign a fragment (TOML: [[caller]], [[approver]], [[applicant]], [[seal]], [alerts])
    /// as the site's next version and publish it; the site's shipper fetches it at its next
    /// hello.
    Publish {
        #[arg(long)]
        site: String,
        /// The fragment's body.
        file: PathBuf,
    },
    /// Print the newest fragment published for a site.
    Show {
        #[arg(long)]
        site: String,
    },
}

fn main() {
    let args = Args::parse();
    sealgate::logging::init(args.log_format, "sealgate-hq");
    // The crash-point tests arm points by FAILPOINTS; only a build with the feature reads it.
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sealgate-hq: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("sealgate-hq: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = HqConfig::load(&args.config)?;
    let sites = config.sites()?;
    match args.command {
        Command::Migrate {
            grant,
            grant_console,
            url,
        } => {
            let mut database = config.database.clone();
            if let Some(u) = url {
                database.url = u;
            }
            let db = Db::connect(&database)?;
            let version = db
                .migrate(grant.as_deref(), grant_console.as_deref())
                .await?;
            enrol(&db, &sites).await?;
            println!("schema version {version}; {} sites enrolled", sites.len());
            Ok(())
        }
        Command::WitnessKey => {
            let w = config
                .witness
                .as_ref()
                .context("the configuration has no [witness]")?
                .open("witness")
                .map_err(anyhow::Error::msg)?;
            print!(
                "{}",
                sealgate::device::keys::pem("PUBLIC KEY", &w.key.spki_der)
            );
            Ok(())
        }
        Command::Policy(p) => policy(&config, p).await,
        Command::Enrol { site, reason } => {
            let s = sites
                .iter()
                .find(|s| s.id == site)
                .with_context(|| format!("no [[site]] {site:?} in the configuration"))?;
            if reason.trim().is_empty() {
                anyhow::bail!("give the reason for the new enrolment (--reason)");
            }
            let db = Db::connect(&config.database)?;
            db.check_schema().await?;
            let (epoch, before) = db.reenrol(s, &reason).await?;
            tracing::info!(
                site,
                epoch,
                key = s.audit_key.key_id,
                previous_head = before.seq,
                "site enrolled again"
            );
            println!(
                "site {site}: epoch {epoch} enrolled with audit key {}; epoch {} ends at seq {}",
                s.audit_key.key_id, before.epoch, before.seq
            );
            Ok(())
        }
        Command::Serve => {
            let db = Db::connect(&config.database)?;
            serve(config, sites, db).await
        }
    }
}

async fn policy(config: &HqConfig, command: PolicyCommand) -> anyhow::Result<()> {
    let key = || {
        config
            .policy
            .as_ref()
            .context("the configuration has no [policy]")?
            .open("policy")
            .map_err(anyhow::Error::msg)
    };
    match command {
        PolicyCommand::Key => {
            print!(
                "{}",
                sealgate::device::keys::pem("PUBLIC KEY", &key()?.key.spki_der)
            );
        }
        PolicyCommand::Publish { site, file } => {
            let body = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // HQ publishes only what a site can read; the site checks it again against its
            // own configuration.
            let sections = sealgate::hq::policy::Body::parse(&body)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
                .sections();
            let key = key()?;
            let db = Db::connect(&config.database)?;
            db.check_schema().await?;
            let f = db
                .publish_policy(&site, body, |f| {
                    f.key_id = key.key.key_id.clone();
                    f.algorithm = key.key.algorithm.name().to_owned();
                    f.signature = key.sign(&f.message())?;
                    Ok(())
                })
                .await?;
            tracing::info!(site, version = f.version, "policy fragment published");
            println!(
                "site {site}: policy version {} published ({}; {})",
                f.version,
                if sections.is_empty() {
                    "no sections".to_owned()
                } else {
                    sections.join(", ")
                },
                f.digest()
            );
        }
        PolicyCommand::Show { site } => {
            let db = Db::connect(&config.database)?;
            match db.newest_policy(&site).await? {
                Some(f) => {
                    println!(
                        "# site {site}, version {}, issued {} ms, key {}, {}",
                        f.version,
                        f.issued_at_ms,
                        f.key_id,
                        f.digest()
                    );
                    print!("{}", f.body);
                }
                None => println!("# site {site}: no fragment published"),
            }
        }
    }
    Ok(())
}

async fn enrol(db: &Db, sites: &[sealgate::hq::config::Site]) -> anyhow::Result<()> {
    for (site, e) in sites.iter().zip(db.enrol(sites).await?) {
        match e {
            Enrolment::New => {
                tracing::info!(site = site.id, key = site.audit_key.key_id, "site enrolled")
            }
            Enrolment::Same => {}
            Enrolment::KeyDiffers {
                enrolled,
                configured,
            } => tracing::error!(
                site = site.id,
                enrolled,
                configured,
                "the configured audit key is not the one enrolled; the enrolled key stays in force until `sealgate-hq enrol --site ID --reason ...`"
            ),
        }
    }
    Ok(())
}

async fn serve(
    config: HqConfig,
    sites: Vec<sealgate::hq::config::Site>,
    db: Db,
) -> anyhow::Result<()> {
    db.check_schema().await?;
    enrol(&db, &sites).await?;
    let limits = Limits {
        max_batch_records: config.hq.max_batch_records,
        max_frame: config.hq.max_frame_bytes,
        idle_timeout: Duration::from_millis(config.hq.idle_timeout_ms),
    };
    let witness = match &config.witness {
        Some(w) => {
            let w = w.open("witness").map_err(anyhow::Error::msg)?;
            tracing::info!(
                key = w.key.key_id,
                "witness key ready: every verified checkpoint is cosigned"
            );
            Some(w)
        }
        None => None,
    };
    let hq = Arc::new(Hq::new(db, sites, limits, witness));
    tokio::spawn(server::watch_silence(
        hq.clone(),
        Duration::from_millis(config.hq.silence_after_ms),
    ));
    let raiser = hq.clone();
    let runtime = tokio::runtime::Handle::current();
    let on_refused: sealgate::tls::OnRefused = Arc::new(move |fp: [u8; 32]| {
        let hq = raiser.clone();
        runtime.spawn(async move {
            let who = format!("certificate {}", hex::encode(fp));
            hq.raise(
                &who,
                "unknown_site",
                None,
                &format!("a TLS client with {who}, which no site is enrolled with, was refused"),
            )
            .await;
        });
    });
    let tls = sealgate::tls::pinned_server_config(
        &config.hq.cert,
        &config.hq.key,
        hq.pins(),
        Some(on_refused),
    )
    .map_err(anyhow::Error::msg)?;
    tokio::spawn(server::refresh_metrics(hq.clone(), Duration::from_secs(1)));
    if let Some(addr) = config.hq.metrics_listen {
        let metrics = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        tracing::info!(%addr, "metrics at GET /metrics");
        tokio::spawn(sealgate::metrics::serve_text(metrics, || {
            sealgate::hq::metrics::get().encode()
        }));
    }
    let listener = tokio::net::TcpListener::bind(&config.hq.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.hq.listen))?;
    tracing::info!(listen = config.hq.listen, "sealgate-hq is serving");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(server::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        hq,
        stop_rx,
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // Batches in flight are transactions: one cut short is rolled back by the database and
    // sent again by its shipper from HQ's head.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = serving.await;
    tracing::info!("sealgate-hq stopped");
    Ok(())
}
