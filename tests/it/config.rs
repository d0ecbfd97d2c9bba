//! Hyperparameters under AutoMM's names: spellings, files, overrides and every error.

use automm::model::hparams::{Alpha, LossKind, LrSchedule, ValMetric};
use automm::train::config::HyperParamsBuilder;
use automm::train::loss::Reduction;
use automm::train::schedule::Schedule;

fn build(kvs: &[&str]) -> automm::Result<automm::model::hparams::HyperParams> {
    let mut b = HyperParamsBuilder::new();
    for kv in kvs {
        b = b.set_str(kv)?;
    }
    b.build().map(|(hp, _)| hp)
}

fn err(kvs: &[&str]) -> String {
    build(kvs).unwrap_err().to_string()
}

#[test]
fn tutorial_keys_parse() {
    let hp = build(&[
        "optimization.loss_function=focal_loss",
        "optimization.focal_loss.alpha=auto",
        "optimization.focal_loss.gamma=1.0",
        "optimization.focal_loss.reduction=sum",
        "optimization.max_epochs=10",
        "env.num_gpus=0",
        "env.seed=3",
        "env.batch_size=16",
    ])
    .unwrap();
    assert_eq!(hp.loss_function, LossKind::FocalLoss);
    assert_eq!(hp.focal_alpha, Alpha::Auto);
    assert_eq!(hp.focal_gamma, 1.0);
    assert_eq!(hp.focal_reduction, Reduction::Sum);
    assert_eq!((hp.max_epochs, hp.num_gpus, hp.seed, hp.batch_size), (10, 0, 3, 16));
}

#[test]
fn newer_optim_spellings_are_the_same_keys() {
    let hp = build(&[
        "optim.loss_func=focal_loss",
        "optim.lr=0.01",
        "optim.focal_loss.alpha=[0.1, 0.2, 0.7]",
        "optim.focal_loss.gamma=2",
        "optim.max_epochs=3",
        "optim.lr_schedule=linear_decay",
        "optim.val_metric=balanced_accuracy",
        "optim.label_smoothing=0.1",
        "optim.patience=2",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
    ])
    .unwrap();
    assert_eq!(hp.loss_function, LossKind::FocalLoss);
    assert_eq!(hp.learning_rate, 0.01);
    assert_eq!(hp.focal_alpha, Alpha::List(vec![0.1, 0.2, 0.7]));
    assert_eq!(hp.lr_schedule, LrSchedule::LinearDecay);
    assert_eq!(hp.val_metric, ValMetric::BalancedAccuracy);
    assert_eq!((hp.max_epochs, hp.patience), (3, 2));
    // Later entries win, whichever spelling they use.
    assert_eq!(build(&["optim.lr=0.5", "optimization.learning_rate=0.25"]).unwrap().learning_rate, 0.25);
}

#[test]
fn alpha_forms() {
    assert_eq!(build(&["optimization.focal_loss.alpha=null"]).unwrap().focal_alpha, Alpha::None);
    assert_eq!(build(&["optimization.focal_loss.alpha=0.25,0.75"]).unwrap().focal_alpha, Alpha::List(vec![0.25, 0.75]));
    assert!(err(&["optimization.focal_loss.alpha=abc"]).contains("expected a list of numbers"));
    assert!(err(&["optimization.focal_loss.alpha=[0.5, -1]"]).contains(">= 0"));
}

#[test]
fn alpha_length_mismatch_names_both_counts_and_class_order() {
    let hp = build(&["optimization.focal_loss.alpha=[0.5, 0.5]"]).unwrap();
    let classes: Vec<String> = ["cat", "dog", "emu"].iter().map(|s| s.to_string()).collect();
    let e = automm::train::loss::resolve_alpha(&hp.focal_alpha, &classes, &[3, 3, 3]).unwrap_err().to_string();
    assert!(e.contains("2 weights") && e.contains("3 classes") && e.contains("[\"cat\", \"dog\", \"emu\"]"), "{e}");
    let auto = build(&["optimization.focal_loss.alpha=auto"]).unwrap();
    let a = automm::train::loss::resolve_alpha(&auto.focal_alpha, &classes, &[10, 5, 5]).unwrap().unwrap();
    assert!((a[0] - 0.2).abs() < 1e-12 && (a[1] - 0.4).abs() < 1e-12);
}

#[test]
fn value_errors() {
    let e = err(&["optimization.focal_loss.gamma=-1"]);
    assert!(e.contains("optimization.focal_loss.gamma") && e.contains(">= 0"), "{e}");
    let e = err(&["optimization.focal_loss.reduction=median"]);
    assert!(e.contains("median") && e.contains("mean") && e.contains("sum"), "{e}");
    let e = err(&["optimization.max_epochs=ten"]);
    assert!(e.contains("optimization.max_epochs") && e.contains("expected a number"), "{e}");
    let e = err(&["optimization.learning_rate=fast"]);
    assert!(e.contains("expected a number"), "{e}");
    let e = err(&["optimization.loss_function=hinge"]);
    assert!(e.contains("focal_loss") && e.contains("cross_entropy"), "{e}");
    assert!(err(&["env.batch_size=0"]).contains("at least 1"));
    assert!(err(&["env.num_gpus=1.5"]).contains("integer"));
    assert!(err(&["no_equals_sign"]).contains("KEY=VALUE"));
}

#[test]
fn misspelt_keys_get_the_closest_valid_key() {
    let e = err(&["optimization.focal_los.gamma=1"]);
    assert!(e.contains("unknown hyperparameter") && e.contains("`optimization.focal_loss.gamma`"), "{e}");
    let e = err(&["optim.max_epoch=1"]);
    assert!(e.contains("`optim.max_epochs`"), "{e}");
}

#[test]
fn unsupported_automm_keys_warn_with_what_they_would_do() {
    let (_, w) = HyperParamsBuilder::new()
        .set_str("model.mmdet_image.checkpoint_name=yolox_s")
        .unwrap()
        .set_str("env.precision=16")
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(w.len(), 2);
    assert!(w[0].contains("model.mmdet_image.checkpoint_name") && w[0].contains("object detection"), "{w:?}");
    assert!(w[1].contains("precision"), "{w:?}");
}

#[test]
fn config_files_nested_or_flat_and_hp_overrides_them() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("hp.yaml");
    std::fs::write(
        &yaml,
        "optimization:\n  loss_function: focal_loss\n  focal_loss:\n    gamma: 0.5\n    reduction: sum\nenv.seed: 7\n",
    )
    .unwrap();
    let (hp, _) = HyperParamsBuilder::new()
        .file(&yaml)
        .unwrap()
        .set_str("optimization.focal_loss.gamma=2")
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(hp.loss_function, LossKind::FocalLoss);
    assert_eq!(hp.focal_gamma, 2.0);
    assert_eq!(hp.focal_reduction, Reduction::Sum);
    assert_eq!(hp.seed, 7);
    let json = dir.path().join("hp.json");
    std::fs::write(&json, r#"{"optimization.focal_loss.alpha": [1, 2], "optimization.max_epochs": 4}"#).unwrap();
    let (hp, _) = HyperParamsBuilder::new().file(&json).unwrap().build().unwrap();
    assert_eq!((hp.focal_alpha, hp.max_epochs), (Alpha::List(vec![1.0, 2.0]), 4));
    std::fs::write(&json, "[1, 2]").unwrap();
    assert!(HyperParamsBuilder::new().file(&json).unwrap_err().to_string().contains("map"));
}

#[test]
fn schedule_warms_up_then_decays() {
    let hp = build(&["optimization.learning_rate=1.0", "optimization.warmup_steps=0.1"]).unwrap();
    assert!((Schedule::new(&hp, 100).lr_at(0) - 0.1).abs() < 1e-12);
    assert!((Schedule::new(&hp, 100).lr_at(9) - 1.0).abs() < 1e-12);
    assert!(Schedule::new(&hp, 100).lr_at(99) < 0.01);
    assert!((Schedule::new(&hp, 100).lr_at(55) - 0.5).abs() < 0.02);
}

#[test]
fn backbone_freeze_selects_the_mode_and_full_finetuning_gets_automm_learning_rate() {
    use automm::model::hparams::{BackboneMode, FULL_FINETUNE_LR};
    assert_eq!(build(&[]).unwrap().backbone_mode(), BackboneMode::Frozen);
    assert_eq!(build(&["optimization.efficient_finetune=bit_fit"]).unwrap().backbone_mode(), BackboneMode::Efficient);
    let full = build(&["model.backbone.freeze=false"]).unwrap();
    assert_eq!((full.backbone_mode(), full.learning_rate), (BackboneMode::Full, FULL_FINETUNE_LR));
    assert!(full.finetunes_backbone());
    // An explicit learning rate wins, in either order.
    for kvs in [
        ["model.backbone.freeze=false", "optimization.learning_rate=3e-5"],
        ["optim.lr=3e-5", "model.backbone.freeze=false"],
    ] {
        assert_eq!(build(&kvs).unwrap().learning_rate, 3e-5);
    }
    assert_eq!(build(&["model.backbone.freeze=true"]).unwrap().learning_rate, 1e-3);
    assert!(err(&["model.backbone.freeze=maybe"]).contains("expected true or false"));
    // AutoMM's intent to fine-tune a timm checkpoint is named, with the key that does it here.
    let (_, w) =
        HyperParamsBuilder::new().set_str("model.timm_image.checkpoint_name=swin_tiny").unwrap().build().unwrap();
    assert!(
        w.len() == 1 && w[0].contains("frozen-feature head") && w[0].contains("unless model.backbone.freeze=false"),
        "{w:?}"
    );
}
