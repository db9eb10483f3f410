//! Headquarters: real sites (sealgated with their audit keys in SoftHSM tokens of their own)
//! ship their logs with `sealctl audit ship` over TLS to real `sealgate-hq` nodes on a
//! PostgreSQL cluster the tests start themselves; what lands in PostgreSQL is read back with
//! psql and checked with the offline verifier.

mod common;

use common::hq::*;
use common::pki::Pki;
use common::postgres::{Postgres, HQ_ROLE};
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
        let s = &self.site;
        HqNode::start(self.dir.path(), &self.pg, |port| {
            hq_config(
                &self.pki,
                &self.pg,
                port,
                &[(&s.id, &s.fingerprint, &s.audit_pem)],
            )
        })
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
