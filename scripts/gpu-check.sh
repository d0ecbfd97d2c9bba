#!/usr/bin/env bash
# The prepared GPU check: one short run on a machine with an NVIDIA GPU (CUDA 13 driver, PyTorch + timm +
# onnx in its Python, no Rust, no network).
#
#   bash scripts/gpu-check.sh prepare   # here: builds automm with --features cuda into target/gpu-check/
#   bash scripts/gpu-check.sh run       # there, in a copy of the repository with target/gpu-check/ carried
#
# `run` does it all in one go and writes its figures to $OUT (or ./gpu-check-out): `automm doctor`; timm's
# Swin-Tiny (random init) exported by torch; full fine-tuning on the GPU against PyTorch on the same card
# (ms/img, batch 32, `automm bench finetune --num-gpus 1`); a head trained on the GPU on the shipped photos,
# whose predictions on the GPU must equal the CPU's within 1e-4; one epoch of full fine-tuning of the shipped
# EfficientNet-Lite0 on the GPU. It exits non-zero when a check fails; every step's output is in the log.
set -uo pipefail
cd "$(dirname "$0")/.."
pack=target/gpu-check
mode=${1:-}

prepare() {
  set -e
  eval "$(bash scripts/cuda-env.sh)"
  cargo build --release --features cuda --bin automm
  mkdir -p "$pack"
  # Stripped and compressed: the carried files are limited to 64 MiB (the binary: 107 MB, stripped 93 MB,
  # gzipped 25 MB; candle's CUDA kernels are most of it).
  strip -o "$pack/automm" target/release/automm
  gzip -9 -f "$pack/automm"
  ls -l "$pack"
}

# The folders of the nvidia-* wheels PyTorch brought (libcublas.so.13, libcudart.so.13, ...), for the
# loader: the binary links those libraries by name; libcuda.so.1 comes from the driver.
python_cuda_libs() {
  python3 - <<'EOF'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for lib in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
}

step() { echo; echo "== $*"; }

run() {
  out=${OUT:-gpu-check-out}
  mkdir -p "$out"
  exec > >(tee "$out/gpu-check.log") 2>&1
  [[ -f "$pack/automm.gz" ]] || { echo "no $pack/automm.gz: run \`bash scripts/gpu-check.sh prepare\` here first and carry $pack"; exit 2; }
  bin=$(mktemp -d)/automm
  gzip -dc "$pack/automm.gz" >"$bin" && chmod +x "$bin"
  export LD_LIBRARY_PATH="$(python_cuda_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fails=0
  fail() { echo "FAILED: $*"; fails=$((fails + 1)); }
  step "machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__)'
  step "libraries the binary needs"
  ldd "$bin" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
  ldd "$bin" | grep -q 'not found' && fail "a library of the binary is missing"
  step "automm doctor"
  "$bin" doctor || fail "doctor"
  "$bin" doctor | grep -q 'CUDA (candle): available' || fail "candle's CUDA device is not usable"

  step "Swin-Tiny (timm, random init) exported by torch with every parameter as an initializer"
  python3 models/export_swin_tiny.py --features --parameters --output "$out/swin_tiny.onnx" || fail "export"
  step "full fine-tuning, Swin-Tiny, batch 32: automm on the GPU vs PyTorch on the same card"
  "$bin" bench finetune --model "$out/swin_tiny.onnx" --torch-arch swin_tiny_patch4_window7_224 --batch 32 \
    --steps 5 --num-gpus 1 || fail "bench finetune (Swin-Tiny)"
  step "full fine-tuning, EfficientNet-Lite0, batch 32: automm on the GPU vs PyTorch on the same card"
  "$bin" bench finetune --model models/pretrained/efficientnet_lite0.onnx --torch-arch efficientnet_lite0 \
    --batch 32 --steps 5 --num-gpus 1 || fail "bench finetune (EfficientNet-Lite0)"

  step "a head trained on the GPU; its predictions on the GPU and on the CPU"
  common=(--label label --backbone models/pretrained/efficientnet_lite0.onnx --quiet
    --hp optimization.max_epochs=3 --hp env.batch_size=32)
  "$bin" train --train-data data/clothing4/train.csv --output "$out/head-gpu" "${common[@]}" \
    --hp env.num_gpus=1 || fail "train on the GPU"
  "$bin" predict "$out/head-gpu" --data data/clothing4/validation.csv --output "$out/pred-gpu.csv" --num-gpus 1 ||
    fail "predict on the GPU"
  "$bin" predict "$out/head-gpu" --data data/clothing4/validation.csv --output "$out/pred-cpu.csv" ||
    fail "predict on the CPU"
  "$bin" train --train-data data/clothing4/train.csv --output "$out/head-cpu" "${common[@]}" || fail "train on the CPU"
  "$bin" predict "$out/head-cpu" --data data/clothing4/validation.csv --output "$out/pred-cpu-trained.csv" ||
    fail "predict (CPU-trained)"
  python3 - "$out" <<'EOF' || fail "GPU and CPU predictions differ by more than 1e-4"
import csv, sys
out = sys.argv[1]
def probs(name):
    with open(f"{out}/{name}") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("prob")]
    return [[float(r[c]) for c in cols] for r in rows]
gpu, cpu, cpu_trained = probs("pred-gpu.csv"), probs("pred-cpu.csv"), probs("pred-cpu-trained.csv")
d = max(abs(a - b) for r, s in zip(gpu, cpu) for a, b in zip(r, s))
t = max(abs(a - b) for r, s in zip(gpu, cpu_trained) for a, b in zip(r, s))
print(f"{len(gpu)} images: GPU-trained head, max |p(GPU) - p(CPU)| = {d:.2e} (limit 1e-4)")
print(f"head trained on the GPU vs trained on the CPU (same seed), max |p - p| = {t:.2e} (reported, not checked)")
sys.exit(0 if d <= 1e-4 else 1)
EOF

  step "one epoch of full fine-tuning of EfficientNet-Lite0 on the GPU"
  "$bin" train --train-data data/clothing4/train.csv --output "$out/full-gpu" --label label \
    --backbone models/pretrained/efficientnet_lite0.onnx --quiet --hp env.num_gpus=1 \
    --hp model.backbone.freeze=false --hp optimization.max_epochs=1 --hp env.batch_size=16 ||
    fail "full fine-tuning on the GPU"
  step "done: $fails failed"
  exit $((fails > 0))
}

case "$mode" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash scripts/gpu-check.sh prepare|run" >&2; exit 2 ;;
esac
