"""finetune / evaluate / predict: the main job and the two commands that read only a run directory (+ data)."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from medtricks import __version__, distributed, plots
from medtricks import tta as tta_module
from medtricks.calibration import fit_temperature, temper
from medtricks.config import recipe_differences
from medtricks.data.images import read_image
from medtricks.data.pipeline import DataBundle, create_loader, eval_loader, load_data, loader_workers, resolve_source
from medtricks.data.sampling import SeededSampler
from medtricks.data.sources import image_inputs
from medtricks.data.splits import changed_splits
from medtricks.data.synth import synthesize
from medtricks.data.transforms import create_eval_transform
from medtricks.devices import place_model, resolve_device
from medtricks.errors import UNREADABLE_FIX, DataError, MedtricksError
from medtricks.files import (
    METRICS_FILE,
    MODEL_FILE,
    MODEL_JSON,
    RECIPE_FILE,
    REPORT_FILE,
    RESUME_FILE,
    RUN_FILES,
    OutputError,
    append_jsonl,
    check_output,
    printable,
    read_text,
    to_json,
    write_json,
    write_text,
)
from medtricks.metrics import decisions, expected_calibration_error
from medtricks.models.build import build_model, check_model_config
from medtricks.models.weights import sha256_of
from medtricks.multilabel import predicted_sets
from medtricks.recipe import Recipe, recipe_for_run
from medtricks.runs import (
    Run,
    RunError,
    check_new_run_dir,
    load_resume_state,
    load_run_model,
    lock_run,
    new_run_dir,
    open_run,
    save_recipe,
    save_resume_state,
    save_weights,
)
from medtricks.scoring import (
    EvalOutput,
    decision_keys,
    evaluate_split,
    predict_loader,
    report_metrics,
    val_threshold,
)
from medtricks.train import Callbacks, create_loss, fit
from medtricks.tricks.class_balance import balanced_sample_weights, class_weights, label_pos_weights
from medtricks.tricks.linear_scaling import scaled_lr

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from the recipe seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def finetune(recipe: Recipe | str | Path | None, data: str | Path | None = None, out: str | Path | None = None,
             overrides: Sequence[str] = (), seed: int | None = None,
             on_epoch: Callable[[dict], None] | None = None, resume: bool = False,
             on_start: Callable[[Recipe], None] | None = None) -> Path:
    """Fine-tune a pretrained backbone as the recipe says and write a run directory; return its path.

    Args:
        recipe: a Recipe, a bundled recipe name (demo, covid_cxr, ...) or a YAML path; None with `resume`
            (the run's own recipe.yaml).
        data: data source overriding data.source.
        out: run directory (must not exist unless `resume`); default runs/<recipe>-<timestamp>.
        overrides: `key=value` strings as for `--set`.
        seed: overrides the recipe seed.
        on_epoch: called with each metrics.jsonl row (the CLI drives its progress bar with it).
        resume: continue the unfinished run in `out` after its last completed epoch (after a crash or a kill);
            the result is the same as if it had never stopped.
        on_start: called once with the resolved recipe after it was checked, before any data is read (the CLI
            sizes its progress bar with it).

    The whole recipe (model section and stage names included) is checked before any image is read and before the
    run directory exists.

    Under torchrun (`torchrun --nproc_per_node N -m medtricks finetune ...`) every process calls this and they
    train one model together (medtricks.distributed): train.batch_size is the global batch, rank 0 alone reads and
    writes the run directory and calls `on_epoch`, and every rank returns the run's path once it is complete.
    """
    if recipe is None and not resume:
        raise MedtricksError("finetune needs a recipe (or resume=True with an existing run directory).")
    locks: list[int | None] = []  # the run directory's lock, held until training ends (rank 0)
    try:
        with distributed.process_group():
            if resume:
                resumed = distributed.on_main(lambda: _resume_point(out, recipe, data, overrides, seed))
                distributed.on_main(lambda: locks.append(lock_run(Path(out))))
                recipe, data, state = resumed["recipe"], resumed["data"], resumed["state"]
            else:
                recipe, state = recipe_for_run(recipe, overrides, seed), None
                if out is not None:
                    distributed.on_main(lambda: check_new_run_dir(Path(out)))  # before any data or weights are read
            check_model_config(recipe.model, recipe.tricks.zero_gamma)
            if on_start is not None and distributed.is_main():
                on_start(recipe)
            return _finetune(recipe, data, out, on_epoch, state, resumed=resume, locks=locks)
    finally:
        for fd in locks:
            if fd is not None:
                os.close(fd)


def _finetune(recipe: Recipe, data: str | Path | None, out: str | Path | None,
              on_epoch: Callable[[dict], None] | None, state: dict | None, resumed: bool,
              locks: list[int | None]) -> Path:
    device = resolve_device(recipe.train.device)
    teacher = _teacher(recipe, device)
    batch_size = distributed.local_batch_size(recipe.train.batch_size)
    seed_everything(recipe.seed)
    source = resolve_source(recipe.data, data)
    distributed.on_main(lambda: _synthesize_if_missing(recipe, source))
    bundle = load_data(recipe.data, source, recipe.seed)
    if resumed:
        recorded = _recorded(Path(out), "data")
        changed = changed_splits(recorded.get("split_digest") if isinstance(recorded, dict) else None,
                                 bundle.split_digest)
        if changed:
            raise RunError(f"{out}: its data {source} changed since training began (rows added, removed or "
                           f"relabelled): {changed[0]}; resuming would go on with other images than its saved epochs "
                           f"were trained and selected on. Restore the source as it was, or train a new run.")
    classes = bundle.classes
    train_labels = [r["label"] for r in _records(bundle, "train")]
    multilabel = recipe.data.multilabel
    if multilabel:
        _check_findings(train_labels, classes, source)
    elif len(set(train_labels)) < 2:
        raise DataError(f"{source}: the train split needs images of at least two classes; it has "
                        f"{sorted({classes[label] for label in train_labels})}.")
    elif absent := [c for k, c in enumerate(classes) if k not in set(train_labels)]:
        logger.warning("class(es) %s have no image in the train split (of %d); the model cannot learn them, and "
                       "their scores are what chance gives", absent, len(train_labels))
    if not multilabel and len(classes) >= 20 and np.median(np.bincount(
            [r["label"] for r in bundle.source.records], minlength=len(classes))) <= 2:
        logger.warning("%s: %d classes, most with 1 or 2 images: is the label column the label (data.label_column, "
                       "not a patient or image id)?", source, len(classes))
    if teacher is not None and teacher.classes != tuple(classes):
        raise MedtricksError(f"tricks.distillation.teacher {teacher.path}: its classes {list(teacher.classes)} "
                             f"differ from this run's {list(classes)}; use a teacher trained on the same classes.")
    if teacher is not None:
        _check_teacher_split(teacher, Path(source), bundle)
    model = place_model(build_model(recipe.model, len(classes), recipe.data.channels, recipe.tricks.zero_gamma),
                        device)
    base_lr = recipe.train.lr
    if recipe.tricks.linear_scaling is not None:
        base_lr = scaled_lr(recipe.train.lr, recipe.train.batch_size, recipe.tricks.linear_scaling.base_batch)
    balance = recipe.tricks.class_balance
    weights = None
    if balance is not None and balance.mode == "loss":  # (sampler mode is refused for multi-label by the recipe)
        weights = (label_pos_weights(train_labels) if multilabel else class_weights(train_labels, len(classes)))
        weights = weights.to(device)
    sampler = SeededSampler(len(train_labels), recipe.seed,
                            weights=balanced_sample_weights(train_labels) if balance and balance.mode == "sampler"
                            else None, num_replicas=distributed.world_size(), rank=distributed.rank())
    train_loader = create_loader(bundle.splits["train"], batch_size, loader_workers(recipe.data), sampler,
                                 drop_last=len(train_labels) > recipe.train.batch_size)
    val_loader = _eval_loader(bundle, "val", recipe)
    if val_loader is None:
        logger.warning("no validation split: the last epoch is kept and no threshold is tuned")

    rows: list[dict] = list(state["rows"]) if state is not None else []  # filled on rank 0
    run = distributed.on_main(lambda: _open_run(recipe, out, resumed, rows))
    if not resumed:  # (a resumed run was locked before its state was taken)
        distributed.on_main(lambda: locks.append(lock_run(run)))
    info = {**model.describe(), "classes": list(classes), "image_size": recipe.data.image_size,
            "channels": recipe.data.channels, "crop_fraction": recipe.data.crop_fraction,
            "medtricks_version": __version__, "tricks": recipe.tricks.enabled(),
            **({"task": "multilabel", "label_separator": recipe.data.label_separator,
                "no_finding": recipe.data.no_finding} if multilabel else {}),
            "data": {"source": str(Path(source).resolve()), "split_origin": bundle.split_origin,
                     "split_digest": bundle.split_digest,
                     "skipped": [{"file": k, "reason": r} for k, r in bundle.skipped]}}
    if state is None:  # model.json records the data source from the start: resume reads it (_recorded_source)
        distributed.on_main(lambda: write_json(run / MODEL_JSON, info))

    def save_best(best_model: torch.nn.Module, row: dict) -> None:
        save_weights(run / MODEL_FILE, best_model)
        write_json(run / MODEL_JSON, {**info, "best_epoch": row["epoch"]})

    def epoch_done(row: dict) -> None:
        rows.append(row)
        append_jsonl(run / METRICS_FILE, row)
        if on_epoch is not None:
            on_epoch(row)

    result = fit(model, train_loader, val_loader, recipe.train, recipe.tricks, base_lr=base_lr,
                 lr_multipliers=recipe.model.lr_multipliers, device=device, seed=recipe.seed,
                 loss_fn=create_loss(recipe.tricks, weights, teacher.model if teacher is not None else None,
                                     multilabel=multilabel),
                 callbacks=Callbacks(save_best, epoch_done, lambda fit_state: save_resume_state(
                     run, {**fit_state, "rows": rows, "recipe": recipe.to_dict()})), state=state)
    # rank 0 reads the selected epoch's weights back from the run (checking they load); every rank predicts with
    # them (the run directory need not be on a filesystem the other nodes see)
    model.load_state_dict(distributed.on_main(lambda: load_run_model(run)[0].state_dict()))
    # train.tta: from here on the run is the model averaged over its test-time views (the epoch was selected without)
    scorer, views = tta_module.wrap(model, recipe.data.augment, multilabel) if recipe.train.tta else (model, None)
    loaders = {name: loader for name in ("val", "test") if (loader := _eval_loader(bundle, name, recipe)) is not None}
    outputs = {name: predict_loader(scorer, loader, device) for name, loader in loaders.items()}
    threshold, calibration = result.threshold, None
    if views is not None and "val" in outputs:  # averaging moves the scores the epoch's threshold was chosen on
        threshold = val_threshold(outputs["val"], len(classes), recipe.train.threshold)
    if recipe.train.calibrate == "temperature":
        if "val" not in outputs:
            logger.warning("train.calibrate: temperature needs a validation split to fit on; not calibrated")
        else:  # fitted after the epoch was selected, then every split is scored (and the threshold chosen) with it
            calibration = {"method": "temperature", **fit_temperature(outputs["val"].labels, outputs["val"].probs)}
            scorer.temperature = calibration["temperature"]
            outputs = {name: predict_loader(scorer, loader, device) for name, loader in loaders.items()}
            threshold = val_threshold(outputs["val"], len(classes), recipe.train.threshold)
    if recipe.tricks.ordinal_decoding is not None:
        if len(classes) < 3 or "val" not in outputs:
            logger.warning("tricks.ordinal_decoding needs %s; decisions stay argmax",
                           "3 or more grades" if len(classes) < 3 else "a validation split to fit the cuts on")
        else:  # fitted once, on the selected (and calibrated) model: the per-epoch selection decides by argmax
            threshold = val_threshold(outputs["val"], len(classes), recipe.train.threshold,
                                      recipe.tricks.ordinal_decoding)

    def write_results() -> None:
        full = {name: evaluate_split(output, threshold, recipe.seed, recipe.data.ordinal, classes=classes)
                for name, output in outputs.items()}
        if calibration is not None:
            for name, output in outputs.items():  # the same predictions at T = 1
                full[name]["ece_before"] = expected_calibration_error(
                    output.labels, temper(output.probs, 1.0 / calibration["temperature"]))
        write_json(run / MODEL_JSON, {**info, "best_epoch": result.best_epoch,
                                      **({"tta": list(views)} if views is not None else {}),
                                      **decision_keys(threshold, classes, multilabel),
                                      "select_metric": recipe.train.select_metric,
                                      **({"temperature": calibration["temperature"], "calibration": calibration}
                                         if calibration is not None else {}),
                                      "sha256": sha256_of(run / MODEL_FILE)})
        report = {"recipe": recipe.name, "seed": recipe.seed, "classes": list(classes),
                  **({"task": "multilabel"} if multilabel else {}),
                  "splits": {name: report_metrics(metrics) for name, metrics in full.items()},
                  "train": {"epochs": result.epochs_run, "best_epoch": result.best_epoch,
                            "seconds": round(result.seconds, 2),
                            "images_per_second": round(result.images_per_second, 2), "base_lr": base_lr,
                            "world_size": distributed.world_size(), "tricks": recipe.tricks.enabled()}}
        _plots(run, rows, outputs, full, classes, threshold, calibration)
        write_json(run / REPORT_FILE, report)  # last: a run with report.json is complete
        (run / RESUME_FILE).unlink(missing_ok=True)

    distributed.on_main(write_results)
    return run


def _eval_loader(bundle: DataBundle, split: str, recipe: Recipe):
    dataset = bundle.splits.get(split)
    return eval_loader(dataset, recipe.data, recipe.train.eval_batch_size) if dataset is not None else None


def _synthesize_if_missing(recipe: Recipe, source: Path) -> None:
    if not source.exists() and recipe.data.synth_if_missing:
        logger.info("%s does not exist: writing synthetic phantoms there (data.synth_if_missing)", source)
        try:
            synthesize(source, seed=recipe.seed)
        except OutputError:
            if not (source / "labels.csv").is_file():
                raise
            logger.info("%s: another command wrote the phantoms meanwhile; using those", source)


def _open_run(recipe: Recipe, out: str | Path | None, resumed: bool, rows: list[dict]) -> Path:
    """The run directory: a new one with the resolved recipe, or the resumed one with the metrics rows of its
    saved state (rows of an epoch whose state was lost are dropped)."""
    if resumed:
        run = Path(out)
    else:
        run = new_run_dir(recipe.name, out)
        save_recipe(run, recipe.to_dict())
    write_text(run / METRICS_FILE, "".join(to_json(row) + "\n" for row in rows))
    return run


def _refuse_links(run: Path) -> None:
    """A run finetune writes was made by finetune: none of its own files or folders is a link. Resuming a run
    unpacked from elsewhere with a link in it would write through the link (metrics.jsonl -> ~/.bashrc)."""
    entries = [run / name for name in RUN_FILES]
    if (run / "plots").is_dir() and not (run / "plots").is_symlink():
        entries += list((run / "plots").iterdir())
    linked = [str(path.relative_to(run)) for path in entries if path.is_symlink()]
    if linked:
        raise RunError(f"{run}: {', '.join(linked)} is a symbolic link, which finetune never makes, and resuming "
                       f"would write through it to {(run / linked[0]).resolve()}; nothing was written. Replace "
                       f"the link with a copy of the file, or train again with a new --out.")


def _resume_point(out: str | Path | None, recipe: Recipe | str | Path | None, data: str | Path | None,
                  overrides: Sequence[str], seed: int | None) -> dict:
    """What an unfinished run directory continues from: {"recipe", "data", "state" (None before epoch 1)}.

    A recipe or data given again must be the run's own: resuming with other settings would mix two experiments.
    """
    if out is None or not Path(out).is_dir():
        raise RunError(f"--resume needs an existing run directory as --out; {out} is not one.")
    run = Path(out)
    if (run / REPORT_FILE).is_file():
        raise RunError(f"{run}: the run is finished (report.json exists); there is nothing to resume.")
    _refuse_links(run)
    if _recorded(run, "members") is not None:
        raise RunError(f"{run}: that is an ensemble (`medtricks ensemble`), not a training run, so there is nothing "
                       f"to resume; run `medtricks ensemble` again with a new --out.")
    saved = recipe_for_run(recipe, overrides, seed, resume_from=run)
    state = load_resume_state(run)
    if state is not None:
        _check_recipe_unedited(run, saved, state)
    recorded = _recorded_source(run)
    if recorded is not None:
        if data is not None and str(Path(resolve_source(saved.data, data)).resolve()) != recorded:
            raise RunError(f"{run}: it was trained on {recorded}, not {data}; resume without --data or with the "
                           f"same.")
        data = recorded
    return {"recipe": saved, "data": data, "state": state}


def _check_recipe_unedited(run: Path, saved: Recipe, state: dict) -> None:
    """Refuse a run whose recipe.yaml no longer says what its saved epochs were trained with (an edited file would
    mix two experiments, or, with fewer epochs than were run, end the run with nothing trained)."""
    trained = state.get("recipe")  # states of older versions did not record it: then only the epochs can be checked
    changed = (recipe_differences(json.loads(json.dumps(saved.to_dict())), trained) if trained is not None else
               ["train.epochs"] if state["epoch"] > saved.train.epochs else [])
    if changed:
        raise RunError(f"{run}: its {RECIPE_FILE} was edited after training began ({', '.join(changed)} differ from "
                       f"what its {state['epoch']} completed epochs were trained with); a run's own files are only "
                       f"written by medtricks. Restore the file, or start a new run (--recipe {run / RECIPE_FILE} "
                       f"with a new --out trains the edited recipe from the start).")


def _recorded_source(run: Path) -> str | None:
    """The data source in the run's model.json, written when the run opens and again with every best epoch (None
    for a run that stopped before its first epoch under a version that did not write it then)."""
    data = _recorded(run, "data")
    return data.get("source") if isinstance(data, dict) else None


def _recorded(run: Path, key: str):
    """model.json's `key` in an unfinished run (None when the file or the key is missing or unreadable)."""
    try:
        info = json.loads(read_text(run / MODEL_JSON))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return info.get(key) if isinstance(info, dict) else None


def _check_findings(train_labels: list[tuple], classes: tuple[str, ...], source: Path) -> None:
    """A multi-label train split needs images; a finding it never (or always) shows cannot be learned: warn."""
    if not train_labels:
        raise DataError(f"{source}: the train split is empty.")
    positives = np.sum(train_labels, axis=0)
    constant = [name for name, k in zip(classes, positives, strict=True) if k in (0, len(train_labels))]
    if constant:
        logger.warning("finding(s) %s are in none or all of the %d training images; the model cannot learn them "
                       "and their AUROC is what chance gives", constant, len(train_labels))


def _records(bundle: DataBundle, split: str) -> list[dict]:
    dataset = bundle.splits.get(split)
    return [dataset.store.records[i] for i in dataset.indices] if dataset is not None else []


def _check_teacher_split(teacher: Run, source: Path, bundle: DataBundle) -> None:
    """A teacher trained on the student's own source must have had the student's split: with another (another split
    seed, or the source before it changed) it trained on some of the student's validation and test images, and the
    student would learn its memory of them. A teacher of another data set is the user's call."""
    digest = teacher.info["data"].get("split_digest")
    if digest is None or Path(teacher.source).resolve() != source.resolve():
        return
    changed = changed_splits(digest, bundle.split_digest, "in the teacher")
    if changed:
        raise RunError(f"tricks.distillation.teacher {teacher.path}: it was trained on another split of {source} "
                       f"({changed[0]}), so it has seen images "
                       f"of this run's validation or test split. Train the teacher with this run's split (the same "
                       f"--seed, or --set data.split.seed=S for both).")


def _teacher(recipe: Recipe, device: torch.device) -> Run | None:
    """The distillation trick's teacher run, opened on the training device (checked before any data is read)."""
    if recipe.tricks.distillation is None:
        return None
    teacher = open_run(recipe.tricks.distillation.teacher, device)
    if teacher.info["in_chans"] != recipe.data.channels:
        raise MedtricksError(f"tricks.distillation.teacher takes {teacher.info['in_chans']}-channel images; "
                             f"data.channels is {recipe.data.channels}.")
    for param in teacher.model.parameters():
        param.requires_grad_(False)
    return teacher


def _plots(run: Path, rows: list[dict], outputs: dict[str, EvalOutput], metrics: dict[str, dict], classes,
           threshold, calibration: dict | None = None) -> None:
    plots.plot_training_curves(rows, run / "plots" / "training_curves.png")
    for name, out in outputs.items():
        if out.multilabel or len(set(out.labels.tolist())) < 2:  # multi-label: per-finding plots not drawn yet
            continue
        plots.plot_roc(out.labels, out.probs, classes, run / "plots" / f"roc_{name}.png",
                       threshold=threshold if len(classes) == 2 else None)  # grade cuts are no point on a curve
        plots.plot_confusion(metrics[name]["confusion_matrix"], classes, run / "plots" / f"confusion_{name}.png")
        plots.plot_reliability(out.labels, out.probs, run / "plots" / f"reliability_{name}.png")
        if calibration is not None:
            plots.plot_reliability(out.labels, temper(out.probs, 1.0 / calibration["temperature"]),
                                   run / "plots" / f"reliability_{name}_before.png")


def _open_for_scoring(run: str | Path, device: str | None, tta: bool) -> tuple[Run, float | None, dict]:
    """The opened run, its decision rule (Run.threshold) and the JSON keys of --tta: with `tta`, the model averaged
    over the views its augment preset allows (medtricks.tta) and the rule chosen again, with those views, on the
    run's own validation split (the run's rule when that split cannot be read, with a warning). A run trained with
    train.tta is scored with its own views and rule, with or without `tta`."""
    opened = open_run(run, device)
    threshold = opened.threshold
    if "tta" in opened.info:  # a train.tta run: its model and rule are already those of its views
        return opened, threshold, {"tta": opened.info["tta"], **_rule_keys(opened, threshold)}
    if not tta:
        return opened, threshold, {}
    opened.model, views = tta_module.wrap(opened.model, opened.recipe.data.augment, opened.multilabel)
    if len(opened.classes) == 2 or threshold is not None:  # binary threshold, per-finding thresholds, grade cuts
        try:
            val = opened.predict(opened.dataset(None, "val"))
            threshold = val_threshold(val, len(opened.classes), opened.recipe.train.threshold,
                                      opened.recipe.tricks.ordinal_decoding)
        except MedtricksError as exc:
            logger.warning("--tta: the run's validation split cannot be scored (%s); using the run's threshold %s, "
                           "chosen without test-time augmentation", exc, threshold)
    return opened, threshold, {"tta": list(views), **_rule_keys(opened, threshold)}


def _rule_keys(opened: Run, threshold: float | list[float] | None) -> dict:
    """The decision rule as evaluate's JSON gives it with test-time augmentation."""
    if opened.multilabel:
        return {"thresholds": None if threshold is None else dict(zip(opened.classes, threshold, strict=True))}
    return {"threshold": threshold}


def evaluate(run: str | Path, data: str | Path | None = None, split: str = "val",
             json_path: str | Path | None = None, device: str | None = None, overwrite: bool = False,
             tta: bool = False) -> dict:
    """Metrics M of a run's model on a split of its own data or on another source (`split="all"`).

    Reads only the run directory and the data: the same source, seed and split fractions reproduce the split,
    and the binary threshold is the one chosen on validation during training. Called on every rank of a process
    group (medtricks.distributed.process_group), each rank predicts a shard and all get the same metrics.
    `device`: auto, cpu, cuda or cuda:N (default: the recipe's train.device). `json_path` must be a new file
    (or `overwrite`), never one of a run's own files (medtricks.files.check_output). `tta`: average over the flips
    the run's augment preset allows, with the threshold chosen again on validation with them (`tta` and
    `threshold` join the metrics).
    """
    if json_path is not None:
        check_output(json_path, overwrite, "--json")
    opened, threshold, tta_keys = _open_for_scoring(run, device, tta)
    output = opened.predict(opened.dataset(data, split))
    metrics = {**report_metrics(evaluate_split(output, threshold, opened.recipe.seed, opened.recipe.data.ordinal,
                                               classes=opened.classes)),
               "split": split, "data": str(data if data is not None else opened.source), **tta_keys}
    if json_path is not None:
        distributed.on_main(lambda: write_json(Path(json_path), metrics, replace=overwrite))
    return metrics


def _label_set(opened: Run, probs: list[float], thresholds: list[float] | None) -> str:
    """A multi-label run's prediction: the findings at or above their thresholds joined by the run's separator;
    none: the run's no-finding name (data.no_finding), or "" when it has none."""
    found = [c for c, hot in zip(opened.classes, predicted_sets(np.array([probs]), thresholds)[0], strict=True) if hot]
    if not found:
        return opened.info.get("no_finding") or ""
    return opened.info["label_separator"].join(found)


def _cell(value):
    """A CSV cell that a spreadsheet shows as text: one starting with =, +, -, @, tab or carriage return (a file or
    class name such as "=HYPERLINK(...)") would run as a formula, so it gets a leading ' (OWASP's advice)."""
    return "'" + value if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")) else value


def predict(run: str | Path, inputs: Sequence[str | Path], out_csv: str | Path | None = None,
            device: str | None = None, overwrite: bool = False, tta: bool = False) -> list[dict]:
    """Class probabilities for image files or folders (recursively); rows also written to `out_csv` (a new file,
    or `overwrite`; never a run's own file). Multi-label runs: `p_<finding>` is that finding's sigmoid
    probability and `prediction` the findings at or above their validation thresholds, joined by the run's
    data.label_separator (the data.no_finding name when there is none).

    A file that cannot be read or scored (unreadable, too large, non-finite pixels or probabilities) gets a row with
    its error instead of a prediction; the other files are predicted. `tta`: as in evaluate. In the CSV, a text
    cell starting with =, +, -, @, tab or CR is written with a leading ' so that no spreadsheet runs it as a
    formula (the returned rows keep the names as they are).

    Raises:
        DataError: an input that does not exist, or inputs that hold no image file at all.
    """
    if out_csv is not None:
        check_output(out_csv, overwrite, "--out")
    opened, threshold, _ = _open_for_scoring(run, device, tta)
    info, classes = opened.info, opened.classes
    transform = create_eval_transform(info["image_size"], info["crop_fraction"])
    files = image_inputs(inputs)
    rows = []
    with torch.inference_mode():
        for path in files:
            try:
                pixels, _ = read_image(path, info["channels"])
                image = transform(torch.from_numpy(pixels))[None].to(opened.device)
                logits = opened.model(image).float()
                probs = (logits.sigmoid() if opened.multilabel else logits.softmax(-1))[0].tolist()
                if not np.all(np.isfinite(probs)):
                    raise DataError(f"{path}: the model gives non-finite probabilities for this image; check it "
                                    f"for NaN or infinite pixel values.")
            except DataError as exc:  # listed in its row; data.on_error (the data set's advice) does not apply here
                rows.append({"path": printable(path), "prediction": "", "error": printable(exc).replace(UNREADABLE_FIX,
                                                                                        "Re-export the file.")})
                continue
            if opened.multilabel:
                predicted = _label_set(opened, probs, threshold)
            else:
                predicted = classes[int(decisions(np.array([probs]), threshold)[0])]
            rows.append({"path": printable(path), "prediction": predicted,
                         **{f"p_{c}": round(p, 6) for c, p in zip(classes, probs, strict=True)}, "error": ""})
    escaped = [path for path in files if printable(path) != str(path)]
    if escaped:
        logger.warning("%d file name(s) are not valid UTF-8 (e.g. %s): their undecodable bytes are written as \\xNN in "
                       "the path column; rename the files to join every row back to its file.", len(escaped),
                       printable(escaped[0]))
    if out_csv is not None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["path", "prediction", *[f"p_{c}" for c in classes], "error"])
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        write_text(Path(out_csv), text.getvalue(), replace=overwrite)
    return rows
