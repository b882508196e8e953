"""The tensorflow-datasets builder ``covid_xray``, written and read without TensorFlow.

Configs: ``binary`` and ``four_class`` (grayscale, the default) and ``binary_keep`` and
``four_class_keep`` (``--color keep``), so the colour policy is part of what names the
prepared data and one never stands in for the other. Files: ``array_record``, read back with
``tfds.data_source`` (random access). Each example holds the 224x224 pixels as a raw uint8
``tfds.features.Tensor`` (1 channel for gray, 3 for keep): without TensorFlow, TFDS can write
and read that with numpy alone and loading needs no image decoding at all. The raw data is
found through TFDS' manual-dir convention (``manual_dir`` = the ``--data-dir`` path: any form
:func:`xrayjax.data.source.resolve_source` accepts, the zip included).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from xrayjax.data.decode import COLORS, IMAGE_SIZE, BadImage, NotAnImage, decode
from xrayjax.data.source import (
    CLASS_NAMES, SOURCE_SPLITS, TASKS, DataError, Source, TaskFile, resolve_source,
)

NAME = "covid_xray"
FILE_FORMAT = "array_record"


class BadImageWarning(UserWarning):
    """A corrupt image was skipped because ``skip_bad_images`` is set."""


def config_name(task: str, color: str) -> str:
    """The builder config for a task and colour policy (``four_class``, ``four_class_keep``...)."""
    if task not in CLASS_NAMES:
        raise DataError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if color not in COLORS:
        raise DataError(f"unknown color {color!r}: choose one of {', '.join(COLORS)}")
    return task if color == "gray" else f"{task}_{color}"


@dataclasses.dataclass
class CovidXrayConfig(tfds.core.BuilderConfig):
    """A task (which folders and classes) and a colour policy."""

    task: str = "four_class"
    color: str = "gray"


class CovidXray(tfds.core.GeneratorBasedBuilder):
    """COVID-19 / normal / bacterial / viral pneumonia chest X-rays at 224x224."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pixels resized once to 224x224 (PIL nearest), raw uint8."}
    BUILDER_CONFIGS = [
        CovidXrayConfig(
            name=config_name(task, color), task=task, color=color,
            description=f"{task}: {', '.join(CLASS_NAMES[task])}; color={color}",
        )
        for task in TASKS for color in COLORS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download Covid_Data_GradientCrescent.zip and pass it (or the folder it extracts to, "
        "or the folder holding all/ and two/) as the manual dir: "
        "`python -m xrayjax.data prepare --data-dir PATH`."
    )
    # Nothing is downloaded, so there are no URL checksums to look up; TFDS' lookup would
    # otherwise need the optional importlib_resources package.
    url_infos = None

    def __init__(self, *, skip_bad_images: bool = False, workers: int | None = None,
                 source_path: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.skip_bad_images = skip_bad_images
        self.source_path = source_path
        self.workers = workers or min(8, os.cpu_count() or 1)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        channels = 1 if cfg.color == "gray" else 3
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(
                    shape=(IMAGE_SIZE, IMAGE_SIZE, channels), dtype=np.uint8,
                    encoding=tfds.features.Encoding.BYTES,
                ),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES[cfg.task]),
                "name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        # TFDS' manual dir must be a folder; a zip given by path is read through source_path.
        source = resolve_source(self.source_path or dl_manager.manual_dir)
        listing = source.task_listing(self.builder_config.task)
        self.info.metadata.update(
            source=str(source), fingerprint=listing.fingerprint,
            junk=list(listing.junk), ignored=list(listing.ignored),
            not_images=[], bad_images=[],
        )
        return {
            split: self._generate_examples(source, [t for t in listing.files if t.split == split])
            for split in SOURCE_SPLITS
        }

    def _generate_examples(self, source: Source, files: Sequence[TaskFile]) -> Iterator:
        color = self.builder_config.color

        def work(task_file: TaskFile) -> tuple[str, object]:
            try:
                return "ok", decode(source.read(task_file.file), color)
            except NotAnImage:
                return "junk", None
            except (BadImage, DataError) as err:  # corrupt, or unreadable (e.g. a dangling symlink)
                return "bad", err

        # PIL releases the GIL while decoding and resizing, so threads use every core.
        with ThreadPoolExecutor(self.workers) as pool:
            for task_file, (status, value) in zip(files, pool.map(work, files)):
                where = source.describe(task_file.file)
                if status == "junk":
                    self.info.metadata["not_images"].append(task_file.file.member)
                elif status == "bad":
                    if not self.skip_bad_images:
                        raise DataError(
                            f"{where}: unreadable, corrupt or truncated image ({value}). Replace or "
                            f"delete the file, or pass --skip-bad-images to leave it out."
                        )
                    reason = value if isinstance(value, DataError) else f"{where}: {value}"  # names it
                    warnings.warn(f"skipping {reason}", BadImageWarning, stacklevel=2)
                    self.info.metadata["bad_images"].append(task_file.file.member)
                else:
                    yield task_file.file.member, {
                        "image": value, "label": task_file.label, "name": task_file.file.name,
                    }


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One prepared split, sorted by (label, name): pixels, labels and file names."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]


def make_builder(task: str, color: str = "gray", tfds_dir: str | None = None,
                 skip_bad_images: bool = False, source_path: str | None = None) -> CovidXray:
    """The builder of one config, writing array_record under ``tfds_dir`` (None: TFDS' own)."""
    return CovidXray(
        config=config_name(task, color), data_dir=tfds_dir, file_format=FILE_FORMAT,
        skip_bad_images=skip_bad_images, source_path=source_path,
    )


def prepare(task: str, color: str = "gray", data_dir: str | None = None,
            tfds_dir: str | None = None, skip_bad_images: bool = False) -> CovidXray:
    """Prepare one config unless it already is (from the same source); return its builder.

    Prepared data made from another copy of the dataset (different files or sizes) is an
    error, never silently reused. With ``data_dir=None`` and no dataset at the default place,
    data already prepared is used as it is.
    """
    builder = make_builder(task, color, tfds_dir, skip_bad_images)
    try:
        source = resolve_source(data_dir)
    except DataError:
        if data_dir is None and builder.is_prepared():
            return builder
        raise
    if builder.is_prepared():
        stored = builder.info.metadata.get("fingerprint")
        current = source.task_listing(task).fingerprint
        if stored != current:
            raise DataError(
                f"{builder.data_dir} holds {builder.builder_config.name} prepared from other files "
                f"(names or sizes) than {source} holds now (it was prepared from "
                f"{builder.info.metadata.get('source')}). Delete that folder to prepare again, or pass "
                f"another --tfds-dir."
            )
        return builder
    builder.source_path = str(source.location)
    manual_dir = source.location.parent if source.is_zip else source.location
    config_dir = Path(builder.data_dir).parent
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        with open(config_dir / ".prepare.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process preparing this config: wait for it
            waited = make_builder(task, color, tfds_dir, skip_bad_images)
            if waited.is_prepared():  # the other process prepared it meanwhile
                return waited
            for stale in config_dir.glob("incomplete.*"):  # left by an interrupted prepare
                shutil.rmtree(stale, ignore_errors=True)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)),
            )
    except PermissionError as err:
        raise DataError(f"cannot write the prepared data into {builder.data_dir_root} ({err.strerror}): "
                        "pass a writable --tfds-dir") from err
    return builder


def read_prepared(builder: CovidXray) -> dict[str, Prepared]:
    """Read every split of a prepared config through ``tfds.data_source`` (random access)."""
    cfg = builder.builder_config
    out = {}
    for split in SOURCE_SPLITS:
        source = tfds.data_source(
            f"{NAME}/{cfg.name}", split=split, data_dir=builder.data_dir_root, download=False,
        )
        records = source.__getitems__(list(range(len(source)))) if len(source) else []
        names = [r["name"].decode() for r in records]
        labels = np.array([r["label"] for r in records], dtype=np.int32)
        order = sorted(range(len(records)), key=lambda i: (labels[i], names[i]))
        images = np.empty((len(records), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for row, i in enumerate(order):
            images[row] = records[i]["image"]  # broadcasts a gray channel to 3
        out[split] = Prepared(images, labels[order], tuple(names[i] for i in order))
    return out
