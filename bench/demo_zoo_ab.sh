#!/usr/bin/env bash
# The demo on zoo models at HEAD and at git revision BASE, side by side: model by
# model, HEAD's demo then BASE's, so both meet the same machine state.
# Writes OUT/demo_zoo.{jsonl,md} (HEAD, logs OUT/demo_M.log) and
# OUT/demo_zoo_before.{jsonl,md} (BASE, logs OUT/before/demo_M.log).
# Both sides run from temporary git worktrees with this tree's virtual environment,
# so the working tree may change while it runs.
# Usage: bench/demo_zoo_ab.sh BASE [IMAGES] [MODELS] [OUT]
#   IMAGES default 12; MODELS comma-separated, default every zoo model;
#   OUT default bench/results.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:?usage: bench/demo_zoo_ab.sh BASE [IMAGES] [MODELS] [OUT]}"
images="${2:-12}"
models="${3:-vgg16,vgg16-edgedi,resnet18,resnet18-edgedi,resnet34,resnet34-edgedi}"
out="${4:-bench/results}"
head="$(git rev-parse --short HEAD)"
work="$(mktemp -d)"
cleanup() {
  git worktree remove --force "$work/new/edgedi" >/dev/null 2>&1 || true
  git worktree remove --force "$work/old/edgedi" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/new" "$work/old" "$out/before"
git worktree add --quiet --detach "$work/new/edgedi" HEAD
git worktree add --quiet --detach "$work/old/edgedi" "$base"
new="$out/demo_zoo.jsonl"
old="$out/demo_zoo_before.jsonl"
: > "$new.tmp"
: > "$old.tmp"
for model in ${models//,/ }; do
  # Each checkout's folder is named edgedi: on PYTHONPATH it shadows this tree's package.
  echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $model at HEAD ($head)" >&2
  PYTHONPATH="$work/new" .venv/bin/python -m edgedi.agent.cli demo --model "$model" \
    --images "$images" --json 2>"$out/demo_$model.log" >> "$new.tmp"
  echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $model at $base" >&2
  PYTHONPATH="$work/old" .venv/bin/python -m edgedi.agent.cli demo --model "$model" \
    --images "$images" --json 2>"$out/before/demo_$model.log" >> "$old.tmp"
done
echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): done" >&2
mv "$new.tmp" "$new"
mv "$old.tmp" "$old"
command="bench/demo_zoo_ab.sh $base $images $models $out  # at $head"
.venv/bin/python bench/demo_table.py "$new" "$command" "$out" > "$out/demo_zoo.md"
.venv/bin/python bench/demo_table.py "$old" "$command (the $base side)" "$out/before" \
  > "$out/demo_zoo_before.md"
cat "$out/demo_zoo.md" "$out/demo_zoo_before.md"
