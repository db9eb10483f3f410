//! Approval tokens: parsing (compact, flattened and general JWS) and every check that needs
//! no state, against the fuzz configuration's trust store and the contract seal's policy.
//!
//! Checks: nothing panics; a token that passes is for this seal and document, and each of its
//! signatures verifies afresh under its approver's configured key or passkey (so the trust store's memory
//! of verified signatures never lets a forgery through); a parsed token written out again
//! parses to the same claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::approval::{evaluate, webauthn, TrustStore};
use sealgate::policy::SealPolicy;
use sealgate::token::{Token, VerifyingKey};
use sealgate_fuzz::{approvers, config, DIGEST, NOW};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

struct Fixture {
    trust: TrustStore,
    policy: SealPolicy,
    keys: HashMap<&'static str, VerifyingKey>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> Fixture {
    let dir = Path::new("/nonexistent");
    let config = config(dir);
    let trust = TrustStore::with_applicants(
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
    // With the seal's limits, as the daemon has it.
    let policy = SealPolicy::from_config(&seal.id, &seal.rules)
        .expect("the policy")
        .with_limits(sealgate::config::TokenLimits::of(
            seal.max_token_lifetime_seconds,
            seal.max_uses,
        ));
    let keys = approvers()
        .into_iter()
        .map(|(id, _, _, key)| (id, key.verifying_key()))
        .collect();
    Fixture {
        trust,
        policy,
        keys,
    }
}

fuzz_target!(|data: &[u8]| {
    let f = FIXTURE.get_or_init(fixture);
    let ev = evaluate(data, "contract", &DIGEST, NOW, &f.trust, &f.policy);
    if ev.denials.is_empty() {
        let t = ev.token.expect("a token that passed was parsed");
        assert_eq!(t.claims.seal, "contract");
        assert_eq!(t.claims.doc.sha256, hex::encode(DIGEST));
        assert!(ev.rule.is_some() && !ev.approvals.is_empty());
        for (i, s) in t.signatures.iter().enumerate() {
            match &s.assertion {
                None => {
                    let key = &f.keys[s.header.kid.as_str()];
                    assert!(t.verify(i, key), "signature {i} passed but does not verify");
                }
                // A passkey's: every check again, the signature afresh.
                Some(a) => {
                    let approver = f.trust.get(&s.header.kid).expect("a known approver");
                    let passkey = approver
                        .passkeys
                        .iter()
                        .find(|p| p.credential_id == a.credential_id)
                        .expect("a registered passkey");
                    let origins = [sealgate_fuzz::PASSKEY_ORIGIN.to_string()];
                    assert!(
                        webauthn::check(&t, i, passkey, &origins, false, |v| v()).is_ok(),
                        "passkey signature {i} passed but does not verify"
                    );
                }
            }
        }
    }
    if let Ok(t) = Token::parse(data) {
        let again = Token::parse(t.to_json().as_bytes()).expect("a parsed token re-parses");
        assert_eq!(again.claims, t.claims);
        assert_eq!(again.signatures.len(), t.signatures.len());
    }
});
