//! Efficient fine-tuning: the initializers bit_fit / norm_fit / trainable_layers pick, and gradients
//! through the imported graph checked against central finite differences.

use std::path::Path;

use automm::config::EfficientFinetune;
use automm::finetune::{select_trainable, TunedBackbone};
use automm::onnx::{detect_feature_tensor, read_model, read_npy, Graph};
use candle_core::{Device, Tensor};

fn fixture(name: &str) -> String {
    format!("{}/models/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Autograd gradients of sum(features * r) w.r.t. every trainable initializer vs central differences
/// (float32, step `h`), on a few elements of each.
fn check_gradients(model_file: &str, mode: EfficientFinetune, prefixes: &[String], h: f32) -> usize {
    let path = fixture(model_file);
    let model = read_model(Path::new(&path)).unwrap();
    let feature = detect_feature_tensor(&model).unwrap();
    let graph = Graph::from_model(&model, &path, &Device::Cpu, Some(vec![feature.clone()])).unwrap();
    let input = graph.inputs()[0].name.clone();
    let trainable = select_trainable(&graph, mode, prefixes);
    assert!(!trainable.is_empty());
    let x = read_npy(Path::new(&format!("{path}.input.npy"))).unwrap();
    let size = x.dims()[2];
    let tb = TunedBackbone::new(&model, &path, &Device::Cpu, &input, &feature, &trainable, size).unwrap();
    let front = tb.front(&x).unwrap();
    let f = tb.features(&front, true).unwrap();
    let n: usize = f.elem_count();
    let r = Tensor::from_vec(
        (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect::<Vec<_>>(),
        f.dims(),
        &Device::Cpu,
    )
    .unwrap();
    let grads = f.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = || -> f64 {
        let f = tb.features(&front, false).unwrap();
        f.to_dtype(candle_core::DType::F64)
            .unwrap()
            .mul(&r.to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut checked = 0;
    let scale = tb
        .vars
        .iter()
        .map(|(_, v)| {
            grads.get(v).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        })
        .fold(0f32, f32::max);
    for (name, v) in &tb.vars {
        let g = grads
            .get(v)
            .unwrap_or_else(|| panic!("no gradient reached `{name}`"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let orig = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let picks: Vec<usize> = [0, orig.len() / 2, orig.len() - 1].into_iter().collect();
        for &i in &picks {
            let mut p = orig.clone();
            p[i] += h;
            v.set(&Tensor::from_vec(p.clone(), v.dims(), &Device::Cpu).unwrap()).unwrap();
            let lp = loss();
            p[i] -= 2.0 * h;
            v.set(&Tensor::from_vec(p, v.dims(), &Device::Cpu).unwrap()).unwrap();
            let lm = loss();
            v.set(&Tensor::from_vec(orig.clone(), v.dims(), &Device::Cpu).unwrap()).unwrap();
            let fd = ((lp - lm) / (2.0 * h as f64)) as f32;
            let tol = 2e-2 * g[i].abs().max(fd.abs()) + 5e-3 * scale.max(1e-3);
            assert!(
                (fd - g[i]).abs() <= tol,
                "{model_file}: d/d{name}[{i}] autograd {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn bit_fit_gradients_match_finite_differences_through_a_cnn() {
    // Depthwise and dense convs, Clip, residual Add, GlobalAveragePool. A small step: ReLU6 kinks sit
    // among pre-activations of ~0.01.
    let n = check_gradients("cnn_fixture.onnx", EfficientFinetune::BitFit, &[], 1e-3);
    assert!(n >= 15, "only {n} elements checked");
}

#[test]
fn norm_fit_gradients_match_finite_differences_through_a_swin() {
    // LayerNorm scales/shifts and biases of attention, MLP and patch merging.
    let n = check_gradients("swin_fixture.onnx", EfficientFinetune::NormFit, &[], 1e-2);
    assert!(n >= 30, "only {n} elements checked");
}

#[test]
fn trainable_layers_gradients_with_a_cached_prefix() {
    // The last conv stage trains; everything before it is a frozen, cached prefix.
    let n = check_gradients("cnn_fixture.onnx", EfficientFinetune::None, &["pw2".to_string()], 1e-3);
    assert!(n >= 3);
}

#[test]
fn selection_follows_the_graph() {
    let path = fixture("cnn_fixture.onnx");
    let model = read_model(Path::new(&path)).unwrap();
    let feature = detect_feature_tensor(&model).unwrap();
    let g = Graph::from_model(&model, &path, &Device::Cpu, Some(vec![feature])).unwrap();
    let bit = select_trainable(&g, EfficientFinetune::BitFit, &[]);
    assert!(bit.iter().all(|n| n.ends_with("_B")), "{bit:?}");
    assert!(bit.contains(&"stem_B".to_string()) && bit.contains(&"dw1_B".to_string()));
    let layers = select_trainable(&g, EfficientFinetune::None, &["pw2".into()]);
    assert_eq!(layers, vec!["pw2_B".to_string(), "pw2_W".to_string()]);
    let path = fixture("swin_fixture.onnx");
    let model = read_model(Path::new(&path)).unwrap();
    let feature = detect_feature_tensor(&model).unwrap();
    let g = Graph::from_model(&model, &path, &Device::Cpu, Some(vec![feature])).unwrap();
    let norm = select_trainable(&g, EfficientFinetune::NormFit, &[]);
    let bit = select_trainable(&g, EfficientFinetune::BitFit, &[]);
    assert!(
        norm.contains(&"patch_embed.norm.weight".to_string()) && !bit.contains(&"patch_embed.norm.weight".to_string())
    );
    assert!(bit.contains(&"layers.0.blocks.0.attn.qkv.bias".to_string()));
    assert!(bit.iter().all(|n| norm.contains(n)));
}
