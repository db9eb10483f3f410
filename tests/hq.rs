//! Headquarters: real sites (sealgated with their audit keys in SoftHSM tokens of their own)
//! ship their logs with `sealctl audit ship` over TLS to real `sealgate-hq` nodes on a
//! PostgreSQL cluster the tests start themselves; what lands in PostgreSQL is read back with
//! psql and checked with the offline verifier.

mod common;

use common::hq::*;
use common::pki::Pki;
use common::postgres::{free_port, Postgres, HQ_ROLE};
use common::*;
use std::time::Duration;

/// Counts of records by kind, "kind count" lines, from the site's log.
fn site_kinds(site: &Site) -> String {
    sqlite3(
        &site.daemon.db(),
        "SELECT kind || ' ' || count(*) FROM audit GROUP BY kind ORDER BY kind",
    )
    .trim()
    .to_owned()
}

fn central_kinds(pg: &Postgres, site: &str) -> String {
    pg.psql(&format!(
        "SELECT kind || ' ' || count(*) FROM records WHERE site = '{site}' GROUP BY kind ORDER BY kind"
    ))
}

async fn stamp_n(site: &Site, n: u32) {
    let mut c = site.daemon.client().await;
    for i in 0..n {
        let digest = sha256(format!("{} document {i} {}", site.id, unix_now()).as_bytes());
        stamp_ok(&mut c, "contract", &digest).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_sites_stamping_at_once_reach_hq_whole_and_verified() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let sites: Vec<Site> = ["shanghai", "shenzhen", "chengdu"]
        .iter()
        .map(|id| Site::start(id, &pki))
        .collect();
    let specs: Vec<(&str, &str, &std::path::Path)> = sites
        .iter()
        .map(|s| (s.id.as_str(), s.fingerprint.as_str(), s.audit_pem.as_path()))
        .collect();
    let node = HqNode::start(dir.path(), &pg, |port| hq_config(&pki, &pg, port, &specs));
    let mut shippers: Vec<_> = sites.iter().map(|s| s.follow(&pki, &node.addr)).collect();

    let stamping: Vec<_> = sites.iter().map(|s| stamp_n(s, 40)).collect();
    futures_util::future::join_all(stamping).await;
    for s in &sites {
        wait_caught_up(&pg, s);
        assert_eq!(central_kinds(&pg, &s.id), site_kinds(s), "site {}", s.id);
        let report = verify_central(&pg, s);
        assert!(report.ok(), "site {}: {:?}", s.id, report.problems);
        assert_eq!(report.records, hq_head(&pg, &s.id));
        assert!(report.checkpoints > 0);
        // The same hashes as the site's own log.
        let head = hq_head(&pg, &s.id);
        let here = sqlite3(
            &s.daemon.db(),
            &format!("SELECT group_concat(lower(hex(hash)), ',') FROM (SELECT hash FROM audit WHERE seq <= {head} ORDER BY seq)"),
        );
        let there = pg.psql(&format!(
            "SELECT string_agg(encode(hash, 'hex'), ',' ORDER BY seq) FROM records WHERE site = '{}'",
            s.id
        ));
        assert_eq!(here.trim(), there);
        let completed = pg.number(&format!(
            "SELECT count(*) FROM records WHERE site = '{}' AND kind = 'stamp.completed'",
            s.id
        ));
        assert_eq!(completed, 40);
    }
    assert!(alerts(&pg, "%").is_empty(), "{:?}", alerts(&pg, "%"));

    // HQ's view: each site's head, lag and counts; records of all sites with their site.
    let url = pg.url(common::postgres::OWNER);
    let (code, out) = sealctl(&["hq", "stats", "--url", &url, "--json"]);
    assert_eq!(code, 0, "{out}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats.as_array().unwrap().len(), 3);
    for s in &sites {
        let st = stats
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["site"] == s.id.as_str())
            .unwrap();
        assert_eq!(st["head_seq"], hq_head(&pg, &s.id), "{st}");
        assert_eq!(st["records"], hq_head(&pg, &s.id), "{st}");
        assert_eq!(st["stamps_completed"], 40, "{st}");
        assert_eq!(st["lag_records"], 0, "{st}");
    }
    let (code, out) = sealctl(&[
        "hq",
        "query",
        "--url",
        &url,
        "--site",
        "shenzhen",
        "--kind",
        "stamp.completed",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{out}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 40);
    assert!(rows
        .iter()
        .all(|r| r["site"] == "shenzhen" && r["kind"] == "stamp.completed"));
    let (code, out) = sealctl(&[
        "hq",
        "query",
        "--url",
        &url,
        "--approver",
        "zhang.wei",
        "--kind",
        "stamp.completed",
        "--format",
        "csv",
    ]);
    assert_eq!(code, 0, "{out}");
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("site,seq,"), "{out}");
    assert_eq!(
        lines.count(),
        120,
        "every site's stamps, each approved by zhang.wei"
    );
    let (code, out) = sealctl(&["hq", "query", "--url", &url, "--limit", "5"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("SITE") && out.lines().count() == 6, "{out}");

    // The central tables are append-only, for their owner too, and a head never goes back.
    for sql in [
        "UPDATE records SET detail = 'x' WHERE site = 'shanghai' AND seq = 1",
        "DELETE FROM records WHERE site = 'shanghai'",
        "TRUNCATE records CASCADE",
        "DELETE FROM checkpoints",
        "UPDATE sites SET head_seq = 1 WHERE site = 'shanghai'",
        "DELETE FROM sites WHERE site = 'shanghai'",
    ] {
        for role in [common::postgres::OWNER, HQ_ROLE] {
            let r = pg.try_psql_as_role(role, sql);
            assert!(r.is_err(), "{role} could: {sql}");
        }
    }
    let err = pg
        .try_psql_as_role(common::postgres::OWNER, "DELETE FROM records")
        .unwrap_err();
    assert!(err.contains("append-only"), "{err}");
    // HQ's role may not change the schema or grant itself more.
    assert!(pg
        .try_psql_as_role(HQ_ROLE, "DROP TRIGGER records_append_only ON records")
        .is_err());

    for s in &mut shippers {
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(node);
}

/// A cluster, certificates and one site.
struct Rig {
    site: Site,
    pki: Pki,
    dir: tempfile::TempDir,
    pg: Postgres,
}

impl Rig {
    fn new(id: &str) -> Rig {
        let pg = Postgres::start();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let site = Site::start(id, &pki);
        Rig { site, pki, dir, pg }
    }

    /// A node for this site.
    fn node(&self) -> HqNode {
        self.node_with("")
    }

    /// A node for this site, with more configuration after its own.
    fn node_with(&self, extra: &str) -> HqNode {
        let s = &self.site;
        HqNode::start(self.dir.path(), &self.pg, |port| {
            hq_config(
                &self.pki,
                &self.pg,
                port,
                &[(&s.id, &s.fingerprint, &s.audit_pem)],
            ) + extra
        })
    }

    /// A node with a witness key in a token labelled `label`, and that key's PEM file.
    fn witnessed_node(&self, label: &str) -> (HqNode, std::path::PathBuf) {
        let node = self.node_with(&witness_section(self.dir.path(), label));
        let pem = self.dir.path().join("hq-witness.pub.pem");
        std::fs::write(&pem, node.witness_key()).unwrap();
        (node, pem)
    }
}

/// Stamps on the site until `stop` is set; how many.
fn stamp_until(
    site: &Site,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u32> {
    let socket = site.daemon.socket.clone();
    let id = site.id.clone();
    tokio::spawn(async move {
        let mut c = sealgate::protocol::client::Client::connect(&socket)
            .await
            .unwrap();
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let digest = sha256(format!("{id} {n} {}", unix_now()).as_bytes());
            stamp_ok(&mut c, "contract", &digest).await;
            n += 1;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn hq_killed_again_and_again_while_a_site_stamps_loses_nothing_and_stores_nothing_twice() {
    let rig = Rig::new("hangzhou");
    let (pg, pki, site) = (&rig.pg, &rig.pki, &rig.site);
    let mut node = rig.node();
    let mut shipper = site.follow(pki, &node.addr);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stamping = stamp_until(site, stop.clone());
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(400 + 150 * round)).await;
        node.kill();
        // The link is down: the site stamps on, its records wait in its log.
        tokio::time::sleep(Duration::from_millis(600)).await;
        node.restart();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stamped = stamping.await.unwrap();
    assert!(stamped > 20, "only {stamped} stamps");
    wait_caught_up(pg, site);
    let head = hq_head(pg, &site.id);
    assert_eq!(
        pg.number(&format!(
            "SELECT count(*) FROM records WHERE site = '{}'",
            site.id
        )) as u64,
        head
    );
    assert_eq!(central_kinds(pg, &site.id), site_kinds(site));
    assert_eq!(
        pg.number("SELECT count(*) FROM records WHERE kind = 'stamp.completed'"),
        i64::from(stamped)
    );
    let report = verify_central(pg, site);
    assert!(report.ok(), "{:?}", report.problems);
    assert!(alerts(pg, "%").is_empty(), "{:?}", alerts(pg, "%"));
    let _ = shipper.kill();
    let _ = shipper.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hq_nodes_on_one_database_keep_one_head_for_a_site_that_goes_to_either() {
    let rig = Rig::new("wuhan");
    let (pg, pki, site) = (&rig.pg, &rig.pki, &rig.site);
    let nodes = [rig.node(), rig.node()];
    // Alternately, after a reconnect each time.
    for round in 0..6 {
        stamp_n(site, 5).await;
        let (code, out) = site.ship_once(pki, &nodes[round % 2].addr);
        assert_eq!(code, 0, "{out}");
        let (newest, _) = site.newest_checkpoint();
        assert!(
            out.contains(&format!("up to seq {newest}")),
            "round {round}: {out}"
        );
    }
    // Both at once: one shipper to each node for the same site, while it stamps. Whichever
    // node takes a batch, the head row orders them: nothing is lost or stored twice.
    let mut shippers = [
        site.follow(pki, &nodes[0].addr),
        site.follow(pki, &nodes[1].addr),
    ];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stamping = stamp_until(site, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stamped = stamping.await.unwrap();
    wait_caught_up(pg, site);
    let head = hq_head(pg, &site.id);
    assert_eq!(
        pg.number("SELECT count(*) FROM records") as u64,
        head,
        "records stored twice or lost"
    );
    assert_eq!(
        pg.number("SELECT count(*) FROM records WHERE kind = 'stamp.completed'"),
        30 + i64::from(stamped)
    );
    let report = verify_central(pg, site);
    assert!(report.ok(), "{:?}", report.problems);
    for s in &mut shippers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// Sends one raw frame to HQ with `site`'s certificate, and reads the reply (None when HQ
/// closes without one).
async fn raw_frame(
    pki: &Pki,
    addr: &str,
    site: &str,
    frame: &[u8],
) -> Option<sealgate::hq::pb::HqReply> {
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki_path = |f: &str| std::path::PathBuf::from(pki.path(f));
    let config = sealgate::tls::client_config(
        &pki_path("ca.crt"),
        Some((
            &pki_path(&format!("{site}.crt")),
            &pki_path(&format!("{site}.key")),
        )),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(frame).await.unwrap();
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut len))
        .await
        .expect("HQ answers or closes")
        .ok()?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    tls.read_exact(&mut body).await.ok()?;
    Some(sealgate::hq::pb::HqReply::decode(body.as_slice()).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_central_alert_fires_and_nothing_unverified_reaches_a_table() {
    let rig = Rig::new("nanjing");
    let (pg, pki, site) = (&rig.pg, &rig.pki, &rig.site);
    let other = Site::start("suzhou", pki);
    let node = rig.node();
    let copies = tempfile::tempdir().unwrap();
    let ship_copy = |db: &std::path::Path| ship(&Site::ship_args(pki, db, &node.addr, &site.id));
    // The site's log under a certificate of its own that no site is enrolled with.
    let ship_as_stranger = |name: &str| {
        pki.client(name);
        ship(&Site::ship_args(pki, &site.daemon.db(), &node.addr, name))
    };

    stamp_n(site, 5).await;
    let backup = site.copy_log(&copies.path().join("backup.db"));
    stamp_n(site, 5).await;
    let (code, out) = site.ship_once(pki, &node.addr);
    assert_eq!(code, 0, "{out}");
    let head = hq_head(pg, &site.id);
    stamp_n(site, 5).await;

    // A gap: a copy of the log with the records after HQ's head taken out.
    let gap = site.copy_log(&copies.path().join("gap.db"));
    sqlite3(
        &gap,
        &format!(
            "DELETE FROM audit WHERE seq BETWEEN {} AND {}",
            head + 1,
            head + 3
        ),
    );
    let (code, out) = ship_copy(&gap);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("GAP") && out.contains("missing"), "{out}");

    // A forged checkpoint: its signature is not the audit key's.
    let forged = site.copy_log(&copies.path().join("forged.db"));
    sqlite3(
        &forged,
        "UPDATE checkpoints SET signature = randomblob(length(signature))
         WHERE seq = (SELECT max(seq) FROM checkpoints)",
    );
    let (code, out) = ship_copy(&forged);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BAD_SIGNATURE"), "{out}");

    // A record changed after HQ's head: it no longer hashes as it says. (One whose hash and
    // the chain after it were recomputed is given away by the checkpoint; see the unit tests
    // of hq::check.)
    let altered = site.copy_log(&copies.path().join("altered.db"));
    sqlite3(
        &altered,
        &format!(
            "UPDATE audit SET detail = 'rewritten' WHERE seq = {}",
            head + 2
        ),
    );
    let (code, out) = ship_copy(&altered);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BAD_RECORD"), "{out}");

    // Another site's log under this site's certificate; a refused hello leaves what HQ
    // believes the site holds as it was.
    let reported =
        |pg: &Postgres| pg.number("SELECT reported_seq FROM sites WHERE site = 'nanjing'");
    let before = reported(pg);
    stamp_n(&other, 12).await;
    let (code, out) = ship(&Site::ship_args(
        pki,
        &other.daemon.db(),
        &node.addr,
        &site.id,
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NOT_ENROLLED"), "{out}");
    assert_eq!(reported(pg), before);

    // Everything HQ was sent so far but the honest batch was refused.
    assert_eq!(
        pg.number(&format!(
            "SELECT count(*) FROM records WHERE site = '{}'",
            site.id
        )) as u64,
        head
    );

    // The honest log goes on; then its tail is cut together with its checkpoints.
    let (code, out) = site.ship_once(pki, &node.addr);
    assert_eq!(code, 0, "{out}");
    let head = hq_head(pg, &site.id);
    let cut = copies.path().join("cut.db");
    site.copy_cut_before(&cut, head);
    let (code, out) = ship_copy(&cut);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("ROLLBACK") && out.contains("cut"), "{out}");

    // A fork: the site restored from the early backup onto another machine stamps anew.
    let before = site.daemon.db();
    let restored = site.restored_from(&backup);
    let mut c = restored.client().await;
    for i in 0..30 {
        stamp_ok(&mut c, "contract", &sha256(format!("anew {i}").as_bytes())).await;
    }
    drop(c);
    let (code, out) = ship_copy(&restored.db());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FORK"), "{out}");
    assert_ne!(before, restored.db());

    // A certificate no site is enrolled with: refused in the handshake.
    let (code, out) = ship_as_stranger("stranger");
    assert_eq!(code, 2, "{out}");

    // Garbage, a batch before the hello, and a frame over the limit.
    let reply = raw_frame(pki, &node.addr, &site.id, &[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("a reply to garbage");
    assert_eq!(reply.status, sealgate::hq::pb::Status::BadRequest as i32);
    let batch = {
        use prost::Message;
        let m = sealgate::hq::pb::SiteMessage {
            body: Some(sealgate::hq::pb::site_message::Body::Batch(
                sealgate::hq::pb::Batch::default(),
            )),
        }
        .encode_to_vec();
        let mut f = (m.len() as u32).to_be_bytes().to_vec();
        f.extend(m);
        f
    };
    let reply = raw_frame(pki, &node.addr, &site.id, &batch).await.unwrap();
    assert_eq!(reply.status, sealgate::hq::pb::Status::BadRequest as i32);
    assert!(
        reply.message.contains("before the hello"),
        "{}",
        reply.message
    );
    let reply = raw_frame(pki, &node.addr, &site.id, &(64u32 << 20).to_be_bytes())
        .await
        .unwrap();
    assert_eq!(reply.status, sealgate::hq::pb::Status::TooLarge as i32);

    // Each refusal is a central alert, once; `sealctl hq alerts` lists them, and a follower
    // sees the next one as it is raised.
    let url = pg.url(common::postgres::OWNER);
    let (code, out) = sealctl(&["hq", "alerts", "--url", &url, "--site", &site.id, "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().count(), alerts(pg, &site.id).len(), "{out}");
    let mut follower = std::process::Command::new(SEALCTL)
        .args([
            "hq",
            "alerts",
            "--url",
            &url,
            "--follow",
            "--json",
            "--since",
            "2026-01-01",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Printed::collect(follower.stdout.take().unwrap());
    let before = alerts(pg, "%").len();
    seen.wait_for("{", before, Duration::from_secs(10));
    let (code, out) = ship_as_stranger("stranger2");
    assert_eq!(code, 2, "{out}");
    seen.wait_for("{", before + 1, Duration::from_secs(10));
    assert!(
        seen.all().last().unwrap().contains("\"unknown_site\""),
        "{:?}",
        seen.all()
    );
    let _ = follower.kill();
    let _ = follower.wait();
    let raised = alerts(pg, &site.id);
    for kind in [
        "gap",
        "bad_signature",
        "bad_record",
        "not_enrolled",
        "rollback",
        "fork",
        "bad_request",
        "too_large",
    ] {
        let n = raised
            .iter()
            .filter(|a| a.starts_with(&format!("{kind}: ")))
            .count();
        assert!(n >= 1, "no {kind} alert: {raised:#?}");
    }
    let strangers = alerts(pg, "certificate %");
    assert_eq!(strangers.len(), 2, "{strangers:?}");
    assert!(strangers[0].starts_with("unknown_site: "), "{strangers:?}");

    // Central alerts reach people too: `sealctl notify` on HQ's database, to a webhook that
    // checks the HMAC (tests/python/alert_receivers.py).
    {
        use common::receivers::{received, secret_file, Receiver};
        let work = tempfile::tempdir().unwrap();
        let out = work.path().join("received");
        std::fs::create_dir(&out).unwrap();
        let secret = secret_file(work.path(), "hook.secret", "the risk office's key");
        let port = common::postgres::free_port();
        let _hook = Receiver::http(port, &secret, &secret, &out);
        let config = work.path().join("notify.toml");
        std::fs::write(
            &config,
            format!(
                "site = \"hq\"\noutbox = \"outbox.db\"\nfrom_beginning = true\n\n[hq_database]\nurl = \"{url}\"\n\n[[channel]]\nid = \"risk\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = \"{secret}\"\n\n[[route]]\nchannels = [\"risk\"]\n"
            ),
        )
        .unwrap();
        let (code, said) = sealctl(&["--json", "notify", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{said}");
        let sent: Vec<serde_json::Value> = received(&out, "hook")
            .iter()
            .flat_map(|h| h["body"]["alerts"].as_array().unwrap().clone())
            .collect();
        assert_eq!(
            sent.len() as i64,
            pg.number("SELECT count(*) FROM alerts"),
            "every central alert, once: {sent:?}"
        );
        assert!(sent
            .iter()
            .all(|a| !a["site"].as_str().unwrap_or("").is_empty()));
        assert!(
            sent.iter().any(|a| a["rule"] == "unknown_site")
                && sent
                    .iter()
                    .any(|a| a["rule"] == "fork" && a["site"] == site.id.as_str()),
            "{sent:?}"
        );
        assert!(received(&out, "refused").is_empty());
        let (code, again) = sealctl(&["--json", "notify", "--config", config.to_str().unwrap()]);
        assert_eq!(code, 0, "{again}");
        assert!(again.contains("\"sent\":0"), "nothing twice: {again}");
    }

    // HQ is up, the honest log still ships, and what HQ holds verifies.
    stamp_n(site, 3).await;
    let (code, out) = site.ship_once(pki, &node.addr);
    assert_eq!(code, 0, "{out}");
    let report = verify_central(pg, site);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.records, hq_head(pg, &site.id));
    assert_eq!(
        pg.number("SELECT count(*) FROM records") as u64,
        hq_head(pg, &site.id),
        "a refused record reached the table"
    );
}

/// The cosignature message built by hand from docs/headquarters.md, for openssl.
fn cosignature_message(c: &sealgate::hq::cosign::Cosignature) -> Vec<u8> {
    let mut m = b"sealgate-cosignature-v1\0".to_vec();
    m.extend((c.site.len() as u32).to_be_bytes());
    m.extend(c.site.as_bytes());
    m.extend(c.seq.to_be_bytes());
    m.extend(c.head);
    m.extend(c.checkpoint_at_ms.to_be_bytes());
    m.extend(c.cosigned_at_ms.to_be_bytes());
    m
}

fn sealctl(args: &[&str]) -> (i32, String) {
    ship(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread")]
async fn hq_cosigns_what_it_verified_and_the_site_verify_catches_a_tail_cut_with_its_checkpoints() {
    let rig = Rig::new("xian");
    let (pg, pki, site) = (&rig.pg, &rig.pki, &rig.site);
    let (node, hq_pem) = rig.witnessed_node("hq-witness-xian");

    stamp_n(site, 10).await;
    let mut args = Site::ship_args(pki, &site.daemon.db(), &node.addr, &site.id);
    args.extend(["--hq-key".into(), hq_pem.display().to_string()]);
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    let head = hq_head(pg, &site.id);
    assert!(
        out.contains(&format!("HQ cosigned the log up to seq {head}")),
        "{out}"
    );

    // The cosignature verifies with openssl under the key HQ printed, over the encoding the
    // documentation gives; HQ keeps the same one.
    let store = sealgate::hq::cosign::default_store(&site.daemon.db());
    let kept = sealgate::hq::cosign::read_store(&store).unwrap().unwrap();
    let newest = kept.last().unwrap();
    assert_eq!(newest.seq, head);
    assert_eq!(newest.site, site.id);
    let (_, spki) = pem_rfc7468::decode_vec(std::fs::read(&hq_pem).unwrap().as_slice()).unwrap();
    assert!(openssl_verify(
        "ecdsa-p256-sha256",
        &spki,
        &cosignature_message(newest),
        &newest.signature
    ));
    assert_eq!(
        pg.psql(&format!(
            "SELECT encode(signature, 'hex') FROM cosignatures WHERE site = '{}' AND seq = {head}",
            site.id
        )),
        hex::encode(&newest.signature)
    );

    // The site's own verify reports it.
    let db = site.daemon.db().display().to_string();
    let hq_key = hq_pem.display().to_string();
    let (code, out) = sealctl(&["audit", "verify", "--db", &db, "--hq-key", &hq_key]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("HQ cosigned this log up to seq {head}")),
        "{out}"
    );

    // The tail cut together with its checkpoints: the log alone still verifies (what a log
    // cannot tell of itself), but not against HQ's cosignature.
    let copies = tempfile::tempdir().unwrap();
    let cut = copies.path().join("cut.db");
    let keep = site.copy_cut_before(&cut, head);
    let cut_store = copies.path().join("hq-cosignatures.db");
    std::fs::copy(&store, &cut_store).unwrap();
    let cut_db = cut.display().to_string();
    let (code, out) = sealctl(&["audit", "verify", "--db", &cut_db]);
    assert_eq!(code, 0, "the cut alone is not caught: {out}");
    let (code, out) = sealctl(&["audit", "verify", "--db", &cut_db, "--hq-key", &hq_key]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "the log ends at seq {keep} but HQ cosigned it up to seq {head}"
        )),
        "{out}"
    );
    // And a cosignature that is not HQ's is named as forged.
    sqlite3(
        &cut_store,
        "UPDATE cosignatures SET signature = randomblob(length(signature))",
    );
    let (code, out) = sealctl(&["audit", "verify", "--db", &cut_db, "--hq-key", &hq_key]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("forged"), "{out}");
    // A hello after more stamps brings the next cosignature.
    stamp_n(site, 3).await;
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    let (code, out) = sealctl(&[
        "audit", "verify", "--db", &db, "--hq-key", &hq_key, "--json",
    ]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["hq_cosigned_seq"], hq_head(pg, &site.id));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_site_shows_alive_by_its_heartbeats_and_a_cut_off_one_raises_silence() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let site = Site::start_with_heartbeat("lanzhou", &pki, 1);
    let metrics = common::postgres::free_port();
    let node = HqNode::start(dir.path(), &pg, |port| {
        hq_config(
            &pki,
            &pg,
            port,
            &[(&site.id, &site.fingerprint, &site.audit_pem)],
        )
        .replace(
            "idle_timeout_ms = 5000",
            &format!("idle_timeout_ms = 5000\nsilence_after_ms = 3000\nmetrics_listen = \"127.0.0.1:{metrics}\""),
        )
    });
    let mut shipper = site.follow(&pki, &node.addr);
    stamp_n(&site, 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = hq_head(&pg, &site.id);
    // Quiet for longer than the silence limit: the heartbeats keep it alive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(hq_head(&pg, &site.id) > before, "no heartbeat reached HQ");
    assert!(
        pg.number("SELECT count(*) FROM records WHERE kind = 'audit.heartbeat'") >= 3,
        "too few heartbeats"
    );
    assert!(alerts(&pg, "%").is_empty(), "{:?}", alerts(&pg, "%"));
    // HQ's metrics show the site's head (refreshed every second), no lag, what came in.
    let scrape = |port: u16| {
        let (head, body) = http_get(port, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(metrics);
        let head = hq_head(&pg, &site.id) as f64;
        let shown = sample(&s, "sealgate_hq_site_head_seq", &[("site", "lanzhou")]);
        if (head - shown).abs() <= 2.0 {
            assert!(sample(&s, "sealgate_hq_site_lag_records", &[("site", "lanzhou")]) <= 2.0);
            assert!(
                sample(
                    &s,
                    "sealgate_hq_site_head_age_seconds",
                    &[("site", "lanzhou")]
                ) < 3.0
            );
            assert!(
                sample(
                    &s,
                    "sealgate_hq_records_received_total",
                    &[("site", "lanzhou")]
                ) > 0.0
            );
            assert_eq!(
                sample(
                    &s,
                    "sealgate_hq_alerts",
                    &[("site", "lanzhou"), ("kind", "silence")]
                ),
                0.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics head {shown}, HQ {head}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Cut off: the shipper stops; HQ notices within the limit and a check.
    let _ = shipper.kill();
    let _ = shipper.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let raised = loop {
        let a = alerts(&pg, &site.id);
        if !a.is_empty() || std::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert!(
        raised[0].starts_with("silence: nothing from site lanzhou"),
        "{raised:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(
        &scrape(metrics),
        "sealgate_hq_alerts",
        &[("site", "lanzhou"), ("kind", "silence")],
    ) < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no silence in the metrics"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        sample(
            &scrape(metrics),
            "sealgate_hq_site_head_age_seconds",
            &[("site", "lanzhou")]
        ) >= 3.0
    );
    // The site's own log verifies with its heartbeats in it.
    let (code, out) = sealctl(&[
        "audit",
        "verify",
        "--db",
        &site.daemon.db().display().to_string(),
        "--key",
        &site.audit_pem.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
}

/// The shipped alert rules (lag, silence, a refused log) are valid and do what their tests say.
#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus");
    for args in [
        ["check", "rules", "sealgate-hq.rules.yml"],
        ["test", "rules", "sealgate-hq.rules.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (Debian's prometheus package)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Crash points of shipping: in HQ before and after the batch's commit, between the
/// cosignature and its storing, before the reply; in the shipper after HQ's acknowledgement and
/// after it kept the cosignature. Aborted at each while the site stamps, restarted: every
/// record is at HQ once, HQ's head is the site's, the central log verifies, and the newest
/// cosignature kept is HQ's head.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_step_of_shipping_loses_nothing_and_stores_nothing_twice() {
    let rig = Rig::new("hefei");
    let (pg, pki, site) = (&rig.pg, &rig.pki, &rig.site);
    let (mut node, hq_pem) = rig.witnessed_node("hq-witness-hefei");
    let mut args = Site::ship_args(pki, &site.daemon.db(), &node.addr, &site.id);
    args.extend(["--hq-key".into(), hq_pem.display().to_string()]);
    let check = |when: &str| {
        wait_caught_up(pg, site);
        let head = hq_head(pg, &site.id);
        assert_eq!(
            pg.number("SELECT count(*) FROM records") as u64,
            head,
            "{when}: records lost or stored twice"
        );
        let report = verify_central(pg, site);
        assert!(report.ok(), "{when}: {:?}", report.problems);
        head
    };

    let mut follow_args = args.clone();
    follow_args.push("--follow".into());
    let mut shipper = std::process::Command::new(SEALCTL)
        .args(&follow_args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for point in [
        "hq.ingest.before_commit",
        "hq.ingest.after_commit",
        "hq.cosign.before_store",
        "hq.before_reply",
    ] {
        node.kill();
        node.restart_with(&[("FAILPOINTS", &format!("{point}=return"))]);
        stamp_n(site, 3).await;
        assert!(
            node.wait_aborted(Duration::from_secs(20)),
            "{point}: HQ was not aborted"
        );
        node.restart();
        stamp_n(site, 2).await;
        check(point);
    }
    let _ = shipper.kill();
    let _ = shipper.wait();

    let store = sealgate::hq::cosign::default_store(&site.daemon.db());
    for point in ["ship.after_ack", "ship.after_cosignature"] {
        stamp_n(site, 3).await;
        let out = std::process::Command::new(SEALCTL)
            .args(&args)
            .env("FAILPOINTS", format!("{point}=return"))
            .output()
            .unwrap();
        assert!(
            aborted(out.status),
            "{point}: the shipper was not aborted: {out:?}"
        );
        let (code, out) = ship(&args);
        assert_eq!(code, 0, "{point}: {out}");
        let head = check(point);
        let kept = sealgate::hq::cosign::read_store(&store).unwrap().unwrap();
        assert_eq!(kept.last().map(|c| c.seq), Some(head), "{point}");
    }
    // The site stamped throughout, and its own log verifies with HQ's cosignatures.
    let (code, out) = sealctl(&[
        "audit",
        "verify",
        "--db",
        &site.daemon.db().display().to_string(),
        "--key",
        &site.audit_pem.display().to_string(),
        "--hq-key",
        &hq_pem.display().to_string(),
    ]);
    assert_eq!(code, 0, "{out}");
}

/// HQ reaches a database elsewhere only over TLS, checking the server's certificate: the
/// site's log arrives over a connection PostgreSQL reports as TLS.
#[tokio::test(flavor = "multi_thread")]
async fn hq_reaches_its_database_over_tls_when_given_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let pg = Postgres::start_with_tls(
        std::path::Path::new(&pki.path("server.crt")),
        std::path::Path::new(&pki.path("server.key")),
    );
    let site = Site::start("fuzhou", &pki);
    let node = HqNode::start(dir.path(), &pg, |port| {
        hq_config(
            &pki,
            &pg,
            port,
            &[(&site.id, &site.fingerprint, &site.audit_pem)],
        )
        .replace(
            "pool_size = 4",
            &format!("pool_size = 4\nca = \"{}\"", pki.path("ca.crt")),
        )
    });
    stamp_n(&site, 3).await;
    let (code, out) = site.ship_once(&pki, &node.addr);
    assert_eq!(code, 0, "{out}");
    wait_caught_up(&pg, &site);
    let tls = pg.number(&format!(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.usename = '{HQ_ROLE}' AND s.ssl"
    ));
    let plain = pg.number(&format!(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.usename = '{HQ_ROLE}' AND NOT s.ssl"
    ));
    assert!(
        tls >= 1 && plain == 0,
        "{tls} TLS and {plain} plaintext connections of HQ"
    );
    let report = verify_central(&pg, &site);
    assert!(report.ok(), "{:?}", report.problems);
}

/// The records of one kind in a site's log: (seq, reason, detail, evidence).
fn site_records(site: &Site, kind: &str) -> Vec<(u64, String, String, serde_json::Value)> {
    let out = sqlite3(
        &site.daemon.db(),
        &format!(
            "SELECT json_object('seq', seq, 'reason', reason, 'detail', detail, 'evidence', evidence) FROM audit WHERE kind = '{kind}' ORDER BY seq"
        ),
    );
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["seq"].as_u64().unwrap(),
                v["reason"].as_str().unwrap().to_owned(),
                v["detail"].as_str().unwrap().to_owned(),
                serde_json::from_str(v["evidence"].as_str().unwrap()).unwrap_or_default(),
            )
        })
        .collect()
}

/// Asks the site's daemon to apply fragment bytes directly, as a shipper would.
async fn apply_policy(site: &Site, fragment: Vec<u8>) -> sealgate::protocol::Response {
    let mut c = site.daemon.client().await;
    c.call(sealgate::protocol::request::Body::ApplyPolicy(
        sealgate::protocol::pb::ApplyPolicyRequest { fragment },
    ))
    .await
    .unwrap()
}

/// A stamp with the contract seal approved by the department head alone: its status and reason.
async fn contract_by_one_level(site: &Site, what: &str) -> (i32, String) {
    let mut c = site.daemon.client().await;
    let digest = sha256(format!("{} {what} {}", site.id, unix_now()).as_bytes());
    let r = c
        .stamp("contract", &digest, &token_for("contract", &digest), "")
        .await
        .unwrap();
    (r.status, r.reason)
}

/// A contract approved by the department head and an executive.
async fn contract_by_two_levels(site: &Site, what: &str) {
    let mut c = site.daemon.client().await;
    let digest = sha256(format!("{} {what} {}", site.id, unix_now()).as_bytes());
    let mut a = Approval::for_seal("contract", &digest);
    a.signers = vec![("zhang.wei".into(), 300), ("li.na".into(), 240)];
    let r = c.stamp("contract", &digest, &a.token(), "").await.unwrap();
    assert_eq!(
        r.status,
        sealgate::protocol::Status::Ok as i32,
        "{what}: {} {}",
        r.reason,
        r.message
    );
}

/// Contracts take two levels: the department head and an executive.
const TWO_LEVELS: &str = r#"
[[seal]]
id = "contract"

[[seal.rule]]
name = "contracts, two levels (HQ)"
doc_types = ["contract"]
levels = ["dept_head", "executive"]
dept_scoped = ["dept_head"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_fragment_from_hq_tightens_a_site_rule_and_foreign_stale_or_pinned_ones_are_refused(
) {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // HQ's policy key first: the site is configured with it.
    let policy = key_section(dir.path(), "policy", "hq-policy-kunming");
    let keys_only = dir.path().join("hq-keys.toml");
    std::fs::write(&keys_only, hq_config(&pki, &pg, 1, &[]) + &policy).unwrap();
    let (code, pem) = hq_command(&keys_only, &["policy", "key"]);
    assert_eq!(code, 0, "{pem}");
    let policy_pem = dir.path().join("hq-policy.pub.pem");
    std::fs::write(&policy_pem, &pem).unwrap();
    let site = Site::start_with(
        "kunming",
        &pki,
        0,
        &format!(
            "\n[hq_policy]\nsite = \"kunming\"\nkey_file = \"{}\"\npinned = [\"approver\"]\n",
            policy_pem.display()
        ),
    );
    let node = HqNode::start(dir.path(), &pg, |port| {
        hq_config(
            &pki,
            &pg,
            port,
            &[(&site.id, &site.fingerprint, &site.audit_pem)],
        ) + &policy
    });
    let mut args = vec![
        "--socket".to_string(),
        site.daemon.socket.display().to_string(),
    ];
    args.extend(Site::ship_args(
        &pki,
        &site.daemon.db(),
        &node.addr,
        &site.id,
    ));
    args.push("--apply-policy".into());
    let publish = |body: &str, config: &std::path::Path| {
        let file = dir.path().join(format!("fragment-{}.toml", free_port()));
        std::fs::write(&file, body).unwrap();
        hq_command(
            config,
            &[
                "policy",
                "publish",
                "--site",
                "kunming",
                file.to_str().unwrap(),
            ],
        )
    };

    // Before: one level is enough.
    assert_eq!(
        contract_by_one_level(&site, "before").await.0,
        sealgate::protocol::Status::Ok as i32
    );

    // Version 1 tightens the contract seal; the shipper hands it over at its hello.
    let (code, out) = publish(TWO_LEVELS, &node.config);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("site kunming: policy version 1 published (seal:contract;"),
        "{out}"
    );
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("HQ policy version 1 is in force at the daemon"),
        "{out}"
    );
    let (status, reason) = contract_by_one_level(&site, "after").await;
    assert_eq!(
        (status, reason.as_str()),
        (
            sealgate::protocol::Status::ApprovalDenied as i32,
            "missing_level"
        )
    );
    contract_by_two_levels(&site, "after").await;
    let applied = site_records(&site, "config.applied");
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0].3["version"], 1);
    assert_eq!(
        applied[0].3["sections"],
        serde_json::json!(["seal:contract"])
    );
    // HQ learns which version is in force from the records it verified.
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    let in_force =
        |pg: &Postgres| pg.psql("SELECT policy_version FROM sites WHERE site = 'kunming'");
    assert_eq!(in_force(&pg), "1");
    assert_eq!(
        pg.psql("SELECT policy_sha256 FROM sites WHERE site = 'kunming'"),
        applied[0].3["fragment_sha256"].as_str().unwrap()
    );

    // Version 2 comes signed by another key (a node with a policy key of its own): refused,
    // recorded, and version 1 stays in force.
    let stranger = dir.path().join("hq-stranger.toml");
    std::fs::write(
        &stranger,
        hq_config(&pki, &pg, 1, &[])
            + &key_section(dir.path(), "policy", "hq-policy-stranger-kunming"),
    )
    .unwrap();
    let (code, out) = publish(&TWO_LEVELS.replace("two levels", "relaxed"), &stranger);
    assert_eq!(code, 0, "{out}");
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("the daemon refused HQ's policy fragment"),
        "{out}"
    );
    let refused = site_records(&site, "config.refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].1, "bad_signature", "{refused:?}");
    assert_eq!(refused[0].3["version"], 2);
    assert_eq!(
        contract_by_one_level(&site, "after v2").await.1,
        "missing_level"
    );

    // Version 3, by HQ's key, also changes the alert thresholds: in force.
    let v3 = format!(
        "{TWO_LEVELS}\n[alerts]\nrestamp = true\nburst_count = 500\nburst_window_seconds = 60\n"
    );
    let (code, out) = publish(&v3, &node.config);
    assert_eq!(code, 0, "{out}");
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("HQ policy version 3 is in force at the daemon"),
        "{out}"
    );

    // Version 1 handed over again is older than the one in force: refused and recorded.
    let row = pg.psql(
        "SELECT version || ' ' || issued_at_ms || ' ' || key_id || ' ' || algorithm || ' ' || encode(signature, 'hex') || ' ' || encode(convert_to(body, 'UTF8'), 'hex') FROM policy_fragments WHERE site = 'kunming' AND version = 1",
    );
    let f: Vec<&str> = row.split(' ').collect();
    let v1 = sealgate::hq::policy::Fragment {
        site: "kunming".into(),
        version: f[0].parse().unwrap(),
        issued_at_ms: f[1].parse().unwrap(),
        key_id: f[2].into(),
        algorithm: f[3].into(),
        signature: hex::decode(f[4]).unwrap(),
        body: String::from_utf8(hex::decode(f[5]).unwrap()).unwrap(),
    };
    let r = apply_policy(&site, v1.encode()).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (
            sealgate::protocol::Status::PolicyRefused as i32,
            "not_newer"
        ),
        "{}",
        r.message
    );
    assert!(
        r.message.contains("not newer than version 3 in force"),
        "{}",
        r.message
    );
    // The same fragment with its version raised no longer verifies.
    let forged = sealgate::hq::policy::Fragment {
        version: 9,
        ..v1.clone()
    };
    let r = apply_policy(&site, forged.encode()).await;
    assert_eq!(r.reason, "bad_signature", "{}", r.message);
    let r = apply_policy(&site, b"\xff\xff not a fragment".to_vec()).await;
    assert_eq!(r.reason, "invalid", "{}", r.message);

    // Version 4 changes the approvers, which this site pinned: refused whole.
    let v4 = format!(
        "{v3}\n[[approver]]\nid = \"hq.appointee\"\nrole = \"executive\"\npublic_key = \"\"\"\n{pem}\"\"\"\n"
    );
    let (code, out) = publish(&v4, &node.config);
    assert_eq!(code, 0, "{out}");
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    let refused = site_records(&site, "config.refused");
    let reasons: Vec<&str> = refused.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "bad_signature",
            "not_newer",
            "bad_signature",
            "invalid",
            "pinned"
        ],
        "{refused:?}"
    );
    assert!(
        refused[4]
            .2
            .contains("changes \"approver\", which this site pinned"),
        "{refused:?}"
    );

    // A reload and a restart keep version 3 in force; the restart says so in its first record.
    assert!(site.daemon.reload(1).contains("configuration reloaded"));
    assert_eq!(
        contract_by_one_level(&site, "after the reload").await.1,
        "missing_level"
    );
    let mut site = site;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(site.daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    site.daemon = site.daemon.restart_with(&[]).unwrap();
    assert_eq!(
        contract_by_one_level(&site, "after the restart").await.1,
        "missing_level"
    );
    let started = site_records(&site, "daemon.started");
    assert_eq!(
        started.last().unwrap().3["policy_version"],
        3,
        "{started:?}"
    );

    // The kept fragment must go on applying. A reload whose configuration now pins what it
    // changes is refused, and version 3 stays in force...
    let config_path = site.daemon.dir.path().join("sealgate.toml");
    let good = std::fs::read_to_string(&config_path).unwrap();
    let pinned = good.replace(
        "pinned = [\"approver\"]",
        "pinned = [\"approver\", \"seal\"]",
    );
    assert_ne!(pinned, good);
    std::fs::write(&config_path, &pinned).unwrap();
    let line = site.daemon.reload_next();
    assert!(
        line.contains("reload refused") && line.contains("no longer applies"),
        "{line}"
    );
    assert_eq!(
        contract_by_one_level(&site, "after the refused reload")
            .await
            .1,
        "missing_level"
    );
    // ...and a start with another HQ key configured is refused: the kept fragment does not
    // verify under it.
    let other_key = good.replace(
        &policy_pem.display().to_string(),
        &site.audit_pem.display().to_string(),
    );
    assert_ne!(other_key, good);
    std::fs::write(&config_path, &other_key).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(site.daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let failed = match site.daemon.restart_with(&[]) {
        Ok(_) => panic!("the daemon started on a fragment that does not verify"),
        Err(f) => f,
    };
    assert!(
        failed.stderr.contains("no longer applies")
            && failed.stderr.contains("not signed by HQ's policy key"),
        "{}",
        failed.stderr
    );
    // The configuration put back, it starts with version 3 in force.
    site.daemon = Daemon::start_with(failed.dir, &good, &[]).unwrap();
    assert_eq!(
        contract_by_one_level(&site, "after the start with the right key")
            .await
            .1,
        "missing_level"
    );
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    assert_eq!(in_force(&pg), "3");
    let (code, out) = sealctl(&["hq", "stats", "--url", &pg.url(HQ_ROLE)]);
    assert_eq!(code, 0, "{out}");
    let row = out.lines().find(|l| l.starts_with("kunming")).unwrap();
    assert_eq!(row.split_whitespace().last(), Some("3"), "{out}");
    // Everything the site recorded verifies, here and at HQ.
    let (code, out) = sealctl(&[
        "audit",
        "verify",
        "--db",
        site.daemon.db().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(verify_central(&pg, &site).ok(), "HQ's copy verifies");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_site_started_again_with_a_new_audit_key_is_refused_until_enrolled_again_and_keeps_its_history(
) {
    let rig = Rig::new("dali");
    let (pg, pki, old) = (&rig.pg, &rig.pki, &rig.site);
    let mut node = rig.node();
    stamp_n(old, 6).await;
    let (code, out) = old.ship_once(pki, &node.addr);
    assert_eq!(code, 0, "{out}");
    let old_head = hq_head(pg, "dali");
    assert!(old_head > 6);

    // The site's audit device is replaced and its log starts again, with a new key. HQ,
    // configured with the new key, still holds the enrolled one and refuses the new log.
    let new = Site::start("dali-again", pki);
    stamp_n(&new, 4).await;
    std::fs::write(
        &node.config,
        hq_config(
            pki,
            pg,
            node.port(),
            &[("dali", &old.fingerprint, &new.audit_pem)],
        ),
    )
    .unwrap();
    node.kill();
    node.restart();
    assert!(
        node.log()
            .contains("the configured audit key is not the one enrolled"),
        "{}",
        node.log()
    );
    let args = Site::ship_args(pki, &new.daemon.db(), &node.addr, "dali");
    let (code, out) = ship(&args);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NOT_ENROLLED"), "{out}");
    assert_eq!(hq_head(pg, "dali"), old_head);
    // Nothing resets the site behind the enrolment's back: not HQ's own role.
    let e = pg
        .try_psql_as_role(
            HQ_ROLE,
            "UPDATE sites SET audit_key_id = 'x', head_seq = 0 WHERE site = 'dali'",
        )
        .unwrap_err();
    assert!(e.contains("keeps its enrolled key within an epoch"), "{e}");

    // The explicit step: a new epoch, with its reason kept.
    let hq_config_path = node.config.clone();
    let (code, out) = hq_command(
        &hq_config_path,
        &[
            "enrol",
            "--site",
            "dali",
            "--reason",
            "audit token replaced",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("site dali: epoch 2 enrolled with audit key"),
        "{out}"
    );
    assert!(
        out.contains(&format!("epoch 1 ends at seq {old_head}")),
        "{out}"
    );
    let (code, out) = hq_command(
        &hq_config_path,
        &["enrol", "--site", "dali", "--reason", "twice"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nothing to do"), "{out}");

    // The new log ships from seq 1; the old epoch stays whole and apart.
    let (code, out) = ship(&args);
    assert_eq!(code, 0, "{out}");
    let new_head = new.newest_checkpoint().0;
    assert_eq!(hq_head(pg, "dali"), new_head);
    assert_eq!(
        pg.number("SELECT count(*) FROM records WHERE site = 'dali' AND epoch = 1") as u64,
        old_head
    );
    assert_eq!(
        pg.number("SELECT count(*) FROM records WHERE site = 'dali' AND epoch = 2") as u64,
        new_head
    );
    assert_eq!(
        pg.psql(
            "SELECT string_agg(epoch || ' ' || reason || ' ' || previous_head_seq, ', ' ORDER BY epoch) FROM enrolments WHERE site = 'dali'"
        ),
        format!("1 enrolled 0, 2 audit token replaced {old_head}")
    );
    assert!(verify_central(pg, &new).ok(), "the new epoch verifies");
    // The old log, shipped again, is now the one refused.
    let (code, out) = old.ship_once(pki, &node.addr);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NOT_ENROLLED"), "{out}");
    let (code, out) = sealctl(&["hq", "stats", "--url", &pg.url(HQ_ROLE), "--json"]);
    assert_eq!(code, 0, "{out}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats[0]["epoch"], 2, "{out}");
    assert_eq!(stats[0]["records"], new_head, "{out}");
}
