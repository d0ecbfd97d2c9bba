//! The path a CUDA device takes, checked on the CPU: with `AUTOMM_KERNELS=candle` every op runs on
//! candle's own tensor ops (autograd included) and none on our CPU kernels or custom ops, exactly as when
//! the tensors live on a GPU. Inference must still equal ONNX Runtime, and fine-tuning must still equal
//! the run on our kernels.

use std::path::{Path, PathBuf};

use crate::common;
use automm::onnx::read_npy;
use candle_core::{Device, Tensor};

/// `automm onnx run MODEL --input X` with or without the candle-only switch: the first output.
fn onnx_run(model: &Path, input: &Path, out: &Path, candle_only: bool) -> Tensor {
    let mut cmd = common::bin();
    if candle_only {
        cmd.env("AUTOMM_KERNELS", "candle");
    } else {
        cmd.env_remove("AUTOMM_KERNELS");
    }
    let st = cmd.args(["onnx", "run", "--quiet"]).arg(model).arg("--input").arg(input).arg("--output").arg(out);
    let st = st.output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    read_npy(out).unwrap()
}

/// max |a - b| over the largest |b| (1 at least).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max(&(a - b).unwrap()) / max(b).max(1.0)
}

#[test]
fn candle_ops_alone_match_onnx_runtime_on_the_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["swin_fixture.onnx", "swin_dynamo_fixture.onnx", "cnn_fixture.onnx"] {
        let want = read_npy(&common::fixture(&format!("{model}.logits.npy"))).unwrap();
        let input = common::fixture(&format!("{model}.input.npy"));
        let got = onnx_run(&common::fixture(model), &input, &dir.path().join("y.npy"), true);
        let d = rel_diff(&got, &want);
        assert!(d <= 1e-4, "{model} on candle's ops: max |ours - ORT| / scale = {d}");
    }
}

#[test]
fn candle_ops_alone_match_our_kernels_on_the_shipped_lite0() {
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = repo.join("models/pretrained/efficientnet_lite0.onnx");
    let input = dir.path().join("x.npy");
    Tensor::rand(-1f32, 1f32, (2, 3, 224, 224), &Device::Cpu).unwrap().write_npy(&input).unwrap();
    let ours = onnx_run(&model, &input, &dir.path().join("a.npy"), false);
    let candle = onnx_run(&model, &input, &dir.path().join("b.npy"), true);
    assert_eq!(ours.dims(), &[2, 1280]);
    let d = rel_diff(&candle, &ours);
    assert!(d <= 1e-4, "Lite0: max |candle ops - our kernels| / scale = {d}");
}

/// Per-epoch training losses from a model folder's metrics.json.
fn losses(model: &Path) -> Vec<f64> {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("metrics.json")).unwrap()).unwrap();
    m["history"].as_array().unwrap().iter().map(|e| e["train_loss"].as_f64().unwrap()).collect()
}

#[test]
fn full_finetuning_on_candle_ops_alone_equals_the_run_on_our_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let train = automm::app::synth::make_dataset(dir.path(), "train", &[10, 6, 4], 40, 6).unwrap();
    let run = |name: &str, candle_only: bool| {
        let out = dir.path().join(name);
        let mut cmd = common::bin();
        if candle_only {
            cmd.env("AUTOMM_KERNELS", "candle");
        } else {
            cmd.env_remove("AUTOMM_KERNELS");
        }
        cmd.args(["train", "--quiet", "--label", "label", "--train-data"]).arg(&train);
        cmd.arg("--backbone").arg(common::fixture("cnn_fixture.onnx")).arg("--output").arg(&out);
        for kv in ["optimization.max_epochs=2", "env.batch_size=8", "model.backbone.freeze=false"] {
            cmd.args(["--hp", kv]);
        }
        let st = cmd.output().unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        out
    };
    let (ours, candle) = (run("ours", false), run("candle", true));
    let (a, b) = (losses(&ours), losses(&candle));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "train losses: our kernels {a:?}, candle ops {b:?}");
    }
    // Every tuned parameter ends where the run on our kernels put it (AdamW moves each by about lr per step).
    let read = |m: &Path| {
        let md = automm::model::ModelDir::new(m);
        md.read_backbone_update(&md.read_config().unwrap(), &Device::Cpu).unwrap()
    };
    let (pa, pb) = (read(&ours), read(&candle));
    assert_eq!(pa.len(), pb.len());
    assert!(!pa.is_empty());
    for ((na, ta), (nb, tb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        let d = (ta - tb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 2e-5, "`{na}`: max |ours - candle| = {d}");
    }
}
