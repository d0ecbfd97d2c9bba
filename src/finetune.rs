//! Efficient fine-tuning of the imported backbone, with AutoMM's names: `optimization.efficient_finetune`
//! = `bit_fit` (biases) or `norm_fit` (normalisation scales and shifts plus biases), and
//! `model.backbone.trainable_layers` (initializer-name prefixes, e.g. the last stage). The chosen
//! initializers of the ONNX graph become `Var`s that train with the head; gradients flow back through the
//! imported graph (our depthwise conv has its own backward pass, the rest is candle autograd).
//!
//! The graph is split at its *frontier*: the part before the first trainable initializer is frozen, so
//! without augmentation its outputs are computed once per image and cached; each epoch then runs only the
//! trainable rest. With augmentation every epoch decodes and transforms the images again (seeded).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_onnx::onnx::ModelProto;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::backbone::progress;
use crate::config::{EfficientFinetune, HyperParams, LossKind};
use crate::data::{augment, Preprocess};
use crate::error::{Error, Result};
use crate::loss::{cross_entropy, focal_loss, Reduction};
use crate::metrics::{self, Report};
use crate::model::Head;
use crate::onnx::Graph;
use crate::optim::{AdamW, AdamWConfig};
use crate::train::{predict_features, EpochRecord, Event};

/// Batch size of the frozen prefix and of validation passes.
const EVAL_BATCH: usize = 8;
/// Images per forward/backward pass; a batch's gradients are summed over its micro-batches.
const MICRO_BATCH: usize = 8;

/// Initializers of `graph` that train: biases for `bit_fit`; normalisation scales/shifts and biases for
/// `norm_fit`; plus every float initializer whose name starts with one of `prefixes`. Sorted by name.
pub fn select_trainable(graph: &Graph, mode: EfficientFinetune, prefixes: &[String]) -> Vec<String> {
    let inits: HashSet<String> = graph.initializer_names().into_iter().collect();
    let is_float = |n: &str| graph.initializer(n).is_some_and(|t| t.dtype().is_float() && t.elem_count() > 0);
    let mut biases = HashSet::new();
    let mut norms = HashSet::new();
    for n in graph.nodes() {
        let arg = |i: usize| n.input.get(i).filter(|s| inits.contains(*s)).cloned();
        match n.op_type.as_str() {
            "Conv" | "ConvTranspose" | "Gemm" => biases.extend(arg(2)),
            "LayerNormalization" | "BatchNormalization" | "InstanceNormalization" | "GroupNormalization" => {
                norms.extend(arg(1));
                biases.extend(arg(2));
            }
            // A bias row added after a MatMul (how exporters write Linear layers).
            "Add" => {
                for i in 0..2 {
                    if let Some(name) = arg(i) {
                        let t = &graph.initializer(&name).expect("listed initializer");
                        if t.dims().iter().rev().skip(1).all(|&d| d == 1) && t.elem_count() > 1 {
                            biases.insert(name);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let mut out: HashSet<String> = match mode {
        EfficientFinetune::None => HashSet::new(),
        EfficientFinetune::BitFit => biases,
        EfficientFinetune::NormFit => biases.union(&norms).cloned().collect(),
    };
    out.extend(inits.iter().filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str()))).cloned());
    let mut v: Vec<String> = out.into_iter().filter(|n| is_float(n)).collect();
    v.sort();
    v
}

/// A backbone being fine-tuned: the frozen prefix (when the graph splits cleanly) and the trainable rest.
pub struct TunedBackbone {
    prefix: Option<Graph>,
    suffix: Graph,
    input: String,
    frontier: Vec<String>,
    /// The trainable initializers, by name.
    pub vars: Vec<(String, Var)>,
}

impl TunedBackbone {
    /// Imports `model` up to `feature` with `trainable` initializers as `Var`s. `input` is the image input.
    pub fn new(
        model: &ModelProto,
        name: &str,
        device: &Device,
        input: &str,
        feature: &str,
        trainable: &[String],
        image_size: usize,
    ) -> Result<TunedBackbone> {
        if trainable.is_empty() {
            return Err(Error::Train(
                "fine-tuning selected no initializer of the backbone (check optimization.efficient_finetune and \
                 model.backbone.trainable_layers against the ONNX initializer names)"
                    .into(),
            ));
        }
        let mut full = Graph::from_model(model, name, device, Some(vec![feature.to_string()]))?;
        let vars = full.set_trainable(trainable)?;
        let frontier = full.frontier();
        let whole = |full: Graph, vars: Vec<Var>| TunedBackbone {
            prefix: None,
            suffix: full,
            input: input.to_string(),
            frontier: vec![input.to_string()],
            vars: trainable.iter().cloned().zip(vars).collect(),
        };
        if frontier.is_empty() || frontier.iter().any(|f| f == input) {
            return Ok(whole(full, vars));
        }
        // The prefix's outputs are cached per image: each must be a float tensor with the batch first.
        let prefix = Graph::from_model(model, name, device, Some(frontier.clone()))?;
        let probe = Tensor::zeros((2, 3, image_size, image_size), DType::F32, device)?;
        let outs = prefix.run(&[(input, probe)])?;
        if outs.iter().any(|t| !t.dtype().is_float() || t.dims().first() != Some(&2)) {
            tracing::info!("the frozen part of the backbone does not split per image; running it every step");
            return Ok(whole(full, vars));
        }
        let mut suffix = Graph::from_model_fed(model, name, device, &frontier, vec![feature.to_string()])?;
        let vars = suffix.set_trainable(trainable)?;
        tracing::info!(
            "fine-tuning {} initializers; the frozen prefix hands over {} tensor(s): {:?}",
            trainable.len(),
            frontier.len(),
            frontier
        );
        Ok(TunedBackbone {
            prefix: Some(prefix),
            suffix,
            input: input.to_string(),
            frontier,
            vars: trainable.iter().cloned().zip(vars).collect(),
        })
    }

    /// True when a frozen prefix exists (its outputs can be cached).
    pub fn has_prefix(&self) -> bool {
        self.prefix.is_some()
    }

    /// The frontier values of an image batch `[N, 3, S, S]`.
    pub fn front(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        match &self.prefix {
            Some(p) => p.run(&[(self.input.as_str(), images.clone())]),
            None => Ok(vec![images.clone()]),
        }
    }

    /// Features `[N, D]` from frontier values; `track` = gradients to the trainable initializers.
    pub fn features(&self, front: &[Tensor], track: bool) -> Result<Tensor> {
        let feeds: Vec<(&str, Tensor)> = self.frontier.iter().map(String::as_str).zip(front.iter().cloned()).collect();
        let out = if track { self.suffix.run(&feeds)? } else { self.suffix.run_frozen(&feeds)? };
        let f = out.into_iter().next().ok_or_else(|| Error::Train("the backbone computed no features".into()))?;
        let n = f.dims().first().copied().unwrap_or(0);
        Ok(f.reshape((n, ()))?)
    }

    /// The trained initializers' current values.
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?))).collect()
    }
}

/// Image files with their table rows, and class targets.
pub struct Split<'a> {
    /// `(path, table row)` per sample.
    pub files: &'a [(PathBuf, Option<usize>)],
    /// Class index per sample.
    pub targets: &'a [u32],
}

/// Result of [`fit`].
pub struct FinetuneFit {
    /// The kept head.
    pub head: Head,
    /// The kept values of the trained backbone initializers.
    pub backbone: Vec<(String, Tensor)>,
    /// Its epoch (1-based).
    pub best_epoch: usize,
    /// Per-epoch records.
    pub history: Vec<EpochRecord>,
    /// Validation metrics of the kept model.
    pub report: Report,
    /// Seconds spent on the frozen prefix (cached once).
    pub prefix_seconds: f64,
}

/// Frontier values of many files, `[N, ...]` per frontier tensor, in batches with a progress bar.
fn cache_front(
    tb: &TunedBackbone,
    pre: &Preprocess,
    files: &[(PathBuf, Option<usize>)],
    label: &str,
    quiet: bool,
) -> Result<Vec<Tensor>> {
    let s = pre.size as usize;
    let pb = progress(files.len() as u64, label, quiet);
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for chunk in files.chunks(EVAL_BATCH) {
        let refs: Vec<_> = chunk.iter().map(|(p, r)| (p.as_path(), *r)).collect();
        let x = Tensor::from_vec(pre.files_to_batch(&refs)?, (chunk.len(), 3, s, s), tb.suffix.device())?;
        parts.push(tb.front(&x)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    (0..tb.frontier.len())
        .map(|i| {
            let ts: Vec<Tensor> = parts.iter().map(|p| p[i].clone()).collect();
            Ok(Tensor::cat(&ts, 0)?)
        })
        .collect()
}

fn features_frozen(tb: &TunedBackbone, front: &[Tensor]) -> Result<Tensor> {
    let n = front.first().map(|t| t.dims()[0]).unwrap_or(0);
    let mut parts = Vec::new();
    for start in (0..n).step_by(EVAL_BATCH) {
        let len = EVAL_BATCH.min(n - start);
        let f: Vec<Tensor> = front.iter().map(|t| t.narrow(0, start, len)).collect::<candle_core::Result<_>>()?;
        parts.push(tb.features(&f, false)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// (score, validation loss, epoch, head, backbone values) of the best epoch.
type Best = (f64, f64, usize, Head, Vec<(String, Tensor)>);

/// Trains the head together with the backbone's trainable initializers. Validation runs every epoch on
/// `val` (or on `train` when `val` is empty); the best epoch by the validation metric is kept.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    tb: &TunedBackbone,
    pre: &Preprocess,
    train: Split<'_>,
    val: Split<'_>,
    classes: &[String],
    hp: &HyperParams,
    alpha: Option<&[f64]>,
    quiet: bool,
    cancel: Option<&std::sync::atomic::AtomicBool>,
    on_event: &mut impl FnMut(&Event),
) -> Result<FinetuneFit> {
    let device = tb.suffix.device().clone();
    let s = pre.size as usize;
    let augmenting = !hp.train_transforms.is_empty();
    let t0 = Instant::now();
    // Without augmentation the frozen prefix runs once per image.
    let train_front = if augmenting { None } else { Some(cache_front(tb, pre, train.files, "prefix", quiet)?) };
    let (eval_files, eval_y) =
        if val.files.is_empty() { (train.files, train.targets) } else { (val.files, val.targets) };
    let eval_front = cache_front(tb, pre, eval_files, "val prefix", quiet)?;
    let prefix_seconds = t0.elapsed().as_secs_f64();

    let d =
        features_frozen(tb, &eval_front.iter().map(|t| t.narrow(0, 0, 1)).collect::<candle_core::Result<Vec<_>>>()?)?
            .dims()[1];
    let k = classes.len();
    let n = train.files.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hp.seed);
    // PyTorch nn.Linear's default init, as for head-only training.
    let bound = 1.0 / (d as f64).sqrt();
    let mut uniform = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect() };
    let w = Var::from_tensor(&Tensor::from_vec(uniform(k * d), (k, d), &device)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(uniform(k), k, &device)?)?;
    let mut all = vec![w.clone(), b.clone()];
    all.extend(tb.vars.iter().map(|(_, v)| v.clone()));
    let mut opt = AdamW::new(all, AdamWConfig::new(hp.learning_rate, hp.weight_decay))?;
    let alpha_t =
        alpha.map(|a| Tensor::from_vec(a.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, &device)).transpose()?;
    let y_all = Tensor::from_vec(train.targets.to_vec(), n, &device)?;
    let bs = hp.batch_size.min(n).max(1);
    let steps_per_epoch = n.div_ceil(bs);
    let total = steps_per_epoch * hp.max_epochs;
    let mean_reduced = match hp.loss_function {
        LossKind::FocalLoss => hp.focal_reduction == Reduction::Mean,
        LossKind::CrossEntropy => true,
    };
    let mut order: Vec<usize> = (0..n).collect();
    let mut history = Vec::new();
    // (score, validation loss, epoch, head, backbone values) of the best epoch so far.
    let mut best: Option<Best> = None;
    let mut since_best = 0;
    let mut step = 0;
    let pb = progress(total as u64, "fine-tune", quiet);
    for epoch in 1..=hp.max_epochs {
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut lr = hp.learning_rate;
        for (bi, chunk) in order.chunks(bs).enumerate() {
            lr = hp.lr_at(step, total);
            opt.set_learning_rate(lr);
            // Micro-batches bound the activation memory; their gradients add up to the batch's.
            let mut acc: Vec<Option<Tensor>> = vec![None; opt.vars().len()];
            let mut batch_loss = 0.0;
            for mb in chunk.chunks(MICRO_BATCH) {
                let idx = Tensor::from_vec(mb.iter().map(|&i| i as u32).collect::<Vec<_>>(), mb.len(), &device)?;
                let front = match &train_front {
                    Some(cached) => {
                        cached.iter().map(|t| t.index_select(&idx, 0)).collect::<candle_core::Result<Vec<_>>>()?
                    }
                    None => {
                        let refs: Vec<_> = mb.iter().map(|&i| (train.files[i].0.as_path(), train.files[i].1)).collect();
                        let seeds: Vec<u64> = mb.iter().map(|&i| augment::sample_seed(hp.seed, epoch, i)).collect();
                        let x = augment::files_to_batch(pre, &refs, &hp.train_transforms, &seeds)?;
                        tb.front(&Tensor::from_vec(x, (mb.len(), 3, s, s), &device)?)?
                    }
                };
                let feats = tb.features(&front, true)?;
                let logits = feats.matmul(&w.as_tensor().t()?)?.broadcast_add(b.as_tensor())?;
                let yb = y_all.index_select(&idx, 0)?;
                let loss = match hp.loss_function {
                    LossKind::FocalLoss => {
                        focal_loss(&logits, &yb, alpha_t.as_ref(), hp.focal_gamma, hp.focal_reduction)?
                    }
                    LossKind::CrossEntropy => cross_entropy(&logits, &yb, hp.label_smoothing, Reduction::Mean)?,
                };
                let loss = if mean_reduced { (loss * (mb.len() as f64 / chunk.len() as f64))? } else { loss };
                batch_loss += loss.to_scalar::<f32>()? as f64;
                let grads = loss.backward()?;
                for (slot, v) in acc.iter_mut().zip(opt.vars()) {
                    if let Some(g) = grads.get(v) {
                        *slot = Some(match slot.take() {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
            if !batch_loss.is_finite() {
                return Err(Error::Train(format!(
                    "fine-tuning diverged: the loss became {batch_loss} at epoch {epoch}, batch {} (learning rate \
                     {lr:.3e}); lower optimization.learning_rate (now {})",
                    bi + 1,
                    hp.learning_rate
                )));
            }
            loss_sum += batch_loss;
            opt.step(&acc)?;
            step += 1;
            pb.inc(1);
        }
        let head = Head { weight: w.as_tensor().copy()?, bias: b.as_tensor().copy()? };
        let feats = features_frozen(tb, &eval_front)?;
        let (probs, preds) = predict_features(&head, &feats)?;
        let report = metrics::compute(eval_y, &preds, Some(&probs), classes)?;
        let score = report.get(hp.val_metric.name());
        let val_loss = report.get("log_loss");
        let rec = EpochRecord { epoch, train_loss: loss_sum / steps_per_epoch as f64, val_score: score, lr };
        pb.set_message(format!("loss {:.4} {} {:.3}", rec.train_loss, hp.val_metric.name(), score));
        history.push(rec.clone());
        on_event(&Event::Epoch(rec));
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst)) && epoch < hp.max_epochs {
            return Err(Error::Train(format!(
                "fine-tuning was cancelled after epoch {epoch}; fine-tuning runs are not checkpointed, so nothing \
                 was kept"
            )));
        }
        if best.as_ref().is_none_or(|(bs, bl, ..)| score > *bs || (score == *bs && val_loss < *bl)) {
            best = Some((score, val_loss, epoch, head, tb.snapshot()?));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= hp.patience.max(1) {
                tracing::info!("early stopping at epoch {epoch}: no improvement for {since_best} epochs");
                break;
            }
        }
    }
    pb.finish_and_clear();
    let (_, _, best_epoch, head, backbone) = best.ok_or_else(|| Error::Train("no epoch ran".into()))?;
    // Score the kept epoch with its own backbone values.
    for (name, v) in &tb.vars {
        if let Some((_, t)) = backbone.iter().find(|(n, _)| n == name) {
            v.set(t)?;
        }
    }
    let feats = features_frozen(tb, &eval_front)?;
    let (probs, preds) = predict_features(&head, &feats)?;
    let report = metrics::compute(eval_y, &preds, Some(&probs), classes)?;
    Ok(FinetuneFit { head, backbone, best_epoch, history, report, prefix_seconds })
}
