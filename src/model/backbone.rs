//! A frozen image backbone imported from ONNX: finds the feature tensor and the input size, turns image
//! files into `[N, D]` feature matrices in batches (decoding in parallel), with a progress bar.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::data::{ImageRef, Normalization, Preprocess};
use crate::error::{Error, Result};
use crate::model::BackboneInfo;
use crate::onnx::{detect_feature_tensor, read_model, Graph};
use crate::util::fs::sha256_file;
use crate::util::progress::progress;

/// Input side used when the ONNX input's spatial dims are symbolic.
pub const DEFAULT_INPUT_SIZE: u32 = 224;

/// An imported backbone that computes features.
pub struct Backbone {
    graph: Graph,
    /// Provenance and names.
    pub info: BackboneInfo,
    /// Preprocessing for its input.
    pub preprocess: Preprocess,
}

impl Backbone {
    /// Loads `path`; `feature_tensor` overrides auto-detection.
    pub fn load(
        path: &Path,
        device: &Device,
        feature_tensor: Option<&str>,
        normalization: Normalization,
    ) -> Result<Backbone> {
        let model = read_model(path)?;
        let feature = match feature_tensor {
            Some(f) => f.to_string(),
            None => detect_feature_tensor(&model)?,
        };
        let graph = Graph::from_model(&model, &path.display().to_string(), device, Some(vec![feature.clone()]))?;
        let spec = match graph.inputs() {
            [one] => one.clone(),
            many => {
                return Err(Error::onnx(
                    path.display().to_string(),
                    format!(
                        "expected one image input, found {} ({:?})",
                        many.len(),
                        many.iter().map(|i| &i.name).collect::<Vec<_>>()
                    ),
                ))
            }
        };
        if spec.dims.len() != 4 || spec.dims[1].is_some_and(|c| c != 3) {
            return Err(Error::Shape {
                name: spec.name.clone(),
                msg: format!("expected an image input [N, 3, H, W], found {:?}", spec.dims),
            });
        }
        let size = spec.dims[2].or(spec.dims[3]).map(|s| s as u32).unwrap_or(DEFAULT_INPUT_SIZE);
        let preprocess = Preprocess::new(size, normalization);
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        let mut b = Backbone {
            graph,
            info: BackboneInfo {
                path: abs,
                sha256: sha256_file(path)?,
                input_name: spec.name,
                feature_tensor: feature,
                feature_dim: 0,
            },
            preprocess,
        };
        // One dummy image tells the feature width (and checks the graph runs end to end).
        let probe = Tensor::zeros((1, 3, size as usize, size as usize), candle_core::DType::F32, device)?;
        b.info.feature_dim = b.features(&probe)?.dims()[1];
        Ok(b)
    }

    /// The imported graph (up to the feature tensor).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Replaces initializers by fine-tuned values (see [`crate::train::finetune`]).
    pub fn apply_update(&mut self, update: &[(String, Tensor)]) -> Result<()> {
        for (name, t) in update {
            self.graph.set_initializer(name, t)?;
        }
        Ok(())
    }

    /// Features `[N, D]` for a preprocessed batch `[N, 3, S, S]` (trailing 1-dims are flattened).
    pub fn features(&self, batch: &Tensor) -> Result<Tensor> {
        let out = self.graph.run(&[(self.info.input_name.as_str(), batch.clone())])?;
        let f = out.into_iter().next().ok_or_else(|| Error::onnx(&self.info.feature_tensor, "no output"))?;
        let n = f.dims().first().copied().unwrap_or(0);
        Ok(f.reshape((n, ()))?)
    }

    /// Features for image files, `batch` at a time, with a progress bar (hidden when `quiet`).
    /// Returns `[N, D]` on the backbone's device.
    pub fn features_of_files(&self, files: &[ImageRef], batch: usize, label: &str, quiet: bool) -> Result<Tensor> {
        let pb = progress(files.len() as u64, label, quiet);
        let s = self.preprocess.size as usize;
        let mut parts = Vec::new();
        let t0 = Instant::now();
        for chunk in files.chunks(batch.max(1)) {
            let data = self.preprocess.files_to_batch(chunk)?;
            let x = Tensor::from_vec(data, (chunk.len(), 3, s, s), self.graph.device())?;
            parts.push(self.features(&x)?);
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        tracing::debug!("{label}: {} images in {:.1}s", files.len(), t0.elapsed().as_secs_f64());
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, self.info.feature_dim), candle_core::DType::F32, self.graph.device())?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}
