//! Training a linear head on frozen backbone features: the table is read and split, every image's
//! features are computed once and reused every epoch (AutoMM re-runs the backbone each epoch), then a
//! head is trained with AdamW under the learning-rate schedule, validated every epoch, the best epoch
//! kept, and the run saved as a model folder. After every epoch the whole training state is checkpointed
//! ([`crate::checkpoint`]) so that [`resume`] continues an interrupted run to the same final weights.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backbone::{progress, Backbone};
use crate::checkpoint::{feature_key, Best, Checkpoint, Progress, TrainState};
use crate::config::{HyperParams, HyperParamsBuilder, LossKind};
use crate::data::{holdout_fraction, stratified_split, ClassList, Normalization, Table};
use crate::error::{Error, Result};
use crate::finetune::{self, select_trainable, Split, TunedBackbone};
use crate::loss::{cross_entropy, focal_loss, Reduction};
use crate::metrics::{self, Report};
use crate::model::{write_atomic, Head, ModelConfig, ModelDir, VERSION};
use crate::onnx::read_model;
use crate::optim::{AdamW, AdamWConfig};

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
    /// Pixel normalisation for the backbone.
    pub normalization: Normalization,
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
    /// Name of the validation metric.
    pub val_metric: String,
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
}

/// Progress events (for the CLI and, later, gRPC `Fit` streaming).
#[derive(Debug, Clone)]
pub enum Event {
    /// A phase starts (`features`, `train`, `save`).
    Phase(String),
    /// An epoch ended.
    Epoch(EpochRecord),
}

/// The device for `env.num_gpus`: CUDA 0 when asked for and available, CPU otherwise (logged).
pub fn select_device(num_gpus: i64) -> Device {
    if num_gpus == 0 {
        return Device::Cpu;
    }
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!("env.num_gpus={num_gpus} but CUDA is not usable ({e}); training on CPU"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if num_gpus > 0 {
        tracing::warn!("env.num_gpus={num_gpus} but this automm was built without `--features cuda`; training on CPU");
    }
    Device::Cpu
}

/// Whether candle's CUDA backend is usable here, in words.
pub fn cuda_status() -> String {
    #[cfg(feature = "cuda")]
    {
        match Device::new_cuda(0) {
            Ok(_) => "available (device 0)".into(),
            Err(e) => format!("compiled in but not usable: {e}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        "not compiled in (build with --features cuda)".into()
    }
}

/// Trains a head as `req` says and writes the model folder; `on_event` sees phases and epochs. An
/// unfinished run already in the output folder is discarded (use [`resume`] to continue it).
pub fn train(req: &TrainRequest, on_event: impl FnMut(&Event)) -> Result<TrainSummary> {
    let ck = Checkpoint::in_output(&req.output);
    if ck.root.exists() {
        tracing::warn!(
            "{} holds an unfinished run; starting over (`automm train --resume` continues one)",
            req.output.display()
        );
    }
    ck.clear()?;
    ck.write_run(req)?;
    run(req, &ck, None, on_event)
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
    let state = ck.read_state(&select_device(req.hp.num_gpus))?;
    match &state {
        Some(s) => tracing::info!("resuming {} after epoch {}", output.display(), s.progress.epoch),
        None => tracing::info!("resuming {}: no epoch had finished, training from the start", output.display()),
    }
    run(&req, &ck, state, on_event)
}

fn run(
    req: &TrainRequest,
    ck: &Checkpoint,
    state: Option<TrainState>,
    mut on_event: impl FnMut(&Event),
) -> Result<TrainSummary> {
    let hp = &req.hp;
    let device = select_device(hp.num_gpus);
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
    let (train_rows, val_rows, val_targets, val_source, val_table) = match &req.tuning_data {
        Some(p) => {
            // An explicit --image-column must exist in both tables; otherwise the training table's column is tried first.
            let t = match &req.image_column {
                Some(c) => Table::load(p, Some(&req.label), Some(c))?,
                None => Table::load_with_hint(p, Some(&req.label), &table.image_column)?,
            };
            t.check_files()?;
            let vt = t.targets(&classes)?;
            (
                (0..table.rows.len()).collect::<Vec<_>>(),
                (0..t.rows.len()).collect::<Vec<_>>(),
                vt,
                format!("tuning data {}", p.display()),
                Some(t),
            )
        }
        None => {
            let frac = holdout_fraction(table.rows.len());
            let (tr, va) = stratified_split(&targets, classes.len(), frac, hp.seed);
            let vt = va.iter().map(|&i| targets[i]).collect();
            (tr, va, vt, format!("stratified holdout of {:.1}% of the training table", frac * 100.0), None)
        }
    };
    let train_targets: Vec<u32> = train_rows.iter().map(|&i| targets[i]).collect();
    let counts = classes.counts(&train_targets);
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        return Err(Error::Table {
            path: req.train_data.clone(),
            msg: format!("class `{}` has no training rows after the split", classes.names[c]),
        });
    }
    let alpha = hp.resolve_alpha(&classes.names, &counts)?;

    on_event(&Event::Phase("features".into()));
    let backbone = Backbone::load(&req.backbone, &device, req.feature_tensor.as_deref(), req.normalization.clone())?;
    let t0 = Instant::now();
    let files = |t: &Table, rows: &[usize]| {
        rows.iter().map(|&i| (t.rows[i].image.clone(), Some(t.rows[i].row))).collect::<Vec<_>>()
    };
    // Batch 8: Swin-Tiny at 16 peaks above 5 GB of intermediates on CPU.
    let fb = 8;
    let train_files = files(&table, &train_rows);
    let val_files = files(val_table.as_ref().unwrap_or(&table), &val_rows);
    // Fine-tuning runs the backbone every epoch; head-only training computes features once.
    let (head, best_epoch, history, report, feature_seconds, train_seconds, update) = if hp.finetunes_backbone() {
        on_event(&Event::Phase("fine-tune".into()));
        let model = read_model(&req.backbone)?;
        let trainable = select_trainable(backbone.graph(), hp.efficient_finetune, &hp.trainable_layers);
        let count: usize =
            trainable.iter().filter_map(|n| backbone.graph().initializer(n)).map(|t| t.elem_count()).sum();
        tracing::info!("fine-tuning {} backbone initializers ({count} values) with the head", trainable.len());
        let tb = TunedBackbone::new(
            &model,
            &req.backbone.display().to_string(),
            &device,
            &backbone.info.input_name,
            &backbone.info.feature_tensor,
            &trainable,
            backbone.preprocess.size as usize,
        )?;
        let fit = finetune::fit(
            &tb,
            &backbone.preprocess,
            Split { files: &train_files, targets: &train_targets },
            Split { files: &val_files, targets: &val_targets },
            &classes.names,
            hp,
            alpha.as_deref(),
            req.quiet,
            req.cancel.as_deref(),
            &mut on_event,
        )?;
        let total = t0.elapsed().as_secs_f64();
        (
            fit.head,
            fit.best_epoch,
            fit.history,
            fit.report,
            fit.prefix_seconds,
            total - fit.prefix_seconds,
            fit.backbone,
        )
    } else {
        let key = feature_key(&backbone.info, &backbone.preprocess, &train_files, &val_files)?;
        let (x_train, x_val) = match ck.read_features(&key, &device)? {
            Some(cached) => {
                tracing::info!("reusing the features cached in {}", ck.features_file().display());
                on_event(&Event::Phase("features (cached)".into()));
                cached
            }
            None => {
                let x_train = backbone.features_of_files(&train_files, fb, "features", req.quiet)?;
                let x_val = backbone.features_of_files(&val_files, fb, "val features", req.quiet)?;
                ck.write_features(&key, &x_train, &x_val)?;
                (x_train, x_val)
            }
        };
        let feature_seconds = t0.elapsed().as_secs_f64();
        on_event(&Event::Phase("train".into()));
        let t1 = Instant::now();
        let fit = fit_head(
            &x_train,
            &train_targets,
            &x_val,
            &val_targets,
            &classes.names,
            hp,
            alpha.as_deref(),
            FitContext { quiet: req.quiet, checkpoint: Some(ck), resume: state, cancel: req.cancel.as_deref() },
            &mut on_event,
        )?;
        (fit.head, fit.best_epoch, fit.history, fit.report, feature_seconds, t1.elapsed().as_secs_f64(), Vec::new())
    };

    on_event(&Event::Phase("save".into()));
    let dir = ModelDir::new(&req.output);
    std::fs::create_dir_all(&req.output).map_err(|e| Error::io(&req.output, e))?;
    head.save(&dir.head())?;
    if !update.is_empty() {
        dir.write_backbone_update(&update)?;
    }
    let config = ModelConfig {
        automm_version: VERSION.to_string(),
        classes: classes.names.clone(),
        hyperparameters: hp.clone(),
        alpha,
        preprocess: backbone.preprocess.clone(),
        backbone: backbone.info.clone(),
        label_column: req.label.clone(),
        image_column: table.image_column.clone(),
        train_data: std::fs::canonicalize(&req.train_data).unwrap_or_else(|_| req.train_data.clone()),
        finetuned: update.iter().map(|(n, _)| n.clone()).collect(),
    };
    dir.write_config(&config)?;
    let history_len = history.len();
    let summary = TrainSummary {
        best_epoch,
        val_metric: hp.val_metric.name().to_string(),
        history,
        validation: report,
        num_train: train_rows.len(),
        num_val: val_rows.len(),
        feature_seconds,
        train_seconds,
        validation_source: val_source,
        finetuned: config.finetuned.clone(),
        seconds_per_epoch: train_seconds / history_len.max(1) as f64,
    };
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::Train(e.to_string()))?;
    write_atomic(&dir.metrics(), json.as_bytes())?;
    let losses: Vec<f64> = summary.history.iter().map(|h| h.train_loss).collect();
    let scores: Vec<f64> = summary.history.iter().map(|h| h.val_score).collect();
    metrics::curve_svg(&losses, &scores, &summary.val_metric, &req.output.join("training_curve.svg"))?;
    metrics::confusion_svg(&summary.validation, &req.output.join("confusion_matrix.svg"))?;
    // The model is complete: the checkpoint (and its feature cache) has served its purpose.
    ck.clear()?;
    Ok(summary)
}

/// Result of [`fit_head`].
pub struct HeadFit {
    /// The kept head.
    pub head: Head,
    /// Its epoch (1-based).
    pub best_epoch: usize,
    /// Per-epoch records.
    pub history: Vec<EpochRecord>,
    /// Validation metrics of the kept head.
    pub report: Report,
}

/// Probabilities and predicted classes of `head` on features `x`.
pub fn predict_features(head: &Head, x: &Tensor) -> Result<(Vec<f32>, Vec<u32>)> {
    let logits = head.logits(x)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?;
    let preds = probs.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    Ok((probs.flatten_all()?.to_vec1::<f32>()?, preds))
}

/// Optional parts of [`fit_head`]: progress display, checkpointing, a state to continue from, a stop flag.
#[derive(Default)]
pub struct FitContext<'a> {
    /// Hide the progress bar.
    pub quiet: bool,
    /// Where to write the state after every epoch.
    pub checkpoint: Option<&'a Checkpoint>,
    /// A state to continue from instead of a fresh initialisation.
    pub resume: Option<TrainState>,
    /// Checked after every epoch's checkpoint: set -> [`Error::Cancelled`].
    pub cancel: Option<&'a AtomicBool>,
}

/// Trains the head on cached features (the loop every epoch runs; no backbone involved).
#[allow(clippy::too_many_arguments)]
pub fn fit_head(
    x_train: &Tensor,
    y_train: &[u32],
    x_val: &Tensor,
    y_val: &[u32],
    classes: &[String],
    hp: &HyperParams,
    alpha: Option<&[f64]>,
    ctx: FitContext<'_>,
    on_event: &mut impl FnMut(&Event),
) -> Result<HeadFit> {
    let device = x_train.device().clone();
    let (n, d) = x_train.dims2()?;
    let k = classes.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hp.seed);
    // PyTorch nn.Linear's default init: U(-1/sqrt(D), 1/sqrt(D)) for weight and bias.
    let bound = 1.0 / (d as f64).sqrt();
    let mut uniform = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect() };
    let w = Var::from_tensor(&Tensor::from_vec(uniform(k * d), (k, d), &device)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(uniform(k), k, &device)?)?;
    let mut opt = AdamW::new(vec![w.clone(), b.clone()], AdamWConfig::new(hp.learning_rate, hp.weight_decay))?;
    let alpha_t =
        alpha.map(|a| Tensor::from_vec(a.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, &device)).transpose()?;
    let y_train_t = Tensor::from_vec(y_train.to_vec(), n, &device)?;
    let bs = hp.batch_size.min(n).max(1);
    let steps_per_epoch = n.div_ceil(bs);
    let total = steps_per_epoch * hp.max_epochs;
    let (eval_x, eval_y) = if y_val.is_empty() { (x_train, y_train) } else { (x_val, y_val) };
    let mut order: Vec<usize> = (0..n).collect();
    let mut history = Vec::new();
    let mut best: Option<(f64, f64, usize, Head)> = None;
    let mut since_best = 0;
    let mut step = 0;
    let mut first_epoch = 1;
    let mut done = false;
    if let Some(st) = ctx.resume {
        let p = st.progress;
        if st.head.weight.dims() != [k, d] || p.order.len() != n || p.order.iter().any(|&i| i >= n) {
            return Err(Error::Train(format!(
                "the checkpoint is for a head {:?} over {} rows, but this run has {k} classes, {d} features and {n} rows",
                st.head.weight.dims(),
                p.order.len()
            )));
        }
        w.set(&st.head.weight)?;
        b.set(&st.head.bias)?;
        opt.restore(st.optimizer)?;
        rng.set_word_pos(p.rng_word_pos.parse().map_err(|_| Error::Train("bad RNG position in checkpoint".into()))?);
        order = p.order;
        history = p.history;
        best = p
            .best
            .zip(st.best_head)
            .map(|(bm, h)| (f64::from_bits(bm.score_bits), f64::from_bits(bm.val_loss_bits), bm.epoch, h));
        since_best = p.since_best;
        step = p.step;
        first_epoch = p.epoch + 1;
        done = p.done;
    }
    let pb = progress(hp.max_epochs as u64, "epochs", ctx.quiet);
    pb.set_position((first_epoch - 1).min(hp.max_epochs) as u64);
    let mut warned_rising = false;
    for epoch in first_epoch..=hp.max_epochs {
        if done {
            break;
        }
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut lr = hp.learning_rate;
        for (bi, chunk) in order.chunks(bs).enumerate() {
            lr = hp.lr_at(step, total);
            opt.set_learning_rate(lr);
            let idx = Tensor::from_vec(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), chunk.len(), &device)?;
            let xb = x_train.index_select(&idx, 0)?;
            let yb = y_train_t.index_select(&idx, 0)?;
            let logits = xb.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
            let loss = match hp.loss_function {
                LossKind::FocalLoss => focal_loss(&logits, &yb, alpha_t.as_ref(), hp.focal_gamma, hp.focal_reduction)?,
                LossKind::CrossEntropy => cross_entropy(&logits, &yb, hp.label_smoothing, Reduction::Mean)?,
            };
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                let kept = match (ctx.checkpoint, epoch > 1) {
                    (Some(ck), true) => format!(
                        "; the last good checkpoint (epoch {}) is kept: `automm train --resume {} --hp \
                         optimization.learning_rate=...` continues from it",
                        epoch - 1,
                        ck.root.parent().unwrap_or(&ck.root).display()
                    ),
                    _ => String::new(),
                };
                return Err(Error::Train(format!(
                    "training diverged: the loss became {lv} at epoch {epoch}, batch {} (learning rate {lr:.3e} at \
                     that step); lower optimization.learning_rate (now {}){kept}",
                    bi + 1,
                    hp.learning_rate
                )));
            }
            loss_sum += lv;
            opt.backward_step(&loss)?;
            step += 1;
        }
        let head = Head { weight: w.as_tensor().copy()?, bias: b.as_tensor().copy()? };
        let (probs, preds) = predict_features(&head, eval_x)?;
        let report = metrics::compute(eval_y, &preds, Some(&probs), classes)?;
        let score = report.get(hp.val_metric.name());
        let val_loss = report.get("log_loss");
        let rec = EpochRecord { epoch, train_loss: loss_sum / steps_per_epoch as f64, val_score: score, lr };
        if !warned_rising
            && epoch >= 3
            && rec.train_loss > 2.0 * history.first().map_or(f64::MAX, |h: &EpochRecord| h.train_loss)
        {
            warned_rising = true;
            tracing::warn!(
                "the training loss is rising ({:.4} at epoch 1, {:.4} at epoch {epoch}): optimization.learning_rate {} \
                 looks too high and training may diverge",
                history[0].train_loss,
                rec.train_loss,
                hp.learning_rate
            );
        }
        pb.set_message(format!("loss {:.4} {} {:.3}", rec.train_loss, hp.val_metric.name(), score));
        pb.inc(1);
        history.push(rec.clone());
        // Ties on the metric (common on small validation sets) go to the lower validation log-loss.
        if best.as_ref().is_none_or(|(s, l, _, _)| score > *s || (score == *s && val_loss < *l)) {
            best = Some((score, val_loss, epoch, head.clone()));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= hp.patience.max(1) {
                tracing::info!(
                    "early stopping at epoch {epoch}: no improvement of {} for {since_best} epochs",
                    hp.val_metric.name()
                );
                done = true;
            }
        }
        if let Some(ck) = ctx.checkpoint {
            ck.write_state(&TrainState {
                progress: Progress {
                    epoch,
                    step,
                    rng_word_pos: rng.get_word_pos().to_string(),
                    order: order.clone(),
                    history: history.clone(),
                    best: best.as_ref().map(|(s, l, e, _)| Best {
                        score_bits: s.to_bits(),
                        val_loss_bits: l.to_bits(),
                        epoch: *e,
                    }),
                    since_best,
                    done: done || epoch == hp.max_epochs,
                },
                head,
                optimizer: opt.state().clone(),
                best_head: best.as_ref().map(|(_, _, _, h)| h.clone()),
            })?;
        }
        on_event(&Event::Epoch(rec));
        if ctx.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) && !done && epoch < hp.max_epochs {
            let dir = ctx.checkpoint.map(|c| c.root.clone()).unwrap_or_default();
            return Err(Error::Cancelled { epoch, dir });
        }
    }
    pb.finish_and_clear();
    let (_, _, best_epoch, head) = best.ok_or_else(|| Error::Train("no epoch ran".into()))?;
    let (probs, preds) = predict_features(&head, eval_x)?;
    let report = metrics::compute(eval_y, &preds, Some(&probs), classes)?;
    Ok(HeadFit { head, best_epoch, history, report })
}
