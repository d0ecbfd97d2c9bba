//! ONNX ops, family: matrix products and convolution: MatMul, Gemm, Einsum, Conv, ConvTranspose.

use candle_core::{Device, Tensor};
use candle_onnx::onnx::NodeProto;

use super::*;
use crate::error::Result;

/// The op types this family evaluates.
pub const OPS: &[&str] = &["MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose"];

/// Evaluates `node` (one of [`OPS`]).
pub fn eval(node: &NodeProto, ins: &[Option<Tensor>], _opset: i64, _device: &Device) -> Result<Vec<Tensor>> {
    let at = Attrs(node);
    let x = || input(node, ins, 0);
    let one = |t: Tensor| Ok(vec![t]);
    match node.op_type.as_str() {
        "MatMul" => {
            let (a, b) = (x()?, input(node, ins, 1)?);
            if kernels::usable(&[a, b]) {
                if let Some(t) = kernels::matmul(a, b)? {
                    return one(t);
                }
            }
            if let Some(t) = kernels::grad::matmul(a, b)? {
                return one(t);
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
        "Conv" => one(conv::conv(node, x()?, input(node, ins, 1)?, opt_input(ins, 2))?),
        "ConvTranspose" => one(conv::conv_transpose(node, x()?, input(node, ins, 1)?, opt_input(ins, 2))?),
        "Einsum" => {
            let eq = at.string("equation").ok_or_else(|| node_err(node, "attribute `equation` is missing"))?;
            let xs: Vec<&Tensor> = ins.iter().flatten().collect();
            one(super::einsum::einsum(node, &eq, &xs)?)
        }
        other => Err(node_err(node, format!("op type `{other}` is not in this family"))),
    }
}
