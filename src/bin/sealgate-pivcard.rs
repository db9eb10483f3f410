//! sealgate-pivcard: a PIV card, emulated, inserted into a virtual reader of the real `pcscd`
//! through Debian's `vsmartcard-vpcd` driver. For tests and demos: it holds real keys (P-256 or
//! RSA-2048, from PKCS#8 files) and answers real APDUs: SELECT, GET DATA (CHUID, certificates),
//! VERIFY (with a real retry counter, a blocked state), GENERAL AUTHENTICATE, GET RESPONSE,
//! command chaining, and YubiKey's GET SERIAL.
//!
//! The vpcd link: the card connects over TCP to the reader's port (35963 for the first reader,
//! one more for each next one); every message is a 2-byte big-endian length and its bytes. A
//! 1-byte message from the reader is a control (0 power off, 1 power on, 2 reset, 4 send the
//! ATR); any longer one is a command APDU, answered with the response APDU. Closing the link is
//! pulling the card out.
//!
//! Standard input takes commands, one per line: `remove`, `insert`, `delay MS` (hold every
//! signature back that long; a `remove` meanwhile pulls the card before it answers),
//! `pin-delay MS` (hold every PIN check back that long, with its try already spent, as a real
//! card spends it before comparing so that pulling the card cannot test PINs for free; pulled
//! meanwhile, the try stays spent), `status`. Standard output reports events as `key=value`
//! lines: `inserted`, `removed`, `verify ...` (`verify=held` while a PIN check is held back),
//! `signed slot=..`, and the answer to `status`.

/// The FASC-N that non-federal PIV cards (PIV-I, PIV compatible) carry: agency code 9999,
/// system code 9999, credential number 999999, in the standard's 5-bit BCD with parity
/// (SP 800-73-4 Part 1 and the PIV-I profile). Readers such as OpenSC see agency 9999 and take
/// the card's identity (and a token's serial) from the GUID instead, so each emulated card is
/// its own token.
const FASCN_NON_FEDERAL: [u8; 25] = [
    0xD4, 0xE7, 0x39, 0xDA, 0x73, 0x9C, 0xED, 0x39, 0xCE, 0x73, 0x9D, 0x83, 0x68, 0x58, 0x21, 0x08,
    0x42, 0x10, 0x84, 0x21, 0xC8, 0x42, 0x10, 0xC3, 0xEB,
];

use clap::Parser;
use sealgate::device::piv::{self, Slot};
use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    version,
    about = "An emulated PIV card in a vsmartcard-vpcd reader of pcscd"
)]
struct Args {
    /// The vpcd reader's port: 35963 is the first virtual reader, 35964 the second, and so on.
    #[arg(long, default_value_t = 35963)]
    port: u16,
    /// The card's PIN (6 to 8 characters).
    #[arg(long, env = "PIVCARD_PIN", hide_env_values = true)]
    pin: String,
    /// PIN tries before the PIN blocks; also the tries left at start unless --tries-left says.
    #[arg(long, default_value_t = 3)]
    pin_tries: u8,
    /// Tries left at start (0: the PIN is blocked).
    #[arg(long)]
    tries_left: Option<u8>,
    /// The GUID of the card's CHUID, 32 hex digits.
    #[arg(long)]
    guid: String,
    /// A YubiKey serial number to answer GET SERIAL with; without it GET SERIAL is unknown.
    #[arg(long)]
    serial: Option<u32>,
    /// A key slot: SLOT=KEY,CERT with the slot in hex (9c), the private key as PKCS#8 PEM (P-256
    /// or RSA-2048) and its certificate as PEM or DER. Repeatable.
    #[arg(long = "slot", value_name = "SLOT=KEY,CERT", required = true)]
    slots: Vec<String>,
    /// Start out of the reader; `insert` on standard input puts the card in.
    #[arg(long)]
    absent: bool,
}

enum Key {
    P256(p256::ecdsa::SigningKey),
    Rsa(Box<rsa::RsaPrivateKey>),
}

struct SlotData {
    key: Key,
    cert: Vec<u8>,
}

/// The card's state, as a real card keeps it.
struct Card {
    pin: Zeroizing<Vec<u8>>,
    max_tries: u8,
    tries_left: u8,
    selected: bool,
    pin_verified: bool,
    guid: [u8; 16],
    serial: Option<u32>,
    slots: HashMap<u8, SlotData>,
    /// Data of a chained command so far.
    chain: Vec<u8>,
    /// Response data not yet fetched with GET RESPONSE.
    pending: Vec<u8>,
    signatures: u64,
}

/// What the control thread tells the card thread.
struct Control {
    want_inserted: AtomicBool,
    delay_ms: AtomicU64,
    pin_delay_ms: AtomicU64,
    link: Mutex<Option<TcpStream>>,
}

const ATR_HISTORICAL: &[u8] = b"sealgate";

fn main() {
    let args = Args::parse();
    let card = match build_card(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sealgate-pivcard: {e}");
            std::process::exit(2);
        }
    };
    let card = Arc::new(Mutex::new(card));
    let control = Arc::new(Control {
        want_inserted: AtomicBool::new(!args.absent),
        delay_ms: AtomicU64::new(0),
        pin_delay_ms: AtomicU64::new(0),
        link: Mutex::new(None),
    });
    {
        let (card, control) = (card.clone(), control.clone());
        let port = args.port;
        std::thread::spawn(move || serve(port, &card, &control));
    }
    say("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("remove"), None) => {
                control.want_inserted.store(false, Ordering::SeqCst);
                if let Some(link) = lock(&control.link).take() {
                    let _ = link.shutdown(std::net::Shutdown::Both);
                }
            }
            (Some("insert"), None) => control.want_inserted.store(true, Ordering::SeqCst),
            (Some("delay"), Some(ms)) => match ms.parse() {
                Ok(ms) => control.delay_ms.store(ms, Ordering::SeqCst),
                Err(_) => say("error=bad delay"),
            },
            (Some("pin-delay"), Some(ms)) => match ms.parse() {
                Ok(ms) => control.pin_delay_ms.store(ms, Ordering::SeqCst),
                Err(_) => say("error=bad delay"),
            },
            (Some("status"), None) => {
                let c = lock(&card);
                say(&format!(
                    "status tries_left={} verified={} signatures={}",
                    c.tries_left, c.pin_verified, c.signatures
                ));
            }
            (None, _) => {}
            _ => say(&format!("error=unknown command {line:?}")),
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn build_card(args: &Args) -> Result<Card, String> {
    if !(6..=8).contains(&args.pin.len()) {
        return Err("the PIN is 6 to 8 characters".into());
    }
    let guid: [u8; 16] = hex::decode(&args.guid)
        .ok()
        .and_then(|g| g.try_into().ok())
        .ok_or("--guid is 32 hex digits")?;
    let mut slots = HashMap::new();
    for spec in &args.slots {
        let (slot, files) = spec
            .split_once('=')
            .ok_or_else(|| format!("--slot {spec:?} is not SLOT=KEY,CERT"))?;
        let (key, cert) = files
            .split_once(',')
            .ok_or_else(|| format!("--slot {spec:?} is not SLOT=KEY,CERT"))?;
        let slot = Slot::parse(slot)?;
        slots.insert(
            slot.key_ref,
            SlotData {
                key: load_key(&PathBuf::from(key))?,
                cert: load_cert(&PathBuf::from(cert))?,
            },
        );
    }
    Ok(Card {
        pin: Zeroizing::new(args.pin.as_bytes().to_vec()),
        max_tries: args.pin_tries,
        tries_left: args.tries_left.unwrap_or(args.pin_tries),
        selected: false,
        pin_verified: false,
        guid,
        serial: args.serial,
        slots,
        chain: Vec::new(),
        pending: Vec::new(),
        signatures: 0,
    })
}

fn load_key(path: &PathBuf) -> Result<Key, String> {
    use p256::pkcs8::DecodePrivateKey;
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let (_, der) = pem_rfc7468::decode_vec(text.as_bytes())
        .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
    let der = Zeroizing::new(der);
    if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_der(&der) {
        return Ok(Key::P256(k));
    }
    match rsa::RsaPrivateKey::from_pkcs8_der(&der) {
        Ok(k) if rsa::traits::PublicKeyParts::size(&k) == 256 => Ok(Key::Rsa(Box::new(k))),
        Ok(_) => Err(format!("{}: only 2048-bit RSA keys", path.display())),
        Err(_) => Err(format!(
            "{}: not a PKCS#8 P-256 or RSA private key",
            path.display()
        )),
    }
}

fn load_cert(path: &PathBuf) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.starts_with(b"-----BEGIN") {
        let (_, der) = pem_rfc7468::decode_vec(&bytes)
            .map_err(|e| format!("{}: not PEM: {e}", path.display()))?;
        Ok(der)
    } else {
        Ok(bytes)
    }
}

/// Keeps the card in the reader while it is wanted there: connects to vpcd, answers it, and
/// connects again when the link drops (pcscd restarted) unless the card was pulled.
fn serve(port: u16, card: &Mutex<Card>, control: &Control) {
    loop {
        if !control.want_inserted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let stream = match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match stream.try_clone() {
            Ok(c) => *lock(&control.link) = Some(c),
            Err(_) => continue,
        }
        {
            // A card leaves its security state behind when it is pulled.
            let mut c = lock(card);
            c.selected = false;
            c.pin_verified = false;
        }
        say("inserted");
        let _ = link(stream, card, control);
        lock(&control.link).take();
        say("removed");
    }
}

/// One stay in the reader: answers vpcd until the link closes.
fn link(mut stream: TcpStream, card: &Mutex<Card>, control: &Control) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut msg)?;
        let reply = match msg.as_slice() {
            [] => continue,
            [0] | [2] => {
                // Power off, or reset: the security state is gone.
                let mut c = lock(card);
                c.selected = false;
                c.pin_verified = false;
                c.chain.clear();
                c.pending.clear();
                continue;
            }
            [1] => continue,
            [4] => atr(),
            [_] => continue,
            apdu => {
                let signing =
                    apdu.get(1) == Some(&piv::INS_GENERAL_AUTHENTICATE) && apdu[0] & 0x10 == 0;
                if signing && !hold_back(control, &control.delay_ms) {
                    // Pulled while signing: the reader gets no answer.
                    return Ok(());
                }
                let presenting = apdu.get(1) == Some(&piv::INS_VERIFY) && apdu.len() > 5;
                if presenting && control.pin_delay_ms.load(Ordering::SeqCst) > 0 {
                    let spent = {
                        let mut c = lock(card);
                        let spent = c.tries_left > 0;
                        c.tries_left = c.tries_left.saturating_sub(1);
                        say(&format!("verify=held tries_left={}", c.tries_left));
                        spent
                    };
                    if !hold_back(control, &control.pin_delay_ms) {
                        // Pulled mid-check: no answer, and the try stays spent.
                        return Ok(());
                    }
                    if spent {
                        lock(card).tries_left += 1;
                    }
                }
                lock(card).respond(apdu)
            }
        };
        let mut out = (reply.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&reply);
        stream.write_all(&out)?;
    }
}

/// Waits out a configured delay; false when the card was pulled meanwhile.
fn hold_back(control: &Control, delay_ms: &AtomicU64) -> bool {
    let delay = Duration::from_millis(delay_ms.load(Ordering::SeqCst));
    let start = Instant::now();
    while start.elapsed() < delay {
        if !control.want_inserted.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    control.want_inserted.load(Ordering::SeqCst)
}

/// A T=1 ATR: TS, T0 (TD1 follows, 8 historical bytes), TD1 (T=1), the historical bytes, TCK.
fn atr() -> Vec<u8> {
    let mut atr = vec![0x3B, 0x80 | ATR_HISTORICAL.len() as u8, 0x01];
    atr.extend_from_slice(ATR_HISTORICAL);
    let tck = atr[1..].iter().fold(0u8, |a, b| a ^ b);
    atr.push(tck);
    atr
}

fn sw(code: u16) -> Vec<u8> {
    code.to_be_bytes().to_vec()
}

impl Card {
    /// Answers one command APDU.
    fn respond(&mut self, apdu: &[u8]) -> Vec<u8> {
        let Some((cla, ins, p1, p2, data)) = parse_apdu(apdu) else {
            return sw(piv::SW_WRONG_LENGTH);
        };
        if cla & !0x10 != 0 {
            return sw(piv::SW_CLA_NOT_SUPPORTED);
        }
        if ins == piv::INS_GET_RESPONSE {
            return self.next_part();
        }
        self.pending.clear();
        if cla & 0x10 != 0 {
            self.chain.extend_from_slice(data);
            return sw(piv::SW_OK);
        }
        let mut whole = std::mem::take(&mut self.chain);
        whole.extend_from_slice(data);
        let (body, status) = match ins {
            piv::INS_SELECT => self.select(p1, &whole),
            _ if !self.selected => (Vec::new(), piv::SW_INS_NOT_SUPPORTED),
            piv::INS_GET_DATA => self.get_data(p1, p2, &whole),
            piv::INS_VERIFY => self.verify(p1, p2, &whole),
            piv::INS_GENERAL_AUTHENTICATE => self.general_authenticate(p1, p2, &whole),
            piv::INS_YUBIKEY_SERIAL => match self.serial {
                Some(s) => (s.to_be_bytes().to_vec(), piv::SW_OK),
                None => (Vec::new(), piv::SW_INS_NOT_SUPPORTED),
            },
            _ => (Vec::new(), piv::SW_INS_NOT_SUPPORTED),
        };
        if status != piv::SW_OK {
            return sw(status);
        }
        self.pending = body;
        self.next_part()
    }

    /// The next (at most 256-byte) part of the pending response, with 61xx when more follows.
    fn next_part(&mut self) -> Vec<u8> {
        let n = self.pending.len().min(256);
        let mut out: Vec<u8> = self.pending.drain(..n).collect();
        let left = self.pending.len();
        if left == 0 {
            out.extend(sw(piv::SW_OK));
        } else {
            out.extend(sw(0x6100 | left.min(255) as u16));
        }
        out
    }

    fn select(&mut self, p1: u8, aid: &[u8]) -> (Vec<u8>, u16) {
        if p1 != 0x04 || aid.len() < 5 || !piv::AID.starts_with(aid) {
            self.selected = false;
            return (Vec::new(), piv::SW_NOT_FOUND);
        }
        self.selected = true;
        // The application property template: the PIV AID's tail and the authority.
        let mut apt = piv::tlv(0x4F, &piv::AID[5..]);
        apt.extend(piv::tlv(0x79, &piv::tlv(0x4F, &piv::AID[..5])));
        (piv::tlv(0x61, &apt), piv::SW_OK)
    }

    fn get_data(&self, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
        if (p1, p2) != (0x3F, 0xFF) {
            return (Vec::new(), piv::SW_WRONG_P1P2);
        }
        let Some((0x5C, tag, _)) = piv::read_tlv(data) else {
            return (Vec::new(), piv::SW_WRONG_DATA);
        };
        let object = tag.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b));
        let content = if object == piv::OBJ_CHUID {
            let mut c = piv::tlv(0x30, &FASCN_NON_FEDERAL);
            c.extend(piv::tlv(piv::CHUID_GUID, &self.guid));
            c.extend(piv::tlv(0x35, b"20991231"));
            c.extend(piv::tlv(0x3E, &[]));
            c.extend(piv::tlv(0xFE, &[]));
            c
        } else if let Some(slot) = self
            .slots
            .iter()
            .find(|(k, _)| Slot::from_key_ref(**k).is_some_and(|s| s.cert_object == object))
        {
            let mut c = piv::tlv(0x70, &slot.1.cert);
            c.extend(piv::tlv(0x71, &[0x00]));
            c.extend(piv::tlv(0xFE, &[]));
            c
        } else {
            return (Vec::new(), piv::SW_NOT_FOUND);
        };
        (piv::tlv(0x53, &content), piv::SW_OK)
    }

    fn verify(&mut self, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
        if p1 != 0 || !(p2 == piv::PIN_APPLICATION || p2 == piv::PIN_GLOBAL) {
            return (Vec::new(), piv::SW_REFERENCE_NOT_FOUND);
        }
        let tries = |left: u8| {
            if left == 0 {
                piv::SW_PIN_BLOCKED
            } else {
                0x63C0 | u16::from(left.min(15))
            }
        };
        if data.is_empty() {
            let status = match (self.pin_verified, self.tries_left) {
                (_, 0) => piv::SW_PIN_BLOCKED,
                (true, _) => piv::SW_OK,
                (false, left) => tries(left),
            };
            return (Vec::new(), status);
        }
        if self.tries_left == 0 {
            say("verify=blocked");
            return (Vec::new(), piv::SW_PIN_BLOCKED);
        }
        if data.len() != 8 {
            return (Vec::new(), piv::SW_WRONG_DATA);
        }
        let given: Vec<u8> = data.iter().copied().take_while(|b| *b != 0xFF).collect();
        if given.as_slice() == self.pin.as_slice() {
            self.tries_left = self.max_tries;
            self.pin_verified = true;
            say("verify=ok");
            (Vec::new(), piv::SW_OK)
        } else {
            self.tries_left -= 1;
            self.pin_verified = false;
            say(&format!("verify=wrong tries_left={}", self.tries_left));
            (Vec::new(), tries(self.tries_left))
        }
    }

    fn general_authenticate(&mut self, alg: u8, key_ref: u8, data: &[u8]) -> (Vec<u8>, u16) {
        let Some(slot) = self.slots.get(&key_ref) else {
            return (Vec::new(), piv::SW_REFERENCE_NOT_FOUND);
        };
        let challenge = match piv::read_tlv(data) {
            Some((0x7C, template, _)) => piv::find_tlv(template, 0x81),
            _ => None,
        };
        let Some(challenge) = challenge else {
            return (Vec::new(), piv::SW_WRONG_DATA);
        };
        if !self.pin_verified {
            return (Vec::new(), piv::SW_SECURITY_NOT_SATISFIED);
        }
        let signature = match (&slot.key, alg) {
            (Key::P256(k), piv::ALG_ECC_P256) if challenge.len() == 32 => {
                use p256::ecdsa::signature::hazmat::PrehashSigner;
                let sig: Result<p256::ecdsa::Signature, _> = k.sign_prehash(challenge);
                match sig {
                    Ok(s) => s.to_der().as_bytes().to_vec(),
                    Err(_) => return (Vec::new(), piv::SW_WRONG_DATA),
                }
            }
            (Key::Rsa(k), piv::ALG_RSA_2048) if challenge.len() == 256 => {
                let c = rsa::BigUint::from_bytes_be(challenge);
                match rsa::hazmat::rsa_decrypt_and_check(
                    k.as_ref(),
                    Some(&mut rsa::rand_core::OsRng),
                    &c,
                ) {
                    Ok(m) => {
                        let bytes = m.to_bytes_be();
                        let mut out = vec![0u8; 256 - bytes.len()];
                        out.extend_from_slice(&bytes);
                        out
                    }
                    Err(_) => return (Vec::new(), piv::SW_WRONG_DATA),
                }
            }
            _ => return (Vec::new(), piv::SW_WRONG_DATA),
        };
        // The digital signature key needs the PIN again before its next use.
        if Slot::from_key_ref(key_ref).is_some_and(Slot::pin_always) {
            self.pin_verified = false;
        }
        self.signatures += 1;
        say(&format!("signed slot={key_ref:02x}"));
        (piv::tlv(0x7C, &piv::tlv(0x82, &signature)), piv::SW_OK)
    }
}

/// Splits a short command APDU into CLA, INS, P1, P2 and its data.
fn parse_apdu(apdu: &[u8]) -> Option<(u8, u8, u8, u8, &[u8])> {
    let (&[cla, ins, p1, p2], rest) = apdu.split_first_chunk::<4>()?;
    let data: &[u8] = match rest {
        [] | [_] => &[],
        [lc, body @ ..] => {
            let lc = usize::from(*lc);
            // Data, and an Le byte or none.
            if body.len() != lc && body.len() != lc + 1 {
                return None;
            }
            &body[..lc]
        }
    };
    Some((cla, ins, p1, p2, data))
}
