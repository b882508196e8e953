"""A synthetic class-folder dataset at scale, and the prepare/memory benchmark of issue 13.

    python experiments/synthetic_data.py make --out /tmp/synth --count 20000
    python experiments/synthetic_data.py bench --data /tmp/synth --work /tmp/synth_work

``make`` writes ``<out>/<class>/<n>.jpeg``: each image a random crop (80-100% of each side) of a
real X-ray of that class (``../shared/covid_xray``, all/ train and test), flipped at random,
with Gaussian noise (sigma 4), resized to the real images' median size (1368x992) and saved as
JPEG (quality 90) in the source's colour mode. Never commit it.

``bench`` measures, in one run on this machine:
- a plain single-process PIL loop (open, RGB, nearest resize to 224, luma) over the same files,
  and xrayjax's own decoder in the same single-process loop;
- ``python -m xrayjax.data prepare`` on them: wall time, images/s, peak RSS;
- the peak RSS of ``python -m xrayjax.train --epochs 2 --image-size 32`` on them and on the real
  305 images (both already prepared, so it is the training run's own memory).
It prints a table and appends one JSON record to ``experiments/bench.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "covid_xray" / "Covid_Data_GradientCrescent" / "all"
MEDIAN_SIZE = (1368, 992)  # (width, height): the median of the 305 real images
SUFFIXES = (".jpeg", ".jpg", ".png")


def _sources() -> dict[str, list[pathlib.Path]]:
    by_class: dict[str, list[pathlib.Path]] = {}
    for path in sorted(REAL.glob("*/*/*")):
        if path.suffix.lower() in SUFFIXES:
            by_class.setdefault(path.parent.name, []).append(path)
    return by_class


def _make_one(job: tuple[int, str, str, pathlib.Path]) -> None:
    index, source, cls, out = job
    rng = np.random.default_rng(index)
    image = Image.open(source)
    mode = "L" if image.mode in ("L", "I;16", "I") else "RGB"
    image = image.convert(mode)
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x, y, x + cw, y + ch)).resize(MEDIAN_SIZE, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 4, np.asarray(image).shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode).save(out / cls / f"{index:05d}.jpeg", quality=90)


def make(out: pathlib.Path, count: int, workers: int) -> None:
    by_class = _sources()
    classes = sorted(by_class)
    for cls in classes:
        (out / cls).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(count):
        cls = classes[i % len(classes)]
        jobs.append((i, str(by_class[cls][rng.integers(len(by_class[cls]))]), cls, out))
    began = time.perf_counter()
    with Pool(workers) as pool:
        for done, _ in enumerate(pool.imap_unordered(_make_one, jobs, chunksize=16), 1):
            if done % 2000 == 0:
                print(f"{done}/{count} images, {time.perf_counter() - began:.0f} s", flush=True)
    print(f"wrote {count} images into {out} in {time.perf_counter() - began:.0f} s")


def plain_loop(files: list[pathlib.Path]) -> float:
    """Seconds for the single-process baseline: decode and resize each file the way Keras'
    load_img does (RGB, then nearest resize), then take the luma, as ``--color gray`` does."""
    began = time.perf_counter()
    for path in files:
        image = Image.open(path).convert("RGB").resize((224, 224), Image.Resampling.NEAREST).convert("L")
        np.asarray(image)
    return time.perf_counter() - began


def own_loop(files: list[pathlib.Path]) -> float:
    """Seconds for xrayjax's own decoder (xrayjax.data.decode.decode) in one thread: what
    prepare does per image, without its threads and without writing."""
    from xrayjax.data.decode import decode

    began = time.perf_counter()
    for path in files:
        decode(path.read_bytes(), "gray")
    return time.perf_counter() - began


def measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, the output's last lines) of a command run to its end."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
    return time.perf_counter() - began, usage.ru_maxrss / 2**20, "\n".join(output.splitlines()[-3:])


def bench(data: pathlib.Path, work: pathlib.Path, epochs: int) -> None:
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in SUFFIXES)
    work.mkdir(parents=True, exist_ok=True)
    tfds_dir = work / "tfds"
    py = sys.executable
    loop_s = plain_loop(files)
    own_s = own_loop(files)
    prep_s, prep_rss, _ = measured([py, "-m", "xrayjax.data", "prepare", "--data-dir", str(data),
                                    "--tfds-dir", str(tfds_dir)])
    measured([py, "-m", "xrayjax.data", "prepare", "--data-dir", str(REAL.parent), "--tfds-dir", str(tfds_dir)])
    runs = {}
    for name, where in (("real_305", REAL.parent), (f"synthetic_{len(files)}", data)):
        out = work / f"run_{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        wall, rss, tail = measured([py, "-m", "xrayjax.train", "--arch", "vgg16", "--init", "random",
                                    "--image-size", "32", "--epochs", str(epochs), "--data-dir", str(where),
                                    "--tfds-dir", str(tfds_dir), "--out", str(out), "--quiet"])
        runs[name] = {"wall_s": round(wall, 1), "peak_rss_gb": round(rss, 3)}
        print(tail)
    record = {
        "kind": "dataset_scale", "date": datetime.date.today().isoformat(), "machine": platform.node(),
        "cpus": os.cpu_count(), "images": len(files), "image_size_wh": list(MEDIAN_SIZE),
        "plain_loop_s": round(loop_s, 1), "plain_loop_images_per_s": round(len(files) / loop_s, 1),
        "own_decode_loop_s": round(own_s, 1), "own_decode_loop_images_per_s": round(len(files) / own_s, 1),
        "prepare_s": round(prep_s, 1), "prepare_images_per_s": round(len(files) / prep_s, 1),
        "prepare_speedup": round(loop_s / prep_s, 2), "prepare_peak_rss_gb": round(prep_rss, 3),
        "train_runs": runs,
        "train_rss_growth_gb": round(runs[f"synthetic_{len(files)}"]["peak_rss_gb"] - runs["real_305"]["peak_rss_gb"], 3),
    }
    print(json.dumps(record, indent=2))
    with open(REPO / "experiments" / "bench.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the synthetic dataset")
    m.add_argument("--out", type=pathlib.Path, required=True)
    m.add_argument("--count", type=int, default=20000)
    m.add_argument("--workers", type=int, default=os.cpu_count())
    b = sub.add_parser("bench", help="measure prepare and training on it")
    b.add_argument("--data", type=pathlib.Path, required=True)
    b.add_argument("--work", type=pathlib.Path, required=True, help="where prepared data and runs go")
    b.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.count, args.workers)
    else:
        bench(args.data, args.work, args.epochs)


if __name__ == "__main__":
    main()
