"""Porting Keras' legacy-HDF5 weights into Flax: strict merge, file layouts, parity, errors, CLI.

The Keras files are written at test time by Keras 3 itself (random weights, non-trivial
BatchNorm statistics), then copied with the dataset names of every published Keras version.
"""

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from xrayjax import porting
from xrayjax.porting import WeightFileError, WeightMismatchError, merge_keras_weights

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("vgg16", "vgg19", "resnet50")
NOTOP_PARAMS = {"vgg16": 14_714_688, "vgg19": 20_024_384, "resnet50": 23_587_712}


def _load_script():
    spec = importlib.util.spec_from_file_location("weights_port", REPO / "weights" / "port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


port_script = _load_script()


# ---------------------------------------------------------------- merge on a small template


class _Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="conv1_conv")(x)
        return nn.BatchNorm(use_running_average=True, name="conv1_bn")(x)


class _Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="dense")(_Backbone(name="backbone")(x))


@pytest.fixture
def toy():
    template = jax.eval_shape(_Classifier().init, jax.random.key(0), jnp.zeros((1, 5, 5, 2)))
    rng = np.random.default_rng(0)
    weights = {
        "input_layer": [],
        "conv1_conv": [rng.normal(size=(3, 3, 2, 4)), rng.normal(size=4)],
        "conv1_bn": [rng.normal(size=4) for _ in range(4)],
        "conv1_relu": [],
        "dense": [rng.normal(size=(4, 3)), rng.normal(size=3)],
    }
    return template, weights


def test_merge_fills_nested_template_in_keras_order(toy):
    template, weights = toy
    variables = merge_keras_weights(template, weights)
    bn_params = variables["params"]["backbone"]["conv1_bn"]
    bn_stats = variables["batch_stats"]["backbone"]["conv1_bn"]
    gamma, beta, mean, var = weights["conv1_bn"]
    pairs = ((bn_params["scale"], gamma), (bn_params["bias"], beta), (bn_stats["mean"], mean))
    for got, want in (*pairs, (bn_stats["var"], var)):
        np.testing.assert_array_equal(got, want.astype(np.float32))
    dense = variables["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(dense, weights["dense"][0].astype(np.float32))
    assert jax.tree.structure(variables) == jax.tree.structure(template)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert _Classifier().apply(variables, jnp.ones((1, 5, 5, 2))).shape == (1, 5, 5, 3)


def test_merge_lists_every_problem(toy):
    template, weights = toy
    weights = dict(weights)
    del weights["dense"]
    weights["conv1_conv"] = [np.zeros((3, 3, 2, 8)), np.zeros(8)]
    weights["conv1_bn"] = weights["conv1_bn"] + [np.zeros(4)]
    weights["fc1"] = [np.zeros((4, 2)), np.zeros(2)]
    with pytest.raises(WeightMismatchError) as info:
        merge_keras_weights(template, weights, source="toy.h5")
    e = info.value
    assert e.missing == ["params/dense/kernel (4, 3)", "params/dense/bias (3,)"]
    assert e.unexpected == ["conv1_bn[4] (4,)", "fc1 (2 weights: (4, 2), (2,))"]
    assert e.mismatched == [
        ("params/backbone/conv1_conv/kernel", (3, 3, 2, 4), (3, 3, 2, 8)),
        ("params/backbone/conv1_conv/bias", (4,), (8,)),
    ]
    message = str(e)
    assert "toy.h5" in message and "2 missing, 2 unexpected, 2 shape-mismatched" in message
    assert "include_top=True" in message and "another --arch" in message
    for line in e.missing + e.unexpected:
        assert line in message


def test_merge_hints_a_partial_file(toy):
    template, weights = toy
    del weights["conv1_bn"]
    with pytest.raises(WeightMismatchError, match="truncated or partial file") as info:
        merge_keras_weights(template, weights)
    assert len(info.value.missing) == 4 and not info.value.unexpected


# ---------------------------------------------------------------- Keras-written files


@dataclass
class KerasFile:
    arch: str
    h5: Path
    weights: dict[str, list[np.ndarray]]  # Keras layer.get_weights() of the layers with weights
    output: np.ndarray  # the Keras backbone on the real X-ray


def _keras_model(arch: str, include_top: bool = False, seed: int = 0):
    """A Keras application with random weights: random biases and BatchNorm statistics too."""
    import keras

    from keras_helpers import numpy_initializers

    apps = keras.applications
    cls = {"vgg16": apps.VGG16, "vgg19": apps.VGG19, "resnet50": apps.ResNet50}[arch]
    with numpy_initializers():
        model = cls(include_top=include_top, weights=None, input_shape=(224, 224, 3))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            n = values[0].shape
            gamma, beta = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n)
            values = [gamma, beta, rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n)]
        elif values:
            values = [values[0], rng.normal(0, 0.1, values[1].shape)]
        layer.set_weights([np.asarray(v, np.float32) for v in values])
    return model


def _save_legacy_h5(model, path: Path) -> Path:
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)
    return path


@pytest.fixture(scope="session")
def xray(data_root) -> np.ndarray:
    """One real chest X-ray, RGB 224x224, through xrayjax.preprocess_input: (1, 224, 224, 3)."""
    from xrayjax.preprocessing import preprocess_input

    path = sorted((data_root / "all" / "test" / "covid").glob("*.jpeg"))[0]
    image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
    return np.asarray(preprocess_input(np.asarray(image)[None]))


@pytest.fixture(scope="session")
def keras_files(tmp_path_factory, xray):
    """``keras_files(arch)``: a Keras-written legacy h5 of ``arch``, built once per session."""
    cache: dict[str, KerasFile] = {}

    def get(arch: str) -> KerasFile:
        from keras_helpers import keras_outputs

        if arch not in cache:
            model = _keras_model(arch)
            h5 = _save_legacy_h5(model, tmp_path_factory.mktemp(arch) / f"{arch}.h5")
            weights = {layer.name: layer.get_weights() for layer in model.layers if layer.get_weights()}
            cache[arch] = KerasFile(arch, h5, weights, keras_outputs(model, xray))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def include_top_h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("top") / "r50_top.h5"
    return _save_legacy_h5(_keras_model("resnet50", include_top=True), path)


# Dataset names as each Keras version wrote them: (conv/dense names, BatchNorm names, format).
STYLES = {
    "keras1": (("W", "b"), ("gamma", "beta", "running_mean", "running_std"), "{layer}_{w}_1:0"),
    "keras2": (("kernel", "bias"), ("gamma", "beta", "moving_mean", "moving_variance"), "{layer}/{w}:0"),
    "keras3": (("kernel", "bias"), ("gamma", "beta", "moving_mean", "moving_variance"), "{layer}/{w}"),
}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _restyle(src: Path, dst: Path, style: str) -> Path:
    """Copy ``src`` with every dataset renamed to ``style`` (weight_names updated)."""
    conv, bn, fmt = STYLES[style]
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for layer in map(_text, f.attrs["layer_names"]):
            group = f[layer]
            old = [_text(n) for n in group.attrs["weight_names"]]
            new = [fmt.format(layer=layer, w=w) for w in (conv if len(old) == 2 else bn)[: len(old)]]
            for i, name in enumerate(old):
                group.move(name, f"tmp{i}")
            for i, name in enumerate(new):
                group.move(f"tmp{i}", name)
            group.attrs["weight_names"] = np.array([n.encode() for n in new])  # fixed-length bytes
    return dst


def _chunk_attributes(src: Path, dst: Path) -> Path:
    """Copy ``src`` with chunked ``layer_names0/1`` (bytes) and ``weight_names0/1`` (str)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        names = [_text(n) for n in f.attrs["layer_names"]]
        del f.attrs["layer_names"]
        half = len(names) // 2
        f.attrs["layer_names0"] = np.array([n.encode() for n in names[:half]])
        f.attrs["layer_names1"] = np.array([n.encode() for n in names[half:]])
        for layer in names:
            group = f[layer]
            weight_names = [_text(n) for n in group.attrs["weight_names"]]
            if len(weight_names) > 1:
                del group.attrs["weight_names"]
                group.attrs["weight_names0"] = weight_names[:1]
                group.attrs["weight_names1"] = weight_names[1:]
    return dst


LAYOUTS = (*STYLES, "chunked")


@pytest.fixture(scope="session")
def layout_files(tmp_path_factory):
    """``layout_files(keras_file)``: copies of its h5 in every layout, made once per session."""
    cache: dict[str, dict[str, Path]] = {}

    def get(keras_file: KerasFile) -> dict[str, Path]:
        if keras_file.arch not in cache:
            folder = tmp_path_factory.mktemp(f"{keras_file.arch}_layouts")
            files = {s: _restyle(keras_file.h5, folder / f"{s}.h5", s) for s in STYLES}
            files["chunked"] = _chunk_attributes(files["keras1"], folder / "chunked.h5")
            cache[keras_file.arch] = files
        return cache[keras_file.arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_reads_every_published_layout(arch, keras_files, layout_files):
    keras_file = keras_files(arch)
    files = layout_files(keras_file)
    first = next(iter(keras_file.weights))
    with h5py.File(files["keras1"]) as f:  # the renaming really happened
        assert _text(f[first].attrs["weight_names"][0]) == f"{first}_W_1:0"
    for layout in LAYOUTS:
        read = porting.read_keras_h5(files[layout])
        with_weights = {name: values for name, values in read.items() if values}
        assert list(with_weights) == list(keras_file.weights), layout
        for name, values in keras_file.weights.items():
            assert len(with_weights[name]) == len(values)
            for got, want in zip(with_weights[name], values):
                np.testing.assert_array_equal(got, want, err_msg=f"{layout} {name}")


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("arch", ARCHS)
def test_ported_backbone_equals_keras_on_a_real_xray(arch, keras_files, layout_files, xray):
    from xrayjax.models import create_backbone

    keras_file = keras_files(arch)

    variables = porting.port_keras_weights(keras_file.arch, keras_file.h5)
    assert sorted(variables) == (["batch_stats", "params"] if keras_file.arch == "resnet50" else ["params"])
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == NOTOP_PARAMS[keras_file.arch]
    if keras_file.arch == "resnet50":
        gamma, beta, mean, var = keras_file.weights["conv4_block2_2_bn"]
        np.testing.assert_array_equal(variables["batch_stats"]["conv4_block2_2_bn"]["var"], var)
        np.testing.assert_array_equal(variables["params"]["conv4_block2_2_bn"]["scale"], gamma)
    out = np.asarray(create_backbone(keras_file.arch).apply(variables, xray))
    want = keras_file.output
    assert out.shape == want.shape == (1, 7, 7, 512 if keras_file.arch != "resnet50" else 2048)
    assert _relative_error(out, want) <= 1e-5
    for layout, path in layout_files(keras_file).items():
        other = porting.port_keras_weights(keras_file.arch, path)
        assert jax.tree.all(jax.tree.map(np.array_equal, other, variables)), layout


# ---------------------------------------------------------------- errors


@pytest.fixture(scope="session")
def vgg16_file(keras_files) -> Path:
    return keras_files("vgg16").h5


def test_wrong_arch_is_named(vgg16_file):
    with pytest.raises(WeightMismatchError) as info:
        porting.port_keras_weights("vgg19", vgg16_file)
    message = str(info.value)
    assert info.value.missing == [
        "params/block3_conv4/kernel (3, 3, 256, 256)",
        "params/block3_conv4/bias (256,)",
        "params/block4_conv4/kernel (3, 3, 512, 512)",
        "params/block4_conv4/bias (512,)",
        "params/block5_conv4/kernel (3, 3, 512, 512)",
        "params/block5_conv4/bias (512,)",
    ]
    assert not info.value.unexpected and not info.value.mismatched
    assert str(vgg16_file) in message and "another --arch" in message and "rerun with --arch vgg16" in message


def _keras1_resnet_name(name: str) -> str:
    """Keras 1's (2016) name of a keras.applications.ResNet50 layer: conv2_block1_1_conv -> res2a_branch2a."""
    if name in ("conv1_conv", "conv1_bn"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn_conv1"}[name]
    match = re.fullmatch(r"conv(\d)_block(\d)_(\d)_(conv|bn)", name)
    if not match:
        return name
    stage, block, index, kind = match.groups()
    branch = "branch1" if index == "0" else "branch2" + "abc"[int(index) - 1]
    return f"{'res' if kind == 'conv' else 'bn'}{stage}{'abcdef'[int(block) - 1]}_{branch}"


def test_2016_resnet50_file_is_recognised(keras_files, tmp_path):
    # fchollet/deep-learning-models v0.2: today's file name, Keras 1's layer names
    old = shutil.copy(keras_files("resnet50").h5, tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5")
    with h5py.File(old, "r+") as f:
        names = [_text(n) for n in f.attrs["layer_names"]]
        for name in names:
            if _keras1_resnet_name(name) != name:
                f.move(name, _keras1_resnet_name(name))
        f.attrs["layer_names"] = np.array([_keras1_resnet_name(n).encode() for n in names])
        assert "res2a_branch2a" in f and "bn_conv1" in f
    with pytest.raises(WeightMismatchError) as info:
        porting.port_keras_weights("resnet50", old)
    message = str(info.value)
    assert "2016 ResNet50 file" in message and "epsilon 1e-3" in message
    assert "keras-applications/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "another architecture" not in message and "another --arch" not in message


def test_include_top_file_is_named(include_top_h5):
    with pytest.raises(WeightMismatchError) as info:
        porting.port_keras_weights("resnet50", include_top_h5)
    assert info.value.unexpected == ["predictions (2 weights: (2048, 1000), (1000,))"]
    assert not info.value.missing and not info.value.mismatched
    assert "include_top=True" in str(info.value) and "_notop.h5" in str(info.value)


def test_partial_file_is_named(vgg16_file, tmp_path):
    partial = shutil.copy(vgg16_file, tmp_path / "partial.h5")
    with h5py.File(partial, "r+") as f:
        del f["block5_conv3"]
        f.attrs["layer_names"] = [n for n in map(_text, f.attrs["layer_names"]) if n != "block5_conv3"]
    with pytest.raises(WeightMismatchError, match="truncated or partial file") as info:
        porting.port_keras_weights("vgg16", partial)
    assert info.value.missing == ["params/block5_conv3/kernel (3, 3, 512, 512)", "params/block5_conv3/bias (512,)"]


def test_unreadable_files_are_named(vgg16_file, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(vgg16_file.read_bytes()[: vgg16_file.stat().st_size * 2 // 3])
    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    for path in (truncated, text):
        with pytest.raises(WeightFileError, match="not an HDF5 file or it is truncated") as info:
            porting.read_keras_h5(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        porting.read_keras_h5(tmp_path / "missing.h5")


# ---------------------------------------------------------------- msgpack files, load_pretrained


def test_msgpack_round_trip_is_exact_and_load_pretrained_checks(keras_files, tmp_path):
    variables = porting.port_keras_weights("resnet50", keras_files("resnet50").h5)
    porting.save_variables(variables, porting.pretrained_path("resnet50", tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["resnet50_imagenet_notop.msgpack"]
    msgpack = tmp_path / "resnet50_imagenet_notop.msgpack"
    for loaded in (porting.load_variables(msgpack), porting.load_pretrained("resnet50", tmp_path)):
        assert jax.tree.structure(loaded) == jax.tree.structure(variables)
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
            assert got.dtype == want.dtype and np.asarray(got).tobytes() == np.asarray(want).tobytes()
    (tmp_path / "vgg16_imagenet_notop.msgpack").write_bytes(msgpack.read_bytes())
    with pytest.raises(WeightMismatchError, match="another --arch"):
        porting.load_pretrained("vgg16", tmp_path)


def test_load_pretrained_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        porting.load_pretrained("vgg19", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "vgg19_imagenet_notop.msgpack") in message
    for text in ("python weights/port.py --arch vgg19", "--h5 FILE", "--init random"):
        assert text in message
    assert porting.pretrained_path("vgg19") == REPO / "weights" / "vgg19_imagenet_notop.msgpack"


# ---------------------------------------------------------------- the weights/port.py script


def test_cli_ports_a_local_file(vgg16_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert port_script.main(["--arch", "vgg16", "--h5", str(vgg16_file), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["vgg16_imagenet_notop.json", "vgg16_imagenet_notop.msgpack"]
    assert "warning" in capsys.readouterr().err  # not the published file
    info = json.loads((out / "vgg16_imagenet_notop.json").read_text())
    msgpack = out / "vgg16_imagenet_notop.msgpack"
    assert info["source"] == "vgg16.h5"
    assert info["source_md5"] == hashlib.md5(vgg16_file.read_bytes()).hexdigest()
    assert info["is_published_file"] is False
    assert info["published_md5"] == "6d6bbae143d832006294945121d1f1fc"
    assert info["parameters"] == NOTOP_PARAMS["vgg16"]
    assert info["output_sha256"] == hashlib.sha256(msgpack.read_bytes()).hexdigest()
    loaded = porting.load_pretrained("vgg16", out)
    ported = porting.port_keras_weights("vgg16", vgg16_file)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, ported))


def test_cli_errors_write_nothing(vgg16_file, include_top_h5, tmp_path, capsys):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(vgg16_file.read_bytes()[:100_000])
    out = tmp_path / "out"
    out.mkdir()
    # the first case from the command line (exit status, no traceback), the others in-process
    argv = ["--arch", "vgg16", "--h5", str(truncated), "--out", str(out)]
    done = subprocess.run([sys.executable, str(REPO / "weights" / "port.py"), *argv], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert str(truncated) in done.stderr and "truncated" in done.stderr and "Traceback" not in done.stderr
    assert list(out.iterdir()) == []
    for arch, h5, expected in (
        ("vgg19", vgg16_file, "rerun with --arch vgg16"),
        ("resnet50", include_top_h5, "_notop.h5"),
    ):
        assert port_script.main(["--arch", arch, "--h5", str(h5), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert str(h5) in err and expected in err and "Traceback" not in err
        assert list(out.iterdir()) == []


def test_cli_help_explains():
    argv = [sys.executable, str(REPO / "weights" / "port.py"), "--help"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0
    md5s = [p.md5 for p in porting.PUBLISHED.values()]
    for text in ("--h5", "--out", "--url", "include_top", "--init random", *md5s):
        assert text in done.stdout


def test_cli_download_checks_md5(vgg16_file, tmp_path, monkeypatch, capsys):
    published = porting.PUBLISHED["vgg16"]
    mirror = tmp_path / "mirror" / published.file_name
    mirror.parent.mkdir()
    shutil.copy(vgg16_file, mirror)
    out = tmp_path / "out"
    # The mirror does not serve the published file: md5 mismatch, nothing kept.
    assert port_script.main(["--arch", "vgg16", "--out", str(out), "--url", mirror.as_uri()]) == 1
    err = capsys.readouterr().err
    assert mirror.as_uri() in err and published.md5 in err and "--h5" in err
    assert not out.exists() or list(out.iterdir()) == []
    # Unreachable URL: says what to download and where to put it.
    nowhere = (tmp_path / "nowhere.h5").as_uri()
    assert port_script.main(["--arch", "vgg16", "--out", str(out), "--url", nowhere]) == 1
    err = capsys.readouterr().err
    assert published.file_name in err and published.md5 in err and str(out / published.file_name) in err
    assert list(out.iterdir()) == []
    # With the mirror's md5 as the published one, the download is kept and converted.
    md5 = hashlib.md5(mirror.read_bytes()).hexdigest()
    patched = porting.PublishedWeights(published.file_name, mirror.as_uri(), md5)
    monkeypatch.setitem(porting.PUBLISHED, "vgg16", patched)
    assert port_script.main(["--arch", "vgg16", "--out", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [published.file_name, "vgg16_imagenet_notop.json", "vgg16_imagenet_notop.msgpack"]
    )
    assert json.loads((out / "vgg16_imagenet_notop.json").read_text())["is_published_file"] is True
