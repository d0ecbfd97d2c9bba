//! Training: the table is read and split, then one loop ([`runner`]) trains the head over a feature
//! source ([`source`]): features computed once and reused every epoch (head-only, AutoMM re-runs the
//! backbone each epoch), or a backbone whose chosen initializers train with the head ([`finetune`]).
//! AdamW ([`optim`]) under the schedule ([`schedule`]) minimises focal loss or cross-entropy ([`loss`]);
//! the best epoch is kept and the run saved as a model folder with pictures ([`plots`]). After every
//! epoch the whole state is checkpointed ([`checkpoint`]), so [`resume`] continues an interrupted run,
//! head-only or fine-tuning, to the same final weights. Hyperparameter keys are parsed in [`config`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::{holdout_fraction, stratified_split, ClassList, ImageRef, Normalization, Table};
use crate::error::{Error, Result};
use crate::model::hparams::{HyperParams, ValMetric};
use crate::model::metrics::Report;
use crate::model::{Backbone, ModelConfig, ModelDir, VERSION};
use crate::onnx::read_model;
use crate::util::fs::write_atomic;
use checkpoint::{feature_key, Checkpoint, TrainState};
use config::HyperParamsBuilder;
use finetune::{select_trainable, TunedBackbone};
use runner::{FitContext, FitData};
use source::{CachedFeatures, TunedSource};

pub mod checkpoint;
pub mod config;
pub mod finetune;
pub mod loss;
pub mod optim;
pub mod plots;
pub mod runner;
pub mod schedule;
pub mod source;

/// What to train: data, backbone, hyperparameters and where to keep the run (saved as the checkpoint's
/// `run.json`, so a resumed run needs nothing but the folder).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRequest {
    /// Training table (CSV/Parquet).
    pub train_data: PathBuf,
    /// Label column.
    pub label: String,
    /// Image column (found automatically when None).
    pub image_column: Option<String>,
    /// Optional tuning (validation) table; else a stratified holdout of the training table.
    pub tuning_data: Option<PathBuf>,
    /// Backbone ONNX file.
    pub backbone: PathBuf,
    /// Feature tensor override.
    pub feature_tensor: Option<String>,
    /// Pixel normalisation for the backbone; None: what the backbone records
    /// ([`crate::model::normalization`]), else ImageNet's with a warning. [`train`] resolves it before
    /// saving `run.json`, so a resumed run keeps the same choice.
    pub normalization: Option<Normalization>,
    /// Output model folder.
    pub output: PathBuf,
    /// Hyperparameters.
    pub hp: HyperParams,
    /// Hide progress bars.
    #[serde(skip)]
    pub quiet: bool,
    /// When set (by another thread), training stops after the current epoch's checkpoint with
    /// [`Error::Cancelled`]; [`resume`] continues it.
    #[serde(skip)]
    pub cancel: Option<Arc<AtomicBool>>,
    /// Write into `output` even when it holds files that are not an automm run (`--force`).
    #[serde(skip)]
    pub force: bool,
}

/// Settings of [`resume`].
#[derive(Debug, Clone, Default)]
pub struct ResumeOptions {
    /// Hyperparameters to change on top of the saved ones (e.g. a lower learning rate after a divergence);
    /// the run is then no longer equivalent to an uninterrupted one, which is logged.
    pub overrides: HyperParamsBuilder,
    /// Hide progress bars.
    pub quiet: bool,
    /// See [`TrainRequest::cancel`].
    pub cancel: Option<Arc<AtomicBool>>,
}

/// One epoch's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss per batch.
    #[serde(deserialize_with = "f64_or_nan")]
    pub train_loss: f64,
    /// The validation metric (JSON `null` when undefined).
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_score: f64,
    /// Learning rate at the epoch's last step.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
}

/// serde_json writes NaN as `null`; read it back as NaN instead of failing.
fn f64_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Option::<f64>::deserialize(d).map(|o| o.unwrap_or(f64::NAN))
}

/// `metrics.json` of a model folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSummary {
    /// The epoch kept (1-based).
    pub best_epoch: usize,
    /// The validation metric.
    pub val_metric: ValMetric,
    /// Per-epoch history.
    pub history: Vec<EpochRecord>,
    /// Metrics of the kept head on the validation rows.
    pub validation: Report,
    /// Rows used for training and validation.
    pub num_train: usize,
    /// Validation rows.
    pub num_val: usize,
    /// Seconds spent computing features.
    pub feature_seconds: f64,
    /// Seconds spent training the head.
    pub train_seconds: f64,
    /// Where the validation rows came from.
    pub validation_source: String,
    /// Backbone initializers trained with the head (empty: frozen backbone).
    #[serde(default)]
    pub finetuned: Vec<String>,
    /// Seconds per epoch (training and validation).
    #[serde(default)]
    pub seconds_per_epoch: f64,
    /// The loss trained with (`auto` resolved).
    #[serde(default)]
    pub loss: Option<crate::model::hparams::LossKind>,
    /// Why that loss (e.g. the imbalance that chose it).
    #[serde(default)]
    pub loss_reason: String,
    /// Training rows per class, in class order.
    #[serde(default)]
    pub train_counts: Vec<usize>,
}

crate::named_enum! {
    /// A stage of a training run, as progress events and gRPC `Fit` streams name it.
    pub enum Phase("phase") {
        /// Computing backbone features (or the frozen prefix of a tuned backbone).
        Features = "features",
        /// Reusing the features a checkpoint cached.
        FeaturesCached = "features (cached)",
        /// Training the head on cached features.
        Train = "train",
        /// Training the head with part of the backbone.
        FineTune = "fine-tune",
        /// Writing the model folder.
        Save = "save",
    }
}

/// Progress events (for the CLI and gRPC `Fit` streaming).
#[derive(Debug, Clone)]
pub enum Event {
    /// A phase starts.
    Phase(Phase),
    /// An epoch ended.
    Epoch(EpochRecord),
}

/// Trains a head as `req` says and writes the model folder; `on_event` sees phases and epochs. An
/// unfinished run already in the output folder is discarded (use [`resume`] to continue it); a folder
/// holding anything else is refused unless `req.force`. A run that fails before its first checkpoint
/// leaves nothing behind (one that fails later keeps the checkpoint that `--resume` continues from).
pub fn train(req: &TrainRequest, on_event: impl FnMut(&Event)) -> Result<TrainSummary> {
    let created = !req.output.exists();
    if !req.force {
        check_output(&req.output)?;
    }
    let ck = Checkpoint::in_output(&req.output);
    if ck.root.exists() {
        tracing::warn!(
            "{} holds an unfinished run; starting over (`automm train --resume` continues one)",
            req.output.display()
        );
    }
    ck.clear()?;
    let normalization = Some(crate::model::normalization::choose(&req.backbone, req.normalization.as_ref())?);
    let req = &TrainRequest { normalization, ..req.clone() };
    ck.write_run(req)?;
    let result = run(req, &ck, None, on_event);
    if result.is_err() && !ck.state_file().exists() {
        // Nothing to resume: take back what this run wrote.
        let _ = ck.clear();
        if created {
            let _ = std::fs::remove_dir(&req.output);
        }
    }
    result
}

/// `output` may be written when it is missing, empty, or an automm run (a model folder or a checkpoint).
fn check_output(output: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(output) else {
        return match output.exists() {
            true => Err(Error::Model { path: output.to_path_buf(), msg: "is not a folder".into() }),
            false => Ok(()),
        };
    };
    let names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    let dir = ModelDir::new(output);
    if names.is_empty() || dir.read_config().is_ok() || Checkpoint::in_output(output).run_file().is_file() {
        return Ok(());
    }
    let mut shown = names;
    shown.sort();
    shown.truncate(3);
    Err(Error::Model {
        path: output.to_path_buf(),
        msg: format!(
            "is not empty and is not an automm run (it holds {}); train into a new or empty folder, or pass \
             --force to write into it anyway",
            shown.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// Continues the interrupted run in model folder `output` from its last checkpoint. With no overrides
/// the final head is the one an uninterrupted run with the same seed would have produced.
pub fn resume(output: &Path, opts: &ResumeOptions, on_event: impl FnMut(&Event)) -> Result<TrainSummary> {
    let ck = Checkpoint::in_output(output);
    let mut req = ck.read_run()?;
    req.output = output.to_path_buf();
    req.quiet = opts.quiet;
    req.cancel = opts.cancel.clone();
    let (hp, warnings) = opts.overrides.build_on(req.hp.clone())?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    if hp != req.hp {
        tracing::warn!("resuming with changed hyperparameters: the result will differ from an uninterrupted run");
        req.hp = hp;
        ck.write_run(&req)?;
    }
    ck.sweep_temp_files();
    let state = ck.read_state(&crate::util::device::select_device(req.hp.num_gpus))?;
    match &state {
        Some(s) => tracing::info!("resuming {} after epoch {}", output.display(), s.progress.epoch),
        None => tracing::info!("resuming {}: no epoch had finished, training from the start", output.display()),
    }
    run(&req, &ck, state, on_event)
}

/// The rows a run trains and validates on, with their classes.
struct Rows {
    classes: ClassList,
    image_column: String,
    train: Vec<ImageRef>,
    train_targets: Vec<u32>,
    val: Vec<ImageRef>,
    val_targets: Vec<u32>,
    /// Where the validation rows came from, in words.
    val_source: String,
    alpha: Option<Vec<f64>>,
    /// Training rows per class.
    counts: Vec<usize>,
}

impl Rows {
    /// The evaluation targets: the validation rows', or the training rows' when there are none.
    fn eval_targets(&self) -> &[u32] {
        if self.val.is_empty() {
            &self.train_targets
        } else {
            &self.val_targets
        }
    }
}

/// Reads the tables, finds the classes and splits off the validation rows (`--tuning-data`, else a
/// stratified holdout by AutoGluon's rule).
fn rows(req: &TrainRequest) -> Result<Rows> {
    let table = Table::load(&req.train_data, Some(&req.label), req.image_column.as_deref())?;
    table.check_files()?;
    let classes = ClassList::from_table(&table)?;
    if classes.len() < 2 {
        return Err(Error::Table {
            path: req.train_data.clone(),
            msg: format!("only one class ({:?}); classification needs at least two", classes.names),
        });
    }
    let targets = table.targets(&classes)?;
    let (train, train_targets, val, val_targets, val_source) = match &req.tuning_data {
        Some(p) => {
            // An explicit --image-column must exist in both tables; otherwise the training table's column is tried first.
            let t = match &req.image_column {
                Some(c) => Table::load(p, Some(&req.label), Some(c))?,
                None => Table::load_with_hint(p, Some(&req.label), &table.image_column)?,
            };
            t.check_files()?;
            let vt = t.targets(&classes)?;
            table.check_distinct_images(Some(&t))?;
            (table.all_image_refs(), targets, t.all_image_refs(), vt, format!("tuning data {}", p.display()))
        }
        None => {
            table.check_distinct_images(None)?;
            let frac = holdout_fraction(table.rows.len());
            let (tr, va) = stratified_split(&targets, classes.len(), frac, req.hp.seed);
            let pick = |idx: &[usize]| idx.iter().map(|&i| targets[i]).collect::<Vec<_>>();
            let why = format!("stratified holdout of {:.1}% of the training table", frac * 100.0);
            (table.image_refs(&tr), pick(&tr), table.image_refs(&va), pick(&va), why)
        }
    };
    let counts = classes.counts(&train_targets);
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        return Err(Error::Table {
            path: req.train_data.clone(),
            msg: format!("class `{}` has no training rows after the split", classes.names[c]),
        });
    }
    let alpha = loss::resolve_alpha(&req.hp.focal_alpha, &classes.names, &counts)?;
    let image_column = table.image_column.clone();
    Ok(Rows { classes, image_column, train, train_targets, val, val_targets, val_source, alpha, counts })
}

/// `hp` with the loss resolved from the training counts (`auto` by the imbalance) and the reason
/// recorded; logged once.
fn resolved_loss(hp: &HyperParams, rows: &Rows) -> HyperParams {
    let (kind, why) = loss::resolve_loss(hp.loss_function, &rows.counts);
    let counts: Vec<String> = rows.classes.names.iter().zip(&rows.counts).map(|(c, n)| format!("{c} {n}")).collect();
    tracing::info!("loss: {kind} ({why}); training rows per class: {}", counts.join(", "));
    let mut hp = hp.clone();
    hp.loss_function = kind;
    hp.loss_reason = Some(why);
    for w in hp.ignored_settings() {
        tracing::warn!("{w}");
    }
    hp
}

fn run(
    req: &TrainRequest,
    ck: &Checkpoint,
    state: Option<TrainState>,
    mut on_event: impl FnMut(&Event),
) -> Result<TrainSummary> {
    let rows = rows(req)?;
    let hp = &resolved_loss(&req.hp, &rows);
    let device = crate::util::device::select_device(hp.num_gpus);
    let normalization = req.normalization.clone().unwrap_or_else(Normalization::imagenet);
    on_event(&Event::Phase(Phase::Features));
    let backbone = Backbone::load(&req.backbone, &device, req.feature_tensor.as_deref(), normalization)?;
    let t0 = Instant::now();
    let log_prior = loss::log_prior(&rows.counts)?;
    let data = FitData {
        targets: &rows.train_targets,
        eval_targets: rows.eval_targets(),
        classes: &rows.classes.names,
        hp,
        alpha: rows.alpha.as_deref(),
        log_prior: Some(&log_prior),
    };
    let ctx = FitContext { quiet: req.quiet, checkpoint: Some(ck), resume: state, cancel: req.cancel.as_deref() };
    let run = Setup { req, backbone: &backbone, rows: &rows, device: &device };
    let (fit, feature_seconds) = if hp.finetunes_backbone() {
        run.fit_tuned(&data, ctx, &mut on_event)?
    } else {
        run.fit_cached(&data, ctx, ck, &mut on_event)?
    };
    let train_seconds = t0.elapsed().as_secs_f64() - feature_seconds;
    on_event(&Event::Phase(Phase::Save));
    let summary = save(req, hp, &rows, &backbone, fit, feature_seconds, train_seconds)?;
    // The model is complete: the checkpoint (and its feature cache) has served its purpose.
    ck.clear()?;
    Ok(summary)
}

/// What both kinds of run start from: the request, the loaded backbone, the split rows, the device.
struct Setup<'a> {
    req: &'a TrainRequest,
    backbone: &'a Backbone,
    rows: &'a Rows,
    device: &'a Device,
}

impl Setup<'_> {
    /// Head-only: features once (or from the checkpoint's cache), then the loop over them. Returns the
    /// fit and the seconds spent on features.
    fn fit_cached(
        &self,
        data: &FitData<'_>,
        ctx: FitContext<'_>,
        ck: &Checkpoint,
        on_event: &mut impl FnMut(&Event),
    ) -> Result<(runner::Fit, f64)> {
        let (backbone, rows, quiet) = (self.backbone, self.rows, self.req.quiet);
        let t0 = Instant::now();
        let key = feature_key(&backbone.info, &backbone.preprocess, &rows.train, &rows.val)?;
        let (x_train, x_val) = match ck.read_features(&key, self.device)? {
            Some(cached) => {
                tracing::info!("reusing the features cached in {}", ck.features_file().display());
                on_event(&Event::Phase(Phase::FeaturesCached));
                cached
            }
            None => {
                // Batch 8: Swin-Tiny at 16 peaks above 5 GB of intermediates on CPU.
                let x_train = backbone.features_of_files(&rows.train, 8, "features", quiet)?;
                let x_val = backbone.features_of_files(&rows.val, 8, "val features", quiet)?;
                ck.write_features(&key, &x_train, &x_val)?;
                (x_train, x_val)
            }
        };
        let feature_seconds = t0.elapsed().as_secs_f64();
        on_event(&Event::Phase(Phase::Train));
        let source = CachedFeatures::new(x_train, (!rows.val.is_empty()).then_some(x_val))?;
        Ok((runner::fit(&source, data, ctx, on_event)?, feature_seconds))
    }

    /// Fine-tuning: the chosen initializers become trainable, the frozen prefix is cached, then the loop.
    fn fit_tuned(
        &self,
        data: &FitData<'_>,
        ctx: FitContext<'_>,
        on_event: &mut impl FnMut(&Event),
    ) -> Result<(runner::Fit, f64)> {
        let (req, backbone, hp) = (self.req, self.backbone, &self.req.hp);
        let t0 = Instant::now();
        on_event(&Event::Phase(Phase::FineTune));
        let model = read_model(&req.backbone)?;
        let trainable = select_trainable(backbone.graph(), hp);
        let count: usize =
            trainable.iter().filter_map(|n| backbone.graph().initializer(n)).map(|t| t.elem_count()).sum();
        tracing::info!(
            "{}: {} backbone initializers ({count} values) train with the head, learning rate {}",
            hp.backbone_mode(),
            trainable.len(),
            hp.learning_rate
        );
        let tb = TunedBackbone::new(
            &model,
            &req.backbone.display().to_string(),
            self.device,
            &backbone.info.input_name,
            &backbone.info.feature_tensor,
            &trainable,
            backbone.preprocess.size as usize,
        )?;
        let (pre, rows) = (&backbone.preprocess, self.rows);
        let source = TunedSource::new(&tb, pre, &rows.train, &rows.val, &hp.train_transforms, hp.seed, req.quiet)?;
        let feature_seconds = t0.elapsed().as_secs_f64();
        Ok((runner::fit(&source, data, ctx, on_event)?, feature_seconds))
    }
}

/// Writes the model folder (head, tuned initializers, config, metrics, pictures) and returns the summary.
fn save(
    req: &TrainRequest,
    hp: &HyperParams,
    rows: &Rows,
    backbone: &Backbone,
    fit: runner::Fit,
    feature_seconds: f64,
    train_seconds: f64,
) -> Result<TrainSummary> {
    let dir = ModelDir::new(&req.output);
    std::fs::create_dir_all(&req.output).map_err(|e| Error::io(&req.output, e))?;
    fit.head.save(&dir.head())?;
    if !fit.backbone.is_empty() {
        dir.write_backbone_update(&fit.backbone)?;
    }
    let config = ModelConfig {
        automm_version: VERSION.to_string(),
        classes: rows.classes.names.clone(),
        hyperparameters: hp.clone(),
        alpha: rows.alpha.clone(),
        preprocess: backbone.preprocess.clone(),
        backbone: backbone.info.clone(),
        label_column: req.label.clone(),
        image_column: rows.image_column.clone(),
        train_data: std::fs::canonicalize(&req.train_data).unwrap_or_else(|_| req.train_data.clone()),
        finetuned: fit.backbone.iter().map(|(n, _)| n.clone()).collect(),
        class_counts: rows.counts.clone(),
    };
    dir.write_config(&config)?;
    let epochs = fit.history.len().max(1);
    let summary = TrainSummary {
        best_epoch: fit.best_epoch,
        val_metric: hp.val_metric,
        history: fit.history,
        validation: fit.report,
        num_train: rows.train.len(),
        num_val: rows.val.len(),
        feature_seconds,
        train_seconds,
        validation_source: rows.val_source.clone(),
        finetuned: config.finetuned,
        seconds_per_epoch: train_seconds / epochs as f64,
        loss: Some(hp.loss_function),
        loss_reason: hp.loss_reason.clone().unwrap_or_default(),
        train_counts: rows.counts.clone(),
    };
    write_atomic(&dir.metrics(), &crate::util::fs::to_json(&summary, "metrics.json")?)?;
    let losses: Vec<f64> = summary.history.iter().map(|h| h.train_loss).collect();
    let scores: Vec<f64> = summary.history.iter().map(|h| h.val_score).collect();
    let curve = req.output.join("training_curve.svg");
    plots::curve_svg(&losses, &scores, summary.val_metric.name(), summary.best_epoch, &curve)?;
    let split = format!("validation rows: {}", summary.validation_source);
    plots::confusion_svg(&summary.validation, &split, &req.output.join("confusion_matrix.svg"))?;
    Ok(summary)
}
