"""The foundation issue's bad-input list, end to end through `medtricks data check` (exit code 2, the file named,
the problem said, no traceback) and through load_data (DataError; on_error: skip lists what it leaves out)."""

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.data.pipeline import load_data
from medtricks.data.synth import synthesize
from medtricks.errors import DataError
from medtricks.recipe import DataConfig, SplitConfig

runner = CliRunner()


def _good_set(folder):
    synthesize(folder, n=8, seed=0, size=32)
    return folder


def _truncated_dicom(folder):
    victim = sorted((folder / "images").rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    return victim.name, "cannot decode the DICOM pixel data"


def _dicom_without_pixels(folder):
    victim = sorted((folder / "images").rglob("*.dcm"))[1]
    ds = pydicom.dcmread(victim)
    del ds.PixelData
    ds.save_as(victim)
    return victim.name, "no pixel data"


def _zero_byte_png(folder):
    (folder / "images" / "normal" / "zero.png").write_bytes(b"")
    with open(folder / "labels.csv", "a") as f:
        f.write("images/normal/zero.png,normal,synth-9999,\n")
    return "zero.png", "empty (0 bytes)"


def _text_named_png(folder):
    (folder / "images" / "normal" / "notes.png").write_text("this is not an image")
    with open(folder / "labels.csv", "a") as f:
        f.write("images/normal/notes.png,normal,synth-9998,\n")
    return "notes.png", "not a readable image"


def _row_with_missing_file(folder):
    with open(folder / "labels.csv", "a") as f:
        f.write("images/normal/ghost.dcm,normal,synth-9997,\n")
    return "ghost.dcm", "file not found"


CASES = [_truncated_dicom, _dicom_without_pixels, _zero_byte_png, _text_named_png, _row_with_missing_file]


@pytest.mark.parametrize("make_bad", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_bad_file_is_named_by_check_and_load_data(tmp_path, make_bad, caplog):
    folder = _good_set(tmp_path / "set")
    name, problem = make_bad(folder)
    result = runner.invoke(app, ["data", "check", str(folder)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert name in result.output and problem in result.output and "unreadable files: 1" in result.output

    config = DataConfig(classes=("normal", "opacity"), image_size=32, workers=0, split=SplitConfig(0.5, 0.25, 0.25))
    with pytest.raises(DataError) as info:
        load_data(config, folder)
    assert name in str(info.value) and problem in str(info.value)
    bundle = load_data(DataConfig(**{**config.__dict__, "on_error": "skip"}), folder)
    assert [key.rsplit("/", 1)[-1] for key, _ in bundle.skipped] == [name]
    assert name in caplog.text and sum(len(d) for d in bundle.splits.values()) == 8 - (name.endswith(".dcm")
                                                                                        and "ghost" not in name)


def test_label_outside_classes(tmp_path):
    folder = _good_set(tmp_path / "set")
    lines = (folder / "labels.csv").read_text().splitlines()
    lines[3] = ",".join([lines[3].split(",")[0], "effusion", *lines[3].split(",")[2:]])
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["data", "check", str(folder), "--classes", "normal,opacity"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "'effusion'" in result.output and "labels.csv line 4" in result.output


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["data", "check", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no images found" in result.output and "empty" in result.output
    with pytest.raises(DataError, match="no images found"):
        load_data(DataConfig(), tmp_path / "empty")


def test_unlabelled_folder_cannot_train(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="no labels"):
        load_data(DataConfig(), tmp_path)


def test_debug_flag_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "data", "check", str(tmp_path / "nowhere")])
    assert result.exit_code != 0 and isinstance(result.exception, DataError)
