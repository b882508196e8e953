"""The training loop: :func:`fit` runs a :class:`~xrayjax.config.TrainConfig` epoch by epoch.

It joins the other processes of a multi-host run, builds the steps of
:mod:`xrayjax.steps`, feeds them batches (:mod:`xrayjax.data.loader`), checks every loss, and
after each epoch writes the history and a checkpoint (:mod:`xrayjax.runfiles`, process 0 only);
a run stopped by Ctrl-C or SIGTERM between two steps also writes where it stopped, so
``--resume`` continues from that step. With a frozen backbone and no augmentation (the fast
path) the backbone runs once over every image and each epoch trains only the head, on a state
that holds only the head. Evaluation is not part of the loop: see :mod:`xrayjax.evaluate`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from tqdm.auto import tqdm

from xrayjax import distributed, interrupts, runfiles
from xrayjax.augment import AugmentConfig
from xrayjax.config import RunSpec, TrainConfig, resolve_run
from xrayjax.data import Split, Splits, batches, load_splits
from xrayjax.data.loader import StepBatches, batch_rows
from xrayjax.data.splits import split_folds
from xrayjax.resume import check_resume, resume_settings
from xrayjax.runlock import RunFolderLock, discard_new_run
from xrayjax.tasks import SPLITS
from xrayjax.steps import (
    StepModel,
    TrainState,
    balanced_label_weights,
    batch_sharding,
    build_step_model,
    create_train_state,
    epoch_key,
    feature_shape,
    init_backbone,
    init_variables,
    make_eval_step,
    make_feature_step,
    make_head_steps,
    make_train_step,
    replicate,
)

# The settings each host of a multi-process run may give for itself: where its files lie, its
# readers, its log, whether it evaluates (process 0 does) and its part. The others must be process 0's.
HOST_SETTINGS = frozenset({"out", "data_dir", "tfds_dir", "labels", "weights_dir", "workers", "quiet", "evaluate",
                           "eval_train", "process_id", "coordinator_timeout", "heartbeat_timeout"})


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message says where and what to try."""


def check_finite(per_step: Sequence[Mapping[str, Any]], epoch: int, first: int = 0) -> None:
    """Raise :class:`TrainingDiverged` at the first step whose mean loss is NaN or infinite (the
    one divergence check of training and of every cross-validation fold); ``per_step`` begins
    at step ``first``."""
    for step, metrics in enumerate(per_step, first):
        loss = float(metrics["loss_sum"]) / max(float(metrics["count"]), 1.0)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss} at epoch {epoch + 1}, step {step + 1}")


def unstack(stacked: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-step metrics from a scanned epoch's stacked ones (each value: one entry per step)."""
    return [{k: v[s] for k, v in stacked.items()} for s in range(len(stacked["count"]))]


@dataclasses.dataclass
class TrainResult:
    """What :func:`fit` returns: the run it trained (``spec``, resolved once), the final state, the
    history, the splits and the timed phases. ``features``: the fast path's cached backbone
    output per split (in split order), for ``xrayjax.evaluate.evaluate_run(..., features=...)``."""

    spec: RunSpec
    state: TrainState
    history: list[dict[str, float]]
    splits: Splits
    features: dict[str, jax.Array]
    timings: dict[str, float]
    first_epoch: int = 0

    @property
    def run_dir(self) -> Path:
        return self.spec.run_dir


class Timings(dict):
    """Wall seconds per phase (``setup``, ``data_load``, ``compile``, ``features``, ``train``,
    then ``evaluate`` and ``cross_validation`` from the CLI, which records them in
    ``<out>/timings.json``)."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = round(self.get(name, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)


class Log:
    """Messages to stderr unless quiet; ``bars`` says whether progress bars are shown."""

    def __init__(self, quiet: bool):
        self.silent = quiet
        self.bars = not quiet and sys.stderr.isatty()

    def __call__(self, message: str) -> None:
        if not self.silent:
            print(message, file=sys.stderr, flush=True)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape((-1,) + x.shape[2:])


def _sums(per_step: Sequence[Mapping[str, Any]], before: Mapping[str, float] | None = None) -> dict[str, float]:
    """The summed ``loss_sum``, ``correct`` and ``count`` of ``per_step`` (numbers, or arrays of
    per-step sums), added to ``before``'s (the steps of an epoch before a mid-epoch stop)."""
    before = before or {}
    return {k: before.get(k, 0.0) + float(sum(np.sum(m[k], dtype=np.float64) for m in per_step))
            for k in ("loss_sum", "correct", "count")}


def rates(sums: Mapping[str, Any]) -> tuple[float, float]:
    """(mean loss, accuracy) from summed ``loss_sum``, ``correct`` and ``count`` (each a number or
    an array of per-step sums)."""
    sums = {k: float(np.sum(sums[k], dtype=np.float64)) for k in ("loss_sum", "correct", "count")}
    count = max(sums["count"], 1.0)
    return sums["loss_sum"] / count, sums["correct"] / count


def row_index(rows: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, epoch: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Each step's ``rows`` (of cached features) and padding mask, both (S, B): the full path's
    batches (same order, same padding) as indices."""
    order, mask = batch_rows(len(rows), batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    return np.asarray(rows)[order].astype(np.int32), mask


class Trainer:
    """One run's steps over its data: compile, cache features, train an epoch, evaluate a split.

    ``devices`` are those of every process (:func:`xrayjax.distributed.training_devices`); the
    pmapped steps get this process's slice of each global batch. On the fast path the epochs
    train a head-only state (:meth:`TrainState.head_only`); :meth:`full` puts it back into the
    whole model's state. Owns no files.
    """

    def __init__(self, config: TrainConfig, model: StepModel, splits: Splits, devices: list, timings: Timings):
        self.config, self.model, self.splits, self.devices, self.timings = config, model, splits, devices, timings
        self.home = devices[distributed.local_positions(devices)[0]]  # this process's first device
        self.fast = config.fast_path
        # the splits whose features the fast path caches (test: for the evaluation after training)
        self.cached = [n for n in SPLITS[:3 if config.evaluate else 2] if len(getattr(splits, n))]
        self.features: dict[str, tuple[jax.Array, jax.Array]] = {}
        self.steps = math.ceil(len(splits.train) / config.batch_size)  # per training epoch
        self.streams: list[Iterator[dict[str, Any]]] = []  # the full path's (open_streams)

    def _batches(self, split: Split, shuffle: bool, epochs: Sequence[int] = (0,), start: int = 0
                 ) -> Iterator[dict[str, Any]]:
        """The full path's global batches of ``split`` over ``epochs`` from step ``start``, this
        process's devices' rows only (the only images it reads), placed on them ahead of use."""
        c = self.config
        return batches(split, c.batch_size, len(self.devices), shuffle=shuffle, seed=c.seed, epochs=epochs,
                       start=start, shards=distributed.local_positions(self.devices),
                       workers=c.workers, sharding=batch_sharding(self.devices))

    def open_streams(self, epoch: int, step: int) -> None:
        """The full path's batches of the epochs left, from ``step`` of ``epoch``: one stream (one
        set of readers) for training and one for validation."""
        epochs, train, validation = range(epoch, self.config.epochs), self.splits.train, self.splits.validation
        self.streams = [] if self.fast else [self._batches(train, True, epochs, step)]
        if not self.fast and len(validation):
            self.streams.append(self._batches(validation, False, epochs))

    def close(self) -> None:
        for stream in self.streams:
            stream.close()

    def _epoch_index(self, name: str, shuffle: bool, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The fast path's batches of a split: rows of its cached features and the padding mask."""
        return row_index(np.arange(len(getattr(self.splits, name))), self.config.batch_size,
                         shuffle=shuffle, seed=self.config.seed, epoch=epoch)

    def _compiled(self, fn: Callable, *example: Any) -> Callable:
        """``fn`` compiled ahead of time (every batch has one shape), timed as ``compile``. Across
        processes a pmap lowered ahead of time expects global shapes, so there it compiles at
        its first call."""
        if jax.process_count() > 1:
            return fn
        with self.timings.phase("compile"):
            return fn.lower(*example).compile()

    def place(self, state: TrainState) -> TrainState:
        """The state the epochs train: the head's part on this process's first device (fast path,
        the whole state kept for :meth:`full`), else the whole state replicated."""
        if not self.fast:
            return replicate(state, self.devices)
        self.whole = jax.device_put(state, self.home)
        return self.whole.head_only()

    def full(self, state: TrainState) -> TrainState:
        """The whole model's state from the state the epochs train."""
        return self.whole.with_head(state) if self.fast else state

    def compile(self, state: TrainState) -> None:
        """The full path's train and eval steps, or the fast path's head epochs."""
        if not self.fast:
            c, train = self.config, self.splits.train  # the first batch, read alone (no read-ahead)
            example = StepBatches(train, c.batch_size, len(self.devices), distributed.local_positions(self.devices),
                                  shuffle=False)[0]
            self.train_fn = self._compiled(make_train_step(self.model, self.devices), state, example, epoch_key(0, 0))
            self.eval_fn = self._compiled(make_eval_step(self.model, self.devices), state, example)
            return
        train_fn, eval_fn = make_head_steps(self.model)
        shape = feature_shape(self.model, self.config.image_size)

        def example(name: str) -> tuple:
            labels = getattr(self.splits, name).labels
            return (jax.ShapeDtypeStruct((len(labels), *shape), jnp.float32),
                    jax.ShapeDtypeStruct(labels.shape, labels.dtype), *self._epoch_index(name, False, 0))

        self.head_train = self._compiled(train_fn, state, *example("train"), epoch_key(0, 0))
        if "validation" in self.cached:
            self.head_eval = self._compiled(eval_fn, state, *example("validation"))

    def cache(self, log: Log) -> None:
        """The fast path: the backbone's features of every cached split, as one padded stream."""
        parts = [getattr(self.splits, name) for name in self.cached]
        stream = Split.concat(parts)
        backbone = replicate({"params": self.whole.params["backbone"],
                              "batch_stats": self.whole.batch_stats["backbone"]}, self.devices)
        step = make_feature_step(self.model, self.devices)
        began, chunks = time.perf_counter(), []
        if not log.bars:  # a log gets this line as the pass starts, a terminal the bar
            log(f"computing the backbone features of {len(stream)} images ({' + '.join(self.cached)}) once")
        _, masks = batch_rows(len(stream), self.config.batch_size, shuffle=False)  # every process's rows
        with contextlib.closing(self._batches(stream, False)) as read:
            for batch, mask in zip(tqdm(read, total=len(masks), desc="backbone features", disable=not log.bars,
                                        leave=False), masks):
                chunks.append(_flat(distributed.gather_shards(step(backbone, batch["image"])))[mask > 0])
        features = np.split(np.concatenate(chunks), np.cumsum([len(p) for p in parts])[:-1])
        self.features = {name: jax.device_put((f, p.labels), self.home)
                         for name, f, p in zip(self.cached, features, parts)}
        self.timings.add("features", time.perf_counter() - began)
        log(f"cached backbone features of {len(stream)} images ({' + '.join(self.cached)}), "
            f"{features[0].shape[1:]} each; training only the head")

    def train_epoch(self, state: TrainState, epoch: int, bar: Any, first: int = 0,
                    before: Mapping[str, float] | None = None,
                    stop: Callable[[TrainState, int, dict], None] | None = None) -> tuple[TrainState, dict]:
        """Train ``epoch`` from step ``first``; the epoch's summed metrics (``before``: those of
        its steps before ``first``). On the full path a signal deferred by the caller
        (:func:`xrayjax.interrupts.deferred`) is raised between two steps, after
        ``stop(state, steps done, their summed metrics)``."""
        key = epoch_key(self.config.seed, epoch)
        if self.fast:
            state, metrics = self.head_train(state, *self.features["train"], *self._epoch_index("train", True, epoch),
                                             key)
            per_step = unstack(metrics)
        else:
            per_step = []
            for step in range(first, self.steps):
                try:
                    batch = None if interrupts.pending() else next(self.streams[0])
                except Exception:  # a reader the signal ended: the signal is what to report
                    if not interrupts.pending():
                        raise
                if interrupts.pending():
                    done = jax.device_get(per_step)
                    check_finite(done, epoch, first)  # a diverged state is not kept
                    if stop is not None:
                        stop(state, step, _sums(done, before))
                    interrupts.raise_if_pending()
                state, metrics = self.train_fn(state, batch, jax.random.fold_in(key, step))
                per_step.append(metrics)
        per_step = jax.device_get(per_step)
        check_finite(per_step, epoch, first)
        bar.update(len(per_step))
        return state, _sums(per_step, before)

    def validate(self, state: TrainState) -> dict[str, float]:
        """Loss and accuracy sums over the validation split, inference mode (the full path: the
        next epoch's batches of its stream)."""
        split = self.splits.validation
        if not len(split):
            per_call = []
        elif self.fast:
            per_call = [self.head_eval(state, *self.features["validation"], *self._epoch_index("validation", False, 0))]
        else:
            steps = math.ceil(len(split) / self.config.batch_size)
            per_call = [self.eval_fn(state, b) for b in itertools.islice(self.streams[1], steps)]
        return _sums(jax.device_get(per_call))


def _start(spec: RunSpec, log: Log, timings: Timings, splits: Splits | None, quiet: bool
           ) -> tuple[StepModel, TrainState, Splits, runfiles.Checkpoint | None, list]:
    """The model, the initial (or resumed) state, the data, the checkpoint resumed (None for a
    fresh run: where it stopped) and the history so far. A resumed run trains on the splits it
    recorded (a Keras model imported whole, until it has trained, on new ones)."""
    config, run_dir = spec.config, spec.run_dir
    if not config.resume and (run_dir / runfiles.CHECKPOINT_FILE).exists():
        raise ValueError(f"{run_dir} already holds a run (checkpoint.msgpack); pass --resume to continue "
                         "it or choose another --out")
    checkpoint, history = (check_resume(config, run_dir, spec.class_names) if config.resume
                           else (None, []))
    if checkpoint is not None and checkpoint.epoch >= config.epochs:
        raise ValueError(f"--resume: the run in {run_dir} has already trained {checkpoint.epoch} epochs; "
                         f"--epochs is the total, so pass --epochs above {checkpoint.epoch} to train more")
    if checkpoint is not None and checkpoint.step and config.fast_path:
        raise ValueError(f"--resume: the run in {run_dir} stopped after step {checkpoint.step} of epoch "
                         f"{checkpoint.epoch + 1}, which the cached-features path cannot start from; resume it "
                         "with --no-cache-features (the same batches, the backbone run every step)")
    backbone = None
    if checkpoint is None:  # before the data, so missing weights stop the run at once
        if config.init == "random":
            log(f"--init random: the {config.arch} backbone is initialised randomly (seed {config.seed}), "
                "not from ImageNet")
        with timings.phase("setup"):
            backbone = init_backbone(config.arch, config.image_size, init=config.init,
                                     weights_dir=config.weights_dir, seed=config.seed)
    if splits is None:
        with timings.phase("data_load"):
            # an imported Keras model's checkpoint (epoch 0) trained on no split of this data
            recorded = runfiles.read_splits(run_dir) if checkpoint is not None and checkpoint.trained else None
            splits = load_splits(config.data_config(), spec.dataset, recorded, quiet=quiet)
    if config.folds:  # the final model trains on train+validation; the folds must be possible
        splits = splits.pooled()
        split_folds(splits.train, config.folds, config.seed, config.group_by == "source")
    if config.batch_size > len(splits.train):
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(splits.train)} training "
                         f"images; pass at most {len(splits.train)}")
    weights = None
    if config.label_weights == "balanced":
        weights = balanced_label_weights(splits.train.labels)
    imported = None if spec.keras_import is None else runfiles.imported_model(config, spec.keras_import)
    model = build_step_model(config.arch, config.task, dropout=config.dropout, bf16=config.bf16,
                             l2=config.l2, fine_tune=config.fine_tune, num_classes=len(splits.class_names),
                             label_weights=weights, augment=AugmentConfig() if config.augment else None,
                             classifier=imported)
    with timings.phase("setup"):  # a resumed run's variables are all in its checkpoint
        variables = (checkpoint.state if checkpoint is not None else
                     init_variables(model, config.image_size, seed=config.seed, backbone=backbone))
        state = create_train_state(model, variables, config.lr)
    if checkpoint is None:
        return model, state, splits, None, []
    if imported is not None and not checkpoint.trained:
        log(f"training the Keras model imported into {run_dir} (from {spec.keras_import['source']}) further, on "
            "new splits of --data-dir")
    else:
        log(f"resuming {run_dir} after epoch {checkpoint.epoch}"
            + (f" and {checkpoint.step} steps of epoch {checkpoint.epoch + 1}" if checkpoint.step else ""))
    if "opt_state" in checkpoint.state:  # an imported model's has none: its optimizer starts fresh
        state = serialization.from_state_dict(state, checkpoint.state)
    return model, state, splits, checkpoint, history


def resolve_training(config: TrainConfig, splits: Splits | None = None,
                     given: Collection[str] | None = None) -> RunSpec:
    """The RunSpec of ``config`` (:func:`xrayjax.config.resolve_run`), after ``--resume`` has taken
    the run's settings left out of ``given`` and a Keras model imported whole its model settings
    (:func:`xrayjax.resume.resume_settings`)."""
    config, record = resume_settings(config, given)
    return dataclasses.replace(resolve_run(config, splits), keras_import=record)


def fit(config: TrainConfig | RunSpec, splits: Splits | None = None) -> TrainResult:
    """Train a run as ``config`` says (a TrainConfig, resolved here, or a RunSpec already resolved
    by :func:`resolve_training`); ``splits`` (``xrayjax.data.Splits``) skips loading the data.

    Locks the run folder while it trains, writes ``config.json`` and ``splits.json``, then after
    every epoch ``history.json`` and ``checkpoint.msgpack`` (process 0 of a multi-process run
    only). A run that stops before its first checkpoint removes the files it wrote. A resumed run
    trains on the splits it recorded; a Keras model imported whole recorded none, so its first
    training splits the data as a fresh run does.

    Raises:
        FileNotFoundError: missing ImageNet weights (the message says how to port them).
        xrayjax.data.DataError (a ValueError): the data cannot be found, read or prepared, or no
            longer holds the images a resumed run recorded.
        TrainingDiverged: NaN/inf loss; the last good checkpoint is kept.
        ValueError: a bad setting, ``resume`` with settings other than the run's, or a run
            folder in use by another process (``xrayjax.runfiles.RunFolderError``).
        xrayjax.distributed.DistributedError: incomplete or bad multi-process settings.
    """
    spec = config if isinstance(config, RunSpec) else resolve_training(config, splits)
    config = spec.config
    distributed.initialize(distributed.from_args_and_env(
        config.coordinator, config.num_processes, config.process_id,
        initialization_timeout=config.coordinator_timeout, heartbeat_timeout=config.heartbeat_timeout,
    ))
    distributed.check_backend()
    distributed.check_same_settings({k: v for k, v in dataclasses.asdict(config).items() if k not in HOST_SETTINGS})
    writer = distributed.is_main_process()
    log = Log(config.quiet or not writer)
    devices = distributed.training_devices(config.num_devices)
    if config.batch_size % len(devices):
        raise ValueError(f"--batch-size {config.batch_size} is not a multiple of the {len(devices)} devices; "
                         "pass a multiple, or --num-devices")
    if jax.process_count() > 1:
        log(f"{jax.process_count()} processes, {len(devices)} devices in all; process 0 writes {config.out}")
    run_dir = spec.run_dir
    created = not run_dir.exists()
    before = set() if created else {p.name for p in run_dir.iterdir()}
    lock = RunFolderLock(run_dir) if writer else None
    if lock is not None and lock.note:
        log(lock.note)
    try:
        timings = Timings()
        model, state, splits, checkpoint, history = _start(spec, log, timings, splits, config.quiet or not writer)
        start = checkpoint.epoch if checkpoint is not None else 0
        if writer:
            runfiles.write_config(run_dir, config, splits.class_names, devices, keras_import=spec.keras_import)
            if checkpoint is None or not checkpoint.trained:
                runfiles.write_splits(run_dir, splits)
        trainer = Trainer(config, model, splits, devices, timings)
        state = trainer.place(state)
        trainer.compile(state)
        if trainer.fast:
            trainer.cache(log)
        try:
            state = _train_epochs(config, trainer, state, checkpoint, history, log, writer)
        finally:
            trainer.close()
    except BaseException:
        if lock is not None and not (run_dir / runfiles.CHECKPOINT_FILE).exists():
            discard_new_run(run_dir, lock, before, created)
            lock = None
        raise
    finally:
        if lock is not None:
            lock.release()
        if spec.dataset is not None:
            spec.dataset.close()
    features = {name: f for name, (f, _) in trainer.features.items()}
    return TrainResult(spec, trainer.full(state), history, splits, features, timings, start)


def _train_epochs(config: TrainConfig, trainer: Trainer, state: TrainState, checkpoint: runfiles.Checkpoint | None,
                  history: list, log: Log, writer: bool) -> TrainState:
    """The epochs after ``checkpoint`` (all for a fresh run): train, validate, and write the
    history and checkpoint. A signal is deferred: raised between two steps, after writing where
    the run stopped, or once the epoch's checkpoint is written."""
    run_dir = Path(config.out)
    start, step, done = (checkpoint.epoch, checkpoint.step, checkpoint.sums) if checkpoint else (0, 0, {})
    frozen_sha = checkpoint.frozen_sha256 if checkpoint else None
    kept = (f"step {step} of epoch {start + 1}" if step else f"epoch {start}") if checkpoint else None  # on disk
    trainer.open_streams(start, step)
    bar = tqdm(total=(config.epochs - start) * trainer.steps - step, desc="training", unit="step",
               disable=not log.bars)

    def stop(state: TrainState, at: int, sums: dict[str, float]) -> None:  # mid-epoch: keep where it stopped
        if writer and at > step:
            runfiles.write_json(run_dir / runfiles.HISTORY_FILE, history)
            runfiles.write_checkpoint(run_dir, trainer.model, trainer.full(state), epoch, frozen_sha, at, sums)
            log(f"stopped after step {at} of epoch {epoch + 1}; --resume continues from there")

    with bar:
        for epoch in range(start, config.epochs):
            interrupts.raise_if_pending()
            began = time.perf_counter()
            with interrupts.deferred():
                try:
                    state, sums = trainer.train_epoch(state, epoch, bar, step, done, stop)
                except TrainingDiverged as e:
                    left = (f"the last good checkpoint ({kept}) is kept in {run_dir}" if kept
                            else "no checkpoint was written")
                    raise TrainingDiverged(f"{e}; training stopped and {left}. Try a lower --lr (now {config.lr})"
                                           + (" or train without --bf16" if config.bf16 else "") + ".") from None
                step, done = 0, {}
                train_loss, train_acc = rates(sums)
                val = trainer.validate(state)
                validation = dict(zip(("val_loss", "val_accuracy"), rates(val))) if val["count"] else {}
                history.append({"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                                **validation, "seconds": time.perf_counter() - began})
                if writer:
                    runfiles.write_json(run_dir / runfiles.HISTORY_FILE, history)
                    frozen_sha = runfiles.write_checkpoint(run_dir, trainer.model, trainer.full(state), epoch + 1,
                                                           frozen_sha)
                kept = f"epoch {epoch + 1}"
            trainer.timings.add("train", time.perf_counter() - began)
            shown = {k: f"{v:.4f}" for k, v in history[-1].items() if k not in ("epoch", "seconds")}
            bar.set_postfix(shown)
            if not log.bars:
                log(f"epoch {epoch + 1}/{config.epochs}: " + " ".join(f"{k} {v}" for k, v in shown.items()))
    interrupts.raise_if_pending()  # a signal in the last epoch: the run is kept, and still stops
    return state
