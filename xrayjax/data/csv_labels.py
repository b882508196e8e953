"""Labels files of the field's multi-label chest X-ray datasets, read into one table.

The format is recognised from the CSV's header (:data:`FORMATS` lists each one's key columns),
each read as its own documentation and TorchXRayVision's readers (``torchxrayvision/datasets.py``)
read it:

- ``chestxray14`` (NIH ``Data_Entry_2017.csv``): ``Finding Labels`` joined by ``|``, ``No
  Finding`` meaning none; ``Patient ID``; ``View Position``. ``train_val_list.txt`` and
  ``test_list.txt`` beside the CSV are the official split.
- ``chexpert`` (``train.csv``): ``Path`` (starting with the dataset's own folder), ``Frontal/Lateral``
  and ``AP/PA`` (the view: AP/PA of a frontal image, ``L`` for a lateral one), then one column per
  observation: ``1.0``, ``0.0``, ``-1.0`` (uncertain, kept as -1 until :func:`resolve_uncertain`), or
  blank (unknown), except that ``No Finding = 1`` makes every other observation but ``Support
  Devices`` 0 (a healthy patient may carry a device, as TorchXRayVision reads it). The patient is
  the ``patientNNNNN`` part of the path; ``valid.csv`` beside ``train.csv`` is the test split.
- ``covid-chestxray`` (``metadata.csv`` of the COVID-19 image data collection): ``finding`` is
  hierarchical (``Pneumonia/Viral/COVID-19``) or, in early-2020 copies, comma-separated
  (``COVID-19, ARDS``): every part is a label. Only ``modality == X-ray`` rows count; ``todo`` and
  ``Unknown`` findings are left out. The image is ``<folder>/<filename>`` (folder ``images`` when
  the copy has no folder column).
- ``generic``: a ``path`` column, then either a ``labels`` column joined by ``|`` or one column of
  0, 1 or blank per label; optional ``patient`` (or ``patient_id``, ``PatientID``, ``Patient ID``...:
  any case, words joined by anything) and ``view`` columns.

Labels are sorted by name, ``No Finding`` left out. Unknown values are NaN.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xrayjax.data.source import DataError

NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"  # the CheXpert observation No Finding = 1 leaves as it is
UNCERTAIN = ("ignore", "zeros", "ones")
FORMATS: dict[str, tuple[str, ...]] = {
    "chestxray14": ("Image Index", "Finding Labels", "Patient ID", "View Position"),
    "chexpert": ("Path", "Frontal/Lateral", "AP/PA", NO_FINDING),
    "covid-chestxray": ("patientid", "finding", "modality", "filename"),
    "generic": ("path",),
}
_PATIENT = re.compile(r"(patient\d+)")
# Which columns a format reads as labels: said when one holds something else
_CHEXPERT_LABELS = "Every column after 'AP/PA' is read as an observation"
_GENERIC_LABELS = "Every column other than path, patient and view is read as a label"
_NIH_LISTS = {"test": "test_list.txt", "train": "train_val_list.txt"}
_RESAVE = "re-save it as UTF-8 (in Excel: Save As, CSV UTF-8)"


@dataclasses.dataclass(frozen=True)
class LabelTable:
    """One labels file read: per kept row its image path as written, labels (N, L) float32 (1, 0,
    -1 for uncertain, NaN for unknown), patient ("" when unknown) and official split ("train",
    "test", or "" when the file has none). ``left_out`` counts the rows not kept, by reason."""

    format: str
    csv: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]
    patients: tuple[str, ...]
    splits: tuple[str, ...]
    left_out: dict[str, int]


def format_help() -> str:
    """The formats and their key columns, in one line."""
    return "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMATS.items())


def detect_format(header: Sequence[str], where: str) -> str:
    """The format whose key columns the header holds; DataError listing the formats otherwise."""
    for name, columns in FORMATS.items():
        if set(columns) <= set(header):
            return name
    raise DataError(f"{where}: unrecognised labels file (columns: {', '.join(header[:8])}"
                    f"{', ...' if len(header) > 8 else ''}). Known formats and their key columns: {format_help()}")


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a CSV file; DataError for text that is not UTF-8, a missing header
    or a short row."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if not header:
                raise DataError(f"--labels {path} is empty: a labels file starts with its header row")
            if "\0" in "".join(header):  # UTF-16 without a byte-order mark reads as UTF-8, NULs between letters
                raise DataError(f"--labels {path} holds NUL characters, as UTF-16 text does: {_RESAVE}")
            rows = []
            for row in reader:  # DictReader fills the fields a short row lacks with None
                if any(v is None and k.strip() for k, v in row.items() if k is not None):
                    given = sum(v is not None for k, v in row.items() if k is not None)
                    raise DataError(f"--labels {path}, line {reader.line_num}: {given} field{'s' * (given != 1)}, "
                                    f"but the header has {len(header)}; complete or remove that row")
                rows.append(row)  # a header's trailing comma names an empty column a row may lack
            return header, rows
    except FileNotFoundError:
        raise DataError(f"--labels {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise DataError(f"--labels {path} is not UTF-8 text ({err}): {_RESAVE}") from err
    except (OSError, csv.Error) as err:
        raise DataError(f"--labels {path}: cannot read it as a CSV file ({err})") from err


def _value(row: dict[str, str], column: str, where: str, rule: str = "") -> float:
    """The label cell of ``row`` in ``column``: 1, 0, -1 (uncertain) or blank (NaN). Any other value
    stops, naming the cell and ``rule``: which columns the format reads as labels, so that a column
    of something else (a date, an age) is seen for what it is."""
    text = row[column].strip()
    if not text:
        return np.nan
    try:
        value = float(text)
    except ValueError:
        value = 2.0
    if value not in (1.0, 0.0, -1.0):
        raise DataError(f"{where}, column {column!r}: label value {text!r}; expected 1, 0, -1 (uncertain) or blank "
                        f"(unknown){f'. {rule}: drop column {column!r} if it is not one' if rule else ''}")
    return value


def _path(row: dict[str, str], column: str, where: str) -> str:
    """The image path of ``row`` in ``column``; a blank one stops (looked up, it names no file)."""
    text = row[column].strip()
    if not text:
        raise DataError(f"{where} has an empty path (column {column!r}): fill it in or remove the row")
    return text


def _findings_matrix(findings: list[set[str]]) -> tuple[np.ndarray, tuple[str, ...]]:
    names = tuple(sorted(set().union(*findings) - {NO_FINDING})) if findings else ()
    column = {n: i for i, n in enumerate(names)}
    labels = np.zeros((len(findings), len(names)), np.float32)
    for r, found in enumerate(findings):
        for name in found - {NO_FINDING}:
            labels[r, column[name]] = 1.0
    return labels, names


def parse_views(text: str | None) -> list[str] | None:
    """``--views`` (comma-separated, e.g. ``PA,AP``, any case) as an upper-case list; None when
    unset or empty."""
    views = [v.strip().upper() for v in text.split(",") if v.strip()] if text else []
    return views or None


def read_labels(csv_path: str | Path, views: Sequence[str] | None = None) -> LabelTable:
    """Read a labels file (format from its header); ``views`` keeps only rows of those views."""
    path = Path(csv_path).expanduser().resolve()
    header, rows = _rows(path)
    fmt = detect_format(header, str(path))
    if views and fmt == "generic" and "view" not in header:
        raise DataError(f"--views: {path} has no view column; leave --views out")
    reader = {"chestxray14": _chestxray14, "chexpert": _chexpert, "covid-chestxray": _covid,
              "generic": _generic}[fmt]
    table = reader(path, header, rows, {v.upper() for v in views} if views else None)
    if not table.paths:
        raise DataError(f"{path}: no row is left to train on ({_left_out_text(table.left_out)})")
    return table


def _left_out_text(left_out: dict[str, int]) -> str:
    return ", ".join(f"{n} left out by {why}" for why, n in left_out.items() if n) or "the file has no rows"


def _keep_view(view: str, views: set[str] | None, left_out: dict[str, int]) -> bool:
    """Whether a row of ``view`` is kept (views compare in any case); counts the rows left out."""
    if views is None or view.upper() in views:
        return True
    left_out["view"] = left_out.get("view", 0) + 1
    return False


def _chestxray14(path: Path, header: list[str], rows: list[dict], views: set[str] | None) -> LabelTable:
    official: dict[str, str] = {}
    if all((path.parent / f).is_file() for f in _NIH_LISTS.values()):
        for split, name in _NIH_LISTS.items():
            official.update((line.strip(), split) for line in (path.parent / name).read_text().splitlines()
                            if line.strip())
    left_out: dict[str, int] = {}
    kept, paths, findings = [], [], []
    for i, row in enumerate(rows):
        if not _keep_view(row["View Position"].strip(), views, left_out):
            continue
        if official and row["Image Index"] not in official:
            left_out["not in the official lists"] = left_out.get("not in the official lists", 0) + 1
            continue
        kept.append(row)
        paths.append(_path(row, "Image Index", f"{path}, row {i + 2}"))
        findings.append({f.strip() for f in row["Finding Labels"].split("|") if f.strip()})
    labels, names = _findings_matrix(findings)
    return LabelTable("chestxray14", path, tuple(paths), labels, names,
                      tuple(r["Patient ID"].strip() for r in kept),
                      tuple(official.get(r["Image Index"], "") for r in kept), left_out)


def _chexpert(path: Path, header: list[str], rows: list[dict], views: set[str] | None) -> LabelTable:
    observations = header[header.index("AP/PA") + 1:]
    names = tuple(sorted(o for o in observations if o != NO_FINDING))
    parts = [(rows, "")]
    if path.name == "train.csv" and (path.parent / "valid.csv").is_file():
        valid_header, valid_rows = _rows(path.parent / "valid.csv")
        if valid_header != header:
            raise DataError(f"{path.parent / 'valid.csv'}: its columns differ from {path}'s")
        parts = [(rows, "train"), (valid_rows, "test")]
    left_out: dict[str, int] = {}
    paths, patients, splits, labels = [], [], [], []
    for part, split in parts:
        for i, row in enumerate(part):
            frontal = row["Frontal/Lateral"].strip() == "Frontal"
            if not _keep_view(row["AP/PA"].strip() if frontal else "L", views, left_out):
                continue
            where = f"{path if split != 'test' else path.parent / 'valid.csv'}, row {i + 2}"
            healthy = _value(row, NO_FINDING, where) == 1.0
            values = [0.0 if healthy and n != SUPPORT_DEVICES else _value(row, n, where, _CHEXPERT_LABELS)
                      for n in names]
            patient = _PATIENT.search(row["Path"])
            paths.append(_path(row, "Path", where))
            patients.append(patient.group(1) if patient else "")
            splits.append(split)
            labels.append(values)
    matrix = np.asarray(labels, np.float32).reshape(len(paths), len(names))
    return LabelTable("chexpert", path, tuple(paths), matrix, names, tuple(patients), tuple(splits), left_out)


def _covid(path: Path, header: list[str], rows: list[dict], views: set[str] | None) -> LabelTable:
    left_out: dict[str, int] = {}
    kept, paths, findings = [], [], []
    for i, row in enumerate(rows):
        if row["modality"].strip() != "X-ray":
            left_out["modality"] = left_out.get("modality", 0) + 1
            continue
        if row["finding"].strip() in ("todo", "Unknown", ""):
            left_out["unknown finding"] = left_out.get("unknown finding", 0) + 1
            continue
        if not _keep_view(row.get("view", "").strip(), views, left_out):
            continue
        kept.append(row)
        paths.append(f"{(row.get('folder') or 'images').strip()}/{_path(row, 'filename', f'{path}, row {i + 2}')}")
        findings.append({f.strip() for f in re.split(r"[/,]", row["finding"]) if f.strip()})
    labels, names = _findings_matrix(findings)
    return LabelTable("covid-chestxray", path, tuple(paths), labels, names, tuple(r["patientid"].strip() for r in kept),
                      ("",) * len(kept), left_out)


def _patient_column(path: Path, header: Sequence[str]) -> str | None:
    """A generic file's patient column: ``patient`` in any case, with or without ``id``, words
    joined by anything (``patient_id``, ``PatientID``, ``Patient ID``); None without one. Missed, it
    would be read as a label, or ignored beside ``labels``, and a patient's images split apart."""
    found = [c for c in header if re.sub(r"[^a-z0-9]", "", c.lower()) in ("patient", "patientid")]
    if len(found) > 1:
        raise DataError(f"{path}: the columns {', '.join(map(repr, found))} each name the patient; keep one")
    return found[0] if found else None


def _generic(path: Path, header: list[str], rows: list[dict], views: set[str] | None) -> LabelTable:
    left_out: dict[str, int] = {}
    patient = _patient_column(path, header)
    numbered = [(i + 2, r) for i, r in enumerate(rows) if _keep_view(r.get("view", "").strip(), views, left_out)]
    kept = [r for _, r in numbered]
    if "labels" in header:
        labels, names = _findings_matrix([{f.strip() for f in r["labels"].split("|") if f.strip()} for r in kept])
    else:
        names = tuple(sorted(c for c in header if c not in ("path", patient, "view") and c != NO_FINDING))
        if not names:
            raise DataError(f"{path}: a generic labels file needs a 'labels' column or one column per label "
                            "beside 'path'")
        labels = np.asarray([[_value(r, n, f"{path}, row {i}", _GENERIC_LABELS) for n in names]
                             for i, r in numbered], np.float32).reshape(len(kept), len(names))
        if np.any(labels == -1.0):
            raise DataError(f"{path}: -1 (uncertain) is a CheXpert value; a generic file holds 1, 0 or blank")
    return LabelTable("generic", path, tuple(_path(r, "path", f"{path}, row {i}") for i, r in numbered), labels, names,
                      tuple(r[patient].strip() if patient else "" for r in kept), ("",) * len(kept), left_out)


def resolve_uncertain(labels: np.ndarray, mode: str) -> np.ndarray:
    """CheXpert's -1 (uncertain) as ``mode`` says: ignore (NaN, masked), zeros or ones (U-Ignore,
    U-Zeros, U-Ones of the CheXpert paper)."""
    if mode not in UNCERTAIN:
        raise DataError(f"--uncertain must be one of {', '.join(UNCERTAIN)}, got {mode!r}")
    out = np.array(labels, np.float32, copy=True)
    out[out == -1.0] = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[mode]
    return out
