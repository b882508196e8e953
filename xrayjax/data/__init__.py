"""The chest X-ray data: a TFDS builder read without TensorFlow, splits, batches, augmentation.

``python -m xrayjax.data prepare|audit`` is the command line. Importing this package leaves
tensorflow-datasets unloaded; :func:`load_splits` loads it on first call.
"""

from xrayjax.data.augment import AugmentConfig, augment_images
from xrayjax.data.pipeline import DataConfig, Split, Splits, batches, load_splits
from xrayjax.data.source import CLASS_NAMES, DataError

__all__ = [
    "CLASS_NAMES", "AugmentConfig", "DataConfig", "DataError", "Split", "Splits",
    "augment_images", "batches", "load_splits",
]
