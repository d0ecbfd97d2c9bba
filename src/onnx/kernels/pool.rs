//! Max and average pooling on NCHW f32 planes for inference (no gradient): one pass over each output
//! cell's window instead of the padded copies and per-offset selections that the differentiable path
//! (`ops::pool`, candle ops) builds. Inception's and PoolFormer's 3x3 stride-1 average pools and every
//! stem's max pool run here.

use std::mem::MaybeUninit;

use candle_core::Tensor;

use super::{par_build, tensor, with_data};
use crate::error::Result;

/// One spatial axis of a pooling window: kernel, stride, dilation, the padding before and after (where
/// an average with `count_include_pad` counts cells), and the output length (which `ceil_mode` may
/// extend past the padding; those cells are never counted).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolAxis {
    /// Kernel.
    pub k: usize,
    /// Stride.
    pub s: usize,
    /// Dilation.
    pub d: usize,
    /// Padding before.
    pub before: usize,
    /// Padding after.
    pub after: usize,
    /// Output length.
    pub out: usize,
}

/// For each output of axis `a` over an input of `len`: how many taps of its window lie in the input
/// (`inside`) and in the input or the explicit padding (`padded`, the count_include_pad divisor).
fn counts(a: PoolAxis, len: usize) -> Vec<(usize, usize)> {
    (0..a.out)
        .map(|o| {
            let pos = (0..a.k).map(|i| (o * a.s + i * a.d) as isize - a.before as isize);
            let inside = pos.clone().filter(|&p| p >= 0 && (p as usize) < len).count();
            (inside, pos.filter(|&p| p < (len + a.after) as isize).count())
        })
        .collect()
}

/// The outputs `[lo, hi)` of axis `a` whose tap `i` reads inside an input of `len`, and that tap's
/// offset: output `q` reads input `q * s + off`.
fn tap_range(a: PoolAxis, i: usize, len: usize) -> (usize, usize, isize) {
    let off = (i * a.d) as isize - a.before as isize;
    let s = a.s as isize;
    let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
    let hi = if len as isize - off <= 0 { 0 } else { ((len as isize - 1 - off) / s + 1).min(a.out as isize) };
    (lo.max(0) as usize, hi.max(lo) as usize, off)
}

/// Folds every tap of axis `a` into `dst` (one value per output): `dst[q] = f(dst[q], src[q * s + off])`,
/// a contiguous loop per tap when the stride is 1.
fn fold_axis(src: &[f32], len: usize, a: PoolAxis, dst: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for i in 0..a.k {
        let (lo, hi, off) = tap_range(a, i, len);
        if a.s == 1 {
            let first = (lo as isize + off) as usize;
            for (d, &v) in dst[lo..hi].iter_mut().zip(&src[first..]) {
                *d = f(*d, v);
            }
        } else {
            for (q, d) in dst.iter_mut().enumerate().take(hi).skip(lo) {
                *d = f(*d, src[((q * a.s) as isize + off) as usize]);
            }
        }
    }
}

/// The reciprocal divisor of every output cell of an average over `ih` x `iw` inputs (see [`pool2d`]).
fn divisors(h: PoolAxis, w: PoolAxis, (ih, iw): (usize, usize), include_pad: bool) -> Vec<f32> {
    let (rows, cols) = (counts(h, ih), counts(w, iw));
    let count = |r: (usize, usize), q: (usize, usize)| if include_pad { r.1 * q.1 } else { r.0 * q.0 };
    rows.iter().flat_map(|&r| cols.iter().map(move |&q| 1.0 / count(r, q).max(1) as f32)).collect()
}

/// [`pool2d`] on channel-blocked `x` (`[N, C/8, H, W, 8]`, see `nchwc`), returning blocked
/// `[N, C/8, oh, ow, 8]`: each output pixel's 8 lanes folded over the window's pixels inside the input.
pub fn pool2d_blocked(x: &Tensor, h: PoolAxis, w: PoolAxis, max: bool, include_pad: bool) -> Result<Tensor> {
    const LANES: usize = super::nchwc::LANES;
    let d = x.dims();
    if d.len() != 5 || d[4] != LANES {
        return Err(candle_core::Error::Msg(format!("expected blocked [n, c/8, h, w, 8], found {d:?}")).into());
    }
    let (planes, ih, iw) = (d[0] * d[1], d[2], d[3]);
    let recip = (!max).then(|| divisors(h, w, (ih, iw), include_pad));
    let plane_out = h.out * w.out * LANES;
    let taps = |a: PoolAxis, o: usize, len: usize| {
        (0..a.k)
            .map(move |i| (o * a.s + i * a.d) as isize - a.before as isize)
            .filter(move |&p| p >= 0 && (p as usize) < len)
    };
    let out = with_data(x, |xs| {
        par_build(planes * plane_out, plane_out, |start, o| {
            for (p, op) in o.chunks_mut(plane_out).enumerate() {
                let src = &xs[(start / plane_out + p) * ih * iw * LANES..][..ih * iw * LANES];
                for (cell, dst) in op.chunks_mut(LANES).enumerate() {
                    let (r, q) = (cell / w.out, cell % w.out);
                    let mut acc = [if max { f32::NEG_INFINITY } else { 0.0 }; LANES];
                    for y in taps(h, r, ih) {
                        for xq in taps(w, q, iw) {
                            let px = &src[(y as usize * iw + xq as usize) * LANES..][..LANES];
                            for (a, &v) in acc.iter_mut().zip(px) {
                                *a = if max { a.max(v) } else { *a + v };
                            }
                        }
                    }
                    let k = recip.as_ref().map_or(1.0, |rc| rc[cell]);
                    for (dv, a) in dst.iter_mut().zip(acc) {
                        dv.write(if max { a } else { a * k });
                    }
                }
            }
        })
    })?;
    tensor(out, &[d[0], d[1], h.out, w.out, LANES])
}

/// MaxPool (`max`) or AveragePool of `x` [N, C, H, W] with windows `h` x `w`; an average divides by the
/// input cells of the window, or by its cells in input and padding when `include_pad`. Separable: each
/// input row is reduced across W, then the reduced rows across H, both as contiguous loops per tap.
pub fn pool2d(x: &Tensor, h: PoolAxis, w: PoolAxis, max: bool, include_pad: bool) -> Result<Tensor> {
    let (n, c, ih, iw) = x.dims4()?;
    let (plane_in, plane_out) = (ih * iw, h.out * w.out);
    // The reciprocal divisor of every output cell of an average.
    let recip: Option<Vec<f32>> = (!max).then(|| divisors(h, w, (ih, iw), include_pad));
    let out = with_data(x, |xs| {
        par_build(n * c * plane_out, plane_out, |start, o| {
            // Scratch reused by every plane of this chunk: W-reduced rows, one output row.
            let (mut across, mut acc) = (vec![0f32; ih * w.out], vec![0f32; w.out]);
            for (p, op) in o.chunks_mut(plane_out).enumerate() {
                let src = &xs[(start / plane_out + p) * plane_in..][..plane_in];
                let scratch = (&mut across[..], &mut acc[..]);
                if max {
                    pool_plane(src, iw, (h, w), scratch, op, None, f32::NEG_INFINITY, f32::max);
                } else {
                    pool_plane(src, iw, (h, w), scratch, op, recip.as_deref(), 0.0, |a, b| a + b);
                }
            }
        })
    })?;
    tensor(out, &[n, c, h.out, w.out])
}

/// One plane: `src` [ih, iw] reduced by `f` across W into `across` [ih, ow], then across H (one row at a
/// time in `acc` [ow]) into `out`, scaled by `recip` (an average) when given.
#[allow(clippy::too_many_arguments)]
fn pool_plane(
    src: &[f32],
    iw: usize,
    (h, w): (PoolAxis, PoolAxis),
    (across, acc): (&mut [f32], &mut [f32]),
    out: &mut [MaybeUninit<f32>],
    recip: Option<&[f32]>,
    init: f32,
    f: impl Fn(f32, f32) -> f32 + Copy,
) {
    let (ow, ih) = (w.out, src.len() / iw.max(1));
    across.fill(init);
    for (row, dst) in src.chunks(iw).zip(across.chunks_mut(ow)) {
        fold_axis(row, iw, w, dst, f);
    }
    for r in 0..h.out {
        acc.fill(init);
        for i in 0..h.k {
            let y = (r * h.s + i * h.d) as isize - h.before as isize;
            if y < 0 || y as usize >= ih {
                continue;
            }
            for (a, &v) in acc.iter_mut().zip(&across[y as usize * ow..(y as usize + 1) * ow]) {
                *a = f(*a, v);
            }
        }
        let dst = &mut out[r * ow..(r + 1) * ow];
        match recip {
            Some(rc) => dst.iter_mut().zip(acc.iter()).zip(&rc[r * ow..]).for_each(|((d, &a), &k)| _ = d.write(a * k)),
            None => dst.iter_mut().zip(acc.iter()).for_each(|(d, &a)| _ = d.write(a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::nchwc::{block, unblock};
    use super::*;

    #[test]
    fn blocked_pooling_equals_nchw_pooling() {
        let (n, c, ih, iw) = (2usize, 16usize, 7usize, 9usize);
        let xs: Vec<f32> = (0..n * c * ih * iw).map(|i| ((i * 7919 % 101) as f32 - 50.0) / 25.0).collect();
        let x = Tensor::from_vec(xs.clone(), (n, c, ih, iw), &candle_core::Device::Cpu).unwrap();
        let xb = Tensor::from_vec(block(&xs, n, c, ih * iw), (n, c / 8, ih, iw, 8), &candle_core::Device::Cpu).unwrap();
        let axis = |k: usize, s: usize, d: usize, before: usize, after: usize, len: usize, ceil: bool| {
            let span = (k - 1) * d + 1;
            let room = len + before + after - span;
            let out = if ceil { room.div_ceil(s) + 1 } else { room / s + 1 };
            PoolAxis { k, s, d, before, after, out }
        };
        // Stem max pool (3x3 s2 pad 1), DenseNet's 2x2 s2 average, PoolFormer's 3x3 s1 pad 1 average, a
        // dilated window, a ceil_mode extension past the padding.
        let cases = [
            (axis(3, 2, 1, 1, 1, ih, false), axis(3, 2, 1, 1, 1, iw, false)),
            (axis(2, 2, 1, 0, 0, ih, false), axis(2, 2, 1, 0, 0, iw, false)),
            (axis(3, 1, 1, 1, 1, ih, false), axis(3, 1, 1, 1, 1, iw, false)),
            (axis(3, 1, 2, 0, 0, ih, false), axis(2, 2, 2, 1, 0, iw, false)),
            (axis(2, 2, 1, 0, 0, ih, true), axis(3, 2, 1, 0, 0, iw, true)),
        ];
        for (h, w) in cases {
            for (max, include) in [(true, false), (false, false), (false, true)] {
                let want = pool2d(&x, h, w, max, include).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = pool2d_blocked(&xb, h, w, max, include).unwrap();
                assert_eq!(got.dims(), &[n, c / 8, h.out, w.out, 8]);
                let got = unblock(&got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), n, c, h.out * w.out);
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 1e-6, "{h:?} {w:?} max {max} include_pad {include}: {diff}");
            }
        }
    }
}
