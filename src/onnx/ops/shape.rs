//! ONNX ops, family: reshaping: Reshape, Flatten, Squeeze, Unsqueeze.

use candle_core::{Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] = &["Reshape", "Flatten", "Squeeze", "Unsqueeze"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
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
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}
