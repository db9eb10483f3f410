//! One terminal's session: a thread that owns the terminal's line, its grant and its counter.
//!
//! Owns: deciding grants (approval gate, then uses consumed and `terminal.granted` made durable,
//! only then UNLOCK_GRANT sent), judging reports (signature under the enrolled key, live grant,
//! counter = last + 1, replays), heartbeats, retransmission of what the daemon sends, and the
//! link's loss and return.
//! Never: ACKs a report before its record is durable (the terminal keeps a report until it is
//! ACKed, so nothing is lost when the log cannot be written), or ends on bad bytes.

use super::link::{self, Link};
use super::{ack, nak, open_report, pb, Command, Decoder, Frame, ReportError};
use crate::approval::gate::Gate;
use crate::approval::{ApprovalError, Denial};
use crate::audit::log::{Appended, AuditLog};
use crate::audit::query::TerminalMemory;
use crate::audit::{kind, Record};
use crate::device::profile::{DeviceProfile, TerminalProfile};
use base64::Engine;
use ed25519_dalek::VerifyingKey;
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::{HashSet, VecDeque};
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub use crate::audit::rejection;

/// Why a grant asked for by an office app was not given (mapped to wire statuses in the
/// service's one mapping).
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Busy(String),
    /// The terminal already has a live grant.
    #[error("{0}")]
    GrantLive(String),
    #[error("{0}")]
    Invalid(String),
    #[error("approval refused: {0}")]
    Denied(Denial),
    #[error("{0}")]
    Audit(String),
}

/// A request to unlock, from an office app or from the terminal itself.
pub struct GrantRequest {
    pub token: Zeroizing<Vec<u8>>,
    pub doc: [u8; 32],
    pub photo: Vec<u8>,
    pub impressions: u32,
    pub mfa_code: Zeroizing<String>,
    /// The configured caller, or "terminal" for a request made at the terminal.
    pub caller: String,
    pub purpose: String,
}

/// A grant given.
#[derive(Debug, Clone)]
pub struct Granted {
    pub grant_id: [u8; 16],
    pub impressions: u32,
    pub seconds: u32,
    pub uses_left: u32,
    pub jti: String,
}

type Reply = tokio::sync::oneshot::Sender<Result<Granted, TerminalError>>;

/// Impression reports remembered for replay detection (about 3 MB).
const MAX_SEEN: usize = 100_000;

enum Control {
    Grant(GrantRequest, Reply),
    Connect(Box<dyn Link>),
}

/// A configured terminal, as the session needs it.
pub struct TerminalSpec {
    pub id: String,
    pub seal: String,
    pub name: String,
    pub profile: DeviceProfile,
    pub key: VerifyingKey,
    /// Serial port, or None for a terminal that connects over TLS.
    pub serial: Option<PathBuf>,
}

/// What a session needs from the rest of the daemon.
#[derive(Clone)]
pub struct Context {
    pub gate: Arc<Gate>,
    pub audit: AuditLog,
    pub runtime: tokio::runtime::Handle,
}

/// The service's handle on a running session.
pub struct Handle {
    pub id: String,
    pub seal: String,
    pub name: String,
    pub profile: String,
    tx: mpsc::Sender<Control>,
    connected: Arc<AtomicBool>,
    /// Longest an office app waits for a grant to be acknowledged.
    patience: Duration,
}

impl Handle {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Hands a new line (an accepted TLS connection) to the session.
    pub fn connect(&self, link: Box<dyn Link>) {
        let _ = self.tx.send(Control::Connect(link));
    }

    /// Decides, records and delivers a grant; answers once the terminal has ACKed it.
    pub async fn grant(&self, req: GrantRequest) -> Result<Granted, TerminalError> {
        if !self.connected() {
            return Err(TerminalError::Unavailable(format!(
                "terminal {:?} is not connected; nothing was consumed",
                self.id
            )));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Control::Grant(req, tx))
            .map_err(|_| TerminalError::Unavailable("the terminal's session has ended".into()))?;
        match tokio::time::timeout(self.patience, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(TerminalError::Unavailable(
                "the terminal's session ended while granting".into(),
            )),
            Err(_) => Err(TerminalError::Unavailable(format!(
                "terminal {:?} did not answer in time",
                self.id
            ))),
        }
    }
}

/// Starts a terminal's session thread, from what the audit log last recorded of it (`memory`).
pub fn spawn(spec: TerminalSpec, ctx: Context, memory: TerminalMemory) -> Handle {
    let p = spec
        .profile
        .terminal
        .clone()
        .expect("a terminal profile has a [terminal] table");
    let (tx, rx) = mpsc::channel();
    let connected = Arc::new(AtomicBool::new(false));
    let handle = Handle {
        id: spec.id.clone(),
        seal: spec.seal.clone(),
        name: spec.name.clone(),
        profile: spec.profile.name.clone(),
        tx,
        connected: connected.clone(),
        patience: Duration::from_millis(p.ack_timeout_ms * (p.retries as u64 + 2))
            + Duration::from_secs(10),
    };
    let now = Instant::now();
    let grant = memory.grant.map(|g| {
        // The grant ends at its time limit by the wall clock; one that ended while the daemon
        // was down is closed by the session's first look at its timers.
        let left_ms = g.at_ms + g.seconds as i64 * 1000 - unix_ms();
        LiveGrant {
            id: g.grant_id,
            allowed: g.impressions,
            used: g.used,
            expires: now + ms(left_ms.max(0) as u64),
            jti: g.jti,
            applicant: g.applicant,
            doc: g.doc_sha256,
            auth_seq: g.seq,
        }
    });
    if let Some(g) = &grant {
        tracing::info!(terminal = %spec.id, approval = %g.jti, made = g.used, allowed = g.allowed, "a grant recorded before the restart stands until its time limit");
    }
    let session = Session {
        spec,
        p,
        ctx,
        connected,
        link: None,
        next_open: now,
        open_failed: false,
        decoder: Decoder::new(),
        partial_since: None,
        out_seq: 0,
        outstanding: None,
        queue: VecDeque::new(),
        last_rx: None,
        last_seen: now,
        heartbeat_lost: false,
        counter: memory.counter,
        seen: HashSet::new(),
        last_taken: memory.last_report,
        fresh_line: true,
        grant,
    };
    let name = format!("terminal {}", handle.id);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || session.run(rx))
        .expect("a thread for the terminal session");
    handle
}

struct Outstanding {
    frame: Frame,
    sent: Instant,
    tries: u32,
    waiter: Option<(Reply, Granted)>,
}

struct LiveGrant {
    id: [u8; 16],
    allowed: u32,
    used: u32,
    expires: Instant,
    jti: String,
    applicant: String,
    doc: String,
    auth_seq: u64,
}

/// What became of a frame from the terminal.
enum Outcome {
    /// Taken (and recorded): ACK, then send these frames.
    Ack(Vec<Frame>),
    Nak(pb::NakReason),
    /// Not recorded; no ACK, so the terminal sends it again.
    Retry,
}

struct Session {
    spec: TerminalSpec,
    p: TerminalProfile,
    ctx: Context,
    connected: Arc<AtomicBool>,
    link: Option<Box<dyn Link>>,
    next_open: Instant,
    open_failed: bool,
    decoder: Decoder,
    partial_since: Option<Instant>,
    out_seq: u8,
    outstanding: Option<Outstanding>,
    queue: VecDeque<(Frame, Option<(Reply, Granted)>)>,
    /// (seq, cmd, payload digest) of the last frame taken: a retransmission is ACKed again,
    /// not taken twice.
    last_rx: Option<(u8, u8, [u8; 32])>,
    last_seen: Instant,
    heartbeat_lost: bool,
    /// The last impression counter recorded.
    counter: Option<u64>,
    /// Digests of impression reports taken since start.
    seen: HashSet<[u8; 32]>,
    /// Digest of the body of the newest report recorded (read from the log at start): the
    /// one the terminal may send again because its ACK was lost with the line or the daemon.
    last_taken: Option<[u8; 32]>,
    /// No report taken yet on this line: the first one may be `last_taken` sent again, and is
    /// then ACKed without a second record. Later in a line's life the same report is a replay.
    fresh_line: bool,
    grant: Option<LiveGrant>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unix_now() -> i64 {
    unix_ms() / 1000
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Session {
    fn run(mut self, rx: mpsc::Receiver<Control>) {
        let mut buf = [0u8; 2048];
        loop {
            loop {
                match rx.try_recv() {
                    Ok(c) => self.control(c),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if self.link.is_none() {
                self.try_open();
            }
            let Some(link) = self.link.as_mut() else {
                self.timers();
                match rx.recv_timeout(link::POLL * 4) {
                    Ok(c) => self.control(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                continue;
            };
            match link.read(&mut buf) {
                Ok(0) => self.lost("the line closed".into()),
                Ok(n) => {
                    let was_pending = self.decoder.pending();
                    self.decoder.push(&buf[..n]);
                    while let Some(next) = self.decoder.next_frame() {
                        match next {
                            Ok(frame) => self.on_frame(frame),
                            Err(e) => {
                                tracing::debug!(terminal = %self.spec.id, error = ?e, "damaged bytes on the line");
                                self.send_now(nak(e.seq().unwrap_or(0), e.nak_reason()));
                            }
                        }
                        if self.link.is_none() {
                            break;
                        }
                    }
                    self.partial_since = match (self.decoder.pending(), was_pending) {
                        (false, _) => None,
                        (true, true) => self.partial_since.or(Some(Instant::now())),
                        (true, false) => Some(Instant::now()),
                    };
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::Interrupted
                    ) => {}
                Err(e) => self.lost(format!("the line failed: {e}")),
            }
            self.timers();
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Connect(link) => {
                if self.link.is_some() {
                    self.lost("replaced by a new connection".into());
                }
                self.connected_to(link);
            }
            Control::Grant(req, reply) => {
                if self.link.is_none() {
                    let _ = reply.send(Err(TerminalError::Unavailable(format!(
                        "terminal {:?} is not connected; nothing was consumed",
                        self.spec.id
                    ))));
                    return;
                }
                match self.decide(req) {
                    Ok(g) => {
                        crate::crash_point!("terminal.after_authorization");
                        let frame = self.grant_frame(&g);
                        self.enqueue(frame, Some((reply, g)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    fn try_open(&mut self) {
        let Some(path) = self.spec.serial.clone() else {
            return;
        };
        if Instant::now() < self.next_open {
            return;
        }
        match link::open_serial(&path, &self.p) {
            Ok(l) => {
                self.open_failed = false;
                self.connected_to(l);
            }
            Err(e) => {
                if !self.open_failed {
                    tracing::warn!(terminal = %self.spec.id, error = %e, "terminal line unavailable; retrying");
                    self.open_failed = true;
                }
                self.next_open = Instant::now() + ms(self.p.reconnect_interval_ms);
            }
        }
    }

    fn connected_to(&mut self, link: Box<dyn Link>) {
        let line = link.describe();
        tracing::info!(terminal = %self.spec.id, %line, "terminal line up");
        self.link = Some(link);
        self.connected.store(true, Ordering::SeqCst);
        self.decoder = Decoder::new();
        self.partial_since = None;
        self.last_rx = None;
        self.fresh_line = true;
        let mut r = self.record(kind::TERMINAL_CONNECTED);
        r.detail = line;
        self.ctx.audit.append_later(r);
    }

    /// The line is gone: anything unacknowledged is answered, and a serial port is reopened
    /// after the profile's interval.
    fn lost(&mut self, why: String) {
        let Some(link) = self.link.take() else {
            return;
        };
        tracing::warn!(terminal = %self.spec.id, line = %link.describe(), reason = %why, "terminal line down");
        drop(link);
        self.connected.store(false, Ordering::SeqCst);
        self.next_open = Instant::now() + ms(self.p.reconnect_interval_ms);
        let pending = self
            .outstanding
            .take()
            .map(|o| o.waiter)
            .into_iter()
            .chain(self.queue.drain(..).map(|(_, w)| w));
        for (reply, _) in pending.flatten() {
            let _ = reply.send(Err(TerminalError::Unavailable(format!(
                "the line to terminal {:?} was lost before it acknowledged the grant ({why}); \
                 the grant is recorded and stands until its time limit",
                self.spec.id
            ))));
        }
        let mut r = self.record(kind::TERMINAL_DISCONNECTED);
        r.detail = why;
        self.ctx.audit.append_later(r);
    }

    fn send_now(&mut self, frame: Frame) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let bytes = frame.encode();
        if let Err(e) = link.write_all(&bytes).and_then(|_| link.flush()) {
            self.lost(format!("cannot write to the line: {e}"));
        }
    }

    /// Sends a frame that must be ACKed, one at a time.
    fn enqueue(&mut self, mut frame: Frame, waiter: Option<(Reply, Granted)>) {
        if self.outstanding.is_some() {
            self.queue.push_back((frame, waiter));
            return;
        }
        self.out_seq = self.out_seq.wrapping_add(1);
        frame.seq = self.out_seq;
        self.outstanding = Some(Outstanding {
            frame: frame.clone(),
            sent: Instant::now(),
            tries: 1,
            waiter,
        });
        self.send_now(frame);
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if let Some(t) = self.partial_since {
            if now.duration_since(t) > ms(self.p.frame_timeout_ms) {
                self.partial_since = None;
                if let Some(e) = self.decoder.expire() {
                    self.send_now(nak(e.seq().unwrap_or(0), e.nak_reason()));
                }
            }
        }
        if let Some(o) = self.outstanding.as_mut() {
            if now.duration_since(o.sent) > ms(self.p.ack_timeout_ms) {
                if o.tries > self.p.retries {
                    let tries = o.tries;
                    self.lost(format!("no ACK after {tries} tries"));
                } else {
                    o.tries += 1;
                    o.sent = now;
                    let f = o.frame.clone();
                    self.send_now(f);
                }
            }
        }
        if !self.heartbeat_lost
            && now.duration_since(self.last_seen) > ms(self.p.heartbeat_timeout_ms)
        {
            self.heartbeat_lost = true;
            let mut r = self.record(kind::TERMINAL_HEARTBEAT_LOST);
            r.detail = format!(
                "nothing heard from terminal {:?} for {} ms",
                self.spec.id, self.p.heartbeat_timeout_ms
            );
            self.ctx.audit.append_later(r);
        }
        if let Some(g) = &self.grant {
            if now > g.expires {
                let mut r = self.grant_record(kind::TERMINAL_GRANT_EXPIRED);
                r.detail = format!(
                    "the grant ended at its time limit with {} of {} impressions made",
                    g.used, g.allowed
                );
                self.grant = None;
                self.ctx.audit.append_later(r);
            }
        }
    }

    fn on_frame(&mut self, f: Frame) {
        self.last_seen = Instant::now();
        if self.heartbeat_lost {
            self.heartbeat_lost = false;
            let mut r = self.record(kind::TERMINAL_HEARTBEAT_BACK);
            r.detail = "the terminal is heard again".into();
            self.ctx.audit.append_later(r);
        }
        let Some(cmd) = f.command() else {
            self.send_now(nak(f.seq, pb::NakReason::UnknownCommand));
            return;
        };
        match cmd {
            Command::Ack => {
                if self
                    .outstanding
                    .as_ref()
                    .is_some_and(|o| o.frame.seq == f.seq)
                {
                    let o = self.outstanding.take().expect("checked");
                    if let Some((reply, g)) = o.waiter {
                        crate::crash_point!("terminal.before_reply");
                        let _ = reply.send(Ok(g));
                    }
                    if let Some((frame, waiter)) = self.queue.pop_front() {
                        self.enqueue(frame, waiter);
                    }
                }
            }
            Command::Nak => {
                if let Some(o) = self.outstanding.as_mut() {
                    if o.frame.seq == f.seq {
                        // Sent again at once; the retry count still bounds it.
                        o.sent = Instant::now() - ms(self.p.ack_timeout_ms) - ms(1);
                    }
                }
            }
            Command::UnlockGrant | Command::UnlockDeny => {
                self.send_now(nak(f.seq, pb::NakReason::UnknownCommand));
            }
            _ => {
                let key = (f.seq, f.cmd, Sha256::digest(&f.payload).into());
                if self.last_rx == Some(key) {
                    self.send_now(ack(f.seq));
                    return;
                }
                match self.take(cmd, &f.payload) {
                    Outcome::Ack(then) => {
                        self.last_rx = Some(key);
                        self.send_now(ack(f.seq));
                        for frame in then {
                            self.enqueue(frame, None);
                        }
                    }
                    Outcome::Nak(reason) => self.send_now(nak(f.seq, reason)),
                    Outcome::Retry => {}
                }
            }
        }
    }

    /// Judges one report or request from the terminal.
    fn take(&mut self, cmd: Command, payload: &[u8]) -> Outcome {
        match cmd {
            Command::Heartbeat => match pb::Heartbeat::decode(payload) {
                Ok(_) => Outcome::Ack(Vec::new()),
                Err(_) => Outcome::Nak(pb::NakReason::Payload),
            },
            Command::UnlockRequest => {
                let Ok(req) = pb::UnlockRequest::decode(payload) else {
                    return Outcome::Nak(pb::NakReason::Payload);
                };
                let reply = match <[u8; 32]>::try_from(req.document_sha256.as_slice()) {
                    Err(_) => Err(TerminalError::Invalid(
                        "document_sha256 must be 32 bytes".into(),
                    )),
                    Ok(doc) => self.decide(GrantRequest {
                        token: Zeroizing::new(req.approval_token),
                        doc,
                        photo: req.photo_sha256,
                        impressions: req.impressions,
                        mfa_code: Zeroizing::new(req.mfa_code),
                        caller: "terminal".into(),
                        purpose: String::new(),
                    }),
                };
                let frame = match reply {
                    Ok(g) => self.grant_frame(&g),
                    Err(e) => deny_frame(&e),
                };
                Outcome::Ack(vec![frame])
            }
            Command::Hello => self.hello(payload),
            Command::Impression => self.impression(payload),
            Command::Locked | Command::Tamper => self.event(cmd, payload),
            _ => Outcome::Nak(pb::NakReason::UnknownCommand),
        }
    }

    /// Opens a signed report; a bad signature is recorded (and ACKed, so it is not sent again).
    fn open<M: Message + Default>(
        &mut self,
        cmd: Command,
        payload: &[u8],
    ) -> Result<(M, pb::Signed), Outcome> {
        match open_report::<M>(&self.spec.key, &self.spec.id, cmd, payload) {
            Ok(r) => Ok(r),
            Err(ReportError::NotSigned | ReportError::Body(_)) => {
                Err(Outcome::Nak(pb::NakReason::Payload))
            }
            Err(e) => {
                let mut r = self.record(kind::TERMINAL_REJECTED);
                r.reason = rejection::BAD_SIGNATURE.into();
                r.detail = format!("{cmd:?} report refused: {e}");
                r.evidence = serde_json::json!({
                    "terminal": self.spec.id,
                    "command": cmd as u8,
                    "payload": b64(payload),
                })
                .to_string();
                Err(self.commit(r, |_| {}))
            }
        }
    }

    fn hello(&mut self, payload: &[u8]) -> Outcome {
        let (h, signed) = match self.open::<pb::Hello>(Command::Hello, payload) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let mut r = self.record(kind::TERMINAL_HELLO);
        if h.terminal_id != self.spec.id
            || h.device_public_key != self.spec.key.as_bytes().as_slice()
        {
            r.kind = kind::TERMINAL_REJECTED.into();
            r.reason = rejection::BAD_SIGNATURE.into();
            r.detail = format!(
                "HELLO names terminal {:?} and a key other than the enrolled one",
                h.terminal_id
            );
        } else {
            r.detail = format!("firmware {:?}, counter {}", h.firmware, h.counter);
            match self.counter {
                Some(last) if h.counter > last => {
                    r.kind = kind::TERMINAL_REJECTED.into();
                    r.reason = rejection::COUNTER_GAP.into();
                    r.detail = format!(
                        "HELLO reports counter {}, the last recorded impression is {last}: {} impressions were never reported",
                        h.counter,
                        h.counter - last
                    );
                }
                Some(last) if h.counter < last => {
                    r.kind = kind::TERMINAL_REJECTED.into();
                    r.reason = rejection::COUNTER_ROLLBACK.into();
                    r.detail = format!(
                        "HELLO reports counter {}, below the last recorded impression {last}",
                        h.counter
                    );
                }
                _ => {}
            }
        }
        // A HELLO below the recorded counter never lowers it (that would let counters be
        // used again after one alert); one above it moves it up to what the terminal counted.
        let counter = match self.counter {
            Some(last) if h.counter < last => last,
            _ => h.counter,
        };
        let named_right = r.reason != rejection::BAD_SIGNATURE;
        r.evidence = self.evidence(&signed, named_right.then_some(counter));
        let digest: [u8; 32] = Sha256::digest(&signed.body).into();
        self.commit(r, move |s: &mut Session| {
            s.taken(digest);
            if named_right {
                s.counter = Some(counter);
            }
        })
    }

    fn impression(&mut self, payload: &[u8]) -> Outcome {
        let (imp, signed) = match self.open::<pb::Impression>(Command::Impression, payload) {
            Ok(v) => v,
            Err(o) => return o,
        };
        let digest: [u8; 32] = Sha256::digest(&signed.body).into();
        if self.repeat_of_last(digest) {
            return Outcome::Ack(Vec::new());
        }
        let now = Instant::now();
        let live = self.grant.as_ref().filter(|g| {
            g.id.as_slice() == imp.grant_id.as_slice() && g.used < g.allowed && now <= g.expires
        });
        let mut r = match live {
            Some(_) => self.grant_record(kind::TERMINAL_IMPRESSION),
            None => self.record(kind::TERMINAL_IMPRESSION),
        };
        let (reason, detail, advance, counts) = if self.seen.contains(&digest) {
            (
                Some(rejection::REPLAY),
                format!("impression report {} was already taken", imp.counter),
                false,
                false,
            )
        } else if self.counter.is_some_and(|last| imp.counter <= last) {
            (
                Some(rejection::COUNTER_ROLLBACK),
                format!(
                    "impression counter {} is not above the last recorded {}",
                    imp.counter,
                    self.counter.unwrap_or(0)
                ),
                false,
                false,
            )
        } else if live.is_none() {
            (
                Some(rejection::NO_GRANT),
                format!(
                    "impression {} made without a live grant{}",
                    imp.counter,
                    if self.grant.is_some() {
                        " (the live grant is used up or has another id)"
                    } else {
                        ""
                    }
                ),
                true,
                false,
            )
        } else if let Some(last) = self.counter.filter(|l| imp.counter != l + 1) {
            (
                Some(rejection::COUNTER_GAP),
                format!(
                    "impression counter {} follows {last}: {} impressions were never reported",
                    imp.counter,
                    imp.counter - last - 1
                ),
                true,
                true,
            )
        } else {
            (None, format!("impression {} made", imp.counter), true, true)
        };
        if let Some(reason) = reason {
            r.kind = kind::TERMINAL_REJECTED.into();
            r.reason = reason.into();
        }
        r.detail = detail;
        r.evidence = self.evidence(&signed, advance.then_some(imp.counter));
        let counter = imp.counter;
        self.commit(r, move |s: &mut Session| {
            s.taken(digest);
            if reason != Some(rejection::REPLAY) {
                // Bounded: an older report sent again is still caught, as a rollback.
                if s.seen.len() >= MAX_SEEN {
                    s.seen.clear();
                }
                s.seen.insert(digest);
            }
            if advance {
                s.counter = Some(counter);
            }
            if counts {
                if let Some(g) = s.grant.as_mut() {
                    g.used += 1;
                }
            }
        })
    }

    /// LOCKED and TAMPER: recorded with their evidence. TAMPER ends any live grant; LOCKED
    /// ends the grant it names (a late LOCKED of a used-up grant leaves the next one be).
    fn event(&mut self, cmd: Command, payload: &[u8]) -> Outcome {
        let (detail, signed, names_grant) = if cmd == Command::Locked {
            match self.open::<pb::Locked>(cmd, payload) {
                Ok((l, s)) => (
                    format!(
                        "locked at counter {} ({})",
                        l.counter,
                        match l.why {
                            0 => "all impressions made",
                            1 => "time limit",
                            2 => "cancelled by the operator",
                            _ => "other",
                        }
                    ),
                    s,
                    self.grant
                        .as_ref()
                        .is_some_and(|g| g.id.as_slice() == l.grant_id.as_slice()),
                ),
                Err(o) => return o,
            }
        } else {
            match self.open::<pb::Tamper>(cmd, payload) {
                Ok((t, s)) => (
                    format!(
                        "tamper code {} at counter {}: {}; any live grant is void",
                        t.code,
                        t.counter,
                        t.detail.chars().take(200).collect::<String>()
                    ),
                    s,
                    self.grant.is_some(),
                ),
                Err(o) => return o,
            }
        };
        let digest: [u8; 32] = Sha256::digest(&signed.body).into();
        if self.repeat_of_last(digest) {
            return Outcome::Ack(Vec::new());
        }
        let k = if cmd == Command::Locked {
            kind::TERMINAL_LOCKED
        } else {
            kind::TERMINAL_TAMPER
        };
        let mut r = if names_grant {
            self.grant_record(k)
        } else {
            self.record(k)
        };
        r.detail = detail;
        r.evidence = self.evidence(&signed, None);
        self.commit(r, move |s: &mut Session| {
            s.taken(digest);
            if names_grant {
                s.grant = None;
            }
        })
    }

    /// The approval gate, then the uses consumed and `terminal.granted` recorded in one durable
    /// transaction. The caller sends UNLOCK_GRANT afterwards.
    fn decide(&mut self, req: GrantRequest) -> Result<Granted, TerminalError> {
        let now = Instant::now();
        if let Some(g) = &self.grant {
            if g.used < g.allowed && now <= g.expires {
                return Err(TerminalError::GrantLive(format!(
                    "terminal {:?} still has a live grant ({} of {} impressions made)",
                    self.spec.id, g.used, g.allowed
                )));
            }
        }
        if req.impressions == 0 || req.impressions > self.p.max_impressions {
            return Err(TerminalError::Invalid(format!(
                "impressions must be between 1 and {}, got {}",
                self.p.max_impressions, req.impressions
            )));
        }
        if !req.photo.is_empty() && req.photo.len() != 32 {
            return Err(TerminalError::Invalid(
                "photo_sha256 must be empty or 32 bytes".into(),
            ));
        }
        let verdict = self
            .ctx
            .gate
            .check(
                &self.spec.seal,
                &req.doc,
                &req.token,
                &req.mfa_code,
                unix_now(),
                false,
            )
            .map_err(|e| match e {
                ApprovalError::Store(s) => TerminalError::Audit(s.to_string()),
                ApprovalError::Device(d) => TerminalError::Unavailable(d.to_string()),
                ApprovalError::Invalid(m) => TerminalError::Invalid(m),
            })?;
        let mut r = self.record(kind::TERMINAL_GRANTED);
        r.caller = req.caller;
        r.doc_sha256 = hex::encode(req.doc);
        r.set_approval(
            &verdict.approvers,
            verdict.claims.as_ref(),
            verdict.rule.as_deref(),
            &req.purpose,
        );
        if let Some(d) = verdict.denials.into_iter().next() {
            r.kind = kind::TERMINAL_DENIED.into();
            r.reason = d.reason.code().into();
            r.detail = d.detail.clone();
            crate::metrics::get().denial(&self.spec.seal, d.reason.code());
            if let Err(e) = self.ctx.runtime.block_on(self.ctx.audit.append(r)) {
                tracing::error!(error = %e, "a refusal could not be recorded in the audit log");
            }
            return Err(TerminalError::Denied(d));
        }
        let mut pending = verdict.pending.ok_or_else(|| {
            TerminalError::Audit("an authorised grant has no use to consume".into())
        })?;
        pending.count = req.impressions;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)
            .map_err(|e| TerminalError::Audit(format!("no randomness: {e}")))?;
        let seconds = self.p.grant_seconds;
        r.detail = format!(
            "{} impressions within {seconds} s on terminal {:?}",
            req.impressions, self.spec.id
        );
        let serde_json::Value::Object(grant) = serde_json::json!({
            "terminal": self.spec.id,
            "grant_id": hex::encode(id),
            "impressions": req.impressions,
            "seconds": seconds,
            "photo_sha256": hex::encode(&req.photo),
        }) else {
            unreachable!("a JSON object literal")
        };
        r.add_evidence(grant);
        let (jti, applicant, doc) = (r.jti.clone(), r.applicant.clone(), r.doc_sha256.clone());
        crate::crash_point!("terminal.before_authorization");
        let appended = self
            .ctx
            .runtime
            .block_on(self.ctx.audit.authorize(pending, r))
            .map_err(|e| {
                TerminalError::Audit(format!("{e}; the grant was not given, nothing released"))
            })?;
        let (auth_seq, uses_left) = match appended {
            Appended::Authorized { seq, uses_left } => (seq, uses_left),
            Appended::Refused { denial, .. } => return Err(TerminalError::Denied(denial)),
            Appended::Record { .. } => {
                return Err(TerminalError::Audit(
                    "the audit writer answered a grant with a plain record".into(),
                ))
            }
        };
        self.grant = Some(LiveGrant {
            id,
            allowed: req.impressions,
            used: 0,
            expires: now + Duration::from_secs(seconds as u64),
            jti: jti.clone(),
            applicant,
            doc,
            auth_seq,
        });
        tracing::info!(terminal = %self.spec.id, seal = %self.spec.seal, approval = %jti, impressions = req.impressions, "terminal granted");
        Ok(Granted {
            grant_id: id,
            impressions: req.impressions,
            seconds,
            uses_left,
            jti,
        })
    }

    fn grant_frame(&self, g: &Granted) -> Frame {
        let doc = self
            .grant
            .as_ref()
            .and_then(|l| hex::decode(&l.doc).ok())
            .unwrap_or_default();
        Frame::new(
            0,
            Command::UnlockGrant,
            pb::UnlockGrant {
                grant_id: g.grant_id.to_vec(),
                impressions: g.impressions,
                seconds: g.seconds,
                document_sha256: doc,
            }
            .encode_to_vec(),
        )
    }

    /// Whether a report is the first on this line and the newest one recorded, sent again
    /// because its ACK was lost; only the first such repeat is passed over.
    fn repeat_of_last(&mut self, digest: [u8; 32]) -> bool {
        let repeat = self.fresh_line && self.last_taken == Some(digest);
        if repeat {
            self.fresh_line = false;
        }
        repeat
    }

    /// A signed report with body digest `digest` was recorded.
    fn taken(&mut self, digest: [u8; 32]) {
        self.last_taken = Some(digest);
        self.fresh_line = false;
    }

    /// A record about this terminal.
    fn record(&self, k: &str) -> Record {
        let mut r = Record::new(k);
        r.seal = self.spec.seal.clone();
        r.device = self.spec.id.clone();
        r.device_profile = self.spec.profile.name.clone();
        r
    }

    /// A record about this terminal's live grant.
    fn grant_record(&self, k: &str) -> Record {
        let mut r = self.record(k);
        if let Some(g) = &self.grant {
            r.jti = g.jti.clone();
            r.applicant = g.applicant.clone();
            r.doc_sha256 = g.doc.clone();
            r.ref_seq = Some(g.auth_seq);
        }
        r
    }

    /// The signed report as evidence an auditor can verify offline, and the counter it sets.
    fn evidence(&self, signed: &pb::Signed, counter_after: Option<u64>) -> String {
        let mut v = serde_json::json!({
            "terminal": self.spec.id,
            "public_key": hex::encode(self.spec.key.as_bytes()),
            "body": b64(&signed.body),
            "signature": b64(&signed.signature),
        });
        if let Some(c) = counter_after {
            v["counter_after"] = c.into();
        }
        v.to_string()
    }

    /// Makes `r` durable; only then is the frame ACKed and `apply` done to the session. A
    /// record that cannot be written leaves the session as it was and the frame unanswered,
    /// so the terminal sends it again.
    fn commit(&mut self, r: Record, apply: impl FnOnce(&mut Session)) -> Outcome {
        match self.ctx.runtime.block_on(self.ctx.audit.append(r)) {
            Ok(_) => {
                crate::crash_point!("terminal.before_report_ack");
                apply(self);
                Outcome::Ack(Vec::new())
            }
            Err(e) => {
                tracing::error!(terminal = %self.spec.id, error = %e, "a terminal report could not be recorded; not acknowledged");
                Outcome::Retry
            }
        }
    }
}

fn deny_frame(e: &TerminalError) -> Frame {
    let reason = match e {
        TerminalError::Denied(_) => pb::DenyReason::Approval,
        TerminalError::Busy(_) | TerminalError::GrantLive(_) => pb::DenyReason::Busy,
        TerminalError::Audit(_) => pb::DenyReason::Audit,
        TerminalError::Invalid(_) | TerminalError::Unavailable(_) => pb::DenyReason::Invalid,
    };
    Frame::new(
        0,
        Command::UnlockDeny,
        pb::UnlockDeny {
            reason: reason as u32,
            // Well under a frame's payload limit.
            message: e.to_string().chars().take(1000).collect(),
        }
        .encode_to_vec(),
    )
}
