//! `automm evaluate`: score a model folder on a labelled table.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use automm::data::Table;
use automm::deploy::predict::Predictor;
use automm::model::metrics;
use automm::util::device::select_device;

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Model folder written by `automm train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled table.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the model folder's backbone is now, when it moved since training (its sha256 is checked).
    #[arg(long, value_name = "ONNX")]
    pub backbone: Option<PathBuf>,

    /// Comma-separated metric names (AutoGluon's).
    #[arg(long, default_value = "accuracy,balanced_accuracy,f1_macro")]
    pub metrics: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Set from the global `--quiet`: no progress bars, no INFO lines.
    #[arg(skip)]
    pub quiet: bool,
    /// Post-hoc prior correction: predict from logits - TAU * log(training class frequencies).
    #[arg(long, value_name = "TAU")]
    pub prior_correction: Option<f64>,
    /// With --prior-correction: the class frequencies expected at deployment (comma-separated, class order).
    #[arg(long, value_name = "P1,P2,...", requires = "prior_correction")]
    pub target_prior: Option<String>,
}

pub fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let names: Vec<String> = a.metrics.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let names = metrics::parse_names("--metrics", &names)?;
    let mut p = Predictor::load_with_backbone(&a.model, &select_device(0), a.backbone.as_deref())?;
    if let Some(c) = super::prior_correction(a.prior_correction, a.target_prior.as_deref())? {
        p.correct_prior(&c)?;
    }
    let table = Table::load_with_hint(&a.data, Some(&p.config.label_column), &p.config.image_column)?;
    let r = p.evaluate(&table, a.quiet)?;
    if a.json {
        let mut m: serde_json::Map<String, serde_json::Value> =
            names.iter().map(|n| (n.name().to_string(), serde_json::json!(r.get(*n)))).collect();
        let recall: serde_json::Map<String, serde_json::Value> =
            r.classes.iter().zip(&r.per_class_recall).map(|(c, v)| (c.clone(), serde_json::json!(v))).collect();
        m.insert("per_class_recall".into(), recall.into());
        m.insert("confusion_matrix".into(), serde_json::json!(r.confusion));
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{}", metrics::summary_table_of(&r, &names));
    }
    Ok(())
}
