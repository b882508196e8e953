"""Throughput benchmark of the real training step (``python -m xrayjax.bench``).

The measured step is :func:`xrayjax.steps.make_train_step` as training runs it: a uint8
batch preprocessed on device, the frozen backbone forward (no backward pass through it), the
head forward and backward, and the Adam update, pmapped over the local devices. Timing is
steady state: compile first, warm up, then the median of several timed windows, each ended
by ``block_until_ready``. Inputs rotate over a few random batches so no cache holds them.
One JSON line per configuration goes to stdout and is appended to ``experiments/bench.jsonl``.
With ``--reference FILE`` (``experiments/plain_flax_step.py``) the plain-Flax reference step
runs after each configuration in the same process, and the record holds the ratio.
``--input`` measures the input pipeline alone instead (:func:`bench_input`), ``kind: "input"``;
``--fed`` the step fed by it beside the step alone (:func:`bench_fed`), ``kind: "fed"``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from xrayjax.flags import ArgumentParser
from xrayjax.models import ARCHS
from xrayjax.optim import LEARNING_RATE
from xrayjax.steps import (
    batch_sharding,
    build_step_model,
    create_train_state,
    init_variables,
    make_train_step,
    replicate,
)
from xrayjax.tasks import TASK_ALIASES, TASKS, canonical_task

# The report's (arch, task) pairs: Task 1 and the three models of Task 2.
# (Older records in experiments/bench.jsonl give multiclass its report name, four_class.)
REPORT_MODELS = (("vgg16", "binary"), ("vgg16", "multiclass"), ("vgg19", "multiclass"),
                 ("resnet50", "multiclass"))
# Measured by default: the report's models and CheXNet's (DenseNet121, four classes).
DEFAULT_MODELS = (*REPORT_MODELS, ("densenet121", "multiclass"))
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "experiments" / "bench.jsonl"
# The reference step's name for each default model (../shared/reference; "chexnet" is ours).
_REFERENCE_TASK = dict(zip(DEFAULT_MODELS, ("task1", "arch1", "arch2", "arch3", "chexnet")))


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to measure: the grid of models x dtypes x global batch sizes, and how long."""

    models: tuple[tuple[str, str], ...] = DEFAULT_MODELS
    dtypes: tuple[str, ...] = ("fp32", "bf16")
    batches: tuple[int, ...] = (32, 256)
    image_size: int = 224
    warmup: int = 3
    steps: int = 10
    repeats: int = 5
    input_sets: int = 3
    stream_batches: int = 200  # timed batches of --input and --fed: many more than the readers' buffers hold
    seed: int = 0
    reference: str | None = None  # path of the plain-Flax reference step to time beside ours


def _device_batches(cfg: BenchConfig, classes: int, batch: int, devices: list) -> list[dict]:
    """``cfg.input_sets`` random uint8 global batches of labels below ``classes``, already on
    ``devices`` as pmap lays them."""
    rng = np.random.default_rng(cfg.seed)
    d, size = len(devices), cfg.image_size
    place = jax.pmap(lambda x: x, devices=devices)
    return [
        place({
            "image": rng.integers(0, 256, (d, batch // d, size, size, 3), np.uint8),
            "label": rng.integers(0, classes, (d, batch // d)).astype(np.int32),
            "mask": np.ones((d, batch // d), np.float32),
        })
        for _ in range(cfg.input_sets)
    ]


def _memory_gb(compiled: Any) -> float | None:
    """Peak device memory of the compiled step from XLA's memory analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    peak = getattr(analysis, "peak_memory_in_bytes", 0) or (
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
    )
    return round(peak / 2**30, 3)


def _local_devices(batch: int) -> list:
    """The local devices, which the global ``batch`` must split over evenly."""
    devices = jax.local_devices()
    if batch % len(devices):
        raise ValueError(f"batch {batch} is not divisible by the {len(devices)} local devices")
    return devices


def bench_one(cfg: BenchConfig, arch: str, task: str, dtype: str, batch: int) -> dict[str, Any]:
    """Measure one configuration; returns the JSON record."""
    devices = _local_devices(batch)
    model = build_step_model(arch, task, bf16=dtype == "bf16")
    variables = init_variables(model, cfg.image_size, init="random", seed=cfg.seed)
    state = replicate(create_train_state(model, variables, lr=LEARNING_RATE), devices)
    inputs = _device_batches(cfg, max(2, model.head.outputs), batch, devices)  # binary: 1 logit
    rng = jax.random.key(cfg.seed)

    step = make_train_step(model, devices)
    start = time.perf_counter()
    compiled = step.lower(state, inputs[0], rng).compile()
    compile_s = time.perf_counter() - start

    feed = itertools.cycle(inputs)
    for _ in range(cfg.warmup):
        state, metrics = compiled(state, next(feed), rng)
    jax.block_until_ready((state, metrics))
    windows = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        for _ in range(cfg.steps):
            state, metrics = compiled(state, next(feed), rng)
        jax.block_until_ready((state, metrics))
        windows.append(time.perf_counter() - start)
    loss = float(metrics["loss_sum"]) / float(metrics["count"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{arch} {task} {dtype} batch {batch}: the loss is {loss}")
    record = {
        "arch": arch,
        "task": task,
        "dtype": dtype,
        "batch": batch,
        "image_size": cfg.image_size,
        "images_per_s": round(batch * cfg.steps / statistics.median(windows), 1),
        "compile_s": round(compile_s, 2),
        "peak_mem_gb": _memory_gb(compiled),
        "device": f"{devices[0].device_kind} x{len(devices)}",
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if cfg.reference:
        record.update(_reference(cfg, arch, task, dtype, batch, record["images_per_s"]))
    return record


def _reference(cfg: BenchConfig, arch: str, task: str, dtype: str, batch: int, ours: float) -> dict[str, Any]:
    """The reference step's images/s for the same configuration, timed in this process."""
    spec = importlib.util.spec_from_file_location("plain_flax_step", cfg.reference)
    if spec is None or not Path(cfg.reference).is_file():
        raise ValueError(f"--reference {cfg.reference}: no such Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if (arch, task) not in _REFERENCE_TASK:
        raise ValueError(f"--reference: the reference step has no {arch}:{task} model; it has "
                         f"{', '.join(f'{a}:{t}' for a, t in _REFERENCE_TASK)}")
    with contextlib.redirect_stdout(sys.stderr):  # its own JSON line must not mix with ours
        theirs = module.run(_REFERENCE_TASK[(arch, task)], arch, batch, dtype == "bf16",
                            steps=cfg.steps * cfg.repeats, image_size=cfg.image_size)["img_s"]
    return {"reference_images_per_s": theirs, "vs_reference": round(ours / theirs, 3)}


def bench_input(cfg: BenchConfig, data_dir: str | None, tfds_dir: str | None, augment: bool,
                batch: int, workers: int) -> dict[str, Any]:
    """The input pipeline alone, as training feeds the devices (:func:`xrayjax.data.batches`): the
    prepared training split read in shuffled order by ``workers`` reader processes (0: a thread),
    batched, placed on the local devices and, with ``augment``, rotated, shifted and zoomed there
    by the train step's own function. Beside it, in the same run, the plain loops it must beat:
    one thread reading each batch's records and handing them to the devices, by our read (the
    image alone) and by TFDS' own (every feature decoded). Images/s is over
    at least ``cfg.stream_batches`` batches of one stream, after untimed epochs (worker start,
    compiles, the readers' buffers filling: :func:`_stream_plan`)."""
    import tensorflow_datasets as tfds

    from xrayjax.augment import AugmentConfig
    from xrayjax.data import DataConfig, batches, load_splits  # the data stack, for this mode only
    from xrayjax.data.loader import batch_rows
    from xrayjax.data.splits import resize_nearest
    from xrayjax.steps import AXIS, augment_step_images

    devices = _local_devices(batch)
    train = load_splits(DataConfig(data_dir=data_dir, tfds_dir=tfds_dir, image_size=cfg.image_size)).train
    place = jax.pmap((lambda x, key: augment_step_images(AugmentConfig(), x, key)) if augment else
                     (lambda x, key: x), axis_name=AXIS, in_axes=(0, None), devices=devices)
    key = jax.random.key(cfg.seed)
    steps, epochs, warm = _stream_plan(cfg, len(train), batch, workers)

    (records,) = train.images.records  # one prepared split: one ImageRecords over its files
    decoding = dataclasses.replace(records.raw, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_AND_DECODE)

    def tfds_read(rows: np.ndarray) -> np.ndarray:  # TFDS' own read: every feature of each record decoded
        images = [r["image"] for r in decoding.__getitems__(train.images.refs[rows, 1].tolist())]
        return resize_nearest(np.stack(images), cfg.image_size)

    def plain(read: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
        for epoch in epochs:
            for rows in batch_rows(len(train), batch, shuffle=True, seed=cfg.seed, epoch=epoch)[0]:
                yield read(rows).reshape(len(devices), batch // len(devices), *train.stored_shape[1:])

    def rate(stream: Iterator) -> float:
        return _rate(stream, lambda images: place(images, key), warm * steps, len(train) * (len(epochs) - warm))

    ours = rate(b["image"] for b in batches(train, batch, len(devices), shuffle=True, seed=cfg.seed,
                                            epochs=epochs, workers=workers, sharding=batch_sharding(devices)))
    baseline, tfds_loop = rate(plain(train.read)), rate(plain(tfds_read))
    return {"kind": "input", "images": len(train), "batch": batch, "image_size": cfg.image_size,
            "augment": augment, "workers": workers, "images_per_s": ours, "plain_loop_images_per_s": baseline,
            "vs_plain_loop": round(ours / baseline, 2), "tfds_loop_images_per_s": tfds_loop,
            "vs_tfds_loop": round(ours / tfds_loop, 2), "batches_timed": (len(epochs) - warm) * steps,
            "device": f"{devices[0].device_kind} x{len(devices)}", "jax": jax.__version__,
            "date": datetime.date.today().isoformat()}


def _stream_plan(cfg: BenchConfig, images: int, batch: int, workers: int) -> tuple[int, range, int]:
    """(batches an epoch, the epochs of the stream, how many of them are untimed) for a split of
    ``images``: the untimed epochs see every reader started and its buffers full (2 batches a
    worker, 2 on the host, 2 on the devices); the rest hold at least ``cfg.stream_batches``."""
    steps = -(-images // batch)
    warm = -(-(2 * workers + 4) // steps)
    return steps, range(warm + -(-cfg.stream_batches // steps)), warm


def _rate(stream: Iterator, consume: Callable[[Any], Any], untimed: int, images: int) -> float:
    """Images/s of ``consume`` over ``stream`` after its first ``untimed`` items, to the last
    result's ``block_until_ready``; ``images`` are those of the timed items."""
    i = -1
    for i, item in enumerate(stream):
        out = consume(item)
        if i == untimed - 1:
            jax.block_until_ready(out)
            began = time.perf_counter()
    if i < untimed:
        raise ValueError(f"the stream held {i + 1} batches, none after the {untimed} untimed")
    jax.block_until_ready(out)
    return round(images / (time.perf_counter() - began), 1)


def bench_fed(cfg: BenchConfig, data_dir: str | None, tfds_dir: str | None, arch: str, dtype: str, batch: int,
              workers: int, fine_tune: int, augment: bool) -> dict[str, Any]:
    """The real train step (``fine_tune`` blocks open, ``augment`` on the devices) fed by the input
    pipeline (:func:`xrayjax.data.batches`, ``workers`` readers) over the prepared training split,
    beside the same step on batches already on the devices: the share of the step's own
    throughput that training end to end keeps. Both over at least ``cfg.stream_batches`` steps, after
    untimed epochs (compiles, worker start: :func:`_stream_plan`)."""
    from xrayjax.augment import AugmentConfig
    from xrayjax.data import DataConfig, batches, load_splits  # the data stack, for this mode only

    devices = _local_devices(batch)
    splits = load_splits(DataConfig(data_dir=data_dir, tfds_dir=tfds_dir, image_size=cfg.image_size))
    train, classes = splits.train, len(splits.class_names)
    task = "binary" if classes == 2 else "multiclass"
    model = build_step_model(arch, task, bf16=dtype == "bf16", fine_tune=fine_tune, num_classes=classes,
                             augment=AugmentConfig() if augment else None)
    # numpy, on the host: each rate() below builds its own state from them, which its steps donate
    variables = init_variables(model, cfg.image_size, init="random", seed=cfg.seed)
    step, rng = make_train_step(model, devices), jax.random.key(cfg.seed)
    steps, epochs, warm = _stream_plan(cfg, len(train), batch, workers)
    timed = len(train) * (len(epochs) - warm)

    def rate(stream: Iterator) -> float:
        state = replicate(create_train_state(model, variables, lr=LEARNING_RATE), devices)

        def train_step(b: dict) -> Any:
            nonlocal state
            state, metrics = step(state, b, rng)
            return metrics
        return _rate(stream, train_step, warm * steps, timed)

    def stream() -> Iterator[dict]:
        return batches(train, batch, len(devices), shuffle=True, seed=cfg.seed, epochs=epochs, workers=workers,
                       sharding=batch_sharding(devices))

    with contextlib.closing(stream()) as first:  # the pipeline's own batches, on the devices
        placed = list(itertools.islice(first, cfg.input_sets))
    own = rate(placed[i % len(placed)] for i in range(len(epochs) * steps))
    fed = rate(stream())
    return {"kind": "fed", "arch": arch, "task": task, "dtype": dtype, "batch": batch, "image_size": cfg.image_size,
            "fine_tune": fine_tune, "augment": augment, "workers": workers, "images": len(train),
            "images_per_s": fed, "step_images_per_s": own, "vs_step": round(fed / own, 3),
            "batches_timed": (len(epochs) - warm) * steps, "device": f"{devices[0].device_kind} x{len(devices)}",
            "jax": jax.__version__, "date": datetime.date.today().isoformat()}


def _emit(record: dict[str, Any], out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(line + "\n")


def run(cfg: BenchConfig, out: Path | None = DEFAULT_OUT) -> list[dict[str, Any]]:
    """Every configuration of ``cfg``; each record printed and appended to ``out``."""
    records = []
    for (arch, task), dtype, batch in itertools.product(cfg.models, cfg.dtypes, cfg.batches):
        records.append(bench_one(cfg, arch, task, dtype, batch))
        _emit(records[-1], out)
    return records


def _model(text: str) -> tuple[str, str]:
    arch, _, task = text.partition(":")
    task = canonical_task(task or "multiclass")
    if arch not in ARCHS or task not in TASKS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ARCH[:TASK] with ARCH in {ARCHS} and TASK in {(*TASKS, *TASK_ALIASES)}"
        )
    return arch, task


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m xrayjax.bench",
        description="Images per second of the real training step (frozen backbone forward on "
        "uint8 input, head forward/backward, Adam update), steady state. One JSON line per "
        "configuration on stdout, appended to --out. Timings vary from run to run: compare "
        "figures from the same device and JAX version only.",
    )
    d = BenchConfig()
    p.add_argument("--models", nargs="+", type=_model, default=list(d.models), metavar="ARCH[:TASK]",
                   help="models to measure; TASK defaults to multiclass, four_class is read as it (default: the "
                   "report's four and CheXNet's: "
                   + " ".join(arch if task == "multiclass" else f"{arch}:{task}" for arch, task in d.models) + ")")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=list(d.dtypes),
                   help="backbone compute dtype; the head and loss are always float32 (default: both)")
    p.add_argument("--batches", nargs="+", type=int, default=list(d.batches),
                   help="global batch sizes (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="input side (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per timed window (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="timed windows; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON-lines file the records are appended to (default: %(default)s)")
    p.add_argument("--no-save", action="store_true", help="print only, append nothing")
    p.add_argument("--reference", metavar="FILE",
                   help="also time the plain-Flax reference step in FILE (experiments/plain_flax_step.py) "
                   "for each configuration, in this process, and record the ratio")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--input", action="store_true",
                      help="measure the input pipeline alone instead (read, decode, batch, transfer; "
                      "one record per --batches, kind \"input\"), over the prepared training split of --data-dir")
    p.add_argument("--data-dir", help="with --input or --fed: the dataset (default ../shared/covid_xray)")
    p.add_argument("--tfds-dir", help="with --input or --fed: where its prepared data lives (default: TFDS' own)")
    p.add_argument("--augment", action="store_true",
                   help="with --input or --fed: also augment each batch on the devices, as --augment trains")
    p.add_argument("--workers", nargs="+", type=int, default=[0], metavar="N",
                   help="with --input or --fed: reader processes to measure, one record each (0: a reader thread; "
                   "default: %(default)s)")
    mode.add_argument("--fed", action="store_true",
                      help="measure the train step fed by the input pipeline instead, beside the same step on "
                      "batches already on the devices (kind \"fed\", vs_step: the share kept end to end), over "
                      "the prepared training split of --data-dir; one record per --models arch, --dtypes, "
                      "--batches and --workers. Training feeds the step this way with --fine-tune, --augment or "
                      "--no-cache-features")
    p.add_argument("--stream-batches", type=int, default=d.stream_batches, metavar="N",
                   help="with --input or --fed: timed batches, many more than the readers' buffers hold "
                   "(default: %(default)s)")
    p.add_argument("--fine-tune", type=int, default=0, metavar="N",
                   help="with --fed: also train the last N backbone blocks (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.stream_batches < 1:
        parser.error(f"--stream-batches must be at least 1, got {args.stream_batches}")
    cfg = BenchConfig(
        models=tuple(args.models), dtypes=tuple(args.dtypes), batches=tuple(args.batches),
        image_size=args.image_size, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
        reference=args.reference, stream_batches=args.stream_batches,
    )
    out = None if args.no_save else args.out
    known: tuple[type[Exception], ...] = (ValueError, FloatingPointError, OSError)
    try:
        if args.input or args.fed:
            from xrayjax.data.source import DataError

            known += (DataError,)  # a bad or missing dataset: one line, as the other commands say it
        if args.input:
            for batch, workers in itertools.product(cfg.batches, args.workers):
                _emit(bench_input(cfg, args.data_dir, args.tfds_dir, args.augment, batch, workers), out)
        elif args.fed:
            archs = dict.fromkeys(arch for arch, _ in cfg.models)  # the task is the data's
            for arch, dtype, batch, workers in itertools.product(archs, cfg.dtypes, cfg.batches, args.workers):
                _emit(bench_fed(cfg, args.data_dir, args.tfds_dir, arch, dtype, batch, workers, args.fine_tune,
                                args.augment), out)
        else:
            run(cfg, out)
    except known as err:
        print(f"xrayjax.bench: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
