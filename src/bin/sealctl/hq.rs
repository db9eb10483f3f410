//! `sealctl hq`: headquarters' view over every site, read from HQ's PostgreSQL database: the
//! records (with the same filters and formats as `sealctl audit query`, and a site column),
//! each site's head, lag and counts, and the central alerts, followed as they come.

use crate::audit::{time, FilterArgs, Format};
use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use sealgate::hq::config::DatabaseConfig;
use sealgate::hq::db::Db;
use std::io::Write;
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Database {
    /// HQ's database, a libpq-style connection string ("host=... port=... user=... dbname=...").
    #[arg(long, env = "SEALGATE_HQ_DB")]
    url: String,
    /// CA certificates (PEM) of the database server; without it only loopback or a Unix
    /// socket.
    #[arg(long)]
    db_ca: Option<PathBuf>,
    /// Only this site.
    #[arg(long)]
    site: Option<String>,
}

// Parsed once per run; the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum HqCommand {
    /// Records of every site (or --site) matching every filter given, by site and seq.
    Query {
        #[command(flatten)]
        db: Database,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Each site: its verified head and when it last moved, when it was last seen, how far HQ
    /// is behind what it last said it holds, and its records, stamps, refusals and alerts.
    Stats {
        #[command(flatten)]
        db: Database,
    },
    /// Central alerts (gap, fork, rollback, silence, …), oldest first; with --follow, then each
    /// new one as it is raised, until Ctrl-C.
    Alerts {
        #[command(flatten)]
        db: Database,
        /// Only alerts since this time (RFC 3339, or YYYY-MM-DD in UTC).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        follow: bool,
    },
}

impl Database {
    fn config(&self) -> DatabaseConfig {
        DatabaseConfig {
            url: self.url.clone(),
            ca: self.db_ca.clone(),
            pool_size: 1,
        }
    }
}

pub fn run(command: &HqCommand, json: bool) -> anyhow::Result<i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    runtime.block_on(async {
        match command {
            HqCommand::Query { db, filter, format } => {
                query(db, &filter.to_filter()?, *format).await
            }
            HqCommand::Stats { db } => stats(db, json).await,
            HqCommand::Alerts { db, since, follow } => {
                let since = since.as_deref().map(crate::audit::parse_time).transpose()?;
                alerts(db, since, *follow, json).await
            }
        }
    })?;
    Ok(0)
}

fn connect(db: &Database) -> anyhow::Result<Db> {
    Db::connect(&db.config()).context("HQ's database")
}

async fn query(
    db: &Database,
    filter: &sealgate::audit::query::Filter,
    format: Format,
) -> anyhow::Result<()> {
    let hq = connect(db)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut first = true;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let mut columns = Vec::new();
    match format {
        Format::Json => out.write_all(b"[")?,
        Format::Table => writeln!(out, "{:<12}  {}", "SITE", crate::audit::TABLE_HEADER)?,
        Format::Csv => {}
    }
    hq.for_each_record(db.site.as_deref(), filter, |site, r| {
        let e = |e: std::io::Error| e.to_string();
        match format {
            Format::Json => {
                let mut v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
                if let Some(m) = v.as_object_mut() {
                    m.insert("site".into(), site.into());
                }
                out.write_all(if first { b"\n" } else { b",\n" })
                    .map_err(e)?;
                serde_json::to_writer(&mut out, &v).map_err(|e| e.to_string())?;
            }
            Format::Csv => {
                // The site, then the columns of `sealctl audit query --format csv`, in its order.
                if first {
                    columns = csv_columns(&r)?;
                    let mut header = vec!["site".to_string()];
                    header.extend(columns.iter().cloned());
                    csv.write_record(&header).map_err(|e| e.to_string())?;
                }
                let v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
                let mut row = vec![site];
                row.extend(columns.iter().map(|k| match &v[k.as_str()] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                }));
                csv.write_record(&row).map_err(|e| e.to_string())?;
            }
            Format::Table => {
                writeln!(out, "{site:<12}  {}", crate::audit::table_row(&r)).map_err(e)?
            }
        }
        first = false;
        Ok(())
    })
    .await?;
    match format {
        Format::Json => out.write_all(b"\n]\n")?,
        Format::Csv => out.write_all(&csv.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?)?,
        Format::Table => {}
    }
    out.flush()?;
    Ok(())
}

/// The header a record's CSV has (its fields, in their order).
fn csv_columns(r: &sealgate::audit::Record) -> Result<Vec<String>, String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.serialize(r).map_err(|e| e.to_string())?;
    let data = w.into_inner().map_err(|e| e.to_string())?;
    let mut reader = csv::Reader::from_reader(data.as_slice());
    Ok(reader
        .headers()
        .map_err(|e| e.to_string())?
        .iter()
        .map(String::from)
        .collect())
}

async fn stats(db: &Database, json: bool) -> anyhow::Result<()> {
    let hq = connect(db)?;
    let sites = hq.site_stats(db.site.as_deref()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&sites)?);
        return Ok(());
    }
    let when = |t: Option<i64>| t.map(time).unwrap_or_else(|| "never".into());
    println!(
        "{:<12}  {:>8}  {:<24}  {:<24}  {:>6}  {:>8}  {:>7}  {:>6}  {:>6}  {:>6}  {:>6}",
        "SITE",
        "HEAD",
        "HEAD MOVED",
        "LAST SEEN",
        "LAG",
        "RECORDS",
        "STAMPS",
        "DENIED",
        "ALERTS",
        "HQ",
        "POLICY"
    );
    for s in &sites {
        println!(
            "{:<12}  {:>8}  {:<24}  {:<24}  {:>6}  {:>8}  {:>7}  {:>6}  {:>6}  {:>6}  {:>6}",
            s.site,
            s.head_seq,
            when(s.head_at_ms),
            when(s.last_seen_ms),
            s.lag_records,
            s.records,
            s.stamps_completed,
            s.stamps_denied,
            s.site_alerts,
            s.central_alerts,
            s.policy_version
        );
    }
    Ok(())
}

async fn alerts(db: &Database, since: Option<i64>, follow: bool, json: bool) -> anyhow::Result<()> {
    let hq = connect(db)?;
    // Listening starts before the first read, so no alert falls between the two.
    let mut listener = match follow {
        true => Some(sealgate::hq::db::listen_alerts(&db.config()).await?),
        false => None,
    };
    let mut last = 0;
    let print = |a: &sealgate::hq::db::CentralAlert| {
        if json {
            println!("{}", serde_json::to_string(a).unwrap_or_default());
        } else {
            println!(
                "{}  {:<12}  {:<14}  {}",
                time(a.at_ms),
                a.site,
                a.kind,
                a.detail
            );
        }
        let _ = std::io::stdout().flush();
    };
    for a in hq.alerts_after(last, db.site.as_deref(), since).await? {
        print(&a);
        last = a.id;
    }
    let Some((_client, rx)) = listener.as_mut() else {
        return Ok(());
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            n = rx.recv() => {
                if n.is_none() {
                    anyhow::bail!("the connection to HQ's database ended");
                }
                for a in hq.alerts_after(last, db.site.as_deref(), since).await? {
                    print(&a);
                    last = a.id;
                }
            }
        }
    }
}
