"""Shared test set-up: Keras on its JAX backend, 4 virtual CPU devices, the real dataset."""

import os
import pathlib
import shutil
import tempfile

# Both must be set before jax or keras is imported anywhere.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# One persistent XLA compilation cache for the session and the subprocesses it starts: many
# tests compile the same small programs (experiments/bench.md).
_XLA_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="xrayjax-xla-")
if _XLA_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "covid_xray" / "Covid_Data_GradientCrescent"


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """The real dataset (the folder holding all/ and two/); CI always has it."""
    if not DATA_ROOT.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"the dataset is missing at {DATA_ROOT}: CI must run next to ../shared")
        pytest.skip(f"the real dataset is not at {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def small_dataset(data_root, tmp_path_factory) -> pathlib.Path:
    """The challenge's layout with two real training images and one test image per class."""
    root = tmp_path_factory.mktemp("small")
    for split in ("train", "test"):
        for cls in ("covid", "normal", "pneumonia_bac", "pneumonia_vir"):
            folder = root / "all" / split / cls
            folder.mkdir(parents=True)
            source = sorted((data_root / "all" / split / cls).glob("*.jp*g"))[:2 if split == "train" else 1]
            for image in source:
                shutil.copy(image, folder / image.name)
    return root


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's compilation cache."""
    if _XLA_CACHE:
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


# Two workers take whole files in collection order, so a long file collected late leaves one
# worker alone at the end (test_training.py is last by name): the slowest files, as measured in
# experiments/bench.md, start first; the rest follow in name order.
_SLOWEST_FIRST = ("test_keras_models.py", "test_training.py", "test_api.py", "test_gpu_check.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    """Run the files of _SLOWEST_FIRST first, in that order; the sort is stable."""
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
