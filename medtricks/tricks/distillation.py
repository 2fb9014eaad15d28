"""Knowledge distillation: the student also matches the temperature-softened predictions of a trained teacher.

Paper: Hinton et al. 2015 "Distilling the knowledge in a neural network" (arXiv 1503.02531); He et al. 2019
    "Bag of Tricks" (arXiv 1812.01187) sec 5.3 (T = 20, hard-label weight 0.5).
Hook: training step (the teacher's logits for the same, possibly mixed, batch) and loss (`distillation_loss`).
Defaults: temperature 20.0, weight 0.5 (half hard-label cross-entropy, half soft term); teacher is required.
Interactions: the teacher sees the same mixed batch as the student under mixup/cutmix; label smoothing and
    class_balance's loss weights act on the hard term only (`smoothing`, `class_weights`), and a teacher trained with
    label smoothing distills worse; the teacher runs in eval mode
    without gradients, and doubles the forward cost per step.
Measured effect: not yet measured
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medtricks.errors import RecipeError, short


@dataclass(frozen=True)
class DistillationConfig:
    """Recipe keys under `tricks.distillation`.

    Attributes:
        teacher: path of an earlier run directory whose model is the teacher (the trainer loads it).
        temperature: softmax temperature T > 0 for both teacher and student in the soft term.
        weight: weight in [0, 1] of the soft term; the hard-label cross-entropy gets 1 - weight.
    """

    teacher: str
    temperature: float = 20.0
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise RecipeError(f"tricks.distillation.teacher = {short(self.teacher)} must be the path of an earlier run "
                              f"directory (the teacher model).")
        if not self.temperature > 0:
            raise RecipeError(f"tricks.distillation.temperature = {self.temperature} must be > 0 (the paper: 20).")
        if not 0.0 <= self.weight <= 1.0:
            raise RecipeError(f"tricks.distillation.weight = {self.weight} must be in [0, 1] (the weight of the "
                              f"soft term; the paper: 0.5).")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float, weight: float, smoothing: float = 0.0,
                      class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al.'s loss: (1 - weight) * CE(student, targets) + weight * T^2 * KL(teacher_T || student_T).

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al. sec 2).

    Args:
        student_logits: (N, C) logits of the model being trained.
        teacher_logits: (N, C) logits of the teacher for the same batch (detached here).
        targets: (N,) class indices or (N, C) probabilities.
        temperature: T > 0.
        weight: in [0, 1], the weight of the soft term.
        smoothing: label smoothing in [0, 1) of the hard term.
        class_weights: optional (C,) per-class weights of the hard term (class_balance mode loss).

    Returns:
        A scalar tensor; the KL is summed over classes and averaged over the batch ("batchmean").
    """
    hard = F.cross_entropy(student_logits, targets, weight=class_weights, label_smoothing=smoothing)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits.detach() / temperature, dim=1), log_target=True,
                    reduction="batchmean")
    return (1.0 - weight) * hard + weight * temperature**2 * soft
