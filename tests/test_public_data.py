"""Named public data sets: fetch (against a local HTTP server), prepare (on copies of the official layouts) and
their use as data.source. Nothing here touches the internet."""

import csv
import hashlib
import io
import os
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import nothing_lost
from medtricks.cli import app
from medtricks.data import archive, catalog, public
from medtricks.data.catalog import PublicSet, RemoteFile
from medtricks.data.prepare import kermany_patient
from medtricks.data.sources import LabelFormat, load_source

runner = CliRunner()
BODY = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(BODY).hexdigest()
NAME = "test:blob@1"


class _Handler(BaseHTTPRequestHandler):
    """Serves BODY (or state["body"]) with Range support; drops the connection half way while `drops` > 0."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        state = self.server.state
        state["ranges"].append(self.headers.get("Range"))
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
        body = state.get("body", BODY)
        payload = body[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if state["drops"] > 0:
            state["drops"] -= 1
            payload = payload[: len(payload) // 2]
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = {"ranges": [], "drops": 0}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty MEDTRICKS_CACHE of the test's own; network allowed (the conftest sets MEDTRICKS_OFFLINE)."""
    monkeypatch.setenv("MEDTRICKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDTRICKS_OFFLINE", raising=False)
    monkeypatch.delenv(catalog.MIRROR_ENV, raising=False)
    return tmp_path / "cache"


def _register(monkeypatch, url: str, sha256: str | None = SHA) -> PublicSet:
    spec = PublicSet(NAME, "test blob", "CC0 test licence", "Tester T., The Blob (2025).", "README.md",
                     files=(RemoteFile(url, "blob.bin", sha256=sha256),))
    monkeypatch.setitem(catalog.REGISTRY, NAME, spec)
    return spec


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/files/blob.bin"


def _fetch(*extra):
    return runner.invoke(app, ["data", "fetch", NAME, *extra])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_fetch_installs_the_verified_file_and_prints_the_licence(server, cache, monkeypatch):
    spec = _register(monkeypatch, "https://example.invalid/record/blob.bin?download=1")
    monkeypatch.setenv(catalog.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}/files/")  # the URL base
    result = _fetch()
    assert result.exit_code == 0, result.output
    assert spec.folder == cache / "data" / "test" / "blob@1"
    assert (spec.folder / "blob.bin").read_bytes() == BODY
    assert _files(spec.folder) == ["SOURCE.txt", "blob.bin"]
    assert f"sha256 {SHA} (verified)" in result.output
    assert "CC0 test licence" in result.output and "The Blob (2025)" in result.output
    assert server.state["ranges"] == [None]
    again = _fetch()  # already there: nothing downloaded
    assert again.exit_code == 0 and "already installed" in again.output and server.state["ranges"] == [None]


def test_fetch_resumes_a_broken_transfer_with_range(server, cache, monkeypatch):
    spec = _register(monkeypatch, _url(server))
    server.state["drops"] = 1  # the first transfer breaks half way: resumed within the same command
    result = _fetch()
    assert result.exit_code == 0, result.output
    assert server.state["ranges"] == [None, f"bytes={len(BODY) // 2}-"]
    assert (spec.folder / "blob.bin").read_bytes() == BODY and "verified" in result.output

    # a transfer that keeps breaking stops, keeps its part file, and the next command resumes from it
    monkeypatch.setattr(public, "ATTEMPTS", 1)
    server.state.update(ranges=[], drops=1)
    broken = _fetch("--force")
    assert broken.exit_code == 2 and "resumes" in broken.output and "Traceback" not in broken.output
    part = spec.folder / "blob.bin.part"
    assert part.stat().st_size == len(BODY) // 2
    resumed = _fetch("--force")
    assert resumed.exit_code == 0, resumed.output
    assert server.state["ranges"] == [None, f"bytes={len(BODY) // 2}-"]
    assert (spec.folder / "blob.bin").read_bytes() == BODY and not part.exists()


def test_fetch_refuses_a_checksum_mismatch_and_leaves_nothing(server, cache, monkeypatch):
    spec = _register(monkeypatch, _url(server), sha256="0" * 64)
    result = _fetch()
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert SHA in result.output and "0" * 64 in result.output and "nothing was installed" in result.output
    assert _files(spec.folder) == []  # no file, no part file


def test_fetch_refuses_an_unverifiable_file_unless_no_verify(server, cache, monkeypatch):
    spec = _register(monkeypatch, _url(server), sha256=None)
    refused = _fetch()
    assert refused.exit_code == 2 and "--no-verify" in refused.output and _files(spec.folder) == []
    assert server.state["ranges"] == []  # refused before downloading anything
    result = _fetch("--no-verify")
    assert result.exit_code == 0, result.output
    assert "NOT verified" in result.output and (spec.folder / "blob.bin").read_bytes() == BODY


def test_fetch_offline_names_the_url_and_the_folder(cache, monkeypatch):
    spec = _register(monkeypatch, "http://127.0.0.1:9/files/blob.bin")  # discard port: nothing listens
    for offline in (True, False):
        if offline:
            monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
        else:
            monkeypatch.delenv("MEDTRICKS_OFFLINE")
        result = _fetch()
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        text = " ".join(result.output.split())
        assert "http://127.0.0.1:9/files/blob.bin" in text and str(spec.folder / "blob.bin") in text
        assert ("MEDTRICKS_OFFLINE" in text) == offline
        assert _files(spec.folder) == []


def test_the_medmnist_names_point_at_the_official_files():
    spec = catalog.find_set("medmnist:pneumoniamnist@28")
    assert spec.files[0].url == "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
    assert spec.files[0].md5 == "28209eda62fecd6e6a2d98b1501bb15f"
    assert catalog.find_set("medmnist:retinamnist@224").files[0].filename == "retinamnist_224.npz"
    assert all(f.md5 or f.sha256 or f.unchecked for s in catalog.REGISTRY.values() for f in s.files)


@pytest.mark.parametrize("name, filename, md5", [  # medmnist/info.py of medmnist 3.0.2 (MD5, MD5_64, ...)
    ("medmnist:bloodmnist@28", "bloodmnist.npz", "7053d0359d879ad8a5505303e11de1dc"),
    ("medmnist:pathmnist@64", "pathmnist_64.npz", "55aa9c1e0525abe5a6b9d8343a507616"),
    ("medmnist:organamnist@128", "organamnist_128.npz", "eeae80d0a227a8d099027e1b3cfd3b60"),
    ("medmnist:organsmnist@224", "organsmnist_224.npz", "b354719e553fbbb2513d5533f52a4cb1"),
])
def test_new_medmnist_names_carry_the_published_md5(name, filename, md5):
    remote = catalog.find_set(name).files[0]
    assert (remote.filename, remote.md5) == (filename, md5)
    assert remote.url == f"https://zenodo.org/records/10519652/files/{filename}?download=1"
    md5s = [f.md5 for s in catalog.REGISTRY.values() for f in s.files]
    assert len(md5s) == len(set(md5s))  # no checksum pasted twice


# ---- prepare -----------------------------------------------------------------------------------------------------

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_ROWS = [  # as in the official file (including its trailing comma)
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
    "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.168,0.168,",
    "00000003_000.png,Hernia|Pneumonia,0,3,074Y,F,AP,2048,2500,0.168,0.168,",
    "00000004_000.png,No Finding,0,4,82,M,AP,2048,2500,0.168,0.168,",  # its PNG is not downloaded
]


def _png(path: Path, value: int, rgb: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3) if rgb else (8, 8), value, np.uint8)).save(path)


def _nih_raw(root: Path) -> Path:
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *NIH_ROWS]) + "\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n00000004_000.png\n")
    (root / "test_list.txt").write_text("00000003_000.png\n")
    for i, name in enumerate(["00000001_000.png", "00000001_001.png", "00000002_000.png"]):
        _png(root / "images_001" / "images" / name, 40 * i)
    _png(root / "images_002" / "images" / "00000003_000.png", 200)
    return root


def test_prepare_nih_chestxray14_writes_the_manifest_row_by_row(tmp_path, cache):
    raw = _nih_raw(tmp_path / "nih")
    with nothing_lost(raw):
        result = runner.invoke(app, ["data", "prepare", "nih-chestxray14", str(raw)])
    assert result.exit_code == 0, result.output
    out = cache / "data" / "nih-chestxray14"
    rows = list(csv.DictReader(open(out / "labels.csv")))
    images = raw.resolve()
    assert rows == [
        {"path": str(images / "images_001/images/00000001_000.png"), "label": "Cardiomegaly",
         "patient_id": "nih-00000001", "split": "train", "follow_up": "0", "view": "PA", "age": "58", "sex": "M"},
        {"path": str(images / "images_001/images/00000001_001.png"), "label": "Cardiomegaly|Emphysema",
         "patient_id": "nih-00000001", "split": "train", "follow_up": "1", "view": "PA", "age": "58", "sex": "M"},
        {"path": str(images / "images_001/images/00000002_000.png"), "label": "No Finding",
         "patient_id": "nih-00000002", "split": "train", "follow_up": "0", "view": "PA", "age": "81", "sex": "M"},
        {"path": str(images / "images_002/images/00000003_000.png"), "label": "Hernia|Pneumonia",
         "patient_id": "nih-00000003", "split": "test", "follow_up": "0", "view": "AP", "age": "74", "sex": "F"},
    ]
    assert "left out: 1 rows" in " ".join(result.output.split())
    # medtricks reads it as a multi-label source with the official split, by the name alone
    source = load_source(catalog.resolve_named("nih-chestxray14"), ("Cardiomegaly", "Emphysema", "Hernia", "Pneumonia"),
                         LabelFormat(multilabel=True))
    assert [r["label"] for r in source.records] == [(1, 0, 0, 0), (1, 1, 0, 0), (0, 0, 0, 0), (0, 0, 1, 1)]
    assert source.has_splits and source.has_patient_ids
    again = runner.invoke(app, ["data", "prepare", "nih-chestxray14", str(raw)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(app, ["data", "prepare", "nih-chestxray14", str(raw), "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("damage, words", [
    (lambda raw: (raw / "test_list.txt").unlink(), ["test_list.txt", "missing"]),
    (lambda raw: (raw / "Data_Entry_2017.csv").unlink(), ["Data_Entry_2017.csv", "missing"]),
    (lambda raw: (raw / "Data_Entry_2017.csv").write_text(
        NIH_HEADER.replace("Patient ID,", "") + "\n" + NIH_ROWS[0] + "\n"), ["'Patient ID'", "missing"]),
    (lambda raw: [p.rename(raw / ("x" + p.name)) for p in raw.glob("images_*")], ["images*/", "folder"]),
    # a cut-off download, a list saved as UTF-16 and an empty patient id were tracebacks
    (lambda raw: (raw / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *NIH_ROWS, "00000005_000.png,Mass"])),
     ["Data_Entry_2017.csv", "line(s) 7", "fewer cells"]),
    (lambda raw: (raw / "test_list.txt").write_text("00000003_000.png\n", encoding="utf-16"),
     ["test_list.txt", "UTF-8"]),
    (lambda raw: (raw / "Data_Entry_2017.csv").write_text(
        "\n".join([NIH_HEADER, NIH_ROWS[0].replace(",0,1,58,", ",0, ,58,")])), ["00000001_000.png has no Patient ID"]),
])
def test_prepare_refuses_a_wrong_layout_naming_what_is_missing(tmp_path, cache, damage, words):
    raw = _nih_raw(tmp_path / "nih")
    damage(raw)
    with nothing_lost(raw):
        result = runner.invoke(app, ["data", "prepare", "nih-chestxray14", str(raw), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    assert not (tmp_path / "o" / "labels.csv").exists()


def test_prepare_nih_names_what_the_official_lists_overlap_and_keeps_other_patient_ids(tmp_path, cache):
    """An image in both lists went to test unsaid, patients in both splits were not counted (as for Kermany), and a
    Patient ID that is not a number was a traceback."""
    raw = _nih_raw(tmp_path / "nih")
    (raw / "test_list.txt").write_text("00000003_000.png\n00000001_001.png\n")  # also in train_val_list.txt
    rows = [row.replace(",0,3,074Y,", ",0,P3,074Y,") for row in NIH_ROWS]
    (raw / "Data_Entry_2017.csv").write_text("\n".join([NIH_HEADER, *rows]) + "\n")
    with nothing_lost(raw):
        result = runner.invoke(app, ["data", "prepare", "nih-chestxray14", str(raw), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 image(s) are in both train_val_list.txt and test_list.txt; they are in test" in text
    assert "1 patient(s) have images in both the official train and test splits" in text
    written = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader(open(tmp_path / "o" / "labels.csv"))}
    assert written["00000001_001.png"]["split"] == "test" and written["00000003_000.png"]["patient_id"] == "nih-P3"


KERMANY = {  # official folder layout and file-name patterns; patient id expected for each
    "train/NORMAL/IM-0115-0001.jpeg": "IM-0115", "train/NORMAL/IM-0115-0002.jpeg": "IM-0115",
    "train/NORMAL/NORMAL2-IM-0427-0001.jpeg": "NORMAL2-IM-0427",
    "train/PNEUMONIA/person1_bacteria_1.jpeg": "person1", "train/PNEUMONIA/person1_virus_6.jpeg": "person1",
    "train/PNEUMONIA/person22_bacteria_77.jpeg": "person22",
    "test/NORMAL/IM-0001-0001.jpeg": "IM-0001", "test/PNEUMONIA/person100_bacteria_475.jpeg": "person100",
    "val/NORMAL/NORMAL2-IM-1427-0001.jpeg": "NORMAL2-IM-1427",
    "val/PNEUMONIA/person1946_bacteria_4874.jpeg": "person1946",
}


def test_kermany_patient_ids_from_file_names():
    assert kermany_patient("person1_virus_6") == ("person1", "virus")
    assert kermany_patient("NORMAL2-IM-0427-0001") == ("NORMAL2-IM-0427", "")
    assert kermany_patient("IM-0115-0001") == ("IM-0115", "")
    assert kermany_patient("scan_7") == (None, "")


def test_prepare_kermany_cxr(tmp_path, cache):
    raw = tmp_path / "kermany"
    for i, rel in enumerate(KERMANY):
        _png(raw / "chest_xray" / rel, 10 * i, rgb="PNEUMONIA" in rel)
    out = tmp_path / "prepared"
    with nothing_lost(raw):
        result = runner.invoke(app, ["data", "prepare", "kermany-cxr", str(raw), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).relative_to((raw / "chest_xray").resolve()).as_posix(): r
            for r in csv.DictReader(open(out / "labels.csv"))}
    assert set(rows) == set(KERMANY)
    for rel, patient in KERMANY.items():
        row, official = rows[rel], rel.split("/")[0]
        assert row["patient_id"] == f"kermany-{patient}" and row["official_split"] == official
        assert row["split"] == ("test" if official == "test" else "train")  # val carved by medtricks, by patient
        assert row["label"] == rel.split("/")[1].lower()
        assert row["kind"] == ("bacteria" if "bacteria" in rel else "virus" if "virus" in rel else "")
    source = load_source(out, ("normal", "pneumonia"))
    assert len(source.records) == 10 and source.has_splits
    assert "8 patients" in result.output

    (raw / "chest_xray" / "test" / "PNEUMONIA" / "person100_bacteria_475.jpeg").unlink()
    (raw / "chest_xray" / "test" / "PNEUMONIA").rmdir()
    broken = runner.invoke(app, ["data", "prepare", "kermany-cxr", str(raw), "--out", str(tmp_path / "o2")])
    assert broken.exit_code == 2 and "chest_xray/test/PNEUMONIA/" in broken.output
    inside = runner.invoke(app, ["data", "prepare", "kermany-cxr", str(raw), "--out", str(raw / "x")])
    assert inside.exit_code == 2 and "inside RAW_DIR" in inside.output and not (raw / "x").exists()


# ---- named sources -----------------------------------------------------------------------------------------------

# the recipe file of this checkout (an editable install of another checkout would serve its own by name)
PNEUMONIAMNIST = str(Path(__file__).resolve().parents[1] / "recipes" / "pneumoniamnist.yaml")
FAST = ["--set", "train.epochs=1", "--set", "data.image_size=32", "--set", "data.workers=0", "--set",
        "train.batch_size=8", "--set", "train.eval_batch_size=16"]


def test_a_named_source_not_cached_names_the_command(tmp_path, cache):
    result = runner.invoke(app, ["finetune", "--recipe", PNEUMONIAMNIST, "--out", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "medtricks data fetch medmnist:pneumoniamnist@28" in result.output
    run = str(tmp_path / "n")
    nih = runner.invoke(app, ["finetune", "--recipe", "demo", "--data", "nih-chestxray14", "--out", run])
    text = " ".join(nih.output.split())
    assert nih.exit_code == 2 and "medtricks data prepare nih-chestxray14 RAW_DIR" in text
    assert "nihcc.app.box.com" in text
    unknown = runner.invoke(app, ["data", "check", "medmnist:nosuchmnist@28"])
    assert unknown.exit_code == 2 and "not a known public data set" in unknown.output
    assert "nih-chestxray14" in unknown.output and "pneumoniamnist" in unknown.output


def test_finetune_reads_a_cached_named_source_without_data(tmp_path, cache):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 24), ("val", 12), ("test", 12)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
        images[labels == 1, 8:20, 8:20] = 230  # an easy "opacity"
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1)
    folder = cache / "data" / "medmnist" / "pneumoniamnist@28"
    folder.mkdir(parents=True)
    np.savez(folder / "pneumoniamnist.npz", **arrays)
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--recipe", PNEUMONIAMNIST, "--out", str(out), "--quiet", *FAST])
    assert result.exit_code == 0, result.output
    report = (out / "report.json").read_text()
    assert '"n": 12' in report  # the npz's own val and test splits
    assert os.path.isfile(out / "model.safetensors")


COVID_HEADER = ("patientid,offset,sex,age,finding,RT_PCR_positive,survival,intubated,intubation_present,went_icu,"
                "in_icu,needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
                "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,"
                "other_notes,Unnamed: 29")
COVID_ROWS = [  # (patientid, sex, age, finding, view, modality, folder, filename, license); last: image written?
    ("2", "M", "65", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "a.jpg", "CC BY-NC-SA 4.0", True),
    ("2", "M", "65", "Pneumonia/Viral/COVID-19", "AP Supine", "X-ray", "images", "b.jpg", "CC BY-NC-SA 4.0", True),
    ("7", "F", "", "Pneumonia/Bacterial/Streptococcus", "PA", "X-ray", "images", "c.png", "CC BY 4.0", True),
    ("9", "F", "40", "No Finding", "PA", "X-ray", "images", "d.jpeg", "", True),
    ("2", "M", "65", "Pneumonia/Viral/COVID-19", "L", "X-ray", "images", "e.jpg", "CC BY 4.0", True),  # lateral
    ("3", "M", "50", "Pneumonia/Viral/COVID-19", "Axial", "CT", "volumes", "f.nii.gz", "CC BY 4.0", False),
    ("4", "F", "30", "todo", "PA", "X-ray", "images", "g.jpg", "CC BY 4.0", True),
    ("5", "F", "30", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "h.jpg", "CC BY 4.0", False),  # absent
]


def _covid_raw(raw: Path) -> Path:
    """A copy of the repository's layout: metadata.csv with the official header, images/ with real PNG / JPEG."""
    raw.mkdir(parents=True)
    lines = [COVID_HEADER]
    for pid, sex, age, finding, view, modality, folder, name, licence, written in COVID_ROWS:
        lines.append(f'{pid},0,{sex},{age},{finding},Y,,,,,,,,,,,,,{view},{modality},2020,"Wuhan, China",{folder},'
                     f'{name},10.1/x,https://example.org/{name},{licence},"notes, with a comma",,')
        if written:
            _png(raw / folder / name, 100, rgb=True)
    (raw / "metadata.csv").write_text("\n".join(lines) + "\n")
    return raw


def test_prepare_covid19_collection_keeps_frontal_xrays_and_licences(tmp_path, cache):
    raw = _covid_raw(tmp_path / "covid-chestxray-dataset")
    with nothing_lost(raw):
        result = runner.invoke(app, ["data", "prepare", "covid19-image-data-collection", str(raw)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(cache / "data" / "covid19-image-data-collection" / "labels.csv")))
    base = raw.resolve() / "images"
    assert [(r["path"], r["label"], r["patient_id"], r["view"], r["license"]) for r in rows] == [
        (str(base / "a.jpg"), "covid19", "ieee8023-2", "PA", "CC BY-NC-SA 4.0"),
        (str(base / "b.jpg"), "covid19", "ieee8023-2", "AP Supine", "CC BY-NC-SA 4.0"),
        (str(base / "c.png"), "other_pneumonia", "ieee8023-7", "PA", "CC BY 4.0"),
        (str(base / "d.jpeg"), "no_finding", "ieee8023-9", "PA", ""),
    ]
    assert rows[2]["finding"] == "Pneumonia/Bacterial/Streptococcus" and rows[0]["url"] == "https://example.org/a.jpg"
    text = " ".join(result.output.split())
    for word in ["not a frontal view", "not X-ray", "finding outside the three classes", "image file absent"]:
        assert f"left out: 1 rows ({word})" in text
    assert "none given 1" in text
    source = load_source(catalog.resolve_named("covid19-image-data-collection"),
                         ("no_finding", "covid19", "other_pneumonia"))
    assert [r["label"] for r in source.records] == [1, 1, 2, 0] and not source.has_splits

    for name in ("../../outside.png", "/etc/hostname"):  # a label file naming an image outside RAW_DIR
        text = (raw / "metadata.csv").read_text().replace(",images,a.jpg,", f",images,{name},")
        (raw / "metadata.csv").write_text(text)
        outside = runner.invoke(app, ["data", "prepare", "covid19-image-data-collection", str(raw), "--out",
                                      str(tmp_path / "o")])
        assert outside.exit_code == 2 and "leads outside" in " ".join(outside.output.split()), outside.output
        (raw / "metadata.csv").write_text(text.replace(f",images,{name},", ",images,a.jpg,"))

    (raw / "metadata.csv").write_text(COVID_HEADER.replace("license,", "") + "\n")
    broken = runner.invoke(app, ["data", "prepare", "covid19-image-data-collection", str(raw), "--out",
                                 str(tmp_path / "o")])
    assert broken.exit_code == 2 and "'license'" in broken.output


def test_shipped_recipes_name_registered_public_sets():
    import yaml

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    sources = {p.stem: yaml.safe_load(p.read_text())["data"].get("source") for p in recipes.glob("*.yaml")}
    assert sources["pneumoniamnist"] == "medmnist:pneumoniamnist@28"
    assert sources["fundus_dr"] == "medmnist:retinamnist@28"
    assert sources["covid_cxr"] == "covid19-image-data-collection"
    for name, source in sources.items():
        if source is not None and source in catalog.REGISTRY:
            assert "shared" not in source
        elif source is not None:  # a path: only the demo's own synthetic folder
            assert name == "demo" and ".." not in Path(source).parts, (name, source)


def test_a_bare_word_source_stays_a_path_so_the_demo_writes_its_phantoms(tmp_path, monkeypatch):
    """`demo_data` (no ':') is a folder the demo recipe creates on first use, not a data-set name."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["finetune", "--recipe", "demo", "--out", "runs/demo", "--set", "train.epochs=1",
                                 "--set", "data.image_size=32", "--set", "train.limit_train_batches=2", "--set",
                                 "data.workers=0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo_data").is_dir() and (tmp_path / "runs" / "demo" / "report.json").is_file()
    missing = runner.invoke(app, ["data", "check", "no_such_folder"])
    assert missing.exit_code == 2 and "not found" in missing.output


# ---- fetch of a repository archive (the COVID-19 image data collection) ------------------------------------------

COVID = "covid19-image-data-collection"
TOP = f"covid-chestxray-dataset-{catalog.COVID_COMMIT}"


def _tar_gz(folder: Path, extra=()) -> bytes:
    """`folder` as the repository archive (its files under TOP/), plus `extra` (TarInfo, bytes) members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=TOP)
        for info, data in extra:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _serve_covid(server, monkeypatch, body: bytes) -> None:
    server.state["body"] = body
    monkeypatch.setenv(catalog.MIRROR_ENV, f"http://127.0.0.1:{server.server_address[1]}/covid/")


def _cache_entries(cache: Path) -> list[str]:
    """Everything under the cache, folders and hidden temporary entries included."""
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) if cache.exists() else []


def test_the_covid_collection_is_fetched_at_the_pinned_commit():
    spec = catalog.find_set(COVID)
    assert catalog.COVID_COMMIT == "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8"
    assert spec.files[0].url == ("https://codeload.github.com/ieee8023/covid-chestxray-dataset/tar.gz/"
                                 "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8")
    assert spec.files[0].md5 is None and spec.files[0].sha256 is None and "pinned" in spec.files[0].unchecked
    assert spec.prepare is not None  # a clone can still be prepared


def test_fetch_covid_archive_end_to_end_matches_prepare(server, cache, tmp_path, monkeypatch):
    body = _tar_gz(_covid_raw(tmp_path / "repo"))
    _serve_covid(server, monkeypatch, body)
    server.state["drops"] = 1  # the transfer breaks half way: resumed from the .part file
    result = runner.invoke(app, ["data", "fetch", COVID, "--no-verify"])
    assert result.exit_code == 0, result.output
    assert server.state["ranges"] == [None, f"bytes={len(body) // 2}-"]
    text = " ".join(result.output.split())
    assert f"sha256 {hashlib.sha256(body).hexdigest()} (NOT verified: --no-verify)" in text
    spec = catalog.find_set(COVID)
    assert spec.licence.split(":")[0] in text and "Cohen J.P., Morrison P." in text  # licence and citation
    folder = cache / "data" / COVID
    # the prepared set and the extracted repository; no archive, no .part, no temporary folder
    assert sorted(p.name for p in (cache / "data").iterdir()) == [COVID]
    assert sorted(p.name for p in folder.iterdir()) == ["SOURCE.txt", TOP, "labels.csv"]
    assert catalog.COVID_COMMIT in (folder / "SOURCE.txt").read_text()
    # the same rows as `data prepare` on the extracted folder, pointing into the cache folder
    prepared = runner.invoke(app, ["data", "prepare", COVID, str(folder / TOP), "--out", str(tmp_path / "o")])
    assert prepared.exit_code == 0, prepared.output
    fetched_rows = list(csv.DictReader(open(folder / "labels.csv")))
    assert fetched_rows == list(csv.DictReader(open(tmp_path / "o" / "labels.csv")))
    assert [Path(r["path"]).name for r in fetched_rows] == ["a.jpg", "b.jpg", "c.png", "d.jpeg"]
    assert all(Path(r["path"]).is_file() and (folder / TOP).resolve() in Path(r["path"]).parents
               for r in fetched_rows)
    source = load_source(catalog.resolve_named(COVID), ("no_finding", "covid19", "other_pneumonia"))
    assert [r["label"] for r in source.records] == [1, 1, 2, 0]
    again = runner.invoke(app, ["data", "fetch", COVID])
    assert again.exit_code == 0 and "already installed" in again.output and len(server.state["ranges"]) == 2
    server.state["drops"] = 0
    forced = runner.invoke(app, ["data", "fetch", COVID, "--force", "--no-verify"])  # replaces the folder
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in (cache / "data").iterdir()) == [COVID]
    assert list(csv.DictReader(open(folder / "labels.csv"))) == fetched_rows


def test_fetch_covid_archive_without_no_verify_installs_nothing(server, cache, tmp_path, monkeypatch):
    body = _tar_gz(_covid_raw(tmp_path / "repo"))
    _serve_covid(server, monkeypatch, body)
    result = runner.invoke(app, ["data", "fetch", COVID])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "--no-verify" in text and f"commit {catalog.COVID_COMMIT} is pinned" in text
    assert "no published checksum" in text and "Nothing was downloaded" in text
    assert server.state["ranges"] == [] and _cache_entries(cache) in ([], ["data"])  # refused before the transfer


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("extra, bounds, words", [
    ([(_member("../evil.txt"), b"x")], {}, ["'../evil.txt'", "leaves the folder"]),
    ([(_member(f"{TOP}/images/../../evil.txt"), b"x")], {}, ["evil.txt", "leaves the folder"]),
    ([(_member(f"{TOP}/images/link.png", tarfile.SYMTYPE, "a.jpg"), b"")], {}, ["link.png", "symbolic link"]),
    ([(_member(f"{TOP}/images/hard.png", tarfile.LNKTYPE, f"{TOP}/images/a.jpg"), b"")], {}, ["hard link"]),
    ([(_member(f"/{TOP}/x.txt"), b"x")], {}, ["absolute path"]),
    ([], {"MAX_EXTRACT_MEMBERS": 4}, ["more than 4 members", "MAX_EXTRACT_MEMBERS"]),
    ([], {"MAX_EXTRACT_BYTES": 1000}, ["more than 1,000 bytes", "MAX_EXTRACT_BYTES"]),
])
def test_fetch_refuses_a_hostile_archive_and_leaves_nothing(server, cache, tmp_path, monkeypatch, extra, bounds,
                                                             words):
    for key, value in bounds.items():
        monkeypatch.setattr(archive, key, value)
    _serve_covid(server, monkeypatch, _tar_gz(_covid_raw(tmp_path / "repo"), extra))
    result = runner.invoke(app, ["data", "fetch", COVID, "--no-verify"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    for word in words:
        assert word in text, (word, text)
    assert "refused as unsafe" in text
    assert _cache_entries(cache) == ["data"]  # no half folder, no archive, no temporary folder
    assert not (tmp_path / "evil.txt").exists()


def test_fetch_refuses_an_archive_without_the_repository_layout(server, cache, tmp_path, monkeypatch):
    repo = _covid_raw(tmp_path / "repo")
    (repo / "metadata.csv").unlink()
    _serve_covid(server, monkeypatch, _tar_gz(repo))
    result = runner.invoke(app, ["data", "fetch", COVID, "--no-verify"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "the downloaded archive does not have the layout prepare expects" in text
    assert "metadata.csv is missing" in text and "Nothing was installed" in text
    assert _cache_entries(cache) == ["data"]


def test_fetch_covid_offline_names_the_url_and_the_folder(cache, monkeypatch):
    monkeypatch.setenv("MEDTRICKS_OFFLINE", "1")
    result = runner.invoke(app, ["data", "fetch", COVID, "--no-verify"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "MEDTRICKS_OFFLINE" in text and catalog.COVID_ARCHIVE.url in text
    assert str(cache / "data" / COVID) in text and f"medtricks data prepare {COVID}" in text
    assert _cache_entries(cache) == []


def test_data_list_shows_the_covid_collection_can_be_fetched_or_prepared(cache):
    result = runner.invoke(app, ["data", "list"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    assert (f"{COVID} not cached: `medtricks data fetch {COVID}` (or `medtricks data prepare {COVID} RAW_DIR` after "
            f"downloading") in text
