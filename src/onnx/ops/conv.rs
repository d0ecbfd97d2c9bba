//! 2-D convolution for the importer: padding rules (explicit, SAME_UPPER/LOWER), candle's conv2d for
//! dense and grouped convs, and a direct kernel for depthwise convs, which candle runs as one conv per
//! channel (about 100x slower than ONNX Runtime on MobileNet-style blocks).

use candle_core::Tensor;
use candle_onnx::onnx::NodeProto;

use super::{node_err, pad_spatial, Attrs};
use crate::error::Result;
use crate::onnx::kernels;
use crate::util::device::own_kernels_for;

/// ONNX Conv on an NCHW tensor.
pub fn conv(node: &NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    conv_act(node, x, w, b, None)
}

/// The geometry of an ONNX Conv node for an input of `x` dims and weight `w` dims: kernel, strides,
/// dilations, resolved padding, and the group count.
pub fn geometry(node: &NodeProto, x: &[usize], w: &[usize]) -> Result<(kernels::ConvGeom, usize)> {
    let at = Attrs(node);
    if x.len() != 4 || w.len() != 4 {
        return Err(node_err(node, format!("only 2-D convolution is supported; input {x:?}, weight {w:?}")));
    }
    let (c, h, wd) = (x[1], x[2], x[3]);
    let (m, cg, kh, kw) = (w[0], w[1], w[2], w[3]);
    let group = at.int("group", 1).max(1) as usize;
    if let Some(ks) = at.ints("kernel_shape").filter(|ks| ks.as_slice() != [kh as i64, kw as i64]) {
        return Err(node_err(node, format!("kernel_shape {ks:?} does not match the weight {w:?}")));
    }
    if cg * group != c || m % group != 0 {
        return Err(node_err(node, format!("weight {w:?} with group {group} does not fit input {x:?}")));
    }
    let strides = at.ints("strides").unwrap_or(vec![1, 1]);
    let dil = at.ints("dilations").unwrap_or(vec![1, 1]);
    if strides.len() != 2 || dil.len() != 2 || strides.iter().chain(&dil).any(|&v| v < 1) {
        return Err(node_err(node, "strides and dilations must be two positive numbers"));
    }
    let (sh, sw) = (strides[0] as usize, strides[1] as usize);
    let (dh, dw) = (dil[0] as usize, dil[1] as usize);
    let auto = at.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let pads: Vec<i64> = match auto.as_str() {
        "SAME_UPPER" | "SAME_LOWER" => {
            let same = |inp: usize, k: usize, s: usize, d: usize| {
                let out = inp.div_ceil(s);
                let total = ((out - 1) * s + (k - 1) * d + 1).saturating_sub(inp) as i64;
                let small = total / 2;
                if auto == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            };
            let (t, bm) = same(h, kh, sh, dh);
            let (l, r) = same(wd, kw, sw, dw);
            vec![t, l, bm, r]
        }
        "VALID" => vec![0; 4],
        _ => at.ints("pads").unwrap_or(vec![0; 4]),
    };
    if pads.len() != 4 || pads.iter().any(|&p| p < 0) {
        return Err(node_err(node, format!("pads {pads:?}: expected 4 non-negative values")));
    }
    let p = |i: usize| pads[i] as usize;
    Ok((kernels::ConvGeom { k: (kh, kw), s: (sh, sw), d: (dh, dw), pads: [p(0), p(1), p(2), p(3)] }, group))
}

/// `y` after a fused conv epilogue (the paths without a blocked kernel).
pub(crate) fn epilogue(y: Tensor, e: kernels::nchwc::Epilogue) -> Result<Tensor> {
    match e {
        kernels::nchwc::Epilogue::None => Ok(y),
        kernels::nchwc::Epilogue::Silu => super::unary::silu(&y),
        kernels::nchwc::Epilogue::Gelu => super::unary::gelu(&y),
        kernels::nchwc::Epilogue::HardSwish => super::unary::hard_swish(&y),
    }
}

/// ONNX Conv followed by a clamp to `act` = (lo, hi) (a fused Relu/Clip; only on the fast CPU path, where
/// the plan fuses it).
pub fn conv_act(
    node: &NodeProto,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Option<(f32, f32)>,
) -> Result<Tensor> {
    if x.rank() == 3 && w.rank() == 3 {
        // 1-D as 2-D with an identity height axis.
        let y = conv_act(&as_2d(node), &x.unsqueeze(2)?, &w.unsqueeze(2)?, b, act)?;
        return Ok(y.squeeze(2)?);
    }
    let (geom, group) = geometry(node, x.dims(), w.dims())?;
    let (c, m, cg) = (x.dims()[1], w.dims()[0], w.dims()[1]);
    let ((kh, kw), (sh, sw), (dh, dw)) = (geom.k, geom.s, geom.d);
    let pads: Vec<i64> = geom.pads.iter().map(|&p| p as i64).collect();
    let depthwise = group == c && group == m && cg == 1;
    let fast = kernels::usable(&[x, w]) && b.is_none_or(|b| kernels::usable(&[b]));
    if fast && group == 1 {
        return kernels::conv_dense(x, w, b, geom, act);
    }
    if fast && depthwise {
        return kernels::conv_depthwise(x, w, b, geom, act);
    }
    if fast && group > 1 {
        return kernels::conv_grouped(x, w, b, geom, group, act);
    }
    let cpu_f32 = own_kernels_for(x) && own_kernels_for(w);
    let y = if depthwise && cpu_f32 {
        // Differentiable and fast: candle would run one conv per channel, forward and backward.
        x.contiguous()?.apply_op2(&w.contiguous()?, kernels::DepthwiseOp { g: geom })?
    } else if cpu_f32 && group == 1 && (kh, kw) == (1, 1) && (sh, sw) == (1, 1) && pads.iter().all(|&p| p == 0) {
        x.contiguous()?.apply_op2(&w.contiguous()?, kernels::PointwiseOp)?
    } else {
        dense_candle(node, x, w, &pads, (sh, sw), (dh, dw), group)?
    };
    let y = match b {
        Some(b) => bias_add(&y, &b.reshape((1, m, 1, 1))?)?,
        None => y,
    };
    match act {
        Some((lo, hi)) if cpu_f32 => Ok(y.contiguous()?.apply_op1(kernels::ClampOp { lo, hi })?),
        Some((lo, hi)) => Ok(y.maximum(lo as f64)?.minimum(hi as f64)?),
        None => Ok(y),
    }
}

/// A 1-D Conv node's attributes for the same conv on [N, C, 1, L]: a height axis of kernel, stride and
/// dilation 1 and no padding.
fn as_2d(node: &NodeProto) -> NodeProto {
    let mut n = node.clone();
    for a in &mut n.attribute {
        match a.name.as_str() {
            "strides" | "dilations" | "kernel_shape" if a.ints.len() == 1 => a.ints.insert(0, 1),
            "pads" if a.ints.len() == 2 => a.ints = vec![0, a.ints[0], 0, a.ints[1]],
            _ => {}
        }
    }
    n
}

/// candle's own (differentiable) conv2d.
fn dense_candle(
    node: &NodeProto,
    x: &Tensor,
    w: &Tensor,
    pads: &[i64],
    (sh, sw): (usize, usize),
    (dh, dw): (usize, usize),
    group: usize,
) -> Result<Tensor> {
    // candle's conv2d takes one symmetric padding for both dims; otherwise pad explicitly.
    let (xp, p) = if pads.iter().all(|&p| p == pads[0]) {
        (x.clone(), pads[0] as usize)
    } else {
        (pad_spatial(x, pads, 0.0)?, 0)
    };
    if sh != sw || dh != dw {
        return Err(node_err(node, "different strides or dilations per axis are not supported"));
    }
    Ok(xp.contiguous()?.conv2d(&w.contiguous()?, p, sh, dh, group)?)
}

/// One spatial axis of a ConvTranspose: kernel, stride, dilation, output padding and the
/// resolved padding at both ends.
#[derive(Debug, Clone, Copy)]
struct TAxis {
    k: usize,
    s: usize,
    d: usize,
    out_pad: i64,
    pads: (i64, i64),
}

/// Resolves the per-axis geometry of a ConvTranspose (explicit pads, `auto_pad`, or `output_shape`).
fn transpose_axes(node: &NodeProto, x: &[usize], w: &[usize]) -> Result<Vec<TAxis>> {
    let at = Attrs(node);
    let sp = x.len() - 2;
    let list = |name: &str, default: i64, len: usize| -> Result<Vec<i64>> {
        let v = at.ints(name).unwrap_or(vec![default; len]);
        match v.len() == len {
            true => Ok(v),
            false => Err(node_err(node, format!("`{name}` has {} values, expected {len}", v.len()))),
        }
    };
    let (s, d, op) = (list("strides", 1, sp)?, list("dilations", 1, sp)?, list("output_padding", 0, sp)?);
    if s.iter().chain(&d).any(|&v| v < 1) || op.iter().any(|&v| v < 0) {
        return Err(node_err(node, "strides and dilations must be positive, output_padding non-negative"));
    }
    if let Some(ks) = at.ints("kernel_shape").filter(|ks| ks.iter().zip(&w[2..]).any(|(&k, &d)| k != d as i64)) {
        return Err(node_err(node, format!("kernel_shape {ks:?} does not match the weight {w:?}")));
    }
    let pads = list("pads", 0, 2 * sp)?;
    let auto = at.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let target = at.ints("output_shape").map(|o| o[o.len().saturating_sub(sp)..].to_vec());
    (0..sp)
        .map(|i| {
            let (n, k) = (x[2 + i], w[2 + i]);
            let full = s[i] * (n as i64 - 1) + op[i] + (k as i64 - 1) * d[i] + 1;
            // Floor division, as the spec's reference: a negative total pads the end.
            let split = |total: i64, upper: bool| match upper {
                true => (total.div_euclid(2), total - total.div_euclid(2)),
                false => (total - total.div_euclid(2), total.div_euclid(2)),
            };
            let pads = match (&target, auto.as_str()) {
                (Some(t), a) => split(full - t.get(i).copied().unwrap_or(full), a == "SAME_UPPER"),
                (None, "SAME_UPPER" | "SAME_LOWER") => split(full - n as i64 * s[i], auto == "SAME_UPPER"),
                (None, "VALID") => (0, 0),
                (None, "NOTSET") => (pads[i], pads[i + sp]),
                (None, a) => return Err(node_err(node, format!("auto_pad \"{a}\" is not known"))),
            };
            Ok(TAxis { k, s: s[i] as usize, d: d[i] as usize, out_pad: op[i], pads })
        })
        .collect()
}

/// Inserts `s - 1` zeros between the elements of `axis`.
fn dilate(t: &Tensor, axis: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(t.clone());
    }
    let n = t.dims()[axis];
    let x = t.unsqueeze(axis + 1)?;
    let mut zd = x.dims().to_vec();
    zd[axis + 1] = s - 1;
    let y = Tensor::cat(&[&x, &Tensor::zeros(zd.as_slice(), x.dtype(), x.device())?], axis + 1)?;
    let mut merged = t.dims().to_vec();
    merged[axis] = n * s;
    Ok(y.reshape(merged.as_slice())?.narrow(axis, 0, (n - 1) * s + 1)?)
}

/// ONNX ConvTranspose on [N, C, L] or [N, C, H, W]: a stride-1 convolution of the zero-dilated, padded
/// input with the flipped, transposed kernel (candle ops, so gradients flow; the fast conv when dense).
pub fn conv_transpose(node: &NodeProto, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !matches!(x.rank(), 3 | 4) || w.rank() != x.rank() {
        return Err(node_err(
            node,
            format!("only 1-D and 2-D ConvTranspose; input {:?}, weight {:?}", x.dims(), w.dims()),
        ));
    }
    let group = Attrs(node).int("group", 1).max(1) as usize;
    let c = x.dims()[1];
    if w.dims()[0] != c || !c.is_multiple_of(group) {
        return Err(node_err(
            node,
            format!("weight {:?} with group {group} does not fit input {:?}", w.dims(), x.dims()),
        ));
    }
    let mut axes = transpose_axes(node, x.dims(), w.dims())?;
    if x.rank() == 3 {
        // 1-D as 2-D with an identity height axis.
        axes.insert(0, TAxis { k: 1, s: 1, d: 1, out_pad: 0, pads: (0, 0) });
        let y = transpose_2d(node, &x.unsqueeze(2)?, &w.unsqueeze(2)?, b, &axes, group)?;
        return Ok(y.squeeze(2)?);
    }
    transpose_2d(node, x, w, b, &axes, group)
}

fn transpose_2d(
    node: &NodeProto,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    axes: &[TAxis],
    group: usize,
) -> Result<Tensor> {
    let mut xp = x.clone();
    for (i, a) in axes.iter().enumerate() {
        let reach = (a.d * (a.k - 1)) as i64;
        xp = dilate(&xp, 2 + i, a.s)?;
        xp = super::pad_axis(&xp, 2 + i, reach - a.pads.0, reach - a.pads.1 + a.out_pad, 0.0)?;
    }
    // [C, M/g, kh, kw] -> [M, C/g, kh, kw], flipped in both spatial axes.
    let (c, mg, kh, kw) = w.dims4()?;
    let cg = c / group;
    let wt = w.reshape((group, cg, mg, kh, kw))?.permute((0, 2, 1, 3, 4))?.reshape((group * mg, cg, kh, kw))?;
    let rev = |n: usize| Tensor::from_vec((0..n as u32).rev().collect::<Vec<u32>>(), n, w.device());
    let wt = wt.contiguous()?.index_select(&rev(kh)?, 2)?.index_select(&rev(kw)?, 3)?;
    let (dh, dw) = (axes[0].d, axes[1].d);
    let geom = kernels::ConvGeom { k: (kh, kw), s: (1, 1), d: (dh, dw), pads: [0; 4] };
    if group == 1 && kernels::usable(&[&xp, &wt]) && b.is_none_or(|b| kernels::usable(&[b])) {
        return kernels::conv_dense(&xp.contiguous()?, &wt, b, geom, None);
    }
    if dh != dw {
        return Err(node_err(node, "different dilations per axis are not supported"));
    }
    let y = xp.contiguous()?.conv2d(&wt, 0, 1, dh, group)?;
    Ok(match b {
        Some(b) => bias_add(&y, &b.reshape((1, group * mg, 1, 1))?)?,
        None => y,
    })
}

/// `y + b` for a per-channel bias: with a one-pass backward on the CPU ([`kernels::grad::bias_add`]).
fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    match kernels::grad::bias_add(y, b)? {
        Some(t) => Ok(t),
        None => Ok(y.broadcast_add(b)?),
    }
}
