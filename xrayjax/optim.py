"""The optimizer of a run: Keras' Adam on the trainable leaves, nothing on the frozen ones.

:func:`keras_adam` is ``keras.optimizers.Adam`` as an optax transformation. It differs from
``optax.adam`` in where ε enters: Keras folds the bias correction into the step size,
``lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + ε)``, while optax divides by
``sqrt(v̂) + ε``; Keras' ε is therefore larger by ``1 / sqrt(1 - b2^t)`` (30x at step 1), and
training drifts measurably from Keras' ``fit`` unless the update is written Keras' way.
:func:`make_optimizers` gives each trainable part of the model (head, opened backbone) its own,
so the cached-feature path trains a state that holds only the head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from xrayjax.models import BLOCKS

LEARNING_RATE = 1e-4  # the report's Adam learning rate (Keras' default is 1e-3)
KERAS_ADAM_EPSILON = 1e-7


class KerasAdamState(NamedTuple):
    """Keras' Adam slots: ``iterations``, momentums ``m`` and velocities ``v``."""

    count: jax.Array
    m: Any
    v: Any


def keras_adam(
    learning_rate: float,
    beta_1: float = 0.9,
    beta_2: float = 0.999,
    epsilon: float = KERAS_ADAM_EPSILON,
) -> optax.GradientTransformation:
    """``keras.optimizers.Adam(learning_rate, beta_1, beta_2, epsilon)``, operation for operation.

    Per leaf, as Keras' ``Adam.update_step``: ``m += (g - m)(1 - b1)``, ``v += (g² - v)(1 - b2)``,
    ``var -= m·alpha / (sqrt(v) + ε)`` with ``alpha = lr·sqrt(1 - b2^t) / (1 - b1^t)``, every
    factor in the leaf's dtype.
    """

    def init(params: Any) -> KerasAdamState:
        return KerasAdamState(
            count=jnp.zeros([], jnp.int32),
            m=jax.tree.map(jnp.zeros_like, params),
            v=jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads: Any, state: KerasAdamState, params: Any = None) -> tuple[Any, KerasAdamState]:
        del params
        count = state.count + 1

        def step_size(dtype: Any) -> jax.Array:
            t = count.astype(dtype)
            b1_power = jnp.power(jnp.asarray(beta_1, dtype), t)
            b2_power = jnp.power(jnp.asarray(beta_2, dtype), t)
            return jnp.asarray(learning_rate, dtype) * jnp.sqrt(1 - b2_power) / (1 - b1_power)

        m = jax.tree.map(lambda g, m: m + (g - m) * (1 - beta_1), grads, state.m)
        v = jax.tree.map(lambda g, v: v + (jnp.square(g) - v) * (1 - beta_2), grads, state.v)
        updates = jax.tree.map(lambda m, v: -(m * step_size(m.dtype)) / (jnp.sqrt(v) + epsilon), m, v)
        return updates, KerasAdamState(count, m, v)

    return optax.GradientTransformation(init, update)


def trainable_mask(params: Mapping[str, Any], arch: str, fine_tune: int) -> Any:
    """True for every head leaf and for backbone leaves of the last ``fine_tune`` blocks (a layer
    of block ``b`` is named ``b`` or ``b_...``)."""
    opened = BLOCKS[arch][len(BLOCKS[arch]) - fine_tune:] if fine_tune > 0 else ()
    prefixes = tuple(b + "_" for b in opened)
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict(
        {k: k[0] == "head" or (bool(opened) and (k[1] in opened or k[1].startswith(prefixes))) for k in flat}
    )


def make_optimizers(
    params: Mapping[str, Any], arch: str, fine_tune: int, lr: float
) -> dict[str, optax.GradientTransformation]:
    """One optimizer per trainable part of ``params`` (``{"backbone", "head"}``): :func:`keras_adam`
    for the head; with ``fine_tune`` blocks opened, the backbone's :func:`keras_adam` on those
    blocks' leaves and ``set_to_zero`` on the rest (no slots kept). A frozen backbone has none."""
    txs = {"head": keras_adam(lr)}
    if fine_tune:
        mask = trainable_mask(params, arch, fine_tune)["backbone"]
        labels = jax.tree.map(lambda t: "trainable" if t else "frozen", mask)
        txs["backbone"] = optax.multi_transform({"trainable": keras_adam(lr), "frozen": optax.set_to_zero()}, labels)
    return txs
