//! Where the training loop's features come from ([`FeatureSource`]): features computed once and cached
//! ([`CachedFeatures`], head-only training), or a backbone being fine-tuned ([`TunedSource`]: its frozen
//! prefix cached per image when there is no augmentation, the trainable rest run forward and backward
//! every step, with gradients to its initializers).

use candle_core::{Device, Tensor, Var};

use crate::data::{augment, ImageRef, Preprocess};
use crate::error::{Error, Result};
use crate::model::hparams::Transform;
use crate::train::finetune::TunedBackbone;
use crate::util::progress::progress;

/// Batch size of the frozen prefix and of validation passes through a tuned backbone.
const EVAL_BATCH: usize = 8;
/// Images per forward/backward pass through a tuned backbone; a batch's gradients are summed over them.
const MICRO_BATCH: usize = 8;

/// Features for the training loop: of training rows (tracked when a backbone trains) and of the
/// evaluation rows (untracked).
pub trait FeatureSource {
    /// Width of a feature vector.
    fn feature_dim(&self) -> usize;
    /// The device features are on.
    fn device(&self) -> Device;
    /// Training rows.
    fn len(&self) -> usize;
    /// True when there are no training rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Backbone initializers that train with the head, by name (empty: a frozen backbone).
    fn trainable(&self) -> &[(String, Var)];
    /// Rows per forward/backward pass (a batch larger than this runs as micro-batches).
    fn micro_batch(&self) -> usize;
    /// Features `[len, D]` of training rows `rows` in 1-based `epoch`, tracking gradients to
    /// [`trainable`](Self::trainable).
    fn train_features(&self, rows: &[usize], epoch: usize) -> Result<Tensor>;
    /// Features `[N, D]` of every evaluation row under the current values.
    fn eval_features(&self) -> Result<Tensor>;
    /// The trainable initializers' current values.
    fn snapshot(&self) -> Result<Vec<(String, Tensor)>> {
        self.trainable().iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?))).collect()
    }
    /// Sets the trainable initializers to saved values (every one must be given, by name and shape).
    fn restore(&self, values: &[(String, Tensor)]) -> Result<()> {
        if values.len() != self.trainable().len() {
            return Err(Error::Train(format!(
                "the saved state has {} backbone initializers, this run trains {}",
                values.len(),
                self.trainable().len()
            )));
        }
        for (name, var) in self.trainable() {
            let t = values.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| {
                Error::Train(format!("the saved state has no value for backbone initializer `{name}`"))
            })?;
            if t.dims() != var.dims() {
                return Err(Error::Shape {
                    name: name.clone(),
                    msg: format!("saved value is {:?}, the backbone has {:?}", t.dims(), var.dims()),
                });
            }
            var.set(t)?;
        }
        Ok(())
    }
}

/// Features computed once (head-only training): `[N, D]` for training, `[M, D]` for evaluation.
pub struct CachedFeatures {
    train: Tensor,
    eval: Tensor,
}

impl CachedFeatures {
    /// Training and evaluation features (the evaluation rows are the training rows when `eval` is None).
    pub fn new(train: Tensor, eval: Option<Tensor>) -> Result<CachedFeatures> {
        train.dims2()?;
        let eval = eval.unwrap_or_else(|| train.clone());
        Ok(CachedFeatures { train, eval })
    }
}

impl FeatureSource for CachedFeatures {
    fn feature_dim(&self) -> usize {
        self.train.dims()[1]
    }
    fn device(&self) -> Device {
        self.train.device().clone()
    }
    fn len(&self) -> usize {
        self.train.dims()[0]
    }
    fn trainable(&self) -> &[(String, Var)] {
        &[]
    }
    fn micro_batch(&self) -> usize {
        usize::MAX
    }
    fn train_features(&self, rows: &[usize], _epoch: usize) -> Result<Tensor> {
        Ok(self.train.index_select(&row_index(rows, self.train.device())?, 0)?)
    }
    fn eval_features(&self) -> Result<Tensor> {
        Ok(self.eval.clone())
    }
}

fn row_index(rows: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(rows.iter().map(|&i| i as u32).collect::<Vec<_>>(), rows.len(), device)?)
}

/// A backbone being fine-tuned, over training and evaluation images.
pub struct TunedSource<'a> {
    tb: &'a TunedBackbone,
    pre: &'a Preprocess,
    train: &'a [ImageRef],
    transforms: Vec<Transform>,
    seed: u64,
    /// Frontier values of every training image (None: augmenting, decoded again every epoch).
    train_front: Option<Vec<Tensor>>,
    eval_front: Vec<Tensor>,
    dim: usize,
}

impl<'a> TunedSource<'a> {
    /// Caches the frozen prefix's outputs (training images only without augmentation) and probes the
    /// feature width. `eval` empty means evaluating on the training images.
    pub fn new(
        tb: &'a TunedBackbone,
        pre: &'a Preprocess,
        train: &'a [ImageRef],
        eval: &'a [ImageRef],
        transforms: &[Transform],
        seed: u64,
        quiet: bool,
    ) -> Result<TunedSource<'a>> {
        let train_front =
            if transforms.is_empty() { Some(cache_front(tb, pre, train, "prefix", quiet)?) } else { None };
        let eval_front = cache_front(tb, pre, if eval.is_empty() { train } else { eval }, "val prefix", quiet)?;
        let first: Vec<Tensor> = eval_front.iter().map(|t| t.narrow(0, 0, 1)).collect::<candle_core::Result<_>>()?;
        let dim = tb.features(&first, false)?.dims()[1];
        Ok(TunedSource { tb, pre, train, transforms: transforms.to_vec(), seed, train_front, eval_front, dim })
    }
}

impl FeatureSource for TunedSource<'_> {
    fn feature_dim(&self) -> usize {
        self.dim
    }
    fn device(&self) -> Device {
        self.tb.device().clone()
    }
    fn len(&self) -> usize {
        self.train.len()
    }
    fn trainable(&self) -> &[(String, Var)] {
        &self.tb.vars
    }
    fn micro_batch(&self) -> usize {
        MICRO_BATCH
    }
    fn train_features(&self, rows: &[usize], epoch: usize) -> Result<Tensor> {
        let device = self.tb.device();
        let front = match &self.train_front {
            Some(cached) => {
                let idx = row_index(rows, device)?;
                cached.iter().map(|t| t.index_select(&idx, 0)).collect::<candle_core::Result<Vec<_>>>()?
            }
            None => {
                let refs: Vec<ImageRef> = rows.iter().map(|&i| self.train[i].clone()).collect();
                let seeds: Vec<u64> = rows.iter().map(|&i| augment::sample_seed(self.seed, epoch, i)).collect();
                let x = augment::files_to_batch(self.pre, &refs, &self.transforms, &seeds)?;
                let s = self.pre.size as usize;
                self.tb.front(&Tensor::from_vec(x, (rows.len(), 3, s, s), device)?)?
            }
        };
        self.tb.features(&front, true)
    }
    fn eval_features(&self) -> Result<Tensor> {
        let n = self.eval_front.first().map(|t| t.dims()[0]).unwrap_or(0);
        let mut parts = Vec::new();
        for start in (0..n).step_by(EVAL_BATCH) {
            let len = EVAL_BATCH.min(n - start);
            let f: Vec<Tensor> =
                self.eval_front.iter().map(|t| t.narrow(0, start, len)).collect::<candle_core::Result<_>>()?;
            parts.push(self.tb.features(&f, false)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Frontier values of many images, `[N, ...]` per frontier tensor, in batches with a progress bar.
fn cache_front(
    tb: &TunedBackbone,
    pre: &Preprocess,
    files: &[ImageRef],
    label: &str,
    quiet: bool,
) -> Result<Vec<Tensor>> {
    let s = pre.size as usize;
    let pb = progress(files.len() as u64, label, quiet);
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    for chunk in files.chunks(EVAL_BATCH) {
        let x = Tensor::from_vec(pre.files_to_batch(chunk)?, (chunk.len(), 3, s, s), tb.device())?;
        parts.push(tb.front(&x)?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    (0..tb.frontier_len())
        .map(|i| {
            let ts: Vec<Tensor> = parts.iter().map(|p| p[i].clone()).collect();
            Ok(Tensor::cat(&ts, 0)?)
        })
        .collect()
}
