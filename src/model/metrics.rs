//! Classification metrics under AutoGluon's names ([`Metric`]: accuracy, balanced_accuracy, f1_macro, ...),
//! the confusion matrix and a text summary table, for any model's predictions (training and deployment).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::hparams::ValMetric;

crate::named_enum! {
    /// A classification metric, under AutoGluon's name.
    pub enum Metric("metric") {
        /// Fraction correct.
        Accuracy = "accuracy" | "acc",
        /// Mean recall over the classes present in the truth.
        BalancedAccuracy = "balanced_accuracy",
        /// Unweighted mean of per-class F1.
        F1Macro = "f1_macro",
        /// Micro-averaged F1 (= accuracy for single-label data).
        F1Micro = "f1_micro",
        /// Support-weighted mean of per-class F1.
        F1Weighted = "f1_weighted",
        /// Unweighted mean of per-class precision.
        PrecisionMacro = "precision_macro",
        /// Unweighted mean of per-class recall.
        RecallMacro = "recall_macro",
        /// Mean negative log-probability of the true class (needs probabilities).
        LogLoss = "log_loss",
        /// Multiclass Matthews correlation.
        Mcc = "mcc",
    }
}

impl From<ValMetric> for Metric {
    fn from(m: ValMetric) -> Metric {
        match m {
            ValMetric::Accuracy => Metric::Accuracy,
            ValMetric::BalancedAccuracy => Metric::BalancedAccuracy,
            ValMetric::F1Macro => Metric::F1Macro,
        }
    }
}

/// Metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Metric -> value (log_loss only when probabilities were given).
    pub scores: BTreeMap<Metric, f64>,
    /// Recall per class, in class order (NaN-free: 0 for a class absent from the truth).
    pub per_class_recall: Vec<f64>,
    /// Rows in the truth per class.
    pub support: Vec<usize>,
    /// `confusion[true][pred]` counts.
    pub confusion: Vec<Vec<usize>>,
    /// Class names, in class order.
    pub classes: Vec<String>,
}

impl Report {
    /// A score, None when it was not computed (log_loss without probabilities).
    pub fn get(&self, metric: impl Into<Metric>) -> Option<f64> {
        self.scores.get(&metric.into()).copied()
    }
}

/// Confusion matrix `[true][pred]`.
pub fn confusion_matrix(truth: &[u32], pred: &[u32], k: usize) -> Vec<Vec<usize>> {
    let mut m = vec![vec![0; k]; k];
    for (&t, &p) in truth.iter().zip(pred) {
        if (t as usize) < k && (p as usize) < k {
            m[t as usize][p as usize] += 1;
        }
    }
    m
}

/// Computes every [`Metric`]. `probs` (row-major `[N, k]`) is needed for log_loss.
pub fn compute(truth: &[u32], pred: &[u32], probs: Option<&[f32]>, classes: &[String]) -> Result<Report> {
    let k = classes.len();
    if truth.len() != pred.len() || truth.is_empty() {
        return Err(Error::Train(format!(
            "metrics need equal, non-empty truth and predictions ({} vs {})",
            truth.len(),
            pred.len()
        )));
    }
    let n = truth.len() as f64;
    let cm = confusion_matrix(truth, pred, k);
    let tp: Vec<f64> = (0..k).map(|c| cm[c][c] as f64).collect();
    let support: Vec<usize> = (0..k).map(|c| cm[c].iter().sum()).collect();
    let predicted: Vec<usize> = (0..k).map(|c| cm.iter().map(|r| r[c]).sum()).collect();
    let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
    let recall: Vec<f64> = (0..k).map(|c| ratio(tp[c], support[c])).collect();
    let precision: Vec<f64> = (0..k).map(|c| ratio(tp[c], predicted[c])).collect();
    let f1: Vec<f64> = (0..k)
        .map(|c| {
            if precision[c] + recall[c] == 0.0 {
                0.0
            } else {
                2.0 * precision[c] * recall[c] / (precision[c] + recall[c])
            }
        })
        .collect();
    // sklearn averages over the labels present in truth or predictions.
    let labels: Vec<usize> = (0..k).filter(|&c| support[c] > 0 || predicted[c] > 0).collect();
    let present: Vec<usize> = (0..k).filter(|&c| support[c] > 0).collect();
    let mean_over = |v: &[f64], set: &[usize]| {
        if set.is_empty() {
            0.0
        } else {
            set.iter().map(|&c| v[c]).sum::<f64>() / set.len() as f64
        }
    };
    let accuracy = tp.iter().sum::<f64>() / n;
    let mut s = BTreeMap::new();
    s.insert(Metric::Accuracy, accuracy);
    s.insert(Metric::BalancedAccuracy, mean_over(&recall, &present));
    s.insert(Metric::F1Macro, mean_over(&f1, &labels));
    s.insert(Metric::F1Micro, accuracy);
    s.insert(Metric::F1Weighted, (0..k).map(|c| f1[c] * support[c] as f64).sum::<f64>() / n);
    s.insert(Metric::PrecisionMacro, mean_over(&precision, &labels));
    s.insert(Metric::RecallMacro, mean_over(&recall, &labels));
    // Multiclass Matthews correlation (Gorodkin's R_K).
    let c = tp.iter().sum::<f64>();
    let (tk, pk): (Vec<f64>, Vec<f64>) = (0..k).map(|i| (support[i] as f64, predicted[i] as f64)).unzip();
    let cov_ytyp = c * n - tk.iter().zip(&pk).map(|(a, b)| a * b).sum::<f64>();
    let cov_ypyp = n * n - pk.iter().map(|x| x * x).sum::<f64>();
    let cov_ytyt = n * n - tk.iter().map(|x| x * x).sum::<f64>();
    let denom = (cov_ytyt * cov_ypyp).sqrt();
    s.insert(Metric::Mcc, if denom == 0.0 { 0.0 } else { cov_ytyp / denom });
    if let Some(p) = probs {
        if p.len() != truth.len() * k {
            return Err(Error::Train(format!("probabilities hold {} values, expected {} x {k}", p.len(), truth.len())));
        }
        let eps = 1e-15f64;
        let ll = truth
            .iter()
            .enumerate()
            .map(|(i, &t)| -((p[i * k + t as usize] as f64).clamp(eps, 1.0 - eps)).ln())
            .sum::<f64>()
            / n;
        s.insert(Metric::LogLoss, ll);
    }
    Ok(Report { scores: s, per_class_recall: recall, support, confusion: cm, classes: classes.to_vec() })
}

/// Parses user-requested metric names; the error names the flag and lists the valid ones.
pub fn parse_names(flag: &str, names: &[String]) -> Result<Vec<Metric>> {
    names.iter().map(|n| n.parse::<Metric>().map_err(|e| Error::config(flag, e.to_string()))).collect()
}

/// A text table: per-class recall and support, the headline scores, and the confusion matrix.
pub fn summary_table(r: &Report) -> String {
    let shown = [Metric::Accuracy, Metric::BalancedAccuracy, Metric::F1Macro, Metric::Mcc, Metric::LogLoss];
    let present: Vec<Metric> = shown.into_iter().filter(|&m| r.get(m).is_some()).collect();
    summary_table_of(r, &present)
}

/// [`summary_table`] with the given metrics (in that order; `n/a` where the report has none).
pub fn summary_table_of(r: &Report, metrics: &[Metric]) -> String {
    use std::fmt::Write;
    let w = r.classes.iter().map(|c| c.len()).max().unwrap_or(5).clamp(5, 24);
    let mut out = String::new();
    let _ = writeln!(out, "{:<w$}  {:>7}  {:>7}", "class", "support", "recall");
    for (i, c) in r.classes.iter().enumerate() {
        let _ = writeln!(out, "{:<w$}  {:>7}  {:>7.3}", c, r.support[i], r.per_class_recall[i]);
    }
    let _ = writeln!(out);
    for &m in metrics {
        match r.get(m) {
            Some(v) => writeln!(out, "{:<18} {v:.4}", m.name()),
            None => writeln!(out, "{:<18} n/a", m.name()),
        }
        .ok();
    }
    let _ = writeln!(out, "\nconfusion matrix (rows: true, columns: predicted)");
    let labels: Vec<String> = r.classes.iter().enumerate().map(|(i, c)| format!("[{i}] {c}")).collect();
    let w = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let _ = write!(out, "{:<w$}", "");
    for i in 0..r.classes.len() {
        let _ = write!(out, " {:>6}", format!("[{i}]"));
    }
    let _ = writeln!(out);
    for (i, row) in r.confusion.iter().enumerate() {
        let _ = write!(out, "{:<w$}", labels[i]);
        for v in row {
            let _ = write!(out, " {v:>6}");
        }
        let _ = writeln!(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn matches_sklearn_on_a_small_case() {
        // sklearn: y_true=[0,0,0,1,1,2], y_pred=[0,0,1,1,2,2]
        // accuracy 0.6667, balanced 0.7222, f1_macro 0.6556, mcc 12/sqrt(24*22) = 0.5222
        let t = [0, 0, 0, 1, 1, 2];
        let p = [0, 0, 1, 1, 2, 2];
        let r = compute(&t, &p, None, &names(3)).unwrap();
        assert!((r.get(Metric::Accuracy).unwrap() - 4.0 / 6.0).abs() < 1e-9);
        assert!((r.get(Metric::BalancedAccuracy).unwrap() - (2.0 / 3.0 + 0.5 + 1.0) / 3.0).abs() < 1e-9);
        // per-class f1: c0 p=1 r=2/3 -> 0.8; c1 p=.5 r=.5 -> .5; c2 p=.5 r=1 -> .6667
        assert!((r.get(Metric::F1Macro).unwrap() - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-9);
        let mcc = r.get(Metric::Mcc).unwrap();
        assert!((mcc - 12.0 / (24.0f64 * 22.0).sqrt()).abs() < 1e-9, "{mcc}");
        assert_eq!(r.confusion[0], vec![2, 1, 0]);
    }

    #[test]
    fn log_loss_and_names() {
        let r = compute(&[0, 1], &[0, 1], Some(&[0.5, 0.5, 0.25, 0.75]), &names(2)).unwrap();
        assert!((r.get(Metric::LogLoss).unwrap() - (-(0.5f64.ln()) - 0.75f64.ln()) / 2.0).abs() < 1e-6);
        assert_eq!(parse_names("--metrics", &["f1_macro".into()]).unwrap(), vec![Metric::F1Macro]);
        let e = parse_names("--metrics", &["f1".into()]).unwrap_err().to_string();
        assert!(e.contains("--metrics") && e.contains("`f1`") && e.contains("f1_macro"), "{e}");
    }
}
