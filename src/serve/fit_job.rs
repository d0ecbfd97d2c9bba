//! A gRPC `Fit` run: trains on the server's backbone (the only part of `serve` that calls `train`),
//! streams phases and epochs to the caller, exports and verifies the result, and hot-swaps it in. The
//! caller going away sets the run's cancel flag, so training stops after the next epoch's checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;

use super::{ServingModel, State};
use crate::deploy::export::ExportOptions;
use crate::error::{Error, Result};
use crate::proto::{fit_event, EpochEvent, FitEvent, FitResult};
use crate::train::{Event, TrainRequest};

/// Phases a Fit adds after training, as streamed.
const EXPORT: &str = "export";
const SWAP: &str = "swap";

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

/// One accepted Fit request.
pub(super) struct FitJob {
    pub req: TrainRequest,
    pub run_dir: PathBuf,
    pub number: u64,
    pub current: Arc<ServingModel>,
    pub state: Arc<State>,
}

type Sender = mpsc::Sender<std::result::Result<FitEvent, Status>>;

impl FitJob {
    /// Runs to the end (blocking), sending events and then the result or the error.
    pub fn run(self, tx: Sender) {
        let cancel = self.req.cancel.clone().unwrap_or_default();
        let send = |e: fit_event::Event| {
            if tx.blocking_send(Ok(FitEvent { event: Some(e) })).is_err() && !cancel.swap(true, SeqCst) {
                tracing::warn!("Fit caller disconnected; stopping the run after the current epoch");
            }
        };
        match self.train_export_swap(&send) {
            Ok(res) => {
                self.state.metrics.fit_success.fetch_add(1, Relaxed);
                send(fit_event::Event::Result(res));
            }
            Err(e) => {
                self.state.metrics.fit_failure.fetch_add(1, Relaxed);
                // A run that left nothing to resume leaves no empty folder either.
                let _ = std::fs::remove_dir(&self.run_dir);
                let _ = tx.blocking_send(Err(Status::from(e)));
            }
        }
    }

    fn train_export_swap(&self, send: &dyn Fn(fit_event::Event)) -> Result<FitResult> {
        let metric = self.req.hp.val_metric.name();
        let summary = crate::train::train(&self.req, |ev| match ev {
            Event::Phase(p) => send(fit_event::Event::Phase(p.name().into())),
            Event::Epoch(e) => send(fit_event::Event::Epoch(EpochEvent {
                epoch: e.epoch as i32,
                train_loss: e.train_loss,
                val_score: e.val_score,
                val_metric: metric.into(),
            })),
        })?;
        send(fit_event::Event::Phase(EXPORT.into()));
        let onnx = self.run_dir.join("model.onnx");
        let opts = ExportOptions { verify: true, verify_images: 8, ..ExportOptions::merged() };
        let report = crate::deploy::export::export(&self.run_dir, &onnx, &opts)?;
        send(fit_event::Event::Phase(SWAP.into()));
        let version = format!("fit-{}-{}", self.number, &crate::util::fs::sha256_file(&onnx)?[..12]);
        let metrics_json = serde_json::to_string(&summary.validation.scores).unwrap_or_default();
        let cfg = &self.state.cfg;
        let engine = Some(self.current.model.engine);
        let new =
            ServingModel::open(&report.path, engine, cfg.threads, cfg.num_gpus != 0, version.clone(), metrics_json)?;
        self.state.swap(new);
        Ok(FitResult {
            model_version: version,
            metrics: summary.validation.scores.iter().map(|(m, v)| (m.name().to_string(), *v)).collect(),
            best_epoch: summary.best_epoch as i32,
        })
    }
}
