"""`medtricks ensemble RUN RUN ... --out DIR`: average several finished runs of one task into a run-like directory.

The directory holds what a run holds (recipe.yaml: the first member's; model.safetensors: every member's weights;
model.json: the members and the ensemble's own binary threshold; report.json), so evaluate, predict, compare,
attack and corrupt open it like any run: its model returns the log of the mean of the members' probabilities
(medtricks.models.ensemble), each member with its own calibration temperature and test-time views (train.tta).
The threshold is chosen again on the validation split, on the averaged probabilities, by the first member's
`train.threshold` method. Multi-label
members (data.task: multilabel) are averaged finding by finding (the mean of their sigmoid probabilities), and each
finding's threshold is chosen again on validation the same way (model.json's `thresholds`).

The members must have been trained on the same data source with the same split (split settings and split seed:
`data.split.seed` fixes it across training seeds), so that the validation and test images of the ensemble are those
of every member (and no member trained on them); they must take the same input (channels, size, crop) and give the
same classes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from medtricks import __version__
from medtricks.data.splits import OWN_SPLITS
from medtricks.errors import DataError, MedtricksError
from medtricks.files import MODEL_FILE, MODEL_JSON, REPORT_FILE, write_json
from medtricks.models.ensemble import EnsembleModel
from medtricks.models.weights import sha256_of
from medtricks.runs import (
    MAX_MEMBERS,
    Run,
    check_new_run_dir,
    finite,
    new_run_dir,
    open_run,
    save_recipe,
    save_weights,
)
from medtricks.scoring import decision_keys, evaluate_split, predict_loader, report_metrics, val_threshold
from medtricks.tta import unwrap

# what the members must share: model.json keys (input and classes) and recipe keys (the split of the data)
SAME_INPUT = ("classes", "channels", "in_chans", "image_size", "crop_fraction")
MULTILABEL_KEYS = ("task", "label_separator", "no_finding")  # model.json keys of a multi-label run


logger = logging.getLogger(__name__)


class EnsembleError(MedtricksError):
    """Members that cannot be averaged (too few, too many, another task or another split)."""


def _split_settings(run: Run) -> dict:
    split = run.recipe.data.split
    own = run.info["data"].get("split_origin") == OWN_SPLITS  # (MedMNIST, a split column): no seed chose them
    return {"split seed": None if own else split.seed_for(run.recipe.seed),
            "data.split": dataclasses.replace(split, seed=None), "data.source": run.source}


def _check_members(runs: Sequence[Run]) -> None:
    first = runs[0]
    for other in runs[1:]:
        differ = [k for k in SAME_INPUT if other.info[k] != first.info[k]]
        differ += [k for k in MULTILABEL_KEYS if other.info.get(k) != first.info.get(k)]  # the task, and its labels
        if first.multilabel and other.recipe.data.label_column != first.recipe.data.label_column:
            differ.append("data.label_column")
        differ += [k for k, v in _split_settings(other).items() if v != _split_settings(first)[k]]
        digests = [m.info["data"].get("split_digest") for m in (first, other)]
        if None not in digests and digests[0] != digests[1]:  # the same settings on a source that changed between
            differ.append("data.split_digest (the images of their splits)")
        if differ:
            raise EnsembleError(f"{other.path} differs from {first.path} in {', '.join(differ)}: ensemble members "
                                f"must take the same images, give the same classes and come from the same data "
                                f"split (same source, split seed and data.split), so that no member trained on the "
                                f"ensemble's validation or test images. For an ensemble of seeds, fix the split "
                                f"with --set data.split.seed=S and vary --seed.")


def ensemble(runs: Sequence[str | Path], out: str | Path | None = None, device: str | None = None) -> Path:
    """Average finished runs into a new run-like directory `out` (default runs/ensemble-<time>); returns it.

    Raises:
        EnsembleError: fewer than 2 or more than MAX_MEMBERS runs, or members that differ in task or split.
        RunError: a member that is not a finished run, or an `out` that exists.
    """
    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)  # one path, not the characters of one
    if not 2 <= len(runs) <= MAX_MEMBERS:
        raise EnsembleError(f"an ensemble takes 2 to {MAX_MEMBERS} runs; got {len(runs)}.")
    if len({os.path.realpath(r) for r in runs}) < len(runs):  # realpath: a link loop is opened (and named) later
        raise EnsembleError("the same run is given twice; each member must be another run.")
    started = time.perf_counter()
    if out is not None:
        check_new_run_dir(Path(out))  # exists, or inside a run's own folders: before any member is read
    members = [open_run(r, device) for r in runs]
    nested = [str(m.path) for m in members if "members" in m.info]
    if nested:
        raise EnsembleError(f"{', '.join(nested)} is itself an ensemble; give the runs it averages as members instead "
                            f"(its model.json lists them under members[].run).")
    seen: dict[str, Path] = {}
    for m in members:  # a copied run directory is the same model under another path
        if (same := seen.setdefault(m.info["sha256"], m.path)) != m.path:
            raise EnsembleError(f"{m.path} and {same} hold the same weights (one is a copy of the other); each member "
                                f"must be another trained model.")
    _check_members(members)
    first = members[0]
    model = EnsembleModel([m.model for m in members], multilabel=first.multilabel).eval()
    where = ", ".join(str(m.path) for m in members)
    outputs = {"val": finite(predict_loader(model, first.loader(first.dataset(None, "val")), first.device), where)}
    try:  # the threshold needs the validation split (an error above names why it cannot be read); test may be empty
        outputs["test"] = finite(predict_loader(model, first.loader(first.dataset(None, "test")), first.device), where)
    except DataError as exc:
        logger.warning("the ensemble has no test split to report (%s)", exc)
    threshold = val_threshold(outputs["val"], len(first.classes), first.recipe.train.threshold,
                              first.recipe.tricks.ordinal_decoding)
    run = new_run_dir("ensemble", out)  # only now: a member split that cannot be read leaves nothing behind
    try:
        _write(run, members, outputs, threshold, time.perf_counter() - started)
    except BaseException:  # an error, Ctrl-C or SIGTERM: the folder is ours alone (made above); no half ensemble
        shutil.rmtree(run, ignore_errors=True)
        raise
    return run


def _write(run: Path, members: list[Run], outputs: dict, threshold, seconds: float) -> None:
    """The ensemble's run files; recipe.yaml last, so that a killed ensemble leaves no run that --resume would take."""
    first = members[0]
    recipe = first.recipe.to_dict()
    save_weights(run / MODEL_FILE, EnsembleModel([unwrap(m.model) for m in members]))  # the bare networks' state
    described = [{**{k: m.info[k] for k in ("arch", "num_classes", "in_chans", "input_mode")},
                  "temperature": m.info.get("temperature", 1.0), **({"tta": m.info["tta"]} if "tta" in m.info else {}),
                  "run": str(m.path.resolve()), "sha256": m.info.get("sha256")} for m in members]
    # multi-label: one threshold per finding, as finetune records them; ordinal decoding: the grade cuts
    thresholds = {**decision_keys(threshold, first.classes, first.multilabel),
                  **({k: first.info[k] for k in MULTILABEL_KEYS} if first.multilabel else {})}
    info = {**{k: first.info[k] for k in (*SAME_INPUT, "num_classes", "input_mode", "data")}, "arch": "ensemble",
            "members": described, **thresholds, "medtricks_version": __version__,
            "threshold_method": first.recipe.train.threshold, "sha256": sha256_of(run / MODEL_FILE)}
    write_json(run / MODEL_JSON, info)
    splits = {name: report_metrics(evaluate_split(output, threshold, first.recipe.seed, first.recipe.data.ordinal,
                                                  classes=first.classes))
              for name, output in outputs.items()}
    write_json(run / REPORT_FILE, {"recipe": f"ensemble-{recipe['name']}", "seed": first.recipe.seed,
                                   "classes": list(first.classes),
                                   **({"task": "multilabel"} if first.multilabel else {}), "splits": splits,
                                   "train": {"epochs": None, "seconds": round(seconds, 2),
                                             "images_per_second": None, "members": [m["run"] for m in described]}})
    save_recipe(run, {**recipe, "name": f"ensemble-{recipe['name']}"})

