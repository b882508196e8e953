"""Audit of a labels-file dataset (:mod:`xrayjax.data.csv_labels`): rows, images found, missing
and unreadable, rows left out (by view, modality...), patients and images per patient, positives,
negatives, uncertain and unknown values per label, label co-occurrence, patients in more than one
official split, and the class-folder audit's duplicate and shortcut checks (:mod:`xrayjax.data.audit`).

Label, patient and split counts are over the rows whose image was found. CheXpert's -1
(uncertain) is counted apart, whatever ``--uncertain`` a run will use. The shortcut check
predicts the label with the most positives, on the decodable images where it is 1 or 0. Missing
images are reported, never a stop. Per image only its hashes are kept, never its pixels.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrayjax.data.audit import duplicate_lines, duplicates, inspect_files, listed, shortcut_lines, shortcuts, text_table
from xrayjax.data.csv_images import SHOWN, locate
from xrayjax.data.csv_labels import read_labels
from xrayjax.data.source import resolve_source
from xrayjax.tasks import SPLITS

TOP_PAIRS = 10  # label pairs the text report lists


def audit_labels(labels: str | Path, data_dir: str | Path | None = None, views: Sequence[str] | None = None,
                 workers: int | None = None) -> dict[str, Any]:
    """Inspect every image a labels file names (under ``data_dir``, default the file's folder;
    ``views`` keeps only rows of those views) and return a JSON-ready report."""
    table = read_labels(labels, views)
    with resolve_source(data_dir if data_dir is not None else table.csv.parent) as source:
        found, missing = locate(source, table)
        row_of: dict[str, int] = {}
        shared = []  # rows naming an image an earlier row names
        for row, file in found:
            if file.member in row_of:
                shared.append([table.paths[row_of[file.member]], table.paths[row]])
            else:
                row_of[file.member] = row
        infos = inspect_files(source, [f for row, f in found if row_of[f.member] == row], workers)
        unreadable = [{"file": source.describe(m), "error": infos[m]["error"]}
                      for m in row_of if infos[m]["status"] != "ok"]
        location = str(source)
    rows = np.array([row for row, _ in found], np.int64)
    values = table.labels[rows] if len(rows) else np.zeros((0, len(table.label_names)), np.float32)
    names = table.label_names

    def split_of(member: str) -> str:
        return table.splits[row_of[member]] or "all"

    def label_of(member: str) -> tuple:
        return tuple(np.nan_to_num(table.labels[row_of[member]], nan=2.0).tolist())

    exact, near = duplicates(row_of, infos, split_of, label_of)
    ok = [m for m in row_of if infos[m]["status"] == "ok"]
    target, shortcut_found = _shortcut(ok, infos, row_of, table.labels, names)
    positive = values == 1
    together = positive.T.astype(np.int64) @ positive.astype(np.int64)
    pairs = sorted(((int(together[i, j]), names[i], names[j]) for i in range(len(names))
                    for j in range(i + 1, len(names)) if together[i, j]), key=lambda p: (-p[0], p[1], p[2]))
    sizes = [infos[m]["size"] for m in ok]
    return {
        "labels_file": str(table.csv),
        "format": table.format,
        "source": location,
        "label_names": list(names),
        "counts": {"rows": len(table.paths), "found": len(found), "missing": len(missing),
                   "unreadable": len(unreadable)},
        "left_out": dict(table.left_out),
        "missing": missing,
        "unreadable": unreadable,
        "rows_naming_one_image": shared,
        "patients": _patients([table.patients[r] for r in rows]),
        "per_label": {n: {"positive": int(positive[:, i].sum()), "negative": int((values[:, i] == 0).sum()),
                          "uncertain": int((values[:, i] == -1).sum()), "unknown": int(np.isnan(values[:, i]).sum())}
                      for i, n in enumerate(names)},
        "co_occurrence": together.tolist(),  # [i][j]: images positive for both (i == j: for label i)
        "top_pairs": [{"labels": [a, b], "count": n} for n, a, b in pairs],
        "official_splits": _official([table.splits[r] for r in rows], [table.patients[r] for r in rows],
                                     [table.paths[r] for r in rows]),
        "formats": dict(collections.Counter(infos[m]["format"] for m in ok)),
        "modes": dict(sorted(collections.Counter(infos[m]["mode"] for m in ok).items())),
        "sizes": {"min_wh": [min(s[0] for s in sizes), min(s[1] for s in sizes)],
                  "max_wh": [max(s[0] for s in sizes), max(s[1] for s in sizes)]} if sizes else {},
        "shortcut_target": target,
        "shortcuts": shortcut_found,
        "exact_duplicates": exact,
        "near_duplicates": near,
    }


def _shortcut(ok: list[str], infos: dict[str, dict], row_of: dict[str, int], labels: np.ndarray,
              names: tuple[str, ...]) -> tuple[str | None, dict[str, dict]]:
    """The label with the most positives among the decodable images, and the shortcut checks
    predicting it (1 or 0) on the images where it is known."""
    if not ok or not names:
        return None, {}
    values = labels[[row_of[m] for m in ok]]
    target = int(np.argmax((values == 1).sum(axis=0)))
    known = np.flatnonzero(np.isin(values[:, target], (0.0, 1.0)))
    found = shortcuts([infos[ok[i]]["mode"] for i in known], [tuple(infos[ok[i]]["size"]) for i in known],
                      values[known, target].astype(np.int64))
    return names[target], found


def _patients(patients: list[str]) -> dict[str, Any]:
    """How many patients, rows without one, and images per patient (min, median, max)."""
    per = np.array(list(collections.Counter(p for p in patients if p).values()), np.int64)
    spread = {"min": int(per.min()), "median": float(np.median(per)), "max": int(per.max())} if len(per) else {}
    return {"patients": len(per), "rows_without_patient": sum(1 for p in patients if not p),
            "images_per_patient": spread}


def _official(splits: list[str], patients: list[str], paths: list[str]) -> dict[str, Any]:
    """Images per official split, and the patients with images in more than one."""
    by_patient: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for split, patient, path in zip(splits, patients, paths):
        if split and patient:
            by_patient[patient][split].append(path)
    counts = collections.Counter(s for s in splits if s)
    return {"images": {s: counts[s] for s in SPLITS if s in counts},
            "patients_in_more_than_one": [{"patient": p, "splits": {s: sorted(v) for s, v in sorted(by.items())}}
                                          for p, by in sorted(by_patient.items()) if len(by) > 1]}


def format_labels_report(report: dict[str, Any]) -> str:
    """The report as readable lines and tables."""
    c = report["counts"]
    left = ", ".join(f"{n} by {why}" for why, n in report["left_out"].items() if n) or "none"
    out = [f"Labels file: {report['labels_file']} ({report['format']}), images in {report['source']}",
           f"Rows {c['rows']}: {c['found']} images found, {c['missing']} missing, {c['unreadable']} unreadable; "
           f"rows left out before: {left}", ""]
    missing = report["missing"]
    out += listed("Missing images (rows kept out; train needs --skip-missing)",
                  missing[:SHOWN] + ([f"... and {len(missing) - SHOWN} more"] if len(missing) > SHOWN else []))
    out += listed("Unreadable images", [f"{u['file']}: {u['error']}" for u in report["unreadable"]])
    if report["rows_naming_one_image"]:
        out += listed("Rows naming one image (train stops: keep one row per image)",
                      [" = ".join(r) for r in report["rows_naming_one_image"]])
    p = report["patients"]
    spread = p["images_per_patient"]
    out += ["", f"Patients: {p['patients']}" + (f", images per patient min {spread['min']} / median "
                                                 f"{spread['median']:g} / max {spread['max']}" if spread else "")
            + (f"; {p['rows_without_patient']} images without a patient" if p["rows_without_patient"] else ""), ""]
    uncertain = any(v["uncertain"] for v in report["per_label"].values())
    rows = [["label", "positive", "negative", *(["uncertain"] if uncertain else []), "unknown"]]
    for name, v in report["per_label"].items():
        rows.append([name, str(v["positive"]), str(v["negative"]), *([str(v["uncertain"])] if uncertain else []),
                     str(v["unknown"])])
    out += [f"Labels, over the {c['found']} images found", *text_table(rows), ""]
    pairs = report["top_pairs"]
    out += listed("Label pairs positive together, most frequent first",
                  [f"{' + '.join(t['labels'])}: {t['count']}" for t in pairs[:TOP_PAIRS]]
                  + ([f"... and {len(pairs) - TOP_PAIRS} more"] if len(pairs) > TOP_PAIRS else []))
    official = report["official_splits"]
    if official["images"]:
        out += ["Official splits: " + ", ".join(f"{s} {n}" for s, n in official["images"].items()) + " images"]
        out += listed("Patients in more than one official split (a leak into test)", [
            f"{g['patient']}: " + " | ".join(f"{s} {', '.join(v)}" for s, v in g["splits"].items())
            for g in official["patients_in_more_than_one"]])
    sizes = report["sizes"]
    if sizes:
        out += ["", "Colour modes: " + ", ".join(f"{k} {v}" for k, v in report["modes"].items())
                + "; formats: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items())
                + f"; sizes {sizes['min_wh'][0]}x{sizes['min_wh'][1]} to {sizes['max_wh'][0]}x{sizes['max_wh'][1]}"]
    if report["shortcut_target"] is not None:
        target = f"{report['shortcut_target']} (the label with the most positives)"
        out += shortcut_lines(report["shortcuts"], target, "always answering its more frequent value")
    out += ["", *duplicate_lines(report["exact_duplicates"], report["near_duplicates"])]
    return "\n".join(out)
