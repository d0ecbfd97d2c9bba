//! Hyperparameters under AutoGluon MultiModalPredictor's names (`optimization.*` and the newer `optim.*`,
//! `env.*`), parsed from a YAML/JSON map (`--config`) and `--hp key=value` overrides into one typed,
//! validated [`HyperParams`].
//!
//! Keys AutoMM has but automm does not implement are accepted with a warning that says what they would
//! do; anything else is rejected with the closest valid key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::error::{Error, Result};
use crate::loss::Reduction;

/// Which loss trains the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// AutoGluon's multiclass focal loss.
    FocalLoss,
    /// Cross-entropy (optionally label-smoothed).
    CrossEntropy,
}

/// Per-class focal-loss weights as configured (resolved against the class list at training time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alpha {
    /// 1 for every class.
    None,
    /// The tutorial's weights: `w_c = N / n_c`, normalised to sum 1.
    Auto,
    /// Explicit weights in class order.
    List(Vec<f64>),
}

/// Learning-rate schedule (AutoMM's `optimization.lr_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Half-cosine from the peak learning rate to 0.
    CosineDecay,
    /// Linear decay to 0 (AutoMM's polynomial decay with power 1).
    PolynomialDecay,
    /// Linear decay to 0.
    LinearDecay,
    /// No decay after warmup.
    Constant,
}

/// Metric used to pick the best epoch and for early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValMetric {
    /// Fraction correct (AutoMM's default).
    Accuracy,
    /// Mean per-class recall.
    BalancedAccuracy,
    /// Unweighted mean of per-class F1.
    F1Macro,
}

impl ValMetric {
    /// AutoGluon's metric name.
    pub fn name(&self) -> &'static str {
        match self {
            ValMetric::Accuracy => "accuracy",
            ValMetric::BalancedAccuracy => "balanced_accuracy",
            ValMetric::F1Macro => "f1_macro",
        }
    }
}

/// The resolved, validated training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HyperParams {
    /// `optimization.loss_function`.
    pub loss_function: LossKind,
    /// `optimization.focal_loss.alpha`.
    pub focal_alpha: Alpha,
    /// `optimization.focal_loss.gamma`.
    pub focal_gamma: f64,
    /// `optimization.focal_loss.reduction`.
    pub focal_reduction: Reduction,
    /// `optimization.max_epochs`.
    pub max_epochs: usize,
    /// `optimization.learning_rate`.
    pub learning_rate: f64,
    /// `optimization.weight_decay` (AdamW, decoupled).
    pub weight_decay: f64,
    /// `optimization.lr_schedule`.
    pub lr_schedule: LrSchedule,
    /// `optimization.warmup_steps`: a fraction of all steps when < 1, else a step count.
    pub warmup_steps: f64,
    /// `optimization.patience`: epochs without improvement before stopping.
    pub patience: usize,
    /// `optimization.label_smoothing` (cross-entropy only).
    pub label_smoothing: f64,
    /// `optimization.val_metric`.
    pub val_metric: ValMetric,
    /// `env.batch_size`.
    pub batch_size: usize,
    /// `env.num_gpus`: -1 means all available, 0 CPU.
    pub num_gpus: i64,
    /// `env.seed`.
    pub seed: u64,
    /// `optimization.efficient_finetune` (alias `optim.peft`): which backbone initializers train besides
    /// the head.
    #[serde(default)]
    pub efficient_finetune: EfficientFinetune,
    /// `model.backbone.trainable_layers`: initializer-name prefixes that train (e.g. `b15` or
    /// `layers.3`), in addition to `efficient_finetune`.
    #[serde(default)]
    pub trainable_layers: Vec<String>,
    /// `model.timm_image.train_transforms`: augmentations of training images (none by default).
    #[serde(default)]
    pub train_transforms: Vec<Transform>,
}

/// AutoMM's parameter-efficient fine-tuning choices that automm implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EfficientFinetune {
    /// The backbone stays frozen (only the head trains).
    #[default]
    None,
    /// Biases train (BitFit).
    BitFit,
    /// Normalisation scales and shifts plus biases train.
    NormFit,
}

/// A training-time image transform (timm/torchvision names as AutoMM spells them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// `random_resize_crop`: a crop of 8-100% of the area, aspect 3/4-4/3, resized to the input size.
    RandomResizeCrop,
    /// `random_horizontal_flip`: mirror with probability 0.5.
    RandomHorizontalFlip,
    /// `color_jitter`: brightness, contrast and saturation each scaled by a factor in [0.6, 1.4].
    ColorJitter,
}

impl HyperParams {
    /// True when part of the backbone trains (the backbone then runs every epoch).
    pub fn finetunes_backbone(&self) -> bool {
        self.efficient_finetune != EfficientFinetune::None || !self.trainable_layers.is_empty()
    }
}

impl Default for HyperParams {
    fn default() -> Self {
        HyperParams {
            loss_function: LossKind::CrossEntropy,
            focal_alpha: Alpha::None,
            focal_gamma: 2.0,
            focal_reduction: Reduction::Mean,
            max_epochs: 10,
            // AutoMM's 1e-4 is for fine-tuning a whole backbone; a linear head on frozen features
            // needs a larger step to converge in 10 epochs.
            learning_rate: 1e-3,
            weight_decay: 1e-3,
            lr_schedule: LrSchedule::CosineDecay,
            warmup_steps: 0.1,
            patience: 10,
            label_smoothing: 0.0,
            val_metric: ValMetric::Accuracy,
            // AutoMM's 128 (with gradient accumulation) gives a few steps per epoch on small data.
            batch_size: 32,
            num_gpus: -1,
            seed: 0,
            efficient_finetune: EfficientFinetune::None,
            trainable_layers: Vec::new(),
            train_transforms: Vec::new(),
        }
    }
}

/// Supported keys: canonical name, aliases (newer `optim.*` spellings and older ones).
const KEYS: &[(&str, &[&str])] = &[
    ("optimization.loss_function", &["optim.loss_func", "optim.loss_function", "optimization.loss_func"]),
    ("optimization.focal_loss.alpha", &["optim.focal_loss.alpha"]),
    ("optimization.focal_loss.gamma", &["optim.focal_loss.gamma"]),
    ("optimization.focal_loss.reduction", &["optim.focal_loss.reduction"]),
    ("optimization.max_epochs", &["optim.max_epochs"]),
    ("optimization.learning_rate", &["optim.lr", "optim.learning_rate", "optimization.lr"]),
    ("optimization.weight_decay", &["optim.weight_decay"]),
    ("optimization.lr_schedule", &["optim.lr_schedule"]),
    ("optimization.warmup_steps", &["optim.warmup_steps"]),
    ("optimization.patience", &["optim.patience"]),
    ("optimization.label_smoothing", &["optim.label_smoothing"]),
    ("optimization.val_metric", &["optim.val_metric"]),
    ("env.batch_size", &[]),
    ("env.num_gpus", &[]),
    ("env.seed", &[]),
    ("optimization.efficient_finetune", &["optim.peft"]),
    ("model.backbone.trainable_layers", &[]),
    ("model.timm_image.train_transforms", &[]),
];

/// AutoMM keys automm accepts but does not act on, with what they would do.
const ACCEPTED_UNSUPPORTED: &[(&str, &str)] = &[
    ("model.names", "choose which AutoMM model towers to fuse; automm trains one ONNX image backbone plus a linear head"),
    ("model.mmdet_image.", "configure MMDetection object detection; automm does image classification only"),
    ("model.hf_text.", "configure a Hugging Face text tower; automm has no text models"),
    ("model.timm_image.checkpoint_name", "download a timm checkpoint; automm imports a backbone ONNX file given by --backbone"),
    ("model.timm_image.", "configure timm image towers; automm takes the backbone and its preprocessing from --backbone and --normalization"),
    ("model.clip.", "configure a CLIP tower; not available in automm"),
    ("model.fusion_mlp.", "configure late fusion of several towers; automm has one tower"),
    ("model.", "configure an AutoMM model tower; automm trains a linear head on an ONNX backbone"),
    ("data.", "configure AutoMM's data processors; automm reads images and labels as given by --image-column/--label"),
    ("optimization.optim_type", "pick the optimizer; automm always uses AdamW (AutoMM's default)"),
    ("optim.optim_type", "pick the optimizer; automm always uses AdamW (AutoMM's default)"),
    ("optimization.lr_decay", "layer-wise learning-rate decay through the backbone; the backbone is frozen in automm"),
    ("optim.lr_decay", "layer-wise learning-rate decay through the backbone; the backbone is frozen in automm"),
    ("optimization.lr_mult", "a learning-rate multiplier for the head vs the backbone; the backbone is frozen in automm"),
    ("optim.lr_mult", "a learning-rate multiplier for the head vs the backbone; the backbone is frozen in automm"),
    ("optimization.lr_choice", "choose layer-wise lr decay or two-stage lr; the backbone is frozen in automm"),
    ("optim.lr_choice", "choose layer-wise lr decay or two-stage lr; the backbone is frozen in automm"),
    ("optimization.top_k", "average the top-k checkpoints; automm keeps the single best epoch"),
    ("optim.top_k", "average the top-k checkpoints; automm keeps the single best epoch"),
    ("optimization.top_k_average_method", "average the top-k checkpoints; automm keeps the single best epoch"),
    ("optim.top_k_average_method", "average the top-k checkpoints; automm keeps the single best epoch"),
    ("optimization.val_check_interval", "validate several times per epoch; automm validates once per epoch"),
    ("optim.val_check_interval", "validate several times per epoch; automm validates once per epoch"),
    ("optimization.gradient_clip_val", "clip gradient norms; not applied by automm"),
    ("optim.gradient_clip_val", "clip gradient norms; not applied by automm"),
    ("optimization.max_steps", "stop after a number of steps; automm stops by optimization.max_epochs"),
    ("optim.max_steps", "stop after a number of steps; automm stops by optimization.max_epochs"),
    ("env.per_gpu_batch_size", "split batches for gradient accumulation; automm runs env.batch_size at once"),
    ("env.num_workers", "set dataloader worker processes; automm decodes images on all cores"),
    ("env.num_workers_evaluation", "set dataloader worker processes; automm decodes images on all cores"),
    ("env.precision", "choose mixed precision; automm computes in float32"),
    ("env.eval_batch_size_ratio", "scale the evaluation batch size; automm sizes inference batches itself"),
    ("env.strategy", "choose a distributed strategy; automm runs on one device"),
    ("env.accelerator", "choose the Lightning accelerator; automm picks the device from env.num_gpus"),
];

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The canonical key for `key`, if it is one we implement.
fn canonical(key: &str) -> Option<&'static str> {
    KEYS.iter().find(|(k, aliases)| *k == key || aliases.contains(&key)).map(|(k, _)| *k)
}

fn unsupported_reason(key: &str) -> Option<&'static str> {
    ACCEPTED_UNSUPPORTED
        .iter()
        .find(|(k, _)| if k.ends_with('.') { key.starts_with(k) } else { key == *k })
        .map(|(_, why)| *why)
}

fn closest_key(key: &str) -> &'static str {
    let all = KEYS.iter().flat_map(|(k, a)| std::iter::once(*k).chain(a.iter().copied()));
    all.min_by_key(|k| edit_distance(key, k)).unwrap_or("optimization.max_epochs")
}

/// Flattens a nested map into dotted keys (`{optimization: {max_epochs: 3}}` -> `optimization.max_epochs`).
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) -> Result<()> {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let k = match k {
                    Value::String(s) => s.clone(),
                    other => return Err(Error::config(prefix, format!("keys must be strings, found {other:?}"))),
                };
                let full = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                // A mapping is a namespace unless the key itself is a full hyperparameter name.
                if matches!(v, Value::Mapping(_)) && canonical(&full).is_none() {
                    flatten(&full, v, out)?;
                } else {
                    out.push((full, v.clone()));
                }
            }
            Ok(())
        }
        _ => Err(Error::config(prefix, "the config file must hold a map of hyperparameters")),
    }
}

/// Collects hyperparameters from a config file and `key=value` overrides, then validates them.
#[derive(Debug, Default, Clone)]
pub struct HyperParamsBuilder {
    entries: Vec<(String, Value)>,
}

impl HyperParamsBuilder {
    /// An empty builder (all defaults).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every key of a YAML or JSON file (flat dotted keys or nested maps).
    pub fn file(mut self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_yaml::from_str(&text)
            .map_err(|e| Error::Config { key: path.display().to_string(), msg: format!("not valid YAML/JSON: {e}") })?;
        if matches!(v, Value::Null) {
            return Ok(self);
        }
        flatten("", &v, &mut self.entries)?;
        Ok(self)
    }

    /// Adds one `key=value` override (the value is parsed as a YAML scalar or list).
    pub fn set_str(mut self, kv: &str) -> Result<Self> {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::config(kv, "expected KEY=VALUE, e.g. optimization.focal_loss.gamma=1.0"))?;
        let value: Value = serde_yaml::from_str(v.trim()).unwrap_or(Value::String(v.trim().to_string()));
        self.entries.push((k.trim().to_string(), value));
        Ok(self)
    }

    /// Adds one already-typed value.
    pub fn set(mut self, key: &str, value: Value) -> Self {
        self.entries.push((key.to_string(), value));
        self
    }

    /// Validates every entry (later entries override earlier ones) and returns the configuration plus the
    /// warnings for accepted-but-unsupported keys.
    pub fn build(&self) -> Result<(HyperParams, Vec<String>)> {
        self.build_on(HyperParams::default())
    }

    /// Like [`build`](Self::build), but the entries override `base` instead of the defaults (used by
    /// `automm train --resume` to change a saved run's settings).
    pub fn build_on(&self, base: HyperParams) -> Result<(HyperParams, Vec<String>)> {
        let mut hp = base;
        let mut warnings = Vec::new();
        let mut resolved: BTreeMap<&'static str, (&str, &Value)> = BTreeMap::new();
        for (key, value) in &self.entries {
            if let Some(c) = canonical(key) {
                resolved.insert(c, (key.as_str(), value));
            } else if let Some(why) = unsupported_reason(key) {
                warnings.push(format!("hyperparameter `{key}` is accepted but ignored: in AutoMM it would {why}"));
            } else {
                return Err(Error::config(
                    key,
                    format!("unknown hyperparameter; did you mean `{}`?", closest_key(key)),
                ));
            }
        }
        for (canon, (key, v)) in resolved {
            apply(&mut hp, canon, key, v)?;
        }
        Ok((hp, warnings))
    }
}

fn as_f64(key: &str, v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| Error::config(key, "expected a number")),
        Value::String(s) => {
            s.trim().parse::<f64>().map_err(|_| Error::config(key, format!("expected a number, got `{s}`")))
        }
        other => Err(Error::config(key, format!("expected a number, got {}", describe(other)))),
    }
}

fn as_usize(key: &str, v: &Value) -> Result<usize> {
    let x = as_f64(key, v)?;
    if x < 0.0 || x.fract() != 0.0 || x > u32::MAX as f64 {
        return Err(Error::config(key, format!("expected a non-negative integer, got {x}")));
    }
    Ok(x as usize)
}

fn as_str<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    match v {
        Value::String(s) => Ok(s.as_str()),
        other => Err(Error::config(key, format!("expected a string, got {}", describe(other)))),
    }
}

/// A list of strings: a YAML sequence, or a comma-separated string (`b15,head` or `[b15, head]`).
fn string_list(key: &str, v: &Value) -> Result<Vec<String>> {
    let items: Vec<String> = match v {
        Value::Null => Vec::new(),
        Value::Sequence(seq) => {
            seq.iter().map(|x| as_str(key, x).map(|s| s.trim().to_string())).collect::<Result<_>>()?
        }
        Value::String(s) => s
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(|p| p.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        other => return Err(Error::config(key, format!("expected a list of names, got {}", describe(other)))),
    };
    Ok(items)
}

fn describe(v: &Value) -> String {
    serde_yaml::to_string(v).map(|s| format!("`{}`", s.trim())).unwrap_or_else(|_| "a value".into())
}

fn parse_alpha(key: &str, v: &Value) -> Result<Alpha> {
    match v {
        Value::Null => Ok(Alpha::None),
        Value::String(s) => {
            let s = s.trim();
            match s.to_ascii_lowercase().as_str() {
                "auto" => Ok(Alpha::Auto),
                "null" | "none" | "" => Ok(Alpha::None),
                _ => {
                    // Also accept "0.1,0.2,0.7" and "[0.1, 0.2]" from the command line.
                    let inner = s.trim_start_matches('[').trim_end_matches(']');
                    let vals: Result<Vec<f64>> = inner
                        .split(',')
                        .map(|p| {
                            p.trim().parse::<f64>().map_err(|_| {
                                Error::config(key, format!("expected a list of numbers, `auto` or null, got `{s}`"))
                            })
                        })
                        .collect();
                    check_alpha(key, vals?)
                }
            }
        }
        Value::Sequence(seq) => {
            let vals: Result<Vec<f64>> = seq.iter().map(|x| as_f64(key, x)).collect();
            check_alpha(key, vals?)
        }
        Value::Number(_) => Err(Error::config(
            key,
            "expected one weight per class (a list), `auto` or null; a single number is the binary-only form AutoMM does not use for multiclass",
        )),
        other => Err(Error::config(key, format!("expected a list of numbers, `auto` or null, got {}", describe(other)))),
    }
}

fn check_alpha(key: &str, vals: Vec<f64>) -> Result<Alpha> {
    if vals.is_empty() {
        return Err(Error::config(key, "the alpha list is empty; give one weight per class"));
    }
    if let Some((i, x)) = vals.iter().enumerate().find(|(_, x)| !(x.is_finite() && **x >= 0.0)) {
        return Err(Error::config(key, format!("weight {i} is {x}; weights must be finite and >= 0")));
    }
    Ok(Alpha::List(vals))
}

fn apply(hp: &mut HyperParams, canon: &str, key: &str, v: &Value) -> Result<()> {
    match canon {
        "optimization.loss_function" => {
            hp.loss_function = match as_str(key, v)?.to_ascii_lowercase().as_str() {
                "focal_loss" | "focal" => LossKind::FocalLoss,
                "cross_entropy" | "ce" | "auto" => LossKind::CrossEntropy,
                other => {
                    return Err(Error::config(
                        key,
                        format!("unknown loss `{other}`; expected `focal_loss` or `cross_entropy`"),
                    ))
                }
            }
        }
        "optimization.focal_loss.alpha" => hp.focal_alpha = parse_alpha(key, v)?,
        "optimization.focal_loss.gamma" => {
            let g = as_f64(key, v)?;
            if !(g >= 0.0 && g.is_finite()) {
                return Err(Error::config(key, format!("gamma must be a finite number >= 0, got {g}")));
            }
            hp.focal_gamma = g;
        }
        "optimization.focal_loss.reduction" => {
            let s = as_str(key, v)?;
            hp.focal_reduction = match s.to_ascii_lowercase().as_str() {
                "mean" => Reduction::Mean,
                "sum" => Reduction::Sum,
                _ => return Err(Error::config(key, format!("unknown reduction `{s}`; expected `mean` or `sum`"))),
            };
        }
        "optimization.max_epochs" => {
            hp.max_epochs = as_usize(key, v)?;
            if hp.max_epochs == 0 {
                return Err(Error::config(key, "must be at least 1"));
            }
        }
        "optimization.learning_rate" => {
            hp.learning_rate = as_f64(key, v)?;
            if !(hp.learning_rate > 0.0 && hp.learning_rate.is_finite()) {
                return Err(Error::config(key, format!("must be a positive number, got {}", hp.learning_rate)));
            }
        }
        "optimization.weight_decay" => {
            hp.weight_decay = as_f64(key, v)?;
            if !(hp.weight_decay >= 0.0 && hp.weight_decay.is_finite()) {
                return Err(Error::config(key, format!("must be >= 0, got {}", hp.weight_decay)));
            }
        }
        "optimization.lr_schedule" => {
            let s = as_str(key, v)?;
            hp.lr_schedule = match s {
                "cosine_decay" => LrSchedule::CosineDecay,
                "polynomial_decay" => LrSchedule::PolynomialDecay,
                "linear_decay" => LrSchedule::LinearDecay,
                "constant" | "none" => LrSchedule::Constant,
                _ => {
                    return Err(Error::config(
                        key,
                        format!(
                            "unknown schedule `{s}`; expected cosine_decay, polynomial_decay, linear_decay or constant"
                        ),
                    ))
                }
            };
        }
        "optimization.warmup_steps" => {
            hp.warmup_steps = as_f64(key, v)?;
            if !(hp.warmup_steps >= 0.0 && hp.warmup_steps.is_finite()) {
                return Err(Error::config(
                    key,
                    format!("must be >= 0 (a fraction of all steps when < 1), got {}", hp.warmup_steps),
                ));
            }
        }
        "optimization.patience" => hp.patience = as_usize(key, v)?,
        "optimization.label_smoothing" => {
            hp.label_smoothing = as_f64(key, v)?;
            if !(0.0..1.0).contains(&hp.label_smoothing) {
                return Err(Error::config(key, format!("must be in [0, 1), got {}", hp.label_smoothing)));
            }
        }
        "optimization.val_metric" => {
            let s = as_str(key, v)?;
            hp.val_metric = match s.to_ascii_lowercase().as_str() {
                "accuracy" | "acc" => ValMetric::Accuracy,
                "balanced_accuracy" => ValMetric::BalancedAccuracy,
                "f1_macro" => ValMetric::F1Macro,
                _ => {
                    return Err(Error::config(
                        key,
                        format!("unknown metric `{s}`; expected accuracy, balanced_accuracy or f1_macro"),
                    ))
                }
            };
        }
        "env.batch_size" => {
            hp.batch_size = as_usize(key, v)?;
            if hp.batch_size == 0 {
                return Err(Error::config(key, "must be at least 1"));
            }
        }
        "env.num_gpus" => {
            let x = as_f64(key, v)?;
            if x.fract() != 0.0 || x < -1.0 {
                return Err(Error::config(key, format!("expected an integer >= -1 (-1 = all GPUs), got {x}")));
            }
            hp.num_gpus = x as i64;
        }
        "env.seed" => hp.seed = as_usize(key, v)? as u64,
        "optimization.efficient_finetune" => {
            let s = match v {
                Value::Null => "none".to_string(),
                other => as_str(key, other)?.trim().to_ascii_lowercase(),
            };
            hp.efficient_finetune = match s.as_str() {
                "none" | "null" | "" => EfficientFinetune::None,
                "bit_fit" => EfficientFinetune::BitFit,
                "norm_fit" => EfficientFinetune::NormFit,
                other => {
                    return Err(Error::config(
                        key,
                        format!("`{other}` is not implemented; expected `bit_fit`, `norm_fit` or null"),
                    ))
                }
            }
        }
        "model.backbone.trainable_layers" => hp.trainable_layers = string_list(key, v)?,
        "model.timm_image.train_transforms" => {
            let mut out = Vec::new();
            for name in string_list(key, v)? {
                match name.as_str() {
                    "random_resize_crop" | "random_resized_crop" => out.push(Transform::RandomResizeCrop),
                    "random_horizontal_flip" => out.push(Transform::RandomHorizontalFlip),
                    "color_jitter" => out.push(Transform::ColorJitter),
                    // The deterministic resize + crop always runs; AutoMM lists them too.
                    "resize_shorter_side" | "center_crop" | "resize_to_square" => {}
                    other => {
                        return Err(Error::config(
                            key,
                            format!(
                                "unknown transform `{other}`; expected random_resize_crop, random_horizontal_flip, \
                                 color_jitter, resize_shorter_side or center_crop"
                            ),
                        ))
                    }
                }
            }
            hp.train_transforms = out;
        }
        _ => unreachable!("every canonical key is handled"),
    }
    Ok(())
}

impl HyperParams {
    /// Resolves `alpha` against the class list and the per-class training counts, checking its length.
    pub fn resolve_alpha(&self, classes: &[String], counts: &[usize]) -> Result<Option<Vec<f64>>> {
        match &self.focal_alpha {
            Alpha::None => Ok(None),
            Alpha::Auto => crate::loss::auto_alpha(counts).map(Some),
            Alpha::List(v) if v.len() != classes.len() => Err(Error::config(
                "optimization.focal_loss.alpha",
                format!(
                    "has {} weights but the training data has {} classes; give one weight per class in this order: {:?}",
                    v.len(),
                    classes.len(),
                    classes
                ),
            )),
            Alpha::List(v) => Ok(Some(v.clone())),
        }
    }

    /// The number of warmup steps out of `total` steps.
    pub fn warmup_steps_of(&self, total: usize) -> usize {
        if self.warmup_steps < 1.0 {
            (self.warmup_steps * total as f64).round() as usize
        } else {
            self.warmup_steps as usize
        }
    }

    /// Learning rate at `step` (0-based) of `total` steps: linear warmup, then the schedule.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = self.warmup_steps_of(total).min(total);
        if step < warm {
            return self.learning_rate * (step + 1) as f64 / warm as f64;
        }
        let span = (total - warm).max(1) as f64;
        let t = ((step - warm) as f64 / span).clamp(0.0, 1.0);
        self.learning_rate
            * match self.lr_schedule {
                LrSchedule::CosineDecay => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
                LrSchedule::PolynomialDecay | LrSchedule::LinearDecay => 1.0 - t,
                LrSchedule::Constant => 1.0,
            }
    }
}
