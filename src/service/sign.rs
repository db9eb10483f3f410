//! Step 4 of a stamp: the device signs. Each device has a queue and as many signing threads as
//! it has sessions; the audit writer puts an authorised stamp in the queue, a thread signs it
//! and hands it to step 5 on the same thread.
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
}

impl Signer {
    /// Starts the device's signing threads.
    pub fn start(device: Arc<dyn SealDevice>) -> std::io::Result<Signer> {
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

    /// Queues an authorised stamp. Does not block (the audit writer calls it).
    pub fn submit(&self, job: Job) {
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
}
