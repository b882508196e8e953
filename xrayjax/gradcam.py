"""Grad-CAM (Selvaraju et al. 2017) on the backbone's output feature map (the last conv block).

The backbone runs once; the class score is differentiated with ``jax.grad`` through the head
alone, so no backward pass goes through the frozen convolutions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from xrayjax.inference import backbone_features
from xrayjax.models import submodule_variables


def grad_cam(
    model: nn.Module,
    variables: Mapping,
    images: np.ndarray,
    classes: np.ndarray | None = None,
    features: np.ndarray | jax.Array | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps for uint8 RGB images (N, S, S, 3) -> ((N, S, S) in [0, 1], logits).

    The score is the logit of ``classes`` (default: the predicted class); for a binary head
    (one logit, the evidence for class 1) it is the logit for class 1 and minus the logit
    for class 0. Channel weights are the spatial mean of the score's gradient with respect
    to the feature map; the weighted sum is ReLU-ed, resized bilinearly to the image size
    and divided by its maximum (an all-zero map stays zero). ``features``: the backbone's
    output for ``images`` when already computed (training's feature cache); the backbone
    then does not run again.
    """
    if features is None:
        features = backbone_features(model, variables, jnp.asarray(images))
    targets = None if classes is None else jnp.asarray(classes, jnp.int32)
    heatmaps, logits = _grad_cam(
        model.head, submodule_variables(variables, "head"), jnp.asarray(features), images.shape[1:3], targets
    )
    return np.asarray(heatmaps), np.asarray(logits)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _grad_cam(
    head: nn.Module, head_vars: Mapping, features: jax.Array, size: tuple[int, int], classes: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    logits = head.apply(head_vars, features, train=False)
    if classes is None:
        binary = logits.shape[-1] == 1
        classes = (logits[:, 0] > 0).astype(jnp.int32) if binary else logits.argmax(-1)

    def score(features: jax.Array) -> jax.Array:
        out = head.apply(head_vars, features, train=False)
        if out.shape[-1] == 1:
            return jnp.sum(jnp.where(classes == 1, out[:, 0], -out[:, 0]))
        return jnp.sum(jnp.take_along_axis(out, classes[:, None], axis=1))

    weights = jax.grad(score)(features).mean(axis=(1, 2))
    cam = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", features, weights))
    cam = jax.image.resize(cam, (cam.shape[0], *size), method="bilinear")
    peak = cam.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0), logits
