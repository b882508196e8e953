"""The backbones, equal to ``keras.applications.<Model>(include_top=False)`` layer for layer.

Each carries ``preprocessing``, the input mode its ImageNet weights expect
(:data:`xrayjax.preprocessing.ARCH_PREPROCESSING`). Every layer is created inside one ``@nn.compact`` method under its Keras layer name, so the
parameters are a flat ``{keras_name: {...}}`` dict and porting Keras weights is a one-to-one
name map. A registry maps each architecture name to its factory (big_vision style).
"""

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xrayjax.models.layers import (
    BACKBONE_BN_EPSILON, BACKBONE_BN_MOMENTUM, KerasLayers, batch_norm, check_name, conv2d, keras_name,
)
from xrayjax.preprocessing import ARCH_PREPROCESSING, MODES, preprocess_input


VGG_DEPTHS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
VGG_WIDTHS = (64, 128, 256, 512, 512)
RESNET_STAGES = {"resnet50": (3, 4, 6, 3)}
RESNET_WIDTHS = (64, 128, 256, 512)
DENSENET_BLOCKS = {"densenet121": (6, 12, 24, 16)}
DENSENET_GROWTH = 32


def _resnet_blocks(stage_sizes: Sequence[int]) -> tuple[str, ...]:
    """Keras block names of a ResNet v1: the stem ``conv1`` then ``conv{s}_block{b}``."""
    return ("conv1",) + tuple(
        f"conv{stage}_block{block}"
        for stage, size in enumerate(stage_sizes, start=2)
        for block in range(1, size + 1)
    )


def _densenet_blocks(blocks: Sequence[int]) -> tuple[str, ...]:
    """Keras block names of a DenseNet: the stem ``conv1``, each dense block ``conv{s}`` and the
    transition ``pool{s}`` after it, then the final BatchNorm ``bn``."""
    stages = range(2, len(blocks) + 2)
    return ("conv1",) + tuple(n for s in stages for n in (f"conv{s}", f"pool{s}"))[:-1] + ("bn",)


# The units that fine-tuning opens, from the last: a backbone layer belongs to the block whose
# name it is or starts with followed by "_" (block5_conv1, conv5_block3_1_bn, bn).
BLOCKS: dict[str, tuple[str, ...]] = {
    **{arch: tuple(f"block{i}" for i in range(1, 6)) for arch in VGG_DEPTHS},
    **{arch: _resnet_blocks(stages) for arch, stages in RESNET_STAGES.items()},
    **{arch: _densenet_blocks(blocks) for arch, blocks in DENSENET_BLOCKS.items()},
}


class VGG(KerasLayers):
    """VGG16/VGG19 feature extractor (Keras ``include_top=False``): 5 blocks of 3x3 convs."""

    depths: tuple[int, ...]
    dtype: Any = jnp.float32
    preprocessing: str = "caffe"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm in VGG; kept for the common backbone signature
        x = jnp.asarray(x, self.dtype)
        for block, (depth, width) in enumerate(zip(self.depths, VGG_WIDTHS), start=1):
            for i in range(1, depth + 1):
                x = conv2d(x, width, 3, f"block{block}_conv{i}", self.dtype, padding=((1, 1), (1, 1)))
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
    preprocessing: str = "caffe"

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
                batch_norm,
                train=train,
                dtype=self.dtype,
                epsilon=BACKBONE_BN_EPSILON,
                momentum=BACKBONE_BN_MOMENTUM,
            )
        x = jnp.asarray(x, self.dtype)
        x = self.zero_padding(x, ((3, 3), (3, 3)), name="conv1_pad")
        x = conv2d(x, 64, 7, "conv1_conv", self.dtype, stride=2)
        x = self.relu(bn(x, name="conv1_bn"), name="conv1_relu")
        x = self.zero_padding(x, ((1, 1), (1, 1)), name="pool1_pad")
        x = self.max_pooling(x, 3, 2, name="pool1_pool")
        self.sow("intermediates", "pool1_pool", x)
        for stage, (size, width) in enumerate(zip(self.stage_sizes, RESNET_WIDTHS), start=2):
            for block in range(1, size + 1):
                name = f"conv{stage}_block{block}"
                stride = 2 if block == 1 and stage > 2 else 1
                if block == 1:
                    shortcut = conv2d(x, 4 * width, 1, f"{name}_0_conv", self.dtype, stride=stride)
                    shortcut = bn(shortcut, name=f"{name}_0_bn")
                else:
                    shortcut = x
                y = conv2d(x, width, 1, f"{name}_1_conv", self.dtype, stride=stride)
                y = self.relu(bn(y, name=f"{name}_1_bn"), name=f"{name}_1_relu")
                y = conv2d(y, width, 3, f"{name}_2_conv", self.dtype, padding=((1, 1), (1, 1)))
                y = self.relu(bn(y, name=f"{name}_2_bn"), name=f"{name}_2_relu")
                y = conv2d(y, 4 * width, 1, f"{name}_3_conv", self.dtype)
                y = bn(y, name=f"{name}_3_bn")
                x = self.relu(self.add(shortcut, y, name=f"{name}_add"), name=f"{name}_out")
            self.sow("intermediates", f"{name}_out", x)
        return x.astype(jnp.float32)


class DenseNet(KerasLayers):
    """DenseNet-BC feature extractor as keras.applications.DenseNet121: dense blocks of
    pre-activation conv blocks (BN, ReLU, 1x1 conv, BN, ReLU, 3x3 conv, concatenated to their
    input), transitions (BN, ReLU, 1x1 conv halving the channels, 2x2 average pool), bias-free
    convs, and a final BN and ReLU.

    Its BatchNorms stay separate in inference: most precede a ReLU and a conv, so they cannot
    fold into a conv's weights.
    """

    blocks: tuple[int, ...]
    dtype: Any = jnp.float32
    preprocessing: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = functools.partial(
            batch_norm, train=train, dtype=self.dtype, epsilon=BACKBONE_BN_EPSILON, momentum=BACKBONE_BN_MOMENTUM
        )
        conv = functools.partial(conv2d, dtype=self.dtype, use_bias=False)
        x = jnp.asarray(x, self.dtype)
        x = self.zero_padding(x, ((3, 3), (3, 3)), name=keras_name("zero_padding2d", 0))
        x = conv(x, 64, 7, "conv1_conv", stride=2)
        x = self.relu(bn(x, name="conv1_bn"), name="conv1_relu")
        x = self.zero_padding(x, ((1, 1), (1, 1)), name=keras_name("zero_padding2d", 1))
        x = self.max_pooling(x, 3, 2, name="pool1")
        self.sow("intermediates", "pool1", x)
        for stage, size in enumerate(self.blocks, start=2):
            if stage > 2:  # the transition after the previous dense block
                name = f"pool{stage - 1}"
                x = self.relu(bn(x, name=f"{name}_bn"), name=f"{name}_relu")
                x = conv(x, x.shape[-1] // 2, 1, f"{name}_conv")
                x = self.average_pooling(x, 2, 2, name=f"{name}_pool")
                self.sow("intermediates", f"{name}_pool", x)
            for block in range(1, size + 1):
                name = f"conv{stage}_block{block}"
                y = self.relu(bn(x, name=f"{name}_0_bn"), name=f"{name}_0_relu")
                y = conv(y, 4 * DENSENET_GROWTH, 1, f"{name}_1_conv")
                y = self.relu(bn(y, name=f"{name}_1_bn"), name=f"{name}_1_relu")
                y = conv(y, DENSENET_GROWTH, 3, f"{name}_2_conv", padding=((1, 1), (1, 1)))
                x = self.concatenate([x, y], name=f"{name}_concat")
            self.sow("intermediates", f"{name}_concat", x)
        x = self.relu(bn(x, name="bn"), name="relu")
        self.sow("intermediates", "relu", x)
        return x.astype(jnp.float32)


# Registries, big_vision style: a name maps to a factory; unknown names list the valid ones.
_BACKBONES: dict[str, Callable[[Any], nn.Module]] = {
    **{arch: functools.partial(VGG, depths) for arch, depths in VGG_DEPTHS.items()},
    **{arch: functools.partial(ResNet, stages) for arch, stages in RESNET_STAGES.items()},
    **{arch: functools.partial(DenseNet, blocks) for arch, blocks in DENSENET_BLOCKS.items()},
}
ARCHS: tuple[str, ...] = tuple(_BACKBONES)  # ("vgg16", "vgg19", "resnet50", "densenet121")
assert set(ARCH_PREPROCESSING) == set(ARCHS)


def create_backbone(
    arch: str, dtype: Any = jnp.float32, fold_bn: bool = False, preprocessing: str | None = None
) -> nn.Module:
    """Backbone ``arch`` computing in ``dtype`` (params stay float32, output is float32).

    ``fold_bn=True``: the inference-only form that takes :func:`fold_batchnorm`'s variables
    (ResNet only; the VGGs have no BatchNorm, DenseNet's do not fold). ``preprocessing``: the
    input mode it records, by default the one of its ImageNet weights.
    """
    check_name("arch", arch, ARCHS)
    preprocessing = ARCH_PREPROCESSING[arch] if preprocessing is None else preprocessing
    check_name("preprocessing mode", preprocessing, MODES)
    if arch in RESNET_STAGES:
        return _BACKBONES[arch](dtype=dtype, fold_bn=fold_bn, preprocessing=preprocessing)
    return _BACKBONES[arch](dtype=dtype, preprocessing=preprocessing)


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
    """The backbone's output in inference mode, a ResNet's BatchNorms folded into its convs.

    Training, evaluation, prediction, Grad-CAM and :class:`Classifier` all run the frozen
    backbone through this one function, so an image has the same features everywhere (bf16
    runs included). ``mutable`` as in ``Module.apply``: ``["intermediates"]`` returns
    ``(features, state)`` with the sown stage outputs.
    """
    if isinstance(backbone, ResNet):
        return backbone.clone(fold_bn=True).apply(fold_batchnorm(variables), x, mutable=mutable)
    return backbone.apply(variables, x, train=False, mutable=mutable)


def image_features(backbone: nn.Module, variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    """:func:`frozen_features` of raw (uint8) images, preprocessed on the device as the backbone
    expects: the one route from pixels to features of training, evaluation and prediction."""
    return frozen_features(backbone, variables, preprocess_input(images, mode=backbone.preprocessing))
