//! ONNX ops, family: normalisation and reductions: Softmax, Layer/Batch/Instance/GroupNormalization,
//! Reduce{Mean, Sum, Max, Min, L1, L2, SumSquare, LogSum, LogSumExp}.

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;
use crate::util::device::own_kernels_for;

/// The op types this family evaluates.
pub const OPS: &[&str] = &[
    "Softmax",
    "LayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSum",
    "ReduceLogSumExp",
];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "Softmax" => {
            let t = x()?;
            let axis = norm_axis(node, at.int("axis", if opset >= 13 { -1 } else { 1 }), t.rank())?;
            if opset < 13 {
                // Older semantics: flatten to 2-D at `axis`, softmax over the inner part.
                let outer: usize = t.dims()[..axis].iter().product();
                let inner: usize = t.dims()[axis..].iter().product();
                let y = candle_nn::ops::softmax_last_dim(&t.reshape((outer, inner))?)?;
                return one(y.reshape(t.dims())?);
            }
            if axis + 1 == t.rank() && kernels::usable(&[t]) {
                one(kernels::softmax_last(t)?)
            } else if axis + 1 == t.rank() && !t.track_op() {
                one(candle_nn::ops::softmax_last_dim(&t.contiguous()?)?)
            } else if axis + 1 == t.rank() && own_kernels_for(t) {
                one(t.contiguous()?.apply_op1(kernels::grad::SoftmaxOp)?)
            } else {
                one(candle_nn::ops::softmax(t, axis)?)
            }
        }
        "LayerNormalization" => {
            let t = x()?;
            let axis = norm_axis(node, at.int("axis", -1), t.rank())?;
            let eps = at.float("epsilon", 1e-5) as f64;
            let scale = input(node, ins, 1)?;
            let inner: usize = t.dims()[axis..].iter().product();
            // The optional Mean and InvStdDev outputs need the composed path.
            let stats = node.output.iter().skip(1).any(|o| !o.is_empty());
            let fast = kernels::usable(&[t, scale]) && opt_input(ins, 2).is_none_or(|b| kernels::usable(&[b]));
            if fast && !stats {
                return one(kernels::layer_norm(t, inner, scale, opt_input(ins, 2), eps as f32)?);
            }
            let x2 = t.contiguous()?.reshape(((t.elem_count() / inner.max(1)), inner))?;
            if !stats && own_kernels_for(t) && own_kernels_for(scale) && opt_input(ins, 2).is_none_or(own_kernels_for) {
                // Training on the CPU: one op forward, one fused pass backward.
                let bias = match opt_input(ins, 2) {
                    Some(b) => b.flatten_all()?,
                    None => Tensor::zeros(inner, DType::F32, t.device())?,
                };
                let y = x2.apply_op3(&scale.flatten_all()?, &bias, kernels::grad::LayerNormOp { eps: eps as f32 })?;
                return one(y.reshape(t.dims())?);
            }
            if stats || [Some(t), Some(scale), opt_input(ins, 2)].iter().flatten().any(|v| v.track_op()) {
                // candle-nn's layer_norm has no backward pass: compose it from differentiable ops.
                let mean = x2.mean_keepdim(1)?;
                let xc = x2.broadcast_sub(&mean)?;
                let inv_std = (xc.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
                let mut y = xc.broadcast_mul(&inv_std)?.broadcast_mul(&scale.flatten_all()?)?;
                if let Some(b) = opt_input(ins, 2) {
                    y = y.broadcast_add(&b.flatten_all()?)?;
                }
                let stat_dims: Vec<usize> =
                    t.dims().iter().enumerate().map(|(i, &d)| if i < axis { d } else { 1 }).collect();
                return Ok(vec![
                    y.reshape(t.dims())?,
                    mean.reshape(stat_dims.as_slice())?,
                    inv_std.reshape(stat_dims.as_slice())?,
                ]);
            }
            let scale = scale.flatten_all()?.broadcast_as(inner)?.contiguous()?;
            let bias = match opt_input(ins, 2) {
                Some(b) => b.flatten_all()?.broadcast_as(inner)?.contiguous()?,
                None => Tensor::zeros(inner, t.dtype(), t.device())?,
            };
            let y = candle_nn::ops::layer_norm(&x2, &scale, &bias, eps as f32)?;
            one(y.reshape(t.dims())?)
        }
        "BatchNormalization" => {
            let t = x()?;
            let (s, b, m, v) = (input(node, ins, 1)?, input(node, ins, 2)?, input(node, ins, 3)?, input(node, ins, 4)?);
            let eps = at.float("epsilon", 1e-5) as f64;
            let c = t.dims().get(1).copied().unwrap_or(1);
            let mut shape = vec![1; t.rank()];
            if t.rank() > 1 {
                shape[1] = c;
            }
            let inv = (v + eps)?.sqrt()?.recip()?.mul(s)?;
            let shift = (b - m.mul(&inv)?)?;
            one(t.broadcast_mul(&inv.reshape(shape.as_slice())?)?.broadcast_add(&shift.reshape(shape.as_slice())?)?)
        }
        "InstanceNormalization" | "GroupNormalization" => one(group_norm(node, ins)?),
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
        | "ReduceSumSquare" | "ReduceLogSum" | "ReduceLogSumExp" => one(reduce(node, ins, opset)?),
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}

/// InstanceNormalization (one group per channel) and GroupNormalization: normalise `[N, C, ...]` over
/// each group of channels and the spatial dims, then scale and shift per channel (per group for
/// GroupNormalization's opset-18 form, whose scale has one value per group).
fn group_norm(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<Tensor> {
    let at = Attrs(node);
    let t = input(node, ins, 0)?;
    let (scale, bias) = (input(node, ins, 1)?.flatten_all()?, input(node, ins, 2)?.flatten_all()?);
    if t.rank() < 3 {
        return Err(node_err(node, format!("expected [N, C, ...], found {:?}", t.dims())));
    }
    let (n, c) = (t.dims()[0], t.dims()[1]);
    let groups = if node.op_type == "InstanceNormalization" { c as i64 } else { at.int("num_groups", 0) };
    if groups < 1 || c % groups as usize != 0 {
        return Err(node_err(node, format!("num_groups {groups} does not divide the {c} channels")));
    }
    let g = groups as usize;
    let eps = at.float("epsilon", 1e-5) as f64;
    let x = t.reshape((n, g, ()))?;
    let mean = x.mean_keepdim(2)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    let per = |v: &Tensor| -> Result<Tensor> {
        match v.elem_count() {
            len if len == c => Ok(v.clone()),
            // Opset 18's GroupNormalization: one value per group, shared by its channels.
            len if len == g => Ok(v.reshape((g, 1))?.broadcast_as((g, c / g))?.flatten_all()?),
            len => Err(node_err(node, format!("scale/bias hold {len} values; expected {c} (or {g} per group)"))),
        }
    };
    let mut shape = vec![1, c];
    shape.resize(t.rank(), 1);
    let (s, b) = (per(&scale)?.reshape(shape.as_slice())?, per(&bias)?.reshape(shape.as_slice())?);
    Ok(y.reshape(t.dims())?.broadcast_mul(&s)?.broadcast_add(&b)?)
}

/// The Reduce* ops over `axes` (an input from opset 18, an attribute before), keeping dims or not.
fn reduce(node: &NodeProto, ins: &[Option<Tensor>], opset: i64) -> Result<Tensor> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let t = x()?;
    let from_input = opset >= 18 || (node.op_type == "ReduceSum" && opset >= 13);
    if !t.dtype().is_float() && node.op_type != "ReduceMax" && node.op_type != "ReduceMin" {
        return Err(node_err(node, format!("input is {:?}; this reduction is implemented for floats", t.dtype())));
    }
    let axes = axes_of(node, ins, 1, from_input)?;
    let keep = at.int("keepdims", 1) == 1;
    let mut ax: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => a.iter().map(|&a| norm_axis(node, a, t.rank())).collect::<Result<_>>()?,
        _ if at.int("noop_with_empty_axes", 0) == 1 => return Ok(t.clone()),
        _ => (0..t.rank()).collect(),
    };
    ax.sort_unstable();
    ax.dedup();
    let op = node.op_type.as_str();
    let mut y = match op {
        "ReduceL1" => t.abs()?,
        "ReduceL2" | "ReduceSumSquare" => t.sqr()?,
        _ => t.clone(),
    };
    for &a in ax.iter().rev() {
        if y.dims()[a] == 0 {
            y = empty_reduction(op, &y, a)?;
            continue;
        }
        y = match op {
            "ReduceMean" => y.mean_keepdim(a)?,
            "ReduceMax" => y.max_keepdim(a)?,
            "ReduceMin" => y.min_keepdim(a)?,
            // A running product along the axis (exact for zeros and signs, unlike exp(sum(log))).
            "ReduceProd" => (1..y.dims()[a]).try_fold(y.narrow(a, 0, 1)?, |p, i| p.mul(&y.narrow(a, i, 1)?))?,
            // Shifted by the maximum so that exp cannot overflow (LSE composes over axes).
            "ReduceLogSumExp" => {
                let m = y.max_keepdim(a)?;
                (y.broadcast_sub(&m)?.exp()?.sum_keepdim(a)?.log()? + m)?
            }
            _ => y.sum_keepdim(a)?,
        };
    }
    y = match op {
        "ReduceL2" => y.sqrt()?,
        "ReduceLogSum" => y.log()?,
        _ => y,
    };
    if !keep {
        let dims: Vec<usize> = t.dims().iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect();
        y = y.reshape(dims.as_slice())?;
    }
    Ok(y)
}

/// A reduction over an empty axis: the operation's identity (0 for sums, 1 for products, -inf/+inf
/// for max/min or the dtype's extreme for integers, NaN for a mean), as the spec's empty-set cases want.
fn empty_reduction(op: &str, y: &Tensor, axis: usize) -> Result<Tensor> {
    let mut shape = y.dims().to_vec();
    shape[axis] = 1;
    let n: usize = shape.iter().product();
    let v = match op {
        "ReduceMax" | "ReduceLogSumExp" => f64::NEG_INFINITY,
        "ReduceMin" => f64::INFINITY,
        "ReduceProd" => 1.0,
        "ReduceMean" => f64::NAN,
        _ => 0.0,
    };
    Ok(match y.dtype() {
        DType::U8 => Tensor::from_vec(vec![if v == f64::INFINITY { u8::MAX } else { 0 }; n], shape, y.device())?,
        DType::I64 => {
            let i = if v == f64::INFINITY {
                i64::MAX
            } else if v < 0.0 {
                i64::MIN
            } else {
                v as i64
            };
            Tensor::from_vec(vec![i; n], shape, y.device())?
        }
        dt => Tensor::full(v, shape, y.device())?.to_dtype(dt)?,
    })
}

/// An inference BatchNormalization (`node`, for its epsilon) as a per-channel `x * a + b`: `a = scale /
/// sqrt(var + eps)`, `b = bias - mean * a`, for the kernels that apply it in one pass or fold it away.
pub(crate) fn batch_norm_affine(
    node: &NodeProto,
    (scale, bias, mean, var): (&[f32], &[f32], &[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>) {
    let eps = Attrs(node).float("epsilon", 1e-5);
    let a: Vec<f32> = scale.iter().zip(var).map(|(s, v)| s / (v + eps).sqrt()).collect();
    let b: Vec<f32> = bias.iter().zip(mean).zip(&a).map(|((b, m), a)| b - m * a).collect();
    (a, b)
}
