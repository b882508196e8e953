"""xrayjax: chest X-ray classification with frozen ImageNet backbones in JAX/Flax.

The public API is exported lazily, so ``import xrayjax`` is cheap and only the parts a
caller touches are imported (the data module, for one, imports tensorflow-datasets).
Training lives in :mod:`xrayjax.training`; ``xrayjax/train.py`` is only the
``python -m xrayjax.train`` entry point.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "xrayjax.models",
    "create_backbone": "xrayjax.models",
    "create_head": "xrayjax.models",
    "count_params": "xrayjax.models",
    "preprocess_input": "xrayjax.preprocessing",
    "port_keras_weights": "xrayjax.porting",
    "load_pretrained": "xrayjax.porting",
    "train": "xrayjax.training",
    "TrainConfig": "xrayjax.training",
    "TrainResult": "xrayjax.training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xrayjax' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
