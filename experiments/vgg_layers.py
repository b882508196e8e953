"""Per-layer time and achieved TFLOP/s of the frozen VGG backbones, and one candidate.

Each conv layer of VGG16/VGG19 (3x3 conv + bias + ReLU, then the block's 2x2 max pool after
its last conv) is jitted alone on an input of its own shape and timed steady state (median of
windows closed by ``block_until_ready``); FLOPs are ``2 * N * H * W * 9 * Cin * Cout``. Then
the whole backbone forward as training runs it (``xrayjax.models.frozen_features``), and the
same forward with block1_conv1's 3 input channels zero-padded to 8 and 16 (the same function:
the padded kernel rows are zero) to see whether that conv reaches the tensor cores.

    python experiments/vgg_layers.py [--arch vgg16] [--batch 256] [--dtype bf16] [--smoke]

Prints one JSON line per row (also appended to --out) and a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xrayjax.models import create_backbone, frozen_features, keras_init
from xrayjax.models.backbones import VGG_DEPTHS, VGG_WIDTHS

REPO = Path(__file__).resolve().parents[1]


def _time(fn, *args, steps: int, repeats: int) -> float:
    """Median seconds per call of the compiled ``fn`` over ``repeats`` windows of ``steps`` calls."""
    out = fn(*args)
    jax.block_until_ready(out)
    windows = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        windows.append((time.perf_counter() - start) / steps)
    return statistics.median(windows)


def _conv_layer(x, kernel, bias, pool: bool):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(y + bias)
    if pool:
        y = jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return y


def layer_rows(arch: str, batch: int, size: int, dtype, steps: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows, h, cin = [], size, 3
    layer = jax.jit(_conv_layer, static_argnums=3)
    for block, (depth, width) in enumerate(zip(VGG_DEPTHS[arch], VGG_WIDTHS), start=1):
        for i in range(1, depth + 1):
            x = jnp.asarray(rng.normal(size=(batch, h, h, cin)), dtype)
            kernel = jnp.asarray(rng.normal(size=(3, 3, cin, width)) * 0.05, dtype)
            bias = jnp.zeros((width,), dtype)
            seconds = _time(layer, x, kernel, bias, i == depth, steps=steps, repeats=repeats)
            flops = 2 * batch * h * h * 9 * cin * width
            rows.append({"layer": f"block{block}_conv{i}" + ("+pool" if i == depth else ""),
                         "input": [h, h, cin], "ms": round(seconds * 1e3, 3), "gflop": round(flops / 1e9, 1),
                         "tflops": round(flops / seconds / 1e12, 1)})
            cin = width
        h //= 2
    return rows


def forward_rows(arch: str, batch: int, size: int, dtype, steps: int, repeats: int) -> list[dict]:
    """The whole frozen backbone, and with block1_conv1's input zero-padded to 8 and 16 channels."""
    backbone = create_backbone(arch, dtype=dtype)
    variables = jax.device_put(keras_init(backbone, (1, size, size, 3)))  # untimed: nothing to compile
    x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, size, size, 3)), jnp.float32)
    forward = jax.jit(lambda v, x: frozen_features(backbone, v, x))
    reference = forward(variables, x)
    rows = []
    for channels in (3, 8, 16):
        params = dict(variables["params"])
        kernel = params["block1_conv1"]["kernel"]
        params["block1_conv1"] = {**params["block1_conv1"],
                                  "kernel": jnp.pad(kernel, ((0, 0), (0, 0), (0, channels - 3), (0, 0)))}
        padded = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, channels - 3)))
        out = forward({"params": params}, padded)
        seconds = _time(forward, {"params": params}, padded, steps=steps, repeats=repeats)
        rows.append({"layer": f"forward, block1_conv1 input {channels} channels", "ms": round(seconds * 1e3, 3),
                     "images_per_s": round(batch / seconds, 1),
                     "max_abs_diff_vs_3": float(jnp.max(jnp.abs(out - reference)))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(VGG_DEPTHS), default="vgg16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script on the CPU")
    p.add_argument("--out", type=Path, default=REPO / "experiments" / "vgg_layers.jsonl")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.image_size, args.steps, args.repeats = 2, 32, 1, 1
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    device = jax.devices()[0].device_kind
    meta = {"arch": args.arch, "batch": args.batch, "image_size": args.image_size, "dtype": args.dtype,
            "device": device, "jax": jax.__version__, "date": datetime.date.today().isoformat()}
    rows = layer_rows(args.arch, args.batch, args.image_size, dtype, args.steps, args.repeats)
    rows += forward_rows(args.arch, args.batch, args.image_size, dtype, args.steps, args.repeats)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps({**meta, **row}) + "\n")
    print(f"{args.arch} {args.dtype} batch {args.batch} on {device}, jax {jax.__version__}")
    print(f"{'layer':<48}{'ms':>9}{'GFLOP':>9}{'TFLOP/s':>9}")
    for row in rows:
        extra = f"{row['images_per_s']:>9} img/s" if "images_per_s" in row else f"{row['gflop']:>9}{row['tflops']:>9}"
        print(f"{row['layer']:<48}{row['ms']:>9}{extra}")
    conv_ms = sum(r["ms"] for r in rows if "tflops" in r)
    print(f"sum of the conv layers: {conv_ms:.2f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
