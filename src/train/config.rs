//! Hyperparameters under AutoGluon MultiModalPredictor's names (`optimization.*` and the newer `optim.*`,
//! `env.*`), parsed from a YAML/JSON map (`--config`) and `--hp key=value` overrides into one typed,
//! validated [`HyperParams`].
//!
//! Keys AutoMM has but automm does not implement are accepted with a warning that says what they would
//! do; anything else is rejected with the closest valid key.

use std::collections::BTreeMap;
use std::path::Path;

use serde_yaml::Value;

use crate::error::{Error, Result};
use crate::model::hparams::{Alpha, HyperParams, Reduction, Transform, FULL_FINETUNE_LR};

/// A hyperparameter automm implements: its canonical (AutoMM `optimization.*`) name, the other
/// spellings AutoMM accepts (`optim.*` and older ones), and how a value sets it.
struct Key {
    name: &'static str,
    aliases: &'static [&'static str],
    set: fn(&mut HyperParams, &str, &Value) -> Result<()>,
}

/// Every supported key, once.
const KEYS: &[Key] = &[
    Key {
        name: "optimization.loss_function",
        aliases: &["optim.loss_func", "optim.loss_function", "optimization.loss_func"],
        set: |hp, k, v| {
            hp.loss_function = parse_name(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "optimization.focal_loss.alpha",
        aliases: &["optim.focal_loss.alpha"],
        set: |hp, k, v| {
            hp.focal_alpha = parse_alpha(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "optimization.focal_loss.gamma",
        aliases: &["optim.focal_loss.gamma"],
        set: |hp, k, v| {
            hp.focal_gamma = checked(k, as_f64(k, v)?, |g| g >= 0.0, "gamma must be a finite number >= 0")?;
            Ok(())
        },
    },
    Key { name: "optimization.focal_loss.reduction", aliases: &["optim.focal_loss.reduction"], set: set_reduction },
    Key {
        name: "optimization.logit_adjustment.tau",
        aliases: &["optim.logit_adjustment.tau"],
        set: |hp, k, v| {
            hp.logit_tau = checked(k, as_f64(k, v)?, |t| t >= 0.0, "tau must be a finite number >= 0")?;
            Ok(())
        },
    },
    Key {
        name: "optimization.max_epochs",
        aliases: &["optim.max_epochs"],
        set: |hp, k, v| {
            hp.max_epochs = at_least_one(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "optimization.learning_rate",
        aliases: &["optim.lr", "optim.learning_rate", "optimization.lr"],
        set: |hp, k, v| {
            hp.learning_rate = checked(k, as_f64(k, v)?, |x| x > 0.0, "must be a positive number")?;
            Ok(())
        },
    },
    Key {
        name: "optimization.weight_decay",
        aliases: &["optim.weight_decay"],
        set: |hp, k, v| {
            hp.weight_decay = checked(k, as_f64(k, v)?, |x| x >= 0.0, "must be >= 0")?;
            Ok(())
        },
    },
    Key {
        name: "optimization.lr_schedule",
        aliases: &["optim.lr_schedule"],
        set: |hp, k, v| {
            hp.lr_schedule = parse_name(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "optimization.warmup_steps",
        aliases: &["optim.warmup_steps"],
        set: |hp, k, v| {
            let why = "must be >= 0 (a fraction of all steps when < 1)";
            {
                hp.warmup_steps = checked(k, as_f64(k, v)?, |x| x >= 0.0, why)?;
                Ok(())
            }
        },
    },
    Key {
        name: "optimization.patience",
        aliases: &["optim.patience"],
        set: |hp, k, v| {
            hp.patience = as_usize(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "optimization.label_smoothing",
        aliases: &["optim.label_smoothing"],
        set: |hp, k, v| {
            hp.label_smoothing = checked(k, as_f64(k, v)?, |x| (0.0..1.0).contains(&x), "must be in [0, 1)")?;
            Ok(())
        },
    },
    Key {
        name: "optimization.val_metric",
        aliases: &["optim.val_metric"],
        set: |hp, k, v| {
            hp.val_metric = parse_name(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "env.batch_size",
        aliases: &[],
        set: |hp, k, v| {
            hp.batch_size = at_least_one(k, v)?;
            Ok(())
        },
    },
    Key { name: "env.num_gpus", aliases: &[], set: set_num_gpus },
    Key {
        name: "env.seed",
        aliases: &[],
        set: |hp, k, v| {
            hp.seed = as_usize(k, v)? as u64;
            Ok(())
        },
    },
    Key {
        name: "optimization.efficient_finetune",
        aliases: &["optim.peft"],
        set: |hp, k, v| {
            hp.efficient_finetune = match v {
                Value::Null => Default::default(),
                other => as_str(k, other)?.parse().map_err(|e| {
                    Error::config(k, format!("{e} (or null); other AutoMM methods such as `lora` are not implemented"))
                })?,
            };
            Ok(())
        },
    },
    Key {
        name: "model.backbone.trainable_layers",
        aliases: &[],
        set: |hp, k, v| {
            hp.trainable_layers = string_list(k, v)?;
            Ok(())
        },
    },
    Key {
        name: "model.backbone.freeze",
        aliases: &[],
        set: |hp, k, v| {
            hp.freeze =
                v.as_bool().ok_or_else(|| Error::config(k, format!("expected true or false, got {}", describe(v))))?;
            Ok(())
        },
    },
    Key { name: "model.timm_image.train_transforms", aliases: &[], set: set_transforms },
];

/// AutoMM keys automm accepts but does not act on, with what they would do.
const ACCEPTED_UNSUPPORTED: &[(&str, &str)] = &[
    ("model.names", "choose which AutoMM model towers to fuse; automm trains one ONNX image backbone plus a linear head"),
    ("model.mmdet_image.", "configure MMDetection object detection; automm does image classification only"),
    ("model.hf_text.", "configure a Hugging Face text tower; automm has no text models"),
    ("model.timm_image.checkpoint_name", "download a timm checkpoint and fine-tune all of it; automm imports the backbone ONNX file given by --backbone and trains a frozen-feature head on it unless model.backbone.freeze=false"),
    ("model.timm_image.", "configure timm image towers; automm takes the backbone and its preprocessing from --backbone and --normalization"),
    ("model.clip.", "configure a CLIP tower; not available in automm"),
    ("model.fusion_mlp.", "configure late fusion of several towers; automm has one tower"),
    ("model.", "configure an AutoMM model tower; automm trains a linear head on an ONNX backbone"),
    ("data.", "configure AutoMM's data processors; automm reads images and labels as given by --image-column/--label"),
    ("optimization.optim_type", "pick the optimizer; automm always uses AdamW (AutoMM's default)"),
    ("optim.optim_type", "pick the optimizer; automm always uses AdamW (AutoMM's default)"),
    ("optimization.lr_decay", "layer-wise learning-rate decay through the backbone; automm uses one learning rate for the head and any backbone parameters"),
    ("optim.lr_decay", "layer-wise learning-rate decay through the backbone; automm uses one learning rate for the head and any backbone parameters"),
    ("optimization.lr_mult", "a learning-rate multiplier for the head vs the backbone; automm uses one learning rate for both"),
    ("optim.lr_mult", "a learning-rate multiplier for the head vs the backbone; automm uses one learning rate for both"),
    ("optimization.lr_choice", "choose layer-wise lr decay or two-stage lr; automm uses one learning rate for the head and the backbone"),
    ("optim.lr_choice", "choose layer-wise lr decay or two-stage lr; automm uses one learning rate for the head and the backbone"),
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
fn canonical(key: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == key || k.aliases.contains(&key))
}

fn unsupported_reason(key: &str) -> Option<&'static str> {
    ACCEPTED_UNSUPPORTED
        .iter()
        .find(|(k, _)| if k.ends_with('.') { key.starts_with(k) } else { key == *k })
        .map(|(_, why)| *why)
}

fn closest_key(key: &str) -> &'static str {
    let all = KEYS.iter().flat_map(|k| std::iter::once(k.name).chain(k.aliases.iter().copied()));
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
        let base_frozen = base.freeze;
        let mut hp = base;
        let mut warnings = Vec::new();
        // Later spellings of the same key override earlier ones; keys apply in table order.
        let mut resolved: BTreeMap<usize, (&str, &Value)> = BTreeMap::new();
        for (key, value) in &self.entries {
            if let Some(c) = canonical(key) {
                resolved.insert(KEYS.iter().position(|k| std::ptr::eq(k, c)).unwrap_or(0), (key.as_str(), value));
            } else if let Some(why) = unsupported_reason(key) {
                warnings.push(format!("hyperparameter `{key}` is accepted but ignored: in AutoMM it would {why}"));
            } else {
                return Err(Error::config(
                    key,
                    format!("unknown hyperparameter; did you mean `{}`?", closest_key(key)),
                ));
            }
        }
        let sets_lr =
            resolved.values().any(|(k, _)| canonical(k).is_some_and(|c| c.name == "optimization.learning_rate"));
        for (index, (key, v)) in resolved {
            (KEYS[index].set)(&mut hp, key, v)?;
        }
        // A whole backbone needs a smaller step than a head on frozen features (AutoMM's 1e-4).
        if base_frozen && !hp.freeze && !sets_lr {
            hp.learning_rate = FULL_FINETUNE_LR;
            tracing::info!("full fine-tuning: optimization.learning_rate defaults to {FULL_FINETUNE_LR} (AutoMM's)");
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

/// A value of a [`crate::named_enum!`] type, the error naming the key and the valid names.
fn parse_name<T: std::str::FromStr<Err = crate::util::names::UnknownName>>(key: &str, v: &Value) -> Result<T> {
    as_str(key, v)?.parse().map_err(|e: crate::util::names::UnknownName| Error::config(key, e.to_string()))
}

/// `x` when finite and `ok(x)`, else an error saying `why`.
fn checked(key: &str, x: f64, ok: impl Fn(f64) -> bool, why: &str) -> Result<f64> {
    if x.is_finite() && ok(x) {
        Ok(x)
    } else {
        Err(Error::config(key, format!("{why}, got {x}")))
    }
}

fn at_least_one(key: &str, v: &Value) -> Result<usize> {
    match as_usize(key, v)? {
        0 => Err(Error::config(key, "must be at least 1")),
        n => Ok(n),
    }
}

fn set_reduction(hp: &mut HyperParams, key: &str, v: &Value) -> Result<()> {
    // `none` (per-sample losses) is a loss-function option, not a training choice.
    hp.focal_reduction = match parse_name(key, v)? {
        Reduction::None => return Err(Error::config(key, "unknown reduction `none`; expected `mean` or `sum`")),
        r => r,
    };
    Ok(())
}

fn set_num_gpus(hp: &mut HyperParams, key: &str, v: &Value) -> Result<()> {
    let x = as_f64(key, v)?;
    if x.fract() != 0.0 || x < -1.0 {
        return Err(Error::config(key, format!("expected an integer >= -1 (-1 = all GPUs), got {x}")));
    }
    hp.num_gpus = x as i64;
    Ok(())
}

fn set_transforms(hp: &mut HyperParams, key: &str, v: &Value) -> Result<()> {
    // The deterministic resize + crop always runs; AutoMM lists them too.
    const ALWAYS: &[&str] = &["resize_shorter_side", "center_crop", "resize_to_square"];
    let mut out = Vec::new();
    for name in string_list(key, v)? {
        if ALWAYS.contains(&name.as_str()) {
            continue;
        }
        out.push(
            name.parse::<Transform>()
                .map_err(|e| Error::config(key, format!("{e} (resize_shorter_side and center_crop always run)")))?,
        );
    }
    hp.train_transforms = out;
    Ok(())
}
