"""Metrics against small references written here: hand counts, Mann-Whitney AUROC, an ECE loop, Youden's J."""

import json
import logging
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtricks.bootstrap import weighted_auroc
from medtricks.metrics import (
    bootstrap_auroc_ci,
    choose_threshold,
    compute_metrics,
    expected_calibration_error,
    per_patient_probs,
)

KEYS = {"n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity", "f1", "ece",
        "threshold", "confusion_matrix"}
BINARY_KEYS = KEYS | {"sensitivity_at_specificity", "specificity_at_sensitivity"}


def mann_whitney_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of (positive, negative) pairs ranked correctly, ties counting 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def binary(p1: list[float]) -> np.ndarray:
    p1 = np.asarray(p1)
    return np.stack([1 - p1, p1], axis=1)


def softmax_data(n: int, n_classes: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


# 6 negatives, 4 positives; the positive 0.45 ties with a negative.
HAND_LABELS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
HAND_P1 = [0.1, 0.3, 0.6, 0.2, 0.45, 0.05, 0.8, 0.45, 0.9, 0.5]


def test_binary_metrics_by_hand():
    m = compute_metrics(HAND_LABELS, binary(HAND_P1), threshold=0.5, n_boot=0)
    assert set(m) == BINARY_KEYS
    # >= 0.5 is positive: negatives 0.6 -> FP (TN = 5); positives 0.8, 0.9, 0.5 -> TP, 0.45 -> FN.
    assert m["confusion_matrix"] == [[5, 1], [1, 3]]
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    precision, recall = 3 / 4, 3 / 4
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert m["threshold"] == 0.5
    assert m["auroc"] == pytest.approx(mann_whitney_auroc(HAND_LABELS, np.asarray(HAND_P1)))
    assert m["auroc_ci95"] is None  # n_boot=0: no interval


def test_binary_threshold_moves_decisions():
    m = compute_metrics(HAND_LABELS, binary(HAND_P1), threshold=0.85, n_boot=0)
    assert m["confusion_matrix"] == [[6, 0], [3, 1]]
    assert m["sensitivity"] == pytest.approx(1 / 4)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 1.0 * 0.25 / 1.25)
    assert compute_metrics(HAND_LABELS, binary(HAND_P1), n_boot=0)["threshold"] == 0.5  # None -> 0.5


def test_binary_auroc_matches_mann_whitney_and_accepts_1d():
    labels, probs = softmax_data(120, 2, seed=1)
    m = compute_metrics(labels, probs, n_boot=200)
    assert m["auroc"] == pytest.approx(mann_whitney_auroc(labels, probs[:, 1]))
    lo, hi = m["auroc_ci95"]
    assert 0 <= lo <= m["auroc"] <= hi <= 1
    m1d = compute_metrics(labels, probs[:, 1], n_boot=200)
    for key in KEYS - {"auroc_ci95", "confusion_matrix", "threshold"}:
        assert m1d[key] == pytest.approx(m[key])
    assert m1d["auroc_ci95"] == pytest.approx(m["auroc_ci95"])
    assert m1d["confusion_matrix"] == m["confusion_matrix"]


def test_multiclass_macro_against_per_class_loop():
    labels, probs = softmax_data(150, 3, seed=2)
    m = compute_metrics(labels, probs, n_boot=200)
    assert m["threshold"] is None
    assert m["auroc"] == pytest.approx(np.mean([mann_whitney_auroc(labels == c, probs[:, c]) for c in range(3)]))
    preds = probs.argmax(axis=1)
    recalls, specificities, f1s = [], [], []
    for c in range(3):
        tp = np.sum((preds == c) & (labels == c))
        fn = np.sum((preds != c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        tn = np.sum((preds != c) & (labels != c))
        recalls.append(tp / (tp + fn))
        specificities.append(tn / (tn + fp))
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert m["sensitivity"] == pytest.approx(np.mean(recalls))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["specificity"] == pytest.approx(np.mean(specificities))
    assert m["f1"] == pytest.approx(np.mean(f1s))
    assert m["accuracy"] == pytest.approx(np.mean(preds == labels))
    assert np.array_equal(np.diag(m["confusion_matrix"]), [np.sum((preds == c) & (labels == c)) for c in range(3)])
    lo, hi = m["auroc_ci95"]
    assert lo <= m["auroc"] <= hi


def ece_loop(labels: np.ndarray, probs: np.ndarray, n_bins: int) -> float:
    confidence, preds = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for b in range(n_bins):
        in_bin = (confidence > b / n_bins) & (confidence <= (b + 1) / n_bins)
        if in_bin.any():
            gap = abs(np.mean(preds[in_bin] == labels[in_bin]) - np.mean(confidence[in_bin]))
            total += in_bin.sum() / len(labels) * gap
    return total


def test_ece_by_hand_and_against_loop():
    # confidences 0.9 (right), 0.75 (wrong), 0.7 (right), 0.55 (right) in 5 bins:
    # (0.8, 1]: 1/4 * |1 - 0.9|; (0.6, 0.8]: 2/4 * |0.5 - 0.725|; (0.4, 0.6]: 1/4 * |1 - 0.55|
    labels = np.array([1, 0, 0, 1])
    assert expected_calibration_error(labels, binary([0.9, 0.75, 0.3, 0.55]), n_bins=5) == pytest.approx(0.25)
    labels, probs = softmax_data(300, 4, seed=3, signal=2.0)
    assert expected_calibration_error(labels, probs) == pytest.approx(ece_loop(labels, probs, 15))
    assert expected_calibration_error(labels, probs, n_bins=7) == pytest.approx(ece_loop(labels, probs, 7))


def test_choose_threshold_finds_youden_optimum_of_shifted_scores():
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 200)
    p1 = np.clip(np.where(labels == 1, rng.normal(0.8, 0.07, 400), rng.normal(0.6, 0.07, 400)), 0, 1)
    t = choose_threshold(labels, binary(p1))
    youden = [np.mean(p1[labels == 1] >= c) - np.mean(p1[labels == 0] >= c) for c in np.r_[p1, 1.0]]
    j = np.mean(p1[labels == 1] >= t) - np.mean(p1[labels == 0] >= t)
    assert j == pytest.approx(max(youden))
    assert 0.6 < t < 0.8
    assert choose_threshold(labels, p1) == t  # (N,) positive-class probability works too
    shifted = compute_metrics(labels, binary(p1), threshold=t, n_boot=0)["accuracy"]
    assert shifted > 0.85
    assert compute_metrics(labels, binary(p1), n_boot=0)["accuracy"] < 0.6  # the blind 0.5 is near chance


def test_choose_threshold_ties_and_one_class(caplog):
    # J = 0.5 with 0.9 positive (cut 0.8, halfway to 0.7) and with 0.9, 0.7, 0.35 positive (cut 0.225, halfway to
    # 0.1): the cut closer to 0.5 wins.
    assert choose_threshold(np.array([1, 0, 1, 0]), np.array([0.9, 0.7, 0.35, 0.1])) == pytest.approx(0.225)
    with caplog.at_level(logging.WARNING, logger="medtricks.metrics"):
        assert choose_threshold(np.array([1, 1, 1]), np.array([0.9, 0.7, 0.3])) == 0.5
    assert "only class 1" in caplog.text
    assert choose_threshold(np.array([0, 1]), np.array([0.2, 0.8])) == pytest.approx(0.5)  # halfway


def test_logistic_threshold_lands_on_the_balanced_point_with_less_spread_than_youden():
    # Score logits N(+1.5, 1) for positives, N(-1.5, 1) for negatives: sensitivity + specificity peaks at logit 0,
    # probability 0.5. Over 100 validation sets of 216 images, both estimators centre there; the empirical maximum
    # jumps between the few images near the boundary, the logistic fit uses all of them.
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 108)
    found = {"youden": [], "logistic": []}
    for _ in range(100):
        logits = np.where(labels == 1, rng.normal(1.5, 1, 216), rng.normal(-1.5, 1, 216))
        p1 = 1 / (1 + np.exp(-logits))
        for method, values in found.items():
            values.append(choose_threshold(labels, p1, method))
    for values in found.values():
        assert np.mean(values) == pytest.approx(0.5, abs=0.02)
    assert np.std(found["logistic"]) < 0.75 * np.std(found["youden"])


def test_logistic_threshold_follows_a_shifted_bias_and_falls_back_on_non_ranking_scores(caplog):
    rng = np.random.default_rng(4)
    labels = np.repeat([0, 1], 200)
    p1 = np.clip(np.where(labels == 1, rng.normal(0.8, 0.07, 400), rng.normal(0.6, 0.07, 400)), 0, 1)
    t = choose_threshold(labels, p1, "logistic")
    assert 0.65 < t < 0.75  # the densities cross at 0.7
    assert compute_metrics(labels, binary(p1), threshold=t, n_boot=0)["accuracy"] > 0.85
    reversed_scores = 1 - p1  # ranks the classes backwards: the fitted slope is negative
    with caplog.at_level(logging.WARNING, logger="medtricks.metrics"):
        assert choose_threshold(labels, reversed_scores, "logistic") == choose_threshold(labels, reversed_scores)
    assert "no positive slope" in caplog.text
    with pytest.raises(ValueError, match="youden"):
        choose_threshold(labels, p1, "otsu")


@pytest.mark.parametrize("n_classes", [2, 3])
def test_undefined_auroc_is_null_and_json_safe(caplog, n_classes):
    labels = np.zeros(8, dtype=int)
    probs = np.full((8, n_classes), 1 / n_classes)
    with caplog.at_level(logging.WARNING, logger="medtricks.metrics"):
        m = compute_metrics(labels, probs, patient_ids=[f"p{i}" for i in range(8)])
    assert m["auroc"] is None and m["auroc_ci95"] is None
    assert "absent" in caplog.text and str(list(range(1, n_classes))) in caplog.text
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert len(m["confusion_matrix"]) == n_classes


def test_bad_inputs_raise_clear_errors():
    labels, probs = softmax_data(10, 3, seed=5)
    with pytest.raises(ValueError, match="binary tasks only"):
        compute_metrics(labels, probs, threshold=0.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        compute_metrics(labels[:5], probs)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        compute_metrics(labels + 1, probs)
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics(labels, np.full((10, 3), np.nan))
    with pytest.raises(ValueError, match="one id per image"):
        compute_metrics(labels, probs, patient_ids=["a"])


def test_weighted_auroc_equals_sklearn_on_the_resampled_images():
    labels, probs = softmax_data(60, 2, seed=6)
    scores = np.round(probs[:, 1], 1)  # many ties
    counts = np.random.default_rng(6).integers(0, 4, size=(5, 60))
    got = weighted_auroc(scores, labels == 1, counts.astype(float))
    for row, value in zip(counts, got, strict=True):
        idx = np.repeat(np.arange(60), row)
        assert value == pytest.approx(roc_auc_score(labels[idx], scores[idx]))


def test_bootstrap_interval_covers_the_true_auroc():
    d = 1.0
    true_auroc = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))  # Phi(d / sqrt(2))
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1], 100)
    covered = 0
    for i in range(50):
        scores = rng.normal(0, 1, 200) + d * labels
        lo, hi = bootstrap_auroc_ci(labels, scores, n_boot=1000, seed=i)
        covered += lo <= true_auroc <= hi
    assert covered >= 43  # nominal 95%: 47.5 of 50 expected


def test_cluster_bootstrap_is_wider_when_images_of_a_patient_are_copies():
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1], 50)
    scores = rng.normal(0, 1, 100) + labels
    labels5, scores5 = np.repeat(labels, 5), np.repeat(scores, 5)
    patients = [f"patient-{i}" for i in np.repeat(np.arange(100), 5)]
    per_image = bootstrap_auroc_ci(labels5, scores5, n_boot=1000)
    per_patient = bootstrap_auroc_ci(labels5, scores5, groups=patients, n_boot=1000)
    original = bootstrap_auroc_ci(labels, scores, n_boot=1000)
    width = {name: ci[1] - ci[0] for name, ci in
             {"image": per_image, "patient": per_patient, "original": original}.items()}
    assert width["patient"] > 1.7 * width["image"]  # ~sqrt(5) with 5 identical copies
    assert width["patient"] == pytest.approx(width["original"], rel=0.25)
    assert bootstrap_auroc_ci(labels5, scores5, groups=patients, seed=1) == bootstrap_auroc_ci(
        labels5, scores5, groups=patients, seed=1)


def test_bootstrap_gives_none_with_too_few_valid_replicates(caplog):
    labels, probs = softmax_data(40, 2, seed=9)
    with caplog.at_level(logging.WARNING, logger="medtricks.bootstrap"):
        assert bootstrap_auroc_ci(labels, probs, n_boot=50) is None
    assert "50 bootstrap replicates" in caplog.text
    assert bootstrap_auroc_ci(np.zeros(10, dtype=int), np.full(10, 0.3)) is None  # no positive ever


def test_per_patient_probs_averages_and_votes():
    probs = binary([0.2, 0.4, 0.9, 0.7, 0.8, 0.1])
    ids = ["b", "b", "a", "a", "a", "c"]
    labels = np.array([0, 1, 1, 1, 0, 0])
    mean, patient_labels, patients = per_patient_probs(probs, ids, labels)
    assert patients == ["a", "b", "c"]
    np.testing.assert_allclose(mean[:, 1], [0.8, 0.3, 0.1])
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)
    assert patient_labels.tolist() == [1, 0, 0]  # a: majority 1; b: tie 0/1 -> lowest; c: 0
    m = compute_metrics(patient_labels, mean, n_boot=0)
    assert m["n"] == 3


def test_f1_is_null_where_it_is_zero_over_zero_not_a_made_up_zero():
    """A finding absent from a split and never predicted (every decision right) got F1 0.0, halving the mean F1 of
    a perfect multi-label prediction."""
    from medtricks.multilabel import compute_multilabel_metrics

    labels = np.array([[0, 1], [0, 0], [0, 1], [0, 0]])
    probs = np.array([[0.1, 0.9], [0.2, 0.1], [0.1, 0.8], [0.3, 0.2]])
    metrics = compute_multilabel_metrics(labels, probs, thresholds=[0.5, 0.5], n_boot=0, names=["a", "b"])
    assert metrics["per_label"]["a"]["f1"] is None and metrics["per_label"]["b"]["f1"] == 1.0
    assert metrics["f1"] == 1.0 and metrics["accuracy"] == 1.0
    no_positive_but_called = compute_metrics(np.array([0, 0, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]),
                                             threshold=0.5, n_boot=0)
    assert no_positive_but_called["f1"] == 0.0  # a false positive: F1 is defined, and 0


def test_no_interval_from_one_patient_and_no_balanced_accuracy_with_a_class_absent():
    """Six images of one patient gave auroc_ci95 [0.333, 0.333] (every replicate redraws the same patient); a split
    of one class gave balanced accuracy 0.0 or 1.0, the recall of the one class present."""
    labels, probs = np.array([0, 1, 0, 1, 0, 1]), np.array([[0.4, 0.6], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8],
                                                             [0.3, 0.7], [0.5, 0.5]])
    one_patient = compute_metrics(labels, probs, ["p1"] * 6, threshold=0.5, n_boot=500)
    assert one_patient["auroc"] is not None and one_patient["auroc_ci95"] is None
    assert compute_metrics(labels, probs, [f"p{i}" for i in range(6)], threshold=0.5, n_boot=500)["auroc_ci95"]
    one_class = compute_metrics(np.array([0, 0, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), threshold=0.5,
                                n_boot=0)
    assert one_class["balanced_accuracy"] is None and one_class["accuracy"] == pytest.approx(2 / 3)
    three = compute_metrics(np.array([0, 0, 1, 1]), np.tile([[0.8, 0.1, 0.1]], (4, 1)), n_boot=0)
    assert three["balanced_accuracy"] is None  # class 2 absent: the mean recall over 3 classes is undefined


def test_no_interval_when_a_class_comes_from_one_patient(caplog):
    """Two patients, one per class: every replicate that has both classes redraws the same two patients, and the
    AUROC interval was zero-width ([0.733, 0.733] on a demo validation split). One positive patient among many
    negatives likewise leaves out how another positive patient would score. The interval, the operating points'
    intervals and compare's paired bootstrap are then null, with the class named; two patients a class suffice."""
    from medtricks.compare import compare_predictions

    rng = np.random.default_rng(0)
    labels = np.array([0] * 6 + [1] * 5)
    p1 = np.clip(labels * 0.15 + rng.uniform(0.1, 0.6, 11), 0, 1)
    probs = np.c_[1 - p1, p1]
    two = ["neg"] * 6 + ["pos"] * 5
    caplog.set_level("WARNING")
    metrics = compute_metrics(labels, probs, two, threshold=0.5, n_boot=500)
    assert 0.5 < metrics["auroc"] < 1 and metrics["auroc_ci95"] is None
    assert "all images of class 0 come from one patient" in caplog.text
    assert all(v["ci95"] is None for point in ("sensitivity_at_specificity", "specificity_at_sensitivity")
               for v in metrics[point].values() if v["value"] is not None)
    one_positive_patient = [f"n{i}" for i in range(6)] + ["pos"] * 5
    assert compute_metrics(labels, probs, one_positive_patient, n_boot=500)["auroc_ci95"] is None
    assert "all images of class 1 come from one patient" in caplog.text
    other = np.c_[1 - p1[::-1], p1[::-1]]
    assert compare_predictions(labels, probs, other, groups=two, n_boot=500)["auroc"]["bootstrap"]["ci95"] == \
        [None, None]
    two_each = [f"n{i % 2}" for i in range(6)] + [f"p{i % 2}" for i in range(5)]
    lo, hi = compute_metrics(labels, probs, two_each, n_boot=500)["auroc_ci95"]
    assert lo < hi
