//! ONNX ops, family: joining, splitting, slicing, permuting, gathering and expanding tensors.

use candle_core::{Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] =
    &["Concat", "Split", "Slice", "Transpose", "Gather", "GatherElements", "GatherND", "Expand", "Tile"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
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
            if let Some(y) = kernels::concat(&nonempty.iter().collect::<Vec<_>>(), axis)? {
                return one(y);
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
        "Tile" => {
            let t = x()?;
            let reps = to_i64s(input(node, ins, 1)?)?;
            if reps.len() != t.rank() || reps.iter().any(|&r| r < 0) {
                return Err(node_err(node, format!("repeats {reps:?} must be {} values >= 0", t.rank())));
            }
            let reps: Vec<usize> = reps.iter().map(|&r| r as usize).collect();
            one(t.repeat(reps.as_slice())?)
        }
        "GatherND" => one(gather_nd(node, x()?, input(node, ins, 1)?)?),
        "GatherElements" => {
            let t = x()?;
            let axis = norm_axis(node, at.int("axis", 0), t.rank())?;
            let idx = input(node, ins, 1)?;
            if idx.rank() != t.rank() {
                return Err(node_err(node, format!("indices {:?} and data {:?} differ in rank", idx.dims(), t.dims())));
            }
            let len = t.dims()[axis] as i64;
            let mut v = Vec::with_capacity(idx.elem_count());
            for i in to_i64s(idx)? {
                let j = if i < 0 { i + len } else { i };
                if !(0..len).contains(&j) {
                    return Err(node_err(node, format!("index {i} is outside axis {axis} of length {len}")));
                }
                v.push(j as u32);
            }
            one(t.contiguous()?.gather(&Tensor::from_vec(v, idx.dims(), t.device())?, axis)?)
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
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}

/// GatherND: `indices[..., :m]` pick slices of `data` after its first `batch_dims` axes, as one
/// `index_select` of `data`'s rows (so gradients flow to `data`).
fn gather_nd(node: &NodeProto, data: &Tensor, indices: &Tensor) -> Result<Tensor> {
    let b = Attrs(node).int("batch_dims", 0).max(0) as usize;
    let (dd, id) = (data.dims(), indices.dims());
    let m = id.last().copied().unwrap_or(0);
    if id.is_empty() || b >= id.len() || b + m > dd.len() || dd[..b] != id[..b] {
        return Err(node_err(node, format!("indices {id:?} do not fit data {dd:?} with batch_dims {b}")));
    }
    let picked = &dd[b..b + m];
    let rest: Vec<usize> = dd[b + m..].to_vec();
    let per_batch: usize = picked.iter().product();
    let rows: usize = dd[..b + m].iter().product();
    let batch: usize = id[..b].iter().product();
    let idx = to_i64s(indices)?;
    let tuples = idx.len() / m.max(1);
    let per_tuple_batch = tuples / batch.max(1);
    let mut lin = Vec::with_capacity(tuples);
    for (t, tuple) in idx.chunks(m.max(1)).enumerate() {
        let mut r = 0usize;
        for (j, (&i, &len)) in tuple.iter().zip(picked).enumerate() {
            let i = if i < 0 { i + len as i64 } else { i };
            if !(0..len as i64).contains(&i) {
                return Err(node_err(node, format!("index {i} is outside axis {} of length {len}", b + j)));
            }
            r = r * len + i as usize;
        }
        lin.push(((t / per_tuple_batch.max(1)) * per_batch + r) as u32);
    }
    let flat = data.contiguous()?.reshape((rows, rest.iter().product::<usize>()))?;
    let y = flat.index_select(&Tensor::from_vec(lin, tuples, data.device())?, 0)?;
    let mut shape: Vec<usize> = id[..id.len() - 1].to_vec();
    shape.extend(rest);
    Ok(y.reshape(shape.as_slice())?)
}
