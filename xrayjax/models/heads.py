"""The report's classifier tops: one per task, returning logits, with Keras' layer names."""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xrayjax.models.backbones import DENSENET_BLOCKS, RESNET_STAGES, ARCHS
from xrayjax.models.layers import (
    HEAD_BN_EPSILON, HEAD_BN_MOMENTUM, KERAS_KERNEL_INIT, KerasLayers, batch_norm, check_name, keras_name,
)
from xrayjax.tasks import TASKS, canonical_task

DROPOUT = 0.5  # the report's rate, every Dropout of its heads


class Head(KerasLayers):
    """Classifier top of the report, returning logits.

    Layers, in order: optional BatchNormalization, ``pool`` ("flatten" or "gap"), optional
    Dropout, then per hidden width Dense+ReLU+Dropout, then the output Dense. Layers carry
    the names Keras gives them automatically (``dense``, ``dense_1``, ``dropout``, ...).
    """

    pool: str
    hidden: tuple[int, ...]
    outputs: int
    input_bn: bool = False
    dropout_first: bool = False
    dropout: float = DROPOUT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        if self.input_bn:
            x = batch_norm(
                x, train, "batch_normalization", self.dtype, HEAD_BN_EPSILON, HEAD_BN_MOMENTUM
            )
        if self.pool == "flatten":
            x = self.flatten(x, name="flatten")
        else:
            x = self.global_average_pooling(x, name="global_average_pooling2d")
        drop = functools.partial(nn.Dropout, self.dropout, deterministic=not train)
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=KERAS_KERNEL_INIT)
        if self.dropout_first:
            x = drop(name="dropout")(x)
        for i, width in enumerate(self.hidden):
            x = nn.relu(dense(width, name=keras_name("dense", i))(x))
            x = drop(name=keras_name("dropout", i + self.dropout_first))(x)
        self.sow("intermediates", "embedding", x)
        x = dense(self.outputs, name=keras_name("dense", len(self.hidden)))(x)
        return x.astype(jnp.float32)


def _chexnet_head(outputs: int) -> dict[str, Any]:
    """CheXNet's top (Rajpurkar et al. 2017) on DenseNet121: GAP -> Dense(outputs)."""
    return dict(pool="gap", hidden=(), outputs=outputs)


def _binary_head(arch: str) -> dict[str, Any]:
    """Task 1: Flatten -> Dropout -> Dense(256, relu) -> Dropout -> Dense(1); DenseNet: CheXNet's."""
    if arch in DENSENET_BLOCKS:
        return _chexnet_head(1)
    return dict(pool="flatten", hidden=(256,), outputs=1, dropout_first=True)


def _multiclass_head(arch: str) -> dict[str, Any]:
    """Architectures 1-3: [BN (resnet)] -> GAP -> Dense(512, relu) x (2 vgg, 1 resnet) -> Dense(N)
    (the report's four_class head, N = 4 there); DenseNet: CheXNet's, GAP -> Dense(N)."""
    if arch in DENSENET_BLOCKS:
        return _chexnet_head(4)
    if arch in RESNET_STAGES:
        return dict(pool="gap", hidden=(512,), outputs=4, input_bn=True)
    return dict(pool="gap", hidden=(512, 512), outputs=4)


_HEADS: dict[str, Callable[[str], dict[str, Any]]] = {
    "binary": _binary_head,
    "multiclass": _multiclass_head,
    "multilabel": _multiclass_head,  # the backbone's report head, one sigmoid output per label
}
assert tuple(_HEADS) == TASKS


def default_l2(arch: str, task: str) -> float:
    """The report's L2 factor on the head's Dense kernels: none for vgg16's multiclass head, and
    none for DenseNet's (CheXNet's paper trains it with Adam and names no weight decay)."""
    if arch in DENSENET_BLOCKS or (arch, canonical_task(task)) == ("vgg16", "multiclass"):
        return 0.0
    return 1e-3


def create_head(
    arch: str, task: str, dropout: float = DROPOUT, dtype: Any = jnp.float32, num_classes: int | None = None
) -> nn.Module:
    """The report's head for (``arch``, ``task``); returns logits (N, 1) for binary, (N, K) for
    multiclass (``four_class``, the report's name, is read as multiclass) and multilabel (the
    multiclass layers, one logit per label) with K = ``num_classes`` (default 4)."""
    check_name("arch", arch, ARCHS)
    task = canonical_task(task)
    check_name("task", task, TASKS)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers = _HEADS[task](arch)
    if task == "binary" and num_classes not in (None, 2):
        raise ValueError(f"the binary head classifies 2 classes, not {num_classes}: use multiclass")
    if task != "binary" and num_classes is not None:
        least = 1 if task == "multilabel" else 2
        if num_classes < least:
            raise ValueError(f"num_classes must be at least {least} for {task}, got {num_classes}")
        layers["outputs"] = num_classes
    return Head(**layers, dropout=dropout, dtype=dtype)


# Keras activations a Dense of an imported head may use (keras.activations, same formulas).
KERAS_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "linear": lambda x: x, "relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": jnp.tanh,
    "softmax": lambda x: nn.softmax(x, axis=-1), "elu": nn.elu, "selu": nn.selu,
    "gelu": functools.partial(nn.gelu, approximate=False), "silu": nn.silu, "swish": nn.silu,
    "softplus": nn.softplus, "softsign": nn.soft_sign, "exponential": jnp.exp, "relu6": nn.relu6,
    "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=0.2),
}
KerasLayerSpec = tuple[tuple[str, Any], ...]  # a dict's sorted items, hashable for jit


class KerasHead(KerasLayers):
    """The top of a Keras model imported whole: its recorded layers in order, returning logits.

    ``layers`` holds one spec per Keras layer (``dict(spec)`` has ``kind``, ``name`` and the
    layer's settings): ``gap``, ``flatten``, ``dropout`` (``rate``), ``batch_norm``
    (``epsilon``, ``momentum``) or ``dense`` (``units``, ``activation``, ``use_bias``). The
    last ``dense`` is the output; its activation (softmax or sigmoid) is left to
    :func:`xrayjax.inference.probabilities`, so the head returns its logits.
    """

    layers: tuple[KerasLayerSpec, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        specs = [dict(spec) for spec in self.layers]
        last = max(i for i, s in enumerate(specs) if s["kind"] == "dense")
        for i, s in enumerate(specs):
            kind, name = s["kind"], s["name"]
            if kind == "gap":
                x = self.global_average_pooling(x, name=name)
            elif kind == "flatten":
                x = self.flatten(x, name=name)
            elif kind == "dropout":
                x = nn.Dropout(s["rate"], deterministic=not train, name=name)(x)
            elif kind == "batch_norm":
                x = batch_norm(x, train, name, self.dtype, s["epsilon"], s["momentum"])
            elif kind == "dense":
                if i == last:
                    self.sow("intermediates", "embedding", x)
                x = nn.Dense(s["units"], use_bias=s["use_bias"], dtype=self.dtype,
                             kernel_init=KERAS_KERNEL_INIT, name=name)(x)
                if i != last:
                    x = KERAS_ACTIVATIONS[s["activation"]](x)
            else:
                raise ValueError(f"unknown layer kind {kind!r} in an imported head")
        return x.astype(jnp.float32)
