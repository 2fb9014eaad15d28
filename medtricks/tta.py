"""Test-time augmentation that respects the modality: average a model's probabilities over the flips its training
augmentation drew (medtricks.recipe.PRESET_FLIPS), never another: no left-right flip of a radiograph.

`evaluate --tta` and `predict --tta` wrap the run's model in `TTAModel`, whose output is the log of the mean softmax
over the views (multi-label: the logit of each finding's mean sigmoid), so every scorer reads it as logits; the
run's decision rule (binary threshold, grade cuts, per-finding thresholds) is then chosen again on its validation
split with the same views, since averaging moves the scores the run's rule was chosen on.

A recipe with `train.tta: true` makes the averaged model the run's own: finetune scores validation and test with it
(threshold and calibration temperature chosen on its averaged validation scores), model.json records the views
(`tta`), and every command that opens the run (evaluate, predict, attack, corrupt, compare, ensemble, ablate)
scores, and attacks, the averaged model; explain maps the network on the image as it is (`unwrap`).

Written here rather than with MONAI's TestTimeAugmentation, which draws random transforms per image and returns their
spread for uncertainty; this is the deterministic flip average of classification TTA (e.g. Simonyan & Zisserman 2015).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from medtricks.models.ensemble import mean_probability_logits, mean_sigmoid_logits
from medtricks.recipe import PRESET_FLIPS

logger = logging.getLogger(__name__)

# view name -> the flips it applies (dims of an (N, C, H, W) batch: -1 horizontal, -2 vertical)
VIEWS = {"identity": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}


def tta_views(preset: str) -> tuple[str, ...]:
    """The views a preset allows: the identity, and each flip (and their product) its training augmentation draws."""
    flips = PRESET_FLIPS[preset]
    views = ["identity"]
    if "horizontal" in flips:
        views.append("hflip")
    if "vertical" in flips:
        views.append("vflip")
    if {"horizontal", "vertical"} <= set(flips):
        views.append("hvflip")
    return tuple(views)


class TTAModel(nn.Module):
    """`model` averaged over `views`: forward returns log(mean over views of softmax(model(view(x)))), or with
    `multilabel` the logit of the mean over views of each finding's sigmoid; divided by `temperature`, the
    calibration of a train.tta run, fitted on these averaged scores (medtricks.calibration; 1 = none)."""

    def __init__(self, model: nn.Module, views: tuple[str, ...], multilabel: bool = False):
        super().__init__()
        unknown = [v for v in views if v not in VIEWS]
        if unknown:
            raise ValueError(f"unknown TTA views {unknown}; choose from {list(VIEWS)}.")
        self.model, self.views = model, tuple(views)
        self.average = mean_sigmoid_logits if multilabel else mean_probability_logits
        self.temperature = 1.0  # not a parameter nor in the state dict, as MedModel.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.average([self.model(x.flip(VIEWS[v]) if VIEWS[v] else x) for v in self.views])
        return logits if self.temperature == 1.0 else logits / self.temperature


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a TTAModel (any other model as it is)."""
    return model.model if isinstance(model, TTAModel) else model


def wrap(model: nn.Module, preset: str, multilabel: bool = False) -> tuple[TTAModel, tuple[str, ...]]:
    """`model` under the views of `preset` (a multi-label model: sigmoids averaged), with a warning when the preset
    allows no flip (only the identity)."""
    views = tta_views(preset)
    if len(views) == 1:
        logger.warning("--tta: the run's augment preset %r draws no flips (%s), so the only view is the image "
                       "itself and the scores are those without --tta.", preset,
                       "left/right anatomy of radiographs" if preset == "cxr" else "no augmentation")
    return TTAModel(model, views, multilabel), views
