//! Dynamic batching, as Triton's dynamic batcher does it: requests wait in a bounded queue with one FIFO
//! per priority level (level 1 is served first); a batch runs at once when it reaches `max_batch_size`
//! or one of the `preferred_batch_sizes`, else when its oldest request has waited `max_queue_delay`.
//! Expired and abandoned requests are dropped before compute. The model runs on its own thread, never
//! on the async runtime. Each request keeps the model it arrived under, so a hot swap lets in-flight
//! requests finish on the old model.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tonic::Status;

use super::prometheus::Metrics;
use super::ServingModel;
use crate::deploy::engine::exported::Scores;
use crate::deploy::engine::ort::Feed;

/// Batching limits and queue policy.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most items per executed batch.
    pub max_batch_size: usize,
    /// Longest time the oldest request waits for company.
    pub max_queue_delay: Duration,
    /// Most requests waiting (all priority levels together).
    pub max_queue_size: usize,
    /// Batch sizes run as soon as the queue can form one (the largest that fits), without waiting out
    /// `max_queue_delay` (Triton's `preferred_batch_size`). Empty: only `max_batch_size` runs at once.
    pub preferred_batch_sizes: Vec<usize>,
    /// Priority levels (Triton's `priority_levels`): 1 is served first, this many is served last. At
    /// least 1.
    pub priority_levels: u32,
    /// The level of a request that names none, or one outside `1..=priority_levels` (as Triton does).
    pub default_priority_level: u32,
}

impl Default for BatchConfig {
    /// `automm serve`'s defaults: 32 items, 2 ms, 1024 requests, no preferred sizes, two priority levels
    /// with requests at the lower one unless they ask for 1.
    fn default() -> Self {
        BatchConfig {
            max_batch_size: 32,
            max_queue_delay: Duration::from_micros(2000),
            max_queue_size: 1024,
            preferred_batch_sizes: Vec::new(),
            priority_levels: 2,
            default_priority_level: 2,
        }
    }
}

impl BatchConfig {
    /// Checks the limits against each other; the error names the `automm serve` flag at fault.
    pub fn check(&self) -> crate::error::Result<()> {
        let bad = |flag: &str, msg: String| Err(crate::error::Error::Server(format!("--{flag}: {msg}")));
        if self.max_batch_size == 0 {
            return bad("max-batch-size", "expected at least 1".into());
        }
        if self.max_queue_size == 0 {
            return bad("max-queue-size", "expected at least 1".into());
        }
        if let Some(p) = self.preferred_batch_sizes.iter().find(|&&p| p == 0 || p > self.max_batch_size) {
            return bad(
                "preferred-batch-size",
                format!("{p} is outside 1..={} (--max-batch-size)", self.max_batch_size),
            );
        }
        if self.priority_levels == 0 {
            return bad("priority-levels", "expected at least 1".into());
        }
        if !(1..=self.priority_levels).contains(&self.default_priority_level) {
            return bad(
                "default-priority-level",
                format!("{} is outside 1..={}", self.default_priority_level, self.priority_levels),
            );
        }
        Ok(())
    }

    /// The level a request asking for `priority` runs at (0 or out of range: the default).
    pub fn level(&self, priority: Option<u64>) -> u32 {
        match priority {
            Some(p) if p >= 1 && p <= self.priority_levels as u64 => p as u32,
            _ => self.default_priority_level,
        }
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
    /// Priority level, 1 first (see [`BatchConfig::level`]).
    pub level: u32,
    /// When it was queued.
    pub enqueued: Instant,
    /// The client's deadline.
    pub deadline: Option<Instant>,
    /// Where its logits and probabilities (`[n, C]` each) go.
    pub reply: oneshot::Sender<Result<Scores, Status>>,
}

/// What the queue holds: one FIFO per priority level.
struct Queue<J> {
    levels: Vec<VecDeque<J>>,
    len: usize,
    closed: bool,
}

/// What the batcher needs of a queued item (a trait so the planning is testable without a model).
trait Queued {
    fn items(&self) -> usize;
    fn enqueued(&self) -> Instant;
}

impl Queued for Job {
    fn items(&self) -> usize {
        self.n
    }
    fn enqueued(&self) -> Instant {
        self.enqueued
    }
}

/// The worker's next move.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Run the first this many requests (in priority order).
    Run(usize),
    /// Nothing is due before this instant (or an arrival).
    WaitUntil(Instant),
}

/// Decides what to run: the requests that fit in `max_batch_size`, taken level by level in FIFO order;
/// run now if they fill it (or the next one does not fit), else the longest prefix of preferred size,
/// else all of them once the oldest has waited `max_queue_delay` (or the queue is closing).
fn plan<J: Queued>(q: &Queue<J>, cfg: &BatchConfig, now: Instant) -> Plan {
    let (mut n, mut k, mut preferred, mut oldest, mut full) = (0usize, 0usize, 0usize, None::<Instant>, false);
    for j in q.levels.iter().flatten() {
        if n + j.items() > cfg.max_batch_size {
            full = true;
            break;
        }
        n += j.items();
        k += 1;
        oldest = Some(oldest.map_or(j.enqueued(), |o: Instant| o.min(j.enqueued())));
        if cfg.preferred_batch_sizes.contains(&n) {
            preferred = k;
        }
    }
    let close_at = oldest.map_or(now, |o| o + cfg.max_queue_delay);
    if full || n == cfg.max_batch_size || q.closed || now >= close_at {
        Plan::Run(k.max(usize::from(q.len > 0)))
    } else if preferred > 0 {
        Plan::Run(preferred)
    } else {
        Plan::WaitUntil(close_at)
    }
}

impl<J> Queue<J> {
    /// Removes the first `k` requests in priority order.
    fn take(&mut self, k: usize) -> Vec<J> {
        let mut out = Vec::with_capacity(k);
        for level in &mut self.levels {
            while out.len() < k {
                match level.pop_front() {
                    Some(j) => out.push(j),
                    None => break,
                }
            }
        }
        self.len -= out.len();
        out
    }
}

struct Shared {
    queue: Mutex<Queue<Job>>,
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue<Job>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The queue plus the worker thread.
pub struct Batcher {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    metrics: Arc<Metrics>,
    cfg: BatchConfig,
}

impl Batcher {
    /// Starts the worker thread.
    pub fn start(cfg: BatchConfig, metrics: Arc<Metrics>) -> Batcher {
        let levels = (0..cfg.priority_levels.max(1)).map(|_| VecDeque::new()).collect();
        let shared =
            Arc::new(Shared { queue: Mutex::new(Queue { levels, len: 0, closed: false }), arrived: Condvar::new() });
        let (s, m, c) = (shared.clone(), metrics.clone(), cfg.clone());
        let worker = std::thread::Builder::new()
            .name("automm-batcher".into())
            .spawn(move || worker(&s, &c, &m))
            .expect("spawning the batcher thread");
        Batcher { shared, worker: Some(worker), metrics, cfg }
    }

    /// Queues a job at its level; a full queue is RESOURCE_EXHAUSTED at once.
    pub fn submit(&self, job: Job) -> Result<(), Status> {
        let mut q = self.shared.lock();
        if q.closed {
            return Err(Status::unavailable("the server is shutting down"));
        }
        if q.len >= self.cfg.max_queue_size {
            return Err(Status::resource_exhausted(format!(
                "the request queue is full ({} requests waiting); retry later",
                self.cfg.max_queue_size
            )));
        }
        let i = (job.level.max(1) as usize - 1).min(q.levels.len() - 1);
        q.levels[i].push_back(job);
        q.len += 1;
        self.metrics.queue_depth.fetch_add(1, Relaxed);
        drop(q);
        self.shared.arrived.notify_one();
        Ok(())
    }

    /// Stops accepting, lets the worker drain the queue, and waits for it.
    pub fn shutdown(&mut self) {
        self.shared.lock().closed = true;
        self.shared.arrived.notify_all();
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

fn worker(shared: &Shared, cfg: &BatchConfig, metrics: &Metrics) {
    let mut q = shared.lock();
    loop {
        while q.len == 0 {
            if q.closed {
                return; // closed and drained
            }
            q = shared.arrived.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        let now = Instant::now();
        match plan(&q, cfg, now) {
            Plan::Run(k) => {
                let batch = q.take(k);
                drop(q);
                metrics.queue_depth.fetch_sub(batch.len() as i64, Relaxed);
                run_batch(batch, metrics);
                q = shared.lock();
            }
            Plan::WaitUntil(t) => {
                q = shared
                    .arrived
                    .wait_timeout(q, t.saturating_duration_since(now))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(usize, Instant, &'static str);

    impl Queued for Fake {
        fn items(&self) -> usize {
            self.0
        }
        fn enqueued(&self) -> Instant {
            self.1
        }
    }

    fn queue(levels: usize, jobs: Vec<(u32, Fake)>) -> Queue<Fake> {
        let mut q = Queue { levels: (0..levels).map(|_| VecDeque::new()).collect(), len: 0, closed: false };
        for (level, j) in jobs {
            q.levels[level as usize - 1].push_back(j);
            q.len += 1;
        }
        q
    }

    fn cfg(max: usize, preferred: &[usize]) -> BatchConfig {
        BatchConfig {
            max_batch_size: max,
            max_queue_delay: Duration::from_millis(10),
            preferred_batch_sizes: preferred.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn higher_priority_runs_first_and_fifo_within_a_level() {
        let t = Instant::now();
        let mut q = queue(2, vec![(2, Fake(1, t, "low-a")), (1, Fake(1, t, "high-a")), (2, Fake(1, t, "low-b"))]);
        q.levels[0].push_back(Fake(1, t, "high-b"));
        q.len += 1;
        // A batch of 3 takes both level-1 requests, then the oldest level-2 one.
        let c = cfg(3, &[]);
        assert_eq!(plan(&q, &c, t), Plan::Run(3), "three fill the batch");
        let names: Vec<&str> = q.take(3).iter().map(|j| j.2).collect();
        assert_eq!(names, ["high-a", "high-b", "low-a"]);
        assert_eq!((q.len, q.levels[1].front().map(|j| j.2)), (1, Some("low-b")));
    }

    #[test]
    fn a_batch_waits_for_company_until_the_oldest_request_is_due() {
        let t = Instant::now();
        let q = queue(2, vec![(2, Fake(2, t, "a")), (2, Fake(1, t + Duration::from_millis(4), "b"))]);
        let c = cfg(8, &[]);
        assert_eq!(plan(&q, &c, t + Duration::from_millis(5)), Plan::WaitUntil(t + Duration::from_millis(10)));
        assert_eq!(plan(&q, &c, t + Duration::from_millis(10)), Plan::Run(2));
        // Closing: what is queued runs at once.
        let mut q = q;
        q.closed = true;
        assert_eq!(plan(&q, &c, t), Plan::Run(2));
    }

    #[test]
    fn preferred_sizes_run_at_once_and_the_largest_wins() {
        let t = Instant::now();
        let jobs = (0..5).map(|_| (2, Fake(1, t, "x"))).collect();
        let q = queue(2, jobs);
        // 5 queued: the largest preferred size that the queue can form (4) runs now, 1 stays.
        assert_eq!(plan(&q, &cfg(8, &[2, 4]), t), Plan::Run(4));
        // No preferred size reachable (items of 3 and 3 against 4): wait.
        let q = queue(2, vec![(2, Fake(3, t, "a")), (2, Fake(3, t, "b"))]);
        assert_eq!(plan(&q, &cfg(8, &[4]), t), Plan::WaitUntil(t + Duration::from_millis(10)));
    }

    #[test]
    fn a_request_that_does_not_fit_closes_the_batch() {
        let t = Instant::now();
        let q = queue(2, vec![(2, Fake(5, t, "a")), (2, Fake(4, t, "b"))]);
        assert_eq!(plan(&q, &cfg(8, &[]), t), Plan::Run(1));
        // Exactly full runs at once too.
        let q = queue(2, vec![(2, Fake(5, t, "a")), (2, Fake(3, t, "b"))]);
        assert_eq!(plan(&q, &cfg(8, &[]), t), Plan::Run(2));
    }

    #[test]
    fn levels_and_limits_are_checked_as_triton_reads_them() {
        let c = BatchConfig { priority_levels: 3, default_priority_level: 2, ..Default::default() };
        assert_eq!(
            [c.level(Some(1)), c.level(Some(3)), c.level(Some(0)), c.level(Some(9)), c.level(None)],
            [1, 3, 2, 2, 2]
        );
        assert!(c.check().is_ok());
        let e = BatchConfig { preferred_batch_sizes: vec![64], ..Default::default() }.check().unwrap_err().to_string();
        assert!(e.contains("--preferred-batch-size") && e.contains("64"), "{e}");
        let e = BatchConfig { default_priority_level: 3, ..Default::default() }.check().unwrap_err().to_string();
        assert!(e.contains("--default-priority-level"), "{e}");
    }
}
