"""Inference of a trained classifier: logits, penultimate activations and class probabilities.

The one route by which evaluation, prediction, Grad-CAM and cross-validation run a model: the
backbone through :func:`xrayjax.models.frozen_features` (as training computes it), then the head
in inference mode.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from scipy.special import expit, softmax
from tqdm.auto import tqdm

from xrayjax.data import Split, batches
from xrayjax.models import image_features, submodule_variables

BATCH_SIZE = 32


def probabilities(logits: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Logits (N, 1) or (N, K) -> class probabilities (N, 2) or (N, K), rows summing to 1.

    One logit means a sigmoid head whose output is P(class 1); column 0 is then 1 - that.
    ``multilabel``: each column's own sigmoid, P(label present), (N, K).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, K), got shape {logits.shape}")
    if multilabel:
        return expit(logits)
    if logits.shape[1] == 1:
        positive = expit(logits[:, 0])
        return np.stack([1.0 - positive, positive], axis=1)
    return softmax(logits, axis=1)


def positive_labels(names: Sequence[str], probs: Sequence[float], thresholds: Sequence[float]) -> list[str]:
    """The labels of one multilabel row whose probability is at or above its threshold."""
    return [n for n, p, th in zip(names, probs, thresholds) if p >= th]


@functools.partial(jax.jit, static_argnums=0)
def backbone_features(model: nn.Module, variables: Mapping, images: jax.Array) -> jax.Array:
    """The backbone's output feature maps of uint8 images, given a Classifier's variables, computed
    as training computes them (:func:`xrayjax.models.image_features`)."""
    return image_features(model.backbone, submodule_variables(variables, "backbone"), images)


def _head_outputs(model: nn.Module, variables: Mapping, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits and the head's sown "embedding" (penultimate activations), inference mode."""
    logits, state = model.head.apply(
        submodule_variables(variables, "head"), features, train=False, mutable=["intermediates"]
    )
    return logits, state["intermediates"]["embedding"][0]


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: nn.Module, variables: Mapping, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _head_outputs(model, variables, backbone_features(model, variables, images))


@functools.partial(jax.jit, static_argnums=0)
def _forward_features(
    model: nn.Module, variables: Mapping, features: tuple[jax.Array, ...]
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    logits, embeddings = _head_outputs(model, variables, jnp.concatenate(features))
    ends = np.cumsum([len(f) for f in features])[:-1]
    return tuple(jnp.split(logits, ends)), tuple(jnp.split(embeddings, ends))


def infer(
    model: nn.Module,
    variables: Mapping,
    split: Split,
    batch_size: int = BATCH_SIZE,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the head's penultimate activations ("embedding") for every image of a split.

    Every batch is padded to ``batch_size`` (one compiled shape; the backbone's rounding can
    depend on it), padding dropped; ``desc`` shows a progress bar under that name on a terminal,
    else one line as the work starts (a log gets no bar redraws).
    """
    bar = desc is not None and sys.stderr.isatty()
    if desc is not None and not bar:
        print(f"{desc}: {len(split)} images", file=sys.stderr, flush=True)
    logits, embeddings = [], []
    with contextlib.closing(batches(split, batch_size, 1, shuffle=False)) as stream:
        for batch in tqdm(stream, desc=desc, disable=not bar, total=-(-len(split) // batch_size), unit="batch"):
            keep = batch["mask"][0] > 0
            out_logits, out_embeddings = _forward(model, variables, batch["image"][0])
            logits.append(np.asarray(out_logits)[keep])
            embeddings.append(np.asarray(out_embeddings)[keep])
    return np.concatenate(logits), np.concatenate(embeddings)


def infer_features(
    model: nn.Module, variables: Mapping, features: Sequence[jax.Array | np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`infer` from backbone feature maps already computed (training's feature cache).

    Only the head runs, once for all the arrays together (one small compilation); returns
    ``(logits, embedding)`` per array, in order.
    """
    logits, embeddings = _forward_features(model, variables, tuple(features))
    return [(np.asarray(lg), np.asarray(em)) for lg, em in zip(logits, embeddings)]
