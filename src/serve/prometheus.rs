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
