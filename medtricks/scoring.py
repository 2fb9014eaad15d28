"""Scoring a model on a loader: class probabilities, the mean loss, report metrics and the validation threshold.

Used by training (each epoch's validation), by finetune's final report and by every command that reads a run
(medtricks.runs.Run.predict): one code path, so a re-evaluation reproduces report.json exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from medtricks import distributed
from medtricks.metrics import choose_threshold, compute_metrics
from medtricks.multilabel import choose_thresholds, compute_multilabel_metrics
from medtricks.tricks.ordinal_decoding import OrdinalDecodingConfig, fit_grade_cuts

# the keys of a report.json split (DESIGN.md's M): what evaluate returns and what finetune reports
REPORT_KEYS = ("n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity", "f1", "ece")
# keys M gains where they apply (DESIGN.md): operating points of binary tasks, weighted kappa of ordinal grades
WHERE_THEY_APPLY = ("sensitivity_at_specificity", "specificity_at_sensitivity", "kappa_quadratic",
                    "kappa_quadratic_ci95", "kappa_linear", "ece_before",  # ece_before: calibrated runs
                    "per_label")  # multi-label: one M per finding (with its threshold), the top level their means


@dataclass
class EvalOutput:
    """A model's predictions on a split, in dataset order: labels (N,), class probabilities (N, C), patient ids
    (an image without one is its own patient) and the mean cross-entropy. Multi-label: labels (N, L) multi-hot,
    probs (N, L) the findings' sigmoids, loss the binary cross-entropy averaged over images and findings."""

    labels: np.ndarray
    probs: np.ndarray
    patient_ids: list[str]
    loss: float

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


@torch.inference_mode()
def predict_loader(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> EvalOutput:
    """Class probabilities of every sample, in fp32 and eval mode (robustness and metrics are always fp32).

    The loader's sampler lists the dataset positions it visits: in a distributed run this rank's shard
    (`sampler=distributed.shard(len(dataset))`), whose predictions are gathered from all ranks; the output is in
    dataset order on every rank, and the same as one process's (the mean loss is summed in that order too).
    Multi-hot labels ((B, L) per batch: a multi-label dataset) give sigmoid probabilities and the binary
    cross-entropy.
    """
    model.eval()
    rows = []  # (label, probs, patient id, loss) per sample
    for batch in loader:
        logits = model(batch["image"].to(device)).float()
        labels = batch["label"].to(device)
        if labels.ndim == 2:
            losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
            probs, labels = logits.sigmoid(), labels.long()
        else:
            losses, probs = F.cross_entropy(logits, labels, reduction="none"), logits.softmax(-1)
        rows.extend(zip(labels.tolist(), probs.cpu().numpy().astype(np.float64),
                        batch["patient_id"], losses.cpu().numpy().astype(np.float64), strict=True))
    rows = distributed.gather_by_position(rows, list(loader.sampler))
    if not rows:
        return EvalOutput(np.zeros(0, dtype=np.int64), np.zeros((0, 0)), [], 0.0)
    labels, probs, ids, losses = zip(*rows, strict=True)
    return EvalOutput(np.array(labels), np.stack(probs), list(ids), float(np.sum(losses)) / len(losses))


def evaluate_split(output: EvalOutput, threshold: float | list[float] | None, seed: int, ordinal: bool = False,
                   n_boot: int = 1000, classes: list[str] | tuple[str, ...] | None = None) -> dict:
    """Report metrics M of one split plus its mean loss (`ordinal`: with the weighted kappas; `n_boot` 0: without
    bootstrap intervals, for the per-epoch validation that reads only point values). Multi-label outputs: the
    multi-label M (medtricks.multilabel), `threshold` one per finding and `classes` the keys of its per_label."""
    if output.multilabel:
        metrics = compute_multilabel_metrics(output.labels, output.probs, output.patient_ids, threshold, n_boot,
                                             seed, classes)
        metrics["loss"] = output.loss
        return metrics
    metrics = compute_metrics(output.labels, output.probs, output.patient_ids, threshold=threshold, seed=seed,
                              ordinal=ordinal, n_boot=n_boot)
    metrics["loss"] = output.loss
    return metrics


def report_metrics(metrics: dict) -> dict:
    """The report.json keys of evaluate_split's metrics: REPORT_KEYS, then those of WHERE_THEY_APPLY present
    (multi-label: each per_label M likewise, with its threshold)."""
    report = {k: metrics[k] for k in (*REPORT_KEYS, *WHERE_THEY_APPLY) if k in metrics}
    if "per_label" in report:
        report["per_label"] = {name: {**report_metrics(m), "threshold": m["threshold"]}
                               for name, m in report["per_label"].items()}
    return report


def val_threshold(output: EvalOutput, num_classes: int, method: str = "youden",
                  ordinal: OrdinalDecodingConfig | None = None) -> float | list[float] | None:
    """The binary operating threshold chosen on validation (choose_threshold's method); multi-label: one per
    finding (multilabel.choose_thresholds); multi-class: the grade cuts of tricks.ordinal_decoding (`ordinal`), else
    None (argmax)."""
    if output.multilabel:
        return choose_thresholds(output.labels, output.probs, method)
    if num_classes == 2:
        return choose_threshold(output.labels, output.probs, method)
    return None if ordinal is None else fit_grade_cuts(output.labels, output.probs, ordinal.weights)


def decision_keys(threshold: float | list[float] | None, classes: Sequence[str], multilabel: bool) -> dict:
    """model.json's keys for a decision rule of val_threshold: `threshold` (binary), `thresholds` by finding
    (multi-label) or `grade_cuts` (multi-class with tricks.ordinal_decoding)."""
    if multilabel:
        return {"threshold": None, "thresholds": None if threshold is None else dict(zip(classes, threshold,
                                                                                         strict=True))}
    if isinstance(threshold, list):
        return {"threshold": None, "grade_cuts": threshold}
    return {"threshold": threshold}

