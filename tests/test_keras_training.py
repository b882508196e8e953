"""Training equals Keras' ``fit`` step for step: Keras' Adam, Keras' initialisers, and each of the
report's four heads trained side by side with Keras 3 (JAX backend) from the same weights on
the same batches."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from scipy import stats

from xrayjax.config import default_l2
from xrayjax.optim import keras_adam
from xrayjax.steps import build_step_model, create_train_state, head_train_step, init_variables

REPORT_HEADS = [("vgg16", "binary"), ("vgg16", "multiclass"), ("vgg19", "multiclass"), ("resnet50", "multiclass")]
IMAGE_SIZE = {"vgg16": 96, "vgg19": 96, "resnet50": 64}  # backbone outputs 3x3x512 and 2x2x2048
STEPS, BATCH, LR = 12, 8, 1e-3


def _keras_adam_run(make_tx, grads, init):
    """(Keras' weights, ours) after applying ``grads`` one step at a time."""
    variables = [keras.Variable(w) for w in init]
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(variables)
    tx = make_tx()
    params = [jnp.asarray(w) for w in init]
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        optimizer.apply(g, variables)
        updates, state = update(g, state)
        params = optax.apply_updates(params, updates)
    return [np.asarray(v.value) for v in variables], [np.asarray(p) for p in params]


def test_keras_adam_equals_keras_optimizer_for_100_steps():
    rng = np.random.default_rng(0)
    shapes = [(16, 8), (8,), (3, 3, 4, 2)]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    # gradients over six orders of magnitude: small ones are where epsilon's place shows
    grads = [[(rng.normal(size=s) * 10.0 ** rng.uniform(-6, 0)).astype(np.float32) for s in shapes]
             for _ in range(100)]

    def worst(pair):
        return max(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))) for a, b in zip(*pair))

    assert worst(_keras_adam_run(lambda: keras_adam(1e-3), grads, init)) <= 1e-6
    # optax's Adam puts epsilon elsewhere: this test can tell the two apart
    assert worst(_keras_adam_run(lambda: optax.adam(1e-3, eps=1e-7), grads, init)) > 1e-5


def _ks_same(ours: np.ndarray, theirs: np.ndarray) -> bool:
    return stats.ks_2samp(ours.ravel(), theirs.ravel()).pvalue > 1e-3


def test_initialisers_are_keras_defaults():
    """Head Dense kernels and a random backbone's convs are glorot_uniform, biases zero, and
    BatchNorm starts at gamma 1, beta 0, mean 0, variance 1, as Keras' own layers."""
    resnet = init_variables(build_step_model("resnet50", "multiclass"), 32, init="random", seed=1)
    cases = {
        "head dense 2048x512": (resnet["params"]["head"]["dense"], keras.layers.Dense(512), (2048,)),
        "head dense 512x4": (resnet["params"]["head"]["dense_1"], keras.layers.Dense(4), (512,)),
        "conv 3x3x64x64": (resnet["params"]["backbone"]["conv2_block1_2_conv"], keras.layers.Conv2D(64, 3),
                           (8, 8, 64)),
        "conv 1x1x256x64": (resnet["params"]["backbone"]["conv2_block2_1_conv"], keras.layers.Conv2D(64, 1),
                            (8, 8, 256)),
    }
    for name, (ours, layer, input_shape) in cases.items():
        layer.build((None, *input_shape))
        theirs = np.asarray(layer.kernel.value)
        kernel = np.asarray(ours["kernel"])
        assert kernel.shape == theirs.shape, name
        fan_in, fan_out = np.prod(kernel.shape[:-1]), np.prod(kernel.shape[:-2]) * kernel.shape[-1]
        limit = np.float32(np.sqrt(6 / (fan_in + fan_out)))  # as the kernel's values are rounded
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.95 * limit, name
        assert _ks_same(kernel, theirs), name
        assert not _ks_same(kernel, 2 * theirs), name  # the test tells a wrong scale apart
        assert np.array_equal(np.asarray(ours["bias"]), np.asarray(layer.bias.value)), name
    bn = keras.layers.BatchNormalization()
    bn.build((None, 4))
    ours_bn = [resnet["params"]["head"]["batch_normalization"]["scale"],
               resnet["params"]["head"]["batch_normalization"]["bias"],
               resnet["batch_stats"]["head"]["batch_normalization"]["mean"],
               resnet["batch_stats"]["head"]["batch_normalization"]["var"],
               resnet["params"]["backbone"]["conv1_bn"]["scale"], resnet["batch_stats"]["backbone"]["conv1_bn"]["var"]]
    assert [float(np.unique(np.asarray(v))[0]) for v in ours_bn] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert [float(np.unique(np.asarray(w))[0]) for w in bn.get_weights()] == [1.0, 0.0, 0.0, 1.0]


def _keras_head(arch: str, task: str, feature_shape: tuple, l2: float) -> keras.Model:
    """The report's head in Keras (dropout 0), compiled as the report compiles it."""
    reg = keras.regularizers.L2(l2) if l2 else None
    dense = lambda width, name, act: keras.layers.Dense(width, act, kernel_regularizer=reg, name=name)  # noqa: E731
    inputs = keras.Input(feature_shape)
    x = inputs
    if task == "binary":
        x = keras.layers.Dropout(0.0)(keras.layers.Flatten()(x))
        x = keras.layers.Dropout(0.0)(dense(256, "dense", "relu")(x))
        outputs = dense(1, "dense_1", "sigmoid")(x)
    else:
        if arch == "resnet50":
            x = keras.layers.BatchNormalization(name="batch_normalization")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        hidden = 1 if arch == "resnet50" else 2
        for i in range(hidden):
            x = keras.layers.Dropout(0.0)(dense(512, f"dense_{i}" if i else "dense", "relu")(x))
        outputs = dense(4, f"dense_{hidden}", "softmax")(x)
    model = keras.Model(inputs, outputs)
    loss = "binary_crossentropy" if task == "binary" else "sparse_categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.Adam(LR), loss=loss)
    return model


def _set_keras_weights(model: keras.Model, params: dict, batch_stats: dict) -> None:
    for name, layer in params.items():
        if name == "batch_normalization":
            stats_ = batch_stats[name]
            weights = [layer["scale"], layer["bias"], stats_["mean"], stats_["var"]]
        else:
            weights = [layer["kernel"], layer["bias"]]
        model.get_layer(name).set_weights([np.asarray(w) for w in weights])


@pytest.mark.parametrize(("arch", "task"), REPORT_HEADS)
def test_head_training_equals_keras_fit(arch, task):
    model = build_step_model(arch, task, dropout=0.0)
    variables = init_variables(model, IMAGE_SIZE[arch], init="random", seed=3)
    state = create_train_state(model, variables, LR)
    head_params = jax.device_get(state.params["head"])
    rng = np.random.default_rng(1)
    shape = (3, 3, 512) if arch.startswith("vgg") else (2, 2, 2048)
    classes = 2 if task == "binary" else 4
    # post-ReLU features scaled so the logits stay O(1): no saturated sigmoid or softmax, where
    # Keras clips probabilities at 1e-7 and a loss on logits does not
    features = (0.05 * np.abs(rng.normal(size=(STEPS, BATCH, *shape)))).astype(np.float32)
    labels = rng.integers(0, classes, (STEPS, BATCH)).astype(np.int32)

    reference = _keras_head(arch, task, shape, default_l2(arch, task))
    _set_keras_weights(reference, head_params, jax.device_get(state.batch_stats["head"]))
    step = jax.jit(lambda state, x, y, key: head_train_step(model, state, x, y, jnp.ones(BATCH), key))
    ours, theirs = [], []
    for s in range(STEPS):
        theirs.append(float(reference.train_on_batch(features[s], labels[s])))
        state, metrics = step(state, features[s], labels[s], jax.random.key(s))
        ours.append(float(metrics["loss_sum"]) / BATCH)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert len(set(np.round(ours, 4))) > 1  # the loss did move

    final = jax.device_get(state.params["head"])
    for name, layer in head_params.items():
        keras_weights = reference.get_layer(name).get_weights()
        keys = ("scale", "bias") if name == "batch_normalization" else ("kernel", "bias")
        for key, theirs_w in zip(keys, keras_weights):
            moved = np.max(np.abs(theirs_w - np.asarray(layer[key])))
            assert moved > 0, (name, key)
            assert np.max(np.abs(np.asarray(final[name][key]) - theirs_w)) <= 1e-3 * moved, (name, key)
    if arch == "resnet50":
        moving = reference.get_layer("batch_normalization").get_weights()[2:]
        ours_stats = jax.device_get(state.batch_stats["head"]["batch_normalization"])
        for key, theirs_s in zip(("mean", "var"), moving):
            np.testing.assert_allclose(ours_stats[key], theirs_s, rtol=1e-5, atol=1e-6)
