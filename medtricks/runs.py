"""The run directory: what finetune writes and what evaluate, predict, attack and distillation read.

```
runs/<recipe>-<YYYYmmdd-HHMMSS>/
  recipe.yaml        resolved recipe (overrides applied)
  model.safetensors  weights of the selected epoch (best validation metric; EMA weights when EMA is on)
  model.json         arch, classes, input size/channels, normalization, threshold, data, medtricks version
  metrics.jsonl      one line per epoch
  report.json        {"recipe", "seed", "classes", "splits": {"val": M, "test": M}, "train": {...}}
  plots/*.png        ROC, confusion matrix, reliability diagram, training curves
  resume.safetensors while training: the state after the last completed epoch (removed once report.json exists)
```
Every file is written atomically (medtricks.files): a killed process leaves the old file or the new one, never half
of one. An existing run directory is never overwritten, and no other command writes its own files.

A run is *finished* when report.json exists (finetune writes it last). Everything that reads a finished run
(evaluate, predict, attack, compare, ablate, a distillation teacher) opens it with `open_run`, which checks that,
checks the weights against the sha256 model.json records, and puts the model on its device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch.utils.data import DataLoader

from medtricks.calibration import TEMPERATURES
from medtricks.config import parse_yaml
from medtricks.data.dataset import ImageDataset
from medtricks.data.pipeline import eval_loader, load_eval_data, resolve_source
from medtricks.data.sources import MAX_CLASSES, class_name
from medtricks.devices import place_model, resolve_device
from medtricks.errors import DataError, MedtricksError, RecipeError, short
from medtricks.files import (
    MODEL_FILE,
    MODEL_JSON,
    RECIPE_FILE,
    REPORT_FILE,
    RESUME_FILE,
    atomic_write,
    read_text,
    run_owning,
    write_text,
)
from medtricks.models.backbones import MedModel, create_model
from medtricks.models.ensemble import EnsembleModel
from medtricks.recipe import CROP_FRACTIONS, IMAGE_SIZES, Recipe, load_recipe_from_dict
from medtricks.scoring import EvalOutput, predict_loader
from medtricks.tricks.ordinal_decoding import check_cuts
from medtricks.tta import VIEWS, TTAModel

logger = logging.getLogger(__name__)


class RunError(MedtricksError):
    """A run directory is missing, incomplete, or would be overwritten."""


def save_weights(path: Path, model: torch.nn.Module) -> None:
    """Save a model's state dict as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    data = safetensors_bytes(state)  # bytes written by Python: a full disk is an OSError that atomic_write names
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def check_new_run_dir(out: Path) -> None:
    """Refuse, before any work, a run directory `out` that exists or lies inside another run's own files."""
    if out.is_file():
        raise RunError(f"{out}: a file of that name exists; --out names the new run directory. Choose another --out.")
    if out.exists():
        raise RunError(f"{out}: the run directory already exists; medtricks never overwrites a run. Choose another "
                       f"--out (an unfinished fine-tune continues with `medtricks finetune --out RUN --resume`).")
    owner = run_owning(out)
    if owner is not None:
        raise RunError(f"{out}: that is inside the run {owner} ({out.resolve().relative_to(owner)}), whose own "
                       f"folders only its fine-tune writes; choose an --out outside them.")


def new_run_dir(recipe_name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """Create the run directory: `out`, or runs/<recipe>-<timestamp> (with -2, -3, ... when runs of the recipe
    start in the same second). An existing `out`, or one another command creates first, is an error."""
    if out is not None:
        return _make_run_dir(Path(out))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1, 100):
        candidate = Path(root) / f"{recipe_name}-{stamp}{f'-{k}' if k > 1 else ''}"
        if candidate.exists():
            continue
        try:
            return _make_run_dir(candidate)
        except RunError:
            if not candidate.exists():  # not taken by a run started at the same time: a real error
                raise
    raise RunError(f"{root}: 99 runs of {recipe_name} started within the second {stamp}; give --out.")


def _make_run_dir(out: Path) -> Path:
    check_new_run_dir(out)
    try:
        out.mkdir(parents=True)
        (out / "plots").mkdir()
    except FileExistsError as exc:
        raise RunError(f"{out}: another command created this run directory as this one started; medtricks never "
                       f"shares a run. Choose another --out.") from exc
    except OSError as exc:
        raise RunError(f"{out}: cannot create the run directory ({exc}). Check the path and its permissions.") from exc
    return out


def lock_run(run: Path) -> int | None:
    """Lock the run directory for this process's training (released when the returned descriptor is closed, or
    the process ends, even killed): a second finetune or --resume of the same run is refused, where both would
    write its files in turn. None where the platform has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    fd = os.open(run, os.O_RDONLY)  # the folder itself: no lock file is left in the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise RunError(f"{run}: another process is training this run now (a finetune, or a finetune --resume); let "
                       f"it finish, or stop it and resume once.") from exc
    return fd


def save_recipe(run: Path, recipe_dict: dict) -> None:
    write_text(run / RECIPE_FILE, yaml.safe_dump(recipe_dict, sort_keys=False))


def newest_run(root: str | Path = "runs") -> Path:
    """The finished run directory under `root` (report.json present) whose model was written last (for
    `medtricks attack` without RUN_DIR); unfinished runs are never picked."""
    runs = [p for p in Path(root).glob("*/") if (p / REPORT_FILE).is_file() and (p / MODEL_FILE).is_file()] \
        if Path(root).is_dir() else []
    if not runs:
        raise RunError(f"no finished run under {root}/; pass a RUN_DIR or run `medtricks finetune` first.")
    return max(runs, key=lambda p: (p / MODEL_FILE).stat().st_mtime)


def read_run(run: str | Path) -> tuple[dict, dict]:
    """(model.json, recipe.yaml as a dict) of a run directory that has a model; an error names what is missing."""
    run = Path(run)
    for name in (MODEL_JSON, MODEL_FILE, RECIPE_FILE):
        if not (run / name).is_file():
            raise RunError(f"{run}: not a finished medtricks run ({name} is missing). Pass the directory that "
                           f"`medtricks finetune` wrote.")
    try:
        info = json.loads(read_text(run / MODEL_JSON))
        recipe = parse_yaml(read_text(run / RECIPE_FILE), f"{run / RECIPE_FILE}")
    except (OSError, ValueError, RecipeError, RecursionError) as exc:  # RecursionError: [[[[...]]]]
        raise RunError(f"{run}: {MODEL_JSON} or {RECIPE_FILE} is damaged ({str(exc).splitlines()[0]}); the run "
                       f"cannot be read. Train it again.") from exc
    if not isinstance(info, dict) or not isinstance(recipe, dict):
        raise RunError(f"{run}: {MODEL_JSON} or {RECIPE_FILE} does not hold a mapping; the run cannot be read.")
    _check_info(run, info)
    return info, recipe


# model.json keys every reader needs, with their types (finetune writes more: see its `info`)
INFO_KEYS = {"arch": str, "num_classes": int, "in_chans": int, "input_mode": str, "classes": list, "image_size": int,
             "channels": int, "crop_fraction": float, "data": dict}


# an ensemble's model.json lists its members (medtricks.ensemble), each with these keys; at most MAX_MEMBERS, so a
# damaged or hostile file cannot make us build thousands of models
MEMBER_KEYS = {"arch": str, "num_classes": int, "in_chans": int, "input_mode": str}
MAX_MEMBERS = 16


def _check_info(run: Path, info: dict) -> None:
    """model.json holds what a reader needs, with sane types; else a RunError naming the keys."""
    wrong = [key for key, kind in INFO_KEYS.items() if not isinstance(info.get(key), kind)
             or (kind is int and isinstance(info.get(key), bool))]
    if not wrong:
        classes, threshold = info["classes"], info.get("threshold")
        if len(classes) != info["num_classes"] or not all(isinstance(c, str) and c for c in classes) \
                or len(set(classes)) < len(classes) or len(classes) > MAX_CLASSES:  # the head is built before loading
            wrong.append("classes")
        if not IMAGE_SIZES[0] <= info["image_size"] <= IMAGE_SIZES[1]:  # the recipe's: no allocation a run never made
            wrong.append("image_size")
        if not CROP_FRACTIONS[0] <= info["crop_fraction"] <= CROP_FRACTIONS[1]:  # also NaN
            wrong.append("crop_fraction")
        if info["channels"] not in (1, 3) or info["channels"] != info["in_chans"]:
            wrong.append("channels")
        if not isinstance(info["data"].get("source"), str):
            wrong.append("data.source")
        digest = info["data"].get("split_digest")  # absent in runs of versions before it was recorded
        if digest is not None and not (isinstance(digest, dict) and all(
                isinstance(d, dict) and isinstance(d.get("sha256"), str) and isinstance(d.get("n"), int)
                for d in digest.values())):
            wrong.append("data.split_digest")
        if threshold is not None and not (isinstance(threshold, float | int) and 0 <= threshold <= 1):
            wrong.append("threshold")
        cuts = info.get("grade_cuts")
        if cuts is not None:
            try:
                check_cuts(cuts, len(classes))
            except (TypeError, ValueError):
                wrong.append("grade_cuts")
        if info.get("task", "single") not in ("single", "multilabel"):
            wrong.append("task")
        if info.get("task") == "multilabel":
            thresholds = info.get("thresholds")
            if thresholds is not None and not (isinstance(thresholds, dict) and set(thresholds) == set(classes) and all(
                    isinstance(t, float | int) and not isinstance(t, bool) and 0 <= t <= 1
                    for t in thresholds.values())):
                wrong.append("thresholds")
            if not isinstance(info.get("label_separator"), str) or not info["label_separator"]:
                wrong.append("label_separator")
        members = info.get("members")
        if members is not None and not (isinstance(members, list) and 2 <= len(members) <= MAX_MEMBERS and all(
                isinstance(m, dict) and all(isinstance(m.get(k), kind) and not isinstance(m.get(k), bool)
                                            for k, kind in MEMBER_KEYS.items()) and m["num_classes"] == len(classes)
                and m["in_chans"] == info["in_chans"] for m in members)):
            wrong.append("members")
    if wrong:
        raise RunError(f"{run}: {MODEL_JSON} is incomplete or damaged (keys {', '.join(wrong)} are missing or "
                       f"wrong); the run cannot be rebuilt. Train it again.")


def load_run_model(run: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a run's model (architecture from model.json, no pretrained download) and load its weights strictly;
    no check that the run is finished (finetune reads its best epoch back with it): use `open_run` otherwise.

    Returns:
        (model in eval mode on the CPU, model.json as a dict).
    """
    info, _ = read_run(run)
    return _rebuild(Path(run), info, _read_weights(Path(run))), info


def _read_weights(run: Path) -> bytes:
    try:
        return (run / MODEL_FILE).read_bytes()
    except OSError as exc:
        raise RunError(f"{run}: {MODEL_FILE} cannot be read ({exc.strerror or exc}).") from exc


def _member(run: Path, description: dict) -> MedModel:
    """An untrained model as `description` (model.json, or one of an ensemble's members) gives it."""
    try:
        return create_model(description["arch"], description["num_classes"], description["in_chans"],
                            weights="none", input_mode=description["input_mode"])  # normalization: in the state
    except MedtricksError as exc:
        raise RunError(f"{run}: {MODEL_JSON} describes a model that cannot be built ({exc}).") from exc


def _as_scored(run: Path, model: MedModel, description: dict, multilabel: bool) -> torch.nn.Module:
    """`model` as the run scores it: with its calibration temperature, and averaged over its test-time views when
    it was trained with train.tta (the temperature then divides the averaged logits, where it was fitted)."""
    temperature = description.get("temperature", 1.0)  # a calibrated run's (train.calibrate)
    low, high = TEMPERATURES
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not low <= temperature <= high:
        raise RunError(f"{run}: {MODEL_JSON} has temperature {short(temperature)}; a fitted calibration temperature "
                       f"lies in [{low:g}, {high:g}]. The file was edited or damaged: train the run again.")
    views = description.get("tta")
    if views is None:
        model.temperature = float(temperature)
        return model
    if not isinstance(views, list) or not views or not all(isinstance(v, str) and v in VIEWS for v in views):
        raise RunError(f"{run}: {MODEL_JSON} has tta {short(views)}; test-time views are a list of "
                       f"{', '.join(VIEWS)}. The file was edited or damaged: train the run again.")
    scored = TTAModel(model, tuple(views), multilabel)
    scored.temperature = float(temperature)
    return scored


def _rebuild(run: Path, info: dict, weights: bytes) -> torch.nn.Module:
    """The model model.json describes (no pretrained download; an EnsembleModel when it lists `members`) with
    `weights` (model.safetensors' bytes, the bare networks' state) loaded strictly, then calibration temperatures
    and test-time views applied (_as_scored), in eval mode on the CPU."""
    members = info.get("members")
    multilabel = info.get("task") == "multilabel"
    model = EnsembleModel([_member(run, m) for m in members], multilabel=multilabel) if members \
        else _member(run, info)
    try:
        state = load_safetensors(weights)
    except SafetensorError as exc:
        raise RunError(f"{run}: {MODEL_FILE} is unreadable ({exc}); the run cannot be used. Train it again.") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{run}: {MODEL_FILE} does not fit {info['arch']} ({str(exc).splitlines()[0]}).") from exc
    if members:
        model.members = torch.nn.ModuleList([_as_scored(run, m, d, multilabel)
                                             for m, d in zip(model.members, members, strict=True)])
        return model.eval()
    return _as_scored(run, model, info, multilabel).eval()


def _as_folder(source: Path) -> Path:
    """A source path as one spelling: resolved, and a folder's labels.csv given as a file is the folder."""
    source = source.resolve()
    return source.parent if source.name == "labels.csv" and source.is_file() else source


@dataclass
class Run:
    """A finished run opened for reading (`open_run`): its model in eval mode on `device`, model.json (`info`) and
    the resolved recipe; `dataset`, `loader` and `predict` score data as finetune's report did."""

    path: Path
    model: torch.nn.Module  # a MedModel, or an EnsembleModel of them
    info: dict
    recipe: Recipe
    device: torch.device

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.info["classes"])

    @property
    def multilabel(self) -> bool:
        """A multi-label run (data.task: multilabel): one sigmoid per finding."""
        return self.info.get("task") == "multilabel"

    @property
    def threshold(self) -> float | list[float] | None:
        """The binary operating threshold chosen on validation (None: multi-class, or no validation split);
        multi-label: one per finding, in class order (model.json's `thresholds`); multi-class with
        tricks.ordinal_decoding: the grade cuts (model.json's `grade_cuts`)."""
        if self.multilabel:
            thresholds = self.info.get("thresholds")
            return None if thresholds is None else [float(thresholds[c]) for c in self.classes]
        if self.info.get("grade_cuts") is not None:
            return [float(c) for c in self.info["grade_cuts"]]
        return self.info.get("threshold")

    @property
    def source(self) -> str:
        """The data source the run was trained on."""
        return self.info["data"]["source"]

    def dataset(self, data: str | Path | None = None, split: str = "val", limit: int | None = None) -> ImageDataset:
        """A split of the run's own data (the same seeded split as training), or of `data` (`split="all"` for an
        external set), with the eval transform and the run's classes; only its first `limit` images if given."""
        if limit is not None and limit < 1:
            raise RunError(f"--limit {limit}: must be >= 1.")
        own = self._is_own_data(data)
        if split == "all" and own:
            logger.warning("--split all on the run's own data %s: it includes the images the model was trained on and "
                           "those that chose its epoch and threshold, so the metrics are optimistic; score an external "
                           "set with --data DIR --split all, or use --split test.", self.source)
        dataset, _ = load_eval_data(self.recipe.data, data if data is not None else self.source, split,
                                    self.recipe.seed, self.classes, recorded=self.info["data"].get("split_digest"),
                                    own=own)
        if limit is not None:
            dataset.indices = dataset.indices[:limit]
        return dataset

    def _is_own_data(self, data: str | Path | None) -> bool:
        """Whether `data` (None: the run's own) is the source the run was trained on."""
        if data is None:
            return True
        try:
            given, own = (_as_folder(resolve_source(self.recipe.data, d)) for d in (data, self.source))
        except DataError:  # the training source is gone (moved, not fetched): `data` is another
            return False
        return given == own

    def open_same_task(self, path: str | Path, option: str) -> Run:
        """Another finished run on this run's device that must solve the same task (the same classes and input
        channels), e.g. a transfer attack's surrogate or a comparison's baseline; `option` names it in errors."""
        other = open_run(path, self.device)
        if other.classes != self.classes or other.info["in_chans"] != self.info["in_chans"]:
            raise RunError(f"{option} {path}: its classes {list(other.classes)} / channels {other.info['in_chans']} "
                           f"differ from {list(self.classes)} / {self.info['in_chans']} of {self.path}; use a run of "
                           f"the same task.")
        return other

    def loader(self, dataset: ImageDataset) -> DataLoader:
        """The evaluation loader (this rank's shard under torchrun) with the recipe's batch size and workers."""
        return eval_loader(dataset, self.recipe.data, self.recipe.train.eval_batch_size)

    def predict(self, dataset: ImageDataset) -> EvalOutput:
        """Probabilities and loss of every image of `dataset`, in dataset order."""
        return finite(predict_loader(self.model, self.loader(dataset), self.device), self.path)


def finite(output: EvalOutput, run: Path | str) -> EvalOutput:
    """`output`, checked for the non-finite probabilities of a damaged run (NaN weights, a temperature edited towards
    0) or of NaN pixels, which every metric would refuse with a traceback or report as NaN."""
    bad = int((~np.isfinite(output.probs)).any(axis=1).sum()) if output.probs.size else 0
    if bad:
        raise RunError(f"{run}: the model gives non-finite probabilities for {bad} of {len(output.probs)} images: its "
                       f"weights or {MODEL_JSON} (e.g. the temperature) were edited or damaged, or the images hold NaN "
                       f"or infinite pixels. Train the run again, or check the images with `medtricks data check`.")
    return output


def open_run(run: str | Path, device: str | torch.device | None = None) -> Run:
    """Open a finished run: check report.json exists and the weights match model.json's sha256, rebuild the model
    and put it in eval mode on `device` (None: the recipe's train.device; auto = CUDA when available).

    Raises:
        RunError: not a run, an unfinished run (killed during training), or damaged files, naming which.
    """
    run = Path(run)
    info, raw = read_run(run)
    if not (run / REPORT_FILE).is_file():
        why, then = ("the ensemble was never completed", "Run `medtricks ensemble` again") if "members" in info else \
            ("training stopped before the end", f"Continue it with `medtricks finetune --out {run} --resume`")
        raise RunError(f"{run}: the run is not finished ({REPORT_FILE} is missing: {why}). {then}, or pass a finished "
                       f"run.")
    _check_report(run, info)
    recorded = info.get("sha256")
    if not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise RunError(f"{run}: {MODEL_JSON} records no sha256 of {MODEL_FILE} (a finished run always does), so its "
                       f"weights cannot be checked; the file was edited or damaged. Train it again.")
    weights = _read_weights(run)  # read once: hashed, then loaded
    if hashlib.sha256(weights).hexdigest() != recorded:
        raise RunError(f"{run}: {MODEL_FILE} does not match the sha256 in {MODEL_JSON} (the file was changed or "
                       f"damaged after training); the run cannot be trusted. Train it again.")
    try:
        recipe = load_recipe_from_dict(raw)
    except MedtricksError as exc:
        raise RunError(f"{run}: its {RECIPE_FILE} is not a valid recipe ({exc}); the run cannot be used.") from exc
    _check_recipe_matches(run, info, recipe)
    target = resolve_device(device if device is not None else recipe.train.device)
    return Run(run, place_model(_rebuild(run, info, weights), target).eval(), info, recipe, target)


def _check_recipe_matches(run: Path, info: dict, recipe: Recipe) -> None:
    """recipe.yaml prepares the images that evaluate, attack and corrupt score; model.json records how training
    prepared them. A hand-edited recipe.yaml would score the model on other inputs (or fail deep in the model)."""
    pairs = {"data.image_size": (recipe.data.image_size, info["image_size"]),
             "data.channels": (recipe.data.channels, info["channels"]),
             "data.crop_fraction": (recipe.data.crop_fraction, info["crop_fraction"]),
             "data.task": (recipe.data.task, info.get("task", "single"))}
    if recipe.data.classes is not None:  # (the source reads names in Unicode's composed form)
        pairs["data.classes"] = ([class_name(c) for c in recipe.data.classes], info["classes"])
    differ = [f"{key} {short(mine)} against {short(theirs)}" for key, (mine, theirs) in pairs.items()
              if mine != theirs]
    if differ:
        raise RunError(f"{run}: {RECIPE_FILE} and {MODEL_JSON} disagree ({'; '.join(differ)}): the recipe was edited "
                       f"after training, and the model would be scored on inputs it was not trained on. Restore "
                       f"{RECIPE_FILE}, or train again with the new settings.")


def _check_report(run: Path, info: dict) -> None:
    """report.json parses, and names the classes model.json names, in the same order."""
    try:
        report = json.loads(read_text(run / REPORT_FILE))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RunError(f"{run}: {REPORT_FILE} is damaged ({str(exc).splitlines()[0]}); the run cannot be trusted. "
                       f"Train it again.") from exc
    if not isinstance(report, dict) or report.get("classes") != info["classes"]:
        raise RunError(f"{run}: {REPORT_FILE} and {MODEL_JSON} disagree on the classes ("
                       f"{short(report.get('classes') if isinstance(report, dict) else report)} against "
                       f"{short(info['classes'])}); one was edited or damaged, so the run's predictions cannot be "
                       f"named. Train it again.")


def _split_tensors(value, tensors: dict[str, torch.Tensor], path: str):
    """JSON skeleton of nested dicts/lists with tensors moved into `tensors` (dict keys keep their type)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().contiguous().cpu()
        return {"tensor": path}
    if isinstance(value, dict):
        return {"dict": [[k, _split_tensors(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_split_tensors(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    return {"value": value}


def _join_tensors(node, tensors: dict[str, torch.Tensor]):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _join_tensors(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_join_tensors(v, tensors) for v in node["list"]]
    return node["value"]


def save_resume_state(run: Path, state: dict) -> None:
    """Write the training state (nested dicts of tensors and JSON values) as one safetensors file whose metadata
    holds the JSON skeleton: a single atomic rename, so a kill leaves the previous epoch's state or this one."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_split_tensors(state, tensors, "state"))
    data = safetensors_bytes(tensors, metadata={"medtricks": skeleton})
    atomic_write(Path(run) / RESUME_FILE, lambda tmp: tmp.write_bytes(data))


def load_resume_state(run: Path) -> dict | None:
    """The state save_resume_state wrote, or None when the run has none (killed before its first epoch ended)."""
    path = Path(run) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})["medtricks"])
        return _join_tensors(skeleton, load_file(str(path)))
    except Exception as exc:  # a foreign or damaged file: say which and what to do
        raise RunError(f"{path}: unreadable resume state ({exc}). Start a new run with another --out.") from exc
