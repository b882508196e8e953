"""Figures for people: training curves, confusion matrix, ROC curves, t-SNE map and Grad-CAM
panels.

Every function takes plain numpy data, draws on its own ``matplotlib.figure.Figure`` (no
pyplot, no display needed) and writes one PNG. Neither importing this module nor plotting
changes matplotlib's backend or global rcParams (a notebook's settings stay its own): the
font sizes apply inside each function, through ``matplotlib.rc_context``. Computing what is
drawn (metrics, t-SNE, Grad-CAM) lives in :mod:`xrayjax.evaluate` and :mod:`xrayjax.gradcam`;
the ROC curves are scikit-learn's ``roc_curve`` and their AUCs :mod:`xrayjax.stats`'.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from xrayjax.stats import roc_auc_known

DPI = 150  # a 13.8-inch figure printed at a 7-inch column's width: about 300 dpi
MARKERS = {"train": "o", "test": "^"}
# Okabe and Ito's colour-blind-safe palette, the strongest on white first (black left out: the
# marker edges are black)
SAFE_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
# The project's font sizes, set (matplotlib.rc_context) while each figure is drawn and saved.
FONT_SIZES = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
}


def _save(fig: Figure, path: str | os.PathLike) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


@matplotlib.rc_context(FONT_SIZES)
def plot_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "",
                accuracy: str = "accuracy") -> None:
    """Accuracy and loss per epoch, train vs validation, in two panels (from history.json).
    A run without a validation split has no validation curve. Train's are the running means of
    the epoch's steps (dropout on); the loss includes the L2 penalty, as Keras reports it.
    ``accuracy`` names what the accuracy is (a multilabel run's: each known label at 0.5)."""
    if not history:
        raise ValueError("plot_curves: the training history is empty (no epoch finished)")
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "accuracy", accuracy), (axes[1], "loss", "loss (cross-entropy + L2)")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", ms=3, label="train (running, dropout on)")
        if all(f"val_{metric}" in h for h in history):
            ax.plot(epochs, [h[f"val_{metric}"] for h in history], "s-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.set_ylabel(label)
        ax.set_title(f"{label[0].upper()}{label[1:]} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    _save(fig, path)


@matplotlib.rc_context(FONT_SIZES)
def plot_cv(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Each fold's validation (held-out) accuracy and loss per epoch, and their mean, from cv.json;
    the legend beside the panels, where it hides no curve."""
    fig = Figure(figsize=(12.5, 4.2))
    axes = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in records[0]["history"]]
    for ax, metric, label in ((axes[0], "val_accuracy", "Held-out accuracy"), (axes[1], "val_loss", "Held-out loss")):
        curves = np.array([[h[metric] for h in r["history"]] for r in records])
        seeds = sorted({r["seed"] for r in records})
        for r, curve in zip(records, curves):  # a line style per seed
            ax.plot(epochs, curve, ("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4], lw=1.2, alpha=0.6,
                    label=f"seed {r['seed']} fold {r['fold']}" if len(records) <= 10 else None)
        ax.plot(epochs, curves.mean(0), "k-", lw=2.5, label="mean of the folds")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_ylabel(label.lower())
        ax.set_title(f"{label} per epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        fig.suptitle(title)
    _save(fig, path)


@matplotlib.rc_context(FONT_SIZES)
def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Confusion matrix: each cell shows the count and the percentage of its true-class row."""
    matrix = np.asarray(matrix)
    k = len(class_names)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    fig = Figure(figsize=(1.5 * k + 2.8, 1.3 * k + 1.8))
    ax = fig.subplots()
    image = ax.imshow(share * 100, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, f"{matrix[i, j]}\n{share[i, j]:.0%}", ha="center", va="center",
                color="white" if share[i, j] > 0.55 else "black", fontsize=11,
            )
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"Confusion matrix (test, n={int(matrix.sum())})")
    _save(fig, path)


@matplotlib.rc_context(FONT_SIZES)
def plot_roc(
    labels: np.ndarray, probs: np.ndarray, label_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Test ROC curves of a multi-label task, one per label on its known rows ((N, L) labels 1.0,
    0.0 or NaN), with its AUC in the legend, beside the chance diagonal; labels with one class
    are named in the title, not drawn. Colours and dashes tell 14 labels apart."""
    labels, probs = np.asarray(labels, np.float64), np.asarray(probs, np.float64)
    colours = matplotlib.colormaps["tab10"].colors
    fig = Figure(figsize=(9.0, 6.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance (AUC 0.5)")
    skipped, aucs = [], []
    for j, name in enumerate(label_names):
        known = ~np.isnan(labels[:, j])
        auc = roc_auc_known(labels[known, j], probs[known, j])
        if np.isnan(auc):
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(labels[known, j], probs[known, j])
        drawn = len(aucs)
        aucs.append(float(auc))
        ax.plot(fpr, tpr, lw=1.6, color=colours[drawn % len(colours)], ls=("-", "--", "-.")[drawn // len(colours) % 3],
                label=f"{name} (AUC {auc:.3f}, {int(labels[known, j].sum())} pos)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, title="label (test)")
    heading = title or "ROC curves per label (test)"
    if aucs:
        heading += f"\nmean ROC-AUC {np.mean(aucs):.3f} over {len(aucs)} labels"
    if skipped:
        heading += "\n" + textwrap.fill("not drawn, one class in test: " + ", ".join(skipped), 90)
    ax.set_title(heading)
    _save(fig, path)


@matplotlib.rc_context(FONT_SIZES)
def plot_tsne(
    points: np.ndarray,
    labels: np.ndarray,
    subsets: Sequence[str],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    legend_title: str = "class (subset)",
) -> None:
    """A 2-D t-SNE map: colour = class (colour-blind safe up to 8), marker = subset ("train"
    circles, "test" triangles). The axes' values mean nothing, so they are not numbered."""
    points, labels, subsets = np.asarray(points), np.asarray(labels), np.asarray(subsets)
    colours = SAFE_COLOURS if len(class_names) <= len(SAFE_COLOURS) else matplotlib.colormaps["tab20"].colors
    fig = Figure(figsize=(7.5, 6.2))
    ax = fig.subplots()
    for subset, marker in MARKERS.items():
        for k, name in enumerate(class_names):
            keep = (subsets == subset) & (labels == k)
            if keep.any():
                test = subset == "test"
                ax.scatter(
                    points[keep, 0], points[keep, 1], marker=marker, s=60 if test else 28,
                    color=colours[k % len(colours)], edgecolors="black" if test else "none",
                    linewidths=0.6, alpha=0.9 if test else 0.6, label=f"{name} ({subset})",
                )
    ax.set_xlabel("t-SNE dimension 1")
    ax.set_ylabel("t-SNE dimension 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of the head's penultimate features")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), title=legend_title)
    ax.grid(alpha=0.2)
    _save(fig, path)


@matplotlib.rc_context(FONT_SIZES)
def plot_gradcam(
    images: np.ndarray,
    heatmaps: np.ndarray,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    confidences: Sequence[float],
    path: str | os.PathLike,
    title: str = "",
    correct: Sequence[bool] | None = None,
    pred_label: str = "pred",
) -> None:
    """Grad-CAM heatmaps over the grayscale X-rays, one panel per image, shared colorbar. A panel's
    title is marked ✓ in green where ``correct`` (default: the true name is the predicted one),
    else ✗ in red; ``pred_label`` names what ``pred_names`` are (a multilabel run's top label is
    not a prediction). The heat fades out where it is low, so the X-ray shows through; maps that
    are flat (a 1x1 last block, at a small image size) are said to carry no spatial information."""
    n = len(images)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.3 * cols + 1.2, 3.9 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    correct = [t == p for t, p in zip(true_names, pred_names)] if correct is None else correct
    flat = all(np.ptp(h) == 0 for h in heatmaps)  # nothing to show: the X-rays alone
    for ax, image, heat, true, pred, conf, right in zip(
        axes.flat, images, heatmaps, true_names, pred_names, confidences, correct
    ):
        gray = np.asarray(image, np.float32).mean(axis=-1)
        ax.imshow(gray, cmap="gray")
        if not flat:
            ax.imshow(heat, cmap="inferno", alpha=0.75 * np.clip(heat, 0.0, 1.0), vmin=0.0, vmax=1.0)
        true = textwrap.fill(f"true: {true}", 34, max_lines=2, placeholder=" …")  # a long list of labels
        ax.set_title(f"{'✓' if right else '✗'} {true}\n{pred_label}: {pred} ({conf:.0%})",
                     color="darkgreen" if right else "firebrick", fontsize=10)
    title = title or "Grad-CAM on the last convolutional block (test images)"
    fig.suptitle(f"{title}\n✓ green: {pred_label} correct; ✗ red: wrong"
                 + ("\nno heat drawn: the last block's map is 1x1 at this image size (no spatial information)"
                    if flat else ""))
    if not flat:
        fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="inferno"), ax=axes, shrink=0.8,
                     label="importance (max = 1)")
    fig.savefig(path, dpi=DPI)
