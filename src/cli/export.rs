//! `automm export`: a model folder to ONNX (merged, head only, or with preprocessing), verified before it lands.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use automm::deploy::export::ExportOptions;
use automm::deploy::meta::ExportKind;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model folder written by `automm train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Output .onnx file.
    #[arg(long, required_unless_present = "triton_repository")]
    pub output: Option<PathBuf>,
    /// Write a Triton model repository entry instead: DIR/<name>/config.pbtxt, DIR/<name>/1/model.onnx
    /// (merged) and DIR/<name>/labels.txt, for Triton's ONNX Runtime backend.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["output", "head_only", "with_preprocessing"])]
    pub triton_repository: Option<PathBuf>,
    /// With --triton-repository: the model's name (default: the model folder's name).
    #[arg(long, requires = "triton_repository")]
    pub model_name: Option<String>,
    /// With --triton-repository: Triton's max_batch_size.
    #[arg(long, default_value_t = 32, requires = "triton_repository")]
    pub max_batch_size: usize,
    /// With --triton-repository: Triton's dynamic_batching max_queue_delay_microseconds.
    #[arg(long, default_value_t = 2000, requires = "triton_repository")]
    pub max_queue_delay_us: u64,
    /// Where the model folder's backbone is now, when it moved since training (its sha256 is checked).
    #[arg(long, value_name = "ONNX")]
    pub backbone: Option<PathBuf>,

    /// Write the head alone (input `features` [N, D]).
    #[arg(long, conflicts_with = "with_preprocessing")]
    pub head_only: bool,
    /// Take uint8 images [N, H, W, 3] at the model's input size and preprocess inside the graph.
    #[arg(long)]
    pub with_preprocessing: bool,
    /// Opset to declare (default: the backbone's).
    #[arg(long)]
    pub opset: Option<i64>,
    /// Run the export on a few training images and fail if probabilities differ by more than 1e-4.
    #[arg(long)]
    pub verify: bool,
    /// Table of images for --verify (default: the training table).
    #[arg(long)]
    pub verify_data: Option<PathBuf>,
    /// Images used by --verify.
    #[arg(long, default_value_t = 8)]
    pub verify_images: usize,
    /// Bake a post-hoc prior correction into the head: logits - TAU * log(training class frequencies)
    /// (1.0 aims at balanced accuracy); recorded in the metadata.
    #[arg(long, value_name = "TAU")]
    pub prior_correction: Option<f64>,
    /// With --prior-correction: the class frequencies expected at deployment (comma-separated, class order).
    #[arg(long, value_name = "P1,P2,...", requires = "prior_correction")]
    pub target_prior: Option<String>,
}

pub fn cmd_export(a: ExportArgs) -> Result<()> {
    let kind = if a.head_only {
        ExportKind::HeadOnly
    } else if a.with_preprocessing {
        ExportKind::WithPreprocessing
    } else {
        ExportKind::Merged
    };
    let opts = ExportOptions {
        kind,
        opset: a.opset,
        verify: a.verify,
        verify_data: a.verify_data,
        verify_images: a.verify_images,
        prior: super::prior_correction(a.prior_correction, a.target_prior.as_deref())?,
        backbone: a.backbone,
    };
    let r = match (&a.triton_repository, &a.output) {
        (Some(repo), _) => {
            let name = match a.model_name {
                Some(n) => n,
                None => a.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
            };
            let t = automm::deploy::triton::TritonOptions {
                name,
                max_batch_size: a.max_batch_size.max(1),
                max_queue_delay_us: a.max_queue_delay_us,
                gpu: false,
            };
            let (r, dir) = automm::deploy::triton::write_repository(&a.model, repo, &opts, &t)?;
            println!("wrote Triton model repository entry {} (config.pbtxt, labels.txt, 1/model.onnx)", dir.display());
            r
        }
        (None, Some(out)) => automm::deploy::export::export(&a.model, out, &opts)?,
        (None, None) => anyhow::bail!("give --output FILE or --triton-repository DIR"),
    };
    println!("wrote {} ({}, {:.1} MB)", r.path.display(), kind.name(), r.bytes as f64 / 1e6);
    if let Some(v) = r.verification {
        println!(
            "verified on {} images with the {} engine: max |probability difference| {:.2e} (tolerance {:.0e}), labels {}",
            v.images,
            v.engine,
            v.max_abs_diff,
            v.tolerance,
            if v.labels_equal { "identical" } else { "DIFFER" }
        );
    }
    Ok(())
}
