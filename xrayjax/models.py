"""Flax model zoo equal to the Keras models of the report, layer for layer.

Backbones (``vgg16``, ``vgg19``, ``resnet50``) mirror ``keras.applications.<Model>(
include_top=False)``; every layer is created inside one ``@nn.compact`` method under its Keras
layer name, so the parameters are a flat ``{keras_name: {...}}`` dict and porting Keras
weights is a one-to-one name map. Padding is always explicit, as Keras pads it. Heads mirror
the report's classifier tops and return logits; ``Classifier`` joins a backbone and a head.
Run ``python -m xrayjax.models ARCH TASK`` for a Keras-style summary.
"""

import argparse
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xrayjax.tasks import TASKS, canonical_task

# BatchNorm settings of keras.applications.ResNet50 (Keras' own default momentum).
BACKBONE_BN_EPSILON = 1.001e-5
BACKBONE_BN_MOMENTUM = 0.99
# Keras BatchNormalization defaults, used by the resnet50 multiclass head.
HEAD_BN_EPSILON = 1e-3
HEAD_BN_MOMENTUM = 0.99
# Keras' Dense and Conv2D default kernel initialiser (biases: zeros, as Flax's default; Keras'
# BatchNormalization starts from gamma 1, beta 0, mean 0, variance 1, as Flax's does).
KERAS_KERNEL_INIT = nn.initializers.glorot_uniform()

_VGG_DEPTHS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
_VGG_WIDTHS = (64, 128, 256, 512, 512)
_RESNET_STAGES = {"resnet50": (3, 4, 6, 3)}
_RESNET_WIDTHS = (64, 128, 256, 512)


def _resnet_blocks(stage_sizes: Sequence[int]) -> tuple[str, ...]:
    """Keras block names of a ResNet v1: the stem ``conv1`` then ``conv{s}_block{b}``."""
    return ("conv1",) + tuple(
        f"conv{stage}_block{block}"
        for stage, size in enumerate(stage_sizes, start=2)
        for block in range(1, size + 1)
    )


BLOCKS: dict[str, tuple[str, ...]] = {
    **{arch: tuple(f"block{i}" for i in range(1, 6)) for arch in _VGG_DEPTHS},
    **{arch: _resnet_blocks(stages) for arch, stages in _RESNET_STAGES.items()},
}

Padding = tuple[tuple[int, int], tuple[int, int]]
_NO_PAD: Padding = ((0, 0), (0, 0))


class KerasLayers(nn.Module):
    """Base of the backbones and heads: Keras' parameter-free layers as methods.

    Each takes the Keras layer ``name``; being module methods, their calls can be
    intercepted (``nn.intercept_methods``), which is how the summary lists them as Keras
    does. They own no variables, so the parameter tree stays flat.
    """

    def zero_padding(self, x: jax.Array, padding: Padding, name: str) -> jax.Array:
        """Keras ZeroPadding2D: pad height and width with zeros."""
        del name
        return jnp.pad(x, ((0, 0), *padding, (0, 0)))

    def max_pooling(self, x: jax.Array, window: int, stride: int, name: str) -> jax.Array:
        """Keras MaxPooling2D with 'valid' padding (pad explicitly beforehand)."""
        del name
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")

    def relu(self, x: jax.Array, name: str) -> jax.Array:
        """Keras Activation('relu') layer."""
        del name
        return nn.relu(x)

    def add(self, a: jax.Array, b: jax.Array, name: str) -> jax.Array:
        """Keras Add layer (the residual sum)."""
        del name
        return a + b

    def flatten(self, x: jax.Array, name: str) -> jax.Array:
        """Keras Flatten: row-major over (H, W, C), the channels_last order."""
        del name
        return x.reshape(x.shape[0], -1)

    def global_average_pooling(self, x: jax.Array, name: str) -> jax.Array:
        """Keras GlobalAveragePooling2D: mean over height and width."""
        del name
        return jnp.mean(x, axis=(1, 2))


# Keras class of each layer method and of each Flax layer class whose name differs.
_KERAS_CLASS = {
    "zero_padding": "ZeroPadding2D",
    "max_pooling": "MaxPooling2D",
    "relu": "Activation",
    "add": "Add",
    "flatten": "Flatten",
    "global_average_pooling": "GlobalAveragePooling2D",
    "Conv": "Conv2D",
    "BatchNorm": "BatchNormalization",
    "VGG": "Functional",
    "ResNet": "Functional",
}


def _conv(
    x: jax.Array,
    features: int,
    kernel: int,
    name: str,
    dtype: Any,
    stride: int = 1,
    padding: Padding = _NO_PAD,
) -> jax.Array:
    """Keras Conv2D (with bias) with explicit padding, created under its Keras name."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        kernel_init=KERAS_KERNEL_INIT,
        name=name,
    )(x)


def _batch_norm(
    x: jax.Array, train: bool, name: str, dtype: Any, epsilon: float, momentum: float
) -> jax.Array:
    """Keras BatchNormalization: running statistics unless ``train``; in training the batch
    variance is two-pass, as Keras' ``ops.moments``."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        use_fast_variance=False,
        dtype=dtype,
        name=name,
    )(x)


class VGG(KerasLayers):
    """VGG16/VGG19 feature extractor (Keras ``include_top=False``): 5 blocks of 3x3 convs."""

    depths: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm in VGG; kept for the common backbone signature
        x = jnp.asarray(x, self.dtype)
        for block, (depth, width) in enumerate(zip(self.depths, _VGG_WIDTHS), start=1):
            for i in range(1, depth + 1):
                x = _conv(x, width, 3, f"block{block}_conv{i}", self.dtype, padding=((1, 1), (1, 1)))
                x = nn.relu(x)
            x = self.max_pooling(x, 2, 2, name=f"block{block}_pool")
            self.sow("intermediates", f"block{block}_pool", x)
        return x.astype(jnp.float32)


class ResNet(KerasLayers):
    """ResNet v1 feature extractor as keras.applications.ResNet50 (stride on the 1x1 convs).

    ``fold_bn=True`` runs the convs without their BatchNorm layers, for variables made by
    :func:`fold_batchnorm` (inference only): each conv, its bias and the ReLU after it then
    fuse into one cuDNN call instead of a conv plus two passes over the activations.
    """

    stage_sizes: tuple[int, ...]
    dtype: Any = jnp.float32
    fold_bn: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.fold_bn and train:
            raise ValueError("a ResNet with folded BatchNorm runs in inference mode only")
        if self.fold_bn:

            def bn(y: jax.Array, name: str) -> jax.Array:
                del name  # folded into the conv before it by fold_batchnorm
                return y

        else:
            bn = functools.partial(
                _batch_norm,
                train=train,
                dtype=self.dtype,
                epsilon=BACKBONE_BN_EPSILON,
                momentum=BACKBONE_BN_MOMENTUM,
            )
        x = jnp.asarray(x, self.dtype)
        x = self.zero_padding(x, ((3, 3), (3, 3)), name="conv1_pad")
        x = _conv(x, 64, 7, "conv1_conv", self.dtype, stride=2)
        x = self.relu(bn(x, name="conv1_bn"), name="conv1_relu")
        x = self.zero_padding(x, ((1, 1), (1, 1)), name="pool1_pad")
        x = self.max_pooling(x, 3, 2, name="pool1_pool")
        self.sow("intermediates", "pool1_pool", x)
        for stage, (size, width) in enumerate(zip(self.stage_sizes, _RESNET_WIDTHS), start=2):
            for block in range(1, size + 1):
                name = f"conv{stage}_block{block}"
                stride = 2 if block == 1 and stage > 2 else 1
                if block == 1:
                    shortcut = _conv(x, 4 * width, 1, f"{name}_0_conv", self.dtype, stride=stride)
                    shortcut = bn(shortcut, name=f"{name}_0_bn")
                else:
                    shortcut = x
                y = _conv(x, width, 1, f"{name}_1_conv", self.dtype, stride=stride)
                y = self.relu(bn(y, name=f"{name}_1_bn"), name=f"{name}_1_relu")
                y = _conv(y, width, 3, f"{name}_2_conv", self.dtype, padding=((1, 1), (1, 1)))
                y = self.relu(bn(y, name=f"{name}_2_bn"), name=f"{name}_2_relu")
                y = _conv(y, 4 * width, 1, f"{name}_3_conv", self.dtype)
                y = bn(y, name=f"{name}_3_bn")
                x = self.relu(self.add(shortcut, y, name=f"{name}_add"), name=f"{name}_out")
            self.sow("intermediates", f"{name}_out", x)
        return x.astype(jnp.float32)


def _keras_name(base: str, index: int) -> str:
    """Keras' automatic layer name: ``dense``, ``dense_1``, ``dense_2``, ..."""
    return f"{base}_{index}" if index else base


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
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        if self.input_bn:
            x = _batch_norm(
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
            x = nn.relu(dense(width, name=_keras_name("dense", i))(x))
            x = drop(name=_keras_name("dropout", i + self.dropout_first))(x)
        self.sow("intermediates", "embedding", x)
        x = dense(self.outputs, name=_keras_name("dense", len(self.hidden)))(x)
        return x.astype(jnp.float32)


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


# Registries, big_vision style: a name maps to a factory; unknown names list the valid ones.
_BACKBONES: dict[str, Callable[[Any], nn.Module]] = {
    **{arch: functools.partial(VGG, depths) for arch, depths in _VGG_DEPTHS.items()},
    **{arch: functools.partial(ResNet, stages) for arch, stages in _RESNET_STAGES.items()},
}


def _binary_head(arch: str) -> dict[str, Any]:
    """Task 1: Flatten -> Dropout -> Dense(256, relu) -> Dropout -> Dense(1)."""
    del arch
    return dict(pool="flatten", hidden=(256,), outputs=1, dropout_first=True)


def _multiclass_head(arch: str) -> dict[str, Any]:
    """Architectures 1-3: [BN (resnet)] -> GAP -> Dense(512, relu) x (2 vgg, 1 resnet) -> Dense(N)
    (the report's four_class head, N = 4 there)."""
    if arch in _RESNET_STAGES:
        return dict(pool="gap", hidden=(512,), outputs=4, input_bn=True)
    return dict(pool="gap", hidden=(512, 512), outputs=4)


_HEADS: dict[str, Callable[[str], dict[str, Any]]] = {
    "binary": _binary_head,
    "multiclass": _multiclass_head,
}
ARCHS: tuple[str, ...] = tuple(_BACKBONES)  # ("vgg16", "vgg19", "resnet50")
assert tuple(_HEADS) == TASKS


def default_l2(arch: str, task: str) -> float:
    """The report's L2 factor on the head's Dense kernels: none for vgg16's multiclass head."""
    return 0.0 if (arch, canonical_task(task)) == ("vgg16", "multiclass") else 1e-3


def _check_name(kind: str, name: str, valid: Sequence[str]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")


def create_backbone(arch: str, dtype: Any = jnp.float32, fold_bn: bool = False) -> nn.Module:
    """Backbone ``arch`` computing in ``dtype`` (params stay float32, output is float32).

    ``fold_bn=True``: the inference-only form that takes :func:`fold_batchnorm`'s variables
    (no effect on the VGGs, which have no BatchNorm).
    """
    _check_name("arch", arch, ARCHS)
    if arch in _RESNET_STAGES:
        return _BACKBONES[arch](dtype=dtype, fold_bn=fold_bn)
    return _BACKBONES[arch](dtype=dtype)


def fold_batchnorm(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Backbone variables with each inference-mode BatchNorm folded into the conv before it.

    ``bn((x * W + b)) = x * (W s) + (b - mean) s + beta`` with ``s = gamma / sqrt(var + eps)``:
    the same function in exact arithmetic, one layer instead of two. Keras names pair them
    (``conv2_block1_1_conv`` -> ``conv2_block1_1_bn``). Returns ``{"params": ...}`` for
    ``create_backbone(arch, fold_bn=True)``; differentiable, so opened blocks still train.
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    folded = {}
    for name, layer in params.items():
        bn = name.removesuffix("_conv") + "_bn"
        if name.endswith("_bn"):
            continue
        if not name.endswith("_conv") or bn not in params:
            folded[name] = layer
            continue
        scale = params[bn]["scale"] * jax.lax.rsqrt(stats[bn]["var"] + BACKBONE_BN_EPSILON)
        folded[name] = {
            "kernel": layer["kernel"] * scale,
            "bias": (layer["bias"] - stats[bn]["mean"]) * scale + params[bn]["bias"],
        }
    return {"params": folded}


def frozen_features(
    backbone: nn.Module, variables: Mapping[str, Any], x: jax.Array, mutable: bool | Sequence[str] = False
) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
    """The backbone's output in inference mode with its BatchNorms folded into the convs.

    Training, evaluation, prediction, Grad-CAM and :class:`Classifier` all run the frozen
    backbone through this one function, so an image has the same features everywhere (bf16
    runs included). ``mutable`` as in ``Module.apply``: ``["intermediates"]`` returns
    ``(features, state)`` with the sown stage outputs.
    """
    if isinstance(backbone, ResNet):
        backbone = backbone.clone(fold_bn=True)
    return backbone.apply(fold_batchnorm(variables), x, mutable=mutable)


def create_head(
    arch: str, task: str, dropout: float = 0.5, dtype: Any = jnp.float32, num_classes: int | None = None
) -> nn.Module:
    """The report's head for (``arch``, ``task``); returns logits (N, 1) for binary, (N, K) for
    multiclass (``four_class``, the report's name, is read as multiclass) with K = ``num_classes``
    (default 4)."""
    _check_name("arch", arch, ARCHS)
    task = canonical_task(task)
    _check_name("task", task, TASKS)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers = _HEADS[task](arch)
    if task == "binary" and num_classes not in (None, 2):
        raise ValueError(f"the binary head classifies 2 classes, not {num_classes}: use multiclass")
    if task == "multiclass" and num_classes is not None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        layers["outputs"] = num_classes
    return Head(**layers, dropout=dropout, dtype=dtype)


def create_model(
    arch: str, task: str = "multiclass", dropout: float = 0.5, dtype: Any = jnp.float32,
    num_classes: int | None = None,
) -> Classifier:
    """Full classifier; variables sit under ``backbone`` and ``head``. ``dtype`` is the
    backbone's compute dtype; the head computes in float32, as in training."""
    return Classifier(
        backbone=create_backbone(arch, dtype=dtype),
        head=create_head(arch, task, dropout=dropout, num_classes=num_classes),
    )


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_params(variables: Mapping[str, Any]) -> dict[str, int]:
    """Keras-convention counts: head params are trainable; backbone params and every
    BatchNorm statistic are not. Works on arrays or on ``jax.eval_shape`` output."""
    params = variables.get("params", {})
    trainable = _size(params.get("head", {}))
    total = _size(params) + _size(variables.get("batch_stats", {}))
    return {"total": total, "trainable": trainable, "non_trainable": total - trainable}


def _layer_rows(model: nn.Module, image_size: int) -> tuple[list[tuple[tuple[str, ...], str, tuple]], dict]:
    """Trace ``model.init`` shape-only, recording (path, class, output shape) of every layer."""
    rows = []

    def record(next_fun, args, kwargs, context):
        method, module = context.method_name, context.module
        if method in _KERAS_CLASS:  # a parameter-free layer method
            out = next_fun(*args, **kwargs)
            rows.append((module.path + (kwargs["name"],), _KERAS_CLASS[method], out.shape))
            return out
        if method != "__call__" or not module.path:
            return next_fun(*args, **kwargs)
        row = len(rows)  # a container's row goes before its layers' rows
        rows.append(None)
        out = next_fun(*args, **kwargs)
        cls = type(module).__name__
        rows[row] = (module.path, _KERAS_CLASS.get(cls, cls), out.shape)
        return out

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), x
        )
    return rows, variables


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            return {}
        tree = tree[key]
    return tree


def summary(arch: str, task: str, expand: bool = False, image_size: int = 224) -> str:
    """Keras-style summary of ``create_model(arch, task)``: layer (type), output shape,
    parameter count, then total / trainable / non-trainable. ``expand`` lists the backbone's
    own layers under its row (Keras' ``expand_nested``)."""
    rows, variables = _layer_rows(create_model(arch, task), image_size)
    lines = []
    for path, cls, shape in rows:
        if path == ("head",) or (path[0] == "backbone" and len(path) > 1 and not expand):
            continue
        n = _size(_subtree(variables.get("params", {}), path)) + _size(
            _subtree(variables.get("batch_stats", {}), path)
        )
        name = arch if path == ("backbone",) else path[-1]
        indent = "  " * (len(path) - 1) if path[0] == "backbone" else ""
        layer = f"{indent}{name} ({cls})"
        lines.append((layer, str((None, *shape[1:])), f"{n:,}"))
    widths = [max(len(r[i]) for r in lines + [("Layer (type)", "Output Shape", "Param #")])
              for i in range(3)]

    def fmt(r: tuple[str, str, str]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"

    rule = "-" * len(fmt(lines[0]))
    counts = count_params(variables)
    table = [f'Model: "{arch}_{task}"', rule, fmt(("Layer (type)", "Output Shape", "Param #")),
             rule.replace("-", "=")]
    table += [fmt(r) for r in lines] + [rule]
    for label, key in (("Total", "total"), ("Trainable", "trainable"),
                       ("Non-trainable", "non_trainable")):
        table.append(f"{label} params: {counts[key]:,} ({counts[key] * 4 / 2**20:.2f} MB)")
    return "\n".join(table)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the Keras-style summary of one (arch, task) model."""
    parser = argparse.ArgumentParser(
        prog="python -m xrayjax.models",
        description="Print a Keras-style summary (layers, output shapes, parameter counts) "
        "of an xrayjax model. Parameter counts follow Keras: the frozen backbone and every "
        "BatchNorm moving statistic are non-trainable.",
    )
    parser.add_argument("arch", choices=ARCHS, help="backbone architecture")
    parser.add_argument("task", choices=(*TASKS, "four_class"), help="binary: one sigmoid output (Task 1); "
                        "multiclass (the report's four_class): a softmax over covid/normal/bacterial/viral "
                        "pneumonia (Task 2)")
    parser.add_argument("--expand", action="store_true",
                        help="also list every backbone layer (Keras layer names)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="input height/width (default 224, as in the report)")
    args = parser.parse_args(argv)
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (five stride-2 stages), got {args.image_size}")
    print(summary(args.arch, canonical_task(args.task), expand=args.expand, image_size=args.image_size))


if __name__ == "__main__":
    main()
