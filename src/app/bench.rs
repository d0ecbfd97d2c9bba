//! `automm bench serve`: a load benchmark of the gRPC server against a raw ONNX Runtime session on the same
//! model, in one run. Clients send one preprocessed image per Predict (so both sides do the same work);
//! the raw session runs batches of the same size as the client count, in windows alternating with the
//! server's (the machine's speed drifts). Prints throughput, p50/p99 latency,
//! errors and the server's average batch, then optionally a soak at the highest concurrency with RSS
//! before and after.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::deploy::engine::ort::OrtSession;
use crate::error::{Error, Result};
use crate::proto::PredictRequest;
use crate::serve::batcher::BatchConfig;
use crate::serve::{spawn, ServeConfig};

/// Which protocol the load generator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// `automm.v1.Inference/Predict` with a raw float32 tensor.
    Automm,
    /// KServe v2 / Triton `inference.GRPCInferenceService/ModelInfer` with `raw_input_contents`.
    V2,
}

/// One client's closed loop until `deadline`: request latencies (ms) and the failed-request count.
async fn client_loop(
    url: String,
    size: usize,
    deadline: Instant,
    protocol: Protocol,
    name: String,
) -> Result<(Vec<f64>, usize)> {
    let data = vec![0.1f32; 3 * size * size];
    let (mut lat, mut errs) = (Vec::new(), 0usize);
    let shape = vec![1, 3, size as i64, size as i64];
    match protocol {
        Protocol::Automm => {
            let client = crate::client::Client::connect(&url, None, None).await?;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.predict_tensor(shape.clone(), data.clone()).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => errs += 1,
                }
            }
        }
        Protocol::V2 => {
            use crate::inference_proto as pb;
            let mut client = pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                .await
                .map_err(|e| Error::Server(format!("connect: {e}")))?;
            let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            while Instant::now() < deadline {
                let req = pb::ModelInferRequest {
                    model_name: name.clone(),
                    inputs: vec![pb::model_infer_request::InferInputTensor {
                        name: "input".into(),
                        datatype: "FP32".into(),
                        shape: shape.clone(),
                        ..Default::default()
                    }],
                    raw_input_contents: vec![raw.clone()],
                    ..Default::default()
                };
                let t = Instant::now();
                match client.model_infer(req).await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
                    Err(_) => errs += 1,
                }
            }
        }
    }
    Ok((lat, errs))
}

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
    rss_of("self")
}

/// VmRSS of `/proc/<pid>/status`, bytes (0 when unreadable).
fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
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

/// Fetches the Prometheus text from `addr`.
pub async fn scrape(addr: std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let err = |e: std::io::Error| Error::Server(format!("metrics at {addr}: {e}"));
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(err)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.map_err(err)?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.map_err(err)?;
    Ok(out)
}

/// One metric's value from the endpoint at `addr`.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> Result<f64> {
    let text = scrape(addr).await?;
    crate::serve::prometheus::parse_metric(&text, name)
        .ok_or_else(|| Error::Server(format!("metric {name} missing at {addr}")))
}

/// Runs the load benchmark on an exported merged model. With `server_bin`, the server is that binary's
/// `serve` in a child process; otherwise it runs inside this process.
pub fn serve_load(
    model: &Path,
    clients: &[usize],
    seconds: f64,
    soak_seconds: f64,
    batch: BatchConfig,
    server_bin: Option<&Path>,
    protocol: Protocol,
) -> Result<(Vec<LoadRow>, Option<Soak>)> {
    let name = model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let meta = crate::deploy::meta::ExportMeta::read(&crate::onnx::read_model(model)?, &model.display().to_string())?;
    let size = meta.preprocess.size as usize;
    let raw = OrtSession::open(model, 0)?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Server(e.to_string()))?;
    let work = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let mut cfg = ServeConfig::local(model, work.path());
    cfg.batch = batch.clone();
    cfg.engine = Some(crate::deploy::engine::EngineKind::Ort);
    cfg.metrics_listen = Some(([127, 0, 0, 1], 0).into());
    rt.block_on(async move {
        let (inproc, child) = match server_bin {
            None => (Some(spawn(cfg).await?), None),
            Some(bin) => {
                let args: Vec<String> = [
                    "--engine",
                    "ort",
                    "--max-batch-size",
                    &batch.max_batch_size.to_string(),
                    "--max-queue-delay-us",
                    &batch.max_queue_delay.as_micros().to_string(),
                    "--max-queue-size",
                    &batch.max_queue_size.to_string(),
                    "--work-dir",
                    &work.path().join("serve").display().to_string(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                (None, Some(ChildServer::start(bin, model, &args).await?))
            }
        };
        let (url, maddr) = match (&inproc, &child) {
            (Some(s), _) => {
                (s.url(), s.running.metrics_addr.ok_or_else(|| Error::Server("no metrics address".into()))?)
            }
            (_, Some(c)) => (c.url.clone(), c.metrics),
            _ => unreachable!("one of the two is set"),
        };
        let server_rss = |c: &Option<ChildServer>| c.as_ref().map_or_else(rss_bytes, |c| c.rss());
        let mut rows = Vec::new();
        let load = |c: usize, secs: f64| {
            let (url, name) = (url.clone(), name.clone());
            async move {
                let mut tasks = Vec::new();
                let deadline = Instant::now() + Duration::from_secs_f64(secs);
                for _ in 0..c {
                    tasks.push(tokio::spawn(client_loop(url.clone(), size, deadline, protocol, name.clone())));
                }
                let t0 = Instant::now();
                let (mut lat, mut errs) = (Vec::new(), 0);
                for t in tasks {
                    let (l, e) = t.await.map_err(|e| Error::Server(e.to_string()))??;
                    lat.extend(l);
                    errs += e;
                }
                Ok::<_, Error>((lat, errs, t0.elapsed().as_secs_f64()))
            }
        };
        // The VM's speed drifts by 10-20% within a minute, so server and raw baseline alternate in windows
        // of about 3 s (the clients idle while the raw session runs) and each side sums its windows.
        let rounds = (seconds / 3.0).round().max(1.0) as usize;
        let window = seconds / rounds as f64;
        for &c in clients {
            let e0 = metric(maddr, "automm_execution_count_total").await?;
            let i0 = metric(maddr, "automm_inference_count_total").await?;
            let (mut lat, mut errors, mut secs, mut raw_n, mut raw_secs) = (Vec::new(), 0, 0.0, 0.0, 0.0);
            for _ in 0..rounds {
                let (l, e, s) = load(c, window).await?;
                (errors, secs) = (errors + e, secs + s);
                lat.extend(l);
                let ips = raw_ips(&raw, &meta.input, size, c, window)?;
                (raw_n, raw_secs) = (raw_n + ips * window, raw_secs + window);
            }
            let e1 = metric(maddr, "automm_execution_count_total").await?;
            let i1 = metric(maddr, "automm_inference_count_total").await?;
            lat.sort_by(|a, b| a.total_cmp(b));
            rows.push(LoadRow {
                clients: c,
                server_ips: lat.len() as f64 / secs,
                raw_ips: raw_n / raw_secs,
                p50_ms: pct(&lat, 0.5),
                p99_ms: pct(&lat, 0.99),
                errors,
                requests: lat.len() + errors,
                avg_batch: (i1 - i0) / (e1 - e0).max(1.0),
            });
        }
        let soak = if soak_seconds > 0.0 {
            let c = clients.iter().copied().max().unwrap_or(32);
            let before = server_rss(&child);
            let (lat, errors, secs) = load(c, soak_seconds).await?;
            let after = server_rss(&child);
            Some(Soak { ips: lat.len() as f64 / secs, rss_before: before, rss_after: after, errors, ok: lat.len() })
        } else {
            None
        };
        if let Some(s) = inproc {
            s.stop().await?;
        }
        if let Some(c) = child {
            tokio::task::spawn_blocking(move || c.stop()).await.map_err(|e| Error::Server(e.to_string()))??;
        }
        Ok((rows, soak))
    })
}

/// An `automm serve` started as a child process on free 127.0.0.1 ports, so load and server do not share
/// a process (and the server's RSS is its own). Stopped with SIGTERM by [`ChildServer::stop`]; killed if
/// dropped while still running.
pub struct ChildServer {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The Prometheus endpoint.
    pub metrics: std::net::SocketAddr,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("127.0.0.1:0", e))?;
    Ok(l.local_addr().map_err(|e| Error::io("127.0.0.1:0", e))?.port())
}

impl ChildServer {
    /// Starts `bin serve --model model` plus `extra` arguments and waits until its health check says
    /// SERVING (up to 120 s).
    pub async fn start(bin: &Path, model: &Path, extra: &[String]) -> Result<ChildServer> {
        let (port, mport) = (free_port()?, free_port()?);
        let child = std::process::Command::new(bin)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", &format!("127.0.0.1:{mport}")])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| Error::io(bin, e))?;
        let mut me =
            ChildServer { child, url: format!("http://127.0.0.1:{port}"), metrics: ([127, 0, 0, 1], mport).into() };
        let t0 = Instant::now();
        loop {
            if let Ok(c) = crate::client::Client::connect(&me.url, None, None).await {
                if c.health("").await.unwrap_or(false) {
                    return Ok(me);
                }
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                return Err(Error::Server(format!("`{} serve` exited ({status}) before it was ready", bin.display())));
            }
            if t0.elapsed() > Duration::from_secs(120) {
                return Err(Error::Server(format!("the server at {} did not become ready in 120 s", me.url)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server process's resident set size, bytes.
    pub fn rss(&self) -> u64 {
        rss_of(&self.child.id().to_string())
    }

    /// One metric's value.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        metric(self.metrics, name).await
    }

    /// SIGTERM, then waits (up to 60 s) for the exit; true when it exited 0.
    pub fn stop(mut self) -> Result<bool> {
        // SAFETY: signals our own child process by the PID we got from spawn.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| Error::Server(e.to_string()))? {
                return Ok(st.success());
            }
            if t0.elapsed() > Duration::from_secs(60) {
                return Ok(false); // Drop kills it.
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one kind of soak request got back.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KindTally {
    /// Requests sent.
    pub sent: usize,
    /// Outcomes by gRPC code name (`Ok`, `InvalidArgument`, ..., or `dropped` for client-side abandons).
    pub outcomes: std::collections::BTreeMap<String, usize>,
    /// Outcomes outside this kind's expected set.
    pub unexpected: usize,
}

/// Result of [`mixed_soak`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct MixedSoak {
    /// Valid JPEGs: expect OK with the label a sequential call gave.
    pub good: KindTally,
    /// Truncated or garbage images: expect INVALID_ARGUMENT.
    pub bad_image: KindTally,
    /// Deadlines of 1-40 ms: expect OK or DEADLINE_EXCEEDED.
    pub deadline: KindTally,
    /// Requests abandoned by the client after 0-40 ms (half by closing the whole connection).
    pub disconnect: KindTally,
    /// (seconds since start, server RSS bytes).
    pub rss: Vec<(f64, u64)>,
    /// `automm_queue_depth` after the load stopped.
    pub queue_depth_end: f64,
    /// Server's success / failure counters at the end.
    pub server_success: f64,
    /// See `server_success`.
    pub server_failure: f64,
    /// The server exited 0 on SIGTERM.
    pub clean_exit: bool,
    /// The first few unexpected outcomes, described.
    pub examples: Vec<String>,
    /// Wall seconds of load.
    pub seconds: f64,
    /// The hostile single requests sent before the load (a 200-item burst, an aspect-ratio bomb) and the
    /// half-open connection held through SIGTERM.
    pub probes: Probes,
}

/// Hostile requests with one expected answer each, and what they cost the server.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Probes {
    /// Status of a Predict with 200 one-pixel PNGs (a 14 KB request): expect RESOURCE_EXHAUSTED.
    pub burst_status: String,
    /// Server RSS bytes before and after that request.
    pub burst_rss: (u64, u64),
    /// Status of a Predict with one 16384x1 PNG: expect OK.
    pub bomb_status: String,
    /// Its wall seconds.
    pub bomb_seconds: f64,
    /// Seconds from SIGTERM to exit with a half-open connection (HTTP/2 preface cut short) still open.
    pub sigterm_seconds: f64,
}

impl Probes {
    fn passed(&self) -> bool {
        self.burst_status == "ResourceExhausted" && self.bomb_status == "Ok" && self.bomb_seconds < 10.0
    }
}

impl MixedSoak {
    /// True when nothing unexpected happened, the probes got their answers, the queue drained and the
    /// server exited cleanly.
    pub fn passed(&self) -> bool {
        let unexpected =
            self.good.unexpected + self.bad_image.unexpected + self.deadline.unexpected + self.disconnect.unexpected;
        unexpected == 0 && self.queue_depth_end == 0.0 && self.clean_exit && self.probes.passed()
    }
}

/// A PNG of `w` x `h` pixels of one colour.
fn png(w: u32, h: u32) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(w, h, image::Rgb([120, 30, 200]))
        .write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| Error::encode("a probe PNG", e))?;
    Ok(buf.into_inner())
}

/// Sends the burst and the bomb (see [`Probes`]) and measures them.
async fn probe(server: &ChildServer, client: &crate::client::Client) -> Result<Probes> {
    let before = server.rss();
    let burst = PredictRequest { images: vec![png(1, 1)?; 200], tensor: None };
    let burst_status = code_name(&client.predict_status(burst, None).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let burst_rss = (before, server.rss());
    let t0 = Instant::now();
    let bomb = PredictRequest { images: vec![png(16384, 1)?], tensor: None };
    let bomb_status = code_name(&client.predict_status(bomb, None).await);
    Ok(Probes { burst_status, burst_rss, bomb_status, bomb_seconds: t0.elapsed().as_secs_f64(), sigterm_seconds: 0.0 })
}

/// A soak against a child `automm serve` (binary `bin`) on `model`: `clients` concurrent clients for
/// `seconds`, each request drawn as 70% good image, 10% bad image, 10% tight deadline, 10% abandoned
/// mid-request; server RSS sampled every `sample_seconds`.
pub fn mixed_soak(bin: &Path, model: &Path, clients: usize, seconds: f64, sample_seconds: f64) -> Result<MixedSoak> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Server(e.to_string()))?;
    let work = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let csv = crate::app::synth::make_dataset(work.path(), "soak", &[3, 3, 3, 3], 96, 9)?;
    let table = crate::data::Table::load(&csv, None, None)?;
    let images: Vec<Vec<u8>> = table
        .rows
        .iter()
        .map(|r| std::fs::read(&r.image).map_err(|e| Error::io(&r.image, e)))
        .collect::<Result<_>>()?;
    rt.block_on(async move {
        let server =
            ChildServer::start(bin, model, &["--work-dir".into(), work.path().join("serve").display().to_string()])
                .await?;
        let probe_client = crate::client::Client::connect(&server.url, None, None).await?;
        let mut probes = probe(&server, &probe_client).await?;
        let probe = probe_client;
        // The labels a quiet, sequential server gives: every good answer under load must match.
        let mut want = Vec::new();
        for img in &images {
            want.push(probe.predict(vec![img.clone()]).await?.predictions[0].label.clone());
        }
        let images = std::sync::Arc::new(images);
        let want = std::sync::Arc::new(want);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs_f64(seconds);
        let mut tasks = Vec::new();
        for id in 0..clients {
            let (url, images, want) = (server.url.clone(), images.clone(), want.clone());
            tasks.push(tokio::spawn(soak_client(id, url, images, want, end)));
        }
        let mut rss = vec![(0.0, server.rss())];
        while Instant::now() < end {
            tokio::time::sleep(
                Duration::from_secs_f64(sample_seconds.max(0.5))
                    .min(end.saturating_duration_since(Instant::now()) + Duration::from_millis(1)),
            )
            .await;
            rss.push((t0.elapsed().as_secs_f64(), server.rss()));
        }
        let mut all: [KindTally; 4] = Default::default();
        let mut examples = Vec::new();
        for task in tasks {
            let (t, ex) = task.await.map_err(|e| Error::Server(e.to_string()))??;
            for (a, b) in all.iter_mut().zip(t) {
                a.sent += b.sent;
                a.unexpected += b.unexpected;
                for (k, v) in b.outcomes {
                    *a.outcomes.entry(k).or_default() += v;
                }
            }
            examples.extend(ex);
        }
        let secs = t0.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push((t0.elapsed().as_secs_f64(), server.rss()));
        let queue_depth_end = server.metric("automm_queue_depth").await?;
        let server_success = server.metric("automm_request_success_total").await?;
        let server_failure = server.metric("automm_request_failure_total").await?;
        drop(probe);
        // A connection that never finishes its HTTP/2 handshake, held through SIGTERM.
        let mut half_open = tokio::net::TcpStream::connect(server.url.trim_start_matches("http://"))
            .await
            .map_err(|e| Error::Server(format!("half-open connection: {e}")))?;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut half_open, b"PRI * HTTP/2.0\r\n").await;
        let t_stop = Instant::now();
        let clean_exit =
            tokio::task::spawn_blocking(move || server.stop()).await.map_err(|e| Error::Server(e.to_string()))??;
        probes.sigterm_seconds = t_stop.elapsed().as_secs_f64();
        drop(half_open);
        let [good, bad_image, deadline, disconnect] = all;
        examples.truncate(10);
        Ok(MixedSoak {
            good,
            bad_image,
            deadline,
            disconnect,
            rss,
            queue_depth_end,
            server_success,
            server_failure,
            clean_exit,
            examples,
            seconds: secs,
            probes,
        })
    })
}

/// One soak client until `end`: mostly good images (their labels must match `want`), plus corrupt
/// images, tight deadlines and requests dropped mid-flight, each tallied by outcome.
async fn soak_client(
    id: usize,
    url: String,
    images: std::sync::Arc<Vec<Vec<u8>>>,
    want: std::sync::Arc<Vec<String>>,
    end: Instant,
) -> Result<([KindTally; 4], Vec<String>)> {
    use rand::{Rng, SeedableRng};
    use tonic::Code;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(id as u64);
    let client = crate::client::Client::connect(&url, None, None).await?;
    let mut t: [KindTally; 4] = Default::default();
    let mut examples = Vec::new();
    while Instant::now() < end {
        let pick = rng.random_range(0..100);
        let i = rng.random_range(0..images.len());
        let kind = match pick {
            0..70 => 0,
            70..80 => 1,
            80..90 => 2,
            _ => 3,
        };
        let body = if kind == 1 {
            let img = &images[i];
            if rng.random_bool(0.5) {
                img[..rng.random_range(0..img.len() / 2)].to_vec()
            } else {
                (0..rng.random_range(1..4096)).map(|_| rng.random::<u8>()).collect()
            }
        } else {
            images[i].clone()
        };
        let req = PredictRequest { images: vec![body], tensor: None };
        let outcome = soak_outcome(&client, &url, kind, req, &mut rng, &want[i]).await?;
        let ok = match kind {
            0 => outcome == "Ok",
            1 => outcome == format!("{:?}", Code::InvalidArgument),
            2 => outcome == "Ok" || outcome == format!("{:?}", Code::DeadlineExceeded),
            _ => outcome == "Ok" || outcome == "dropped",
        };
        let tally = &mut t[kind];
        tally.sent += 1;
        if !ok {
            tally.unexpected += 1;
            if examples.len() < 3 {
                examples.push(format!("kind {kind}: {outcome}"));
            }
        }
        *tally.outcomes.entry(outcome).or_default() += 1;
    }
    Ok((t, examples))
}

/// Sends one soak request of `kind` (0 good, 1 corrupt image, 2 tight deadline, 3 dropped) and names
/// its outcome (a gRPC code, "wrong label" or "dropped").
async fn soak_outcome(
    client: &crate::client::Client,
    url: &str,
    kind: usize,
    req: PredictRequest,
    rng: &mut rand_chacha::ChaCha8Rng,
    want: &str,
) -> Result<String> {
    use rand::Rng;
    Ok(match kind {
        2 => {
            let d = Duration::from_micros(rng.random_range(1_000..40_000));
            code_name(&client.predict_status(req, Some(d)).await)
        }
        3 => {
            let after = Duration::from_micros(rng.random_range(0..40_000));
            if rng.random_bool(0.5) {
                match tokio::time::timeout(after, client.predict_status(req, None)).await {
                    Ok(r) => code_name(&r),
                    Err(_) => "dropped".into(),
                }
            } else {
                // A connection of its own, closed mid-request.
                let c = crate::client::Client::connect(url, None, None).await?;
                match tokio::time::timeout(after, c.predict_status(req, None)).await {
                    Ok(r) => code_name(&r),
                    Err(_) => "dropped".into(),
                }
            }
        }
        _ => {
            let r = client.predict_status(req, None).await;
            match (&r, kind) {
                (Ok(p), 0) if p.predictions.first().map(|p| p.label.as_str()) != Some(want) => "wrong label".into(),
                _ => code_name(&r),
            }
        }
    })
}

fn code_name<T>(r: &std::result::Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}
