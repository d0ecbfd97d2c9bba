//! `automm demo`: the seed experiment end to end, offline, in one command. On the real photos and the
//! pretrained EfficientNet-Lite0 the repository ships (or the user's table, or generated shapes for a
//! backbone-free smoke run) it trains cross-entropy, focal loss with the seed's settings and automm's
//! imbalance-aware default side by side, evaluates each on the held-out split (confusion matrices,
//! training curves), exports the default model with verification, serves it on a free local port, sends
//! the test images through the gRPC client and checks they match local predictions.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::data::{ClassList, Normalization, Table};
use crate::deploy::export::ExportOptions;
use crate::deploy::predict::Predictor;
use crate::error::{Error, Result};
use crate::model::metrics::{Metric, Report};
use crate::train::config::HyperParamsBuilder;
use crate::train::{train, TrainRequest};

/// The shipped photos, relative to the repository (`data/clothing4/README.md`).
pub const PHOTOS_DIR: &str = "data/clothing4";
/// The shipped pretrained backbone, relative to the repository (`models/pretrained/NOTICE`).
pub const PRETRAINED_BACKBONE: &str = "models/pretrained/efficientnet_lite0.onnx";
/// The committed random-init Swin fixture (the synthetic smoke run's backbone).
pub const SWIN_FIXTURE: &str = "models/fixtures/swin_fixture.onnx";

/// Which images the demo trains and tests on.
#[derive(Debug, Clone, PartialEq)]
pub enum DemoData {
    /// The shipped real photos (`data/clothing4`: 200/66/22/7 training photos, 188 validation photos),
    /// at most `per_class` of each class from each split when given (small runs for tests).
    Photos {
        /// Cap on photos per class and split.
        per_class: Option<usize>,
    },
    /// The user's table, split 80/20 (stratified) into train and test.
    Table {
        /// The table.
        csv: PathBuf,
        /// Its label column.
        label: String,
    },
    /// Generated shapes (`app::synth`): a smoke run that needs no photos.
    Synthetic {
        /// Training images per class.
        train_counts: Vec<usize>,
        /// Test images per class.
        test_counts: Vec<usize>,
        /// Side of the images.
        image_size: u32,
    },
}

impl DemoData {
    /// The generated shapes at the tutorial's imbalance (200/66/22/7, 40 test images per class).
    pub fn synthetic() -> DemoData {
        DemoData::Synthetic { train_counts: vec![200, 66, 22, 7], test_counts: vec![40; 4], image_size: 96 }
    }
}

/// What the demo runs on.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Folder for runs and exports.
    pub work_dir: PathBuf,
    /// Backbone (None: the shipped EfficientNet-Lite0; the Swin fixture for synthetic data).
    pub backbone: Option<PathBuf>,
    /// Normalisation (None: what the backbone's metadata says, else symmetric for EfficientNet-Lite
    /// files, else ImageNet).
    pub normalization: Option<Normalization>,
    /// The images.
    pub data: DemoData,
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
            data: DemoData::Photos { per_class: None },
            epochs: 10,
            quiet: false,
        }
    }
}

/// One loss's run.
#[derive(Debug, Clone)]
pub struct LossRun {
    /// Short name (also its model folder under the work dir).
    pub name: &'static str,
    /// Column title.
    pub title: &'static str,
    /// The loss it trained with (`auto` resolved) and why.
    pub loss: String,
    /// Its model folder.
    pub dir: PathBuf,
    /// Test-split metrics.
    pub report: Report,
    /// Test-split predictions (the default run's are compared with the server's).
    pub predictions: crate::model::Predictions,
}

/// Everything the demo found.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// What the images were.
    pub data: String,
    /// The backbone used.
    pub backbone: PathBuf,
    /// The runs: cross-entropy, focal loss, automm's default.
    pub runs: Vec<LossRun>,
    /// The class with the fewest training rows, and that count.
    pub minority: (String, usize),
    /// The exported default model.
    pub exported: PathBuf,
    /// max |export - model folder| probability difference of the export's verification.
    pub export_max_abs_diff: f32,
    /// Engine the server used.
    pub server_engine: String,
    /// Test images sent through the client.
    pub served_images: usize,
    /// max |server - local| probability difference.
    pub server_max_abs_diff: f32,
    /// Whether every served label equals the local one.
    pub server_labels_equal: bool,
    /// Wall time.
    pub seconds: f64,
    /// Artefacts: (what, path).
    pub artefacts: Vec<(String, PathBuf)>,
}

impl DemoReport {
    /// The run called `name`.
    pub fn run(&self, name: &str) -> Option<&LossRun> {
        self.runs.iter().find(|r| r.name == name)
    }

    /// Test recall of the minority class in the run called `name`.
    pub fn minority_recall(&self, name: &str) -> Option<f64> {
        let r = &self.run(name)?.report;
        let i = r.classes.iter().position(|c| *c == self.minority.0)?;
        r.per_class_recall.get(i).copied()
    }
}

/// `rel` under the current folder when it exists there, else under the source tree automm was built from.
fn shipped(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn default_backbone(data: &DemoData) -> PathBuf {
    match data {
        DemoData::Synthetic { .. } => shipped(SWIN_FIXTURE),
        _ => shipped(PRETRAINED_BACKBONE),
    }
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

/// The training and test tables of a run, their label column, and what they are.
struct Splits {
    train: PathBuf,
    test: PathBuf,
    label: String,
    what: String,
}

/// The first `n` rows of each class of `csv`, written to `out`.
fn capped(csv: &Path, n: usize, out: &Path) -> Result<PathBuf> {
    let table = Table::load(csv, Some("label"), None)?;
    let mut seen = std::collections::HashMap::new();
    let rows: Vec<usize> = (0..table.rows.len())
        .filter(|&i| {
            let k = seen.entry(table.rows[i].label.clone()).or_insert(0usize);
            *k += 1;
            *k <= n
        })
        .collect();
    write_split(&table, &rows, out)?;
    Ok(out.to_path_buf())
}

/// The shipped photos' tables (capped to `per_class` rows per class under `data_dir` when asked).
fn photos(per_class: Option<usize>, data_dir: &Path) -> Result<Splits> {
    let dir = shipped(PHOTOS_DIR);
    let (mut train, mut test) = (dir.join("train.csv"), dir.join("validation.csv"));
    if !train.is_file() || !test.is_file() {
        return Err(Error::Table {
            path: dir.join("train.csv"),
            msg: "the demo's photos are missing (they ship in automm's repository under data/clothing4); \
                  run from a checkout, or pass --data TABLE --label COLUMN, or --synthetic"
                .into(),
        });
    }
    if let Some(n) = per_class {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        train = capped(&train, n, &data_dir.join("train.csv"))?;
        test = capped(&test, n, &data_dir.join("test.csv"))?;
    }
    let what = format!("real clothing photos in {} (train.csv; test: validation.csv)", dir.display());
    Ok(Splits { train, test, label: "label".into(), what })
}

/// The training and test tables: the shipped photos, a stratified 80/20 split of `--data`, or
/// generated images.
fn prepare_data(opts: &DemoOptions, say: &mut impl FnMut(&str)) -> Result<Splits> {
    let data_dir = opts.work_dir.join("data");
    match &opts.data {
        DemoData::Photos { per_class } => photos(*per_class, &data_dir),
        DemoData::Table { csv, label } => {
            say(&format!("splitting {} 80/20 (stratified) into train and test", csv.display()));
            let table = Table::load(csv, Some(label), None)?;
            let classes = ClassList::from_table(&table)?;
            let targets = table.targets(&classes)?;
            let (tr, te) = crate::data::stratified_split(&targets, classes.len(), 0.2, 0);
            std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
            let (a, b) = (data_dir.join("train.csv"), data_dir.join("test.csv"));
            write_split(&table, &tr, &a)?;
            write_split(&table, &te, &b)?;
            Ok(Splits { train: a, test: b, label: "label".into(), what: format!("{} (80/20 split)", csv.display()) })
        }
        DemoData::Synthetic { train_counts, test_counts, image_size } => {
            say(&format!(
                "generating shapes ({train_counts:?} training images per class, {test_counts:?} test) under {}",
                data_dir.display()
            ));
            let a = crate::app::synth::make_dataset(&data_dir, "train", train_counts, *image_size, 1)?;
            let b = crate::app::synth::make_dataset(&data_dir, "test", test_counts, *image_size, 2)?;
            Ok(Splits { train: a, test: b, label: "label".into(), what: "generated shapes".into() })
        }
    }
}

/// The losses the demo compares, as (name, column title, hyperparameter overrides): cross-entropy, the
/// seed's focal-loss settings, and automm's default (no loss key: `auto`).
fn losses() -> [(&'static str, &'static str, Vec<String>); 3] {
    [
        ("cross_entropy", "cross-entropy", vec!["optimization.loss_function=cross_entropy".to_string()]),
        (
            "focal",
            "focal loss",
            vec![
                "optimization.loss_function=focal_loss".into(),
                "optimization.focal_loss.alpha=auto".into(),
                "optimization.focal_loss.gamma=1.0".into(),
                "optimization.focal_loss.reduction=sum".into(),
            ],
        ),
        ("default", "automm default", vec![]),
    ]
}

/// The training request of one demo run, into `<work dir>/<name>`.
fn request(
    opts: &DemoOptions,
    s: &Splits,
    backbone: &Path,
    norm: &Normalization,
    name: &str,
    hps: &[String],
) -> Result<TrainRequest> {
    let mut b = HyperParamsBuilder::new().set_str(&format!("optimization.max_epochs={}", opts.epochs))?;
    for kv in hps {
        b = b.set_str(kv)?;
    }
    Ok(TrainRequest {
        train_data: s.train.clone(),
        label: s.label.clone(),
        image_column: None,
        tuning_data: None,
        backbone: backbone.to_path_buf(),
        feature_tensor: None,
        normalization: Some(norm.clone()),
        output: opts.work_dir.join(name),
        hp: b.build()?.0,
        quiet: opts.quiet,
        cancel: None,
        force: false,
    })
}

/// Trains one loss, evaluates it on the test split and draws its test confusion matrix.
fn run_loss(
    opts: &DemoOptions,
    s: &Splits,
    backbone: &Path,
    norm: &Normalization,
    spec: &(&'static str, &'static str, Vec<String>),
    test: &Table,
) -> Result<LossRun> {
    let (name, title, hps) = spec;
    let req = request(opts, s, backbone, norm, name, hps)?;
    let summary = train(&req, |_| {})?;
    let loss = match summary.loss {
        Some(k) if hps.is_empty() => format!("{} ({})", k.name(), summary.loss_reason),
        Some(k) => k.name().to_string(),
        None => "?".into(),
    };
    let predictor = Predictor::load(&req.output, &candle_core::Device::Cpu)?;
    let predictions = predictor.predict_table(test, opts.quiet)?;
    let report = predictor.score(test, &predictions)?;
    crate::train::plots::confusion_svg(&report, "test split", &req.output.join("confusion_matrix_test.svg"))?;
    Ok(LossRun { name, title, loss, dir: req.output, report, predictions })
}

/// The class with the fewest training rows of the run in `dir`, and that count.
fn minority_of(dir: &Path, s: &Splits) -> Result<(String, usize)> {
    let cfg = crate::model::ModelDir::new(dir).read_config()?;
    let classes = ClassList { names: cfg.classes.clone() };
    let counts = classes.counts(&Table::load(&s.train, Some(&s.label), None)?.targets(&classes)?);
    let (i, &n) = counts.iter().enumerate().min_by_key(|(_, &c)| c).ok_or_else(|| Error::Train("no classes".into()))?;
    Ok((cfg.classes[i].clone(), n))
}

/// Runs the demo; `say` receives progress lines.
pub fn run(opts: &DemoOptions, mut say: impl FnMut(&str)) -> Result<DemoReport> {
    let t0 = Instant::now();
    let dir = &opts.work_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let splits = prepare_data(opts, &mut say)?;
    let backbone = opts.backbone.clone().unwrap_or_else(|| default_backbone(&opts.data));
    let norm = crate::model::normalization::choose(&backbone, opts.normalization.as_ref())?;
    say(&format!("data: {}", splits.what));
    say(&format!("backbone: {} (normalisation {})", backbone.display(), norm.name()));
    let test = Table::load(&splits.test, Some(&splits.label), None)?;
    let mut runs = Vec::new();
    for spec in losses() {
        say(&format!("training with {} ({} epochs)", spec.1, opts.epochs));
        runs.push(run_loss(opts, &splits, &backbone, &norm, &spec, &test)?);
    }
    let default_dir = dir.join("default");
    let minority = minority_of(&default_dir, &splits)?;

    say("exporting automm's default model to ONNX (with verification)");
    let exported = dir.join("default.onnx");
    let opts_e = ExportOptions { verify: true, verify_images: 8, ..ExportOptions::merged() };
    let e = crate::deploy::export::export(&default_dir, &exported, &opts_e)?;
    let export_max_abs_diff = e.verification.map(|v| v.max_abs_diff).unwrap_or(f32::NAN);

    say("serving it on a free local port and predicting the test images through the gRPC client");
    let local =
        &runs.iter().find(|r| r.name == "default").ok_or_else(|| Error::Train("no default run".into()))?.predictions;
    let images: Vec<Vec<u8>> =
        test.rows.iter().map(|r| std::fs::read(&r.image).map_err(|e| Error::io(&r.image, e))).collect::<Result<_>>()?;
    let served_images = images.len();
    let (served, engine) = serve_and_predict(&exported, dir, images)?;
    let server_max_abs_diff = served.0.iter().zip(&local.probs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let server_labels_equal = served.1 == local.preds;
    let mut artefacts =
        vec![("training table".to_string(), splits.train.clone()), ("test table".into(), splits.test.clone())];
    for r in &runs {
        artefacts.push((format!("{} model folder", r.title), r.dir.clone()));
        artefacts.push((format!("{} training curve", r.title), r.dir.join("training_curve.svg")));
        artefacts.push((format!("{} confusion (test)", r.title), r.dir.join("confusion_matrix_test.svg")));
    }
    artefacts.push(("exported ONNX".into(), exported.clone()));
    // Absolute without resolving symlinks, so a linked data folder is shown where the user put it.
    artefacts.iter_mut().for_each(|(_, p)| *p = std::path::absolute(&*p).unwrap_or_else(|_| p.clone()));
    Ok(DemoReport {
        data: splits.what,
        backbone,
        runs,
        minority,
        exported,
        export_max_abs_diff,
        server_engine: engine,
        served_images,
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

/// The side-by-side table the demo prints: the headline metrics, then every class's recall (the
/// minority class marked with its training count).
pub fn comparison_table(r: &DemoReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = write!(s, "{:<30}", "");
    for run in &r.runs {
        let _ = write!(s, " {:>15}", run.title);
    }
    s.push('\n');
    let row = |s: &mut String, label: String, v: &dyn Fn(&Report) -> f64| {
        let _ = write!(s, "{label:<30}");
        for run in &r.runs {
            let _ = write!(s, " {:>15.3}", v(&run.report));
        }
        s.push('\n');
    };
    for m in [Metric::Accuracy, Metric::BalancedAccuracy, Metric::F1Macro] {
        row(&mut s, m.name().to_string(), &|rep| rep.get(m).unwrap_or(f64::NAN));
    }
    let Some(first) = r.runs.first() else { return s };
    for (i, c) in first.report.classes.iter().enumerate() {
        let label = match c == &r.minority.0 {
            true => format!("recall {c} (minority, {})", r.minority.1),
            false => format!("recall {c}"),
        };
        row(&mut s, label, &|rep| rep.per_class_recall.get(i).copied().unwrap_or(f64::NAN));
    }
    s
}
