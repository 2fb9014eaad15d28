"""Data throughput: DICOM decode + transform for a first (uncached) epoch vs a cached epoch, side by side.

Writes N synthetic 16-bit DICOM radiographs of realistic size (2000 x 2000 by default) to a temporary folder,
then in one process measures, on the same files and settings:
- `no_cache_epoch`: what a plain pipeline does every epoch (decode, window, resize, augment), cache: none;
- `first_epoch`: medtricks' first epoch (decode once into the cache, then augment);
- `cached_epoch`: a later epoch (augment from the uint16 cache only);
and prints one JSON object with images/s, the ratios and the peak resident memory.

Then (unless --train-epochs 0) it fine-tunes on the same files with `medtricks.finetune` (the demo recipe at
--image-size px: efficientnet_lite0, bfloat16 autocast where the CPU has it, the DataLoader workers finetune
chooses) and reports, per epoch, the share of the training time the loop spent blocked waiting for the next batch
(metrics.jsonl `data_wait_seconds` / `seconds`): epoch 1 decodes into the cache, later epochs read it.

With --scaling 1000,4000 it instead runs the measurements above (no fine-tune) once per N, each in a fresh
process, and reports peak memory against N: with the disk cache it must not grow with the data set.

Usage: python benchmarks/data_throughput.py [--n 48] [--size 2000] [--cache memory|disk] [--workers 2]
       [--train-epochs 3] [--batch-size 32] [--scaling 1000,4000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from medtricks.data.dataset import ImageDataset, ImageStore, default_workers, prepare_images
from medtricks.data.sources import load_source
from medtricks.data.synth import synthesize
from medtricks.data.transforms import cache_size, create_train_transform


def _epoch(dataset: ImageDataset, workers: int, batch_size: int = 16) -> float:
    start = time.perf_counter()
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                            persistent_workers=False):
        assert torch.isfinite(batch["image"]).all()
    return time.perf_counter() - start


def _rate(n: int, seconds: float) -> dict:
    return {"seconds": round(seconds, 3), "images_per_second": round(n / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="number of DICOM files")
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="model input side")
    parser.add_argument("--cache", choices=["memory", "disk"], default="memory")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--train-epochs", type=int, default=3, help="fine-tune epochs (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tune batch size")
    parser.add_argument("--scaling", help="comma-separated data set sizes: peak memory per size, no fine-tune")
    args = parser.parse_args()
    if args.scaling:
        print(json.dumps(_scaling(args, [int(n) for n in args.scaling.split(",")]), indent=2))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        synthesize(Path(tmp) / "dicoms", n=args.n, seed=0, size=args.size)
        synth_seconds = time.perf_counter() - started
        records = load_source(Path(tmp) / "dicoms").records
        max_side = cache_size(args.image_size, 0.875)
        transform = create_train_transform("cxr", args.image_size, 1)

        plain = ImageDataset(ImageStore(records, 1, max_side, "none"), range(len(records)), transform)
        no_cache = _epoch(plain, args.workers)

        store = ImageStore(records, 1, max_side, args.cache, cache_dir=Path(tmp) / "cache")
        dataset = ImageDataset(store, range(len(records)), transform)
        started = time.perf_counter()
        ok, problems, _ = prepare_images(store, workers=args.workers)
        first = time.perf_counter() - started + _epoch(dataset, args.workers)
        cached = min(_epoch(dataset, args.workers) for _ in range(2))
        assert len(ok) == len(records) and not problems
        training = _training(Path(tmp), args) if args.train_epochs > 0 else None

    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({
        "benchmark": "data_throughput",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "settings": {"n": args.n, "dicom_size": args.size, "bits": 16, "image_size": args.image_size,
                     "cache": args.cache, "workers": args.workers, "augment": "cxr"},
        "synth_seconds": round(synth_seconds, 2),
        "no_cache_epoch": _rate(args.n, no_cache),
        "first_epoch": _rate(args.n, first),
        "cached_epoch": _rate(args.n, cached),
        "cached_vs_first": round(first / cached, 2),
        "cached_vs_no_cache": round(no_cache / cached, 2),
        "peak_rss_mb": {"main": round(peak_self, 1), "largest_worker": round(peak_children, 1)},
        "training": training,
    }, indent=2))


def _scaling(args: argparse.Namespace, sizes: list[int]) -> dict:
    """This benchmark without the fine-tune, once per data set size in its own process (so each peak is its own)."""
    runs = {}
    for n in sizes:
        command = [sys.executable, __file__, "--n", str(n), "--size", str(args.size), "--image-size",
                   str(args.image_size), "--cache", args.cache, "--workers", str(args.workers), "--train-epochs", "0"]
        runs[n] = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    small, large = runs[min(sizes)]["peak_rss_mb"], runs[max(sizes)]["peak_rss_mb"]
    return {"benchmark": "data_throughput_scaling",
            "settings": {"sizes": sizes, "dicom_size": args.size, "image_size": args.image_size, "cache": args.cache,
                         "workers": args.workers},
            "runs": {str(n): {key: runs[n][key] for key in ("first_epoch", "cached_epoch", "peak_rss_mb")}
                     for n in sizes},
            "peak_rss_largest_vs_smallest": {part: round(large[part] / small[part], 3) for part in small}}


def _training(tmp: Path, args: argparse.Namespace) -> dict:
    """Fine-tune on the DICOMs and return each epoch's images/s and share of time spent waiting for data."""
    from medtricks.finetune import finetune

    overrides = [f"data.image_size={args.image_size}", f"data.cache={args.cache}", "data.synth_if_missing=false",
                 f"train.epochs={args.train_epochs}", f"train.batch_size={args.batch_size}"]
    run = finetune("demo", data=tmp / "dicoms", out=tmp / "run", overrides=overrides)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [{"epoch": row["epoch"], "images_per_second": round(row["images_per_second"], 2),
               "data_wait_share": round(row["data_wait_seconds"] / row["seconds"], 4)} for row in rows]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    later = [e["data_wait_share"] for e in epochs[1:]]
    return {"recipe": "demo", "overrides": overrides, "arch": recipe["model"]["arch"],
            "workers": default_workers() if recipe["data"]["workers"] is None else recipe["data"]["workers"],
            "epochs": epochs,
            "cached_epochs_max_data_wait_share": max(later) if later else None}


if __name__ == "__main__":
    main()
