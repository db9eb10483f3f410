//! A client for the daemon's socket, used by sealctl and the tests.

use super::codec::{FrameCodec, FrameError};
use super::pb;
use super::{request, Request, Response, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use std::path::Path;
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("connection error: {0}")]
    Frame(#[from] FrameError),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("the daemon sent a reply that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// A peer that hung up shows as a broken pipe or a reset, depending on timing; both are a close.
fn closed_or(e: FrameError) -> ClientError {
    match &e {
        FrameError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            ClientError::Closed
        }
        _ => ClientError::Frame(e),
    }
}

pub struct Client {
    framed: Framed<UnixStream, FrameCodec>,
    next_id: u64,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Client {
            framed: Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME)),
            next_id: 1,
        })
    }

    /// The uid of the process on the other end of the socket (SO_PEERCRED), as the kernel
    /// reports it.
    pub fn peer_uid(&self) -> std::io::Result<u32> {
        Ok(self.framed.get_ref().peer_cred()?.uid())
    }

    /// Waits for the next response on this connection (for requests answered more than once,
    /// such as followed alerts).
    pub async fn next_response(&mut self) -> Result<Response, ClientError> {
        let frame = self
            .framed
            .next()
            .await
            .ok_or(ClientError::Closed)?
            .map_err(closed_or)?;
        Ok(Response::decode(frame)?)
    }

    /// Sends one request and waits for its response.
    pub async fn call(&mut self, body: request::Body) -> Result<Response, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            request_id: id,
            body: Some(body),
        };
        self.framed
            .send(req.encode_to_vec().into())
            .await
            .map_err(closed_or)?;
        self.next_response().await
    }

    pub async fn hello(&mut self, client_name: &str) -> Result<Response, ClientError> {
        self.call(request::Body::Hello(pb::HelloRequest {
            protocol_version: PROTOCOL_VERSION,
            client_name: client_name.to_owned(),
        }))
        .await
    }

    pub async fn list_seals(&mut self) -> Result<Response, ClientError> {
        self.call(request::Body::ListSeals(pb::ListSealsRequest {}))
            .await
    }

    pub async fn describe_seal(&mut self, seal_id: &str) -> Result<Response, ClientError> {
        self.call(request::Body::DescribeSeal(pb::DescribeSealRequest {
            seal_id: seal_id.to_owned(),
        }))
        .await
    }

    pub async fn stamp(
        &mut self,
        seal_id: &str,
        document_sha256: &[u8],
        approval_token: &[u8],
        purpose: &str,
    ) -> Result<Response, ClientError> {
        self.stamp_with_mfa(seal_id, document_sha256, approval_token, purpose, "")
            .await
    }

    pub async fn stamp_with_mfa(
        &mut self,
        seal_id: &str,
        document_sha256: &[u8],
        approval_token: &[u8],
        purpose: &str,
        mfa_code: &str,
    ) -> Result<Response, ClientError> {
        self.call(request::Body::Stamp(pb::StampRequest {
            seal_id: seal_id.to_owned(),
            document_sha256: document_sha256.to_vec(),
            approval_token: approval_token.to_vec(),
            purpose: purpose.to_owned(),
            mfa_code: mfa_code.to_owned(),
            container: pb::Container::Raw as i32,
        }))
        .await
    }

    /// A stamp as `request` says it, container included.
    pub async fn stamp_request(
        &mut self,
        request: pb::StampRequest,
    ) -> Result<Response, ClientError> {
        self.call(request::Body::Stamp(request)).await
    }

    pub async fn check_approval(
        &mut self,
        seal_id: &str,
        document_sha256: &[u8],
        approval_token: &[u8],
        mfa_code: &str,
    ) -> Result<Response, ClientError> {
        self.call(request::Body::CheckApproval(pb::CheckApprovalRequest {
            seal_id: seal_id.to_owned(),
            document_sha256: document_sha256.to_vec(),
            approval_token: approval_token.to_vec(),
            mfa_code: mfa_code.to_owned(),
        }))
        .await
    }

    pub async fn enroll_mfa(&mut self, user: &str) -> Result<Response, ClientError> {
        self.call(request::Body::EnrollMfa(pb::EnrollMfaRequest {
            user: user.to_owned(),
        }))
        .await
    }

    pub async fn reset_mfa(&mut self, user: &str) -> Result<Response, ClientError> {
        self.call(request::Body::ResetMfa(pb::ResetMfaRequest {
            user: user.to_owned(),
        }))
        .await
    }

    pub async fn status(&mut self) -> Result<Response, ClientError> {
        self.call(request::Body::Status(pb::StatusRequest {})).await
    }

    /// The `recent` newest alerts; with `follow`, each later alert arrives as a further
    /// response (read them with [`Client::next_response`]).
    pub async fn watch_alerts(
        &mut self,
        recent: u32,
        follow: bool,
    ) -> Result<Response, ClientError> {
        self.call(request::Body::WatchAlerts(pb::WatchAlertsRequest {
            recent,
            follow,
        }))
        .await
    }
}
