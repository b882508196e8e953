"""The data package: decoding every mode, the TFDS builder (folder, zip, strict / skipping),
the real dataset's counts, splits, batches, the audit and the CLI."""

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from PIL import Image

from csv_datasets import chexpert
from training_helpers import CountingImages
from xrayjax.data import (
    CHALLENGE_CLASSES, DataConfig, DataError, RecordImages, Split, batches, load_splits,
)
from xrayjax.data.__main__ import main
from xrayjax.data.audit import audit
from xrayjax.data.builder import BadImageWarning, class_names, prepare, prepared_builder, read_prepared
from xrayjax.data.decode import DECODER_VERSION, BadImage, NotAnImage, decode
from xrayjax.data.groups import group_key, source_groups
from xrayjax.data.dataset import open_dataset
from xrayjax.data.source import resolve_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = CHALLENGE_CLASSES["multiclass"]


def prepare_dir(data_dir, task=None, **kwargs):
    """Find, list and prepare ``data_dir`` as a run does; the builder."""
    with resolve_source(data_dir) as source:
        return prepare(source, source.listing(task), task=task, **kwargs)


def pixels(prepared) -> np.ndarray:
    """Every image of a prepared split, in its (label, name) order."""
    refs = np.stack([np.zeros_like(prepared.positions), prepared.positions], 1)
    return RecordImages([prepared.records], refs, 224)[:]


def prepared_dirs(tfds_dir) -> list:
    """The complete prepared datasets under a --tfds-dir."""
    return sorted(p.parent for p in tfds_dir.glob("xray_folders/*/*/dataset_info.json"))


def _image(mode: str, seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


# (mode, format) of every image kind the decoder must handle; a CMYK JPEG and an EXIF-rotated one.
KINDS = [("L", "JPEG"), ("LA", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"),
         ("I;16", "PNG"), ("CMYK", "JPEG"), ("RGB", "PNG")]


def _exif_rotated(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return _encode(_image("RGB", seed), "JPEG", exif=exif)


def make_dataset(root, truncated=True):
    """all/{train,test}/<4 classes>/ with every mode, junk files and (maybe) a truncated JPEG."""
    seed = 0
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in CLASSES:
            folder = root / "all" / split / cls
            folder.mkdir(parents=True)
            for _ in range(per_class):
                mode, fmt = KINDS[seed % len(KINDS)]
                ext = "jpg" if fmt == "JPEG" else "png"
                (folder / f"img{seed}_{mode.replace(';', '')}.{ext}").write_bytes(
                    _encode(_image(mode, seed), fmt))
                seed += 1
    (root / "all" / "train" / "covid" / "rotated.jpg").write_bytes(_exif_rotated(99))
    (root / "all" / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "all" / "test" / "normal" / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (root / "all" / "train" / "normal" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0" * 8)
    (root / "all" / "train" / "pneumonia_bac" / "notes.jpg").write_text("not an image at all")
    if truncated:
        data = _encode(_image("RGB", 7, (64, 64)), "JPEG")
        (root / "all" / "train" / "pneumonia_vir" / "broken.jpeg").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("small") / "Covid_Data_GradientCrescent")


@pytest.fixture(scope="session")
def real_tfds(tmp_path_factory, data_root):
    """The real dataset prepared once per session, by the CLI in a fresh process."""
    tfds_dir = tmp_path_factory.mktemp("tfds_real")
    proc = subprocess.run(
        [sys.executable, "-m", "xrayjax.data", "prepare", "--data-dir", str(data_root),
         "--tfds-dir", str(tfds_dir)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "269" in proc.stdout and "129" in proc.stdout
    assert "preparing 305 images" in proc.stderr and "Generating" not in proc.stderr  # no bars into a pipe
    # the challenge's two tasks; no multilabel copy (training refuses multilabel on class folders)
    assert sorted(p.name.split("-")[1] for p in (tfds_dir / "xray_folders").glob("[!.]*")) == ["binary", "multiclass"]
    return tfds_dir


@pytest.fixture(scope="session")
def real_splits(real_tfds, data_root):
    return load_splits(DataConfig(data_dir=str(data_root), tfds_dir=str(real_tfds)))


# --- decoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode,fmt", KINDS)
def test_decode_every_mode(mode, fmt):
    data = _encode(_image(mode, 3), fmt)
    gray, keep = decode(data, "gray"), decode(data, "keep")
    assert gray.shape == (224, 224, 1) and keep.shape == (224, 224, 3)
    assert gray.dtype == keep.dtype == np.uint8
    if mode not in ("I;16",):
        # keep = Keras' load_img: convert("RGB") then a nearest resize; gray = its luma.
        ref = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.NEAREST)
        np.testing.assert_array_equal(keep, np.asarray(ref))
        np.testing.assert_array_equal(gray[..., 0], np.asarray(ref.convert("L")))


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 3]], dtype=np.uint16)
    pixels = decode(_encode(Image.fromarray(values), "PNG"), "gray")
    np.testing.assert_array_equal(pixels[0, [0, 56, 112, 168], 0], [0, 100, 255, 3])


def test_sixteen_bit_resizes_as_its_eight_bit_twin():
    """PIL's nearest resize picks other source pixels in 16-bit modes (of a 1024 px image: a fifth
    of them): the data is scaled to 8 bits first, so the pixels equal the 8-bit file's."""
    eight = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)
    sixteen = _encode(Image.fromarray(eight.astype(np.uint16) * 257), "PNG")
    for color in ("gray", "keep"):
        np.testing.assert_array_equal(decode(sixteen, color), decode(_encode(Image.fromarray(eight), "PNG"), color))


def test_exif_orientation_is_applied():
    data = _exif_rotated(5)
    upright = np.asarray(Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270)
                         .resize((224, 224), Image.NEAREST))
    np.testing.assert_array_equal(decode(data, "keep"), upright)


def test_junk_and_truncated_are_told_apart():
    with pytest.raises(NotAnImage):
        decode(b"[.ShellClassInfo]\n", "gray")
    data = _encode(_image("RGB", 1, (64, 64)), "JPEG")
    with pytest.raises(BadImage):
        decode(data[: len(data) // 2], "gray")


# --- the builder on a generated folder ----------------------------------------------------

def test_strict_preparation_names_the_bad_file(small_root, tmp_path):
    with pytest.raises(DataError, match=r"broken\.jpeg.*--skip-bad-images"):
        prepare_dir(str(small_root), tfds_dir=str(tmp_path))
    assert prepared_dirs(tmp_path) == []


@pytest.mark.parametrize("kind, shape", [("folders", (224, 224, 1)), ("keep_320px", (320, 320, 3)),
                                         ("labels_file", (224, 224, 1))])
def test_records_read_by_protobuf_equal_tfds_own_decode(kind, shape, small_root, data_root, tmp_path):
    """Prepared records are written uncompressed, and their reads (the image alone per step;
    labels, names and patients once) give exactly what TFDS' decode of every feature gives:
    RGB at another size, and CheXpert's NaN and -1 labels too."""
    if kind != "labels_file":
        with pytest.warns(BadImageWarning, match="broken.jpeg"):
            builder = prepare_dir(str(small_root), tfds_dir=str(tmp_path), skip_bad_images=True, quiet=True,
                                  **({"color": "keep", "image_size": 320} if kind == "keep_320px" else {}))
    else:
        dataset = open_dataset(DataConfig(labels=str(chexpert(tmp_path / "csv", data_root))))
        builder = prepare(dataset.source, dataset.listing, tfds_dir=str(tmp_path), quiet=True)
        dataset.close()
    files = sorted(Path(builder.data_dir).glob("*.array_record-*"))
    assert len(files) == 2 and all("uncompressed" in ArrayRecordReader(str(f)).writer_options_string() for f in files)
    checked = 0
    for split, prepared in read_prepared(builder).items():
        decoded = builder.as_data_source(split)
        for i, position in enumerate(prepared.positions.tolist()):
            record = decoded[position]
            image = prepared.records[position]
            assert image.dtype == np.uint8 and image.shape == record["image"].shape == shape
            np.testing.assert_array_equal(image, record["image"])
            multilabel = kind == "labels_file"
            np.testing.assert_array_equal(prepared.labels[i], record["labels" if multilabel else "label"])
            assert prepared.names[i] == record["name"].decode()
            assert prepared.patients[i] == record["patient"].decode() if multilabel else not prepared.patients
            checked += 1
    assert checked == (24 if kind == "labels_file" else 21)
    with pytest.raises(IndexError):
        prepared.records[len(prepared.records)]


def test_skip_bad_images_counts_everything(small_root, tmp_path):
    with pytest.warns(BadImageWarning, match="broken.jpeg"):
        builder = prepare_dir(str(small_root), tfds_dir=str(tmp_path), skip_bad_images=True)
    meta = builder.info.metadata
    assert meta["bad_images"] == ["all/train/pneumonia_vir/broken.jpeg"]
    assert meta["not_images"] == ["all/train/pneumonia_bac/notes.jpg"]
    assert sorted(meta["junk"]) == ["all/test/normal/desktop.ini", "all/train/.DS_Store",
                                    "all/train/normal/Thumbs.db"]
    splits = read_prepared(builder)
    assert len(splits["train"].labels) == 13 and len(splits["test"].labels) == 8
    assert np.bincount(splits["train"].labels).tolist() == [4, 3, 3, 3]
    gray = pixels(splits["train"])
    assert gray.shape == (13, 224, 224, 3)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    # No TensorFlow behind any of it.
    assert "tensorflow" not in sys.modules


def test_zip_gives_the_same_data_as_the_folder(small_root, tmp_path):
    archive = tmp_path / "Covid_Data_GradientCrescent.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(small_root.rglob("*")):
            if path.is_file():
                zf.write(path, "Covid_Data_GradientCrescent/" + path.relative_to(small_root).as_posix())
    # binary reads covid and normal only: the truncated pneumonia_vir file is not in its way.
    from_zip = read_prepared(prepare_dir(str(archive), tfds_dir=str(tmp_path / "z"), task="binary"))
    from_dir = read_prepared(prepare_dir(str(small_root.parent), tfds_dir=str(tmp_path / "d"), task="binary"))
    for split in ("train", "test"):
        assert from_zip[split].names == from_dir[split].names
        np.testing.assert_array_equal(pixels(from_zip[split]), pixels(from_dir[split]))
    # binary without two/ takes covid and normal from all/.
    assert np.bincount(from_zip["train"].labels).tolist() == [4, 3]
    assert str(resolve_source(tmp_path)).startswith("zip ")


def test_gray_and_keep_are_different_prepared_data(tmp_path):
    root = make_dataset(tmp_path / "data", truncated=False)
    gray = prepare_dir(str(root), color="gray", tfds_dir=str(tmp_path / "t"))
    keep = prepare_dir(str(root), color="keep", tfds_dir=str(tmp_path / "t"))
    assert gray.data_dir != keep.data_dir
    g, k = pixels(read_prepared(gray)["train"]), pixels(read_prepared(keep)["train"])
    assert g.shape == k.shape
    assert not np.array_equal(g, k)
    assert np.any(k[..., 0] != k[..., 1]) and np.array_equal(g[..., 0], g[..., 1])


def test_prepared_data_is_keyed_by_the_files_and_the_decoder(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", truncated=False)
    tfds_dir = tmp_path / "t"

    def prepared() -> str:
        return prepare_dir(str(root), tfds_dir=str(tfds_dir), task="binary").data_dir

    first = prepared()
    (root / "all" / "train" / ".DS_Store").write_bytes(b"junk changes nothing")
    (root / "all" / "extra_notes").mkdir()
    assert prepared() == first and len(prepared_dirs(tfds_dir)) == 1
    added = root / "all" / "test" / "covid" / "extra.png"
    added.write_bytes(_encode(_image("L", 1), "PNG"))
    second = prepared()
    assert second != first and len(read_prepared(prepare_dir(str(root), tfds_dir=str(tfds_dir), task="binary"))
                                    ["test"].labels) == 5
    os.utime(added, ns=(1, 10**18))  # the same bytes, touched: prepared again
    third = prepared()
    assert third not in (first, second)
    monkeypatch.setattr("xrayjax.data.builder.DECODER_VERSION", DECODER_VERSION + 1)
    assert prepared() not in (first, second, third)
    assert len(prepared_dirs(tfds_dir)) == 4


# --- the real dataset ---------------------------------------------------------------------

def test_real_counts_and_stratified_validation(real_splits, real_tfds, data_root):
    s = real_splits
    assert (len(s.train), len(s.validation), len(s.test)) == (215, 54, 36)
    assert np.bincount(s.validation.labels).tolist() == [12, 14, 14, 14]
    assert np.bincount(s.test.labels).tolist() == [9, 9, 9, 9]
    assert not set(s.train.names) & set(s.validation.names)
    assert s.class_names == CLASSES and s.train.images.dtype == np.uint8
    assert isinstance(s.train.images, RecordImages)  # streamed from the record files, not in memory
    binary = load_splits(DataConfig(task="binary", data_dir=str(data_root),
                                    tfds_dir=str(real_tfds), image_size=32))
    assert (len(binary.train), len(binary.validation), len(binary.test)) == (103, 26, 18)
    assert binary.train.images.shape[1:] == (32, 32, 3)
    other_seed = load_splits(DataConfig(data_dir=str(data_root), tfds_dir=str(real_tfds), seed=1))
    assert set(other_seed.validation.names) != set(s.validation.names)


def test_no_tensorflow_after_preparing_and_loading(real_tfds, data_root):
    code = (
        "import sys; from xrayjax.data import DataConfig, load_splits; "
        f"s = load_splits(DataConfig(data_dir={str(data_root)!r}, tfds_dir={str(real_tfds)!r})); "
        "assert len(s.test) == 36; assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_batches_cover_the_test_set_once(real_splits):
    test = real_splits.test
    every = test.images[:]
    assert np.array_equal(every[..., 0], every[..., 2])  # gray, broadcast to RGB when indexed
    every = every[..., :1]
    seen = []
    out = list(batches(test, 16, 4, shuffle=True, seed=3))
    assert len(out) == 3
    for batch in out:  # gray batches keep their one channel (the device broadcasts it)
        assert batch["image"].shape == (4, 4, 224, 224, 1) and batch["label"].shape == (4, 4)
        mask = batch["mask"].reshape(-1).astype(bool)
        images = batch["image"].reshape(16, -1)
        assert not images[~mask].any()
        for img, label in zip(images[mask], batch["label"].reshape(-1)[mask]):
            index = [i for i in range(len(test)) if np.array_equal(every[i].reshape(-1), img)]
            assert len(index) >= 1 and test.labels[index[0]] == label
            seen.append(index[0])
    assert sorted(seen) == list(range(36))
    assert sum(b["mask"].sum() for b in out) == 36
    with pytest.raises(ValueError, match="multiple of num_devices"):
        next(batches(test, 6, 4, shuffle=False))


def test_worker_processes_give_the_thread_s_batches_in_its_order(real_splits):
    # Two epochs of the real test split, from step 1 of the first: two grain worker processes
    # (each reading every other step of the prepared records) give the reader thread's batches.
    test = real_splits.test
    kw = dict(shuffle=True, seed=3, epochs=[4, 5], start=1)
    thread = list(batches(test, 16, 4, **kw))
    workers = list(batches(test, 16, 4, workers=2, **kw))
    assert len(thread) == len(workers) == 5
    for a, b in zip(thread, workers):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    one_by_one = [*list(batches(test, 16, 4, shuffle=True, seed=3, epochs=[4]))[1:],
                  *batches(test, 16, 4, shuffle=True, seed=3, epochs=[5])]  # the stream is the epochs in turn
    for a, b in zip(thread, one_by_one, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


# --- audit --------------------------------------------------------------------------------

def test_group_keys():
    assert group_key("nejmoa2001191_f1-PA.jpeg") == group_key("nejmoa2001191_f4.jpeg")
    assert group_key("ryct.2020200034.fig5-day0.jpeg") == group_key("ryct.2020200034.fig2.jpeg")
    assert group_key("person1940_bacteria_4859.jpeg") == "person1940"
    assert group_key("NORMAL2-IM-1345-0001-0002.jpeg") == "IM-1345"
    assert group_key("covid-19-pneumonia-15-PA.jpg") != group_key("covid-19-pneumonia-12.jpg")


def test_audit_finds_planted_duplicates(tmp_path, capsys):
    root = make_dataset(tmp_path / "data")
    src = root / "all" / "train" / "covid" / "img0_L.jpg"
    shutil.copy(src, root / "all" / "test" / "covid" / "copy.jpg")
    base = _image("L", 42, (96, 96)).resize((12, 12)).resize((96, 96), Image.BILINEAR)
    base.save(root / "all" / "train" / "normal" / "near_a.png")
    base.resize((90, 90), Image.BILINEAR).save(root / "all" / "test" / "normal" / "near_b.png")
    report = audit(str(root))
    assert report["exact_duplicates"] == [{
        "files": ["all/test/covid/copy.jpg", "all/train/covid/img0_L.jpg"],
        "scope": "across test/train", "labels_differ": False}]
    assert [d["files"] for d in report["near_duplicates"]] == [
        ["all/test/normal/near_b.png", "all/train/normal/near_a.png"]]
    assert [u["file"].endswith("broken.jpeg") for u in report["unreadable"]] == [True]
    assert report["not_images"] == ["all/train/pneumonia_bac/notes.jpg"]
    assert len(report["junk"]) == 3
    assert main(["audit", "--data-dir", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["test"]["covid"] == 3


def test_audit_of_the_real_data(data_root):
    report = audit(str(data_root))
    assert report["counts"]["train"] == {"covid": 59, "normal": 70, "pneumonia_bac": 70, "pneumonia_vir": 70}
    assert report["modes"]["covid"] == {"L": 4, "RGB": 54, "RGBA": 10}
    assert report["exact_duplicates"] == [] and report["two_not_copies_of_all"] == []
    assert len(report["junk"]) == 4
    groups = {g["group"]: g for g in report["name_groups_across_splits"]}
    assert groups["nejmoa2001191"]["splits"]["train"] == ["covid/nejmoa2001191_f1-PA.jpeg"]
    assert len(groups["nejmoa2001191"]["splits"]["test"]) == 3
    assert report["shortcuts"]["colour mode"]["warning"]  # the colour-mode shortcut of the README
    assert [d["scope"] for d in report["near_duplicates"]] == ["within train"]


def test_a_prepared_folder_is_read_without_the_dataset(real_tfds, tmp_path, monkeypatch):
    # The GPU check carries the prepared data, not the dataset: the folder prepare printed (or its
    # config folder) is read as it is. Without the default dataset nothing prepared is guessed.
    version = next(real_tfds.glob("xray_folders/covid_xray-multiclass-*/1.0.0"))
    for folder in (version, version.parent):
        builder = prepared_builder(folder)
        assert class_names(builder) == CLASSES and len(read_prepared(builder)["train"].labels) == 269
    assert prepared_builder(real_tfds) is None and prepared_builder(version.parent.parent) is None
    monkeypatch.setattr("xrayjax.data.source.REPO_DATA_DIR", tmp_path / "no_dataset_here")
    with pytest.raises(DataError, match=r"no dataset at the default location .*: pass --data-dir PATH"):
        load_splits(DataConfig(tfds_dir=str(real_tfds)))


def test_group_by_source_warns_about_the_given_test_split_and_never_moves_it(real_splits, real_tfds, data_root):
    from xrayjax.data.splits import SourceLeakWarning

    with pytest.warns(SourceLeakWarning, match=r"test split given as a folder shares 1 source group\(s\) with "
                                               r"train: nejmoa2001191\."):
        s = load_splits(DataConfig(data_dir=str(data_root), tfds_dir=str(real_tfds), group_by="source"))
    assert s.test.names == real_splits.test.names  # the test folder is the test split, as given
    train, validation = set(source_groups(s.train.names)), set(source_groups(s.validation.names))
    assert not train & validation and len(s.train) + len(s.validation) == 269
    assert 0.15 < len(s.validation) / 269 < 0.25
    assert np.bincount(s.validation.labels).min() >= 10  # still stratified


def test_a_process_reads_only_its_devices_rows_of_each_batch():
    # 10 images in global batches of 4 over 4 devices: the last batch is half padding. Devices
    # 1 and 3 (a process's share) get exactly their rows of the global batches, and only those
    # images are read: 5 of 10.
    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    split = Split(images, np.arange(10, dtype=np.int32), tuple(map(str, range(10))))
    whole = list(batches(split, 4, 4, shuffle=True, seed=3, epochs=[1]))
    counted = Split(CountingImages(images), split.labels, split.names)
    mine = list(batches(counted, 4, 4, shuffle=True, seed=3, epochs=[1], shards=[1, 3]))
    assert len(mine) == len(whole) == 3
    for global_batch, local in zip(whole, mine):
        for key in ("image", "label", "mask"):
            assert np.array_equal(local[key], global_batch[key][[1, 3]]), key
    assert counted.images.read == int(sum(b["mask"].sum() for b in mine)) == 5
