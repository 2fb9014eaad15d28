"""Paired statistics for comparing two models or two training variants honestly.

- `delong_test`: are two AUROCs on the same images different? DeLong et al. 1988, with the fast midrank
  algorithm of Sun & Xu 2014 (no reference implementation in scikit-learn or scipy).
- `mcnemar_test`: are two classifiers' accuracies on the same images different? Exact binomial test on the
  discordant pairs (scipy's binomtest), the recommended form for small counts.
- `paired_bootstrap`: interval of a metric difference, resampling patients (clusters) when ids exist.
- `holm_adjust`: Holm's family-wise adjustment of several p-values (e.g. one DeLong test per finding).
- `paired_difference`: mean paired difference over seeds with a t interval, and a plain verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps

from medtricks.bootstrap import cluster_draws, group_index, too_few_units


def _midranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1-based) with ties given their average rank."""
    return sps.rankdata(x, method="average")


def delong_test(labels: Sequence[int], scores_a: Sequence[float], scores_b: Sequence[float]) -> dict | None:
    """Two-sided DeLong test for the difference of two correlated AUROCs (binary labels, 1 = positive).

    Returns:
        {"auroc_a", "auroc_b", "difference" (a - b), "se", "z", "p_value", "ci95": [lo, hi]}; None where the test is
        undefined: the AUROCs differ but the variance estimate is 0 (too few images).

    Raises:
        ValueError: when a class is missing or the inputs have different lengths.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.vstack([np.asarray(scores_a, float), np.asarray(scores_b, float)])
    if scores.shape[1] != len(labels):
        raise ValueError("labels and scores must have the same length")
    pos, neg = scores[:, labels == 1], scores[:, labels == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong's test needs both classes among the labels")
    tx = np.vstack([_midranks(p) for p in pos])
    ty = np.vstack([_midranks(q) for q in neg])
    tz = np.vstack([_midranks(np.concatenate([p, q])) for p, q in zip(pos, neg, strict=True)])
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # and of the negatives
    cov = np.cov(v01) / m + np.cov(v10) / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0 and diff != 0:  # a difference with no variance (a handful of images): z would be infinite, p 0
        return None
    if se == 0:
        z, p = 0.0, 1.0
    else:
        z = diff / se
        p = float(2 * sps.norm.sf(abs(z)))
    half = 1.959963984540054 * se
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": diff, "se": se, "z": float(z),
            "p_value": p, "ci95": [diff - half, diff + half]}


def mcnemar_p_value(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (a right and b wrong, and the reverse); sums of
    counts over disjoint image sets (e.g. cross-validation folds) are counts too."""
    return 1.0 if a_only + b_only == 0 else float(sps.binomtest(a_only, a_only + b_only, 0.5).pvalue)


def mcnemar_test(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test: do two classifiers err on the same images at different rates?

    Returns:
        {"a_only" (a right, b wrong), "b_only", "accuracy_difference" (a - b), "p_value"}.
    """
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError("both classifiers must be scored on the same images")
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = mcnemar_p_value(a_only, b_only)
    return {"a_only": a_only, "b_only": b_only, "accuracy_difference": float(a.mean() - b.mean()) if len(a) else 0.0,
            "p_value": p}


def paired_bootstrap(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     metric: Callable[[np.ndarray, np.ndarray], float], groups: Sequence[str] | None = None,
                     n_boot: int = 2000, seed: int = 0, needs: Mapping[str, np.ndarray] | None = None) -> dict:
    """Percentile 95% interval of metric(a) - metric(b) on the same images, resampling groups (patients) with
    replacement when given, else images (the draws of report.json's intervals, `cluster_draws`). Replicates where the
    metric is undefined (e.g. one class: an error or NaN) are skipped. No interval (logged) from a single patient, or
    where a group in `needs` (as in cluster_bootstrap) has one."""
    labels, scores_a, scores_b = np.asarray(labels), np.asarray(scores_a), np.asarray(scores_b)
    images = np.arange(len(labels))
    group_of = group_index(groups, len(labels))
    diffs = []
    for weights in ([] if too_few_units(group_of, needs, "paired bootstrap") else
                    cluster_draws(group_of, n_boot, seed)):
        for row in weights.astype(np.int64):
            take = np.repeat(images, row)  # each image as often as its patient was drawn
            try:
                diff = metric(labels[take], scores_a[take]) - metric(labels[take], scores_b[take])
            except ValueError:
                continue
            if np.isfinite(diff):  # scikit-learn's AUROC gives NaN (with a warning) when a replicate has one class
                diffs.append(diff)
    observed = metric(labels, scores_a) - metric(labels, scores_b)
    lo, hi = (np.percentile(diffs, [2.5, 97.5]).tolist() if len(diffs) >= 100 else [None, None])
    return {"difference": float(observed), "ci95": [lo, hi], "replicates": len(diffs)}


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (Holm 1979), controlling the family-wise error rate over the p-values
    given; None entries (no test) are left out of the family and stay None. Written here because scipy has only
    false-discovery-rate adjustments (false_discovery_control) and statsmodels' multipletests is not a dependency.
    An adjusted p below 0.05 rejects at family-wise 5%."""
    tested = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(tested)):  # smallest first, multiplied by the number still in the family
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_difference(values_a: Sequence[float], values_b: Sequence[float]) -> dict:
    """Mean of the paired differences a - b (e.g. a trick on vs off, per seed) with a 95% t interval and a verdict:
    "helps" (interval above 0), "hurts" (below 0) or "no detectable effect" (spans 0, or fewer than 2 pairs)."""
    d = np.asarray(values_a, float) - np.asarray(values_b, float)
    if len(d) < 2:
        mean = float(d.mean()) if len(d) else 0.0
        return {"difference": mean, "ci95": [None, None], "n": len(d), "verdict": "no detectable effect"}
    mean, sem = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    half = float(sps.t.ppf(0.975, len(d) - 1) * sem)
    lo, hi = mean - half, mean + half
    verdict = "helps" if lo > 0 else "hurts" if hi < 0 else "no detectable effect"
    return {"difference": mean, "ci95": [lo, hi], "n": len(d), "verdict": verdict}



def detectable_difference(sd: float | None, n: int, power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The smallest true mean difference that paired_difference's two-sided 95% t interval excludes 0 for with
    probability `power`, when n paired differences spread with standard deviation `sd`:
    (t_{1-alpha/2} + t_{power}) x sd / sqrt(n), n - 1 degrees of freedom (the usual approximation of the
    noncentral t power with t quantiles). None with fewer than 2 pairs or no sd. A "no detectable effect" verdict
    rules out effects larger than this, not smaller ones."""
    if n < 2 or sd is None or not np.isfinite(sd):
        return None
    return float((sps.t.ppf(1 - alpha / 2, n - 1) + sps.t.ppf(power, n - 1)) * sd / np.sqrt(n))
