"""The steps of one run over its data (:class:`Trainer`): compile, cache the backbone's features,
train an epoch, validate; and what the loop and cross-validation share with it: the loss
check, per-step metric sums and the phases' timings. :mod:`xrayjax.loop` drives it epoch by epoch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from xrayjax import distributed, interrupts
from xrayjax.config import TrainConfig
from xrayjax.data import Split, Splits, batches
from xrayjax.data.loader import StepBatches, batch_rows
from xrayjax.tasks import SPLITS
from xrayjax.steps import (
    StepModel,
    TrainState,
    batch_sharding,
    epoch_key,
    feature_shape,
    make_eval_step,
    make_feature_step,
    make_head_steps,
    make_train_step,
    replicate,
)


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
