//! Triton-like serving metrics, kept in atomics and rendered as Prometheus text: request success and
//! failure counts, inference count (items) and execution count (batches run, so the average batch size is
//! their ratio), cumulative queue and compute time, and the current queue depth.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Counters shared by the service and the batcher.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Predict calls answered OK.
    pub request_success: AtomicU64,
    /// Predict calls answered with an error status.
    pub request_failure: AtomicU64,
    /// Items (images) inferred.
    pub inference_count: AtomicU64,
    /// Batches executed.
    pub execution_count: AtomicU64,
    /// Sum of time requests waited in the queue, microseconds.
    pub queue_duration_us: AtomicU64,
    /// Sum of model execution time, microseconds.
    pub compute_duration_us: AtomicU64,
    /// Requests waiting now.
    pub queue_depth: AtomicI64,
    /// Fit calls that finished OK.
    pub fit_success: AtomicU64,
    /// Fit calls that failed.
    pub fit_failure: AtomicU64,
    /// Sum of the durations of inference requests answered OK / with an error, nanoseconds.
    pub success_ns: AtomicU64,
    /// See [`Metrics::success_ns`].
    pub failure_ns: AtomicU64,
    /// Requests decoded, and the time their decoding took (nanoseconds): the "compute input" step.
    pub decode_count: AtomicU64,
    /// See [`Metrics::decode_count`].
    pub decode_ns: AtomicU64,
    /// Requests that reached the model after queueing (the count behind `queue_duration_us`).
    pub queue_count: AtomicU64,
    /// Milliseconds since the Unix epoch of the last executed batch (0: none yet).
    pub last_inference_ms: AtomicU64,
    /// Executed batches by size: how many, and their summed model time in nanoseconds.
    pub batches: std::sync::Mutex<std::collections::BTreeMap<usize, (u64, u64)>>,
}

impl Metrics {
    /// Records one executed batch of `n` items that took `took` in the model.
    pub fn record_batch(&self, n: usize, took: std::time::Duration) {
        if let Ok(mut b) = self.batches.lock() {
            let e = b.entry(n).or_insert((0, 0));
            e.0 += 1;
            e.1 += took.as_nanos() as u64;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_inference_ms.store(now.as_millis() as u64, Relaxed);
    }

    /// Records one answered inference request (either protocol) and how long it took.
    pub fn record_request(&self, ok: bool, took: std::time::Duration) {
        let (count, ns) =
            if ok { (&self.request_success, &self.success_ns) } else { (&self.request_failure, &self.failure_ns) };
        count.fetch_add(1, Relaxed);
        ns.fetch_add(took.as_nanos() as u64, Relaxed);
    }
}

impl Metrics {
    /// Prometheus text exposition (version 0.0.4).
    pub fn render(&self, model_version: &str) -> String {
        let l = format!("{{model_version=\"{}\"}}", model_version.replace('"', ""));
        let mut out = String::new();
        let mut line = |name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{l} {v}\n"));
        };
        line(
            "automm_request_success_total",
            "counter",
            "Predict requests answered OK.",
            self.request_success.load(Relaxed).to_string(),
        );
        line(
            "automm_request_failure_total",
            "counter",
            "Predict requests answered with an error.",
            self.request_failure.load(Relaxed).to_string(),
        );
        line(
            "automm_inference_count_total",
            "counter",
            "Items (images) inferred.",
            self.inference_count.load(Relaxed).to_string(),
        );
        line(
            "automm_execution_count_total",
            "counter",
            "Batches executed by the model.",
            self.execution_count.load(Relaxed).to_string(),
        );
        line(
            "automm_queue_duration_us_total",
            "counter",
            "Cumulative time requests waited in the queue (us).",
            self.queue_duration_us.load(Relaxed).to_string(),
        );
        line(
            "automm_compute_duration_us_total",
            "counter",
            "Cumulative model execution time (us).",
            self.compute_duration_us.load(Relaxed).to_string(),
        );
        line(
            "automm_queue_depth",
            "gauge",
            "Requests waiting in the queue.",
            self.queue_depth.load(Relaxed).max(0).to_string(),
        );
        line(
            "automm_fit_success_total",
            "counter",
            "Fit calls that finished OK.",
            self.fit_success.load(Relaxed).to_string(),
        );
        line(
            "automm_fit_failure_total",
            "counter",
            "Fit calls that failed.",
            self.fit_failure.load(Relaxed).to_string(),
        );
        out
    }
}

/// Reads one metric's value back from Prometheus text (for tests and the load benchmark).
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, v) = l.rsplit_once(' ')?;
        let base = key.split('{').next()?;
        (base == name).then(|| v.parse().ok()).flatten()
    })
}
