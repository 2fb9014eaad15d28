"""An ensemble of models of one task: the log of the mean of their softmax probabilities, so every scorer and every
attack reads it as logits (an attack on it is an attack on the averaged prediction, with gradients through every
member). Multi-label members (one sigmoid per finding): the logit of the mean of their sigmoid probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EnsembleModel(nn.Module):
    """Members that take the same images and give the same classes; forward = log(mean_m softmax(member_m(x))), or
    with `multilabel` logit(mean_m sigmoid(member_m(x))) per finding."""

    def __init__(self, members: Sequence[nn.Module], multilabel: bool = False):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members; got {len(members)}.")
        self.members = nn.ModuleList(members)
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = [member(x) for member in self.members]
        return mean_sigmoid_logits(logits) if self.multilabel else mean_probability_logits(logits)


def mean_sigmoid_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logit of the mean of the sigmoid probabilities of several multi-label logits of the same images: logits
    again, whose sigmoid is that mean (each finding averaged on its own).

    log(mean p) - log(mean (1 - p)), each a logsumexp of log-sigmoids (the 1 / M cancels): computing 1 - mean p
    instead rounds to 0 in float32 once p > 1 - 6e-8, which zeroes an attack's gradient at confident images."""
    z = torch.stack([x.float() for x in logits])
    return torch.logsumexp(F.logsigmoid(z), 0) - torch.logsumexp(F.logsigmoid(-z), 0)


def mean_probability_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the softmax probabilities of several logits of the same images: logits again, whose
    softmax is that mean (an ensemble's members, or test-time views of one model)."""
    probs = torch.stack([z.float().softmax(-1) for z in logits]).mean(0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
