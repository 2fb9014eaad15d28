"""`medtricks corrupt` end to end on a tiny demo run (phantoms, 32 px): the report and its mean corruption error, the
plots, `--against` (Hendrycks' CE with another run as the baseline), bad input (exit 2, no traceback), nothing of
the run touched; and, slow, a PneumoniaMNIST model that loses accuracy with severity on real images."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import nothing_lost, shared
from medtricks.cli import app
from medtricks.corruptions import PRESETS
from medtricks.finetune import finetune

runner = CliRunner()
FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=2",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(phantoms_train, tmp_path_factory) -> Path:
    return finetune("demo", data=phantoms_train, out=tmp_path_factory.mktemp("runs") / "tiny", overrides=FAST)


@pytest.fixture(scope="module")
def other_run(phantoms_train, tmp_path_factory) -> Path:
    return finetune("demo", data=phantoms_train, out=tmp_path_factory.mktemp("runs") / "other", seed=1,
                    overrides=[*FAST, "data.split.seed=0"])  # another training seed, the same images in each split


def corrupt(*args) -> object:
    result = runner.invoke(app, ["corrupt", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result


def corrupt_json(tmp_path: Path, *args) -> dict:
    out = tmp_path / f"corrupt-{len(list(tmp_path.glob('corrupt-*.json')))}.json"
    result = corrupt(*args, "--json", out)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(run, tmp_path_factory) -> dict:
    return corrupt_json(tmp_path_factory.mktemp("corrupt"), run, "--severities", "1,3,5")


def test_recipe_presets_are_the_libraries():
    from medtricks.recipe import CORRUPTION_PRESETS

    assert tuple(PRESETS) == CORRUPTION_PRESETS


def test_recipe_attack_section_chooses_preset_and_severities(run, tmp_path):
    import shutil

    import yaml

    moved = tmp_path / "fundus_run"
    shutil.copytree(run, moved)
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["attack"].update({"corruptions": "fundus", "severities": [2, 4]})
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = corrupt_json(tmp_path, moved, "--limit", 4)
    assert report["preset"] == "fundus" and report["names"] == list(PRESETS["fundus"])
    assert report["severities"] == [2, 4]
    twice = corrupt_json(tmp_path, moved, "--limit", 2, "--corruptions", "gaussian_noise,gaussian_noise",
                         "--severities", "1,1")  # each counts once (it crashed with a ValueError traceback)
    assert twice["names"] == ["gaussian_noise"] and twice["severities"] == [1]


def test_report_has_every_corruption_at_every_severity(run, report):
    names = list(PRESETS["radiograph"])  # demo: data.augment cxr
    assert report["preset"] == "radiograph" and report["names"] == names
    assert [(r["corruption"], r["severity"]) for r in report["results"]] == [(n, s) for n in names for s in (1, 3, 5)]
    assert [r["corruption"] for r in report["corruptions"]] == names
    assert report["severities"] == [1, 3, 5] and report["split"] == "test" and report["run"] == str(run)
    test = json.loads((run / "report.json").read_text())["splits"]["test"]
    assert report["n"] == test["n"]
    assert report["clean"]["accuracy"] == pytest.approx(test["accuracy"])  # the run's own decision rule
    for row in report["results"]:
        assert 0 <= row["accuracy"] <= 1


def test_mean_corruption_error_is_the_mean_error_over_corruptions_and_severities(report):
    errors = np.array([1 - r["accuracy"] for r in report["results"]])
    clean_error = 1 - report["clean"]["accuracy"]
    assert report["mce"] == pytest.approx(errors.mean())
    assert report["relative_mce"] == pytest.approx((errors - clean_error).mean())


def test_plots_and_report_are_written_in_the_run(run, report):
    folder = Path(report["files"]) if "files" in report else next((run / "corruptions").iterdir())
    for name in ("corruptions.png", "gallery.png"):
        assert (folder / name).read_bytes()[:8] == PNG
    assert json.loads((folder / "corruptions.json").read_text())["mce"] == report["mce"]


def test_a_run_against_itself_has_ce_one(run, tmp_path):
    report = corrupt_json(tmp_path, run, "--against", run, "--corruptions", "gaussian_noise,contrast", "--limit", 20)
    assert report["against"]["run"] == str(run)
    for row in report["versus"]["corruptions"]:
        assert row["ce"] in (None, pytest.approx(1.0)) and row["accuracy_difference"] == 0
    assert report["against"]["results"] == report["results"]  # the same corrupted images, the same decisions


def test_against_another_run_is_hendrycks_ce_with_it_as_baseline(run, other_run, tmp_path):
    report = corrupt_json(tmp_path, run, "--against", other_run, "--severities", "2,4")
    mine = {r["corruption"]: r for r in report["corruptions"]}
    theirs = {r["corruption"]: r for r in report["against"]["corruptions"]}
    for row in report["versus"]["corruptions"]:
        name = row["corruption"]
        if theirs[name]["error_sum"] > 0:
            assert row["ce"] == pytest.approx(mine[name]["error_sum"] / theirs[name]["error_sum"])
    ces = [r["ce"] for r in report["versus"]["corruptions"]]
    if None not in ces:
        assert report["versus"]["mce"] == pytest.approx(np.mean(ces))
    assert "CE vs --against" in corrupt(run, "--against", other_run, "--severities", "5", "--limit", 8).output


def test_same_seed_same_report_other_seed_other_noise(run, tmp_path):
    args = (run, "--corruptions", "gaussian_noise", "--limit", 16)
    first, again = corrupt_json(tmp_path, *args), corrupt_json(tmp_path, *args)
    assert first["results"] == again["results"]
    assert corrupt_json(tmp_path, *args, "--seed", 1)["seed"] == 1


def test_nothing_of_the_run_is_touched_and_existing_json_is_kept(run, tmp_path):
    existing = tmp_path / "keep.json"
    existing.write_text("{}")
    with nothing_lost(run / "plots", tmp_path):
        result = corrupt(run, "--json", existing, "--limit", 4)
        assert result.exit_code == 2 and "--overwrite" in result.output
    assert existing.read_text() == "{}"
    result = corrupt(run, "--json", run / "report.json", "--limit", 4, "--overwrite")
    assert result.exit_code == 2 and "report.json" in result.output


@pytest.mark.parametrize("args, words", [
    (["--preset", "ultrasound"], ["--preset", "ultrasound", "radiograph"]),
    (["--corruptions", "fog"], ["--corruptions", "fog", "gaussian_noise"]),
    (["--severities", "0"], ["--severities", "1,2,3,4,5"]),
    (["--severities", "6"], ["--severities"]),
    (["--severities", "two"], ["--severities", "two"]),
    (["--severities", ""], ["--severities"]),
    (["--corruptions", ","], ["--corruptions", "empty"]),
    (["--preset", "dermoscopy"], ["colour"]),  # hue shifts need colour: the demo model is grey
    (["--limit", "0"], ["--limit"]),
    (["--split", "validation"], ["validation"]),
])
def test_bad_options_exit_2_with_a_message(run, args, words):
    result = corrupt(run, *args)
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output, (word, result.output)


def test_against_a_run_of_another_split_is_refused_before_any_work(run, phantoms_train, tmp_path):
    resplit = finetune("demo", data=phantoms_train, out=tmp_path / "resplit", seed=1,
                       overrides=[*FAST, "train.epochs=1"])  # the split follows the seed: other test images
    with nothing_lost(run, resplit):
        result = corrupt(run, "--against", resplit, "--limit", 4)
    assert result.exit_code == 2 and "other images" in result.output and "--split all" in result.output
    for seed in ("-1", str(2**32)):
        result = corrupt(run, "--seed", seed, "--limit", 4)
        assert result.exit_code == 2 and "--seed" in result.output


def test_against_a_run_of_another_task_is_refused(run, tmp_path):
    other = finetune("demo", out=tmp_path / "rgb", overrides=[*FAST, "data.channels=3", "data.synth_if_missing=true",
                                                              f"data.source={tmp_path / 'synth'}"])
    result = corrupt(run, "--against", other, "--limit", 4)
    assert result.exit_code == 2 and "channels" in result.output


@pytest.mark.slow
def test_pneumoniamnist_model_loses_accuracy_with_severity(tmp_path):
    """Real chest X-rays: a briefly fine-tuned PneumoniaMNIST model's accuracy, averaged over the radiograph preset,
    does not rise with severity and is clearly lower at 5 than clean."""
    data = shared("pneumoniamnist")
    run = finetune("pneumoniamnist", data=data, out=tmp_path / "pneu",
                   overrides=["data.image_size=64", "train.epochs=2", "data.workers=0"])
    report = corrupt_json(tmp_path, run, "--split", "val")
    by_severity = [np.mean([r["accuracy"] for r in report["results"] if r["severity"] == s]) for s in range(1, 6)]
    curve = [report["clean"]["accuracy"], *by_severity]
    assert all(later <= earlier + 0.01 for earlier, later in zip(curve[:-1], curve[1:], strict=True)), curve
    assert curve[-1] <= curve[0] - 0.05, curve
