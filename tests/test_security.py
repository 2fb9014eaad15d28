"""Security: no plain-pickle loading in the package, and DICOM patient identifiers never leave the reader."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.data.synth import patient_anatomy, phantom

PACKAGE = Path(__file__).resolve().parents[1] / "medtricks"
IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "MRN-4815162342", "PatientBirthDate": "19700101",
               "InstitutionName": "General Hospital of Springfield", "AccessionNumber": "ACC-99887766",
               "ReferringPhysicianName": "House^Gregory", "StudyDate": "20200315", "PatientAddress": "742 Evergreen"}
NEEDLES = ["Doe", "Jane", "MRN-4815162342", "4815162342", "19700101", "General Hospital", "Springfield",
           "ACC-99887766", "House", "Gregory", "20200315", "Evergreen"]


def test_no_unsafe_loading_in_the_package():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.name}: {match.group(0)}")
        if re.search(r"^\s*(import pickle|from pickle import)|pickle\.loads?\(|allow_pickle=True", text, re.M):
            offenders.append(f"{path.name}: pickle")
    assert offenders == []


def _identified_dicoms(folder: Path, n: int = 48) -> None:
    """Phantom DICOMs whose headers carry a full set of patient identifiers (one real patient per 3 images)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = ("normal", "opacity")[i % 2]
        pixels = phantom(patient_anatomy(rng), bool(i % 2), 48, rng)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ComputedRadiographyImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.ViewPosition = "CR", "PA"
        for key, value in IDENTIFIERS.items():
            setattr(ds, key, value if key != "PatientID" else f"{value}-{i // 3}")
        ds.set_pixel_data((pixels * 4095).astype(np.uint16), photometric_interpretation="MONOCHROME2", bits_stored=12)
        (folder / label).mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / label / f"img{i:03d}.dcm", enforce_file_format=True)


def test_patient_identifiers_never_reach_outputs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    data, run = tmp_path / "dicoms", tmp_path / "run"
    _identified_dicoms(data)
    runner = CliRunner()
    fast = ["--set", "data.image_size=32", "--set", "data.workers=0", "--set", "train.epochs=1",
            "--set", "train.batch_size=8", "--set", "data.synth_if_missing=false"]
    outputs = []
    for args in (["data", "check", str(data), "--json", str(tmp_path / "check.json")],
                 ["finetune", "--recipe", "demo", "--data", str(data), "--out", str(run), *fast],
                 ["evaluate", str(run), "--split", "all", "--json", str(tmp_path / "eval.json")],
                 ["predict", str(run), str(data), "--out", str(tmp_path / "pred.csv")],
                 ["attack", str(run), "--pgd", "--eps", "2/255", "--steps", "2", "--split", "all", "--limit", "6",
                  "--save-images", str(tmp_path / "adv"), "--json", str(tmp_path / "attack.json")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        outputs.append(result.output)
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["patients"] == 16  # grouped by the DICOM PatientID, under pseudonyms
    texts = {"captured output": "\n".join(outputs), "logs": caplog.text}
    files = [p for p in [*run.rglob("*"), *tmp_path.glob("*.json"), tmp_path / "pred.csv",
                         *(tmp_path / "adv").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name == "model.safetensors" for p in files)
    for path in files:
        texts[str(path)] = path.read_bytes().decode("latin-1")
    leaks = [(where, needle) for where, text in texts.items() for needle in NEEDLES if needle in text]
    assert leaks == []
