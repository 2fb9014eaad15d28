"""Cross-validated ablations (`ablate --folds K`): the held-out-fold scores of each run, pooled per seed, and the
tests that compare two variants on them.

Every image of the source's non-test patients is in the held-out fold of exactly one run per variant and seed
(medtricks.data.splits.cross_validation_split); that run chose its epoch and threshold on a validation split of the
other folds, so its held-out scores are measurements, not selections. Pooling the K folds gives one score per image:
pooled AUROC (binary, or macro one-vs-rest), accuracy at each fold's own threshold, DeLong's test on the pooled
scores (binary) and McNemar's exact test on the pooled decisions, variant against reference, per seed. Multi-label
runs: the mean over findings of each finding's pooled AUROC and accuracy (at each fold's own thresholds), the exact
match (every finding right), and McNemar's test on exact matches. (Pooled AUROC mixes K models whose scores need not
share a scale; the per-fold paired differences in ablation.json do not.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtricks.data.sources import LabelFormat, load_source
from medtricks.data.splits import fold_assignment
from medtricks.errors import MedtricksError
from medtricks.files import DamagedFileError, read_json, write_json
from medtricks.metrics import auroc, decisions, weighted_kappa
from medtricks.multilabel import mean_auroc, predicted_sets
from medtricks.recipe import Recipe
from medtricks.runs import open_run
from medtricks.stats import delong_test, mcnemar_test

SCORES_FILE = "fold_scores.json"


def fold_scores(run: str | Path) -> dict:
    """The run's held-out fold (its test split): labels, class probabilities, the run's decisions (metrics.decisions;
    multi-label: the (N, L) findings at their thresholds), its decision rule and `multilabel`; cached in the run as
    fold_scores.json."""
    run = Path(run)
    if (run / SCORES_FILE).is_file():
        redo = "delete it, and the same command scores the fold again."
        scores = read_json(run / SCORES_FILE, redo)
        if not {"labels", "probs", "decisions", "threshold"} <= scores.keys():  # (multilabel: newer files)
            raise DamagedFileError(f"{run / SCORES_FILE} is damaged (keys {sorted(scores)}); {redo}")
        return scores
    opened = open_run(run, "auto")
    output = opened.predict(opened.dataset(split="test"))
    decided = (predicted_sets(output.probs, opened.threshold) if opened.multilabel
               else decisions(output.probs, opened.threshold))
    scores = {"labels": output.labels.astype(int).tolist(), "probs": output.probs.tolist(),
              "decisions": decided.tolist(), "threshold": opened.threshold, "multilabel": opened.multilabel}
    write_json(run / SCORES_FILE, scores)
    return scores


def _pool(runs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities and decisions of the runs' held-out folds, concatenated (multi-label: (N, L) each)."""
    parts = [fold_scores(run) for run in runs]
    return (np.concatenate([p["labels"] for p in parts]).astype(int),
            np.concatenate([np.asarray(p["probs"], float).reshape(len(p["labels"]), -1) for p in parts]),
            np.concatenate([p["decisions"] for p in parts]).astype(int))


def _pooled_row(labels: np.ndarray, probs: np.ndarray, decided: np.ndarray, ordinal: bool) -> tuple[dict, np.ndarray]:
    """The pooled metrics of one variant and seed (`ordinal`: with the quadratic weighted kappa of the decisions),
    and each image's right/wrong for McNemar's test (multi-label: every finding right)."""
    right = decided == labels
    if labels.ndim == 2:  # multi-label
        return ({"auroc": mean_auroc(labels, probs), "accuracy": float(right.mean()),
                 "exact_match": float(right.all(1).mean())}, right.all(1))
    row = {"auroc": auroc(labels, probs), "accuracy": float(right.mean())}
    if ordinal:
        row["kappa_quadratic"] = weighted_kappa(labels, decided, probs.shape[1], n_boot=0)[0]
    return row, right


def pooled_comparison(runs: dict[str, list[str]], units: Sequence[tuple[int, int]], reference: str,
                      ordinal: bool = False) -> dict:
    """Per seed, each variant's pooled held-out metrics and its tests against the reference.

    Args:
        runs: variant -> run directories in the order of `units`.
        units: (seed, fold) of each run.
        reference: the variant the others are compared with.
        ordinal: the classes are ordered grades (data.ordinal): rows add "kappa_quadratic" of the pooled decisions.

    Returns:
        {variant: [{"seed", "n", "auroc", "accuracy" (multi-label: means over findings, and "exact_match"), and
        for variants other than the reference "delong" (binary: the DeLong test of pooled AUROC, variant -
        reference) and "mcnemar" (pooled decisions; multi-label: exact matches)}, per seed]}.
    """
    seeds = sorted({seed for seed, _ in units})
    result = {variant: [] for variant in runs}
    for seed in seeds:
        chosen = [i for i, (s, _) in enumerate(units) if s == seed]
        ref_labels, ref_probs, ref_decisions = _pool([runs[reference][i] for i in chosen])
        _, ref_right = _pooled_row(ref_labels, ref_probs, ref_decisions, ordinal)
        for variant, paths in runs.items():
            labels, probs, decided = _pool([paths[i] for i in chosen])
            if not np.array_equal(labels, ref_labels):
                raise MedtricksError(f"variant {variant}, seed {seed}: its held-out folds hold other images than the "
                                     f"reference's (a variant that changes the data or its split cannot be compared "
                                     f"image by image).")
            metrics, right = _pooled_row(labels, probs, decided, ordinal)
            row = {"seed": seed, "n": int(len(labels)), **metrics}
            if variant != reference:
                if labels.ndim == 1 and probs.shape[1] == 2 and row["auroc"] is not None:
                    row["delong"] = delong_test(labels, probs[:, 1], ref_probs[:, 1])
                row["mcnemar"] = mcnemar_test(right, ref_right)
            result[variant].append(row)
    return result


def fold_record(source_path: Path, recipe: Recipe, seeds: int, folds: int) -> dict:
    """The fold of every record per seed, with the record keys and patient ids: what folds.json saves so that
    anyone can check that no image (and no patient) was in the held-out fold and in the training or selection data
    of the same run."""
    source = load_source(source_path, recipe.data.classes, LabelFormat.of(recipe.data))
    return {"folds": folds, "keys": [str(r.get("key")) for r in source.records],
            "patient_ids": [r["patient_id"] for r in source.records],
            "fold_of_record": {str(seed): fold_assignment(source, folds, recipe.data.split.seed_for(seed))
                               for seed in range(seeds)}}
