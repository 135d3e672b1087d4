#!/usr/bin/env bash
# `edgedi demo --model M --json` for every zoo model, one after another; the JSON lines
# go to bench/results/demo_zoo.jsonl and a table to bench/results/demo_zoo.md.
# Usage: bench/demo_zoo.sh [IMAGES]   (default 12)
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-12}"
out=bench/results/demo_zoo.jsonl
: > "$out.tmp"
for model in vgg16 vgg16-edgedi resnet18 resnet18-edgedi resnet34 resnet34-edgedi; do
  echo "demo: $model" >&2
  .venv/bin/edgedi demo --model "$model" --images "$images" --json 2>"bench/results/demo_$model.log" >> "$out.tmp"
done
mv "$out.tmp" "$out"
.venv/bin/python bench/demo_table.py "$out" "bench/demo_zoo.sh $images" > bench/results/demo_zoo.md
cat bench/results/demo_zoo.md
