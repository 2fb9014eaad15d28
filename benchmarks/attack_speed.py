"""Attack speed: medtricks PGD (or APGD) vs torchattacks PGD (or APGD) on the same model, batch and settings.

Builds an ImageNet-pretrained backbone with a new 2-class head (offline weights: efficientnet_lite0), writes N
synthetic phantom radiographs to a temporary folder and labels each with the model's own clean prediction, so clean
accuracy is 100% and every image is something to break. Then, in one process, times `medtricks.attacks.pgd`
(early exit on, random start) and `torchattacks.PGD` (same eps, alpha = 2.5 * eps / steps, steps, random start) on
the same batch, alternating which goes first over the repeats, and prints one JSON object with the median images/s,
their ratio, and for each the robust accuracy on the final iterates (both take every image through every step, as
`medtricks attack` does), plus medtricks' per-image worst case over its iterates (what its reports call robust
accuracy: <= the final-iterate figure). The labels are the model's own predictions, often one class on phantoms, so
no AUROC here: tests/test_attacks.py compares AUROC under attack with torchattacks on a two-class task.

With `--attack apgd`: `medtricks.apgd.apgd` (cross-entropy) against `torchattacks.APGD` (loss "ce", same eps,
steps, one restart); both report robust accuracy as the per-image worst case over the iterates (torchattacks'
APGD returns each example's first successful iterate), so the two figures are directly comparable.

Usage: python benchmarks/attack_speed.py [--attack pgd|apgd] [--n 64] [--size 128] [--steps 10] [--eps 2/255]
       [--arch efficientnet_lite0] [--channels 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medtricks.apgd import apgd
from medtricks.attacks import pgd
from medtricks.data.images import read_image
from medtricks.data.sources import image_files
from medtricks.data.synth import synthesize
from medtricks.data.transforms import create_eval_transform
from medtricks.models import create_model
from medtricks.robustness import parse_eps


def phantom_batch(n: int, size: int, channels: int) -> torch.Tensor:
    """n phantom radiographs (display intensities in [0, 1]) resized and centre-cropped to size x size."""
    transform = create_eval_transform(size)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp) / "phantoms", n=max(n, 4), seed=0, size=max(32, min(size * 2, 512)))
        files = image_files(Path(tmp) / "phantoms" / "images")[:n]
        return torch.stack([transform(torch.from_numpy(read_image(path, channels)[0])) for path in files])


def robust_accuracy(model: torch.nn.Module, adv: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(adv).argmax(1) == labels).float().mean())



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", default="pgd", choices=["pgd", "apgd"], help="which attack to compare")
    parser.add_argument("--n", type=int, default=64, help="images in the batch")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--eps", default="2/255", help="L-inf budget in [0, 1] units, e.g. 2/255")
    parser.add_argument("--arch", default="efficientnet_lite0", help="backbone (ImageNet weights must be offline)")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each attack (median reported)")
    args = parser.parse_args()
    import torchattacks  # the baseline; imported here so --help works without it

    (eps,) = parse_eps(args.eps)
    step_size = 2.5 * eps / args.steps
    torch.manual_seed(0)
    model = create_model(args.arch, 2, args.channels, weights="imagenet").eval()
    images = phantom_batch(args.n, args.size, args.channels)
    with torch.inference_mode():
        labels = model(images).argmax(1)  # the model's own predictions: clean accuracy 100%
    clean = robust_accuracy(model, images, labels)

    def run_medtricks(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if args.attack == "apgd":
            return apgd(model, images, labels, eps, steps=args.steps, generator=torch.Generator().manual_seed(seed),
                        return_broken=True)
        return pgd(model, images, labels, eps, steps=args.steps, step_size=step_size, random_start=True,
                   generator=torch.Generator().manual_seed(seed), return_broken=True)

    def run_torchattacks(seed: int) -> tuple[torch.Tensor, None]:
        torch.manual_seed(seed)  # torchattacks draws its random start from the global generator
        if args.attack == "apgd":
            attack = torchattacks.APGD(model, eps=eps, steps=args.steps, n_restarts=1, seed=seed, loss="ce")
        else:
            attack = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=args.steps, random_start=True)
        return attack(images, labels), None

    attacks = {"medtricks": run_medtricks, "torchattacks": run_torchattacks}
    seconds = {name: [] for name in attacks}
    accuracies = {name: [] for name in attacks}
    worst_case = []
    run_attack(attacks["medtricks"], 0)  # warm-up (allocator, kernels) outside the timings
    for repeat in range(args.repeats):
        order = list(attacks) if repeat % 2 == 0 else list(attacks)[::-1]
        for name in order:
            (adv, broken), took = run_attack(attacks[name], repeat)
            seconds[name].append(took)
            accuracies[name].append(robust_accuracy(model, adv, labels))
            if broken is not None:
                worst_case.append(1.0 - float(broken.float().mean()))
        assert not model.training and all(p.grad is None for p in model.parameters())

    summary = {name: {"images_per_second": round(args.n / statistics.median(seconds[name]), 2),
                      "seconds_median": round(statistics.median(seconds[name]), 4),
                      "robust_accuracy": round(statistics.median(accuracies[name]), 4)}
               for name in attacks}
    summary["medtricks"]["robust_accuracy_worst_case"] = round(statistics.median(worst_case), 4)
    print(json.dumps({
        "benchmark": "attack_speed",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torchattacks": torchattacks.__version__, "device": "cpu"},
        "settings": {"attack": args.attack, "n": args.n, "size": args.size, "channels": args.channels,
                     "arch": args.arch,
                     "weights": "imagenet", "norm": "linf", "eps": eps, "eps_text": args.eps, "steps": args.steps,
                     "step_size": step_size if args.attack == "pgd" else "apgd: 2 eps, halved at checkpoints",
                     "random_start": True, "repeats": args.repeats,
                     "labels": "the model's own clean predictions"},
        "clean_accuracy": clean,
        **summary,
        "speed_ratio": round(summary["medtricks"]["images_per_second"]
                             / summary["torchattacks"]["images_per_second"], 3),
        "robust_accuracy_difference": round(summary["medtricks"]["robust_accuracy"]
                                            - summary["torchattacks"]["robust_accuracy"], 4),
    }, indent=2))


def run_attack(attack, seed: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    adv = attack(seed)
    return adv, time.perf_counter() - started


if __name__ == "__main__":
    main()
