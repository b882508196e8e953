"""Class probabilities for X-ray image files: ``python -m xrayjax.predict --run DIR IMAGE...``.

Images are decoded exactly as the training data were (``xrayjax.data``: EXIF orientation, any
PIL mode, the run's colour setting, PIL-nearest resize to the prepared size, 224 or the run's
image size above it, then to the run's image size), then run through the model
(:mod:`xrayjax.inference`). Binary runs have one logit, the evidence for the second class name
(``normal`` on the challenge's data): its sigmoid is that class's probability and the first
class's is 1 minus it. Multiclass runs take a softmax over their N classes. Multilabel runs
give each label's own sigmoid and whether it passes the label's threshold (chosen on validation
by the run's evaluation, in ``metrics.json``; 0.5 before the run is evaluated). ``--json``
prints a list, one object per image in input order: ``{"image", "probabilities", "predicted"}``
(multilabel: ``{"image", "probabilities", "thresholds", "positive"}``, keyed by label name), or
``{"image", "error"}`` for an unreadable one.
"""

from __future__ import annotations

from xrayjax.cli import quiet_interrupts, run_command

if __name__ == "__main__":
    quiet_interrupts()  # the imports below take seconds

import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xrayjax.data import DataError, Split
from xrayjax.data.decode import BadImage, NotAnImage, decode, prepared_size
from xrayjax.data.source import IMAGE_SUFFIXES, SourceFile
from xrayjax.data.splits import resize_nearest
from xrayjax.flags import ArgumentParser, positive_int
from xrayjax.inference import BATCH_SIZE, infer, positive_labels, probabilities
from xrayjax.runfiles import METRICS_FILE, Run, load_run, read_json
from xrayjax.runlock import in_use


def load_image(path: str | os.PathLike, color: str, image_size: int) -> np.ndarray:
    """One image file -> uint8 (image_size, image_size, 3), as training saw it.

    Raises DataError naming the file when it cannot be read or is not an image.
    """
    try:
        with open(path, "rb") as f:
            pixels = decode(f.read(), color, prepared_size(image_size))
    except FileNotFoundError as e:
        raise DataError(f"cannot read the image {os.fspath(path)!r}: no such file") from e
    except IsADirectoryError as e:
        raise DataError(f"{os.fspath(path)!r} is a folder without image files "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})") from e
    except (OSError, NotAnImage, BadImage) as e:
        raise DataError(f"cannot read the image {os.fspath(path)!r}: {e}") from e
    rgb = np.broadcast_to(pixels, (*pixels.shape[:2], 3))
    return resize_nearest(rgb[None], image_size)[0]


def image_files(paths: Sequence[str]) -> list[str]:
    """``paths`` with each folder replaced by the image files under it, sorted, as the data lister
    reads a folder: by suffix, without junk, hidden files and folders, or ``__MACOSX``; a folder
    without any stays, to be named as unreadable."""
    files = []
    for path in paths:
        found = []
        if os.path.isdir(path):
            for file in sorted(Path(path).rglob("*")):
                parts = file.relative_to(path).parts
                if (file.is_file() and SourceFile("/".join(parts), 0).is_image_name
                        and not any(p.startswith(".") or p == "__MACOSX" for p in parts)):
                    found.append(str(file))
        files += found or [path]
    return files


def predict(
    run: Run, images: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Class probabilities (N, K), columns in ``run.class_names`` order (multilabel: each
    label's probability).

    ``run`` is an ``xrayjax.runfiles.Run`` (``load_run(DIR)``); ``images`` are file paths (one path
    alone is one image) or an already prepared uint8 array (N, S, S, 3) at the run's image size.
    """
    if isinstance(images, (str, os.PathLike)):  # a string is a sequence too: of characters
        images = [images]
    if isinstance(images, np.ndarray):
        pixels = images
    else:
        pixels = np.stack([load_image(p, run.config.color, run.config.image_size) for p in images])
    expected = (run.config.image_size, run.config.image_size, 3)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != expected:
        raise ValueError(
            f"images must be uint8 (N, {', '.join(map(str, expected))}), "
            f"got {pixels.dtype} {pixels.shape}"
        )
    names = tuple(f"#{i}" for i in range(len(pixels)))
    split = Split(pixels, np.zeros(len(pixels), np.int32), names)
    logits, _ = infer(run.model, run.variables, split, min(batch_size, len(split)))
    return probabilities(logits, multilabel=run.config.task == "multilabel")


def thresholds(run: Run) -> tuple[np.ndarray, str]:
    """A multilabel run's per-label thresholds and where they come from: its evaluation's
    (metrics.json, chosen on validation), or 0.5 each before it is evaluated."""
    path = run.run_dir / METRICS_FILE
    if path.is_file():
        per_label = read_json(path).get("per_label", {})
        if set(per_label) == set(run.class_names):
            return np.array([per_label[n]["threshold"] for n in run.class_names]), f"from {path}"
    return np.full(len(run.class_names), 0.5), "0.5 (the run is not evaluated yet: python -m xrayjax.evaluate)"


def _table(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
           cut: np.ndarray | None = None) -> str:
    """One row per image; the predicted class, or (``cut``: per-label thresholds) the labels
    passing theirs."""
    width = max(len("image"), *(len(p) for p in paths))
    cols = [max(len(c), 6) for c in class_names]
    classes = "  ".join(f"{c:>{w}}" for c, w in zip(class_names, cols))
    header = f"{'image':<{width}}  {classes}  {'predicted' if cut is None else 'positive'}"
    rows = [header, "-" * len(header)]
    for path, row in zip(paths, probs):
        cells = "  ".join(f"{p:>{w}.3f}" for p, w in zip(row, cols))
        chosen = (", ".join(positive_labels(class_names, row, cut)) or "none") if cut is not None \
            else class_names[int(row.argmax())]
        rows.append(f"{path:<{width}}  {cells}  {chosen}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print class probabilities per image (a table, or JSON with --json). Every readable
    image is predicted; each unreadable one is named with its reason (on stderr, and in the JSON),
    and the exit status is 1."""
    parser = ArgumentParser(
        prog="python -m xrayjax.predict",
        description="Class probabilities of chest X-ray images under a trained run. Any JPEG or "
        "PNG (grayscale, RGB, RGBA, palette, 16-bit, CMYK) is decoded as the training data were.",
    )
    parser.add_argument("--run", required=True,
                        help="run folder written by `python -m xrayjax.train --out DIR`")
    parser.add_argument("--json", action="store_true", help="print JSON: one object per image, in "
                        "order, with its probabilities per class and the predicted class (multilabel: each "
                        "label's threshold and the positive labels), or its error")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help=f"inference batch, at least 1 (default {BATCH_SIZE})")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders: the image files "
                        "under them (by suffix), sorted")
    args = parser.parse_args(argv)

    def body() -> int:
        run = load_run(args.run)
        holder = in_use(Path(args.run))
        if holder is not None:
            warnings.warn(f"the run in {args.run} is in use by {holder} (training or evaluating it): predicting "
                          f"with its checkpoint after epoch {len(run.history)}")
        images = image_files(args.images)
        pixels, failures = {}, {}  # keyed by position in images
        for i, path in enumerate(images):
            try:
                pixels[i] = load_image(path, run.config.color, run.config.image_size)
            except DataError as e:
                failures[i] = str(e)
        names = run.class_names
        probs = dict(zip(pixels, predict(run, np.stack(list(pixels.values())), args.batch_size))) if pixels else {}
        cut, source = thresholds(run) if run.config.task == "multilabel" else (None, "")

        def result(i: int) -> dict:
            by_name = {c: float(p) for c, p in zip(names, probs[i])}
            if cut is None:
                return {"probabilities": by_name, "predicted": names[int(probs[i].argmax())]}
            return {"probabilities": by_name, "thresholds": dict(zip(names, map(float, cut))),
                    "positive": positive_labels(names, probs[i], cut)}

        if args.json:
            print(json.dumps([{"image": path, "error": failures[i]} if i in failures else {"image": path, **result(i)}
                              for i, path in enumerate(images)], indent=2))
        elif probs:
            print(_table([images[i] for i in probs], np.stack(list(probs.values())), names, cut))
            if cut is not None:
                print(f"positive: a probability at or above its label's threshold, {source}")
        for failure in failures.values():
            print(f"error: {failure}", file=sys.stderr)
        if failures:
            print(f"{len(failures)} of {len(images)} images could not be read"
                  + ("; the others were predicted" if probs else ""), file=sys.stderr)
        return 1 if failures else 0

    return run_command(body)

if __name__ == "__main__":
    raise SystemExit(main())
