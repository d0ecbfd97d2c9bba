//! Dynamic batching: requests queue (bounded); a batch runs when it holds `max_batch_size` items or the
//! oldest request has waited `max_queue_delay`. Expired and abandoned requests are dropped before
//! compute. The model runs on its own thread, never on the async runtime. Each request keeps the model
//! it arrived under, so a hot swap lets in-flight requests finish on the old model.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::Status;

use super::prometheus::Metrics;
use super::ServingModel;
use crate::deploy::engine::exported::Scores;
use crate::deploy::engine::ort::Feed;

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most items per executed batch.
    pub max_batch_size: usize,
    /// Longest time the oldest request waits for company.
    pub max_queue_delay: Duration,
    /// Most requests waiting.
    pub max_queue_size: usize,
}

impl Default for BatchConfig {
    /// `automm serve`'s defaults: 32 items, 2 ms, 1024 requests.
    fn default() -> Self {
        BatchConfig { max_batch_size: 32, max_queue_delay: Duration::from_micros(2000), max_queue_size: 1024 }
    }
}

/// One request's items, preprocessed.
pub struct Job {
    /// The model it arrived under.
    pub model: Arc<ServingModel>,
    /// `[n, 3, S, S]` floats.
    pub data: Vec<f32>,
    /// Item count.
    pub n: usize,
    /// When it was queued.
    pub enqueued: Instant,
    /// The client's deadline.
    pub deadline: Option<Instant>,
    /// Where its logits and probabilities (`[n, C]` each) go.
    pub reply: oneshot::Sender<Result<Scores, Status>>,
}

/// The queue's sending side plus the worker thread.
pub struct Batcher {
    tx: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    max_queue_size: usize,
}

impl Batcher {
    /// Starts the worker thread.
    pub fn start(cfg: BatchConfig, metrics: Arc<Metrics>) -> Batcher {
        let (tx, rx) = sync_channel::<Job>(cfg.max_queue_size.max(1));
        let m = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("automm-batcher".into())
            .spawn(move || worker(rx, cfg, m))
            .expect("spawning the batcher thread");
        Batcher { tx: Some(tx), worker: Some(worker), metrics, max_queue_size: cfg.max_queue_size }
    }

    /// Queues a job; a full queue is RESOURCE_EXHAUSTED at once.
    pub fn submit(&self, job: Job) -> Result<(), Status> {
        let tx = self.tx.as_ref().ok_or_else(|| Status::unavailable("the server is shutting down"))?;
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Relaxed);
                Err(match e {
                    TrySendError::Full(_) => Status::resource_exhausted(format!(
                        "the request queue is full ({} requests waiting); retry later",
                        self.max_queue_size
                    )),
                    TrySendError::Disconnected(_) => Status::unavailable("the batcher has stopped"),
                })
            }
        }
    }

    /// Stops accepting, lets the worker drain the queue, and waits for it.
    pub fn shutdown(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn worker(rx: Receiver<Job>, cfg: BatchConfig, metrics: Arc<Metrics>) {
    let mut carry: Option<Job> = None;
    loop {
        let first = match carry.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return, // closed and drained
            },
        };
        let close_at = first.enqueued + cfg.max_queue_delay;
        let mut n = first.n;
        let mut batch = vec![first];
        // Requests already waiting join at once (they waited while the last batch ran); then wait for more
        // until the oldest request's delay is up.
        while n < cfg.max_batch_size {
            let next = match rx.try_recv() {
                Ok(j) => Ok(j),
                Err(_) => {
                    let now = Instant::now();
                    if now >= close_at {
                        break;
                    }
                    rx.recv_timeout(close_at - now)
                }
            };
            match next {
                Ok(j) => {
                    if n + j.n > cfg.max_batch_size {
                        carry = Some(j);
                        break;
                    }
                    n += j.n;
                    batch.push(j);
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.queue_depth.fetch_sub(batch.len() as i64, Relaxed);
        run_batch(batch, &metrics);
    }
}

fn run_batch(batch: Vec<Job>, metrics: &Metrics) {
    let now = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    for job in batch {
        metrics.record_queued(now.duration_since(job.enqueued));
        if job.reply.is_closed() {
            continue; // the client went away
        }
        if job.deadline.is_some_and(|d| d <= now) {
            let _ = job.reply.send(Err(Status::deadline_exceeded("the deadline passed while the request was queued")));
            continue;
        }
        live.push(job);
    }
    // Requests under different model versions (around a hot swap) run separately.
    while !live.is_empty() {
        let model = live[0].model.clone();
        let (group, rest): (Vec<Job>, Vec<Job>) = live.into_iter().partition(|j| Arc::ptr_eq(&j.model, &model));
        live = rest;
        let n: usize = group.iter().map(|j| j.n).sum();
        let s = model.input_size;
        let mut data = Vec::with_capacity(n * 3 * s * s);
        for j in &group {
            data.extend_from_slice(&j.data);
        }
        let t0 = Instant::now();
        // A panic inside an engine must not take the server down: it becomes INTERNAL for this batch.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.model.run_scores(Feed::F32(vec![n, 3, s, s], data))
        }));
        metrics.record_batch(n, t0.elapsed());
        let k = model.classes.len();
        match result {
            Ok(Ok(sc)) if sc.probabilities.len() == n * k && sc.logits.len() == n * k => {
                metrics.inference_count.fetch_add(n as u64, Relaxed);
                let mut off = 0;
                for j in group {
                    let rows = off * k..(off + j.n) * k;
                    off += j.n;
                    let part = Scores {
                        logits: sc.logits[rows.clone()].to_vec(),
                        probabilities: sc.probabilities[rows].to_vec(),
                    };
                    let _ = j.reply.send(Ok(part));
                }
            }
            Ok(Ok(sc)) => {
                let msg = format!("the model returned {} values for {n} items x {k} classes", sc.probabilities.len());
                for j in group {
                    let _ = j.reply.send(Err(Status::internal(msg.clone())));
                }
            }
            Ok(Err(e)) => {
                for j in group {
                    let _ = j.reply.send(Err(Status::internal(format!("inference failed: {e}"))));
                }
            }
            Err(_) => {
                for j in group {
                    let _ = j.reply.send(Err(Status::internal("inference panicked")));
                }
            }
        }
    }
}
