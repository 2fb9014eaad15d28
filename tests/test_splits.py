from collections import Counter

import pytest

from medtricks.data.sources import Source, load_source
from medtricks.data.splits import assign_splits, find_leaks, split_source
from medtricks.errors import DataError
from medtricks.recipe import SplitConfig

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def _records(n_patients=100, per_patient=3, mixed_every=7):
    records = []
    for p in range(n_patients):
        for k in range(per_patient):
            label = p % 2 if (p % mixed_every or k == 0) else 1 - p % 2  # some patients in both classes
            records.append({"label": label, "patient_id": f"p{p}", "split": None, "key": f"{p}-{k}"})
    return records


def test_patient_level_no_leak_and_fractions():
    records = _records()
    splits = assign_splits(records, FRACTIONS, seed=0)
    assert find_leaks(records, splits) == {}
    pairs = list(zip(records, splits, strict=True))
    patients = {name: {r["patient_id"] for r, s in pairs if s == name} for name in FRACTIONS}
    assert [len(patients[n]) for n in FRACTIONS] == [70, 15, 15]


def test_stratified_by_label():
    records = [{"label": int(i < 40), "patient_id": None, "split": None, "key": str(i)} for i in range(200)]
    splits = assign_splits(records, FRACTIONS, seed=1)
    for name, fraction in FRACTIONS.items():
        counts = Counter(r["label"] for r, s in zip(records, splits, strict=True) if s == name)
        assert counts[1] == pytest.approx(40 * fraction, abs=1)
        assert counts[0] == pytest.approx(160 * fraction, abs=1)


def test_seeded_and_seed_dependent():
    records = _records()
    assert assign_splits(records, FRACTIONS, 5) == assign_splits(records, FRACTIONS, 5)
    assert assign_splits(records, FRACTIONS, 5) != assign_splits(records, FRACTIONS, 6)


def test_find_leaks_reports_patient_in_two_splits():
    records = [{"patient_id": "a"}, {"patient_id": "a"}, {"patient_id": "b"}, {"patient_id": None}]
    assert find_leaks(records, ["train", "test", "val", "val"]) == {"a": ["train", "test"]}


def test_source_splits_that_leak_are_an_error(tmp_path):
    records = [{"label": 0, "patient_id": "a", "split": "train", "key": "x"},
               {"label": 1, "patient_id": "a", "split": "val", "key": "y"}]
    with pytest.raises(DataError, match=r"1 patient\(s\) in two splits \(a in train\+val\)"):
        split_source(Source(tmp_path, "csv", ("0", "1"), records, True, True), SplitConfig(), 0)


def test_missing_val_is_carved_from_train_by_patient(tmp_path):
    records = _records(40, 2)
    for r in records:
        r["split"] = "test" if int(r["patient_id"][1:]) >= 30 else "train"
    indices, origin = split_source(Source(tmp_path, "csv", ("0", "1"), records, True, True), SplitConfig(), 0)
    assert "val carved from train" in origin
    assert len({records[i]["patient_id"] for i in indices["test"]}) == 10
    val = {records[i]["patient_id"] for i in indices["val"]}
    assert 3 <= len(val) <= 7 and not val & {records[i]["patient_id"] for i in indices["train"]}


def test_per_image_split_warns(tmp_path, caplog):
    records = [{"label": i % 2, "patient_id": None, "split": None, "key": str(i)} for i in range(20)]
    split_source(Source(tmp_path, "csv", ("0", "1"), records, False, False), SplitConfig(), 0)
    assert "no patient ids" in caplog.text


def test_nih_patient_level_split_has_no_leak():
    from conftest import shared

    source = load_source(shared("cxr-nih"))
    both = Counter()
    for rec in source.records:
        both[rec["patient_id"]] += 1
    assert sum(c > 1 for c in both.values()) > 0  # the set has patients with several images
    for seed in range(3):
        indices, origin = split_source(source, SplitConfig(), seed)
        assert "patient-level" in origin
        split_of = {i: name for name, idx in indices.items() for i in idx}
        assert find_leaks(source.records, [split_of[i] for i in range(len(source.records))]) == {}
        assert sum(len(v) for v in indices.values()) == 234
