"""``python -m xrayjax.data``: prepare the TFDS dataset or audit the raw files."""

from __future__ import annotations

import argparse
import json
import sys
import time

from xrayjax.cli import quiet_interrupts, run_command

quiet_interrupts()  # before the heavy imports (PIL, and TFDS in prepare): Ctrl-C while they load is one line

from xrayjax.data.csv_labels import UNCERTAIN  # noqa: E402
from xrayjax.data.decode import COLORS, IMAGE_SIZE, MAX_IMAGE_SIZE, SIZE_COSTS, prepared_size  # noqa: E402
from xrayjax.data.source import CHALLENGE_CLASSES, DataError, resolve_source  # noqa: E402

DATA_DIR_HELP = (
    "the dataset: a folder (or zip) of split folders <split>/<class>/<images> (train/ required, "
    "val/ and test/ optional) or of class folders <class>/<images>; or the challenge's layout "
    "(all/ and two/, Covid_Data_GradientCrescent/ or its zip) (default: ../shared/covid_xray next "
    "to the repository); with --labels, the folder the images sit under (default: the CSV's folder)"
)
LABELS_HELP = ("a labels CSV in place of class folders: ChestX-ray14's Data_Entry_2017.csv, CheXpert's train.csv, "
               "the COVID-19 image data collection's metadata.csv, or a generic CSV (path, then a labels column "
               "joined by | or one 0/1/blank column per label; optional patient)")
VIEWS_HELP = ("with --labels, keep only these views (comma-separated, e.g. PA,AP; CheXpert's lateral view is L); "
              "the rows left out are counted")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xrayjax.data",
        description="Prepare an X-ray class-folder dataset for training, or audit it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare", help="decode, resize to 224x224 and write the TFDS dataset (array_record)",
        description="Decode every image on all cores, resize it to 224x224 (or --image-size) and write the TFDS "
                    "dataset xray_folders (once per set of files: later calls reuse it; changing, "
                    "adding or removing an image prepares again), then print the number of images "
                    "per split and class. The challenge's layout prepares both of its tasks.",
    )
    prep.add_argument("--data-dir", help=DATA_DIR_HELP)
    prep.add_argument("--tfds-dir", help="where prepared data goes (default: TFDS' data dir, "
                                         "~/tensorflow_datasets or $TFDS_DATA_DIR)")
    prep.add_argument("--skip-bad-images", action="store_true",
                      help="leave corrupt or truncated images out with a warning instead of "
                           "stopping with an error naming the file")
    prep.add_argument("--color", choices=COLORS, default="gray",
                      help="gray (default): every image to grayscale, replicated to 3 channels, "
                           "so colour mode cannot reveal the class; keep: RGB like the original "
                           "Keras pipeline")
    prep.add_argument("--image-size", type=int, default=IMAGE_SIZE, metavar="PX",
                      help=f"the size to prepare for: the training --image-size, up to {MAX_IMAGE_SIZE}. {SIZE_COSTS}")
    prep.add_argument("--labels", metavar="CSV", help=LABELS_HELP)
    prep.add_argument("--uncertain", choices=UNCERTAIN, default="ignore",
                      help="with --labels, what CheXpert's -1 (uncertain) means in the printed counts: ignore "
                           "(unknown), zeros or ones; the prepared data keeps -1, so one preparation serves every "
                           "--uncertain of train")
    prep.add_argument("--views", metavar="LIST", help=VIEWS_HELP)
    prep.add_argument("--skip-missing", action="store_true",
                      help="with --labels, leave out the rows whose image is missing (a partial download) "
                           "instead of stopping")
    aud = sub.add_parser(
        "audit", help="counts, colour modes, sizes, junk, unreadable files, duplicates, leaks",
        description="Inspect every file: counts per split and class, colour modes and sizes per "
                    "class, junk and unreadable files, exact (sha256) and near (perceptual hash) "
                    "duplicates, and file-name groups (paper, patient) in both train and test. With "
                    "--labels: rows, images found, missing (reported, never a stop) and unreadable, rows left "
                    "out, patients, positives/negatives/uncertain/unknown per label, label pairs, patients in "
                    "more than one official split, duplicates, and shortcuts predicting the most frequent label.",
    )
    aud.add_argument("--data-dir", help=DATA_DIR_HELP)
    aud.add_argument("--labels", metavar="CSV", help=LABELS_HELP)
    aud.add_argument("--views", metavar="LIST", help=VIEWS_HELP)
    aud.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _prepare(args: argparse.Namespace) -> None:
    """Prepare the dataset (the challenge's: both tasks); print each prepared folder (which
    ``--data-dir`` also takes, to read it as it is) and its counts."""
    from xrayjax.data.builder import class_names, prepare, read_prepared  # imports tensorflow-datasets
    from xrayjax.data.pipeline import DataConfig

    DataConfig(color=args.color, image_size=args.image_size)  # the settings' checks, in their one place
    if args.labels is not None or args.views is not None:
        _prepare_labels(args)
        return
    with resolve_source(args.data_dir) as source:
        for task in CHALLENGE_CLASSES if source.is_challenge else (None,):  # multilabel needs --labels
            start = time.perf_counter()
            builder = prepare(source, source.listing(task), args.color, args.tfds_dir, args.skip_bad_images, task,
                              image_size=prepared_size(args.image_size))
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
            print(f"  skipped {len(meta[key])} {title}: {', '.join(meta[key])}")


def _prepare_labels(args: argparse.Namespace) -> None:
    """Prepare a labels file's images; print the prepared folder, then per split its images and
    each label's positives, negatives and unknowns (-1 read as ``--uncertain`` says)."""
    import numpy as np

    from xrayjax.data.builder import class_names, prepare, read_prepared  # imports tensorflow-datasets
    from xrayjax.data.csv_labels import resolve_uncertain
    from xrayjax.data.pipeline import DataConfig, open_dataset

    cfg = DataConfig(data_dir=args.data_dir, tfds_dir=args.tfds_dir, color=args.color,
                     skip_bad_images=args.skip_bad_images, labels=args.labels, uncertain=args.uncertain,
                     views=args.views, skip_missing=args.skip_missing)
    start = time.perf_counter()
    dataset = open_dataset(cfg)
    try:
        builder = prepare(dataset.source, dataset.listing, cfg.color, cfg.tfds_dir, cfg.skip_bad_images,
                          image_size=prepared_size(args.image_size))
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
    if args.labels is not None:
        from xrayjax.data.audit_labels import audit_labels, format_labels_report
        from xrayjax.data.csv_labels import parse_views

        report = audit_labels(args.labels, args.data_dir, parse_views(args.views))
        print(json.dumps(report, indent=2) if args.json else format_labels_report(report))
        return
    if args.views is not None:
        raise DataError("--views applies to a labels file: pass --labels, or leave --views out")
    from xrayjax.data.audit import audit, format_report

    report = audit(args.data_dir)
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
