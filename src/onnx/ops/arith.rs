//! ONNX ops, family: elementwise arithmetic with broadcasting (integer-exact where ONNX is), comparisons and logic.

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] =
    &["Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Equal", "Less", "Greater", "Not", "And", "Where"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], _opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "Add" | "Sub" | "Mul" | "Div" | "Pow" => {
            let (a, b) = (x()?, input(node, ins, 1)?);
            if is_int(a) && node.op_type == "Div" {
                // ONNX integer Div truncates toward zero; checked so a zero divisor is an error.
                return one(int_binary(node, a, b, |p, q| p.checked_div(q))?);
            }
            if let Some(op) = kernels::Binary::from_op(&node.op_type).filter(|_| kernels::usable(&[a, b])) {
                if let Some(t) = kernels::binary(op, a, b)? {
                    return one(t);
                }
            }
            // Training: a bias added along a run of dims gets its one-pass backward.
            if node.op_type == "Add" && (a.track_op() || b.track_op()) {
                let biased =
                    match (a.rank() >= b.rank() && a.elem_count() > b.elem_count(), b.elem_count() > a.elem_count()) {
                        (true, _) => kernels::grad::bias_add(a, b)?,
                        (_, true) => kernels::grad::bias_add(b, a)?,
                        _ => None,
                    };
                if let Some(t) = biased {
                    return one(t);
                }
            }
            // Training: a constant operand gets no gradient of its own.
            if let Some(op) = kernels::Binary::from_op(&node.op_type) {
                if let Some(t) = kernels::grad::const_binary(op, a, b, false)? {
                    return one(t);
                }
                if let Some(t) = kernels::grad::const_binary(op, b, a, true)? {
                    return one(t);
                }
            }
            let t = match node.op_type.as_str() {
                "Add" => a.broadcast_add(b)?,
                "Sub" => a.broadcast_sub(b)?,
                "Mul" => a.broadcast_mul(b)?,
                "Div" => a.broadcast_div(b)?,
                _ => {
                    if is_int(a) {
                        int_binary(node, a, b, |p, q| u32::try_from(q).ok().and_then(|q| p.checked_pow(q)))?
                    } else {
                        let b = b.to_dtype(a.dtype())?;
                        // Common exponents as exact ops; others as exp(b * ln a) (a > 0).
                        let exponent = to_f64s(&b).ok().filter(|v| v.len() == 1).map(|v| v[0]);
                        let power = match exponent {
                            Some(2.0) => Some(kernels::Unary::Square),
                            Some(3.0) => Some(kernels::Unary::Cube),
                            _ => None,
                        };
                        if let Some(op) = power.filter(|_| kernels::usable(&[a]) && b.elem_count() == 1) {
                            return one(kernels::unary(op, a)?);
                        }
                        match exponent {
                            Some(2.0) => a.sqr()?,
                            Some(3.0) => a.sqr()?.mul(a)?,
                            Some(0.5) => a.sqrt()?,
                            Some(1.0) => a.clone(),
                            Some(e) => a.powf(e)?,
                            None => a.broadcast_pow(&b)?,
                        }
                    }
                }
            };
            one(t)
        }
        "Mod" => {
            let (a, b) = (x()?, input(node, ins, 1)?);
            let fmod = at.int("fmod", 0) == 1;
            if is_int(a) {
                one(int_binary(node, a, b, |p, q| {
                    if q == 0 {
                        None
                    } else if fmod {
                        p.checked_rem(q)
                    } else {
                        // Python-style: the result takes the divisor's sign.
                        p.checked_rem(q).map(|r| if r != 0 && ((r < 0) != (q < 0)) { r + q } else { r })
                    }
                })?)
            } else {
                one(float_mod(node, a, b, fmod)?)
            }
        }
        "Max" | "Min" | "Sum" => {
            let mut acc = x()?.clone();
            for i in 1..ins.len() {
                let b = input(node, ins, i)?;
                let (p, q) = bcast2(node, &acc, b)?;
                acc = match node.op_type.as_str() {
                    "Max" => p.maximum(&q)?,
                    "Min" => p.minimum(&q)?,
                    _ => (p + q)?,
                };
            }
            one(acc)
        }
        "Equal" | "Less" | "Greater" => {
            let (a, b) = bcast2(node, x()?, input(node, ins, 1)?)?;
            one(match node.op_type.as_str() {
                "Equal" => a.eq(&b)?,
                "Less" => a.lt(&b)?,
                _ => a.gt(&b)?,
            })
        }
        "Not" => one(x()?.to_dtype(DType::U8)?.eq(0u8)?),
        "And" => {
            let (a, b) = bcast2(node, x()?, input(node, ins, 1)?)?;
            one(a.to_dtype(DType::U8)?.mul(&b.to_dtype(DType::U8)?)?.ne(0u8)?)
        }
        "Where" => {
            let c = x()?;
            let (a, b) = (input(node, ins, 1)?, input(node, ins, 2)?);
            let s = broadcast_shape(node, c.dims(), a.dims())?;
            let s = broadcast_shape(node, &s, b.dims())?;
            let c = c.to_dtype(DType::U8)?.broadcast_as(s.as_slice())?.contiguous()?;
            let a = a.broadcast_as(s.as_slice())?.contiguous()?;
            let b = b.to_dtype(a.dtype())?.broadcast_as(s.as_slice())?.contiguous()?;
            one(c.where_cond(&a, &b)?)
        }
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}

/// Float Mod on the host, with C's fmod (`fmod = 1`) or NumPy's mod (the divisor's sign; x mod inf is x
/// or inf), as the spec's edge cases want; Mod carries no gradient.
fn float_mod(node: &NodeProto, a: &Tensor, b: &Tensor, fmod: bool) -> Result<Tensor> {
    let (a, b) = bcast2(node, a, b)?;
    let (x, y) = (to_f64s(&a)?, to_f64s(&b)?);
    let v: Vec<f64> = x
        .iter()
        .zip(&y)
        .map(|(&p, &q)| {
            let r = p % q;
            match fmod {
                true => r,
                false if r != 0.0 && (r < 0.0) != (q < 0.0) => r + q,
                false => r.abs().copysign(q),
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, a.dims(), a.device())?.to_dtype(a.dtype())?)
}
