"""Compare two fine-tuned models on the same images with paired tests (`medtricks compare`).

Both runs score the same images (each with its own preprocessing: image size, channels). AUROC: binary tasks get
DeLong's test (images taken as independent) and a paired bootstrap interval of the difference that resamples
patients when the source has patient ids, images otherwise; multi-class tasks get the paired bootstrap of the macro
one-vs-rest AUROC. Accuracy: the exact McNemar test on each run's own decisions, as report.json makes them (the
validation threshold from model.json for binary tasks, argmax otherwise). All differences are A - B.

Multi-label runs (data.task: multilabel) are compared finding by finding: DeLong's test of each finding's AUROC
with Holm's adjustment over the findings tested (a family of tests: one finding's p < 0.05 alone is expected by
chance among 14), and the difference in mean AUROC (the multi-label M's top-level AUROC) with a paired bootstrap
interval that resamples patients and averages, in each replicate, the findings that have both classes in it.
Decisions are each run's own (every finding at its validation threshold): per-finding accuracy, and the exact
McNemar test on exact matches (the whole set right). Both runs must predict the same findings (in any order).

On a split of the runs' own data (val, test) both runs must have made the same split (same source, seed and split
fractions, as the runs of one ablation seed do), else the images differ and the comparison is refused; `--split
all --data OTHER_SOURCE` compares any two runs with the same classes on an external set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtricks.bootstrap import weighted_auroc
from medtricks.errors import MedtricksError
from medtricks.metrics import class_masks, decisions
from medtricks.multilabel import label_aurocs, predicted_sets
from medtricks.runs import Run, open_run
from medtricks.stats import delong_test, holm_adjust, mcnemar_test, paired_bootstrap

_ZERO_VARIANCE = ("DeLong's test is undefined here: the AUROCs differ but their variance estimate is 0 (too few "
                  "images); only the bootstrap is given")


def _auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUROC of class 1, or macro one-vs-rest AUROC; ValueError when a class is absent (bootstrap skips).

    The Mann-Whitney form of medtricks.metrics equals sklearn's roc_auc_score and is ~50x faster: the paired
    bootstrap calls it 4,000 times."""
    if len(np.unique(labels)) < probs.shape[1]:
        raise ValueError("a class is absent")
    ones = np.ones((1, len(labels)))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    return float(np.mean([weighted_auroc(probs[:, c], labels == c, ones)[0] for c in classes]))


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
        if delong is None:
            note = _ZERO_VARIANCE
    elif pa.shape[1] == 2 and complete:
        note = "DeLong's test needs at least two images of each class; only the bootstrap is given"
    bootstrap = paired_bootstrap(labels, pa, pb, _auroc, groups, n_boot=n_boot, seed=seed,
                                 needs=class_masks(labels, pa.shape[1])) if complete else None
    return {"n": int(len(labels)),
            "a": {"auroc": _auroc(labels, pa) if complete else None, "accuracy": float(correct_a.mean())},
            "b": {"auroc": _auroc(labels, pb) if complete else None, "accuracy": float(correct_b.mean())},
            "auroc": {"delong": delong, "bootstrap": bootstrap, "note": note},
            "accuracy": {"mcnemar": mcnemar_test(correct_a, correct_b)}}


def _mean_auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean AUROC over the findings with both classes in these (resampled) labels; ValueError when none has (the
    bootstrap skips the replicate). The fast Mann-Whitney form, as `_auroc`."""
    ones = np.ones((1, len(labels)))
    values = [weighted_auroc(probs[:, j], labels[:, j] == 1, ones)[0] for j in range(labels.shape[1])]
    if np.all(np.isnan(values)):
        raise ValueError("no finding has both classes")
    return float(np.nanmean(values))


def compare_multilabel_predictions(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray,
                                   thresholds_a: Sequence[float] | None = None,
                                   thresholds_b: Sequence[float] | None = None, groups: Sequence[str] | None = None,
                                   names: Sequence[str] | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired tests of two multi-label models' sigmoid probabilities on the same images (rows and columns aligned).

    Args:
        labels: (N, L) multi-hot labels.
        probs_a, probs_b: (N, L) probabilities of model A and model B, one column per finding.
        thresholds_a, thresholds_b: each run's (L,) per-finding thresholds (None = 0.5 each).
        groups: (N,) patient ids, so the bootstrap resamples patients; None = images.
        names: the findings (keys of per_label); None = "0", "1", ...
        n_boot: bootstrap replicates.
        seed: bootstrap seed.

    Returns:
        {"task": "multilabel", "n", "a" / "b": {"auroc" (mean over findings with both classes), "accuracy" (mean
        per-finding accuracy), "exact_match"}, "auroc": {"delong": None (one test per finding, in per_label),
        "bootstrap" (mean AUROC A - B), "note"}, "accuracy": {"mcnemar": None, "note"}, "exact_match": {"mcnemar"},
        "per_label": {name: {"positives", "a": {"auroc", "accuracy"}, "b": {...}, "delong", "p_holm", "note"}},
        "multiple_comparisons": {"method", "tests", "note"}}; differences are A - B, null where undefined.
    """
    y = np.asarray(labels).astype(np.int64)
    pa, pb = np.asarray(probs_a, float), np.asarray(probs_b, float)
    if y.ndim != 2 or pa.shape != y.shape or pb.shape != y.shape:
        raise ValueError(f"labels and both probs must have shape (N, L); got {y.shape}, {pa.shape}, {pb.shape}.")
    names = [str(j) for j in range(y.shape[1])] if names is None else [str(n) for n in names]
    right_a, right_b = predicted_sets(pa, thresholds_a) == y, predicted_sets(pb, thresholds_b) == y
    aurocs_a, aurocs_b = label_aurocs(y, pa), label_aurocs(y, pb)
    per_label = {}
    for j, name in enumerate(names):
        positives = int(y[:, j].sum())
        delong, note = None, None
        if min(positives, len(y) - positives) >= 2:  # DeLong's variance needs two images of each class
            delong = delong_test(y[:, j], pa[:, j], pb[:, j])
            note = _ZERO_VARIANCE if delong is None else None
        else:
            note = f"{positives} of {len(y)} images have the finding: DeLong's test needs two of each class"
        per_label[name] = {"positives": positives,
                           "a": {"auroc": aurocs_a[j], "accuracy": float(right_a[:, j].mean())},
                           "b": {"auroc": aurocs_b[j], "accuracy": float(right_b[:, j].mean())},
                           "delong": delong, "note": note}
    adjusted = holm_adjust([m["delong"]["p_value"] if m["delong"] else None for m in per_label.values()])
    for m, p in zip(per_label.values(), adjusted, strict=True):
        m["p_holm"] = p
    tests = sum(p is not None for p in adjusted)
    ranked = [v for v in aurocs_a if v is not None]
    bootstrap = paired_bootstrap(y, pa, pb, _mean_auroc, groups, n_boot=n_boot, seed=seed) if ranked else None
    exact_a, exact_b = right_a.all(axis=1), right_b.all(axis=1)

    def side(aurocs: list, right: np.ndarray, exact: np.ndarray) -> dict:
        defined = [v for v in aurocs if v is not None]
        return {"auroc": float(np.mean(defined)) if defined else None, "accuracy": float(right.mean()),
                "exact_match": float(exact.mean())}

    return {"task": "multilabel", "n": int(len(y)), "a": side(aurocs_a, right_a, exact_a),
            "b": side(aurocs_b, right_b, exact_b),
            "auroc": {"delong": None, "bootstrap": bootstrap,
                      "note": "mean AUROC over the findings with both classes (in each bootstrap replicate: those "
                              "with both classes in it); DeLong's test per finding in per_label"
                      if ranked else "no finding has both classes in these images: AUROC is undefined"},
            "accuracy": {"mcnemar": None, "note": "accuracy is the mean over findings of each finding's accuracy; "
                                                  "the image-level test is exact_match.mcnemar"},
            "exact_match": {"mcnemar": mcnemar_test(exact_a, exact_b)}, "per_label": per_label,
            "multiple_comparisons": {
                "method": "holm", "tests": tests,
                "note": f"p_holm: each finding's DeLong p adjusted with Holm's method over the {tests} findings "
                        f"tested (family-wise error 5% when p_holm < 0.05); unadjusted, {tests} independent "
                        f"findings without any true difference give some p < 0.05 with probability "
                        f"{1 - 0.95 ** tests:.0%}"}}


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
        run_a, run_b: run directories written by finetune; their classes must be the same (multi-label: the same
            findings, in any order).
        data: data source (default: the runs' own, which must then be the same source).
        split: val, test, train or all (every image of `data`; for an external set).
        device: where both models run: auto, cpu, cuda or cuda:N (default: each recipe's train.device).

    Returns:
        compare_predictions' result (multi-label runs: compare_multilabel_predictions', with B's findings and
        thresholds in A's order) plus "run_a", "run_b", "data", "split", "classes", "patients" (number of patients
        the bootstrap resampled, None = images), "threshold_a", "threshold_b" (multi-label: one per finding).

    Example:
        >>> result = compare("runs/ablate-demo/runs/reference/seed-0", "runs/ablate-demo/runs/without-warmup/seed-0")
    """
    a, b = open_run(run_a, device), open_run(run_b, device)
    classes = a.classes
    if a.multilabel != b.multilabel:
        kinds = ["multi-label" if r.multilabel else "single-label" for r in (a, b)]
        raise MedtricksError(f"{run_a} is a {kinds[0]} run and {run_b} a {kinds[1]} one: only runs of the same task "
                             f"can be compared.")
    if a.multilabel and set(b.classes) != set(classes):
        only_a, only_b = [c for c in classes if c not in b.classes], [c for c in b.classes if c not in classes]
        raise MedtricksError(f"{run_a} and {run_b} predict different findings (only in A: {only_a or 'none'}; only "
                             f"in B: {only_b or 'none'}): multi-label runs are compared finding by finding, so both "
                             f"must predict the same findings.")
    if not a.multilabel and b.classes != classes:
        raise MedtricksError(f"{run_a} predicts {list(classes)} but {run_b} predicts {list(b.classes)}: only runs "
                             f"with the same classes (in the same order) can be compared on the same images.")
    if data is None and a.source != b.source:
        raise MedtricksError(f"{run_a} was trained on {a.source} and {run_b} on {b.source}; pass --data to choose the "
                             f"images both are scored on.")
    source = data if data is not None else a.source
    keys_a, labels, probs_a, patients = _scored(a, source, split)
    keys_b, labels_b, probs_b, _ = _scored(b, source, split)
    if sorted(keys_a) != sorted(keys_b):
        only = len(set(keys_a) ^ set(keys_b))
        raise MedtricksError(f"the {split} split of {source} holds different images for the two runs ({only} images "
                             f"in one only: they were made with another seed or split fractions). Compare runs made "
                             f"with the same seed, or score both on an external set with --split all --data DIR.")
    order = {key: i for i, key in enumerate(keys_b)}
    rows = [order[key] for key in keys_a]
    if a.multilabel:  # B's findings in A's order; both must read the same findings from the data
        columns = [b.classes.index(c) for c in classes]
        probs_b, labels_b = probs_b[rows][:, columns], labels_b[rows][:, columns]
        thresholds_b = None if b.threshold is None else [b.threshold[j] for j in columns]
        if not np.array_equal(labels, labels_b):
            raise MedtricksError(f"{run_a} and {run_b} read different findings for the same images of {source} "
                                 f"(their recipes' data.label_column, label_separator or no_finding differ); compare "
                                 f"runs that read the labels alike.")
        result = compare_multilabel_predictions(labels, probs_a, probs_b, a.threshold, thresholds_b,
                                                groups=patients, names=classes)
        return {"run_a": str(run_a), "run_b": str(run_b), "data": str(source), "split": split,
                "classes": list(classes), "patients": None if patients is None else len(set(patients)),
                "threshold_a": a.threshold, "threshold_b": thresholds_b, **result}
    probs_b = probs_b[rows]
    result = compare_predictions(labels, probs_a, probs_b, a.threshold, b.threshold, groups=patients)
    return {"run_a": str(run_a), "run_b": str(run_b), "data": str(source), "split": split, "classes": list(classes),
            "patients": None if patients is None else len(set(patients)), "threshold_a": a.threshold,
            "threshold_b": b.threshold, **result}
