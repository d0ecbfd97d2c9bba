//! `automm export`: merged, head-only and with-preprocessing exports of a model trained on the committed
//! CNN fixture backbone load in ONNX Runtime (and in our candle importer) and match the model folder's
//! predictions; metadata round-trips; opset and model-folder errors are clear.

use crate::common;
use common::{bin, fixture, ort_available};

use std::path::{Path, PathBuf};

use automm::deploy::engine::exported::ExportedModel;
use automm::deploy::engine::EngineKind;
use automm::deploy::export::ExportOptions;
use automm::deploy::meta::{ExportKind, ExportMeta};

/// Trains a small model on generated images; returns (model folder, test table).
fn trained(dir: &Path) -> (PathBuf, PathBuf) {
    let train = automm::app::synth::make_dataset(dir, "train", &[16, 8, 6, 4], 40, 3).unwrap();
    let test = automm::app::synth::make_dataset(dir, "test", &[3, 3, 3, 3], 40, 4).unwrap();
    let out = dir.join("run");
    let st = bin()
        .args(["train", "--quiet", "--label", "label", "--train-data"])
        .arg(&train)
        .arg("--backbone")
        .arg(fixture("cnn_fixture.onnx"))
        .arg("--output")
        .arg(&out)
        .args(["--hp", "optimization.max_epochs=2", "--hp", "optimization.loss_function=focal_loss"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    (out, test)
}

fn opts(kind: ExportKind, verify: bool) -> ExportOptions {
    ExportOptions { kind, opset: None, verify, verify_data: None, verify_images: 8, prior: None, backbone: None }
}

#[test]
fn exports_match_the_model_folder_on_every_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (model, test) = trained(dir.path());
    let engines: Vec<EngineKind> =
        if ort_available() { vec![EngineKind::Ort, EngineKind::Candle] } else { vec![EngineKind::Candle] };
    let p = automm::deploy::predict::Predictor::load(&model, &candle_core::Device::Cpu).unwrap();
    let table = automm::data::Table::load(&test, None, None).unwrap();
    let want = p.predict_table(&table, true).unwrap();
    let files = table.all_image_refs();
    for kind in [ExportKind::Merged, ExportKind::WithPreprocessing, ExportKind::HeadOnly] {
        let out = dir.path().join(format!("{}.onnx", kind.name()));
        let r = automm::deploy::export::export(&model, &out, &opts(kind, true)).unwrap();
        let v = r.verification.unwrap();
        assert!(v.passed && v.max_abs_diff <= 1e-4 && v.labels_equal, "{kind:?}: {v:?}");
        // Metadata round-trips.
        let proto = automm::onnx::read_model(&out).unwrap();
        let meta = ExportMeta::read(&proto, "x").unwrap();
        assert_eq!(meta.classes, p.config.classes);
        assert_eq!(meta.preprocess, p.config.preprocess);
        assert_eq!(meta.kind, kind);
        assert_eq!(meta.backbone_sha256, p.config.backbone.sha256);
        let keys: Vec<&str> = proto.metadata_props.iter().map(|e| e.key.as_str()).collect();
        for k in ["automm.hyperparameters", "automm.loss", "automm.version"] {
            assert!(keys.contains(&k), "{k}");
        }
        assert!(proto.metadata_props.iter().any(|e| e.key == "automm.loss" && e.value.starts_with("focal_loss(")));
        let outs: Vec<&str> = proto.graph.as_ref().unwrap().output.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outs, ["logits", "probabilities"]);
        if kind == ExportKind::HeadOnly {
            continue;
        }
        // Whole test table through each engine (batch 5 exercises a dynamic batch).
        for &engine in &engines {
            let m = ExportedModel::open(&out, Some(engine), 0).unwrap();
            let got = m.predict_files(&files, 5, true).unwrap();
            let d = got.probs.iter().zip(&want.probs).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-4, "{kind:?} on {engine:?}: {d}");
            assert_eq!(got.preds, want.preds);
        }
    }
}

#[test]
fn predict_on_an_exported_file_writes_the_same_csv_columns() {
    let dir = tempfile::tempdir().unwrap();
    let (model, test) = trained(dir.path());
    let onnx = dir.path().join("m.onnx");
    automm::deploy::export::export(&model, &onnx, &opts(ExportKind::Merged, false)).unwrap();
    let mut csvs = Vec::new();
    for (m, engine) in [(&model, "candle"), (&onnx, "candle")] {
        let out = dir.path().join(format!("p{}.csv", csvs.len()));
        let st = bin()
            .args(["predict", "--quiet", "--engine", engine, "--model"])
            .arg(m)
            .arg("--data")
            .arg(&test)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        csvs.push(std::fs::read_to_string(&out).unwrap());
    }
    let header = |s: &str| s.lines().next().unwrap().to_string();
    assert_eq!(header(&csvs[0]), header(&csvs[1]));
    let labels = |s: &str| s.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().to_string()).collect::<Vec<_>>();
    assert_eq!(labels(&csvs[0]), labels(&csvs[1]));
}

#[test]
fn opset_and_folder_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = trained(dir.path());
    let out = dir.path().join("x.onnx");
    let e = automm::deploy::export::export(
        &model,
        &out,
        &ExportOptions { opset: Some(11), ..opts(ExportKind::Merged, false) },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--opset") && e.contains("13"), "{e}");
    // An opset newer than automm can relabel to is refused for both kinds, and nothing is written.
    for kind in [ExportKind::Merged, ExportKind::HeadOnly] {
        let out = dir.path().join("future.onnx");
        let e =
            automm::deploy::export::export(&model, &out, &ExportOptions { opset: Some(99999), ..opts(kind, false) })
                .unwrap_err()
                .to_string();
        assert!(e.contains("--opset") && e.contains("99999") && e.contains("13 to 21"), "{e}");
        assert!(!out.exists());
    }
    assert!(!out.exists(), "nothing may be written on failure");
    // The fixture (opset 13) has no op that changed meaning up to 17: relabelling works and still verifies.
    let r = automm::deploy::export::export(
        &model,
        &out,
        &ExportOptions { opset: Some(17), ..opts(ExportKind::Merged, true) },
    )
    .unwrap();
    assert!(r.verification.unwrap().passed);
    let proto = automm::onnx::read_model(&out).unwrap();
    assert_eq!(automm::onnx::opset_of(&proto), 17);
    // A folder that is not a model.
    let e = automm::deploy::export::export(dir.path(), &out, &opts(ExportKind::Merged, false)).unwrap_err().to_string();
    assert!(e.contains("no config.json"), "{e}");
    // A corrupt head.
    std::fs::write(model.join("head.safetensors"), b"junk").unwrap();
    let e = automm::deploy::export::export(&model, &out, &opts(ExportKind::Merged, false)).unwrap_err().to_string();
    assert!(e.contains("head.safetensors") && e.contains("safetensors"), "{e}");
    // A non-automm ONNX given to predict.
    let e = ExportedModel::open(&fixture("cnn_fixture.onnx"), Some(EngineKind::Candle), 0).err().unwrap().to_string();
    assert!(e.contains("automm.") && e.contains("automm export"), "{e}");
}
