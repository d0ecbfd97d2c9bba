//! ONNX ops, family: identity, casts, constants and shape values (Shape, Size, Range).

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] =
    &["Identity", "Dropout", "Cast", "CastLike", "Constant", "ConstantOfShape", "Shape", "Size", "Range"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], _opset: i64, device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "Identity" | "Dropout" => {
            if node.op_type == "Dropout" {
                inference_dropout(node, ins)?;
            }
            let t = x()?.clone();
            let mut out = vec![t.clone()];
            if node.output.len() > 1 {
                out.push(Tensor::ones(t.dims(), DType::U8, t.device())?);
            }
            Ok(out)
        }
        "Cast" => {
            let to = at.int("to", 1);
            let dt = dtype_of_code(to).ok_or_else(|| node_err(node, format!("cannot cast to ONNX type {to}")))?;
            let t = x()?;
            // Float -> int truncates toward zero in ONNX; candle rounds, so truncate first.
            if dt == DType::I64 && t.dtype().is_float() {
                let v: Vec<i64> = to_f64s(t)?.iter().map(|&f| f.trunc() as i64).collect();
                return one(Tensor::from_vec(v, t.dims(), t.device())?);
            }
            // Half types are carried as float32 but must hold only values the half type can represent.
            let half = match candle_onnx::onnx::tensor_proto::DataType::try_from(to as i32) {
                Ok(candle_onnx::onnx::tensor_proto::DataType::Float16) => Some(DType::F16),
                Ok(candle_onnx::onnx::tensor_proto::DataType::Bfloat16) => Some(DType::BF16),
                _ => None,
            };
            if let Some(h) = half {
                return one(t.to_dtype(DType::F32)?.to_dtype(h)?.to_dtype(DType::F32)?);
            }
            if dt == DType::U8 && t.dtype() != DType::U8 {
                // Bool semantics: nonzero -> 1.
                return one(t.ne(0f64).or_else(|_| t.to_dtype(DType::F64)?.ne(0f64))?);
            }
            one(t.to_dtype(dt)?)
        }
        "CastLike" => {
            let (t, like) = (x()?, input(node, ins, 1)?);
            if !like.dtype().is_float() && t.dtype().is_float() {
                // Float -> int truncates toward zero, as Cast does.
                let v: Vec<i64> = to_f64s(t)?.iter().map(|&f| f.trunc() as i64).collect();
                return one(Tensor::from_vec(v, t.dims(), t.device())?.to_dtype(like.dtype())?);
            }
            one(t.to_dtype(like.dtype())?)
        }
        "Constant" => {
            let a = node.attribute.first().ok_or_else(|| node_err(node, "Constant has no value attribute"))?;
            let t = match a.name.as_str() {
                "value" => from_proto(a.t.as_ref().ok_or_else(|| node_err(node, "value without a tensor"))?, device)?,
                "value_float" => Tensor::new(a.f, device)?,
                "value_floats" => Tensor::new(a.floats.as_slice(), device)?,
                "value_int" => Tensor::new(a.i, device)?,
                "value_ints" => Tensor::new(a.ints.as_slice(), device)?,
                other => return Err(node_err(node, format!("Constant attribute `{other}` is not supported"))),
            };
            one(t)
        }
        "ConstantOfShape" => {
            let shape: Vec<usize> = to_i64s(x()?)?.iter().map(|&d| d.max(0) as usize).collect();
            let value = match node.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref()) {
                Some(t) => from_proto(t, device)?.flatten_all()?,
                None => Tensor::new(&[0f32], device)?,
            };
            one(value.reshape(())?.broadcast_as(shape.as_slice())?.contiguous()?)
        }
        "Shape" => {
            let d: Vec<i64> = x()?.dims().iter().map(|&d| d as i64).collect();
            let r = d.len() as i64;
            let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clampi(at.int("start", 0));
            let end = clampi(at.int("end", r));
            let v = if start < end { d[start..end].to_vec() } else { vec![] };
            one(Tensor::from_vec(v.clone(), v.len(), device)?)
        }
        "Size" => one(Tensor::new(x()?.elem_count() as i64, device)?),
        "Range" => {
            let f = |i| -> Result<f64> { Ok(to_f64s(input(node, ins, i)?)?.first().copied().unwrap_or(0.0)) };
            let (s, l, d) = (f(0)?, f(1)?, f(2)?);
            if d == 0.0 {
                return Err(node_err(node, "delta is 0"));
            }
            let n = ((l - s) / d).ceil().max(0.0) as usize;
            if n > 1 << 30 {
                return Err(node_err(node, "range too long"));
            }
            let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
            let dt = x()?.dtype();
            if dt == DType::I64 {
                one(Tensor::from_vec(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), n, device)?)
            } else {
                one(Tensor::from_vec(v, n, device)?.to_dtype(dt)?)
            }
        }
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}

/// Inference only: a training-mode Dropout with a non-zero ratio (random masks) is refused, not run as
/// the identity.
fn inference_dropout(node: &NodeProto, ins: &[Option<Tensor>]) -> Result<()> {
    let Some(mode) = opt_input(ins, 2) else { return Ok(()) };
    let ratio = opt_input(ins, 1).map(to_f64s).transpose()?.map_or(0.5, |r| r.first().copied().unwrap_or(0.5));
    if ratio != 0.0 && to_i64s(mode)?.iter().any(|&m| m != 0) {
        return Err(node_err(node, "training_mode = true (random dropout) is not supported"));
    }
    Ok(())
}
