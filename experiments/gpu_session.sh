#!/usr/bin/env bash
# The GPU measurements of experiments/bench.md, in one call on the lent machine: the
# benchmark grid, then the end-to-end run of experiments/gpu_e2e.sh (which needs the
# prepared dataset in .tfds and the tensorflow-datasets wheels in .whl). Results go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -m xrayjax.bench --out "$OUT/bench.jsonl"
bash "$(dirname "$0")/gpu_e2e.sh"
