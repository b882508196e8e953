"""The Flax models equal Keras layer for layer; counts, preprocessing, summary and API.

Parity follows n2cholas/jax-resnet: random Keras weights (with non-trivial BatchNorm
statistics) are copied into Flax with the porting merge, and every stage's output is
compared, on a random image and a real chest X-ray.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from PIL import Image

from keras_helpers import keras_outputs, numpy_initializers
from xrayjax.models import (
    ARCHS,
    BLOCKS,
    count_params,
    create_backbone,
    create_head,
    create_model,
    fold_batchnorm,
)
from xrayjax.models.__main__ import main
from xrayjax.data import Split
from xrayjax.inference import backbone_features, infer
from xrayjax.porting import merge_keras_weights
from xrayjax.preprocessing import MODES, preprocess_input

RTOL = 1e-5
STAGES = {
    "vgg16": tuple(f"block{i}_pool" for i in range(1, 6)),
    "vgg19": tuple(f"block{i}_pool" for i in range(1, 6)),
    "resnet50": ("pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
                 "conv5_block3_out"),
}
KERAS_APPS = {
    "vgg16": keras.applications.VGG16,
    "vgg19": keras.applications.VGG19,
    "resnet50": keras.applications.ResNet50,
}
# The report's models: (arch, task) -> (total, trainable, non-trainable).
REPORT_COUNTS = {
    ("vgg16", "binary"): (21_137_729, 6_423_041, 14_714_688),
    ("vgg16", "multiclass"): (15_242_052, 527_364, 14_714_688),
    ("vgg19", "multiclass"): (20_551_748, 527_364, 20_024_384),
    ("resnet50", "multiclass"): (24_647_044, 1_055_236, 23_591_808),
}


def rel_err(actual, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def rel_err_per_image(actual, expected) -> float:
    """The worst image's relative error: the X-ray is not hidden behind the noise image."""
    return max(rel_err(a, e) for a, e in zip(np.asarray(actual), expected))


def keras_head(arch: str, task: str, features):
    """The report's head in Keras, layers named as Keras auto-names them in a fresh session.
    The last Dense is linear: Flax returns logits (sigmoid/softmax live in the loss)."""
    layers = keras.layers
    x = features
    if task == "binary":
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dropout(0.5, name="dropout")(x)
        x = layers.Dense(256, activation="relu", name="dense")(x)
        embedding = layers.Dropout(0.5, name="dropout_1")(x)
        return embedding, layers.Dense(1, name="dense_1")(embedding)
    if arch == "resnet50":
        x = layers.BatchNormalization(name="batch_normalization")(x)
        x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
        x = layers.Dense(512, activation="relu", name="dense")(x)
        embedding = layers.Dropout(0.5, name="dropout")(x)
        return embedding, layers.Dense(4, name="dense_1")(embedding)
    x = layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    x = layers.Dense(512, activation="relu", name="dense_1")(x)
    embedding = layers.Dropout(0.5, name="dropout_1")(x)
    return embedding, layers.Dense(4, name="dense_2")(embedding)


def randomize(model, rng: np.random.Generator) -> None:
    """Keep the random kernels; make biases and every BatchNorm weight non-trivial."""
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            c = weights[0].shape
            weights = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.5, c),
                       rng.uniform(0.5, 2.0, c)]
        elif len(weights) == 2:
            weights[1] = rng.normal(0, 0.05, weights[1].shape)
        layer.set_weights([w.astype(np.float32) for w in weights])


@pytest.fixture(scope="module")
def images(data_root) -> np.ndarray:
    """A random image and a real chest X-ray, preprocessed: float32 (2, 224, 224, 3)."""
    xray = sorted((data_root / "all" / "test" / "covid").glob("*.jp*g"))[0]
    real = np.asarray(Image.open(xray).convert("RGB").resize((224, 224), Image.BILINEAR))
    noise = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return np.asarray(preprocess_input(np.stack([noise, real])))


@pytest.fixture(scope="module")
def keras_reference(images):
    """Keras outputs (stages, embedding, logits) and per-layer weights of a report model.

    Each Keras backbone is built and run once; each head runs on its cached features."""
    backbones: dict = {}
    models: dict = {}

    def get(arch: str, task: str) -> dict:
        if arch not in backbones:
            with numpy_initializers():
                base = KERAS_APPS[arch](include_top=False, weights=None, input_shape=(224, 224, 3))
            randomize(base, np.random.default_rng(1))
            stages = keras.Model(base.input, [base.get_layer(n).output for n in STAGES[arch]])
            outputs = keras_outputs(stages, images)
            backbones[arch] = (base, dict(zip(STAGES[arch], outputs)))
        if (arch, task) not in models:
            base, stages = backbones[arch]
            features = keras.Input(base.output.shape[1:])
            with numpy_initializers():
                head = keras.Model(features, keras_head(arch, task, features))
            randomize(head, np.random.default_rng(2))
            embedding, logits = keras_outputs(head, stages[STAGES[arch][-1]])
            weights = {layer.name: layer.get_weights() for layer in [*base.layers, *head.layers]}
            models[arch, task] = {"weights": weights, "stages": stages, "embedding": embedding,
                                  "logits": logits}
        return models[arch, task]

    return get


def template(module, shape=(1, 224, 224, 3)) -> dict:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)


@pytest.mark.parametrize("arch,task", list(REPORT_COUNTS))
def test_parity_with_keras_every_stage(arch, task, images, keras_reference):
    ref = keras_reference(arch, task)
    model = create_model(arch, task)
    variables = merge_keras_weights(template(model), ref["weights"])
    apply = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
    logits, state = apply(variables, images)
    inter = state["intermediates"]
    assert set(inter["backbone"]) == set(STAGES[arch])
    for name in STAGES[arch]:
        assert rel_err_per_image(inter["backbone"][name][0], ref["stages"][name]) <= RTOL, name
    assert rel_err_per_image(inter["head"]["embedding"][0], ref["embedding"]) <= RTOL
    assert logits.dtype == jnp.float32 and logits.shape == ref["logits"].shape
    assert rel_err_per_image(logits, ref["logits"]) <= RTOL
    # The two inputs differ, so the check is not on a constant output.
    assert not np.allclose(ref["logits"][0], ref["logits"][1])


def test_folded_batchnorm_equals_keras(images, keras_reference):
    """The steps' backbone (BatchNorm folded into the convs) still equals Keras."""
    ref = keras_reference("resnet50", "multiclass")
    full = merge_keras_weights(template(create_model("resnet50", "multiclass")), ref["weights"])
    variables = {col: full[col]["backbone"] for col in ("params", "batch_stats")}
    folded = fold_batchnorm(variables)
    assert not any(name.endswith("_bn") for name in folded["params"])
    assert not np.allclose(folded["params"]["conv1_conv"]["kernel"], variables["params"]["conv1_conv"]["kernel"])
    out = jax.jit(create_backbone("resnet50", fold_bn=True).apply)(folded, images)
    assert rel_err_per_image(out, ref["stages"]["conv5_block3_out"]) <= RTOL
    with pytest.raises(ValueError, match="inference mode only"):
        create_backbone("resnet50", fold_bn=True).apply(folded, images[:1], train=True)


def test_keras_init_fills_the_models_own_template_with_keras_initial_values(caplog):
    """keras_init gives init's tree (names, shapes, dtypes) with Keras' initial values: kernels
    glorot_uniform (Keras' own fans; a third of the squared limit as variance), biases, beta and
    mean zero, gamma and variance one; the same draws for a seed, others for another; numpy
    arrays, nothing compiled. The random init's streams are not the data's."""
    from keras.src.initializers.random_initializers import compute_fans

    from xrayjax.models import keras_init
    from xrayjax.steps import build_step_model, init_variables

    model, step_model = create_model("resnet50", "multiclass"), build_step_model("densenet121", "multiclass")
    caplog.set_level("WARNING", logger="jax")
    with jax.log_compiles(True):
        values = keras_init(model, (1, 32, 32, 3), seed=4)
        started = init_variables(step_model, 32, init="random", seed=0)
    assert not [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(started))  # not a cached jitted init
    shapes = template(model, (1, 32, 32, 3))
    assert jax.tree.structure(values) == jax.tree.structure(shapes)
    kernels = 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(values), jax.tree.leaves(shapes), strict=True):
        assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype
        name = path[-1].key
        if name == "kernel":
            kernels += 1
            limit = np.float32(np.sqrt(6 / sum(compute_fans(got.shape))))
            assert np.abs(got).max() <= limit and got.std() == pytest.approx(limit / np.sqrt(3), rel=0.1)
        else:
            np.testing.assert_array_equal(got, 1.0 if name in ("scale", "var") else 0.0)
    assert kernels == 53 + 2  # ResNet50's convs, the head's two Dense layers

    def kernel(params):  # the first layer's kernel, by name
        return next(layer["kernel"] for _, layer in sorted(params.items()) if "kernel" in layer)

    again, other = keras_init(model, (1, 32, 32, 3), seed=4), keras_init(model, (1, 32, 32, 3), seed=5)
    np.testing.assert_array_equal(kernel(again["params"]["backbone"]), kernel(values["params"]["backbone"]))
    assert not np.allclose(kernel(other["params"]["backbone"]), kernel(values["params"]["backbone"]))
    for part, module, shape in (("backbone", create_backbone("densenet121"), (1, 32, 32, 3)),
                                ("head", step_model.head, (1, 1, 1, 1024))):
        ours = kernel(started["params"][part])
        for seed in (0, (0, 0), (0, 1)):  # seed 0's streams of the splits, and of epochs 0 and 1's order
            assert not np.allclose(ours, kernel(keras_init(module, shape, seed)["params"])), (part, seed)
    with pytest.raises(ValueError, match=r"keras_init: no Keras initial value for \['params'\]\['negative_slope'\]"):
        keras_init(nn.PReLU(), (1, 2))


@pytest.mark.parametrize("arch,task", list(REPORT_COUNTS))
def test_parameter_counts_match_report(arch, task):
    counts = count_params(template(create_model(arch, task)))
    assert (counts["total"], counts["trainable"], counts["non_trainable"]) == REPORT_COUNTS[arch, task]


def test_backbone_counts_match_keras_notop():
    # keras.applications.<Model>(include_top=False).count_params()
    expected = {"vgg16": 14_714_688, "vgg19": 20_024_384, "resnet50": 23_587_712}
    for arch, n in expected.items():
        assert count_params(template(create_backbone(arch))) == {
            "total": n, "trainable": 0, "non_trainable": n}


def test_preprocess_input_equals_keras_uint8_and_float():
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    float32 = rng.uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    keras_pre = keras.applications.vgg16.preprocess_input
    for x in (uint8, float32):
        expected = keras_pre(x.copy())  # Keras edits float input in place
        got = jax.jit(preprocess_input)(x)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(
        keras.applications.resnet50.preprocess_input(float32.copy()), preprocess_input(float32))
    # Single image (3 dims) and float64 input still give float32 caffe-mode values.
    np.testing.assert_allclose(preprocess_input(uint8[0].astype(np.float64)),
                               keras_pre(uint8[0].astype(np.float64)), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="3 channels last"):
        preprocess_input(np.zeros((1, 3, 8, 8)))
    gray = uint8[..., :1]  # batches of gray records cross to the device with one channel
    for mode in MODES:
        np.testing.assert_array_equal(preprocess_input(gray, mode=mode),
                                      preprocess_input(np.repeat(gray, 3, -1), mode=mode))


def random_variables(shapes, rng: np.random.Generator) -> dict:
    """Random float32 variables for a template (numpy: much cheaper than a jitted init),
    scaled to keep activations finite, with non-trivial BatchNorm statistics."""

    def draw(path, leaf):
        kind, shape = path[-1].key, leaf.shape
        if kind == "kernel":
            value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif kind in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:  # bias, mean
            value = rng.normal(0, 0.1, shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize("size,kernel,stride,padding", [(2, 3, 1, (1, 1)), (1, 3, 1, (1, 1)), (2, 3, 2, (1, 1)),
                                                      (3, 7, 2, (3, 3)), (2, 3, 1, (2, 0)), (2, 3, 2, (0, 2))])
def test_a_conv_on_an_input_smaller_than_its_kernel_equals_lax(size, kernel, stride, padding):
    """conv2d's matmul of windows (inputs smaller than the kernel, where XLA:CPU is slow) gives
    lax's convolution and its gradients."""
    from xrayjax.models.layers import _conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, size, size + 1, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 4)), jnp.float32)
    pads, dn = [padding, padding[::-1]], ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        y = conv(x, w, (stride, stride), pads, dimension_numbers=dn)
        return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size), y

    (_, ours), grads = jax.jit(jax.value_and_grad(functools.partial(loss, _conv), (0, 1), has_aux=True))(x, w)
    (_, theirs), expected = jax.jit(jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated),
                                                       (0, 1), has_aux=True))(x, w)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(functools.partial(loss, _conv))(x, w))  # the matmul
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    for got, want in zip(grads, expected):
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


SMALL = (2, 32, 32, 3)  # enough for five stride-2 stages; keeps compiles and runs cheap


@pytest.fixture(scope="module")
def small_models():
    """Per (arch, task): model, random float32 variables, a small input, and the full
    model's float32 logits and intermediates on it (computed once, shared by tests)."""
    cache: dict = {}

    def get(arch: str, task: str) -> dict:
        if (arch, task) not in cache:
            model = create_model(arch, task)
            x = jnp.asarray(np.random.default_rng(1).normal(0, 50, SMALL), jnp.float32)
            variables = random_variables(template(model, SMALL), np.random.default_rng(0))
            apply = functools.partial(model.apply, train=False, mutable=["intermediates"])
            logits, state = jax.jit(apply)(variables, x)
            cache[arch, task] = dict(model=model, x=x, variables=variables, logits=logits,
                                     intermediates=state["intermediates"])
        return cache[arch, task]

    return get


@pytest.mark.parametrize("arch,task", [("resnet50", "multiclass"), ("vgg16", "binary")])
def test_sub_variables_work_alone(arch, task, small_models):
    m = small_models(arch, task)
    features = m["intermediates"]["backbone"][STAGES[arch][-1]][0]

    def sub(name):
        return {c: v[name] for c, v in m["variables"].items() if name in v}

    alone = jax.jit(create_backbone(arch).apply)(sub("backbone"), m["x"])
    assert alone.shape == features.shape and alone.dtype == jnp.float32
    assert rel_err(alone, features) <= RTOL  # the model folds its BatchNorms: rounding apart
    head_alone = jax.jit(create_head(arch, task).apply, static_argnums=2)(sub("head"), features, False)
    assert rel_err(head_alone, m["logits"]) <= 1e-6


@pytest.mark.parametrize("arch,task", [("vgg16", "binary"), ("resnet50", "multiclass")])
def test_classifier_logits_equal_the_inference_route_bit_for_bit(arch, task):
    # create_model(...).apply (the README's example) folds the BatchNorms as training and
    # evaluation do, so its logits are theirs exactly, not to rounding.
    model = create_model(arch, task)
    variables = random_variables(template(model, SMALL), np.random.default_rng(0))
    images = np.random.default_rng(1).integers(0, 256, SMALL, dtype=np.uint8)
    logits = jax.jit(functools.partial(model.apply, train=False))(variables, preprocess_input(images))
    head = jax.jit(create_head(arch, task).apply, static_argnums=2)
    head_vars = {c: v["head"] for c, v in variables.items() if "head" in v}
    np.testing.assert_array_equal(logits, head(head_vars, backbone_features(model, variables, images), False))
    inferred, _ = infer(model, variables, Split(images, np.zeros(len(images), np.int32), ("a", "b")), len(images))
    np.testing.assert_array_equal(logits, inferred)
    assert not np.allclose(logits[0], logits[1])


def test_train_mode_freezes_backbone_and_trains_head(small_models):
    m = small_models("resnet50", "multiclass")
    variables = m["variables"]

    @jax.jit
    def run(key):
        return m["model"].apply(variables, m["x"], train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})

    out_a, state = run(jax.random.key(2))
    out_b, _ = run(jax.random.key(3))
    assert not np.allclose(out_a, out_b)  # dropout is on in training
    stats = state["batch_stats"]
    assert jax.tree.all(jax.tree.map(np.array_equal, stats["backbone"],
                                     variables["batch_stats"]["backbone"]))
    assert not np.allclose(stats["head"]["batch_normalization"]["mean"],
                           variables["batch_stats"]["head"]["batch_normalization"]["mean"])


@pytest.mark.parametrize("arch", ("vgg16", "vgg19", "resnet50"))  # densenet121: tests/test_densenet.py
def test_bfloat16_compute_is_close_to_float32(arch, small_models):
    m = small_models(arch, "multiclass")
    model16 = create_model(arch, "multiclass", dtype=jnp.bfloat16)
    shapes = jax.eval_shape(functools.partial(model16.init, train=False), jax.random.key(0), m["x"])
    assert jax.tree.map(lambda v: v.dtype, shapes) == jax.tree.map(lambda v: v.dtype, m["variables"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    apply16 = functools.partial(model16.apply, train=False, mutable=["intermediates"])
    out16, state = jax.jit(apply16)(m["variables"], m["x"])
    assert out16.dtype == jnp.float32
    assert state["intermediates"]["backbone"][STAGES[arch][-1]][0].dtype == jnp.bfloat16
    assert rel_err(out16, m["logits"]) <= 5e-2
    assert rel_err(out16, m["logits"]) > 0  # it really computed in bfloat16


def test_blocks_partition_backbone_layers():
    for arch in ARCHS:
        layers = list(template(create_backbone(arch))["params"])
        owners = [[b for b in BLOCKS[arch] if layer == b or layer.startswith(b + "_")] for layer in layers]
        assert all(len(o) == 1 for o in owners), arch
        if arch != "densenet121":  # its names do not sort in forward order: tests/test_densenet.py
            assert [o[0] for o in owners] == sorted((o[0] for o in owners), key=BLOCKS[arch].index)
        assert {o[0] for o in owners} == set(BLOCKS[arch])
    assert len(BLOCKS["resnet50"]) == 17 and BLOCKS["vgg19"][-1] == "block5"


def test_unknown_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'resnet18'; valid archs: vgg16, vgg19, resnet50, densenet121$"):
        create_backbone("resnet18")
    with pytest.raises(ValueError, match="unknown task 'three_class'; valid tasks: binary, multiclass, multilabel"):
        create_model("vgg16", "three_class")
    with pytest.raises(ValueError, match="dropout"):
        create_head("vgg16", "binary", dropout=1.0)


def test_summary_cli(capsys):
    main(["vgg19", "multiclass"])
    out = capsys.readouterr().out
    for line in ("vgg19 (Functional)", "(None, 7, 7, 512)", "20,024,384", "dense_2 (Dense)",
                 "Total params: 20,551,748", "Trainable params: 527,364",
                 "Non-trainable params: 20,024,384"):
        assert line in out, line
    assert "block1_conv1" not in out
    main(["resnet50", "multiclass", "--expand"])
    out = capsys.readouterr().out
    assert "conv5_block3_out (Activation)" in out and "batch_normalization (BatchNormalization)" in out
    assert out.count("(Conv2D)") == 53
    main(["vgg16", "multilabel", "--classes", "14", "--image-size", "32"])  # ChestX-ray14's labels
    out = capsys.readouterr().out
    assert "dense_2 (Dense)" in out and "(None, 14)" in out and "7,182" in out  # 512 * 14 + 14
    for argv in (["resnet18", "binary"], ["vgg16", "binary", "--classes", "3"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "use multiclass" in capsys.readouterr().err
