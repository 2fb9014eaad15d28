"""`medtricks corrupt`: a run's accuracy and AUROC under natural corruptions, and how it compares with another run.

`evaluate_corruptions` scores any classifier on a loader under the corruptions of medtricks.corruptions;
`corruption_report` does it for a run directory and writes the report.

Reads only the run directory (+ data), like attack. The images go through the run's own evaluation transform, then
each corruption of the preset (medtricks.corruptions) at each severity, at the model's input resolution; decisions
are the run's (robustness.decision_model: the validation threshold for binary models). The random draws depend only
on (seed, corruption, severity, image index), so two runs evaluated on the same data, split and seed see the same
corrupted images when they share an input size: `against` uses this to compare two runs, e.g. Geirhos et al.'s
Stylized-ImageNet claim (ICLR 2019) that shape-biased pretraining resists corruptions better.

Multi-label runs: accuracy is the mean over findings of each finding's accuracy at the run's thresholds and AUROC
the mean over findings (as report.json), so the errors below are mean per-finding errors; the report adds `task`.

Mean corruption error (Hendrycks & Dietterich, ICLR 2019): for run f and corruption c, E_{s,c} = 1 - accuracy at
severity s. The report's `mce` is the unnormalised mean over corruptions and severities and `relative_mce` the mean
of E_{s,c} - E_clean (what the corruption costs). With a reference run g (`against`), Hendrycks' normalised figures
take g as the baseline (they used AlexNet): CE_c = sum_s E^f_{s,c} / sum_s E^g_{s,c}, mCE = mean_c CE_c, relative
CE_c = sum_s (E^f_{s,c} - E^f_clean) / sum_s (E^g_{s,c} - E^g_clean); below 1 means f is more robust than g.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from medtricks import plots
from medtricks.attacks import class_probabilities, decided
from medtricks.corruptions import (
    CORRUPTIONS,
    PRESETS,
    SEVERITIES,
    check_corruptions,
    check_preset,
    corrupt,
    default_preset,
)
from medtricks.errors import MedtricksError, short
from medtricks.files import check_output, check_record_folder, record_folder, write_json
from medtricks.metrics import auroc, missing_class_warning
from medtricks.multilabel import mean_auroc
from medtricks.robustness import decision_model
from medtricks.runs import Run, newest_run, open_run

logger = logging.getLogger(__name__)

REPORT_NAME = "corruptions.json"


class CorruptionError(MedtricksError):
    """Bad corruption settings (preset, corruption names, severities)."""


def _mean(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def _summarise(results: list[dict], clean_error: float, names: Sequence[str]) -> tuple[list[dict], float, float]:
    """Per-corruption means and sums, mCE (mean error) and relative mCE (mean error - clean error), unnormalised."""
    rows = []
    for name in names:
        mine = [r for r in results if r["corruption"] == name]
        errors = [1.0 - r["accuracy"] for r in mine]
        rows.append({"corruption": name, "accuracy": float(np.mean([r["accuracy"] for r in mine])),
                     "auroc": _mean([r["auroc"] for r in mine]), "error_sum": float(np.sum(errors)),
                     "relative_error_sum": float(np.sum([e - clean_error for e in errors]))})
    n_sev = len(results) // len(names)
    mce = float(np.mean([row["error_sum"] / n_sev for row in rows]))
    relative_mce = float(np.mean([row["relative_error_sum"] / n_sev for row in rows]))
    return rows, mce, relative_mce


def evaluate_corruptions(model: torch.nn.Module, loader: Iterable[dict], names: Sequence[str],
                         severities: Sequence[int] = SEVERITIES, seed: int = 0, device: torch.device | None = None,
                         progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Clean and corrupted accuracy and AUROC of a classifier, ImageNet-C style (unnormalised mCE).

    Multi-label loaders ((N, L) multi-hot labels; `model` gives one logit per finding, predicted at >= 0:
    robustness.decision_model shifts them by the run's thresholds): probabilities are sigmoids, "accuracy" the mean
    over findings of each finding's accuracy and "auroc" the mean AUROC over the findings with both classes (as
    report.json's multi-label M), so mce is the mean per-finding error.

    Args:
        model: logits (N, K) whose argmax is the decision (wrap binary single-logit models first), in eval mode.
        loader: batches {"image": (N, C, H, W) float in [0, 1], "label": (N,) or (N, L) multi-hot}, in a fixed order:
            the i-th image yielded has index i for the random draws.
        names: corruptions (keys of CORRUPTIONS); checked against the images' channels.
        severities: among 1-5.
        seed: of every random draw (see corrupt).
        device: where the model and images run (default: the model's).
        progress: called as progress(done, total) after each batch x corruption (total None if len(loader) fails).

    Returns:
        {"clean": {"accuracy", "auroc"}, "results": [{"corruption", "severity", "accuracy", "auroc"}],
        "corruptions": [{"corruption", "accuracy" and "auroc" (means over severities; auroc None if any is None),
        "error_sum" (sum over severities of 1 - accuracy), "relative_error_sum" (sum of error - clean error)}],
        "mce" (mean over corruptions of the mean error over severities), "relative_mce" (mean over corruptions and
        severities of error - clean error), "n", "seed", "severities", "parameters" ({name: parameter per
        severity}), "seconds", "images_per_second" (clean and corrupted images through the model per second),
        "gallery": {"clean": (C, H, W), "severities", "images": {name: [(C, H, W) per severity]}} of the first image
        (CPU tensors: pop it before writing JSON)}. AUROC is None where undefined (one class in the labels).
    """
    names, severities = tuple(names), tuple(severities)
    check_corruptions(names, 3)  # the names now; the channels on the first batch
    if (not names or not severities or any(s not in SEVERITIES for s in severities)
            or len(set(names)) < len(names) or len(set(severities)) < len(severities)):
        raise ValueError(f"need distinct corruptions (at least one) and distinct severities among {SEVERITIES}; got "
                         f"{list(names)}, {list(severities)}.")
    if model.training:
        logger.warning("evaluate_corruptions: the model is in training mode (dropout, batch statistics); call .eval().")
    device = device or next(model.parameters(), torch.empty(0)).device
    try:
        total = len(loader) * len(names)
    except TypeError:
        total = None
    labels, clean, probs, gallery, done, started = [], [], {}, None, 0, time.perf_counter()
    multilabel = False

    def scored(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (for AUROC) and decisions: sigmoids and logit >= 0 per finding for multi-label models, else
        class_probabilities and the argmax (GradeCuts' scores decide, the model's softmax ranks)."""
        logits = model(x).float()
        return class_probabilities(model, x, logits, multilabel), decided(logits, multilabel).cpu().numpy()

    with torch.inference_mode():
        for batch in loader:
            images = batch["image"].to(device, torch.float32)
            check_corruptions(names, images.shape[1])
            offset = sum(len(y) for y in labels)
            index = torch.arange(offset, offset + len(images))
            labels.append(np.asarray(batch["label"].cpu() if torch.is_tensor(batch["label"]) else batch["label"]))
            multilabel = labels[-1].ndim == 2
            clean.append(scored(images))
            if gallery is None:
                gallery = {"clean": images[0].cpu(), "severities": list(severities), "images": {}}
            for name in names:
                for severity in severities:
                    corrupted = corrupt(images, name, severity, seed, index)
                    probs.setdefault((name, severity), []).append(scored(corrupted))
                    if offset == 0:
                        gallery["images"].setdefault(name, []).append(corrupted[0].cpu())
                done += 1
                if progress is not None:
                    progress(done, total)
    if not labels:
        raise ValueError("the loader yielded no images to evaluate.")
    y = np.concatenate(labels).astype(np.int64)

    def scores(parts: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        p, hat = (np.concatenate(found) for found in zip(*parts, strict=True))
        # multi-label: each finding at the run's threshold (decision_model shifted the logits by it)
        return {"accuracy": float((hat == y).mean()), "auroc": (mean_auroc if multilabel else auroc)(y, p)}

    if not multilabel:
        missing_class_warning(y, clean[0][0].shape[1], "corruption report")
    clean_scores = scores(clean)
    results = [{"corruption": name, "severity": severity, **scores(parts)} for (name, severity), parts in probs.items()]
    rows, mce, relative_mce = _summarise(results, 1.0 - clean_scores["accuracy"], names)
    seconds = time.perf_counter() - started
    return {"clean": clean_scores, "results": results,
            "corruptions": rows, "mce": mce, "relative_mce": relative_mce, "n": len(y), "seed": seed,
            "severities": list(severities),
            "parameters": {name: [CORRUPTIONS[name].severities[s - 1] for s in severities] for name in names},
            "seconds": seconds, "images_per_second": len(y) * (1 + len(names) * len(severities)) / seconds,
            "gallery": gallery}



def parse_severities(text: str) -> tuple[int, ...]:
    """'1,3,5' -> (1, 3, 5); each in 1..5."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= 5:
            raise CorruptionError(f"--severities {short(part)}: give severities among 1,2,3,4,5 (e.g. 1,3,5).")
        values.append(int(part))
    return tuple(sorted(set(values)))


def corruption_names(run: Run, preset: str | None, names: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    """(preset, corruption names): the named ones, else the preset's, else the run recipe's attack.corruptions, else
    its modality preset (data.augment: cxr -> radiograph, fundus, dermoscopy; others: radiograph), checked against
    the run's channels."""
    channels = run.info["in_chans"]
    try:
        preset = preset or run.recipe.attack.corruptions
        if preset is None:
            preset = default_preset(run.recipe.data.augment, channels)
        elif preset not in PRESETS:
            raise CorruptionError(f"--preset {short(preset)}: choose one of {', '.join(PRESETS)}.")
        if names is not None:
            if not names:
                raise CorruptionError("--corruptions is empty: name at least one corruption, e.g. gaussian_noise, or "
                                      "leave it out for the preset.")
            unknown = [n for n in names if n not in CORRUPTIONS]
            if unknown:
                raise CorruptionError(f"--corruptions {', '.join(map(short, unknown))}: unknown; choose among "
                                      f"{', '.join(CORRUPTIONS)}.")
            return "custom", check_corruptions(tuple(dict.fromkeys(names)), channels)  # once each, as severities
        return preset, check_preset(preset, channels)
    except CorruptionError:
        raise
    except ValueError as exc:  # the library's checks (e.g. a colour corruption on a grey model)
        raise CorruptionError(str(exc)) from exc


def _image_keys(dataset) -> list:
    """The images of a dataset (their keys), in order."""
    return [dataset.store.records[i]["key"] for i in dataset.indices]


def evaluate_run(run: Run, dataset, names, severities, seed: int, progress=None) -> dict:
    """evaluate_corruptions on `dataset` (a Run.dataset of the run), with the run's decisions."""
    return evaluate_corruptions(decision_model(run), run.loader(dataset), names, severities, seed, run.device,
                                progress)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def compare_reports(report: dict, reference: dict) -> dict:
    """Hendrycks & Dietterich's normalised CE of `report` with `reference` as the baseline (module docstring):
    per corruption and their means; None where the reference has no error to divide by."""
    theirs = {row["corruption"]: row for row in reference["corruptions"]}
    rows = []
    for row in report["corruptions"]:
        other = theirs[row["corruption"]]
        rows.append({"corruption": row["corruption"], "ce": _ratio(row["error_sum"], other["error_sum"]),
                     "relative_ce": _ratio(row["relative_error_sum"], other["relative_error_sum"]),
                     "accuracy_difference": row["accuracy"] - other["accuracy"]})

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows]
        return None if None in values else sum(values) / len(values)

    return {"corruptions": rows, "mce": mean("ce"), "relative_mce": mean("relative_ce"),
            "mean_accuracy_difference": mean("accuracy_difference")}


def corruption_report(run: str | Path | None = None, data: str | Path | None = None, split: str = "test",
                      preset: str | None = None, corruptions: Sequence[str] | None = None,
                      severities: Sequence[int] | None = None, seed: int = 0, limit: int | None = None,
                      against: str | Path | None = None, json_path: str | Path | None = None,
                      device: str | None = "auto", overwrite: bool = False,
                      progress: Callable[[int, int | None], None] | None = None) -> dict:
    """Evaluate a run under natural corruptions; write corruptions.json and plots under RUN/corruptions/.

    Args:
        run: a finished run directory; None = the newest finished run under runs/.
        data: data source (default: the run's own).
        split: val, test, train or all.
        preset: radiograph, fundus or dermoscopy (default: the recipe's attack.corruptions, else the run's
            modality; corruption_names).
        corruptions: these corruption names instead of a preset.
        severities: among 1-5 (default: the recipe's attack.severities, 1-5).
        seed: of every random draw.
        limit: only the first `limit` images.
        against: another finished run with the same classes and channels, evaluated on the same images and
            corruptions; the report gains "against" (its figures) and "versus" (compare_reports).
        json_path: also write the report here (never over an existing file unless `overwrite`).
        device: auto (CUDA when available), cpu, cuda or cuda:N; None = the recipe's train.device.
        progress: called as progress(done, total) while evaluating.

    Returns:
        The report: {"preset", "corruptions" (per corruption), "results" (per corruption and severity), "clean",
        "mce", "relative_mce", "n", "seed", "severities", "split", "data", "run", "device", ...} plus "files".
    """
    if json_path is not None:
        check_output(json_path, overwrite, "--json")
    target = open_run(run if run is not None else newest_run(), device)
    check_record_folder(target.path, "corruptions")
    preset, names = corruption_names(target, preset, corruptions)
    severities = tuple(severities) if severities is not None else target.recipe.attack.severities
    source = data if data is not None else target.source
    if isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise CorruptionError(f"--seed {seed}: must lie in [0, 2^32).")
    other = target.open_same_task(against, "--against") if against is not None else None
    dataset = target.dataset(source, split, limit)
    other_dataset = other.dataset(source, split, limit) if other is not None else None
    if other is not None and _image_keys(other_dataset) != _image_keys(dataset):
        raise CorruptionError(f"--against {against}: its {split} split of {source} holds other images than that of "
                              f"{target.path} (another split seed or split settings), so the two error rates would "
                              f"not compare like with like; pass --data with --split all, or a run of the same split.")
    report = evaluate_run(target, dataset, names, severities, seed, progress)
    gallery = report.pop("gallery")
    report = {"preset": preset, "names": list(names), **({"task": "multilabel"} if target.multilabel else {}),
              **report, "split": split, "data": str(source), "run": str(target.path), "device": str(target.device)}
    reference = None
    if other is not None:
        reference = evaluate_run(other, other_dataset, names, severities, seed, progress)
        reference.pop("gallery")
        reference["run"] = str(other.path)
        report["against"] = reference
        report["versus"] = compare_reports(report, reference)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if json_path is not None:  # first: the file the user asked for does not depend on the run being writable
        write_json(Path(json_path), report, replace=overwrite)
    with record_folder(target.path, "corruptions", f"{preset}-{stamp}") as folder:
        plots.plot_corruptions(report, folder / "corruptions.png", against=reference)
        plots.plot_corruption_gallery(gallery, folder / "gallery.png")
        write_json(folder / REPORT_NAME, report)
    report["files"] = str(target.path / "corruptions" / f"{preset}-{stamp}")
    return report
