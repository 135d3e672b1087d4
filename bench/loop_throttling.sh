#!/usr/bin/env bash
# Samples, every 2 s while an `edgedi demo` runs on this machine, each event-loop quota
# group's throttling (cpu.stat: periods throttled, ms throttled so far; cgroup v1) and
# the leader's planning process CPU ticks (utime+stime, 1/100 s).
# Usage: bench/loop_throttling.sh > OUT.log   (start it just after the demo)
set -u
while pgrep -f "edgedi demo" > /dev/null; do
  line="$(date +%T)"
  for g in /sys/fs/cgroup/cpu/edgedi-local/*-loop; do
    [ -d "$g" ] || continue
    name=$(basename "$g" | sed 's/^[0-9]*-//')
    line="$line | $name $(awk '/nr_throttled/{a=$2} /throttled_time/{b=$2} END{print a" "int(b/1e6)}' "$g/cpu.stat")"
  done
  planner=$(pgrep -f "multiprocessing.spawn import spawn_main" | head -1)
  if [ -n "$planner" ]; then
    line="$line | planworker ticks $(awk '{print $14+$15}' "/proc/$planner/stat")"
  fi
  echo "$line"
  sleep 2
done
