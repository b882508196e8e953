"""Multi-process training on CPU: two local processes with 2 devices each (gloo collectives)
equal one process with 4 devices, only process 0 writes, every process resumes from the same
checkpoint; a missing peer or coordinator fails with a message instead of hanging; settings
come from flags or from the launcher's environment.

Run as ``python tests/test_distributed.py '<json>'`` this file is one worker process.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import pytest
from flax import serialization

from xrayjax import distributed, interrupts
from xrayjax.loop import fit

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the worker subprocess runs this file
from training_helpers import (  # noqa: E402
    CountingImages, assert_close, assert_history_close, tiny_config, tiny_splits,
)
from xrayjax.tasks import SPLITS  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT = 240  # seconds; a guard against hangs, far above a normal run
LAUNCHER_ENV = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_ENV)}
    return {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(REPO)}


def _start_processes(commands: list[list[str]], tmp: pathlib.Path, tag: str):
    """Start every command at once, each logging into ``<tag><i>.log``; returns a function that
    waits for them all and gives (exit status, log) of each, killing all on a hang."""
    logs = [tmp / f"{tag}{i}.log" for i in range(len(commands))]
    procs = []
    for command, log in zip(commands, logs):
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(command, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT))

    def wait() -> list[tuple[int, str]]:
        try:
            codes = [p.wait(timeout=PROCESS_TIMEOUT) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{tag}: processes hung; logs:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
        return [(code, log.read_text()) for code, log in zip(codes, logs)]

    return wait


def _start_two_processes(tmp: pathlib.Path, phases: list[tuple[str, dict]]):
    """Start both processes, each training every phase in turn (out: ``multi<process id>``) and
    dumping params and history after each; returns a function that waits for them and gives the
    dumps per phase, per process."""
    port = _free_port()
    jobs = [
        {"tmp": str(tmp), "name": f"multi{i}",
         "phases": [{"dump": str(tmp / f"{tag}{i}.msgpack"),
                     "config": {**overrides, "coordinator": f"127.0.0.1:{port}", "num_processes": 2,
                                "process_id": i, "coordinator_timeout": 60}}
                    for tag, overrides in phases]}
        for i in range(2)
    ]
    wait = _start_processes([[sys.executable, __file__, json.dumps(job)] for job in jobs], tmp, "multi")

    def dumps() -> list[list[dict]]:
        for code, log in wait():
            assert code == 0, log[-4000:]
        return [[serialization.msgpack_restore(pathlib.Path(job["phases"][k]["dump"]).read_bytes()) for job in jobs]
                for k in range(len(phases))]

    return dumps


def _sigterm_reaches_xrayjax() -> bool:
    """Whether a SIGTERM sent now reaches xrayjax's handler (raising Terminated) after the runtime started."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # a Python handler runs between two bytecodes, within this
    except interrupts.Terminated:
        interrupts.install()  # forget it: the next phase trains on
        return True
    return False


def _worker(job: dict) -> None:
    tmp = pathlib.Path(job["tmp"])
    for k, phase in enumerate(job["phases"]):
        if k:  # between the phases, process 1's host gets a copy of process 0's run folder
            distributed.wait_for_all("phase written")
            if phase["config"]["process_id"] == 1:
                written = sorted(p.name for p in (tmp / "multi1").glob("*"))  # process 1 wrote nothing
                (tmp / "process1_files.json").write_text(json.dumps(written))
                shutil.copytree(tmp / "multi0", tmp / "multi1", dirs_exist_ok=True)
                shutil.copy(tmp / "multi1" / "checkpoint.msgpack", tmp / "copied.msgpack")
            distributed.wait_for_all("run folder copied")
        splits = tiny_splits("binary")
        if not k:  # the full path reads images every step: count this process's reads
            splits = dataclasses.replace(splits, **{name: dataclasses.replace(
                getattr(splits, name), images=CountingImages(getattr(splits, name).images)) for name in SPLITS})
        if not k:
            interrupts.install()  # as the command line does, before the runtime starts
        result = fit(tiny_config(tmp, job["name"], **phase["config"]), splits)
        state = serialization.to_state_dict(jax.device_get(result.state))
        payload = {"params": state["params"], "opt_state": state["opt_state"], "history": json.dumps(result.history),
                   "reads": {name: getattr(splits, name).images.read for name in SPLITS} if not k else {},
                   "sigterm": _sigterm_reaches_xrayjax() if not k else None}
        pathlib.Path(phase["dump"]).write_bytes(serialization.msgpack_serialize(payload))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """vgg16 binary, 10 images in global batches of 4: epoch 1 on the full path, then resumed
    to epoch 2 on the cached-feature path; one process with 4 devices vs two with 2 each (the
    two train both epochs in one process each, process 1 resuming from a copy of process 0's
    epoch-1 folder)."""
    tmp = tmp_path_factory.mktemp("dist")
    splits = tiny_splits("binary")
    multi = _start_two_processes(tmp, [("epoch1", dict(epochs=1, cache_features=False)),
                                       ("epoch2", dict(epochs=2, resume=True))])
    # the one-process runs train here while the two processes run
    single1 = fit(tiny_config(tmp, "single", epochs=1, cache_features=False, num_devices=4), splits)
    single2 = fit(tiny_config(tmp, "single", epochs=2, resume=True, num_devices=4), splits)
    multi = multi()
    return {"tmp": tmp, "single": (single1, single2), "multi": multi,
            "process1_files": json.loads((tmp / "process1_files.json").read_text()),
            "copied": (tmp / "copied.msgpack").read_bytes()}


def test_two_processes_equal_one_process(runs):
    single1, single2 = runs["single"]
    for single, multi in zip((single1, single2), runs["multi"]):
        reference = jax.device_get(single.state)
        for dump in multi:
            assert_close(dump["params"], serialization.to_state_dict(reference.params), 1e-5)
            assert_close(dump["opt_state"], serialization.to_state_dict(reference.opt_state), 1e-5)
            assert_history_close(json.loads(dump["history"]), single.history, 1e-5)
    assert len(json.loads(runs["multi"][1][0]["history"])) == 2


def test_each_process_reads_only_its_share(runs):
    # Epoch 1, full path, 10 train and 6 validation images in global batches of 4 on 2 x 2
    # devices: the first train batch (compiling), an epoch of train batches and the validation
    # pass. The two processes read 20 images together, as one process does, never one twice:
    # process 0 reads 6 of the epoch's 10 train images (the padding of the last batch falls on
    # process 1's devices), process 1 reads 4.
    reads = [dump["reads"] for dump in runs["multi"][0]]
    assert [r["train"] for r in reads] == [2 + 6, 2 + 4] and [r["validation"] for r in reads] == [4, 2]
    assert [r["test"] for r in reads] == [0, 0]


def test_sigterm_stays_xrayjax_s_on_every_process(runs):
    # JAX's preemption service, on by default, takes SIGTERM over when the runtime starts: training
    # then ignored a launcher's SIGTERM (scancel), went on to the end and kept no mid-epoch checkpoint
    assert [dump["sigterm"] for dump in runs["multi"][0]] == [True, True]


def test_only_process_zero_writes(runs):
    tmp = runs["tmp"]
    assert runs["process1_files"] == []
    assert {p.name for p in (tmp / "multi0").glob("*")} >= {"config.json", "history.json", "checkpoint.msgpack"}
    meta = json.loads((tmp / "multi0" / "config.json").read_text())
    assert meta["num_devices"] == 4 and meta["num_processes"] == 2
    assert len(json.loads((tmp / "multi0" / "history.json").read_text())) == 2
    # Process 1 resumed from its copy of the epoch-1 checkpoint and left it untouched.
    assert (tmp / "multi1" / "checkpoint.msgpack").read_bytes() == runs["copied"]
    assert len(json.loads((tmp / "multi1" / "history.json").read_text())) == 1


def test_processes_started_with_other_settings_stop_naming_them(tmp_path):
    # process 1 with another --seed: its splits and batches would differ from process 0's and the
    # run came out silently wrong (or, with other --epochs, hung in a collective)
    port = _free_port()
    jobs = [{"tmp": str(tmp_path), "name": f"seed{i}", "phases": [{"dump": str(tmp_path / f"d{i}"), "config": {
        "seed": 5 * i, "coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i,
        "coordinator_timeout": 60}}]} for i in range(2)]
    results = _start_processes([[sys.executable, __file__, json.dumps(job)] for job in jobs], tmp_path, "seed")()
    assert all(code != 0 for code, _ in results)
    assert "process 1 was started with other settings than process 0: --seed 5 (process 0: 0)" in results[1][1]
    assert "process(es) 1 were started with other settings than this process 0" in results[0][1]
    assert not (tmp_path / "seed0" / "checkpoint.msgpack").exists()


def test_a_process_that_dies_ends_the_others_with_one_line_and_status_1(small_dataset, tmp_path):
    port = _free_port()
    procs, logs = [], [tmp_path / f"die{i}.log" for i in range(2)]
    for i, log in enumerate(logs):
        command = [sys.executable, "-m", "xrayjax.train", "--init", "random", "--image-size", "32", "--epochs",
                   "100000", "--batch-size", "4", "--augment", "--quiet", "--data-dir", str(small_dataset),
                   "--tfds-dir", str(tmp_path / "tfds"), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                   "2", "--process-id", str(i), "--out", str(tmp_path / f"run{i}")]
        with open(log, "wb") as f:
            procs.append(subprocess.Popen(command, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not (tmp_path / "run0" / "checkpoint.msgpack").exists():  # an epoch done: training under way
            assert time.monotonic() < deadline and procs[0].poll() is None, logs[0].read_text()[-3000:]
            time.sleep(0.2)
        procs[1].kill()
        code = procs[0].wait(timeout=PROCESS_TIMEOUT)
    finally:
        for proc in procs:
            proc.kill()
    log = logs[0].read_text()
    # at exit JAX's shutdown barrier waited for the dead process and aborted: a stack trace, status 134
    assert code == 1 and "error: a collective with the other processes failed" in log, log[-3000:]
    assert "Shutdown barrier" not in log and (tmp_path / "run0" / "checkpoint.msgpack").exists()


def test_missing_peer_or_coordinator_fails_with_message(tmp_path):
    """Process 0 whose peer never comes, and process 1 whose coordinator is not there."""
    commands = [
        [sys.executable, "-m", "xrayjax.train", "--init", "random", "--image-size", "32", "--quiet",
         "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", str(i),
         "--coordinator-timeout", "2", "--out", str(tmp_path / f"run{i}")]
        for i in range(2)
    ]
    for i, (code, log) in enumerate(_start_processes(commands, tmp_path, "alone")()):
        assert code == distributed.EXIT_NOT_JOINED, log[-3000:]
        assert f"error: process {i} of 2 via flags at coordinator 127.0.0.1:" in log
        assert "could not reach all processes within 2 s" in log and "--coordinator-timeout" in log
        assert not (tmp_path / f"run{i}").exists()


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(LAUNCHER_ENV):
            monkeypatch.delenv(key)
    return monkeypatch


def test_single_process_without_flags_or_launcher(clean_env):
    cfg = distributed.from_args_and_env()
    assert not cfg.enabled
    distributed.initialize(cfg)  # a no-op: nothing joined
    assert not jax.distributed.is_initialized()
    assert not distributed.from_args_and_env("h:1", 1, 0).enabled


def test_flags_and_their_errors(clean_env):
    cfg = distributed.from_args_and_env("10.0.0.1:1234", 2, 1, initialization_timeout=20)
    assert (cfg.launcher, cfg.coordinator, cfg.num_processes, cfg.process_id) == ("flags", "10.0.0.1:1234", 2, 1)
    assert cfg.initialization_timeout == 20
    with pytest.raises(distributed.DistributedError, match=r"needs --num-processes, --process-id too"):
        distributed.from_args_and_env("10.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match="must be HOST:PORT"):
        distributed.from_args_and_env("10.0.0.1", 2, 0)
    with pytest.raises(distributed.DistributedError, match=r"--process-id must be in \[0, 2\)"):
        distributed.from_args_and_env("h:1", 2, 2)
    with pytest.raises(distributed.DistributedError, match="initialization_timeout must be at least 1"):
        distributed.from_args_and_env("h:1", 2, 0, initialization_timeout=0)
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:999")
    cfg = distributed.from_args_and_env(None, 2, 0)
    assert cfg.enabled and cfg.coordinator is None and "10.0.0.2:999" in cfg.describe()
    with pytest.raises(distributed.DistributedError, match="needs --num-processes, --process-id"):
        distributed.from_args_and_env()


def test_slurm_is_detected_and_flags_win(clean_env):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for key, value in slurm.items():
        clean_env.setenv(key, value)
    cfg = distributed.from_args_and_env()
    assert cfg.enabled and cfg.launcher == "slurm"
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == (None, None, None)  # jax fills them
    flagged = distributed.from_args_and_env(process_id=0)
    assert flagged.launcher == "flags" and flagged.process_id == 0 and flagged.num_processes is None
    clean_env.setenv("SLURM_NTASKS", "1")
    assert not distributed.from_args_and_env().enabled


def test_open_mpi_is_detected(clean_env):
    for key, value in {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "1"}.items():
        clean_env.setenv(key, value)
    # Open MPI 5's mpirun: JAX finds no coordinator, so the launcher gives only count and id
    assert distributed.detect_launcher() == ("ompi5", 4)
    with pytest.raises(distributed.DistributedError, match=r"needs --coordinator too \(ompi5 gives"):
        distributed.from_args_and_env()
    cfg = distributed.from_args_and_env("10.0.0.1:1234")
    assert (cfg.launcher, cfg.num_processes, cfg.process_id) == ("flags", 4, 3)
    assert distributed.from_args_and_env("10.0.0.1:1234", process_id=2).process_id == 2  # flags win
    # Open MPI 4's mpirun names its host: JAX finds everything, as under srun
    clean_env.setenv("OMPI_MCA_orte_hnp_uri", "1234.0;tcp://10.0.0.3:5678")
    for key in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        clean_env.setenv(key, "1")  # mpirun inside a SLURM step: Open MPI wins, as in JAX
    assert distributed.detect_launcher() == ("ompi", 4)
    cfg = distributed.from_args_and_env()
    assert cfg.launcher == "ompi" and (cfg.coordinator, cfg.num_processes, cfg.process_id) == (None, None, None)
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert not distributed.from_args_and_env().enabled


def test_mpich_needs_only_the_coordinator(clean_env):
    clean_env.setenv("PMI_SIZE", "2")
    clean_env.setenv("PMI_RANK", "1")
    assert distributed.detect_launcher() == ("pmi", 2)
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    cfg = distributed.from_args_and_env()
    assert (cfg.launcher, cfg.num_processes, cfg.process_id) == ("JAX_COORDINATOR_ADDRESS", 2, 1)
    clean_env.delenv("JAX_COORDINATOR_ADDRESS")
    clean_env.setenv("PMI_SIZE", "1")  # mpiexec -n 1: one process, nothing to join
    assert not distributed.from_args_and_env().enabled


def test_local_positions_and_devices():
    devices = [types.SimpleNamespace(process_index=p) for p in (0, 1, 0, 1)]
    assert distributed.local_positions(devices) == [0, 2]  # this test runs as process 0
    assert distributed.training_devices() == jax.local_devices()
    assert distributed.training_devices(2) == jax.local_devices()[:2]
    with pytest.raises(ValueError, match="num_devices=5 but only 4"):
        distributed.training_devices(5)
    assert distributed.is_main_process()


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
