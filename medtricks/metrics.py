"""Classification metrics for report.json: accuracy, AUROC with a patient-level bootstrap interval, calibration.

scikit-learn computes every point metric (roc_auc_score, balanced_accuracy_score, f1_score, confusion_matrix,
roc_curve). Written here, because scikit-learn lacks them:
- the cluster (patient-level) bootstrap of AUROC, kappa and the operating points: images of one patient are
  correlated, so resampling images instead of patients gives intervals that are too narrow (the engine is
  medtricks.bootstrap);
- the top-label expected calibration error with equal-width bins (Guo et al. 2017, "On Calibration of Modern
  Neural Networks", ICML);
- the binary operating threshold maximizing Youden's J = sensitivity + specificity - 1 (Youden 1950), chosen on
  the validation split so that a well-ranking model with a shifted bias does not look like chance; either the
  empirical maximum (`youden`) or the point where a class-balanced logistic fit of the labels on the score logit
  crosses 1/2 (`logistic`, Platt 1999 scaling used to place the balanced operating point). The empirical maximum is
  decided by the few validation images nearest the boundary and jumps between them on a small or nearly separable
  validation split; the fit uses every image and moves little.

Every value returned by `compute_metrics` is a plain Python float, int, None or list, so `json.dumps` works;
an undefined metric (AUROC when a class is absent from the labels) is None, never NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from medtricks.bootstrap import cluster_bootstrap, group_index, weighted_auroc, weighted_kappas, weighted_roc
from medtricks.recipe import threshold_target
from medtricks.tricks.ordinal_decoding import check_cuts, grade_decisions

logger = logging.getLogger(__name__)



def _as_probs(probs: np.ndarray) -> np.ndarray:
    """(N, C) float64 probabilities; a 1-D array is the positive-class probability of a binary task."""
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim == 1:
        arr = np.stack([1.0 - arr, arr], axis=1)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2 or (N,) for a binary task; got {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError("probs is empty: there are no images to compute metrics on.")
    if not np.all(np.isfinite(arr)):
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"probs contain NaN or inf in {bad} of {arr.shape[0]} rows; did training diverge?")
    return arr


def check_probs(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels int64 (N,), probs float64 (N, C))."""
    p = _as_probs(probs)
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"labels must have shape ({p.shape[0]},) to match probs {p.shape}; got {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"labels must lie in [0, {p.shape[1] - 1}] for {p.shape[1]} classes; got "
                         f"[{y.min()}, {y.max()}] (unlabelled images, label -1, cannot be scored).")
    return y, p


def _missing_classes(labels: np.ndarray, n_classes: int) -> list[int]:
    return sorted(set(range(n_classes)) - set(labels.tolist()))


def choose_threshold(labels: np.ndarray, probs: np.ndarray, method: str = "youden") -> float:
    """The binary operating threshold, estimated on these labels (use the validation split).

    Args:
        labels: (N,) binary labels in {0, 1}.
        probs: (N, 2) probabilities or (N,) positive-class probability, in [0, 1].
        method: `youden`: the threshold maximizing Youden's J = sensitivity + specificity - 1 on these images;
            among thresholds with equal J, the one closest to 0.5. `logistic`: the probability at which a
            logistic regression of the labels on logit(p1), with class-balanced weights and scikit-learn's default
            L2 penalty, predicts 1/2; the balanced-prior posterior crosses 1/2 where the class densities of the
            score cross, which is where J peaks when the fit holds. It falls back to `youden` (with a warning)
            when the fitted slope is not positive (scores that do not rank the classes). A target
            `sensitivity@R`: the highest threshold whose sensitivity here is at least R (the best specificity at
            that sensitivity); `specificity@R`: the lowest threshold whose specificity is at least R.

    Returns:
        Threshold in [0, 1] on the positive-class probability (predict positive when prob >= threshold). Youden
        and target thresholds lie halfway between two adjacent distinct scores of these images, never on one, so
        float noise in a score (another batch size, another device) cannot flip that image's decision. 0.5 (with
        a warning) when only one class is present.
    """
    target = threshold_target(method)
    y, p = check_probs(labels, probs)
    if p.shape[1] != 2:
        raise ValueError(f"choose_threshold is for binary tasks; probs have {p.shape[1]} classes.")
    if len(np.unique(y)) < 2:
        logger.warning("choose_threshold: only class %d is present in the %d labels; using threshold 0.5.",
                       int(y[0]), len(y))
        return 0.5
    if method == "logistic":
        threshold = _logistic_threshold(y, p[:, 1])
        if threshold is not None:
            return threshold
        logger.warning("choose_threshold: the logistic fit of the %d labels on the scores has no positive slope "
                       "(the scores do not rank the classes); using the Youden threshold.", len(y))
    distinct = np.unique(p[:, 1])[::-1]  # descending; cut k makes the k highest distinct scores positive
    tpr, fpr = (rate[0] for rate in weighted_roc(p[:, 1], y == 1, np.ones((1, len(y)))))
    cuts = np.r_[(distinct[0] + 1.0) / 2, (distinct[:-1] + distinct[1:]) / 2, distinct[-1] / 2]
    if distinct[0] >= 1.0:  # a score of exactly 1 (a saturated softmax) is positive at every threshold in [0, 1]
        cuts, tpr, fpr = cuts[1:], tpr[1:], fpr[1:]
    if target is None:
        youden = tpr - fpr
        best = np.flatnonzero(youden >= youden.max() - 1e-12)
        return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])
    rate, value = target
    if rate == "sensitivity":  # always reachable: the lowest cut makes every image positive
        return float(cuts[np.flatnonzero(tpr >= value - 1e-12)[0]])  # the highest cut that reaches it
    keeps = np.flatnonzero(1.0 - fpr >= value - 1e-12)
    if not len(keeps):
        logger.warning("choose_threshold: no threshold reaches specificity %g on these %d images (%d negative "
                       "images score exactly 1); using the highest, specificity %.3f.", value, len(y),
                       int(np.sum((y == 0) & (p[:, 1] >= 1.0))), 1.0 - fpr[0])
        return float(cuts[0])
    return float(cuts[keeps[-1]])  # the lowest cut that keeps it


def _logistic_threshold(labels: np.ndarray, p1: np.ndarray) -> float | None:
    """p where sigmoid(a * logit(p) + b) = 1/2 for the class-balanced L2 logistic fit; None when a <= 0."""
    eps = 1e-6
    p1 = np.clip(p1, eps, 1 - eps)
    z = np.log(p1 / (1 - p1)).reshape(-1, 1)
    fit = LogisticRegression(class_weight="balanced").fit(z, labels)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope <= 0:
        return None
    return float(np.clip(1.0 / (1.0 + np.exp(intercept / slope)), 0.0, 1.0))


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-width confidence bin (lo, hi]: image count, accuracy and mean top-label confidence (0 if empty)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    y, p = check_probs(labels, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    accuracy = np.bincount(index, weights=correct, minlength=n_bins) / safe
    mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / safe
    return counts, accuracy, mean_confidence


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over bins of |B|/N * |accuracy(B) - confidence(B)|.

    Args:
        labels: (N,) class indices in [0, C).
        probs: (N, C) probabilities, or (N,) positive-class probability for a binary task.
        n_bins: number of equal-width confidence bins (lo, hi] over [0, 1]; 15 as in Guo et al.

    Returns:
        ECE in [0, 1]; 0 is perfectly calibrated.
    """
    counts, accuracy, confidence = calibration_bins(labels, probs, n_bins)
    return float(np.sum(counts / counts.sum() * np.abs(accuracy - confidence)))


def bootstrap_auroc_ci(labels: np.ndarray, probs: np.ndarray, groups: Sequence[str] | None = None,
                       n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile bootstrap interval of AUROC, resampling patients (cluster bootstrap) or images.

    Each replicate draws the groups (patients) with replacement and takes all images of each drawn group; without
    groups it draws images. Binary: AUROC of the positive-class probability; multi-class: macro one-vs-rest.
    Replicates in which a class is missing are skipped.

    Args:
        labels: (N,) class indices in [0, C).
        probs: (N, C) probabilities, or (N,) positive-class probability for a binary task.
        groups: (N,) patient id per image; None (the id or the whole argument) = the image is its own group.
        n_boot: number of replicates (1000 is usual; 0 turns the bootstrap off).
        seed: seed of the resampling; the same inputs and seed give the same interval.
        alpha: 1 - coverage, in (0, 1); 0.05 gives a 95% interval.

    Returns:
        (lo, hi) in [0, 1], or None when fewer than 100 replicates were valid (the reason is logged).
    """
    y, p = check_probs(labels, probs)
    n_classes = p.shape[1]

    def statistic(weights: np.ndarray) -> np.ndarray:
        if n_classes == 2:
            return weighted_auroc(p[:, 1], y == 1, weights)
        return np.mean([weighted_auroc(p[:, c], y == c, weights) for c in range(n_classes)], axis=0)  # NaN: absent

    return cluster_bootstrap(statistic, group_index(groups, len(y)), n_boot, seed, alpha, "AUROC",
                             class_masks(y, n_classes))


def class_masks(labels: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """name -> (N,) mask of each class's images: the groups an AUROC compares (cluster_bootstrap's `needs`)."""
    return {f"class {c}": labels == c for c in range(n_classes)}


KAPPA_WEIGHTS = ("quadratic", "linear")


def weighted_kappa(labels: np.ndarray, preds: np.ndarray, n_classes: int, kind: str = "quadratic",
                   groups: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> tuple[float | None, tuple[float, float] | None]:
    """Weighted kappa of ordinal decisions (the DR-grading metric of the EyePACS, APTOS and IDRiD challenges) and
    its cluster-bootstrap interval.

    Args:
        labels, preds: (N,) true and predicted grades in [0, n_classes), in grade order.
        kind: quadratic (disagreement weighted by the squared grade distance) or linear.
        groups, n_boot, seed, alpha: as in bootstrap_auroc_ci.

    Returns:
        (kappa, (lo, hi)); kappa None when undefined (every label and decision in one grade), the interval None
        when n_boot is 0 or too few replicates were defined.
    """
    if kind not in KAPPA_WEIGHTS:
        raise ValueError(f"unknown kappa weighting {kind!r}; choose one of {list(KAPPA_WEIGHTS)}.")
    y, d = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    point = float(weighted_kappas(y, d, n_classes, np.ones((1, len(y))), kind)[0])
    interval = cluster_bootstrap(lambda w: weighted_kappas(y, d, n_classes, w, kind), group_index(groups, len(y)),
                          n_boot, seed, alpha, f"{kind} kappa") if np.isfinite(point) else None
    return (point if np.isfinite(point) else None), interval


OPERATING_RATES = (0.9, 0.95)  # the report's sensitivity at these specificities, and the reverse


def _rate_at(tpr: np.ndarray, fpr: np.ndarray, point: str, target: float) -> np.ndarray:
    """(B,) the best sensitivity among cuts with specificity >= target, or the best specificity among cuts with
    sensitivity >= target; NaN where undefined."""
    if point == "sensitivity_at_specificity":
        value = np.where(1.0 - fpr >= target - 1e-12, tpr, -np.inf).max(axis=1)
    else:
        value = np.where(tpr >= target - 1e-12, 1.0 - fpr, -np.inf).max(axis=1)
    value[~np.isfinite(value)] = np.nan
    return value


def operating_points(labels: np.ndarray, probs: np.ndarray, groups: Sequence[str] | None = None,
                     n_boot: int = 1000, seed: int = 0, rates: Sequence[float] = OPERATING_RATES) -> dict:
    """Sensitivity at fixed specificities and specificity at fixed sensitivities of a binary score (the points a
    screening study reports), each with its cluster-bootstrap interval.

    These are properties of the ROC curve of these images (the best rate any threshold reaches here), not of a
    threshold chosen elsewhere: on a test split they say what the score could do, not what the run's threshold does.

    Returns:
        {"sensitivity_at_specificity": {"0.9": {"value", "ci95"}, ...}, "specificity_at_sensitivity": {...}};
        values None when a class is absent.
    """
    y, p = check_probs(labels, probs)
    if p.shape[1] != 2:
        raise ValueError(f"operating_points is for binary tasks; probs have {p.shape[1]} classes.")
    group_of, needs = group_index(groups, len(y)), class_masks(y, 2)
    tpr, fpr = weighted_roc(p[:, 1], y == 1, np.ones((1, len(y))))
    out = {}
    for point in ("sensitivity_at_specificity", "specificity_at_sensitivity"):
        out[point] = {}
        for rate in rates:
            value = float(_rate_at(tpr, fpr, point, rate)[0])
            if not np.isfinite(value):
                out[point][f"{rate:g}"] = {"value": None, "ci95": None}
                continue
            interval = cluster_bootstrap(lambda w, r=rate, pt=point: _rate_at(*weighted_roc(p[:, 1], y == 1, w), pt, r),
                                  group_of, n_boot, seed, 0.05, point.replace("_", " "), needs)
            out[point][f"{rate:g}"] = {"value": value, "ci95": None if interval is None else list(interval)}
    return out


def auroc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """compute_metrics' AUROC (binary, or macro one-vs-rest) without its interval, None where a class is absent
    from the labels, and without a warning: callers that score many perturbed copies of one set (attacks,
    corruptions) say it once (missing_class_warning)."""
    labels, probs = check_probs(labels, probs)
    if _missing_classes(labels, probs.shape[1]):
        return None
    return compute_metrics(labels, probs, n_boot=0)["auroc"]


def missing_class_warning(labels: np.ndarray, n_classes: int, what: str) -> None:
    """One warning that every AUROC of `what` is null because a class is absent from the labels."""
    missing = _missing_classes(np.asarray(labels), n_classes)
    if missing:
        logger.warning("AUROC undefined: class(es) %s absent from the %d labels; every AUROC of the %s is null.",
                       missing, len(labels), what)


def decisions(probs: np.ndarray, threshold: float | list[float] | None) -> np.ndarray:
    """A run's decisions (every report and command decides this way): binary, class 1 when p1 >= threshold (0.5 when
    None); multi-class, argmax, or the expected grade cut at the grade cuts of tricks.ordinal_decoding."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    return probs.argmax(axis=1) if threshold is None else grade_decisions(probs, threshold)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, patient_ids: Sequence[str] | None = None,
                    threshold: float | None = None, n_boot: int = 1000, seed: int = 0, ordinal: bool = False) -> dict:
    """The metrics `M` of report.json, plus the threshold used and the confusion matrix.

    Binary (C = 2): the positive class is index 1, predicted when probs[:, 1] >= threshold; sensitivity is the
    recall of class 1, specificity the recall of class 0, f1 that of class 1. Multi-class: decisions by argmax (or
    by grade cuts);
    sensitivity is the macro recall, specificity the mean over classes of TN / (TN + FP), f1 the macro F1 and
    AUROC the macro one-vs-rest AUROC. Macro averages run over the classes present in the labels.

    Args:
        labels: (N,) class indices in [0, C).
        probs: (N, C) softmax probabilities, C >= 2 (or (N,) positive-class probability for a binary task).
        patient_ids: (N,) patient id per image, so the AUROC interval resamples patients; None = images.
        threshold: binary operating threshold in [0, 1], chosen on the validation split with `choose_threshold`;
            None = 0.5. Multi-class: None (argmax), or the grade cuts of tricks.ordinal_decoding (decisions cut the
            expected grade).
        n_boot: bootstrap replicates for auroc_ci95 and the other intervals (0 = no interval).
        seed: seed of the bootstrap.
        ordinal: the classes are ordered grades (data.ordinal): add the weighted kappas of the decisions.

    Returns:
        {"n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity", "f1", "ece",
        "threshold", "confusion_matrix"}: rates in [0, 1]; auroc and auroc_ci95 ([lo, hi]) are None when a class
        is absent from the labels; sensitivity/specificity are None when undefined (binary: no positive/negative
        images); confusion_matrix lists all C classes, rows = true class, columns = predicted class. Binary tasks
        add "sensitivity_at_specificity" and "specificity_at_sensitivity" (operating_points); ordinal ones
        "kappa_quadratic", "kappa_quadratic_ci95" and "kappa_linear" (None when undefined).
    """
    y, p = check_probs(labels, probs)
    n, n_classes = p.shape
    if patient_ids is not None and len(patient_ids) != n:
        raise ValueError(f"patient_ids must have one id per image: {len(patient_ids)} ids for {n} images.")
    if n_classes == 2:
        threshold = 0.5 if threshold is None else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (a positive-class probability); got {threshold}.")
    elif threshold is not None:  # grade cuts on the expected grade (tricks.ordinal_decoding)
        if np.ndim(threshold) != 1:
            raise ValueError(f"a threshold number applies to binary tasks only; a {n_classes}-class task takes None "
                             f"(argmax) or the {n_classes - 1} grade cuts of tricks.ordinal_decoding; got {threshold}.")
        threshold = check_cuts(threshold, n_classes)
    preds = decisions(p, threshold)
    cm = confusion_matrix(y, preds, labels=list(range(n_classes)))
    present = [c for c in range(n_classes) if cm[c].sum() > 0]
    recall = [cm[c, c] / cm[c].sum() for c in present]
    true_negatives = n - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm)
    false_positives = cm.sum(axis=0) - np.diag(cm)
    negatives = true_negatives + false_positives
    balanced = None  # the mean recall over classes: undefined while a class is absent (sklearn would average the rest)
    if len(present) == n_classes:
        balanced = balanced_accuracy_score(y, preds)
    if n_classes == 2:
        sensitivity = cm[1, 1] / cm[1].sum() if cm[1].sum() else None
        specificity = cm[0, 0] / cm[0].sum() if cm[0].sum() else None
        # no positive image and none called positive: F1 is 0/0, undefined (sklearn's 0.0 would pull means down)
        f1 = f1_score(y, preds, pos_label=1, average="binary") if cm[1].sum() + cm[0, 1] else None
    else:
        sensitivity = float(np.mean(recall))
        specificity = float(np.mean([true_negatives[c] / negatives[c] for c in range(n_classes) if negatives[c]]))
        f1 = f1_score(y, preds, labels=present, average="macro", zero_division=0.0)

    missing = _missing_classes(y, n_classes)
    auroc, interval = None, None
    if missing:
        logger.warning("AUROC undefined: class(es) %s absent from the %d labels; auroc and auroc_ci95 are null.",
                       missing, n)
    else:
        if n_classes == 2:
            auroc = roc_auc_score(y, p[:, 1])
        else:
            auroc = roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(n_classes)))
        ci = bootstrap_auroc_ci(y, p, groups=patient_ids, n_boot=n_boot, seed=seed)
        interval = None if ci is None else [ci[0], ci[1]]
    extra = {}
    if n_classes == 2:
        extra = operating_points(y, p, patient_ids, n_boot=n_boot, seed=seed)
    if ordinal:
        kappa, kappa_ci = weighted_kappa(y, preds, n_classes, "quadratic", patient_ids, n_boot, seed)
        extra |= {"kappa_quadratic": kappa, "kappa_quadratic_ci95": None if kappa_ci is None else list(kappa_ci),
                  "kappa_linear": weighted_kappa(y, preds, n_classes, "linear", n_boot=0)[0]}
    return extra | {
        "n": int(n),
        "accuracy": float(np.trace(cm) / n),
        "balanced_accuracy": None if balanced is None else float(balanced),
        "auroc": None if auroc is None else float(auroc),
        "auroc_ci95": interval,
        "sensitivity": None if sensitivity is None else float(sensitivity),
        "specificity": None if specificity is None else float(specificity),
        "f1": None if f1 is None else float(f1),
        "ece": expected_calibration_error(y, p),
        "threshold": threshold,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def per_patient_probs(probs: np.ndarray, patient_ids: Sequence[str],
                      labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean probability and label per patient, for users who report patient-level results (optional).

    Args:
        probs: (N, C) probabilities, or (N,) positive-class probability.
        patient_ids: (N,) patient id per image.
        labels: (N,) class indices.

    Returns:
        (probs (P, ...) mean over each patient's images, labels (P,) the patient's most frequent label (ties: the
        lowest), patient ids (P,) sorted), ready for `compute_metrics(labels, probs)`.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if len(patient_ids) != len(p) or len(y) != len(p):
        raise ValueError(f"probs ({len(p)}), patient_ids ({len(patient_ids)}) and labels ({len(y)}) must have "
                         "one entry per image.")
    if len(p) == 0:
        raise ValueError("probs is empty: there are no images to group by patient.")
    if y.min() < 0:
        raise ValueError("labels must be class indices >= 0 (unlabelled images, label -1, cannot be grouped).")
    ids, inverse = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    inverse = inverse.ravel()
    sums = np.zeros((len(ids), *p.shape[1:]))
    np.add.at(sums, inverse, p)
    mean = sums / np.bincount(inverse, minlength=len(ids)).reshape(-1, *([1] * (p.ndim - 1)))
    votes = np.zeros((len(ids), int(y.max()) + 1), dtype=np.int64)
    np.add.at(votes, (inverse, y), 1)
    return mean, votes.argmax(axis=1), ids.tolist()
