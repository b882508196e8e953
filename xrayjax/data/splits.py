"""Splits: what training and evaluation read (their batches: :mod:`xrayjax.data.loader`).

Images stay in the prepared ``array_record`` files: a :class:`Split` holds the labels and
names and a :class:`RecordImages` that reads (and resizes) only the rows a batch asks for, so
host memory does not grow with the dataset. A split without its own folder is held out of
train, stratified: the test split with a fixed seed (the same for every run on the data), the
validation split with the run's seed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xrayjax.data.csv_labels import resolve_uncertain
from xrayjax.data.dataset import DataConfig, Dataset, open_dataset
from xrayjax.data.decode import prepared_size
from xrayjax.data.groups import source_groups
from xrayjax.data.source import DataError
from xrayjax.tasks import SPLITS

if TYPE_CHECKING:
    from xrayjax.data.builder import ImageRecords

TEST_SPLIT_SEED = 0  # the test hold-out does not move with --seed


class SourceLeakWarning(UserWarning):
    """A split given as a folder shares sources (papers, patients) with train."""


class SplitWarning(UserWarning):
    """A held-out split came out empty, or the data differs from a run's recorded splits."""


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
    rows, resizes them and broadcasts gray to 3 channels. :meth:`read` keeps the ``channels``
    the records hold (1 for gray: what batches carry to the device). ``take`` and ``concat``
    make new views without reading anything.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, records: Sequence[ImageRecords], refs: np.ndarray, size: int):
        self.records, self.refs, self.size = tuple(records), np.asarray(refs, np.int64).reshape(-1, 2), size

    @property
    def channels(self) -> int:
        return self.records[0].shape[-1]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.refs), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index) -> np.ndarray:
        if np.ndim(index) == 0 and not isinstance(index, slice):
            return self[np.array([index])][0]
        images = self.read(index)
        return images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)

    def read(self, index) -> np.ndarray:
        """The rows ``index`` (an int array or a slice) as (n, size, size, channels)."""
        refs = self.refs[index]
        out = np.empty((len(refs), *self.records[0].shape), np.uint8)  # the size the records were prepared at
        for file in np.unique(refs[:, 0]):
            at = np.flatnonzero(refs[:, 0] == file)
            for i, image in zip(at, self.records[file].__getitems__(refs[at, 1].tolist())):
                out[i] = image
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
    """uint8 images (N, S, S, 3) (a numpy array or :class:`RecordImages`), labels (int32 (N,), or
    float32 (N, L) for multilabel data, NaN where unknown), the source file names, each image's
    key in the prepared data (``<folder split>/<class>/<file name>``, or ``<split>/<path>`` for a
    labels file: what ``splits.json`` records; empty for images given as an array) and each
    image's patient (labels files; empty when unknown)."""

    images: np.ndarray | RecordImages
    labels: np.ndarray
    names: tuple[str, ...]
    keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape :meth:`read` gives all rows: gray records keep their one channel."""
        images = self.images
        return (*images.shape[:-1], images.channels) if isinstance(images, RecordImages) else images.shape

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The images of ``rows`` as stored (see :attr:`stored_shape`), for the device to broadcast."""
        return self.images.read(rows) if isinstance(self.images, RecordImages) else self.images[rows]

    def take(self, index: np.ndarray) -> Split:
        index = np.asarray(index, np.int64)
        images = self.images.take(index) if isinstance(self.images, RecordImages) else self.images[index]
        return Split(images, self.labels[index], tuple(self.names[i] for i in index),
                     tuple(self.keys[i] for i in index) if self.keys else (),
                     tuple(self.groups[i] for i in index) if self.groups else ())

    @staticmethod
    def concat(parts: Sequence[Split]) -> Split:
        """One split of ``parts`` in order (their images all arrays, or all records)."""
        images = [p.images for p in parts]
        joined = (RecordImages.concat(images) if isinstance(images[0], RecordImages)
                  else np.concatenate(images))
        keys = sum((p.keys for p in parts), ()) if all(p.keys or not len(p) for p in parts) else ()
        groups = sum((p.groups for p in parts), ()) if all(p.groups or not len(p) for p in parts) else ()
        return Split(joined, np.concatenate([p.labels for p in parts]), sum((p.names for p in parts), ()), keys,
                     groups)


@dataclasses.dataclass
class Splits:
    """The three splits of a run, its class names, and the key of the prepared data they come from."""

    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...]
    data_key: str = ""

    def pooled(self) -> Splits:
        """Validation merged into train (cross-validation's final model trains on both)."""
        if not len(self.validation):
            return self
        return dataclasses.replace(self, train=Split.concat([self.train, self.validation]),
                                   validation=self.validation.take(np.zeros(0, np.int64)))

    def record(self) -> dict[str, Any]:
        """What ``splits.json`` holds: the prepared data's key, the class names, and the key of
        every image of each split, in order."""
        return {"data_key": self.data_key, "class_names": list(self.class_names),
                "splits": {name: list(getattr(self, name).keys) for name in SPLITS}}


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
    ``by_source``; multi-label data: whole patients, a row without one its own); ValueError when
    the data cannot make them."""
    from xrayjax.stats import folds  # scikit-learn, only when asked for

    if split.labels.ndim == 2:
        return folds(split.labels, k, seed, patient_groups(split))
    return folds(split.labels, k, seed, source_groups(split.names) if by_source else None)


def load_splits(cfg: DataConfig, dataset: Dataset | None = None, recorded: Mapping[str, Any] | None = None,
                quiet: bool = False, labels: Sequence[str] | None = None) -> Splits:
    """Prepare the data on first use, then split it: as ``recorded`` (a run's ``splits.json``) says,
    or holding out of train each split that has no folder. ``dataset``: the data already listed
    (:func:`open_dataset`), else it is listed here. ``labels``: a labels file's labels to keep, in
    this order (a trained model's outputs), instead of those with a positive in train."""
    from xrayjax.data.builder import is_multilabel, prepare, read_prepared, size_of  # imports tensorflow-datasets

    opened = dataset is None
    dataset = open_dataset(cfg) if opened else dataset
    size = prepared_size(cfg.image_size)
    if recorded is not None and recorded.get("data_key"):  # the size the run's data was prepared at
        size = size_of(recorded["data_key"])
    if dataset.prepared is not None and (stored := dataset.prepared.info.features["image"].shape[0]) < size:
        raise DataError(f"{dataset.prepared.data_dir} holds {stored}-px images; --image-size {cfg.image_size} "
                        f"needs them prepared at {size} px: python -m xrayjax.data prepare --image-size "
                        f"{cfg.image_size}, then pass the folder it prints (or pass the image folders)")
    try:
        builder = dataset.prepared or prepare(dataset.source, dataset.listing, cfg.color, cfg.tfds_dir,
                                              cfg.skip_bad_images, cfg.task, quiet=quiet, image_size=size)
    finally:
        if opened:
            dataset.close()
    names = dataset.class_names
    multilabel = is_multilabel(builder)

    def key_of(split: str, label: Any, name: str) -> str:
        return f"{split}/{name}" if multilabel else f"{split}/{names[label]}/{name}"

    prepared = {split: Split(RecordImages([p.records], np.stack([np.zeros_like(p.positions), p.positions], 1),
                                          cfg.image_size),
                             resolve_uncertain(p.labels, cfg.uncertain) if multilabel else p.labels, p.names,
                             tuple(key_of(split, label, name) for label, name in zip(p.labels, p.names)), p.patients)
                for split, p in read_prepared(builder).items()}
    key = builder.builder_config.name if builder.builder_config is not None else Path(builder.data_dir).parent.name
    if recorded is not None:
        return _recorded_splits(prepared, recorded, names, key)
    if multilabel:
        return _patient_splits(prepared, cfg, names, key, labels)
    train = prepared["train"]
    by_source = cfg.group_by == "source"
    if by_source:
        _warn_leaks(prepared)
    test = prepared.get("test")
    if test is None:
        train, test = stratified_split(train, cfg.test_fraction, TEST_SPLIT_SEED, by_source)
        _warn_if_empty(test, train, cfg.test_fraction, "test")
    validation = prepared.get("validation")
    if validation is None:
        train, validation = stratified_split(train, cfg.val_fraction, cfg.seed, by_source)
        _warn_if_empty(validation, train, cfg.val_fraction, "val")
    return Splits(train, validation, test, names, key)


def _warn_if_empty(held: Split, rest: Split, fraction: float, flag: str) -> None:
    """A fraction > 0 that held out nothing: say why, and which fraction would hold out an image."""
    if fraction == 0 or len(held) or not len(rest):
        return
    largest = int(np.bincount(rest.labels).max())
    workable = next((f / 100 for f in range(5, 100, 5) if 1 <= round(f / 100 * largest) < largest), None)
    fix = (f"pass --{flag}-fraction {workable:.2f} or more" if workable is not None else
           "every class has a single image, so nothing can be held out: add images")
    warnings.warn(f"--{flag}-fraction {fraction:g} held out no image: each class holds out round({fraction:g} x its "
                  f"images) but the largest class has {largest}; {fix}, or give a "
                  f"{'test/' if flag == 'test' else 'val/'} folder", SplitWarning, stacklevel=3)


def _recorded_splits(prepared: Mapping[str, Split], recorded: Mapping[str, Any], class_names: tuple[str, ...],
                     key: str) -> Splits:
    """The splits a run recorded, rebuilt image by image from the prepared data; DataError when a
    recorded image is gone or the classes differ, a warning for images the run never saw."""
    wanted_names = tuple(recorded.get("class_names", ()))
    multilabel = next(iter(prepared.values())).labels.ndim == 2
    if (not set(wanted_names) <= set(class_names)) if multilabel else wanted_names != tuple(class_names):
        raise DataError(f"the data's {'labels' if multilabel else 'classes'} ({', '.join(class_names)}) are not "
                        f"the run's ({', '.join(wanted_names)})")
    pool = Split.concat(list(prepared.values()))
    if multilabel:  # the run's labels, in its order (it may have left some out)
        pool = dataclasses.replace(pool, labels=pool.labels[:, [class_names.index(n) for n in wanted_names]])
    row = {k: i for i, k in enumerate(pool.keys)}
    wanted = {name: recorded["splits"].get(name, []) for name in SPLITS}
    missing = [k for keys in wanted.values() for k in keys if k not in row]
    if missing:
        raise DataError(f"{len(missing)} image(s) of the run's recorded splits are not in the data any more "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): pass the data the run "
                        "was trained on (--data-dir)")
    unseen = sorted(set(row) - {k for keys in wanted.values() for k in keys})
    if unseen:
        warnings.warn(f"{len(unseen)} image(s) of the data are in none of the run's recorded splits and are left "
                      f"out ({', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''})", SplitWarning,
                      stacklevel=3)
    elif recorded.get("data_key") not in (None, key):
        warnings.warn(f"the data was prepared again since the run recorded its splits (key {recorded['data_key']}, "
                      f"now {key}): some of its images were changed or touched; the recorded splits are used",
                      SplitWarning, stacklevel=3)
    parts = {name: pool.take(np.array([row[k] for k in keys], np.int64)) for name, keys in wanted.items()}
    return Splits(parts["train"], parts["validation"], parts["test"], wanted_names, key)


def patient_groups(split: Split) -> list[str]:
    """Each image's patient, a row whose patient is unknown a patient of its own."""
    return [g or f"#{i}" for i, g in enumerate(split.groups or ("",) * len(split))]


def patient_split(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(rest, held_out): whole patients in a seeded order, each held out while the held-out images
    stay within round(fraction * n), so one patient with many images cannot take most of the data
    (a row whose patient is unknown is a patient of its own). When no patient fits, the smallest
    is held out; at least one patient stays."""
    unique, inverse, counts = np.unique(patient_groups(split), return_inverse=True, return_counts=True)
    target = round(fraction * len(split))
    if target == 0 or len(unique) < 2:
        return split, split.take(np.zeros(0, np.int64))
    taken, total = [], 0
    for patient in np.random.default_rng(seed).permutation(len(unique)):
        if total + counts[patient] <= target and len(taken) < len(unique) - 1:
            taken.append(patient)
            total += counts[patient]
    held = np.isin(inverse, taken or [np.argmin(counts)])
    return split.take(np.flatnonzero(~held)), split.take(np.flatnonzero(held))


def _patient_splits(prepared: Mapping[str, Split], cfg: DataConfig, names: tuple[str, ...], key: str,
                    wanted: Sequence[str] | None = None) -> Splits:
    """A labels file's splits: its official test split, else patients held out of train (a fixed
    seed), then validation patients held out of train (the run's seed); the labels with no
    positive in train are left out, named in one warning (``wanted``: these labels instead, in
    this order)."""
    train = prepared["train"]
    test = prepared.get("test")
    if test is None:
        train, test = patient_split(train, cfg.test_fraction, TEST_SPLIT_SEED)
    elif shared := sorted(set(train.groups) & set(test.groups) - {""}):
        warnings.warn(f"the official test split shares {len(shared)} patient(s) with train: "
                      f"{', '.join(shared[:10])}{' ...' if len(shared) > 10 else ''}. They stay where the split puts "
                      "them; the test score may be optimistic", SplitWarning, stacklevel=3)
    train, validation = patient_split(train, cfg.val_fraction, cfg.seed)
    if wanted is not None:
        if lacking := [n for n in wanted if n not in names]:
            raise DataError(f"the labels file lacks the label(s) {', '.join(lacking)} of the run")
        keep = [names.index(n) for n in wanted]
        return Splits(*(dataclasses.replace(s, labels=s.labels[:, keep]) for s in (train, validation, test)),
                      tuple(wanted), key)
    positives = np.nansum(train.labels == 1.0, axis=0)
    known = np.sum(~np.isnan(train.labels), axis=0)
    keep = np.flatnonzero(positives > 0)
    dropped = np.flatnonzero(positives == 0)
    if len(dropped):
        negative = ", ".join(f"{names[i]!r} ({known[i]} known)" for i in dropped if known[i])
        unknown = ", ".join(repr(names[i]) for i in dropped if not known[i])
        reasons = [f"{why}: {which}" for why, which in (("every known value negative", negative),
                                                       ("no known value", unknown)) if which]
        warnings.warn(f"{len(dropped)} label{'s' if len(dropped) > 1 else ''} left out of training (no positive "
                      f"image in the training split): {'; '.join(reasons)}", SplitWarning, stacklevel=3)
    if not len(keep):
        raise DataError("no label has a positive image in the training split: nothing to learn")
    parts = [dataclasses.replace(s, labels=s.labels[:, keep]) for s in (train, validation, test)]
    return Splits(*parts, tuple(names[i] for i in keep), key)


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
