//! `sealctl bench`: durable stamps per second against the raw device, in one run.
//!
//! On the demo token made by `softhsm-setup.sh`, for each algorithm: the raw PKCS#11 signing
//! rate of the seal's own key (cached handle, one session per thread, as many threads as the
//! daemon has sessions), then the real daemon, started with a configuration of the bench's own,
//! driven over its Unix socket in three scenarios:
//!   a. one standing approval with many uses (batch invoicing), N concurrent clients;
//!   b. single-use approvals with two approver signatures (contracts), N concurrent clients;
//!   c. one client, sequential (the latency floor).
//! Every stamp is checked to be durable in the audit log and covered by a device-signed
//! checkpoint (`sealctl audit verify` on the log afterwards). Last, the speed of `sealctl audit
//! verify` on a log of (by default) a million records.

use anyhow::{bail, Context as _};
use sealgate::device::Algorithm;
use sealgate::protocol::client::Client;
use sealgate::protocol::{response, Status};
use sealgate::token::{Claims, DocClaim, SigningKey, Token};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// With `--json` the human report goes to stderr and one JSON object of the figures to stdout.
pub(crate) static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

macro_rules! say {
    ($($t:tt)*) => {
        if $crate::bench::JSON.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($t)*)
        } else {
            println!($($t)*)
        }
    };
}
#[cfg(feature = "console")]
pub(crate) use say;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The demo directory made by softhsm-setup.sh (token, PIN, approvers, audit key).
    #[arg(long, default_value = ".demo")]
    demo: PathBuf,
    /// Concurrent clients in scenarios a and b.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Stamps in scenario a (all under one approval) and in scenario b.
    #[arg(long, default_value_t = 10_000)]
    stamps: usize,
    /// Stamps in scenario c (one client, one after another).
    #[arg(long, default_value_t = 2_000)]
    sequential: usize,
    /// Seconds of raw signing per algorithm.
    #[arg(long, default_value_t = 3.0)]
    raw_seconds: f64,
    /// Algorithms to measure: seals contract (P-256), finance (Ed25519), official (RSA-PSS).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ecdsa-p256-sha256,ed25519,rsa-pss-sha256"
    )]
    algorithms: Vec<String>,
    /// Records in the log whose verification is timed; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    verify_records: u64,
    /// Records in the log the auditors' console is measured on; 0 skips the console.
    #[arg(long, default_value_t = 1_000_000)]
    console_records: u64,
    /// Browsing sessions on the console at once, each logged in as an auditor of its own.
    #[arg(long, default_value_t = 50)]
    console_sessions: u64,
    /// Seconds the sessions browse.
    #[arg(long, default_value_t = 20.0)]
    console_seconds: f64,
    /// Measure the console only (no stamp scenarios, no verification timing).
    #[arg(long)]
    console_only: bool,
    /// The sealgated binary (default: the one beside this sealctl).
    #[arg(long)]
    sealgated: Option<PathBuf>,
}

/// The demo's seals, by algorithm: (seal id, key label).
fn demo_seal(algorithm: Algorithm) -> anyhow::Result<(&'static str, &'static str)> {
    Ok(match algorithm {
        Algorithm::EcdsaP256Sha256 => ("contract", "contract-seal"),
        Algorithm::Ed25519 => ("finance", "finance-seal"),
        Algorithm::RsaPssSha256 => ("official", "official-seal"),
        other => bail!("the demo token has no {} seal", other.name()),
    })
}

/// Sessions the daemon opens on the demo token (the softhsm2 profile's default).
const SESSIONS: usize = 2;

pub fn run(args: BenchArgs, json: bool) -> anyhow::Result<()> {
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    let mut figures = serde_json::Map::new();
    let demo = args
        .demo
        .canonicalize()
        .with_context(|| format!("{}: run softhsm-setup.sh first", args.demo.display()))?;
    // SAFETY of the environment: set before any thread of this process starts.
    std::env::set_var("SOFTHSM2_CONF", demo.join("softhsm2.conf"));
    let algorithms = args
        .algorithms
        .iter()
        .map(|a| Algorithm::parse(a).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sealgated = match &args.sealgated {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("sealctl has no directory")?
            .join("sealgated"),
    };
    figures.insert("machine".into(), print_machine().into());
    let keys = Approvers::load(&demo)?;
    let verify_cost = keys.verify_cost();
    figures.insert("approval_verify_us".into(), (verify_cost * 1e6).into());
    let mut per_algorithm = Vec::new();
    say!(
        "approval verification (both approvers' signatures of a token, one core): {:.1} µs",
        verify_cost * 1e6
    );

    let work = WorkDir::new()?;
    let daemon = BenchDaemon::start(&sealgated, &demo, work.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut total_stamps = 0usize;
    let algorithms = if args.console_only {
        vec![]
    } else {
        algorithms
    };
    for algorithm in algorithms {
        let (seal, label) = demo_seal(algorithm)?;
        say!("\n== {} (seal {seal}) ==", algorithm.name());
        let raw = raw_rate(&demo, label, algorithm, SESSIONS, args.raw_seconds)?;
        let raw1 = raw_rate(&demo, label, algorithm, 1, args.raw_seconds.min(1.0))?;
        say!(
            "raw C_Sign ({SESSIONS} threads, a session each, cached handle): {raw:.0}/s   (1 thread: {raw1:.0}/s)"
        );
        let mut scenario_figures = Vec::new();
        let scenarios = [
            (
                "a",
                "one approval, many uses",
                args.clients,
                args.stamps,
                true,
            ),
            (
                "b",
                "single-use approvals, two signatures",
                args.clients,
                args.stamps,
                false,
            ),
            ("c", "one client, sequential", 1, args.sequential, false),
        ];
        for (name, what, clients, stamps, standing) in scenarios {
            let tokens = keys.tokens(seal, stamps, standing);
            let cpu_before = cpu_seconds(daemon.child.id());
            let clients_before = cpu_seconds(std::process::id());
            let r = runtime.block_on(drive(&daemon.socket, seal, clients, tokens))?;
            // The daemon's own processor time per stamp: what other tenants of the machine
            // do not move, where the rates above move by a third between runs. The clients'
            // (this process, which does nothing else meanwhile) is on the same cores.
            let per_stamp = |before: Option<f64>, after: Option<f64>| match (before, after) {
                (Some(a), Some(b)) if r.ok > 0 => (b - a) / r.ok as f64 * 1e6,
                _ => f64::NAN,
            };
            let cpu_us = per_stamp(cpu_before, cpu_seconds(daemon.child.id()));
            let clients_cpu_us = per_stamp(clients_before, cpu_seconds(std::process::id()));
            total_stamps += r.ok;
            say!(
                "{name}. {what:<38} {clients:>2} clients  {:>7.0} stamps/s  ratio to raw {:.2}  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  avg audit batch {:.1}  daemon CPU {cpu_us:.0} µs/stamp",
                r.rate(),
                r.rate() / raw,
                r.percentile(0.50),
                r.percentile(0.95),
                r.percentile(0.99),
                r.avg_batch,
            );
            let mut f = serde_json::json!({
                "scenario": name, "what": what, "clients": clients, "stamps": r.ok,
                "stamps_per_second": r.rate(), "ratio_to_raw": r.rate() / raw,
                "p50_ms": r.percentile(0.50), "p95_ms": r.percentile(0.95),
                "p99_ms": r.percentile(0.99), "avg_audit_batch": r.avg_batch,
                "daemon_cpu_us_per_stamp": cpu_us, "clients_cpu_us_per_stamp": clients_cpu_us,
            });
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            // What a stamp may cost the machine's cores, daemon and clients together, for the
            // pipeline's target rate ((a) 0.6 of raw, (b) half the ceiling below).
            let budget = |target_rate: f64| {
                let budget_us = cores / target_rate * 1e6;
                say!(
                    "   processor time per stamp: daemon {cpu_us:.0} + clients {clients_cpu_us:.0} µs; the target rate {target_rate:.0}/s allows {budget_us:.0} µs on {cores} cores"
                );
                budget_us
            };
            if name == "a" {
                f["target_cpu_budget_us"] = budget(0.6 * raw).into();
            }
            if name == "b" {
                // Per stamp the machine's cores do two approval verifications and one device
                // signature (SoftHSM signs on the same cores): that is the ceiling.
                let ceiling = cores / (verify_cost + 1.0 / raw1);
                say!(
                    "   ceiling from measured costs ({cores} cores / (one approval's verifications + 1 signature)): {ceiling:.0}/s; ratio to ceiling {:.2}",
                    r.rate() / ceiling
                );
                f["ceiling_per_second"] = ceiling.into();
                f["ratio_to_ceiling"] = (r.rate() / ceiling).into();
                f["target_cpu_budget_us"] = budget(0.5 * ceiling).into();
            }
            if name == "c" {
                // One stamp waits on two commits, each ending in an fsync of the WAL; what one
                // costs on this disk now, beside the daemon's state directory.
                let fsync_us = fsync_cost(work.path())?;
                say!(
                    "   the disk here: an fsync of a page written over takes {fsync_us:.0} µs at the median; a stamp waits on two"
                );
                f["fsync_us_p50"] = fsync_us.into();
            }
            scenario_figures.push(f);
        }
        per_algorithm.push(serde_json::json!({
            "algorithm": algorithm.name(), "seal": seal,
            "raw_sign_per_second": raw, "raw_sign_per_second_one_thread": raw1,
            "scenarios": scenario_figures,
        }));
    }
    figures.insert("algorithms".into(), per_algorithm.into());
    let db = daemon.stop()?;
    if !args.console_only {
        check_stamps(&db, &demo, total_stamps, &mut figures)?;
        if args.verify_records > 0 {
            let (n, secs) = verify_speed(&demo, work.path(), args.verify_records, &runtime)?;
            figures.insert(
                "audit_verify".into(),
                serde_json::json!({"records": n, "seconds": secs, "records_per_second": n as f64 / secs}),
            );
        }
    }
    #[cfg(not(feature = "console"))]
    if args.console_records > 0 && args.console_sessions > 0 {
        say!("the console is not measured: this sealctl was built without its console feature");
    }
    #[cfg(feature = "console")]
    if args.console_records > 0 && args.console_sessions > 0 {
        let dir = work.path().join("console");
        std::fs::create_dir(&dir)?;
        let daemon = BenchDaemon::start(&sealgated, &demo, &dir)?;
        let f = super::bench_console::run(
            &demo,
            &dir,
            &daemon.socket,
            args.console_records,
            args.console_sessions,
            args.console_seconds,
            &runtime,
        )?;
        figures.insert("console".into(), f);
        daemon.stop()?;
    }
    if json {
        println!("{}", serde_json::Value::Object(figures));
    }
    Ok(())
}

/// Checks the daemon's log after the stamp scenarios: it verifies and holds one
/// `stamp.completed` per stamp the clients got.
fn check_stamps(
    db: &Path,
    demo: &Path,
    total_stamps: usize,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    let (ok, completed) = check_log(db, demo)?;
    say!(
        "\naudit log after the run: verifies: {ok}; stamp.completed records {completed}, stamps the clients got {total_stamps}"
    );
    figures.insert(
        "audit_log".into(),
        serde_json::json!({"verifies": ok, "stamp_completed": completed, "stamps_got": total_stamps}),
    );
    if !ok || completed != total_stamps {
        bail!("the audit log does not account for every stamp");
    }
    Ok(())
}

/// A private directory for the bench's daemon and logs, removed at the end.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> anyhow::Result<WorkDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "sealgate-bench-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(WorkDir(path))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn print_machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let line = format!("{cores} cores, {cpu}; SoftHSM token from softhsm-setup.sh");
    say!("machine: {line}");
    line
}

/// The demo approvers who sign in the bench: a department head, then an executive.
struct Approvers {
    head: SigningKey,
    exec: SigningKey,
}

impl Approvers {
    fn load(demo: &Path) -> anyhow::Result<Approvers> {
        let key = |id: &str| -> anyhow::Result<SigningKey> {
            let path = demo.join(format!("approvers/{id}.key"));
            let pem =
                std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            SigningKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        };
        Ok(Approvers {
            head: key("zhang.wei")?,
            exec: key("li.na")?,
        })
    }

    /// Tokens for `stamps` stamps: one with that many uses, or one single-use token each.
    fn tokens(&self, seal: &str, stamps: usize, standing: bool) -> Vec<([u8; 32], Arc<Vec<u8>>)> {
        use sha2::Digest;
        let now = jiff::Timestamp::now().as_second();
        let nonce: u64 = rand_u64();
        let make = |i: usize, uses: u32| {
            let digest: [u8; 32] = sha2::Sha256::digest(format!("bench {seal} {nonce} {i}")).into();
            let mut t = Token::unsigned(Claims {
                jti: format!("bench-{nonce}-{seal}-{i}"),
                seal: seal.into(),
                doc: DocClaim {
                    sha256: hex::encode(digest),
                    doc_type: "contract".into(),
                    title: None,
                    sha512: None,
                    placement: None,
                },
                amount: None,
                dept: "sales".into(),
                scope: String::new(),
                applicant: "zhao.lei".into(),
                purpose: "benchmark".into(),
                iat: now - 60,
                nbf: now - 60,
                exp: now + 3600,
                uses,
            });
            t.add_signature(&self.head, "zhang.wei", now - 30);
            t.add_signature(&self.exec, "li.na", now - 20);
            (digest, Arc::new(t.to_json().into_bytes()))
        };
        if standing {
            let one = make(0, stamps as u32);
            vec![one; stamps]
        } else {
            (0..stamps).map(|i| make(i, 1)).collect()
        }
    }

    /// Seconds the signatures of one two-approver token take to verify (the demo approvers'
    /// keys differ in algorithm, so each is measured), on this machine.
    fn verify_cost(&self) -> f64 {
        let tokens = self.tokens("contract", 1, false);
        let token = Token::parse(&tokens[0].1).expect("a token of our own making");
        let keys = [self.head.verifying_key(), self.exec.verifying_key()];
        let n = 1000;
        let start = Instant::now();
        for _ in 0..n {
            for (i, key) in keys.iter().enumerate() {
                assert!(token.verify(i, key));
            }
        }
        start.elapsed().as_secs_f64() / f64::from(n)
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system gives random bytes");
    u64::from_le_bytes(b)
}

/// Signatures per second of the seal's key straight through PKCS#11: `threads` threads, each
/// with its own logged-in session and the key handle found once.
fn raw_rate(
    demo: &Path,
    label: &str,
    algorithm: Algorithm,
    threads: usize,
    seconds: f64,
) -> anyhow::Result<f64> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, ObjectClass};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    let profile = sealgate::device::profile::DeviceProfile::load(&profiles_dir(demo)?, "softhsm2")?;
    let module = profile
        .pkcs11
        .iter()
        .flat_map(|p| p.modules.iter())
        .find(|m| m.exists())
        .context("SoftHSM is not installed")?;
    let ctx = Pkcs11::new(module)?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = ctx
        .get_slots_with_token()?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == "sealgate-demo")
        })
        .context("no sealgate-demo token")?;
    let pin = std::fs::read_to_string(demo.join("user.pin"))?;
    let login = ctx.open_ro_session(slot)?;
    login.login(UserType::User, Some(&AuthPin::from(pin.trim().to_owned())))?;
    let handle = *login
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])?
        .first()
        .with_context(|| format!("no private key {label:?}"))?;
    // As the daemon signs: with a session copy of the key where the token makes one.
    let handle = sealgate::device::pkcs11::session_copy(&login, handle, &label);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let counts: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let ctx = &ctx;
                s.spawn(move || -> anyhow::Result<u64> {
                    let session = ctx.open_ro_session(slot)?;
                    let (mechanism, data) =
                        sealgate::device::pkcs11::sign_mechanism(algorithm, &[0x5a; 32]);
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        session.sign(&mechanism, handle, &data)?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("signing thread").unwrap_or(0))
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    drop(login);
    ctx.finalize()?;
    Ok(counts.iter().sum::<u64>() as f64 / elapsed)
}

/// What one scenario measured.
struct Outcome {
    ok: usize,
    elapsed: f64,
    latencies_ms: Vec<f64>,
    avg_batch: f64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed
    }
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_ms.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_ms.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_ms[i]
    }
}

/// The median time of an fsync after a page (4 KiB) of a file in `dir` is written over, as
/// SQLite's commits do with the WAL once it has wrapped: 300 rounds on a 1 MiB file.
fn fsync_cost(dir: &Path) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    const SIZE: u64 = 1 << 20;
    let path = dir.join("fsync-probe");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.write_all_at(&vec![0u8; SIZE as usize], 0)?;
    file.sync_all()?;
    let mut page = [0u8; 4096];
    let mut times = Vec::with_capacity(300);
    for i in 0..300u64 {
        page[..8].copy_from_slice(&i.to_le_bytes());
        file.write_all_at(&page, i * 4096 % SIZE)?;
        let started = Instant::now();
        file.sync_all()?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Processor time (user and system, all threads) a process has used so far, from
/// `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis start at the third (state); utime and
    // stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(ticks as f64 / per_second as f64)
}

/// Runs the stamps over `clients` connections, each taking the next token from a shared queue.
async fn drive(
    socket: &Path,
    seal: &str,
    clients: usize,
    tokens: Vec<([u8; 32], Arc<Vec<u8>>)>,
) -> anyhow::Result<Outcome> {
    let before = audit_counts(socket).await?;
    let queue = Arc::new(std::sync::Mutex::new(tokens));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (queue, socket, seal) = (queue.clone(), socket.to_owned(), seal.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&socket).await?;
            let mut latencies = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                let Some((digest, token)) = next else { break };
                let t = Instant::now();
                let r = client.stamp(&seal, &digest, &token, "").await?;
                if r.status != Status::Ok as i32 {
                    bail!("a stamp failed: {} {}", r.reason, r.message);
                }
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies_ms = Vec::new();
    for t in tasks {
        latencies_ms.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = audit_counts(socket).await?;
    latencies_ms.sort_by(f64::total_cmp);
    let batches = after.0.saturating_sub(before.0).max(1);
    Ok(Outcome {
        ok: latencies_ms.len(),
        elapsed,
        avg_batch: after.1.saturating_sub(before.1) as f64 / batches as f64,
        latencies_ms,
    })
}

/// The audit writer's commits and records so far, from the daemon's status.
async fn audit_counts(socket: &Path) -> anyhow::Result<(u64, u64)> {
    let mut c = Client::connect(socket).await?;
    let r = c.status().await?;
    match r.body {
        Some(response::Body::StatusReport(s)) => {
            let a = s.audit.unwrap_or_default();
            Ok((a.batches, a.records))
        }
        _ => bail!("status: {}", r.message),
    }
}

/// The daemon under test, with its own configuration and state in the bench's directory.
struct BenchDaemon {
    child: Child,
    socket: PathBuf,
    db: PathBuf,
}

impl BenchDaemon {
    fn start(sealgated: &Path, demo: &Path, dir: &Path) -> anyhow::Result<BenchDaemon> {
        let socket = dir.join("sealgated.sock");
        let state = dir.join("state");
        let uid = nix::unistd::getuid().as_raw();
        let mut config = format!(
            r#"
[daemon]
socket = "{socket}"
profiles_dir = "{profiles}"
state_dir = "{state}"
max_connections = 256
request_timeout_ms = 30000
allow_root = true

[[caller]]
name = "bench"
uids = [{uid}]
seals = ["contract", "finance", "official"]
admin = true
# The console part's sealgate-console records its auditors' actions as this caller.
oversight = true

[[device]]
id = "demo-hsm"
profile = "softhsm2"
token_label = "sealgate-demo"
pin_file = "{pin}"

[audit]
device = "demo-hsm"
key_label = "sealgate-audit"

[[approver]]
id = "zhang.wei"
role = "dept_head"
department = "sales"
public_key_file = "{demo}/approvers/zhang.wei.pub.pem"

[[approver]]
id = "li.na"
role = "executive"
department = "management"
public_key_file = "{demo}/approvers/li.na.pub.pem"
"#,
            socket = socket.display(),
            profiles = profiles_dir(demo)?.display(),
            state = state.display(),
            pin = demo.join("user.pin").display(),
            demo = demo.display(),
        );
        for alg in [
            Algorithm::EcdsaP256Sha256,
            Algorithm::Ed25519,
            Algorithm::RsaPssSha256,
        ] {
            let (seal, label) = demo_seal(alg)?;
            config += &format!(
                "\n[[seal]]\nid = \"{seal}\"\ndevice = \"demo-hsm\"\nkey_label = \"{label}\"\nalgorithm = \"{}\"\n\n[[seal.rule]]\nname = \"contracts\"\nlevels = [\"dept_head\", \"executive\"]\n",
                alg.name()
            );
        }
        let config_path = dir.join("sealgate.toml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.join("sealgated.log"))?;
        let mut command = Command::new(sealgated);
        // The daemon is the bench's own: if the bench is killed (not only interrupted at the
        // terminal, which reaches the whole process group), the daemon gets SIGTERM and shuts
        // down rather than holding a token session and its state directory. The signal follows
        // the thread that started the child, here the bench's main thread.
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of ours.
        let bench = std::process::id();
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
                // The bench may have died before the prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != bench {
                    // An error that needs no allocation, after fork.
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let child = command
            .arg("--config")
            .arg(&config_path)
            .env("SEALGATE_LOG", "warn")
            .env("SEALGATE_LOG_FORMAT", "text")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", sealgated.display()))?;
        let mut d = BenchDaemon {
            child,
            socket,
            db: state.join("sealgate.db"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "sealgated exited ({status}): {}",
                    std::fs::read_to_string(dir.join("sealgated.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("sealgated did not open its socket in 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    /// Stops the daemon (SIGTERM, a clean shutdown) and gives the path of its log.
    fn stop(mut self) -> anyhow::Result<PathBuf> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let status = self.child.wait()?;
        if !status.success() {
            bail!("sealgated ended with {status}");
        }
        Ok(self.db.clone())
    }
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The device profiles: beside the demo (a checkout) or installed.
fn profiles_dir(demo: &Path) -> anyhow::Result<PathBuf> {
    let candidates = [
        demo.parent().map(|p| p.join("device-profiles")),
        Some(PathBuf::from("device-profiles")),
        Some(PathBuf::from("/usr/local/share/sealgate/device-profiles")),
        Some(PathBuf::from("/usr/share/sealgate/device-profiles")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("softhsm2.toml").exists())
        .map(|p| p.canonicalize())
        .transpose()?
        .context("no device-profiles directory with softhsm2.toml")
}

/// Verifies the log with `sealctl audit verify` and counts its completed stamps.
fn check_log(db: &Path, demo: &Path) -> anyhow::Result<(bool, usize)> {
    let me = std::env::current_exe()?;
    let out = Command::new(&me)
        .args(["audit", "verify", "--db"])
        .arg(db)
        .arg("--key")
        .arg(demo.join("audit-key.pub.pem"))
        .output()?;
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let completed: i64 = conn.query_row(
        "SELECT count(*) FROM audit WHERE kind = 'stamp.completed'",
        [],
        |r| r.get(0),
    )?;
    Ok((out.status.success(), completed as usize))
}

/// Builds a log of `n` records (stamp-like, checkpoints signed by the demo audit key, written
/// by the daemon's own writer) and times `sealctl audit verify` on it.
fn verify_speed(
    demo: &Path,
    dir: &Path,
    n: u64,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<(u64, f64)> {
    use sealgate::audit::{anomaly::Anomaly, log::AuditKey, log::AuditLog, Record};
    say!("\n== sealctl audit verify ==");
    let state = dir.join("verify-state");
    let store = sealgate::store::Store::open(&state)?;
    let device = audit_device(demo)?;
    let log = AuditLog::open(
        store.path().to_owned(),
        AuditKey {
            device: Arc::new(device),
            key: 0,
        },
        Anomaly::none(),
        String::new(),
    )?;
    let build = Instant::now();
    let log_for_writers = log.clone();
    in_parallel(runtime, 1024, n, move |i| {
        let log = log_for_writers.clone();
        async move {
            // Authorisations: their evidence is not a signature, so this measures the chain
            // and checkpoints; each completed stamp's signature check is extra.
            let mut r = Record::new(sealgate::audit::kind::STAMP_AUTHORIZED);
            r.caller = "oa-system".into();
            r.seal = "contract".into();
            r.device = "demo-hsm".into();
            r.applicant = "zhao.lei".into();
            r.doc_sha256 = format!("{i:064x}");
            r.doc_type = "invoice".into();
            r.approvers = r#"[{"id":"wang.fang","role":"finance","level":1}]"#.into();
            r.jti = format!("invoices-2026-11-{}", i / 10_000);
            r.evidence = format!(
                r#"{{"algorithm":"ecdsa-p256-sha256","signature_sha256":"{i:064x}","key":"contract-seal"}}"#
            );
            log.append(r).await?;
            Ok(())
        }
    })?;
    log.shutdown();
    say!(
        "built a log of {n} records in {:.1} s",
        build.elapsed().as_secs_f64()
    );
    let me = std::env::current_exe()?;
    let start = Instant::now();
    let out = Command::new(&me)
        .args(["audit", "verify", "--db"])
        .arg(store.path())
        .arg("--key")
        .arg(demo.join("audit-key.pub.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let secs = start.elapsed().as_secs_f64();
    if !out.success() {
        bail!("sealctl audit verify failed on the bench's own log");
    }
    say!(
        "sealctl audit verify: {n} records in {secs:.2} s = {:.0} records/s (whole command, one core)",
        n as f64 / secs
    );
    Ok((n, secs))
}

/// The demo's audit key, as the daemon opens it.
/// Runs `write(i)` for every `i` below `n`, `writers` at a time on `runtime` (each writer
/// takes every `writers`-th index), as many clients would: the audit writer batches them.
pub(crate) fn in_parallel<F, Fut>(
    runtime: &tokio::runtime::Runtime,
    writers: u64,
    n: u64,
    write: F,
) -> anyhow::Result<()>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let write = write.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                while i < n {
                    write(i).await?;
                    i += writers;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })
}

pub(crate) fn audit_device(demo: &Path) -> anyhow::Result<sealgate::device::pkcs11::Pkcs11Device> {
    use sealgate::device::profile::DeviceProfile;
    use sealgate::device::KeySpec;
    let profiles = profiles_dir(demo)?;
    let profile = DeviceProfile::load(&profiles, "softhsm2")?;
    let config = sealgate::config::DeviceConfig {
        id: "demo-hsm".into(),
        profile: "softhsm2".into(),
        module: None,
        token_label: Some("sealgate-demo".into()),
        token_serial: None,
        pin_file: Some(demo.join("user.pin")),
        pin_credential: None,
        sessions: Some(1),
        wrap_key_label: None,
        card_id: None,
        reader: None,
    };
    let spec = KeySpec {
        label: Some("sealgate-audit".into()),
        id: None,
        algorithm: Algorithm::EcdsaP256Sha256,
    };
    Ok(sealgate::device::pkcs11::Pkcs11Device::open(
        &config,
        profile,
        vec![spec],
    )?)
}
