"""Weights-only Keras files of the report's models, read into Flax: a legacy ``.h5`` (Keras 2's
``save_weights``) or a Keras 3 ``.weights.h5``. The file holds no model config, so ``--arch``
and ``--task`` say what it holds: a zoo backbone (nested or inlined), then the report's head."""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from xrayjax.data.decode import IMAGE_SIZE
from xrayjax.keras_import import KerasImportError, KerasModel, fill_variables, legacy_weights
from xrayjax.porting import backbone_template, h5_strings, template_layer_names

# Keras' snake-case class keys of the top's weighted layers in a .weights.h5, by spec kind.
_CLASS_KEYS = {"dense": "dense", "batch_normalization": "batch_norm"}


def report_head_specs(arch: str, task: str, outputs: int) -> list[dict[str, Any]]:
    """The report's head for (``arch``, ``task``) as :class:`KerasHead` layer specs, with the
    layer names Keras gives them automatically (``dense``, ``dense_1``, ``dropout``, ...)."""
    from xrayjax.models.heads import create_head
    from xrayjax.models.layers import HEAD_BN_EPSILON, HEAD_BN_MOMENTUM, keras_name

    head = create_head(arch, task, num_classes=None if task == "binary" else outputs)
    specs: list[dict[str, Any]] = []
    if head.input_bn:
        specs.append({"kind": "batch_norm", "name": "batch_normalization", "epsilon": HEAD_BN_EPSILON,
                      "momentum": HEAD_BN_MOMENTUM})
    specs.append({"kind": "flatten", "name": "flatten"} if head.pool == "flatten"
                 else {"kind": "gap", "name": "global_average_pooling2d"})
    if head.dropout_first:
        specs.append({"kind": "dropout", "name": "dropout", "rate": head.dropout})
    for i, width in enumerate(head.hidden):
        specs.append({"kind": "dense", "name": keras_name("dense", i), "units": width, "activation": "relu",
                      "use_bias": True})
        specs.append({"kind": "dropout", "name": keras_name("dropout", i + head.dropout_first), "rate": head.dropout})
    specs.append({"kind": "dense", "name": keras_name("dense", len(head.hidden)), "units": head.outputs,
                  "activation": "softmax" if task == "multiclass" else "sigmoid", "use_bias": True})
    return specs


def _v3_weights(f: Any, backbone: Collection[str], specs: list[dict[str, Any]],
                source: str) -> dict[str, list[np.ndarray]]:
    """Per-layer weights of a Keras 3 ``.weights.h5``: groups under ``layers/`` keyed by class in
    ``model.layers`` order (``dense``, ``dense_1``; a nested backbone's under
    ``functional/layers/``), each ``vars`` group naming its layer. The backbone's layers are
    found by those names, the top's by class and order (the keys Keras gives them), so a top
    that the notebook named ``dense_7`` still reads as the report's ``dense``."""
    found: dict[str, list[np.ndarray]] = {}
    top: dict[str, list[tuple[int, str, list[np.ndarray]]]] = {}
    named = []

    def walk(group: Any) -> None:
        for key in group:
            child = group[key]
            if "vars" in child and len(child["vars"]):
                values = [np.asarray(child["vars"][str(i)]) for i in range(len(child["vars"]))]
                name = child["vars"].attrs.get("name")
                name = name.decode() if isinstance(name, bytes) else name
                named.append(name is not None)
                if name in backbone:
                    found[name] = values
                else:
                    base, count = re.fullmatch(r"(.*?)(?:_(\d+))?", key).groups()
                    top.setdefault(base, []).append((int(count or 0), key, values))
            if "layers" in child:
                walk(child["layers"])

    walk(f["layers"])
    if not any(named):
        raise KerasImportError(
            f"{source} names none of its layers (an older Keras 3 wrote it): load it in Keras and save the "
            "model whole (model.save('model.keras')), then pass that file with --keras-model")
    for base, layers in top.items():
        names = [s["name"] for s in specs if s["kind"] == _CLASS_KEYS.get(base)]
        for i, (_, key, values) in enumerate(sorted(layers, key=lambda layer: layer[0])):
            found[names[i] if i < len(names) else key] = values  # a surplus layer: the merge names it
    return found


def read_keras_weights(path: str | os.PathLike, arch: str, task: str, outputs: int,
                       image_size: int | None = None) -> KerasModel:
    """A weights-only file of the report's model (``arch`` backbone, nested or inlined, then its
    ``task`` head) taking ``image_size`` pixels (default 224): a legacy ``.h5`` (root
    ``layer_names``) or a Keras 3 ``.weights.h5`` (root group ``layers``).

    Raises:
        FileNotFoundError: no such file.
        KerasImportError: unreadable, truncated, or weights that do not fill the model exactly
            (a top that is not the report's head at that size included).
    """
    import h5py

    path, source = Path(path), str(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weights file {path} does not exist")
    specs = report_head_specs(arch, task, outputs)
    backbone = template_layer_names(backbone_template(arch))
    try:
        with h5py.File(path, "r") as f:
            if layers := h5_strings(f.attrs, "layer_names"):  # maybe chunked, as Keras writes long lists
                weights = legacy_weights(f, layers, backbone | {s["name"] for s in specs})
            elif "layers" in f:
                weights = _v3_weights(f, backbone, specs, source)
            else:
                raise KerasImportError(
                    f"{source} is an HDF5 file but not Keras weights (no 'layer_names' attribute of a legacy "
                    ".h5, no 'layers' group of a .weights.h5): save the model whole (model.save('model.keras')) "
                    "and pass that file with --keras-model")
    except KerasImportError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise KerasImportError(f"cannot read Keras weights from {source}: not an HDF5 file, or truncated or "
                               f"corrupt ({type(e).__name__}: {e}); save the weights again") from e
    size = image_size if image_size is not None else IMAGE_SIZE
    variables = fill_variables(
        arch, specs, weights, f"{source} (read as --arch {arch} --task {task})", size,
        f"the report's head at --image-size {size} ({_describe(specs)})",
        "a weights-only file must hold that head: pass the --arch, --task and --image-size it was trained with, "
        "or save the model whole (model.save('model.keras')) and import that file")
    return KerasModel(arch, specs, task, outputs, size, variables, "weights")


def _describe(specs: list[dict[str, Any]]) -> str:
    """Head layer specs as Keras layers: ``Flatten, Dropout, Dense(256), Dropout, Dense(1)``."""
    classes = {"gap": "GlobalAveragePooling2D", "flatten": "Flatten", "dropout": "Dropout",
               "batch_norm": "BatchNormalization"}
    return ", ".join(f"Dense({s['units']})" if s["kind"] == "dense" else classes[s["kind"]] for s in specs)
