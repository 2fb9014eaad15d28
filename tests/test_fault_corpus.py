"""Hostile but realistic input, class by class (duplicate manifest rows, array sources, DICOM display mapping,
resource bombs, predict over mixed files, recipe edge cases): through the CLI, each bad case exits 2 with a message
naming the file or key and no traceback, and changes no file of the data (nothing_lost); each good edge case works."""

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import nothing_lost
from medtricks.cli import app
from medtricks.data.synth import synthesize
from medtricks.finetune import finetune
from medtricks.recipe import load_recipe

runner = CliRunner()
TINY = ["data.image_size=32", "data.workers=0", "data.synth_if_missing=false", "train.epochs=1",
        "train.limit_train_batches=2", "train.batch_size=8", "train.eval_batch_size=16"]


def invoke(args, *folders):
    with nothing_lost(*folders):
        result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def refused(args, words, *folders):
    result = invoke(args, *folders)
    assert result.exit_code == 2, result.output
    for word in words:
        assert str(word) in result.output, (word, result.output)


@pytest.fixture
def data(tmp_path) -> Path:
    return synthesize(tmp_path / "data", n=12, seed=0, size=32).parent


# --- duplicate rows: one file, however its path is written ----------------------------------------------------------

@pytest.mark.parametrize("spelling", ["./{p}", "{d}//{f}", "{d}/../{last}/{f}", "{abs}"])
@pytest.mark.parametrize("label", ["same", "other"])
def test_the_same_file_twice_in_a_manifest(data, spelling, label):
    lines = (data / "labels.csv").read_text().splitlines()
    path, first_label, *rest = lines[1].split(",")
    folder, name = path.rsplit("/", 1)
    again = spelling.format(p=path, d=folder, f=name, last=folder.rsplit("/", 1)[-1], abs=data / path)
    other = "normal" if first_label == "opacity" else "opacity"
    manifest = data / "labels.csv"
    manifest.write_text("\n".join([*lines, ",".join([again, first_label if label == "same" else other, *rest])])
                        + "\n")
    refused(["data", "check", data], ["labels.csv line 2", "duplicate path", "remove one row"], data)


# --- array sources --------------------------------------------------------------------------------------------------

def _npz(folder: Path, images, labels, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": images, "train_labels": labels, **extra}
    np.savez(folder / "set.npz", **arrays)
    return folder / "set.npz"


GOOD_LABELS = np.array([0, 1] * 4)


@pytest.mark.parametrize("images, words", [
    (np.random.default_rng(0).random((8, 16, 16)) * 2, ["train_images", "float", "[0, 1]"]),
    (np.full((8, 16, 16), np.nan), ["train_images", "NaN"]),
    (np.zeros((8, 16, 16), bool), ["train_images", "bool"]),
    (np.zeros((8, 16, 16), np.int32), ["train_images", "int32"]),
    (np.zeros((8, 0, 16), np.uint8), ["train_images", "without pixels"]),
    (np.zeros((8, 16), np.uint8), ["train_images", "shape"]),
])
def test_array_images_of_unknown_meaning_are_refused(tmp_path, images, words):
    npz = _npz(tmp_path / "set", images, GOOD_LABELS)
    refused(["data", "check", npz], [npz, *words], tmp_path)


@pytest.mark.parametrize("labels, words", [
    (np.array([0.0, 1.5] * 4), ["train_labels", "1.5", "integer"]),
    (np.array(["a", "b"] * 4), ["train_labels", "integer class indices"]),
    (np.array([0, -1] * 4), ["train_labels", "-1"]),
    (np.array([0.0, np.nan] * 4), ["train_labels", "4 NaN or infinite"]),
    (np.array([0, 1, 0]), ["8 images", "3 labels"]),
])
def test_array_labels_must_be_class_indices(tmp_path, labels, words):
    npz = _npz(tmp_path / "set", np.zeros((8, 16, 16), np.uint8), labels)
    refused(["data", "check", npz], [npz, *words], tmp_path)


def test_object_arrays_and_truncated_archives_are_refused(tmp_path):
    folder = tmp_path / "objects"
    folder.mkdir()
    np.savez(folder / "set.npz", train_images=np.array([np.zeros((4, 4)), "x"], dtype=object),
             train_labels=np.array([0, 1]))
    refused(["data", "check", folder / "set.npz"], ["train_images", "Python objects"], tmp_path)
    good = _npz(tmp_path / "cut", np.zeros((8, 16, 16), np.uint8), GOOD_LABELS)
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(["data", "check", good], [good, "readable"], tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with zipfile.ZipFile(empty / "set.npz", "w"):
        pass
    refused(["data", "check", empty / "set.npz"], ["set.npz", "train_images"], tmp_path)


def _zip_headers_patched(data: bytes, offset: int, value: int, mask: bool) -> bytes:
    """Every local (PK\\3\\4) and central (PK\\1\\2) header's 2-byte field at `offset` from its local position
    (the central header's is 2 bytes further on) set to `value`, or OR-ed with it when `mask`."""
    out = bytearray(data)
    for signature, shift in ((b"PK\x03\x04", 0), (b"PK\x01\x02", 2)):
        at = out.find(signature)
        while at >= 0:
            field = at + offset + shift
            old = int.from_bytes(out[field:field + 2], "little")
            out[field:field + 2] = ((old | value) if mask else value).to_bytes(2, "little")
            at = out.find(signature, at + 4)
    return bytes(out)


@pytest.mark.parametrize("offset, value, mask, words", [(6, 1, True, "encrypted"),  # general-purpose flag bit 0
                                                        (8, 99, False, "not supported")])  # method 99: WinZip AES
def test_a_password_protected_or_unusually_compressed_archive_is_named(tmp_path, offset, value, mask, words):
    archive = _npz(tmp_path / "set", np.zeros((8, 16, 16), np.uint8), GOOD_LABELS)
    archive.write_bytes(_zip_headers_patched(archive.read_bytes(), offset, value, mask))
    refused(["data", "check", archive], [archive.name, words, "np.savez_compressed"], tmp_path)


def _npy_header(shape: tuple, descr: str = "|u1", version: int = 1) -> bytes:
    """The .npy header (format 1.0, or 3.0: a 4-byte length and UTF-8 text) of an array of `shape`, padded as numpy
    pads it (magic + length + text: a multiple of 64)."""
    length_bytes = 2 if version == 1 else 4
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(8 + length_bytes + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY" + bytes([version, 0]) + len(text).to_bytes(length_bytes, "little") + text.encode()


def _labels_member() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, GOOD_LABELS)
    return buffer.getvalue()


def test_array_archives_cannot_make_us_allocate_what_they_do_not_hold(tmp_path):
    folder = tmp_path / "bombs"
    folder.mkdir()
    claims = folder / "claims.npz"  # a 1 kB file whose header claims 9 TiB
    with zipfile.ZipFile(claims, "w") as z:
        z.writestr("train_images.npy", _npy_header((100_000, 10_000, 10_000)) + bytes(1000))
        z.writestr("train_labels.npy", _labels_member())
    refused(["data", "check", claims], [claims, "train_images", "(100000, 10000, 10000)", "memory"], tmp_path)
    short_of = folder / "short.npz"  # claims 8 images of 16 x 16, holds 100 bytes
    with zipfile.ZipFile(short_of, "w") as z:
        z.writestr("train_images.npy", _npy_header((8, 16, 16)) + bytes(100))
        z.writestr("train_labels.npy", _labels_member())
    refused(["data", "check", short_of], [short_of, "train_images", "2048 bytes", "holds 100"], tmp_path)
    bomb = folder / "bomb.npz"  # 64 MiB of zeros in a ~70 kB member: honest header, implausible compression
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_images.npy", _npy_header((1024, 256, 256)) + bytes(1024 * 256 * 256))
        z.writestr("train_labels.npy", _labels_member())
    refused(["data", "check", bomb], [bomb, "train_images", "zip bomb"], tmp_path)
    bomb3 = folder / "bomb3.npz"  # the same with a format 3.0 header, which numpy reads as well
    with zipfile.ZipFile(bomb3, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_images.npy", _npy_header((1024, 256, 256), version=3) + bytes(1024 * 256 * 256))
        z.writestr("train_labels.npy", _labels_member())
    refused(["data", "check", bomb3], [bomb3, "train_images", "zip bomb"], tmp_path)
    plain = folder / "plain.npz"  # np.save's single array under an .npz name
    with plain.open("wb") as f:
        np.save(f, np.zeros((8, 16, 16), np.uint8))
    refused(["data", "check", plain], [plain, "single array", "savez"], tmp_path)
    labels = np.array([0, 1] * 4)
    labels[3] = 10**9  # without data.classes, classes would be 0..1e9
    big_label = _npz(tmp_path / "label", np.zeros((8, 16, 16), np.uint8), labels)
    refused(["data", "check", big_label], [big_label, "1000000000", "data.classes"], tmp_path)
    for dtype, value, shown in ((np.float64, 1e20, "1e+20"), (np.uint64, 2**64 - 1, str(2**64 - 1))):
        labels = np.array([0, 1] * 4, dtype=dtype)
        labels[5] = value  # cast to int64, either would wrap around to a negative index
        huge = _npz(tmp_path / f"huge-{np.dtype(dtype).name}", np.zeros((8, 16, 16), np.uint8), labels)
        refused(["data", "check", huge], [huge, "train_labels", shown, "corrupt"], tmp_path)


@pytest.mark.parametrize("images, scale", [
    ((np.arange(8 * 16 * 16).reshape(8, 16, 16) % 65536).astype(np.uint16), 65535),
    (np.random.default_rng(1).random((8, 16, 16)).astype(np.float32), 1),
    (np.random.default_rng(2).integers(0, 256, (8, 16, 16, 1)).astype(np.uint8), 255),
])
def test_array_dtypes_are_scaled_by_their_range(tmp_path, images, scale):
    """uint16 by 65535 (not 255: that would saturate), floats in [0, 1] as they are, a channel axis of 1 dropped."""
    from medtricks.data.dataset import decode
    from medtricks.data.sources import load_source

    source = load_source(_npz(tmp_path / "set", images, GOOD_LABELS))
    decoded, _ = decode(source.records[3], 1, 64)
    expected = images[3].reshape(16, 16).astype(np.float64) / scale
    step = 1 / 65535 if decoded.dtype.itemsize == 2 else 1 / 255
    np.testing.assert_allclose(decoded[0].numpy() * step, expected, atol=step)


# --- DICOM display mapping and bombs --------------------------------------------------------------------------------

def _first_dicom(data: Path) -> Path:
    return sorted((data / "images").rglob("*.dcm"))[0]


@pytest.mark.parametrize("slope, intercept", [("NaN", "0"), ("1", "inf"), ("1e308", "0")])
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warning must not leak to the user
def test_non_finite_display_mapping_makes_the_image_unreadable(data, slope, intercept):
    victim = _first_dicom(data)
    ds = pydicom.dcmread(victim)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.save_as(victim)
    refused(["data", "check", data], [victim.name, "NaN or infinite"], data)


def _empty_voi_lut(ds):
    item = pydicom.Dataset()
    item.LUTDescriptor, item.LUTData = [0, 0, 16], b""
    ds.VOILUTSequence = pydicom.Sequence([item])


def _zero_width_sigmoid(ds):
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 100, 0, "SIGMOID"


@pytest.mark.parametrize("damage", [_empty_voi_lut, _zero_width_sigmoid])
def test_a_damaged_voi_lut_or_window_makes_the_image_unreadable(data, damage):
    victim = _first_dicom(data)
    ds = pydicom.dcmread(victim)
    damage(ds)
    ds.save_as(victim)
    refused(["data", "check", data], [victim.name, "VOI LUT or window"], data)


def test_a_dicom_header_nested_hundreds_deep_is_listed_not_a_crash(data):
    """A crafted 20 kB file of sequences nested 400 deep made pydicom recurse past Python's limit (RecursionError,
    a RuntimeError the readers did not catch): one such file in a folder lost the whole prediction."""
    victim = _first_dicom(data)  # explicit VR little endian, as synth writes it
    raw = victim.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # after (0002,0000) and the group it counts
    sequence = (0x0008).to_bytes(2, "little") + (0x1115).to_bytes(2, "little") + b"SQ\0\0" + b"\xff" * 4
    item, item_end, sequence_end = (bytes.fromhex(h) for h in ("feff00e0ffffffff", "feff0de000000000",
                                                                 "feffdde000000000"))
    victim.write_bytes(raw[:meta_end] + (sequence + item) * 400 + (item_end + sequence_end) * 400 + raw[meta_end:])
    refused(["data", "check", data], [victim.name, "nests sequences deeper"], data)


def test_an_extremely_elongated_image_is_refused_before_any_resize(tmp_path):
    for name in ("normal", "opacity"):
        (tmp_path / "set" / name).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "set" / name / f"{k}.png")
    Image.fromarray(np.zeros((2, 20_000), np.uint8)).save(tmp_path / "set" / "normal" / "strip.png")
    refused(["data", "check", tmp_path / "set"], ["strip.png", "more than 50 times the other"], tmp_path)


def test_yaml_aliases_in_a_recipe_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("name: bomb\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\ntrain: {epochs: [*c, *c, *c, *c, *c, *c]}\n")
    refused(["finetune", "--recipe", bomb, "--out", tmp_path / "run"], ["bomb.yaml", "alias"], tmp_path)
    refused(["finetune", "--set", "train={lr: &x [1], epochs: *x}", "--out", tmp_path / "run"], ["--set", "alias"],
            tmp_path)


def test_deep_nesting_and_repeated_keys_in_a_recipe_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\na: " + "[" * 5000 + "]" * 5000 + "\n")  # PyYAML would recurse 5000 deep
    refused(["finetune", "--recipe", deep, "--out", tmp_path / "run"], ["deep.yaml", "32 deep"], tmp_path)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: twice\ntrain:\n  epochs: 1\n  lr: 0.1\n  epochs: 6\n")
    refused(["finetune", "--recipe", twice, "--out", tmp_path / "run"], ["twice.yaml", "'epochs'", "twice", "line 5"],
            tmp_path)
    refused(["finetune", "--set", "train={epochs: 1, epochs: 2}", "--out", tmp_path / "run"], ["--set", "'epochs'"],
            tmp_path)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_a_float_key_must_be_finite(tmp_path, value):
    refused(["finetune", "--set", f"train.lr={value}", "--out", tmp_path / "run"], ["train.lr", "finite"], tmp_path)


def test_a_huge_value_is_cut_in_the_message(tmp_path):
    result = invoke(["finetune", "--set", f"data.augment={'x' * 100_000}", "--out", tmp_path / "run"], tmp_path)
    assert result.exit_code == 2 and "data.augment" in result.output and len(result.output) < 2_000


# --- predict over mixed files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(phantoms_train, tmp_path_factory) -> Path:
    return finetune("demo", data=phantoms_train, out=tmp_path_factory.mktemp("runs") / "run", overrides=TINY)


def test_predict_lists_bad_files_and_predicts_the_rest(run, phantoms_train, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((phantoms_train / "images" / "normal").glob("*.dcm"))[:2]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_text("not a picture")
    Image.fromarray(np.zeros((2, 20_000), np.uint8)).save(folder / "strip.png")
    result = invoke(["predict", run, folder, "--out", tmp_path / "p.csv"], run, folder)
    assert result.exit_code == 0, result.output
    assert "2 predictions written" in result.output and "broken.png" in result.output and "strip.png" in result.output
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert len(lines) == 5 and sum(",," not in line for line in lines[1:]) == 2  # 2 predicted, 2 listed with errors


def test_predict_without_any_readable_image_exits_2(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["predict", run, empty], ["no image files", "empty"], run)
    (empty / "broken.png").write_text("not a picture")
    refused(["predict", run, empty], ["none of the 1 image file(s)", "broken.png"], run)


def test_no_command_writes_a_run_inside_a_run_or_into_its_root(run, phantoms_train, tmp_path):
    inside = run / "plots" / "sub"
    refused(["finetune", "--data", phantoms_train, "--out", inside, *[f"--set={o}" for o in TINY]],
            [inside, "inside the run", "plots"], run)
    twin = tmp_path / "twin"
    shutil.copytree(run, twin)
    refused(["ensemble", run, twin, "--out", inside], [inside, "inside the run"], run)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    refused(["finetune", "--data", phantoms_train, "--out", afile], [afile, "a file of that name"], tmp_path)
    assert afile.read_text() == "mine"
    refused(["attack", run, "--pgd", "--eps", "1/255", "--steps", "2", "--limit", "2", "--no-checks",
             "--save-images", run, "--overwrite"], ["--save-images", "run directory"], run)
    refused(["data", "synth", inside, "--n", "8", "--size", "32"], [inside, "part of the run", "plots"], run)
    (tmp_path / "raw").mkdir()
    for out in (run, run / "plots"):
        refused(["data", "prepare", "nih-chestxray14", tmp_path / "raw", "--out", out, "--overwrite"],
                ["--out", "run"], run)
    assert not inside.exists()


def test_evaluate_checks_its_gallery_before_writing_its_json(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gallery = tmp_path / f"shortcuts-{run.name}-test.png"
    gallery.write_text("mine")
    refused(["evaluate", run, "--split", "test", "--json", tmp_path / "m.json", "--explain-summary"],
            ["--explain-summary gallery", "--overwrite"], tmp_path)
    assert not (tmp_path / "m.json").exists() and gallery.read_text() == "mine"


@pytest.mark.parametrize("edit", [("image_size: 32", "image_size: 96"), ("channels: 1", "channels: 3"),
                                  ("task: single", "task: multilabel")])
def test_a_recipe_edited_after_training_is_refused_by_the_commands_that_score(run, tmp_path, edit):
    """evaluate, attack and corrupt prepare images by recipe.yaml: edited, it would score other inputs silently
    (image_size: accuracy 0.67 became 0.0) or fail deep in the model."""
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    text = (edited / "recipe.yaml").read_text()
    assert edit[0] in text
    (edited / "recipe.yaml").write_text(text.replace(edit[0], edit[1]))
    key = "data." + edit[0].split(":")[0]
    for command in (["evaluate", edited, "--split", "test"],
                    ["attack", edited, "--fgsm", "--limit", "2", "--no-checks"]):
        refused(command, ["recipe.yaml and model.json disagree", key], edited)


def test_a_recipe_naming_a_class_in_decomposed_unicode_opens_after_training(phantoms_train, tmp_path):
    """The source composes class names (NFC); the recipe's decomposed 'opacite + accent' is the same class, so the
    run's recipe.yaml and model.json agree."""
    from medtricks.runs import open_run

    data = tmp_path / "data"
    shutil.copytree(phantoms_train, data)
    decomposed = "opacite\u0301"
    (data / "labels.csv").write_text((data / "labels.csv").read_text().replace(",opacity,", f",{decomposed},"))
    run = finetune("demo", data=data, out=tmp_path / "run",
                   overrides=[*TINY, f"data.classes=[normal, {decomposed}]"])
    assert open_run(run, "cpu").info["classes"] == ["normal", "opacit\u00e9"]


@pytest.mark.parametrize("command, kind", [(["attack", "--fgsm", "--limit", "2", "--no-checks"], "attacks"),
                                           (["corrupt", "--limit", "2", "--corruptions", "gaussian_noise",
                                             "--severities", "1"], "corruptions")])
def test_a_run_that_cannot_record_an_evaluation_is_named_before_and_after_the_work(run, tmp_path, monkeypatch,
                                                                                   command, kind):
    blocked = tmp_path / "blocked"
    shutil.copytree(run, blocked)
    shutil.rmtree(blocked / kind, ignore_errors=True)
    (blocked / kind).write_text("not a folder")
    refused([command[0], blocked, *command[1:]], [f"{kind}: not a folder"], blocked)
    import importlib

    for name in ("medtricks.robustness", "medtricks.corruption_report"):  # (the package's attributes of these
        module = importlib.import_module(name)  # names are functions) what the early check cannot see fails late
        monkeypatch.setattr(module, "check_record_folder", lambda run, kind: None)
    result = invoke([command[0], blocked, *command[1:], "--json", tmp_path / "r.json"], blocked)
    assert result.exit_code == 2 and "does not record this evaluation" in result.output, result.output
    assert json.loads((tmp_path / "r.json").read_text())["run"] == str(blocked)  # the user's file is written


def test_training_that_diverges_stops_with_exit_2_naming_the_epoch(phantoms_train, tmp_path):
    args = ["finetune", "--recipe", "demo", "--data", phantoms_train, "--out", tmp_path / "run",
            *[f"--set={o}" for o in TINY], "--set", "train.epochs=2", "--set", "train.lr=1e30"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert re.search(r"epoch [12]: the model's outputs on the validation split became NaN",
                     " ".join(result.output.split())), result.output
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_batch_of_one_at_a_small_image_size_is_named_not_a_batchnorm_traceback(phantoms_train, tmp_path):
    args = ["finetune", "--recipe", "demo", "--data", phantoms_train, "--out", tmp_path / "run",
            *[f"--set={o}" for o in TINY], "--set", "train.batch_size=1"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "set train.batch_size to 2 or more" in " ".join(result.output.split())


# --- recipe edge cases ----------------------------------------------------------------------------------------------

def test_recipe_files_that_are_empty_or_not_utf8(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    refused(["finetune", "--recipe", empty, "--out", tmp_path / "run"], ["empty.yaml", "empty"], tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: r\xe9sum\xe9\n".encode("latin-1"))
    refused(["finetune", "--recipe", latin, "--out", tmp_path / "run"], ["latin.yaml", "UTF-8"], tmp_path)


def test_seed_range_and_numbers_written_without_a_dot(tmp_path):
    refused(["finetune", "--seed", "-1", "--out", tmp_path / "run"], ["seed", "-1"], tmp_path)
    refused(["finetune", "--seed", str(2**40), "--out", tmp_path / "run"], ["seed"], tmp_path)
    assert load_recipe("demo", ["train.lr=1e-3", "train.weight_decay=5E-5"]).train.lr == 0.001
    refused(["finetune", "--set", "train.lr=fast", "--out", tmp_path / "run"], ["train.lr", "float"], tmp_path)


# --- write failures -------------------------------------------------------------------------------------------------

def test_a_disk_cache_that_cannot_be_written_is_named_before_decoding(phantoms_train, tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    sets = [x for kv in [*TINY, "data.cache=disk", f"data.cache_dir={blocker / 'cache'}"] for x in ("--set", kv)]
    refused(["finetune", "--data", phantoms_train, "--out", tmp_path / "run", *sets],
            ["data.cache_dir", "not_a_folder", "data.cache: memory"], phantoms_train, tmp_path)


def test_a_disk_cache_inside_another_runs_own_folders_is_refused(run, phantoms_train, tmp_path):
    sets = [x for kv in [*TINY, "data.cache=disk", f"data.cache_dir={run / 'plots'}"] for x in ("--set", kv)]
    refused(["finetune", "--data", phantoms_train, "--out", tmp_path / "new", *sets],
            ["data.cache_dir", "part of the run", "plots"], run, phantoms_train)


def test_a_damaged_disk_cache_file_is_decoded_again(phantoms, tmp_path):
    from medtricks.data.dataset import ImageStore, prepare_images
    from medtricks.data.sources import load_source

    records = load_source(phantoms).records[:3]
    store = ImageStore(records, 1, 32, "disk", tmp_path / "cache")
    prepare_images(store, workers=0)
    reference = store.load(1).clone()
    store.cache_file(1).write_bytes(b"\x93NUMPY damaged")
    torch.testing.assert_close(ImageStore(records, 1, 32, "disk", tmp_path / "cache").load(1), reference)


def test_a_recipe_name_cannot_leave_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(["finetune", "--set", "name=../../evil"], ["name", "../../evil", "letters, digits"], tmp_path)
    assert not (tmp_path.parent / "evil").exists()
    spaced = tmp_path / "my recipe (v2).yaml"
    spaced.write_text("train: {epochs: 1}\n")
    assert load_recipe(spaced).name == "my_recipe__v2_"  # a file name becomes a safe run-folder name


def test_adversarial_image_names_stay_legal_whatever_the_class_names(tmp_path):
    import torch

    from medtricks.robustness import _save_adversarial

    classes = ["n" * 300, "é" * 200]  # 300 and 400 bytes as they are
    _save_adversarial(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), torch.tensor([1, 0]), classes, tmp_path, 0)
    findings = [f"finding_{k}_{'x' * 30}" for k in range(14)]  # multi-label: every finding present, joined by +
    _save_adversarial(torch.rand(1, 1, 8, 8), torch.ones(1, 14), torch.ones(1, 14), findings, tmp_path, 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 3 and all(len(n.encode()) <= 255 for n in names), names
