#!/usr/bin/env bash
# The demo under the two ways of making devices slow, side by side: cgroup CPU quotas
# (the default) and paced compute (each step takes its CPU time / speed, loops under
# quotas), model by model, alternating which goes first each round, so both meet the
# same machine state. Writes bench/results/emulation_{quota,paced}.{jsonl,md} and the
# demos' logs under bench/results/emulation_ab_logs/.
# Usage: bench/emulation_ab.sh [IMAGES] [ROUNDS] [MODELS...]
#        (IMAGES default 12, ROUNDS default 2, MODELS default vgg16-edgedi vgg16 resnet34)
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-12}"
rounds="${2:-2}"
shift $(( $# > 2 ? 2 : $# ))
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(vgg16-edgedi vgg16 resnet34)
logs=bench/results/emulation_ab_logs
mkdir -p "$logs"
: > bench/results/emulation_quota.jsonl.tmp
: > bench/results/emulation_paced.jsonl.tmp
for model in "${models[@]}"; do
  for round in $(seq 1 "$rounds"); do
    order=(quota paced)
    (( round % 2 == 0 )) && order=(paced quota)
    for emulation in "${order[@]}"; do
      echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $model, $emulation, round $round" >&2
      .venv/bin/edgedi demo --model "$model" --images "$images" --emulation "$emulation" --json \
        2>"$logs/${model}_${emulation}_$round.log" \
        >> "bench/results/emulation_$emulation.jsonl.tmp"
    done
  done
done
echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg): done" >&2
command="bench/emulation_ab.sh $images $rounds ${models[*]}"
for emulation in quota paced; do
  mv "bench/results/emulation_$emulation.jsonl.tmp" "bench/results/emulation_$emulation.jsonl"
  .venv/bin/python bench/demo_table.py "bench/results/emulation_$emulation.jsonl" \
    "$command (the $emulation side)" "\`emulation_ab_logs/M_${emulation}_ROUND.log\`" \
    > "bench/results/emulation_$emulation.md"
  cat "bench/results/emulation_$emulation.md"
done
