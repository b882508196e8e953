"""One run spec (issue 20): the data listed once, splits.json the truth for evaluation and resume,
resolved paths, one timings record per command, a head-only state, a diverged fold reported."""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from training_helpers import flat, tiny_config, tiny_splits
from xrayjax import runfiles
from xrayjax.config import TrainConfig, from_args, resolve_run
from xrayjax.crossval import cross_validate, cv_summary
from xrayjax.data import DataConfig, DataError, load_splits
from xrayjax.data.splits import SplitWarning
from xrayjax.evaluate import evaluate_run
from xrayjax.loop import fit
from xrayjax.stats import summarise
from xrayjax.steps import build_step_model, create_train_state, head_train_step, init_variables

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(data: pathlib.Path, out: pathlib.Path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(arch="vgg16", init="random", image_size=32, epochs=1, batch_size=4,
                                 data_dir=str(data), tfds_dir=str(out.parent / "tfds"), out=str(out), quiet=True,
                                 evaluate=False), **kw})


@pytest.fixture(scope="module")
def trained(small_dataset, tmp_path_factory):
    """A copy of the small dataset (2 train + 1 test image per class) and a 1-epoch run on it,
    trained from a relative --data-dir and --out; ``sources`` records what the run did with its
    dataset (walked, listed, closed)."""
    from xrayjax.data import source

    root = tmp_path_factory.mktemp("spec")
    data = pathlib.Path(shutil.copytree(small_dataset, root / "data"))
    sources = {"listed": [], "closed": []}
    real_init, real_listing, real_close = source.Source.__init__, source.Source.listing, source.Source.close

    def init(self, *a, **k):
        sources["listed"].append("walk")
        real_init(self, *a, **k)

    def listing(self, *a, **k):
        sources["listed"].append("list")
        return real_listing(self, *a, **k)

    def close(self):
        sources["closed"].append(1)
        real_close(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(source.Source, "__init__", init)
        patch.setattr(source.Source, "listing", listing)
        patch.setattr(source.Source, "close", close)
        patch.chdir(root)
        with pytest.warns(SplitWarning, match="--val-fraction 0.2 held out no image"):  # 2 images a class
            result = fit(_config(pathlib.Path("data"), pathlib.Path("run"), tfds_dir="tfds"))
    return data, result, sources


def test_every_run_records_its_splits_and_absolute_paths(trained):
    data, result, _ = trained
    record = json.loads((result.run_dir / runfiles.SPLITS_FILE).read_text())
    assert record["class_names"] == ["covid", "normal", "pneumonia_bac", "pneumonia_vir"]
    expected = {split: sorted(f"{'test' if split == 'test' else 'train'}/{p.parent.name}/{p.name}"
                              for p in (data / "all" / ("test" if split == "test" else "train")).rglob("*.jp*g"))
                for split in ("train", "test")}
    held = record["splits"]["validation"]
    assert sorted(record["splits"]["train"] + held) == expected["train"] and sorted(record["splits"]["test"]) == \
        expected["test"]
    assert record["data_key"].startswith("covid_xray-multiclass-gray-")
    config = json.loads((result.run_dir / runfiles.CONFIG_FILE).read_text())["config"]
    assert config["data_dir"] == str(data) and config["out"] == str(result.run_dir)
    assert pathlib.Path(config["tfds_dir"]).is_absolute() and result.run_dir.is_absolute()


def test_a_run_lists_its_dataset_once_and_closes_it(trained):
    sources = trained[2]
    assert sources["listed"] == ["walk", "list"] and sources["closed"] == [1]


def test_evaluation_scores_the_recorded_splits_from_any_directory(trained, tmp_path, monkeypatch):
    data, result, _ = trained
    run = pathlib.Path(shutil.copytree(result.run_dir, tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    first = evaluate_run(run, quiet=True)
    # an image added to the test folder after training is named and left out; the scores stay
    extra = data / "all" / "test" / "covid" / "added_later.jpeg"
    shutil.copy(next((data / "all" / "train" / "covid").glob("*.jp*g")), extra)
    try:
        with pytest.warns(SplitWarning, match=r"1 image\(s\) of the data are in none of the run's recorded splits"
                                              r" and are left out \(test/covid/added_later.jpeg\)"):
            again = evaluate_run(run, quiet=True)
    finally:
        extra.unlink()
    assert again["test_predictions"] == first["test_predictions"]
    # an image the run trained on, gone from the data: refused, naming it
    key = json.loads((run / runfiles.SPLITS_FILE).read_text())["splits"]["train"][-1]
    gone, kept = data / "all" / key, tmp_path / "kept.jpeg"
    shutil.move(gone, kept)
    try:
        with pytest.raises(DataError, match=rf"1 image\(s\) of the run's recorded splits are not in the data any more "
                                            rf"\({key}\)"):
            evaluate_run(run, quiet=True)
    finally:
        shutil.move(kept, gone)


def test_evaluation_names_where_a_missing_data_dir_came_from(trained, tmp_path):
    _, result, _ = trained
    run = pathlib.Path(shutil.copytree(result.run_dir, tmp_path / "run"))
    path = run / runfiles.CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["config"]["data_dir"] = str(tmp_path / "moved")
    path.write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match=rf"the data_dir recorded in {path} \({tmp_path / 'moved'}\) does "
                                                "not exist: pass --data-dir"):
        evaluate_run(run, quiet=True)


def test_resume_trains_on_the_recorded_splits_and_keeps_every_command_s_timings(trained, tmp_path):
    data, result, _ = trained
    run = pathlib.Path(shutil.copytree(result.run_dir, tmp_path / "run"))
    runfiles.append_timings(run, {"train": 1.0}, 0)
    extra = data / "all" / "train" / "covid" / "added_later.jpeg"
    shutil.copy(next((data / "all" / "test" / "covid").glob("*.jp*g")), extra)
    try:
        # the data spelled another way (a relative path through ..) and a new image: resumed, the image left out
        spelled = os.path.relpath(data, REPO)
        with pytest.warns(SplitWarning, match="added_later.jpeg"):
            resumed = fit(_config(pathlib.Path(spelled), run, epochs=2, resume=True, tfds_dir=result.spec.config.tfds_dir))
    finally:
        extra.unlink()
    assert [len(getattr(resumed.splits, s)) for s in ("train", "validation", "test")] == \
        [len(getattr(result.splits, s)) for s in ("train", "validation", "test")]
    assert resumed.splits.train.keys == result.splits.train.keys and len(resumed.history) == 2
    from xrayjax.train import run as cli_run  # the command appends one record per training command

    cli_run(resolve_run(_config(data, run, epochs=3, resume=True, tfds_dir=result.spec.config.tfds_dir)))
    records = json.loads((run / runfiles.TIMINGS_FILE).read_text())
    assert [r["started_at_epoch"] for r in records] == [0, 2] and "train" in records[1]["phases"]


def test_a_run_folder_inside_the_dataset_is_refused_before_listing(small_dataset, tmp_path):
    data = pathlib.Path(shutil.copytree(small_dataset / "all", tmp_path / "flat"))
    (data / "train" / "runs").mkdir()  # would list as a class folder with no images
    with pytest.raises(ValueError, match=rf"--out {data / 'train' / 'runs'} is inside the dataset {data}"):
        resolve_run(_config(data, data / "train" / "runs"))


def test_a_split_that_holds_out_nothing_says_which_fraction_would(small_dataset, tmp_path):
    flat_classes = tmp_path / "flat"
    for cls in ("a", "b", "c"):
        shutil.copytree(small_dataset / "all" / "train" / "covid", flat_classes / cls)  # 2 images each
    with pytest.warns(SplitWarning) as caught:
        load_splits(DataConfig(data_dir=str(flat_classes), tfds_dir=str(tmp_path / "tfds"), image_size=32))
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("--test-fraction 0.2 held out no image") and "largest class has 2" in m
               and "pass --test-fraction 0.30 or more" in m for m in messages), messages


def test_a_damaged_history_says_what_to_do(trained, tmp_path):
    _, result, _ = trained
    run = pathlib.Path(shutil.copytree(result.run_dir, tmp_path / "run"))
    (run / runfiles.HISTORY_FILE).write_text('[{"epoch": 1, "train_lo')
    with pytest.raises(runfiles.RunFolderError, match="is not valid JSON .* Restore the file from a backup, or "
                                                      "train the run again into a new --out"):
        runfiles.load_run(run)


def test_skip_bad_images_is_a_training_flag():
    assert from_args(["--skip-bad-images"])[0].data_config().skip_bad_images
    assert not from_args([])[0].data_config().skip_bad_images


def test_the_head_only_state_trains_exactly_as_the_whole_state():
    model = build_step_model("resnet50", "multiclass", num_classes=4)  # its head has a BatchNorm
    variables = init_variables(model, 32, init="random", seed=0)
    whole = create_train_state(model, variables, 1e-3)
    features = np.random.default_rng(0).normal(size=(4, 1, 1, 2048)).astype(np.float32)
    labels, mask, key = np.arange(4, dtype=np.int32), np.ones(4, np.float32), jax.random.key(1)
    step = jax.jit(lambda s: head_train_step(model, s, features, labels, mask, key))
    after_whole, metrics_whole = step(whole)
    after_head, metrics_head = step(whole.head_only())
    assert set(after_head.params) == {"head"} and set(after_head.opt_state) == {"head"}
    merged = whole.with_head(after_head)
    for a, b in ((after_whole, merged), (metrics_whole, metrics_head)):
        fa, fb = flat(jax.device_get(a)), flat(jax.device_get(b))
        assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert all(np.array_equal(v, flat(variables["params"]["backbone"])[k])
               for k, v in flat(merged.params["backbone"]).items())


def test_a_diverged_fold_is_reported_as_diverged(tmp_path):
    result = fit(tiny_config(tmp_path, "cv", folds=2, epochs=2), tiny_splits("binary", n_train=12))
    wild = dataclasses.replace(result, spec=dataclasses.replace(
        result.spec, config=dataclasses.replace(result.spec.config, lr=1e38)))
    cv = cross_validate(wild)
    assert cv["diverged"] == 2
    for fold in cv["per_fold"]:
        assert fold["diverged"].startswith("the training loss became") and fold["accuracy"] is None
    assert cv["summary"]["accuracy"] == {"mean": None, "std": None, "ci95": None, "n": 0}
    assert json.loads((result.run_dir / "cv.json").read_text())["diverged"] == 2


def test_the_cv_summary_says_how_many_folds_scored_each_metric():
    cv = {"folds": 3, "seeds": [0], "images": 48, "diverged": 0, "per_fold": [{}] * 3,
          "summary": {"accuracy": summarise([0.5, 0.6, 0.7]), "mean_roc_auc": summarise([None, 0.433, None])}}
    lines = cv_summary(cv).splitlines()
    assert lines[1] == "  accuracy      0.600 ± 0.100 [0.352, 0.848]"
    assert lines[2] == "  mean_roc_auc  0.433 (no interval from one fold) (1 of 3 folds scored it)"


@pytest.mark.parametrize("command", ["xrayjax.train", "xrayjax.predict"])
def test_ctrl_c_while_the_imports_load_is_one_line(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", command, "--help"], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # the package and xrayjax.cli are imported; JAX is still loading
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    assert err.strip() == "interrupted" and "Traceback" not in err
