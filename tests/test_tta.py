"""Test-time augmentation (issue 18, part 5): only the flips a run's augment preset draws are ever applied, the
output is the average of the views' probabilities (multi-label: of each finding's sigmoid), and evaluate / predict
--tta choose the binary threshold (multi-label: each finding's) again on validation with the same views."""

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from medtricks.data.transforms import create_train_transform
from medtricks.finetune import evaluate, finetune, predict
from medtricks.metrics import choose_threshold
from medtricks.multilabel import choose_thresholds
from medtricks.recipe import AUGMENT_PRESETS
from medtricks.runs import open_run
from medtricks.tta import VIEWS, TTAModel, tta_views, wrap

FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1"]
FLIP_OF = {v2.RandomHorizontalFlip: -1, v2.RandomVerticalFlip: -2}


class Recorder(nn.Module):
    """Logits from a fixed linear map of the pixels; remembers every input it was given."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.weight = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 64)

    def forward(self, x):
        self.seen.append(x.clone())
        return x.flatten(1) @ self.weight.T


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_tta_applies_only_the_flips_the_training_preset_draws(preset):
    drawn = {FLIP_OF[type(t)] for t in create_train_transform(preset, 32, 3).transforms if type(t) in FLIP_OF}
    views = tta_views(preset)
    assert views[0] == "identity" and {d for v in views for d in VIEWS[v]} == drawn
    model = Recorder()
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)  # no symmetry: every flip differs
    TTAModel(model, views)(x)
    allowed = [x.flip(VIEWS[v]) if VIEWS[v] else x for v in views]
    assert len(model.seen) == len(views)
    for seen in model.seen:
        assert any(torch.equal(seen, a) for a in allowed)
    if preset == "cxr":  # radiographs: left/right anatomy, so the image is only ever seen as it is
        assert all(torch.equal(seen, x) for seen in model.seen)


def test_the_output_is_the_log_of_the_mean_probability_over_the_views():
    model, x = Recorder(), torch.rand(3, 1, 8, 8)
    views = tta_views("dermoscopy")
    probs = TTAModel(model, views)(x).softmax(-1)
    expected = torch.stack([model(x.flip(VIEWS[v]) if VIEWS[v] else x).softmax(-1) for v in views]).mean(0)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_a_multilabel_output_is_the_logit_of_each_findings_mean_sigmoid():
    model, x = Recorder(), torch.rand(3, 1, 8, 8)
    views = tta_views("fundus")
    probs = TTAModel(model, views, multilabel=True)(x).sigmoid()
    expected = torch.stack([model(x.flip(VIEWS[v]) if VIEWS[v] else x).sigmoid() for v in views]).mean(0)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_a_preset_without_flips_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="medtricks.tta"):
        _, views = wrap(Recorder(), "cxr")
    assert views == ("identity",) and "left/right anatomy" in caplog.text


def test_evaluate_and_predict_with_tta(phantoms_train, tmp_path):
    run = finetune("demo", data=phantoms_train, out=tmp_path / "run", overrides=[*FAST, "data.augment=fundus"])
    plain = evaluate(run, split="test")
    scored = evaluate(run, split="test", tta=True)
    assert scored["tta"] == ["identity", "hflip", "vflip", "hvflip"] and "tta" not in plain
    opened = open_run(run, device="cpu")
    opened.model = TTAModel(opened.model, tuple(scored["tta"]))
    val = opened.predict(opened.dataset(None, "val"))
    assert scored["threshold"] == choose_threshold(val.labels, val.probs, opened.recipe.train.threshold)
    test = opened.predict(opened.dataset(None, "test"))
    decided = (test.probs[:, 1] >= scored["threshold"]).astype(int)
    assert scored["accuracy"] == pytest.approx(np.mean(decided == test.labels))
    images = sorted(phantoms_train.rglob("*.dcm"))[:3]
    rows = predict(run, images, tta=True)
    with torch.inference_mode():
        from medtricks.data.images import read_image
        from medtricks.data.transforms import create_eval_transform
        transform = create_eval_transform(32, opened.info["crop_fraction"])
        for row, path in zip(rows, images, strict=True):
            image = transform(torch.from_numpy(read_image(path, 1)[0]))[None]
            p1 = opened.model(image).softmax(-1)[0, 1].item()
            assert row[f"p_{opened.classes[1]}"] == pytest.approx(p1, abs=1e-6)
            assert row["prediction"] == opened.classes[int(p1 >= scored["threshold"])]


def test_multilabel_evaluate_and_predict_with_tta(findings, tmp_path):
    from multilabel_data import FAST as ML_FAST
    from sklearn.metrics import roc_auc_score

    run = finetune("demo", data=findings, out=tmp_path / "run", overrides=[*ML_FAST, "train.epochs=2",
                                                                         "data.augment=fundus"])
    scored = evaluate(run, split="test", tta=True)
    assert scored["tta"] == ["identity", "hflip", "vflip", "hvflip"]
    opened = open_run(run, device="cpu")
    opened.model = TTAModel(opened.model, tuple(scored["tta"]), multilabel=True)
    val = opened.predict(opened.dataset(None, "val"))
    chosen = choose_thresholds(val.labels, val.probs, opened.recipe.train.threshold)
    assert scored["thresholds"] == dict(zip(opened.classes, chosen, strict=True))
    test = opened.predict(opened.dataset(None, "test"))
    assert scored["auroc"] == pytest.approx(roc_auc_score(test.labels, test.probs, average=None).mean())
    for k, finding in enumerate(opened.classes):
        decided = test.probs[:, k] >= chosen[k]
        assert scored["per_label"][finding]["accuracy"] == pytest.approx(np.mean(decided == test.labels[:, k]))
    images = sorted((findings / "images").glob("*.png"))[:3]
    rows = predict(run, images, tta=True)
    with torch.inference_mode():
        from medtricks.data.images import read_image
        from medtricks.data.transforms import create_eval_transform
        transform = create_eval_transform(32, opened.info["crop_fraction"])
        for row, path in zip(rows, images, strict=True):
            probs = opened.model(transform(torch.from_numpy(read_image(path, 1)[0]))[None]).sigmoid()[0]
            for k, finding in enumerate(opened.classes):
                assert row[f"p_{finding}"] == pytest.approx(probs[k].item(), abs=1e-6)
            found = [f for k, f in enumerate(opened.classes) if probs[k].item() >= chosen[k]]
            assert row["prediction"] == ("|".join(found) or "No Finding")


def _mean_over_flips(network, images, views, temperature):
    """softmax(log(mean over views of softmax(network(view))) / T), computed here from the bare network."""
    with torch.inference_mode():
        probs = torch.stack([network(images.flip(VIEWS[v]) if VIEWS[v] else images).float().softmax(-1)
                             for v in views]).mean(0)
        return (probs.log() / temperature).softmax(-1).numpy()


def test_a_tta_recipe_makes_the_averaged_model_the_runs_own(phantoms_train, tmp_path):
    from sklearn.metrics import roc_auc_score

    from medtricks.calibration import nll
    from medtricks.ensemble import ensemble
    from medtricks.explain import explain

    tta_recipe = [*FAST, "data.augment=dermoscopy", "train.tta=true", "data.split.seed=0"]
    runs = [finetune("demo", data=phantoms_train, out=tmp_path / "run0",  # calibrated, and not
                     overrides=[*tta_recipe, "train.calibrate=temperature"]),
            finetune("demo", data=phantoms_train, out=tmp_path / "run1", overrides=[*tta_recipe, "seed=1"])]
    info = json.loads((runs[0] / "model.json").read_text())
    views = ("identity", "hflip", "vflip", "hvflip")
    assert info["tta"] == list(views)
    opened = open_run(runs[0], device="cpu")
    assert isinstance(opened.model, TTAModel) and opened.model.views == views
    network, temperature = opened.model.model, info.get("temperature", 1.0)
    assert network.temperature == 1.0  # the temperature divides the averaged logits, where it was fitted
    val, test = (opened.dataset(None, split) for split in ("val", "test"))
    val_images, test_images = (torch.stack([ds[i]["image"] for i in range(len(ds))]) for ds in (val, test))
    val_labels, test_labels = (np.array([ds[i]["label"] for i in range(len(ds))]) for ds in (val, test))
    val_probs = _mean_over_flips(network, val_images, views, temperature)
    test_probs = _mean_over_flips(network, test_images, views, temperature)
    # the threshold is chosen on the averaged validation scores; the temperature is fitted on them (never raising
    # their NLL); the test report is of the averaged model, as is every later command's
    assert info["threshold"] == pytest.approx(choose_threshold(val_labels, val_probs, "youden"))
    calibration = info["calibration"]
    assert calibration["nll_after"] <= calibration["nll_before"]
    assert nll(val_labels, val_probs) == pytest.approx(calibration["nll_after"], abs=1e-5)
    report = json.loads((runs[0] / "report.json").read_text())["splits"]["test"]
    assert report["auroc"] == pytest.approx(roc_auc_score(test_labels, test_probs[:, 1]))
    for scored in (evaluate(runs[0], split="test"), evaluate(runs[0], split="test", tta=True)):  # not wrapped twice
        assert scored["tta"] == list(views) and scored["auroc"] == pytest.approx(report["auroc"])
        assert scored["threshold"] == info["threshold"]
    second = open_run(runs[1], device="cpu")  # uncalibrated: its threshold is still chosen on the averaged scores
    assert "temperature" not in second.info
    assert second.threshold == pytest.approx(choose_threshold(
        val_labels, _mean_over_flips(second.model.model, val_images, views, 1.0), "youden"))
    # an ensemble of two tta runs averages their averaged probabilities, and opens again as such
    both = ensemble(runs, out=tmp_path / "ens")
    members = [open_run(r, device="cpu") for r in runs]
    expected = np.mean([_mean_over_flips(m.model.model, test_images, views, m.info.get("temperature", 1.0))
                        for m in members], axis=0)
    with torch.inference_mode():
        got = open_run(both, device="cpu").model(test_images).softmax(-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # explain maps the network on the image as it is
    maps = explain(opened, sorted(phantoms_train.rglob("*.dcm"))[:2])
    assert maps.maps.shape[0] == 2 and np.isfinite(maps.maps).all()


def test_a_tta_recipe_needs_a_preset_with_flips():
    from medtricks.errors import RecipeError
    from medtricks.recipe import load_recipe

    for preset in ("cxr", "none"):
        with pytest.raises(RecipeError, match=r"train\.tta.*draws no flips"):
            load_recipe("demo", [f"data.augment={preset}", "train.tta=true"])
    assert load_recipe("demo", ["data.augment=fundus", "train.tta=true"]).train.tta
