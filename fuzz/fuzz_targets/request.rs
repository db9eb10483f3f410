//! The socket's input: a byte stream cut into length-delimited frames, each decoded as a
//! Request and carried out by the service, as the configured caller or as a stranger.
//!
//! Input: one control byte (bit 0: stranger; the rest: how the stream is split into reads),
//! then the stream.
//! Checks: nothing panics; every response echoes its request id; a stranger is answered OK
//! only to Hello and learns nothing else; a stamp answered OK carries a signature that
//! verifies under the seal's key.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::pkcs8::DecodePublicKey;
use prost::Message;
use sealgate::protocol::codec::FrameCodec;
use sealgate::protocol::{request, response, Request, Status};
use sealgate_fuzz::World;
use std::sync::Mutex;
use tokio_util::codec::Decoder;

/// The service, and the inputs it has taken. Every input leaves audit records behind; a fresh
/// service (and state directory) every so often keeps a long run's disk use flat.
static WORLD: Mutex<Option<(World, usize)>> = Mutex::new(None);
const FRESH_AFTER: usize = 20_000;

fuzz_target!(|data: &[u8]| {
    let mut slot = WORLD.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|(_, n)| *n >= FRESH_AFTER) {
        if let Some((old, _)) = slot.take() {
            old.close();
        }
    }
    let (world, inputs) = slot.get_or_insert_with(|| (World::new(), 0));
    *inputs += 1;
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let stranger = control & 1 == 1;
    let read = 1 + (control >> 1) as usize * 13;
    let mut codec = FrameCodec::new(65536);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(read) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => handle(world, stranger, frame.freeze()),
                Ok(None) => break,
                // The server answers and closes the connection.
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});

fn handle(world: &World, stranger: bool, frame: bytes::Bytes) {
    let Ok(req) = Request::decode(frame) else {
        return;
    };
    let id = req.request_id;
    let hello = matches!(req.body, Some(request::Body::Hello(_)));
    let stamp = match &req.body {
        Some(request::Body::Stamp(s)) => Some((s.seal_id.clone(), s.document_sha256.clone())),
        _ => None,
    };
    let peer = if stranger {
        &world.stranger
    } else {
        &world.caller
    };
    let resp = world.runtime.block_on(world.service.handle(peer, req));
    assert_eq!(resp.request_id, id);
    let ok = resp.status == Status::Ok as i32;
    if stranger && !hello {
        assert!(!ok, "a stranger was served: {resp:?}");
        assert!(
            resp.body.is_none(),
            "a stranger was told something: {resp:?}"
        );
    }
    if let (true, Some((seal, digest)), Some(response::Body::Stamp(s))) = (ok, stamp, &resp.body) {
        let key = p256::ecdsa::VerifyingKey::from_public_key_der(world.seal_key(&seal))
            .expect("a P-256 key");
        let sig = p256::ecdsa::Signature::from_der(&s.signature).expect("a DER signature");
        let digest: [u8; 32] = digest
            .as_slice()
            .try_into()
            .expect("a stamped digest is 32 bytes");
        key.verify_prehash(&digest, &sig)
            .expect("the stamp verifies under the seal's key");
    }
}
