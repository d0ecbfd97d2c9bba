//! Candle importer vs ONNX Runtime on the same model and batch, measured in one run (criterion).
//! Models: the committed fixtures always; `models/efficientnet_lite0.onnx`, `models/swin_tiny.onnx` and
//! `../shared/models/efficientnet_lite0.onnx` when present. ORT parts run when its library is found.
//!
//!   cargo bench --bench engines            # all
//!   cargo bench --bench engines -- swin    # a subset
//! `automm onnx compare MODEL --batch 8 --tensor features` prints the same comparison as a ratio.

use std::path::PathBuf;

use automm::onnx::{detect_feature_tensor, read_model, Graph};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn models() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut v = vec![root.join("models/fixtures/cnn_fixture.onnx"), root.join("models/fixtures/swin_fixture.onnx")];
    for p in ["models/efficientnet_lite0.onnx", "models/swin_tiny.onnx", "../shared/models/efficientnet_lite0.onnx"] {
        let p = root.join(p);
        if p.is_file() {
            v.push(p);
        }
    }
    v
}

fn bench(c: &mut Criterion) {
    let ort_ok = automm::deploy::engine::ort::locate().is_ok();
    for path in models() {
        let proto = read_model(&path).unwrap();
        let feature = detect_feature_tensor(&proto).unwrap();
        let g = Graph::from_model(&proto, "bench", &Device::Cpu, Some(vec![feature.clone()])).unwrap();
        let spec = g.inputs()[0].clone();
        let side = spec.dims[2].unwrap_or(224);
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut group = c.benchmark_group(format!("features/{name}"));
        group.sample_size(10);
        for batch in [1usize, 8] {
            let x =
                Tensor::randn(0f32, 1.0, (batch, 3, side, side), &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
            group.bench_with_input(BenchmarkId::new("candle", batch), &x, |b, x| {
                b.iter(|| g.run(&[(spec.name.as_str(), x.clone())]).unwrap())
            });
            if ort_ok {
                let dir = tempfile::tempdir().unwrap();
                let m = automm::deploy::engine::with_output(&path, &feature, dir.path()).unwrap();
                let s = automm::deploy::engine::ort::OrtSession::open(&m, 0).unwrap();
                let data: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let dims = x.dims().to_vec();
                group.bench_with_input(BenchmarkId::new("ort", batch), &data, |b, d| {
                    b.iter(|| s.run_f32(&[(spec.name.as_str(), &dims, d)]).unwrap())
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
