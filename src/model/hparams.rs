//! The resolved hyperparameters a model folder records (`config.json` `hyperparameters`), as typed
//! values. Parsing AutoMM's keys into them lives in [`crate::train::config`]; this is only the data, so
//! that deployment code can read a model folder without linking training code.

use serde::{Deserialize, Serialize};

crate::named_enum! {
    /// Which loss trains the head.
    pub enum LossKind("loss") {
        /// AutoGluon's multiclass focal loss.
        FocalLoss = "focal_loss" | "focal",
        /// Cross-entropy (optionally label-smoothed).
        CrossEntropy = "cross_entropy" | "ce",
        /// Cross-entropy on `logits + tau * log(prior)` (Menon et al. 2021; = Balanced Softmax): the
        /// imbalance-aware loss, predictions use the raw logits.
        LogitAdjusted = "logit_adjusted" | "balanced_softmax",
        /// Chosen from the training data when a run starts: `logit_adjusted` when the largest class has
        /// at least [`IMBALANCE_RATIO`] times the rows of the smallest, else `cross_entropy`.
        Auto = "auto",
    }
}

crate::named_enum! {
    /// How per-sample losses are combined.
    pub enum Reduction("reduction") {
        /// Plain mean over samples.
        Mean = "mean",
        /// Sum over samples.
        Sum = "sum",
        /// Per-sample values, shape `[N]`.
        None = "none",
    }
}

crate::named_enum! {
    /// Learning-rate schedule (AutoMM's `optimization.lr_schedule`).
    pub enum LrSchedule("schedule") {
        /// Half-cosine from the peak learning rate to 0.
        CosineDecay = "cosine_decay",
        /// Linear decay to 0 (AutoMM's polynomial decay with power 1).
        PolynomialDecay = "polynomial_decay",
        /// Linear decay to 0.
        LinearDecay = "linear_decay",
        /// No decay after warmup.
        Constant = "constant" | "none",
    }
}

crate::named_enum! {
    /// Metric used to pick the best epoch and for early stopping.
    pub enum ValMetric("metric") {
        /// Fraction correct (AutoMM's default).
        Accuracy = "accuracy" | "acc",
        /// Mean per-class recall.
        BalancedAccuracy = "balanced_accuracy",
        /// Unweighted mean of per-class F1.
        F1Macro = "f1_macro",
    }
}

crate::named_enum! {
    /// AutoMM's parameter-efficient fine-tuning choices that automm implements.
    pub enum EfficientFinetune("efficient_finetune") {
        /// The backbone stays frozen (only the head trains).
        None = "none" | "null" | "",
        /// Biases train (BitFit).
        BitFit = "bit_fit",
        /// Normalisation scales and shifts plus biases train.
        NormFit = "norm_fit",
    }
}

// `named_enum!` derives a fixed set of traits, so `#[default]` is not available here.
#[allow(clippy::derivable_impls)]
impl Default for EfficientFinetune {
    fn default() -> Self {
        EfficientFinetune::None
    }
}

pub use crate::data::augment::Transform;

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

/// Largest / smallest training class count from which the `auto` loss is `logit_adjusted`.
pub const IMBALANCE_RATIO: f64 = 3.0;

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
    /// `optimization.logit_adjustment.tau`: the weight of log(prior) in the logit-adjusted loss.
    #[serde(default = "default_tau")]
    pub logit_tau: f64,
    /// Why `loss_function` is what it is (recorded by a run; e.g. the imbalance that chose it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_reason: Option<String>,
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
    /// `model.backbone.freeze`: false = full fine-tuning, every parameter of the backbone trains with the
    /// head (true, the default, keeps automm's frozen-feature head unless `efficient_finetune` or
    /// `trainable_layers` pick some).
    #[serde(default = "frozen")]
    pub freeze: bool,
}

fn default_tau() -> f64 {
    1.0
}

fn frozen() -> bool {
    true
}

/// The learning rate of a full fine-tuning run that sets none (AutoMM's default, for a whole backbone).
pub const FULL_FINETUNE_LR: f64 = 1e-4;

/// How much of the backbone trains with the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneMode {
    /// Frozen: features are computed once and cached, only the linear head trains (the default; fastest).
    Frozen,
    /// Parameter-efficient: `efficient_finetune` (bit_fit/norm_fit) and/or `trainable_layers` train too.
    Efficient,
    /// Full fine-tuning (`model.backbone.freeze=false`): every parameter of the backbone trains.
    Full,
}

impl std::fmt::Display for BackboneMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackboneMode::Frozen => "frozen backbone (head only)",
            BackboneMode::Efficient => "parameter-efficient fine-tuning",
            BackboneMode::Full => "full fine-tuning",
        })
    }
}

impl HyperParams {
    /// True when part of the backbone trains (the backbone then runs every epoch).
    pub fn finetunes_backbone(&self) -> bool {
        self.backbone_mode() != BackboneMode::Frozen
    }

    /// How much of the backbone trains.
    pub fn backbone_mode(&self) -> BackboneMode {
        if !self.freeze {
            BackboneMode::Full
        } else if self.efficient_finetune != EfficientFinetune::None || !self.trainable_layers.is_empty() {
            BackboneMode::Efficient
        } else {
            BackboneMode::Frozen
        }
    }
}

impl HyperParams {
    /// The settings this configuration carries but will not use, one sentence each: loss-specific keys
    /// set away from their defaults while another loss trains (call it once `loss_function` is resolved),
    /// and parameter-efficient choices under full fine-tuning, which trains everything anyway.
    pub fn ignored_settings(&self) -> Vec<String> {
        let d = HyperParams::default();
        let loss = self.loss_function;
        let mut out = Vec::new();
        let mut unused = |keys: &[&str], applies: LossKind| {
            if loss != applies && loss != LossKind::Auto {
                out.push(format!(
                    "{} {} ignored: the loss is {loss}, and {} only with optimization.loss_function={applies}",
                    keys.join(", "),
                    if keys.len() == 1 { "is" } else { "are" },
                    if keys.len() == 1 { "it applies" } else { "they apply" },
                ));
            }
        };
        let mut focal = Vec::new();
        if self.focal_alpha != d.focal_alpha {
            focal.push("optimization.focal_loss.alpha");
        }
        if self.focal_gamma != d.focal_gamma {
            focal.push("optimization.focal_loss.gamma");
        }
        if self.focal_reduction != d.focal_reduction {
            focal.push("optimization.focal_loss.reduction");
        }
        if !focal.is_empty() {
            unused(&focal, LossKind::FocalLoss);
        }
        if self.logit_tau != d.logit_tau {
            unused(&["optimization.logit_adjustment.tau"], LossKind::LogitAdjusted);
        }
        if self.label_smoothing != d.label_smoothing {
            unused(&["optimization.label_smoothing"], LossKind::CrossEntropy);
        }
        if !self.freeze && (self.efficient_finetune != EfficientFinetune::None || !self.trainable_layers.is_empty()) {
            out.push(
                "optimization.efficient_finetune / model.backbone.trainable_layers are ignored:                  model.backbone.freeze=false trains every parameter of the backbone"
                    .to_string(),
            );
        }
        out
    }
}

impl Default for HyperParams {
    fn default() -> Self {
        HyperParams {
            loss_function: LossKind::Auto,
            focal_alpha: Alpha::None,
            focal_gamma: 2.0,
            focal_reduction: Reduction::Mean,
            logit_tau: 1.0,
            loss_reason: None,
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
            freeze: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_the_chosen_loss_ignores_are_named() {
        let mut hp = HyperParams { focal_gamma: 1.0, focal_reduction: Reduction::Sum, ..HyperParams::default() };
        hp.loss_function = LossKind::CrossEntropy;
        let w = hp.ignored_settings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("optimization.focal_loss.gamma, optimization.focal_loss.reduction are ignored"),
            "{}",
            w[0]
        );
        assert!(w[0].contains("the loss is cross_entropy"), "{}", w[0]);
        hp.loss_function = LossKind::FocalLoss;
        assert!(hp.ignored_settings().is_empty());
        hp.label_smoothing = 0.1;
        hp.logit_tau = 0.5;
        assert_eq!(hp.ignored_settings().len(), 2, "{:?}", hp.ignored_settings());
        let full = HyperParams { freeze: false, trainable_layers: vec!["b1".into()], ..HyperParams::default() };
        assert!(full.ignored_settings()[0].contains("freeze=false"));
        assert!(HyperParams::default().ignored_settings().is_empty());
    }
}
