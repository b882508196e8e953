"""``python -m xrayjax.train``: train a run, evaluate its test split, print the result.

The flags are generated from :class:`xrayjax.config.TrainConfig` (``--help`` lists them with
their defaults). From Python use ``xrayjax.fit(TrainConfig(...))`` and
``xrayjax.evaluate.evaluate_run``; this module is only the command line.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from xrayjax import distributed, runfiles
from xrayjax.cli import one_line_warnings
from xrayjax.config import TrainConfig, from_args
from xrayjax.crossval import cross_validate, cv_summary
from xrayjax.data import DataError, dataset_classes
from xrayjax.distributed import runtime_error
from xrayjax.evaluate import evaluate_run, summary
from xrayjax.loop import TrainingDiverged, fit

DESCRIPTION = (
    "Train a chest X-ray classifier: a frozen ImageNet backbone and the report's head, data "
    "parallel over all local devices (or over several hosts: see the multi-host flags). Writes "
    "config.json, then history.json and checkpoint.msgpack after every epoch into --out; then "
    "evaluates the test split (metrics.json and figures) and prints the test accuracy."
)


def run(config: TrainConfig) -> dict | None:
    """Train, then (process 0, unless ``config.evaluate`` is off) evaluate; returns the metrics."""
    result = fit(config)
    metrics = None
    if config.evaluate and not len(result.splits.test) and distributed.is_main_process():
        print("no test split (no test/ folder, and --test-fraction held out no image): nothing to evaluate",
              file=sys.stderr)
    elif config.evaluate and distributed.is_main_process():
        with result.timings.phase("evaluate"):
            metrics = evaluate_run(result.run_dir, result.splits, quiet=config.quiet, features=result.features)
    cv = None
    if config.folds and distributed.is_main_process():
        with result.timings.phase("cross_validation"):
            cv = cross_validate(config, result)
    if metrics is not None or cv is not None:  # fit wrote the training phases; add these
        runfiles.write_json(result.run_dir / runfiles.TIMINGS_FILE, result.timings)
    if not config.quiet and distributed.is_main_process():
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()), file=sys.stderr)
    distributed.wait_for_all("xrayjax.train: process 0 has written the run")
    if distributed.is_main_process():
        last = result.history[-1] if result.history else {}
        validation = (f", val_accuracy {last['val_accuracy']:.3f}" if "val_accuracy" in last
                      else ", no validation split")
        print(f"done: {result.run_dir} ({len(result.history)} epochs{validation})")
        if metrics is not None:
            print(summary(metrics))
        if cv is not None:
            print(cv_summary(cv))
    return metrics


def _interrupted_hint(config: TrainConfig) -> str:
    try:
        out = Path(config.resolved(dataset_classes(config.data_config())).out)
        done = len(runfiles.read_history(out)) if (out / runfiles.CHECKPOINT_FILE).is_file() else 0
    except (ValueError, DataError):
        return ""
    if done >= config.epochs:
        return f": training had finished; evaluate it with python -m xrayjax.evaluate --run {out}"
    if done:
        return f": continue the run with the same flags and --resume (its checkpoint is in {out})"
    return ": no epoch finished, so nothing was kept"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: flags into a TrainConfig, :func:`run`; errors as one-line messages, never tracebacks.
    SIGTERM ends the run as Ctrl-C does (the last checkpoint is kept)."""
    config = from_args(argv, description=DESCRIPTION)
    signal.signal(signal.SIGTERM, _interrupt)
    one_line_warnings()
    try:
        run(config)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, DataError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{_interrupted_hint(config)}", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            print(f"error: the accelerator failed: {runtime_error(e)}", file=sys.stderr)
            return 1
        print(f"error: a collective with the other processes failed ({e}); another process has "
              "probably died (see its log). Restart every process with the same flags and --resume "
              "to continue from process 0's last checkpoint", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
