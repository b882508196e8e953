"""Splits and global batches for pmap: what training and evaluation consume.

Images stay in the prepared ``array_record`` files: a :class:`Split` holds the labels and
names and a :class:`RecordImages` that reads (and resizes) only the rows a batch asks for, so
host memory does not grow with the dataset. A split without its own folder is held out of
train, stratified: the test split with a fixed seed (the same for every run on the data), the
validation split with the run's seed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from xrayjax.data.audit import group_key
from xrayjax.data.augment import augment_images
from xrayjax.data.decode import COLORS, IMAGE_SIZE
from xrayjax.data.source import TASKS, DataError, resolve_source

TEST_SPLIT_SEED = 0  # the test hold-out does not move with --seed
GROUP_BY = ("source",)


class SourceLeakWarning(UserWarning):
    """A split given as a folder shares sources (papers, patients) with train."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, prepared how, split how. ``data_dir=None``: ../shared/covid_xray.

    ``task`` chooses the challenge's folders (binary: ``two/``); None takes every class.
    ``group_by="source"`` keeps every source group (:func:`xrayjax.data.audit.group_key` of the
    file name) on one side of each held-out split.
    """

    task: str | None = None
    data_dir: str | None = None
    tfds_dir: str | None = None
    color: str = "gray"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    skip_bad_images: bool = False
    image_size: int = IMAGE_SIZE
    group_by: str | None = None

    def __post_init__(self):
        if self.task is not None and self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.color not in COLORS:
            raise DataError(f"unknown color {self.color!r}: choose one of {', '.join(COLORS)}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise DataError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.image_size < 1:
            raise DataError(f"image_size must be positive, got {self.image_size}")
        if self.group_by is not None and self.group_by not in GROUP_BY:
            raise DataError(f"unknown group_by {self.group_by!r}: choose {', '.join(GROUP_BY)}")


def resize_nearest(images: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of (N, H, W, C) to (N, size, size, C), PIL's sampling grid."""
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return images[:, rows][:, :, cols]


class RecordImages:
    """uint8 images (N, size, size, 3) read on demand from prepared record files.

    ``refs`` holds (record file, row) pairs; indexing with an int array or a slice reads those
    rows, broadcasts gray to 3 channels and resizes them. ``take`` and ``concat`` make new
    views without reading anything.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, records: Sequence[Sequence], refs: np.ndarray, size: int):
        self.records, self.refs, self.size = tuple(records), np.asarray(refs, np.int64).reshape(-1, 2), size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.refs), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index) -> np.ndarray:
        refs = self.refs[index]
        if refs.ndim == 1:
            return self[np.array([index])][0]
        out = np.empty((len(refs), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for file in np.unique(refs[:, 0]):
            at = np.flatnonzero(refs[:, 0] == file)
            for i, record in zip(at, self.records[file].__getitems__(refs[at, 1].tolist())):
                out[i] = record["image"]  # broadcasts a gray channel to 3
        return resize_nearest(out, self.size)

    def take(self, index: np.ndarray) -> RecordImages:
        return RecordImages(self.records, self.refs[index], self.size)

    @staticmethod
    def concat(parts: Sequence[RecordImages]) -> RecordImages:
        records, refs = [], []
        for part in parts:
            refs.append(part.refs + np.array([len(records), 0]))
            records.extend(part.records)
        return RecordImages(records, np.concatenate(refs), parts[0].size)


@dataclasses.dataclass
class Split:
    """uint8 images (N, S, S, 3) (a numpy array or :class:`RecordImages`), int32 labels (N,), and
    the source file names."""

    images: np.ndarray | RecordImages
    labels: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        index = np.asarray(index, np.int64)
        images = self.images.take(index) if isinstance(self.images, RecordImages) else self.images[index]
        return Split(images, self.labels[index], tuple(self.names[i] for i in index))

    @staticmethod
    def concat(parts: Sequence[Split]) -> Split:
        """One split of ``parts`` in order (their images all arrays, or all records)."""
        images = [p.images for p in parts]
        joined = (RecordImages.concat(images) if isinstance(images[0], RecordImages)
                  else np.concatenate(images))
        return Split(joined, np.concatenate([p.labels for p in parts]), sum((p.names for p in parts), ()))


@dataclasses.dataclass
class Splits:
    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...]

    def pooled(self) -> Splits:
        """Validation merged into train (cross-validation's final model trains on both)."""
        if not len(self.validation):
            return self
        return Splits(Split.concat([self.train, self.validation]), self.validation.take(np.zeros(0, np.int64)),
                      self.test, self.class_names)


def source_groups(names: Sequence[str]) -> list[str]:
    """The source group of each file name (a paper, a patient; see ``group_key``)."""
    return [group_key(name) for name in names]


def stratified_split(split: Split, fraction: float, seed: int, by_source: bool = False) -> tuple[Split, Split]:
    """(rest, held_out): round(fraction * n_c) images of each class held out, seeded. With
    ``by_source``, whole source groups: one fold of round(1 / fraction) stratified group folds
    (20% holds out a fifth, 30% a third: the fraction is approximate)."""
    if fraction == 0:
        return split, split.take(np.zeros(0, np.int64))
    if by_source:
        from xrayjax.stats import hold_out  # scikit-learn, only when asked for

        held = hold_out(split.labels, fraction, seed, source_groups(split.names))
    else:
        rng = np.random.default_rng(seed)
        held = []
        for label in np.unique(split.labels):
            members = np.flatnonzero(split.labels == label)
            n_held = min(int(round(fraction * len(members))), len(members) - 1)
            held.extend(rng.permutation(members)[:n_held])
    held_mask = np.zeros(len(split), bool)
    held_mask[np.asarray(held, dtype=np.int64)] = True
    rest = split.take(np.flatnonzero(~held_mask))
    if by_source and set(np.unique(split.labels)) - set(np.unique(rest.labels)):
        raise DataError(f"holding out {fraction:.0%} by source leaves a class without training images (its "
                        "images all share few sources): pass a smaller fraction, or leave --group-by out")
    return rest, split.take(np.flatnonzero(held_mask))


def split_folds(split: Split, k: int, seed: int, by_source: bool = False) -> list[np.ndarray]:
    """The held-out rows of each of ``k`` stratified folds of ``split`` (whole sources with
    ``by_source``); ValueError when the data cannot make them."""
    from xrayjax.stats import folds  # scikit-learn, only when asked for

    return folds(split.labels, k, seed, source_groups(split.names) if by_source else None)


def dataset_classes(cfg: DataConfig) -> tuple[str, ...]:
    """The class names of the data ``cfg`` reads, from its folders (nothing decoded); without
    the default dataset at hand, from the data prepared from it."""
    try:
        return resolve_source(cfg.data_dir).listing(cfg.task).class_names
    except DataError:
        if cfg.data_dir is not None:
            raise
    from xrayjax.data.builder import class_names, prepare  # imports tensorflow-datasets

    return class_names(prepare(None, cfg.color, cfg.tfds_dir, task=cfg.task))


def load_splits(cfg: DataConfig) -> Splits:
    """Prepare the data on first use, then split: a split without a folder is held out of train."""
    from xrayjax.data.builder import class_names, prepare, read_prepared  # imports tensorflow-datasets

    builder = prepare(cfg.data_dir, cfg.color, cfg.tfds_dir, cfg.skip_bad_images, cfg.task)
    prepared = {name: Split(RecordImages([p.records], np.stack([np.zeros_like(p.positions), p.positions], 1),
                                         cfg.image_size), p.labels, p.names)
                for name, p in read_prepared(builder).items()}
    train = prepared["train"]
    by_source = cfg.group_by == "source"
    if by_source:
        _warn_leaks(prepared)
    test = prepared.get("test")
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, TEST_SPLIT_SEED, by_source)
    validation = prepared.get("validation")
    if validation is None:
        train, validation = stratified_split(train, cfg.val_fraction, cfg.seed, by_source)
    return Splits(train, validation, test, class_names(builder))


def _warn_leaks(prepared: dict[str, Split]) -> None:
    """Warn once per given split that shares source groups with train; nothing is moved."""
    train = set(source_groups(prepared["train"].names))
    for name, split in prepared.items():
        shared = sorted(train & set(source_groups(split.names))) if name != "train" else []
        if shared:
            warnings.warn(
                f"the {name} split given as a folder shares {len(shared)} source group(s) with train: "
                f"{', '.join(shared[:10])}{' ...' if len(shared) > 10 else ''}. Its images stay where they "
                f"are; its score may be optimistic (see `python -m xrayjax.data audit`).",
                SourceLeakWarning, stacklevel=3)


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
