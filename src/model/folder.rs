//! The model folder a training run leaves: `config.json` (hyperparameters, classes, preprocessing,
//! backbone path and sha256), `head.safetensors`, `backbone_update.safetensors`, `metrics.json` and
//! pictures. Every file is written atomically ([`crate::util::fs`]).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Preprocess;
use crate::error::{Error, Result};
use crate::model::hparams::HyperParams;
use crate::util::fs::write_atomic;

/// The version written into model folders and exports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    /// Training rows per class, in class order (the prior that `--prior-correction` removes; empty in
    /// folders written before automm recorded it).
    #[serde(default)]
    pub class_counts: Vec<usize>,
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
                    .map_err(|e| Error::encode(format!("tensor `{n}`"), e))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, None).map_err(|e| Error::encode("backbone_update.safetensors", e))?;
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

    /// [`read_config`](Self::read_config) with the backbone located: at `over` when given (the backbone
    /// moved since training), else where it was at training time. Either way its sha256 must be the
    /// recorded one, so a different model can never pass for it.
    pub fn read_config_with_backbone(&self, over: Option<&std::path::Path>) -> Result<ModelConfig> {
        let mut config = self.read_config()?;
        let path = over.map(std::path::Path::to_path_buf).unwrap_or_else(|| config.backbone.path.clone());
        let expected = &config.backbone.sha256;
        if !path.is_file() {
            let msg = match over {
                Some(_) => format!("--backbone {} is not a file", path.display()),
                None => format!(
                    "its backbone {} is missing; pass --backbone PATH where it is now (sha256 {expected}), or put it back",
                    path.display()
                ),
            };
            return Err(Error::Model { path: self.root.clone(), msg });
        }
        let sha = crate::util::fs::sha256_file(&path)?;
        if sha != *expected {
            let what =
                if over.is_some() { "is not the backbone this model was trained on" } else { "changed since training" };
            return Err(Error::Model {
                path: self.root.clone(),
                msg: format!("backbone {} {what} (sha256 {sha}, expected {expected})", path.display()),
            });
        }
        config.backbone.path = path;
        Ok(config)
    }

    /// Writes `config.json`.
    pub fn write_config(&self, c: &ModelConfig) -> Result<()> {
        write_atomic(&self.config(), &crate::util::fs::to_json(c, "config.json")?)
    }
}
