//! 1x1 convolution (stride 1, no padding) as a candle op with a backward pass: per image a gemm
//! `W[M, C] x X[C, H*W]` forward, `W^T x dY` for the input gradient and `sum_n dY x X^T` for the weight
//! gradient. candle's own conv2d backward goes through its slow CPU conv-transpose.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{cpu_slice, sgemm};

/// The differentiable 1x1 convolution (no bias; candle adds it so its gradient comes for free).
pub struct PointwiseOp;

impl CustomOp2 for PointwiseOp {
    fn name(&self) -> &'static str {
        "pointwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let m = l2.dims()[0];
        if l2.shape().elem_count() != m * c {
            candle_core::bail!("pointwise conv: weight {:?} for {c} channels", l2.dims());
        }
        let (x, wt) = (cpu_slice(s1, l1, "pointwise conv")?, cpu_slice(s2, l2, "pointwise conv")?);
        let p = h * w;
        let mut out = vec![0f32; n * m * p];
        out.par_chunks_mut(m * p).enumerate().for_each(|(i, o)| {
            let xi = &x[i * c * p..(i + 1) * c * p];
            sgemm((m, p, c), o, wt, (c as isize, 1), xi, (p as isize, 1), false, Parallelism::None);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, m, h, w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, wd) = x.dims4()?;
        let m = w.dims()[0];
        let p = h * wd;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let gys = gy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // dX[n] = W^T dY[n]: W read transposed through its strides.
        let mut dx = vec![0f32; n * c * p];
        dx.par_chunks_mut(c * p).enumerate().for_each(|(i, d)| {
            let g = &gys[i * m * p..(i + 1) * m * p];
            sgemm((c, p, m), d, &ws, (1, c as isize), g, (p as isize, 1), false, Parallelism::None);
        });
        let dx = Tensor::from_vec(dx, (n, c, h, wd), x.device())?;
        // dW = sum_n dY[n] X[n]^T: per-thread partial sums over images, then added; skipped for a weight
        // that does not train (bit_fit, norm_fit).
        if !w.track_op() {
            return Ok((Some(dx), None));
        }
        let threads = rayon::current_num_threads().max(1);
        let per = n.div_ceil(threads);
        let partial: Vec<Vec<f32>> = (0..n.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0f32; m * c];
                for i in t * per..((t + 1) * per).min(n) {
                    let g = &gys[i * m * p..(i + 1) * m * p];
                    let xi = &xs[i * c * p..(i + 1) * c * p];
                    sgemm((m, c, p), &mut acc, g, (p as isize, 1), xi, (1, p as isize), i > t * per, Parallelism::None);
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; m * c];
        for part in partial {
            dw.iter_mut().zip(part).for_each(|(d, v)| *d += v);
        }
        Ok((Some(dx), Some(Tensor::from_vec(dw, w.dims(), w.device())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn forward_and_gradients_match_candle_conv2d() {
        let dev = Device::Cpu;
        let seq = |n: usize, s: f32| (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * s).collect::<Vec<_>>();
        let x = Var::from_tensor(&Tensor::from_vec(seq(3 * 5 * 4 * 6, 1.0), (3, 5, 4, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(seq(7 * 5, 0.5), (7, 5, 1, 1), &dev).unwrap()).unwrap();
        let r = Tensor::from_vec(seq(3 * 7 * 4 * 6, 2.0), (3, 7, 4, 6), &dev).unwrap();
        let ours = x.apply_op2(&w, PointwiseOp).unwrap();
        let theirs = x.conv2d(&w, 0, 1, 1, 1).unwrap();
        let d = (&ours - &theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        let go = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = theirs.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let d = (go.get(v).unwrap() - gt.get(v).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }
}
