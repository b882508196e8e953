"""Tiny synthetic data, run settings and tree comparisons shared by the training tests."""

import jax
import numpy as np
import pytest

from xrayjax.config import TrainConfig
from xrayjax.data import Split, Splits

SIZE = 32


def _split(rng: np.random.Generator, n: int, classes: int) -> Split:
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.int32)
    return Split(images, labels, tuple(f"img{i}.png" for i in range(n)))


class CountingImages:
    """An image array that counts the rows read from it (a Split's ``images``)."""

    def __init__(self, images: np.ndarray):
        self.array, self.read = images, 0
        self.shape = images.shape

    def __getitem__(self, index):
        self.read += len(index)
        return self.array[index]


def tiny_splits(task: str, n_train: int = 10) -> Splits:
    """10 train, 6 validation and 4 test random images, of 2 classes for binary, else 4."""
    rng = np.random.default_rng(0)
    classes = 2 if task == "binary" else 4
    names = ("covid", "normal") if task == "binary" else ("covid", "normal", "pneumonia_bac", "pneumonia_vir")
    return Splits(_split(rng, n_train, classes), _split(rng, 6, classes), _split(rng, 4, classes), names)


def tiny_config(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(arch="vgg16", task="binary", init="random", image_size=SIZE, epochs=2,
                batch_size=4, out=str(tmp_path / name), quiet=True, evaluate=False)
    return TrainConfig(**{**base, **kw})


def flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_close(a, b, tol: float) -> None:
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in a:
        scale = max(1.0, float(np.max(np.abs(a[k]))))
        assert np.max(np.abs(a[k] - b[k])) <= tol * scale, k


def assert_history_close(h1, h2, tol: float) -> None:
    assert len(h1) == len(h2)
    for e1, e2 in zip(h1, h2):
        assert e1.keys() == e2.keys()
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            if key in e1:
                assert e1[key] == pytest.approx(e2[key], rel=tol, abs=tol), key


def without_seconds(history: list[dict]) -> list[dict]:
    """A history's epochs without their wall-clock ``seconds``, the one entry that differs between equal runs."""
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]
