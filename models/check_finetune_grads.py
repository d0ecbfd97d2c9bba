#!/usr/bin/env python3
"""Compare automm's fine-tuning gradients with PyTorch's on timm's Swin-Tiny.

  python models/check_finetune_grads.py --automm target/release/automm [--variant tiny|fixture] [--finetune full]

Builds timm's swin_tiny_patch4_window7_224 (random init, seed 0; feature graph, no classifier), gives every
bias and normalisation parameter a random value (timm initialises biases to zero, and the ONNX exporter
merges identical tensors), exports it with every parameter kept under its PyTorch name (training-mode
export, no constant folding), then computes d sum(features * r) / d theta for the norm_fit parameters
(LayerNorm weights and biases, every bias), or with `--finetune full` for every parameter, in PyTorch
(float64) and with `automm onnx grads` (float32), and prints the worst relative difference per parameter
group. Exits 1 when the two sides train different parameter sets (full) or a relative max-difference
exceeds --tolerance (1e-4).
"""
import sys
import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch
import timm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--automm", default="target/release/automm")
    ap.add_argument("--variant", choices=["tiny", "fixture"], default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--finetune", choices=["norm_fit", "full"], default="norm_fit")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    torch.manual_seed(0)
    if args.variant == "tiny":
        model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, drop_path_rate=0.0)
        size = 224
    else:
        from timm.models.swin_transformer import SwinTransformer

        model = SwinTransformer(img_size=112, patch_size=4, num_classes=0, embed_dim=8, depths=(2, 2, 2),
                                num_heads=(1, 2, 4), window_size=7, mlp_ratio=2.0, drop_path_rate=0.0)
        size = 112
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if args.finetune == "full" or name.endswith("bias") or ".norm" in name or name.startswith("norm."):
                p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    work = tempfile.mkdtemp()
    onnx_path = os.path.join(work, "swin.onnx")
    x = torch.randn(args.batch, 3, size, size, generator=g)
    torch.onnx.export(model, x, onnx_path, opset_version=17, dynamo=False, input_names=["input"],
                      output_names=["features"], training=torch.onnx.TrainingMode.TRAINING,
                      do_constant_folding=False)
    with torch.no_grad():
        r = torch.randn(model(x).shape, generator=g)
    np.save(os.path.join(work, "x.npy"), x.numpy())
    np.save(os.path.join(work, "r.npy"), r.numpy())

    m64 = model.double()
    out = (m64(x.double()) * r.double()).sum()
    out.backward()
    want = {n: p.grad.numpy() for n, p in m64.named_parameters() if p.grad is not None}

    npz = os.path.join(work, "grads.npz")
    subprocess.run([args.automm, "onnx", "grads", onnx_path, "--input", os.path.join(work, "x.npy"),
                    "--weights", os.path.join(work, "r.npy"), "--finetune", args.finetune, "--tensor", "features",
                    "--output", npz], check=True)
    got = np.load(npz)
    worst = {}
    missing = [n for n in got.files if n not in want]
    for n in got.files:
        if n not in want:
            continue
        a, b = got[n].astype(np.float64), want[n]
        rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        if ".norm" in n or n.startswith("norm."):
            group = "norm"
        elif n.endswith("bias"):
            group = "bias"
        else:
            group = "weight" if n.endswith("weight") else "other"
        worst.setdefault(group, []).append((rel, n))
    print(f"{len(got.files)} parameters from automm, {len(missing)} not PyTorch parameters {missing[:5]}")
    failed = bool(missing)
    if args.finetune == "full":
        untrained = sorted(set(want) - set(got.files))
        print(f"{len(want)} PyTorch parameters with gradients, {len(untrained)} not trained by automm {untrained[:5]}")
        failed |= bool(untrained)
    for group, vals in sorted(worst.items()):
        vals.sort()
        print(f"{group}: {len(vals)} parameters, median relative max-diff {vals[len(vals)//2][0]:.2e}, "
              f"worst {vals[-1][0]:.2e} ({vals[-1][1]})")
        failed |= vals[-1][0] > args.tolerance
    print("FAILED" if failed else f"PASSED (tolerance {args.tolerance:g})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
