//! Focal loss against AutoGluon's formula computed by PyTorch in float64 (tests/fixtures/focal_loss_golden.json:
//! every case of ../shared/golden/focal_loss.json with batch <= 16 plus every large-logit case).

use automm::train::loss::{focal_loss, Reduction};
use candle_core::{Device, Tensor, Var};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    logits: Vec<Vec<f64>>,
    target: Vec<u32>,
    alpha: Option<Vec<f64>>,
    gamma: f64,
    reduction: String,
    loss: serde_json::Value,
    grad_logits: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

/// Largest |a-b| relative to the largest |b| of the case (values that underflow in f32 compare to 0).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn focal_loss_matches_pytorch_golden_values() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/focal_loss_golden.json")).unwrap();
    let g: Golden = serde_json::from_str(&text).unwrap();
    assert!(g.cases.len() >= 100);
    let dev = Device::Cpu;
    let (mut worst_loss, mut worst_grad) = (0f64, 0f64);
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in g.cases.iter().enumerate() {
        let n = c.logits.len();
        let k = c.logits[0].len();
        let flat: Vec<f32> = c.logits.iter().flatten().map(|&v| v as f32).collect();
        let x = Var::from_tensor(&Tensor::from_vec(flat, (n, k), &dev).unwrap()).unwrap();
        let t = Tensor::from_vec(c.target.clone(), n, &dev).unwrap();
        let alpha = c
            .alpha
            .as_ref()
            .map(|a| Tensor::from_vec(a.iter().map(|&v| v as f32).collect::<Vec<_>>(), k, &dev).unwrap());
        let red: Reduction = c.reduction.parse().unwrap();
        seen.insert((c.reduction.clone(), c.alpha.is_some(), c.gamma.to_bits()));
        let loss = focal_loss(x.as_tensor(), &t, alpha.as_ref(), c.gamma, red).unwrap();
        let (got, want): (Vec<f64>, Vec<f64>) = match red {
            Reduction::None => (
                loss.to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect(),
                c.loss.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect(),
            ),
            _ => (vec![loss.to_scalar::<f32>().unwrap() as f64], vec![c.loss.as_f64().unwrap()]),
        };
        let e = rel_err(&got, &want);
        assert!(
            e <= 1e-4,
            "case {i} ({} gamma {} alpha {:?}): loss {got:?} vs {want:?}",
            c.reduction,
            c.gamma,
            c.alpha.is_some()
        );
        worst_loss = worst_loss.max(e);
        let total = if red == Reduction::None { loss.sum_all().unwrap() } else { loss };
        let grads = total.backward().unwrap();
        let gx: Vec<f64> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert!(gx.iter().all(|v| v.is_finite()), "case {i}: non-finite gradient");
        let want_g: Vec<f64> = c.grad_logits.iter().flatten().copied().collect();
        let e = rel_err(&gx, &want_g);
        assert!(e <= 1e-4, "case {i} ({} gamma {}): gradient rel err {e}", c.reduction, c.gamma);
        worst_grad = worst_grad.max(e);
    }
    // All reductions, with and without alpha, and every gamma were exercised.
    assert!(seen.len() >= 3 * 2 * 5, "{seen:?}");
    eprintln!("worst relative error: loss {worst_loss:.2e}, gradient {worst_grad:.2e}");
}

#[test]
fn auto_alpha_trains_the_tutorial_weights() {
    let a = automm::train::loss::auto_alpha(&[200, 66, 22, 7]).unwrap();
    let w: Vec<f64> = [200.0, 66.0, 22.0, 7.0].iter().map(|n| 295.0 / n).collect();
    let s: f64 = w.iter().sum();
    for (x, y) in a.iter().zip(&w) {
        assert!((x - y / s).abs() < 1e-12);
    }
}
