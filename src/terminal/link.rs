//! The lines terminals are reached over: a serial port (settings from the device profile), or
//! TCP with mutual TLS where each terminal's client certificate is pinned by its SHA-256.
//!
//! A link is any byte stream that reads with a short timeout, so one thread can serve a
//! terminal's timers and its line together.

use crate::device::profile::TerminalProfile;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long a read waits before the session looks at its timers again.
pub const POLL: Duration = Duration::from_millis(25);
/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A terminal's line. Reads return `Ok(0)` only at end of stream; a read that times out is an
/// error of kind `TimedOut` or `WouldBlock`.
pub trait Link: Read + Write + Send {
    /// Where the line goes, for records and logs.
    fn describe(&self) -> String;
}

/// Opens a serial port with the profile's line settings.
pub fn open_serial(path: &Path, p: &TerminalProfile) -> Result<Box<dyn Link>, String> {
    let parity = match p.parity.as_str() {
        "even" => serialport::Parity::Even,
        "odd" => serialport::Parity::Odd,
        _ => serialport::Parity::None,
    };
    let data_bits = match p.data_bits {
        5 => serialport::DataBits::Five,
        6 => serialport::DataBits::Six,
        7 => serialport::DataBits::Seven,
        _ => serialport::DataBits::Eight,
    };
    let stop_bits = if p.stop_bits == 2 {
        serialport::StopBits::Two
    } else {
        serialport::StopBits::One
    };
    let port = serialport::new(path.to_string_lossy(), p.baud_rate)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .flow_control(serialport::FlowControl::None)
        .timeout(POLL)
        .open_native()
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok(Box::new(Serial {
        port,
        path: path.display().to_string(),
    }))
}

struct Serial {
    port: serialport::TTYPort,
    path: String,
}

impl Read for Serial {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.port.read(buf)
    }
}

impl Write for Serial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.port.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.port.flush()
    }
}

impl Link for Serial {
    fn describe(&self) -> String {
        format!("serial {}", self.path)
    }
}

/// A terminal's TLS connection.
pub struct TlsLink {
    stream: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    peer: String,
}

impl Read for TlsLink {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for TlsLink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

impl Link for TlsLink {
    fn describe(&self) -> String {
        format!("tls {}", self.peer)
    }
}

/// The TLS side of the terminal listener: the daemon's certificate, and the pinned terminals.
pub struct TlsAcceptor {
    config: Arc<rustls::ServerConfig>,
    /// Certificate SHA-256 → terminal id.
    terminals: HashMap<[u8; 32], String>,
}

impl TlsAcceptor {
    /// `pins`: (terminal id, certificate SHA-256).
    pub fn new(
        cert: &Path,
        key: &Path,
        pins: &[(String, [u8; 32])],
    ) -> Result<TlsAcceptor, String> {
        let config = crate::tls::pinned_server_config(
            cert,
            key,
            pins.iter().map(|(_, fp)| *fp).collect(),
            None,
        )?;
        Ok(TlsAcceptor {
            config: Arc::new(config),
            terminals: pins.iter().map(|(id, fp)| (*fp, id.clone())).collect(),
        })
    }

    /// Runs the handshake on a new connection. A certificate that is not pinned fails it, so
    /// not one protocol byte of such a peer is ever read. Returns the terminal's id and link.
    pub fn accept(&self, tcp: TcpStream) -> Result<(String, Box<dyn Link>), String> {
        let peer = tcp
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let fail = |e: String| format!("TLS handshake with {peer} failed: {e}");
        tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| fail(e.to_string()))?;
        tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut conn =
            rustls::ServerConnection::new(self.config.clone()).map_err(|e| fail(e.to_string()))?;
        let mut tcp = tcp;
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut tcp) {
                return Err(fail(e.to_string()));
            }
        }
        let fp: [u8; 32] = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(crate::tls::fingerprint)
            .ok_or_else(|| fail("no client certificate".into()))?;
        let id = self
            .terminals
            .get(&fp)
            .cloned()
            .ok_or_else(|| fail("certificate not pinned".into()))?;
        tcp.set_read_timeout(Some(POLL))
            .map_err(|e| fail(e.to_string()))?;
        Ok((
            id,
            Box::new(TlsLink {
                stream: rustls::StreamOwned::new(conn, tcp),
                peer,
            }),
        ))
    }
}
