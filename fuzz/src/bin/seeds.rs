//! Writes the seed corpus into fuzz/corpus/<target>/: well-formed requests, signed tokens,
//! signed terminal reports, and the shipped configuration and profiles, so the fuzzers start
//! from inputs that reach deep into each parser. Run again after a format change:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seeds`.

use prost::Message;
use sealgate::protocol::pb;
use sealgate::protocol::{request, Request};
use sealgate::terminal::{self, pb as tpb, Command, Frame};
use sealgate_fuzz::{claims, config_text, signed, terminal_key, DIGEST, TERMINAL_ID};
use std::path::{Path, PathBuf};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).expect("seed written");
}

fn frame(id: u64, body: request::Body) -> Vec<u8> {
    let msg = Request {
        request_id: id,
        body: Some(body),
    }
    .encode_to_vec();
    let mut out = (msg.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&msg);
    out
}

fn main() {
    // Tokens.
    let contract = signed(
        claims("seed-1", "contract", "contract", None, 1_000_000),
        &["zhang.wei"],
    );
    let large = signed(
        claims(
            "seed-2",
            "contract",
            "contract",
            Some(20_000_000),
            1_000_000,
        ),
        &["zhang.wei", "li.na"],
    );
    let letter = signed(
        claims("seed-3", "official", "letter", None, 1_000_000),
        &["zhang.wei", "li.na"],
    );
    let invoice = signed(
        claims("seed-4", "finance", "invoice", None, 2),
        &["liu.yang"],
    );
    let unsigned = signed(claims("seed-5", "contract", "contract", None, 1), &[]);
    // A large contract whose executive level is a passkey's WebAuthn assertion.
    let mut by_passkey = sealgate::token::Token::parse(&signed(
        claims(
            "seed-6",
            "contract",
            "contract",
            Some(20_000_000),
            1_000_000,
        ),
        &["zhang.wei"],
    ))
    .expect("a seed token");
    sealgate_fuzz::add_passkey_signature(&mut by_passkey, 7);
    let by_passkey = by_passkey.to_json().into_bytes();
    {
        // The contract seal's seeds must pass, so the fuzzer starts from approvals (a passkey's
        // among them) that verify.
        let dir = std::path::Path::new("/nonexistent");
        let config = sealgate_fuzz::config(dir);
        let trust = sealgate::approval::TrustStore::with_applicants(
            &config.approvers,
            &config.applicants,
            config.webauthn.as_ref(),
            dir,
        )
        .expect("the trust store");
        let seal = config
            .seals
            .iter()
            .find(|s| s.id == "contract")
            .expect("contract");
        let policy = sealgate::policy::SealPolicy::from_config(&seal.id, &seal.rules)
            .expect("policy")
            .with_limits(sealgate::config::TokenLimits::of(
                seal.max_token_lifetime_seconds,
                seal.max_uses,
            ));
        for (name, t) in [
            ("contract", &contract),
            ("large", &large),
            ("passkey", &by_passkey),
        ] {
            let ev = sealgate::approval::evaluate(
                t,
                "contract",
                &sealgate_fuzz::DIGEST,
                sealgate_fuzz::NOW,
                &trust,
                &policy,
            );
            assert!(ev.denials.is_empty(), "the {name} seed: {:?}", ev.denials);
        }
    }
    for (name, t) in [
        ("contract", &contract),
        ("large", &large),
        ("letter", &letter),
        ("invoice", &invoice),
        ("unsigned", &unsigned),
        ("passkey", &by_passkey),
    ] {
        write("token", name, t);
    }
    // The one-signature token in the compact serialization.
    let general: serde_json::Value = serde_json::from_slice(&contract).expect("JSON");
    let part = |k: &str| {
        general["signatures"][0][k]
            .as_str()
            .expect("a string")
            .to_owned()
    };
    let payload = general["payload"].as_str().expect("a string");
    let compact = format!("{}.{payload}.{}", part("protected"), part("signature"));
    write("token", "compact", compact.as_bytes());

    // Requests: control byte 0 (the caller, whole reads) or 1 (a stranger), then frames.
    use request::Body as B;
    let stamp = |seal: &str, token: &[u8]| {
        B::Stamp(pb::StampRequest {
            seal_id: seal.into(),
            document_sha256: DIGEST.to_vec(),
            approval_token: token.to_vec(),
            purpose: "seed".into(),
            mfa_code: String::new(),
            container: pb::Container::Raw as i32,
        })
    };
    let session = [
        frame(
            1,
            B::Hello(pb::HelloRequest {
                protocol_version: 1,
                client_name: "seed".into(),
            }),
        ),
        frame(2, B::ListSeals(pb::ListSealsRequest {})),
        frame(
            3,
            B::DescribeSeal(pb::DescribeSealRequest {
                seal_id: "contract".into(),
            }),
        ),
        frame(4, B::Status(pb::StatusRequest {})),
        frame(
            5,
            B::WatchAlerts(pb::WatchAlertsRequest {
                recent: 5,
                follow: false,
            }),
        ),
        frame(
            6,
            B::RecordOversight(pb::RecordOversightRequest {
                kind: "console.search".into(),
                user: "qian.li".into(),
                detail: "seal=contract".into(),
                ref_seq: 0,
                reason: String::new(),
            }),
        ),
    ]
    .concat();
    write("request", "session", &[&[0u8][..], &session].concat());
    // An application: the large contract with its first level signed waits; the passkey's
    // approval of the executive level completes it (the console's requests).
    let (level_one, passkey_entry) = {
        let mut v: serde_json::Value = serde_json::from_slice(&by_passkey).expect("JSON");
        let entry = v["signatures"]
            .as_array_mut()
            .and_then(|s| s.pop())
            .expect("a passkey signature");
        (v.to_string().into_bytes(), entry.to_string().into_bytes())
    };
    let applications = [
        frame(
            1,
            B::SubmitApplication(pb::SubmitApplicationRequest {
                token: level_one,
                document_pdf: Vec::new(),
            }),
        ),
        frame(
            2,
            B::ListApplications(pb::ListApplicationsRequest::default()),
        ),
        frame(
            3,
            B::DecideApplication(pb::DecideApplicationRequest {
                application_id: "seed-6".into(),
                signature: passkey_entry,
                reject_reason: String::new(),
            }),
        ),
        frame(
            4,
            B::FetchApplication(pb::FetchApplicationRequest {
                application_id: "seed-6".into(),
                document: false,
            }),
        ),
    ]
    .concat();
    write(
        "request",
        "applications",
        &[&[0u8][..], &applications].concat(),
    );
    write("request", "stranger", &[&[1u8][..], &session].concat());
    for (name, seal, token) in [
        ("stamp-contract", "contract", &contract),
        ("stamp-large", "contract", &large),
        ("stamp-letter", "official", &letter),
        ("stamp-invoice", "finance", &invoice),
        ("stamp-unsigned", "contract", &unsigned),
    ] {
        write(
            "request",
            name,
            &[&[0u8][..], &frame(7, stamp(seal, token))].concat(),
        );
    }
    let check = B::CheckApproval(pb::CheckApprovalRequest {
        seal_id: "contract".into(),
        document_sha256: DIGEST.to_vec(),
        approval_token: large.clone(),
        mfa_code: String::new(),
    });
    write("request", "check", &[&[0u8][..], &frame(8, check)].concat());
    let grant = B::GrantTerminal(pb::GrantTerminalRequest {
        seal_id: "contract".into(),
        document_sha256: DIGEST.to_vec(),
        approval_token: contract.clone(),
        impressions: 2,
        purpose: "seed".into(),
        mfa_code: String::new(),
    });
    write("request", "grant", &[&[0u8][..], &frame(9, grant)].concat());
    let enroll = B::EnrollMfa(pb::EnrollMfaRequest {
        user: "chen.jie".into(),
    });
    write(
        "request",
        "enroll",
        &[&[0u8][..], &frame(10, enroll)].concat(),
    );

    // Terminal frames: control byte 0 (whole reads), then frames as a terminal sends them.
    let key = terminal_key();
    let report = |cmd: Command, body: Vec<u8>| terminal::sign_report(&key, TERMINAL_ID, cmd, body);
    let hello = tpb::Hello {
        terminal_id: TERMINAL_ID.into(),
        firmware: "1.0".into(),
        counter: 7,
        ..Default::default()
    };
    let impression = tpb::Impression {
        counter: 8,
        ..Default::default()
    };
    let frames = [
        Frame::new(
            1,
            Command::Hello,
            report(Command::Hello, hello.encode_to_vec()),
        ),
        Frame::new(
            2,
            Command::Heartbeat,
            tpb::Heartbeat::default().encode_to_vec(),
        ),
        Frame::new(
            3,
            Command::Impression,
            report(Command::Impression, impression.encode_to_vec()),
        ),
        Frame::new(
            4,
            Command::Locked,
            report(Command::Locked, tpb::Locked::default().encode_to_vec()),
        ),
        Frame::new(
            5,
            Command::Tamper,
            report(Command::Tamper, tpb::Tamper::default().encode_to_vec()),
        ),
        terminal::ack(6),
        terminal::nak(7, tpb::NakReason::Crc),
    ];
    let mut line = vec![0u8];
    for f in &frames {
        line.extend_from_slice(&f.encode());
    }
    write("terminal_frames", "session", &line);
    let mut noisy = vec![0x83u8, 0xA5, 0x00, 0x5A];
    noisy.extend_from_slice(&frames[2].encode()[..9]);
    noisy.extend_from_slice(&frames[0].encode());
    write("terminal_frames", "noisy", &noisy);

    // Configuration and profiles.
    let config = config_text(Path::new("/var/lib/sealgate"));
    write("config", "fuzz", config.as_bytes());
    let terminal = format!(
        r#"{config}
[[seal.rule]]
name = "letters"
doc_types = ["letter"]
levels = ["dept_head"]

[[terminal]]
id = "{TERMINAL_ID}"
profile = "sealgate-terminal-v1"
seal = "contract-physical"
name = "合同专用章"
public_key = "{}"
certificate_sha256 = "{}"

[[terminal.rule]]
name = "contracts"
doc_types = ["contract"]
levels = ["dept_head"]

[terminals]
listen = "127.0.0.1:7443"
certificate = "terminals.crt"
key = "terminals.key"
"#,
        hex::encode(key.verifying_key().as_bytes()),
        "ab".repeat(32)
    );
    write("config", "terminal", terminal.as_bytes());
    let profiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("../device-profiles");
    for e in std::fs::read_dir(profiles)
        .expect("device-profiles")
        .flatten()
    {
        let path = e.path();
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        write("profile", &name, &std::fs::read(&path).expect("readable"));
    }
}
