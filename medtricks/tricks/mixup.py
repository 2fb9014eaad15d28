"""Mixup and CutMix: train on convex combinations of pairs of images and of their label distributions.

Paper: Zhang et al. 2018 "mixup" (arXiv 1710.09412); He et al. 2019 "Bag of Tricks" (arXiv 1812.01187) sec 5.4
    (alpha 0.2); Yun et al. 2019 "CutMix" (arXiv 1905.04899) (alpha 1.0).
Hook: training step (the batch and its one-hot targets are mixed before the forward pass).
Defaults: mixup alpha 0.2, prob 1.0; cutmix alpha 1.0, prob 1.0.
Interactions: targets become (N, C) probabilities, which label_smoothing_loss and distillation_loss take; let at most
    one of mixup/cutmix act on a batch (timm alternates them); the paper trains longer with it (200 epochs, not 120).
    Use with care on medical images: a blended or pasted region can hide a small lesion while its label stays in the
    target, and CutMix assumes the label is proportional to area.
Measured effect: RetinaMNIST +0.009 [-0.025, +0.044], no detectable effect; ISIC UDA-1 +0.062 [-0.016, +0.140], no
    detectable effect; PneumoniaMNIST -0.016 [-0.049, +0.017], no detectable effect (README, "The tricks study": added
    to a plain fine-tune of efficientnet_lite0 at 64 px, 5-fold cross-validation scored on the held-out folds, Δ AUROC
    with − without, mean of 5 paired folds with a 95% t interval); mixup alpha 0.2. cutmix: not in the study; an earlier
    validation-split ablation (exploratory) found AUROC -0.029 [-0.084, +0.025] on RetinaMNIST.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medtricks.errors import RecipeError

# Not torchvision.transforms.v2.MixUp/CutMix: they draw lam from the global RNG (no generator argument) and pair each
# sample with its neighbour (batch.roll), while a run here must be reproducible from its seeded torch.Generator.


def _check(name: str, alpha: float, prob: float) -> None:
    if not alpha > 0:
        raise RecipeError(f"tricks.{name}.alpha = {alpha} must be > 0 (lam ~ Beta(alpha, alpha); mixup uses 0.2, "
                          f"cutmix 1.0).")
    if not 0.0 < prob <= 1.0:
        raise RecipeError(f"tricks.{name}.prob = {prob} must be in (0, 1] (the fraction of batches mixed).")


@dataclass(frozen=True)
class MixupConfig:
    """Recipe keys under `tricks.mixup`.

    Attributes:
        alpha: Beta(alpha, alpha) concentration of the mixing weight lam, > 0 (small alpha: lam near 0 or 1).
        prob: probability in (0, 1] that a batch is mixed.
    """

    alpha: float = 0.2
    prob: float = 1.0

    def __post_init__(self) -> None:
        _check("mixup", self.alpha, self.prob)


@dataclass(frozen=True)
class CutMixConfig:
    """Recipe keys under `tricks.cutmix`.

    Attributes:
        alpha: Beta(alpha, alpha) concentration of the kept-area fraction, > 0 (1.0: uniform).
        prob: probability in (0, 1] that a batch is mixed.
    """

    alpha: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        _check("cutmix", self.alpha, self.prob)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N,) integer labels -> (N, num_classes) float32 one-hot probabilities, on the labels' device."""
    return F.one_hot(labels.long(), num_classes).float()


def _rng(generator: torch.Generator | None) -> np.random.Generator:
    """A numpy generator seeded by one draw of the torch generator: torch has no generator-aware Beta sampler
    (torch.distributions and torch._standard_gamma use the global RNG)."""
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=device).item()
    return np.random.default_rng(seed)


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    perm_device = generator.device if generator is not None else "cpu"
    return torch.randperm(n, generator=generator, device=perm_device).to(device)


def _check_batch(images: torch.Tensor, targets: torch.Tensor, alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha {alpha} must be > 0.")
    if targets.ndim != 2 or not targets.is_floating_point() or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must be (N, C) float probabilities for the {images.shape[0]} images (use "
                         f"one_hot(labels, num_classes)), got shape {tuple(targets.shape)} {targets.dtype}.")


def mix_probability_gate(prob: float, generator: torch.Generator | None = None) -> bool:
    """Whether to mix this batch: True with probability `prob`. Always draws one number from `generator`, so the
    stream of later draws does not depend on `prob` (the trainer's mixup and cutmix gates share one generator)."""
    device = generator.device if generator is not None else "cpu"
    return bool(torch.rand((), generator=generator, device=device).item() < prob)


def mixup_batch(images: torch.Tensor, targets: torch.Tensor, alpha: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix every image with another image of the batch (Zhang et al. 2018).

    lam ~ Beta(alpha, alpha) once per batch and a random permutation `perm` pair the samples; all randomness comes
    from `generator` (the global torch RNG when None), so the same seed gives the same batch.

    Args:
        images: (N, ...) float images, e.g. (N, C, H, W) in [0, 1].
        targets: (N, num_classes) float probabilities (see `one_hot`).
        alpha: Beta concentration, > 0.
        generator: torch generator for lam and the permutation.

    Returns:
        (lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]); images stay in [0, 1]
        when they were.
    """
    _check_batch(images, targets, alpha)
    lam = float(_rng(generator).beta(alpha, alpha))
    perm = _permutation(images.shape[0], generator, images.device)
    return lam * images + (1.0 - lam) * images[perm], lam * targets + (1.0 - lam) * targets[perm]


def cutmix_batch(images: torch.Tensor, targets: torch.Tensor, alpha: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a random box of a paired image into each image (Yun et al. 2019), the targets mixed by area.

    The box has a (1 - lam0) fraction of the image area for lam0 ~ Beta(alpha, alpha), a uniform random centre, and
    is clipped at the borders; the targets use the actual kept fraction lam = 1 - box area / image area. The same
    box and permutation act on the whole batch.

    Args:
        images: (N, C, H, W) float images.
        targets: (N, num_classes) float probabilities (see `one_hot`).
        alpha: Beta concentration, > 0.
        generator: torch generator for lam0, the box centre and the permutation.

    Returns:
        (images with the box taken from images[perm], lam * targets + (1 - lam) * targets[perm]).
    """
    _check_batch(images, targets, alpha)
    if images.ndim != 4:
        raise ValueError(f"cutmix_batch needs (N, C, H, W) images, got shape {tuple(images.shape)}.")
    rng = _rng(generator)
    height, width = images.shape[-2:]
    cut = float(np.sqrt(1.0 - rng.beta(alpha, alpha)))
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
    perm = _permutation(images.shape[0], generator, images.device)
    mixed = images.clone()
    mixed[..., y1:y2, x1:x2] = images[perm][..., y1:y2, x1:x2]
    return mixed, lam * targets + (1.0 - lam) * targets[perm]
