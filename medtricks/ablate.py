"""Multi-seed ablations of the bag of tricks, reported with paired statistics (`medtricks ablate`).

Design:
- A grid of runs, variants x seeds. The reference and every variant train with the same seeds 0..N-1, and the
  patient-level split is seeded by the run seed, so seed k of every variant trains and validates on the same
  patients: each seed gives one paired difference (variant - reference), and the effect is their mean with a 95% t
  interval and a verdict (medtricks.stats.paired_difference). Effects under 1% need several seeds to be believed;
  with one seed there is no interval and the verdict is always "no detectable effect".
- Modes (the `--set` overrides apply to the reference and to every variant alike):
  `leave-one-out`: reference = the recipe; "without-X" = the recipe with tricks.X off (default: every trick the
  recipe enables). `add-one`: reference = the recipe with the listed tricks off; "with-X" = reference + X (the
  recipe's own settings of X, else X's defaults). `each`: reference = the recipe with every trick off; "only-X" =
  that plus X alone.
- Metrics of the validation split (the test split stays untouched for the final model): AUROC and balanced accuracy
  from each run's report.json; with `attack=True` also robust accuracy under the recipe's `attack:` settings at
  their largest eps (`--set attack.eps=[0.0078]` chooses it; `--set attack.method=autoattack` the ensemble), saved
  beside the run as robust.json; with `corruptions=True` also the mean accuracy over the corruptions of the
  recipe's preset (attack.corruptions, else the modality's) and severities, saved as corruption.json.
  Multi-label recipes: every metric is the mean over findings of report.json's top level (and `task: multilabel`
  joins ablation.json); the pooled cross-validation tests exact matches (medtricks.crossval).
- Resuming: OUT/runs/<variant>/seed-<k>/ is an ordinary run directory. Calling again with the same OUT reuses every
  finished run (report.json present) once its recipe.yaml is checked to be the recipe that would run now (else an
  error: use another OUT). An unfinished run (killed during training) is continued with finetune's `resume` where
  that exists, else moved aside to `<dir>.incomplete-<n>` and trained again. Nothing is deleted or overwritten.
- Outputs: OUT/ablation.json (settings, equivalent command, per-seed values, statistics), OUT/ablation.md (the
  table) and OUT/forest.png (effect and interval per variant).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import re
import shlex
from collections.abc import Callable, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from medtricks import __version__, plots
from medtricks.corruption_report import corruption_names, evaluate_run
from medtricks.crossval import fold_record, pooled_comparison
from medtricks.data.pipeline import resolve_source
from medtricks.data.sources import LabelFormat, load_source
from medtricks.data.splits import changed_splits, split_digest, split_source
from medtricks.errors import MedtricksError, RecipeError, short
from medtricks.files import (
    METRICS_FILE,
    MODEL_FILE,
    MODEL_JSON,
    RECIPE_FILE,
    REPORT_FILE,
    RESUME_FILE,
    DamagedFileError,
    read_json,
    refuse_run_files,
    write_json,
    write_text,
)
from medtricks.finetune import finetune
from medtricks.recipe import (
    Recipe,
    build_dataclass,
    load_recipe,
    load_recipe_from_dict,
    recipe_differences,
    resolve_recipe,
)
from medtricks.robustness import decision_model, refuse_targeted_multilabel, run_attack
from medtricks.runs import RunError, open_run, save_recipe
from medtricks.stats import detectable_difference, paired_difference
from medtricks.tricks import TRICKS

logger = logging.getLogger(__name__)
MODES = {"leave-one-out": "without", "add-one": "with", "each": "only"}  # mode -> prefix of the variant names
REFERENCE = "reference"
METRICS = {"auroc": "AUROC", "balanced_accuracy": "bal. acc.", "robust_accuracy": "robust acc.",
           "corruption_accuracy": "corr. acc."}
ROBUST_FILE, CORRUPTION_FILE = "robust.json", "corruption.json"
ATTACK_KEYS = ("attack", "norm", "eps", "steps", "restarts", "targeted")  # robust.json keys that describe the attack


class AblationError(MedtricksError):
    """Bad ablation settings, or an output folder made by a different ablation."""


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def split_assignments(text: str) -> list[str]:
    """'a.b=1,c=[1, 2],d={x: 1}' -> ['a.b=1', 'c=[1, 2]', 'd={x: 1}']: commas inside brackets, braces or quotes
    belong to a value (a hand-written splitter: the values are YAML flow text, which no parser splits at the top)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'NAME:key=value[,key=value...]' -> (NAME, ['key=value', ...]), e.g. 'frozen-stem:model.freeze=[stem]'."""
    name, colon, body = spec.partition(":")
    name = name.strip()
    assignments = split_assignments(body) if colon else []
    if not VARIANT_NAME.fullmatch(name) or name == REFERENCE or not assignments or not all(
            "=" in a and a.split("=", 1)[0].strip() for a in assignments):
        raise AblationError(f"--variant {short(spec)}: write NAME:key=value[,key=value...] with NAME of letters, "
                            f"digits, '.', '_' or '-' (not {REFERENCE!r}), e.g. "
                            f"--variant 64px:data.image_size=64 or --variant one-gamma:'model.bn_reset=[...]'.")
    return name, assignments


def variants(recipe: Recipe, tricks: Sequence[str] | None = None, mode: str = "leave-one-out",
             custom: Sequence[str] = ()) -> dict[str, Recipe]:
    """The reference and one variant per trick and per `custom` spec as recipes (seeds not yet set), reference
    first.

    Args:
        recipe: the resolved recipe (overrides applied).
        tricks: trick names (medtricks.tricks.TRICKS); None = the tricks the recipe enables, or none when `custom`
            variants are given.
        mode: leave-one-out, add-one or each (see the module docstring).
        custom: 'NAME:key=value[,key=value...]' specs (parse_variant): the reference with exactly those keys set.
    """
    if mode not in MODES:
        raise AblationError(f"--mode {short(mode)}: choose one of {', '.join(MODES)}.")
    enabled = recipe.tricks.enabled()
    names = list(dict.fromkeys(tricks)) if tricks is not None else [] if custom else enabled
    unknown = [name for name in names if name not in TRICKS]
    if unknown:
        raise AblationError(f"--tricks: unknown trick {', '.join(map(repr, unknown))}; valid names: "
                            f"{', '.join(TRICKS)}.")
    if not names and not custom:
        raise AblationError(f"recipe {short(recipe.name)} enables no tricks and --tricks names none: nothing to "
                            f"ablate. Name some with --tricks (valid: {', '.join(TRICKS)}) or give a --variant.")
    if mode == "leave-one-out" and (off := [name for name in names if name not in enabled]):
        raise AblationError(f"--mode leave-one-out: recipe {short(recipe.name)} does not enable {', '.join(off)} (it "
                            f"enables {', '.join(enabled) or 'no tricks'}); use --mode add-one to measure adding it.")
    raw = recipe.to_dict()
    own = raw["tricks"]
    turned_off = {"leave-one-out": [], "add-one": names, "each": list(TRICKS)}[mode]
    reference = {**own, **dict.fromkeys(turned_off)}
    grid = {REFERENCE: reference}
    for name in names:
        change = None if mode == "leave-one-out" else own[name] if own[name] is not None else {}
        grid[f"{MODES[mode]}-{name}"] = {**reference, name: change}
    recipes = {variant: build_dataclass(Recipe, {**raw, "tricks": tricks_}) for variant, tricks_ in grid.items()}
    for spec in custom:
        name, assignments = parse_variant(spec)
        if name in recipes:
            raise AblationError(f"--variant {short(spec)}: the name {name!r} is taken; give each variant its own name.")
        try:
            recipes[name] = load_recipe_from_dict(recipes[REFERENCE].to_dict(), assignments)
        except RecipeError as exc:  # which of several variants set it
            raise RecipeError(f"--variant {short(spec)}: {exc}") from exc
        if not recipe_differences(recipes[REFERENCE].to_dict(), recipes[name].to_dict()):
            raise AblationError(f"--variant {short(spec)}: sets nothing the reference does not already have; the "
                                f"variant would be the reference.")
    return recipes


def _check_same_recipe(run: Path, recipe: Recipe) -> bool:
    """True when `run` has a recipe.yaml, after checking it is `recipe`'s (else AblationError naming the keys)."""
    if not (run / RECIPE_FILE).is_file():
        return False
    saved = load_recipe(run / RECIPE_FILE).to_dict()  # keys added since the run was made: their defaults
    keys = recipe_differences(saved, recipe.to_dict())
    if keys:
        more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
        raise AblationError(f"{run}: made with a different recipe (it differs at {', '.join(keys[:4])}{more}), so it "
                            f"cannot be reused in this ablation. Use another --out, or repeat the original "
                            f"--recipe, --data and --set options.")
    return True


def _set_aside(run: Path) -> Path:
    n = 1
    while (aside := run.with_name(f"{run.name}.incomplete-{n}")).exists():
        n += 1
    run.rename(aside)
    logger.warning("%s was not finished and cannot be resumed: moved aside to %s; training it again", run, aside)
    return aside


def _train(recipe: Recipe, run: Path, on_epoch: Callable[[dict], None]) -> str:
    """Train the run, continuing or setting aside an unfinished directory; return "trained" or "resumed"."""
    if run.exists() and _check_same_recipe(run, recipe):
        try:
            finetune(recipe, out=run, on_epoch=on_epoch, resume=True)
            return "resumed"
        except RunError as exc:  # finetune refuses to resume it: keep it aside and train afresh
            logger.warning("%s cannot be resumed (%s)", run, exc)
    if run.exists():
        _set_aside(run)
    finetune(recipe, out=run, on_epoch=on_epoch)
    return "trained"


def _check_reused_split(run: Path, recipe: Recipe, sources: dict) -> None:
    """A reused unit was trained on the split its recipe makes of the data now; else the data changed between two
    ablate calls (rows added or relabelled) and the table would mix units of two data sets. `sources` caches the
    loaded sources."""
    recorded = read_json(run / MODEL_JSON, _REDO).get("data")
    digest = recorded.get("split_digest") if isinstance(recorded, dict) else None
    if digest is None:  # a unit of a version before the record
        return
    labels = LabelFormat.of(recipe.data)
    key = (recipe.data.source, recipe.data.classes, labels)
    if key not in sources:
        sources[key] = load_source(resolve_source(recipe.data, None), recipe.data.classes, labels)
    splits_logger = logging.getLogger("medtricks.data.splits")
    level = splits_logger.level
    splits_logger.setLevel(logging.ERROR)  # its no-patient-ids warning was given when the unit was trained
    try:
        indices, _ = split_source(sources[key], recipe.data.split, recipe.seed)
    finally:
        splits_logger.setLevel(level)
    changed = changed_splits(digest, split_digest(sources[key], indices))
    if changed:
        raise AblationError(f"{run}: the data {sources[key].root} changed since this unit was trained (rows added, "
                            f"removed or relabelled): {changed[0]}, so the ablation would mix units of two data sets. "
                            f"Restore the data as it was, or use a new --out to train every unit on it.")


MAX_SEEDS = 1000  # seeds per variant; each is a training run


def _unit_recipe(recipe: Recipe, seed: int, fold: int | None, folds: int) -> Recipe:
    """A variant's recipe for one seed (and cross-validation fold)."""
    extra = [f"data.split.folds={folds}", f"data.split.fold={fold}"] if fold is not None else []
    return load_recipe_from_dict(recipe.to_dict(), extra, seed=seed)


def _unit_dir(out: Path, variant: str, seed: int, fold: int | None) -> Path:
    run = out / "runs" / variant / f"seed-{seed}"
    return run / f"fold-{fold}" if fold is not None else run


_REDO = "delete that unit's folder and run the same ablate command again to train it anew."


def _metric(path: Path, scored, key: str) -> float | None:
    """scored[key]: a metric in [0, 1], or None where it is undefined (one class present)."""
    value = scored.get(key, "missing") if isinstance(scored, dict) else "missing"
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
        return value
    raise DamagedFileError(f"{path} is damaged ({key} {short(value)} is no number in [0, 1]); {_REDO}")


def _cached(path: Path, key: str) -> dict:
    """A unit's cached robust.json / corruption.json, its `key` checked."""
    result = read_json(path, _REDO)
    _metric(path, result, key)
    return result


def _robust_accuracy(run: Path, recipe: Recipe, split: str = "val") -> dict:
    """Robust accuracy on a split (val; cross-validation: the held-out fold) under the recipe's attack at its largest
    eps (cached: robust.json)."""
    if (run / ROBUST_FILE).is_file():
        return _cached(run / ROBUST_FILE, "accuracy")
    settings = dataclasses.replace(recipe.attack, eps=(max(recipe.attack.eps),))
    opened = open_run(run, "auto")
    report = run_attack(decision_model(opened), opened.loader(opened.dataset(split=split)), settings, opened.classes,
                        device=opened.device)
    result = {"split": split, "attack": settings.method, "norm": settings.norm, "eps": settings.eps[0],
              "steps": report["steps"], "restarts": report["restarts"], "targeted": settings.targeted,
              "n": report["n"], "clean_accuracy": report["clean"]["accuracy"],
              "accuracy": report["results"][0]["accuracy"]}
    write_json(run / ROBUST_FILE, result)
    return result


def _corruption_accuracy(run: Path, recipe: Recipe, split: str = "val") -> dict:
    """Mean accuracy over the recipe's corruptions and severities on a split (val; cross-validation: the held-out
    fold) (cached: corruption.json)."""
    if (run / CORRUPTION_FILE).is_file():
        return _cached(run / CORRUPTION_FILE, "accuracy")
    opened = open_run(run, "auto")
    preset, names = corruption_names(opened, None, None)
    report = evaluate_run(opened, opened.dataset(None, split), names, recipe.attack.severities, 0)
    result = {"split": split, "preset": preset, "severities": list(recipe.attack.severities), "n": report["n"],
              "clean_accuracy": report["clean"]["accuracy"], "mce": report["mce"],
              "accuracy": float(np.mean([row["accuracy"] for row in report["results"]]))}
    write_json(run / CORRUPTION_FILE, result)
    return result


def _summary(values: list) -> dict:
    present = [v for v in values if v is not None]
    return {"mean": float(np.mean(present)) if present else None,
            "sd": float(np.std(present, ddof=1)) if len(present) >= 2 else None, "n": len(present)}


def _versus(values: list, reference: list) -> dict:
    pairs = [(v, r) for v, r in zip(values, reference, strict=True) if v is not None and r is not None]
    stats = paired_difference([v for v, _ in pairs], [r for _, r in pairs])
    differences = [v - r for v, r in pairs]
    sd = float(np.std(differences, ddof=1)) if len(differences) >= 2 else None
    return {**stats, "sd": sd, "detectable": detectable_difference(sd, len(differences)),
            "per_seed": [None if v is None or r is None else v - r for v, r in zip(values, reference, strict=True)]}


def _power(variants_: dict, metrics: Sequence[str]) -> dict:
    """Per metric, the design's smallest detectable difference (80% power, two-sided 5%): from the sd of the paired
    differences pooled over the variants (root mean variance) and the number of pairs."""
    power = {}
    for m in metrics:
        rows = [entry["vs_reference"][m] for entry in variants_.values() if entry["vs_reference"] is not None]
        sds = [row["sd"] for row in rows if row["sd"] is not None]
        n = min((row["n"] for row in rows), default=0)
        pooled = float(np.sqrt(np.mean(np.square(sds)))) if sds else None
        power[m] = {"sd": pooled, "n": n, "detectable": detectable_difference(pooled, n), "power": 0.8,
                    "alpha": 0.05}
    return power


def _versions() -> dict[str, str]:
    """Python and the packages that decide an ablation's numbers, for ablation.json (read from package metadata)."""
    found = {"python": platform.python_version(), "medtricks": __version__, "torch": torch.__version__}  # +cu130, +cpu
    for package in ("torchvision", "timm", "numpy", "scikit-learn", "scipy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _command(recipe, data, out, seeds, names, mode, attack, corruptions, overrides, custom=(), folds=0) -> str:
    args = ["medtricks", "ablate", "--recipe", str(recipe), *(["--data", str(data)] if data is not None else []),
            "--out", str(out), "--seeds", str(seeds), *(["--folds", str(folds)] if folds else []),
            *(["--tricks", ",".join(names)] if names else []),
            "--mode", mode, *[x for spec in custom for x in ("--variant", spec)],
            *(["--attack"] if attack else []), *(["--corruptions"] if corruptions else []),
            *[x for kv in overrides for x in ("--set", kv)]]
    return shlex.join(args)


def _check_out(out: Path) -> None:
    """Refuse an --out that is a fine-tuning run or lies in one's own files: the ablation's report, plots and runs/
    would mix with (or replace) that run's files."""
    refuse_run_files(out, "--out")
    trained = [name for name in (MODEL_FILE, MODEL_JSON, METRICS_FILE, REPORT_FILE, RESUME_FILE)
               if (out / name).exists()]
    if trained:
        raise AblationError(f"--out {short(str(out))}: that is a fine-tuning run ({', '.join(trained)}), whose own "
                            f"files only `medtricks finetune` writes; choose a new folder (or an earlier ablation's, "
                            f"to resume it).")


def ablate(recipe: Recipe | str | Path, data: str | Path | None = None, out: str | Path | None = None,
           seeds: int = 3, tricks: Sequence[str] | None = None, mode: str = "leave-one-out", attack: bool = False,
           overrides: Sequence[str] = (), on_run: Callable[[dict], None] | None = None,
           corruptions: bool = False, custom: Sequence[str] = (), folds: int = 0) -> dict:
    """Train the reference and one variant per trick over seeds 0..seeds-1, compare them pairwise, write the report.

    Args:
        recipe: a Recipe, a bundled recipe name or a YAML path.
        data: data source for every run (overrides data.source; recorded in each run's recipe).
        out: output folder, default runs/ablate-<recipe>-<timestamp>; an existing one is reused (resumed).
        seeds: number of seeds (>= 2 for an interval; with 1 the verdict is always "no detectable effect").
        tricks: trick names; None = the tricks the recipe enables.
        mode: leave-one-out, add-one or each.
        attack: also measure robust accuracy (the recipe's attack at its largest eps, validation split).
        corruptions: also measure the mean accuracy under the recipe's corruptions (validation split).
        folds: K >= 2 for a K-fold cross-validated ablation (medtricks.crossval): every run trains on K-1 folds of
            the source's non-test patients, selects its epoch and threshold on a validation split of them, and is
            scored once on the held-out fold; metrics are those of the held-out folds, paired per (seed, fold),
            plus pooled metrics with DeLong and McNemar tests. 0 = validation metrics of the recipe's split.
        custom: variants over any recipe keys, 'NAME:key=value[,key=value...]' (`--variant`): the reference with
            exactly those keys changed (with custom variants and no `tricks`, no trick variants).
        overrides: `key=value` strings as for `--set`, applied to the reference and every variant.
        on_run: called with {"variant", "seed", "run", "done", "total", "status"}; status is training, resuming,
            epoch (with "row", a metrics.jsonl line), attacking, corrupting, trained, resumed or reused (the last
            three with "values", the run's metrics).

    Returns:
        The content of OUT/ablation.json, plus "files" (where the three outputs are).

    Example:
        >>> result = ablate("demo", seeds=3, tricks=["warmup", "label_smoothing"], out="runs/ablate-demo")
    """
    base = resolve_recipe(recipe, overrides)
    if not 1 <= seeds <= MAX_SEEDS:  # the grid of runs is listed up front: a typo must not fill the memory
        raise AblationError(f"--seeds {seeds}: give 1 to {MAX_SEEDS} seeds (>= 2 for an interval; 3-5 are usual).")
    if attack and base.data.multilabel:
        refuse_targeted_multilabel(base.attack, "--attack: the recipe")
    if data is not None:
        base = load_recipe_from_dict(base.to_dict(), [f"data.source={json.dumps(str(Path(data).resolve()))}"])
    grid = variants(base, tricks, mode, custom)
    custom_names = {parse_variant(spec)[0] for spec in custom}
    names = [name.split("-", 1)[1] for name in list(grid)[1:] if name not in custom_names]
    out = Path(out) if out is not None else Path("runs") / f"ablate-{base.name}-{datetime.now():%Y%m%d-%H%M%S}"
    _check_out(out)
    if folds and not 2 <= folds <= 100:
        raise AblationError(f"--folds {folds}: give 2-100 folds (5 is usual), or leave it out for validation metrics.")
    units = [(seed, fold) for seed in range(seeds) for fold in (range(folds) if folds else [None])]
    plan = [(variant, unit, _unit_recipe(grid[variant], *unit, folds), _unit_dir(out, variant, *unit))
            for unit in units for variant in grid]
    for _, _, run_recipe, run in plan:  # before any training: a foreign run in OUT must stop us at once
        _check_same_recipe(run, run_recipe)
    given = recipe
    if isinstance(recipe, Recipe):  # saved, so that the recorded command can be run again
        given = out / "recipe.yaml"
        save_recipe(out, recipe.to_dict())
    wanted = [m for m in METRICS if (attack or m != "robust_accuracy") and (corruptions or m != "corruption_accuracy")]
    values = {variant: {m: [None] * len(units) for m in wanted} for variant in grid}
    split = "test" if folds else "val"  # cross-validation: the held-out fold, scored once
    robust, corrupted, done, notify, sources = {}, {}, 0, on_run or (lambda _: None), {}
    for variant, unit, run_recipe, run in plan:
        seed, fold = unit
        k = units.index(unit)
        event = {"variant": variant, "seed": seed, **({"fold": fold} if folds else {}), "run": str(run), "done": done,
                 "total": len(plan)}
        if (run / REPORT_FILE).is_file():
            status = "reused"
            _check_reused_split(run, run_recipe, sources)
        else:
            notify({**event, "status": "resuming" if run.exists() else "training"})
            status = _train(run_recipe, run, lambda row, e=event: notify({**e, "status": "epoch", "row": row}))
        splits = read_json(run / REPORT_FILE, _REDO).get("splits")
        scored = splits.get(split) if isinstance(splits, dict) else {}
        if scored is None:
            raise AblationError(f"{run}: the run has no {split} split; an ablation compares {split} metrics. "
                                f"Give the data a {split} split (data.split.{split} > 0).")
        for metric in ("auroc", "balanced_accuracy"):
            values[variant][metric][k] = _metric(run / REPORT_FILE, scored, metric)
        if attack:
            notify({**event, "status": "attacking"})
            robust = _robust_accuracy(run, run_recipe, split)
            values[variant]["robust_accuracy"][k] = robust["accuracy"]
        if corruptions:
            notify({**event, "status": "corrupting"})
            corrupted = _corruption_accuracy(run, run_recipe, split)
            values[variant]["corruption_accuracy"][k] = corrupted["accuracy"]
        done += 1
        notify({**event, "done": done, "status": status,
                "values": {m: v[k] for m, v in values[variant].items()}})
    result = {
        "recipe": base.name, "data": str(data) if data is not None else base.data.source, "mode": mode,
        **({"task": "multilabel"} if base.data.multilabel else {}),
        "tricks": names, "seeds": list(range(seeds)), "folds": folds or None,
        "units": [{"seed": seed, **({"fold": fold} if folds else {})} for seed, fold in units],
        "split": "held-out folds" if folds else "val", "overrides": list(overrides),
        "variant_specs": list(custom),
        "command": _command(given, data, out, seeds, names, mode, attack, corruptions, overrides, custom, folds),
        "attack": {k: robust[k] for k in ATTACK_KEYS if k in robust} or None,
        "corruptions": {k: corrupted[k] for k in ("preset", "severities") if k in corrupted} or None,
        "medtricks_version": __version__, "versions": _versions(),
        "variants": {variant: {
            "runs": [str(run) for v, _, _, run in plan if v == variant],  # in the order of "units"
            "tricks": grid[variant].tricks.enabled(),
            "changes": recipe_differences(grid[REFERENCE].to_dict(), grid[variant].to_dict()),
            "values": values[variant],
            "summary": {m: _summary(v) for m, v in values[variant].items()},
            "vs_reference": None if variant == REFERENCE else {
                m: _versus(v, values[REFERENCE][m]) for m, v in values[variant].items()},
        } for variant in grid},
    }
    result["power"] = _power(result["variants"], list(values[REFERENCE]))
    if folds:
        notify({"status": "pooling", "done": done, "total": len(plan), "variant": "", "seed": "", "run": str(out)})
        result["pooled"] = pooled_comparison({v: result["variants"][v]["runs"] for v in grid}, units, REFERENCE,
                                             base.data.ordinal)
        write_json(out / "folds.json", fold_record(Path(base.data.source), grid[REFERENCE], seeds, folds))
    write_json(out / "ablation.json", result)
    write_text(out / "ablation.md", markdown_table(result))
    if undefined := undefined_units(result):
        logger.warning("%s: undefined (one class in that split), left out of the means and pairs: %s",
                       out / "ablation.md", "; ".join(undefined))
    effects = {f"Δ {'test-fold' if folds else 'val'} {label}": [{"label": variant, **entry["vs_reference"][m]}
                                  for variant, entry in result["variants"].items() if variant != REFERENCE]
               for m, label in METRICS.items() if m in values[REFERENCE]}
    design = f"{seeds} seed(s) x {folds} folds" if folds else f"{seeds} seed(s)"
    plots.plot_forest(effects, out / "forest.png", title=f"{base.name}: {mode}, {design}, paired vs reference")
    return {**result, "files": {name: str(out / name) for name in ("ablation.json", "ablation.md", "forest.png")}}


def undefined_units(result: dict) -> list[str]:
    """'METRIC of VARIANT at seed S[, fold F]' for every value that is None in an ablation result."""
    units = result.get("units") or [{"seed": s} for s in result["seeds"]]
    return [f"{METRICS.get(m, m)} of {variant} at " + ", ".join(f"{k} {v}" for k, v in unit.items())
            for variant, entry in result["variants"].items() for m, values in entry["values"].items()
            for unit, value in zip(units, values, strict=True) if value is None]


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def markdown_table(result: dict) -> str:
    """The ablation as a Markdown table: mean ± sd per variant and the paired difference to the reference."""
    metrics = list(result["variants"][REFERENCE]["values"])
    head = ["variant", *[h for m in metrics for h in (f"{METRICS[m]} mean ± sd", f"Δ {METRICS[m]} [95% CI]",
                                                         "verdict")]]
    if result.get("folds"):
        design = (f"{result['folds']}-fold cross-validation, seeds {', '.join(map(str, result['seeds']))}: every run "
                  f"selected its epoch and threshold on a validation split of its training folds and was scored once "
                  f"on its held-out fold; Δ = variant - reference, mean of the per-(seed, fold) paired differences "
                  f"with a 95% t interval.")
    else:
        design = (f"Validation split; seeds {', '.join(map(str, result['seeds']))}; Δ = variant - reference, mean of "
                  f"the per-seed paired differences with a 95% t interval.")
    lines = [f"# Ablation of {result['recipe']} ({result['mode']})", "", design, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, entry in result["variants"].items():
        cells = [variant]
        for m in metrics:
            cells.append(" ± ".join(_cell(entry["summary"][m][k]) for k in ("mean", "sd")))
            if entry["vs_reference"] is None:
                cells += ["—", "—"]
                continue
            d = entry["vs_reference"][m]
            lo, hi = d["ci95"]
            interval = "" if lo is None else f" [{lo:+.4f}, {hi:+.4f}]"
            cells += [f"{d['difference']:+.4f}{interval}", d["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    if len(result.get("units", result["seeds"])) < 2:
        lines += ["", "One seed: no interval, so every verdict is \"no detectable effect\". Use --seeds 3 or more."]
    undefined = undefined_units(result)
    if undefined:
        lines += ["", "Undefined, so left out of the means and of the pairs (one class in that split): "
                  + "; ".join(undefined) + "."]
    if result.get("pooled"):
        kappa = any("kappa_quadratic" in row for rows in result["pooled"].values() for row in rows)
        lines += ["", "Pooled held-out folds (one score per image and seed; tests against the reference):", "",
                  "| variant | seed | n | pooled AUROC | accuracy | " + ("quadratic kappa | " if kappa else "")
                  + "DeLong Δ AUROC (p) | McNemar Δ accuracy (p) |", "|---|---|---|---|---|" + "---|" * (2 + kappa)]
        for variant, rows in result["pooled"].items():
            for row in rows:
                delong = row.get("delong")
                mcnemar = row.get("mcnemar")
                lines.append("| " + " | ".join([
                    variant, str(row["seed"]), str(row["n"]), _cell(row["auroc"]), f"{row['accuracy']:.4f}",
                    *([_cell(row.get("kappa_quadratic"))] if kappa else []),
                    f"{delong['difference']:+.4f} ({delong['p_value']:.3g})" if delong else "—",
                    f"{mcnemar['accuracy_difference']:+.4f} ({mcnemar['p_value']:.3g})" if mcnemar else "—"]) + " |")
        if result.get("task") == "multilabel":
            lines += ["", "Multi-label: AUROC and accuracy are means over the findings (each at its fold's own "
                          "threshold); McNemar's test and its Δ are those of exact matches (every finding right)."]
    detectable = {m: p["detectable"] for m, p in result.get("power", {}).items() if p["detectable"] is not None}
    if detectable:  # each metric with its own count: a unit whose metric is undefined (one class) has no pair
        lines += ["", "Power: with the paired differences per variant and their observed spread (sd pooled over "
                  "the variants), this design detects differences of at least "
                  + ", ".join(f"±{v:.4f} in {METRICS[m]} ({result['power'][m]['n']} pairs)"
                              for m, v in detectable.items())
                  + " with 80% probability (two-sided 5%); \"no detectable effect\" rules out larger effects, not "
                    "smaller ones."]
    if result.get("attack"):
        a = result["attack"]
        lines += ["", f"Robust accuracy: {a['attack']} {a['norm']}, eps {a['eps']:.4g} ({a['eps'] * 255:.2g}/255), "
                      f"{a['steps']} steps, validation split."]
    if result.get("corruptions"):
        c = result["corruptions"]
        lines += ["", f"Corruption accuracy: mean over the {c['preset']} corruptions at severities "
                      f"{', '.join(map(str, c['severities']))}, validation split."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)
