"""Dataset audit: counts, colour modes, sizes, junk, unreadable files, duplicates and leaks.

Exact duplicates are found by sha256 of the file bytes, near-duplicates by two 256-bit
perceptual hashes of the grayscale image (a difference hash and a DCT hash, both in numpy):
a pair is near when both differ in at most ``NEAR_BITS`` bits. On this dataset the one real
near-duplicate pair differs by 15 and 14 bits and every other pair by at least 18 / 50.
File-name groups (a paper's figures, a Kaggle patient) that sit in both train and test are
listed: images of one patient on both sides make the test score optimistic.
"""

from __future__ import annotations

import collections
import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from xrayjax.data.decode import BadImage, NotAnImage, open_image, to_rgb
from xrayjax.data.source import SOURCE_SPLITS, DataError, Source, SourceFile, resolve_source

HASH_SIDE = 16
NEAR_BITS = 32
_FIGURE = re.compile(
    r"[-_.](?:f\d|fig|gr\d|fx\d|g\d{3}|day\d|case\d|main[-_.]|pdf\b|webp\b)", re.IGNORECASE
)
_KAGGLE_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_KAGGLE_IM = re.compile(r"(IM-\d+)-\d+", re.IGNORECASE)
_VIEW = re.compile(r"[-_](?:PA|AP|L|lateral|[a-d])$", re.IGNORECASE)


def group_key(name: str) -> str:
    """The source a file name points to: a Kaggle patient or a paper (figures, days, panels)."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    if m := _KAGGLE_PERSON.match(stem):
        return m.group(1).lower()
    if m := _KAGGLE_IM.search(stem):
        return m.group(1).upper()
    if m := _FIGURE.search(stem):
        stem = stem[:m.start()]
    stem = re.sub(r"-[a-d]-", "-", stem)  # auntminnie-a-..., auntminnie-b-...: panels
    while (m := _VIEW.search(stem)) and m.start() > 0:
        stem = stem[:m.start()]
    return stem


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


def hamming(hashes: np.ndarray) -> np.ndarray:
    """(N, N) bit distances between packed hashes (N, bytes)."""
    return np.unpackbits(hashes[:, None, :] ^ hashes[None, :, :], axis=2).sum(axis=2)


def _inspect(source: Source, file: SourceFile) -> dict[str, Any]:
    try:
        data = source.read(file)
    except DataError as err:  # unreadable, e.g. a dangling or looping symlink
        return {"status": "bad", "error": str(err), "sha256": None}
    info: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        image = open_image(data)
    except NotAnImage:
        info["status"] = "not_image"
        return info
    except BadImage as err:
        info.update(status="bad", error=str(err))
        return info
    gray = to_rgb(image).convert("L")
    info.update(status="ok", format=image.format,
                mode=image.mode, size=image.size, dhash=dhash(gray), phash=phash(gray))
    return info


def _scope(a: str, b: str) -> str:
    return f"within {a}" if a == b else "across train/test"


def audit(data_dir: str | None, workers: int = 4) -> dict[str, Any]:
    """Inspect every file of all/ and two/ and return a JSON-ready report."""
    source = resolve_source(data_dir)
    junk = [f.member for f in source.files if f.is_junk_name]
    files = [f for f in source.files if not f.is_junk_name]
    with ThreadPoolExecutor(workers) as pool:
        infos = dict(zip((f.member for f in files), pool.map(lambda f: _inspect(source, f), files)))

    counts: dict = {}
    for member in infos:
        parts = member.split("/")
        if len(parts) == 4 and parts[1] in SOURCE_SPLITS and infos[member]["status"] == "ok":
            counts.setdefault(parts[0], {}).setdefault(parts[1], collections.Counter())[parts[2]] += 1
    # two/ is meant to be a copy of part of all/: check that, then audit each image once.
    two_not_in_all = sorted(
        m for m in infos if m.startswith("two/")
        and infos.get("all/" + m[4:], {}).get("sha256") != infos[m]["sha256"]
    )
    unique = [m for m in infos if m.startswith("all/") or m in two_not_in_all]
    ok = [m for m in unique if infos[m]["status"] == "ok"]

    def cls(member: str) -> str:
        return member.split("/")[2] if member.count("/") == 3 else member.rsplit("/", 1)[0]

    def split(member: str) -> str:
        return member.split("/")[1] if member.count("/") == 3 else "?"

    modes: dict = collections.defaultdict(collections.Counter)
    formats: collections.Counter = collections.Counter()
    sizes: dict = {}
    for m in ok:
        modes[cls(m)][infos[m]["mode"]] += 1
        formats[infos[m]["format"]] += 1
        w, h = infos[m]["size"]
        lo, hi = sizes.get(cls(m), ([w, h], [w, h]))
        sizes[cls(m)] = ([min(lo[0], w), min(lo[1], h)], [max(hi[0], w), max(hi[1], h)])

    by_sha = collections.defaultdict(list)
    for m in unique:
        if infos[m]["sha256"] is not None:  # unreadable files have no bytes to compare
            by_sha[infos[m]["sha256"]].append(m)
    exact = [
        {"files": group, "scope": "across train/test" if len({split(g) for g in group}) > 1
         else f"within {split(group[0])}", "labels_differ": len({cls(g) for g in group}) > 1}
        for group in by_sha.values() if len(group) > 1
    ]
    exact_pairs = {frozenset(p) for g in exact for p in zip(g["files"], g["files"][1:])}
    near = []
    if len(ok) > 1:
        dd = hamming(np.stack([infos[m]["dhash"] for m in ok]))
        pd = hamming(np.stack([infos[m]["phash"] for m in ok]))
        for i, j in zip(*np.nonzero(np.triu((dd <= NEAR_BITS) & (pd <= NEAR_BITS), 1))):
            a, b = ok[i], ok[j]
            if infos[a]["sha256"] != infos[b]["sha256"] and frozenset((a, b)) not in exact_pairs:
                near.append({"files": [a, b], "dhash_bits": int(dd[i, j]),
                             "phash_bits": int(pd[i, j]), "scope": _scope(split(a), split(b)),
                             "labels_differ": cls(a) != cls(b)})

    groups = collections.defaultdict(lambda: collections.defaultdict(list))
    for m in ok:
        name = m.rsplit("/", 1)[-1]
        groups[group_key(name)][split(m)].append(f"{cls(m)}/{name}")
    crossing = [{"group": g, "train": sorted(s["train"]), "test": sorted(s["test"])}
                for g, s in sorted(groups.items()) if s.get("train") and s.get("test")]
    test_groups = [{"group": g, "test": sorted(s["test"])}
                   for g, s in sorted(groups.items()) if len(s.get("test", [])) > 1]
    return {
        "source": str(source),
        "counts": {top: {s: dict(sorted(c.items())) for s, c in sorted(per.items())}
                   for top, per in sorted(counts.items())},
        "formats": dict(formats),
        "modes": {c: dict(sorted(v.items())) for c, v in sorted(modes.items())},
        "sizes": {c: {"min_wh": lo, "max_wh": hi} for c, (lo, hi) in sorted(sizes.items())},
        "junk": junk,
        "not_images": sorted(m for m in infos if infos[m]["status"] == "not_image"),
        "unreadable": [{"file": source.describe(SourceFile(m, 0)), "error": infos[m]["error"]}
                       for m in sorted(infos) if infos[m]["status"] == "bad"],
        "two_not_copies_of_all": two_not_in_all,
        "exact_duplicates": exact,
        "near_duplicates": near,
        "name_groups_across_splits": crossing,
        "test_groups": test_groups,
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_report(report: dict[str, Any]) -> str:
    """The report as readable tables and lists."""
    out = [f"Dataset: {report['source']}", ""]
    classes = sorted({c for per in report["counts"].values() for s in per.values() for c in s})
    rows = [["split", *classes, "total"]]
    for top, per in report["counts"].items():
        for s, c in per.items():
            rows.append([f"{top}/{s}", *(str(c.get(k, "-")) for k in classes), str(sum(c.values()))])
    out += ["Images (decodable)", *_table(rows), ""]
    rows = [["class", "colour modes", "min WxH", "max WxH"]]
    for c, m in report["modes"].items():
        lo, hi = report["sizes"][c]["min_wh"], report["sizes"][c]["max_wh"]
        rows.append([c, ", ".join(f"{k} {v}" for k, v in m.items()), f"{lo[0]}x{lo[1]}",
                     f"{hi[0]}x{hi[1]}"])
    out += ["Modes and sizes (all/)", *_table(rows),
            "Formats: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items()), ""]

    def listing(title: str, items: list[str]) -> None:
        out.append(f"{title}: {len(items) or 'none'}")
        out.extend(f"  {i}" for i in items)

    listing("Junk files (skipped)", report["junk"])
    listing("Not images by content (skipped)", report["not_images"])
    listing("Unreadable images", [f"{u['file']}: {u['error']}" for u in report["unreadable"]])
    listing("two/ files that are not copies of all/", report["two_not_copies_of_all"])
    listing("Exact duplicates (sha256)", [
        f"[{d['scope']}{', LABELS DIFFER' if d['labels_differ'] else ''}] " + " = ".join(d["files"])
        for d in report["exact_duplicates"]])
    listing(f"Near-duplicates (dHash and pHash <= {NEAR_BITS}/256 bits)", [
        f"[{d['scope']}, {d['dhash_bits']}/{d['phash_bits']} bits] " + " ~ ".join(d["files"])
        for d in report["near_duplicates"]])
    listing("Name groups in both train and test (possible patient leak)", [
        f"{g['group']}: train {', '.join(g['train'])} | test {', '.join(g['test'])}"
        for g in report["name_groups_across_splits"]])
    listing("Test images sharing one source", [
        f"{g['group']}: {', '.join(g['test'])}" for g in report["test_groups"]])
    return "\n".join(out)
