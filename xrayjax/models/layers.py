"""Keras' building blocks as Flax layers: the parameter-free layers (as methods, so a summary
can intercept them), Conv2D and BatchNormalization created under their Keras names, and the
BatchNorm settings Keras uses. Padding is always explicit, as Keras pads it."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


# BatchNorm settings of keras.applications.ResNet50 and DenseNet121 (Keras' default momentum).
BACKBONE_BN_EPSILON = 1.001e-5
BACKBONE_BN_MOMENTUM = 0.99
# Keras BatchNormalization defaults, used by the resnet50 multiclass head.
HEAD_BN_EPSILON = 1e-3
HEAD_BN_MOMENTUM = 0.99
# Keras' Dense and Conv2D default kernel initialiser (biases: zeros, as Flax's default; Keras'
# BatchNormalization starts from gamma 1, beta 0, mean 0, variance 1, as Flax's does).
# xrayjax.models.keras_init draws the same with numpy, by variable name: keep the two in step.
KERAS_KERNEL_INIT = nn.initializers.glorot_uniform()
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

    def average_pooling(self, x: jax.Array, window: int, stride: int, name: str) -> jax.Array:
        """Keras AveragePooling2D with 'valid' padding."""
        del name
        return nn.avg_pool(x, (window, window), strides=(stride, stride), padding="VALID")

    def concatenate(self, xs: Sequence[jax.Array], name: str) -> jax.Array:
        """Keras Concatenate on the channels (the last axis)."""
        del name
        return jnp.concatenate(xs, axis=-1)

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


def _conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Sequence[tuple[int, int]],
          **options: Any) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, as :func:`conv2d` gives it); but a conv without
    dilation or groups whose input is smaller than its kernel (a 3x3 conv on VGG's 2x2 block5
    maps at 32 px) is one matmul of the padded input's windows: XLA:CPU swaps such a conv's
    operands onto a slow loop (experiments/bench.md)."""
    kh, kw = rhs.shape[:2]
    plain = options.get("feature_group_count", 1) != 1 or isinstance(padding, str) or any(
        tuple(options.get(d) or (1, 1)) != (1, 1) for d in ("lhs_dilation", "rhs_dilation"))
    if plain or (lhs.shape[1] >= kh and lhs.shape[2] >= kw):
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    x = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    sh, sw = window_strides
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    windows = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return jnp.matmul(jnp.concatenate(windows, -1), rhs.reshape(-1, rhs.shape[-1]), precision=options.get("precision"))


def conv2d(
    x: jax.Array,
    features: int,
    kernel: int,
    name: str,
    dtype: Any,
    stride: int = 1,
    padding: Padding = _NO_PAD,
    use_bias: bool = True,
) -> jax.Array:
    """Keras Conv2D with explicit padding, created under its Keras name."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=KERAS_KERNEL_INIT,
        conv_general_dilated=_conv,
        name=name,
    )(x)


def batch_norm(
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


def keras_name(base: str, index: int) -> str:
    """Keras' automatic layer name: ``dense``, ``dense_1``, ``dense_2``, ..."""
    return f"{base}_{index}" if index else base


def check_name(kind: str, name: str, valid: Sequence[str]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
