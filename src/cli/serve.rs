//! `automm serve`: the gRPC server until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use automm::deploy::engine::EngineKind;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// An exported merged .onnx (`automm export`), or a model folder (exported on start).
    #[arg(long)]
    pub model: PathBuf,
    /// gRPC address (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: std::net::SocketAddr,
    /// The model's name on the KServe v2 / Triton protocol (`inference.GRPCInferenceService`, served on
    /// the same port); default: the model file's stem.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Most items per executed batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Longest wait of the oldest queued request for a fuller batch, microseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_queue_delay_us: u64,
    /// Most queued requests; more get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 1024)]
    pub max_queue_size: usize,
    /// A batch size to run as soon as the queue can form it, without waiting out the queue delay
    /// (Triton's preferred_batch_size; repeatable, each at most --max-batch-size).
    #[arg(long = "preferred-batch-size", value_name = "N")]
    pub preferred_batch_sizes: Vec<usize>,
    /// Priority levels of the queue (KServe v2 `priority` parameter: 1 runs first, N last).
    #[arg(long, default_value_t = 2)]
    pub priority_levels: u32,
    /// The level of requests that ask for none (automm.v1 Predict, v2 without `priority`) or for one out
    /// of range; default: the lowest (= --priority-levels).
    #[arg(long)]
    pub default_priority_level: Option<u32>,
    /// Largest request message, bytes (bigger -> RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_request_bytes: usize,
    /// Largest total of decoded model input held by the requests in flight, bytes (a request past it ->
    /// RESOURCE_EXHAUSTED). Each image costs 3 x side x side x 4 bytes (602 KB at 224).
    #[arg(long, default_value_t = automm::serve::DEFAULT_MAX_INFLIGHT_BYTES)]
    pub max_inflight_bytes: usize,
    /// Prometheus metrics address (GET /metrics).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS certificate (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding the bearer token clients must send.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Engine: ort (default when ONNX Runtime is found) or candle.
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// ORT intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Like env.num_gpus: non-zero asks ONNX Runtime for its CUDA execution provider (builds with
    /// --features cuda; falls back to the CPU, logged once).
    #[arg(long, default_value_t = 0)]
    pub num_gpus: i64,
    /// Folder Fit may read tables and images from (Fit is off without it).
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Backbone ONNX that Fit trains on (Fit is off without it).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Folder for Fit runs and exports.
    #[arg(long, default_value = "runs/serve")]
    pub work_dir: PathBuf,
    /// Seconds a new connection may take to send its first bytes (HTTP/2 preface or TLS hello).
    #[arg(long, default_value_t = 10.0)]
    pub handshake_timeout: f64,
    /// Seconds shutdown (SIGTERM/SIGINT) waits for open requests and connections before dropping them.
    #[arg(long, default_value_t = 5.0)]
    pub shutdown_timeout: f64,
}

/// A duration flag in seconds.
fn seconds(flag: &str, v: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(v).map_err(|_| anyhow::anyhow!("{flag}: expected seconds >= 0, got {v}"))
}

pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    let auth_token = match &a.auth_token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let cfg = automm::serve::ServeConfig {
        model: a.model,
        listen: a.listen,
        model_name: a.model_name,
        metrics_listen: a.metrics_listen,
        batch: automm::serve::batcher::BatchConfig {
            max_batch_size: a.max_batch_size,
            max_queue_delay: std::time::Duration::from_micros(a.max_queue_delay_us),
            max_queue_size: a.max_queue_size,
            preferred_batch_sizes: a.preferred_batch_sizes,
            priority_levels: a.priority_levels,
            default_priority_level: a.default_priority_level.unwrap_or(a.priority_levels),
        },
        engine: a.engine,
        threads: a.threads,
        num_gpus: a.num_gpus,
        tls: a.tls_cert.zip(a.tls_key),
        auth_token,
        max_request_bytes: a.max_request_bytes,
        max_inflight_bytes: a.max_inflight_bytes,
        data_root: a.data_root,
        backbone: a.backbone,
        work_dir: a.work_dir,
        handshake_timeout: seconds("--handshake-timeout", a.handshake_timeout)?,
        shutdown_timeout: seconds("--shutdown-timeout", a.shutdown_timeout)?,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok(r) = rx.await {
                let r: automm::serve::Running = r;
                eprintln!(
                    "automm serving on {}{}",
                    r.addr,
                    r.metrics_addr.map(|m| format!(", metrics on http://{m}/metrics")).unwrap_or_default()
                );
            }
        });
        automm::serve::serve(cfg, shutdown_signal(), Some(tx)).await
    })?;
    eprintln!("automm: stopped after draining the queue");
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
