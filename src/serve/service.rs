//! The `automm.v1.Inference` RPCs, thin over the shared [`State`]: Predict (budget, decode, batch, reply),
//! GetModel and Fit (checked, then handed to the Fit job), with the per-request guards they need.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::proto::inference_server::Inference;
use crate::proto::{FitEvent, FitRequest, GetModelRequest, ModelInfo, PredictRequest, PredictResponse, Prediction};

use super::*;

/// A request's share of [`ServeConfig::max_inflight_bytes`], given back when the request ends.
pub(super) struct Reserved(Arc<std::sync::atomic::AtomicUsize>, usize);

impl Drop for Reserved {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, SeqCst);
    }
}

impl Service {
    /// Reserves the decoded size of `items` images of side `s`, or RESOURCE_EXHAUSTED when the requests
    /// in flight already hold too much (known before decoding: every item becomes `3 * s * s` floats).
    pub(super) fn reserve(&self, items: usize, s: usize) -> std::result::Result<Reserved, Status> {
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
pub(super) struct CancelOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct Service {
    pub(super) state: Arc<State>,
}

/// Parses the `grpc-timeout` header (`<at most 8 digits><H|M|S|m|u|n>`, as the gRPC spec bounds it).
pub(super) fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
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
    /// Decodes `req` within `budget` (off the async runtime; the budget's cancel flag stops it when the
    /// caller leaves), queues it on the batcher under `model` at priority `level`, and waits for its scores.
    pub(super) async fn infer(
        &self,
        model: &Arc<ServingModel>,
        req: PredictRequest,
        budget: request::Budget,
        level: u32,
    ) -> std::result::Result<crate::deploy::engine::exported::Scores, Status> {
        let (s, pp, deadline) = (model.input_size, model.preprocess.clone(), budget.deadline);
        let metrics = self.state.metrics.clone();
        // Tensor checks are cheap; decoding is CPU work: both off the async runtime, images in parallel.
        let (data, n) = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let r = request::prepare(req, s, &pp, &budget);
            metrics.decode_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics.decode_ns.fetch_add(t0.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
            r
        })
        .await
        .map_err(|e| Status::internal(format!("decoding task failed: {e}")))??;
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(Status::deadline_exceeded("the deadline passed before the request was queued"));
        }
        let (tx, rx) = oneshot::channel();
        let job = Job { model: model.clone(), data, n, level, enqueued: Instant::now(), deadline, reply: tx };
        self.state.submit(job)?;
        match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx)
                .await
                .map_err(|_| Status::deadline_exceeded("deadline exceeded"))?,
            None => rx.await,
        }
        .map_err(|_| Status::internal("the batcher dropped the request"))?
    }

    async fn predict_inner(
        &self,
        req: Request<PredictRequest>,
    ) -> std::result::Result<Response<PredictResponse>, Status> {
        let deadline = grpc_timeout(&req).and_then(|d| Instant::now().checked_add(d));
        let model = self.state.current();
        let req = req.into_inner();
        let s = model.input_size;
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
        let level = self.state.cfg.batch.level(None);
        let probs = self.infer(&model, req, budget, level).await?.probabilities;
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

/// An inference call in flight: counted as pending while it lives, and its outcome and duration
/// recorded when dropped (a call abandoned mid-way, client gone or deadline, counts as CANCELLED).
pub(super) struct Outcome<'a> {
    metrics: &'a Metrics,
    failed: Option<tonic::Code>,
    started: Instant,
}

impl<'a> Outcome<'a> {
    pub(super) fn start(metrics: &'a Metrics) -> Self {
        metrics.pending.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Outcome { metrics, failed: Some(tonic::Code::Cancelled), started: Instant::now() }
    }

    /// Records how the call ended and passes its result on.
    pub(super) fn finish<T>(&mut self, r: std::result::Result<T, Status>) -> std::result::Result<T, Status> {
        self.failed = r.as_ref().err().map(|s| s.code());
        r
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        self.metrics.pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.record_request(self.failed, self.started.elapsed());
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
        let mut outcome = Outcome::start(&self.state.metrics);
        let r = self.predict_inner(req).await;
        outcome.finish(r)
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
            normalization: Some(current.preprocess.normalization.clone()),
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
