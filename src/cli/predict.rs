//! `automm predict`: labels and class probabilities for a table, from a model folder or an exported ONNX file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use automm::data::Table;
use automm::deploy::engine::exported::ExportedModel;
use automm::deploy::engine::EngineKind;
use automm::deploy::export::ExportOptions;
use automm::deploy::predict::{write_predictions, Predictor};
use automm::util::device::select_device;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Model folder written by `automm train`, or an `.onnx` written by `automm export`.
    #[arg(long)]
    pub model: PathBuf,
    /// Engine: candle (default for a model folder) or ort (default for an .onnx when ONNX Runtime is found).
    #[arg(long, value_enum)]
    pub engine: Option<EngineKind>,
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// ORT intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Table of images.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the model folder's backbone is now, when it moved since training (its sha256 is checked).
    #[arg(long, value_name = "ONNX")]
    pub backbone: Option<PathBuf>,

    /// Output CSV.
    #[arg(long)]
    pub output: PathBuf,
    /// Like env.num_gpus: non-zero runs a model folder on candle's CUDA device 0 (automm built with
    /// --features cuda) and an .onnx file on ONNX Runtime's CUDA execution provider; CPU fallback, logged.
    #[arg(long, default_value_t = 0)]
    pub num_gpus: i64,
    /// Set from the global `--quiet`: no progress bars, no INFO lines.
    #[arg(skip)]
    pub quiet: bool,
    /// Post-hoc prior correction (model folders): predict from logits - TAU * log(training class
    /// frequencies). An exported model carries its own (`automm export --prior-correction`).
    #[arg(long, value_name = "TAU")]
    pub prior_correction: Option<f64>,
    /// With --prior-correction: the class frequencies expected at deployment (comma-separated, class order).
    #[arg(long, value_name = "P1,P2,...", requires = "prior_correction")]
    pub target_prior: Option<String>,
}

pub fn cmd_predict(a: PredictArgs) -> Result<()> {
    let is_onnx = a.model.is_file() && a.model.extension().is_some_and(|e| e == "onnx");
    let t0 = std::time::Instant::now();
    let prior = super::prior_correction(a.prior_correction, a.target_prior.as_deref())?;
    if is_onnx && prior.is_some() {
        anyhow::bail!(
            "--prior-correction applies to a model folder; bake it into an export with `automm export --prior-correction`"
        );
    }
    let (rows, engine) = if is_onnx {
        let m = ExportedModel::open_with(&a.model, a.engine, a.threads, a.num_gpus != 0, true)?;
        let table = Table::load(&a.data, None, None)?;
        table.check_files()?;
        let files = table.all_image_refs();
        let preds = m.predict_files(&files, a.batch_size, a.quiet)?;
        write_predictions(&table, &m.meta.classes, &preds, &a.output)?;
        (table.rows.len(), m.engine)
    } else if a.engine == Some(EngineKind::Ort) {
        // A model folder on ORT: export it (merged) to a temporary file and run that.
        let tmp = tempfile::tempdir()?;
        let onnx = tmp.path().join("model.onnx");
        let opts = ExportOptions { prior, backbone: a.backbone.clone(), ..ExportOptions::merged() };
        automm::deploy::export::export(&a.model, &onnx, &opts)?;
        return cmd_predict(PredictArgs {
            model: onnx,
            prior_correction: None,
            target_prior: None,
            backbone: None,
            ..a
        });
    } else {
        let mut p = Predictor::load_with_backbone(&a.model, &select_device(a.num_gpus), a.backbone.as_deref())?;
        p.batch_size = a.batch_size;
        if let Some(c) = &prior {
            p.correct_prior(c)?;
        }
        let table = Table::load_with_hint(&a.data, None, &p.config.image_column)?;
        let preds = p.predict_table(&table, a.quiet)?;
        write_predictions(&table, &p.config.classes, &preds, &a.output)?;
        (table.rows.len(), EngineKind::Candle)
    };
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "wrote {rows} predictions to {} ({} engine, {:.1} images/s)",
        a.output.display(),
        engine,
        rows as f64 / secs.max(1e-9)
    );
    Ok(())
}
