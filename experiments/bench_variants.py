"""Try XLA flag sets on the benchmark's hardest configurations, one process per variant.

XLA reads its flags once per process, so each variant is a fresh ``python -m xrayjax.bench``
run. Used on the GPU machine to choose the defaults recorded in experiments/bench.md:

    python experiments/bench_variants.py --models vgg16:binary resnet50 --batch 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = {
    "default": "",
    "runtime_fusion": "--xla_gpu_use_runtime_fusion=true",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
    "autotune5": "--xla_gpu_autotune_level=5",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vgg16:binary", "resnet50:multiclass"])
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    rows = []
    for name in args.variants:
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip()}
        cmd = [sys.executable, "-m", "xrayjax.bench", "--no-save", "--models", *args.models,
               "--dtypes", args.dtype, "--batches", str(args.batch), "--repeats", "3"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        for line in done.stdout.splitlines():
            r = json.loads(line)
            rows.append((name, f"{r['arch']}:{r['task']}", r["images_per_s"], r["compile_s"]))
    print(f"{'variant':<20}{'model':<22}{'images/s':>10}{'compile s':>11}")
    for row in rows:
        print(f"{row[0]:<20}{row[1]:<22}{row[2]:>10.0f}{row[3]:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
