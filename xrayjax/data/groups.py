"""Which source (a paper, a patient) a file name belongs to.

Images of one source on both sides of a split make the test score optimistic: the audit lists
the groups found in more than one split, and ``group_by="source"`` keeps each group on one side.
A Kaggle patient is ``person<N>_...`` or ``...IM-<N>-...``; a paper's figures, days and panels
share the stem left once the figure, panel and view suffixes are cut.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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


def source_groups(names: Iterable[str]) -> list[str]:
    """The source group of each file name, in order."""
    return [group_key(name) for name in names]
