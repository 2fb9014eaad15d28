"""A run's split is re-made from its source by every command that reads it (evaluate, attack, corrupt, compare,
ensemble, finetune --resume). A source that changed since training (rows appended by a hospital, a row relabelled)
would be split differently with the same seed: a "test" split holding images the model was trained on, with exit 0
and no warning. model.json records each split's size and digest, and a split that no longer matches is refused."""

import importlib
import json
import shutil

import pytest

from medtricks.errors import DataError
from medtricks.finetune import evaluate, finetune
from medtricks.runs import RunError, open_run

FAST = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=2",
        "train.batch_size=8", "train.eval_batch_size=32", "train.lr=0.05"]


def _grown_source(phantoms_train, folder):
    """A copy of the phantoms whose labels.csv lists the images of two thirds of the patients; returns it and the rows
    of the other patients (what the hospital appends later)."""
    shutil.copytree(phantoms_train, folder)
    header, *rows = (folder / "labels.csv").read_text().splitlines()
    patients = sorted({row.split(",")[2] for row in rows})
    first = set(patients[:len(patients) * 2 // 3])
    (folder / "labels.csv").write_text("\n".join([header, *(r for r in rows if r.split(",")[2] in first)]) + "\n")
    return [r for r in rows if r.split(",")[2] not in first]


@pytest.fixture(scope="module")
def drifting(phantoms_train, tmp_path_factory):
    base = tmp_path_factory.mktemp("drift")
    extra = _grown_source(phantoms_train, base / "data")
    run = finetune("demo", data=base / "data", out=base / "run", overrides=FAST)
    return base, run, extra


def test_a_source_that_grew_or_was_relabelled_is_refused_not_split_again(drifting, tmp_path, caplog):
    base, run, extra = drifting
    digest = json.loads((run / "model.json").read_text())["data"]["split_digest"]
    assert set(digest) == {"train", "val", "test"} and all(len(d["sha256"]) == 64 for d in digest.values())
    assert evaluate(run, split="test")["n"] == digest["test"]["n"]
    labels = base / "data" / "labels.csv"
    original = labels.read_text()
    test_keys = {r["key"] for r in open_run(run, "cpu").dataset(split="test").store.records}
    try:
        labels.write_text(original + "\n".join(extra) + "\n")
        with pytest.raises(DataError, match=rf"the test split now holds \d+ images, {digest['test']['n']} when the "
                                            r"run was trained, .*source changed"):
            evaluate(run, split="test")
        with pytest.raises(DataError, match="the source changed since"):
            evaluate(run, data=base / "data", split="val")  # the run's own source, named again
        with pytest.raises(DataError, match="the source changed since"):  # the same source, as its labels.csv
            evaluate(run, data=base / "data" / "labels.csv", split="test")
        copy = tmp_path / "copy"
        shutil.copytree(base / "data", copy)  # moved to another disk, grown: a warning (it could be another set)
        with caplog.at_level("WARNING"):
            evaluate(run, data=copy, split="test")
        assert "so this is not the run's test split: if the source is a copy" in caplog.text
        grown = finetune("demo", data=base / "data", out=tmp_path / "grown-run", overrides=FAST)
        from medtricks.ensemble import EnsembleError, ensemble
        with pytest.raises(EnsembleError, match="data.split_digest"):  # same settings, other images in each split
            ensemble([run, grown], out=tmp_path / "ens")
        # the new images alone are an external set: nothing the run saw
        external = tmp_path / "new.csv"
        external.write_text("path,label,patient_id,photometric\n" + "\n".join(
            str(base / "data" / r.split(",")[0]) + "," + ",".join(r.split(",")[1:]) for r in extra) + "\n")
        assert evaluate(run, data=external, split="all")["n"] == len(extra)

        header, *rows = original.splitlines()
        one = next(i for i, r in enumerate(rows) if r.split(",")[0] in test_keys)  # relabel one test image
        swap = {"normal": "opacity", "opacity": "normal"}
        cells = rows[one].split(",")
        rows[one] = ",".join([cells[0], swap[cells[1]], *cells[2:]])
        labels.write_text("\n".join([header, *rows]) + "\n")
        with pytest.raises(DataError, match="the source changed since"):
            evaluate(run, split="test")
    finally:
        labels.write_text(original)


def test_a_run_of_an_older_version_without_the_record_is_read_as_before(drifting, tmp_path, caplog):
    base, run, _ = drifting
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    info = json.loads((old / "model.json").read_text())
    del info["data"]["split_digest"]
    (old / "model.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        assert evaluate(old, data=base / "data", split="test")["n"] > 0
    assert "the run records no digest of its test split" in caplog.text
    info["data"]["split_digest"] = {"test": {"n": "many", "sha256": 3}}
    (old / "model.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="data.split_digest"):
        open_run(old, "cpu")


def test_resume_on_a_source_that_changed_is_refused(phantoms_train, tmp_path, monkeypatch):
    ft = importlib.import_module("medtricks.finetune")  # the package also exports the function finetune
    extra = _grown_source(phantoms_train, tmp_path / "data")
    real = ft.save_resume_state

    def stop_after_one_epoch(run, state):
        real(run, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_resume_state", stop_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune("demo", data=tmp_path / "data", out=tmp_path / "run", overrides=FAST)
    monkeypatch.setattr(ft, "save_resume_state", real)
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text(labels.read_text() + "\n".join(extra) + "\n")
    with pytest.raises(RunError, match="changed since training began .*the train split now holds"):
        finetune(None, out=tmp_path / "run", resume=True)
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_changed_split_is_described_by_its_size_or_as_other_images():
    from medtricks.data.splits import changed_splits

    then = {"test": {"n": 5, "sha256": "a" * 64}, "val": {"n": 4, "sha256": "b" * 64}}
    assert changed_splits(then, {"test": {"n": 5, "sha256": "a" * 64}}) == []
    assert changed_splits(then, {"test": {"n": 7, "sha256": "c" * 64}}) == [
        "the test split now holds 7 images, 5 when the run was trained"]
    assert changed_splits(then, {"val": {"n": 4, "sha256": "c" * 64}}) == [
        "the val split now holds other images than when the run was trained (as many, 4)"]
    assert changed_splits(None, {"val": {"n": 4, "sha256": "c" * 64}}) == []  # a run from before the record


def test_ablate_does_not_reuse_units_trained_before_the_data_changed(phantoms_train, tmp_path):
    from medtricks.ablate import AblationError, ablate

    extra = _grown_source(phantoms_train, tmp_path / "data")
    settings = dict(data=tmp_path / "data", out=tmp_path / "abl", seeds=1, tricks=["warmup"],
                    overrides=[*FAST, "train.epochs=1", "tricks.warmup={epochs: 1}"])
    ablate("demo", **settings)
    events = []
    ablate("demo", **settings, on_run=events.append)  # unchanged data: every unit reused
    assert {e["status"] for e in events if e.get("done")} == {"reused"}
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text(labels.read_text() + "\n".join(extra) + "\n")
    with pytest.raises(AblationError, match=r"runs/reference/seed-0: the data .* changed since this unit was trained"):
        ablate("demo", **settings)


def test_a_file_gone_missing_is_named_with_the_changed_split(drifting):
    base, run, _ = drifting
    key = next(iter(open_run(run, "cpu").dataset(split="test").store.records))["key"]
    image = base / "data" / key
    aside = image.with_name(image.name + ".aside")
    image.rename(aside)
    try:
        with pytest.raises(DataError, match=rf"1 listed file\(s\) are missing now \('{key}'\)"):
            evaluate(run, split="test")
    finally:
        aside.rename(image)


def test_a_distillation_teacher_with_another_split_of_the_same_source_is_refused(drifting, tmp_path):
    """A teacher trained with another split seed had most of the student's test images in its train split."""
    base, run, _ = drifting  # the teacher: split seed 0 of base/data
    with pytest.raises(RunError, match=r"tricks.distillation.teacher .*trained on another split of .*--seed"):
        finetune("demo", data=base / "data", out=tmp_path / "student", seed=1,
                 overrides=[*FAST, "train.epochs=1", f"tricks.distillation={{teacher: '{run}'}}"])
    assert not (tmp_path / "student" / "report.json").exists()
