"""Train and eval transform presets on float (C, H, W) tensors in [0, 1] (torchvision.transforms.v2).

Presets (`data.augment`):
- `bag_of_tricks`: He et al. 2019 (arXiv 1812.01187) section 2: RandomResizedCrop scale 0.08-1, ratio 3/4-4/3;
  horizontal flip p=0.5; brightness, contrast and saturation scaled by factors drawn from [0.6, 1.4]
  (ColorJitter 0.4, as their GluonCV reference does; no hue jitter: ColorJitter's hue=0.4 would rotate hues by up
  to +-144 degrees); AlexNet PCA lighting noise std 0.1 with the ImageNet eigen-decomposition. Made for ImageNet
  photographs: on grey radiographs only the brightness/contrast jitter and the geometry apply (saturation and RGB
  lighting have no meaning on 1 channel).
- `cxr`: safe for radiographs: milder crops (scale 0.7-1, near-square), rotation <= 7 degrees, translation <= 5%,
  brightness/contrast 0.2 and gamma 0.8-1.25; no flips (left/right anatomy: heart, situs) and no hue.
- `fundus`: crops 0.6-1, horizontal and vertical flips and any rotation (the fundus disc has no canonical
  orientation and left/right eyes are mirror images), mild brightness/contrast/saturation.
- `dermoscopy`: crops 0.4-1, flips and any rotation (lesions have no orientation), colour jitter incl. small hue.
- `none`: the eval transform for training too.
Eval (every preset): resize the short side to image_size / crop_fraction (256 for 224), centre-crop image_size.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from medtricks.recipe import AUGMENT_PRESETS, PRESET_FLIPS

# ImageNet RGB eigen-decomposition used by AlexNet's and the Bag-of-Tricks' lighting noise (fb.resnet.torch)
IMAGENET_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
IMAGENET_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]])


class Lighting(torch.nn.Module):
    """AlexNet-style PCA colour noise: add eigvec @ (alpha * eigval), alpha ~ N(0, std), to every pixel.

    Not in torchvision or MONAI; needs 3 channels.
    """

    def __init__(self, std: float = 0.1):
        super().__init__()
        self.std = std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        rgb = IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL)
        return image + rgb.to(image.dtype).view(3, 1, 1)


class RandomGamma(torch.nn.Module):
    """Gamma curve with gamma drawn log-uniformly from `gamma_range` (exposure differences between devices).

    torchvision has only the deterministic `adjust_gamma`; MONAI's RandAdjustContrast draws from its own numpy
    RandomState, outside the torch generator that seeds DataLoader workers, which would break reproducibility.
    """

    def __init__(self, gamma_range: tuple[float, float] = (0.8, 1.25)):
        super().__init__()
        self.log_range = torch.log(torch.tensor(gamma_range, dtype=torch.float64))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        lo, hi = self.log_range.tolist()
        gamma = float(torch.empty(1, dtype=torch.float64).uniform_(lo, hi).exp())
        return image.clamp(0.0, 1.0) ** gamma


class Clamp01(torch.nn.Module):
    """Keep images in [0, 1]: the model's input contract, and attack eps is a fraction of this range."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.clamp(0.0, 1.0)


def cache_size(image_size: int, crop_fraction: float) -> int:
    """Short side the eval preset resizes to (256 for 224 at crop_fraction 0.875); images are cached at it."""
    return int(round(image_size / crop_fraction))


def create_eval_transform(image_size: int, crop_fraction: float = 0.875) -> v2.Compose:
    """Resize the short side to image_size / crop_fraction, then centre-crop image_size."""
    return v2.Compose([
        v2.Resize(cache_size(image_size, crop_fraction), antialias=True),
        v2.CenterCrop(image_size),
        Clamp01(),
    ])


def _colour(brightness: float, contrast: float, saturation: float, hue: float, channels: int) -> list:
    if channels == 1:  # saturation and hue need colour
        saturation, hue = 0.0, 0.0
    if max(brightness, contrast, saturation, hue) == 0:
        return []
    return [v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)]


def _flips(preset: str) -> list:
    flips = {"horizontal": v2.RandomHorizontalFlip(0.5), "vertical": v2.RandomVerticalFlip(0.5)}
    return [flips[name] for name in PRESET_FLIPS[preset]]


def create_train_transform(preset: str, image_size: int, channels: int, crop_fraction: float = 0.875) -> v2.Compose:
    """The train-time augmentation of a preset (see the module docstring), ending in [0, 1]."""
    size = image_size
    if preset == "none":
        return create_eval_transform(image_size, crop_fraction)
    if preset == "bag_of_tricks":
        steps = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                 *_flips(preset),
                 *_colour(0.4, 0.4, 0.4, 0.0, channels)]
        if channels == 3:
            steps.append(Lighting(0.1))
    elif preset == "cxr":
        steps = [v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
                 v2.RandomAffine(degrees=7, translate=(0.05, 0.05)),
                 *_colour(0.2, 0.2, 0.0, 0.0, channels),
                 RandomGamma((0.8, 1.25))]
    elif preset == "fundus":
        steps = [v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.9, 1.1), antialias=True),
                 *_flips(preset), v2.RandomRotation(180),
                 *_colour(0.2, 0.2, 0.1, 0.0, channels)]
    elif preset == "dermoscopy":
        steps = [v2.RandomResizedCrop(size, scale=(0.4, 1.0), antialias=True),
                 *_flips(preset), v2.RandomRotation(180),
                 *_colour(0.2, 0.2, 0.2, 0.02, channels)]
    else:
        raise ValueError(f"unknown augment preset {preset!r}; choose one of {list(AUGMENT_PRESETS)}")
    return v2.Compose([*steps, Clamp01()])
