#!/usr/bin/env bash
# The end-to-end figure of experiments/bench.md: `python -m xrayjax.train --arch vgg19
# --init random --epochs 50`, twice with the evaluation and once without (--no-eval), on the lent machine, from a dataset prepared here
# with `python -m xrayjax.data prepare --tfds-dir .tfds`. The tensorflow-datasets wheels and
# their missing dependencies travel in .whl/ (see the device tool's README).
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
for run in 1 2 3; do
  start=$(date +%s.%N)
  python3 -m xrayjax.train --arch vgg19 --init random --epochs 50 --tfds-dir .tfds \
    --out "/tmp/e2e$run" --quiet $([ "$run" = 3 ] && echo --no-eval)
  wall=$(awk "BEGIN {print $(date +%s.%N) - $start}")
  echo "e2e run $run: $wall s wall (python start included), $(cat "/tmp/e2e$run/timings.json")" | tee -a "$OUT/e2e.log"
done
python3 -c "import time; t=time.time(); import jax; jax.devices(); print(f'python + jax import + GPU init: {time.time()-t:.1f} s')" | tee -a "$OUT/e2e.log"
