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
        probs = torch.stack([member(x).float().softmax(-1) for member in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
