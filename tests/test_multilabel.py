"""Multi-label classification (data.task: multilabel): manifests and .npz with several findings per image, the BCE
loss and its tricks, per-finding metrics and thresholds, and finetune / evaluate / predict end to end on phantoms
with two planted, independent findings (a bright square, a dark stripe)."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multilabel_data import FAST, FINDINGS, write_manifest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import shared
from medtricks.data.sources import LabelFormat, load_source
from medtricks.data.splits import assign_splits, find_leaks
from medtricks.errors import DataError, RecipeError
from medtricks.finetune import evaluate, finetune, predict
from medtricks.multilabel import choose_thresholds, compute_multilabel_metrics
from medtricks.recipe import DataConfig, TricksConfig, build_dataclass, load_recipe
from medtricks.runs import open_run
from medtricks.train import create_loss, mix_batch
from medtricks.tricks.class_balance import label_pos_weights
from medtricks.tricks.label_smoothing import binary_label_smoothing_loss
from medtricks.tricks.mixup import MixupConfig, mix_probability_gate, mixup_batch

ML = LabelFormat(multilabel=True)


# --- data ---------------------------------------------------------------------------------------------------------

def test_manifest_multi_hot_with_separator_and_no_finding(tmp_path):
    folder = write_manifest(tmp_path / "a", [("1.png", "Pneumonia|Infiltration", "p1"),
                                             ("2.png", " Infiltration ", "p2"),
                                             ("3.png", "No Finding", "p3"),
                                             ("4.png", "Effusion|Pneumonia|Pneumonia", "p3")])
    source = load_source(folder, labels=ML)
    assert source.multilabel and source.classes == ("Effusion", "Infiltration", "Pneumonia")  # sorted findings
    assert [r["label"] for r in source.records] == [(0, 1, 1), (0, 1, 0), (0, 0, 0), (1, 0, 1)]
    assert [r["patient_id"] for r in source.records] == ["p1", "p2", "p3", "p3"]
    given = load_source(folder, ["Pneumonia", "Infiltration", "Effusion"], labels=ML)  # the recipe's order
    assert [r["label"] for r in given.records] == [(1, 1, 0), (0, 1, 0), (0, 0, 0), (1, 0, 1)]
    other = write_manifest(tmp_path / "b", [("1.png", "A;B", "p1"), ("2.png", "none", "p2")],
                           header=("path", "findings", "patient_id"))
    fmt = LabelFormat(multilabel=True, column="findings", separator=";", no_finding="none")
    assert [r["label"] for r in load_source(other, labels=fmt).records] == [(1, 1), (0, 0)]
    assert load_source(folder).classes[0] == "Effusion|Pneumonia|Pneumonia"  # single-label reads whole cells


@pytest.mark.parametrize("label, words", [
    ("Pneumonia|Hernia", ["labels.csv line 3", "Hernia", "data.classes"]),
    ("", ["labels.csv line 3", "empty label", "No Finding"]),
    ("No Finding|Pneumonia", ["labels.csv line 3", "together with findings"]),
    ("|", ["labels.csv line 3", "empty label", "only the separator"]),
    (" | ", ["labels.csv line 3", "empty label", "only the separator"]),
])
def test_manifest_label_errors_name_the_row(tmp_path, label, words):
    folder = write_manifest(tmp_path, [("1.png", "Pneumonia", "p1"), ("2.png", label, "p2")])
    with pytest.raises(DataError) as info:
        load_source(folder, ["Pneumonia", "Infiltration"], labels=ML)
    for word in words:
        assert word in str(info.value)


def test_class_folders_refused_for_multilabel(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "x.png")
    with pytest.raises(DataError, match="multilabel needs a CSV manifest"):
        load_source(tmp_path, labels=ML)


def test_npz_multi_hot_labels(tmp_path):
    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], np.uint8)
    np.savez(tmp_path / "m.npz", train_images=np.zeros((3, 4, 4), np.uint8), train_labels=labels,
             val_images=np.zeros((1, 4, 4), np.uint8), val_labels=np.array([[0, 1, 1]]))
    source = load_source(tmp_path / "m.npz", labels=ML)
    assert source.multilabel and source.classes == ("0", "1", "2")
    assert [r["label"] for r in source.records] == [(1, 0, 1), (0, 0, 0), (0, 1, 0), (0, 1, 1)]
    assert load_source(tmp_path / "m.npz", ["a", "b", "c"], labels=ML).classes == ("a", "b", "c")
    with pytest.raises(DataError, match="3 columns"):
        load_source(tmp_path / "m.npz", ["a", "b"], labels=ML)
    with pytest.raises(DataError, match="data.task: multilabel"):
        load_source(tmp_path / "m.npz")  # single-label still refuses (N, L) labels, saying what to set
    np.savez(tmp_path / "bad.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0, 2], [1, 0]]))
    with pytest.raises(DataError, match="other than 0 and 1"):
        load_source(tmp_path / "bad.npz", labels=ML)


def test_split_is_patient_grouped_and_spreads_the_rare_finding():
    rng = np.random.default_rng(0)
    records = []
    for patient in range(100):
        rare = patient % 10 == 0  # 10 patients with the rare finding, all with the frequent one
        for _ in range(2):
            records.append({"label": (int(rare), int(rare or rng.random() < 0.5)), "patient_id": f"p{patient}"})
    splits = assign_splits(records, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    assert find_leaks(records, splits) == {}
    pairs = list(zip(records, splits, strict=True))
    rare_patients = {s: len({r["patient_id"] for r, sp in pairs if sp == s and r["label"][0]})
                     for s in ("train", "val", "test")}
    assert rare_patients == {"train": 6, "val": 2, "test": 2}  # stratified on the rarest finding
    assert assign_splits(records, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=1) == splits


def test_nih_finding_labels_load_as_multilabel():
    folder = shared("cxr-nih")
    config = build_dataclass(DataConfig, {"task": "multilabel", "label_column": "finding_labels"}, "data")
    source = load_source(folder, labels=LabelFormat.of(config))
    assert source.multilabel and "No Finding" not in source.classes
    assert {"Pneumonia", "Infiltration", "Atelectasis"} <= set(source.classes)
    with open(folder / "labels.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    for rec in source.records:
        cell = rows[rec["key"]]["finding_labels"]
        named = set() if cell == "No Finding" else set(cell.split("|"))
        assert {c for c, v in zip(source.classes, rec["label"], strict=True) if v} == named
    assert sum(r["label"][source.classes.index("Pneumonia")] for r in source.records) == 121


def test_chest_xray14_recipe_trains_on_the_real_nih_findings(tmp_path):
    folder = shared("cxr-nih")
    run = finetune("chest_xray14", data=folder, out=tmp_path / "run",
                   overrides=["data.label_column=finding_labels", "data.image_size=32", "train.epochs=1",
                              "train.batch_size=16", "data.workers=0", "train.limit_train_batches=3"])
    report = json.loads((run / "report.json").read_text())
    recipe = load_recipe("chest_xray14")
    assert recipe.data.task == "multilabel" and len(recipe.data.classes) == 14
    per_label = report["splits"]["test"]["per_label"]
    assert list(per_label) == list(recipe.data.classes)
    assert per_label["Hernia"]["auroc"] is None  # no Hernia image in the shared subset: null, never NaN
    assert per_label["Pneumonia"]["auroc"] is not None
    assert json.loads(json.dumps(report, allow_nan=False)) == report


# --- recipe -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["data.task=multi"], ["data.task", "multilabel"]),
    (["data.task=multilabel", "tricks.class_balance={mode: sampler}"], ["tricks.class_balance.mode", "multilabel"]),
    (["data.task=multilabel", "train.calibrate=temperature"], ["train.calibrate", "multilabel"]),
    (["data.task=multilabel", "tricks.distillation={teacher: runs/x}"], ["tricks.distillation", "multilabel"]),
    (["data.task=multilabel", "data.ordinal=true"], ["data.ordinal"]),
    (["data.task=multilabel", "data.classes=[a, No Finding]"], ["data.no_finding", "data.classes"]),
    (["data.label_separator=' '"], ["data.label_separator"]),
    # a separator inside the no-finding name made every negative row positive for invented findings 'N' and 'A'
    (["data.task=multilabel", "data.label_separator=/", "data.no_finding=N/A"], ["data.no_finding", "'/'"]),
    (["data.task=multilabel", "data.classes=['square|x', stripe]"], ["data.classes", "square|x", "'|'"]),
])
def test_recipe_refuses_what_multilabel_does_not_support(overrides, words):
    with pytest.raises(RecipeError) as info:
        load_recipe("demo", overrides)
    for word in words:
        assert word in str(info.value)
    recipe = load_recipe("demo", ["data.task=multilabel", "tricks.class_balance={mode: loss}"])
    assert recipe.data.multilabel and recipe.data.label_separator == "|" and recipe.data.no_finding == "No Finding"
    assert not load_recipe("demo").data.multilabel  # the default stays single-label


# --- loss and tricks ----------------------------------------------------------------------------------------------

def test_bce_loss_with_smoothing_and_pos_weight_matches_formula():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()
    pos_weight = torch.tensor([1.0, 3.0, 0.5])
    eps = 0.2
    smooth = target * (1 - eps) + eps / 2
    p = logits.sigmoid()
    reference = -(pos_weight * smooth * p.log() + (1 - smooth) * (1 - p).log()).mean()
    torch.testing.assert_close(binary_label_smoothing_loss(logits, target, eps, pos_weight), reference)
    tricks = build_dataclass(TricksConfig, {"label_smoothing": {"smoothing": eps}}, "tricks")
    loss = create_loss(tricks, pos_weight, multilabel=True)
    torch.testing.assert_close(loss(logits, target, None), reference)
    plain = create_loss(TricksConfig(), multilabel=True)
    torch.testing.assert_close(plain(logits, target, None), F.binary_cross_entropy_with_logits(logits, target))


def test_pos_weights_are_negatives_over_positives():
    labels = [(1, 0, 0), (1, 1, 0), (0, 0, 0), (1, 0, 0)]
    torch.testing.assert_close(label_pos_weights(labels), torch.tensor([1 / 3, 3.0, 1.0]))  # no positive: 1


def test_mixup_mixes_multi_hot_targets_as_they_are():
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]).float()
    tricks = TricksConfig(mixup=MixupConfig(alpha=1.0))
    mixed, targets = mix_batch(images, labels, 2, tricks, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)  # the same draws by hand: the gate, lam, the pairing
    assert mix_probability_gate(1.0, generator)
    expected_images, expected_targets = mixup_batch(images, labels, 1.0, generator)
    torch.testing.assert_close(targets, expected_targets)
    torch.testing.assert_close(mixed, expected_images)
    assert targets.shape == (4, 2) and not torch.equal(targets, labels)  # mixed multi-hot rows, still per finding


# --- metrics ------------------------------------------------------------------------------------------------------

def test_metrics_per_label_match_sklearn_and_absent_label_is_null():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 3))
    y[:, 2] = 0  # a finding absent from this split
    p = np.clip(y * 0.3 + rng.random((80, 3)) * 0.7, 0, 1)
    ids = [f"pt{i // 2}" for i in range(80)]
    thresholds = choose_thresholds(y, p, "youden")
    m = compute_multilabel_metrics(y, p, ids, thresholds, n_boot=200, seed=0, names=["a", "b", "c"])
    reference = roc_auc_score(y[:, :2], p[:, :2], average=None)
    assert [m["per_label"][k]["auroc"] for k in ("a", "b")] == pytest.approx(reference)
    assert m["per_label"]["c"]["auroc"] is None and m["per_label"]["c"]["auroc_ci95"] is None
    assert m["auroc"] == pytest.approx(reference.mean())  # the mean over findings with both classes
    lo, hi = m["auroc_ci95"]
    assert lo < m["auroc"] < hi
    assert m["per_label"]["c"]["balanced_accuracy"] is None  # the mean recall of two classes, one of them absent
    for key in ("accuracy", "balanced_accuracy", "f1", "ece"):  # means over the findings where the metric is defined
        assert m[key] == pytest.approx(np.mean([v for k in "abc" if (v := m["per_label"][k][key]) is not None]))
    decided = (p[:, 0] >= thresholds[0]).astype(int)
    assert m["per_label"]["a"]["accuracy"] == pytest.approx(np.mean(decided == y[:, 0]))
    assert m["per_label"]["a"]["threshold"] == thresholds[0] and m["thresholds"] == thresholds
    json.dumps(m, allow_nan=False)  # null, never NaN


# --- end to end ---------------------------------------------------------------------------------------------------

def test_finetune_learns_both_findings(ml_run):
    report = json.loads((ml_run / "report.json").read_text())
    assert report["task"] == "multilabel" and report["classes"] == FINDINGS
    test = report["splits"]["test"]
    assert set(test["per_label"]) == set(FINDINGS)
    for name in FINDINGS:
        m = test["per_label"][name]
        assert m["auroc"] > 0.9, (name, m)
        assert set(m) >= {"n", "accuracy", "balanced_accuracy", "auroc", "auroc_ci95", "sensitivity", "specificity",
                          "f1", "ece", "threshold"}
    assert test["auroc"] == pytest.approx(np.mean([test["per_label"][n]["auroc"] for n in FINDINGS]))
    info = json.loads((ml_run / "model.json").read_text())
    assert info["task"] == "multilabel" and info["threshold"] is None
    assert set(info["thresholds"]) == set(FINDINGS)
    assert all(test["per_label"][n]["threshold"] == info["thresholds"][n] for n in FINDINGS)
    rows = [json.loads(line) for line in (ml_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(r["val_loss"]) and r["val_auroc"] is not None for r in rows)
    json.loads((ml_run / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))


def test_loss_tricks_train_a_multilabel_run(findings, tmp_path, caplog):
    """label smoothing, per-finding pos_weight and mixup/cutmix on multi-hot targets, in one short run."""
    tricks = ["tricks.class_balance={mode: loss}", "tricks.mixup={}", "tricks.cutmix={}", "train.epochs=1",
              "train.limit_train_batches=2"]
    with caplog.at_level("INFO", logger="medtricks.tricks.class_balance"):
        run = finetune("demo", data=findings, out=tmp_path / "tricks", overrides=FAST + tricks)
    assert "pos_weight" in caplog.text
    report = json.loads((run / "report.json").read_text())
    assert set(report["train"]["tricks"]) >= {"label_smoothing", "mixup", "cutmix", "class_balance"}
    assert report["splits"]["val"]["per_label"]["square"]["n"] == report["splits"]["val"]["n"]


def test_evaluate_reproduces_report_and_matches_sklearn(ml_run):
    report = json.loads((ml_run / "report.json").read_text())
    for split in ("val", "test"):
        again = evaluate(ml_run, split=split)
        assert {k: again[k] for k in report["splits"][split]} == report["splits"][split]
    opened = open_run(ml_run, "cpu")
    output = opened.predict(opened.dataset(None, "test"))
    assert output.labels.shape == output.probs.shape == (report["splits"]["test"]["n"], 2)
    per_label = roc_auc_score(output.labels, output.probs, average=None)
    assert [report["splits"]["test"]["per_label"][n]["auroc"] for n in FINDINGS] == pytest.approx(per_label)


def test_predict_writes_a_probability_per_finding_and_the_set(ml_run, findings, tmp_path):
    images = sorted((findings / "images").iterdir())[:12]
    rows = predict(ml_run, images, out_csv=tmp_path / "p.csv")
    assert (tmp_path / "p.csv").read_text().startswith("path,prediction,p_square,p_stripe,error")
    thresholds = json.loads((ml_run / "model.json").read_text())["thresholds"]
    for row in rows:
        assert not row["error"] and 0 <= row["p_square"] <= 1 and 0 <= row["p_stripe"] <= 1
        found = [n for n in FINDINGS if row[f"p_{n}"] >= thresholds[n]]
        assert row["prediction"] == ("|".join(found) if found else "No Finding")
    assert len({r["prediction"] for r in rows}) > 1
    copy = shutil.copytree(ml_run, tmp_path / "copy")  # the run's own thresholds decide, not 0.5
    info = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**info, "thresholds": {"square": 0.0, "stripe": 0.0}}))
    assert {r["prediction"] for r in predict(copy, images)} == {"square|stripe"}


def test_corrupt_reports_mean_accuracy_and_auroc_over_findings(ml_run, tmp_path):
    from medtricks.corruption_report import corruption_report

    report = corruption_report(ml_run, split="val", corruptions=["gaussian_noise", "contrast"], severities=(1, 5),
                               json_path=tmp_path / "c.json", device="cpu")
    assert report["task"] == "multilabel" and len(report["results"]) == 4
    opened = open_run(ml_run, "cpu")
    output = opened.predict(opened.dataset(None, "val"))
    thresholds = json.loads((ml_run / "model.json").read_text())["thresholds"]
    right = (output.probs >= [thresholds[n] for n in FINDINGS]) == output.labels  # each finding at its threshold
    assert report["clean"]["accuracy"] == pytest.approx(right.mean(), abs=1 / right.size + 1e-9)
    assert report["clean"]["auroc"] == pytest.approx(roc_auc_score(output.labels, output.probs, average=None).mean())
    for row in report["results"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["auroc"] <= 1
    noise = {r["severity"]: r for r in report["results"] if r["corruption"] == "gaussian_noise"}
    assert noise[5]["auroc"] < report["clean"]["auroc"]  # seen: 0.998 clean, 0.75 at severity 5
    assert report["mce"] == pytest.approx(np.mean([1 - r["accuracy"] for r in report["results"]]))


def test_ensemble_averages_sigmoids_and_chooses_thresholds_again(ml_run, findings, tmp_path):
    from medtricks.ensemble import ensemble

    weak = finetune("demo", data=findings, out=tmp_path / "weak", overrides=[*FAST, "train.epochs=1"])  # same split
    folder = ensemble([ml_run, weak], out=tmp_path / "ens", device="cpu")
    info = json.loads((folder / "model.json").read_text())
    assert info["task"] == "multilabel" and info["threshold"] is None and list(info["thresholds"]) == FINDINGS
    outputs = {}
    for run in (ml_run, weak, folder):
        opened = open_run(run, "cpu")
        outputs[run] = {split: opened.predict(opened.dataset(None, split)) for split in ("val", "test")}
    for split in ("val", "test"):
        mean = (outputs[ml_run][split].probs + outputs[weak][split].probs) / 2
        np.testing.assert_allclose(outputs[folder][split].probs, mean, atol=1e-6)
    val = outputs[folder]["val"]
    assert [info["thresholds"][n] for n in FINDINGS] == pytest.approx(choose_thresholds(val.labels, val.probs))
    report = json.loads((folder / "report.json").read_text())
    test = outputs[folder]["test"]
    assert report["task"] == "multilabel" and list(report["splits"]["test"]["per_label"]) == FINDINGS
    assert [report["splits"]["test"]["per_label"][n]["auroc"] for n in FINDINGS] == pytest.approx(
        roc_auc_score(test.labels, test.probs, average=None))
    again = evaluate(folder, split="test")  # the ensemble opens like a run
    assert {k: again[k] for k in report["splits"]["test"]} == report["splits"]["test"]


def test_a_separator_inside_the_no_finding_name_is_refused_for_any_source(tmp_path):
    """`data check --label-separator / --no-finding N/A` builds the label format without a recipe."""
    from medtricks.data.sources import LabelFormat

    with pytest.raises(DataError, match="data.no_finding 'N/A' contains the label separator '/'"):
        LabelFormat(multilabel=True, separator="/", no_finding="N/A")
    assert LabelFormat(multilabel=False, separator="/", no_finding="N/A").no_finding == "N/A"  # single-label: unused


def test_the_mean_auroc_has_no_interval_when_every_finding_averaged_has_a_class_of_one_patient():
    """Round 10: the only rankable finding's positives were one patient's; its own interval was null, the mean's
    [1.0, 1.0]. A second finding with two patients per class brings the mean's interval back."""
    from medtricks.multilabel import compute_multilabel_metrics

    rng = np.random.default_rng(0)
    patients = [f"p{i}" for i in range(8)] + ["q", "q"]
    a = np.array([0] * 8 + [1, 1])  # positives: patient q only
    probs_a = np.clip(0.2 + 0.6 * a + rng.uniform(-0.15, 0.15, 10), 0, 1)
    one = compute_multilabel_metrics(a[:, None], probs_a[:, None], patients, n_boot=300, names=["a"])
    assert one["per_label"]["a"]["auroc_ci95"] is None and one["auroc_ci95"] is None
    b = np.array([0, 1] * 5)  # two or more patients in each class
    probs_b = np.clip(0.3 + 0.4 * b + rng.uniform(-0.3, 0.3, 10), 0, 1)
    both = compute_multilabel_metrics(np.c_[a, b], np.c_[probs_a, probs_b], patients, n_boot=300, names=["a", "b"])
    lo, hi = both["auroc_ci95"]
    assert lo < hi
