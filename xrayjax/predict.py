"""Class probabilities for X-ray image files: ``python -m xrayjax.predict --run DIR IMAGE...``.

Images are decoded exactly as the training data were (``xrayjax.data``: EXIF orientation,
any PIL mode, the run's colour setting, PIL-nearest resize to 224 then to the run's image
size), then run through the model. Binary runs have one logit, the evidence for the second
class name (``normal`` on the challenge's data): its sigmoid is that class's probability and
the first class's is 1 minus it. Four-class runs take a softmax over their N classes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from scipy.special import expit, softmax
from tqdm.auto import tqdm

from xrayjax.cli import run_command
from xrayjax.config import positive_int
from xrayjax.data import DataError, Split, batches
from xrayjax.data.decode import BadImage, NotAnImage, decode
from xrayjax.data.pipeline import resize_nearest
from xrayjax.models import frozen_features, submodule_variables
from xrayjax.preprocessing import preprocess_input
from xrayjax.runfiles import Run, load_run

BATCH_SIZE = 32


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Logits (N, 1) or (N, K) -> class probabilities (N, 2) or (N, K), rows summing to 1.

    One logit means a sigmoid head whose output is P(class 1); column 0 is then 1 - that.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {logits.shape}")
    if logits.shape[1] == 1:
        positive = expit(logits[:, 0])
        return np.stack([1.0 - positive, positive], axis=1)
    return softmax(logits, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def backbone_features(model: nn.Module, variables: Mapping, images: jax.Array) -> jax.Array:
    """The backbone's output feature maps of uint8 images, given a Classifier's variables, computed
    as training computes them (:func:`xrayjax.models.frozen_features`)."""
    return frozen_features(model.backbone, submodule_variables(variables, "backbone"), preprocess_input(images))


def _head_outputs(model: nn.Module, variables: Mapping, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits and the head's sown "embedding" (penultimate activations), inference mode."""
    logits, state = model.head.apply(
        submodule_variables(variables, "head"), features, train=False, mutable=["intermediates"]
    )
    return logits, state["intermediates"]["embedding"][0]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: nn.Module, variables: Mapping, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _head_outputs(model, variables, backbone_features(model, variables, images))


@functools.partial(jax.jit, static_argnums=0)
def _forward_features(
    model: nn.Module, variables: Mapping, features: tuple[jax.Array, ...]
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    logits, embeddings = _head_outputs(model, variables, jnp.concatenate(features))
    ends = np.cumsum([len(f) for f in features])[:-1]
    return tuple(jnp.split(logits, ends)), tuple(jnp.split(embeddings, ends))


def infer(
    model: nn.Module,
    variables: Mapping,
    split: Split,
    batch_size: int = BATCH_SIZE,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the head's penultimate activations ("embedding") for every image of a split.

    Every batch is padded to ``batch_size`` (one compiled shape; the backbone's rounding can
    depend on it), padding dropped; ``desc`` shows a progress bar under that name.
    """
    logits, embeddings = [], []
    for batch in tqdm(batches(split, batch_size, 1, shuffle=False), desc=desc, disable=desc is None,
                      total=-(-len(split) // batch_size), unit="batch"):
        keep = batch["mask"][0] > 0
        out_logits, out_embeddings = _forward(model, variables, batch["image"][0])
        logits.append(np.asarray(out_logits)[keep])
        embeddings.append(np.asarray(out_embeddings)[keep])
    return np.concatenate(logits), np.concatenate(embeddings)


def infer_features(
    model: nn.Module, variables: Mapping, features: Sequence[jax.Array | np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`infer` from backbone feature maps already computed (training's feature cache).

    Only the head runs, once for all the arrays together (one small compilation); returns
    ``(logits, embedding)`` per array, in order.
    """
    logits, embeddings = _forward_features(model, variables, tuple(features))
    return [(np.asarray(lg), np.asarray(em)) for lg, em in zip(logits, embeddings)]


def load_image(path: str | os.PathLike, color: str, image_size: int) -> np.ndarray:
    """One image file -> uint8 (image_size, image_size, 3), as training saw it.

    Raises DataError naming the file when it cannot be read or is not an image.
    """
    try:
        with open(path, "rb") as f:
            pixels = decode(f.read(), color)
    except FileNotFoundError as e:
        raise DataError(f"cannot read the image {os.fspath(path)!r}: no such file") from e
    except (OSError, NotAnImage, BadImage) as e:
        raise DataError(f"cannot read the image {os.fspath(path)!r}: {e}") from e
    rgb = np.broadcast_to(pixels, (*pixels.shape[:2], 3))
    return resize_nearest(rgb[None], image_size)[0]


def predict(
    run: Run, images: Sequence[str | os.PathLike] | np.ndarray, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Class probabilities (N, K), columns in ``run.class_names`` order.

    ``run`` is an ``xrayjax.runfiles.Run`` (``load_run(DIR)``); ``images`` are file paths or
    an already prepared uint8 array (N, S, S, 3) at the run's image size.
    """
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
    return probabilities(logits)


def _table(paths: Sequence[str], probs: np.ndarray, class_names: Sequence[str]) -> str:
    width = max(len("image"), *(len(p) for p in paths))
    cols = [max(len(c), 6) for c in class_names]
    classes = "  ".join(f"{c:>{w}}" for c, w in zip(class_names, cols))
    header = f"{'image':<{width}}  {classes}  predicted"
    rows = [header, "-" * len(header)]
    for path, row in zip(paths, probs):
        cells = "  ".join(f"{p:>{w}.3f}" for p, w in zip(row, cols))
        rows.append(f"{path:<{width}}  {cells}  {class_names[int(row.argmax())]}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print class probabilities per image (a table, or JSON with --json). Every readable
    image is predicted; each unreadable one is named with its reason, and the exit status is 1."""
    parser = argparse.ArgumentParser(
        prog="python -m xrayjax.predict",
        description="Class probabilities of chest X-ray images under a trained run. Any JPEG or "
        "PNG (grayscale, RGB, RGBA, palette, 16-bit, CMYK) is decoded as the training data were.",
    )
    parser.add_argument("--run", required=True,
                        help="run folder written by `python -m xrayjax.train --out DIR`")
    parser.add_argument("--json", action="store_true", help="print JSON: one object per image with "
                        "its probabilities per class and the predicted class")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help=f"inference batch, at least 1 (default {BATCH_SIZE})")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    args = parser.parse_args(argv)

    def body() -> int:
        run = load_run(args.run)
        pixels, paths, failures = [], [], []
        for path in args.images:
            try:
                pixels.append(load_image(path, run.config.color, run.config.image_size))
                paths.append(path)
            except DataError as e:
                failures.append(str(e))
        if paths:
            probs, names = predict(run, np.stack(pixels), args.batch_size), run.class_names
            if args.json:
                print(json.dumps([
                    {"image": path, "probabilities": {c: float(p) for c, p in zip(names, row)},
                     "predicted": names[int(row.argmax())]}
                    for path, row in zip(paths, probs)
                ], indent=2))
            else:
                print(_table(paths, probs, names))
        for failure in failures:
            print(f"error: {failure}", file=sys.stderr)
        if failures:
            print(f"{len(failures)} of {len(args.images)} images could not be read"
                  + ("; the others were predicted" if paths else ""), file=sys.stderr)
        return 1 if failures else 0

    return run_command(body)

if __name__ == "__main__":
    raise SystemExit(main())
