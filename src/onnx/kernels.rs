//! CPU f32 kernels for the importer's hot ops: matrix products through the `gemm` crate with our own
//! batching and strides (no copies of transposed views), broadcasting elementwise arithmetic, erf,
//! softmax, layer norm and convolution in NCHW as im2col + gemm (the channel-blocked convs are in
//! [`nchwc`]), all spread over rayon's threads.
//!
//! candle-core's CPU kernels are single-threaded outside gemm and run batched matmuls one small gemm at a
//! time (see FACTS.md: 5-100x behind ONNX Runtime per op). These kernels are used only for inference: when
//! any input is tracked for gradients (fine-tuning), the caller keeps candle's differentiable ops.

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

use crate::error::Result;
use crate::util::device::own_kernels_for;

/// Elements per parallel task for elementwise work (small enough to split, big enough to amortise).
const CHUNK: usize = 1 << 15;

/// `dst[m, n] (+)= a[m, k] * b[k, n]` with explicit row/column strides; `accumulate` adds to `dst`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: &[f32],
    (a_rs, a_cs): (isize, isize),
    b: &[f32],
    (b_rs, b_cs): (isize, isize),
    accumulate: bool,
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: callers pass slices holding the whole strided matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The contiguous f32 data behind a custom op's input (`what` names the op in the error).
pub(crate) fn cpu_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// Which of our SIMD tiles run: the widest the CPU has, or the scalar ones (tests, other CPUs). Ordered,
/// so `isa.min(Isa::detect(false))` caps a requested set at what this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain loops.
    Scalar,
    /// AVX2 + FMA (ymm tiles).
    Avx2,
    /// AVX-512F (zmm tiles where a kernel has them: the packed sgemm and the blocked 1x1 conv; the
    /// others run their AVX2 tiles).
    Avx512,
}

impl Isa {
    /// The widest this CPU runs (`portable`: scalar).
    pub fn detect(portable: bool) -> Isa {
        #[cfg(target_arch = "x86_64")]
        if !portable && std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return if std::is_x86_feature_detected!("avx512f") { Isa::Avx512 } else { Isa::Avx2 };
        }
        let _ = portable;
        Isa::Scalar
    }
}

/// Makes glibc keep freed memory for reuse instead of returning large blocks to the kernel at once.
///
/// Every op output is a fresh buffer of up to ~40 MB; by default glibc serves those with `mmap` and
/// unmaps them on free, so each op pays a page fault per 4 KiB touched. On this project's VM that made an
/// elementwise Add over [25088, 384] 4x slower (27 ms vs 7 ms). The cost: the process keeps its peak heap.
/// The `automm` binary calls this at start; library users may call it once before running graphs.
///
/// It also keeps glibc to one arena: plans run on rayon's worker threads, and with per-thread arenas that
/// made batch-8 ResNet-50/DenseNet/PoolFormer 10-45% slower (measured; the likely cause: a worker's arena
/// is an mmapped heap of at most 64 MB that cannot keep a run's large tensors for the next run).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1 (SIZE_MAX once glibc widens it) turns trimming off; i32::MAX still trimmed multi-GB peaks.
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// True when every tensor is a CPU f32 tensor that no gradient needs: our kernels may run.
pub fn usable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| own_kernels_for(t) && !t.track_op())
}

/// Runs `f` on a tensor's f32 storage and layout.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32], &Layout) -> R) -> Option<R> {
    if !own_kernels_for(t) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(v, layout)),
        _ => None,
    }
}

/// Runs `f` on the contiguous f32 data of `t` (copied first only when `t` is a strided view).
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = contiguous(t)?;
    let r = with_f32(&t, |v, l| {
        let (a, b) = l.contiguous_offsets().unwrap_or((0, v.len()));
        f(&v[a..b])
    });
    r.ok_or_else(|| candle_core::Error::Msg("expected a CPU f32 tensor".into()).into())
}

/// `t` laid out contiguously: itself when it already is, else a copy, made in parallel for CPU f32 views
/// (candle copies strided views on one thread; Swin's window shuffles make about 130 such copies a run).
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() || !usable(&[t]) || t.rank() == 0 {
        return Ok(t.contiguous()?);
    }
    let dims = t.dims().to_vec();
    let strides = t.layout().stride().to_vec();
    let start = t.layout().start_offset();
    let (rank, inner) = (dims.len(), dims[dims.len() - 1]);
    let inner_stride = strides[rank - 1];
    let n = t.elem_count();
    let out = with_f32(t, |v, _| {
        // Whole innermost rows per chunk: each starts from its own multi-index.
        par_build(n, inner.max(1), |s, o| {
            let mut idx = vec![0usize; rank];
            let mut rem = s / inner.max(1);
            for d in (0..rank - 1).rev() {
                idx[d] = rem % dims[d];
                rem /= dims[d];
            }
            for row in o.chunks_mut(inner.max(1)) {
                let base = start + (0..rank - 1).map(|d| idx[d] * strides[d]).sum::<usize>();
                if inner_stride == 1 {
                    for (d, &x) in row.iter_mut().zip(&v[base..base + inner]) {
                        d.write(x);
                    }
                } else {
                    for (j, d) in row.iter_mut().enumerate() {
                        d.write(v[base + j * inner_stride]);
                    }
                }
                for d in (0..rank - 1).rev() {
                    idx[d] += 1;
                    if idx[d] < dims[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
        })
    });
    match out {
        Some(v) => tensor(v, &dims),
        None => Ok(t.contiguous()?),
    }
}

/// A CPU tensor owning `v` (moved, not copied; the length is checked against `dims`).
pub(crate) fn tensor(v: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?)
}

/// `ts` joined along `axis` in parallel (candle's cat copies on one thread), or None when they are not
/// all CPU f32 tensors without gradients of one rank that agree off `axis`. Each of the `outer` slabs
/// (the product of the dims before `axis`) of the output is every input's slab in turn.
pub fn concat(ts: &[&Tensor], axis: usize) -> Result<Option<Tensor>> {
    let Some(first) = ts.first() else { return Ok(None) };
    let d0 = first.dims();
    let agree = |t: &&Tensor| {
        let d = t.dims();
        d.len() == d0.len() && d.iter().zip(d0).enumerate().all(|(k, (a, b))| k == axis || a == b)
    };
    if axis >= d0.len() || !usable(ts) || !ts.iter().all(agree) {
        return Ok(None);
    }
    let outer: usize = d0[..axis].iter().product();
    let slabs: Vec<usize> = ts.iter().map(|t| t.dims()[axis..].iter().product()).collect();
    let row: usize = slabs.iter().sum();
    let starts: Vec<usize> = slabs.iter().scan(0, |s, &n| Some(std::mem::replace(s, *s + n))).collect();
    let parts: Vec<Tensor> = ts.iter().map(|t| contiguous(t)).collect::<Result<_>>()?;
    let datas: Vec<_> = parts.iter().map(|t| t.storage_and_layout()).collect();
    let mut views: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for (storage, layout) in &datas {
        let Storage::Cpu(CpuStorage::F32(v)) = &**storage else { return Ok(None) };
        let (a, b) = layout.contiguous_offsets().unwrap_or((0, v.len()));
        views.push(&v[a..b]);
    }
    let out = build(outer * row, |out| {
        (0..outer * ts.len()).into_par_iter().for_each(|task| {
            let (o, i) = (task / ts.len(), task % ts.len());
            let src = &views[i][o * slabs[i]..(o + 1) * slabs[i]];
            // SAFETY: tasks write disjoint slabs (o, i) of the output, together all of it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.at(o * row + starts[i]), slabs[i]) };
        });
    });
    let mut dims = d0.to_vec();
    dims[axis] = ts.iter().map(|t| t.dims()[axis]).sum();
    Ok(Some(tensor(out, &dims)?))
}

/// Batched matrix product with NumPy broadcasting over leading dims, reading strided views in place.
/// Returns None for shapes it does not handle (rank < 2), leaving them to candle.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    matmul_bias(a, b, None)
}

/// [`matmul`] plus a bias of one value per output column, added by the gemm itself (the output starts as
/// the bias rows and the product accumulates into it): MatMul followed by Add, fused.
pub fn matmul_bias(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    if a.rank() < 2 || b.rank() < 2 || !own_kernels_for(a) || !own_kernels_for(b) {
        return Ok(None);
    }
    let bias = match bias {
        Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let r = with_f32(a, |av, al| with_f32(b, |bv, bl| matmul_layouts(av, al, bv, bl, bias.as_deref())));
    match r {
        Some(Some(Some((out, dims)))) => Ok(Some(tensor(out?, &dims)?)),
        Some(Some(None)) | Some(None) | None => Ok(None),
    }
}

/// [`matmul_bias`] on storage: `av` laid out by `al`, `bv` by `bl` (strided views read in place). The
/// output and its dims, or None when the bias does not fit; an error for mismatched dims.
pub(crate) fn matmul_layouts(
    av: &[f32],
    al: &Layout,
    bv: &[f32],
    bl: &Layout,
    bias: Option<&[f32]>,
) -> Option<(Result<Vec<f32>>, Vec<usize>)> {
    let (ad, bd) = (al.dims(), bl.dims());
    let (ra, rb) = (ad.len(), bd.len());
    if ra < 2 || rb < 2 {
        return None;
    }
    let (m, k) = (ad[ra - 2], ad[ra - 1]);
    let (k2, n) = (bd[rb - 2], bd[rb - 1]);
    let fail = |msg: String| Some((Err(candle_core::Error::Msg(msg).into()), Vec::new()));
    if k != k2 {
        return fail(format!("matmul: {ad:?} x {bd:?}: inner dims differ"));
    }
    let rank = ra.max(rb);
    // Batch dims, right-aligned, with each operand's stride (0 where it broadcasts).
    let mut bdims = vec![1usize; rank - 2];
    let mut sa = vec![0isize; rank - 2];
    let mut sb = vec![0isize; rank - 2];
    for i in 0..rank - 2 {
        let da = (i + ra >= rank).then(|| (ad[i + ra - rank], al.stride()[i + ra - rank]));
        let db = (i + rb >= rank).then(|| (bd[i + rb - rank], bl.stride()[i + rb - rank]));
        let (xa, xb) = (da.map_or(1, |d| d.0), db.map_or(1, |d| d.0));
        if xa != xb && xa != 1 && xb != 1 {
            return fail(format!("matmul: batch dims of {ad:?} and {bd:?} differ"));
        }
        bdims[i] = xa.max(xb);
        sa[i] = if xa == 1 { 0 } else { da.map_or(0, |d| d.1 as isize) };
        sb[i] = if xb == 1 { 0 } else { db.map_or(0, |d| d.1 as isize) };
    }
    let batch: usize = bdims.iter().product();
    let (a_rs, a_cs) = (al.stride()[ra - 2] as isize, al.stride()[ra - 1] as isize);
    let (b_rs, b_cs) = (bl.stride()[rb - 2] as isize, bl.stride()[rb - 1] as isize);
    let offsets = |strides: &[isize], start: usize| -> Vec<isize> {
        let mut out = Vec::with_capacity(batch);
        let mut idx = vec![0usize; bdims.len()];
        for _ in 0..batch {
            out.push(start as isize + idx.iter().zip(strides).map(|(&i, &s)| i as isize * s).sum::<isize>());
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < bdims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    };
    let mut out_dims = bdims.clone();
    out_dims.extend([m, n]);
    if bias.is_some_and(|v| v.len() != n) {
        return None;
    }
    let mut out = match bias {
        Some(v) => v.iter().copied().cycle().take(batch * m * n).collect(),
        None => vec![0f32; batch * m * n],
    };
    let read_dst = bias.is_some();
    let threads = rayon::current_num_threads();
    {
        {
            let oa = offsets(&sa, al.start_offset());
            let ob = offsets(&sb, bl.start_offset());
            // Rows of a batch fold into one tall product when b is shared and a's rows are evenly spaced.
            let b_shared = sb.iter().all(|&s| s == 0);
            let foldable = b_shared && batch > 1 && {
                let mut expect = a_rs * m as isize;
                let mut ok = true;
                for i in (0..bdims.len()).rev() {
                    if bdims[i] > 1 {
                        ok &= sa[i] == expect;
                        expect *= bdims[i] as isize;
                    }
                }
                ok
            };
            // Strides are non-negative (candle views), so each matrix lies inside the slice from its offset.
            let gemm_one = |dst: &mut [f32], rows: usize, a_off: isize, b_off: isize, par: Parallelism| {
                let (a0, b0) = (&av[a_off as usize..], &bv[b_off as usize..]);
                sgemm((rows, n, k), dst, a0, (a_rs, a_cs), b0, (b_rs, b_cs), read_dst, par)
            };
            if foldable || batch == 1 {
                gemm_one(&mut out, batch * m, oa[0], ob[0], Parallelism::Rayon(threads));
            } else if batch >= 2 * threads {
                out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| {
                    gemm_one(o, m, oa[i], ob[i], Parallelism::None);
                });
            } else {
                for (i, o) in out.chunks_mut(m * n).enumerate() {
                    gemm_one(o, m, oa[i], ob[i], Parallelism::Rayon(threads));
                }
            }
        }
    }
    Some((Ok(out), out_dims))
}

/// A binary arithmetic op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b
    Div,
}

impl Binary {
    /// From an ONNX op type.
    pub fn from_op(op: &str) -> Option<Binary> {
        Some(match op {
            "Add" => Binary::Add,
            "Sub" => Binary::Sub,
            "Mul" => Binary::Mul,
            "Div" => Binary::Div,
            _ => return None,
        })
    }
}

/// How the smaller operand of a binary op maps onto the larger: `[outer, len, inner]` with the small one
/// varying only along `len` (a bias over the last dims, a per-channel scale, a scalar).
fn broadcast_run(big: &[usize], small: &[usize]) -> Option<(usize, usize)> {
    if small.len() > big.len() {
        return None;
    }
    let pad = big.len() - small.len();
    let s: Vec<usize> = std::iter::repeat_n(1, pad).chain(small.iter().copied()).collect();
    let varying: Vec<usize> = (0..big.len()).filter(|&i| s[i] != 1).collect();
    let Some((&first, &last)) = varying.first().zip(varying.last()) else {
        return Some((1, big.iter().product()));
    };
    if (first..=last).any(|i| s[i] != big[i]) {
        return None;
    }
    let len: usize = big[first..=last].iter().product();
    let inner: usize = big[last + 1..].iter().product();
    Some((len, inner))
}

/// `a op b` with broadcasting when one side is whole and the other varies along one run of dims.
/// Returns None for other layouts, leaving them to candle.
pub fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let (big, small, swapped) = if a.elem_count() >= b.elem_count() { (a, b, false) } else { (b, a, true) };
    let out = with_data(big, |x| with_data(small, |y| binary_data(op, x, big.dims(), y, small.dims(), swapped)))??;
    out.map(|v| tensor(v, big.dims())).transpose()
}

/// [`binary`] on slices: `x` (dims `xd`, the whole side) against `y` (dims `yd`, broadcast along a run of
/// dims or with a hole of ones); `swapped` = `y op x`. None for other layouts.
pub(crate) fn binary_data(
    op: Binary,
    x: &[f32],
    xd: &[usize],
    y: &[f32],
    yd: &[usize],
    swapped: bool,
) -> Option<Vec<f32>> {
    let n = x.len();
    if let Some((len, inner)) = broadcast_run(xd, yd) {
        return Some(match (op, swapped) {
            (Binary::Add, _) => binary_into(|p, q| p + q, x, y, len, inner, n),
            (Binary::Mul, _) => binary_into(|p, q| p * q, x, y, len, inner, n),
            (Binary::Sub, false) => binary_into(|p, q| p - q, x, y, len, inner, n),
            (Binary::Sub, true) => binary_into(|p, q| q - p, x, y, len, inner, n),
            (Binary::Div, false) => binary_into(|p, q| p / q, x, y, len, inner, n),
            (Binary::Div, true) => binary_into(|p, q| q / p, x, y, len, inner, n),
        });
    }
    let (_, hole, inner) = hole_run(xd, yd)?;
    let block = hole * inner;
    // One instantiation per op (as above), so the inner loop is branch-free and vectorises.
    Some(match (op, swapped) {
        (Binary::Add, _) => hole_par(|p, q| p + q, x, y, block, inner),
        (Binary::Mul, _) => hole_par(|p, q| p * q, x, y, block, inner),
        (Binary::Sub, false) => hole_par(|p, q| p - q, x, y, block, inner),
        (Binary::Sub, true) => hole_par(|p, q| q - p, x, y, block, inner),
        (Binary::Div, false) => hole_par(|p, q| p / q, x, y, block, inner),
        (Binary::Div, true) => hole_par(|p, q| q / p, x, y, block, inner),
    })
}

/// How the smaller operand maps onto the larger when it is 1 along one run of dims and equal elsewhere:
/// `[outer, hole, inner]` (a channel-blocked per-channel scale: `[n, c/8, 1, 1, 8]` against
/// `[n, c/8, h, w, 8]`).
fn hole_run(big: &[usize], small: &[usize]) -> Option<(usize, usize, usize)> {
    let pad = big.len().checked_sub(small.len())?;
    let s: Vec<usize> = std::iter::repeat_n(1, pad).chain(small.iter().copied()).collect();
    let ones: Vec<usize> = (0..big.len()).filter(|&i| s[i] != big[i]).collect();
    let (&p, &q) = ones.first().zip(ones.last())?;
    if (p..=q).any(|i| s[i] != 1) || (0..big.len()).any(|i| !(p..=q).contains(&i) && s[i] != big[i]) {
        return None;
    }
    Some((big[..p].iter().product(), big[p..=q].iter().product(), big[q + 1..].iter().product()))
}

/// `f(x, y)` with x in blocks of `block` elements, block `b` against row `b` (`inner` long) of y.
fn hole_par<F: BinaryFn + Sync>(f: F, x: &[f32], y: &[f32], block: usize, inner: usize) -> Vec<f32> {
    par_build(x.len(), block, |s, o| hole_chunk(f, o, &x[s..s + o.len()], y, s / block, block / inner, inner))
}

/// A raw output pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct Out(*mut f32);
// SAFETY: tasks write disjoint element ranges (each caller documents why) and the buffer outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The element at `i` (a method, so closures capture the whole `Out`, not its raw field).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `len` floats that `fill` writes in full through the `Out` it gets (the buffer start), never zeroed
/// first: for kernels whose tasks write scattered blocks (par_build's contiguous chunks do not fit).
pub(crate) fn build(len: usize, fill: impl FnOnce(Out)) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    fill(Out(v.spare_capacity_mut().as_mut_ptr() as *mut f32));
    // SAFETY: callers write all `len` elements before returning from `fill`.
    unsafe { v.set_len(len) };
    v
}

/// A vector of `n` floats built in parallel: `fill(start, chunk)` must write every element of its chunk
/// (`start` = the chunk's first index). Chunks are multiples of `align` elements. The buffer is never
/// zeroed first: for memory-bound ops that pass costs as much as the op.
pub(crate) fn par_build(n: usize, align: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let align = align.max(1);
    let chunk = (CHUNK / align).max(1) * align;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(chunk).enumerate().for_each(|(i, c)| fill(i * chunk, c));
    // SAFETY: every chunk of the first n elements was written by `fill`.
    unsafe { v.set_len(n) };
    v
}

/// Compiles `$body` (a call of an `#[inline(always)]` generic) for AVX-512, AVX2+FMA and the baseline,
/// and runs the widest the CPU has, so the loops inside vectorise without a `-C target-cpu` build.
macro_rules! simd_dispatch {
    ($name:ident, <$($g:ident: $b:path),*>, ($($arg:ident: $ty:ty),*), $body:expr) => {
        #[allow(clippy::too_many_arguments)]
        fn $name<$($g: $b),*>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide<$($g: $b),*>($($arg: $ty),*) {
                    $body
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid<$($g: $b),*>($($arg: $ty),*) {
                    $body
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { wide($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { mid($($arg),*) };
                }
            }
            $body
        }
    };
}

mod depthwise;
pub mod grad;
pub mod nchwc;
mod pointwise;
pub mod pool;
pub mod sgemm;
pub use depthwise::{conv_depthwise, DepthwiseOp};
pub use pointwise::PointwiseOp;

fn binary_into<F: Fn(f32, f32) -> f32 + Copy + Sync>(
    f: F,
    x: &[f32],
    y: &[f32],
    len: usize,
    inner: usize,
    n: usize,
) -> Vec<f32> {
    if len == n {
        // Same shape: plain elementwise, split anywhere.
        return par_build(n, 1, |s, o| binary_chunk(f, o, &x[s..s + o.len()], &y[s..s + o.len()], o.len(), 1, 0));
    }
    let align = if inner == 1 { len } else { inner };
    par_build(n, align, |start, o| binary_chunk(f, o, &x[start..start + o.len()], y, len, inner, start))
}

#[inline(always)]
fn binary_chunk_body<F: Fn(f32, f32) -> f32 + Copy>(
    f: F,
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    y: &[f32],
    len: usize,
    inner: usize,
    start: usize,
) {
    if inner == 1 {
        // Rows of `len` against the whole small operand.
        for (orow, xrow) in o.chunks_mut(len).zip(x.chunks(len)) {
            for ((d, &p), &q) in orow.iter_mut().zip(xrow).zip(y) {
                d.write(f(p, q));
            }
        }
    } else {
        // Blocks of `inner` against one scalar each.
        let first = start / inner;
        for (j, (ob, xb)) in o.chunks_mut(inner).zip(x.chunks(inner)).enumerate() {
            let q = y[(first + j) % len];
            for (d, &p) in ob.iter_mut().zip(xb) {
                d.write(f(p, q));
            }
        }
    }
}

simd_dispatch!(
    binary_chunk,
    <F: BinaryFn>,
    (f: F, o: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], len: usize, inner: usize, start: usize),
    binary_chunk_body(f, o, x, y, len, inner, start)
);

/// Outer blocks of `hole * inner` elements (the first is block `first`), each against its own
/// `inner`-long row of `y`.
#[inline(always)]
fn hole_chunk_body<F: Fn(f32, f32) -> f32 + Copy>(
    f: F,
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    y: &[f32],
    first: usize,
    hole: usize,
    inner: usize,
) {
    for (k, (ob, xb)) in o.chunks_mut(hole * inner).zip(x.chunks(hole * inner)).enumerate() {
        let row = &y[(first + k) * inner..][..inner];
        for (orow, xrow) in ob.chunks_mut(inner).zip(xb.chunks(inner)) {
            for ((d, &p), &q) in orow.iter_mut().zip(xrow).zip(row) {
                d.write(f(p, q));
            }
        }
    }
}

simd_dispatch!(
    hole_chunk,
    <F: BinaryFn>,
    (f: F, o: &mut [MaybeUninit<f32>], x: &[f32], y: &[f32], first: usize, hole: usize, inner: usize),
    hole_chunk_body(f, o, x, y, first, hole, inner)
);

/// The closures a binary kernel is instantiated with.
trait BinaryFn: Fn(f32, f32) -> f32 + Copy {}
impl<T: Fn(f32, f32) -> f32 + Copy> BinaryFn for T {}

/// `e^x` for f32 without libm calls, so loops over it vectorise (relative error about 2e-7).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    const C: [f32; 7] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0];
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (C[6] + r * (C[5] + r * (C[4] + r * (C[3] + r * (C[2] + r * (C[1] + r * C[0]))))));
    // The integer n sits in the low mantissa bits of `shifted`: integer arithmetic on the bits (a float to
    // int cast would not vectorise: Rust's saturating cast is scalar code per lane).
    let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    f32::from_bits((ni.wrapping_add(127) << 23) as u32) * p
}

/// tanh(x) as expm1(2x) / (expm1(2x) + 2), with expm1 by its Taylor series near 0 (where exp(y) - 1
/// would cancel) and by [`exp`] elsewhere; both computed and one selected, so loops vectorise.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let y = 2.0 * x;
    const C: [f32; 6] = [0.5, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0];
    let series = y * (1.0 + y * (C[0] + y * (C[1] + y * (C[2] + y * (C[3] + y * (C[4] + y * C[5]))))));
    let em = if y.abs() < 0.35 { series } else { exp(y) - 1.0 };
    em / (em + 2.0)
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, 5e-7 in f32), vectorisable.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-ax * ax);
    y.copysign(x)
}

/// The exact (erf) GELU.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// A unary elementwise op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// erf
    Erf,
    /// e^x
    Exp,
    /// max(x, 0)
    Relu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// x * (1 + erf(x / sqrt 2)) / 2, the exact GELU
    Gelu,
    /// min(max(x, lo), hi)
    Clip(f32, f32),
    /// x * min(max(x / 6 + 1/2, 0), 1)
    HardSwish,
    /// min(max(alpha * x + beta, 0), 1)
    HardSigmoid(f32, f32),
    /// x / (1 + e^-x), what exporters spell Mul(x, Sigmoid(x))
    Silu,
    /// tanh(x)
    Tanh,
    /// x^2
    Square,
    /// x^3 (the tanh GELU's Pow(x, 3))
    Cube,
    /// x when x >= 0, else alpha * x
    LeakyRelu(f32),
}

/// Applies `op` to every element.
pub fn unary(op: Unary, t: &Tensor) -> Result<Tensor> {
    let n = t.elem_count();
    let out = with_data(t, |x| match op {
        // One instantiation per op so each loop body is branch-free and vectorises.
        Unary::Erf => par_build(n, 1, |s, o| map_chunk(erf, o, &x[s..s + o.len()])),
        Unary::Exp => par_build(n, 1, |s, o| map_chunk(exp, o, &x[s..s + o.len()])),
        Unary::Relu => par_build(n, 1, |s, o| map_chunk(|v: f32| v.max(0.0), o, &x[s..s + o.len()])),
        Unary::Sigmoid => par_build(n, 1, |s, o| map_chunk(|v: f32| 1.0 / (1.0 + exp(-v)), o, &x[s..s + o.len()])),
        Unary::Gelu => par_build(n, 1, |s, o| map_chunk(gelu, o, &x[s..s + o.len()])),
        Unary::Clip(lo, hi) => par_build(n, 1, |s, o| map_chunk(|v: f32| v.max(lo).min(hi), o, &x[s..s + o.len()])),
        Unary::HardSwish => {
            par_build(n, 1, |s, o| map_chunk(|v: f32| v * (v / 6.0 + 0.5).clamp(0.0, 1.0), o, &x[s..s + o.len()]))
        }
        Unary::HardSigmoid(a, b) => {
            par_build(n, 1, |s, o| map_chunk(|v: f32| (a * v + b).clamp(0.0, 1.0), o, &x[s..s + o.len()]))
        }
        Unary::Tanh => par_build(n, 1, |s, o| map_chunk(tanh, o, &x[s..s + o.len()])),
        Unary::Square => par_build(n, 1, |s, o| map_chunk(|v: f32| v * v, o, &x[s..s + o.len()])),
        Unary::Cube => par_build(n, 1, |s, o| map_chunk(|v: f32| v * v * v, o, &x[s..s + o.len()])),
        Unary::Silu => par_build(n, 1, |s, o| map_chunk(|v: f32| v / (1.0 + exp(-v)), o, &x[s..s + o.len()])),
        Unary::LeakyRelu(a) => {
            par_build(n, 1, |s, o| map_chunk(|v: f32| if v >= 0.0 { v } else { a * v }, o, &x[s..s + o.len()]))
        }
    })?;
    tensor(out, t.dims())
}

#[inline(always)]
fn gelu_body(o: &mut [f32]) {
    o.iter_mut().for_each(|v| *v = gelu(*v));
}

simd_dispatch!(gelu_slice, <>, (o: &mut [f32]), gelu_body(o));

/// GELU of every element of `o`, in place, on this thread (an epilogue for a block just computed).
pub fn gelu_in_place(o: &mut [f32]) {
    gelu_slice(o)
}

#[inline(always)]
fn silu_body(o: &mut [f32]) {
    o.iter_mut().for_each(|v| *v /= 1.0 + exp(-*v));
}

simd_dispatch!(silu_slice, <>, (o: &mut [f32]), silu_body(o));

/// SiLU (`x / (1 + e^-x)`, as [`Unary::Silu`]) of every element of `o`, in place, on this thread: the
/// epilogue of a conv block just computed.
pub fn silu_in_place(o: &mut [f32]) {
    silu_slice(o)
}

#[inline(always)]
fn hard_swish_body(o: &mut [f32]) {
    o.iter_mut().for_each(|v| *v *= (*v / 6.0 + 0.5).clamp(0.0, 1.0));
}

simd_dispatch!(hard_swish_slice, <>, (o: &mut [f32]), hard_swish_body(o));

/// HardSwish (as [`Unary::HardSwish`]) of every element of `o`, in place, on this thread: a conv epilogue.
pub fn hard_swish_in_place(o: &mut [f32]) {
    hard_swish_slice(o)
}

#[inline(always)]
fn map_chunk_body<F: Fn(f32) -> f32 + Copy>(f: F, o: &mut [MaybeUninit<f32>], x: &[f32]) {
    for (d, &v) in o.iter_mut().zip(x) {
        d.write(f(v));
    }
}

simd_dispatch!(map_chunk, <F: UnaryFn>, (f: F, o: &mut [MaybeUninit<f32>], x: &[f32]), map_chunk_body(f, o, x));

/// The closures a unary kernel is instantiated with.
trait UnaryFn: Fn(f32) -> f32 + Copy {}
impl<T: Fn(f32) -> f32 + Copy> UnaryFn for T {}

/// Softmax over the last dim.
pub fn softmax_last(t: &Tensor) -> Result<Tensor> {
    let d = t.dims().last().copied().unwrap_or(1).max(1);
    let out = with_data(t, |x| par_build(t.elem_count(), d, |s, o| softmax_chunk(o, &x[s..s + o.len()], d)))?;
    tensor(out, t.dims())
}

/// Sum with 16 independent accumulators, so the loop vectorises (a single f32 accumulator is a serial
/// dependency the compiler may not reorder).
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn lane_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter().chain(chunks.remainder()).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn softmax_body(o: &mut [MaybeUninit<f32>], x: &[f32], d: usize) {
    let mut e = vec![0f32; d];
    for (orow, xrow) in o.chunks_mut(d).zip(x.chunks(d)) {
        let m = lane_max(xrow);
        for (ei, &v) in e.iter_mut().zip(xrow) {
            *ei = exp(v - m);
        }
        let inv = 1.0 / lane_sum(&e);
        for (o, &ei) in orow.iter_mut().zip(&e) {
            o.write(ei * inv);
        }
    }
}

simd_dispatch!(softmax_chunk, <>, (o: &mut [MaybeUninit<f32>], x: &[f32], d: usize), softmax_body(o, x, d));

/// Layer norm over the last `inner` elements of each row, with scale and bias of length `inner`.
pub fn layer_norm(t: &Tensor, inner: usize, scale: &Tensor, bias: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    let g = scale.flatten_all()?.to_vec1::<f32>()?;
    let b = match bias {
        Some(b) => b.flatten_all()?.to_vec1::<f32>()?,
        None => vec![0.0; inner],
    };
    if g.len() != inner || b.len() != inner {
        return Err(candle_core::Error::Msg(format!(
            "layer norm: scale/bias of {}/{} values for rows of {inner}",
            g.len(),
            b.len()
        ))
        .into());
    }
    let out = with_data(t, |x| {
        par_build(t.elem_count(), inner, |s, o| layer_norm_chunk(o, &x[s..s + o.len()], &g, &b, inner, eps))
    })?;
    tensor(out, t.dims())
}

#[inline(always)]
fn layer_norm_body(o: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32], b: &[f32], inner: usize, eps: f32) {
    for (orow, xrow) in o.chunks_mut(inner).zip(x.chunks(inner)) {
        let mean = lane_sum(xrow) / inner as f32;
        let mut sq = [0f32; 16];
        let mut chunks = xrow.chunks_exact(16);
        for c in &mut chunks {
            for (a, &v) in sq.iter_mut().zip(c) {
                *a += (v - mean) * (v - mean);
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
        let var = (sq.iter().sum::<f32>() + rest) / inner as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((d, &v), &gi), &bi) in orow.iter_mut().zip(xrow).zip(g).zip(b) {
            d.write((v - mean) * inv * gi + bi);
        }
    }
}

simd_dispatch!(
    layer_norm_chunk,
    <>,
    (o: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32], b: &[f32], inner: usize, eps: f32),
    layer_norm_body(o, x, g, b, inner, eps)
);

/// Geometry of a 2-D convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    /// Kernel height and width.
    pub k: (usize, usize),
    /// Strides.
    pub s: (usize, usize),
    /// Dilations.
    pub d: (usize, usize),
    /// Padding top, left, bottom, right.
    pub pads: [usize; 4],
}

impl ConvGeom {
    /// Output height and width for an input of `h` x `w`.
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let span = |inp: usize, p0: usize, p1: usize, k: usize, s: usize, d: usize| {
            (inp + p0 + p1).saturating_sub((k - 1) * d + 1) / s + 1
        };
        (
            span(h, self.pads[0], self.pads[2], self.k.0, self.s.0, self.d.0),
            span(w, self.pads[1], self.pads[3], self.k.1, self.s.1, self.d.1),
        )
    }
}

/// A dense (group 1) convolution NCHW as one gemm per image: `W[M, C*kh*kw] x cols[C*kh*kw, oh*ow]`, the
/// columns gathered from the image (skipped for 1x1 stride-1 unpadded kernels), plus the bias.
/// `act` = Some((lo, hi)) clamps the output (a fused Relu/Clip).
pub fn conv_dense(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: ConvGeom,
    act: Option<(f32, f32)>,
) -> Result<Tensor> {
    conv_grouped(x, w, bias, g, 1, act)
}

/// A grouped convolution NCHW (RegNet/ResNeXt-style: several channels per group) as one gemm per image
/// and group on slices of the image, weights and output (no copies): candle's conv2d splits groups
/// into separate tensors and convs, 5-6x slower than ONNX Runtime on RegNetY.
pub fn conv_grouped(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: ConvGeom,
    groups: usize,
    act: Option<(f32, f32)>,
) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let m = w.dims()[0];
    let (cg, mg) = (c / groups.max(1), m / groups.max(1));
    let (oh, ow) = g.out_size(h, wd);
    let kk = cg * g.k.0 * g.k.1;
    let ws = w.flatten_all()?.to_vec1::<f32>()?;
    let bs = match bias {
        Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let direct = g.k == (1, 1) && g.s == (1, 1) && g.pads == [0; 4];
    let plane = oh * ow;
    let mut out = vec![0f32; n * m * plane];
    let threads = rayon::current_num_threads();
    // Images in parallel when there are enough of them; otherwise each gemm uses every thread.
    let per_image = n >= threads;
    let run_image = |xs: &[f32], i: usize, o: &mut [f32]| {
        if let Some(b) = &bs {
            for (ch, row) in o.chunks_mut(plane).enumerate() {
                row.fill(b[ch]);
            }
        }
        let img = &xs[i * c * h * wd..(i + 1) * c * h * wd];
        let par = if per_image { Parallelism::None } else { Parallelism::Rayon(threads) };
        for (gi, og) in o.chunks_mut(mg * plane).enumerate() {
            let src = &img[gi * cg * h * wd..(gi + 1) * cg * h * wd];
            let cols_owned;
            let cols: &[f32] = if direct {
                src
            } else {
                cols_owned = im2col(src, cg, h, wd, oh, ow, g);
                &cols_owned
            };
            let wg = &ws[gi * mg * kk..(gi + 1) * mg * kk];
            sgemm((mg, plane, kk), og, wg, (kk as isize, 1), cols, (plane as isize, 1), bs.is_some(), par);
        }
        if let Some((lo, hi)) = act {
            // While this image's output is still warm in cache.
            clamp_slice(o, lo, hi);
        }
    };
    with_data(x, |xs| {
        if per_image {
            out.par_chunks_mut(m * plane).enumerate().for_each(|(i, o)| run_image(xs, i, o));
        } else {
            out.chunks_mut(m * plane).enumerate().for_each(|(i, o)| run_image(xs, i, o));
        }
    })?;
    tensor(out, &[n, m, oh, ow])
}

/// Clip/Relu6 as a candle op with a one-pass backward (`grad * (lo < x < hi)`); candle's
/// maximum/minimum backward builds several full-size masks per op.
pub struct ClampOp {
    /// Lower bound.
    pub lo: f32,
    /// Upper bound.
    pub hi: f32,
}

impl candle_core::CustomOp1 for ClampOp {
    fn name(&self) -> &'static str {
        "clamp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let x = cpu_slice(s, l, "clamp")?;
        let (lo, hi) = (self.lo, self.hi);
        let out = par_build(x.len(), 1, |s, o| map_chunk(|v: f32| v.max(lo).min(hi), o, &x[s..s + o.len()]));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (lo, hi) = (self.lo, self.hi);
        let out = par_build(x.len(), 1, |s, o| {
            let n = o.len();
            for ((d, &v), &gv) in o.iter_mut().zip(&x[s..s + n]).zip(&g[s..s + n]) {
                d.write(if v > lo && v < hi { gv } else { 0.0 });
            }
        });
        Ok(Some(Tensor::from_vec(out, arg.dims(), arg.device())?))
    }
}

#[inline(always)]
fn clamp_body(o: &mut [f32], lo: f32, hi: f32) {
    o.iter_mut().for_each(|v| *v = v.max(lo).min(hi));
}

simd_dispatch!(clamp_slice, <>, (o: &mut [f32], lo: f32, hi: f32), clamp_body(o, lo, hi));

/// Gathers the input patches of one image into `[C*kh*kw, oh*ow]` (zeros where padding).
fn im2col(img: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize, g: ConvGeom) -> Vec<f32> {
    let (kh, kw) = g.k;
    let mut cols = vec![0f32; c * kh * kw * oh * ow];
    for ch in 0..c {
        let src = &img[ch * h * w..(ch + 1) * h * w];
        for i in 0..kh {
            for j in 0..kw {
                let row = (ch * kh + i) * kw + j;
                let dst = &mut cols[row * oh * ow..(row + 1) * oh * ow];
                for oy in 0..oh {
                    let iy = (oy * g.s.0 + i * g.d.0) as isize - g.pads[0] as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let srow = &src[iy as usize * w..(iy as usize + 1) * w];
                    for ox in 0..ow {
                        let ix = (ox * g.s.1 + j * g.d.1) as isize - g.pads[1] as isize;
                        if ix >= 0 && ix < w as isize {
                            dst[oy * ow + ox] = srow[ix as usize];
                        }
                    }
                }
            }
        }
    }
    cols
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: Vec<f32>, dims: &[usize]) -> Tensor {
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= tol, "max diff {d} > {tol}");
    }

    fn seq(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * scale).collect()
    }

    #[test]
    fn exp_and_erf_match_libm() {
        for i in -2000..2000 {
            let x = i as f32 / 100.0;
            let e = exp(x);
            assert!(((e - x.exp()) / x.exp()).abs() < 5e-7, "exp({x}) = {e}");
            let r = erf(x);
            let want = libm_erf(x as f64);
            assert!((r as f64 - want).abs() < 5e-7, "erf({x}) = {r}, want {want}");
            let (th, want) = (tanh(x) as f64, (x as f64).tanh());
            assert!((th - want).abs() <= 1e-6 * want.abs().max(1e-3), "tanh({x}) = {th}, want {want}");
        }
        for x in [1e-6f32, -3e-5, 0.17, -0.174, 0.176, 60.0, -60.0] {
            let (th, want) = (tanh(x) as f64, (x as f64).tanh());
            assert!((th - want).abs() <= 1e-6 * want.abs(), "tanh({x}) = {th}, want {want}");
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
    }

    /// erf by its Taylor/continued-fraction-free series in f64, for the check above.
    fn libm_erf(x: f64) -> f64 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1)) converges slowly for large |x|; use
        // erfc's asymptotic tail there.
        if x.abs() > 3.0 {
            let y = x.abs();
            let mut term = 1.0;
            let mut sum = 1.0;
            for n in 1..8 {
                term *= -((2 * n - 1) as f64) / (2.0 * y * y);
                sum += term;
            }
            let erfc = (-y * y).exp() / (y * std::f64::consts::PI.sqrt()) * sum;
            return (1.0 - erfc).copysign(x);
        }
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..200 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn contiguous_copies_permuted_and_narrowed_views() {
        let x = t(seq(2 * 3 * 4 * 5, 1.0), &[2, 3, 4, 5]);
        for v in [
            x.permute((0, 2, 1, 3)).unwrap(),
            x.permute((3, 1, 0, 2)).unwrap(),
            x.narrow(2, 1, 2).unwrap().transpose(0, 3).unwrap(),
        ] {
            let got = contiguous(&v).unwrap();
            assert!(got.is_contiguous());
            assert_eq!(got.dims(), v.dims());
            let want = v.contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
    }

    #[test]
    fn matmul_matches_candle_for_broadcasts_and_views() {
        let a = t(seq(2 * 3 * 5 * 4, 1.0), &[2, 3, 5, 4]);
        let b = t(seq(3 * 4 * 6, 0.5), &[3, 4, 6]);
        close(&matmul(&a, &b).unwrap().unwrap(), &a.broadcast_matmul(&b).unwrap(), 1e-5);
        // A transposed view on the right, as attention's q @ k^T reads it.
        let k = t(seq(2 * 3 * 6 * 4, 1.0), &[2, 3, 6, 4]);
        let kt = k.transpose(2, 3).unwrap();
        close(&matmul(&a, &kt).unwrap().unwrap(), &a.matmul(&kt.contiguous().unwrap()).unwrap(), 1e-5);
        // A 2-D right side folds the batch into rows; a strided left side does not.
        let w = t(seq(4 * 7, 1.0), &[4, 7]);
        close(&matmul(&a, &w).unwrap().unwrap(), &a.broadcast_matmul(&w).unwrap(), 1e-5);
        let at = t(seq(2 * 3 * 4 * 5, 1.0), &[2, 3, 4, 5]).transpose(2, 3).unwrap();
        close(&matmul(&at, &w).unwrap().unwrap(), &at.contiguous().unwrap().broadcast_matmul(&w).unwrap(), 1e-5);
        // Many batches (the parallel-over-batch path).
        let a = t(seq(64 * 3 * 5, 1.0), &[64, 3, 5]);
        let b = t(seq(64 * 5 * 2, 1.0), &[64, 5, 2]);
        close(&matmul(&a, &b).unwrap().unwrap(), &a.matmul(&b).unwrap(), 1e-5);
        assert!(matmul(&t(vec![1.0; 3], &[3]), &b).unwrap().is_none());
    }

    #[test]
    fn binary_broadcasts_match_candle() {
        let a = t(seq(2 * 3 * 4 * 5, 1.0), &[2, 3, 4, 5]);
        for (bd, name) in [
            (vec![5], "bias over the last dim"),
            (vec![3, 1, 1], "per channel"),
            (vec![1], "scalar"),
            (vec![2, 3, 4, 5], "same shape"),
            (vec![4, 5], "last two dims"),
            (vec![2, 3, 1, 5], "a hole (a channel-blocked per-channel scale)"),
        ] {
            let b = t(seq(bd.iter().product(), 0.7).iter().map(|v| v + 2.0).collect(), &bd);
            for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
                let want = match op {
                    Binary::Add => a.broadcast_add(&b),
                    Binary::Sub => a.broadcast_sub(&b),
                    Binary::Mul => a.broadcast_mul(&b),
                    Binary::Div => a.broadcast_div(&b),
                }
                .unwrap();
                let got = binary(op, &a, &b).unwrap().unwrap_or_else(|| panic!("{name}: not handled"));
                close(&got, &want, 1e-6);
                // Swapped operands (the small one on the left).
                let want = match op {
                    Binary::Add => b.broadcast_add(&a),
                    Binary::Sub => b.broadcast_sub(&a),
                    Binary::Mul => b.broadcast_mul(&a),
                    Binary::Div => b.broadcast_div(&a),
                }
                .unwrap();
                close(&binary(op, &b, &a).unwrap().unwrap(), &want, 1e-5);
            }
        }
        // Both sides broadcasting ([3,1] with [1,4]) is left to candle.
        assert!(binary(Binary::Add, &t(vec![1.0; 3], &[3, 1]), &t(vec![1.0; 4], &[1, 4])).unwrap().is_none());
    }

    #[test]
    fn softmax_layer_norm_and_unary_match_candle() {
        let x = t(seq(6 * 49, 8.0), &[6, 49]);
        close(&softmax_last(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap(), 1e-6);
        let g = t(seq(49, 1.0), &[49]);
        let b = t(seq(49, 0.3), &[49]);
        close(
            &layer_norm(&x, 49, &g, Some(&b), 1e-5).unwrap(),
            &candle_nn::ops::layer_norm(&x, &g, &b, 1e-5).unwrap(),
            1e-5,
        );
        close(&unary(Unary::Relu, &x).unwrap(), &x.relu().unwrap(), 0.0);
        let leaky = (x.relu().unwrap() - (x.neg().unwrap().relu().unwrap() * 0.1).unwrap()).unwrap();
        close(&unary(Unary::LeakyRelu(0.1), &x).unwrap(), &leaky, 1e-7);
        close(&unary(Unary::Clip(0.0, 6.0), &x).unwrap(), &x.clamp(0f32, 6f32).unwrap(), 0.0);
        close(&unary(Unary::Sigmoid, &x).unwrap(), &candle_nn::ops::sigmoid(&x).unwrap(), 1e-6);
        close(&unary(Unary::Erf, &x).unwrap(), &x.erf().unwrap(), 5e-7);
        close(&unary(Unary::Gelu, &x).unwrap(), &x.gelu_erf().unwrap(), 5e-6);
        let w = t(seq(49 * 5, 1.0), &[49, 5]);
        let bias = t(seq(5, 3.0), &[5]);
        close(
            &matmul_bias(&x, &w, Some(&bias)).unwrap().unwrap(),
            &x.matmul(&w).unwrap().broadcast_add(&bias).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn dense_conv_matches_candle() {
        let x = t(seq(2 * 3 * 9 * 8, 1.0), &[2, 3, 9, 8]);
        let w = t(seq(4 * 3 * 3 * 3, 0.5), &[4, 3, 3, 3]);
        let b = t(vec![0.1, -0.2, 0.3, 0.0], &[4]);
        for (s, p) in [(1, 0), (1, 1), (2, 1)] {
            let g = ConvGeom { k: (3, 3), s: (s, s), d: (1, 1), pads: [p; 4] };
            let want = x.conv2d(&w, p, s, 1, 1).unwrap().broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
            close(&conv_dense(&x, &w, Some(&b), g, None).unwrap(), &want, 1e-5);
        }
        let w1 = t(seq(5 * 3, 0.5), &[5, 3, 1, 1]);
        let g = ConvGeom { k: (1, 1), s: (1, 1), d: (1, 1), pads: [0; 4] };
        close(&conv_dense(&x, &w1, None, g, None).unwrap(), &x.conv2d(&w1, 0, 1, 1, 1).unwrap(), 1e-5);
        let want = x.conv2d(&w1, 0, 1, 1, 1).unwrap().clamp(0f32, 0.5f32).unwrap();
        close(&conv_dense(&x, &w1, None, g, Some((0.0, 0.5))).unwrap(), &want, 1e-5);
    }
}
