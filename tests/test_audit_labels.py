"""The audit of a labels file (``python -m xrayjax.data audit --labels``) on ChestX-ray14- and
CheXpert-format datasets with planted faults: a missing image, a corrupt one, an image copied
under a second name, one patient in both official splits; and ``prepare --labels``."""

import json
import pathlib
import shutil

import pytest

from csv_datasets import chestxray14, chexpert, write_csv
from xrayjax.data.__main__ import main
from xrayjax.data.audit_labels import audit_labels
from xrayjax.data.csv_images import MissingImagesWarning


def _truncate(path: pathlib.Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _rewrite(csv_path: pathlib.Path, extra: list[list]) -> None:
    """The CSV with ``extra`` rows appended."""
    lines = csv_path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    write_csv(csv_path, lines[0].split(","), rows + extra)


@pytest.fixture
def nih(data_root, tmp_path) -> pathlib.Path:
    """ChestX-ray14 format, 24 images of 12 patients (two each; patients 0, 3, 6, 9 in test_list):
    row 1 deleted, row 2 truncated, row 4 copied as 00000024_000.png (patient 12, in test_list),
    and row 9 (patient 4, whose row 8 stays in train) moved to test_list."""
    csv_path = chestxray14(tmp_path, data_root)
    (tmp_path / "images_002/images/00000001_000.png").unlink()
    _truncate(tmp_path / "images_001/images/00000002_000.png")
    shutil.copy(tmp_path / "images_001/images/00000004_000.png", tmp_path / "images_002/images/00000024_000.png")
    _rewrite(csv_path, [["00000024_000.png", "Consolidation|Pneumonia", 0, 12, 50, "M", "PA"]])
    train = (tmp_path / "train_val_list.txt").read_text().split()
    test = (tmp_path / "test_list.txt").read_text().split()
    train.remove("00000009_000.png")
    (tmp_path / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(test + ["00000009_000.png", "00000024_000.png"]) + "\n")
    return csv_path


def test_chestxray14_audit_counts_every_planted_fault(nih):
    report = audit_labels(nih)
    assert report["format"] == "chestxray14"
    assert report["counts"] == {"rows": 25, "found": 24, "missing": 1, "unreadable": 1}
    assert report["missing"] == ["00000001_000.png"] and report["left_out"] == {}
    assert [u["file"].endswith("00000002_000.png") for u in report["unreadable"]] == [True]
    assert report["per_label"] == {
        "Consolidation": {"positive": 6, "negative": 18, "uncertain": 0, "unknown": 0},  # covid: 5 found + the copy
        "Infiltration": {"positive": 6, "negative": 18, "uncertain": 0, "unknown": 0},
        "Pneumonia": {"positive": 18, "negative": 6, "uncertain": 0, "unknown": 0},  # all but normal
    }
    assert report["co_occurrence"] == [[6, 0, 6], [0, 6, 6], [6, 6, 18]]
    assert report["top_pairs"] == [{"labels": ["Consolidation", "Pneumonia"], "count": 6},
                                   {"labels": ["Infiltration", "Pneumonia"], "count": 6}]
    assert report["patients"] == {"patients": 13, "rows_without_patient": 0,
                                  "images_per_patient": {"min": 1, "median": 2.0, "max": 2}}
    assert report["official_splits"] == {
        "images": {"train": 15, "test": 9},
        "patients_in_more_than_one": [{"patient": "4", "splits": {"test": ["00000009_000.png"],
                                                                  "train": ["00000008_000.png"]}}]}
    assert report["exact_duplicates"] == [{
        "files": ["images_001/images/00000004_000.png", "images_002/images/00000024_000.png"],
        "scope": "across test/train", "labels_differ": False}]
    assert report["near_duplicates"] == []
    assert report["shortcut_target"] == "Pneumonia" and set(report["shortcuts"]) == {"colour mode", "image size"}


def test_chexpert_audit_counts_uncertain_and_a_patient_in_train_and_valid(data_root, tmp_path, capsys):
    csv_path = chexpert(tmp_path, data_root)  # 24 patients, one image each; i % 4 == 3 in valid
    top = csv_path.parent
    (top / "train/patient00005/study1/view1_lateral.jpg").unlink()
    _truncate(top / "train/patient00020/study1/view1_frontal.jpg")
    copy = "valid/patient00000/study2/view1_frontal.jpg"  # patient 0 of train, again in valid
    (top / copy).parent.mkdir(parents=True)
    shutil.copy(top / "train/patient00000/study1/view1_frontal.jpg", top / copy)
    train_rows = csv_path.read_text().splitlines()
    first = train_rows[1].split(",")
    _rewrite(top / "valid.csv", [[f"CheXpert-v1.0-small/{copy}", *first[1:]]])

    report = audit_labels(csv_path)
    assert report["counts"] == {"rows": 25, "found": 24, "missing": 1, "unreadable": 1}
    assert report["missing"] == ["CheXpert-v1.0-small/train/patient00005/study1/view1_lateral.jpg"]
    assert report["per_label"]["Consolidation"] == {"positive": 6, "negative": 18, "uncertain": 0, "unknown": 0}
    assert report["per_label"]["Pneumonia"] == {"positive": 12, "negative": 6, "uncertain": 6, "unknown": 0}
    assert report["per_label"]["Edema"] == {"positive": 0, "negative": 6, "uncertain": 0, "unknown": 18}
    assert report["patients"] == {"patients": 23, "rows_without_patient": 0,
                                  "images_per_patient": {"min": 1, "median": 1.0, "max": 2}}
    assert report["official_splits"] == {
        "images": {"train": 17, "test": 7},
        "patients_in_more_than_one": [{"patient": "patient00000", "splits": {
            "test": [f"CheXpert-v1.0-small/{copy}"],
            "train": ["CheXpert-v1.0-small/train/patient00000/study1/view1_frontal.jpg"]}}]}
    assert [d["files"] for d in report["exact_duplicates"]] == [["train/patient00000/study1/view1_frontal.jpg", copy]]
    assert report["exact_duplicates"][0]["scope"] == "across test/train"

    assert main(["audit", "--labels", str(csv_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == report["counts"]
    assert main(["audit", "--labels", str(csv_path), "--data-dir", str(tmp_path), "--views", "AP"]) == 0
    text = capsys.readouterr().out
    assert "rows left out before: 12 by view" in text and "uncertain" in text
    assert "Patients in more than one official split (a leak into test): 1" in text
    assert "patient00000: test CheXpert-v1.0-small/valid/patient00000" in text


def test_audit_views_without_labels_is_one_line(capsys):
    assert main(["audit", "--views", "PA"]) == 2
    assert capsys.readouterr().err == ("error: --views must be unset without --labels (a labels file's column of "
                                       "views), got 'PA'\n")


def test_prepare_labels_takes_the_train_flags(nih, tmp_path, capsys):
    (nih.parent / "images_001/images/00000002_000.png").unlink()  # the truncated one: now missing
    argv = ["prepare", "--labels", str(nih), "--tfds-dir", str(tmp_path / "tfds"), "--views", "PA"]
    assert main(argv) == 2
    assert "1 of the 13 images" in capsys.readouterr().err  # row 2 (PA; row 1 is AP)
    with pytest.warns(MissingImagesWarning, match="left out 1 of the 13 rows"):
        assert main([*argv, "--skip-missing", "--uncertain", "zeros"]) == 0
    out = capsys.readouterr().out
    assert "train: 7 images" in out and "test: 5 images" in out  # test: rows 0, 6, 12, 18 and the copy
    assert "Pneumonia" in out and "positive" in out
