"""Statistics of an image set under many reweightings at once: the engine of the patient-level (cluster)
bootstrap behind every interval in report.json (metrics.py) and the multi-label report (multilabel.py).

Written here, because neither scikit-learn nor scipy has it: scipy.stats.bootstrap resamples observations, not
clusters, and recomputing a scikit-learn metric per replicate is a Python loop over 1000 replicates. A replicate
is a row of image weights (how often each image's patient was drawn; Field & Welsh 2007, "Bootstrapping clustered
data"), and the statistics below (Mann-Whitney AUROC, the ROC curve, Cohen's weighted kappa) take a whole (B, N)
matrix of such rows in one vectorized pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_MIN_VALID_REPLICATES = 100
_BOOT_CHUNK_ELEMENTS = 4_000_000  # replicates x images per vectorized chunk (~32 MB of float64)


def group_index(groups: Sequence[str] | None, n: int) -> np.ndarray:
    """(N,) resampling unit per image: its patient (None ids and groups=None: the image itself)."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"groups must have one patient id per image: {len(groups)} ids for {n} images.")
    keys = [g if g is not None else f"\0image-{i}" for i, g in enumerate(groups)]
    return np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)[1].ravel()


def cluster_draws(group_of: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The cluster-bootstrap replicates, in chunks of (b, N) image weights: each replicate draws the groups with
    replacement and weights every image by how often its group was drawn."""
    if len(group_of) == 0:
        return
    n, n_groups = len(group_of), int(group_of.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(n, n_groups))
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        draws = rng.integers(0, n_groups, size=(b, n_groups)) + n_groups * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(np.float64)
        yield counts[:, group_of]


def too_few_units(group_of: np.ndarray, needs: Mapping[str, np.ndarray] | None, what: str) -> bool:
    """True, with the reason logged, when a bootstrap interval would claim a certainty it does not have: fewer than
    2 resampling units (patients, or images without ids) in all, or all images of a group the statistic compares
    (`needs`: name -> (N,) mask, e.g. the positives and the negatives of an AUROC) from one unit. Every replicate
    then redraws that one patient as a whole, and the interval leaves out how another patient of the group would
    score (two patients, one per class: a zero-width AUROC interval). A group without images is the statistic's
    own concern (it is undefined there)."""
    n_units = len(np.unique(group_of))
    if n_units < 2:
        logger.warning("%s interval not computed: %d resampling unit(s) (patients, or images without ids); a "
                       "bootstrap needs at least 2.", what, n_units)
        return True
    thin = [name for name, mask in (needs or {}).items() if len(np.unique(group_of[np.asarray(mask, bool)])) == 1]
    if thin:
        reasons = "; ".join(f"all images of {name} come from one patient" for name in thin)
        logger.warning("%s interval not computed: %s (or are one image); a bootstrap interval needs at least 2 "
                       "patients in each.", what, reasons)
    return bool(thin)


def cluster_bootstrap(statistic: Callable[[np.ndarray], np.ndarray], group_of: np.ndarray, n_boot: int, seed: int,
               alpha: float, what: str, needs: Mapping[str, np.ndarray] | None = None) -> tuple[float, float] | None:
    """Percentile interval of `statistic` over cluster-bootstrap replicates (`cluster_draws`).

    `statistic` maps (B, N) image weights to (B,) values, NaN where a replicate is undefined (skipped). None, with
    the reason logged, when fewer than 100 replicates were valid, or when a group in `needs` (see too_few_units)
    has one resampling unit.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1); got {alpha}.")
    if n_boot <= 0:
        return None
    if too_few_units(group_of, needs, what):
        return None
    values = np.concatenate([statistic(weights) for weights in cluster_draws(group_of, n_boot, seed)])
    valid = values[np.isfinite(values)]
    if len(valid) < _MIN_VALID_REPLICATES:
        logger.warning("%s interval not computed: only %d of %d bootstrap replicates were defined (need %d); %d "
                       "resampling units are too few or a class is too rare.", what, len(valid), n_boot,
                       _MIN_VALID_REPLICATES, int(group_of.max()) + 1)
        return None
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (ties count 1/2) for each row of image weights (B, N); NaN where a class has no weight."""
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[:, order]
    new = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(new) - 1
    start = np.flatnonzero(new)
    end = np.r_[start[1:], len(s)]
    neg_cum = np.zeros((w.shape[0], len(s) + 1))
    np.cumsum(w * ~pos, axis=1, out=neg_cum[:, 1:])  # neg_cum[:, k]: negative weight among the k lowest scores
    pos_idx = np.flatnonzero(pos)
    below = neg_cum[:, start[group[pos_idx]]]
    tied = neg_cum[:, end[group[pos_idx]]] - below
    w_pos = w[:, pos_idx]
    n_pos, n_neg = w_pos.sum(axis=1), neg_cum[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (w_pos * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def weighted_roc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR), each (B, G + 1), of each row of image weights (B, N) at the G + 1 cuts between distinct scores:
    cut 0 makes nothing positive, cut k the k highest distinct scores; NaN rows where a class has no weight."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ends = np.r_[s[1:] != s[:-1], True]  # the last image of each distinct score
    w, pos = weights[:, order], positive[order]
    zeros = np.zeros((w.shape[0], 1))
    true_pos = np.concatenate([zeros, np.cumsum(w * pos, axis=1)[:, ends]], axis=1)
    false_pos = np.concatenate([zeros, np.cumsum(w * ~pos, axis=1)[:, ends]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return true_pos / true_pos[:, -1:], false_pos / false_pos[:, -1:]


def weighted_kappas(labels: np.ndarray, preds: np.ndarray, n_classes: int, weights: np.ndarray,
                     kind: str) -> np.ndarray:
    """Cohen's weighted kappa for each row of image weights (B, N): 1 - sum(W O) / sum(W E), with O the weighted
    confusion matrix and E the product of its margins (scikit-learn's cohen_kappa_score with sample_weight, for
    many weightings at once); NaN where the chance disagreement is 0."""
    b = weights.shape[0]
    cells = (np.arange(b)[:, None] * n_classes * n_classes + (labels * n_classes + preds)[None, :]).ravel()
    observed = np.bincount(cells, weights=weights.ravel(), minlength=b * n_classes * n_classes)
    observed = observed.reshape(b, n_classes, n_classes)
    total = observed.sum(axis=(1, 2))
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / np.maximum(total, 1e-300)[
        :, None, None]
    distance = np.abs(np.arange(n_classes)[:, None] - np.arange(n_classes)[None, :]).astype(np.float64)
    w = distance ** 2 if kind == "quadratic" else distance
    chance = (w * expected).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = 1.0 - (w * observed).sum(axis=(1, 2)) / chance
    kappa[chance <= 0] = np.nan
    return kappa
