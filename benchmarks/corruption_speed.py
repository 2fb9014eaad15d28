"""Corruption speed and scale: medtricks.corruptions (batched torch) vs bethgelab's imagecorruptions (numpy per image).

For each corruption, images/s at one severity (default 3) on a batch of N real images resized and centre-cropped to
SIZE (RGB: IDRiD fundus photographs; grey: NIH chest X-rays; else the MedMNIST sets upsampled; else smooth random
images), timed as the median of the repeats; imagecorruptions 1.1.2 gets the same images as uint8 H x W x C arrays,
one call per image (its API), for the eleven corruptions both have. Fidelity: on the first --fidelity-n images, the
mean absolute difference to the clean image ([0, 1] units) of ours and of theirs at each severity, so one can see that
our severities are on the same scale; for the deterministic corruptions also the mean absolute difference between the
two outputs. Prints one JSON object with the load average before and after and the platform.

imagecorruptions is not a medtricks dependency: its entries say "skipped: pip install imagecorruptions" when it is
absent. It needs OpenCV and pkg_resources, for example:
    pip install --target /tmp/icpkgs --no-deps imagecorruptions==1.1.2 opencv-python-headless "setuptools<81"
    PYTHONPATH=/tmp/icpkgs python benchmarks/corruption_speed.py
Its gaussian_blur calls skimage's gaussian(multichannel=True), removed in scikit-image 0.19: the benchmark passes
channel_axis=-1 instead (recorded under "patched").

Usage: python benchmarks/corruption_speed.py [--n 64] [--size 224] [--channels 3,1] [--severity 3] [--repeats 3]
       [--fidelity-n 16] [--threads 1]

One torch thread by default: imagecorruptions runs on one core, and on a shared machine torch's intra-op threads wait
for busy cores (measured here: 2 threads on 2 cores with another job running made contrast 100x slower than 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

from medtricks.corruptions import CORRUPTIONS, corrupt
from medtricks.data.images import read_image
from medtricks.data.transforms import create_eval_transform

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED = [name for name, c in CORRUPTIONS.items() if c.source.startswith("ImageNet-C")]  # same names in theirs
DETERMINISTIC = [name for name in SHARED if not CORRUPTIONS[name].random]
SKIPPED = "skipped: pip install imagecorruptions"


def real_images(channels: int, n: int, size: int) -> tuple[torch.Tensor, str]:
    """n images (N, C, size, size) in [0, 1] and where they come from; repeated when the set has fewer."""
    transform = create_eval_transform(size)
    folder = DATA / ("fundus-idrid" if channels == 3 else "cxr-nih") / "images"
    files = sorted(folder.rglob("*.jpg" if channels == 3 else "*.png"))[:n]
    if files:
        images = [transform(torch.from_numpy(read_image(path, channels)[0])) for path in files]
        source = f"{folder.parent.name}: {len(files)} real images"
    else:
        npz = DATA / ("retinamnist" if channels == 3 else "pneumoniamnist")
        npz = npz / f"{npz.name}.npz"
        if npz.is_file():
            pixels = np.load(npz, allow_pickle=False)["val_images"][:n]
            pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
            images = list(transform(torch.from_numpy(pixels).float() / 255))
            source = f"{npz.parent.name}: {len(images)} real 28 px images upsampled (blur changes them little)"
        else:
            g = torch.Generator().manual_seed(0)
            coarse = torch.rand(n, channels, 8, 8, generator=g)
            images = list(torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear"))
            source = f"synthetic smooth random images (no real set in {DATA})"
    return torch.stack([images[i % len(images)] for i in range(n)]), source


def load_imagecorruptions():
    """(corrupt function, version, patches) or (None, reason, [])."""
    try:
        import imagecorruptions
        import imagecorruptions.corruptions as theirs
        from skimage.filters import gaussian
    except ImportError as exc:
        return None, f"{SKIPPED} ({exc})", []

    def gaussian_compat(image, sigma, multichannel=None, **kwargs):
        return gaussian(image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)

    theirs.gaussian = gaussian_compat
    from importlib.metadata import version
    return imagecorruptions.corrupt, version("imagecorruptions"), ["skimage gaussian: multichannel -> channel_axis"]


def as_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Their input: uint8 H x W x C (C = 3) or H x W (grey) arrays."""
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [a[..., 0] if a.shape[-1] == 1 else a for a in arrays]


def their_output(theirs, image: np.ndarray, name: str, severity: int) -> np.ndarray:
    """Their corrupted image in [0, 1], H x W x C; for grey images the first of the three channels they return."""
    out = theirs(image, severity=severity, corruption_name=name).astype(np.float64) / 255
    return out[..., :1] if image.ndim == 2 else out


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def speed(images: torch.Tensor, severity: int, repeats: int, theirs) -> dict:
    arrays = as_uint8(images)
    rows = {}
    for name, corruption in CORRUPTIONS.items():
        if corruption.colour_only and images.shape[1] == 1:
            continue
        ours = len(images) / timed(lambda name=name: corrupt(images, name, severity, seed=0), repeats)
        row = {"medtricks": round(ours, 1)}
        if name in SHARED:
            if theirs is None:
                row["imagecorruptions"] = SKIPPED
            else:
                np.random.seed(0)
                per_image = timed(lambda name=name: [theirs(a, severity=severity, corruption_name=name)
                                                     for a in arrays], max(1, repeats - 1))
                row["imagecorruptions"] = round(len(arrays) / per_image, 1)
                row["speedup"] = round(ours / row["imagecorruptions"], 1)
        rows[name] = row
    return rows


def fidelity(images: torch.Tensor, theirs) -> dict:
    clean = images.permute(0, 2, 3, 1).double().numpy()
    arrays = as_uint8(images)
    rows = {}
    for name in SHARED:
        ours = [corrupt(images, name, s, seed=0).permute(0, 2, 3, 1).double().numpy() for s in range(1, 6)]
        row = {"medtricks": [round(float(np.abs(o - clean).mean()), 4) for o in ours]}
        if theirs is None:
            row["imagecorruptions"] = SKIPPED
        else:
            np.random.seed(0)
            outputs = [np.stack([their_output(theirs, a, name, s) for a in arrays]) for s in range(1, 6)]
            row["imagecorruptions"] = [round(float(np.abs(t - clean).mean()), 4) for t in outputs]
            if name in DETERMINISTIC:
                row["output_difference"] = [round(float(np.abs(o - t).mean()), 4) for o, t in zip(ours, outputs,
                                                                                                  strict=True)]
        rows[name] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images in the timed batch")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (ImageNet-C's is 224)")
    parser.add_argument("--channels", default="3,1", help="comma-separated channel counts to run: 3 and/or 1")
    parser.add_argument("--severity", type=int, default=3, choices=range(1, 6), help="severity of the timings")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per corruption (median reported)")
    parser.add_argument("--fidelity-n", type=int, default=16, help="images for the fidelity comparison (0 = none)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the same as numpy's one core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # skimage/scipy names in imagecorruptions
    load_before = os.getloadavg()
    theirs, their_version, patched = load_imagecorruptions()
    report = {
        "benchmark": "corruption_speed",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "imagecorruptions": their_version, "device": "cpu",
                    "loadavg_before": [round(x, 2) for x in load_before]},
        "settings": {"n": args.n, "size": args.size, "severity": args.severity, "repeats": args.repeats,
                     "fidelity_n": args.fidelity_n, "units": "images per second; fidelity: mean |corrupted - clean| "
                     "in [0, 1] units at severities 1-5"},
        "patched": patched,
        "runs": {},
    }
    for channels in [int(c) for c in args.channels.split(",")]:
        images, source = real_images(channels, args.n, args.size)
        run = {"images": source, "speed": speed(images, args.severity, args.repeats, theirs)}
        if args.fidelity_n:
            run["fidelity"] = fidelity(images[:args.fidelity_n], theirs)
        ratios = [row["speedup"] for row in run["speed"].values() if "speedup" in row]
        if ratios:
            run["speedup_median"] = round(statistics.median(ratios), 1)
            run["speedup_range"] = [min(ratios), max(ratios)]
        report["runs"][f"{channels}x{args.size}x{args.size}"] = run
    report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
