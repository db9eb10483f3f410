//! sealgate: a local daemon that stands between an enterprise's seals and everyone who wants to
//! use them.
//!
//! Rooms, in the order a request passes through them:
//! - [`server`]: the Unix socket, peer credentials, frames, connection limits, shutdown.
//! - [`protocol`]: the wire contract (generated from `proto/`), the frame codec, a client.
//! - [`service`]: the stamp pipeline and the one mapping of errors to wire status codes.
//! - [`approval`]: approval tokens, the trust store, the replay ledger, TOTP.
//! - [`policy`]: each seal's rules: which approvals, in which order, when, how often.
//! - [`audit`]: the hash-chained, device-attested audit log; verification, queries, alerts.
//! - [`store`]: the durable state (SQLite).
//! - [`device`]: the seal devices behind one trait (PKCS#11, PIV cards), and device profiles.
//! - [`terminal`]: smart-seal terminals: their protocol, lines (serial, mutual TLS), sessions.
//! - [`config`]: the daemon's TOML configuration and the PINs it points to.
//! - [`pdf`]: PDF signatures with a visible seal, for `sealctl` (the daemon sees digests only).
//! - [`timestamp`]: trusted time from an RFC 3161 authority for container stamps.
//! - [`metrics`]: Prometheus counters and histograms, and their loopback endpoint.
//! - [`hq`]: headquarters: the shipper at each site, and `sealgate-hq`'s verification and
//!   PostgreSQL store of every site's log.
//! - [`tls`]: mutual TLS with pinned client certificates (terminals, sites), and the
//!   console's TLS for browsers.
//! - [`console`]: the auditors' console: read-only web pages over the audit log, served by a
//!   process of its own.
#![deny(unsafe_code)]

pub mod approval;
pub mod audit;
pub mod config;
#[cfg(feature = "console")]
pub mod console;
pub mod container;
pub mod denial;
pub mod device;
pub mod handoff;
pub mod hq;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod pdf;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod service;
pub mod store;
pub mod terminal;
pub mod timestamp;
pub mod tls;
pub mod token;

/// Aborts the process here when the crash point `name` is armed (`FAILPOINTS=name=return`,
/// with a count such as `5*off->return` to pass it five times first). Compiled in only with the
/// `failpoints` feature, for the crash-point tests; otherwise nothing.
#[macro_export]
macro_rules! crash_point {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        if fail::eval($name, |_| ()).is_some() {
            std::process::abort();
        }
    };
}
