//! ONNX operators evaluated on candle tensors. Each op checks its inputs and returns an error naming the
//! node on bad input; nothing here panics on a malformed graph.

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::kernels;
use super::tensor::{dtype_of_code, from_proto};
use crate::error::{Error, Result};

/// Every op type [`eval`] implements.
pub const SUPPORTED_OPS: &[&str] = &[
    "Abs",
    "Add",
    "And",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "Greater",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LayerNormalization",
    "Less",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "Not",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Sign",
    "Size",
    "Slice",
    "Softmax",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "Transpose",
    "Unsqueeze",
    "Where",
];

/// Node-level error.
pub(crate) fn node_err(node: &NodeProto, msg: impl std::fmt::Display) -> Error {
    Error::Onnx { model: format!("node `{}` ({})", node.name, node.op_type), msg: msg.to_string() }
}

/// Attribute access with defaults.
pub(crate) struct Attrs<'a>(pub &'a NodeProto);

impl<'a> Attrs<'a> {
    fn get(&self, name: &str) -> Option<&'a candle_onnx::onnx::AttributeProto> {
        self.0.attribute.iter().find(|a| a.name == name)
    }
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map(|a| a.i).unwrap_or(default)
    }
    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map(|a| a.f).unwrap_or(default)
    }
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    pub fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// A tensor's values as i64 (shape arithmetic, indices).
pub(crate) fn to_i64s(t: &Tensor) -> Result<Vec<i64>> {
    Ok(t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?)
}

fn to_f64s(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

fn norm_axis(node: &NodeProto, axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r.max(1) {
        return Err(node_err(node, format!("axis {axis} is out of range for rank {rank}")));
    }
    Ok(a as usize)
}

/// ONNX multidirectional broadcast of two shapes.
fn broadcast_shape(node: &NodeProto, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = if x == y || y == 1 {
            x
        } else if x == 1 {
            y
        } else {
            return Err(node_err(node, format!("shapes {a:?} and {b:?} do not broadcast")));
        };
    }
    Ok(out)
}

fn bcast2(node: &NodeProto, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = broadcast_shape(node, a.dims(), b.dims())?;
    let b = if b.dtype() != a.dtype() { b.to_dtype(a.dtype())? } else { b.clone() };
    Ok((a.broadcast_as(s.as_slice())?, b.broadcast_as(s.as_slice())?))
}

fn input<'t>(node: &NodeProto, ins: &'t [Option<Tensor>], i: usize) -> Result<&'t Tensor> {
    ins.get(i).and_then(|t| t.as_ref()).ok_or_else(|| node_err(node, format!("input {i} is missing")))
}

fn opt_input(ins: &[Option<Tensor>], i: usize) -> Option<&Tensor> {
    ins.get(i).and_then(|t| t.as_ref())
}

/// Integer binary arithmetic on the host (shape math): checked, with ONNX semantics.
fn int_binary(node: &NodeProto, a: &Tensor, b: &Tensor, f: impl Fn(i64, i64) -> Option<i64>) -> Result<Tensor> {
    let (a, b) = bcast2(node, a, b)?;
    let shape = a.dims().to_vec();
    let (x, y) = (to_i64s(&a)?, to_i64s(&b)?);
    let v: Option<Vec<i64>> = x.iter().zip(&y).map(|(&p, &q)| f(p, q)).collect();
    let v = v.ok_or_else(|| node_err(node, "integer division by zero or overflow"))?;
    Ok(Tensor::from_vec(v, shape.as_slice(), a.device())?.to_dtype(a.dtype())?)
}

fn is_int(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::I64 | DType::U8 | DType::U32)
}

/// Evaluates one node. `ins[i]` is None for an omitted optional input.
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "Identity" | "Dropout" => {
            let t = x()?.clone();
            let mut out = vec![t.clone()];
            if node.output.len() > 1 {
                out.push(Tensor::ones(t.dims(), DType::U8, t.device())?);
            }
            Ok(out)
        }
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
                        match to_f64s(&b).ok().filter(|v| v.len() == 1).map(|v| v[0]) {
                            Some(2.0) => a.sqr()?,
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
                let (a, b) = bcast2(node, a, b)?;
                let q = (&a / &b)?;
                let q = if fmod { q.sign()?.mul(&q.abs()?.floor()?)? } else { q.floor()? };
                one((a - q.mul(&b)?)?)
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
        "Tanh" => one(x()?.tanh()?),
        "Gelu" => {
            let t = x()?;
            one(if at.string("approximate").as_deref() == Some("tanh") { t.gelu()? } else { t.gelu_erf()? })
        }
        "HardSigmoid" => {
            let (a, b) = (at.float("alpha", 0.2) as f64, at.float("beta", 0.5) as f64);
            one(x()?.affine(a, b)?.clamp(0f32, 1f32)?)
        }
        "HardSwish" => {
            let t = x()?;
            one(t.mul(&t.affine(1.0 / 6.0, 0.5)?.clamp(0f32, 1f32)?)?)
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
            if t.device().is_cpu() && t.dtype() == DType::F32 {
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
        "Cast" => {
            let to = at.int("to", 1);
            let dt = dtype_of_code(to).ok_or_else(|| node_err(node, format!("cannot cast to ONNX type {to}")))?;
            let t = x()?;
            // Float -> int truncates toward zero in ONNX; candle rounds, so truncate first.
            if dt == DType::I64 && t.dtype().is_float() {
                let v: Vec<i64> = to_f64s(t)?.iter().map(|&f| f.trunc() as i64).collect();
                return one(Tensor::from_vec(v, t.dims(), t.device())?);
            }
            if dt == DType::U8 && t.dtype() != DType::U8 {
                // Bool semantics: nonzero -> 1.
                return one(t.ne(0f64).or_else(|_| t.to_dtype(DType::F64)?.ne(0f64))?);
            }
            one(t.to_dtype(dt)?)
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
        "Reshape" => {
            let t = x()?;
            let spec = to_i64s(input(node, ins, 1)?)?;
            let allowzero = at.int("allowzero", 0) == 1;
            let dims = reshape_dims(node, t.dims(), &spec, allowzero)?;
            // A strided view is copied by our parallel copy (candle's reshape would copy on one thread).
            one(kernels::contiguous(t)?.reshape(dims.as_slice())?)
        }
        "Flatten" => {
            let t = x()?;
            let axis = at.int("axis", 1);
            let r = t.rank() as i64;
            let a = if axis < 0 { axis + r } else { axis };
            if a < 0 || a > r {
                return Err(node_err(node, format!("axis {axis} out of range for rank {r}")));
            }
            let outer: usize = t.dims()[..a as usize].iter().product();
            let inner: usize = t.dims()[a as usize..].iter().product();
            one(t.reshape((outer, inner))?)
        }
        "Squeeze" => {
            let t = x()?;
            let axes = axes_of(node, ins, 1, opset >= 13)?;
            let axes: Vec<usize> = match axes {
                Some(a) => a.iter().map(|&a| norm_axis(node, a, t.rank())).collect::<Result<_>>()?,
                None => (0..t.rank()).filter(|&i| t.dims()[i] == 1).collect(),
            };
            let mut axes = axes;
            axes.sort_unstable();
            axes.dedup();
            // One axis at a time from the back: a layout change, no copy of a strided view.
            let mut y = t.clone();
            for &a in axes.iter().rev() {
                if y.dims()[a] != 1 {
                    return Err(node_err(node, format!("cannot squeeze axis {a} of size {}", y.dims()[a])));
                }
                y = y.squeeze(a)?;
            }
            one(y)
        }
        "Unsqueeze" => {
            let t = x()?;
            let axes = axes_of(node, ins, 1, opset >= 13)?.ok_or_else(|| node_err(node, "no axes"))?;
            let out_rank = t.rank() + axes.len();
            let mut ax: Vec<usize> = axes.iter().map(|&a| norm_axis(node, a, out_rank)).collect::<Result<_>>()?;
            ax.sort_unstable();
            ax.dedup();
            if ax.len() != axes.len() {
                return Err(node_err(node, format!("repeated axes {axes:?}")));
            }
            let mut y = t.clone();
            for a in ax {
                y = y.unsqueeze(a.min(y.rank()))?;
            }
            one(y)
        }
        "Concat" => {
            let ts: Vec<&Tensor> = ins.iter().flatten().collect();
            if ts.is_empty() {
                return Err(node_err(node, "no inputs"));
            }
            let axis = norm_axis(node, at.int("axis", 0), ts[0].rank())?;
            let dt = ts[0].dtype();
            let nonempty: Vec<Tensor> = ts
                .iter()
                .filter(|t| t.elem_count() > 0 || ts.len() == 1)
                .map(|t| t.to_dtype(dt))
                .collect::<candle_core::Result<_>>()?;
            if nonempty.is_empty() {
                return one(ts[0].clone());
            }
            one(Tensor::cat(&nonempty, axis)?)
        }
        "Split" => {
            let t = x()?;
            let axis = norm_axis(node, at.int("axis", 0), t.rank())?;
            let n = node.output.len();
            let dim = t.dims()[axis];
            let sizes: Vec<usize> = if let Some(s) = opt_input(ins, 1) {
                to_i64s(s)?.iter().map(|&v| v.max(0) as usize).collect()
            } else if let Some(s) = at.ints("split") {
                s.iter().map(|&v| v.max(0) as usize).collect()
            } else {
                let k = at.int("num_outputs", n as i64).max(1) as usize;
                let chunk = dim.div_ceil(k);
                (0..k).map(|i| chunk.min(dim.saturating_sub(i * chunk))).collect()
            };
            if sizes.iter().sum::<usize>() != dim {
                return Err(node_err(node, format!("split sizes {sizes:?} do not add up to dimension {dim}")));
            }
            let mut out = Vec::new();
            let mut off = 0;
            for s in sizes {
                out.push(t.narrow(axis, off, s)?);
                off += s;
            }
            Ok(out)
        }
        "Slice" => one(slice(node, ins, opset)?),
        "Transpose" => {
            let t = x()?;
            let perm: Vec<usize> = match at.ints("perm") {
                Some(p) => p.iter().map(|&a| norm_axis(node, a, t.rank())).collect::<Result<_>>()?,
                None => (0..t.rank()).rev().collect(),
            };
            if perm.len() != t.rank() {
                return Err(node_err(node, format!("perm {perm:?} does not match rank {}", t.rank())));
            }
            one(t.permute(perm)?)
        }
        "Gather" => {
            let t = x()?;
            let idx_t = input(node, ins, 1)?;
            let axis = norm_axis(node, at.int("axis", 0), t.rank())?;
            let dim = t.dims()[axis] as i64;
            let idx: Vec<u32> = to_i64s(idx_t)?
                .iter()
                .map(|&i| {
                    let j = if i < 0 { i + dim } else { i };
                    if j < 0 || j >= dim {
                        Err(node_err(node, format!("index {i} out of range for dimension {dim}")))
                    } else {
                        Ok(j as u32)
                    }
                })
                .collect::<Result<_>>()?;
            let ids = Tensor::from_vec(idx.clone(), idx.len(), t.device())?;
            let g = t.contiguous()?.index_select(&ids, axis)?;
            let mut dims = t.dims()[..axis].to_vec();
            dims.extend_from_slice(idx_t.dims());
            dims.extend_from_slice(&t.dims()[axis + 1..]);
            one(g.reshape(dims.as_slice())?)
        }
        "Expand" => {
            let t = x()?;
            let spec: Vec<usize> = to_i64s(input(node, ins, 1)?)?.iter().map(|&d| d.max(0) as usize).collect();
            let s = broadcast_shape(node, t.dims(), &spec)?;
            one(t.broadcast_as(s.as_slice())?.contiguous()?)
        }
        "MatMul" => {
            let (a, b) = (x()?, input(node, ins, 1)?);
            if kernels::usable(&[a, b]) {
                if let Some(t) = kernels::matmul(a, b)? {
                    return one(t);
                }
            }
            one(matmul(a, b)?)
        }
        "Gemm" => {
            let (mut a, mut b) = (x()?.clone(), input(node, ins, 1)?.clone());
            if at.int("transA", 0) == 1 {
                a = a.t()?;
            }
            if at.int("transB", 0) == 1 {
                b = b.t()?;
            }
            let mut y = match kernels::usable(&[&a, &b]) {
                true => kernels::matmul(&a, &b)?.map_or_else(|| matmul(&a, &b), Ok)?,
                false => matmul(&a, &b)?,
            };
            let alpha = at.float("alpha", 1.0) as f64;
            if alpha != 1.0 {
                y = (y * alpha)?;
            }
            if let Some(c) = opt_input(ins, 2) {
                let beta = at.float("beta", 1.0) as f64;
                let c = if beta != 1.0 { (c * beta)? } else { c.clone() };
                y = y.broadcast_add(&c)?;
            }
            one(y)
        }
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
        "GlobalAveragePool" => {
            let t = x()?;
            if t.rank() < 3 {
                return Err(node_err(node, format!("expected [N, C, ...], found {:?}", t.dims())));
            }
            let (n, c) = (t.dims()[0], t.dims()[1]);
            let y = t.reshape((n, c, ()))?.mean_keepdim(2)?;
            let mut shape = vec![n, c];
            shape.resize(t.rank(), 1);
            one(y.reshape(shape.as_slice())?)
        }
        "MaxPool" | "AveragePool" => {
            let t = x()?;
            let k = at.ints("kernel_shape").unwrap_or_default();
            if t.rank() != 4 || k.len() != 2 {
                return Err(node_err(node, "only 2-D pooling on [N, C, H, W] is supported"));
            }
            let s = at.ints("strides").unwrap_or(vec![1, 1]);
            let pads = at.ints("pads").unwrap_or(vec![0; 4]);
            let t = pad_spatial(t, &pads, if node.op_type == "MaxPool" { f64::NEG_INFINITY } else { 0.0 })?;
            let (k, s) = ((k[0] as usize, k[1] as usize), (s[0] as usize, s[1] as usize));
            one(if node.op_type == "MaxPool" {
                t.max_pool2d_with_stride(k, s)?
            } else {
                t.avg_pool2d_with_stride(k, s)?
            })
        }
        "Conv" => one(super::conv::conv(node, x()?, input(node, ins, 1)?, opt_input(ins, 2))?),
        "Pad" => one(pad(node, ins, opset)?),
        other => Err(node_err(node, format!("op type `{other}` is not supported"))),
    }
}

fn int_unary(t: &Tensor, f: impl Fn(i64) -> Option<i64>) -> Result<Tensor> {
    let v: Option<Vec<i64>> = to_i64s(t)?.into_iter().map(f).collect();
    let v = v.ok_or_else(|| Error::onnx("integer op", "overflow"))?;
    Ok(Tensor::from_vec(v, t.dims(), t.device())?)
}

/// Axes from the input (opset >= 13 style) or the `axes` attribute.
fn axes_of(node: &NodeProto, ins: &[Option<Tensor>], idx: usize, from_input: bool) -> Result<Option<Vec<i64>>> {
    if from_input {
        if let Some(t) = opt_input(ins, idx) {
            return Ok(Some(to_i64s(t)?));
        }
    }
    Ok(Attrs(node).ints("axes"))
}

/// ONNX Reshape's shape spec (0 copies, -1 infers) to concrete dims.
fn reshape_dims(node: &NodeProto, dims: &[usize], spec: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = dims.iter().product();
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        match s {
            -1 => {
                if infer.replace(i).is_some() {
                    return Err(node_err(node, "more than one -1 in the shape"));
                }
                out.push(1);
            }
            0 if !allowzero => {
                out.push(*dims.get(i).ok_or_else(|| {
                    node_err(node, format!("0 at position {i} but the input has rank {}", dims.len()))
                })?)
            }
            s if s < 0 => return Err(node_err(node, format!("invalid dimension {s}"))),
            s => out.push(s as usize),
        }
    }
    if let Some(i) = infer {
        let known: usize = out.iter().product();
        if known == 0 || !total.is_multiple_of(known) {
            return Err(node_err(node, format!("cannot reshape {dims:?} to {spec:?}")));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(node_err(node, format!("cannot reshape {dims:?} ({total} elements) to {spec:?}")));
    }
    Ok(out)
}

/// Matrix product with ONNX/NumPy broadcasting; a 2-D right side folds the batch dims into rows.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if a.rank() == 1 || b.rank() == 1 {
        let a2 = if a.rank() == 1 { a.unsqueeze(0)? } else { a.clone() };
        let b2 = if b.rank() == 1 { b.unsqueeze(1)? } else { b.clone() };
        let y = matmul(&a2, &b2)?;
        let y = if a.rank() == 1 { y.squeeze(y.rank() - 2)? } else { y };
        return Ok(if b.rank() == 1 { y.squeeze(y.rank() - 1)? } else { y });
    }
    if b.rank() == 2 && a.rank() > 2 {
        let k = a.dims()[a.rank() - 1];
        let rows = a.elem_count() / k.max(1);
        let y = a.reshape((rows, k))?.matmul(&b)?;
        let mut dims = a.dims().to_vec();
        *dims.last_mut().unwrap_or(&mut 0) = b.dims()[1];
        return Ok(y.reshape(dims.as_slice())?);
    }
    Ok(a.broadcast_matmul(&b)?.contiguous()?)
}

/// Pads the two spatial dims of an NCHW tensor by `[top, left, bottom, right]` with `value`.
pub(crate) fn pad_spatial(t: &Tensor, pads: &[i64], value: f64) -> Result<Tensor> {
    if pads.iter().all(|&p| p == 0) {
        return Ok(t.clone());
    }
    let mut y = t.clone();
    for (axis, (b, e)) in [(2usize, (pads[0], pads[2])), (3usize, (pads[1], pads[3]))] {
        y = pad_axis(&y, axis, b, e, value)?;
    }
    Ok(y)
}

fn pad_axis(t: &Tensor, axis: usize, begin: i64, end: i64, value: f64) -> Result<Tensor> {
    let mut y = t.clone();
    if begin < 0 {
        let b = (-begin) as usize;
        y = y.narrow(axis, b.min(y.dims()[axis]), y.dims()[axis].saturating_sub(b))?;
    }
    if end < 0 {
        let e = (-end) as usize;
        y = y.narrow(axis, 0, y.dims()[axis].saturating_sub(e))?;
    }
    let mut parts = Vec::with_capacity(3);
    let block = |n: usize| -> Result<Tensor> {
        let mut d = y.dims().to_vec();
        d[axis] = n;
        Ok(Tensor::full(value, d.as_slice(), y.device())?.to_dtype(y.dtype())?)
    };
    if begin > 0 {
        parts.push(block(begin as usize)?);
    }
    parts.push(y.clone());
    if end > 0 {
        parts.push(block(end as usize)?);
    }
    Ok(if parts.len() == 1 { y } else { Tensor::cat(&parts, axis)? })
}

fn pad(node: &NodeProto, ins: &[Option<Tensor>], opset: i64) -> Result<Tensor> {
    let at = Attrs(node);
    let t = input(node, ins, 0)?;
    let r = t.rank();
    let mode = at.string("mode").unwrap_or_else(|| "constant".into());
    let (pads, value, axes) = if opset >= 11 {
        let pads = to_i64s(input(node, ins, 1)?)?;
        let value = opt_input(ins, 2).map(to_f64s).transpose()?.and_then(|v| v.first().copied()).unwrap_or(0.0);
        let axes = match opt_input(ins, 3) {
            Some(a) => to_i64s(a)?.iter().map(|&a| norm_axis(node, a, r)).collect::<Result<Vec<_>>>()?,
            None => (0..r).collect(),
        };
        (pads, value, axes)
    } else {
        (at.ints("pads").unwrap_or_default(), at.float("value", 0.0) as f64, (0..r).collect())
    };
    if pads.len() != 2 * axes.len() {
        return Err(node_err(
            node,
            format!("pads has {} values, expected {} for {} axes", pads.len(), 2 * axes.len(), axes.len()),
        ));
    }
    let n = axes.len();
    let mut y = t.clone();
    for (i, &axis) in axes.iter().enumerate() {
        let (b, e) = (pads[i], pads[i + n]);
        if b == 0 && e == 0 {
            continue;
        }
        y = match mode.as_str() {
            "constant" => pad_axis(&y, axis, b, e, value)?,
            "reflect" | "edge" => {
                let dim = y.dims()[axis] as i64;
                if b < 0 || e < 0 || dim == 0 || (mode == "reflect" && (b >= dim || e >= dim)) {
                    return Err(node_err(node, format!("{mode} padding {b},{e} does not fit dimension {dim}")));
                }
                let idx: Vec<u32> = (-b..dim + e)
                    .map(|i| {
                        let j = if mode == "edge" {
                            i.clamp(0, dim - 1)
                        } else if i < 0 {
                            -i
                        } else if i >= dim {
                            2 * (dim - 1) - i
                        } else {
                            i
                        };
                        j as u32
                    })
                    .collect();
                let ids = Tensor::from_vec(idx.clone(), idx.len(), y.device())?;
                y.contiguous()?.index_select(&ids, axis)?
            }
            other => return Err(node_err(node, format!("pad mode `{other}` is not supported"))),
        };
    }
    Ok(y)
}

fn slice(node: &NodeProto, ins: &[Option<Tensor>], opset: i64) -> Result<Tensor> {
    let at = Attrs(node);
    let t = input(node, ins, 0)?;
    let r = t.rank();
    let (starts, ends, axes, steps) = if opset >= 10 {
        let starts = to_i64s(input(node, ins, 1)?)?;
        let ends = to_i64s(input(node, ins, 2)?)?;
        let axes = opt_input(ins, 3).map(to_i64s).transpose()?;
        let steps = opt_input(ins, 4).map(to_i64s).transpose()?;
        (starts, ends, axes, steps)
    } else {
        (at.ints("starts").unwrap_or_default(), at.ints("ends").unwrap_or_default(), at.ints("axes"), None)
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(node_err(node, "starts, ends, axes and steps differ in length"));
    }
    let mut y = t.clone();
    for i in 0..starts.len() {
        let axis = norm_axis(node, axes[i], r)?;
        let dim = y.dims()[axis] as i64;
        let step = steps[i];
        if step == 0 {
            return Err(node_err(node, "step 0"));
        }
        let fix = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (s, e) = (fix(starts[i]), fix(ends[i]));
        if step > 0 {
            let s = s.clamp(0, dim);
            let e = e.clamp(0, dim);
            if step == 1 {
                y = y.narrow(axis, s as usize, (e - s).max(0) as usize)?;
                continue;
            }
            let idx: Vec<u32> = (s..e).step_by(step as usize).map(|v| v as u32).collect();
            y = select(&y, axis, idx)?;
        } else {
            let s = s.clamp(-1, dim - 1);
            let e = e.clamp(-1, dim - 1);
            let mut idx = Vec::new();
            let mut v = s;
            while v > e {
                idx.push(v as u32);
                v += step;
            }
            y = select(&y, axis, idx)?;
        }
    }
    Ok(y)
}

fn select(t: &Tensor, axis: usize, idx: Vec<u32>) -> Result<Tensor> {
    if idx.is_empty() {
        let mut d = t.dims().to_vec();
        d[axis] = 0;
        return Ok(Tensor::zeros(d.as_slice(), t.dtype(), t.device())?);
    }
    let ids = Tensor::from_vec(idx.clone(), idx.len(), t.device())?;
    Ok(t.contiguous()?.index_select(&ids, axis)?)
}
