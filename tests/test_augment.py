"""xrayjax.augment: Keras' rotation/shift/zoom on real X-rays to within one gray level, drawn
per image from the step's key, and the train step's augmentation under pmap."""

import jax
import numpy as np
import pytest

from training_helpers import assert_close, tiny_config, tiny_splits, without_seconds
from xrayjax.augment import PARAMS, AugmentConfig, affine_matrices, apply_affine, augment_images, random_params
from xrayjax.data.decode import decode
from xrayjax.loop import fit
from xrayjax.steps import AXIS, augment_step_images

SIZE = 96


@pytest.fixture(scope="module")
def xrays(data_root) -> np.ndarray:
    """One real training X-ray of each class, decoded as prepared (gray, 3 channels), (4, S, S, 3)."""
    paths = [sorted((data_root / "all" / "train" / c).glob("*.jp*g"))[0]
             for c in ("covid", "normal", "pneumonia_bac", "pneumonia_vir")]
    gray = np.stack([decode(p.read_bytes(), "gray", SIZE) for p in paths])
    return np.repeat(gray, 3, axis=-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' scipy.ndimage import path
def test_equals_keras_apply_affine_transform_on_real_xrays(xrays):
    from keras.src.legacy.preprocessing.image import apply_affine_transform

    # the ranges' extremes, and random draws within them, for each image
    rng = np.random.default_rng(0)
    extreme = dict(theta=[15.0, -15.0], tx=[9.6, -9.6], ty=[-9.6, 9.6], zx=[0.9, 1.1], zy=[1.1, 0.9])
    params = {k: np.concatenate([extreme[k], d]) for k, d in
              random_params(jax.random.key(0), 2, SIZE, SIZE).items()}
    images = xrays[rng.permutation(4)]
    ours = np.asarray(apply_affine(images, affine_matrices(**params, height=SIZE, width=SIZE)))
    ours_u8 = np.asarray(augment_images(images, jax.random.key(0)))  # its own draws: checks shape
    assert ours_u8.shape == images.shape
    keras, diff = [], []
    for i, image in enumerate(images):
        ref = apply_affine_transform(image.astype(np.float32), **{k: float(params[k][i]) for k in PARAMS},
                                     row_axis=0, col_axis=1, channel_axis=2, fill_mode="nearest", order=1)
        keras.append(ref)
        diff.append(np.abs(np.rint(ours[i]) - np.rint(ref)))
    diff = np.stack(diff)
    np.testing.assert_allclose(ours, np.stack(keras), atol=0.05)  # float32 matrices vs Keras' float64
    assert diff.max() <= 1  # within one gray level after rounding to uint8
    assert (diff > 0).mean() < 1e-3  # only values at exactly .5 round differently
    assert not np.array_equal(np.rint(ours), images)


def test_draws_are_per_image_and_by_key(xrays):
    key = jax.random.key(3)
    a, b = augment_images(xrays, key), augment_images(xrays, key)
    c = augment_images(xrays, jax.random.fold_in(key, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    params = random_params(key, 64, SIZE, SIZE, AugmentConfig())
    theta, tx, zx = (np.asarray(params[k]) for k in ("theta", "tx", "zx"))
    assert len(np.unique(theta)) == 64 and np.abs(theta).max() <= 15 and np.abs(tx).max() <= 0.1 * SIZE
    assert 0.9 <= zx.min() and zx.max() <= 1.1
    # a shard of a global batch takes the global batch's draws
    whole = augment_images(xrays, key, shards=1)
    halves = [augment_images(xrays[2 * s:2 * s + 2], key, shard=s, shards=2) for s in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_train_step_augmentation_differs_by_device_and_step_not_by_device_count(xrays):
    """Under pmap each device augments its shard of the global batch with its own draws; 2
    devices give the 1-device images; another step's key gives other images."""
    config, key = AugmentConfig(), jax.random.key(5)

    def run(num_devices: int, rng) -> np.ndarray:
        step = jax.pmap(lambda images, k: augment_step_images(config, images, k), axis_name=AXIS,
                        in_axes=(0, None), devices=jax.local_devices()[:num_devices])
        return np.asarray(step(xrays.reshape(num_devices, -1, SIZE, SIZE, 3), rng)).reshape(xrays.shape)

    one, two = run(1, key), run(2, key)
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(one, run(1, key))
    assert not np.array_equal(one, run(1, jax.random.fold_in(key, 1)))
    # devices differ: shard 1 is not shard 0's transform (the same image on both devices)
    same = np.stack([xrays[0]] * 4)
    out = np.asarray(jax.pmap(lambda images, k: augment_step_images(config, images, k), axis_name=AXIS,
                              in_axes=(0, None), devices=jax.local_devices()[:2])(same.reshape(2, 2, SIZE, SIZE, 3), key))
    assert not np.array_equal(out[0, 0], out[1, 0])


def test_augmented_training_is_deterministic_resumes_exactly_and_differs(tmp_path):
    """``--augment`` trains on the full path; the same seed gives the same run, a run stopped
    after epoch 1 and resumed equals the uninterrupted one (each step's augmentation is drawn
    from (seed, epoch, step)), and it is not the history of the same run unaugmented."""
    splits = tiny_splits("binary")
    whole = fit(tiny_config(tmp_path, "a", epochs=2, augment=True), splits)
    first = fit(tiny_config(tmp_path, "b", epochs=1, augment=True), splits)
    resumed = fit(tiny_config(tmp_path, "b", epochs=2, augment=True, resume=True), splits)
    plain = fit(tiny_config(tmp_path, "c", epochs=1, cache_features=False), splits)
    assert without_seconds(first.history) == without_seconds(whole.history)[:1]
    assert without_seconds(resumed.history) == without_seconds(whole.history)
    assert_close(resumed.state.params, whole.state.params, 0.0)
    assert_close(resumed.state.opt_state, whole.state.opt_state, 0.0)
    loss = whole.history[0]["train_loss"]
    assert loss != plain.history[0]["train_loss"] and np.isfinite(loss)
