//! The gRPC server (`automm serve`): the `automm.v1.Inference` service as thin RPCs over shared state in
//! an `Arc` (the served model behind a lock for hot swaps, the dynamic batcher in [`batcher`], request
//! decoding in [`request`], metrics in [`prometheus`]; a Fit runs in `fit_job`, the only part that calls
//! training), plus grpc.health.v1, server reflection, optional TLS and bearer-token auth, and a
//! Prometheus metrics endpoint.

pub mod batcher;
mod conn;
mod fit_job;
pub mod prometheus;
pub mod request;

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use self::batcher::{BatchConfig, Batcher, Job};
use self::prometheus::Metrics;
use crate::data::Preprocess;
use crate::deploy::engine::exported::ExportedModel;
use crate::deploy::engine::EngineKind;
use crate::deploy::export::ExportOptions;
use crate::deploy::meta::ExportKind;
use crate::error::{Error, Result};
use crate::proto::inference_server::{Inference, InferenceServer};
use crate::proto::{FitEvent, FitRequest, GetModelRequest, ModelInfo, PredictRequest, PredictResponse, Prediction};

/// A model being served.
pub struct ServingModel {
    /// Version string (changes on every hot swap).
    pub version: String,
    /// The runner.
    pub model: ExportedModel,
    /// Class labels.
    pub classes: Vec<String>,
    /// Input side.
    pub input_size: usize,
    /// Preprocessing for encoded images.
    pub preprocess: Preprocess,
    /// Training metrics as JSON, when known.
    pub metrics_json: String,
}

impl ServingModel {
    /// Opens an exported model file (`cuda`: ask ORT for its CUDA execution provider).
    pub fn open(
        path: &Path,
        engine: Option<EngineKind>,
        threads: usize,
        cuda: bool,
        version: String,
        metrics_json: String,
    ) -> Result<Self> {
        let model = ExportedModel::open_with(path, engine, threads, cuda, false)?;
        if model.meta.kind != ExportKind::Merged {
            return Err(Error::onnx(
                path.display().to_string(),
                format!("serve needs a merged export (automm export without --head-only/--with-preprocessing); this one is {}", model.meta.kind.name()),
            ));
        }
        Ok(ServingModel {
            version,
            classes: model.meta.classes.clone(),
            input_size: model.meta.preprocess.size as usize,
            preprocess: model.meta.preprocess.clone(),
            model,
            metrics_json,
        })
    }
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Model: an exported merged `.onnx`, or a model folder (exported on start).
    pub model: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus listen address.
    pub metrics_listen: Option<SocketAddr>,
    /// Batching.
    pub batch: BatchConfig,
    /// Engine (None: ORT when found, else candle).
    pub engine: Option<EngineKind>,
    /// ORT intra-op threads (0 = all cores).
    pub threads: usize,
    /// `env.num_gpus`: non-zero asks ORT for its CUDA execution provider (needs `--features cuda`).
    pub num_gpus: i64,
    /// PEM certificate and key for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Bearer token required on Inference calls.
    pub auth_token: Option<String>,
    /// Largest request message, bytes.
    pub max_request_bytes: usize,
    /// Largest total of decoded model input (float32 bytes) held by requests being decoded, queued or
    /// run at once; a request that would pass it is refused with RESOURCE_EXHAUSTED.
    pub max_inflight_bytes: usize,
    /// Folder that Fit may read tables and images from.
    pub data_root: Option<PathBuf>,
    /// Backbone ONNX that Fit trains on.
    pub backbone: Option<PathBuf>,
    /// Folder for Fit's runs and exports.
    pub work_dir: PathBuf,
    /// How long shutdown waits for open requests and connections before dropping them.
    pub shutdown_timeout: Duration,
    /// How long a new connection may take to send its first bytes (HTTP/2 preface or TLS hello).
    pub handshake_timeout: Duration,
}

impl ServeConfig {
    /// An in-process server on a free loopback port with default batching and no TLS, auth or Fit
    /// (the demo, benchmarks and tests start from this).
    pub fn local(model: &Path, work_dir: &Path) -> ServeConfig {
        ServeConfig {
            model: model.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            batch: BatchConfig::default(),
            engine: None,
            threads: 0,
            num_gpus: 0,
            tls: None,
            auth_token: None,
            max_request_bytes: 64 << 20,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            data_root: None,
            backbone: None,
            work_dir: work_dir.to_path_buf(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// A server started by [`spawn`]: its addresses and state, and how to stop it.
pub struct Spawned {
    /// Addresses and shared state.
    pub running: Running,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<()>>,
}

impl Spawned {
    /// `http://addr` of the gRPC endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.running.addr)
    }

    /// Stops accepting, drains the queue, and waits for the server to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.done.await.map_err(|e| Error::Server(format!("server task: {e}")))?
    }
}

/// Starts [`serve`] on the current tokio runtime and waits until it listens.
pub async fn spawn(cfg: ServeConfig) -> Result<Spawned> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let done = tokio::spawn(serve(
        cfg,
        async move {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    match ready_rx.await {
        Ok(running) => Ok(Spawned { running, stop: Some(stop_tx), done }),
        Err(_) => Err(done
            .await
            .map_err(|e| Error::Server(e.to_string()))?
            .err()
            .unwrap_or_else(|| Error::Server("the server stopped before listening".into()))),
    }
}

/// Shared state behind the service.
pub struct State {
    current: RwLock<Arc<ServingModel>>,
    batcher: std::sync::Mutex<Batcher>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    cfg: ServeConfig,
    fit_lock: Arc<tokio::sync::Mutex<()>>,
    fits: std::sync::atomic::AtomicU64,
    /// Decoded input bytes of the requests in flight (see [`ServeConfig::max_inflight_bytes`]).
    inflight: Arc<std::sync::atomic::AtomicUsize>,
}

impl State {
    /// The model new requests use.
    pub fn current(&self) -> Arc<ServingModel> {
        self.current.read().map(|g| g.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    fn swap(&self, m: ServingModel) {
        let m = Arc::new(m);
        match self.current.write() {
            Ok(mut g) => *g = m,
            Err(p) => *p.into_inner() = m,
        }
    }

    fn submit(&self, job: Job) -> std::result::Result<(), Status> {
        self.batcher.lock().map_err(|_| Status::internal("batcher lock poisoned"))?.submit(job)
    }
}

/// A new, empty `fit-N` folder in `work_dir`: N is past every `fit-*` folder already there (also those of
/// earlier server processes) and past this process's counter, and the folder is created here, so a Fit
/// never reuses, replaces or deletes an earlier run.
pub fn fresh_run_dir(work_dir: &Path, counter: &std::sync::atomic::AtomicU64) -> Result<(u64, PathBuf)> {
    std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
    let listed = std::fs::read_dir(work_dir)
        .map_err(|e| Error::io(work_dir, e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("fit-")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let mut n = counter.fetch_max(listed, SeqCst).max(listed);
    loop {
        n += 1;
        let dir = work_dir.join(format!("fit-{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                counter.fetch_max(n, SeqCst);
                return Ok((n, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
}

/// A request's share of [`ServeConfig::max_inflight_bytes`], given back when the request ends.
struct Reserved(Arc<std::sync::atomic::AtomicUsize>, usize);

impl Drop for Reserved {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, SeqCst);
    }
}

impl Service {
    /// Reserves the decoded size of `items` images of side `s`, or RESOURCE_EXHAUSTED when the requests
    /// in flight already hold too much (known before decoding: every item becomes `3 * s * s` floats).
    fn reserve(&self, items: usize, s: usize) -> std::result::Result<Reserved, Status> {
        let need = items.saturating_mul(3 * s * s * 4);
        let (limit, counter) = (self.state.cfg.max_inflight_bytes, &self.state.inflight);
        let mut now = counter.load(SeqCst);
        loop {
            if now.saturating_add(need) > limit && now > 0 || need > limit {
                return Err(Status::resource_exhausted(format!(
                    "the server holds {now} bytes of decoded requests and this one needs {need}; the limit is \
                     {limit} (--max-inflight-bytes): retry later"
                )));
            }
            match counter.compare_exchange(now, now + need, SeqCst, SeqCst) {
                Ok(_) => return Ok(Reserved(counter.clone(), need)),
                Err(actual) => now = actual,
            }
        }
    }
}

/// Sets its flag when dropped (a request future dropped because its caller went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    state: Arc<State>,
}

/// Parses the `grpc-timeout` header (`<at most 8 digits><H|M|S|m|u|n>`, as the gRPC spec bounds it).
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl Service {
    async fn predict_inner(
        &self,
        req: Request<PredictRequest>,
    ) -> std::result::Result<Response<PredictResponse>, Status> {
        let deadline = grpc_timeout(&req).and_then(|d| Instant::now().checked_add(d));
        let model = self.state.current();
        let req = req.into_inner();
        let (s, pp) = (model.input_size, model.preprocess.clone());
        // Over the item limit is refused in `prepare`, with its own message.
        let items = request::items(&req).min(self.state.cfg.batch.max_batch_size);
        let _reserved = self.reserve(items, s)?;
        // Dropped with this future when the caller goes away, which stops decoding between images.
        let gone = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let budget = request::Budget {
            max_items: self.state.cfg.batch.max_batch_size,
            deadline,
            cancelled: Some(gone.0.clone()),
        };
        // Tensor checks are cheap; decoding is CPU work: both off the async runtime, images in parallel.
        let (data, n) = tokio::task::spawn_blocking(move || request::prepare(req, s, &pp, &budget))
            .await
            .map_err(|e| Status::internal(format!("decoding task failed: {e}")))??;
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(Status::deadline_exceeded("the deadline passed before the request was queued"));
        }
        let (tx, rx) = oneshot::channel();
        self.state.submit(Job { model: model.clone(), data, n, enqueued: Instant::now(), deadline, reply: tx })?;
        let probs = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx)
                .await
                .map_err(|_| Status::deadline_exceeded("deadline exceeded"))?,
            None => rx.await,
        }
        .map_err(|_| Status::internal("the batcher dropped the request"))??;
        let k = model.classes.len();
        let predictions = probs
            .chunks(k)
            .map(|row| {
                let (best, _) =
                    row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
                Prediction { label: model.classes[best].clone(), class_index: best as i32, probabilities: row.to_vec() }
            })
            .collect();
        Ok(Response::new(PredictResponse { predictions, model_version: model.version.clone() }))
    }
}

/// Records a Predict call's outcome when dropped.
struct Outcome<'a> {
    metrics: &'a Metrics,
    ok: bool,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        let c = if self.ok { &self.metrics.request_success } else { &self.metrics.request_failure };
        c.fetch_add(1, Relaxed);
    }
}

impl Service {
    /// Resolves a Fit path under the data root, refusing absolute paths and `..` escapes.
    fn sandboxed(&self, rel: &str, what: &str) -> std::result::Result<PathBuf, Status> {
        let root = self
            .state
            .cfg
            .data_root
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("Fit is disabled: start the server with --data-root DIR"))?;
        let p = Path::new(rel);
        if rel.is_empty()
            || p.is_absolute()
            || p.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir | Component::Prefix(_)))
        {
            return Err(Status::permission_denied(format!(
                "{what} `{rel}` must be a relative path inside the data root, without `..`"
            )));
        }
        let root = std::fs::canonicalize(root)
            .map_err(|e| Status::failed_precondition(format!("data root {}: {e}", root.display())))?;
        let full = std::fs::canonicalize(root.join(p))
            .map_err(|_| Status::invalid_argument(format!("{what} `{rel}` does not exist under the data root")))?;
        if !full.starts_with(&root) {
            return Err(Status::permission_denied(format!("{what} `{rel}` resolves outside the data root")));
        }
        Ok(full)
    }
}

#[tonic::async_trait]
impl Inference for Service {
    async fn predict(&self, req: Request<PredictRequest>) -> std::result::Result<Response<PredictResponse>, Status> {
        // Counted on drop, so a call abandoned mid-way (client gone, deadline) still counts as failed.
        let mut outcome = Outcome { metrics: &self.state.metrics, ok: false };
        let r = self.predict_inner(req).await;
        outcome.ok = r.is_ok();
        r
    }

    async fn get_model(&self, _req: Request<GetModelRequest>) -> std::result::Result<Response<ModelInfo>, Status> {
        let m = self.state.current();
        Ok(Response::new(ModelInfo {
            classes: m.classes.clone(),
            input_name: m.model.meta.input.clone(),
            input_size: m.input_size as i32,
            preprocessing_json: serde_json::to_string(&m.preprocess).unwrap_or_default(),
            version: m.version.clone(),
            metrics_json: m.metrics_json.clone(),
            engine: m.model.engine.to_string(),
            max_batch_size: self.state.cfg.batch.max_batch_size as i32,
        }))
    }

    type FitStream = ReceiverStream<std::result::Result<FitEvent, Status>>;

    async fn fit(&self, req: Request<FitRequest>) -> std::result::Result<Response<Self::FitStream>, Status> {
        let guard = self
            .state
            .fit_lock
            .clone()
            .try_lock_owned()
            .map_err(|_| Status::failed_precondition("a Fit is already running; one at a time"))?;
        let r = req.into_inner();
        let backbone = self
            .state
            .cfg
            .backbone
            .clone()
            .ok_or_else(|| Status::failed_precondition("Fit is disabled: start the server with --backbone FILE"))?;
        let train_data = self.sandboxed(&r.train_data, "train_data")?;
        let tuning_data =
            if r.tuning_data.is_empty() { None } else { Some(self.sandboxed(&r.tuning_data, "tuning_data")?) };
        // The tables' image paths must stay inside the data root too (symlinks followed).
        {
            let root = self.state.cfg.data_root.clone().unwrap_or_default();
            let (label, column) = (r.label.clone(), (!r.image_column.is_empty()).then(|| r.image_column.clone()));
            let tables: Vec<PathBuf> = std::iter::once(train_data.clone()).chain(tuning_data.clone()).collect();
            tokio::task::spawn_blocking(move || -> std::result::Result<(), Status> {
                for t in tables {
                    let table = crate::data::Table::load(&t, Some(&label), column.as_deref()).map_err(Status::from)?;
                    table.check_under(&root).map_err(|e| Status::permission_denied(e.to_string()))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| Status::internal(format!("table check: {e}")))??;
        }
        let mut b = crate::train::config::HyperParamsBuilder::new();
        for (k, v) in &r.hyperparameters {
            b = b.set_str(&format!("{k}={v}")).map_err(Status::from)?;
        }
        let (hp, _warnings) = b.build().map_err(Status::from)?;
        let (n, run_dir) = fresh_run_dir(&self.state.cfg.work_dir, &self.state.fits).map_err(Status::from)?;
        let current = self.state.current();
        let req = crate::train::TrainRequest {
            train_data,
            label: r.label.clone(),
            image_column: (!r.image_column.is_empty()).then(|| r.image_column.clone()),
            tuning_data,
            backbone,
            feature_tensor: None,
            normalization: current.preprocess.normalization.clone(),
            output: run_dir.clone(),
            hp,
            quiet: true,
            // Set when the caller goes away: training stops after the next epoch's checkpoint.
            cancel: Some(Arc::new(AtomicBool::new(false))),
            force: false,
        };
        let (tx, rx) = mpsc::channel(64);
        let job = fit_job::FitJob { req, run_dir, number: n, current, state: self.state.clone() };
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            job.run(tx)
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Loads the model for serving: an exported `.onnx` as is, a model folder exported (merged) into `work_dir`.
fn initial_model(cfg: &ServeConfig) -> Result<ServingModel> {
    let path = if cfg.model.is_dir() {
        let out = cfg.work_dir.join("served.onnx");
        let opts =
            ExportOptions { kind: ExportKind::Merged, opset: None, verify: false, verify_data: None, verify_images: 0 };
        crate::deploy::export::export(&cfg.model, &out, &opts)?;
        out
    } else {
        cfg.model.clone()
    };
    let version = format!("1-{}", &crate::util::fs::sha256_file(&path)?[..12]);
    let metrics_json = if cfg.model.is_dir() {
        std::fs::read_to_string(cfg.model.join("metrics.json")).unwrap_or_default()
    } else {
        String::new()
    };
    ServingModel::open(&path, cfg.engine, cfg.threads, cfg.num_gpus != 0, version, metrics_json)
}

/// Checks `authorization: Bearer <token>` in constant time (both sides hashed first, so length leaks nothing).
#[derive(Clone)]
pub struct AuthCheck {
    want: Option<[u8; 32]>,
}

fn digest(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

impl tonic::service::Interceptor for AuthCheck {
    fn call(&mut self, req: Request<()>) -> std::result::Result<Request<()>, Status> {
        use subtle::ConstantTimeEq;
        let Some(want) = &self.want else { return Ok(req) };
        let got =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match got {
            Some(t) if bool::from(digest(t.as_bytes()).ct_eq(want)) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
            None => Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata")),
        }
    }
}

/// Maps three of tonic's own answers onto the codes clients expect: "message too large" (OUT_OF_RANGE) is
/// RESOURCE_EXHAUSTED, the expiry of the client's `grpc-timeout` (CANCELLED "Timeout expired") is
/// DEADLINE_EXCEEDED, and a request that is not valid protobuf (INTERNAL, decoded by tonic before any
/// handler runs) is the caller's INVALID_ARGUMENT.
fn standard_codes(mut resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    let h = resp.headers();
    let msg = h.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("").replace("%20", " ");
    let code = match h.get("grpc-status").and_then(|v| v.to_str().ok()) {
        Some("11") if msg.contains("message length too large") => Some("8"),
        Some("1") if msg.contains("Timeout expired") => Some("4"),
        Some("13") if msg.contains("failed to decode Protobuf message") => Some("3"),
        _ => None,
    };
    if let Some(c) = code {
        resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static(c));
    }
    resp
}

/// A running server's handle (tests and the CLI use it).
pub struct Running {
    /// The gRPC address.
    pub addr: SocketAddr,
    /// The metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Shared state.
    pub state: Arc<State>,
}

/// Default [`ServeConfig::max_inflight_bytes`]: 1 GiB of decoded input.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 1 << 30;

/// How long a new connection may take to send its first bytes by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for open requests and connections by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keepalive: a ping this often on an idle connection, and the connection is closed when a ping
/// is not answered within [`KEEPALIVE_TIMEOUT`] (a peer that vanished without closing).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections are asked to reconnect after this long (GOAWAY), and dropped after a grace period, so
/// none stays open forever.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);

/// Shortest bearer token `serve` accepts (after trimming whitespace).
pub const MIN_TOKEN_LEN: usize = 16;

/// Refuses an empty or short token (an empty one would let in a client sending `Bearer ` with nothing)
/// and warns when a token would travel without TLS.
fn check_auth_config(cfg: &ServeConfig) -> Result<()> {
    let Some(token) = &cfg.auth_token else { return Ok(()) };
    let len = token.trim().chars().count();
    if len < MIN_TOKEN_LEN {
        return Err(Error::Server(format!(
            "--auth-token-file: the token has {len} characters; use at least {MIN_TOKEN_LEN} (for example 32 random \
             hex digits from `openssl rand -hex 16`)"
        )));
    }
    if cfg.tls.is_none() {
        tracing::warn!(
            "a bearer token is required but TLS is off: the token travels in plain text (add --tls-cert/--tls-key)"
        );
    }
    Ok(())
}

/// Runs the server until `shutdown` resolves, then drains the queue and returns. `ready` gets the
/// bound addresses once listening (binding `listen` with port 0 picks a free port).
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: Option<oneshot::Sender<Running>>,
) -> Result<()> {
    check_auth_config(&cfg)?;
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| Error::io(&cfg.work_dir, e))?;
    let model = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || initial_model(&cfg)).await.map_err(|e| Error::Server(e.to_string()))??
    };
    tracing::info!("serving {} (version {}, {} engine)", cfg.model.display(), model.version, model.model.engine);
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(State {
        current: RwLock::new(Arc::new(model)),
        batcher: std::sync::Mutex::new(Batcher::start(cfg.batch, metrics.clone())),
        metrics,
        cfg: cfg.clone(),
        fit_lock: Arc::new(tokio::sync::Mutex::new(())),
        fits: std::sync::atomic::AtomicU64::new(0),
        inflight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    });
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Server(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener.local_addr().map_err(|e| Error::Server(e.to_string()))?;
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let metrics_addr = match cfg.metrics_listen {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .map_err(|e| Error::Server(format!("cannot listen on {a}: {e}")))?;
            let maddr = l.local_addr().map_err(|e| Error::Server(e.to_string()))?;
            let st = state.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let st = st.clone();
                    async move { st.metrics.render(&st.current().version) }
                }),
            );
            let mut stop = stop_tx.subscribe();
            tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.recv().await;
                    })
                    .await;
            });
            Some(maddr)
        }
        None => None,
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("automm.v1.Inference", tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let auth = AuthCheck { want: cfg.auth_token.as_deref().map(|t| digest(t.as_bytes())) };
    let svc = tonic::service::interceptor::InterceptedService::new(
        InferenceServer::new(Service { state: state.clone() })
            .max_decoding_message_size(cfg.max_request_bytes)
            .max_encoding_message_size(64 << 20),
        auth,
    );
    // No Nagle (see `incoming` below): small responses must not wait for delayed ACKs (40 ms a call).
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &cfg.tls {
        let c = std::fs::read(cert).map_err(|e| Error::io(cert, e))?;
        let k = std::fs::read(key).map_err(|e| Error::io(key, e))?;
        let tls = tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(c, k));
        builder = builder.tls_config(tls).map_err(|e| Error::Server(format!("TLS: {e}")))?;
    }
    if let Some(tx) = ready {
        let _ = tx.send(Running { addr, metrics_addr, state: state.clone() });
    }
    // The builder's tcp_nodelay only covers sockets tonic accepts itself; set it on ours.
    let handshake = cfg.handshake_timeout;
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), move |s| {
        s.map(|s| {
            let _ = s.set_nodelay(true);
            conn::HandshakeDeadline::new(s, handshake)
        })
    });
    // On the signal, health turns NOT_SERVING (Watch streams see it) and the graceful period starts.
    let (fired_tx, fired_rx) = oneshot::channel::<()>();
    let notify = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        notify.set_service_status("automm.v1.Inference", tonic_health::ServingStatus::NotServing).await;
        notify.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let _ = fired_tx.send(());
    };
    let server = builder
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(cfg.shutdown_timeout)
        .layer(tower::util::MapResponseLayer::new(standard_codes))
        .add_service(health)
        .add_service(reflection)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown);
    // A connection that never finishes its handshake, ignores GOAWAY or holds a Watch stream would keep
    // a graceful shutdown waiting forever: after `shutdown_timeout` the rest is dropped.
    let result = tokio::select! {
        r = server => r,
        _ = async {
            let _ = fired_rx.await;
            tokio::time::sleep(cfg.shutdown_timeout).await;
        } => {
            tracing::warn!("connections still open {:?} after the shutdown signal; dropping them", cfg.shutdown_timeout);
            Ok(())
        }
    };
    // Requests already accepted have been answered; close the queue and let the worker drain it.
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    if let Ok(mut b) = state.batcher.lock() {
        b.shutdown();
    }
    let _ = stop_tx.send(());
    result.map_err(|e| Error::Server(format!("gRPC server: {e}")))
}
