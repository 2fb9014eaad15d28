import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from medtricks.metrics import bootstrap_auroc_ci
from medtricks.stats import delong_test, detectable_difference, mcnemar_test, paired_bootstrap, paired_difference


def _delong_reference(labels, a, b):
    """DeLong et al. 1988 from the definition: placement values with the O(m n) kernel."""
    labels = np.asarray(labels)
    comps = []
    for s in (np.asarray(a), np.asarray(b)):
        x, y = s[labels == 1], s[labels == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        comps.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = len(comps[0][1]), len(comps[0][2])
    s10 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s01 = np.cov(np.vstack([comps[0][2], comps[1][2]]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = comps[0][0] - comps[1][0]
    return comps[0][0], comps[1][0], diff / np.sqrt(var)


def test_delong_matches_the_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    a = np.round(labels + rng.normal(0, 1.0, 120), 1)  # rounding makes ties
    b = np.round(labels + rng.normal(0, 1.5, 120), 1)
    result = delong_test(labels, a, b)
    auc_a, auc_b, z = _delong_reference(labels, a, b)
    assert result["auroc_a"] == pytest.approx(auc_a) == pytest.approx(roc_auc_score(labels, a))
    assert result["auroc_b"] == pytest.approx(auc_b)
    assert result["z"] == pytest.approx(z)
    assert result["p_value"] == pytest.approx(2 * sps.norm.sf(abs(z)))
    assert result["ci95"][0] < result["difference"] < result["ci95"][1]


def test_delong_identical_models_and_missing_class():
    labels = [0, 1, 0, 1, 1]
    scores = [0.1, 0.8, 0.3, 0.6, 0.9]
    assert delong_test(labels, scores, scores)["p_value"] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])


def test_mcnemar_exact_by_hand():
    correct_a = [True] * 10 + [False] * 2 + [True] * 50
    correct_b = [False] * 10 + [True] * 2 + [True] * 50
    result = mcnemar_test(correct_a, correct_b)
    assert (result["a_only"], result["b_only"]) == (10, 2)
    assert result["p_value"] == pytest.approx(2 * (66 + 12 + 1) / 4096)  # 2 x P(X >= 10), X ~ Bin(12, 1/2)
    assert mcnemar_test([True, False], [True, False])["p_value"] == 1.0


@pytest.mark.slow
def test_paired_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(20):
        labels = rng.integers(0, 2, 300)
        a = labels * 1.0 + rng.normal(0, 1.0, 300)  # true AUROC Phi(1/sqrt(2)) = 0.760
        b = labels * 0.5 + rng.normal(0, 1.0, 300)  # true AUROC Phi(0.5/sqrt(2)) = 0.638
        truth = sps.norm.cdf(1 / np.sqrt(2)) - sps.norm.cdf(0.5 / np.sqrt(2))
        lo, hi = paired_bootstrap(labels, a, b, roc_auc_score, n_boot=200, seed=int(rng.integers(1000)))["ci95"]
        covered += lo <= truth <= hi
    assert covered >= 16


def test_paired_bootstrap_by_patient_is_wider_for_clustered_images():
    rng = np.random.default_rng(2)
    labels = np.repeat(rng.integers(0, 2, 60), 4)
    a = np.repeat(rng.normal(0, 1, 60), 4) + labels
    b = np.repeat(rng.normal(0, 1, 60), 4) + 0.5 * labels
    groups = np.repeat([f"p{i}" for i in range(60)], 4)
    per_image = paired_bootstrap(labels, a, b, roc_auc_score, n_boot=300, seed=0)["ci95"]
    per_patient = paired_bootstrap(labels, a, b, roc_auc_score, groups=groups, n_boot=300, seed=0)["ci95"]
    assert per_patient[1] - per_patient[0] > 1.4 * (per_image[1] - per_image[0])


def test_paired_bootstrap_draws_the_replicates_of_report_json():
    """One resampling engine: against a model whose AUROC is 0.5 in every replicate (constant scores), the paired
    interval is report.json's patient-level AUROC interval of the other model, shifted by 0.5 (same seed, same
    draws). Percentiles differ only in interpolation, far below the tolerance."""
    rng = np.random.default_rng(4)
    labels = np.repeat(rng.integers(0, 2, 50), 3)
    a = np.repeat(rng.normal(0, 1, 50), 3) + labels
    groups = np.repeat([f"p{i}" for i in range(50)], 3)
    paired = paired_bootstrap(labels, a, np.zeros_like(a), roc_auc_score, groups=groups, n_boot=400, seed=7)
    lo, hi = bootstrap_auroc_ci(labels, a, groups=groups, n_boot=400, seed=7)
    assert paired["ci95"] == pytest.approx([lo - 0.5, hi - 0.5], abs=1e-9)


def test_paired_difference_t_interval_and_verdicts():
    a, b = [0.80, 0.82, 0.79, 0.83, 0.81], [0.75, 0.78, 0.74, 0.77, 0.76]
    result = paired_difference(a, b)
    reference = sps.ttest_rel(a, b).confidence_interval(0.95)
    assert result["ci95"] == pytest.approx([reference.low, reference.high])
    assert result["verdict"] == "helps" and paired_difference(b, a)["verdict"] == "hurts"
    assert paired_difference([0.8, 0.7, 0.9], [0.75, 0.8, 0.85])["verdict"] == "no detectable effect"
    assert paired_difference([0.8], [0.7])["verdict"] == "no detectable effect"


def test_paired_bootstrap_skips_replicates_where_auroc_is_nan():
    import warnings

    labels = np.array([0] * 2 + [1] * 18)  # many replicates draw no negative: sklearn warns and returns NaN
    rng = np.random.default_rng(0)
    a, b = rng.random(20), rng.random(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = paired_bootstrap(labels, a, b, roc_auc_score, n_boot=400, seed=1)
    assert result["replicates"] < 400
    assert all(np.isfinite(result["ci95"]))


def test_detectable_difference_by_hand_and_none_below_two_pairs():
    expected = (sps.t.ppf(0.975, 4) + sps.t.ppf(0.8, 4)) * 0.02 / np.sqrt(5)
    assert detectable_difference(0.02, 5) == pytest.approx(expected)
    assert detectable_difference(0.02, 1) is None and detectable_difference(None, 5) is None
    assert detectable_difference(0.02, 20) < detectable_difference(0.02, 5)  # more pairs, smaller effects


@pytest.mark.parametrize("n", [5, 10])
def test_an_effect_of_the_detectable_size_is_found_about_80_percent_of_the_time(n):
    """Simulated paired differences with true mean = the detectable difference for their sd: the t interval of
    paired_difference excludes 0 in about 80% of 4000 designs (the formula is the usual approximation: 0.75-0.85)."""
    rng = np.random.default_rng(0)
    effect = detectable_difference(1.0, n)
    found = np.mean([paired_difference(rng.normal(effect, 1.0, n), np.zeros(n))["verdict"] == "helps"
                     for _ in range(4000)])
    assert 0.75 <= found <= 0.85, found


def test_delong_is_undefined_not_infinite_when_the_auroc_difference_has_no_variance():
    """Six images where A ranks perfectly and B inversely: the variance estimate is 0 and z was written as
    Infinity (invalid JSON) with a made-up p = 0."""
    from medtricks.compare import compare_predictions

    labels = np.array([0, 0, 0, 1, 1, 1])
    a, b = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert delong_test(labels, a, b) is None
    assert delong_test(labels, a, a)["p_value"] == 1.0  # no difference, no variance: p = 1 stays
    result = compare_predictions(labels, np.c_[1 - a, a], np.c_[1 - b, b], n_boot=200)
    assert result["auroc"]["delong"] is None and "DeLong's test is undefined" in result["auroc"]["note"]


def test_json_never_holds_nan_or_infinity(tmp_path):
    import json

    from medtricks.files import write_json

    write_json(tmp_path / "r.json", {"z": float("inf"), "p": [float("nan"), 0.5], "n": 3, "ok": np.float64(0.25)})
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token}")) == \
        {"z": None, "p": [None, 0.5], "n": 3, "ok": 0.25}


def test_json_lines_and_printed_json_never_hold_nan(tmp_path):
    """metrics.jsonl gets a row per epoch; a diverging epoch (loss NaN) was written as a bare NaN token."""
    import json

    from medtricks.files import append_jsonl, to_json

    append_jsonl(tmp_path / "m.jsonl", {"epoch": 1, "train_loss": 0.5})
    append_jsonl(tmp_path / "m.jsonl", {"epoch": 2, "train_loss": float("nan"), "val": {"auroc": float("-inf")}})
    rows = [json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token}"))
            for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": None, "val": {"auroc": None}}]
    assert to_json({"auroc": float("nan")}) == '{"auroc": null}'
