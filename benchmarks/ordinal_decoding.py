"""Ordinal decoding on held-out folds: argmax against grade cuts fitted on each run's own validation split.

Reads the finished runs of a cross-validated ablation (`medtricks ablate --folds K`, e.g. the tricks study's
RetinaMNIST one) without writing into them. For every run: its validation split is predicted again (the same seeded
split as in training) and grade cuts are fitted there (medtricks.tricks.ordinal_decoding.fit_grade_cuts); its
held-out fold (fold_scores.json, which ablate wrote; the run's test split) is then decided both ways. Nothing is
chosen on the held-out folds. Prints one JSON object: per variant and pooled over all runs, the mean over runs of
quadratic kappa, linear kappa, accuracy and balanced accuracy with argmax and with the cuts, and the paired
difference (cuts - argmax) with a 95% t interval over runs (runs of one fold share their held-out images, so the
pooled interval over runs is optimistic); `by_fold` averages each fold's runs first and takes the interval over the
folds (the honest one for the pooled question); the per-variant ones pair the K folds.

Usage: python benchmarks/ordinal_decoding.py runs/study/retinamnist/main [--weights quadratic]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

from medtricks.runs import open_run
from medtricks.tricks.ordinal_decoding import fit_grade_cuts, grade_decisions


def scores(labels: np.ndarray, decided: np.ndarray) -> dict:
    return {"kappa_quadratic": cohen_kappa_score(labels, decided, weights="quadratic"),
            "kappa_linear": cohen_kappa_score(labels, decided, weights="linear"),
            "accuracy": float(np.mean(labels == decided)),
            "balanced_accuracy": balanced_accuracy_score(labels, decided)}


def run_scores(run: Path, weights: str) -> dict:
    opened = open_run(run, "cpu")
    val = opened.predict(opened.dataset(split="val"))
    cuts = fit_grade_cuts(val.labels, val.probs, weights)
    held_out = json.loads((run / "fold_scores.json").read_text())
    labels, probs = np.asarray(held_out["labels"]), np.asarray(held_out["probs"])
    return {"cuts": cuts, "argmax": scores(labels, probs.argmax(1)), "cuts_rule": scores(labels,
                                                                                       grade_decisions(probs, cuts))}


def summary(rows: list[dict], groups: list[int] | None = None) -> dict:
    """Means with argmax and cuts and the paired difference with a t interval over rows, or over the means of each
    group of rows (`groups`: the fold of each row)."""
    out = {}
    for metric in ("kappa_quadratic", "kappa_linear", "accuracy", "balanced_accuracy"):
        a = np.array([r["argmax"][metric] for r in rows])
        c = np.array([r["cuts_rule"][metric] for r in rows])
        if groups is not None:
            keys = sorted(set(groups))
            a, c = (np.array([x[np.array(groups) == g].mean() for g in keys]) for x in (a, c))
        d = c - a
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        out[metric] = {"argmax": round(float(a.mean()), 4), "cuts": round(float(c.mean()), 4),
                       "delta": round(float(d.mean()), 4),
                       "ci95": [round(float(d.mean() - half), 4), round(float(d.mean() + half), 4)]}
    return {"runs": len(rows), **({"folds": len(set(groups))} if groups is not None else {}), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ablation", type=Path, help="folder of a finished `medtricks ablate --folds` (ablation.json)")
    parser.add_argument("--weights", default="quadratic", choices=("quadratic", "linear"))
    args = parser.parse_args()
    ablation = json.loads((args.ablation / "ablation.json").read_text())
    per_variant, everything, folds = {}, [], []
    for variant, entry in ablation["variants"].items():
        rows = [run_scores(Path(run), args.weights) for run in entry["runs"]]
        per_variant[variant] = summary(rows)
        everything.extend(rows)
        folds.extend(unit["fold"] for unit in ablation["units"])
    print(json.dumps({"ablation": str(args.ablation), "command": ablation["command"], "weights": args.weights,
                      "load_average": os.getloadavg(), "pooled": summary(everything),
                      "by_fold": summary(everything, folds), "variants": per_variant},
                     indent=1))


if __name__ == "__main__":
    main()
