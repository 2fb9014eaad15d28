import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtricks.data.sources import load_source
from medtricks.errors import DataError


def _png(path, value=100, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def _csv(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text(text)
    return folder


def test_imagefolder_classes_sorted_and_nested(tmp_path):
    _png(tmp_path / "pneumonia" / "a.png")
    _png(tmp_path / "normal" / "sub" / "b.png")
    _png(tmp_path / "normal" / "c.png")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    source = load_source(tmp_path)
    assert source.kind == "imagefolder" and source.classes == ("normal", "pneumonia")
    assert sorted((r["key"], r["label"]) for r in source.records) == [
        ("normal/c.png", 0), ("normal/sub/b.png", 0), ("pneumonia/a.png", 1)]
    assert not source.has_patient_ids and not source.has_splits


def test_imagefolder_uses_recipe_class_order_and_rejects_unknown_folder(tmp_path):
    _png(tmp_path / "normal" / "a.png")
    _png(tmp_path / "opacity" / "b.png")
    source = load_source(tmp_path, ["opacity", "normal"])
    assert {r["key"]: r["label"] for r in source.records} == {"normal/a.png": 1, "opacity/b.png": 0}
    with pytest.raises(DataError, match=r"opacity.*Add the class to data.classes"):
        load_source(tmp_path, ["normal"])


def test_repeated_or_empty_class_names_are_refused_before_any_label_is_read(tmp_path):
    _csv(tmp_path, "path,label\na.png,normal\n")
    with pytest.raises(DataError, match="normal given twice"):
        load_source(tmp_path, ["normal", "normal"])  # two indices for one label: which would it be?
    with pytest.raises(DataError, match="a class name is empty"):
        load_source(tmp_path, ["normal", " "])


def test_csv_manifest_with_patients_and_splits(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / "img" / f"{name}.png")
    _csv(tmp_path, "path,label,patient_id,split,age\nimg/a.png,1,p1,train,50\nimg/b.png,0,p2,Validation,\n"
                   "img/c.png,2,p3,test,3\n")
    source = load_source(tmp_path)
    assert source.kind == "csv" and source.classes == ("0", "1", "2")
    assert [(r["label"], r["patient_id"], r["split"]) for r in source.records] == [
        (1, "p1", "train"), (0, "p2", "val"), (2, "p3", "test")]
    assert source.has_patient_ids and source.has_splits


def test_numeric_classes_sort_numerically(tmp_path):
    for i in (2, 10, 1):
        _png(tmp_path / f"{i}.png")
    _csv(tmp_path, "path,label\n2.png,2\n10.png,10\n1.png,1\n")
    assert load_source(tmp_path).classes == ("1", "2", "10")


def test_csv_file_path_and_missing_file_listed(tmp_path):
    _png(tmp_path / "a.png")
    manifest = tmp_path / "my.csv"
    manifest.write_text("path,label\na.png,x\ngone.png,y\n")
    source = load_source(manifest)
    assert len(source.records) == 1
    assert source.missing[0][0] == "gone.png" and "line 3" in source.missing[0][1]
    assert "file not found" in source.missing[0][1]


@pytest.mark.parametrize("text, words", [
    ("path,label\na.png,normal\na.png,normal\n", ["duplicate path", "line 3"]),
    ("path,label\na.png,cat\n", ["line 2", "'cat'", "data.classes"]),
    ("file,label\na.png,normal\n", ["column 'path' is missing"]),
    ("path,label\n", ["no rows"]),
    ("path,label\na.png,\n", ["empty label", "line 2"]),
    ("path,label,split\na.png,normal,train\nb.png,normal,\n", ["split column is filled for some rows"]),
    ("path,label,split\na.png,normal,holdout\n", ["holdout", "train, val, test"]),
    ("path,label,label\na.png,normal,opacity\n", ["column 'label' appears more than once"]),
    ('path,label,note\na.png,normal,"two\nlines"\nb.png,\n', ["empty label", "line 4"]),  # physical line, not row
])
def test_bad_manifests(tmp_path, text, words):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    _csv(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_source(tmp_path, ["normal", "opacity"] if "cat" in text else None)
    for word in words:
        assert word in str(info.value)


def test_npz_any_subset_of_splits(tmp_path):
    path = tmp_path / "set.npz"
    np.savez(path, train_images=np.zeros((5, 28, 28), np.uint8), train_labels=np.array([[0], [1], [2], [1], [0]]),
             test_images=np.zeros((2, 28, 28, 3), np.uint8), test_labels=np.array([[2], [0]]))
    source = load_source(tmp_path)  # a folder holding exactly one .npz
    assert source.kind == "npz" and source.classes == ("0", "1", "2")
    assert [r["split"] for r in source.records] == ["train"] * 5 + ["test"] * 2
    assert source.records[6]["key"] == "test[1]" and source.records[6]["label"] == 0
    with pytest.raises(DataError, match="outside the 2 classes"):
        load_source(path, ["a", "b"])


def test_npz_arrays_it_does_not_read_are_named(tmp_path, caplog):
    """A split under another name (holdout_, valid_) or labels without images: listed, never dropped silently."""
    np.savez(tmp_path / "set.npz", train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([0, 1, 0, 1]),
             holdout_images=np.zeros((2, 8, 8), np.uint8), holdout_labels=np.array([0, 1]), test_labels=np.array([1]))
    with caplog.at_level(logging.WARNING, logger="medtricks"):
        source = load_source(tmp_path / "set.npz")
    assert len(source.records) == 4
    assert "['holdout_images', 'holdout_labels', 'test_labels'] are not read" in caplog.text


def test_npz_without_images_and_multilabel(tmp_path):
    np.savez(tmp_path / "x.npz", stuff=np.zeros(3))
    with pytest.raises(DataError, match="train_images"):
        load_source(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 3)))
    with pytest.raises(DataError, match="multi-label"):
        load_source(tmp_path / "y.npz")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images found"):
        load_source(tmp_path / "empty")
    (tmp_path / "empty" / "normal").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_source(tmp_path / "empty")


def test_unlabelled_folder(tmp_path):
    _png(tmp_path / "a.png")
    source = load_source(tmp_path)
    assert source.kind == "unlabelled" and not source.labelled and source.records[0]["label"] == -1


def test_dicom_patient_ids_are_pseudonymized(phantoms, tmp_path):
    import shutil

    folder = tmp_path / "by_class"
    shutil.copytree(phantoms / "images", folder)
    source = load_source(folder)
    ids = {r["patient_id"] for r in source.records}
    assert source.has_patient_ids and all(p.startswith("patient-") for p in ids)
    assert not any("synth" in p for p in ids)  # the DICOM PatientID never leaves the reader
    by_real = {}
    for rec in source.records:  # files of one real patient share one pseudonym, and only that one
        by_real.setdefault(rec["key"].split("/")[1][:10], set()).add(rec["patient_id"])
    assert all(len(v) == 1 for v in by_real.values()) and len(ids) == len(by_real)


def test_real_sets_are_detected():
    from conftest import shared

    nih = load_source(shared("cxr-nih"))
    assert (len(nih.records), nih.classes, nih.has_patient_ids) == (234, ("normal", "pneumonia"), True)
    assert len({r["patient_id"] for r in nih.records}) == 228
    retina = load_source(shared("retinamnist"))
    assert retina.classes == ("0", "1", "2", "3", "4")
    assert sum(r["split"] == "train" for r in retina.records) == 1080
    assert sum(r["split"] == "val" for r in retina.records) == 120


def test_an_empty_patient_id_column_is_no_patient_ids(tmp_path, caplog):
    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png")
    assert not load_source(_csv(tmp_path, "path,label,patient_id\na.png,x,\nb.png,y, \n")).has_patient_ids
    partial = load_source(_csv(tmp_path, "path,label,patient_id\na.png,x,p1\nb.png,y,\n"))
    assert partial.has_patient_ids and "1 of 2 rows have an empty patient_id" in caplog.text


def test_class_names_that_look_numeric_but_are_not_ascii_digits_sort_as_text(tmp_path):
    for name in ("²", "1"):  # '²'.isdigit() is True, but int('²') fails
        _png(tmp_path / name / "a.png")
    assert load_source(tmp_path).classes == ("1", "²")


def test_predict_inputs_list_what_a_folder_scan_leaves_out(tmp_path, caplog):
    from medtricks.data.sources import image_inputs

    _png(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "b").write_bytes((tmp_path / "in" / "a.png").read_bytes())  # a PNG without its extension
    (tmp_path / "in" / ".hidden.txt").write_text("x")
    assert image_inputs([tmp_path / "in"]) == [tmp_path / "in" / "a.png"]
    assert "1 file(s) are not read" in caplog.text and ": b;" in caplog.text and "hidden" not in caplog.text
    if Path("/dev/zero").exists():
        with pytest.raises(DataError, match="not a regular file or folder"):
            image_inputs(["/dev/zero"])


def test_a_link_to_an_image_that_is_gone_is_listed_not_dropped(tmp_path, caplog):
    """An image folder on an unmounted or moved drive: its links are kept, so reading them names each one."""
    from medtricks.data.dataset import ImageStore, prepare_images
    from medtricks.data.sources import image_inputs

    for name in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "set" / name / f"{i}.png", value=40 * i)
    gone = tmp_path / "set" / "a" / "scan7.png"
    gone.symlink_to(tmp_path / "unmounted" / "scan7.png")
    (tmp_path / "set" / "a" / "notes").symlink_to(tmp_path / "unmounted" / "notes")
    source = load_source(tmp_path / "set")
    assert len(source.records) == 7 and gone in [r["image"] for r in source.records]
    _, problems, _ = prepare_images(ImageStore(source.records, 1, 32), workers=0)
    assert [p for p, _ in problems] == ["a/scan7.png"] and "not found" in problems[0][1]  # by its key
    assert gone in image_inputs([tmp_path / "set" / "a"])  # predict gives it a row with its error
    assert "1 file(s) are not read" in caplog.text and "notes" in caplog.text


@pytest.fixture
def no_hang():
    """Fail instead of hanging when code opens a pipe that no one writes to."""
    import signal

    def stop(*_):
        raise TimeoutError("a pipe or device was opened")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_pipes_and_devices_named_like_images_are_listed_never_opened(tmp_path, caplog, no_hang):
    """A FIFO or a link to /dev/zero in an image folder or a manifest: listed with what it is, never read (reading
    would block, or run without end), and never dropped silently."""
    import os

    from medtricks.data.dataset import ImageStore, prepare_images
    from medtricks.data.images import read_image
    from medtricks.data.sources import image_inputs

    for name in ("a", "b"):
        for i in range(3):
            _png(tmp_path / "set" / name / f"{i}.png", value=40 * i)
    fifo, zero, bare = (tmp_path / "set" / "a" / n for n in ("pipe.png", "zero.dcm", "stream"))
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    os.mkfifo(bare)
    source = load_source(tmp_path / "set")
    assert {fifo, zero} <= {r["image"] for r in source.records} and len(source.records) == 8
    _, problems, _ = prepare_images(ImageStore(source.records, 1, 32), workers=0)
    assert sorted(p for p, _ in problems) == ["a/pipe.png", "a/zero.dcm"]
    assert all("not a regular file" in reason for _, reason in problems)
    with pytest.raises(DataError, match="pipe.png: not a regular file"):
        read_image(fifo)
    assert {fifo, zero} <= set(image_inputs([tmp_path / "set" / "a"]))
    assert "1 file(s) are not read" in caplog.text and "stream" in caplog.text
    listed = _csv(tmp_path / "csv", f"path,label\n{fifo},a\n{tmp_path / 'set' / 'b' / '0.png'},b\n")
    source = load_source(listed)
    assert len(source.records) == 1 and "not a regular file" in source.missing[0][1]


def test_labels_that_differ_only_in_unicode_form_are_one_class(tmp_path):
    """'opacité' typed as one character (NFC) or as e + combining accent (NFD, macOS file names) prints the same:
    it must be one class, in manifests, in folder names and in the recipe's classes alike."""
    composed, decomposed = "opacit\u00e9", "opacite\u0301"
    for k in range(4):
        _png(tmp_path / "csv" / f"{k}.png")
    _csv(tmp_path / "csv", f"path,label\n0.png,{composed}\n1.png,{decomposed}\n2.png,normal\n3.png,normal\n")
    source = load_source(tmp_path / "csv")
    assert source.classes == ("normal", composed) and [r["label"] for r in source.records] == [1, 1, 0, 0]
    assert load_source(tmp_path / "csv", ["normal", decomposed]).classes == ("normal", composed)
    for k, name in enumerate((composed, decomposed, "normal")):
        _png(tmp_path / "folders" / name / f"{k}.png")
    folders = load_source(tmp_path / "folders")
    assert folders.classes == ("normal", composed) and sorted(r["label"] for r in folders.records) == [0, 1, 1]
