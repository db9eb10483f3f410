//! `sealctl notify`: the site's alerts delivered to webhooks, group robots and mail (see
//! `sealgate::notify`). Reads the audit log read-only; needs no daemon.

use sealgate::notify::{Notifier, NotifyConfig};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct NotifyArgs {
    /// The notify configuration (channels, routes, the log and the outbox).
    #[arg(long, default_value = "/etc/sealgate/notify.toml")]
    config: PathBuf,
    /// Keep going: read new alerts and retry failed deliveries until SIGTERM.
    #[arg(long)]
    follow: bool,
    /// With --follow, how often to look for new alerts and due retries.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

/// One pass (exit 0 when nothing is left failing, 1 otherwise), or passes until SIGTERM.
pub fn run(a: &NotifyArgs, json: bool) -> anyhow::Result<i32> {
    sealgate::logging::init(sealgate::logging::LogFormat::Auto, "sealctl-notify");
    let config = NotifyConfig::load(&a.config)?;
    let mut n = Notifier::new(config)?;
    if a.follow {
        let stop = Arc::new(AtomicBool::new(false));
        let interval = std::time::Duration::from_millis(a.interval_ms.max(10));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let flag = stop.clone();
            // A thread of its own, not the runtime's blocking pool: reading HQ's alerts runs a
            // runtime of its own on it.
            let (done_tx, mut done) = tokio::sync::oneshot::channel();
            let worker = std::thread::Builder::new()
                .name("notify".into())
                .spawn(move || {
                    let r = sealgate::notify::follow(&mut n, interval, &flag);
                    let _ = done_tx.send(());
                    r
                })?;
            tokio::select! {
                _ = &mut done => {}
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            // The pass under way finishes (a delivery is marked as it went), then it stops.
            stop.store(true, Ordering::Relaxed);
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("the delivery thread panicked"))??;
            Ok::<(), anyhow::Error>(())
        })?;
    } else {
        let p = n.pass()?;
        let left = n.pending()?;
        if json {
            println!(
                "{}",
                serde_json::json!({"queued": p.queued, "sent": p.sent, "failed": p.failed,
                    "delivered": left.delivered, "waiting": left.waiting, "failing": left.failing})
            );
        } else {
            println!(
                "queued {}, sent {} message(s), {} failed; outbox: {} delivered, {} waiting, {} failing",
                p.queued, p.sent, p.failed, left.delivered, left.waiting, left.failing
            );
        }
        if left.failing > 0 {
            for f in n.failures(20)? {
                if json {
                    println!("{}", serde_json::json!({ "failing": f }));
                } else {
                    println!(
                        "failing: alert {} to {:?}, {} tries, next in {} s: {}",
                        f.alert_seq,
                        f.channel,
                        f.attempts,
                        ((f.next_try_ms - sealgate::audit::now_ms()) / 1000).max(0),
                        f.last_error
                    );
                }
            }
            return Ok(1);
        }
    }
    Ok(0)
}
