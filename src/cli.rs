//! Command-line interface: clap commands mapped onto library calls. Printing lives here; the work lives
//! in the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use automm::config::HyperParamsBuilder;
use automm::data::{Normalization, Table};
use automm::export::{ExportKind, ExportOptions};
use automm::infer::exported::ExportedModel;
use automm::infer::EngineKind;
use automm::metrics;
use automm::predict::{write_predictions, Predictor};
use automm::train::{select_device, train, Event, TrainRequest};

/// automm: train and deploy image classifiers on imbalanced data.
#[derive(Parser, Debug)]
#[command(name = "automm", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a classifier head on a frozen ONNX backbone.
    Train(TrainArgs),
    /// Score a trained model on a labelled table.
    Evaluate(EvaluateArgs),
    /// Predict labels and class probabilities for a table.
    Predict(PredictArgs),
    /// Run or compare ONNX models on the candle engine.
    #[command(subcommand)]
    Onnx(OnnxCommand),
    /// Write a trained model to ONNX: backbone + head (default), head only, or with preprocessing inside.
    Export(ExportArgs),
    /// Show what automm finds on this machine: ONNX Runtime, CUDA, threads.
    Doctor,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training table (CSV or Parquet) with an image-path column and a label column.
    #[arg(long)]
    pub train_data: PathBuf,
    /// Label column.
    #[arg(long)]
    pub label: String,
    /// Image-path column (found automatically when omitted).
    #[arg(long)]
    pub image_column: Option<String>,
    /// Validation table; without it a stratified holdout of the training table is used.
    #[arg(long)]
    pub tuning_data: Option<PathBuf>,
    /// Backbone ONNX file.
    #[arg(long)]
    pub backbone: PathBuf,
    /// Tensor read as features (default: input of the final classifier, or the graph output).
    #[arg(long)]
    pub feature_tensor: Option<String>,
    /// Pixel normalisation: imagenet (default), symmetric (x/255*2-1, EfficientNet-Lite) or mean_std:R,G,B:R,G,B.
    #[arg(long, default_value = "imagenet")]
    pub normalization: String,
    /// Output model folder.
    #[arg(long)]
    pub output: PathBuf,
    /// Hyperparameters file (YAML or JSON), AutoMM key names.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Hyperparameter override KEY=VALUE (repeatable), e.g. optimization.focal_loss.gamma=1.0.
    #[arg(long = "hp")]
    pub hp: Vec<String>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// Model folder written by `automm train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled table.
    #[arg(long)]
    pub data: PathBuf,
    /// Comma-separated metric names (AutoGluon's).
    #[arg(long, default_value = "accuracy,balanced_accuracy,f1_macro")]
    pub metrics: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

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
    /// Output CSV.
    #[arg(long)]
    pub output: PathBuf,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Model folder written by `automm train`.
    #[arg(long)]
    pub model: PathBuf,
    /// Output .onnx file.
    #[arg(long)]
    pub output: PathBuf,
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
}

#[derive(Subcommand, Debug)]
pub enum OnnxCommand {
    /// Run a model on an .npy input and write the first output as .npy.
    Run {
        /// The ONNX model.
        model: PathBuf,
        /// Input array (.npy, float32).
        #[arg(long)]
        input: PathBuf,
        /// Output array (.npy).
        #[arg(long)]
        output: PathBuf,
        /// Tensor to read (default: the graph's first output).
        #[arg(long)]
        tensor: Option<String>,
        /// Engine.
        #[arg(long, value_enum, default_value = "candle")]
        engine: EngineKind,
    },
    /// Compare candle and ONNX Runtime on one model: max abs diff and ms per image.
    Compare {
        /// The ONNX model.
        model: PathBuf,
        /// Input array (.npy); otherwise a seeded random batch.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Batch size of the random input.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tensor to compare (default: the graph's first output; `features` = the detected feature tensor).
        #[arg(long)]
        tensor: Option<String>,
        /// Timed runs per engine (after one warm-up).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// ORT intra-op threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Predict(a) => cmd_predict(a),
        Command::Export(a) => cmd_export(a),
        Command::Doctor => cmd_doctor(),
        Command::Onnx(OnnxCommand::Run { model, input, output, tensor, engine }) => {
            onnx_run(&model, &input, &output, tensor, engine)
        }
        Command::Onnx(OnnxCommand::Compare { model, input, batch, tensor, runs, threads, json }) => {
            let x = match &input {
                Some(p) => automm::onnx::read_npy(p)?,
                None => random_input(&model, batch)?,
            };
            let tensor = match tensor.as_deref() {
                Some("features") => Some(automm::onnx::detect_feature_tensor(&automm::onnx::read_model(&model)?)?),
                other => other.map(str::to_string),
            };
            let c = automm::infer::compare(&model, &x, tensor.as_deref(), runs, threads)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "model {}  tensor `{}`  input {:?} -> {:?}",
                    c.model.display(),
                    c.tensor,
                    c.input_shape,
                    c.output_shape
                );
                println!("max |candle - ort| = {:.3e}", c.max_abs_diff);
                let ort_ms = c.timings[1].ms_per_image;
                for t in &c.timings {
                    println!("{:<7} {:>9.2} ms/img  ({:.2}x ORT)", t.engine, t.ms_per_image, t.ms_per_image / ort_ms);
                }
            }
            Ok(())
        }
    }
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let mut b = HyperParamsBuilder::new();
    if let Some(c) = &a.config {
        b = b.file(c)?;
    }
    for kv in &a.hp {
        b = b.set_str(kv)?;
    }
    let (hp, warnings) = b.build()?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let req = TrainRequest {
        train_data: a.train_data,
        label: a.label,
        image_column: a.image_column,
        tuning_data: a.tuning_data,
        backbone: a.backbone,
        feature_tensor: a.feature_tensor,
        normalization: Normalization::parse(&a.normalization)?,
        output: a.output.clone(),
        hp,
        quiet: a.quiet,
    };
    let summary = train(&req, |e| {
        if let Event::Phase(p) = e {
            tracing::info!("phase: {p}");
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    println!("epoch  train_loss  val_{}", summary.val_metric);
    for h in &summary.history {
        let mark = if h.epoch == summary.best_epoch { " *" } else { "" };
        println!("{:>5}  {:>10.4}  {:>8.4}{mark}", h.epoch, h.train_loss, h.val_score);
    }
    println!(
        "\n{} training rows, {} validation rows ({}); features {:.1}s, head {:.1}s\n",
        summary.num_train, summary.num_val, summary.validation_source, summary.feature_seconds, summary.train_seconds
    );
    print!("{}", metrics::summary_table(&summary.validation));
    println!("\nmodel folder: {}", a.output.display());
    Ok(())
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    let names: Vec<String> = a.metrics.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    metrics::check_names(&names)?;
    let p = Predictor::load(&a.model, &select_device(0))?;
    let table = Table::load(
        &a.data,
        Some(&p.config.label_column),
        Some(&p.config.image_column).filter(|c| has_column(&a.data, c)).map(|s| s.as_str()),
    )?;
    let r = p.evaluate(&table, a.quiet)?;
    if a.json {
        let mut m: serde_json::Map<String, serde_json::Value> =
            names.iter().map(|n| (n.clone(), serde_json::json!(r.get(n)))).collect();
        let recall: serde_json::Map<String, serde_json::Value> =
            r.classes.iter().zip(&r.per_class_recall).map(|(c, v)| (c.clone(), serde_json::json!(v))).collect();
        m.insert("per_class_recall".into(), recall.into());
        m.insert("confusion_matrix".into(), serde_json::json!(r.confusion));
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        for n in &names {
            println!("{n:<18} {:.4}", r.get(n));
        }
        println!();
        print!("{}", metrics::summary_table(&r));
    }
    Ok(())
}

fn has_column(path: &std::path::Path, col: &str) -> bool {
    automm::data::table::read_frame(path).map(|df| df.column(col).is_ok()).unwrap_or(false)
}

fn cmd_predict(a: PredictArgs) -> Result<()> {
    let is_onnx = a.model.is_file() && a.model.extension().is_some_and(|e| e == "onnx");
    let t0 = std::time::Instant::now();
    let (rows, engine) = if is_onnx {
        let m = ExportedModel::open(&a.model, a.engine, a.threads)?;
        let table = Table::load(&a.data, None, None)?;
        table.check_files()?;
        let files: Vec<_> = table.rows.iter().map(|r| (r.image.clone(), Some(r.row))).collect();
        let preds = m.predict_files(&files, a.batch_size, a.quiet)?;
        write_predictions(&table, &m.meta.classes, &preds, &a.output)?;
        (table.rows.len(), m.engine)
    } else if a.engine == Some(EngineKind::Ort) {
        // A model folder on ORT: export it (merged) to a temporary file and run that.
        let tmp = tempfile::tempdir()?;
        let onnx = tmp.path().join("model.onnx");
        let opts =
            ExportOptions { kind: ExportKind::Merged, opset: None, verify: false, verify_data: None, verify_images: 0 };
        automm::export::export(&a.model, &onnx, &opts)?;
        return cmd_predict(PredictArgs { model: onnx, ..a });
    } else {
        let mut p = Predictor::load(&a.model, &select_device(0))?;
        p.batch_size = a.batch_size;
        let img_col = Some(p.config.image_column.as_str()).filter(|c| has_column(&a.data, c));
        let table = Table::load(&a.data, None, img_col)?;
        let preds = p.predict_table(&table, a.quiet)?;
        write_predictions(&table, &p.config.classes, &preds, &a.output)?;
        (table.rows.len(), EngineKind::Candle)
    };
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "wrote {rows} predictions to {} ({:?} engine, {:.1} images/s)",
        a.output.display(),
        engine,
        rows as f64 / secs.max(1e-9)
    );
    Ok(())
}

fn cmd_export(a: ExportArgs) -> Result<()> {
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
    };
    let r = automm::export::export(&a.model, &a.output, &opts)?;
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

fn cmd_doctor() -> Result<()> {
    println!("automm {}", env!("CARGO_PKG_VERSION"));
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("threads: {threads} available; rayon pool {}", rayon::current_num_threads());
    match automm::infer::ort::locate() {
        Ok(loc) => {
            println!("ONNX Runtime: {} (found via {})", loc.path.display(), loc.source);
            match automm::infer::ort::loaded() {
                Ok((_, info)) => println!("  {info}"),
                Err(e) => println!("  cannot load it: {e}"),
            }
        }
        Err(e) => println!("ONNX Runtime: not found. {e}"),
    }
    println!("CUDA (candle): {}", automm::train::cuda_status());
    println!("CUDA (ONNX Runtime): {}", automm::infer::ort::cuda_status());
    Ok(())
}

/// A seeded standard-normal batch shaped for the model's first input (symbolic dims: batch, else 224).
fn random_input(model: &std::path::Path, batch: usize) -> Result<candle_core::Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let m = automm::onnx::read_model(model)?;
    let g = m.graph.as_ref().context("no graph")?;
    let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let input = g.input.iter().find(|i| !inits.contains(i.name.as_str())).context("the model has no inputs")?;
    let dims: Vec<usize> = automm::onnx::value_dims(input)
        .iter()
        .enumerate()
        .map(|(i, d)| d.unwrap_or(if i == 0 { batch } else { 224 }))
        .collect();
    let n: usize = dims.iter().product();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let normal = rand_distr::StandardNormal;
    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Ok(candle_core::Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?)
}

fn onnx_run(
    model: &std::path::Path,
    input: &std::path::Path,
    output: &std::path::Path,
    tensor: Option<String>,
    engine: EngineKind,
) -> Result<()> {
    let x = automm::onnx::read_npy(input)?;
    let y = match engine {
        EngineKind::Candle => {
            let g = automm::onnx::Graph::load(model, &candle_core::Device::Cpu, tensor.map(|t| vec![t]))?;
            let name = g.inputs().first().context("the model has no inputs")?.name.clone();
            g.run(&[(name.as_str(), x)])?.into_iter().next().context("no output")?
        }
        EngineKind::Ort => {
            let tmp = tempfile::tempdir()?;
            let path = match &tensor {
                Some(t) => automm::infer::with_output(model, t, tmp.path())?,
                None => model.to_path_buf(),
            };
            let s = automm::infer::ort::OrtSession::open(&path, 0)?;
            let name = s.inputs.first().context("the model has no inputs")?.clone();
            let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let (shape, v) = s.run_f32(&[(name.as_str(), x.dims(), &data)])?.into_iter().next().context("no output")?;
            candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?
        }
    };
    let tmp = output.with_extension("npy.tmp");
    y.write_npy(&tmp)?;
    std::fs::rename(&tmp, output)?;
    println!("wrote {} {:?}", output.display(), y.dims());
    Ok(())
}
