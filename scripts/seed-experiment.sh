#!/usr/bin/env bash
# The focal-loss seed protocol of AutoGluon's tutorial as a reproducible experiment:
# trains cross-entropy, cross-entropy weighted by alpha (focal with gamma 0), focal without alpha, focal
# with alpha=auto, the logit-adjusted loss (la), the default (no loss key: auto) and cross-entropy with
# post-hoc prior correction at evaluation (ce_prior), and focal with alpha=auto fine-tuning the whole
# backbone (focal_alpha_full: model.backbone.freeze=false; not in the default set, minutes per run) on
# DATA_DIR/imbalanced4_train.csv, SEEDS times each, evaluates on
# DATA_DIR/imbalanced4_validation.csv, and prints a markdown table (mean ± std).
#
#   scripts/seed-experiment.sh DATA_DIR [BACKBONE.onnx] [NORMALIZATION]
#   SEEDS="0 1 2" CONFIGS="ce focal_alpha" EPOCHS=10 scripts/seed-experiment.sh ../shared/data/clothing-small \
#       ../shared/models/efficientnet_lite0.onnx symmetric
#
# Needs: a release build (cargo build --release) and python3 (standard library only) for the table.
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [BACKBONE] [NORMALIZATION]}
backbone=${2:-models/pretrained/efficientnet_lite0.onnx}
norm=${3:-symmetric}
seeds=${SEEDS:-0 1 2 3 4}
configs=${CONFIGS:-ce ce_alpha focal focal_alpha la default ce_prior}
epochs=${EPOCHS:-10}
out=${OUT:-runs/seed-experiment}
bin=${AUTOMM:-target/release/automm}
train="$data/imbalanced4_train.csv"
valid="$data/imbalanced4_validation.csv"
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

hp_of() {
  case "$1" in
    default) echo "" ;;  # no loss key: the imbalance-aware auto loss
    la) echo "--hp optimization.loss_function=logit_adjusted --hp optimization.logit_adjustment.tau=1.0" ;;
    ce|ce_prior) echo "--hp optimization.loss_function=cross_entropy" ;;
    ce_alpha) echo "--hp optimization.loss_function=focal_loss --hp optimization.focal_loss.alpha=auto --hp optimization.focal_loss.gamma=0 --hp optimization.focal_loss.reduction=sum" ;;
    focal) echo "--hp optimization.loss_function=focal_loss --hp optimization.focal_loss.alpha=null --hp optimization.focal_loss.gamma=1.0 --hp optimization.focal_loss.reduction=sum" ;;
    focal_alpha) echo "--hp optimization.loss_function=focal_loss --hp optimization.focal_loss.alpha=auto --hp optimization.focal_loss.gamma=1.0 --hp optimization.focal_loss.reduction=sum" ;;
    focal_alpha_full) echo "$(hp_of focal_alpha) --hp model.backbone.freeze=false" ;;
    *) echo "unknown config $1" >&2; exit 2 ;;
  esac
}

# Flags of `evaluate`: ce_prior is the cross-entropy head with post-hoc prior correction (tau 1).
eval_of() {
  case "$1" in
    ce_prior) echo "--prior-correction 1.0" ;;
    *) echo "" ;;
  esac
}

for cfg in $configs; do
  for seed in $seeds; do
    run="$out/$cfg-seed$seed"
    t0=$(date +%s.%N)
    # shellcheck disable=SC2046
    "$bin" train --quiet --train-data "$train" --label label --backbone "$backbone" --normalization "$norm" \
      --output "$run" $(hp_of "$cfg") --hp optimization.max_epochs="$epochs" --hp env.seed="$seed" > "$run.train.txt"
    t1=$(date +%s.%N)
    # shellcheck disable=SC2046
    "$bin" evaluate --quiet --json --model "$run" --data "$valid" --metrics accuracy,balanced_accuracy,f1_macro \
      $(eval_of "$cfg") > "$run.eval.json"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d.update(config=sys.argv[2], seed=int(sys.argv[3]), train_seconds=float(sys.argv[4])); print(json.dumps(d))' \
      "$run.eval.json" "$cfg" "$seed" "$(echo "$t1 - $t0" | bc)" >> "$results"
    echo "done: $cfg seed $seed" >&2
  done
done

python3 - "$results" "$train" <<'PY'
import collections, csv, json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
counts = collections.Counter(r["label"] for r in csv.DictReader(open(sys.argv[2])))
minority = min(counts, key=counts.get)
def ms(v):
    return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
print(f"| config | accuracy | balanced accuracy | macro-F1 | recall of class {minority} ({counts[minority]} train images) | train wall s |")
print("|---|---|---|---|---|---|")
by = collections.defaultdict(list)
for r in rows:
    by[r["config"]].append(r)
for cfg, rs in by.items():
    print(f"| {cfg} (n={len(rs)}) | {ms([r['accuracy'] for r in rs])} | {ms([r['balanced_accuracy'] for r in rs])} | "
          f"{ms([r['f1_macro'] for r in rs])} | {ms([r['per_class_recall'][minority] for r in rs])} | {ms([r['train_seconds'] for r in rs])} |")
PY
