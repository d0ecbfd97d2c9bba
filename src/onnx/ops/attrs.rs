//! Which attributes every op's evaluator reads, checked when a graph loads: an attribute an op does not
//! read, or one it implements at a single value set to another, is a load-time error naming the node,
//! op, attribute and value, never a silently different result.

use candle_onnx::onnx::{AttributeProto, NodeProto};

use super::node_err;
use crate::error::Result;

/// An attribute an evaluator does not read, accepted only at the value it behaves as.
#[derive(Debug, Clone, Copy)]
pub(super) enum Fixed {
    /// An integer attribute.
    Int(i64),
}

/// An op's attributes: those its evaluator reads, and those accepted only at one value.
type Rules = (&'static [&'static str], &'static [(&'static str, Fixed)]);

const NONE: Rules = (&[], &[]);
const REDUCE: Rules = (&["axes", "keepdims", "noop_with_empty_axes"], &[]);

/// The rules of `op`, or None for an op the registry does not have.
pub(super) fn rules(op: &str) -> Option<Rules> {
    Some(match op {
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Equal" | "Less" | "Greater" | "Not"
        | "And" | "Where" => NONE,
        "Mod" => (&["fmod"], &[]),
        "Neg" | "Abs" | "Sign" | "Log" | "Sqrt" | "Reciprocal" | "Floor" | "Ceil" | "Erf" | "Exp" | "Relu"
        | "Sigmoid" | "Tanh" | "HardSwish" => NONE,
        "Gelu" => (&["approximate"], &[]),
        "HardSigmoid" => (&["alpha", "beta"], &[]),
        "Clip" => (&["min", "max"], &[]),
        "LeakyRelu" => (&["alpha"], &[]),
        "CastLike" => (&["saturate"], &[]),
        "Tile" => NONE,
        "GatherElements" => (&["axis"], &[]),
        "GatherND" => (&["batch_dims"], &[]),
        "InstanceNormalization" => (&["epsilon"], &[]),
        // Computed in float32, which is stash_type 1.
        "GroupNormalization" => (&["epsilon", "num_groups"], &[("stash_type", Fixed::Int(1))]),
        "Identity" | "Size" | "Range" | "Expand" | "MatMul" | "GlobalAveragePool" | "GlobalMaxPool" => NONE,
        // Inference: dropout is the identity whatever its ratio and seed.
        "Dropout" => (&["ratio", "seed", "is_test"], &[]),
        // `saturate` only concerns float8 targets, which Cast refuses.
        "Cast" => (&["to", "saturate"], &[]),
        "Constant" => (&["value", "value_float", "value_floats", "value_int", "value_ints"], &[]),
        "ConstantOfShape" => (&["value"], &[]),
        "Shape" => (&["start", "end"], &[]),
        "Reshape" => (&["allowzero"], &[]),
        "Flatten" | "Concat" | "Gather" | "Softmax" => (&["axis"], &[]),
        "Squeeze" | "Unsqueeze" => (&["axes"], &[]),
        "Split" => (&["axis", "split", "num_outputs"], &[]),
        "Slice" => (&["starts", "ends", "axes"], &[]),
        "Transpose" => (&["perm"], &[]),
        "Gemm" => (&["alpha", "beta", "transA", "transB"], &[]),
        "Conv" => (&["group", "dilations", "pads", "strides", "auto_pad", "kernel_shape"], &[]),
        // Computed in float32, which is stash_type 1.
        "LayerNormalization" => (&["axis", "epsilon"], &[("stash_type", Fixed::Int(1))]),
        // Inference mode: the running statistics are used and momentum is not.
        "BatchNormalization" => {
            (&["epsilon", "momentum"], &[("training_mode", Fixed::Int(0)), ("spatial", Fixed::Int(1))])
        }
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
        | "ReduceSumSquare" | "ReduceLogSum" | "ReduceLogSumExp" => REDUCE,
        // storage_order only orders the Indices output, which MaxPool refuses.
        "MaxPool" => (&["kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad", "storage_order"], &[]),
        "AveragePool" => {
            (&["kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad", "count_include_pad"], &[])
        }
        "Pad" => (&["mode", "pads", "value"], &[]),
        "Einsum" => (&["equation"], &[]),
        "ConvTranspose" => (
            &["group", "dilations", "pads", "strides", "auto_pad", "kernel_shape", "output_padding", "output_shape"],
            &[],
        ),
        // Antialiased downscaling is not implemented.
        "Resize" => (
            &[
                "mode",
                "coordinate_transformation_mode",
                "nearest_mode",
                "cubic_coeff_a",
                "exclude_outside",
                "extrapolation_value",
                "keep_aspect_ratio_policy",
                "axes",
            ],
            &[("antialias", Fixed::Int(0))],
        ),
        "Upsample" => (&["mode", "scales"], &[]),
        _ => return None,
    })
}

/// An ONNX element type's name, including the codes newer than candle-onnx's copy of onnx.proto.
pub(crate) fn type_name(code: i64) -> String {
    use candle_onnx::onnx::tensor_proto::DataType;
    let newer = match code {
        21 => "UINT4",
        22 => "INT4",
        23 => "FLOAT4E2M1",
        24 => "FLOAT8E8M0",
        25 => "UINT2",
        26 => "INT2",
        _ => "an unknown type",
    };
    DataType::try_from(code as i32).map(|d| format!("{d:?}")).unwrap_or(newer.to_string())
}

fn shown(a: &AttributeProto) -> String {
    if !a.ints.is_empty() {
        format!("{:?}", a.ints)
    } else if !a.s.is_empty() {
        format!("\"{}\"", String::from_utf8_lossy(&a.s))
    } else if a.f != 0.0 {
        format!("{}", a.f)
    } else {
        format!("{}", a.i)
    }
}

/// Checks every attribute of `node` against its op's rules (ops outside the registry are reported by the
/// supported-op check instead).
pub(crate) fn check(node: &NodeProto) -> Result<()> {
    let Some((read, fixed)) = rules(&node.op_type) else { return Ok(()) };
    for a in &node.attribute {
        if read.contains(&a.name.as_str()) {
            continue;
        }
        match fixed.iter().find(|(n, _)| *n == a.name) {
            Some((_, Fixed::Int(v))) if a.i == *v => {}
            Some((_, Fixed::Int(v))) => {
                return Err(node_err(
                    node,
                    format!("attribute `{}` = {} is not implemented (only {v})", a.name, shown(a)),
                ))
            }
            None => {
                return Err(node_err(
                    node,
                    format!(
                        "attribute `{}` = {} is not implemented; refusing rather than ignoring it",
                        a.name,
                        shown(a)
                    ),
                ))
            }
        }
    }
    if node.op_type == "Cast" {
        let to = node.attribute.iter().find(|a| a.name == "to").map_or(0, |a| a.i);
        if crate::onnx::tensor::dtype_of_code(to).is_none() {
            return Err(node_err(
                node,
                format!("attribute `to` = {to} ({}) is not a type automm computes in", type_name(to)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every op of the registry declares its attributes, and an attribute it does not read is refused
    /// naming node, op, attribute and value.
    #[test]
    fn every_registered_op_declares_its_attributes_and_refuses_others() {
        for op in super::super::supported_ops() {
            assert!(rules(op).is_some(), "op `{op}` declares no attribute handling");
            let node = NodeProto {
                op_type: op.into(),
                name: "n1".into(),
                attribute: vec![AttributeProto { name: "automm_unknown".into(), i: 7, ..Default::default() }],
                ..Default::default()
            };
            let e = check(&node).unwrap_err().to_string();
            assert!(e.contains("n1") && e.contains(op) && e.contains("automm_unknown") && e.contains('7'), "{e}");
        }
        let bn = |mode: i64| NodeProto {
            op_type: "BatchNormalization".into(),
            name: "bn".into(),
            attribute: vec![AttributeProto { name: "training_mode".into(), i: mode, ..Default::default() }],
            ..Default::default()
        };
        assert!(check(&bn(0)).is_ok());
        let e = check(&bn(1)).unwrap_err().to_string();
        assert!(e.contains("training_mode") && e.contains("only 0"), "{e}");
    }
}
