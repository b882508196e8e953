"""Labels-file datasets (ChestX-ray14, CheXpert, the COVID-19 image data collection, a generic
CSV): each format's quirks, splits by patient, missing images, the masked loss, and a round trip
through train, evaluate and predict."""

import contextlib
import io
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from csv_datasets import chestxray14, chexpert, covid_chestxray, generic, write_csv
from xrayjax.data import DataConfig, DataError, load_splits, open_dataset
from xrayjax.data.builder import BadImageWarning
from xrayjax.data.csv_images import MissingImagesWarning
from xrayjax.data.csv_labels import FORMATS, read_labels, resolve_uncertain
from xrayjax.data.splits import Split, SplitWarning, split_folds
from xrayjax.steps import build_step_model, head_loss


@pytest.fixture(scope="module")
def nih(data_root, tmp_path_factory) -> pathlib.Path:
    return chestxray14(tmp_path_factory.mktemp("nih"), data_root)


def test_chestxray14_no_finding_is_no_label_and_the_official_lists_are_the_split(nih):
    table = read_labels(nih)
    assert table.format == "chestxray14"
    assert table.label_names == ("Consolidation", "Infiltration", "Pneumonia")  # No Finding left out
    normal = [i for i, p in enumerate(table.paths) if 6 <= int(p[:8]) < 12]  # the normal images
    assert np.all(table.labels[normal] == 0) and not np.isnan(table.labels).any()
    test_list = (nih.parent / "test_list.txt").read_text().split()
    assert sorted(p for p, s in zip(table.paths, table.splits) if s == "test") == sorted(test_list)
    assert {s for s in table.splits} == {"train", "test"}
    pa = read_labels(nih, views=["PA"])
    assert len(pa.paths) == 12 and pa.left_out == {"view": 12}
    assert read_labels(nih, views=["pa"]).paths == pa.paths  # views compare in any case


def test_chexpert_blanks_uncertain_no_finding_valid_and_views(data_root, tmp_path):
    table = read_labels(chexpert(tmp_path, data_root))
    assert table.format == "chexpert" and len(table.label_names) == 13 and "No Finding" not in table.label_names
    col = {n: i for i, n in enumerate(table.label_names)}
    rows = {p: r for p, r in zip(table.paths, table.labels)}
    covid = rows["CheXpert-v1.0-small/train/patient00000/study1/view1_frontal.jpg"]
    assert covid[col["Consolidation"]] == 1 and covid[col["Pneumonia"]] == 1 and np.isnan(covid[col["Edema"]])
    normal = rows["CheXpert-v1.0-small/train/patient00006/study1/view1_frontal.jpg"]
    devices = col["Support Devices"]
    assert np.all(np.delete(normal, devices) == 0)  # No Finding = 1 makes the others 0, blanks included,
    assert np.isnan(normal[devices])  # but not Support Devices: its blank stays unknown
    viral = rows["CheXpert-v1.0-small/train/patient00018/study1/view1_frontal.jpg"]
    assert viral[col["Pneumonia"]] == -1  # uncertain, until --uncertain resolves it
    assert [resolve_uncertain(viral[None], m)[0, col["Pneumonia"]] for m in ("zeros", "ones")] == [0, 1]
    assert np.isnan(resolve_uncertain(viral[None], "ignore")[0, col["Pneumonia"]])
    assert {p.split("/")[1] for p, s in zip(table.paths, table.splits) if s == "test"} == {"valid"}
    assert dict(zip(table.paths, table.patients))[
        "CheXpert-v1.0-small/valid/patient00003/study1/view1_lateral.jpg"] == "patient00003"
    frontal = read_labels(table.csv, views=["AP"])
    assert frontal.left_out == {"view": 12} and all("frontal" in p for p in frontal.paths)


def test_chexpert_no_finding_keeps_a_support_device(tmp_path):
    """TorchXRayVision's CheX_Dataset: a healthy patient may carry a device."""
    header = ["Path", "Frontal/Lateral", "AP/PA", "No Finding", "Edema", "Support Devices"]
    rows = [["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "1.0", "1.0", "1.0"],
            ["CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", "1.0", "", "0.0"]]
    table = read_labels(write_csv(tmp_path / "train.csv", header, rows))
    assert table.label_names == ("Edema", "Support Devices")
    assert table.labels.tolist() == [[0.0, 1.0], [0.0, 0.0]]


@pytest.mark.parametrize("early", [False, True], ids=["today", "early-2020"])
def test_covid_collection_both_finding_spellings_and_ct_rows(data_root, tmp_path, early):
    table = read_labels(covid_chestxray(tmp_path, data_root, early=early))
    assert table.format == "covid-chestxray" and table.left_out == {"modality": 2}
    assert len(table.paths) == 24 and all(p.startswith("images/") for p in table.paths)
    expected = ("ARDS", "Bacterial", "COVID-19", "Pneumonia", "Viral") if early else (
        "Bacterial", "COVID-19", "Pneumonia", "Viral")
    assert table.label_names == expected
    covid = table.labels[0]
    assert [n for n, v in zip(expected, covid) if v == 1] == (["ARDS", "COVID-19"] if early else
                                                             ["COVID-19", "Pneumonia", "Viral"])


@pytest.mark.parametrize("joined", [False, True], ids=["columns", "joined"])
def test_generic_csv_columns_or_joined_labels(data_root, tmp_path, joined):
    table = read_labels(generic(tmp_path, data_root, joined=joined))
    assert table.format == "generic" and table.patients[:3] == ("p0", "p0", "p1")
    if joined:
        assert table.label_names == ("Consolidation", "Infiltration", "Pneumonia")
    else:
        assert table.label_names == ("Consolidation", "Pneumonia")
        assert np.isnan(table.labels[18:, 1]).all() and not np.isnan(table.labels[:18]).any()  # blanks


@pytest.mark.parametrize("header,values", [(["path", "labels", "Patient_ID"], ["Pneumonia", ""]),
                                           (["path", "Pneumonia", "Patient ID"], ["1", "0"])],
                         ids=["joined", "columns"])
def test_generic_patient_column_in_a_common_spelling_is_the_patient(tmp_path, header, values):
    """Neither read as a label nor ignored: a patient's images would be split apart."""
    table = read_labels(write_csv(tmp_path / "x.csv", header, [["a.png", values[0], "p7"], ["b.png", values[1], "p8"]]))
    assert table.patients == ("p7", "p8") and table.label_names == ("Pneumonia",)
    assert table.labels.tolist() == [[1.0], [0.0]]
    both = write_csv(tmp_path / "y.csv", ["path", "labels", "patient", "PatientID"], [["a.png", "1", "p7", "7"]])
    with pytest.raises(DataError, match=f"^{both}: the columns 'patient', 'PatientID' each name the patient; "
                                        "keep one$"):
        read_labels(both)


def test_an_unknown_csv_names_every_format_and_writes_nothing(tmp_path):
    (tmp_path / "x.csv").write_text("file,diagnosis\na.png,covid\n")
    with pytest.raises(DataError) as err:
        load_splits(DataConfig(labels=str(tmp_path / "x.csv"), tfds_dir=str(tmp_path / "tfds")))
    assert "unrecognised labels file" in str(err.value)
    assert all(name in str(err.value) and cols[0] in str(err.value) for name, cols in FORMATS.items())
    assert not (tmp_path / "tfds").exists()


def test_an_empty_csv_or_a_short_row_is_one_line_naming_the_file_and_line(nih, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=f"^--labels {empty} is empty: a labels file starts with its header row$"):
        read_labels(empty)
    lines = nih.read_text().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join([*lines[:3], ",".join(lines[3].split(",")[:2]), *lines[4:]]) + "\n")
    with pytest.raises(DataError, match=f"^--labels {short}, line 4: 2 fields, but the header has 7; complete or "
                                        "remove that row$"):
        read_labels(short)
    trailing = tmp_path / "trailing.csv"  # a header ending in a comma names an empty column the rows lack
    trailing.write_text("\n".join([lines[0] + ",", *lines[1:]]) + "\n")
    assert read_labels(trailing).paths == read_labels(nih).paths


@pytest.mark.parametrize("header,rows,views,message", [
    (["Path", "Frontal/Lateral", "AP/PA", "No Finding", "Edema", "Date"],
     [["p.jpg", "Frontal", "PA", "", "1.0", "2019-01-01"]], None,
     "row 2, column 'Date': label value '2019-01-01'; expected 1, 0, -1 (uncertain) or blank (unknown). Every column "
     "after 'AP/PA' is read as an observation: drop column 'Date' if it is not one"),
    (["path", "view", "Pneumonia", "age"], [["a.png", "AP", "1", "60"], ["b.png", "PA", "0", "54"]], ["PA"],
     "row 3, column 'age': label value '54'; expected 1, 0, -1 (uncertain) or blank (unknown). Every column other "
     "than path, patient and view is read as a label: drop column 'age' if it is not one")],
    ids=["chexpert", "generic"])
def test_a_column_that_is_no_label_is_named_with_the_columns_read_as_labels(tmp_path, header, rows, views, message):
    csv_path = write_csv(tmp_path / "train.csv", header, rows)  # the generic file's row 2 is left out by view
    with pytest.raises(DataError) as err:
        read_labels(csv_path, views)
    assert str(err.value) == f"{csv_path}, {message}"


@pytest.mark.parametrize("header,row,column", [
    (["Image Index", "Finding Labels", "Patient ID", "View Position"], ["", "Pneumonia", "1", "PA"], "Image Index"),
    (["Path", "Frontal/Lateral", "AP/PA", "No Finding"], [" ", "Frontal", "PA", "1.0"], "Path"),
    (["patientid", "finding", "modality", "filename"], ["1", "Pneumonia", "X-ray", ""], "filename"),
    (["path", "labels"], ["", "Pneumonia"], "path")], ids=["chestxray14", "chexpert", "covid-chestxray", "generic"])
def test_an_empty_path_names_its_row(tmp_path, header, row, column):
    """Not a missing image named ``()``."""
    good = [value if name != column else "a.png" for name, value in zip(header, row)]
    csv_path = write_csv(tmp_path / "labels.csv", header, [good, row])
    with pytest.raises(DataError, match=f"^{csv_path}, row 3 has an empty path \\(column '{column}'\\): fill it in "
                                        "or remove the row$"):
        read_labels(csv_path)


@pytest.mark.parametrize("encoding,label,problem", [
    ("utf-16", "Pneumonia", "is not UTF-8 text"), ("cp1252", "Épanchement", "is not UTF-8 text"),
    ("utf-16-le", "Pneumonia", "holds NUL characters, as UTF-16 text does")])  # utf-16-le: no byte-order mark
def test_a_csv_that_is_not_utf8_says_to_re_save_it_as_utf8(tmp_path, encoding, label, problem):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(f"path,labels\na.png,{label}\n".encode(encoding))
    with pytest.raises(DataError, match=f"^--labels {csv_path} {problem}.*: re-save it as UTF-8 \\(in Excel: Save "
                                        "As, CSV UTF-8\\)$"):
        read_labels(csv_path)


def test_missing_images_stop_or_are_skipped_and_counted(data_root, tmp_path):
    csv_path = generic(tmp_path, data_root)
    gone = sorted((tmp_path / "pictures").iterdir())[:2]
    for path in gone:
        path.unlink()
    cfg = DataConfig(labels=str(csv_path), tfds_dir=str(tmp_path / "tfds"), image_size=32)
    with pytest.raises(DataError) as err:
        load_splits(cfg)
    assert "2 of the 24 images" in str(err.value) and "--skip-missing" in str(err.value)
    assert gone[0].name in str(err.value)
    with pytest.warns(MissingImagesWarning, match="left out 2 of the 24 rows"):
        splits = load_splits(DataConfig(**{**cfg.__dict__, "skip_missing": True}), quiet=True)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 22


def test_a_file_a_row_names_that_is_not_an_image_stops_or_is_skipped(data_root, tmp_path):
    """Not junk as beside class folders: a labelled row would vanish silently."""
    csv_path = generic(tmp_path, data_root)
    (tmp_path / "pictures" / "scan.dcm").write_bytes(bytes(128) + b"DICM" + bytes(64))  # DICOM's preamble, magic
    with open(csv_path, "a", newline="") as f:
        f.write("pictures/scan.dcm,1,0,p99\n")
    cfg = DataConfig(labels=str(csv_path), tfds_dir=str(tmp_path / "tfds"), image_size=32)
    with pytest.raises(DataError, match=r"scan\.dcm: named in the labels file, but not an image \(a DICOM file, which "
                                        r"is not read: convert it to PNG\)\. .* pass --skip-bad-images"):
        load_splits(cfg, quiet=True)
    with pytest.warns(BadImageWarning, match=r"skipping .*scan\.dcm: a DICOM file"):
        splits = load_splits(DataConfig(**{**cfg.__dict__, "skip_bad_images": True}), quiet=True)
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 24


def test_splits_keep_each_patient_on_one_side_and_official_test_is_exact(data_root, nih, tmp_path):
    covid = load_splits(DataConfig(labels=str(covid_chestxray(tmp_path / "c", data_root)), image_size=32,
                                   tfds_dir=str(tmp_path / "tfds"), test_fraction=0.25, val_fraction=0.25), quiet=True)
    sides = [set(s.groups) for s in (covid.train, covid.validation, covid.test)]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert covid.class_names == ("Bacterial", "COVID-19", "Pneumonia", "Viral")
    assert covid.train.labels.shape[1] == 4 and covid.train.labels.dtype == np.float32
    pooled = covid.pooled().train
    folds = split_folds(pooled, 3, seed=0)
    assert sorted(np.concatenate(folds)) == list(range(len(pooled)))
    in_folds = [{pooled.groups[i] for i in fold} for fold in folds]
    assert sum(len(g) for g in in_folds) == len(set(pooled.groups))  # each patient in one fold
    official = load_splits(DataConfig(labels=str(nih), image_size=32, tfds_dir=str(tmp_path / "tfds")), quiet=True)
    test_list = (nih.parent / "test_list.txt").read_text().split()
    assert sorted(k.split("/")[-1] for k in official.test.keys) == sorted(test_list)
    assert not set(official.train.groups) & set(official.test.groups)


def test_an_official_test_split_sharing_patients_with_train_is_named(data_root, tmp_path):
    csv = chestxray14(tmp_path / "nih", data_root, per_class=2)  # patients 0 and 3 in test
    lists = {name: (csv.parent / name).read_text().split() for name in ("test_list.txt", "train_val_list.txt")}
    moved = "00000002_000.png"  # one of patient 1's two images, the other stays in train
    lists["train_val_list.txt"].remove(moved)
    lists["test_list.txt"].append(moved)
    for name, images in lists.items():
        (csv.parent / name).write_text("\n".join(images) + "\n")
    with pytest.warns(SplitWarning, match=r"^the official test split shares 1 patient\(s\) with train: 1\. "):
        splits = load_splits(DataConfig(labels=str(csv), image_size=32, tfds_dir=str(tmp_path / "tfds"),
                                        val_fraction=0), quiet=True)
    assert sorted(k.split("/")[-1] for k in splits.test.keys) == sorted(lists["test_list.txt"])  # kept as given


def test_labels_without_a_training_positive_are_left_out_with_a_note(data_root, tmp_path):
    cfg = DataConfig(labels=str(chexpert(tmp_path, data_root)), image_size=32, tfds_dir=str(tmp_path / "tfds"))
    with pytest.warns(SplitWarning) as caught:
        splits = load_splits(cfg, quiet=True)
    assert len(caught) == 1  # one warning, every left-out label named with its reason
    message = str(caught[0].message)
    assert message.startswith("11 labels left out of training (no positive image in the training split): every "
                              "known value negative: 'Atelectasis' (4 known), 'Cardiomegaly' (4 known), ")
    assert message.endswith(", 'Pneumothorax' (4 known); no known value: 'Support Devices'")  # blank, even if healthy
    assert splits.class_names == ("Consolidation", "Pneumonia")
    table = read_labels(cfg.labels)
    uncertain = {p.removeprefix("CheXpert-v1.0-small/") for p, v in
                 zip(table.paths, table.labels[:, table.label_names.index("Pneumonia")]) if v == -1}
    ignored = {k.split("/", 1)[1] for k, v in zip(splits.train.keys, splits.train.labels[:, 1]) if np.isnan(v)}
    assert ignored and ignored <= uncertain  # the uncertain Pneumonia, ignored by default
    with pytest.warns(SplitWarning, match="11 labels left out"):
        ones = load_splits(DataConfig(**{**cfg.__dict__, "uncertain": "ones"}), quiet=True)
    assert not np.isnan(ones.train.labels).any()


@pytest.mark.parametrize("columns,message", [
    ([0, 1, 2, 3], "3 labels left out of training (no positive image in the training split): every known value "
                   "negative: 'B' (3 known), 'D' (2 known); no known value: 'C'"),
    ([0, 2], "1 label left out of training (no positive image in the training split): no known value: 'C'")])
def test_left_out_labels_are_named_in_one_warning_by_reason(columns, message):
    from xrayjax.data.splits import _patient_splits

    nan = np.nan
    labels = np.array([[1, 0, nan, 0], [0, 0, nan, nan], [1, 0, nan, 0]], np.float32)[:, columns]
    train = Split(np.zeros((3, 1, 1, 1), np.uint8), labels, ("a", "b", "c"), groups=("p1", "p2", "p3"))
    names = tuple("ABCD"[i] for i in columns)
    with pytest.warns(SplitWarning) as caught:
        test = Split(train.images[:1], labels[:1], ("t",), groups=("p4",))  # a patient of its own
        splits = _patient_splits({"train": train, "test": test}, DataConfig(val_fraction=0.0), names, "key")
    assert [str(w.message) for w in caught] == [message]
    assert splits.class_names == ("A",) and splits.train.labels.shape == (3, 1)


def test_a_patient_with_many_images_never_takes_the_held_out_split():
    from xrayjax.data.splits import patient_split

    groups = ("big",) * 36 + tuple(f"p{i}" for i in range(12))  # one patient holds 36 of 48 images
    split = Split(np.zeros((48, 1, 1, 1), np.uint8), np.zeros((48, 2), np.float32),
                  tuple(f"{i}.png" for i in range(48)), groups=groups)
    for seed in range(8):
        rest, held = patient_split(split, 0.2, seed)
        assert len(held) == 10 and len(rest) == 38 and "big" in rest.groups  # round(0.2 * 48) = 10
        assert not set(rest.groups) & set(held.groups)
    lone = Split(split.images[:40], split.labels[:40], split.names[:40], groups=("a",) * 30 + ("b",) * 10)
    assert patient_split(lone, 0.1, 0)[1].groups == ("b",) * 10  # none fits 4: the smallest patient


def test_a_run_folder_may_sit_among_a_labels_files_images(nih):
    from xrayjax.config import TrainConfig, resolve_run

    inside = nih.parent / "runs" / "first"  # class folders refuse this: their files would be listed
    assert resolve_run(TrainConfig(labels=str(nih), out=str(inside))).config.out == str(inside)
    assert not inside.exists()


def test_a_moved_labels_file_is_looked_for_at_its_place_under_the_new_data_folder(tmp_path):
    from xrayjax.config import TrainConfig

    old, new, elsewhere = tmp_path / "old", tmp_path / "new", tmp_path / "elsewhere.csv"
    (new / "meta").mkdir(parents=True)
    (new / "meta" / "labels.csv").write_text("path,a\n")
    inside = TrainConfig(data_dir=str(old), labels=str(old / "meta" / "labels.csv"), tfds_dir="t")
    moved = inside.data_moved(str(new), "u")
    assert (moved.data_dir, moved.labels, moved.tfds_dir) == (str(new), str(new / "meta" / "labels.csv"), "u")
    assert inside.data_moved(str(tmp_path / "bare")).labels == inside.labels  # not there: the recorded one
    outside = TrainConfig(data_dir=str(old), labels=str(elsewhere))  # beside the data, not in it: stays
    assert outside.data_moved(str(new)).labels == str(elsewhere)


def test_masked_loss_equals_a_hand_computation():
    model = build_step_model("vgg16", "multilabel", num_classes=3, l2=0.0, label_weights=[1.0, 0.5, 0.25])
    logits = np.array([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0], [1.0, 1.0, 1.0], [0.3, -0.3, 0.0]], np.float32)
    labels = np.array([[1, 0, np.nan], [0, np.nan, np.nan], [1, 1, 0], [np.nan, 1, 1]], np.float32)
    mask = np.array([1, 1, 1, 0], np.float32)  # the last row is padding: its labels never count

    class Fixed:  # a head that returns the logits above
        def apply(self, variables, features, **kw):
            return jnp.asarray(logits), {}

    model = model.__class__(**{**model.__dict__, "head": Fixed()})
    loss, (metrics, _) = head_loss(model, {}, {}, np.zeros((4, 1)), labels, mask, None)
    bce = np.logaddexp(0, logits) - logits * np.nan_to_num(labels)
    known = ~np.isnan(labels) & (mask[:, None] > 0)
    per_label = [bce[known[:, j], j].mean() for j in range(3)]
    assert float(loss) == pytest.approx(1.0 * per_label[0] + 0.5 * per_label[1] + 0.25 * per_label[2], rel=1e-6)
    right = [(1 + 1) / 2, 1 / 1, 2 / 3]  # each real row's known labels right at 0.5
    assert float(metrics["correct"]) == pytest.approx(sum(right), rel=1e-6) and float(metrics["count"]) == 3


def test_round_trip_through_train_evaluate_and_predict(nih, tmp_path):
    from xrayjax import evaluate, predict, train

    out = tmp_path / "run"
    argv = ["--labels", str(nih), "--init", "random", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
            "--out", str(out), "--tfds-dir", str(tmp_path / "tfds"), "--label-weights", "balanced"]
    printed, log = io.StringIO(), io.StringIO()  # stderr not a terminal, as a log file: no bar redraws,
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(log):  # a line as each long pass starts
        assert train.main(argv) == 0
    assert "mean ROC-AUC" in printed.getvalue()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    start = next(i for i, line in enumerate(lines) if line.startswith("computing the backbone features of "))
    assert lines[start + 1].startswith("cached backbone features of ")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["label_names"] == ["Consolidation", "Infiltration", "Pneumonia"]
    assert metrics["count"] == len((nih.parent / "test_list.txt").read_text().split())
    assert set(metrics["per_label"]["Pneumonia"]) >= {"roc_auc", "average_precision", "threshold", "sensitivity"}
    by_split = metrics["mean_roc_auc_by_split"]  # train's is free at the end of a cached-feature run
    assert list(by_split) == ["train", "validation", "test"] and by_split["test"] == metrics["mean_roc_auc"]
    assert "mean ROC-AUC by split: train " in printed.getvalue()
    assert {p.name for p in out.glob("*.png")} == {"curves.png", "roc.png", "tsne.png", "gradcam.png"}
    meta = json.loads((out / "config.json").read_text())  # as an older version recorded it: --group-by then
    (out / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "group_by": "source"}}))
    log = io.StringIO()  # did nothing with --labels (now refused), so the run still evaluates
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(log):
        assert evaluate.main(["--run", str(out)]) == 0
    assert "\r" not in log.getvalue() and f"evaluating test: {metrics['count']} images" in log.getvalue().splitlines()
    again = json.loads((out / "metrics.json").read_text())["per_label"]  # the backbone ran again: rounding
    for name, row in metrics["per_label"].items():
        assert again[name]["roc_auc"] == pytest.approx(row["roc_auc"], abs=1e-6)
        assert again[name]["threshold"] == pytest.approx(row["threshold"], abs=1e-5)
    image = next(nih.parent.glob("images_001/images/*.png"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert predict.main(["--run", str(out), "--json", str(image)]) == 0
    row = json.loads(printed.getvalue())[0]
    assert list(row["probabilities"]) == metrics["label_names"]
    assert row["thresholds"] == {n: again[n]["threshold"] for n in metrics["label_names"]}
    assert row["positive"] == [n for n in metrics["label_names"] if row["probabilities"][n] >= row["thresholds"][n]]
    moved = shutil.copytree(nih.parent, tmp_path / "moved")  # the data and its labels file, copied together
    hidden = nih.with_suffix(".away")
    nih.rename(hidden)  # the recorded labels file gone: only the moved one can be read
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert evaluate.main(["--run", str(out), "--data-dir", str(moved)]) == 0
            assert train.main(["--resume", "--out", str(out), "--data-dir", str(moved), "--epochs", "3",
                               "--no-eval"]) == 0
    finally:
        hidden.rename(nih)
    assert json.loads((out / "config.json").read_text())["config"]["labels"] == str(moved / nih.name)
    prepared = next((tmp_path / "tfds" / "xray_folders").glob("*multilabel*/1.0.0"))
    with pytest.raises(DataError, match="is a labels file's prepared data: pass that --labels CSV"):
        open_dataset(DataConfig(data_dir=str(prepared)))  # not read as class folders (it crashed the step)
    with pytest.raises(DataError, match="--group-by must be unset with --labels"):
        DataConfig(labels=str(nih), group_by="source")
