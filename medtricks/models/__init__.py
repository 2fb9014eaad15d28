"""Backbones, pretrained weights and BatchNorm surgery (see backbones.py, weights.py, surgery.py)."""

from medtricks.models.backbones import ARCHS, MedModel, Normalize, adapt_input_conv, create_model
from medtricks.models.surgery import (
    apply_bn_reset,
    apply_freeze,
    check_stages,
    residual_bns,
    stage_names,
    stage_of_parameter,
    stage_parameter_groups,
)
from medtricks.models.weights import REGISTRY, WeightsError, load_checkpoint

__all__ = [
    "ARCHS",
    "REGISTRY",
    "MedModel",
    "Normalize",
    "WeightsError",
    "adapt_input_conv",
    "apply_bn_reset",
    "apply_freeze",
    "check_stages",
    "create_model",
    "load_checkpoint",
    "residual_bns",
    "stage_names",
    "stage_of_parameter",
    "stage_parameter_groups",
]
