"""Keras ImageNet weights -> Flax variables: strict merge, legacy-HDF5 reader, msgpack files.

Keras publishes its ImageNet weights as legacy HDF5 files. Their layout is read by layer
name and ORDER (never by dataset name, which differs across Keras versions) and merged into
a Flax variables template whose layers are keyed by the Keras layer names. The merge is
strict: every template entry is filled exactly once with an equal shape, or one
:class:`WeightMismatchError` lists everything that is wrong and its likely cause.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xrayjax.atomic import write_atomic
from xrayjax.data.decode import IMAGE_SIZE

# Keras' weight order within a layer (`trainable_weights + non_trainable_weights`):
# Conv/Dense [kernel, bias]; BatchNorm [gamma, beta, moving_mean, moving_variance].
_PARAM_ORDER = ("kernel", "scale", "bias")
_STATS_ORDER = ("mean", "var")
_COLLECTIONS = ("params", "batch_stats")
# Layers with weights that only an include_top=True file holds (VGG fc1/fc2/predictions,
# ResNet and DenseNet predictions; Keras 2's DenseNet fc1000).
_TOP_LAYERS = frozenset({"fc1", "fc2", "predictions", "fc1000"})
# Layer names of the 2016 ResNet50 file of Keras 1 and 2.0-2.2 (fchollet/deep-learning-models v0.2, md5
# a268eb855778b3df3c7506639542a6af): same file name as today's, other names and BatchNorm eps.
_KERAS1_RESNET_LAYER = re.compile(r"^(bn_conv1|(res|bn)[2-5][a-f]_branch(1|2[abc]))$")
_KERAS1_RESNET_CAUSE = (
    "this is the 2016 ResNet50 file that Keras 1 and Keras 2.0-2.2 downloaded "
    "(fchollet/deep-learning-models release v0.2, md5 "
    "a268eb855778b3df3c7506639542a6af: layers conv1, bn_conv1, res2a_branch2a, ...), which shares "
    "today's file name but not its layer names, and whose model used BatchNorm epsilon 1e-3. "
    "Download today's file instead: https://storage.googleapis.com/tensorflow/keras-applications/"
    "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 (md5 4d473c1dd8becc155b73f8504c6f6626)"
)

KeyPath = tuple[str, ...]


class WeightMismatchError(ValueError):
    """The Keras weights do not fill the Flax template exactly.

    Attributes list every problem: ``missing`` and ``unexpected`` hold keys,
    ``mismatched`` holds ``(key, template_shape, weight_shape)``.
    """

    def __init__(
        self,
        message: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


def _is_array(value: Any) -> bool:
    return not isinstance(value, Mapping) and hasattr(value, "shape") and hasattr(value, "dtype")


def _layers(tree: Mapping[str, Any], prefix: KeyPath = ()) -> dict[KeyPath, dict[str, Any]]:
    """Every dict of arrays in ``tree``, keyed by its path (a Flax layer's variables)."""
    found: dict[KeyPath, dict[str, Any]] = {}
    arrays = {k: v for k, v in tree.items() if _is_array(v)}
    if arrays:
        found[prefix] = arrays
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found.update(_layers(value, prefix + (key,)))
    return found


def _slots(
    path: KeyPath, params: Mapping[str, Any], stats: Mapping[str, Any]
) -> list[tuple[str, str, Any]]:
    """The (collection, name, template leaf) of one layer, in Keras' weight order."""
    slots = []
    for collection, entries, order in (
        ("params", params, _PARAM_ORDER),
        ("batch_stats", stats, _STATS_ORDER),
    ):
        unknown = sorted(set(entries) - set(order))
        if unknown:
            raise ValueError(
                f"template layer {'/'.join(path)} has {collection} entries {unknown} with no Keras "
                f"counterpart (known: {list(order)})"
            )
        slots += [(collection, name, entries[name]) for name in order if name in entries]
    return slots


def _likely_cause(missing_layers: set[str], unexpected_layers: set[str], mismatched: bool) -> str:
    if sum(bool(_KERAS1_RESNET_LAYER.match(n)) for n in unexpected_layers) >= 2:
        return _KERAS1_RESNET_CAUSE
    causes = []
    if unexpected_layers & _TOP_LAYERS:
        causes.append(
            f"the weights hold classifier layers {sorted(unexpected_layers & _TOP_LAYERS)}: an "
            "include_top=True file; use the *_notop.h5 file"
        )
    other = unexpected_layers - _TOP_LAYERS
    if (other and missing_layers) or mismatched:
        causes.append(
            "the weights belong to another architecture (does this file belong to another --arch?)"
        )
    elif missing_layers:
        causes.append(
            "the weights lack layers: a truncated or partial file, or the weights of a smaller "
            "architecture (does this file belong to another --arch?)"
        )
    elif other:
        causes.append(
            "the weights hold extra layers of a larger architecture (does this file belong to "
            "another --arch?)"
        )
    return "; ".join(causes)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def merge_keras_weights(
    template: Mapping[str, Any],
    layer_weights: Mapping[str, Sequence[np.ndarray]],
    *,
    source: str | None = None,
) -> dict[str, Any]:
    """Fill a Flax variables template from Keras per-layer weight lists, strictly.

    A template layer is any dict of arrays under ``params`` (and the dict at the same path
    under ``batch_stats``); its Keras name is its own key, so the same function fills a
    backbone or a whole classifier. Weights are taken in Keras order (Conv/Dense
    ``[kernel, bias]``, BatchNorm ``[gamma, beta, moving_mean, moving_variance]``) and cast
    to the template dtype. Layers with an empty weight list (pooling, activations, ...)
    are ignored. ``source`` (e.g. the file name) only enters the error message.

    Raises:
        WeightMismatchError: listing every missing, unexpected and shape-mismatched key.
    """
    import jax

    extra = sorted(set(template) - set(_COLLECTIONS))
    if extra:
        raise ValueError(
            f"template collections {extra} cannot be filled from Keras weights; pass only "
            f"{list(_COLLECTIONS)}"
        )
    params = _layers(template.get("params", {}))
    stats = _layers(template.get("batch_stats", {}))
    by_name: dict[str, list[KeyPath]] = {}
    for path in sorted(set(params) | set(stats)):
        if not path:
            raise ValueError("template arrays must sit in a layer dict under params/batch_stats")
        by_name.setdefault(path[-1], []).append(path)
    duplicates = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    if duplicates:
        raise ValueError(f"template layer names must be unique to map Keras layers: {duplicates}")

    weights = {name: list(values) for name, values in layer_weights.items() if len(values)}
    filled: dict[str, dict[KeyPath, dict[str, Any]]] = {"params": {}, "batch_stats": {}}
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    missing_layers: set[str] = set()
    for name, (path,) in sorted(by_name.items()):
        slots = _slots(path, params.get(path, {}), stats.get(path, {}))
        values = weights.get(name, [])
        if len(values) < len(slots):
            missing_layers.add(name)
        for i, (collection, entry, leaf) in enumerate(slots):
            key = "/".join((collection,) + path + (entry,))
            if i >= len(values):
                missing.append(f"{key} {_shape(leaf)}")
            elif _shape(values[i]) != _shape(leaf):
                mismatched.append((key, _shape(leaf), _shape(values[i])))
            else:
                value = jax.device_put(np.asarray(values[i], dtype=leaf.dtype))
                filled[collection].setdefault(path, {})[entry] = value
        extra = enumerate(values[len(slots) :], len(slots))
        unexpected += [f"{name}[{i}] {_shape(v)}" for i, v in extra]
    unexpected_layers = set(weights) - set(by_name)
    for name in sorted(unexpected_layers):
        shapes = ", ".join(str(_shape(v)) for v in weights[name])
        unexpected.append(f"{name} ({len(weights[name])} weights: {shapes})")

    if missing or unexpected or mismatched:
        lines = [
            f"Keras weights{f' from {source}' if source else ''} do not match the Flax template: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} "
            "shape-mismatched.",
            f"Likely cause: {_likely_cause(missing_layers, unexpected_layers, bool(mismatched))}.",
        ]
        for title, items in (
            ("Missing (in the template, not in the weights)", missing),
            ("Unexpected (in the weights, not in the template)", unexpected),
            (
                "Shape mismatch (template vs weights)",
                [f"{k}: template {t}, weights {w}" for k, t, w in mismatched],
            ),
        ):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items]
        raise WeightMismatchError("\n".join(lines), missing, unexpected, mismatched)

    def nest(layers: dict[KeyPath, dict[str, Any]]) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for path, entries in layers.items():
            node = tree
            for key in path:
                node = node.setdefault(key, {})
            node.update(entries)
        return tree

    return {c: nest(filled[c]) for c in _COLLECTIONS if c in template}


@dataclass(frozen=True)
class PublishedWeights:
    """One of Keras' published ImageNet weight files (include_top=False)."""

    file_name: str
    url: str
    md5: str


KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
# From keras/src/applications/{vgg16,vgg19,resnet,densenet}.py (the no-top paths and hashes).
PUBLISHED: dict[str, PublishedWeights] = {
    arch: PublishedWeights(name, f"{KERAS_WEIGHTS_URL}{folder}/{name}", md5)
    for arch, folder, name, md5 in (
        ("vgg16", "vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "6d6bbae143d832006294945121d1f1fc"),
        ("vgg19", "vgg19", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "253f8cb515780f3b799900260a226db6"),
        ("resnet50", "resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "4d473c1dd8becc155b73f8504c6f6626"),
        ("densenet121", "densenet", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
         "30ee3e1110167f948a6b9946edeeb738"),
    )
}
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


class WeightFileError(ValueError):
    """A weight file cannot be read: not HDF5/msgpack, truncated, or not Keras' layout."""


def pretrained_path(arch: str, weights_dir: str | os.PathLike | None = None) -> Path:
    """The ported ImageNet weights of ``arch``: ``<dir>/<arch>_imagenet_notop.msgpack``."""
    folder = Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR
    return folder / f"{arch}_imagenet_notop.msgpack"


def h5_strings(attrs: Any, name: str) -> list[str]:
    """A list-of-strings attribute, maybe chunked as ``name0, name1, ...``; values may be bytes."""
    if name in attrs:
        chunks = [attrs[name]]
    else:
        chunks = []
        while f"{name}{len(chunks)}" in attrs:
            chunks.append(attrs[f"{name}{len(chunks)}"])
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for chunk in chunks for v in chunk]


def read_keras_h5(h5_path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Per-layer weight lists of a legacy Keras HDF5 weights file, in file order, keyed by the
    layer names of Keras 3.

    Follows Keras' own reader (``load_weights_from_hdf5_group``): the root's ``layer_names``
    then each layer group's ``weight_names``, by name and order; a full-model file's
    ``model_weights`` group is read the same way. Dataset names are only looked up, never
    interpreted, since they differ across Keras versions. Keras 2's DenseNet (the published
    file) named its stem ``conv1/conv``, ``conv1/bn``, ``conv1/relu``; Keras 3 forbids "/" in
    layer names and spells them ``conv1_conv``, ...: a "/" is read as "_".

    Raises:
        FileNotFoundError: no such file.
        WeightFileError: not an HDF5 file, truncated, or not in Keras' weights layout.
    """
    import h5py

    path = Path(h5_path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weights file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            full_model = "layer_names" not in f.attrs and "model_weights" in f
            root = f["model_weights"] if full_model else f
            layer_names = h5_strings(root.attrs, "layer_names")
            if not layer_names:
                raise WeightFileError(
                    f"{path} is an HDF5 file but not Keras' legacy weights layout (no "
                    "'layer_names' attribute): use the .h5 weights file Keras publishes "
                    "(or one written by model.save_weights('*.h5') with Keras 2)"
                )
            weights = {}
            for name in layer_names:
                if name not in root:
                    raise WeightFileError(
                        f"{path} lists layer {name!r} in 'layer_names' but has no group for it: "
                        "the file is truncated or corrupt; download it again"
                    )
                group = root[name]
                names = h5_strings(group.attrs, "weight_names")
                weights[name.replace("/", "_")] = [np.asarray(group[w]) for w in names]
    except WeightFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise WeightFileError(
            f"cannot read Keras weights from {path}: it is not an HDF5 file or it is truncated or "
            f"corrupt ({e}); download it again (check its md5)"
        ) from e
    return weights


@functools.cache
def backbone_shapes(arch: str, image_size: int = IMAGE_SIZE) -> tuple[Any, dict[str, Any]]:
    """Shapes and dtypes of ``create_backbone(arch)``'s features and variables at ``image_size``
    pixels (no compute; traced once per arch and size: a strict merge's error compares the file
    with every arch's, and an imported head is shaped by the features, which a Flatten keeps)."""
    import jax
    import jax.numpy as jnp

    from xrayjax.models import create_backbone

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: create_backbone(arch).init_with_output(jax.random.key(0), x), x)


def backbone_template(arch: str) -> dict[str, Any]:
    """Shapes and dtypes of ``create_backbone(arch)``'s variables at 224x224."""
    return backbone_shapes(arch)[1]


def template_layer_names(template: Mapping[str, Any]) -> set[str]:
    """The Keras layer names a variable template holds."""
    return {path[-1] for c in _COLLECTIONS for path in _layers(template.get(c, {}))}


def port_keras_weights(arch: str, h5_path: str | os.PathLike) -> dict[str, Any]:
    """Variables of ``create_backbone(arch)`` from a Keras include_top=False HDF5 file.

    Returns ``{"params": ...}`` (plus ``"batch_stats"`` for resnet50 and densenet121), float32.

    Raises:
        FileNotFoundError, WeightFileError: the file cannot be read.
        WeightMismatchError: the file does not fill the backbone exactly (wrong arch, an
            include_top file, missing layers); the message names the file and the cause.
    """
    from xrayjax.models import ARCHS

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    layer_weights = read_keras_h5(h5_path)
    try:
        return merge_keras_weights(
            backbone_template(arch), layer_weights, source=f"{h5_path} (read as --arch {arch})"
        )
    except WeightMismatchError as e:
        in_file = {name for name, values in layer_weights.items() if len(values)} - _TOP_LAYERS
        fits = [a for a in ARCHS if a != arch and template_layer_names(backbone_template(a)) == in_file]
        if not fits:
            raise
        hint = (
            f"\nThe layers of {h5_path} are those of --arch {fits[0]}: "
            f"rerun with --arch {fits[0]}."
        )
        raise WeightMismatchError(str(e) + hint, e.missing, e.unexpected, e.mismatched) from None


def save_variables(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Save a variables tree with ``flax.serialization`` msgpack (no pickle), atomically."""
    import jax
    from flax import serialization

    write_atomic(path, serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables))))


def load_variables(path: str | os.PathLike) -> dict[str, Any]:
    """Load a variables tree written by :func:`save_variables` (numpy arrays, bit-exact)."""
    from flax import serialization

    path = Path(path)
    data = path.read_bytes()
    try:
        return serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise WeightFileError(
            f"cannot read variables from {path}: not a flax msgpack file, or truncated ({e}); "
            "write it again (python weights/port.py ...)"
        ) from e


def _keras_order(variables: Mapping[str, Any]) -> dict[str, list[np.ndarray]]:
    """The inverse of the merge: per-layer weight lists in Keras order."""
    params = _layers(variables.get("params", {}))
    stats = _layers(variables.get("batch_stats", {}))
    return {
        path[-1]: [leaf for _, _, leaf in _slots(path, params.get(path, {}), stats.get(path, {}))]
        for path in set(params) | set(stats)
    }


def load_pretrained(arch: str, weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ported ImageNet variables of ``create_backbone(arch)``, checked against its shapes.

    Reads ``<weights_dir or the repo's weights/>/<arch>_imagenet_notop.msgpack``.

    Raises:
        FileNotFoundError: the file is missing; the message says how to make it.
        WeightFileError, WeightMismatchError: the file is unreadable or of another arch.
    """
    path = pretrained_path(arch, weights_dir)
    if not path.is_file():
        out = "" if weights_dir is None else f" --out {weights_dir}"
        raise FileNotFoundError(
            f"no ImageNet weights for {arch} at {path}. Make them with "
            f"`python weights/port.py --arch {arch}{out}` (downloads Keras' file), or, on a machine "
            f"without internet, download {PUBLISHED[arch].file_name} ({PUBLISHED[arch].url}) "
            f"elsewhere and run `python weights/port.py --arch {arch} --h5 FILE{out}`. "
            "Or train from scratch with `--init random`."
        )
    layer_weights = _keras_order(load_variables(path))
    return merge_keras_weights(backbone_template(arch), layer_weights, source=str(path))
