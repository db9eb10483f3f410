//! PDFs as `sealctl` reads them: every signature with what changed after it, the signature
//! waiting in a prepared file, and embedding a CMS into it.
//!
//! Checks: nothing panics; a prepared file's waiting signature takes a CMS that fits, after
//! which the file has the same length, nothing waits any more, and the signature reads back
//! with that CMS over the same signed bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::pdf::{digests, embed, pending, signatures, PdfError};

fuzz_target!(|data: &[u8]| {
    let _ = signatures(data);
    let Ok(waiting) = pending(data) else {
        return;
    };
    let before = digests(data, &waiting.range);
    let cms = [0x30, 0x03, 0x02, 0x01, 0x07];
    let Ok(signed) = embed(data, &cms) else {
        return;
    };
    assert_eq!(signed.len(), data.len());
    assert!(matches!(pending(&signed), Err(PdfError::NothingReserved)));
    if let Ok(found) = signatures(&signed) {
        if let Some(f) = found.iter().find(|f| f.cms == cms) {
            let r = f.range.as_ref().expect("a read signature has its range");
            assert_eq!(digests(&signed, r), before);
        }
    }
});
