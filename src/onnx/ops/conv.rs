//! 2-D convolution for the importer: padding rules (explicit, SAME_UPPER/LOWER), candle's conv2d for
//! dense and grouped convs, and a direct kernel for depthwise convs, which candle runs as one conv per
//! channel (about 100x slower than ONNX Runtime on MobileNet-style blocks).

use candle_core::Tensor;
use candle_onnx::onnx::NodeProto;

use super::{node_err, pad_spatial, Attrs};
use crate::error::Result;
use crate::onnx::kernels;

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

/// ONNX Conv followed by a clamp to `act` = (lo, hi) (a fused Relu/Clip; only on the fast CPU path, where
/// the plan fuses it).
pub fn conv_act(
    node: &NodeProto,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Option<(f32, f32)>,
) -> Result<Tensor> {
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
    let cpu_f32 = x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == candle_core::DType::F32;
    let y = if depthwise && cpu_f32 {
        // Differentiable and fast: candle would run one conv per channel, forward and backward.
        x.contiguous()?.apply_op2(&w.contiguous()?, kernels::DepthwiseOp { g: geom })?
    } else if cpu_f32 && group == 1 && (kh, kw) == (1, 1) && (sh, sw) == (1, 1) && pads.iter().all(|&p| p == 0) {
        x.contiguous()?.apply_op2(&w.contiguous()?, kernels::PointwiseOp)?
    } else {
        dense_candle(node, x, w, &pads, (sh, sw), (dh, dw), group)?
    };
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((1, m, 1, 1))?)?,
        None => y,
    };
    match act {
        Some((lo, hi)) if cpu_f32 => Ok(y.contiguous()?.apply_op1(kernels::ClampOp { lo, hi })?),
        Some((lo, hi)) => Ok(y.maximum(lo as f64)?.minimum(hi as f64)?),
        None => Ok(y),
    }
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
