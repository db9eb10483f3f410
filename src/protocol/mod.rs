//! The wire contract: message types generated from `proto/sealgate/v1/sealgate.proto`, the
//! frame codec, and a client.
//!
//! Owns: how bytes on the socket become messages and back. Never: decides anything about a
//! request; that is the service's job.

pub mod client;
pub mod codec;

/// Generated from the .proto file by `build.rs`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/sealgate.v1.rs"));
}

pub use pb::{request, response, Request, Response, Status};

/// The protocol version this build speaks (`HelloRequest.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Default largest frame, in bytes.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// Stable text names of the status codes, as printed by sealctl and documented in README.
pub fn status_name(code: i32) -> &'static str {
    match Status::try_from(code) {
        Ok(s) => s.as_str_name().trim_start_matches("STATUS_"),
        Err(_) => "UNKNOWN_STATUS",
    }
}
