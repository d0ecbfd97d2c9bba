//! The demo's whole pipeline at reduced size (fewer images and epochs), so CI keeps `automm demo` working:
//! the three trainings, export with verification, in-process server, client predictions — on generated
//! shapes with the Swin fixture, and on a small subset of the shipped photos with the shipped pretrained
//! backbone.

use automm::app::demo::{DemoData, DemoOptions};

#[test]
fn demo_pipeline_runs_end_to_end_on_generated_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        work_dir: dir.path().join("demo"),
        data: DemoData::Synthetic { train_counts: vec![30, 12, 6, 3], test_counts: vec![5; 4], image_size: 48 },
        epochs: 3,
        quiet: true,
        ..Default::default()
    };
    let mut lines = Vec::new();
    let r = automm::app::demo::run(&opts, |l| lines.push(l.to_string())).unwrap();
    assert!(r.backbone.ends_with("models/fixtures/swin_fixture.onnx"));
    assert!(r.server_labels_equal && r.server_max_abs_diff <= 1e-4, "{r:?}");
    assert_eq!(r.minority, ("ring".to_string(), 3));
    for (what, p) in &r.artefacts {
        assert!(p.exists(), "{what} missing: {}", p.display());
    }
    let table = automm::app::demo::comparison_table(&r);
    assert!(table.contains("recall ring (minority, 3)") && table.contains("balanced_accuracy"), "{table}");
    assert!(table.contains("automm default"), "{table}");
    assert!(lines.iter().any(|l| l.contains("serving")));
}

#[test]
fn demo_runs_on_the_shipped_photos_and_pretrained_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        work_dir: dir.path().join("demo"),
        data: DemoData::Photos { per_class: Some(8) },
        epochs: 10,
        quiet: true,
        ..Default::default()
    };
    let mut lines = Vec::new();
    let r = automm::app::demo::run(&opts, |l| lines.push(l.to_string())).unwrap();
    assert!(r.backbone.ends_with("models/pretrained/efficientnet_lite0.onnx"), "{}", r.backbone.display());
    // The backbone's metadata says symmetric normalisation.
    assert!(lines.iter().any(|l| l.contains("normalisation symmetric")), "{lines:?}");
    assert_eq!(r.minority, ("dress".to_string(), 7));
    assert_eq!(r.served_images, 32);
    assert!(r.server_labels_equal && r.server_max_abs_diff <= 1e-4, "{r:?}");
    assert!(r.export_max_abs_diff <= 1e-4, "{r:?}");
    assert_eq!(r.runs.len(), 3);
    assert!(r.run("default").unwrap().loss.starts_with("cross_entropy"), "8 per class is balanced: {:?}", r.runs);
    // Pretrained features separate these classes even from 8 training photos per class.
    let bal = r.run("default").unwrap().report.get(automm::model::metrics::Metric::BalancedAccuracy).unwrap();
    assert!(bal >= 0.5, "balanced accuracy {bal} on 4 classes (chance 0.25)");
}
