"""Ordinal decoding: decide a grade by cutting the expected grade at cut-points tuned on validation for weighted kappa.

Paper: the decoding of the top Kaggle diabetic-retinopathy solutions (EyePACS 2015, APTOS 2019: a regression output
    "optimized rounder", thresholds searched for quadratic kappa on held-out data); de la Torre et al. 2018 "Weighted
    kappa loss function for multi-class classification of ordinal data" (Pattern Recognition Letters 105) on why
    argmax is the wrong decision for a kappa-scored ordinal task.
Hook: decision rule, after training (medtricks.finetune): the expected grade E = sum_k k p_k of the selected epoch's
    (calibrated) softmax on the validation split is cut at K - 1 increasing points, chosen by coordinate ascent on
    validation weighted kappa, each placed halfway between adjacent distinct validation scores (as the binary
    thresholds are, so float noise flips no validation decision). Stored as model.json's `grade_cuts`; evaluate,
    predict, compare, crossval, explain, ensemble and attack decide with them (the attack through the same cut
    rule). Probabilities, AUROC and ECE are unchanged: only accuracy, kappa and the confusion matrix move.
Defaults: weights quadratic (the challenges' metric); linear maximizes linear kappa.
Interactions: needs data.ordinal: true and at least 3 classes (a recipe error names the key otherwise); the epoch
    is still selected by train.select_metric with argmax decisions (the cuts are fitted once, after selection, and
    after temperature scaling when train.calibrate is on); a small validation split overfits the cuts (120 images
    in RetinaMNIST), so judge it on held-out data; it raises kappa at the cost of accuracy when the classes are
    imbalanced, since it trades exact hits for smaller grade errors.
Measured effect: RetinaMNIST quadratic kappa +0.126 [+0.074, +0.178], accuracy -0.023 [-0.035, -0.011], balanced
    accuracy +0.038 [+0.026, +0.050] (README, footnote 4: benchmarks/ordinal_decoding.py on the 65 runs of the tricks
    study's RetinaMNIST ablation, cuts fitted on each run's own validation split and scored on its held-out fold,
    cuts - argmax, 95% t interval over the 5 folds); AUROC is unchanged by construction. Not measured on IDRiD.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import cohen_kappa_score

from medtricks.errors import RecipeError, short

logger = logging.getLogger(__name__)

MAX_SWEEPS = 20  # coordinate-ascent sweeps over the cuts; it stops earlier once a sweep changes nothing
MAX_CANDIDATES = 256  # cut positions tried per cut: every midpoint on small splits, evenly spaced ones on large


@dataclass(frozen=True)
class OrdinalDecodingConfig:
    """Recipe keys under `tricks.ordinal_decoding`.

    Attributes:
        weights: the weighted kappa the cuts maximize on validation: quadratic or linear.
    """

    weights: str = "quadratic"

    def __post_init__(self) -> None:
        if self.weights not in ("quadratic", "linear"):
            raise RecipeError(f"tricks.ordinal_decoding.weights = {short(self.weights)}; choose quadratic or linear.")


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """(N,) sum_k k p_k of (N, K) class probabilities in grade order."""
    p = np.asarray(probs, dtype=np.float64)
    return p @ np.arange(p.shape[1], dtype=np.float64)


def grade_decisions(probs: np.ndarray, cuts) -> np.ndarray:
    """(N,) grades: the number of cuts at or below each image's expected grade (grade k when cut_k <= E < cut_k+1)."""
    return np.searchsorted(np.asarray(cuts, dtype=np.float64), expected_grade(probs), side="right").astype(np.int64)


def check_cuts(cuts, n_classes: int) -> list[float]:
    """`cuts` as floats when they are n_classes - 1 strictly increasing finite numbers in [0, n_classes - 1]; else a
    ValueError naming what is wrong."""
    values = np.asarray(cuts, dtype=np.float64)
    if values.shape != (n_classes - 1,) or not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0) \
            or values.min() < 0 or values.max() > n_classes - 1:
        raise ValueError(f"grade cuts must be {n_classes - 1} strictly increasing numbers in [0, {n_classes - 1}] "
                         f"(one between each pair of adjacent grades); got {list(np.atleast_1d(cuts))}.")
    return values.tolist()


def fit_grade_cuts(labels: np.ndarray, probs: np.ndarray, weights: str = "quadratic") -> list[float]:
    """Cut-points on the expected grade that maximize weighted kappa on (validation) labels.

    Starts from rounding (cuts at k + 0.5) and moves one cut at a time to the candidate that raises kappa most, a
    candidate being a point halfway between adjacent distinct scores within its neighbours' range; a move must raise
    kappa strictly, so ties keep the rounding cut. At most MAX_CANDIDATES midpoints are tried per cut (evenly spaced
    in score order on a large split). Falls back to rounding, with a warning, when kappa is undefined on these labels
    (a single grade).
    """
    y = np.asarray(labels, dtype=np.int64)
    n_classes = np.asarray(probs).shape[1]
    scores = expected_grade(probs)
    cuts = np.arange(n_classes - 1, dtype=np.float64) + 0.5

    def kappa(c: np.ndarray) -> float:  # scikit-learn's weighted kappa (medtricks.metrics imports this module)
        decided = np.searchsorted(c, scores, side="right")
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")  # undefined kappa (one grade) is handled below
            value = cohen_kappa_score(y, decided, labels=list(range(n_classes)), weights=weights)
        return value if np.isfinite(value) else -np.inf

    best = kappa(cuts)
    if not np.isfinite(best):
        logger.warning("tricks.ordinal_decoding: weighted kappa is undefined on the %d validation labels (one grade); "
                       "keeping the rounding cuts", len(y))
        return cuts.tolist()
    distinct = np.unique(scores)
    candidates = (distinct[:-1] + distinct[1:]) / 2.0
    if len(candidates) > MAX_CANDIDATES:
        candidates = candidates[np.linspace(0, len(candidates) - 1, MAX_CANDIDATES).round().astype(int)]
    for _ in range(MAX_SWEEPS):
        moved = False
        for j in range(n_classes - 1):
            low = cuts[j - 1] if j > 0 else 0.0
            high = cuts[j + 1] if j < n_classes - 2 else n_classes - 1.0
            for candidate in candidates[(candidates > low) & (candidates < high)]:
                trial = cuts.copy()
                trial[j] = candidate
                if (value := kappa(trial)) > best + 1e-12:
                    best, cuts, moved = value, trial, True
        if not moved:
            break
    return check_cuts(cuts, n_classes)
