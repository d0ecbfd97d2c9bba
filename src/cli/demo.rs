//! `automm demo`: the whole product offline in one command.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use automm::data::Normalization;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Backbone ONNX (default: models/efficientnet_lite0.onnx when made, else the committed Swin fixture).
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    /// Normalisation (default: symmetric for EfficientNet-Lite files, else imagenet).
    #[arg(long)]
    pub normalization: Option<String>,
    /// Your own table instead of generated data (split 80/20 into train and test).
    #[arg(long, requires = "label")]
    pub data: Option<PathBuf>,
    /// Label column of --data.
    #[arg(long)]
    pub label: Option<String>,
    /// Work folder.
    #[arg(long, default_value = "runs/demo")]
    pub work_dir: PathBuf,
    /// Epochs per training run.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

pub fn cmd_demo(a: DemoArgs) -> Result<()> {
    let opts = automm::app::demo::DemoOptions {
        work_dir: a.work_dir,
        backbone: a.backbone,
        normalization: a.normalization.as_deref().map(Normalization::parse).transpose()?,
        data: a.data.zip(a.label),
        epochs: a.epochs,
        quiet: a.quiet,
        ..Default::default()
    };
    let r = automm::app::demo::run(&opts, |line| eprintln!("==> {line}"))?;
    println!("\nTest-set results (backbone {}):\n", r.backbone.display());
    print!("{}", automm::app::demo::comparison_table(&r));
    let i = r.focal.classes.iter().position(|c| *c == r.minority).unwrap_or(0);
    let (ce, fo) = (r.cross_entropy.per_class_recall[i], r.focal.per_class_recall[i]);
    println!(
        "\nminority class `{}`: recall {:.3} with cross-entropy, {:.3} with focal loss ({})",
        r.minority,
        ce,
        fo,
        if fo > ce { "focal loss raised it" } else { "focal loss did NOT raise it on this run" }
    );
    println!(
        "server ({} engine) vs local predictions: max |probability difference| {:.2e}, labels {}",
        r.server_engine,
        r.server_max_abs_diff,
        if r.server_labels_equal { "identical" } else { "DIFFER" }
    );
    println!("\nartefacts:");
    for (what, p) in &r.artefacts {
        println!("  {what:<28} {}", p.display());
    }
    println!("\ndone in {:.0}s", r.seconds);
    if !r.server_labels_equal || r.server_max_abs_diff > 1e-4 {
        anyhow::bail!("served predictions differ from local ones");
    }
    Ok(())
}
