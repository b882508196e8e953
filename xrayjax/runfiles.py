"""The files of a run folder: settings, history, checkpoints, and :func:`load_run` to read them.

A run folder holds ``config.json`` (settings, class names, device, versions), ``splits.json``
(the key of every image in train, validation and test), ``history.json`` (one entry per
finished epoch), ``checkpoint.msgpack`` (the step, the trainable parameters, the head's
statistics and the optimizer state after the last epoch), ``frozen.msgpack`` (the leaves that
never change, written once) and ``timings.json`` (the phases of every command that trained it).
Each file has one writer here. Every file is written
atomically; ``history.json`` is written before the checkpoint, so it never holds fewer
epochs than the checkpoint. The checkpoint records the sha256 of its state and of
``frozen.msgpack``, checked on every load. Training holds ``.lock`` (:class:`xrayjax.runlock.RunFolderLock`)
from its start to its end, so no two trainings ever write one folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from xrayjax.data import Splits, load_splits
from xrayjax.models import Classifier, create_backbone, create_model
from xrayjax.tasks import canonical_task
from xrayjax.atomic import write_atomic
from xrayjax.steps import StepModel, TrainState, split_trainable

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.msgpack"
FROZEN_FILE = "frozen.msgpack"
TIMINGS_FILE = "timings.json"
SPLITS_FILE = "splits.json"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.json"
RUN_FILES = (CONFIG_FILE, SPLITS_FILE, HISTORY_FILE, CHECKPOINT_FILE, FROZEN_FILE, TIMINGS_FILE, METRICS_FILE)
# Settings a resumed run may change (device and process counts and the fast path change
# results only by float rounding, the reader count not at all; where the data lives is checked
# image by image against splits.json); every other one must equal the checkpoint's run.
RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "quiet", "evaluate", "eval_train", "out", "num_devices", "cache_features", "workers",
     "weights_dir", "tfds_dir", "data_dir", "labels", "coordinator", "num_processes", "process_id",
     "coordinator_timeout", "heartbeat_timeout"}
)


class RunFolderError(ValueError):
    """A run folder that cannot be read, continued or used now; the message names the file."""


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
    """The JSON in ``path``; RunFolderError naming the file, and what to do, when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({e}): the run folder is damaged. Restore the file from a "
                             "backup, or train the run again into a new --out") from e


def versions() -> dict[str, str]:
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version()}


def write_config(run_dir: Path, config: TrainConfig, class_names: tuple[str, ...], devices: list,
                 keras_import: dict[str, Any] | None = None) -> None:
    """``config.json``: the settings, class names, device and library versions (and, for a Keras
    model imported whole, ``keras_import``: its source file, sha256, preprocessing and head layers)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = {} if keras_import is None else {"keras_import": keras_import}
    write_json(run_dir / CONFIG_FILE, {**extra,
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
    if not isinstance(meta["config"], dict) or not isinstance(meta["num_devices"], int) or meta["num_devices"] < 1:
        raise RunFolderError(f"{path}: 'config' must be an object and 'num_devices' a positive integer")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = meta["config"]
    # a setting a resumed run may change leaves what was trained as it is: missing, it takes its default
    unknown, missing = sorted(set(settings) - known), sorted(known - set(settings) - RESUMABLE_CHANGES)
    if unknown:
        raise RunFolderError(f"{path} has settings this version of xrayjax does not know: "
                             f"{', '.join(unknown)} (written by a newer version?)")
    if missing:
        raise RunFolderError(f"{path} lacks the settings {', '.join(missing)}: written by an older version of "
                             "xrayjax (or edited); train the run again with this version")
    # --group-by never applied to a labels file (now refused with --labels): a run that recorded both
    group_by = None if settings.get("labels") else settings.get("group_by")
    config = TrainConfig(**{**settings, "task": canonical_task(settings["task"]), "group_by": group_by})
    return config, tuple(meta["class_names"]), int(meta["num_devices"])


def read_keras_import(run_dir: Path) -> dict[str, Any] | None:
    """The ``keras_import`` record of an imported Keras model's ``config.json``, or None."""
    record = read_json(run_dir / CONFIG_FILE).get("keras_import")
    if record is not None and not (isinstance(record, dict) and {"head", "preprocess"} <= set(record)):
        raise RunFolderError(f"{run_dir / CONFIG_FILE}: 'keras_import' lacks 'head' or 'preprocess': the run "
                             "folder is damaged; import the Keras model again")
    return record


def write_imported_checkpoint(run_dir: Path, variables: dict[str, Any]) -> None:
    """The checkpoint of an imported model (epoch 0): the head in ``checkpoint.msgpack``, the
    backbone in ``frozen.msgpack``, as training writes them."""
    def part(name: str) -> dict[str, Any]:
        return {c: {p: (variables.get(c, {}).get(p, {}) if p == name else {}) for p in ("backbone", "head")}
                for c in ("params", "batch_stats")}
    _write_checkpoint_files(run_dir, {"step": 0, **jax.tree.map(np.asarray, part("head"))}, part("backbone"), 0, None)


def imported_model(config: TrainConfig, record: dict[str, Any]) -> Classifier:
    """The Classifier of an imported Keras model: the zoo backbone with the recorded
    preprocessing, then :class:`~xrayjax.models.heads.KerasHead` of the recorded layers."""
    from xrayjax.models.heads import KerasHead

    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    head = KerasHead(tuple(tuple(sorted(layer.items())) for layer in record["head"]))
    return Classifier(backbone=create_backbone(config.arch, dtype=dtype, preprocessing=record["preprocess"]),
                      head=head)


def write_splits(run_dir: Path, splits: Splits) -> None:
    """``splits.json``: the prepared data's key and every image of each split (see ``Splits.record``)."""
    write_json(run_dir / SPLITS_FILE, splits.record())


def read_splits(run_dir: Path) -> dict[str, Any] | None:
    """The run's recorded splits, or None when it recorded none (trained on splits given in
    memory, whose images have no keys)."""
    path = run_dir / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run folder {run_dir} is incomplete, or was written by an "
                                "older version of xrayjax; train the run again")
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("splits"), dict):
        raise RunFolderError(f"{path} lacks 'splits': the run folder is damaged; train the run again")
    return record if any(record["splits"].values()) else None


def load_run_splits(run_dir: Path, data_dir: str | None = None, tfds_dir: str | None = None,
                    quiet: bool = False) -> Splits:
    """The splits a run trained on, rebuilt from its ``splits.json`` and the data in its
    ``config.json`` (or ``data_dir``/``tfds_dir`` when the data moved); DataError when images the
    run recorded are gone, a warning for images it never saw."""
    config, class_names, _ = read_config(run_dir)
    recorded = read_splits(run_dir)
    if recorded is None and data_dir is not None and read_keras_import(run_dir) is not None:
        # A Keras model imported whole saw none of this data: split it as a fresh run would
        # (its test/ folder, or the seeded held-out --test-fraction) and evaluate on the test split,
        # every output of the model scored (a labels file's labels: even one without a train positive).
        fresh = dataclasses.replace(config, data_dir=str(Path(data_dir).expanduser().resolve()),
                                    tfds_dir=tfds_dir or config.tfds_dir)
        if not Path(fresh.data_dir).exists():
            raise FileNotFoundError(f"--data-dir {data_dir} does not exist")
        return load_splits(fresh.data_config(), quiet=quiet,
                           labels=class_names if config.task == "multilabel" else None)
    if recorded is None:
        raise ValueError(f"{run_dir / SPLITS_FILE} names no image: " + (
            "the run is a Keras model imported by weights/port.py --keras-model and saw no data; pass --data-dir "
            "DATA to evaluate it on DATA's test split" if read_keras_import(run_dir) is not None else
            "the run was trained on splits given in memory; pass them (evaluate_run(run_dir, splits))"))
    where = "--data-dir" if data_dir else f"the data_dir recorded in {run_dir / CONFIG_FILE}"
    data_dir = data_dir or config.data_dir
    if data_dir is None or not Path(data_dir).exists():
        raise FileNotFoundError(f"{where} ({data_dir}) does not exist: pass --data-dir with the data the run was "
                                "trained on")
    moved = config.data_moved(str(Path(data_dir).expanduser().resolve()), tfds_dir)
    return load_splits(moved.data_config(), recorded=recorded, quiet=quiet)


def append_timings(run_dir: Path, phases: dict[str, float], first_epoch: int) -> None:
    """Add this command's phases to ``timings.json`` (one record per training command, so a resumed
    run keeps the phases of each of its parts)."""
    path = run_dir / TIMINGS_FILE
    records = read_json(path) if path.is_file() else []
    if not isinstance(records, list):  # written before one record per command
        records = [{"phases": records}]
    records.append({"started_at_epoch": first_epoch, "phases": dict(phases)})
    write_json(path, records)


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


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read back: the state dict (frozen leaves merged in), the epochs it completed,
    the sha256 of the run's ``frozen.msgpack``, and where in the next epoch it stopped: ``step``
    steps trained (0: at the epoch's start) and their summed metrics (``sums``)."""

    state: dict[str, Any]
    epoch: int
    frozen_sha256: str
    step: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def trained(self) -> bool:
        """Whether any step was trained (a Keras model imported whole has not: epoch 0, step 0)."""
        return bool(self.epoch or self.step)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(run_dir: Path, model: StepModel, state: TrainState, epoch: int,
                     frozen_sha256: str | None, step: int = 0, sums: dict[str, float] | None = None) -> str:
    """``checkpoint.msgpack`` after ``epoch`` epochs and ``step`` steps of the next (with their
    summed metrics ``sums``: a run stopped mid-epoch); first ``frozen.msgpack`` when
    ``frozen_sha256`` is None (a fresh run's first checkpoint, so no other run's file is ever
    reused). Returns the sha256 of ``frozen.msgpack``, which the checkpoint records beside its
    own state's."""
    moving, fixed = jax.device_get(_moving_and_frozen(model, state))
    return _write_checkpoint_files(run_dir, serialization.to_state_dict(jax.device_get(state.replace(**moving))),
                                   fixed, epoch, frozen_sha256, {"step": step, "sums": dict(sums or {})})


def _write_checkpoint_files(run_dir: Path, state_dict: dict[str, Any], fixed: Any, epoch: int,
                            frozen_sha256: str | None, position: dict[str, Any] | None = None) -> str:
    """``frozen.msgpack`` (``fixed``) when ``frozen_sha256`` is None, then ``checkpoint.msgpack``
    (``state_dict``, and the ``position`` within the next epoch); returns the sha256 of
    ``frozen.msgpack``."""
    if frozen_sha256 is None:
        frozen_bytes = serialization.msgpack_serialize(jax.tree.map(np.asarray, fixed))
        write_atomic(run_dir / FROZEN_FILE, frozen_bytes)
        frozen_sha256 = _sha256(frozen_bytes)
    state_bytes = serialization.msgpack_serialize(state_dict)
    payload = {"state": state_bytes, "state_sha256": _sha256(state_bytes), "epoch": epoch,
               "frozen_sha256": frozen_sha256, "position": position or {"step": 0, "sums": {}}}
    write_atomic(run_dir / CHECKPOINT_FILE, serialization.msgpack_serialize(payload))
    return frozen_sha256


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run folder {path.parent} is incomplete")
    return path.read_bytes()


def _restore(data: bytes, path: Path) -> dict[str, Any]:
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise RunFolderError(f"cannot read {path} ({e}): it is damaged or not a flax msgpack file") from e


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The run's last checkpoint, after checking both files against the recorded sha256."""
    path = run_dir / CHECKPOINT_FILE
    payload = _restore(_read_bytes(path), path)
    frozen_path = run_dir / FROZEN_FILE
    frozen_bytes = _read_bytes(frozen_path)
    try:
        state_bytes, epoch = payload["state"], int(payload["epoch"])
        recorded = {path: payload["state_sha256"], frozen_path: payload["frozen_sha256"]}
    except (KeyError, TypeError) as e:
        raise RunFolderError(f"{path} lacks {e}: it was written by another version of xrayjax or is "
                             "damaged") from e
    for damaged, data in ((path, state_bytes), (frozen_path, frozen_bytes)):
        if _sha256(data) != recorded[damaged]:
            raise RunFolderError(f"{damaged} is damaged: its sha256 differs from the one recorded when "
                                 "it was written; restore it from a backup or train the run again")
    state, frozen = _restore(state_bytes, path), _restore(frozen_bytes, frozen_path)
    try:
        for col in ("params", "batch_stats"):
            # the checkpoint's leaves win: a fine-tuned imported run keeps its whole Keras backbone in frozen.msgpack
            merged = traverse_util.unflatten_dict(
                {**traverse_util.flatten_dict(frozen[col]), **traverse_util.flatten_dict(state[col])}
            )
            state[col] = {part: merged.get(part, {}) for part in ("backbone", "head")}
    except (KeyError, TypeError) as e:
        raise RunFolderError(f"{path} or {frozen_path} lacks {e}: the run folder is damaged") from e
    position = payload.get("position") or {}  # absent: written before mid-epoch checkpoints
    return Checkpoint(state, epoch, recorded[frozen_path], int(position.get("step", 0)),
                      {k: float(v) for k, v in position.get("sums", {}).items()})


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder: its settings, class names, model, final variables and history."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} is missing: {run_dir} is not a training run "
                                "folder (train one with `python -m xrayjax.train --out DIR`)")
    config, class_names, num_devices = read_config(run_dir)
    state = read_checkpoint(run_dir).state
    record = read_keras_import(run_dir)
    return Run(
        config=config,
        class_names=class_names,
        model=imported_model(config, record) if record is not None else
        create_model(config.arch, config.task, dropout=config.dropout,
                     dtype=jnp.bfloat16 if config.bf16 else jnp.float32, num_classes=len(class_names)),
        variables={"params": jax.device_put(state["params"]),
                   "batch_stats": jax.device_put(state.get("batch_stats") or {})},
        history=read_history(run_dir),
        run_dir=run_dir,
        feature_batch=max(config.batch_size // num_devices, 1),
    )
