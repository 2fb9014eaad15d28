"""Recipe vs plain fine-tune on images neither model saw: K-fold cross-validation of a MedMNIST-style .npz.

When a data set's own validation split is too small or too easy to tell two training procedures apart (the 270
PneumoniaMNIST val images: both score AUROC 0.997), this pools its train and val images and, for each of K
stratified folds, holds the fold out as a test split and lets both procedures train on the rest exactly as a user
would run them (their own seeded train/val split, best-val epoch, validation threshold). Every image is then
test once, so K folds score all N images instead of the 270.

- `recipe`: the bundled (or YAML) recipe as it is, plus any --set.
- `plain`: the issue's plain fine-tune: the same backbone and ImageNet weights at --plain-size px, Adam (AdamW with
  weight decay 0) at lr 1e-3, no augmentation, no tricks, the best-val-AUROC epoch and the toolkit's default
  (Youden) threshold; its other settings (epochs, batch) are the recipe's.

Per fold: each run's test AUROC / accuracy / balanced accuracy (report.json) and the paired tests of
`medtricks.compare` on the fold's test images (DeLong, McNemar at each run's own threshold). For a binary task
also `threshold_methods`: each run's test accuracy at the threshold every method of
medtricks.metrics.choose_threshold estimates on the run's own val predictions (the same model, only the operating
point differs). Summary: mean +- sd over folds, the paired difference recipe - plain over folds with a 95% t
interval (medtricks.stats.paired_difference), and one exact McNemar test on the counts pooled over folds (each
image is in one fold only, so the counts are independent).

Finished runs under --out are reused, so a killed benchmark continues where it stopped, and a second recipe (a
YAML path, or other --set values) can be measured against the same folds and plain runs with another --arm name.

Usage: python benchmarks/recipe_vs_plain.py --recipe pneumoniamnist --data ../shared/data/pneumoniamnist
       [--folds 5] [--seed 0] [--plain-size 64] [--set key=value ...] [--arm recipe] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from medtricks.ablate import AblationError, _check_same_recipe
from medtricks.compare import _scored, compare_predictions
from medtricks.finetune import finetune
from medtricks.metrics import choose_threshold, compute_metrics
from medtricks.recipe import THRESHOLD_METHODS, load_recipe, load_recipe_from_dict
from medtricks.runs import REPORT_FILE, open_run
from medtricks.stats import mcnemar_p_value, paired_difference

PLAIN = ["train.optimizer=adamw", "train.lr=0.001", "train.weight_decay=0", "data.augment=none",
         "train.select_metric=auroc", "train.threshold=youden"]
METRICS = ("auroc", "accuracy", "balanced_accuracy")


def find_npz(path: Path) -> Path:
    if path.suffix == ".npz":
        return path
    found = sorted(path.glob("*.npz"))
    if len(found) != 1:
        sys.exit(f"{path}: expected one .npz file (a MedMNIST-style set), found {len(found)}.")
    return found[0]


def write_folds(npz: Path, folds: int, seed: int, out: Path) -> list[Path]:
    """One folder per fold holding fold.npz: test = the fold, train/val = the other images, stratified, val the
    same share as the source's own val split."""
    data = np.load(npz, allow_pickle=False)
    images = np.concatenate([data["train_images"], data["val_images"]])
    labels = np.concatenate([data["train_labels"], data["val_labels"]]).reshape(-1)
    val_share = len(data["val_labels"]) / len(labels)
    folders = []
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (rest, test) in enumerate(splitter.split(images, labels)):
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
        folder = out / "folds" / f"fold-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "fold.npz").exists():
            arrays = {f"{name}_{kind}": (images if kind == "images" else labels[:, None])[index]
                      for name, index in (("train", train), ("val", val), ("test", test))
                      for kind in ("images", "labels")}
            np.savez(folder / "fold.tmp.npz", **arrays)
            (folder / "fold.tmp.npz").rename(folder / "fold.npz")
        folders.append(folder)
    return folders


def plain_recipe(recipe_name: str, overrides: list[str], size: int):
    raw = load_recipe(recipe_name, overrides).to_dict()
    raw["tricks"] = {}
    return load_recipe_from_dict(raw, [*PLAIN, f"data.image_size={size}"])


def run_once(recipe, data: Path, out: Path) -> dict:
    """report.json of the run in `out`, training (or resuming) it first unless it is finished; a run made with
    another recipe is never reused."""
    try:
        exists = _check_same_recipe(out, recipe)
    except AblationError as exc:
        sys.exit(f"{exc} Here: measure another recipe under another --arm name.")
    if not (out / REPORT_FILE).exists():
        if exists:
            finetune(None, data=data, out=out, resume=True)
        else:
            finetune(recipe, data=data, out=out)
    return json.loads((out / REPORT_FILE).read_text())


def score(run: Path) -> dict:
    """A run's model.json and its (keys, labels, probs) on the fold's val and test splits, each predicted once."""
    opened = open_run(run)
    return {"info": opened.info, **{split: _scored(opened, opened.source, split)[:3] for split in ("val", "test")}}


def paired_test(scored: dict) -> dict:
    """compare_predictions on the fold's test images, recipe (A) vs plain (B), each at its own threshold."""
    (keys, labels, probs_a), (keys_b, _, probs_b) = scored["recipe"]["test"], scored["plain"]["test"]
    if keys != keys_b:
        sys.exit("the two arms scored different test images: their runs were not made on the same fold.npz.")
    result = compare_predictions(labels, probs_a, probs_b, scored["recipe"]["info"].get("threshold"),
                                 scored["plain"]["info"].get("threshold"))
    return {key: result[key] for key in ("n", "auroc", "accuracy")}


def threshold_methods(scored: dict) -> dict:
    """Test accuracy of a binary run's model at the threshold each method estimates on the run's val split."""
    (_, val_labels, val_probs), (_, labels, probs) = scored["val"], scored["test"]
    result = {}
    for method in THRESHOLD_METHODS:
        threshold = choose_threshold(val_labels, val_probs, method)
        metrics = compute_metrics(labels, probs, threshold=threshold, n_boot=0)
        result[method] = {"threshold": round(threshold, 4), **{m: metrics[m] for m in METRICS[1:]}}
    return result


def summarize_thresholds(per_fold: list[dict]) -> dict:
    """Mean test accuracy per arm and method, and logistic - youden paired over every run."""
    summary = {arm: {method: round(float(np.mean([fold["threshold_methods"][arm][method]["accuracy"]
                                                   for fold in per_fold])), 4) for method in THRESHOLD_METHODS}
               for arm in ("recipe", "plain")}
    runs = [fold["threshold_methods"][arm] for fold in per_fold for arm in ("recipe", "plain")]
    summary["logistic_minus_youden_accuracy"] = paired_difference([r["logistic"]["accuracy"] for r in runs],
                                                                  [r["youden"]["accuracy"] for r in runs])
    return summary


def summarize(per_fold: list[dict]) -> dict:
    summary = {}
    for metric in METRICS:
        values = {arm: [fold[arm][metric] for fold in per_fold] for arm in ("recipe", "plain")}
        summary[metric] = {**{arm: {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)), 4)
                                     if len(v) > 1 else None} for arm, v in values.items()},
                           "recipe_minus_plain": paired_difference(values["recipe"], values["plain"])}
    a_only = sum(fold["compare"]["accuracy"]["mcnemar"]["a_only"] for fold in per_fold)
    b_only = sum(fold["compare"]["accuracy"]["mcnemar"]["b_only"] for fold in per_fold)
    n = sum(fold["compare"]["n"] for fold in per_fold)
    summary["pooled_mcnemar"] = {"images": n, "recipe_only_right": a_only, "plain_only_right": b_only,
                                 "accuracy_difference": round((a_only - b_only) / n, 4),
                                 "p_value": mcnemar_p_value(a_only, b_only)}
    if all("threshold_methods" in fold for fold in per_fold):
        summary["threshold_methods"] = summarize_thresholds(per_fold)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pneumoniamnist")
    parser.add_argument("--data", type=Path, required=True, help="a MedMNIST-style .npz or a folder holding one")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="fold assignment and both runs' seed")
    parser.add_argument("--plain-size", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override (both arms)")
    parser.add_argument("--set-recipe", dest="recipe_overrides", action="append", default=[],
                        help="override of the recipe arm only")
    parser.add_argument("--arm", default="recipe", help="folder name of the recipe's runs under --out")
    parser.add_argument("--out", type=Path, default=Path("runs/recipe_vs_plain"))
    args = parser.parse_args()

    overrides = [*args.overrides, f"seed={args.seed}"]
    recipe = load_recipe(args.recipe, [*overrides, *args.recipe_overrides])
    plain = plain_recipe(args.recipe, overrides, args.plain_size)
    per_fold = []
    for k, folder in enumerate(write_folds(find_npz(args.data), args.folds, args.seed, args.out)):
        runs = {"recipe": args.out / args.arm / f"fold-{k}", "plain": args.out / "plain" / f"fold-{k}"}
        reports = {arm: run_once(r, folder, runs[arm]) for arm, r in (("recipe", recipe), ("plain", plain))}
        scored = {arm: score(runs[arm]) for arm in runs}
        per_fold.append({"fold": k, **{arm: {m: reports[arm]["splits"]["test"][m] for m in METRICS}
                                       for arm in reports},
                         "seconds": {arm: reports[arm]["train"]["seconds"] for arm in reports},
                         "compare": paired_test(scored)})
        if len(reports["recipe"]["classes"]) == 2:
            per_fold[-1]["threshold_methods"] = {arm: threshold_methods(scored[arm]) for arm in runs}
        print(f"fold {k}: recipe {per_fold[-1]['recipe']}  plain {per_fold[-1]['plain']}", file=sys.stderr)
    plain_settings = [*PLAIN, f"data.image_size={args.plain_size}", "tricks: none"]
    result = {"settings": {"recipe": args.recipe, "data": str(args.data), "folds": args.folds, "seed": args.seed,
                           "overrides": args.overrides, "arm": args.arm, "recipe_overrides": args.recipe_overrides,
                           "plain": plain_settings},
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "folds": per_fold, "summary": summarize(per_fold)}
    text = json.dumps(result, indent=2)
    (args.out / f"{args.arm}_vs_plain.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
