//! The configuration file, as an operator (or whoever could edit it) writes it: parsed and
//! checked as at start-up, then each seal's policy, the trust store with inline keys, and the
//! anomaly rules built from it.
//!
//! Checks: nothing panics; a bad file is an error, never a half-read configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::approval::TrustStore;
use sealgate::audit::anomaly::Anomaly;
use sealgate::config::Config;
use sealgate::policy::SealPolicy;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A folder that does not exist: key files named in the text are never read.
    let dir = Path::new("/nonexistent/sealgate");
    let Ok(config) = Config::parse(text, &dir.join("sealgate.toml")) else {
        return;
    };
    for seal in &config.seals {
        let _ = SealPolicy::from_config(&seal.id, &seal.rules);
    }
    let _ = TrustStore::with_applicants(
        &config.approvers,
        &config.applicants,
        config.webauthn.as_ref(),
        dir,
    );
    let _ = Anomaly::from_config(&config.audit.alerts);
});
