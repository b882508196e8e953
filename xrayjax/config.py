"""A run's settings: :class:`TrainConfig`, the command line generated from its fields, and
:class:`RunSpec`, the settings resolved once against the data.

Each field carries its help text (and, where the flag is not ``--field-name``, its flag) in
its metadata (:mod:`xrayjax.flags`; the data settings are :class:`xrayjax.data.DataConfig`'s
fields), so defaults and help live in one place: ``python -m xrayjax.train --help`` is built
from this class. :func:`resolve_run` lists the dataset and fills in every default once;
training, evaluation, cross-validation and the Ctrl-C hint all read the :class:`RunSpec` it makes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xrayjax.data import DataConfig, Dataset, Splits, open_dataset
from xrayjax.distributed import DistributedConfig
from xrayjax.flags import ArgumentParser, add_flags, coerce_types, field, same_field
from xrayjax.models import ARCHS, BLOCKS, DROPOUT, default_l2
from xrayjax.optim import LEARNING_RATE
from xrayjax.tasks import TASK_ALIASES, TASKS, canonical_task

MULTI_HOST = "multi-host"
_MULTI_HOST_HELP = (
    "Run the same command on every host, changing only --process-id. Without these flags they "
    "come from the environment (JAX_COORDINATOR_ADDRESS; SLURM's srun and Open MPI 4 give all three; "
    "Open MPI 5 and MPICH give the count and id, so pass --coordinator; Kubernetes and Cloud TPU need "
    "the flags). --batch-size stays global; process 0 writes --out and evaluates; --resume needs its "
    "checkpoint on every host."
)


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run (recorded in ``<out>/config.json``); see each field's help."""

    arch: str = field("vgg16", "backbone", choices=ARCHS)
    task: str | None = field(None, "the head: binary (one sigmoid output, the report's Task 1), multiclass "
                             "(a softmax over the N classes, the report's Task 2 head; four_class is its old "
                             "name) or multilabel (one sigmoid per label of a --labels file) (default: from the "
                             "data: multilabel with --labels, else binary for 2 classes, multiclass for more; on "
                             "the challenge's data binary reads two/)", choices=(*TASKS, *TASK_ALIASES))
    data_dir: str | None = same_field(DataConfig, "data_dir")
    labels: str | None = same_field(DataConfig, "labels")
    uncertain: str = same_field(DataConfig, "uncertain")
    views: str | None = same_field(DataConfig, "views")
    skip_missing: bool = same_field(DataConfig, "skip_missing")
    label_weights: str | None = field(None, "balanced: weigh each label's loss by its positive count n as "
                                      "TorchXRayVision does, max(n) - n + mean(n), scaled to a maximum of 1 "
                                      "(default: every label 1)", choices=("balanced",))
    tfds_dir: str | None = same_field(DataConfig, "tfds_dir")
    color: str = same_field(DataConfig, "color")
    skip_bad_images: bool = same_field(DataConfig, "skip_bad_images")
    val_fraction: float = same_field(DataConfig, "val_fraction")
    test_fraction: float = same_field(DataConfig, "test_fraction")
    group_by: str | None = same_field(DataConfig, "group_by")
    folds: int = field(0, "cross-validate: K >= 2 folds over train+validation (stratified; with --labels, "
                       "of whole patients), a fresh head each "
                       "(features computed once), written to cv.json and cv.png; the final model then trains "
                       "on train+validation (0: off)", metavar="K")
    seeds: int = field(1, "repeat the cross-validation over N seeds (--seed, --seed+1, ...), at least 1",
                       metavar="N")
    image_size: int = same_field(DataConfig, "image_size")
    init: str = field("imagenet", "backbone weights: ported ImageNet weights, or random "
                      "(Keras' initialisers)", choices=("imagenet", "random"))
    weights_dir: str | None = field(None, "folder of <arch>_imagenet_notop.msgpack (default: the repo's weights/)")
    epochs: int = field(30, "epochs to train, at least 1 (with --resume: the total, not the ones to add)")
    batch_size: int = field(32, "global batch size, split over the devices: at least 1, a multiple of "
                            "their number, at most the number of training images")
    lr: float = field(LEARNING_RATE, "Adam learning rate, > 0 (Keras' Adam: beta_1 0.9, beta_2 0.999, epsilon 1e-7)")
    l2: float | None = field(None, "L2 factor on the head's Dense kernels, >= 0 (default: 1e-3, but 0 for "
                             "vgg16 multiclass, as in the report, and for densenet121, as in CheXNet)")
    dropout: float = field(DROPOUT, "head dropout rate, in [0, 1)")
    augment: bool = field(False, "random rotation/shift/zoom of training images (disables feature caching)")
    bf16: bool = field(False, "backbone computes in bfloat16; head and loss stay float32")
    fine_tune: int = field(0, "also train the last N backbone blocks, 0 to the backbone's number of blocks "
                           "(0: backbone frozen)", metavar="N")
    seed: int = field(0, "seed (>= 0) of the initialisation, data order, dropout and validation split")
    out: str | None = field(None, "run folder (default: runs/<arch>_<task>)")
    resume: bool = field(False, "continue the run in --out from its checkpoint")
    quiet: bool = field(False, "no progress bars or messages")
    num_devices: int | None = field(None, "use the first N (>= 1) local devices of each process (default: all)",
                                    metavar="N")
    cache_features: bool = field(True, "run the backbone every step, instead of computing "
                                 "a frozen backbone's features once and training only the head (the default with a "
                                 "frozen backbone and no --augment)", flag="--no-cache-features")
    workers: int = field(0, "reader processes feeding the devices (grain's workers, each reading a slice of the "
                         "steps, the order unchanged; 0: one reader thread in this process). Reading a prepared "
                         "image is a record parse and a copy, so workers pay only where the host has cores to "
                         "spare: on 2 cores they are slower than the thread (experiments/bench.md)", metavar="N")
    evaluate: bool = field(True, "skip the test-set evaluation at the end", flag="--no-eval")
    eval_train: bool = field(False, "the evaluation at the end also scores the train split (its accuracy, and "
                             "train points in tsne.png): free with cached features; with --augment or "
                             "--fine-tune, one more backbone pass over every training image, about an epoch's "
                             "forward time")
    coordinator: str | None = field(None, "address of process 0's host and a free port that every "
                                    "host can reach", metavar="HOST:PORT", group=MULTI_HOST)
    num_processes: int | None = field(None, "how many processes (hosts) take part", metavar="N",
                                      group=MULTI_HOST)
    process_id: int | None = field(None, "this process's id, 0..N-1 (0 writes the run)", metavar="I",
                                   group=MULTI_HOST)
    coordinator_timeout: int = field(DistributedConfig.initialization_timeout, "give up when not every process "
                                     "has joined within S seconds", metavar="S", group=MULTI_HOST)
    heartbeat_timeout: int = field(DistributedConfig.heartbeat_timeout, "stop every process about S seconds after "
                                   "one of them died", metavar="S", group=MULTI_HOST)

    @property
    def fast_path(self) -> bool:
        """Whether the run caches the backbone's features once and trains only the head (a frozen
        backbone, no augmentation, ``cache_features``)."""
        return self.cache_features and self.fine_tune == 0 and not self.augment

    def data_config(self) -> DataConfig:
        """The data settings of this run (DataConfig checks them, naming the flag)."""
        # With --folds the final model trains on train+validation: nothing is held out for validation.
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)}
        return DataConfig(**{**shared, "val_fraction": 0.0 if self.folds else self.val_fraction})

    def data_moved(self, data_dir: str, tfds_dir: str | None = None) -> TrainConfig:
        """This run's settings with its data read from ``data_dir`` (and ``tfds_dir``) instead: a
        labels file that lay in the old data folder is read from its place in the new one, if there."""
        labels = self.labels
        if labels is not None and self.data_dir is not None and Path(labels).is_relative_to(self.data_dir):
            there = Path(data_dir) / Path(labels).relative_to(self.data_dir)
            labels = str(there) if there.is_file() else labels
        return dataclasses.replace(self, data_dir=data_dir, tfds_dir=tfds_dir or self.tfds_dir, labels=labels)

    def resolved(self, class_names: Sequence[str] | None = None) -> TrainConfig:
        """A copy with ``task`` (from ``class_names`` when unset; ``four_class`` read as
        ``multiclass``), ``l2`` and ``out`` filled in and every path absolute, after checking every
        value (the data settings through :meth:`data_config`).

        Raises ValueError naming the flag and its allowed range.
        """
        self = dataclasses.replace(self, **coerce_types(self))  # a copy: the caller's config stays as it is
        task = canonical_task(self.task) or ("multilabel" if self.labels is not None else None if class_names is None
                                             else "binary" if len(class_names) == 2 else "multiclass")
        if task is None:
            raise ValueError("--task is unset: pass it, or the dataset's class names to choose it")
        if task == "binary" and class_names is not None and len(class_names) != 2:
            raise ValueError(f"--task binary needs 2 classes; the data has {len(class_names)} "
                             f"({', '.join(class_names)}): leave --task out, or pass multiclass")
        self.data_config()  # the data settings
        checks = (
            (self.arch in ARCHS, "arch", f"one of {', '.join(ARCHS)}"),
            (self.init in ("imagenet", "random") or (self.init == "keras" and self.resume), "init",
             "imagenet or random (keras: only resuming a Keras model imported by weights/port.py --keras-model)"),
            (0 <= self.fine_tune <= len(BLOCKS.get(self.arch, ())), "fine_tune",
             f"in [0, {len(BLOCKS.get(self.arch, ()))}] for {self.arch}"),
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number"),
            (self.l2 is None or (math.isfinite(self.l2) and self.l2 >= 0), "l2", "a number >= 0"),
            (0 <= self.dropout < 1, "dropout", "in [0, 1)"),
            (self.num_devices is None or self.num_devices >= 1, "num_devices", "at least 1"),
            (self.workers >= 0, "workers", "0 or more"),
            (self.folds == 0 or self.folds >= 2, "folds", "0 (off) or at least 2"),
            (self.seeds >= 1, "seeds", "at least 1"),
            (self.seeds == 1 or self.folds, "seeds", "1 without --folds (it repeats the cross-validation)"),
            (not self.folds or self.fast_path, "folds",
             "0 with --augment, --fine-tune or --no-cache-features (folds train heads on cached features)"),
            (self.label_weights is None or task == "multilabel", "label_weights", "unset without --labels"),
        )
        for ok, name, allowed in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}")

        def absolute(path: str | None) -> str | None:
            return None if path is None else str(Path(path).expanduser().resolve())

        return dataclasses.replace(
            self,
            task=task,
            l2=default_l2(self.arch, task) if self.l2 is None else float(self.l2),
            out=absolute(self.out or str(Path("runs") / f"{self.arch}_{task}")),
            data_dir=absolute(self.data_dir), tfds_dir=absolute(self.tfds_dir), weights_dir=absolute(self.weights_dir),
            labels=absolute(self.labels),
        )


@dataclasses.dataclass
class RunSpec:
    """One run, resolved once: its settings (every default filled in, paths absolute), its
    dataset, listed once (None when :func:`xrayjax.fit` was given its splits), and the
    ``keras_import`` record of the Keras model imported whole that it resumes (else None)."""

    config: TrainConfig
    dataset: Dataset | None
    class_names: tuple[str, ...]
    keras_import: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)


def resolve_run(config: TrainConfig, splits: Splits | None = None) -> RunSpec:
    """List the dataset (unless ``splits`` are given), then resolve ``config`` against its classes.

    Raises ValueError for a bad setting (naming its flag) or a run folder inside the dataset, and
    ``xrayjax.data.DataError`` when the data cannot be found or listed.
    """
    if splits is not None:
        resolved = config.resolved(splits.class_names)
        _check_folder(Path(resolved.out))
        return RunSpec(resolved, None, tuple(splits.class_names))
    config.data_config()  # bad data settings stop before the data is listed
    folders = config.labels is None  # a labels file names its images: a run folder beside them is never read
    if config.out is not None and folders:  # before listing: a run folder inside the data would list as a class
        _check_outside(Path(config.out).expanduser().resolve(), config.data_dir)
    dataset = open_dataset(config.data_config())
    resolved = config.resolved(dataset.class_names)
    if folders:
        _check_outside(Path(resolved.out), dataset.location)
    _check_folder(Path(resolved.out))
    data_dir = resolved.data_dir or dataset.location  # the default dataset, recorded where it was found
    return RunSpec(dataclasses.replace(resolved, data_dir=data_dir), dataset, tuple(dataset.class_names))


def _check_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder; choose a folder (new, or a run's to --resume)")


def _check_outside(out: Path, data_dir: str | None) -> None:
    root = Path(data_dir).expanduser().resolve() if data_dir is not None else None
    if root is not None and root.is_dir() and (out == root or root in out.parents):
        raise ValueError(f"--out {out} is inside the dataset {root}: its files would be read as data; "
                         "choose a run folder outside the dataset")


def parser(prog: str = "python -m xrayjax.train", description: str | None = None) -> argparse.ArgumentParser:
    """The command line of :class:`TrainConfig`: one flag per field, its default and help."""
    p = ArgumentParser(prog=prog, description=description)
    add_flags(p, TrainConfig, groups={MULTI_HOST: p.add_argument_group(MULTI_HOST, _MULTI_HOST_HELP)})
    return p


def from_args(argv: Sequence[str] | None = None, **parser_kw: Any) -> tuple[TrainConfig, frozenset[str]]:
    """Parse the command line into a :class:`TrainConfig` and the names of the fields whose flags
    were given (argparse exits on unknown flags)."""
    given = vars(parser(**parser_kw).parse_args(argv))
    return TrainConfig(**given), frozenset(given)
