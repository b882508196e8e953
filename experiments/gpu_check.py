"""Helpers of ``experiments/gpu_check.sh``: the end-to-end run's record, and the summary table.

    python experiments/gpu_check.py e2e RUN_DIR LABEL WALL_SECONDS RECORDS   # append one record
    python experiments/gpu_check.py summary RECORDS                         # print the table

Targets are issue 15's, for one H100 at batch 256 in bf16; on another device the table says
so and judges nothing.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

TARGETS = {("vgg16", "binary", "bf16", 256): 18_000, ("vgg19", "multiclass", "bf16", 256): 15_000,
           ("resnet50", "multiclass", "bf16", 256): 26_000}
MIN_RATIO = 1.05
E2E_TARGET_S = 20.0


def e2e_record(run_dir: Path, label: str, wall: float) -> dict:
    """One end-to-end run: wall time (Python start included), phases, device, versions, result."""
    meta = json.loads((run_dir / "config.json").read_text())
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {"kind": "e2e", "run": label, "command": "xrayjax.train --arch vgg19 --init random",
            "epochs": meta["config"]["epochs"], "image_size": meta["config"]["image_size"],
            "wall_s": round(wall, 2), "timings": json.loads((run_dir / "timings.json").read_text())[-1]["phases"],
            "test_accuracy": metrics.get("accuracy"), "device": meta["device"],
            "jax": meta["versions"]["jax"], "date": datetime.date.today().isoformat()}


def summary(records: list[dict]) -> str:
    bench = [r for r in records if "images_per_s" in r and r.get("kind") not in ("input", "fed")]
    inputs = [r for r in records if r.get("kind") == "input"]
    fed = [r for r in records if r.get("kind") == "fed"]
    e2e = [r for r in records if r.get("kind") == "e2e"]
    h100 = all("H100" in r["device"] for r in bench + e2e) and bool(bench + e2e)
    lines = [f"{'model':<22}{'dtype':>6}{'batch':>6}{'img/s':>10}{'plain Flax':>12}{'ratio':>7}"
             f"{'target':>8}  met"]
    for r in bench:
        target = TARGETS.get((r["arch"], r["task"], r["dtype"], r["batch"]))
        ratio = r.get("vs_reference")
        ok = (ratio is None or ratio >= MIN_RATIO) and (target is None or r["images_per_s"] >= target)
        lines.append(f"{r['arch'] + ' ' + r['task']:<22}{r['dtype']:>6}{r['batch']:>6}{r['images_per_s']:>10,.0f}"
                     f"{r.get('reference_images_per_s', 0):>12,.0f}{ratio or 0:>7.2f}{target or 0:>8,}  "
                     f"{('yes' if ok else 'no') if h100 else '-'}")
    for r in e2e:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        ok = r["wall_s"] <= E2E_TARGET_S
        lines.append(f"e2e {r['run']:<5} {r['epochs']} epochs: {r['wall_s']:.1f} s wall "
                     f"(target {E2E_TARGET_S:.0f} s, met: {('yes' if ok else 'no') if h100 else '-'}); {phases}")
    for r in inputs:
        lines.append(f"input {r['image_size']} px, batch {r['batch']}{', augment' if r['augment'] else ''}, "
                     f"{r['workers']} workers: {r['images_per_s']:,.0f} img/s, {r['vs_plain_loop']:.2f}x the plain "
                     f"loop ({r['plain_loop_images_per_s']:,.0f}), {r['vs_tfds_loop']:.2f}x TFDS' own "
                     f"({r['tfds_loop_images_per_s']:,.0f})")
    for r in fed:
        lines.append(f"fed {r['arch']} {r['dtype']} batch {r['batch']}, fine-tune {r['fine_tune']}"
                     f"{', augment' if r['augment'] else ''}, {r['workers']} workers: {r['images_per_s']:,.0f} img/s, "
                     f"{r['vs_step']:.1%} of the step alone ({r['step_images_per_s']:,.0f}; target 90%, met: "
                     f"{'-' if 'cpu' in r['device'].lower() else 'yes' if r['vs_step'] >= 0.9 else 'no'})")
    device = {r["device"] for r in bench + e2e}
    lines.append(f"device: {', '.join(sorted(device))}; jax {', '.join(sorted({r['jax'] for r in bench + e2e}))}"
                 + ("" if h100 else " (targets are for one H100: not judged here)"))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["e2e"]:
        run_dir, label, wall, out = Path(argv[1]), argv[2], float(argv[3]), Path(argv[4])
        with out.open("a") as f:
            f.write(json.dumps(e2e_record(run_dir, label, wall)) + "\n")
        return 0
    if argv[:1] == ["summary"]:
        lines = Path(argv[1]).read_text().splitlines()
        print(summary([json.loads(line) for line in lines if line.strip()]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
