"""A hostile user's cases: no shared run folder, no traceback, no silent nonsense, nothing lost
or half-written, damaged files named (issue 16). Tiny data, CPU."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
from flax import serialization

from training_helpers import assert_close, tiny_config, tiny_splits, without_seconds
from xrayjax import interrupts, runfiles
from xrayjax.config import TrainConfig, resolve_run
from xrayjax.data import DataConfig, DataError
from xrayjax.data.__main__ import main as data_main
from xrayjax.data.builder import BadImageWarning
from xrayjax.data.source import resolve_source
from xrayjax.evaluate import main as evaluate_main
from xrayjax import trainer
from xrayjax.loop import fit
from xrayjax.predict import main as predict_main
from xrayjax.runfiles import RunFolderError, load_run
from xrayjax.runlock import RunFolderLock, in_use
from xrayjax.train import main as train_main

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
    """A finished tiny run (vgg16 binary, 32 px, 2 epochs)."""
    return fit(tiny_config(tmp_path_factory.mktemp("run"), "run"), tiny_splits("binary")).run_dir


def _copy(run_dir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(run_dir, tmp_path / "copy"))


# 1. one run folder, one process ------------------------------------------------------------

def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "shared"
    holder = RunFolderLock(out)  # another run holds the folder
    with pytest.raises(RunFolderError, match=rf"run folder {out} is in use by process {os.getpid()} \(host "):
        fit(tiny_config(tmp_path, "shared"), tiny_splits("binary"))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused run wrote nothing
    holder.release()
    # a run killed with -9 leaves its name in .lock and a half-written temporary file
    (out / ".lock").write_text("process 999999 (host elsewhere)")
    (out / ".frozen.msgpack.x1y2.tmp").write_bytes(b"\0" * 1024)
    lock = RunFolderLock(out)
    assert "left by process 999999 (host elsewhere)" in lock.note and "removed 1 temporary file" in lock.note
    assert not list(out.glob("*.tmp"))
    lock.release()
    result = fit(tiny_config(tmp_path, "shared", epochs=1), tiny_splits("binary"))
    assert (result.run_dir / "checkpoint.msgpack").is_file() and (out / ".lock").read_text() == ""


def test_evaluate_refuses_and_predict_warns_while_a_run_trains_in_the_folder(run_dir, tmp_path, capsys):
    from PIL import Image

    run = _copy(run_dir, tmp_path)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(image)
    holder = RunFolderLock(run)  # a training run holds the folder
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".lock"}
    assert evaluate_main(["--run", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: run folder {run} is in use by process {os.getpid()} (host "
                                       f"{os.uname().nodename}); wait for that run to end, then evaluate it\n")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".lock"} == before  # nothing written
    with pytest.warns(UserWarning, match=re.escape(
            f"the run in {run} is in use by process {os.getpid()} (host {os.uname().nodename}) (training or "
            "evaluating it): predicting with its checkpoint after epoch 2")):
        assert predict_main(["--run", str(run), str(image)]) == 0
    holder.release()
    assert in_use(run) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict_main(["--run", str(run), str(image)]) == 0


# 2, 4. settings refused up front, naming the flag, writing nothing --------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--image-size", "8"], "--image-size must be in [32, 1024]"),
    (["--image-size", "100000"], "--image-size must be in [32, 1024]"),
    (["--l2", "nan"], "--l2 must be a number >= 0, got nan"),
    (["--l2", "-5"], "--l2 must be a number >= 0, got -5.0"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--num-devices", "0"], "--num-devices must be at least 1, got 0"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
])
def test_bad_settings_are_named_and_nothing_is_written(flags, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert train_main(["--init", "random", "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("settings", "message"), [
    ({"epochs": "3"}, "--epochs must be an integer, got '3'"),
    ({"views": ["PA"]}, "--views must be a string or path or None, got ['PA']"),
    ({"augment": 1}, "--augment must be True or False, got 1"),
    ({"task": "multi-label"}, "--task must be one of binary, multiclass, multilabel, got 'multi-label'"),
])
def test_python_settings_of_the_wrong_type_or_value_are_value_errors_naming_the_flag(settings, message, tmp_path):
    with pytest.raises(ValueError) as raised:  # a DataError (a bad data setting) is a ValueError too
        fit(tiny_config(tmp_path, "never", **settings), tiny_splits("binary"))
    assert str(raised.value) == message and not (tmp_path / "never").exists()


def test_python_settings_take_paths_and_numpy_numbers_as_the_command_line_types(tmp_path):
    config = TrainConfig(data_dir=tmp_path, out=tmp_path / "run", epochs=np.int64(3), lr=np.float32(0.5))
    resolved = config.resolved(("a", "b"))
    assert (resolved.data_dir, resolved.out) == (str(tmp_path), str(tmp_path / "run"))
    assert type(resolved.epochs) is int and type(resolved.lr) is float and resolved.lr == 0.5
    assert config.data_dir == tmp_path  # the caller's config is left as it is
    assert DataConfig(tfds_dir=tmp_path, seed=np.int64(2)).tfds_dir == str(tmp_path)


def test_batch_larger_than_the_data_is_refused_and_a_failed_start_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 100 is larger than the 10 training images"):
        fit(tiny_config(tmp_path, "big", batch_size=100), tiny_splits("binary"))
    assert not (tmp_path / "big").exists()
    mine = tmp_path / "mine"  # a folder the user made, holding a config.json of their own
    mine.mkdir()
    (mine / "config.json").write_text("the user's own")
    with pytest.raises(FileNotFoundError, match="weights/port.py"):
        fit(tiny_config(tmp_path, "mine", init="imagenet", weights_dir=str(tmp_path)), tiny_splits("binary"))
    assert [p.name for p in mine.iterdir()] == ["config.json"] and (mine / "config.json").read_text() == "the user's own"
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):  # a typo in --out
        fit(tiny_config(tmp_path, "typo", resume=True), tiny_splits("binary"))
    assert not (tmp_path / "typo").exists()


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", **env}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300)


def test_an_unavailable_jax_backend_is_a_message(tmp_path):
    # the training CLI in a process of its own; predict and evaluate call the same check first
    done = _cli(["xrayjax.train", "--init", "random", "--out", str(tmp_path / "x")], JAX_PLATFORMS="cuda")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "JAX_PLATFORMS='cuda'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


def test_an_out_that_is_a_file_is_named_and_kept(small_dataset, tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("notes")
    assert train_main(["--init", "random", "--data-dir", str(small_dataset), "--out", str(out), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: --out {out} is a file, not a run folder; choose a folder (new, or "
                                       "a run's to --resume)\n")
    assert out.read_text() == "notes"


def test_predict_and_evaluate_refuse_a_zero_batch(run_dir, capsys):
    for main in (predict_main, evaluate_main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--run", str(run_dir), "--batch-size", "0", *(["a.png"] if main is predict_main else [])])
        assert exit_info.value.code == 2
        command = "predict" if main is predict_main else "evaluate"
        assert capsys.readouterr().err == (f"error: argument --batch-size: must be at least 1, got 0 (python -m "
                                           f"xrayjax.{command} --help lists the flags)\n")  # one line, no usage


def test_without_a_validation_split_the_result_says_so(tmp_path, capsys, monkeypatch):
    import xrayjax.train as cli

    splits = tiny_splits("binary")
    no_val = type(splits)(splits.train, splits.validation.take(np.arange(0)), splits.test, splits.class_names)
    monkeypatch.setattr(cli, "fit", lambda spec, fit=cli.fit: fit(spec, no_val))
    cli.run(resolve_run(tiny_config(tmp_path, "noval", epochs=1), no_val))
    assert "(1 epoch, no validation split)" in capsys.readouterr().out
    assert "val_accuracy" not in json.loads((tmp_path / "noval" / "history.json").read_text())[0]


# 2, 3. damaged or foreign run folders are named --------------------------------------------

def _edit_json(path: pathlib.Path, edit) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("damage", ["invalid_json", "missing_key", "missing_setting", "unknown_key",
                                    "checkpoint_key", "history"])
def test_a_damaged_run_folder_is_named(damage, run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    if damage == "invalid_json":
        (run / "config.json").write_text('{"config": {"arch": "vgg16",}')
        expected = f"{run / 'config.json'} is not valid JSON"
    elif damage == "missing_key":
        _edit_json(run / "config.json", lambda v: v.pop("class_names"))
        expected = f"{run / 'config.json'} lacks 'config', 'class_names' or 'num_devices'"
    elif damage == "missing_setting":
        _edit_json(run / "config.json", lambda v: v["config"].pop("arch"))
        expected = f"{run / 'config.json'} lacks the settings arch"
    elif damage == "unknown_key":
        _edit_json(run / "config.json", lambda v: v["config"].update(mixup=0.2))
        expected = f"{run / 'config.json'} has settings this version of xrayjax does not know: mixup"
    elif damage == "checkpoint_key":
        payload = serialization.msgpack_restore((run / "checkpoint.msgpack").read_bytes())
        del payload["frozen_sha256"]
        (run / "checkpoint.msgpack").write_bytes(serialization.msgpack_serialize(payload))
        expected = f"{run / 'checkpoint.msgpack'} lacks 'frozen_sha256'"
    else:
        (run / "history.json").write_text("[{")
        expected = f"{run / 'history.json'} is not valid JSON"
    with pytest.raises(RunFolderError) as info:
        load_run(run)
    assert expected in str(info.value)
    assert evaluate_main(["--run", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_run_written_by_an_older_version_is_named(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    _edit_json(run / "config.json", lambda v: v["config"].pop("skip_bad_images"))
    with pytest.raises(RunFolderError, match="lacks the settings skip_bad_images: written by an older version"):
        load_run(run)
    # a setting that changes nothing trained (one a resume may change) takes its default
    run = _copy(run_dir, tmp_path / "before_workers")
    _edit_json(run / "config.json", lambda v: v["config"].pop("workers"))
    assert load_run(run).config.workers == 0


def test_a_run_of_the_report_s_four_class_task_reads_as_multiclass(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    _edit_json(run / "config.json", lambda v: v["config"].update(task="four_class", arch="vgg19"))
    assert load_run(run).config.task == "multiclass"


# 5. predict: every readable image, every failure named --------------------------------------

def test_predict_reads_what_it_can_and_names_every_failure(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    (run / "history.json").unlink()  # predict does not need it
    good = tmp_path / "good.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50), np.uint8)).save(good)
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    missing = tmp_path / "gone.jpeg"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_main(["--run", str(run), str(junk), str(good), str(missing), str(empty)]) == 1
    captured = capsys.readouterr()
    assert str(good) in captured.out and str(junk) not in captured.out
    assert f"'{junk}': not an image" in captured.err and f"'{missing}': no such file" in captured.err
    assert f"'{empty}' is a folder without image files" in captured.err
    assert "3 of 4 images could not be read" in captured.err


# 6. rotten bytes are found ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["frozen.msgpack", "checkpoint.msgpack"])
def test_rotten_bytes_of_the_same_size_are_named(name, run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    data = bytearray((run / name).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # rot inside the weights, size unchanged
    (run / name).write_bytes(bytes(data))
    with pytest.raises(RunFolderError, match=f"{run / name} is damaged"):
        load_run(run)
    assert predict_main(["--run", str(run), "x.png"]) == 2
    assert f"{run / name} is damaged" in capsys.readouterr().err


# 2, 7. the data commands: symlinks, read-only output, interrupted preparation ---------------

def test_dangling_and_looping_symlinks_are_unreadable_files(small_dataset, tmp_path, capsys):
    data = pathlib.Path(shutil.copytree(small_dataset, tmp_path / "data", symlinks=True))
    (data / "all" / "train" / "covid" / "ghost.png").symlink_to(tmp_path / "nowhere.png")
    (data / "all" / "train" / "covid" / "loop.png").symlink_to("loop.png")
    assert data_main(["audit", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "ghost.png" in out and "loop.png" in out
    report = json.loads(_cli(["xrayjax.data", "audit", "--data-dir", str(data), "--json"]).stdout)
    assert {pathlib.Path(u["file"]).name for u in report["unreadable"]} == {"ghost.png", "loop.png"}
    tfds_dir = str(tmp_path / "tfds")
    assert data_main(["prepare", "--data-dir", str(data), "--tfds-dir", tfds_dir]) == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "--skip-bad-images" in err and "Traceback" not in err
    with pytest.warns(BadImageWarning) as skipped:
        assert data_main(["prepare", "--data-dir", str(data), "--tfds-dir", tfds_dir, "--skip-bad-images"]) == 0
    names = sorted(str(w.message).split(": cannot read")[0].rsplit("/", 1)[-1] for w in skipped)
    assert names == ["ghost.png"] * 2 + ["loop.png"] * 2  # once in each of the challenge's two tasks


def test_prepare_cleans_an_interrupted_preparation_and_names_a_read_only_folder(small_dataset, tmp_path,
                                                                                 monkeypatch, capsys):
    from xrayjax.data import builder

    tfds_dir = tmp_path / "tfds"
    source = resolve_source(str(small_dataset))
    listing = source.listing()
    config_dir = tfds_dir / builder.NAME / builder.config_for(source, listing, "gray", None).name
    stale = config_dir / "incomplete.0123abcd_1.0.0"
    stale.mkdir(parents=True)
    (stale / "part.array_record").write_bytes(b"\0" * 100)
    prepared = builder.prepare(source, listing, tfds_dir=str(tfds_dir))
    assert not stale.exists() and pathlib.Path(prepared.data_dir).parent == config_dir

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(builder.XrayFolders, "download_and_prepare", read_only)
    with pytest.raises(DataError, match=r"cannot write the prepared data into .* pass a writable --tfds-dir"):
        builder.prepare(source, source.listing("binary"), tfds_dir=str(tmp_path / "readonly"), task="binary")


# 7. SIGTERM ends a run as Ctrl-C does -------------------------------------------------------

def test_sigterm_keeps_the_last_checkpoint_with_the_ctrl_c_message(small_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": ""}
    command = [sys.executable, "-m", "xrayjax.train", "--init", "random", "--image-size", "32", "--epochs",
               "100000", "--batch-size", "4", "--data-dir", str(small_dataset), "--tfds-dir",
               str(tmp_path / "tfds"), "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if line.startswith("epoch 2/"):
                process.send_signal(signal.SIGTERM)
                break
        rest = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == 143, "".join(lines) + rest
    assert rest.strip().splitlines()[-1] == f"interrupted: continue the run with --resume --out {out} (it takes the " \
                                            "run's settings)"
    assert "Traceback" not in rest
    done = runfiles.read_checkpoint(out).epoch
    assert done >= 2 and (out / ".lock").read_text() == ""
    # --resume takes the run's settings (data, size, batch, init...) left out; a flag given must match
    assert train_main(["--resume", "--out", str(out), "--image-size", "64", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: --resume: the run in {out} was trained with other settings: "
                                       "image_size=32 (now 64); leave those flags out (--resume takes the run's) "
                                       "or choose another --out\n")
    saved = json.loads((out / "config.json").read_text())["config"]
    # --eval-train, like --no-eval, is the command's own: it changes what the end scores, not the run
    assert train_main(["--resume", "--out", str(out), "--epochs", str(done + 1), "--quiet", "--no-eval",
                       "--eval-train"]) == 0
    assert len(runfiles.read_history(out)) == done + 1
    assert json.loads((out / "config.json").read_text())["config"] == {
        **saved, "epochs": done + 1, "evaluate": False, "eval_train": True, "quiet": True, "resume": True}


@contextlib.contextmanager
def _sigterm_in_call(monkeypatch, n: int):
    """Inside, the train step raises SIGTERM during its ``n``-th call, with xrayjax's handlers
    installed; yields the list of each call's key."""
    compile_steps, calls = trainer.Trainer.compile, []

    def compile_then_signal(self, state):
        compile_steps(self, state)
        step = self.train_fn

        def train_fn(*args):
            calls.append(args[2])
            if len(calls) == n:
                signal.raise_signal(signal.SIGTERM)
            return step(*args)
        self.train_fn = train_fn

    monkeypatch.setattr(trainer.Trainer, "compile", compile_then_signal)
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        yield calls
    finally:
        interrupts._pending.clear()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_a_run_stopped_mid_epoch_resumes_from_that_step_exactly(tmp_path, monkeypatch):
    # SIGTERM lands inside epoch 2's second step (of 3): the run stops before the third, keeps
    # where it stopped, and --resume trains only the third, ending equal to the run never stopped.
    splits = tiny_splits("binary")
    whole = fit(tiny_config(tmp_path, "whole", cache_features=False), splits)
    with _sigterm_in_call(monkeypatch, 5) as calls, pytest.raises(interrupts.Terminated):
        fit(tiny_config(tmp_path, "stopped", cache_features=False), splits)
    stopped = runfiles.read_checkpoint(tmp_path / "stopped")
    assert (len(calls), stopped.epoch, stopped.step, stopped.sums["count"]) == (5, 1, 2, 8.0)
    calls.clear()
    resumed = fit(tiny_config(tmp_path, "stopped", cache_features=False, resume=True), splits)
    assert len(calls) == 1  # the epoch's third step only
    assert without_seconds(resumed.history) == without_seconds(whole.history)
    assert_close(resumed.state.params, whole.state.params, 0.0)
    assert_close(resumed.state.opt_state, whole.state.opt_state, 0.0)
    assert runfiles.read_checkpoint(tmp_path / "stopped").step == 0


def test_a_signal_in_the_last_step_still_stops_the_run(tmp_path, monkeypatch):
    # SIGTERM inside the last step of the last epoch: that epoch is whole and kept, and the run
    # still ends as interrupted (not as finished: the command would go on to evaluate).
    with _sigterm_in_call(monkeypatch, 3) as calls, pytest.raises(interrupts.Terminated):
        fit(tiny_config(tmp_path, "last", epochs=1, cache_features=False), tiny_splits("binary"))
    kept = runfiles.read_checkpoint(tmp_path / "last")
    assert (len(calls), kept.epoch, kept.step) == (3, 1, 0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one
def test_a_sigterm_that_a_finalizer_swallowed_still_ends_the_run_at_the_next_epoch(run_dir, tmp_path):
    # A signal handler's exception raised inside a finalizer is printed as "Exception ignored"
    # and lost; the training loop raises it again at the next epoch, keeping the checkpoint.
    class Collected:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)

    out = _copy(run_dir, tmp_path)  # 2 epochs done
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        Collected()  # collected at once: the handler's Terminated is swallowed
        with pytest.raises(interrupts.Terminated):
            fit(tiny_config(tmp_path, "copy", epochs=5, resume=True), tiny_splits("binary"))
    finally:
        interrupts._pending.clear()
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    assert runfiles.read_checkpoint(out).epoch == 2 and len(runfiles.read_history(out)) == 2


def test_help_documents_every_checked_bound():
    from xrayjax.config import parser

    text = " ".join(parser().format_help().split())
    for bound in ("32 to 1024", "in [0, 1)", "Adam learning rate, > 0", "Dense kernels, >= 0", "seed (>= 0)",
                  "epochs to train, at least 1", "at most the number of training images", "first N (>= 1)",
                  "0 to the backbone's number of blocks"):
        assert bound in text, bound


def test_the_interrupted_hint_says_resume_only_when_a_checkpoint_exists(run_dir, tmp_path):
    from xrayjax.train import _interrupted_hint

    assert "--resume" in _interrupted_hint(TrainConfig(out=str(run_dir), epochs=5))  # 2 of 5 epochs done
    assert f"python -m xrayjax.evaluate --run {run_dir}" in _interrupted_hint(TrainConfig(out=str(run_dir), epochs=2))
    assert _interrupted_hint(TrainConfig(out=str(tmp_path / "empty"))) == ": no epoch finished, so nothing was kept"
