"""Flax model zoo equal to the Keras models of the report, layer for layer.

Backbones (``vgg16``, ``vgg19``, ``resnet50``, ``densenet121``; :mod:`xrayjax.models.backbones`) mirror
``keras.applications.<Model>(include_top=False)``; heads (:mod:`xrayjax.models.heads`) mirror
the report's classifier tops and return logits; :class:`Classifier` joins a backbone and a head.
Run ``python -m xrayjax.models ARCH TASK`` for a Keras-style summary.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xrayjax.models.backbones import (
    ARCHS, BLOCKS, DenseNet, ResNet, VGG, create_backbone, fold_batchnorm, frozen_features, image_features,
)
from xrayjax.models.heads import DROPOUT, Head, create_head, default_l2
from xrayjax.tasks import TASKS

__all__ = [
    "ARCHS", "BLOCKS", "DROPOUT", "TASKS", "Classifier", "DenseNet", "Head", "ResNet", "VGG", "count_params",
    "num_params", "create_backbone", "create_head", "create_model", "default_l2", "fold_batchnorm", "frozen_features",
    "image_features", "keras_init", "submodule_variables",
]


class Classifier(nn.Module):
    """Backbone then head: ``head(frozen_features(backbone, x), train)``.

    The backbone is frozen: its BatchNorm always uses running statistics, folded into the convs
    as training, evaluation and prediction fold them (:func:`frozen_features`), so ``apply``
    gives their logits bit for bit; the backbone's stage outputs are still sown under
    "intermediates". ``init`` runs the backbone itself, to create its (unfolded) variables.
    """

    backbone: nn.Module
    head: nn.Module

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.is_initializing():
            return self.head(self.backbone(x, train=False), train)
        features, state = frozen_features(self.backbone, self.backbone.variables, x, mutable=["intermediates"])
        for name, values in state["intermediates"].items():
            for value in values:
                self.backbone.sow("intermediates", name, value)
        return self.head(features, train)


def submodule_variables(variables: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The variables of one submodule (``"backbone"`` or ``"head"``) of a :class:`Classifier`."""
    return {collection: tree[name] for collection, tree in variables.items() if name in tree}


def create_model(
    arch: str, task: str = "multiclass", dropout: float = DROPOUT, dtype: Any = jnp.float32,
    num_classes: int | None = None,
) -> Classifier:
    """Full classifier; variables sit under ``backbone`` and ``head``. ``dtype`` is the
    backbone's compute dtype; the head computes in float32, as in training."""
    return Classifier(
        backbone=create_backbone(arch, dtype=dtype),
        head=create_head(arch, task, dropout=dropout, num_classes=num_classes),
    )


def num_params(tree: Any) -> int:
    """The number of values in a tree of arrays (or of ``jax.eval_shape`` output)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_params(variables: Mapping[str, Any]) -> dict[str, int]:
    """Keras-convention counts: head params are trainable; backbone params and every
    BatchNorm statistic are not. Works on arrays or on ``jax.eval_shape`` output."""
    params = variables.get("params", {})
    trainable = num_params(params.get("head", {}))
    total = num_params(params) + num_params(variables.get("batch_stats", {}))
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


_ZEROS, _ONES = frozenset({"bias", "mean"}), frozenset({"scale", "var"})


def keras_init(module: nn.Module, input_shape: Sequence[int],
               seed: int | Sequence[int] | np.random.SeedSequence = 0) -> dict[str, Any]:
    """``module``'s variables (for inputs of ``input_shape``) as Keras' layers start them, by
    name: every kernel glorot_uniform (``layers.KERAS_KERNEL_INIT``), drawn with numpy from
    ``seed`` in the variables' key order; biases, BatchNorm's beta and moving mean zero; its gamma
    and moving variance one. ``module.init`` gives the same distributions, but compiles a program
    whose XLA compile time grows with the number of kernels; numpy compiles nothing and draws the
    same values on every backend. The values are numpy arrays: ``jax.device_put`` them once
    before calling jitted code repeatedly."""
    rng = np.random.default_rng(seed)

    def value(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name, shape = getattr(path[-1], "key", None), tuple(leaf.shape)
        if name == "kernel":  # Keras' compute_fans: (..., in, out), receptive field first
            limit = np.float32(math.sqrt(6 / (math.prod(shape[:-2]) * (shape[-2] + shape[-1]))))
            return ((rng.random(shape, np.float32) * 2 - 1) * limit).astype(leaf.dtype)  # |value| <= limit
        if name in _ZEROS | _ONES:
            return np.full(shape, name in _ONES, leaf.dtype)
        raise ValueError(f"keras_init: no Keras initial value for {jax.tree_util.keystr(path)} of "
                         f"{type(module).__name__}; only kernel, bias, scale, mean and var have one")

    template = jax.eval_shape(lambda x: module.init(jax.random.key(0), x),  # the key traced too: no compile
                              jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return jax.tree_util.tree_map_with_path(value, template)
