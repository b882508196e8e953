"""Cross-validation on the cached backbone features: ``--folds K`` (and ``--seeds N``).

The backbone runs once (in :func:`xrayjax.fit`; with ``--folds`` the command line's final model
trains on train+validation); here each of the K stratified folds of train+validation (its cached
features pooled) trains a fresh head-only state with the run's settings on the other K-1 folds,
validating on the held-out fold every epoch, exactly as the fast path trains, and stopping as
training does when its loss diverges. Under ``--group-by source`` no source group is in two
folds; a multilabel run's folds keep each patient in one fold and are scored by accuracy (known
labels at 0.5) and the mean ROC-AUC over the labels with both classes in the fold. The test
split is never touched. Writes ``cv.json`` and ``cv.png`` into the run folder.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xrayjax import figures, runfiles
from xrayjax.data.splits import Split, split_folds
from xrayjax.inference import infer_features, probabilities
from xrayjax.loop import TrainResult
from xrayjax.trainer import TrainingDiverged, check_finite, rates, row_index, unstack
from xrayjax.multilabel_metrics import mean_roc_auc
from xrayjax.stats import macro_f1, roc_auc, summarise
from xrayjax.steps import (
    balanced_label_weights, build_step_model, create_train_state, epoch_key, init_head, make_head_steps,
)

CV_FILE = "cv.json"
CV_FIGURE = "cv.png"
METRICS = ("accuracy", "macro_f1", "roc_auc")
MULTILABEL_METRICS = ("accuracy", "mean_roc_auc")


def _fold_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float | None]:
    """The held-out fold's scores: METRICS, or MULTILABEL_METRICS for (N, L) labels."""
    if labels.ndim == 1:
        probs = probabilities(logits)
        return {"accuracy": float(np.mean(probs.argmax(1) == labels)), "macro_f1": macro_f1(labels, probs),
                "roc_auc": roc_auc(labels, probs)}
    probs, known = probabilities(logits, multilabel=True), ~np.isnan(labels)
    return {"accuracy": float(np.sum(known & ((probs >= 0.5) == (labels == 1))) / max(int(known.sum()), 1)),
            "mean_roc_auc": mean_roc_auc(labels, probs)}


def cross_validate(result: TrainResult, folds: int | None = None) -> dict[str, Any]:
    """Train and score a fresh head per fold and seed on ``result``'s cached train features;
    returns (and writes) the content of ``cv.json``. ``folds``: the run's ``--folds`` unless given.
    A fold whose loss diverges stops there and is reported with ``diverged`` (its metrics null),
    as training would stop."""
    splits, config = result.splits, result.spec.config
    if folds is not None:
        config = dataclasses.replace(config, folds=folds)
    if "train" not in result.features:
        raise ValueError("cross-validation needs the cached features of the fast path")
    parts = [name for name in ("train", "validation") if name in result.features]
    features = jnp.concatenate([result.features[name] for name in parts])
    pooled = Split.concat([getattr(splits, name) for name in parts])
    labels = np.asarray(pooled.labels, np.float32 if pooled.labels.ndim == 2 else np.int32)
    metrics = MULTILABEL_METRICS if labels.ndim == 2 else METRICS
    device = next(iter(features.devices()))
    on_device = jax.device_put(labels, device)
    # --label-weights: from the positive counts of train+validation, the same for every fold (one compiled step)
    weights = balanced_label_weights(labels) if config.label_weights else None
    model = build_step_model(config.arch, config.task, dropout=config.dropout, bf16=config.bf16, l2=config.l2,
                             num_classes=len(splits.class_names), label_weights=weights)
    train_fn, eval_fn = make_head_steps(model)
    records = []
    for seed in range(config.seed, config.seed + config.seeds):
        for k, held in enumerate(split_folds(pooled, config.folds, seed, config.group_by == "source")):
            rest = np.setdiff1d(np.arange(len(labels)), held)
            head = init_head(model, features.shape[1:], seed)
            state = jax.device_put(create_train_state(model, {
                "params": {"head": head["params"]}, "batch_stats": {"head": head.get("batch_stats", {})},
            }, config.lr), device)
            held_index = row_index(held, config.batch_size, shuffle=False, seed=seed, epoch=0)
            history, diverged = [], None
            for epoch in range(config.epochs):
                index = row_index(rest, config.batch_size, shuffle=True, seed=seed, epoch=epoch)
                state, train_sums = train_fn(state, features, on_device, *index, epoch_key(seed, epoch))
                train_sums = jax.device_get(train_sums)
                try:
                    check_finite(unstack(train_sums), epoch)
                except TrainingDiverged as e:
                    diverged = str(e)
                    break
                val_sums = eval_fn(state, features, on_device, *held_index)
                (train_loss, train_acc), (val_loss, val_acc) = rates(train_sums), rates(jax.device_get(val_sums))
                history.append({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                                "val_loss": val_loss, "val_accuracy": val_acc})
            record = {"seed": seed, "fold": k + 1, "train_images": int(len(rest)), "held_out_images": int(len(held)),
                      "last_epoch": history[-1] if history else None}
            if diverged is not None:
                record.update({"diverged": diverged, **dict.fromkeys(metrics)})
            else:
                (logits, _), = infer_features(model, {"params": state.params, "batch_stats": state.batch_stats},
                                              [features[held]])
                record.update(_fold_metrics(labels[held], logits))
            records.append({**record, "history": history})
    cv = {
        "folds": config.folds, "seeds": list(range(config.seed, config.seed + config.seeds)),
        "group_by": config.group_by, "images": int(len(labels)), "class_names": list(splits.class_names),
        "what": ("patient-grouped" if labels.ndim == 2 else "stratified group" if config.group_by else "stratified")
                + " K-fold over train+validation (the test split untouched); per fold a fresh head "
                f"with the run's settings; {', '.join(metrics)} of the held-out fold after the last "
                "epoch; mean, std (ddof 1) and a Student-t 95% interval of the mean, clipped to [0, 1], over "
                "every fold and seed that did not diverge and scored the metric (n)",
        "diverged": sum("diverged" in r for r in records),
        "summary": {m: summarise([r[m] for r in records]) for m in metrics},
        "per_fold": records,
    }
    run_dir = result.run_dir
    runfiles.write_json(run_dir / CV_FILE, cv)
    finished = [r for r in records if "diverged" not in r]
    if finished:  # the folds that trained every epoch
        figures.plot_cv(finished, run_dir / CV_FIGURE,
                        title=f"{config.arch} {config.task}: {config.folds}-fold cross-validation"
                              + (f", {config.seeds} seeds" if config.seeds > 1 else ""))
    return cv


def cv_summary(cv: dict[str, Any]) -> str:
    """One line per metric: mean ± std [95% interval] over the folds."""
    seeds = f" x {len(cv['seeds'])} seeds" if len(cv["seeds"]) > 1 else ""
    lines = [f"{cv['folds']}-fold cross-validation{seeds} on train+validation ({cv['images']} images), "
             f"held-out folds:"]
    if cv["diverged"]:
        lines.append(f"  {cv['diverged']} of {len(cv['per_fold'])} folds diverged (their loss became NaN or "
                     "infinite; see per_fold in cv.json) and are left out of the summary: try a lower --lr")
    scored = len(cv["per_fold"]) - cv["diverged"]
    for metric, s in cv["summary"].items():
        if s["mean"] is None or not math.isfinite(s["mean"]):
            lines.append(f"  {metric:<13} n/a")
            continue
        spread = (f" ± {s['std']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if s["std"] is not None
                  else " (no interval from one fold)")
        lines.append(f"  {metric:<13} {s['mean']:.3f}{spread}"
                     + (f" ({s['n']} of {scored} folds scored it)" if s["n"] < scored else ""))
    lines.append(f"written: {CV_FILE}" + (f", {CV_FIGURE}" if cv["diverged"] < len(cv["per_fold"]) else ""))
    return "\n".join(lines)
