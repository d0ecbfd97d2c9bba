#!/usr/bin/env python3
"""Make models/fixtures/cnn_fixture.onnx: a tiny network with EfficientNet-Lite0's op patterns (Conv with
auto_pad SAME_UPPER and stride 2, depthwise 3x3 and 5x5 convs, Clip as ReLU6, a residual Add,
GlobalAveragePool, Flatten, Gemm classifier), opset 13, dynamic batch, random weights with a fixed seed.
Also writes an input batch and ONNX Runtime's logits next to it (.npy) so Rust tests need no Python.

  python models/make_cnn_fixture.py --output models/fixtures/cnn_fixture.onnx

Requires: pip install onnx onnxruntime numpy
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def w(name, shape, scale=0.3):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, value):
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    c("six", 6.0)
    c("zero", 0.0)

    def conv(x, out, cin, cout, k, stride, group=1, relu=True):
        nodes.append(helper.make_node(
            "Conv", [x, w(out + "_W", (cout, cin // group, k, k)), w(out + "_B", (cout,), 0.1)], [out + "_c"],
            name=out, auto_pad="SAME_UPPER", group=group, kernel_shape=[k, k], strides=[stride, stride]))
        if not relu:
            return out + "_c"
        nodes.append(helper.make_node("Clip", [out + "_c", "zero", "six"], [out], name=out + "_relu6"))
        return out

    x = conv("input", "stem", 3, 8, 3, 2)
    x = conv(x, "dw1", 8, 8, 3, 1, group=8)
    y = conv(x, "pw1", 8, 8, 1, 1, relu=False)
    nodes.append(helper.make_node("Add", [y, x], ["res1"], name="res1"))
    x = conv("res1", "dw2", 8, 8, 5, 2, group=8)
    x = conv(x, "pw2", 8, 16, 1, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["feat", w("fc_W", (5, 16)), w("fc_B", (5,), 0.1)], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "cnn_fixture",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 33, 33])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="automm-fixture")
    model.ir_version = 8
    onnx.checker.check_model(model)
    tmp = args.output + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, args.output)

    import onnxruntime as ort
    xin = rng.standard_normal((2, 3, 33, 33)).astype(np.float32)
    (y,) = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"]).run(None, {"input": xin})
    np.save(args.output + ".input.npy", xin)
    np.save(args.output + ".logits.npy", y)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")


if __name__ == "__main__":
    main()
