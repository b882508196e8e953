"""The tensorflow-datasets builder ``xray_folders``, written and read without TensorFlow.

One builder config per prepared dataset, named ``<label>-<color>-<key>``: ``key`` hashes the
listing's fingerprint (every image's path, size and modification time, the class names),
the colour policy, whether bad images were skipped and
:data:`~xrayjax.data.decode.DECODER_VERSION`. Changing, adding or removing an image, or changing
the decoder, so prepares again into a new folder; nothing else does. A prepared folder
(``<tfds_dir>/xray_folders/<config>/1.0.0``, as ``prepare`` prints it) is read back as it is by
:func:`prepared_builder`.
Files: ``array_record``, uncompressed, read back with random access (``as_data_source``, raw
bytes parsed by protobuf: :class:`ImageRecords`). Each example holds the 224x224 pixels as a
raw uint8 ``tfds.features.Tensor`` (1 channel for gray, 3 for keep: no image decoding on
load), the label as a ``ClassLabel`` carrying the class names, and the file name. A labels-file
dataset (``multilabel``) holds instead its labels as a float32 vector (NaN unknown, -1
uncertain), the image's path in the dataset as its name, and its patient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from xrayjax.data.decode import DECODER_VERSION, IMAGE_SIZE, BadImage, NotAnImage, decode
from xrayjax.data.source import DataError, Listing, Source, TaskFile
from xrayjax.tasks import canonical_task

NAME = "xray_folders"
FILE_FORMAT = "array_record"
READ_CHUNK = 256  # records per read when only labels and names are wanted
# TFDS' own writer adds zstd:3 and takes no writer options (tensorflow/datasets#674): X-ray pixels
# shrink little by it and are read much slower (experiments/bench.md).
RECORD_OPTIONS = "group_size:1,uncompressed"


class _QuietConfigs(logging.Filter):
    """Drops TFDS' notes that every config here is made at run time (not declared in the class)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not text.startswith("Using custom data configuration") and "has no dataset_info.json" not in text


logging.getLogger("absl").addFilter(_QuietConfigs())


class BadImageWarning(UserWarning):
    """A corrupt image, or a file a labels file names that is not an image, was skipped because
    ``skip_bad_images`` is set."""


@dataclasses.dataclass
class FoldersConfig(tfds.core.BuilderConfig):
    """One prepared dataset: its class (or label) names and colour policy."""

    class_names: tuple[str, ...] = ()
    color: str = "gray"
    multilabel: bool = False
    image_size: int = IMAGE_SIZE


def _label(source: Source, listing: Listing, task: str | None) -> str:
    """A readable prefix for the config name: the dataset folder (and the challenge's task)."""
    if listing.challenge:
        return f"covid_xray-{canonical_task(task) or 'multiclass'}"
    stem = source.location.name.removesuffix(".zip") if source.is_zip else source.location.name
    stem += "-multilabel" if listing.multilabel else ""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", stem).strip("_.") or "dataset"


def config_for(source: Source, listing: Listing, color: str, task: str | None,
               skip_bad_images: bool = False, image_size: int = IMAGE_SIZE) -> FoldersConfig:
    """The builder config of a listing prepared with ``color`` at ``image_size`` pixels; data
    prepared skipping bad images, or at another size, has its own key, so it is never reused for
    another preparation (224 px, the default, adds nothing to the key, so data prepared at it keeps its key)."""
    size = "" if image_size == IMAGE_SIZE else f"\n{image_size}"
    key = hashlib.sha256(
        f"{listing.fingerprint}\n{color}\n{DECODER_VERSION}\n{skip_bad_images}{size}".encode()).hexdigest()[:16]
    px = "" if image_size == IMAGE_SIZE else f"-{image_size}px"
    return FoldersConfig(
        name=f"{_label(source, listing, task)}-{color}{px}-{key}", class_names=listing.class_names, color=color,
        multilabel=listing.multilabel, image_size=image_size,
        description=f"{source}: {', '.join(listing.class_names)}; color={color}; skip_bad_images={skip_bad_images}; "
                    f"{image_size} px",
    )


def size_of(key: str) -> int:
    """The pixel size of the data prepared under ``key`` (a config name of :func:`config_for`)."""
    match = re.search(r"-(\d+)px-", key)
    return int(match.group(1)) if match else IMAGE_SIZE


class _UncompressedRecords(tfds.core.writer.ExampleWriter):
    """array_record files as TFDS writes them (a record a group, for random access), uncompressed."""

    def write(self, path, examples) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(os.fspath(path), RECORD_OPTIONS)
        try:
            for _, example in examples:
                writer.write(example)
        finally:
            writer.close()


class XrayFolders(tfds.core.GeneratorBasedBuilder):
    """A class-folder X-ray dataset, every image resized once (224x224, or the config's size)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Pixels resized once to 224x224 (PIL nearest), raw uint8."}
    # Nothing is downloaded, so there are no URL checksums to look up; TFDS' lookup would
    # otherwise need the optional importlib_resources package.
    url_infos = None

    def __init__(self, *, source: Source | None = None, listing: Listing | None = None,
                 skip_bad_images: bool = False, quiet: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.source, self.listing = source, listing
        self.skip_bad_images = skip_bad_images
        self.quiet = quiet

    # TFDS prints (termcolor.cprint, no logger) "Downloading and preparing dataset Unknown size
    # ..." before preparing and "Dataset ... downloaded and prepared ..." after, though nothing is
    # downloaded: one line of our own instead, none when ``quiet``.
    def _log_download_bytes(self) -> None:
        if not self.quiet:
            print(f"preparing {len(self.listing.files)} images of {self.source} into {self.data_dir} (once: "
                  "later runs reuse them)", file=sys.stderr, flush=True)

    def _log_download_done(self) -> None:
        pass

    def _example_writer(self) -> tfds.core.writer.ExampleWriter:  # TFDS' hook for a custom writer
        return _UncompressedRecords(self.info.file_format)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        size = cfg.image_size
        image = tfds.features.Tensor(shape=(size, size, 1 if cfg.color == "gray" else 3), dtype=np.uint8,
                                     encoding=tfds.features.Encoding.BYTES)
        if cfg.multilabel:
            label_key, labels = "labels", {
                "labels": tfds.features.Tensor(shape=(len(cfg.class_names),), dtype=np.float32),
                "patient": tfds.features.Text()}
        else:
            label_key, labels = "label", {"label": tfds.features.ClassLabel(names=list(cfg.class_names))}
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"image": image, **labels, "name": tfds.features.Text()}),
            supervised_keys=("image", label_key),
            metadata=tfds.core.MetadataDict(
                label_names=list(cfg.class_names)) if cfg.multilabel else tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # the source was found (a folder or a zip) before the builder was made
        source, listing = self.source, self.listing
        self.info.metadata.update(
            source=str(source), root=listing.root, fingerprint=listing.fingerprint,
            junk=list(listing.junk), ignored=list(listing.ignored), not_images=[], bad_images=[],
        )
        return {split: self._generate_examples(split, [t for t in listing.files if t.split == split])
                for split in listing.splits}

    def _generate_examples(self, split: str, files: Sequence[TaskFile]) -> Iterator:
        source, color, size = self.source, self.builder_config.color, self.builder_config.image_size

        def work(task_file: TaskFile) -> tuple[str, object]:
            try:
                return "ok", decode(source.read(task_file.file), color, size)
            except NotAnImage as err:  # junk beside class folders; a labels file's row names it as an image
                return ("not_image", err) if self.listing.multilabel else ("junk", None)
            except (BadImage, DataError) as err:  # corrupt, or unreadable (e.g. a dangling symlink)
                return "bad", err

        # PIL releases the GIL while decoding and resizing, so threads use every core.
        kept = 0
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for task_file, (status, value) in zip(files, pool.map(work, files)):
                where = source.describe(task_file.file)
                if status == "junk":
                    self.info.metadata["not_images"].append(task_file.file.member)
                elif status != "ok":
                    if not self.skip_bad_images:
                        problem = (f"named in the labels file, but not an image ({value}). Replace it or remove "
                                   "its row" if status == "not_image" else
                                   f"unreadable, corrupt or truncated image ({value}). Replace or delete the file")
                        raise DataError(f"{where}: {problem}, or pass --skip-bad-images to leave it out.")
                    reason = value if isinstance(value, DataError) else f"{where}: {value}"  # names it
                    warnings.warn(f"skipping {reason}", BadImageWarning, stacklevel=2)
                    self.info.metadata["bad_images"].append(task_file.file.member)
                else:
                    kept += 1
                    yield task_file.file.member, self._example(task_file, value)
        if not kept:
            raise DataError(f"{source}: no image of the {split} split could be read (every one was skipped as "
                            "junk or bad); see the warnings above, or `python -m xrayjax.data audit`")

    def _example(self, task_file: TaskFile, image: np.ndarray) -> dict:
        listing = self.listing
        if listing.multilabel:
            return {"image": image, "labels": listing.label_matrix[task_file.label], "name": task_file.file.member,
                    "patient": listing.patients[task_file.label]}
        return {"image": image, "label": task_file.label, "name": task_file.file.name}


def _builder(config: FoldersConfig, tfds_dir: str | None, **kwargs) -> XrayFolders:
    return XrayFolders(config=config, data_dir=tfds_dir, file_format=FILE_FORMAT, **kwargs)


def prepared_builder(path: str | os.PathLike) -> tfds.core.DatasetBuilder | None:
    """The builder of a folder ``prepare`` wrote, read as it is (no source needed): its version
    folder ``<tfds_dir>/xray_folders/<config>/1.0.0``, or its config folder holding one version.
    None when ``path`` is not such a folder."""
    folder = Path(path).expanduser()
    if not (folder / "dataset_info.json").is_file():
        versions = [v.parent for v in folder.glob("*/dataset_info.json") if tfds.core.Version.is_valid(v.parent.name)]
        if len(versions) != 1:
            return None
        folder = versions[0]
    if not tfds.core.Version.is_valid(folder.name) or folder.parent.parent.name != NAME:
        return None
    return tfds.builder_from_directory(str(folder))


@contextlib.contextmanager
def _progress_bars_off(off: bool) -> Iterator[None]:
    """TFDS' progress bars off for the block when ``off`` (TFDS' own switch, restored after)."""
    if not off:
        yield
        return
    before = tfds.core.utils.tqdm_utils._active  # TFDS has a setter, no getter
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(before)


def _remove_incomplete(config_dir: Path) -> None:
    """Remove a config's unfinished preparations (TFDS' ``incomplete.*`` folders), and its folder
    when nothing else is in it."""
    for stale in config_dir.glob("incomplete.*"):
        shutil.rmtree(stale, ignore_errors=True)
    with contextlib.suppress(OSError):  # absent, or holding prepared data
        config_dir.rmdir()


def prepare(source: Source, listing: Listing, color: str = "gray", tfds_dir: str | None = None,
            skip_bad_images: bool = False, task: str | None = None, quiet: bool = False,
            image_size: int = IMAGE_SIZE) -> XrayFolders:
    """Prepare ``listing`` (of ``source``) unless it already is; return its builder.

    ``task`` names the challenge's prepared data (its listing says which folders it read).
    ``quiet``: print nothing (TFDS' preparing and prepared lines and its progress bars, which are
    also off when stderr is not a terminal).
    ``image_size``: the prepared pixels' size (see :func:`~xrayjax.data.decode.prepared_size`).
    """
    config = config_for(source, listing, color, task, skip_bad_images, image_size)
    made = dict(source=source, listing=listing, skip_bad_images=skip_bad_images, quiet=quiet)
    builder = _builder(config, tfds_dir, **made)
    if builder.is_prepared():
        return builder
    config_dir = Path(builder.data_dir).parent
    try:
        config_dir.parent.mkdir(parents=True, exist_ok=True)
        # the lock lies beside the config's folder, so a failed prepare leaves no folder behind
        with open(config_dir.parent / f".{config_dir.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process preparing this config: wait for it
            waited = _builder(config, tfds_dir, **made)
            if waited.is_prepared():  # the other process prepared it meanwhile
                return waited
            _remove_incomplete(config_dir)  # left by an interrupted prepare
            try:
                with _progress_bars_off(quiet or not sys.stderr.isatty()):  # a log file gets no bar redraws
                    builder.download_and_prepare()
            except BaseException:
                _remove_incomplete(config_dir)
                raise
    except PermissionError as err:
        raise DataError(f"cannot write the prepared data into {builder.data_dir_root} ({err.strerror}): "
                        "pass a writable --tfds-dir") from err
    return builder


def _features(record: bytes):
    """The features of one record as TFDS wrote it (a ``tf.train.Example``), parsed by protobuf
    alone: TFDS' own numpy decode of every feature costs more than reading an uncompressed record."""
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example.FromString(record).features.feature


class ImageRecords(Sequence):
    """The images of one prepared split's records, (S, S, C) uint8 each, by position: only the
    image of each record is decoded (picklable, for grain's reader processes)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        self.raw = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        self.shape = tuple(builder.info.features["image"].shape)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, position: int) -> np.ndarray:
        if not -len(self) <= position < len(self):
            raise IndexError(f"record {position} of {len(self)}")
        return self.__getitems__([position % len(self)])[0]

    def __getitems__(self, positions: Sequence[int]) -> list[np.ndarray]:
        return [np.frombuffer(_features(r)["image"].bytes_list.value[0], np.uint8).reshape(self.shape)
                for r in self.raw.__getitems__(positions)]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One prepared split, sorted by (label, name) (by name for labels-file data): the records'
    images, their positions in that order, labels ((N,) int32, or (N, L) float32), file names
    (paths in the dataset for labels-file data) and patients (empty when the data has none).
    Images stay in the files until read."""

    records: ImageRecords
    positions: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    patients: tuple[str, ...] = ()


def is_multilabel(builder: tfds.core.DatasetBuilder) -> bool:
    return "labels" in builder.info.features


def read_prepared(builder: tfds.core.DatasetBuilder) -> dict[str, Prepared]:
    """Every split of a prepared dataset, its images left on disk: each record is read once, in
    chunks, only for its labels, name and patient."""
    out = {}
    multilabel = is_multilabel(builder)
    width = len(class_names(builder))
    for split in builder.info.splits:
        records = ImageRecords(builder, split)
        labels, names, patients = [], [], []
        for start in range(0, len(records), READ_CHUNK):
            for r in records.raw.__getitems__(list(range(start, min(start + READ_CHUNK, len(records))))):
                f = _features(r)
                labels.append(list(f["labels"].float_list.value) if multilabel else f["label"].int64_list.value[0])
                names.append(f["name"].bytes_list.value[0].decode())
                if multilabel:
                    patients.append(f["patient"].bytes_list.value[0].decode())
        if multilabel:
            order = np.array(sorted(range(len(names)), key=names.__getitem__), dtype=np.int64)
            matrix = np.asarray(labels, np.float32).reshape(len(names), width)[order]
        else:
            order = np.array(sorted(range(len(labels)), key=lambda i: (labels[i], names[i])), dtype=np.int64)
            matrix = np.asarray(labels, np.int32)[order] if labels else np.zeros(0, np.int32)
        out[split] = Prepared(records, order, matrix, tuple(names[i] for i in order),
                              tuple(patients[i] for i in order) if multilabel else ())
    return out


def class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """The class names in the prepared dataset's features (its label names for labels-file data)."""
    if is_multilabel(builder):
        return tuple(builder.info.metadata["label_names"])
    return tuple(builder.info.features["label"].names)
