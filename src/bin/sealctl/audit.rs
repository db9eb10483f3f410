//! `sealctl audit`: offline work on a copy of the log (the daemon's database file, or an
//! exported bundle). Needs read access to the file and nothing else: no daemon, no device.

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use sealgate::audit::query::{self, Filter};
use sealgate::audit::verify::{verify, Problem, Report, SealKeys, TrustedKey};
use sealgate::audit::Checkpoint;
use sealgate::device::keys::pem;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain, the sequence, every checkpoint's device signature and every
    /// completed stamp's signature under its seal key, with nothing but public keys. Exit 0
    /// only when everything holds; 1 when something does not (with --key, also when nothing
    /// in the log is signed by a key given, as for an empty log); 2 when the log or a key
    /// cannot be read.
    Verify {
        #[command(flatten)]
        source: Source,
        /// A trusted audit public key (SPKI PEM); repeat for keys used over time. Without it,
        /// the keys recorded in the log itself are used, which proves the log consistent but
        /// not that it came from your device.
        #[arg(long)]
        key: Vec<PathBuf>,
        /// HQ's witness public key (SPKI PEM): also check HQ's cosignatures of this log (from
        /// --cosignatures, by default hq-cosignatures.db beside --db), report the newest
        /// point HQ cosigned, and fail a log that ends before it or differs at it.
        #[arg(long, conflicts_with = "bundle")]
        hq_key: Option<PathBuf>,
        #[arg(long, requires = "hq_key")]
        cosignatures: Option<PathBuf>,
    },
    /// Records matching every filter given, oldest first.
    Query {
        #[command(flatten)]
        db: Db,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Everything, for a SIEM (JSON lines, each record with its hashes) or for an outside
    /// auditor (a bundle directory that `audit verify --bundle` checks).
    Export {
        #[command(flatten)]
        db: Db,
        /// JSON lines of every record, to stdout or --out.
        #[arg(long, value_enum, conflicts_with = "bundle")]
        format: Option<ExportFormat>,
        #[arg(long, requires = "format")]
        out: Option<PathBuf>,
        /// Write records, checkpoints, the audit and seal public keys (with the seals'
        /// certificates) and a README to this directory.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// CA certificates (PEM) to put in the bundle's ca/ folder, so the seals' certificates
        /// can be checked from the bundle alone; repeat for a chain.
        #[arg(long, requires = "bundle")]
        ca: Vec<PathBuf>,
    },
    /// Stamps per seal per day, top applicants, refusals by reason, alerts by rule.
    Stats {
        #[command(flatten)]
        db: Db,
        /// Only records since this time (RFC 3339, or YYYY-MM-DD in UTC).
        #[arg(long)]
        since: Option<String>,
        /// How many applicants, reasons and rules to list.
        #[arg(long, default_value_t = 10)]
        top: u64,
    },
    /// Send the log to headquarters (sealgate-hq) from HQ's head on, over TLS with this site's
    /// client certificate. Reads the log read-only; the daemon goes on stamping whatever the
    /// link does. Exit 0 when HQ holds everything (without --follow), 1 when HQ refuses the
    /// log (a fork, a cut tail, a forged checkpoint: see the message), 2 when HQ cannot be
    /// reached.
    Ship(ShipArgs),
}

#[derive(ClapArgs)]
pub struct ShipArgs {
    #[command(flatten)]
    db: Db,
    /// HQ's address, host:port.
    #[arg(long, env = "SEALGATE_HQ")]
    hq: String,
    /// The name in HQ's certificate (default: the host of --hq).
    #[arg(long)]
    server_name: Option<String>,
    /// CA certificates (PEM) that HQ's certificate chains to.
    #[arg(long)]
    ca: PathBuf,
    /// This site's client certificate and key (PEM), as enrolled at HQ.
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Records per batch, at most.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Keep shipping new records as they come, and reconnect after failures, until SIGTERM.
    #[arg(long)]
    follow: bool,
    /// How often to look for new records (milliseconds).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// The longest wait between reconnections (milliseconds).
    #[arg(long, default_value_t = 30_000)]
    max_backoff_ms: u64,
    /// Where to keep HQ's cosignatures (default: hq-cosignatures.db beside --db).
    #[arg(long)]
    cosignatures: Option<PathBuf>,
    /// HQ's witness public key (SPKI PEM, from `sealgate-hq witness-key`): cosignatures that
    /// do not verify under it are not kept.
    #[arg(long)]
    hq_key: Option<PathBuf>,
    /// Hand HQ's newest policy fragment for this site to the daemon (at --socket), which puts
    /// it in force if it passes the site's `[hq_policy]`.
    #[arg(long)]
    apply_policy: bool,
}

#[derive(ClapArgs)]
pub struct Db {
    /// The daemon's state database (state_dir/sealgate.db).
    #[arg(
        long,
        env = "SEALGATE_DB",
        default_value = "/var/lib/sealgate/sealgate.db"
    )]
    db: PathBuf,
}

#[derive(ClapArgs)]
pub struct Source {
    #[command(flatten)]
    db: Db,
    /// Verify an exported bundle directory instead of a database.
    #[arg(long)]
    bundle: Option<PathBuf>,
}

#[derive(ClapArgs)]
pub struct FilterArgs {
    /// From this time on (RFC 3339, or YYYY-MM-DD in UTC).
    #[arg(long)]
    since: Option<String>,
    /// Before this time.
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    seal: Option<String>,
    #[arg(long)]
    applicant: Option<String>,
    /// Records whose approval this approver signed.
    #[arg(long)]
    approver: Option<String>,
    #[arg(long)]
    caller: Option<String>,
    /// e.g. stamp.completed, stamp.denied, alert.
    #[arg(long)]
    kind: Option<String>,
    /// A refusal's reason code, or an alert's rule.
    #[arg(long)]
    reason: Option<String>,
    /// The document's SHA-256 (hex).
    #[arg(long)]
    doc: Option<String>,
    #[arg(long)]
    limit: Option<u64>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
}

/// Runs an audit command; returns the process's exit code.
pub fn run(command: &AuditCommand, json: bool, socket: &Path) -> anyhow::Result<i32> {
    match command {
        AuditCommand::Verify {
            source,
            key,
            hq_key,
            cosignatures,
        } => {
            let witness = hq_key.as_ref().map(|k| {
                (
                    k.as_path(),
                    cosignatures
                        .clone()
                        .unwrap_or_else(|| sealgate::hq::cosign::default_store(&source.db.db)),
                )
            });
            run_verify(source, key, witness, json)
        }
        AuditCommand::Query { db, filter, format } => {
            let conn = open(&db.db)?;
            query_out(&conn, &filter.to_filter()?, *format)?;
            Ok(0)
        }
        AuditCommand::Export {
            db,
            format,
            out,
            bundle,
            ca,
        } => {
            let conn = open(&db.db)?;
            match (format, bundle) {
                (Some(ExportFormat::Jsonl), _) => {
                    let sink: Box<dyn Write> = match out {
                        Some(p) => Box::new(
                            std::fs::File::create(p)
                                .with_context(|| format!("cannot create {}", p.display()))?,
                        ),
                        None => Box::new(std::io::stdout().lock()),
                    };
                    let n = write_jsonl(&conn, sink)?;
                    if out.is_some() {
                        eprintln!("exported {n} records");
                    }
                }
                (None, Some(dir)) => export_bundle(&conn, dir, ca)?,
                (None, None) => bail!("give --format jsonl or --bundle DIR"),
            }
            Ok(0)
        }
        AuditCommand::Ship(a) => ship(a, json, socket),
        AuditCommand::Stats { db, since, top } => {
            let conn = open(&db.db)?;
            let since = since.as_deref().map(parse_time).transpose()?;
            let s = query::stats(&conn, since, *top)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_stats(&s);
            }
            Ok(0)
        }
    }
}

fn ship(a: &ShipArgs, json: bool, socket: &Path) -> anyhow::Result<i32> {
    use sealgate::hq::ship::{ship, ShipConfig};
    // The shipper says what happens on the way (interruptions, refusals, HQ's policy) in log
    // lines: to the journal under systemd, else to stderr.
    sealgate::logging::init(sealgate::logging::LogFormat::Auto, "sealctl-ship");
    let server_name = match &a.server_name {
        Some(n) => n.clone(),
        None => {
            a.hq.rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
                .unwrap_or_else(|| a.hq.clone())
        }
    };
    let config = ShipConfig {
        db: a.db.db.clone(),
        hq: a.hq.clone(),
        server_name,
        ca: a.ca.clone(),
        cert: a.cert.clone(),
        key: a.key.clone(),
        batch_records: a.batch.max(1),
        follow: a.follow,
        interval: std::time::Duration::from_millis(a.interval_ms.max(10)),
        max_backoff: std::time::Duration::from_millis(a.max_backoff_ms.max(a.interval_ms)),
        cosignatures: a
            .cosignatures
            .clone()
            .unwrap_or_else(|| sealgate::hq::cosign::default_store(&a.db.db)),
        hq_key: a.hq_key.as_deref().map(key_file).transpose()?,
        policy_socket: a.apply_policy.then(|| socket.to_owned()),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    runtime.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            let _ = stop_tx.send(true);
        });
        let started = std::time::Instant::now();
        match ship(&config, stop_rx).await {
            Ok(done) => {
                let seconds = started.elapsed().as_secs_f64();
                let rate = done.records as f64 / seconds.max(1e-9);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"records": done.records, "batches": done.batches, "hq_head": done.head, "hq_cosigned": done.cosigned, "policy_version": done.policy_version, "seconds": seconds, "records_per_second": rate})
                    );
                } else {
                    println!(
                        "shipped {} records in {} batches in {seconds:.2} s ({rate:.0} records/s); HQ holds this site's log up to seq {}",
                        done.records, done.batches, done.head
                    );
                    if done.cosigned > 0 {
                        println!("HQ cosigned the log up to seq {}", done.cosigned);
                    }
                    if let Some(v) = done.policy_version {
                        println!("HQ policy version {v} is in force at the daemon");
                    }
                }
                Ok(0)
            }
            Err(e) => {
                eprintln!("sealctl: {e}");
                Ok(if e.passing() { 2 } else { 1 })
            }
        }
    })
}

fn open(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    query::open_read_only(path).with_context(|| format!("cannot open {}", path.display()))
}

/// Milliseconds since the epoch from RFC 3339 or a UTC date.
pub(crate) fn parse_time(s: &str) -> anyhow::Result<i64> {
    sealgate::audit::parse_time(s).map_err(anyhow::Error::msg)
}

/// A Unix time in milliseconds as RFC 3339 (UTC, milliseconds).
pub fn time(ms: i64) -> String {
    sealgate::audit::rfc3339(ms)
}

impl FilterArgs {
    pub(crate) fn to_filter(&self) -> anyhow::Result<Filter> {
        Ok(Filter {
            since_ms: self.since.as_deref().map(parse_time).transpose()?,
            until_ms: self.until.as_deref().map(parse_time).transpose()?,
            seal: self.seal.clone(),
            applicant: self.applicant.clone(),
            approver: self.approver.clone(),
            caller: self.caller.clone(),
            kind: self.kind.clone(),
            reason: self.reason.clone(),
            doc_sha256: self.doc.clone(),
            limit: self.limit,
            ..Filter::default()
        })
    }
}

fn run_verify(
    source: &Source,
    key_files: &[PathBuf],
    witness: Option<(&Path, PathBuf)>,
    json: bool,
) -> anyhow::Result<i32> {
    let keys = key_files
        .iter()
        .map(|p| key_file(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let from_log = keys.is_empty();
    let started = std::time::Instant::now();
    let report = match &source.bundle {
        Some(dir) => verify_bundle(dir, keys)?,
        None => verify_db(&source.db.db, keys, json)?,
    };
    let mut report = report;
    if !from_log && report.checkpoints == 0 {
        report.problems.insert(
            0,
            Problem {
                seq: 0,
                what: "nothing in it is signed by the key given: it holds no checkpoint".into(),
            },
        );
    }
    let cosigned = match witness {
        Some((key, store)) => Some(check_cosignatures(
            &source.db.db,
            &key_file(key)?,
            &store,
            &mut report,
        )?),
        None => None,
    };
    let seconds = started.elapsed().as_secs_f64();
    let rate = report.records as f64 / seconds.max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": report.ok(),
                "records": report.records,
                "last_seq": report.last_seq,
                "checkpoints": report.checkpoints,
                "last_checkpoint_seq": report.last_checkpoint_seq,
                "stamps_checked": report.stamps_checked,
                "problems": report.problems,
                "keys_from_log": from_log,
                "hq_cosigned_seq": cosigned.as_ref().map(|c| c.0),
                "hq_cosigned_at_ms": cosigned.as_ref().map(|c| c.1),
                "seconds": seconds,
                "records_per_second": rate,
            })
        );
    } else {
        if from_log {
            eprintln!("note: no --key given; checkpoints were checked against the audit keys recorded in the log itself");
        }
        print_report(&report, seconds, rate);
        match cosigned {
            Some((0, _)) => println!("HQ has cosigned none of this log"),
            Some((seq, at)) => println!("HQ cosigned this log up to seq {seq} ({})", time(at)),
            None => {}
        }
    }
    Ok(if report.ok() { 0 } else { 1 })
}

/// Checks HQ's cosignatures of the log at `db` under HQ's `key`, adding what does not hold
/// to the report. Returns the newest point HQ cosigned (seq and time; 0 for none).
fn check_cosignatures(
    db: &Path,
    key: &TrustedKey,
    store: &Path,
    report: &mut Report,
) -> anyhow::Result<(u64, i64)> {
    let Some(cosignatures) = sealgate::hq::cosign::read_store(store)
        .with_context(|| format!("cannot read {}", store.display()))?
    else {
        return Ok((0, 0));
    };
    let conn = open(db)?;
    let mut stmt = conn.prepare("SELECT hash FROM audit WHERE seq = ?1")?;
    let (newest, problems) =
        sealgate::hq::cosign::check_log(&cosignatures, key, report.last_seq, |seq| {
            let h: Option<Vec<u8>> = stmt.query_row([seq as i64], |r| r.get(0)).ok();
            h.and_then(|h| h.try_into().ok())
        });
    report.problems.extend(problems);
    report.problems.sort_by_key(|p| p.seq);
    Ok(newest.map(|c| (c.seq, c.cosigned_at_ms)).unwrap_or((0, 0)))
}

fn print_report(r: &Report, seconds: f64, rate: f64) {
    match r.problems.first() {
        None => println!(
            "audit log verifies: {} records (seq 1..{}), {} checkpoints; the last covers seq {} ({}); {} stamp signatures checked; {:.2} s, {:.0} records/s",
            r.records,
            r.last_seq,
            r.checkpoints,
            r.last_checkpoint_seq,
            time(r.last_checkpoint_at_ms),
            r.stamps_checked,
            seconds,
            rate
        ),
        Some(first) => {
            if first.seq == 0 {
                println!("audit log FAILED verification: {}", first.what);
            } else {
                println!(
                    "audit log FAILED verification at seq {}: {}",
                    first.seq, first.what
                );
            }
            for p in &r.problems[1..] {
                println!("also at seq {}: {}", p.seq, p.what);
            }
        }
    }
}

/// An audit public key from an SPKI PEM file.
fn key_file(path: &Path) -> anyhow::Result<TrustedKey> {
    TrustedKey::from_pem_file(path).map_err(anyhow::Error::msg)
}

fn keys_from_log(conn: &rusqlite::Connection) -> anyhow::Result<Vec<TrustedKey>> {
    query::audit_keys(conn)?
        .into_iter()
        .map(|(_, _, spki)| TrustedKey::from_spki(spki).map_err(|e| anyhow::anyhow!(e)))
        .collect()
}

/// The seal keys of a log or bundle, checked against their ids.
/// The seal keys of a log or bundle. Every completed stamp must name one of them: a log whose
/// seal keys are missing fails at its first stamp.
fn seal_keys_of(rows: &[query::SealKeyRow]) -> SealKeys {
    SealKeys::from_rows(
        rows.iter()
            .map(|r| (r.key_id.as_str(), r.algorithm.as_str(), r.spki.as_slice())),
    )
}

/// Verifies the log in the database at `path` (with the audit keys it records when `keys` is
/// empty).
pub(crate) fn verify_db(
    path: &Path,
    mut keys: Vec<TrustedKey>,
    quiet: bool,
) -> anyhow::Result<Report> {
    let conn = open(path)?;
    if keys.is_empty() {
        keys = keys_from_log(&conn)?;
    }
    // One read transaction: records, checkpoints and seal keys from the same moment, so a log
    // the daemon is writing to verifies as of that moment.
    conn.execute_batch("BEGIN")?;
    let seals = seal_keys_of(&query::seal_keys(&conn)?);
    let checkpoints = query::checkpoints(&conn)?;
    let total: i64 = conn.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))?;
    let bar = (!quiet && total > 200_000 && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "verifying {bar:40} {pos}/{len} records ({per_sec}, {eta} left)",
                )
                .expect("a fixed template parses"),
            );
            b
        });
    let mut stmt = conn.prepare(&format!(
        "SELECT {} FROM audit ORDER BY seq",
        query::record_columns()
    ))?;
    let mut rows = stmt.query([])?;
    let report = verify(
        |r| match rows.next().map_err(|e| e.to_string())? {
            None => Ok(false),
            Some(row) => {
                query::read_row_into(row, r).map_err(|e| e.to_string())?;
                Ok(true)
            }
        },
        &checkpoints,
        &keys,
        Some(&seals),
        |n| {
            if let Some(b) = &bar {
                b.set_position(n);
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    drop(rows);
    drop(stmt);
    conn.execute_batch("COMMIT")?;
    Ok(report)
}

pub(crate) fn verify_bundle(dir: &Path, mut keys: Vec<TrustedKey>) -> anyhow::Result<Report> {
    let read_lines =
        |name: &str| -> anyhow::Result<std::io::Lines<std::io::BufReader<std::fs::File>>> {
            let p = dir.join(name);
            let f =
                std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
            Ok(std::io::BufReader::new(f).lines())
        };
    if keys.is_empty() {
        let kdir = dir.join("audit-keys");
        for entry in
            std::fs::read_dir(&kdir).with_context(|| format!("cannot read {}", kdir.display()))?
        {
            keys.push(key_file(&entry?.path())?);
        }
    }
    let mut checkpoints = Vec::new();
    for (i, line) in read_lines("checkpoints.jsonl")?.enumerate() {
        let c: Checkpoint = serde_json::from_str(&line?)
            .with_context(|| format!("checkpoints.jsonl line {}", i + 1))?;
        checkpoints.push(c);
    }
    let mut rows = Vec::new();
    if dir.join("seal-keys.jsonl").exists() {
        for (i, line) in read_lines("seal-keys.jsonl")?.enumerate() {
            rows.push(
                serde_json::from_str::<query::SealKeyRow>(&line?)
                    .with_context(|| format!("seal-keys.jsonl line {}", i + 1))?,
            );
        }
    }
    let seals = seal_keys_of(&rows);
    let mut lines = read_lines("records.jsonl")?.enumerate();
    let report = verify(
        |r| match lines.next() {
            None => Ok(false),
            Some((i, line)) => {
                let line = line.map_err(|e| e.to_string())?;
                *r = serde_json::from_str(&line)
                    .map_err(|e| format!("records.jsonl line {}: {e}", i + 1))?;
                Ok(true)
            }
        },
        &checkpoints,
        &keys,
        Some(&seals),
        |_| {},
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(report)
}

fn write_jsonl(conn: &rusqlite::Connection, sink: impl Write) -> anyhow::Result<u64> {
    let mut out = BufWriter::new(sink);
    let mut n = 0;
    query::for_each(conn, &Filter::default(), |r| {
        n += 1;
        serde_json::to_writer(&mut out, &r).map_err(|e| e.to_string())?;
        out.write_all(b"\n").map_err(|e| e.to_string())
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    out.flush()?;
    Ok(n)
}

fn export_bundle(conn: &rusqlite::Connection, dir: &Path, ca: &[PathBuf]) -> anyhow::Result<()> {
    for sub in ["audit-keys", "seal-keys"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // One read transaction, so records and checkpoints are from the same moment.
    conn.execute_batch("BEGIN")?;
    let create = |name: &str| {
        let p = dir.join(name);
        std::fs::File::create(&p).with_context(|| format!("cannot create {}", p.display()))
    };
    let n = write_jsonl(conn, create("records.jsonl")?)?;
    let checkpoints = query::checkpoints(conn)?;
    let mut out = BufWriter::new(create("checkpoints.jsonl")?);
    for c in &checkpoints {
        serde_json::to_writer(&mut out, c)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    for (id, _, spki) in query::audit_keys(conn)? {
        std::fs::write(
            dir.join(format!("audit-keys/{id}.pub.pem")),
            pem("PUBLIC KEY", &spki),
        )?;
    }
    let seals = query::seal_keys(conn)?;
    let mut out = BufWriter::new(create("seal-keys.jsonl")?);
    for k in &seals {
        serde_json::to_writer(&mut out, k)?;
        out.write_all(b"\n")?;
        let base = format!("seal-keys/{}-{}", k.seal, k.key_id);
        std::fs::write(
            dir.join(format!("{base}.pub.pem")),
            pem("PUBLIC KEY", &k.spki),
        )?;
        if let Some(c) = &k.certificate {
            std::fs::write(dir.join(format!("{base}.crt.pem")), c)?;
        }
    }
    out.flush()?;
    conn.execute_batch("COMMIT")?;
    if !ca.is_empty() {
        std::fs::create_dir_all(dir.join("ca"))?;
        for (i, c) in ca.iter().enumerate() {
            let text = std::fs::read_to_string(c)
                .with_context(|| format!("cannot read {}", c.display()))?;
            if !text.contains("-----BEGIN CERTIFICATE-----") {
                bail!("{} is not a PEM certificate", c.display());
            }
            std::fs::write(dir.join(format!("ca/{i}.crt.pem")), text)?;
        }
    }
    std::fs::write(
        dir.join("README.txt"),
        format!(
            "sealgate audit bundle: {n} records, {} checkpoints, exported {}.\n\
             records.jsonl      one record per line, with prev_hash and hash\n\
             checkpoints.jsonl  device-signed (seq, prev_seq, head, at_ms)\n\
             audit-keys/        the audit keys' public halves (SPKI PEM), named by key id\n\
             seal-keys.jsonl    each seal key: key_id, seal, algorithm, spki (hex DER), certificate (PEM)\n\
             seal-keys/         the same as PEM files, SEAL-KEYID.pub.pem and .crt.pem\n\
             ca/                CA certificates given at export (--ca), if any\n\
             Check it with:  sealctl audit verify --bundle . --key <the audit key you trust>\n\
             The encodings are described in docs/audit-log.md of sealgate.\n",
            checkpoints.len(),
            time(sealgate::audit::now_ms())
        ),
    )?;
    eprintln!(
        "exported {n} records and {} checkpoints to {}",
        checkpoints.len(),
        dir.display()
    );
    Ok(())
}

fn query_out(conn: &rusqlite::Connection, filter: &Filter, format: Format) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = match format {
        Format::Json => {
            let mut first = true;
            out.write_all(b"[")?;
            let r = query::for_each(conn, filter, |r| {
                let sep: &[u8] = if first { b"\n" } else { b",\n" };
                first = false;
                out.write_all(sep).map_err(|e| e.to_string())?;
                serde_json::to_writer(&mut out, &r).map_err(|e| e.to_string())
            });
            out.write_all(b"\n]\n")?;
            r
        }
        Format::Csv => {
            // One column per record field, named as in the log; hashes in hex.
            let mut w = csv::Writer::from_writer(&mut out);
            query::for_each(conn, filter, |r| w.serialize(&r).map_err(|e| e.to_string()))
                .and_then(|_| w.flush().map_err(|e| e.to_string()))
        }
        Format::Table => {
            writeln!(out, "{}", TABLE_HEADER)?;
            query::for_each(conn, filter, |r| {
                writeln!(out, "{}", table_row(&r)).map_err(|e| e.to_string())
            })
        }
    };
    result.map_err(|e| anyhow::anyhow!(e))?;
    out.flush()?;
    Ok(())
}

/// The columns of `query --format table`.
pub(crate) const TABLE_HEADER: &str = "   SEQ  TIME (UTC)                KIND                   SEAL        CALLER          APPLICANT     REASON                DETAIL";

/// One record as a row of `query --format table`.
pub(crate) fn table_row(r: &sealgate::audit::Record) -> String {
    format!(
        "{:>6}  {:<24}  {:<21}  {:<10}  {:<14}  {:<12}  {:<20}  {}",
        r.seq,
        time(r.at_ms),
        r.kind,
        r.seal,
        r.caller,
        r.applicant,
        r.reason,
        r.detail.chars().take(80).collect::<String>()
    )
}

fn print_stats(s: &query::Stats) {
    println!(
        "{} records{}",
        s.records,
        match (s.first_at_ms, s.last_at_ms) {
            (Some(a), Some(b)) => format!(" from {} to {}", time(a), time(b)),
            _ => String::new(),
        }
    );
    println!("\nstamps per seal per day (UTC):");
    for (day, seal, n) in &s.stamps_per_seal_per_day {
        println!("  {day}  {seal:<16} {n}");
    }
    let list = |title: &str, rows: &[(String, u64)]| {
        println!("\n{title}:");
        if rows.is_empty() {
            println!("  (none)");
        }
        for (k, n) in rows {
            println!("  {k:<24} {n}");
        }
    };
    list("top applicants", &s.top_applicants);
    list("refusals by reason", &s.denials_by_reason);
    list("alerts by rule", &s.alerts_by_rule);
    println!(
        "\nfailed stamps: {}; outcomes unknown (daemon stopped mid-stamp): {}",
        s.failed, s.outcomes_unknown
    );
}
