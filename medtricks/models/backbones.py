"""Backbones wrapped so that normalization is their first layer, with pretrained weights and a new head.

Convention (DESIGN.md): a model takes float images in [0, 1] and normalizes them itself with the mean/std of its
pretraining, so attack eps is always a fraction of the displayed intensity range.

Architectures: resnet18, resnet50, densenet121 (torchvision), resnet50d (timm; He et al. 2019's ResNet-D) and
efficientnet_lite0 (timm `tf_efficientnet_lite0`, TF "SAME" padding, which the ImageNet file was trained with).

One-channel inputs (`input_mode`):
- `sum` (default): the first conv's RGB filters are folded into one (timm's adapt_input_conv idea), weighted by
  the per-channel std so that grey * W' matches sum_c W_c * (grey - mean_c) / std_c up to a per-channel constant;
  the model then normalizes with the mean of the channel means and stds, and the constant (nonzero when the channel
  statistics differ, as ImageNet's do) is folded into the running mean of the BatchNorm after the first conv. So
  the stem sees exactly what the RGB network sees on the grey image repeated to 3 channels, except within the
  first conv's reach of the border (its zero padding pads normalized values, which differ).
- `repeat`: grey is repeated to 3 channels inside the model, then normalized per channel: the pretrained network
  sees exactly a grey RGB photo (3x the first-conv cost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medtricks.errors import short
from medtricks.models.weights import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    REGISTRY,
    WeightsError,
    detect_layout,
    find_by_file,
    load_checkpoint,
    lookup_message,
    remap_state_dict,
    verify,
    weights_path,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    """How to build one architecture and where its parts are.

    Attributes:
        build: num_classes -> randomly initialized backbone.
        head: attribute path of the final Linear layer.
        stages: stage name -> module paths (every parameter belongs to exactly one stage).
        stem_norm: attribute path of the BatchNorm that takes the first conv's output (see adapt_input_conv).
    """

    build: Callable[[int], nn.Module]
    head: str
    stages: dict[str, tuple[str, ...]]
    stem_norm: str


def _torchvision(name: str):
    """Builder of torchvision's `name` (random init). torchvision and timm are imported when a model is built, not
    when this module is: checking a recipe's stage names should not wait the ~2 s they take to import."""

    def build(num_classes: int) -> nn.Module:
        import torchvision.models

        return getattr(torchvision.models, name)(num_classes=num_classes)

    return build


def _timm(name: str):
    """Builder of timm's `name` (random init); see _torchvision."""

    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


def _resnet_stages(stem: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {"stem": stem, **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)}, "head": ("fc",)}


_DENSENET_STAGES = {"stem": ("features.conv0", "features.norm0"),
                    **{name: (f"features.{name}",) for i in range(1, 5)
                       for name in ([f"denseblock{i}"] + ([f"transition{i}"] if i < 4 else []))},
                    "head": ("features.norm5", "classifier")}

ARCHS: dict[str, Arch] = {
    "resnet18": Arch(_torchvision("resnet18"), "fc", _resnet_stages(("conv1", "bn1")), "bn1"),
    "resnet50": Arch(_torchvision("resnet50"), "fc", _resnet_stages(("conv1", "bn1")), "bn1"),
    "resnet50d": Arch(_timm("resnet50d"), "fc", _resnet_stages(("conv1", "bn1")), "conv1.1"),  # deep stem
    "densenet121": Arch(_torchvision("densenet121"), "classifier", _DENSENET_STAGES, "features.norm0"),
    "efficientnet_lite0": Arch(_timm("tf_efficientnet_lite0"), "classifier",
                               {"stem": ("conv_stem", "bn1"), **{f"blocks.{i}": (f"blocks.{i}",) for i in range(7)},
                                "head": ("conv_head", "bn2", "classifier")}, "bn1"),
}


class Normalize(nn.Module):
    """(x - mean) / std on [0, 1] images; with `repeat_to`, 1-channel input is first repeated to that many."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], repeat_to: int | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.repeat_to = repeat_to

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_to is not None and x.shape[1] == 1:
            x = x.expand(-1, self.repeat_to, -1, -1)
        return (x - self.mean) / self.std


class MedModel(nn.Module):
    """A backbone behind its normalization: takes (N, in_chans, H, W) images in [0, 1], returns logits.

    BatchNorm layers of frozen stages (`apply_freeze`) stay in eval mode when the model is put in train mode.
    """

    def __init__(self, backbone: nn.Module, arch: str, num_classes: int, in_chans: int, normalize: Normalize,
                 input_mode: str, weights: str):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.arch, self.num_classes, self.in_chans = arch, num_classes, in_chans
        self.input_mode, self.weights = input_mode, weights
        # post-hoc temperature scaling (medtricks.calibration): not a parameter nor in the state dict; model.json
        # keeps it and medtricks.runs.open_run sets it
        self.temperature = 1.0
        self.frozen_stages: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.backbone(self.normalize(x))
        return logits if self.temperature == 1.0 else logits / self.temperature

    def train(self, mode: bool = True) -> MedModel:
        super().train(mode)
        if mode and self.frozen_stages:
            for module in self.stage_modules(self.frozen_stages):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def stage_modules(self, stages: Iterable[str]) -> list[nn.Module]:
        """All modules (recursively) of the named stages (ARCHS[arch].stages)."""
        paths = [p for s in stages for p in ARCHS[self.arch].stages[s]]
        return [m for p in paths for m in self.backbone.get_submodule(p).modules()]

    def describe(self) -> dict:
        """What model.json records: enough to rebuild the model without the recipe."""
        return {"arch": self.arch, "num_classes": self.num_classes, "in_chans": self.in_chans,
                "input_mode": self.input_mode, "weights": self.weights,
                "mean": self.normalize.mean.flatten().tolist(), "std": self.normalize.std.flatten().tolist(),
                "repeat_to": self.normalize.repeat_to, "frozen_stages": list(self.frozen_stages)}


def _set_head(backbone: nn.Module, path: str, num_classes: int) -> None:
    old = backbone.get_submodule(path)
    parent, name = (backbone, path) if "." not in path else (backbone.get_submodule(path.rsplit(".", 1)[0]),
                                                              path.rsplit(".", 1)[1])
    setattr(parent, name, nn.Linear(old.in_features, num_classes))


def first_conv(backbone: nn.Module) -> nn.Conv2d:
    """The first convolution in module order (the stem conv of every supported architecture)."""
    return next(m for m in backbone.modules() if isinstance(m, nn.Conv2d))


def adapt_input_conv(conv: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...],
                     norm: nn.modules.batchnorm._BatchNorm | None = None) -> tuple[tuple, tuple]:
    """Fold a 3-channel first conv into 1 channel in place; return the 1-channel (mean, std) to normalize with.

    W' = sum_c W_c * std_bar / std_c, mean_bar = mean(mean_c), std_bar = mean(std_c). On a grey image g the folded
    conv gives conv_rgb((g - mean_c) / std_c) - k, with the per-output-channel constant
    k = sum_c (mean_bar - mean_c) / std_c * sum(W_c) wherever the kernel lies inside the image. With `norm`, the
    BatchNorm that takes the conv's output, k is folded into its running mean (mu - k), so in eval mode the norm's
    output is exactly the RGB network's on the repeated grey image away from the border; in train mode the batch
    mean absorbs k anyway, and the running mean then tracks the folded conv's output.
    """
    std_bar, mean_bar = sum(std) / len(std), sum(mean) / len(mean)
    with torch.no_grad():
        weight = conv.weight.detach()
        scale = torch.tensor([std_bar / s for s in std], dtype=weight.dtype).view(1, -1, 1, 1)
        offset = torch.tensor([(mean_bar - m) / s for m, s in zip(mean, std, strict=True)], dtype=weight.dtype)
        k = (weight.sum(dim=(2, 3)) * offset).sum(dim=1)  # (out_channels,)
        if norm is not None:
            norm.running_mean -= k.to(norm.running_mean.dtype)
    conv.weight = nn.Parameter((weight * scale).sum(dim=1, keepdim=True))
    conv.in_channels = 1
    return (mean_bar,), (std_bar,)


def pretrained_state(arch: str, weights: str) -> tuple[dict, tuple, tuple, Path]:
    """The state dict (remapped to the model's keys), mean, std and file of registry weights or a local file."""
    local = Path(weights).expanduser()
    if (arch, weights) in REGISTRY and not local.is_file():
        spec = REGISTRY[(arch, weights)]
        path = weights_path(spec)
    elif local.suffix or local.is_file() or "/" in weights:
        if not local.is_file():
            raise WeightsError(f"{local}: weights file not found. Check model.weights, or use a registry name "
                               f"(medtricks weights list).")
        spec, path = find_by_file(local), local
        if spec is not None and spec.arch != arch:
            raise WeightsError(f"{local}: this is the {spec.arch} '{spec.name}' file; model.arch is {arch}.")
    else:
        raise WeightsError(lookup_message(arch, weights))
    if spec is not None:
        verify(path, spec)
    checkpoint = load_checkpoint(path)
    state = remap_state_dict(checkpoint, spec.layout if spec is not None else detect_layout(checkpoint))
    mean, std = (spec.mean, spec.std) if spec is not None else (IMAGENET_MEAN, IMAGENET_STD)
    return state, mean, std, path


def archs_fitting(file: str | Path) -> list[str]:
    """The architectures whose keys a weights file fits exactly (after remapping): the registry's arch for a known
    file, else every arch is tried. Loading verifies the registry hash and refuses unsafe pickles.

    Raises:
        WeightsError: missing, corrupt or unsafe file, or a registry hash mismatch.
    """
    spec = find_by_file(Path(file))
    fits = []
    for arch in [spec.arch] if spec is not None else list(ARCHS):
        state, *_ = pretrained_state(arch, str(file))
        head = state.get(f"{ARCHS[arch].head}.weight")
        if set(ARCHS[arch].build(head.shape[0] if head is not None else 1000).state_dict()) == set(state):
            fits.append(arch)
    return fits


def _strict_keys(backbone: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    own = backbone.state_dict()
    # BatchNorm fills in num_batches_tracked itself (torch's own strict load accepts files without it, such as
    # torchvision's densenet121 and resnet ImageNet files)
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    return missing, unexpected + [f"{k} (shape {tuple(state[k].shape)} vs {tuple(own[k].shape)})" for k in shape]


def create_model(arch: str, num_classes: int, in_chans: int = 3, weights: str = "imagenet",
                 input_mode: str = "sum") -> MedModel:
    """Build a backbone with pretrained weights, a new `num_classes` head and normalization as first layer.

    Args:
        arch: one of ARCHS (resnet18, resnet50, resnet50d, densenet121, efficientnet_lite0).
        num_classes: outputs of the new head (1000 keeps an ImageNet head as loaded).
        in_chans: 1 (grey) or 3.
        weights: a registry name (imagenet, imagenet_v2, sin, sin_in, sin_in_in; see `medtricks weights list`),
            "none" for random initialization, or a local file path (checked against the registry by file name).
        input_mode: for in_chans 1: "sum" (fold the first conv) or "repeat" (grey -> 3 channels).

    Raises:
        MedtricksError: unknown arch, weights or input mode; weights missing offline, corrupt, unsafe or
            mismatched.
    """
    if arch not in ARCHS:
        raise WeightsError(f"unknown model.arch {short(arch)}; choose one of {', '.join(ARCHS)}.")
    if in_chans not in (1, 3):
        raise WeightsError(f"in_chans {in_chans}: models take 1 (grey) or 3 (colour) channels.")
    if input_mode not in ("sum", "repeat"):
        raise WeightsError(f"model.input_mode {short(input_mode)}: choose 'sum' or 'repeat'.")
    if num_classes < 1:
        raise WeightsError(f"num_classes {num_classes}: need at least one output.")
    spec = ARCHS[arch]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights == "none":
        backbone = spec.build(num_classes)
        if arch == "efficientnet_lite0":
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        state, mean, std, path = pretrained_state(arch, weights)
        head = state.get(f"{spec.head}.weight")
        backbone = spec.build(head.shape[0] if head is not None else 1000)  # a local file may have its own head
        missing, unexpected = _strict_keys(backbone, state)
        if missing or unexpected:
            raise WeightsError(f"{path}: keys do not match {arch}: {len(missing)} missing (e.g. {missing[:3]}), "
                               f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). Is it a {arch} checkpoint?")
        backbone.load_state_dict(state, strict=True)
        logger.info("loaded %s weights from %s (%d tensors, strict)", arch, path, len(state))
        if backbone.get_submodule(spec.head).out_features != num_classes:
            _set_head(backbone, spec.head, num_classes)
    repeat_to = None
    if in_chans == 1:
        if input_mode == "sum":
            mean, std = adapt_input_conv(first_conv(backbone), mean, std, backbone.get_submodule(spec.stem_norm))
        else:
            repeat_to = 3
    return MedModel(backbone, arch, num_classes, in_chans, Normalize(mean, std, repeat_to), input_mode, weights)
