"""The run directory: what finetune writes and what evaluate, predict, attack and distillation read.

```
runs/<recipe>-<YYYYmmdd-HHMMSS>/
  recipe.yaml        resolved recipe (overrides applied)
  model.safetensors  weights of the selected epoch (best validation metric; EMA weights when EMA is on)
  model.json         arch, classes, input size/channels, normalization, threshold, data, medtricks version
  metrics.jsonl      one line per epoch
  report.json        {"recipe", "seed", "classes", "splits": {"val": M, "test": M}, "train": {...}}
  plots/*.png        ROC, confusion matrix, reliability diagram, training curves
```
Every file is written atomically (temporary file in the same folder, then rename): a killed process leaves the
old file or the new one, never half of one. An existing run directory is never overwritten.
"""

from __future__ import annotations

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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
    info = json.loads((run / MODEL_JSON).read_text())
    recipe = yaml.safe_load((run / RECIPE_FILE).read_text())
    return info, recipe


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
