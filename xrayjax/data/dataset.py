"""Which data a run reads, prepared how, split how (:class:`DataConfig`, whose fields carry the
data flags), and finding it once (:func:`open_dataset`): class folders, a labels file, or data
already prepared. Its splits: :mod:`xrayjax.data.splits`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from xrayjax.data.csv_labels import UNCERTAIN
from xrayjax.data.decode import COLORS, IMAGE_SIZE, MAX_IMAGE_SIZE, SIZE_COSTS
from xrayjax.data.source import REPO_DATA_DIR, DataError, Listing, Source, looks_prepared, resolve_source
from xrayjax.flags import coerce_types, field
from xrayjax.tasks import TASKS, canonical_task

GROUP_BY = ("source",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, prepared how, split how. ``data_dir=None``: ../shared/covid_xray.

    ``task`` chooses the challenge's folders (binary: ``two/``); None takes every class.
    ``group_by="source"`` keeps every source group (:func:`xrayjax.data.groups.group_key` of the
    file name) on one side of each held-out split. ``labels``: a labels file
    (:mod:`xrayjax.data.csv_labels`) in place of class folders, read with ``uncertain``, ``views``
    and ``skip_missing``. The one place the data settings are checked: a bad value raises
    DataError naming its flag.
    """

    task: str | None = None
    data_dir: str | None = field(
        None, "the dataset: a folder (or zip) of split folders <split>/<class>/<images> (train/ required, val/ and "
        "test/ optional) or of class folders <class>/<images>; or the challenge's layout (all/ and two/, "
        "Covid_Data_GradientCrescent/ or its zip) (default: ../shared/covid_xray next to the repository); with "
        "--labels, the folder the images sit under (default: the CSV's folder)")
    tfds_dir: str | None = field(None, "where the prepared data lives (default: TFDS' data dir, "
                                 "~/tensorflow_datasets or $TFDS_DATA_DIR)")
    color: str = field("gray", "gray: every image to grayscale (the backbone sees it on its 3 channels), so colour "
                       "mode cannot reveal the class; keep: the original colour modes, like the original Keras "
                       "pipeline", choices=COLORS)
    val_fraction: float = field(0.2, "without a val/ folder: the fraction of train held out for validation, "
                                "stratified (with --labels: whole patients), seeded by --seed, in [0, 1) (0: no "
                                "validation split)")
    test_fraction: float = field(0.2, "without a test/ folder (or a labels file's official test split): the "
                                 "fraction of the data held out for testing, stratified (with --labels: whole "
                                 "patients), always the same images, in [0, 1) (0: no test split)")
    seed: int = 0
    skip_bad_images: bool = field(False, "leave corrupt or truncated images (and files a labels file names that "
                                  "are not images) out, each named in a warning, instead of stopping at the first "
                                  "one; recorded in the prepared data's key")
    image_size: int = field(IMAGE_SIZE, f"input size in pixels, 32 to {MAX_IMAGE_SIZE}. {SIZE_COSTS}", metavar="PX")
    group_by: str | None = field(None, "source: keep every source (a paper, a patient: the audit's grouping of "
                                 "file names) on one side of each held-out split and fold", choices=GROUP_BY)
    labels: str | None = field(
        None, "a labels CSV in place of class folders: ChestX-ray14's Data_Entry_2017.csv, CheXpert's train.csv, "
        "the COVID-19 image data collection's metadata.csv, or a generic CSV (path, then a labels column joined "
        "by | or one 0/1/blank column per label; optional patient); the images sit under --data-dir. Splits keep "
        "each patient on one side", metavar="CSV")
    uncertain: str = field("ignore", "with --labels, what CheXpert's -1 (uncertain) means: ignore (unknown, "
                           "masked out of the loss), zeros or ones (the CheXpert paper's U-Ignore, U-Zeros, U-Ones)",
                           choices=UNCERTAIN)
    views: str | None = field(None, "with --labels, keep only these views (comma-separated, e.g. PA,AP; CheXpert's "
                              "lateral view is L); the rows left out are counted", metavar="LIST")
    skip_missing: bool = field(False, "with --labels, leave out the rows whose image is missing (a partial "
                               "download) instead of stopping")

    def __post_init__(self):
        for name, value in coerce_types(self).items():  # a path as its string, a numpy number as Python's
            object.__setattr__(self, name, value)
        object.__setattr__(self, "task", canonical_task(self.task))
        checks = (
            (self.task in (None, *TASKS), "task", f"one of {', '.join(TASKS)}"),
            (self.labels is None or self.task in (None, "multilabel"), "task",
             "multilabel (or unset) with --labels"),
            (self.labels is not None or self.task != "multilabel", "task",
             "binary or multiclass for class folders (multilabel reads a --labels file)"),
            (self.uncertain in UNCERTAIN, "uncertain", f"one of {', '.join(UNCERTAIN)}"),
            (self.views is None or self.labels is not None, "views",
             "unset without --labels (a labels file's column of views)"),
            (self.group_by is None or self.labels is None, "group_by",
             "unset with --labels (a labels file's splits keep each patient on one side)"),
            (self.color in COLORS, "color", f"one of {', '.join(COLORS)}"),
            (0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)"),
            (0 <= self.test_fraction < 1, "test_fraction", "in [0, 1)"),
            (32 <= self.image_size <= MAX_IMAGE_SIZE, "image_size",
             f"in [32, {MAX_IMAGE_SIZE}] (32: the five stride-2 stages of every backbone)"),
            (self.seed >= 0, "seed", "a non-negative integer"),
            (self.group_by in (None, *GROUP_BY), "group_by", " or ".join(GROUP_BY)),
        )
        for ok, name, allowed in checks:
            if not ok:
                raise DataError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}")


@dataclasses.dataclass
class Dataset:
    """A dataset found and listed once: its files (``source``, ``listing``), or a folder of data
    already prepared (``prepared``, a TFDS builder) given as ``--data-dir``. ``location`` is its
    resolved path."""

    location: str
    class_names: tuple[str, ...]
    source: Source | None = None
    listing: Listing | None = None
    prepared: Any = None

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def open_dataset(cfg: DataConfig) -> Dataset:
    """Find and list the data ``cfg`` reads (nothing decoded): the one listing of a run."""
    if cfg.labels is not None:
        from xrayjax.data.csv_images import csv_listing
        from xrayjax.data.csv_labels import parse_views, read_labels

        table = read_labels(cfg.labels, parse_views(cfg.views))
        source = resolve_source(cfg.data_dir if cfg.data_dir is not None else Path(table.csv).parent)
        listing = csv_listing(source, table, cfg.skip_missing)
        return Dataset(str(source.location), listing.class_names, source=source, listing=listing)
    if cfg.data_dir is not None and looks_prepared(Path(cfg.data_dir).expanduser()):
        from xrayjax.data.builder import class_names, is_multilabel, prepared_builder  # imports tensorflow-datasets

        builder = prepared_builder(Path(cfg.data_dir).expanduser())
        if builder is not None and is_multilabel(builder):
            raise DataError(f"--data-dir {cfg.data_dir} is a labels file's prepared data: pass that --labels CSV "
                            "(and --data-dir the folder its images sit under); its prepared data is reused")
        if builder is not None:
            return Dataset(str(Path(builder.data_dir).resolve()), class_names(builder), prepared=builder)
    source = resolve_source(cfg.data_dir)
    listing = source.listing(cfg.task)
    location = Path(cfg.data_dir).expanduser().resolve() if cfg.data_dir is not None else REPO_DATA_DIR
    return Dataset(str(location), listing.class_names, source=source, listing=listing)
