//! `automm demo`: the whole product offline in one command.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use automm::app::demo::{DemoData, DemoOptions, DemoReport};
use automm::data::Normalization;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Backbone ONNX (default: the shipped pretrained models/pretrained/efficientnet_lite0.onnx; the
    /// random-init Swin fixture with --synthetic).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Normalisation (default: what the backbone records, as `automm train` reads it, else imagenet).
    #[arg(long)]
    pub normalization: Option<String>,
    /// Your own table instead of the shipped photos (split 80/20 into train and test).
    #[arg(long, requires = "label", conflicts_with = "synthetic")]
    pub data: Option<PathBuf>,
    /// Label column of --data.
    #[arg(long)]
    pub label: Option<String>,
    /// Generated shapes instead of photos: a quick smoke run of the pipeline that needs no photos.
    #[arg(long)]
    pub synthetic: bool,
    /// Work folder.
    #[arg(long, default_value = "runs/demo")]
    pub work_dir: PathBuf,
    /// Epochs per training run.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Set from the global `--quiet`: no progress bars, no INFO lines.
    #[arg(skip)]
    pub quiet: bool,
}

pub fn cmd_demo(a: DemoArgs) -> Result<()> {
    let data = match (a.data, a.label, a.synthetic) {
        (Some(csv), Some(label), _) => DemoData::Table { csv, label },
        (_, _, true) => DemoData::synthetic(),
        _ => DemoData::Photos { per_class: None },
    };
    let opts = DemoOptions {
        work_dir: a.work_dir,
        backbone: a.backbone,
        normalization: a.normalization.as_deref().map(Normalization::parse).transpose()?,
        data,
        epochs: a.epochs,
        quiet: a.quiet,
    };
    let r = automm::app::demo::run(&opts, |line| eprintln!("==> {line}"))?;
    print_report(&r);
    if !r.server_labels_equal || r.server_max_abs_diff > 1e-4 {
        anyhow::bail!("served predictions differ from local ones");
    }
    Ok(())
}

fn print_report(r: &DemoReport) {
    println!("\nResults on the test split of {}\nbackbone: {}\n", r.data, r.backbone.display());
    print!("{}", automm::app::demo::comparison_table(r));
    for run in &r.runs {
        println!("  {:<16} trained with {}", run.title, run.loss);
    }
    let (m, n) = &r.minority;
    let recall = |name: &str| r.minority_recall(name).unwrap_or(f64::NAN);
    let (ce, fo, de) = (recall("cross_entropy"), recall("focal"), recall("default"));
    println!(
        "\nminority class `{m}` ({n} training images): recall {ce:.3} with cross-entropy, {fo:.3} with focal \
         loss ({}), {de:.3} with automm's default",
        if fo > ce { "focal loss raised it" } else { "focal loss did NOT raise it on this run" }
    );
    println!("export verified: max |probability difference| {:.2e} against the model folder", r.export_max_abs_diff);
    println!(
        "server ({} engine), {} test images through the gRPC client vs local predictions: max |probability \
         difference| {:.2e}, labels {}",
        r.server_engine,
        r.served_images,
        r.server_max_abs_diff,
        if r.server_labels_equal { "identical" } else { "DIFFER" }
    );
    println!("\nartefacts:");
    // Relative to where the user stands, when they are below it.
    let here = std::env::current_dir().ok();
    for (what, p) in &r.artefacts {
        let shown = here.as_deref().and_then(|h| p.strip_prefix(h).ok()).unwrap_or(p);
        println!("  {what:<34} {}", shown.display());
    }
    println!("\ndone in {:.0}s", r.seconds);
}
