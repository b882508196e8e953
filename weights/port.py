"""Port Keras' published ImageNet weights (include_top=False) to xrayjax's Flax msgpack files.

Run from the repository root: ``python weights/port.py --arch vgg19 [--h5 FILE] [--out DIR]``.
See ``--help`` for the whole story (download, md5, files written, offline use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xrayjax import porting  # noqa: E402
from xrayjax.flags import ArgumentParser  # noqa: E402
from xrayjax.tasks import TASKS, canonical_task  # noqa: E402
from xrayjax.atomic import write_atomic  # noqa: E402

ARCHS = tuple(porting.PUBLISHED)
_CHUNK = 1 << 20

DESCRIPTION = """\
Convert Keras' ImageNet weights for a backbone (include_top=False) into the Flax variables
that xrayjax loads: <out>/<arch>_imagenet_notop.msgpack (flax.serialization msgpack, no
pickle) and a JSON sidecar <out>/<arch>_imagenet_notop.json (source file name, md5 of the
source, whether it is the published file, parameter count, sha256 of the msgpack).

Where the Keras file comes from, in this order:
  1. --h5 FILE: any legacy Keras HDF5 weights file of this arch (e.g. downloaded elsewhere).
  2. <out>/<published file name>, if it is there (put a file downloaded elsewhere there).
  3. a download from Keras' URL (or --url), checked against the published md5 and kept as
     <out>/<published file name>.
A local file whose md5 differs from the published one (e.g. a fine-tuned file) is still
converted, with a warning, and the sidecar records it; a download with the wrong md5 stops.

Published files (Keras applications):
""" + "".join(
    f"  {arch:11s} {p.file_name}\n              {p.url}\n              md5 {p.md5}\n"
    for arch, p in porting.PUBLISHED.items()
) + """
The file is read by layer name and weight order (root attribute 'layer_names', each layer's
'weight_names'), whatever its dataset names, and merged strictly: every backbone parameter and
BatchNorm statistic must be filled exactly once with the right shape. Otherwise the error
lists every missing, unexpected and mismatched key with the likely cause (wrong --arch, an
include_top=True file instead of the *_notop.h5 one, a truncated file), and nothing is
written. Outputs are written atomically (temporary file, then rename).

Without these files, training needs `--init random` (a model trained from scratch)."""


class PortError(Exception):
    """A failure the user can fix; reported as one message, without a traceback."""


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def download(url: str, target: Path, md5: str) -> None:
    """Download ``url`` to ``target`` with a progress bar; keep it only if its md5 is ``md5``."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, part.open("wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        raise PortError(
            f"could not download {url} ({e}). These machines may have no internet: download "
            f"{target.name} (md5 {md5}) elsewhere, then put it at {target} or pass "
            "--h5 FILE."
        ) from e
    if digest.hexdigest() != md5:
        part.unlink()
        raise PortError(
            f"the download of {url} has md5 {digest.hexdigest()}, not the published {md5} of "
            f"{target.name}: it is corrupt or the URL serves another file. Download it again, "
            "or pass a file you trust with --h5 FILE."
        )
    os.replace(part, target)


def source_file(arch: str, h5: Path | None, out: Path, url: str | None) -> Path:
    """The Keras file to convert: --h5, the published file in ``out``, or a download."""
    published = porting.PUBLISHED[arch]
    if h5 is not None:
        if not h5.is_file():
            raise PortError(f"--h5 {h5} does not exist.")
        return h5
    local = out / published.file_name
    if not local.is_file():
        print(f"downloading {url or published.url}", file=sys.stderr)
        download(url or published.url, local, published.md5)
    return local


def port(
    arch: str,
    h5: Path | None = None,
    out: Path = porting.DEFAULT_WEIGHTS_DIR,
    url: str | None = None,
) -> Path:
    """Convert and write ``<out>/<arch>_imagenet_notop.{msgpack,json}``; return the msgpack path."""
    source = source_file(arch, h5, out, url)
    source_md5 = file_digest(source, "md5")
    published = porting.PUBLISHED[arch]
    if source_md5 != published.md5:
        print(
            f"warning: {source} has md5 {source_md5}, not the published {published.md5} of "
            f"{published.file_name}; converting it anyway (the sidecar records this).",
            file=sys.stderr,
        )
    variables = porting.port_keras_weights(arch, source)
    target = porting.pretrained_path(arch, out)
    sidecar = target.with_suffix(".json")
    out.mkdir(parents=True, exist_ok=True)
    porting.save_variables(variables, target)
    try:
        info = {
            "arch": arch,
            "source": source.name,
            "source_md5": source_md5,
            "published_file": published.file_name,
            "published_md5": published.md5,
            "is_published_file": source_md5 == published.md5,
            "parameters": int(sum(leaf.size for leaf in jax.tree.leaves(variables))),
            "output": target.name,
            "output_sha256": file_digest(target, "sha256"),
        }
        write_atomic(sidecar, (json.dumps(info, indent=2) + "\n").encode())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 error)."""
    parser = ArgumentParser(
        prog="python weights/port.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", choices=ARCHS, help="backbone to port")
    parser.add_argument(
        "--keras-model", type=Path, metavar="FILE",
        help="import a whole Keras classifier (.keras, or a full-model .h5 from model.save; with --arch and "
        "--task, a weights-only file from model.save_weights) into the run folder --out, for xrayjax.predict "
        "and xrayjax.evaluate",
    )
    parser.add_argument("--class-names", help="with --keras-model: the output names, comma-separated "
                        "(default: class_0, class_1, ...)")
    parser.add_argument("--task", type=canonical_task, choices=TASKS,
                        help="with --keras-model and --arch: a weights-only file (legacy .h5 or .weights.h5) "
                        "of the report's model for this task (its head)")
    parser.add_argument("--labels", metavar="CSV", help="with --keras-model of a multilabel model: its labels "
                        "file (labels: the --class-names), recorded in the run, so that xrayjax.evaluate "
                        "--data-dir scores the model on it")
    parser.add_argument("--image-size", type=int, help="with --keras-model: the input size in pixels "
                        "(default: the model's own, else 224)")
    parser.add_argument("--preprocess", choices=("caffe", "torch", "rescale", "none"),
                        help="with --keras-model: the input the model expects (rescale: x/255; default: "
                        "the backbone's own)")
    parser.add_argument(
        "--h5", type=Path, help="local Keras HDF5 weights file (skips the download)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=porting.DEFAULT_WEIGHTS_DIR,
        help="folder for the outputs (default: the repo's weights/, where training looks)",
    )
    parser.add_argument(
        "--url", help="download from this URL (a mirror) instead of Keras'; md5 still checked"
    )
    args = parser.parse_args(argv)
    if args.keras_model is not None:
        return _import_model(args, parser)
    if args.arch is None:
        parser.error("pass --arch (ImageNet weights of a backbone) or --keras-model FILE (a whole model)")
    try:
        target = port(args.arch, args.h5, args.out, args.url)
    except (PortError, porting.WeightFileError, porting.WeightMismatchError, OSError) as e:
        print(f"error: {e}\nNo {args.arch} weights were written.", file=sys.stderr)
        return 1
    print(f"wrote {target} and {target.with_suffix('.json')}")
    return 0


def _import_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """--keras-model: write the run folder --out, or one error line (nothing written)."""
    from xrayjax.keras_import import KerasImportError
    from xrayjax.keras_run import import_keras_run

    if args.out == porting.DEFAULT_WEIGHTS_DIR:
        parser.error("--keras-model needs --out RUN_DIR, the run folder to write")
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    try:
        run = import_keras_run(args.keras_model, args.out, names, args.preprocess, args.arch, args.task,
                               args.image_size, args.labels)
    except (KerasImportError, ValueError, OSError) as e:
        print(f"error: {e}\nNo run folder was written.", file=sys.stderr)
        return 1
    print(f"wrote the run folder {run} (python -m xrayjax.predict --run {run} IMAGE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
