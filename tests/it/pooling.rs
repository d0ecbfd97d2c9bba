//! One-node graphs against ONNX Runtime: pooling with every attribute (count_include_pad, whose ONNX
//! default 0 excludes padded cells, ceil_mode, dilations, auto_pad VALID/SAME_UPPER/SAME_LOWER, 1-D,
//! GlobalMaxPool), and the ops added for the timm zoo (reductions, LeakyRelu, Tile, GatherElements, GatherND,
//! Instance/GroupNormalization; CastLike is not here: ORT returns its non-float outputs in types this
//! harness does not read). Shapes and values must both match.

use std::path::Path;

use automm::deploy::engine::ort::{Feed, OrtSession};
use automm::onnx::Graph;
use candle_core::{Device, Tensor};
use candle_onnx::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
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
    model_with(op, attrs, dims, opset, vec![])
}

/// A one-node model whose node reads `x` and then the constant `inits`, in order.
fn model_with(op: &str, attrs: Vec<AttributeProto>, dims: &[usize], opset: i64, inits: Vec<TensorProto>) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
        graph: Some(GraphProto {
            name: "pool".into(),
            node: vec![NodeProto {
                op_type: op.into(),
                name: "pool".into(),
                input: std::iter::once("x".to_string()).chain(inits.iter().map(|t| t.name.clone())).collect(),
                output: vec!["y".into()],
                attribute: attrs,
                ..Default::default()
            }],
            initializer: inits,
            input: vec![value("x", Some(dims))],
            output: vec![value("y", None)],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Our result vs ORT's for one node on a deterministic input; returns the max |diff| divided by the
/// output's scale (max |ORT|, at least 1).
fn compare(dir: &Path, case: &str, op: &str, attrs: Vec<AttributeProto>, dims: &[usize]) -> f32 {
    compare_model(dir, case, model(op, attrs, dims, 19), dims)
}

fn compare_model(dir: &Path, case: &str, m: ModelProto, dims: &[usize]) -> f32 {
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
    let scale = want.iter().map(|v| v.abs()).fold(1.0, f32::max);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
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

fn f32s(name: &str, dims: &[i64], v: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: v,
        ..Default::default()
    }
}
fn i64s(name: &str, dims: &[i64], v: Vec<i64>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Int64 as i32,
        int64_data: v,
        ..Default::default()
    }
}

#[test]
fn zoo_ops_match_onnx_runtime() {
    if !common::ort_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = [2usize, 4, 3, 5];
    let axes = || i64s("axes", &[2], vec![1, 3]);
    let ramp = |n: usize| (0..n).map(|i| 0.5 + i as f32 * 0.25).collect::<Vec<_>>();
    let cases: Vec<(&str, ModelProto)> = vec![
        ("reduce_min", model_with("ReduceMin", vec![], &d, 18, vec![axes()])),
        ("reduce_l1", model_with("ReduceL1", vec![int("keepdims", 0)], &d, 18, vec![axes()])),
        ("reduce_l2", model_with("ReduceL2", vec![], &d, 18, vec![axes()])),
        ("reduce_sum_square", model_with("ReduceSumSquare", vec![], &d, 18, vec![axes()])),
        ("reduce_log_sum_exp", model_with("ReduceLogSumExp", vec![], &d, 18, vec![axes()])),
        ("leaky_relu", model_with("LeakyRelu", vec![float("alpha", 0.1)], &d, 18, vec![])),
        ("tile", model_with("Tile", vec![], &d, 18, vec![i64s("reps", &[4], vec![1, 2, 1, 3])])),
        (
            "gather_elements",
            model_with(
                "GatherElements",
                vec![int("axis", 3)],
                &d,
                18,
                vec![i64s("idx", &[2, 4, 3, 2], (0..48).map(|i| [(i % 5) as i64, -1, -5][i % 3]).collect())],
            ),
        ),
        ("reduce_prod", model_with("ReduceProd", vec![], &d, 18, vec![i64s("axes", &[1], vec![1])])),
        ("gather_nd", model_with("GatherND", vec![], &d, 18, vec![i64s("i", &[3, 2], vec![1, 3, 0, 0, -1, 2])])),
        (
            "gather_nd_batch",
            model_with("GatherND", vec![int("batch_dims", 1)], &d, 18, vec![i64s("i", &[2, 2, 1], vec![3, 0, -1, 1])]),
        ),
        (
            "instance_norm",
            model_with(
                "InstanceNormalization",
                vec![float("epsilon", 1e-3)],
                &d,
                18,
                vec![f32s("s", &[4], ramp(4)), f32s("b", &[4], ramp(4))],
            ),
        ),
        (
            "group_norm_21",
            model_with(
                "GroupNormalization",
                vec![int("num_groups", 2)],
                &d,
                21,
                vec![f32s("s", &[4], ramp(4)), f32s("b", &[4], ramp(4))],
            ),
        ),
    ];
    for (case, m) in cases {
        let diff = compare_model(dir.path(), case, m, &d);
        assert!(diff <= 1e-4, "{case}: max |ours - ORT| = {diff} (relative to the output's scale)");
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: v, ..Default::default() }
}

/// `onnx run` feeds several named inputs and keeps their dtypes; both engines give the same output, and
/// a missing or unknown input is an error naming it.
#[test]
fn onnx_run_takes_named_inputs_of_any_dtype() {
    let dir = tempfile::tempdir().unwrap();
    // y = Gather(a, idx) + b: a float input, an int64 input.
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(GraphProto {
            name: "two".into(),
            node: vec![
                NodeProto {
                    op_type: "Gather".into(),
                    name: "g".into(),
                    input: vec!["a".into(), "idx".into()],
                    output: vec!["ga".into()],
                    ..Default::default()
                },
                NodeProto {
                    op_type: "Add".into(),
                    name: "add".into(),
                    input: vec!["ga".into(), "b".into()],
                    output: vec!["y".into()],
                    ..Default::default()
                },
            ],
            input: vec![
                value("a", Some(&[4, 3])),
                value_typed("idx", &[2], DataType::Int64),
                value("b", Some(&[2, 3])),
            ],
            output: vec![value("y", None)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = dir.path().join("two.onnx");
    std::fs::write(&model, m.encode_to_vec()).unwrap();
    let a = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((4, 3)).unwrap();
    let idx = Tensor::new(&[3i64, 1], &Device::Cpu).unwrap();
    let b = Tensor::full(0.5f32, (2, 3), &Device::Cpu).unwrap();
    for (n, t) in [("a", &a), ("idx", &idx), ("b", &b)] {
        t.write_npy(dir.path().join(format!("{n}.npy"))).unwrap();
    }
    let arg = |n: &str| format!("{n}={}", dir.path().join(format!("{n}.npy")).display());
    let run = |engine: &str, inputs: &[&str]| {
        let out = dir.path().join(format!("y_{engine}.npy"));
        let mut c = common::bin();
        c.args(["onnx", "run", "--engine", engine, "--output"]).arg(&out).arg(&model);
        for i in inputs {
            c.args(["--input", &arg(i)]);
        }
        let o = c.output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned(), out)
    };
    let (ok, err, out) = run("candle", &["a", "idx", "b"]);
    assert!(ok, "{err}");
    let y = Tensor::read_npy(&out).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(y, vec![9.5, 10.5, 11.5, 3.5, 4.5, 5.5]);
    let (ok, err, _) = run("candle", &["a", "b"]);
    assert!(!ok && err.contains("`idx`"), "{err}");
    let (ok, err, _) = run("candle", &["a", "idx", "b", "zzz"]);
    assert!(!ok && err.contains("zzz"), "{err}");
    if common::ort_available() {
        let (ok, err, out) = run("ort", &["a", "idx", "b"]);
        assert!(ok, "{err}");
        let z = Tensor::read_npy(&out).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(z, y, "the engines disagree");
    }
}

fn value_typed(name: &str, dims: &[usize], elem: DataType) -> ValueInfoProto {
    let mut v = value(name, Some(dims));
    if let Some(type_proto::Value::TensorType(t)) = v.r#type.as_mut().and_then(|t| t.value.as_mut()) {
        t.elem_type = elem as i32;
    }
    v
}

fn node(op: &str, ins: &[&str], out: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: out.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute,
        ..Default::default()
    }
}

/// Deterministic weights in about [-0.5, 0.5].
fn weights(name: &str, dims: &[i64], seed: usize) -> TensorProto {
    let n: i64 = dims.iter().product();
    f32s(name, dims, (0..n as usize).map(|i| (((i + seed) * 2654435761) % 1000) as f32 / 1000.0 - 0.5).collect())
}

/// An EfficientNet/RegNet/MobileNetV3-style block: 1x1 conv, SiLU spelled Mul(x, Sigmoid(x)),
/// squeeze-excite through ReduceMean over H, W and a per-channel Mul, a grouped 3x3 conv, HardSwish.
/// The plan fuses the SiLU into the conv, keeps the chain channel-blocked (the SE scale broadcasts in blocked form)
/// and runs the grouped conv on our kernel: the result must still be ORT's.
#[test]
fn squeeze_excite_block_fused_and_blocked_matches_onnx_runtime() {
    if !common::ort_available() {
        return;
    }
    let dims = [2usize, 16, 9, 9];
    let nodes = vec![
        node("Conv", &["x", "w1", "b1"], "a", vec![]),
        node("Sigmoid", &["a"], "sa", vec![]),
        node("Mul", &["a", "sa"], "silu", vec![]),
        node("ReduceMean", &["silu"], "pooled", vec![ints("axes", &[2, 3])]),
        node("Conv", &["pooled", "w2", "b2"], "e", vec![]),
        node("Sigmoid", &["e"], "se", vec![]),
        node("Mul", &["silu", "se"], "scaled", vec![]),
        node("Conv", &["scaled", "w3"], "g", vec![int("group", 4), ints("pads", &[1, 1, 1, 1])]),
        node("HardSwish", &["g"], "hs", vec![]),
        node("GlobalAveragePool", &["hs"], "y", vec![]),
    ];
    let inits = vec![
        weights("w1", &[16, 16, 1, 1], 1),
        weights("b1", &[16], 2),
        weights("w2", &[16, 16, 1, 1], 3),
        weights("b2", &[16], 4),
        weights("w3", &[16, 4, 3, 3], 5),
    ];
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(GraphProto {
            name: "se".into(),
            node: nodes,
            initializer: inits,
            input: vec![value("x", Some(&dims))],
            output: vec![value("y", None)],
            ..Default::default()
        }),
        ..Default::default()
    };
    let g = Graph::from_model(&m, "se", &Device::Cpu, None).unwrap();
    let x = Tensor::zeros(&dims[..], candle_core::DType::F32, &Device::Cpu).unwrap();
    let st = g.plan_stats(&[("x", x)]).unwrap();
    // The SiLU folds into the first conv, the HardSwish into the grouped conv (10 nodes, 7 steps); blocked:
    // the first conv, the excite conv, its Sigmoid, the scaling Mul and the grouped conv (written blocked
    // for the pool).
    assert!(st.fused >= 2 && st.steps == 7 && st.blocked >= 5, "the fast paths were not taken: {st:?}");
    let dir = tempfile::tempdir().unwrap();
    let d = compare_model(dir.path(), "se_block", m, &dims);
    assert!(d <= 1e-5, "max |ours - ORT| / scale = {d}");
}
