//! Depthwise convolution (one `kh x kw` filter per channel) forward and backward, and a candle custom op
//! so gradients flow through it when a backbone is fine-tuned (candle runs a grouped conv as one conv per
//! channel, ~100x slower than ONNX Runtime, forward and backward).
//!
//! Each (image, channel) plane is copied once, zero-padded and split into `sy x sx` phase planes
//! (`Q_ab[r][c] = P[r*sy + a][c*sx + b]`); every tap is then one long contiguous multiply-add over a phase
//! plane, computed on a grid as wide as the phase plane (the extra columns are dropped). Row-by-row loops
//! are too short to vectorise on the 14- and 7-wide planes of a MobileNet/EfficientNet tail. The backward
//! pass runs the same taps in reverse: input gradients scatter into phase planes, weight gradients are dot
//! products of the output gradient grid with the phase planes.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, par_build, tensor, with_data, ConvGeom};
use crate::error::Result;

/// Phase-plane geometry of one input plane.
#[derive(Clone, Copy)]
struct Phases {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    wq: usize,
    qlen: usize,
    g: ConvGeom,
}

impl Phases {
    fn new(h: usize, w: usize, g: ConvGeom) -> Phases {
        let (oh, ow) = g.out_size(h, w);
        let (hp, wp) = (h + g.pads[0] + g.pads[2], w + g.pads[1] + g.pads[3]);
        let (hq, wq) = (hp.div_ceil(g.s.0), wp.div_ceil(g.s.1));
        // Room for the widest tap offset past the last row.
        let (qi_max, qj_max) = (((g.k.0 - 1) * g.d.0) / g.s.0, ((g.k.1 - 1) * g.d.1) / g.s.1);
        let qlen = (hq.max(oh + qi_max) + 1) * wq + qj_max;
        Phases { h, w, oh, ow, wq, qlen, g }
    }

    fn grid(&self) -> usize {
        self.oh * self.wq
    }

    fn planes_len(&self) -> usize {
        self.g.s.0 * self.g.s.1 * self.qlen
    }

    /// Index in the phase planes of input pixel (r, c).
    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> usize {
        let (pr, pc) = (r + self.g.pads[0], c + self.g.pads[1]);
        let (sy, sx) = self.g.s;
        ((pr % sy) * sx + pc % sx) * self.qlen + (pr / sy) * self.wq + pc / sx
    }

    /// Start in the phase planes of tap (i, j) for output (0, 0).
    #[inline(always)]
    fn tap(&self, i: usize, j: usize) -> usize {
        let (sy, sx) = self.g.s;
        let (a, qi) = ((i * self.g.d.0) % sy, (i * self.g.d.0) / sy);
        let (b, qj) = ((j * self.g.d.1) % sx, (j * self.g.d.1) / sx);
        (a * sx + b) * self.qlen + qi * self.wq + qj
    }

    fn gather(&self, src: &[f32], phases: &mut [f32]) {
        phases.fill(0.0);
        let sx = self.g.s.1;
        for r in 0..self.h {
            let row = &src[r * self.w..(r + 1) * self.w];
            if sx == 1 {
                let at = self.at(r, 0);
                phases[at..at + self.w].copy_from_slice(row);
                continue;
            }
            // One strided run per column phase (no division per pixel).
            for c0 in 0..sx.min(self.w) {
                let at = self.at(r, c0);
                for (k, &v) in row[c0..].iter().step_by(sx).enumerate() {
                    phases[at + k] = v;
                }
            }
        }
    }
}

#[inline(always)]
fn fwd_plane_body(o: &mut [MaybeUninit<f32>], scratch: &mut Vec<f32>, src: &[f32], k: &[f32], bias: f32, p: Phases) {
    scratch.resize(p.planes_len() + p.grid(), 0.0);
    let (phases, acc) = scratch.split_at_mut(p.planes_len());
    p.gather(src, phases);
    acc.fill(bias);
    let grid = p.grid();
    for i in 0..p.g.k.0 {
        for j in 0..p.g.k.1 {
            let wij = k[i * p.g.k.1 + j];
            let base = p.tap(i, j);
            for (d, &v) in acc.iter_mut().zip(&phases[base..base + grid]) {
                *d += wij * v;
            }
        }
    }
    for (orow, arow) in o.chunks_mut(p.ow).zip(acc.chunks(p.wq)) {
        for (d, &v) in orow.iter_mut().zip(arow) {
            d.write(v);
        }
    }
}

simd_dispatch!(
    fwd_plane,
    <>,
    (o: &mut [MaybeUninit<f32>], scratch: &mut Vec<f32>, src: &[f32], k: &[f32], bias: f32, p: Phases),
    fwd_plane_body(o, scratch, src, k, bias, p)
);

/// Output gradient of one plane laid on the phase grid (zeros in the extra columns).
fn grid_of(gy: &[f32], p: &Phases, out: &mut [f32]) {
    out.fill(0.0);
    for (grow, yrow) in out.chunks_mut(p.wq).zip(gy.chunks(p.ow)) {
        grow[..p.ow].copy_from_slice(yrow);
    }
}

#[inline(always)]
fn bwd_input_plane_body(dx: &mut [f32], scratch: &mut Vec<f32>, gy: &[f32], k: &[f32], p: Phases) {
    scratch.resize(p.planes_len() + p.grid(), 0.0);
    let (dphases, gacc) = scratch.split_at_mut(p.planes_len());
    dphases.fill(0.0);
    grid_of(gy, &p, gacc);
    let grid = p.grid();
    for i in 0..p.g.k.0 {
        for j in 0..p.g.k.1 {
            let wij = k[i * p.g.k.1 + j];
            let base = p.tap(i, j);
            for (d, &g) in dphases[base..base + grid].iter_mut().zip(gacc.iter()) {
                *d += wij * g;
            }
        }
    }
    for r in 0..p.h {
        for c in 0..p.w {
            dx[r * p.w + c] = dphases[p.at(r, c)];
        }
    }
}

simd_dispatch!(
    bwd_input_plane,
    <>,
    (dx: &mut [f32], scratch: &mut Vec<f32>, gy: &[f32], k: &[f32], p: Phases),
    bwd_input_plane_body(dx, scratch, gy, k, p)
);

/// Adds this plane's weight gradient (one value per tap) to `dk`.
fn bwd_weight_plane(dk: &mut [f32], scratch: &mut Vec<f32>, src: &[f32], gy: &[f32], p: Phases) {
    scratch.resize(p.planes_len() + p.grid(), 0.0);
    let (phases, gacc) = scratch.split_at_mut(p.planes_len());
    p.gather(src, phases);
    grid_of(gy, &p, gacc);
    let grid = p.grid();
    for i in 0..p.g.k.0 {
        for j in 0..p.g.k.1 {
            let base = p.tap(i, j);
            dk[i * p.g.k.1 + j] += phases[base..base + grid].iter().zip(gacc.iter()).map(|(&a, &b)| a * b).sum::<f32>();
        }
    }
}

/// Depthwise convolution of `xs` ([n, c, h, w]) with `ws` ([c, kh*kw]) plus one bias per channel.
fn forward(xs: &[f32], (n, c, h, w): (usize, usize, usize, usize), ws: &[f32], bs: &[f32], g: ConvGeom) -> Vec<f32> {
    let p = Phases::new(h, w, g);
    let (plane, taps) = (p.oh * p.ow, g.k.0 * g.k.1);
    par_build(n * c * plane, plane, |start, o| {
        let mut scratch = Vec::new();
        for (q, out) in o.chunks_mut(plane).enumerate() {
            let idx = start / plane + q;
            let ch = idx % c;
            fwd_plane(
                out,
                &mut scratch,
                &xs[idx * h * w..(idx + 1) * h * w],
                &ws[ch * taps..(ch + 1) * taps],
                bs[ch],
                p,
            );
        }
    })
}

/// A depthwise convolution NCHW with optional bias; `act` = Some((lo, hi)) clamps the output (a fused
/// Relu/Clip). Inference only: see [`DepthwiseOp`] for the differentiable form.
pub fn conv_depthwise(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: ConvGeom,
    act: Option<(f32, f32)>,
) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (kh, kw) = g.k;
    let ws = w.flatten_all()?.to_vec1::<f32>()?;
    let bs = match bias {
        Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
        None => vec![0.0; c],
    };
    if ws.len() != c * kh * kw || bs.len() != c {
        return Err(candle_core::Error::Msg(format!("depthwise conv: weight {:?} for {c} channels", w.dims())).into());
    }
    let (oh, ow) = g.out_size(h, wd);
    let mut out = with_data(x, |xs| forward(xs, (n, c, h, wd), &ws, &bs, g))?;
    if let Some((lo, hi)) = act {
        super::clamp_slice(&mut out, lo, hi);
    }
    tensor(out, &[n, c, oh, ow])
}

/// Depthwise convolution as a candle op with a backward pass (input and weight gradients); the bias is
/// added outside with candle's broadcast add so its gradient comes for free.
pub struct DepthwiseOp {
    /// Kernel, strides, dilations, padding.
    pub g: ConvGeom,
}

impl CustomOp2 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        let xs = cpu_slice(s1, l1, "depthwise conv")?;
        let ws = cpu_slice(s2, l2, "depthwise conv")?;
        if ws.len() != c * self.g.k.0 * self.g.k.1 {
            candle_core::bail!("depthwise conv: weight {:?} for {c} channels", l2.dims());
        }
        let (oh, ow) = self.g.out_size(h, w);
        let out = forward(xs, (n, c, h, w), ws, &vec![0.0; c], self.g);
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, wd) = x.dims4()?;
        let p = Phases::new(h, wd, self.g);
        let taps = self.g.k.0 * self.g.k.1;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        let gys = gy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let plane = p.oh * p.ow;
        let mut dx = vec![0f32; n * c * h * wd];
        dx.par_chunks_mut(h * wd).enumerate().for_each_init(Vec::new, |scratch, (idx, d)| {
            let ch = idx % c;
            bwd_input_plane(d, scratch, &gys[idx * plane..(idx + 1) * plane], &ws[ch * taps..(ch + 1) * taps], p);
        });
        let dx = Tensor::from_vec(dx, (n, c, h, wd), x.device())?;
        // Weight gradient, per channel summed over the images; skipped for a weight that does not train
        // (bit_fit, norm_fit).
        if !w.track_op() {
            return Ok((Some(dx), None));
        }
        let mut dw = vec![0f32; c * taps];
        dw.par_chunks_mut(taps).enumerate().for_each_init(Vec::new, |scratch, (ch, dk)| {
            for img in 0..n {
                let idx = img * c + ch;
                bwd_weight_plane(
                    dk,
                    scratch,
                    &xs[idx * h * wd..(idx + 1) * h * wd],
                    &gys[idx * plane..(idx + 1) * plane],
                    p,
                );
            }
        });
        let dw = Tensor::from_vec(dw, w.dims(), w.device())?;
        Ok((Some(dx), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * scale).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    const CASES: [(usize, usize, [usize; 4]); 5] =
        [(3, 1, [1, 1, 1, 1]), (3, 2, [1, 1, 1, 1]), (5, 2, [1, 2, 2, 1]), (5, 1, [2, 2, 2, 2]), (3, 2, [0; 4])];

    #[test]
    fn forward_matches_candle_grouped_conv() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(seq(2 * 3 * 9 * 8, 1.0), (2, 3, 9, 8), &dev).unwrap();
        let b = Tensor::from_vec(vec![0.1f32, -0.2, 0.3], 3, &dev).unwrap();
        for (k, s, pads) in CASES {
            let w = Tensor::from_vec(seq(3 * k * k, 0.5), (3, 1, k, k), &dev).unwrap();
            let g = ConvGeom { k: (k, k), s: (s, s), d: (1, 1), pads };
            let xp = x.pad_with_zeros(2, pads[0], pads[2]).unwrap().pad_with_zeros(3, pads[1], pads[3]).unwrap();
            let want = xp.conv2d(&w, 0, s, 1, 3).unwrap().broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap()).unwrap();
            assert!(max_diff(&conv_depthwise(&x, &w, Some(&b), g, None).unwrap(), &want) < 1e-5);
            let op =
                x.apply_op2(&w, DepthwiseOp { g }).unwrap().broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap()).unwrap();
            assert!(max_diff(&op, &want) < 1e-5);
        }
    }

    /// The loss sum(conv(x, w) * r) is linear in x and in w, so a central difference is exact up to
    /// rounding: compare every weight and every 5th input element.
    #[test]
    fn backward_matches_central_differences() {
        let dev = Device::Cpu;
        for (k, s, pads) in CASES {
            let xv = seq(2 * 3 * 9 * 8, 1.0);
            let wv = seq(3 * k * k, 0.5);
            let g = ConvGeom { k: (k, k), s: (s, s), d: (1, 1), pads };
            let (oh, ow) = g.out_size(9, 8);
            let r = Tensor::from_vec(seq(2 * 3 * oh * ow, 2.0), (2, 3, oh, ow), &dev).unwrap();
            let loss = |xv: &[f32], wv: &[f32]| -> f32 {
                let x = Tensor::from_vec(xv.to_vec(), (2, 3, 9, 8), &dev).unwrap();
                let w = Tensor::from_vec(wv.to_vec(), (3, 1, k, k), &dev).unwrap();
                conv_depthwise(&x, &w, None, g, None).unwrap().mul(&r).unwrap().sum_all().unwrap().to_scalar().unwrap()
            };
            let x = Var::from_tensor(&Tensor::from_vec(xv.clone(), (2, 3, 9, 8), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::from_vec(wv.clone(), (3, 1, k, k), &dev).unwrap()).unwrap();
            let grads =
                x.apply_op2(&w, DepthwiseOp { g }).unwrap().mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gw = grads.get(&w).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let h = 0.5f32;
            for i in (0..xv.len()).step_by(5) {
                let (mut p, mut m) = (xv.clone(), xv.clone());
                p[i] += h;
                m[i] -= h;
                let fd = (loss(&p, &wv) - loss(&m, &wv)) / (2.0 * h);
                assert!((fd - gx[i]).abs() < 1e-3, "k {k} s {s} pads {pads:?}: d/dx[{i}] {} vs {fd}", gx[i]);
            }
            for i in 0..wv.len() {
                let (mut p, mut m) = (wv.clone(), wv.clone());
                p[i] += h;
                m[i] -= h;
                let fd = (loss(&xv, &p) - loss(&xv, &m)) / (2.0 * h);
                assert!((fd - gw[i]).abs() < 2e-3 * fd.abs().max(1.0), "k {k} s {s}: d/dw[{i}] {} vs {fd}", gw[i]);
            }
        }
    }
}
