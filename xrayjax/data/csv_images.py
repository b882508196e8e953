"""A labels file's images found in the dataset folder: the listing a labels-file dataset prepares.

A row's path is looked up, in order: as written, relative to the dataset root; under the
labels file's own folder (when that lies inside the root); with its leading folders dropped one
by one (CheXpert's ``CheXpert-v1.0-small/...`` when ``--data-dir`` is that folder itself); and,
for a bare file name (ChestX-ray14's ``Image Index``), in any subfolder, where it must be unique
(the NIH download spreads its images over ``images_001/images/`` ... ``images_012/images/``).
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from xrayjax.data.csv_labels import LabelTable
from xrayjax.data.source import DataError, Listing, Source, SourceFile, TaskFile
from xrayjax.tasks import SPLITS

SHOWN = 5  # missing images named in a message


class MissingImagesWarning(UserWarning):
    """Rows of the labels file whose image is not in the dataset were left out (``--skip-missing``)."""


def _finder(source: Source, table: LabelTable):
    by_member = {f.member: f for f in source.files}
    by_name: dict[str, SourceFile | None] = {}
    for f in source.files:
        by_name[f.name] = None if f.name in by_name else f  # None: the name is in two places
    inside = ""
    if not source.is_zip:
        try:
            inside = table.csv.parent.relative_to(source.location).as_posix()
        except ValueError:
            inside = ""
    inside = "" if inside == "." else inside

    def find(path: str) -> SourceFile | None:
        path = path.replace("\\", "/").removeprefix("./")
        candidates = [path, f"{inside}/{path}" if inside else path]
        parts = path.split("/")
        candidates += ["/".join(parts[i:]) for i in range(1, len(parts))]
        for candidate in candidates:
            if candidate in by_member:
                return by_member[candidate]
        if "/" not in path:
            if path in by_name and by_name[path] is None:
                raise DataError(f"{table.csv}: the image {path!r} is in more than one folder of {source}; "
                                "keep one copy")
            return by_name.get(path)
        return None

    return find


def locate(source: Source, table: LabelTable) -> tuple[list[tuple[int, SourceFile]], list[str]]:
    """(row, file) of every row of ``table`` whose image is in ``source``, and the paths of the others."""
    find = _finder(source, table)
    found, missing = [], []
    for row, path in enumerate(table.paths):
        file = find(path)
        if file is None:
            missing.append(path)
        else:
            found.append((row, file))
    return found, missing


def csv_listing(source: Source, table: LabelTable, skip_missing: bool = False) -> Listing:
    """The listing of ``table``'s images in ``source``: every kept row whose image is found, its
    official split ("train" when the file has none), labels and patient.

    A missing image stops with a DataError (how many, the first few, ``--skip-missing``); with
    ``skip_missing`` the rows are left out with a :class:`MissingImagesWarning`.
    """
    found, missing = locate(source, table)
    rows = [row for row, _ in found]
    files = [TaskFile(f, table.splits[row] or "train", i) for i, (row, f) in enumerate(found)]
    if missing:
        shown = ", ".join(missing[:SHOWN]) + (", ..." if len(missing) > SHOWN else "")
        if not skip_missing:
            raise DataError(f"{len(missing)} of the {len(table.paths)} images named in {table.csv} are not in "
                            f"{source} ({shown}): pass --skip-missing to leave those rows out (a partial "
                            "download), or --data-dir the folder that holds the images")
        warnings.warn(f"left out {len(missing)} of the {len(table.paths)} rows of {table.csv}: their images are "
                      f"not in {source} ({shown})", MissingImagesWarning, stacklevel=2)
    if not files:
        raise DataError(f"none of the images named in {table.csv} is in {source}: pass the folder that holds "
                        "them as --data-dir")
    seen: dict[str, str] = {}
    for t, row in zip(files, rows):
        if t.file.member in seen:
            raise DataError(f"{table.csv}: {seen[t.file.member]} and {table.paths[row]} are the same image "
                            f"{t.file.member}; keep one row per image")
        seen[t.file.member] = table.paths[row]
    keep = np.asarray(rows, np.int64)
    labels, patients = table.labels[keep], tuple(table.patients[r] for r in rows)
    digest = hashlib.sha256(f"{table.format}\n{table.label_names}\n".encode() + labels.tobytes())
    for t, patient in zip(files, patients):
        digest.update(f"{t.file.member}\t{t.file.size}\t{t.file.mtime_ns}\t{t.split}\t{patient}\n".encode())
    return Listing("", table.label_names, tuple(s for s in SPLITS if any(t.split == s for t in files)),
                   tuple(files), (), (), digest.hexdigest(), "labels file", unsafe=source.unsafe,
                   label_matrix=labels, patients=patients)
