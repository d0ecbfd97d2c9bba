//! ONNX ops, family: pooling and padding.

use candle_core::{Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] = &["GlobalAveragePool", "MaxPool", "AveragePool", "Pad"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
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
        "Pad" => one(pad(node, ins, opset)?),
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}
