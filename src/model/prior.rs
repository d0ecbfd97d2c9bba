//! Post-hoc prior correction: predict `argmax z - tau * log(training prior) (+ tau * log(target prior))`
//! from a head trained with any loss (Menon et al., ICLR 2021, "logit adjustment" applied after training).
//! The shift is one constant per class, so it is folded into the head's bias: the candle predictor, an
//! export (the bias initializer before the Softmax) and a served model all compute the same numbers.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A prior correction: its strength and the deployment prior to aim at (None: uniform, which is what
/// balanced accuracy measures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriorCorrection {
    /// Weight of the log priors (1.0 is the consistent value for balanced error).
    pub tau: f64,
    /// Known class frequencies at deployment, in class order (normalised to sum 1).
    pub target_prior: Option<Vec<f64>>,
}

impl PriorCorrection {
    /// Checks `tau` and the target prior (finite, positive, one per class once applied).
    pub fn new(tau: f64, target_prior: Option<Vec<f64>>) -> Result<PriorCorrection> {
        if !(tau.is_finite() && tau >= 0.0) {
            return Err(Error::config("--prior-correction", format!("must be a finite number >= 0, got {tau}")));
        }
        if let Some(p) = &target_prior {
            if p.is_empty() || p.iter().any(|&v| !(v.is_finite() && v > 0.0)) {
                return Err(Error::config("--target-prior", format!("needs positive frequencies, got {p:?}")));
            }
        }
        Ok(PriorCorrection { tau, target_prior })
    }

    /// The per-class shift added to the logits, for a model trained on `counts` rows per class of
    /// `classes`.
    pub fn shift(&self, classes: &[String], counts: &[usize]) -> Result<Vec<f64>> {
        if counts.len() != classes.len() || counts.contains(&0) {
            return Err(Error::config(
                "--prior-correction",
                "the model folder records no training class counts (trained before automm recorded them); retrain it",
            ));
        }
        let total: usize = counts.iter().sum();
        let mut shift: Vec<f64> = counts.iter().map(|&n| -self.tau * (n as f64 / total as f64).ln()).collect();
        if let Some(p) = &self.target_prior {
            if p.len() != classes.len() {
                return Err(Error::config(
                    "--target-prior",
                    format!(
                        "has {} values but the model has {} classes, in this order: {classes:?}",
                        p.len(),
                        classes.len()
                    ),
                ));
            }
            let sum: f64 = p.iter().sum();
            for (s, &v) in shift.iter_mut().zip(p) {
                *s += self.tau * (v / sum).ln();
            }
        }
        Ok(shift)
    }
}

/// Parses `--target-prior p1,p2,...`.
pub fn parse_prior(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .map_err(|_| Error::config("--target-prior", format!("`{v}` is not a number in {s:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shift_is_minus_tau_log_prior_plus_the_target() {
        let classes: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let s = PriorCorrection::new(1.0, None).unwrap().shift(&classes, &[3, 1]).unwrap();
        assert!((s[0] - -(0.75f64).ln()).abs() < 1e-12 && (s[1] - -(0.25f64).ln()).abs() < 1e-12);
        // A target prior equal to the training prior cancels the correction.
        let s = PriorCorrection::new(0.5, Some(vec![6.0, 2.0])).unwrap().shift(&classes, &[3, 1]).unwrap();
        assert!(s.iter().all(|v| v.abs() < 1e-12), "{s:?}");
        assert!(PriorCorrection::new(1.0, Some(vec![1.0])).unwrap().shift(&classes, &[3, 1]).is_err());
        assert!(PriorCorrection::new(1.0, None).unwrap().shift(&classes, &[]).is_err());
        assert!(PriorCorrection::new(-1.0, None).is_err());
        assert_eq!(parse_prior("0.5, 0.25,0.25").unwrap(), vec![0.5, 0.25, 0.25]);
        assert!(parse_prior("0.5,x").is_err());
    }
}
