//! The learning-rate schedule AutoMM's keys describe: linear warm-up (`optimization.warmup_steps`, a
//! fraction of all steps when < 1), then `optimization.lr_schedule` down from the peak rate.

use crate::model::hparams::{HyperParams, LrSchedule};

/// The learning rate of every step of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    peak: f64,
    kind: LrSchedule,
    warmup: usize,
    total: usize,
}

impl Schedule {
    /// The schedule `hp` gives a run of `total` optimizer steps.
    pub fn new(hp: &HyperParams, total: usize) -> Schedule {
        let warmup = if hp.warmup_steps < 1.0 {
            (hp.warmup_steps * total as f64).round() as usize
        } else {
            hp.warmup_steps as usize
        };
        Schedule { peak: hp.learning_rate, kind: hp.lr_schedule, warmup: warmup.min(total), total }
    }

    /// Warm-up steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup
    }

    /// Learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).clamp(0.0, 1.0);
        self.peak
            * match self.kind {
                LrSchedule::CosineDecay => 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
                LrSchedule::PolynomialDecay | LrSchedule::LinearDecay => 1.0 - t,
                LrSchedule::Constant => 1.0,
            }
    }
}
