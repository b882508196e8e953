"""What ``--resume`` continues with: the run's settings (the imported Keras model's too) and the
checks that the command continues the run it names."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from pathlib import Path
from typing import Any

from xrayjax.config import TrainConfig
from xrayjax.runfiles import (
    CHECKPOINT_FILE, CONFIG_FILE, HISTORY_FILE, RESUMABLE_CHANGES, Checkpoint, RunFolderError, read_checkpoint,
    read_config, read_history, read_keras_import,
)
from xrayjax.tasks import canonical_task

# A command's own settings, which --resume never takes from the run: where it writes and logs,
# whether it evaluates at the end, and this host's part (readers, weights folder, multi-host flags).
COMMAND_SETTINGS = frozenset(
    {"resume", "out", "quiet", "evaluate", "eval_train", "workers", "weights_dir", "coordinator", "num_processes",
     "process_id", "coordinator_timeout", "heartbeat_timeout"}
)
# What a Keras model imported whole (weights/port.py --keras-model) fixes: the model and its input.
IMPORTED_SETTINGS = ("arch", "task", "image_size", "color", "init")


def resume_settings(config: TrainConfig, given: Collection[str] | None = None
                    ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """For ``--resume`` of the run in ``--out``: ``config`` with the run's settings, and the
    ``keras_import`` record of a Keras model imported whole (else None).

    From the command line (``given``: its flags), each setting left out takes the run's recorded
    value, except this command's own (COMMAND_SETTINGS), so ``--resume --out DIR`` continues the
    run as it was started. From Python (``given`` None) nothing is taken: :func:`check_resume`
    compares every value with the run's. A Keras model imported whole records no training
    settings before it trains (its epochs are 0); it gives its IMPORTED_SETTINGS (and its ``l2``
    unless ``--l2`` is given) either way.

    Raises ValueError for a setting the imported model fixes given another value (from Python:
    a value other than TrainConfig's default), ``--dropout`` (its head keeps its own rates) and
    ``--folds`` (cross-validation trains the report's heads).
    """
    run_dir = Path(config.out).expanduser().resolve() if config.out else None
    if not config.resume or run_dir is None or not (run_dir / CONFIG_FILE).is_file():
        return config, None
    saved, record = read_config(run_dir)[0], read_keras_import(run_dir)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if given is not None and (record is None or saved.epochs > 0):
        config = dataclasses.replace(config, **{name: getattr(saved, name) for name in names
                                                if name not in given and name not in COMMAND_SETTINGS})
        if "data_dir" in given and "labels" not in given and config.data_dir is not None:  # the data moved
            moved = saved.data_moved(str(Path(config.data_dir).expanduser().resolve()))
            config = dataclasses.replace(config, labels=moved.labels)
    if record is None:
        return config, None
    if given is None:
        defaults = TrainConfig()
        given = {name for name in names if getattr(config, name) != getattr(defaults, name)}
    what = f"the run in {run_dir} is a Keras model imported by weights/port.py --keras-model"
    for name in IMPORTED_SETTINGS:
        value = canonical_task(config.task) if name == "task" else getattr(config, name)
        if name in given and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value}: {what}, whose {flag} is {getattr(saved, name)}; leave {flag} out")
    if "dropout" in given:
        raise ValueError(f"--dropout {config.dropout}: {what}; its head keeps the Dropout rates of its Keras "
                         "layers, so leave --dropout out")
    if config.folds:
        raise ValueError(f"--folds {config.folds}: {what}; cross-validation trains fresh report heads, not its "
                         "Keras head, so leave --folds out")
    kept = {name: getattr(saved, name) for name in IMPORTED_SETTINGS}
    if "labels" not in given and saved.labels is not None:  # the labels file named at import
        kept["labels"] = saved.labels
    return dataclasses.replace(config, **kept, l2=saved.l2 if config.l2 is None else config.l2), record


def _imported_classes_fix(run: tuple[str, ...], data: tuple[str, ...]) -> str:
    """What to do when an imported Keras model's classes (``run``) are not the data's: each output
    is named at import for what it was trained to predict, so a fix never renames a named output
    to another class (that would swap what the outputs mean)."""
    if set(run) == {f"class_{i}" for i in range(len(run))}:  # listed sorted as text: class_10 before class_2
        return (f"the imported Keras model's outputs are unnamed: import it again with weights/port.py --keras-model "
                f"FILE --class-names NAMES --out NEW, NAMES being the data's classes ({', '.join(data)}) in the order "
                "of the model's outputs")
    if sorted(run) == sorted(data):  # imported before the import ordered the outputs by name
        return ("the run lists the imported Keras model's outputs in the model's order, the data by name: import it "
                "again with the same --class-names (the import now orders the outputs by name, each keeping its own)")
    return ("the imported Keras model's outputs keep the names given at import (--class-names), so the data must have "
            "those classes: pass such data, or, if a name given at import was wrong, import the model again with the "
            "right --class-names, in the order of the model's outputs")


def check_resume(config: TrainConfig, run_dir: Path, class_names: tuple[str, ...]) -> tuple[Checkpoint, list]:
    """(checkpoint, history) of ``run_dir`` after checking ``config`` and the data's
    ``class_names`` continue its run: every setting outside RESUMABLE_CHANGES must equal the run's,
    but a Keras model imported whole that has trained no step has no training settings of its
    own, so only its IMPORTED_SETTINGS are compared."""
    if not (run_dir / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {run_dir / CHECKPOINT_FILE}; start the run "
                                "without --resume")
    imported = read_keras_import(run_dir) is not None
    saved, saved_classes, _ = read_config(run_dir)
    if tuple(saved_classes) != tuple(class_names):
        fix = (_imported_classes_fix(tuple(saved_classes), tuple(class_names)) if imported
               else "pass its data or choose another --out")
        raise ValueError(f"--resume: the run in {run_dir} was trained on the classes {', '.join(saved_classes)}, "
                         f"but the data now has {', '.join(class_names)}; {fix}")
    checkpoint = read_checkpoint(run_dir)
    saved, current = dataclasses.asdict(saved), dataclasses.asdict(config)
    compared = IMPORTED_SETTINGS if imported and not checkpoint.trained else [
        k for k in current if k not in RESUMABLE_CHANGES]
    changed = sorted(k for k in compared if saved[k] != current[k])
    if changed:
        raise ValueError(
            f"--resume: the run in {run_dir} was trained with other settings: "
            + ", ".join(f"{k}={saved[k]!r} (now {current[k]!r})" for k in changed)
            + "; leave those flags out (--resume takes the run's) or choose another --out"
        )
    history = read_history(run_dir)
    if len(history) < checkpoint.epoch:
        raise RunFolderError(f"{run_dir / HISTORY_FILE} has {len(history)} epochs but the checkpoint "
                             f"{checkpoint.epoch}: the run folder is damaged")
    return checkpoint, history[:checkpoint.epoch]
