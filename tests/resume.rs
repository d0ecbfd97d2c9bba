//! Crash-safe training: a run stopped after any epoch (on request, or by `kill -9` at a random moment)
//! and resumed reaches the same final head as an uninterrupted run; a diverging learning rate stops with
//! the epoch and batch named and keeps the last good checkpoint.

mod common;
use common::bin;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automm::train::checkpoint::Checkpoint;
use automm::train::{resume, train, Event, ResumeOptions, TrainRequest};

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
            phases.push(p.clone());
        }
    })
    .unwrap();
    assert!(phases.iter().any(|p| p == "features (cached)"), "feature cache not reused: {phases:?}");
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
    let args = |out: &Path| {
        let mut c = bin();
        c.args(["train", "--quiet", "--label", "label", "--train-data"])
            .arg(dir.path().join("train.csv"))
            .arg("--backbone")
            .arg(backbone())
            .arg("--output")
            .arg(out)
            .args(["--hp", "optimization.max_epochs=1000", "--hp", "optimization.patience=1000"])
            .args(["--hp", "env.batch_size=4", "--hp", "env.seed=3"]);
        c
    };
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
