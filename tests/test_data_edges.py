"""Edges of finding, listing and preparing a dataset: one listing per run, the prepared data's key,
prepared folders read as they are, zips (closed, unsafe members, damaged), class folders differing
in case, symlinked folders, a quiet prepare, the task alias, source groups and the CLI's errors.
Tiny PNGs in tmp_path; no training."""

import os
import pathlib
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from xrayjax.data import CHALLENGE_CLASSES, DataError
from xrayjax.data import __main__ as data_cli
from xrayjax.data.audit import audit, format_report
from xrayjax.data.builder import BadImageWarning, class_names, config_for, prepare, prepared_builder, read_prepared
from xrayjax.data.groups import source_groups
from xrayjax.data.source import LayoutWarning, Source, resolve_source
from xrayjax.tasks import TASKS


def png(path, seed: int) -> None:
    """A 12x10 random gray PNG at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)


def classes(root, folders=("a", "b"), n: int = 2):
    """``root/<folder>/<i>.png`` for each folder; the root."""
    for k, folder in enumerate(folders):
        for i in range(n):
            png(root / folder / f"{i}.png", 10 * k + i)
    return root


def zip_of(path, root, extra=()):
    """A zip of every file under ``root`` (named as under it) plus ``extra`` members; its path."""
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(root.parent).as_posix())
        for name in extra:
            zf.writestr(zipfile.ZipInfo(name), b"x")
    return path


def prepare_dir(data_dir, task=None, **kwargs):
    with resolve_source(data_dir) as source:
        return prepare(source, source.listing(task), task=task, **kwargs)


# 1. prepare takes what was listed ------------------------------------------------------------

def test_prepare_takes_the_listing_so_a_run_lists_once(tmp_path, monkeypatch):
    root = classes(tmp_path / "d")
    calls = []
    listing_of = Source.listing
    monkeypatch.setattr(Source, "listing", lambda self, task=None: calls.append(task) or listing_of(self, task))
    with resolve_source(root) as source:
        listing = source.listing()
        builder = prepare(source, listing, tfds_dir=str(tmp_path / "t"))
    assert calls == [None] and builder.listing is listing and class_names(builder) == ("a", "b")


# 2. skipping bad images is part of the key ---------------------------------------------------

def test_data_prepared_skipping_bad_images_is_never_reused_by_a_strict_prepare(tmp_path):
    root = classes(tmp_path / "d")
    data = (root / "a" / "0.png").read_bytes()
    (root / "b" / "broken.png").write_bytes(data[:len(data) // 2])
    tfds_dir = str(tmp_path / "t")
    with pytest.warns(BadImageWarning, match="broken.png"):
        skipped = prepare_dir(root, tfds_dir=tfds_dir, skip_bad_images=True)
    assert skipped.info.metadata["bad_images"] == ["b/broken.png"]
    with pytest.raises(DataError, match=r"b/broken\.png: unreadable, corrupt or truncated image"):
        prepare_dir(root, tfds_dir=tfds_dir)
    folders = sorted(p.name for p in (tmp_path / "t" / "xray_folders").glob("[!.]*"))
    assert folders == [pathlib.Path(skipped.data_dir).parent.name]  # the failed prepare left no folder


# 3. nothing guessed: a prepared folder is given explicitly -----------------------------------

def test_the_folder_prepare_prints_is_a_prepared_folder(tmp_path, capsys):
    root = classes(tmp_path / "d", ("x", "y", "z"))
    tfds_dir = tmp_path / "t"
    assert data_cli.main(["prepare", "--data-dir", str(root), "--tfds-dir", str(tfds_dir)]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("d-gray-"))
    version = printed.split(": ", 1)[1].split(" (", 1)[0]
    for folder in (version, os.path.dirname(version)):
        builder = prepared_builder(folder)
        assert class_names(builder) == ("x", "y", "z") and len(read_prepared(builder)["train"].labels) == 6
    assert prepared_builder(tfds_dir) is None and prepared_builder(tfds_dir / "xray_folders") is None
    assert prepared_builder(root) is None and prepared_builder(tmp_path / "missing") is None
    for command in ("prepare", "audit"):  # they read raw images: a prepared folder is named as such
        assert data_cli.main([command, "--data-dir", version]) == 2
        assert "is data `python -m xrayjax.data prepare` wrote" in capsys.readouterr().err
    shutil.copytree(version, os.path.join(os.path.dirname(version), "1.0.1"))
    assert prepared_builder(os.path.dirname(version)) is None  # two versions: which one is not guessed


def test_no_default_dataset_names_the_ways_to_pass_one(tmp_path, monkeypatch):
    monkeypatch.setattr("xrayjax.data.source.REPO_DATA_DIR", tmp_path / "no_dataset_here")
    with pytest.raises(DataError, match=r"^no dataset at the default location .*no_dataset_here: pass --data-dir "
                                        r"PATH \(a folder or zip of class folders, or a prepared folder as "
                                        r"`python -m xrayjax.data prepare` prints it\)$"):
        resolve_source(None)


# 4. a Source closes its zip ------------------------------------------------------------------

def test_source_closes_its_zip_and_the_commands_close_it(tmp_path, monkeypatch):
    archive = zip_of(tmp_path / "d.zip", classes(tmp_path / "d"))
    with resolve_source(archive) as source:
        assert source.read(source.files[0]).startswith(b"\x89PNG")
    assert source._zip.fp is None  # closed
    closed = []
    close = Source.close
    monkeypatch.setattr(Source, "close", lambda self: closed.append(self.location) or close(self))
    audit(str(archive))
    assert data_cli.main(["prepare", "--data-dir", str(archive), "--tfds-dir", str(tmp_path / "t")]) == 0
    assert closed == [archive, archive]


# 5. unsafe zip members -----------------------------------------------------------------------

def test_unsafe_zip_members_are_skipped_listed_and_warned_about_once(tmp_path):
    unsafe = ["/abs/x.png", "C:/win/x.png", "d:evil.png", "../up.png", "mydata/a/../../up.png", "\\back\\x.png"]
    archive = zip_of(tmp_path / "mydata.zip", classes(tmp_path / "mydata"), unsafe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with resolve_source(archive) as source:
            listing = source.listing()
    layout = [w for w in caught if issubclass(w.category, LayoutWarning)]
    assert len(layout) == 1 and all(name in str(layout[0].message) for name in unsafe)
    assert listing.class_names == ("a", "b") and len(listing.files) == 4  # the prefix mydata/ still found
    assert listing.unsafe == tuple(unsafe)
    with pytest.warns(LayoutWarning):
        report = audit(str(archive))
    assert report["unsafe_zip_members"] == unsafe and "/abs/x.png" in format_report(report)


# 6. class folders differing only in case -----------------------------------------------------

def test_class_folders_differing_only_in_case_warn_naming_both(tmp_path):
    root = classes(tmp_path / "d", ("train/Covid", "train/covid", "train/normal"))
    with pytest.warns(LayoutWarning, match=r"train: class folders Covid/ and covid/ differ only in case"):
        listing = resolve_source(root).listing()
    assert listing.class_names == ("Covid", "covid", "normal")


# 7. symlinked folders --------------------------------------------------------------------

def test_symlinked_class_and_split_folders_are_followed_once(tmp_path):
    elsewhere = classes(tmp_path / "elsewhere", ("b", "test/a", "test/b"), n=1)
    root = classes(tmp_path / "d", ("train/a",))
    (root / "train" / "b").symlink_to(elsewhere / "b", target_is_directory=True)
    (root / "test").symlink_to(elsewhere / "test", target_is_directory=True)
    (root / "train" / "a" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "b_again").symlink_to(elsewhere / "b", target_is_directory=True)
    with resolve_source(root) as source:
        listing = source.listing()
        assert source.read(next(t.file for t in listing.files if t.file.member == "train/b/0.png"))
    assert listing.class_names == ("a", "b") and listing.splits == ("train", "test")
    assert sorted(t.file.member for t in listing.files) == [
        "test/a/0.png", "test/b/0.png", "train/a/0.png", "train/a/1.png", "train/b/0.png"]
    assert listing.ignored == ("train/a/loop", "train/b_again")


# 8. a damaged zip ----------------------------------------------------------------------------

def test_a_damaged_zip_is_told_apart_from_a_file_that_is_not_a_zip(tmp_path):
    data = zip_of(tmp_path / "d.zip", classes(tmp_path / "d")).read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[:len(data) // 2])
    (tmp_path / "cut.bin").write_bytes(data[:len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a dataset")
    for name in ("cut.zip", "cut.bin"):
        with pytest.raises(DataError, match=rf"{name}: a damaged or truncated zip file \(.+\): copy or download it "
                                            r"again$"):
            resolve_source(tmp_path / name)
    with pytest.raises(DataError, match=r"notes\.txt: a file that is not a zip"):
        resolve_source(tmp_path / "notes.txt")


# 9. a quiet prepare prints nothing -----------------------------------------------------------

def test_a_quiet_prepare_prints_nothing(tmp_path, capfd):
    root = classes(tmp_path / "d")
    prepare_dir(root, tfds_dir=str(tmp_path / "quiet"), quiet=True)
    assert capfd.readouterr() == ("", "")
    assert tfds.core.utils.tqdm_utils._active  # the progress bars are back on
    prepare_dir(root, tfds_dir=str(tmp_path / "loud"))
    loud = capfd.readouterr()
    assert "Downloading" not in loud.out + loud.err  # TFDS' line: nothing is downloaded
    assert loud.err.startswith(f"preparing 4 images of {root} into {tmp_path / 'loud'}")


# 10. source groups -------------------------------------------------------------------------

def test_source_groups_name_each_file_s_paper_or_patient():
    assert source_groups(["person12_virus_3.jpeg", "nejmoa2001191_f4.jpeg", "NORMAL2-IM-1345-0001.jpeg"]) == [
        "person12", "nejmoa2001191", "IM-1345"]


# 11. the task alias ------------------------------------------------------------------------

def test_four_class_is_read_as_multiclass(tmp_path):
    root = classes(tmp_path / "c", [f"all/{s}/{c}" for s in ("train", "test") for c in CHALLENGE_CLASSES["multiclass"]])
    assert set(CHALLENGE_CLASSES) == set(TASKS) - {"multilabel"}  # a labels file's task only
    with resolve_source(root) as source:
        names = {config_for(source, source.listing(task), "gray", task).name for task in ("four_class", "multiclass")}
        assert source.listing("four_class") == source.listing("multiclass")
        assert source.listing("binary").class_names == CHALLENGE_CLASSES["binary"]
    assert len(names) == 1 and names.pop().startswith("covid_xray-multiclass-gray-")


# 12. the shared command-line errors ----------------------------------------------------------

def test_the_data_command_reports_errors_and_interrupts_in_one_line(tmp_path, monkeypatch, capsys):
    assert data_cli.main(["audit", "--data-dir", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: --data-dir {tmp_path / 'missing'} does not exist\n"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cli, "_audit", interrupted)
    assert data_cli.main(["audit", "--data-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
