//! Running an exported `.onnx` (written by `automm export`) on images: class labels and preprocessing come
//! from its metadata; ONNX Runtime by default, our candle importer when asked or when ORT is missing.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::ort::{Feed, OrtSession};
use super::EngineKind;
use crate::data::ImageRef;
use crate::deploy::meta::{ExportKind, ExportMeta, LOGITS, PROBABILITIES};
use crate::error::{Error, Result};
use crate::model::Predictions;
use crate::onnx::{read_model, Graph};
use crate::util::progress::progress;

enum Runner {
    Ort(OrtSession),
    Candle(Graph),
}

/// An exported model ready to predict.
pub struct ExportedModel {
    /// Its metadata.
    pub meta: ExportMeta,
    /// The engine in use.
    pub engine: EngineKind,
    runner: Runner,
    path: PathBuf,
}

impl ExportedModel {
    /// Opens `path` on `engine` (None: ORT when its library is found, else candle, logged once).
    pub fn open(path: &Path, engine: Option<EngineKind>, threads: usize) -> Result<ExportedModel> {
        Self::open_with(path, engine, threads, false, true)
    }

    /// Like [`ExportedModel::open`]; `cuda` asks ORT for its CUDA execution provider (CPU fallback, logged);
    /// `spin` as in [`OrtSession::open_with`].
    pub fn open_with(
        path: &Path,
        engine: Option<EngineKind>,
        threads: usize,
        cuda: bool,
        spin: bool,
    ) -> Result<ExportedModel> {
        let proto = read_model(path)?;
        let what = path.display().to_string();
        let meta = ExportMeta::read(&proto, &what)?;
        if meta.kind == ExportKind::HeadOnly {
            return Err(Error::onnx(
                what,
                "this is a head-only export (input: features); predict on images needs a merged export",
            ));
        }
        let engine = match engine {
            Some(e) => e,
            None => match super::ort::locate() {
                Ok(_) => EngineKind::Ort,
                Err(e) => {
                    tracing::warn!("using the candle engine: {e}");
                    EngineKind::Candle
                }
            },
        };
        let runner = match engine {
            EngineKind::Ort => Runner::Ort(OrtSession::open_with(path, threads, cuda, spin)?),
            EngineKind::Candle => {
                let outputs = Some(vec![LOGITS.to_string(), PROBABILITIES.to_string()]);
                Runner::Candle(Graph::from_model(&proto, &what, &Device::Cpu, outputs)?)
            }
        };
        Ok(ExportedModel { meta, engine, runner, path: path.to_path_buf() })
    }

    /// Probabilities `[N, C]` (row-major) for image files, `batch` at a time.
    pub fn predict_files(&self, files: &[ImageRef], batch: usize, quiet: bool) -> Result<Predictions> {
        let pp = &self.meta.preprocess;
        let s = pp.size as usize;
        let k = self.meta.classes.len();
        let pb = progress(files.len() as u64, "predict", quiet);
        let mut probs = Vec::with_capacity(files.len() * k);
        for chunk in files.chunks(batch.max(1)) {
            let n = chunk.len();
            let feed = if self.meta.kind == ExportKind::WithPreprocessing {
                let parts: Result<Vec<Vec<u8>>> =
                    chunk.iter().map(|f| Ok(pp.resize_crop(&f.decode()?).into_raw())).collect();
                Feed::U8(vec![n, s, s, 3], parts?.concat())
            } else {
                Feed::F32(vec![n, 3, s, s], pp.files_to_batch(chunk)?)
            };
            probs.extend(self.run(feed)?);
            pb.inc(n as u64);
        }
        pb.finish_and_clear();
        let preds = probs
            .chunks(k.max(1))
            .map(|row| {
                row.iter().enumerate().fold((0usize, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
            })
            .collect();
        Ok(Predictions { probs, preds })
    }

    /// Runs one batch and returns the probabilities, row-major.
    pub fn run(&self, feed: Feed) -> Result<Vec<f32>> {
        Ok(self.run_scores(feed)?.probabilities)
    }

    /// Runs one batch and returns both outputs, `[N, C]` row-major each.
    pub fn run_scores(&self, feed: Feed) -> Result<Scores> {
        let input = self.meta.input.as_str();
        match &self.runner {
            Runner::Ort(s) => {
                let mut outs = s.run(vec![(input, feed)])?;
                let mut take = |name: &str| {
                    let i =
                        s.outputs.iter().position(|o| o == name).ok_or_else(|| {
                            Error::onnx(self.path.display().to_string(), format!("no `{name}` output"))
                        })?;
                    let out =
                        outs.get_mut(i).ok_or_else(|| Error::Runtime(format!("ONNX Runtime returned no `{name}`")))?;
                    Ok::<_, Error>(std::mem::take(&mut out.1))
                };
                Ok(Scores { logits: take(LOGITS)?, probabilities: take(PROBABILITIES)? })
            }
            Runner::Candle(g) => {
                let t = match feed {
                    Feed::F32(shape, d) => Tensor::from_vec(d, shape, &Device::Cpu)?,
                    Feed::U8(shape, d) => Tensor::from_vec(d, shape, &Device::Cpu)?,
                    Feed::I64(shape, d) => Tensor::from_vec(d, shape, &Device::Cpu)?,
                };
                let mut ys = g.run(&[(input, t)])?.into_iter();
                let mut next = || -> Result<Vec<f32>> {
                    let y = ys.next().ok_or_else(|| Error::onnx(self.path.display().to_string(), "missing output"))?;
                    Ok(y.flatten_all()?.to_vec1::<f32>()?)
                };
                Ok(Scores { logits: next()?, probabilities: next()? })
            }
        }
    }
}

/// One batch's outputs: `logits` and `probabilities`, `[N, C]` row-major each.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    /// Raw class scores.
    pub logits: Vec<f32>,
    /// Softmax of the logits.
    pub probabilities: Vec<f32>,
}
