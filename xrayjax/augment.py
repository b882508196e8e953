"""Keras-ImageDataGenerator-like random rotation, shift and zoom, in jnp for the train step.

Each image gets its own affine transform, composed exactly as Keras'
``apply_affine_transform`` composes it (rotation @ shift @ zoom about the image centre), and
is sampled as Keras samples it (``scipy.ndimage.affine_transform``): bilinear
(``interpolation_order=1``) with edge pixels repeated outside the image
(``fill_mode="nearest"``), here by ``jax.scipy.ndimage.map_coordinates``. Pure and jittable;
nothing runs on the host.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

PARAMS: tuple[str, ...] = ("theta", "tx", "ty", "zx", "zy")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges as ImageDataGenerator takes them: degrees, fractions of the size, 1 +- zoom."""

    rotation_range: float = 15.0
    width_shift_range: float = 0.1
    height_shift_range: float = 0.1
    zoom_range: float = 0.1


def random_params(key: jax.Array, n: int, height: int, width: int,
                  config: AugmentConfig = AugmentConfig()) -> dict[str, jax.Array]:
    """Per-image theta (degrees), tx, ty (pixels) and zx, zy (n,), uniform in Keras' ranges
    (Keras' tx is the height shift, its ty the width shift)."""
    c = config
    low = jnp.array([-c.rotation_range, -c.height_shift_range * height, -c.width_shift_range * width,
                     1 - c.zoom_range, 1 - c.zoom_range], jnp.float32)
    high = jnp.array([c.rotation_range, c.height_shift_range * height, c.width_shift_range * width,
                      1 + c.zoom_range, 1 + c.zoom_range], jnp.float32)
    u = jax.random.uniform(key, (n, len(PARAMS)), jnp.float32, low, high)
    return dict(zip(PARAMS, u.T))


def affine_matrices(theta: jax.Array, tx: jax.Array, ty: jax.Array, zx: jax.Array, zy: jax.Array,
                    height: int, width: int) -> jax.Array:
    """(N, 3, 3) maps from output (row, col, 1) to input coordinates, as Keras builds them."""
    t = jnp.deg2rad(theta)
    cos, sin = jnp.cos(t), jnp.sin(t)
    zero, one = jnp.zeros_like(t), jnp.ones_like(t)
    m = jnp.stack([
        jnp.stack([cos * zx, -sin * zy, cos * tx - sin * ty], -1),
        jnp.stack([sin * zx, cos * zy, sin * tx + cos * ty], -1),
        jnp.stack([zero, zero, one], -1),
    ], -2)
    # Keras: transform about the centre (o = size / 2 - 0.5), then swap the two axes because
    # its matrix is written for (x, y) while the image is indexed (row, col).
    o_x, o_y = height / 2 - 0.5, width / 2 - 0.5
    offset = jnp.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]], m.dtype)
    reset = jnp.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]], m.dtype)
    m = offset @ m @ reset
    return m[:, [1, 0, 2]][:, :, [1, 0, 2]]


def apply_affine(images: jax.Array, matrices: jax.Array) -> jax.Array:
    """Sample (N, H, W, C) images through per-image matrices: bilinear, edges repeated; float32."""
    _, h, w, _ = images.shape
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                              indexing="ij")
    grid = jnp.stack([rows.ravel(), cols.ravel(), jnp.ones(h * w, jnp.float32)])  # (3, H*W)

    def one(image: jax.Array, matrix: jax.Array) -> jax.Array:
        src = (matrix[:2] @ grid).reshape(2, h, w)
        channel = lambda x: jax.scipy.ndimage.map_coordinates(x, list(src), order=1, mode="nearest")
        return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(images.astype(jnp.float32), matrices)


def augment_images(images: jax.Array, key: jax.Array, config: AugmentConfig = AugmentConfig(), *,
                   shard: int | jax.Array = 0, shards: int = 1) -> jax.Array:
    """Randomly rotate, shift and zoom an (N, H, W, C) batch in [0, 255]; rounded to whole gray
    levels as uint8 images are, returned as float32.

    ``key`` draws the parameters of ``shards * N`` images and this batch takes those of part
    ``shard``, so a global batch split over devices is augmented as it is on one device.
    """
    n, h, w, _ = images.shape
    drawn = random_params(key, shards * n, h, w, config)
    params = {k: jax.lax.dynamic_slice_in_dim(v, shard * n, n) for k, v in drawn.items()}
    matrices = affine_matrices(**params, height=h, width=w)
    return jnp.clip(jnp.round(apply_affine(images, matrices)), 0, 255)
