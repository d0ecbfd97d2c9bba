//! Crash-safe training state, kept in `<model folder>/checkpoint/` while a run is in progress, for
//! head-only and fine-tuning runs alike: `run.json` (the request, so `automm train --resume DIR` needs
//! nothing else), `state.safetensors` (head, tuned backbone initializers, AdamW moments of both, the
//! best epoch's head and initializers, RNG position, shuffle order, history; rewritten after every epoch)
//! and `features.safetensors` (head-only runs: the backbone features, keyed by the backbone's sha256, the
//! preprocessing and every image file's path, size and mtime). Each file is written whole to a temp file,
//! synced and renamed, so a crash at any moment leaves the previous or the next complete file; stale temp
//! files are ignored and swept on resume. The folder is removed once the finished model has been written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{ImageRef, Preprocess};
use crate::error::{Error, Result};
use crate::model::{BackboneInfo, Head};
use crate::train::optim::AdamWState;
use crate::train::{EpochRecord, TrainRequest};
use crate::util::fs::write_atomic;

/// Name of the checkpoint folder inside a model folder.
pub const FOLDER: &str = "checkpoint";
/// Format version of the files; a different version is refused with a clear error.
pub const FORMAT: u32 = 1;
const META_PROGRESS: &str = "automm.progress";
const META_FORMAT: &str = "automm.format";
const META_KEY: &str = "automm.feature_key";
/// Tensor-name prefixes of the tuned backbone initializers (current and best-epoch values).
const BACKBONE: &str = "backbone.";
const BEST_BACKBONE: &str = "best_backbone.";

/// The best epoch so far (floats kept as bit patterns so that NaN/inf survive the JSON round trip).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Best {
    /// Validation metric, `f64::to_bits`.
    pub score_bits: u64,
    /// Validation log-loss (the tie-break), `f64::to_bits`.
    pub val_loss_bits: u64,
    /// 1-based epoch.
    pub epoch: usize,
}

/// Where the training loop stands after an epoch (the JSON half of the state).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Last finished epoch (1-based).
    pub epoch: usize,
    /// Optimizer steps taken (drives the learning-rate schedule).
    pub step: usize,
    /// The seeded ChaCha8 RNG's word position (u128 as a decimal string).
    pub rng_word_pos: String,
    /// The row order after the last shuffle (the next epoch shuffles it again).
    pub order: Vec<usize>,
    /// Per-epoch records so far.
    pub history: Vec<EpochRecord>,
    /// The best epoch so far.
    pub best: Option<Best>,
    /// Epochs since the best one (early stopping).
    pub since_best: usize,
    /// True when no further epoch should run (last epoch or early stop reached).
    pub done: bool,
}

/// Everything needed to continue training after an epoch.
#[derive(Debug, Clone)]
pub struct TrainState {
    /// Loop position and history.
    pub progress: Progress,
    /// The head as trained so far.
    pub head: Head,
    /// The trained backbone initializers' current values (empty: a frozen backbone).
    pub backbone: Vec<(String, Tensor)>,
    /// AdamW's step count and moments for (weight, bias, then the backbone initializers).
    pub optimizer: AdamWState,
    /// The head of the best epoch so far.
    pub best_head: Option<Head>,
    /// The backbone values of the best epoch so far.
    pub best_backbone: Vec<(String, Tensor)>,
}

#[derive(Serialize, Deserialize)]
struct RunFile {
    format: u32,
    request: TrainRequest,
}

/// The checkpoint folder of one model folder.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// `<output>/checkpoint`.
    pub root: PathBuf,
}

impl Checkpoint {
    /// The checkpoint folder of model folder `output`.
    pub fn in_output(output: &Path) -> Self {
        Checkpoint { root: output.join(FOLDER) }
    }
    /// `run.json`.
    pub fn run_file(&self) -> PathBuf {
        self.root.join("run.json")
    }
    /// `state.safetensors`.
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.safetensors")
    }
    /// `features.safetensors`.
    pub fn features_file(&self) -> PathBuf {
        self.root.join("features.safetensors")
    }

    /// Removes the whole folder (a fresh run, or a finished one).
    pub fn clear(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&self.root, e)),
            _ => Ok(()),
        }
    }

    /// Deletes temp files a crash left between write and rename (they never replace a real file).
    pub fn sweep_temp_files(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Saves the request that started the run.
    pub fn write_run(&self, req: &TrainRequest) -> Result<()> {
        let json = crate::util::fs::to_json(&RunFile { format: FORMAT, request: req.clone() }, "run.json")?;
        write_atomic(&self.run_file(), &json)
    }

    /// Reads the request of an interrupted run.
    pub fn read_run(&self) -> Result<TrainRequest> {
        let p = self.run_file();
        let text = std::fs::read_to_string(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Model {
                    path: self.root.clone(),
                    msg: "no run.json: nothing to resume here (the run finished and its checkpoint was removed, \
                          or it never started)"
                        .into(),
                }
            } else {
                Error::io(&p, e)
            }
        })?;
        let run: RunFile = serde_json::from_str(&text)
            .map_err(|e| Error::Model { path: p.clone(), msg: format!("not a valid automm run record: {e}") })?;
        check_format(&p, run.format)?;
        Ok(run.request)
    }

    /// Writes the state after an epoch (atomically; the previous state stays until the rename).
    pub fn write_state(&self, s: &TrainState) -> Result<()> {
        write_atomic(&self.state_file(), &encode_state(s)?)
    }

    /// Reads the last complete state, or None when no epoch has finished yet.
    pub fn read_state(&self, device: &Device) -> Result<Option<TrainState>> {
        let p = self.state_file();
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&p, e)),
        };
        decode_state(&p, &bytes, device).map(Some)
    }

    /// Saves the features of the training and validation rows under `key`.
    pub fn write_features(&self, key: &str, train: &Tensor, val: &Tensor) -> Result<()> {
        let meta = HashMap::from([(META_KEY.to_string(), key.to_string()), (META_FORMAT.into(), FORMAT.to_string())]);
        let bytes = serialize(vec![("train".into(), train.clone()), ("val".into(), val.clone())], meta)?;
        write_atomic(&self.features_file(), &bytes)
    }

    /// The cached features when they were computed under `key` (same backbone, preprocessing, files and
    /// split); None otherwise.
    pub fn read_features(&self, key: &str, device: &Device) -> Result<Option<(Tensor, Tensor)>> {
        let p = self.features_file();
        let Ok(bytes) = std::fs::read(&p) else { return Ok(None) };
        let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes) else { return Ok(None) };
        if meta.metadata().as_ref().and_then(|m| m.get(META_KEY)).map(String::as_str) != Some(key) {
            return Ok(None);
        }
        let mut map = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| Error::Model { path: p.clone(), msg: format!("unreadable feature cache: {e}") })?;
        match (map.remove("train"), map.remove("val")) {
            (Some(t), Some(v)) => Ok(Some((t, v))),
            _ => Ok(None),
        }
    }
}

fn check_format(path: &Path, found: u32) -> Result<()> {
    if found != FORMAT {
        return Err(Error::Model {
            path: path.to_path_buf(),
            msg: format!("checkpoint format {found}, this automm reads format {FORMAT}"),
        });
    }
    Ok(())
}

fn serialize(tensors: Vec<(String, Tensor)>, meta: HashMap<String, String>) -> Result<Vec<u8>> {
    let cpu = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    safetensors::serialize(cpu, Some(meta)).map_err(|e| Error::encode("a checkpoint", e))
}

fn encode_state(s: &TrainState) -> Result<Vec<u8>> {
    let progress = serde_json::to_string(&s.progress).map_err(|e| Error::encode("checkpoint progress", e))?;
    let meta = HashMap::from([(META_PROGRESS.to_string(), progress), (META_FORMAT.to_string(), FORMAT.to_string())]);
    let mut tensors =
        vec![("head.weight".to_string(), s.head.weight.clone()), ("head.bias".into(), s.head.bias.clone())];
    for (i, (m, v)) in s.optimizer.m.iter().zip(&s.optimizer.v).enumerate() {
        tensors.push((format!("adamw.m.{i}"), m.clone()));
        tensors.push((format!("adamw.v.{i}"), v.clone()));
    }
    tensors.push(("adamw.step".into(), Tensor::new(&[s.optimizer.step as u32], &Device::Cpu)?));
    if let Some(b) = &s.best_head {
        tensors.push(("best.weight".into(), b.weight.clone()));
        tensors.push(("best.bias".into(), b.bias.clone()));
    }
    for (prefix, values) in [(BACKBONE, &s.backbone), (BEST_BACKBONE, &s.best_backbone)] {
        tensors.extend(values.iter().map(|(n, t)| (format!("{prefix}{n}"), t.clone())));
    }
    serialize(tensors, meta)
}

fn decode_state(p: &Path, bytes: &[u8], device: &Device) -> Result<TrainState> {
    let bad = |msg: String| Error::Model { path: p.to_path_buf(), msg };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("not a readable checkpoint: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let format: u32 =
        meta.get(META_FORMAT).and_then(|f| f.parse().ok()).ok_or_else(|| bad("no format field".into()))?;
    check_format(p, format)?;
    let progress: Progress = serde_json::from_str(meta.get(META_PROGRESS).ok_or_else(|| bad("no progress".into()))?)
        .map_err(|e| bad(format!("bad progress record: {e}")))?;
    let mut map = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| bad(format!("not a readable checkpoint: {e}")))?;
    let take = |map: &mut HashMap<String, Tensor>, k: &str| {
        map.remove(k).ok_or_else(|| bad(format!("tensor `{k}` is missing")))
    };
    let head = Head { weight: take(&mut map, "head.weight")?, bias: take(&mut map, "head.bias")? };
    let (c, d) = head.weight.dims2()?;
    let mut optimizer = AdamWState { step: 0, m: vec![], v: vec![] };
    // Moments 0 and 1 belong to the head; any further ones to the backbone (checked against its
    // variables when the optimizer restores them).
    for i in 0.. {
        let (Some(m), Some(v)) = (map.remove(&format!("adamw.m.{i}")), map.remove(&format!("adamw.v.{i}"))) else {
            break;
        };
        let want: Option<&[usize]> = match i {
            0 => Some(&[c, d]),
            1 => Some(&[c]),
            _ => None,
        };
        if let Some(dims) = want.filter(|w| m.dims() != *w || v.dims() != *w) {
            return Err(bad(format!(
                "tensors `adamw.m.{i}`/`adamw.v.{i}` are {:?}/{:?}, expected {dims:?}",
                m.dims(),
                v.dims()
            )));
        }
        optimizer.m.push(m);
        optimizer.v.push(v);
    }
    if optimizer.m.len() < 2 {
        return Err(bad("the optimizer moments of the head are missing".into()));
    }
    optimizer.step =
        take(&mut map, "adamw.step")?.to_dtype(DType::U32)?.to_vec1::<u32>()?.first().copied().unwrap_or(0) as usize;
    let best_head = match (map.remove("best.weight"), map.remove("best.bias")) {
        (Some(weight), Some(bias)) => Some(Head { weight, bias }),
        _ => None,
    };
    let named = |prefix: &str| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            map.iter().filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone()))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (backbone, best_backbone) = (named(BACKBONE), named(BEST_BACKBONE));
    if head.bias.dims() != [c] || best_head.as_ref().is_some_and(|b| b.weight.dims() != [c, d]) {
        return Err(bad(format!("head tensors disagree with head.weight [{c}, {d}]")));
    }
    if progress.best.is_some() != best_head.is_some() || progress.history.len() != progress.epoch {
        return Err(bad("progress record and tensors disagree".into()));
    }
    Ok(TrainState { progress, head, backbone, optimizer, best_head, best_backbone })
}

/// The key of a feature cache: sha256 over the backbone (sha256, input, feature tensor), preprocessing and
/// every image's path, size and modification time, in row order for the training then validation rows.
pub fn feature_key(
    backbone: &BackboneInfo,
    preprocess: &Preprocess,
    train: &[ImageRef],
    val: &[ImageRef],
) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "automm-features-v{FORMAT}\n{}\n{}\n{}\n",
        backbone.sha256, backbone.input_name, backbone.feature_tensor
    ));
    h.update(serde_json::to_vec(preprocess).map_err(|e| Error::encode("preprocessing", e))?);
    for (part, files) in [("train", train), ("val", val)] {
        h.update(format!("\n{part} {}\n", files.len()));
        for ImageRef { path: f, .. } in files {
            let m = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
            let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            h.update(format!("{}\t{}\t{}\n", f.display(), m.len(), mtime.map(|d| d.as_nanos()).unwrap_or(0)));
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::fs::stage_atomic;

    fn state(epoch: usize, fill: f32) -> TrainState {
        let d = Device::Cpu;
        let t = |dims: &[usize]| Tensor::full(fill, dims, &d).unwrap();
        TrainState {
            progress: Progress {
                epoch,
                step: epoch * 3,
                rng_word_pos: "1234".into(),
                order: vec![2, 0, 1],
                history: (1..=epoch)
                    .map(|e| EpochRecord { epoch: e, train_loss: 0.5, val_score: f64::NAN, lr: 1e-3 })
                    .collect(),
                best: Some(Best { score_bits: f64::NAN.to_bits(), val_loss_bits: 1.5f64.to_bits(), epoch: 1 }),
                since_best: epoch - 1,
                done: false,
            },
            head: Head { weight: t(&[3, 4]), bias: t(&[3]) },
            backbone: vec![("conv.bias".into(), t(&[5]))],
            optimizer: AdamWState {
                step: epoch * 3,
                m: vec![t(&[3, 4]), t(&[3]), t(&[5])],
                v: vec![t(&[3, 4]), t(&[3]), t(&[5])],
            },
            best_head: Some(Head { weight: t(&[3, 4]), bias: t(&[3]) }),
            best_backbone: vec![("conv.bias".into(), t(&[5]))],
        }
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint::in_output(dir.path());
        assert!(ck.read_state(&Device::Cpu).unwrap().is_none());
        ck.write_state(&state(2, 0.25)).unwrap();
        let s = ck.read_state(&Device::Cpu).unwrap().unwrap();
        assert_eq!(s.progress.epoch, 2);
        assert_eq!(s.optimizer.step, 6);
        assert_eq!(s.progress.order, vec![2, 0, 1]);
        assert!(f64::from_bits(s.progress.best.unwrap().score_bits).is_nan());
        assert_eq!(s.head.weight.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0.25; 12]);
        assert_eq!(s.optimizer.m.len(), 3, "backbone moments round-trip");
        assert_eq!(s.backbone[0].0, "conv.bias");
        assert_eq!(s.best_backbone[0].1.to_vec1::<f32>().unwrap(), vec![0.25; 5]);
    }

    /// A crash after the temp file is written but before the rename leaves the previous checkpoint
    /// readable, and the leftover temp file is swept on resume.
    #[test]
    fn crash_between_temp_write_and_rename_keeps_the_previous_state() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint::in_output(dir.path());
        ck.write_state(&state(1, 1.0)).unwrap();
        let staged = stage_atomic(&ck.state_file(), &encode_state(&state(2, 2.0)).unwrap()).unwrap();
        let left = staged.abandon().unwrap();
        assert!(left.is_file());
        let s = ck.read_state(&Device::Cpu).unwrap().unwrap();
        assert_eq!(s.progress.epoch, 1);
        assert_eq!(s.head.bias.to_vec1::<f32>().unwrap(), vec![1.0; 3]);
        ck.sweep_temp_files();
        assert!(!left.exists());
        // A torn (truncated) state file, which atomic writes never produce, is refused with the file named.
        let bytes = std::fs::read(ck.state_file()).unwrap();
        std::fs::write(ck.state_file(), &bytes[..bytes.len() / 2]).unwrap();
        let e = ck.read_state(&Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("state.safetensors"), "{e}");
    }

    #[test]
    fn feature_cache_needs_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint::in_output(dir.path());
        let t = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        ck.write_features("abc", &t, &t).unwrap();
        assert!(ck.read_features("abc", &Device::Cpu).unwrap().is_some());
        assert!(ck.read_features("abd", &Device::Cpu).unwrap().is_none());
    }

    #[test]
    fn feature_key_changes_when_an_image_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.png");
        std::fs::write(&f, b"12345").unwrap();
        let info = BackboneInfo {
            path: "b.onnx".into(),
            sha256: "00".into(),
            input_name: "x".into(),
            feature_tensor: "f".into(),
            feature_dim: 3,
        };
        let pre = Preprocess::new(224, crate::data::Normalization::imagenet());
        let files = vec![ImageRef { path: f.clone(), row: Some(1) }];
        let k1 = feature_key(&info, &pre, &files, &[]).unwrap();
        assert_eq!(k1, feature_key(&info, &pre, &files, &[]).unwrap());
        std::fs::write(&f, b"123456").unwrap();
        assert_ne!(k1, feature_key(&info, &pre, &files, &[]).unwrap());
        let other = BackboneInfo { sha256: "01".into(), ..info.clone() };
        assert_ne!(feature_key(&other, &pre, &files, &[]).unwrap(), feature_key(&info, &pre, &files, &[]).unwrap());
    }
}
