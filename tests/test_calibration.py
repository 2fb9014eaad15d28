"""Temperature scaling (issue 18, part 4): the fit lowers validation NLL and never raises it, leaves every ranking
(AUROC) as it was, and a calibrated run applies its temperature wherever it is opened."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtricks.calibration import fit_temperature, nll, temper
from medtricks.finetune import evaluate, finetune
from medtricks.runs import RunError, open_run

FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=2",
        "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1"]


def softmax_scores(n: int, classes: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities softmax(scale * z) of noisy logits z: scale > 1 overconfident, < 1 underconfident."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), labels] += 1.0
    z = scale * logits
    return labels, np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("scale, direction", [(4.0, 1), (0.3, -1)])
def test_temperature_undoes_over_and_underconfidence_and_keeps_the_ranking(scale, direction, classes):
    labels, probs = softmax_scores(2000, classes, scale, seed=0)
    fit = fit_temperature(labels, probs)
    assert np.sign(np.log(fit["temperature"])) == direction  # T > 1 softens, T < 1 sharpens
    assert fit["temperature"] == pytest.approx(scale, rel=0.15)  # the logits were scaled by `scale`
    assert fit["nll_after"] < fit["nll_before"] == pytest.approx(nll(labels, probs))
    assert fit["nll_after"] == pytest.approx(nll(labels, probs, fit["temperature"]))
    tempered = temper(probs, fit["temperature"])
    assert np.array_equal(tempered.argmax(1), probs.argmax(1))  # decisions (and accuracy) unchanged
    if classes == 2:  # p1 is a monotone function of p1: the binary AUROC cannot move (one-vs-rest AUROCs can, a bit)
        assert roc_auc_score(labels, tempered[:, 1]) == roc_auc_score(labels, probs[:, 1])
    assert temper(tempered, 1 / fit["temperature"]) == pytest.approx(probs, abs=1e-9)


def test_the_fit_never_raises_the_nll_it_was_fitted_on():
    for seed in range(20):
        labels, probs = softmax_scores(30, 2, 1.0, seed)  # small, often already calibrated
        fit = fit_temperature(labels, probs)
        assert fit["nll_after"] <= fit["nll_before"]
        if fit["temperature"] == 1.0:
            assert fit["nll_after"] == fit["nll_before"]


def test_a_fit_that_would_raise_the_nll_keeps_t_1(monkeypatch):
    import types

    from medtricks import calibration
    labels, probs = softmax_scores(500, 2, 1.0, seed=1)
    worse = types.SimpleNamespace(x=np.log(20.0), fun=nll(labels, probs, 20.0))  # an optimizer gone wrong
    monkeypatch.setattr(calibration, "minimize_scalar", lambda *args, **kwargs: worse)
    assert fit_temperature(labels, probs) == {"temperature": 1.0, "nll_before": nll(labels, probs),
                                              "nll_after": nll(labels, probs)}


def test_a_calibrated_run_applies_its_temperature_wherever_it_is_opened(phantoms_train, tmp_path):
    plain = finetune("demo", data=phantoms_train, out=tmp_path / "plain", overrides=FAST)
    calibrated = finetune("demo", data=phantoms_train, out=tmp_path / "calibrated",
                          overrides=[*FAST, "train.calibrate=temperature"])
    info = json.loads((calibrated / "model.json").read_text())
    fit = info["calibration"]
    assert info["temperature"] == fit["temperature"] != 1.0 and fit["nll_after"] < fit["nll_before"]
    reports = {name: json.loads((run / "report.json").read_text())["splits"] for name, run in
               (("plain", plain), ("calibrated", calibrated))}
    for split in ("val", "test"):  # the same seed trains the same weights: only the confidence moved
        assert reports["calibrated"][split]["auroc"] == pytest.approx(reports["plain"][split]["auroc"], abs=1e-9)
        assert reports["calibrated"][split]["ece_before"] == pytest.approx(reports["plain"][split]["ece"], abs=1e-6)
        assert "ece_before" not in reports["plain"][split]
    again = evaluate(calibrated, split="val")  # opened from disk: the temperature comes with the model
    assert {k: again[k] for k in ("accuracy", "auroc", "ece")} == {
        k: reports["calibrated"]["val"][k] for k in ("accuracy", "auroc", "ece")}
    opened = open_run(calibrated, device="cpu")
    assert opened.model.temperature == info["temperature"]
    assert (calibrated / "plots" / "reliability_val_before.png").is_file()

    info["temperature"] = -1.0
    (calibrated / "model.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="temperature -1.0"):
        open_run(calibrated, device="cpu")


def test_calibrate_takes_only_known_methods():
    from medtricks.errors import RecipeError
    from medtricks.recipe import load_recipe_from_dict
    assert load_recipe_from_dict({"name": "t"}, ["train.calibrate=temperature"]).train.calibrate == "temperature"
    with pytest.raises(RecipeError, match="train.calibrate.*temperature"):
        load_recipe_from_dict({"name": "t"}, ["train.calibrate=platt"])
