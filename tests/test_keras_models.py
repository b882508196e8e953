"""Keras models imported whole (weights/port.py --keras-model): file kinds, parity, refusals.

Keras 3 writes each file at test time in tmp_path (random weights, BatchNorm statistics away
from 0 and 1); the imported run's probabilities must equal ``model.predict`` to 1e-5.
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

from xrayjax import load_run  # noqa: E402
from xrayjax.inference import probabilities  # noqa: E402
from xrayjax.keras_import import KerasImportError, import_keras_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
APPS = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19,
        "resnet50": keras.applications.ResNet50, "densenet121": keras.applications.DenseNet121}


def _port_script():
    spec = importlib.util.spec_from_file_location("weights_port", REPO / "weights" / "port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _randomize(model, seed=0):
    """Random weights, BatchNorm moving statistics away from 0 and 1 (variance in [0.5, 2])."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _randomize(layer, seed + 1)
        elif isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.5, n),
                               rng.uniform(0.5, 2.0, n)])
        elif layer.weights:
            layer.set_weights([w * rng.uniform(0.8, 1.2, w.shape).astype(w.dtype) + 0.01 * rng.normal(size=w.shape)
                               for w in layer.get_weights()])
    return model


def _head(x, kind, outputs):
    layers = keras.layers
    if kind == "gap":
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(8, activation="relu")(x)
        x = layers.Dropout(0.3)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Dense(6, activation="tanh")(x)
    else:
        x = layers.Flatten()(x)
        x = layers.Dropout(0.5)(x)
        x = layers.Dense(8, activation="gelu")(x)
    return layers.Dense(outputs, activation="sigmoid" if outputs == 1 else "softmax")(x)


def build(arch, nested=True, head="gap", outputs=4):
    inputs = keras.Input((SIZE, SIZE, 3))
    if nested:
        backbone = APPS[arch](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
        features = backbone(inputs)
    else:
        backbone = APPS[arch](include_top=False, weights=None, input_tensor=inputs)
        features = backbone.output
    return _randomize(keras.Model(inputs, _head(features, head, outputs)))


def _images(n=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


def _check_parity(path, model, tmp_path, outputs):
    run_dir = import_keras_run(path, tmp_path / "run", preprocess="none")
    run = load_run(run_dir)
    x = _images()
    want = model.predict(x, verbose=0)
    from xrayjax.inference import _forward  # the route predict and evaluate take

    logits, _ = _forward(run.model, run.variables, x)
    got = probabilities(np.asarray(logits), multilabel=run.config.task == "multilabel")
    if outputs == 1:
        got = got[:, 1:]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    meta = json.loads((run_dir / "config.json").read_text())["keras_import"]
    assert meta["preprocess"] == "none" and len(meta["source_sha256"]) == 64
    return run


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("arch,nested,head,outputs", [
    ("vgg16", True, "gap", 4), ("resnet50", False, "flatten", 1),
])
def test_parity(tmp_path, suffix, arch, nested, head, outputs):
    model = build(arch, nested, head, outputs)
    path = tmp_path / f"model{suffix}"
    model.save(path)
    run = _check_parity(path, model, tmp_path, outputs)
    assert run.config.arch == arch and run.config.image_size == SIZE
