"""Honest numbers (issue 14): Wilson and bootstrap intervals, stratified (group) folds, leak-free
hold-outs, and cross-validation on cached features."""

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from xrayjax import fit
from xrayjax.crossval import cross_validate
from xrayjax.data.splits import Split, stratified_split
from xrayjax.evaluate import compute_metrics
from xrayjax.stats import bootstrap, folds, hold_out, macro_f1, roc_auc, roc_auc_per_class, summarise, wilson

from training_helpers import tiny_config, tiny_splits


def test_wilson_against_hand_computed_values():
    # centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n), z = 1.959964
    assert wilson(25, 36) == pytest.approx([0.53144, 0.81996], abs=2e-5)  # the 0.694 [0.531, 0.820]
    assert wilson(9, 36) == pytest.approx([0.13750, 0.41071], abs=2e-5)
    assert wilson(0, 10) == pytest.approx([0.0, 3.841459 / 13.841459], abs=1e-6)  # z^2 / (n + z^2)
    assert wilson(10, 10) == pytest.approx([10 / 13.841459, 1.0], abs=1e-6)
    assert wilson(0, 0) is None


def test_fast_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        labels = rng.integers(0, k, 50)
        probs = np.round(rng.dirichlet(np.ones(k), 50), 1)  # ties, as real probabilities have
        assert macro_f1(labels, probs) == pytest.approx(
            f1_score(labels, probs.argmax(1), labels=np.unique(labels), average="macro", zero_division=0))
        ref = (roc_auc_score(labels, probs[:, 1]) if k == 2
               else np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(k)]))
        assert roc_auc(labels, probs) == pytest.approx(ref)
        np.testing.assert_allclose(roc_auc_per_class(labels, probs),
                                   [roc_auc_score(labels == c, probs[:, c]) for c in range(k)])
    assert roc_auc(np.zeros(5, int), np.full((5, 2), 0.5)) is None
    assert np.isnan(roc_auc_per_class(np.zeros(5, int), np.full((5, 3), 0.3))).all()


@pytest.mark.parametrize(("k", "absent"), [(2, None), (3, None), (4, None), (4, 2), (3, 0), (2, 1)])
def test_compute_metrics_equal_scikit_learn(k, absent):
    # scikit-learn is the oracle for the one implementation (xrayjax.stats) that metrics.json uses
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 60)
    if absent is not None:
        labels[labels == absent] = (absent + 1) % k
    probs = np.round(rng.dirichlet(np.ones(k), 60), 1)  # ties, as real probabilities have
    names = tuple("abcd"[:k])
    m = compute_metrics(labels, probs, names)
    present = np.unique(labels)
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), labels=present, average="macro"))
    assert (m["notes"] == []) if absent is None else any(names[absent] in note for note in m["notes"])
    if k == 2:
        assert m["roc_auc"] == (None if absent is not None else pytest.approx(roc_auc_score(labels, probs[:, 1])))
        return
    per_class = {names[c]: roc_auc_score(labels == c, probs[:, c]) if c in present else None for c in range(k)}
    assert m["roc_auc_per_class"] == pytest.approx(per_class)
    assert m["roc_auc"] == pytest.approx(np.mean([v for v in per_class.values() if v is not None]))


def test_bootstrap_is_seeded_and_stratified():
    labels = np.repeat([0, 1, 2], [5, 9, 22])
    probs = np.random.default_rng(1).dirichlet(np.ones(3), len(labels))
    a, b = bootstrap(labels, probs, macro_f1, seed=3), bootstrap(labels, probs, macro_f1, seed=3)
    assert a == b and a != bootstrap(labels, probs, macro_f1, seed=4)
    assert a[0] < macro_f1(labels, probs) < a[1]
    # every resample keeps the class counts: the count of class 0 never varies
    assert bootstrap(labels, probs, lambda l, p: np.sum(l == 0, axis=1)) == [5.0, 5.0]
    # while the rows drawn do vary: the mean of the class-1 probability of class-0 rows moves
    low, high = bootstrap(labels, probs, lambda l, p: np.sum(p[..., 1] * (l == 0), axis=1))
    assert high > low


def test_metrics_json_intervals():
    labels = np.repeat([0, 1, 2, 3], 9)
    probs = np.eye(4)[np.where(np.arange(36) % 4 == 0, (labels + 1) % 4, labels)] * 0.7 + 0.075
    m = compute_metrics(labels, probs, ("a", "b", "c", "d"))
    assert m["accuracy"] == 27 / 36 and m["ci95"]["accuracy"] == wilson(27, 36)
    tp = int(np.sum((probs.argmax(1) == 0) & (labels == 0)))
    assert m["ci95"]["per_class"]["a"]["recall"] == wilson(tp, 9)
    assert m["ci95"]["per_class"]["a"]["precision"] == wilson(tp, int(np.sum(probs.argmax(1) == 0)))
    for key in ("macro_f1", "roc_auc"):
        low, high = m["ci95"][key]
        assert low <= m[key] <= high


def test_folds_are_stratified_disjoint_and_cover():
    labels = np.repeat([0, 1, 2], [10, 17, 23])
    held = folds(labels, 5, seed=0)
    every = np.concatenate(held)
    assert sorted(every) == list(range(50))  # disjoint and covering
    for c, n in ((0, 10), (1, 17), (2, 23)):
        per_fold = [int(np.sum(labels[h] == c)) for h in held]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == n
    assert [h.tolist() for h in folds(labels, 5, seed=0)] == [h.tolist() for h in held]
    with pytest.raises(ValueError, match=r"smallest class has 10 image\(s\); pass --folds 10 or fewer"):
        folds(labels, 11, seed=0)


def test_no_group_on_two_sides():
    rng = np.random.default_rng(0)
    groups = [f"patient{g}" for g in rng.integers(0, 30, 120)]
    labels = np.array([int(g[7:]) % 3 for g in groups])  # a patient has one class
    held = folds(labels, 5, seed=1, groups=groups)
    assert sorted(np.concatenate(held)) == list(range(120))
    owner = {}
    for k, rows in enumerate(held):
        for r in rows:
            assert owner.setdefault(groups[r], k) == k
    names = tuple(f"person{g[7:]}_x{i}.jpeg" for i, g in enumerate(groups))  # Kaggle patients
    split = Split(np.zeros((120, 1, 1, 3), np.uint8), labels.astype(np.int32), names)
    rest, out = stratified_split(split, 0.2, seed=0, by_source=True)
    assert not {n.split("_")[0] for n in rest.names} & {n.split("_")[0] for n in out.names}
    assert 0.1 < len(out) / 120 < 0.3 and len(rest) + len(out) == 120
    with pytest.raises(ValueError, match="needs at least 5 source groups"):
        hold_out(labels[:8], 0.2, 0, ["a", "b"] * 4)


def test_summarise_is_the_mean_and_t_interval():
    s = summarise([0.5, 0.7, 0.6])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert s["ci95"] == pytest.approx([0.6 - 4.302653 * 0.1 / 3 ** 0.5, 0.6 + 4.302653 * 0.1 / 3 ** 0.5], abs=1e-6)


def test_summarise_clips_the_interval_to_the_metric_range():
    # three folds, std 0.1732: the t interval's half-width 0.4303 would leave [0, 1] on one side
    half = 4.302653 * 0.1
    low = summarise([0.0, 0.3, 0.0])
    assert low["mean"] == pytest.approx(0.1) and low["ci95"] == pytest.approx([0.0, 0.1 + half], abs=1e-6)
    high = summarise([1.0, 0.7, 1.0])
    assert high["ci95"] == pytest.approx([0.9 - half, 1.0], abs=1e-6)
    assert summarise([0.0, 0.0])["ci95"] == [0.0, 0.0]
    # one fold scored (the others None): a mean without a spread, never a zero-width interval
    assert summarise([None, 1.0, None]) == {"mean": 1.0, "std": None, "ci95": None, "n": 1}


def test_cross_validation_on_cached_features(tmp_path):
    splits = tiny_splits("multiclass", n_train=20)
    config = tiny_config(tmp_path, "cv", task="multiclass", folds=2, seeds=2, epochs=3)
    result = fit(config, splits=splits)
    assert len(result.splits.train) == 26 and len(result.splits.validation) == 0  # the final model: train+val
    assert "val_accuracy" not in result.history[-1]
    cv = cross_validate(result)
    assert json.loads((tmp_path / "cv" / "cv.json").read_text()) == cv
    assert (tmp_path / "cv" / "cv.png").stat().st_size > 10_000
    assert len(cv["per_fold"]) == 4 and cv["seeds"] == [0, 1]
    for seed in (0, 1):
        sizes = [f["held_out_images"] for f in cv["per_fold"] if f["seed"] == seed]
        assert sum(sizes) == 26
    for metric in ("accuracy", "macro_f1", "roc_auc"):
        values = [f[metric] for f in cv["per_fold"]]
        assert cv["summary"][metric]["mean"] == pytest.approx(np.mean(values))
        assert cv["summary"][metric]["std"] == pytest.approx(np.std(values, ddof=1))
    assert all(len(f["history"]) == 3 and f["last_epoch"] == f["history"][-1] for f in cv["per_fold"])
    # the features were not recomputed and the result's state is still usable
    assert result.timings.get("features", 0) > 0
    np.asarray(result.state.params["backbone"]["block1_conv1"]["kernel"])
