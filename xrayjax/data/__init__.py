"""X-ray datasets (class folders, or a labels file): a TFDS builder read without TensorFlow, splits,
batches.

``python -m xrayjax.data prepare|audit`` is the command line. Importing this package leaves
tensorflow-datasets unloaded; :func:`load_splits` loads it on first call.
"""

from xrayjax.data.loader import batches
from xrayjax.data.dataset import DataConfig, Dataset, open_dataset
from xrayjax.data.splits import RecordImages, Split, Splits, load_splits
from xrayjax.data.source import CHALLENGE_CLASSES, DataError

__all__ = [
    "CHALLENGE_CLASSES", "DataConfig", "DataError", "Dataset", "RecordImages", "Split", "Splits",
    "batches", "load_splits", "open_dataset",
]
