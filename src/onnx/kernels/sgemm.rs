//! Products by a constant matrix (`x[rows, k] @ w[k, n] (+ bias)`: the linear layers of a transformer)
//! with the weight packed once per plan into 16-column panels and register tiles of 6 rows x 16 columns
//! (AVX2) or, where the CPU has AVX-512, 6 rows x 32 or 48 columns (two or three panels, a zmm register each; a
//! narrow or unpaired last panel still takes the AVX2 tile). On this project's 2-core machine the `gemm`
//! crate reaches 50-110 GFLOP/s on Swin's linear shapes; the AVX2 tiles reach about 170
//! (`docs/benchmarks.md`).
//!
//! Blocking: each task owns a run of output rows; for each slice of `k` (at most [`KC`], [`KC_512`] for the
//! AVX-512 tiles) and each panel, the panel's slice of weights stays in L1 while the task's rows stream past
//! them from L2.

use rayon::prelude::*;

use super::build;
pub use super::Isa;

/// Columns per panel.
const NR: usize = 16;
/// Rows per tile.
const MR: usize = 6;
/// Inner-dimension slice: a panel slice is `KC * 16` floats (16 KiB).
const KC: usize = 384;
/// The slice for AVX-512 tiles, which read three panels at once (`3 * KC_512 * 16` floats, 36 KiB, stay in
/// L1): 384 spilled to L2 where k >= 384 (Swin's 25088x384x96 product 144-159 -> 176-178 GFLOP/s; 128
/// was no better than 192, docs/benchmarks.md).
const KC_512: usize = 192;
/// Rows per parallel task (a multiple of MR).
const MC: usize = 72;

/// A `[k, n]` matrix packed as `ceil(n/16)` panels of `[k][16]` (the last one zero-padded).
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// Packs row-major `w` (`[k, n]`).
    pub fn new(w: &[f32], k: usize, n: usize) -> PackedB {
        assert_eq!(w.len(), k * n);
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (p, panel) in data.chunks_mut(k * NR).enumerate() {
            let (c0, c1) = (p * NR, ((p + 1) * NR).min(n));
            for (kk, row) in panel.chunks_mut(NR).enumerate() {
                row[..c1 - c0].copy_from_slice(&w[kk * n + c0..kk * n + c1]);
            }
        }
        PackedB { k, n, data }
    }

    /// Rows (the inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Whether [`matmul_packed`] runs its own tiles here (AVX2+FMA); callers use another path otherwise.
pub fn available() -> bool {
    best_isa().is_some()
}

/// The widest tiles this CPU has for the packed sgemm (6 x 16 in ymm on AVX2, 6 x 32/48 in zmm on
/// AVX-512F); None without AVX2+FMA.
pub fn best_isa() -> Option<Isa> {
    Some(Isa::detect(false)).filter(|&i| i != Isa::Scalar)
}

/// `a[rows, k] @ b (+ bias per column)`, row-major `[rows, n]`. `after(segment)` runs on each finished
/// row segment of a task while it is still in cache (a fused activation). Panics if [`available`] is false.
///
/// Tasks are chunks of [`MC`] rows; when there are too few rows to keep every thread busy (one image in
/// Swin's last stages: 49 rows), the column panels are split among tasks as well, so each thread streams
/// only its share of `b`.
pub fn matmul_packed(a: &[f32], b: &PackedB, bias: Option<&[f32]>, after: &(dyn Fn(&mut [f32]) + Sync)) -> Vec<f32> {
    matmul_packed_on(best_isa().expect("sgemm tiles need AVX2 and FMA"), a, b, bias, after)
}

/// [`matmul_packed`] with the tiles of `isa` (which the CPU must have): to test one path against another.
pub fn matmul_packed_on(
    isa: Isa,
    a: &[f32],
    b: &PackedB,
    bias: Option<&[f32]>,
    after: &(dyn Fn(&mut [f32]) + Sync),
) -> Vec<f32> {
    assert!(isa != Isa::Scalar && isa <= Isa::detect(false), "this CPU has no {isa:?} tiles for the sgemm");
    let (k, n) = (b.k, b.n);
    assert!(k > 0 && a.len().is_multiple_of(k) && bias.is_none_or(|v| v.len() == n));
    let rows = a.len() / k;
    if n == 0 || rows == 0 {
        return Vec::new();
    }
    let chunks = rows.div_ceil(MC);
    let panels = n.div_ceil(NR);
    let want = 4 * rayon::current_num_threads();
    let per = panels.div_ceil(want.div_ceil(chunks).clamp(1, panels));
    let groups = panels.div_ceil(per);
    build(rows * n, |o| {
        (0..chunks * groups).into_par_iter().for_each_init(Vec::new, |packed, t| {
            let (r0, p0) = ((t / groups) * MC, (t % groups) * per);
            let nrows = MC.min(rows - r0);
            let p1 = (p0 + per).min(panels);
            let (c0, c1) = (p0 * NR, (p1 * NR).min(n));
            // SAFETY: the CPU has AVX2+FMA (asserted above); `a` holds rows r0..r0+nrows of k floats; this
            // task alone writes rows r0..r0+nrows x columns c0..c1 of the output (the tasks tile it exactly),
            // all in the first k slice before reading any back, so each segment is initialised when `after`
            // sees it.
            unsafe {
                let rows_a = &a[r0 * k..(r0 + nrows) * k];
                rows_task(isa, rows_a, nrows, b, bias, o.at(r0 * n), (p0, p1), packed);
                for r in 0..nrows {
                    after(std::slice::from_raw_parts_mut(o.at((r0 + r) * n + c0), c1 - c0));
                }
            }
        });
    })
}

/// All of `nrows` rows times panels `p0..p1` of `b`, into `o` (row stride n): per k slice, the rows are
/// packed into `[k][6]` micro-panels (each tile then reads its six rows from one contiguous run instead of
/// six strided ones), then each panel passes over them: with AVX-512 two or three full panels at a time,
/// a single or narrow one in an AVX2 tile.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_task(
    isa: Isa,
    a: &[f32],
    nrows: usize,
    b: &PackedB,
    bias: Option<&[f32]>,
    o: *mut f32,
    (p0, p1): (usize, usize),
    packed: &mut Vec<f32>,
) {
    let (k, n) = (b.k, b.n);
    let mut k0 = 0;
    while k0 < k {
        let kc = if isa == Isa::Avx512 { KC_512 } else { KC };
        let kn = kc.min(k - k0);
        pack_rows(a, nrows, k, k0, kn, packed);
        let mut p = p0;
        while p < p1 {
            let c0 = p * NR;
            // Full panels from p: two or three go in one AVX-512 tile, a single or narrow one in an AVX2 tile.
            let full = if isa == Isa::Avx512 { (p1 - p).min((n - c0) / NR).min(3) } else { 0 };
            let panel = b.data.as_ptr().add(p * k * NR + k0 * NR);
            let mut r = 0;
            while r < nrows {
                let mr = MR.min(nrows - r);
                let t = Tile {
                    a: packed.as_ptr().add(r * kn),
                    b: panel,
                    kn,
                    c: o.add(r * n + c0),
                    ldc: n,
                    width: NR.min(n - c0),
                    bias: if k0 == 0 { bias.map(|v| v.as_ptr().add(c0)) } else { None },
                    first: k0 == 0,
                };
                let stride = k * NR;
                match (full, mr) {
                    (3, 6) => tile512::<6, 3>(t, stride),
                    (3, 5) => tile512::<5, 3>(t, stride),
                    (3, 4) => tile512::<4, 3>(t, stride),
                    (3, 3) => tile512::<3, 3>(t, stride),
                    (3, 2) => tile512::<2, 3>(t, stride),
                    (3, _) => tile512::<1, 3>(t, stride),
                    (2, 6) => tile512::<6, 2>(t, stride),
                    (2, 5) => tile512::<5, 2>(t, stride),
                    (2, 4) => tile512::<4, 2>(t, stride),
                    (2, 3) => tile512::<3, 2>(t, stride),
                    (2, 2) => tile512::<2, 2>(t, stride),
                    (2, _) => tile512::<1, 2>(t, stride),
                    (_, 6) => tile::<6>(t),
                    (_, 5) => tile::<5>(t),
                    (_, 4) => tile::<4>(t),
                    (_, 3) => tile::<3>(t),
                    (_, 2) => tile::<2>(t),
                    (_, _) => tile::<1>(t),
                }
                r += mr;
            }
            p += full.max(1);
        }
        k0 += kn;
    }
}

/// One `R x 16P` tile over one k slice: `P` consecutive full-width panels starting at `t.b`, `stride`
/// floats apart.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn tile512<const R: usize, const P: usize>(t: Tile, stride: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    if t.first {
        if let Some(bp) = t.bias {
            for j in 0..P {
                let bj = _mm512_loadu_ps(bp.add(j * NR));
                for r in 0..R {
                    acc[r][j] = bj;
                }
            }
        }
    } else {
        for r in 0..R {
            for j in 0..P {
                acc[r][j] = _mm512_loadu_ps(t.c.add(r * t.ldc + j * NR));
            }
        }
    }
    for kk in 0..t.kn {
        let mut bv = [_mm512_setzero_ps(); P];
        for j in 0..P {
            bv[j] = _mm512_loadu_ps(t.b.add(j * stride + kk * NR));
        }
        for r in 0..R {
            let av = _mm512_set1_ps(*t.a.add(kk * R + r));
            for j in 0..P {
                acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
            }
        }
    }
    for r in 0..R {
        for j in 0..P {
            _mm512_storeu_ps(t.c.add(r * t.ldc + j * NR), acc[r][j]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile512<const R: usize, const P: usize>(_: Tile, _: usize) {}

/// Columns `k0..k0+kn` of the rows, as `[kn][mr]` micro-panels of up to 6 rows, one after another (the
/// panel of rows r..r+mr starts at `r * kn`).
fn pack_rows(a: &[f32], nrows: usize, k: usize, k0: usize, kn: usize, packed: &mut Vec<f32>) {
    packed.clear();
    packed.resize(nrows * kn, 0.0);
    let mut r = 0;
    while r < nrows {
        let mr = MR.min(nrows - r);
        let dst = &mut packed[r * kn..(r + mr) * kn];
        for i in 0..mr {
            let src = &a[(r + i) * k + k0..(r + i) * k + k0 + kn];
            for (kk, &v) in src.iter().enumerate() {
                dst[kk * mr + i] = v;
            }
        }
        r += mr;
    }
}

/// One `R x 16` tile over one k slice.
#[derive(Clone, Copy)]
struct Tile {
    /// The rows' micro-panel (`[kn][R]`).
    a: *const f32,
    b: *const f32,
    kn: usize,
    c: *mut f32,
    ldc: usize,
    /// Valid columns (16 except in the last panel).
    width: usize,
    /// Bias at the tile's first column (first k slice only).
    bias: Option<*const f32>,
    /// First k slice: start from the bias (or zero) instead of the stored partial sums.
    first: bool,
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // acc[r][..] inside an r loop reads more clearly than zips here
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize>(t: Tile) {
    use std::arch::x86_64::*;
    let full = t.width == NR;
    // Partial sums of a narrow last panel go through a 16-wide scratch tile.
    let mut scratch = [0f32; MR * NR];
    let (c, ldc) = if full { (t.c, t.ldc) } else { (scratch.as_mut_ptr(), NR) };
    if !full && !t.first {
        for r in 0..R {
            std::ptr::copy_nonoverlapping(t.c.add(r * t.ldc), c.add(r * ldc), t.width);
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    if t.first {
        if let Some(bp) = t.bias {
            let mut bv = [0f32; NR];
            std::ptr::copy_nonoverlapping(bp, bv.as_mut_ptr(), t.width);
            let (b0, b1) = (_mm256_loadu_ps(bv.as_ptr()), _mm256_loadu_ps(bv.as_ptr().add(8)));
            for r in 0..R {
                acc[r] = [b0, b1];
            }
        }
    } else {
        for r in 0..R {
            acc[r] = [_mm256_loadu_ps(c.add(r * ldc)), _mm256_loadu_ps(c.add(r * ldc + 8))];
        }
    }
    for kk in 0..t.kn {
        let b0 = _mm256_loadu_ps(t.b.add(kk * NR));
        let b1 = _mm256_loadu_ps(t.b.add(kk * NR + 8));
        for r in 0..R {
            let av = _mm256_broadcast_ss(&*t.a.add(kk * R + r));
            acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(c.add(r * ldc), acc[r][0]);
        _mm256_storeu_ps(c.add(r * ldc + 8), acc[r][1]);
    }
    if !full {
        for r in 0..R {
            std::ptr::copy_nonoverlapping(c.add(r * ldc), t.c.add(r * t.ldc), t.width);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile<const R: usize>(_: Tile) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * scale).collect()
    }

    #[test]
    fn matches_direct_sums_with_row_column_and_k_tails() {
        if !available() {
            eprintln!("skipped: no AVX2+FMA here, the sgemm tiles are not used on this CPU");
            return;
        }
        // Rows across task and tile tails, columns across a narrow last panel, k across slices.
        for &(rows, k, n) in &[(1usize, 3usize, 16usize), (13, 40, 37), (80, 300, 48), (151, 520, 20), (20, 400, 96)] {
            let a = seq(rows * k, 1.0);
            let w = seq(k * n, 0.2);
            let bias = seq(n, 0.5);
            let b = PackedB::new(&w, k, n);
            let got = matmul_packed(&a, &b, Some(&bias), &|_| {});
            // Every ISA path this CPU has gives the same sums (to rounding) as the AVX2 tiles.
            let avx2 = matmul_packed_on(Isa::Avx2, &a, &b, Some(&bias), &|_| {});
            let worst = got.iter().zip(&avx2).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{:?} vs AVX2 tiles: {worst} (rows {rows} k {k} n {n})", best_isa());
            let plain = matmul_packed(&a, &b, None, &|o| o.iter_mut().for_each(|v| *v *= 2.0));
            for r in 0..rows {
                for c in 0..n {
                    let s: f64 = (0..k).map(|i| a[r * k + i] as f64 * w[i * n + c] as f64).sum();
                    let (g, p) = (got[r * n + c] as f64, plain[r * n + c] as f64);
                    assert!((g - s - bias[c] as f64).abs() < 1e-3, "rows {rows} k {k} n {n} at ({r}, {c})");
                    assert!((p - 2.0 * s).abs() < 2e-3, "without bias, doubled after");
                }
            }
        }
    }
}
