"""Splits in memory and global batches for pmap: what training and evaluation consume."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from xrayjax.data.augment import augment_images
from xrayjax.data.decode import COLORS, IMAGE_SIZE
from xrayjax.data.source import CLASS_NAMES, DataError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, prepared how, split how. ``data_dir=None``: ../shared/covid_xray."""

    task: str = "four_class"
    data_dir: str | None = None
    tfds_dir: str | None = None
    color: str = "gray"
    val_fraction: float = 0.2
    seed: int = 0
    skip_bad_images: bool = False
    image_size: int = IMAGE_SIZE

    def __post_init__(self):
        if self.task not in CLASS_NAMES:
            raise DataError(f"unknown task {self.task!r}: choose one of {', '.join(CLASS_NAMES)}")
        if self.color not in COLORS:
            raise DataError(f"unknown color {self.color!r}: choose one of {', '.join(COLORS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.image_size < 1:
            raise DataError(f"image_size must be positive, got {self.image_size}")


@dataclasses.dataclass
class Split:
    """uint8 images (N, S, S, 3), int32 labels (N,), and the source file names."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index], tuple(self.names[i] for i in index))


@dataclasses.dataclass
class Splits:
    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...]


def stratified_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held_out): round(fraction * n_c) images of each class held out, seeded."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        n_held = min(int(round(fraction * len(members))), len(members) - 1)
        held.extend(rng.permutation(members)[:n_held])
    held_mask = np.zeros(len(split), bool)
    held_mask[np.asarray(held, dtype=np.int64)] = True
    return split.take(np.flatnonzero(~held_mask)), split.take(np.flatnonzero(held_mask))


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (N, H, W, C) to (N, size, size, C), PIL's sampling grid."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return images[:, rows][:, :, cols]


def load_splits(cfg: DataConfig) -> Splits:
    """Prepare the TFDS data on first use, read it back and split validation off train."""
    from xrayjax.data.builder import prepare, read_prepared  # imports tensorflow-datasets

    builder = prepare(cfg.task, cfg.color, cfg.data_dir, cfg.tfds_dir, cfg.skip_bad_images)
    prepared = {
        name: Split(resize_nearest(p.images, cfg.image_size), p.labels, p.names)
        for name, p in read_prepared(builder).items()
    }
    train, validation = stratified_split(prepared["train"], cfg.val_fraction, cfg.seed)
    return Splits(train, validation, prepared["test"], CLASS_NAMES[cfg.task])


def _batch_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def batches(split: Split, batch_size: int, num_devices: int, *, shuffle: bool, seed: int = 0,
            epoch: int = 0, augment: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Global batches {"image", "label", "mask"} shaped (D, B/D, ...); last batch padded, mask 0."""
    if batch_size < 1 or num_devices < 1 or batch_size % num_devices:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of num_devices ({num_devices})"
        )
    n = len(split)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_device = batch_size // num_devices
    shape = split.images.shape[1:]
    for index, start in enumerate(range(0, n, batch_size)):
        take = order[start:start + batch_size]
        real = split.images[take]
        if augment:
            real = augment_images(real, _batch_seed(seed, epoch, index))
        image = np.zeros((batch_size, *shape), np.uint8)
        label = np.zeros(batch_size, np.int32)
        mask = np.zeros(batch_size, np.float32)
        image[:len(take)], label[:len(take)], mask[:len(take)] = real, split.labels[take], 1.0
        yield {
            "image": image.reshape(num_devices, per_device, *shape),
            "label": label.reshape(num_devices, per_device),
            "mask": mask.reshape(num_devices, per_device),
        }
