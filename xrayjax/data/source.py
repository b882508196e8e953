"""Locating and listing a dataset: any class-folder layout, from a folder or a zip read in place.

Accepted layouts under ``--data-dir`` (a folder, or a zip holding one; a zip is read with
:mod:`zipfile`, never extracted):

- split folders ``<split>/<class>/<images>``: ``train`` required, ``val``/``valid``/``validation``
  and ``test`` optional (a missing one is held out of train at load time);
- flat class folders ``<class>/<images>``: every split held out at load time;
- the challenge's ``all/`` (and ``two/``) layout, or a folder or zip holding
  ``Covid_Data_GradientCrescent``: ``all/`` is a split-folder dataset, and the binary task reads
  ``two/`` when present, else covid and normal of ``all/``.

Class names are the class folder names sorted as Keras sorts them (Python's ``sorted``). Images
are files with the suffixes Keras reads (jpeg, png, bmp, gif, tiff) and webp; every other file
is junk (counted and listed). Folders whose name starts with a dot are ignored. Symlinked
folders are followed, each real folder walked once (a loop is ignored and listed). Zip members
with an absolute path, a drive letter or a ``..`` part are skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import pathlib
import re
import warnings
import zipfile
from typing import Any

from xrayjax.tasks import SPLITS, canonical_task

CHALLENGE_CLASSES: dict[str, tuple[str, ...]] = {
    "binary": ("covid", "normal"),
    "multiclass": ("covid", "normal", "pneumonia_bac", "pneumonia_vir"),
}
# Split folder names (compared in lower case) and the split each one is.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "valid": "validation",
                 "validation": "validation", "test": "test"}
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DATASET_DIRNAME = "Covid_Data_GradientCrescent"
ZIP_NAME = DATASET_DIRNAME + ".zip"
# Files that operating systems drop into folders; junk whatever their suffix.
JUNK_NAMES = frozenset({".ds_store", "desktop.ini", "thumbs.db"})
REPO_DATA_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "covid_xray"

_CHALLENGE_TOP = re.compile(r"^(?:(?P<prefix>.*?)/)?all/(?:train|test)/")
_DRIVE = re.compile(r"^[A-Za-z]:")
_ZIP_MAGIC = b"PK\x03\x04"


class DataError(ValueError):
    """Bad input data or a bad data option; the message names the file and says how to fix it.
    A ValueError, as every bad setting is."""


class LayoutWarning(UserWarning):
    """The dataset is read, but part of it looks wrong: unsafe zip members (skipped), class
    folders whose names differ only in case (two classes)."""


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file of the dataset: ``member`` is its path relative to the dataset root."""

    member: str
    size: int
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def is_junk_name(self) -> bool:
        return self.name.lower() in JUNK_NAMES or self.name.startswith("._")

    @property
    def is_image_name(self) -> bool:
        return not self.is_junk_name and os.path.splitext(self.name)[1].lower() in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class TaskFile:
    """An image of the dataset: its split (``train``, ``validation``, ``test``) and class index
    (for a labels file: its row of :attr:`Listing.label_matrix`)."""

    file: SourceFile
    split: str
    label: int


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a dataset holds: images by split and class, the junk beside them, the folders ignored.

    ``root`` is the folder (relative to the source) the layout starts at; ``splits`` the splits
    that have their own folder. ``fingerprint`` is the sha256 of every image's path, size and
    modification time, the root and the class names. ``unsafe``: the zip members skipped for
    an absolute path, a drive letter or a ``..`` part. A labels file's listing (``layout``
    "labels file") also holds each image's labels (``label_matrix``, (N, L) float32, NaN
    unknown) and patient (``patients``, "" unknown); ``class_names`` are then its label names.
    """

    root: str
    class_names: tuple[str, ...]
    splits: tuple[str, ...]
    files: tuple[TaskFile, ...]
    junk: tuple[str, ...]
    ignored: tuple[str, ...]
    fingerprint: str
    layout: str  # "split folders" or "class folders"
    challenge: bool = False
    unsafe: tuple[str, ...] = ()
    label_matrix: Any = None
    patients: tuple[str, ...] = ()

    @property
    def multilabel(self) -> bool:
        return self.label_matrix is not None


class Source:
    """The dataset root, a folder or a zip; lists members and reads their bytes.

    Use it in a ``with`` block (or call :meth:`close`): it holds a zip open until closed.
    ``unsafe``: the zip members skipped for their path (absolute, a drive letter, ``..``);
    ``repeats``: the folders not walked again, their real path walked already (symlinks).
    """

    def __init__(self, location: pathlib.Path, zip_prefix: str | None = None):
        self.location = location
        self._zip_prefix = zip_prefix
        self._zip: zipfile.ZipFile | None = None
        self.unsafe: tuple[str, ...] = ()
        self.repeats: tuple[str, ...] = ()
        self.files, self.dirs = self._list()

    def close(self) -> None:
        """Close the zip, if the source is one; nothing can be read afterwards."""
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_zip(self) -> bool:
        return self._zip_prefix is not None

    def __str__(self) -> str:
        if self.is_zip:
            return f"zip {self.location} (inside: {self._zip_prefix or '.'})"
        return str(self.location)

    def _list(self) -> tuple[tuple[SourceFile, ...], frozenset[str]]:
        found, dirs = [], set()
        if self.is_zip:
            self._zip = zipfile.ZipFile(self.location)
            head = self._zip_prefix + "/" if self._zip_prefix else ""
            unsafe = []
            for info in self._zip.infolist():
                if _unsafe(info.filename):  # never a class, never read
                    unsafe.append(info.filename)
                    continue
                if not info.filename.startswith(head) or info.filename.startswith("__MACOSX/"):
                    continue
                member = info.filename[len(head):].rstrip("/")
                if not member:  # the folder entry of the prefix itself
                    continue
                if info.is_dir():
                    dirs.add(member)
                    continue
                when = datetime.datetime(*info.date_time).timestamp()
                found.append(SourceFile(member, info.file_size, int(when * 1e9)))
            self.unsafe = tuple(unsafe)
        else:
            walked, repeats = {os.path.realpath(self.location)}, []
            for dirpath, dirnames, names in os.walk(self.location, followlinks=True):
                rel = pathlib.Path(dirpath).relative_to(self.location).as_posix()
                # Symlinked folders are followed; one whose real path is walked already (a second
                # link to it, or a loop) is not walked again. Sorted, real folders before links.
                kept = []
                for d in sorted(dirnames, key=lambda d: (os.path.islink(os.path.join(dirpath, d)), d)):
                    real = os.path.realpath(os.path.join(dirpath, d))
                    if real in walked:
                        repeats.append(d if rel == "." else f"{rel}/{d}")
                    else:
                        walked.add(real)
                        kept.append(d)
                dirnames[:] = kept
                dirs.update(d if rel == "." else f"{rel}/{d}" for d in dirnames)
                for name in names:
                    path = pathlib.Path(dirpath, name)
                    try:
                        stat = path.stat()
                        size, mtime = stat.st_size, stat.st_mtime_ns
                    except OSError:  # a dangling or looping symlink: unreadable, found when read
                        size, mtime = -1, 0
                    found.append(SourceFile(path.relative_to(self.location).as_posix(), size, mtime))
            self.repeats = tuple(sorted(repeats))
        for f in found:  # a zip may list a file without its folders
            parts = f.member.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        return tuple(sorted(found, key=lambda f: f.member)), frozenset(dirs)

    def read(self, file: SourceFile) -> bytes:
        """The file's bytes; a read failure is a DataError naming the file."""
        try:
            if self._zip is not None:
                prefix = self._zip_prefix + "/" if self._zip_prefix else ""
                return self._zip.read(prefix + file.member)
            return (self.location / file.member).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError) as err:
            raise DataError(f"{self.describe(file)}: cannot read the file ({err})") from err

    def describe(self, member: SourceFile | str) -> str:
        """A path a person can find: the real path, or ``zip:member``."""
        member = member.member if isinstance(member, SourceFile) else member
        if self.is_zip:
            prefix = self._zip_prefix + "/" if self._zip_prefix else ""
            return f"{self.location}:{prefix}{member}"
        return str(self.location / member) if member else str(self.location)

    def subdirs(self, folder: str) -> list[str]:
        """The names of the folders directly inside ``folder`` ('' for the root), sorted."""
        head = folder + "/" if folder else ""
        return sorted({d[len(head):] for d in self.dirs if d.startswith(head) and "/" not in d[len(head):]})

    @property
    def is_challenge(self) -> bool:
        """The challenge's layout: ``all/`` with train and test folders and no ``train/`` beside it."""
        return "all" in self.dirs and "all/train" in self.dirs and "train" not in self.dirs

    def listing(self, task: str | None = None) -> Listing:
        """The dataset's images and classes (``task`` matters only for the challenge's layout:
        ``binary`` reads ``two/``). Warns (:class:`LayoutWarning`) about skipped unsafe zip
        members and class folders whose names differ only in case."""
        task = canonical_task(task)
        if self.unsafe:
            warnings.warn(f"{self}: skipped {len(self.unsafe)} zip member(s) with an absolute path, a drive "
                          f"letter or a '..' part: {', '.join(self.unsafe)}. They are never read; remove them "
                          "from the zip", LayoutWarning, stacklevel=2)
        only = None
        if self.is_challenge:
            root = "two" if task == "binary" and "two" in self.dirs else "all"
            if task == "binary" and root == "all":
                only = CHALLENGE_CLASSES["binary"]  # covid and normal of all/
        else:
            root = ""
        return _list_layout(self, root, only)


def _list_layout(source: Source, root: str, only: tuple[str, ...] | None) -> Listing:
    """Walk ``root`` as split folders (when it holds ``train/``) or flat class folders."""
    where = source.describe(root)
    head = root + "/" if root else ""
    top = {d.lower(): d for d in source.subdirs(root)}
    split_layout = "train" in top
    # parents: each split that has a folder -> the folder holding its class folders
    if split_layout:
        seen: dict[str, str] = {}
        for lower, name in top.items():
            if lower in SPLIT_FOLDERS:
                split = SPLIT_FOLDERS[lower]
                if split in seen:
                    raise DataError(f"{where}: both {seen[split]}/ and {name}/ are {split} folders; "
                                    "keep one of them")
                seen[split] = name
        parents = {split: head + name for split, name in seen.items()}
    else:
        looks_split = sorted(name for lower, name in top.items() if lower in (*SPLIT_FOLDERS, "training", "testing"))
        if looks_split:
            raise DataError(f"{where} holds {', '.join(n + '/' for n in looks_split)} but no train/ folder: name the "
                            "training folder train/ (or, for class folders, rename the classes that are named "
                            "like splits)")
        parents = {"train": root}
    depth = len(root.split("/")) if root else 0
    files, junk, ignored = [], [], {d for d in source.repeats if d.startswith(head)}
    per_folder: dict[tuple[str, str], list[SourceFile]] = {}
    split_of = {folder: split for split, folder in parents.items()}
    for f in source.files:
        if root and not f.member.startswith(head):
            continue
        parts = f.member.split("/")[depth:]
        inner = parts[1:] if split_layout else parts
        split = split_of.get(head + parts[0]) if split_layout else "train"
        hidden = any(p.startswith(".") for p in parts[:-1])
        if split is None or hidden:
            if hidden or len(parts) > 1:
                ignored.add(head + "/".join(parts[:-1]))
            elif f.is_image_name:
                raise _mixed_depth(source, f, where)
            else:
                junk.append(f.member)
            continue
        if len(inner) == 1:  # a file beside the class folders
            if f.is_image_name:
                raise _mixed_depth(source, f, parents[split] if split_layout else where)
            junk.append(f.member)
            continue
        cls = inner[0]
        if only is not None and cls not in only:
            continue  # a challenge class the binary task does not read
        if f.is_image_name:
            per_folder.setdefault((split, cls), []).append(f)
        else:
            junk.append(f.member)
    for split, folder in parents.items():  # empty class folders hold no files: find them by name
        for cls in source.subdirs(folder):
            if not cls.startswith(".") and (only is None or cls in only):
                per_folder.setdefault((split, cls), [])
    _check(source, parents, per_folder, split_layout)
    for split, folder in parents.items():
        by_case: dict[str, list[str]] = {}
        for cls in sorted(cls for s, cls in per_folder if s == split):
            by_case.setdefault(cls.lower(), []).append(cls)
        for same in (names for names in by_case.values() if len(names) > 1):
            warnings.warn(f"{source.describe(folder)}: class folders {' and '.join(n + '/' for n in same)} differ "
                          f"only in case: they are read as {len(same)} classes; merge them if they are one",
                          LayoutWarning, stacklevel=3)
    class_names = tuple(sorted(cls for split, cls in per_folder if split == "train"))
    for (split, cls), members in sorted(per_folder.items()):
        files.extend(TaskFile(f, split, class_names.index(cls)) for f in members)
    digest = hashlib.sha256(f"{root}\n{class_names}\n".encode())
    for t in sorted(files, key=lambda t: t.file.member):
        digest.update(f"{t.file.member}\t{t.file.size}\t{t.file.mtime_ns}\n".encode())
    return Listing(root, class_names, tuple(s for s in SPLITS if s in parents), tuple(files), tuple(junk),
                   tuple(sorted(ignored)), digest.hexdigest(),
                   "split folders" if split_layout else "class folders", challenge=source.is_challenge,
                   unsafe=source.unsafe)


def _mixed_depth(source: Source, file: SourceFile, folder: str) -> DataError:
    return DataError(f"{source.describe(file)}: an image beside the split or class folders of {folder}. Images go "
                     "in a folder named after their class: move it into its class folder or "
                     "delete it.")


def _check(source: Source, parents: dict[str, str],
           per_folder: dict[tuple[str, str], list[SourceFile]], split_layout: bool) -> None:
    """Refuse layouts that cannot train: each error names the folder and what to do."""
    layouts = ("Expected <split>/<class>/<images> (train/ required; val/ and test/ optional) or "
               "<class>/<images>, with at least 2 class folders.")
    train = sorted(cls for split, cls in per_folder if split == "train")
    train_dir = source.describe(parents["train"])
    if not train:
        raise DataError(f"{train_dir} holds no class folders{' (train/ is empty)' if split_layout else ''}. "
                        + layouts)
    for split, folder in parents.items():
        if split != "train" and not any(s == split for s, _ in per_folder):
            raise DataError(f"{source.describe(folder)} holds no class folders: add them, or remove the folder "
                            f"to hold the {split} split out of train instead")
    for (split, cls), members in sorted(per_folder.items()):
        if not members:
            raise DataError(f"{source.describe(parents[split] + '/' + cls if parents[split] else cls)}: "
                            "a class folder with no images (jpeg, png, bmp, gif, tiff or webp). Add its "
                            "images or remove the folder.")
    if len(train) < 2:
        raise DataError(f"{train_dir} holds a single class ({train[0]}): a classifier needs at least 2 "
                        "class folders. " + layouts)
    for (split, cls) in sorted(per_folder):
        if split != "train" and cls not in train:
            raise DataError(f"{source.describe(parents[split] + '/' + cls)}: class {cls!r} is in {split} but "
                            f"not in train ({', '.join(train)}). Add its training images to "
                            f"{train_dir}/{cls}/ or remove the folder.")


def _unsafe(member: str) -> bool:
    """A zip member whose path leaves the dataset: absolute, with a drive letter or a ``..`` part."""
    return member.startswith(("/", "\\")) or bool(_DRIVE.match(member)) or ".." in re.split(r"[/\\]", member)


def _zip_prefix(path: pathlib.Path) -> str:
    """The folder inside the zip that holds the dataset ('' when it sits at the top)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.startswith("__MACOSX/") and not _unsafe(n)]
    except zipfile.BadZipFile as err:
        with open(path, "rb") as f:
            if path.suffix.lower() == ".zip" or f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC:
                raise DataError(f"{path}: a damaged or truncated zip file ({err}): copy or download it "
                                "again") from err
        raise DataError(f"{path}: a file that is not a zip; pass the dataset's folder or its zip") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err})") from err
    challenge = sorted({m.group("prefix") or "" for n in names if (m := _CHALLENGE_TOP.match(n))}, key=len)
    if challenge:
        return challenge[0]
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):  # one folder holding everything
        return tops.pop()
    return ""


def resolve_source(data_dir: str | os.PathLike | None) -> Source:
    """Find the dataset in any accepted form of ``data_dir`` (None: ../shared/covid_xray)."""
    if data_dir is None:
        if not REPO_DATA_DIR.exists():
            raise DataError(
                f"no dataset at the default location {REPO_DATA_DIR}: pass --data-dir PATH (a folder or zip "
                "of class folders, or a prepared folder as `python -m xrayjax.data prepare` prints it)"
            )
        data_dir = REPO_DATA_DIR
    path = pathlib.Path(data_dir).expanduser()
    if path.is_file():
        return Source(path.resolve(), _zip_prefix(path))
    if not path.exists():
        raise DataError(f"--data-dir {path} does not exist")
    if not path.is_dir():
        raise DataError(f"--data-dir {path} is neither a folder nor a zip")
    if (path / DATASET_DIRNAME / "all").is_dir():
        return Source((path / DATASET_DIRNAME).resolve())
    if not (path / "all").is_dir() and (path / ZIP_NAME).is_file():
        return resolve_source(path / ZIP_NAME)
    if looks_prepared(path):
        raise DataError(f"--data-dir {path} is data `python -m xrayjax.data prepare` wrote, not the images this "
                        "needs: pass the folder or zip it was prepared from (train and evaluate read a class-folder "
                        "dataset's prepared folder as it is, without --labels)")
    return Source(path.resolve())


def looks_prepared(path: pathlib.Path) -> bool:
    """A folder written by ``prepare``: a version folder, or a config folder holding one."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or any(path.glob("*/dataset_info.json")))
