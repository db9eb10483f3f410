//! The listener and the per-connection loop.
//!
//! Owns: creating the Unix socket (mode 0660, its group, a stale file replaced only when nobody
//! listens on it) or adopting one from systemd, the connection caps (the daemon's and each
//! uid's share), reading frames with a time limit, peer credentials, and graceful shutdown (stop
//! accepting, let requests in flight finish, close idle connections).
//! Never: interprets a request beyond decoding it; the service does that.

use crate::protocol::codec::{FrameCodec, FrameError};
use crate::protocol::{pb, request, response, Request, Response, Status};
use crate::service::{Service, ServiceError};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket { path: PathBuf },
    #[error("another process is listening on {path}")]
    InUse { path: PathBuf },
    #[error("cannot create socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket group {0:?} does not exist")]
    UnknownGroup(String),
    #[error("cannot adopt the socket passed by systemd: {0}")]
    Adopt(std::io::Error),
}

/// Limits applied to every connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame: usize,
    pub max_connections: usize,
    /// Connections one uid may hold at once.
    pub max_per_uid: usize,
    /// Connections all strangers together may hold, apart from the callers' slots.
    pub max_strangers: usize,
    pub request_timeout: Duration,
}

/// Connections held per uid. A [`UidSlot`] gives its place back when dropped.
#[derive(Default)]
struct PerUid(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

struct UidSlot {
    counts: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    fn take(self: &Arc<Self>, uid: u32, max: usize) -> Option<UidSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let held = m.entry(uid).or_insert(0);
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = m.get_mut(&self.uid) {
            *held -= 1;
            if *held == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// The places a connection holds: a caller's, one of the daemon's and one of its uid's share;
/// a stranger's, one of the strangers' few.
enum Slot {
    Caller {
        _daemon: tokio::sync::OwnedSemaphorePermit,
        _uid: UidSlot,
    },
    Stranger {
        _held: tokio::sync::OwnedSemaphorePermit,
    },
}

/// A listening socket, and whether we made its file (and so remove it on exit).
pub struct Listener {
    pub listener: UnixListener,
    pub owned_path: Option<PathBuf>,
}

impl Listener {
    /// Adopts the first socket systemd passed (LISTEN_FDS), if any.
    pub fn from_systemd() -> Result<Option<Listener>, ServerError> {
        let mut fds = listenfd::ListenFd::from_env();
        match fds.take_unix_listener(0).map_err(ServerError::Adopt)? {
            Some(std_listener) => {
                std_listener
                    .set_nonblocking(true)
                    .map_err(ServerError::Adopt)?;
                let listener = UnixListener::from_std(std_listener).map_err(ServerError::Adopt)?;
                Ok(Some(Listener {
                    listener,
                    owned_path: None,
                }))
            }
            None => Ok(None),
        }
    }

    /// Creates the socket at `path` with mode 0660 and, if given, group `group`.
    pub fn bind(path: &Path, group: Option<&str>) -> Result<Listener, ServerError> {
        let gid = match group {
            Some(g) => Some(
                nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .ok_or_else(|| ServerError::UnknownGroup(g.to_owned()))?
                    .gid,
            ),
            None => None,
        };
        replace_stale(path)?;
        let bind_err = |source| ServerError::Bind {
            path: path.to_owned(),
            source,
        };
        // The socket must never exist with wider permissions than 0660, even for a moment.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
        if let Some(gid) = gid {
            nix::unistd::chown(path, None, Some(gid))
                .map_err(|e| bind_err(std::io::Error::from(e)))?;
        }
        Ok(Listener {
            listener,
            owned_path: Some(path.to_owned()),
        })
    }
}

fn replace_stale(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Bind {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing stale socket");
            std::fs::remove_file(path).map_err(|source| ServerError::Bind {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(ServerError::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Serves connections until `shutdown` resolves, then waits for requests in flight to finish.
pub async fn run(
    listener: UnixListener,
    service: Arc<Service>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let per_uid = Arc::new(PerUid::default());
    let strangers = Arc::new(Semaphore::new(limits.max_strangers));
    let tracker = TaskTracker::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off briefly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let cred = match stream.peer_cred() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read peer credentials; closing");
                        continue;
                    }
                };
                let peer = service.identify(cred.uid(), cred.gid(), cred.pid());
                let slot = if peer.caller.is_none() {
                    // Strangers share a few places of their own: however many connections
                    // they open, the callers' slots stay free.
                    match strangers.clone().try_acquire_owned() {
                        Ok(permit) => Slot::Stranger { _held: permit },
                        Err(_) => {
                            let why = format!(
                                "uids that are not configured callers hold {} connections, their most at once",
                                limits.max_strangers
                            );
                            tracker.spawn(refuse_busy(stream, limits, why));
                            continue;
                        }
                    }
                } else {
                    let Some(uid_slot) = per_uid.take(cred.uid(), limits.max_per_uid) else {
                        let why = format!(
                            "uid {} already holds {} connections, its most at once",
                            cred.uid(),
                            limits.max_per_uid
                        );
                        tracker.spawn(refuse_busy(stream, limits, why));
                        continue;
                    };
                    match slots.clone().try_acquire_owned() {
                        Ok(permit) => Slot::Caller { _daemon: permit, _uid: uid_slot },
                        Err(_) => {
                            let why = format!(
                                "the daemon serves at most {} connections at once",
                                limits.max_connections
                            );
                            tracker.spawn(refuse_busy(stream, limits, why));
                            continue;
                        }
                    }
                };
                let service = service.clone();
                let stop = stop_rx.clone();
                tracker.spawn(serve(stream, peer, service, limits, stop, slot));
            }
        }
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    let _ = stop_tx.send(true);
    tracker.close();
    tracker.wait().await;
}

async fn refuse_busy(stream: UnixStream, limits: Limits, why: String) {
    let mut framed = Framed::new(stream, FrameCodec::new(limits.max_frame));
    let e = ServiceError::Busy(why);
    let _ = send(&mut framed, e.into_response(0)).await;
}

async fn send(framed: &mut Framed<UnixStream, FrameCodec>, resp: Response) -> bool {
    framed.send(Bytes::from(resp.encode_to_vec())).await.is_ok()
}

async fn serve(
    stream: UnixStream,
    peer: crate::service::Peer,
    service: Arc<Service>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    slot: Slot,
) {
    let span = tracing::info_span!(
        "conn",
        pid = peer.pid.unwrap_or(0),
        uid = peer.uid,
        caller = peer.caller.as_ref().map(|c| c.name.as_str()).unwrap_or("-")
    );
    service.connection_opened();
    let framed = connection(stream, &service, &peer, limits, &mut stop)
        .instrument(span)
        .await;
    service.connection_closed();
    // The slot is free before the peer sees the close, so a client that reconnects at once is
    // never refused for a slot its own old connection still held.
    drop(slot);
    drop(framed);
}

async fn connection(
    stream: UnixStream,
    service: &Service,
    peer: &crate::service::Peer,
    limits: Limits,
    stop: &mut watch::Receiver<bool>,
) -> Framed<UnixStream, FrameCodec> {
    if peer.caller.is_none() {
        tracing::warn!("connection from a uid/gid that is not a configured caller");
    }
    let mut framed = Framed::new(stream, FrameCodec::new(limits.max_frame));
    loop {
        if *stop.borrow() {
            return framed;
        }
        let next = tokio::select! {
            _ = stop.changed() => return framed,
            next = tokio::time::timeout(limits.request_timeout, framed.next()) => next,
        };
        let mut frame = match next {
            Err(_) => {
                let e = ServiceError::Timeout(format!(
                    "no complete request within {} ms; closing",
                    limits.request_timeout.as_millis()
                ));
                tracing::info!("idle connection timed out");
                send(&mut framed, e.into_response(0)).await;
                return framed;
            }
            Ok(None) => return framed,
            Ok(Some(Err(FrameError::Io(e)))) => {
                tracing::debug!(error = %e, "connection error");
                return framed;
            }
            Ok(Some(Err(e @ FrameError::TooLarge { .. }))) => {
                tracing::info!(error = %e, "frame refused");
                let e = ServiceError::FrameTooLarge(format!("{e}; closing"));
                send(&mut framed, e.into_response(0)).await;
                return framed;
            }
            Ok(Some(Err(e @ FrameError::Truncated { .. }))) => {
                let e = ServiceError::Malformed(e.to_string());
                send(&mut framed, e.into_response(0)).await;
                return framed;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let response = match take_request(&mut frame) {
            Err(e) => {
                ServiceError::Malformed(format!("frame is not a Request: {e}")).into_response(0)
            }
            Ok(req) => {
                let id = req.request_id;
                // Subscribed before the recent alerts are read, so none falls in between.
                let follow = matches!(&req.body, Some(request::Body::WatchAlerts(w)) if w.follow)
                    .then(|| service.audit().subscribe_alerts());
                let span = tracing::info_span!(
                    "request",
                    id = req.request_id,
                    kind = request_kind(&req),
                    seal = request_seal(&req)
                );
                let handled = service.handle(peer, req).instrument(span);
                let resp = match tokio::time::timeout(limits.request_timeout, handled).await {
                    Ok(resp) => resp,
                    Err(_) => ServiceError::Timeout(format!(
                        "the request did not finish within {} ms",
                        limits.request_timeout.as_millis()
                    ))
                    .into_response(id),
                };
                if let (Some(alerts), true) = (follow, resp.status == Status::Ok as i32) {
                    let after = match &resp.body {
                        Some(response::Body::Alerts(a)) => {
                            a.records.last().map(|r| r.seq).unwrap_or(0)
                        }
                        _ => 0,
                    };
                    if send(&mut framed, resp).await {
                        follow_alerts(&mut framed, alerts, id, after, stop).await;
                    }
                    return framed;
                }
                resp
            }
        };
        if !send(&mut framed, response).await {
            return framed;
        }
        // A stranger is answered once (a Hello, or the refusal of anything else), then closed.
        if peer.caller.is_none() {
            return framed;
        }
    }
}

/// Decodes a frame's request and wipes the frame: it may hold an approval token and a TOTP
/// code, and the request keeps its own copies (which the service wipes after use).
fn take_request(frame: &mut [u8]) -> Result<Request, prost::DecodeError> {
    let decoded = Request::decode(&frame[..]);
    zeroize::Zeroize::zeroize(frame);
    decoded
}

/// The request's name, for its log span.
fn request_kind(req: &Request) -> &'static str {
    use request::Body as B;
    match &req.body {
        None => "none",
        Some(B::Hello(_)) => "hello",
        Some(B::ListSeals(_)) => "list_seals",
        Some(B::DescribeSeal(_)) => "describe_seal",
        Some(B::Stamp(_)) => "stamp",
        Some(B::Status(_)) => "status",
        Some(B::CheckApproval(_)) => "check_approval",
        Some(B::EnrollMfa(_)) => "enroll_mfa",
        Some(B::ResetMfa(_)) => "reset_mfa",
        Some(B::WatchAlerts(_)) => "watch_alerts",
        Some(B::RecordOversight(_)) => "record_oversight",
        Some(B::GrantTerminal(_)) => "grant_terminal",
        Some(B::ApplyPolicy(_)) => "apply_policy",
        Some(B::SubmitApplication(_)) => "submit_application",
        Some(B::ListApplications(_)) => "list_applications",
        Some(B::FetchApplication(_)) => "fetch_application",
        Some(B::DecideApplication(_)) => "decide_application",
    }
}

/// The seal a request names, if any (cut short: it is caller input).
fn request_seal(req: &Request) -> &str {
    use request::Body as B;
    let seal = match &req.body {
        Some(B::DescribeSeal(d)) => d.seal_id.as_str(),
        Some(B::Stamp(s)) => s.seal_id.as_str(),
        Some(B::CheckApproval(c)) => c.seal_id.as_str(),
        Some(B::GrantTerminal(g)) => g.seal_id.as_str(),
        _ => "",
    };
    match seal.char_indices().nth(64) {
        Some((i, _)) => &seal[..i],
        None => seal,
    }
}

/// Sends each alert committed after `after_seq` as its own response, until the client closes
/// or sends anything, or the daemon stops.
async fn follow_alerts(
    framed: &mut Framed<UnixStream, FrameCodec>,
    mut alerts: tokio::sync::broadcast::Receiver<crate::audit::Record>,
    request_id: u64,
    after_seq: u64,
    stop: &mut watch::Receiver<bool>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = framed.next() => return,
            next = alerts.recv() => match next {
                Ok(r) if r.seq > after_seq => {
                    let resp = Response {
                        request_id,
                        status: Status::Ok as i32,
                        message: String::new(),
                        reason: String::new(),
                        body: Some(response::Body::Alerts(pb::AlertsResponse {
                            records: vec![crate::service::wire_record(&r)],
                        })),
                    };
                    if !send(framed, resp).await {
                        return;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "an alert follower fell behind; alerts skipped");
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoded_frame_is_wiped() {
        let req = Request {
            request_id: 7,
            body: Some(request::Body::Stamp(pb::StampRequest {
                seal_id: "contract".into(),
                document_sha256: vec![1; 32],
                approval_token: b"token-bytes".to_vec(),
                purpose: String::new(),
                mfa_code: "123456".into(),
                container: pb::Container::Raw as i32,
            })),
        };
        let mut frame = req.encode_to_vec();
        assert_eq!(take_request(&mut frame).unwrap(), req);
        assert!(frame.iter().all(|&b| b == 0), "frame bytes left: {frame:?}");
    }
}
