"""Surgery on a (pretrained) model, done once at model build: BatchNorm resets per stage, freezing stages, and
per-stage learning-rate multipliers.

Why here and not in timm/torchvision: their zero-init options (timm `zero_init_last`, torchvision
`zero_init_residual`, GluonCV `last_gamma`) act at random initialization and are overwritten by loading weights.
medtricks resets BN parameters of chosen stages *after* the pretrained weights are in (He et al. 2019 zero-gamma
idea; Raghu et al. 2019 "Transfusion" and Kanavati & Tsuneki 2021 on re-initializing BN in transfer).

Stages are named per architecture (`stage_names`): resnets stem, layer1..layer4, head; densenet121 stem,
denseblock1..4, transition1..3, head; efficientnet_lite0 stem, blocks.0..blocks.6, head.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from torch import nn

from medtricks.errors import RecipeError, short
from medtricks.models.backbones import ARCHS, MedModel

logger = logging.getLogger(__name__)
BN = nn.modules.batchnorm._BatchNorm


def stage_names(model: MedModel | str) -> tuple[str, ...]:
    """The stage names of a model's (or an architecture name's) architecture, input to output."""
    return tuple(ARCHS[model if isinstance(model, str) else model.arch].stages)


def check_stages(arch: str, stages: Iterable[str] | str, key: str) -> list[str]:
    """`stages` as a list ("all" = every stage), after checking each is a stage of `arch`.

    Raises:
        RecipeError: naming the recipe `key`, the unknown stages and the valid ones.
    """
    names = stage_names(arch)
    stages = list(names) if stages == "all" else list(stages)
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise RecipeError(f"{key}: unknown stage(s) {unknown} for {arch}; its stages are {', '.join(names)}.")
    return stages


def stage_of_parameter(model: MedModel) -> dict[str, str]:
    """{parameter name (as in model.named_parameters()): stage name}; every parameter has exactly one stage."""
    owner = {}
    for stage, paths in ARCHS[model.arch].stages.items():
        for path in paths:
            for name, _ in model.backbone.get_submodule(path).named_parameters(prefix=f"backbone.{path}"):
                owner[name] = stage
    return owner


def _closes_residual(block: nn.Module) -> str | None:
    """Name of the BN that ends the residual branch of `block`, or None when the block has no skip connection."""
    kind = type(block).__name__
    if kind == "BasicBlock":
        return "bn2"
    if kind == "Bottleneck":
        return "bn3"
    if kind == "InvertedResidual" and getattr(block, "has_skip", False):
        return "bn3"
    if kind == "DepthwiseSeparableConv" and getattr(block, "has_skip", False):
        return "bn2"
    return None


BN_RESET_CHOICES = {"gamma": ("zero", "one"), "which": ("last_in_block", "all"), "beta": ("keep", "zero"),
                    "running_stats": ("keep", "reset")}


def check_bn_reset(**values: str) -> None:
    """Check apply_bn_reset's settings (gamma, which, beta, running_stats) against BN_RESET_CHOICES.

    Raises:
        RecipeError: naming the `model.bn_reset` key, its value and the valid ones.
    """
    for key, value in values.items():
        if value not in BN_RESET_CHOICES[key]:
            raise RecipeError(f"recipe key 'model.bn_reset[].{key}' = {short(value)}; choose one of "
                              f"{list(BN_RESET_CHOICES[key])}.")


def residual_bns(model: MedModel, stages: Sequence[str]) -> dict[str, list[str]]:
    """{stage: names of the BNs that close a residual branch}, the paper's zero-gamma targets."""
    out = {}
    for stage in stages:
        found = []
        for path in ARCHS[model.arch].stages[stage]:
            for name, block in model.backbone.get_submodule(path).named_modules(prefix=path):
                bn = _closes_residual(block)
                if bn is not None:
                    found.append(f"{name}.{bn}")
        out[stage] = found
    return out


def apply_bn_reset(model: MedModel, stages: Sequence[str] | str, gamma: str = "zero", which: str = "last_in_block",
                   beta: str = "keep", running_stats: str = "keep") -> list[str]:
    """Reset BatchNorm parameters of chosen stages of a (pretrained) model, in place.

    Args:
        model: a MedModel (weights already loaded).
        stages: stage names (see `stage_names`) or "all".
        gamma: "zero" or "one" (unit scale). With gamma zero a reset residual branch outputs its beta: the block
            starts as its shortcut only with beta "zero" (with the pretrained beta kept it outputs shortcut + beta).
        which: "last_in_block" (the BN closing each residual branch: He et al.'s zero-gamma) or "all" (every BN
            in the stages). last_in_block on an architecture or stage without residual blocks is an error.
        beta: "keep" or "zero" (with gamma zero, beta zero makes each residual branch output exactly 0).
        running_stats: "keep" or "reset" (running mean 0, variance 1, as at initialization).

    Returns:
        The names of the BN layers that were reset.

    Example:
        >>> apply_bn_reset(model, ["layer3", "layer4"], gamma="zero", which="last_in_block", beta="zero")
    """
    check_bn_reset(gamma=gamma, which=which, beta=beta, running_stats=running_stats)
    stages = check_stages(model.arch, stages, "model.bn_reset stages")
    if which == "all":
        names = [f"{p}.{n}".rstrip(".") for s in stages for p in ARCHS[model.arch].stages[s]
                 for n, m in model.backbone.get_submodule(p).named_modules() if isinstance(m, BN)]
    else:
        per_stage = residual_bns(model, stages)
        if not any(per_stage.values()):
            raise RecipeError(f"model.bn_reset which: last_in_block needs residual blocks, and {model.arch} has none "
                              f"in {stages}" + (" (DenseNet has no residual branches)" if "densenet" in model.arch
                                                else "") + "; use which: all to reset every BN of the stages.")
        empty = [s for s, found in per_stage.items() if not found]
        if empty:
            raise RecipeError(f"model.bn_reset: stage(s) {empty} of {model.arch} have no residual blocks; remove "
                              f"them or use which: all.")
        names = [n for found in per_stage.values() for n in found]
    for name in names:
        bn = model.backbone.get_submodule(name)
        if running_stats == "reset":
            bn.reset_running_stats()
        if gamma == "zero":
            nn.init.zeros_(bn.weight)
        else:
            nn.init.ones_(bn.weight)
        if beta == "zero":
            nn.init.zeros_(bn.bias)
    logger.info("bn_reset: gamma=%s beta=%s running_stats=%s on %d BN layers of %s", gamma, beta, running_stats,
                len(names), ", ".join(stages))
    return names


def apply_freeze(model: MedModel, stages: Sequence[str]) -> int:
    """Freeze stages in place: their parameters stop requiring gradients and their BN layers stay in eval mode
    (running statistics frozen too) even when the model is put in train mode. Returns the number of tensors."""
    stages = check_stages(model.arch, stages, "model.freeze")
    owner = stage_of_parameter(model)
    count = 0
    for name, param in model.named_parameters():
        if owner.get(name) in stages:
            param.requires_grad_(False)
            count += 1
    model.frozen_stages = tuple(dict.fromkeys([*model.frozen_stages, *stages]))
    model.train(model.training)
    logger.info("froze %d tensors in %s", count, ", ".join(stages))
    return count


def stage_parameter_groups(model: MedModel, lr_multipliers: dict[str, float] | None = None) -> list[dict]:
    """Trainable parameters grouped by stage for discriminative fine-tuning.

    Returns:
        [{"stage": name, "params": [...], "names": [...], "lr_mult": m}] in stage order, frozen parameters left
        out; stages missing from `lr_multipliers` get 1.0. The optimizer multiplies its lr by `lr_mult`.
    """
    lr_multipliers = lr_multipliers or {}
    check_stages(model.arch, lr_multipliers, "model.lr_multipliers")
    negative = {stage: m for stage, m in lr_multipliers.items() if not m >= 0}
    if negative:
        raise RecipeError(f"model.lr_multipliers = {negative}: multipliers must be >= 0.")
    owner = stage_of_parameter(model)
    groups = {stage: {"stage": stage, "params": [], "names": [], "lr_mult": float(lr_multipliers.get(stage, 1.0))}
              for stage in stage_names(model)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[owner[name]]["params"].append(param)
            groups[owner[name]]["names"].append(name)
    return [g for g in groups.values() if g["params"]]
