"""Training: frozen weights stay bit-identical, D devices = 1 device, fast path = full path,
exact resume, clear stops (missing weights, NaN), fine-tuning opens only the last blocks,
and a short run on the real data learns. CPU, tiny images, 4 virtual devices (conftest)."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from training_helpers import SIZE, assert_close, assert_history_close, flat, tiny_config, tiny_splits
from xrayjax import training
from xrayjax.data import DataConfig, Splits, load_splits
from xrayjax.evaluate import evaluate_run
from xrayjax.models import BLOCKS, create_model
from xrayjax.training import (
    TrainingDiverged,
    build_step_model,
    init_variables,
    load_run,
    main,
    train,
    trainable_mask,
)

@pytest.fixture(scope="module")
def vgg_runs(tmp_path_factory):
    """vgg16 binary, 2 epochs, 10 images in batches of 4 (last batch padded): full path on
    4 and on 1 device, and the cached-feature fast path."""
    tmp = tmp_path_factory.mktemp("vgg")
    splits = tiny_splits("binary")
    return {
        "full4": train(tiny_config(tmp, "full4", cache_features=False, num_devices=4), splits),
        "full1": train(tiny_config(tmp, "full1", cache_features=False, num_devices=1), splits),
        "fast4": train(tiny_config(tmp, "fast4", num_devices=4, evaluate=True), splits),
        "splits": splits,
        "tmp": tmp,
    }


def test_frozen_backbone_bit_identical_head_moves_vgg16(vgg_runs):
    result = vgg_runs["full4"]
    model = build_step_model("vgg16", "binary")
    start = init_variables(model, SIZE, init="random", seed=0)
    final = jax.device_get(result.state.params)
    for name, kernel in flat(start["params"]["backbone"]).items():
        assert np.array_equal(kernel, flat(final["backbone"])[name]), name
    moved = [not np.array_equal(v, flat(final["head"])[k]) for k, v in flat(start["params"]["head"]).items()]
    assert all(moved)
    assert int(result.state.step) == 2 * 3  # ceil(10 / 4) steps per epoch


def test_four_devices_equal_one_device(vgg_runs):
    assert_history_close(vgg_runs["full4"].history, vgg_runs["full1"].history, 1e-5)
    assert_close(vgg_runs["full4"].state.params, vgg_runs["full1"].state.params, 1e-5)


def test_cached_features_equal_full_path(vgg_runs):
    assert_history_close(vgg_runs["fast4"].history, vgg_runs["full4"].history, 1e-5)
    assert_close(vgg_runs["fast4"].state.params, vgg_runs["full4"].state.params, 1e-5)
    assert_close(vgg_runs["fast4"].state.opt_state, vgg_runs["full4"].state.opt_state, 1e-5)


def test_evaluation_at_the_end_uses_the_cached_features(vgg_runs, tmp_path):
    # The fast path hands its cached backbone features (test split included) to the
    # evaluation; the same run evaluated afresh through the backbone must agree.
    result = vgg_runs["fast4"]
    assert result.metrics["n"] == len(vgg_runs["splits"].test)
    assert json.loads((result.run_dir / "metrics.json").read_text()) == result.metrics
    again = evaluate_run(shutil.copytree(result.run_dir, tmp_path / "again"), vgg_runs["splits"], quiet=True)
    assert again["accuracy_by_split"] == result.metrics["accuracy_by_split"]
    for cached, fresh in zip(result.metrics["test_predictions"], again["test_predictions"]):
        assert cached["predicted"] == fresh["predicted"]
        np.testing.assert_allclose(list(cached["probabilities"].values()),
                                   list(fresh["probabilities"].values()), atol=1e-5)


def test_no_validation_split_and_features_too_big_for_the_device(vgg_runs, tmp_path, monkeypatch):
    # An empty validation split (--val-fraction 0) trains on both paths; when the features
    # would not fit in device memory the run falls back to the full path. Same training.
    splits = vgg_runs["splits"]
    no_val = Splits(splits.train, splits.validation.take(np.arange(0)), splits.test, splits.class_names)
    fast = train(tiny_config(tmp_path, "fast", num_devices=4), no_val)
    monkeypatch.setattr(training, "_features_fit_on_device", lambda *args: False)
    full = train(tiny_config(tmp_path, "full", num_devices=4), no_val)
    assert "features" in fast.timings and "features" not in full.timings
    for run in (fast, full):
        assert [e["val_accuracy"] for e in run.history] == [0.0, 0.0]
        assert [e["train_loss"] for e in run.history] == pytest.approx(
            [e["train_loss"] for e in vgg_runs["fast4"].history], rel=1e-5)
    assert_close(fast.state.params, full.state.params, 1e-5)


def test_run_folder_and_load_run(vgg_runs):
    result = vgg_runs["fast4"]
    meta = json.loads(result.config_path.read_text())
    assert meta["config"]["l2"] == 1e-3 and meta["config"]["init"] == "random"
    assert meta["num_devices"] == 4 and meta["class_names"] == ["covid", "normal"]
    assert {"jax", "jaxlib", "flax", "optax", "numpy", "python"} <= set(meta["versions"])
    assert json.loads(result.history_path.read_text()) == result.history
    # Phase timings: the fast path caches features; the full path compiles its pmapped steps.
    assert json.loads((result.run_dir / "timings.json").read_text()) == result.timings
    assert {"compile", "features", "train", "evaluate"} <= set(result.timings)
    assert "features" not in vgg_runs["full4"].timings and vgg_runs["full4"].timings["compile"] > 0
    run = load_run(result.run_dir)
    assert run.config.arch == "vgg16" and run.class_names == ("covid", "normal")
    assert_close(run.variables["params"], result.state.params, 0.0)
    images = vgg_runs["splits"].test.images
    logits = run.model.apply(run.variables, images.astype(np.float32), train=False)
    assert logits.shape == (len(images), 1)


def test_resume_equals_uninterrupted_run(vgg_runs):
    tmp, splits = vgg_runs["tmp"], vgg_runs["splits"]
    first = train(tiny_config(tmp, "resumed", num_devices=4, epochs=1), splits)
    assert len(first.history) == 1
    resumed = train(tiny_config(tmp, "resumed", num_devices=4, epochs=2, resume=True), splits)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(vgg_runs["fast4"].history)
    assert_close(resumed.state.params, vgg_runs["fast4"].state.params, 0.0)
    assert_close(resumed.state.opt_state, vgg_runs["fast4"].state.opt_state, 0.0)
    with pytest.raises(ValueError, match="other settings: lr"):
        train(tiny_config(tmp, "resumed", num_devices=4, lr=1e-3, resume=True), splits)
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(tmp, "resumed", num_devices=4), splits)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    # One step per epoch: epoch 1 is finite, its 1e30-sized Adam update blows up epoch 2.
    config = tiny_config(tmp_path, "nan", lr=1e30, batch_size=8, num_devices=4)
    splits = tiny_splits("binary", n_train=8)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 1.*epoch 1\) is kept.*lower --lr"):
        train(config, splits)
    assert len(json.loads((tmp_path / "nan" / "history.json").read_text())) == 1
    assert len(load_run(tmp_path / "nan").history) == 1


def test_failed_checkpoint_write_stops_the_run_and_keeps_the_last_one(tmp_path, monkeypatch):
    # Checkpoints are written on a background thread; a failed write must still stop the
    # run with its error, and the previous checkpoint must be intact.
    real, written = training.write_atomic, []

    def disk_full_at_epoch_2(path, data):
        written.append(path.name)
        if written.count("checkpoint.msgpack") == 2 and path.name == "checkpoint.msgpack":
            raise OSError("No space left on device")
        real(path, data)

    monkeypatch.setattr(training, "write_atomic", disk_full_at_epoch_2)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_config(tmp_path, "full_disk", epochs=3), tiny_splits("binary"))
    checkpoint = training._read_checkpoint(tmp_path / "full_disk" / "checkpoint.msgpack")
    assert checkpoint["epoch"] == 1 and len(json.loads(checkpoint["history"])) == 1


def test_missing_weights_message(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"weights/port.py --arch vgg16.*--init random"):
        train(tiny_config(tmp_path, "w", init="imagenet", weights_dir=str(tmp_path)), tiny_splits("binary"))
    code = main(["--arch", "vgg19", "--weights-dir", str(tmp_path), "--out", str(tmp_path / "cli"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no ImageNet weights for vgg19") and "Traceback" not in err


def test_trainable_mask_opens_last_blocks():
    shapes = jax.eval_shape(
        create_model("resnet50", "four_class").init, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32)
    )
    mask = trainable_mask(shapes["params"], "resnet50", 2)
    flat = traverse_util.flatten_dict(mask["backbone"])
    opened = {path[0] for path, on in flat.items() if on}
    assert opened == {f"conv5_block{b}_{i}_{kind}" for b in (2, 3) for i in (1, 2, 3) for kind in ("conv", "bn")}
    assert all(jax.tree.leaves(mask["head"]))
    assert not any(jax.tree.leaves(trainable_mask(shapes["params"], "resnet50", 0)["backbone"]))
    assert BLOCKS["resnet50"][-2:] == ("conv5_block2", "conv5_block3")


def test_fine_tune_opens_only_the_last_block(tmp_path):
    result = train(tiny_config(tmp_path, "ft", task="four_class", fine_tune=1, epochs=1), tiny_splits("four_class"))
    start = init_variables(build_step_model("vgg16", "four_class"), SIZE, init="random", seed=0)
    final = flat(jax.device_get(result.state.params["backbone"]))
    for name, value in flat(start["params"]["backbone"]).items():
        assert np.array_equal(value, final[name]) == (not name.startswith("['block5_")), name


def test_frozen_resnet50_weights_and_statistics_bit_identical(tmp_path):
    """BatchNorm in the backbone (frozen: statistics never move) and in the head (they move)."""
    config = tiny_config(tmp_path, "resnet", arch="resnet50", task="four_class", epochs=1,
                     cache_features=False, num_devices=2)
    result = train(config, tiny_splits("four_class", n_train=6))
    start = init_variables(build_step_model("resnet50", "four_class"), SIZE, init="random", seed=0)
    final = jax.device_get({"params": result.state.params, "batch_stats": result.state.batch_stats})
    for col in ("params", "batch_stats"):
        backbone = flat(final[col]["backbone"])
        assert all(np.array_equal(v, backbone[k]) for k, v in flat(start[col]["backbone"]).items()), col
        head = flat(final[col]["head"])
        assert not any(np.array_equal(v, head[k]) for k, v in flat(start[col]["head"]).items()), col


def test_real_data_training_loss_falls(data_root, tmp_path):
    splits = load_splits(DataConfig(task="binary", data_dir=str(data_root), tfds_dir=str(tmp_path / "tfds"),
                                    image_size=64))
    # 10 epochs (cheap on the fast path): on random 64-px features the loss is noisy from
    # epoch to epoch, by 10 it is below 0.65x the first for seeds 0, 1 and 2
    config = tiny_config(tmp_path, "real", image_size=64, epochs=10, batch_size=16, lr=1e-3)
    history = train(config, splits).history
    assert len(history) == 10
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["train_accuracy"] > 0.7
