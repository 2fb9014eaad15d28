"""Paths and run files no file system call or parser accepts: a NUL byte or an over-long part in a manifest row or
on the command line, a run's JSON nested past the parser's depth, seeds out of range, labels that tie as numbers."""

import os
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medtricks.cli import app
from medtricks.data.sources import load_source
from medtricks.errors import DataError
from medtricks.runs import RunError, read_run


def test_a_manifest_row_with_a_nul_byte_or_an_over_long_name_is_named(phantoms_train, tmp_path):
    rows = (phantoms_train / "labels.csv").read_text().splitlines()
    for bad, words in [("images/a\0b.dcm", "NUL byte"), ("/tmp/" + "x" * 300 + ".png", "cannot use that path")]:
        folder = tmp_path / words.split()[0]
        shutil.copytree(phantoms_train, folder)
        first = rows[1].split(",")
        (folder / "labels.csv").write_text("\n".join([rows[0], ",".join([bad, *first[1:]]), *rows[2:]]) + "\n")
        try:
            source = load_source(folder)
        except DataError as exc:
            assert words in str(exc) and "line 2" in str(exc)
        else:  # a name too long to stat is listed with the missing files, by its row
            assert [reason for _, reason in source.missing] == [
                f"labels.csv line 2 ({bad}): cannot use that path (File name too long) "
                f"({(folder / bad).resolve()})"]


def test_an_over_long_path_on_the_command_line_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "medtricks", "recipes", "show", "x" * 300], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "cannot use that path (File name too long)" in result.stderr


def test_run_json_nested_past_the_parsers_depth_is_a_damaged_run(phantoms_train, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "recipe.yaml"):
        (run / name).write_text("x: 1\n")
    (run / "model.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(RunError, match="model.json or recipe.yaml is damaged"):
        read_run(run)


@pytest.mark.parametrize("command", ["check", "synth"])
def test_a_seed_out_of_range_is_refused_before_any_work(phantoms_train, tmp_path, command):
    target = phantoms_train if command == "check" else tmp_path / "new"
    for seed in ("-1", str(2**32)):
        result = CliRunner().invoke(app, ["data", command, str(target), "--seed", seed])
        assert result.exit_code == 2 and "--seed" in result.output, result.output
    assert not (tmp_path / "new").exists()


def test_labels_that_tie_as_numbers_keep_one_order():
    """'1' and '01' are both 1: the order of the classes (and so a class's index) must not depend on the process's
    hash seed, which orders the set of names."""
    code = "from medtricks.data.sources import _sort_names; print(_sort_names(['1', '01', '2', '002']))"
    orders = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert orders == {"('01', '1', '002', '2')\n"}


def test_an_image_error_is_said_once_and_a_wide_strip_is_not_called_long(tmp_path):
    import numpy as np
    from PIL import Image

    from medtricks.data.images import read_image

    Image.fromarray(np.zeros((64, 64), np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.zeros((1, 20000), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(DataError) as caught:
        read_image(tmp_path / "float.tif")
    assert str(caught.value).count("Re-export") == 1 and "cannot decode" not in str(caught.value)
    with pytest.raises(DataError, match="1 x 20000 pixels: one side is more than 50 times the other"):
        read_image(tmp_path / "wide.png")


def _run_dir(folder):
    folder.mkdir()
    for name in ("model.safetensors", "recipe.yaml"):
        (folder / name).write_text("x: 1\n")
    return folder


def test_an_oversized_run_json_or_recipe_is_refused_before_it_is_read(tmp_path):
    from medtricks.recipe import RecipeError, recipe_text

    run = _run_dir(tmp_path / "run")
    with open(run / "model.json", "wb") as f:
        f.truncate(17 * 1024**2)  # sparse: 17 MB that cost no disk, and would cost 17 MB of memory and a parse
    with pytest.raises(RunError, match="model.json is larger than 16 MB"):
        read_run(run)
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(17 * 1024**2)
    with pytest.raises(RecipeError, match="big.yaml: big.yaml is larger than 16 MB"):
        recipe_text(big)


def test_a_fifo_in_place_of_a_runs_json_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opening a FIFO for reading waits for a writer; a planted one must not hang evaluate or predict."""
    run = _run_dir(tmp_path / "run")
    os.mkfifo(run / "report.json")
    (run / "model.json").write_text('{"classes": ["a", "b"]}')
    code = ("import sys; from pathlib import Path; from medtricks.runs import _check_report\n"
            "try:\n    _check_report(Path(sys.argv[1]), {'classes': ['a', 'b']})\n"
            "except Exception as exc:\n    print(exc)")
    result = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert "report.json is damaged (report.json is not a regular file)" in result.stdout, result.stdout + result.stderr


def test_a_source_that_is_a_device_or_a_pipe_is_named(tmp_path):
    os.mkfifo(tmp_path / "pipe.csv")
    for source in ("/dev/null", tmp_path / "pipe.csv"):
        with pytest.raises(DataError, match="not a regular file or folder"):
            load_source(source)


@pytest.mark.parametrize("kind", ["dangling link", "folder", "pipe"])
def test_a_labels_csv_that_cannot_be_read_is_not_replaced_by_the_folder_names(phantoms_train, tmp_path, kind):
    """Read as class folders instead, the manifest's labels, splits and patient ids would be lost without a word."""
    folder = tmp_path / "data"
    shutil.copytree(phantoms_train, folder)
    (folder / "labels.csv").unlink()
    {"dangling link": lambda p: p.symlink_to(tmp_path / "unmounted" / "labels.csv"), "folder": lambda p: p.mkdir(),
     "pipe": os.mkfifo}[kind](folder / "labels.csv")
    with pytest.raises(DataError, match="there is a labels.csv, but it is not a readable file"):
        load_source(folder)


def test_class_folders_name_the_files_they_do_not_read(tmp_path, caplog):
    import numpy as np
    from PIL import Image

    for name in ("normal", "opacity"):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.fromarray(np.full((8, 8), 9 * k, np.uint8)).save(tmp_path / name / f"{k}.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / "scan.webp")
    with caplog.at_level("WARNING", logger="medtricks"):
        source = load_source(tmp_path)
    assert len(source.records) == 4 and "normal: 1 file(s) are not read" in caplog.text and "scan.webp" in caplog.text
    assert source.not_images == ["normal/scan.webp"]
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path)])  # said "unreadable files: 0" and no more
    assert result.exit_code == 0 and "files not read (no image by extension or content): 1" in result.output
    assert "normal/scan.webp" in result.output, result.output


def test_a_deleted_current_folder_is_named_not_blamed_on_the_install(tmp_path):
    """torch's import in a deleted cwd fails with "oneMKL: cannot load libtorch_cpu.so", which points at the install."""
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, sys; os.rmdir(os.getcwd()); sys.argv = ['medtricks', 'evaluate', '/nonexistent']; "
            "from medtricks.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=gone, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "the current folder cannot be read" in result.stderr and "cd to an existing folder" in result.stderr
    assert "Traceback" not in result.stderr and "oneMKL" not in result.stderr


def test_a_sub_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """predict on a folder with an unreadable sub-folder (here: '/', reached through a path string iterated
    character by character) ended in a PermissionError traceback."""
    from pathlib import Path

    from medtricks.data.sources import image_inputs

    def refused(self, pattern):
        raise PermissionError(13, "Permission denied", str(self / "locked"))
        yield

    monkeypatch.setattr(Path, "rglob", refused)
    with pytest.raises(DataError, match=r"cannot list .*locked \(Permission denied\); make it readable"):
        image_inputs([tmp_path])
