#!/usr/bin/env bash
# The GPU check of experiments/bench.md in one call on the lent machine (issue 15):
#   1. installs the carried wheels (.whl: tensorflow-datasets and what the GPU image lacks);
#   2. reads the carried prepared dataset (.tfds), or prepares it;
#   3. times the input pipeline (bench --input) beside a plain loop: the reader thread, 4 and 8
#      worker processes, and with --augment; then (not in a smoke run) the --fine-tune 1 --augment
#      step fed by it beside the step alone (bench --fed: issue 23's 90% target). It runs first:
#      issue 23 waits on it, and a call cut short still brings back what ran;
#   4. times the training step beside the plain-Flax reference step, in one process per group:
#      the report's three models and densenet121 bf16 at 256, vgg16 fp32 at 256, resnet50 bf16 at 32, vgg16
#      bf16 at 512 (a candidate: larger per-device batches);
#   5. times each VGG conv layer (experiments/vgg_layers.py);
#   6. runs the README's 50-epoch vgg19 command twice (cold, warm), evaluation included;
#      --smoke runs it once, at 32 px for 2 epochs;
#   7. writes every record (device, JAX version, date) to $OUT/bench.jsonl as it goes (the device
#      tool brings $OUT back, even after a timeout), appends them to experiments/bench.jsonl
#      (not in a smoke run) and prints one summary table.
#
# Before the call, here: `rm -rf .tfds; python -m xrayjax.data prepare --tfds-dir .tfds` (data prepared
# before the fourteenth session is zstd-compressed and reads slower), and into .whl the
# wheels the GPU image lacks (the device tool's README says how: tensorflow-datasets,
# array_record, grain (with cloudpickle and portpicker), dm-tree, promise,
# simple-parsing, docstring-parser, termcolor, toml, immutabledict, tensorflow-metadata,
# googleapis-common-protos; cp312 manylinux x86_64).
#
#   bash experiments/gpu_check.sh           # on the GPU: 7 minutes on an H200 before step 3 was added
#   bash experiments/gpu_check.sh --smoke   # the same path on the CPU with tiny sizes (tests)
# Environment: OUT (default: a temporary folder), TFDS_DIR, DATA_DIR (the dataset to train on
# end to end; default ../shared/covid_xray, or, where that is missing as on the GPU machine, the
# carried prepared folder .tfds/xray_folders/covid_xray-multiclass-gray-*/1.0.0, named explicitly).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)  # run folders (too big to bring back through $OUT)
mkdir -p "$out"
if [ -d .whl ] && ! python3 -c "import tensorflow_datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$smoke" = 1 ]; then  # the same commands, the smallest sizes and a smaller grid
  tfds=${TFDS_DIR:-$work/tfds}
  tiny=(--image-size 32 --warmup 1 --steps 1 --repeats 1 --batches 4)
  groups=("--models vgg16:binary --dtypes bf16 ${tiny[*]}")
  archs=(vgg16); layers=(--smoke --dtype fp32); e2e=(--epochs 2 --image-size 32 --batch-size 4); runs=(cold)
  inputs=("--image-size 32 --batches 4 --repeats 1 --workers 0")
else
  tfds=${TFDS_DIR:-.tfds}
  groups=("--models vgg16:binary vgg19:multiclass resnet50:multiclass densenet121:multiclass --dtypes bf16 --batches 256"
          "--models vgg16:binary --dtypes fp32 --batches 256"
          "--models resnet50:multiclass --dtypes bf16 --batches 32"
          "--models vgg16:binary --dtypes bf16 --batches 512")  # a candidate: larger per-device batches
  archs=(vgg16 vgg19); layers=(); e2e=(--epochs 50); runs=(cold warm)
  inputs=("--batches 256 --workers 0 4 8" "--augment --batches 256 --workers 0 8"
          "--fed --models vgg16 --dtypes bf16 --batches 256 --fine-tune 1 --augment --workers 0 8")
fi
records="$out/bench.jsonl"  # this run's records; a full run appends them to experiments/ at the end
: >"$records"
log() { echo "== $*" | tee -a "$out/gpu_check.log"; }
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null || true
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } | tee -a "$out/gpu_check.log"

if [ "$smoke" = 0 ] && [ -z "${DATA_DIR:-}" ]; then  # the smoke run's training prepares what it needs itself
  if [ -d ../shared/covid_xray ]; then
    log "prepared data in $tfds"
    python3 -m xrayjax.data prepare --tfds-dir "$tfds" 2>&1 | tail -n 3 | tee -a "$out/gpu_check.log"
  else
    DATA_DIR=$(ls -d "$tfds"/xray_folders/covid_xray-multiclass-gray-*/1.0.0 | head -n 1)
    log "no ../shared/covid_xray here: training on the carried prepared data $DATA_DIR"
  fi
fi

log "input pipeline beside a plain loop: the reader thread, then worker processes"
for flags in "${inputs[@]}"; do
  case $flags in --fed*) ;; *) flags="--input $flags" ;; esac
  # shellcheck disable=SC2086  # a list of flags
  python3 -m xrayjax.bench $flags --tfds-dir "$tfds" ${DATA_DIR:+--data-dir "$DATA_DIR"} --out "$records" \
    2>>"$out/gpu_check.log"
done

log "step throughput beside the plain-Flax reference"
for group in "${groups[@]}"; do
  # shellcheck disable=SC2086  # a group is a list of flags
  python3 -m xrayjax.bench $group --reference experiments/plain_flax_step.py --out "$records" 2>>"$out/gpu_check.log"
done

log "per-layer times of the VGG backbones"
for arch in "${archs[@]}"; do
  python3 experiments/vgg_layers.py --arch "$arch" --out "$out/vgg_layers.jsonl" "${layers[@]}" \
    | tee -a "$out/gpu_check.log"
done

for run in "${runs[@]}"; do
  log "end to end: the README's vgg19 command, $run"
  start=$(date +%s.%N)
  python3 -m xrayjax.train --arch vgg19 --init random --tfds-dir "$tfds" --out "$work/e2e_$run" --quiet \
    ${DATA_DIR:+--data-dir "$DATA_DIR"} "${e2e[@]}" | tee -a "$out/gpu_check.log"
  wall=$(python3 -c "print($(date +%s.%N) - $start)")
  python3 experiments/gpu_check.py e2e "$work/e2e_$run" "$run" "$wall" "$records"
done

[ "$smoke" = 1 ] || cat "$records" >>experiments/bench.jsonl
log "summary"
python3 experiments/gpu_check.py summary "$records" | tee -a "$out/gpu_check.log"
