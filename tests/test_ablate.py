"""medtricks ablate: the variants of each mode, the three outputs and their consistency with the runs, resuming
(finished runs reused, unfinished ones continued or set aside, foreign ones refused) and bad input."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from medtricks.ablate import AblationError, ablate, split_assignments, variants
from medtricks.cli import app
from medtricks.recipe import load_recipe, recipe_differences
from medtricks.stats import paired_difference
from medtricks.tricks import TRICKS

ablate_module = importlib.import_module("medtricks.ablate")  # the module: `medtricks.ablate` is the function
runner = CliRunner()
TINY = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1",
        "attack.eps=[0.0078]", "attack.steps=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grid(phantoms_train, tmp_path_factory):
    """Leave-one-out of warmup over seeds 0 and 1: four tiny runs, and the events they reported."""
    out = tmp_path_factory.mktemp("ablate") / "abl"
    events = []
    result = ablate("demo", data=phantoms_train, out=out, seeds=2, tricks=["warmup"], overrides=TINY,
                    on_run=events.append)
    return out, result, events


@pytest.fixture
def grid_copy(grid, tmp_path):
    """A copy of the grid's output folder that a test may change."""
    out = tmp_path / "abl"
    shutil.copytree(grid[0], out)
    return out


def no_training(*args, **kwargs):
    raise AssertionError("finetune was called: a finished run was trained again")


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/seed-*/model.safetensors"))}


def test_variants_of_each_mode():
    demo = load_recipe("demo")
    enabled = demo.tricks.enabled()
    loo = variants(demo)
    assert list(loo) == ["reference", *[f"without-{t}" for t in enabled]]
    assert loo["reference"] == demo
    assert loo["without-warmup"].tricks.enabled() == [t for t in enabled if t != "warmup"]
    add = variants(demo, ["warmup", "mixup"], mode="add-one")
    assert list(add) == ["reference", "with-warmup", "with-mixup"]
    assert add["reference"].tricks.enabled() == [t for t in enabled if t != "warmup"]
    assert add["with-warmup"].tricks == demo.tricks  # the recipe's own warmup (1 epoch), not the default 5
    assert add["with-mixup"].tricks.mixup == TRICKS["mixup"]()  # not in the recipe: its defaults
    each = variants(demo, ["warmup", "mixup"], mode="each")
    assert each["reference"].tricks.enabled() == []
    assert each["only-warmup"].tricks.enabled() == ["warmup"] and each["only-warmup"].tricks.warmup.epochs == 1
    assert each["only-mixup"].tricks.enabled() == ["mixup"]
    for recipes in (loo, add, each):  # everything but the tricks is the recipe's
        assert all(r.train == demo.train and r.data == demo.data and r.seed == demo.seed for r in recipes.values())


def test_bad_tricks_mode_and_seeds():
    demo = load_recipe("demo")
    with pytest.raises(AblationError, match=r"unknown trick 'warmpu'.*valid names: linear_scaling, warmup"):
        variants(demo, ["warmpu"])
    with pytest.raises(AblationError, match=r"does not enable mixup.*add-one"):
        variants(demo, ["warmup", "mixup"])
    with pytest.raises(AblationError, match="leave-one-out, add-one, each"):
        variants(demo, mode="drop-one")
    with pytest.raises(AblationError, match="enables no tricks"):
        variants(variants(demo, mode="each")["reference"])
    with pytest.raises(AblationError, match="--seeds 0"):
        ablate("demo", seeds=0, out="never-written")
    with pytest.raises(AblationError, match="give 1 to 1000 seeds"):  # listed before any run: a typo filled 23 GB
        ablate("demo", seeds=10**20, out="never-written")
    result = runner.invoke(app, ["ablate", "--recipe", "demo", "--tricks", "warmup,nope", "--out", "never-written"])
    assert result.exit_code == 2 and "unknown trick 'nope'" in result.output and "class_balance" in result.output
    assert "Traceback" not in result.output


def test_outputs_agree_with_the_runs(grid):
    out, result, events = grid
    files = {name: out / name for name in ("ablation.json", "ablation.md", "forest.png")}
    assert result["files"] == {name: str(path) for name, path in files.items()}
    saved = json.loads(files["ablation.json"].read_text())
    assert saved == {k: v for k, v in result.items() if k != "files"}
    assert saved["mode"] == "leave-one-out" and saved["seeds"] == [0, 1] and saved["tricks"] == ["warmup"]
    assert saved["overrides"] == TINY and "--tricks warmup" in saved["command"] and saved["attack"] is None
    assert files["forest.png"].read_bytes()[:8] == PNG_MAGIC
    assert [(e["variant"], e["seed"]) for e in events if e["status"] == "trained"] == [
        ("reference", 0), ("without-warmup", 0), ("reference", 1), ("without-warmup", 1)]
    reference = saved["variants"]["reference"]
    for variant, entry in saved["variants"].items():
        for seed, run in enumerate(entry["runs"]):
            assert run == str(out / "runs" / variant / f"seed-{seed}")
            report = json.loads((out / "runs" / variant / f"seed-{seed}" / "report.json").read_text())
            assert report["seed"] == seed
            for metric in ("auroc", "balanced_accuracy"):
                assert entry["values"][metric][seed] == report["splits"]["val"][metric]
        for metric, values in entry["values"].items():
            assert entry["summary"][metric]["mean"] == pytest.approx(np.mean(values))
            assert entry["summary"][metric]["sd"] == pytest.approx(np.std(values, ddof=1))
    versus = saved["variants"]["without-warmup"]["vs_reference"]
    for metric in ("auroc", "balanced_accuracy"):
        mine, ref = saved["variants"]["without-warmup"]["values"][metric], reference["values"][metric]
        assert versus[metric]["per_seed"] == pytest.approx([a - b for a, b in zip(mine, ref, strict=True)])
        assert {k: versus[metric][k] for k in ("difference", "ci95", "n", "verdict")} == paired_difference(mine, ref)
    table = files["ablation.md"].read_text()
    row = next(line for line in table.splitlines() if line.startswith("| without-warmup |"))
    assert f"{saved['variants']['without-warmup']['summary']['auroc']['mean']:.4f}" in row
    assert versus["auroc"]["verdict"] in row and "| variant | AUROC mean ± sd | Δ AUROC [95% CI] | verdict |" in table


def test_rerun_reuses_finished_runs_and_adds_robust_accuracy(grid, grid_copy, phantoms_train, monkeypatch):
    before = mtimes(grid_copy)
    assert len(before) == 4
    monkeypatch.setattr(ablate_module, "finetune", no_training)
    events = []
    result = ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY,
                    attack=True, on_run=events.append)
    assert {e["status"] for e in events} == {"reused", "attacking"}
    assert mtimes(grid_copy) == before
    assert result["variants"]["reference"]["values"]["auroc"] == grid[1]["variants"]["reference"]["values"]["auroc"]
    assert result["attack"]["eps"] == 0.0078 and result["attack"]["steps"] == 2
    for variant, entry in result["variants"].items():
        for seed in (0, 1):
            robust = json.loads((grid_copy / "runs" / variant / f"seed-{seed}" / "robust.json").read_text())
            assert robust["split"] == "val" and 0 <= robust["accuracy"] <= robust["clean_accuracy"]
            assert entry["values"]["robust_accuracy"][seed] == robust["accuracy"]
    assert "robust acc." in (grid_copy / "ablation.md").read_text()
    robust_files = {p: p.stat().st_mtime_ns for p in grid_copy.glob("runs/*/seed-*/robust.json")}
    again = ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY,
                   attack=True)
    assert {p: p.stat().st_mtime_ns for p in grid_copy.glob("runs/*/seed-*/robust.json")} == robust_files
    assert again["variants"] == result["variants"]


def test_robust_accuracy_under_the_autoattack_ensemble(grid, tmp_path):
    """`--set attack.method=autoattack` makes the ensemble ablate's robust metric (called directly on a copy of one
    finished run: a changed recipe would need another OUT)."""
    run = tmp_path / "run"
    shutil.copytree(grid[0] / "runs" / "reference" / "seed-0", run)
    recipe = load_recipe("demo", overrides=[*TINY, "attack.method=autoattack"])
    robust = ablate_module._robust_accuracy(run, recipe)
    assert robust["attack"] == "autoattack" and robust["steps"] == 2
    assert 0 <= robust["accuracy"] <= robust["clean_accuracy"]
    assert json.loads((run / "robust.json").read_text()) == robust


def test_corruption_accuracy_is_a_metric_too(grid, grid_copy, phantoms_train, monkeypatch):
    monkeypatch.setattr(ablate_module, "finetune", no_training)
    events = []
    result = ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY,
                    corruptions=True, on_run=events.append)
    assert {e["status"] for e in events} == {"reused", "corrupting"}
    assert result["corruptions"] == {"preset": "radiograph", "severities": [1, 2, 3, 4, 5]}
    assert "--corruptions" in result["command"] and "robust_accuracy" not in result["variants"]["reference"]["values"]
    for variant, entry in result["variants"].items():
        for seed in (0, 1):
            saved = json.loads((grid_copy / "runs" / variant / f"seed-{seed}" / "corruption.json").read_text())
            assert saved["split"] == "val" and 0 <= saved["accuracy"] <= 1
            assert entry["values"]["corruption_accuracy"][seed] == saved["accuracy"]
    assert "corr. acc." in (grid_copy / "ablation.md").read_text()
    cached = {p: p.stat().st_mtime_ns for p in grid_copy.glob("runs/*/seed-*/corruption.json")}
    again = ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY,
                   corruptions=True)
    assert {p: p.stat().st_mtime_ns for p in grid_copy.glob("runs/*/seed-*/corruption.json")} == cached
    assert again["variants"] == result["variants"]


def test_one_seed_has_no_interval(grid_copy, phantoms_train, monkeypatch):
    monkeypatch.setattr(ablate_module, "finetune", no_training)  # seed 0 exists already
    result = ablate("demo", data=phantoms_train, out=grid_copy, seeds=1, tricks=["warmup"], overrides=TINY)
    versus = result["variants"]["without-warmup"]["vs_reference"]["auroc"]
    assert versus["ci95"] == [None, None] and versus["verdict"] == "no detectable effect"
    assert result["variants"]["reference"]["summary"]["auroc"]["sd"] is None
    assert "One seed: no interval" in (grid_copy / "ablation.md").read_text()


def test_recipe_mismatch_is_refused_before_any_training(grid, phantoms_train, monkeypatch):
    monkeypatch.setattr(ablate_module, "finetune", no_training)
    with pytest.raises(AblationError, match=r"made with a different recipe \(it differs at train\.lr\).*another"):
        ablate("demo", data=phantoms_train, out=grid[0], seeds=2, tricks=["warmup"], overrides=[*TINY, "train.lr=0.2"])
    result = runner.invoke(app, ["ablate", "--recipe", "demo", "--out", str(grid[0]), "--seeds", "1",
                                 "--tricks", "warmup", "--data", str(phantoms_train)])
    assert result.exit_code == 2 and "different recipe" in result.output


def _unfinish(run, tmp_path):
    """Make `run` look killed during training; return what it held."""
    report = run / "report.json"
    kept = tmp_path / "report.json"
    shutil.move(report, kept)
    (run / "killed-here.txt").write_text("marker")
    return kept


def test_unfinished_run_is_continued_in_place(grid_copy, phantoms_train, tmp_path):
    run = grid_copy / "runs" / "reference" / "seed-1"
    _unfinish(run, tmp_path)
    others = {p: t for p, t in mtimes(grid_copy).items() if p.parent != run}
    events = []
    ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY,
           on_run=events.append)
    assert [(e["variant"], e["seed"], e["status"]) for e in events if e["status"] in ("trained", "resumed")] == [
        ("reference", 1, "resumed")]
    assert (run / "report.json").is_file() and (run / "killed-here.txt").is_file()  # continued, not replaced
    assert not run.with_name("seed-1.incomplete-1").exists()
    assert {p: t for p, t in mtimes(grid_copy).items() if p.parent != run} == others


def test_unresumable_run_is_set_aside_never_overwritten(grid_copy, phantoms_train, tmp_path):
    """finetune refuses to resume a run whose resume state is damaged: ablate moves it aside to the next free
    .incomplete-N name, with every file it held, and trains the run afresh."""
    run = grid_copy / "runs" / "without-warmup" / "seed-0"
    _unfinish(run, tmp_path)
    (run / "resume.safetensors").write_bytes(b"not a safetensors file")
    weights = (run / "model.safetensors").read_bytes()
    run.with_name("seed-0.incomplete-1").mkdir()  # an earlier one: the next number is taken
    events = []
    ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY,
           on_run=events.append)
    assert [(e["variant"], e["seed"], e["status"]) for e in events if e["status"] in ("trained", "resumed")] == [
        ("without-warmup", 0, "trained")]
    aside = run.with_name("seed-0.incomplete-2")
    assert (aside / "killed-here.txt").read_text() == "marker" and not (aside / "report.json").exists()
    assert (aside / "model.safetensors").read_bytes() == weights
    assert (aside / "resume.safetensors").read_bytes() == b"not a safetensors file"
    assert (run / "report.json").is_file() and not (run / "killed-here.txt").exists()


def test_cli_ablate_reuses_and_prints_the_table(grid, phantoms_train, monkeypatch):
    monkeypatch.setattr(ablate_module, "finetune", no_training)
    sets = [x for kv in TINY for x in ("--set", kv)]
    result = runner.invoke(app, ["ablate", "--recipe", "demo", "--data", str(phantoms_train), "--out", str(grid[0]),
                                 "--seeds", "2", "--tricks", "warmup", *sets])
    assert result.exit_code == 0, result.output
    assert "| without-warmup |" in result.output and "Δ AUROC [95% CI]" in result.output
    assert result.output.count(": reused") == 4
    quiet = runner.invoke(app, ["ablate", "--recipe", "demo", "--data", str(phantoms_train), "--out", str(grid[0]),
                                "--seeds", "2", "--tricks", "warmup", "--quiet", *sets])
    assert quiet.exit_code == 0 and quiet.output.strip() == str(grid[0])


@pytest.mark.slow
def test_issue_command_survives_sigkill_and_reuses_finished_runs(tmp_path):
    """The issue's must-show: `medtricks ablate --recipe demo --seeds 3 --tricks warmup,label_smoothing` runs offline
    (tiny settings), is killed with SIGKILL after the first runs finished, and the same command reuses them."""
    command = [sys.executable, "-m", "medtricks", "ablate", "--recipe", "demo", "--seeds", "3", "--tricks",
               "warmup,label_smoothing", "--out", "abl", "--set", "train.epochs=1", "--set", "data.image_size=32",
               "--set", "train.limit_train_batches=2", "--set", "data.workers=0"]
    out = tmp_path / "abl"
    first = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    try:
        while len(list(out.glob("runs/*/seed-*/report.json"))) < 2:
            assert first.poll() is None, "the ablation ended before it could be killed"
            assert time.monotonic() < deadline, "no run finished in 15 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished = mtimes(out)
    finished = {p: t for p, t in finished.items() if (p.parent / "report.json").is_file()}
    assert 2 <= len(finished) < 9
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert second.stdout.count(": reused") + second.stderr.count(": reused") >= len(finished)
    for name in ("ablation.json", "ablation.md", "forest.png"):
        assert (out / name).is_file()
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["variants"]) == ["reference", "without-warmup", "without-label_smoothing"]
    assert all(None not in entry["values"]["balanced_accuracy"] for entry in result["variants"].values())
    assert len(list(out.glob("runs/*/seed-*/report.json"))) == 9


CUSTOM = ["64px:data.image_size=64",
          "cold:train.lr=0.01,train.epochs=2",
          "one-gamma:model.bn_reset=[{stages: [blocks.5, blocks.6], gamma: one}],model.freeze=[stem]"]


def test_variant_changes_exactly_the_named_keys():
    demo = load_recipe("demo")
    grid = variants(demo, custom=CUSTOM)
    assert list(grid) == ["reference", "64px", "cold", "one-gamma"]  # with --variant and no --tricks: only these
    reference = grid["reference"].to_dict()
    assert reference == demo.to_dict()
    expected = {"64px": ["data.image_size"], "cold": ["train.epochs", "train.lr"],
                "one-gamma": ["model.bn_reset", "model.freeze"]}
    for name, keys in expected.items():
        assert sorted(recipe_differences(reference, grid[name].to_dict())) == keys
    assert grid["one-gamma"].model.bn_reset[0].stages == ("blocks.5", "blocks.6")
    assert grid["one-gamma"].model.bn_reset[0].gamma == "one"
    both = variants(demo, tricks=["warmup"], custom=CUSTOM[:1])
    assert list(both) == ["reference", "without-warmup", "64px"]


def test_split_assignments_keeps_commas_inside_values():
    assert split_assignments("a.b=1,c=[1, 2],d={x: 1, y: [3, 4]},e='p,q'") == [
        "a.b=1", "c=[1, 2]", "d={x: 1, y: [3, 4]}", "e='p,q'"]


@pytest.mark.parametrize("spec, words", [
    ("nocolon", ["NAME:key=value"]),
    ("x:", ["NAME:key=value"]),
    ("reference:train.lr=0.1", ["reference"]),
    ("bad name:train.lr=0.1", ["NAME"]),
    ("x:train.lr", ["NAME:key=value"]),
    ("x:train.learning_rate=0.1", ["--variant 'x:train.learning_rate=0.1'", "train.learning_rate"]),
    ("noaug:train.tta=true", ["--variant 'noaug:train.tta=true'", "train.tta"]),  # the demo's augment draws no flips
    ("same:train.lr=0.05", ["reference"]),  # the demo's own lr: the variant would be the reference
])
def test_bad_variants_are_refused_with_the_reason(spec, words):
    from medtricks.errors import MedtricksError

    with pytest.raises(MedtricksError) as error:
        variants(load_recipe("demo", overrides=["train.lr=0.05"]), custom=[spec])
    for word in words:
        assert word in str(error.value), (word, str(error.value))


def test_two_variants_with_one_name_are_refused():
    with pytest.raises(AblationError, match="taken"):
        variants(load_recipe("demo"), custom=["a:train.lr=0.2", "a:train.lr=0.3"])


def test_ablate_with_a_custom_variant_reuses_the_reference_and_records_the_spec(grid_copy, phantoms_train):
    result = ablate("demo", data=phantoms_train, out=grid_copy, seeds=1, overrides=TINY,
                    custom=["fast-lr:train.lr=0.2"])
    assert list(result["variants"]) == ["reference", "fast-lr"] and result["tricks"] == []
    assert result["variants"]["fast-lr"]["changes"] == ["train.lr"]
    assert result["variant_specs"] == ["fast-lr:train.lr=0.2"] and "--variant fast-lr:train.lr=0.2" in \
        result["command"] and "--tricks" not in result["command"]
    saved = {name: load_recipe(grid_copy / "runs" / name / "seed-0" / "recipe.yaml").to_dict()
             for name in ("reference", "fast-lr")}
    assert recipe_differences(saved["reference"], saved["fast-lr"]) == ["train.lr"]
    assert "fast-lr" in (grid_copy / "ablation.md").read_text()


def test_power_line_states_the_smallest_detectable_difference(grid):
    from medtricks.stats import detectable_difference

    out, result, _ = grid
    saved = json.loads((out / "ablation.json").read_text())
    versus = saved["variants"]["without-warmup"]["vs_reference"]["auroc"]
    per_seed = [d for d in versus["per_seed"] if d is not None]
    assert versus["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    power = saved["power"]["auroc"]
    assert power["n"] == 2 and power["sd"] == pytest.approx(versus["sd"])  # one variant: its own sd
    assert power["detectable"] == pytest.approx(detectable_difference(versus["sd"], 2))
    table = (out / "ablation.md").read_text()
    # each metric names its own number of pairs (a unit where a metric is undefined has none)
    assert "Power: with the paired differences" in table and f"±{power['detectable']:.4f} in AUROC (2 pairs)" in table


@pytest.mark.parametrize("damage, words", [
    (lambda report: "{not json", ["report.json is damaged", "Expecting"]),
    (lambda report: json.dumps({k: v for k, v in report.items() if k != "splits"}), ["auroc 'missing'"]),
    (lambda report: json.dumps({**report, "splits": {"val": {**report["splits"]["val"], "auroc": "0.9"}}}),
     ["auroc '0.9'"]),
    (lambda report: json.dumps({**report, "splits": {"val": {**report["splits"]["val"], "auroc": float("nan")}}}),
     ["auroc nan"]),
])
def test_a_reused_units_damaged_report_is_named(grid_copy, phantoms_train, monkeypatch, damage, words):
    """A reused unit's report.json was read unchecked: tracebacks, or a NaN AUROC written into ablation.json as a
    bare NaN token with the verdict 'no detectable effect'."""
    from medtricks.files import DamagedFileError

    report_file = grid_copy / "runs" / "reference" / "seed-0" / "report.json"
    report_file.write_text(damage(json.loads(report_file.read_text())))
    monkeypatch.setattr(ablate_module, "finetune", no_training)
    with pytest.raises(DamagedFileError) as error:
        ablate("demo", data=phantoms_train, out=grid_copy, seeds=2, tricks=["warmup"], overrides=TINY)
    for word in [*words, str(report_file), "delete that unit's folder"]:
        assert word in str(error.value), str(error.value)


def test_units_with_an_undefined_metric_are_named(grid):
    """A held-out fold with one class has no AUROC; the means and pairs leave it out, and ablation.md said only how
    many pairs were left, not which unit lost its value."""
    from medtricks.ablate import markdown_table

    out, _, _ = grid
    saved = json.loads((out / "ablation.json").read_text())
    assert "Undefined" not in (out / "ablation.md").read_text()
    saved["variants"]["without-warmup"]["values"]["auroc"][1] = None
    table = markdown_table(saved)
    assert "Undefined, so left out of the means and of the pairs (one class in that split): AUROC of " \
           "without-warmup at seed 1." in table
