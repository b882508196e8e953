"""Test metrics and figures for a finished run: ``python -m xrayjax.evaluate --run DIR``.

Writes into the run folder ``metrics.json`` (accuracy, per-class precision/recall/F1,
confusion matrix, ROC-AUC), ``curves.png``, ``confusion.png``, ``tsne.png`` and
``gradcam.png``. Training calls :func:`evaluate_run` when it finishes.
"""

from __future__ import annotations

from xrayjax.cli import quiet_interrupts, run_command

if __name__ == "__main__":
    quiet_interrupts()  # the imports below take seconds

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.manifold import TSNE
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from threadpoolctl import threadpool_limits

from xrayjax import figures
from xrayjax.data import Split, Splits
from xrayjax.flags import ArgumentParser, positive_int
from xrayjax.gradcam import grad_cam
from xrayjax.inference import infer, infer_features, positive_labels, probabilities
from xrayjax.multilabel_metrics import mean_roc_auc, multilabel_metrics, multilabel_summary
from xrayjax.stats import intervals, macro_f1, roc_auc, roc_auc_per_class
from xrayjax.runfiles import (
    CONFIG_FILE, LOCK_FILE, METRICS_FILE, Run, load_run, load_run_splits, read_keras_import, write_json,
)
from xrayjax.runlock import RunFolderLock
from xrayjax.tasks import SPLITS

GRADCAM_IMAGES = 8
TSNE_POINTS = 2000  # at most this many points (a seeded random subset): t-SNE's time grows faster than N


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], seed: int = 0) -> dict:
    """Accuracy, per-class precision/recall/F1, confusion matrix (scikit-learn), macro F1 and
    ROC-AUC (:mod:`xrayjax.stats`, the code its intervals and cross-validation use too), and
    their 95% intervals in ``ci95`` (:func:`xrayjax.stats.intervals`, seeded with ``seed``).

    ``probs`` is (N, K) with K = len(class_names); the prediction is its argmax. ROC-AUC is
    on the class-1 probability for two classes and one-vs-rest macro for more; a class absent
    from ``labels`` is left out of the averages and named in ``notes`` instead of failing.
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    k = len(class_names)
    if probs.shape != (len(labels), k):
        raise ValueError(f"probabilities have shape {probs.shape}, expected ({len(labels)}, {k})")
    preds = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=list(range(k)), zero_division=0
    )
    notes = []
    missing = [class_names[c] for c in range(k) if not (labels == c).any()]
    if missing:
        notes.append(f"no test example of {', '.join(missing)}: its recall and AUC are undefined")
    unpredicted = [class_names[c] for c in range(k) if not (preds == c).any()]
    if unpredicted:
        notes.append(f"never predicted: {', '.join(unpredicted)}; precision is undefined there and shown as 0")
    result = {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, preds)),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
            }
            for c, name in enumerate(class_names)
        },
        "macro_f1": macro_f1(labels, probs),
        "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(k))).tolist(),
        "roc_auc": roc_auc(labels, probs),
    }
    if result["roc_auc"] is None:
        notes.append("ROC-AUC needs at least two classes in the labels: not computed")
    elif k == 2:
        result["roc_auc_positive_class"] = class_names[1]
    else:
        result["roc_auc_per_class"] = {
            name: None if np.isnan(auc) else float(auc)
            for name, auc in zip(class_names, roc_auc_per_class(labels, probs))
        }
        result["roc_auc_average"] = "one-vs-rest, macro over the classes present"
    result["ci95"] = intervals(labels, probs, class_names, seed)
    result["notes"] = notes
    return result


def tsne_points(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of (N, D) features; perplexity min(30, (N - 1) / 3) so small N works."""
    n = len(features)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    perplexity = float(min(30.0, (n - 1) / 3))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    )
    # One thread: at a few hundred points OpenMP's threads only contend.
    with threadpool_limits(limits=1):
        return tsne.fit_transform(np.asarray(features, np.float32))


def gradcam_indices(labels: np.ndarray, count: int = GRADCAM_IMAGES) -> np.ndarray:
    """Pick ``count`` images taking classes in turn (first of each class, then second, ...)."""
    labels = np.asarray(labels)
    queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < min(count, len(labels)):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return np.array(sorted(picked), dtype=np.int64)


def _test_predictions(split: Split, probs: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per test image: file name, true and predicted class, class probabilities."""
    return [
        {
            "name": name,
            "true": class_names[label],
            "predicted": class_names[int(row.argmax())],
            "probabilities": {c: round(float(p), 6) for c, p in zip(class_names, row)},
        }
        for name, label, row in zip(split.names, split.labels, probs)
    ]


def _plot_curves(run: Run, paths: dict[str, pathlib.Path], notes: list[str], title: str) -> None:
    """curves.png from the run's history; without one, a note and no ``curves`` in ``paths``."""
    if run.config.folds:  # after cross-validation the final model trains on both
        title += "\nthe final model, trained on train+validation (no validation curve)"
    if run.history:
        figures.plot_curves(run.history, paths["curves"], title=title, accuracy="label-wise accuracy (at 0.5)"
                            if run.config.task == "multilabel" else "accuracy")
    else:
        notes.append("history.json is empty: no curves.png")
        del paths["curves"]


def _tsne_or_note(n: int, paths: dict[str, pathlib.Path], notes: list[str]) -> bool:
    """Whether ``n`` scored images make a t-SNE; if not, a note and no ``tsne`` in ``paths``."""
    if n >= 4:
        return True
    notes.append(f"tsne.png needs at least 4 scored images, got {n}: score train too (evaluate --train)")
    del paths["tsne"]
    return False


def _write_figures(
    run: Run,
    splits: Splits,
    outputs: dict,
    metrics: dict,
    run_dir: pathlib.Path,
    test_features: np.ndarray | None,
) -> dict[str, str]:
    """curves.png, confusion.png, tsne.png and gradcam.png into ``run_dir``; their names."""
    class_names = tuple(run.class_names)
    cfg = run.config
    title = f"{cfg.arch} {cfg.task} ({cfg.init} init, color={cfg.color})"
    paths = {name: run_dir / f"{name}.png" for name in ("curves", "confusion", "tsne", "gradcam")}
    _plot_curves(run, paths, metrics["notes"], title)
    figures.plot_confusion(
        np.array(metrics["confusion_matrix"]), class_names, paths["confusion"],
        title=f"{title}\nconfusion matrix on the test set (n={metrics['n']})",
    )
    seen = [name for name in ("train", "test") if name in outputs]
    embeddings = np.concatenate([outputs[name][1] for name in seen])
    rows = np.arange(len(embeddings))
    subset = ""
    if len(rows) > TSNE_POINTS:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(len(rows), TSNE_POINTS, replace=False))
        subset = f" (a random {TSNE_POINTS:,} of {len(embeddings):,} images)"
    if _tsne_or_note(len(rows), paths, metrics["notes"]):
        figures.plot_tsne(
            tsne_points(embeddings[rows], seed=cfg.seed),
            np.concatenate([getattr(splits, name).labels for name in seen])[rows],
            np.concatenate([[name] * len(outputs[name][1]) for name in seen])[rows],
            class_names,
            paths["tsne"],
            title=f"{title}\nt-SNE of the head's penultimate features{subset}",
        )
    chosen = gradcam_indices(splits.test.labels)
    heat, logits = grad_cam(
        run.model, run.variables, splits.test.images[chosen],
        features=None if test_features is None else np.asarray(test_features)[chosen],
    )
    chosen_probs = probabilities(logits)
    figures.plot_gradcam(
        splits.test.images[chosen],
        heat,
        [class_names[i] for i in splits.test.labels[chosen]],
        [class_names[i] for i in chosen_probs.argmax(1)],
        chosen_probs.max(1),
        paths["gradcam"],
        title=f"{title}: Grad-CAM of the predicted class on the last conv block",
    )
    return {name: path.name for name, path in paths.items()}


def evaluate_run(
    run_dir: str | os.PathLike,
    splits: Splits | None = None,
    batch_size: int | None = None,
    quiet: bool = False,
    features: Mapping[str, Any] | None = None,
    score_train: bool = False,
    data_dir: str | None = None,
    tfds_dir: str | None = None,
) -> dict:
    """Test metrics and the four figures of a run, written into ``run_dir``; returns the metrics.

    ``splits`` defaults to the splits the run recorded (``splits.json``), rebuilt from its data
    (``data_dir`` and ``tfds_dir`` when they moved).
    ``features`` maps split names to the backbone's output for every image of that split, in
    order (training's feature cache): given for all three splits, only the head runs here.
    Otherwise the backbone runs in batches of ``batch_size``, by default the per-device batch
    training used, so the features (and a bf16 run's rounding) equal training's.
    Validation and test are scored; train only with ``score_train`` or when ``features`` hold it
    (without them it costs a backbone pass over every training image). The run folder is locked
    meanwhile: a run still training in it is a RunFolderError.
    """
    run = load_run(run_dir)
    run_dir = pathlib.Path(run_dir)
    had_lock_file = (run_dir / LOCK_FILE).exists()
    lock = RunFolderLock(run_dir, busy="wait for that run to end, then evaluate it")
    try:
        return _evaluate(run, run_dir, splits, batch_size, quiet, features, score_train, data_dir, tfds_dir)
    finally:
        lock.release(remove=not had_lock_file)


def _evaluate(run: Run, run_dir: pathlib.Path, splits: Splits | None, batch_size: int | None, quiet: bool,
              features: Mapping[str, Any] | None, score_train: bool, data_dir: str | None,
              tfds_dir: str | None) -> dict:
    cfg = run.config
    if splits is None and cfg.task == "multilabel" and cfg.labels is None and read_keras_import(run_dir) is not None:
        raise ValueError(f"{run_dir} holds a multilabel Keras model imported without a labels file, so it has no "
                         "labels to be scored on: import it again with weights/port.py --keras-model FILE "
                         "--class-names NAMES --labels FILE.csv --out NEW, then evaluate NEW with --data-dir")
    if splits is None:
        splits = load_run_splits(run_dir, data_dir, tfds_dir, quiet=quiet)
    if cfg.folds:  # its final model trained on train+validation
        splits = splits.pooled()
    class_names = tuple(run.class_names)
    if not len(splits.test):
        raise ValueError("the test split is empty: nothing to evaluate")
    if tuple(splits.class_names) != class_names:
        raise ValueError(
            f"the data's classes {splits.class_names} differ from the run's {class_names} "
            f"({run_dir / CONFIG_FILE}): evaluate with the task the run was trained on"
        )
    names = [name for name in SPLITS if len(getattr(splits, name))
             and (name != "train" or score_train or (features is not None and name in features))]
    cached = features is not None and all(name in features for name in names)
    if cached:
        for name in names:
            if len(features[name]) != len(getattr(splits, name)):
                raise ValueError(f"features of the {name} split: {len(features[name])} rows for "
                                 f"{len(getattr(splits, name))} images")
        outputs = dict(zip(names, infer_features(run.model, run.variables, [features[n] for n in names])))
    else:
        outputs = {
            name: infer(run.model, run.variables, getattr(splits, name), batch_size or run.feature_batch,
                        desc=None if quiet else f"evaluating {name}")
            for name in names
        }
    if cfg.task == "multilabel":
        metrics = _multilabel_report(run, splits, outputs, run_dir, features["test"] if cached else None)
        write_json(run_dir / METRICS_FILE, metrics)
        return metrics
    probs = {name: probabilities(logits) for name, (logits, _) in outputs.items()}
    metrics = compute_metrics(splits.test.labels, probs["test"], class_names, cfg.seed)
    metrics["class_names"] = list(class_names)
    metrics["probabilities"] = (
        f"sigmoid of the single logit = P({class_names[1]}); "
        f"P({class_names[0]}) = 1 - P({class_names[1]})"
        if outputs["test"][0].shape[1] == 1
        else "softmax of the logits"
    )
    metrics["accuracy_by_split"] = {
        name: float((p.argmax(1) == getattr(splits, name).labels).mean())
        for name, p in probs.items()
    }
    metrics["run"] = _run_record(run, metrics["notes"])
    metrics["test_predictions"] = _test_predictions(splits.test, probs["test"], class_names)
    metrics["figures"] = _write_figures(
        run, splits, outputs, metrics, run_dir, features["test"] if cached else None
    )
    write_json(run_dir / METRICS_FILE, metrics)
    return metrics


def _run_record(run: Run, notes: list[str]) -> dict:
    """The settings metrics.json names its run by, and ``epochs_trained``: the epochs the model
    finished, fewer than ``epochs`` for an interrupted run (said in ``notes``)."""
    cfg, trained = run.config, len(run.history)
    if trained < cfg.epochs:
        notes.append(f"the model finished {trained} of the run's {cfg.epochs} epochs (interrupted: "
                     f"python -m xrayjax.train --resume --out {run.run_dir} continues it)")
    return {**{key: getattr(cfg, key) for key in ("arch", "task", "init", "color", "image_size", "epochs")},
            "epochs_trained": trained}


def _epochs(run: dict) -> str:
    trained, epochs = run["epochs_trained"], run["epochs"]
    return f"epochs {trained}" if trained == epochs else f"epochs {trained} of {epochs}"


def _multilabel_report(run: Run, splits: Splits, outputs: dict, run_dir: pathlib.Path,
                       test_features: np.ndarray | None) -> dict:
    """metrics.json of a multilabel run (:func:`multilabel_metrics`, thresholds chosen on
    validation), and curves.png, roc.png, tsne.png (coloured by the most frequent training label)
    and gradcam.png (each image's top label)."""
    names, cfg = tuple(run.class_names), run.config
    probs = {name: probabilities(logits, multilabel=True) for name, (logits, _) in outputs.items()}
    validated = "validation" in probs
    metrics = multilabel_metrics(splits.test.labels, probs["test"], names,
                                 splits.validation.labels if validated else None,
                                 probs.get("validation"), seed=cfg.seed)
    metrics["probabilities"] = "sigmoid of each label's logit: P(label present)"
    metrics["mean_roc_auc_by_split"] = {name: mean_roc_auc(getattr(splits, name).labels, p)
                                        for name, p in probs.items()}
    metrics["notes"] = []
    metrics["run"] = _run_record(run, metrics["notes"])
    thresholds = np.array([metrics["per_label"][n]["threshold"] for n in names])
    metrics["test_predictions"] = [
        {"name": name, "labels": {n: None if np.isnan(v) else int(v) for n, v in zip(names, row)},
         "probabilities": {n: round(float(p), 6) for n, p in zip(names, prob)},
         "positive": positive_labels(names, prob, thresholds)}
        for name, row, prob in zip(splits.test.names, splits.test.labels, probs["test"])]
    title = f"{cfg.arch} multilabel ({cfg.init} init, color={cfg.color})"
    paths = {name: run_dir / f"{name}.png" for name in ("curves", "roc", "tsne", "gradcam")}
    _plot_curves(run, paths, metrics["notes"], title)
    figures.plot_roc(splits.test.labels, probs["test"], names, paths["roc"],
                     title=f"{title}\nROC curves on the test set (n={len(splits.test)})")
    frequent = int(np.argmax(np.nansum(splits.train.labels == 1.0, axis=0)))
    seen = [name for name in ("train", "test") if name in outputs]
    column = np.concatenate([getattr(splits, name).labels[:, frequent] for name in seen])
    colour = np.where(np.isnan(column), 2, column).astype(np.int32)
    if _tsne_or_note(len(colour), paths, metrics["notes"]):
        figures.plot_tsne(tsne_points(np.concatenate([outputs[name][1] for name in seen]), seed=cfg.seed), colour,
                          np.concatenate([[name] * len(outputs[name][1]) for name in seen]),
                          (f"no {names[frequent]}", names[frequent], "unknown"), paths["tsne"],
                          title=f"{title}\nt-SNE of the head's penultimate features, by {names[frequent]}",
                          legend_title=f"{names[frequent]} (subset)")
    chosen = np.arange(min(GRADCAM_IMAGES, len(splits.test)))
    top = probs["test"][chosen].argmax(1)
    heat, _ = grad_cam(run.model, run.variables, splits.test.images[chosen], classes=top,
                       features=None if test_features is None else np.asarray(test_features)[chosen])
    truth = [", ".join(n for n, v in zip(names, row) if v == 1.0) or "none" for row in splits.test.labels[chosen]]
    figures.plot_gradcam(splits.test.images[chosen], heat, truth, [names[i] for i in top],
                         probs["test"][chosen, top], paths["gradcam"],
                         title=f"{title}: Grad-CAM of each image's top label on the last conv block",
                         correct=splits.test.labels[chosen, top] == 1.0, pred_label="top label")
    metrics["figures"] = {name: path.name for name, path in paths.items()}
    return metrics


def _ci(interval: list[float] | None) -> str:
    return "" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]"


def summary(metrics: dict) -> str:
    """A short readable report of :func:`evaluate_run`'s metrics, with their 95% intervals."""
    run, ci = metrics["run"], metrics["ci95"]
    if metrics.get("task") == "multilabel":
        return "\n".join([f"{run['arch']} multilabel ({run['init']} init, color={run['color']}, {_epochs(run)})",
                          multilabel_summary(metrics), *(f"note: {n}" for n in metrics["notes"]),
                          "figures: " + ", ".join(metrics["figures"].values()) + "; metrics.json"])
    by_split = ", ".join(f"{k} {v:.1%}" for k, v in metrics["accuracy_by_split"].items())
    auc = "n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.3f}{_ci(ci['roc_auc'])}"
    f1 = "n/a" if metrics["macro_f1"] is None else f"{metrics['macro_f1']:.3f}{_ci(ci['macro_f1'])}"
    lines = [
        f"{run['arch']} {run['task']} ({run['init']} init, color={run['color']}, {_epochs(run)})",
        f"test on {metrics['n']} images, with 95% intervals: accuracy {metrics['accuracy']:.3f}"
        f"{_ci(ci['accuracy'])}, macro F1 {f1}, ROC-AUC {auc}",
        f"accuracy by split (inference mode): {by_split}",
        f"{'class':<15}{'precision':>10}{'':>16}{'recall':>8}{'':>16}{'f1':>7}{'support':>9}",
    ]
    for name, row in metrics["per_class"].items():
        p_ci, r_ci = ci["per_class"][name]["precision"], ci["per_class"][name]["recall"]
        lines.append(f"{name:<15}{row['precision']:>10.3f}{_ci(p_ci):<16}{row['recall']:>8.3f}{_ci(r_ci):<16}"
                     f"{row['f1']:>7.3f}{row['support']:>9d}")
    lines += [f"note: {note}" for note in metrics["notes"]]
    lines.append("figures: " + ", ".join(metrics["figures"].values()) + "; metrics.json")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: evaluate a run folder, print a summary; errors as one-line messages."""
    parser = ArgumentParser(
        prog="python -m xrayjax.evaluate",
        description="Evaluate a training run on its test split. Writes metrics.json (accuracy, "
        "per-class precision/recall/F1, confusion matrix, ROC-AUC, per-image predictions; multilabel: per-label "
        "ROC-AUC, AP and thresholds) and curves.png, confusion.png (multilabel: roc.png), tsne.png, gradcam.png "
        "into the run folder.",
    )
    parser.add_argument("--run", required=True,
                        help="run folder written by `python -m xrayjax.train --out DIR`")
    parser.add_argument("--data-dir",
                        help="dataset location, if not where the run was trained (folder or zip); the run's "
                        "recorded splits (splits.json) are scored, image by image")
    parser.add_argument("--tfds-dir", help="prepared-data folder, if not the run's")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="inference batch (default: the run's per-device training batch, so that on "
                        "the same device the backbone's features equal training's)")
    parser.add_argument("--train", action="store_true",
                        help="also score the train split (its accuracy, and train points in tsne.png): one more "
                        "backbone pass over every training image, about an epoch's forward time")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def body() -> int:
        metrics = evaluate_run(args.run, batch_size=args.batch_size, quiet=args.quiet, data_dir=args.data_dir,
                               tfds_dir=args.tfds_dir,
                               score_train=args.train)
        print(summary(metrics))
        print(f"written to {args.run}")
        return 0

    return run_command(body)

if __name__ == "__main__":
    raise SystemExit(main())
