"""A whole Keras classifier (backbone of the zoo + a top of simple layers) read into Flax.

Reads a Keras 3 ``.keras`` file (a zip of ``config.json`` and ``model.weights.h5``) or a
legacy full-model ``.h5`` (root attribute ``model_config``, group ``model_weights``) with
h5py, zipfile and json only (no Keras). The model must be a ``keras.applications`` backbone of
the zoo, nested as a sub-model or inlined, then a chain of GlobalAveragePooling2D, Flatten,
Dense, Dropout and BatchNormalization ending in a Dense with a softmax or sigmoid output.
Anything else raises :class:`KerasImportError` naming the first layer that cannot be read.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrayjax.data.decode import IMAGE_SIZE
from xrayjax.porting import (
    WeightMismatchError,
    backbone_shapes,
    backbone_template,
    h5_strings,
    merge_keras_weights,
    template_layer_names,
)

# The layer classes of keras.applications' VGG, ResNet and DenseNet (include_top=False).
_BACKBONE_CLASSES = frozenset({
    "InputLayer", "Conv2D", "BatchNormalization", "Activation", "ZeroPadding2D", "MaxPooling2D",
    "AveragePooling2D", "Add", "Concatenate",
})
# The last layer of each include_top=False backbone, and its layer count (input included).
_BACKBONE_END = {"vgg16": "block5_pool", "vgg19": "block5_pool", "resnet50": "conv5_block3_out",
                 "densenet121": "relu"}
_BACKBONE_LAYERS = {"vgg16": 19, "vgg19": 22, "resnet50": 175, "densenet121": 427}
_HEAD_CLASSES = {"GlobalAveragePooling2D": "gap", "Flatten": "flatten", "Dense": "dense",
                 "Dropout": "dropout", "BatchNormalization": "batch_norm"}
_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
# Keras' weight order per layer: Dense [kernel, bias], BatchNorm [gamma, beta, mean, variance].
_VAR_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


class KerasImportError(ValueError):
    """A Keras file that cannot be imported: unreadable, truncated, or an unsupported model."""


@dataclass
class KerasModel:
    """A Keras model read from a file: backbone arch, head layers, task, and Flax variables."""

    arch: str
    head: list[dict[str, Any]]
    task: str
    outputs: int
    image_size: int  # the input size in pixels the variables were filled for
    variables: dict[str, Any]  # {"params": {"backbone", "head"}, "batch_stats": {...}}
    kind: str  # the file read: "keras" (.keras), "h5" (a whole model) or "weights" (weights only)


def _snake(name: str) -> str:
    """keras.src.utils.naming.to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layers_of(model: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The layers of a model config in ``model.layers`` order (Sequential omits its input)."""
    layers = list(model["config"]["layers"])
    if model["class_name"] == "Sequential" and layers and layers[0]["class_name"] == "InputLayer":
        layers = layers[1:]
    return layers


def _name(layer: Mapping[str, Any]) -> str:
    """A layer's name in Keras 3's spelling (Keras 2's DenseNet had ``conv1/conv``)."""
    return (layer.get("name") or layer["config"]["name"]).replace("/", "_")


def _which_arch(names: set[str]) -> str | None:
    from xrayjax.models import ARCHS

    return next((a for a in ARCHS if template_layer_names(backbone_template(a)) == names), None)


def _weighted(layers: Sequence[Mapping[str, Any]]) -> set[str]:
    return {_name(layer) for layer in layers if layer["class_name"] in ("Conv2D", "BatchNormalization")}


def _check_backbone(layers: Sequence[Mapping[str, Any]], source: str, where: str) -> str:
    """The zoo arch that ``layers`` (a backbone's, input first) are, or KerasImportError."""
    arch = _which_arch(_weighted(layers))
    odd = next((layer for layer in layers if layer["class_name"] not in _BACKBONE_CLASSES), None)
    if arch is None or odd is not None or len(layers) != _BACKBONE_LAYERS[arch]:
        bad = odd or layers[min(1, len(layers) - 1)]
        raise KerasImportError(
            f"{source}: cannot read layer {_name(bad)!r} ({bad['class_name']}) {where}: the backbone is "
            "not one of the zoo's keras.applications models (vgg16, vgg19, resnet50, densenet121, "
            "include_top=False); only those import")
    return arch


def _split(model: Mapping[str, Any], source: str) -> tuple[str, list[dict], str | None, list[dict]]:
    """(arch, backbone layers, nested backbone's name or None, head layers) of a model config."""
    if model.get("class_name") not in _MODEL_CLASSES:
        raise KerasImportError(f"{source}: the model is a {model.get('class_name')!r}, not a Sequential or "
                               "functional Keras model; subclassed models cannot be imported")
    layers = _layers_of(model)
    start = 1 if layers and layers[0]["class_name"] == "InputLayer" else 0
    if start < len(layers) and layers[start]["class_name"] in _MODEL_CLASSES:
        inner = layers[start]
        inner_layers = _layers_of(inner)
        arch = _check_backbone(inner_layers, source, f"in the sub-model {_name(inner)!r}")
        return arch, inner_layers, _name(inner), layers[start + 1:]
    ends = [i for i, layer in enumerate(layers) if _name(layer) in set(_BACKBONE_END.values())]
    if not ends:
        bad = layers[start] if start < len(layers) else layers[-1]
        raise KerasImportError(
            f"{source}: cannot read layer {_name(bad)!r} ({bad['class_name']}): no backbone of the zoo "
            "(vgg16, vgg19, resnet50, densenet121, include_top=False) starts the model")
    end = ends[0] + 1
    return _check_backbone(layers[:end], source, "in the backbone"), layers[:end], None, layers[end:]


def _head_specs(layers: Sequence[Mapping[str, Any]], source: str) -> tuple[list[dict[str, Any]], str, int]:
    """The head's layer specs (see ``KerasHead``), its task and its output count."""
    from xrayjax.models.heads import KERAS_ACTIVATIONS

    specs: list[dict[str, Any]] = []
    for layer in layers:
        cls, cfg, name = layer["class_name"], layer["config"], _name(layer)

        def refuse(why: str, name: str = name, cls: str = cls) -> KerasImportError:
            return KerasImportError(f"{source}: cannot read layer {name!r} ({cls}): {why}")

        kind = _HEAD_CLASSES.get(cls)
        if kind is None:
            raise refuse("after the backbone only GlobalAveragePooling2D, Flatten, Dense, Dropout and "
                         "BatchNormalization import")
        spec: dict[str, Any] = {"kind": kind, "name": name}
        if kind == "gap" and (cfg.get("keepdims") or cfg.get("data_format", "channels_last") != "channels_last"):
            raise refuse("only keepdims=False and channels_last import")
        if kind == "dense":
            activation = cfg.get("activation", "linear")
            if not isinstance(activation, str) or activation not in KERAS_ACTIVATIONS:
                raise refuse(f"activation {activation!r} is not one of {', '.join(KERAS_ACTIVATIONS)}")
            spec.update(units=int(cfg["units"]), activation=activation, use_bias=bool(cfg.get("use_bias", True)))
        elif kind == "dropout":
            spec.update(rate=float(cfg["rate"]))
        elif kind == "batch_norm":
            axis = cfg.get("axis", -1)
            if axis not in (-1, 3, [-1], [3]) or not cfg.get("center", True) or not cfg.get("scale", True):
                raise refuse("only BatchNormalization on the last axis with center and scale imports")
            spec.update(epsilon=float(cfg.get("epsilon", 1e-3)), momentum=float(cfg.get("momentum", 0.99)))
        specs.append(spec)
    dense = [i for i, s in enumerate(specs) if s["kind"] == "dense"]
    if not dense:
        raise KerasImportError(f"{source}: the model has no Dense layer after its backbone: nothing classifies")
    after = next((s for s in specs[dense[-1] + 1:] if s["kind"] != "dropout"), None)
    if after is not None:
        raise KerasImportError(f"{source}: cannot read layer {after['name']!r}: after the output Dense only "
                               "Dropout imports")
    out = specs[dense[-1]]
    if out["activation"] == "softmax" and out["units"] >= 2:
        task = "multiclass"
    elif out["activation"] == "sigmoid":
        task = "binary" if out["units"] == 1 else "multilabel"
    else:
        raise KerasImportError(
            f"{source}: cannot read layer {out['name']!r} (Dense): the output Dense has {out['units']} units "
            f"and activation {out['activation']!r}; imported models must output probabilities (softmax over "
            "2 or more units, or sigmoid)")
    flat_before = [s["kind"] for s in specs[:dense[0]]]
    if "gap" not in flat_before and "flatten" not in flat_before:
        raise KerasImportError(f"{source}: cannot read layer {specs[dense[0]]['name']!r} (Dense): no "
                               "GlobalAveragePooling2D or Flatten precedes it")
    return specs, task, out["units"]


def _check_chain(model: Mapping[str, Any], layers: Sequence[Mapping[str, Any]], source: str) -> None:
    """A functional model's head layers must each take the one before it as their only input."""
    if model["class_name"] == "Sequential":
        return
    names = [_name(layer) for layer in layers]
    for previous, layer in zip(names, layers[1:]):
        nodes = layer.get("inbound_nodes", [])
        inputs = re.findall(r"'keras_history': \['([^']+)'", str(nodes)) or re.findall(r"\['([^']+)', 0, 0", str(nodes))
        if inputs != [previous]:
            raise KerasImportError(f"{source}: cannot read layer {_name(layer)!r} ({layer['class_name']}): its "
                                   f"input is not the layer before it ({previous!r}); only a chain of layers imports")


def _sorted_vars(items: Sequence[tuple[str, np.ndarray]]) -> list[np.ndarray]:
    """A legacy file's weights of one layer in Keras order, by their variable names."""
    def rank(name: str) -> int:
        var = name.split("/")[-1].split(":")[0]
        return _VAR_ORDER.index(var) if var in _VAR_ORDER else len(_VAR_ORDER)
    return [value for _, value in sorted(items, key=lambda item: rank(item[0]))]


def layer_of(weight: str, names: Collection[str]) -> str:
    """The layer a legacy weight name (``[model/]layer/variable:0``) belongs to: the longest tail
    of its path that is one of ``names``. Keras 2's DenseNet named layers with a "/"
    (``conv1/conv/kernel:0``), read as "_" (``conv1_conv``), Keras 3's spelling."""
    parts = weight.split("/")[:-1]
    return next((tail for tail in ("_".join(parts[i:]) for i in range(len(parts))) if tail in names),
                "_".join(parts[-1:]))


def legacy_weights(root: Any, layer_names: Sequence[str], names: Collection[str]) -> dict[str, list[np.ndarray]]:
    """Per-layer weights of a legacy Keras HDF5 group (a weights file's root, or a full model's
    ``model_weights``), in Keras order. Each group of ``layer_names`` lists its ``weight_names``;
    a name with a path belongs to the layer of ``names`` that :func:`layer_of` finds (a nested
    backbone's group holds all its layers), one without to the group's own layer."""
    weights: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name in layer_names:
        group = root[name]
        for w in h5_strings(group.attrs, "weight_names"):
            layer = layer_of(w, names) if "/" in w else name.replace("/", "_")
            weights.setdefault(layer, []).append((w, np.asarray(group[w])))
    return {layer: _sorted_vars(items) for layer, items in weights.items()}


def _keras_weights(f: Any, model: Mapping[str, Any], nested: str | None) -> dict[str, list[np.ndarray]]:
    """Per-layer weights of a ``.keras`` file's ``model.weights.h5``: its groups are named by
    class (``dense``, ``dense_1``, ...) in ``model.layers`` order, so names come from the config."""
    def walk(layers: Sequence[Mapping[str, Any]], group: Any, inner: bool) -> dict[str, list[np.ndarray]]:
        used: dict[str, int] = {}
        found: dict[str, list[np.ndarray]] = {}
        for layer in layers:
            base = _snake(layer["class_name"])
            used[base] = used.get(base, -1) + 1
            key = f"{base}_{used[base]}" if used[base] else base
            if _name(layer) == nested and not inner:
                found.update(walk(_layers_of(layer), group[key]["layers"], True))
                continue
            if key in group and "vars" in group[key]:
                found[_name(layer)] = [np.asarray(group[key]["vars"][str(i)]) for i in range(len(group[key]["vars"]))]
        return found

    return walk(_layers_of(model), f["layers"], False)


def read_keras_model(path: str | os.PathLike, image_size: int | None = None) -> KerasModel:
    """Read a ``.keras`` or full-model ``.h5`` Keras file into a :class:`KerasModel` taking
    ``image_size`` pixels (default: the model's fixed input size, else 224).

    Raises:
        FileNotFoundError: no such file.
        KerasImportError: unreadable or truncated, or a model that does not import (the message
            names the first layer that cannot be read).
    """
    import h5py

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            kind = "keras"
            with zipfile.ZipFile(path) as z:
                model = json.loads(z.read("config.json"))
                blob = z.read("model.weights.h5")
            arch, bb_layers, nested, head_layers = _split(model, source)
            with h5py.File(io.BytesIO(blob), "r") as f:
                weights = _keras_weights(f, model, nested)
        else:
            kind = "h5"
            with h5py.File(path, "r") as f:
                if "model_config" not in f.attrs or "model_weights" not in f:
                    raise KerasImportError(
                        f"{source} is an HDF5 file but not a whole Keras model (no 'model_config' attribute "
                        "or 'model_weights' group): for a weights-only file (model.save_weights) pass "
                        "--keras-model FILE --arch ARCH --task TASK")
                config = f.attrs["model_config"]
                model = json.loads(config.decode() if isinstance(config, bytes) else config)
                arch, bb_layers, nested, head_layers = _split(model, source)
                root = f["model_weights"]
                weights = legacy_weights(root, h5_strings(root.attrs, "layer_names"),
                                         {_name(layer) for layer in (*bb_layers, *head_layers)})
    except KerasImportError:
        raise
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise KerasImportError(
            f"cannot read the Keras model {source}: not a .keras zip or Keras HDF5 file, or truncated or "
            f"corrupt ({type(e).__name__}: {e}); save the model again with model.save") from e
    if nested is None:
        _check_chain(model, [bb_layers[-1], *head_layers], source)
    elif model["class_name"] != "Sequential":
        outer = _layers_of(model)
        _check_chain(model, outer[outer.index(next(x for x in outer if _name(x) == nested)):], source)
    specs, task, outputs = _head_specs(head_layers, source)
    size = image_size if image_size is not None else _input_size(model, bb_layers) or IMAGE_SIZE
    variables = fill_variables(arch, specs, weights, source, size, f"its layers at --image-size {size}",
                               "pass the --image-size the model was trained at")
    return KerasModel(arch, specs, task, outputs, size, variables, kind)


def _input_size(model: Mapping[str, Any], backbone: Sequence[Mapping[str, Any]]) -> int | None:
    """The model's fixed square input size, or None when it takes any size."""
    inputs = [layer for layer in [*model["config"]["layers"][:1], *backbone[:1]] if layer["class_name"] == "InputLayer"]
    shapes = [model["config"].get("build_input_shape")]
    shapes += [layer["config"].get("batch_shape") or layer["config"].get("batch_input_shape") for layer in inputs]
    for shape in shapes:
        if shape and len(shape) == 4 and shape[1] and shape[1] == shape[2]:
            return int(shape[1])
    return None


def fill_variables(arch: str, specs: list[dict[str, Any]], weights: dict[str, list[np.ndarray]], source: str,
                   image_size: int, expected: str, fix: str) -> dict[str, Any]:
    """The variables of ``arch``'s backbone and the head of ``specs`` at ``image_size`` pixels (a
    Flatten head's first Dense takes that size's features), filled strictly from the file's
    per-layer ``weights``. ``source`` names the file in errors; a top whose weights do not fit
    ``expected`` (the head's description) is refused in one line listing each layer's shape in the
    file and the shape expected, then ``fix``."""
    import jax
    import jax.numpy as jnp

    from xrayjax.models.heads import KerasHead

    features, backbone = backbone_shapes(arch, image_size)
    head = jax.eval_shape(KerasHead(tuple(tuple(sorted(s.items())) for s in specs)).init, jax.random.key(0),
                          jax.ShapeDtypeStruct(features.shape, jnp.float32))
    head_weights = {s["name"]: weights.get(s["name"], []) for s in specs}
    bb_weights = {name: values for name, values in weights.items() if name not in head_weights}
    try:
        bb = merge_keras_weights(backbone, bb_weights, source=f"{source} (backbone {arch})")
    except WeightMismatchError as e:
        raise KerasImportError(str(e)) from e
    try:
        hd = merge_keras_weights(head, head_weights)
    except WeightMismatchError as e:
        raise KerasImportError(f"{source}: the top's weights do not fit {expected}: {_head_mismatches(e)}; "
                               f"{fix}") from e
    return {c: {"backbone": bb.get(c, {}), "head": hd.get(c, {})} for c in ("params", "batch_stats")}


def _head_mismatches(e: WeightMismatchError) -> str:
    """The strict merge's findings on a head, in one line: each layer's shape in the file and the expected."""
    def where(key: str) -> str:
        *_, layer, entry = key.split("/")
        return f"layer {layer!r} {entry}"

    missing = [key.partition(" ") for key in e.missing]  # "params/dense/bias (256,)"
    return "; ".join([f"{where(key)} is {got} in the file, {want} expected" for key, want, got in e.mismatched]
                     + [f"{where(key)} {want} is not in the file" for key, _, want in missing]
                     + [f"the file's {item} is not in it" for item in e.unexpected])
