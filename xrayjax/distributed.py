"""Multi-host data parallel: JAX's distributed runtime, this process's data shard, who writes.

Every process runs the same command. :func:`initialize` joins JAX's distributed runtime
before anything touches a device; ``jax.pmap`` then maps over the devices of every process
(:func:`training_devices`), each process reads and feeds only its devices' rows of every global
batch (:func:`local_positions`; all processes compute the same batch order from the same seed,
so the data needs no communication) and collectives span all processes. Only the main process
(:func:`is_main_process`) writes run files.

Settings come from flags, else from what ``jax.distributed.initialize`` detects itself:
``JAX_COORDINATOR_ADDRESS`` (and ``JAX_COORDINATOR_PORT``, ``JAX_LOCAL_DEVICE_IDS``) and the
launchers of :data:`LAUNCHERS` (SLURM ``srun``, Open MPI's ``mpirun``; under MPICH's ``mpiexec``
or Open MPI 5 the launcher gives the process count and id and ``--coordinator`` the rest).
Failures are bounded:
a process that cannot gather every peer within ``initialization_timeout`` stops with a message
saying what to check; once running, JAX's heartbeats stop every process within about
``heartbeat_timeout`` seconds when one dies.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
EXIT_NOT_JOINED = 3  # exit status of a process that could not join its peers in time


class DistributedError(RuntimeError):
    """Bad or incomplete multi-process settings; the message says what to pass."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (``launcher=None``: single process).

    ``None`` in ``coordinator``/``num_processes``/``process_id`` leaves the value to
    ``jax.distributed.initialize``'s own detection (``launcher`` names what it detects).
    Timeouts are in seconds.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100
    launcher: str | None = None

    @property
    def enabled(self) -> bool:
        return self.launcher is not None

    def describe(self) -> str:
        """``process 1 of 2 via flags at host:1234`` (unknown parts as ``?``)."""
        process_id, count, coordinator = (
            "?" if v is None else v
            for v in (self.process_id, self.num_processes, self.coordinator or os.environ.get(COORDINATOR_ENV))
        )
        return f"process {process_id} of {count} via {self.launcher} at coordinator {coordinator}"


def _check_coordinator(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise DistributedError(
            f"{source} must be HOST:PORT (e.g. 10.0.0.1:1234, the host of process 0 and a free "
            f"port), got {address!r}"
        )


@dataclasses.dataclass(frozen=True)
class Launcher:
    """A cluster launcher, told by the environment variables it documents for each process."""

    present: tuple[str, ...]  # all set in every process it starts
    count: str  # the variable holding the number of processes
    rank: str  # the variable holding this process's id
    jax_detects: bool  # jax.distributed.initialize() finds the coordinator, count and id itself


# In the order of JAX's own detection, with the variables it reads (jax/_src/clusters/, JAX
# 0.10), then launchers it does not bootstrap. Left out, as the environment alone cannot tell
# them: Kubernetes (every pod has KUBERNETES_SERVICE_HOST; the count is the Job's, from its API)
# and Cloud TPU (from the metadata server); pass the flags there.
LAUNCHERS: dict[str, Launcher] = {
    # mpirun of Open MPI 4 and older: OMPI_MCA_orte_hnp_uri names the coordinator's host
    "ompi": Launcher(("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                     "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", jax_detects=True),
    # srun
    "slurm": Launcher(("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
                      "SLURM_NTASKS", "SLURM_PROCID", jax_detects=True),
    # mpirun of Open MPI 5 (PRRTE), which sets no OMPI_MCA_orte_hnp_uri
    "ompi5": Launcher(("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                      "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", jax_detects=False),
    # mpiexec of MPICH and Intel MPI (Hydra's PMI)
    "pmi": Launcher(("PMI_SIZE", "PMI_RANK"), "PMI_SIZE", "PMI_RANK", jax_detects=False),
}


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def detect_launcher() -> tuple[str, int | None] | None:
    """``(name, process count)`` of the first of :data:`LAUNCHERS` whose variables are all set.

    ``None`` outside a launcher; the count is ``None`` when its variable is not a number.
    """
    for name, launcher in LAUNCHERS.items():
        if all(var in os.environ for var in launcher.present):
            return name, _env_int(launcher.count)
    return None


def from_args_and_env(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = DistributedConfig.initialization_timeout,
    heartbeat_timeout: int = DistributedConfig.heartbeat_timeout,
) -> DistributedConfig:
    """The run's :class:`DistributedConfig`: flags win, else what JAX detects from the environment.

    Under a launcher JAX does not bootstrap (:data:`LAUNCHERS`), its process count and id fill
    the unset flags. Single process (``launcher=None``) when nothing asks for more, or when the
    flags or the launcher say one process. Raises :class:`DistributedError` for incomplete or bad settings.
    """
    for name, value in (
        ("initialization_timeout", initialization_timeout),
        ("heartbeat_timeout", heartbeat_timeout),
    ):
        if value < 1:
            raise DistributedError(f"{name} must be at least 1 second, got {value}")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be positive, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise DistributedError(
            f"--process-id must be in [0, {num_processes or 'N'}) (one distinct id per process), "
            f"got {process_id}"
        )
    if coordinator is not None:
        _check_coordinator(coordinator, "--coordinator")
    elif os.environ.get(COORDINATOR_ENV):
        _check_coordinator(os.environ[COORDINATOR_ENV], COORDINATOR_ENV)

    detected = detect_launcher()
    flags = (coordinator, num_processes, process_id)
    if any(v is not None for v in flags):
        launcher = "flags"
    elif os.environ.get(COORDINATOR_ENV):
        launcher = COORDINATOR_ENV
    elif detected is not None:
        launcher = detected[0]
    else:
        return DistributedConfig(initialization_timeout=initialization_timeout, heartbeat_timeout=heartbeat_timeout)
    bootstrapped = detected is not None and LAUNCHERS[detected[0]].jax_detects
    if detected is not None and not bootstrapped:  # JAX finds nothing here: take the launcher's count and id
        num_processes = detected[1] if num_processes is None else num_processes
        process_id = _env_int(LAUNCHERS[detected[0]].rank) if process_id is None else process_id
    count = num_processes if num_processes is not None else (detected[1] if detected else None)
    if count == 1:  # one process joins nobody
        launcher = None
    elif not bootstrapped:
        missing = [
            flag
            for flag, value, env in (
                ("--coordinator", coordinator, os.environ.get(COORDINATOR_ENV)),
                ("--num-processes", num_processes, None),
                ("--process-id", process_id, None),
            )
            if value is None and env is None
        ]
        if missing and detected is not None:
            raise DistributedError(
                f"multi-process training needs {', '.join(missing)} too ({detected[0]} gives the process "
                "count and id, and JAX finds the coordinator only under srun or Open MPI 4's mpirun): pass "
                f"--coordinator HOST:PORT (process 0's host and a free port) or set {COORDINATOR_ENV}"
            )
        if missing:
            raise DistributedError(
                f"multi-process training needs {', '.join(missing)} too (no cluster launcher such as "
                "SLURM's srun was detected to supply them): pass --coordinator HOST:PORT "
                "--num-processes N --process-id I on every process"
            )
    return DistributedConfig(
        coordinator=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout=heartbeat_timeout,
        launcher=launcher,
    )


def _give_up(cfg: DistributedConfig) -> None:
    """Watchdog: JAX aborts with a C++ stack trace when peers never come; say why first."""
    print(
        f"error: {cfg.describe()} could not reach all processes within "
        f"{cfg.initialization_timeout} s. Check that every process was started with the same "
        "--coordinator HOST:PORT and --num-processes and a distinct --process-id, that HOST is "
        "process 0's host and PORT is open to every host; raise --coordinator-timeout when "
        "hosts start far apart.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_NOT_JOINED)


def initialize(cfg: DistributedConfig) -> None:
    """Join the distributed runtime (no-op for a single process or when already joined).

    Must run before anything touches a device. CPU collectives go through gloo. When the
    peers are not all there within ``cfg.initialization_timeout`` the process prints what to
    check and exits with status :data:`EXIT_NOT_JOINED` (it never hangs).
    """
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service would take SIGTERM over, and training would go on: xrayjax's own
    # handler (xrayjax.interrupts) checkpoints every process and exits 143, as on one process.
    jax.config.update("jax_enable_preemption_service", False)
    watchdog = threading.Timer(cfg.initialization_timeout, _give_up, args=(cfg,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.initialization_timeout,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout,
        )
    except (RuntimeError, ValueError, TypeError) as e:
        raise DistributedError(
            f"cannot join the distributed run as {cfg.describe()}: {e}. "
            "Multi-process settings must be applied before any JAX computation."
        ) from e
    finally:
        watchdog.cancel()


def is_main_process() -> bool:
    """True on the process that writes checkpoints, history, config and figures."""
    return jax.process_index() == 0


def training_devices(num_local: int | None = None) -> list[jax.Device]:
    """The first ``num_local`` (default all) devices of every process, grouped by process.

    This is the device order ``jax.pmap`` maps over; one process gives its local devices.
    """
    per_process = [jax.local_devices(process_index=p) for p in range(jax.process_count())]
    available = min(len(devices) for devices in per_process)
    n = num_local or available
    if n > available:
        raise ValueError(f"num_devices={n} but only {available} local devices exist per process")
    return [d for devices in per_process for d in devices[:n]]


def check_backend() -> None:
    """Start JAX's backend, or raise ValueError saying how to fix ``JAX_PLATFORMS``."""
    try:
        jax.devices()
    except Exception as e:  # JAX raises RuntimeError, or AssertionError when no platform starts
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"JAX cannot start the backend that JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} asks "
            f"for ({reason}). Unset JAX_PLATFORMS (or set it to cpu), or install the JAX "
            "build for that accelerator (e.g. pip install 'jax[cuda12]')"
        ) from e


def runtime_error(e: Exception) -> str:
    """The first line of a JAX runtime error, with what to try when memory ran out."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        first += "; the device ran out of memory: lower --batch-size or --image-size"
    return first


def local_positions(devices: Sequence[Any]) -> list[int]:
    """Positions in ``devices`` of this process's devices (the rows of a batch it feeds)."""
    return [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]


def gather_shards(local: Any) -> np.ndarray:
    """The global array of per-process shards (leading device axis), on every process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


SETTINGS_BYTES = 1 << 14  # room for every setting as JSON, gathered from every process


def check_same_settings(settings: dict[str, Any]) -> None:
    """Stop every process (DistributedError) when one was started with other ``settings`` than
    process 0 (a dict of JSON values): its batches, splits or epochs would differ, and the run would
    be silently wrong or hang in a collective. One all-gather of every process's settings; the
    process that differs names each setting."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = json.dumps(settings, sort_keys=True).encode()
    buffer = np.zeros(SETTINGS_BYTES, np.int32)
    buffer[:len(mine)] = np.frombuffer(mine, np.uint8)
    every = [json.loads(row.astype(np.uint8).tobytes().rstrip(b"\0"))
             for row in np.asarray(multihost_utils.process_allgather(buffer))]
    first = every[0]
    differ = sorted(k for k in settings if settings[k] != first.get(k))
    if differ:
        raise DistributedError(
            f"process {jax.process_index()} was started with other settings than process 0: "
            + ", ".join(f"--{k.replace('_', '-')} {settings[k]!r} (process 0: {first.get(k)!r})" for k in differ)
            + "; start every process with the same flags")
    if others := [i for i, theirs in enumerate(every) if theirs != first]:
        raise DistributedError(f"process(es) {', '.join(map(str, others))} were started with other settings than "
                               "this process 0 (each names them in its log); start every process with the same flags")


def wait_for_all(name: str) -> None:
    """Block until every process reaches this point (e.g. while process 0 evaluates)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
