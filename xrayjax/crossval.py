"""Cross-validation on the cached backbone features: ``--folds K`` (and ``--seeds N``).

The backbone runs once (in :func:`xrayjax.fit`; with ``--folds`` the command line's final model
trains on train+validation); here each of the K stratified folds of train+validation (its cached
features pooled) trains a fresh head with the run's settings on the other K-1 folds, validating
on the held-out fold every epoch, exactly as the fast path trains. Under ``--group-by source``
no source group is in two folds. The test split is never touched. Writes ``cv.json`` and
``cv.png`` into the run folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xrayjax import figures, runfiles
from xrayjax.config import TrainConfig
from xrayjax.data.pipeline import Split, split_folds
from xrayjax.loop import TrainResult, rates, row_index
from xrayjax.predict import infer_features, probabilities
from xrayjax.stats import macro_f1, roc_auc, summarise
from xrayjax.steps import build_step_model, create_train_state, epoch_key, init_head, make_head_steps

CV_FILE = "cv.json"
CV_FIGURE = "cv.png"
METRICS = ("accuracy", "macro_f1", "roc_auc")


def cross_validate(config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """Train and score a fresh head per fold and seed on ``result``'s cached train features;
    returns (and writes) the content of ``cv.json``."""
    splits = result.splits
    config = config.resolved(splits.class_names)
    if "train" not in result.features:
        raise ValueError("cross-validation needs the cached features of the fast path")
    parts = [name for name in ("train", "validation") if name in result.features]
    features = jnp.concatenate([result.features[name] for name in parts])
    pooled = Split.concat([getattr(splits, name) for name in parts])
    labels = np.asarray(pooled.labels, np.int32)
    device = next(iter(features.devices()))
    on_device = jax.device_put(labels, device)
    model = build_step_model(config.arch, config.task, dropout=config.dropout, bf16=config.bf16, l2=config.l2,
                             num_classes=len(splits.class_names))
    train_fn, eval_fn = make_head_steps(model)
    backbone = {"params": result.state.params["backbone"], "batch_stats": result.state.batch_stats["backbone"]}
    records = []
    for seed in range(config.seed, config.seed + config.seeds):
        for k, held in enumerate(split_folds(pooled, config.folds, seed, config.group_by == "source")):
            rest = np.setdiff1d(np.arange(len(labels)), held)
            head = init_head(model, features.shape[1:], seed)
            fresh = jax.tree.map(lambda x: x.copy(), backbone)  # the head epoch donates its state
            state = jax.device_put(create_train_state(model, {
                "params": {"backbone": fresh["params"], "head": head["params"]},
                "batch_stats": {"backbone": fresh["batch_stats"], "head": head.get("batch_stats", {})},
            }, config.lr), device)
            held_index = row_index(held, config.batch_size, 1, shuffle=False, seed=seed, epoch=0)
            history = []
            for epoch in range(config.epochs):
                index = row_index(rest, config.batch_size, 1, shuffle=True, seed=seed, epoch=epoch)
                state, train_sums = train_fn(state, features, on_device, *index, epoch_key(seed, epoch))
                val_sums = eval_fn(state, features, on_device, *held_index)
                (train_loss, train_acc), (val_loss, val_acc) = rates(jax.device_get(train_sums)), rates(
                    jax.device_get(val_sums))
                history.append({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                                "val_loss": val_loss, "val_accuracy": val_acc})
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            (logits, _), = infer_features(model, variables, [features[held]])
            probs = probabilities(logits)
            records.append({
                "seed": seed, "fold": k + 1, "train_images": int(len(rest)), "held_out_images": int(len(held)),
                "last_epoch": history[-1],
                "accuracy": float(np.mean(probs.argmax(1) == labels[held])),
                "macro_f1": macro_f1(labels[held], probs),
                "roc_auc": roc_auc(labels[held], probs),
                "history": history,
            })
    cv = {
        "folds": config.folds, "seeds": list(range(config.seed, config.seed + config.seeds)),
        "group_by": config.group_by, "images": int(len(labels)), "class_names": list(splits.class_names),
        "what": ("stratified group" if config.group_by else "stratified") + " K-fold over train+validation "
                "(the test split untouched); per fold a fresh head "
                "with the run's settings; accuracy, macro_f1 and roc_auc of the held-out fold after the last "
                "epoch; mean, std (ddof 1) and a Student-t 95% interval of the mean over every fold and seed",
        "summary": {m: summarise([r[m] for r in records]) for m in METRICS},
        "per_fold": records,
    }
    run_dir = Path(config.out)
    runfiles.write_json(run_dir / CV_FILE, cv)
    figures.plot_cv(records, run_dir / CV_FIGURE,
                    title=f"{config.arch} {config.task}: {config.folds}-fold cross-validation"
                          + (f", {config.seeds} seeds" if config.seeds > 1 else ""))
    return cv


def cv_summary(cv: dict[str, Any]) -> str:
    """One line per metric: mean ± std [95% interval] over the folds."""
    seeds = f" x {len(cv['seeds'])} seeds" if len(cv["seeds"]) > 1 else ""
    lines = [f"{cv['folds']}-fold cross-validation{seeds} on train+validation ({cv['images']} images), "
             f"held-out folds:"]
    for metric, s in cv["summary"].items():
        if s["mean"] is None or not math.isfinite(s["mean"]):
            lines.append(f"  {metric:<9} n/a")
            continue
        lines.append(f"  {metric:<9} {s['mean']:.3f} ± {s['std']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
    lines.append(f"written: {CV_FILE}, {CV_FIGURE}")
    return "\n".join(lines)
