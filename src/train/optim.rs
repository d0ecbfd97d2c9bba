//! Optimizers whose whole state can be saved and restored, so that a resumed run continues exactly where
//! an interrupted one stopped (candle-nn's `AdamW` keeps its moments private).

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// AdamW settings (PyTorch's names and meaning; weight decay is decoupled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// PyTorch's defaults with the given learning rate and weight decay.
    pub fn new(lr: f64, weight_decay: f64) -> Self {
        AdamWConfig { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }
}

/// The saveable part of [`AdamW`]: the step count and both moments of every variable.
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Steps taken (for bias correction).
    pub step: usize,
    /// First moments, one per variable.
    pub m: Vec<Tensor>,
    /// Second moments, one per variable.
    pub v: Vec<Tensor>,
}

/// AdamW (Loshchilov & Hutter) over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<Var>,
    cfg: AdamWConfig,
    state: AdamWState,
}

impl AdamW {
    /// Zero moments for every variable.
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW { vars, cfg, state: AdamWState { step: 0, m, v } })
    }

    /// Sets the learning rate for the next steps (schedules call this every step).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The current state, for a checkpoint.
    pub fn state(&self) -> &AdamWState {
        &self.state
    }

    /// Restores a saved state; every moment must have its variable's shape.
    pub fn restore(&mut self, state: AdamWState) -> Result<()> {
        if state.m.len() != self.vars.len() || state.v.len() != self.vars.len() {
            return Err(Error::Train(format!(
                "optimizer state has {} / {} moments for {} variables",
                state.m.len(),
                state.v.len(),
                self.vars.len()
            )));
        }
        for (i, var) in self.vars.iter().enumerate() {
            for (what, t) in [("first", &state.m[i]), ("second", &state.v[i])] {
                if t.dims() != var.dims() {
                    return Err(Error::Shape {
                        name: format!("optimizer {what} moment {i}"),
                        msg: format!("expected {:?}, found {:?}", var.dims(), t.dims()),
                    });
                }
            }
        }
        self.state = state;
        Ok(())
    }

    /// Back-propagates `loss` and takes one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        let g: Vec<Option<Tensor>> = self.vars.iter().map(|v| grads.get(v).cloned()).collect();
        self.step(&g)
    }

    /// The variables, in the order [`AdamW::step`] takes gradients.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One step with gradients given per variable (None: no gradient reached it), e.g. accumulated over
    /// micro-batches.
    pub fn step(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let c = self.cfg;
        self.state.step += 1;
        let t = self.state.step as i32;
        let (scale_m, scale_v) = (1.0 / (1.0 - c.beta1.powi(t)), 1.0 / (1.0 - c.beta2.powi(t)));
        for (i, theta) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(i).and_then(|g| g.as_ref()) else { continue };
            if let Some((th, m, v)) =
                fused_step(theta.as_tensor(), g, &self.state.m[i], &self.state.v[i], c, (scale_m, scale_v))?
            {
                theta.set(&th)?;
                self.state.m[i] = m;
                self.state.v[i] = v;
                continue;
            }
            let m = ((&self.state.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.state.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let decayed = (theta.as_tensor() * (1.0 - c.lr * c.weight_decay))?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + c.eps)?)?;
            theta.set(&(decayed - (update * c.lr)?)?)?;
            self.state.m[i] = m;
            self.state.v[i] = v;
        }
        Ok(())
    }
}

/// A contiguous CPU f32 tensor's values, borrowed.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if crate::util::device::candle_ops_only() {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// One AdamW update of one variable in a single parallel pass over parameter, gradient and both moments
/// (the tensor-op form makes ten full-size temporaries per variable): the new (parameter, m, v), or None
/// off the CPU / for other dtypes or layouts.
fn fused_step(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: AdamWConfig,
    (scale_m, scale_v): (f64, f64),
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use rayon::prelude::*;
    let n = theta.elem_count();
    if [g, m, v].iter().any(|t| t.elem_count() != n) {
        return Ok(None);
    }
    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
    let (decay, lr, eps) = ((1.0 - c.lr * c.weight_decay) as f32, c.lr as f32, c.eps as f32);
    let (sm, sv) = (scale_m as f32, scale_v as f32);
    let out = with_f32(theta, |th| {
        with_f32(g, |gs| {
            with_f32(m, |ms| {
                with_f32(v, |vs| {
                    let (mut t2, mut m2, mut v2) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                    const CHUNK: usize = 1 << 14;
                    t2.par_chunks_mut(CHUNK)
                        .zip(m2.par_chunks_mut(CHUNK))
                        .zip(v2.par_chunks_mut(CHUNK))
                        .enumerate()
                        .for_each(|(k, ((to, mo), vo))| {
                            let s = k * CHUNK;
                            for j in 0..to.len() {
                                let gj = gs[s + j];
                                let mj = b1 * ms[s + j] + (1.0 - b1) * gj;
                                let vj = b2 * vs[s + j] + (1.0 - b2) * gj * gj;
                                to[j] = th[s + j] * decay - lr * (mj * sm) / ((vj * sv).sqrt() + eps);
                                mo[j] = mj;
                                vo[j] = vj;
                            }
                        });
                    (t2, m2, v2)
                })
            })
        })
    });
    let Some(Some(Some(Some((t2, m2, v2))))) = out else { return Ok(None) };
    let dims = theta.dims();
    let dev = theta.device();
    Ok(Some((Tensor::from_vec(t2, dims, dev)?, Tensor::from_vec(m2, dims, dev)?, Tensor::from_vec(v2, dims, dev)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One step by hand: m = 0.1 g, v = 0.001 g^2, bias-corrected update = g / (|g| + eps) = sign(g).
    #[test]
    fn first_step_matches_the_formula() {
        let w = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::new(0.1, 0.01)).unwrap();
        // loss = 3*w0 - 0.5*w1 -> grad (3, -0.5)
        let c = Tensor::new(&[3.0f32, -0.5], &Device::Cpu).unwrap();
        let loss = (w.as_tensor() * &c).unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) + 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.state().step, 1);
    }

    /// Saving the state mid-way and restoring it into a fresh optimizer gives the same weights, bit for bit.
    #[test]
    fn restored_state_continues_identically() {
        let run = |split: Option<usize>| {
            let w = Var::from_vec(vec![0.5f32, -0.25, 2.0], 3, &Device::Cpu).unwrap();
            let mut opt = AdamW::new(vec![w.clone()], AdamWConfig::new(0.05, 0.1)).unwrap();
            for s in 0..6 {
                if Some(s) == split {
                    let saved = opt.state().clone();
                    let w2 = Var::from_tensor(&w.as_tensor().copy().unwrap()).unwrap();
                    opt = AdamW::new(vec![w2.clone()], AdamWConfig::new(0.05, 0.1)).unwrap();
                    opt.restore(saved).unwrap();
                    return (w2, opt, s);
                }
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
            }
            (w, opt, 6)
        };
        let (w_full, _, _) = run(None);
        let (w, mut opt, from) = run(Some(3));
        for _ in from..6 {
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            opt.backward_step(&loss).unwrap();
        }
        assert_eq!(w.as_tensor().to_vec1::<f32>().unwrap(), w_full.as_tensor().to_vec1::<f32>().unwrap());
    }
}
