//! The one training loop, for head-only and fine-tuning runs alike (burn-train's single epoch runner):
//! over a [`FeatureSource`], each epoch shuffles the rows, runs every batch as micro-batches (gradients
//! summed), steps AdamW under the schedule, scores the validation rows, keeps the best epoch
//! ([`BestEpoch`]: metric, ties to the lower log-loss), stops early after `patience` epochs without
//! improvement, checkpoints the whole state, and stops on request with [`Error::Cancelled`].

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::hparams::{HyperParams, LossKind, Reduction};
use crate::model::metrics::{self, Metric, Report};
use crate::model::Head;
use crate::train::checkpoint::{Best, Checkpoint, Progress, TrainState};
use crate::train::loss::{cross_entropy, focal_loss, logit_adjusted};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::schedule::Schedule;
use crate::train::source::FeatureSource;
use crate::train::{EpochRecord, Event};
use crate::util::progress::progress;

/// What a run learns from: training and evaluation targets, classes, settings.
pub struct FitData<'a> {
    /// Class index of every training row of the source.
    pub targets: &'a [u32],
    /// Class index of every evaluation row of the source.
    pub eval_targets: &'a [u32],
    /// Class names, in class order.
    pub classes: &'a [String],
    /// Hyperparameters.
    pub hp: &'a HyperParams,
    /// Resolved per-class focal-loss weights.
    pub alpha: Option<&'a [f64]>,
    /// log class frequencies of the training rows (the logit-adjusted loss's prior).
    pub log_prior: Option<&'a [f64]>,
}

/// Optional parts of [`fit`]: progress display, checkpointing, a state to continue from, a stop flag.
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

/// Result of [`fit`].
pub struct Fit {
    /// The kept head.
    pub head: Head,
    /// The kept values of the trained backbone initializers (empty for a frozen backbone).
    pub backbone: Vec<(String, Tensor)>,
    /// Its epoch (1-based).
    pub best_epoch: usize,
    /// Per-epoch records.
    pub history: Vec<EpochRecord>,
    /// Validation metrics of the kept model.
    pub report: Report,
}

/// The best epoch's scores and model.
struct Kept {
    score: f64,
    val_loss: f64,
    epoch: usize,
    head: Head,
    backbone: Vec<(String, Tensor)>,
}

/// The best epoch so far and when to stop (early stopping as a strategy of its own).
#[derive(Default)]
pub struct BestEpoch {
    best: Option<Kept>,
    since_best: usize,
}

impl BestEpoch {
    /// Records an epoch's score and validation log-loss; true when it is the new best. Ties on the
    /// metric (common on small validation sets) go to the lower log-loss.
    pub fn offer(
        &mut self,
        score: f64,
        val_loss: f64,
        epoch: usize,
        keep: impl FnOnce() -> Result<(Head, Vec<(String, Tensor)>)>,
    ) -> Result<bool> {
        if self.best.as_ref().is_none_or(|b| score > b.score || (score == b.score && val_loss < b.val_loss)) {
            let (head, backbone) = keep()?;
            self.best = Some(Kept { score, val_loss, epoch, head, backbone });
            self.since_best = 0;
            Ok(true)
        } else {
            self.since_best += 1;
            Ok(false)
        }
    }

    /// True when `patience` epochs in a row did not improve.
    pub fn should_stop(&self, patience: usize) -> bool {
        self.since_best >= patience.max(1)
    }
}

/// The loop's mutable state (what a checkpoint holds).
struct Loop {
    w: Var,
    b: Var,
    opt: AdamW,
    rng: ChaCha8Rng,
    order: Vec<usize>,
    history: Vec<EpochRecord>,
    best: BestEpoch,
    step: usize,
    next_epoch: usize,
    done: bool,
}

/// Trains the head (and the source's trainable initializers) and returns the best epoch's model.
pub fn fit(
    source: &dyn FeatureSource,
    data: &FitData<'_>,
    ctx: FitContext<'_>,
    on_event: &mut dyn FnMut(&Event),
) -> Result<Fit> {
    let hp = data.hp;
    let n = source.len();
    let mut st = start(source, data, ctx.resume)?;
    let bs = hp.batch_size.min(n).max(1);
    let steps_per_epoch = n.div_ceil(bs);
    let schedule = Schedule::new(hp, steps_per_epoch * hp.max_epochs);
    let label = if source.trainable().is_empty() { "train" } else { "fine-tune" };
    let pb = progress((steps_per_epoch * hp.max_epochs) as u64, label, ctx.quiet);
    pb.set_position(st.step as u64);
    let mut warned_rising = false;
    for epoch in st.next_epoch..=hp.max_epochs {
        if st.done {
            break;
        }
        let (loss_sum, lr) = run_epoch(source, data, &mut st, epoch, bs, &schedule, ctx.checkpoint, &|| pb.inc(1))?;
        let head = Head { weight: st.w.as_tensor().copy()?, bias: st.b.as_tensor().copy()? };
        let p = head.predict(&source.eval_features()?)?;
        let report = metrics::compute(data.eval_targets, &p.preds, Some(&p.probs), data.classes)?;
        let score = report.get(hp.val_metric).unwrap_or(f64::NAN);
        let val_loss = report.get(Metric::LogLoss).unwrap_or(f64::NAN);
        let rec = EpochRecord { epoch, train_loss: loss_sum / steps_per_epoch as f64, val_score: score, lr };
        warned_rising |= warn_if_rising(&st.history, &rec, hp, warned_rising);
        pb.set_message(format!("loss {:.4} {} {:.3}", rec.train_loss, hp.val_metric, score));
        st.history.push(rec.clone());
        if !st.best.offer(score, val_loss, epoch, || Ok((head.clone(), source.snapshot()?)))?
            && st.best.should_stop(hp.patience)
        {
            tracing::info!(
                "early stopping at epoch {epoch}: no improvement of {} for {} epochs",
                hp.val_metric,
                st.best.since_best
            );
            st.done = true;
        }
        st.next_epoch = epoch + 1;
        if let Some(ck) = ctx.checkpoint {
            ck.write_state(&state_of(&st, head, source, hp)?)?;
        }
        on_event(&Event::Epoch(rec));
        if ctx.cancel.is_some_and(|c| c.load(Ordering::SeqCst)) && !st.done && epoch < hp.max_epochs {
            let dir = ctx.checkpoint.map(|c| c.root.clone()).unwrap_or_default();
            return Err(Error::Cancelled { epoch, dir });
        }
    }
    pb.finish_and_clear();
    finish(source, data, st)
}

/// A fresh state (PyTorch-style head init from the seeded RNG) or the one a checkpoint holds.
fn start(source: &dyn FeatureSource, data: &FitData<'_>, resume: Option<TrainState>) -> Result<Loop> {
    let (n, d, k) = (source.len(), source.feature_dim(), data.classes.len());
    let device = source.device();
    let mut rng = ChaCha8Rng::seed_from_u64(data.hp.seed);
    let init = Head::init(k, d, &mut rng, &device)?;
    let (w, b) = (Var::from_tensor(&init.weight)?, Var::from_tensor(&init.bias)?);
    let mut vars = vec![w.clone(), b.clone()];
    vars.extend(source.trainable().iter().map(|(_, v)| v.clone()));
    let opt = AdamW::new(vars, AdamWConfig::new(data.hp.learning_rate, data.hp.weight_decay))?;
    let mut st = Loop {
        w,
        b,
        opt,
        rng,
        order: (0..n).collect(),
        history: Vec::new(),
        best: BestEpoch::default(),
        step: 0,
        next_epoch: 1,
        done: false,
    };
    if let Some(saved) = resume {
        restore(&mut st, saved, source, (n, d, k))?;
    }
    Ok(st)
}

fn restore(
    st: &mut Loop,
    saved: TrainState,
    source: &dyn FeatureSource,
    (n, d, k): (usize, usize, usize),
) -> Result<()> {
    let p = saved.progress;
    if saved.head.weight.dims() != [k, d] || p.order.len() != n || p.order.iter().any(|&i| i >= n) {
        return Err(Error::Train(format!(
            "the checkpoint is for a head {:?} over {} rows, but this run has {k} classes, {d} features and {n} rows",
            saved.head.weight.dims(),
            p.order.len()
        )));
    }
    st.w.set(&saved.head.weight)?;
    st.b.set(&saved.head.bias)?;
    source.restore(&saved.backbone)?;
    st.opt.restore(saved.optimizer)?;
    st.rng.set_word_pos(p.rng_word_pos.parse().map_err(|_| Error::Train("bad RNG position in checkpoint".into()))?);
    st.order = p.order;
    st.history = p.history;
    st.best = BestEpoch {
        best: p.best.zip(saved.best_head).map(|(bm, head)| Kept {
            score: f64::from_bits(bm.score_bits),
            val_loss: f64::from_bits(bm.val_loss_bits),
            epoch: bm.epoch,
            head,
            backbone: saved.best_backbone,
        }),
        since_best: p.since_best,
    };
    st.step = p.step;
    st.next_epoch = p.epoch + 1;
    st.done = p.done;
    Ok(())
}

/// One epoch of optimizer steps; returns the summed batch losses and the last learning rate.
#[allow(clippy::too_many_arguments)]
fn run_epoch(
    source: &dyn FeatureSource,
    data: &FitData<'_>,
    st: &mut Loop,
    epoch: usize,
    bs: usize,
    schedule: &Schedule,
    checkpoint: Option<&Checkpoint>,
    tick: &dyn Fn(),
) -> Result<(f64, f64)> {
    let hp = data.hp;
    let device = st.w.device().clone();
    let k = data.classes.len();
    let alpha = data
        .alpha
        .map(|a| Tensor::from_vec(a.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, &device))
        .transpose()?;
    let log_prior = data
        .log_prior
        .map(|a| Tensor::from_vec(a.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, &device))
        .transpose()?;
    let mean_reduced = hp.loss_function != LossKind::FocalLoss || hp.focal_reduction == Reduction::Mean;
    st.order.shuffle(&mut st.rng);
    let (mut loss_sum, mut lr) = (0.0, hp.learning_rate);
    for (bi, chunk) in st.order.clone().chunks(bs).enumerate() {
        lr = schedule.lr_at(st.step);
        st.opt.set_learning_rate(lr);
        let mut acc: Vec<Option<Tensor>> = vec![None; st.opt.vars().len()];
        let mut batch_loss = 0.0;
        for mb in chunk.chunks(source.micro_batch().max(1)) {
            let logits =
                source.train_features(mb, epoch)?.matmul(&st.w.as_tensor().t()?)?.broadcast_add(st.b.as_tensor())?;
            let yb = Tensor::from_vec(mb.iter().map(|&i| data.targets[i]).collect::<Vec<_>>(), mb.len(), &device)?;
            let loss = match hp.loss_function {
                LossKind::FocalLoss => focal_loss(&logits, &yb, alpha.as_ref(), hp.focal_gamma, hp.focal_reduction)?,
                LossKind::CrossEntropy => cross_entropy(&logits, &yb, hp.label_smoothing, Reduction::Mean)?,
                LossKind::LogitAdjusted => {
                    let prior = log_prior.as_ref().ok_or_else(|| {
                        Error::config("optimization.loss_function", "logit_adjusted needs the class prior")
                    })?;
                    logit_adjusted(&logits, &yb, prior, hp.logit_tau, Reduction::Mean)?
                }
                LossKind::Auto => {
                    return Err(Error::config("optimization.loss_function", "`auto` must be resolved before training"))
                }
            };
            // A mean over the batch is the sum of its micro-batches' means weighted by their share.
            let loss = if mean_reduced && mb.len() != chunk.len() {
                (loss * (mb.len() as f64 / chunk.len() as f64))?
            } else {
                loss
            };
            batch_loss += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            for (slot, v) in acc.iter_mut().zip(st.opt.vars()) {
                if let Some(g) = grads.get(v) {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        if !batch_loss.is_finite() {
            return Err(diverged(batch_loss, epoch, bi + 1, lr, hp, checkpoint));
        }
        loss_sum += batch_loss;
        st.opt.step(&acc)?;
        st.step += 1;
        tick();
    }
    Ok((loss_sum, lr))
}

fn diverged(
    loss: f64,
    epoch: usize,
    batch: usize,
    lr: f64,
    hp: &HyperParams,
    checkpoint: Option<&Checkpoint>,
) -> Error {
    let kept = match (checkpoint, epoch > 1) {
        (Some(ck), true) => format!(
            "; the last good checkpoint (epoch {}) is kept: `automm train --resume {} --hp \
             optimization.learning_rate=...` continues from it",
            epoch - 1,
            ck.root.parent().unwrap_or(&ck.root).display()
        ),
        _ => String::new(),
    };
    Error::Train(format!(
        "training diverged: the loss became {loss} at epoch {epoch}, batch {batch} (learning rate {lr:.3e} at that \
         step); lower optimization.learning_rate (now {}){kept}",
        hp.learning_rate
    ))
}

/// Warns once when the training loss has more than doubled since epoch 1 (a learning rate too high).
fn warn_if_rising(history: &[EpochRecord], rec: &EpochRecord, hp: &HyperParams, warned: bool) -> bool {
    let first = history.first().map_or(f64::MAX, |h| h.train_loss);
    if warned || rec.epoch < 3 || rec.train_loss <= 2.0 * first {
        return false;
    }
    tracing::warn!(
        "the training loss is rising ({first:.4} at epoch 1, {:.4} at epoch {}): optimization.learning_rate {} \
         looks too high and training may diverge",
        rec.train_loss,
        rec.epoch,
        hp.learning_rate
    );
    true
}

fn state_of(st: &Loop, head: Head, source: &dyn FeatureSource, hp: &HyperParams) -> Result<TrainState> {
    let best = st.best.best.as_ref();
    Ok(TrainState {
        progress: Progress {
            epoch: st.next_epoch - 1,
            step: st.step,
            rng_word_pos: st.rng.get_word_pos().to_string(),
            order: st.order.clone(),
            history: st.history.clone(),
            best: best.map(|b| Best {
                score_bits: b.score.to_bits(),
                val_loss_bits: b.val_loss.to_bits(),
                epoch: b.epoch,
            }),
            since_best: st.best.since_best,
            done: st.done || st.next_epoch > hp.max_epochs,
        },
        head,
        backbone: source.snapshot()?,
        optimizer: st.opt.state().clone(),
        best_head: best.map(|b| b.head.clone()),
        best_backbone: best.map(|b| b.backbone.clone()).unwrap_or_default(),
    })
}

/// The best epoch's model, scored on the evaluation rows with its own backbone values.
fn finish(source: &dyn FeatureSource, data: &FitData<'_>, st: Loop) -> Result<Fit> {
    let Kept { epoch: best_epoch, head, backbone, .. } =
        st.best.best.ok_or_else(|| Error::Train("no epoch ran".into()))?;
    if !backbone.is_empty() {
        source.restore(&backbone)?;
    }
    let p = head.predict(&source.eval_features()?)?;
    let report = metrics::compute(data.eval_targets, &p.preds, Some(&p.probs), data.classes)?;
    Ok(Fit { head, backbone, best_epoch, history: st.history, report })
}
