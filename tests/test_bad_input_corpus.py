"""The bad-input corpus: each case through the CLI gives exit code 2, no traceback, and a message naming the key
or file and the problem; nothing is overwritten."""

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import nothing_lost
from medtricks.cli import app
from medtricks.models.backbones import create_model
from medtricks.models.weights import sha256_of
from medtricks.recipe import load_recipe
from medtricks.runs import save_weights

FAST = ["--set", "data.image_size=32", "--set", "data.workers=0", "--set", "train.epochs=1", "--set",
        "train.batch_size=8", "--set", "data.synth_if_missing=false"]


def _fake_run(folder, classes, source):
    """A finished-looking run directory (random weights, a report.json) without training: enough for attack and
    distillation."""
    folder.mkdir(parents=True)
    model = create_model("efficientnet_lite0", len(classes), 1, weights="none")
    save_weights(folder / "model.safetensors", model)
    info = {**model.describe(), "classes": list(classes), "image_size": 32, "channels": 1, "crop_fraction": 0.875,
            "threshold": 0.5, "data": {"source": str(source)}, "sha256": sha256_of(folder / "model.safetensors")}
    (folder / "model.json").write_text(json.dumps(info))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(load_recipe("demo", [  # as a real run records its classes
        "data.image_size=32", "data.workers=0", f"data.classes=[{', '.join(classes)}]"]).to_dict()))
    (folder / "report.json").write_text(json.dumps({"recipe": "demo", "classes": list(classes), "splits": {}}))
    return folder


def _copy(phantoms_train, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(phantoms_train, target)
    return target


def _first_dicom(folder):
    return sorted((folder / "images").rglob("*.dcm"))[0]


def _case_truncated(data, tmp_path):
    victim = _first_dicom(data)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 3 // 4])
    return ["finetune", "--data", str(data)], [victim.name, "truncated"]


def _case_corrupt(data, tmp_path):
    victim = _first_dicom(data)
    victim.write_text("this is not DICOM at all")
    return ["finetune", "--data", str(data)], [victim.name, "not DICOM"]


def _case_no_pixels(data, tmp_path):
    victim = _first_dicom(data)
    ds = pydicom.dcmread(victim)
    del ds.PixelData
    ds.save_as(victim)
    return ["finetune", "--data", str(data)], [victim.name, "no pixel data"]


def _case_multiframe(data, tmp_path):
    victim = _first_dicom(data)
    ds = pydicom.dcmread(victim)
    frames = np.stack([ds.pixel_array, ds.pixel_array])
    ds.set_pixel_data(frames, photometric_interpretation=ds.PhotometricInterpretation, bits_stored=ds.BitsStored)
    ds.save_as(victim)
    return ["finetune", "--data", str(data)], [victim.name, "multi-frame"]


def _case_label_outside(data, tmp_path):
    lines = (data / "labels.csv").read_text().splitlines()
    lines[1] = lines[1].replace(",normal,", ",effusion,").replace(",opacity,", ",effusion,")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    return ["finetune", "--data", str(data)], ["'effusion'", "labels.csv line 2", "data.classes"]


def _case_duplicate(data, tmp_path):
    lines = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([*lines, lines[1]]) + "\n")
    return ["finetune", "--data", str(data)], ["duplicate path"]


def _case_single_class(data, tmp_path):
    lines = (data / "labels.csv").read_text().splitlines()
    kept = [lines[0], *[line for line in lines[1:] if ",normal," in line]]
    (data / "labels.csv").write_text("\n".join(kept) + "\n")
    return ["finetune", "--data", str(data)], ["at least two classes"]


def _case_bomb(data, tmp_path, monkeypatch=None):
    folder = tmp_path / "pngs"
    for name in ("normal", "opacity"):
        (folder / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.zeros((120, 120), np.uint8)).save(folder / name / f"{k}.png")
    return ["finetune", "--data", str(folder)], ["too large", "0.png"]


def _case_teacher_classes(data, tmp_path):
    teacher = _fake_run(tmp_path / "teacher", ("a", "b", "c"), data)
    return ["finetune", "--data", str(data), "--set", f"tricks.distillation={{teacher: '{teacher}'}}"], [
        "tricks.distillation.teacher", "classes"]


def _case_attack_other_classes(data, tmp_path):
    run = _fake_run(tmp_path / "run", ("normal", "opacity"), data)
    pets = tmp_path / "pets"
    for name in ("cat", "dog"):
        (pets / name).mkdir(parents=True)
        Image.new("L", (40, 40)).save(pets / name / "a.png")
    return ["attack", str(run), "--pgd", "--eps", "2/255", "--data", str(pets), "--split", "all"], [
        "outside the recipe's classes", "cat"]


def _case_unwritable_out(data, tmp_path):
    (tmp_path / "a_file").write_text("x")
    return ["finetune", "--data", str(data), "--out", str(tmp_path / "a_file" / "run")], ["cannot create"]


def _case_existing_out(data, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "report.json").write_text("{}")
    return ["finetune", "--data", str(data), "--out", str(tmp_path / "taken")], ["already exists"]


FILE_CASES = [_case_truncated, _case_corrupt, _case_no_pixels, _case_multiframe, _case_label_outside,
              _case_duplicate, _case_single_class, _case_bomb, _case_teacher_classes, _case_attack_other_classes,
              _case_unwritable_out, _case_existing_out]
SET_CASES = [
    (["--set", "train.lrr=1"], ["train.lrr", "valid keys"]),
    (["--set", "train.epochs=ten"], ["train.epochs", "int"]),
    (["--set", "train.lr=-0.1"], ["train.lr", "> 0"]),
    (["--set", "model.arch=vgg16"], ["model.arch", "resnet50"]),
    (["--set", "tricks.warmupp={}"], ["tricks.warmupp", "warmup"]),
    (["--set", "model.weights=imagenet21k"], ["model.weights", "imagenet21k"]),
    (["--set", "attack.eps=[2.0]"], ["attack.eps", "(0, 1]"]),
    (["--set", "data.channels=2"], ["data.channels"]),
    (["--set", "data.split.train=0.9"], ["sum to 1"]),
    (["--recipe", "no_such_recipe"], ["unknown recipe", "demo"]),
    (["--set", "data.classes=[normal, '', opacity]"], ["data.classes", "empty name"]),
    (["--set", "attack.seed=-5"], ["attack.seed", "[0, 2^32)"]),
    (["--set", "train.batch_size=99999999999999999999999999999"], ["train.batch_size", "out of range", "2^32"]),
    (["--set", "train.eval_batch_size=-99999999999999999999999"], ["train.eval_batch_size", "out of range"]),
]


def _run(args, tmp_path, watch=None):
    """The bad command through the CLI: exit 2, no traceback, and no file under `watch` (default tmp_path: the case's
    data, runs and outputs) changed, removed or added."""
    out = [] if "--out" in args or args[0] != "finetune" else ["--out", str(tmp_path / "new_run")]
    extra = FAST if args[0] == "finetune" else []
    with nothing_lost(watch or tmp_path):
        result = CliRunner().invoke(app, [args[0], *extra, *args[1:], *out])  # the case's own --set wins
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.mark.parametrize("make", FILE_CASES, ids=[c.__name__.removeprefix("_case_") for c in FILE_CASES])
def test_bad_files_and_runs(make, phantoms_train, tmp_path, monkeypatch):
    if make is _case_bomb:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 120 x 120 = 14400 > 2 x 1000: a "bomb"
    data = _copy(phantoms_train, tmp_path)
    args, words = make(data, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    output = _run(args, tmp_path)
    for word in words:
        assert word in output, (word, output)
    assert {p: p.read_bytes() for p in before} == before  # nothing overwritten


@pytest.mark.parametrize("args, words", SET_CASES, ids=[" ".join(a) for a, _ in SET_CASES])
def test_bad_recipe_values(args, words, phantoms_train, tmp_path):
    output = _run(["finetune", "--data", str(phantoms_train), *(["--recipe", "demo"] if "--recipe" not in args
                                                                else []), *args], tmp_path)
    for word in words:
        assert word in output, (word, output)


def test_nan_loss_via_cli(phantoms_train, tmp_path, monkeypatch):
    import medtricks.train as train

    monkeypatch.setattr(train, "label_smoothing_loss", lambda logits, *a, **k: logits.sum() * float("nan"))
    output = _run(["finetune", "--data", str(phantoms_train)], tmp_path, watch=phantoms_train)  # the run stays
    assert "nan" in output and "epoch 1, step 1" in output and "train.lr" in output


def test_attack_eps_out_of_range(phantoms_train, tmp_path):
    run = _fake_run(tmp_path / "run", ("normal", "opacity"), phantoms_train)
    for eps, word in (("2", "(0, 1]"), ("0", "> 0"), ("-1/255", "> 0"), ("2/255,2/255", "given twice")):
        output = _run(["attack", str(run), "--pgd", "--eps", eps], tmp_path)
        assert word in output, output


def test_disk_full_keeps_what_was_written(phantoms_train, tmp_path, monkeypatch):
    import errno

    write_bytes = Path.write_bytes

    def full(self, data):
        if "model.safetensors" in self.name:  # the first weights file of epoch 1 meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    output = _run(["finetune", "--data", str(phantoms_train), "--out", str(tmp_path / "run")], tmp_path,
                  watch=phantoms_train)
    assert "disk is full" in output and "model.safetensors" in output and "--resume" in output
    assert (tmp_path / "run" / "recipe.yaml").is_file()  # what was written before stays
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]  # no half files left behind


def test_resume_bad_targets(phantoms_train, tmp_path):
    finished = _fake_run(tmp_path / "finished", ("normal", "opacity"), phantoms_train)
    assert "nothing to resume" in _run(["finetune", "--out", str(finished), "--resume"], tmp_path)
    assert "existing run directory" in _run(["finetune", "--out", str(tmp_path / "nope"), "--resume"], tmp_path)


def test_corpus_has_at_least_twenty_cases():
    assert len(FILE_CASES) + len(SET_CASES) + 4 >= 20
