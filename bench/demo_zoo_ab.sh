#!/usr/bin/env bash
# The demo on every zoo model at this tree and at git revision BASE, side by side:
# model by model, this tree's demo then BASE's, so both meet the same machine state.
# Writes bench/results/demo_zoo.{jsonl,md} (this tree, logs demo_M.log) and
# bench/results/demo_zoo_before.{jsonl,md} (BASE, logs under the temporary checkout).
# BASE runs from a temporary git worktree with this tree's virtual environment.
# Usage: bench/demo_zoo_ab.sh BASE [IMAGES]   (IMAGES default 12)
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:?usage: bench/demo_zoo_ab.sh BASE [IMAGES]}"
images="${2:-12}"
work="$(mktemp -d)"
cleanup() {
  git worktree remove --force "$work/edgedi" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
git worktree add --quiet --detach "$work/edgedi" "$base"
new=bench/results/demo_zoo.jsonl
old=bench/results/demo_zoo_before.jsonl
: > "$new.tmp"
: > "$old.tmp"
for model in vgg16 vgg16-edgedi resnet18 resnet18-edgedi resnet34 resnet34-edgedi; do
  echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $model at this tree" >&2
  .venv/bin/edgedi demo --model "$model" --images "$images" --json \
    2>"bench/results/demo_$model.log" >> "$new.tmp"
  echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $model at $base" >&2
  # The checkout's folder is named edgedi: on PYTHONPATH it shadows this tree's package.
  PYTHONPATH="$work" .venv/bin/python -m edgedi.agent.cli demo --model "$model" \
    --images "$images" --json 2>"$work/demo_$model.log" >> "$old.tmp"
done
echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): done" >&2
mv "$new.tmp" "$new"
mv "$old.tmp" "$old"
command="bench/demo_zoo_ab.sh $base $images"
.venv/bin/python bench/demo_table.py "$new" "$command" > bench/results/demo_zoo.md
.venv/bin/python bench/demo_table.py "$old" "$command (the $base side)" \
  > bench/results/demo_zoo_before.md
cat bench/results/demo_zoo.md bench/results/demo_zoo_before.md
