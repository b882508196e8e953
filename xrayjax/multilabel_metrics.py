"""Multi-label test metrics as the field reports them: per-label ROC-AUC, average precision,
a validation-chosen threshold, and the mean ROC-AUC over labels (metrics.json of ``task:
"multilabel"``).

Labels are (N, L) floats: 1.0 positive, 0.0 negative, NaN unknown; an unknown value is left
out of that label's numbers only. Probabilities are (N, L) sigmoid outputs. For each label, on
its known test rows:

- ROC-AUC (:func:`xrayjax.stats.roc_auc_known`, the project's one AUC) with a stratified
  bootstrap interval (:func:`xrayjax.stats.bootstrap`): the label's positives and negatives
  each resampled within themselves, as for the other tasks.
- Average precision: scikit-learn's ``average_precision_score``.
- A threshold chosen on the validation split by Youden's J (:func:`youden_threshold`), or 0.5
  where validation cannot choose one (``threshold_from`` says which); the test sensitivity and
  specificity at it (a score at or above the threshold is positive) with Wilson intervals.

The mean ROC-AUC is the unweighted mean over the labels with both classes among their known
test rows. Its interval resamples the test images jointly (an ordinary bootstrap of rows,
2,000 resamples, percentile): each resample recomputes every averaged label's AUC on its known
rows there and takes their mean. Resampling images rather than each label on its own keeps
the labels' correlation (an image's findings, and the model's scores for them, move together),
which independent resampling would ignore, understating the variance of the mean when labels
are positively correlated. No stratification exists for L labels at once, so a resample can
leave an averaged label with one class (about exp(-k) of them for a label with k positives):
those resamples are left out, so the interval is conditional on every averaged label keeping
both classes, as the point estimate does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_curve

from xrayjax.stats import BOOTSTRAP_RESAMPLES, bootstrap, roc_auc_known, wilson

DEFAULT_THRESHOLD = 0.5
FROM_VALIDATION = "validation: Youden's J"


def _checked(labels: np.ndarray, probs: np.ndarray, width: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) float64 labels and probabilities; ValueError on a shape or a label value that is
    not 1.0, 0.0 or NaN."""
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    if labels.ndim != 2 or labels.shape != probs.shape or labels.shape[1] != width:
        raise ValueError(f"{what}: labels {labels.shape} and probabilities {probs.shape} must both be "
                         f"(N, {width}), one column per label")
    bad = ~np.isnan(labels) & (labels != 0) & (labels != 1)
    if bad.any():
        raise ValueError(f"{what}: labels must be 1.0, 0.0 or NaN (unknown); found {labels[bad][0]}")
    return labels, probs


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) over scikit-learn's
    ``roc_curve`` thresholds of one label's (N,) labels (NaN left out) and scores, the highest
    on ties; finite ones only, so at least one row is called positive. None with one class."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    known = ~np.isnan(labels)
    labels, scores = labels[known], scores[known]
    if len(np.unique(labels)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    return float(thresholds[finite][np.argmax((tpr - fpr)[finite])])


def _threshold(val_labels: np.ndarray | None, val_probs: np.ndarray | None, j: int) -> tuple[float, str]:
    """Label ``j``'s threshold and where it came from."""
    if val_labels is None:
        return DEFAULT_THRESHOLD, f"default {DEFAULT_THRESHOLD}: no validation data"
    chosen = youden_threshold(val_labels[:, j], val_probs[:, j])
    if chosen is None:
        return DEFAULT_THRESHOLD, (f"default {DEFAULT_THRESHOLD}: fewer than two classes among the label's known "
                                   "validation rows")
    return chosen, FROM_VALIDATION


def _why_undefined(positives: int, negatives: int) -> str:
    if positives + negatives == 0:
        return "no known test value"
    return f"no {'positive' if positives == 0 else 'negative'} among its {positives + negatives} known test rows"


def _mean_auc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Mean over the columns of each resample's per-label AUC on its known rows: (R, n, L) -> (R,);
    NaN where a label has one class in the resample."""
    return np.mean([roc_auc_known(labels[..., j], probs[..., j]) for j in range(labels.shape[-1])], axis=0)


def mean_roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """The unweighted mean of the per-label ROC-AUCs of (N, L) ``labels`` (NaN: unknown) and
    ``probs``, over the labels with both classes among their known rows; None when none has."""
    aucs = roc_auc_known(np.asarray(labels).T, np.asarray(probs).T)
    aucs = aucs[~np.isnan(aucs)]
    return float(aucs.mean()) if len(aucs) else None


def multilabel_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    label_names: Sequence[str],
    val_labels: np.ndarray | None = None,
    val_probs: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """metrics.json's numbers for ``task: "multilabel"`` from the test split's (N, L) labels
    (1.0, 0.0, NaN) and probabilities; the validation split's, when given, choose each label's
    threshold. Intervals are seeded with ``seed`` (same seed, same intervals)."""
    names = list(label_names)
    labels, probs = _checked(labels, probs, len(names), "test")
    if (val_labels is None) != (val_probs is None):
        raise ValueError("validation labels and probabilities go together: pass both or neither")
    if val_labels is not None:
        val_labels, val_probs = _checked(val_labels, val_probs, len(names), "validation")
    per_label, ci_per_label, averaged = {}, {}, []
    for j, name in enumerate(names):
        known = ~np.isnan(labels[:, j])
        y, p = labels[known, j], probs[known, j]
        positive = y == 1
        pos, neg = int(positive.sum()), int((~positive).sum())
        threshold, source = _threshold(val_labels, val_probs, j)
        called = p >= threshold
        tp, tn = int(np.sum(called & positive)), int(np.sum(~called & ~positive))
        row = {"positives": pos, "negatives": neg, "unknown": int(np.sum(~known)), "roc_auc": None}
        if pos and neg:
            row["roc_auc"] = float(roc_auc_known(y, p))
            averaged.append(j)
        else:
            row["why"] = _why_undefined(pos, neg)
        row.update({
            "average_precision": float(average_precision_score(y, p)) if pos else None,
            "threshold": threshold,
            "threshold_from": source,
            "sensitivity": tp / pos if pos else None,
            "specificity": tn / neg if neg else None,
        })
        per_label[name] = row
        ci_per_label[name] = {
            "roc_auc": bootstrap(y, p, roc_auc_known, seed=seed) if pos and neg else None,
            "sensitivity": wilson(tp, pos),
            "specificity": wilson(tn, neg),
        }
    mean = mean_roc_auc(labels, probs)
    mean_ci = (bootstrap(labels[:, averaged], probs[:, averaged], _mean_auc, seed=seed,
                         strata=np.zeros(len(labels))) if averaged else None)
    return {
        "task": "multilabel",
        "label_names": names,
        "count": int(len(labels)),
        "per_label": per_label,
        "mean_roc_auc": mean,
        "mean_roc_auc_labels": [names[j] for j in averaged],
        "mean_roc_auc_what": "unweighted mean of the per-label ROC-AUCs over mean_roc_auc_labels (the labels "
                             "with both classes among their known test rows)",
        "ci95": {
            "method": f"sensitivity, specificity: Wilson score; per-label roc_auc: stratified bootstrap of the "
                      f"label's known rows (positives and negatives each resampled within themselves); "
                      f"mean_roc_auc: bootstrap of the test images jointly (labels' correlation kept; each "
                      f"label's AUC on its known rows in the resample; resamples leaving an averaged label "
                      f"one class left out); {BOOTSTRAP_RESAMPLES} resamples, seed {seed}, percentile",
            "mean_roc_auc": mean_ci,
            "per_label": ci_per_label,
        },
    }


def _ci(interval: list[float] | None) -> str:
    return "" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def _value(value: float | None, interval: list[float] | None = None) -> str:
    return "n/a" if value is None else f"{value:.3f}{_ci(interval)}"


def multilabel_summary(metrics: dict) -> str:
    """The report printed after a multi-label evaluation: the mean ROC-AUC, then one line per
    label (ROC-AUC, AP, counts, threshold, sensitivity, specificity; 95% intervals in brackets),
    then why any number is missing or any threshold is the default."""
    ci = metrics["ci95"]
    averaged = metrics["mean_roc_auc_labels"]
    width = max(len("label"), *(len(name) for name in metrics["label_names"])) + 2
    lines = [
        f"multi-label test on {metrics['count']} images, {len(metrics['label_names'])} labels; "
        f"95% intervals in brackets",
        f"mean ROC-AUC {_value(metrics['mean_roc_auc'], ci['mean_roc_auc'])} over {len(averaged)} of "
        f"{len(metrics['label_names'])} labels (images resampled jointly)",
        f"{'label':<{width}}{'ROC-AUC':<23}{'AP':>6}{'pos':>7}{'neg':>7}{'unk':>7}  {'threshold':<11}"
        f"{'sensitivity':<23}specificity",
    ]
    notes, defaults = [], {}
    for name in metrics["label_names"]:
        row, row_ci = metrics["per_label"][name], ci["per_label"][name]
        default = row["threshold_from"] != FROM_VALIDATION
        ap = "n/a" if row["average_precision"] is None else f"{row['average_precision']:.3f}"
        lines.append(
            f"{name:<{width}}{_value(row['roc_auc'], row_ci['roc_auc']):<23}{ap:>6}{row['positives']:>7}"
            f"{row['negatives']:>7}{row['unknown']:>7}  {row['threshold']:<.3f}{'*' if default else '':<6}"
            f"{_value(row['sensitivity'], row_ci['sensitivity']):<23}"
            f"{_value(row['specificity'], row_ci['specificity'])}")
        if "why" in row:
            notes.append(f"note: {name}: ROC-AUC n/a ({row['why']}), left out of the mean")
        if default:
            defaults.setdefault(row["threshold_from"], []).append(name)
    notes += [f"note: * threshold {source} ({', '.join(names)})" for source, names in defaults.items()]
    if "mean_roc_auc_by_split" in metrics:
        lines.append("mean ROC-AUC by split: " + ", ".join(f"{name} {_value(value)}" for name, value in
                                                           metrics["mean_roc_auc_by_split"].items()))
    return "\n".join(lines + notes)
