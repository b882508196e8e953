#!/usr/bin/env bash
# The GPU measurements of experiments/bench.md, in one call on the lent machine:
#   the benchmark grid, the backbone-chunk variants, and the end-to-end 50-epoch vgg19 run
#   from a dataset prepared here (python -m xrayjax.data prepare --tfds-dir .tfds).
# Needs the wheels of tensorflow-datasets and its missing dependencies in .whl/ (see
# /work/.library/device/README.md); results go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
python3 -m xrayjax.bench --out "$OUT/bench.jsonl"
for chunk in 32 64; do
  python3 -m xrayjax.bench --models vgg16:binary vgg19 resnet50 --dtypes bf16 --batches 256 \
    --chunk "$chunk" --out "$OUT/bench.jsonl"
done
for run in 1 2; do
  start=$(date +%s.%N)
  python3 -m xrayjax.train --arch vgg19 --init random --epochs 50 --tfds-dir .tfds \
    --out "/tmp/e2e$run" --quiet
  wall=$(awk "BEGIN {print $(date +%s.%N) - $start}")
  echo "e2e run $run: $wall s wall (python start included), $(cat "/tmp/e2e$run/timings.json")" | tee -a "$OUT/e2e.log"
done
cp /tmp/e2e1/history.json /tmp/e2e1/metrics.json "$OUT/"
