"""From the recipe's model section to a ready model: weights, new head, input channels, then surgery, once.

`check_model_config` is the recipe check of everything model-related: it runs before any image is decoded and
before the run directory exists, so a typo in a stage name costs seconds, not a decoded data set.
"""

from __future__ import annotations

from pathlib import Path

from medtricks.errors import RecipeError, short
from medtricks.models.backbones import ARCHS, MedModel, create_model
from medtricks.models.surgery import (
    apply_bn_reset,
    apply_freeze,
    check_bn_reset,
    check_stages,
    stage_names,
    stage_parameter_groups,
)
from medtricks.models.weights import REGISTRY, WeightsError, lookup_message
from medtricks.recipe import ModelConfig
from medtricks.tricks.zero_gamma import ZeroGammaConfig, apply_zero_gamma


def check_model_config(config: ModelConfig, zero_gamma: ZeroGammaConfig | None = None) -> None:
    """Fail fast, before any data is read, on a model section that cannot build or train.

    Checks: a known arch; known weights (or an existing local file); every stage named in model.freeze,
    model.bn_reset, model.lr_multipliers and tricks.zero_gamma.stages exists in the arch; bn_reset values; and
    that model.freeze leaves something to train.

    Raises:
        MedtricksError: naming the recipe key, the value and the valid choices.
    """
    if config.arch not in ARCHS:
        raise WeightsError(f"unknown model.arch {short(config.arch)}; choose one of {', '.join(ARCHS)}.")
    if config.weights != "none" and (config.arch, config.weights) not in REGISTRY:
        path = Path(config.weights).expanduser()
        if not (path.suffix or "/" in config.weights):
            raise WeightsError(lookup_message(config.arch, config.weights))
        if not path.is_file():
            raise WeightsError(f"model.weights {config.weights}: file not found.")
    for i, reset in enumerate(config.bn_reset):
        check_stages(config.arch, reset.stages, f"model.bn_reset[{i}].stages")
        check_bn_reset(gamma=reset.gamma, which=reset.which, beta=reset.beta, running_stats=reset.running_stats)
    frozen = check_stages(config.arch, config.freeze, "model.freeze")
    check_stages(config.arch, config.lr_multipliers, "model.lr_multipliers")
    if zero_gamma is not None and zero_gamma.stages is not None:
        check_stages(config.arch, zero_gamma.stages, "tricks.zero_gamma.stages")
    if set(stage_names(config.arch)) <= set(frozen):
        raise RecipeError(f"model.freeze = {list(config.freeze)} freezes every stage of {config.arch}: nothing would "
                          f"train. Leave at least the head out of model.freeze.")


def build_model(config: ModelConfig, num_classes: int, in_chans: int,
                zero_gamma: ZeroGammaConfig | None = None) -> MedModel:
    """Create the backbone with its pretrained weights, then apply the `bn_reset` entries in order, `freeze`, and
    the zero_gamma trick when it is on.

    `lr_multipliers` are checked here (stage names) and consumed by the optimizer's parameter groups.
    """
    check_model_config(config, zero_gamma)
    model = create_model(config.arch, num_classes, in_chans, config.weights, config.input_mode)
    for reset in config.bn_reset:
        apply_bn_reset(model, reset.stages, gamma=reset.gamma, which=reset.which, beta=reset.beta,
                       running_stats=reset.running_stats)
    if config.freeze:
        apply_freeze(model, config.freeze)
    if zero_gamma is not None:
        apply_zero_gamma(model, zero_gamma.stages, zero_gamma.beta)
    stage_parameter_groups(model, config.lr_multipliers)  # validates stage names and values early
    return model
