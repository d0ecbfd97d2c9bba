//! The ONNX Runtime engine: the guided error when the library is missing, and candle-vs-ORT parity through
//! `automm onnx compare` / `onnx run`. CI installs `onnxruntime==1.31.1` and sets AUTOMM_REQUIRE_ORT=1, so
//! there a missing library fails these tests; elsewhere the parity tests say they did not run.

use crate::common;
use common::{bin, fixture, ort_available};

#[test]
fn missing_library_gives_the_guided_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .env("ORT_DYLIB_PATH", dir.path().join("nowhere/libonnxruntime.so"))
        .args(["onnx", "run", "--engine", "ort", "--input"])
        .arg(fixture("cnn_fixture.onnx.input.npy"))
        .arg("--output")
        .arg(dir.path().join("y.npy"))
        .arg(fixture("cnn_fixture.onnx"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("ORT_DYLIB_PATH") && e.contains("pip install onnxruntime==1.31.1"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!dir.path().join("y.npy").exists());
}

#[test]
fn candle_matches_ort_on_the_fixtures() {
    if !ort_available() {
        return;
    }
    for (model, tensor) in [
        ("swin_fixture.onnx", None),
        ("cnn_fixture.onnx", None),
        ("swin_fixture.onnx", Some("features")),
        ("cnn_fixture.onnx", Some("features")),
    ] {
        let mut cmd = bin();
        cmd.args(["onnx", "compare", "--json", "--runs", "1", "--input"])
            .arg(fixture(&format!("{model}.input.npy")))
            .arg(fixture(model));
        if let Some(t) = tensor {
            cmd.args(["--tensor", t]);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let d = v["max_abs_diff"].as_f64().unwrap();
        assert!(d <= 1e-4, "{model} {tensor:?}: max abs diff {d}");
        assert_eq!(v["timings"].as_array().unwrap().len(), 2);
        assert_eq!(v["passed"], serde_json::json!(true));
        assert!(v["outputs"][0]["max_rel_diff"].as_f64().unwrap() <= 1e-4, "{v}");
    }
    // A tolerance nothing meets: the comparison is printed and the command fails.
    let out = bin()
        .args(["onnx", "compare", "--runs", "1", "--tolerance", "0", "--input"])
        .arg(fixture("cnn_fixture.onnx.input.npy"))
        .arg(fixture("cnn_fixture.onnx"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && stdout.contains("FAIL") && stderr.contains("--tolerance"), "{stdout}\n{stderr}");
}

#[test]
fn onnx_run_engines_agree() {
    if !ort_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for engine in ["candle", "ort"] {
        let y = dir.path().join(format!("{engine}.npy"));
        let out = bin()
            .args(["onnx", "run", "--engine", engine, "--tensor", "feat", "--input"])
            .arg(fixture("cnn_fixture.onnx.input.npy"))
            .arg("--output")
            .arg(&y)
            .arg(fixture("cnn_fixture.onnx"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        outs.push(automm::onnx::read_npy(&y).unwrap());
    }
    assert_eq!(outs[0].dims(), &[2, 16]);
    let d = (&outs[0] - &outs[1])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= 1e-4, "{d}");
}
