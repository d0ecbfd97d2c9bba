//! `automm demo`: the seed experiment end to end, offline, in one command. Makes (or reads) an imbalanced
//! dataset, trains cross-entropy and focal loss on the best backbone available, compares them side by
//! side, exports the focal model with verification, serves it on a free local port, sends the test
//! images through the gRPC client and checks they match local predictions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::{ClassList, Normalization, Table};
use crate::deploy::export::ExportOptions;
use crate::deploy::predict::Predictor;
use crate::error::{Error, Result};
use crate::model::metrics::{Metric, Report};
use crate::train::config::HyperParamsBuilder;
use crate::train::{train, TrainRequest};

/// What the demo runs on.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder for data, runs and exports.
    pub work_dir: PathBuf,
    /// Backbone (None: `models/efficientnet_lite0.onnx` when present, else the committed Swin fixture).
    pub backbone: Option<PathBuf>,
    /// Normalisation (None: symmetric for EfficientNet-Lite files, else ImageNet).
    pub normalization: Option<Normalization>,
    /// The user's table and label column instead of generated data (split 80/20 into train/test).
    pub data: Option<(PathBuf, String)>,
    /// Generated training images per class (the tutorial's 200/66/22/7).
    pub train_counts: Vec<usize>,
    /// Generated test images per class.
    pub test_counts: Vec<usize>,
    /// Side of generated images.
    pub image_size: u32,
    /// Epochs per training run.
    pub epochs: usize,
    /// Hide progress bars.
    pub quiet: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            work_dir: PathBuf::from("runs/demo"),
            backbone: None,
            normalization: None,
            data: None,
            train_counts: vec![200, 66, 22, 7],
            test_counts: vec![40, 40, 40, 40],
            image_size: 96,
            epochs: 10,
            quiet: false,
        }
    }
}

/// Everything the demo found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// The backbone used.
    pub backbone: PathBuf,
    /// Cross-entropy run's test metrics.
    pub cross_entropy: Report,
    /// Focal-loss run's test metrics.
    pub focal: Report,
    /// The class with the fewest training rows.
    pub minority: String,
    /// The exported focal model.
    pub exported: PathBuf,
    /// Engine the server used.
    pub server_engine: String,
    /// max |server - local| probability difference.
    pub server_max_abs_diff: f32,
    /// Whether every served label equals the local one.
    pub server_labels_equal: bool,
    /// Wall time.
    pub seconds: f64,
    /// Artefacts: (what, path).
    pub artefacts: Vec<(String, PathBuf)>,
}

fn default_backbone() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for eff in [PathBuf::from("models/efficientnet_lite0.onnx"), repo.join("models/efficientnet_lite0.onnx")] {
        if eff.is_file() {
            return eff;
        }
    }
    repo.join("models/fixtures/swin_fixture.onnx")
}

/// Writes `rows` of `table` as a CSV with absolute image paths.
fn write_split(table: &Table, rows: &[usize], path: &Path) -> Result<()> {
    let mut csv = String::from("image,label\n");
    for &i in rows {
        let r = &table.rows[i];
        let img = std::fs::canonicalize(&r.image).unwrap_or_else(|_| r.image.clone());
        csv.push_str(&format!("{},{}\n", img.display(), r.label.as_deref().unwrap_or("")));
    }
    crate::util::fs::write_atomic(path, csv.as_bytes())
}

/// The training and test tables (a stratified 80/20 split of `--data`, or generated images) and the
/// label column.
fn prepare_data(opts: &DemoOptions, say: &mut impl FnMut(&str)) -> Result<(PathBuf, PathBuf, String)> {
    let dir = &opts.work_dir;
    let data_dir = dir.join("data");
    Ok(match &opts.data {
        Some((csv, label)) => {
            say(&format!("splitting {} 80/20 (stratified) into train and test", csv.display()));
            let table = Table::load(csv, Some(label), None)?;
            let classes = ClassList::from_table(&table)?;
            let targets = table.targets(&classes)?;
            let (tr, te) = crate::data::stratified_split(&targets, classes.len(), 0.2, 0);
            std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
            let (a, b) = (data_dir.join("train.csv"), data_dir.join("test.csv"));
            write_split(&table, &tr, &a)?;
            write_split(&table, &te, &b)?;
            (a, b, "label".to_string())
        }
        None => {
            say(&format!(
                "generating an imbalanced dataset ({:?} training images per class, {:?} test) under {}",
                opts.train_counts,
                opts.test_counts,
                data_dir.display()
            ));
            let a = crate::app::synth::make_dataset(&data_dir, "train", &opts.train_counts, opts.image_size, 1)?;
            let b = crate::app::synth::make_dataset(&data_dir, "test", &opts.test_counts, opts.image_size, 2)?;
            (a, b, "label".to_string())
        }
    })
}

/// The losses the demo compares, as hyperparameter overrides (the seed's focal-loss settings).
fn losses() -> [(&'static str, Vec<String>); 2] {
    [
        ("cross_entropy", vec!["optimization.loss_function=cross_entropy".to_string()]),
        (
            "focal",
            vec![
                "optimization.loss_function=focal_loss".into(),
                "optimization.focal_loss.alpha=auto".into(),
                "optimization.focal_loss.gamma=1.0".into(),
                "optimization.focal_loss.reduction=sum".into(),
            ],
        ),
    ]
}

/// The training request of one demo run, into `<work dir>/<name>`.
fn request(
    opts: &DemoOptions,
    train_csv: &Path,
    label: &str,
    backbone: &Path,
    normalization: &Normalization,
    name: &str,
    hps: &[String],
) -> Result<TrainRequest> {
    let mut b = HyperParamsBuilder::new().set_str(&format!("optimization.max_epochs={}", opts.epochs))?;
    for kv in hps {
        b = b.set_str(kv)?;
    }
    Ok(TrainRequest {
        train_data: train_csv.to_path_buf(),
        label: label.to_string(),
        image_column: None,
        tuning_data: None,
        backbone: backbone.to_path_buf(),
        feature_tensor: None,
        normalization: normalization.clone(),
        output: opts.work_dir.join(name),
        hp: b.build()?.0,
        quiet: opts.quiet,
        cancel: None,
        force: false,
    })
}

/// Runs the demo; `say` receives progress lines.
pub fn run(opts: &DemoOptions, mut say: impl FnMut(&str)) -> Result<DemoReport> {
    let t0 = Instant::now();
    let dir = &opts.work_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (train_csv, test_csv, label) = prepare_data(opts, &mut say)?;
    let backbone = opts.backbone.clone().unwrap_or_else(default_backbone);
    let normalization = opts.normalization.clone().unwrap_or_else(|| {
        let name = backbone.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
        if name.contains("efficientnet_lite") {
            Normalization::Symmetric
        } else {
            Normalization::imagenet()
        }
    });
    say(&format!("backbone: {}", backbone.display()));

    let test = Table::load(&test_csv, Some(&label), None)?;
    let mut reports = Vec::new();
    for (name, hps) in losses() {
        say(&format!("training with {name} ({} epochs)", opts.epochs));
        let req = request(opts, &train_csv, &label, &backbone, &normalization, name, &hps)?;
        train(&req, |_| {})?;
        let p = Predictor::load(&dir.join(name), &candle_core::Device::Cpu)?;
        reports.push(p.evaluate(&test, opts.quiet)?);
    }
    let focal_dir = dir.join("focal");
    let cfg = crate::model::ModelDir::new(&focal_dir).read_config()?;
    let train_table = Table::load(&train_csv, Some(&label), None)?;
    let classes = ClassList { names: cfg.classes.clone() };
    let counts = classes.counts(&train_table.targets(&classes)?);
    let minority = cfg.classes[counts.iter().enumerate().min_by_key(|(_, &c)| c).map(|(i, _)| i).unwrap_or(0)].clone();

    say("exporting the focal model to ONNX (with verification)");
    let exported = dir.join("focal.onnx");
    let opts_e = ExportOptions { verify: true, verify_images: 8, ..ExportOptions::merged() };
    crate::deploy::export::export(&focal_dir, &exported, &opts_e)?;

    say("serving it on a free local port and predicting the test images through the gRPC client");
    let local = Predictor::load(&focal_dir, &candle_core::Device::Cpu)?.predict_table(&test, true)?;
    let images: Vec<Vec<u8>> =
        test.rows.iter().map(|r| std::fs::read(&r.image).map_err(|e| Error::io(&r.image, e))).collect::<Result<_>>()?;
    let (served, engine) = serve_and_predict(&exported, dir, images)?;
    let server_max_abs_diff = served.0.iter().zip(&local.probs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let server_labels_equal = served.1 == local.preds;
    let mut artefacts = vec![
        ("training table".to_string(), train_csv),
        ("test table".to_string(), test_csv),
        ("cross-entropy model folder".to_string(), dir.join("cross_entropy")),
        ("focal model folder".to_string(), focal_dir.clone()),
        ("focal training curve".to_string(), focal_dir.join("training_curve.svg")),
        ("focal confusion matrix".to_string(), focal_dir.join("confusion_matrix.svg")),
        ("exported ONNX".to_string(), exported.clone()),
    ];
    artefacts.iter_mut().for_each(|(_, p)| *p = std::fs::canonicalize(&*p).unwrap_or_else(|_| p.clone()));
    let focal = reports.pop().ok_or_else(|| Error::Train("no focal run".into()))?;
    let cross_entropy = reports.pop().ok_or_else(|| Error::Train("no cross-entropy run".into()))?;
    Ok(DemoReport {
        backbone,
        cross_entropy,
        focal,
        minority,
        exported,
        server_engine: engine,
        server_max_abs_diff,
        server_labels_equal,
        seconds: t0.elapsed().as_secs_f64(),
        artefacts,
    })
}

type Served = ((Vec<f32>, Vec<u32>), String);

/// Starts the server in-process on 127.0.0.1:0, predicts `images` through the client, stops it.
fn serve_and_predict(model: &Path, dir: &Path, images: Vec<Vec<u8>>) -> Result<Served> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| Error::Server(format!("tokio: {e}")))?;
    rt.block_on(async move {
        let server = crate::serve::spawn(crate::serve::ServeConfig::local(model, &dir.join("serve"))).await?;
        let client = crate::client::Client::connect(&server.url(), None, None).await?;
        let engine = client.model_info().await?.engine;
        let (mut probs, mut preds) = (Vec::new(), Vec::new());
        for chunk in images.chunks(16) {
            for p in client.predict(chunk.to_vec()).await?.predictions {
                probs.extend(p.probabilities);
                preds.push(p.class_index as u32);
            }
        }
        server.stop().await?;
        Ok(((probs, preds), engine))
    })
}

/// The side-by-side table the demo prints.
pub fn comparison_table(r: &DemoReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{:<28} {:>14} {:>14}", "", "cross-entropy", "focal loss");
    for m in [Metric::Accuracy, Metric::BalancedAccuracy, Metric::F1Macro] {
        let score = |r: &Report| r.get(m).unwrap_or(f64::NAN);
        let _ = writeln!(s, "{:<28} {:>14.3} {:>14.3}", m.name(), score(&r.cross_entropy), score(&r.focal));
    }
    for (i, c) in r.focal.classes.iter().enumerate() {
        let mark = if *c == r.minority { " (minority)" } else { "" };
        let _ = writeln!(
            s,
            "{:<28} {:>14.3} {:>14.3}",
            format!("recall {c}{mark}"),
            r.cross_entropy.per_class_recall[i],
            r.focal.per_class_recall[i]
        );
    }
    s
}
