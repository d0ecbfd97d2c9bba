//! Pooling against ONNX Runtime on one-node graphs covering every attribute: count_include_pad (the
//! ONNX default 0 excludes padded cells), ceil_mode, dilations, auto_pad (VALID, SAME_UPPER, SAME_LOWER),
//! 1-D pooling and GlobalMaxPool. Shapes and values must both match.

use std::path::Path;

use automm::deploy::engine::ort::{Feed, OrtSession};
use automm::onnx::Graph;
use candle_core::{Device, Tensor};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;

use crate::common;

fn value(name: &str, dims: Option<&[usize]>) -> ValueInfoProto {
    let shape = dims.map(|d| TensorShapeProto {
        dim: d
            .iter()
            .map(|&v| tensor_shape_proto::Dimension {
                value: Some(tensor_shape_proto::dimension::Value::DimValue(v as i64)),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: DataType::Float as i32, shape })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}
fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}
fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn model(op: &str, attrs: Vec<AttributeProto>, dims: &[usize], opset: i64) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(GraphProto {
            name: "pool".into(),
            node: vec![NodeProto {
                op_type: op.into(),
                name: "pool".into(),
                input: vec!["x".into()],
                output: vec!["y".into()],
                attribute: attrs,
                ..Default::default()
            }],
            input: vec![value("x", Some(dims))],
            output: vec![value("y", None)],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Our result vs ORT's for one node on a deterministic input; returns the max |diff|.
fn compare(dir: &Path, case: &str, op: &str, attrs: Vec<AttributeProto>, dims: &[usize]) -> f32 {
    let m = model(op, attrs, dims, 19);
    let path = dir.join(format!("{case}.onnx"));
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|i| ((i * 7919) % 97) as f32 / 13.0 - 3.0).collect();
    let ort = OrtSession::open(&path, 1).unwrap().run(vec![("x", Feed::F32(dims.to_vec(), data.clone()))]).unwrap();
    let (want_shape, want) = &ort[0];
    let g = Graph::from_model(&m, case, &Device::Cpu, None).unwrap();
    let x = Tensor::from_vec(data, dims, &Device::Cpu).unwrap();
    let y = g.run(&[("x", x)]).unwrap().remove(0);
    assert_eq!(y.dims(), want_shape.as_slice(), "{case}: shape");
    let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn pooling_attributes_match_onnx_runtime() {
    if !common::ort_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k3 = || ints("kernel_shape", &[3, 3]);
    let cases: Vec<(&str, &str, Vec<AttributeProto>, Vec<usize>)> = vec![
        ("avg_pad_exclude", "AveragePool", vec![k3(), ints("pads", &[1, 1, 1, 1])], vec![1, 2, 7, 6]),
        (
            "avg_pad_include",
            "AveragePool",
            vec![k3(), ints("pads", &[1, 1, 1, 1]), int("count_include_pad", 1)],
            vec![1, 2, 7, 6],
        ),
        ("avg_ceil_stride", "AveragePool", vec![k3(), ints("strides", &[2, 2]), int("ceil_mode", 1)], vec![1, 2, 8, 9]),
        (
            "avg_ceil_pad_include",
            "AveragePool",
            vec![
                k3(),
                ints("strides", &[2, 2]),
                ints("pads", &[1, 0, 1, 0]),
                int("ceil_mode", 1),
                int("count_include_pad", 1),
            ],
            vec![1, 1, 8, 9],
        ),
        ("max_ceil", "MaxPool", vec![k3(), ints("strides", &[2, 2]), int("ceil_mode", 1)], vec![1, 2, 56, 56]),
        (
            "max_dilated",
            "MaxPool",
            vec![k3(), ints("dilations", &[2, 2]), ints("pads", &[2, 2, 2, 2])],
            vec![1, 2, 9, 8],
        ),
        (
            "avg_dilated",
            "AveragePool",
            vec![k3(), ints("dilations", &[2, 1]), ints("strides", &[1, 2])],
            vec![1, 2, 9, 8],
        ),
        (
            "max_same_upper",
            "MaxPool",
            vec![k3(), ints("strides", &[2, 2]), string("auto_pad", "SAME_UPPER")],
            vec![1, 2, 8, 7],
        ),
        (
            "avg_same_lower",
            "AveragePool",
            vec![ints("kernel_shape", &[2, 2]), string("auto_pad", "SAME_LOWER")],
            vec![1, 2, 5, 5],
        ),
        ("max_valid", "MaxPool", vec![k3(), ints("strides", &[2, 2]), string("auto_pad", "VALID")], vec![1, 2, 8, 7]),
        (
            "max_1d",
            "MaxPool",
            vec![ints("kernel_shape", &[3]), ints("strides", &[2]), ints("pads", &[1, 1])],
            vec![1, 3, 11],
        ),
        (
            "avg_1d_ceil",
            "AveragePool",
            vec![ints("kernel_shape", &[2]), ints("strides", &[2]), int("ceil_mode", 1)],
            vec![1, 3, 7],
        ),
        ("global_max", "GlobalMaxPool", vec![], vec![2, 3, 5, 4]),
    ];
    for (case, op, attrs, dims) in cases {
        let d = compare(dir.path(), case, op, attrs, &dims);
        assert!(d <= 1e-5, "{case}: max |ours - ORT| = {d}");
    }
}
