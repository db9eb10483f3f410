//! Detached CMS signatures as `sealctl verify` reads them: a byte of document length, the
//! document, then the .p7s.
//!
//! Checks: nothing panics; a signature found to hold is found to hold again, and its signer's
//! certificate and signed attributes read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::container::{check_detached, message_digest};

fuzz_target!(|data: &[u8]| {
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let len = (len as usize).min(rest.len());
    let (document, p7s) = rest.split_at(len);
    let Ok(c) = check_detached(p7s, document) else {
        return;
    };
    if c.digest_matches && c.signature_verifies {
        let again = check_detached(p7s, document).expect("a container that read once reads again");
        assert!(again.digest_matches && again.signature_verifies);
        assert!(message_digest(&c.signed_attributes).is_ok());
        assert!(!c.certificate.is_empty());
    }
});
