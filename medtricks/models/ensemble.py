"""An ensemble of models of one task: the log of the mean of their softmax probabilities, so every scorer and every
attack reads it as logits (an attack on it is an attack on the averaged prediction, with gradients through every
member). Multi-label members (one sigmoid per finding): the logit of the mean of their sigmoid probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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
    again, whose sigmoid is that mean (each finding averaged on its own)."""
    probs = torch.stack([z.float().sigmoid() for z in logits]).mean(0)
    tiny = torch.finfo(probs.dtype).tiny
    return probs.clamp_min(tiny).log() - (1 - probs).clamp_min(tiny).log()


def mean_probability_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the softmax probabilities of several logits of the same images: logits again, whose
    softmax is that mean (an ensemble's members, or test-time views of one model)."""
    probs = torch.stack([z.float().softmax(-1) for z in logits]).mean(0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
