//! ONNX ops, family: normalisation and reductions: Softmax, LayerNormalization, BatchNormalization, Reduce*.

use candle_core::{Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] =
    &["Softmax", "LayerNormalization", "BatchNormalization", "ReduceMean", "ReduceSum", "ReduceMax"];

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
            if kernels::usable(&[t, scale]) && opt_input(ins, 2).is_none_or(|b| kernels::usable(&[b])) {
                return one(kernels::layer_norm(t, inner, scale, opt_input(ins, 2), eps as f32)?);
            }
            let x2 = t.contiguous()?.reshape(((t.elem_count() / inner.max(1)), inner))?;
            if [Some(t), Some(scale), opt_input(ins, 2)].iter().flatten().any(|v| v.track_op()) {
                // candle-nn's layer_norm has no backward pass: compose it from differentiable ops.
                let mean = x2.mean_keepdim(1)?;
                let xc = x2.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(1)?;
                let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(&scale.flatten_all()?)?;
                if let Some(b) = opt_input(ins, 2) {
                    y = y.broadcast_add(&b.flatten_all()?)?;
                }
                return one(y.reshape(t.dims())?);
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
        "ReduceMean" | "ReduceSum" | "ReduceMax" => {
            let t = x()?;
            let from_input = opset >= 18 || (node.op_type == "ReduceSum" && opset >= 13);
            let axes = axes_of(node, ins, 1, from_input)?;
            let keep = at.int("keepdims", 1) == 1;
            let mut ax: Vec<usize> = match axes {
                Some(a) if !a.is_empty() => a.iter().map(|&a| norm_axis(node, a, t.rank())).collect::<Result<_>>()?,
                _ if at.int("noop_with_empty_axes", 0) == 1 => return one(t.clone()),
                _ => (0..t.rank()).collect(),
            };
            ax.sort_unstable();
            ax.dedup();
            let mut y = t.clone();
            for &a in ax.iter().rev() {
                y = match node.op_type.as_str() {
                    "ReduceMean" => y.mean_keepdim(a)?,
                    "ReduceSum" => y.sum_keepdim(a)?,
                    _ => y.max_keepdim(a)?,
                };
            }
            if !keep {
                let dims: Vec<usize> =
                    t.dims().iter().enumerate().filter(|(i, _)| !ax.contains(i)).map(|(_, &d)| d).collect();
                y = y.reshape(dims.as_slice())?;
            }
            one(y)
        }
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}
