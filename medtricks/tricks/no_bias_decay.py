"""No bias decay: weight decay only on conv and linear weights, not on biases or normalization gamma/beta.

Paper: He et al. 2019 "Bag of Tricks" (arXiv 1812.01187) sec 3.1; Jia et al. 2018 (arXiv 1807.11205).
Hook: optimizer groups (each stage's parameters split into a decayed and a non-decayed group).
Defaults: no keys; present = on. Parameters with ndim <= 1 (biases, BN/norm gamma and beta) get weight_decay 0.
Interactions: keeps the per-stage `lr_mult` of model.lr_multipliers; frozen stages are already left out; with
    zero_gamma the zeroed gammas are not pulled further by decay; matters only when `train.weight_decay` > 0.
Measured effect: not measured by the cross-validated study (README, "The tricks study"); an earlier validation-split
    ablation, whose split also selected the epoch (exploratory), found no detectable effect on RetinaMNIST: AUROC -0.004
    [-0.091, +0.082].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoBiasDecayConfig:
    """Recipe keys under `tricks.no_bias_decay`: none (`no_bias_decay: {}` turns it on)."""


def create_param_groups(stage_groups: list[dict], weight_decay: float, no_bias_decay: bool) -> list[dict]:
    """Optimizer parameter groups from per-stage groups, with or without decay on 1-D parameters.

    Args:
        stage_groups: output of medtricks.models.surgery.stage_parameter_groups, each
            {"stage", "params", "names", "lr_mult"}.
        weight_decay: L2 weight decay (>= 0) for the decayed parameters.
        no_bias_decay: True puts parameters with ndim <= 1 in groups with weight_decay 0.0; False decays all.

    Returns:
        [{"params", "weight_decay", "lr_mult", "stage", "decay"}] in stage order (decayed group first in each
        stage), empty groups dropped; pass it to the optimizer, which keeps the extra keys.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay {weight_decay} must be >= 0.")
    groups = []
    for stage in stage_groups:
        params = list(stage["params"])
        decayed = [p for p in params if not no_bias_decay or p.ndim > 1]
        kept = [p for p in params if no_bias_decay and p.ndim <= 1]
        for group_params, decay in ((decayed, True), (kept, False)):
            if group_params:
                groups.append({"params": group_params, "weight_decay": float(weight_decay) if decay else 0.0,
                               "lr_mult": stage["lr_mult"], "stage": stage["stage"], "decay": decay})
    n_decay = sum(len(g["params"]) for g in groups if g["decay"])
    n_kept = sum(len(g["params"]) for g in groups if not g["decay"])
    logger.info("weight decay %g on %d tensors, none on %d tensors (biases and norm gamma/beta; no_bias_decay %s)",
                weight_decay, n_decay, n_kept, "on" if no_bias_decay else "off")
    return groups
