//! sealgate-terminal: a smart-seal terminal, simulated, speaking terminal protocol v1 to the
//! daemon over a pseudo-terminal (as a serial line) or over TCP with mutual TLS.
//!
//! It behaves as a terminal does: HELLO after every connection, heartbeats, an unlock request,
//! impressions only while a grant lasts (then LOCKED), signed reports sent again until ACKed
//! (across reconnections, ahead of the new HELLO). On command
//! it also misbehaves: impressions without a grant, counter jumps and rollbacks, replayed and
//! badly signed reports, tamper reports, corrupt, truncated and unknown frames, noise, a line
//! cut mid-frame, a port that vanishes and comes back.
//!
//! Commands on standard input, one per line:
//! `request TOKEN_BASE64 DOC_SHA256_HEX [IMPRESSIONS]`, `press`, `force`, `jump N`, `rollback N`,
//! `replay`, `badsig`, `tamper`, `hello`, `corrupt`, `truncate`, `noise N`, `unknown`, `cut`,
//! `vanish`, `return`, `silence`, `resume`, `deaf N` (ignore the next N frames), `cut-on-grant`
//! (take the next grant and cut the line before its ACK), `lose-grants N` (ignore the next N
//! UNLOCK_GRANT frames), `status`.
//! Events on standard output, one per line: `connected`, `disconnected`, `ack seq=N`,
//! `nak seq=N reason=N`, `granted impressions=N seconds=N`, `denied reason=N message=...`,
//! `impression counter=N`, `locked`, `refused no-grant`, `gave-up seq=N` (a heartbeat or
//! request), `holding seq=N` (a report past its retries, still sent again),
//! `status counter=N left=N`, `lost cmd=N seq=N`, `line-error ...`.

use anyhow::{anyhow, Context};
use clap::Parser;
use ed25519_dalek::SigningKey;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use prost::Message;
use sealgate::terminal::{ack, pb, sign_report, Command, Decoder, Frame};
use std::collections::VecDeque;
use std::io::{BufRead, ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    version,
    about = "A smart-seal terminal simulator (terminal protocol v1)"
)]
struct Args {
    /// The terminal's id, as enrolled.
    #[arg(long)]
    id: String,
    /// File holding the device key's 32-byte Ed25519 seed in hex.
    #[arg(long)]
    key_file: PathBuf,
    /// Impressions made before this run.
    #[arg(long, default_value_t = 0)]
    counter: u64,
    #[arg(long, default_value = "sim-1.0")]
    firmware: String,
    /// Serial mode: make a pseudo-terminal and point this symlink at its device (the daemon's
    /// configured port).
    #[arg(long, conflicts_with = "tls")]
    pty_link: Option<PathBuf>,
    /// TLS mode: the daemon's terminal listener.
    #[arg(long, requires_all = ["ca", "cert", "key"])]
    tls: Option<String>,
    /// CA certificate (PEM) the daemon's certificate chains to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This terminal's client certificate and key (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    #[arg(long, default_value_t = 300)]
    ack_timeout_ms: u64,
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Milliseconds this terminal keeps a grant beyond its time limit (a slow clock).
    #[arg(long, default_value_t = 0)]
    grant_slack_ms: u64,
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A line to the daemon. `poll_read` returns Ok(None) when nothing came in time, Ok(Some(0))
/// at end of stream.
trait Line: Send {
    fn poll_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>>;
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

/// The terminal's end of a pseudo-terminal: the master side. The slave side stays open here
/// too, so the master reads normally before the daemon opens the port.
struct Pty {
    master: std::fs::File,
    _slave: OwnedFd,
}

impl Line for Pty {
    fn poll_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let mut fds = [PollFd::new(self.master.as_fd(), PollFlags::POLLIN)];
        let n = nix::poll::poll(&mut fds, PollTimeout::from(20u8)).map_err(std::io::Error::from)?;
        if n == 0 {
            return Ok(None);
        }
        self.master.read(buf).map(Some)
    }
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.master.write_all(bytes)?;
        self.master.flush()
    }
}

struct Tls(rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>);

impl Line for Tls {
    fn poll_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self.0.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes)?;
        self.0.flush()
    }
}

fn open_pty(link: &PathBuf) -> anyhow::Result<Pty> {
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    let mut t = nix::sys::termios::tcgetattr(&pty.slave).context("tcgetattr")?;
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t)
        .context("tcsetattr")?;
    let name = nix::unistd::ttyname(&pty.slave).context("ttyname")?;
    let tmp = link.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp).context("symlink")?;
    std::fs::rename(&tmp, link).context("rename symlink")?;
    Ok(Pty {
        master: std::fs::File::from(pty.master),
        _slave: pty.slave,
    })
}

fn open_tls(a: &Args) -> anyhow::Result<Tls> {
    use rustls::pki_types::ServerName;
    let config = sealgate::tls::client_config(
        a.ca.as_ref().expect("required"),
        Some((
            a.cert.as_ref().expect("required"),
            a.key.as_ref().expect("required"),
        )),
    )
    .map_err(anyhow::Error::msg)?;
    let name = ServerName::try_from(a.server_name.clone())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let tcp = std::net::TcpStream::connect(a.tls.as_ref().expect("tls mode"))?;
    tcp.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Finish the handshake before the first protocol byte.
    while stream.conn.is_handshaking() {
        match stream.conn.complete_io(&mut stream.sock) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Tls(stream))
}

struct Grant {
    id: Vec<u8>,
    left: u32,
    until: Instant,
}

struct Terminal {
    args: Args,
    key: SigningKey,
    counter: u64,
    line: Option<Box<dyn Line>>,
    decoder: Decoder,
    seq: u8,
    outstanding: Option<(Frame, Instant, u32)>,
    queue: VecDeque<Frame>,
    last_rx: Option<(u8, u8)>,
    grant: Option<Grant>,
    last_impression: Option<Vec<u8>>,
    heartbeats: bool,
    last_heartbeat: Instant,
    started: Instant,
    /// A vanished port stays away until `return`.
    away: bool,
    /// Frames from the daemon still to be ignored, as if lost on the line.
    deaf: u32,
    /// The next UNLOCK_GRANT is taken, and the line is cut before its ACK goes out.
    cut_on_grant: bool,
    /// UNLOCK_GRANT frames still to be ignored, as if lost on the line.
    lose_grants: u32,
}

impl Terminal {
    fn connect(&mut self) {
        let line: anyhow::Result<Box<dyn Line>> = match (&self.args.pty_link, &self.args.tls) {
            (Some(link), _) => open_pty(link).map(|p| Box::new(p) as Box<dyn Line>),
            (None, Some(_)) => open_tls(&self.args).map(|t| Box::new(t) as Box<dyn Line>),
            _ => Err(anyhow!("neither --pty-link nor --tls")),
        };
        match line {
            Ok(l) => {
                self.line = Some(l);
                self.decoder = Decoder::new();
                self.last_rx = None;
                // Signed reports not yet ACKed go first, as they were (the outstanding one
                // with its seq); the HELLO follows them, so its counter is never ahead of
                // what the daemon has been sent. Heartbeats and requests are not kept.
                let outstanding = self.outstanding.take().map(|o| o.0);
                let queued: Vec<Frame> = self.queue.drain(..).collect();
                say("connected");
                if let Some(f) = outstanding.filter(kept_until_acked) {
                    self.raw(&f.encode());
                    self.outstanding = Some((f, Instant::now(), 1));
                }
                for f in queued.into_iter().filter(kept_until_acked) {
                    if self.outstanding.is_none() {
                        self.transmit(f);
                    } else {
                        self.queue.push_back(f);
                    }
                }
                self.hello();
            }
            Err(e) => say(&format!("line-error {e:#}")),
        }
    }

    fn drop_line(&mut self, why: &str) {
        if self.line.take().is_some() {
            say(&format!("disconnected {why}"));
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        if let Some(l) = self.line.as_mut() {
            if let Err(e) = l.send(bytes) {
                self.drop_line(&format!("write failed: {e}"));
            }
        }
    }

    fn next_seq(&mut self) -> u8 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends a frame that must be ACKed: one in flight, the rest queued.
    fn send(&mut self, cmd: Command, payload: Vec<u8>) {
        let frame = Frame::new(0, cmd, payload);
        if self.outstanding.is_some() {
            self.queue.push_back(frame);
        } else {
            self.transmit(frame);
        }
    }

    fn transmit(&mut self, mut frame: Frame) {
        frame.seq = self.next_seq();
        self.raw(&frame.encode());
        self.outstanding = Some((frame, Instant::now(), 1));
    }

    fn signed(&self, cmd: Command, body: Vec<u8>) -> Vec<u8> {
        sign_report(&self.key, &self.args.id, cmd, body)
    }

    fn hello(&mut self) {
        let body = pb::Hello {
            terminal_id: self.args.id.clone(),
            firmware: self.args.firmware.clone(),
            counter: self.counter,
            device_public_key: self.key.verifying_key().to_bytes().to_vec(),
        }
        .encode_to_vec();
        let p = self.signed(Command::Hello, body);
        self.send(Command::Hello, p);
    }

    fn impression(&mut self, key: &SigningKey) {
        self.counter += 1;
        let grant_id = self
            .grant
            .as_ref()
            .map(|g| g.id.clone())
            .unwrap_or_default();
        let body = pb::Impression {
            grant_id,
            counter: self.counter,
            at_unix_ms: now_ms(),
            photo_sha256: vec![0x11; 32],
        }
        .encode_to_vec();
        let p = sign_report(key, &self.args.id, Command::Impression, body);
        self.last_impression = Some(p.clone());
        self.send(Command::Impression, p);
        say(&format!("impression counter={}", self.counter));
    }

    fn locked(&mut self, why: u32) {
        let grant_id = self.grant.take().map(|g| g.id).unwrap_or_default();
        let body = pb::Locked {
            grant_id,
            counter: self.counter,
            why,
        }
        .encode_to_vec();
        let p = self.signed(Command::Locked, body);
        self.send(Command::Locked, p);
        say("locked");
    }

    fn command(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        match words.as_slice() {
            ["request", token, doc, ..] => {
                use base64::Engine;
                let Ok(token) = base64::engine::general_purpose::STANDARD.decode(token) else {
                    say("unknown-command the token must be base64");
                    return;
                };
                let req = pb::UnlockRequest {
                    approval_token: token,
                    document_sha256: hex::decode(doc).unwrap_or_default(),
                    photo_sha256: vec![0x22; 32],
                    impressions: num(3).unwrap_or(1) as u32,
                    mfa_code: words.get(4).unwrap_or(&"").to_string(),
                };
                self.send(Command::UnlockRequest, req.encode_to_vec());
            }
            ["press"] => {
                let live = self
                    .grant
                    .as_ref()
                    .is_some_and(|g| g.left > 0 && Instant::now() < g.until);
                if !live {
                    say("refused no-grant");
                    return;
                }
                let key = self.key.clone();
                self.impression(&key);
                let g = self.grant.as_mut().expect("live");
                g.left -= 1;
                if g.left == 0 {
                    self.locked(0);
                }
            }
            ["force"] => {
                let key = self.key.clone();
                self.impression(&key);
            }
            ["badsig"] => self.impression(&SigningKey::from_bytes(&[0x5A; 32])),
            ["jump", _] => self.counter += num(1).unwrap_or(1),
            ["rollback", _] => self.counter = self.counter.saturating_sub(num(1).unwrap_or(1)),
            ["replay"] => {
                if let Some(p) = self.last_impression.clone() {
                    self.send(Command::Impression, p);
                }
            }
            ["tamper"] => {
                let body = pb::Tamper {
                    code: 7,
                    counter: self.counter,
                    at_unix_ms: now_ms(),
                    detail: "case opened".into(),
                }
                .encode_to_vec();
                let p = self.signed(Command::Tamper, body);
                self.send(Command::Tamper, p);
            }
            ["hello"] => self.hello(),
            ["corrupt"] => {
                let mut b = self.heartbeat_frame().encode();
                let n = b.len();
                b[n - 1] ^= 0xFF;
                self.raw(&b);
            }
            ["truncate"] => {
                let b = self.heartbeat_frame().encode();
                self.raw(&b[..b.len() / 2]);
            }
            ["noise", _] => {
                let mut b = vec![0u8; num(1).unwrap_or(16) as usize];
                getrandom::fill(&mut b).expect("random bytes");
                // No start marker inside, so the noise cannot pass for a frame.
                for x in b.iter_mut() {
                    if *x == 0xA5 {
                        *x = 0;
                    }
                }
                self.raw(&b);
            }
            ["unknown"] => {
                let f = Frame {
                    seq: self.next_seq(),
                    cmd: 0x55,
                    payload: vec![1, 2, 3],
                };
                self.raw(&f.encode());
            }
            ["cut"] => {
                let b = self.heartbeat_frame().encode();
                self.raw(&b[..b.len() / 2]);
                self.drop_line("cut mid-frame");
                self.connect();
            }
            ["vanish"] => {
                self.away = true;
                self.drop_line("vanished");
                if let Some(link) = &self.args.pty_link {
                    let _ = std::fs::remove_file(link);
                }
            }
            ["return"] => {
                self.away = false;
                self.connect();
            }
            ["deaf", _] => self.deaf = num(1).unwrap_or(1) as u32,
            // Said once in force, so a test knows the next grant meets it.
            ["cut-on-grant"] => {
                self.cut_on_grant = true;
                say("armed cut-on-grant");
            }
            ["lose-grants", _] => {
                self.lose_grants = num(1).unwrap_or(1) as u32;
                say(&format!("armed lose-grants {}", self.lose_grants));
            }
            ["silence"] => self.heartbeats = false,
            ["resume"] => {
                self.heartbeats = true;
                self.last_heartbeat = Instant::now() - Duration::from_secs(3600);
            }
            ["status"] => say(&format!(
                "status counter={} left={}",
                self.counter,
                self.grant.as_ref().map(|g| g.left).unwrap_or(0)
            )),
            _ => say(&format!("unknown-command {line}")),
        }
    }

    fn heartbeat_frame(&mut self) -> Frame {
        let hb = pb::Heartbeat {
            counter: self.counter,
            uptime_ms: self.started.elapsed().as_millis() as u64,
        };
        Frame::new(self.next_seq(), Command::Heartbeat, hb.encode_to_vec())
    }

    fn on_frame(&mut self, f: Frame) {
        if self.deaf > 0 {
            self.deaf -= 1;
            say(&format!("lost cmd={} seq={}", f.cmd, f.seq));
            return;
        }
        match f.command() {
            Some(Command::Ack) => {
                if self.outstanding.as_ref().is_some_and(|o| o.0.seq == f.seq) {
                    say(&format!("ack seq={}", f.seq));
                    self.outstanding = None;
                    if let Some(next) = self.queue.pop_front() {
                        self.transmit(next);
                    }
                }
            }
            Some(Command::Nak) => {
                let reason = pb::Nak::decode(f.payload.as_slice())
                    .map(|n| n.reason)
                    .unwrap_or(0);
                say(&format!("nak seq={} reason={reason}", f.seq));
                if let Some(o) = self.outstanding.as_mut() {
                    if o.0.seq == f.seq {
                        o.1 = Instant::now() - Duration::from_secs(3600);
                    }
                }
            }
            Some(Command::UnlockGrant) if self.lose_grants > 0 => {
                self.lose_grants -= 1;
                say(&format!("lost cmd={} seq={}", f.cmd, f.seq));
            }
            Some(Command::UnlockGrant) | Some(Command::UnlockDeny) => {
                let cut = self.cut_on_grant && f.command() == Some(Command::UnlockGrant);
                if !cut {
                    self.raw(&ack(f.seq).encode());
                }
                if self.last_rx == Some((f.seq, f.cmd)) {
                    return;
                }
                self.last_rx = Some((f.seq, f.cmd));
                if f.command() == Some(Command::UnlockGrant) {
                    match pb::UnlockGrant::decode(f.payload.as_slice()) {
                        Ok(g) => {
                            say(&format!(
                                "granted impressions={} seconds={}",
                                g.impressions, g.seconds
                            ));
                            self.grant = Some(Grant {
                                id: g.grant_id,
                                left: g.impressions,
                                until: Instant::now()
                                    + Duration::from_secs(g.seconds as u64)
                                    + Duration::from_millis(self.args.grant_slack_ms),
                            });
                        }
                        Err(e) => say(&format!("line-error bad grant: {e}")),
                    }
                    if cut {
                        self.cut_on_grant = false;
                        self.drop_line("cut before the grant's ACK");
                        self.connect();
                    }
                } else {
                    let d = pb::UnlockDeny::decode(f.payload.as_slice()).unwrap_or_default();
                    say(&format!("denied reason={} message={}", d.reason, d.message));
                }
            }
            _ => self.raw(&sealgate::terminal::nak(f.seq, pb::NakReason::UnknownCommand).encode()),
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if let Some((frame, sent, tries)) = self.outstanding.clone() {
            if now.duration_since(sent) > Duration::from_millis(self.args.ack_timeout_ms) {
                if tries > self.args.retries && kept_until_acked(&frame) {
                    // A signed report is never given up: it is sent again until ACKed.
                    if tries == self.args.retries + 1 {
                        say(&format!("holding seq={}", frame.seq));
                    }
                    self.raw(&frame.encode());
                    self.outstanding = Some((frame, now, tries + 1));
                } else if tries > self.args.retries {
                    say(&format!("gave-up seq={}", frame.seq));
                    self.outstanding = None;
                    if let Some(next) = self.queue.pop_front() {
                        self.transmit(next);
                    }
                } else {
                    self.raw(&frame.encode());
                    self.outstanding = Some((frame, now, tries + 1));
                }
            }
        }
        // A frame in flight already shows the terminal is alive; heartbeats do not pile up
        // behind a report the daemon has not ACKed.
        if self.heartbeats
            && self.line.is_some()
            && self.outstanding.is_none()
            && now.duration_since(self.last_heartbeat)
                > Duration::from_millis(self.args.heartbeat_ms)
        {
            self.last_heartbeat = now;
            let hb = pb::Heartbeat {
                counter: self.counter,
                uptime_ms: self.started.elapsed().as_millis() as u64,
            };
            self.send(Command::Heartbeat, hb.encode_to_vec());
        }
        if let Some(g) = &self.grant {
            if now > g.until && g.left > 0 {
                self.locked(1);
            }
        }
    }
}

/// HELLO, IMPRESSION, LOCKED and TAMPER: signed reports the terminal keeps until ACKed.
fn kept_until_acked(f: &Frame) -> bool {
    matches!(
        f.command(),
        Some(Command::Hello | Command::Impression | Command::Locked | Command::Tamper)
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed_hex = std::fs::read_to_string(&args.key_file)
        .with_context(|| format!("cannot read {}", args.key_file.display()))?;
    let seed: [u8; 32] = hex::decode(seed_hex.trim())
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| anyhow!("{} must hold 32 bytes in hex", args.key_file.display()))?;
    let key = SigningKey::from_bytes(&seed);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let counter = args.counter;
    let mut t = Terminal {
        args,
        key,
        counter,
        line: None,
        decoder: Decoder::new(),
        seq: 0,
        outstanding: None,
        queue: VecDeque::new(),
        last_rx: None,
        grant: None,
        last_impression: None,
        heartbeats: true,
        last_heartbeat: Instant::now(),
        started: Instant::now(),
        away: false,
        deaf: 0,
        cut_on_grant: false,
        lose_grants: 0,
    };
    t.connect();
    let mut buf = [0u8; 2048];
    let mut retry_at = Instant::now();
    loop {
        loop {
            match rx.try_recv() {
                Ok(line) => t.command(&line),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            }
        }
        if t.line.is_none() {
            if !t.away && Instant::now() >= retry_at {
                retry_at = Instant::now() + Duration::from_millis(500);
                t.connect();
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let read = t.line.as_mut().expect("checked").poll_read(&mut buf);
        match read {
            Ok(None) => {}
            Ok(Some(0)) => t.drop_line("closed by the daemon"),
            Ok(Some(n)) => {
                t.decoder.push(&buf[..n]);
                while let Some(next) = t.decoder.next_frame() {
                    if let Ok(f) = next {
                        t.on_frame(f);
                    }
                }
            }
            Err(e) => t.drop_line(&format!("read failed: {e}")),
        }
        t.tick();
    }
}
