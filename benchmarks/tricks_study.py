"""The tricks study (issue 17): cross-validated ablations of the bag of tricks and of BatchNorm resets.

For each data set, two `medtricks ablate --folds 5` commands (printed, then run; each resumable with the same --out):
- `main`: a plain reference (the data set's recipe with every trick off: constant lr, no warmup, no label
  smoothing, no EMA, no AMP) and one variant per question, each the reference with exactly the named keys changed:
  warmup (1 epoch), cosine and step decay (vs the reference's constant lr), label smoothing 0.1, mixup alpha 0.2,
  class balance (loss weights; only where the classes are imbalanced), and per-stage zero-gamma and one-gamma
  resets of the last BN of every residual block of the pretrained network in three stage choices.
- `linear-scaling`: at twice the recipe's batch, the lr kept as tuned for the recipe's batch (reference) vs scaled
  linearly with the batch (variant: tricks.linear_scaling with base_batch = the recipe's batch).

Fixed before the study, inside the training folds (never by looking at a held-out fold): each run selects its epoch
by validation AUROC and its binary threshold by Youden's J on a validation split of its own training folds (the
toolkit's defaults), one seed (0), 5 patient-grouped, label-stratified folds; image sizes and epochs were chosen
so that a data set fits in about an hour of 2 CPU cores, before any study run (see SETS).

Usage: python benchmarks/tricks_study.py --data-root ../shared/data [--out runs/study] [--only retinamnist]
       [--part main|linear-scaling] [--print] [--summary] [--markdown]
  --print    only print the commands; --summary only summarise the finished ablation.json files as JSON;
  --markdown only print the README's tables and the method-card lines from them.
Run two sets side by side on 2 cores with OMP_NUM_THREADS=1 each (about 1.3x the throughput of one process).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

# Per data set: the shipped recipe it starts from, its folder under --data-root, and the study's size settings.
# lr: the recipe's effective lr at its batch (its lr x batch / 256 under its linear scaling).
SETS = {
    "retinamnist": {"recipe": "fundus_dr", "folder": "retinamnist", "image_size": 64, "epochs": 6, "batch": 32,
                    "lr": 0.05, "imbalanced": True,
                    # the study ran with SGD before fundus_dr reported kappa, used AdamW and TTA; its runs stay
                    "sets": ["data.ordinal=false", "train.optimizer=sgd", "train.tta=false"]},
    "derm-isic": {"recipe": "dermoscopy", "folder": "derm-isic", "image_size": 64, "epochs": 6, "batch": 32,
                  "lr": 0.025, "imbalanced": True,
                  "sets": ["train.optimizer=sgd"]},  # the study ran with SGD, before dermoscopy moved to AdamW
    "pneumoniamnist": {"recipe": "pneumoniamnist", "folder": "pneumoniamnist", "image_size": 64, "epochs": 4,
                       "batch": 64, "lr": 0.1, "imbalanced": False},  # the shared copy is balanced 1214/1214
}
FOLDS = 5
SEEDS = 1
# efficientnet_lite0 stages with residual blocks: blocks.1 and blocks.2 (1 each), blocks.3 and blocks.4 (2 each),
# blocks.5 (3); blocks.0 and blocks.6 have none.
STAGE_CHOICES = {"early": "[blocks.1, blocks.2]", "middle": "[blocks.3, blocks.4]", "late": "[blocks.5]"}
TRICK_VARIANTS = {
    "warmup": "tricks.warmup={epochs: 1}",
    "cosine": "tricks.cosine={}",
    "step-decay": "tricks.step_decay={}",
    "label-smoothing": "tricks.label_smoothing={smoothing: 0.1}",
    "mixup": "tricks.mixup={alpha: 0.2}",
    "class-balance": "tricks.class_balance={mode: loss}",
}


def reference_settings(spec: dict, batch: int) -> list[str]:
    return ["tricks={}", f"data.image_size={spec['image_size']}", f"train.epochs={spec['epochs']}",
            f"train.batch_size={batch}", f"train.lr={spec['lr']}", "train.select_metric=auroc",
            "train.threshold=youden", *spec.get("sets", [])]


def main_variants(spec: dict) -> list[str]:
    out = [f"{name}:{change}" for name, change in TRICK_VARIANTS.items()
           if name != "class-balance" or spec["imbalanced"]]
    for gamma in ("zero", "one"):
        out += [f"{gamma}-gamma-{where}:model.bn_reset=[{{stages: {stages}, gamma: {gamma}}}]"
                for where, stages in STAGE_CHOICES.items()]
    return out


def commands(name: str, spec: dict, data_root: Path, out: Path) -> dict[str, list[str]]:
    """{ablation: argv} for one data set."""
    def argv(part: str, sets: list[str], variant_specs: list[str]) -> list[str]:
        args = ["medtricks", "ablate", "--recipe", spec["recipe"], "--data", str(data_root / spec["folder"]),
                "--folds", str(FOLDS), "--seeds", str(SEEDS), "--out", str(out / name / part), "--quiet"]
        for s in sets:
            args += ["--set", s]
        for v in variant_specs:
            args += ["--variant", v]
        return args

    doubled = reference_settings(spec, 2 * spec["batch"])
    return {"main": argv("main", reference_settings(spec, spec["batch"]), main_variants(spec)),
            "linear-scaling": argv("linear-scaling", doubled,
                                   [f"linear-scaling:tricks.linear_scaling={{base_batch: {spec['batch']}}}"])}


NAMES = {"retinamnist": "RetinaMNIST", "derm-isic": "ISIC UDA-1", "pneumoniamnist": "PneumoniaMNIST"}
METRICS = {"auroc": "AUROC", "balanced_accuracy": "bal. acc."}


def _effect(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['difference']:+.3f}" + ("" if lo is None else f" [{lo:+.3f}, {hi:+.3f}]")


def markdown(out: Path) -> str:
    """The study's tables (one per data set, from its ablation.json files) and one method-card line per question."""
    lines, cards = [], {}
    for name, label in NAMES.items():
        results = {part: json.loads((out / name / part / "ablation.json").read_text())
                   for part in ("main", "linear-scaling") if (out / name / part / "ablation.json").is_file()}
        if not results:
            continue
        lines += [f"**{label}**", "", "| variant − reference | Δ AUROC [95% CI] | verdict | Δ bal. acc. [95% CI] | "
                  "verdict | pooled DeLong Δ AUROC (p) | pooled McNemar Δ acc. (p) |", "|---|---|---|---|---|---|---|"]
        for part, result in results.items():
            reference = result["variants"]["reference"]["summary"]
            lines.append(f"| *reference ({part}): held-out AUROC {reference['auroc']['mean']:.3f} ± "
                         f"{reference['auroc']['sd']:.3f}, bal. acc. {reference['balanced_accuracy']['mean']:.3f} ± "
                         f"{reference['balanced_accuracy']['sd']:.3f} (mean ± sd over folds)* | | | | | | |")
            for variant, entry in result["variants"].items():
                if entry["vs_reference"] is None:
                    continue
                pooled = (result.get("pooled") or {}).get(variant) or [{}]
                delong, mcnemar = pooled[0].get("delong"), pooled[0].get("mcnemar")
                cells = [variant]
                for metric in METRICS:
                    cells += [_effect(entry["vs_reference"][metric]), entry["vs_reference"][metric]["verdict"]]
                cells += [f"{delong['difference']:+.3f} ({delong['p_value']:.2g})" if delong else "— (not binary)",
                          f"{mcnemar['accuracy_difference']:+.3f} ({mcnemar['p_value']:.2g})" if mcnemar else "—"]
                lines.append("| " + " | ".join(cells) + " |")
                d = entry["vs_reference"]["auroc"]
                cards.setdefault(variant, []).append(f"{label} Δ AUROC {_effect(d)}, {d['verdict']}")
        power = {part: result["power"] for part, result in results.items()}
        lines += ["", f"Power ({label}): " + "; ".join(
            f"{part}: {p['auroc']['n']} paired folds detect ±{p['auroc']['detectable']:.3f} AUROC and "
            f"±{p['balanced_accuracy']['detectable']:.3f} bal. acc." for part, p in power.items()
            if p["auroc"]["detectable"] is not None), ""]
        lines += [f"`{result['command']}`" for result in results.values()] + [""]
    lines += ["Method-card lines (Δ AUROC with − without, held-out folds):", ""]
    lines += [f"- {variant}: " + "; ".join(found) for variant, found in cards.items()]
    return "\n".join(lines) + "\n"


def summary(out: Path) -> list[dict]:
    """One row per data set and variant from the finished ablation.json files under `out`."""
    rows = []
    for path in sorted(out.glob("*/*/ablation.json")):
        result = json.loads(path.read_text())
        pooled = result.get("pooled") or {}
        for variant, entry in result["variants"].items():
            if entry["vs_reference"] is None:
                continue
            row = {"data": path.parent.parent.name, "ablation": path.parent.name, "variant": variant,
                   "changes": entry["changes"], "reference": {m: result["variants"]["reference"]["summary"][m]["mean"]
                                                              for m in entry["vs_reference"]}}
            for metric, d in entry["vs_reference"].items():
                row[metric] = {"difference": d["difference"], "ci95": d["ci95"], "verdict": d["verdict"],
                               "detectable": result["power"][metric]["detectable"]}
            seeds = pooled.get(variant) or []
            row["pooled"] = [{"seed": r["seed"], "n": r["n"],
                              "delong": r.get("delong"), "mcnemar": r.get("mcnemar")} for r in seeds]
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--only", choices=list(SETS), action="append")
    parser.add_argument("--part", choices=["main", "linear-scaling"], action="append", help="default: both")
    parser.add_argument("--print", action="store_true", dest="print_only")
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the README tables of the finished ablations")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.out), end="")
        return 0
    if args.summary:
        print(json.dumps(summary(args.out), indent=1))
        return 0
    for name in args.only or list(SETS):
        if not (args.data_root / SETS[name]["folder"]).exists():
            print(f"skipping {name}: {args.data_root / SETS[name]['folder']} is absent", file=sys.stderr)
            continue
        for part, argv in commands(name, SETS[name], args.data_root, args.out).items():
            if args.part and part not in args.part:
                continue
            print(shlex.join(argv), flush=True)
            if not args.print_only:
                subprocess.run(argv, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
