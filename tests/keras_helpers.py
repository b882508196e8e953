"""Keras models for the parity tests, built without compiling their initialisers, and their real inputs."""

import contextlib
import math

import jax
import numpy as np
import pytest
from PIL import Image
from keras.src.initializers.random_initializers import VarianceScaling, compute_fans


def _numpy_variance_scaling(self, shape, dtype=None):
    """Keras' VarianceScaling (glorot_uniform, he_normal, ...) drawn with numpy, seeded by the
    shape: Keras' own compiles one XLA program per weight shape (experiments/bench.md)."""
    fan_in, fan_out = compute_fans(shape)
    fan = {"fan_in": fan_in, "fan_out": fan_out}.get(self.mode, (fan_in + fan_out) / 2.0)
    scale = self.scale / max(1.0, fan)
    rng = np.random.default_rng(len(shape) * 1000 + fan_in)
    if self.distribution == "uniform":
        limit = math.sqrt(3.0 * scale)
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    return rng.normal(0.0, math.sqrt(scale), shape).astype(np.float32)


@contextlib.contextmanager
def numpy_initializers():
    """While models are built: their random kernels come from numpy (the tests compare Keras with
    xrayjax on whatever weights the Keras model holds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VarianceScaling, "__call__", _numpy_variance_scaling)
        yield


def real_xrays(data_root, size: int) -> np.ndarray:
    """The first covid and the first normal test X-ray of the real dataset, RGB uint8 (2, size, size, 3)."""
    paths = [sorted((data_root / "all" / "test" / c).glob("*.jp*g"))[0] for c in ("covid", "normal")]
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])


def compiled(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` at XLA's lowest backend optimisation level: the same
    program and float semantics (no fast-math either way), compiled faster on the CPU
    (experiments/bench.md)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def keras_outputs(model, x):
    """``model(x, training=False)`` as numpy, computed by one compiled ``stateless_call``: the same
    values as Keras' eager call, which runs layer by layer (slower: experiments/bench.md)."""
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def forward(trainable, frozen, x):
        return model.stateless_call(trainable, frozen, x, training=False)[0]

    outputs = compiled(forward, trainable, frozen, x)(trainable, frozen, x)
    return [np.asarray(o) for o in outputs] if isinstance(outputs, (list, tuple)) else np.asarray(outputs)
