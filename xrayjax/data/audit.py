"""Dataset audit of any class-folder dataset: counts, junk and unreadable files, duplicates,
source groups across splits, and colour-mode or size shortcuts.

Exact duplicates are found by sha256 of the file bytes, near-duplicates by two 256-bit
perceptual hashes of the grayscale image (a difference hash and a DCT hash, both in numpy):
a pair is near when both differ in at most ``NEAR_BITS`` bits. On the challenge's data the one
real near-duplicate pair differs by 15 and 14 bits and every other pair by at least 18 / 50.
Source groups (:func:`~xrayjax.data.groups.group_key`: a paper's figures, a Kaggle patient) in
more than one split are listed: images of one patient on both sides make the test score
optimistic. A shortcut is a property other than the X-ray itself that predicts the class: the
audit fits a depth-3 decision tree on the colour mode alone, and on the image size alone, and
warns when its 5-fold accuracy beats always answering the largest class by ``SHORTCUT_MARGIN``
or more. Zip members with an unsafe path (absolute, a drive letter, ``..``) are listed, never read.
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from xrayjax.data.decode import BadImage, NotAnImage, open_image, to_rgb
from xrayjax.data.groups import group_key
from xrayjax.data.source import DataError, Source, SourceFile, TaskFile, resolve_source

HASH_SIDE = 16
NEAR_BITS = 32
SHORTCUT_MARGIN = 0.15
_BLOCK = 512  # rows of the pairwise hash distances computed at once (memory: rows x N x 32 bytes)


def _dct_matrix(n: int) -> np.ndarray:
    k, x = np.arange(n)[:, None], np.arange(n)[None]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT = _dct_matrix(4 * HASH_SIDE)


def dhash(gray: Image.Image) -> np.ndarray:
    """Difference hash: signs of horizontal gradients of a (16, 17) box-filtered thumbnail."""
    small = np.asarray(gray.resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BOX), np.float64)
    return np.packbits(small[:, 1:] > small[:, :-1])


def phash(gray: Image.Image) -> np.ndarray:
    """DCT hash: the 16x16 lowest 2-D DCT frequencies of a 64x64 thumbnail against their median."""
    side = 4 * HASH_SIDE
    small = np.asarray(gray.resize((side, side), Image.Resampling.BOX), np.float64)
    low = (_DCT @ small @ _DCT.T)[:HASH_SIDE, :HASH_SIDE].ravel()
    return np.packbits(low > np.median(low[1:]))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) bit distances between packed hashes (N, bytes)."""
    return np.bitwise_count(a[:, None, :] ^ b[None, :, :]).sum(axis=2, dtype=np.int32)


def near_pairs(dhashes: np.ndarray, phashes: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(i, j, dhash bits, phash bits) of every pair i < j within ``NEAR_BITS`` on both hashes,
    computed in blocks of rows so memory stays flat at any dataset size."""
    pairs = []
    for start in range(0, len(dhashes), _BLOCK):
        dd = hamming(dhashes[start:start + _BLOCK], dhashes)
        pd = hamming(phashes[start:start + _BLOCK], phashes)
        rows, cols = np.nonzero((dd <= NEAR_BITS) & (pd <= NEAR_BITS))
        pairs += [(start + r, c, int(dd[r, c]), int(pd[r, c])) for r, c in zip(rows, cols) if c > start + r]
    return pairs


def shortcut(values: list, labels: np.ndarray) -> dict[str, float] | None:
    """5-fold accuracy of a depth-3 tree predicting the class from ``values`` alone (each a tuple
    of numbers, or a category), beside always answering the largest class; None if too few."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import OneHotEncoder
    from sklearn.tree import DecisionTreeClassifier

    counts = np.bincount(labels)
    folds = min(5, int(counts[counts > 0].min()))
    if folds < 2 or (counts > 0).sum() < 2:
        return None
    x = (OneHotEncoder().fit_transform(np.array(values, object).reshape(-1, 1)).toarray()
         if isinstance(values[0], str) else np.array(values, np.float64))
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    accuracy = cross_val_score(DecisionTreeClassifier(max_depth=3, random_state=0), x, labels, cv=cv).mean()
    return {"accuracy": round(float(accuracy), 3), "baseline": round(float(counts.max() / counts.sum()), 3)}


def inspect_file(source: Source, file: SourceFile) -> dict[str, Any]:
    """A file's sha256 and status (ok, or not_image or bad with its error); for an image its format,
    colour mode, size and perceptual hashes. Nothing decoded is kept."""
    try:
        data = source.read(file)
    except DataError as err:  # unreadable, e.g. a dangling or looping symlink
        return {"status": "bad", "error": str(err), "sha256": None}
    info: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        image = open_image(data)
    except NotAnImage as err:
        info.update(status="not_image", error=str(err))
        return info
    except BadImage as err:
        info.update(status="bad", error=str(err))
        return info
    gray = to_rgb(image).convert("L")
    info.update(status="ok", format=image.format,
                mode=image.mode, size=image.size, dhash=dhash(gray), phash=phash(gray))
    return info


def inspect_files(source: Source, files: Sequence[SourceFile], workers: int | None = None) -> dict[str, dict]:
    """:func:`inspect_file` of every file on ``workers`` threads (default: every core), by member."""
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        return dict(zip((f.member for f in files), pool.map(lambda f: inspect_file(source, f), files)))


def _scope(splits: set[str]) -> str:
    return f"within {splits.pop()}" if len(splits) == 1 else f"across {'/'.join(sorted(splits))}"


def duplicates(members: Iterable[str], infos: Mapping[str, dict], split_of: Callable[[str], str],
               label_of: Callable[[str], Hashable]) -> tuple[list[dict], list[dict]]:
    """Exact duplicate groups (one sha256) and near-duplicate pairs (both perceptual hashes within
    ``NEAR_BITS``, bytes not equal) among ``members``, each with its split scope and whether the
    labels (``label_of``) differ."""
    members = list(members)
    by_sha = collections.defaultdict(list)
    for m in members:
        if infos[m]["sha256"] is not None:  # unreadable files have no bytes to compare
            by_sha[infos[m]["sha256"]].append(m)
    exact = [{"files": group, "scope": _scope({split_of(g) for g in group}),
              "labels_differ": len({label_of(g) for g in group}) > 1}
             for group in by_sha.values() if len(group) > 1]
    exact_pairs = {frozenset(p) for g in exact for p in zip(g["files"], g["files"][1:])}
    ok = [m for m in members if infos[m]["status"] == "ok"]
    near = []
    if len(ok) > 1:
        for i, j, dbits, pbits in near_pairs(np.stack([infos[m]["dhash"] for m in ok]),
                                             np.stack([infos[m]["phash"] for m in ok])):
            a, b = ok[i], ok[j]
            if infos[a]["sha256"] != infos[b]["sha256"] and frozenset((a, b)) not in exact_pairs:
                near.append({"files": [a, b], "dhash_bits": dbits, "phash_bits": pbits,
                             "scope": _scope({split_of(a), split_of(b)}), "labels_differ": label_of(a) != label_of(b)})
    return exact, near


def shortcuts(modes: list[str], sizes: list[tuple[int, int]], labels: np.ndarray) -> dict[str, dict]:
    """:func:`shortcut` of the colour mode alone and of the image size alone, each with its warning
    (accuracy beats the baseline by ``SHORTCUT_MARGIN``); a check with too few images is left out."""
    out = {}
    for feature, values in (("colour mode", modes), ("image size", sizes)):
        found = shortcut(values, labels) if len(values) else None
        if found is not None:
            found["warning"] = found["accuracy"] >= found["baseline"] + SHORTCUT_MARGIN
            out[feature] = found
    return out


def audit(data_dir: str | None, workers: int | None = None) -> dict[str, Any]:
    """Inspect every file of the dataset (the challenge's: all/, and two/ against it) and return
    a JSON-ready report."""
    with resolve_source(data_dir) as source:
        listing = source.listing()
        class_names = listing.class_names
        tasks: dict[str, TaskFile] = {t.file.member: t for t in listing.files}
        files = [t.file for t in listing.files]
        junk = list(listing.junk)
        if listing.challenge:  # two/ is meant to be a copy of part of all/: check that too
            files += [f for f in source.files if f.member.startswith("two/") and f.is_image_name]
            junk += [f.member for f in source.files if f.member.startswith("two/") and not f.is_image_name]
        infos = inspect_files(source, files, workers)
    two_not_in_all = sorted(
        m for m in infos if m not in tasks and infos.get("all/" + m[4:], {}).get("sha256") != infos[m]["sha256"]
    )
    ok = [m for m in tasks if infos[m]["status"] == "ok"]

    def cls(member: str) -> str:
        return class_names[tasks[member].label]

    def split(member: str) -> str:
        return tasks[member].split

    counts: dict = {}
    modes: dict = collections.defaultdict(collections.Counter)
    formats: collections.Counter = collections.Counter()
    sizes: dict = {}
    for m in ok:
        counts.setdefault(split(m), collections.Counter())[cls(m)] += 1
        modes[cls(m)][infos[m]["mode"]] += 1
        formats[infos[m]["format"]] += 1
        w, h = infos[m]["size"]
        lo, hi = sizes.get(cls(m), ([w, h], [w, h]))
        sizes[cls(m)] = ([min(lo[0], w), min(lo[1], h)], [max(hi[0], w), max(hi[1], h)])

    exact, near = duplicates(tasks, infos, split, cls)

    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for m in ok:
        name = m.rsplit("/", 1)[-1]
        groups[group_key(name)][split(m)].append(f"{cls(m)}/{name}")
    crossing = [{"group": g, "splits": {k: sorted(v) for k, v in sorted(s.items())}}
                for g, s in sorted(groups.items()) if len(s) > 1]
    test_groups = [{"group": g, "test": sorted(s["test"])}
                   for g, s in sorted(groups.items()) if len(s.get("test", [])) > 1]
    labels = np.array([tasks[m].label for m in ok], np.int64)
    found_shortcuts = shortcuts([infos[m]["mode"] for m in ok], [tuple(infos[m]["size"]) for m in ok], labels)
    return {
        "source": str(source),
        "layout": listing.layout + (f" under {listing.root}/" if listing.root else ""),
        "class_names": list(class_names),
        "counts": {s: {c: counts[s].get(c, 0) for c in class_names} for s in listing.splits if s in counts},
        "formats": dict(formats),
        "modes": {c: dict(sorted(modes[c].items())) for c in class_names if c in modes},
        "sizes": {c: {"min_wh": lo, "max_wh": hi} for c, (lo, hi) in sorted(sizes.items())},
        "shortcuts": found_shortcuts,
        "junk": sorted(junk),
        "ignored": list(listing.ignored),
        "unsafe_zip_members": list(listing.unsafe),
        "not_images": sorted(m for m in tasks if infos[m]["status"] == "not_image"),
        "unreadable": [{"file": source.describe(m), "error": infos[m]["error"]}
                       for m in sorted(infos) if infos[m]["status"] == "bad"],
        "two_not_copies_of_all": two_not_in_all,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "name_groups_across_splits": crossing,
        "test_groups": test_groups,
    }


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines of left-aligned columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_report(report: dict[str, Any]) -> str:
    """The report as readable tables and lists."""
    out = [f"Dataset: {report['source']} (layout {report['layout']})", ""]
    classes = report["class_names"]
    rows = [["split", *classes, "total"]]
    for s, c in report["counts"].items():
        rows.append([s, *(str(c.get(k, 0)) for k in classes), str(sum(c.values()))])
    out += ["Images (decodable)", *text_table(rows), ""]
    rows = [["class", "colour modes", "min WxH", "max WxH"]]
    for c, m in report["modes"].items():
        lo, hi = report["sizes"][c]["min_wh"], report["sizes"][c]["max_wh"]
        rows.append([c, ", ".join(f"{k} {v}" for k, v in m.items()), f"{lo[0]}x{lo[1]}",
                     f"{hi[0]}x{hi[1]}"])
    out += ["Modes and sizes", *text_table(rows),
            "Formats: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items()), ""]
    out += [*shortcut_lines(report["shortcuts"], "the class", "the largest class"), ""]
    out += listed("Junk files (skipped)", report["junk"])
    out += listed("Ignored folders", report["ignored"])
    if report["unsafe_zip_members"]:
        out += listed("Zip members with an unsafe path (skipped, never read)", report["unsafe_zip_members"])
    out += listed("Not images by content (skipped)", report["not_images"])
    out += listed("Unreadable images", [f"{u['file']}: {u['error']}" for u in report["unreadable"]])
    if report["two_not_copies_of_all"]:
        out += listed("two/ files that are not copies of all/", report["two_not_copies_of_all"])
    out += duplicate_lines(report["exact_duplicates"], report["near_duplicates"])
    out += listed("Source groups in more than one split (possible patient leak)", [
        f"{g['group']}: " + " | ".join(f"{s} {', '.join(v)}" for s, v in g["splits"].items())
        for g in report["name_groups_across_splits"]])
    out += listed("Test images sharing one source", [
        f"{g['group']}: {', '.join(g['test'])}" for g in report["test_groups"]])
    return "\n".join(out)


def listed(title: str, items: list[str]) -> list[str]:
    """A titled list: the title with the count (or none), then one indented line per item."""
    return [f"{title}: {len(items) or 'none'}", *(f"  {i}" for i in items)]


def shortcut_lines(found: Mapping[str, dict], target: str, baseline: str) -> list[str]:
    """One line per shortcut check (:func:`shortcuts`): accuracy predicting ``target`` beside
    always answering ``baseline``, and the verdict."""
    advice = {"colour mode": "--color gray (the default) takes it away",
              "image size": "resizing to one size keeps the aspect ratio's and the scanner's traces; "
                            "check what the model looks at (gradcam.png)"}
    return [f"Shortcut check, {feature} alone: accuracy {s['accuracy']:.1%} vs {s['baseline']:.1%} for {baseline}: "
            + (f"WARNING: it predicts {target}; {advice[feature]}" if s["warning"] else "no shortcut")
            for feature, s in found.items()]


def duplicate_lines(exact: list[dict], near: list[dict]) -> list[str]:
    """The exact and near duplicates of :func:`duplicates` as titled lists."""
    return (listed("Exact duplicates (sha256)", [
        f"[{d['scope']}{', LABELS DIFFER' if d['labels_differ'] else ''}] " + " = ".join(d["files"])
        for d in exact])
        + listed(f"Near-duplicates (dHash and pHash <= {NEAR_BITS}/256 bits)", [
            f"[{d['scope']}, {d['dhash_bits']}/{d['phash_bits']} bits] " + " ~ ".join(d["files"])
            for d in near]))
