"""Cosine learning-rate decay: after warmup the lr follows half a cosine from its peak down to a floor.

Paper: Loshchilov & Hutter 2017 "SGDR" (arXiv 1608.03983); He et al. 2019 "Bag of Tricks" (arXiv 1812.01187)
    sec 5.1.
Hook: schedule (a multiplier of the peak lr, multiplied with the warmup factor).
Defaults: final_factor 0.0 (the paper's decay to 0: the factor reaches it at step total_steps, one past the last
    step taken, so the last step runs at a small nonzero lr, as with torch's CosineAnnealingLR).
Interactions: replaces step_decay (use one of the two); starts after warmup (start_step = warmup_steps); on
    medical transfer it helped little in the toolkit's experience (see DESIGN.md), so ablate it over seeds.
Measured effect: RetinaMNIST +0.013 [-0.020, +0.047], no detectable effect; ISIC UDA-1 +0.054 [-0.018, +0.126], no
    detectable effect; PneumoniaMNIST -0.001 [-0.005, +0.003], no detectable effect (README, "The tricks study": added
    to a plain fine-tune of efficientnet_lite0 at 64 px, 5-fold cross-validation scored on the held-out folds, Δ AUROC
    with − without, mean of 5 paired folds with a 95% t interval); vs a constant lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medtricks.errors import RecipeError

# A pure function of the step rather than torch's CosineAnnealingLR: before every optimizer step the trainer sets
# each parameter group's lr to base_lr x lr_mult x train.lr_factor(step) (warmup x decay, no torch scheduler), so
# the schedule is testable at any step and resuming needs only the step number.


@dataclass(frozen=True)
class CosineConfig:
    """Recipe keys under `tricks.cosine`.

    Attributes:
        final_factor: the floor the lr decays to, as a fraction of the peak lr, in [0, 1].
    """

    final_factor: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.final_factor <= 1.0:
            raise RecipeError(f"tricks.cosine.final_factor = {self.final_factor} must be in [0, 1] (a fraction of "
                              f"the peak lr; 0 decays to zero).")


def cosine_factor(step: int, start_step: int, total_steps: int, final_factor: float = 0.0) -> float:
    """Cosine decay multiplier, a pure function of the optimizer step.

    Args:
        step: optimizer steps taken so far.
        start_step: the step the decay starts from (usually the end of warmup); before it the factor is 1.
        total_steps: optimizer steps in the run; the factor reaches `final_factor` at this step (one past the last
            step taken).
        final_factor: the floor, in [0, 1].

    Returns:
        1.0 for step <= start_step; final_factor + (1 - final_factor) * (1 + cos(pi * t)) / 2 with
        t = (step - start_step) / (total_steps - start_step) clamped to [0, 1] after.
    """
    if step <= start_step:
        return 1.0
    if total_steps <= start_step:
        return final_factor
    progress = min(1.0, (step - start_step) / (total_steps - start_step))
    return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
