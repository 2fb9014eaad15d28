"""Training speed: `medtricks.finetune` epochs vs the plain fp32 PyTorch fine-tuning loop, on the same data and model.

The plain loop is what a user writes from the torchvision transfer-learning tutorial: a Dataset that opens every
image file with PIL at every epoch, RandomResizedCrop / horizontal flip / ToTensor / Normalize, a DataLoader, SGD
with momentum, CrossEntropyLoss, fp32, model.train() / model.eval() each epoch. medtricks runs the `baseline`
recipe overridden to the same model, epochs, batch size, lr and optimizer (plain SGD momentum, no weight decay, no LR
decay) plus `tricks.amp` (bfloat16 autocast on CPU) and `data.cache: memory`. Both start from the same weights
(`build_model` after the same seed, as finetune does) and see the same train/val split (a manifest with a split
column, written to a temporary folder). The first plain run is interleaved with medtricks, one epoch each in turn
(finetune's on_epoch), so both see the same load from other processes; further plain seeds give the run-to-run
noise that medtricks' val AUROC after the last epoch is compared with.

In the same process it also measures the machine's fp32 and bf16 GEMM throughput, the training FLOPs per image
(3 x torch.utils.flop_counter's count of one forward), the fraction of GEMM peak each loop reaches, and one
training step on a synthetic batch in fp32 and bf16 autocast, each with and without channels_last. Prints one JSON
object.

Usage: python benchmarks/train_speed.py [--models efficientnet_lite0,resnet18] [--epochs 3] [--batch-size 32]
       [--n 300] [--size 224] [--data ../shared/data/derm-isic] [--plain-seeds 0,1] [--augment bag_of_tricks]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from medtricks.data.dataset import default_workers
from medtricks.finetune import finetune, seed_everything
from medtricks.models.build import build_model
from medtricks.models.weights import REGISTRY, WeightsError, weights_path
from medtricks.recipe import ModelConfig
from medtricks.tricks.amp import resolve_amp_dtype

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "derm-isic"


def imagenet_offline(arch: str) -> bool:
    """Whether the arch's ImageNet file is here without a download."""
    try:
        return weights_path(REGISTRY[(arch, "imagenet")], download=False).is_file()
    except (KeyError, WeightsError):
        return False


def write_manifest(data: Path, n: int, out: Path, val_fraction: float = 0.3) -> tuple[list[str], Path]:
    """A stratified, seeded subset of `data/labels.csv` (about n images, >= 2 per class in train and val) with a
    split column; returns the sorted class names (medtricks' label order) and the manifest path."""
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_class: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_class[row["label"]].append(row)
    chosen = []
    for label, items in sorted(by_class.items()):
        random.Random(0).shuffle(items)
        k = max(4, round(n * len(items) / len(rows)))
        n_val = max(2, round(k * val_fraction))
        chosen += [(str((data / r["path"]).resolve()), label, "val" if i < n_val else "train")
                   for i, r in enumerate(items[:k])]
    manifest = out / "labels.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *chosen])
    return sorted(by_class), manifest


class FileDataset(Dataset):
    """The tutorial's dataset: decode the file with PIL at every access."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(Image.open(path).convert("RGB")), label


def plain_epochs(arch: str, weights: str, classes: list[str], manifest: Path, args, seed: int):
    """The tutorial loop in fp32, as a generator: yields once after set-up, then after each epoch a dict with the
    epoch's train images/s (training only), seconds (train + val) and val AUROC."""
    seed_everything(seed)
    model = build_model(ModelConfig(arch=arch, weights=weights), len(classes), 3)  # same weights as finetune
    mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
    net = model.backbone  # the tutorial normalizes in the transform, so the model is the bare backbone
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(), *norm])
    val_tf = transforms.Compose([transforms.Resize(round(args.size / 0.875)), transforms.CenterCrop(args.size), *norm])
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    items = {s: [(r["path"], classes.index(r["label"])) for r in rows if r["split"] == s] for s in ("train", "val")}
    train_loader = DataLoader(FileDataset(items["train"], train_tf), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers, generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(FileDataset(items["val"], val_tf), batch_size=64, num_workers=args.workers)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    yield {"n_train": len(items["train"])}
    for _ in range(args.epochs):
        tic, seen = time.perf_counter(), 0
        net.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        train_seconds = time.perf_counter() - tic
        net.eval()
        probs, truth = [], []
        with torch.no_grad():
            for images, labels in val_loader:
                probs.append(net(images).softmax(1)[:, 1])
                truth.append(labels)
        yield {"images_per_second": seen / train_seconds, "seconds": time.perf_counter() - tic,
               "val_auroc": roc_auc_score(torch.cat(truth).numpy(), torch.cat(probs).numpy())}


def run_summary(seed: int, epochs: list[dict], wall_seconds: float | None = None) -> dict:
    """One run's per-epoch images/s and val AUROC (plain-loop epochs or metrics.jsonl rows); its wall time is the
    sum of the epochs' seconds unless given."""
    wall = sum(e["seconds"] for e in epochs) if wall_seconds is None else wall_seconds
    return {"seed": seed, "epoch_images_per_second": [round(e["images_per_second"], 2) for e in epochs],
            "val_auroc": round(epochs[-1]["val_auroc"], 4), "wall_seconds": round(wall, 1),
            "val_auroc_per_epoch": [round(e["val_auroc"], 4) for e in epochs]}


def medtricks_vs_plain(arch: str, weights: str, classes: list[str], manifest: Path, out: Path, args,
                       seed: int) -> tuple[dict, dict, int]:
    """`finetune(baseline + overrides)` with one plain-loop epoch run after each medtricks epoch (on_epoch), so
    both see the same machine load; medtricks figures from metrics.jsonl, its wall time without the plain epochs."""
    overrides = [f"model.arch={arch}", f"model.weights={weights}", "data.channels=3", f"data.image_size={args.size}",
                 f"data.augment={args.augment}", "data.cache=memory", f"train.epochs={args.epochs}",
                 f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.momentum=0.9",
                 "train.nesterov=false", "train.weight_decay=0", "train.device=cpu", "tricks.step_decay=null",
                 "tricks.amp={}"]
    plain, plain_rows = plain_epochs(arch, weights, classes, manifest, args, seed), []
    n_train = next(plain)["n_train"]

    def plain_epoch(_row: dict) -> None:
        rng = torch.get_rng_state()  # leave medtricks' random stream as it would be without the plain loop
        plain_rows.append(next(plain))
        torch.set_rng_state(rng)

    started = time.perf_counter()
    run = finetune("baseline", data=manifest, out=out, overrides=overrides, seed=seed, on_epoch=plain_epoch)
    wall = time.perf_counter() - started - sum(r["seconds"] for r in plain_rows)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run_summary(seed, rows, wall), run_summary(seed, plain_rows), n_train


def gemm_gflops(n: int = 2048, repeats: int = 10) -> dict:
    """Best-of-`repeats` GFLOP/s of an n x n matmul in fp32 and bf16, interleaved."""
    mats = {dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(mats, float("inf"))
    for _ in range(repeats + 1):
        for dt, (a, b) in mats.items():
            tic = time.perf_counter()
            torch.matmul(a, b)
            best[dt] = min(best[dt], time.perf_counter() - tic)
    return {str(dt).removeprefix("torch."): round(2 * n**3 / best[dt] / 1e9, 1) for dt in mats}


def train_flops_per_image(arch: str, size: int) -> float:
    """Training FLOPs per image: 3 x the forward's conv/matmul FLOPs (backward = grad input + grad weight).

    Counted on the forward only: torch.utils.flop_counter's convolution_backward formula ignores `groups`, so it
    counts a depthwise conv's weight gradient C times over (32 GFLOP instead of about 1.5 for EfficientNet-Lite0
    at 224 px); for resnet18 the counted forward + backward is within 2% of 3 x forward.
    """
    model = build_model(ModelConfig(arch=arch, weights="none"), 2, 3).train()
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(2, 3, size, size))
    return 3 * counter.get_total_flops() / 2


def step_times(arch: str, args) -> dict:
    """Seconds of one SGD training step on a synthetic batch: fp32, fp32 + channels_last, bf16 autocast, bf16 +
    channels_last, interleaved. Ratios use the fastest of the repeats, the least disturbed by other processes."""
    torch.manual_seed(0)
    images, labels = torch.rand(args.batch_size, 3, args.size, args.size), torch.randint(0, 2, (args.batch_size,))
    nchw, nhwc = torch.contiguous_format, torch.channels_last
    variants = {"fp32": (None, nchw), "fp32_channels_last": (None, nhwc), "bf16": (torch.bfloat16, nchw),
                "bf16_channels_last": (torch.bfloat16, nhwc)}
    setups = {}
    for name, (dtype, fmt) in variants.items():
        model = build_model(ModelConfig(arch=arch, weights="none"), 2, 3).train().to(memory_format=fmt)
        setups[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), dtype,
                        images.contiguous(memory_format=fmt))
    seconds = defaultdict(list)
    for repeat in range(args.step_repeats + 1):  # repeat 0 warms up (oneDNN primitives, allocator)
        for name in (list(setups) if repeat % 2 else list(setups)[::-1]):
            model, optimizer, dtype, x = setups[name]
            tic = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = F.cross_entropy(model(x).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if repeat:
                seconds[name].append(time.perf_counter() - tic)
    best = {name: min(s) for name, s in seconds.items()}
    return {"batch_size": args.batch_size, "seconds_min": {k: round(v, 4) for k, v in best.items()},
            "seconds_median": {k: round(statistics.median(s), 4) for k, s in seconds.items()},
            "images_per_second_best": {k: round(args.batch_size / v, 2) for k, v in best.items()},
            "speedup_vs_fp32": {k: round(best["fp32"] / v, 3) for k, v in best.items()}}


def summarize(ips: list[float]) -> dict:
    """First epoch, mean of the later ones, and the fastest later epoch (the least slowed by other processes)."""
    later = ips[1:] or ips
    return {"first_epoch": ips[0], "later_epochs": round(statistics.mean(later), 2), "best_later_epoch": max(later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18", help="comma-separated model.arch values")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--n", type=int, default=300, help="about this many images (stratified subset)")
    parser.add_argument("--size", type=int, default=224, help="training image side in pixels")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with labels.csv (path,label)")
    parser.add_argument("--plain-seeds", default="0,1", help="seeds of the plain loop (run-to-run noise)")
    parser.add_argument("--augment", default="bag_of_tricks", help="medtricks data.augment preset")
    parser.add_argument("--workers", type=int, default=default_workers(), help="plain loop DataLoader workers")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed synthetic steps per variant")
    args = parser.parse_args()
    if not (args.data / "labels.csv").is_file():
        print(json.dumps({"benchmark": "train_speed", "skipped": f"{args.data}/labels.csv not found: this benchmark "
                          "needs a real image set with a path,label manifest (../shared/data/derm-isic)."}))
        return
    seeds, load_start = [int(s) for s in args.plain_seeds.split(",")], os.getloadavg()
    results, gemm = {}, gemm_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        classes, manifest = write_manifest(args.data, args.n, Path(tmp))
        for arch in args.models.split(","):
            weights = "imagenet" if imagenet_offline(arch) else "none"
            mt, plain0, n_train = medtricks_vs_plain(arch, weights, classes, manifest, Path(tmp) / f"run-{arch}",
                                                     args, seeds[0])
            plain = [plain0] + [run_summary(s, list(plain_epochs(arch, weights, classes, manifest, args, s))[1:])
                                for s in seeds[1:]]
            plain_ips = summarize(plain0["epoch_images_per_second"])  # the run interleaved with medtricks
            mt_ips = summarize(mt["epoch_images_per_second"])
            aurocs = [p["val_auroc"] for p in plain]
            results[arch] = {
                "weights": weights if weights == "imagenet" else "none (no ImageNet file offline; same random init)",
                "plain_fp32": {"runs": plain, "images_per_second": plain_ips},
                "medtricks": {**mt, "images_per_second": mt_ips},
                "speed_ratio": {k: round(mt_ips[k] / plain_ips[k], 3) for k in mt_ips},
                "end_to_end_ratio": round(plain0["wall_seconds"] / mt["wall_seconds"], 3),
                "val_auroc": {"medtricks": mt["val_auroc"], "plain": aurocs, "plain_range": [min(aurocs), max(aurocs)]},
                "train_gflop_per_image": round(train_flops_per_image(arch, args.size) / 1e9, 3),
                "train_step_synthetic": step_times(arch, args),
            }
    gemm = {k: max(v, gemm_gflops()[k]) for k, v in gemm.items()}  # best of start and end: the machine is shared
    for result in results.values():  # best later epoch (least disturbed) against the best GEMM rate
        gflops = {k: result["train_gflop_per_image"] * result[k]["images_per_second"]["best_later_epoch"]
                  for k in ("plain_fp32", "medtricks")}
        result["fraction_of_gemm_peak"] = {"plain_vs_fp32": round(gflops["plain_fp32"] / gemm["float32"], 3),
                                           "medtricks_vs_bf16": round(gflops["medtricks"] / gemm["bfloat16"], 3),
                                           "medtricks_vs_fp32": round(gflops["medtricks"] / gemm["float32"], 3)}
    print(json.dumps({
        "benchmark": "train_speed",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "amp_dtype": str(resolve_amp_dtype(torch.device("cpu"))), "gemm_gflops": gemm,
                    "loadavg_1_5_15min": {"start": load_start, "end": os.getloadavg()}},
        "settings": {"data": str(args.data), "n_train": n_train, "size": args.size, "epochs": args.epochs,
                     "batch_size": args.batch_size, "lr": args.lr, "optimizer": "sgd momentum 0.9, constant lr",
                     "medtricks_recipe": f"baseline + augment {args.augment}, cache memory, tricks.amp",
                     "plain_workers": args.workers, "medtricks_workers": default_workers(), "plain_seeds": seeds,
                     "medtricks_seed": seeds[0], "images_per_second": "training only (val excluded); ratios use "
                     "the plain run interleaved with medtricks (first seed); first epoch includes worker start-up; "
                     "medtricks decodes into its cache before epoch 1 (in its wall_seconds, which is the whole "
                     "finetune call; the plain wall_seconds is its epochs, train + val)"},
        "models": results,
    }, indent=2))


if __name__ == "__main__":
    main()
