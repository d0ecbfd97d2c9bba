//! Classification metrics under AutoGluon's names (accuracy, balanced_accuracy, f1_macro, ...), the
//! confusion matrix, a text summary table, and pictures (confusion matrix and training curve as SVG).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Every metric name [`compute`] knows.
pub const METRIC_NAMES: &[&str] = &[
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "f1_micro",
    "f1_weighted",
    "precision_macro",
    "recall_macro",
    "log_loss",
    "mcc",
];

/// Metrics of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Metric name -> value.
    pub scores: BTreeMap<String, f64>,
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
    /// A score by name (0 when absent).
    pub fn get(&self, name: &str) -> f64 {
        self.scores.get(name).copied().unwrap_or(0.0)
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

/// Computes every metric of [`METRIC_NAMES`]. `probs` (row-major `[N, k]`) is needed for log_loss.
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
    s.insert("accuracy".to_string(), accuracy);
    s.insert("balanced_accuracy".to_string(), mean_over(&recall, &present));
    s.insert("f1_macro".to_string(), mean_over(&f1, &labels));
    s.insert("f1_micro".to_string(), accuracy);
    s.insert("f1_weighted".to_string(), (0..k).map(|c| f1[c] * support[c] as f64).sum::<f64>() / n);
    s.insert("precision_macro".to_string(), mean_over(&precision, &labels));
    s.insert("recall_macro".to_string(), mean_over(&recall, &labels));
    // Multiclass Matthews correlation (Gorodkin's R_K).
    let c = tp.iter().sum::<f64>();
    let (tk, pk): (Vec<f64>, Vec<f64>) = (0..k).map(|i| (support[i] as f64, predicted[i] as f64)).unzip();
    let cov_ytyp = c * n - tk.iter().zip(&pk).map(|(a, b)| a * b).sum::<f64>();
    let cov_ypyp = n * n - pk.iter().map(|x| x * x).sum::<f64>();
    let cov_ytyt = n * n - tk.iter().map(|x| x * x).sum::<f64>();
    let denom = (cov_ytyt * cov_ypyp).sqrt();
    s.insert("mcc".to_string(), if denom == 0.0 { 0.0 } else { cov_ytyp / denom });
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
        s.insert("log_loss".to_string(), ll);
    }
    Ok(Report { scores: s, per_class_recall: recall, support, confusion: cm, classes: classes.to_vec() })
}

/// Checks user-requested metric names; the error lists the valid ones.
pub fn check_names(names: &[String]) -> Result<()> {
    for n in names {
        if !METRIC_NAMES.contains(&n.as_str()) {
            return Err(Error::config("--metrics", format!("unknown metric `{n}`; expected one of {METRIC_NAMES:?}")));
        }
    }
    Ok(())
}

/// A text table: per-class recall and support, the headline scores, and the confusion matrix.
pub fn summary_table(r: &Report) -> String {
    use std::fmt::Write;
    let w = r.classes.iter().map(|c| c.len()).max().unwrap_or(5).clamp(5, 24);
    let mut out = String::new();
    let _ = writeln!(out, "{:<w$}  {:>7}  {:>7}", "class", "support", "recall");
    for (i, c) in r.classes.iter().enumerate() {
        let _ = writeln!(out, "{:<w$}  {:>7}  {:>7.3}", c, r.support[i], r.per_class_recall[i]);
    }
    let _ = writeln!(out);
    for m in ["accuracy", "balanced_accuracy", "f1_macro", "mcc", "log_loss"] {
        if let Some(v) = r.scores.get(m) {
            let _ = writeln!(out, "{m:<18} {v:.4}");
        }
    }
    let _ = writeln!(out, "\nconfusion matrix (rows: true, columns: predicted)");
    let _ = write!(out, "{:<w$}", "");
    for i in 0..r.classes.len() {
        let _ = write!(out, " {:>6}", format!("[{i}]"));
    }
    let _ = writeln!(out);
    for (i, row) in r.confusion.iter().enumerate() {
        let _ = write!(out, "{:<w$}", format!("[{i}] {}", r.classes[i]));
        for v in row {
            let _ = write!(out, " {v:>6}");
        }
        let _ = writeln!(out);
    }
    out
}

/// Draws the confusion matrix (row-normalised colour, counts written in cells) as SVG.
pub fn confusion_svg(r: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let k = r.classes.len().max(1);
    let cell = 60u32;
    let margin = 160u32;
    let size = (margin + cell * k as u32 + 20, margin + cell * k as u32 + 20);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let err = |e: String| Error::Train(format!("drawing the confusion matrix: {e}"));
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let style = ("sans-serif", 14).into_font();
        root.draw(&Text::new("confusion matrix (rows: true, cols: predicted)", (10, 10), style.clone()))
            .map_err(|e| err(e.to_string()))?;
        for (i, row) in r.confusion.iter().enumerate() {
            let total: usize = row.iter().sum();
            let y = (margin + cell * i as u32) as i32;
            root.draw(&Text::new(r.classes[i].clone(), (10, y + cell as i32 / 2), style.clone()))
                .map_err(|e| err(e.to_string()))?;
            for (j, &v) in row.iter().enumerate() {
                let x = (margin + cell * j as u32) as i32;
                let frac = if total == 0 { 0.0 } else { v as f64 / total as f64 };
                let shade = (255.0 * (1.0 - frac)) as u8;
                let colour = RGBColor(shade, shade, 255);
                root.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], colour.filled()))
                    .map_err(|e| err(e.to_string()))?;
                let text_colour = if frac > 0.5 { WHITE } else { BLACK };
                root.draw(&Text::new(v.to_string(), (x + 8, y + cell as i32 / 2), style.clone().color(&text_colour)))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        for (j, c) in r.classes.iter().enumerate() {
            let x = (margin + cell * j as u32) as i32;
            let label: String = c.chars().take(8).collect();
            root.draw(&Text::new(label, (x + 4, margin as i32 - 20), style.clone())).map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::model::write_atomic(path, svg.as_bytes())
}

/// Draws training loss and the validation metric per epoch as SVG.
pub fn curve_svg(train_loss: &[f64], val_metric: &[f64], metric_name: &str, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let err = |e: String| Error::Train(format!("drawing the training curve: {e}"));
        let root = SVGBackend::with_string(&mut svg, (800, 400)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let (left, right) = root.split_horizontally(400);
        let epochs = train_loss.len().max(1) as f64;
        let lmax = train_loss.iter().cloned().fold(0.0f64, f64::max).max(1e-9) * 1.05;
        let mut c = ChartBuilder::on(&left)
            .caption("training loss", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..epochs.max(2.0), 0f64..lmax)
            .map_err(|e| err(e.to_string()))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| err(e.to_string()))?;
        c.draw_series(LineSeries::new(train_loss.iter().enumerate().map(|(i, &v)| (i as f64 + 1.0, v)), &RED))
            .map_err(|e| err(e.to_string()))?;
        let mut c = ChartBuilder::on(&right)
            .caption(format!("validation {metric_name}"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(1f64..epochs.max(2.0), 0f64..1.0)
            .map_err(|e| err(e.to_string()))?;
        c.configure_mesh().x_desc("epoch").draw().map_err(|e| err(e.to_string()))?;
        c.draw_series(LineSeries::new(val_metric.iter().enumerate().map(|(i, &v)| (i as f64 + 1.0, v)), &BLUE))
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    crate::model::write_atomic(path, svg.as_bytes())
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
        assert!((r.get("accuracy") - 4.0 / 6.0).abs() < 1e-9);
        assert!((r.get("balanced_accuracy") - (2.0 / 3.0 + 0.5 + 1.0) / 3.0).abs() < 1e-9);
        // per-class f1: c0 p=1 r=2/3 -> 0.8; c1 p=.5 r=.5 -> .5; c2 p=.5 r=1 -> .6667
        assert!((r.get("f1_macro") - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-9);
        let mcc = r.get("mcc");
        assert!((mcc - 12.0 / (24.0f64 * 22.0).sqrt()).abs() < 1e-9, "{mcc}");
        assert_eq!(r.confusion[0], vec![2, 1, 0]);
    }

    #[test]
    fn log_loss_and_names() {
        let r = compute(&[0, 1], &[0, 1], Some(&[0.5, 0.5, 0.25, 0.75]), &names(2)).unwrap();
        assert!((r.get("log_loss") - (-(0.5f64.ln()) - 0.75f64.ln()) / 2.0).abs() < 1e-6);
        assert!(check_names(&["f1_macro".into()]).is_ok());
        assert!(check_names(&["f1".into()]).unwrap_err().to_string().contains("f1_macro"));
    }
}
