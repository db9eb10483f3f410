//! PDF stamps with a visible seal (PAdES B-B), end to end through `sealctl` and the daemon on
//! the demo token, checked by outside verifiers: qpdf, pdfsig (poppler), pyHanko, and the
//! pixels of the page as pdftoppm renders it.

mod common;

use common::*;
use sealgate::protocol::{pb, response, Status};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A two-page PDF written by hand, as an office program might: one line of text on page 1.
struct Cli<'a> {
    daemon: &'a Daemon,
}

impl Cli<'_> {
    fn output(&self, args: &[&str]) -> std::process::Output {
        Command::new(SEALCTL)
            .env("SEALGATE_SOCKET", &self.daemon.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Prepares and approves `input` for `seal` at `at` (mm), signed by `approvers`; returns
    /// the prepared PDF and the approval.
    #[allow(clippy::too_many_arguments)]
    fn approve_pdf(
        &self,
        dir: &Path,
        input: &Path,
        seal: &str,
        at: &str,
        size: &str,
        claims: &[&str],
        approvers: &[&str],
    ) -> (PathBuf, PathBuf) {
        let prepared = dir.join(format!("{seal}.prepared.pdf"));
        let token = dir.join(format!("{seal}.approval.json"));
        let p = |p: &Path| p.to_str().unwrap().to_owned();
        self.ok(&[
            "pdf",
            "prepare",
            &p(input),
            "--seal",
            seal,
            "--page",
            "1",
            "--at",
            at,
            "--size",
            size,
            "--out",
            &p(&prepared),
        ]);
        let mut new = vec![
            "token".to_string(),
            "new".into(),
            "--pdf".into(),
            p(&prepared),
            "--seal".into(),
            seal.into(),
            "--applicant".into(),
            "zhao.lei".into(),
            "--out".into(),
            p(&token),
        ];
        new.extend(claims.iter().map(|s| s.to_string()));
        self.ok(&new.iter().map(String::as_str).collect::<Vec<_>>());
        for a in approvers {
            let key = demo().dir.join(format!("approvers/{a}.key"));
            self.ok(&[
                "token",
                "sign",
                "--yes",
                "--key",
                &p(&key),
                "--kid",
                a,
                &p(&token),
            ]);
        }
        (prepared, token)
    }

    /// `sealctl stamp --pdf` of a prepared PDF on its approval.
    fn stamp_prepared(
        &self,
        seal: &str,
        prepared: &Path,
        token: &Path,
        out: &Path,
    ) -> std::process::Output {
        self.output(&[
            "stamp",
            "--seal",
            seal,
            "--pdf",
            prepared.to_str().unwrap(),
            "--token",
            token.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    }

    /// Prepares, approves and stamps `input` with `seal`; the stamped PDF is written to `out`.
    #[allow(clippy::too_many_arguments)]
    fn stamp_pdf(
        &self,
        dir: &Path,
        input: &Path,
        seal: &str,
        at: &str,
        size: &str,
        claims: &[&str],
        approvers: &[&str],
        out: &Path,
    ) {
        let (prepared, token) = self.approve_pdf(dir, input, seal, at, size, claims, approvers);
        let done = self.stamp_prepared(seal, &prepared, &token, out);
        assert!(
            done.status.success(),
            "stamp {seal}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }

    fn verify(&self, pdf: &Path, db: Option<&Path>) -> (Option<i32>, Value) {
        let mut args = vec![
            "--json".to_string(),
            "verify".into(),
            pdf.display().to_string(),
            "--ca".into(),
            demo().dir.join("ca/ca.crt").display().to_string(),
        ];
        if let Some(db) = db {
            args.extend(["--db".into(), db.display().to_string()]);
        }
        let out = self.output(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    }
}

fn python() -> String {
    std::env::var("SEALGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// pyHanko, from the test venv beside the Python the suite uses.
fn pyhanko() -> PathBuf {
    Path::new(&python()).with_file_name("pyhanko")
}

/// `pyhanko sign validate` with the demo CA as the only trust root: its exit status and
/// summary (`field:fingerprint:VERDICT` lines).
fn pyhanko_validate(pdf: &Path) -> (bool, String) {
    let out = Command::new(pyhanko())
        .args([
            "sign",
            "validate",
            "--no-revocation-check",
            "--trust-replace",
            "--executive-summary",
            "--trust",
        ])
        .arg(demo().dir.join("ca/ca.crt"))
        .arg(pdf)
        .output()
        .expect("pyhanko (tests/python/requirements.txt)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Each signature's field and PAdES level as pyHanko reads them (tests/python/pades_level.py).
fn pades_levels(pdf: &Path) -> String {
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/pades_level.py"
        ))
        .arg(pdf)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pdfsig(pdf: &Path) -> String {
    let out = Command::new("pdfsig").arg(pdf).output().expect("pdfsig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qpdf_check(pdf: &Path) -> bool {
    Command::new("qpdf")
        .arg("--check")
        .arg(pdf)
        .output()
        .expect("qpdf")
        .status
        .success()
}

/// The RGB of a pixel of page 1 rendered at 72 dpi (one pixel a point), `x` from the left and
/// `y` from the bottom in points.
fn page_pixels(pdf: &Path, dir: &Path) -> impl Fn(i64, i64) -> [u8; 3] {
    let prefix = dir.join("page");
    let ok = Command::new("pdftoppm")
        .args(["-r", "72", "-f", "1", "-l", "1", "-singlefile"])
        .arg(pdf)
        .arg(&prefix)
        .status()
        .expect("pdftoppm")
        .success();
    assert!(ok, "pdftoppm failed");
    let ppm = std::fs::read(prefix.with_extension("ppm")).unwrap();
    // Kept beside the suite's other evidence, for a person to look at.
    std::fs::write(evidence_dir().join("stamped-page-1.ppm"), &ppm).unwrap();
    // P6, width, height, 255, then RGB rows from the top.
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while !ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        fields.push(String::from_utf8_lossy(&ppm[start..i]).into_owned());
    }
    assert_eq!(fields[0], "P6");
    let (w, h): (i64, i64) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let data = ppm[i + 1..].to_vec();
    move |x, y| {
        let row = h - 1 - y;
        let at = ((row * w + x) * 3) as usize;
        [data[at], data[at + 1], data[at + 2]]
    }
}

fn is_seal_red([r, g, b]: [u8; 3]) -> bool {
    r > 170 && g < 90 && b < 90
}

/// Two seals on one contract, each on its own approval (contract seal, then official seal):
/// qpdf, pdfsig and pyHanko accept the file with both signatures intact, pyHanko reads both as
/// PAdES B-B, `sealctl verify` traces each to its applicant, approvers, device and seq, and the
/// rendered page shows the seal's red where it was placed. A byte changed inside the signed
/// range, or a revision appended afterwards, is reported by all three.
#[test]
fn a_two_seal_pdf_passes_outside_verifiers_and_traces_each_seal_to_its_record() {
    let d = Daemon::start(&Opts::default());
    let cli = Cli { daemon: &d };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    // The demo's contract, as softhsm-setup.sh writes it.
    let original = demo().dir.join("contract.pdf");
    let once = dir.join("contract.stamped-1.pdf");
    let twice = dir.join("contract.stamped-2.pdf");
    cli.stamp_pdf(
        dir,
        &original,
        "contract",
        "120,30",
        "40",
        &[
            "--doc-type",
            "contract",
            "--dept",
            "sales",
            "--amount-minor",
            "500000",
            "--currency",
            "CNY",
        ],
        &["zhang.wei"],
        &once,
    );
    cli.stamp_pdf(
        dir,
        &once,
        "official",
        "30,30",
        "42",
        &["--doc-type", "contract", "--dept", "sales"],
        &["zhang.wei", "li.na"],
        &twice,
    );
    let signed_once = std::fs::read(&once).unwrap();
    let signed_twice = std::fs::read(&twice).unwrap();
    assert!(
        signed_twice.starts_with(&signed_once),
        "the second seal rewrote the first revision"
    );

    for pdf in [&once, &twice] {
        assert!(qpdf_check(pdf), "qpdf --check fails {}", pdf.display());
    }
    let sig = pdfsig(&twice);
    assert_eq!(
        sig.matches("Signature Validation: Signature is Valid.")
            .count(),
        2,
        "{sig}"
    );
    assert!(
        sig.contains("Seal-contract-1") && sig.contains("Seal-official-1"),
        "{sig}"
    );
    assert!(sig.contains("ETSI.CAdES.detached"), "{sig}");
    let (valid, summary) = pyhanko_validate(&twice);
    assert!(valid, "{summary}");
    assert_eq!(summary.matches(":VALID").count(), 2, "{summary}");
    let levels = pades_levels(&twice);
    assert!(levels.contains("Seal-contract-1 B-B"), "{levels}");
    // pyHanko's AdES validation: both intact and trusted; the second seal's revision is, for the
    // first signature, an acceptable modification (form filling), and nothing followed the second.
    let ades = Command::new(pyhanko())
        .args([
            "sign",
            "adesverify",
            "--no-revocation-check",
            "--trust-replace",
            "--trust",
        ])
        .arg(demo().dir.join("ca/ca.crt"))
        .arg(&twice)
        .output()
        .unwrap();
    let ades = String::from_utf8_lossy(&ades.stdout);
    let lines: Vec<&str> = ades.lines().collect();
    assert_eq!(lines.len(), 2, "{ades}");
    assert!(lines[0].starts_with("Seal-contract-1:"), "{ades}");
    assert!(
        lines[0].contains(":INTACT:TRUSTED,EXTENDED_WITH_FORM_FILLING,ACCEPTABLE_MODIFICATIONS"),
        "{ades}"
    );
    assert!(lines[1].ends_with(":INTACT:TRUSTED,UNTOUCHED"), "{ades}");
    assert!(levels.contains("Seal-official-1 B-B"), "{levels}");

    // Traced: each seal to its own approval and record.
    let (code, v) = cli.verify(&twice, Some(&d.db()));
    assert_eq!(code, Some(0), "{v:#}");
    let sigs = v["signatures"].as_array().unwrap();
    assert_eq!(sigs.len(), 2);
    let (first, second) = (&sigs[0], &sigs[1]);
    assert_eq!(first["field"], "Seal-contract-1");
    assert_eq!(first["record"]["seal"], "contract");
    assert_eq!(first["record"]["applicant"], "zhao.lei");
    assert_eq!(first["record"]["device"], "demo-hsm");
    assert_eq!(first["record"]["approvers"][0]["id"], "zhang.wei");
    assert_eq!(first["record"]["container"], "pades");
    assert_eq!(first["placement_matches"], true);
    assert_eq!(first["later_revisions"], 1);
    assert_eq!(second["record"]["seal"], "official");
    assert_eq!(second["record"]["approvers"][0]["id"], "zhang.wei");
    assert_eq!(second["record"]["approvers"][1]["id"], "li.na");
    assert_eq!(second["record"]["approvers"][1]["level"], 2);
    assert_eq!(second["covers_whole_file"], true);
    assert!(
        first["record"]["seq"].as_u64().unwrap() < second["record"]["seq"].as_u64().unwrap(),
        "{v:#}"
    );
    assert_eq!(second["record"]["log_verifies_to_it"], true);
    let (code, out) = audit_verify(&d.db());
    assert_eq!(code, 0, "{out}");
    // The same trace from an exported bundle, as an outside auditor receives it.
    let bundle = dir.join("bundle");
    cli.ok(&[
        "audit",
        "export",
        "--db",
        d.db().to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ]);
    let out = cli.output(&[
        "--json",
        "verify",
        twice.to_str().unwrap(),
        "--ca",
        demo().dir.join("ca/ca.crt").to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ]);
    let from_bundle: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{from_bundle:#}");
    for i in 0..2 {
        let (a, b) = (
            &v["signatures"][i]["record"],
            &from_bundle["signatures"][i]["record"],
        );
        for field in [
            "seq",
            "applicant",
            "approvers",
            "device",
            "authorized_seq",
            "placement",
        ] {
            assert_eq!(a[field], b[field], "{field}: {from_bundle:#}");
        }
        assert_eq!(b["log_verifies_to_it"], true);
    }

    // The page as it renders: the contract seal's ring and star are red where they were put
    // (a 40 mm seal at 120 mm, 30 mm: points 340..453 across, 85..198 up); between them the
    // page shows through; far from any seal the page is white.
    let pixel = page_pixels(&twice, dir);
    let (cx, cy, r) = ((340 + 453) / 2, (85 + 198) / 2, (453 - 340) / 2);
    assert!(
        is_seal_red(pixel(cx, cy)),
        "star centre {:?}",
        pixel(cx, cy)
    );
    assert!(
        is_seal_red(pixel(cx + r * 93 / 100, cy)),
        "ring {:?}",
        pixel(cx + r * 93 / 100, cy)
    );
    assert!(
        !is_seal_red(pixel(cx + r * 62 / 100, cy)),
        "between ring and star"
    );
    assert_eq!(pixel(300, 500), [255, 255, 255]);

    // One byte changed inside the signed range (the contract's title).
    let mut tampered = signed_twice.clone();
    let at = tampered.windows(6).position(|w| w == b"Supply").unwrap();
    tampered[at] ^= 0x01;
    let bad = dir.join("tampered.pdf");
    std::fs::write(&bad, &tampered).unwrap();
    let (code, v) = cli.verify(&bad, None);
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["signatures"][0]["digest_matches"], false, "{v:#}");
    assert!(pdfsig(&bad).contains("Digest Mismatch"));
    assert!(!pyhanko_validate(&bad).0);

    // A revision appended afterwards that rewrites the page's content.
    let appended = dir.join("appended.pdf");
    std::fs::write(&appended, append_revision(&signed_twice)).unwrap();
    let (code, v) = cli.verify(&appended, None);
    assert_eq!(code, Some(1), "{v:#}");
    let changes = v["signatures"][1]["changes_after"].to_string();
    assert!(changes.contains("object 4 0 was changed"), "{changes}");
    assert!(!v["signatures"][0]["changes_after"]
        .as_array()
        .unwrap()
        .is_empty());
    let sig = pdfsig(&appended);
    assert!(!sig.contains("Total document signed"), "{sig}");
    assert!(!pyhanko_validate(&appended).0);
}

/// An incremental update rewriting object 4 (page 1's content, in the demo contract and in
/// [`contract_pdf`]), as an editor would.
fn append_revision(pdf: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pdf);
    let prev = text
        .rmatch_indices("startxref")
        .next()
        .map(|(i, _)| text[i + 9..].split_whitespace().next().unwrap().to_owned())
        .unwrap();
    let size = text
        .rmatch_indices("/Size ")
        .next()
        .map(|(i, _)| {
            text[i + 6..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .to_owned()
        })
        .unwrap();
    let content = "BT /F1 20 Tf 72 760 Td (Purchase contract 2027-999) Tj ET";
    let mut out = pdf.to_vec();
    let offset = out.len();
    out.extend(
        format!(
            "4 0 obj\n<< /Length {} >>\nstream\n{content}\nendstream\nendobj\n",
            content.len()
        )
        .into_bytes(),
    );
    let xref = out.len();
    out.extend(
        format!(
            "xref\n0 1\n0000000000 65535 f \n4 1\n{offset:010} 00000 n \ntrailer\n<< /Size {size} /Root 1 0 R /Prev {prev} >>\nstartxref\n{xref}\n%%EOF\n"
        )
        .into_bytes(),
    );
    out
}

/// A PDF that pyHanko signed with a key of its own under a certificate naming the contract
/// seal is "not made by this seal"; a PDF the contract seal stamped, checked against the log of
/// another state directory on the same token, has "no record in this log".
#[test]
fn verify_names_a_signature_not_made_by_the_seal_and_one_the_log_lacks() {
    let d = Daemon::start(&Opts::default());
    let cli = Cli { daemon: &d };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let original = dir.join("lease.pdf");
    std::fs::write(&original, contract_pdf("Lease of the Pudong warehouse")).unwrap();

    let (key, cert) = (dir.join("own.key"), dir.join("own.crt"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", "/O=sealgate demo/CN=contract seal", "-days", "30"])
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok);
    let forged = dir.join("forged.pdf");
    let out = Command::new(pyhanko())
        .args([
            "sign",
            "addsig",
            "--field",
            "Seal-contract-1",
            "pemder",
            "--no-pass",
            "--key",
        ])
        .arg(&key)
        .arg("--cert")
        .arg(&cert)
        .arg(&original)
        .arg(&forged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, v) = cli.verify(&forged, Some(&d.db()));
    assert_eq!(code, Some(1), "{v:#}");
    let s = &v["signatures"][0];
    assert_eq!(s["signature_verifies"], true, "{v:#}");
    assert_eq!(s["trusted"], false);
    assert!(
        s["findings"][0]
            .as_str()
            .unwrap()
            .starts_with("NOT MADE BY THIS SEAL"),
        "{v:#}"
    );

    let stamped = dir.join("lease.stamped.pdf");
    cli.stamp_pdf(
        dir,
        &original,
        "contract",
        "20,20",
        "40",
        &[
            "--doc-type",
            "contract",
            "--dept",
            "sales",
            "--amount-minor",
            "1000",
            "--currency",
            "CNY",
        ],
        &["zhang.wei"],
        &stamped,
    );
    let (code, v) = cli.verify(&stamped, Some(&d.db()));
    assert_eq!(code, Some(0), "{v:#}");
    let other = Daemon::start(&Opts::default());
    let (code, v) = cli.verify(&stamped, Some(&other.db()));
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["signatures"][0]["seal_key"], "contract");
    assert!(
        v["signatures"][0]["findings"][0]
            .as_str()
            .unwrap()
            .starts_with("NO RECORD IN THIS LOG"),
        "{v:#}"
    );
}

/// Bad input is answered precisely and nothing is signed: a file that is no PDF, an encrypted
/// PDF, a page or a rectangle off the page, a PDF never prepared, a prepared PDF changed
/// afterwards, and a PAdES stamp whose approval places no seal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pdfs_and_placements_are_refused_before_anything_is_signed() {
    let d = Daemon::start(&Opts::default());
    let cli = Cli { daemon: &d };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let original = dir.join("c.pdf");
    std::fs::write(&original, contract_pdf("Contract")).unwrap();
    let prepared = dir.join("prepared.pdf");
    let fails = |args: &[&str], says: &str| {
        let out = cli.output(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    };
    let prepare = |input: &Path, page: &str, at: &str| {
        vec![
            "pdf".to_string(),
            "prepare".into(),
            p(input),
            "--seal".into(),
            "contract".into(),
            "--page".into(),
            page.into(),
            "--at".into(),
            at.into(),
            "--out".into(),
            p(&prepared),
        ]
    };
    let strs = |v: &[String]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let run_fails = |v: Vec<String>, says: &str| {
        let v = strs(&v);
        fails(&v.iter().map(String::as_str).collect::<Vec<_>>(), says)
    };
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a pdf").unwrap();
    run_fails(prepare(&text, "1", "10,10"), "not a PDF that can be read");
    run_fails(prepare(&original, "3", "10,10"), "there is no page 3");
    run_fails(prepare(&original, "1", "190,10"), "is not inside page 1");
    run_fails(prepare(&original, "1", "10;10"), "X,Y");
    let encrypted = dir.join("encrypted.pdf");
    let ok = Command::new("qpdf")
        .args(["--encrypt", "user", "owner", "256", "--"])
        .arg(&original)
        .arg(&encrypted)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    run_fails(prepare(&encrypted, "1", "10,10"), "encrypted");
    // Never prepared: no room for a signature.
    fails(
        &[
            "token",
            "new",
            "--pdf",
            &p(&original),
            "--seal",
            "contract",
            "--doc-type",
            "contract",
            "--dept",
            "sales",
            "--applicant",
            "zhao.lei",
        ],
        "no signature waiting",
    );
    // Prepared, then changed: the ByteRange no longer covers the file.
    cli.ok(&strs(&prepare(&original, "1", "10,10"))
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let mut changed = std::fs::read(&prepared).unwrap();
    changed.extend_from_slice(b"% appended\n");
    let changed_path = dir.join("changed.pdf");
    std::fs::write(&changed_path, &changed).unwrap();
    fails(
        &[
            "token",
            "new",
            "--pdf",
            &p(&changed_path),
            "--seal",
            "contract",
            "--doc-type",
            "contract",
            "--dept",
            "sales",
            "--applicant",
            "zhao.lei",
        ],
        "something was added after preparing",
    );
    // A PAdES stamp on an approval of the right digest that places no seal: refused by the
    // daemon before any use is spent; the same approval then stamps a bare signature.
    let waiting = sealgate::pdf::pending(&std::fs::read(&prepared).unwrap()).unwrap();
    let (digest, _) = sealgate::pdf::digests(&std::fs::read(&prepared).unwrap(), &waiting.range);
    let mut c = d.client().await;
    let token = token_for("contract", &digest);
    let ask = |container: pb::Container| pb::StampRequest {
        seal_id: "contract".into(),
        document_sha256: digest.to_vec(),
        approval_token: token.clone(),
        purpose: String::new(),
        mfa_code: String::new(),
        container: container as i32,
    };
    let r = c.stamp_request(ask(pb::Container::Pades)).await.unwrap();
    assert_eq!(r.status, Status::InvalidArgument as i32, "{}", r.message);
    assert!(r.message.contains("doc.placement"), "{}", r.message);
    let r = c.stamp_request(ask(pb::Container::Raw)).await.unwrap();
    assert_eq!(r.status, Status::Ok as i32, "{}", r.message);
    let Some(response::Body::Stamp(_)) = r.body else {
        panic!("no stamp")
    };
    // A CMS too large for the room reserved is refused when embedding.
    let big = vec![0x30u8; sealgate::pdf::RESERVED_BYTES + 1];
    assert!(matches!(
        sealgate::pdf::embed(&std::fs::read(&prepared).unwrap(), &big),
        Err(sealgate::pdf::PdfError::NoRoom { .. })
    ));
}

/// The test time-stamping authority (tests/python/tsa.py: `openssl ts -reply` over HTTP, with a
/// certificate from the demo CA), stopped when dropped.
struct TestTsa {
    child: std::process::Child,
    url: String,
}

impl TestTsa {
    fn start(dir: &Path) -> TestTsa {
        use std::io::BufRead;
        let mut child = Command::new(python())
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tsa.py"))
            .arg(dir)
            .arg(demo().dir.join("ca/ca.crt"))
            .arg(demo().dir.join("ca/ca.key"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("tsa.py said {line:?}"))
            .to_owned();
        TestTsa {
            child,
            url: format!("http://127.0.0.1:{port}/"),
        }
    }
}

impl Drop for TestTsa {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A daemon whose container stamps are timestamped by the TSA at `url`: the contract seal
/// requires a timestamp, "contract-be" (the same key) takes one at best.
fn daemon_with_tsa(url: &str) -> Daemon {
    let image = demo().dir.join("images/contract.png");
    Daemon::start(&Opts {
        caller_seals: Some(vec!["contract".into(), "contract-be".into()]),
        extra: format!(
            r#"
[[seal]]
id = "contract-be"
device = "demo-hsm"
key_label = "contract-seal"
algorithm = "ecdsa-p256-sha256"
image = "{image}"
timestamp = "best effort"

[[seal.rule]]
name = "contracts"
doc_types = ["contract"]
levels = ["dept_head"]
dept_scoped = ["dept_head"]

[timestamp]
url = "{url}"
timeout_ms = 3000
"#,
            image = image.display()
        ),
        ..Opts::default()
    })
}

/// The evidence of the newest record of `kind`, and its reason.
fn newest(db: &Path, kind: &str) -> (Value, String) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT evidence, reason FROM audit WHERE kind = ?1 ORDER BY seq DESC LIMIT 1",
        [kind],
        |r| {
            let e: String = r.get(0)?;
            Ok((serde_json::from_str(&e).unwrap_or_default(), r.get(1)?))
        },
    )
    .unwrap()
}

/// With `[timestamp]` configured, a PDF stamp carries an RFC 3161 token over its signature
/// (PAdES B-T, which pyHanko validates against the demo CA) and its record holds the TSA's time.
/// A TSA that is down refuses the stamp of a seal that requires one, precisely and recorded;
/// a seal whose policy says "best effort" is stamped without it, with the warning recorded.
#[test]
fn a_tsa_gives_pades_b_t_and_one_that_is_down_refuses_or_warns_as_the_policy_says() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let tsa = TestTsa::start(&dir.join("tsa"));
    let d = daemon_with_tsa(&tsa.url);
    let cli = Cli { daemon: &d };
    let original = demo().dir.join("contract.pdf");
    let claims = [
        "--doc-type",
        "contract",
        "--dept",
        "sales",
        "--amount-minor",
        "500000",
        "--currency",
        "CNY",
    ];
    let stamped = dir.join("timestamped.pdf");
    cli.stamp_pdf(
        dir,
        &original,
        "contract",
        "120,30",
        "40",
        &claims,
        &["zhang.wei"],
        &stamped,
    );
    let levels = pades_levels(&stamped);
    assert_eq!(levels.trim(), "Seal-contract-1 B-T");
    let (valid, summary) = pyhanko_validate(&stamped);
    assert!(valid, "{summary}");
    let (code, v) = cli.verify(&stamped, Some(&d.db()));
    assert_eq!(code, Some(0), "{v:#}");
    let t = &v["signatures"][0]["timestamp"];
    assert_eq!(t["over_this_signature"], true, "{v:#}");
    let (evidence, _) = newest(&d.db(), "stamp.completed");
    assert_eq!(evidence["timestamp"]["gen_time"], t["unix"], "{evidence}");
    assert!((t["unix"].as_i64().unwrap() - unix_now()).abs() < 120);
    let (code, out) = audit_verify(&d.db());
    assert_eq!(code, 0, "{out}");
    drop(d);
    drop(tsa);

    // The TSA is down (nothing listens on the port it had).
    let down = daemon_with_tsa("http://127.0.0.1:9/");
    let cli = Cli { daemon: &down };
    let (prepared, token) = cli.approve_pdf(
        dir,
        &original,
        "contract",
        "120,30",
        "40",
        &claims,
        &["zhang.wei"],
    );
    let refused = cli.stamp_prepared("contract", &prepared, &token, &dir.join("never.pdf"));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("TIMESTAMP_UNAVAILABLE"), "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(!dir.join("never.pdf").exists());
    let (_, reason) = newest(&down.db(), "stamp.failed");
    assert_eq!(reason, "timestamp_unavailable");
    let be = dir.join("best-effort.pdf");
    cli.stamp_pdf(
        dir,
        &original,
        "contract-be",
        "120,30",
        "40",
        &["--doc-type", "contract", "--dept", "sales"],
        &["zhang.wei"],
        &be,
    );
    let levels = pades_levels(&be);
    assert_eq!(levels.trim(), "Seal-contract-be-1 B-B");
    let (evidence, _) = newest(&down.db(), "stamp.completed");
    assert!(
        evidence["timestamp_warning"]
            .as_str()
            .is_some_and(|w| w.contains("could not be reached")),
        "{evidence}"
    );
    let (code, out) = audit_verify(&down.db());
    assert_eq!(code, 0, "{out}");
}
