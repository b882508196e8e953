"""``python -m xrayjax.models ARCH TASK``: a Keras-style summary of a model."""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xrayjax.flags import ArgumentParser, positive_int
from xrayjax.models import ARCHS, TASKS, count_params, create_model, num_params
from xrayjax.tasks import canonical_task


# Keras class of each layer method and of each Flax layer class whose name differs.
_KERAS_CLASS = {
    "zero_padding": "ZeroPadding2D",
    "max_pooling": "MaxPooling2D",
    "average_pooling": "AveragePooling2D",
    "concatenate": "Concatenate",
    "relu": "Activation",
    "add": "Add",
    "flatten": "Flatten",
    "global_average_pooling": "GlobalAveragePooling2D",
    "Conv": "Conv2D",
    "BatchNorm": "BatchNormalization",
    "VGG": "Functional",
    "ResNet": "Functional",
    "DenseNet": "Functional",
}


def _layer_rows(model: nn.Module, image_size: int) -> tuple[list[tuple[tuple[str, ...], str, tuple]], dict]:
    """Trace ``model.init`` shape-only, recording (path, class, output shape) of every layer."""
    rows = []

    def record(next_fun, args, kwargs, context):
        method, module = context.method_name, context.module
        if method in _KERAS_CLASS:  # a parameter-free layer method
            out = next_fun(*args, **kwargs)
            rows.append((module.path + (kwargs["name"],), _KERAS_CLASS[method], out.shape))
            return out
        if method != "__call__" or not module.path:
            return next_fun(*args, **kwargs)
        row = len(rows)  # a container's row goes before its layers' rows
        rows.append(None)
        out = next_fun(*args, **kwargs)
        cls = type(module).__name__
        rows[row] = (module.path, _KERAS_CLASS.get(cls, cls), out.shape)
        return out

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), x
        )
    return rows, variables


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            return {}
        tree = tree[key]
    return tree


def summary(arch: str, task: str, expand: bool = False, image_size: int = 224,
            num_classes: int | None = None) -> str:
    """Keras-style summary of ``create_model(arch, task, num_classes=num_classes)``: layer (type),
    output shape, parameter count, then total / trainable / non-trainable. ``expand`` lists the
    backbone's own layers under its row (Keras' ``expand_nested``)."""
    rows, variables = _layer_rows(create_model(arch, task, num_classes=num_classes), image_size)
    lines = []
    for path, cls, shape in rows:
        if path == ("head",) or (path[0] == "backbone" and len(path) > 1 and not expand):
            continue
        n = num_params(_subtree(variables.get("params", {}), path)) + num_params(
            _subtree(variables.get("batch_stats", {}), path)
        )
        name = arch if path == ("backbone",) else path[-1]
        indent = "  " * (len(path) - 1) if path[0] == "backbone" else ""
        layer = f"{indent}{name} ({cls})"
        lines.append((layer, str((None, *shape[1:])), f"{n:,}"))
    widths = [max(len(r[i]) for r in lines + [("Layer (type)", "Output Shape", "Param #")])
              for i in range(3)]

    def fmt(r: tuple[str, str, str]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"

    rule = "-" * len(fmt(lines[0]))
    counts = count_params(variables)
    table = [f'Model: "{arch}_{task}"', rule, fmt(("Layer (type)", "Output Shape", "Param #")),
             rule.replace("-", "=")]
    table += [fmt(r) for r in lines] + [rule]
    for label, key in (("Total", "total"), ("Trainable", "trainable"),
                       ("Non-trainable", "non_trainable")):
        table.append(f"{label} params: {counts[key]:,} ({counts[key] * 4 / 2**20:.2f} MB)")
    return "\n".join(table)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the Keras-style summary of one (arch, task) model."""
    parser = ArgumentParser(
        prog="python -m xrayjax.models",
        description="Print a Keras-style summary (layers, output shapes, parameter counts) "
        "of an xrayjax model. Parameter counts follow Keras: the frozen backbone and every "
        "BatchNorm moving statistic are non-trainable.",
    )
    parser.add_argument("arch", choices=ARCHS, help="backbone architecture")
    parser.add_argument("task", choices=(*TASKS, "four_class"), help="binary: one sigmoid output (Task 1); "
                        "multiclass (the report's four_class): a softmax over covid/normal/bacterial/viral "
                        "pneumonia (Task 2)")
    parser.add_argument("--classes", type=positive_int, metavar="N",
                        help="the classes of a multiclass head or the labels of a multilabel head (e.g. 14 for "
                        "ChestX-ray14), one output each; default 4, the report's classes. A binary head has 2 "
                        "classes on one output: leave --classes out")
    parser.add_argument("--expand", action="store_true",
                        help="also list every backbone layer (Keras layer names)")
    parser.add_argument("--image-size", type=int, default=224,
                        help="input height/width (default 224, as in the report)")
    args = parser.parse_args(argv)
    if args.image_size < 32:
        parser.error(f"--image-size must be at least 32 (five stride-2 stages), got {args.image_size}")
    try:
        text = summary(args.arch, canonical_task(args.task), expand=args.expand, image_size=args.image_size,
                       num_classes=args.classes)
    except ValueError as err:  # a class count the head cannot have
        parser.error(f"--classes: {err}")
    print(text)


if __name__ == "__main__":
    main()
