//! Convolutions on channel-blocked activations ("NCHWc": `[n, c/8, h, w, 8]`, eight channels side by side
//! per pixel), the layout ONNX Runtime switches MobileNet/EfficientNet-style graphs to.
//!
//! In NCHW a 1x1 conv is a gemm whose inner dimension (input channels) is small in the early blocks, and a
//! depthwise conv works on short planes that do not vectorise well. With eight channels per pixel both
//! become register tiles: a 1x1 conv keeps `6 pixels x 16 output channels` in twelve AVX registers and
//! broadcasts one input value per multiply-add row, a depthwise conv multiplies whole 8-channel pixel
//! vectors by 8-channel tap vectors with no gather, for any stride. A dense or grouped KxK conv runs on the
//! 1x1 tiles too, its input blocks being (channel block, tap) pairs at offsets into a zero-padded copy of
//! the input: no im2col matrix. Bias, Relu/Clip and the layout are handled as the tile is stored, so each
//! activation is written once; a fused SiLU/GELU/HardSwish ([`Epilogue`]) runs on each task's outputs
//! right after they are computed, while they are in cache.
//!
//! The tiles use AVX2+FMA intrinsics when the CPU has them and a scalar loop with the same arithmetic
//! otherwise; the 1x1 conv also has AVX-512 tiles (`6 pixels x 64 output channels` in 24 zmm registers),
//! chosen at run time. All are tested against each other on the same inputs.

use std::mem::MaybeUninit;

use rayon::prelude::*;

pub use super::Isa;
use super::{build, ConvGeom};

/// Channels per block.
pub const LANES: usize = 8;
/// Pixels per 1x1-conv tile.
const PW_PIXELS: usize = 6;
/// Output channel blocks per AVX2 1x1-conv tile.
const PW_BLOCKS: usize = 2;
/// Output channels of one packed 1x1 weight panel: two blocks, one zmm register.
const PAIR: usize = 2 * LANES;
/// Output channel blocks per AVX-512 1x1-conv tile (four panels).
const PW_BLOCKS_512: usize = 8;

/// Each `[rows, cols]` plane of `x` (planes one after another) transposed to `[cols, rows]`, in parallel.
fn transpose_planes(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let plane = rows * cols;
    let mut out: Vec<f32> = Vec::with_capacity(x.len());
    if plane == 0 {
        return out;
    }
    out.spare_capacity_mut()[..x.len()].par_chunks_mut(plane).enumerate().for_each(|(p, o)| {
        let src = &x[p * plane..(p + 1) * plane];
        for (j, col) in o.chunks_mut(rows).enumerate() {
            for (i, d) in col.iter_mut().enumerate() {
                d.write(src[i * cols + j]);
            }
        }
    });
    // SAFETY: every element of every plane was written above (x.len() is a whole number of planes).
    unsafe { out.set_len(x.len()) };
    out
}

/// NCHW `[n, c, hw]` to blocked `[n, c/8, hw, 8]` (`c` a multiple of 8).
pub fn block(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    assert!(c.is_multiple_of(LANES) && x.len() == n * c * hw);
    transpose_planes(x, LANES, hw)
}

/// Blocked `[n, c/8, hw, 8]` back to NCHW `[n, c, hw]`.
pub fn unblock(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    assert!(c.is_multiple_of(LANES) && x.len() == n * c * hw);
    transpose_planes(x, hw, LANES)
}

/// 1x1 weights `[m, c]` packed for [`pointwise`]: panels of 16 output channels, `[m/16][c][16]` (the last
/// panel zero-padded when `m` is an odd number of blocks), so one AVX-512 load reads two output blocks'
/// weights for one input channel and an AVX2 tile reads either half.
pub fn pack_pointwise(w: &[f32], m: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), m * c);
    let panels = m.div_ceil(PAIR);
    let mut out = vec![0f32; panels * c * PAIR];
    for (o, row) in w.chunks_exact(c.max(1)).enumerate().take(m) {
        let (q, l) = (o / PAIR, o % PAIR);
        for (k, &v) in row.iter().enumerate() {
            out[(q * c + k) * PAIR + l] = v;
        }
    }
    out
}

/// Dense-conv weights `[m, taps]` packed for [`dense_to_blocked`]: `[m/8][taps][8]` (blocked like an
/// activation).
pub fn pack_dense(w: &[f32], m: usize, taps: usize) -> Vec<f32> {
    block(w, 1, m, taps)
}

/// Depthwise weights `[c, taps]` packed for [`depthwise`]: `[c/8][taps][8]`.
pub fn pack_depthwise(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    block(w, 1, c, taps)
}

/// One tile: `R` pixels x `OB` output channel blocks, summed over every input block. The tile starts at
/// an even output block (a panel boundary of [`pack_pointwise`]). A 1x1 conv's input blocks are its
/// channel blocks; a KxK conv's are every (channel block, tap) pair, each an offset into the (padded)
/// input, so one tile serves both.
#[derive(Clone, Copy)]
struct PwTile {
    /// Input at the tile's first pixel; input block `b` starts `x_offs[b]` floats further.
    x: *const f32,
    x_offs: *const usize,
    /// Floats from one pixel of the tile to the next (8, or 8 x the stride).
    px: usize,
    cblocks: usize,
    /// Packed weights at the tile's first panel (input channel k of block o in it at `o * 8 + k * 16`);
    /// panels `w_panel` apart.
    w: *const f32,
    w_panel: usize,
    bias: *const f32,
    /// Output at (first output block, first pixel); blocks `out_stride` apart.
    out: *mut f32,
    out_stride: usize,
    lo: f32,
    hi: f32,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{DenseRow, DwRow, PwTile, LANES, PAIR};

    /// Clamp that keeps NaN (the operand order of max/min picks the second operand on NaN).
    #[inline(always)]
    unsafe fn clamp(v: __m256, lo: __m256, hi: __m256) -> __m256 {
        _mm256_min_ps(hi, _mm256_max_ps(lo, v))
    }

    #[allow(clippy::needless_range_loop)] // acc is indexed [o][r] inside an r loop: clearer than zips
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pw_tile<const R: usize, const OB: usize>(t: PwTile) {
        let mut acc = [[_mm256_setzero_ps(); R]; OB];
        for (o, row) in acc.iter_mut().enumerate() {
            let b = _mm256_loadu_ps(t.bias.add(o * LANES));
            row.iter_mut().for_each(|a| *a = b);
        }
        for cb in 0..t.cblocks {
            let xp = t.x.add(*t.x_offs.add(cb));
            let wp = t.w.add(cb * LANES * PAIR);
            for k in 0..LANES {
                let mut wv = [_mm256_setzero_ps(); OB];
                for (o, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(wp.add(o * LANES + k * PAIR));
                }
                for r in 0..R {
                    let xv = _mm256_broadcast_ss(&*xp.add(r * t.px + k));
                    for o in 0..OB {
                        acc[o][r] = _mm256_fmadd_ps(wv[o], xv, acc[o][r]);
                    }
                }
            }
        }
        let (lo, hi) = (_mm256_set1_ps(t.lo), _mm256_set1_ps(t.hi));
        for (o, row) in acc.iter().enumerate() {
            for (r, &a) in row.iter().enumerate() {
                _mm256_storeu_ps(t.out.add(o * t.out_stride + r * LANES), clamp(a, lo, hi));
            }
        }
    }

    /// `R` consecutive output pixels of one depthwise row; `CHECK` tests each tap column against the
    /// input width (border pixels), otherwise every tap is known to be inside.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dw_pixels<const R: usize, const CHECK: bool>(d: &DwRow, ox0: usize) {
        let mut acc = [_mm256_loadu_ps(d.bias); R];
        for &(i, row) in &d.rows[..d.nrows] {
            for j in 0..d.kw {
                let wv = _mm256_loadu_ps(d.w.add((i * d.kw + j) * LANES));
                for (r, a) in acc.iter_mut().enumerate() {
                    let ix = ((ox0 + r) * d.sx + j * d.dx) as isize - d.pl as isize;
                    if CHECK && (ix < 0 || ix >= d.width as isize) {
                        continue;
                    }
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(row.offset(ix * LANES as isize)), wv, *a);
                }
            }
        }
        let (lo, hi) = (_mm256_set1_ps(d.lo), _mm256_set1_ps(d.hi));
        for (r, &a) in acc.iter().enumerate() {
            _mm256_storeu_ps(d.out.add((ox0 + r) * LANES), clamp(a, lo, hi));
        }
    }

    /// `R` output pixels x `OB` output blocks of a dense conv row from NCHW input (one broadcast input
    /// value per tap and pixel, one weight vector per tap and block); `CHECK` as in [`dw_pixels`].
    #[allow(clippy::needless_range_loop)] // acc[o][r] inside r and o loops reads more clearly than zips
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dense_pixels<const R: usize, const OB: usize, const CHECK: bool>(
        d: &DenseRow,
        ox0: usize,
        ob0: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); R]; OB];
        for o in 0..OB {
            let b = _mm256_loadu_ps(d.bias.add((ob0 + o) * LANES));
            acc[o] = [b; R];
        }
        for ch in 0..d.c {
            for &(i, row) in &d.rows[..d.nrows] {
                let rowp = row.add(ch * d.plane);
                for j in 0..d.kw {
                    let tap = (ch * d.kh + i) * d.kw + j;
                    let mut wv = [_mm256_setzero_ps(); OB];
                    for o in 0..OB {
                        wv[o] = _mm256_loadu_ps(d.w.add(((ob0 + o) * d.taps + tap) * LANES));
                    }
                    for r in 0..R {
                        let ix = ((ox0 + r) * d.sx + j * d.dx) as isize - d.pl as isize;
                        if CHECK && (ix < 0 || ix >= d.width as isize) {
                            continue;
                        }
                        let xv = _mm256_broadcast_ss(&*rowp.offset(ix));
                        for o in 0..OB {
                            acc[o][r] = _mm256_fmadd_ps(wv[o], xv, acc[o][r]);
                        }
                    }
                }
            }
        }
        let (lo, hi) = (_mm256_set1_ps(d.lo), _mm256_set1_ps(d.hi));
        for o in 0..OB {
            for r in 0..R {
                _mm256_storeu_ps(d.out.add((ob0 + o) * d.block_stride + (ox0 + r) * LANES), clamp(acc[o][r], lo, hi));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{PwTile, LANES, PAIR};

    /// The high eight lanes of `v` (AVX-512F only: no DQ extract).
    #[inline(always)]
    unsafe fn high(v: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
    }

    /// `R` pixels x `P` whole panels (two output blocks each, one zmm register), summed over every
    /// input channel in the AVX2 tile's order (so both give the same bits).
    #[allow(clippy::needless_range_loop)] // acc is indexed [p][r] inside an r loop: clearer than zips
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pw_tile<const R: usize, const P: usize>(t: PwTile) {
        let mut acc = [[_mm512_setzero_ps(); R]; P];
        for (p, row) in acc.iter_mut().enumerate() {
            let b = _mm512_loadu_ps(t.bias.add(p * PAIR));
            row.iter_mut().for_each(|a| *a = b);
        }
        for cb in 0..t.cblocks {
            let xp = t.x.add(*t.x_offs.add(cb));
            let wp = t.w.add(cb * LANES * PAIR);
            for k in 0..LANES {
                let mut wv = [_mm512_setzero_ps(); P];
                for (p, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wp.add(p * t.w_panel + k * PAIR));
                }
                for r in 0..R {
                    let xv = _mm512_set1_ps(*xp.add(r * t.px + k));
                    for p in 0..P {
                        acc[p][r] = _mm512_fmadd_ps(wv[p], xv, acc[p][r]);
                    }
                }
            }
        }
        let (lo, hi) = (_mm512_set1_ps(t.lo), _mm512_set1_ps(t.hi));
        for (p, row) in acc.iter().enumerate() {
            for (r, &a) in row.iter().enumerate() {
                // Clamp that keeps NaN, as the AVX2 tile's.
                let v = _mm512_min_ps(hi, _mm512_max_ps(lo, a));
                _mm256_storeu_ps(t.out.add(2 * p * t.out_stride + r * LANES), _mm512_castps512_ps256(v));
                _mm256_storeu_ps(t.out.add((2 * p + 1) * t.out_stride + r * LANES), high(v));
            }
        }
    }
}

/// The portable form of a 1x1 tile (same sums in the same order, without fused multiply-adds).
unsafe fn pw_tile_scalar(t: PwTile, r_n: usize, ob_n: usize) {
    for o in 0..ob_n {
        for r in 0..r_n {
            let mut acc = [0f32; LANES];
            for (l, a) in acc.iter_mut().enumerate() {
                *a = *t.bias.add(o * LANES + l);
            }
            for cb in 0..t.cblocks {
                for k in 0..LANES {
                    let xv = *t.x.add(*t.x_offs.add(cb) + r * t.px + k);
                    let wp = t.w.add(o * LANES + (cb * LANES + k) * PAIR);
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a += *wp.add(l) * xv;
                    }
                }
            }
            for (l, a) in acc.iter().enumerate() {
                *t.out.add(o * t.out_stride + r * LANES + l) = clamp1(*a, t.lo, t.hi);
            }
        }
    }
}

/// Clamp that keeps NaN, as the vector form does.
#[inline(always)]
fn clamp1(v: f32, lo: f32, hi: f32) -> f32 {
    if v < lo {
        lo
    } else if v > hi {
        hi
    } else {
        v
    }
}

/// Whether the AVX2+FMA tiles run (checked once per call of the drivers below).
fn use_avx2(portable: bool) -> bool {
    Isa::detect(portable) >= Isa::Avx2
}

/// `$k::<R, $p>($t)` for the tile's pixel count `$r` (1..=6).
macro_rules! by_pixels {
    ($k:ident, $r:expr, $p:literal, $t:expr) => {
        match $r {
            6 => $k::<6, $p>($t),
            5 => $k::<5, $p>($t),
            4 => $k::<4, $p>($t),
            3 => $k::<3, $p>($t),
            2 => $k::<2, $p>($t),
            _ => $k::<1, $p>($t),
        }
    };
}

/// Runs one tile of `r` pixels x `ob` blocks (`r` <= 6; `ob` <= 2, or <= 8 with AVX-512: whole panels in
/// zmm tiles, an odd last block on the AVX2 tile).
///
/// # Safety
/// The tile's pointers must cover `r` pixels x `ob` blocks of input, weights and output, and `isa` must
/// be one this CPU runs.
unsafe fn pw_run(t: PwTile, r: usize, ob: usize, isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    {
        use avx2::pw_tile as k2;
        use avx512::pw_tile as k512;
        match isa {
            Isa::Avx512 => {
                let panels = ob / 2;
                match panels {
                    0 => {}
                    1 => by_pixels!(k512, r, 1, t),
                    2 => by_pixels!(k512, r, 2, t),
                    3 => by_pixels!(k512, r, 3, t),
                    _ => by_pixels!(k512, r, 4, t),
                }
                if ob % 2 == 1 {
                    let last = PwTile {
                        w: t.w.add(panels * t.w_panel),
                        bias: t.bias.add(panels * PAIR),
                        out: t.out.add(2 * panels * t.out_stride),
                        ..t
                    };
                    by_pixels!(k2, r, 1, last)
                }
                return;
            }
            Isa::Avx2 if ob >= 2 => return by_pixels!(k2, r, 2, t),
            Isa::Avx2 => return by_pixels!(k2, r, 1, t),
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    pw_tile_scalar(t, r, ob)
}

/// Pixels in the next 1x1 tile when `left` remain: full tiles, but a short tail (1 or 2 pixels, whose
/// few accumulators would wait on latency) is merged with the tile before it and split in two.
fn pixel_tile(left: usize) -> usize {
    match left {
        7 | 8 => left / 2,
        _ => left.min(PW_PIXELS),
    }
}

/// A fused activation a conv runs on each task's outputs right after computing them (while they are in
/// cache), after the bounds of [`Act`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Epilogue {
    /// Nothing.
    #[default]
    None,
    /// SiLU, `x / (1 + e^-x)` (a fused Mul(x, Sigmoid(x))).
    Silu,
    /// The erf GELU (a fused Div -> Erf -> Add -> Mul -> Mul chain).
    Gelu,
    /// HardSwish, `x * clamp(x / 6 + 1/2, 0, 1)` (MobileNetV3, LeViT).
    HardSwish,
}

impl Epilogue {
    /// Applies it to `o` in place, on this thread.
    pub fn apply(self, o: &mut [f32]) {
        match self {
            Epilogue::None => {}
            Epilogue::Silu => super::silu_in_place(o),
            Epilogue::Gelu => super::gelu_in_place(o),
            Epilogue::HardSwish => super::hard_swish_in_place(o),
        }
    }
}

/// The activation applied to outputs as they are computed: bounds applied as they are stored (a fused
/// Relu/Clip; (-inf, inf) for none), then the epilogue.
#[derive(Clone, Copy, Debug)]
pub struct Act {
    /// Lower bound.
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
    /// What runs after the bounds.
    pub epilogue: Epilogue,
}

impl Act {
    /// No activation.
    pub const NONE: Act = Act { lo: f32::NEG_INFINITY, hi: f32::INFINITY, epilogue: Epilogue::None };
    /// SiLU alone.
    pub const SILU: Act = Act { epilogue: Epilogue::Silu, ..Act::NONE };
    /// GELU alone.
    pub const GELU: Act = Act { epilogue: Epilogue::Gelu, ..Act::NONE };

    /// Clamping to [lo, hi].
    pub fn clamp(lo: f32, hi: f32) -> Act {
        Act { lo, hi, epilogue: Epilogue::None }
    }

    /// The epilogue on `len` outputs from `p`.
    ///
    /// # Safety
    /// `p..p + len` must be written outputs that no other thread touches meanwhile.
    unsafe fn epilogue(self, p: *mut f32, len: usize) {
        if self.epilogue != Epilogue::None {
            self.epilogue.apply(std::slice::from_raw_parts_mut(p, len));
        }
    }
}

/// A 1x1 stride-1 convolution on blocked input `x` (`[n, c/8, hw, 8]`) with packed weights `w`
/// ([`pack_pointwise`] of `[m, c]`) and `bias` (`m`), returning blocked `[n, m/8, hw, 8]`.
/// `portable` forces the scalar tiles (tests).
#[allow(clippy::too_many_arguments)]
pub fn pointwise(
    x: &[f32],
    dims: (usize, usize, usize),
    w: &[f32],
    bias: &[f32],
    m: usize,
    act: Act,
    portable: bool,
) -> Vec<f32> {
    pointwise_with(x, dims, w, bias, m, act, Isa::detect(portable))
}

/// [`pointwise`] on the tiles of `isa` (capped at what this CPU runs): tests and benchmarks compare them.
#[allow(clippy::too_many_arguments)]
pub fn pointwise_with(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    w: &[f32],
    bias: &[f32],
    m: usize,
    act: Act,
    isa: Isa,
) -> Vec<f32> {
    assert!(c.is_multiple_of(LANES) && m.is_multiple_of(LANES));
    assert!(x.len() == n * c * hw && w.len() == m.div_ceil(PAIR) * c * PAIR && bias.len() == m);
    if n * hw == 0 {
        return Vec::new();
    }
    let isa = isa.min(Isa::detect(false));
    let step = if isa == Isa::Avx512 { PW_BLOCKS_512 } else { PW_BLOCKS };
    let (cb, mb) = (c / LANES, m / LANES);
    // A chunk of pixels whose input (all channels) stays in L2 while every output block is computed.
    let chunk = ((64 * 1024 / c.max(1)) / PW_PIXELS).max(1) * PW_PIXELS;
    let chunks = hw.div_ceil(chunk);
    // Split the output channels too when images x chunks would leave threads idle, in whole tiles (a
    // narrower tile has too few accumulators to hide the multiply-add latency).
    let want = 4 * rayon::current_num_threads();
    let groups = want.div_ceil(n * chunks).clamp(1, mb.div_ceil(step));
    let per_group = mb.div_ceil(groups).div_ceil(step) * step;
    let groups = mb.div_ceil(per_group);
    // Still too few tasks to balance the threads (one small image, few output tiles): smaller pixel
    // chunks, in whole pixel tiles.
    let (chunk, chunks) = if n * chunks * groups < want {
        let c2 = hw.div_ceil(want.div_ceil(n * groups)).div_ceil(PW_PIXELS).max(1) * PW_PIXELS;
        let c2 = c2.min(chunk);
        (c2, hw.div_ceil(c2))
    } else {
        (chunk, chunks)
    };
    let offs: Vec<usize> = (0..cb).map(|b| b * hw * LANES).collect();
    build(n * m * hw, |out| {
        (0..n * chunks * groups).into_par_iter().for_each(|task| {
            let (img, rest) = (task / (chunks * groups), task % (chunks * groups));
            let (ch, g) = (rest / groups, rest % groups);
            let (p0, p1) = (ch * chunk, ((ch + 1) * chunk).min(hw));
            let (o0, o1) = (g * per_group, ((g + 1) * per_group).min(mb));
            let xi = x[img * c * hw..].as_ptr();
            for ob in (o0..o1).step_by(step) {
                let obn = step.min(o1 - ob);
                let mut p = p0;
                while p < p1 {
                    let r = pixel_tile(p1 - p);
                    // SAFETY: (img, blocks ob..ob+obn, pixels p..p+r) lie inside `x`, `w`, `bias` and the
                    // output (`ob` is even: a panel start); tasks cover disjoint (img, pixel chunk, block
                    // group) parts of the output, and together all of it; `isa` is capped above.
                    unsafe {
                        let t = PwTile {
                            x: xi.add(p * LANES),
                            x_offs: offs.as_ptr(),
                            px: LANES,
                            cblocks: cb,
                            w: w.as_ptr().add(ob / 2 * c * PAIR),
                            w_panel: c * PAIR,
                            bias: bias.as_ptr().add(ob * LANES),
                            out: out.at((img * mb + ob) * hw * LANES + p * LANES),
                            out_stride: hw * LANES,
                            lo: act.lo,
                            hi: act.hi,
                        };
                        pw_run(t, r, obn, isa);
                    }
                    p += r;
                }
                for b in ob..ob + obn {
                    // SAFETY: this task's pixels p0..p1 of block b, all written just above.
                    unsafe { act.epilogue(out.at((img * mb + b) * hw * LANES + p0 * LANES), (p1 - p0) * LANES) };
                }
            }
        });
    })
}

/// Dense or grouped KxK weights `[m, c/groups, kh, kw]` packed for [`dense_blocked`]: per group,
/// [`pack_pointwise`] of its weights with their input channels reordered as (channel block, tap row, tap
/// column, lane), the order in which the tile walks its input blocks.
pub fn pack_dense_blocked(w: &[f32], (m, groups): (usize, usize), cg: usize, (kh, kw): (usize, usize)) -> Vec<f32> {
    let (taps, mg) = (kh * kw, m / groups.max(1));
    assert!(cg.is_multiple_of(LANES) && mg * groups == m && w.len() == m * cg * taps);
    let mut r = vec![0f32; w.len()];
    for o in 0..m {
        for ch in 0..cg {
            for t in 0..taps {
                r[o * cg * taps + ((ch / LANES) * taps + t) * LANES + ch % LANES] = w[(o * cg + ch) * taps + t];
            }
        }
    }
    r.chunks(mg * cg * taps).flat_map(|wg| pack_pointwise(wg, mg, cg * taps)).collect()
}

/// `planes` blocked planes `[h, w, 8]` inside a zero border of `pads` (top, left, bottom, right).
fn pad_blocked(x: &[f32], planes: usize, (h, w): (usize, usize), pads: [usize; 4]) -> Vec<f32> {
    let (hp, wp) = (h + pads[0] + pads[2], w + pads[1] + pads[3]);
    let mut out = vec![0f32; planes * hp * wp * LANES];
    out.par_chunks_mut(hp * wp * LANES).zip(x.par_chunks(h * w * LANES)).for_each(|(o, xi)| {
        for (y, row) in xi.chunks(w * LANES).enumerate() {
            let start = ((y + pads[0]) * wp + pads[1]) * LANES;
            o[start..start + w * LANES].copy_from_slice(row);
        }
    });
    out
}

/// A dense or grouped convolution of any kernel size, stride, dilation and padding on blocked input `x`
/// (`[n, c/8, h, w, 8]`) with packed weights `w` ([`pack_dense_blocked`], one after another per group)
/// and `bias` (`m`), returning blocked `[n, m/8, oh, ow, 8]`: the 1x1 tiles over (channel block, tap)
/// input blocks read from a zero-padded copy of the input, a row of output pixels per task. Each group's
/// input and output channels are whole blocks. On the tiles of `isa` (capped at what this CPU runs).
#[allow(clippy::too_many_arguments)]
pub fn dense_blocked(
    x: &[f32],
    (n, c, h, wd): (usize, usize, usize, usize),
    w: &[f32],
    bias: &[f32],
    (m, groups): (usize, usize),
    g: ConvGeom,
    act: Act,
    isa: Isa,
) -> Vec<f32> {
    let (kh, kw) = g.k;
    let (cg, mg) = (c / groups.max(1), m / groups.max(1));
    let vc = cg * kh * kw;
    assert!(cg.is_multiple_of(LANES) && mg.is_multiple_of(LANES) && cg * groups == c && mg * groups == m);
    assert!(x.len() == n * c * h * wd && w.len() == groups * mg.div_ceil(PAIR) * vc * PAIR && bias.len() == m);
    let (oh, ow) = g.out_size(h, wd);
    if n * m * oh * ow == 0 {
        return Vec::new();
    }
    let isa = isa.min(Isa::detect(false));
    let (cgb, mgb, mb) = (cg / LANES, mg / LANES, m / LANES);
    let (hp, wp) = (h + g.pads[0] + g.pads[2], wd + g.pads[1] + g.pads[3]);
    let padded;
    let xs: &[f32] = if g.pads == [0; 4] {
        x
    } else {
        padded = pad_blocked(x, n * c / LANES, (h, wd), g.pads);
        &padded
    };
    let plane = hp * wp * LANES;
    let offs: Vec<usize> = (0..cgb)
        .flat_map(|b| (0..kh).flat_map(move |i| (0..kw).map(move |j| (b, i, j))))
        .map(|(b, i, j)| b * plane + (i * g.d.0 * wp + j * g.d.1) * LANES)
        .collect();
    // AVX-512 tiles for four or more blocks; a group of two blocks has more accumulators on AVX2.
    let isa = if isa == Isa::Avx512 && mgb <= PW_BLOCKS { Isa::Avx2 } else { isa };
    let step = if isa == Isa::Avx512 { PW_BLOCKS_512 } else { PW_BLOCKS };
    let rows = n * oh;
    // Tasks: (output row, group, slice of the group's output blocks in whole tiles).
    let want = 4 * rayon::current_num_threads();
    let splits = want.div_ceil(rows * groups).clamp(1, mgb.div_ceil(step));
    let per_split = mgb.div_ceil(splits).div_ceil(step) * step;
    let splits = mgb.div_ceil(per_split);
    let w_group = mg.div_ceil(PAIR) * vc * PAIR;
    build(n * m * oh * ow, |out| {
        (0..rows * groups * splits).into_par_iter().for_each(|task| {
            let (row, unit) = (task / (groups * splits), task % (groups * splits));
            let (gi, sp) = (unit / splits, unit % splits);
            let (img, oy) = (row / oh, row % oh);
            let (o0, o1) = (sp * per_split, ((sp + 1) * per_split).min(mgb));
            let xrow = xs[(img * c / LANES + gi * cgb) * plane + oy * g.s.0 * wp * LANES..].as_ptr();
            for ob in (o0..o1).step_by(step) {
                let mut ox = 0;
                let obg = gi * mgb + ob;
                while ox < ow {
                    let r = pixel_tile(ow - ox);
                    // SAFETY: every tap of pixels ox..ox+r of row oy lies inside the padded image `img`'s
                    // blocks of group gi (out_size bounds the last window by the padded extent); blocks
                    // ob..ob+step of the group's weights, bias and output exist (`ob` even: a panel
                    // start); tasks write disjoint (image, row, group, block slice) parts of the output
                    // and together all of it.
                    unsafe {
                        let t = PwTile {
                            x: xrow.add(ox * g.s.1 * LANES),
                            x_offs: offs.as_ptr(),
                            px: g.s.1 * LANES,
                            cblocks: offs.len(),
                            w: w.as_ptr().add(gi * w_group + ob / 2 * vc * PAIR),
                            w_panel: vc * PAIR,
                            bias: bias.as_ptr().add(obg * LANES),
                            out: out.at(((img * mb + obg) * oh + oy) * ow * LANES + ox * LANES),
                            out_stride: oh * ow * LANES,
                            lo: act.lo,
                            hi: act.hi,
                        };
                        pw_run(t, r, step.min(o1 - ob), isa);
                    }
                    ox += r;
                }
                for b in obg..obg + step.min(o1 - ob) {
                    // SAFETY: this task's output row oy of block b, all written just above.
                    unsafe { act.epilogue(out.at(((img * mb + b) * oh + oy) * ow * LANES), ow * LANES) };
                }
            }
        });
    })
}

/// `x * a[ch] + b[ch]` per channel on blocked `[n, c/8, hw, 8]` data: an inference BatchNormalization
/// (`a = scale / sqrt(var + eps)`, `b = bias - mean * a`) that keeps its input's layout.
pub fn channel_affine(x: &[f32], (n, c, hw): (usize, usize, usize), a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(c.is_multiple_of(LANES) && x.len() == n * c * hw && a.len() == c && b.len() == c);
    let plane = hw * LANES;
    let mut out = vec![0f32; x.len()];
    if plane == 0 {
        return out;
    }
    out.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(p, (o, xi))| {
        let cb = p % (c / LANES);
        let (av, bv) = (&a[cb * LANES..(cb + 1) * LANES], &b[cb * LANES..(cb + 1) * LANES]);
        for (op, xp) in o.chunks_exact_mut(LANES).zip(xi.chunks_exact(LANES)) {
            for l in 0..LANES {
                op[l] = xp[l] * av[l] + bv[l];
            }
        }
    });
    out
}

/// One output row of a depthwise plane: the input rows its taps read (tap row index, row start).
struct DwRow {
    rows: [(usize, *const f32); 16],
    nrows: usize,
    kw: usize,
    width: usize,
    sx: usize,
    dx: usize,
    pl: usize,
    w: *const f32,
    bias: *const f32,
    out: *mut f32,
    lo: f32,
    hi: f32,
}

/// The portable form of [`avx2::dw_pixels`] (`check` tests tap columns against the input width).
unsafe fn dw_pixels_scalar(d: &DwRow, ox0: usize, r_n: usize) {
    for r in 0..r_n {
        let mut acc = [0f32; LANES];
        for (l, a) in acc.iter_mut().enumerate() {
            *a = *d.bias.add(l);
        }
        for &(i, row) in &d.rows[..d.nrows] {
            for j in 0..d.kw {
                let ix = ((ox0 + r) * d.sx + j * d.dx) as isize - d.pl as isize;
                if ix < 0 || ix >= d.width as isize {
                    continue;
                }
                let xp = row.offset(ix * LANES as isize);
                let wp = d.w.add((i * d.kw + j) * LANES);
                for (l, a) in acc.iter_mut().enumerate() {
                    *a += *xp.add(l) * *wp.add(l);
                }
            }
        }
        for (l, a) in acc.iter().enumerate() {
            *d.out.add((ox0 + r) * LANES + l) = clamp1(*a, d.lo, d.hi);
        }
    }
}

/// Output columns `first..last` whose taps all fall inside an input row of `wd` (the rest are borders);
/// `(ow, ow)` when there are none.
fn interior(g: ConvGeom, wd: usize, ow: usize) -> (usize, usize) {
    let ((_, kw), (_, sx), (_, dx), pl) = (g.k, g.s, g.d, g.pads[1]);
    let first = pl.div_ceil(sx).min(ow);
    let last = if wd + pl > (kw - 1) * dx { ((wd + pl - (kw - 1) * dx - 1) / sx + 1).min(ow) } else { 0 };
    if last > first {
        (first, last)
    } else {
        (ow, ow)
    }
}

/// The kernel rows that output row `oy` reads inside an input of `h` rows: (tap row, `row(input row)`).
fn tap_rows(g: ConvGeom, oy: usize, h: usize, row: impl Fn(usize) -> *const f32) -> ([(usize, *const f32); 16], usize) {
    let mut rows = [(0usize, std::ptr::null::<f32>()); 16];
    let mut nrows = 0;
    for i in 0..g.k.0 {
        let iy = (oy * g.s.0 + i * g.d.0) as isize - g.pads[0] as isize;
        if iy >= 0 && (iy as usize) < h {
            rows[nrows] = (i, row(iy as usize));
            nrows += 1;
        }
    }
    (rows, nrows)
}

/// A depthwise convolution on blocked input `x` (`[n, c/8, h, w, 8]`) with packed weights `k`
/// ([`pack_depthwise`]) and `bias` (`c`), returning blocked `[n, c/8, oh, ow, 8]`. Kernels up to 16 rows.
#[allow(clippy::too_many_arguments)]
pub fn depthwise(
    x: &[f32],
    (n, c, h, wd): (usize, usize, usize, usize),
    k: &[f32],
    bias: &[f32],
    g: ConvGeom,
    act: Act,
    portable: bool,
) -> Vec<f32> {
    let (kh, kw) = g.k;
    assert!(
        c.is_multiple_of(LANES) && kh <= 16 && x.len() == n * c * h * wd && k.len() == c * kh * kw && bias.len() == c
    );
    let simd = use_avx2(portable);
    let (oh, ow) = g.out_size(h, wd);
    let (sx, dx, pl) = (g.s.1, g.d.1, g.pads[1]);
    // Output columns whose taps all fall inside the input width.
    let (first, last) = interior(g, wd, ow);
    let planes = n * c / LANES;
    let mut out: Vec<f32> = Vec::with_capacity(planes * oh * ow * LANES);
    out.spare_capacity_mut().par_chunks_mut(oh * ow * LANES).enumerate().for_each(|(plane, o)| {
        let cb = plane % (c / LANES);
        let src = &x[plane * h * wd * LANES..(plane + 1) * h * wd * LANES];
        let o: &mut [MaybeUninit<f32>] = o;
        for oy in 0..oh {
            let (rows, nrows) = tap_rows(g, oy, h, |iy| src[iy * wd * LANES..].as_ptr());
            let d = DwRow {
                rows,
                nrows,
                kw,
                width: wd,
                sx,
                dx,
                pl,
                w: k[cb * kh * kw * LANES..].as_ptr(),
                bias: bias[cb * LANES..].as_ptr(),
                out: o[oy * ow * LANES..].as_mut_ptr() as *mut f32,
                lo: act.lo,
                hi: act.hi,
            };
            // SAFETY: every tap read is inside `src` (rows checked above, columns checked on the borders
            // and known inside for first..last); writes are the pixels of this output row.
            unsafe {
                dw_row(&d, ow, first, last, simd);
                act.epilogue(d.out, ow * LANES);
            }
        }
    });
    // SAFETY: each plane's rows were all written (every output column of every row).
    unsafe { out.set_len(planes * oh * ow * LANES) };
    out
}

/// Every pixel of one depthwise output row: checked tiles on the borders, unchecked ones inside.
unsafe fn dw_row(d: &DwRow, ow: usize, first: usize, last: usize, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        dw_span(d, 0, first, true);
        dw_span(d, first, last, false);
        dw_span(d, last, ow, true);
        return;
    }
    let _ = (first, last, simd);
    dw_pixels_scalar(d, 0, ow);
}

/// Output pixels `from..to` of a row in tiles of 8, 4, 2 and 1: several independent accumulators even on
/// narrow rows (one accumulator per pixel would wait on each multiply-add's latency).
#[cfg(target_arch = "x86_64")]
unsafe fn dw_span(d: &DwRow, from: usize, to: usize, check: bool) {
    use avx2::dw_pixels as k;
    let mut ox = from;
    while ox < to {
        let r = match to - ox {
            8.. => 8,
            4..=7 => 4,
            2 | 3 => 2,
            _ => 1,
        };
        match (r, check) {
            (8, false) => k::<8, false>(d, ox),
            (8, true) => k::<8, true>(d, ox),
            (4, false) => k::<4, false>(d, ox),
            (4, true) => k::<4, true>(d, ox),
            (2, false) => k::<2, false>(d, ox),
            (2, true) => k::<2, true>(d, ox),
            (_, false) => k::<1, false>(d, ox),
            (_, true) => k::<1, true>(d, ox),
        }
        ox += r;
    }
}

/// One output row of a dense conv from NCHW input: the input rows its taps read (tap row, row start in
/// channel 0; channel `ch` is `ch * plane` further).
struct DenseRow {
    rows: [(usize, *const f32); 16],
    nrows: usize,
    c: usize,
    plane: usize,
    kh: usize,
    kw: usize,
    taps: usize,
    width: usize,
    sx: usize,
    dx: usize,
    pl: usize,
    w: *const f32,
    bias: *const f32,
    /// Output row start in block 0; blocks `block_stride` apart.
    out: *mut f32,
    block_stride: usize,
    lo: f32,
    hi: f32,
}

/// The portable form of [`avx2::dense_pixels`] (all pixels of a row, every output block).
unsafe fn dense_row_scalar(d: &DenseRow, ow: usize, blocks: usize) {
    for ob in 0..blocks {
        for ox in 0..ow {
            let mut acc = [0f32; LANES];
            for (l, a) in acc.iter_mut().enumerate() {
                *a = *d.bias.add(ob * LANES + l);
            }
            for ch in 0..d.c {
                for &(i, row) in &d.rows[..d.nrows] {
                    for j in 0..d.kw {
                        let ix = (ox * d.sx + j * d.dx) as isize - d.pl as isize;
                        if ix < 0 || ix >= d.width as isize {
                            continue;
                        }
                        let xv = *row.add(ch * d.plane).offset(ix);
                        let wp = d.w.add((ob * d.taps + (ch * d.kh + i) * d.kw + j) * LANES);
                        for (l, a) in acc.iter_mut().enumerate() {
                            *a += *wp.add(l) * xv;
                        }
                    }
                }
            }
            for (l, a) in acc.iter().enumerate() {
                *d.out.add(ob * d.block_stride + ox * LANES + l) = clamp1(*a, d.lo, d.hi);
            }
        }
    }
}

/// A dense (group 1) convolution of NCHW input `x` (`[n, c, h, w]`, any `c`: a 3-channel stem) straight
/// into blocked `[n, m/8, oh, ow, 8]`, weights packed by [`pack_dense`] of `[m, c*kh*kw]`.
#[allow(clippy::too_many_arguments)]
pub fn dense_to_blocked(
    x: &[f32],
    (n, c, h, wd): (usize, usize, usize, usize),
    wp: &[f32],
    bias: &[f32],
    m: usize,
    g: ConvGeom,
    act: Act,
    portable: bool,
) -> Vec<f32> {
    let (kh, kw) = g.k;
    let taps = c * kh * kw;
    assert!(m.is_multiple_of(LANES) && kh <= 16 && x.len() == n * c * h * wd && wp.len() == m * taps);
    assert!(bias.len() == m);
    let simd = use_avx2(portable);
    let (oh, ow) = g.out_size(h, wd);
    let (sx, dx, pl) = (g.s.1, g.d.1, g.pads[1]);
    let (first, last) = interior(g, wd, ow);
    let blocks = m / LANES;
    build(n * m * oh * ow, |out| {
        (0..n * oh).into_par_iter().for_each(|task| {
            let (img, oy) = (task / oh, task % oh);
            let src = &x[img * c * h * wd..(img + 1) * c * h * wd];
            let (rows, nrows) = tap_rows(g, oy, h, |iy| src[iy * wd..].as_ptr());
            let d = DenseRow {
                rows,
                nrows,
                c,
                plane: h * wd,
                kh,
                kw,
                taps,
                width: wd,
                sx,
                dx,
                pl,
                w: wp.as_ptr(),
                bias: bias.as_ptr(),
                out: out.at(img * m * oh * ow + oy * ow * LANES),
                block_stride: oh * ow * LANES,
                lo: act.lo,
                hi: act.hi,
            };
            // SAFETY: tap rows are checked above, tap columns on the borders (CHECK) or known inside
            // (first..last); each task writes its own output row in every block.
            unsafe {
                dense_row(&d, ow, first, last, blocks, simd);
                for b in 0..blocks {
                    act.epilogue(d.out.add(b * d.block_stride), ow * LANES);
                }
            }
        });
    })
}

/// Every pixel and block of one dense output row.
unsafe fn dense_row(d: &DenseRow, ow: usize, first: usize, last: usize, blocks: usize, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        use avx2::dense_pixels as k;
        let mut ob = 0;
        while ob < blocks {
            let two = blocks - ob >= 2;
            for ox in (0..first).chain(last..ow) {
                if two {
                    k::<1, 2, true>(d, ox, ob)
                } else {
                    k::<1, 1, true>(d, ox, ob)
                }
            }
            let mut ox = first;
            while ox < last {
                let r = if last - ox >= 6 { 6 } else { 1 };
                match (r, two) {
                    (6, true) => k::<6, 2, false>(d, ox, ob),
                    (6, false) => k::<6, 1, false>(d, ox, ob),
                    (_, true) => k::<1, 2, false>(d, ox, ob),
                    (_, false) => k::<1, 1, false>(d, ox, ob),
                }
                ox += r;
            }
            ob += if two { 2 } else { 1 };
        }
        return;
    }
    let _ = (first, last, simd);
    dense_row_scalar(d, ow, blocks)
}

/// Mean over the pixels of blocked `[n, c/8, hw, 8]`: NCHW `[n, c]` (GlobalAveragePool).
pub fn global_avg_pool(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    assert!(c.is_multiple_of(LANES) && x.len() == n * c * hw);
    let mut out = vec![0f32; n * c];
    out.par_chunks_mut(LANES).enumerate().for_each(|(plane, o)| {
        let mut acc = [0f32; LANES];
        for px in x[plane * hw * LANES..(plane + 1) * hw * LANES].chunks_exact(LANES) {
            for (a, v) in acc.iter_mut().zip(px) {
                *a += v;
            }
        }
        for (d, a) in o.iter_mut().zip(acc) {
            *d = a / hw as f32;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * scale).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn block_round_trips() {
        let x = seq(2 * 16 * 15, 1.0);
        let b = block(&x, 2, 16, 15);
        // Channel 9 of image 1, pixel 4: block 1, lane 1.
        assert_eq!(b[((2 + 1) * 15 + 4) * LANES + 1], x[(16 + 9) * 15 + 4]);
        assert_eq!(unblock(&b, 2, 16, 15), x);
    }

    /// Direct sums in NCHW, for reference.
    fn pointwise_ref(x: &[f32], (n, c, hw): (usize, usize, usize), w: &[f32], b: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * m * hw];
        for i in 0..n {
            for o in 0..m {
                for p in 0..hw {
                    let s: f64 = (0..c).map(|k| w[o * c + k] as f64 * x[(i * c + k) * hw + p] as f64).sum();
                    out[(i * m + o) * hw + p] = (s + b[o] as f64) as f32;
                }
            }
        }
        out
    }

    /// `v` after `act` (clamp, then the epilogue, GELU by a numerically integrated erf), as the kernels
    /// should store it.
    fn with_act(v: &[f32], act: Act) -> Vec<f32> {
        let clamped = v.iter().map(|x| x.max(act.lo).min(act.hi));
        let erf = |x: f64| {
            // Abramowitz-Stegun 7.1.26 is too coarse; integrate instead (Simpson, 2000 steps).
            let (n, h) = (2000, x / 2000.0);
            let f = |t: f64| (-t * t).exp();
            let s: f64 = (0..=n)
                .map(|i| {
                    f(i as f64 * h)
                        * if i == 0 || i == n {
                            1.0
                        } else if i % 2 == 1 {
                            4.0
                        } else {
                            2.0
                        }
                })
                .sum();
            s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
        };
        clamped
            .map(|x| match act.epilogue {
                Epilogue::None => x,
                Epilogue::Silu => x / (1.0 + (-x).exp()),
                Epilogue::Gelu => (x as f64 * 0.5 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))) as f32,
                Epilogue::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            })
            .collect()
    }

    #[test]
    fn pointwise_matches_direct_sums_on_every_tile_shape() {
        // Output blocks 3, 1, 5, 9 and 17 (AVX-512: whole panels 1..=4 and an odd last block; AVX2: pairs
        // and singles), pixel counts with short tails, several images; every ISA this CPU has.
        let shapes =
            [(2usize, 16usize, 24usize, 13usize), (1, 8, 8, 5), (3, 24, 40, 49), (1, 32, 72, 7), (2, 40, 136, 20)];
        let isas: Vec<Isa> =
            [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= Isa::detect(false)).collect();
        for &(n, c, m, hw) in &shapes {
            let x = seq(n * c * hw, 1.0);
            let w = seq(m * c, 0.3);
            let b = seq(m, 0.5);
            let want = pointwise_ref(&x, (n, c, hw), &w, &b, m);
            let (xb, wp) = (block(&x, n, c, hw), pack_pointwise(&w, m, c));
            let mut simd_results = Vec::new();
            for &isa in &isas {
                let got = pointwise_with(&xb, (n, c, hw), &wp, &b, m, Act::NONE, isa);
                assert!(max_diff(&unblock(&got, n, m, hw), &want) < 1e-4, "n {n} c {c} m {m} hw {hw} {isa:?}");
                let relu6 = pointwise_with(&xb, (n, c, hw), &wp, &b, m, Act::clamp(0.0, 6.0), isa);
                let clamped: Vec<f32> = want.iter().map(|v| v.clamp(0.0, 6.0)).collect();
                assert!(max_diff(&unblock(&relu6, n, m, hw), &clamped) < 1e-4, "{isa:?} relu6");
                for act in [Act::SILU, Act::GELU] {
                    let y = pointwise_with(&xb, (n, c, hw), &wp, &b, m, act, isa);
                    assert!(max_diff(&unblock(&y, n, m, hw), &with_act(&want, act)) < 1e-4, "{isa:?} {act:?}");
                }
                if isa != Isa::Scalar {
                    simd_results.push((isa, got));
                }
            }
            // The AVX-512 tiles add in the AVX2 tiles' order: the same bits.
            if let [(_, a), (_, b)] = &simd_results[..] {
                assert!(a == b, "AVX2 and AVX-512 differ: n {n} c {c} m {m} hw {hw}");
            }
        }
        println!("pointwise checked on {isas:?}");
    }

    /// Direct sums of a depthwise conv in NCHW.
    fn depthwise_ref(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        k: &[f32],
        b: &[f32],
        g: ConvGeom,
    ) -> Vec<f32> {
        let (oh, ow) = g.out_size(h, w);
        let mut out = vec![0f32; n * c * oh * ow];
        for p in 0..n * c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut s = b[p % c];
                    for i in 0..g.k.0 {
                        for j in 0..g.k.1 {
                            let iy = (oy * g.s.0 + i * g.d.0) as isize - g.pads[0] as isize;
                            let ix = (ox * g.s.1 + j * g.d.1) as isize - g.pads[1] as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                s += k[(p % c) * g.k.0 * g.k.1 + i * g.k.1 + j]
                                    * x[(p * h + iy as usize) * w + ix as usize];
                            }
                        }
                    }
                    out[(p * oh + oy) * ow + ox] = s;
                }
            }
        }
        out
    }

    #[test]
    fn depthwise_matches_direct_sums_for_strides_pads_and_dilations() {
        let (n, c) = (2, 16);
        for &(h, w, k, s, d, pads) in &[
            (9usize, 8usize, 3usize, 1usize, 1usize, [1usize, 1, 1, 1]),
            (9, 8, 3, 2, 1, [1, 1, 1, 1]),
            (12, 21, 5, 2, 1, [1, 2, 2, 1]),
            (14, 14, 5, 1, 1, [2, 2, 2, 2]),
            (9, 11, 3, 2, 1, [0; 4]),
            (10, 10, 3, 1, 2, [2, 2, 2, 2]),
            (3, 3, 5, 1, 1, [2, 2, 2, 2]),
        ] {
            let g = ConvGeom { k: (k, k), s: (s, s), d: (d, d), pads };
            let x = seq(n * c * h * w, 1.0);
            let kw = seq(c * k * k, 0.4);
            let b = seq(c, 0.2);
            let want = depthwise_ref(&x, (n, c, h, w), &kw, &b, g);
            let (oh, ow) = g.out_size(h, w);
            for (portable, act) in [(false, Act::NONE), (true, Act::NONE), (false, Act::SILU), (true, Act::SILU)] {
                let got = depthwise(
                    &block(&x, n, c, h * w),
                    (n, c, h, w),
                    &pack_depthwise(&kw, c, k * k),
                    &b,
                    g,
                    act,
                    portable,
                );
                let got = unblock(&got, n, c, oh * ow);
                assert!(
                    max_diff(&got, &with_act(&want, act)) < 1e-4,
                    "h {h} w {w} k {k} s {s} d {d} pads {pads:?} portable {portable} {act:?}"
                );
            }
        }
    }

    /// Direct sums of a dense conv in NCHW.
    fn dense_ref(
        x: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        k: &[f32],
        b: &[f32],
        m: usize,
        g: ConvGeom,
    ) -> Vec<f32> {
        let (oh, ow) = g.out_size(h, w);
        let mut out = vec![0f32; n * m * oh * ow];
        for img in 0..n {
            for o in 0..m {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = b[o];
                        for ch in 0..c {
                            for i in 0..g.k.0 {
                                for j in 0..g.k.1 {
                                    let iy = (oy * g.s.0 + i * g.d.0) as isize - g.pads[0] as isize;
                                    let ix = (ox * g.s.1 + j * g.d.1) as isize - g.pads[1] as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                        let kv = k[((o * c + ch) * g.k.0 + i) * g.k.1 + j];
                                        s += kv * x[((img * c + ch) * h + iy as usize) * w + ix as usize];
                                    }
                                }
                            }
                        }
                        out[((img * m + o) * oh + oy) * ow + ox] = s;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn dense_blocked_matches_direct_sums_on_every_isa() {
        let best = Isa::detect(false);
        // (c, h, w, m, (kh, kw), s, d, pads): 3x3 same, strided with asymmetric pads, dilation, 5x5, a
        // strided 1x1, Inception's 1x7 and 7x1; odd output blocks (AVX-512: a panel plus an odd block), rows
        // not a multiple of 6.
        for &(c, h, w, m, (kh, kw), s, d, pads) in &[
            (8usize, 9usize, 11usize, 24usize, (3usize, 3usize), 1usize, 1usize, [1usize; 4]),
            (16, 13, 10, 40, (3, 3), 2, 1, [0, 1, 1, 1]),
            (8, 12, 12, 72, (3, 3), 1, 2, [2; 4]),
            (24, 7, 7, 8, (5, 5), 1, 1, [2; 4]),
            (8, 5, 23, 16, (1, 1), 2, 1, [0; 4]),
            (16, 9, 11, 40, (1, 7), 1, 1, [0, 3, 0, 3]),
            (16, 11, 9, 40, (7, 1), 1, 1, [3, 0, 3, 0]),
        ] {
            let n = 2;
            let k = kh.max(kw);
            let g = ConvGeom { k: (kh, kw), s: (s, s), d: (d, d), pads };
            let x = seq(n * c * h * w, 1.0);
            let kv = seq(m * c * kh * kw, 0.3);
            let b = seq(m, 0.2);
            let want = dense_ref(&x, (n, c, h, w), &kv, &b, m, g);
            let (oh, ow) = g.out_size(h, w);
            let packed = pack_dense_blocked(&kv, (m, 1), c, (kh, kw));
            let xb = block(&x, n, c, h * w);
            let mut first: Option<Vec<f32>> = None;
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best) {
                let got =
                    unblock(&dense_blocked(&xb, (n, c, h, w), &packed, &b, (m, 1), g, Act::NONE, isa), n, m, oh * ow);
                assert!(max_diff(&got, &want) < 1e-4, "c {c} h {h} w {w} m {m} k {k} s {s} d {d} {isa:?}");
                if isa >= Isa::Avx2 {
                    // The vector tiles sum in the same order: the same bits on every ISA.
                    match &first {
                        Some(f) => assert!(f == &got, "{isa:?} differs from AVX2 bit for bit (c {c} k {k} s {s})"),
                        None => first = Some(got),
                    }
                }
            }
            let clamped = dense_blocked(&xb, (n, c, h, w), &packed, &b, (m, 1), g, Act::clamp(0.0, 0.5), best);
            let want: Vec<f32> = want.iter().map(|v| v.clamp(0.0, 0.5)).collect();
            assert!(max_diff(&unblock(&clamped, n, m, oh * ow), &want) < 1e-4, "clamped, c {c} k {k}");
        }
    }

    #[test]
    fn grouped_blocked_convs_match_per_group_direct_sums() {
        let best = Isa::detect(false);
        // (c, m, groups, k, s, pads): RegNet-style groups of 16 channels, groups of one output block
        // (cg 16, mg 8), a grouped 1x1 conv.
        for &(c, m, groups, k, s, pads) in &[
            (32usize, 32usize, 2usize, 3usize, 1usize, [1usize; 4]),
            (48, 24, 3, 3, 2, [1, 1, 0, 0]),
            (32, 64, 2, 1, 1, [0; 4]),
        ] {
            let (n, h, w) = (2, 7, 9);
            let g = ConvGeom { k: (k, k), s: (s, s), d: (1, 1), pads };
            let (cg, mg) = (c / groups, m / groups);
            let x = seq(n * c * h * w, 1.0);
            let kv = seq(m * cg * k * k, 0.3);
            let b = seq(m, 0.2);
            let (oh, ow) = g.out_size(h, w);
            // The reference: each group as its own dense conv on its channels.
            let mut want = vec![0f32; n * m * oh * ow];
            for gi in 0..groups {
                let xg: Vec<f32> = (0..n)
                    .flat_map(|i| x[(i * c + gi * cg) * h * w..(i * c + (gi + 1) * cg) * h * w].to_vec())
                    .collect();
                let wg = &kv[gi * mg * cg * k * k..(gi + 1) * mg * cg * k * k];
                let yg = dense_ref(&xg, (n, cg, h, w), wg, &b[gi * mg..(gi + 1) * mg], mg, g);
                for i in 0..n {
                    let dst = (i * m + gi * mg) * oh * ow;
                    want[dst..dst + mg * oh * ow].copy_from_slice(&yg[i * mg * oh * ow..(i + 1) * mg * oh * ow]);
                }
            }
            let packed = pack_dense_blocked(&kv, (m, groups), cg, (k, k));
            let xb = block(&x, n, c, h * w);
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best) {
                let y = dense_blocked(&xb, (n, c, h, w), &packed, &b, (m, groups), g, Act::NONE, isa);
                let got = unblock(&y, n, m, oh * ow);
                assert!(max_diff(&got, &want) < 1e-4, "c {c} m {m} groups {groups} k {k} s {s} {isa:?}");
                let y = dense_blocked(&xb, (n, c, h, w), &packed, &b, (m, groups), g, Act::SILU, isa);
                let got = unblock(&y, n, m, oh * ow);
                assert!(max_diff(&got, &with_act(&want, Act::SILU)) < 1e-4, "silu c {c} m {m} groups {groups} {isa:?}");
            }
        }
    }

    #[test]
    fn dense_to_blocked_matches_direct_sums() {
        // 3 output blocks (a 2-block and a 1-block pass), rows wider than a 6-pixel tile, stride 2.
        for &(c, h, w, k, s, pads) in &[
            (3usize, 13usize, 17usize, 3usize, 2usize, [0usize, 1, 1, 1]),
            (3, 9, 9, 3, 1, [1, 1, 1, 1]),
            (5, 8, 20, 5, 2, [2, 2, 2, 2]),
        ] {
            let (n, m) = (2, 24);
            let g = ConvGeom { k: (k, k), s: (s, s), d: (1, 1), pads };
            let x = seq(n * c * h * w, 1.0);
            let kv = seq(m * c * k * k, 0.3);
            let b = seq(m, 0.2);
            let want = dense_ref(&x, (n, c, h, w), &kv, &b, m, g);
            let (oh, ow) = g.out_size(h, w);
            let hard_swish = Act { epilogue: Epilogue::HardSwish, ..Act::NONE };
            for (portable, act) in
                [(false, Act::NONE), (true, Act::NONE), (false, Act::SILU), (true, Act::GELU), (false, hard_swish)]
            {
                let packed = pack_dense(&kv, m, c * k * k);
                let got = dense_to_blocked(&x, (n, c, h, w), &packed, &b, m, g, act, portable);
                let got = unblock(&got, n, m, oh * ow);
                let want = with_act(&want, act);
                assert!(max_diff(&got, &want) < 1e-4, "c {c} h {h} w {w} k {k} s {s} portable {portable} {act:?}");
            }
        }
    }

    #[test]
    fn global_avg_pool_is_the_plane_mean() {
        let x = seq(2 * 16 * 7, 1.0);
        let got = global_avg_pool(&block(&x, 2, 16, 7), 2, 16, 7);
        for (p, v) in got.iter().enumerate() {
            let mean = x[p * 7..(p + 1) * 7].iter().sum::<f32>() / 7.0;
            assert!((v - mean).abs() < 1e-6);
        }
    }
}
