//! The shipper: sends a site's audit log to HQ, from HQ's head on. The local log is the
//! outbox: it is read read-only, in seq order, so with HQ or the link down stamping goes on
//! and the records wait; nothing is kept anywhere else and nothing is sent twice.
//!
//! Owns: the order of a session (hello, then batches that each end at a checkpoint), taking
//! up again from the head HQ names after any reply, reconnecting with a backoff.
//! Never: writes to the log, or runs inside the stamping daemon.

use super::pb::{self, site_message, HqReply, SiteMessage, Status};
use crate::audit::query;
use crate::audit::{Checkpoint, Record};
use crate::protocol::codec::{FrameCodec, FrameError};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct ShipConfig {
    /// The site's state database (read-only).
    pub db: PathBuf,
    /// host:port of HQ.
    pub hq: String,
    /// The name HQ's certificate must carry.
    pub server_name: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Records per batch at most (a batch may be larger only when one checkpoint covers more).
    pub batch_records: u64,
    /// Keep going: wait for new records, reconnect after failures.
    pub follow: bool,
    /// How often to look for new records, and to greet HQ when there are none.
    pub interval: Duration,
    /// The longest wait between reconnections.
    pub max_backoff: Duration,
    /// Where HQ's cosignatures are kept (see [`super::cosign::default_store`]).
    pub cosignatures: PathBuf,
    /// HQ's witness key: cosignatures that do not verify under it are not kept.
    pub hq_key: Option<crate::audit::verify::TrustedKey>,
    /// The daemon's socket: HQ's newest policy fragment for this site is handed to the daemon
    /// there (which checks it and decides). None: fragments are not delivered.
    pub policy_socket: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("{0}")]
    Setup(String),
    #[error("cannot reach HQ at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("the link to HQ failed: {0}")]
    Link(String),
    #[error("the local log: {0}")]
    Log(#[from] rusqlite::Error),
    #[error("HQ refused ({status}): {message}")]
    Refused { status: String, message: String },
}

impl ShipError {
    /// Whether trying again later can help (HQ or the link down, HQ's database busy), as
    /// against a refusal of what this log holds, which needs a person.
    pub fn passing(&self) -> bool {
        match self {
            ShipError::Connect { .. } | ShipError::Link(_) => true,
            ShipError::Refused { status, .. } => status == Status::Unavailable.as_str_name(),
            ShipError::Setup(_) | ShipError::Log(_) => false,
        }
    }
}

/// What one run of [`ship`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shipped {
    pub records: u64,
    pub batches: u64,
    /// HQ's head for this site at the end.
    pub head: u64,
    /// The newest seq HQ cosigned, kept in the cosignature store.
    pub cosigned: u64,
    /// The version of HQ's policy fragment the daemon said is in force, once one was handed
    /// over.
    pub policy_version: Option<u64>,
}

type Link = Framed<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
type Framed<S> = tokio_util::codec::Framed<S, FrameCodec>;

/// Ships until the local log is all at HQ (or, with `follow`, until `stop` turns true).
/// Without `follow`, the first failure ends it; with it, passing failures are retried with a
/// backoff and refusals are retried at the longest backoff, each logged.
pub async fn ship(
    c: &ShipConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Shipped, ShipError> {
    let tls = Arc::new(
        crate::tls::client_config(&c.ca, Some((&c.cert, &c.key))).map_err(ShipError::Setup)?,
    );
    let name = rustls::pki_types::ServerName::try_from(c.server_name.clone())
        .map_err(|e| ShipError::Setup(format!("server name {:?}: {e}", c.server_name)))?;
    let mut total = Shipped::default();
    let mut backoff = c.interval;
    // The digest of the fragment last handed to the daemon: each is handed over once per run.
    let mut delivered = None;
    loop {
        let result = session(c, &tls, &name, &mut total, &mut delivered, &mut stop).await;
        match result {
            Ok(()) => return Ok(total),
            Err(e) if !c.follow => return Err(e),
            Err(e) => {
                let wait = if e.passing() {
                    tracing::warn!(error = %e, "shipping interrupted; trying again");
                    backoff
                } else {
                    tracing::error!(error = %e, "HQ refused the log; trying again later");
                    c.max_backoff
                };
                backoff = (backoff * 2).min(c.max_backoff);
                tokio::select! {
                    _ = stop.changed() => return Ok(total),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        if *stop.borrow() {
            return Ok(total);
        }
        backoff = backoff.max(c.interval);
    }
}

/// One connection: hello, then batches until caught up (or, following, until stopped).
async fn session(
    c: &ShipConfig,
    tls: &Arc<rustls::ClientConfig>,
    name: &rustls::pki_types::ServerName<'static>,
    total: &mut Shipped,
    delivered: &mut Option<String>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), ShipError> {
    let connect_err = |e: std::io::Error| ShipError::Connect {
        addr: c.hq.clone(),
        detail: e.to_string(),
    };
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&c.hq),
    )
    .await
    .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
    .map_err(connect_err)?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name.clone(), tcp)
        .await
        .map_err(connect_err)?;
    let mut link: Link = Framed::new(stream, FrameCodec::new(super::DEFAULT_MAX_FRAME));
    let log = query::open_read_only(&c.db)?;
    let mut store = None;
    let reply = hello(&mut link, &log).await?;
    let mut head = head_of(&reply)?;
    keep_cosignature(c, &log, &mut store, &reply, total)?;
    offer_policy(c, &reply, delivered, total).await;
    tracing::info!(hq = c.hq, head, "connected to HQ");
    loop {
        let (records, checkpoints) = next_batch(&log, head, c.batch_records)?;
        if records.is_empty() {
            total.head = head;
            if !c.follow {
                return Ok(());
            }
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                _ = tokio::time::sleep(c.interval) => {}
            }
            // Greet again: HQ sees the site alive and checks its newest checkpoint.
            let reply = hello(&mut link, &log).await?;
            head = head_of(&reply)?;
            keep_cosignature(c, &log, &mut store, &reply, total)?;
            offer_policy(c, &reply, delivered, total).await;
            continue;
        }
        let n = records.len() as u64;
        let reply = call(
            &mut link,
            site_message::Body::Batch(pb::Batch {
                records: records.iter().map(Into::into).collect(),
                checkpoints: checkpoints.iter().map(Into::into).collect(),
            }),
        )
        .await?;
        match Status::try_from(reply.status) {
            Ok(Status::Ok) => {
                crate::crash_point!("ship.after_ack");
                head = head_of(&reply)?;
                total.records += n;
                total.batches += 1;
                total.head = head;
                keep_cosignature(c, &log, &mut store, &reply, total)?;
            }
            // HQ holds more, or less, than this shipper thought: go on from HQ's head, once.
            Ok(Status::Gap | Status::Stale) if head_of(&reply)? != head => {
                tracing::warn!(message = reply.message, "HQ's head moved; going on from it");
                head = head_of(&reply)?;
            }
            _ => return Err(refused(&reply)),
        }
    }
}

/// Keeps the cosignature of a reply, if it has one that matches the log (and verifies under
/// HQ's key, when it is known). One that does not is logged and left.
fn keep_cosignature(
    c: &ShipConfig,
    log: &rusqlite::Connection,
    store: &mut Option<rusqlite::Connection>,
    reply: &HqReply,
    total: &mut Shipped,
) -> Result<(), ShipError> {
    let Some(pc) = reply.cosignature.clone() else {
        return Ok(());
    };
    let cosig = match super::cosign::Cosignature::try_from(pc) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!("HQ sent a cosignature that does not decode: {e}");
            return Ok(());
        }
    };
    if let Some(key) = &c.hq_key {
        if let Err(e) = cosig.check(key) {
            tracing::error!("HQ's cosignature is not kept: {e}");
            return Ok(());
        }
    }
    let here: Option<Vec<u8>> = rusqlite::OptionalExtension::optional(log.query_row(
        "SELECT hash FROM audit WHERE seq = ?1",
        [cosig.seq as i64],
        |r| r.get(0),
    ))?;
    if here.as_deref() != Some(&cosig.head[..]) {
        tracing::error!(
            seq = cosig.seq,
            "HQ cosigned a record this log does not hold; the cosignature is not kept"
        );
        return Ok(());
    }
    if store.is_none() {
        *store = Some(super::cosign::open_store(&c.cosignatures)?);
    }
    super::cosign::store(store.as_ref().expect("opened above"), &cosig)?;
    crate::crash_point!("ship.after_cosignature");
    total.cosigned = total.cosigned.max(cosig.seq);
    Ok(())
}

/// Hands HQ's newest policy fragment (in a hello's reply) to the daemon, once per fragment;
/// one the daemon could not be reached for is offered again at the next hello. The daemon
/// checks it, records what it decided, and answers; a refusal is logged here.
async fn offer_policy(
    c: &ShipConfig,
    reply: &HqReply,
    delivered: &mut Option<String>,
    total: &mut Shipped,
) {
    let (Some(socket), Some(p)) = (&c.policy_socket, &reply.policy) else {
        return;
    };
    let fragment = super::policy::Fragment::from(p.clone());
    let digest = fragment.digest();
    if delivered.as_deref() == Some(digest.as_str()) {
        return;
    }
    let asked = async {
        let mut client = crate::protocol::client::Client::connect(socket).await?;
        client
            .call(crate::protocol::request::Body::ApplyPolicy(
                crate::protocol::pb::ApplyPolicyRequest {
                    fragment: fragment.encode(),
                },
            ))
            .await
    };
    let r = match tokio::time::timeout(Duration::from_secs(30), asked).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!(socket = %socket.display(), error = %e, "cannot hand HQ's policy fragment to the daemon; trying at the next hello");
            return;
        }
        Err(_) => {
            tracing::warn!(socket = %socket.display(), "the daemon did not answer about HQ's policy fragment; trying at the next hello");
            return;
        }
    };
    match r.body {
        Some(crate::protocol::response::Body::ApplyPolicy(a)) => {
            tracing::info!(
                version = a.version,
                applied = a.applied,
                "HQ's policy fragment is in force at the daemon"
            );
            total.policy_version = Some(a.version);
        }
        _ => tracing::error!(
            version = fragment.version,
            status = crate::protocol::Status::try_from(r.status)
                .map(|s| s.as_str_name())
                .unwrap_or("unknown"),
            reason = r.reason,
            message = r.message,
            "the daemon refused HQ's policy fragment"
        ),
    }
    *delivered = Some(digest);
}

/// Sends the hello with the log's newest checkpoint; returns HQ's reply.
async fn hello(link: &mut Link, log: &rusqlite::Connection) -> Result<HqReply, ShipError> {
    let newest = newest_checkpoint(log)?;
    let reply = call(
        link,
        site_message::Body::Hello(pb::Hello {
            protocol_version: super::PROTOCOL_VERSION,
            newest: newest.as_ref().map(Into::into),
        }),
    )
    .await?;
    if reply.status != Status::Ok as i32 {
        return Err(refused(&reply));
    }
    Ok(reply)
}

fn newest_checkpoint(log: &rusqlite::Connection) -> Result<Option<Checkpoint>, ShipError> {
    let seq: Option<i64> = log.query_row("SELECT max(seq) FROM checkpoints", [], |r| r.get(0))?;
    Ok(match seq {
        None => None,
        Some(s) => query::checkpoints_after(log, (s - 1) as u64, 1)?.pop(),
    })
}

/// The records after `head` up to a checkpoint, with the checkpoints among them: as many
/// checkpoints as fit in `max` records, and at least one. Read in one transaction.
fn next_batch(
    log: &rusqlite::Connection,
    head: u64,
    max: u64,
) -> Result<(Vec<Record>, Vec<Checkpoint>), ShipError> {
    let tx = log.unchecked_transaction()?;
    let mut checkpoints = query::checkpoints_after(&tx, head, max.max(1))?;
    let Some(first) = checkpoints.first() else {
        return Ok((Vec::new(), Vec::new()));
    };
    let first_seq = first.seq;
    let keep = checkpoints
        .iter()
        .take_while(|cp| cp.seq - head <= max || cp.seq == first_seq)
        .count();
    checkpoints.truncate(keep);
    let end = checkpoints.last().map(|c| c.seq).unwrap_or(first_seq);
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {} FROM audit WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
        query::record_columns()
    ))?;
    let mut rows = stmt.query(rusqlite::params![head as i64, end as i64])?;
    let mut records = Vec::with_capacity(((end - head) as usize).min(100_000));
    while let Some(row) = rows.next()? {
        let mut r = Record::default();
        query::read_row_into(row, &mut r)?;
        records.push(r);
    }
    // Records with large evidence (PDF signatures) make large batches: keep the frame within
    // BATCH_BYTES, ending at a checkpoint (at least the first one).
    // (A log with records missing is sent as it is: HQ names the gap.)
    let mut bytes = 0usize;
    let mut fits = 0;
    let mut next = 0;
    for (i, cp) in checkpoints.iter().enumerate() {
        while next < records.len() && records[next].seq <= cp.seq {
            bytes += pb::Record::from(&records[next]).encoded_len() + 8;
            next += 1;
        }
        if i > 0 && bytes > BATCH_BYTES {
            break;
        }
        fits = i + 1;
    }
    checkpoints.truncate(fits);
    let end = checkpoints.last().map(|c| c.seq).unwrap_or(head);
    records.retain(|r| r.seq <= end);
    Ok((records, checkpoints))
}

/// The most bytes of records a batch carries, unless its first checkpoint covers more (half the
/// default frame limit, so the batch and its checkpoints fit).
const BATCH_BYTES: usize = super::DEFAULT_MAX_FRAME / 2;

async fn call(link: &mut Link, body: site_message::Body) -> Result<HqReply, ShipError> {
    let msg = SiteMessage { body: Some(body) };
    let link_err = |e: FrameError| ShipError::Link(e.to_string());
    link.send(Bytes::from(msg.encode_to_vec()))
        .await
        .map_err(link_err)?;
    let frame = link
        .next()
        .await
        .ok_or_else(|| ShipError::Link("HQ closed the connection".into()))?
        .map_err(link_err)?;
    HqReply::decode(frame.freeze())
        .map_err(|e| ShipError::Link(format!("a reply that does not decode: {e}")))
}

fn head_of(reply: &HqReply) -> Result<u64, ShipError> {
    reply
        .head
        .as_ref()
        .map(|h| h.seq)
        .ok_or_else(|| ShipError::Link("a reply without HQ's head".into()))
}

fn refused(reply: &HqReply) -> ShipError {
    ShipError::Refused {
        status: Status::try_from(reply.status)
            .map(|s| s.as_str_name().to_owned())
            .unwrap_or_else(|_| format!("status {}", reply.status)),
        message: reply.message.clone(),
    }
}
