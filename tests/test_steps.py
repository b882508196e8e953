"""xrayjax.steps on its own: with a backbone block opened, 4 devices give the 1-device steps
(the gradient into the block goes through all_gather's transpose and the pmean), and the step
stack (steps, and the benchmark built on it) imports none of the data stack."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
from flax import traverse_util

from training_helpers import SIZE, tiny_splits
from xrayjax.data import batches
from xrayjax.steps import build_step_model, create_train_state, epoch_key, init_variables, make_train_step, replicate

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_STACK = ("PIL", "tensorflow_datasets", "sklearn", "matplotlib", "scipy")


def _train(model, start: dict, num_devices: int) -> tuple[list[float], dict]:
    """One epoch (3 steps, the last padded) over 10 images in global batches of 4: the losses
    and the parameters after."""
    devices = jax.local_devices()[:num_devices]
    state = replicate(create_train_state(model, start, lr=1e-4), devices)
    step, key, losses = make_train_step(model, devices), epoch_key(0, 0), []
    for s, batch in enumerate(batches(tiny_splits("binary").train, 4, num_devices, shuffle=True, seed=0)):
        state, metrics = step(state, batch, jax.random.fold_in(key, s))
        losses.append(float(metrics["loss_sum"]) / float(metrics["count"]))
    return losses, traverse_util.flatten_dict(jax.device_get(state.params))


def test_four_devices_equal_one_device_with_an_opened_block():
    model = build_step_model("vgg16", "binary", fine_tune=1)
    start = init_variables(model, SIZE, init="random", seed=0)  # numpy, on the host: steps donate
    losses1, params1 = _train(model, start, 1)
    losses4, params4 = _train(model, start, 4)
    np.testing.assert_allclose(losses4, losses1, rtol=1e-6)
    for path, before in traverse_util.flatten_dict(start["params"]).items():
        name = "/".join(path)
        if path[0] == "head" or path[1].startswith("block5_"):
            assert not np.array_equal(params1[path], before), name
            # Adam turns float32 rounding of near-zero gradients into differences up to ~5e-7
            # here; without the pmean they are ~5e-4
            np.testing.assert_allclose(params4[path], params1[path], rtol=1e-5, atol=2e-6, err_msg=name)
        else:
            assert np.array_equal(params1[path], before) and np.array_equal(params4[path], before), name


def test_step_stack_imports_no_data_stack():
    # one fresh interpreter: xrayjax.steps alone, then the benchmark on top of it
    code = (f"import sys, importlib\nfor module in ('xrayjax.steps', 'xrayjax.bench'):\n"
            f"    importlib.import_module(module)\n"
            f"    print(module, sorted(m for m in {DATA_STACK!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == ["xrayjax.steps []", "xrayjax.bench []"]
