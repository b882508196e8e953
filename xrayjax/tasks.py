"""The names every layer shares: the tasks a head can have and the splits of a dataset.

- ``binary``: two classes, one sigmoid output (the report's Task 1 head);
- ``multiclass``: N >= 3 classes (or 2, by choice), a softmax over N outputs (the report's
  Task 2 head); ``four_class`` is the report's name for it and is read as ``multiclass``;
- ``multilabel``: L labels, each present or not (a labels file's findings), one sigmoid output
  per label, trained with binary cross-entropy masked where a label is unknown.
"""

from __future__ import annotations

TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")
TASK_ALIASES: dict[str, str] = {"four_class": "multiclass"}
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def canonical_task(task: str | None) -> str | None:
    """``task`` with the report's alias resolved (``four_class`` -> ``multiclass``); None stays None."""
    return TASK_ALIASES.get(task, task) if task is not None else None
