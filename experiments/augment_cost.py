"""Host and step cost of ``--augment`` now that it runs in the train step (issue 23 item 3).

Times the host's batches over prepared records (the same with or without ``--augment``: the
host no longer augments), the jitted augmentation alone, and the full-path train step with
augmentation on and off. ``python experiments/augment_cost.py DATA_DIR TFDS_DIR``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import jax
import numpy as np

from xrayjax.augment import AugmentConfig, augment_images
from xrayjax.data import DataConfig, batches, load_splits
from xrayjax.steps import (build_step_model, create_train_state, epoch_key, init_variables, make_train_step,
                           replicate)


def _rate(fn: Callable[[], int], repeats: int) -> float:
    """Images per second of ``fn`` (returns its image count), after one warm-up call."""
    fn()
    began, n = time.perf_counter(), 0
    for _ in range(repeats):
        n += fn()
    return n / (time.perf_counter() - began)


def main(data_dir: str, tfds_dir: str) -> None:
    train = load_splits(DataConfig(data_dir=data_dir, tfds_dir=tfds_dir)).train
    read = lambda: sum(int(b["mask"].sum()) for b in batches(train, 256, 1, shuffle=True, seed=0))
    print(f"host batches, 224 px, batch 256: {_rate(read, 3):.0f} images/s (with or without --augment)")
    images = np.asarray(train.images[np.arange(32)])
    aug = jax.jit(augment_images)
    one = lambda: len(jax.block_until_ready(aug(images, jax.random.key(0))))
    print(f"jitted augmentation alone, 224 px, batch 32, CPU: {_rate(one, 5):.0f} images/s")
    small = np.asarray(images[:, ::4, ::4])  # 56 px
    for augment in (None, AugmentConfig()):
        model = build_step_model("vgg16", "binary", augment=augment)
        devices = jax.local_devices()[:1]
        state = replicate(create_train_state(model, init_variables(model, 56, init="random", seed=0), 1e-4), devices)
        step = make_train_step(model, devices)
        batch = {"image": small[None], "label": np.zeros((1, 32), np.int32), "mask": np.ones((1, 32), np.float32)}

        def run() -> int:
            nonlocal state
            state, metrics = step(state, batch, epoch_key(0, 0))
            jax.block_until_ready(metrics)
            return 32

        print(f"train step, vgg16 frozen, 56 px, batch 32, CPU, augment={augment is not None}: "
              f"{_rate(run, 5):.0f} images/s")


if __name__ == "__main__":
    main(*sys.argv[1:])
