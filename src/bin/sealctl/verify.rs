//! `sealctl verify FILE.pdf` and `sealctl verify FILE --p7s F.p7s`: checks every signature of a
//! PDF, or a detached CMS signature, against the document and the trust anchors given; says
//! what changed after each PDF signature; and with `--db` finds each stamp in the audit log and
//! prints the whole process behind it. Offline: no daemon, no device.

use anyhow::Context;
use rusqlite::Connection;
use sealgate::audit::query::{self, Filter};
use sealgate::container::{check_detached, issued_by, Checked};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The document: a PDF with its signatures inside, or any file with --p7s.
    file: PathBuf,
    /// Its detached CMS signature (DER), as `sealctl stamp --format p7s` writes it.
    #[arg(long)]
    p7s: Option<PathBuf>,
    /// A trusted CA certificate (PEM); repeat for several. Without one the signer's
    /// certificate is not checked against anything.
    #[arg(long)]
    ca: Vec<PathBuf>,
    /// The audit log (the daemon's database, or a copy) in which to find each stamp.
    #[arg(long, conflicts_with = "bundle")]
    db: Option<PathBuf>,
    /// Or an exported bundle (`sealctl audit export --bundle`) in which to find each stamp.
    #[arg(long)]
    bundle: Option<PathBuf>,
}

fn pem_certificates(path: &PathBuf) -> anyhow::Result<Vec<Vec<u8>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for block in text.split_inclusive("-----END CERTIFICATE-----") {
        if let Some(start) = block.find("-----BEGIN CERTIFICATE-----") {
            let (_, der) = pem_rfc7468::decode_vec(&block.as_bytes()[start..])
                .map_err(|e| anyhow::anyhow!("{}: not PEM: {e}", path.display()))?;
            out.push(der);
        }
    }
    if out.is_empty() {
        anyhow::bail!("{} holds no certificate", path.display());
    }
    Ok(out)
}

/// Where a verification traces stamps: a database, or an exported bundle's JSON lines.
enum Source<'a> {
    Db(&'a Path, Connection),
    Bundle(&'a Path),
}

/// The audit log a verification traces stamps in, opened once.
struct Log<'a> {
    source: Source<'a>,
    /// key id → seal, for every seal key the log knows (empty for a log from before it kept them).
    seal_keys: Vec<(String, String)>,
    /// The seq of the first record that does not verify, found when first asked.
    first_problem: Option<Option<u64>>,
}

impl<'a> Log<'a> {
    fn open(path: &'a Path) -> anyhow::Result<Log<'a>> {
        let conn = query::open_read_only(path)
            .with_context(|| format!("cannot open the audit log {}", path.display()))?;
        let seal_keys = query::seal_keys(&conn)
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .map(|k| (k.key_id, k.seal))
            .collect();
        Ok(Log {
            source: Source::Db(path, conn),
            seal_keys,
            first_problem: None,
        })
    }

    fn open_bundle(dir: &'a Path) -> anyhow::Result<Log<'a>> {
        let mut seal_keys = Vec::new();
        let keys = dir.join("seal-keys.jsonl");
        if keys.exists() {
            for (i, line) in std::fs::read_to_string(&keys)
                .with_context(|| format!("cannot read {}", keys.display()))?
                .lines()
                .enumerate()
            {
                let k: query::SealKeyRow = serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", keys.display(), i + 1))?;
                seal_keys.push((k.key_id, k.seal));
            }
        }
        Ok(Log {
            source: Source::Bundle(dir),
            seal_keys,
            first_problem: None,
        })
    }

    /// Every record matching `filter`'s kind and document, in order.
    fn each(
        &self,
        filter: &Filter,
        mut f: impl FnMut(sealgate::audit::Record),
    ) -> anyhow::Result<()> {
        match &self.source {
            Source::Db(_, conn) => query::for_each(conn, filter, |r| {
                f(r);
                Ok(())
            })
            .map_err(|e| anyhow::anyhow!(e)),
            Source::Bundle(dir) => {
                use std::io::BufRead;
                let path = dir.join("records.jsonl");
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                    let r: sealgate::audit::Record = serde_json::from_str(&line?)
                        .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                    let wanted = filter.kind.as_ref().is_none_or(|k| *k == r.kind)
                        && filter
                            .doc_sha256
                            .as_ref()
                            .is_none_or(|d| *d == r.doc_sha256);
                    if wanted {
                        f(r);
                    }
                }
                Ok(())
            }
        }
    }

    fn record_by_seq(&self, seq: u64) -> Option<sealgate::audit::Record> {
        if let Source::Db(_, conn) = &self.source {
            return query::record_by_seq(conn, seq).ok().flatten();
        }
        let mut found = None;
        self.each(&Filter::default(), |r| {
            if r.seq == seq {
                found = Some(r);
            }
        })
        .ok()?;
        found
    }

    fn verifies_to(&mut self, seq: u64) -> anyhow::Result<bool> {
        if self.first_problem.is_none() {
            // With the audit keys the log records; `audit verify --key` checks them too.
            let report = match &self.source {
                Source::Db(path, _) => crate::audit::verify_db(path, Vec::new(), true)?,
                Source::Bundle(dir) => crate::audit::verify_bundle(dir, Vec::new())?,
            };
            self.first_problem = Some(report.problems.first().map(|p| p.seq));
        }
        Ok(self.first_problem.flatten().is_none_or(|p| p > seq))
    }
}

/// One signature's verdict: what was checked, the record behind it, and what is wrong.
struct Verdict {
    trusted: Option<bool>,
    /// The seal whose key signed, when the log knows seal keys; `Some(None)`: none of them.
    seal: Option<Option<String>>,
    record: Value,
    findings: Vec<String>,
}

fn common_name(cert: &[u8]) -> String {
    use der::Decode;
    x509_cert::Certificate::from_der(cert)
        .map(|c| c.tbs_certificate.subject.to_string())
        .unwrap_or_default()
}

/// Checks one CMS signature over `signed` (the document, or a PDF's ByteRange): its digest
/// and signature, its certificate against `anchors`, its key against the log's seal keys, and
/// finds its stamp in the log.
fn assess(
    c: &Checked,
    signed: &[u8],
    anchors: &[Vec<u8>],
    log: Option<&mut Log>,
) -> anyhow::Result<Verdict> {
    let mut findings = Vec::new();
    if !c.digest_matches {
        findings.push("the document is not the one signed: its digest differs".into());
    }
    if !c.signature_verifies {
        findings.push("the signature does not verify under the signer's certificate".into());
    }
    let trusted =
        (!anchors.is_empty()).then(|| anchors.iter().any(|a| issued_by(&c.certificate, a)));
    if trusted == Some(false) {
        findings.push("the signer's certificate is not issued by a CA given".into());
    }
    match &c.timestamp {
        Some(Ok((_, false))) => {
            findings.push("its timestamp token is for another signature".into())
        }
        Some(Err(e)) => findings.push(format!("its timestamp token does not read: {e}")),
        _ => {}
    }
    let Some(log) = log else {
        return Ok(Verdict {
            trusted,
            seal: None,
            record: Value::Null,
            findings,
        });
    };
    let spki = {
        use der::{Decode, Encode};
        x509_cert::Certificate::from_der(&c.certificate)
            .ok()
            .and_then(|cert| cert.tbs_certificate.subject_public_key_info.to_der().ok())
            .unwrap_or_default()
    };
    let key_id = sealgate::audit::key_id(&spki);
    let seal = (!log.seal_keys.is_empty()).then(|| {
        log.seal_keys
            .iter()
            .find(|(k, _)| *k == key_id)
            .map(|(_, s)| s.clone())
    });
    if seal == Some(None) {
        findings.insert(
            0,
            format!(
                "NOT MADE BY THIS SEAL: the signer's key ({key_id}) is the key of no seal this log knows, though its certificate names {}",
                common_name(&c.certificate)
            ),
        );
        return Ok(Verdict {
            trusted,
            seal,
            record: Value::Null,
            findings,
        });
    }
    let signature_sha256 = hex::encode(Sha256::digest(&c.signature));
    let filter = Filter {
        kind: Some(sealgate::audit::kind::STAMP_COMPLETED.into()),
        doc_sha256: Some(hex::encode(Sha256::digest(signed))),
        ..Filter::default()
    };
    let mut found = None;
    log.each(&filter, |r| {
        let e: Value = serde_json::from_str(&r.evidence).unwrap_or_default();
        if e["signature_sha256"].as_str() == Some(signature_sha256.as_str()) {
            found = Some(r);
        }
    })?;
    let Some(r) = found else {
        findings.insert(
            0,
            "NO RECORD IN THIS LOG: this signature was made by the seal's key but the audit log holds no stamp that made it".into(),
        );
        return Ok(Verdict {
            trusted,
            seal,
            record: Value::Null,
            findings,
        });
    };
    let authorized = r.ref_seq.and_then(|s| log.record_by_seq(s));
    let verifies_to_it = log.verifies_to(r.seq)?;
    if !verifies_to_it {
        findings.push(format!(
            "the audit log does not verify up to record {}",
            r.seq
        ));
    }
    let approvers: Value = serde_json::from_str(&r.approvers).unwrap_or_default();
    let evidence: Value = serde_json::from_str(&r.evidence).unwrap_or_default();
    Ok(Verdict {
        trusted,
        seal,
        record: json!({
            "seq": r.seq,
            "at_ms": r.at_ms,
            "seal": r.seal,
            "device": r.device,
            "device_serial": r.device_serial,
            "caller": r.caller,
            "applicant": r.applicant,
            "approvers": approvers,
            "approval": r.jti,
            "doc_type": r.doc_type,
            "amount": r.amount,
            "currency": r.currency,
            "purpose": r.purpose,
            "container": evidence["container"],
            "placement": evidence["placement"],
            "authorized_seq": authorized.as_ref().map(|a| a.seq),
            "log_verifies_to_it": verifies_to_it,
        }),
        findings,
    })
}

fn print_record(t: &Value) {
    let Some(t) = t.as_object() else { return };
    println!("  audit record: seq {} at {} ms", t["seq"], t["at_ms"]);
    println!(
        "    seal {} on device {} ({})",
        t["seal"], t["device"], t["device_serial"]
    );
    println!(
        "    applicant {}, caller {}, approval {}",
        t["applicant"], t["caller"], t["approval"]
    );
    for a in t["approvers"].as_array().into_iter().flatten() {
        println!(
            "    approved: level {} {} ({}) at {}",
            a["level"], a["id"], a["role"], a["approved_at"]
        );
    }
    println!("    the log verifies up to it: {}", t["log_verifies_to_it"]);
}

/// A timestamp token's time (RFC 3339) and whether it is over this signature.
fn timestamp_json(c: &Checked) -> Option<Value> {
    let (at, matches) = c.timestamp.as_ref()?.as_ref().ok()?;
    let time = jiff::Timestamp::from_second(*at)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Some(json!({"time": time, "unix": at, "over_this_signature": matches}))
}

fn trust_line(trusted: Option<bool>) -> &'static str {
    match trusted {
        Some(true) => "issued by a CA given",
        Some(false) => "NOT issued by a CA given",
        None => "not checked (no --ca)",
    }
}

/// Runs the check; returns the exit code: 0 when every signature holds (and, when asked,
/// chains to a CA given and is in the log, which verifies up to it), 1 otherwise.
pub fn run(args: &VerifyArgs, json: bool) -> anyhow::Result<i32> {
    let document = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut anchors = Vec::new();
    for p in &args.ca {
        anchors.extend(pem_certificates(p)?);
    }
    let mut log = match (&args.db, &args.bundle) {
        (Some(db), _) => Some(Log::open(db)?),
        (None, Some(dir)) => Some(Log::open_bundle(dir)?),
        (None, None) => None,
    };
    match &args.p7s {
        Some(p7s) => run_p7s(&document, p7s, &anchors, log.as_mut(), json),
        None if document.starts_with(b"%PDF-") => {
            run_pdf(&args.file, &document, &anchors, log.as_mut(), json)
        }
        None => anyhow::bail!(
            "{} is not a PDF; give its detached signature with --p7s",
            args.file.display()
        ),
    }
}

fn run_p7s(
    document: &[u8],
    p7s: &Path,
    anchors: &[Vec<u8>],
    log: Option<&mut Log>,
    json: bool,
) -> anyhow::Result<i32> {
    let bytes = std::fs::read(p7s).with_context(|| format!("cannot read {}", p7s.display()))?;
    let c =
        check_detached(&bytes, document).map_err(|e| anyhow::anyhow!("{}: {e}", p7s.display()))?;
    let v = assess(&c, document, anchors, log)?;
    if json {
        println!(
            "{}",
            json!({
                "ok": v.findings.is_empty(),
                "algorithm": c.algorithm.name(),
                "digest_matches": c.digest_matches,
                "signature_verifies": c.signature_verifies,
                "timestamp": timestamp_json(&c),
                "trusted": v.trusted,
                "seal_key": v.seal,
                "signature_sha256": hex::encode(Sha256::digest(&c.signature)),
                "record": v.record,
                "findings": v.findings,
            })
        );
    } else {
        println!(
            "signature ({}): {}",
            c.algorithm.name(),
            if c.digest_matches && c.signature_verifies {
                "verifies over this document"
            } else {
                "DOES NOT HOLD"
            }
        );
        println!("certificate: {}", trust_line(v.trusted));
        print_record(&v.record);
        for f in &v.findings {
            println!("FINDING: {f}");
        }
    }
    Ok(if v.findings.is_empty() { 0 } else { 1 })
}

fn run_pdf(
    path: &Path,
    document: &[u8],
    anchors: &[Vec<u8>],
    mut log: Option<&mut Log>,
    json: bool,
) -> anyhow::Result<i32> {
    let found = sealgate::pdf::signatures(document).with_context(|| path.display().to_string())?;
    let mut all_findings: Vec<String> = Vec::new();
    if found.is_empty() {
        all_findings.push("the PDF holds no signature".into());
    }
    let mut reports = Vec::new();
    for (i, f) in found.iter().enumerate() {
        let n = i + 1;
        let mut findings = Vec::new();
        let (checked, verdict) = match (&f.range, check_detached(&f.cms, &f.signed)) {
            (Err(e), _) => {
                findings.push(format!("its ByteRange is not sound: {e}"));
                (None, None)
            }
            (Ok(_), Err(e)) => {
                findings.push(format!("its CMS does not read: {e}"));
                (None, None)
            }
            (Ok(_), Ok(c)) => {
                let v = assess(&c, &f.signed, anchors, log.as_deref_mut())?;
                findings.extend(v.findings.iter().cloned());
                (Some(c), Some(v))
            }
        };
        if f.sub_filter != "ETSI.CAdES.detached" {
            findings.push(format!(
                "its SubFilter is {:?}, not ETSI.CAdES.detached (PAdES)",
                f.sub_filter
            ));
        }
        for c in &f.changes_after {
            findings.push(format!("changed after this signature: {c}"));
        }
        // Where the approval placed the seal, against where its widget is.
        let placed = verdict
            .as_ref()
            .map(|v| v.record["placement"].clone())
            .filter(|p| !p.is_null());
        let placement_matches = placed.as_ref().map(|p| {
            let rect: Option<[i64; 4]> = serde_json::from_value(p["rect"].clone()).ok();
            p["page"].as_u64().map(|x| x as u32) == f.page
                && rect.map(|r| r.map(|x| x as f64)) == f.rect.map(|r| r.map(f64::round))
                && p["field"].as_str() == Some(f.field.as_str())
        });
        if placement_matches == Some(false) {
            findings.push(format!(
                "the visible seal is not where the approval placed it: approved {placed}, found page {:?} rect {:?}",
                f.page.map(|p| p.to_string()).unwrap_or_else(|| "none".into()),
                f.rect,
                placed = placed.clone().unwrap_or_default()
            ));
        }
        all_findings.extend(
            findings
                .iter()
                .map(|m| format!("signature {n} ({}): {m}", f.field)),
        );
        reports.push((f, checked, verdict, placement_matches, findings));
    }
    if json {
        let sigs: Vec<Value> = reports
            .iter()
            .map(|(f, c, v, placement_matches, findings)| {
                json!({
                    "field": f.field,
                    "page": f.page,
                    "rect": f.rect,
                    "sub_filter": f.sub_filter,
                    "byte_range": f.range.as_ref().ok().map(|r| r.byte_range),
                    "covers_whole_file": f.range.as_ref().ok().map(|r| r.end == document.len()),
                    "later_revisions": f.later_revisions,
                    "changes_after": f.changes_after,
                    "algorithm": c.as_ref().map(|c| c.algorithm.name()),
                    "digest_matches": c.as_ref().map(|c| c.digest_matches),
                    "signature_verifies": c.as_ref().map(|c| c.signature_verifies),
                    "signer": c.as_ref().map(|c| common_name(&c.certificate)),
                    "timestamp": c.as_ref().and_then(timestamp_json),
                    "trusted": v.as_ref().and_then(|v| v.trusted),
                    "seal_key": v.as_ref().and_then(|v| v.seal.clone()),
                    "record": v.as_ref().map(|v| v.record.clone()).unwrap_or_default(),
                    "placement_matches": placement_matches,
                    "ok": findings.is_empty(),
                    "findings": findings,
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "ok": all_findings.is_empty(),
                "signatures": sigs,
                "findings": all_findings,
            })
        );
    } else {
        for (i, (f, c, v, placement_matches, findings)) in reports.iter().enumerate() {
            println!(
                "signature {} ({}) on page {}:",
                i + 1,
                f.field,
                f.page
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "none".into())
            );
            if let Some(c) = c {
                println!(
                    "  {} by {}: {}",
                    c.algorithm.name(),
                    common_name(&c.certificate),
                    if c.digest_matches && c.signature_verifies {
                        "verifies over its revision"
                    } else {
                        "DOES NOT HOLD"
                    }
                );
            }
            if let Some(v) = v {
                println!("  certificate: {}", trust_line(v.trusted));
            }
            if let Some(t) = c.as_ref().and_then(timestamp_json) {
                println!("  trusted time: {} (from its timestamp token)", t["time"]);
            }
            println!(
                "  {} later revision(s){}",
                f.later_revisions,
                if f.changes_after.is_empty() {
                    ", none changing what it signed"
                } else {
                    ""
                }
            );
            match placement_matches {
                Some(true) => println!("  the seal sits where the approval placed it"),
                Some(false) => println!("  the seal is NOT where the approval placed it"),
                None => {}
            }
            if let Some(v) = v {
                print_record(&v.record);
            }
            for m in findings {
                println!("  FINDING: {m}");
            }
        }
        if found.is_empty() {
            println!("FINDING: the PDF holds no signature");
        }
    }
    Ok(if all_findings.is_empty() { 0 } else { 1 })
}
