"""``python -m xrayjax.train``: train a run, evaluate its test split, print the result.

The flags are generated from :class:`xrayjax.config.TrainConfig` (``--help`` lists them with
their defaults). From Python use ``xrayjax.fit(TrainConfig(...))`` and
``xrayjax.evaluate.evaluate_run``; this module is only the command line.
"""

from __future__ import annotations

from xrayjax.cli import EXIT_FAILED, quiet_interrupts, run_command

if __name__ == "__main__":
    quiet_interrupts()  # the imports below take seconds

import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from xrayjax import distributed, runfiles  # noqa: E402
from xrayjax.config import RunSpec, TrainConfig, from_args  # noqa: E402
from xrayjax.crossval import cross_validate, cv_summary  # noqa: E402
from xrayjax.evaluate import evaluate_run, summary  # noqa: E402
from xrayjax.loop import fit, resolve_training  # noqa: E402
from xrayjax.trainer import TrainingDiverged  # noqa: E402

DESCRIPTION = (
    "Train a chest X-ray classifier: a frozen ImageNet backbone and the report's head, data "
    "parallel over all local devices (or over several hosts: see the multi-host flags). Writes "
    "config.json and splits.json, then history.json and checkpoint.msgpack after every epoch into "
    "--out; then evaluates the test split (metrics.json and figures) and prints the test accuracy."
)


def run(spec: RunSpec) -> dict | None:
    """Train, then (process 0, unless ``config.evaluate`` is off) evaluate and cross-validate;
    record the phases in ``timings.json``; returns the metrics."""
    config = spec.config
    result = fit(spec)
    metrics = cv = None
    main = distributed.is_main_process()
    if config.evaluate and not len(result.splits.test) and main:
        given = "an official test split" if config.labels else "a test/ folder"
        print(f"no test split (no {given}, and --test-fraction held out no image): nothing to evaluate",
              file=sys.stderr)
    elif config.evaluate and main:
        with result.timings.phase("evaluate"):
            metrics = evaluate_run(result.run_dir, result.splits, quiet=config.quiet, features=result.features,
                                   score_train=config.eval_train)
    if config.folds and main:
        with result.timings.phase("cross_validation"):
            cv = cross_validate(result)
    if main:
        runfiles.append_timings(result.run_dir, result.timings, result.first_epoch)
        if not config.quiet:
            print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()), file=sys.stderr)
    distributed.wait_for_all("xrayjax.train: process 0 has written the run")
    if main:
        last = result.history[-1] if result.history else {}
        validation = (f", val_accuracy {last['val_accuracy']:.3f}" if "val_accuracy" in last
                      else ", no validation split")
        epochs = len(result.history)
        print(f"done: {result.run_dir} ({epochs} epoch{'s' if epochs != 1 else ''}{validation})")
        if metrics is not None:
            print(summary(metrics))
        if cv is not None:
            print(cv_summary(cv))
    return metrics


def _interrupted_hint(config: TrainConfig) -> str:
    """What an interrupted run left, for the resolved ``config`` of the run."""
    out = Path(config.out)
    if not (out / runfiles.CHECKPOINT_FILE).is_file():
        return ": no epoch finished, so nothing was kept"
    try:
        done = len(runfiles.read_history(out))
    except (OSError, ValueError):
        return ""
    if done >= config.epochs:
        return f": training had finished; evaluate it with python -m xrayjax.evaluate --run {out}"
    return f": continue the run with --resume --out {out} (it takes the run's settings)"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: flags into a TrainConfig, resolved once into a RunSpec, then :func:`run`; errors as
    one-line messages, never tracebacks. SIGTERM ends the run as Ctrl-C does (the last
    checkpoint is kept)."""
    config, given = from_args(argv, description=DESCRIPTION)
    spec: RunSpec | None = None

    def body() -> int:
        nonlocal spec
        spec = resolve_training(config, given=given)
        try:
            run(spec)
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        return 0

    return run_command(body, start_backend=False, known=(distributed.DistributedError,),
                       interrupted=lambda: "" if spec is None else _interrupted_hint(spec.config))


if __name__ == "__main__":
    raise SystemExit(main())
