"""`medtricks data prepare` for challenge releases with an official train/test split of images and a label file:
IDRiD disease grading (ISBI 2018), ISIC 2016 Part 3 lesion classification (ISBI 2016) and CheXpert (Stanford).

As in medtricks.data.prepare: RAW_DIR is only read, `<out>/labels.csv` points at the images where they are, and a
layout that is not the official one is a DataError naming the missing file, folder or column before anything is
written. The official test split becomes `split` test; medtricks carves val from train (by patient where ids exist).
What each function keeps and drops is in its data card (data_cards/idrid.md, isic_dermoscopy.md, chexpert.md).
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from pathlib import Path

from medtricks.data.prepare import read_csv, summary, write_labels
from medtricks.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """The image files directly in `folder`, keyed by file name without extension."""
    return {p.stem: p.resolve() for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")}


def _split_counts(rows: list[dict], key: str = "label") -> str:
    counts = Counter((r["split"], r[key]) for r in rows)
    return "; ".join(f"{split} " + ", ".join(f"{label} {n}" for (s, label), n in sorted(counts.items()) if s == split)
                     for split in ("train", "test") if any(s == split for s, _ in counts))


# ---- IDRiD disease grading ---------------------------------------------------------------------------------------

IDRID_FOLDER = "B. Disease Grading"
IDRID_IMAGES = {"train": "1. Original Images/a. Training Set", "test": "1. Original Images/b. Testing Set"}
IDRID_LABELS = {"train": "2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv",
                "test": "2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv"}
IDRID_COLUMNS = ("Image name", "Retinopathy grade", "Risk of macular edema")  # the file writes 'edema ' (a space)
IDRID_GRADES = ("no_DR", "mild_NPDR", "moderate_NPDR", "severe_NPDR", "PDR")  # international DR scale 0-4


def _grade(value: str | None, top: int, where: str, column: str) -> int:
    text = (value or "").strip()
    if not text.isdigit() or int(text) > top:
        raise DataError(f"{where}: {column!r} is {text!r}, not a grade 0-{top}. Is this the official file, "
                        f"unmodified?")
    return int(text)


def prepare_idrid_grading(raw: Path, out: Path) -> list[str]:
    """IDRiD "B. Disease Grading" -> labels.csv with the `fundus_dr` classes "0".."4".

    RAW_DIR holds the unpacked `B. Disease Grading/` folder (or is that folder): `1. Original Images/a. Training
    Set/IDRiD_001.jpg ...`, `b. Testing Set/`, and `2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv`,
    `b. IDRiD_Disease Grading_Testing Labels.csv` (header `Image name,Retinopathy grade,Risk of macular edema `,
    image names without extension; the files end in empty columns and rows, which are ignored).

    Columns written: path, label (DR grade 0-4), split (train | test, the official sets), label_name (no_DR ...
    PDR), dme_grade (Risk of macular edema, 0-2), image_id (`train/IDRiD_001`: training and testing images share
    names). No patient_id column: IDRiD publishes none, so medtricks splits image by image (and warns). Dropped, and
    counted: CSV rows whose image is absent, images that no CSV row grades.
    """
    root = raw / IDRID_FOLDER if (raw / IDRID_FOLDER).is_dir() else raw
    for split in ("train", "test"):
        for rel, is_there in ((IDRID_IMAGES[split], Path.is_dir), (IDRID_LABELS[split], Path.is_file)):
            if not is_there(root / rel):
                raise DataError(f"{raw}: '{IDRID_FOLDER}/{rel}' is missing; expected the official layout of the IDRiD "
                                f"disease-grading download ({IDRID_FOLDER}/1. Original Images/{{a. Training Set,b. "
                                f"Testing Set}}/*.jpg and the two label CSVs in {IDRID_FOLDER}/2. Groundtruths/).")
    out_rows, absent, ungraded = [], 0, 0
    for split in ("train", "test"):
        labels_csv = root / IDRID_LABELS[split]
        rows = read_csv(labels_csv, IDRID_COLUMNS)
        images = _images_by_stem(root / IDRID_IMAGES[split])
        graded: set[str] = set()
        for i, row in enumerate(rows):
            name = (row["Image name"] or "").strip()
            if not name:  # the official files end with rows of empty cells
                continue
            stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
            where = f"{labels_csv} line {i + 2}"
            grade = _grade(row["Retinopathy grade"], 4, where, "Retinopathy grade")
            dme = _grade(row["Risk of macular edema"], 2, where, "Risk of macular edema")
            if stem in graded:
                raise DataError(f"{where}: {name} is graded twice in {labels_csv.name}; keep one row.")
            graded.add(stem)
            if stem not in images:
                absent += 1
                continue
            out_rows.append({"path": str(images[stem]), "label": str(grade), "split": split,
                             "label_name": IDRID_GRADES[grade], "dme_grade": str(dme), "image_id": f"{split}/{stem}"})
        ungraded += len(images.keys() - graded)
    if not out_rows:
        raise DataError(f"{raw}: none of the images named in the two label CSVs is in {IDRID_FOLDER}/1. Original "
                        f"Images/ (looked for <Image name>.jpg).")
    labels = write_labels(out, ["path", "label", "split", "label_name", "dme_grade", "image_id"], out_rows)
    return summary(f"{labels}: {len(out_rows)} images, DR grades {_split_counts(out_rows)} (val is carved from train; "
                   f"no patient ids: image by image)",
                   [(absent, f"graded images whose file is not in {IDRID_FOLDER}/1. Original Images/"),
                    (ungraded, "image files that no row of the label CSVs grades")])


# ---- ISIC 2016 Part 3 (lesion classification) --------------------------------------------------------------------

ISIC2016 = {"train": ("ISBI2016_ISIC_Part3_Training_Data", "ISBI2016_ISIC_Part3_Training_GroundTruth.csv"),
            "test": ("ISBI2016_ISIC_Part3_Test_Data", "ISBI2016_ISIC_Part3_Test_GroundTruth.csv")}
# the training file writes benign / malignant, the test file 0.0 / 1.0
ISIC2016_TRUTH = {"benign": "benign", "0": "benign", "0.0": "benign",
                  "malignant": "malignant", "1": "malignant", "1.0": "malignant"}
ISIC2016_LABELS = {"benign": "nevus", "malignant": "melanoma"}  # the `dermoscopy` recipe's classes
_ISIC_ID = re.compile(r"^ISIC_\d{7}$")


def _isic2016_truth(path: Path) -> list[tuple[str, str, str]]:
    """(isic id, benign | malignant, where) per row of a header-less ground-truth CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read it ({exc}).") from exc
    truth = []
    for i, row in enumerate(rows):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        where = f"{path} line {i + 1}"
        if len(cells) < 2 or not cells[1]:
            raise DataError(f"{where}: column 2 (the diagnosis) is missing; the official file has two columns and "
                            f"no header: ISIC_<id>,benign|malignant (training) or ISIC_<id>,0.0|1.0 (test).")
        if not _ISIC_ID.match(cells[0]) or cells[1].lower() not in ISIC2016_TRUTH:
            raise DataError(f"{where}: {','.join(cells[:2])!r} is not ISIC_<7 digits>,benign|malignant|0.0|1.0 (the "
                            f"official file has no header row). Is this the official file, unmodified?")
        truth.append((cells[0], ISIC2016_TRUTH[cells[1].lower()], where))
    return truth


def prepare_isic2016(raw: Path, out: Path) -> list[str]:
    """ISIC 2016 Challenge Part 3 (ISBI 2016 lesion classification) -> labels.csv with the `dermoscopy` classes.

    RAW_DIR holds ISBI2016_ISIC_Part3_Training_Data/ISIC_*.jpg, ISBI2016_ISIC_Part3_Training_GroundTruth.csv
    (no header: ISIC id, benign | malignant), ISBI2016_ISIC_Part3_Test_Data/ and
    ISBI2016_ISIC_Part3_Test_GroundTruth.csv (no header: ISIC id, 0.0 | 1.0).

    Columns written: path, label (melanoma for malignant; nevus for benign, which in ISIC 2016 means "not melanoma":
    no finer diagnosis is published), split (train | test, the official sets), benign_malignant, isic_id. No
    patient_id column: ISIC 2016 publishes no patient or lesion ids, so medtricks splits image by image (and warns).
    Dropped, and counted: rows whose image is absent, images with no ground-truth row.
    """
    for split, (folder, truth_csv) in ISIC2016.items():
        if not (raw / folder).is_dir():
            raise DataError(f"{raw}: the folder {folder}/ is missing; unpack {folder}.zip of the ISIC 2016 challenge "
                            f"(https://challenge.isic-archive.com/data/) into RAW_DIR.")
        if not (raw / truth_csv).is_file():
            raise DataError(f"{raw}: {truth_csv} is missing (the official {split} ground truth of ISIC 2016 Part 3).")
    out_rows, absent, unlabelled = [], 0, 0
    for split, (folder, truth_csv) in ISIC2016.items():
        images = _images_by_stem(raw / folder)
        seen: set[str] = set()
        for isic_id, truth, where in _isic2016_truth(raw / truth_csv):
            if isic_id in seen:
                raise DataError(f"{where}: {isic_id} is listed twice in {truth_csv}; keep one row.")
            seen.add(isic_id)
            if isic_id not in images:
                absent += 1
                continue
            out_rows.append({"path": str(images[isic_id]), "label": ISIC2016_LABELS[truth], "split": split,
                             "benign_malignant": truth, "isic_id": isic_id})
        unlabelled += len(images.keys() - seen)
    if not out_rows:
        raise DataError(f"{raw}: none of the images named in the two ground-truth CSVs is in "
                        f"{ISIC2016['train'][0]}/ or {ISIC2016['test'][0]}/ (looked for <ISIC id>.jpg).")
    labels = write_labels(out, ["path", "label", "split", "benign_malignant", "isic_id"], out_rows)
    return summary(f"{labels}: {len(out_rows)} images ({_split_counts(out_rows)}; val is carved from train; no "
                   f"patient ids: image by image)",
                   [(absent, "ground-truth rows whose image is not under RAW_DIR"),
                    (unlabelled, "image files with no ground-truth row")])


# ---- CheXpert ----------------------------------------------------------------------------------------------------

CHEXPERT_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")  # the downsampled and the original release
CHEXPERT_FINDINGS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                     "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                     "Fracture", "Support Devices")
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", *CHEXPERT_FINDINGS)
CHEXPERT_CSVS = {"train.csv": "train", "valid.csv": "test"}  # the official test set is not in the release
# Irvin et al. 2019, section "Uncertainty approaches": U-Zeros maps uncertain (-1) to negative, U-Ones to positive
CHEXPERT_UNCERTAIN = ("zeros", "ones")  # the first is the default
CHEXPERT_VIEWS = ("frontal", "all")
# 1.0 positive, 0.0 negative, -1.0 uncertain, blank: not mentioned in the report (negative, as in Irvin et al.)
_CHEXPERT_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "": 0, "-1.0": -1, "-1": -1}
_CHEXPERT_PATH = re.compile(r"^[^/]+/(train|valid)/(patient\d+)/(study\d+)/([^/]+)$")
_SEX = {"Male": "M", "Female": "F"}


def prepare_chexpert(raw: Path, out: Path, uncertain: str = "zeros", views: str = "frontal") -> list[str]:
    """CheXpert (CheXpert-v1.0-small, or the original CheXpert-v1.0) -> a multi-label labels.csv.

    RAW_DIR holds the unpacked CheXpert-v1.0-small/ folder (or is it): train.csv, valid.csv (header `Path,Sex,Age,
    Frontal/Lateral,AP/PA,No Finding,...,Support Devices`) and the train/ and valid/ image folders their Path column
    names (`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`).

    Args:
        raw: RAW_DIR.
        out: the output folder.
        uncertain: `zeros` (U-Zeros) counts an uncertain (-1) finding as absent, `ones` (U-Ones) as present.
        views: `frontal` keeps frontal radiographs only; `all` keeps lateral ones too.

    Columns written: path, label (the positive findings of CHEXPERT_FINDINGS joined by `|`, `No Finding` for none:
    blank and 0.0 are negative, -1.0 follows `uncertain`; the official No Finding column, which ignores support
    devices, is not used), patient_id (`chexpert-patientNNNNN`), split (train for train.csv; test for valid.csv,
    the official validation set, because the official test set is not released: medtricks carves val from train by
    patient), official_split (train | valid), study (`patientNNNNN/studyN`), view (Frontal | Lateral), ap_pa, sex
    (M | F | empty), age, uncertain (the findings marked -1, joined by `|`, whatever the policy). Dropped, and
    counted: lateral views (views=frontal), rows whose image is absent.
    """
    if uncertain not in CHEXPERT_UNCERTAIN or views not in CHEXPERT_VIEWS:
        raise DataError(f"chexpert: uncertain must be one of {CHEXPERT_UNCERTAIN} and views one of {CHEXPERT_VIEWS}; "
                        f"got {uncertain!r}, {views!r}.")
    root = next((raw / n for n in CHEXPERT_FOLDERS if (raw / n).is_dir()), raw)
    for name, is_there in (("train.csv", Path.is_file), ("valid.csv", Path.is_file), ("train/", Path.is_dir),
                           ("valid/", Path.is_dir)):
        if not is_there(root / name):
            raise DataError(f"{root}: {name} is missing; expected the official CheXpert layout: "
                            f"CheXpert-v1.0-small/ holding train.csv, valid.csv and the train/ and valid/ image "
                            f"folders (give that folder, or the folder containing it).")
    tables = {name: read_csv(root / name, CHEXPERT_COLUMNS) for name in CHEXPERT_CSVS}
    out_rows, dropped, n_uncertain = [], Counter(), 0
    for name, split in CHEXPERT_CSVS.items():
        for i, row in enumerate(tables[name]):
            where = f"{root / name} line {i + 2}"
            match = _CHEXPERT_PATH.match((row["Path"] or "").strip())
            if match is None:
                raise DataError(f"{where}: Path {row['Path']!r} is not <folder>/{{train,valid}}/patientNNNNN/studyN/"
                                f"<view>.jpg. Is this the official file, unmodified?")
            values = {}
            for finding in CHEXPERT_FINDINGS:
                value = (row[finding] or "").strip()
                if value not in _CHEXPERT_VALUES:
                    raise DataError(f"{where}: {finding!r} is {value!r}; CheXpert labels are 1.0, 0.0, -1.0 or "
                                    f"blank.")
                values[finding] = _CHEXPERT_VALUES[value]
            view = (row["Frontal/Lateral"] or "").strip()
            if views == "frontal" and view != "Frontal":
                dropped["lateral views (--views frontal)"] += 1
                continue
            folder, patient, study, file = match.groups()
            path = root / folder / patient / study / file
            if not path.is_file():
                dropped["image file absent"] += 1
                continue
            unsure = [f for f in CHEXPERT_FINDINGS if values[f] == -1]
            n_uncertain += len(unsure)
            found = [f for f in CHEXPERT_FINDINGS if values[f] == 1 or (values[f] == -1 and uncertain == "ones")]
            out_rows.append({"path": str(path.resolve()), "label": "|".join(found) or "No Finding",
                             "patient_id": f"chexpert-{patient}", "split": split, "official_split": name[:-4],
                             "study": f"{patient}/{study}", "view": view, "ap_pa": (row["AP/PA"] or "").strip(),
                             "sex": _SEX.get((row["Sex"] or "").strip(), ""), "age": (row["Age"] or "").strip(),
                             "uncertain": "|".join(unsure)})
    if not out_rows:
        raise DataError(f"{root}: none of the {sum(map(len, tables.values()))} rows of train.csv and valid.csv names "
                        f"an image under {root} that is kept ({dict(dropped)}).")
    labels = write_labels(out, ["path", "label", "patient_id", "split", "official_split", "study", "view", "ap_pa",
                                "sex", "age", "uncertain"], out_rows)
    splits_of: dict[str, set] = {}
    for r in out_rows:
        splits_of.setdefault(r["patient_id"], set()).add(r["split"])
    splits = Counter(r["split"] for r in out_rows)
    lines = [f"{labels}: {len(out_rows)} images of {len(splits_of)} patients (train {splits['train']}; test "
             f"{splits['test']} = the official validation set; val is carved from train by patient)",
             f"uncertain labels (-1.0): {n_uncertain} in {sum(bool(r['uncertain']) for r in out_rows)} images, "
             f"counted as {'present (U-Ones)' if uncertain == 'ones' else 'absent (U-Zeros)'}: --uncertain {uncertain}"]
    lines += [f"left out: {n} rows ({why})" for why, n in dropped.items()]
    both = sum(len(s) > 1 for s in splits_of.values())
    if both:
        lines.append(f"warning: {both} patient(s) have images in both train.csv and valid.csv")
        logger.warning("%s: %d patient(s) have images in both train.csv and valid.csv", root, both)
    return lines
