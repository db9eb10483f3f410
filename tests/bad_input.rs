//! Bad input over the real socket: each case gets its precise status, and the daemon keeps
//! serving other clients.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use prost::Message;
use sealgate::protocol::{Response, Status};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Reads one response frame, or None if the daemon closed the connection first.
async fn read_response(s: &mut UnixStream) -> Option<Response> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes(head) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(Response::decode(&body[..]).expect("daemon replies decode"))
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.to_vec()
}

/// After a refusal, another client still gets a stamp.
async fn still_serving(d: &Daemon) {
    stamp_ok(&mut d.client().await, "contract", &[3u8; 32]).await;
}

async fn expect_closed(s: &mut UnixStream) {
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("daemon closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing follows the final response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_status_and_service_goes_on() {
    let d = Daemon::start(&Opts {
        max_frame_bytes: 4096,
        ..Opts::default()
    });

    // Garbage inside a well-formed frame: MALFORMED_REQUEST, and the connection stays usable.
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&frame(&[0xff; 12])).await.unwrap();
    let r = read_response(&mut s).await.unwrap();
    assert_eq!(r.status, Status::MalformedRequest as i32, "{}", r.message);
    let hello = sealgate::protocol::Request {
        request_id: 5,
        body: Some(sealgate::protocol::request::Body::Hello(Default::default())),
    };
    s.write_all(&frame(&hello.encode_to_vec())).await.unwrap();
    let r = read_response(&mut s).await.unwrap();
    assert_eq!((r.status, r.request_id), (Status::Ok as i32, 5));
    still_serving(&d).await;

    // Raw garbage with no framing: its first four bytes read as a huge length.
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s).await.unwrap();
    assert_eq!(r.status, Status::FrameTooLarge as i32, "{}", r.message);
    expect_closed(&mut s).await;
    still_serving(&d).await;

    // A frame over the limit: FRAME_TOO_LARGE before the body is read, then the daemon closes.
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&5000u32.to_be_bytes()).await.unwrap();
    let r = read_response(&mut s).await.unwrap();
    assert_eq!(r.status, Status::FrameTooLarge as i32);
    assert!(
        r.message.contains("5000") && r.message.contains("4096"),
        "{}",
        r.message
    );
    expect_closed(&mut s).await;
    still_serving(&d).await;

    // A truncated frame: 100 bytes announced, 10 sent, then the client stops writing.
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    s.write_all(&100u32.to_be_bytes()).await.unwrap();
    s.write_all(&[0u8; 10]).await.unwrap();
    s.shutdown().await.unwrap();
    let r = read_response(&mut s).await.unwrap();
    assert_eq!(r.status, Status::MalformedRequest as i32);
    assert!(r.message.contains("10 of 100"), "{}", r.message);
    still_serving(&d).await;

    // An unknown message: a Request whose only body is a field this protocol does not define.
    let mut s = UnixStream::connect(&d.socket).await.unwrap();
    let mut unknown = BytesMut::new();
    unknown.put_slice(&[0x08, 0x2a]); // request_id = 42
    unknown.put_slice(&[0x9a, 0x06, 0x02, 0x01, 0x02]); // field 99, 2 bytes
    s.write_all(&frame(&unknown)).await.unwrap();
    let r = read_response(&mut s).await.unwrap();
    assert_eq!(
        (r.status, r.request_id),
        (Status::UnknownRequest as i32, 42)
    );
    still_serving(&d).await;

    // An unknown seal, and a digest of the wrong length.
    let mut c = d.client().await;
    let r = c
        .stamp(
            "no-such-seal",
            &[0u8; 32],
            &token_for("no-such-seal", &[0u8; 32]),
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::UnknownSeal as i32);
    let r = c
        .stamp(
            "contract",
            &[0u8; 31],
            &token_for("contract", &[0u8; 31]),
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::InvalidArgument as i32);
    assert!(r.message.contains("32 bytes, got 31"), "{}", r.message);
    // The same connection goes on working after refusals.
    let r = c
        .stamp(
            "contract",
            &[0u8; 32],
            &token_for("contract", &[0u8; 32]),
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::Ok as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_purpose_is_refused() {
    let d = Daemon::start(&Opts::default());
    let mut c = d.client().await;
    let r = c
        .stamp(
            "contract",
            &[0u8; 32],
            &token_for("contract", &[0u8; 32]),
            &"x".repeat(5000),
        )
        .await
        .unwrap();
    assert_eq!(r.status, Status::InvalidArgument as i32);
    assert!(r.message.contains("5000 bytes"), "{}", r.message);
    still_serving(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_not_in_config_is_refused_and_learns_nothing() {
    let me = nix::unistd::getuid().as_raw();
    let d = Daemon::start(&Opts {
        uids: vec![me.wrapping_add(4242)],
        ..Opts::default()
    });
    let mut c = d.client().await;
    let r = c.hello("test").await.unwrap();
    assert_eq!(r.status, Status::Ok as i32);
    let Some(sealgate::protocol::response::Body::Hello(h)) = r.body else {
        panic!()
    };
    assert_eq!(h.caller, "");
    // A stranger is answered once, then closed: it cannot keep a slot with Hellos.
    assert!(
        c.hello("again").await.is_err(),
        "a stranger's connection stays open after its Hello"
    );
    // Each further request, on a connection of its own, is refused alike.
    let mut refusals = Vec::new();
    for i in 0..5 {
        let mut c = d.client().await;
        refusals.push(match i {
            0 => c.list_seals().await.unwrap(),
            1 => c.describe_seal("contract").await.unwrap(),
            2 => c
                .stamp(
                    "contract",
                    &[0u8; 32],
                    &token_for("contract", &[0u8; 32]),
                    "",
                )
                .await
                .unwrap(),
            3 => c.status().await.unwrap(),
            // An unknown seal gets the same answer as a known one: no probing for names.
            _ => c.describe_seal("no-such-seal").await.unwrap(),
        });
    }
    for r in refusals {
        assert_eq!(r.status, Status::PermissionDenied as i32, "{}", r.message);
        assert!(r.body.is_none());
        assert!(!r.message.contains("contract"));
    }

    // Every refused request is in the audit log, naming the stranger.
    let (status, dir) = d.stop_keeping_state();
    assert!(status.success());
    let conn =
        sealgate::audit::query::open_read_only(&dir.path().join("state/sealgate.db")).unwrap();
    let filter = sealgate::audit::query::Filter {
        kind: Some("access.denied".into()),
        ..Default::default()
    };
    let mut refused = Vec::new();
    sealgate::audit::query::for_each(&conn, &filter, |r| {
        refused.push(r);
        Ok(())
    })
    .unwrap();
    // The Hello and the five refusals.
    assert_eq!(refused.len(), 6);
    assert!(
        refused[0].detail.starts_with("Hello from"),
        "{}",
        refused[0].detail
    );
    for r in &refused {
        assert_eq!(r.reason, "unknown_caller");
        assert!(r.caller.starts_with(&format!("uid {me} ")), "{}", r.caller);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_time_out_and_free_their_slots() {
    let d = Daemon::start(&Opts {
        max_connections: 2,
        request_timeout_ms: 1500,
        ..Opts::default()
    });
    let mut a = UnixStream::connect(&d.socket).await.unwrap();
    let mut b = UnixStream::connect(&d.socket).await.unwrap();
    // Both slots are taken by clients that say nothing: a third is told BUSY and closed.
    let mut c = UnixStream::connect(&d.socket).await.unwrap();
    let r = read_response(&mut c).await.unwrap();
    assert_eq!(r.status, Status::Busy as i32, "{}", r.message);
    expect_closed(&mut c).await;
    // The silent ones are timed out by the daemon.
    for s in [&mut a, &mut b] {
        let r = read_response(s).await.unwrap();
        assert_eq!(r.status, Status::Timeout as i32, "{}", r.message);
        expect_closed(s).await;
    }
    // Their slots are free again: a new client is served.
    still_serving(&d).await;
}

/// A client that sends a stamp and leaves at once: whatever point its request reached, every
/// authorisation the daemon made still gets its recorded outcome, and the stamps that were
/// authorised completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stamp_leaves_no_authorisation_without_outcome() {
    let d = Daemon::start(&Opts::default());
    for i in 0..20u32 {
        let digest = sha256(format!("left behind {i}").as_bytes());
        let a = Approval::for_seal("contract", &digest);
        let req = sealgate::protocol::Request {
            request_id: 1,
            body: Some(sealgate::protocol::request::Body::Stamp(
                sealgate::protocol::pb::StampRequest {
                    seal_id: "contract".into(),
                    document_sha256: digest,
                    approval_token: a.token(),
                    ..Default::default()
                },
            )),
        };
        let mut s = UnixStream::connect(&d.socket).await.unwrap();
        s.write_all(&frame(&req.encode_to_vec())).await.unwrap();
        drop(s);
    }
    still_serving(&d).await;
    let db = d.db();
    // Every request that was authorised reaches its outcome soon after.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let served = hex::encode([3u8; 32]);
    // (authorisations, completions) of the requests left behind, from one read of the log.
    let left = || {
        let all = records(&db, None);
        let count = |kind| {
            all.iter()
                .filter(|r| r.kind == kind && r.doc_sha256 != served)
                .count()
        };
        (count("stamp.authorized"), count("stamp.completed"))
    };
    // Requests may still be arriving: wait until every authorisation has its outcome and no
    // new one has come for a second.
    let mut quiet_since = (std::time::Instant::now(), (0, 0));
    loop {
        let now = left();
        if now != quiet_since.1 {
            quiet_since = (std::time::Instant::now(), now);
        }
        let (authorized, outcomes) = now;
        if authorized > 0
            && authorized == outcomes
            && quiet_since.0.elapsed() > Duration::from_secs(1)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{authorized} authorisations, {outcomes} completed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    every_authorisation_has_one_outcome(&db);
    let (code, out) = audit_verify(&db);
    assert_eq!(code, 0, "{out}");
}
