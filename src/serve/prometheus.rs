//! Triton-like serving metrics, kept in atomics and rendered as Prometheus text: request success and
//! failure counts (failures also by gRPC status code), inference count (items) and execution count
//! (batches run, so the average batch size is their ratio), cumulative queue and compute time, latency
//! histograms of requests, queueing and compute, the current queue depth and the requests in flight.
//! Every series carries the model name and version labels.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Upper bounds of the latency histograms' buckets, milliseconds (Prometheus adds `+Inf`).
pub const LATENCY_BUCKETS_MS: [f64; 14] =
    [0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// A latency histogram in atomics: a count per bucket (not cumulative; rendering sums them), the sum.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 15],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let ms = d.as_secs_f64() * 1000.0;
        let i = LATENCY_BUCKETS_MS.iter().position(|&b| ms <= b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Prometheus `_bucket`, `_sum` (seconds) and `_count` lines of `name` with `labels` (`k="v",...`).
    fn render(&self, name: &str, help: &str, labels: &str, out: &mut String) {
        out.push_str(&format!(
            "# HELP {name} {help}
# TYPE {name} histogram
"
        ));
        let mut total = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Relaxed);
            let le = LATENCY_BUCKETS_MS.get(i).map_or("+Inf".to_string(), |ms| format!("{}", ms / 1000.0));
            out.push_str(&format!("{name}_bucket{{{labels},le=\"{le}\"}} {total}\n"));
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        out.push_str(&format!("{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {total}\n"));
    }
}

/// Counters shared by the service and the batcher.
#[derive(Debug, Default)]
pub struct Metrics {
    /// End-to-end latency of inference requests (both protocols).
    pub request_latency: Histogram,
    /// Time requests waited in the batcher's queue.
    pub queue_latency: Histogram,
    /// Model time per executed batch.
    pub compute_latency: Histogram,
    /// Inference requests being decoded, queued or run now.
    pub pending: AtomicI64,
    /// Failed inference requests by gRPC status code name.
    pub failures_by_code: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
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
    /// Records one request's wait in the queue (the cumulative time, the count and the histogram).
    pub fn record_queued(&self, waited: std::time::Duration) {
        self.queue_duration_us.fetch_add(waited.as_micros() as u64, Relaxed);
        self.queue_count.fetch_add(1, Relaxed);
        self.queue_latency.observe(waited);
    }

    /// Records one executed batch of `n` items that took `took` in the model: the execution count, the
    /// cumulative compute time, its histogram, the per-size statistics and the last-inference time.
    pub fn record_batch(&self, n: usize, took: std::time::Duration) {
        self.compute_duration_us.fetch_add(took.as_micros() as u64, Relaxed);
        self.execution_count.fetch_add(1, Relaxed);
        self.compute_latency.observe(took);
        if let Ok(mut b) = self.batches.lock() {
            let e = b.entry(n).or_insert((0, 0));
            e.0 += 1;
            e.1 += took.as_nanos() as u64;
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.last_inference_ms.store(now.as_millis() as u64, Relaxed);
    }

    /// Records one answered inference request (either protocol): its outcome (`None`: OK, else the
    /// status code) and how long it took.
    pub fn record_request(&self, failed: Option<tonic::Code>, took: std::time::Duration) {
        let (count, ns) = match failed {
            None => (&self.request_success, &self.success_ns),
            Some(_) => (&self.request_failure, &self.failure_ns),
        };
        count.fetch_add(1, Relaxed);
        ns.fetch_add(took.as_nanos() as u64, Relaxed);
        self.request_latency.observe(took);
        if let (Some(code), Ok(mut m)) = (failed, self.failures_by_code.lock()) {
            *m.entry(format!("{code:?}")).or_insert(0) += 1;
        }
    }
}

impl Metrics {
    /// Prometheus text exposition (version 0.0.4); every series is labelled with `model` and `version`.
    pub fn render(&self, model: &str, model_version: &str) -> String {
        let clean = |s: &str| s.replace(['"', '\\', '\n'], "");
        let labels = format!("model=\"{}\",version=\"{}\"", clean(model), clean(model_version));
        let l = format!("{{{labels}}}");
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
        line(
            "automm_pending_requests",
            "gauge",
            "Inference requests being decoded, queued or run.",
            self.pending.load(Relaxed).max(0).to_string(),
        );
        let name = "automm_request_failure_by_code_total";
        out.push_str(&format!("# HELP {name} Failed inference requests by gRPC status code.\n# TYPE {name} counter\n"));
        if let Ok(m) = self.failures_by_code.lock() {
            for (code, n) in m.iter() {
                out.push_str(&format!("{name}{{{labels},code=\"{code}\"}} {n}\n"));
            }
        }
        self.request_latency.render("automm_request_duration_seconds", "Inference request latency.", &labels, &mut out);
        self.queue_latency.render(
            "automm_queue_duration_seconds",
            "Time requests waited in the queue.",
            &labels,
            &mut out,
        );
        self.compute_latency.render(
            "automm_compute_duration_seconds",
            "Model time per executed batch.",
            &labels,
            &mut out,
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
