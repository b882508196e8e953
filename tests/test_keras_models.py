"""Keras models imported whole (weights/port.py --keras-model): file kinds, parity, refusals.

Keras 3 writes each file at test time in tmp_path (random weights, BatchNorm statistics away
from 0 and 1); the imported run's probabilities must equal ``model.predict`` to 1e-5 on two real
X-rays and a random image.
"""

import importlib.util
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")

from keras_helpers import numpy_initializers, real_xrays
from xrayjax import load_run
from xrayjax.inference import probabilities
from xrayjax.keras_import import KerasImportError
from xrayjax.keras_run import import_keras_run

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
APPS = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19,
        "resnet50": keras.applications.ResNet50, "densenet121": keras.applications.DenseNet121}


@pytest.fixture(autouse=True)
def _numpy_initializers():
    with numpy_initializers():
        yield


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


def _head(x, kind, outputs, activation=None):
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
    return layers.Dense(outputs, activation=activation or ("sigmoid" if outputs == 1 else "softmax"))(x)


def build(arch, nested=True, head="gap", outputs=4, activation=None):
    inputs = keras.Input((SIZE, SIZE, 3))
    if nested:
        backbone = APPS[arch](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
        features = backbone(inputs)
    else:
        backbone = APPS[arch](include_top=False, weights=None, input_tensor=inputs)
        features = backbone.output
    return _randomize(keras.Model(inputs, _head(features, head, outputs, activation)))


@pytest.fixture(scope="module")
def xrays(data_root) -> np.ndarray:
    """Two real chest X-rays (RGB, 32 px, as the data pipeline resizes them) and one random image."""
    noise = np.random.default_rng(1).uniform(0, 255, (1, SIZE, SIZE, 3))
    return np.concatenate([real_xrays(data_root, SIZE), noise]).astype(np.float32)


def _check_parity(path, model, tmp_path, outputs, x):
    """The outputs named in reverse order, which the run sorts (reordering the output Dense): each
    name's probability must still be Keras'."""
    names = [f"class_{i}" for i in range(max(outputs, 2))][::-1]
    run_dir = import_keras_run(path, tmp_path / "run", names, preprocess="none")
    run = load_run(run_dir)
    assert list(run.class_names) == names[::-1]
    want = model.predict(x, verbose=0)
    from xrayjax.inference import _forward  # the route predict and evaluate take

    logits, _ = _forward(run.model, run.variables, x)
    got = probabilities(np.asarray(logits), multilabel=run.config.task == "multilabel")[:, ::-1]  # by `names`
    if outputs == 1:  # one sigmoid: P(names[1])
        got = got[:, 1:]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    meta = json.loads((run_dir / "config.json").read_text())["keras_import"]
    assert meta["preprocess"] == "none" and len(meta["source_sha256"]) == 64
    return run


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
@pytest.mark.parametrize("arch,nested,head,outputs", [
    ("vgg16", True, "gap", 4), ("resnet50", False, "flatten", 1),
])
def test_parity(tmp_path, xrays, suffix, arch, nested, head, outputs):
    model = build(arch, nested, head, outputs)
    path = tmp_path / f"model{suffix}"
    model.save(path)
    run = _check_parity(path, model, tmp_path, outputs, xrays)
    assert run.config.arch == arch and run.config.image_size == SIZE


@pytest.mark.parametrize("arch,nested,head,outputs", [
    ("vgg19", False, "gap", 3), ("densenet121", True, "gap", 5),
])
def test_parity_other_archs(tmp_path, xrays, arch, nested, head, outputs):
    model = build(arch, nested, head, outputs)  # one model, saved as each file kind
    for suffix in (".keras", ".h5"):
        model.save(tmp_path / f"model{suffix}")
        _check_parity(tmp_path / f"model{suffix}", model, tmp_path / suffix[1:], outputs, xrays)


def test_cli_import_then_predict(tmp_path, capsys):
    from PIL import Image

    from xrayjax import predict

    model = build("vgg16", True, "gap", 4)
    model.save(tmp_path / "model.keras")
    out = tmp_path / "from_keras"
    argv = ["--keras-model", str(tmp_path / "model.keras"), "--class-names",
            "covid,normal,pneumonia_bac,pneumonia_vir", "--preprocess", "rescale", "--out", str(out)]
    assert _port_script().main(argv) == 0
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    capsys.readouterr()
    assert predict.main(["--run", str(out), "--json", str(tmp_path / "scan.png")]) == 0
    got = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert list(got) == ["covid", "normal", "pneumonia_bac", "pneumonia_vir"]
    want = model.predict(pixels[None].astype(np.float32) / 255.0, verbose=0)[0]
    np.testing.assert_allclose(list(got.values()), want, atol=1e-5, rtol=0)
    meta = json.loads((out / "config.json").read_text())
    assert meta["keras_import"]["preprocess"] == "rescale" and meta["config"]["init"] == "keras"
    from xrayjax.gradcam import grad_cam

    run = load_run(out)
    heatmaps, logits = grad_cam(run.model, run.variables, pixels[None])
    assert heatmaps.shape == (1, SIZE, SIZE) and np.isfinite(heatmaps).all()
    np.testing.assert_allclose(probabilities(logits)[0], want, atol=1e-5, rtol=0)


def _refused(tmp_path, path, capsys, needle, *flags):
    out = tmp_path / "refused_run"
    assert _port_script().main(["--keras-model", str(path), *flags, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".refused_run*"))
    return err


def test_refuses_unsupported_layer(tmp_path, capsys):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.LayerNormalization(name="odd_norm")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.save(tmp_path / "model.keras")
    err = _refused(tmp_path, tmp_path / "model.keras", capsys, "'odd_norm' (LayerNormalization)")
    assert err.count("\n") == 2  # the error line, then "No run folder was written."


def test_refuses_backbone_not_in_zoo(tmp_path, capsys):
    inputs = keras.Input((SIZE, SIZE, 3))
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(tmp_path / "model.h5")
    _refused(tmp_path, tmp_path / "model.h5", capsys, "not one of the zoo's keras.applications models")


def test_refuses_linear_output(tmp_path, capsys):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.applications.VGG16(include_top=False, weights=None, input_tensor=inputs).output
    x = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, x).save(tmp_path / "model.keras")
    _refused(tmp_path, tmp_path / "model.keras", capsys, "'logits' (Dense)")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_refuses_truncated_file(tmp_path, capsys, suffix):
    build("vgg16", True, "gap", 2).save(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    _refused(tmp_path, tmp_path / f"cut{suffix}", capsys, "truncated")


def test_refuses_a_head_that_does_not_fit(tmp_path, capsys):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Flatten()(keras.applications.VGG16(include_top=False, weights=None, input_tensor=inputs).output)
    x = keras.layers.Dropout(0.5)(keras.layers.Dense(64, activation="relu")(x))  # the report's has Dense(256)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.save_weights(tmp_path / "x.weights.h5")
    flags = ["--arch", "vgg16", "--task", "binary"]
    err = _refused(tmp_path, tmp_path / "x.weights.h5", capsys, "layer 'dense' kernel is (512, 64) in the file, "
                   "(512, 256) expected; layer 'dense' bias is (64,) in the file, (256,) expected", *flags,
                   "--image-size", str(SIZE))
    assert err.count("\n") == 2 and "the report's head at --image-size 32 (Flatten, Dropout, Dense(256)" in err
    # without --image-size: 224 px, whose Flatten gives the first Dense 7 x 7 x 512 inputs
    _refused(tmp_path, tmp_path / "x.weights.h5", capsys, "(512, 64) in the file, (25088, 256) expected", *flags)
    model.save(tmp_path / "x.keras")  # whole, its Flatten fixes the input size: 64 px gives the Dense 2 x 2 x 512
    err = _refused(tmp_path, tmp_path / "x.keras", capsys, "kernel is (512, 64) in the file, (2048, 64) expected",
                   "--image-size", "64")
    assert "its layers at --image-size 64" in err and "pass the --image-size the model was trained at" in err
    # without --arch the file is read as a whole model: the error says how a weights-only file is read
    _refused(tmp_path, tmp_path / "x.weights.h5", capsys, "pass --keras-model FILE --arch ARCH --task TASK")


def test_refuses_wrong_class_names_and_busy_out(tmp_path):
    build("vgg16", True, "gap", 4).save(tmp_path / "model.keras")
    with pytest.raises(ValueError, match="4 classes"):
        import_keras_run(tmp_path / "model.keras", tmp_path / "run", ["a", "b"])
    with pytest.raises(ValueError, match="is multiclass; a labels file goes with a multilabel model"):
        import_keras_run(tmp_path / "model.keras", tmp_path / "run", labels=tmp_path / "labels.csv")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty folder"):
        import_keras_run(tmp_path / "model.keras", tmp_path / "busy")
    assert not (tmp_path / "run").exists()
    with pytest.raises(KerasImportError):
        import_keras_run(tmp_path / "busy" / "file", tmp_path / "run")


def test_evaluate_imported_run_on_a_data_folder(tmp_path):
    from PIL import Image

    from xrayjax.evaluate import evaluate_run

    names = ["covid", "normal", "pneumonia_bac"]
    rng = np.random.default_rng(4)
    for name in names:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    build("vgg16", True, "gap", 3).save(tmp_path / "model.keras")
    run = import_keras_run(tmp_path / "model.keras", tmp_path / "run", names)
    with pytest.raises(ValueError, match="imported by weights/port.py --keras-model and saw no data; pass --data-dir"):
        evaluate_run(run, quiet=True)
    metrics = evaluate_run(run, data_dir=str(tmp_path / "data"), tfds_dir=str(tmp_path / "tfds"), quiet=True)
    assert (run / "metrics.json").is_file() and metrics


def _class_folders(root, names, per_class):
    """``root/<name>/<i>.png``: random 32-px gray images, ``per_class`` of each class."""
    from PIL import Image

    rng = np.random.default_rng(5)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_resume_trains_an_imported_model_further(tmp_path, capsys):
    import hashlib

    from xrayjax import fit, predict, runfiles
    from xrayjax import train as train_cli
    from xrayjax.config import TrainConfig

    build("vgg16", True, "gap", 1).save(tmp_path / "model.keras")  # GAP, Dense, Dropout, BatchNorm, Dense, Dense(1)
    data = _class_folders(tmp_path / "data", ["covid", "normal"], 8)
    names = ["covid", "normal"]

    def train(out, **kw):
        return fit(TrainConfig(out=str(out), data_dir=str(data), tfds_dir=str(tmp_path / "tfds"), resume=True,
                               batch_size=4, quiet=True, evaluate=False, **kw))

    def frozen_sha(out):
        return hashlib.sha256((out / runfiles.FROZEN_FILE).read_bytes()).hexdigest()

    out = import_keras_run(tmp_path / "model.keras", tmp_path / "run", names, "rescale")
    before, sha = load_run(out).variables, frozen_sha(out)
    with pytest.raises(ValueError, match="--arch resnet50: .* imported by weights/port.py --keras-model, whose "
                                         "--arch is vgg16; leave --arch out"):
        train(out, epochs=1, arch="resnet50")
    with pytest.raises(ValueError, match="--dropout 0.2: .* keeps the Dropout rates of its Keras layers"):
        train(out, epochs=1, dropout=0.2)
    result = train(out, epochs=1)  # the fast path: cached features, the Keras head trained alone
    run = load_run(out)
    assert len(result.history) == 1 and len(run.history) == 1 and frozen_sha(out) == sha
    assert run.config.init == "keras" and run.config.image_size == SIZE and run.config.task == "binary"
    assert "train" in result.features  # cached
    output = run.model.head.layers[-1]  # the output Dense (Keras numbers the names per session)
    head, old = run.variables["params"]["head"], before["params"]["head"]
    assert not np.allclose(head[dict(output)["name"]]["kernel"], old[dict(output)["name"]]["kernel"])
    bn, old_bn = run.variables["batch_stats"]["head"], before["batch_stats"]["head"]
    (layer,) = bn  # the BatchNorm's moving statistics moved: it ran in training mode
    assert not np.allclose(bn[layer]["mean"], old_bn[layer]["mean"])
    for a, b in zip(*(jax.tree.leaves(v["params"]["backbone"]) for v in (run.variables, before)), strict=True):
        np.testing.assert_array_equal(a, b)
    recorded = json.loads((out / runfiles.SPLITS_FILE).read_text())["splits"]
    assert recorded["train"] and sorted(recorded["train"]) == sorted(result.splits.train.keys)
    assert json.loads((out / "config.json").read_text())["keras_import"]["preprocess"] == "rescale"
    capsys.readouterr()
    assert predict.main(["--run", str(out), "--json", str(data / "covid" / "0.png")]) == 0
    assert list(json.loads(capsys.readouterr().out)[0]["probabilities"]) == names
    # the command line continues on the recorded splits, then evaluates the test split
    cli = ["--resume", "--out", str(out), "--data-dir", str(data), "--tfds-dir", str(tmp_path / "tfds"),
           "--epochs", "2", "--batch-size", "4", "--quiet"]
    for flag, value, saved in (("--color", "gray", "keep"), ("--image-size", "224", str(SIZE))):
        assert train_cli.main([*cli, flag, value]) == 2  # given, though TrainConfig's default: it stops
        assert f"{flag} {value}: the run in {out} is a Keras model imported by weights/port.py --keras-model, " \
               f"whose {flag} is {saved}; leave {flag} out" in capsys.readouterr().err
    assert train_cli.main(cli) == 0
    assert [h["epoch"] for h in runfiles.read_history(out)] == [1, 2] and frozen_sha(out) == sha
    assert json.loads((out / runfiles.SPLITS_FILE).read_text())["splits"] == recorded
    assert json.loads((out / runfiles.METRICS_FILE).read_text())

    tuned = import_keras_run(tmp_path / "model.keras", tmp_path / "tuned", names, "rescale")
    train(tuned, epochs=1, fine_tune=1, cache_features=False)  # the full path, vgg16's block5 opened
    run = load_run(tuned)
    assert frozen_sha(tuned) == sha and len(run.history) == 1
    backbone, old = run.variables["params"]["backbone"], before["params"]["backbone"]
    assert not np.allclose(backbone["block5_conv3"]["kernel"], old["block5_conv3"]["kernel"])
    np.testing.assert_array_equal(backbone["block4_conv3"]["kernel"], old["block4_conv3"]["kernel"])

    unnamed = import_keras_run(tmp_path / "model.keras", tmp_path / "unnamed")
    with pytest.raises(ValueError, match="classes class_0, class_1, but the data now has covid, normal; the imported "
                                         "Keras model's outputs are unnamed: .* --class-names NAMES --out NEW, NAMES "
                                         r"being the data's classes \(covid, normal\) in the order of the model's"):
        train(unnamed, epochs=1)


def _labels_csv(root, labels, count):
    """``root/labels.csv`` (generic: path, one 0/1 column per label) of ``count`` random 32-px images."""
    from PIL import Image

    rng = np.random.default_rng(6)
    root.mkdir()
    rows = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append([f"{i}.png", *(int(v) for v in rng.integers(0, 2, len(labels)))])
    (root / "labels.csv").write_text("\n".join(",".join(map(str, r)) for r in [["path", *labels], *rows]) + "\n")
    return root / "labels.csv"


def test_multilabel_outputs_keep_their_names_in_the_datas_order(tmp_path, xrays, capsys):
    from xrayjax import runfiles
    from xrayjax.evaluate import evaluate_run
    from xrayjax.inference import _forward
    from xrayjax.config import TrainConfig
    from xrayjax.resume import check_resume, resume_settings

    model = build("vgg16", True, "gap", 3, activation="sigmoid")
    model.save(tmp_path / "model.keras")
    given = ["covid", "pneumonia", "edema"]  # the model's output order; a labels file's labels are sorted
    run_dir = import_keras_run(tmp_path / "model.keras", tmp_path / "run", given, "none")
    run = load_run(run_dir)
    assert run.class_names == ("covid", "edema", "pneumonia") and run.config.task == "multilabel"
    logits, _ = _forward(run.model, run.variables, xrays)
    got = probabilities(np.asarray(logits), multilabel=True)
    want = model.predict(xrays, verbose=0)
    np.testing.assert_allclose(got, want[:, [given.index(n) for n in run.class_names]], atol=1e-5, rtol=0)
    config = runfiles.read_config(run_dir)[0]
    check_resume(config, run_dir, ("covid", "edema", "pneumonia"))  # a labels file of the same labels continues
    with pytest.raises(ValueError, match="now has covid, edema, effusion; the imported Keras model's outputs keep "
                                         "the names given at import") as refused:
        check_resume(config, run_dir, ("covid", "edema", "effusion"))
    assert "--class-names covid" not in str(refused.value)  # no renaming: it would change what an output means
    csv = _labels_csv(tmp_path / "data", ["pneumonia", "covid", "edema"], 16)
    rows = [line.split(",") for line in csv.read_text().splitlines()]  # edema never positive: a fresh run
    csv.write_text("\n".join(",".join(r[:3] + ["0" if i else r[3]]) for i, r in enumerate(rows)) + "\n")  # drops it
    data = {"data_dir": str(tmp_path / "data"), "tfds_dir": str(tmp_path / "tfds"), "quiet": True}
    with pytest.raises(ValueError, match="imported without a labels file, .* --labels FILE.csv --out NEW, then "
                                         "evaluate NEW with --data-dir"):
        evaluate_run(run_dir, **data)
    flags = ["--class-names", ",".join(given), "--preprocess", "none", "--labels"]
    wrong = _labels_csv(tmp_path / "wrong", ["edema", "pneumonia"], 1)
    _refused(tmp_path, tmp_path / "model.keras", capsys, "its labels are edema, pneumonia, the model's outputs covid, "
             "edema, pneumonia (--class-names)", *flags, str(wrong))
    _refused(tmp_path, tmp_path / "model.keras", capsys, "does not exist", *flags, str(tmp_path / "none.csv"))
    for size in ("16", "0"):  # a size training would refuse; 0 is no size, not the model's own
        _refused(tmp_path, tmp_path / "model.keras", capsys, "--image-size must be in [32, 1024]", "--image-size", size)
    labelled = tmp_path / "labelled"
    assert _port_script().main(["--keras-model", str(tmp_path / "model.keras"), *flags, str(csv), "--out",
                                str(labelled)]) == 0
    metrics = evaluate_run(labelled, **data)  # the recorded labels file, split as a fresh run splits it
    assert metrics["label_names"] == ["covid", "edema", "pneumonia"] and (labelled / "metrics.json").is_file()
    assert metrics["per_label"]["edema"]["roc_auc"] is None  # every output scored, this one n/a
    first = TrainConfig(out=str(labelled), resume=True, data_dir=data["data_dir"])
    assert resume_settings(first, {"out", "resume", "data_dir"})[0].labels == str(csv)  # its first --resume
    meta = json.loads((run_dir / "config.json").read_text())  # as the import wrote it before it sorted
    (run_dir / "config.json").write_text(json.dumps({**meta, "class_names": given}))
    with pytest.raises(ValueError, match="import it again with the same --class-names"):
        check_resume(config, run_dir, ("covid", "edema", "pneumonia"))


def _report_model(arch, task, outputs, nested):
    """The report's model of (arch, task), layers named as xrayjax's heads name them."""
    from xrayjax.keras_weights import report_head_specs

    inputs = keras.Input((SIZE, SIZE, 3))
    if nested:
        x = APPS[arch](include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))(inputs)
    else:
        x = APPS[arch](include_top=False, weights=None, input_tensor=inputs).output
    kinds = {"gap": keras.layers.GlobalAveragePooling2D, "flatten": keras.layers.Flatten}
    for s in report_head_specs(arch, task, outputs):
        if s["kind"] in kinds:
            x = kinds[s["kind"]](name=s["name"])(x)
        elif s["kind"] == "dropout":
            x = keras.layers.Dropout(s["rate"], name=s["name"])(x)
        elif s["kind"] == "batch_norm":
            x = keras.layers.BatchNormalization(epsilon=s["epsilon"], name=s["name"])(x)
        else:
            x = keras.layers.Dense(s["units"], activation=s["activation"], name=s["name"])(x)
    return _randomize(keras.Model(inputs, x))


@pytest.mark.parametrize("arch,task,outputs,nested", [
    ("vgg16", "binary", 1, False), ("vgg19", "multiclass", 4, False), ("resnet50", "multiclass", 3, True)])
def test_report_models_weights_only_legacy_h5_and_whole(tmp_path, xrays, arch, task, outputs, nested):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    model = _report_model(arch, task, outputs, nested)
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    names = ["a", "b"] if task == "binary" else ["a", "b", "c", "d"][:outputs]
    run_dir = import_keras_run(tmp_path / "weights.h5", tmp_path / "run", names, "none", arch, task, SIZE)
    run = load_run(run_dir)
    from xrayjax.inference import _forward

    x = xrays
    logits, _ = _forward(run.model, run.variables, x)
    got = probabilities(np.asarray(logits))
    want = model.predict(x, verbose=0)
    np.testing.assert_allclose(got[:, 1:] if outputs == 1 else got, want, atol=1e-5, rtol=0)
    wrong = "vgg16" if arch == "vgg19" else "vgg19"
    with pytest.raises(KerasImportError, match=f"read as --arch {wrong}"):
        import_keras_run(tmp_path / "weights.h5", tmp_path / "run2", names, "none", wrong, task, SIZE)
    assert not (tmp_path / "run2").exists()
    model.save_weights(tmp_path / "model.weights.h5")  # Keras 3's weights-only format
    v3 = load_run(import_keras_run(tmp_path / "model.weights.h5", tmp_path / "v3", names, "none", arch, task, SIZE))
    assert json.loads((v3.run_dir / "config.json").read_text())["keras_import"]["file_kind"] == "weights"
    logits, _ = _forward(v3.model, v3.variables, x)
    got = probabilities(np.asarray(logits))
    np.testing.assert_allclose(got[:, 1:] if outputs == 1 else got, want, atol=1e-5, rtol=0)
    with h5py.File(tmp_path / "model.weights.h5", "a") as f:  # as a Keras that records no names writes it
        named = []
        f.visititems(lambda key, obj: named.append(obj) if "name" in obj.attrs else None)
        for group in named:
            del group.attrs["name"]
    with pytest.raises(KerasImportError, match="names none of its layers"):
        import_keras_run(tmp_path / "model.weights.h5", tmp_path / "v3b", names, "none", arch, task, SIZE)
    model.save(tmp_path / "model.keras")  # the report's model whole (vgg16: Task 1's flatten head)
    _check_parity(tmp_path / "model.keras", model, tmp_path / "whole", outputs, xrays)


def test_legacy_weight_names_find_their_layer_in_either_spelling():
    from xrayjax.keras_import import layer_of

    names = {"conv1_conv", "conv2_block1_0_bn", "dense"}
    assert layer_of("conv1/conv/kernel:0", names) == "conv1_conv"  # Keras 2's DenseNet, inlined
    assert layer_of("densenet121/conv1/conv/kernel:0", names) == "conv1_conv"  # nested in a sub-model
    assert layer_of("conv2_block1_0_bn/gamma:0", names) == "conv2_block1_0_bn"
    assert layer_of("dense/kernel:0", names) == "dense"
    assert layer_of("other/kernel:0", names) == "other"  # not the model's: the strict merge names it
