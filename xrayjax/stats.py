"""Honest numbers on small test sets: 95% intervals, stratified folds and source groups.

- Accuracy, precision and recall are proportions: Wilson score intervals, which stay inside
  [0, 1] and keep their coverage at n = 18 where the normal approximation does not.
- Macro F1 and ROC-AUC are not proportions: a stratified bootstrap (each class resampled
  within itself, so every resample keeps the test set's class counts), 2,000 resamples,
  seeded, percentile interval.
- Multi-label tasks (:mod:`xrayjax.multilabel_metrics`) use the same AUC on each label's known
  rows (:func:`roc_auc_known`) and the same bootstrap, stratified per label, or over rows jointly
  for the mean over labels.
- Across cross-validation folds: mean, sample standard deviation, and a Student-t interval of
  the mean, clipped to [0, 1] (every metric summarised is in [0, 1]; with 3 folds the interval
  is wide enough to leave it).

:func:`macro_f1`, :func:`roc_auc`, :func:`roc_auc_per_class` and :func:`roc_auc_known` are the
project's one implementation of those metrics: metrics.json, its bootstrap intervals and
cross-validation all use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

Z95 = float(scipy_stats.norm.ppf(0.975))  # 1.959964
BOOTSTRAP_RESAMPLES = 2000
_BLOCK_VALUES = 1 << 20  # probabilities resampled at once (8 MiB of float64)


def wilson(successes: int, n: int) -> list[float] | None:
    """Wilson score 95% interval of a proportion; None when ``n`` is 0."""
    if n == 0:
        return None
    p, z = successes / n, Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Macro F1 of the argmax over the classes present in each row of ``labels`` (R, N), as
    scikit-learn's ``f1_score(average="macro", labels=present)``; (R,). 1-D inputs give a scalar."""
    labels, preds = np.atleast_2d(labels), np.atleast_2d(np.asarray(probs).argmax(-1))
    k = np.asarray(probs).shape[-1]
    f1, present = [], []
    for c in range(k):
        tp = np.sum((preds == c) & (labels == c), axis=1)
        predicted, actual = np.sum(preds == c, axis=1), np.sum(labels == c, axis=1)
        f1.append(np.where(predicted + actual > 0, 2 * tp / np.maximum(predicted + actual, 1), 0.0))
        present.append(actual > 0)
    f1, present = np.stack(f1, 1), np.stack(present, 1)
    out = np.sum(f1 * present, axis=1) / np.sum(present, axis=1)
    return out if np.ndim(probs) == 3 else float(out[0])


def _auc(positive: np.ndarray, scores: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Mann-Whitney ROC-AUC per row (ties count half), as scikit-learn's ``roc_auc_score``; with
    ``known``, over the known entries only (``positive`` False elsewhere): the others rank above
    every (finite) score, so the known entries' ranks are their ranks among themselves."""
    if known is not None:
        scores = np.where(known, scores, np.inf)
    ranks = scipy_stats.rankdata(scores, axis=-1)
    n_pos = positive.sum(-1)
    n_neg = (positive.shape[-1] if known is None else known.sum(-1)) - n_pos
    return (np.sum(ranks * positive, -1) - n_pos * (n_pos + 1) / 2) / np.maximum(n_pos * n_neg, 1)


def roc_auc_known(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of ``scores`` for ``labels`` 1.0 against 0.0, NaN labels (unknown) left out: (N,)
    inputs give a 0-d array, rows of (R, N) one value each; NaN where the known labels hold one
    class. Multi-label tasks' per-label AUC (:mod:`xrayjax.multilabel_metrics`)."""
    labels = np.asarray(labels, np.float64)
    known = ~np.isnan(labels)
    positive = labels == 1
    n_pos, n_neg = positive.sum(-1), known.sum(-1) - positive.sum(-1)
    return np.where((n_pos > 0) & (n_neg > 0), _auc(positive, np.asarray(scores, np.float64), known), np.nan)


def _rows(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (R, N) and probabilities (R, N, K) from single (N,), (N, K) inputs or rows of them."""
    return np.atleast_2d(labels), np.asarray(probs).reshape((-1, *np.shape(probs)[-2:]))


def roc_auc_per_class(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC of each class on its own probability: (K,) for 1-D ``labels``, (R, K)
    for rows of (R, N). NaN for a class absent from the labels (or the only one present)."""
    one = np.ndim(labels) == 1
    labels, probs = _rows(labels, probs)
    per = []
    for c in range(probs.shape[-1]):
        positive = labels == c
        defined = positive.any(1) & (~positive).any(1)
        per.append(np.where(defined, _auc(positive, probs[..., c]), np.nan))
    out = np.stack(per, 1)
    return out[0] if one else out


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray | float | None:
    """ROC-AUC on class 1 for two classes, one-vs-rest macro over the classes present for more
    (metrics.json's definitions); rows of (R, N) labels at once. None (1-D) or NaN (rows) with
    fewer than two classes present."""
    one = np.ndim(labels) == 1
    labels, probs = _rows(labels, probs)
    if probs.shape[-1] == 2:
        out = _auc(labels == 1, probs[..., 1])
        out = np.where(((labels == 1).any(1)) & ((labels == 0).any(1)), out, np.nan)
    else:
        per = roc_auc_per_class(labels, probs)
        defined = ~np.isnan(per)
        out = np.where(defined.any(1), np.sum(np.where(defined, per, 0.0), 1) / np.maximum(defined.sum(1), 1),
                       np.nan)
    if one:
        return None if np.isnan(out[0]) else float(out[0])
    return out


def bootstrap(labels: np.ndarray, probs: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], np.ndarray],
              seed: int = 0, strata: np.ndarray | None = None) -> list[float] | None:
    """Percentile 95% interval of ``metric`` over stratified bootstrap resamples (each class
    resampled with replacement within itself), computed a block of resamples at a time so that
    memory stays flat whatever the test set's size. Resamples where ``metric`` is not finite are
    left out.

    ``strata`` (one value per row) replaces the classes as the groups resampled within
    themselves: all equal, it is the ordinary bootstrap of rows, which resamples the rows of
    (N, L) multi-label ``labels`` and ``probs`` jointly."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    strata = labels if strata is None else np.asarray(strata)
    members = [np.flatnonzero(strata == c) for c in np.unique(strata)]
    block = max(1, _BLOCK_VALUES // probs.size)
    values = []
    for b, start in enumerate(range(0, BOOTSTRAP_RESAMPLES, block)):
        rng = np.random.default_rng([seed, b])
        rows = np.concatenate([rng.choice(m, (min(block, BOOTSTRAP_RESAMPLES - start), len(m))) for m in members],
                              axis=1)
        values.append(np.asarray(metric(labels[rows], probs[rows]), np.float64).reshape(-1))
    values = np.concatenate(values)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def intervals(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], seed: int = 0) -> dict:
    """The ``ci95`` object of metrics.json: ``[low, high]`` for every reported metric."""
    labels, probs = np.asarray(labels, np.int64), np.asarray(probs, np.float64)
    preds = probs.argmax(1)
    per_class = {}
    for c, name in enumerate(class_names):
        tp = int(np.sum((preds == c) & (labels == c)))
        per_class[name] = {"precision": wilson(tp, int(np.sum(preds == c))),
                           "recall": wilson(tp, int(np.sum(labels == c)))}
    return {
        "method": f"accuracy, precision, recall: Wilson score; macro_f1, roc_auc: stratified bootstrap, "
                  f"{BOOTSTRAP_RESAMPLES} resamples, seed {seed}, percentile",
        "accuracy": wilson(int(np.sum(preds == labels)), len(labels)),
        "per_class": per_class,
        "macro_f1": bootstrap(labels, probs, macro_f1, seed=seed),
        "roc_auc": bootstrap(labels, probs, roc_auc, seed=seed),
    }


def summarise(values: Sequence[float]) -> dict:
    """Mean, sample std and the 95% interval over the folds that have a metric in [0, 1] (``n``):
    Student-t interval of the mean, clipped to [0, 1] (a few folds' interval can leave the
    metric's range). One value has no spread: its std and interval are None."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    if len(x) < 2:
        return {"mean": float(x[0]) if len(x) else None, "std": None, "ci95": None, "n": int(len(x))}
    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.975, len(x) - 1) * std / np.sqrt(len(x)))
    return {"mean": mean, "std": std, "ci95": np.clip([mean - half, mean + half], 0.0, 1.0).tolist(), "n": int(len(x))}


def folds(labels: np.ndarray, k: int, seed: int, groups: Sequence[str] | None = None) -> list[np.ndarray]:
    """Held-out rows of each of ``k`` stratified folds (with ``groups``: no group in two folds).
    Multi-label ``labels`` (N, L) are not stratified: ``groups`` (patients) are shuffled into
    ``k`` folds of about equal size."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        groups = np.asarray(groups if groups is not None else np.arange(len(labels)).astype(str))
        if len(set(groups)) < k:
            raise ValueError(f"--folds {k}: only {len(set(groups))} patients; pass fewer folds")
        return [held for _, held in GroupKFold(k, shuffle=True, random_state=seed).split(labels, groups=groups)]
    smallest = int(np.bincount(labels)[np.unique(labels)].min())
    if groups is None and smallest < k:
        raise ValueError(f"--folds {k}: the smallest class has {smallest} image(s); "
                         + (f"pass --folds {smallest} or fewer" if smallest >= 2 else
                            "cross-validation needs at least 2 per class"))
    if groups is not None and len(set(groups)) < k:
        raise ValueError(f"--folds {k}: only {len(set(groups))} source groups; pass fewer folds")
    splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=seed) if groups is not None
                else StratifiedKFold(k, shuffle=True, random_state=seed))
    x = np.zeros(len(labels))
    return [held for _, held in splitter.split(x, labels, groups)]


def hold_out(labels: np.ndarray, fraction: float, seed: int, groups: Sequence[str]) -> np.ndarray:
    """Rows held out, stratified, keeping groups whole: one fold of round(1 / fraction) folds."""
    k = max(2, int(round(1 / fraction)))
    if len(set(groups)) < k:
        raise ValueError(f"holding out {fraction:.0%} by source needs at least {k} source groups; the data has "
                         f"{len(set(groups))}")
    return folds(labels, k, seed, groups)[0]
