"""Reading ChestX-ray14 for training: TorchXRayVision's ``NIH_Dataset`` and a torch ``DataLoader``
beside xrayjax's prepared records, on the same images and the same machine.

    python experiments/synthetic_data.py make --format chestxray14 --out /tmp/nih2k --count 2000
    python -m venv /tmp/xrv && /tmp/xrv/bin/pip install torch torchvision torchxrayvision
    python experiments/vs_torchxrayvision.py --data /tmp/nih2k --work /tmp/vs_xrv --xrv-python /tmp/xrv/bin/python

TorchXRayVision (``torchxrayvision/datasets.py``) reads each PNG again at every epoch:
``skimage.io.imread``, ``normalize`` to [-1024, 1024] float32, then the transforms its training
script uses (``XRayCenterCrop``, ``XRayResizer(224)``: skimage's anti-aliased resize), in the
DataLoader's worker processes. It is timed over the 1024-px PNGs, and over the same images
resized to 224 px beforehand, as NIH's resized download offers them. xrayjax decodes each image
once (``load_splits`` prepares the labels file: decode, resize, write), then an epoch reads the
prepared records (:func:`xrayjax.data.batches`, one reader thread; uint8, normalized on the
device). Every row is read once per epoch on both sides, in shuffled batches of ``--batch``.
Torch is needed only in the ``--xrv-python`` environment; it is a dependency of nothing.
One ``vs_torchxrayvision`` record is appended to ``experiments/bench.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 11  # xrayjax's epochs over the prepared records (a few hundredths of a second each)


def _flat(data: pathlib.Path, at: pathlib.Path, size: int | None) -> pathlib.Path:
    """NIH's images in one folder, as ``NIH_Dataset`` reads them: links to the PNGs, or copies
    resized to ``size`` (PIL's anti-aliased resize, as NIH's resized download)."""
    from PIL import Image

    at.mkdir(parents=True, exist_ok=True)
    for png in sorted(data.glob("images_*/images/*.png")):
        target = at / png.name
        if target.exists() or target.is_symlink():
            continue
        if size is None:
            target.symlink_to(png)
        else:
            with Image.open(png) as image:
                image.resize((size, size), Image.LANCZOS).save(target)
    return at


def xrv_epoch(images: str, csv: str, batch: int, workers: int) -> dict:
    """One epoch of TorchXRayVision's reader (run in the environment that has torch)."""
    import torch
    import torchvision
    import torchxrayvision as xrv

    began = time.perf_counter()
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
    dataset = xrv.datasets.NIH_Dataset(imgpath=images, csvpath=csv, views=["PA", "AP"], unique_patients=False,
                                       transform=transform)
    opened = time.perf_counter() - began
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    began, n = time.perf_counter(), 0
    for sample in loader:
        n += len(sample["img"])
    wall = time.perf_counter() - began
    assert tuple(sample["img"].shape[1:]) == (1, 224, 224), sample["img"].shape
    return {"images": n, "open_s": round(opened, 2), "epoch_s": round(wall, 2), "images_per_s": round(n / wall, 1),
            "torch": torch.__version__, "torchxrayvision": xrv.__version__}


def xrayjax_epochs(data: pathlib.Path, tfds_dir: pathlib.Path, batch: int) -> dict:
    """Prepare the labels file (timed), then EPOCHS epochs over all its rows' prepared records:
    the first, and the median of the others."""
    import jax
    import numpy as np

    from xrayjax.data import DataConfig, Split, batches, load_splits

    config = DataConfig(labels=str(data / "Data_Entry_2017.csv"), data_dir=str(data), tfds_dir=str(tfds_dir))
    began = time.perf_counter()
    splits = load_splits(config, quiet=True)
    prepared = time.perf_counter() - began
    began = time.perf_counter()
    splits = load_splits(config, quiet=True)
    opened = time.perf_counter() - began
    every = Split.concat([splits.train, splits.validation, splits.test])
    epochs = []
    for epoch in range(EPOCHS):
        began, n = time.perf_counter(), 0
        for b in batches(every, batch, 1, shuffle=True, seed=0, epochs=[epoch]):
            n += int(np.asarray(b["mask"]).sum())
        epochs.append(time.perf_counter() - began)
    assert b["image"].shape[2:] == (224, 224, 1), b["image"].shape
    later = statistics.median(epochs[1:])
    return {"images": n, "prepare_s": round(prepared, 1), "open_s": round(opened, 2),
            "first_epoch_s": round(epochs[0], 3), "epoch_s": round(later, 3), "images_per_s": round(n / later, 1),
            "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, required=True, help="a ChestX-ray14-format folder "
                        "(experiments/synthetic_data.py make --format chestxray14)")
    parser.add_argument("--work", type=pathlib.Path, required=True, help="where flat image folders and "
                        "prepared data go (removed first: xrayjax's prepare is timed from scratch)")
    parser.add_argument("--xrv-python", required=True, help="a Python with torch, torchvision and torchxrayvision")
    parser.add_argument("--batch", type=int, default=64, help="batch size (TorchXRayVision's train script: 64)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader worker processes")
    parser.add_argument("--xrv-epoch", nargs=2, metavar=("IMAGES", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.xrv_epoch:  # the child, in the torch environment
        print(json.dumps(xrv_epoch(*args.xrv_epoch, args.batch, args.workers)))
        return
    subprocess.run(["rm", "-rf", str(args.work / "tfds")], check=True)
    csv = str(args.data / "Data_Entry_2017.csv")
    record = {"kind": "vs_torchxrayvision", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
              "batch": args.batch, "dataloader_workers": args.workers,
              "xrayjax": xrayjax_epochs(args.data, args.work / "tfds", args.batch)}
    print(f"xrayjax: {record['xrayjax']}", flush=True)
    for name, size in (("xrv_1024px_png", None), ("xrv_224px_png", 224)):
        folder = _flat(args.data, args.work / name, size)
        done = subprocess.run([args.xrv_python, __file__, "--data", str(args.data), "--work", str(args.work),
                               "--xrv-python", args.xrv_python, "--batch", str(args.batch), "--workers",
                               str(args.workers), "--xrv-epoch", str(folder), csv],
                              capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        record[name] = json.loads(done.stdout.splitlines()[-1])
        print(f"{name}: {record[name]}", flush=True)
    print(json.dumps(record, indent=2))
    with open(REPO / "experiments" / "bench.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
