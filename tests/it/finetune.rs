//! Efficient fine-tuning: the initializers bit_fit / norm_fit / trainable_layers pick, gradients through
//! the imported graph checked against central finite differences, and whole runs through the binary
//! (augmentation, determinism, the tuned values in predictions and in the exported ONNX).

use std::path::Path;

use automm::model::hparams::{EfficientFinetune, HyperParams};
use automm::onnx::{detect_feature_tensor, read_model, read_npy, Graph};
use automm::train::finetune::{select_trainable as select_by, TunedBackbone};
use candle_core::{Device, Tensor};

fn fixture(name: &str) -> String {
    format!("{}/models/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// What `efficient_finetune = mode` plus `trainable_layers = prefixes` select.
fn select_trainable(g: &Graph, mode: EfficientFinetune, prefixes: &[String]) -> Vec<String> {
    select_by(g, &HyperParams { efficient_finetune: mode, trainable_layers: prefixes.to_vec(), ..Default::default() })
}

/// What full fine-tuning (`model.backbone.freeze = false`) selects.
fn full(g: &Graph) -> Vec<String> {
    select_by(g, &HyperParams { freeze: false, ..Default::default() })
}

/// Autograd gradients of sum(features * r) w.r.t. every trainable initializer vs central differences
/// (float32, step `h`), on a few elements of each.
/// `cached_prefix`: whether the graph must split into a frozen, cached prefix and a trainable rest.
fn check_gradients(model_file: &str, select: &dyn Fn(&Graph) -> Vec<String>, h: f32, cached_prefix: bool) -> usize {
    let path = fixture(model_file);
    let model = read_model(Path::new(&path)).unwrap();
    let feature = detect_feature_tensor(&model).unwrap();
    let graph = Graph::from_model(&model, &path, &Device::Cpu, Some(vec![feature.clone()])).unwrap();
    let input = graph.inputs()[0].name.clone();
    let trainable = select(&graph);
    assert!(!trainable.is_empty());
    let x = read_npy(Path::new(&format!("{path}.input.npy"))).unwrap();
    let size = x.dims()[2];
    let tb = TunedBackbone::new(&model, &path, &Device::Cpu, &input, &feature, &trainable, size).unwrap();
    assert_eq!(tb.has_prefix(), cached_prefix, "{model_file}: frozen prefix");
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
    let n = check_gradients("cnn_fixture.onnx", &|g| select_trainable(g, EfficientFinetune::BitFit, &[]), 1e-3, false);
    assert!(n >= 15, "only {n} elements checked");
}

#[test]
fn norm_fit_gradients_match_finite_differences_through_a_swin() {
    // LayerNorm scales/shifts and biases of attention, MLP and patch merging.
    let n =
        check_gradients("swin_fixture.onnx", &|g| select_trainable(g, EfficientFinetune::NormFit, &[]), 1e-2, false);
    assert!(n >= 30, "only {n} elements checked");
}

#[test]
fn full_finetuning_gradients_match_finite_differences_through_a_cnn_and_a_swin() {
    // Every parameter: conv weights (dense, depthwise, 1x1) and biases of the CNN; patch embedding,
    // every MatMul weight, LayerNorm, biases and the folded relative-position biases of the Swin, through
    // our LayerNorm, Softmax and GELU backward passes.
    let n = check_gradients("cnn_fixture.onnx", &full, 1e-3, false);
    assert!(n >= 30, "only {n} elements checked");
    let n = check_gradients("swin_fixture.onnx", &full, 1e-2, false);
    assert!(n >= 120, "only {n} elements checked");
}

#[test]
fn trainable_layers_gradients_with_a_cached_prefix() {
    // The last conv stage trains; everything before it is a frozen, cached prefix.
    let n = check_gradients(
        "cnn_fixture.onnx",
        &|g| select_trainable(g, EfficientFinetune::None, &["pw2".into()]),
        1e-3,
        true,
    );
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
    // Full fine-tuning: every float initializer of this export is a parameter (weights, biases, norms, the
    // folded relative-position biases); none of the CNN's scalar Clip bounds is.
    let all = full(&g);
    assert!(norm.iter().all(|n| all.contains(n)));
    assert!(all.iter().any(|n| n.starts_with("onnx::MatMul_")) && all.contains(&"patch_embed.proj.weight".to_string()));
    let path = fixture("cnn_fixture.onnx");
    let model = read_model(Path::new(&path)).unwrap();
    let feature = detect_feature_tensor(&model).unwrap();
    let g = Graph::from_model(&model, &path, &Device::Cpu, Some(vec![feature])).unwrap();
    let all = full(&g);
    assert_eq!(all.len(), 10, "{all:?}");
    assert!(all.iter().all(|n| n.ends_with("_W") || n.ends_with("_B")), "{all:?}");
}

use crate::common;

/// Trains the CNN fixture on generated images through the binary with `hp` settings.
fn train_cli(dir: &Path, name: &str, train: &Path, hp: &[&str]) -> std::path::PathBuf {
    let out = dir.join(name);
    let mut cmd = common::bin();
    cmd.args(["train", "--quiet", "--label", "label", "--train-data"])
        .arg(train)
        .arg("--backbone")
        .arg(common::fixture("cnn_fixture.onnx"))
        .arg("--output")
        .arg(&out)
        .args(["--hp", "optimization.max_epochs=2", "--hp", "env.batch_size=8"]);
    for kv in hp {
        cmd.args(["--hp", kv]);
    }
    let st = cmd.output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    out
}

#[test]
fn bit_fit_with_augmentation_trains_saves_predicts_and_exports_the_tuned_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let train = automm::app::synth::make_dataset(dir.path(), "train", &[12, 8, 6, 4], 40, 3).unwrap();
    let test = automm::app::synth::make_dataset(dir.path(), "test", &[3, 3, 3, 3], 40, 4).unwrap();
    let hp = [
        "optimization.efficient_finetune=bit_fit",
        "model.timm_image.train_transforms=[random_resize_crop, random_horizontal_flip, color_jitter]",
    ];
    let model = train_cli(dir.path(), "a", &train, &hp);
    let md = automm::model::ModelDir::new(&model);
    let cfg = md.read_config().unwrap();
    let src = read_model(&common::fixture("cnn_fixture.onnx")).unwrap();
    let feature = detect_feature_tensor(&src).unwrap();
    let g = Graph::from_model(&src, "fixture", &Device::Cpu, Some(vec![feature])).unwrap();
    assert_eq!(cfg.finetuned, select_trainable(&g, EfficientFinetune::BitFit, &[]));
    let update = md.read_backbone_update(&cfg, &Device::Cpu).unwrap();
    // Every tuned bias moved away from the backbone's value.
    for (name, t) in &update {
        let d =
            (t - g.initializer(name).unwrap()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "`{name}` did not change");
    }
    // The same seed gives the same run, augmentation included.
    let again = train_cli(dir.path(), "b", &train, &hp);
    for f in ["head.safetensors", "backbone_update.safetensors"] {
        assert_eq!(std::fs::read(model.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f} differs");
    }
    // The predictor uses the tuned values: its features differ from the frozen backbone's.
    let p = automm::deploy::predict::Predictor::load(&model, &Device::Cpu).unwrap();
    let table = automm::data::Table::load(&test, None, None).unwrap();
    let tuned = p.features(&table, true).unwrap();
    let mut frozen = automm::model::backbone::Backbone::load(
        &common::fixture("cnn_fixture.onnx"),
        &Device::Cpu,
        Some(&cfg.backbone.feature_tensor),
        cfg.preprocess.normalization.clone(),
    )
    .unwrap();
    let files = table.all_image_refs();
    let before = frozen.features_of_files(&files, 8, "x", true).unwrap();
    assert!((&tuned - &before).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1e-4);
    frozen.apply_update(&update).unwrap();
    let after = frozen.features_of_files(&files, 8, "x", true).unwrap();
    assert_eq!(
        after.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        tuned.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // The merged export carries the tuned initializers and matches the folder (verified on candle, and
    // on ONNX Runtime when present).
    let out = dir.path().join("tuned.onnx");
    let opts = automm::deploy::export::ExportOptions {
        kind: automm::deploy::meta::ExportKind::Merged,
        opset: None,
        verify: true,
        verify_data: Some(test.clone()),
        verify_images: 12,
        prior: None,
        backbone: None,
    };
    let r = automm::deploy::export::export(&model, &out, &opts).unwrap();
    let v = r.verification.unwrap();
    assert!(v.passed && v.max_abs_diff <= 1e-4, "{v:?}");
    let proto = read_model(&out).unwrap();
    for (name, t) in &update {
        let init = proto.graph.as_ref().unwrap().initializer.iter().find(|i| &i.name == name).unwrap();
        let got = automm::onnx::tensor::from_proto(init, &Device::Cpu).unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), t.to_vec1::<f32>().unwrap(), "`{name}` in the export");
    }
    let want = p.predict_table(&table, true).unwrap();
    let mut engines = vec![automm::deploy::engine::EngineKind::Candle];
    if common::ort_available() {
        engines.push(automm::deploy::engine::EngineKind::Ort);
    }
    for engine in engines {
        let m = automm::deploy::engine::exported::ExportedModel::open(&out, Some(engine), 0).unwrap();
        let got = m.predict_files(&files, 5, true).unwrap();
        let diff = got.probs.iter().zip(&want.probs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "{engine:?} on the export vs the folder: {diff}");
        assert_eq!(got.preds, want.preds);
    }
}

#[test]
fn trainable_layers_train_the_last_stage_through_a_cached_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let train = automm::app::synth::make_dataset(dir.path(), "train", &[10, 6], 40, 5).unwrap();
    let model = train_cli(dir.path(), "run", &train, &["model.backbone.trainable_layers=pw2"]);
    let cfg = automm::model::ModelDir::new(&model).read_config().unwrap();
    assert_eq!(cfg.finetuned, vec!["pw2_B".to_string(), "pw2_W".to_string()]);
    let e = common::bin()
        .args(["train", "--quiet", "--label", "label", "--train-data"])
        .arg(&train)
        .arg("--backbone")
        .arg(common::fixture("cnn_fixture.onnx"))
        .arg("--output")
        .arg(dir.path().join("bad"))
        .args(["--hp", "optimization.efficient_finetune=lora"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("optimization.efficient_finetune") && err.contains("bit_fit"), "{err}");
}

#[test]
fn full_finetuning_trains_every_parameter_with_automm_learning_rate_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let train = automm::app::synth::make_dataset(dir.path(), "train", &[10, 6, 4], 40, 6).unwrap();
    let model = train_cli(dir.path(), "full", &train, &["model.backbone.freeze=false"]);
    let md = automm::model::ModelDir::new(&model);
    let cfg = md.read_config().unwrap();
    assert_eq!((cfg.hyperparameters.freeze, cfg.hyperparameters.learning_rate), (false, 1e-4));
    let src = read_model(&common::fixture("cnn_fixture.onnx")).unwrap();
    let feature = detect_feature_tensor(&src).unwrap();
    let g = Graph::from_model(&src, "fixture", &Device::Cpu, Some(vec![feature])).unwrap();
    assert_eq!(cfg.finetuned, full(&g));
    // Every weight and bias moved, the stem's included (gradients crossed the whole graph).
    for (name, t) in &md.read_backbone_update(&cfg, &Device::Cpu).unwrap() {
        let d =
            (t - g.initializer(name).unwrap()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "`{name}` did not change");
    }
    let out = dir.path().join("full.onnx");
    let opts = automm::deploy::export::ExportOptions {
        verify: true,
        verify_data: Some(train.clone()),
        verify_images: 8,
        ..automm::deploy::export::ExportOptions::merged()
    };
    let v = automm::deploy::export::export(&model, &out, &opts).unwrap().verification.unwrap();
    assert!(v.passed && v.max_abs_diff <= 1e-4, "{v:?}");
}
