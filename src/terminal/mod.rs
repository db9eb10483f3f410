//! Smart-seal terminals: stamping machines that keep a physical seal locked until sealgate
//! grants a number of impressions, and report each impression signed by their device key.
//!
//! Owns: the terminal protocol v1 (this module: frames, commands, payloads, signatures; the
//! contract is `docs/terminal-protocol.md`), the transports ([`link`]: serial lines and TCP
//! with mutual TLS) and the per-terminal session ([`session`]: grants, impression counters,
//! heartbeats, retransmission, audit records).
//! Never: trusts a report whose signature does not verify under the enrolled key, or lets a
//! malformed frame end a session.
//!
//! A frame: `A5 5A | len (u16 BE) | seq | cmd | payload (len bytes) | CRC-32 (BE)`, the CRC
//! (ISO-HDLC, as in zlib) taken over len, seq, cmd and payload.

pub mod link;
pub mod session;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;

/// Generated from `proto/sealgate/terminal/v1/terminal.proto` by `build.rs`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/sealgate.terminal.v1.rs"));
}

/// First two bytes of every frame.
pub const START: [u8; 2] = [0xA5, 0x5A];
/// Largest payload, in bytes. An approval token fits with room to spare.
pub const MAX_PAYLOAD: usize = 8 * 1024;
/// Bytes around the payload: marker, length, seq, cmd before it; CRC after.
const HEADER: usize = 6;
const TRAILER: usize = 4;
/// The largest frame, in bytes.
pub const MAX_FRAME: usize = HEADER + MAX_PAYLOAD + TRAILER;
/// Domain tag that starts every signed report's signed bytes.
pub const SIGN_TAG: &[u8] = b"sealgate-terminal-v1\0";

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// The commands of protocol v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    Hello = 0x01,
    UnlockRequest = 0x02,
    UnlockGrant = 0x03,
    UnlockDeny = 0x04,
    Impression = 0x05,
    Locked = 0x06,
    Heartbeat = 0x07,
    Tamper = 0x08,
    Ack = 0x10,
    Nak = 0x11,
}

impl Command {
    pub fn from_byte(b: u8) -> Option<Command> {
        use Command::*;
        Some(match b {
            0x01 => Hello,
            0x02 => UnlockRequest,
            0x03 => UnlockGrant,
            0x04 => UnlockDeny,
            0x05 => Impression,
            0x06 => Locked,
            0x07 => Heartbeat,
            0x08 => Tamper,
            0x10 => Ack,
            0x11 => Nak,
            _ => return None,
        })
    }

    /// Reports the terminal signs with its device key.
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            Command::Hello | Command::Impression | Command::Locked | Command::Tamper
        )
    }

    /// ACK and NAK answer a frame; everything else is answered by one.
    pub fn is_reply(self) -> bool {
        matches!(self, Command::Ack | Command::Nak)
    }
}

/// One well-formed frame. `cmd` is the raw byte: an unknown command still has a sequence
/// number to NAK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub seq: u8,
    pub cmd: u8,
    pub payload: Vec<u8>,
}

/// A frame's payload may hold an approval token (UNLOCK_REQUEST); it is wiped when dropped.
impl Drop for Frame {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.payload);
    }
}

impl Frame {
    pub fn new(seq: u8, cmd: Command, payload: Vec<u8>) -> Frame {
        Frame {
            seq,
            cmd: cmd as u8,
            payload,
        }
    }

    pub fn command(&self) -> Option<Command> {
        Command::from_byte(self.cmd)
    }

    /// The frame's bytes on the line.
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.payload.len() <= MAX_PAYLOAD,
            "payload over MAX_PAYLOAD"
        );
        let mut out = Vec::with_capacity(HEADER + self.payload.len() + TRAILER);
        out.extend_from_slice(&START);
        out.extend_from_slice(&(self.payload.len() as u16).to_be_bytes());
        out.push(self.seq);
        out.push(self.cmd);
        out.extend_from_slice(&self.payload);
        let crc = CRC.checksum(&out[2..]);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }
}

/// Why bytes on the line were not a frame. Each is answered with a NAK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The CRC does not match; `seq` is what the damaged header said.
    Crc { seq: u8 },
    /// A length over [`MAX_PAYLOAD`].
    Length { seq: u8 },
    /// Bytes that were not the start of a frame were skipped.
    Noise { skipped: usize },
    /// A frame began but its remaining bytes never came (see [`Decoder::expire`]).
    Truncated { seq: u8 },
}

impl FrameError {
    pub fn nak_reason(self) -> pb::NakReason {
        match self {
            FrameError::Crc { .. } => pb::NakReason::Crc,
            FrameError::Length { .. } => pb::NakReason::Length,
            FrameError::Noise { .. } => pb::NakReason::Noise,
            FrameError::Truncated { .. } => pb::NakReason::Truncated,
        }
    }

    /// The sequence number to NAK, when the damaged frame had one.
    pub fn seq(self) -> Option<u8> {
        match self {
            FrameError::Crc { seq } | FrameError::Length { seq } => Some(seq),
            FrameError::Truncated { seq } => Some(seq),
            FrameError::Noise { .. } => None,
        }
    }
}

/// Turns a byte stream into frames, resynchronising on the start marker after any damage.
/// Once drained by [`Decoder::next_frame`], holds less than one frame's worth of bytes.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held, waiting for the rest of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether part of a frame is waiting for the rest.
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Drops a partial frame whose rest did not come in time; says what was dropped.
    pub fn expire(&mut self) -> Option<FrameError> {
        if self.buf.is_empty() {
            return None;
        }
        let err = if self.buf.starts_with(&START) && self.buf.len() >= 5 {
            FrameError::Truncated { seq: self.buf[4] }
        } else {
            FrameError::Noise {
                skipped: self.buf.len(),
            }
        };
        zeroize::Zeroize::zeroize(&mut self.buf);
        Some(err)
    }

    /// The next frame or damage report, or `None` until more bytes arrive.
    pub fn next_frame(&mut self) -> Option<Result<Frame, FrameError>> {
        // Skip to the first possible start marker.
        let start = find_start(&self.buf);
        if start > 0 {
            self.buf.drain(..start);
            return Some(Err(FrameError::Noise { skipped: start }));
        }
        if self.buf.len() < HEADER {
            return None;
        }
        let len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
        let seq = self.buf[4];
        if len > MAX_PAYLOAD {
            // Not a frame after all: look for the next marker past this one.
            self.buf.drain(..1);
            return Some(Err(FrameError::Length { seq }));
        }
        let total = HEADER + len + TRAILER;
        if self.buf.len() < total {
            return None;
        }
        let crc = u32::from_be_bytes(self.buf[total - 4..total].try_into().expect("4 bytes"));
        if CRC.checksum(&self.buf[2..total - 4]) != crc {
            self.buf.drain(..1);
            return Some(Err(FrameError::Crc { seq }));
        }
        let frame = Frame {
            seq,
            cmd: self.buf[5],
            payload: self.buf[HEADER..total - 4].to_vec(),
        };
        // An UNLOCK_REQUEST carries an approval token: no copy stays behind in the buffer.
        zeroize::Zeroize::zeroize(&mut self.buf[..total]);
        self.buf.drain(..total);
        Some(Ok(frame))
    }
}

/// Offset of the first start marker (or of a trailing first marker byte) in `buf`.
fn find_start(buf: &[u8]) -> usize {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == START[0] && (i + 1 == buf.len() || buf[i + 1] == START[1]) {
            return i;
        }
        i += 1;
    }
    buf.len()
}

/// The bytes a terminal signs for a report.
pub fn signed_bytes(terminal_id: &str, cmd: Command, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGN_TAG.len() + terminal_id.len() + 2 + body.len());
    m.extend_from_slice(SIGN_TAG);
    m.extend_from_slice(terminal_id.as_bytes());
    m.push(0);
    m.push(cmd as u8);
    m.extend_from_slice(body);
    m
}

/// Wraps an encoded report in a [`pb::Signed`] payload (the terminal's side).
pub fn sign_report(key: &SigningKey, terminal_id: &str, cmd: Command, body: Vec<u8>) -> Vec<u8> {
    let signature = key.sign(&signed_bytes(terminal_id, cmd, &body));
    pb::Signed {
        body,
        signature: signature.to_bytes().to_vec(),
    }
    .encode_to_vec()
}

/// Why a signed report was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the payload is not a signed report")]
    NotSigned,
    #[error("the signature is not 64 bytes")]
    SignatureLength,
    #[error("the signature does not verify under the enrolled device key")]
    BadSignature,
    #[error("the report body does not decode: {0}")]
    Body(String),
}

/// Checks a signed report against the enrolled key and decodes its body. Returns the body's
/// bytes too: they are the evidence an auditor verifies.
pub fn open_report<M: Message + Default>(
    key: &VerifyingKey,
    terminal_id: &str,
    cmd: Command,
    payload: &[u8],
) -> Result<(M, pb::Signed), ReportError> {
    let signed = pb::Signed::decode(payload).map_err(|_| ReportError::NotSigned)?;
    let sig: [u8; 64] = signed
        .signature
        .as_slice()
        .try_into()
        .map_err(|_| ReportError::SignatureLength)?;
    key.verify(
        &signed_bytes(terminal_id, cmd, &signed.body),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| ReportError::BadSignature)?;
    let body = M::decode(signed.body.as_slice()).map_err(|e| ReportError::Body(e.to_string()))?;
    Ok((body, signed))
}

/// A NAK frame for `seq`.
pub fn nak(seq: u8, reason: pb::NakReason) -> Frame {
    Frame::new(
        seq,
        Command::Nak,
        pb::Nak {
            reason: reason as u32,
        }
        .encode_to_vec(),
    )
}

/// An ACK frame for `seq`.
pub fn ack(seq: u8) -> Frame {
    Frame::new(seq, Command::Ack, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<Result<Frame, FrameError>> {
        let mut d = Decoder::new();
        d.push(bytes);
        std::iter::from_fn(|| d.next_frame()).collect()
    }

    #[test]
    fn a_frame_round_trips() {
        let f = Frame::new(7, Command::Heartbeat, vec![1, 2, 3]);
        assert_eq!(frames(&f.encode()), vec![Ok(f)]);
    }

    #[test]
    fn bytes_arrive_one_at_a_time() {
        let f = Frame::new(200, Command::UnlockRequest, vec![9; 300]);
        let mut d = Decoder::new();
        let bytes = f.encode();
        for (i, b) in bytes.iter().enumerate() {
            d.push(&[*b]);
            let got = d.next_frame();
            if i + 1 < bytes.len() {
                assert_eq!(got, None, "at byte {i}");
            } else {
                assert_eq!(got, Some(Ok(f.clone())));
            }
        }
    }

    #[test]
    fn a_bad_crc_is_reported_and_the_next_frame_still_read() {
        let mut bad = Frame::new(3, Command::Heartbeat, vec![1, 2]).encode();
        bad[7] ^= 0x40;
        let good = Frame::new(4, Command::Heartbeat, vec![]);
        let mut bytes = bad;
        bytes.extend(good.encode());
        let got = frames(&bytes);
        assert_eq!(got[0], Err(FrameError::Crc { seq: 3 }));
        assert_eq!(got.last(), Some(&Ok(good)));
    }

    #[test]
    fn noise_is_skipped_up_to_the_marker() {
        let good = Frame::new(1, Command::Ack, vec![]);
        let mut bytes = vec![0x00, 0xA5, 0x13, 0xFF];
        bytes.extend(good.encode());
        assert_eq!(
            frames(&bytes),
            vec![Err(FrameError::Noise { skipped: 4 }), Ok(good)]
        );
    }

    #[test]
    fn an_oversized_length_is_refused_without_waiting_for_it() {
        let mut bytes = START.to_vec();
        bytes.extend([0xFF, 0xFF, 9, 1]);
        assert_eq!(frames(&bytes)[0], Err(FrameError::Length { seq: 9 }));
    }

    #[test]
    fn a_partial_frame_expires_as_truncated() {
        let bytes = Frame::new(5, Command::Heartbeat, vec![1; 10]).encode();
        let mut d = Decoder::new();
        d.push(&bytes[..9]);
        assert_eq!(d.next_frame(), None);
        assert_eq!(d.expire(), Some(FrameError::Truncated { seq: 5 }));
        assert!(!d.pending());
    }

    #[test]
    fn reports_verify_only_under_their_key_and_terminal() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let body = pb::Impression {
            counter: 5,
            ..Default::default()
        }
        .encode_to_vec();
        let payload = sign_report(&key, "t1", Command::Impression, body);
        let vk = key.verifying_key();
        let (m, _) =
            open_report::<pb::Impression>(&vk, "t1", Command::Impression, &payload).unwrap();
        assert_eq!(m.counter, 5);
        let wrong = |k: &VerifyingKey, t: &str, c: Command| {
            open_report::<pb::Impression>(k, t, c, &payload).unwrap_err()
        };
        assert_eq!(
            wrong(&other.verifying_key(), "t1", Command::Impression),
            ReportError::BadSignature
        );
        assert_eq!(
            wrong(&vk, "t2", Command::Impression),
            ReportError::BadSignature
        );
        assert_eq!(wrong(&vk, "t1", Command::Tamper), ReportError::BadSignature);
    }
}
