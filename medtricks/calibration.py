"""Post-hoc temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks", ICML).

One scalar T > 0 divides every logit: softmax(z / T) keeps each image's ranking of the classes (the argmax decision)
and, for a binary task, the ranking of the images (AUROC); it moves the confidence. (A multi-class one-vs-rest AUROC
can move slightly: p_c of an image depends on its other logits too. Minimizing the NLL does not promise a lower ECE
either, which the report shows before and after.)

T is fitted on the validation split by minimizing its negative log-likelihood, after the epoch was selected there;
`train.calibrate: temperature` stores T in model.json and every command that opens the run applies it inside the
model (MedModel.temperature), so evaluate, predict, compare, attack and corrupt all see the calibrated
probabilities, and the binary threshold is chosen on them.

Written here: scikit-learn's CalibratedClassifierCV refits a sigmoid or isotonic map per class (which can change
the ranking) and torch has no temperature scaling; the fit is a one-dimensional bounded minimization (SciPy).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

logger = logging.getLogger(__name__)

TEMPERATURES = (0.05, 20.0)  # the range searched; a model.json outside it was edited
_LOG_T_BOUNDS = (np.log(TEMPERATURES[0]), np.log(TEMPERATURES[1]))


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """log p, the logits up to a per-image constant (which softmax ignores); a probability that underflowed to 0 is
    taken as the smallest positive float."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), np.finfo(np.float64).tiny))


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities a model gives after dividing its logits by T (T = 1: unchanged)."""
    return np.exp(log_softmax(_log_probs(probs) / temperature, axis=1))


def nll(labels: np.ndarray, probs: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(log p / T)."""
    log_p = log_softmax(_log_probs(probs) / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]))


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> dict:
    """The temperature minimizing the NLL of `labels` under `probs` (validation predictions at T = 1).

    Returns:
        {"temperature", "nll_before", "nll_after"}; T = 1 (nll_after = nll_before) when no T in [0.05, 20] lowers
        the NLL, so fitting never raises it on the images it was fitted on.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(labels) != len(probs) or not len(labels):
        raise ValueError(f"fit_temperature needs (N,) labels and (N, C) probabilities; got {labels.shape} and "
                         f"{probs.shape}.")
    before = nll(labels, probs)
    fit = minimize_scalar(lambda log_t: nll(labels, probs, float(np.exp(log_t))), bounds=_LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    temperature, after = float(np.clip(np.exp(fit.x), *TEMPERATURES)), float(fit.fun)  # exp(log(b)) may miss b
    if not after < before:
        temperature, after = 1.0, before
    if any(abs(fit.x - bound) < 1e-3 for bound in _LOG_T_BOUNDS):
        logger.warning("temperature scaling: the fit reached its bound T = %.3g (validation NLL %.4f -> %.4f); the "
                       "validation split may be too small or separable.", temperature, before, after)
    return {"temperature": temperature, "nll_before": before, "nll_after": after}
