"""Cross-validated ablations: the fold split (every non-test image in exactly one held-out fold, patients never
split, the source's own test split untouched), the recipe keys, an end-to-end `ablate --folds` with its pooled tests
and resumption, and (slow) a planted effect found while a null variant is not."""

import importlib
import json
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtricks.ablate import ablate
from medtricks.data.sources import load_source
from medtricks.data.splits import cross_validation_split, fold_assignment
from medtricks.errors import MedtricksError
from medtricks.recipe import SplitConfig, load_recipe

TINY = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1"]


def check_folds(source, config: SplitConfig, seed: int) -> None:
    """Every non-test record in exactly one held-out fold; train, val and test disjoint; no patient in two of them."""
    held_out = defaultdict(list)
    for fold in range(config.folds):
        splits, _ = cross_validation_split(source, SplitConfig(**{**config.__dict__, "fold": fold}), seed)
        train, val, test = (set(splits[name]) for name in ("train", "val", "test"))
        assert not (train & val or train & test or val & test)
        for i in test:
            held_out[i].append(fold)
        patients = {name: {source.records[i]["patient_id"] for i in splits[name]} for name in ("train", "val", "test")}
        assert not (patients["test"] & (patients["train"] | patients["val"])), fold
        assert not patients["train"] & patients["val"], fold
        assert len({source.records[i]["label"] for i in test}) == 2, "a fold without one of the classes"
    pool = [i for i, r in enumerate(source.records) if r.get("split") != "test"]
    assert sorted(held_out) == pool and all(len(f) == 1 for f in held_out.values())


def test_each_image_is_held_out_once_and_patients_are_never_split(phantoms_train):
    source = load_source(phantoms_train / "labels.csv")
    for seed in (0, 1):
        check_folds(source, SplitConfig(folds=4), seed)
    assert fold_assignment(source, 4, 0) == fold_assignment(source, 4, 0)  # reproducible
    assert fold_assignment(source, 4, 0) != fold_assignment(source, 4, 1)  # a new seed, new folds


def test_the_sources_own_test_split_stays_out_of_every_fold(phantoms_train, tmp_path):
    rows = (phantoms_train / "labels.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    patients = sorted({line.split(",")[2] for line in body})
    test_patients = set(patients[::5])
    lines = [header + ",split"] + [f"{line},{'test' if line.split(',')[2] in test_patients else 'train'}"
                                   for line in body]
    manifest = tmp_path / "with_test.csv"
    manifest.write_text("\n".join(lines) + "\n")
    for line in body:  # the paths of labels.csv are relative to its folder
        path = line.split(",")[0]
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes((phantoms_train / path).read_bytes())
    source = load_source(manifest)
    assert source.has_splits
    check_folds(source, SplitConfig(folds=3), 0)
    folds = fold_assignment(source, 3, 0)
    assert all((f is None) == (r["split"] == "test") for f, r in zip(folds, source.records, strict=True))


@pytest.mark.parametrize("bad", ["data.split.folds=1", "data.split.folds=-2", "data.split.fold=3",
                                 "data.split.folds=3,data.split.fold=3", "data.split.folds=3,data.split.val=0"])
def test_fold_keys_are_checked(bad):
    overrides = bad.split(",")
    if "data.split.val=0" in overrides:
        overrides += ["data.split.train=0.85"]
    with pytest.raises(MedtricksError, match="data.split"):
        load_recipe("demo", overrides=overrides)


def test_ablate_folds_end_to_end_and_resumed(phantoms_train, tmp_path, monkeypatch):
    out = tmp_path / "cv"
    result = ablate("demo", data=phantoms_train, out=out, seeds=1, folds=2, overrides=TINY,
                    custom=["fast:train.lr=0.2"])
    assert result["folds"] == 2 and result["units"] == [{"seed": 0, "fold": 0}, {"seed": 0, "fold": 1}]
    assert "--folds 2" in result["command"] and result["split"] == "held-out folds"
    assert result["versions"]["torch"] == torch.__version__
    assert result["versions"]["python"] == platform.python_version()
    for variant in ("reference", "fast"):
        runs = result["variants"][variant]["runs"]
        assert [Path(r).name for r in runs] == ["fold-0", "fold-1"]
        for k, run in enumerate(runs):
            report = json.loads((Path(run) / "report.json").read_text())
            assert result["variants"][variant]["values"]["auroc"][k] == report["splits"]["test"]["auroc"]
    pooled = result["pooled"]
    record = json.loads((out / "folds.json").read_text())
    n_pool = sum(f is not None for f in record["fold_of_record"]["0"])
    assert pooled["reference"][0]["n"] == pooled["fast"][0]["n"] == n_pool  # every image scored once
    assert "mcnemar" in pooled["fast"][0] and "delong" in pooled["fast"][0]
    assert "kappa_quadratic" not in pooled["fast"][0]  # not an ordinal recipe
    assert "Pooled held-out folds" in (out / "ablation.md").read_text()

    ablate_module = importlib.import_module("medtricks.ablate")  # the module: medtricks.ablate is the function

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold run was trained again")

    monkeypatch.setattr(ablate_module, "finetune", no_training)
    again = ablate("demo", data=phantoms_train, out=out, seeds=1, folds=2, overrides=TINY,
                   custom=["fast:train.lr=0.2"])
    assert again["variants"] == result["variants"] and again["pooled"] == result["pooled"]


def test_multilabel_ablate_folds_pools_means_over_findings_and_exact_matches(findings, tmp_path):
    import shutil

    from multilabel_data import FAST as ML_FAST
    from sklearn.metrics import roc_auc_score

    data = shutil.copytree(findings, tmp_path / "data")  # the findings under another column name: folds.json reads it
    lines = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join(["path,finding_labels,patient_id", *lines[1:]]) + "\n")
    out = tmp_path / "cv"
    overrides = [*ML_FAST, "train.epochs=1", "data.label_column=finding_labels"]
    with pytest.raises(MedtricksError, match="recipe is multi-label: a targeted"):  # refused before any training
        ablate("demo", data=data, out=out, seeds=1, folds=2, attack=True,
               overrides=[*overrides, "attack.targeted=true"])
    assert not (out / "runs").exists()
    result = ablate("demo", data=data, out=out, seeds=1, folds=2, overrides=overrides, attack=True,
                    custom=["slow:train.lr=0.0005"])
    assert result["task"] == "multilabel"
    for variant in ("reference", "slow"):  # robust accuracy: the mean over findings of the multi-label attack
        for k, run in enumerate(result["variants"][variant]["runs"]):
            robust = json.loads((Path(run) / "robust.json").read_text())
            assert result["variants"][variant]["values"]["robust_accuracy"][k] == robust["accuracy"]
            assert 0 <= robust["accuracy"] <= robust["clean_accuracy"] <= 1
    pooled_scores = {}
    for variant in ("reference", "slow"):
        runs = result["variants"][variant]["runs"]
        for k, run in enumerate(runs):
            report = json.loads((Path(run) / "report.json").read_text())
            assert result["variants"][variant]["values"]["auroc"][k] == report["splits"]["test"]["auroc"]
        parts = [json.loads((Path(run) / "fold_scores.json").read_text()) for run in runs]
        labels = np.concatenate([p["labels"] for p in parts])
        probs = np.concatenate([p["probs"] for p in parts])
        right = np.concatenate([(np.asarray(p["probs"]) >= p["threshold"]) == np.asarray(p["labels"])
                                for p in parts])
        assert labels.shape == probs.shape == (len(labels), 2)
        row = result["pooled"][variant][0]
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, probs, average=None).mean())
        assert row["accuracy"] == pytest.approx(right.mean())
        assert row["exact_match"] == pytest.approx(right.all(1).mean())
        pooled_scores[variant] = right.all(1)
    mcnemar = result["pooled"]["slow"][0]["mcnemar"]
    assert mcnemar["accuracy_difference"] == pytest.approx(pooled_scores["slow"].mean()
                                                           - pooled_scores["reference"].mean())
    assert "delong" not in result["pooled"]["slow"][0]
    record = json.loads((out / "folds.json").read_text())
    assert sum(f is not None for f in record["fold_of_record"]["0"]) == result["pooled"]["reference"][0]["n"]
    assert "Multi-label" in (out / "ablation.md").read_text()


def test_pooled_ordinal_folds_add_the_quadratic_kappa_of_the_pooled_decisions(tmp_path):
    from sklearn.metrics import cohen_kappa_score

    from medtricks.ablate import markdown_table
    from medtricks.crossval import pooled_comparison

    rng = np.random.default_rng(0)
    runs = {"reference": [], "other": []}
    for variant in runs:
        for fold in range(2):  # held-out scores as fold_scores.json caches them: 5 grades, decisions by argmax
            labels = np.arange(30) % 5
            probs = rng.dirichlet(np.ones(5), 30) + np.eye(5)[labels] * (0.5 if variant == "reference" else 0.1)
            probs /= probs.sum(1, keepdims=True)
            run = tmp_path / variant / f"fold-{fold}"
            run.mkdir(parents=True)
            (run / "fold_scores.json").write_text(json.dumps({
                "labels": labels.tolist(), "probs": probs.tolist(), "decisions": probs.argmax(1).tolist(),
                "threshold": None}))
            runs[variant].append(str(run))
    pooled = pooled_comparison(runs, [(0, 0), (0, 1)], "reference", ordinal=True)
    for variant, paths in runs.items():
        parts = [json.loads((Path(p) / "fold_scores.json").read_text()) for p in paths]
        expected = cohen_kappa_score(np.concatenate([p["labels"] for p in parts]),
                                     np.concatenate([p["decisions"] for p in parts]), weights="quadratic")
        assert pooled[variant][0]["kappa_quadratic"] == pytest.approx(expected)
    assert pooled["reference"][0]["kappa_quadratic"] > pooled["other"][0]["kappa_quadratic"]
    assert "kappa_quadratic" not in pooled_comparison(runs, [(0, 0), (0, 1)], "reference")["other"][0]
    result = {"recipe": "r", "mode": "leave-one-out", "folds": 2, "seeds": [0], "units": [{}, {}], "command": "c",
              "pooled": pooled, "variants": {v: {"summary": {}, "vs_reference": None, "values": {}} for v in runs}}
    table = markdown_table(result)
    assert "quadratic kappa" in table and f"{pooled['other'][0]['kappa_quadratic']:.4f}" in table


def colour_data(folder: Path, patients: int = 40) -> Path:
    """RGB images whose class is only in the colour: red- or green-tinted noise of equal BT.601 luma (106 x 0.299 ~
    54 x 0.587, within 0.004 of a grey level), so a grey model sees two identical distributions and a colour model
    sees the label."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows = ["path,label,patient_id"]
    for p in range(patients):
        label = p % 2
        for j in range(2):
            pixels = rng.integers(110, 146, size=(32, 32, 1)).repeat(3, axis=2)
            sign = 1 if label == 0 else -1
            pixels[..., 0] += 106 * sign  # stays in 4..251: no clipping, so the luma stays equal
            pixels[..., 1] -= 54 * sign
            name = f"images/p{p:02d}_{j}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / name)
            rows.append(f"{name},{['red', 'green'][label]},p{p:02d}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


@pytest.mark.slow
def test_a_planted_effect_is_found_and_a_null_variant_is_not(tmp_path):
    """Grey reference vs a colour variant (the label is in the colour: a planted effect) and vs a variant that
    feeds grey to the model differently (repeat instead of the folded sum: no effect). 5 folds, 1 seed."""
    data = colour_data(tmp_path / "colour")
    out = tmp_path / "cv"
    overrides = ["data.image_size=32", "data.workers=0", "train.epochs=3", "train.batch_size=8", "data.augment=none",
                 "data.classes=[red, green]"]
    result = ablate("demo", data=data, out=out, seeds=1, folds=5, overrides=overrides,
                    custom=["colour:data.channels=3", "repeat:model.input_mode=repeat"])
    colour, null = (result["variants"][v]["vs_reference"]["auroc"] for v in ("colour", "repeat"))
    assert colour["verdict"] == "helps", colour
    assert null["verdict"] == "no detectable effect", null
    assert result["pooled"]["colour"][0]["delong"]["p_value"] < 0.01
    # the saved fold assignment: no image (or patient) was held out and also trained or selected on in one run
    record = json.loads((out / "folds.json").read_text())
    source = load_source(data, ("red", "green"))  # the recipe's class order: the folds are stratified by label index
    assert record["keys"] == [str(r["key"]) for r in source.records]
    folds = record["fold_of_record"]["0"]
    for variant, entry in result["variants"].items():
        for unit, run in zip(result["units"], entry["runs"], strict=True):
            recipe = load_recipe(Path(run) / "recipe.yaml")
            splits, _ = cross_validation_split(source, recipe.data.split, recipe.seed)
            held_out = {i for i, f in enumerate(folds) if f == unit["fold"]}
            assert set(splits["test"]) == held_out, (variant, unit)
            seen = set(splits["train"]) | set(splits["val"])
            assert not seen & held_out
            assert not {record["patient_ids"][i] for i in seen} & {record["patient_ids"][i] for i in held_out}
