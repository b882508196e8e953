"""Training: frozen (or partly opened) ImageNet backbone, the report's head, data parallel.

Design (flax examples/imagenet style): a :class:`TrainState` with ``batch_stats``; pure
steps built by ``make_*_step`` that a benchmark or a multi-host driver can reuse.

- The backbone runs data parallel (``jax.pmap`` over the devices, uint8 batches
  preprocessed on device), BatchNorm in inference mode, under ``jax.lax.stop_gradient``
  when frozen. Its features are all-gathered, so the head (cheap) sees the whole global
  batch on every device: loss and accuracy are mask-weighted means over the global batch,
  the head's BatchNorm uses the global statistics of the real (unpadded) samples, and the
  dropout masks do not depend on the device count. D devices give the 1-device result.
- Freezing is done by optax (``multi_transform`` with ``set_to_zero`` for frozen leaves)
  and by differentiating only the trainable leaves, so frozen layers get no backward pass
  and their weights and statistics stay bit-identical. ``fine_tune=N`` opens the last N
  blocks of ``xrayjax.models.BLOCKS[arch]``; their BatchNorm stays in inference mode
  (Keras' advice for fine-tuning), its scale and offset train.
- Fast path: with a frozen backbone and no augmentation the backbone runs once per image,
  its float32 features are cached on device (the test split's too, for the evaluation at
  the end) and each epoch trains only the head, with the same batches, loss and dropout
  keys as the full path, as one compiled ``lax.scan`` over the epoch's steps.
- Multi-host (``xrayjax.distributed``): with several processes pmap maps over the devices
  of every process, each process feeds its own slice of every global batch (all compute
  the same batch order), so the collectives above span hosts and every process gets the
  same metrics. On the fast path each process caches the features of its slice, they are
  all-gathered, and every process trains the head on the whole batch. Only process 0
  writes run files and evaluates.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util
from flax.training import train_state
from tqdm.auto import tqdm

from xrayjax import distributed
from xrayjax.data import DataConfig, DataError, batches, load_splits
from xrayjax.models import (
    ARCHS,
    BLOCKS,
    TASKS,
    create_backbone,
    create_head,
    create_model,
    fold_batchnorm,
)
from xrayjax.porting import save_variables, write_atomic
from xrayjax.preprocessing import preprocess_input

AXIS = "batch"
ADAM_EPSILON = 1e-7  # Keras' Adam default (optax's is 1e-8)
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.msgpack"
FROZEN_FILE = "frozen.msgpack"
TIMINGS_FILE = "timings.json"
# Settings a resumed run may change (the device and process counts and the fast path change
# results only by float rounding); every other one must equal the checkpoint's run.
_RESUMABLE_CHANGES = frozenset(
    {"epochs", "resume", "quiet", "evaluate", "out", "num_devices", "cache_features",
     "coordinator", "num_processes", "process_id", "coordinator_timeout", "heartbeat_timeout"}
)


def default_l2(arch: str, task: str) -> float:
    """The report's L2 factor on the head's Dense kernels: none for vgg16 four_class."""
    return 0.0 if (arch, task) == ("vgg16", "four_class") else 1e-3


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run (recorded in ``<out>/config.json``).

    ``l2=None`` means the report's value for (arch, task): see :func:`default_l2`.
    ``num_devices=None`` uses every local device (of every process). ``cache_features``
    allows the fast path (frozen backbone, no augmentation); False forces the full backbone
    pass every step. ``coordinator``/``num_processes``/``process_id`` join a multi-process
    run (None: from the environment, see :func:`xrayjax.distributed.from_args_and_env`);
    the timeouts (seconds) bound waiting for peers at start and for a dead peer later.
    """

    arch: str = "vgg16"
    task: str = "four_class"
    data_dir: str | None = None
    tfds_dir: str | None = None
    color: str = "gray"
    val_fraction: float = 0.2
    image_size: int = 224
    init: str = "imagenet"
    weights_dir: str | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    l2: float | None = None
    dropout: float = 0.5
    augment: bool = False
    bf16: bool = False
    fine_tune: int = 0
    seed: int = 0
    out: str | None = None
    resume: bool = False
    quiet: bool = False
    num_devices: int | None = None
    cache_features: bool = True
    evaluate: bool = True
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    coordinator_timeout: int = 300
    heartbeat_timeout: int = 100

    def data_config(self) -> DataConfig:
        """The data settings of this run."""
        return DataConfig(
            task=self.task,
            data_dir=self.data_dir,
            tfds_dir=self.tfds_dir,
            color=self.color,
            val_fraction=self.val_fraction,
            seed=self.seed,
            image_size=self.image_size,
        )

    def resolved(self) -> TrainConfig:
        """A copy with ``l2`` and ``out`` filled in and every value checked."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.init not in ("imagenet", "random"):
            raise ValueError(f"init must be 'imagenet' or 'random', got {self.init!r}")
        if not 0 <= self.fine_tune <= len(BLOCKS[self.arch]):
            raise ValueError(
                f"fine_tune must be in [0, {len(BLOCKS[self.arch])}] for {self.arch} "
                f"(its blocks: {', '.join(BLOCKS[self.arch])}), got {self.fine_tune}"
            )
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        return dataclasses.replace(
            self,
            l2=default_l2(self.arch, self.task) if self.l2 is None else float(self.l2),
            out=self.out or os.path.join("runs", f"{self.arch}_{self.task}"),
        )


class TrainState(train_state.TrainState):
    """flax TrainState plus the BatchNorm statistics ({"backbone", "head"})."""

    batch_stats: Any = None


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message says where and what to try."""


@dataclasses.dataclass(frozen=True)
class StepModel:
    """The static half of a training step: modules and loss settings the steps close over."""

    arch: str
    task: str
    backbone: nn.Module
    head: nn.Module
    l2: float
    fine_tune: int = 0

    @property
    def frozen_backbone(self) -> bool:
        return self.fine_tune == 0

    @property
    def inference_backbone(self) -> nn.Module:
        """The backbone as the steps run it: BatchNorm folded into the convs before it."""
        return create_backbone(self.arch, dtype=self.backbone.dtype, fold_bn=True)


def build_step_model(
    arch: str,
    task: str,
    *,
    dropout: float = 0.5,
    bf16: bool = False,
    l2: float | None = None,
    fine_tune: int = 0,
) -> StepModel:
    """Backbone (bf16 compute when asked) and float32 head of (arch, task)."""
    return StepModel(
        arch=arch,
        task=task,
        backbone=create_backbone(arch, dtype=jnp.bfloat16 if bf16 else jnp.float32),
        head=create_head(arch, task, dropout=dropout),
        l2=default_l2(arch, task) if l2 is None else l2,
        fine_tune=fine_tune,
    )


def trainable_mask(params: Mapping[str, Any], arch: str, fine_tune: int) -> Any:
    """True for every head leaf and for backbone leaves of the last ``fine_tune`` blocks."""
    opened = tuple(p + "_" for p in BLOCKS[arch][len(BLOCKS[arch]) - fine_tune:])
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict(
        {k: k[0] == "head" or (fine_tune > 0 and k[1].startswith(opened)) for k in flat}
    )


def make_optimizer(params: Mapping[str, Any], arch: str, fine_tune: int, lr: float):
    """Adam (Keras defaults) on trainable leaves, ``set_to_zero`` on frozen ones."""
    labels = jax.tree.map(lambda t: "trainable" if t else "frozen", trainable_mask(params, arch, fine_tune))
    return optax.multi_transform(
        {"trainable": optax.adam(lr, eps=ADAM_EPSILON), "frozen": optax.set_to_zero()}, labels
    )


def init_variables(
    model: StepModel,
    image_size: int,
    *,
    init: str = "imagenet",
    weights_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the full model, each ``{"backbone", "head"}``.

    ``init="imagenet"`` loads ``xrayjax.porting.load_pretrained`` (FileNotFoundError with
    the porting command when missing); ``"random"`` initialises the backbone from ``seed``
    with JAX's ``rbg`` generator (XLA's RngBitGenerator): compiling threefry for every
    backbone tensor took 4 of the 4.4 s of a random VGG19's set-up on the CPU, ``rbg`` 1.5 s.
    Its draws are fixed by the seed on one backend and JAX version, but may differ between
    CPU and GPU. The head is always initialised from ``seed`` with threefry.
    """
    head_key = jax.random.split(jax.random.key(seed))[1]
    x = np.zeros((1, image_size, image_size, 3), np.float32)  # numpy: no compile for a constant
    if init == "imagenet":
        from xrayjax.porting import load_pretrained

        backbone_vars = load_pretrained(model.arch, weights_dir)
    else:
        backbone_vars = jax.jit(model.backbone.init)(jax.random.key(seed, impl="rbg"), x)
    features = jax.eval_shape(model.backbone.apply, backbone_vars, x)
    head_vars = jax.jit(model.head.init)(head_key, np.zeros(features.shape, np.float32))
    return {
        col: {"backbone": dict(backbone_vars.get(col, {})), "head": dict(head_vars.get(col, {}))}
        for col in ("params", "batch_stats")
    }


def create_train_state(model: StepModel, variables: Mapping[str, Any], lr: float) -> TrainState:
    """A fresh TrainState (float32 params, optimizer state of the trainable leaves only).

    ``TrainState.create`` with the optimizer's init compiled as one program: eagerly, every
    zeros-like of a new shape compiles on its own.
    """
    params = jax.device_put(dict(variables["params"]))  # jnp.asarray would compile per shape
    tx = make_optimizer(params, model.arch, model.fine_tune, lr)
    return TrainState(
        step=0,
        apply_fn=create_model(model.arch, model.task).apply,
        params=params,
        tx=tx,
        opt_state=jax.jit(tx.init)(params),
        batch_stats=jax.device_put(dict(variables["batch_stats"])),
    )


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Put ``tree`` on every device with the replicated sharding pmap's ``in_axes=None`` uses.

    Only this process's devices of ``devices`` get a copy: a multi-process pmap joins the
    processes' (equal) copies itself, and no cross-host transfer is needed.
    """
    local = [devices[i] for i in distributed.local_positions(devices)]
    mesh = jax.sharding.Mesh(np.asarray(local), (AXIS,))
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _mask_batchnorm(mask: jax.Array) -> Callable:
    """Method interceptor giving every BatchNorm the sample mask (padding never counts)."""

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            x = args[0]
            kwargs = {**kwargs, "mask": (mask > 0).reshape((-1,) + (1,) * (x.ndim - 1))}
        return next_fun(*args, **kwargs)

    return interceptor


def head_loss(
    model: StepModel,
    head_params: Any,
    head_stats: Any,
    features: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    rng: jax.Array | None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Mask-weighted mean cross-entropy + L2 on the head's Dense kernels (Keras semantics).

    Training mode when ``rng`` (the dropout key) is given, else inference. Returns
    ``(loss, (metrics, new_head_stats))``; metrics hold sums over the real samples
    (``loss_sum`` = loss times count, ``correct``, ``count``).
    """
    train = rng is not None
    variables = {"params": head_params}
    if head_stats:
        variables["batch_stats"] = head_stats
    with nn.intercept_methods(_mask_batchnorm(mask)):
        logits, updates = model.head.apply(
            variables,
            features,
            train=train,
            rngs={"dropout": rng} if train else None,
            mutable=["batch_stats"] if train and head_stats else [],
        )
    if model.task == "binary":
        per_sample = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
        correct = (logits[:, 0] > 0).astype(jnp.int32) == labels
    else:
        per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, axis=-1) == labels
    count = jnp.sum(mask)
    penalty = model.l2 * sum(
        jnp.sum(jnp.square(layer["kernel"]))
        for name, layer in head_params.items()
        if name.startswith("dense")
    )
    loss = jnp.sum(mask * per_sample) / jnp.maximum(count, 1.0) + penalty
    metrics = {
        "loss_sum": loss * count,
        "correct": jnp.sum(mask * correct),
        "count": count,
    }
    return loss, (metrics, updates.get("batch_stats", head_stats))


def _apply_gradients(state: TrainState, grads: Any, head_stats: Any) -> TrainState:
    return state.apply_gradients(
        grads=grads, batch_stats={"backbone": state.batch_stats["backbone"], "head": head_stats}
    )


def _split_trainable(model: StepModel, params: Any) -> tuple[dict, dict]:
    flat = traverse_util.flatten_dict(dict(params))
    mask = traverse_util.flatten_dict(trainable_mask(params, model.arch, model.fine_tune))
    return {k: v for k, v in flat.items() if mask[k]}, {k: v for k, v in flat.items() if not mask[k]}


def _backbone_features(model: StepModel, params: Any, stats: Any, images: jax.Array) -> jax.Array:
    """Backbone on a uint8 batch, preprocessed on device, BatchNorm in inference mode.

    The BatchNorms are folded into their convs inside the step (a few cheap ops on the
    weights), so conv, bias and ReLU run as one fused kernel over the activations.
    """
    variables = fold_batchnorm({"params": params, "batch_stats": stats or {}})
    return model.inference_backbone.apply(variables, preprocess_input(images))


def _gather(x: jax.Array) -> jax.Array:
    return jax.lax.all_gather(x, AXIS, tiled=True)


def train_step(
    model: StepModel, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on one device's shard (run under pmap with axis ``"batch"``)."""
    trainable, frozen = _split_trainable(model, state.params)

    def loss_fn(trainable):
        params = traverse_util.unflatten_dict({**frozen, **trainable})
        features = _backbone_features(
            model, params["backbone"], state.batch_stats["backbone"], batch["image"]
        )
        if model.frozen_backbone:
            features = jax.lax.stop_gradient(features)
        return head_loss(
            model,
            params["head"],
            state.batch_stats["head"],
            _gather(features),
            _gather(batch["label"]),
            _gather(batch["mask"]),
            rng,
        )

    (_, (metrics, head_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.pmean(grads, AXIS)
    full_grads = {**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads}
    return _apply_gradients(state, traverse_util.unflatten_dict(full_grads), head_stats), metrics


def eval_step(model: StepModel, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss/accuracy sums of one global batch in inference mode (under pmap)."""
    features = _backbone_features(
        model, state.params["backbone"], state.batch_stats["backbone"], batch["image"]
    )
    _, (metrics, _) = head_loss(
        model,
        state.params["head"],
        state.batch_stats["head"],
        _gather(features),
        _gather(batch["label"]),
        _gather(batch["mask"]),
        None,
    )
    return metrics


def head_train_step(
    model: StepModel,
    state: TrainState,
    features: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    rng: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The fast path's step: :func:`train_step` on cached backbone features of a global batch."""
    (_, (metrics, head_stats)), head_grads = jax.value_and_grad(
        lambda p: head_loss(model, p, state.batch_stats["head"], features, labels, mask, rng),
        has_aux=True,
    )(state.params["head"])
    grads = {"backbone": jax.tree.map(jnp.zeros_like, state.params["backbone"]), "head": head_grads}
    return _apply_gradients(state, grads, head_stats), metrics


def head_eval_step(
    model: StepModel, state: TrainState, features: jax.Array, labels: jax.Array, mask: jax.Array
) -> dict[str, jax.Array]:
    """The fast path's :func:`eval_step` on cached features."""
    _, (metrics, _) = head_loss(
        model, state.params["head"], state.batch_stats["head"], features, labels, mask, None
    )
    return metrics


def head_train_epoch(
    model: StepModel,
    state: TrainState,
    features: jax.Array,
    labels: jax.Array,
    index: jax.Array,
    mask: jax.Array,
    key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The fast path's epoch as one compiled loop: :func:`head_train_step` on each step's rows.

    ``index`` and ``mask`` (S, B) pick step s's global batch from the cached ``features``
    and ``labels``; its dropout key is ``fold_in(key, s)``, as in the full path. One call
    per epoch instead of S (the host waits once). Returns the state and per-step metrics (S,).
    """

    def step(state: TrainState, xs: tuple) -> tuple[TrainState, dict[str, jax.Array]]:
        s, rows, m = xs
        return head_train_step(model, state, features[rows], labels[rows], m, jax.random.fold_in(key, s))

    return jax.lax.scan(step, state, (jnp.arange(index.shape[0]), index, mask))


def head_eval_epoch(
    model: StepModel, state: TrainState, features: jax.Array, labels: jax.Array, index: jax.Array,
    mask: jax.Array,
) -> dict[str, jax.Array]:
    """:func:`head_eval_step` on every batch (``index``, ``mask``: (S, B)) of a split; per-step metrics."""

    def step(carry: None, xs: tuple) -> tuple[None, dict[str, jax.Array]]:
        rows, m = xs
        return carry, head_eval_step(model, state, features[rows], labels[rows], m)

    return jax.lax.scan(step, None, (index, mask))[1]


def make_train_step(model: StepModel, devices: Sequence[jax.Device]) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)`` pmapped over ``devices``.

    The state is replicated (``in_axes=None``; put it there with :func:`replicate`) and
    donated; the batch has a leading device axis; metrics come back once.
    """
    return jax.pmap(
        lambda state, batch, rng: train_step(model, state, batch, rng),
        axis_name=AXIS,
        in_axes=(None, 0, None),
        out_axes=(None, None),
        devices=devices,
        donate_argnums=(0,),
    )


def make_eval_step(model: StepModel, devices: Sequence[jax.Device]) -> Callable:
    """``step(state, batch) -> metrics`` pmapped over ``devices``."""
    return jax.pmap(
        lambda state, batch: eval_step(model, state, batch),
        axis_name=AXIS,
        in_axes=(None, 0),
        out_axes=None,
        devices=devices,
    )


def make_feature_step(model: StepModel, devices: Sequence[jax.Device]) -> Callable:
    """``features(backbone_variables, images) -> (D, B/D, h, w, C)`` float32, pmapped."""
    return jax.pmap(
        lambda variables, images: _backbone_features(
            model, variables["params"], variables["batch_stats"], images
        ),
        axis_name=AXIS,
        in_axes=(None, 0),
        devices=devices,
    )


def make_head_steps(model: StepModel) -> tuple[Callable, Callable]:
    """Jitted ``(head_train_epoch, head_eval_epoch)`` of the fast path (state donated)."""
    return (
        jax.jit(functools.partial(head_train_epoch, model), donate_argnums=0),
        jax.jit(functools.partial(head_eval_epoch, model)),
    )


def epoch_key(seed: int, epoch: int) -> jax.Array:
    """The dropout key of an epoch, from (seed, epoch) alone so a resumed run is exact."""
    return jax.random.fold_in(jax.random.key(seed), epoch)


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the final state, the history and the run's files."""

    state: TrainState
    history: list[dict[str, float]]
    run_dir: Path
    config_path: Path
    history_path: Path
    checkpoint_path: Path
    metrics: dict | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """A finished (or interrupted) run read back by :func:`load_run`."""

    config: TrainConfig
    class_names: tuple[str, ...]
    model: nn.Module
    variables: dict[str, Any]
    history: list[dict[str, float]]
    run_dir: Path


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read ``config.json``, ``history.json`` and ``checkpoint.msgpack`` of a run folder."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} is missing: {run_dir} is not a training run folder "
                "(train one with `python -m xrayjax.train --out DIR`)"
            )
    meta = json.loads((run_dir / CONFIG_FILE).read_text())
    config = TrainConfig(**meta["config"])
    state = _read_checkpoint(run_dir / CHECKPOINT_FILE)["state"]
    return Run(
        config=config,
        class_names=tuple(meta["class_names"]),
        model=create_model(config.arch, config.task, dropout=config.dropout),
        variables={
            "params": jax.device_put(state["params"]),
            "batch_stats": jax.device_put(state.get("batch_stats") or {}),
        },
        history=_read_history(run_dir / HISTORY_FILE),
        run_dir=run_dir,
    )


def _read_msgpack(path: Path) -> dict[str, Any]:
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"cannot read the checkpoint {path} ({e}); it is not a flax msgpack file") from e


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path`` with the run's frozen leaves (``frozen.msgpack``) merged in."""
    checkpoint = _read_msgpack(path)
    frozen_path = path.with_name(FROZEN_FILE)
    if not frozen_path.is_file():
        raise FileNotFoundError(f"{frozen_path} is missing: the run's frozen weights are needed with {path}")
    frozen = _read_msgpack(frozen_path)
    state = checkpoint["state"]
    for col in ("params", "batch_stats"):
        merged = traverse_util.unflatten_dict(
            {**traverse_util.flatten_dict(state[col]), **traverse_util.flatten_dict(frozen[col])}
        )
        state[col] = {part: merged.get(part, {}) for part in ("backbone", "head")}
    return checkpoint


def _split_frozen(model: StepModel, state: TrainState) -> tuple[dict, dict]:
    """(moving, frozen) parts of ``state``'s params and batch_stats. Frozen leaves (those the
    optimizer never opens, and the backbone's statistics) are written once, not every epoch."""
    moving, frozen = _split_trainable(model, state.params)
    stats = state.batch_stats
    return (
        {"params": traverse_util.unflatten_dict(moving), "batch_stats": {"backbone": {}, "head": stats["head"]}},
        {"params": traverse_util.unflatten_dict(frozen), "batch_stats": {"backbone": stats["backbone"], "head": {}}},
    )


def _read_history(path: Path) -> list[dict[str, float]]:
    return json.loads(path.read_text()) if path.is_file() else []


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2) + "\n").encode())


def _versions() -> dict[str, str]:
    import jaxlib

    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _checkpoint_writer(
    path: Path, model: StepModel, state: TrainState, epoch: int, seed: int, history: list
) -> Callable[[], None]:
    """A function writing everything to resume after ``epoch``: state (params, batch_stats,
    opt_state, step), epoch, key, history.

    The state is copied to the host now, because the next epoch takes over (donates) its
    device buffers; the function then only serialises and writes, and can run on a thread
    while that epoch trains. The frozen leaves go to ``frozen.msgpack`` once; each epoch
    rewrites only the rest (for a frozen VGG19 that is 6 MB of head and optimizer state
    instead of 86 MB).
    """
    moving, frozen = _split_frozen(model, state)
    host_state = serialization.to_state_dict(jax.device_get(state.replace(**moving)))
    # a fresh run (over)writes the frozen leaves, so no other run's file is ever reused
    host_frozen = jax.device_get(frozen) if epoch == 1 else None
    history = json.dumps(history)

    def write() -> None:
        if host_frozen is not None:
            save_variables(host_frozen, path.with_name(FROZEN_FILE))
        payload = {
            "state": host_state,
            "epoch": epoch,
            "rng": np.asarray(jax.random.key_data(jax.random.key(seed))),
            "history": history,
        }
        write_atomic(path, serialization.msgpack_serialize(payload))

    return write


class _BackgroundWrites:
    """File writes on one thread, in order, at most one batch in flight. ``close`` (also on
    an error or Ctrl-C) waits for the last one, so a stopped run keeps its last checkpoint;
    a failed write raises at the next ``submit`` or at ``close``."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="xrayjax-writes")
        self._pending: concurrent.futures.Future | None = None

    def submit(self, *writes: Callable[[], None]) -> None:
        self._wait()
        self._pending = self._pool.submit(lambda: [write() for write in writes])

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()


def _index_split(split: Any) -> Any:
    """A split whose labels are row indices: ``batches`` of it give the order of ``split``."""
    n = len(split)
    return type(split)(np.zeros((n, 1, 1, 3), np.uint8), np.arange(n, dtype=np.int32), split.names)


def _flat(x: np.ndarray) -> np.ndarray:
    return x.reshape((-1,) + x.shape[2:])


def _feature_shape(model: StepModel, image_size: int) -> tuple[int, ...]:
    """The backbone's output shape for one image (traced for shapes only, nothing compiled)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda k, x: model.backbone.init_with_output(k, x)[0], jax.random.key(0), x).shape[1:]


def _features_fit_on_device(nbytes: int, device: jax.Device) -> bool:
    """Whether ``nbytes`` of cached features fit in half of ``device``'s free memory."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return True  # CPU: device memory is host memory
    return nbytes < 0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0))


class Timings(dict):
    """Wall seconds per phase of a run (``setup``: initial variables and optimizer state,
    ``data_load``, ``compile``, ``features``, ``train``, ``evaluate``), written to
    ``<out>/timings.json``; device work is synchronised inside."""

    def add(self, name: str, seconds: float) -> None:
        self[name] = round(self.get(name, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)


class _Trainer:
    """One run's loop: batches in, steps, metrics out. Owns no files.

    ``devices`` are those of every process (:func:`xrayjax.distributed.training_devices`);
    the pmapped steps get this process's slice of each global batch.
    """

    def __init__(self, config: TrainConfig, model: StepModel, splits: Any, devices: list, log: Callable,
                 timings: Timings):
        self.config, self.model, self.splits, self.devices, self.log = config, model, splits, devices, log
        self.timings = timings
        self.home = devices[distributed.local_positions(devices)[0]]  # this process's first device
        # the non-empty splits whose backbone features the fast path caches (test: for evaluation)
        self.cached_splits = tuple(name for name in ("train", "validation", "test")[:3 if config.evaluate else 2]
                                   if len(getattr(splits, name)))
        self.fast = config.cache_features and model.frozen_backbone and not config.augment
        self.feature_shape = _feature_shape(model, config.image_size) if self.fast else None
        rows = sum(len(getattr(splits, n)) for n in self.cached_splits)
        if self.fast and not _features_fit_on_device(rows * math.prod(self.feature_shape) * 4, self.home):
            self.fast = False
            log("the backbone features of the data would not fit in device memory: running the "
                "backbone every step instead of caching its features")
        self.features: dict[str, tuple[jax.Array, jax.Array]] = {}
        if self.fast:
            self.head_train, self.head_eval = make_head_steps(model)
        else:
            self.train_fn = make_train_step(model, devices)
            self.eval_fn = make_eval_step(model, devices)

    def _batches(self, split: Any, shuffle: bool, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        c = self.config
        return batches(
            _index_split(split) if self.fast else split,
            c.batch_size,
            len(self.devices),
            shuffle=shuffle,
            seed=c.seed,
            epoch=epoch,
            augment=c.augment and shuffle,
        )

    def place(self, state: TrainState) -> TrainState:
        if self.fast:
            return jax.device_put(state, self.home)
        return replicate(state, self.devices)

    def _compiled(self, *jobs: tuple[Callable, tuple]) -> list[Callable]:
        """Each ``(fn, example_args)`` compiled ahead of time (timed as ``compile``; every
        batch has one shape): lowered in turn, then compiled on parallel threads, as XLA
        compiles with the GIL released. Across processes a pmap lowered ahead of time
        expects global shapes while each process feeds its local shard, so there each ``fn``
        compiles at its first call."""
        if jax.process_count() > 1:
            return [fn for fn, _ in jobs]
        with self.timings.phase("compile"):
            lowered = [fn.lower(*example) for fn, example in jobs]
            with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
                return list(pool.map(lambda program: program.compile(), lowered))

    def compile(self, state: TrainState) -> None:
        """Compile the steps ahead of time: the full path's train and eval steps, or the fast
        path's feature step and head epochs (for the feature shapes, traced without compiling)."""
        if not self.fast:
            example = distributed.local_shard(next(self._batches(self.splits.train, False, 0)), self.devices)
            self.train_fn, self.eval_fn = self._compiled(
                (self.train_fn, (state, example, epoch_key(0, 0))), (self.eval_fn, (state, example))
            )
            return
        self.backbone = replicate(
            {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]},
            self.devices,
        )
        example = distributed.local_shard(
            next(batches(self.splits.train, self.config.batch_size, len(self.devices), shuffle=False)),
            self.devices,
        )["image"]
        shape = self.feature_shape

        def head_example(name: str) -> tuple:
            labels = getattr(self.splits, name).labels
            return (jax.ShapeDtypeStruct((len(labels), *shape), jnp.float32),
                    jax.ShapeDtypeStruct(labels.shape, labels.dtype), *self._epoch_index(name, False, 0))

        jobs = [(make_feature_step(self.model, self.devices), (self.backbone, example)),
                (self.head_train, (state, *head_example("train"), epoch_key(0, 0)))]
        if "validation" in self.cached_splits:
            jobs.append((self.head_eval, (state, *head_example("validation"))))
        self.feature_fn, self.head_train, *evaluation = self._compiled(*jobs)
        if evaluation:
            (self.head_eval,) = evaluation

    def _epoch_index(self, name: str, shuffle: bool, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Each step's rows of a split's cached features and its padding mask, both (S, B)."""
        steps = list(self._batches(getattr(self.splits, name), shuffle, epoch))
        return np.stack([_flat(batch["label"]) for batch in steps]), np.stack([_flat(batch["mask"]) for batch in steps])

    def _epoch_rows(self, name: str, shuffle: bool, epoch: int) -> tuple:
        """The fast path's inputs for one pass over a split: features, labels, rows, mask."""
        return (*self.features[name], *self._epoch_index(name, shuffle, epoch))

    def cache(self) -> None:
        """The fast path: backbone features of every split, once, after :meth:`compile`.

        The test split's are kept for the evaluation at the end (when the run evaluates), so
        the backbone never runs twice on an image.
        """
        began = time.perf_counter()
        for name in self.cached_splits:
            split = getattr(self.splits, name)
            chunks = []
            total = math.ceil(len(split) / self.config.batch_size)
            bar = tqdm(total=total, desc=f"features {name}", disable=self.log.quiet, leave=False)
            for batch in batches(split, self.config.batch_size, len(self.devices), shuffle=False):
                local = distributed.local_shard(batch, self.devices)["image"]
                features = _flat(distributed.gather_shards(self.feature_fn(self.backbone, local)))
                chunks.append(features[_flat(batch["mask"]) > 0])
                bar.update()
            bar.close()
            self.features[name] = jax.device_put((np.concatenate(chunks), split.labels), self.home)
        self.timings.add("features", time.perf_counter() - began)
        counts = " + ".join(f"{len(getattr(self.splits, name))} {name}" for name in self.cached_splits)
        shape = self.features["train"][0].shape[1:]
        self.log(f"cached backbone features of {counts} images, {shape} each; training only the head")

    def train_epoch(self, state: TrainState, epoch: int, bar: Any) -> tuple[TrainState, dict]:
        key = epoch_key(self.config.seed, epoch)
        sums = dict.fromkeys(("loss_sum", "correct", "count"), 0.0)
        if self.fast:
            state, metrics = self.head_train(state, *self._epoch_rows("train", True, epoch), key)
            metrics = jax.device_get(metrics)
            for step in range(len(metrics["count"])):
                self._tally(sums, {k: v[step] for k, v in metrics.items()}, epoch, step, bar)
            return state, sums
        for step, batch in enumerate(self._batches(self.splits.train, True, epoch)):
            rng = jax.random.fold_in(key, step)
            state, metrics = self.train_fn(state, distributed.local_shard(batch, self.devices), rng)
            self._tally(sums, metrics, epoch, step, bar)
        return state, sums

    @staticmethod
    def _tally(sums: dict, metrics: Mapping[str, Any], epoch: int, step: int, bar: Any) -> None:
        """Add one step's metrics to ``sums``; stop on a NaN or infinite loss."""
        metrics = {k: float(v) for k, v in metrics.items()}
        loss = metrics["loss_sum"] / max(metrics["count"], 1.0)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss} at epoch {epoch + 1}, step {step + 1}")
        for k in sums:
            sums[k] += metrics[k]
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")

    def evaluate(self, state: TrainState, name: str) -> dict:
        """Loss and accuracy sums over a split, inference mode."""
        split = getattr(self.splits, name)
        if self.fast:
            per_call = [self.head_eval(state, *self._epoch_rows(name, False, 0))] if len(split) else []
        else:
            per_call = [self.eval_fn(state, distributed.local_shard(batch, self.devices))
                        for batch in self._batches(split, False, 0)]
        sums = dict.fromkeys(("loss_sum", "correct", "count"), 0.0)
        for metrics in jax.device_get(per_call):
            for k in sums:
                sums[k] += float(np.sum(metrics[k], dtype=np.float64))
        return sums


def _rates(sums: Mapping[str, float]) -> tuple[float, float]:
    count = max(sums["count"], 1.0)
    return sums["loss_sum"] / count, sums["correct"] / count


class _Log:
    """Messages to stderr unless quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet or not sys.stderr.isatty()
        self._silent = quiet

    def __call__(self, message: str) -> None:
        if not self._silent:
            print(message, file=sys.stderr, flush=True)


def _check_resume(config: TrainConfig, run_dir: Path) -> tuple[dict, list]:
    """The checkpoint of ``run_dir`` after checking ``config`` continues its run."""
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if not checkpoint_path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {checkpoint_path}; start the run without --resume"
        )
    saved = json.loads((run_dir / CONFIG_FILE).read_text())["config"]
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"--resume: the run in {run_dir} was trained with other settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {current[k]!r})" for k in changed)
            + "; pass the same settings or choose another --out"
        )
    checkpoint = _read_checkpoint(checkpoint_path)
    return checkpoint, json.loads(checkpoint["history"])


def train(config: TrainConfig, splits: Any | None = None) -> TrainResult:
    """Train a run as ``config`` says; ``splits`` (an ``xrayjax.data.Splits``) skips loading.

    Writes ``config.json``, then per epoch ``history.json`` and ``checkpoint.msgpack`` into
    ``config.out``; evaluates the test split at the end (``config.evaluate``). In a
    multi-process run it first joins the other processes; only process 0 writes and evaluates.

    Raises:
        FileNotFoundError: missing ImageNet weights (the message says how to port them).
        TrainingDiverged: NaN/inf loss; the last good checkpoint is kept.
        ValueError: a bad setting, or ``resume`` with settings other than the run's.
        xrayjax.distributed.DistributedError: incomplete or bad multi-process settings.
    """
    config = config.resolved()
    distributed.initialize(distributed.from_args_and_env(
        config.coordinator, config.num_processes, config.process_id,
        initialization_timeout=config.coordinator_timeout, heartbeat_timeout=config.heartbeat_timeout,
    ))
    writer = distributed.is_main_process()
    log = _Log(config.quiet or not writer)
    devices = distributed.training_devices(config.num_devices)
    if config.batch_size % len(devices):
        raise ValueError(
            f"batch_size {config.batch_size} is not a multiple of the {len(devices)} devices"
            + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
            + "; pass --batch-size as a multiple or --num-devices"
        )
    if jax.process_count() > 1:
        log(f"{jax.process_count()} processes, {len(devices)} devices in all; process 0 writes {config.out}")
    run_dir = Path(config.out)
    paths = {name: run_dir / name for name in (CONFIG_FILE, HISTORY_FILE, CHECKPOINT_FILE)}
    if not config.resume and paths[CHECKPOINT_FILE].exists():
        raise ValueError(
            f"{run_dir} already holds a run (checkpoint.msgpack); pass --resume to continue it "
            "or choose another --out"
        )
    checkpoint, history = _check_resume(config, run_dir) if config.resume else (None, [])

    model = build_step_model(
        config.arch, config.task, dropout=config.dropout, bf16=config.bf16,
        l2=config.l2, fine_tune=config.fine_tune,
    )
    if config.init == "random":
        log(f"--init random: the {config.arch} backbone is initialised randomly (seed {config.seed}), "
            "not from ImageNet")
    timings = Timings()
    with timings.phase("setup"):
        variables = init_variables(
            model, config.image_size, init=config.init, weights_dir=config.weights_dir, seed=config.seed
        )
    if splits is None:
        with timings.phase("data_load"):
            splits = load_splits(config.data_config())
    with timings.phase("setup"):
        state = create_train_state(model, variables, config.lr)
    start = 0
    if checkpoint is not None:
        state = serialization.from_state_dict(state, checkpoint["state"])
        start = int(checkpoint["epoch"])
        log(f"resuming {run_dir} after epoch {start}")

    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(paths[CONFIG_FILE], {
            "config": dataclasses.asdict(config),
            "class_names": list(splits.class_names),
            "device": f"{devices[0].platform}: {devices[0].device_kind}",
            "num_devices": len(devices),
            "num_processes": jax.process_count(),
            "versions": _versions(),
        })

    trainer = _Trainer(config, model, splits, devices, log, timings)
    state = trainer.place(state)
    if start < config.epochs:
        trainer.compile(state)
        if config.evaluate and writer:
            _import_in_background("xrayjax.evaluate")
        if trainer.fast:
            trainer.cache()
    steps = math.ceil(len(splits.train) / config.batch_size)
    bar = tqdm(total=(config.epochs - start) * steps, desc="training", unit="step", disable=log.quiet)
    writes = _BackgroundWrites()
    try:
        for epoch in range(start, config.epochs):
            began = time.perf_counter()
            try:
                state, train_sums = trainer.train_epoch(state, epoch, bar)
            except TrainingDiverged as e:
                kept = (f"the last good checkpoint (epoch {epoch}) is kept at {paths[CHECKPOINT_FILE]}"
                        if epoch else "no checkpoint was written")
                raise TrainingDiverged(
                    f"{e}; training stopped and {kept}. Try a lower --lr (now {config.lr})"
                    + (" or train without --bf16" if config.bf16 else "")
                    + "."
                ) from None
            train_loss, train_acc = _rates(train_sums)
            val_loss, val_acc = _rates(trainer.evaluate(state, "validation"))
            history.append({
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "seconds": time.perf_counter() - began,
            })
            if writer:
                writes.submit(
                    _checkpoint_writer(paths[CHECKPOINT_FILE], model, state, epoch + 1, config.seed, history),
                    functools.partial(_write_json, paths[HISTORY_FILE], list(history)),
                )
            timings.add("train", time.perf_counter() - began)
            bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_acc:.3f}",
                            val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
            if log.quiet:
                log(f"epoch {epoch + 1}/{config.epochs}: loss {train_loss:.4f} acc {train_acc:.3f} "
                    f"val_loss {val_loss:.4f} val_acc {val_acc:.3f}")
    finally:
        bar.close()
        with timings.phase("train"):
            writes.close()

    metrics = None
    if config.evaluate and writer:
        with timings.phase("evaluate"):
            metrics = _evaluate(run_dir, splits, log, {k: f for k, (f, _) in trainer.features.items()})
    if writer:
        _write_json(run_dir / TIMINGS_FILE, timings)
    log("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    distributed.wait_for_all("xrayjax.train: process 0 has written the run")
    return TrainResult(
        state=state,
        history=history,
        run_dir=run_dir,
        config_path=paths[CONFIG_FILE],
        history_path=paths[HISTORY_FILE],
        checkpoint_path=paths[CHECKPOINT_FILE],
        metrics=metrics,
        timings=dict(timings),
    )


def _import_in_background(module: str) -> None:
    """Start importing ``module`` on a daemon thread. The evaluation's imports (scikit-learn,
    matplotlib: 2 s on the CPU) then overlap the training, which mostly waits on XLA with
    the GIL released; the ``import`` at the end waits for the thread or finds the module.
    An ImportError is left for that ``import`` to report."""

    def load() -> None:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)

    threading.Thread(target=load, name=f"import {module}", daemon=True).start()


def _evaluate(run_dir: Path, splits: Any, log: _Log, features: dict[str, Any]) -> dict | None:
    """``xrayjax.evaluate.evaluate_run`` on the run's splits and cached backbone features (if
    any), when that module exists."""
    try:
        from xrayjax.evaluate import evaluate_run
    except ImportError as e:
        log(f"evaluation skipped: {e}")
        return None
    return evaluate_run(run_dir, splits=splits, quiet=log.quiet, features=features)


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m xrayjax.train",
        description="Train a chest X-ray classifier: a frozen ImageNet backbone and the report's "
        "head, data parallel over all local devices (or over several hosts: see the multi-host "
        "flags). Writes config.json, history.json and checkpoint.msgpack (every epoch) into --out, "
        "then evaluates the test split.",
    )
    p.add_argument("--arch", choices=ARCHS, default=d.arch, help=f"backbone (default {d.arch})")
    p.add_argument("--task", choices=TASKS, default=d.task,
                   help="binary (covid/normal, Task 1) or four_class (default four_class)")
    p.add_argument("--data-dir", help="dataset folder or zip (default ../shared/covid_xray next to the repo)")
    p.add_argument("--tfds-dir", help="where the prepared TFDS data lives (default TFDS' own data dir)")
    p.add_argument("--color", choices=("gray", "keep"), default=d.color,
                   help="gray: every image to grayscale (default); keep: original colour modes")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"fraction of train held out for validation, stratified (default {d.val_fraction})")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"input size in pixels (default {d.image_size}; smaller for quick runs)")
    p.add_argument("--init", choices=("imagenet", "random"), default=d.init,
                   help="backbone weights: ported ImageNet weights (default) or random")
    p.add_argument("--weights-dir", help="folder of <arch>_imagenet_notop.msgpack (default the repo's weights/)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch size, split over the devices (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--l2", type=float, default=None,
                   help="L2 factor on the head's Dense kernels (default: 1e-3, but 0 for vgg16 four_class)")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"head dropout rate (default {d.dropout})")
    p.add_argument("--augment", action="store_true",
                   help="random rotation/shift/zoom of training images (default off; disables feature caching)")
    p.add_argument("--bf16", action="store_true",
                   help="backbone computes in bfloat16; head and loss stay float32 (default off)")
    p.add_argument("--fine-tune", type=int, default=d.fine_tune, metavar="N",
                   help="also train the last N backbone blocks (default 0: backbone frozen)")
    p.add_argument("--no-cache-features", dest="cache_features", action="store_false",
                   help="run the backbone every step even when it is frozen (default: cache its features)")
    p.add_argument("--num-devices", type=int, help="use the first N local devices of each process (default all)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"seed of the head init, data order, dropout and validation split (default {d.seed})")
    p.add_argument("--out", help="run folder (default runs/<arch>_<task>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the test-set evaluation at the end")
    g = p.add_argument_group(
        "multi-host", "Run the same command on every host, changing only --process-id. Without these "
        "flags they come from the environment jax.distributed.initialize understands "
        "(JAX_COORDINATOR_ADDRESS; SLURM's srun, Open MPI, Kubernetes, Cloud TPU). --batch-size stays "
        "global; process 0 writes --out and evaluates; --resume needs its checkpoint on every host.")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's host and a free port that every host can reach")
    g.add_argument("--num-processes", type=int, metavar="N", help="how many processes (hosts) take part")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (0 writes the run)")
    g.add_argument("--coordinator-timeout", type=int, default=d.coordinator_timeout, metavar="S",
                   help=f"give up when not every process has joined within S seconds (default {d.coordinator_timeout})")
    g.add_argument("--heartbeat-timeout", type=int, default=d.heartbeat_timeout, metavar="S",
                   help="stop every process about S seconds after one of them died "
                   f"(default {d.heartbeat_timeout})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: parse flags into a :class:`TrainConfig` and :func:`train`; errors as messages."""
    args = _parser().parse_args(argv)
    try:
        result = train(TrainConfig(**vars(args)))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, DataError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: continue the run with the same flags and --resume", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        print(f"error: a collective with the other processes failed ({e}); another process has "
              "probably died (see its log). Restart every process with the same flags and --resume "
              "to continue from process 0's last checkpoint", file=sys.stderr)
        return 1
    last = result.history[-1] if result.history else None
    if last and distributed.is_main_process():
        print(f"done: {result.run_dir} (val_accuracy {last['val_accuracy']:.3f})")
    return 0
