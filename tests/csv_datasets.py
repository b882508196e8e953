"""Small labels-file datasets of each format, built from the real X-rays in a temporary folder."""

import csv
import pathlib
import shutil

# class folder of the challenge's data -> findings (ChestX-ray14's names)
FINDINGS = {"covid": ("Consolidation", "Pneumonia"), "normal": (), "pneumonia_bac": ("Infiltration", "Pneumonia"),
            "pneumonia_vir": ("Pneumonia",)}


def real_images(data_root: pathlib.Path, per_class: int) -> list[tuple[str, pathlib.Path]]:
    """(class, path) of the first ``per_class`` training images of each class."""
    out = []
    for cls in FINDINGS:
        out += [(cls, p) for p in sorted((data_root / "all" / "train" / cls).glob("*.jp*g"))[:per_class]]
    return out


def write_csv(path: pathlib.Path, header: list[str], rows: list[list]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def chestxray14(root: pathlib.Path, data_root: pathlib.Path, per_class: int = 6, official: bool = True
                ) -> pathlib.Path:
    """NIH's layout: images spread over images_00N/images/, Data_Entry_2017.csv, and (``official``)
    train_val_list.txt and test_list.txt (every third patient's images in test). Two images per
    patient, a PA and an AP view."""
    rows, test, train = [], [], []
    for i, (cls, src) in enumerate(real_images(data_root, per_class)):
        name = f"{i:08d}_000.png"
        folder = root / f"images_{1 + i % 2:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / name)  # a JPEG under a .png name: decoded by content
        patient = i // 2
        findings = "|".join(FINDINGS[cls]) or "No Finding"
        rows.append([name, findings, 0, patient, 50, "M", "PA" if i % 2 == 0 else "AP"])
        (test if patient % 3 == 0 else train).append(name)
    csv_path = write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
                                                       "Patient Age", "Patient Gender", "View Position"], rows)
    if official:
        (root / "test_list.txt").write_text("\n".join(test) + "\n")
        (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    return csv_path


CHEXPERT_OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                         "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                         "Pleural Other", "Fracture", "Support Devices"]


def chexpert(root: pathlib.Path, data_root: pathlib.Path, per_class: int = 6) -> pathlib.Path:
    """CheXpert-v1.0-small/{train,valid}/patientNNNNN/study1/view1_frontal.jpg with train.csv and
    valid.csv (every fourth patient in valid): Consolidation and Pneumonia from the class, -1.0
    (uncertain) Pneumonia for pneumonia_vir, blanks elsewhere, No Finding = 1 for normal, and a
    lateral view of every second patient."""
    top = root / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    parts = {"train": [], "valid": []}
    for i, (cls, src) in enumerate(real_images(data_root, per_class)):
        split = "valid" if i % 4 == 3 else "train"
        lateral = i % 2 == 1
        rel = f"CheXpert-v1.0-small/{split}/patient{i:05d}/study1/view1_{'lateral' if lateral else 'frontal'}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / rel)
        values = {o: "" for o in CHEXPERT_OBSERVATIONS}
        if cls == "normal":
            values["No Finding"] = "1.0"
        else:
            values["Consolidation"] = "1.0" if cls == "covid" else "0.0"
            values["Pneumonia"] = "-1.0" if cls == "pneumonia_vir" else "1.0"
        parts[split].append([rel, "Male", 60, "Lateral" if lateral else "Frontal", "" if lateral else "AP",
                             *values.values()])
    write_csv(top / "valid.csv", header, parts["valid"])
    return write_csv(top / "train.csv", header, parts["train"])


def covid_chestxray(root: pathlib.Path, data_root: pathlib.Path, per_class: int = 6, early: bool = False
                    ) -> pathlib.Path:
    """The COVID-19 image data collection: images/ and metadata.csv, findings written as today
    (Pneumonia/Viral/COVID-19) or, ``early``, as in early-2020 copies (COVID-19, ARDS; no folder
    column), plus two CT rows (volumes/) that must be left out."""
    spelled = {"covid": "Pneumonia/Viral/COVID-19", "normal": "No Finding", "pneumonia_bac": "Pneumonia/Bacterial",
               "pneumonia_vir": "Pneumonia/Viral"}
    if early:
        spelled = {"covid": "COVID-19, ARDS", "normal": "No Finding", "pneumonia_bac": "Pneumonia, Bacterial",
                   "pneumonia_vir": "Pneumonia, Viral"}
    header = ["patientid", "offset", "sex", "age", "finding", "view", "modality", "filename"]
    header += [] if early else ["folder"]
    rows = []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, (cls, src) in enumerate(real_images(data_root, per_class)):
        shutil.copy(src, root / "images" / src.name)
        rows.append([str(i // 2), 0, "M", 50, spelled[cls], "PA", "X-ray", src.name] + ([] if early else ["images"]))
    for j in range(2):
        rows.append([str(100 + j), 0, "F", 40, spelled["covid"], "Axial", "CT", f"ct{j}.jpg"] +
                    ([] if early else ["volumes"]))
    return write_csv(root / "metadata.csv", header, rows)


def generic(root: pathlib.Path, data_root: pathlib.Path, per_class: int = 6, joined: bool = False
            ) -> pathlib.Path:
    """A path column with one 0/1/blank column per label (``joined``: a labels column joined by |)
    and a patient column; the images in pictures/."""
    (root / "pictures").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (cls, src) in enumerate(real_images(data_root, per_class)):
        shutil.copy(src, root / "pictures" / src.name)
        found = FINDINGS[cls]
        if joined:
            rows.append([f"pictures/{src.name}", "|".join(found), f"p{i // 2}"])
        else:
            rows.append([f"pictures/{src.name}", "1" if "Consolidation" in found else "0",
                         "" if cls == "pneumonia_vir" else ("1" if "Pneumonia" in found else "0"), f"p{i // 2}"])
    header = ["path", "labels", "patient"] if joined else ["path", "Consolidation", "Pneumonia", "patient"]
    return write_csv(root / "labels.csv", header, rows)
