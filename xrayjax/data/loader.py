"""Global batches for pmap, read by grain: what training, evaluation and the feature pass consume.

The steps of one or more epochs are a grain ``MapDataset``; a step reads the rows
:func:`batch_rows` gives it, and only those of this process's devices. Several epochs in one
stream keep one set of workers for a whole run. ``workers`` > 0 reads the steps in that many
worker processes (grain's ``mp_prefetch``: each worker a slice of the steps, their order kept);
0 reads them in a thread of this process, ahead of the consumer. Either way the batches are
then placed on the devices ahead of their step (grain's ``device_put``), and gray images travel
with their one channel (the step broadcasts them). ``start`` skips the steps an interrupted
epoch already trained: the position a mid-epoch checkpoint records.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from xrayjax.data.splits import Split

DEVICE_BUFFER = 2  # batches placed on the devices ahead of the step that takes them


def batch_rows(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every global batch of an epoch over ``n`` images as rows and a padding mask, both (S, B):
    a seeded permutation from (seed, epoch) when ``shuffle``, the last batch padded with row 0."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    steps = -(-n // batch_size)
    rows = np.zeros(steps * batch_size, np.int64)
    rows[:n] = order
    mask = np.zeros(steps * batch_size, np.float32)
    mask[:n] = 1.0
    return rows.reshape(steps, batch_size), mask.reshape(steps, batch_size)


class StepBatches(Sequence):
    """Batches by step of the ``epochs`` in turn (a grain source, picklable for its workers):
    {"image", "label", "mask"} shaped (len(shards), B/D, ...), images as stored
    (:meth:`Split.read`). An epoch's order is drawn when its first step is read, so the source
    stays small however many epochs it spans."""

    def __init__(self, split: Split, batch_size: int, num_devices: int, shards: Sequence[int], *, shuffle: bool,
                 seed: int = 0, epochs: Sequence[int] = (0,)):
        self.split, self.batch_size, self.num_devices, self.shards = split, batch_size, num_devices, list(shards)
        self.shuffle, self.seed, self.epochs = shuffle, seed, list(epochs)
        self.per_epoch = -(-len(split) // batch_size)
        self._order: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None  # the last epoch drawn

    def __len__(self) -> int:
        return self.per_epoch * len(self.epochs)

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        epoch, at = self.epochs[step // self.per_epoch], step % self.per_epoch
        order = self._order  # read once: another reader thread may replace it
        if order is None or order[0] != epoch:
            order = self._order = epoch, batch_rows(len(self.split), self.batch_size, shuffle=self.shuffle,
                                                    seed=self.seed, epoch=epoch)
        per_device = self.batch_size // self.num_devices
        rows, mask = (a[at].reshape(self.num_devices, per_device)[self.shards] for a in order[1])
        rows, real = rows.reshape(-1), mask.reshape(-1) > 0
        labels = self.split.labels
        image = np.zeros((len(rows), *self.split.stored_shape[1:]), np.uint8)
        label = np.zeros((len(rows), *labels.shape[1:]), labels.dtype)
        if real.any():
            image[real], label[real] = self.split.read(rows[real]), labels[rows[real]]
        return {"image": image.reshape(len(self.shards), per_device, *image.shape[1:]),
                "label": label.reshape(len(self.shards), per_device, *labels.shape[1:]), "mask": mask}


def _ignore_ctrl_c(worker: int, workers: int) -> None:
    """A reader process leaves Ctrl-C (sent to the terminal's whole process group) to the
    training process, which stops it; SIGTERM still ends it quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def batches(split: Split, batch_size: int, num_devices: int, *, shuffle: bool, seed: int = 0,
            epochs: Sequence[int] = (0,), shards: Sequence[int] | None = None, workers: int = 0, start: int = 0,
            sharding: Any = None) -> Iterator[dict[str, Any]]:
    """Global batches {"image", "label", "mask"} shaped (D, B/D, ...), the epochs ``epochs`` one
    after another, each in :func:`batch_rows`' order, from the stream's step ``start``
    (multilabel labels (D, B/D, L)); an epoch's last batch padded with zeros, mask 0.
    ``shards``: only those device rows of each batch, the only images read (a process's share of
    the devices). ``workers``: reader processes (0: a thread). ``sharding``: where the batches
    are placed ahead of their step (:func:`xrayjax.steps.batch_sharding`; None: numpy batches).

    Raises ValueError at once for a batch size the devices cannot split.
    """
    if batch_size < 1 or num_devices < 1 or batch_size % num_devices:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of num_devices ({num_devices})"
        )
    steps = StepBatches(split, batch_size, num_devices, range(num_devices) if shards is None else shards,
                        shuffle=shuffle, seed=seed, epochs=epochs)
    return _stream(steps, workers, start, sharding)


def _stream(steps: StepBatches, workers: int, start: int, sharding: Any) -> Iterator[dict[str, Any]]:
    import grain

    dataset = grain.MapDataset.source(steps)[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=0 if workers else 1, prefetch_buffer_size=2))
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag in its workers (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
                                      worker_init_fn=_ignore_ctrl_c)
    if sharding is not None:
        from grain.experimental import device_put

        dataset = device_put(dataset, sharding, cpu_buffer_size=2, device_buffer_size=DEVICE_BUFFER)
    iterator = iter(dataset)
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
