"""Ordinal decoding (issue 18, part 2): grade cuts on the expected grade tuned on validation for weighted kappa, the
same cut rule in every command that decides (report, evaluate, predict, attack, corrupt), and refusals naming keys."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import cohen_kappa_score

from medtricks.attacks import GradeCuts, class_probabilities
from medtricks.errors import RecipeError
from medtricks.finetune import evaluate, finetune, predict
from medtricks.metrics import compute_metrics
from medtricks.recipe import load_recipe_from_dict
from medtricks.runs import RunError, open_run
from medtricks.tricks.ordinal_decoding import check_cuts, expected_grade, fit_grade_cuts, grade_decisions


def shrunk_grades(n: int, seed: int, grades: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a model that ranks grades well but pulls its expected grade toward the middle
    (as a model trained on imbalanced grades does): rounding the expected grade under-calls the extreme grades."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, grades, n)
    centre = (grades - 1) / 2 + 0.45 * (labels - (grades - 1) / 2) + rng.normal(0, 0.25, n)
    logits = -((np.arange(grades)[None] - centre[:, None]) ** 2) / 0.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return labels, probs / probs.sum(1, keepdims=True)


def test_cuts_raise_validation_kappa_over_rounding_and_lie_between_scores():
    labels, probs = shrunk_grades(300, seed=0)
    cuts = fit_grade_cuts(labels, probs)
    rounded = np.rint(expected_grade(probs)).astype(int)
    fitted = grade_decisions(probs, cuts)
    assert cohen_kappa_score(labels, fitted, weights="quadratic") > \
        cohen_kappa_score(labels, rounded, weights="quadratic") + 0.02
    assert check_cuts(cuts, 5) == cuts and np.all(np.diff(cuts) > 0)
    scores = np.sort(np.unique(expected_grade(probs)))
    for cut in cuts:  # a moved cut sits halfway between two adjacent distinct validation scores
        if cut not in (0.5, 1.5, 2.5, 3.5):
            k = np.searchsorted(scores, cut)
            assert cut == pytest.approx((scores[k - 1] + scores[k]) / 2)
    linear = fit_grade_cuts(labels, probs, "linear")
    assert cohen_kappa_score(labels, grade_decisions(probs, linear), weights="linear") >= \
        cohen_kappa_score(labels, rounded, weights="linear")


def test_cuts_never_lower_the_kappa_they_were_fitted_on():
    for seed in range(15):
        labels, probs = shrunk_grades(40, seed, grades=4)
        before = cohen_kappa_score(labels, grade_decisions(probs, [0.5, 1.5, 2.5]), weights="quadratic")
        after = cohen_kappa_score(labels, grade_decisions(probs, fit_grade_cuts(labels, probs)), weights="quadratic")
        assert after >= before - 1e-12


def test_one_grade_keeps_the_rounding_cuts(caplog):
    probs = np.tile([0.9, 0.1, 0.0], (10, 1))  # every label and decision grade 0: kappa is 0 / 0
    assert fit_grade_cuts(np.zeros(10, int), probs) == [0.5, 1.5]
    assert "undefined" in caplog.text


def test_grade_decisions_cut_the_expected_grade_and_a_score_on_a_cut_takes_the_higher_grade():
    probs = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0.6, 0.4], [0, 0, 1.0]])  # E = 0, 0.5, 1.4, 2
    assert grade_decisions(probs, [0.5, 1.4]).tolist() == [0, 1, 2, 2]
    assert grade_decisions(probs, [0.6, 1.5]).tolist() == [0, 0, 1, 2]


@pytest.mark.parametrize("bad", [[1.5, 0.5], [0.5], [0.5, np.nan], [-0.1, 1.0], [0.5, 2.5], [1.0, 1.0]])
def test_bad_cuts_are_refused(bad):
    with pytest.raises(ValueError, match="grade cuts"):
        check_cuts(bad, 3)


def test_metrics_decide_by_the_cuts_and_keep_auroc_and_ece():
    labels, probs = shrunk_grades(200, seed=3)
    cuts = fit_grade_cuts(labels, probs)
    argmax = compute_metrics(labels, probs, n_boot=0, ordinal=True)
    decoded = compute_metrics(labels, probs, threshold=cuts, n_boot=0, ordinal=True)
    assert decoded["auroc"] == argmax["auroc"] and decoded["ece"] == argmax["ece"]
    assert decoded["accuracy"] == pytest.approx(np.mean(grade_decisions(probs, cuts) == labels))
    assert decoded["kappa_quadratic"] == pytest.approx(
        cohen_kappa_score(labels, grade_decisions(probs, cuts), weights="quadratic"))
    assert decoded["threshold"] == cuts


def test_grade_cut_scores_decide_like_the_rule_and_keep_the_probabilities():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x = torch.randn(200, 3, 2, 2)
    probs = net(x).softmax(1).detach().numpy()
    cuts = [0.7, 1.6, 2.2, 3.1]
    model = GradeCuts(net, cuts)
    with torch.no_grad():
        scores = model(x)
    assert np.array_equal(scores.argmax(1).numpy(), grade_decisions(probs, cuts))
    assert np.allclose(class_probabilities(model, x, scores), probs, atol=1e-6)
    on_cut = GradeCuts(net, [float(expected_grade(probs[:1])[0]), 3.5, 3.7, 3.9])
    assert on_cut(x[:1]).argmax(1).item() == 1  # E == cut_1: grade 1, the run's rule


def test_the_trick_needs_ordinal_grades_and_names_its_keys():
    with pytest.raises(RecipeError, match="tricks.ordinal_decoding.*data.ordinal"):
        load_recipe_from_dict({"name": "t", "tricks": {"ordinal_decoding": {}}})
    with pytest.raises(RecipeError, match="tricks.ordinal_decoding.weights"):
        load_recipe_from_dict({"name": "t", "data": {"ordinal": True},
                               "tricks": {"ordinal_decoding": {"weights": "cubic"}}})
    recipe = load_recipe_from_dict({"name": "t", "data": {"ordinal": True}, "tricks": {"ordinal_decoding": {}}})
    assert recipe.tricks.ordinal_decoding.weights == "quadratic"


def graded_fundus(path, seed: int = 0, grades: int = 5):
    """A RetinaMNIST-shaped .npz whose grade sets the brightness of a central disc (noisy, so grades overlap)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    disc = ((yy - 14) ** 2 + (xx - 14) ** 2 < 60)[None, :, :, None]
    arrays = {}
    for split, n in (("train", 160), ("val", 60), ("test", 60)):
        labels = rng.integers(0, grades, n)
        level = 40 + 35 * labels + rng.normal(0, 18, n)
        images = rng.normal(60, 10, (n, 28, 28, 3)) + disc * level[:, None, None, None]
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


FAST = ["data.image_size=32", "data.workers=0", "train.epochs=4", "train.batch_size=16", "train.eval_batch_size=32",
        "train.optimizer=adamw", "train.lr=0.002", "train.weight_decay=0", "tricks.linear_scaling=null",
        "tricks.amp=null", "tricks.ema=null", "tricks.ordinal_decoding={}"]


def test_a_decoded_run_decides_by_its_cuts_in_every_command(tmp_path):
    run = finetune("fundus_dr", data=graded_fundus(tmp_path / "graded.npz"), out=tmp_path / "run", overrides=FAST)
    info = json.loads((run / "model.json").read_text())
    cuts = info["grade_cuts"]
    assert check_cuts(cuts, 5) == cuts and info["threshold"] is None
    report = json.loads((run / "report.json").read_text())["splits"]
    opened = open_run(run, "cpu")
    assert opened.threshold == cuts
    test = opened.predict(opened.dataset(split="test"))
    decided = grade_decisions(test.probs, cuts)
    assert len(set(decided.tolist())) > 1  # a model that decides more than one grade
    assert report["test"]["accuracy"] == pytest.approx(np.mean(decided == test.labels))
    assert report["test"]["kappa_quadratic"] == pytest.approx(
        cohen_kappa_score(test.labels, decided, weights="quadratic"))
    again = evaluate(run, split="test")
    assert {k: again[k] for k in ("accuracy", "auroc", "kappa_quadratic")} == {
        k: report["test"][k] for k in ("accuracy", "auroc", "kappa_quadratic")}

    from medtricks.robustness import attack
    attacked = attack(run, options={"eps": (8 / 255,), "steps": 3}, checks=False, device="cpu")
    assert attacked["clean"]["accuracy"] == pytest.approx(report["test"]["accuracy"])
    assert attacked["clean"]["auroc"] == pytest.approx(report["test"]["auroc"])
    assert attacked["results"][0]["accuracy"] < attacked["clean"]["accuracy"]  # the attack moves E across cuts

    images = tmp_path / "imgs"
    images.mkdir()
    pixels = np.load(tmp_path / "graded.npz")["test_images"][:8]
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(images / f"{i}.png")
    rows = predict(run, [images])
    probs = np.array([[row[f"p_{c}"] for c in opened.classes] for row in rows])  # rounded to 6 decimals
    clear = np.abs(expected_grade(probs)[:, None] - np.array(cuts)[None]).min(1) > 1e-4
    assert clear.sum() >= 6
    assert [row["prediction"] for row, c in zip(rows, clear, strict=True) if c] == [
        opened.classes[k] for k, c in zip(grade_decisions(probs, cuts), clear, strict=True) if c]


def test_damaged_grade_cuts_are_named(tmp_path):
    run = finetune("fundus_dr", data=graded_fundus(tmp_path / "graded.npz"), out=tmp_path / "run",
                   overrides=[*FAST, "train.epochs=1"])
    info = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**info, "grade_cuts": [2.0, 1.0, 3.0, 3.5]}))
    with pytest.raises(RunError, match="grade_cuts"):
        open_run(run, "cpu")


def test_corruption_reports_decide_by_the_cuts_and_rank_by_the_probabilities():
    from medtricks.corruption_report import evaluate_corruptions

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    images, labels = torch.rand(64, 3, 8, 8), torch.arange(64) % 4
    probs = net(images).softmax(1).detach().numpy()
    cuts = [0.5, 1.4, 1.6]
    loader = [{"image": images[i:i + 16], "label": labels[i:i + 16]} for i in range(0, 64, 16)]
    report = evaluate_corruptions(GradeCuts(net, cuts), loader, ["gaussian_noise"], (1,), seed=0)
    assert report["clean"]["accuracy"] == pytest.approx(np.mean(grade_decisions(probs, cuts) == labels.numpy()))
    assert report["clean"]["accuracy"] != pytest.approx(np.mean(probs.argmax(1) == labels.numpy()))
    assert report["clean"]["auroc"] == pytest.approx(compute_metrics(labels.numpy(), probs, n_boot=0)["auroc"])
