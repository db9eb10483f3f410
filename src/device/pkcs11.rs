//! The PKCS#11 seal device (HSMs, USB keys, SoftHSM), on the `cryptoki` crate.
//!
//! Owns: loading the module, finding the token by label or serial, one login per token, a pool
//! of open sessions, key handles found once per connection, signing, and reconnecting after the
//! token goes away.
//! Never: spends a PIN try the token says it cannot spare (count low, final try, locked), retries
//! a PIN the token refused, or logs a PIN.
//!
//! Concurrency: a sign holds a read lock on the connection for the length of the device call, so
//! many signs run at once on separate sessions; only tearing down or re-establishing the
//! connection takes the write lock, and that waits for the calls in flight.

use super::keys;
use super::profile::DeviceProfile;
use super::{Algorithm, DeviceError, Health, KeySpec, SealDevice, SealKey};
use crate::config::DeviceConfig;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

/// Reconnection is tried at most this often.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// How long a thread that finds another reconnecting waits for it.
const RECONNECT_WAIT: Duration = Duration::from_secs(1);
/// At start-up, an unreachable token is tried this many more times, this far apart.
const STARTUP_RETRIES: u32 = 5;
const STARTUP_RETRY_PAUSE: Duration = Duration::from_millis(100);

pub struct Pkcs11Device {
    id: String,
    profile: DeviceProfile,
    module: PathBuf,
    token_label: Option<String>,
    token_serial: Option<String>,
    wrap_key_label: Option<String>,
    pin: AuthPin,
    specs: Vec<KeySpec>,
    /// Public side of each key, as found at start-up; a token that comes back with other keys
    /// is not accepted.
    keys: Vec<SealKey>,
    sessions: usize,
    state: RwLock<State>,
    /// Serialises reconnection attempts and spaces them out.
    last_attempt: Mutex<Option<Instant>>,
    /// The token's serial number, as it reported it.
    serial: Mutex<String>,
    /// The token last reported few PIN tries left (count low, final try or locked).
    pin_low: AtomicBool,
}

enum State {
    Up(Conn),
    Down {
        reason: String,
        /// The token refused the PIN or is low on tries: no automatic login until restart.
        pin_refused: bool,
    },
}

struct Conn {
    ctx: Pkcs11,
    handles: Vec<ObjectHandle>,
    /// The AES key that wraps secrets, when the device has one.
    wrap: Option<ObjectHandle>,
    pool: Mutex<Vec<Session>>,
    slot: Slot,
    /// Holds the login: a token logs the application out when its last session closes. Never
    /// used for signing; the mutex only makes the connection shareable between threads.
    login: Mutex<Session>,
}

impl Pkcs11Device {
    /// Opens the device: loads the module, finds the token, logs in and finds every key.
    pub fn open(
        config: &DeviceConfig,
        profile: DeviceProfile,
        specs: Vec<KeySpec>,
    ) -> Result<Pkcs11Device, DeviceError> {
        let p11 = profile
            .pkcs11
            .as_ref()
            .expect("PKCS#11 profiles are checked to have a [pkcs11] table");
        let module = match &config.module {
            Some(m) => m.clone(),
            None => p11
                .modules
                .iter()
                .find(|m| m.exists())
                .cloned()
                .ok_or_else(|| {
                    DeviceError::Setup(format!(
                        "device {:?}: no PKCS#11 module of profile {:?} is installed (looked for {})",
                        config.id,
                        profile.name,
                        p11.modules
                            .iter()
                            .map(|m| m.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
        };
        if config.token_label.is_none() && config.token_serial.is_none() {
            return Err(DeviceError::Setup(format!(
                "device {:?}: set token_label or token_serial",
                config.id
            )));
        }
        let pin = config
            .read_pin()
            .map_err(|e| DeviceError::Setup(e.to_string()))?;
        let mut device = Pkcs11Device {
            id: config.id.clone(),
            module,
            token_label: config.token_label.clone(),
            token_serial: config.token_serial.clone(),
            wrap_key_label: config.wrap_key_label.clone(),
            pin: AuthPin::from(pin.expose().to_owned()),
            specs,
            keys: Vec::new(),
            sessions: config.sessions.unwrap_or(p11.sessions),
            profile,
            state: RwLock::new(State::Down {
                reason: "not yet connected".into(),
                pin_refused: false,
            }),
            last_attempt: Mutex::new(None),
            serial: Mutex::new(String::new()),
            pin_low: AtomicBool::new(false),
        };
        // A token may take a moment to show up (USB enumeration; SoftHSM drops a token from
        // its slot list while another process rewrites it), so "not reachable" is retried
        // briefly. A wrong PIN or a wrong key never is.
        let mut attempt = 0;
        let (conn, keys) = loop {
            match device.connect() {
                Ok(found) => break found,
                Err(e) if e.transient && attempt < STARTUP_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(STARTUP_RETRY_PAUSE);
                }
                Err(e) => return Err(DeviceError::Setup(format!("device {:?}: {e}", device.id))),
            }
        };
        device.keys = keys;
        *device.state.get_mut().expect("not shared yet") = State::Up(conn);
        Ok(device)
    }

    fn token_name(&self) -> String {
        match (&self.token_label, &self.token_serial) {
            (Some(l), Some(s)) => format!("token {l:?} (serial {s})"),
            (Some(l), None) => format!("token {l:?}"),
            (None, Some(s)) => format!("token with serial {s}"),
            (None, None) => "token".into(),
        }
    }

    /// Establishes a connection: context, slot, login, sessions and key handles.
    fn connect(&self) -> Result<(Conn, Vec<SealKey>), ConnectError> {
        let ctx = modules::acquire(&self.module)?;
        match self.connect_with(&ctx) {
            Ok(r) => Ok(r),
            Err(e) => {
                modules::release(&self.module, ctx);
                Err(e)
            }
        }
    }

    fn connect_with(&self, ctx: &Pkcs11) -> Result<(Conn, Vec<SealKey>), ConnectError> {
        let slot = self.find_slot(ctx)?;
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| ConnectError::lost(format!("cannot read {}: {e}", self.token_name())))?;
        *self.serial.lock().unwrap_or_else(|p| p.into_inner()) =
            info.serial_number().trim_end().to_owned();
        self.note_pin_flags(&info);
        if info.user_pin_locked() {
            return Err(ConnectError::pin(format!(
                "the user PIN of {} is locked; unlock it with the SO PIN",
                self.token_name()
            )));
        }
        if info.user_pin_final_try() || info.user_pin_count_low() {
            return Err(ConnectError::pin(format!(
                "{} reports few PIN tries left; not logging in automatically (log in once by hand with the right PIN to reset the count)",
                self.token_name()
            )));
        }
        let login = ctx
            .open_ro_session(slot)
            .map_err(|e| ConnectError::lost(format!("cannot open a session: {e}")))?;
        match login.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                return Err(ConnectError::pin(format!(
                    "{} refused the PIN (wrong PIN); not trying again",
                    self.token_name()
                )))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(ConnectError::pin(format!(
                    "the user PIN of {} is locked",
                    self.token_name()
                )))
            }
            Err(e) => return Err(ConnectError::lost(format!("login failed: {e}"))),
        }
        let mut handles = Vec::new();
        let mut found = Vec::new();
        for spec in &self.specs {
            let (handle, key) = self.find_key(&login, spec)?;
            handles.push(session_copy(&login, handle, spec));
            found.push(key);
        }
        let wrap = match &self.wrap_key_label {
            None => None,
            Some(label) => Some(self.find_wrap_key(&login, label)?),
        };
        let mut pool = Vec::new();
        for _ in 0..self.sessions {
            pool.push(
                ctx.open_ro_session(slot)
                    .map_err(|e| ConnectError::lost(format!("cannot open a session: {e}")))?,
            );
        }
        Ok((
            Conn {
                ctx: ctx.clone(),
                handles,
                wrap,
                pool: Mutex::new(pool),
                slot,
                login: Mutex::new(login),
            },
            found,
        ))
    }

    fn find_slot(&self, ctx: &Pkcs11) -> Result<Slot, ConnectError> {
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| ConnectError::lost(format!("cannot list slots: {e}")))?;
        let mut present = Vec::new();
        let mut matches = Vec::new();
        for slot in slots {
            let Ok(info) = ctx.get_token_info(slot) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            let label = info.label().trim_end().to_owned();
            let serial = info.serial_number().trim_end().to_owned();
            let label_ok = self.token_label.as_ref().is_none_or(|l| *l == label);
            let serial_ok = self.token_serial.as_ref().is_none_or(|s| *s == serial);
            if label_ok && serial_ok {
                matches.push(slot);
            }
            present.push(format!("{label:?}"));
        }
        match matches.len() {
            1 => Ok(matches[0]),
            0 => Err(ConnectError::lost(format!(
                "{} is not present (tokens present: {})",
                self.token_name(),
                if present.is_empty() {
                    "none".to_string()
                } else {
                    present.join(", ")
                }
            ))),
            n => Err(ConnectError::setup(format!(
                "{} matches {n} tokens; add token_serial to tell them apart",
                self.token_name()
            ))),
        }
    }

    fn find_key(
        &self,
        session: &Session,
        spec: &KeySpec,
    ) -> Result<(ObjectHandle, SealKey), ConnectError> {
        let template = |class: ObjectClass| {
            // Token objects only: the connection's session copies of keys carry the same
            // label and id.
            let mut t = vec![Attribute::Class(class), Attribute::Token(true)];
            if let Some(l) = &spec.label {
                t.push(Attribute::Label(l.as_bytes().to_vec()));
            }
            if let Some(id) = &spec.id {
                t.push(Attribute::Id(id.clone()));
            }
            t
        };
        let find = |class: ObjectClass| {
            session
                .find_objects(&template(class))
                .map_err(|e| ConnectError::lost(format!("cannot search the token: {e}")))
        };
        let private = find(ObjectClass::PRIVATE_KEY)?;
        let handle = match private.as_slice() {
            [h] => *h,
            [] => {
                return Err(ConnectError::setup(format!(
                    "no private key with {spec} on {}",
                    self.token_name()
                )))
            }
            _ => {
                return Err(ConnectError::setup(format!(
                    "{} private keys match {spec}; give both key_label and key_id",
                    private.len()
                )))
            }
        };
        let attrs = session
            .get_attributes(
                handle,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sign,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                ],
            )
            .map_err(|e| ConnectError::lost(format!("cannot read key attributes: {e}")))?;
        let mut key_type = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) => key_type = Some(t),
                Attribute::Sign(false) => {
                    return Err(ConnectError::setup(format!(
                        "the key with {spec} may not sign (CKA_SIGN is false)"
                    )))
                }
                Attribute::Extractable(true) => {
                    return Err(ConnectError::setup(format!(
                    "the key with {spec} is extractable; seal keys must be CKA_EXTRACTABLE=false"
                )))
                }
                Attribute::Sensitive(false) => {
                    return Err(ConnectError::setup(format!(
                        "the key with {spec} is not sensitive; seal keys must be CKA_SENSITIVE=true"
                    )))
                }
                _ => {}
            }
        }
        let want = match spec.algorithm {
            Algorithm::EcdsaP256Sha256 => KeyType::EC,
            Algorithm::Ed25519 => KeyType::EC_EDWARDS,
            Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 => KeyType::RSA,
        };
        if key_type != Some(want) {
            return Err(ConnectError::setup(format!(
                "the key with {spec} is of type {}, which cannot sign {}",
                key_type.map(|t| t.to_string()).unwrap_or("unknown".into()),
                spec.algorithm.name()
            )));
        }
        let public = find(ObjectClass::PUBLIC_KEY)?;
        let [public] = public.as_slice() else {
            return Err(ConnectError::setup(format!(
                "expected one public key with {spec}, found {}",
                public.len()
            )));
        };
        let spki = self.public_spki(session, *public, spec)?;
        let certificate = match find(ObjectClass::CERTIFICATE)?.as_slice() {
            [] => None,
            [c] => {
                let der = session
                    .get_attributes(*c, &[AttributeType::Value])
                    .map_err(|e| ConnectError::lost(format!("cannot read certificate: {e}")))?
                    .into_iter()
                    .find_map(|a| match a {
                        Attribute::Value(v) => Some(v),
                        _ => None,
                    })
                    .unwrap_or_default();
                // A certificate's TBSCertificate embeds the SPKI in DER, which is canonical,
                // so the certificate belongs to this key exactly when it contains those bytes.
                if !der.windows(spki.len()).any(|w| w == spki.as_slice()) {
                    return Err(ConnectError::setup(format!(
                        "the certificate with {spec} is not for that key"
                    )));
                }
                Some(der)
            }
            more => {
                return Err(ConnectError::setup(format!(
                    "{} certificates match {spec}",
                    more.len()
                )))
            }
        };
        Ok((
            handle,
            SealKey {
                algorithm: spec.algorithm,
                spki_der: spki,
                certificate_der: certificate,
            },
        ))
    }

    fn find_wrap_key(&self, session: &Session, label: &str) -> Result<ObjectHandle, ConnectError> {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| ConnectError::lost(format!("cannot search the token: {e}")))?;
        let [handle] = found.as_slice() else {
            return Err(ConnectError::setup(format!(
                "expected one secret key labelled {label:?} on {}, found {}",
                self.token_name(),
                found.len()
            )));
        };
        let attrs = session
            .get_attributes(
                *handle,
                &[AttributeType::KeyType, AttributeType::Extractable],
            )
            .map_err(|e| ConnectError::lost(format!("cannot read key attributes: {e}")))?;
        for a in attrs {
            match a {
                Attribute::KeyType(t) if t != KeyType::AES => {
                    return Err(ConnectError::setup(format!(
                        "wrap key {label:?} is not an AES key"
                    )))
                }
                Attribute::Extractable(true) => {
                    return Err(ConnectError::setup(format!(
                        "wrap key {label:?} is extractable; it must be CKA_EXTRACTABLE=false"
                    )))
                }
                _ => {}
            }
        }
        Ok(*handle)
    }

    /// Runs `op` on a pooled session of the current connection, marking the device down if
    /// the token went away.
    fn with_session<T>(
        &self,
        op: impl FnOnce(&Conn, &Session) -> Result<T, CkError>,
    ) -> Result<T, DeviceError> {
        self.run_session(false, op)
    }

    /// As [`Self::with_session`]; with `rw`, on a read-write session of its own (for token
    /// objects), closed afterwards.
    fn run_session<T>(
        &self,
        rw: bool,
        op: impl FnOnce(&Conn, &Session) -> Result<T, CkError>,
    ) -> Result<T, DeviceError> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let conn = match &*state {
            State::Up(conn) => conn,
            State::Down { reason, .. } => return Err(self.unavailable(reason)),
        };
        let pooled = if rw {
            None
        } else {
            conn.pool.lock().unwrap_or_else(|p| p.into_inner()).pop()
        };
        let opened = || {
            if rw {
                conn.ctx.open_rw_session(conn.slot)
            } else {
                conn.ctx.open_ro_session(conn.slot)
            }
        };
        let session = match pooled {
            Some(s) => s,
            None => match opened() {
                Ok(s) => s,
                Err(e) => {
                    let reason = format!("cannot open a session: {e}");
                    drop(state);
                    self.mark_down(reason.clone());
                    return Err(self.unavailable(&reason));
                }
            },
        };
        match op(conn, &session) {
            Err(e) if connection_lost(&e) => {
                drop(session);
                drop(state);
                let reason = format!("{} stopped answering: {e}", self.token_name());
                self.mark_down(reason.clone());
                Err(self.unavailable(&reason))
            }
            result => {
                let mut pool = conn.pool.lock().unwrap_or_else(|p| p.into_inner());
                if !rw && pool.len() < self.sessions {
                    pool.push(session);
                }
                result.map_err(|e| DeviceError::Failed(format!("device {:?}: {e}", self.id)))
            }
        }
    }

    fn public_spki(
        &self,
        session: &Session,
        public: ObjectHandle,
        spec: &KeySpec,
    ) -> Result<Vec<u8>, ConnectError> {
        let types: &[AttributeType] = match spec.algorithm {
            Algorithm::EcdsaP256Sha256 | Algorithm::Ed25519 => {
                &[AttributeType::EcParams, AttributeType::EcPoint]
            }
            _ => &[AttributeType::Modulus, AttributeType::PublicExponent],
        };
        let attrs = session
            .get_attributes(public, types)
            .map_err(|e| ConnectError::lost(format!("cannot read public key: {e}")))?;
        let mut m: HashMap<&'static str, Vec<u8>> = HashMap::new();
        for a in attrs {
            match a {
                Attribute::EcParams(v) => m.insert("params", v),
                Attribute::EcPoint(v) => m.insert("point", v),
                Attribute::Modulus(v) => m.insert("n", v),
                Attribute::PublicExponent(v) => m.insert("e", v),
                _ => None,
            };
        }
        let get = |k: &str| {
            m.get(k).cloned().ok_or_else(|| {
                ConnectError::setup(format!("the public key with {spec} lacks its {k}"))
            })
        };
        let bad = |e: String| ConnectError::setup(format!("public key with {spec}: {e}"));
        match spec.algorithm {
            Algorithm::EcdsaP256Sha256 => {
                if get("params")? != keys::P256_PARAMS {
                    return Err(ConnectError::setup(format!(
                        "the key with {spec} is not on curve P-256"
                    )));
                }
                keys::p256_spki(&get("point")?).map_err(bad)
            }
            Algorithm::Ed25519 => keys::ed25519_spki(&get("point")?).map_err(bad),
            Algorithm::RsaPssSha256 | Algorithm::RsaPkcs1Sha256 => {
                let n = get("n")?;
                let bits = keys::rsa_modulus_bits(&n);
                if !(2048..=4096).contains(&bits) {
                    return Err(ConnectError::setup(format!(
                        "the RSA key with {spec} has {bits} bits; 2048 to 4096 are accepted"
                    )));
                }
                keys::rsa_spki(&n, &get("e")?).map_err(bad)
            }
        }
    }

    /// Tears the connection down after the token went away.
    fn mark_down(&self, reason: String) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if let State::Up(_) = &*state {
            tracing::warn!(device = %self.id, %reason, "device unavailable");
            let old = std::mem::replace(
                &mut *state,
                State::Down {
                    reason,
                    pin_refused: false,
                },
            );
            if let State::Up(conn) = old {
                let Conn {
                    ctx, pool, login, ..
                } = conn;
                drop(pool);
                drop(login);
                modules::release(&self.module, ctx);
            }
        }
    }

    fn note_pin_flags(&self, info: &cryptoki::slot::TokenInfo) {
        let low = info.user_pin_count_low() || info.user_pin_final_try() || info.user_pin_locked();
        self.pin_low.store(low, Ordering::Relaxed);
    }

    fn unavailable(&self, reason: &str) -> DeviceError {
        DeviceError::Unavailable(format!("device {:?} is unavailable: {reason}", self.id))
    }
}

/// A copy of a private key as a session object of the login session: the same key with the
/// same attributes (still private, sensitive and not extractable, inside the token), gone when
/// the connection closes. SoftHSM reads a token object's file again before every operation on
/// it, a session object not: a P-256 signature takes 40-49 µs instead of 61 on the demo token.
/// A token that does not copy keys (`CKA_COPYABLE` false, or no room) signs with the token
/// object itself.
pub fn session_copy(
    login: &Session,
    handle: ObjectHandle,
    what: &dyn std::fmt::Display,
) -> ObjectHandle {
    match login.copy_object(handle, &[Attribute::Token(false)]) {
        Ok(copy) => copy,
        Err(e) => {
            tracing::debug!(key = %what, error = %e, "the token keeps no session copy of the key; signing with the token object");
            handle
        }
    }
}

/// The mechanism and the data to give `C_Sign` for a signature of `algorithm` over a SHA-256
/// digest. Shared with the benchmark, which measures the raw device the same way.
pub fn sign_mechanism(algorithm: Algorithm, digest: &[u8; 32]) -> (Mechanism<'static>, Vec<u8>) {
    match algorithm {
        Algorithm::EcdsaP256Sha256 => (Mechanism::Ecdsa, digest.to_vec()),
        Algorithm::Ed25519 => (
            Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
            digest.to_vec(),
        ),
        Algorithm::RsaPssSha256 => (
            Mechanism::RsaPkcsPss(PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32u64.into(),
            }),
            digest.to_vec(),
        ),
        Algorithm::RsaPkcs1Sha256 => {
            let mut prefixed = keys::SHA256_DIGEST_INFO_PREFIX.to_vec();
            prefixed.extend_from_slice(digest);
            (Mechanism::RsaPkcs, prefixed)
        }
    }
}

/// A private token data object by its label.
fn data_template(label: &str) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::DATA),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

impl SealDevice for Pkcs11Device {
    fn id(&self) -> &str {
        &self.id
    }

    fn profile(&self) -> &DeviceProfile {
        &self.profile
    }

    fn health(&self) -> Health {
        match &*self.state.read().unwrap_or_else(|p| p.into_inner()) {
            State::Up(_) => Health::Ready,
            State::Down { reason, .. } => Health::Unavailable(reason.clone()),
        }
    }

    fn key(&self, key: usize) -> &SealKey {
        &self.keys[key]
    }

    fn parallelism(&self) -> usize {
        self.sessions
    }

    fn sign(&self, key: usize, digest: &[u8; 32]) -> Result<Vec<u8>, DeviceError> {
        let algorithm = self.keys[key].algorithm;
        let (mechanism, data) = sign_mechanism(algorithm, digest);
        let sig =
            self.with_session(|conn, session| session.sign(&mechanism, conn.handles[key], &data))?;
        match algorithm {
            Algorithm::EcdsaP256Sha256 => {
                keys::ecdsa_p256_raw_to_der(&sig).map_err(DeviceError::Failed)
            }
            _ => Ok(sig),
        }
    }

    fn sign_message(&self, key: usize, message: &[u8]) -> Result<Vec<u8>, DeviceError> {
        if self.keys[key].algorithm != Algorithm::Ed25519 {
            return Err(DeviceError::Failed(format!(
                "device {:?}: only an Ed25519 key signs whole messages",
                self.id
            )));
        }
        let mechanism = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
        self.with_session(|conn, session| session.sign(&mechanism, conn.handles[key], message))
    }

    fn read_data(&self, label: &str) -> Result<Vec<Vec<u8>>, DeviceError> {
        self.with_session(|_, session| {
            let mut out = Vec::new();
            for object in session.find_objects(&data_template(label))? {
                for a in session.get_attributes(object, &[AttributeType::Value])? {
                    if let Attribute::Value(v) = a {
                        out.push(v);
                    }
                }
            }
            Ok(out)
        })
    }

    fn replace_data(&self, label: &str, value: &[u8]) -> Result<(), DeviceError> {
        self.run_session(true, |_, session| {
            let template = data_template(label);
            let earlier = session.find_objects(&template)?;
            let mut t = template;
            t.extend([
                Attribute::Application(b"sealgate".to_vec()),
                Attribute::Value(value.to_vec()),
            ]);
            session.create_object(&t)?;
            for object in earlier {
                session.destroy_object(object)?;
            }
            Ok(())
        })
    }

    fn seal_secret(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let mut iv = [0u8; 12];
        getrandom::fill(&mut iv).map_err(|e| DeviceError::Failed(format!("no randomness: {e}")))?;
        let iv_copy = iv;
        let ct = self.with_session(|conn, session| {
            let wrap = conn.wrap.ok_or(CkError::NotSupported)?;
            let params = GcmParams::new(&mut iv, context, 128u64.into())?;
            session.encrypt(&Mechanism::AesGcm(params), wrap, plaintext)
        })?;
        let mut out = iv_copy.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open_secret(
        &self,
        sealed: &[u8],
        context: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, DeviceError> {
        if sealed.len() < 12 + 16 {
            return Err(DeviceError::Failed("sealed secret is too short".into()));
        }
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&sealed[..12]);
        let pt = self.with_session(|conn, session| {
            let wrap = conn.wrap.ok_or(CkError::NotSupported)?;
            let params = GcmParams::new(&mut iv, context, 128u64.into())?;
            session.decrypt(&Mechanism::AesGcm(params), wrap, &sealed[12..])
        })?;
        Ok(zeroize::Zeroizing::new(pt))
    }

    fn probe(&self) {
        // SoftHSM fails GetTokenInfo with CKR_GENERAL_ERROR, and then makes no token object
        // (the log's witness among them), until the module is initialised again, in a
        // process that read the token's files while another process was writing them; its
        // sessions go on signing. Only a new C_Initialize mends that, so such a failure takes
        // the device down like any other: the watcher records it, and the next stamp (which
        // others wait for, see `recover`) or the watcher's next try reconnects.
        if self.health() == Health::Ready {
            if let Ok(info) = self.with_session(|conn, session| {
                session.get_session_info()?;
                conn.ctx.get_token_info(conn.slot)
            }) {
                self.note_pin_flags(&info);
            }
        }
    }

    fn serial(&self) -> String {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn pin_tries_low(&self) -> bool {
        self.pin_low.load(Ordering::Relaxed)
    }

    fn recover(&self) {
        // Another thread reconnecting: wait for its outcome (up to RECONNECT_WAIT), so that a
        // stamp that comes meanwhile is signed once the token is back, not refused while it
        // comes back. Then this thread finds the device up, or down and just tried.
        let started = Instant::now();
        let mut last = loop {
            match self.last_attempt.try_lock() {
                Ok(last) => break last,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if started.elapsed() >= RECONNECT_WAIT {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            match &*state {
                State::Up(_)
                | State::Down {
                    pin_refused: true, ..
                } => return,
                State::Down { .. } => {}
            }
        }
        if last.is_some_and(|t| t.elapsed() < RECONNECT_INTERVAL) {
            return;
        }
        *last = Some(Instant::now());
        let outcome = self.connect();
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok((conn, keys)) if keys == self.keys => {
                tracing::info!(device = %self.id, "device available again");
                *state = State::Up(conn);
            }
            Ok((conn, _)) => {
                let Conn {
                    ctx, pool, login, ..
                } = conn;
                drop(pool);
                drop(login);
                modules::release(&self.module, ctx);
                let reason = format!(
                    "{} came back with different keys; refusing it until restart",
                    self.token_name()
                );
                tracing::error!(device = %self.id, %reason);
                *state = State::Down {
                    reason,
                    pin_refused: true,
                };
            }
            Err(e) => {
                if e.pin {
                    tracing::error!(device = %self.id, reason = %e.message, "device needs attention");
                }
                *state = State::Down {
                    reason: e.message,
                    pin_refused: e.pin,
                };
            }
        }
    }
}

impl Drop for Pkcs11Device {
    fn drop(&mut self) {
        let state = std::mem::replace(
            self.state.get_mut().unwrap_or_else(|p| p.into_inner()),
            State::Down {
                reason: "closed".into(),
                pin_refused: true,
            },
        );
        if let State::Up(Conn {
            ctx, pool, login, ..
        }) = state
        {
            drop(pool);
            let login = login.into_inner().unwrap_or_else(|p| p.into_inner());
            let _ = login.logout();
            drop(login);
            modules::release(&self.module, ctx);
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug)]
struct ConnectError {
    message: String,
    /// PIN trouble: never retried automatically.
    pin: bool,
    /// The token could not be reached; trying again later may succeed.
    transient: bool,
}

impl ConnectError {
    fn lost(message: String) -> Self {
        ConnectError {
            message,
            pin: false,
            transient: true,
        }
    }
    fn setup(message: String) -> Self {
        ConnectError {
            message,
            pin: false,
            transient: false,
        }
    }
    fn pin(message: String) -> Self {
        ConnectError {
            message,
            pin: true,
            transient: false,
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Errors after which the session, the login or the whole module context cannot be trusted.
fn connection_lost(e: &CkError) -> bool {
    match e {
        CkError::Pkcs11(rv, _) => matches!(
            rv,
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::GeneralError
        ),
        _ => false,
    }
}

/// One initialised context per module file, shared by every device that uses the module;
/// finalised when the last of them lets go, so that a module can be re-initialised after its
/// token went away.
mod modules {
    use super::*;

    struct Entry {
        ctx: Pkcs11,
        users: usize,
    }

    fn table() -> &'static Mutex<HashMap<PathBuf, Entry>> {
        static TABLE: OnceLock<Mutex<HashMap<PathBuf, Entry>>> = OnceLock::new();
        TABLE.get_or_init(Default::default)
    }

    pub(super) fn acquire(module: &Path) -> Result<Pkcs11, ConnectError> {
        let mut table = table().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = table.get_mut(module) {
            entry.users += 1;
            return Ok(entry.ctx.clone());
        }
        let ctx = Pkcs11::new(module).map_err(|e| {
            ConnectError::setup(format!(
                "cannot load PKCS#11 module {}: {e}",
                module.display()
            ))
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(ConnectError::lost(format!(
                    "PKCS#11 module {} failed to initialise: {e}",
                    module.display()
                )))
            }
        }
        table.insert(
            module.to_owned(),
            Entry {
                ctx: ctx.clone(),
                users: 1,
            },
        );
        Ok(ctx)
    }

    pub(super) fn release(module: &Path, ctx: Pkcs11) {
        let mut table = table().lock().unwrap_or_else(|p| p.into_inner());
        let last = match table.get_mut(module) {
            Some(entry) => {
                entry.users -= 1;
                entry.users == 0
            }
            None => false,
        };
        if last {
            table.remove(module);
            // Every session on this context is closed by now; finalising lets the next acquire
            // start from a clean C_Initialize.
            let _ = ctx.finalize();
        }
    }
}
