//! The gRPC server (`automm serve`): the `automm.v1.Inference` service as thin RPCs (`service`) over
//! shared state in an `Arc` (the served model behind a lock for hot swaps, the dynamic batcher in
//! [`batcher`], request decoding and budgets in [`request`], metrics in [`prometheus`]; a Fit runs in
//! `fit_job`, the only part that calls training), plus grpc.health.v1, server reflection, optional TLS,
//! bearer-token auth (`auth`), connection deadlines (`conn`) and a Prometheus metrics endpoint.

mod auth;
pub mod batcher;
mod conn;
mod fit_job;
pub mod prometheus;
pub mod request;
mod service;
pub mod v2;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::Status;

pub use self::auth::MIN_TOKEN_LEN;
use self::auth::{check_auth_config, digest, AuthCheck};
use self::batcher::{BatchConfig, Batcher, Job};
pub use self::fit_job::fresh_run_dir;
use self::prometheus::Metrics;
pub use self::service::Service;
use crate::data::Preprocess;
use crate::deploy::engine::exported::ExportedModel;
use crate::deploy::engine::EngineKind;
use crate::deploy::export::ExportOptions;
use crate::deploy::meta::ExportKind;
use crate::error::{Error, Result};
use crate::inference_proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::inference_server::InferenceServer;

/// The KServe v2 / Triton service name, for health checks.
pub const V2_SERVICE: &str = "inference.GRPCInferenceService";

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
    /// The model's name on the KServe v2 / Triton protocol (None: the model file's stem).
    pub model_name: Option<String>,
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
            model_name: None,
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
    /// Set when shutdown began: v2 ServerReady/ModelReady answer false while the queue drains.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl State {
    /// The model's name on the v2 protocol: `--model-name`, else the model file's (or folder's) stem.
    pub fn model_name(&self) -> String {
        self.cfg.model_name.clone().unwrap_or_else(|| {
            self.cfg.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
        })
    }

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

/// Loads the model for serving: an exported `.onnx` as is, a model folder exported (merged) into `work_dir`.
fn initial_model(cfg: &ServeConfig) -> Result<ServingModel> {
    let path = if cfg.model.is_dir() {
        let out = cfg.work_dir.join("served.onnx");
        let opts = ExportOptions::merged();
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

/// Serves Prometheus text at `GET /metrics` on `addr` until `stop` fires; returns the bound address.
async fn metrics_endpoint(
    addr: SocketAddr,
    state: Arc<State>,
    mut stop: tokio::sync::broadcast::Receiver<()>,
) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Server(format!("cannot listen on {addr}: {e}")))?;
    let bound = l.local_addr().map_err(|e| Error::Server(e.to_string()))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let st = state.clone();
            async move { st.metrics.render(&st.model_name(), &st.current().version) }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move {
                let _ = stop.recv().await;
            })
            .await;
    });
    Ok(bound)
}

impl State {
    /// The shared state of a server starting with `model`.
    fn new(model: ServingModel, cfg: &ServeConfig) -> Arc<State> {
        let metrics = Arc::new(Metrics::default());
        Arc::new(State {
            current: RwLock::new(Arc::new(model)),
            batcher: std::sync::Mutex::new(Batcher::start(cfg.batch.clone(), metrics.clone())),
            metrics,
            cfg: cfg.clone(),
            fit_lock: Arc::new(tokio::sync::Mutex::new(())),
            fits: std::sync::atomic::AtomicU64::new(0),
            inflight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// Runs the server until `shutdown` resolves, then drains the queue and returns. `ready` gets the
/// bound addresses once listening (binding `listen` with port 0 picks a free port).
pub async fn serve(
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: Option<oneshot::Sender<Running>>,
) -> Result<()> {
    check_auth_config(&cfg)?;
    cfg.batch.check()?;
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| Error::io(&cfg.work_dir, e))?;
    let model = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || initial_model(&cfg)).await.map_err(|e| Error::Server(e.to_string()))??
    };
    tracing::info!("serving {} (version {}, {} engine)", cfg.model.display(), model.version, model.model.engine);
    let state = State::new(model, &cfg);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Server(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = listener.local_addr().map_err(|e| Error::Server(e.to_string()))?;
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let metrics_addr = match cfg.metrics_listen {
        Some(a) => Some(metrics_endpoint(a, state.clone(), stop_tx.subscribe()).await?),
        None => None,
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("automm.v1.Inference", tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status(V2_SERVICE, tonic_health::ServingStatus::Serving).await;
    reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    // Both reflection versions: grpcurl before 1.8.8 (PyPI's is 1.8.6) and older grpcui/evans speak only v1alpha.
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = described().build_v1().map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let reflection_alpha = described().build_v1alpha().map_err(|e| Error::Server(format!("reflection: {e}")))?;
    let auth = AuthCheck { want: cfg.auth_token.as_deref().map(|t| digest(t.as_bytes())) };
    let svc = tonic::service::interceptor::InterceptedService::new(
        InferenceServer::new(Service { state: state.clone() })
            .max_decoding_message_size(cfg.max_request_bytes)
            .max_encoding_message_size(64 << 20),
        auth.clone(),
    );
    // The same RPCs' v2 face, behind the same auth and size limits.
    let v2 = tonic::service::interceptor::InterceptedService::new(
        GrpcInferenceServiceServer::new(v2::V2 { inner: Service { state: state.clone() } })
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
    let stopping = state.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        notify.set_service_status("automm.v1.Inference", tonic_health::ServingStatus::NotServing).await;
        notify.set_service_status(V2_SERVICE, tonic_health::ServingStatus::NotServing).await;
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
        .add_service(reflection_alpha)
        .add_service(svc)
        .add_service(v2)
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
