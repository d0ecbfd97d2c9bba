#!/usr/bin/env python3
"""Export a timm Swin Transformer to ONNX for automm.

  python models/export_swin_tiny.py --variant tiny --output models/swin_tiny.onnx [--pretrained] [--features]
  python models/export_swin_tiny.py --variant tiny --features --parameters --output /tmp/swin_params.onnx
  python models/export_swin_tiny.py --variant fixture --output models/fixtures/swin_fixture.onnx

`tiny` is timm's swin_tiny_patch4_window7_224 (random init unless --pretrained and a model hub is reachable).
`fixture` is a Swin with the same op patterns at tiny widths (112x112 input, 3 stages, shifted windows,
padding), random init with a fixed seed. With --parameters every one of the model's parameters stays an
initializer under its PyTorch name (training-mode export, no constant folding, drop-path 0): the graph
full fine-tuning trains (`automm bench finetune`): a few hundred KB, committed for tests. With --reference, the
fixture script also writes an input batch and ONNX Runtime's outputs next to the model (.npy), so Rust
tests check import parity without Python.

Requires: pip install torch timm onnx onnxruntime (about 3 GB). Export uses opset 17, the TorchScript-based
exporter (dynamo=False) and a dynamic batch axis, as timm/AutoMM users do.
"""
import argparse
import os

import numpy as np
import torch
import timm


def build(variant: str, pretrained: bool, features: bool, num_classes: int):
    torch.manual_seed(0)
    if variant == "tiny":
        model = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=pretrained, num_classes=0 if features else 1000,
            drop_path_rate=0.0,
        )
        size = 224
    else:
        from timm.models.swin_transformer import SwinTransformer

        model = SwinTransformer(
            img_size=112, patch_size=4, in_chans=3, num_classes=0 if features else num_classes,
            embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=7, mlp_ratio=2.0,
        )
        size = 112
    return model.eval(), size


def record_normalization(path):
    """timm's Swin expects ImageNet mean/std; `automm train` reads this instead of guessing."""
    import onnx

    m = onnx.load(path)
    del m.metadata_props[:]
    m.metadata_props.add(key="automm.normalization", value="imagenet")
    onnx.save(m, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["tiny", "fixture"], default="tiny")
    ap.add_argument("--output", required=True)
    ap.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs a model hub)")
    ap.add_argument("--features", action="store_true", help="export the pooled feature graph (no classifier)")
    ap.add_argument("--num-classes", type=int, default=5, help="classifier width of the fixture")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--dynamo", action="store_true",
                    help="use PyTorch's newer exporter (torch.export, opset 18; needs onnxscript)")
    ap.add_argument("--reference", action="store_true", help="also write <output>.input.npy and ORT outputs")
    ap.add_argument("--parameters", action="store_true",
                    help="keep every parameter as a named initializer (what full fine-tuning trains)")
    args = ap.parse_args()

    model, size = build(args.variant, args.pretrained, args.features, args.num_classes)
    x = torch.randn(2, 3, size, size)
    out_name = "features" if args.features else "logits"
    tmp = args.output + ".tmp"
    if args.dynamo:
        import onnx

        torch.onnx.export(
            model, (x,), tmp, dynamo=True, opset_version=max(args.opset, 18), input_names=["input"],
            output_names=[out_name], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
        # One self-contained file: the dynamo exporter writes weights to a side file.
        m = onnx.load(tmp)
        onnx.save(m, tmp, save_as_external_data=False)
        if os.path.exists(tmp + ".data"):
            os.remove(tmp + ".data")
    else:
        keep = {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False} if args.parameters else {}
        torch.onnx.export(
            model, x, tmp, opset_version=args.opset, dynamo=False, input_names=["input"],
            output_names=[out_name], dynamic_axes={"input": {0: "batch"}, out_name: {0: "batch"}}, **keep,
        )
    record_normalization(tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")

    if args.reference:
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        xin = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        sess = ort.InferenceSession(args.output, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"input": xin})
        with torch.no_grad():
            yt = model(torch.from_numpy(xin)).numpy()
        print("max |ORT - PyTorch| =", float(np.abs(y - yt).max()))
        np.save(args.output + ".input.npy", xin)
        np.save(args.output + f".{out_name}.npy", y)


if __name__ == "__main__":
    main()
