#!/usr/bin/env python3
"""Writes ONNX's backend node tests for the op families image models use, for automm's conformance test.

The onnx wheel no longer ships the test data files, so the cases come from its own generator
(`onnx.backend.test.case.node.collect_testcases`, numpy reference outputs). Every case whose nodes all
belong to FAMILIES below is written as

    OUT/<case>/model.onnx
    OUT/<case>/data_<k>/input_<i>.pb, output_<i>.pb   (TensorProto, as in ONNX's own test folders)

and OUT/index.json lists each case with its family (the op it tests, or `expanded` for another op's
function expansion made of these ops), tolerances and data-set count. The test `conformance` in
tests/it runs every case through automm's importer; models/conformance-rejections.txt lists the cases
refused on purpose, with the reason.

Usage: python3 models/make_conformance.py OUT_DIR   (needs `pip install onnx==1.23.2`)
"""

import json
import os
import sys
import warnings

import numpy as np

# The op families of image models, as automm's importer registers them (src/onnx/ops/).
FAMILIES = {
    "arith": "Add Sub Mul Div Pow Max Min Sum Mod Equal Less Greater Not And Where",
    "unary": "Neg Abs Sign Log Sqrt Reciprocal Floor Ceil Erf Exp Relu Sigmoid Tanh HardSwish Gelu "
    "HardSigmoid Clip LeakyRelu",
    "values": "Cast CastLike Constant ConstantOfShape Identity Dropout",
    "shape": "Shape Size Range Reshape Flatten Squeeze Unsqueeze Expand",
    "layout": "Concat Gather Split Slice Transpose Tile GatherElements GatherND Pad",
    "linear": "MatMul Gemm Einsum",
    "conv": "Conv ConvTranspose",
    "norm": "BatchNormalization LayerNormalization InstanceNormalization GroupNormalization Softmax "
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceSumSquare ReduceLogSum "
    "ReduceLogSumExp",
    "pool": "MaxPool AveragePool GlobalAveragePool GlobalMaxPool",
    "resize": "Resize Upsample",
}
FAMILY_OF = {op: fam for fam, ops in FAMILIES.items() for op in ops.split()}


def as_proto(value, name):
    """A data-set value as a TensorProto, or None for a sequence/optional (not in these families)."""
    from onnx import TensorProto, numpy_helper

    if isinstance(value, TensorProto):
        value.name = name
        return value
    if value is None or isinstance(value, list):
        return None
    return numpy_helper.from_array(np.asarray(value), name)


def write_case(out, tc):
    """Writes one case; returns its data-set count, or None when a value is not a tensor."""
    graph = tc.model.graph
    sets = []
    for inputs, outputs in tc.data_sets:
        ins = [as_proto(v, graph.input[i].name) for i, v in enumerate(inputs)]
        outs = [as_proto(v, graph.output[i].name) for i, v in enumerate(outputs)]
        if any(p is None for p in ins + outs):
            return None
        sets.append((ins, outs))
    folder = os.path.join(out, tc.name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.onnx"), "wb") as f:
        f.write(tc.model.SerializeToString())
    for k, (ins, outs) in enumerate(sets):
        data = os.path.join(folder, f"data_{k}")
        os.makedirs(data, exist_ok=True)
        for prefix, protos in (("input", ins), ("output", outs)):
            for i, p in enumerate(protos):
                with open(os.path.join(data, f"{prefix}_{i}.pb"), "wb") as f:
                    f.write(p.SerializeToString())
    return len(sets)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    warnings.simplefilter("ignore")  # the generator's own numpy overflow warnings
    import onnx.backend.test.case.node as node_cases

    cases = node_cases.collect_testcases()  # the generator runs once per process
    # A case tests its one node's op; an `_expanded` case tests the op of the case it expands.
    op_of = {tc.name: tc.model.graph.node[0].op_type for tc in cases if len(tc.model.graph.node) == 1}
    index, skipped = [], 0
    for tc in cases:
        ops = {n.op_type for n in tc.model.graph.node}
        if not ops or not ops <= FAMILY_OF.keys() or any(n.domain not in ("", "ai.onnx") for n in tc.model.graph.node):
            continue
        sets = write_case(out, tc)
        if sets is None:
            skipped += 1
            continue
        family = FAMILY_OF.get(op_of.get(tc.name.split("_expanded")[0]), "expanded")
        index.append({"name": tc.name, "family": family, "rtol": tc.rtol, "atol": tc.atol, "data_sets": sets})
    index.sort(key=lambda c: c["name"])
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(f"wrote {len(index)} cases to {out} ({skipped} with non-tensor values left out)")


if __name__ == "__main__":
    main()
