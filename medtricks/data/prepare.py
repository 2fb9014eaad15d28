"""From the official raw download of a public data set to a medtricks labels.csv (`medtricks data prepare`).

Each function reads RAW_DIR (never writes there) and writes `<out>/labels.csv`, whose `path` column holds the absolute
path of each image inside RAW_DIR: the images are not copied (ChestX-ray14 is 45 GB), so RAW_DIR must stay where it
is. A layout that does not match the official one is a DataError naming the missing file, folder or column.
What each function keeps and drops is in its data card (data_cards/nih_chestxray14.md, kermany_cxr.md,
covid19_image_data_collection.md). The challenge releases (IDRiD grading, ISIC 2016, CheXpert) are prepared in
medtricks.data.prepare_challenges with the helpers below.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter
from pathlib import Path

from medtricks.errors import DataError
from medtricks.files import write_text

logger = logging.getLogger(__name__)


def write_labels(out: Path, columns: list[str], rows: list[dict]) -> Path:
    """Write `rows` as `<out>/labels.csv` (atomically) with `columns` in that order; returns its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "labels.csv", buffer.getvalue())
    return out / "labels.csv"


def summary(first: str, left_out: list[tuple[int, str]]) -> list[str]:
    """A prepare step's summary: its first line, then "left out: N <what>" for each non-zero count (a prepare never
    drops a row or an image without saying so)."""
    return [first, *(f"left out: {n} {what}" for n, what in left_out if n)]


def read_csv(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The rows of a CSV with a header row, keyed by the header's names with surrounding spaces stripped (IDRiD's
    official header ends in 'Risk of macular edema '); a DataError names any `required` column that is missing."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
            columns = [c for c in reader.fieldnames or [] if c]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it ({exc}).") from exc
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: column(s) {', '.join(repr(c) for c in missing)} missing; found {columns}. Is this "
                        f"the official file, unmodified?")
    short = [k for k, row in enumerate(rows, start=2) if any(row.get(c) is None for c in required)]
    if short:  # csv gives None for the cells a row lacks
        raise DataError(f"{path}: line(s) {', '.join(map(str, short[:5]))}{' ...' if len(short) > 5 else ''} have "
                        f"fewer cells than the header (a cut-off download?). Download the file again.")
    return rows


def _read_list(path: Path) -> list[str]:
    """The names in an official split list (one per line)."""
    try:
        return path.read_text(encoding="utf-8-sig").split()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as a UTF-8 list of file names ({exc}). Is this the official file, "
                        f"unmodified?") from exc


def _inside(raw: Path, path: Path, what: str) -> Path:
    """`path`, refused when its name leads outside RAW_DIR (an absolute name or '..' in a label file); judged on the
    name, so RAW_DIR's own links to another disk still work."""
    if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(raw)):
        raise DataError(f"{what}: {path} leads outside {raw} (an absolute name or '..'); a label file names images "
                        f"inside RAW_DIR. Is this the official file, unmodified?")
    return path


# ---- NIH ChestX-ray14 --------------------------------------------------------------------------------------------

NIH_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position")
NIH_LISTS = ("train_val_list.txt", "test_list.txt")


def _nih_age(value: str) -> str:
    """'58', '058Y' (the first release wrote ages so) -> '58'; '' stays ''."""
    digits = value.strip().rstrip("YyMmDd")
    return str(int(digits)) if digits.isdigit() else ""


def prepare_nih_chestxray14(raw: Path, out: Path) -> list[str]:
    """NIH ChestX-ray14 -> labels.csv with a multi-label `label` column.

    RAW_DIR holds Data_Entry_2017.csv (or Data_Entry_2017_v2020.csv), train_val_list.txt, test_list.txt and the
    PNGs in folders named images* (`images/` from the NIH tar parts, `images_001/images/` in the Kaggle copy).

    Columns written: path, label (Finding Labels as is: findings joined by `|`, `No Finding` for none), patient_id
    (`nih-` + the 8-digit Patient ID that also starts the file name), split (train for train_val_list, test for
    test_list: medtricks carves val from train by patient), follow_up, view (PA/AP), age (years), sex (M/F).
    Dropped: rows whose PNG is not under RAW_DIR (a part not downloaded) and rows in neither list, both counted.
    """
    entry = next((raw / n for n in ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv") if (raw / n).is_file()), None)
    if entry is None:
        raise DataError(f"{raw}: Data_Entry_2017.csv is missing (the official label file of NIH ChestX-ray14, "
                        f"https://nihcc.app.box.com/v/ChestXray-NIHCC).")
    for name in NIH_LISTS:
        if not (raw / name).is_file():
            raise DataError(f"{raw}: {name} is missing (the official split lists train_val_list.txt and "
                            f"test_list.txt come with Data_Entry_2017.csv).")
    rows = read_csv(entry, NIH_COLUMNS)
    split_of, in_both = {}, 0
    for name, split in zip(NIH_LISTS, ("train", "test"), strict=True):
        for line in _read_list(raw / name):
            in_both += split_of.get(line) == "train" and split == "test"
            split_of[line] = split  # an image in both lists goes to test (counted): never train on a test image
    folders = sorted(p for p in raw.iterdir() if p.is_dir() and p.name.startswith("images"))
    if not folders:
        raise DataError(f"{raw}: no images*/ folder; unpack the images_*.tar.gz parts into RAW_DIR (they unpack to "
                        f"images/).")
    files = {p.name: p.resolve() for folder in folders for p in folder.rglob("*.png")}
    out_rows, absent, unlisted = [], 0, 0
    for row in rows:
        name = row["Image Index"].strip()
        if name not in files:
            absent += 1
            continue
        if name not in split_of:
            unlisted += 1
            continue
        patient = row["Patient ID"].strip()
        if not patient:
            raise DataError(f"{entry}: {name} has no Patient ID; medtricks splits by patient. Is this the official "
                            f"file, unmodified?")
        out_rows.append({"path": str(files[name]), "label": row["Finding Labels"].strip(),
                         "patient_id": f"nih-{int(patient):08d}" if patient.isdigit() else f"nih-{patient}",
                         "split": split_of[name],
                         "follow_up": row["Follow-up #"].strip(), "view": row["View Position"].strip(),
                         "age": _nih_age(row["Patient Age"]), "sex": row["Patient Gender"].strip()})
    if not out_rows:
        where = ", ".join(f"{f.name}/" for f in folders)
        raise DataError(f"{raw}: none of the {len(rows)} images of {entry.name} is under {where} (looked for the PNGs "
                        f"named in 'Image Index').")
    labels = write_labels(out, ["path", "label", "patient_id", "split", "follow_up", "view", "age", "sex"], out_rows)
    splits = Counter(r["split"] for r in out_rows)
    lines = summary(f"{labels}: {len(out_rows)} images of {len({r['patient_id'] for r in out_rows})} patients "
                    f"(train {splits['train']}, test {splits['test']}; val is carved from train by patient)",
                    [(absent, f"rows of {entry.name} whose PNG is not under RAW_DIR (parts not downloaded?)"),
                     (unlisted, "images in neither train_val_list.txt nor test_list.txt")])
    if in_both:
        lines.append(f"warning: {in_both} image(s) are in both train_val_list.txt and test_list.txt; they are in test")
    return lines + _patients_in_both(raw, out_rows)


def _patients_in_both(raw: Path, rows: list[dict]) -> list[str]:
    """A warning line (also logged) when patients have images in both official splits: their images would leak
    between training and test."""
    splits_of: dict[str, set] = {}
    for r in rows:
        splits_of.setdefault(r["patient_id"], set()).add(r["split"])
    both = sum(len(s) > 1 for s in splits_of.values())
    if not both:
        return []
    logger.warning("%s: %d patient(s) have images in both the official train and test splits", raw, both)
    return [f"warning: {both} patient(s) have images in both the official train and test splits"]


# ---- Kermany pediatric CXR ---------------------------------------------------------------------------------------

KERMANY_SPLITS = ("train", "test", "val")
KERMANY_CLASSES = {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
# Patient ids as the file names carry them (Kermany et al.'s release, checked on its published file list):
#   person1_bacteria_1.jpeg, person1_virus_6.jpeg  -> person1        (pneumonia images: person<N>_<kind>_<k>)
#   IM-0115-0001.jpeg                              -> IM-0115        (normal images: IM-<patient>-<image>)
#   NORMAL2-IM-0427-0001.jpeg                      -> NORMAL2-IM-0427 (a second batch of normals, own numbering)
_KERMANY_PATIENT = re.compile(r"^(person\d+)_(bacteria|virus)_\d+$|^((?:NORMAL2-)?IM-\d+)-\d+$")


def kermany_patient(stem: str) -> tuple[str | None, str]:
    """(patient id, pneumonia kind: bacteria | virus | '') parsed from a file stem; (None, '') when it matches no
    known pattern."""
    match = _KERMANY_PATIENT.match(stem)
    if match is None:
        return None, ""
    if match.group(1):
        return match.group(1), match.group(2)
    return match.group(3), ""


def prepare_kermany_cxr(raw: Path, out: Path) -> list[str]:
    """Kermany et al.'s pediatric chest X-rays -> labels.csv (normal / pneumonia).

    RAW_DIR holds chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg (or is that chest_xray folder itself).

    Columns written: path, label (normal | pneumonia), patient_id (`kermany-` + the id parsed from the file name, see
    `kermany_patient`; an unparsed name is its own patient, counted), split (train | test; the official val folder,
    16 images, goes to train so that medtricks carves a patient-level val), official_split, kind (bacteria | virus
    for pneumonia). Patients found in two official splits are counted (they are kept as published).
    """
    root = raw / "chest_xray" if (raw / "chest_xray").is_dir() else raw
    for split in ("train", "test"):
        for folder in KERMANY_CLASSES:
            if not (root / split / folder).is_dir():
                raise DataError(f"{raw}: the folder chest_xray/{split}/{folder}/ is missing; expected the official "
                                f"layout chest_xray/{{train,test,val}}/{{NORMAL,PNEUMONIA}}/*.jpeg.")
    rows, unparsed = [], 0
    for split in KERMANY_SPLITS:
        for folder, label in KERMANY_CLASSES.items():
            if not (root / split / folder).is_dir():
                continue
            for path in sorted((root / split / folder).iterdir()):
                if path.suffix.lower() not in (".jpeg", ".jpg", ".png") or path.name.startswith("."):
                    continue
                patient, kind = kermany_patient(path.stem)
                if patient is None:
                    unparsed += 1
                    patient = path.stem
                rows.append({"path": str(path.resolve()), "label": label, "patient_id": f"kermany-{patient}",
                             "split": "test" if split == "test" else "train", "official_split": split, "kind": kind})
    if not rows:
        raise DataError(f"{raw}: no .jpeg images under chest_xray/{{train,test}}/{{NORMAL,PNEUMONIA}}/.")
    labels = write_labels(out, ["path", "label", "patient_id", "split", "official_split", "kind"], rows)
    counts = Counter((r["split"], r["label"]) for r in rows)
    lines = [f"{labels}: {len(rows)} images of {len({r['patient_id'] for r in rows})} patients (train "
             f"{counts['train', 'normal']} normal / {counts['train', 'pneumonia']} pneumonia, test "
             f"{counts['test', 'normal']} / {counts['test', 'pneumonia']}; the official val folder joined train, val "
             f"is carved by patient)"]
    if unparsed:
        lines.append(f"{unparsed} file name(s) matched no known pattern: each is its own patient")
    return lines + _patients_in_both(raw, rows)


# ---- COVID-19 image data collection ------------------------------------------------------------------------------

COVID_COLUMNS = ("patientid", "finding", "view", "modality", "filename", "license")
COVID_FRONTAL = ("PA", "AP", "AP Supine", "AP semi erect", "AP Erect")


def covid_label(finding: str) -> str | None:
    """The `covid_cxr` class of a `finding` of metadata.csv: covid19, other_pneumonia, no_finding, else None."""
    finding = finding.strip()
    if "COVID-19" in finding:
        return "covid19"
    if finding == "No Finding":
        return "no_finding"
    if finding.split("/")[0] == "Pneumonia":
        return "other_pneumonia"
    return None


def prepare_covid19_collection(raw: Path, out: Path) -> list[str]:
    """Cohen et al.'s COVID-19 image data collection (a clone of github.com/ieee8023/covid-chestxray-dataset) ->
    labels.csv with the `covid_cxr` classes.

    RAW_DIR holds metadata.csv and the images in the folder its `folder` column names (`images/`).

    Kept: X-ray rows with a frontal view (PA, AP, AP Supine, AP semi erect, AP Erect) whose finding maps to a class
    (`covid_label`: any COVID-19 finding -> covid19; other `Pneumonia...` -> other_pneumonia; `No Finding` ->
    no_finding). Columns: path, label, finding, patient_id (`ieee8023-` + patientid), view, sex, age, license (per
    image, as published: keep the attribution), url. Dropped, and counted: CT and lateral views, other findings
    (tuberculosis, `todo`, ...), rows whose image file is absent. No split: medtricks splits by patient.
    """
    meta = raw / "metadata.csv"
    if not meta.is_file():
        raise DataError(f"{raw}: metadata.csv is missing (the collection's label file; clone "
                        f"https://github.com/ieee8023/covid-chestxray-dataset).")
    rows = read_csv(meta, COVID_COLUMNS)
    dropped: Counter = Counter()
    out_rows = []
    for row in rows:
        if row["modality"].strip() != "X-ray":
            dropped["not X-ray"] += 1
            continue
        if row["view"].strip() not in COVID_FRONTAL:
            dropped["not a frontal view"] += 1
            continue
        label = covid_label(row["finding"])
        if label is None:
            dropped["finding outside the three classes"] += 1
            continue
        path = raw / ((row.get("folder") or "images").strip() or "images") / row["filename"].strip()
        if not _inside(raw, path, str(meta)).is_file():
            dropped["image file absent"] += 1
            continue
        out_rows.append({"path": str(path.resolve()), "label": label, "finding": row["finding"].strip(),
                         "patient_id": f"ieee8023-{row['patientid'].strip()}", "view": row["view"].strip(),
                         "sex": (row.get("sex") or "").strip(), "age": (row.get("age") or "").strip(),
                         "license": row["license"].strip(), "url": (row.get("url") or "").strip()})
    if not out_rows:
        raise DataError(f"{raw}: none of the {len(rows)} rows of metadata.csv is a frontal X-ray with a COVID-19, "
                        f"pneumonia or No Finding label whose image is under RAW_DIR ({dict(dropped)}).")
    labels = write_labels(out, ["path", "label", "finding", "patient_id", "view", "sex", "age", "license", "url"],
                           out_rows)
    counts = Counter(r["label"] for r in out_rows)
    lines = [f"{labels}: {len(out_rows)} images of {len({r['patient_id'] for r in out_rows})} patients ("
             + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")",
             "licences: " + ", ".join(f"{k or 'none given'} {v}"
                                      for k, v in Counter(r["license"] for r in out_rows).most_common())]
    lines += [f"left out: {n} rows ({why})" for why, n in dropped.items()]
    return lines
