"""``python -m xrayjax.data``: prepare the TFDS dataset or audit the raw files."""

from __future__ import annotations

import argparse
import json
import sys
import time

from xrayjax.cli import quiet_interrupts, run_command

if __name__ == "__main__":
    quiet_interrupts()  # before the heavy imports (PIL, and TFDS in prepare): Ctrl-C while they load is one line

from xrayjax.data.decode import prepared_size  # noqa: E402
from xrayjax.data.dataset import DataConfig  # noqa: E402
from xrayjax.data.source import CHALLENGE_CLASSES, resolve_source  # noqa: E402
from xrayjax.flags import ArgumentParser, add_flags  # noqa: E402

_PREPARE_NOTES = {
    "image_size": "; prepare for the --image-size you will train at",
    "uncertain": ". Here it only reads the printed counts: the prepared data keeps -1, so one preparation "
                 "serves every --uncertain of train",
}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m xrayjax.data",
        description="Prepare an X-ray class-folder dataset for training, or audit it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare", help="decode, resize to 224x224 and write the TFDS dataset (array_record)",
        description="Decode every image on all cores, resize it to 224x224 (or a larger --image-size) and write "
                    "the TFDS dataset xray_folders (once per set of files: later calls reuse it; changing, "
                    "adding or removing an image prepares again), then print the number of images "
                    "per split and class. The challenge's layout prepares both of its tasks.",
    )
    add_flags(prep, DataConfig, ("data_dir", "tfds_dir", "skip_bad_images", "color", "image_size", "labels",
                                 "uncertain", "views", "skip_missing"), _PREPARE_NOTES)
    aud = sub.add_parser(
        "audit", help="counts, colour modes, sizes, junk, unreadable files, duplicates, leaks",
        description="Inspect every file: counts per split and class, colour modes and sizes per "
                    "class, junk and unreadable files, exact (sha256) and near (perceptual hash) "
                    "duplicates, and file-name groups (paper, patient) in both train and test. With "
                    "--labels: rows, images found, missing (reported, never a stop) and unreadable, rows left "
                    "out, patients, positives/negatives/uncertain/unknown per label, label pairs, patients in "
                    "more than one official split, duplicates, and shortcuts predicting the most frequent label.",
    )
    add_flags(aud, DataConfig, ("data_dir", "labels", "views"))
    aud.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _data_config(args: argparse.Namespace) -> DataConfig:
    """The data settings of the flags given (the others: DataConfig's defaults), checked."""
    return DataConfig(**{k: v for k, v in vars(args).items() if k in DataConfig.__dataclass_fields__})


def _prepare(args: argparse.Namespace) -> None:
    """Prepare the dataset (the challenge's: both tasks); print each prepared folder (which
    ``--data-dir`` also takes, to read it as it is) and its counts."""
    from xrayjax.data.builder import class_names, prepare, read_prepared  # imports tensorflow-datasets

    cfg = _data_config(args)
    if cfg.labels is not None:
        _prepare_labels(cfg)
        return
    with resolve_source(cfg.data_dir) as source:
        for task in CHALLENGE_CLASSES if source.is_challenge else (None,):  # multilabel needs --labels
            start = time.perf_counter()
            builder = prepare(source, source.listing(task), cfg.color, cfg.tfds_dir, cfg.skip_bad_images, task,
                              image_size=prepared_size(cfg.image_size))
            splits = read_prepared(builder)
            meta = builder.info.metadata
            print(f"\n{builder.builder_config.name}: {builder.data_dir} "
                  f"({time.perf_counter() - start:.1f} s, from {meta.get('source')})")
            names = class_names(builder)
            width = max(max(map(len, names)), 5)
            print("  split       " + "  ".join(f"{n:>{width}}" for n in names) + "  total")
            for split, data in splits.items():
                per = [int((data.labels == i).sum()) for i in range(len(names))]
                print(f"  {split:<10}  " + "  ".join(f"{c:>{width}}" for c in per) + f"  {sum(per):>5}")
            _print_skipped(meta)


def _print_skipped(meta: dict) -> None:
    """One line per kind of file the preparation skipped."""
    for key, title in (("junk", "junk files"), ("not_images", "not images"),
                       ("bad_images", "bad images"), ("ignored", "ignored folders")):
        if meta.get(key):
            print(f"  skipped {title} ({len(meta[key])}): {', '.join(meta[key])}")


def _prepare_labels(cfg: DataConfig) -> None:
    """Prepare a labels file's images; print the prepared folder, then per split its images and
    each label's positives, negatives and unknowns (-1 read as ``--uncertain`` says)."""
    import numpy as np

    from xrayjax.data.builder import class_names, prepare, read_prepared  # imports tensorflow-datasets
    from xrayjax.data.csv_labels import resolve_uncertain
    from xrayjax.data.dataset import open_dataset

    start = time.perf_counter()
    dataset = open_dataset(cfg)
    try:
        builder = prepare(dataset.source, dataset.listing, cfg.color, cfg.tfds_dir, cfg.skip_bad_images,
                          image_size=prepared_size(cfg.image_size))
    finally:
        dataset.close()
    meta = builder.info.metadata
    print(f"\n{builder.builder_config.name}: {builder.data_dir} "
          f"({time.perf_counter() - start:.1f} s, from {meta.get('source')})")
    names = class_names(builder)
    width = max(map(len, names))
    for split, data in read_prepared(builder).items():
        labels = resolve_uncertain(data.labels, cfg.uncertain)
        print(f"  {split}: {len(labels)} images")
        print(f"    {'label':<{width}}  positive  negative   unknown")
        for i, name in enumerate(names):
            column = labels[:, i]
            print(f"    {name:<{width}}  {int((column == 1).sum()):>8}  {int((column == 0).sum()):>8}  "
                  f"{int(np.isnan(column).sum()):>8}")
    _print_skipped(meta)


def _audit(args: argparse.Namespace) -> None:
    cfg = _data_config(args)
    if cfg.labels is not None:
        from xrayjax.data.audit_labels import audit_labels, format_labels_report
        from xrayjax.data.csv_labels import parse_views

        report = audit_labels(cfg.labels, cfg.data_dir, parse_views(cfg.views))
        print(json.dumps(report, indent=2) if args.json else format_labels_report(report))
        return
    from xrayjax.data.audit import audit, format_report

    report = audit(cfg.data_dir)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def main(argv: list[str] | None = None) -> int:
    """The command's exit status: 0, or 2 for bad input (one line on stderr)."""
    args = _parser().parse_args(argv)

    def body() -> int:
        (_prepare if args.command == "prepare" else _audit)(args)
        return 0

    return run_command(body, start_backend=False)


if __name__ == "__main__":
    sys.exit(main())
