//! ONNX ops, family: pooling and padding. MaxPool and AveragePool implement every attribute of the
//! ONNX spec for 1-D and 2-D inputs (kernel, strides, explicit or automatic padding, dilations, ceil mode,
//! count_include_pad) with candle ops, so gradients flow through them when a backbone is fine-tuned.

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] = &["GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "Pad"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "GlobalAveragePool" | "GlobalMaxPool" => {
            let t = x()?;
            if t.rank() < 3 {
                return Err(node_err(node, format!("expected [N, C, ...], found {:?}", t.dims())));
            }
            let (n, c) = (t.dims()[0], t.dims()[1]);
            let flat = t.reshape((n, c, ()))?;
            let y = if node.op_type == "GlobalMaxPool" { flat.max_keepdim(2)? } else { flat.mean_keepdim(2)? };
            let mut shape = vec![n, c];
            shape.resize(t.rank(), 1);
            one(y.reshape(shape.as_slice())?)
        }
        "MaxPool" | "AveragePool" => one(pool(node, x()?)?),
        "Pad" => one(pad(node, ins, opset)?),
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}

/// One spatial axis of a pooling window: kernel, stride, dilation, padding before and after, and the
/// extra cells after the end that `ceil_mode` reaches (never counted by an average).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    k: usize,
    s: usize,
    d: usize,
    before: usize,
    after: usize,
    extra: usize,
    out: usize,
}

/// The window geometry of every spatial axis of `node` for input spatial dims `dims`.
fn geometry(node: &NodeProto, dims: &[usize]) -> Result<Vec<Axis>> {
    let at = Attrs(node);
    let n = dims.len();
    let k = at.ints("kernel_shape").ok_or_else(|| node_err(node, "kernel_shape is required"))?;
    let ones = vec![1; n];
    let s = at.ints("strides").unwrap_or(ones.clone());
    let d = at.ints("dilations").unwrap_or(ones);
    let pads = at.ints("pads").unwrap_or(vec![0; 2 * n]);
    if k.len() != n || s.len() != n || d.len() != n || pads.len() != 2 * n {
        return Err(node_err(
            node,
            format!("kernel_shape {k:?}, strides {s:?}, dilations {d:?} and pads {pads:?} do not fit {n} spatial dims"),
        ));
    }
    if k.iter().chain(&s).chain(&d).any(|&v| v < 1) || pads.iter().any(|&p| p < 0) {
        return Err(node_err(node, "kernel_shape, strides and dilations must be >= 1, pads >= 0"));
    }
    let auto = at.string("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let ceil = at.int("ceil_mode", 0) == 1;
    (0..n)
        .map(|i| {
            let (k, s, d, len) = (k[i] as usize, s[i] as usize, d[i] as usize, dims[i]);
            let span = (k - 1) * d + 1;
            let (before, after) = match auto.as_str() {
                "NOTSET" => (pads[i] as usize, pads[i + n] as usize),
                "VALID" => (0, 0),
                "SAME_UPPER" | "SAME_LOWER" => {
                    let total = ((len.div_ceil(s) - 1) * s + span).saturating_sub(len);
                    let small = total / 2;
                    if auto == "SAME_UPPER" {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    }
                }
                other => return Err(node_err(node, format!("auto_pad `{other}` is not an ONNX value"))),
            };
            let room = (len + before + after).checked_sub(span).ok_or_else(|| {
                node_err(
                    node,
                    format!("a window of {span} cells does not fit axis {i} of {len} (+{before}+{after} pads)"),
                )
            })?;
            let mut out = room / s + 1;
            if ceil && auto == "NOTSET" {
                out = room.div_ceil(s) + 1;
                // The last window must start inside the input or its leading padding (PyTorch's and
                // ONNX Runtime's rule).
                if out > 1 && (out - 1) * s >= len + before {
                    out -= 1;
                }
            }
            let extra = ((out - 1) * s + span).saturating_sub(len + before + after);
            Ok(Axis { k, s, d, before, after, extra, out })
        })
        .collect()
}

/// MaxPool / AveragePool (2-D, no Indices output) of channel-blocked `x` (`[N, C/8, H, W, 8]`) in
/// inference, returning blocked data.
pub(crate) fn pool_blocked(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let d = x.dims();
    if d.len() != 5 || node.output.get(1).is_some_and(|o| !o.is_empty()) {
        return Err(node_err(node, format!("no blocked pooling for input {d:?}")));
    }
    let axes = geometry(node, &d[2..4])?;
    let k = |a: Axis| kernels::pool::PoolAxis { k: a.k, s: a.s, d: a.d, before: a.before, after: a.after, out: a.out };
    let include = Attrs(node).int("count_include_pad", 0) == 1;
    kernels::pool::pool2d_blocked(x, k(axes[0]), k(axes[1]), node.op_type == "MaxPool", include)
}

/// MaxPool / AveragePool on `[N, C, L]` or `[N, C, H, W]`.
fn pool(node: &NodeProto, x: &Tensor) -> Result<Tensor> {
    let max = node.op_type == "MaxPool";
    if max && node.output.get(1).is_some_and(|o| !o.is_empty()) {
        return Err(node_err(node, "the Indices output of MaxPool is not supported"));
    }
    if !(3..=4).contains(&x.rank()) {
        return Err(node_err(node, format!("only 1-D and 2-D pooling is supported, input is {:?}", x.dims())));
    }
    let one_d = x.rank() == 3;
    let x4 = if one_d { x.unsqueeze(2)? } else { x.clone() };
    let mut axes = geometry(node, &x.dims()[2..])?;
    if one_d {
        axes.insert(0, Axis { k: 1, s: 1, d: 1, before: 0, after: 0, extra: 0, out: 1 });
    }
    let (h, w) = (axes[0], axes[1]);
    if kernels::usable(&[&x4]) {
        // Inference: one pass per window (the candle path below carries gradients).
        let include = Attrs(node).int("count_include_pad", 0) == 1;
        let k =
            |a: Axis| kernels::pool::PoolAxis { k: a.k, s: a.s, d: a.d, before: a.before, after: a.after, out: a.out };
        let y = kernels::pool::pool2d(&x4, k(h), k(w), max, include)?;
        return Ok(if one_d { y.squeeze(2)? } else { y });
    }
    let y = if max {
        let padded = pad_hw(&x4, h, w, f64::NEG_INFINITY, f64::NEG_INFINITY)?;
        window_reduce(&padded, h, w, true)?
    } else {
        let include = Attrs(node).int("count_include_pad", 0) == 1;
        let sum = window_reduce(&pad_hw(&x4, h, w, 0.0, 0.0)?, h, w, false)?;
        // The divisor of every window: the cells it covers of the input (and of the explicit padding
        // when count_include_pad), never the ceil_mode extension.
        let dims = x4.dims();
        let ones = Tensor::ones((1, 1, dims[2], dims[3]), DType::F32, x4.device())?;
        let mask = pad_hw(&ones, h, w, if include { 1.0 } else { 0.0 }, 0.0)?;
        let count = window_reduce(&mask, h, w, false)?;
        sum.broadcast_div(&count.to_dtype(sum.dtype())?)?
    };
    Ok(if one_d { y.squeeze(2)? } else { y })
}

/// Pads H and W: `pad` in the explicit/automatic padding, `beyond` in the ceil_mode extension.
fn pad_hw(t: &Tensor, h: Axis, w: Axis, pad: f64, beyond: f64) -> Result<Tensor> {
    let mut y = t.clone();
    for (axis, a) in [(2usize, h), (3usize, w)] {
        y = pad_axis(&y, axis, a.before as i64, a.after as i64, pad)?;
        y = pad_axis(&y, axis, 0, a.extra as i64, beyond)?;
    }
    Ok(y)
}

/// Max or sum over every window of a padded `[N, C, H, W]`.
fn window_reduce(t: &Tensor, h: Axis, w: Axis, max: bool) -> Result<Tensor> {
    if h.d == 1 && w.d == 1 {
        let (k, s) = ((h.k, w.k), (h.s, w.s));
        return Ok(if max {
            t.max_pool2d_with_stride(k, s)?
        } else {
            (t.avg_pool2d_with_stride(k, s)? * (h.k * w.k) as f64)?
        });
    }
    // Dilated windows: one strided selection per kernel offset, folded.
    let pick = |a: Axis, offset: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..a.out).map(|o| (offset * a.d + o * a.s) as u32).collect();
        Ok(Tensor::from_vec(idx, a.out, t.device())?)
    };
    let mut acc: Option<Tensor> = None;
    for i in 0..h.k {
        let rows = t.index_select(&pick(h, i)?, 2)?;
        for j in 0..w.k {
            let v = rows.index_select(&pick(w, j)?, 3)?;
            acc = Some(match acc {
                None => v,
                Some(a) if max => a.maximum(&v)?,
                Some(a) => (a + v)?,
            });
        }
    }
    acc.ok_or_else(|| crate::error::Error::onnx("pooling", "empty kernel"))
}
