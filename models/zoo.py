#!/usr/bin/env python3
"""The timm model zoo through automm's importer, against ONNX Runtime.

Each model is created by timm (random init, no download), its normalisation layers' parameters and running
statistics are randomised (identity norms hide errors: a wrong padding rule under a unit-variance norm can
still produce the right numbers), it is exported by both of PyTorch's exporters (TorchScript at opset 17,
dynamo at opset 18) at a fixed batch, and `automm onnx compare --json` runs it through our importer and
ONNX Runtime on one seeded batch: load, every output's difference relative to its scale, ms per image.

    python3 -m venv /tmp/zoo && /tmp/zoo/bin/pip install torch timm onnx onnxruntime onnxscript
    cargo build --release
    /tmp/zoo/bin/python models/zoo.py --out /tmp/zoo-models --batch 8 > zoo.md

The table (markdown) goes to stdout, progress to stderr; --json FILE keeps every result.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

# The models issue 19 names, then more of different families.
MODELS = [
    "resnet50", "convnext_tiny", "vit_small_patch16_224", "deit_tiny_patch16_224", "mobilenetv3_large_100",
    "efficientnet_b0", "regnety_008", "densenet121", "mobilevit_s", "levit_128s", "ghostnet_100",
    "inception_v3", "tf_efficientnet_b0", "efficientformer_l1", "ese_vovnet19b_dw", "maxvit_tiny_tf_224",
    "swinv2_tiny_window8_256", "poolformer_s12",
    # More: CSP, RepVGG-style, NFNet-style, hybrid and pure attention models.
    "cspresnet50", "repvgg_a0", "resnet18", "swin_tiny_patch4_window7_224", "coat_lite_tiny", "rexnet_100",
]
EXPORTERS = ["torchscript", "dynamo"]


def randomise_norms(model, torch):
    """Gives every normalisation layer non-identity affine parameters and running statistics."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if "norm" not in type(m).__name__.lower():
                continue
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue
                if name in ("weight", "running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif name in ("bias", "running_mean"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def export(name, exporter, batch, out, torch, timm, reuse=False):
    """Exports one model; returns (path, seconds) or raises."""
    model = timm.create_model(name, pretrained=False).eval()
    randomise_norms(model, torch)
    size = model.default_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(batch, *size)
    path = out / f"{name}-{exporter}.onnx"
    if reuse and path.exists():
        return path, 0.0
    t0 = time.time()
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):  # the dynamo exporter's progress
        if exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False,
                              input_names=["input"], output_names=["logits"])
        else:
            torch.onnx.export(model, (x,), str(path), opset_version=18, dynamo=True,
                              input_names=["input"], output_names=["logits"], external_data=False)
    return path, time.time() - t0


def compare(automm, path, batch, runs):
    """automm onnx compare --json; returns its result, or the error text."""
    p = subprocess.run(
        [automm, "onnx", "compare", str(path), "--batch", str(batch), "--runs", str(runs), "--json",
         "--tolerance", "1e-4"],
        capture_output=True, text=True)
    try:
        return json.loads(p.stdout), None
    except json.JSONDecodeError:
        return None, (p.stderr.strip().splitlines() or ["no output"])[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the exported models")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--automm", default="target/release/automm")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--reuse", action="store_true", help="keep models already exported to --out")
    ap.add_argument("--export-only", action="store_true", help="export, compare nothing")
    ap.add_argument("--no-speed", action="store_true", help="one run: correctness only")
    args = ap.parse_args()
    import timm
    import torch

    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            row = {"model": name, "exporter": exporter}
            print(f"{name} ({exporter}) ...", file=sys.stderr, flush=True)
            try:
                path, secs = export(name, exporter, args.batch, args.out, torch, timm, args.reuse)
                row["export_s"] = round(secs, 1)
            except Exception as e:  # an exporter failure is a row of the table, not the end of the run
                row["error"] = f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                continue
            if args.export_only:
                continue
            result, err = compare(args.automm, path, args.batch, 1 if args.no_speed else args.runs)
            if err:
                row["error"] = err[:200]
            else:
                row["max_rel_diff"] = max(o["max_rel_diff"] for o in result["outputs"])
                row["passed"] = result["passed"]
                t = {e["engine"]: e["ms_per_image"] for e in result["timings"]}
                row["candle_ms"], row["ort_ms"] = t.get("candle"), t.get("ort")
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"| model | exporter | loads | max rel. diff | candle ms/img | ORT ms/img | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['exporter']} | no: {r['error']} | | | | |")
            continue
        ratio = r["candle_ms"] / r["ort_ms"] if r.get("ort_ms") else float("nan")
        ok = "yes" if r["passed"] else "yes, DIFFERS"
        print(f"| {r['model']} | {r['exporter']} | {ok} | {r['max_rel_diff']:.1e} | {r['candle_ms']:.1f} | "
              f"{r['ort_ms']:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
