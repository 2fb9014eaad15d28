"""Zero gamma: the BatchNorm that closes each residual branch gets gamma = 0, so the branch outputs only its beta.

With `beta: zero` too, each reset block starts exactly as its shortcut (He et al.'s initialization); with the
pretrained beta kept (the default) it starts as shortcut + beta, a per-channel constant that can be large (up to
about 5 in efficientnet_lite0's blocks.1.1), so the pretrained features change more than "identity" suggests.

Paper: He et al. 2019 "Bag of Tricks" (arXiv 1812.01187) sec 3.1 (at random initialization); Goyal et al. 2017
    (arXiv 1706.02677). Here applied to a *pretrained* model's chosen stages after its weights are loaded (see
    medtricks.models.surgery; Raghu et al. 2019 "Transfusion" on re-initializing BN in transfer).
Hook: model build (once, after the pretrained weights are in; never inside the training loop).
Defaults: stages None (every stage with residual blocks), beta keep (see above). Resetting only later stages (e.g.
    [layer3, layer4]) is the variant that often helped on X-ray transfer (DESIGN.md).
Interactions: the same as a `model.bn_reset` entry {gamma: zero, which: last_in_block}: don't list a stage in both;
    never on frozen stages (their blocks would stay switched off); DenseNet has no residual blocks (error); with
    no_bias_decay the zeroed gammas are not decayed.
Measured effect: RetinaMNIST early -0.005 [-0.067, +0.058], no detectable effect; RetinaMNIST middle +0.022 [-0.018,
    +0.062], no detectable effect; RetinaMNIST late -0.006 [-0.024, +0.012], no detectable effect; ISIC UDA-1 early
    +0.081 [-0.055, +0.216], no detectable effect; ISIC UDA-1 middle +0.051 [-0.048, +0.150], no detectable effect; ISIC
    UDA-1 late +0.047 [-0.022, +0.116], no detectable effect; PneumoniaMNIST early -0.002 [-0.008, +0.004], no
    detectable effect; PneumoniaMNIST middle -0.001 [-0.004, +0.003], no detectable effect; PneumoniaMNIST late +0.002
    [-0.002, +0.006], no detectable effect (README, "The tricks study": added to a plain fine-tune of efficientnet_lite0
    at 64 px, 5-fold cross-validation scored on the held-out folds, Δ AUROC with − without, mean of 5 paired folds with
    a 95% t interval); model.bn_reset gamma zero on the last BN of every residual block of blocks.1-2 (early), 3-4
    (middle) or 5 (late), pretrained beta kept; one-gamma resets in the README.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from medtricks.errors import RecipeError, short
from medtricks.models.surgery import apply_bn_reset, check_stages, residual_bns, stage_names

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroGammaConfig:
    """Recipe keys under `tricks.zero_gamma`.

    Attributes:
        stages: stage names (see medtricks.models.surgery.stage_names), or None for every stage with residual blocks.
        beta: keep | zero (zero with gamma 0 makes each residual branch output exactly 0).
    """

    stages: tuple[str, ...] | None = None
    beta: str = "keep"

    def __post_init__(self) -> None:
        if self.stages is not None:
            object.__setattr__(self, "stages", tuple(self.stages))  # a list from a notebook stays hashable
            if not self.stages:
                raise RecipeError("tricks.zero_gamma.stages = [] is empty; name stages such as [layer3, layer4], or "
                                  "leave the key out for every stage with residual blocks.")
        if self.beta not in ("keep", "zero"):
            raise RecipeError(f"tricks.zero_gamma.beta = {short(self.beta)} must be 'keep' or 'zero'.")


def apply_zero_gamma(model: nn.Module, stages: Sequence[str] | None = None, beta: str = "keep") -> list[str]:
    """Zero the gamma of the BN closing every residual branch in `stages`, in place.

    Args:
        model: a MedModel with its (pretrained) weights loaded.
        stages: stage names, or None for every stage that has residual blocks.
        beta: "keep" or "zero".

    Returns:
        The names of the BN layers that were reset (relative to model.backbone).

    Raises:
        RecipeError: an unknown stage, a stage without residual blocks, or an architecture without any.
    """
    if stages is None:
        stages = [s for s, found in residual_bns(model, stage_names(model)).items() if found]
        if not stages:
            raise RecipeError(f"tricks.zero_gamma: {model.arch} has no residual blocks; remove tricks.zero_gamma or "
                              f"use model.bn_reset with which: all.")
    else:
        stages = check_stages(model.arch, stages, "tricks.zero_gamma.stages")
        empty = [s for s, found in residual_bns(model, stages).items() if not found]
        if empty:
            raise RecipeError(f"tricks.zero_gamma.stages: {empty} of {model.arch} have no residual blocks; remove "
                              f"them.")
    frozen = [s for s in stages if s in getattr(model, "frozen_stages", ())]
    if frozen:
        logger.warning("zero_gamma on frozen stage(s) %s: their residual branches stay switched off.", frozen)
    return apply_bn_reset(model, stages, gamma="zero", which="last_in_block", beta=beta)
