//! The model folder a training run leaves: `config.json` (hyperparameters, classes, preprocessing,
//! backbone path and sha256), `head.safetensors`, `metrics.json` and pictures. Every file is written
//! atomically (temp file in the same folder, then rename).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::HyperParams;
use crate::data::Preprocess;
use crate::error::{Error, Result};

/// The version written into model folders and exports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    stage_atomic(path, bytes)?.commit()
}

/// A complete, synced temp file waiting to be renamed over its target (the first half of
/// [`write_atomic`]). A crash before [`Staged::commit`] leaves the target untouched.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Staged {
    /// Renames the temp file over the target.
    pub fn commit(self) -> Result<()> {
        persist(self.tmp, &self.path)
    }
    /// The temp file's path (tests use it to simulate a crash that leaves it behind).
    pub fn temp_path(&self) -> &Path {
        self.tmp.path()
    }
    /// Leaves the temp file on disk without renaming it, as a crash would.
    pub fn abandon(self) -> Result<PathBuf> {
        let path = self.path;
        self.tmp.keep().map(|(_, p)| p).map_err(|e| Error::io(path, e.error))
    }
}

/// Writes and syncs `bytes` to a temp file next to `path`; [`Staged::commit`] puts it in place.
pub fn stage_atomic(path: &Path, bytes: &[u8]) -> Result<Staged> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp").tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    Ok(Staged { tmp, path: path.to_path_buf() })
}

/// Moves a finished temp file into place, readable like any other output (temp files are created 0600).
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Where the backbone came from and how to read features out of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneInfo {
    /// Absolute path of the ONNX file used for training.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    /// The graph input fed with images.
    pub input_name: String,
    /// The tensor read as features.
    pub feature_tensor: String,
    /// Width of the feature vector.
    pub feature_dim: usize,
}

/// `config.json` of a model folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// automm version that wrote it.
    pub automm_version: String,
    /// Class names in class-index order.
    pub classes: Vec<String>,
    /// Resolved hyperparameters.
    pub hyperparameters: HyperParams,
    /// The resolved per-class focal-loss weights actually used (None when unweighted).
    pub alpha: Option<Vec<f64>>,
    /// Image preprocessing.
    pub preprocess: Preprocess,
    /// The backbone.
    pub backbone: BackboneInfo,
    /// The label column of the training table.
    pub label_column: String,
    /// The image column of the training table.
    pub image_column: String,
    /// The training table (absolute path), used by `automm export --verify`.
    #[serde(default)]
    pub train_data: PathBuf,
    /// Backbone initializers changed by fine-tuning (their values are in `backbone_update.safetensors`);
    /// empty when the backbone stayed frozen.
    #[serde(default)]
    pub finetuned: Vec<String>,
}

/// A trained linear head: `logits = features @ weight^T + bias`.
#[derive(Debug, Clone)]
pub struct Head {
    /// `[C, D]`.
    pub weight: Tensor,
    /// `[C]`.
    pub bias: Tensor,
}

impl Head {
    /// Logits for `[N, D]` features.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// Saves as safetensors (`head.weight`, `head.bias`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        map.insert("head.weight".to_string(), self.weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        map.insert("head.bias".to_string(), self.bias.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
        candle_core::safetensors::save(&map, tmp.path())?;
        persist(tmp, path)
    }

    /// Loads from safetensors, checking the shapes against `classes` and `feature_dim`.
    pub fn load(path: &Path, classes: usize, feature_dim: usize, device: &Device) -> Result<Head> {
        let bad = |msg: String| Error::Model { path: path.to_path_buf(), msg };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let map = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?;
        let get = |k: &str| map.get(k).cloned().ok_or_else(|| bad(format!("tensor `{k}` is missing")));
        let (weight, bias) = (get("head.weight")?.to_dtype(DType::F32)?, get("head.bias")?.to_dtype(DType::F32)?);
        if weight.dims() != [classes, feature_dim] || bias.dims() != [classes] {
            return Err(bad(format!(
                "head.weight {:?} / head.bias {:?} do not match {classes} classes and {feature_dim} features",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(Head { weight, bias })
    }
}

/// Paths inside a model folder.
pub struct ModelDir {
    /// The folder.
    pub root: PathBuf,
}

impl ModelDir {
    /// Wraps a folder path.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ModelDir { root: root.into() }
    }
    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }
    /// `head.safetensors`.
    pub fn head(&self) -> PathBuf {
        self.root.join("head.safetensors")
    }
    /// `backbone_update.safetensors`: fine-tuned backbone initializers.
    pub fn backbone_update(&self) -> PathBuf {
        self.root.join("backbone_update.safetensors")
    }

    /// The fine-tuned backbone initializers `config.finetuned` names (empty for a frozen backbone).
    pub fn read_backbone_update(&self, config: &ModelConfig, device: &Device) -> Result<Vec<(String, Tensor)>> {
        if config.finetuned.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.backbone_update();
        let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Model { path: p.clone(), msg: format!("not a readable safetensors file: {e}") })?;
        config
            .finetuned
            .iter()
            .map(|name| {
                let v = st.tensor(name).map_err(|_| Error::Model {
                    path: p.clone(),
                    msg: format!("tensor `{name}` (listed in config.json `finetuned`) is missing"),
                })?;
                if v.dtype() != safetensors::Dtype::F32 || v.data().len() != 4 * v.shape().iter().product::<usize>() {
                    return Err(Error::Model { path: p.clone(), msg: format!("tensor `{name}` is not float32") });
                }
                let data: Vec<f32> =
                    v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Ok((name.clone(), Tensor::from_vec(data, v.shape(), device)?))
            })
            .collect()
    }

    /// Writes fine-tuned backbone initializers (atomically).
    pub fn write_backbone_update(&self, update: &[(String, Tensor)]) -> Result<()> {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = update
            .iter()
            .map(|(n, t)| {
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                Ok((n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), t.dims().to_vec()))
            })
            .collect::<Result<_>>()?;
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, b, d)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, d.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Train(format!("cannot serialise `{n}`: {e}")))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, None).map_err(|e| Error::Train(e.to_string()))?;
        write_atomic(&self.backbone_update(), &bytes)
    }

    /// `metrics.json`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.json")
    }

    /// Reads `config.json`, with an error that says what this folder is missing.
    pub fn read_config(&self) -> Result<ModelConfig> {
        let p = self.config();
        if !self.root.is_dir() {
            return Err(Error::Model {
                path: self.root.clone(),
                msg: "not a folder; expected a model folder written by `automm train`".into(),
            });
        }
        let text = std::fs::read_to_string(&p).map_err(|_| Error::Model {
            path: self.root.clone(),
            msg: "has no config.json; expected a model folder written by `automm train`".into(),
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Model { path: p, msg: format!("config.json is not a valid automm model config: {e}") })
    }

    /// Writes `config.json`.
    pub fn write_config(&self, c: &ModelConfig) -> Result<()> {
        let s = serde_json::to_string_pretty(c).map_err(|e| Error::Train(e.to_string()))?;
        write_atomic(&self.config(), s.as_bytes())
    }
}
