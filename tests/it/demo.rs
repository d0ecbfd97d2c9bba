//! The demo's whole pipeline at reduced size (fewer images and epochs), so CI keeps `automm demo` working:
//! generated data, both trainings, export with verification, in-process server, client predictions.

#[test]
fn demo_pipeline_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let opts = automm::app::demo::DemoOptions {
        work_dir: dir.path().join("demo"),
        backbone: Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fixtures/swin_fixture.onnx")),
        train_counts: vec![30, 12, 6, 3],
        test_counts: vec![5, 5, 5, 5],
        image_size: 48,
        epochs: 3,
        quiet: true,
        ..Default::default()
    };
    let mut lines = Vec::new();
    let r = automm::app::demo::run(&opts, |l| lines.push(l.to_string())).unwrap();
    assert!(r.backbone.ends_with("models/fixtures/swin_fixture.onnx"));
    assert!(r.server_labels_equal && r.server_max_abs_diff <= 1e-4, "{r:?}");
    assert_eq!(r.minority, "ring");
    for (what, p) in &r.artefacts {
        assert!(p.exists(), "{what} missing: {}", p.display());
    }
    let table = automm::app::demo::comparison_table(&r);
    assert!(table.contains("recall ring (minority)") && table.contains("balanced_accuracy"), "{table}");
    assert!(lines.iter().any(|l| l.contains("serving")));
}
