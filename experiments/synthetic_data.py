"""Synthetic datasets at scale: class folders (issue 13) and ChestX-ray14's layout (issue 21),
and their prepare/memory benchmarks.

    python experiments/synthetic_data.py make --out /tmp/synth --count 20000
    python experiments/synthetic_data.py bench --data /tmp/synth --work /tmp/synth_work
    python experiments/synthetic_data.py make --format chestxray14 --out /tmp/nih_synth --count 20000
    python experiments/synthetic_data.py bench --format chestxray14 --data /tmp/nih_synth --work /tmp/nih_work \
        [--count N] [--train-count M]

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

``make --format chestxray14`` writes NIH's layout: 1024x1024 8-bit gray PNGs (zlib level 1)
``<patient:08d>_<follow-up:03d>.png`` over ``images_001/images`` ... ``images_012/images`` in the
download's proportions, each a crop of a real X-ray as above (gray, noise drawn in float32); the
14 findings at NIH's prevalences (about 54% No Finding); a geometric number of images per patient
(NIH's mean, 3.64); PA 60% / AP 40%; ``Data_Entry_2017.csv`` with NIH's header; and
patient-disjoint ``train_val_list.txt`` / ``test_list.txt`` (20% of the patients in test).
``bench --format chestxray14`` measures prepare (``load_splits`` in a child: listing, decode,
write), reading the prepared images back at 224 px, and ``python -m xrayjax.train --labels ...
--arch vgg16 --init random --image-size 32 --epochs 2 --no-eval`` (wall, peak RSS, timings.json),
and appends one ``chestxray14_scale`` record to ``experiments/bench.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
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


def _crop_noise(image: Image.Image, rng: np.random.Generator, size: tuple[int, int], fast: bool = False
                ) -> Image.Image:
    """A random crop (80-100% of each side) of ``image`` resized to ``size``, flipped at random,
    with Gaussian noise (sigma 4; ``fast``: drawn in float32, half the time, another stream)."""
    w, h = image.size
    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    shape = np.asarray(image).shape
    noise = rng.standard_normal(shape, np.float32) * 4 if fast else rng.normal(0, 4, shape)
    pixels = np.asarray(image, np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), image.mode)


def _make_one(job: tuple[int, str, str, pathlib.Path]) -> None:
    index, source, cls, out = job
    image = Image.open(source)
    image = image.convert("L" if image.mode in ("L", "I;16", "I") else "RGB")
    _crop_noise(image, np.random.default_rng(index), MEDIAN_SIZE).save(out / cls / f"{index:05d}.jpeg", quality=90)


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
    _run_pool(_make_one, jobs, workers)
    print(f"wrote {count} images into {out}")


def _run_pool(work, jobs: list, workers: int) -> None:
    began = time.perf_counter()
    with Pool(workers) as pool:
        for done, _ in enumerate(pool.imap_unordered(work, jobs, chunksize=16), 1):
            if done % 2000 == 0 or done == len(jobs):
                print(f"{done}/{len(jobs)} images, {time.perf_counter() - began:.0f} s, "
                      f"{done / (time.perf_counter() - began):.1f} images/s", flush=True)


# ChestX-ray14 (NIH): its 14 findings with their image counts among its 112,120 images (60,361 No
# Finding), the images per folder of the download, and the header of Data_Entry_2017.csv as NIH
# writes it (the bracketed names unquoted, so they are two columns each, and a trailing comma).
NIH_FINDINGS = {"Atelectasis": 11559, "Cardiomegaly": 2776, "Consolidation": 4667, "Edema": 2303, "Effusion": 13317,
                "Emphysema": 2516, "Fibrosis": 1686, "Hernia": 227, "Infiltration": 19894, "Mass": 5782,
                "Nodule": 6331, "Pleural_Thickening": 3385, "Pneumonia": 1431, "Pneumothorax": 5302}
NIH_IMAGES, NIH_NO_FINDING, NIH_PATIENTS = 112120, 60361, 30805
NIH_FOLDERS = (4999,) + (10000,) * 10 + (7121,)  # images_001 ... images_012
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_SIZE = (1024, 1024)
PNG_LEVEL = 1  # zlib level 1: 0.06 s an image (level 6: 0.10 s, 11% smaller)


@functools.lru_cache(maxsize=None)
def _gray_source(source: str) -> Image.Image:
    """A real X-ray decoded once per worker (305 of them: about 0.4 GB)."""
    return Image.open(source).convert("L")


def _make_nih_one(job: tuple[int, str, pathlib.Path]) -> None:
    index, source, path = job
    image = _crop_noise(_gray_source(source), np.random.default_rng(index), NIH_SIZE, fast=True)
    image.save(path, compress_level=PNG_LEVEL)


def _nih_findings(rng: np.random.Generator) -> str:
    """'No Finding' at NIH's rate; otherwise each finding independently at its rate among the
    images with a finding (drawn again until there is at least one)."""
    if rng.random() < NIH_NO_FINDING / NIH_IMAGES:
        return "No Finding"
    rates = np.array(list(NIH_FINDINGS.values())) / (NIH_IMAGES - NIH_NO_FINDING)
    while not (found := [n for n, hit in zip(NIH_FINDINGS, rng.random(len(rates)) < rates) if hit]):
        pass
    return "|".join(found)


def make_chestxray14(out: pathlib.Path, count: int, workers: int, test_fraction: float = 0.2) -> None:
    """``count`` 1024x1024 8-bit gray PNGs named ``<patient:08d>_<follow-up:03d>.png`` over
    images_001/images ... images_012/images in NIH's proportions, Data_Entry_2017.csv, and
    patient-disjoint train_val_list.txt / test_list.txt (``test_fraction`` of the patients)."""
    sources = [p for paths in _sources().values() for p in paths]
    rng = np.random.default_rng(0)
    bounds = np.cumsum(NIH_FOLDERS) * count / NIH_IMAGES
    rows, jobs, lists, patient = [], [], {"train_val_list.txt": [], "test_list.txt": []}, 0
    while len(rows) < count:
        patient += 1
        n = min(int(rng.geometric(NIH_PATIENTS / NIH_IMAGES)), count - len(rows))
        age, sex = int(np.clip(rng.normal(47, 17), 1, 95)), "M" if rng.random() < 0.565 else "F"
        split = "test_list.txt" if rng.random() < test_fraction else "train_val_list.txt"
        for follow_up in range(n):
            name = f"{patient:08d}_{follow_up:03d}.png"
            folder = out / f"images_{int(np.searchsorted(bounds, len(rows), side='right')) + 1:03d}" / "images"
            view = "PA" if rng.random() < 0.6 else "AP"
            width, height = int(rng.integers(2000, 3057)), int(rng.integers(2000, 3057))
            spacing = rng.choice(["0.143", "0.139", "0.168"], p=[0.85, 0.1, 0.05])
            rows.append(f"{name},{_nih_findings(rng)},{follow_up},{patient},{age + follow_up // 4},{sex},{view},"
                        f"{width},{height},{spacing},{spacing}")
            jobs.append((len(jobs), str(sources[rng.integers(len(sources))]), folder / name))
            lists[split].append(name)
    for folder in {j[2].parent for j in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    (out / "Data_Entry_2017.csv").write_text("\n".join((NIH_HEADER, *rows)) + "\n")
    for name, names in lists.items():
        (out / name).write_text("\n".join(names) + "\n")
    print(f"{count} rows, {patient} patients, {len(lists['test_list.txt'])} test images; writing the PNGs", flush=True)
    _run_pool(_make_nih_one, jobs, workers)
    print(f"wrote {count} PNGs (zlib level {PNG_LEVEL}) into {out}")


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


PREPARE = ("import sys; from xrayjax.data import DataConfig, load_splits; "
           "s = load_splits(DataConfig(labels=sys.argv[1], data_dir=sys.argv[2], tfds_dir=sys.argv[3]), quiet=True); "
           "print('train/validation/test', len(s.train), len(s.validation), len(s.test))")

READ = ("import sys, time; from xrayjax.data import DataConfig, load_splits; "
        "s = load_splits(DataConfig(labels=sys.argv[1], data_dir=sys.argv[2], tfds_dir=sys.argv[3]), quiet=True); "
        "began = time.perf_counter(); n = 0\n"
        "for split in (s.train, s.validation, s.test):\n"
        "    for i in range(0, len(split.images), 256): n += len(split.images[i:i + 256])\n"
        "print('read', n, 'images at 224 px in', round(time.perf_counter() - began, 2), 's')")


def _nih_subset(data: pathlib.Path, at: pathlib.Path, count: int) -> pathlib.Path:
    """The first ``count`` rows of ``data``'s Data_Entry_2017.csv and lists, in ``at`` (a labels
    file whose images stay in ``data``)."""
    lines = (data / "Data_Entry_2017.csv").read_text().splitlines()[: count + 1]
    at.mkdir(parents=True, exist_ok=True)
    (at / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    kept = {line.split(",", 1)[0] for line in lines[1:]}
    for name in ("train_val_list.txt", "test_list.txt"):
        names = [n for n in (data / name).read_text().split() if n in kept]
        (at / name).write_text("\n".join(names) + "\n")
    return at / "Data_Entry_2017.csv"


def bench_chestxray14(data: pathlib.Path, work: pathlib.Path, epochs: int, count: int | None,
                      train_count: int | None) -> None:
    """Prepare (listing, decode, write) of the first ``count`` rows (default: all) of ``data``'s
    labels file, through ``load_splits`` in a child process; then ``python -m xrayjax.train
    --labels ... --no-eval`` on them (or on the first ``train_count`` rows, prepared first and
    apart) with its timings.json."""
    csv_path = data / "Data_Entry_2017.csv"
    rows = len(csv_path.read_text().splitlines()) - 1
    tfds_dir, py = work / "tfds", sys.executable
    subprocess.run(["rm", "-rf", str(tfds_dir)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    if count and count < rows:
        rows, csv_path = count, _nih_subset(data, work / f"subset_{count}", count)
    prepares = {}
    targets = [(rows, csv_path)]
    if train_count and train_count < rows:
        targets.append((train_count, _nih_subset(data, work / f"subset_{train_count}", train_count)))
    for count, labels in targets:
        wall, rss, tail = measured([py, "-c", PREPARE, str(labels), str(data), str(tfds_dir)])
        prepares[count] = {"wall_s": round(wall, 1), "images_per_s": round(count / wall, 1),
                           "peak_rss_gb": round(rss, 3), "splits": tail.splitlines()[-1]}
        print(f"prepare {count}: {prepares[count]}", flush=True)
    _, _, tail = measured([py, "-c", READ, str(csv_path), str(data), str(tfds_dir)])
    read_s = float(tail.splitlines()[-1].split()[-2])
    print(tail.splitlines()[-1], flush=True)
    count, labels = targets[-1]
    out = work / f"run_{count}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    wall, rss, tail = measured([py, "-m", "xrayjax.train", "--labels", str(labels), "--data-dir", str(data),
                                "--arch", "vgg16", "--init", "random", "--image-size", "32", "--epochs", str(epochs),
                                "--no-eval", "--tfds-dir", str(tfds_dir), "--out", str(out), "--quiet"])
    timings = json.loads((out / "timings.json").read_text())[-1]["phases"]
    record = {
        "kind": "chestxray14_scale", "date": datetime.date.today().isoformat(), "machine": platform.node(),
        "cpus": os.cpu_count(), "images": rows, "image_size_wh": list(NIH_SIZE), "png_level": PNG_LEVEL,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "prepare": {str(k): v for k, v in prepares.items()},
        "read_prepared_224_s": read_s, "read_prepared_224_images_per_s": round(rows / read_s, 1),
        "train": {"images": count, "epochs": epochs, "wall_s": round(wall, 1), "peak_rss_gb": round(rss, 3),
                  "phases_s": {k: round(v, 1) for k, v in timings.items()}},
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
    m.add_argument("--format", choices=("folders", "chestxray14"), default="folders",
                   help="class folders (issue 13) or NIH ChestX-ray14's layout and CSV (issue 21)")
    b = sub.add_parser("bench", help="measure prepare and training on it")
    b.add_argument("--data", type=pathlib.Path, required=True)
    b.add_argument("--work", type=pathlib.Path, required=True, help="where prepared data and runs go")
    b.add_argument("--epochs", type=int, default=2)
    b.add_argument("--format", choices=("folders", "chestxray14"), default="folders")
    b.add_argument("--count", type=int, help="chestxray14: prepare the first N rows only")
    b.add_argument("--train-count", type=int, help="chestxray14: train on the first N rows only")
    args = parser.parse_args()
    if args.command == "make":
        (make_chestxray14 if args.format == "chestxray14" else make)(args.out, args.count, args.workers)
    elif args.format == "chestxray14":
        bench_chestxray14(args.data, args.work, args.epochs, args.count, args.train_count)
    else:
        bench(args.data, args.work, args.epochs)


if __name__ == "__main__":
    main()
