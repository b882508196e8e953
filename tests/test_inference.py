"""The inference route (xrayjax.inference): probabilities, padded batches, the head on cached
features, and one module that every command imports (no twin in predict)."""

import ast
import pathlib

import numpy as np
import pytest
from scipy.special import expit, softmax

import xrayjax.crossval
import xrayjax.evaluate
import xrayjax.gradcam
import xrayjax.predict
from xrayjax import inference
from xrayjax.data import Split
from xrayjax.inference import backbone_features, infer, infer_features, probabilities
from xrayjax.models import create_model, keras_init


def test_probabilities_of_one_logit_and_of_several():
    one = probabilities(np.array([[0.0], [2.0], [-3.0]]))
    np.testing.assert_allclose(one[:, 1], expit([0.0, 2.0, -3.0]))
    np.testing.assert_allclose(one[:, 0], 1 - one[:, 1])
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(probabilities(logits), softmax(logits, axis=1))
    with pytest.raises(ValueError, match=r"logits must be \(N, K\), got shape \(3,\)"):
        probabilities(np.zeros(3))


def test_infer_pads_batches_keeps_order_and_equals_the_head_on_cached_features():
    model = create_model("vgg16", "multiclass")
    variables = keras_init(model, (1, 32, 32, 3))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    split = Split(images, np.zeros(5, np.int32), tuple("abcde"))
    logits, embeddings = infer(model, variables, split, batch_size=2)  # 2 + 2 + 1 padded to 2
    assert logits.shape == (5, 4) and embeddings.shape == (5, 512)
    assert not np.allclose(logits[0], logits[1])
    backwards, _ = infer(model, variables, split.take(np.arange(5)[::-1]), batch_size=2)
    np.testing.assert_allclose(backwards[::-1], logits, rtol=1e-5, atol=1e-6)
    features = backbone_features(model, variables, images)
    (first, first_emb), (rest, rest_emb) = infer_features(model, variables, [features[:2], features[2:]])
    np.testing.assert_allclose(np.concatenate([first, rest]), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([first_emb, rest_emb]), embeddings, rtol=1e-5, atol=1e-6)


def test_every_command_runs_the_one_inference_module():
    assert xrayjax.predict.infer is inference.infer and xrayjax.predict.probabilities is inference.probabilities
    assert xrayjax.evaluate.infer_features is inference.infer_features
    assert xrayjax.gradcam.backbone_features is inference.backbone_features
    assert xrayjax.crossval.infer_features is inference.infer_features
    # and it depends on no command: commands import it, never the other way round
    tree = ast.parse(pathlib.Path(inference.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {f"xrayjax.{m}" for m in ("predict", "evaluate", "gradcam", "crossval", "loop", "train")}
