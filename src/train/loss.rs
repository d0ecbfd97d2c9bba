//! Losses as free functions over candle tensors (shape-checked, differentiable): AutoGluon's multiclass
//! focal loss, cross-entropy with label smoothing, and the logit-adjusted loss; and the choice of the
//! `auto` loss from the training data's class counts.
//!
//! Focal loss follows AutoGluon/AutoMM exactly: `loss_i = (1 - p_t)^gamma * (-alpha[t] * log p_t)` with
//! `p_t = softmax(logits)[t]`; `mean` is a plain mean over samples, `sum` sums, `none` keeps per-sample
//! values. It is evaluated through `log_softmax` so large logits neither overflow nor turn the gradient
//! into NaN.

use crate::error::{Error, Result};
pub use crate::model::hparams::Reduction;
use crate::model::hparams::{Alpha, LossKind, IMBALANCE_RATIO};
use candle_core::{DType, Tensor, D};

/// Checks `logits` is `[N, C]` and `target` is `[N]`; returns `(N, C)`.
fn check_shapes(logits: &Tensor, target: &Tensor) -> Result<(usize, usize)> {
    let (n, c) = logits.dims2().map_err(|_| Error::Shape {
        name: "logits".into(),
        msg: format!("expected rank 2 [N, C], found shape {:?}", logits.dims()),
    })?;
    if target.dims() != [n] {
        return Err(Error::Shape {
            name: "target".into(),
            msg: format!("expected shape [{n}] (one class index per logits row), found {:?}", target.dims()),
        });
    }
    if target.dtype().is_float() {
        return Err(Error::Shape {
            name: "target".into(),
            msg: format!("expected an integer dtype (u32 or i64), found {:?}", target.dtype()),
        });
    }
    Ok((n, c))
}

fn reduce(per_sample: Tensor, reduction: Reduction) -> Result<Tensor> {
    Ok(match reduction {
        Reduction::Mean => per_sample.mean_all()?,
        Reduction::Sum => per_sample.sum_all()?,
        Reduction::None => per_sample,
    })
}

/// AutoGluon's multiclass focal loss.
///
/// * `logits`: `[N, C]` float; `target`: `[N]` class indices (u32/i64).
/// * `alpha`: optional per-class weights `[C]` (None means 1 for every class).
/// * `gamma`: focusing parameter, `>= 0` (0 gives alpha-weighted cross-entropy).
pub fn focal_loss(
    logits: &Tensor,
    target: &Tensor,
    alpha: Option<&Tensor>,
    gamma: f64,
    reduction: Reduction,
) -> Result<Tensor> {
    let (_n, c) = check_shapes(logits, target)?;
    if !(gamma >= 0.0 && gamma.is_finite()) {
        return Err(Error::config("gamma", format!("must be a finite number >= 0, got {gamma}")));
    }
    let target = target.to_dtype(DType::U32)?;
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = target.unsqueeze(1)?;
    let log_pt = log_p.gather(&idx, 1)?.squeeze(1)?;
    let mut per_sample = log_pt.neg()?;
    if let Some(alpha) = alpha {
        if alpha.dims() != [c] {
            return Err(Error::Shape {
                name: "alpha".into(),
                msg: format!("expected [{c}] (one weight per class), found {:?}", alpha.dims()),
            });
        }
        let alpha_t = alpha.to_dtype(logits.dtype())?.index_select(&target, 0)?;
        per_sample = per_sample.mul(&alpha_t)?;
    }
    if gamma > 0.0 {
        // 1 - p_t as the sum of the other classes' probabilities: exact where p_t rounds to 1.
        let p = log_p.exp()?;
        let p_t = log_pt.exp()?;
        let one_minus_pt = (p.sum(D::Minus1)? - p_t)?;
        // Where 1 - p_t underflows to 0 the loss and its gradient are 0, but d(u^gamma)/du is infinite
        // for gamma < 1 (0 * inf = NaN). The floor cuts that path; the value it adds is below f32 noise.
        let one_minus_pt = one_minus_pt.maximum(1e-30)?;
        let modulating = if gamma == 1.0 { one_minus_pt } else { one_minus_pt.powf(gamma)? };
        per_sample = per_sample.mul(&modulating)?;
    }
    reduce(per_sample, reduction)
}

/// Cross-entropy with optional per-class weights and label smoothing, as PyTorch's
/// `cross_entropy(weight=None, label_smoothing=eps)`: `(1-eps) * nll + eps * mean_j(-log p_j)`.
pub fn cross_entropy(logits: &Tensor, target: &Tensor, label_smoothing: f64, reduction: Reduction) -> Result<Tensor> {
    check_shapes(logits, target)?;
    if !(0.0..1.0).contains(&label_smoothing) {
        return Err(Error::config("label_smoothing", format!("must be in [0, 1), got {label_smoothing}")));
    }
    let target = target.to_dtype(DType::U32)?;
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = log_p.gather(&target.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let per_sample = if label_smoothing > 0.0 {
        let smooth = log_p.mean(D::Minus1)?.neg()?;
        ((nll * (1.0 - label_smoothing))? + (smooth * label_smoothing)?)?
    } else {
        nll
    };
    reduce(per_sample, reduction)
}

/// The logit-adjusted loss (Menon et al., ICLR 2021; the same as Balanced Softmax): cross-entropy on
/// `logits + tau * log_prior`, where `log_prior` `[C]` holds the log class frequencies of the training
/// rows. The shift makes rare classes' logits pay more for the same margin; predictions use the raw
/// logits.
pub fn logit_adjusted(
    logits: &Tensor,
    target: &Tensor,
    log_prior: &Tensor,
    tau: f64,
    reduction: Reduction,
) -> Result<Tensor> {
    let (_n, c) = check_shapes(logits, target)?;
    if log_prior.dims() != [c] {
        return Err(Error::Shape {
            name: "log_prior".into(),
            msg: format!("expected [{c}] (one log frequency per class), found {:?}", log_prior.dims()),
        });
    }
    if !(tau >= 0.0 && tau.is_finite()) {
        return Err(Error::config("optimization.logit_adjustment.tau", format!("must be finite and >= 0, got {tau}")));
    }
    let shift = (log_prior.to_dtype(logits.dtype())? * tau)?;
    cross_entropy(&logits.broadcast_add(&shift)?, target, 0.0, reduction)
}

/// Fails naming `key` and `what` when a class has no training rows.
fn every_class(counts: &[usize], key: &str, what: &str) -> Result<()> {
    match counts.iter().position(|&n| n == 0) {
        Some(c) => Err(Error::config(
            key,
            format!("{what} needs every class in the training data; class index {c} has no rows"),
        )),
        None => Ok(()),
    }
}

/// log(n_c / N) of per-class training counts (every count positive).
pub fn log_prior(counts: &[usize]) -> Result<Vec<f64>> {
    every_class(counts, "optimization.loss_function", "logit_adjusted")?;
    let total: usize = counts.iter().sum();
    Ok(counts.iter().map(|&n| (n as f64 / total as f64).ln()).collect())
}

/// The loss a run trains with, and why: an explicit `optimization.loss_function` as given, and `auto`
/// by the training data's imbalance (largest / smallest class count against [`IMBALANCE_RATIO`]).
pub fn resolve_loss(kind: LossKind, counts: &[usize]) -> (LossKind, String) {
    if kind != LossKind::Auto {
        return (kind, "set by optimization.loss_function".into());
    }
    let (lo, hi) = (counts.iter().copied().min().unwrap_or(0), counts.iter().copied().max().unwrap_or(0));
    let ratio = hi as f64 / lo.max(1) as f64;
    if ratio >= IMBALANCE_RATIO {
        let why = format!(
            "imbalanced training data: largest / smallest class = {hi} / {lo} = {ratio:.1} >= {IMBALANCE_RATIO}"
        );
        (LossKind::LogitAdjusted, why)
    } else {
        let why =
            format!("balanced training data: largest / smallest class = {hi} / {lo} = {ratio:.1} < {IMBALANCE_RATIO}");
        (LossKind::CrossEntropy, why)
    }
}

/// AutoGluon's `alpha=auto` weights for focal loss: `w_c = N / n_c`, normalised to sum 1.
/// `counts[c]` is the number of training rows of class `c`; every count must be positive.
pub fn auto_alpha(counts: &[usize]) -> Result<Vec<f64>> {
    every_class(counts, "optimization.focal_loss.alpha", "alpha=auto")?;
    let total: usize = counts.iter().sum();
    let w: Vec<f64> = counts.iter().map(|&n| total as f64 / n as f64).collect();
    let s: f64 = w.iter().sum();
    Ok(w.into_iter().map(|x| x / s).collect())
}

/// The per-class weights `alpha` stands for on these classes and per-class training counts (None:
/// unweighted), checking a given list has one weight per class.
pub fn resolve_alpha(alpha: &Alpha, classes: &[String], counts: &[usize]) -> Result<Option<Vec<f64>>> {
    match alpha {
        Alpha::None => Ok(None),
        Alpha::Auto => auto_alpha(counts).map(Some),
        Alpha::List(v) if v.len() != classes.len() => Err(Error::config(
            "optimization.focal_loss.alpha",
            format!(
                "has {} weights but the training data has {} classes; give one weight per class in this order: {:?}",
                v.len(),
                classes.len(),
                classes
            ),
        )),
        Alpha::List(v) => Ok(Some(v.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn auto_alpha_is_normalised_inverse_frequency() {
        let a = auto_alpha(&[200, 66, 22, 7]).unwrap();
        assert!((a.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Inverse frequency: the rarest class gets the largest weight, ratio equals count ratio.
        assert!((a[3] / a[0] - 200.0 / 7.0).abs() < 1e-9);
        assert!(auto_alpha(&[3, 0]).is_err());
    }

    #[test]
    fn shape_errors_name_the_tensor() {
        let d = Device::Cpu;
        let logits = Tensor::zeros((3, 4), DType::F32, &d).unwrap();
        let t = Tensor::new(&[0u32, 1], &d).unwrap();
        let e = focal_loss(&logits, &t, None, 1.0, Reduction::Mean).unwrap_err().to_string();
        assert!(e.contains("target") && e.contains("[3]"), "{e}");
        let t = Tensor::new(&[0u32, 1, 2], &d).unwrap();
        let a = Tensor::new(&[1f32, 1.0], &d).unwrap();
        let e = focal_loss(&logits, &t, Some(&a), 1.0, Reduction::Mean).unwrap_err().to_string();
        assert!(e.contains("alpha") && e.contains("[4]"), "{e}");
    }

    /// Loss and gradient of the logit-adjusted loss against the closed form: with u = z + tau log(pi),
    /// loss = -log softmax(u)_y and d loss / d z = softmax(u) - onehot(y); the last class has one row.
    #[test]
    fn logit_adjusted_matches_the_closed_form() {
        let d = Device::Cpu;
        let counts = [200usize, 66, 22, 1];
        let lp = log_prior(&counts).unwrap();
        let total: f64 = counts.iter().sum::<usize>() as f64;
        assert!((lp[3] - (1.0 / total).ln()).abs() < 1e-12);
        let z = [[0.3f64, -1.2, 0.8, 2.0], [1.5, 0.1, -0.4, -2.2]];
        let y = [3u32, 0];
        let tau = 1.0;
        let zt = candle_core::Var::new(&[[0.3f32, -1.2, 0.8, 2.0], [1.5, 0.1, -0.4, -2.2]], &d).unwrap();
        let prior = Tensor::new(lp.iter().map(|&v| v as f32).collect::<Vec<_>>().as_slice(), &d).unwrap();
        let loss = logit_adjusted(zt.as_tensor(), &Tensor::new(&y, &d).unwrap(), &prior, tau, Reduction::Mean).unwrap();
        let grad = loss.backward().unwrap().get(&zt).unwrap().to_vec2::<f32>().unwrap();
        let mut want_loss = 0.0;
        for (i, row) in z.iter().enumerate() {
            let u: Vec<f64> = row.iter().zip(&lp).map(|(z, p)| z + tau * p).collect();
            let lse = u.iter().map(|v| v.exp()).sum::<f64>().ln();
            want_loss += (lse - u[y[i] as usize]) / 2.0;
            for (j, &uj) in u.iter().enumerate() {
                let want = ((uj - lse).exp() - if j == y[i] as usize { 1.0 } else { 0.0 }) / 2.0;
                assert!((grad[i][j] as f64 - want).abs() < 1e-6, "d/dz[{i}][{j}] = {} want {want}", grad[i][j]);
            }
        }
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want_loss).abs() < 1e-5, "{got} vs {want_loss}");
        // tau = 0 is plain cross-entropy.
        let t = Tensor::new(&y, &d).unwrap();
        let la0 = logit_adjusted(zt.as_tensor(), &t, &prior, 0.0, Reduction::Sum).unwrap().to_scalar::<f32>().unwrap();
        let ce = cross_entropy(zt.as_tensor(), &t, 0.0, Reduction::Sum).unwrap().to_scalar::<f32>().unwrap();
        assert!((la0 - ce).abs() < 1e-6);
        let e = logit_adjusted(zt.as_tensor(), &t, &prior.narrow(0, 0, 3).unwrap(), 1.0, Reduction::Mean).unwrap_err();
        assert!(e.to_string().contains("log_prior"), "{e}");
    }

    #[test]
    fn auto_loss_follows_the_imbalance_ratio() {
        let (k, why) = resolve_loss(LossKind::Auto, &[200, 66, 22, 7]);
        assert_eq!(k, LossKind::LogitAdjusted);
        assert!(why.contains("200 / 7") && why.contains("28.6"), "{why}");
        assert_eq!(resolve_loss(LossKind::Auto, &[33, 25, 11]).0, LossKind::LogitAdjusted);
        assert_eq!(resolve_loss(LossKind::Auto, &[32, 25, 11]).0, LossKind::CrossEntropy);
        assert_eq!(resolve_loss(LossKind::FocalLoss, &[200, 7]).0, LossKind::FocalLoss);
    }

    #[test]
    fn label_smoothing_matches_formula() {
        let d = Device::Cpu;
        let logits = Tensor::new(&[[1f32, 2.0, 3.0]], &d).unwrap();
        let t = Tensor::new(&[0u32], &d).unwrap();
        let l = cross_entropy(&logits, &t, 0.1, Reduction::Mean).unwrap().to_scalar::<f32>().unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let lp = [1.0 - lse, 2.0 - lse, 3.0 - lse];
        let want = 0.9 * -lp[0] + 0.1 * -(lp.iter().sum::<f64>() / 3.0);
        assert!((l as f64 - want).abs() < 1e-5, "{l} vs {want}");
    }
}
