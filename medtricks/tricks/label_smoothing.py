"""Label smoothing: the target puts 1 - smoothing on the true class and spreads smoothing evenly over all classes.

Paper: Szegedy et al. 2016 "Rethinking the Inception architecture" (arXiv 1512.00567) sec 7; He et al. 2019
    "Bag of Tricks" (arXiv 1812.01187) sec 5.2 (eps 0.1).
Hook: loss (torch's cross_entropy(label_smoothing=...), which also takes mixup's soft targets); multi-label
    (data.task: multilabel): each finding's 0/1 target becomes y (1 - smoothing) + smoothing / 2 in
    binary_cross_entropy_with_logits (`binary_label_smoothing_loss`: the two-class form of the same rule).
Defaults: smoothing 0.1 (the paper's eps).
Interactions: with mixup/cutmix the soft targets are smoothed as well; a teacher trained with label smoothing is a
    worse distillation teacher (Mueller et al. 2019, arXiv 1906.02629); it changes the confidence of the
    probabilities, so check calibration (ECE) and the validation-chosen threshold; class_balance weights pass
    through `class_weights`.
Measured effect: RetinaMNIST +0.022 [-0.005, +0.048], no detectable effect; ISIC UDA-1 +0.042 [-0.070, +0.155], no
    detectable effect; PneumoniaMNIST -0.003 [-0.006, -0.001], hurts (README, "The tricks study": added to a plain
    fine-tune of efficientnet_lite0 at 64 px, 5-fold cross-validation scored on the held-out folds, Δ AUROC with −
    without, mean of 5 paired folds with a 95% t interval); smoothing 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medtricks.errors import RecipeError


@dataclass(frozen=True)
class LabelSmoothingConfig:
    """Recipe keys under `tricks.label_smoothing`.

    Attributes:
        smoothing: probability mass spread over all classes, in [0, 1).
    """

    smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.smoothing < 1.0:
            raise RecipeError(f"tricks.label_smoothing.smoothing = {self.smoothing} must be in [0, 1) "
                              f"(the paper: 0.1).")


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                         class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against smoothed targets, averaged over the batch.

    Args:
        logits: (N, C) unnormalized scores.
        target: (N,) class indices, or (N, C) class probabilities (each row sums to 1, e.g. from mixup_batch).
        smoothing: in [0, 1); the target becomes (1 - smoothing) * target + smoothing / C.
        class_weights: optional (C,) per-class weights (see class_balance.class_weights).

    Returns:
        A scalar tensor: for index targets mean over samples of -(1 - s) log p_y - s / C sum_c log p_c
        (torch's weighted mean when `class_weights` is given).
    """
    return F.cross_entropy(logits, target, weight=class_weights, label_smoothing=smoothing)


def binary_label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                                pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-label loss: binary cross-entropy with logits against smoothed 0/1 targets, averaged over the batch and
    the findings.

    Args:
        logits: (N, L) unnormalized scores, one per finding.
        target: (N, L) multi-hot targets in [0, 1] (mixup's mixed targets too).
        smoothing: in [0, 1); the target becomes target * (1 - smoothing) + smoothing / 2.
        pos_weight: optional (L,) weight of the positive term per finding (see class_balance.label_pos_weights).
    """
    smoothed = target * (1.0 - smoothing) + smoothing / 2.0
    return F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=pos_weight)
