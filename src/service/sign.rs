//! Step 4 of a stamp: the device signs. Each device has a queue and as many signing threads as
//! it has sessions; the audit writer puts an authorised stamp in the queue, a thread signs it
//! and hands it to step 5 on the same thread. A stamp alone on the device that holds the audit
//! key is signed by the writer's thread instead (see [`Signer::submit`]).
//!
//! Owns: the device's queue and its bound (requests waiting beyond it are refused as busy
//! before any use is spent), the counts `sealctl status` shows, reconnecting a device before
//! signing, and turning a device call that panics into an error. Never: runs on the async
//! executor.

use super::job::Job;
use super::outcome;
use super::ServiceError;
use crate::container::ToSign;
use crate::device::{Health, SealDevice};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Requests waiting for a device, per unit of the device's parallelism.
const QUEUE_PER_SESSION: usize = 64;

/// One device's queue and signing threads.
pub(super) struct Signer {
    device_id: String,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Requests admitted and not yet finished; bounded.
    queue: Arc<Semaphore>,
    signing: Arc<AtomicUsize>,
    parallel: usize,
    /// Set when the audit key lives on this device: the writer already waits on it for every
    /// checkpoint, so it may sign a stamp itself (see [`Signer::submit`]).
    device: Option<Arc<dyn SealDevice>>,
}

impl Signer {
    /// Starts the device's signing threads.
    pub fn start(device: Arc<dyn SealDevice>, holds_audit_key: bool) -> std::io::Result<Signer> {
        let parallel = device.parallelism().max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let signing = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(parallel);
        for i in 0..parallel {
            let (rx, device, signing) = (rx.clone(), device.clone(), signing.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sign-{}-{i}", device.id()))
                    .spawn(move || work(&rx, device.as_ref(), &signing))?,
            );
        }
        Ok(Signer {
            device_id: device.id().to_owned(),
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            queue: Arc::new(Semaphore::new(parallel * QUEUE_PER_SESSION)),
            signing,
            parallel,
            device: holds_audit_key.then_some(device),
        })
    }

    /// A place in the queue, or `Busy` when it is full.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        self.queue.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Busy(format!(
                "device {:?} has too many requests waiting",
                self.device_id
            ))
        })
    }

    /// Queues an authorised stamp (the audit writer calls it, on its thread). When the stamp
    /// is the only one the device has and the device holds the audit key, the writer signs it
    /// itself: a signing thread asleep by then takes 20-40 µs to wake, and another hand-off
    /// back to the writer follows. The writer waits on this device for every checkpoint
    /// anyway, so this adds no new way for a device to hold the log up; with any other stamp
    /// in flight the stamp goes to the queue, so a busy writer never signs.
    pub fn submit(&self, job: Job) {
        if let Some(device) = &self.device {
            if self.queued() == 1 && self.signing() == 0 {
                return sign(job, device.as_ref(), &self.signing);
            }
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let refused = match tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        outcome::signed(refused, Err(ServiceError::ShuttingDown));
    }

    /// Requests admitted and not finished (waiting, signing, or recording their outcome).
    pub fn queued(&self) -> usize {
        self.limit() - self.queue.available_permits()
    }

    /// Signatures the device is making now.
    pub fn signing(&self) -> usize {
        self.signing.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.parallel * QUEUE_PER_SESSION
    }

    /// Stops the threads once the queue is empty (call after every stamp has its outcome), so
    /// that the device can close. Blocks.
    pub fn stop(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One signing thread: takes the next stamp, signs, and records the outcome.
fn work(rx: &Mutex<mpsc::Receiver<Job>>, device: &dyn SealDevice, signing: &AtomicUsize) {
    loop {
        let next = crate::handoff::recv(&rx.lock().unwrap_or_else(|p| p.into_inner()));
        let Ok(job) = next else { return };
        sign(job, device, signing);
    }
}

/// Signs one stamp and hands it to step 5.
fn sign(job: Job, device: &dyn SealDevice, signing: &AtomicUsize) {
    signing.fetch_add(1, Ordering::Relaxed);
    let what = match &job.cms {
        None => ToSign::Digest(job.digest),
        Some(c) => c.plan.to_sign.clone(),
    };
    let key = job.key;
    let signed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if device.health() != Health::Ready {
            device.recover();
        }
        match what {
            ToSign::Digest(d) => device.sign(key, &d),
            ToSign::Message(m) => device.sign_message(key, &m),
        }
    }));
    signing.fetch_sub(1, Ordering::Relaxed);
    crate::crash_point!("stamp.after_device");
    let result = match signed {
        Ok(r) => r.map_err(ServiceError::from),
        Err(_) => Err(ServiceError::Internal("the device call panicked".into())),
    };
    outcome::signed(job, result);
}

#[cfg(test)]
mod tests {
    use super::{Job, Signer};
    use crate::audit::anomaly::Anomaly;
    use crate::audit::log::{AuditKey, AuditLog};
    use crate::audit::{kind, Record};
    use crate::device::TestDevice;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// A device that notes the name of the thread each signature is made on.
    fn noting() -> (Arc<TestDevice>, Arc<Mutex<Vec<String>>>) {
        let threads = Arc::new(Mutex::new(Vec::new()));
        let noted = threads.clone();
        let device = TestDevice::new("noting", move |digest| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            noted.lock().unwrap().push(name);
            digest.to_vec()
        });
        (Arc::new(device), threads)
    }

    /// Hands one stamp to `signer` as the audit writer does, waits for its outcome, and
    /// returns the thread the device signed it on.
    fn stamp(
        signer: &Signer,
        (device, threads): &(Arc<TestDevice>, Arc<Mutex<Vec<String>>>),
        audit: &AuditLog,
    ) -> String {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let mut record = Record::new(kind::STAMP_AUTHORIZED);
        record.seal = "contract".into();
        let job = Job {
            started: Instant::now(),
            span: tracing::Span::none(),
            audit: audit.clone(),
            device: device.clone(),
            key: 0,
            digest: [7; 32],
            cms: None,
            tsa: None,
            record,
            auth_seq: 1,
            uses_left: 0,
            caller: "tester".into(),
            answer,
            _queued: signer.admit().unwrap(),
            _tracked: tokio_util::task::TaskTracker::new().token(),
        };
        let before = threads.lock().unwrap().len();
        signer.submit(job);
        let stamped = answered.blocking_recv().unwrap().unwrap();
        assert_eq!(stamped.signature, vec![7; 32]);
        // The stamp's signature, then the checkpoint of its outcome's commit (on the writer).
        let threads = threads.lock().unwrap();
        assert!(threads.len() >= before + 2, "{threads:?}");
        threads[before].clone()
    }

    #[test]
    fn the_writer_signs_a_lone_stamp_on_the_audit_keys_device_and_the_queue_takes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("state")).unwrap();
        let noted = noting();
        let device = noted.0.clone();
        let key = AuditKey {
            device: device.clone(),
            key: 0,
        };
        let audit =
            AuditLog::open(store.path().to_owned(), key, Anomaly::none(), "{}".into()).unwrap();
        let here = std::thread::current().name().unwrap_or("").to_owned();

        // The only stamp on the device that holds the audit key: signed where it was handed
        // over (on the writer's thread, in the daemon).
        let shared = Signer::start(device.clone(), true).unwrap();
        assert_eq!(stamp(&shared, &noted, &audit), here);
        // Another stamp waiting for the device: the queue's thread signs.
        let other = shared.admit().unwrap();
        assert_eq!(stamp(&shared, &noted, &audit), "sign-noting-0");
        drop(other);
        assert_eq!(stamp(&shared, &noted, &audit), here);
        shared.stop();

        // A device without the audit key is never signed on by the writer.
        let apart = Signer::start(device.clone(), false).unwrap();
        assert_eq!(stamp(&apart, &noted, &audit), "sign-noting-0");
        apart.stop();
        audit.shutdown();
    }
}
