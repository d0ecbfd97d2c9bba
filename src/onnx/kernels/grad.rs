//! Training-path ops: candle custom ops whose forward is our inference kernel and whose backward is one
//! fused pass of our own, for the ops a fine-tuning step spends its time in. Composed from candle's basic
//! ops, LayerNorm is eight ops forward and more backward, each a full-size temporary; GELU is five and
//! Softmax three. Here each is one pass forward and one (two for LayerNorm's parameter sums) backward.
//! The backward passes recompute what they need from the op's input or output (a row's mean and
//! inverse deviation, `erf`) instead of keeping extra tensors alive until the backward pass.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, exp, gelu_in_place, lane_sum, layer_norm_chunk, par_build, softmax_chunk};
use crate::util::device::own_kernels_for;

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

/// Mean and inverse standard deviation of one row.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x) / n;
    let mut sq = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in sq.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let rest: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
    (mean, 1.0 / ((sq.iter().sum::<f32>() + rest) / n + eps).sqrt())
}

/// LayerNorm over the last dim of `x` with scale `g` and shift `b` (both of that dim's length), as one
/// op with a backward pass: `dx = inv * (dy*g - mean(dy*g) - xhat * mean(dy*g*xhat))`, `dg = sum dy*xhat`,
/// `db = sum dy` over rows.
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g, b) =
            (cpu_slice(s1, l1, "layer norm")?, cpu_slice(s2, l2, "layer norm")?, cpu_slice(s3, l3, "layer norm")?);
        let d = l1.dims().last().copied().unwrap_or(1).max(1);
        if g.len() != d || b.len() != d {
            candle_core::bail!("layer norm: scale/shift of {}/{} values for rows of {d}", g.len(), b.len());
        }
        let out = par_build(x.len(), d, |s, o| layer_norm_chunk(o, &x[s..s + o.len()], g, b, d, self.eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let (xv, gv, dyv) = (flat(x)?, flat(g)?, flat(dy)?);
        let eps = self.eps;
        // Rows in blocks: each block writes its dx rows and returns its partial dg and db sums.
        let rows_per = (super::CHUNK / d).max(1);
        let mut dx = vec![0f32; xv.len()];
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(rows_per * d)
            .zip(xv.par_chunks(rows_per * d).zip(dyv.par_chunks(rows_per * d)))
            .map(|(o, (xs, dys))| {
                let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
                ln_bwd_block(o, xs, dys, &gv, &mut dg, &mut db, eps);
                (dg, db)
            })
            .collect();
        let (mut dg, mut db) = (vec![0f32; d], vec![0f32; d]);
        for (pg, pb) in partial {
            dg.iter_mut().zip(pg).for_each(|(a, v)| *a += v);
            db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.dims(), dev)?),
            Some(Tensor::from_vec(dg, g.dims(), dev)?),
            Some(Tensor::from_vec(db, g.dims(), dev)?),
        ))
    }
}

#[inline(always)]
fn ln_bwd_body(o: &mut [f32], x: &[f32], dy: &[f32], g: &[f32], dg: &mut [f32], db: &mut [f32], eps: f32) {
    let d = g.len();
    for ((orow, xrow), dyrow) in o.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
        let (mean, inv) = row_stats(xrow, eps);
        // Sums of dy*g and dy*g*xhat over the row, with xhat = (x - mean) * inv.
        let (mut s1, mut s2) = ([0f32; 16], [0f32; 16]);
        for (i, ((&xv, &dv), &gv)) in xrow.iter().zip(dyrow).zip(g).enumerate() {
            let xh = (xv - mean) * inv;
            let dgy = dv * gv;
            s1[i % 16] += dgy;
            s2[i % 16] += dgy * xh;
            dg[i] += dv * xh;
            db[i] += dv;
        }
        let (m1, m2) = (s1.iter().sum::<f32>() / d as f32, s2.iter().sum::<f32>() / d as f32);
        for (((o, &xv), &dv), &gv) in orow.iter_mut().zip(xrow).zip(dyrow).zip(g) {
            let xh = (xv - mean) * inv;
            *o = inv * (dv * gv - m1 - xh * m2);
        }
    }
}

simd_dispatch!(
    ln_bwd_block,
    <>,
    (o: &mut [f32], x: &[f32], dy: &[f32], g: &[f32], dg: &mut [f32], db: &mut [f32], eps: f32),
    ln_bwd_body(o, x, dy, g, dg, db, eps)
);

/// Softmax over the last dim with a backward pass from its output: `dx = y * (dy - sum(dy * y))`.
pub struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, "softmax")?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let out = par_build(x.len(), d, |s, o| softmax_chunk(o, &x[s..s + o.len()], d));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = y.dims().last().copied().unwrap_or(1).max(1);
        let (yv, dyv) = (flat(y)?, flat(dy)?);
        let out = par_build(yv.len(), d, |s, o| softmax_bwd_chunk(o, &yv[s..s + o.len()], &dyv[s..s + o.len()], d));
        Ok(Some(Tensor::from_vec(out, y.dims(), y.device())?))
    }
}

#[inline(always)]
fn softmax_bwd_body(o: &mut [MaybeUninit<f32>], y: &[f32], dy: &[f32], d: usize) {
    for ((orow, yrow), dyrow) in o.chunks_mut(d).zip(y.chunks(d)).zip(dy.chunks(d)) {
        let mut acc = [0f32; 16];
        for (i, (&a, &b)) in yrow.iter().zip(dyrow).enumerate() {
            acc[i % 16] += a * b;
        }
        let dot: f32 = acc.iter().sum();
        for ((o, &a), &b) in orow.iter_mut().zip(yrow).zip(dyrow) {
            o.write(a * (b - dot));
        }
    }
}

simd_dispatch!(
    softmax_bwd_chunk,
    <>,
    (o: &mut [MaybeUninit<f32>], y: &[f32], dy: &[f32], d: usize),
    softmax_bwd_body(o, y, dy, d)
);

/// The erf GELU `x * Phi(x)` with a backward pass recomputed from its input:
/// `d/dx = Phi(x) + x * phi(x)`.
pub struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = cpu_slice(s, l, "gelu")?.to_vec();
        out.par_chunks_mut(super::CHUNK).for_each(gelu_in_place);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (xv, dyv) = (flat(x)?, flat(dy)?);
        let out = par_build(xv.len(), 1, |s, o| gelu_bwd_chunk(o, &xv[s..s + o.len()], &dyv[s..s + o.len()]));
        Ok(Some(Tensor::from_vec(out, x.dims(), x.device())?))
    }
}

#[inline(always)]
fn gelu_bwd_body(o: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for ((o, &v), &g) in o.iter_mut().zip(x).zip(dy) {
        let cdf = 0.5 * (1.0 + super::erf(v * std::f32::consts::FRAC_1_SQRT_2));
        o.write(g * (cdf + v * INV_SQRT_2PI * exp(-0.5 * v * v)));
    }
}

simd_dispatch!(gelu_bwd_chunk, <>, (o: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32]), gelu_bwd_body(o, x, dy));

/// `x + b` with `b` one value per index of a run of `x`'s dims `axes` (a conv's per-channel bias, a
/// linear layer's bias row, a relative-position bias over heads and tokens), with a backward pass that
/// sums `dy` over the other dims in one pass; candle's broadcast backward reduces over strided dims,
/// which was 28% of an EfficientNet-Lite0 fine-tuning step.
pub struct BiasAddOp {
    /// The dims of `x` the bias runs along: `start..end`.
    pub axes: (usize, usize),
}

impl BiasAddOp {
    /// (outer, bias length, inner) of `dims` around the axes.
    fn split(&self, dims: &[usize]) -> (usize, usize, usize) {
        let (s, e) = self.axes;
        (dims[..s].iter().product(), dims[s..e].iter().product(), dims[e..].iter().product())
    }
}

impl CustomOp2 for BiasAddOp {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, b) = (cpu_slice(s1, l1, "bias add")?, cpu_slice(s2, l2, "bias add")?);
        let (_, c, inner) = self.split(l1.dims());
        if b.len() != c {
            candle_core::bail!("bias add: {} bias values for dims {:?} of {:?}", b.len(), self.axes, l1.dims());
        }
        // One pass: each chunk is whole outer rows, written as x + b.
        let block = (c * inner).max(1);
        let out = par_build(x.len(), block, |s, o| bias_add_chunk(o, &x[s..s + o.len()], b, inner.max(1)));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (outer, c, inner) = self.split(dy.dims());
        let g = flat(dy)?;
        let block = c * inner;
        // Blocks of whole outer rows, each summing into its own [c] partial.
        let per = (super::CHUNK / block.max(1)).max(1);
        let partial: Vec<Vec<f32>> = g
            .par_chunks(per * block.max(1))
            .map(|rows| {
                let mut acc = vec![0f32; c];
                for row in rows.chunks(block.max(1)) {
                    bias_sum_row(&mut acc, row, inner.max(1));
                }
                acc
            })
            .collect();
        let mut db = vec![0f32; c];
        for p in partial {
            db.iter_mut().zip(p).for_each(|(a, v)| *a += v);
        }
        debug_assert!(outer == 0 || g.len() == outer * block);
        Ok((Some(dy.clone()), Some(Tensor::from_vec(db, b.dims(), b.device())?)))
    }
}

#[inline(always)]
fn bias_add_body(o: &mut [MaybeUninit<f32>], x: &[f32], b: &[f32], inner: usize) {
    for (orow, xrow) in o.chunks_mut(b.len() * inner).zip(x.chunks(b.len() * inner)) {
        if inner == 1 {
            // A bias row: the row and the bias side by side.
            for ((d, &v), &bv) in orow.iter_mut().zip(xrow).zip(b) {
                d.write(v + bv);
            }
            continue;
        }
        for ((op, xp), &bv) in orow.chunks_mut(inner).zip(xrow.chunks(inner)).zip(b) {
            for (d, &v) in op.iter_mut().zip(xp) {
                d.write(v + bv);
            }
        }
    }
}

simd_dispatch!(
    bias_add_chunk,
    <>,
    (o: &mut [MaybeUninit<f32>], x: &[f32], b: &[f32], inner: usize),
    bias_add_body(o, x, b, inner)
);

#[inline(always)]
fn bias_sum_row_body(acc: &mut [f32], row: &[f32], inner: usize) {
    if inner == 1 {
        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
    } else {
        for (a, plane) in acc.iter_mut().zip(row.chunks(inner)) {
            *a += lane_sum(plane);
        }
    }
}

simd_dispatch!(bias_sum_row, <>, (acc: &mut [f32], row: &[f32], inner: usize), bias_sum_row_body(acc, row, inner));

/// `x + b` through [`BiasAddOp`] when `b` (of any rank) equals `x` along one run of dims and is 1
/// elsewhere, on the CPU in f32; None otherwise.
pub fn bias_add(x: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let cpu32 = own_kernels_for;
    if !cpu32(x) || !cpu32(b) || b.rank() > x.rank() || b.elem_count() < 2 {
        return Ok(None);
    }
    let off = x.rank() - b.rank();
    let varying: Vec<usize> = (0..b.rank()).filter(|&i| b.dims()[i] != 1).map(|i| i + off).collect();
    let (Some(&s), Some(&e)) = (varying.first(), varying.last()) else { return Ok(None) };
    if (s..=e).any(|i| b.dims()[i - off] != x.dims()[i]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&b.flatten_all()?, BiasAddOp { axes: (s, e + 1) })?))
}

/// `x op c` (`c op x` when `swapped`) for a constant `c` that does not train, with a backward pass for
/// `x` alone: candle's own binary backward also computes a full-size gradient for the constant (an
/// attention mask, a scale), and keeps it until the step ends.
pub struct ConstBinaryOp {
    /// The operation.
    pub op: super::Binary,
    /// The constant side (contiguous, broadcast against `x`).
    pub c: Tensor,
    /// True for `c op x`.
    pub swapped: bool,
}

impl CustomOp1 for ConstBinaryOp {
    fn name(&self) -> &'static str {
        "const-binary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, "binary")?;
        // The constant is read in place (it was made contiguous once, when the op was built).
        let out =
            super::with_data(&self.c, |c| super::binary_data(self.op, x, l.dims(), c, self.c.dims(), self.swapped))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        match out {
            Some(out) => Ok((CpuStorage::F32(out), l.shape().clone())),
            None => candle_core::bail!("binary: {:?} against {:?} does not broadcast here", l.dims(), self.c.dims()),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use super::Binary;
        let scaled = |op: Binary| {
            super::binary(op, dy, &self.c)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .ok_or_else(|| candle_core::Error::Msg("binary backward: layout not handled".into()))
        };
        Ok(Some(match (self.op, self.swapped) {
            (Binary::Add, _) | (Binary::Sub, false) => dy.clone(),
            (Binary::Sub, true) => dy.neg()?,
            (Binary::Mul, _) => scaled(Binary::Mul)?,
            (Binary::Div, false) => scaled(Binary::Div)?,
            (Binary::Div, true) => candle_core::bail!("const / x has no backward pass here"),
        }))
    }
}

/// `x op c` through [`ConstBinaryOp`] when `x` trains, `c` does not, `x` is the whole side and `c`
/// broadcasts along one run of dims (CPU, f32); None otherwise (`c / x` included).
pub fn const_binary(op: super::Binary, x: &Tensor, c: &Tensor, swapped: bool) -> candle_core::Result<Option<Tensor>> {
    let cpu32 = own_kernels_for;
    let fits = super::broadcast_run(x.dims(), c.dims()).is_some() || super::hole_run(x.dims(), c.dims()).is_some();
    if !x.track_op() || c.track_op() || !cpu32(x) || !cpu32(c) || x.elem_count() < c.elem_count() || !fits {
        return Ok(None);
    }
    if matches!((op, swapped), (super::Binary::Div, true)) {
        return Ok(None);
    }
    let op = ConstBinaryOp { op, c: c.contiguous()?, swapped };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// A matrix product for training: forward and both backward products on our batched gemm over strided
/// views (the weight's Transpose is read in place, batched attention products run one gemm per matrix in
/// parallel), instead of candle's broadcast matmul. `b` is a matrix (a linear layer) or has `a`'s batch
/// dims exactly.
pub struct MatMulOp;

fn storage_f32<'a>(s: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("{what}: expected f32"),
    }
}

fn product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    super::matmul(a, b)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .ok_or_else(|| candle_core::Error::Msg("matmul backward: layout not handled".into()))
}

impl CustomOp2 for MatMulOp {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (storage_f32(s1, "matmul")?, storage_f32(s2, "matmul")?);
        match super::matmul_layouts(a, l1, b, l2, None) {
            Some((Ok(out), dims)) => Ok((CpuStorage::F32(out), Shape::from(dims))),
            Some((Err(e), _)) => Err(candle_core::Error::Msg(e.to_string())),
            None => candle_core::bail!("matmul: {:?} x {:?} not handled", l1.dims(), l2.dims()),
        }
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (ra, rb) = (a.rank(), b.rank());
        let da = product(dy, &b.transpose(rb - 2, rb - 1)?)?;
        let db = if rb == 2 && ra > 2 {
            // A linear layer: all rows of a against all rows of dy, one tall product.
            let k = a.dims()[ra - 1];
            let n = dy.dims()[dy.rank() - 1];
            let a2 = a.contiguous()?.reshape(((), k))?;
            let dy2 = dy.contiguous()?.reshape(((), n))?;
            product(&a2.t()?, &dy2)?
        } else {
            product(&a.transpose(ra - 2, ra - 1)?, dy)?
        };
        Ok((Some(da), Some(db)))
    }
}

/// `a @ b` through [`MatMulOp`] when a side trains, both are CPU f32 of rank >= 2, and `b` is a matrix or
/// has exactly `a`'s batch dims; None otherwise.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let cpu32 = own_kernels_for;
    let (ra, rb) = (a.rank(), b.rank());
    let shapes = ra >= 2 && (rb == 2 || (ra == rb && a.dims()[..ra - 2] == b.dims()[..rb - 2]));
    if !(a.track_op() || b.track_op()) || !cpu32(a) || !cpu32(b) || !shapes || a.dims()[ra - 1] != b.dims()[rb - 2] {
        return Ok(None);
    }
    Ok(Some(a.apply_op2(b, MatMulOp)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seq(n: usize, scale: f32, shift: usize) -> Vec<f32> {
        (0..n).map(|i| (((i + shift) * 7919 % 101) as f32 / 50.0 - 1.0) * scale).collect()
    }

    /// d sum(f(x) * r) / dx by the op's backward vs central differences (in f64 on the f32 op).
    fn check_grad(name: &str, f: &dyn Fn(&Tensor) -> Tensor, x: &[f32], dims: &[usize], got: &[f32], tol: f32) {
        let dev = Device::Cpu;
        let r = Tensor::from_vec(seq(x.len(), 1.0, 3), dims, &dev).unwrap();
        let loss = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), dims, &dev).unwrap();
            f(&t).mul(&r).unwrap().sum_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_scalar().unwrap()
        };
        let h = 1e-2f32;
        for i in (0..x.len()).step_by(7) {
            let (mut a, mut b) = (x.to_vec(), x.to_vec());
            a[i] += h;
            b[i] -= h;
            let fd = ((loss(&a) - loss(&b)) / (2.0 * h as f64)) as f32;
            assert!(
                (fd - got[i]).abs() <= tol * (1.0 + fd.abs()),
                "{name}[{i}]: backward {} vs differences {fd}",
                got[i]
            );
        }
    }

    fn grads_of(op: &dyn Fn(&Tensor) -> Tensor, x: &Var, r: &Tensor) -> candle_core::backprop::GradStore {
        op(x.as_tensor()).mul(r).unwrap().sum_all().unwrap().backward().unwrap()
    }

    #[test]
    fn layer_norm_backward_matches_central_differences_and_composed_ops() {
        let (dev, dims) = (Device::Cpu, [6usize, 20]);
        let xv = seq(120, 2.0, 0);
        let x = Var::from_vec(xv.clone(), &dims[..], &dev).unwrap();
        let g = Var::from_vec(seq(20, 1.5, 5), 20, &dev).unwrap();
        let b = Var::from_vec(seq(20, 0.5, 9), 20, &dev).unwrap();
        let r = Tensor::from_vec(seq(120, 1.0, 3), &dims[..], &dev).unwrap();
        let ours = x.apply_op3(g.as_tensor(), b.as_tensor(), LayerNormOp { eps: 1e-5 }).unwrap();
        let gs = ours.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        // The same LayerNorm from candle's differentiable basic ops.
        let xt = x.as_tensor();
        let xc = xt.broadcast_sub(&xt.mean_keepdim(1).unwrap()).unwrap();
        let inv = (xc.sqr().unwrap().mean_keepdim(1).unwrap() + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
        let theirs =
            xc.broadcast_mul(&inv).unwrap().broadcast_mul(g.as_tensor()).unwrap().broadcast_add(b.as_tensor()).unwrap();
        let gt = theirs.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        assert!(diff(&ours, &theirs).to_scalar::<f32>().unwrap() < 1e-5);
        for v in [&x, &g, &b] {
            let d = diff(gs.get(v).unwrap(), gt.get(v).unwrap()).to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "gradient differs from the composed ops by {d}");
        }
        let (gv, bv) = (g.as_tensor().clone(), b.as_tensor().clone());
        let f = |t: &Tensor| t.apply_op3_no_bwd(&gv, &bv, &LayerNormOp { eps: 1e-5 }).unwrap();
        let got = gs.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        check_grad("layer norm dx", &f, &xv, &dims, &got, 2e-2);
    }

    #[test]
    fn softmax_and_gelu_backward_match_central_differences() {
        let (dev, dims) = (Device::Cpu, [5usize, 49]);
        let xv = seq(245, 3.0, 1);
        let r = Tensor::from_vec(seq(245, 1.0, 3), &dims[..], &dev).unwrap();
        type Op<'a> = &'a dyn Fn(&Tensor) -> Tensor;
        let ops: [(&str, Op, Op); 2] = [
            ("softmax", &|t| t.apply_op1(SoftmaxOp).unwrap(), &|t| candle_nn::ops::softmax_last_dim(t).unwrap()),
            ("gelu", &|t| t.apply_op1(GeluOp).unwrap(), &|t| t.gelu_erf().unwrap()),
        ];
        for (name, op, reference) in ops {
            let x = Var::from_vec(xv.clone(), &dims[..], &dev).unwrap();
            let d = (op(x.as_tensor()) - reference(x.as_tensor())).unwrap().abs().unwrap();
            assert!(d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5, "{name} forward");
            let got = grads_of(op, &x, &r).get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            check_grad(name, &|t| op(t), &xv, &dims, &got, 2e-2);
        }
    }

    #[test]
    fn bias_add_matches_candle_broadcast_forward_and_backward() {
        let dev = Device::Cpu;
        // A conv's per-channel bias [1, C, 1, 1] on NCHW, and a linear bias row [D] on [B, L, D].
        // ... and a relative-position bias [1, heads, N, N] on [windows, heads, N, N].
        for (xd, bd) in [
            (vec![3usize, 5, 4, 6], vec![1usize, 5, 1, 1]),
            (vec![2, 7, 9], vec![9]),
            (vec![4, 2, 5, 5], vec![1, 2, 5, 5]),
        ] {
            let n: usize = xd.iter().product();
            let x = Var::from_vec(seq(n, 1.0, 2), xd.as_slice(), &dev).unwrap();
            let b = Var::from_vec(seq(bd.iter().product(), 0.5, 4), bd.as_slice(), &dev).unwrap();
            let r = Tensor::from_vec(seq(n, 1.0, 3), xd.as_slice(), &dev).unwrap();
            let ours = bias_add(x.as_tensor(), b.as_tensor()).unwrap().expect("a bias along one dim");
            let theirs = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
            let (go, gt) = (grads_of(&|_| ours.clone(), &x, &r), grads_of(&|_| theirs.clone(), &x, &r));
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(diff(&ours, &theirs) == 0.0);
            for v in [&x, &b] {
                assert!(diff(go.get(v).unwrap(), gt.get(v).unwrap()) < 1e-4, "{xd:?} + {bd:?}");
            }
        }
        // A broadcast with a hole (per-row and per-column) is not a bias: left to candle.
        let x = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(bias_add(&x, &Tensor::ones((2, 1, 4), candle_core::DType::F32, &dev).unwrap()).unwrap().is_none());
    }

    #[test]
    fn constant_operands_get_no_gradient_and_the_trained_side_the_right_one() {
        let dev = Device::Cpu;
        let (xd, cd) = ([3usize, 4, 5], [1usize, 4, 1]);
        let x = Var::from_vec(seq(60, 1.0, 2), &xd[..], &dev).unwrap();
        let c = Tensor::from_vec(seq(4, 0.5, 7).iter().map(|v| v + 2.0).collect::<Vec<_>>(), &cd[..], &dev).unwrap();
        let r = Tensor::from_vec(seq(60, 1.0, 3), &xd[..], &dev).unwrap();
        use super::super::Binary;
        for (op, swapped) in [(Binary::Add, false), (Binary::Sub, true), (Binary::Mul, false), (Binary::Div, false)] {
            let ours = const_binary(op, x.as_tensor(), &c, swapped).unwrap().expect("handled");
            let xt = x.as_tensor();
            let theirs = match (op, swapped) {
                (Binary::Add, _) => xt.broadcast_add(&c),
                (Binary::Sub, _) => c.broadcast_sub(xt),
                (Binary::Mul, _) => xt.broadcast_mul(&c),
                _ => xt.broadcast_div(&c),
            }
            .unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(diff(&ours, &theirs) < 1e-6, "{op:?} forward");
            let (go, gt) = (grads_of(&|_| ours.clone(), &x, &r), grads_of(&|_| theirs.clone(), &x, &r));
            assert!(diff(go.get(&x).unwrap(), gt.get(&x).unwrap()) < 1e-5, "{op:?} gradient");
            assert!(go.get(&c).is_none(), "{op:?}: the constant got a gradient");
        }
        assert!(const_binary(Binary::Div, x.as_tensor(), &c, true).unwrap().is_none());
    }

    #[test]
    fn matmul_forward_and_gradients_match_candle_for_linear_and_batched_products() {
        let dev = Device::Cpu;
        // A linear layer whose weight is a transposed view (as exporters write it), and a batched product.
        let cases: [(Vec<usize>, Vec<usize>, bool); 2] =
            [(vec![2, 5, 6], vec![4, 6], true), (vec![3, 2, 5, 4], vec![3, 2, 4, 7], false)];
        for (ad, bd, transposed) in cases {
            let a = Var::from_vec(seq(ad.iter().product(), 1.0, 1), ad.as_slice(), &dev).unwrap();
            let b = Var::from_vec(seq(bd.iter().product(), 0.7, 5), bd.as_slice(), &dev).unwrap();
            let bt = if transposed { b.as_tensor().t().unwrap() } else { b.as_tensor().clone() };
            let ours = matmul(a.as_tensor(), &bt).unwrap().expect("handled");
            let theirs = a.as_tensor().broadcast_matmul(&bt.contiguous().unwrap()).unwrap();
            let r = Tensor::from_vec(seq(theirs.elem_count(), 1.0, 3), theirs.dims(), &dev).unwrap();
            let diff = |x: &Tensor, y: &Tensor| {
                (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(diff(&ours, &theirs) < 1e-5, "{ad:?} x {bd:?} forward");
            let (go, gt) = (grads_of(&|_| ours.clone(), &a, &r), grads_of(&|_| theirs.clone(), &a, &r));
            for v in [&a, &b] {
                assert!(diff(go.get(v).unwrap(), gt.get(v).unwrap()) < 1e-4, "{ad:?} x {bd:?} gradient");
            }
        }
    }
}
