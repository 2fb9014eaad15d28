"""Compare two fine-tuned models on the same images with paired tests (`medtricks compare`).

Both runs score the same images (each with its own preprocessing: image size, channels). AUROC: binary tasks get
DeLong's test (images taken as independent) and a paired bootstrap interval of the difference that resamples
patients when the source has patient ids, images otherwise; multi-class tasks get the paired bootstrap of the macro
one-vs-rest AUROC. Accuracy: the exact McNemar test on each run's own decisions, as report.json makes them (the
validation threshold from model.json for binary tasks, argmax otherwise). All differences are A - B.

On a split of the runs' own data (val, test) both runs must have made the same split (same source, seed and split
fractions, as the runs of one ablation seed do), else the images differ and the comparison is refused; `--split
all --data OTHER_SOURCE` compares any two runs with the same classes on an external set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtricks.errors import MedtricksError
from medtricks.metrics import _weighted_auroc
from medtricks.runs import Run, open_run
from medtricks.scoring import decisions
from medtricks.stats import delong_test, mcnemar_test, paired_bootstrap


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest AUROC; ValueError when a class is absent (bootstrap skips).

    The Mann-Whitney form of medtricks.metrics equals sklearn's roc_auc_score and is ~50x faster: the paired
    bootstrap calls it 4,000 times."""
    if len(np.unique(labels)) < probs.shape[1]:
        raise ValueError("a class is absent")
    ones = np.ones((1, len(labels)))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    return float(np.mean([_weighted_auroc(probs[:, c], labels == c, ones)[0] for c in classes]))


def compare_predictions(labels: Sequence[int], probs_a: np.ndarray, probs_b: np.ndarray,
                        threshold_a: float | None = None, threshold_b: float | None = None,
                        groups: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired tests of two models' probabilities on the same images (rows aligned).

    Args:
        labels: (N,) class indices.
        probs_a, probs_b: (N, C) class probabilities of model A and model B.
        threshold_a, threshold_b: binary decision thresholds on p1 (None = 0.5); ignored for multi-class.
        groups: (N,) patient ids, so the bootstrap resamples patients; None = images.
        n_boot: bootstrap replicates.
        seed: bootstrap seed.

    Returns:
        {"n", "a": {"auroc", "accuracy"}, "b": {...}, "auroc": {"delong" (binary; None when a class is absent),
        "bootstrap"}, "accuracy": {"mcnemar"}}; differences are A - B.
    """
    labels, pa, pb = np.asarray(labels).astype(np.int64), np.asarray(probs_a, float), np.asarray(probs_b, float)
    correct_a = decisions(pa, threshold_a) == labels
    correct_b = decisions(pb, threshold_b) == labels
    counts = np.bincount(labels, minlength=pa.shape[1])
    complete = bool(np.all(counts > 0))
    note = None if complete else "a class is absent from these images: AUROC is undefined"
    delong = None
    if pa.shape[1] == 2 and np.all(counts >= 2):  # DeLong's variance needs two images of each class
        delong = delong_test(labels, pa[:, 1], pb[:, 1])
    elif pa.shape[1] == 2 and complete:
        note = "DeLong's test needs at least two images of each class; only the bootstrap is given"
    bootstrap = paired_bootstrap(labels, pa, pb, _auroc, groups, n_boot=n_boot, seed=seed) if complete else None
    return {"n": int(len(labels)),
            "a": {"auroc": _auroc(labels, pa) if complete else None, "accuracy": float(correct_a.mean())},
            "b": {"auroc": _auroc(labels, pb) if complete else None, "accuracy": float(correct_b.mean())},
            "auroc": {"delong": delong, "bootstrap": bootstrap, "note": note},
            "accuracy": {"mcnemar": mcnemar_test(correct_a, correct_b)}}


def _scored(run: Run, source, split: str):
    """(keys, labels, probs, patient ids or None) of a run's model on a split of `source`."""
    dataset = run.dataset(source, split)
    records = [dataset.store.records[i] for i in dataset.indices]
    output = run.predict(dataset)
    has_ids = any(r["patient_id"] is not None for r in records)  # an image without an id is its own patient
    patients = [r["patient_id"] or r["key"] for r in records] if has_ids else None
    return [r["key"] for r in records], output.labels, output.probs, patients


def compare(run_a: str | Path, run_b: str | Path, data: str | Path | None = None, split: str = "val",
            device: str | None = None) -> dict:
    """Score two runs' models on the same images and test whether their AUROC and accuracy differ (A - B).

    Args:
        run_a, run_b: run directories written by finetune; their classes must be the same.
        data: data source (default: the runs' own, which must then be the same source).
        split: val, test, train or all (every image of `data`; for an external set).
        device: where both models run: auto, cpu, cuda or cuda:N (default: each recipe's train.device).

    Returns:
        compare_predictions' result plus "run_a", "run_b", "data", "split", "classes", "patients" (number of
        patients the bootstrap resampled, None = images), "threshold_a", "threshold_b".

    Example:
        >>> result = compare("runs/ablate-demo/runs/reference/seed-0", "runs/ablate-demo/runs/without-warmup/seed-0")
    """
    a, b = open_run(run_a, device), open_run(run_b, device)
    a.require_single_label("medtricks compare")
    b.require_single_label("medtricks compare")
    classes = a.classes
    if b.classes != classes:
        raise MedtricksError(f"{run_a} predicts {list(classes)} but {run_b} predicts {list(b.classes)}: only runs "
                             f"with the same classes (in the same order) can be compared on the same images.")
    if data is None and a.source != b.source:
        raise MedtricksError(f"{run_a} was trained on {a.source} and {run_b} on {b.source}; pass --data to choose the "
                             f"images both are scored on.")
    source = data if data is not None else a.source
    keys_a, labels, probs_a, patients = _scored(a, source, split)
    keys_b, _, probs_b, _ = _scored(b, source, split)
    if sorted(keys_a) != sorted(keys_b):
        only = len(set(keys_a) ^ set(keys_b))
        raise MedtricksError(f"the {split} split of {source} holds different images for the two runs ({only} images "
                             f"in one only: they were made with another seed or split fractions). Compare runs made "
                             f"with the same seed, or score both on an external set with --split all --data DIR.")
    order = {key: i for i, key in enumerate(keys_b)}
    probs_b = probs_b[[order[key] for key in keys_a]]
    result = compare_predictions(labels, probs_a, probs_b, a.threshold, b.threshold, groups=patients)
    return {"run_a": str(run_a), "run_b": str(run_b), "data": str(source), "split": split, "classes": list(classes),
            "patients": None if patients is None else len(set(patients)), "threshold_a": a.threshold,
            "threshold_b": b.threshold, **result}
