"""Evaluation: metrics against hand-computed values, figures, Grad-CAM, prediction, evaluate_run."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from xrayjax import figures
from xrayjax.config import TrainConfig
from xrayjax.data import DataConfig, Split, Splits, load_splits
from xrayjax.evaluate import compute_metrics, evaluate_run, gradcam_indices, tsne_points
from xrayjax.evaluate import main as evaluate_main
from xrayjax.gradcam import grad_cam
from xrayjax.inference import backbone_features
from xrayjax.loop import fit
from xrayjax.models import create_model, keras_init
from xrayjax.predict import main as predict_main
from xrayjax.predict import predict
from xrayjax.preprocessing import preprocess_input
from xrayjax.runfiles import load_run

BINARY = ("covid", "normal")
FOUR = ("covid", "normal", "pneumonia_bac", "pneumonia_vir")

# Four-class case; hand-computed: predictions 0,1,3,3,1,2 -> 4 of 6 right.
FOUR_LABELS = np.array([0, 1, 2, 3, 0, 2])
FOUR_PROBS = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.2, 0.5, 0.2, 0.1],
        [0.1, 0.2, 0.2, 0.5],
        [0.1, 0.1, 0.35, 0.45],
        [0.3, 0.4, 0.2, 0.1],
        [0.1, 0.1, 0.7, 0.1],
    ]
)


def test_binary_metrics_match_hand_computed_values():
    labels = np.array([0, 0, 0, 1, 1])
    p_normal = np.array([0.1, 0.6, 0.3, 0.8, 0.4])  # predictions 0, 1, 0, 1, 0
    m = compute_metrics(labels, np.stack([1 - p_normal, p_normal], 1), BINARY)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[2, 1], [1, 1]]
    covid, normal = m["per_class"]["covid"], m["per_class"]["normal"]
    assert (covid["precision"], covid["recall"], covid["f1"]) == pytest.approx((2 / 3,) * 3)
    assert (normal["precision"], normal["recall"], normal["f1"]) == pytest.approx((1 / 2,) * 3)
    assert (covid["support"], normal["support"]) == (3, 2)
    # positives 0.8, 0.4 vs negatives 0.1, 0.6, 0.3: 5 of 6 pairs ranked right
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert m["roc_auc_positive_class"] == "normal"
    assert m["notes"] == []


def test_four_class_metrics_match_hand_computed_values():
    m = compute_metrics(FOUR_LABELS, FOUR_PROBS, FOUR)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]
    precision = [m["per_class"][c]["precision"] for c in FOUR]
    recall = [m["per_class"][c]["recall"] for c in FOUR]
    f1 = [m["per_class"][c]["f1"] for c in FOUR]
    assert precision == pytest.approx([1, 1 / 2, 1, 1 / 2])
    assert recall == pytest.approx([1 / 2, 1, 1 / 2, 1])
    assert f1 == pytest.approx([2 / 3] * 4)
    # one-vs-rest: covid 1, normal 1, bac 6/8 (two ties at 0.2), vir 4/5
    per_class = m["roc_auc_per_class"]
    assert [per_class[c] for c in FOUR] == pytest.approx([1.0, 1.0, 0.75, 0.8])
    assert m["roc_auc"] == pytest.approx(0.8875)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(FOUR_LABELS, FOUR_PROBS, multi_class="ovr"))


def test_class_missing_from_labels_gives_a_note_not_a_crash():
    keep = FOUR_LABELS != 3
    m = compute_metrics(FOUR_LABELS[keep], FOUR_PROBS[keep], FOUR)
    assert m["roc_auc_per_class"]["pneumonia_vir"] is None
    assert m["roc_auc_per_class"]["pneumonia_bac"] == pytest.approx(5 / 6)
    assert m["roc_auc"] == pytest.approx((1 + 1 + 5 / 6) / 3)
    assert m["per_class"]["pneumonia_vir"]["support"] == 0
    assert any("pneumonia_vir" in note for note in m["notes"])
    single = compute_metrics(np.zeros(3, int), FOUR_PROBS[:3], FOUR)
    assert single["roc_auc"] is None and single["accuracy"] == pytest.approx(1 / 3)
    never = compute_metrics(np.array([0, 1, 1]), np.array([[0.9, 0.1]] * 3), BINARY)
    assert never["per_class"][BINARY[1]]["precision"] == 0.0
    assert never["notes"] == [f"never predicted: {BINARY[1]}; precision is undefined there and shown as 0"]


def test_metrics_reject_probabilities_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(6, 2\)"):
        compute_metrics(FOUR_LABELS, FOUR_PROBS, BINARY)


def test_gradcam_indices_take_classes_in_turn():
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3, 3, 3])
    assert gradcam_indices(labels, 8).tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert gradcam_indices(labels[:3], 8).tolist() == [0, 1, 2]


def _assert_readable_png(path, min_size=(400, 300)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        pixels = np.asarray(image.convert("RGB"), np.float32)
    assert pixels.std() > 10.0, f"{path.name} is (nearly) a single colour"
    # more than axes on a white page: a real share of non-white pixels
    assert (pixels.min(axis=-1) < 200).mean() > 0.01


def test_figures_are_readable_pngs(tmp_path):
    rng = np.random.default_rng(0)
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 1 - 0.5 / e,
         "val_accuracy": 1 - 0.6 / e, "seconds": 1.0}
        for e in range(1, 9)
    ]
    figures.plot_curves(history, tmp_path / "curves.png", title="vgg16 binary")
    figures.plot_confusion(np.array([[7, 2, 0, 0], [1, 8, 0, 0], [0, 1, 5, 3], [0, 0, 4, 5]]), FOUR,
                           tmp_path / "confusion.png")
    features = np.concatenate([rng.normal(3 * k, 1, (12, 16)) for k in range(4)])
    labels = np.repeat(np.arange(4), 12)
    subsets = np.where(np.arange(48) % 4 == 0, "test", "train")
    figures.plot_tsne(tsne_points(features), labels, subsets, FOUR, tmp_path / "tsne.png")
    images = rng.integers(0, 255, (8, 48, 48, 3), dtype=np.uint8)
    heat = rng.random((8, 48, 48)).astype(np.float32)
    figures.plot_gradcam(images, heat, FOUR * 2, FOUR[::-1] * 2, [0.9] * 8,
                         tmp_path / "gradcam.png")
    for name in ("curves", "confusion", "tsne", "gradcam"):
        _assert_readable_png(tmp_path / f"{name}.png")


def test_gradcam_panels_mark_right_and_wrong_wrap_long_labels_and_draw_no_flat_heat(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(figures.Figure, "savefig", lambda fig, *args, **kwargs: saved.append(fig))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    many = ", ".join(f"label {i}" for i in range(14))  # a CheXpert-long list of true labels
    figures.plot_gradcam(images, np.random.default_rng(0).random((2, 32, 32)), [many, "b"], ["label 0", "a"],
                         [0.9, 0.6], tmp_path / "g.png", correct=[True, False], pred_label="top label")
    figures.plot_gradcam(images, np.ones((2, 32, 32)), ["a", "b"], ["a", "a"], [0.9, 0.6], tmp_path / "h.png")
    real, flat = saved
    first, second = (ax.get_title() for ax in real.axes[:2])
    assert first.startswith("✓ true: label 0, label 1") and first.count("\n") == 2 and "…" in first
    assert second == "✗ true: b\ntop label: a (60%)"
    assert len(real.axes) == 3 and [len(ax.images) for ax in real.axes[:2]] == [2, 2]  # X-ray, heat; colorbar
    assert "no spatial information" in flat._suptitle.get_text()
    assert len(flat.axes) == 2 and [len(ax.images) for ax in flat.axes] == [1, 1]  # the X-rays alone


def test_an_interrupted_run_is_named_by_the_epochs_it_finished():
    from xrayjax.evaluate import _epochs, _run_record

    notes = []
    short = types.SimpleNamespace(config=TrainConfig(epochs=3), history=[{}], run_dir=pathlib.Path("runs/r"))
    record = _run_record(short, notes)
    assert (record["epochs"], record["epochs_trained"], _epochs(record)) == (3, 1, "epochs 1 of 3")
    assert notes == ["the model finished 1 of the run's 3 epochs (interrupted: python -m xrayjax.train --resume "
                     "--out runs/r continues it)"]
    done = _run_record(types.SimpleNamespace(config=TrainConfig(epochs=1), history=[{}], run_dir=None), notes)
    assert _epochs(done) == "epochs 1" and len(notes) == 1


def test_importing_and_plotting_leave_matplotlib_settings_alone(tmp_path):
    # A notebook's backend and rcParams stay its own: no pyplot, font sizes only inside each plot.
    code = textwrap.dedent("""
        import sys
        import matplotlib
        import numpy as np
        matplotlib.use("svg")
        before = dict(matplotlib.rcParams)

        def check(when):
            changed = sorted(k for k, v in before.items() if matplotlib.rcParams[k] != v)
            assert not changed and matplotlib.get_backend() == "svg", (when, changed)
            assert "matplotlib.pyplot" not in sys.modules, when

        import xrayjax.evaluate
        from xrayjax import figures
        check("import")
        figures.plot_confusion(np.array([[3, 1], [0, 2]]), ("covid", "normal"), sys.argv[1])
        check("plot")
    """)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "confusion.png")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_readable_png(tmp_path / "confusion.png")


def test_tsne_handles_small_n_and_rejects_tiny_n():
    points = tsne_points(np.random.default_rng(1).normal(size=(6, 5)))
    assert points.shape == (6, 2) and np.isfinite(points).all()
    with pytest.raises(ValueError, match="at least 4"):
        tsne_points(np.zeros((3, 5)))


def _init(arch, task, size):
    """The model and Keras' initial values for it (:func:`keras_init`, numpy: nothing compiled)."""
    model = create_model(arch, task)
    return model, keras_init(model, (1, size, size, 3))


def test_gradcam_on_a_four_class_model_has_image_shape_and_range():
    model, variables = _init("vgg16", "multiclass", 64)
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    heat, logits = grad_cam(model, variables, images)
    assert heat.shape == (3, 64, 64) and logits.shape == (3, 4)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert all(h.max() == pytest.approx(1.0) or h.max() == 0.0 for h in heat)
    expected = model.apply(variables, preprocess_input(images), train=False)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-3)
    # from features computed beforehand (training's cache) only the head runs: same maps
    features = backbone_features(model, variables, images)
    heat_cached, logits_cached = grad_cam(model, variables, np.zeros_like(images), features=features)
    np.testing.assert_allclose(heat_cached, heat, atol=1e-5)
    np.testing.assert_allclose(logits_cached, logits, rtol=1e-5, atol=1e-5)


def test_binary_gradcam_flips_the_sign_for_class_zero():
    # At 32 px the VGG feature map is 1x1, so each map is one number: the weighted sum for
    # class 1 is exactly minus the one for class 0, and ReLU keeps one of the two.
    model, variables = _init("vgg16", "binary", 32)
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    heat0, logits = grad_cam(model, variables, images, classes=np.zeros(4, np.int32))
    heat1, _ = grad_cam(model, variables, images, classes=np.ones(4, np.int32))
    assert heat0.shape == (4, 32, 32)
    for h0, h1 in zip(heat0, heat1):
        assert sorted([h0.max(), h1.max()]) == [0.0, 1.0]
        assert np.ptp(h0) == 0 and np.ptp(h1) == 0
    predicted, _ = grad_cam(model, variables, images)
    np.testing.assert_array_equal(predicted, np.where((logits[:, :1] > 0)[..., None], heat1, heat0))


# --- a real (tiny) run: 2 epochs of vgg16 binary at 32 px on a per-class subset of the data


def _subset(split, per_class):
    index = np.concatenate(
        [np.flatnonzero(split.labels == c)[:per_class] for c in np.unique(split.labels)]
    )
    return split.take(index)


@pytest.fixture(scope="session")
def tiny_run(data_root, tmp_path_factory):
    tfds_dir = str(tmp_path_factory.mktemp("tfds"))
    data = DataConfig(task="binary", data_dir=str(data_root), tfds_dir=tfds_dir, image_size=32)
    full = load_splits(data)
    splits = Splits(_subset(full.train, 12), _subset(full.validation, 4), _subset(full.test, 6),
                    full.class_names)
    out = tmp_path_factory.mktemp("runs") / "vgg16_binary"
    config = TrainConfig(arch="vgg16", task="binary", data_dir=str(data_root), tfds_dir=tfds_dir,
                         image_size=32, init="random", epochs=2, batch_size=8, out=str(out),
                         quiet=True, evaluate=False)
    fit(config, splits=splits)
    return out, splits


@pytest.fixture(scope="module")
def evaluated(tiny_run) -> dict:
    """evaluate_run on the tiny run's folder, the backbone run on its images (once, for the
    tests that read its metrics)."""
    run_dir, splits = tiny_run
    return evaluate_run(run_dir, splits, quiet=True, score_train=True)


def test_evaluate_run_writes_metrics_and_figures(tiny_run, evaluated):
    run_dir, splits = tiny_run
    metrics = evaluated
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert metrics["n"] == 12 and np.sum(metrics["confusion_matrix"]) == 12
    probs = predict(load_run(run_dir), splits.test.images[:])
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == splits.test.labels))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(splits.test.labels, probs[:, 1]))
    assert [row["name"] for row in metrics["test_predictions"]] == list(splits.test.names)
    assert metrics["accuracy_by_split"]["test"] == metrics["accuracy"]
    assert set(metrics["accuracy_by_split"]) == {"train", "validation", "test"}
    assert "P(normal)" in metrics["probabilities"]
    for name in ("curves", "confusion", "tsne", "gradcam"):
        _assert_readable_png(run_dir / f"{name}.png")


class _Unreadable:
    """Images that fail when read: a split evaluation must not touch."""

    shape, dtype = (12, 32, 32, 3), np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        raise AssertionError("the train split's images were read")


def test_evaluate_run_scores_train_only_when_asked(tiny_run, evaluated, tmp_path):
    run_dir, splits = tiny_run
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    train = Split(_Unreadable(), splits.train.labels, splits.train.names)
    got = evaluate_run(run_dir, Splits(train, splits.validation, splits.test, splits.class_names), quiet=True)
    assert set(got["accuracy_by_split"]) == {"validation", "test"}
    assert got["accuracy_by_split"]["test"] == evaluated["accuracy_by_split"]["test"]
    _assert_readable_png(run_dir / "tsne.png")


def test_evaluate_run_from_cached_features_runs_only_the_head(tiny_run, evaluated, tmp_path):
    run_dir, splits = tiny_run
    run_dir = shutil.copytree(run_dir, tmp_path / "run")
    for figure in run_dir.glob("*.png"):  # the figures checked below are this evaluation's
        figure.unlink()
    run = load_run(run_dir)
    features = {name: backbone_features(run.model, run.variables, getattr(splits, name).images[:])
                for name in ("train", "validation", "test")}
    expected = evaluated  # the same run folder evaluated on the images
    # Blank images: whatever the metrics say can only come from the features.
    blank = Splits(*(Split(np.zeros(s.images.shape, np.uint8), s.labels, s.names)
                     for s in (splits.train, splits.validation, splits.test)), splits.class_names)
    got = evaluate_run(run_dir, blank, quiet=True, features=features)
    assert got["accuracy_by_split"] == expected["accuracy_by_split"]
    assert got["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    for row, want in zip(got["test_predictions"], expected["test_predictions"], strict=True):
        assert row["predicted"] == want["predicted"]
        np.testing.assert_allclose(list(row["probabilities"].values()),
                                   list(want["probabilities"].values()), atol=1e-5)
    _assert_readable_png(run_dir / "gradcam.png")
    with pytest.raises(ValueError, match="features of the test split: 2 rows for 12 images"):
        evaluate_run(run_dir, splits, quiet=True, features={**features, "test": features["test"][:2]})


def _write_modes(folder, source):
    """The same X-ray saved as PNG in modes L, RGB, RGBA, P, I;16 and as a CMYK JPEG."""
    gray = Image.open(source).convert("L")
    paths = {}
    for mode in ("L", "RGB", "RGBA", "P"):
        paths[mode] = folder / f"xray_{mode}.png"
        gray.convert(mode).save(paths[mode])
    paths["I;16"] = folder / "xray_I16.png"
    Image.fromarray(np.asarray(gray, np.uint16) * 257).save(paths["I;16"])
    paths["CMYK"] = folder / "xray_cmyk.jpg"
    gray.convert("CMYK").save(paths["CMYK"], quality=95)
    return paths


def test_predict_any_image_mode_gives_probabilities(tiny_run, data_root, tmp_path):
    run_dir, splits = tiny_run
    run = load_run(run_dir)
    name = splits.test.names[0]
    source = data_root / "two" / "test" / "covid" / name
    paths = _write_modes(tmp_path, source)
    assert Image.open(paths["I;16"]).mode.startswith("I")
    probs = predict(run, [source, *paths.values()])
    assert probs.shape == (7, 2)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    # the original file decodes to the very pixels training saw
    np.testing.assert_allclose(probs[0], predict(run, splits.test.images[:1])[0], rtol=1e-6)
    for alone in (source, str(source)):  # one path alone is one image
        np.testing.assert_allclose(predict(run, alone), probs[:1], rtol=1e-6)
    # lossless gray modes (L, RGB, RGBA, P, 16-bit) are the same image after decoding
    for row in probs[2:6]:
        np.testing.assert_allclose(row, probs[1], rtol=1e-5)


def test_predict_cli_json_table_and_unreadable_file(tiny_run, data_root, tmp_path, capsys):
    run_dir, splits = tiny_run
    image = data_root / "two" / "test" / "normal" / splits.test.names[-1]
    assert predict_main(["--run", str(run_dir), "--json", str(image)]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["image"] == str(image) and set(row["probabilities"]) == set(BINARY)
    assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    assert row["predicted"] == max(row["probabilities"], key=row["probabilities"].get)
    assert predict_main(["--run", str(run_dir), str(image)]) == 0
    table = capsys.readouterr().out
    assert "covid" in table and "normal" in table and image.name in table
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    assert predict_main(["--run", str(run_dir), str(image), str(junk)]) == 1  # the image is still predicted
    assert str(junk) in capsys.readouterr().err


def test_predict_cli_json_lists_every_image_in_order_failures_included(tiny_run, data_root, tmp_path, capsys):
    run_dir, splits = tiny_run
    image = data_root / "two" / "test" / "normal" / splits.test.names[-1]
    junk, missing = tmp_path / "notes.png", tmp_path / "gone.jpeg"
    junk.write_text("not an image")
    assert predict_main(["--run", str(run_dir), "--json", str(junk), str(image), str(missing)]) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [row["image"] for row in rows] == [str(junk), str(image), str(missing)]
    assert set(rows[1]) == {"image", "probabilities", "predicted"} and set(rows[1]["probabilities"]) == set(BINARY)
    assert rows[0] == {"image": str(junk), "error": f"cannot read the image '{junk}': not an image by content"}
    assert rows[2] == {"image": str(missing), "error": f"cannot read the image '{missing}': no such file"}
    assert rows[0]["error"] in captured.err and rows[2]["error"] in captured.err
    # no readable image at all: still a JSON list, one error object per image
    assert predict_main(["--run", str(run_dir), "--json", str(missing)]) == 1
    assert json.loads(capsys.readouterr().out) == [rows[2]]


def test_predict_cli_takes_a_folder_as_the_images_under_it(tiny_run, data_root, tmp_path, capsys):
    import shutil

    run_dir, splits = tiny_run
    image = data_root / "two" / "test" / "normal" / splits.test.names[-1]
    folder = tmp_path / "scans"
    (folder / "b").mkdir(parents=True)
    for sub in (".ipynb_checkpoints", "__MACOSX"):
        (folder / sub).mkdir()
    for name in ("z.jpeg", "b/a.JPG", ".hidden.jpeg", "._z.jpeg", ".ipynb_checkpoints/z-checkpoint.jpeg",
                 "__MACOSX/z.jpeg"):
        shutil.copy(image, folder / name)
    (folder / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    assert predict_main(["--run", str(run_dir), "--json", str(folder), str(tmp_path / "empty")]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [row["image"] for row in rows] == [str(folder / "b" / "a.JPG"), str(folder / "z.jpeg"),
                                              str(tmp_path / "empty")]
    assert rows[0]["probabilities"] == rows[1]["probabilities"]
    assert rows[2]["error"] == (f"'{tmp_path / 'empty'}' is a folder without image files "
                                "(.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp)")


def test_evaluate_cli_reports_a_missing_run_folder(tmp_path, capsys):
    assert evaluate_main(["--run", str(tmp_path / "nope")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
