"""`medtricks data prepare` of the challenge releases (IDRiD grading, ISIC 2016 Part 3, CheXpert) on copies of
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
from medtricks.data import catalog
from medtricks.data.images import read_image
from medtricks.data.prepare_challenges import CHEXPERT_FINDINGS
from medtricks.data.sources import LabelFormat, load_source

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
    source = load_source(catalog.resolve_named("isic-2016"), _classes("dermoscopy"))
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


# ---- CheXpert ----------------------------------------------------------------------------------------------------

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,"
                   "Pleural Other,Fracture,Support Devices")
SMALL = "CheXpert-v1.0-small"
# (path after the top folder, sex, age, view, AP/PA, {finding: value}; No Finding comes first); last: image written?
CHEXPERT_TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP",
     {"No Finding": "1.0", "Pneumothorax": "0.0", "Support Devices": "1.0"}, True),
    ("train/patient00002/study2/view1_frontal.jpg", "Female", "87", "Frontal", "AP",
     {"Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Pneumonia": "-1.0", "Fracture": "1.0"}, True),
    ("train/patient00002/study1/view1_frontal.jpg", "Female", "83", "Frontal", "AP", {"Edema": "-1.0"}, True),
    ("train/patient00002/study1/view2_lateral.jpg", "Female", "83", "Lateral", "", {"Edema": "-1.0"}, True),
    ("train/patient00003/study1/view1_frontal.jpg", "Male", "41", "Frontal", "PA", {"Edema": "1.0"}, False),
]
CHEXPERT_VALID = [  # the validation set has no uncertain or blank labels
    ("valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal", "AP",
     {"No Finding": "0.0", "Enlarged Cardiomediastinum": "1.0", "Cardiomegaly": "1.0", "Lung Opacity": "1.0",
      "Edema": "1.0", "Support Devices": "1.0"}, True),
    ("valid/patient64542/study1/view1_frontal.jpg", "Unknown", "70", "Frontal", "PA", {"No Finding": "1.0"}, True),
]


def _chexpert_line(rel, sex, age, view, ap_pa, values, valid=False):
    default = "0.0" if valid else ""
    cells = [values.get(f, default) for f in ("No Finding", *CHEXPERT_FINDINGS)]
    return ",".join([f"{SMALL}/{rel}", sex, age, view, ap_pa, *cells])


def _chexpert_raw(raw: Path) -> Path:
    root = raw / SMALL
    root.mkdir(parents=True)
    for name, rows, valid in (("train.csv", CHEXPERT_TRAIN, False), ("valid.csv", CHEXPERT_VALID, True)):
        (root / name).write_text("\n".join([CHEXPERT_HEADER, *(_chexpert_line(*r[:6], valid) for r in rows)]) + "\n")
        for i, row in enumerate(rows):
            if row[-1]:
                _jpeg(root / row[0], 20 * i, rgb=False)
    return raw


def _chexpert_expected(root: Path, uncertain: str, views: str) -> list[tuple]:
    """(path, label, patient_id, split, official_split, view, sex, uncertain) as the data card's rules say."""
    expected = []
    for rows, split in ((CHEXPERT_TRAIN, "train"), (CHEXPERT_VALID, "test")):
        for rel, sex, _age, view, _ap_pa, values, written in rows:
            if not written or (views == "frontal" and view != "Frontal"):
                continue
            hot = {"1.0"} | ({"-1.0"} if uncertain == "ones" else set())
            label = "|".join(f for f in CHEXPERT_FINDINGS if values.get(f) in hot) or "No Finding"
            unsure = "|".join(f for f in CHEXPERT_FINDINGS if values.get(f) == "-1.0")
            expected.append((str(root / rel), label, f"chexpert-{rel.split('/')[1]}", split, rel.split("/")[0], view,
                             {"Male": "M", "Female": "F"}.get(sex, ""), unsure))
    return expected


def test_prepare_chexpert_default_u_zeros_frontal_only(tmp_path, cache):
    raw = _chexpert_raw(tmp_path / "chexpert")
    result = _prepare("chexpert", raw, tmp_path / "out")
    assert result.exit_code == 0, result.output
    root = (raw / SMALL).resolve()
    rows = _rows(tmp_path / "out")
    assert [(r["path"], r["label"], r["patient_id"], r["split"], r["official_split"], r["view"], r["sex"],
             r["uncertain"]) for r in rows] == _chexpert_expected(root, "zeros", "frontal")
    assert [r["label"] for r in rows] == [  # written out once, so the rule above is not the only witness
        "Support Devices", "Lung Opacity|Fracture", "No Finding",
        "Enlarged Cardiomediastinum|Cardiomegaly|Lung Opacity|Edema|Support Devices", "No Finding"]
    assert rows[1]["uncertain"] == "Cardiomegaly|Pneumonia" and rows[1]["study"] == "patient00002/study2"
    assert (rows[0]["age"], rows[0]["ap_pa"], rows[4]["sex"]) == ("68", "AP", "")
    text = " ".join(result.output.split())
    assert "left out: 1 rows (lateral views (--views frontal))" in text
    assert "left out: 1 rows (image file absent)" in text and "--uncertain zeros" in text
    assert "options: --uncertain zeros --views frontal" in (tmp_path / "out" / "SOURCE.txt").read_text()
    # multi-label as data.task: multilabel reads it; patients group their images; the official split is kept
    source = load_source(tmp_path / "out", CHEXPERT_FINDINGS, LabelFormat(multilabel=True))
    hot = [tuple(i for i, v in enumerate(r["label"]) if v) for r in source.records]
    assert hot == [(12,), (2, 11), (), (0, 1, 2, 4, 12), ()]
    assert [r["patient_id"] for r in source.records][:3] == ["chexpert-patient00001"] + ["chexpert-patient00002"] * 2
    assert source.has_splits and source.has_patient_ids and source.multilabel
    assert read_image(source.records[0]["image"])[0].shape == (1, 12, 16)


def test_prepare_chexpert_u_ones_all_views_from_the_inner_folder(tmp_path, cache):
    raw = _chexpert_raw(tmp_path / "chexpert")
    result = _prepare("chexpert", raw / SMALL, tmp_path / "out", "--uncertain", "ones", "--views", "all")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "out")
    assert [(r["path"], r["label"], r["patient_id"], r["split"], r["official_split"], r["view"], r["sex"],
             r["uncertain"]) for r in rows] == _chexpert_expected((raw / SMALL).resolve(), "ones", "all")
    assert [r["label"] for r in rows][1:4] == ["Cardiomegaly|Lung Opacity|Pneumonia|Fracture", "Edema", "Edema"]
    assert rows[3]["view"] == "Lateral" and rows[3]["ap_pa"] == ""
    assert "--uncertain ones" in result.output and "lateral" not in result.output
    source = load_source(tmp_path / "out", CHEXPERT_FINDINGS, LabelFormat(multilabel=True))
    assert len(source.records) == 6


def test_prepare_options_belong_to_their_set(tmp_path, cache):
    raw = _chexpert_raw(tmp_path / "chexpert")
    bad = _prepare("chexpert", raw, tmp_path / "out", "--uncertain", "ignore")
    _refused(bad, tmp_path / "out", ["--uncertain 'ignore'", "not one of zeros, ones"])
    idrid = _idrid_raw(tmp_path / "IDRiD")
    other = _prepare("idrid-grading", idrid, tmp_path / "out", "--views", "all")
    _refused(other, tmp_path / "out", ["--views does not apply to idrid-grading", "only to chexpert"])


@pytest.mark.parametrize("damage, words", [
    (lambda root: (root / "valid.csv").unlink(), ["valid.csv is missing"]),
    (lambda root: (root / "train.csv").write_text(CHEXPERT_HEADER.replace(",Pleural Effusion", "") + "\n"),
     ["'Pleural Effusion'", "missing"]),
    (lambda root: shutil.rmtree(root / "valid"), ["valid/ is missing"]),
    (lambda root: (root / "train.csv").write_text(
        CHEXPERT_HEADER + "\n" + _chexpert_line(*CHEXPERT_TRAIN[0][:5], {"Edema": "2.0"}) + "\n"),
     ["train.csv line 2", "'Edema' is '2.0'"]),
])
def test_prepare_chexpert_refuses_a_wrong_layout(tmp_path, cache, damage, words):
    raw = _chexpert_raw(tmp_path / "chexpert")
    damage(raw / SMALL)
    _refused(_prepare("chexpert", raw, tmp_path / "out"), tmp_path / "out", words)


# ---- the registry ------------------------------------------------------------------------------------------------


def test_data_list_and_known_names_show_the_new_sets(cache):
    result = runner.invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for name in ("idrid-grading", "isic-2016", "chexpert"):
        assert f"{name} not cached: `medtricks data prepare {name} RAW_DIR`" in text
        assert name in catalog.known_names()
    assert "--uncertain zeros|ones (default zeros)" in text and "--views frontal|all (default frontal)" in text
    for flag in ("pathmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"):
        assert f"medmnist:{flag}@224" in text and flag in catalog.known_names()
