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
Every file is written atomically (temporary file in the same folder, then rename): a killed process leaves the
old file or the new one, never half of one. An existing run directory is never overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from datetime import datetime
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from medtricks.errors import MedtricksError

MODEL_FILE, MODEL_JSON, RECIPE_FILE, METRICS_FILE, REPORT_FILE = (
    "model.safetensors", "model.json", "recipe.yaml", "metrics.jsonl", "report.json")


class RunError(MedtricksError):
    """A run directory is missing, incomplete, or would be overwritten."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RunError(f"{path}: the disk is full (or over quota) while writing it; the previous version of the "
                           f"file, if any, is kept. Free some space, then continue with --resume.") from exc
        if isinstance(exc, PermissionError):
            raise RunError(f"{path}: no permission to write it ({exc.strerror}). Choose a writable --out.") from exc
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data) -> None:
    """Write JSON atomically (indented, newline-terminated)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def append_jsonl(path: Path, row: dict) -> None:
    """Append one JSON line (rewritten atomically so a crash never leaves a half line)."""
    old = path.read_text() if path.is_file() else ""
    write_text(path, old + json.dumps(row) + "\n")


def save_weights(path: Path, model: torch.nn.Module) -> None:
    """Save a model's state dict as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic(path, lambda tmp: save_file(state, str(tmp)))


def new_run_dir(recipe_name: str, out: str | Path | None = None, root: str | Path = "runs") -> Path:
    """Create the run directory: `out`, or runs/<recipe>-<timestamp>. An existing directory is an error."""
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(root) / f"{recipe_name}-{stamp}"
    out = Path(out)
    if out.exists():
        raise RunError(f"{out}: the run directory already exists; medtricks never overwrites a run. Choose another "
                       f"--out, or resume it with --resume.")
    try:
        out.mkdir(parents=True)
        (out / "plots").mkdir()
    except OSError as exc:
        raise RunError(f"{out}: cannot create the run directory ({exc}). Check the path and its permissions.") from exc
    return out


def save_recipe(run: Path, recipe_dict: dict) -> None:
    write_text(run / RECIPE_FILE, yaml.safe_dump(recipe_dict, sort_keys=False))


def newest_run(root: str | Path = "runs") -> Path:
    """The most recently modified run directory under `root` that has a model (for `medtricks attack`)."""
    runs = [p for p in Path(root).glob("*/") if (p / MODEL_FILE).is_file()] if Path(root).is_dir() else []
    if not runs:
        raise RunError(f"no finished run under {root}/; pass a RUN_DIR or run `medtricks finetune` first.")
    return max(runs, key=lambda p: (p / MODEL_FILE).stat().st_mtime)


def read_run(run: str | Path) -> tuple[dict, dict]:
    """(model.json, recipe.yaml as a dict) of a run; an error names what is missing."""
    run = Path(run)
    for name in (MODEL_JSON, MODEL_FILE, RECIPE_FILE):
        if not (run / name).is_file():
            raise RunError(f"{run}: not a finished medtricks run ({name} is missing). Pass the directory that "
                           f"`medtricks finetune` wrote.")
    return json.loads((run / MODEL_JSON).read_text()), read_run_recipe(run)


def read_run_recipe(run: str | Path) -> dict:
    """A run's resolved recipe.yaml as plain data."""
    return yaml.safe_load((Path(run) / RECIPE_FILE).read_text())


def load_run_model(run: str | Path):
    """Rebuild a run's model (architecture from model.json, no pretrained download), load its weights strictly.

    Returns:
        (model in eval mode, model.json as a dict).
    """
    from medtricks.models.backbones import create_model

    info, _ = read_run(run)
    model = create_model(info["arch"], info["num_classes"], info["in_chans"], weights="none",
                         input_mode=info["input_mode"])  # normalization buffers come with the state dict
    state = load_file(str(Path(run) / MODEL_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{run}: {MODEL_FILE} does not fit {info['arch']} ({str(exc).splitlines()[0]}).") from exc
    return model.eval(), info


RESUME_FILE = "resume.safetensors"


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
    _atomic(Path(run) / RESUME_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"medtricks": skeleton}))


def load_resume_state(run: Path) -> dict | None:
    """The state save_resume_state wrote, or None when the run has none (killed before its first epoch ended)."""
    path = Path(run) / RESUME_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})["medtricks"])
        return _join_tensors(skeleton, load_file(str(path)))
    except Exception as exc:  # a foreign or damaged file: say which and what to do
        raise RunError(f"{path}: unreadable resume state ({exc}). Start a new run with another --out.") from exc
