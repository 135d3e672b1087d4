#!/usr/bin/env bash
# Train the zoo with the recipe at the deployed size (200 px) on one GPU, then measure each
# model on a seed never used in training or model selection.
#
#   bench/train_zoo_gpu.sh [OUTDIR]        (OUTDIR default: $OUT, else out/zoo-gpu)
#   env: EPOCHS (40) PER_CLASS (300) SIZE (200) WORKERS (16) UNSEEN_SEED (1000)
#        EVAL_PER_CLASS (100) DEVICE (cuda) EDGEDI PY WORK (cache + originals, default out/zoo-gpu)
#
# Sized for a 16-core machine with one large GPU (about 10 minutes in all):
#   1. draw the fresh epochs once, in 16 processes, into a cache every run reads
#      (drawing costs ~15 ms an image on a core; a GPU step costs far less);
#   2. train the three compact models and the three originals, three at a time;
#   3. `edgedi eval` each on the unseen seed (CPU, as an agent runs it), JSON + text.
# The compact checkpoints are written fp16 (each well under 10 MB) into OUTDIR/weights,
# ready to replace models/weights/*.pt; the originals stay in $WORK/originals (vgg16
# alone is ~430 MB) in $WORK and only their sidecars and evaluations go to OUTDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/zoo-gpu}}"
EDGEDI="${EDGEDI:-.venv/bin/edgedi}"
PY="${PY:-.venv/bin/python}"
EPOCHS="${EPOCHS:-40}"
PER_CLASS="${PER_CLASS:-300}"    # NEU-CLS size; the seed-0 set's test split (540 images) is held out
SEED=0
UNSEEN_SEED="${UNSEEN_SEED:-1000}"
SIZE="${SIZE:-200}"
WORKERS="${WORKERS:-16}"
# cuda by default: a machine whose torch has no CUDA fails at once instead of training on the CPU.
DEVICE="${DEVICE:-cuda}"
EVAL_PER_CLASS="${EVAL_PER_CLASS:-100}"
work="${WORK:-out/zoo-gpu}"   # cache and the large originals (not brought back)
cache="$work/cache"
originals="$work/originals"
mkdir -p "$out/weights" "$out/originals" "$out/eval" "$cache" "$originals"

started=$(date +%s)
# -c, not a here-document: spawned workers re-import the main script, which stdin is not.
"$PY" -c '
import sys, time
from edgedi.models.training import FreshSynthetic
cache, epochs, per_class, seed, size, workers = sys.argv[1], *map(int, sys.argv[2:])
started = time.perf_counter()
with FreshSynthetic(seed, per_class, size, first=per_class, workers=workers, cache=cache) as s:
    s.prefetch(epochs)
print(f"drew {epochs} epochs of {6 * per_class} images in {time.perf_counter() - started:.0f} s")
' "$cache" "$EPOCHS" "$PER_CLASS" "$SEED" "$SIZE" "$WORKERS"

common=(--seed "$SEED" --per-class "$PER_CLASS" --size "$SIZE" --epochs "$EPOCHS"
        --cache "$cache" --device "$DEVICE" --threads 4)
train() {  # MODEL LR DEST [extra]
  local model=$1 lr=$2 dest=$3; shift 3
  "$EDGEDI" train "$model" "${common[@]}" --lr "$lr" --out "$dest" "$@" \
    > "$out/$model.train.log" 2>&1
}
# Peak learning rates from bench/results/recipe_probe.md: the VGGs need a smaller step.
pids=()
finish_wave() {  # a failed training stops the script, pointing at its log
  for pid in "${pids[@]}"; do
    wait "$pid" || { echo "a training failed; see $out/*.train.log" >&2; tail -n 3 "$out"/*.train.log >&2; exit 1; }
  done
  pids=()
}
train vgg16-edgedi 1e-3 "$out/weights/vgg16-edgedi.pt" --half & pids+=($!)
train resnet18-edgedi 2e-3 "$out/weights/resnet18-edgedi.pt" --half & pids+=($!)
train resnet34-edgedi 2e-3 "$out/weights/resnet34-edgedi.pt" --half & pids+=($!)
finish_wave
train vgg16 1e-3 "$originals/vgg16.pt" & pids+=($!)
train resnet18 2e-3 "$originals/resnet18.pt" & pids+=($!)
train resnet34 2e-3 "$originals/resnet34.pt" & pids+=($!)
finish_wave
cp "$originals"/*.json "$out/originals/"
echo "trained in $(( $(date +%s) - started )) s"

for model in vgg16-edgedi resnet18-edgedi resnet34-edgedi vgg16 resnet18 resnet34; do
  case $model in *-edgedi) ckpt="$out/weights/$model.pt" ;; *) ckpt="$originals/$model.pt" ;; esac
  "$EDGEDI" eval "$model" --ckpt "$ckpt" --seed "$UNSEEN_SEED" --per-class "$EVAL_PER_CLASS" --size "$SIZE" \
    --json "$out/eval/$model.json" > "$out/eval/$model.txt" 2>&1 &
done
wait
grep -H "^accuracy" "$out"/eval/*.txt
echo "all done in $(( $(date +%s) - started )) s"
