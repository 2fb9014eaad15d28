"""finetune / evaluate / predict: the main job and the two commands that read only a run directory (+ data)."""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import medtricks
from medtricks import distributed, plots
from medtricks.data.images import read_image
from medtricks.data.pipeline import load_data, load_eval_data, resolve_source
from medtricks.data.sampling import SeededSampler
from medtricks.data.sources import image_files
from medtricks.data.synth import synthesize
from medtricks.data.transforms import create_eval_transform
from medtricks.errors import DataError, MedtricksError
from medtricks.models.build import build_model, check_model_config
from medtricks.recipe import Recipe, build_dataclass, load_recipe, recipe_differences
from medtricks.runs import (
    METRICS_FILE,
    MODEL_FILE,
    MODEL_JSON,
    RECIPE_FILE,
    REPORT_FILE,
    RESUME_FILE,
    RunError,
    append_jsonl,
    load_resume_state,
    load_run_model,
    new_run_dir,
    read_run,
    read_run_recipe,
    save_recipe,
    save_resume_state,
    save_weights,
    write_json,
    write_text,
)
from medtricks.train import EvalOutput, evaluate_split, fit, predict_loader
from medtricks.tricks.class_balance import balanced_sample_weights, class_weights
from medtricks.tricks.linear_scaling import scaled_lr
from medtricks.tricks.zero_gamma import apply_zero_gamma

logger = logging.getLogger(__name__)
REPORT_KEYS = ("n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity", "f1", "ece")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from the recipe seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The recipe's train.device as a torch device; CUDA: the current device (each torchrun process's own)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MedtricksError("train.device is cuda but no CUDA device is available; use auto or cpu.")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` moved to `device` (in place) in the layout its convolutions run fastest in there.

    CPU: channels-last, oneDNN's native layout: with bfloat16 autocast a training step of efficientnet_lite0 /
    resnet18 at 224 px runs about 1.2x faster than with contiguous weights on a 2-core AVX-512 CPU
    (benchmarks/train_speed.py). The values are the same; saved weights are written contiguous. CUDA keeps the
    default layout (not measured here).
    """
    if device.type == "cpu":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def _report_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in REPORT_KEYS}


def _loader(dataset, batch_size: int, workers: int, sampler, drop_last: bool = False) -> DataLoader:
    """A loader whose sampler decides the order (SeededSampler for training, a shard for evaluation)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      persistent_workers=workers > 0)


def _eval_loader(dataset, recipe: Recipe, workers: int) -> DataLoader:
    """This rank's shard of `dataset` for predict_loader, which gathers all shards (all of it in one process)."""
    return _loader(dataset, recipe.train.eval_batch_size, workers, sampler=distributed.shard(len(dataset)))


def _workers(recipe: Recipe) -> int:
    from medtricks.data.dataset import default_workers

    return default_workers() if recipe.data.workers is None else recipe.data.workers


def finetune(recipe: Recipe | str | Path | None, data: str | Path | None = None, out: str | Path | None = None,
             overrides: Sequence[str] = (), seed: int | None = None,
             on_epoch: Callable[[dict], None] | None = None, resume: bool = False) -> Path:
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

    Under torchrun (`torchrun --nproc_per_node N -m medtricks finetune ...`) every process calls this and they
    train one model together (medtricks.distributed): train.batch_size is the global batch, rank 0 alone reads and
    writes the run directory and calls `on_epoch`, and every rank returns the run's path once it is complete.
    """
    with distributed.process_group():
        return _finetune(recipe, data, out, overrides, seed, on_epoch, resume)


def _finetune(recipe: Recipe | str | Path | None, data: str | Path | None, out: str | Path | None,
              overrides: Sequence[str], seed: int | None, on_epoch: Callable[[dict], None] | None,
              resume: bool) -> Path:
    resumed = distributed.on_main(lambda: _resume_point(out, recipe, data, overrides, seed)) if resume else None
    if resumed is not None:
        recipe, data = resumed["recipe"], resumed["data"]
    elif recipe is None:
        raise MedtricksError("finetune needs a recipe (or resume=True with an existing run directory).")
    else:
        recipe = _as_recipe(recipe, overrides, seed)
    check_model_config(recipe.model)
    batch_size = distributed.local_batch_size(recipe.train.batch_size)
    seed_everything(recipe.seed)
    source = resolve_source(recipe.data, data)
    distributed.on_main(lambda: _synthesize_if_missing(recipe, source))
    bundle = load_data(recipe.data, source, recipe.seed)
    classes = bundle.classes
    if "train" not in bundle.splits or len({r["label"] for r in _records(bundle, "train")}) < 2:
        raise DataError(f"{source}: the train split needs images of at least two classes; it has "
                        f"{sorted({classes[r['label']] for r in _records(bundle, 'train')})}.")
    device = resolve_device(recipe.train.device)
    model = build_model(recipe.model, len(classes), recipe.data.channels)
    if recipe.tricks.zero_gamma is not None:
        apply_zero_gamma(model, recipe.tricks.zero_gamma.stages, recipe.tricks.zero_gamma.beta)
    place_model(model, device)
    teacher = _teacher(recipe, classes, device)
    base_lr = recipe.train.lr
    if recipe.tricks.linear_scaling is not None:
        base_lr = scaled_lr(recipe.train.lr, recipe.train.batch_size, recipe.tricks.linear_scaling.base_batch)
    train_labels = [r["label"] for r in _records(bundle, "train")]
    weights, sample_weights = None, None
    if recipe.tricks.class_balance is not None:
        if recipe.tricks.class_balance.mode == "loss":
            weights = class_weights(train_labels, len(classes)).to(device)
        else:
            sample_weights = balanced_sample_weights(train_labels)
    workers = _workers(recipe)
    train_set = bundle.splits["train"]
    sampler = SeededSampler(len(train_set), recipe.seed, weights=sample_weights,
                            num_replicas=distributed.world_size(), rank=distributed.rank())
    train_loader = _loader(train_set, batch_size, workers, sampler=sampler,
                           drop_last=len(train_set) > recipe.train.batch_size)
    val_loader = _eval_loader(bundle.splits["val"], recipe, workers) if "val" in bundle.splits else None
    if val_loader is None:
        logger.warning("no validation split: the last epoch is kept and no threshold is tuned")

    state = resumed["state"] if resumed is not None else None
    rows: list[dict] = list(state["rows"]) if state is not None else []  # filled on rank 0
    run = distributed.on_main(lambda: _open_run(recipe, out, resumed is not None, rows))
    info = {**model.describe(), "classes": list(classes), "image_size": recipe.data.image_size,
            "channels": recipe.data.channels, "crop_fraction": recipe.data.crop_fraction,
            "medtricks_version": medtricks.__version__, "tricks": recipe.tricks.enabled(),
            "data": {"source": str(Path(source).resolve()), "split_origin": bundle.split_origin,
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

    def save_state(fit_state: dict) -> None:
        save_resume_state(run, {**fit_state, "rows": rows})

    result = fit(model, train_loader, val_loader, recipe.train, recipe.tricks, base_lr=base_lr,
                 lr_multipliers=recipe.model.lr_multipliers, device=device, seed=recipe.seed,
                 num_classes=len(classes), class_weights=weights, teacher=teacher, on_epoch=epoch_done,
                 save_best=save_best, save_state=save_state, state=state)
    # rank 0 reads the selected epoch's weights back from the run (checking they load); every rank predicts with
    # them (the run directory need not be on a filesystem the other nodes see)
    model.load_state_dict(distributed.on_main(lambda: load_run_model(run)[0].state_dict()))
    outputs = {name: predict_loader(model, _eval_loader(bundle.splits[name], recipe, workers), device)
               for name in ("val", "test") if name in bundle.splits}

    def write_results() -> None:
        threshold = result.threshold
        full = {name: evaluate_split(output, threshold, recipe.seed) for name, output in outputs.items()}
        splits = {name: _report_metrics(metrics) for name, metrics in full.items()}
        write_json(run / MODEL_JSON, {**info, "best_epoch": result.best_epoch, "threshold": threshold,
                                      "select_metric": recipe.train.select_metric})
        report = {"recipe": recipe.name, "seed": recipe.seed, "classes": list(classes), "splits": splits,
                  "train": {"epochs": result.epochs_run, "best_epoch": result.best_epoch,
                            "seconds": round(result.seconds, 2),
                            "images_per_second": round(result.images_per_second, 2), "base_lr": base_lr,
                            "world_size": distributed.world_size(), "tricks": recipe.tricks.enabled()}}
        _plots(run, rows, outputs, full, classes, threshold)
        write_json(run / REPORT_FILE, report)  # last: a run with report.json is complete
        (run / RESUME_FILE).unlink(missing_ok=True)

    distributed.on_main(write_results)
    return run


def _synthesize_if_missing(recipe: Recipe, source: Path) -> None:
    if not source.exists() and recipe.data.synth_if_missing:
        logger.info("%s does not exist: writing synthetic phantoms there (data.synth_if_missing)", source)
        synthesize(source, seed=recipe.seed)


def _open_run(recipe: Recipe, out: str | Path | None, resumed: bool, rows: list[dict]) -> Path:
    """The run directory: a new one with the resolved recipe, or the resumed one with the metrics rows of its
    saved state (rows of an epoch whose state was lost are dropped)."""
    if resumed:
        run = Path(out)
    else:
        run = new_run_dir(recipe.name, out)
        save_recipe(run, recipe.to_dict())
    write_text(run / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
    return run


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
    if not (run / RECIPE_FILE).is_file():
        raise RunError(f"{run}: no recipe.yaml, so this is not a medtricks run that can be resumed; choose a new "
                       f"--out.")
    raw = read_run_recipe(run)
    saved = load_recipe_from_dict(raw)
    if recipe is not None or overrides or seed is not None:
        given = _as_recipe(recipe if recipe is not None else saved, overrides, seed)
        if given.to_dict() != saved.to_dict():
            changed = recipe_differences(given.to_dict(), saved.to_dict())
            raise RunError(f"{run}: the given recipe differs from the run's recipe.yaml in {', '.join(changed)}; "
                           f"resume without --recipe/--set/--seed (the run's own recipe is used), or start a new run.")
    state = load_resume_state(run)
    recorded = _recorded_source(run)
    if recorded is not None:
        if data is not None and str(Path(resolve_source(saved.data, data)).resolve()) != recorded:
            raise RunError(f"{run}: it was trained on {recorded}, not {data}; resume without --data or with the "
                           f"same.")
        data = recorded
    return {"recipe": saved, "data": data, "state": state}


def _recorded_source(run: Path) -> str | None:
    """The data source in the run's model.json, written when the run opens and again with every best epoch (None
    for a run that stopped before its first epoch under a version that did not write it then)."""
    try:
        return json.loads((run / MODEL_JSON).read_text())["data"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _as_recipe(recipe: Recipe | str | Path, overrides: Sequence[str], seed: int | None) -> Recipe:
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, overrides, seed)
    return load_recipe_from_dict(recipe.to_dict(), overrides, seed) if overrides or seed is not None else recipe


def load_recipe_from_dict(raw: dict, overrides: Sequence[str] = (), seed: int | None = None) -> Recipe:
    """A Recipe from plain data (a run's recipe.yaml), with optional overrides."""
    from medtricks.recipe import set_key

    raw = dict(raw)
    for assignment in overrides:
        set_key(raw, assignment)
    if seed is not None:
        raw["seed"] = seed
    return build_dataclass(Recipe, raw)


def _records(bundle, split: str) -> list[dict]:
    dataset = bundle.splits.get(split)
    return [dataset.store.records[i] for i in dataset.indices] if dataset is not None else []


def _teacher(recipe: Recipe, classes: tuple[str, ...], device: torch.device):
    if recipe.tricks.distillation is None:
        return None
    teacher, info = load_run_model(recipe.tricks.distillation.teacher)
    if tuple(info["classes"]) != tuple(classes):
        raise MedtricksError(f"tricks.distillation.teacher {recipe.tricks.distillation.teacher}: its classes "
                             f"{info['classes']} differ from this run's {list(classes)}; use a teacher trained on "
                             f"the same classes.")
    if info["in_chans"] != recipe.data.channels:
        raise MedtricksError(f"tricks.distillation.teacher takes {info['in_chans']}-channel images; data.channels is "
                             f"{recipe.data.channels}.")
    for param in teacher.parameters():
        param.requires_grad_(False)
    return place_model(teacher, device)


def _plots(run: Path, rows: list[dict], outputs: dict[str, EvalOutput], metrics: dict[str, dict], classes,
           threshold) -> None:
    plots.plot_training_curves(rows, run / "plots" / "training_curves.png")
    for name, out in outputs.items():
        if len(set(out.labels.tolist())) < 2:
            continue
        plots.plot_roc(out.labels, out.probs, classes, run / "plots" / f"roc_{name}.png", threshold=threshold)
        plots.plot_confusion(metrics[name]["confusion_matrix"], classes, run / "plots" / f"confusion_{name}.png")
        plots.plot_reliability(out.labels, out.probs, run / "plots" / f"reliability_{name}.png")


def evaluate(run: str | Path, data: str | Path | None = None, split: str = "val",
             json_path: str | Path | None = None) -> dict:
    """Metrics M of a run's model on a split of its own data or on another source (`split="all"`).

    Reads only the run directory and the data: the same source, seed and split fractions reproduce the split,
    and the binary threshold is the one chosen on validation during training. Called on every rank of a process
    group (medtricks.distributed.process_group), each rank predicts a shard and all get the same metrics.
    """
    model, info = load_run_model(run)
    _, raw = read_run(run)
    recipe = load_recipe_from_dict(raw)
    source = data if data is not None else info["data"]["source"]
    dataset, origin = load_eval_data(recipe.data, source, split, recipe.seed, tuple(info["classes"]))
    device = resolve_device(recipe.train.device)
    output = predict_loader(place_model(model, device), _eval_loader(dataset, recipe, _workers(recipe)), device)
    metrics = {**_report_metrics(evaluate_split(output, info.get("threshold"), recipe.seed)),
               "split": split, "data": str(source)}
    if json_path is not None:
        distributed.on_main(lambda: write_json(Path(json_path), metrics))
    return metrics


def predict(run: str | Path, inputs: Sequence[str | Path], out_csv: str | Path | None = None) -> list[dict]:
    """Class probabilities for image files or folders (recursively); rows also written to `out_csv`.

    Unreadable files are listed in the rows with their error instead of a prediction.
    """
    model, info = load_run_model(run)
    transform = create_eval_transform(info["image_size"], info["crop_fraction"])
    classes, threshold = info["classes"], info.get("threshold")
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(image_files(item))
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"{item}: no such file or folder.")
    rows = []
    with torch.inference_mode():
        for path in files:
            try:
                pixels, _ = read_image(path, info["channels"])
            except DataError as exc:
                rows.append({"path": str(path), "prediction": "", "error": str(exc)})
                continue
            probs = model(transform(torch.from_numpy(pixels))[None]).softmax(-1)[0].tolist()
            if len(classes) == 2 and threshold is not None:
                predicted = classes[int(probs[1] >= threshold)]
            else:
                predicted = classes[int(np.argmax(probs))]
            rows.append({"path": str(path), "prediction": predicted,
                         **{f"p_{c}": round(p, 6) for c, p in zip(classes, probs, strict=True)}, "error": ""})
    if out_csv is not None:
        fields = ["path", "prediction", *[f"p_{c}" for c in classes], "error"]
        with open(out_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return rows
