"""Pure training and evaluation steps, and the builders that compile them.

flax examples/imagenet style: a :class:`TrainState` with ``batch_stats``, a static
:class:`StepModel`, and ``make_*`` builders that a loop, a benchmark or a multi-host driver
reuse. Nothing here writes files or loops over epochs.

- The backbone runs data parallel (``jax.pmap`` over the devices, uint8 batches
  preprocessed on device), in inference mode (a ResNet's BatchNorms folded into the convs), under
  ``stop_gradient`` when frozen. Its features are all-gathered, so the head (cheap) sees the
  whole global batch on every device: loss and accuracy are mask-weighted means over the
  global batch, the head's BatchNorm uses the statistics of the real (unpadded) samples, and
  D devices give the 1-device result.
- ``--augment`` (``StepModel.augment``): the train step rotates, shifts and zooms its uint8
  images before preprocessing (:mod:`xrayjax.augment`), per image from the step's key.
- Freezing: optax masking (:func:`xrayjax.optim.make_optimizers`) and only the trainable leaves
  differentiated, so frozen weights and statistics stay bit-identical.
- The fast path trains the head on cached backbone features, one ``lax.scan`` per epoch,
  with the batches, loss and dropout keys of the full path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from flax.core import FrozenDict

from xrayjax import distributed
from xrayjax.augment import AugmentConfig, augment_images
from xrayjax.models import DROPOUT, Classifier, create_backbone, create_head, default_l2, image_features, keras_init
from xrayjax.optim import make_optimizers, trainable_mask

AXIS = "batch"
AUGMENT_STREAM = 1  # folded into a step's key for its augmentation


class TrainState(struct.PyTreeNode):
    """Step count, parameters and BatchNorm statistics (each ``{"backbone", "head"}``, or only
    ``{"head"}`` on the cached-feature path), and one optimizer with its state per trainable part
    (``tx`` and ``opt_state`` keyed like ``params``; a part without one never changes)."""

    step: jax.Array | int
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: FrozenDict = struct.field(pytree_node=False)

    def apply_gradients(self, grads: Mapping[str, Any], head_stats: Any) -> TrainState:
        """One update of every part that has an optimizer, from ``grads`` of those parts."""
        params, opt_state = dict(self.params), {}
        for part, tx in self.tx.items():
            updates, opt_state[part] = tx.update(grads[part], self.opt_state[part], self.params[part])
            params[part] = optax.apply_updates(self.params[part], updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                            batch_stats={**self.batch_stats, "head": head_stats})

    def head_only(self) -> TrainState:
        """The head's part alone (a frozen backbone's state has nothing else that trains)."""
        if set(self.tx) != {"head"}:
            raise ValueError("only a state whose backbone is frozen has a head-only part")
        return self.replace(params={"head": self.params["head"]}, batch_stats={"head": self.batch_stats["head"]})

    def with_head(self, head: TrainState) -> TrainState:
        """This state with the head, its statistics, its optimizer state and the step of ``head``."""
        return self.replace(step=head.step, params={**self.params, "head": head.params["head"]},
                            batch_stats={**self.batch_stats, "head": head.batch_stats["head"]},
                            opt_state=head.opt_state)


@dataclasses.dataclass(frozen=True)
class StepModel:
    """The static half of a training step: modules and loss settings the steps close over."""

    arch: str
    task: str
    backbone: nn.Module
    head: nn.Module
    l2: float
    fine_tune: int = 0
    label_weights: tuple[float, ...] | None = None
    augment: AugmentConfig | None = None  # training images' random rotation, shift and zoom

    @property
    def frozen_backbone(self) -> bool:
        return self.fine_tune == 0


def build_step_model(
    arch: str,
    task: str,
    *,
    dropout: float = DROPOUT,
    bf16: bool = False,
    l2: float | None = None,
    fine_tune: int = 0,
    num_classes: int | None = None,
    label_weights: Sequence[float] | None = None,
    augment: AugmentConfig | None = None,
    classifier: Classifier | None = None,
) -> StepModel:
    """Backbone (bf16 compute when asked) and float32 head of (arch, task), ``num_classes``
    outputs for multiclass and multilabel (default 4); ``label_weights`` weigh each label's loss
    (multilabel); ``augment`` turns on the train step's augmentation. ``classifier``: the
    backbone and head to train in place of those (a Keras model imported whole,
    :func:`xrayjax.runfiles.imported_model`; ``dropout`` and ``bf16`` are then its own)."""
    return StepModel(
        arch=arch,
        task=task,
        backbone=classifier.backbone if classifier is not None else
        create_backbone(arch, dtype=jnp.bfloat16 if bf16 else jnp.float32),
        head=classifier.head if classifier is not None else
        create_head(arch, task, dropout=dropout, num_classes=num_classes),
        l2=default_l2(arch, task) if l2 is None else l2,
        fine_tune=fine_tune,
        label_weights=None if label_weights is None else tuple(float(w) for w in label_weights),
        augment=augment,
    )


def balanced_label_weights(train_labels: np.ndarray) -> np.ndarray:
    """Per-label loss weights of ``--label-weights balanced``, TorchXRayVision's task weights
    (mlmed/torchxrayvision, ``scripts/train_utils.py``, ``train_epoch`` with ``cfg.taskweights``):
    with n the positive count of each label in train (``np.nansum(labels, axis=0)``), the weight
    is ``max(n) - n + mean(n)``, divided by its maximum. Rarer labels weigh more; the rarest
    weighs 1. (L,) float64."""
    counts = np.nansum(np.asarray(train_labels, np.float64), axis=0)
    if not counts.any():
        raise ValueError("label weights need at least one positive in train")
    weights = counts.max() - counts + counts.mean()
    return weights / weights.max()


def init_backbone(arch: str, image_size: int, *, init: str = "imagenet", weights_dir: str | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """The backbone's variables: ported ImageNet weights or Keras' initialisers drawn from ``seed``.

    ``init="imagenet"`` loads ``xrayjax.porting.load_pretrained`` (FileNotFoundError with the
    porting command when missing); ``"random"`` is :func:`~xrayjax.models.keras_init` from
    :func:`init_seed` ``(seed, 0)`` (numpy: nothing to compile, the same draws on every backend).
    """
    if init == "imagenet":
        from xrayjax.porting import load_pretrained

        return load_pretrained(arch, weights_dir)
    return keras_init(create_backbone(arch), (1, image_size, image_size, 3), init_seed(seed, 0))


def init_variables(
    model: StepModel,
    image_size: int,
    *,
    init: str = "imagenet",
    weights_dir: str | None = None,
    seed: int = 0,
    backbone: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of the full model, each ``{"backbone", "head"}``: the
    backbone from :func:`init_backbone` (ImageNet weights, or Keras' initialisers with
    ``init="random"``; or ``backbone``, already made), the head from :func:`init_head` (Keras' initialisers)."""
    if backbone is None:
        backbone = init_backbone(model.arch, image_size, init=init, weights_dir=weights_dir, seed=seed)
    head = init_head(model, feature_shape(model, image_size), seed)
    return {
        col: {"backbone": dict(backbone.get(col, {})), "head": dict(head.get(col, {}))}
        for col in ("params", "batch_stats")
    }


def feature_shape(model: StepModel, image_size: int) -> tuple[int, ...]:
    """One image's backbone features at ``image_size``: traced, nothing computed or compiled."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.backbone.init_with_output(jax.random.key(0), x)[0], x).shape[1:]


def init_head(model: StepModel, feature_shape: Sequence[int], seed: int) -> dict[str, Any]:
    """The head's fresh variables for backbone features of ``feature_shape`` (one image's):
    :func:`~xrayjax.models.keras_init` from :func:`init_seed` ``(seed, 1)``."""
    return keras_init(model.head, (1, *feature_shape), init_seed(seed, 1))


def init_seed(seed: int, part: int) -> np.random.SeedSequence:
    """The random init's stream for ``part`` (0 the backbone, 1 the head): child ``part`` of
    ``seed``'s SeedSequence, apart from the data's streams (``seed`` for the splits,
    ``[seed, epoch]`` for the order), which a plain ``(seed, part)`` would repeat."""
    return np.random.SeedSequence(seed, spawn_key=(part,))


def create_train_state(model: StepModel, variables: Mapping[str, Any], lr: float) -> TrainState:
    """A fresh TrainState; each optimizer's init is one compiled program, not one per shape."""
    params = jax.device_put(dict(variables["params"]))  # jnp.asarray would compile per shape
    txs = make_optimizers(params, model.arch, model.fine_tune, lr)
    return TrainState(
        step=0,
        params=params,
        batch_stats=jax.device_put(dict(variables["batch_stats"])),
        opt_state={part: jax.jit(tx.init)(params[part]) for part, tx in txs.items()},
        tx=FrozenDict(txs),
    )


def _local_mesh(devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    """This process's ``devices`` in their pmap order, as the 1-D mesh of pmap's axis."""
    return jax.sharding.Mesh(np.asarray([devices[i] for i in distributed.local_positions(devices)]), (AXIS,))


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Put ``tree`` on this process's ``devices`` as pmap's ``in_axes=None`` expects it."""
    return jax.device_put(tree, jax.sharding.NamedSharding(_local_mesh(devices), jax.sharding.PartitionSpec()))


def batch_sharding(devices: Sequence[jax.Device]) -> jax.sharding.NamedSharding:
    """Where a batch's leading device axis goes on this process's ``devices``, as pmap takes it."""
    return jax.sharding.NamedSharding(_local_mesh(devices), jax.sharding.PartitionSpec(AXIS))


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

    Multilabel: for each label the mean binary cross-entropy over the samples whose label is
    known (not NaN), summed over the labels, each weighted by ``model.label_weights`` when set
    (TorchXRayVision's loss); accuracy is each sample's fraction of known labels right at 0.5.

    Training mode when ``rng`` (the dropout key) is given, else inference. Returns
    ``(loss, (metrics, new_head_stats))``; metrics are sums over the real samples
    (``loss_sum`` = loss times count, ``correct``, ``count``).
    """
    train = rng is not None
    variables = {"params": head_params, **({"batch_stats": head_stats} if head_stats else {})}
    with nn.intercept_methods(_mask_batchnorm(mask)):
        logits, updates = model.head.apply(
            variables,
            features,
            train=train,
            rngs={"dropout": rng} if train else None,
            mutable=["batch_stats"] if train and head_stats else [],
        )
    count = jnp.sum(mask)
    if model.task == "multilabel":
        known = (~jnp.isnan(labels)) & (mask[:, None] > 0)
        targets = jnp.where(known, labels, 0.0)
        bce = jnp.where(known, optax.sigmoid_binary_cross_entropy(logits, targets), 0.0)
        per_label = jnp.sum(bce, axis=0) / jnp.maximum(jnp.sum(known, axis=0), 1)
        weights = 1.0 if model.label_weights is None else jnp.asarray(model.label_weights)
        data_loss = jnp.sum(weights * per_label)
        right = jnp.sum(known & ((logits > 0) == (targets > 0.5)), axis=1)
        correct = right / jnp.maximum(jnp.sum(known, axis=1), 1)
    else:
        if model.task == "binary":
            per_sample = optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(jnp.float32))
            correct = (logits[:, 0] > 0).astype(jnp.int32) == labels
        else:
            per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            correct = jnp.argmax(logits, axis=-1) == labels
        data_loss = jnp.sum(mask * per_sample) / jnp.maximum(count, 1.0)
    penalty = model.l2 * sum(  # the Dense layers: the head's only layers with a kernel
        jnp.sum(jnp.square(layer["kernel"])) for layer in head_params.values() if "kernel" in layer
    )
    loss = data_loss + penalty
    metrics = {"loss_sum": loss * count, "correct": jnp.sum(mask * correct), "count": count}
    return loss, (metrics, updates.get("batch_stats", head_stats))


def split_trainable(model: StepModel, params: Any) -> tuple[dict, dict]:
    """(trainable, frozen) leaves of ``params`` as flat ``{path: leaf}`` dicts."""
    flat = traverse_util.flatten_dict(dict(params))
    mask = traverse_util.flatten_dict(trainable_mask(params, model.arch, model.fine_tune))
    return {k: v for k, v in flat.items() if mask[k]}, {k: v for k, v in flat.items() if not mask[k]}


def _features(model: StepModel, params: Any, stats: Any, images: jax.Array) -> jax.Array:
    return image_features(model.backbone, {"params": params, "batch_stats": stats or {}}, images)


def _gather(x: jax.Array) -> jax.Array:
    return jax.lax.all_gather(x, AXIS, tiled=True)


def augment_step_images(config: AugmentConfig, images: jax.Array, rng: jax.Array) -> jax.Array:
    """This device's shard of a global batch augmented with parameters drawn from the step's key
    (``fold_in(rng, AUGMENT_STREAM)``, apart from dropout's), per image of the global batch: each
    device and each step draws its own, and D devices give the 1-device images (under pmap)."""
    return augment_images(images, jax.random.fold_in(rng, AUGMENT_STREAM), config,
                          shard=jax.lax.axis_index(AXIS), shards=jax.lax.psum(1, AXIS))


def train_step(
    model: StepModel, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on one device's shard (run under pmap with axis ``"batch"``); with
    ``model.augment`` its images are first rotated, shifted and zoomed (:func:`augment_step_images`)."""
    trainable, frozen = split_trainable(model, state.params)
    images = batch["image"] if model.augment is None else augment_step_images(model.augment, batch["image"], rng)

    def loss_fn(trainable):
        params = traverse_util.unflatten_dict({**frozen, **trainable})
        features = _features(model, params["backbone"], state.batch_stats["backbone"], images)
        if model.frozen_backbone:
            features = jax.lax.stop_gradient(features)
        return head_loss(model, params["head"], state.batch_stats["head"], _gather(features),
                         _gather(batch["label"]), _gather(batch["mask"]), rng)

    (_, (metrics, head_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.pmean(grads, AXIS)
    # a part with an optimizer takes gradients for all its leaves: zeros for its frozen ones
    zeros = {k: jnp.zeros_like(v) for k, v in frozen.items() if k[0] in state.tx}
    return state.apply_gradients(traverse_util.unflatten_dict({**zeros, **grads}), head_stats), metrics


def eval_step(model: StepModel, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss/accuracy sums of one global batch in inference mode (under pmap)."""
    features = _features(model, state.params["backbone"], state.batch_stats["backbone"], batch["image"])
    _, (metrics, _) = head_loss(model, state.params["head"], state.batch_stats["head"], _gather(features),
                                _gather(batch["label"]), _gather(batch["mask"]), None)
    return metrics


def head_train_step(
    model: StepModel, state: TrainState, features: jax.Array, labels: jax.Array, mask: jax.Array,
    rng: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The fast path's step: :func:`train_step` on cached backbone features of a global batch, for
    a head-only state (:meth:`TrainState.head_only`)."""
    (_, (metrics, head_stats)), head_grads = jax.value_and_grad(
        lambda p: head_loss(model, p, state.batch_stats["head"], features, labels, mask, rng), has_aux=True
    )(state.params["head"])
    return state.apply_gradients({"head": head_grads}, head_stats), metrics


def head_train_epoch(
    model: StepModel, state: TrainState, features: jax.Array, labels: jax.Array, index: jax.Array,
    mask: jax.Array, key: jax.Array,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The fast path's epoch as one compiled loop of :func:`head_train_step`.

    ``index`` and ``mask`` (S, B) pick step s's global batch from the cached ``features`` and
    ``labels``; its dropout key is ``fold_in(key, s)``, as in the full path. Returns the state
    and per-step metrics (S,).
    """

    def step(state: TrainState, xs: tuple) -> tuple[TrainState, dict[str, jax.Array]]:
        s, rows, m = xs
        return head_train_step(model, state, features[rows], labels[rows], m, jax.random.fold_in(key, s))

    return jax.lax.scan(step, state, (jnp.arange(index.shape[0]), index, mask))


def head_eval_epoch(
    model: StepModel, state: TrainState, features: jax.Array, labels: jax.Array, index: jax.Array,
    mask: jax.Array,
) -> dict[str, jax.Array]:
    """Inference-mode metrics of every batch (``index``, ``mask``: (S, B)) of cached features."""

    def step(carry: None, xs: tuple) -> tuple[None, dict[str, jax.Array]]:
        rows, m = xs
        head = (state.params["head"], state.batch_stats["head"])
        return carry, head_loss(model, *head, features[rows], labels[rows], m, None)[1][0]

    return jax.lax.scan(step, None, (index, mask))[1]


def make_train_step(model: StepModel, devices: Sequence[jax.Device]) -> Callable:
    """``step(state, batch, rng) -> (state, metrics)`` pmapped over ``devices``.

    The state is replicated (``in_axes=None``; put it there with :func:`replicate`) and
    donated; the batch has a leading device axis; metrics come back once.
    """
    return jax.pmap(
        lambda state, batch, rng: train_step(model, state, batch, rng),
        axis_name=AXIS, in_axes=(None, 0, None), out_axes=(None, None), devices=devices, donate_argnums=(0,),
    )


def make_eval_step(model: StepModel, devices: Sequence[jax.Device]) -> Callable:
    """``step(state, batch) -> metrics`` pmapped over ``devices``."""
    return jax.pmap(
        lambda state, batch: eval_step(model, state, batch),
        axis_name=AXIS, in_axes=(None, 0), out_axes=None, devices=devices,
    )


def make_feature_step(model: StepModel, devices: Sequence[jax.Device]) -> Callable:
    """``features(backbone_variables, images) -> (D, B/D, h, w, C)`` float32, pmapped."""
    return jax.pmap(
        lambda variables, images: _features(model, variables["params"], variables["batch_stats"], images),
        axis_name=AXIS, in_axes=(None, 0), devices=devices,
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
