//! The trained linear head (`logits = features @ weight^T + bias`): its PyTorch-style initialisation,
//! safetensors file, and [`Head::predict`], the one place probabilities and predicted classes are made.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::error::{Error, Result};
use crate::util::fs::persist;

/// Probabilities and predictions for a batch of rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// Row-major `[N, C]`.
    pub probs: Vec<f32>,
    /// Predicted class index per row.
    pub preds: Vec<u32>,
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
    /// PyTorch `nn.Linear`'s default initialisation, `U(-1/sqrt(D), 1/sqrt(D))` for weight then bias,
    /// drawn from `rng` (so a seed fixes it).
    pub fn init(classes: usize, feature_dim: usize, rng: &mut impl Rng, device: &Device) -> Result<Head> {
        let bound = 1.0 / (feature_dim as f64).sqrt();
        let mut uniform =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect() };
        let weight = Tensor::from_vec(uniform(classes * feature_dim), (classes, feature_dim), device)?;
        let bias = Tensor::from_vec(uniform(classes), classes, device)?;
        Ok(Head { weight, bias })
    }

    /// Logits for `[N, D]` features.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        Ok(features.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    /// Softmax probabilities and argmax classes for `[N, D]` features.
    pub fn predict(&self, features: &Tensor) -> Result<Predictions> {
        let probs = candle_nn::ops::softmax_last_dim(&self.logits(features)?)?;
        let preds = probs.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        Ok(Predictions { probs: probs.flatten_all()?.to_vec1::<f32>()?, preds })
    }

    /// This head with `shift[c]` added to class `c`'s logit (a prior correction folded into the bias).
    pub fn shifted(&self, shift: &[f64]) -> Result<Head> {
        let s: Vec<f32> = shift.iter().map(|&v| v as f32).collect();
        let s = Tensor::from_vec(s, shift.len(), self.bias.device())?;
        Ok(Head { weight: self.weight.clone(), bias: (&self.bias + s)? })
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
