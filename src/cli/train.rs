//! `automm train`: train a head (or fine-tune part of the backbone) and write a model folder; `--resume` continues one.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use automm::data::Normalization;
use automm::model::metrics;
use automm::train::config::HyperParamsBuilder;
use automm::train::{resume, train, Event, ResumeOptions, TrainRequest};

/// The three training modes, for `automm train --help` (figures: README "Three modes").
pub const MODES: &str = "\
How much of the backbone trains (--hp KEY=VALUE):
  frozen-feature head (default)  features computed once and cached; only the linear head trains.
                                 Cost: one forward pass per image, then microseconds per epoch.
  parameter-efficient            optimization.efficient_finetune=bit_fit|norm_fit and/or
                                 model.backbone.trainable_layers=PREFIX,...: those initializers train too.
                                 Cost: forward + backward through the trainable part, every epoch.
  full fine-tuning               model.backbone.freeze=false: every parameter of the backbone trains
                                 (learning rate 1e-4 unless set, AutoMM's). Cost: forward + backward through
                                 the whole graph every epoch; EfficientNet-Lite0 1.25-1.7x and Swin-Tiny
                                 1.6-1.9x PyTorch's CPU step time (2-core AVX-512 host, batch 8;
                                 `automm bench finetune` measures it next to PyTorch).";

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training table (CSV or Parquet) with an image-path column and a label column.
    #[arg(long, required_unless_present = "resume")]
    pub train_data: Option<PathBuf>,
    /// Label column.
    #[arg(long, required_unless_present = "resume")]
    pub label: Option<String>,
    /// Image-path column (found automatically when omitted).
    #[arg(long)]
    pub image_column: Option<String>,
    /// Validation table; without it a stratified holdout of the training table is used.
    #[arg(long)]
    pub tuning_data: Option<PathBuf>,
    /// Backbone ONNX file.
    #[arg(long, required_unless_present = "resume")]
    pub backbone: Option<PathBuf>,
    /// Tensor read as features (default: input of the final classifier, or the graph output).
    #[arg(long)]
    pub feature_tensor: Option<String>,
    /// Pixel normalisation: imagenet, symmetric (x/255*2-1, EfficientNet-Lite) or mean_std:R,G,B:R,G,B.
    /// Default: what the backbone records (its metadata, or timm's config.json / Hugging Face's
    /// preprocessor_config.json next to it), else imagenet with a warning.
    #[arg(long)]
    pub normalization: Option<String>,
    /// Output model folder.
    #[arg(long, required_unless_present = "resume")]
    pub output: Option<PathBuf>,
    /// Continue the interrupted run in this model folder from its last checkpoint (everything else comes
    /// from the folder; `--hp` may change settings, e.g. a lower learning rate after a divergence).
    #[arg(long, conflicts_with_all = ["train_data", "label", "image_column", "tuning_data", "backbone", "feature_tensor", "output"])]
    pub resume: Option<PathBuf>,
    /// Hyperparameters file (YAML or JSON), AutoMM key names.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hyperparameter override KEY=VALUE (repeatable), e.g. optimization.focal_loss.gamma=1.0.
    #[arg(long = "hp")]
    pub hp: Vec<String>,
    /// Set from the global `--quiet`: no progress bars, no INFO lines.
    #[arg(skip)]
    pub quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write into `--output` even when it holds files that are not an automm run.
    #[arg(long)]
    pub force: bool,
}

pub fn cmd_train(a: TrainArgs) -> Result<()> {
    let mut b = HyperParamsBuilder::new();
    if let Some(c) = &a.config {
        b = b.file(c)?;
    }
    for kv in &a.hp {
        b = b.set_str(kv)?;
    }
    let log_phase = |e: &Event| {
        if let Event::Phase(p) = e {
            tracing::debug!("phase: {p}");
        }
    };
    let (summary, output) = if let Some(dir) = a.resume {
        let opts = ResumeOptions { overrides: b, quiet: a.quiet, cancel: None };
        (resume(&dir, &opts, log_phase)?, dir)
    } else {
        let (hp, warnings) = b.build()?;
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        // clap guarantees these without --resume.
        let need = |what: &str| anyhow::anyhow!("--{what} is required");
        let output = a.output.ok_or_else(|| need("output"))?;
        let req = TrainRequest {
            train_data: a.train_data.ok_or_else(|| need("train-data"))?,
            label: a.label.ok_or_else(|| need("label"))?,
            image_column: a.image_column,
            tuning_data: a.tuning_data,
            backbone: a.backbone.ok_or_else(|| need("backbone"))?,
            feature_tensor: a.feature_tensor,
            normalization: a.normalization.as_deref().map(Normalization::parse).transpose()?,
            output: output.clone(),
            hp,
            quiet: a.quiet,
            cancel: None,
            force: a.force,
        };
        (train(&req, log_phase)?, output)
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!("epoch  train_loss  val_{}", summary.val_metric);
    for h in &summary.history {
        let mark = if h.epoch == summary.best_epoch { " *" } else { "" };
        println!("{:>5}  {:>10.4}  {:>8.4}{mark}", h.epoch, h.train_loss, h.val_score);
    }
    let (pre, main) = if summary.finetuned.is_empty() {
        ("features", "head")
    } else {
        ("image cache/frozen prefix", "fine-tuning backbone + head")
    };
    println!(
        "\n{} training rows, {} validation rows ({}); {pre} {:.1}s, {main} {:.1}s ({:.1}s per epoch)\n",
        summary.num_train,
        summary.num_val,
        summary.validation_source,
        summary.feature_seconds,
        summary.train_seconds,
        summary.seconds_per_epoch
    );
    print_imbalance(&summary);
    print!("{}", metrics::summary_table(&summary.validation));
    println!("\nmodel folder: {}", output.display());
    Ok(())
}

/// Below this many training rows, a class's validation recall gets a note on how many images it rests on.
const FEW_ROWS: usize = 10;

/// The data's class counts and imbalance, the loss and why, and which recalls rest on few images.
fn print_imbalance(summary: &automm::train::TrainSummary) {
    let v = &summary.validation;
    let counts = &summary.train_counts;
    if counts.is_empty() {
        return;
    }
    let shown: Vec<String> = v.classes.iter().zip(counts).map(|(c, n)| format!("{c} {n}")).collect();
    let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
    println!(
        "training rows per class: {} (imbalance {hi} / {lo} = {:.1})",
        shown.join(", "),
        hi as f64 / lo.max(1) as f64
    );
    if let Some(loss) = summary.loss {
        println!("loss: {loss} ({})", summary.loss_reason);
    }
    for (c, &n) in counts.iter().enumerate().filter(|(_, &n)| n < FEW_ROWS) {
        let (name, support) = (&v.classes[c], v.support.get(c).copied().unwrap_or(0));
        let recall = v.per_class_recall.get(c).copied().unwrap_or(0.0);
        let images = if support == 1 { "image" } else { "images" };
        println!("note: `{name}` has {n} training rows; its validation recall {recall:.3} rests on {support} {images}");
    }
    println!();
}
