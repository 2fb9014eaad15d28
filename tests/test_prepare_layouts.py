"""`medtricks data prepare` of the challenge releases (IDRiD grading, ISIC 2016 Part 3) on copies of
their official layouts built here (file and folder names, CSV headers and quirks, tiny real JPEGs), the labels.csv
checked row by row and read back through medtricks' own loader with the matching recipe's classes."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import nothing_lost
from medtricks.cli import app
from medtricks.data import public
from medtricks.data.images import read_image
from medtricks.data.sources import load_source

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _classes(recipe: str) -> tuple[str, ...]:
    return tuple(str(c) for c in yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())["data"]["classes"])


def _jpeg(path: Path, value: int, rgb: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3) if rgb else (12, 16), value, np.uint8)).save(path, format="JPEG")


def _prepare(name: str, raw: Path, out: Path, *extra: str):
    with nothing_lost(raw):
        return runner.invoke(app, ["data", "prepare", name, str(raw), "--out", str(out), *extra])


def _rows(out: Path) -> list[dict]:
    with open(out / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def _refused(result, out: Path, words: list[str]) -> None:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    for word in words:
        assert word in text, (word, text)
    assert not out.exists()  # nothing written: not even the folder


# ---- IDRiD "B. Disease Grading" ----------------------------------------------------------------------------------

GRADING = "B. Disease Grading"
TRAIN_CSV = "2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv"
TEST_CSV = "2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv"
# as published: a trailing space in the last header name, empty trailing columns, empty rows at the end
IDRID_HEADER = "Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,,"
IDRID_TRAIN = ["IDRiD_001,3,2,,,,,,,,,", "IDRiD_002,0,0,,,,,,,,,", "IDRiD_003,4,1,,,,,,,,,"]  # 003: no image file
IDRID_TEST = ["IDRiD_001,1,0,,,,,,,,,", "IDRiD_002,2,2,,,,,,,,,"]  # testing images reuse the training names


def _idrid_raw(raw: Path) -> Path:
    root = raw / GRADING
    (root / "2. Groundtruths").mkdir(parents=True)
    (root / TRAIN_CSV).write_text("\r\n".join([IDRID_HEADER, *IDRID_TRAIN, ",,,,,,,,,,,", ",,,,,,,,,,,"]) + "\r\n")
    (root / TEST_CSV).write_text("\r\n".join([IDRID_HEADER, *IDRID_TEST, ",,,,,,,,,,,"]) + "\r\n")
    for name, value in (("IDRiD_001", 30), ("IDRiD_002", 60), ("IDRiD_099", 90)):  # 099: graded by no row
        _jpeg(root / "1. Original Images/a. Training Set" / f"{name}.jpg", value)
    for name, value in (("IDRiD_001", 120), ("IDRiD_002", 150)):
        _jpeg(root / "1. Original Images/b. Testing Set" / f"{name}.jpg", value)
    return raw


def test_prepare_idrid_grading_row_by_row(tmp_path, cache):
    raw = _idrid_raw(tmp_path / "IDRiD")
    result = _prepare("idrid-grading", raw, tmp_path / "out")
    assert result.exit_code == 0, result.output
    images = (raw / GRADING / "1. Original Images").resolve()
    assert _rows(tmp_path / "out") == [  # no patient_id column: IDRiD publishes none
        {"path": str(images / "a. Training Set/IDRiD_001.jpg"), "label": "3", "split": "train",
         "label_name": "severe_NPDR", "dme_grade": "2", "image_id": "train/IDRiD_001"},
        {"path": str(images / "a. Training Set/IDRiD_002.jpg"), "label": "0", "split": "train",
         "label_name": "no_DR", "dme_grade": "0", "image_id": "train/IDRiD_002"},
        {"path": str(images / "b. Testing Set/IDRiD_001.jpg"), "label": "1", "split": "test",
         "label_name": "mild_NPDR", "dme_grade": "0", "image_id": "test/IDRiD_001"},
        {"path": str(images / "b. Testing Set/IDRiD_002.jpg"), "label": "2", "split": "test",
         "label_name": "moderate_NPDR", "dme_grade": "2", "image_id": "test/IDRiD_002"},
    ]
    text = " ".join(result.output.split())
    assert "left out: 1 graded images whose file" in text and "left out: 1 image files that no row" in text
    # the fundus_dr recipe reads it: classes "0".."4", the official split, images one by one (no patient ids)
    source = load_source(tmp_path / "out", _classes("fundus_dr"))
    assert [r["label"] for r in source.records] == [3, 0, 1, 2]
    assert [r["split"] for r in source.records] == ["train", "train", "test", "test"]
    assert source.has_splits and not source.has_patient_ids
    assert read_image(source.records[2]["image"], channels=3)[0].shape == (3, 12, 16)
    # RAW_DIR may also be the "B. Disease Grading" folder itself
    inner = _prepare("idrid-grading", raw / GRADING, tmp_path / "out2")
    assert inner.exit_code == 0, inner.output
    assert _rows(tmp_path / "out2") == _rows(tmp_path / "out")


@pytest.mark.parametrize("damage, words", [
    (lambda root: (root / TEST_CSV).unlink(), ["b. IDRiD_Disease Grading_Testing Labels.csv", "missing"]),
    (lambda root: (root / TRAIN_CSV).write_text("Image name,Risk of macular edema \nIDRiD_001,2\n"),
     ["'Retinopathy grade'", "missing"]),
    (lambda root: shutil.rmtree(root / "1. Original Images/b. Testing Set"), ["b. Testing Set", "missing"]),
    (lambda root: (root / TRAIN_CSV).write_text(IDRID_HEADER + "\nIDRiD_001,5,2\n"), ["'Retinopathy grade'", "'5'"]),
])
def test_prepare_idrid_grading_refuses_a_wrong_layout(tmp_path, cache, damage, words):
    raw = _idrid_raw(tmp_path / "IDRiD")
    damage(raw / GRADING)
    _refused(_prepare("idrid-grading", raw, tmp_path / "out"), tmp_path / "out", words)


# ---- ISIC 2016 Part 3 --------------------------------------------------------------------------------------------

ISIC_TRAIN = {"ISIC_0000000": "benign", "ISIC_0000001": "benign", "ISIC_0000002": "malignant"}
ISIC_TEST = {"ISIC_0000003": "0.0", "ISIC_0000004": "1.0", "ISIC_0000005": "0.0"}  # 0000005: image absent


def _isic_raw(raw: Path) -> Path:
    raw.mkdir()
    # no header row, as published; the training file says benign / malignant, the test file 0.0 / 1.0
    (raw / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv").write_text(
        "".join(f"{k},{v}\n" for k, v in ISIC_TRAIN.items()))
    (raw / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv").write_text("".join(f"{k},{v}\n" for k, v in ISIC_TEST.items()))
    for i, name in enumerate(ISIC_TRAIN):
        _jpeg(raw / "ISBI2016_ISIC_Part3_Training_Data" / f"{name}.jpg", 40 * i)
    for name in ("ISIC_0000003", "ISIC_0000004"):
        _jpeg(raw / "ISBI2016_ISIC_Part3_Test_Data" / f"{name}.jpg", 200)
    return raw


def test_prepare_isic2016_row_by_row(tmp_path, cache):
    raw = _isic_raw(tmp_path / "isic2016")
    result = runner.invoke(app, ["data", "prepare", "isic-2016", str(raw)])  # into the cache: the name resolves
    assert result.exit_code == 0, result.output
    base = raw.resolve()
    assert _rows(cache / "data" / "isic-2016") == [  # no patient_id column: ISIC 2016 publishes none
        {"path": str(base / "ISBI2016_ISIC_Part3_Training_Data/ISIC_0000000.jpg"), "label": "nevus", "split": "train",
         "benign_malignant": "benign", "isic_id": "ISIC_0000000"},
        {"path": str(base / "ISBI2016_ISIC_Part3_Training_Data/ISIC_0000001.jpg"), "label": "nevus", "split": "train",
         "benign_malignant": "benign", "isic_id": "ISIC_0000001"},
        {"path": str(base / "ISBI2016_ISIC_Part3_Training_Data/ISIC_0000002.jpg"), "label": "melanoma",
         "split": "train", "benign_malignant": "malignant", "isic_id": "ISIC_0000002"},
        {"path": str(base / "ISBI2016_ISIC_Part3_Test_Data/ISIC_0000003.jpg"), "label": "nevus", "split": "test",
         "benign_malignant": "benign", "isic_id": "ISIC_0000003"},
        {"path": str(base / "ISBI2016_ISIC_Part3_Test_Data/ISIC_0000004.jpg"), "label": "melanoma", "split": "test",
         "benign_malignant": "malignant", "isic_id": "ISIC_0000004"},
    ]
    assert "left out: 1 ground-truth rows whose image" in " ".join(result.output.split())
    # the dermoscopy recipe's classes (nevus = 0, melanoma = 1), by the name alone
    source = load_source(public.resolve_named("isic-2016"), _classes("dermoscopy"))
    assert [r["label"] for r in source.records] == [0, 0, 1, 0, 1]
    assert source.has_splits and not source.has_patient_ids
    assert read_image(source.records[4]["image"], channels=3)[0].shape == (3, 12, 16)


@pytest.mark.parametrize("damage, words", [
    (lambda raw: (raw / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv").unlink(),
     ["ISBI2016_ISIC_Part3_Test_GroundTruth.csv", "missing"]),
    (lambda raw: (raw / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv").write_text("ISIC_0000000\nISIC_0000001\n"),
     ["ISBI2016_ISIC_Part3_Training_GroundTruth.csv line 1", "column 2", "missing"]),
    (lambda raw: shutil.rmtree(raw / "ISBI2016_ISIC_Part3_Test_Data"), ["ISBI2016_ISIC_Part3_Test_Data/", "missing"]),
    (lambda raw: (raw / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv").write_text("image_id,label\nISIC_0000003,0.0\n"),
     ["ISBI2016_ISIC_Part3_Test_GroundTruth.csv line 1", "no header row"]),
])
def test_prepare_isic2016_refuses_a_wrong_layout(tmp_path, cache, damage, words):
    raw = _isic_raw(tmp_path / "isic2016")
    damage(raw)
    _refused(_prepare("isic-2016", raw, tmp_path / "out"), tmp_path / "out", words)


# ---- the registry ------------------------------------------------------------------------------------------------


def test_data_list_and_known_names_show_the_new_sets(cache):
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for name in ("idrid-grading", "isic-2016"):
        assert f"{name} not cached: `medtricks data prepare {name} RAW_DIR`" in text
        assert name in public.known_names()
    for flag in ("pathmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"):
        assert f"medmnist:{flag}@224" in text and flag in public.known_names()
