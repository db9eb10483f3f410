//! Device profiles: parsed and checked as at start-up.
//!
//! Checks: nothing panics; a profile that parses names only algorithms sealgate knows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::device::profile::DeviceProfile;
use sealgate::device::Algorithm;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = DeviceProfile::parse(text, "fuzzed", Path::new("fuzzed.toml")) {
        for a in &p.algorithms {
            Algorithm::parse(a).expect("a profile that parsed names known algorithms");
        }
    }
});
