//! HQ's listener for shippers: TLS 1.3 with each site's pinned client certificate, then frames
//! of [`super::pb::SiteMessage`], each answered by one [`super::pb::HqReply`].
//!
//! Owns: knowing a site by its certificate, the order of a connection (a hello first), the
//! limits (frame size, idle time), and turning every refusal into its reply, its log line and
//! its central alert.
//! Never: reads a protocol byte from a certificate that is not enrolled, or lets one site's
//! trouble stop another's connection.

use super::check::{Head, Refusal};
use super::config::Site;
use super::cosign::{Cosignature, HqKey};
use super::db::Db;
use super::pb::{self, site_message, HqReply, SiteMessage, Status};
use crate::audit::{Checkpoint, Record};
use crate::protocol::codec::{FrameCodec, FrameError};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// Time allowed for a TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Limits {
    pub max_batch_records: usize,
    pub max_frame: usize,
    pub idle_timeout: Duration,
}

/// One HQ node: its database pool and the enrolled sites, by certificate fingerprint.
pub struct Hq {
    pub db: Db,
    sites: HashMap<[u8; 32], Arc<Site>>,
    limits: Limits,
    witness: Option<Arc<HqKey>>,
}

impl Hq {
    pub fn new(db: Db, sites: Vec<Site>, limits: Limits, witness: Option<HqKey>) -> Hq {
        Hq {
            db,
            sites: sites
                .into_iter()
                .map(|s| (s.fingerprint, Arc::new(s)))
                .collect(),
            limits,
            witness: witness.map(Arc::new),
        }
    }

    /// The newest fragment HQ published for the site, for the reply to its hello. None when
    /// there is none, or when the database cannot say (logged; the next hello asks again).
    async fn policy_for(&self, site: &Site) -> Option<super::policy::Fragment> {
        match self.db.newest_policy(&site.id).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(site = site.id, error = %e, "cannot read the site's policy");
                None
            }
        }
    }

    /// HQ's cosignature of the site's head: the one kept, or one made and kept now. None
    /// without a witness key, for an empty log, or when the key cannot sign (logged; the
    /// next reply tries again).
    async fn cosigned(&self, site: &Site, head: &Head) -> Option<Cosignature> {
        let witness = self.witness.clone()?;
        if head.checkpoint_seq == 0 {
            return None;
        }
        let seq = head.checkpoint_seq;
        let fail = |e: String| tracing::error!(site = site.id, seq, "no cosignature: {e}");
        match self.db.cosignature(&site.id, head.epoch, seq).await {
            Ok(Some(c)) => return Some(c),
            Ok(None) => {}
            Err(e) => {
                fail(e.to_string());
                return None;
            }
        }
        let (cp_head, at_ms) = match self.db.checkpoint(&site.id, head.epoch, seq).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                fail("HQ holds no checkpoint at its head".into());
                return None;
            }
            Err(e) => {
                fail(e.to_string());
                return None;
            }
        };
        let id = site.id.clone();
        let made =
            tokio::task::spawn_blocking(move || witness.cosign(&id, seq, cp_head, at_ms)).await;
        let c = match made {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                fail(e);
                return None;
            }
            Err(e) => {
                fail(e.to_string());
                return None;
            }
        };
        crate::crash_point!("hq.cosign.before_store");
        if let Err(e) = self.db.store_cosignature(head.epoch, &c).await {
            fail(e.to_string());
            return None;
        }
        // Another node may have kept its own first: that one stands.
        self.db
            .cosignature(&site.id, head.epoch, seq)
            .await
            .ok()
            .flatten()
    }

    pub fn pins(&self) -> Vec<[u8; 32]> {
        self.sites.keys().copied().collect()
    }

    /// Logs a central alert and records it in the database (once per ten minutes for the
    /// same site, kind and seq).
    pub async fn raise(&self, site: &str, kind: &str, seq: Option<u64>, detail: &str) {
        match self.db.alert(site, kind, seq, detail).await {
            Ok(true) => tracing::warn!(site, alert = kind, seq, "{detail}"),
            Ok(false) => tracing::info!(site, alert = kind, seq, "again: {detail}"),
            Err(e) => {
                tracing::warn!(site, alert = kind, seq, "{detail}");
                tracing::error!(site, alert = kind, error = %e, "the alert could not be recorded");
            }
        }
    }
}

/// Raises `silence` for every site whose head has not moved for `after`, checking a few
/// times within that time; again every ten minutes while it lasts.
pub async fn watch_silence(hq: Arc<Hq>, after: Duration) {
    let mut tick = tokio::time::interval(
        (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(30)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match hq.db.silent_sites(after).await {
            Ok(sites) => {
                for (site, head, age_ms) in sites {
                    hq.raise(
                        &site,
                        "silence",
                        Some(head),
                        &format!(
                            "nothing from site {site} for {} s (its head is seq {head}): the site is cut off, or its shipper or daemon stopped",
                            age_ms / 1000
                        ),
                    )
                    .await;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot look for silent sites"),
        }
    }
}

/// Refreshes the metrics' view of every site from the database every `every`.
pub async fn refresh_metrics(hq: Arc<Hq>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match (hq.db.heads().await, hq.db.alert_counts().await) {
            (Ok(heads), Ok(alerts)) => {
                super::metrics::get().refresh(&heads, &alerts, crate::audit::now_ms())
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot refresh the metrics from the database")
            }
        }
    }
}

/// Accepts shippers until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    hq: Arc<Hq>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (tcp, addr) = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let hq = hq.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            connection(tcp, addr.to_string(), tls, hq).await;
        });
    }
}

async fn connection(tcp: TcpStream, peer: String, tls: tokio_rustls::TlsAcceptor, hq: Arc<Hq>) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(peer, "TLS handshake timed out");
            return;
        }
    };
    let fp = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(crate::tls::fingerprint);
    let Some(site) = fp.and_then(|fp| hq.sites.get(&fp)).cloned() else {
        // The verifier refuses every certificate not pinned; this is only reached if that
        // ever changed.
        tracing::error!(peer, "a connection without an enrolled certificate");
        return;
    };
    tracing::info!(site = site.id, peer, "site connected");
    let mut framed = Framed::new(stream, FrameCodec::new(hq.limits.max_frame));
    let mut greeted = false;
    loop {
        let frame = match tokio::time::timeout(hq.limits.idle_timeout, framed.next()).await {
            Err(_) => {
                tracing::info!(site = site.id, "idle connection closed");
                return;
            }
            Ok(None) => return,
            Ok(Some(Ok(f))) => f,
            Ok(Some(Err(FrameError::TooLarge { len, max }))) => {
                let r = Refusal::TooLarge(format!(
                    "a frame of {len} bytes; at most {max} on this link"
                ));
                refuse(&hq, &site, &mut framed, r).await;
                return;
            }
            Ok(Some(Err(e))) => {
                tracing::info!(site = site.id, error = %e, "connection ended");
                return;
            }
        };
        let msg = match SiteMessage::decode(frame.freeze()) {
            Ok(m) => m,
            Err(e) => {
                let r = Refusal::BadRequest(format!("a frame that is not a site message: {e}"));
                refuse(&hq, &site, &mut framed, r).await;
                return;
            }
        };
        let is_hello = matches!(msg.body, Some(site_message::Body::Hello(_)));
        let outcome = match msg.body {
            None => Err(Refusal::BadRequest("a site message with no body".into())),
            Some(site_message::Body::Hello(h)) => {
                // Batches follow only a hello HQ took.
                let r = hello(&hq, &site, h).await;
                greeted = r.is_ok();
                r
            }
            Some(site_message::Body::Batch(_)) if !greeted => {
                Err(Refusal::BadRequest("a batch before the hello".into()))
            }
            Some(site_message::Body::Batch(b)) => batch(&hq, &site, b).await,
        };
        let sent = match outcome {
            Ok(head) => {
                let cosignature = hq.cosigned(&site, &head).await;
                let policy = if is_hello {
                    hq.policy_for(&site).await
                } else {
                    None
                };
                crate::crash_point!("hq.before_reply");
                send(
                    &mut framed,
                    HqReply {
                        status: Status::Ok as i32,
                        message: String::new(),
                        head: Some((&head).into()),
                        cosignature: cosignature.as_ref().map(Into::into),
                        policy: policy.as_ref().map(Into::into),
                    },
                )
                .await
            }
            Err(r) => refuse(&hq, &site, &mut framed, r).await,
        };
        if !sent {
            return;
        }
    }
}

async fn hello(hq: &Hq, site: &Site, h: pb::Hello) -> Result<Head, Refusal> {
    if h.protocol_version != super::PROTOCOL_VERSION {
        return Err(Refusal::BadRequest(format!(
            "protocol version {}; this HQ speaks {}",
            h.protocol_version,
            super::PROTOCOL_VERSION
        )));
    }
    let newest = h
        .newest
        .map(Checkpoint::try_from)
        .transpose()
        .map_err(Refusal::BadRecord)?;
    hq.db.hello(site, newest.as_ref()).await
}

async fn batch(hq: &Hq, site: &Site, b: pb::Batch) -> Result<Head, Refusal> {
    if b.records.len() > hq.limits.max_batch_records {
        return Err(Refusal::TooLarge(format!(
            "a batch of {} records; at most {} in one",
            b.records.len(),
            hq.limits.max_batch_records
        )));
    }
    let records: Vec<Record> = b
        .records
        .into_iter()
        .map(Record::try_from)
        .collect::<Result<_, _>>()
        .map_err(Refusal::BadRecord)?;
    let checkpoints: Vec<Checkpoint> = b
        .checkpoints
        .into_iter()
        .map(Checkpoint::try_from)
        .collect::<Result<_, _>>()
        .map_err(Refusal::BadRecord)?;
    let head = hq
        .db
        .ingest(site, &records, &checkpoints, hq.limits.max_batch_records)
        .await?;
    super::metrics::get().received(&site.id, records.len());
    tracing::debug!(
        site = site.id,
        head = head.seq,
        records = records.len(),
        "batch stored"
    );
    Ok(head)
}

/// Replies with the refusal and HQ's head (so the shipper knows where to go on), logs it and
/// raises its alert. Returns whether the reply was sent.
async fn refuse<S>(hq: &Hq, site: &Site, framed: &mut Framed<S, FrameCodec>, r: Refusal) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = hq.db.head(&site.id).await.ok();
    match r.alert() {
        Some(kind) => {
            super::metrics::get().refused(&site.id, kind);
            hq.raise(&site.id, kind, head.map(|h| h.seq + 1), &r.to_string())
                .await
        }
        None => tracing::error!(site = site.id, "{r}"),
    }
    send(
        framed,
        HqReply {
            status: r.status() as i32,
            message: r.to_string(),
            head: head.as_ref().map(Into::into),
            cosignature: None,
            policy: None,
        },
    )
    .await
}

async fn send<S>(framed: &mut Framed<S, FrameCodec>, reply: HqReply) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    framed
        .send(Bytes::from(reply.encode_to_vec()))
        .await
        .is_ok()
}
