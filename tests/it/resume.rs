//! Crash-safe training: a run stopped after any epoch (on request, or by `kill -9` at a random moment)
//! and resumed reaches the same final head as an uninterrupted run; a diverging learning rate stops with
//! the epoch and batch named and keeps the last good checkpoint.

use crate::common;
use common::bin;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automm::train::checkpoint::Checkpoint;
use automm::train::{resume, train, Event, Phase, ResumeOptions, TrainRequest};

fn backbone() -> PathBuf {
    common::fixture("cnn_fixture.onnx")
}

fn request(dir: &Path, out: &str, hp: &[&str]) -> TrainRequest {
    let train_data = dir.join("train.csv");
    if !train_data.exists() {
        automm::app::synth::make_dataset(dir, "train", &[24, 12, 8, 4], 48, 1).unwrap();
    }
    let mut b = automm::train::config::HyperParamsBuilder::new();
    for kv in
        ["optimization.loss_function=focal_loss", "optimization.focal_loss.alpha=auto", "env.seed=11"].iter().chain(hp)
    {
        b = b.set_str(kv).unwrap();
    }
    common::train_request(train_data, dir.join(out), b.build().unwrap().0)
}

/// `automm train --quiet` on `dir/train.csv` with the CNN fixture into `out`, with `--hp` settings.
fn train_cmd(dir: &Path, out: &Path, hp: &[&str]) -> std::process::Command {
    let mut c = bin();
    c.args(["train", "--quiet", "--label", "label", "--train-data"])
        .arg(dir.join("train.csv"))
        .arg("--backbone")
        .arg(backbone())
        .arg("--output")
        .arg(out);
    for kv in hp {
        c.args(["--hp", kv]);
    }
    c
}

fn losses(s: &automm::train::TrainSummary) -> Vec<f64> {
    s.history.iter().map(|h| h.train_loss).collect()
}

#[test]
fn stopped_after_an_epoch_and_resumed_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let hp = ["optimization.max_epochs=8", "optimization.patience=100", "env.batch_size=8"];
    let full = train(&request(dir.path(), "full", &hp), |_| {}).unwrap();

    let mut req = request(dir.path(), "cut", &hp);
    let flag = Arc::new(AtomicBool::new(false));
    req.cancel = Some(flag.clone());
    let err = train(&req, |e| {
        if matches!(e, Event::Epoch(r) if r.epoch == 3) {
            flag.store(true, Ordering::SeqCst);
        }
    })
    .unwrap_err();
    assert!(matches!(err, automm::Error::Cancelled { epoch: 3, .. }), "{err}");
    let ck = Checkpoint::in_output(&req.output);
    assert!(ck.state_file().is_file() && ck.features_file().is_file() && ck.run_file().is_file());
    assert!(!req.output.join("head.safetensors").exists(), "no model before the run finishes");

    let mut phases = Vec::new();
    let resumed = resume(&req.output, &ResumeOptions { quiet: true, ..Default::default() }, |e| {
        if let Event::Phase(p) = e {
            phases.push(*p);
        }
    })
    .unwrap();
    assert!(phases.contains(&Phase::FeaturesCached), "feature cache not reused: {phases:?}");
    assert_eq!(losses(&resumed), losses(&full));
    assert_eq!(resumed.best_epoch, full.best_epoch);
    assert_eq!(
        std::fs::read(req.output.join("head.safetensors")).unwrap(),
        std::fs::read(dir.path().join("full/head.safetensors")).unwrap(),
        "resumed head differs from the uninterrupted one"
    );
    assert!(!ck.root.exists(), "the checkpoint is removed once the model is complete");
    let e = resume(&req.output, &ResumeOptions::default(), |_| {}).unwrap_err().to_string();
    assert!(e.contains("nothing to resume"), "{e}");
}

#[test]
fn diverging_learning_rate_stops_naming_epoch_and_batch_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut req = request(dir.path(), "run", &["optimization.max_epochs=6", "env.batch_size=8"]);
    let flag = Arc::new(AtomicBool::new(false));
    req.cancel = Some(flag.clone());
    let _ = train(&req, |e| {
        if matches!(e, Event::Epoch(r) if r.epoch == 2) {
            flag.store(true, Ordering::SeqCst);
        }
    })
    .unwrap_err();
    let ck = Checkpoint::in_output(&req.output);
    let before = std::fs::read(ck.state_file()).unwrap();
    // Continue with a learning rate that overflows the weights at once.
    let opts = ResumeOptions {
        overrides: automm::train::config::HyperParamsBuilder::new()
            .set_str("optimization.learning_rate=1e38")
            .unwrap()
            .set_str("optimization.lr_schedule=constant")
            .unwrap()
            .set_str("optimization.warmup_steps=0")
            .unwrap(),
        quiet: true,
        cancel: None,
    };
    let e = resume(&req.output, &opts, |_| {}).unwrap_err().to_string();
    assert!(e.contains("diverged") && e.contains("epoch 3, batch "), "{e}");
    assert!(e.contains("last good checkpoint (epoch 2)"), "{e}");
    assert_eq!(std::fs::read(ck.state_file()).unwrap(), before, "the last good checkpoint was overwritten");
    let st = ck.read_state(&candle_core::Device::Cpu).unwrap().unwrap();
    assert_eq!(st.progress.epoch, 2);
}

/// `kill -9` of `automm train` at a random moment after the first checkpoint, then `--resume`: the same
/// head bytes as an uninterrupted run (the kill may land mid-epoch, mid-write or between writes).
#[test]
fn kill_9_at_random_moments_then_resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    automm::app::synth::make_dataset(dir.path(), "train", &[24, 12, 8, 4], 48, 1).unwrap();
    let hp = ["optimization.max_epochs=1000", "optimization.patience=1000", "env.batch_size=4", "env.seed=3"];
    let args = |out: &Path| train_cmd(dir.path(), out, &hp);
    let full = dir.path().join("full");
    assert!(args(&full).output().unwrap().status.success());
    let want = std::fs::read(full.join("head.safetensors")).unwrap();

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for round in 0..3u32 {
        let out = dir.path().join(format!("killed{round}"));
        let mut child =
            args(&out).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let state = Checkpoint::in_output(&out).state_file();
        let t0 = Instant::now();
        while !state.exists() {
            assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
            std::thread::sleep(Duration::from_millis(2));
        }
        // A different delay each round and each test run.
        let delay = (seed.wrapping_mul(2654435761).wrapping_add(round * 977)) % 150;
        std::thread::sleep(Duration::from_millis(delay as u64));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: training finished before the kill; make the run longer");
        let r = bin().args(["train", "--quiet", "--resume"]).arg(&out).output().unwrap();
        assert!(r.status.success(), "round {round} (killed after {delay} ms): {}", String::from_utf8_lossy(&r.stderr));
        assert_eq!(std::fs::read(out.join("head.safetensors")).unwrap(), want, "round {round}: resumed head differs");
    }
}

/// A bit_fit run (conv biases of the backbone train with the head) killed with SIGKILL after its second
/// epoch's checkpoint, then resumed: the same head and tuned backbone values as an uninterrupted run (byte
/// for byte, i.e. max abs diff 0), and the resumed run starts after the checkpointed epoch.
#[test]
fn kill_9_of_a_bit_fit_run_after_epoch_2_then_resume_equals_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    automm::app::synth::make_dataset(dir.path(), "train", &[12, 6, 4, 3], 48, 2).unwrap();
    let hp = [
        "optimization.efficient_finetune=bit_fit",
        "optimization.max_epochs=30",
        "optimization.patience=100",
        "env.batch_size=4",
        "env.seed=5",
    ];
    let args = |out: &Path| train_cmd(dir.path(), out, &hp);
    let full = dir.path().join("full");
    let r = args(&full).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();

    let out = dir.path().join("killed");
    let mut child = args(&out).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let ck = Checkpoint::in_output(&out);
    let t0 = Instant::now();
    let killed_after = loop {
        // Each state file is complete (written to a temp file, then renamed).
        if let Ok(Some(st)) = ck.read_state(&candle_core::Device::Cpu) {
            if st.progress.epoch >= 2 {
                child.kill().unwrap(); // SIGKILL
                break st.progress.epoch;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no second-epoch checkpoint appeared");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(!child.wait().unwrap().success(), "the run finished before the kill; make it longer");
    let st = ck.read_state(&candle_core::Device::Cpu).unwrap().unwrap();
    assert!(st.progress.epoch >= killed_after && st.progress.epoch < 30, "epoch {}", st.progress.epoch);
    assert!(!st.backbone.is_empty(), "the checkpoint holds the tuned backbone initializers");
    assert!(!out.join("head.safetensors").exists(), "no model before the run finishes");

    let mut epochs = Vec::new();
    let resumed = resume(&out, &ResumeOptions { quiet: true, ..Default::default() }, |e| {
        if let Event::Epoch(r) = e {
            epochs.push(r.epoch);
        }
    })
    .unwrap();
    let first = st.progress.epoch + 1;
    assert_eq!(epochs, (first..=30).collect::<Vec<_>>(), "the resumed run redid finished epochs");
    assert_eq!(resumed.history.len(), 30);
    for file in ["head.safetensors", "backbone_update.safetensors"] {
        let diff = max_abs_diff(&out.join(file), &full.join(file));
        assert_eq!(diff, 0.0, "{file}: resumed values differ from the uninterrupted run's by up to {diff}");
        assert!(read(&out, file) == read(&full, file), "{file}: same values but different bytes");
    }
    assert!(!ck.root.exists(), "the checkpoint is removed once the model is complete");
}

/// The largest |a - b| over every tensor of two safetensors files with the same names and shapes.
fn max_abs_diff(a: &Path, b: &Path) -> f32 {
    let load = |p: &Path| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len(), "different tensor counts");
    a.iter()
        .map(|(name, ta)| {
            let tb = b.get(name).unwrap_or_else(|| panic!("`{name}` missing"));
            assert_eq!(ta.dims(), tb.dims(), "`{name}`");
            let d = (ta - tb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            d.to_scalar::<f32>().unwrap()
        })
        .fold(0.0, f32::max)
}
