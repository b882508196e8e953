"""Any class-folder dataset (issue 13): the layouts, class names from folders, splits held out
when a folder is missing, every format, the errors for bad layouts (writing nothing), heads for
any number of classes, and a 3-class dataset made of the real X-rays trained end to end."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from xrayjax.config import TrainConfig
from xrayjax.data import DataConfig, DataError, RecordImages, Split, load_splits, open_dataset
from xrayjax.data.audit import audit
from xrayjax.data.splits import resize_nearest
from xrayjax.predict import load_image
from xrayjax.data.source import resolve_source
from xrayjax.models import create_head

from conftest import REPO

FORMATS = {".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".tiff": "TIFF", ".webp": "WEBP"}


def _write(path, seed, mode="L", size=(48, 40), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt or FORMATS[path.suffix.lower()])
    path.write_bytes(buf.getvalue())


def make(root, counts, suffixes=(".png",), mode="L"):
    """counts: {relative class folder: n images}; image i of a folder gets suffix i % len(suffixes)."""
    seed = 0
    for folder, n in counts.items():
        for i in range(n):
            suffix = suffixes[i % len(suffixes)]
            _write(root / folder / f"{folder.replace('/', '_')}_{i}{suffix}", seed, mode)
            seed += 1
    return root


def _splits(root, tmp_path, **kw):
    return load_splits(DataConfig(data_dir=str(root), tfds_dir=str(tmp_path / "tfds"), image_size=32, **kw))


def _per_class(split):
    return np.bincount(split.labels, minlength=3).tolist()


# --- layouts ------------------------------------------------------------------------------

def test_split_folders_with_val_and_test(tmp_path):
    root = make(tmp_path / "d", {"train/Zebra": 4, "train/apple": 3, "train/Mango": 5, "valid/apple": 2,
                                 "valid/Mango": 1, "test/Zebra": 2, "test/apple": 1})
    (root / "train" / "Mango" / "notes.txt").write_text("junk")
    s = _splits(root, tmp_path)
    assert s.class_names == ("Mango", "Zebra", "apple")  # Keras' order: Python's sorted
    assert (_per_class(s.train), _per_class(s.validation), _per_class(s.test)) == ([5, 4, 3], [1, 0, 2], [0, 2, 1])
    assert isinstance(s.train.images, RecordImages) and s.train.images[:2].shape == (2, 32, 32, 3)
    # the val/ folder is the validation split: --val-fraction does not apply
    assert _per_class(_splits(root, tmp_path, val_fraction=0.5).train) == [5, 4, 3]


def test_train_only_holds_out_test_fixed_and_validation_by_seed(tmp_path):
    root = make(tmp_path / "d", {"train/a": 10, "train/b": 10, "train/c": 5})
    s0, s1 = _splits(root, tmp_path, seed=0), _splits(root, tmp_path, seed=1)
    assert _per_class(s0.test) == [2, 2, 1] and _per_class(s0.validation) == [2, 2, 1]
    assert _per_class(s0.train) == [6, 6, 3]
    assert s0.test.names == s1.test.names  # the test split never moves with --seed
    assert set(s0.validation.names) != set(s1.validation.names)
    assert not {*s0.train.names} & {*s0.validation.names, *s0.test.names}
    no_test = _splits(root, tmp_path, test_fraction=0.0)
    assert len(no_test.test) == 0 and len(no_test.train) + len(no_test.validation) == 25


def test_flat_class_folders_every_format(tmp_path):
    root = make(tmp_path / "d", {"cats": 6, "dogs": 6}, suffixes=tuple(FORMATS))
    _write(root / "dogs" / "UPPER.JPG", 99, fmt="JPEG")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\0")
    (root / "README.md").write_text("about the data")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"ignored")
    listing = resolve_source(root).listing()
    assert listing.layout == "class folders" and listing.class_names == ("cats", "dogs")
    assert len(listing.files) == 13 and sorted(listing.junk) == ["README.md", "dogs/.DS_Store"]
    assert listing.ignored == (".cache",)
    s = _splits(root, tmp_path, val_fraction=0.25, test_fraction=0.25)
    assert (len(s.train), len(s.validation), len(s.test)) == (7, 2, 4)  # round(6 or 7 x 0.25) per class
    assert sorted(n.rsplit(".", 1)[1] for n in s.train.names + s.validation.names + s.test.names) == sorted(
        [s[1:] for s in FORMATS] * 2 + ["JPG"])


def test_zip_of_a_class_folder_dataset(tmp_path):
    root = make(tmp_path / "mydata", {"train/a": 3, "train/b": 3, "test/a": 1, "test/b": 1})
    shutil.make_archive(str(tmp_path / "mydata"), "zip", tmp_path, "mydata")
    from_zip = _splits(tmp_path / "mydata.zip", tmp_path / "z")
    from_dir = _splits(root, tmp_path / "f")
    assert from_zip.test.names == from_dir.test.names
    np.testing.assert_array_equal(from_zip.test.images[:], from_dir.test.images[:])
    make(tmp_path / "flat", {"a": 3, "b": 3})  # a zip with the entry of its top folder
    shutil.make_archive(str(tmp_path / "flat"), "zip", tmp_path, "flat")
    assert resolve_source(tmp_path / "flat.zip").listing().class_names == ("a", "b")


def test_streamed_images_equal_the_decoded_files(tmp_path):
    root = make(tmp_path / "d", {"train/a": 3, "train/b": 3, "test/a": 2, "test/b": 2}, mode="RGB")
    s = load_splits(DataConfig(data_dir=str(root), tfds_dir=str(tmp_path / "t"), color="keep", val_fraction=0))
    joined = Split.concat([s.train, s.test])
    assert len(joined) == 10 and joined.names == s.train.names + s.test.names
    for row, name in enumerate(joined.names):
        folder = "train" if row < 6 else "test"
        path = next(root.glob(f"{folder}/*/{name}"))
        expected = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.NEAREST))
        np.testing.assert_array_equal(joined.images[row], expected)
    np.testing.assert_array_equal(joined.take(np.array([7, 1])).images[:], joined.images[np.array([7, 1])])



def test_sizes_above_224_are_prepared_at_that_size(tmp_path):
    """--image-size 320 reads the files at 320 px (their own detail, not 224-px pixels enlarged),
    from data prepared under a key of its own; sizes up to 224 share the 224-px preparation."""
    root = tmp_path / "d"
    for i, folder in enumerate(["train/a", "train/b", "test/a", "test/b"]):
        _write(root / folder / f"{i}.png", i, size=(400, 360))
    large = load_splits(DataConfig(data_dir=str(root), tfds_dir=str(tmp_path / "t"), val_fraction=0, image_size=320))
    small = load_splits(DataConfig(data_dir=str(root), tfds_dir=str(tmp_path / "t"), val_fraction=0, image_size=32))
    prepared = sorted(p.name for p in (tmp_path / "t" / "xray_folders").glob("[!.]*"))  # not the locks
    assert len(prepared) == 2 and sum("-320px-" in name for name in prepared) == 1, prepared
    for row, name in enumerate(large.test.names):
        path = next(root.glob(f"test/*/{name}"))
        gray = np.asarray(Image.open(path).convert("RGB").convert("L").resize((320, 320), Image.NEAREST))
        np.testing.assert_array_equal(large.test.images[row], np.repeat(gray[..., None], 3, -1))
        at_224 = np.asarray(Image.open(path).convert("RGB").convert("L").resize((224, 224), Image.NEAREST))
        assert not np.array_equal(large.test.images[row][..., 0], resize_nearest(at_224[None, ..., None], 320)[0, ..., 0])
    assert small.test.images[:].shape == (2, 32, 32, 3)
    for row, name in enumerate(large.test.names):  # predict reads a file as training read it
        np.testing.assert_array_equal(load_image(next(root.glob(f"test/*/{name}")), "gray", 320),
                                      large.test.images[row])
    # a run that recorded 224-px data (before sizes existed) is read from it again, not re-prepared
    again = load_splits(DataConfig(data_dir=str(root), tfds_dir=str(tmp_path / "t"), val_fraction=0, image_size=320),
                        recorded=small.record())
    assert again.data_key == small.data_key
    folder = next(p for p in (tmp_path / "t" / "xray_folders").glob("[!.]*") if "px-" not in p.name)
    with pytest.raises(DataError, match="holds 224-px images; --image-size 320 needs them prepared at 320 px"):
        load_splits(DataConfig(data_dir=str(folder), image_size=320))  # would enlarge: refused


# --- errors: each names the folder, and nothing is written ----------------------------------

@pytest.mark.parametrize("counts,extra,message", [
    ({"train/a": 2, "train/b": 0}, None, r"train/b: a class folder with no images"),
    ({"train/a": 3}, None, r"holds a single class \(a\)"),
    ({"a": 3}, None, r"holds a single class \(a\)"),
    ({"train/a": 2, "train/b": 2, "test/c": 1}, None, r"test/c: class 'c' is in test but not in train"),
    ({"train/a": 2, "train/b": 2, "val/z": 1}, None, r"val/z: class 'z' is in validation but not in train"),
    ({"train/a": 2, "train/b": 2}, "train/x.png", r"train/x.png: an image beside the split or class folders"),
    ({"a": 2, "b": 2}, "x.png", r"x.png: an image beside the split or class folders"),
    ({"test/a": 1}, "train/", r"train holds no class folders \(train/ is empty\)"),
    ({"train/a": 2, "train/b": 2}, "val/", r"val holds no class folders: add them, or remove the folder"),
    ({"training/a": 2, "training/b": 2, "testing/a": 1}, None, r"holds testing/, training/ but no train/ folder"),
])
def test_bad_layouts_are_clear_errors_and_write_nothing(tmp_path, counts, extra, message, capsys):
    root = make(tmp_path / "d", {k: v for k, v in counts.items() if v})
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
    if extra and extra.endswith("/"):
        (root / extra).mkdir(parents=True)
    elif extra:
        _write(root / extra, 5)
    with pytest.raises(DataError, match=message):
        _splits(root, tmp_path)
    from xrayjax.data.__main__ import main

    from xrayjax.train import main as train_main

    assert main(["prepare", "--data-dir", str(root), "--tfds-dir", str(tmp_path / "tfds")]) == 2
    capsys.readouterr()
    assert train_main(["--data-dir", str(root), "--init", "random", "--tfds-dir", str(tmp_path / "tfds"),
                       "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "tfds").rglob("*.array_record*"))


def test_a_bad_layout_is_one_line_from_the_command_line(tmp_path):
    root = make(tmp_path / "d", {"train/a": 3})
    run = subprocess.run([sys.executable, "-m", "xrayjax.train", "--data-dir", str(root), "--init", "random",
                          "--tfds-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        f"error: {root / 'train'} holds a single class (a): a classifier needs at least 2 class folders. Expected "
        "<split>/<class>/<images> (train/ required; val/ and test/ optional) or <class>/<images>, with at least 2 "
        "class folders."]


# --- heads and the task from the data -----------------------------------------------------

def test_impossible_folds_stop_before_training(tmp_path, capsys):
    from xrayjax.train import main as train_main

    root = make(tmp_path / "d", {"train/a": 6, "train/b": 2, "test/a": 1, "test/b": 1})
    assert train_main(["--data-dir", str(root), "--init", "random", "--tfds-dir", str(tmp_path / "tfds"), "--out",
                       str(tmp_path / "run"), "--folds", "3", "--image-size", "32", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: --folds 3: the smallest class has 2 image(s); pass --folds 2 or fewer"
    assert not (tmp_path / "run").exists() and "epoch" not in err


def test_task_and_head_follow_the_number_of_classes():
    assert TrainConfig(arch="vgg16").resolved(("a", "b")).task == "binary"
    three = TrainConfig(arch="vgg16").resolved(("a", "b", "c"))
    assert three.task == "multiclass" and three.l2 == 0.0 and three.out.endswith("vgg16_multiclass")
    assert TrainConfig(arch="vgg19").resolved(("a", "b", "c")).l2 == 1e-3  # the report's presets
    with pytest.raises(ValueError, match="--task binary needs 2 classes; the data has 3"):
        TrainConfig(task="binary").resolved(("a", "b", "c"))
    assert create_head("vgg16", "four_class", num_classes=3).outputs == 3
    assert create_head("resnet50", "four_class").outputs == 4 and create_head("vgg16", "binary").outputs == 1
    with pytest.raises(ValueError, match="binary head classifies 2 classes"):
        create_head("vgg16", "binary", num_classes=3)


def test_audit_of_any_dataset(tmp_path):
    root = make(tmp_path / "d", {"train/gray": 12, "test/gray": 3})
    make(root, {"train/rgb": 12, "test/rgb": 3}, mode="RGB")
    shutil.copy(next((root / "train" / "gray").glob("*")), root / "test" / "gray" / "leak.png")
    report = audit(str(root))
    assert report["class_names"] == ["gray", "rgb"] and report["layout"] == "split folders"
    assert report["counts"] == {"train": {"gray": 12, "rgb": 12}, "test": {"gray": 4, "rgb": 3}}
    assert [d["scope"] for d in report["exact_duplicates"]] == ["across test/train"]
    assert report["shortcuts"]["colour mode"] == {"accuracy": 1.0, "baseline": 0.516, "warning": True}
    assert not report["shortcuts"]["image size"]["warning"]  # every image is 48x40


# --- end to end: three classes of real X-rays ---------------------------------------------

@pytest.fixture(scope="module")
def three_classes(data_root, tmp_path_factory):
    """COVID / NORMAL / PNEUMONIA (bacterial and viral merged), 4 train and 2 test images each."""
    root = tmp_path_factory.mktemp("three") / "xrays"
    for split, n in (("train", 4), ("test", 2)):
        for target, sources in (("COVID", ["covid"]), ("NORMAL", ["normal"]),
                                ("PNEUMONIA", ["pneumonia_bac", "pneumonia_vir"])):
            (root / split / target).mkdir(parents=True)
            for cls in sources:
                for image in sorted((data_root / "all" / split / cls).glob("*.jp*g"))[:n // len(sources)]:
                    shutil.copy(image, root / split / target / image.name)
    return root


def test_three_classes_train_end_to_end(three_classes, tmp_path, capsys):
    # the training and prediction commands' main(argv), as `python -m` runs them
    from xrayjax.predict import main as predict_main
    from xrayjax.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--arch", "vgg16", "--init", "random", "--data-dir", str(three_classes), "--tfds-dir",
                       str(tmp_path / "tfds"), "--out", str(out), "--image-size", "32", "--epochs", "2",
                       "--batch-size", "4", "--val-fraction", "0.25"]) == 0, capsys.readouterr().err[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"] and config["config"]["task"] == "multiclass"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["COVID", "NORMAL", "PNEUMONIA"]
    assert set(metrics["per_class"]) == {"COVID", "NORMAL", "PNEUMONIA"} and len(metrics["test_predictions"]) == 6
    assert "PNEUMONIA" in capsys.readouterr().out
    image = next((three_classes / "test" / "NORMAL").glob("*"))
    assert predict_main(["--run", str(out), "--json", str(image)]) == 0, capsys.readouterr().err[-2000:]
    assert set(json.loads(capsys.readouterr().out)[0]["probabilities"]) == {"COVID", "NORMAL", "PNEUMONIA"}
    dataset = open_dataset(DataConfig(data_dir=str(three_classes)))
    dataset.close()
    assert dataset.class_names == ("COVID", "NORMAL", "PNEUMONIA")
