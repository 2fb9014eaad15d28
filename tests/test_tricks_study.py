"""benchmarks/tricks_study.py: every study variant is the plain reference with exactly its own keys changed, the BN
reset variants reset real residual BNs of efficientnet_lite0, and the README tables come from ablation.json files."""

import importlib.util
from pathlib import Path

import pytest
import torch

from medtricks.ablate import ablate, variants
from medtricks.models.backbones import create_model
from medtricks.models.surgery import apply_bn_reset
from medtricks.recipe import recipe_differences, resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("tricks_study", ROOT / "benchmarks" / "tricks_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def study_recipes(name: str, part: str) -> dict:
    argv = study.commands(name, study.SETS[name], Path("data"), Path("out"))[part]
    options = {flag: [argv[i + 1] for i, a in enumerate(argv) if a == flag] for flag in ("--set", "--variant")}
    assert argv[argv.index("--folds") + 1] == "5" and argv[argv.index("--recipe") + 1] == study.SETS[name]["recipe"]
    return variants(resolve_recipe(study.SETS[name]["recipe"], options["--set"]), None, "leave-one-out",
                    options["--variant"])


@pytest.mark.parametrize("name", list(study.SETS))
def test_each_variant_is_the_plain_reference_with_only_its_keys_changed(name):
    grid = study_recipes(name, "main")
    reference = grid.pop("reference")
    assert reference.tricks.enabled() == [] and reference.model.bn_reset == ()
    assert (reference.train.select_metric, reference.train.threshold) == ("auroc", "youden")  # fixed beforehand
    assert (reference.model.arch, reference.model.weights) == ("efficientnet_lite0", "imagenet")
    assert reference.data.image_size == study.SETS[name]["image_size"]
    expected = {f"tricks.{change.split('=')[0].split('.')[1]}" for change in study.TRICK_VARIANTS.values()}
    if not study.SETS[name]["imbalanced"]:
        expected.discard("tricks.class_balance")
    changed = [tuple(recipe_differences(reference.to_dict(), recipe.to_dict())) for recipe in grid.values()]
    assert sorted(c for c in changed if c != ("model.bn_reset",)) == sorted((key,) for key in expected)
    assert changed.count(("model.bn_reset",)) == 2 * len(study.STAGE_CHOICES)  # zero and one gamma per choice

    scaling = study_recipes(name, "linear-scaling")
    assert recipe_differences(scaling["reference"].to_dict(), scaling["linear-scaling"].to_dict()) == [
        "tricks.linear_scaling"]
    assert scaling["reference"].train.batch_size == 2 * study.SETS[name]["batch"]
    # the variant's lr at its doubled batch is twice the reference's (tuned at the recipe's batch)
    base = scaling["linear-scaling"].tricks.linear_scaling.base_batch
    assert scaling["reference"].train.batch_size / base == 2


def test_bn_reset_variants_reset_residual_branches_of_the_backbone():
    grid = study_recipes("retinamnist", "main")
    for variant, recipe in grid.items():
        for reset in recipe.model.bn_reset:
            model = create_model("efficientnet_lite0", num_classes=5, in_chans=3, weights="none")
            names = apply_bn_reset(model, reset.stages, gamma=reset.gamma, which=reset.which)
            assert names, variant
            gamma = torch.cat([model.backbone.get_submodule(n).weight.detach() for n in names])
            assert torch.all(gamma == (0.0 if reset.gamma == "zero" else 1.0)), variant


def test_tables_come_from_the_ablation_files(phantoms_train, tmp_path):
    tiny = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
            "train.limit_train_batches=2", "train.batch_size=8", "train.eval_batch_size=16"]
    result = ablate("demo", data=phantoms_train, out=tmp_path / "derm-isic" / "main", seeds=1, folds=2,
                    overrides=tiny, custom=["fast:train.lr=0.2"])
    text = study.markdown(tmp_path)
    assert "**ISIC UDA-1**" in text and "RetinaMNIST" not in text
    d = result["variants"]["fast"]["vs_reference"]["auroc"]
    row = next(line for line in text.splitlines() if line.startswith("| fast |"))
    b = result["variants"]["fast"]["vs_reference"]["balanced_accuracy"]
    assert row.split(" | ")[1:5] == [study._effect(d), d["verdict"], study._effect(b), b["verdict"]]
    assert f"`{result['command']}`" in text and "Power (ISIC UDA-1)" in text
    assert f"- fast: ISIC UDA-1 Δ AUROC {study._effect(d)}, {d['verdict']}" in text
    rows = study.summary(tmp_path)
    assert [(r["data"], r["ablation"], r["variant"]) for r in rows] == [("derm-isic", "main", "fast")]
    assert rows[0]["auroc"]["difference"] == d["difference"] and rows[0]["changes"] == ["train.lr"]
