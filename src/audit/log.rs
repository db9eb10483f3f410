//! The audit writer: one thread owns the log's write connection and makes records durable in
//! batches (group commit), each batch sealed by a checkpoint the audit device signs before the
//! transaction commits.
//!
//! Owns: appending records in order with their hash chain, consuming an approval's use in the
//! same transaction as its `stamp.authorized` record, checkpoints, start-up recovery (an
//! outcome for every dangling authorisation), refusing work while the store cannot be written
//! and re-opening it from disk afterwards, running the anomaly rules on committed records.
//! Never: replies before a record is durable, or trusts its own memory over the disk after a
//! failed write.

use super::anomaly::Anomaly;
use super::{kind, now_ms, Checkpoint, Record};
use crate::approval::gate::PendingUse;
use crate::approval::{ledger, Denial};
use crate::device::{Health, SealDevice};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, oneshot};

/// Records written in one transaction at most.
const MAX_BATCH: usize = 512;
/// A checkpoint made less than this long after the one before it replaces the latest one
/// (which the new one covers) instead of adding a row; so a busy log keeps about one
/// checkpoint a second, and every committed record is still covered by a signed one.
const CHECKPOINT_SPACING_MS: i64 = 1000;
/// After the store failed, it is re-opened at most this often.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);
/// Records kept for a later batch (alerts, outcomes of stamps whose reply failed) at most.
const MAX_PENDING: usize = 10_000;

/// A record's detail is cut to this many bytes...
const MAX_DETAIL_BYTES: usize = 2048;
/// ...but an application's, which holds its token as it stands (bounded where it is taken in:
/// at most 64 KiB, JSON-quoted here), so the log keeps every approval's evidence whole.
const MAX_APPLICATION_DETAIL_BYTES: usize = 160 * 1024;
/// A seal name taken from a request is cut to this many bytes.
const MAX_NAME_BYTES: usize = 256;

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn clip(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
}

/// Why a record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log's disk is full")]
    Full,
    #[error("the audit log cannot be written: {0}")]
    Unavailable(String),
    #[error("the audit device cannot sign a checkpoint: {0}")]
    Device(String),
    #[error("the audit log is closed")]
    Closed,
    #[error("cannot open the audit log: {0}")]
    Open(String),
    #[error("the audit log was rolled back or replaced: {0}")]
    RolledBack(String),
}

/// What the audit device keeps of the newest committed head, so that a state directory put
/// back to an older copy, or deleted, is noticed at start-up.
const WITNESS_TAG: &[u8] = b"sealgate-witness-v1\0";

/// The witness's label: one per state database, by its absolute path, so that several state
/// directories may share a token.
fn witness_label(db: &std::path::Path) -> String {
    use sha2::Digest;
    let abs = std::fs::canonicalize(db).unwrap_or_else(|_| db.to_owned());
    let digest = sha2::Sha256::digest(abs.as_os_str().as_encoded_bytes());
    format!("sealgate-audit-witness {}", hex::encode(&digest[..12]))
}

fn witness_bytes(seq: u64, head: &[u8; 32]) -> Vec<u8> {
    let mut v = WITNESS_TAG.to_vec();
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(head);
    v
}

/// The witness is brought up to the log's head at most this often (a token object write costs
/// milliseconds), and always when the writer stops.
const WITNESS_SPACING: Duration = Duration::from_secs(1);

/// The thread that keeps the audit device's witness of the head, off the commit path.
struct Witness {
    shared: Arc<WitnessSlot>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The newest head for the witness thread. The writer wakes the thread only when it waits for
/// a head; while it waits out the spacing, a new head just replaces the one in the slot (a
/// wake for every batch cost the writer a system call and the machine a thread switch).
#[derive(Default)]
struct WitnessSlot {
    state: Mutex<WitnessState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct WitnessState {
    newest: Option<(u64, [u8; 32])>,
    /// The thread sleeps until a head comes.
    idle: bool,
    /// The writer stops: write the newest head and end.
    closed: bool,
}

impl WitnessSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, WitnessState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new head; wakes the thread only where it waits for one.
    fn put(&self, seq: u64, head: [u8; 32]) {
        let mut s = self.lock();
        s.newest = Some((seq, head));
        if s.idle {
            self.wake.notify_one();
        }
    }

    /// The writer stops: the thread writes the newest head, if any, and ends.
    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// The next head to write, no sooner than `due`; None once closed with nothing left.
    fn next(&self, due: Option<Instant>) -> Option<(u64, [u8; 32])> {
        let mut s = self.lock();
        while s.newest.is_none() && !s.closed {
            s.idle = true;
            s = self.wake.wait(s).unwrap_or_else(|p| p.into_inner());
            s.idle = false;
        }
        if let Some(due) = due {
            while !s.closed {
                let wait = due.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
                s = self
                    .wake
                    .wait_timeout(s, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        s.newest.take()
    }
}

impl Witness {
    fn start(device: Arc<dyn SealDevice>, label: String) -> std::io::Result<Witness> {
        let shared = Arc::new(WitnessSlot::default());
        let slot = shared.clone();
        let thread = std::thread::Builder::new()
            .name("audit-witness".into())
            .spawn(move || {
                let mut last: Option<Instant> = None;
                while let Some(v) = slot.next(last.map(|t| t + WITNESS_SPACING)) {
                    if let Err(e) = device.replace_data(&label, &witness_bytes(v.0, &v.1)) {
                        tracing::error!(error = %e, seq = v.0, "the audit device did not take the log's new head");
                    }
                    last = Some(Instant::now());
                }
            })?;
        Ok(Witness {
            shared,
            thread: Some(thread),
        })
    }

    fn tell(&self, seq: u64, head: [u8; 32]) {
        self.shared.put(seq, head);
    }

    /// Writes the newest head it was told and stops. Blocks.
    fn finish(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn close(&self) {
        self.shared.close();
    }
}

impl Drop for Witness {
    /// A witness replaced (the log re-opened) writes its newest head and ends on its own.
    fn drop(&mut self) {
        self.close();
    }
}

fn parse_witness(v: &[u8]) -> Option<(u64, [u8; 32])> {
    let rest = v.strip_prefix(WITNESS_TAG)?;
    if rest.len() != 40 {
        return None;
    }
    let seq = u64::from_be_bytes(rest[..8].try_into().ok()?);
    Some((seq, rest[8..].try_into().ok()?))
}

/// The key that signs checkpoints: one of a device's keys, never a seal's.
#[derive(Clone)]
pub struct AuditKey {
    pub device: Arc<dyn SealDevice>,
    pub key: usize,
}

/// What the writer did with one entry.
#[derive(Debug)]
pub enum Appended {
    Record {
        seq: u64,
    },
    /// The use was consumed and `stamp.authorized` recorded.
    Authorized {
        seq: u64,
        uses_left: u32,
    },
    /// The ledger refused the use (replay, exhausted, rate limit); `stamp.denied` recorded.
    Refused {
        seq: u64,
        denial: Denial,
    },
}

enum Entry {
    Record(Box<Record>),
    Authorize(Box<(PendingUse, Record)>),
}

/// What the writer does with an entry's result once its batch has committed (or failed).
enum Reply {
    /// Nobody waits (`append_later`).
    None,
    /// An async caller waits.
    Wait(oneshot::Sender<Result<Appended, AuditError>>),
    /// The next step of a pipeline, run on the writer's thread: it must not block (hand the
    /// work on through a channel), except on the audit key's device, which the writer waits on
    /// for every checkpoint anyway (a stamp alone on that device is signed here).
    Then(Then),
}

/// A continuation run on the writer's thread with the entry's result.
pub type Then = Box<dyn FnOnce(Result<Appended, AuditError>) + Send>;

impl Reply {
    fn send(self, r: Result<Appended, AuditError>) {
        match self {
            Reply::None => {}
            Reply::Wait(tx) => {
                let _ = tx.send(r);
            }
            Reply::Then(f) => f(r),
        }
    }
}

enum Msg {
    Job {
        entry: Entry,
        reply: Reply,
        /// Kept and written with a later batch if this one fails.
        persist: bool,
    },
    /// New anomaly rules (a configuration reload); windows start empty.
    Anomaly(Box<Anomaly>),
    Shutdown,
}

/// Where the log stands, for `sealctl status` and the benchmark.
#[derive(Debug, Clone, Default)]
pub struct AuditStatus {
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    pub checkpoint_seq: u64,
    pub checkpoint_at_ms: i64,
    /// Empty while the log is writable.
    pub error: String,
    pub batches: u64,
    pub records: u64,
}

/// The handle services use; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    status: Arc<Mutex<AuditStatus>>,
    alerts: broadcast::Sender<Record>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl AuditLog {
    /// Opens the log in the database at `path` (schema already migrated), checks its tail
    /// against the last checkpoint, records an outcome for every dangling authorisation and a
    /// `daemon.started` record, and starts the writer. Blocks.
    pub fn open(
        path: PathBuf,
        key: AuditKey,
        anomaly: Anomaly,
        started_evidence: String,
    ) -> Result<AuditLog, AuditError> {
        let status = Arc::new(Mutex::new(AuditStatus::default()));
        let (alerts, _) = broadcast::channel(256);
        let mut w = Writer::new(path, key, anomaly, alerts.clone(), status.clone());
        w.open().map_err(|e| AuditError::Open(e.to_string()))?;
        w.check_tail()?;
        w.check_witness()?;
        let mut first = w.dangling()?;
        if !first.is_empty() {
            crate::crash_point!("recovery.before_outcomes");
        }
        let mut started = Record::new(kind::DAEMON_STARTED);
        started.detail = format!("sealgated {}", env!("CARGO_PKG_VERSION"));
        started.evidence = started_evidence;
        first.push(started);
        w.pending = first;
        w.flush_pending();
        if let Some(e) = &w.failure {
            return Err(AuditError::Open(e.to_string()));
        }
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| AuditError::Open(format!("cannot start the writer thread: {e}")))?;
        Ok(AuditLog {
            tx,
            status,
            alerts,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// What `open` checks, without writing anything: for `sealgated --check`. Blocks.
    pub fn check(path: PathBuf, key: AuditKey) -> Result<(), AuditError> {
        let (alerts, _) = broadcast::channel(1);
        let mut w = Writer::new(path, key, Anomaly::none(), alerts, Default::default());
        w.read_only = true;
        w.open().map_err(|e| AuditError::Open(e.to_string()))?;
        w.check_tail()?;
        w.check_witness()
    }

    async fn submit(&self, entry: Entry) -> Result<Appended, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Job {
                entry,
                reply: Reply::Wait(reply),
                persist: false,
            })
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Hands `entry` to the writer; `then` runs on the writer's thread with the result once it
    /// is durable (or failed). If the writer is gone, `then` runs here with `Closed`.
    fn submit_then(&self, entry: Entry, then: Then) {
        if let Err(mpsc::SendError(Msg::Job { reply, .. })) = self.tx.send(Msg::Job {
            entry,
            reply: Reply::Then(then),
            persist: false,
        }) {
            reply.send(Err(AuditError::Closed));
        }
    }

    /// [`AuditLog::append`] for a pipeline: `then` gets the result on the writer's thread.
    pub fn append_then(&self, record: Record, then: Then) {
        self.submit_then(Entry::Record(Box::new(record)), then)
    }

    /// [`AuditLog::authorize`] for a pipeline: `then` gets the result on the writer's thread,
    /// so the next step (the device) can start without a trip through the caller.
    pub fn authorize_then(&self, pending: PendingUse, record: Record, then: Then) {
        self.submit_then(Entry::Authorize(Box::new((pending, record))), then)
    }

    /// Appends a record and waits until it is durable; returns its seq.
    pub async fn append(&self, record: Record) -> Result<u64, AuditError> {
        match self.submit(Entry::Record(Box::new(record))).await? {
            Appended::Record { seq } => Ok(seq),
            other => Err(AuditError::Unavailable(format!(
                "unexpected writer answer {other:?}"
            ))),
        }
    }

    /// Consumes the uses of an approval and records `record` (`stamp.authorized` or
    /// `terminal.granted`) or, when the ledger refuses, its denial (`stamp.denied`,
    /// `terminal.denied`) in one durable transaction.
    pub async fn authorize(
        &self,
        pending: PendingUse,
        record: Record,
    ) -> Result<Appended, AuditError> {
        self.submit(Entry::Authorize(Box::new((pending, record))))
            .await
    }

    /// Queues a record without waiting; if its batch fails it is kept and written with a
    /// later one. For device events and outcomes that must not be lost.
    pub fn append_later(&self, record: Record) {
        let _ = self.tx.send(Msg::Job {
            entry: Entry::Record(Box::new(record)),
            reply: Reply::None,
            persist: true,
        });
    }

    pub fn status(&self) -> AuditStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Alerts, as they are committed.
    pub fn subscribe_alerts(&self) -> broadcast::Receiver<Record> {
        self.alerts.subscribe()
    }

    /// Puts new anomaly rules in force from the next record on.
    pub fn replace_anomaly(&self, anomaly: Anomaly) {
        let _ = self.tx.send(Msg::Anomaly(Box::new(anomaly)));
    }

    /// Writes everything queued so far, then stops the writer. Blocks.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// The latest checkpoint, and when the one before it was made.
#[derive(Clone, Copy)]
struct Latest {
    seq: u64,
    prev_seq: u64,
    at_ms: i64,
    prev_at_ms: Option<i64>,
}

struct Writer {
    path: PathBuf,
    conn: Option<Connection>,
    reopen_after: Option<Instant>,
    head_seq: u64,
    head_hash: [u8; 32],
    latest: Option<Latest>,
    key: AuditKey,
    key_id: String,
    key_spki: Vec<u8>,
    algorithm: String,
    /// Records due before the next job's: alerts, and persistent records of failed batches.
    pending: Vec<Record>,
    anomaly: Anomaly,
    alerts: broadcast::Sender<Record>,
    status: Arc<Mutex<AuditStatus>>,
    /// Why the last batch failed; None when it was written.
    failure: Option<AuditError>,
    /// Only checking (`sealgated --check`): open() writes nothing.
    read_only: bool,
    /// Keeps the head's witness in the audit device; None where it keeps none.
    witness: Option<Witness>,
    /// Approvals' uses as the log holds them (see [`ledger::LoggedUses`]).
    logged_uses: ledger::LoggedUses,
}

/// How a failed statement leaves the store.
struct Failure {
    error: AuditError,
    /// The connection can no longer be trusted: re-open from disk before writing again.
    broken: bool,
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Failure {
        use rusqlite::ErrorCode as C;
        let code = e.sqlite_error_code();
        match code {
            Some(C::DiskFull) => Failure {
                error: AuditError::Full,
                broken: false,
            },
            Some(C::SystemIoFailure | C::ReadOnly | C::DatabaseCorrupt | C::NotADatabase)
            | Some(C::CannotOpen) => Failure {
                error: AuditError::Unavailable(e.to_string()),
                broken: true,
            },
            _ => Failure {
                error: AuditError::Unavailable(e.to_string()),
                broken: false,
            },
        }
    }
}

const INSERT: &str = "INSERT INTO audit (seq, at_ms, kind, seal, device, device_profile, \
    device_serial, caller, applicant, approvers, jti, doc_sha256, doc_type, currency, dept, \
    purpose, reason, detail, evidence, amount, ref_seq, prev_hash, hash) VALUES (?1, ?2, ?3, \
    ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)";

fn sign_checkpoint(
    key: &AuditKey,
    seq: u64,
    prev_seq: u64,
    head: &[u8; 32],
    at_ms: i64,
) -> Result<Vec<u8>, Failure> {
    let device = &key.device;
    let digest: [u8; 32] = {
        use sha2::Digest;
        sha2::Sha256::digest(Checkpoint::message(seq, prev_seq, head, at_ms)).into()
    };
    // A device call that panics fails this checkpoint, not the writer's thread.
    let signed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if device.health() != Health::Ready {
            device.recover();
        }
        device.sign(key.key, &digest)
    }));
    let failed = |what: String| Failure {
        error: AuditError::Device(what),
        broken: false,
    };
    match signed {
        Ok(r) => r.map_err(|e| failed(e.to_string())),
        Err(_) => Err(failed("the device call panicked".into())),
    }
}

/// Inserts a record whose seq and hashes are set.
pub(crate) fn insert_record(conn: &Connection, r: &Record) -> Result<(), rusqlite::Error> {
    let t = r.view().text;
    conn.prepare_cached(INSERT)?.execute(params![
        r.seq as i64,
        r.at_ms,
        t[0],
        t[1],
        t[2],
        t[3],
        t[4],
        t[5],
        t[6],
        t[7],
        t[8],
        t[9],
        t[10],
        t[11],
        t[12],
        t[13],
        t[14],
        t[15],
        t[16],
        r.amount,
        r.ref_seq.map(|s| s as i64),
        &r.prev_hash[..],
        &r.hash[..]
    ])?;
    Ok(())
}

impl Writer {
    fn new(
        path: PathBuf,
        key: AuditKey,
        anomaly: Anomaly,
        alerts: broadcast::Sender<Record>,
        status: Arc<Mutex<AuditStatus>>,
    ) -> Writer {
        let key_spki = key.device.key(key.key).spki_der.clone();
        let algorithm = key.device.key(key.key).algorithm.name().to_owned();
        Writer {
            path,
            conn: None,
            reopen_after: None,
            head_seq: 0,
            head_hash: [0; 32],
            latest: None,
            key,
            key_id: super::key_id(&key_spki),
            key_spki,
            algorithm,
            pending: Vec::new(),
            anomaly,
            alerts,
            status,
            failure: None,
            read_only: false,
            witness: None,
            logged_uses: ledger::LoggedUses::default(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut stopping = false;
        while !stopping {
            let first = if self.pending.is_empty() {
                crate::handoff::recv(&rx).ok()
            } else {
                // While failing, retry the records that must not be lost once a second.
                let wait = if self.failure.is_some() {
                    REOPEN_INTERVAL
                } else {
                    Duration::ZERO
                };
                match crate::handoff::recv_timeout(&rx, wait) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.flush_pending();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => None,
                }
            };
            let mut jobs = Vec::new();
            match first {
                None | Some(Msg::Shutdown) => stopping = true,
                Some(Msg::Anomaly(a)) => {
                    self.anomaly = *a;
                    continue;
                }
                Some(Msg::Job {
                    entry,
                    reply,
                    persist,
                }) => jobs.push((entry, reply, persist)),
            }
            while !stopping && jobs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Msg::Job {
                        entry,
                        reply,
                        persist,
                    }) => jobs.push((entry, reply, persist)),
                    Ok(Msg::Shutdown) => stopping = true,
                    Ok(Msg::Anomaly(a)) => {
                        // Records before it were sent first: write them under the old rules.
                        self.batch(std::mem::take(&mut jobs));
                        self.anomaly = *a;
                    }
                    Err(_) => break,
                }
            }
            self.batch(jobs);
        }
        // Alerts raised by the last batch.
        if !self.pending.is_empty() {
            self.flush_pending();
        }
        if let Some(w) = &mut self.witness {
            w.finish();
        }
        if !self.pending.is_empty() {
            tracing::error!(
                records = self.pending.len(),
                error = %self.failure_text(),
                "audit records could not be written before shutdown"
            );
        }
    }

    fn flush_pending(&mut self) {
        self.batch(Vec::new());
    }

    fn batch(&mut self, jobs: Vec<(Entry, Reply, bool)>) {
        let internal = std::mem::take(&mut self.pending);
        if internal.is_empty() && jobs.is_empty() {
            return;
        }
        let entries: Vec<&Entry> = jobs.iter().map(|j| &j.0).collect();
        match self.write(&internal, &entries) {
            Ok((results, committed)) => {
                self.failure = None;
                for ((_, reply, _), r) in jobs.into_iter().zip(results) {
                    reply.send(Ok(r));
                }
                self.after_commit(&committed);
            }
            Err(f) => {
                crate::metrics::get().audit_failure();
                if self.failure.is_none() {
                    tracing::error!(error = %f.error, "audit log write failed; refusing stamps until it recovers");
                }
                self.failure = Some(f.error.clone());
                // A connection that failed this way is closed and opened again from disk a
                // second later; failures while waiting for that (or from the re-opening,
                // which sets its own time) do not put it off, or steady traffic would.
                if f.broken && self.conn.take().is_some() {
                    self.reopen_after = Some(Instant::now() + REOPEN_INTERVAL);
                }
                self.pending = internal;
                for (entry, reply, persist) in jobs {
                    reply.send(Err(f.error.clone()));
                    if let (true, Entry::Record(r)) = (persist, entry) {
                        self.pending.push(*r);
                    }
                }
                if self.pending.len() > MAX_PENDING {
                    let drop = self.pending.len() - MAX_PENDING;
                    tracing::error!(
                        records = drop,
                        "audit records dropped: the log has been failing too long"
                    );
                    self.pending.drain(..drop);
                }
                self.publish_status();
            }
        }
    }

    /// One transaction: every record, the ledger for each authorisation, a signed checkpoint.
    /// The records and their hash chain are settled first (the ledger decides each
    /// authorisation's kind), the rows inserted, then the device signs the new head, and the
    /// transaction commits only with that signature in it.
    #[allow(clippy::type_complexity)]
    fn write(
        &mut self,
        internal: &[Record],
        entries: &[&Entry],
    ) -> Result<(Vec<Appended>, Vec<Record>), Failure> {
        self.ensure_open()?;
        let now = now_ms();
        let mut records: Vec<Record> = Vec::with_capacity(internal.len() + entries.len());
        let mut results = Vec::with_capacity(entries.len());
        let conn = self.conn.as_mut().expect("opened above");
        self.logged_uses.trim();
        let logged_uses = &mut self.logged_uses;
        // Uses consumed in this batch, counted into `logged_uses` once it has committed.
        let mut used: Vec<(String, u32)> = Vec::new();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The seq the next record of the batch gets.
        let next = |records: &Vec<Record>| self.head_seq + records.len() as u64 + 1;
        records.extend(internal.iter().cloned());
        for e in entries {
            match e {
                Entry::Record(r) => {
                    results.push(Appended::Record {
                        seq: next(&records),
                    });
                    records.push((**r).clone());
                }
                Entry::Authorize(a) => {
                    let (pending, record) = &**a;
                    let mut r = record.clone();
                    match ledger::consume(
                        &tx,
                        &pending.as_use(),
                        now / 1000,
                        pending.rate_limit,
                        logged_uses,
                    )? {
                        Ok(uses_left) => {
                            used.push((pending.jti.clone(), pending.count));
                            // `stamp.authorized`, or `terminal.granted` for a terminal.
                            results.push(Appended::Authorized {
                                seq: next(&records),
                                uses_left,
                            });
                        }
                        Err(denial) => {
                            r.kind = if r.kind == kind::TERMINAL_GRANTED {
                                kind::TERMINAL_DENIED
                            } else {
                                kind::STAMP_DENIED
                            }
                            .into();
                            r.reason = denial.reason.code().into();
                            r.detail = denial.detail.clone();
                            results.push(Appended::Refused {
                                seq: next(&records),
                                denial,
                            });
                        }
                    }
                    records.push(r);
                }
            }
        }
        let mut seq = self.head_seq;
        let mut head = self.head_hash;
        for r in &mut records {
            seq += 1;
            r.at_ms = now;
            // Details quote caller input (seal names, approver ids); keep them bounded.
            let max = if r.kind.starts_with("application.") {
                MAX_APPLICATION_DETAIL_BYTES
            } else {
                MAX_DETAIL_BYTES
            };
            clip(&mut r.detail, max);
            clip(&mut r.seal, MAX_NAME_BYTES);
            r.seal_after(seq, head);
            head = r.hash;
        }
        // The checkpoint is signed before the commit, so no committed record is ever without
        // a device signature over it.
        let mut latest = Latest {
            seq,
            prev_seq: 0,
            at_ms: now,
            prev_at_ms: None,
        };
        let mut replace = None;
        if let Some(l) = self.latest {
            match l.prev_at_ms {
                Some(prev_at) if now - prev_at < CHECKPOINT_SPACING_MS => {
                    latest.prev_seq = l.prev_seq;
                    latest.prev_at_ms = l.prev_at_ms;
                    replace = Some(l.seq);
                }
                _ => {
                    latest.prev_seq = l.seq;
                    latest.prev_at_ms = Some(l.at_ms);
                }
            }
        }
        crate::crash_point!("audit.before_checkpoint_signature");
        // The rows first: a disk that fails is reported as such, before the device is asked.
        // The signature is made on this thread: a checkpoint thread of its own, which signed
        // while the rows went in, made (a) of `sealctl bench` a sixth slower on two cores (it
        // waited to be scheduled longer than the rows took).
        records.iter().try_for_each(|r| insert_record(&tx, r))?;
        let signature = sign_checkpoint(&self.key, latest.seq, latest.prev_seq, &head, now)?;
        crate::crash_point!("audit.after_checkpoint_signature");
        if let Some(old) = replace {
            tx.prepare_cached("DELETE FROM checkpoints WHERE seq = ?1")?
                .execute(params![old as i64])?;
        }
        tx.prepare_cached(
            "INSERT INTO checkpoints (seq, prev_seq, head, at_ms, key_id, algorithm, signature) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            latest.seq as i64,
            latest.prev_seq as i64,
            &head[..],
            now,
            self.key_id,
            self.algorithm,
            signature
        ])?;
        tx.commit()?;
        crate::crash_point!("audit.after_commit");
        for (jti, n) in used {
            self.logged_uses.committed(&jti, n);
        }
        self.head_seq = seq;
        self.head_hash = head;
        self.latest = Some(latest);
        self.update_witness();
        Ok((results, records))
    }

    /// Tells the witness thread the new head. The witness may be behind the log (start-up
    /// accepts that), never ahead of it.
    fn update_witness(&self) {
        if let Some(w) = &self.witness {
            w.tell(self.head_seq, self.head_hash);
        }
    }

    /// At start-up: the head the audit device last took must be in this log, the same record.
    /// A log behind it, or with another record there, was rolled back, replaced or deleted.
    /// Where the device has no witness yet it is made now.
    fn check_witness(&mut self) -> Result<(), AuditError> {
        let label = witness_label(&self.path);
        let stored = match self.key.device.read_data(&label) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "the audit device keeps no witness of the log's head; a rolled-back state directory would not be noticed");
                return Ok(());
            }
        };
        let refuse = |m: String| {
            tracing::error!(alert = "audit_rollback", "{m}");
            Err(AuditError::RolledBack(m))
        };
        if !stored.is_empty() {
            // After an interrupted replacement the newest of two stands.
            let Some((seq, head)) = stored
                .iter()
                .map(|v| parse_witness(v))
                .collect::<Option<Vec<_>>>()
                .and_then(|w| w.into_iter().max_by_key(|(seq, _)| *seq))
            else {
                return refuse(format!(
                    "the audit device's witness {label:?} cannot be read"
                ));
            };
            if seq > self.head_seq {
                return refuse(format!(
                    "the audit device last took seq {seq}, but the log in {} ends at seq {}; restore the newest state directory or investigate",
                    self.path.display(),
                    self.head_seq
                ));
            }
            let conn = self.conn.as_ref().expect("opened");
            let hash: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT hash FROM audit WHERE seq = ?1",
                    params![seq as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| AuditError::Open(e.to_string()))?;
            if seq > 0 && hash.as_deref() != Some(&head[..]) {
                return refuse(format!(
                    "record {seq} of the log in {} is not the one the audit device took; the log was replaced",
                    self.path.display()
                ));
            }
        }
        if !self.read_only {
            let device = self.key.device.clone();
            if stored.is_empty() {
                device
                    .replace_data(&label, &witness_bytes(self.head_seq, &self.head_hash))
                    .map_err(|e| AuditError::Open(format!("cannot make the log's witness: {e}")))?;
            }
            let w = Witness::start(device, label)
                .map_err(|e| AuditError::Open(format!("cannot start the witness thread: {e}")))?;
            self.witness = Some(w);
        }
        Ok(())
    }

    fn after_commit(&mut self, committed: &[Record]) {
        let conn = self.conn.as_ref().expect("a batch just committed");
        for r in committed {
            if r.kind == kind::ALERT {
                tracing::warn!(
                    rule = %r.reason,
                    seq = r.seq,
                    seal = %r.seal,
                    applicant = %r.applicant,
                    caller = %r.caller,
                    detail = %r.detail,
                    "alert"
                );
                crate::metrics::get().alert(&r.reason);
                let _ = self.alerts.send(r.clone());
                continue;
            }
            match self.anomaly.observe(r, conn) {
                Ok(alerts) => self.pending.extend(alerts),
                Err(e) => tracing::error!(error = %e, "anomaly rules could not read the log"),
            }
        }
        crate::metrics::get().audit_batch(committed.len());
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            s.batches += 1;
            s.records += committed.len() as u64;
        }
        self.publish_status();
    }

    fn publish_status(&self) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.head_seq = self.head_seq;
        s.head_hash = self.head_hash;
        if let Some(l) = self.latest {
            s.checkpoint_seq = l.seq;
            s.checkpoint_at_ms = l.at_ms;
        }
        s.error = self.failure_text();
    }

    /// Why the last batch failed, or "" when it was written.
    fn failure_text(&self) -> String {
        self.failure
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    fn ensure_open(&mut self) -> Result<(), Failure> {
        if self.conn.is_some() {
            return Ok(());
        }
        if self.reopen_after.is_some_and(|t| Instant::now() < t) {
            return Err(Failure {
                // The failure that broke the connection, as it was.
                error: self
                    .failure
                    .clone()
                    .unwrap_or_else(|| AuditError::Unavailable("re-opening".into())),
                broken: true,
            });
        }
        self.reopen_after = Some(Instant::now() + REOPEN_INTERVAL);
        self.open().map_err(|e| Failure {
            error: AuditError::Unavailable(format!("re-opening the audit log: {e}")),
            broken: true,
        })?;
        tracing::info!(head = self.head_seq, "audit log re-opened from disk");
        Ok(())
    }

    /// Opens the connection and reads the head and the latest checkpoint from disk.
    fn open(&mut self) -> Result<(), rusqlite::Error> {
        let conn = crate::store::connect(&self.path)?;
        let head: Option<(i64, Vec<u8>)> = conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        (self.head_seq, self.head_hash) = match head {
            None => (0, [0; 32]),
            Some((seq, hash)) => (seq as u64, hash.try_into().unwrap_or([0; 32])),
        };
        let latest: Option<(i64, i64, i64)> = conn
            .query_row(
                "SELECT seq, prev_seq, at_ms FROM checkpoints ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        self.latest = match latest {
            None => None,
            Some((seq, prev_seq, at_ms)) => Some(Latest {
                seq: seq as u64,
                prev_seq: prev_seq as u64,
                at_ms,
                prev_at_ms: conn
                    .query_row(
                        "SELECT at_ms FROM checkpoints WHERE seq = ?1",
                        params![prev_seq],
                        |r| r.get(0),
                    )
                    .optional()?,
            }),
        };
        if !self.read_only {
            conn.execute(
                "INSERT OR IGNORE INTO audit_keys (key_id, algorithm, spki, first_used_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![self.key_id, self.algorithm, self.key_spki, now_ms()],
            )?;
        }
        self.conn = Some(conn);
        self.publish_status();
        Ok(())
    }

    /// At start-up: the newest record must be the one the latest checkpoint signed, with a
    /// hash that matches its contents. Anything else means the file was changed behind the
    /// daemon's back, and writing on would chain new records onto it.
    fn check_tail(&self) -> Result<(), AuditError> {
        let conn = self.conn.as_ref().expect("opened");
        let bad = |m: String| {
            AuditError::Open(format!(
                "the audit log fails its start-up check: {m}; run `sealctl audit verify` on {}",
                self.path.display()
            ))
        };
        let Some(latest) = self.latest else {
            return if self.head_seq == 0 {
                Ok(())
            } else {
                Err(bad("it has records but no checkpoint".into()))
            };
        };
        if latest.seq != self.head_seq {
            return Err(bad(format!(
                "the last record is seq {} but the last checkpoint covers seq {}",
                self.head_seq, latest.seq
            )));
        }
        let cp: (Vec<u8>, i64, String, String, Vec<u8>) = conn
            .query_row(
                "SELECT head, at_ms, key_id, algorithm, signature FROM checkpoints WHERE seq = ?1",
                params![latest.seq as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .map_err(|e| bad(e.to_string()))?;
        if cp.0 != self.head_hash {
            return Err(bad(format!(
                "record {} is not the one its checkpoint signed",
                latest.seq
            )));
        }
        let record = super::query::record_by_seq(conn, self.head_seq)
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad(format!("record {} cannot be read", self.head_seq)))?;
        if record.view().hash(&record.prev_hash) != record.hash {
            return Err(bad(format!(
                "record {} does not match its hash",
                self.head_seq
            )));
        }
        let spki: Vec<u8> = conn
            .query_row(
                "SELECT spki FROM audit_keys WHERE key_id = ?1",
                params![cp.2],
                |r| r.get(0),
            )
            .map_err(|_| bad(format!("checkpoint key {} is not recorded", cp.2)))?;
        let algorithm = crate::device::Algorithm::parse(&cp.3).map_err(bad)?;
        let message = Checkpoint::message(latest.seq, latest.prev_seq, &self.head_hash, cp.1);
        crate::device::keys::verify_device_signature(algorithm, &spki, &message, &cp.4)
            .map_err(|e| bad(format!("checkpoint {}: {e}", latest.seq)))?;
        Ok(())
    }

    /// An outcome record for every authorisation that has none (the daemon stopped between
    /// consuming a use and recording what the device did).
    fn dangling(&self) -> Result<Vec<Record>, AuditError> {
        let conn = self.conn.as_ref().expect("opened");
        let sql = format!(
            "SELECT {} FROM audit a WHERE a.kind = 'stamp.authorized' \
             AND NOT EXISTS (SELECT 1 FROM audit b WHERE b.ref_seq = a.seq) ORDER BY a.seq",
            super::query::record_columns()
        );
        let read = || -> Result<Vec<Record>, rusqlite::Error> {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map([], |row| {
                let auth = super::query::record_from_row(row)?;
                Ok(Record {
                    kind: kind::STAMP_OUTCOME_UNKNOWN.into(),
                    ref_seq: Some(auth.seq),
                    reason: String::new(),
                    detail: "the daemon stopped before the device's answer was recorded; \
                             the use stays consumed"
                        .into(),
                    ..auth
                })
            })?;
            rows.collect()
        };
        let found = read().map_err(|e| AuditError::Open(e.to_string()))?;
        if !found.is_empty() {
            tracing::warn!(
                count = found.len(),
                "authorisations without an outcome found; recording stamp.outcome_unknown"
            );
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::{clip, sign_checkpoint, AuditError, AuditKey, WitnessSlot};
    use crate::device::TestDevice;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A device whose first `panics` signatures panic (a bug in a device library).
    fn flaky(panics: usize) -> AuditKey {
        let left = AtomicUsize::new(panics);
        AuditKey {
            device: Arc::new(TestDevice::new("flaky", move |digest| {
                if left.load(Ordering::SeqCst) > 0 {
                    left.fetch_sub(1, Ordering::SeqCst);
                    panic!("a device library bug");
                }
                digest.to_vec()
            })),
            key: 0,
        }
    }

    fn panicked(r: Result<Vec<u8>, super::Failure>) -> bool {
        matches!(r, Err(f) if matches!(&f.error, AuditError::Device(m) if m.contains("panicked")))
    }

    #[test]
    fn a_device_call_that_panics_fails_one_checkpoint_and_the_next_is_signed() {
        // The writer's thread signs: a panic inside the device call is an error of this
        // checkpoint, and the thread goes on.
        let key = flaky(1);
        assert!(panicked(sign_checkpoint(&key, 1, 0, &[7; 32], 0)));
        assert!(sign_checkpoint(&key, 1, 0, &[7; 32], 0).is_ok());
    }

    #[test]
    fn the_witness_takes_the_newest_head_after_the_spacing_and_the_last_on_close() {
        let slot = Arc::new(WitnessSlot::default());
        let tell = |slot: &WitnessSlot, seq: u64| slot.put(seq, [seq as u8; 32]);
        // Idle: a head wakes it.
        let waiter = {
            let slot = slot.clone();
            std::thread::spawn(move || slot.next(None))
        };
        while !slot.lock().idle {
            std::thread::yield_now();
        }
        tell(&slot, 1);
        assert_eq!(waiter.join().unwrap().map(|v| v.0), Some(1));
        // Within the spacing: heads replace each other; the newest is taken when it is due.
        let started = Instant::now();
        let due = started + Duration::from_millis(50);
        tell(&slot, 2);
        tell(&slot, 3);
        assert_eq!(slot.next(Some(due)).map(|v| v.0), Some(3));
        assert!(started.elapsed() >= Duration::from_millis(50));
        // Closing cuts the spacing short and hands over what is left, then nothing.
        tell(&slot, 4);
        slot.close();
        let far = Instant::now() + Duration::from_secs(60);
        assert_eq!(slot.next(Some(far)).map(|v| v.0), Some(4));
        assert_eq!(slot.next(None), None);
    }

    #[test]
    fn clip_cuts_long_text_at_a_character_boundary() {
        let mut s = "印章".repeat(10); // 3 bytes a character
        clip(&mut s, 7);
        assert_eq!(s, "印章…");
        let mut short = "ok".to_string();
        clip(&mut short, 7);
        assert_eq!(short, "ok");
    }
}
