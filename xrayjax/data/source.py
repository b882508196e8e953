"""Locating the raw dataset: an extracted folder or the downloaded zip, read in place.

`--data-dir` may name the folder holding ``all/`` (and maybe ``two/``), a folder holding
``Covid_Data_GradientCrescent/`` or ``Covid_Data_GradientCrescent.zip``, or the zip itself.
The zip is read directly with :mod:`zipfile` (nothing is extracted), so both forms give the
same file list, the same bytes and the same prepared data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import zipfile
from collections.abc import Iterable

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "binary": ("covid", "normal"),
    "four_class": ("covid", "normal", "pneumonia_bac", "pneumonia_vir"),
}
TASKS = tuple(CLASS_NAMES)
SOURCE_SPLITS = ("train", "test")
DATASET_DIRNAME = "Covid_Data_GradientCrescent"
ZIP_NAME = DATASET_DIRNAME + ".zip"
# Files that operating systems drop into folders; skipped (and counted) without reading them.
JUNK_NAMES = frozenset({".ds_store", "desktop.ini", "thumbs.db"})
REPO_DATA_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "covid_xray"

_TASK_DIR = {"binary": "two", "four_class": "all"}
_LAYOUT = re.compile(r"^(?:(?P<prefix>.*?)/)?(?P<top>all|two)/(?P<rest>.+)$")


class DataError(Exception):
    """Bad input data or a bad data option; the message names the file and says how to fix it."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file of the dataset: ``member`` is its path relative to the dataset root."""

    member: str
    size: int

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def is_junk_name(self) -> bool:
        return self.name.lower() in JUNK_NAMES or self.name.startswith("._")


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """A file placed in the task layout ``<all|two>/<split>/<class>/<name>``."""

    file: SourceFile
    split: str
    label: int


@dataclasses.dataclass(frozen=True)
class TaskListing:
    """What a task reads: its image candidates, the junk beside them and the folders ignored."""

    files: tuple[TaskFile, ...]
    junk: tuple[str, ...]
    ignored: tuple[str, ...]
    fingerprint: str


class Source:
    """The dataset root, a folder or a zip; lists members and reads their bytes."""

    def __init__(self, location: pathlib.Path, zip_prefix: str | None = None):
        self.location = location
        self._zip_prefix = zip_prefix
        self._zip: zipfile.ZipFile | None = None
        self.files = self._list()

    @property
    def is_zip(self) -> bool:
        return self._zip_prefix is not None

    def __str__(self) -> str:
        if self.is_zip:
            inner = f" (inside: {self._zip_prefix or '.'})"
            return f"zip {self.location}{inner}"
        return str(self.location)

    def _list(self) -> tuple[SourceFile, ...]:
        if self.is_zip:
            self._zip = zipfile.ZipFile(self.location)
            start = len(self._zip_prefix) + 1 if self._zip_prefix else 0
            found = [
                SourceFile(info.filename[start:], info.file_size)
                for info in self._zip.infolist()
                if not info.is_dir()
                and info.filename.startswith(self._zip_prefix + "/" if self._zip_prefix else "")
                and not info.filename.startswith("__MACOSX/")
            ]
        else:
            found = []
            for dirpath, _, names in os.walk(self.location):
                for name in names:
                    path = pathlib.Path(dirpath, name)
                    rel = path.relative_to(self.location).as_posix()
                    try:
                        size = path.stat().st_size
                    except OSError:  # a dangling or looping symlink: unreadable, found when read
                        size = -1
                    found.append(SourceFile(rel, size))
        return tuple(sorted(found, key=lambda f: f.member))

    def read(self, file: SourceFile) -> bytes:
        """The file's bytes; a read failure is a DataError naming the file."""
        try:
            if self._zip is not None:
                prefix = self._zip_prefix + "/" if self._zip_prefix else ""
                return self._zip.read(prefix + file.member)
            return (self.location / file.member).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as err:
            raise DataError(f"{self.describe(file)}: cannot read the file ({err})") from err

    def describe(self, file: SourceFile) -> str:
        """A path a person can find: the real path, or ``zip:member``."""
        if self.is_zip:
            prefix = self._zip_prefix + "/" if self._zip_prefix else ""
            return f"{self.location}:{prefix}{file.member}"
        return str(self.location / file.member)

    def has_dir(self, top: str) -> bool:
        return any(f.member.startswith(top + "/") for f in self.files)

    def task_listing(self, task: str) -> TaskListing:
        """The files of a task: binary reads ``two/`` when present, else covid+normal of ``all/``."""
        if task not in CLASS_NAMES:
            raise DataError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
        top = _TASK_DIR[task] if self.has_dir(_TASK_DIR[task]) else "all"
        classes = CLASS_NAMES[task]
        files, junk, ignored = [], [], set()
        for f in self.files:
            parts = f.member.split("/")
            if parts[0] != top:
                continue
            if f.is_junk_name:
                junk.append(f.member)
            elif len(parts) == 4 and parts[1] in SOURCE_SPLITS and parts[2] in classes:
                files.append(TaskFile(f, parts[1], classes.index(parts[2])))
            elif len(parts) == 4 and parts[1] in SOURCE_SPLITS and top == "two":
                ignored.add("/".join(parts[:3]))
            elif len(parts) == 4 and parts[1] in SOURCE_SPLITS and parts[2] in CLASS_NAMES["four_class"]:
                continue  # a four-class folder that the binary task does not read
            else:
                ignored.add(f.member if len(parts) < 4 else "/".join(parts[:-1]))
        for split in SOURCE_SPLITS:
            for label, cls in enumerate(classes):
                if not any(t.split == split and t.label == label for t in files):
                    raise DataError(
                        f"{self}: no files in {top}/{split}/{cls}/. The dataset must hold "
                        f"{top}/{{{','.join(SOURCE_SPLITS)}}}/{{{','.join(classes)}}}/ image folders."
                    )
        return TaskListing(tuple(files), tuple(junk), tuple(sorted(ignored)), _fingerprint(files))


def _fingerprint(files: Iterable[TaskFile]) -> str:
    """sha256 of the sorted (member, size) list: identifies what a prepared dataset came from."""
    digest = hashlib.sha256()
    for t in sorted(files, key=lambda t: t.file.member):
        digest.update(f"{t.file.member}\t{t.file.size}\n".encode())
    return digest.hexdigest()


def _zip_prefix(path: pathlib.Path) -> str:
    """The folder inside the zip that holds ``all/`` ('' when it sits at the top)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable zip file ({err})") from err
    prefixes = sorted(
        {m.group("prefix") or "" for n in names if (m := _LAYOUT.match(n)) and m.group("top") == "all"},
        key=len,
    )
    prefixes = [p for p in prefixes if not p.startswith("__MACOSX")]
    if not prefixes:
        raise DataError(f"{path}: the zip holds no all/ folder; expected {DATASET_DIRNAME}/all/...")
    return prefixes[0]


def resolve_source(data_dir: str | os.PathLike | None) -> Source:
    """Find the dataset in any accepted form of ``data_dir`` (None: ../shared/covid_xray)."""
    if data_dir is None:
        if not REPO_DATA_DIR.exists():
            raise DataError(
                f"no dataset found at the default location {REPO_DATA_DIR}: pass --data-dir PATH "
                f"(the folder holding all/, a folder holding {DATASET_DIRNAME}/, or {ZIP_NAME})"
            )
        data_dir = REPO_DATA_DIR
    path = pathlib.Path(data_dir).expanduser()
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: a file that is not a zip; pass the folder or {ZIP_NAME}")
        return Source(path.resolve(), _zip_prefix(path))
    if path.is_dir():
        if (path / "all").is_dir():
            return Source(path.resolve())
        if (path / DATASET_DIRNAME / "all").is_dir():
            return Source((path / DATASET_DIRNAME).resolve())
        if (path / ZIP_NAME).is_file():
            return resolve_source(path / ZIP_NAME)
    elif not path.exists():
        raise DataError(f"--data-dir {path} does not exist")
    raise DataError(
        f"--data-dir {path}: found neither all/, {DATASET_DIRNAME}/all/ nor {ZIP_NAME} there. "
        f"Pass the folder holding all/ (and maybe two/), its parent, or the zip."
    )
