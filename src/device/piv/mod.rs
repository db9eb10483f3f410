//! PIV (NIST SP 800-73-4) on the wire: the command APDUs the PC/SC seal device sends, the BER-TLV
//! it reads, and the constants both it and the card emulator (`sealgate-pivcard`) use.
//!
//! Owns: encoding and decoding of PIV APDUs and data objects. Never: talks to a reader (that is
//! [`device`]) or holds a key.

#[cfg(feature = "pcsc")]
pub mod device;

/// The PIV application identifier (the full AID; cards also answer its first 9 bytes).
pub const AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];

pub const INS_SELECT: u8 = 0xA4;
pub const INS_GET_DATA: u8 = 0xCB;
pub const INS_VERIFY: u8 = 0x20;
pub const INS_GENERAL_AUTHENTICATE: u8 = 0x87;
pub const INS_GET_RESPONSE: u8 = 0xC0;
/// YubiKey's GET SERIAL (vendor command, not in SP 800-73-4).
pub const INS_YUBIKEY_SERIAL: u8 = 0xF8;

/// Key reference of the PIV Card Application PIN.
pub const PIN_APPLICATION: u8 = 0x80;
/// Key reference of the Global PIN.
pub const PIN_GLOBAL: u8 = 0x00;

/// Algorithm identifiers of GENERAL AUTHENTICATE (SP 800-78-4 table 6-2).
pub const ALG_RSA_2048: u8 = 0x07;
pub const ALG_ECC_P256: u8 = 0x11;

/// The Card Holder Unique Identifier object.
pub const OBJ_CHUID: u32 = 0x5F_C1_02;
/// Tag of the GUID inside the CHUID.
pub const CHUID_GUID: u32 = 0x34;

/// Status words.
pub const SW_OK: u16 = 0x9000;
pub const SW_SECURITY_NOT_SATISFIED: u16 = 0x6982;
pub const SW_PIN_BLOCKED: u16 = 0x6983;
pub const SW_WRONG_DATA: u16 = 0x6A80;
pub const SW_FUNCTION_NOT_SUPPORTED: u16 = 0x6A81;
pub const SW_NOT_FOUND: u16 = 0x6A82;
pub const SW_WRONG_P1P2: u16 = 0x6A86;
pub const SW_REFERENCE_NOT_FOUND: u16 = 0x6A88;
pub const SW_INS_NOT_SUPPORTED: u16 = 0x6D00;
pub const SW_CLA_NOT_SUPPORTED: u16 = 0x6E00;
pub const SW_WRONG_LENGTH: u16 = 0x6700;

/// Largest command data in one short APDU; longer data is sent with command chaining.
const CHUNK: usize = 255;

/// A PIV key slot: its key reference and the data object holding its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub key_ref: u8,
    pub cert_object: u32,
}

impl Slot {
    /// The slot of a key reference (9A, 9C, 9D, 9E, or a retired key 82..95).
    pub fn from_key_ref(key_ref: u8) -> Option<Slot> {
        let cert_object = match key_ref {
            0x9A => 0x5F_C1_05,
            0x9C => 0x5F_C1_0A,
            0x9D => 0x5F_C1_0B,
            0x9E => 0x5F_C1_01,
            0x82..=0x95 => 0x5F_C1_0D + u32::from(key_ref - 0x82),
            _ => return None,
        };
        Some(Slot {
            key_ref,
            cert_object,
        })
    }

    /// Parses a slot written in hex, such as "9c".
    pub fn parse(text: &str) -> Result<Slot, String> {
        let byte = u8::from_str_radix(text.trim_start_matches("0x"), 16)
            .map_err(|_| format!("PIV slot {text:?} is not a hex byte"))?;
        Slot::from_key_ref(byte)
            .ok_or_else(|| format!("PIV slot {text:?} is not a key slot (9a, 9c, 9d, 9e, 82..95)"))
    }

    /// The digital signature slot requires the PIN before every use (SP 800-73-4, "PIN
    /// Always").
    pub fn pin_always(self) -> bool {
        self.key_ref == 0x9C
    }
}

/// The status word of a response, and its data.
pub fn split_response(resp: &[u8]) -> Option<(&[u8], u16)> {
    let n = resp.len().checked_sub(2)?;
    Some((&resp[..n], u16::from_be_bytes([resp[n], resp[n + 1]])))
}

/// The command APDUs that carry `data`: several with the chaining bit in CLA when it is longer
/// than one short APDU holds. Each asks for a response of any length (Le = 00).
pub fn command(ins: u8, p1: u8, p2: u8, data: &[u8]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return vec![vec![0x00, ins, p1, p2]];
    }
    let chunks: Vec<&[u8]> = data.chunks(CHUNK).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let cla = if i < last { 0x10 } else { 0x00 };
            let mut apdu = vec![cla, ins, p1, p2, chunk.len() as u8];
            apdu.extend_from_slice(chunk);
            if i == last {
                apdu.push(0x00);
            }
            apdu
        })
        .collect()
}

/// SELECT of the PIV application.
pub fn select() -> Vec<u8> {
    command(INS_SELECT, 0x04, 0x00, &AID).remove(0)
}

/// GET DATA of one object (its tag, 3 bytes).
pub fn get_data(object: u32) -> Vec<Vec<u8>> {
    let tag = object.to_be_bytes();
    command(INS_GET_DATA, 0x3F, 0xFF, &tlv(0x5C, &tag[1..]))
}

/// VERIFY with no data: asks whether the PIN is verified and how many tries are left, without
/// spending one.
pub fn verify_status(pin_ref: u8) -> Vec<u8> {
    vec![0x00, INS_VERIFY, 0x00, pin_ref]
}

/// VERIFY with the PIN, padded to 8 bytes with FF. `None` when the PIN is not 6 to 8 bytes.
pub fn verify(pin_ref: u8, pin: &[u8]) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    if !(6..=8).contains(&pin.len()) {
        return None;
    }
    let mut apdu = zeroize::Zeroizing::new(vec![0x00, INS_VERIFY, 0x00, pin_ref, 8]);
    apdu.extend_from_slice(pin);
    apdu.resize(5 + 8, 0xFF);
    Some(apdu)
}

/// GENERAL AUTHENTICATE asking the card to sign `challenge` (a digest for ECC, a padded block
/// for RSA) with the key in `slot`.
pub fn sign(alg: u8, slot: Slot, challenge: &[u8]) -> Vec<Vec<u8>> {
    let mut inner = tlv(0x82, &[]);
    inner.extend(tlv(0x81, challenge));
    command(
        INS_GENERAL_AUTHENTICATE,
        alg,
        slot.key_ref,
        &tlv(0x7C, &inner),
    )
}

/// Decodes a PIN status word: `Some(tries)` for 63Cx, `Some(0)` for a blocked PIN.
pub fn pin_tries(sw: u16) -> Option<u8> {
    match sw {
        SW_PIN_BLOCKED => Some(0),
        _ if sw & 0xFFF0 == 0x63C0 => Some((sw & 0x0F) as u8),
        _ => None,
    }
}

/// Encodes a BER-TLV with a one- or two-byte tag.
pub fn tlv(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    if tag > 0xFF {
        out.extend_from_slice(&(tag as u16).to_be_bytes());
    } else {
        out.push(tag as u8);
    }
    let n = value.len();
    match n {
        0..=0x7F => out.push(n as u8),
        0x80..=0xFF => out.extend_from_slice(&[0x81, n as u8]),
        _ => {
            out.push(0x82);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(value);
    out
}

/// Reads one BER-TLV: its tag, its value, and what follows. `None` when the bytes are not a
/// whole TLV.
pub fn read_tlv(buf: &[u8]) -> Option<(u32, &[u8], &[u8])> {
    let (&first, mut rest) = buf.split_first()?;
    let mut tag = u32::from(first);
    if first & 0x1F == 0x1F {
        let (&second, r) = rest.split_first()?;
        tag = (tag << 8) | u32::from(second);
        rest = r;
    }
    let (&len0, r) = rest.split_first()?;
    rest = r;
    let len = match len0 {
        0..=0x7F => usize::from(len0),
        0x81 => {
            let (&b, r) = rest.split_first()?;
            rest = r;
            usize::from(b)
        }
        0x82 => {
            let b = rest.get(..2)?;
            rest = &rest[2..];
            usize::from(u16::from_be_bytes([b[0], b[1]]))
        }
        _ => return None,
    };
    let value = rest.get(..len)?;
    Some((tag, value, &rest[len..]))
}

/// The value of the first TLV tagged `tag` in a sequence of TLVs.
pub fn find_tlv(mut buf: &[u8], tag: u32) -> Option<&[u8]> {
    while !buf.is_empty() {
        let (t, v, rest) = read_tlv(buf)?;
        if t == tag {
            return Some(v);
        }
        buf = rest;
    }
    None
}

/// EMSA-PKCS1-v1_5 encoding of a SHA-256 digest for a key of `size` bytes (RFC 8017, 9.2): the
/// block a PIV card's raw RSA operation turns into a PKCS#1 v1.5 signature.
pub fn pkcs1_sha256_block(digest: &[u8; 32], size: usize) -> Option<Vec<u8>> {
    const DIGEST_INFO: [u8; 19] = [
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    let t_len = DIGEST_INFO.len() + digest.len();
    if size < t_len + 11 {
        return None;
    }
    let mut block = vec![0xFF; size];
    block[0] = 0x00;
    block[1] = 0x01;
    block[size - t_len - 1] = 0x00;
    block[size - t_len..size - 32].copy_from_slice(&DIGEST_INFO);
    block[size - 32..].copy_from_slice(digest);
    Some(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlv_round_trips_every_length_form() {
        for n in [0usize, 1, 0x7F, 0x80, 0xFF, 0x100, 1500] {
            let value = vec![0xAB; n];
            for tag in [0x53u32, 0x7F49] {
                let enc = tlv(tag, &value);
                let (t, v, rest) = read_tlv(&enc).unwrap();
                assert_eq!((t, v, rest.len()), (tag, &value[..], 0));
                assert!(read_tlv(&enc[..enc.len() - 1]).is_none() || n == 0);
            }
        }
        assert!(read_tlv(&[0x53, 0x83, 0, 0, 1]).is_none());
    }

    #[test]
    fn long_commands_are_chained() {
        let apdus = command(INS_GENERAL_AUTHENTICATE, 7, 0x9C, &[1; 300]);
        assert_eq!(apdus.len(), 2);
        assert_eq!(apdus[0][0], 0x10);
        assert_eq!(apdus[0][4], 255);
        assert_eq!(apdus[1][0], 0x00);
        assert_eq!(apdus[1][4], 45);
        assert_eq!(*apdus[1].last().unwrap(), 0);
    }

    #[test]
    fn pin_status_words() {
        assert_eq!(pin_tries(0x63C2), Some(2));
        assert_eq!(pin_tries(SW_PIN_BLOCKED), Some(0));
        assert_eq!(pin_tries(SW_OK), None);
        assert!(verify(0x80, b"12345").is_none());
        assert_eq!(&verify(0x80, b"123456").unwrap()[5..], b"123456\xff\xff");
    }

    #[test]
    fn slots() {
        assert_eq!(Slot::parse("9c").unwrap().cert_object, 0x5FC10A);
        assert_eq!(Slot::parse("95").unwrap().cert_object, 0x5FC120);
        assert!(Slot::parse("9b").is_err());
        assert!(Slot::parse("9c").unwrap().pin_always());
    }

    #[test]
    fn pkcs1_block_layout() {
        let b = pkcs1_sha256_block(&[7; 32], 256).unwrap();
        assert_eq!(&b[..3], &[0, 1, 0xFF]);
        assert_eq!(b[256 - 52], 0);
        assert_eq!(&b[256 - 32..], &[7; 32]);
        assert!(pkcs1_sha256_block(&[7; 32], 50).is_none());
    }
}
