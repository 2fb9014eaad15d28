"""Operating points and ordinal agreement (issue 18, parts 2 and 3): thresholds halfway between validation scores,
sensitivity / specificity targets, the report's sensitivity at fixed specificity (and the reverse) against a brute
force over every threshold, and weighted kappa against scikit-learn."""

import json

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from medtricks.errors import RecipeError
from medtricks.metrics import choose_threshold, compute_metrics, operating_points, weighted_kappa
from medtricks.recipe import load_recipe_from_dict, threshold_target
from medtricks.scoring import EvalOutput, evaluate_split, report_metrics


def scores(n: int = 300, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    p1 = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * labels)))
    return labels, (np.round(p1, 1) if ties else p1)


def rates(labels: np.ndarray, p1: np.ndarray, t: float) -> tuple[float, float]:
    positive = p1 >= t
    return positive[labels == 1].mean(), (~positive[labels == 0]).mean()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("method", ["youden", "sensitivity@0.95", "specificity@0.9", "sensitivity@1", "specificity@1"])
def test_thresholds_lie_between_scores_so_float_noise_flips_nothing(method, ties):
    labels, p1 = scores(ties=ties)
    p1 = np.minimum(p1, 0.99)  # (a score of exactly 1 is positive at any threshold: the next test)
    t = choose_threshold(labels, p1, method)
    distinct = np.unique(p1)
    assert not np.any(np.isclose(distinct, t, rtol=0, atol=1e-9))
    gap = np.min(np.abs(distinct - t))
    for seed in range(5):  # the same images scored with a little noise (another batch size, another device)
        noisy = p1 + np.random.default_rng(seed).uniform(-0.9, 0.9, len(p1)) * gap
        assert np.array_equal(noisy >= t, p1 >= t)


@pytest.mark.parametrize("ties", [False, True])
def test_targets_reach_their_rate_with_the_best_other_rate(ties):
    labels, p1 = scores(ties=ties, seed=1)
    cuts = np.r_[np.unique(p1), 1.01]
    for value in (0.8, 0.9, 0.95, 1.0):
        t = choose_threshold(labels, p1, f"sensitivity@{value}")
        sensitivity, specificity = rates(labels, p1, t)
        reachable = [rates(labels, p1, c) for c in cuts if rates(labels, p1, c)[0] >= value]
        assert sensitivity >= value and specificity == max(spec for _, spec in reachable)
        t = choose_threshold(labels, p1, f"specificity@{value}")
        sensitivity, specificity = rates(labels, p1, t)
        reachable = [rates(labels, p1, c) for c in cuts if rates(labels, p1, c)[1] >= value]
        assert specificity >= value and sensitivity == max(sens for sens, _ in reachable)


def test_saturated_scores_of_one_are_positive_at_every_threshold(caplog):
    labels = np.array([0, 1, 1, 0, 0, 1])
    p1 = np.array([1.0, 1.0, 0.9, 0.2, 0.1, 0.6])
    for method in ("youden", "sensitivity@0.9", "specificity@0.6"):
        t = choose_threshold(labels, p1, method)
        assert 0 <= t <= 1 and t not in p1
    with caplog.at_level("WARNING", logger="medtricks.metrics"):
        t = choose_threshold(labels, p1, "specificity@1")
    assert t == pytest.approx(0.95) and "no threshold reaches specificity 1" in caplog.text  # 1 of 3 negatives at 1


def test_operating_points_against_a_brute_force_over_every_threshold():
    for ties in (False, True):
        labels, p1 = scores(ties=ties, seed=2)
        points = operating_points(labels, p1, n_boot=300, seed=0)
        every = [rates(labels, p1, c) for c in np.r_[np.unique(p1), 1.01]]
        for rate in (0.9, 0.95):
            found = points["sensitivity_at_specificity"][f"{rate:g}"]
            assert found["value"] == pytest.approx(max(s for s, sp in every if sp >= rate))
            lo, hi = found["ci95"]
            assert 0 <= lo <= hi <= 1
            found = points["specificity_at_sensitivity"][f"{rate:g}"]
            assert found["value"] == pytest.approx(max(sp for s, sp in every if s >= rate))


def test_operating_points_by_hand_at_a_rate_reached_exactly():
    negatives = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.95]
    positives = [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.96, 0.97, 0.98, 0.99]
    labels, p1 = np.repeat([0, 1], 10), np.array(negatives + positives)
    points = operating_points(labels, p1, n_boot=0)
    assert points["sensitivity_at_specificity"]["0.9"] == {"value": 0.9, "ci95": None}  # one false positive (0.95)
    assert points["specificity_at_sensitivity"]["0.9"]["value"] == pytest.approx(0.9)
    assert points["specificity_at_sensitivity"]["0.95"]["value"] == pytest.approx(0.5)  # 0.3: a negative ties


def test_operating_point_intervals_resample_patients():
    labels, p1 = scores(n=200, seed=3)
    twins = np.repeat(labels[:100], 2), np.repeat(p1[:100], 2)  # every patient imaged twice
    patients = [f"p{i // 2}" for i in range(200)]
    by_image = operating_points(*twins, n_boot=500)["sensitivity_at_specificity"]["0.9"]["ci95"]
    by_patient = operating_points(*twins, groups=patients, n_boot=500)["sensitivity_at_specificity"]["0.9"]["ci95"]
    assert by_patient[1] - by_patient[0] > 1.2 * (by_image[1] - by_image[0])  # 100 patients, not 200 images


@pytest.mark.parametrize("kind", ["quadratic", "linear"])
def test_weighted_kappa_matches_scikit_learn_with_and_without_weights(kind):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 5, 400)
    preds = np.clip(labels + rng.integers(-2, 3, 400), 0, 4)
    kappa, interval = weighted_kappa(labels, preds, 5, kind, n_boot=400)
    assert kappa == pytest.approx(cohen_kappa_score(labels, preds, weights=kind))
    assert interval[0] < kappa < interval[1]
    from medtricks.bootstrap import weighted_kappas
    weights = rng.integers(0, 3, (3, 400)).astype(float)  # bootstrap-like replicate weights
    for w, k in zip(weights, weighted_kappas(labels, preds, 5, weights, kind), strict=True):
        assert k == pytest.approx(cohen_kappa_score(labels, preds, weights=kind, sample_weight=w))


def test_weighted_kappa_counts_grade_distance_and_is_null_when_undefined():
    labels = np.array([0, 1, 2, 3, 4] * 20)
    near = weighted_kappa(labels, np.clip(labels + 1, 0, 4), 5, n_boot=0)[0]
    far = weighted_kappa(labels, np.where(labels == 4, 0, labels + 1), 5, n_boot=0)[0]  # grade 4 read as 0
    assert near > far  # accuracy is 0.2 in both
    assert weighted_kappa(np.zeros(10, int), np.zeros(10, int), 5) == (None, None)


def test_reports_gain_kappa_for_ordinal_grades_and_operating_points_for_binary_tasks():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, 120)
    probs = rng.dirichlet(np.ones(5), 120)
    probs[np.arange(120), labels] += 1.0
    probs /= probs.sum(axis=1, keepdims=True)
    output = EvalOutput(labels, probs, [f"p{i}" for i in range(120)], 0.0)
    ordinal = report_metrics(evaluate_split(output, None, 0, ordinal=True))
    assert ordinal["kappa_quadratic"] == pytest.approx(cohen_kappa_score(labels, probs.argmax(1), weights="quadratic"))
    assert ordinal["kappa_linear"] == pytest.approx(cohen_kappa_score(labels, probs.argmax(1), weights="linear"))
    assert len(ordinal["kappa_quadratic_ci95"]) == 2 and "sensitivity_at_specificity" not in ordinal
    assert "kappa_quadratic" not in report_metrics(evaluate_split(output, None, 0))
    labels, p1 = scores(n=120, seed=6)
    binary = report_metrics(evaluate_split(EvalOutput(labels, np.stack([1 - p1, p1], 1), [None] * 120, 0.0), 0.5, 0))
    assert set(binary["sensitivity_at_specificity"]) == {"0.9", "0.95"} and "kappa_quadratic" not in binary
    assert json.loads(json.dumps(binary, allow_nan=False)) == binary


def test_undefined_operating_points_are_null():
    m = compute_metrics(np.zeros(6, int), np.full(6, 0.3), n_boot=50)
    assert m["sensitivity_at_specificity"]["0.9"] == {"value": None, "ci95": None}


@pytest.mark.parametrize("good", ["youden", "logistic", "sensitivity@0.95", "specificity@.9", "sensitivity@1.0"])
def test_threshold_targets_in_recipes(good):
    recipe = load_recipe_from_dict({"name": "t"}, [f"train.threshold={good}"])
    assert recipe.train.threshold == good


@pytest.mark.parametrize("bad", ["sens@0.9", "sensitivity@1.5", "specificity@0", "sensitivity@", "ppv@0.9", "0.3"])
def test_bad_threshold_targets_name_the_key(bad):
    with pytest.raises(RecipeError, match="train.threshold.*sensitivity@0.95"):
        load_recipe_from_dict({"name": "t"}, [f"train.threshold={bad}"])
    with pytest.raises(RecipeError):
        threshold_target(bad)
