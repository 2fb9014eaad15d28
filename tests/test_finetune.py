"""finetune / evaluate / predict end to end on tiny phantom sets, the schedule (what each trick changes in a run:
test_trick_effects.py)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.errors import MedtricksError
from medtricks.finetune import evaluate, finetune, predict
from medtricks.recipe import TricksConfig, build_dataclass, load_recipe
from medtricks.runs import RunError
from medtricks.train import Progress, TrainingError, lr_factor

runner = CliRunner()
FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=2",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1"]
REPORT_M = {"n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity", "f1", "ece",
            "sensitivity_at_specificity", "specificity_at_sensitivity"}  # binary: with the operating points


@pytest.fixture(scope="module")
def tiny_run(phantoms_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return finetune("demo", data=phantoms_train, out=out, overrides=FAST)


def test_run_directory_contract(tiny_run):
    for name in ("recipe.yaml", "model.safetensors", "model.json", "metrics.jsonl", "report.json"):
        assert (tiny_run / name).is_file(), name
    report = json.loads((tiny_run / "report.json").read_text())
    assert set(report) >= {"recipe", "seed", "classes", "splits", "train"}
    assert set(report["train"]) >= {"epochs", "seconds", "images_per_second"}
    for split in report["splits"].values():
        assert set(split) == REPORT_M
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert all(0 < r["data_wait_seconds"] < r["seconds"] for r in rows)  # the loader's share of the epoch
    info = json.loads((tiny_run / "model.json").read_text())
    assert info["arch"] == "efficientnet_lite0" and info["classes"] == ["normal", "opacity"]
    assert info["in_chans"] == 1 and info["image_size"] == 32 and "threshold" in info
    assert {p.name for p in (tiny_run / "plots").iterdir()} >= {"training_curves.png", "roc_val.png"}
    assert load_recipe(tiny_run / "recipe.yaml").data.image_size == 32  # the resolved recipe reloads


def test_evaluate_reproduces_report_exactly(tiny_run, tmp_path):
    report = json.loads((tiny_run / "report.json").read_text())
    again = evaluate(tiny_run, split="val", json_path=tmp_path / "val.json")
    assert {k: again[k] for k in REPORT_M} == report["splits"]["val"]
    assert json.loads((tmp_path / "val.json").read_text())["split"] == "val"


def test_evaluate_external_source_and_predict(tiny_run, tmp_path):
    from medtricks.data.synth import synthesize

    other = tmp_path / "other_site"
    synthesize(other, n=10, seed=99, size=48)
    metrics = evaluate(tiny_run, data=other, split="all")
    assert metrics["n"] == 10 and metrics["split"] == "all"
    (tmp_path / "broken.png").write_text("not an image")
    rows = predict(tiny_run, [other / "images", tmp_path / "broken.png"], out_csv=tmp_path / "p.csv")
    assert len(rows) == 11 and sum(bool(r["error"]) for r in rows) == 1
    error = next(r["error"] for r in rows if r["error"])  # names the file; no data-set setting (on_error) to advise
    assert "broken.png" in error and "Re-export" in error and "on_error" not in error
    good = [r for r in rows if not r["error"]]
    assert all(r["prediction"] in ("normal", "opacity") for r in good)
    assert all(abs(r["p_normal"] + r["p_opacity"] - 1) < 1e-4 for r in good)
    assert (tmp_path / "p.csv").read_text().startswith("path,prediction,p_normal,p_opacity,error")


def test_predict_writes_a_file_name_that_is_not_utf8(tiny_run, tmp_path, caplog):
    """A name with undecodable bytes (an old Latin-1 archive) is written escaped, and said so; it crashed the CSV
    write."""
    import os

    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("L", (40, 40), 90).save(os.fsdecode(os.fsencode(folder) + b"/bad\xff.png"), format="PNG")
    (folder / "broken\udcfe.png").write_text("not an image")  # unreadable too: its error row names it
    with caplog.at_level("WARNING", logger="medtricks"):
        rows = predict(tiny_run, [folder], out_csv=tmp_path / "p.csv")
    text = (tmp_path / "p.csv").read_text(encoding="utf-8")
    assert "bad\\xff.png" in text and "broken\\xfe.png" in text
    assert "2 file name(s) are not valid UTF-8" in caplog.text and "rename the files" in caplog.text
    assert sorted(bool(r["error"]) for r in rows) == [False, True]


def test_predict_csv_cells_never_run_as_spreadsheet_formulas(tiny_run, tmp_path, monkeypatch):
    """A file named like a formula, given by a relative name, and an error row that starts with it: each cell gets a
    leading ' in the CSV; the returned rows keep the name."""
    import csv

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(x).png", "+1.png", "-2.png", "@SUM(A1).png", "plain.png"]
    for name in names:
        Image.new("L", (40, 40), 90).save(name, format="PNG")
    Path("=broken.png").write_text("not an image")
    rows = predict(tiny_run, [*names, "=broken.png"], out_csv="p.csv")
    assert [r["path"] for r in rows] == [*names, "=broken.png"]
    with open("p.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert [c["path"] for c in cells] == [f"'{n}" for n in names[:4]] + ["plain.png", "'=broken.png"]
    assert cells[-1]["error"].startswith("'=broken.png: ") and cells[0]["p_normal"][0] in "01"


def test_evaluate_refuses_other_classes(tiny_run, tmp_path):
    from PIL import Image

    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.new("L", (40, 40)).save(tmp_path / "pets" / name / "a.png")
    with pytest.raises(MedtricksError, match="outside the recipe's classes"):
        evaluate(tiny_run, data=tmp_path / "pets", split="all")


def test_existing_out_is_never_overwritten(tiny_run, phantoms_train):
    before = (tiny_run / "report.json").read_text()
    with pytest.raises(RunError, match="already exists"):
        finetune("demo", data=phantoms_train, out=tiny_run, overrides=FAST)
    assert (tiny_run / "report.json").read_text() == before


def test_schedule_warmup_cosine_and_step():
    tricks = build_dataclass(TricksConfig, {"warmup": {"epochs": 1}, "cosine": {}}, "tricks")
    assert lr_factor(0, 100, 10, tricks) == 0.0
    assert lr_factor(10, 100, 10, tricks) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, tricks) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, tricks) == pytest.approx(0.0)
    step = build_dataclass(TricksConfig, {"step_decay": {}}, "tricks")
    assert [lr_factor(s, 120, 0, step) for s in (0, 30, 60, 90)] == pytest.approx([1, 0.1, 0.01, 0.001])
    assert lr_factor(7, 100, 0, build_dataclass(TricksConfig, {}, "tricks")) == 1.0


def test_a_tie_on_the_selection_metric_goes_to_the_lower_validation_loss():
    progress = Progress()
    chosen = []
    for epoch, (auroc, loss) in enumerate([(0.84, 0.66), (0.99, 0.59), (0.91, 0.50), (0.99, 0.22), (0.99, 0.30)], 1):
        progress.epoch = epoch
        chosen.append(progress.select("auroc", auroc, 0.5 + epoch / 100, patience=None, loss=loss))
    assert chosen == [True, True, False, True, False]
    assert (progress.best_epoch, progress.best_loss, progress.threshold, progress.stale) == (4, 0.22, 0.54, 1)
    loss_selected = Progress()
    for epoch, loss in enumerate([0.5, 0.4, 0.4], 1):
        loss_selected.epoch = epoch
        loss_selected.select("loss", loss, None, patience=None, loss=loss)
    assert loss_selected.best_epoch == 2  # an equal loss is no improvement
    unknown = Progress()
    unknown.select("auroc", 0.9, None, patience=None)
    unknown.epoch = 2
    assert not unknown.select("auroc", 0.9, None, patience=None, loss=0.1)  # no loss recorded to compare with


def test_cosine_and_step_decay_together_is_an_error():
    with pytest.raises(MedtricksError, match="one LR decay"):
        build_dataclass(TricksConfig, {"cosine": {}, "step_decay": {}}, "tricks")


def test_nan_loss_stops_with_the_step(phantoms_train, tmp_path, monkeypatch):
    import medtricks.train as train

    monkeypatch.setattr(train, "label_smoothing_loss", lambda logits, *a, **k: logits.sum() * float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 1, step 1"):
        finetune("demo", data=phantoms_train, out=tmp_path / "nan", overrides=FAST)


def test_cli_finetune_and_bad_input(phantoms_train, tmp_path):
    sets = [x for kv in FAST for x in ("--set", kv)]
    out = tmp_path / "cli_run"
    result = runner.invoke(app, ["finetune", "--recipe", "demo", "--data", str(phantoms_train), "--out", str(out),
                                 "--quiet", *sets, "--set", "train.epochs=1"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and (out / "report.json").is_file()
    again = runner.invoke(app, ["finetune", "--recipe", "demo", "--data", str(phantoms_train), "--out", str(out),
                                *sets])
    assert again.exit_code == 2 and "already exists" in again.output and "Traceback" not in again.output
    data = ["--data", str(phantoms_train)]
    for args, words in [(["--recipe", "nope", *data], ["unknown recipe 'nope'", "demo"]),
                        (["--recipe", "demo", *data, "--set", "train.lrr=1"], ["train.lrr", "lr"]),
                        (["--recipe", "demo", *data, "--set", "train.lr=-1"], ["train.lr", "> 0"]),
                        (["--recipe", "demo", *data, "--set", "tricks.mixup.alpha=-1"], ["tricks.mixup.alpha"]),
                        (["--recipe", "demo", "--set", "model.arch=vgg"], ["model.arch", "resnet18"]),
                        (["--recipe", "demo", "--set", "model.weights=/no/such.pth"], ["model.weights", "not found"]),
                        (["--recipe", "demo", "--data", str(tmp_path / "none")], ["not found"])]:
        result = runner.invoke(app, ["finetune", *sets, *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
        for word in words:
            assert word in result.output, (args, result.output)


def test_cli_evaluate_and_predict(tiny_run, tmp_path, phantoms_train):
    result = runner.invoke(app, ["evaluate", str(tiny_run), "--split", "val", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e.json").read_text())["n"] > 0
    result = runner.invoke(app, ["predict", str(tiny_run), str(phantoms_train / "images" / "normal")])
    assert result.exit_code == 0 and "synth-" in result.output
    missing = runner.invoke(app, ["evaluate", str(tmp_path / "no_run")])
    assert missing.exit_code == 2 and "not a finished medtricks run" in missing.output


def test_amp_trick_runs_bf16_on_this_cpu():
    from medtricks.tricks.amp import resolve_amp_dtype

    dtype = resolve_amp_dtype(torch.device("cpu"), "auto")
    if dtype is None:
        pytest.skip("this CPU has no fast bfloat16; amp falls back to fp32")
    assert dtype == torch.bfloat16


def test_a_split_without_one_class_finishes_with_exit_0(phantoms_train, tmp_path):
    """Small medical sets split by patient can leave a class out of a split: sensitivity or specificity do not
    exist there; the run still finishes, report.json says null and the CLI says n/a."""
    import csv
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantoms_train, data)
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients = sorted({row["patient_id"] for row in rows})
    normal_only = {p for p in patients if all(r["label"] == "normal" for r in rows if r["patient_id"] == p)}
    for row in rows:  # test: a few patients with normal images only
        k = patients.index(row["patient_id"])
        row["split"] = "test" if row["patient_id"] in normal_only and k % 3 == 0 else "val" if k % 5 == 1 else "train"
    with open(data / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0]])
        writer.writeheader()
        writer.writerows(rows)
    sets = [x for kv in [*FAST, "train.epochs=1", "train.limit_train_batches=2"] for x in ("--set", kv)]
    result = runner.invoke(app, ["finetune", "--recipe", "demo", "--data", str(data), "--out", str(tmp_path / "run"),
                                 *sets])
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "run" / "report.json").read_text())["splits"]["test"]
    assert test["n"] > 0 and test["sensitivity"] is None and test["auroc"] is None
    line = next(line for line in result.output.splitlines() if line.startswith("test:"))
    assert "AUROC n/a" in line and "sensitivity n/a" in line


def test_a_diverging_loss_gets_a_warning(phantoms_train, tmp_path, monkeypatch, caplog):
    """A finite loss that grows by orders of magnitude within an epoch is named in a warning (NaN stops the run)."""
    import logging

    import medtricks.train as train

    calls = []
    real = train.label_smoothing_loss

    def growing(logits, *args, **kwargs):
        calls.append(1)
        return real(logits, *args, **kwargs) * (1.0 if len(calls) == 1 else 1e6)

    monkeypatch.setattr(train, "label_smoothing_loss", growing)
    with caplog.at_level(logging.WARNING, logger="medtricks.train"):
        finetune("demo", data=phantoms_train, out=tmp_path / "run",
                 overrides=[*FAST, "train.epochs=1", "train.limit_train_batches=2", "train.lr=1e-9"])
    assert "grew from" in caplog.text and "epoch 1 (step 2)" in caplog.text and "train.grad_clip" in caplog.text


def test_a_declared_class_without_training_images_is_named(phantoms_train, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="medtricks.finetune"):
        finetune("demo", data=phantoms_train, out=tmp_path / "run",
                 overrides=[*FAST, "train.epochs=1", "train.limit_train_batches=1",
                            "data.classes=[normal, opacity, effusion]"])
    assert "['effusion'] have no image in the train split" in caplog.text


def test_one_path_given_as_a_string_is_one_input_not_its_characters(tiny_run, phantoms):
    """`predict(run, "/abs/scan.dcm")` walked the file system from "/" (its first character)."""
    from medtricks.ensemble import EnsembleError, ensemble

    image = next((phantoms / "images").rglob("*.dcm"))
    rows = predict(tiny_run, str(image))
    assert [r["path"] for r in rows] == [str(image)]
    with pytest.raises(EnsembleError, match="2 to .* runs; got 1"):
        ensemble(str(tiny_run))


def test_an_id_column_taken_for_the_label_is_questioned(tmp_path, caplog):
    """Patient ids as the label column give hundreds of classes of one or two images each; training went on without
    a word (and the per-class plots took minutes). finetune asks whether the label column is the label."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["path,label"]
    for c in range(24):
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / f"{c}-{k}.png")
            rows.append(f"{c}-{k}.png,patient-{c:03d}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    caplog.set_level("WARNING")
    finetune("demo", data=tmp_path, out=tmp_path / "run",
             overrides=[*FAST, "train.epochs=1", "data.classes=null", "data.channels=1"])
    assert "24 classes, most with 1 or 2 images: is the label column the label" in caplog.text
