//! End to end on generated images with the committed CNN fixture backbone: `automm train`, `evaluate`,
//! `predict` through the binary, the model folder's files, and the data errors users hit.

use crate::common;
use common::bin;

use std::path::{Path, PathBuf};
use std::process::Command;

fn backbone() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/cnn_fixture.onnx")
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `automm train --quiet` on `train` with the fixture backbone into `out` (add `--hp` flags after).
fn train_cmd(train: &Path, out: &Path) -> Command {
    let mut c = bin();
    c.args(["train", "--quiet", "--label", "label", "--train-data"]).arg(train);
    c.arg("--backbone").arg(backbone()).arg("--output").arg(out);
    c
}

fn data(dir: &Path) -> (PathBuf, PathBuf) {
    let train = automm::app::synth::make_dataset(dir, "train", &[24, 12, 8, 4], 48, 1).unwrap();
    let test = automm::app::synth::make_dataset(dir, "test", &[6, 6, 6, 6], 48, 2).unwrap();
    (train, test)
}

#[test]
fn train_evaluate_predict_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = data(dir.path());
    let out = dir.path().join("run");
    let (ok, stdout, stderr) = run(train_cmd(&train, &out)
        .args(["--hp", "optimization.loss_function=focal_loss", "--hp", "optimization.focal_loss.alpha=auto"])
        .args(["--hp", "optimization.focal_loss.gamma=1.0", "--hp", "optimization.focal_loss.reduction=sum"])
        .args([
            "--hp",
            "optimization.max_epochs=3",
            "--hp",
            "env.num_gpus=0",
            "--hp",
            "model.mmdet_image.checkpoint_name=x",
        ]));
    assert!(ok, "train failed: {stderr}");
    assert!(stdout.contains("balanced_accuracy") && stdout.contains("confusion matrix"), "{stdout}");
    assert!(stderr.contains("accepted but ignored"), "{stderr}");
    for f in ["config.json", "head.safetensors", "metrics.json", "training_curve.svg", "confusion_matrix.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["classes"], serde_json::json!(["circle", "ring", "square", "triangle"]));
    let alpha: Vec<f64> = serde_json::from_value(cfg["alpha"].clone()).unwrap();
    assert!((alpha.iter().sum::<f64>() - 1.0).abs() < 1e-9 && alpha[1] > alpha[0]);
    assert_eq!(cfg["backbone"]["feature_tensor"], "feat");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["history"].as_array().unwrap().len(), 3);

    let (ok, stdout, stderr) = run(bin()
        .args(["evaluate", "--quiet", "--json", "--metrics", "accuracy,balanced_accuracy,f1_macro,mcc", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(&test));
    assert!(ok, "{stderr}");
    let scores: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for k in ["accuracy", "balanced_accuracy", "f1_macro", "mcc"] {
        let v = scores[k].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&v), "{k} = {v}");
    }

    let preds = dir.path().join("preds.csv");
    let (ok, _, stderr) = run(bin()
        .args(["predict", "--quiet", "--model"])
        .arg(&out)
        .arg("--data")
        .arg(&test)
        .arg("--output")
        .arg(&preds));
    assert!(ok, "{stderr}");
    let text = std::fs::read_to_string(&preds).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "image,label,predicted_label,prob_circle,prob_ring,prob_square,prob_triangle");
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 24);
    for r in rows {
        let cells: Vec<&str> = r.split(',').collect();
        let p: Vec<f64> = cells[3..].iter().map(|c| c.parse().unwrap()).collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        // The predicted label is the arg-max class.
        let best = p.iter().enumerate().max_by(|a, b| a.1.partial_cmp(b.1).unwrap()).unwrap().0;
        assert_eq!(cells[2], ["circle", "ring", "square", "triangle"][best]);
    }
}

#[test]
fn library_training_is_deterministic_with_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = data(dir.path());
    let mk = |out: &str| {
        let (hp, _) = automm::train::config::HyperParamsBuilder::new()
            .set_str("optimization.max_epochs=2")
            .unwrap()
            .set_str("env.seed=5")
            .unwrap()
            .build()
            .unwrap();
        common::train_request(train.clone(), dir.path().join(out), hp)
    };
    let a = automm::train::train(&mk("a"), |_| {}).unwrap();
    let b = automm::train::train(&mk("b"), |_| {}).unwrap();
    assert_eq!(
        a.history.iter().map(|h| h.train_loss).collect::<Vec<_>>(),
        b.history.iter().map(|h| h.train_loss).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read(dir.path().join("a/head.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b/head.safetensors")).unwrap()
    );
    // Holdout per AutoGluon's rule: 48 rows -> 20%, stratified.
    assert_eq!(a.num_val, 10);
}

fn train_err(dir: &Path, csv: &str, extra: &[&str]) -> String {
    let p = dir.join("t.csv");
    std::fs::write(&p, csv).unwrap();
    let (ok, _, stderr) = run(bin()
        .args(["train", "--quiet", "--label", "label", "--train-data"])
        .arg(&p)
        .arg("--backbone")
        .arg(backbone())
        .arg("--output")
        .arg(dir.join("out"))
        .args(extra));
    assert!(!ok);
    stderr
}

#[test]
fn data_errors_name_the_row_column_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _) = data(dir.path());
    let d = dir.path();
    let e = train_err(d, "image,label\nimages/train/circle_0000.png,a\nnope.png,b\n", &[]);
    assert!(e.contains("nope.png") && e.contains("row 2") && e.contains("not found"), "{e}");
    let e = train_err(d, "image,cls\nimages/train/circle_0000.png,a\n", &[]);
    assert!(e.contains("no column `label`") && e.contains("\"cls\""), "{e}");
    let e = train_err(d, "image,label\n", &[]);
    assert!(e.contains("empty"), "{e}");
    std::fs::write(d.join("bad.png"), b"garbage").unwrap();
    let e = train_err(d, "image,label\nimages/train/circle_0000.png,a\nbad.png,b\n", &[]);
    assert!(e.contains("bad.png") && e.contains("row 2"), "{e}");
    std::fs::write(d.join("tune.csv"), "image,label\nimages/train/circle_0000.png,zebra\n").unwrap();
    let e = train_err(
        d,
        "image,label\nimages/train/circle_0000.png,a\nimages/train/circle_0001.png,b\n",
        &["--tuning-data", d.join("tune.csv").to_str().unwrap()],
    );
    assert!(e.contains("zebra") && e.contains("row 1") && e.contains("not a class"), "{e}");
    // The same image twice could land in both the training and the validation rows.
    let dup =
        "image,label\nimages/train/circle_0000.png,a\nimages/train/circle_0001.png,b\nimages/train/circle_0000.png,b\n";
    let e = train_err(d, dup, &[]);
    assert!(e.contains("row 3") && e.contains("also row 1") && e.contains("circle_0000.png"), "{e}");
    let e = train_err(
        d,
        "image,label\nimages/train/circle_0000.png,a\nimages/train/circle_0001.png,b\n",
        &["--hp", "optimization.focal_loss.alpha=[1,2,3]", "--hp", "optimization.loss_function=focal_loss"],
    );
    assert!(e.contains("3 weights") && e.contains("2 classes"), "{e}");
}

#[test]
fn a_corrupt_model_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, test) = data(dir.path());
    for (config, want) in [(None, "no config.json"), (Some("{"), "not a valid automm model config")] {
        if let Some(c) = config {
            std::fs::write(dir.path().join("config.json"), c).unwrap();
        }
        let out = dir.path().join("p.csv");
        let (ok, _, e) =
            run(bin().args(["predict", "--model"]).arg(dir.path()).arg("--data").arg(&test).arg("--output").arg(&out));
        assert!(!ok && e.contains(want), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn parquet_tables_and_integer_labels_work() {
    use polars::prelude::*;
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = data(dir.path());
    // Same rows as the CSV, labels mapped to integers 10/2/3/4 (class order must be numeric: 2, 3, 4, 10).
    let text = std::fs::read_to_string(&train).unwrap();
    let (mut paths, mut labels) = (Vec::new(), Vec::new());
    for line in text.lines().skip(1) {
        let (p, l) = line.split_once(',').unwrap();
        paths.push(p.to_string());
        labels.push(match l {
            "circle" => 10i64,
            "square" => 2,
            "triangle" => 3,
            _ => 4,
        });
    }
    let mut df = df!("filepath" => paths, "y" => labels).unwrap();
    let pq = dir.path().join("train.parquet");
    ParquetWriter::new(std::fs::File::create(&pq).unwrap()).finish(&mut df).unwrap();
    let out = dir.path().join("pq_run");
    let (ok, _, stderr) = run(bin()
        .args(["train", "--quiet", "--label", "y", "--train-data"])
        .arg(&pq)
        .arg("--backbone")
        .arg(backbone())
        .arg("--output")
        .arg(&out)
        .args(["--hp", "optimization.max_epochs=1"]));
    assert!(ok, "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["classes"], serde_json::json!(["2", "3", "4", "10"]));
    assert_eq!(cfg["image_column"], "filepath");
}

/// `train --output` into a folder of the user's own files refuses and touches nothing (`--force` writes);
/// a run that fails before its first epoch leaves no folder and no checkpoint behind.
#[test]
fn train_never_overwrites_foreign_files_and_failed_runs_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = data(dir.path());
    let theirs = dir.path().join("mine");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("config.json"), "my own settings").unwrap();
    let cmd = |out: &Path, label: &str| {
        let mut c = bin();
        c.args(["train", "--quiet", "--label", label, "--train-data"])
            .arg(&train)
            .arg("--backbone")
            .arg(backbone())
            .arg("--output")
            .arg(out)
            .args(["--hp", "optimization.max_epochs=1"]);
        c
    };
    let (ok, _, stderr) = run(&mut cmd(&theirs, "label"));
    assert!(!ok && stderr.contains("not an automm run") && stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read_to_string(theirs.join("config.json")).unwrap(), "my own settings");
    let (ok, _, stderr) = run(cmd(&theirs, "label").arg("--force"));
    assert!(ok, "{stderr}");
    // A trained folder may be trained into again.
    let (ok, _, stderr) = run(&mut cmd(&theirs, "label"));
    assert!(ok, "{stderr}");
    let fresh = dir.path().join("fresh");
    let (ok, _, stderr) = run(&mut cmd(&fresh, "no_such_column"));
    assert!(!ok && stderr.contains("no_such_column"), "{stderr}");
    assert!(!fresh.exists(), "a failed run left {}", fresh.display());
}

/// With no loss key the loss follows the data: logit-adjusted on imbalanced classes (about 24/4 >= 3),
/// cross-entropy on balanced ones, each logged with its reason and recorded in config.json; an explicit
/// loss is kept.
#[test]
fn the_default_loss_follows_the_class_imbalance_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (imbalanced, balanced) = data(dir.path());
    // Not --quiet: the choice is logged at INFO level.
    let train = |data: &Path, name: &str, extra: &[&str]| -> (serde_json::Value, String) {
        let out = dir.path().join(name);
        let mut cmd = bin();
        cmd.args(["train", "--label", "label", "--train-data"]).arg(data);
        cmd.arg("--backbone").arg(backbone()).arg("--output").arg(&out);
        cmd.args(["--hp", "optimization.max_epochs=2", "--hp", "env.num_gpus=0"]);
        for kv in extra {
            cmd.args(["--hp", kv]);
        }
        let (ok, _, stderr) = run(&mut cmd);
        assert!(ok, "{name}: {stderr}");
        let cfg = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        (cfg, stderr)
    };
    let (cfg, log) = train(&imbalanced, "imbalanced", &[]);
    assert_eq!(cfg["hyperparameters"]["loss_function"], "logit_adjusted");
    let why = cfg["hyperparameters"]["loss_reason"].as_str().unwrap();
    // 24/12/8/4 images, less the stratified holdout.
    assert!(why.contains("imbalanced") && why.contains(">= 3"), "{why}");
    assert!(log.contains("loss: logit_adjusted") && log.contains("training rows per class: circle "), "{log}");
    let (cfg, _) = train(&balanced, "balanced", &[]);
    assert_eq!(cfg["hyperparameters"]["loss_function"], "cross_entropy");
    assert!(cfg["hyperparameters"]["loss_reason"].as_str().unwrap().contains("balanced"));
    let (cfg, _) = train(&imbalanced, "explicit", &["optimization.loss_function=focal_loss"]);
    assert_eq!(cfg["hyperparameters"]["loss_function"], "focal_loss");
    let (cfg, _) = train(
        &imbalanced,
        "tau",
        &["optimization.loss_function=balanced_softmax", "optimization.logit_adjustment.tau=0.5"],
    );
    assert_eq!(cfg["hyperparameters"]["loss_function"], "logit_adjusted");
    assert_eq!(cfg["hyperparameters"]["logit_tau"], 0.5);
    // Focal keys under `auto` (which picks logit_adjusted here) are named as ignored.
    let (_, log) = train(&imbalanced, "ignored", &["optimization.focal_loss.gamma=1"]);
    assert!(log.contains("optimization.focal_loss.gamma is ignored: the loss is logit_adjusted"), "{log}");
    // --quiet keeps warnings and drops INFO lines.
    let out = dir.path().join("quiet");
    let mut cmd = train_cmd(&imbalanced, &out);
    cmd.args(["--hp", "optimization.max_epochs=1", "--hp", "optimization.loss_function=cross_entropy"]);
    cmd.args(["--hp", "optimization.focal_loss.reduction=sum"]);
    let (ok, _, log) = run(&mut cmd);
    assert!(ok, "{log}");
    assert!(log.contains("optimization.focal_loss.reduction is ignored: the loss is cross_entropy"), "{log}");
    assert!(!log.contains("INFO"), "--quiet printed INFO lines:\n{log}");
}

/// The probability columns of a predictions CSV, row by row, and the predicted labels.
fn read_predictions(path: &Path) -> (Vec<Vec<f64>>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let first = header.iter().position(|h| h.starts_with("prob_")).unwrap();
    let at = header.iter().position(|h| *h == "predicted_label").unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let probs = rows.iter().map(|r| r[first..].iter().map(|c| c.parse().unwrap()).collect()).collect();
    (probs, rows.iter().map(|r| r[at].to_string()).collect())
}

/// `predict --prior-correction` on the model folder (candle) and an export baked with the same correction
/// run by ONNX Runtime give the same probabilities and labels; the correction moves them.
#[test]
fn prior_correction_in_predict_equals_the_baked_export_on_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = data(dir.path());
    let out = dir.path().join("run");
    let (ok, _, stderr) = run(train_cmd(&train, &out).args([
        "--hp",
        "optimization.loss_function=cross_entropy",
        "--hp",
        "optimization.max_epochs=3",
    ]));
    assert!(ok, "{stderr}");
    let predict = |model: &Path, name: &str, extra: &[&str]| {
        let csv = dir.path().join(name);
        let (ok, _, stderr) = run(bin()
            .args(["predict", "--quiet", "--model"])
            .arg(model)
            .arg("--data")
            .arg(&test)
            .arg("--output")
            .arg(&csv)
            .args(extra));
        assert!(ok, "{name}: {stderr}");
        read_predictions(&csv)
    };
    let correction = ["--prior-correction", "1.0", "--target-prior", "1,1,2,1"];
    let (plain, _) = predict(&out, "plain.csv", &[]);
    let (corrected, labels) = predict(&out, "corrected.csv", &correction);
    let moved = plain.iter().flatten().zip(corrected.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(moved > 1e-3, "the correction changed nothing ({moved})");
    let onnx = dir.path().join("corrected.onnx");
    let (ok, _, stderr) =
        run(bin().args(["export", "--verify", "--model"]).arg(&out).arg("--output").arg(&onnx).args(correction));
    assert!(ok, "export: {stderr}");
    let bytes = std::fs::read(&onnx).unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("automm.prior_correction"));
    if !common::ort_available() {
        return;
    }
    let (exported, exported_labels) = predict(&onnx, "exported.csv", &["--engine", "ort"]);
    let diff =
        corrected.iter().flatten().zip(exported.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff <= 1e-5, "ORT on the baked export differs from predict --prior-correction by {diff}");
    assert_eq!(labels, exported_labels);
    // An exported model is corrected at export time, not again at predict time.
    let (ok, _, stderr) = run(bin()
        .args(["predict", "--model"])
        .arg(&onnx)
        .arg("--data")
        .arg(&test)
        .arg("--output")
        .arg(dir.path().join("x.csv"))
        .args(correction));
    assert!(!ok && stderr.contains("automm export --prior-correction"), "{stderr}");
}

/// A model folder whose backbone moved: evaluate says how to point at it, `--backbone` does, and a
/// different file is refused by its sha256.
#[test]
fn a_moved_backbone_is_pointed_at_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = data(dir.path());
    let old = dir.path().join("old/backbone.onnx");
    std::fs::create_dir_all(old.parent().unwrap()).unwrap();
    std::fs::copy(backbone(), &old).unwrap();
    let out = dir.path().join("model");
    let mut cmd = bin();
    cmd.args(["train", "--quiet", "--label", "label", "--train-data"]).arg(&train);
    cmd.arg("--backbone").arg(&old).arg("--output").arg(&out).args(["--hp", "optimization.max_epochs=1"]);
    let (ok, _, err) = run(&mut cmd);
    assert!(ok, "{err}");
    let moved = dir.path().join("new/backbone.onnx");
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::rename(&old, &moved).unwrap();
    let eval = |extra: Option<&Path>| {
        let mut c = bin();
        c.args(["evaluate", "--json", "--model"]).arg(&out).arg("--data").arg(&test);
        if let Some(b) = extra {
            c.arg("--backbone").arg(b);
        }
        run(&mut c)
    };
    let (ok, _, err) = eval(None);
    assert!(!ok && err.contains("is missing; pass --backbone PATH"), "{err}");
    let (ok, json, err) = eval(Some(&moved));
    assert!(ok, "{err}");
    assert!(json.contains("balanced_accuracy"), "{json}");
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/swin_fixture.onnx");
    let (ok, _, err) = eval(Some(&other));
    assert!(!ok && err.contains("is not the backbone this model was trained on"), "{err}");
    let onnx = dir.path().join("m.onnx");
    let (ok, _, err) =
        run(bin().args(["export", "--model"]).arg(&out).arg("--output").arg(&onnx).arg("--backbone").arg(&moved));
    assert!(ok && onnx.is_file(), "{err}");
}
