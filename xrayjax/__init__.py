"""xrayjax: chest X-ray classification with frozen ImageNet backbones in JAX/Flax.

The public API is exported lazily, so ``import xrayjax`` is cheap and only the parts a
caller touches are imported (tensorflow-datasets, for one, loads when data is first read).
``xrayjax.fit(TrainConfig(...))`` trains (:mod:`xrayjax.loop`); ``xrayjax.train`` is the
command-line module (``python -m xrayjax.train``), never a function, so no import can shadow
the API.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "xrayjax.models",
    "create_backbone": "xrayjax.models",
    "create_head": "xrayjax.models",
    "count_params": "xrayjax.models",
    "keras_init": "xrayjax.models",
    "preprocess_input": "xrayjax.preprocessing",
    "port_keras_weights": "xrayjax.porting",
    "load_pretrained": "xrayjax.porting",
    "fit": "xrayjax.loop",
    "TrainConfig": "xrayjax.config",
    "TrainResult": "xrayjax.loop",
    "load_run": "xrayjax.runfiles",
    "evaluate_run": "xrayjax.evaluate",
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
