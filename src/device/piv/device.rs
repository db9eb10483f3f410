//! The PC/SC seal device: a PIV card or USB token in a reader, reached through the system's
//! `pcscd` with libpcsclite.
//!
//! The card is bound by its identity (CHUID GUID or YubiKey serial), not by the reader it sits
//! in: every connection attempt looks through all readers the profile's patterns match, so the
//! card may come back in another reader, or in a reader that appeared after start-up.
//!
//! Access is shared: the connection is opened in shared mode and each operation is one short
//! transaction (SELECT, PIN, sign), so other software on the machine can use the card between
//! stamps. Because of that the PIV application is selected again in every transaction, and a
//! verified PIN is not left behind for others: the signature slot (9C) consumes its verification
//! with the signature; for any other slot the transaction ends with a card reset.
//!
//! PIN safety: the tries left are read (VERIFY with no data, which spends nothing) before every
//! verification; with `keep_pin_tries` or fewer left the daemon does not verify at all. A PIN
//! the card refuses is never presented again by this process.

use super::{Slot, ALG_ECC_P256, ALG_RSA_2048, CHUID_GUID, OBJ_CHUID, SW_OK};
use crate::config::DeviceConfig;
use crate::device::profile::{CardIdentity, DeviceProfile, PivProfile};
use crate::device::{Algorithm, DeviceError, Health, KeySpec, SealDevice, SealKey};
use pcsc::{Context, Disposition, Protocols, Scope, ShareMode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// A PIV card holding one or more seal keys, each in a slot.
pub struct PivDevice {
    id: String,
    profile: DeviceProfile,
    piv: PivProfile,
    patterns: Vec<glob::Pattern>,
    /// The identity of the one card this device is, as configured (lower case).
    card_id: String,
    pin: Zeroizing<Vec<u8>>,
    pin_ref: u8,
    slots: Vec<Slot>,
    keys: Vec<SealKey>,
    conn: Mutex<Option<Conn>>,
    /// What `health` reports; updated whenever the connection or the PIN state changes.
    health: RwLock<Health>,
    /// Set once the card refused the PIN, was blocked, or was too low on tries to verify: no
    /// automatic verification until the daemon restarts.
    pin_refusal: Mutex<Option<DeviceError>>,
    pin_low: AtomicBool,
    last_attempt: Mutex<Option<Instant>>,
}

struct Conn {
    /// Kept alive for as long as the card handle; a card belongs to its context.
    _ctx: Context,
    card: pcsc::Card,
    reader: String,
}

/// Why an exchange with the card stopped.
enum Fault {
    /// The card, reader or service went away (removed, reset mid-operation, pcscd stopped).
    Lost(String),
    /// The card answered with an error status word.
    Status(u16, &'static str),
    /// The PIN state forbids going on; the error says why.
    Pin(DeviceError),
    /// The card answered with data that is not what PIV defines.
    Garbled(String),
}

impl From<pcsc::Error> for Fault {
    fn from(e: pcsc::Error) -> Fault {
        Fault::Lost(e.to_string())
    }
}

impl PivDevice {
    /// Opens the device: finds its card, reads each slot's certificate and public key. The card
    /// must be present at start-up, since the seals' public keys come from it; the PIN is not
    /// presented until the first signature.
    pub fn open(
        config: &DeviceConfig,
        profile: DeviceProfile,
        specs: Vec<KeySpec>,
    ) -> Result<PivDevice, DeviceError> {
        let setup = |m: String| DeviceError::Setup(format!("device {:?}: {m}", config.id));
        let piv = profile
            .piv
            .clone()
            .expect("PIV profiles are checked to have a [piv] table");
        let card_id = config
            .card_id
            .clone()
            .ok_or_else(|| setup("set card_id, the identity of the card it is".into()))?
            .to_ascii_lowercase();
        let patterns =
            match &config.reader {
                Some(r) => vec![glob::Pattern::new(r)
                    .map_err(|e| setup(format!("reader pattern {r:?}: {e}")))?],
                None => piv
                    .readers
                    .iter()
                    .map(|r| glob::Pattern::new(r).expect("checked on load"))
                    .collect(),
            };
        let mut slots = Vec::new();
        for spec in &specs {
            let slot = match spec.id.as_deref() {
                Some([byte]) => Slot::from_key_ref(*byte),
                _ => None,
            }
            .ok_or_else(|| {
                setup(format!(
                    "key {spec}: a PIV key is named by its slot as key_id (one of {})",
                    piv.slots.join(", ")
                ))
            })?;
            if !piv
                .slots
                .iter()
                .any(|s| Slot::parse(s).is_ok_and(|s| s == slot))
            {
                return Err(setup(format!(
                    "slot {:02x} is not among the slots of profile {:?} ({})",
                    slot.key_ref,
                    profile.name,
                    piv.slots.join(", ")
                )));
            }
            slots.push(slot);
        }
        let pin = config
            .read_pin()
            .map_err(|e| DeviceError::Setup(e.to_string()))?;
        let pin = Zeroizing::new(pin.expose().as_bytes().to_vec());
        if super::verify(0x80, &pin).is_none() {
            return Err(setup("a PIV PIN is 6 to 8 characters".into()));
        }
        let pin_ref = u8::from_str_radix(&piv.pin_reference, 16).expect("checked on load");
        let mut device = PivDevice {
            id: config.id.clone(),
            patterns,
            card_id,
            pin,
            pin_ref,
            slots,
            keys: Vec::new(),
            conn: Mutex::new(None),
            health: RwLock::new(Health::Unavailable("not yet connected".into())),
            pin_refusal: Mutex::new(None),
            pin_low: AtomicBool::new(false),
            last_attempt: Mutex::new(None),
            piv,
            profile,
        };
        let mut conn = device.connect().map_err(setup)?;
        let keys = read_keys(
            &mut conn.card,
            &device.slots,
            specs.iter().map(|s| s.algorithm),
        )
        .map_err(|f| setup(describe(f)))?;
        *device.conn.get_mut().expect("not shared yet") = Some(conn);
        device.keys = keys;
        *device.health.get_mut().expect("not shared yet") = Health::Ready;
        Ok(device)
    }

    /// Looks through the matching readers for the card with this device's identity.
    fn connect(&self) -> Result<Conn, String> {
        let ctx = Context::establish(Scope::System)
            .map_err(|e| format!("the PC/SC service (pcscd) cannot be reached: {e}"))?;
        let readers = match ctx.list_readers_owned() {
            Ok(r) => r,
            Err(pcsc::Error::NoReadersAvailable) => Vec::new(),
            Err(e) => return Err(format!("cannot list readers: {e}")),
        };
        let mut seen = Vec::new();
        for name in &readers {
            let reader = name.to_string_lossy().into_owned();
            if !self.patterns.iter().any(|p| p.matches(&reader)) {
                continue;
            }
            let mut card = match ctx.connect(name, ShareMode::Shared, Protocols::ANY) {
                Ok(card) => card,
                Err(pcsc::Error::NoSmartcard) | Err(pcsc::Error::RemovedCard) => {
                    seen.push(format!("{reader:?}: empty"));
                    continue;
                }
                Err(e) => {
                    seen.push(format!("{reader:?}: {e}"));
                    continue;
                }
            };
            let identity = match card.transaction() {
                Ok(tx) => select(&tx).and_then(|()| self.read_identity(&tx)),
                Err(e) => Err(Fault::from(e)),
            };
            match identity {
                Ok(id) if id == self.card_id => {
                    return Ok(Conn {
                        _ctx: ctx,
                        card,
                        reader,
                    })
                }
                Ok(id) => seen.push(format!("{reader:?}: another card ({id})")),
                Err(f) => seen.push(format!("{reader:?}: {}", describe(f))),
            }
            // Someone else's card: leave it as it was (dropping the handle would reset it).
            let _ = card.disconnect(Disposition::LeaveCard);
        }
        Err(format!(
            "card {} is in no reader matching {} (seen: {})",
            self.card_id,
            self.patterns
                .iter()
                .map(|p| format!("{:?}", p.as_str()))
                .collect::<Vec<_>>()
                .join(", "),
            if seen.is_empty() {
                "no matching reader".to_string()
            } else {
                seen.join("; ")
            }
        ))
    }

    fn read_identity(&self, tx: &pcsc::Transaction) -> Result<String, Fault> {
        match self.piv.identity {
            CardIdentity::ChuidGuid => {
                let chuid = get_object(tx, OBJ_CHUID)?;
                let guid = super::find_tlv(&chuid, CHUID_GUID)
                    .ok_or_else(|| Fault::Garbled("the CHUID has no GUID".into()))?;
                Ok(hex::encode(guid))
            }
            CardIdentity::YubikeySerial => {
                let (data, sw) = exchange(tx, &[vec![0x00, super::INS_YUBIKEY_SERIAL, 0, 0]])?;
                match <[u8; 4]>::try_from(data.as_slice()) {
                    Ok(b) if sw == SW_OK => Ok(u32::from_be_bytes(b).to_string()),
                    _ => Err(Fault::Status(sw, "GET SERIAL")),
                }
            }
        }
    }

    fn set_health(&self, health: Health) {
        *self.health.write().unwrap_or_else(|p| p.into_inner()) = health;
    }

    fn unavailable(&self, reason: &str) -> DeviceError {
        DeviceError::Unavailable(format!("device {:?} is unavailable: {reason}", self.id))
    }

    /// Drops the connection after the card went away.
    fn lose(&self, conn: &mut Option<Conn>, reason: &str) {
        if let Some(c) = conn.take() {
            tracing::warn!(device = %self.id, reader = %c.reader, %reason, "card unavailable");
        }
        self.set_health(Health::Unavailable(reason.to_owned()));
    }

    fn refuse_pin(&self, error: DeviceError) -> Fault {
        tracing::warn!(device = %self.id, reason = %error, "PIN not presented again");
        self.pin_low.store(true, Ordering::Relaxed);
        *self.pin_refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.clone());
        self.set_health(Health::Unavailable(error.to_string()));
        Fault::Pin(error)
    }

    /// Makes sure the PIN is verified for one use of `slot`, spending a try only when more than
    /// `keep_pin_tries` are left.
    fn verify_pin(&self, tx: &pcsc::Transaction, slot: Slot) -> Result<(), Fault> {
        let (_, sw) = exchange(tx, &[super::verify_status(self.pin_ref)])?;
        let tries = match sw {
            SW_OK if !slot.pin_always() => return Ok(()),
            SW_OK => None,
            _ => match super::pin_tries(sw) {
                Some(t) => Some(t),
                None => return Err(Fault::Status(sw, "VERIFY")),
            },
        };
        if let Some(t) = tries {
            self.note_tries(t);
            if t == 0 {
                return Err(self.refuse_pin(self.blocked()));
            }
            if t <= self.piv.keep_pin_tries {
                return Err(self.refuse_pin(DeviceError::PinInvalid(format!(
                    "device {:?}: the card has {t} PIN tries left; the daemon leaves the last {} to a person and does not verify",
                    self.id, self.piv.keep_pin_tries
                ))));
            }
        }
        let apdu = super::verify(self.pin_ref, &self.pin).expect("length checked at open");
        let (_, sw) = exchange(tx, std::slice::from_ref(&*apdu))?;
        match (sw, super::pin_tries(sw)) {
            (SW_OK, _) => Ok(()),
            (_, Some(0)) => Err(self.refuse_pin(self.blocked())),
            (_, Some(left)) => {
                self.note_tries(left);
                Err(self.refuse_pin(DeviceError::PinInvalid(format!(
                    "device {:?}: the card refused the PIN (wrong PIN), {left} tries left; it is not presented again until the daemon restarts",
                    self.id
                ))))
            }
            _ => Err(Fault::Status(sw, "VERIFY")),
        }
    }

    fn blocked(&self) -> DeviceError {
        DeviceError::PinBlocked(format!(
            "device {:?}: the card's PIN is blocked; unblock it with the PUK",
            self.id
        ))
    }

    fn note_tries(&self, left: u8) {
        self.pin_low
            .store(left <= self.piv.keep_pin_tries + 1, Ordering::Relaxed);
    }

    /// One signature in one transaction: SELECT, PIN, GENERAL AUTHENTICATE.
    fn sign_once(
        &self,
        card: &mut pcsc::Card,
        key: usize,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, Fault> {
        match card.transaction() {
            Ok(tx) => return self.sign_in(tx, key, digest),
            Err(pcsc::Error::ResetCard) => {}
            Err(e) => return Err(e.into()),
        }
        // Someone reset the card since our last transaction (or we did, to clear the PIN):
        // the connection only needs to be told so.
        card.reconnect(ShareMode::Shared, Protocols::ANY, Disposition::LeaveCard)?;
        self.sign_in(card.transaction()?, key, digest)
    }

    fn sign_in(
        &self,
        tx: pcsc::Transaction<'_>,
        key: usize,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, Fault> {
        let slot = self.slots[key];
        select(&tx)?;
        self.verify_pin(&tx, slot)?;
        let result = match self.keys[key].algorithm {
            Algorithm::EcdsaP256Sha256 => general_authenticate(&tx, ALG_ECC_P256, slot, digest),
            Algorithm::RsaPkcs1Sha256 => {
                let block = super::pkcs1_sha256_block(digest, 256).expect("2048-bit key");
                general_authenticate(&tx, ALG_RSA_2048, slot, &block)
            }
            other => Err(Fault::Garbled(format!(
                "{} is not a PIV algorithm",
                other.name()
            ))),
        };
        let disposition = if slot.pin_always() && result.is_ok() {
            Disposition::LeaveCard
        } else {
            Disposition::ResetCard
        };
        if let Err((_, e)) = tx.end(disposition) {
            if result.is_ok() {
                tracing::debug!(device = %self.id, error = %e, "ending the transaction failed");
            }
        }
        result
    }
}

impl SealDevice for PivDevice {
    fn id(&self) -> &str {
        &self.id
    }

    fn profile(&self) -> &DeviceProfile {
        &self.profile
    }

    fn health(&self) -> Health {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn key(&self, key: usize) -> &SealKey {
        &self.keys[key]
    }

    fn sign(&self, key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, DeviceError> {
        if let Some(refusal) = self.pin_refusal() {
            return Err(refusal);
        }
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            self.reconnect(&mut conn)?;
        }
        let c = conn.as_mut().expect("connected above");
        match self.sign_once(&mut c.card, key, digest) {
            Ok(sig) => Ok(sig),
            Err(Fault::Lost(reason)) => {
                let reason =
                    format!("the card was removed or reset during the operation ({reason})");
                self.lose(&mut conn, &reason);
                Err(self.unavailable(&reason))
            }
            Err(Fault::Pin(e)) => Err(e),
            Err(f) => Err(DeviceError::Failed(format!(
                "device {:?}: {}",
                self.id,
                describe(f)
            ))),
        }
    }

    fn recover(&self) {
        if self.pin_refusal().is_some() {
            return;
        }
        {
            let mut last = self.last_attempt.lock().unwrap_or_else(|p| p.into_inner());
            let pause = Duration::from_millis(self.piv.retry_interval_ms);
            if last.is_some_and(|t| t.elapsed() < pause) {
                return;
            }
            *last = Some(Instant::now());
        }
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            let _ = self.reconnect(&mut conn);
        }
    }

    fn probe(&self) {
        // A stamp in progress already tells whether the card is there.
        let Ok(mut conn) = self.conn.try_lock() else {
            return;
        };
        let Some(c) = conn.as_mut() else {
            return;
        };
        let status = match c.card.transaction() {
            Ok(tx) => select(&tx).and_then(|()| {
                let (_, sw) = exchange(&tx, &[super::verify_status(self.pin_ref)])?;
                Ok(sw)
            }),
            // A reset by other software is not a loss; the next stamp reconnects.
            Err(pcsc::Error::ResetCard) => return,
            Err(e) => Err(e.into()),
        };
        match status {
            Ok(sw) => {
                if let Some(t) = super::pin_tries(sw) {
                    self.note_tries(t);
                }
            }
            Err(Fault::Lost(reason)) => {
                self.lose(&mut conn, &format!("the card is gone ({reason})"))
            }
            Err(_) => {}
        }
    }

    fn serial(&self) -> String {
        self.card_id.clone()
    }

    fn pin_refusal(&self) -> Option<DeviceError> {
        self.pin_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn pin_tries_low(&self) -> bool {
        self.pin_low.load(Ordering::Relaxed)
    }

    fn parallelism(&self) -> usize {
        1
    }
}

impl PivDevice {
    /// Finds the card again and checks it still holds the keys read at start-up.
    fn reconnect(&self, conn: &mut Option<Conn>) -> Result<(), DeviceError> {
        let mut c = self.connect().map_err(|reason| {
            self.set_health(Health::Unavailable(reason.clone()));
            self.unavailable(&reason)
        })?;
        let algorithms = self.keys.iter().map(|k| k.algorithm);
        let checked = read_keys(&mut c.card, &self.slots, algorithms).and_then(|now| {
            match self
                .slots
                .iter()
                .zip(&self.keys)
                .zip(&now)
                .find(|((_, was), now)| was.spki_der != now.spki_der)
            {
                Some(((slot, _), _)) => Err(Fault::Garbled(format!(
                    "slot {:02x} now holds another key than at start-up",
                    slot.key_ref
                ))),
                None => Ok(()),
            }
        });
        if let Err(f) = checked {
            let reason = describe(f);
            self.set_health(Health::Unavailable(reason.clone()));
            return Err(self.unavailable(&reason));
        }
        tracing::info!(device = %self.id, reader = %c.reader, "card connected");
        *conn = Some(c);
        self.set_health(Health::Ready);
        Ok(())
    }
}

fn describe(f: Fault) -> String {
    match f {
        Fault::Lost(r) => format!("the card went away ({r})"),
        Fault::Status(sw, what) => format!("the card answered {what} with status {sw:04X}"),
        Fault::Pin(e) => e.to_string(),
        Fault::Garbled(m) => m,
    }
}

/// Sends the APDUs of one command (several when chained) and collects the whole response,
/// following 61xx with GET RESPONSE.
fn exchange(tx: &pcsc::Transaction, apdus: &[Vec<u8>]) -> Result<(Vec<u8>, u16), Fault> {
    let mut buf = vec![0u8; pcsc::MAX_BUFFER_SIZE_EXTENDED];
    let mut out = Vec::new();
    let mut sw = SW_OK;
    for (i, apdu) in apdus.iter().enumerate() {
        let resp = tx.transmit(apdu, &mut buf)?;
        let (data, s) = super::split_response(resp)
            .ok_or_else(|| Fault::Lost("the reader returned no status word".into()))?;
        sw = s;
        if i + 1 < apdus.len() && sw != SW_OK {
            return Ok((Vec::new(), sw));
        }
        out.extend_from_slice(data);
    }
    // A response longer than one APDU arrives in parts (at most 64 KiB in all).
    while sw >> 8 == 0x61 && out.len() < 65536 {
        let le = (sw & 0xFF) as u8;
        let resp = tx.transmit(&[0x00, super::INS_GET_RESPONSE, 0, 0, le], &mut buf)?;
        let (data, s) = super::split_response(resp)
            .ok_or_else(|| Fault::Lost("the reader returned no status word".into()))?;
        out.extend_from_slice(data);
        sw = s;
    }
    Ok((out, sw))
}

fn select(tx: &pcsc::Transaction) -> Result<(), Fault> {
    match exchange(tx, &[super::select()])? {
        (_, SW_OK) => Ok(()),
        (_, sw) => Err(Fault::Status(sw, "SELECT of the PIV application")),
    }
}

/// The contents of a data object (inside its 53 tag).
fn get_object(tx: &pcsc::Transaction, object: u32) -> Result<Vec<u8>, Fault> {
    let (data, sw) = exchange(tx, &super::get_data(object))?;
    if sw != SW_OK {
        return Err(Fault::Status(sw, "GET DATA"));
    }
    match super::read_tlv(&data) {
        Some((0x53, value, _)) => Ok(value.to_vec()),
        _ => Err(Fault::Garbled(format!(
            "object {object:06X} is not a PIV data object"
        ))),
    }
}

/// Reads every slot's key in one transaction.
fn read_keys(
    card: &mut pcsc::Card,
    slots: &[Slot],
    algorithms: impl Iterator<Item = Algorithm>,
) -> Result<Vec<SealKey>, Fault> {
    let tx = card.transaction()?;
    select(&tx)?;
    slots
        .iter()
        .zip(algorithms)
        .map(|(slot, algorithm)| {
            read_key(&tx, *slot, algorithm).map_err(|f| match f {
                Fault::Garbled(m) => Fault::Garbled(format!("slot {:02x}: {m}", slot.key_ref)),
                other => other,
            })
        })
        .collect()
}

/// Reads a slot's certificate and the public key in it, and checks it fits the algorithm.
fn read_key(tx: &pcsc::Transaction, slot: Slot, algorithm: Algorithm) -> Result<SealKey, Fault> {
    use der::{Decode, Encode};
    let object = get_object(tx, slot.cert_object)?;
    let cert_der = super::find_tlv(&object, 0x70)
        .ok_or_else(|| Fault::Garbled("the certificate object holds no certificate".into()))?;
    if super::find_tlv(&object, 0x71).is_some_and(|info| info.first().is_some_and(|b| b & 1 != 0)) {
        return Err(Fault::Garbled(
            "the certificate is stored compressed, which is not supported".into(),
        ));
    }
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| Fault::Garbled(format!("the certificate does not parse: {e}")))?;
    let spki_der = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| Fault::Garbled(format!("the certificate's key does not encode: {e}")))?;
    let fits = match algorithm {
        Algorithm::EcdsaP256Sha256 => {
            crate::device::keys::spki_algorithm(&spki_der) == Some(Algorithm::EcdsaP256Sha256)
        }
        Algorithm::RsaPkcs1Sha256 => crate::device::keys::rsa_spki_bits(&spki_der) == Some(2048),
        _ => false,
    };
    if !fits {
        return Err(Fault::Garbled(format!(
            "the certificate's key is not a {} key this card can use",
            algorithm.name()
        )));
    }
    Ok(SealKey {
        algorithm,
        spki_der,
        certificate_der: Some(cert_der.to_vec()),
    })
}

/// GENERAL AUTHENTICATE: the card signs `challenge` with the key in `slot`.
fn general_authenticate(
    tx: &pcsc::Transaction,
    alg: u8,
    slot: Slot,
    challenge: &[u8],
) -> Result<Vec<u8>, Fault> {
    let (data, sw) = exchange(tx, &super::sign(alg, slot, challenge))?;
    match sw {
        SW_OK => {}
        super::SW_SECURITY_NOT_SATISFIED => {
            return Err(Fault::Status(sw, "GENERAL AUTHENTICATE (PIN not verified)"))
        }
        _ => return Err(Fault::Status(sw, "GENERAL AUTHENTICATE")),
    }
    let template = match super::read_tlv(&data) {
        Some((0x7C, v, _)) => v,
        _ => {
            return Err(Fault::Garbled(
                "the signature response is not a 7C template".into(),
            ))
        }
    };
    super::find_tlv(template, 0x82)
        .map(<[u8]>::to_vec)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Fault::Garbled("the signature response holds no signature".into()))
}
