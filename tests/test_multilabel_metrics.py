"""Multi-label evaluation (issue 21): per-label AUC on known rows, one-class labels, Youden
thresholds, sensitivity/specificity, seeded intervals, TorchXRayVision's label weights, the
summary and the ROC figure. Pure numpy / scikit-learn: no model, no JAX."""

import matplotlib
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from xrayjax import figures
from xrayjax.multilabel_metrics import FROM_VALIDATION, multilabel_metrics, multilabel_summary, youden_threshold
from xrayjax.stats import roc_auc_known, wilson
from xrayjax.steps import balanced_label_weights

NAMES = ("Atelectasis", "Cardiomegaly", "Effusion", "Pleural_Thickening")


def _data(n: int, seed: int, unknown: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4) labels with NaN unknowns and correlated, informative, partly tied probabilities."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < [0.4, 0.2, 0.3, 0.5]).astype(np.float64)
    probs = np.clip(0.35 * labels + 0.65 * rng.random((n, 4)), 0, 1)
    probs[:, 1] = np.round(probs[:, 1], 1)  # ties, as real probabilities have
    labels[rng.random((n, 4)) < unknown] = np.nan
    return labels, probs


def test_per_label_auc_ap_and_counts_equal_scikit_learn_on_known_rows():
    labels, probs = _data(150, 0)
    metrics = multilabel_metrics(labels, probs, NAMES)
    assert metrics["task"] == "multilabel" and metrics["label_names"] == list(NAMES) and metrics["count"] == 150
    aucs = []
    for j, name in enumerate(NAMES):
        known = ~np.isnan(labels[:, j])
        row = metrics["per_label"][name]
        assert row["roc_auc"] == pytest.approx(roc_auc_score(labels[known, j], probs[known, j]))
        assert row["average_precision"] == pytest.approx(average_precision_score(labels[known, j], probs[known, j]))
        assert (row["positives"], row["negatives"], row["unknown"]) == (
            int(np.sum(labels[:, j] == 1)), int(np.sum(labels[:, j] == 0)), int(np.sum(~known)))
        aucs.append(roc_auc_score(labels[known, j], probs[known, j]))
    assert metrics["mean_roc_auc"] == pytest.approx(np.mean(aucs))
    assert metrics["mean_roc_auc_labels"] == list(NAMES)
    # The stats function on rows of resamples, NaN unknowns in each row, ties included.
    rows = np.stack([labels[:, 1], labels[::-1, 1]])
    np.testing.assert_allclose(roc_auc_known(rows, np.stack([probs[:, 1], probs[:, 1]])),
                               [roc_auc_score(r[~np.isnan(r)], probs[~np.isnan(r), 1]) for r in rows])


def test_unknown_rows_leave_a_labels_numbers_unchanged():
    labels, probs = _data(120, 1, unknown=0.3)
    val_labels, val_probs = _data(80, 2, unknown=0.3)
    before = multilabel_metrics(labels, probs, NAMES, val_labels, val_probs)
    scrambled, val_scrambled = probs.copy(), val_probs.copy()
    rng = np.random.default_rng(3)
    scrambled[np.isnan(labels)] = rng.random(np.isnan(labels).sum())
    val_scrambled[np.isnan(val_labels)] = rng.random(np.isnan(val_labels).sum())
    after = multilabel_metrics(labels, scrambled, NAMES, val_labels, val_scrambled)
    assert not np.allclose(scrambled, probs)
    assert after["per_label"] == before["per_label"]
    assert after["ci95"]["per_label"] == before["ci95"]["per_label"]
    assert after["ci95"]["mean_roc_auc"] == before["ci95"]["mean_roc_auc"]


def test_one_class_label_is_null_with_why_and_left_out_of_the_mean():
    labels, probs = _data(100, 4)
    labels[:, 1] = np.where(np.isnan(labels[:, 1]), np.nan, 0.0)  # no positive among the known rows
    labels[:, 3] = np.nan  # no known value at all
    metrics = multilabel_metrics(labels, probs, NAMES)
    for name, why in ((NAMES[1], "no positive"), (NAMES[3], "no known test value")):
        row = metrics["per_label"][name]
        assert row["roc_auc"] is None and why in row["why"]
        assert metrics["ci95"]["per_label"][name]["roc_auc"] is None
        assert row["sensitivity"] is None and row["average_precision"] is None
    assert metrics["per_label"][NAMES[1]]["specificity"] is not None
    assert metrics["mean_roc_auc_labels"] == [NAMES[0], NAMES[2]]
    expected = [roc_auc_score(labels[~np.isnan(labels[:, j]), j], probs[~np.isnan(labels[:, j]), j]) for j in (0, 2)]
    assert metrics["mean_roc_auc"] == pytest.approx(np.mean(expected))
    labels[:, [0, 2]] = np.where(np.isnan(labels[:, [0, 2]]), np.nan, 1.0)
    none = multilabel_metrics(labels, probs, NAMES)
    assert none["mean_roc_auc"] is None and none["ci95"]["mean_roc_auc"] is None and not none["mean_roc_auc_labels"]


def _brute_force_youden(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best J = sensitivity + specificity - 1 over every distinct score as threshold (score >=
    threshold is positive), and the highest threshold reaching it."""
    known = ~np.isnan(labels)
    labels, scores = labels[known], scores[known]
    best, chosen = -np.inf, None
    for t in sorted(set(scores), reverse=True):
        j = np.mean(scores[labels == 1] >= t) + np.mean(scores[labels == 0] < t) - 1
        if j > best + 1e-12:
            best, chosen = j, t
    return chosen, best


def test_youden_threshold_equals_brute_force_on_validation():
    labels, probs = _data(100, 5)
    val_labels, val_probs = _data(90, 6)
    metrics = multilabel_metrics(labels, probs, NAMES, val_labels, val_probs)
    for j, name in enumerate(NAMES):
        chosen, best = _brute_force_youden(val_labels[:, j], val_probs[:, j])
        row = metrics["per_label"][name]
        assert row["threshold"] == pytest.approx(chosen) and row["threshold_from"] == FROM_VALIDATION
        assert youden_threshold(val_labels[:, j], val_probs[:, j]) == pytest.approx(chosen)
        called = probs[:, j] >= chosen
        assert row["sensitivity"] == pytest.approx(np.mean(called[labels[:, j] == 1]))
        assert row["specificity"] == pytest.approx(np.mean(~called[labels[:, j] == 0]))
        assert best > 0
    # A tie: negatives 0.1, 0.35, positives 0.3, 0.8; J = 0.5 at 0.8 and at 0.3: the higher one.
    tied = np.array([0, 0, 1, 1.0]), np.array([0.1, 0.35, 0.3, 0.8])
    assert youden_threshold(*tied) == _brute_force_youden(*tied)[0] == 0.8
    # No validation data, or one class in it: 0.5, and the reason.
    assert all(r["threshold"] == 0.5 and "no validation" in r["threshold_from"]
               for r in multilabel_metrics(labels, probs, NAMES)["per_label"].values())
    val_labels[:, 2] = np.where(np.isnan(val_labels[:, 2]), np.nan, 1.0)
    row = multilabel_metrics(labels, probs, NAMES, val_labels, val_probs)["per_label"][NAMES[2]]
    assert row["threshold"] == 0.5 and "fewer than two classes" in row["threshold_from"]


def test_sensitivity_and_specificity_on_a_hand_made_case():
    labels = np.array([[1, 1, 1, 0, 0, 0, 0, np.nan]]).T
    probs = np.array([[0.9, 0.5, 0.2, 0.6, 0.1, 0.3, 0.49, 0.99]]).T
    # Threshold 0.5, score >= 0.5 positive: positives 0.9, 0.5 called (2 of 3); negatives 0.1, 0.3,
    # 0.49 not called (3 of 4); the unknown row counts nowhere.
    row = multilabel_metrics(labels, probs, ["Edema"])
    assert (row["per_label"]["Edema"]["sensitivity"], row["per_label"]["Edema"]["specificity"]) == (2 / 3, 3 / 4)
    assert row["ci95"]["per_label"]["Edema"]["sensitivity"] == wilson(2, 3)
    assert row["ci95"]["per_label"]["Edema"]["specificity"] == wilson(3, 4)
    # Validation scores 0.1, 0.2 (negatives), 0.3, 0.8 (positives): J = 1 at 0.3 only. On test at 0.3:
    # positives 0.9, 0.5 called (2 of 3); negatives 0.1 only below (1 of 4).
    val = multilabel_metrics(labels, probs, ["Edema"], np.array([[0, 0, 1, 1]]).T, np.array([[0.1, 0.2, 0.3, 0.8]]).T)
    row = val["per_label"]["Edema"]
    assert (row["threshold"], row["sensitivity"], row["specificity"]) == (0.3, 2 / 3, 1 / 4)
    assert val["ci95"]["per_label"]["Edema"]["specificity"] == wilson(1, 4)


def test_intervals_contain_the_estimates_are_seeded_and_resample_images_jointly():
    labels, probs = _data(90, 7)
    metrics = multilabel_metrics(labels, probs, NAMES, seed=3)
    ci = metrics["ci95"]
    for name in NAMES:
        row, row_ci = metrics["per_label"][name], ci["per_label"][name]
        for key in ("roc_auc", "sensitivity", "specificity"):
            low, high = row_ci[key]
            assert low <= row[key] <= high and high - low > 0.01
    low, high = ci["mean_roc_auc"]
    assert low <= metrics["mean_roc_auc"] <= high and high - low > 0.01
    assert "seed 3" in ci["method"]
    again = multilabel_metrics(labels, probs, NAMES, seed=3)["ci95"]
    other = multilabel_metrics(labels, probs, NAMES, seed=4)["ci95"]
    assert again == ci
    assert other["mean_roc_auc"] != ci["mean_roc_auc"]
    assert other["per_label"][NAMES[0]]["roc_auc"] != ci["per_label"][NAMES[0]]["roc_auc"]
    # Images resampled jointly: a label copied twice is perfectly correlated with itself, so the
    # mean of the two has exactly the one label's joint-bootstrap interval (independent
    # resampling of each copy would narrow it).
    one = multilabel_metrics(labels[:, :1], probs[:, :1], NAMES[:1])["ci95"]["mean_roc_auc"]
    two = multilabel_metrics(labels[:, [0, 0]], probs[:, [0, 0]], ["a", "b"])["ci95"]["mean_roc_auc"]
    assert two == pytest.approx(one)


def test_label_weights_follow_torchxrayvision():
    labels = np.array([[1, 1, 1], [0, 1, 1], [np.nan, 1, 1], [0, np.nan, 1], [0, 0, 1],
                       [np.nan, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]])
    # n = (1, 3, 8), mean 4, max 8: max - n + mean = (11, 9, 4), divided by 11.
    np.testing.assert_allclose(balanced_label_weights(labels), [1.0, 9 / 11, 4 / 11])
    with pytest.raises(ValueError, match="positive"):
        balanced_label_weights(np.zeros((4, 2)))


def test_bad_inputs_fail_with_a_clear_message():
    labels, probs = _data(20, 8)
    with pytest.raises(ValueError, match="NaN"):
        multilabel_metrics(np.where(labels == 1, -1.0, labels), probs, NAMES)  # CheXpert's uncertain left in
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        multilabel_metrics(labels, probs, NAMES[:3])
    with pytest.raises(ValueError, match="both"):
        multilabel_metrics(labels, probs, NAMES, val_labels=labels)


def test_summary_shows_every_label_and_the_mean():
    labels, probs = _data(80, 9)
    labels[:, 3] = np.where(np.isnan(labels[:, 3]), np.nan, 0.0)
    metrics = multilabel_metrics(labels, probs, NAMES)
    text = multilabel_summary(metrics)
    low, high = metrics["ci95"]["mean_roc_auc"]
    assert f"mean ROC-AUC {metrics['mean_roc_auc']:.3f} [{low:.3f}, {high:.3f}] over 3 of 4 labels" in text
    lines = text.splitlines()
    for name in NAMES:
        row, row_ci = metrics["per_label"][name], metrics["ci95"]["per_label"][name]
        line = next(line for line in lines if line.startswith(name + " "))
        assert f"{row['specificity']:.3f} [{row_ci['specificity'][0]:.3f}, {row_ci['specificity'][1]:.3f}]" in line
        assert f"{row['threshold']:.3f}*" in line and str(row["positives"]) in line
        if row["roc_auc"] is not None:
            assert f"{row['roc_auc']:.3f} [{row_ci['roc_auc'][0]:.3f}, {row_ci['roc_auc'][1]:.3f}]" in line
    assert any(NAMES[3] in line and "no positive" in line for line in lines if line.startswith("note:"))
    assert any("no validation data" in line for line in lines if line.startswith("note:"))


def test_plot_roc_writes_a_png_and_leaves_matplotlib_settings_alone(tmp_path):
    labels, probs = np.tile(_data(60, 10)[0], (1, 4)), np.tile(_data(60, 10)[1], (1, 4))  # 16 labels
    labels[:, 5] = np.where(np.isnan(labels[:, 5]), np.nan, 0.0)
    names = [f"finding {k}" for k in range(16)]
    backend, before = matplotlib.get_backend(), dict(matplotlib.rcParams)
    figures.plot_roc(labels, probs, names, tmp_path / "roc.png", title="vgg19 multilabel")
    assert matplotlib.get_backend() == backend
    assert sorted(k for k, v in before.items() if matplotlib.rcParams[k] != v) == []
    with Image.open(tmp_path / "roc.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600
    assert (pixels.min(axis=-1) < 200).mean() > 0.01  # drawn, not a blank page
