"""The files of a run folder: settings, history, checkpoints, and :func:`load_run` to read them.

A run folder holds ``config.json`` (settings, class names, device, versions),
``history.json`` (one entry per finished epoch), ``checkpoint.msgpack`` (the step, the
trainable parameters, the head's statistics and the optimizer state after the last epoch)
and ``frozen.msgpack`` (the leaves that never change, written once). Every file is written
atomically; ``history.json`` is written before the checkpoint, so it never holds fewer
epochs than the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util
from flax import linen as nn

from xrayjax.config import TrainConfig
from xrayjax.models import create_model
from xrayjax.porting import save_variables, write_atomic
from xrayjax.steps import StepModel, TrainState, split_trainable

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.msgpack"
FROZEN_FILE = "frozen.msgpack"
TIMINGS_FILE = "timings.json"
# Settings a resumed run may change (device and process counts and the fast path change
# results only by float rounding); every other one must equal the checkpoint's run.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "quiet", "evaluate", "out", "num_devices", "cache_features",
     "coordinator", "num_processes", "process_id", "coordinator_timeout", "heartbeat_timeout"}
)


class RunFolderError(ValueError):
    """A run folder that cannot be read or continued; the message names the file."""


@dataclasses.dataclass
class Run:
    """A finished (or interrupted) run read back by :func:`load_run`."""

    config: TrainConfig
    class_names: tuple[str, ...]
    model: nn.Module
    variables: dict[str, Any]
    history: list[dict[str, float]]
    run_dir: Path
    feature_batch: int  # images per device per backbone call in training (evaluation repeats it)


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    """The JSON in ``path``; RunFolderError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}); the run folder is damaged") from e


def versions() -> dict[str, str]:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def write_config(run_dir: Path, config: TrainConfig, class_names: tuple[str, ...], devices: list) -> None:
    """``config.json``: the settings, class names, device and library versions."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG_FILE, {
        "config": dataclasses.asdict(config),
        "class_names": list(class_names),
        "device": f"{devices[0].platform}: {devices[0].device_kind}",
        "num_devices": len(devices),
        "num_processes": jax.process_count(),
        "versions": versions(),
    })


def read_config(run_dir: Path) -> tuple[TrainConfig, tuple[str, ...], int]:
    """The settings, class names and device count of ``config.json``; RunFolderError on missing
    or unknown keys."""
    path = run_dir / CONFIG_FILE
    meta = read_json(path)
    if not isinstance(meta, dict) or not {"config", "class_names", "num_devices"} <= set(meta):
        raise RunFolderError(f"{path} lacks 'config', 'class_names' or 'num_devices': it was not written "
                             "by xrayjax.train")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(meta["config"]) - known)
    if unknown:
        raise RunFolderError(f"{path} has settings this version of xrayjax does not know: "
                             f"{', '.join(unknown)} (written by a newer version?)")
    return TrainConfig(**meta["config"]), tuple(meta["class_names"]), int(meta["num_devices"])


def read_history(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / HISTORY_FILE
    return read_json(path) if path.is_file() else []


def _moving_and_frozen(model: StepModel, state: TrainState) -> tuple[dict, dict]:
    """(moving, frozen) parts of ``state``'s params and batch_stats. Frozen leaves (those the
    optimizer never opens, and the backbone's statistics) are written once, not every epoch."""
    moving, frozen = split_trainable(model, state.params)
    stats = state.batch_stats
    return (
        {"params": traverse_util.unflatten_dict(moving), "batch_stats": {"backbone": {}, "head": stats["head"]}},
        {"params": traverse_util.unflatten_dict(frozen), "batch_stats": {"backbone": stats["backbone"], "head": {}}},
    )


def write_checkpoint(run_dir: Path, model: StepModel, state: TrainState, epoch: int, *, frozen: bool) -> None:
    """``checkpoint.msgpack`` after ``epoch``; ``frozen.msgpack`` too when ``frozen`` (a fresh
    run's first checkpoint, so no other run's file is ever reused)."""
    moving, fixed = jax.device_get(_moving_and_frozen(model, state))
    if frozen:
        save_variables(fixed, run_dir / FROZEN_FILE)
    payload = {"state": serialization.to_state_dict(jax.device_get(state.replace(**moving))), "epoch": epoch}
    write_atomic(run_dir / CHECKPOINT_FILE, serialization.msgpack_serialize(payload))


def _read_msgpack(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run folder {path.parent} is incomplete")
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise RunFolderError(f"cannot read {path} ({e}): it is not a flax msgpack file") from e


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Any], int]:
    """(state dict with the frozen leaves merged in, epoch) of the run's last checkpoint."""
    checkpoint = _read_msgpack(run_dir / CHECKPOINT_FILE)
    frozen = _read_msgpack(run_dir / FROZEN_FILE)
    try:
        state, epoch = checkpoint["state"], int(checkpoint["epoch"])
        for col in ("params", "batch_stats"):
            merged = traverse_util.unflatten_dict(
                {**traverse_util.flatten_dict(state[col]), **traverse_util.flatten_dict(frozen[col])}
            )
            state[col] = {part: merged.get(part, {}) for part in ("backbone", "head")}
    except (KeyError, TypeError) as e:
        raise RunFolderError(f"{run_dir / CHECKPOINT_FILE} or {FROZEN_FILE} lacks {e}: the run folder "
                             "is damaged or from another version") from e
    return state, epoch


def check_resume(config: TrainConfig, run_dir: Path) -> tuple[dict, int, list]:
    """(state dict, epoch, history) of ``run_dir`` after checking ``config`` continues its run."""
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {run_dir / CHECKPOINT_FILE}; start the run "
                                "without --resume")
    saved = read_config(run_dir)[0]
    saved, current = dataclasses.asdict(saved), dataclasses.asdict(config)
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved[k] != current[k])
    if changed:
        raise ValueError(
            f"--resume: the run in {run_dir} was trained with other settings: "
            + ", ".join(f"{k}={saved[k]!r} (now {current[k]!r})" for k in changed)
            + "; pass the same settings or choose another --out"
        )
    state, epoch = read_checkpoint(run_dir)
    history = read_history(run_dir)
    if len(history) < epoch:
        raise RunFolderError(f"{run_dir / HISTORY_FILE} has {len(history)} epochs but the checkpoint "
                             f"{epoch}: the run folder is damaged")
    return state, epoch, history[:epoch]


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder: its settings, class names, model, final variables and history."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} is missing: {run_dir} is not a training run "
                                "folder (train one with `python -m xrayjax.train --out DIR`)")
    config, class_names, num_devices = read_config(run_dir)
    state, _ = read_checkpoint(run_dir)
    return Run(
        config=config,
        class_names=class_names,
        model=create_model(config.arch, config.task, dropout=config.dropout,
                           dtype=jnp.bfloat16 if config.bf16 else jnp.float32),
        variables={"params": jax.device_put(state["params"]),
                   "batch_stats": jax.device_put(state.get("batch_stats") or {})},
        history=read_history(run_dir),
        run_dir=run_dir,
        feature_batch=max(config.batch_size // num_devices, 1),
    )
