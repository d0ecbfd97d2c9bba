//! Head-only training gives bit-identical weights to the loop as it was before the one-loop redesign:
//! `reference_fit` below is that loop (`train::fit_head` at cb3de69) transcribed (init, shuffle, schedule,
//! loss, AdamW, best-epoch tie-break, early stopping); it matched that `fit_head` byte for byte on these
//! three configurations, and the one loop must produce the same bytes for a seed.

use automm::model::hparams::{HyperParams, LossKind, Reduction};
use automm::model::metrics::{self, Metric};
use automm::model::Head;
use automm::train::config::HyperParamsBuilder;
use automm::train::loss::{cross_entropy, focal_loss};
use automm::train::optim::{AdamW, AdamWConfig};
use automm::train::runner::{fit, FitContext, FitData};
use automm::train::schedule::Schedule;
use automm::train::source::CachedFeatures;
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// `n` rows of `d` features around a per-class mean, classes imbalanced (row i has class by `counts`).
fn features(counts: &[usize], d: usize, seed: u64) -> (Tensor, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let means: Vec<Vec<f32>> =
        (0..counts.len()).map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (c, &n) in counts.iter().enumerate() {
        for _ in 0..n {
            x.extend(means[c].iter().map(|m| m + rng.random_range(-1.5f32..1.5)));
            y.push(c as u32);
        }
    }
    (Tensor::from_vec(x, (y.len(), d), &Device::Cpu).unwrap(), y)
}

fn reference_fit(
    x: &Tensor,
    y: &[u32],
    xv: &Tensor,
    yv: &[u32],
    classes: &[String],
    hp: &HyperParams,
    alpha: Option<&[f64]>,
) -> Head {
    let device = x.device().clone();
    let (n, d) = x.dims2().unwrap();
    let k = classes.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(hp.seed);
    let bound = 1.0 / (d as f64).sqrt();
    let mut uniform = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect() };
    let w = Var::from_tensor(&Tensor::from_vec(uniform(k * d), (k, d), &device).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(uniform(k), k, &device).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![w.clone(), b.clone()], AdamWConfig::new(hp.learning_rate, hp.weight_decay)).unwrap();
    let alpha_t = alpha.map(|a| Tensor::from_vec(a.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, &device).unwrap());
    let yt = Tensor::from_vec(y.to_vec(), n, &device).unwrap();
    let bs = hp.batch_size.min(n).max(1);
    let total = n.div_ceil(bs) * hp.max_epochs;
    let mut order: Vec<usize> = (0..n).collect();
    let mut best: Option<(f64, f64, Head)> = None;
    let (mut since_best, mut step) = (0, 0);
    for _epoch in 1..=hp.max_epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(bs) {
            opt.set_learning_rate(Schedule::new(hp, total).lr_at(step));
            let idx =
                Tensor::from_vec(chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(), chunk.len(), &device).unwrap();
            let xb = x.index_select(&idx, 0).unwrap();
            let yb = yt.index_select(&idx, 0).unwrap();
            let logits = xb.matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
            let loss = match hp.loss_function {
                LossKind::FocalLoss => focal_loss(&logits, &yb, alpha_t.as_ref(), hp.focal_gamma, hp.focal_reduction),
                LossKind::CrossEntropy => cross_entropy(&logits, &yb, hp.label_smoothing, Reduction::Mean),
                other => panic!("the reference loop has no {other}"),
            }
            .unwrap();
            opt.backward_step(&loss).unwrap();
            step += 1;
        }
        let head = Head { weight: w.as_tensor().copy().unwrap(), bias: b.as_tensor().copy().unwrap() };
        let logits = head.logits(xv).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap();
        let preds = probs.argmax(1).unwrap().to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap();
        let flat = probs.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let report = metrics::compute(yv, &preds, Some(&flat), classes).unwrap();
        let score = report.get(hp.val_metric).unwrap();
        let val_loss = report.get(Metric::LogLoss).unwrap();
        if best.as_ref().is_none_or(|(s, l, _)| score > *s || (score == *s && val_loss < *l)) {
            best = Some((score, val_loss, head));
            since_best = 0;
        } else {
            since_best += 1;
            if since_best >= hp.patience.max(1) {
                break;
            }
        }
    }
    best.unwrap().2
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn head_only_weights_are_bit_identical_to_the_reference_loop() {
    let classes: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
    let (x, y) = features(&[30, 12, 7, 4], 16, 5);
    let (xv, yv) = features(&[8, 4, 3, 2], 16, 6);
    let configs: [&[&str]; 3] = [
        &[
            "optimization.loss_function=focal_loss",
            "optimization.focal_loss.gamma=1",
            "optimization.focal_loss.reduction=sum",
            "env.seed=4",
        ],
        &[
            "optimization.loss_function=cross_entropy",
            "optimization.label_smoothing=0.1",
            "optimization.patience=2",
            "optimization.max_epochs=30",
            "env.batch_size=7",
        ],
        &[
            "optimization.loss_function=cross_entropy",
            "optimization.val_metric=balanced_accuracy",
            "optimization.lr_schedule=linear_decay",
            "env.seed=9",
            "env.batch_size=64",
        ],
    ];
    for kvs in configs {
        let mut b = HyperParamsBuilder::new();
        for kv in kvs {
            b = b.set_str(kv).unwrap();
        }
        let hp = b.build().unwrap().0;
        let alpha = (hp.loss_function == LossKind::FocalLoss)
            .then(|| automm::train::loss::auto_alpha(&[30, 12, 7, 4]).unwrap());
        let want = reference_fit(&x, &y, &xv, &yv, &classes, &hp, alpha.as_deref());
        let source = CachedFeatures::new(x.clone(), Some(xv.clone())).unwrap();
        let data = FitData {
            targets: &y,
            eval_targets: &yv,
            classes: &classes,
            hp: &hp,
            alpha: alpha.as_deref(),
            log_prior: None,
        };
        let got = fit(&source, &data, FitContext { quiet: true, ..Default::default() }, &mut |_| {}).unwrap().head;
        assert_eq!(bytes(&got.weight), bytes(&want.weight), "{kvs:?}: head weight differs");
        assert_eq!(bytes(&got.bias), bytes(&want.bias), "{kvs:?}: head bias differs");
    }
}
