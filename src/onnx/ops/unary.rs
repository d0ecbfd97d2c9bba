//! ONNX ops, family: unary maths and activations (our kernels when no gradient is tracked), Clip.

use candle_core::{Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;
use crate::util::device::own_kernels_for;

/// The op types this family evaluates.
pub const OPS: &[&str] = &[
    "Neg",
    "Abs",
    "Sign",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Erf",
    "Relu",
    "Sigmoid",
    "Exp",
    "Tanh",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "LeakyRelu",
];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "Neg" => one(if is_int(x()?) { int_unary(x()?, |v| v.checked_neg())? } else { x()?.neg()? }),
        "Abs" => one(if is_int(x()?) { int_unary(x()?, |v| v.checked_abs())? } else { x()?.abs()? }),
        "Sign" => one(x()?.sign()?),
        "Log" => one(x()?.log()?),
        "Sqrt" => one(x()?.sqrt()?),
        "Reciprocal" => one(x()?.recip()?),
        "Floor" => one(x()?.floor()?),
        "Ceil" => one(x()?.ceil()?),
        "Erf" | "Relu" | "Sigmoid" | "Exp" if kernels::usable(&[x()?]) => {
            let op = match node.op_type.as_str() {
                "Erf" => kernels::Unary::Erf,
                "Relu" => kernels::Unary::Relu,
                "Sigmoid" => kernels::Unary::Sigmoid,
                _ => kernels::Unary::Exp,
            };
            one(kernels::unary(op, x()?)?)
        }
        "Erf" => one(x()?.erf()?),
        "Exp" => one(x()?.exp()?),
        "Relu" => one(x()?.relu()?),
        "Sigmoid" => one(candle_nn::ops::sigmoid(x()?)?),
        "Tanh" if kernels::usable(&[x()?]) => one(kernels::unary(kernels::Unary::Tanh, x()?)?),
        "Tanh" => one(x()?.tanh()?),
        "Gelu" => {
            let t = x()?;
            one(if at.string("approximate").as_deref() == Some("tanh") { t.gelu()? } else { t.gelu_erf()? })
        }
        "HardSigmoid" if kernels::usable(&[x()?]) => {
            let (a, b) = (at.float("alpha", 0.2), at.float("beta", 0.5));
            one(kernels::unary(kernels::Unary::HardSigmoid(a, b), x()?)?)
        }
        "HardSigmoid" => {
            let (a, b) = (at.float("alpha", 0.2) as f64, at.float("beta", 0.5) as f64);
            one(x()?.affine(a, b)?.clamp(0f32, 1f32)?)
        }
        "HardSwish" => one(hard_swish(x()?)?),
        "LeakyRelu" if kernels::usable(&[x()?]) => {
            one(kernels::unary(kernels::Unary::LeakyRelu(at.float("alpha", 0.01)), x()?)?)
        }
        "LeakyRelu" => {
            let (t, a) = (x()?, at.float("alpha", 0.01) as f64);
            one((t.relu()? - (t.neg()?.relu()? * a)?)?)
        }
        "Clip" => {
            let t = x()?;
            let (lo, hi) = if opset >= 11 {
                let lo = opt_input(ins, 1).map(to_f64s).transpose()?.and_then(|v| v.first().copied());
                let hi = opt_input(ins, 2).map(to_f64s).transpose()?.and_then(|v| v.first().copied());
                (lo, hi)
            } else {
                (at.has("min").then(|| at.float("min", 0.0) as f64), at.has("max").then(|| at.float("max", 0.0) as f64))
            };
            if kernels::usable(&[t]) {
                let (lo, hi) = (lo.unwrap_or(f64::NEG_INFINITY) as f32, hi.unwrap_or(f64::INFINITY) as f32);
                return one(kernels::unary(kernels::Unary::Clip(lo, hi), t)?);
            }
            if own_kernels_for(t) {
                let (lo, hi) = (lo.unwrap_or(f64::NEG_INFINITY) as f32, hi.unwrap_or(f64::INFINITY) as f32);
                return one(t.contiguous()?.apply_op1(kernels::ClampOp { lo, hi })?);
            }
            let mut t = t.clone();
            if let Some(lo) = lo {
                t = t.maximum(lo)?;
            }
            if let Some(hi) = hi {
                t = t.minimum(hi)?;
            }
            one(t)
        }
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}

/// The erf GELU (a fused chain): our kernel when no gradient is tracked, our differentiable op on the
/// CPU, candle's elsewhere.
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(if kernels::usable(&[x]) {
        kernels::unary(kernels::Unary::Gelu, x)?
    } else if crate::util::device::own_kernels_for(x) {
        x.contiguous()?.apply_op1(kernels::grad::GeluOp)?
    } else {
        x.gelu_erf()?
    })
}

/// HardSwish, x * clamp(x / 6 + 1/2, 0, 1): our kernel when no gradient is tracked.
pub(crate) fn hard_swish(x: &Tensor) -> Result<Tensor> {
    if kernels::usable(&[x]) {
        return kernels::unary(kernels::Unary::HardSwish, x);
    }
    Ok(x.mul(&x.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)?)?)
}

/// SiLU, x * sigmoid(x): our kernel when no gradient is tracked (a fused Sigmoid + Mul).
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    if kernels::usable(&[x]) {
        return kernels::unary(kernels::Unary::Silu, x);
    }
    Ok(x.mul(&candle_nn::ops::sigmoid(x)?)?)
}
