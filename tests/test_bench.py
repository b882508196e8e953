"""The benchmark on the CPU (4 virtual devices, conftest): records, the JSON-lines file, the CLI.
No timing is asserted beyond being a finite positive number of the right type."""

import json
import math

import pytest

from xrayjax.bench import REPORT_MODELS, BenchConfig, _parser, main, run
from xrayjax.data.splits import SplitWarning
from xrayjax.tasks import TASKS

KEYS = {"arch", "task", "dtype", "batch", "image_size", "images_per_s", "compile_s", "peak_mem_gb",
        "device", "jax", "date"}
TINY = dict(image_size=32, warmup=1, steps=2, repeats=2, input_sets=2)


def test_records_are_printed_and_appended(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    out.write_text('{"earlier": "record"}\n')
    # resnet50 and the reference step are covered by tests/test_gpu_check.py's smoke run
    cfg = BenchConfig(models=(("vgg16", "binary"),), dtypes=("fp32", "bf16"), batches=(4,), **TINY)
    records = run(cfg, out)
    assert [(r["arch"], r["task"], r["dtype"]) for r in records] == [
        ("vgg16", "binary", "fp32"), ("vgg16", "binary", "bf16")]
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": "record"}  # appended, never overwritten
    assert [json.loads(line) for line in lines[1:]] == records
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    for r in records:
        assert set(r) == KEYS
        assert r["batch"] == 4 and r["image_size"] == 32 and r["device"] == "cpu x4"
        assert isinstance(r["images_per_s"], float) and math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert r["compile_s"] > 0


def test_cli_no_save_and_bad_input(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    args = ["--models", "vgg16:binary", "--dtypes", "fp32", "--image-size", "32", "--steps", "1",
            "--repeats", "1", "--warmup", "1", "--out", str(out)]
    assert main([*args, "--batches", "4", "--no-save"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["arch"] == "vgg16" and record["task"] == "binary" and not out.exists()
    # a global batch must split evenly over the 4 devices
    assert main([*args, "--batches", "6"]) == 2
    assert "batch 6 is not divisible by the 4 local devices" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--models", "vgg17"])
    assert "expected ARCH[:TASK]" in capsys.readouterr().err


def test_task_names_follow_xrayjax_tasks():
    # TASK defaults to multiclass and the report's four_class is read as it
    models = _parser().parse_args(["--models", "vgg19", "resnet50:four_class", "vgg16:binary"]).models
    assert models == [("vgg19", "multiclass"), ("resnet50", "multiclass"), ("vgg16", "binary")]
    assert {task for _, task in REPORT_MODELS} == set(TASKS) - {"multilabel"}  # the report's tasks
    with pytest.raises(SystemExit):
        _parser().parse_args(["--models", "vgg16:three_class"])


def test_input_mode_measures_the_prepared_training_split(small_dataset, tmp_path, capsys):
    # --input: one record per batch size over the training split (8 images; with a validation
    # fraction of 0.2 the 2-image classes hold out none), kind "input"; --augment augments it on
    # the devices, and a missing dataset is one line.
    args = ["--input", "--data-dir", str(small_dataset), "--tfds-dir", str(tmp_path / "tfds"), "--image-size",
            "32", "--repeats", "1", "--out", str(tmp_path / "bench.jsonl")]
    for extra in (["--batches", "4", "8"], ["--batches", "4", "--augment"]):
        with pytest.warns(SplitWarning, match="held out no image"):
            assert main([*args, *extra]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()] == records
    assert [(r["kind"], r["batch"], r["augment"], r["images"]) for r in records] == [
        ("input", 4, False, 8), ("input", 8, False, 8), ("input", 4, True, 8)]
    for r in records:
        assert r["image_size"] == 32 and r["workers"] == 0 and r["device"] == "cpu x4"
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 and r["plain_loop_images_per_s"] > 0
        assert r["vs_plain_loop"] == round(r["images_per_s"] / r["plain_loop_images_per_s"], 2)
        assert r["vs_tfds_loop"] == round(r["images_per_s"] / r["tfds_loop_images_per_s"], 2)
        assert r["batches_timed"] >= 200
    assert main(["--input", "--data-dir", str(tmp_path / "missing"), "--no-save"]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_fed_mode_times_the_train_step_fed_by_the_pipeline_beside_the_step_alone(small_dataset, tmp_path, capsys):
    # --fed: the real train step on the pipeline's batches and on batches already on the devices,
    # one record per --workers; the task is the data's (4 classes: multiclass).
    with pytest.warns(SplitWarning, match="held out no image"):
        assert main(["--fed", "--models", "vgg16", "--dtypes", "fp32", "--batches", "4", "--image-size", "32",
                     "--stream-batches", "2", "--workers", "0", "--data-dir", str(small_dataset), "--tfds-dir",
                     str(tmp_path / "tfds"), "--no-save"]) == 0
    [r] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (r["kind"], r["arch"], r["task"], r["workers"], r["fine_tune"], r["augment"]) == (
        "fed", "vgg16", "multiclass", 0, 0, False)
    assert r["images_per_s"] > 0 and r["step_images_per_s"] > 0 and r["batches_timed"] >= 2
    assert r["vs_step"] == round(r["images_per_s"] / r["step_images_per_s"], 3)
