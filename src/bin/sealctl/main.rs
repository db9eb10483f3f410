//! sealctl: the command line over the daemon's socket.
//!
//! Every command prints for people by default and as JSON with `--json`. When the daemon refuses
//! a request, the status name, its number and the daemon's message are printed and the exit code
//! is 1.

mod audit;
mod bench;
#[cfg(feature = "console")]
mod bench_console;
mod hq;
mod notify;
mod pdf;
mod verify;

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Args as ClapArgs, Parser, Subcommand};
use sealgate::device::keys::pem;
use sealgate::protocol::client::Client;
use sealgate::protocol::{pb, request, response, status_name, Response, Status};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sealctl",
    version,
    about = "Talk to sealgated",
    after_help = "Exit codes, the same for every command:\n  \
        0  done (for `audit verify`: the log verifies)\n  \
        1  refused by the daemon (any status but OK), or an offline check found something wrong\n  \
        2  usage or local error (arguments, files, a socket served by another user)\n  \
        3  the daemon could not be reached, or the connection broke\n\
        With --json, every outcome is one JSON object on stdout; a failure is\n  \
        {\"ok\": false, \"status\": \"APPROVAL_DENIED\", \"code\": 13, \"reason\": \"missing_level\", \"message\": \"…\"}\n\
        (status LOCAL_ERROR or UNREACHABLE, code null, for exits 2 and 3)."
)]
struct Cli {
    /// The daemon's socket.
    #[arg(
        long,
        global = true,
        env = "SEALGATE_SOCKET",
        default_value = "/run/sealgate/sealgated.sock"
    )]
    socket: PathBuf,
    /// The uid the daemon must run as; sealctl checks the socket's peer (SO_PEERCRED) before
    /// sending anything. Default: root, the user `sealgate`, or your own uid.
    #[arg(long, global = true, env = "SEALGATE_DAEMON_UID")]
    daemon_uid: Option<u32>,
    /// Print JSON instead of text: one object on stdout for every outcome, refusals included.
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
    /// Stamp a document (by file or by its SHA-256) with a seal, or a prepared PDF with a
    /// visible seal (--pdf).
    Stamp(StampArgs),
    /// PDFs with a visible seal: prepare one for a seal (then approve it with `token new
    /// --pdf`, and stamp it with `stamp --pdf`).
    Pdf {
        #[command(subcommand)]
        command: pdf::PdfCommand,
    },
    /// Smart-seal terminals: unlock a terminal's physical seal on an approval.
    Terminal {
        #[command(subcommand)]
        command: TerminalCommand,
    },
    /// Daemon status: devices, seals, uptime.
    Status,
    /// Approval tokens: create, sign, inspect, check against the daemon's policy.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// TOTP for applicants (administrators only).
    Mfa {
        #[command(subcommand)]
        command: MfaCommand,
    },
    /// The audit log, offline: verify, query, export, statistics (reads the database file).
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Headquarters' view of every site, from HQ's PostgreSQL database: records, heads and
    /// lag, central alerts (see docs/headquarters.md).
    Hq {
        #[command(subcommand)]
        command: hq::HqCommand,
    },
    /// Measure durable stamps per second against the raw device, on the demo token (starts a
    /// daemon of its own; see README, "Performance").
    Bench(bench::BenchArgs),
    /// Check every signature of a PDF, or a document's detached CMS signature (--p7s), against
    /// the document and trusted CAs, and with --db (or --bundle) find each stamp in the audit
    /// log: who applied, who approved, when, on which device (offline).
    Verify(verify::VerifyArgs),
    /// Deliver the site's alerts to webhooks, WeCom/DingTalk/Feishu robots and mail, as the
    /// notify configuration routes them, from the audit log (read-only) through a durable
    /// outbox; needs no daemon.
    Notify(notify::NotifyArgs),
    /// The newest alerts raised by the anomaly rules; with --follow, every new one as it comes
    /// (administrators only).
    Alerts {
        /// How many of the newest alerts to show first.
        #[arg(long, default_value_t = 20)]
        recent: u32,
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum TerminalCommand {
    /// Unlock the physical seal for a number of impressions; answers once the terminal has
    /// acknowledged the grant. Each impression is one use of the approval.
    Grant {
        /// The terminal's seal id.
        #[arg(long)]
        seal: String,
        #[command(flatten)]
        doc: DocArgs,
        /// The approval token file.
        #[arg(long)]
        token: PathBuf,
        #[arg(long, default_value_t = 1)]
        impressions: u32,
        #[arg(long, default_value = "")]
        purpose: String,
        /// The applicant's TOTP code, if the policy asks for one.
        #[arg(long, default_value = "")]
        mfa_code: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Write a new, unsigned approval token (claims from flags, or from a JSON file).
    New(TokenNewArgs),
    /// Add one approver's signature to a token file (in place unless --out).
    Sign(TokenSignArgs),
    /// Decode a token and show its claims and signatures (nothing is verified).
    Inspect {
        /// The token file.
        token: PathBuf,
    },
    /// Submit a token to the approval page: it waits there for its approvers, level by level
    /// (docs/approvals.md). Prints the application's id.
    Submit {
        /// A PDF prepared by `sealctl pdf prepare` that the token names, shown to approvers.
        #[arg(long)]
        pdf: Option<PathBuf>,
        /// The token file.
        token: PathBuf,
    },
    /// An application's state; once every level approved, the token (written to --out).
    Fetch {
        /// Wait until it is approved or rejected.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        out: Option<PathBuf>,
        /// The application's id (the token's jti).
        id: String,
    },
    /// Ask the daemon whether a stamp with this token would pass, and if not, every reason.
    Check {
        #[arg(long)]
        seal: String,
        #[command(flatten)]
        doc: DocArgs,
        /// The applicant's TOTP code, if the policy asks for one (it is not spent).
        #[arg(long, default_value = "")]
        mfa_code: String,
        /// The token file.
        token: PathBuf,
    },
}

/// Shows the claims an approver is about to sign (on stderr) and, unless `yes`, asks: an
/// answer starting with y or Y on standard input signs, anything else (or none) does not.
fn confirm_signing(c: &sealgate::token::Claims, kid: &str, yes: bool) -> anyhow::Result<()> {
    let amount = c
        .amount
        .as_ref()
        .map(|a| format!("{} {} (minor units)", a.value, a.currency))
        .unwrap_or_else(|| "none".into());
    let show = |v: &str| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.to_owned()
        }
    };
    eprintln!(
        "{kid} is about to approve:\n  seal        {}\n  document    {}{}\n  type        {}\n  amount      {amount}\n  department  {}\n  scope       {}\n  applicant   {}\n  purpose     {}\n  uses        {}\n  valid       {} .. {} (Unix seconds)",
        c.seal,
        c.doc.sha256,
        c.doc.title.as_deref().map(|t| format!(" ({t})")).unwrap_or_default(),
        c.doc.doc_type,
        show(&c.dept),
        show(&c.scope),
        c.applicant,
        show(&c.purpose),
        c.uses,
        c.nbf,
        c.exp,
    );
    if yes {
        return Ok(());
    }
    eprint!("sign? [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).ok();
    if answer.trim_start().starts_with(['y', 'Y']) {
        Ok(())
    } else {
        bail!("not signed: no confirmation (answer y, or pass --yes)")
    }
}

#[derive(ClapArgs)]
#[command(group(clap::ArgGroup::new("doc").required(true).args(["file", "sha256", "pdf"])))]
struct DocArgs {
    /// The document; only its SHA-256 is used.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The document's SHA-256, 64 hex digits.
    #[arg(long)]
    sha256: Option<String>,
    /// A PDF prepared by `sealctl pdf prepare`; its ByteRange digest is used.
    #[arg(long)]
    pdf: Option<PathBuf>,
}

#[derive(ClapArgs)]
struct TokenNewArgs {
    /// Take every claim from this JSON file instead of the flags.
    #[arg(long, conflicts_with_all = ["seal", "doc_type", "applicant", "dept"])]
    claims: Option<PathBuf>,
    #[arg(long, required_unless_present = "claims")]
    seal: Option<String>,
    /// The document (its SHA-256 and SHA-512 are named).
    #[arg(long, conflicts_with_all = ["sha256", "pdf"])]
    file: Option<PathBuf>,
    #[arg(long, conflicts_with = "pdf")]
    sha256: Option<String>,
    /// A PDF prepared by `sealctl pdf prepare`: its ByteRange digests and the seal's placement
    /// are named, so the approval binds the document exactly as it will look.
    #[arg(long)]
    pdf: Option<PathBuf>,
    /// Document type, e.g. contract, invoice.
    #[arg(long, required_unless_present = "claims")]
    doc_type: Option<String>,
    #[arg(long)]
    title: Option<String>,
    /// Amount in minor units (fen, cents).
    #[arg(long, requires = "currency")]
    amount_minor: Option<i64>,
    #[arg(long)]
    currency: Option<String>,
    /// The applicant's department.
    #[arg(long, required_unless_present = "claims")]
    dept: Option<String>,
    #[arg(long, default_value = "")]
    scope: String,
    #[arg(long, required_unless_present = "claims")]
    applicant: Option<String>,
    #[arg(long, default_value = "")]
    purpose: String,
    /// Stamps this approval allows.
    #[arg(long, default_value_t = 1)]
    uses: u32,
    /// Seconds the approval stays valid.
    #[arg(long, default_value_t = 86400)]
    valid_for: i64,
    /// Approval id; random when not given.
    #[arg(long)]
    jti: Option<String>,
    /// Where to write the token (stdout when not given).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Submit it to the approval page as well (needs --out; with --pdf, the PDF goes along).
    #[arg(long, requires = "out")]
    submit: bool,
}

#[derive(ClapArgs)]
#[command(group(clap::ArgGroup::new("signer").required(true).args(["key", "pkcs11_module"])))]
struct TokenSignArgs {
    /// The approver's id in the trust store.
    #[arg(long)]
    kid: String,
    /// The approver's private key, PKCS#8 PEM (Ed25519 or P-256).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Or a P-256 key in a PKCS#11 token (ES256): the module...
    #[arg(long, requires_all = ["token_label", "key_label", "pin_file"])]
    pkcs11_module: Option<PathBuf>,
    /// ...the token's label...
    #[arg(long)]
    token_label: Option<String>,
    /// ...the key's label...
    #[arg(long)]
    key_label: Option<String>,
    /// ...and a file holding the user PIN.
    #[arg(long)]
    pin_file: Option<PathBuf>,
    /// Approval time, Unix seconds; now when not given.
    #[arg(long)]
    approved_at: Option<i64>,
    /// Write here instead of changing the token file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sign without asking; the claims are still shown on stderr.
    #[arg(long)]
    yes: bool,
    /// The token file.
    token: PathBuf,
}

#[derive(Subcommand)]
enum MfaCommand {
    /// Make a new TOTP secret for an applicant; prints the otpauth URI and a QR code once.
    Enroll { user: String },
    /// Clear an applicant's lockout after too many wrong codes.
    Reset { user: String },
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
#[command(group(clap::ArgGroup::new("document").required(true).args(["file", "sha256", "pdf"])))]
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
    /// A PDF prepared by `sealctl pdf prepare`: the daemon makes a PAdES signature over its
    /// ByteRange, written into the PDF at --out (required).
    #[arg(long, requires = "out", conflicts_with = "format")]
    pdf: Option<PathBuf>,
    /// File holding the approval token.
    #[arg(long)]
    token: PathBuf,
    /// Why the seal is used.
    #[arg(long, default_value = "")]
    purpose: String,
    /// The applicant's TOTP code, when the seal's policy asks for one.
    #[arg(long, default_value = "")]
    mfa_code: String,
    /// What to make: `raw` (the bare signature) or `p7s` (a CMS detached signature, DER).
    #[arg(long, value_enum, default_value = "raw")]
    format: StampFormat,
    /// Also write the signature (raw) or the .p7s (p7s) to this file; with --pdf, the stamped
    /// PDF.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StampFormat {
    Raw,
    P7s,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn digest_of(file: &Option<PathBuf>, sha256: &Option<String>) -> anyhow::Result<Vec<u8>> {
    digest_of_doc(file, sha256, &None)
}

/// The digest a stamp names: a file's SHA-256, one given, or a prepared PDF's ByteRange digest.
fn digest_of_doc(
    file: &Option<PathBuf>,
    sha256: &Option<String>,
    pdf: &Option<PathBuf>,
) -> anyhow::Result<Vec<u8>> {
    if let Some(p) = pdf {
        return Ok(pdf::approval_of(p)?.0.to_vec());
    }
    match (file, sha256) {
        (Some(path), _) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok(Sha256::digest(&bytes).to_vec())
        }
        (None, Some(h)) => {
            let d = hex::decode(h).context("--sha256 is not hex")?;
            if d.len() != 32 {
                bail!("--sha256 must be 64 hex digits (32 bytes), got {}", d.len());
            }
            Ok(d)
        }
        (None, None) => bail!("give --file or --sha256"),
    }
}

fn write_or_print(out: &Option<PathBuf>, text: &str) -> anyhow::Result<()> {
    match out {
        Some(p) => std::fs::write(p, format!("{text}\n"))
            .with_context(|| format!("cannot write {}", p.display())),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

/// What `token submit` and `token fetch` print of an application.
fn show_application(a: &pb::Application, json: bool) {
    if json {
        println!(
            "{}",
            json!({
                "id": a.id, "state": a.state, "levels": a.levels, "approved": a.approved,
                "next_role": a.next_role, "next_department": a.next_department,
                "rule": a.rule, "rejected_by": a.rejected_by, "rejection": a.rejection,
            })
        );
        return;
    }
    println!("application {}: {}", a.id, a.state);
    println!(
        "levels       {} ({} of {} approved)",
        a.levels.join(", "),
        a.approved,
        a.levels.len()
    );
    if !a.next_role.is_empty() {
        let dept = if a.next_department.is_empty() {
            String::new()
        } else {
            format!(" of {}", a.next_department)
        };
        println!("waiting for  {}{dept}", a.next_role);
    }
    if !a.rejected_by.is_empty() {
        println!("rejected by  {}: {}", a.rejected_by, a.rejection);
    }
}

async fn submit_application(
    client: &mut Client,
    token: &std::path::Path,
    pdf: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<i32> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
    };
    let body = request::Body::SubmitApplication(pb::SubmitApplicationRequest {
        token: read(token)?,
        document_pdf: pdf.map(read).transpose()?.unwrap_or_default(),
    });
    let response::Body::Application(a) = check(client.call(body).await?)? else {
        bail!("unexpected reply to SubmitApplication");
    };
    show_application(&a.application.unwrap_or_default(), json);
    Ok(0)
}

async fn fetch_application(
    client: &mut Client,
    id: &str,
    wait: bool,
    out: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<i32> {
    loop {
        let body = request::Body::FetchApplication(pb::FetchApplicationRequest {
            application_id: id.into(),
            document: false,
        });
        let response::Body::Application(r) = check(client.call(body).await?)? else {
            bail!("unexpected reply to FetchApplication");
        };
        let a = r.application.unwrap_or_default();
        if a.state == "pending" && wait {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            continue;
        }
        show_application(&a, json);
        return match a.state.as_str() {
            "approved" => {
                if let Some(out) = out {
                    std::fs::write(out, &a.token)
                        .with_context(|| format!("cannot write {}", out.display()))?;
                }
                Ok(0)
            }
            "rejected" => Ok(exit::REFUSED),
            _ => Ok(exit::PENDING),
        };
    }
}

/// Commands that need no daemon.
fn offline(cli: &Cli) -> anyhow::Result<bool> {
    use sealgate::token::{Amount, Claims, DocClaim, SigningKey, Token};
    if let Command::Pdf {
        command: pdf::PdfCommand::DrawSeal { pixels, out },
    } = &cli.command
    {
        let png = sealgate::pdf::draw_round_seal(*pixels)?;
        std::fs::write(out, png).with_context(|| format!("cannot write {}", out.display()))?;
        return Ok(true);
    }
    let Command::Token { command } = &cli.command else {
        return Ok(false);
    };
    match command {
        TokenCommand::New(a) => {
            let claims: Claims = match &a.claims {
                Some(path) => serde_json::from_slice(
                    &std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
                .context("claims file")?,
                None => {
                    let from_pdf = a.pdf.as_deref().map(pdf::approval_of).transpose()?;
                    let digest = match &from_pdf {
                        Some((sha256, ..)) => sha256.to_vec(),
                        None => digest_of(&a.file, &a.sha256)?,
                    };
                    let t = now();
                    let mut jti = [0u8; 16];
                    getrandom::fill(&mut jti).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                    Claims {
                        jti: a.jti.clone().unwrap_or_else(|| hex::encode(jti)),
                        seal: a.seal.clone().expect("required by clap"),
                        doc: DocClaim {
                            sha256: hex::encode(digest),
                            doc_type: a.doc_type.clone().expect("required by clap"),
                            title: a.title.clone(),
                            // For an Ed25519 CMS signature, whose message digest is SHA-512.
                            sha512: match (&a.file, &from_pdf) {
                                (_, Some((_, sha512, _))) => Some(hex::encode(sha512)),
                                (Some(path), None) => Some(hex::encode(sha2::Sha512::digest(
                                    std::fs::read(path).with_context(|| {
                                        format!("cannot read {}", path.display())
                                    })?,
                                ))),
                                (None, None) => None,
                            },
                            placement: from_pdf.map(|(.., p)| p),
                        },
                        amount: a.amount_minor.map(|value| Amount {
                            value,
                            currency: a.currency.clone().unwrap_or_default(),
                        }),
                        dept: a.dept.clone().expect("required by clap"),
                        scope: a.scope.clone(),
                        applicant: a.applicant.clone().expect("required by clap"),
                        purpose: a.purpose.clone(),
                        iat: t,
                        nbf: t,
                        exp: t + a.valid_for,
                        uses: a.uses,
                    }
                }
            };
            write_or_print(&a.out, &Token::unsigned(claims).to_json())?;
            if a.submit {
                // Submitted by `run`, which talks to the daemon.
                return Ok(false);
            }
        }
        TokenCommand::Sign(a) => {
            let bytes = std::fs::read(&a.token)
                .with_context(|| format!("cannot read {}", a.token.display()))?;
            let mut token = Token::parse_for_signing(&bytes).map_err(|e| anyhow::anyhow!(e))?;
            confirm_signing(&token.claims, &a.kid, a.yes)?;
            let at = a.approved_at.unwrap_or_else(now);
            if let Some(key) = &a.key {
                let pem = zeroize::Zeroizing::new(
                    std::fs::read_to_string(key)
                        .with_context(|| format!("cannot read {}", key.display()))?,
                );
                let key = SigningKey::from_pem(&pem).map_err(|e| anyhow::anyhow!(e))?;
                token.add_signature(&key, &a.kid, at);
            } else {
                let signer = pkcs11_signer(a)?;
                token
                    .add_signature_with(sealgate::token::JwsAlg::ES256, &a.kid, at, |input| {
                        signer(&Sha256::digest(input).into())
                    })
                    .map_err(|e| anyhow::anyhow!(e))?;
            }
            let out = a.out.clone().or(Some(a.token.clone()));
            write_or_print(&out, &token.to_json())?;
        }
        TokenCommand::Inspect { token } => {
            let bytes =
                std::fs::read(token).with_context(|| format!("cannot read {}", token.display()))?;
            let t = Token::parse_for_signing(&bytes)
                .or_else(|_| Token::parse(&bytes))
                .map_err(|e| anyhow::anyhow!(e))?;
            let sigs: Vec<_> = t
                .signatures
                .iter()
                .map(|s| {
                    let mut v = json!({"kid": s.header.kid, "alg": s.header.alg, "approved_at": s.header.approved_at});
                    if let Some(a) = &s.assertion {
                        v["passkey"] = passkey_claims(a);
                    }
                    v
                })
                .collect();
            let v = json!({"claims": t.claims, "signatures": sigs});
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        TokenCommand::Check { .. } | TokenCommand::Submit { .. } | TokenCommand::Fetch { .. } => {
            return Ok(false)
        }
    }
    Ok(true)
}

/// What a passkey's assertion says of itself, as `token inspect` shows it: nothing here is
/// verified (the daemon's gate does that).
fn passkey_claims(a: &sealgate::token::Assertion) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let client: serde_json::Value =
        serde_json::from_slice(&a.client_data_json).unwrap_or(serde_json::Value::Null);
    let auth = &a.authenticator_data;
    let flags = auth.get(32).copied().unwrap_or(0);
    json!({
        "credential": b64.encode(&a.credential_id),
        "type": client.get("type"),
        "origin": client.get("origin"),
        "user_present": flags & 0x01 != 0,
        "user_verified": flags & 0x04 != 0,
        "sign_count": auth.get(33..37).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))),
    })
}

/// Signs SHA-256 digests with a P-256 key in a PKCS#11 token; returns r || s as JWS wants.
fn pkcs11_signer(
    a: &TokenSignArgs,
) -> anyhow::Result<impl Fn(&[u8; 32]) -> Result<Vec<u8>, String>> {
    use sealgate::device::pkcs11::Pkcs11Device;
    use sealgate::device::profile::{DeviceKind, DeviceProfile, Pkcs11Profile};
    use sealgate::device::{Algorithm, KeySpec, SealDevice};
    let module = a.pkcs11_module.clone().expect("checked by clap");
    let config = sealgate::config::DeviceConfig {
        id: "approver-key".into(),
        profile: "command-line".into(),
        module: Some(module.clone()),
        token_label: a.token_label.clone(),
        token_serial: None,
        pin_file: a.pin_file.clone(),
        pin_credential: None,
        sessions: Some(1),
        wrap_key_label: None,
        card_id: None,
        reader: None,
    };
    let profile = DeviceProfile {
        model: "PKCS#11 token".into(),
        kind: DeviceKind::Pkcs11,
        description: String::new(),
        algorithms: vec![Algorithm::EcdsaP256Sha256.name().into()],
        pkcs11: Some(Pkcs11Profile {
            modules: vec![module],
            sessions: 1,
        }),
        piv: None,
        terminal: None,
        name: "command-line".into(),
    };
    let spec = KeySpec {
        label: a.key_label.clone(),
        id: None,
        algorithm: Algorithm::EcdsaP256Sha256,
    };
    let device = Pkcs11Device::open(&config, profile, vec![spec])?;
    Ok(move |digest: &[u8; 32]| {
        let der = device.sign(0, digest).map_err(|e| e.to_string())?;
        let sig = p256::ecdsa::Signature::from_der(&der).map_err(|e| e.to_string())?;
        Ok(sig.to_bytes().to_vec())
    })
}

/// How sealctl ends, the same for every subcommand (also in `--help` and README).
mod exit {
    /// Done: the daemon did it, or the offline check holds.
    pub const DONE: i32 = 0;
    /// The daemon refused (any status but OK: an approval refused, a seal not allowed, a
    /// device unavailable…), or an offline check found something wrong.
    pub const REFUSED: i32 = 1;
    /// Usage or a local error: bad arguments, a file that cannot be read or written, a socket
    /// served by another user; nothing was asked of the daemon, or its answer made no sense.
    pub const LOCAL: i32 = 2;
    /// The daemon could not be reached, or the connection broke before its answer.
    pub const UNREACHABLE: i32 = 3;
    /// `token fetch`: the application still waits for an approver.
    pub const PENDING: i32 = 4;
}

/// A request the daemon answered with a status other than OK.
#[derive(Debug)]
struct Refused {
    status: i32,
    reason: String,
    message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            status_name(self.status),
            self.status,
            self.message
        )
    }
}

impl std::error::Error for Refused {}

/// Reports a failure, on stdout as one JSON object with `--json` (stderr otherwise), and gives
/// the exit code for it.
fn fail(e: &anyhow::Error, json: bool) -> i32 {
    let (code, status, status_code, reason, message) = if let Some(r) = e.downcast_ref::<Refused>()
    {
        (
            exit::REFUSED,
            status_name(r.status).to_owned(),
            Some(r.status),
            r.reason.clone(),
            r.message.clone(),
        )
    } else if e.chain().any(|c| {
        c.downcast_ref::<sealgate::protocol::client::ClientError>()
            .is_some()
    }) {
        (
            exit::UNREACHABLE,
            "UNREACHABLE".into(),
            None,
            String::new(),
            format!("{e:#}"),
        )
    } else {
        (
            exit::LOCAL,
            "LOCAL_ERROR".into(),
            None,
            String::new(),
            format!("{e:#}"),
        )
    };
    if json {
        println!(
            "{}",
            json!({"ok": false, "status": status, "code": status_code, "reason": reason, "message": message})
        );
    } else {
        eprintln!("sealctl: {e:#}");
    }
    code
}

fn main() {
    let cli = Cli::parse();
    // The crash-point tests arm points of the shipper by FAILPOINTS; only a build with the
    // feature reads it.
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let json = cli.json;
    if let Command::Bench(args) = cli.command {
        if let Err(e) = bench::run(args, json) {
            std::process::exit(fail(&e.context("sealctl bench"), json));
        }
        return;
    }
    if let Command::Verify(args) = &cli.command {
        match verify::run(args, json) {
            Ok(code) => std::process::exit(code),
            Err(e) => std::process::exit(fail(&e, json)),
        }
    }
    if let Command::Notify(args) = &cli.command {
        match notify::run(args, json) {
            Ok(code) => std::process::exit(code),
            Err(e) => std::process::exit(fail(&e, json)),
        }
    }
    if let Command::Hq { command } = &cli.command {
        match hq::run(command, json) {
            Ok(code) => std::process::exit(code),
            Err(e) => std::process::exit(fail(&e, json)),
        }
    }
    if let Command::Audit { command } = &cli.command {
        match audit::run(command, json, &cli.socket) {
            Ok(code) => std::process::exit(code),
            Err(e) => std::process::exit(fail(&e, json)),
        }
    }
    match offline(&cli) {
        Ok(true) => return,
        Ok(false) => {}
        Err(e) => std::process::exit(fail(&e, json)),
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => std::process::exit(fail(&e, json)),
    }
}

/// Refuses a socket whose other end is not the daemon's user: whoever could take the socket's
/// place would otherwise receive approval tokens and TOTP codes.
fn check_peer(client: &Client, cli: &Cli) -> anyhow::Result<()> {
    let uid = client
        .peer_uid()
        .with_context(|| format!("cannot read the peer of {}", cli.socket.display()))?;
    let allowed: Vec<u32> = match cli.daemon_uid {
        Some(u) => vec![u],
        None => {
            let mut v = vec![0, nix::unistd::getuid().as_raw()];
            if let Ok(Some(u)) = nix::unistd::User::from_name("sealgate") {
                v.push(u.uid.as_raw());
            }
            v
        }
    };
    if !allowed.contains(&uid) {
        bail!(
            "the socket {} is served by uid {uid}, not by the daemon's user ({}); nothing was sent",
            cli.socket.display(),
            allowed
                .iter()
                .map(|u| u.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Turns a refused response into an error naming its status.
fn check(resp: Response) -> anyhow::Result<response::Body> {
    if resp.status != Status::Ok as i32 {
        return Err(Refused {
            status: resp.status,
            reason: resp.reason,
            message: resp.message,
        }
        .into());
    }
    resp.body.context("the daemon answered OK without a body")
}

fn print_alert(r: &pb::AuditRecord, json: bool) {
    let time = audit::time(r.at_unix_ms as i64);
    if json {
        println!(
            "{}",
            json!({
                "seq": r.seq, "time": time, "rule": r.reason, "detail": r.detail,
                "seal": r.seal, "device": r.device, "caller": r.caller,
                "applicant": r.applicant, "approval_id": r.approval_id,
                "document_sha256": r.document_sha256, "ref_seq": r.ref_seq,
            })
        );
    } else {
        println!("{time}  #{:<6} {:<15} {}", r.seq, r.reason, r.detail);
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
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

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let mut client = Client::connect(&cli.socket).await?;
    check_peer(&client, &cli)?;
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
        Command::Pdf {
            command: pdf::PdfCommand::Prepare(args),
        } => {
            let response::Body::DescribeSeal(d) = check(client.describe_seal(&args.seal).await?)?
            else {
                bail!("unexpected reply to DescribeSeal");
            };
            if d.image_png.is_empty() {
                bail!(
                    "seal {:?} has no image configured (`image = \"….png\"` in its [[seal]])",
                    args.seal
                );
            }
            let (waiting, digest) = pdf::prepare(&args, &d.image_png)?;
            let place = waiting.place.clone().unwrap_or(sealgate::pdf::Place {
                page: args.page,
                rect: [0; 4],
            });
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "ok": true, "out": args.out, "field": waiting.field,
                        "page": place.page, "rect": place.rect,
                        "sha256": hex::encode(digest),
                    })
                );
            } else {
                println!("prepared {}", args.out.display());
                println!(
                    "field {} on page {} at {:?} (points)",
                    waiting.field, place.page, place.rect
                );
                println!("ByteRange sha256 {}", hex::encode(digest));
                println!(
                    "next: sealctl token new --pdf {} …, then sealctl stamp --pdf",
                    args.out.display()
                );
            }
        }
        Command::Pdf {
            command: pdf::PdfCommand::DrawSeal { .. },
        } => unreachable!("drawn offline"),
        Command::Stamp(args) => {
            let digest = digest_of_doc(&args.file, &args.sha256, &args.pdf)?;
            let token = std::fs::read(&args.token)
                .with_context(|| format!("cannot read token file {}", args.token.display()))?;
            let container = match (args.format, &args.pdf) {
                (_, Some(_)) => pb::Container::Pades,
                (StampFormat::Raw, None) => pb::Container::Raw,
                (StampFormat::P7s, None) => pb::Container::CmsDetached,
            };
            let resp = client
                .stamp_request(pb::StampRequest {
                    seal_id: args.seal.clone(),
                    document_sha256: digest.clone(),
                    approval_token: token,
                    purpose: args.purpose.clone(),
                    mfa_code: args.mfa_code.clone(),
                    container: container as i32,
                })
                .await?;
            let response::Body::Stamp(s) = check(resp)? else {
                bail!("unexpected reply to Stamp");
            };
            if container != pb::Container::Raw && s.container.is_empty() {
                bail!("the daemon answered without the CMS container asked for");
            }
            if let Some(out) = &args.out {
                let bytes = match (&args.pdf, args.format) {
                    (Some(p), _) => {
                        let prepared = pdf::read(p)?;
                        sealgate::pdf::embed(&prepared, &s.container)
                            .with_context(|| p.display().to_string())?
                    }
                    (None, StampFormat::Raw) => s.signature.clone(),
                    (None, StampFormat::P7s) => s.container.clone(),
                };
                std::fs::write(out, bytes)
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
                        "approval": s.approval_id,
                        "uses_left": s.uses_left,
                        "p7s": (!s.container.is_empty()).then(|| b64(&s.container)),
                        "pdf": args.pdf.as_ref().and(args.out.as_ref()),
                    })
                );
            } else {
                println!("stamped with {} ({})", s.seal_id, s.algorithm);
                println!(
                    "approval        {} ({} use(s) left)",
                    s.approval_id, s.uses_left
                );
                println!("document sha256 {}", hex::encode(&digest));
                println!("signature       {}", b64(&s.signature));
            }
        }
        Command::Terminal {
            command:
                TerminalCommand::Grant {
                    seal,
                    doc,
                    token,
                    impressions,
                    purpose,
                    mfa_code,
                },
        } => {
            let digest = digest_of_doc(&doc.file, &doc.sha256, &doc.pdf)?;
            let token = std::fs::read(&token)
                .with_context(|| format!("cannot read token file {}", token.display()))?;
            let resp = client
                .call(sealgate::protocol::request::Body::GrantTerminal(
                    pb::GrantTerminalRequest {
                        seal_id: seal,
                        document_sha256: digest.to_vec(),
                        approval_token: token,
                        impressions,
                        purpose,
                        mfa_code,
                    },
                ))
                .await?;
            let response::Body::GrantTerminal(g) = check(resp)? else {
                bail!("unexpected reply to GrantTerminal");
            };
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "terminal": g.terminal_id, "grant_id": hex::encode(&g.grant_id),
                        "impressions": g.impressions, "seconds": g.seconds,
                        "approval": g.approval_id, "uses_left": g.uses_left,
                    })
                );
            } else {
                println!(
                    "terminal {} unlocked for {} impression(s) within {} s",
                    g.terminal_id, g.impressions, g.seconds
                );
                println!("grant           {}", hex::encode(&g.grant_id));
                println!(
                    "approval        {} ({} use(s) left)",
                    g.approval_id, g.uses_left
                );
            }
        }
        Command::Token {
            command:
                TokenCommand::Check {
                    seal,
                    doc,
                    mfa_code,
                    token,
                },
        } => {
            let digest = digest_of_doc(&doc.file, &doc.sha256, &doc.pdf)?;
            let bytes = std::fs::read(&token)
                .with_context(|| format!("cannot read {}", token.display()))?;
            let response::Body::CheckApproval(c) = check(
                client
                    .check_approval(&seal, &digest, &bytes, &mfa_code)
                    .await?,
            )?
            else {
                bail!("unexpected reply to CheckApproval");
            };
            if cli.json {
                let denials: Vec<_> = c
                    .denials
                    .iter()
                    .map(|d| json!({"reason": d.reason, "detail": d.detail}))
                    .collect();
                let mut v = json!({"ok": c.would_pass, "would_pass": c.would_pass, "rule": c.rule, "denials": denials});
                if let Some(first) = c.denials.first() {
                    v["status"] = status_name(Status::ApprovalDenied as i32).into();
                    v["code"] = (Status::ApprovalDenied as i32).into();
                    v["reason"] = first.reason.clone().into();
                    v["message"] = first.detail.clone().into();
                }
                println!("{v}");
            } else if c.would_pass {
                println!("would pass (rule {})", c.rule);
            } else {
                println!("would be refused:");
                for d in &c.denials {
                    println!("  {:<20} {}", d.reason, d.detail);
                }
            }
            if !c.would_pass {
                return Ok(exit::REFUSED);
            }
        }
        Command::Token {
            command: TokenCommand::New(a),
        } => {
            let out = a.out.as_ref().expect("--submit requires --out");
            return submit_application(&mut client, out, a.pdf.as_deref(), cli.json).await;
        }
        Command::Token {
            command: TokenCommand::Submit { pdf, token },
        } => return submit_application(&mut client, &token, pdf.as_deref(), cli.json).await,
        Command::Token {
            command: TokenCommand::Fetch { wait, out, id },
        } => return fetch_application(&mut client, &id, wait, out.as_deref(), cli.json).await,
        Command::Token { .. }
        | Command::Audit { .. }
        | Command::Hq { .. }
        | Command::Bench(_)
        | Command::Notify(_)
        | Command::Verify(_) => {
            unreachable!("handled without the daemon")
        }
        Command::Alerts { recent, follow } => {
            let response::Body::Alerts(first) = check(client.watch_alerts(recent, follow).await?)?
            else {
                bail!("unexpected reply to WatchAlerts");
            };
            for r in &first.records {
                print_alert(r, cli.json);
            }
            if follow {
                loop {
                    let response::Body::Alerts(more) = check(client.next_response().await?)? else {
                        bail!("unexpected reply while following alerts");
                    };
                    for r in &more.records {
                        print_alert(r, cli.json);
                    }
                }
            }
        }
        Command::Mfa {
            command: MfaCommand::Enroll { user },
        } => {
            let response::Body::EnrollMfa(e) = check(client.enroll_mfa(&user).await?)? else {
                bail!("unexpected reply to EnrollMfa");
            };
            let uri = zeroize::Zeroizing::new(e.otpauth_uri);
            if cli.json {
                println!("{}", json!({"user": user, "otpauth_uri": *uri}));
            } else {
                let qr = qrcode::QrCode::new(uri.as_bytes()).context("QR code")?;
                let art = qr
                    .render::<qrcode::render::unicode::Dense1x2>()
                    .quiet_zone(true)
                    .build();
                println!("{art}");
                println!("{}", *uri);
                println!("Scan the code or enter the URI in the applicant's authenticator app.");
                println!("This is the only time the secret is shown.");
            }
        }
        Command::Mfa {
            command: MfaCommand::Reset { user },
        } => {
            check(client.reset_mfa(&user).await?)?;
            println!("TOTP lockout cleared for {user}");
        }
        Command::Status => {
            let response::Body::StatusReport(st) = check(client.status().await?)? else {
                bail!("unexpected reply to Status");
            };
            if cli.json {
                let devices: Vec<_> = st
                    .devices
                    .iter()
                    .map(|d| json!({"id": d.id, "profile": d.profile, "status": device_status(d.status), "detail": d.detail, "queued": d.queued, "signing": d.signing, "queue_limit": d.queue_limit}))
                    .collect();
                let seals: Vec<_> = st
                    .seals
                    .iter()
                    .map(|s| json!({"id": s.id, "available": s.available}))
                    .collect();
                let audit = st.audit.as_ref().map(|a| {
                    json!({
                        "head_seq": a.head_seq, "head_hash": a.head_hash,
                        "checkpoint_seq": a.checkpoint_seq,
                        "checkpoint_at_unix_ms": a.checkpoint_at_unix_ms,
                        "error": a.error, "batches": a.batches, "records": a.records,
                    })
                });
                println!(
                    "{}",
                    json!({
                        "version": st.daemon_version, "uptime_seconds": st.uptime_seconds,
                        "connections": st.connections, "devices": devices, "seals": seals,
                        "audit": audit,
                    })
                );
            } else {
                println!(
                    "sealgated {} up {} s, {} connection(s)",
                    st.daemon_version, st.uptime_seconds, st.connections
                );
                for d in &st.devices {
                    println!(
                        "device {:<14} {:<12} queue {}/{} ({} signing)  {}{}",
                        d.id,
                        d.profile,
                        d.queued,
                        d.queue_limit,
                        d.signing,
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
                if let Some(a) = &st.audit {
                    println!(
                        "audit  head {} ({}), checkpoint at {}, {} records in {} commits since start{}",
                        a.head_seq,
                        &a.head_hash[..a.head_hash.len().min(16)],
                        a.checkpoint_seq,
                        a.records,
                        a.batches,
                        if a.error.is_empty() {
                            String::new()
                        } else {
                            format!("; FAILING: {}", a.error)
                        }
                    );
                }
            }
        }
    }
    Ok(exit::DONE)
}
