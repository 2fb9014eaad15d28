"""medtricks compare: two runs on the same images, tested with medtricks.stats exactly as the runs decide."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.compare import _auroc, compare, compare_multilabel_predictions, compare_predictions
from medtricks.data.pipeline import load_eval_data
from medtricks.devices import place_model
from medtricks.errors import MedtricksError
from medtricks.finetune import finetune
from medtricks.recipe import load_recipe_from_dict
from medtricks.runs import load_run_model, read_run
from medtricks.scoring import predict_loader
from medtricks.stats import delong_test, mcnemar_test, paired_bootstrap

runner = CliRunner()
TINY = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.batch_size=8", "train.eval_batch_size=16", "train.lr=0.1"]


@pytest.fixture(scope="module")
def two_runs(phantoms_train, tmp_path_factory):
    """The demo recipe with and without warmup, same seed (so the same split)."""
    root = tmp_path_factory.mktemp("compare")
    a = finetune("demo", data=phantoms_train, out=root / "a", overrides=TINY)
    b = finetune("demo", data=phantoms_train, out=root / "b", overrides=[*TINY, "tricks.warmup=null"])
    return a, b


def sk_auroc(labels, probs):
    """sklearn's AUROC (macro one-vs-rest for 2-D probs); ValueError without every class, so the bootstrap skips the
    replicate (this sklearn returns NaN with a warning instead)."""
    if len(np.unique(labels)) < (probs.shape[1] if probs.ndim == 2 else 2):
        raise ValueError("a class is absent")
    return roc_auc_score(labels, probs, multi_class="ovr", average="macro") if probs.ndim == 2 else \
        roc_auc_score(labels, probs)


def predictions(run, split="val"):
    """(labels, probs, patient ids, threshold) of a run on its own split, computed here without medtricks.compare."""
    model, info = load_run_model(run)
    recipe = load_recipe_from_dict(read_run(run)[1])
    dataset, _ = load_eval_data(recipe.data, info["data"]["source"], split, recipe.seed, tuple(info["classes"]))
    # in the layout medtricks evaluates in: a probability at the threshold decides by its last bit
    output = predict_loader(place_model(model, torch.device("cpu")), DataLoader(dataset, batch_size=16), "cpu")
    return output.labels, output.probs, output.patient_ids, info["threshold"]


def test_compare_equals_the_stats_on_the_predictions(two_runs):
    a, b = two_runs
    result = compare(a, b)
    labels, probs_a, patients, threshold_a = predictions(a)
    labels_b, probs_b, _, threshold_b = predictions(b)
    assert np.array_equal(labels, labels_b) and result["n"] == len(labels)
    assert result["auroc"]["delong"] == delong_test(labels, probs_a[:, 1], probs_b[:, 1])
    assert not np.allclose(probs_a, probs_b)  # two different models (their AUROCs may tie, e.g. on one thread)
    correct_a = (probs_a[:, 1] >= threshold_a) == labels
    correct_b = (probs_b[:, 1] >= threshold_b) == labels
    assert result["accuracy"]["mcnemar"] == mcnemar_test(correct_a, correct_b)
    assert result["auroc"]["bootstrap"]["difference"] == pytest.approx(sk_auroc(labels, probs_a[:, 1])
                                                                       - sk_auroc(labels, probs_b[:, 1]))
    # resampling the patients (sklearn's AUROC against the fast one: test_compare_predictions_multiclass...)
    assert result["auroc"]["bootstrap"] == paired_bootstrap(labels, probs_a, probs_b, _auroc, groups=patients)
    assert result["patients"] == len(set(patients)) < len(labels)  # phantoms have patients with several images
    for run, side in ((a, "a"), (b, "b")):  # the same decisions and AUROC as report.json
        val = json.loads((run / "report.json").read_text())["splits"]["val"]
        assert result[side]["accuracy"] == pytest.approx(val["accuracy"])
        assert result[side]["auroc"] == pytest.approx(val["auroc"])


def test_compare_predictions_multiclass_and_missing_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    probs_a = rng.dirichlet(np.ones(3), 120)
    probs_a[np.arange(120), labels] += 1.0
    probs_a /= probs_a.sum(1, keepdims=True)
    probs_b = rng.dirichlet(np.ones(3), 120)
    groups = [f"p{i // 3}" for i in range(120)]
    result = compare_predictions(labels, probs_a, probs_b, groups=groups, n_boot=300)
    assert result["auroc"]["delong"] is None
    assert result["auroc"]["bootstrap"]["difference"] == pytest.approx(
        sk_auroc(labels, probs_a) - sk_auroc(labels, probs_b))
    assert result["auroc"]["bootstrap"]["ci95"] == pytest.approx(
        paired_bootstrap(labels, probs_a, probs_b, sk_auroc, groups=groups, n_boot=300)["ci95"])
    assert result["accuracy"]["mcnemar"] == mcnemar_test(probs_a.argmax(1) == labels, probs_b.argmax(1) == labels)
    binary = compare_predictions(labels % 2, probs_a[:, :2], probs_b[:, :2], groups=groups, n_boot=300)
    reference = paired_bootstrap(labels % 2, probs_a[:, 1], probs_b[:, 1], sk_auroc, groups=groups, n_boot=300)
    for key in ("difference", "ci95", "replicates"):
        assert binary["auroc"]["bootstrap"][key] == pytest.approx(reference[key])
    one_class = compare_predictions(np.zeros(10, int), probs_a[:10], probs_b[:10])
    assert one_class["auroc"]["delong"] is None and one_class["a"]["auroc"] is None and one_class["auroc"]["note"]
    one_positive = compare_predictions(np.r_[np.zeros(9, int), 1], probs_a[:10, :2], probs_b[:10, :2])
    assert one_positive["auroc"]["delong"] is None and "two images of each class" in one_positive["auroc"]["note"]


def test_cli_compare_writes_json(two_runs, tmp_path):
    from medtricks.data.synth import synthesize

    a, b = two_runs
    result = runner.invoke(app, ["compare", str(a), str(b), "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    assert "DeLong" in result.output and "McNemar" in result.output
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["split"] == "val" and saved["classes"] == ["normal", "opacity"]
    external = tmp_path / "external"
    synthesize(external, n=12, seed=7, size=48)
    result = runner.invoke(app, ["compare", str(a), str(b), "--data", str(external), "--split", "all"])
    assert result.exit_code == 0, result.output
    assert "12 images (all of " in result.output


def _fake_run(run, tmp_path, name, file, key, value):
    """A copy of `run` whose model.json or recipe.yaml says something else at `key`."""
    fake = tmp_path / name
    shutil.copytree(run, fake, ignore=shutil.ignore_patterns("plots"))
    data = (json.loads if file == "model.json" else yaml.safe_load)((fake / file).read_text())
    data[key] = value
    (fake / file).write_text(json.dumps(data) if file == "model.json" else yaml.safe_dump(data))
    if key == "classes":  # a run of another task names its classes in report.json and recipe.yaml too (open_run
        report = json.loads((fake / "report.json").read_text())  # checks that they agree)
        (fake / "report.json").write_text(json.dumps({**report, "classes": value}))
        recipe = yaml.safe_load((fake / "recipe.yaml").read_text())
        recipe["data"]["classes"] = value
        (fake / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return fake


def test_other_classes_or_other_split_exit_2(two_runs, tmp_path):
    a, b = two_runs
    pets = _fake_run(b, tmp_path, "pets", "model.json", "classes", ["cat", "dog"])
    result = runner.invoke(app, ["compare", str(a), str(pets)])
    assert result.exit_code == 2 and "same classes" in result.output and "Traceback" not in result.output
    other_seed = _fake_run(b, tmp_path, "seed1", "recipe.yaml", "seed", 1)
    with pytest.raises(MedtricksError, match="recipe.yaml seed or data.split was edited"):  # its recorded split
        compare(a, other_seed)
    result = runner.invoke(app, ["compare", str(a), str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a finished medtricks run" in result.output


# --- multi-label runs (the session's ml_run: two planted findings) ---------------------------------------------------

@pytest.fixture(scope="module")
def ml_pair(ml_run, findings, tmp_path_factory):
    """ml_run (4 epochs) and a weaker run of the same recipe and seed (1 epoch: the same split)."""
    from multilabel_data import FAST

    weak = finetune("demo", data=findings, out=tmp_path_factory.mktemp("ml_compare") / "weak",
                    overrides=[*FAST, "train.epochs=1"])
    return ml_run, weak


def sk_mean_auroc(labels, probs):
    """Mean of sklearn's per-finding AUROC over the findings with both classes in these labels."""
    both = [j for j in range(labels.shape[1]) if len(np.unique(labels[:, j])) == 2]
    if not both:
        raise ValueError("no finding has both classes")
    return float(np.mean(roc_auc_score(labels[:, both], probs[:, both], average=None)))


def test_holm_adjust_by_hand():
    from medtricks.stats import holm_adjust

    # sorted 0.01, 0.03, 0.04 of 3 tests: 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04); None is no test
    assert holm_adjust([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06])
    assert holm_adjust([0.5, 0.9]) == [1.0, 1.0] and holm_adjust([None]) == [None]


def test_compare_multilabel_predictions_with_a_rare_and_an_untestable_finding():
    """A finding on 3 of 60 images is missing from many bootstrap replicates: the mean is then over the others (not
    a skipped replicate); a finding on 1 image has no DeLong test and leaves the Holm family."""
    rng = np.random.default_rng(1)
    labels = np.zeros((60, 3), int)
    labels[:, 0] = rng.integers(0, 2, 60)
    labels[[5, 20, 41], 1] = 1
    labels[7, 2] = 1
    probs_a = np.clip(0.4 * labels + 0.6 * rng.random((60, 3)), 0, 1)
    probs_b = rng.random((60, 3))
    groups = [f"p{i // 2}" for i in range(60)]
    result = compare_multilabel_predictions(labels, probs_a, probs_b, groups=groups, names=["a", "rare", "one"],
                                            n_boot=300)
    reference = paired_bootstrap(labels, probs_a, probs_b, sk_mean_auroc, groups=groups, n_boot=300)
    boot = result["auroc"]["bootstrap"]
    assert boot["difference"] == pytest.approx(reference["difference"])
    assert boot["ci95"] == pytest.approx(reference["ci95"]) and boot["replicates"] == reference["replicates"] == 300
    assert result["per_label"]["one"]["delong"] is None and "two of each class" in result["per_label"]["one"]["note"]
    assert result["per_label"]["one"]["p_holm"] is None and result["multiple_comparisons"]["tests"] == 2
    assert result["per_label"]["rare"]["a"]["auroc"] == pytest.approx(roc_auc_score(labels[:, 1], probs_a[:, 1]))


def test_multilabel_compare_per_finding_delong_and_mean_auroc_bootstrap(ml_pair):
    a, b = ml_pair
    result = compare(a, b)
    labels, probs_a, patients, _ = predictions(a)
    labels_b, probs_b, _, _ = predictions(b)
    assert np.array_equal(labels, labels_b) and labels.shape == (result["n"], 2)
    assert result["task"] == "multilabel" and list(result["per_label"]) == ["square", "stripe"]
    for side, probs in (("a", probs_a), ("b", probs_b)):
        reference = roc_auc_score(labels, probs, average=None)  # per finding
        assert [result["per_label"][n][side]["auroc"] for n in ("square", "stripe")] == pytest.approx(reference)
        assert result[side]["auroc"] == pytest.approx(reference.mean())
    for j, name in enumerate(("square", "stripe")):
        delong = result["per_label"][name]["delong"]
        assert delong == delong_test(labels[:, j], probs_a[:, j], probs_b[:, j])
    from medtricks.stats import holm_adjust

    p_values = [result["per_label"][n]["delong"]["p_value"] for n in ("square", "stripe")]
    assert [result["per_label"][n]["p_holm"] for n in ("square", "stripe")] == holm_adjust(p_values)
    assert result["multiple_comparisons"]["method"] == "holm" and result["multiple_comparisons"]["tests"] == 2
    boot = result["auroc"]["bootstrap"]
    assert boot["difference"] == pytest.approx(result["a"]["auroc"] - result["b"]["auroc"])
    assert boot["difference"] > 0  # 4 epochs against 1
    assert boot["replicates"] >= 1900 and boot["ci95"][0] < boot["difference"] < boot["ci95"][1]
    # the interval resamples patients and averages the findings with both classes in each replicate (sklearn's AUROC
    # in the reference; 300 replicates, for time)
    few = compare_multilabel_predictions(labels, probs_a, probs_b, groups=patients, n_boot=300)["auroc"]["bootstrap"]
    reference = paired_bootstrap(labels, probs_a, probs_b, sk_mean_auroc, groups=patients, n_boot=300)
    assert few["ci95"] == pytest.approx(reference["ci95"]) and few["replicates"] == reference["replicates"]
    thresholds = json.loads((a / "model.json").read_text())["thresholds"]
    right = (probs_a >= [thresholds["square"], thresholds["stripe"]]) == labels  # each finding at its threshold
    assert result["per_label"]["square"]["a"]["accuracy"] == pytest.approx(right[:, 0].mean())
    assert result["a"]["exact_match"] == pytest.approx(right.all(axis=1).mean())
    val = json.loads((a / "report.json").read_text())["splits"]["val"]
    assert result["a"]["accuracy"] == pytest.approx(val["accuracy"]) and result["a"]["auroc"] == pytest.approx(
        val["auroc"])
    json.dumps(result, allow_nan=False)


def test_multilabel_compare_of_a_run_with_its_copy_finds_nothing(ml_run, tmp_path):
    copy = shutil.copytree(ml_run, tmp_path / "copy", ignore=shutil.ignore_patterns("attacks"))
    result = compare(ml_run, copy)
    for m in result["per_label"].values():
        assert m["delong"]["difference"] == 0 and m["delong"]["p_value"] == 1.0 and m["p_holm"] == 1.0
    assert result["auroc"]["bootstrap"]["difference"] == 0 and result["auroc"]["bootstrap"]["ci95"] == [0.0, 0.0]
    assert result["exact_match"]["mcnemar"]["p_value"] == 1.0


def test_multilabel_cli_compare_table_json_and_other_findings_exit_2(ml_pair, tmp_path):
    a, b = ml_pair
    result = runner.invoke(app, ["compare", str(a), str(b), "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    for words in ("per finding", "Holm", "square", "stripe", "mean AUROC A - B", "exact McNemar"):
        assert words in result.output, words
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["task"] == "multilabel" and set(saved["per_label"]) == {"square", "stripe"}
    other = _fake_run(b, tmp_path, "blob", "model.json", "classes", ["square", "blob"])
    info = json.loads((other / "model.json").read_text())
    info["thresholds"] = {"square": 0.5, "blob": 0.5}
    (other / "model.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["compare", str(a), str(other)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "different findings" in result.output and "['stripe']" in result.output and "['blob']" in result.output
    result = runner.invoke(app, ["compare", str(a), str(ml_pair[0].parent)])  # not a run at all
    assert result.exit_code == 2
