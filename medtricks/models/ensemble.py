"""An ensemble of models of one task: the log of the mean of their softmax probabilities, so every scorer and every
attack reads it as logits (an attack on it is an attack on the averaged prediction, with gradients through every
member)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class EnsembleModel(nn.Module):
    """Members that take the same images and give the same classes; forward = log(mean_m softmax(member_m(x)))."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members; got {len(members)}.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_probability_logits([member(x) for member in self.members])


def mean_probability_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the softmax probabilities of several logits of the same images: logits again, whose
    softmax is that mean (an ensemble's members, or test-time views of one model)."""
    probs = torch.stack([z.float().softmax(-1) for z in logits]).mean(0)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
