//! Our ONNX importer against ONNX Runtime: the committed fixtures (a timm Swin exported by
//! models/export_swin_tiny.py and an EfficientNet-Lite-pattern CNN from models/make_cnn_fixture.py) come
//! with an input batch and ORT's outputs, so this runs without Python or ORT.

use crate::common;
use common::fixture;

use automm::onnx::{detect_feature_tensor, read_model, read_npy, Graph};
use candle_core::{Device, Tensor};
use candle_onnx::onnx::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto, ValueInfoProto};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn check_parity(model: &str) {
    let path = fixture(model);
    let g = Graph::load(&path, &Device::Cpu, None).unwrap();
    let x = read_npy(&fixture(&format!("{model}.input.npy"))).unwrap();
    let want = read_npy(&fixture(&format!("{model}.logits.npy"))).unwrap();
    let name = g.inputs()[0].name.clone();
    // First run builds the plan, second runs it: both must match ORT.
    for _ in 0..2 {
        let y = g.run(&[(name.as_str(), x.clone())]).unwrap().remove(0);
        let d = max_abs_diff(&y, &want);
        assert!(d <= 1e-4, "{model}: max |candle - ORT| = {d}");
    }
    // Batch 1 through a fresh plan gives the first row.
    let y1 = g.run(&[(name.as_str(), x.narrow(0, 0, 1).unwrap())]).unwrap().remove(0);
    assert!(max_abs_diff(&y1, &want.narrow(0, 0, 1).unwrap()) <= 1e-4);
}

#[test]
fn swin_fixture_matches_onnx_runtime() {
    check_parity("swin_fixture.onnx");
}

/// The parity above covers GELU computed inside the MatMul+bias before it only if the plan absorbed it:
/// one per block (the fixture has six).
#[test]
fn swin_fixture_plan_runs_gelu_inside_the_mlp_matmul() {
    let g = Graph::load(&fixture("swin_fixture.onnx"), &Device::Cpu, None).unwrap();
    let x = read_npy(&fixture("swin_fixture.onnx.input.npy")).unwrap();
    let st = g.plan_stats(&[("input", x)]).unwrap();
    assert_eq!(st.matmul_gelu, 6, "{st:?}");
}

#[test]
fn efficientnet_pattern_cnn_matches_onnx_runtime() {
    check_parity("cnn_fixture.onnx");
}

/// The parity above runs the channel-blocked kernels only if the plan chose them: every conv (the dense
/// stem included, its readers being blocked), and the residual Add; the pool reads blocked data, the
/// classifier does not.
#[test]
fn cnn_fixture_plan_keeps_the_conv_chain_channel_blocked() {
    let g = Graph::load(&fixture("cnn_fixture.onnx"), &Device::Cpu, None).unwrap();
    let x = read_npy(&fixture("cnn_fixture.onnx.input.npy")).unwrap();
    let st = g.plan_stats(&[("input", x)]).unwrap();
    assert_eq!((st.blocked, st.fused), (6, 4), "{st:?}");
}

#[test]
fn feature_tensor_is_the_classifier_input() {
    let m = read_model(&fixture("cnn_fixture.onnx")).unwrap();
    assert_eq!(detect_feature_tensor(&m).unwrap(), "feat");
    let m = read_model(&fixture("swin_fixture.onnx")).unwrap();
    let f = detect_feature_tensor(&m).unwrap();
    assert_ne!(f, "logits");
    let g = Graph::from_model(&m, "swin", &Device::Cpu, Some(vec![f])).unwrap();
    let x = read_npy(&fixture("swin_fixture.onnx.input.npy")).unwrap();
    let y = g.run(&[("input", x)]).unwrap().remove(0);
    assert_eq!(y.dims(), &[2, 32]);
}

fn node(op: &str, name: &str, ins: &[&str], outs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: outs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `n` deterministic values in `o +- s`.
fn seq(n: usize, s: f32, o: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * s + o).collect()
}

/// An INTS attribute.
fn ints(name: &str, v: &[i64]) -> candle_onnx::onnx::AttributeProto {
    candle_onnx::onnx::AttributeProto { name: name.into(), ints: v.to_vec(), r#type: 7, ..Default::default() }
}

/// An INT attribute.
fn int(name: &str, v: i64) -> candle_onnx::onnx::AttributeProto {
    candle_onnx::onnx::AttributeProto { name: name.into(), i: v, r#type: 2, ..Default::default() }
}

/// A FLOAT attribute.
fn float(name: &str, v: f32) -> candle_onnx::onnx::AttributeProto {
    candle_onnx::onnx::AttributeProto { name: name.into(), f: v, r#type: 1, ..Default::default() }
}

/// Float initializers `(name, dims, spread, offset)` of [`seq`] values added to `m`'s graph.
fn add_initializers(m: &mut ModelProto, inits: &[(&str, Vec<usize>, f32, f32)]) {
    let gr = m.graph.as_mut().unwrap();
    for (name, dims, s, o) in inits {
        let t = Tensor::from_vec(seq(dims.iter().product(), *s, *o), dims.as_slice(), &Device::Cpu).unwrap();
        gr.initializer.push(automm::onnx::tensor::f32_to_proto(name, &t).unwrap());
    }
}

/// Runs `m` on `x` unplanned (plain NCHW ops, the first run), then planned; asserts both give `[2, width]`
/// within 1e-5 and returns what the plan did.
fn planned_equals_unplanned(m: &ModelProto, x: Tensor, width: usize) -> automm::onnx::PlanStats {
    let graph = Graph::from_model(m, "plan", &Device::Cpu, None).unwrap();
    let feeds = [("x", x)];
    let first = graph.run(&feeds).unwrap().remove(0);
    let st = graph.plan_stats(&feeds).unwrap();
    let planned = graph.run(&feeds).unwrap().remove(0);
    assert_eq!(planned.dims(), &[2, width]);
    assert!(max_abs_diff(&planned, &first) <= 1e-5, "{}", max_abs_diff(&planned, &first));
    st
}

fn model(nodes: Vec<NodeProto>) -> ModelProto {
    ModelProto {
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
        graph: Some(GraphProto {
            node: nodes,
            input: vec![ValueInfoProto { name: "x".into(), ..Default::default() }],
            output: vec![ValueInfoProto { name: "y".into(), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn unsupported_ops_are_all_listed_at_load_with_a_node_name() {
    let m = model(vec![
        node("Relu", "r", &["x"], &["a"]),
        node("FancyOp", "fancy_1", &["a"], &["b"]),
        node("FancyOp", "fancy_2", &["b"], &["c"]),
        node("Loop", "loop_1", &["c"], &["y"]),
    ]);
    let e = Graph::from_model(&m, "m.onnx", &Device::Cpu, None).err().unwrap().to_string();
    assert!(e.contains("FancyOp (e.g. node `fancy_1`)") && e.contains("Loop (e.g. node `loop_1`)"), "{e}");
    assert!(!e.contains("fancy_2"));
}

#[test]
fn cycles_and_dangling_inputs_are_errors() {
    let m = model(vec![
        node("Relu", "a", &["b_out"], &["a_out"]),
        node("Relu", "b", &["a_out"], &["b_out"]),
        node("Relu", "c", &["a_out"], &["y"]),
    ]);
    let e = Graph::from_model(&m, "m.onnx", &Device::Cpu, None).err().unwrap().to_string();
    assert!(e.contains("cycle"), "{e}");
    let m = model(vec![node("Add", "add", &["x", "ghost"], &["y"])]);
    let e = Graph::from_model(&m, "m.onnx", &Device::Cpu, None).err().unwrap().to_string();
    assert!(e.contains("`ghost`") && e.contains("node `add`"), "{e}");
}

#[test]
fn wrong_input_shape_names_the_tensor_and_expected_shape() {
    let g = Graph::load(&fixture("cnn_fixture.onnx"), &Device::Cpu, None).unwrap();
    let x = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = g.run(&[("input", x)]).unwrap_err().to_string();
    assert!(e.contains("`input`") && e.contains("[N, 3, 33, 33]"), "{e}");
}

#[test]
fn dynamo_opset18_swin_fixture_matches_onnx_runtime() {
    // PyTorch's newer exporter: ReduceMean with axes as an input, multi-axis Unsqueeze, Gemm without bias.
    check_parity("swin_dynamo_fixture.onnx");
}

#[test]
fn unfolded_batch_norm_after_conv_matches_the_formula() {
    use automm::onnx::tensor::f32_to_proto;
    let dev = Device::Cpu;
    let seq =
        |n: usize, s: f32, o: f32| (0..n).map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * s + o).collect::<Vec<_>>();
    let w = Tensor::from_vec(seq(4 * 3 * 3 * 3, 0.5, 0.0), (4, 3, 3, 3), &dev).unwrap();
    let scale = Tensor::from_vec(seq(4, 0.5, 1.0), 4, &dev).unwrap();
    let bias = Tensor::from_vec(seq(4, 0.3, 0.1), 4, &dev).unwrap();
    let mean = Tensor::from_vec(seq(4, 0.2, 0.0), 4, &dev).unwrap();
    let var = Tensor::from_vec(seq(4, 0.4, 1.0), 4, &dev).unwrap();
    let mut conv = node("Conv", "conv", &["x", "w"], &["c"]);
    conv.attribute.push(ints("pads", &[1, 1, 1, 1]));
    let mut bn = node("BatchNormalization", "bn", &["c", "scale", "bias", "mean", "var"], &["b"]);
    bn.attribute.push(float("epsilon", 1e-3));
    let relu = node("Relu", "relu", &["b"], &["y"]);
    let mut m = model(vec![conv, bn, relu]);
    let g = m.graph.as_mut().unwrap();
    for (n, t) in [("w", &w), ("scale", &scale), ("bias", &bias), ("mean", &mean), ("var", &var)] {
        g.initializer.push(f32_to_proto(n, t).unwrap());
    }
    let graph = Graph::from_model(&m, "bn", &dev, None).unwrap();
    let x = Tensor::from_vec(seq(2 * 3 * 6 * 5, 1.0, 0.0), (2, 3, 6, 5), &dev).unwrap();
    let y = graph.run(&[("x", x.clone())]).unwrap().remove(0);
    let c = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    let r = |t: &Tensor| t.reshape((1, 4, 1, 1)).unwrap();
    let want = c
        .broadcast_sub(&r(&mean))
        .unwrap()
        .broadcast_div(&r(&(var + 1e-3).unwrap().sqrt().unwrap()))
        .unwrap()
        .broadcast_mul(&r(&scale))
        .unwrap()
        .broadcast_add(&r(&bias))
        .unwrap()
        .relu()
        .unwrap();
    assert!(max_abs_diff(&y, &want) <= 1e-5);
}

/// A graph mixing blocked and NCHW readers: a 1x1 conv + Relu (blocked), read by a padded dense 3x3 conv
/// (blocked direct kernel) and a residual Add (blocked), a strided depthwise conv (blocked), a padded
/// grouped 1x1 conv (no blocked kernel: it reads NCHW, but its only reader, the pool, reads blocked
/// data), Flatten. The planned run must equal the first, unplanned one (plain NCHW ops).
#[test]
fn mixed_blocked_and_nchw_readers_match_the_unplanned_run() {
    let mut dense = node("Conv", "dense", &["r", "w2"], &["c"]);
    dense.attribute.push(ints("pads", &[1, 1, 1, 1]));
    let mut dw = node("Conv", "dw", &["s", "w3", "b3"], &["d"]);
    dw.attribute.extend([ints("pads", &[1, 1, 1, 1]), ints("strides", &[2, 2]), int("group", 16)]);
    let mut padded = node("Conv", "padded", &["d", "w4"], &["p"]);
    padded.attribute.extend([ints("pads", &[1, 1, 1, 1]), int("group", 2)]);
    let mut m = model(vec![
        node("Conv", "pw", &["x", "w1", "b1"], &["a"]),
        node("Relu", "relu", &["a"], &["r"]),
        dense,
        node("Add", "res", &["c", "r"], &["s"]),
        dw,
        padded,
        node("GlobalAveragePool", "gap", &["p"], &["g"]),
        node("Flatten", "flat", &["g"], &["y"]),
    ]);
    add_initializers(
        &mut m,
        &[
            ("w1", vec![16, 8, 1, 1], 0.4, 0.05),
            ("b1", vec![16], 0.4, 0.05),
            ("w2", vec![16, 16, 3, 3], 0.4, 0.05),
            ("w3", vec![16, 1, 3, 3], 0.4, 0.05),
            ("b3", vec![16], 0.4, 0.05),
            ("w4", vec![8, 8, 1, 1], 0.4, 0.05),
        ],
    );
    let x = Tensor::from_vec(seq(2 * 8 * 7 * 6, 1.0, 0.0), (2, 8, 7, 6), &Device::Cpu).unwrap();
    let st = planned_equals_unplanned(&m, x, 8);
    assert_eq!(st.blocked, 5, "{st:?}");
}

/// DenseNet- and ResNet-style joins on blocked data: a channel Concat of an NCHW graph input and a
/// blocked conv output (the input re-laid), an inference BatchNormalization with non-identity statistics
/// (a per-channel multiply-add on blocked data), Relu, a strided dense conv, a residual Add of a blocked
/// value and an NCHW one of the same shape (re-laid), and a Concat with a negative axis. The planned run
/// must equal the unplanned one, and every one of those steps must run blocked.
#[test]
fn blocked_concat_batch_norm_and_mixed_add_match_the_unplanned_run() {
    let mut grow = node("Conv", "grow", &["x", "w1"], &["g"]);
    grow.attribute.push(ints("pads", &[1, 1, 1, 1]));
    let mut cat = node("Concat", "cat", &["x", "g"], &["c"]);
    cat.attribute.push(int("axis", 1));
    let mut down = node("Conv", "down", &["r", "w2", "b2"], &["d"]);
    down.attribute.extend([ints("pads", &[1, 0, 1, 2]), ints("strides", &[1, 1])]);
    let mut cat2 = node("Concat", "cat2", &["s", "d"], &["e"]);
    cat2.attribute.push(int("axis", -3));
    let mut m = model(vec![
        grow,
        cat,
        node("BatchNormalization", "bn", &["c", "scale", "bias", "mean", "var"], &["n"]),
        node("Relu", "relu", &["n"], &["r"]),
        down,
        node("Add", "res", &["d", "x"], &["s"]),
        cat2,
        node("GlobalAveragePool", "gap", &["e"], &["p"]),
        node("Flatten", "flat", &["p"], &["y"]),
    ]);
    add_initializers(
        &mut m,
        &[
            ("w1", vec![16, 8, 3, 3], 0.3, 0.0),
            ("scale", vec![24], 0.5, 1.0),
            ("bias", vec![24], 0.3, 0.1),
            ("mean", vec![24], 0.4, 0.0),
            ("var", vec![24], 0.5, 1.0),
            ("w2", vec![8, 24, 3, 3], 0.2, 0.0),
            ("b2", vec![8], 0.1, 0.0),
        ],
    );
    // The down conv's asymmetric pads (left 0, right 2) keep the 6 x 4 shape, so the residual Add fits.
    let x = Tensor::from_vec(seq(2 * 8 * 6 * 4, 1.0, 0.0), (2, 8, 6, 4), &Device::Cpu).unwrap();
    let st = planned_equals_unplanned(&m, x, 16);
    // grow, cat, bn, relu, down, res, cat2 (GlobalAveragePool reads blocked data; Flatten gets NCHW).
    assert_eq!(st.blocked, 7, "{st:?}");
}

/// TF-style "same" padding spelled as an explicit zero Pad before a strided Conv is folded into the
/// conv's pads (one step fewer, the conv channel-blocked); a Pad with a non-zero fill value is left
/// alone. The planned run must equal the unplanned one.
#[test]
fn zero_pad_before_a_conv_is_folded_into_its_pads() {
    use candle_onnx::onnx::TensorProto;
    let mut conv = node("Conv", "conv", &["p", "w1"], &["c"]);
    conv.attribute.push(ints("strides", &[2, 2]));
    let mut m = model(vec![
        node("Pad", "same", &["x", "pads"], &["p"]),
        conv,
        node("Relu", "relu", &["c"], &["r"]),
        node("Pad", "fill", &["r", "pads", "half"], &["q"]),
        node("Conv", "conv2", &["q", "w2"], &["d"]),
        node("GlobalAveragePool", "gap", &["d"], &["g"]),
        node("Flatten", "flat", &["g"], &["y"]),
    ]);
    m.graph.as_mut().unwrap().initializer.push(TensorProto {
        name: "pads".into(),
        dims: vec![8],
        data_type: 7,
        int64_data: vec![0, 0, 0, 1, 0, 0, 1, 1],
        ..Default::default()
    });
    add_initializers(
        &mut m,
        &[("w1", vec![16, 8, 3, 3], 0.3, 0.05), ("w2", vec![8, 16, 1, 1], 0.3, 0.05), ("half", vec![], 0.3, 0.05)],
    );
    let x = Tensor::from_vec(seq(2 * 8 * 7 * 6, 1.0, 0.0), (2, 8, 7, 6), &Device::Cpu).unwrap();
    let st = planned_equals_unplanned(&m, x, 8);
    // Pad folded; Conv + Relu fused; the filled Pad, the second conv, the pool and Flatten stay.
    assert_eq!((st.nodes, st.steps, st.fused), (7, 5, 1), "{st:?}");
    assert!(st.blocked >= 1, "the strided conv runs blocked: {st:?}");
}

/// An INT64 initializer `name` holding `v` (1-D).
fn add_int64s(m: &mut ModelProto, name: &str, v: &[i64]) {
    m.graph.as_mut().unwrap().initializer.push(candle_onnx::onnx::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: 7,
        int64_data: v.to_vec(),
        ..Default::default()
    });
}

/// An EfficientNet/GhostNet-style block: a conv followed by SiLU spelled Mul(Sigmoid(c), c) (fused into the
/// conv), a Slice that keeps every channel (GhostNet's `out[:, :oup]`: dropped), a Dropout of ratio 0 with
/// an unread mask (dropped), and a squeeze-excite gate
/// (pool, two small NCHW convs, Sigmoid) multiplying the blocked activation (the gate is re-laid, the Mul
/// runs blocked). The planned run must equal the unplanned one.
#[test]
fn conv_silu_identity_slice_and_excite_gate_run_blocked() {
    let mut conv = node("Conv", "conv", &["x", "w1", "b1"], &["c"]);
    conv.attribute.push(ints("pads", &[1, 1, 1, 1]));
    let mut m = model(vec![
        conv,
        node("Sigmoid", "sig", &["c"], &["s"]),
        node("Mul", "silu", &["s", "c"], &["a"]),
        node("Slice", "keep", &["a", "starts", "ends", "axes"], &["k"]),
        node("GlobalAveragePool", "squeeze", &["k"], &["p"]),
        node("Conv", "reduce", &["p", "wr", "br"], &["r"]),
        node("Relu", "relu", &["r"], &["q"]),
        node("Conv", "expand", &["q", "we", "be"], &["e"]),
        node("Sigmoid", "gate", &["e"], &["g"]),
        node("Mul", "excite", &["k", "g"], &["z0"]),
        // A TorchScript training-mode export's Dropout: ratio 0, its mask output declared but never read.
        node("Dropout", "drop", &["z0", "ratio", "training"], &["z", "mask"]),
        node("Conv", "project", &["z", "w2"], &["d"]),
        node("GlobalAveragePool", "gap", &["d"], &["h"]),
        node("Flatten", "flat", &["h"], &["y"]),
    ]);
    add_int64s(&mut m, "starts", &[0]);
    add_int64s(&mut m, "ends", &[16]);
    add_int64s(&mut m, "axes", &[1]);
    let gr = m.graph.as_mut().unwrap();
    gr.initializer
        .push(automm::onnx::tensor::f32_to_proto("ratio", &Tensor::new(0f32, &Device::Cpu).unwrap()).unwrap());
    gr.initializer.push(candle_onnx::onnx::TensorProto {
        name: "training".into(),
        data_type: 9,
        int32_data: vec![1],
        ..Default::default()
    });
    add_initializers(
        &mut m,
        &[
            ("w1", vec![16, 8, 3, 3], 0.3, 0.0),
            ("b1", vec![16], 0.5, 0.0),
            ("wr", vec![4, 16, 1, 1], 0.5, 0.0),
            ("br", vec![4], 0.2, 0.1),
            ("we", vec![16, 4, 1, 1], 0.5, 0.0),
            ("be", vec![16], 0.2, 0.0),
            ("w2", vec![8, 16, 1, 1], 0.3, 0.05),
        ],
    );
    let x = Tensor::from_vec(seq(2 * 8 * 6 * 5, 1.0, 0.0), (2, 8, 6, 5), &Device::Cpu).unwrap();
    let st = planned_equals_unplanned(&m, x, 8);
    // Sigmoid + Mul into the conv, reduce + Relu fused, the Slice and Dropout dropped: 14 nodes, 9 steps;
    // blocked: the first conv, the expand conv (written blocked: its reader, the gate's Sigmoid, runs
    // blocked), the Sigmoid, the gated Mul and the projection (pools read blocked data; reduce has 4
    // channels: NCHW).
    assert_eq!((st.nodes, st.steps, st.blocked), (14, 9, 5), "{st:?}");
}

/// EfficientFormer's 1x1-conv MLP with GELU spelled as the dynamo exporter does (Div by sqrt 2 -> Erf ->
/// Add 1 -> Mul 0.5 -> Mul x): the whole chain becomes the first conv's epilogue, and the planned run
/// equals the unplanned one.
#[test]
fn gelu_after_a_conv_becomes_its_epilogue() {
    let mut m = model(vec![
        node("Conv", "fc1", &["x", "w1", "b1"], &["h"]),
        node("Div", "div", &["h", "sqrt2"], &["d"]),
        node("Erf", "erf", &["d"], &["e"]),
        node("Add", "add", &["e", "one"], &["a"]),
        node("Mul", "half", &["half", "a"], &["p"]),
        node("Mul", "times", &["h", "p"], &["g"]),
        node("Conv", "fc2", &["g", "w2"], &["c"]),
        node("GlobalAveragePool", "gap", &["c"], &["q"]),
        node("Flatten", "flat", &["q"], &["y"]),
    ]);
    let gr = m.graph.as_mut().unwrap();
    for (name, v) in [("sqrt2", std::f32::consts::SQRT_2), ("one", 1.0), ("half", 0.5)] {
        let t = Tensor::new(v, &Device::Cpu).unwrap();
        gr.initializer.push(automm::onnx::tensor::f32_to_proto(name, &t).unwrap());
    }
    add_initializers(
        &mut m,
        &[("w1", vec![16, 8, 1, 1], 0.5, 0.0), ("b1", vec![16], 0.5, 0.0), ("w2", vec![8, 16, 1, 1], 0.3, 0.05)],
    );
    let x = Tensor::from_vec(seq(2 * 8 * 5 * 3, 1.5, 0.0), (2, 8, 5, 3), &Device::Cpu).unwrap();
    let st = planned_equals_unplanned(&m, x, 8);
    // fc1 + GELU, fc2, the pool, Flatten; both convs blocked.
    assert_eq!((st.nodes, st.steps, st.fused, st.blocked), (9, 4, 1, 2), "{st:?}");
}

/// LeViT's Linear -> BatchNorm1d, exported as MatMul by a static matrix -> Flatten -> BatchNormalization on
/// `[rows, cols]`: the plan folds the normalisation into the matrix and its shift into the product as a
/// bias row (no BatchNormalization or Add step is left), and the planned run equals the unplanned one.
#[test]
fn batch_norm_after_a_product_is_folded_into_its_matrix() {
    use candle_onnx::onnx::TensorProto;
    let mut flat = node("Flatten", "flat", &["m"], &["f"]);
    flat.attribute.push(int("axis", 2));
    let mut bn = node("BatchNormalization", "bn", &["f", "scale", "bias", "mean", "var"], &["n"]);
    bn.attribute.push(float("epsilon", 1e-3));
    let mut m = model(vec![
        node("MatMul", "mm", &["x", "w"], &["m"]),
        flat,
        bn,
        node("Reshape", "back", &["n", "shape"], &["y"]),
    ]);
    m.graph.as_mut().unwrap().initializer.push(TensorProto {
        name: "shape".into(),
        dims: vec![2],
        data_type: 7,
        int64_data: vec![2, 80],
        ..Default::default()
    });
    add_initializers(
        &mut m,
        &[
            ("w", vec![8, 16], 0.5, 0.0),
            ("scale", vec![16], 0.5, 1.0),
            ("bias", vec![16], 0.3, 0.1),
            ("mean", vec![16], 0.4, 0.2),
            ("var", vec![16], 0.5, 1.0),
        ],
    );
    let x = Tensor::from_vec(seq(2 * 5 * 8, 1.0, 0.0), (2, 5, 8), &Device::Cpu).unwrap();
    planned_equals_unplanned(&m, x.clone(), 80);
    let graph = Graph::from_model(&m, "bn-fold", &Device::Cpu, None).unwrap();
    let ops: Vec<String> = graph.profile(&[("x", x)]).unwrap().into_iter().map(|t| t.op).collect();
    // The shift is added by the product itself (the Add moved before the Flatten and fused as its bias).
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert!(!ops.iter().any(|o| o == "BatchNormalization" || o == "Add"), "{ops:?}");
}

/// The shipped pretrained backbone (`models/pretrained/efficientnet_lite0.onnx`, made without torch by
/// models/make_efficientnet_lite0.py --features) computes the same pooled feature as the reference
/// EfficientNet-Lite0 in ../shared, where that exists (a fresh clone has no ../shared: then this only
/// checks that the shipped file loads and gives [N, 1280]).
#[test]
fn shipped_backbone_gives_the_reference_lite0_features() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let g = Graph::load(&repo.join("models/pretrained/efficientnet_lite0.onnx"), &Device::Cpu, None).unwrap();
    let x = Tensor::rand(-1f32, 1f32, (2, 3, 224, 224), &Device::Cpu).unwrap();
    let y = g.run(&[("input", x.clone())]).unwrap().remove(0);
    assert_eq!(y.dims(), &[2, 1280]);
    let reference = repo.join("../shared/models/efficientnet_lite0.onnx");
    if !reference.is_file() {
        eprintln!("no {}: compared shapes only", reference.display());
        return;
    }
    let m = read_model(&reference).unwrap();
    let feat = detect_feature_tensor(&m).unwrap();
    let r = Graph::from_model(&m, "reference", &Device::Cpu, Some(vec![feat])).unwrap();
    let want = r.run(&[("input", x)]).unwrap().remove(0);
    let d = max_abs_diff(&y, &want);
    assert!(d <= 1e-5, "max |shipped - reference| = {d}");
}
