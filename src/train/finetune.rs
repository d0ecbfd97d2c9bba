//! Fine-tuning the imported backbone, with AutoMM's names: `model.backbone.freeze=false` (full
//! fine-tuning, every parameter), `optimization.efficient_finetune` = `bit_fit` (biases) or `norm_fit`
//! (normalisation scales and shifts plus biases), and `model.backbone.trainable_layers` (initializer-name
//! prefixes, e.g. the last stage). The chosen
//! initializers of the ONNX graph become `Var`s that train with the head; gradients flow back through the
//! imported graph on candle's autograd, with backward passes of our own for the hot ops (depthwise and 1x1
//! convs, Clip, LayerNorm, Softmax, GELU, bias adds, constant operands: `onnx::kernels::grad`).
//!
//! The graph is split at its *frontier*: the part before the first trainable initializer is frozen, so
//! without augmentation its outputs are computed once per image and cached; each epoch then runs only the
//! trainable rest. With augmentation every epoch decodes and transforms the images again (seeded). The
//! training loop ([`crate::train::runner`]) sees a tuned backbone through [`crate::train::source`].

use std::collections::HashSet;

use candle_core::{DType, Device, Tensor, Var};
use candle_onnx::onnx::ModelProto;

use crate::error::{Error, Result};
use crate::model::hparams::{EfficientFinetune, HyperParams};
use crate::onnx::Graph;

/// Initializers of `graph` that train, by `hp`'s backbone settings: every parameter when
/// `model.backbone.freeze` is false ([`parameters`]); else biases for `bit_fit`, normalisation
/// scales/shifts and biases for `norm_fit`, plus every float initializer whose name starts with one of
/// `trainable_layers`. Sorted by name.
pub fn select_trainable(graph: &Graph, hp: &HyperParams) -> Vec<String> {
    select(graph, !hp.freeze, hp.efficient_finetune, &hp.trainable_layers)
}

fn select(graph: &Graph, full: bool, mode: EfficientFinetune, prefixes: &[String]) -> Vec<String> {
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
    if full {
        out.extend(parameters(graph));
    }
    out.extend(inits.iter().filter(|n| prefixes.iter().any(|p| n.starts_with(p.as_str()))).cloned());
    let mut v: Vec<String> = out.into_iter().filter(|n| is_float(n)).collect();
    v.sort();
    v
}

/// The backbone's parameters, what full fine-tuning trains: float initializers of more than one value
/// that some node reads (directly or through a Transpose) as a weight, bias, normalisation scale/shift, embedding table, token or
/// elementwise Add/Mul operand (layer scale, position embedding). Not parameters: scalars (GELU's
/// constants, Clip bounds), BatchNorm's running statistics, Sub/Div operands (normalisation constants
/// baked into a graph), and tensors read only through shape or mask plumbing (an attention mask reaches
/// its Add through Unsqueeze; index tables are integers), nor an additive attention mask fed straight to
/// an Add (values 0 and one large negative number).
pub fn parameters(graph: &Graph) -> HashSet<String> {
    let mut out = HashSet::new();
    for n in graph.nodes() {
        let slots = match n.op_type.as_str() {
            "Conv" | "ConvTranspose" | "Gemm" => 0..3,
            "MatMul" | "Add" | "Mul" => 0..2,
            "LayerNormalization" | "BatchNormalization" | "InstanceNormalization" | "GroupNormalization" => 1..3,
            "Gather" | "Expand" | "Transpose" => 0..1,
            "PRelu" => 1..2,
            "Concat" => 0..n.input.len(),
            _ => 0..0,
        };
        for i in slots {
            let Some(name) = n.input.get(i) else { continue };
            if graph.initializer(name).is_some_and(|t| t.dtype().is_float() && t.elem_count() > 1 && !is_mask(t)) {
                out.insert(name.clone());
            }
        }
    }
    out
}

/// An additive attention mask: only zeros and one value <= -100 (or -inf), both present.
fn is_mask(t: &Tensor) -> bool {
    let Ok(v) = t.flatten_all().and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1::<f32>()) else {
        return false;
    };
    let neg = v.iter().copied().find(|&x| x != 0.0);
    neg.is_some_and(|m| m <= -100.0 && v.iter().all(|&x| x == 0.0 || x == m)) && v.contains(&0.0)
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
                "fine-tuning selected no initializer of the backbone (check model.backbone.freeze, \
                 optimization.efficient_finetune and model.backbone.trainable_layers against the ONNX \
                 initializer names)"
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

    /// Time per op type of one forward pass from frontier values with gradients tracked, slowest first.
    pub fn profile(&self, front: &[Tensor]) -> Result<Vec<crate::onnx::OpTime>> {
        let feeds: Vec<(&str, Tensor)> = self.frontier.iter().map(String::as_str).zip(front.iter().cloned()).collect();
        self.suffix.profile_mode(&feeds, true)
    }

    /// The device the graph runs on.
    pub fn device(&self) -> &Device {
        self.suffix.device()
    }

    /// Number of tensors the frozen prefix hands to the trainable rest.
    pub fn frontier_len(&self) -> usize {
        self.frontier.len()
    }
}

/// Gradients of `sum(features * weights)` with respect to every initializer `hp`'s backbone settings select
/// in the backbone `model` (up to `feature`, detected when None), for the input batch `x`. What
/// `automm onnx grads` writes, to check our backward passes against PyTorch's.
pub fn feature_gradients(
    model: &std::path::Path,
    x: &Tensor,
    weights: &Tensor,
    hp: &HyperParams,
    feature: Option<String>,
) -> Result<Vec<(String, Tensor)>> {
    let proto = crate::onnx::read_model(model)?;
    let feature = match feature {
        Some(t) => t,
        None => crate::onnx::detect_feature_tensor(&proto)?,
    };
    let (dev, name) = (Device::Cpu, model.display().to_string());
    let g = Graph::from_model(&proto, &name, &dev, Some(vec![feature.clone()]))?;
    let trainable = select_trainable(&g, hp);
    let input = g.inputs().first().map(|i| i.name.clone()).unwrap_or_default();
    let size = x.dims().get(2).copied().unwrap_or(224);
    let tb = TunedBackbone::new(&proto, &name, &dev, &input, &feature, &trainable, size)?;
    let f = tb.features(&tb.front(x)?, true)?;
    let grads = f.mul(&weights.reshape(f.dims())?)?.sum_all()?.backward()?;
    tb.vars.iter().map(|(n, v)| Ok((n.clone(), grads.get(v).cloned().unwrap_or(v.as_tensor().zeros_like()?)))).collect()
}
