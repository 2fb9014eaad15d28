"""From the recipe's model section to a ready model: weights, new head, input channels, then surgery, once."""

from __future__ import annotations

from medtricks.models.backbones import MedModel, create_model
from medtricks.models.surgery import apply_bn_reset, apply_freeze, stage_parameter_groups
from medtricks.recipe import ModelConfig


def check_model_config(config: ModelConfig) -> None:
    """Fail fast, before any data is read, on an unknown arch or weights name (or a missing weights file)."""
    from pathlib import Path

    from medtricks.models.backbones import ARCHS
    from medtricks.models.weights import REGISTRY, WeightsError, lookup_message

    if config.arch not in ARCHS:
        raise WeightsError(f"unknown model.arch {config.arch!r}; choose one of {', '.join(ARCHS)}.")
    if config.weights != "none" and (config.arch, config.weights) not in REGISTRY:
        path = Path(config.weights).expanduser()
        if not (path.suffix or "/" in config.weights):
            raise WeightsError(lookup_message(config.arch, config.weights))
        if not path.is_file():
            raise WeightsError(f"model.weights {config.weights}: file not found.")


def build_model(config: ModelConfig, num_classes: int, in_chans: int) -> MedModel:
    """Create the backbone with its pretrained weights, then apply `bn_reset` entries in order and `freeze`.

    `lr_multipliers` are checked here (stage names) and consumed by the optimizer's parameter groups.
    """
    model = create_model(config.arch, num_classes, in_chans, config.weights, config.input_mode)
    for reset in config.bn_reset:
        apply_bn_reset(model, reset.stages, gamma=reset.gamma, which=reset.which, beta=reset.beta,
                       running_stats=reset.running_stats)
    if config.freeze:
        apply_freeze(model, config.freeze)
    stage_parameter_groups(model, config.lr_multipliers)  # validates stage names and values early
    return model
