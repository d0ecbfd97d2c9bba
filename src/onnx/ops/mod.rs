//! ONNX operators evaluated on candle tensors, registered by family (one file each: arithmetic, unary,
//! values, shape, layout, linear, norm, pool, resize) behind [`eval`]; this file holds the registry and the
//! helpers the families share. Each op checks its inputs and returns an error naming the node on bad
//! input; nothing here panics on a malformed graph.

use candle_core::{DType, Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::kernels;
use super::tensor::{dtype_of_code, from_proto};
use crate::error::{Error, Result};

mod arith;
pub(crate) mod attrs;
pub(crate) mod conv;
mod einsum;
mod layout;
mod linear;
pub(crate) mod norm;
pub(crate) mod pool;
mod resize;
mod shape;
pub(crate) mod unary;
mod values;

/// An op family's evaluator.
type Eval = fn(&NodeProto, &[Option<Tensor>], i64, &Device) -> Result<Vec<Tensor>>;

/// The registry: every family with the op types it evaluates (what the importer supports is derived
/// from it, so the list and the dispatch never disagree).
const FAMILIES: &[(&[&str], Eval)] = &[
    (arith::OPS, arith::eval),
    (unary::OPS, unary::eval),
    (values::OPS, values::eval),
    (shape::OPS, shape::eval),
    (layout::OPS, layout::eval),
    (linear::OPS, linear::eval),
    (norm::OPS, norm::eval),
    (pool::OPS, pool::eval),
    (resize::OPS, resize::eval),
];

/// True when the registry has an evaluator for `op_type`.
pub fn supported(op_type: &str) -> bool {
    FAMILIES.iter().any(|(ops, _)| ops.contains(&op_type))
}

/// Every supported op type, sorted.
pub fn supported_ops() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FAMILIES.iter().flat_map(|(ops, _)| ops.iter().copied()).collect();
    v.sort_unstable();
    v
}

/// Evaluates one node by its family's evaluator; `ins[i]` is None for an omitted optional input.
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, device: &Device) -> Result<Vec<Tensor>> {
    match FAMILIES.iter().find(|(ops, _)| ops.contains(&node.op_type.as_str())) {
        Some((_, eval)) => eval(node, ins, opset, device),
        None => Err(node_err(node, format!("op type `{}` is not supported", node.op_type))),
    }
}

/// An error on `node`; the graph that runs it adds the model's name ([`Error::in_model`]).
pub(crate) fn node_err(node: &NodeProto, msg: impl std::fmt::Display) -> Error {
    let name = if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
    Error::Node { model: String::new(), node: name, op: node.op_type.clone(), msg: msg.to_string() }
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
    pub fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name).map(|a| a.floats.clone())
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
            "reflect" | "edge" | "wrap" => {
                let dim = y.dims()[axis] as i64;
                if b < 0
                    || e < 0
                    || dim == 0
                    || (mode != "edge" && (b > dim || e > dim || mode == "reflect" && (b == dim || e == dim)))
                {
                    return Err(node_err(node, format!("{mode} padding {b},{e} does not fit dimension {dim}")));
                }
                let idx: Vec<u32> = (-b..dim + e)
                    .map(|i| {
                        let j = if mode == "edge" {
                            i.clamp(0, dim - 1)
                        } else if mode == "wrap" {
                            i.rem_euclid(dim)
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
