#!/usr/bin/env python3
"""PyTorch's side of `automm bench finetune`: ms per image of a forward pass and of a fine-tuning step
(forward + backward + AdamW step) of a timm model plus a linear head, and the process's peak RSS.

  python models/bench_finetune.py --arch swin_tiny_patch4_window7_224 --batch 8 --threads 2 --steps 5
  python models/bench_finetune.py --arch efficientnet_lite0 --finetune bit_fit

Random weights (timm's init, seed 0): speed does not depend on them. The model runs in training mode for
the step (BatchNorm batch statistics, no dropout or drop-path: rates 0) and in eval mode under no_grad for
the forward; the loss is cross-entropy on `--classes` classes, the optimizer AdamW (lr 1e-4). `--finetune`:
`full` (every parameter), `bit_fit` (biases and the head), `norm_fit` (normalisation weights, biases and
the head), `frozen` (head only, features under no_grad).
Prints one JSON object: fwd_ms_per_img, step_ms_per_img and its parts step_{fwd,bwd,opt}_ms_per_img,
peak_rss_bytes, params, torch.
`--device cuda` runs on GPU 0 (every timing waits for the device; peak memory is then the GPU's).
Needs: pip install torch timm (about 3 GB).
"""
import argparse
import json
import resource
import statistics
import time

import torch
import timm


def sync():
    pass


def timed(fn, steps):
    fn()  # warm-up: allocator, oneDNN primitive caches
    sync()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()  # a GPU runs the kernels after the calls return
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, help="timm model name")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--finetune", choices=["full", "bit_fit", "norm_fit", "frozen"], default="full")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        global sync
        sync = torch.cuda.synchronize

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    dim = model.num_features
    head = torch.nn.Linear(dim, args.classes)
    model, head = model.to(dev), head.to(dev)
    for name, p in model.named_parameters():
        is_norm = any(part.startswith(("norm", "bn")) for part in name.split(".")[:-1])
        p.requires_grad = (args.finetune == "full" or (args.finetune in ("bit_fit", "norm_fit") and name.endswith("bias"))
                           or (args.finetune == "norm_fit" and is_norm))
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    x = torch.randn(args.batch, 3, args.size, args.size).to(dev)
    y = torch.randint(0, args.classes, (args.batch,)).to(dev)

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    parts = []

    def step():
        model.train()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if args.finetune == "frozen":
            with torch.no_grad():
                f = model(x)
        else:
            f = model(x)
        loss = torch.nn.functional.cross_entropy(head(f), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        parts.append((t1 - t0, t2 - t1, time.perf_counter() - t2))

    fwd = timed(forward, args.steps)
    st = timed(step, args.steps)
    part = [statistics.median(p[i] for p in parts[1:]) for i in range(3)]
    print(json.dumps({
        "fwd_ms_per_img": fwd * 1e3 / args.batch,
        "step_ms_per_img": st * 1e3 / args.batch,
        "step_fwd_ms_per_img": part[0] * 1e3 / args.batch,
        "step_bwd_ms_per_img": part[1] * 1e3 / args.batch,
        "step_opt_ms_per_img": part[2] * 1e3 / args.batch,
        # On a GPU: the device's peak allocation (what bounds the batch there), not the host's RSS.
        "peak_rss_bytes": (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "params": sum(p.numel() for p in params),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
