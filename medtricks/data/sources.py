"""Data sources, auto-detected from `--data`, turned into one list of sample records.

A record is a dict in MONAI's dictionary style so the patient id travels with the pixels to the split and the
per-patient statistics: `{"image": Path | np.ndarray, "label": int (-1 when unlabelled), "patient_id": str | None,
"split": "train" | "val" | "test" | None, "key": str}` where `key` names the sample in messages (a path relative to
the source, or `train[17]` for an array).

Accepted layouts (see DESIGN.md):
- a folder with `labels.csv`, or any CSV file: columns `path,label` and optionally `patient_id`, `split`, others;
- a MedMNIST-style `.npz` (`{train,val,test}_images` / `_labels`, any subset), or a folder holding exactly one;
- an ImageFolder: one sub-folder per class holding images (PNG/JPEG/TIFF/BMP/DICOM, nested folders allowed);
- a folder of images without class folders (unlabelled; `data check` and `predict` only).
For DICOM files without a manifest, patients are grouped by the DICOM PatientID, replaced by a pseudonym
(`patient-0001`, numbered in sorted file order) so that the real identifier never leaves the reader.

Multi-label sources (`LabelFormat.multilabel`, the recipe's data.task: multilabel): the classes are the findings and
a record's label is a multi-hot tuple over them (`(1, 0, 1)`). A CSV label cell lists the findings of the image
joined by the separator (`Pneumonia|Infiltration`); the no-finding name (`No Finding`) is all zeros; an empty cell
is an error (a forgotten label must not become a negative image); an unknown name is an error naming the row. A
MedMNIST-style .npz holds (N, L) labels of 0/1 (ChestMNIST's layout).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medtricks.data.dicom import DICOM_SUFFIXES, is_dicom, read_patient_id, unreadable_entry
from medtricks.data.images import IMAGE_SUFFIXES
from medtricks.data.npz import check_images, check_labels, check_multi_hot, npz_array, open_npz
from medtricks.errors import DataError, short

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MAX_INFERRED_CLASSES = 1000  # classes 0..max(label) of an array source without data.classes
MAX_CLASSES = 10_000  # 100x any medical task's: more distinct labels is a wrong label column (and a huge head)
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
NO_PATIENT_IDS = ("{source}: no patient ids, so images are split one by one; images of one patient can land in two "
                  "splits and inflate validation results. Add a patient_id column to labels.csv if you can.")


@dataclass(frozen=True)
class LabelFormat:
    """How labels are written: the recipe's data.task, label_column, label_separator and no_finding."""

    multilabel: bool = False
    column: str = "label"
    separator: str = "|"
    no_finding: str | None = "No Finding"

    def __post_init__(self):
        if self.multilabel and self.no_finding and self.separator in self.no_finding:
            raise DataError(f"data.no_finding {short(self.no_finding)} contains the label separator "
                            f"{short(self.separator)} (data.label_separator): a no-finding cell would be split into "
                            f"findings. Choose a separator that no label contains.")

    def check_classes(self, classes) -> None:
        """Refuse multi-label class names that contain the separator: no label cell could name them."""
        clash = [c for c in classes or () if self.separator in c] if self.multilabel else []
        if clash:
            raise DataError(f"data.classes {', '.join(map(short, clash))}: contain the label separator "
                            f"{short(self.separator)} (data.label_separator), so no label cell can name them. Choose a "
                            f"separator that no class name contains.")

    @classmethod
    def of(cls, config) -> LabelFormat:
        """The format of a recipe's data section (medtricks.recipe.DataConfig)."""
        return cls(config.multilabel, config.label_column, config.label_separator, config.no_finding)


@dataclass
class Source:
    """A data source as records plus what is known about it."""

    root: Path
    kind: str  # csv | npz | imagefolder | unlabelled
    classes: tuple[str, ...]
    records: list[dict]
    has_patient_ids: bool
    has_splits: bool
    missing: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of rows whose file is absent
    multilabel: bool = False  # labels are multi-hot tuples over `classes`
    not_images: list[str] = field(default_factory=list)  # files in class folders that are no image (named in a warning)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def _is_image_file(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    # a link to an image on an unmounted or moved drive, or a pipe or device named like an image: kept (never
    # opened here), so that reading it names it
    if not path.is_file():
        return path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return is_dicom(path)  # .dcm or extension-less files with the DICM preamble


def _visible_files(folder: Path) -> list[Path]:
    """Everything but folders under `folder`, recursively, outside hidden files and folders: files, links to files
    that are gone, pipes, devices and sockets (the last three are listed, never read)."""
    try:
        return [p for p in folder.rglob("*") if not p.is_dir() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts)]
    except OSError as exc:  # a sub-folder that cannot be listed: its images would be lost unsaid
        raise DataError(f"{folder}: cannot list {exc.filename or 'a sub-folder'} ({exc.strerror or exc}); make it "
                        f"readable, or point at a folder that holds only the images.") from exc


def class_name(name: str) -> str:
    """A class name in Unicode's composed form: 'é' typed as one character or as e + accent (macOS file names,
    some editors) is one class, not two that print alike."""
    return unicodedata.normalize("NFC", name)


def image_files(folder: Path, warn: bool = True, others: list[Path] | None = None) -> list[Path]:
    """The image files under `folder` (recursively; by extension, or DICOM by content), sorted; the other visible
    files are named in a warning (`warn`) and appended to `others`, never dropped unsaid: an image saved without
    its extension is one."""
    visible = _visible_files(folder)
    found = sorted(p for p in visible if _is_image_file(p))
    left = sorted(set(visible) - set(found))
    if others is not None:
        others.extend(left)
    if left and warn:
        logger.warning("%s: %d file(s) are not read, being neither an image by extension (PNG, JPEG, TIFF, BMP, "
                       "DICOM) nor DICOM by content: %s%s; convert or rename such a file to use it.", folder,
                       len(left), ", ".join(str(p.relative_to(folder)) for p in left[:5]),
                       " ..." if len(left) > 5 else "")
    return found


def image_inputs(inputs) -> list[Path]:
    """The image files named by `inputs` (files, or folders searched recursively), for predict and explain.

    Raises:
        DataError: an input that does not exist, or inputs that hold no image file at all.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one path, not the characters of one
        inputs = [inputs]
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(image_files(item))  # (a file given by name is tried whatever its extension)
        elif item.is_file():
            files.append(item)
        elif item.exists():
            raise DataError(f"{item}: not a regular file or folder (a device, a pipe or a socket); give image files "
                            f"or folders.")
        else:
            raise DataError(f"{item}: no such file or folder.")
    if not files:
        raise DataError(f"{', '.join(map(str, inputs))}: no image files there (PNG, JPEG, TIFF, BMP or DICOM); "
                        f"nothing to score.")
    return files


def _sort_names(names) -> tuple[str, ...]:
    names = set(names)
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):  # ASCII digits: '²'.isdigit() is True, int('²') fails
        return tuple(sorted(names, key=lambda n: (int(n), n)))  # DR grades 0..4 numerically; "01" vs "1" by text
    return tuple(sorted(names))


def _check_count(classes: tuple[str, ...]) -> None:
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{len(classes)} distinct labels (more than {MAX_CLASSES}), e.g. {short(classes[0])}: is the "
                        f"label column the right one? Give the class column (data.label_column).")


def _class_index(classes: tuple[str, ...] | None, labels: list[str], where: list[str]) -> tuple[tuple, list[int]]:
    """Map label names to indices of `classes` (or of the sorted names when None); unknown labels are errors."""
    if classes is None:
        classes = _sort_names(labels)
    _check_count(classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [(w, lab) for w, lab in zip(where, labels, strict=True) if lab not in index]
    if unknown:
        shown = "; ".join(f"{w}: label {short(lab)}" for w, lab in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise DataError(f"labels outside the recipe's classes {list(classes)}: {shown}{more}. Add the class to "
                        f"data.classes, or fix or remove those rows/files.")
    return classes, [index[lab] for lab in labels]


def _multi_hot(classes: tuple[str, ...] | None, cells: list[str], where: list[str],
               labels: LabelFormat) -> tuple[tuple, list[tuple[int, ...]]]:
    """Multi-hot tuples over `classes` (the sorted finding names when None) of label cells such as `A|B`; the
    no-finding name is all zeros. Unknown names and a finding listed with the no-finding name are errors."""
    labels.check_classes(classes)
    names = [[part.strip() for part in cell.split(labels.separator) if part.strip()] for cell in cells]
    for w, found in zip(where, names, strict=True):
        if not found:  # '|' alone: not a no-finding image, an empty label
            raise DataError(f"{w}: empty label (only the separator {short(labels.separator)}). Every row needs "
                            f"findings from data.classes, or {short(labels.no_finding)} (data.no_finding) for none.")
        if labels.no_finding in found and len(found) > 1:
            raise DataError(f"{w}: label {short(labels.separator.join(found))} lists {short(labels.no_finding)} "
                            f"(data.no_finding) together with findings; keep one or the other.")
    if classes is None:
        classes = _sort_names(n for found in names for n in found if n != labels.no_finding)
    _check_count(classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [(w, n) for w, found in zip(where, names, strict=True) for n in found
               if n not in index and n != labels.no_finding]
    if unknown:
        shown = "; ".join(f"{w}: label {short(n)}" for w, n in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise DataError(f"labels outside the recipe's classes {list(classes)} (separator "
                        f"{short(labels.separator)}, no-finding label {short(labels.no_finding)}): {shown}{more}. Add "
                        f"the finding to data.classes, or fix or remove those rows.")
    hot = []
    for found in names:
        vector = [0] * len(classes)
        for n in found:
            if n != labels.no_finding:
                vector[index[n]] = 1
        hot.append(tuple(vector))
    return classes, hot


def _normalize_split(value: str, where: str) -> str:
    split = _SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise DataError(f"{where}: split {short(value)} is not one of train, val, test.")
    return split


def _pseudonymize_dicom_patients(records: list[dict]) -> bool:
    """Group DICOM records by PatientID under pseudonyms; True when every record got one."""
    pseudonyms: dict[str, str] = {}
    for rec in records:
        path = rec["image"]
        if not is_dicom(path):
            return False
        try:
            real = read_patient_id(path)
        except DataError:
            return False  # the file is reported as unreadable when it is decoded
        if not real:
            return False
        rec["patient_id"] = pseudonyms.setdefault(real, f"patient-{len(pseudonyms) + 1:04d}")
    return bool(records)


def _from_csv(csv_path: Path, classes, labels: LabelFormat) -> Source:
    root = csv_path.parent
    rows, lines = [], []  # lines: the physical line each row ends on (a quoted field may hold a newline)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
            header = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV manifest ({exc}).") from exc
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:  # csv.DictReader would keep the last of them without a word
        raise DataError(f"{csv_path}: column {', '.join(map(short, repeated))} appears more than once in the header "
                        f"line; keep one, or rename the others.")
    columns = set(rows[0].keys()) if rows else set()
    if not rows:
        raise DataError(f"{csv_path}: the manifest has no rows. Expected columns path,label[,patient_id][,split].")
    column = labels.column
    for need in ("path", column):
        if need not in columns:
            raise DataError(f"{csv_path}: column {short(need)} is missing; found {sorted(columns)}. Expected columns "
                            f"path,{column}[,patient_id][,split] (the label column is data.label_column).")
    where = [f"{csv_path.name} line {line} ({row['path']})" for line, row in zip(lines, rows, strict=True)]
    seen: dict[Path, str] = {}
    resolved = []
    for w, row in zip(where, rows, strict=True):
        if not (row["path"] or "").strip():
            raise DataError(f"{w}: empty path.")
        if (row[column] or "").strip() == "":
            no_finding = f", or {short(labels.no_finding)} (data.no_finding) for none" if labels.multilabel else ""
            raise DataError(f"{w}: empty label. Every row needs a label from data.classes{no_finding}.")
        # the file itself, however it is written (./a.dcm, a//b.dcm, a/../a.dcm, a symlink): one image, one row
        if "\0" in row["path"]:
            raise DataError(f"{w}: the path holds a NUL byte, which no file name can; fix that row of the manifest.")
        try:
            path = (root / row["path"].strip()).resolve()
        except OSError as exc:  # a link loop, a part over the file system's name limit
            raise DataError(f"{w}: cannot use that path ({exc.strerror or exc}); fix that row of the "
                            f"manifest.") from exc
        if path in seen:
            raise DataError(f"{w}: duplicate path, already listed at {seen[path]} (both name the file {path}). Each "
                            f"image must appear once (else it can land in train and test, with two labels); remove "
                            f"one row.")
        seen[path] = w
        resolved.append(path)
    cells = [class_name(row[column].strip()) for row in rows]
    classes, values = (_multi_hot(classes, cells, where, labels) if labels.multilabel
                       else _class_index(classes, cells, where))
    given = [bool((row["patient_id"] or "").strip()) for row in rows] if "patient_id" in columns else []
    has_patient = any(given)  # an empty patient_id column is no patient ids at all
    if has_patient and not all(given):
        logger.warning("%s: %d of %d rows have an empty patient_id; those images are split as their own patients.",
                       csv_path, given.count(False), len(given))
    split_values = [(row.get("split") or "").strip() for row in rows] if "split" in columns else []
    has_splits = bool(split_values) and all(split_values)
    if split_values and any(split_values) and not has_splits:
        raise DataError(f"{csv_path}: the split column is filled for some rows only; fill it for every row "
                        f"(train, val, test) or remove the column to let medtricks split.")
    records, missing = [], []
    for i, (w, row, path) in enumerate(zip(where, rows, resolved, strict=True)):
        reason = unreadable_entry(path)
        if reason is not None:
            missing.append((row["path"], f"{w}: {reason} ({path})"))
            continue
        patient = (row.get("patient_id") or "").strip() or None
        records.append({"image": path, "label": values[i], "patient_id": patient,
                        "split": _normalize_split(split_values[i], w) if has_splits else None, "key": row["path"]})
    return Source(root, "csv", classes, records, has_patient, has_splits, missing, labels.multilabel)


def _from_npz(npz_path: Path, classes, labels: LabelFormat) -> Source:
    data = open_npz(npz_path)
    keys = set(data.files)
    present = [s for s in SPLITS if f"{s}_images" in keys]
    if not present:
        raise DataError(f"{npz_path}: no '<split>_images' arrays; found keys {sorted(keys)}. Expected MedMNIST keys "
                        f"train_images/train_labels (val_, test_ optional).")
    unread = sorted(keys - {f"{s}_{part}" for s in present for part in ("images", "labels")})
    if unread:
        logger.warning("%s: arrays %s are not read: medtricks reads <split>_images with <split>_labels for the splits "
                       "%s. Rename an array that holds images of a split.", npz_path, unread, "/".join(SPLITS))
    records, label_values = [], []
    for split in present:
        if f"{split}_labels" not in keys:
            raise DataError(f"{npz_path}: '{split}_images' has no matching '{split}_labels' array.")
        images = check_images(npz_array(data, npz_path, f"{split}_images"), npz_path, f"{split}_images")
        check = check_multi_hot if labels.multilabel else check_labels
        values = check(npz_array(data, npz_path, f"{split}_labels"), npz_path, f"{split}_labels")
        if len(images) != len(values):
            raise DataError(f"{npz_path}: '{split}_images' holds {len(images)} images but '{split}_labels' "
                            f"{len(values)} labels.")
        for i in range(len(values)):
            label = tuple(int(v) for v in values[i]) if labels.multilabel else int(values[i])
            records.append({"image": images[i], "label": label, "patient_id": None, "split": split,
                            "key": f"{split}[{i}]"})
            label_values.append(label)
    if labels.multilabel:
        return _multi_hot_npz(npz_path, classes, records, label_values)
    if classes is None:
        if max(label_values) >= MAX_INFERRED_CLASSES:
            raise DataError(f"{npz_path}: a label is {max(label_values)}, so its classes would be "
                            f"0..{max(label_values)} (over {MAX_INFERRED_CLASSES}): a corrupt label? Fix it, or name "
                            f"the classes with data.classes.")
        classes = tuple(str(v) for v in range(max(label_values) + 1))
    bad = [r["key"] for r in records if not 0 <= r["label"] < len(classes)]
    if bad:
        raise DataError(f"{npz_path}: label indices outside the {len(classes)} classes {list(classes)} at "
                        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Set data.classes to every class.")
    return Source(npz_path.parent, "npz", tuple(classes), records, False, True)


def _multi_hot_npz(npz_path: Path, classes, records: list[dict], label_values: list[tuple]) -> Source:
    widths = sorted({len(v) for v in label_values})
    if len(widths) > 1:
        raise DataError(f"{npz_path}: the label arrays of the splits have {widths} columns; every split needs one "
                        f"column per finding, the same ones.")
    width = widths[0]
    if classes is None:
        classes = tuple(str(v) for v in range(width))
    if len(classes) != width:
        raise DataError(f"{npz_path}: the labels have {width} columns (findings) but data.classes names "
                        f"{len(classes)}: {list(classes)}. Name one class per column, in column order.")
    return Source(npz_path.parent, "npz", tuple(classes), records, False, True, multilabel=True)


def _from_folder(folder: Path, classes) -> Source:
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_class: dict[str, list[Path]] = {}
    others: list[Path] = []
    for d in subdirs:  # two folders whose names differ only in Unicode form are one class
        by_class.setdefault(class_name(d.name), []).extend(image_files(d, others=others))
    by_class = {name: sorted(files) for name, files in by_class.items() if files}
    loose = [p for p in folder.iterdir() if _is_image_file(p)]
    if by_class and not loose:
        names = list(by_class)
        classes, _ = _class_index(classes, names, [f"{folder / n}/" for n in names])
        index = {name: i for i, name in enumerate(classes)}
        records = [{"image": p, "label": index[name], "patient_id": None, "split": None,
                    "key": p.relative_to(folder).as_posix()} for name, files in by_class.items() for p in files]
        has_patient = _pseudonymize_dicom_patients(records)
        if not has_patient:
            for rec in records:
                rec["patient_id"] = None
        return Source(folder, "imagefolder", classes, records, has_patient, False,
                      not_images=[p.relative_to(folder).as_posix() for p in others])
    files = image_files(folder, warn=not subdirs)  # the class folders' other files were named above
    if not files:
        raise DataError(f"{folder}: no images found (looked for PNG, JPEG, TIFF, BMP and DICOM files, a labels.csv "
                        f"and a .npz). Point --data at a folder with class sub-folders, a labels.csv, or a .npz.")
    records = [{"image": p, "label": -1, "patient_id": None, "split": None, "key": p.relative_to(folder).as_posix()}
               for p in files]
    has_patient = _pseudonymize_dicom_patients(records)
    if not has_patient:
        for rec in records:
            rec["patient_id"] = None
    return Source(folder, "unlabelled", (), records, has_patient, False)


def load_source(path: str | Path, classes: tuple[str, ...] | list[str] | None = None,
                labels: LabelFormat | None = None) -> Source:
    """Detect the layout of `path` and list its samples (no pixels are decoded here).

    Args:
        path: a folder, a CSV manifest or a .npz file.
        classes: the recipe's class names in label order; None takes them from the source. A label or class
            folder outside them is an error naming the row or folder.
        labels: how labels are written (LabelFormat.of(recipe.data)); None: single-label, column `label`. A
            multi-label source must be a CSV manifest or a .npz (class folders hold one class per image).

    Raises:
        DataError: missing path, empty folder, malformed manifest, unknown or duplicate labels and paths.
    """
    path = Path(path).expanduser()
    classes = tuple(class_name(str(c)) for c in classes) if classes is not None else None
    if classes is not None:
        check_class_names(classes, f"classes {list(classes)}")
    if not path.exists():
        raise DataError(f"{path}: data source not found. Give a folder (class sub-folders or labels.csv), a CSV "
                        f"manifest or a .npz file with --data or data.source.")
    labels = labels if labels is not None else LabelFormat()
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _from_npz(path, classes, labels)
        if path.suffix.lower() in (".csv", ".tsv"):
            return _from_csv(path, classes, labels)
        raise DataError(f"{path}: a single file is not a data source; give a folder, a CSV manifest or a .npz file.")
    if not path.is_dir():
        raise DataError(f"{path}: not a regular file or folder (a device, a pipe or a socket); give a folder, a CSV "
                        f"manifest or a .npz file.")
    manifest = path / "labels.csv"
    if manifest.is_file():
        return _from_csv(manifest, classes, labels)
    if os.path.lexists(manifest):  # read as a folder of images, its labels, splits and patients would be lost
        raise DataError(f"{manifest}: there is a labels.csv, but it is not a readable file (a link to a file that is "
                        f"gone, a folder, a pipe); restore the manifest, or remove the name to use the class "
                        f"folders.")
    npzs = sorted(path.glob("*.npz"))
    if len(npzs) == 1:
        return _from_npz(npzs[0], classes, labels)
    if len(npzs) > 1:
        raise DataError(f"{path}: several .npz files ({', '.join(p.name for p in npzs)}); pass one of them.")
    source = _from_folder(path, classes)
    if labels.multilabel and source.labelled:
        raise DataError(f"{path}: class sub-folders hold one class per image; data.task: multilabel needs a CSV "
                        f"manifest (labels such as A{labels.separator}B) or a .npz with (N, L) labels.")
    return source


def check_class_names(names: Sequence[str], given: str) -> None:
    """Refuse empty or repeated class names (`given` names where they came from, e.g. "--classes 'a,a'")."""
    if not all(name.strip() for name in names):
        raise DataError(f"{given}: a class name is empty; give every class a name, e.g. --classes normal,opacity.")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DataError(f"{given}: {', '.join(repeated)} given twice; name each class once.")


def count_labels(records: list[dict], classes: tuple[str, ...]) -> dict[str, int]:
    """Images per class name, in class order (multi-label: images with each finding)."""
    if records and isinstance(records[0]["label"], tuple):
        return {name: sum(r["label"][i] for r in records) for i, name in enumerate(classes)}
    counts = Counter(r["label"] for r in records)
    return {name: counts.get(i, 0) for i, name in enumerate(classes)}
