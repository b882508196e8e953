"""DenseNet121 equals keras.applications.DenseNet121 (include_top=False): every stage and
CheXNet's head on real X-rays, the parameter counts, Keras' "torch" preprocessing, the summary,
and Keras 2's naming of the published weight file.

One Keras model (random weights, non-trivial BatchNorm statistics) serves every test. Its
inputs are 32 px, the smallest DenseNet takes, so the tests cost compile time mostly.
"""

import functools

import h5py
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_helpers import compiled, keras_outputs, numpy_initializers, real_xrays

from xrayjax import porting
from xrayjax.models import (
    BLOCKS, count_params, create_backbone, create_head, create_model, frozen_features, num_params,
)
from xrayjax.models.__main__ import main as summary_main
from xrayjax.optim import trainable_mask
from xrayjax.porting import WeightMismatchError, merge_keras_weights
from xrayjax.preprocessing import preprocess_input

SIZE = 32
RTOL = 1e-5
STAGES = ("pool1", "conv2_block6_concat", "pool2_pool", "conv3_block12_concat", "pool3_pool",
          "conv4_block24_concat", "pool4_pool", "conv5_block16_concat", "relu")
NOTOP_PARAMS = 7_037_504  # keras.applications.DenseNet121(include_top=False).count_params()
# Keras 2 (keras-applications' densenet.py, which wrote the published file) named the stem so.
KERAS2_STEM = {"conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn", "conv1_relu": "conv1/relu"}


def _relative_error(actual, expected) -> float:
    """The worst image's max |actual - expected| over max |expected|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return max(float(np.max(np.abs(a - e)) / np.max(np.abs(e))) for a, e in zip(actual, expected))


@pytest.fixture(scope="module")
def keras_densenet(data_root):
    """The Keras model, its per-layer weights, two real X-rays (uint8) and Keras' stage outputs."""
    with numpy_initializers():
        model = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.get_weights()[0].shape
            layer.set_weights([w.astype(np.float32) for w in (
                rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c))])
    images = real_xrays(data_root, SIZE)
    x = keras.applications.densenet.preprocess_input(images.astype(np.float32))
    outputs = keras_outputs(keras.Model(model.input, [model.get_layer(n).output for n in STAGES]), x)
    weights = {layer.name: layer.get_weights() for layer in model.layers}
    return dict(model=model, weights=weights, images=images, stages=dict(zip(STAGES, outputs)))


def _template(module, shape=(1, SIZE, SIZE, 3)) -> dict:
    """Shapes and dtypes of ``module``'s variables for inputs of ``shape`` (no compute)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)


@pytest.fixture(scope="module")
def template() -> dict:
    """The backbone's variable shapes, traced once."""
    return _template(create_backbone("densenet121"))


@pytest.fixture(scope="module")
def flax_forward(keras_densenet, template):
    """Training's route to the features (:func:`frozen_features`), compiled once: variables ->
    (features, intermediates) on the X-rays preprocessed by xrayjax."""
    backbone = create_backbone("densenet121")
    x = preprocess_input(keras_densenet["images"], arch="densenet121")

    def forward(variables):
        return frozen_features(backbone, variables, x, mutable=["intermediates"])

    return compiled(forward, template)


def test_every_stage_and_chexnet_head_equal_keras(keras_densenet, flax_forward, template):
    ref = keras_densenet
    variables = merge_keras_weights(template, ref["weights"])
    features, state = flax_forward(variables)
    inter = state["intermediates"]
    assert set(inter) == set(STAGES)
    for name in STAGES:
        assert inter[name][0].shape == ref["stages"][name].shape, name
        assert _relative_error(inter[name][0], ref["stages"][name]) <= RTOL, name
    np.testing.assert_array_equal(features, inter["relu"][0])
    assert not np.allclose(ref["stages"]["relu"][0], ref["stages"]["relu"][1])  # two different X-rays
    # CheXNet's head: GAP then one Dense output per class; binary: one (sigmoid) output.
    for task, outputs in (("binary", 1), ("multiclass", 4)):
        inputs = keras.Input(ref["stages"]["relu"].shape[1:])
        pooled = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(inputs)
        head = keras.Model(inputs, keras.layers.Dense(outputs, name="dense")(pooled))
        kernel, _ = head.get_layer("dense").get_weights()
        head.get_layer("dense").set_weights([kernel, np.random.default_rng(outputs).normal(0, 0.1, outputs)])
        flax_head = create_head("densenet121", task)
        head_vars = merge_keras_weights(_template(flax_head, (1, 1, 1, 1024)),
                                        {layer.name: layer.get_weights() for layer in head.layers})
        # the same input as Keras' head: the stages above bound the backbone's error, and a small
        # logit would magnify it (one run: 2.8e-7 absolute on a 0.024 logit, 1.2e-5 relative)
        logits = flax_head.apply(head_vars, ref["stages"]["relu"], train=False)
        want = np.asarray(head(ref["stages"]["relu"]))
        assert logits.shape == want.shape == (2, outputs)
        assert _relative_error(logits, want) <= RTOL, task
    # --bf16 computes every stage in bfloat16 and returns float32 (traced only: compiling it
    # takes 14 s on this CPU; the shared layers' bf16 rounding is measured on ResNet50).
    bf16 = create_backbone("densenet121", dtype=jnp.bfloat16)
    out16, state16 = jax.eval_shape(
        lambda v, x: frozen_features(bf16, v, x, mutable=["intermediates"]), variables, ref["images"] * 1.0)
    assert out16.dtype == jnp.float32 and out16.shape == features.shape
    assert {v[0].dtype for v in state16["intermediates"].values()} == {jnp.dtype(jnp.bfloat16)}


def test_parameter_counts_and_summary(template, capsys):
    assert count_params(template) == {"total": NOTOP_PARAMS, "trainable": 0, "non_trainable": NOTOP_PARAMS}
    assert num_params(_template(create_head("densenet121", "multiclass"), (1, 1, 1, 1024))) == 4 * 1024 + 4
    summary_main(["densenet121", "binary", "--image-size", str(SIZE), "--expand"])
    out = capsys.readouterr().out
    for line in ("densenet121 (Functional)", "(None, 1, 1, 1024)", f"{NOTOP_PARAMS:,}",
                 "global_average_pooling2d (GlobalAveragePooling2D)", "dense (Dense)",
                 f"Total params: {NOTOP_PARAMS + 1025:,}", "Trainable params: 1,025"):
        assert line in out, line
    assert "dropout" not in out and "dense_1" not in out
    assert out.count("(Conv2D)") == 120 and out.count("(BatchNormalization)") == 121
    assert out.count("(Concatenate)") == 58 and out.count("(AveragePooling2D)") == 3
    assert "pool4_pool (AveragePooling2D)" in out and "relu (Activation)" in out



def test_fine_tune_blocks_follow_the_forward_order(keras_densenet):
    blocks = BLOCKS["densenet121"]
    assert blocks == ("conv1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "conv5", "bn")
    owners = [[b for b in blocks if layer.name == b or layer.name.startswith(b + "_")]
              for layer in keras_densenet["model"].layers if layer.get_weights()]
    assert all(len(o) == 1 for o in owners)
    order = [blocks.index(o[0]) for o in owners]  # Keras lists layers in forward order
    assert order == sorted(order) and set(order) == set(range(len(blocks)))
    mask = trainable_mask({"backbone": {n: {"kernel": 0} for n in ("pool4_conv", "conv5_block1_1_conv", "bn")},
                           "head": {"dense": {"kernel": 0}}}, "densenet121", 2)
    assert mask == {"backbone": {"pool4_conv": {"kernel": False}, "conv5_block1_1_conv": {"kernel": True},
                                 "bn": {"kernel": True}}, "head": {"dense": {"kernel": True}}}


def test_preprocessing_is_the_backbones_own():
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    float32 = rng.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    for x in (uint8, float32):
        expected = keras.applications.densenet.preprocess_input(x.astype(np.float32))
        for got in (jax.jit(functools.partial(preprocess_input, arch="densenet121"))(x),
                    preprocess_input(x, mode="torch")):  # XLA may round a fused program 1 ulp apart
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(preprocess_input(x), keras.applications.vgg16.preprocess_input(x.astype(np.float32)))
    assert create_backbone("densenet121").preprocessing == "torch"
    assert create_model("densenet121", "binary").backbone.preprocessing == "torch"
    assert {create_backbone(a).preprocessing for a in ("vgg16", "vgg19", "resnet50")} == {"caffe"}
    assert create_backbone("vgg16", preprocessing="torch").preprocessing == "torch"
    with pytest.raises(ValueError, match="unknown arch 'resnet18'; valid archs: vgg16, vgg19, resnet50, densenet121"):
        preprocess_input(uint8, arch="resnet18")
    with pytest.raises(ValueError, match="unknown preprocessing mode 'tf'; valid modes: caffe, torch"):
        preprocess_input(uint8, mode="tf")
    with pytest.raises(ValueError, match="unknown preprocessing mode 'tf'"):
        create_backbone("densenet121", preprocessing="tf")


def _rename_stem_as_keras2(path) -> None:
    """Rename the stem to Keras 2's spelling: layer ``conv1/conv`` (nested groups in HDF5) holding
    ``conv1/conv/kernel:0``, as in the published file."""
    with h5py.File(path, "r+") as f:
        f.require_group("conv1")
        for new3, old2 in KERAS2_STEM.items():
            f.move(new3, old2)
            group = f[old2]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
            renamed = [f"{old2}/{n.rsplit('/', 1)[-1]}:0" for n in names]
            for old, new in zip(names, renamed):
                group.move(old, new)
            group.attrs["weight_names"] = np.array([n.encode() for n in renamed])
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        f.attrs["layer_names"] = np.array([KERAS2_STEM.get(n, n).encode() for n in names])


def test_published_naming_ports_and_equals_keras(keras_densenet, flax_forward, tmp_path):
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    keras3 = tmp_path / "keras3.h5"
    with h5py.File(keras3, "w") as f:
        save_weights_to_hdf5_group(f, keras_densenet["model"])
    published = tmp_path / porting.PUBLISHED["densenet121"].file_name
    published.write_bytes(keras3.read_bytes())
    _rename_stem_as_keras2(published)
    with h5py.File(published) as f:  # the renaming really happened
        assert "conv1/conv/conv1/conv/kernel:0" in f and "conv1_conv" not in f
        assert "conv1/bn" in [n.decode() for n in f.attrs["layer_names"]]
    variables = porting.port_keras_weights("densenet121", published)
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == NOTOP_PARAMS
    gamma, beta, mean, var = keras_densenet["weights"]["conv1_bn"]
    np.testing.assert_array_equal(variables["params"]["conv1_bn"]["scale"], gamma)
    np.testing.assert_array_equal(variables["batch_stats"]["conv1_bn"]["var"], var)
    features, _ = flax_forward(variables)
    assert _relative_error(features, keras_densenet["stages"]["relu"]) <= RTOL
    same = porting.port_keras_weights("densenet121", keras3)  # Keras 3's spelling reads the same
    assert jax.tree.all(jax.tree.map(np.array_equal, same, variables))
    # Strict merge: another arch's file, and this file read as another arch.
    with pytest.raises(WeightMismatchError, match="rerun with --arch densenet121") as info:
        porting.port_keras_weights("resnet50", published)
    assert "params/conv1_conv/bias (64,)" in info.value.missing
    with h5py.File(published, "r+") as f:
        del f["conv5_block16_2_conv"]
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if n != b"conv5_block16_2_conv"]
    with pytest.raises(WeightMismatchError, match="truncated or partial file") as info:
        porting.port_keras_weights("densenet121", published)
    assert info.value.missing == ["params/conv5_block16_2_conv/kernel (3, 3, 128, 32)"]
