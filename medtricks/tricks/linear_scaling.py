"""Linear learning-rate scaling: the peak learning rate grows in proportion to the batch size.

Paper: Goyal et al. 2017 "Accurate, large minibatch SGD" (arXiv 1706.02677); He et al. 2019 "Bag of Tricks"
    (arXiv 1812.01187) sec 3.1: lr = 0.1 x batch / 256.
Hook: schedule (the peak lr, computed once before the optimizer is built; warmup and decay multiply it).
Defaults: base_batch 256 (the recipe's `train.lr` is the lr for a batch of 256).
Interactions: warmup ramps up to the scaled lr (large scaled lrs need it); per-stage `model.lr_multipliers` multiply
    the scaled lr; with gradient accumulation pass the effective batch. Small medical batches (16-64) give lrs 4-16x
    below the recipe's `train.lr`.
Measured effect: RetinaMNIST -0.008 [-0.041, +0.025], no detectable effect; ISIC UDA-1 -0.053 [-0.242, +0.135], no
    detectable effect; PneumoniaMNIST -0.149 [-0.386, +0.088], no detectable effect (README, "The tricks study": added
    to a plain fine-tune of efficientnet_lite0 at 64 px, 5-fold cross-validation scored on the held-out folds, Δ AUROC
    with − without, mean of 5 paired folds with a 95% t interval); at twice the recipe's batch, the lr scaled with the
    batch vs kept as tuned for the recipe's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from medtricks.errors import RecipeError


@dataclass(frozen=True)
class LinearScalingConfig:
    """Recipe keys under `tricks.linear_scaling`.

    Attributes:
        base_batch: the batch size (images per optimizer step, >= 1) that `train.lr` is quoted for.
    """

    base_batch: int = 256

    def __post_init__(self) -> None:
        if not self.base_batch >= 1:
            raise RecipeError(f"tricks.linear_scaling.base_batch = {self.base_batch} must be >= 1 (the paper: 256).")


def scaled_lr(base_lr: float, batch_size: int, base_batch: int = 256) -> float:
    """The learning rate for `batch_size` given `base_lr` for `base_batch` (He et al.: 0.1 x b / 256).

    Args:
        base_lr: learning rate at `base_batch` (> 0).
        batch_size: images per optimizer step (>= 1).
        base_batch: the reference batch size (>= 1).

    Returns:
        base_lr * batch_size / base_batch.

    Example:
        >>> scaled_lr(0.1, 64)
        0.025
    """
    if batch_size < 1 or base_batch < 1:
        raise ValueError(f"batch_size {batch_size} and base_batch {base_batch} must be >= 1.")
    return base_lr * batch_size / base_batch
