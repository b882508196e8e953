"""A Keras file written as a normal run folder (``weights/port.py --keras-model``): a whole model
(``.keras`` or full-model ``.h5``) or a weights-only file with ``--arch`` and ``--task``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xrayjax.data.decode import MAX_IMAGE_SIZE
from xrayjax.keras_import import KerasModel, read_keras_model
from xrayjax.keras_weights import read_keras_weights


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _outputs_by_name(model: KerasModel, names: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``names`` (the model's classes, in its outputs' order) sorted, as xrayjax reads data (class
    folders and a labels file's labels alike), and ``model``'s variables with the output Dense
    reordered to match, so each name keeps the output trained for it: its units permuted, or for a
    binary model (one sigmoid, the probability of ``names[1]``) its logit negated when the two swap."""
    order = sorted(range(len(names)), key=names.__getitem__)
    if order == list(range(len(names))):
        return names, model.variables
    output = [s["name"] for s in model.head if s["kind"] == "dense"][-1]
    params = model.variables["params"]
    dense = {key: -value if model.task == "binary" else value[..., order]
             for key, value in params["head"][output].items()}
    params = {**params, "head": {**params["head"], output: dense}}
    return tuple(names[i] for i in order), {**model.variables, "params": params}


def _labels_file(labels: str | os.PathLike, task: str, names: tuple[str, ...], source: Path) -> str:
    """The labels file ``labels``, absolute, once its labels are the model's class ``names``."""
    from xrayjax.data.csv_labels import read_labels

    if task != "multilabel":
        raise ValueError(f"--labels: the model in {source} is {task}; a labels file goes with a multilabel model "
                         "(one sigmoid per label)")
    csv = Path(labels).expanduser().resolve()
    found = read_labels(csv).label_names  # a DataError (a ValueError) names what is wrong with it
    if sorted(found) != list(names):
        raise ValueError(f"--labels {csv}: its labels are {', '.join(found)}, the model's outputs {', '.join(names)} "
                         "(--class-names): name each output, in the model's order, by the file's label it predicts")
    return str(csv)


def import_keras_run(path: str | os.PathLike, out: str | os.PathLike, class_names: Sequence[str] | None = None,
                     preprocess: str | None = None, arch: str | None = None, task: str | None = None,
                     image_size: int | None = None, labels: str | os.PathLike | None = None) -> Path:
    """Write a run folder ``out`` holding the Keras model in ``path``, for predict, evaluate,
    ``load_run`` and ``train --resume``; return it. ``preprocess`` defaults to the backbone's own mode; ``class_names``
    to ``class_0, ...`` (one per output, in the model's order; the run lists them sorted, see
    :func:`_outputs_by_name`); ``image_size`` to the model's fixed input size, else 224 (the head is checked at that
    size). ``labels``, a labels file whose labels are the class names, is recorded for a multilabel
    model as a labels run records its own: evaluate reads it. Nothing is written when anything fails.

    Raises:
        FileNotFoundError, KerasImportError: the file cannot be read or its model does not import.
        ValueError: bad class names, preprocessing, labels file, or an ``out`` that is not empty.
    """
    import shutil

    import jax

    from xrayjax import runfiles
    from xrayjax.config import TrainConfig
    from xrayjax.preprocessing import ARCH_PREPROCESSING, MODES

    path, out = Path(path), Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; choose a new run folder")
    if preprocess is not None and preprocess not in MODES:
        raise ValueError(f"--preprocess must be one of {', '.join(MODES)}, got {preprocess!r}")
    if (arch is None) != (task is None):
        raise ValueError("a weights-only file needs both --arch and --task (a whole model needs neither)")
    if image_size is not None and not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be in [32, {MAX_IMAGE_SIZE}] (the size training and evaluation "
                         f"take), got {image_size}")
    if arch is not None:
        outputs = 1 if task == "binary" else len(class_names) if class_names else 4
        model = read_keras_weights(path, arch, task, outputs, image_size)
    else:
        model = read_keras_model(path, image_size)
    wanted = 2 if model.task == "binary" else model.outputs
    names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(wanted))
    if len(names) != wanted or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"--class-names: the model in {path} has {wanted} classes ({model.task}); pass "
                         f"{wanted} distinct names, got {len(names)}: {', '.join(names)}")
    names, variables = _outputs_by_name(model, names)
    if labels is not None:
        labels = _labels_file(labels, model.task, names, path)
    mode = preprocess or ARCH_PREPROCESSING[model.arch]
    config = TrainConfig(arch=model.arch, task=model.task, image_size=model.image_size,
                         init="keras", epochs=0, l2=0.0, color="keep", out=str(out), labels=labels)
    record = {"source": str(path.resolve()), "source_sha256": _sha256(path), "file_kind": model.kind,
              "preprocess": mode, "head": model.head}
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        runfiles.write_config(tmp, config, names, jax.devices(), keras_import=record)
        runfiles.write_json(tmp / runfiles.SPLITS_FILE, {"splits": {}})
        runfiles.write_json(tmp / runfiles.HISTORY_FILE, [])
        runfiles.write_imported_checkpoint(tmp, variables)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
