//! sealgated: args → config → logging → devices → socket → serve until SIGTERM.
//!
//! Start-up is all or nothing: any problem (config, module, token, PIN, key, socket) ends the
//! process with one line on stderr naming it and a non-zero exit, before the socket exists.

use anyhow::{bail, Context};
use clap::Parser;
use sealgate::audit::{kind, Record};
use sealgate::config::Config;
use sealgate::device::{Health, Registry};
use sealgate::logging::LogFormat;
use sealgate::server::{self, Limits, Listener};
use sealgate::service::Service;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sealgated", version, about = "The sealgate daemon")]
struct Args {
    /// Configuration file.
    #[arg(
        long,
        env = "SEALGATE_CONFIG",
        default_value = "/etc/sealgate/sealgate.toml"
    )]
    config: PathBuf,
    /// Check the configuration and open every device, then exit.
    #[arg(long)]
    check: bool,
    /// Log format: auto is the systemd journal when stderr goes to it, text otherwise.
    #[arg(long, env = "SEALGATE_LOG_FORMAT", value_enum, default_value = "auto")]
    log_format: LogFormat,
}

fn main() {
    let args = Args::parse();
    sealgate::logging::init(args.log_format, "sealgated");
    // The crash-point tests arm points by FAILPOINTS; only a build with the feature reads it.
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    if let Err(e) = run(args) {
        eprintln!("sealgated: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // No core dumps: a dump of this process would hold PINs and TOTP secrets in the clear.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the process as not dumpable");
    }
    let mut config = sealgate::service::load_config(&args.config)?;
    // The fragment from HQ in force (if this site takes them) goes on the file's policy.
    let policy = sealgate::hq::policy::restore(&mut config).map_err(anyhow::Error::msg)?;
    if let Some(f) = &policy {
        tracing::info!(version = f.version, "HQ policy fragment in force");
    }
    if nix::unistd::geteuid().is_root() && !config.daemon.allow_root {
        bail!(
            "refusing to run as root; run as a dedicated user, or set daemon.allow_root = true in {}",
            args.config.display()
        );
    }
    let registry = Registry::open(&config)?;
    let limits = Limits {
        max_frame: config.daemon.max_frame_bytes,
        max_connections: config.daemon.max_connections,
        max_per_uid: config.daemon.per_uid_connections(),
        max_strangers: config.daemon.stranger_connections(),
        request_timeout: Duration::from_millis(config.daemon.request_timeout_ms),
    };
    let config_dir = args
        .config
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let (devices, seals) = (registry.devices.len(), registry.seals.len());
    if args.check {
        for w in Service::check(&config, &registry, &config_dir)? {
            eprintln!("sealgated: warning: {w}");
        }
        println!(
            "configuration {} is valid; {devices} device(s) and {seals} seal(s) ready; the audit log's tail verifies",
            args.config.display(),
        );
        return Ok(());
    }
    let service = Arc::new(Service::new(&config, registry, &args.config, policy)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    service.start_terminals(runtime.handle().clone())?;
    if let Some(l) = &config.terminal_listener {
        serve_terminals(l, &config, service.clone())?;
    }
    runtime.block_on(async move {
        let listener = match Listener::from_systemd()? {
            Some(l) => {
                tracing::info!("using the socket passed by systemd");
                l
            }
            None => Listener::bind(&config.daemon.socket, config.daemon.socket_group.as_deref())?,
        };
        if let Some(addr) = config.daemon.metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            tracing::info!(%addr, "serving metrics at /metrics");
            tokio::spawn(sealgate::metrics::serve(metrics));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot watch SIGTERM")?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("cannot watch SIGINT")?;
        tokio::spawn(watch_devices(service.clone()));
        if config.audit.heartbeat_seconds > 0 {
            tokio::spawn(heartbeat(
                service.clone(),
                Duration::from_secs(config.audit.heartbeat_seconds),
            ));
        }
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch SIGHUP")?;
        tokio::spawn(reload_on_hangup(
            hangup,
            service.clone(),
            args.config.clone(),
        ));
        tokio::spawn(prune_ledger(service.clone()));
        tracing::info!(
            socket = %config.daemon.socket.display(),
            seals = config.seals.len(),
            "sealgated ready"
        );
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        };
        server::run(listener.listener, service.clone(), limits, shutdown).await;
        if let Some(path) = listener.owned_path {
            let _ = std::fs::remove_file(path);
        }
        service.shutdown().await;
        tracing::info!("sealgated stopped");
        Ok::<(), anyhow::Error>(())
    })?;
    // Devices close (sessions, logout, C_Finalize) when the service is dropped with the runtime.
    Ok(())
}

/// Most TLS handshakes of terminals in progress at once; further connections are closed.
const MAX_HANDSHAKES: usize = 16;

/// Listens for networked terminals: each connection's TLS handshake runs on its own thread and
/// must present a pinned client certificate; the connection is then handed to that terminal's
/// session. Refusals are recorded.
fn serve_terminals(
    l: &sealgate::config::TerminalListenerConfig,
    config: &Config,
    service: Arc<Service>,
) -> anyhow::Result<()> {
    let pins: Vec<(String, [u8; 32])> = config
        .terminals
        .iter()
        .filter_map(|t| {
            let fp = hex::decode(t.certificate_sha256.as_ref()?).ok()?;
            Some((t.id.clone(), fp.try_into().ok()?))
        })
        .collect();
    let acceptor = Arc::new(
        sealgate::terminal::link::TlsAcceptor::new(&l.certificate, &l.key, &pins)
            .map_err(anyhow::Error::msg)?,
    );
    let listener = std::net::TcpListener::bind(l.listen)
        .with_context(|| format!("cannot listen for terminals on {}", l.listen))?;
    tracing::info!(addr = %l.listen, "listening for terminals (TLS, pinned client certificates)");
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("terminal listener".into())
        .spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else {
                    // EMFILE and friends: back off briefly rather than spin.
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= MAX_HANDSHAKES {
                    busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                let (acceptor, service, done) = (acceptor.clone(), service.clone(), busy.clone());
                let handshake = std::thread::Builder::new().name("tls handshake".into());
                let spawned = handshake.spawn(move || {
                    let accepted = acceptor.accept(tcp);
                    done.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    match accepted {
                        Ok((id, link)) => match service.terminal_by_id(&id) {
                            Some(t) => t.connect(link),
                            None => {
                                tracing::error!(terminal = %id, "a pinned terminal has no session")
                            }
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "terminal connection refused");
                            let mut r = Record::new(kind::TERMINAL_REFUSED);
                            r.detail = e;
                            service.audit().append_later(r);
                        }
                    }
                });
                if let Err(e) = spawned {
                    // The connection went with the closure; its place is given back here.
                    busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    tracing::warn!(error = %e, "cannot start a thread for a terminal handshake");
                }
            }
        })
        .context("cannot start the terminal listener")?;
    Ok(())
}

/// On SIGHUP: re-reads the configuration file and puts it in force all or nothing; a file that
/// does not load, or changes what only a restart can, leaves the running configuration as it is.
async fn reload_on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    service: Arc<Service>,
    path: PathBuf,
) {
    while hangup.recv().await.is_some() {
        let mut states = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        let _ = sd_notify::notify(false, &states);
        let (s, p) = (service.clone(), path.clone());
        let outcome = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            s.reload(sealgate::service::load_config(&p)?)?;
            Ok(())
        })
        .await;
        match outcome {
            Ok(Ok(())) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Ok(Err(e)) => tracing::error!(
                config = %path.display(),
                error = %format!("{e:#}"),
                "reload refused; the running configuration stays in force"
            ),
            Err(e) => tracing::error!(error = %e, "reload failed"),
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
}

/// Drops replay-ledger entries of long-expired approvals, hourly.
async fn prune_ledger(service: Arc<Service>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let s = service.clone();
        match tokio::task::spawn_blocking(move || s.prune_ledger()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(pruned = n, "replay ledger pruned"),
            Ok(Err(e)) => tracing::warn!(error = %e, "replay ledger pruning failed"),
            _ => {}
        }
    }
}

/// Each second: probes ready devices, so a removed token shows as unavailable without waiting
/// for a stamp to find out, and tries to bring back unavailable ones. Changes of health and of
/// the PIN's state go into the audit log.
async fn watch_devices(service: Arc<Service>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last: Vec<(Health, bool)> = service
        .devices()
        .iter()
        .map(|d| (d.health(), d.pin_tries_low()))
        .collect();
    loop {
        tick.tick().await;
        for (device, seen) in service.devices().iter().zip(last.iter_mut()) {
            let d = device.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if d.health() == Health::Ready {
                    d.probe();
                } else {
                    d.recover();
                }
            })
            .await;
            let now = (device.health(), device.pin_tries_low());
            for record in device_events(device.as_ref(), seen, &now) {
                service.audit().append_later(record);
            }
            *seen = now;
        }
    }
}

/// Appends `audit.heartbeat` whenever the log's newest checkpoint is `every` old: an idle
/// site still shows a fresh device signature.
async fn heartbeat(service: Arc<Service>, every: Duration) {
    let mut tick = tokio::time::interval(
        (every / 4).clamp(Duration::from_millis(250), Duration::from_secs(5)),
    );
    loop {
        tick.tick().await;
        let status = service.audit().status();
        let age = sealgate::audit::now_ms() - status.checkpoint_at_ms;
        if status.error.is_empty() && age >= every.as_millis() as i64 {
            service
                .audit()
                .append_later(Record::new(kind::AUDIT_HEARTBEAT));
        }
    }
}

/// The audit records for a device going from `before` to `after` (health, PIN tries low).
fn device_events(
    device: &dyn sealgate::device::SealDevice,
    before: &(Health, bool),
    after: &(Health, bool),
) -> Vec<Record> {
    let record = |kind: &str, detail: String| {
        let mut r = Record::new(kind);
        r.device = device.id().to_owned();
        r.device_profile = device.profile().name.clone();
        r.device_serial = device.serial();
        r.detail = detail;
        r
    };
    let mut out = Vec::new();
    match (&before.0, &after.0) {
        (Health::Ready, Health::Unavailable(reason)) => {
            out.push(record(kind::DEVICE_UNAVAILABLE, reason.clone()))
        }
        (Health::Unavailable(_), Health::Ready) => {
            out.push(record(kind::DEVICE_READY, "available again".into()))
        }
        _ => {}
    }
    if after.1 && !before.1 {
        out.push(record(
            kind::DEVICE_PIN_LOW,
            "the device reports few PIN tries left".into(),
        ));
    }
    out
}
