"""The training loop: :func:`fit` runs a :class:`~xrayjax.config.TrainConfig` epoch by epoch.

It joins the other processes of a multi-host run, runs the steps of :mod:`xrayjax.steps`
through a :class:`~xrayjax.trainer.Trainer` (which feeds them batches and checks every loss), and
after each epoch writes the history and a checkpoint (:mod:`xrayjax.runfiles`, process 0 only);
a run stopped by Ctrl-C or SIGTERM between two steps also writes where it stopped, so
``--resume`` continues from that step. With a frozen backbone and no augmentation (the fast
path) the backbone runs once over every image and each epoch trains only the head, on a state
that holds only the head. Evaluation is not part of the loop: see :mod:`xrayjax.evaluate`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from pathlib import Path

import jax
from flax import serialization
from tqdm.auto import tqdm

from xrayjax import distributed, interrupts, runfiles
from xrayjax.augment import AugmentConfig
from xrayjax.config import RunSpec, TrainConfig, resolve_run
from xrayjax.data import Splits, load_splits
from xrayjax.data.splits import split_folds
from xrayjax.resume import check_resume, resume_settings
from xrayjax.runlock import RunFolderLock, discard_new_run
from xrayjax.trainer import Log, Timings, Trainer, TrainingDiverged, rates
from xrayjax.steps import (
    StepModel,
    TrainState,
    balanced_label_weights,
    build_step_model,
    create_train_state,
    init_backbone,
    init_variables,
)

# The settings each host of a multi-process run may give for itself: where its files lie, its
# readers, its log, whether it evaluates (process 0 does) and its part. The others must be process 0's.
HOST_SETTINGS = frozenset({"out", "data_dir", "tfds_dir", "labels", "weights_dir", "workers", "quiet", "evaluate",
                           "eval_train", "process_id", "coordinator_timeout", "heartbeat_timeout"})


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
