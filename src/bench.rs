//! `automm bench serve`: a load benchmark of the gRPC server against a raw ONNX Runtime session on the same
//! model, in one run. Clients send one preprocessed image per Predict (so both sides do the same work);
//! the raw session runs batches of the same size as the client count. Prints throughput, p50/p99 latency,
//! errors and the server's average batch, then optionally a soak at the highest concurrency with RSS
//! before and after.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::infer::ort::OrtSession;
use crate::server::batcher::BatchConfig;
use crate::server::{spawn, ServeConfig};

/// One row of the benchmark table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadRow {
    /// Concurrent clients (and raw batch size).
    pub clients: usize,
    /// Server images/s.
    pub server_ips: f64,
    /// Raw ORT images/s at batch = clients.
    pub raw_ips: f64,
    /// Median request latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Failed requests.
    pub errors: usize,
    /// Requests sent.
    pub requests: usize,
    /// Average executed batch on the server during the run.
    pub avg_batch: f64,
}

/// A sustained run at the highest client count.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Soak {
    /// Server images/s.
    pub ips: f64,
    /// RSS before, bytes.
    pub rss_before: u64,
    /// RSS after, bytes.
    pub rss_after: u64,
    /// Failed requests.
    pub errors: usize,
    /// Requests that succeeded.
    pub ok: usize,
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn raw_ips(session: &OrtSession, input: &str, size: usize, batch: usize, seconds: f64) -> Result<f64> {
    let data = vec![0.1f32; batch * 3 * size * size];
    let shape = [batch, 3, size, size];
    session.run_f32(&[(input, &shape, &data)])?; // warm-up
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed().as_secs_f64() < seconds {
        session.run_f32(&[(input, &shape, &data)])?;
        n += batch;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Runs the load benchmark on an exported merged model.
pub fn serve_load(
    model: &Path,
    clients: &[usize],
    seconds: f64,
    soak_seconds: f64,
    batch: BatchConfig,
) -> Result<(Vec<LoadRow>, Option<Soak>)> {
    let meta = crate::export::ExportMeta::read(&crate::onnx::read_model(model)?, &model.display().to_string())?;
    let size = meta.preprocess.size as usize;
    let raw = OrtSession::open(model, 0)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Runtime(e.to_string()))?;
    let work = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut cfg = ServeConfig::local(model, work.path());
    cfg.batch = batch;
    cfg.engine = Some(crate::infer::EngineKind::Ort);
    rt.block_on(async move {
        let server = spawn(cfg).await?;
        let url = server.url();
        let state = server.running.state.clone();
        let mut rows = Vec::new();
        let load = |c: usize, secs: f64| {
            let url = url.clone();
            async move {
                let mut tasks = Vec::new();
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                for _ in 0..c {
                    let url = url.clone();
                    tasks.push(tokio::spawn(async move {
                        let client = crate::client::Client::connect(&url, None, None).await?;
                        let data = vec![0.1f32; 3 * size * size];
                        let (mut lat, mut errs) = (Vec::new(), 0usize);
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            match client.predict_tensor(vec![1, 3, size as i64, size as i64], data.clone()).await {
                                Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                                Err(_) => errs += 1,
                            }
                        }
                        Ok::<_, Error>((lat, errs))
                    }));
                }
                let t0 = Instant::now();
                let (mut lat, mut errs) = (Vec::new(), 0);
                for t in tasks {
                    let (l, e) = t.await.map_err(|e| Error::Runtime(e.to_string()))??;
                    lat.extend(l);
                    errs += e;
                }
                Ok::<_, Error>((lat, errs, t0.elapsed().as_secs_f64()))
            }
        };
        for &c in clients {
            let (e0, i0) = (
                state.metrics.execution_count.load(std::sync::atomic::Ordering::Relaxed),
                state.metrics.inference_count.load(std::sync::atomic::Ordering::Relaxed),
            );
            let (mut lat, errors, secs) = load(c, seconds).await?;
            let (e1, i1) = (
                state.metrics.execution_count.load(std::sync::atomic::Ordering::Relaxed),
                state.metrics.inference_count.load(std::sync::atomic::Ordering::Relaxed),
            );
            lat.sort_by(|a, b| a.total_cmp(b));
            let raw_ips = raw_ips(&raw, &meta.input, size, c, seconds.min(5.0))?;
            rows.push(LoadRow {
                clients: c,
                server_ips: lat.len() as f64 / secs,
                raw_ips,
                p50_ms: pct(&lat, 0.5),
                p99_ms: pct(&lat, 0.99),
                errors,
                requests: lat.len() + errors,
                avg_batch: (i1 - i0) as f64 / (e1 - e0).max(1) as f64,
            });
        }
        let soak = if soak_seconds > 0.0 {
            let c = clients.iter().copied().max().unwrap_or(32);
            let before = rss_bytes();
            let (lat, errors, secs) = load(c, soak_seconds).await?;
            let after = rss_bytes();
            Some(Soak { ips: lat.len() as f64 / secs, rss_before: before, rss_after: after, errors, ok: lat.len() })
        } else {
            None
        };
        server.stop().await?;
        Ok((rows, soak))
    })
}
