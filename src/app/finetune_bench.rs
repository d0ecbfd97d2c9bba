//! `automm bench finetune`: what one fine-tuning step through an imported backbone costs, measured the way
//! PyTorch's side (`models/bench_finetune.py`) measures it: a forward pass (frozen, our fast plan) and a
//! step (forward with gradients, linear head, cross-entropy, backward, AdamW) per image at one batch
//! size, plus this process's peak RSS. The CLI runs PyTorch's script first, in its own process, and prints
//! both as ratios.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::hparams::{HyperParams, Reduction};
use crate::model::Head;
use crate::onnx::{detect_feature_tensor, read_model, Graph};
use crate::train::finetune::{select_trainable, TunedBackbone};
use crate::train::loss::cross_entropy;
use crate::train::optim::{AdamW, AdamWConfig};

/// One model's figures.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FinetuneFigures {
    /// Forward pass (no gradients), ms per image.
    pub fwd_ms_per_img: f64,
    /// Forward + backward + optimizer step, ms per image.
    pub step_ms_per_img: f64,
    /// Of the step: the forward pass with gradients tracked (and the loss), ms per image.
    pub step_fwd_ms_per_img: f64,
    /// Of the step: the backward pass, ms per image.
    pub step_bwd_ms_per_img: f64,
    /// Of the step: the AdamW update, ms per image.
    pub step_opt_ms_per_img: f64,
    /// Peak resident set size of the process, bytes.
    pub peak_rss_bytes: u64,
    /// Values that train (backbone parameters plus the head).
    pub params: usize,
    /// The tracked forward pass by op type (ms per image, slowest first); empty for PyTorch.
    #[serde(default)]
    pub forward_ops: Vec<(String, f64)>,
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct FinetuneBench {
    /// Images per step.
    pub batch: usize,
    /// Timed repetitions (after one warm-up), the median is reported.
    pub steps: usize,
    /// Head classes.
    pub classes: usize,
    /// Which backbone parameters train (`freeze`, `efficient_finetune`, `trainable_layers`).
    pub hp: HyperParams,
    /// Where the graph runs (a CUDA device: every timed call ends with a synchronisation).
    pub device: Device,
}

/// Where the step's features come from.
enum Source {
    Frozen(Box<Graph>),
    Tuned(Box<TunedBackbone>),
}

/// Peak resident set size of this process (`VmHWM`), bytes (Linux; 0 elsewhere).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

fn median_seconds(dev: &Device, steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: builds the plan for this shape
    dev.synchronize()?;
    let mut t = Vec::with_capacity(steps);
    for _ in 0..steps.max(1) {
        let t0 = Instant::now();
        f()?;
        // A GPU runs the kernels after the calls return: wait for them.
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Measures `model` (an ONNX backbone; its feature tensor detected) on random images.
pub fn measure(model: &Path, b: &FinetuneBench) -> Result<FinetuneFigures> {
    let (dev, name) = (b.device.clone(), model.display().to_string());
    let proto = read_model(model)?;
    let feature = detect_feature_tensor(&proto)?;
    let g = Graph::from_model(&proto, &name, &dev, Some(vec![feature.clone()]))?;
    let input = g.inputs().first().ok_or_else(|| Error::onnx(&name, "the model has no input"))?.clone();
    let size = input.dims.last().copied().flatten().unwrap_or(224);
    let trainable = select_trainable(&g, &b.hp);
    // Head only (`frozen`): features without gradients from the graph itself; else the tuned backbone
    // (and the full graph is dropped, so that it does not count in the peak).
    let src = if trainable.is_empty() {
        Source::Frozen(Box::new(g))
    } else {
        drop(g);
        Source::Tuned(Box::new(TunedBackbone::new(&proto, &name, &dev, &input.name, &feature, &trainable, size)?))
    };
    drop(proto);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let x = Tensor::randn(0f32, 1.0, (b.batch, 3, size, size), &dev)?;
    let y = Tensor::from_vec((0..b.batch as u32).map(|i| i % b.classes as u32).collect::<Vec<_>>(), b.batch, &dev)?;
    let front = match &src {
        Source::Tuned(tb) => tb.front(&x)?,
        Source::Frozen(_) => vec![x.clone()],
    };
    let features = |track: bool| -> Result<Tensor> {
        match &src {
            Source::Tuned(tb) => tb.features(&front, track),
            Source::Frozen(g) => Ok(g.run(&[(input.name.as_str(), x.clone())])?.remove(0).reshape((b.batch, ()))?),
        }
    };
    let fwd = median_seconds(&dev, b.steps, || features(false).map(drop))?;
    let dim = features(false)?.dims()[1];
    let head = Head::init(b.classes, dim, &mut rng, &dev)?;
    let (w, bias) = (Var::from_tensor(&head.weight)?, Var::from_tensor(&head.bias)?);
    let mut vars = vec![w.clone(), bias.clone()];
    if let Source::Tuned(tb) = &src {
        vars.extend(tb.vars.iter().map(|(_, v)| v.clone()));
    }
    let params = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vars, AdamWConfig::new(b.hp.learning_rate, b.hp.weight_decay))?;
    // The step in its three parts, each timed; the medians are taken per part.
    let mut parts: Vec<[f64; 3]> = Vec::new();
    let step = median_seconds(&dev, b.steps, || {
        let t0 = Instant::now();
        let f = features(true)?;
        let logits = f.matmul(&w.as_tensor().t()?)?.broadcast_add(bias.as_tensor())?;
        let loss = cross_entropy(&logits.to_dtype(DType::F32)?, &y, 0.0, Reduction::Mean)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let g: Vec<Option<Tensor>> = opt.vars().iter().map(|v| grads.get(v).cloned()).collect();
        drop(grads);
        dev.synchronize()?;
        let t2 = Instant::now();
        opt.step(&g)?;
        parts.push([(t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), t2.elapsed().as_secs_f64()]);
        Ok(())
    })?;
    let part = |i: usize| {
        let mut v: Vec<f64> = parts.iter().skip(1).map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let per = 1e3 / b.batch as f64;
    let forward_ops = match &src {
        Source::Tuned(tb) => tb.profile(&front)?.into_iter().map(|o| (o.op, o.seconds * per)).collect(),
        Source::Frozen(_) => Vec::new(),
    };
    Ok(FinetuneFigures {
        fwd_ms_per_img: fwd * per,
        step_ms_per_img: step * per,
        step_fwd_ms_per_img: part(0) * per,
        step_bwd_ms_per_img: part(1) * per,
        step_opt_ms_per_img: part(2) * per,
        peak_rss_bytes: peak_rss_bytes(),
        params,
        forward_ops,
    })
}
