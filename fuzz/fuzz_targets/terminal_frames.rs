//! What a terminal, or anyone on its line, sends: a byte stream through the frame decoder,
//! in reads of varying size, with partial frames expiring; every signed report is checked
//! against the enrolled key and decoded as its command's message.
//!
//! Input: one control byte (how the stream is split into reads, and whether a partial frame
//! expires between reads), then the stream.
//! Checks: nothing panics; the decoder never holds more than one frame's worth of bytes once
//! drained; every frame it yields re-encodes to bytes that decode to the same frame; a report
//! that opens was signed by the terminal's key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealgate::terminal::{open_report, pb, Command, Decoder, Frame, MAX_FRAME};
use sealgate_fuzz::{terminal_key, TERMINAL_ID};
use std::sync::OnceLock;

static KEY: OnceLock<ed25519_dalek::VerifyingKey> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let key = KEY.get_or_init(|| terminal_key().verifying_key());
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let read = 1 + (control & 0x7f) as usize * 5;
    let expire = control & 0x80 != 0;
    let mut decoder = Decoder::new();
    for piece in stream.chunks(read) {
        decoder.push(piece);
        while let Some(next) = decoder.next_frame() {
            if let Ok(frame) = next {
                check(key, &frame);
            }
        }
        assert!(
            decoder.buffered() < MAX_FRAME,
            "{} bytes held",
            decoder.buffered()
        );
        if expire {
            let _ = decoder.expire();
            assert!(!decoder.pending());
        }
    }
});

fn check(key: &ed25519_dalek::VerifyingKey, frame: &Frame) {
    let mut again = Decoder::new();
    again.push(&frame.encode());
    match again.next_frame() {
        Some(Ok(f)) => assert_eq!(&f, frame),
        other => panic!("a decoded frame does not round-trip: {other:?}"),
    }
    let Some(cmd) = frame.command() else {
        return;
    };
    let opened = match cmd {
        Command::Hello => {
            open_report::<pb::Hello>(key, TERMINAL_ID, cmd, &frame.payload).map(|r| r.1)
        }
        Command::Impression => {
            open_report::<pb::Impression>(key, TERMINAL_ID, cmd, &frame.payload).map(|r| r.1)
        }
        Command::Locked => {
            open_report::<pb::Locked>(key, TERMINAL_ID, cmd, &frame.payload).map(|r| r.1)
        }
        Command::Tamper => {
            open_report::<pb::Tamper>(key, TERMINAL_ID, cmd, &frame.payload).map(|r| r.1)
        }
        _ => return,
    };
    if let Ok(signed) = opened {
        let sig = ed25519_dalek::Signature::from_slice(&signed.signature).expect("64 bytes");
        let msg = sealgate::terminal::signed_bytes(TERMINAL_ID, cmd, &signed.body);
        key.verify_strict(&msg, &sig)
            .expect("an opened report verifies strictly");
    }
}
