"""Natural corruptions of medical images at five severities.

What: noise, blur, contrast/exposure, compression and colour corruptions of batches of float (N, C, H, W) images in
[0, 1] (C = 1 grey or 3 RGB) on any device (`corrupt`, `CORRUPTIONS`) and modality presets (`PRESETS`). A
classifier's accuracy and AUROC under them: medtricks.corruption_report.evaluate_corruptions.

Papers: Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR, arXiv 1903.12261: ImageNet-C, five severities, mCE); Di Salvo, Doerrich & Ledig 2024,
"MedMNIST-C: Comprehensive benchmark and improved classifier robustness by simulating realistic image corruptions"
(arXiv 2406.17536: per-modality corruptions such as gamma, under-exposure and dermoscopy black corners).
mCE here is not divided by AlexNet's errors as in ImageNet-C: no reference model exists for medical tasks.

Which library does what: torchvision.transforms.v2.functional does gamma, multiplicative brightness, hue and
saturation; Pillow the JPEG round trip; plain torch the rest, each with its reason in a comment: noise is drawn per
image from its own generator (torchvision's gaussian_noise uses the global RNG), the Gaussian blur is two 1-D passes
(torchvision's full 2-D kernel is 17x slower), the disk (defocus) and motion kernels, contrast with per-channel means
and brightness as a shift of the HSV value (as ImageNet-C; torchvision's versions also wash out colour / multiply),
pixelation reproducing PIL's BOX and NEAREST resizes to 1e-7 (torchvision's resize has no box filter) and the
black-corner mask. No new dependency.

Severity tables (`CORRUPTIONS[name].severities`, `.source`): ImageNet-C's parameters (as in bethgelab's
imagecorruptions 1.1.2) for the eleven corruptions it shares, applied to [0, 1] tensors instead of uint8 arrays, one
table per corruption for every modality so that results compare across data sets and with the ImageNet-C literature
(MedMNIST-C tunes milder tables per data set, e.g. Gaussian noise sigma 0.04-0.08 on PneumoniaMNIST); MedMNIST-C's
for the medical ones: gamma (ChestMNIST/PneumoniaMNIST gamma_corr_up), brightness_down (RetinaMNIST) and
black_corner (DermaMNIST, whose table lists 0.90 before 0.95: sorted here so that severity grows); hue_shift and
desaturate are chosen here (neither paper has a monotone colour-shift table). Spatial sizes (blur sigma and radius,
motion length) are ImageNet-C's pixels at 224 x 224, scaled by min(H, W) / 224 so that a severity blurs the same
fraction of the field of view at any input size (exactly ImageNet-C's at 224 px). Colour-only corruptions raise on grey
images.

Randomness: image k's draws come from a generator seeded by (seed, name, severity, index[k]) through numpy's
SeedSequence, so its corrupted version does not depend on the rest of the batch, its size or order; the draws depend
on the device (CPU and CUDA generators differ). Every output is clamped to [0, 1], float32, on the input's device.

Measured effect (`PYTHONPATH=/tmp/icpkgs python benchmarks/corruption_speed.py`: 64 real images at 224 px, IDRiD
fundus for RGB and NIH chest X-rays for grey, severity 3, one CPU thread each, load average 3.0-3.8 from other jobs on
a 2-core machine, so +-30%): images/s against imagecorruptions 1.1.2 (numpy, one image per call) median 1.6x on RGB
(0.3x pixelate, 0.4x JPEG, 0.8x defocus_blur, whose uint8 input needs no conversion; up to 18x brightness) and 5.6x
on grey (0.9x pixelate to 47x brightness: it turns grey images into RGB); medians 1.4-1.8x and 5.0-6.5x over three
runs. Fidelity on 16 of those images: the mean |corrupted - clean| of ours is within 0.002 of theirs at every severity
of every shared corruption (e.g. Gaussian noise 0.063/0.093/0.135/0.185/0.246 on the X-rays, theirs
0.063/0.093/0.136/0.185/0.246), and the deterministic ones' outputs differ by 0.0004-0.006 on average (JPEG: 0; about
0.002 is their final uint8 truncation).
"""

from __future__ import annotations

import io
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from medtricks.recipe import AUGMENT_PRESETS

logger = logging.getLogger(__name__)

REFERENCE_SIZE = 224  # ImageNet-C's spatial parameters are pixels of 224 x 224 images
SEVERITIES = (1, 2, 3, 4, 5)
# values per call on the CPU: 4 MB chunks (7 RGB 224 px images) ran 1.6-2.7x faster than one 38 MB batch of 64 (noise,
# blur, contrast, brightness; one thread), whose temporaries miss the cache; each image is corrupted alone anyway
_CPU_CHUNK = 2 ** 20
IMAGENET_C = "ImageNet-C (Hendrycks & Dietterich 2019)"


# --- helpers -------------------------------------------------------------------------------------------------------

def _pixels(images: torch.Tensor, pixels_at_224: float) -> float:
    """A length in pixels of a 224 x 224 image, at this image's size (min side)."""
    return pixels_at_224 * min(images.shape[-2:]) / REFERENCE_SIZE


def _randn(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(images.shape[1:], generator=g, device=images.device) for g in generators])


def _rand(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.rand(images.shape[1:], generator=g, device=images.device) for g in generators])


def _convolve(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Every channel filtered by one 2-D kernel, reflected borders (OpenCV's filter2D default, as in ImageNet-C)."""
    # the N * C channels as groups of one depthwise convolution: 13x faster on CPU than N * C one-channel images
    n, c, h, w = images.shape
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = F.pad(images.reshape(1, n * c, h, w), (pw, pw, ph, ph), mode="reflect")
    weight = kernel.to(images).expand(n * c, 1, *kernel.shape)
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


# --- corruptions: (images, parameter, generators: one per image) -> new tensor ----------------------------------------

def gaussian_noise(images: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Additive Gaussian noise (electronic/sensor noise); sigma in [0, 1] intensity units."""
    # by hand: torchvision's gaussian_noise draws from the global RNG (randn_like), so one image's noise would depend
    # on the batch; here each image has its own generator
    return images + sigma * _randn(images, generators)


def shot_noise(images: torch.Tensor, photons: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Poisson (quantum) noise: counts with mean intensity x photons, divided by photons (fewer = noisier)."""
    # by hand: torchvision has no Poisson noise
    return torch.stack([torch.poisson(x * photons, generator=g) for x, g in zip(images, generators, strict=True)]
                       ) / photons


def impulse_noise(images: torch.Tensor, amount: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction `amount` of the values (each channel apart) set to 0 or 1, half each."""
    # by hand: torchvision has no impulse noise; same distribution as skimage's random_noise(mode="s&p")
    u = _rand(images, generators)
    return torch.where(u < amount / 2, 0.0, torch.where(u < amount, 1.0, images))


def speckle_noise(images: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Multiplicative Gaussian noise x + x * N(0, sigma) (ultrasound-like speckle, stronger on bright areas)."""
    # by hand: torchvision has no multiplicative noise
    return images + images * sigma * _randn(images, generators)


def gaussian_blur(images: torch.Tensor, sigma: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Gaussian blur; sigma in pixels at 224 px, kernel truncated at 4 sigma (skimage's default, as ImageNet-C)."""
    # by hand: torchvision's gaussian_blur convolves with the full 2-D kernel, 17x slower than these two 1-D passes
    # (16 RGB 224 px images at sigma 3, one CPU thread: 64 vs 1083 images/s); the same output to 2e-6
    sigma = _pixels(images, sigma)
    radius = min(math.ceil(4 * sigma), min(images.shape[-2:]) - 1)  # reflect padding must be < the side
    taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    return _convolve(_convolve(images, taps[None, :]), taps[:, None])


def defocus_blur(images: torch.Tensor, disk: tuple[float, float], generators: Sequence[torch.Generator]
                 ) -> torch.Tensor:
    """Defocus: convolution with a disk of (radius in pixels at 224 px, anti-alias Gaussian sigma in pixels)."""
    # by hand: torchvision has no disk kernel. As ImageNet-C's disk(), normalised and smoothed by a 3 x 3 (radius <= 8)
    # or 5 x 5 Gaussian of sigma alias_blur (about the pixel grid, so not scaled), but each weight is the pixel's area
    # inside the disk (8 x 8 samples), not 0/1 at its centre: a radius scaled below 1 pixel still blurs
    radius, alias_blur = disk
    scaled = _pixels(images, radius)
    half = math.ceil(scaled) + 2
    samples = (torch.arange(-half, half + 1)[:, None] + (torch.arange(8) + 0.5)[None, :] / 8 - 0.5).flatten()
    inside = (samples[:, None] ** 2 + samples[None, :] ** 2 <= scaled ** 2).float()
    kernel = F.avg_pool2d(inside[None, None], 8)[0, 0]  # fraction of each pixel's samples inside the disk
    size = 3 if radius <= 8 else 5
    kernel = TF.gaussian_blur((kernel / kernel.sum())[None], [size, size], [alias_blur, alias_blur])[0]
    return _convolve(images, kernel / kernel.sum())


def motion_blur(images: torch.Tensor, motion: tuple[float, float], generators: Sequence[torch.Generator]
                ) -> torch.Tensor:
    """Motion blur along a random direction in [-45, 45) degrees per image: (radius, sigma) in pixels at 224 px.

    As imagecorruptions' _motion_blur: the sum of copies shifted by 0 to 2 * radius pixels along the direction,
    weighted by a half-Gaussian of sigma, edges replicated.
    """
    # by hand: torchvision has no motion blur; 2r + 1 shifted slices, not a (4r + 1)^2 kernel that is zero off the line
    radius, sigma = _pixels(images, motion[0]), max(_pixels(images, motion[1]), 1e-3)
    width = 2 * round(radius) + 1
    weights = torch.exp(-torch.arange(width, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    weights = (weights / weights.sum()).tolist()
    h, w = images.shape[-2:]
    padded = F.pad(images, (width, width, width, width), mode="replicate")
    out = torch.empty_like(images)
    for k, generator in enumerate(generators):
        angle = math.radians(float(torch.rand((), generator=generator, device=images.device)) * 90 - 45)
        blurred = torch.zeros_like(images[k])
        for i, weight in enumerate(weights):
            dy, dx = -math.ceil(i * math.sin(angle) - 0.5), -math.ceil(i * math.cos(angle) - 0.5)
            blurred += weight * padded[k, :, width - dy:width - dy + h, width - dx:width - dx + w]
        out[k] = blurred
    return out


def contrast(images: torch.Tensor, factor: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Lower contrast: each channel pulled towards its mean, (x - mean) * factor + mean; 1 = unchanged, 0 = flat."""
    # by hand: torchvision's adjust_contrast pulls colour images towards the mean of their grey version, which also
    # washes out the colour: on fundus photographs 5x ImageNet-C's change at the same factor (benchmark); grey: equal
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return (images - mean) * factor + mean


def brightness(images: torch.Tensor, shift: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Brighter: the HSV value (max over channels) raised by `shift` in [0, 1] units, hue and saturation kept."""
    # by hand: torchvision's adjust_brightness multiplies; ImageNet-C shifts V in HSV, which scales the RGB values of a
    # pixel by (V + shift) / V (grey: x + shift), and a black pixel becomes grey `shift`
    value = images.amax(dim=1, keepdim=True)
    target = (value + shift).clamp(max=1.0)
    return torch.where(value > 0, images * target / value.clamp(min=1e-12), target)


def brightness_down(images: torch.Tensor, factor: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Under-exposure: intensities multiplied by factor < 1 (MedMNIST-C's brightness_down, PIL's Brightness)."""
    return TF.adjust_brightness(images, factor)


def gamma(images: torch.Tensor, exponent: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Gamma x ** exponent: > 1 darkens mid-tones with black and white fixed (a different display/processing LUT)."""
    return TF.adjust_gamma(images, exponent)


def jpeg_compression(images: torch.Tensor, quality: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """JPEG compression at quality 1-100 (lower = more block artefacts), through 8 bits."""
    # Pillow, not torchvision's jpeg: the same bytes out here, 18x faster (64 RGB 224 px images: 0.055 s vs 1.0 s on
    # 2 CPU threads), and torchvision 0.29 deprecates its codec for TorchCodec
    as_bytes = (images * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # in [0, 255]
    decoded = []
    for image in as_bytes:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=int(quality))
        decoded.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous().to(images.device).float() / 255


def _box_weights(size: int, new_size: int, device: torch.device) -> torch.Tensor:
    """(new_size, size) rows averaging the pixels whose centres fall in each output pixel: PIL's BOX filter."""
    # PIL's precompute_coeffs in float64, its window bounds included: pixel centres on a window's edge go where PIL
    # puts them (equal to PIL to 1e-7 for every size from 20 to 260 px at ImageNet-C's fractions)
    scale = size / new_size
    centres = (torch.arange(new_size, dtype=torch.float64) + 0.5) * scale
    pixels = torch.arange(size, dtype=torch.float64)[None, :]
    offsets = (pixels - centres[:, None] + 0.5) * (1.0 / scale)
    first, end = (centres - scale / 2 + 0.5).floor(), (centres + scale / 2 + 0.5).floor()
    inside = (offsets > -0.5) & (offsets <= 0.5) & (pixels >= first[:, None]) & (pixels < end[:, None])
    weights = inside.double()
    return (weights / weights.sum(1, keepdim=True)).to(device, torch.float32)


def _nearest_indices(size: int, new_size: int, device: torch.device) -> torch.Tensor:
    """The source pixel of each of new_size output pixels as PIL's NEAREST resize picks it: Pillow 13 adds the step to
    a float64 position pixel by pixel, and the rounding of that sum decides the pixels that fall on an edge."""
    step, position, indices = size / new_size, size / new_size * 0.5, []
    for _ in range(new_size):
        indices.append(min(int(position), size - 1))
        position += step
    return torch.tensor(indices, device=device)


def pixelate(images: torch.Tensor, fraction: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Pixelation: box-downsampled to `fraction` of each side, then nearest-upsampled back (as ImageNet-C's PIL)."""
    # by hand: torchvision's resize has no box filter, and torch's "area" widens the box at non-integer factors (at
    # 0.6 it blurred more than at 0.5); two small matrix products are PIL's BOX and an index gather its NEAREST
    # (torch's "nearest-exact" picks other pixels where a rounding lands on a pixel edge)
    h, w = images.shape[-2:]
    small_h, small_w = max(1, int(h * fraction)), max(1, int(w * fraction))
    small = _box_weights(h, small_h, images.device) @ images @ _box_weights(w, small_w, images.device).T
    rows, cols = _nearest_indices(small_h, h, images.device), _nearest_indices(small_w, w, images.device)
    return small.index_select(-2, rows).index_select(-1, cols)


def black_corner(images: torch.Tensor, radius: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Dermoscopy black corners: zero outside a centred circle of `radius` x half the shorter side."""
    # by hand: a mask; MedMNIST-C draws the circle with OpenCV
    h, w = images.shape[-2:]
    ys = torch.arange(h, device=images.device) - h // 2
    xs = torch.arange(w, device=images.device) - w // 2
    inside = ys[:, None] ** 2 + xs[None, :] ** 2 <= (radius * min(h // 2, w // 2)) ** 2
    return images * inside


def hue_shift(images: torch.Tensor, turn: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Hue rotated by `turn` of the colour circle (0.1 = 36 degrees): another camera's or light's colour cast."""
    return TF.adjust_hue(images, turn)


def desaturate(images: torch.Tensor, factor: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Washed-out colour: blend with the grey version; factor 1 = unchanged, 0 = grey."""
    return TF.adjust_saturation(images, factor)


@dataclass(frozen=True)
class Corruption:
    """One corruption and its parameter at severities 1-5.

    Attributes:
        function: (images (N, C, H, W) in [0, 1], parameter, generators: one torch.Generator per image) -> a new
            tensor (not yet clamped); never modifies its input. Units in its docstring.
        severities: the parameter at severity 1, 2, 3, 4, 5.
        source: where the table comes from.
        colour_only: needs 3 channels (`corrupt` raises on grey images).
        random: draws from the generators.
    """

    function: Callable[[torch.Tensor, object, Sequence[torch.Generator]], torch.Tensor]
    severities: tuple
    source: str
    colour_only: bool = False
    random: bool = False


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": Corruption(gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38), IMAGENET_C, random=True),
    "shot_noise": Corruption(shot_noise, (60, 25, 12, 5, 3), IMAGENET_C, random=True),
    "impulse_noise": Corruption(impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27), IMAGENET_C, random=True),
    "speckle_noise": Corruption(speckle_noise, (0.15, 0.2, 0.35, 0.45, 0.6), IMAGENET_C, random=True),
    "gaussian_blur": Corruption(gaussian_blur, (1, 2, 3, 4, 6), IMAGENET_C),
    "defocus_blur": Corruption(defocus_blur, ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)), IMAGENET_C),
    "motion_blur": Corruption(motion_blur, ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)), IMAGENET_C,
                              random=True),
    "contrast": Corruption(contrast, (0.4, 0.3, 0.2, 0.1, 0.05), IMAGENET_C),
    "brightness": Corruption(brightness, (0.1, 0.2, 0.3, 0.4, 0.5), IMAGENET_C),
    "jpeg_compression": Corruption(jpeg_compression, (25, 18, 15, 10, 7), IMAGENET_C),
    "pixelate": Corruption(pixelate, (0.6, 0.5, 0.4, 0.3, 0.25), IMAGENET_C),
    "gamma": Corruption(gamma, (1.1, 1.2, 1.3, 1.4, 1.6), "MedMNIST-C (ChestMNIST, PneumoniaMNIST gamma_corr_up)"),
    "brightness_down": Corruption(brightness_down, (0.9, 0.8, 0.7, 0.6, 0.5), "MedMNIST-C (RetinaMNIST)"),
    "black_corner": Corruption(black_corner, (1.10, 1.05, 1.00, 0.95, 0.90), "MedMNIST-C (DermaMNIST), sorted"),
    "hue_shift": Corruption(hue_shift, (0.02, 0.04, 0.06, 0.08, 0.10), "chosen here: 7 to 36 degrees",
                            colour_only=True),
    "desaturate": Corruption(desaturate, (0.8, 0.6, 0.4, 0.2, 0.0),
                             "chosen here: spans ImageNet-C saturate's desaturating 0.3 and 0.1", colour_only=True),
}

_RADIOGRAPH = ("gaussian_noise", "shot_noise", "speckle_noise", "impulse_noise", "gaussian_blur", "contrast", "gamma",
               "brightness", "jpeg_compression", "pixelate")
_FUNDUS = (*_RADIOGRAPH, "brightness_down", "defocus_blur", "motion_blur")  # MedMNIST-C's RetinaMNIST set, and more
PRESETS: dict[str, tuple[str, ...]] = {
    "radiograph": _RADIOGRAPH,  # every one works on grey and colour images
    "fundus": _FUNDUS,  # + under-exposure, defocus and eye motion
    "dermoscopy": (*_FUNDUS, "hue_shift", "desaturate", "black_corner"),  # + colour casts, dermatoscope vignette
}
PRESET_OF_AUGMENT = {"cxr": "radiograph", "fundus": "fundus", "dermoscopy": "dermoscopy"}


# --- validation ----------------------------------------------------------------------------------------------------

def check_corruptions(names: Iterable[str], channels: int, preset: str | None = None) -> tuple[str, ...]:
    """The names, checked: each in CORRUPTIONS, none colour-only when `channels` is 1.

    Raises:
        ValueError: naming the unknown or colour-only corruptions and what to do.
    """
    names = tuple(names)
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; choose from {list(CORRUPTIONS)}.")
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels; got {channels}.")
    colour = [name for name in names if CORRUPTIONS[name].colour_only]
    if channels == 1 and colour:
        what = f"corruption preset {preset!r}" if preset else "the corruptions"
        raise ValueError(f"{what} include(s) the colour-only corruption(s) {colour}, but the images have 1 channel: "
                         f"hue and saturation are undefined for grey images, so these would measure nothing. Use a "
                         f"preset without them ({[p for p in PRESETS if not _has_colour(p)]}) or leave {colour} out.")
    return names


def _has_colour(preset: str) -> bool:
    return any(CORRUPTIONS[name].colour_only for name in PRESETS[preset])


def check_preset(preset: str, channels: int) -> tuple[str, ...]:
    """The corruption names of a preset, checked against the images' channels (see check_corruptions)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown corruption preset {preset!r}; choose one of {list(PRESETS)}.")
    return check_corruptions(PRESETS[preset], channels, preset)


def default_preset(augment: str, channels: int) -> str:
    """The corruption preset of a recipe: its `data.augment`'s preset when one is mapped (cxr, fundus, dermoscopy),
    else "radiograph", whose corruptions all work on grey and colour images (bag_of_tricks and none say nothing about
    the modality). Raises ValueError if the preset needs colour and the images are grey."""
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"unknown data.augment {augment!r}; choose one of {list(AUGMENT_PRESETS)}.")
    preset = PRESET_OF_AUGMENT.get(augment, "radiograph")
    check_preset(preset, channels)
    return preset


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, C, H, W) with C = 1 or 3; got {images.dtype} "
                         f"{tuple(images.shape)}.")
    if images.numel() and not (images.min() >= 0 and images.max() <= 1):
        raise ValueError(f"images must lie in [0, 1]; got [{float(images.min()):.4g}, {float(images.max()):.4g}] "
                         "(divide 8-bit images by 255, and corrupt before normalization).")


def _generators(name: str, severity: int, seed: int, index: torch.Tensor, device: torch.device
                ) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, name, severity, index) so an image's draws ignore its batch."""
    key = [seed, zlib.crc32(name.encode()), severity]  # crc32: stable across runs, unlike hash(str)
    return [torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([*key, int(i)]).generate_state(
        1, np.uint64)[0])) for i in index.tolist()]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, index: torch.Tensor | None = None
            ) -> torch.Tensor:
    """A corrupted copy of a batch.

    Args:
        images: (N, C, H, W) float in [0, 1], C = 1 or 3, any device; not modified.
        name: a key of CORRUPTIONS.
        severity: 0 (a copy) to 5.
        seed: with name, severity and index, fixes every random draw.
        index: (N,) integer dataset index of each image (default 0..N-1): image k's draws depend on index[k] only,
            not on the rest of the batch.

    Returns:
        (N, C, H, W) float32 in [0, 1] on the images' device.

    Raises:
        ValueError: unknown name, severity outside 0-5, a colour-only corruption on grey images, bad images/index.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {list(CORRUPTIONS)}.")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or not 0 <= severity <= 5:
        raise ValueError(f"severity {severity!r} of corruption {name!r}: choose an integer 0 (clean) to 5.")
    _check_images(images)
    check_corruptions([name], images.shape[1])
    index = torch.arange(len(images)) if index is None else torch.as_tensor(index)
    if index.shape != (len(images),) or index.is_floating_point() or (len(index) and index.min() < 0) or seed < 0:
        raise ValueError(f"index must hold one integer >= 0 per image, shape ({len(images)},), and seed must be >= 0; "
                         f"got index {tuple(index.shape)} {index.dtype}, seed {seed}.")
    images = images.float()
    if severity == 0 or not len(images):
        return images.clone().clamp_(0, 1)
    corruption, parameter = CORRUPTIONS[name], CORRUPTIONS[name].severities[severity - 1]
    generators = _generators(name, severity, seed, index, images.device) if corruption.random else []
    step = max(1, _CPU_CHUNK // images[0].numel()) if images.device.type == "cpu" else len(images)
    out = torch.cat([corruption.function(images[i:i + step], parameter, generators[i:i + step])
                     for i in range(0, len(images), step)])
    return out.to(images.device, torch.float32).clamp_(0, 1)
