"""Keras-ImageDataGenerator-like random rotation, shift and zoom, vectorised in numpy.

Each image gets its own affine transform, composed exactly as Keras'
``apply_affine_transform`` composes it (rotation @ shift @ zoom about the image centre), and
all images are sampled with one batched gather: bilinear (Keras' ``interpolation_order=1``)
with edge pixels repeated outside the image (Keras' default ``fill_mode="nearest"``).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges as ImageDataGenerator takes them: degrees, fractions of the size, 1 +- zoom."""

    rotation_range: float = 15.0
    width_shift_range: float = 0.1
    height_shift_range: float = 0.1
    zoom_range: float = 0.1


def random_params(n: int, height: int, width: int, rng: np.random.Generator,
                  config: AugmentConfig) -> dict[str, np.ndarray]:
    """Per-image theta (degrees), tx, ty (pixels) and zx, zy, drawn like Keras draws them."""
    return {
        "theta": rng.uniform(-config.rotation_range, config.rotation_range, n),
        "tx": rng.uniform(-config.height_shift_range, config.height_shift_range, n) * height,
        "ty": rng.uniform(-config.width_shift_range, config.width_shift_range, n) * width,
        "zx": rng.uniform(1 - config.zoom_range, 1 + config.zoom_range, n),
        "zy": rng.uniform(1 - config.zoom_range, 1 + config.zoom_range, n),
    }


def affine_matrices(theta: np.ndarray, tx: np.ndarray, ty: np.ndarray, zx: np.ndarray,
                    zy: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 3, 3) maps from output (row, col, 1) to input coordinates, as Keras builds them."""
    n = len(theta)
    t = np.deg2rad(theta)
    m = np.zeros((n, 3, 3))
    m[:, 0, 0], m[:, 0, 1] = np.cos(t) * zx, -np.sin(t) * zy
    m[:, 1, 0], m[:, 1, 1] = np.sin(t) * zx, np.cos(t) * zy
    m[:, 0, 2] = np.cos(t) * tx - np.sin(t) * ty
    m[:, 1, 2] = np.sin(t) * tx + np.cos(t) * ty
    m[:, 2, 2] = 1.0
    # Keras: transform about the centre (o = size / 2 - 0.5), then swap the two axes because
    # its matrix is written for (x, y) while the image is indexed (row, col).
    o_x, o_y = height / 2 - 0.5, width / 2 - 0.5
    offset = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]])
    reset = np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]])
    m = offset @ m @ reset
    return m[:, [1, 0, 2]][:, :, [1, 0, 2]]


def apply_affine(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Sample (N, H, W, C) images through per-image matrices: bilinear, edges repeated; float32."""
    n, h, w, c = images.shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                             indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel(), np.ones(h * w)])  # (3, H*W)
    src = matrices[:, :2] @ grid  # (N, 2, H*W)
    r = np.clip(src[:, 0], 0, h - 1)
    q = np.clip(src[:, 1], 0, w - 1)
    r0 = np.minimum(np.floor(r).astype(np.int64), h - 2 if h > 1 else 0)
    q0 = np.minimum(np.floor(q).astype(np.int64), w - 2 if w > 1 else 0)
    fr = (r - r0)[..., None].astype(np.float32)
    fq = (q - q0)[..., None].astype(np.float32)
    r1, q1 = np.minimum(r0 + 1, h - 1), np.minimum(q0 + 1, w - 1)
    flat = images.reshape(n, h * w, c).astype(np.float32)
    base = (np.arange(n) * (h * w))[:, None]
    flat = flat.reshape(n * h * w, c)
    top = flat[base + r0 * w + q0] * (1 - fq) + flat[base + r0 * w + q1] * fq
    bottom = flat[base + r1 * w + q0] * (1 - fq) + flat[base + r1 * w + q1] * fq
    return (top * (1 - fr) + bottom * fr).reshape(n, h, w, c)


def augment_images(images: np.ndarray, seed: int,
                   config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Randomly rotate, shift and zoom a uint8 (N, H, W, C) batch; deterministic by seed."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    if n == 0:
        return images.copy()
    params = random_params(n, h, w, np.random.default_rng(seed), config)
    out = apply_affine(images, affine_matrices(**params, height=h, width=w))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
