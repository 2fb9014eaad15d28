import csv
import json
import os
from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared
from medtricks.cli import app
from medtricks.data.images import read_image

runner = CliRunner()


def _check(path, *extra):
    result = runner.invoke(app, ["data", "check", str(path), *extra])
    return result


def test_synth_writes_dicoms_that_read_bone_bright(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["data", "synth", str(out), "--n", "12", "--seed", "1", "--size", "64"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert len(rows) == 12 and {r["label"] for r in rows} <= {"normal", "opacity"}
    assert len({r["patient_id"] for r in rows}) < 12  # several images per patient
    for row in rows:
        pixels, meta = read_image(out / row["path"])
        assert meta["photometric"] == row["photometric"] and meta["format"] == "dicom"
        spine, lung = pixels[0, 20:44, 30:34].mean(), pixels[0, 20:44, 14:18].mean()
        assert spine > lung + 0.1, f"{row['path']} ({row['photometric']}) is not bone-bright"


def test_synth_storage_variants_do_not_predict_the_class(tmp_path):
    from medtricks.data.synth import synthesize

    labels = synthesize(tmp_path / "s", n=200, seed=0, size=32)
    rows = list(csv.DictReader(open(labels)))
    table = Counter((r["label"], r["photometric"]) for r in rows)
    for label in ("normal", "opacity"):
        share = table[(label, "MONOCHROME1")] / (table[(label, "MONOCHROME1")] + table[(label, "MONOCHROME2")])
        assert 0.3 < share < 0.7


def test_synth_refuses_what_it_cannot_or_should_not_write(tmp_path, monkeypatch):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "many"), "--n", "100000000000"])
    assert result.exit_code == 2 and "--n 100000000000" in result.output and "100000" in result.output
    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "full"), "--n", "1000", "--size", "512"])
    assert result.exit_code == 2 and "GB free" in result.output and "full" in result.output, result.output
    assert not (tmp_path / "many").exists() and not (tmp_path / "full").exists()  # refused before writing


def test_synth_refuses_to_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_interrupted_synth_leaves_nothing_and_a_rerun_works(tmp_path, monkeypatch):
    import medtricks.data.synth as synth

    real, calls = synth.to_dicom, []

    def dies_on_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synth, "to_dicom", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        synth.synthesize(tmp_path / "demo", n=12, size=32)
    assert list(tmp_path.iterdir()) == []  # neither a half-written demo/ nor its temporary sibling
    monkeypatch.setattr(synth, "to_dicom", real)
    labels = synth.synthesize(tmp_path / "demo", n=12, size=32)
    assert len(list(csv.DictReader(open(labels)))) == 12


def test_synth_keeps_files_another_command_wrote_meanwhile(tmp_path, monkeypatch):
    import medtricks.data.synth as synth
    from medtricks.files import OutputError

    real = synth._write_phantoms

    def racing(folder, *args):
        (tmp_path / "demo").mkdir()
        (tmp_path / "demo" / "labels.csv").write_text("theirs")
        return real(folder, *args)

    monkeypatch.setattr(synth, "_write_phantoms", racing)
    with pytest.raises(OutputError, match="appeared there while the command ran"):
        synth.synthesize(tmp_path / "demo", n=8, size=32)
    assert (tmp_path / "demo" / "labels.csv").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_new_folder_gets_the_umask_permissions_not_a_temporary_folders(tmp_path):
    from medtricks.files import new_folder

    with new_folder(tmp_path / "out") as folder:
        (folder / "a.txt").write_text("x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    (tmp_path / "mine").mkdir()  # the user's own (empty) folder, maybe their working directory: kept, not replaced
    inode = (tmp_path / "mine").stat().st_ino
    with new_folder(tmp_path / "mine") as folder:
        (folder / "b.txt").write_text("y")
    assert (tmp_path / "mine").stat().st_ino == inode and (tmp_path / "mine" / "b.txt").read_text() == "y"


def test_check_phantoms_json(phantoms, tmp_path):
    result = _check(phantoms, "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_images"] == 24 and report["classes"] == ["normal", "opacity"]
    assert report["formats"] == {"dicom": 24} and report["bit_depths"] == {"16": 24}
    assert report["patients_in_several_splits"] == {} and report["unreadable"] == []
    assert sum(s["n"] for s in report["splits"].values()) == 24


def test_check_lists_unreadable_files_with_exit_2(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / "normal").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / f"{name}.png")
    (tmp_path / "normal" / "broken.png").write_bytes(b"")
    (tmp_path / "normal" / "text.png").write_text("hello")
    result = _check(tmp_path)
    assert result.exit_code == 2
    assert "broken.png" in result.output and "empty" in result.output
    assert "text.png" in result.output and "unreadable files: 2" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, words", [
    (["nowhere"], ["not found"]),
    (["--classes", "a,b"], ["outside the recipe's classes"]),
    (["--classes", "normal,normal"], ["normal given twice"]),
    (["--classes", ",,"], ["a class name is empty"]),
    (["--classes", "normal,,opacity"], ["a class name is empty"]),
])
def test_check_bad_input_exit_2(tmp_path, phantoms, args, words):
    target = [str(tmp_path / args[0])] if args[0] == "nowhere" else [str(phantoms), *args]
    result = runner.invoke(app, ["data", "check", *target])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output


def test_check_cxr_nih(tmp_path):
    data = shared("cxr-nih")
    result = _check(data, "--json", str(tmp_path / "nih.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "nih.json").read_text())
    assert (report["n_images"], len(report["classes"]), report["patients"]) == (234, 2, 228)
    rows = list(csv.DictReader(open(data / "labels.csv")))
    labels_of = {}
    for row in rows:
        labels_of.setdefault(row["patient_id"], set()).add(row["label"])
    assert report["patients_in_several_classes"] == sum(len(v) > 1 for v in labels_of.values()) > 0
    assert "patient-level" in report["split_origin"] and report["patients_in_several_splits"] == {}
    assert "234 images, 2 classes, patients: 228" in result.output


def test_check_retinamnist():
    result = _check(shared("retinamnist"))
    assert result.exit_code == 0, result.output
    assert "1200 images, 5 classes" in result.output
    assert "│ train │" in result.output and "1080" in result.output and "120" in result.output


@pytest.mark.parametrize("name, n, classes", [
    ("fundus-idrid", 408, 5), ("derm-isic", 443, 2), ("cxr-covid", 90, 3), ("pneumoniamnist", 2698, 2)])
def test_check_other_real_sets(tmp_path, name, n, classes):
    result = _check(shared(name), "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["n_images"], len(report["classes"]), report["unreadable"]) == (n, classes, [])


# eight images of four patients with findings A, B, C (own splits), counted by hand in the test below
FINDING_ROWS = [("1.png", "A|B", "p1", "train"), ("2.png", "A", "p1", "train"), ("3.png", "No Finding", "p2", "train"),
                ("4.png", "B|C", "p2", "train"), ("5.png", "A|B|C", "p3", "val"), ("6.png", "No Finding", "p3", "val"),
                ("7.png", "C", "p4", "test"), ("8.png", "A|C", "p4", "test")]


def test_check_multilabel_counts_findings_cooccurrence_and_no_finding(tmp_path):
    from multilabel_data import write_manifest

    folder = write_manifest(tmp_path / "ml", FINDING_ROWS, header=("path", "label", "patient_id", "split"))
    result = _check(folder, "--multilabel", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["task"] == "multilabel" and report["classes"] == ["A", "B", "C"] and report["n_images"] == 8
    assert report["per_class"] == {"A": 4, "B": 3, "C": 4}  # rows 1 2 5 8; 1 4 5; 4 5 7 8
    assert report["no_finding"] == 2  # rows 3 and 6
    assert report["labels_per_image"] == {"0": 2, "1": 2, "2": 3, "3": 1}  # 3 6; 2 7; 1 4 8; 5
    assert report["cooccurrence"] == {"A": {"A": 4, "B": 2, "C": 2},  # A+B: 1 5; A+C: 5 8; B+C: 4 5
                                      "B": {"A": 2, "B": 3, "C": 2},
                                      "C": {"A": 2, "B": 2, "C": 4}}
    splits = report["splits"]
    assert report["split_origin"] == "the source's own splits"
    assert {name: (s["n"], s["per_class"], s["no_finding"], s["patients"]) for name, s in splits.items()} == {
        "train": (4, {"A": 2, "B": 2, "C": 1}, 1, 2), "val": (2, {"A": 1, "B": 1, "C": 1}, 1, 1),
        "test": (2, {"A": 1, "B": 0, "C": 2}, 0, 1)}
    assert report["patients_in_several_classes"] is None and report["patients_in_several_splits"] == {}
    for words in ("3 findings (multi-label)", "no finding", "no finding: 2 images", "findings per image: 0: 2, 1: 2, "
                  "2: 3, 3: 1", "co-occurrence", "1 A", "3 C"):
        assert words in result.output, (words, result.output)

    plain = _check(folder, "--json", str(tmp_path / "plain.json"))  # single-label reads whole cells, as before
    assert plain.exit_code == 0, plain.output
    single = json.loads((tmp_path / "plain.json").read_text())
    assert "task" not in single and "cooccurrence" not in single and "A|B" in single["classes"]
    assert "no_finding" not in single["splits"]["train"]


def test_check_multilabel_label_format_options(tmp_path):
    from multilabel_data import write_manifest

    rows = [(p, label.replace("|", ";").replace("No Finding", "none"), pid, split)
            for p, label, pid, split in FINDING_ROWS]
    folder = write_manifest(tmp_path / "ml", rows, header=("path", "findings", "patient_id", "split"))
    result = _check(folder, "--multilabel", "--label-column", "findings", "--label-separator", ";", "--no-finding",
                    "none", "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["per_class"] == {"A": 4, "B": 3, "C": 4} and report["no_finding"] == 2
    result = _check(folder, "--multilabel", "--label-column", "findings", "--label-separator", " ")
    assert result.exit_code == 2 and "--label-separator" in result.output


def test_two_demos_synthesizing_at_once_share_the_first_ones_phantoms(tmp_path, monkeypatch):
    import importlib

    from medtricks.files import OutputError
    from medtricks.recipe import resolve_recipe

    ft = importlib.import_module("medtricks.finetune")  # the package's `finetune` attribute is the function

    def beaten_by_another(source, seed):
        source.mkdir()
        (source / "labels.csv").write_text("path,label\n")
        raise OutputError(f"{source}: files appeared there while the command ran")

    monkeypatch.setattr(ft, "synthesize", beaten_by_another)
    ft._synthesize_if_missing(resolve_recipe("demo"), tmp_path / "demo")  # the other command's set is used
    monkeypatch.setattr(ft, "synthesize", lambda source, seed: (_ for _ in ()).throw(OutputError("disk")))
    with pytest.raises(OutputError, match="disk"):
        ft._synthesize_if_missing(resolve_recipe("demo"), tmp_path / "other")


def test_a_terminated_synth_cleans_up_like_an_interrupted_one(tmp_path):
    """kill, timeout, docker stop and batch schedulers send SIGTERM: the half-written folder must go, as on Ctrl-C."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "medtricks", "data", "synth", str(tmp_path / "big"), "--n",
                                "3000", "--size", "128"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".big.*/images/*/*.dcm")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob(".big.*/images/*/*.dcm")), "synth wrote nothing within 2 minutes"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []
