"""experiments/gpu_check.sh --smoke: the GPU check's whole path on the CPU (tiny sizes), so it
works when a GPU comes. Nothing here times anything."""

import json
import os
import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_smoke(small_dataset, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "TFDS_DIR": str(tmp_path / "tfds"), "XLA_FLAGS": "",
           "DATA_DIR": str(small_dataset)}
    done = subprocess.run(["bash", "experiments/gpu_check.sh", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    bench = [r for r in records if "images_per_s" in r and r.get("kind") != "input"]
    inputs = [r for r in records if r.get("kind") == "input"]
    assert [(r["batch"], r["workers"], r["image_size"]) for r in inputs] == [(4, 0, 32)]
    assert "input 32 px, batch 4, 0 workers" in done.stdout
    assert [(r["arch"], r["dtype"], r["batch"]) for r in bench] == [("vgg16", "bf16", 4)]
    for r in bench:
        assert r["reference_images_per_s"] > 0
        assert r["vs_reference"] == round(r["images_per_s"] / r["reference_images_per_s"], 3)
        assert {"device", "jax", "date"} <= set(r)
    e2e = [r for r in records if r.get("kind") == "e2e"]
    assert [r["run"] for r in e2e] == ["cold"]
    for r in e2e:
        assert r["epochs"] == 2 and r["wall_s"] > 0 and 0 <= r["test_accuracy"] <= 1
        assert {"setup", "compile", "features", "train", "evaluate"} <= set(r["timings"])
    layers = [json.loads(line) for line in (out / "vgg_layers.jsonl").read_text().splitlines()]
    assert len([r for r in layers if "tflops" in r]) == 13  # every conv layer of VGG16
    padded = [r for r in layers if "max_abs_diff_vs_3" in r]
    assert len(padded) == 3 and all(r["max_abs_diff_vs_3"] <= 1e-4 for r in padded)  # zero padding is exact
    assert "e2e cold" in done.stdout and "not judged here" in done.stdout
