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

/// MaxPool (`max`) or AveragePool of `x` [N, C, H, W] with windows `h` x `w`; an average divides by the
/// input cells of the window, or by its cells in input and padding when `include_pad`. Separable: each
/// input row is reduced across W, then the reduced rows across H, both as contiguous loops per tap.
pub fn pool2d(x: &Tensor, h: PoolAxis, w: PoolAxis, max: bool, include_pad: bool) -> Result<Tensor> {
    let (n, c, ih, iw) = x.dims4()?;
    let (plane_in, plane_out) = (ih * iw, h.out * w.out);
    // The reciprocal divisor of every output cell of an average.
    let recip: Option<Vec<f32>> = (!max).then(|| {
        let (rows, cols) = (counts(h, ih), counts(w, iw));
        let count = |r: (usize, usize), q: (usize, usize)| if include_pad { r.1 * q.1 } else { r.0 * q.0 };
        rows.iter().flat_map(|&r| cols.iter().map(move |&q| 1.0 / count(r, q).max(1) as f32)).collect()
    });
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
