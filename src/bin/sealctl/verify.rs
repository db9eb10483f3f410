//! `sealctl verify FILE --p7s F.p7s`: checks a detached CMS signature against the document and
//! the trust anchors given, and with `--db` finds the stamp in the audit log and prints the
//! whole process behind it. Offline: no daemon, no device.

use anyhow::Context;
use sealgate::audit::query::{self, Filter};
use sealgate::container::{check_detached, issued_by};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// The document.
    file: PathBuf,
    /// Its detached CMS signature (DER), as `sealctl stamp --format p7s` writes it.
    #[arg(long)]
    p7s: PathBuf,
    /// A trusted CA certificate (PEM); repeat for several. Without one the signer's
    /// certificate is not checked against anything.
    #[arg(long)]
    ca: Vec<PathBuf>,
    /// The audit log (the daemon's database, or a copy) in which to find the stamp.
    #[arg(long)]
    db: Option<PathBuf>,
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

/// Runs the check; returns the exit code: 0 when the signature holds (and, when asked, chains to
/// a CA given and is in the log, which verifies up to it), 1 otherwise.
pub fn run(args: &VerifyArgs, json: bool) -> anyhow::Result<i32> {
    let document = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let p7s =
        std::fs::read(&args.p7s).with_context(|| format!("cannot read {}", args.p7s.display()))?;
    let c = check_detached(&p7s, &document)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.p7s.display()))?;
    let mut findings: Vec<String> = Vec::new();
    if !c.digest_matches {
        findings.push("the document is not the one signed: its digest differs".into());
    }
    if !c.signature_verifies {
        findings.push("the signature does not verify under the signer's certificate".into());
    }
    let mut trusted = None;
    if !args.ca.is_empty() {
        let mut anchors = Vec::new();
        for p in &args.ca {
            anchors.extend(pem_certificates(p)?);
        }
        trusted = Some(anchors.iter().any(|a| issued_by(&c.certificate, a)));
        if trusted == Some(false) {
            findings.push("the signer's certificate is not issued by a CA given".into());
        }
    }
    let signature_sha256 = hex::encode(Sha256::digest(&c.signature));
    let mut trace = serde_json::Value::Null;
    if let Some(db) = &args.db {
        let conn = query::open_read_only(db)
            .with_context(|| format!("cannot open the audit log {}", db.display()))?;
        let filter = Filter {
            kind: Some(sealgate::audit::kind::STAMP_COMPLETED.into()),
            doc_sha256: Some(hex::encode(Sha256::digest(&document))),
            ..Filter::default()
        };
        let mut found = None;
        query::for_each(&conn, &filter, |r| {
            let e: serde_json::Value = serde_json::from_str(&r.evidence).unwrap_or_default();
            if e["signature_sha256"].as_str() == Some(signature_sha256.as_str()) {
                found = Some(r);
            }
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!(e))?;
        match found {
            None => findings.insert(
                0,
                "NO RECORD IN THIS LOG: this signature was made by the seal's key but the audit log holds no stamp that made it".into(),
            ),
            Some(r) => {
                let authorized = r
                    .ref_seq
                    .and_then(|s| query::record_by_seq(&conn, s).ok().flatten());
                // With the audit keys the log records; `audit verify --key` checks them too.
                let report = crate::audit::verify_db(db, Vec::new(), true)?;
                let verifies_to_it = report.problems.first().is_none_or(|p| p.seq > r.seq);
                if !verifies_to_it {
                    findings.push(format!("the audit log does not verify up to record {}", r.seq));
                }
                let approvers: serde_json::Value =
                    serde_json::from_str(&r.approvers).unwrap_or_default();
                trace = serde_json::json!({
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
                    "authorized_seq": authorized.as_ref().map(|a| a.seq),
                    "log_verifies_to_it": verifies_to_it,
                });
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ok": findings.is_empty(),
                "algorithm": c.algorithm.name(),
                "digest_matches": c.digest_matches,
                "signature_verifies": c.signature_verifies,
                "trusted": trusted,
                "signature_sha256": signature_sha256,
                "record": trace,
                "findings": findings,
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
        match trusted {
            Some(true) => println!("certificate: issued by a CA given"),
            Some(false) => println!("certificate: NOT issued by a CA given"),
            None => println!("certificate: not checked (no --ca)"),
        }
        if let Some(t) = trace.as_object() {
            println!("audit record: seq {} at {} ms", t["seq"], t["at_ms"]);
            println!(
                "  seal {} on device {} ({})",
                t["seal"], t["device"], t["device_serial"]
            );
            println!(
                "  applicant {}, caller {}, approval {}",
                t["applicant"], t["caller"], t["approval"]
            );
            for a in t["approvers"].as_array().into_iter().flatten() {
                println!(
                    "  approved: level {} {} ({}) at {}",
                    a["level"], a["id"], a["role"], a["approved_at"]
                );
            }
            println!("  the log verifies up to it: {}", t["log_verifies_to_it"]);
        }
        for f in &findings {
            println!("FINDING: {f}");
        }
    }
    Ok(if findings.is_empty() { 0 } else { 1 })
}
