//! sealctl: the command line over the daemon's socket.
//!
//! Every command prints for people by default and as JSON with `--json`. When the daemon refuses
//! a request, the status name, its number and the daemon's message are printed and the exit code
//! is 1.

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Args as ClapArgs, Parser, Subcommand};
use sealgate::device::keys::pem;
use sealgate::protocol::client::Client;
use sealgate::protocol::{pb, response, status_name, Response, Status};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "sealctl", version, about = "Talk to sealgated")]
struct Cli {
    /// The daemon's socket.
    #[arg(
        long,
        global = true,
        env = "SEALGATE_SOCKET",
        default_value = "/run/sealgate/sealgated.sock"
    )]
    socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the seals this caller may use.
    Seals,
    /// Seal details.
    Seal {
        #[command(subcommand)]
        command: SealCommand,
    },
    /// Stamp a document (by file or by its SHA-256) with a seal.
    Stamp(StampArgs),
    /// Daemon status: devices, seals, uptime.
    Status,
}

#[derive(Subcommand)]
enum SealCommand {
    /// Show one seal: algorithm, device, status, public key, certificate.
    Show {
        id: String,
        /// Print the public key (and certificate, if any) as PEM only.
        #[arg(long)]
        pem: bool,
    },
}

#[derive(ClapArgs)]
#[command(group(clap::ArgGroup::new("document").required(true).args(["file", "sha256"])))]
struct StampArgs {
    /// Seal id.
    #[arg(long)]
    seal: String,
    /// The document to stamp; its SHA-256 is computed here and only the digest is sent.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The document's SHA-256, as 64 hex digits.
    #[arg(long)]
    sha256: Option<String>,
    /// File holding the approval token.
    #[arg(long)]
    token: PathBuf,
    /// Why the seal is used.
    #[arg(long, default_value = "")]
    purpose: String,
    /// Also write the raw signature to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("sealctl: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Turns a refused response into an error naming its status.
fn check(resp: Response) -> anyhow::Result<response::Body> {
    if resp.status != Status::Ok as i32 {
        bail!(
            "{} ({}): {}",
            status_name(resp.status),
            resp.status,
            resp.message
        );
    }
    resp.body.context("the daemon answered OK without a body")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn device_status(code: i32) -> &'static str {
    match pb::DeviceStatus::try_from(code) {
        Ok(pb::DeviceStatus::Ready) => "ready",
        Ok(pb::DeviceStatus::Unavailable) => "unavailable",
        _ => "unknown",
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut client = Client::connect(&cli.socket).await?;
    match cli.command {
        Command::Seals => {
            let response::Body::ListSeals(list) = check(client.list_seals().await?)? else {
                bail!("unexpected reply to ListSeals");
            };
            if cli.json {
                let seals: Vec<_> = list
                    .seals
                    .iter()
                    .map(|s| json!({"id": s.id, "name": s.name, "algorithm": s.algorithm, "available": s.available}))
                    .collect();
                println!("{}", json!({ "seals": seals }));
            } else {
                for s in &list.seals {
                    let avail = if s.available { "ready" } else { "unavailable" };
                    println!("{:<16} {:<20} {:<12} {}", s.id, s.algorithm, avail, s.name);
                }
            }
        }
        Command::Seal {
            command: SealCommand::Show { id, pem: as_pem },
        } => {
            let response::Body::DescribeSeal(d) = check(client.describe_seal(&id).await?)? else {
                bail!("unexpected reply to DescribeSeal");
            };
            if as_pem {
                print!("{}", pem("PUBLIC KEY", &d.public_key_spki));
                if !d.certificate_der.is_empty() {
                    print!("{}", pem("CERTIFICATE", &d.certificate_der));
                }
            } else if cli.json {
                println!(
                    "{}",
                    json!({
                        "id": d.id, "name": d.name, "algorithm": d.algorithm,
                        "device": d.device_id, "profile": d.device_profile,
                        "device_status": device_status(d.device_status),
                        "device_detail": d.device_detail,
                        "public_key_spki": b64(&d.public_key_spki),
                        "certificate": b64(&d.certificate_der),
                    })
                );
            } else {
                println!("seal        {}", d.id);
                println!("name        {}", d.name);
                println!("algorithm   {}", d.algorithm);
                println!("device      {} (profile {})", d.device_id, d.device_profile);
                println!(
                    "status      {}{}",
                    device_status(d.device_status),
                    if d.device_detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.device_detail)
                    }
                );
                println!(
                    "public key  SHA-256 {}",
                    hex::encode(Sha256::digest(&d.public_key_spki))
                );
                println!(
                    "certificate {}",
                    if d.certificate_der.is_empty() {
                        "none".into()
                    } else {
                        format!("{} bytes (--pem to print it)", d.certificate_der.len())
                    }
                );
            }
        }
        Command::Stamp(args) => {
            let digest = match (&args.file, &args.sha256) {
                (Some(path), _) => {
                    let bytes = std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    Sha256::digest(&bytes).to_vec()
                }
                (None, Some(h)) => {
                    let d = hex::decode(h).context("--sha256 is not hex")?;
                    if d.len() != 32 {
                        bail!("--sha256 must be 64 hex digits (32 bytes), got {}", d.len());
                    }
                    d
                }
                (None, None) => unreachable!("clap requires one of --file and --sha256"),
            };
            let token = std::fs::read(&args.token)
                .with_context(|| format!("cannot read token file {}", args.token.display()))?;
            let resp = client
                .stamp(&args.seal, &digest, &token, &args.purpose)
                .await?;
            let response::Body::Stamp(s) = check(resp)? else {
                bail!("unexpected reply to Stamp");
            };
            if let Some(out) = &args.out {
                std::fs::write(out, &s.signature)
                    .with_context(|| format!("cannot write {}", out.display()))?;
            }
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "seal": s.seal_id, "algorithm": s.algorithm,
                        "document_sha256": hex::encode(&digest),
                        "signature": b64(&s.signature),
                        "stamped_at_unix_ms": s.stamped_at_unix_ms,
                    })
                );
            } else {
                println!("stamped with {} ({})", s.seal_id, s.algorithm);
                println!("document sha256 {}", hex::encode(&digest));
                println!("signature       {}", b64(&s.signature));
            }
        }
        Command::Status => {
            let response::Body::StatusReport(st) = check(client.status().await?)? else {
                bail!("unexpected reply to Status");
            };
            if cli.json {
                let devices: Vec<_> = st
                    .devices
                    .iter()
                    .map(|d| json!({"id": d.id, "profile": d.profile, "status": device_status(d.status), "detail": d.detail}))
                    .collect();
                let seals: Vec<_> = st
                    .seals
                    .iter()
                    .map(|s| json!({"id": s.id, "available": s.available}))
                    .collect();
                println!(
                    "{}",
                    json!({
                        "version": st.daemon_version, "uptime_seconds": st.uptime_seconds,
                        "connections": st.connections, "devices": devices, "seals": seals,
                    })
                );
            } else {
                println!(
                    "sealgated {} up {} s, {} connection(s)",
                    st.daemon_version, st.uptime_seconds, st.connections
                );
                for d in &st.devices {
                    println!(
                        "device {:<14} {:<12} {}{}",
                        d.id,
                        d.profile,
                        device_status(d.status),
                        if d.detail.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", d.detail)
                        }
                    );
                }
                for s in &st.seals {
                    println!(
                        "seal   {:<14} {}",
                        s.id,
                        if s.available { "ready" } else { "unavailable" }
                    );
                }
            }
        }
    }
    Ok(())
}
