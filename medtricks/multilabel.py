"""Multi-label metrics and decisions (data.task: multilabel): every finding is its own binary task.

Each finding's M is `medtricks.metrics.compute_metrics` of its sigmoid probability (binary: AUROC with its
patient-level bootstrap interval, sensitivity, specificity, f1, ECE and the operating points at the finding's own
threshold, chosen on validation with the recipe's method). The top level of a multi-label M holds the means of the
findings' values, as scikit-learn's average="macro" does: AUROC is the mean over the findings that have both classes
in the labels (null when none has), its interval a cluster bootstrap of that same mean (a replicate in which one of
those findings lacks a class is skipped); sensitivity and specificity average the findings where they are defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medtricks.bootstrap import cluster_bootstrap, group_index, weighted_auroc
from medtricks.metrics import choose_threshold, compute_metrics

MEAN_KEYS = ("accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity", "f1", "ece")


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels int64 (N, L) of 0/1, probs float64 (N, L) in [0, 1])."""
    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.shape != p.shape or p.shape[0] == 0:
        raise ValueError(f"multi-label labels and probs must both have shape (N, L) with N >= 1; got {y.shape} and "
                         f"{p.shape}.")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("multi-label labels must be 0/1 per finding.")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs contain NaN or inf in {int((~np.isfinite(p)).any(axis=1).sum())} rows; did "
                         f"training diverge?")
    return y.astype(np.int64), p


def choose_thresholds(labels: np.ndarray, probs: np.ndarray, method: str = "youden") -> list[float]:
    """One operating threshold per finding (metrics.choose_threshold with `method` on that finding's column; 0.5,
    with a warning, for a finding that has one class only in these labels). Use the validation split."""
    y, p = _check(labels, probs)
    return [choose_threshold(y[:, j], p[:, j], method) for j in range(y.shape[1])]


def predicted_sets(probs: np.ndarray, thresholds: Sequence[float] | None) -> np.ndarray:
    """(N, L) 0/1 decisions: a finding is predicted when its probability is >= its threshold (0.5 when None)."""
    p = np.asarray(probs, dtype=np.float64)
    t = np.full(p.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return (p >= t[None, :]).astype(np.int64)


def label_aurocs(labels: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """Each finding's AUROC (scikit-learn's roc_auc_score(average=None), in its Mann-Whitney form); None for a
    finding with one class only in these labels."""
    y, p = _check(labels, probs)
    ones = np.ones((1, len(y)))
    values = [float(weighted_auroc(p[:, j], y[:, j] == 1, ones)[0]) for j in range(y.shape[1])]
    return [v if np.isfinite(v) else None for v in values]


def mean_auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """The multi-label M's AUROC: the mean of label_aurocs over the findings with both classes (None when none)."""
    return _mean(label_aurocs(labels, probs))


def decision_scores(labels: np.ndarray, probs: np.ndarray, wrong: np.ndarray, names: Sequence[str]) -> dict:
    """Scores of decisions already made (e.g. an attack's per-finding worst case): "accuracy" and "auroc" the means
    over findings (AUROC over those with both classes, None if none), "exact_match" the share of images with every
    finding right, "per_label" {name: {"accuracy", "auroc"}}.

    Args:
        labels: (N, L) multi-hot labels.
        probs: (N, L) probabilities the AUROCs rank.
        wrong: (N, L) bool, each finding's decision wrong.
        names: the findings, keys of per_label.
    """
    aurocs = label_aurocs(labels, probs)
    per_label = {str(name): {"accuracy": float(np.mean(~wrong[:, j])), "auroc": aurocs[j]}
                 for j, name in enumerate(names)}
    return {"accuracy": float(np.mean(~wrong)), "auroc": _mean(aurocs),
            "exact_match": float(np.mean(~wrong.any(axis=1))), "per_label": per_label}


def label_name(label, classes: Sequence[str]) -> str:
    """A label or decision as text for titles and file names: a class index is its class name; a multi-hot row is
    the names of its findings joined by "+" ("none" when empty)."""
    if isinstance(label, int | np.integer):
        return str(classes[int(label)])
    return "+".join(str(name) for name, on in zip(classes, label, strict=True) if on) or "none"


def _mean(values: list) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def compute_multilabel_metrics(labels: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str] | None = None,
                               thresholds: Sequence[float] | None = None, n_boot: int = 1000, seed: int = 0,
                               names: Sequence[str] | None = None) -> dict:
    """The multi-label M: the means over the findings at the top level, `per_label` one binary M per finding.

    Args:
        labels: (N, L) multi-hot labels.
        probs: (N, L) sigmoid probabilities, one per finding.
        patient_ids: (N,) patient id per image (the bootstrap resamples patients); None = images.
        thresholds: (L,) operating thresholds chosen on validation (choose_thresholds); None = 0.5 each.
        n_boot: bootstrap replicates of every interval (0 = none).
        seed: seed of the bootstraps.
        names: the findings' names (data.classes), keys of `per_label`; None = "0", "1", ...

    Returns:
        {"n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity", "f1", "ece",
        "threshold" (None), "thresholds" (list), "per_label": {name: compute_metrics of the finding}}; a finding
        absent from (or present in every image of) the labels has AUROC None, and is left out of the mean AUROC.
        A finding whose positives (or negatives) are all one patient's has no interval of its own; the mean's
        interval still counts it, one of the findings averaged, unless every finding averaged is such.
    """
    y, p = _check(labels, probs)
    n, n_labels = y.shape
    names = [str(j) for j in range(n_labels)] if names is None else [str(name) for name in names]
    if len(names) != n_labels:
        raise ValueError(f"names must name the {n_labels} findings; got {len(names)}.")
    thresholds = [0.5] * n_labels if thresholds is None else [float(t) for t in thresholds]
    if len(thresholds) != n_labels:
        raise ValueError(f"thresholds must hold one threshold per finding: {len(thresholds)} for {n_labels}.")
    per_label = {name: compute_metrics(y[:, j], p[:, j], patient_ids, threshold=thresholds[j], n_boot=n_boot,
                                       seed=seed) for j, name in enumerate(names)}
    ranked = [j for j, name in enumerate(names) if per_label[name]["auroc"] is not None]

    def mean_auroc(weights: np.ndarray) -> np.ndarray:  # NaN where a ranked finding lacks a class: skipped
        return np.mean([weighted_auroc(p[:, j], y[:, j] == 1, weights) for j in ranked], axis=0)

    group_of = group_index(patient_ids, n)
    # a finding whose positives (or negatives) are all one patient's keeps the mean's interval, unless every finding
    # averaged is such: then every replicate redraws the same patients and the interval claims certainty
    thin, thin_findings = {}, set()
    for j in ranked:
        for kind, value in (("positives", 1), ("negatives", 0)):
            if len(np.unique(group_of[y[:, j] == value])) == 1:
                thin[f"the {kind} of {names[j]}"] = y[:, j] == value
                thin_findings.add(j)
    needs = thin if thin_findings == set(ranked) else None
    interval = cluster_bootstrap(mean_auroc, group_of, n_boot, seed, 0.05, "mean AUROC", needs) \
        if ranked else None
    means = {key: _mean([per_label[name][key] for name in names]) for key in MEAN_KEYS}
    return {"n": int(n), **means, "auroc_ci95": None if interval is None else list(interval), "threshold": None,
            "thresholds": thresholds, "per_label": per_label}
